"""The one place that pickles user objects.

Layer: bottom. Shipped to engines, so it imports only the standard library, cloudpickle and
sshpar.errors.

Functions and closures go through cloudpickle (by value when defined in ``__main__``); data
uses pickle protocol 5, whose out-of-band buffers let numpy arrays travel as their own
segments, never copied into the pickle stream.
"""

from __future__ import annotations

import io
import pickle
import types
from collections.abc import Sequence
from typing import Any

import cloudpickle
from cloudpickle.cloudpickle import _code_reduce

from .errors import SerializationError

PROTOCOL = 5


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, keeping the file name of code sent by value (it blanks it), so remote
    tracebacks name the user's file; notes each such file in ``code_files``."""

    def __init__(self, file: io.BytesIO, buffer_callback: Any, code_files: set[str]) -> None:
        super().__init__(file, protocol=PROTOCOL, buffer_callback=buffer_callback)
        self.code_files = code_files

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            rebuild, args = _code_reduce(obj)
            self.code_files.add(obj.co_filename)
            return rebuild, tuple(obj.co_filename if a == "<dynamic-code>" else a
                                  for a in args)
        return super().reducer_override(obj)


def dumps(obj: Any, *, what: str = "object", code_files: set[str] | None = None) -> list:
    """Pickle ``obj`` into segments: the pickle stream, then each out-of-band buffer.

    Args:
        code_files: if given, receives the file names of functions pickled by value.

    Raises:
        SerializationError: ``obj`` (named by ``what`` in the message) cannot be pickled.
    """
    buffers: list[pickle.PickleBuffer] = []
    try:
        if code_files is None:
            data = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
        else:
            out = io.BytesIO()
            _Pickler(out, buffers.append, code_files).dump(obj)
            data = out.getvalue()
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle {what}: {type(exc).__name__}: {exc}") from exc
    return [data, *(b.raw() for b in buffers)]


def loads(segments: Sequence[Any]) -> Any:
    """Rebuild an object from the segments :func:`dumps` produced."""
    # Buffers must be writable, or numpy arrays rebuilt on them come out read-only.
    buffers = [bytearray(b) if isinstance(b, bytes) else b for b in segments[1:]]
    return pickle.loads(segments[0], buffers=buffers)


def describe_type(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
