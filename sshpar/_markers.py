"""Markers that travel with a call and are acted on by the engine: Reference, require, depend.

Layer: bottom. Shipped to engines, so it imports only the standard library and sshpar.errors.
"""

from __future__ import annotations

import functools
import importlib
import re
import types
from collections.abc import Callable
from typing import Any

from .errors import UnmetDependencyError

__all__ = ["Reference", "depend", "require"]


class Reference:
    """A name in the engine's namespace, passed where a value is expected.

    >>> ra = Reference("a")          # e0.apply(double, ra) doubles the engine's `a`
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise TypeError(f"Reference needs a Python identifier, got {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"Reference({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("Reference", self.name))

    def __reduce__(self) -> Any:
        return (Reference, (self.name,))


#: Any pickle holding a Reference names this module (to find the class by): a pickle that
#: does not cannot hold one. Searched without copying the pickle (``re`` reads buffers).
_MENTIONED = re.compile(re.escape(__name__.encode()))


def may_hold_references(pickled: Any) -> bool:
    """Whether the pickle ``pickled`` (bytes-like) may hold a Reference: if not, there is
    nothing for :func:`resolve_references` to do, and walking a large argument (a long list
    of a ``map``) item by item cost more than the call."""
    return _MENTIONED.search(pickled) is not None


def resolve_references(obj: Any, namespace: dict) -> Any:
    """Replace every Reference in ``obj`` (nested in lists, tuples, dicts) by its value."""
    if isinstance(obj, Reference):
        try:
            return namespace[obj.name]
        except KeyError:
            raise NameError(f"Reference({obj.name!r}): name {obj.name!r} is not defined "
                            "on the engine") from None
    if type(obj) is list:
        return [resolve_references(x, namespace) for x in obj]
    if type(obj) is tuple:
        return tuple(resolve_references(x, namespace) for x in obj)
    if type(obj) is dict:
        return {k: resolve_references(v, namespace) for k, v in obj.items()}
    return obj


def require(*modules: str | types.ModuleType) -> Callable[[Callable], Callable]:
    """Import ``modules`` on the engine before the decorated function runs.

    A module that cannot be imported fails the call with UnmetDependencyError, before the
    function runs. Names the function can use are bound in its globals.

    >>> @require("re")
    ... def findall(pat, x):
    ...     return re.findall(pat, x)
    """
    names = []
    for m in modules:
        if isinstance(m, types.ModuleType):
            names.append(m.__name__)
        elif isinstance(m, str):
            names.append(m)
        else:
            raise TypeError(f"require() takes module names or modules, got {m!r}")

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            g = getattr(f, "__globals__", None)
            for name in names:
                try:
                    importlib.import_module(name)
                except ImportError as exc:
                    raise UnmetDependencyError(
                        "UnmetDependencyError",
                        f"@require: cannot import {name!r} on the engine: {exc}") from exc
                if g is not None:
                    top = name.partition(".")[0]
                    g.setdefault(top, importlib.import_module(top))
            return f(*args, **kwargs)

        wrapper.__sshpar_require__ = tuple(names)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def depend(predicate: Callable[..., bool], *args: Any, **kwargs: Any
           ) -> Callable[[Callable], Callable]:
    """Run the decorated function only where ``predicate(*args, **kwargs)`` is true on the
    engine; elsewhere the call fails with UnmetDependencyError."""

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*a: Any, **kw: Any) -> Any:
            if not predicate(*args, **kwargs):
                raise UnmetDependencyError(
                    "UnmetDependencyError",
                    f"@depend: {getattr(predicate, '__name__', predicate)!s} is false "
                    "on this engine")
            return f(*a, **kw)

        return wrapper

    return decorate
