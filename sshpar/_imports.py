"""``view.sync_imports()``: imports made in a ``with`` block are replayed on the engines.

Layer: API helpers. Imports the standard library only.

The block's namespace is compared before and after to learn what names the imports bound
(so ``import a as b`` and ``from x import y as z`` replay exactly); an ``__import__`` hook
sees ``from`` imports and, with ``local=False``, hands out placeholders instead of importing.
"""

from __future__ import annotations

import builtins
import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .view import DirectView


class RemoteOnly:
    """What a name is bound to locally under ``sync_imports(local=False)``.

    It cannot be used here, but pickles as "import it there": a function that refers to it
    finds the real module (or attribute) on the engine.
    """

    def __init__(self, name: str, attr: str | None = None) -> None:
        self.__name__ = name
        self.__sshpar_attr__ = attr

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return RemoteOnly(self.__name__, attr)

    def __reduce__(self) -> Any:
        if self.__sshpar_attr__:
            return (getattr, (RemoteOnly(self.__name__), self.__sshpar_attr__))
        return (importlib.import_module, (self.__name__,))

    def __repr__(self) -> str:
        what = self.__name__ + (f".{self.__sshpar_attr__}" if self.__sshpar_attr__ else "")
        return f"<{what}: imported on the engines only (sync_imports(local=False))>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self!r} cannot be used locally")


class SyncImports:
    def __init__(self, view: DirectView, *, local: bool, quiet: bool) -> None:
        self.view = view
        self.local = local
        self.quiet = quiet
        self._from: list[tuple[str, tuple[str, ...]]] = []
        self._dotted: list[str] = []

    def __enter__(self) -> SyncImports:
        frame = sys._getframe(1)
        self._frame = frame
        self._before = dict(self._namespace())
        self._saved_import = builtins.__import__
        saved = self._saved_import

        def hook(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (),
                 level: int = 0) -> Any:
            if sys._getframe(1) is not frame:
                return saved(name, globals, locals, fromlist, level)
            if level:
                raise ImportError(f"sync_imports: relative import of {name!r} cannot be "
                                  "replayed on the engines")
            if fromlist:
                self._from.append((name, tuple(fromlist)))
            elif "." in name:
                self._dotted.append(name)
            if self.local:
                return saved(name, globals, locals, fromlist, level)
            if fromlist:
                return RemoteOnly(name)
            return RemoteOnly(name.partition(".")[0])

        builtins.__import__ = hook
        return self

    def _namespace(self) -> dict:
        frame = self._frame
        return frame.f_locals if frame.f_code.co_flags & 0x01 else frame.f_globals

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        builtins.__import__ = self._saved_import
        if exc_type is not None:
            return
        after = self._namespace()
        lines = []
        for name, value in after.items():
            if name in self._before and self._before[name] is value:
                continue
            stmt = self._statement(name, value)
            if stmt:
                lines.append(stmt)
        if not lines:
            return
        if not self.quiet:
            for stmt in lines:
                print(f"importing {_describe(stmt)} on engine(s)")
        self.view.execute("\n".join(lines), block=True)

    def _statement(self, name: str, value: Any) -> str | None:
        if isinstance(value, RemoteOnly):
            if value.__sshpar_attr__:
                return _from(value.__name__, value.__sshpar_attr__, name)
            dotted = [d for d in self._dotted if d.partition(".")[0] == name]
            if dotted:
                return "\n".join(f"import {d}" for d in dotted)
            return _import(value.__name__, name)
        if isinstance(value, types.ModuleType):
            for module, fromlist in self._from:
                if name in fromlist or any(getattr(sys.modules.get(module), a, None) is value
                                           for a in fromlist):
                    attr = name if name in fromlist else next(
                        a for a in fromlist if getattr(sys.modules.get(module), a, None)
                        is value)
                    return _from(module, attr, name)
            dotted = [d for d in self._dotted if d.partition(".")[0] == name]
            if dotted and value.__name__ == name:
                return "\n".join(f"import {d}" for d in dotted)
            return _import(value.__name__, name)
        for module, fromlist in self._from:
            mod = sys.modules.get(module)
            for attr in fromlist:
                if mod is not None and getattr(mod, attr, None) is value:
                    return _from(module, attr, name)
        return None


def _import(module: str, name: str) -> str:
    return f"import {module}" if module == name else f"import {module} as {name}"


def _from(module: str, attr: str, name: str) -> str:
    return f"from {module} import {attr}" if attr == name else \
        f"from {module} import {attr} as {name}"


def _describe(stmt: str) -> str:
    """'import a as b' -> 'a as b'; 'from x import y' -> 'y from x' (one line each)."""
    words = stmt.split("\n")[0].split()
    if words[0] == "from":
        rest = " ".join(words[3:])
        return f"{rest} from {words[1]}"
    return " ".join(words[1:])
