"""The transport seam: what sshpar needs from a way of reaching a host.

Layer: transport. Imports config and errors; SSH libraries appear only in the backends.

A transport connects once per host and then runs commands (with stdin), and opens byte
streams either to a Unix socket on the host or to a command's stdio. Backends: ``asyncssh``
(default), ``local`` (subprocesses on this machine, no SSH); ``paramiko`` fits the same seam.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..config import HostSpec
from ..errors import (
    AuthenticationError,
    ConnectTimeoutError,
    HostKeyError,
    HostUnreachableError,
)

# Chosen, not defaulted: curve25519 first (OpenSSH's post-quantum default costs ~0.1 s per
# connect, measured), AES-GCM first (fastest bulk with AES-NI), no compression (arrays are
# mostly incompressible and compression costs latency).
KEX_ALGS = ["curve25519-sha256", "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256",
            "diffie-hellman-group14-sha256"]
ENCRYPTION_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                   "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"]


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """What a remote command did: exit status (None if killed by a signal) and its output."""

    exit_status: int | None
    stdout: bytes
    stderr: bytes

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


class StreamReader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...
    async def read(self, n: int = -1) -> bytes: ...


class StreamWriter(Protocol):
    def write(self, data: Any) -> None: ...
    def writelines(self, data: Any) -> None: ...
    async def drain(self) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...


class PushReader(asyncio.StreamReader):
    """A StreamReader that, once diverted, hands each chunk to a callback as it arrives.

    The handshake reads it as a stream; afterwards :meth:`divert` sends bytes straight from
    the protocol's ``data_received`` to the frame parser, saving a loop iteration (a task
    wake-up) per read. Backends whose streams are built on it say so by returning one.
    """

    _sink: Callable[[bytes], None] | None = None
    _on_end: Callable[[BaseException | None], None] | None = None

    def divert(self, sink: Callable[[bytes], None],
               on_end: Callable[[BaseException | None], None]) -> None:
        """From now on: ``sink(data)`` per chunk, then ``on_end(exc or None)`` once."""
        leftover = bytes(self._buffer)  # type: ignore[attr-defined]
        self._buffer.clear()  # type: ignore[attr-defined]
        self._maybe_resume_transport()  # type: ignore[attr-defined]
        self._sink, self._on_end = sink, on_end
        if leftover:
            sink(leftover)
        if self.exception() is not None:
            self._end(self.exception())
        elif self.at_eof():
            self._end(None)

    def _end(self, exc: BaseException | None) -> None:
        on_end, self._on_end, self._sink = self._on_end, None, None
        if on_end is not None:
            on_end(exc)

    def feed_data(self, data: Any) -> None:
        if self._sink is not None:
            self._sink(data)
        else:
            super().feed_data(data)

    def feed_eof(self) -> None:
        super().feed_eof()
        self._end(None)

    def set_exception(self, exc: Exception) -> None:
        super().set_exception(exc)
        self._end(exc)


class ForwardingRefused(Exception):
    """The host will not forward to Unix sockets; fall back to a relay command."""


class Transport(abc.ABC):
    """One connection to one host."""

    #: Whether streams to Unix sockets are possible at all (else relay over exec).
    supports_unix_streams = True
    #: Whether the host is this machine (the local transport).
    on_this_machine = False

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec

    @property
    def label(self) -> str:
        return self.spec.label

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and authenticate. Raises a HostError subclass naming the host."""

    @abc.abstractmethod
    async def run(self, command: str, *, input: bytes = b"", timeout: float) -> CommandResult:
        """Run a shell command on the host, feeding it ``input``; wait at most ``timeout``."""

    @abc.abstractmethod
    async def open_unix(self, path: str) -> tuple[StreamReader, StreamWriter]:
        """A byte stream to the Unix socket ``path`` on the host (raise ForwardingRefused)."""

    def local_path(self, path: str, siblings: Sequence[str] = ()) -> str | None:
        """A path on this machine that reaches the host's Unix socket ``path`` as a plain
        socket (for direct lanes, see _lane.py), or None (not here, or not yet: a backend
        may start providing one for ``path`` and its ``siblings`` on the first ask)."""
        return None

    def note_forwarding_refused(self) -> None:  # noqa: B027 - optional for backends
        """The relay worked where a Unix stream was refused: forwarding is off on this host,
        so later streams may go to the relay at once."""

    @abc.abstractmethod
    async def open_exec(self, command: str) -> tuple[StreamReader, StreamWriter]:
        """A byte stream to the stdin/stdout of ``command`` run on the host."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection. Idempotent."""

    @property
    @abc.abstractmethod
    def is_connected(self) -> bool:
        """Whether the connection is up."""


def make_transport(spec: HostSpec) -> Transport:
    if spec.transport == "local":
        from .local import LocalTransport

        return LocalTransport(spec)
    if spec.backend == "paramiko":
        from .paramiko_backend import ParamikoTransport

        return ParamikoTransport(spec)
    from .asyncssh_backend import AsyncsshTransport

    return AsyncsshTransport(spec)


# -- errors every SSH backend reports the same way (what failed, and the fix) ----------------

def _where(spec: HostSpec, via: str) -> str:
    return spec.label + (f" (via {via})" if via else "")


def ssh_command(spec: HostSpec) -> str:
    """The ``ssh`` command line that reaches ``spec``'s host, for hints."""
    port = f"-p {spec.port} " if spec.port is not None else ""
    user = f"{spec.user}@" if spec.user is not None else ""
    return f"ssh {port}{user}{spec.host}"


def host_key_unknown(spec: HostSpec, detail: str, via: str = "") -> HostKeyError:
    known = spec.known_hosts if spec.known_hosts not in (None, "none") else "~/.ssh/known_hosts"
    return HostKeyError(
        _where(spec, via), f"host key not verifiable: {detail}",
        hint=f"if the host is genuine, run `{ssh_command(spec)}` once to record its key in "
             f"{known} (or `ssh-keyscan`); a changed key may mean an attack")


def auth_failed(spec: HostSpec, detail: str, via: str = "") -> AuthenticationError:
    return AuthenticationError(
        _where(spec, via), f"authentication failed: {detail}",
        hint="check `user:` and `identity_file:` for this host, or that your key is in the "
             "remote ~/.ssh/authorized_keys (`ssh-copy-id`)")


def connect_timed_out(spec: HostSpec, via: str = "") -> ConnectTimeoutError:
    return ConnectTimeoutError(
        _where(spec, via), f"no SSH connection within {spec.connect_timeout:g} s",
        hint="is the host up and the port right? raise `connect_timeout:` for slow links")


def cannot_resolve(spec: HostSpec, detail: str, via: str = "") -> HostUnreachableError:
    return HostUnreachableError(_where(spec, via), f"cannot resolve host name: {detail}",
                                hint="check the name, or its HostName in ~/.ssh/config")


def cannot_connect(spec: HostSpec, detail: str, via: str = "") -> HostUnreachableError:
    return HostUnreachableError(_where(spec, via), f"cannot connect: {detail}",
                                hint="is sshd running there, and `port:` right?")
