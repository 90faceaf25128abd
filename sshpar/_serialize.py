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
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
from cloudpickle.cloudpickle import _code_reduce, _extract_code_globals

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


def dumps(obj: Any, *, what: str = "object", code_files: set[str] | None = None,
          out_of_band: bool = True) -> list:
    """Pickle ``obj`` into segments: the pickle stream, then each out-of-band buffer.

    Args:
        code_files: if given, receives the file names of functions pickled by value.
        out_of_band: False: one segment, buffers (arrays) inside the pickle stream.

    Raises:
        SerializationError: ``obj`` (named by ``what`` in the message) cannot be pickled.
    """
    if type(obj) in _PLAIN or (type(obj) is tuple and _all_plain(obj)):
        return [pickle.dumps(obj, protocol=PROTOCOL)]  # what cloudpickle writes, sooner
    buffers: list[pickle.PickleBuffer] = []
    callback = buffers.append if out_of_band else None
    try:
        if code_files is None:
            data = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=callback)
        else:
            out = io.BytesIO()
            _Pickler(out, callback, code_files).dump(obj)
            data = out.getvalue()
    except Exception as exc:
        raise SerializationError(
            f"cannot pickle {what}: {type(exc).__name__}: {exc}") from exc
    return [data, *(b.raw() for b in buffers)]


#: Types that plain pickle writes exactly as cloudpickle does, with nothing out of band.
_PLAIN = frozenset({type(None), bool, int, float, complex, str})


def _all_plain(items: tuple) -> bool:
    """Whether a small tuple holds only _PLAIN values, or (args, kwargs) pairs of them."""
    if len(items) > 16:
        return False
    for item in items:
        kind = type(item)
        if kind in _PLAIN:
            continue
        if kind is tuple and _all_plain(item):
            continue
        if kind is dict and len(item) <= 16 and all(
                type(k) is str and type(v) in _PLAIN for k, v in item.items()):
            continue
        return False
    return True


def dumps_call(f: Callable, args: tuple, kwargs: dict, *, what: str,
               code_files: set[str]) -> list:
    """A call as segments: the function, then ``(args, kwargs)`` and its out-of-band buffers.
    The engine unpickles the first with pickle (keeping it: ``Executor.function``) and the
    rest with :func:`loads`.

    Raises SerializationError naming the function (``what``) or ``(args, kwargs)``.
    """
    fdata = _FUNCTIONS.dumps(f, what, code_files)
    if not args and not kwargs:
        return [fdata, _NO_ARGUMENTS]
    return [fdata, *dumps((args, kwargs), what="the arguments", code_files=code_files)]


class _FunctionPickles:
    """cloudpickle's output for functions, reused while nothing the function captures can
    have changed.

    cloudpickle sends a function defined in ``__main__`` by value, with the globals, closure
    cells and defaults it uses; pickling it is most of the client's cost of a small task. A
    pickle is reused only for the same function object whose captures are the same objects
    (by identity) and all immutable (numbers, strings, bytes, None, modules, builtins,
    tuples of those, or functions that qualify in turn). A function that captures a list, a
    dict, an array or a class from ``__main__`` is pickled afresh each call, as before.
    """

    LIMIT = 512
    _LEAVES = (int, float, complex, str, bytes, bool, type(None), type(...), range,
               types.ModuleType, types.BuiltinFunctionType)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, tuple, bytes, frozenset[str]]] = {}
        self._names: dict[int, tuple[types.CodeType, Any]] = {}  # globals each code uses

    def dumps(self, f: Callable, what: str, code_files: set[str]) -> bytes:
        captured = self._captures(f, 0)
        entry = self._entries.get(id(f))
        # Captures are immutable values (see _immutable): equal ones pickle the same.
        if (entry is not None and captured is not None and entry[0]() is f
                and entry[1] == captured):
            code_files.update(entry[3])
            return entry[2]
        files: set[str] = set()
        # One segment: an array the function captures (a global, a closure cell) travels
        # inside it, as the engine unpickles the function on its own.
        (data,) = dumps(f, what=what, code_files=files, out_of_band=False)
        code_files.update(files)
        if captured is not None:
            if len(self._entries) >= self.LIMIT:
                self._entries.clear()
            try:
                self._entries[id(f)] = (weakref.ref(f), captured, data, frozenset(files))
            except TypeError:  # not weak-referenceable: not cached
                pass
        return data

    def _captures(self, f: Any, depth: int) -> tuple | None:
        """Everything cloudpickle would capture of ``f``, or None if any of it is mutable."""
        if not isinstance(f, types.FunctionType) or depth > 3 or f.__dict__:
            return None
        code = f.__code__
        known = self._names.get(id(code))
        if known is not None and known[0] is code:
            names = known[1]
        else:
            try:
                names = _extract_code_globals(code)
            except Exception:  # noqa: BLE001 - cloudpickle internals moved: do not cache
                return None
            if len(self._names) >= self.LIMIT:
                self._names.clear()
            self._names[id(code)] = (code, names)  # the code is held: its id stays its own
        g = f.__globals__
        out: list[Any] = [f.__code__, f.__name__, f.__qualname__, f.__module__, f.__doc__]
        values: list[Any] = [g.get(name, _MISSING) for name in names]
        for cell in f.__closure__ or ():
            try:
                values.append(cell.cell_contents)
            except ValueError:  # an empty cell
                values.append(_MISSING)
        values.extend(f.__defaults__ or ())
        values.extend((f.__kwdefaults__ or {}).items())
        for value in values:
            if not self._immutable(value, out, depth):
                return None
        return tuple(out)

    def _immutable(self, value: Any, out: list, depth: int) -> bool:
        out.append(value)
        if value is _MISSING or isinstance(value, self._LEAVES):
            return True
        if type(value) in (tuple, frozenset):
            return depth < 3 and all(self._immutable(v, out, depth + 1) for v in value)
        if isinstance(value, types.FunctionType):
            inner = self._captures(value, depth + 1)
            if inner is None:
                return False
            out.extend(inner)
            return True
        return False


_MISSING = object()
_FUNCTIONS = _FunctionPickles()
_NO_ARGUMENTS = pickle.dumps(((), {}), protocol=PROTOCOL)


def loads(segments: Sequence[Any]) -> Any:
    """Rebuild an object from the segments :func:`dumps` produced."""
    # Buffers must be writable, or numpy arrays rebuilt on them come out read-only.
    buffers = [bytearray(b) if isinstance(b, bytes) else b for b in segments[1:]]
    return pickle.loads(segments[0], buffers=buffers)


def describe_type(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
