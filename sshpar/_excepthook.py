"""The hook that prints an uncaught RemoteError with rich, installed by every Client.

Layer: API. Rich is imported (through _render) only when there is an error to print, so a
client starts without it (tens of milliseconds of imports).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .errors import RemoteError

log = logging.getLogger("sshpar")

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def install_excepthook() -> None:
    """Print uncaught RemoteErrors with rich when stderr is a terminal; idempotent.

    Anything else (and any RemoteError when stderr is not a terminal) goes to the hook that
    was installed before, untouched.
    """
    previous: ExceptHook = sys.excepthook
    if getattr(previous, "_sshpar_previous", None) is not None:
        return

    def excepthook(etype: type[BaseException], value: BaseException,
                   tb: TracebackType | None) -> None:
        stream = sys.stderr
        if isinstance(value, RemoteError) and _isatty(stream):
            try:
                from ._render import print_uncaught

                print_uncaught(value, tb, stream)
            except Exception:  # the plain hook below still reports the error
                log.debug("rendering an uncaught RemoteError failed", exc_info=True)
            else:
                return
        previous(etype, value, tb)

    excepthook._sshpar_previous = previous  # type: ignore[attr-defined]
    sys.excepthook = excepthook


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - a closed or odd stream is not a terminal
        return False
