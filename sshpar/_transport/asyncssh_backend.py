"""The asyncssh transport: one SSH connection per host, streams over direct-streamlocal.

Layer: transport. The only module that imports asyncssh; its exceptions become sshpar's here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import logging
import os
import shlex
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..config import HostSpec
from ..errors import ConnectTimeoutError, HostError, HostUnreachableError
from . import openssh
from .base import (
    ENCRYPTION_ALGS,
    KEX_ALGS,
    CommandResult,
    ForwardingRefused,
    PushReader,
    StreamReader,
    StreamWriter,
    Transport,
    auth_failed,
    cannot_connect,
    cannot_resolve,
    connect_timed_out,
    host_key_unknown,
)

#: Parts of asyncssh that sshpar never uses and that cost a start time when imported:
#: X.509 certificate support (OpenSSH does not speak it, and asyncssh has it only with
#: pyOpenSSL installed, which sshpar does not need; trying loads cryptography's x509 package,
#: ~16 ms). asyncssh treats it as optional and works without it.
_SKIPPED_MODULES = ("asyncssh.crypto.x509",)


@contextlib.contextmanager
def _unused_parts_skipped() -> Iterator[None]:
    """Import asyncssh without what sshpar never uses (~35 ms of every start): the modules
    above, and the search for liboqs (post-quantum key exchanges, which KEX_ALGS never
    offers) that runs ``ldconfig`` and more through ``ctypes.util.find_library``."""
    find = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return None if name in ("oqs", "liboqs") else find(name)

    blocked = [name for name in _SKIPPED_MODULES if name not in sys.modules]
    ctypes.util.find_library = find_library
    # None in sys.modules: importing the name fails, as if it were not installed.
    sys.modules.update(dict.fromkeys(blocked))  # type: ignore[arg-type]
    try:
        yield
    finally:
        ctypes.util.find_library = find
        for name in blocked:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


try:
    with _unused_parts_skipped():
        import asyncssh  # noqa: E402 - after the shim it needs
except ImportError:  # an asyncssh that needs them after all: the whole of it, then
    import asyncssh  # noqa: E402

log = logging.getLogger("sshpar.transport")

KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT_MAX = 4


def connect_options(spec: HostSpec) -> dict[str, Any]:
    """asyncssh options for ``spec``: unset values are left to ~/.ssh/config and defaults."""
    opts: dict[str, Any] = {
        "kex_algs": KEX_ALGS,
        "encryption_algs": ENCRYPTION_ALGS,
        "compression_algs": None,
        "keepalive_interval": KEEPALIVE_INTERVAL,
        "keepalive_count_max": KEEPALIVE_COUNT_MAX,
        "connect_timeout": spec.connect_timeout,
    }
    if spec.port is not None:
        opts["port"] = spec.port
    if spec.user is not None:
        opts["username"] = spec.user
    if spec.identity_file:
        opts["client_keys"] = [os.path.expanduser(p) for p in spec.identity_file]
    if spec.known_hosts == "none":
        log.warning("%s: host key checking is OFF (known_hosts: none) — anyone on the path "
                    "can impersonate this host", spec.host)
        opts["known_hosts"] = None
    elif spec.known_hosts is not None:
        opts["known_hosts"] = os.path.expanduser(spec.known_hosts)
    return opts


def _map_error(spec: HostSpec, exc: BaseException, via: str = "") -> HostError:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return host_key_unknown(spec, exc.reason, via)
    if isinstance(exc, asyncssh.PermissionDenied):
        return auth_failed(spec, exc.reason, via)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return connect_timed_out(spec, via)
    if isinstance(exc, socket.gaierror):
        return cannot_resolve(spec, str(exc.strerror), via)
    if isinstance(exc, OSError):
        return cannot_connect(spec, str(exc.strerror or exc), via)
    detail = exc.reason if isinstance(exc, asyncssh.Error) else f"{type(exc).__name__}: {exc}"
    return HostUnreachableError(spec.label + (f" (via {via})" if via else ""),
                                f"SSH error: {detail}")


class AsyncsshTransport(Transport):
    def __init__(self, spec: HostSpec) -> None:
        super().__init__(spec)
        self._conn: asyncssh.SSHClientConnection | None = None
        self._jumps: list[asyncssh.SSHClientConnection] = []
        self._keeper: Any = None
        self._streamlocal_refused = False
        self._forwarder: openssh.Forwarder | None = None   # for direct lanes
        self._forward_tried = False
        self._forward_asks = 0       # blocking calls that asked for a lane so far
        self._forward_lock = threading.Lock()

    @property
    def is_connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> None:
        self._stop_forwarder()  # after a reconnect, the next blocking call starts a new one
        opts = connect_options(self.spec)
        tunnel = None
        # Each ProxyJump hop is a connection of ours, its host key checked like the target's.
        for jump_spec in _jump_specs(self.spec):
            hop = dict(connect_options(jump_spec), tunnel=tunnel) if tunnel else \
                connect_options(jump_spec)
            try:
                tunnel = await asyncssh.connect(jump_spec.host, **hop)
            except Exception as exc:
                await self._close_jump()
                raise _map_error(jump_spec, exc) from exc
            self._jumps.append(tunnel)
        try:
            if tunnel is not None:
                opts["tunnel"] = tunnel
            self._conn = await asyncssh.connect(self.spec.host, **opts)
        except Exception as exc:
            await self._close_jump()
            raise _map_error(self.spec, exc, via=self.spec.proxy_jump or "") from exc
        # sshd turns on TCP_NODELAY for a connection only once a session asks for a pty;
        # without it, when sshd writes two small packets in a row the second waits for our
        # ACK of the first, which Linux delays ~40 ms (Nagle + delayed ACK): opening a
        # session, or a small reply over a forwarded channel. A tiny pty session held open
        # for the connection's life prevents that; until sshd grants it, we acknowledge
        # every read at once instead (TCP_QUICKACK), so the sessions opened meanwhile (the
        # launch) do not wait either.
        stop_acking = _ack_at_once(self._conn)
        self._keeper = asyncio.ensure_future(self._hold_pty(self._conn, stop_acking))

    async def _hold_pty(self, conn: asyncssh.SSHClientConnection,
                        stop_acking: Callable[[], None]) -> Any:
        try:
            keeper = await conn.create_process("exec cat >/dev/null", term_type="dumb",
                                               encoding=None)
        except Exception as exc:  # noqa: BLE001 - latency, not correctness
            log.info("%s: could not open the pty keeper session (%s); acknowledging every "
                     "read at once instead", self.label, exc)
            return None
        stop_acking()
        return keeper

    async def run(self, command: str, *, input: bytes = b"", timeout: float) -> CommandResult:
        conn = self._require()
        try:
            proc = await asyncio.wait_for(self._run(conn, command, input), timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeoutError(
                self.label, f"remote command did not finish within {timeout:g} s") from None
        except (asyncssh.Error, OSError) as exc:
            raise _map_error(self.spec, exc) from exc
        status = proc.exit_status if proc.exit_signal is None else None
        out, err = proc.stdout or b"", proc.stderr or b""
        assert isinstance(out, bytes) and isinstance(err, bytes)  # encoding=None
        return CommandResult(status, out, err)

    @staticmethod
    async def _run(conn: asyncssh.SSHClientConnection, command: str, data: bytes) -> Any:
        proc = await conn.create_process(command, encoding=None)
        try:
            if data:
                proc.stdin.write(data)
            proc.stdin.write_eof()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command ended without reading its input: its exit status tells
        return await proc.wait(check=False)

    async def open_unix(self, path: str) -> tuple[StreamReader, StreamWriter]:
        conn = self._require()
        if self._streamlocal_refused:
            raise ForwardingRefused("streamlocal forwarding was refused earlier")
        try:
            return await self._open_unix(conn, path)
        except asyncssh.ChannelOpenError as exc:
            # OpenSSH answers "open failed" both when forwarding is disabled and when the
            # socket is missing: look at the socket to tell which.
            probe = await self.run(f"test -S {shlex.quote(path)}", timeout=10)
            if probe.exit_status != 0:
                raise HostError(self.label, f"no engine socket at {path} (the engine has "
                                "exited?)") from exc
        try:  # the socket may have appeared meanwhile (an engine restarting): ask once more
            return await self._open_unix(conn, path)
        except asyncssh.ChannelOpenError as exc:
            # Refused with the socket there: forwarding is off, or nothing listens on it (a
            # stale file). The caller tries the relay and tells us which it was.
            raise ForwardingRefused(f"{exc.reason} (code {exc.code})") from exc

    @staticmethod
    async def _open_unix(conn: asyncssh.SSHClientConnection,
                         path: str) -> tuple[StreamReader, StreamWriter]:
        chan, session = await conn.create_unix_connection(_UnixSession, path)
        assert isinstance(session, _UnixSession)
        return session.reader, _ChannelWriter(chan, session)

    def note_forwarding_refused(self) -> None:
        self._streamlocal_refused = True

    async def open_exec(self, command: str) -> tuple[StreamReader, StreamWriter]:
        conn = self._require()
        try:
            proc = await conn.create_process(command, encoding=None, stderr=asyncssh.DEVNULL)
        except (asyncssh.Error, OSError) as exc:
            raise _map_error(self.spec, exc) from exc
        return proc.stdout, proc.stdin  # type: ignore[return-value]

    def local_path(self, path: str, siblings: Sequence[str] = ()) -> str | None:
        fw = self._forwarder
        if fw is not None:
            return fw.local_path(path)
        if self._forward_tried:
            return None
        with self._forward_lock:
            self._forward_asks += 1
            # Not for a one-off call: a forwarder is one more login on the host.
            if not self._forward_tried and self._forward_asks >= openssh.START_AFTER:
                self._forward_tried = True
                if openssh.usable(self.spec):
                    try:
                        self._forwarder = openssh.Forwarder(self.spec, list(siblings) or [path])
                    except OSError as exc:
                        log.info("%s: could not start the OpenSSH forwarder (%s)",
                                 self.label, exc)
        return None

    def _stop_forwarder(self) -> None:
        with self._forward_lock:
            fw, self._forwarder = self._forwarder, None
            self._forward_tried = False
            self._forward_asks = 0
        if fw is not None:
            fw.close()

    async def close(self) -> None:
        self._stop_forwarder()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 5)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        await self._close_jump()

    async def _close_jump(self) -> None:
        jumps, self._jumps = self._jumps, []
        for jump in reversed(jumps):
            jump.close()

    def _require(self) -> asyncssh.SSHClientConnection:
        if self._conn is None or self._conn.is_closed():
            raise HostUnreachableError(self.label, "not connected")
        return self._conn


def _ack_at_once(conn: asyncssh.SSHClientConnection) -> Callable[[], None]:
    """Acknowledge each read of ``conn``'s TCP socket at once (TCP_QUICKACK: Linux leaves
    its quick-ack mode by itself, hence set again after every read) until the returned
    function is called. Not on other systems or on a tunneled connection (no socket)."""
    sock = conn.get_extra_info("socket")
    option = getattr(socket, "TCP_QUICKACK", None)
    if option is None or sock is None or sock.family not in (socket.AF_INET,
                                                              socket.AF_INET6):
        return lambda: None
    received = conn.data_received

    def data_received(data: bytes, datatype: Any = None) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)
        except OSError:
            pass
        received(data, datatype)

    # The transport looks the method up at each read: an attribute on this connection
    # object takes the place of its class's method, and removing it restores the method.
    conn.data_received = data_received  # type: ignore[method-assign]
    return lambda: conn.__dict__.pop("data_received", None) and None


def _jump_specs(spec: HostSpec) -> list[HostSpec]:
    """The ProxyJump hops, in order; each inherits key checking and identity from the
    target's entry (``[user@]host[:port]``, comma-separated; validated by config)."""
    import dataclasses

    hops = []
    for target in (spec.proxy_jump or "").split(","):
        if not target.strip():
            continue
        user, _, hostport = target.strip().rpartition("@")
        if hostport.startswith("["):  # [IPv6]:port
            host, _, port = hostport[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = hostport.partition(":")
        hops.append(dataclasses.replace(spec, host=host, user=user or spec.user,
                                        port=int(port) if port else None, proxy_jump=None))
    return hops


class _UnixSession(asyncssh.SSHUNIXSession):
    """A streamlocal channel's callbacks, feeding a PushReader (asyncssh's callback API:
    data goes from the packet handler to the frame parser with no task wake-up between)."""

    def __init__(self) -> None:
        self.reader = PushReader(limit=1 << 20)
        self.writable = asyncio.Event()
        self.writable.set()
        self.lost = False

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.reader.feed_data(data)

    def eof_received(self) -> bool:
        self.reader.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writable.set()
        if exc is not None:
            self.reader.set_exception(exc)
        elif not self.reader.at_eof():
            self.reader.feed_eof()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class _ChannelWriter:
    """The writing half of a streamlocal channel, as a StreamWriter."""

    def __init__(self, chan: Any, session: _UnixSession) -> None:
        self._chan = chan
        self._session = session

    def write(self, data: Any) -> None:
        self._chan.write(data)

    def writelines(self, data: Any) -> None:
        self._chan.writelines(data)

    async def drain(self) -> None:
        if self._session.lost:
            raise ConnectionResetError("the SSH channel closed")
        await self._session.writable.wait()
        if self._session.lost:
            raise ConnectionResetError("the SSH channel closed")

    def close(self) -> None:
        self._chan.close()

    def is_closing(self) -> bool:
        return self._session.lost
