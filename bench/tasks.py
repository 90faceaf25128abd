"""The tiny functions every system runs, and the payloads the workloads move.

Functions here are pickled *by value* (``cloudpickle.register_pickle_by_value``), as a user's
functions defined in a script or notebook are: engines never import this module. Systems that
use the standard pickle (ProcessPoolExecutor, with fork) pickle them by reference instead,
which is how that system works.
"""

from __future__ import annotations

import os
from typing import Any

import cloudpickle


def by_value() -> None:
    """Make cloudpickle send this module's functions by value (call once per client)."""
    import sys

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def noop() -> None:
    return None


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def getpid() -> int:
    return os.getpid()


def map_chunk(f: Any, xs: list) -> list:
    return [f(x) for x in xs]


# ProcessPoolExecutor has no namespace to push to: a worker-global stands in for it.
_STORE: dict[str, Any] = {}


def store(name: str, value: Any) -> None:
    _STORE[name] = value


def fetch(name: str) -> Any:
    return _STORE[name]


def make_array(nbytes: int, seed: int = 7) -> Any:
    """A float64 array of ``nbytes`` random (incompressible) bytes."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal(nbytes // 8)


def same_array(a: Any, nbytes: int, seed: int = 7) -> bool:
    """Whether ``a`` is ``make_array(nbytes, seed)`` (checked on a sample, cheaply)."""
    import numpy as np

    ref = make_array(nbytes, seed)
    return a.shape == ref.shape and bool(np.array_equal(a[::4099], ref[::4099])) and \
        bool(a[-1] == ref[-1])


def frange(n: int) -> list[int]:
    return list(range(n))
