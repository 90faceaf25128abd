"""Functions the client applies for execute/run/push/pull: pickled by reference, never by value.

Layer: engine. Shipped to engines; the client imports it only to name these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The running engine's executor, set by the daemon at start (None in the client process).
EXECUTOR: Any = None


def _ns() -> dict:
    if EXECUTOR is None:
        raise RuntimeError("sshpar engine operations run only inside an engine")
    return EXECUTOR.namespace


def execute(source: str, filename: str | None = None) -> None:
    """Execute ``source`` in the engine namespace (``view.execute``/``view.run``)."""
    ns = _ns()
    code = EXECUTOR.compile_source(source, filename)
    if filename is not None and not filename.startswith("<"):
        saved = ns.get("__file__", _MISSING)
        ns["__file__"] = filename
        try:
            exec(code, ns)
        finally:
            if saved is _MISSING:
                ns.pop("__file__", None)
            else:
                ns["__file__"] = saved
    else:
        exec(code, ns)


def push(mapping: Mapping[str, Any]) -> None:
    ns = _ns()
    for key in mapping:
        if not isinstance(key, str) or not key.isidentifier():
            raise NameError(f"push: {key!r} is not a valid Python name")
    ns.update(mapping)


def pull(names: str | tuple | list) -> Any:
    ns = _ns()

    def one(name: str) -> Any:
        try:
            return ns[name]
        except KeyError:
            raise NameError(f"name {name!r} is not defined on the engine") from None

    if isinstance(names, str):
        return one(names)
    return [one(n) for n in names]


_MISSING = object()


def map_chunk(f: Any, *chunks: Any) -> list:
    """``list(map(f, *chunks))`` with ``f`` seeing the engine namespace (view.map)."""
    f = EXECUTOR.rebind(f) if EXECUTOR is not None else f
    return list(map(f, *chunks))


def call_chunk(f: Any, *chunks: Any) -> Any:
    """``f(*chunks)`` with ``f`` seeing the engine namespace (view.parallel)."""
    f = EXECUTOR.rebind(f) if EXECUTOR is not None else f
    return f(*chunks)
