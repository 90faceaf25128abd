"""Split sequences across engines and join the pieces back, in order.

Layer: API helpers. Imports the standard library only (numpy is used when given numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _is_ndarray(obj: Any) -> bool:
    return type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray"


def split(seq: Any, n: int) -> list:
    """``seq`` cut into ``n`` contiguous parts whose lengths differ by at most one.

    Slices keep their type (lists stay lists; numpy arrays become views, not copies).
    Iterables that cannot be sliced are made lists first.
    """
    if n < 1:
        raise ValueError(f"cannot split into {n} parts")
    if not (_is_ndarray(seq) or isinstance(seq, (list, tuple, range, str, bytes))):
        if not hasattr(seq, "__getitem__") or not hasattr(seq, "__len__"):
            seq = list(seq)
    length = len(seq)
    base, extra = divmod(length, n)
    parts, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        parts.append(seq[start:stop])
        start = stop
    return parts


def join(parts: Sequence[Any]) -> Any:
    """Concatenate parts made by :func:`split` (or results per part) back into one."""
    parts = list(parts)
    if not parts:
        return []
    if all(_is_ndarray(p) for p in parts):
        import numpy

        return numpy.concatenate(parts)
    if all(isinstance(p, str) for p in parts):
        return "".join(parts)
    if all(isinstance(p, tuple) for p in parts):
        return tuple(x for p in parts for x in p)
    out: list = []
    for p in parts:
        if isinstance(p, (list, tuple, range)) or _is_ndarray(p):
            out.extend(p)
        else:
            out.append(p)
    return out
