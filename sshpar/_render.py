"""Rendering remote errors for people: rich renderables and IPython's plain lines.

Layer: API. The one module that imports rich for errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from .errors import RemoteError


def remote_error_renderables(err: RemoteError) -> Iterator[Any]:
    from rich.text import Text

    title = f"{err.ename} on {err.engine_info}" if err.engine_info else err.ename
    yield Text(title, style="bold red")
    yield Text(err.traceback.rstrip())


def render_remote_error_lines(err: RemoteError) -> list[str]:
    head = f"{err.ename} on {err.engine_info}" if err.engine_info else err.ename
    return [head, *err.traceback.rstrip().splitlines()]
