"""Every exception sshpar raises, in one place.

Layer: bottom. Shipped to engines, so it imports only the standard library.

The tree::

    SshparError
    ├── ConfigError                  a hosts file is wrong (file, line, key)
    ├── HostError                    something about one host (host, detail)
    │   ├── HostUnreachableError     no TCP/SSH connection could be made
    │   ├── AuthenticationError      the server refused every key
    │   ├── HostKeyError             host key unknown or changed
    │   ├── ConnectTimeoutError      (also a builtin TimeoutError)
    │   └── BootstrapError           engines could not be started (exit status, stderr)
    │       └── PythonVersionError   remote Python's minor version differs from ours
    ├── StartError                   one or more hosts failed to start (errors: host -> error)
    ├── ProtocolError                a frame was malformed, forged, replayed or too large
    ├── SerializationError           an argument or result could not be pickled (also TypeError)
    ├── NoEnginesError               a view or client has no engines to send to
    ├── TimeoutError                 a wait ran out (also a builtin TimeoutError)
    ├── EngineError                  an engine died or was lost while a task was pending
    ├── TaskAborted                  a queued task was aborted before it ran
    └── RemoteError                  the task raised on the engine (ename, evalue, traceback)
        ├── CompositeError           several engines raised (elist holds each RemoteError)
        └── UnmetDependencyError     @require could not import a module on the engine

Every class pickles (``__reduce__``) so errors can cross processes intact.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AuthenticationError",
    "BootstrapError",
    "CompositeError",
    "ConfigError",
    "ConnectTimeoutError",
    "EngineError",
    "EngineInfo",
    "HostError",
    "HostKeyError",
    "HostUnreachableError",
    "NoEnginesError",
    "ProtocolError",
    "PythonVersionError",
    "RemoteError",
    "SerializationError",
    "SshparError",
    "StartError",
    "TaskAborted",
    "TimeoutError",
    "UnmetDependencyError",
]


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """Where a task ran: the engine's id in its cluster, its host, pid and uuid."""

    engine_id: int
    host: str
    pid: int
    uuid: str

    def __str__(self) -> str:
        return f"engine {self.engine_id} on {self.host} (pid {self.pid})"


class SshparError(Exception):
    """Root of every sshpar exception."""

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ConfigError(SshparError, ValueError):
    """A hosts file (or cluster file) is wrong. Names the file, the line and the key."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.message = message
        where = file or "<hosts>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")


class HostError(SshparError):
    """Something went wrong with one host; ``host`` names it, ``hint`` says what to do."""

    def __init__(self, host: str, detail: str, *, hint: str | None = None) -> None:
        self.host = host
        self.detail = detail
        self.hint = hint
        text = f"{host}: {detail}"
        if hint:
            text = f"{text} — {hint}"
        super().__init__(text)


class HostUnreachableError(HostError):
    """No connection could be made to the host (refused, no route, DNS, sshd gone)."""


class AuthenticationError(HostError):
    """The host refused our credentials."""


class HostKeyError(HostError):
    """The host's key is not in known_hosts, or does not match what is there."""


class ConnectTimeoutError(HostError, builtins.TimeoutError):
    """Connecting to the host took longer than its ``connect_timeout``."""


class BootstrapError(HostError):
    """Engines could not be started on a host. Carries the remote exit status and stderr."""

    def __init__(self, host: str, detail: str, *, hint: str | None = None,
                 exit_status: int | None = None, stderr: str = "") -> None:
        self.exit_status = exit_status
        self.stderr = stderr
        if stderr.strip():
            detail = f"{detail}\n--- remote stderr ---\n{stderr.rstrip()}"
        super().__init__(host, detail, hint=hint)


class PythonVersionError(BootstrapError):
    """The remote interpreter's major.minor differs from the client's."""


class StartError(SshparError):
    """Some hosts could not be started; ``errors`` maps each host to its own exception."""

    def __init__(self, errors: dict[str, BaseException], started: Sequence[str] = ()) -> None:
        self.errors = dict(errors)
        self.started = list(started)
        lines = [(f"{len(self.errors)} of {len(self.errors) + len(self.started)} host(s) "
                  "failed to start:")]
        lines += [f"  - {err}" for err in self.errors.values()]
        super().__init__("\n".join(lines))


class ProtocolError(SshparError):
    """A frame was truncated, oversized, of an unknown kind, forged or replayed."""


class SerializationError(SshparError, TypeError):
    """An object could not be pickled (or unpickled). Raised at the call, before sending."""


class NoEnginesError(SshparError):
    """There are no engines to send work to."""


class TimeoutError(SshparError, builtins.TimeoutError):
    """A wait ran out before the result was ready. Also a builtin ``TimeoutError``."""


class EngineError(SshparError):
    """An engine died, or its host was lost, while this task was pending."""

    def __init__(self, message: str, *, engine_id: int | None = None, host: str | None = None,
                 reason: str | None = None) -> None:
        self.engine_id = engine_id
        self.host = host
        self.reason = reason
        super().__init__(message)


class TaskAborted(SshparError):
    """The task was aborted before it started."""


class RemoteError(SshparError):
    """The task raised an exception on the engine.

    When the remote exception's class is already loaded on the client (a builtin, or a class
    from a module the client has imported), the error is *also* an instance of that class, so
    ``except ZeroDivisionError:`` catches a remote ``ZeroDivisionError``; it is still a
    RemoteError and carries the remote evidence below (the class only: not the remote
    object's attributes or ``args``). Exceptions outside ``Exception`` (``KeyboardInterrupt``,
    ``SystemExit``), ``StopIteration``/``StopAsyncIteration`` (they would end a loop silently),
    sshpar's own errors and classes that cannot be combined stay plain RemoteErrors.

    ``str(err)`` is plain text for logs; ``rich`` (``console.print(err)``) and IPython show a
    rendered traceback of the remote code.

    Attributes:
        ename: the remote exception's class name, e.g. ``"ZeroDivisionError"``.
        etype: its ``module.qualname``, e.g. ``"builtins.ZeroDivisionError"``.
        evalue: its ``str()``.
        traceback: the remote traceback as plain text, chained exceptions included.
        engine_info: the :class:`EngineInfo` of the engine that ran it (or None).
        frames: structured remote frames (dicts with filename, lineno, name, line, start and
            the engine's source ``lines``) for rendering.
        chain: the exceptions that led to it (``raise ... from ...`` or raised while handling
            another), nearest first, as dicts like the error's own record.
        remote_class: the client's class for ``etype`` when the error is also one, else None.

    Example:
        >>> try:
        ...     rc[0].apply_sync(lambda: 1 / 0)
        ... except ZeroDivisionError as err:
        ...     print(err.engine_info)
        engine 0 on node1 (pid 1234)
    """

    remote_class: type[BaseException] | None = None
    # The C-level constructor of the nearest builtin base (set per dual class): the remote
    # class's own __new__/__init__ never run on the client.
    _native_new = staticmethod(Exception.__new__)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._native_new(cls)

    def __init__(self, ename: str, evalue: str = "", traceback: str = "",
                 engine_info: EngineInfo | None = None, *, etype: str = "",
                 frames: Sequence[dict] = (), chain: Sequence[dict] = ()) -> None:
        self.ename = ename
        self.etype = etype
        self.evalue = evalue
        self.traceback = traceback
        self.engine_info = engine_info
        self.frames = list(frames)
        self.chain = list(chain)
        # Not super().__init__: in a dual class the next __init__ is the remote class's.
        Exception.__init__(self, ename, evalue)

    @classmethod
    def from_record(cls, record: dict, engine_info: EngineInfo | None = None) -> RemoteError:
        """Build the error the client raises from the engine's plain-data description.

        Args:
            record: what the engine's ``error_record()`` produced.
            engine_info: the engine that ran the task.

        Returns:
            A RemoteError; also an instance of the remote class when the client has it loaded.
        """
        ename = record.get("ename") or "Exception"
        etype = record.get("etype") or ""
        err_cls: type[RemoteError] = cls
        if ename == "UnmetDependencyError" or etype == f"{__name__}.UnmetDependencyError":
            err_cls = UnmetDependencyError
        elif cls is RemoteError:
            err_cls = _dual_class(etype) or RemoteError
        return err_cls(ename, record.get("evalue", ""),
                       record.get("traceback") or record.get("text", ""), engine_info,
                       etype=etype, frames=record.get("frames", ()),
                       chain=record.get("chain", ()))

    def headline(self) -> str:
        """One line: ``ZeroDivisionError: division by zero``."""
        return f"{self.ename}: {self.evalue}" if self.evalue else self.ename

    def __str__(self) -> str:
        text = self.traceback.rstrip()
        if not text:
            where = f" [{self.engine_info}]" if self.engine_info is not None else ""
            return f"{self.headline()}{where}"
        where = f" from {self.engine_info}" if self.engine_info is not None else ""
        return f"{self.headline()}\n--- remote traceback{where} ---\n{text}"

    def __repr__(self) -> str:
        name = "RemoteError" if self.remote_class is not None else type(self).__name__
        where = f" from engine {self.engine_info.engine_id}" if self.engine_info else ""
        return f"<{name} {self.ename}({self.evalue!r}){where}>"

    def _render_traceback_(self) -> list[str]:
        """IPython calls this to show the error: the remote traceback, not ours."""
        from ._render import render_lines

        return render_lines(self)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from ._render import error_renderables

        yield from error_renderables(self)

    def __reduce__(self) -> Any:
        # A dual class is not importable by name: it travels as RemoteError plus ``etype``
        # and is made again (if the class is loaded there) when unpickled.
        cls = RemoteError if self.remote_class is not None else type(self)
        return (_rebuild_remote, (cls, self.args, dict(self.__dict__)))


def _rebuild_remote(cls: type[RemoteError], args: tuple, state: dict) -> RemoteError:
    if cls is RemoteError:
        cls = _dual_class(state.get("etype", "")) or RemoteError
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


# -- remote errors that are also their original class ----------------------------------------
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: set on classes defined in Python
_NOT_COMBINED = (StopIteration, StopAsyncIteration)
_dual_classes: dict[type, type[RemoteError] | None] = {}


def _dual_class(etype: str) -> type[RemoteError] | None:
    """The ``(RemoteError, original)`` class for ``etype``, or None when there is none."""
    original = _loaded_class(etype)
    if original is None:
        return None
    if original not in _dual_classes:
        _dual_classes.setdefault(original, _make_dual(original))
    return _dual_classes[original]


def _loaded_class(etype: str) -> type[BaseException] | None:
    # Only what is already in sys.modules, read from __dict__s: never an import or a module
    # __getattr__ (which may import) while an error is being handled.
    parts = etype.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj: Any = sys.modules.get(".".join(parts[:i]))
        for name in parts[i:] if obj is not None else ():
            obj = getattr(obj, "__dict__", {}).get(name)
            if obj is None:
                break
        if isinstance(obj, type) and issubclass(obj, BaseException):
            return obj
    return None


def _make_dual(original: type[BaseException]) -> type[RemoteError] | None:
    if (not issubclass(original, Exception) or issubclass(original, _NOT_COMBINED)
            or issubclass(original, SshparError) or type(original) is not type
            or any("__init_subclass__" in vars(c) for c in original.__mro__[:-1])):
        return None  # not ours to combine, or creating a subclass would run its code
    native = next(c for c in original.__mro__ if not c.__flags__ & _HEAPTYPE)
    name = (original.__qualname__ if original.__module__ == "builtins"
            else f"{original.__module__}.{original.__qualname__}")
    namespace = {
        "__module__": __name__,
        "__qualname__": f"RemoteError[{name}]",
        "__doc__": f"A {name} raised on an engine: a RemoteError that is also a {name}.",
        "remote_class": original,
        "_native_new": staticmethod(native.__new__),
    }
    try:
        dual = type(f"Remote{original.__name__}", (RemoteError, original), namespace)
        str(dual("probe", "probe"))  # lay-outs or constructors that cannot be shared fail here
    except Exception:  # noqa: BLE001 - such a class simply stays a plain RemoteError
        return None
    return dual


class CompositeError(RemoteError):
    """Several engines raised; ``elist`` holds each engine's :class:`RemoteError`.

    ``str()`` and the rich rendering show the first :attr:`shown` errors in full and count
    the rest; ``elist`` always has them all.
    """

    #: How many engine errors ``str()`` and the rich rendering show in full.
    shown = 3

    def __init__(self, message: str, elist: Sequence[RemoteError]) -> None:
        self.elist = list(elist)
        first = self.elist[0] if self.elist else None
        super().__init__(
            first.ename if first else "CompositeError",
            message,
            first.traceback if first else "",
            first.engine_info if first else None,
            etype=first.etype if first else "",
            frames=first.frames if first else (),
            chain=first.chain if first else (),
        )
        self.args = (message,)

    def hidden_summary(self) -> str:
        """``"... and 4 more engine error(s): 3 ZeroDivisionError, 1 ValueError"``, or ``""``."""
        hidden = self.elist[self.shown:]
        if not hidden:
            return ""
        counts = collections.Counter(err.ename for err in hidden)
        kinds = ", ".join(f"{n} {ename}" for ename, n in counts.most_common())
        return f"... and {len(hidden)} more engine error(s): {kinds}"

    def __str__(self) -> str:
        parts = [self.evalue]
        for err in self.elist[: self.shown]:
            where = f"[{err.engine_info}] " if err.engine_info is not None else ""
            parts.append(f"{where}{err.headline()}")
            text = err.traceback.rstrip()
            if text:
                parts.append(textwrap.indent(text, "    "))
        if self.hidden_summary():
            parts.append(self.hidden_summary())
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"<CompositeError of {len(self.elist)} engine error(s)>"

    def raise_exception(self, excid: int = 0) -> None:
        """Raise the ``excid``-th engine's error, as ipyparallel does."""
        raise self.elist[excid]


class UnmetDependencyError(RemoteError):
    """A module named in ``@require`` could not be imported on the engine."""
