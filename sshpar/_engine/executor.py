"""Runs one task in the engine's namespace: unpickle, rebind, call, capture, report.

Layer: engine. Shipped to engines; imports only the standard library, cloudpickle and the
shipped sshpar modules (errors, _serialize, _markers).
"""

from __future__ import annotations

import builtins
import io
import linecache
import os
import pickle
import sys
import threading
import time
import traceback
import types
from typing import Any

from .. import _serialize
from .._markers import may_hold_references, resolve_references

#: Per task and stream, how much output is kept for the result (the live stream is bounded by
#: the same figure); beyond it the text is cut and marked.
OUTPUT_LIMIT = 8 << 20
_TRUNCATED = "\n[sshpar: output truncated at {} bytes]\n"

#: The engine's own directory, as its code objects name it (bytecode in the bundle names
#: files by their path in the bundle, not where the bundle lies).
_HERE = os.path.dirname((lambda: None).__code__.co_filename)


class TaskTimeout(Exception):
    """Raised inside a task that ran past its time limit."""


class Namespace(dict):
    """The engine's user namespace (a real dict: functions use it as their globals)."""


class TaskOutput:
    """What a task wrote to one stream (made at its first write): kept for the result; the
    daemon streams what is new (:meth:`take`) while the task runs."""

    __slots__ = ("name", "parts", "size", "truncated", "_lock")

    def __init__(self, name: str) -> None:
        self.name = name
        self.parts: list[str] = []
        self.size = 0
        self.truncated = False
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            if self.truncated:
                return len(s)
            room = OUTPUT_LIMIT - self.size
            if len(s) > room:
                self.parts.append(s[:room] + _TRUNCATED.format(OUTPUT_LIMIT))
                self.truncated = True
            else:
                self.parts.append(s)
            self.size += len(s)
        return len(s)

    def take(self, start: int) -> tuple[str, int]:
        """Text written since part ``start``, and the index to start from next time."""
        with self._lock:
            end = len(self.parts)
            return "".join(self.parts[start:end]), end

    def getvalue(self) -> str:
        if not self.parts:
            return ""
        with self._lock:
            return "".join(self.parts)


class _Route(io.TextIOBase):
    """sys.stdout or sys.stderr while tasks run: a write goes to the output of the task
    running at that moment (so a thread a task left behind writes into a later task's, as
    in ipyparallel); between tasks, to the engine's own stream."""

    def __init__(self, executor: Executor, name: str) -> None:
        self._executor = executor
        self.name = name

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        task = self._executor.current
        if task is None:
            own = getattr(sys, f"__{self.name}__", None)
            return own.write(s) if own is not None else len(s)
        return task.output(self.name).write(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


_MADE = threading.Lock()  # a task's output streams are made once


class Task:
    """One unit of work and, once run, its outcome (plain data plus payload segments)."""

    __slots__ = ("msg_id", "meta", "payload", "owner", "stdout", "stderr", "sent",
                 "started", "completed", "status", "error", "result", "result_type",
                 "aborted", "queued_at", "fn_digest")

    def __init__(self, msg_id: str, meta: dict, payload: list, owner: Any,
                 fn_digest: bytes | None = None) -> None:
        self.msg_id = msg_id
        self.meta = meta
        self.payload = payload
        self.fn_digest = fn_digest  # of the function's pickle (payload[0]), when known
        self.owner = owner
        self.stdout: TaskOutput | None = None  # made at the first write: see output()
        self.stderr: TaskOutput | None = None
        self.sent = {"stdout": 0, "stderr": 0}
        self.started = self.completed = 0.0
        self.status = "pending"
        self.error: dict | None = None
        self.result: list = []
        self.result_type = ""
        self.aborted = False
        self.queued_at = 0.0

    def output(self, name: str) -> TaskOutput:
        out = self.stdout if name == "stdout" else self.stderr
        if out is None:
            with _MADE:
                out = self.stdout if name == "stdout" else self.stderr
                if out is None:
                    out = TaskOutput(name)
                    setattr(self, name, out)
        return out

    def result_meta(self) -> dict:
        return {
            "msg_id": self.msg_id,
            "status": self.status,
            "queued_at": self.queued_at,
            "started": self.started,
            "completed": self.completed,
            "stdout": self.stdout.getvalue() if self.stdout is not None else "",
            "stderr": self.stderr.getvalue() if self.stderr is not None else "",
            "error": self.error,
            "result_type": self.result_type,
        }


class Executor:
    """Owns the namespace and runs tasks in the calling (main) thread, one at a time."""

    def __init__(self) -> None:
        self.namespace = Namespace(__name__="__main__", __builtins__=__builtins__)
        # names a shipped function brought with it (not set by engine code): refreshed when a
        # newer function brings them again; anything the engine set itself is left alone.
        self._brought: dict[str, Any] = {}
        self._kept: dict[bytes, _Kept] = {}  # see function()
        self._counter = 0
        self.current: Task | None = None
        self.in_user_code = False          # the SIGINT handler raises only while this holds
        self.timeout_hit: str | None = None
        self._routes = (_Route(self, "stdout"), _Route(self, "stderr"))

    def run(self, task: Task) -> None:
        self.current = task
        task.started = time.time()
        for filename, text in (task.meta.get("sources") or {}).items():
            linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self._routes
        try:
            f = self.function(task.payload[0], task.fn_digest)
            args, kwargs = _serialize.loads(task.payload[1:])
            if (args or kwargs) and may_hold_references(task.payload[1]):
                args = resolve_references(args, self.namespace)
                kwargs = resolve_references(kwargs, self.namespace)
            self.in_user_code = True
            try:
                value = f(*args, **kwargs)
            finally:
                self.in_user_code = False
        except BaseException as exc:  # noqa: BLE001 - every failure is the task's result
            task.status = "error"
            task.error = error_record(exc)
            if isinstance(exc, TaskTimeout):
                task.error["timeout"] = task.meta.get("timeout")
        else:
            task.status = "ok"
            try:
                task.result = _serialize.dumps(value, what="the result")
                task.result_type = _serialize.describe_type(value)
            except Exception as exc:
                task.status = "error"
                task.error = error_record(exc)
        finally:
            sys.stdout, sys.stderr = saved
            task.payload = []
            task.completed = time.time()
            self.current = None

    # -- functions ------------------------------------------------------------------------
    def function(self, data: Any, digest: bytes | None) -> Any:
        """The function pickled in ``data``, ready to call in the engine's namespace.

        A client sends the same pickle again for each call of the same function (by digest,
        see ``fn`` in _wire.py); unpickling it was most of an engine's work for a small
        call. A function is kept unpickled (by that digest) only if unpickling it again
        could give nothing different: no closure, no attributes or keyword-only defaults,
        and defaults and globals that are immutable data or objects imported by name. It is
        reused while nothing about it has changed since (its code, defaults, attributes,
        the globals it carries), and the globals it brought are set again as if it had been
        unpickled anew (see :meth:`rebind`).
        """
        kept = self._kept.get(digest) if digest is not None else None
        if kept is not None and kept.intact():
            self._bring(kept.brought)
            return kept.f
        loaded = pickle.loads(data)
        f = self.rebind(loaded)
        if digest is not None:
            kept = _Kept.of(loaded, f, self.namespace)
            if kept is None:
                self._kept.pop(digest, None)
            else:
                if len(self._kept) >= UNPICKLED_KEPT:
                    self._kept.clear()
                self._kept[digest] = kept
        return f

    # -- namespace semantics --------------------------------------------------------------
    def rebind(self, f: Any) -> Any:
        """Give functions defined in the client's ``__main__`` the engine namespace as globals.

        cloudpickle sends such functions by value with the globals they use; here they run in
        the engine's namespace instead (so ``global a`` means the engine's ``a``). Names the
        engine lacks are filled from what the function brought.
        """
        return self._rebind(f, {})

    def _rebind(self, obj: Any, seen: dict[int, Any]) -> Any:
        if id(obj) in seen:
            return seen[id(obj)]
        if isinstance(obj, types.FunctionType):
            if obj.__module__ == "__main__" and obj.__globals__ is not self.namespace:
                return self._rebind_function(obj, seen)
            seen[id(obj)] = obj
            self._rebind_cells(obj, seen)
        return obj

    def _rebind_cells(self, f: types.FunctionType, seen: dict[int, Any]) -> None:
        for cell in f.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            new = self._rebind(value, seen)
            if new is not value:
                cell.cell_contents = new

    def _rebind_function(self, f: types.FunctionType, seen: dict[int, Any]) -> Any:
        ns = self.namespace
        new = types.FunctionType(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
        seen[id(f)] = new
        new.__kwdefaults__ = f.__kwdefaults__
        new.__qualname__ = f.__qualname__
        new.__doc__ = f.__doc__
        new.__dict__.update(f.__dict__)
        new.__annotations__ = f.__annotations__
        brought = f.__globals__
        self._bring([(name, self._rebind(brought[name], seen))
                     for name in _global_names(f.__code__) if name in brought])
        self._rebind_cells(new, seen)
        return new

    def _bring(self, pairs: list[tuple[str, Any]]) -> None:
        """Set the names a function brought where the engine lacks them, or still holds what
        an earlier function brought."""
        ns, brought = self.namespace, self._brought
        for name, value in pairs:
            current = ns.get(name, _MISSING)
            if current is _MISSING or brought.get(name, _MISSING) is current:
                ns[name] = value
                brought[name] = value

    def compile_source(self, source: str, filename: str | None = None) -> types.CodeType:
        """Compile code for execute()/run(), registering its text so tracebacks show it."""
        if filename is None:
            self._counter += 1
            filename = f"<execute-{self._counter}>"
        lines = source.splitlines(keepends=True)
        linecache.cache[filename] = (len(source), None, lines, filename)
        return compile(source, filename, "exec")


_MISSING = object()
#: At most this many functions are kept unpickled (see Executor.function).
UNPICKLED_KEPT = 512
_DATA = frozenset({int, float, complex, str, bytes, bool, type(None), type(...)})


class _Kept:
    """A function kept unpickled, and what must hold for it to be reused."""

    __slots__ = ("f", "code", "defaults", "brought", "globals", "snapshot")

    def __init__(self, f: types.FunctionType, brought: list[tuple[str, Any]],
                 snapshot: list[tuple[str, Any]]) -> None:
        self.f = f
        self.code = f.__code__
        self.defaults = f.__defaults__
        self.brought = brought    # set in the namespace at each call, as rebind() does
        self.globals = f.__globals__
        self.snapshot = snapshot  # a function not rebound keeps its own globals: unchanged?

    @classmethod
    def of(cls, loaded: Any, f: Any, namespace: dict) -> _Kept | None:
        """The entry for ``f`` (``loaded`` rebound), or None if it cannot be kept."""
        if (type(f) is not types.FunctionType or f.__closure__ is not None or f.__dict__
                or f.__kwdefaults__ is not None
                or not all(_fixed(v) for v in f.__defaults__ or ())):
            return None
        carried = loaded.__globals__
        if f.__globals__ is namespace:  # rebound: it brought what its code names
            brought = [(n, carried[n]) for n in _global_names(f.__code__) if n in carried]
            snapshot = []
        else:  # its own globals, as cloudpickle made them
            brought, snapshot = [], list(carried.items())
        if not all(_fixed(v) for _, v in brought + snapshot):
            return None
        return cls(f, brought, snapshot)

    def intact(self) -> bool:
        f = self.f
        if (f.__code__ is not self.code or f.__defaults__ is not self.defaults or f.__dict__
                or f.__kwdefaults__ is not None):
            return False
        g, snapshot = self.globals, self.snapshot
        if snapshot and len(g) != len(snapshot):
            return False
        for k, v in snapshot:
            if g.get(k, _MISSING) is not v:
                return False
        return True


def _fixed(value: Any, depth: int = 0) -> bool:
    """Whether unpickling ``value`` again gives the same: equal immutable data, or the very
    object that its module's name leads to (modules, classes, functions imported by name)."""
    kind = type(value)
    if kind in _DATA or value is builtins.__dict__:
        return True
    if kind is tuple or kind is frozenset:
        return depth < 3 and all(_fixed(v, depth + 1) for v in value)
    if kind is types.ModuleType:
        return sys.modules.get(value.__name__) is value
    if not isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return False
    obj: Any = sys.modules.get(getattr(value, "__module__", None) or "")
    for part in str(getattr(value, "__qualname__", "")).split("."):
        obj = getattr(obj, part, None)
    return obj is value


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


# -- errors -----------------------------------------------------------------------------------
_CONTEXT = 3
_MAX_FRAMES = 100


def _user_tb(tb: types.TracebackType | None) -> types.TracebackType | None:
    # Drop the engine's own leading frames (this module): the user sees their code first.
    while tb is not None and os.path.dirname(tb.tb_frame.f_code.co_filename) == _HERE:
        tb = tb.tb_next
    return tb


def _frames(tb: types.TracebackType | None) -> list[dict]:
    frames = []
    for fs in traceback.extract_tb(tb, limit=_MAX_FRAMES):
        lineno = fs.lineno or 0
        start = max(1, lineno - _CONTEXT)
        lines = [linecache.getline(fs.filename, n) for n in range(start, lineno + _CONTEXT + 1)]
        while lines and not lines[-1]:
            lines.pop()
        frames.append({
            "filename": fs.filename,
            "lineno": lineno,
            "name": fs.name,
            "line": fs.line or "",
            "start": start,
            "lines": [ln.rstrip("\n") for ln in lines],
        })
    return frames


def _one(exc: BaseException, tb: types.TracebackType | None) -> dict:
    cls = type(exc)
    try:
        evalue = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
        evalue = f"<unprintable {cls.__name__}>"
    return {
        "ename": cls.__name__,
        "etype": f"{cls.__module__}.{cls.__qualname__}",
        "evalue": evalue,
        "frames": _frames(tb),
        "text": "".join(traceback.format_exception(cls, exc, tb, chain=False)),
    }


def error_record(exc: BaseException) -> dict:
    """Describe an exception in plain data: the error, its frames, and its cause chain."""
    tb = _user_tb(exc.__traceback__)
    record = _one(exc, tb)
    chain: list[dict] = []
    seen = {id(exc)}
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        nxt = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        link = _one(nxt, _user_tb(nxt.__traceback__))
        link["explicit"] = cur.__cause__ is nxt
        chain.append(link)
        cur = nxt
    record["chain"] = chain
    try:
        full = traceback.TracebackException(type(exc), exc, tb)
        record["traceback"] = "".join(full.format())
    except Exception:  # noqa: BLE001
        record["traceback"] = record["text"]
    return record
