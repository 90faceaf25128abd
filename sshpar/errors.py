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
import dataclasses
from typing import Any, Sequence

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


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
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
        lines = [f"{len(self.errors)} of {len(self.errors) + len(self.started)} host(s) "
                 "failed to start:"]
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

    Attributes:
        ename: the remote exception's class name, e.g. ``"ZeroDivisionError"``.
        evalue: its ``str()``.
        traceback: the remote traceback as plain text.
        engine_info: the :class:`EngineInfo` of the engine that ran it (or None).
        frames: structured remote frames (dicts with filename, lineno, name, lines) for rendering.
        chain: earlier exceptions in a ``raise ... from ...`` chain, as dicts.
    """

    def __init__(self, ename: str, evalue: str = "", traceback: str = "",
                 engine_info: EngineInfo | None = None, *,
                 frames: Sequence[dict] = (), chain: Sequence[dict] = ()) -> None:
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.engine_info = engine_info
        self.frames = list(frames)
        self.chain = list(chain)
        super().__init__(ename, evalue)

    @classmethod
    def from_record(cls, record: dict, engine_info: EngineInfo | None = None) -> RemoteError:
        """Build the error the client raises from the engine's plain-data description."""
        err_cls: type[RemoteError] = cls
        if record.get("ename") == "UnmetDependencyError":
            err_cls = UnmetDependencyError
        err = err_cls(record.get("ename", "Exception"), record.get("evalue", ""),
                      record.get("traceback") or record.get("text", ""), engine_info,
                      frames=record.get("frames", ()), chain=record.get("chain", ()))
        err.etype = record.get("etype", "")
        return err

    def __str__(self) -> str:
        head = f"{self.ename}({self.evalue})"
        if self.engine_info is not None:
            head = f"{head} on {self.engine_info}"
        return f"{head}\n{self.traceback}".rstrip()

    def __repr__(self) -> str:
        return f"<RemoteError {self.ename}({self.evalue!r})>"

    def _render_traceback_(self) -> list[str]:
        """IPython calls this to show the error: the remote traceback, not ours."""
        from ._render import render_remote_error_lines

        return render_remote_error_lines(self)

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from ._render import remote_error_renderables

        yield from remote_error_renderables(self)

    def __reduce__(self) -> Any:
        state = dict(self.__dict__)
        return (_rebuild_remote, (type(self).__mro__[0].__name__, _plain_remote_class(self),
                                  self.args, state))


def _plain_remote_class(err: RemoteError) -> type:
    # An error that is also an instance of the remote class (a dynamic subclass) is pickled as
    # its RemoteError base plus the name; the client rebuilds the dual class on arrival.
    for cls in type(err).__mro__:
        if cls.__module__ == __name__ and issubclass(cls, RemoteError):
            return cls
    return RemoteError


def _rebuild_remote(_name: str, cls: type, args: tuple, state: dict) -> RemoteError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class CompositeError(RemoteError):
    """Several engines raised; ``elist`` holds each engine's :class:`RemoteError`."""

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
            frames=first.frames if first else (),
        )
        self.args = (message,)

    def __str__(self) -> str:
        parts = [f"{self.evalue}"]
        for err in self.elist[: self.shown]:
            parts.append(f"[{err.engine_info or '?'}] {RemoteError.__str__(err)}")
        rest = len(self.elist) - self.shown
        if rest > 0:
            parts.append(f"... and {rest} more engine error(s)")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"<CompositeError of {len(self.elist)} engine error(s)>"

    def raise_exception(self, excid: int = 0) -> None:
        """Raise the ``excid``-th engine's error, as ipyparallel does."""
        raise self.elist[excid]


class UnmetDependencyError(RemoteError):
    """A module named in ``@require`` could not be imported on the engine."""
