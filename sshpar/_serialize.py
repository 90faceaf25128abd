"""The one place that pickles user objects.

Layer: bottom. Shipped to engines, so it imports only the standard library, cloudpickle and
sshpar.errors.

Functions and closures go through cloudpickle (by value when defined in ``__main__``); data
uses pickle protocol 5, whose out-of-band buffers let numpy arrays travel as their own
segments, never copied into the pickle stream.
"""

from __future__ import annotations

import pickle
from typing import Any, Sequence

import cloudpickle

from .errors import SerializationError

PROTOCOL = 5


def dumps(obj: Any, *, what: str = "object") -> list:
    """Pickle ``obj`` into segments: the pickle stream, then each out-of-band buffer.

    Raises:
        SerializationError: ``obj`` (named by ``what`` in the message) cannot be pickled.
    """
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
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
