"""The paramiko transport: one SSH connection per host, engines reached through the relay.

Layer: transport. The only module that imports paramiko; its exceptions become sshpar's here.

paramiko blocks, so connecting and opening channels run on worker threads, and each stream
has threads that move bytes between its channel and the event loop, which never waits on the
network. paramiko cannot open direct-streamlocal channels: ``open_unix`` refuses and the channel
code runs the bundle's relay over ``open_exec``. paramiko does not read ``~/.ssh/config``
itself; HostName, User, Port, IdentityFile and ProxyJump come from it here, below the hosts file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import logging
import os
import queue
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import paramiko

from ..config import HostSpec
from ..errors import (
    AuthenticationError,
    ConfigError,
    ConnectTimeoutError,
    HostError,
    HostKeyError,
    HostUnreachableError,
)
from .base import (
    CommandResult,
    ForwardingRefused,
    StreamReader,
    StreamWriter,
    Transport,
    auth_failed,
    cannot_resolve,
    connect_timed_out,
    host_key_unknown,
    ssh_command,
)

log = logging.getLogger("sshpar.transport")
_PARAMIKO_LOG = "sshpar.transport.paramiko"


def _demote(record: logging.LogRecord) -> bool:
    # paramiko's thread logs, as errors with tracebacks, failures that reach the caller
    # anyway (and become sshpar errors there): keep them as debug detail.
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger(_PARAMIKO_LOG).isEnabledFor(logging.DEBUG)


logging.getLogger(_PARAMIKO_LOG).addFilter(_demote)

# Preferences, not restrictions: names this paramiko lacks are skipped, others keep its order.
# curve25519 first (post-quantum kex costs ~0.1 s per connect), AES-GCM first for bulk data.
KEX_ALGS = ("curve25519-sha256", "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256")
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
KEEPALIVE_INTERVAL = 15
HIGH_WATER = 1 << 20  # bytes queued to send before drain() waits; each reader's buffer limit
_RECV_SIZE = 1 << 18
_EOF, _CLOSE = b"", None  # writer queue markers


@dataclasses.dataclass(frozen=True)
class _Hop:
    """One host to log in to: the hosts file's values over ~/.ssh/config's."""

    spec: HostSpec  # as configured, for messages
    hostname: str
    port: int
    user: str
    keys: tuple[str, ...]
    jumps: tuple[str, ...]


def _resolve(spec: HostSpec) -> _Hop:
    path, cfg = os.path.expanduser("~/.ssh/config"), {}
    if os.path.exists(path):
        try:
            cfg = paramiko.SSHConfig.from_path(path).lookup(spec.host)
        except (paramiko.ConfigParseError, OSError, ValueError) as exc:
            raise ConfigError(f"cannot read it for {spec.host}: {exc}", file=path) from exc
    jump = spec.proxy_jump or cfg.get("proxyjump") or "none"
    return _Hop(spec, cfg.get("hostname", spec.host), spec.port or int(cfg.get("port", 22)),
                spec.user or cfg.get("user") or getpass.getuser(),
                tuple(map(os.path.expanduser, spec.identity_file or cfg.get("identityfile", ()))),
                () if jump.lower() == "none" else tuple(j.strip() for j in jump.split(",")))


def _jump_spec(spec: HostSpec, hop: str) -> HostSpec:
    """A jump host inherits key checking and identity from the target's entry."""
    user, _, hostport = hop.rpartition("@")
    host, _, port = hostport.partition(":")
    return dataclasses.replace(spec, host=host, user=user or spec.user,
                               port=int(port) if port else None, proxy_jump=None)


def _route(spec: HostSpec) -> list[_Hop]:
    """The hosts to log in to in turn: jump hosts first, the target last."""
    target = _resolve(spec)
    return [*(_resolve(_jump_spec(spec, j)) for j in target.jumps), target]


def _new_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    transport = paramiko.Transport(sock, **kwargs)
    opts = transport.get_security_options()
    for name, wanted in (("kex", KEX_ALGS), ("ciphers", CIPHERS), ("digests", MACS)):
        rank = {n: i for i, n in enumerate(wanted)}
        setattr(opts, name, sorted(getattr(opts, name), key=lambda n: rank.get(n, len(rank))))
    return transport


class _UnknownHostKey(paramiko.SSHException):
    pass


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown host keys, or (``known_hosts: none``) accept them; never save one."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        if not self.accept:
            raise _UnknownHostKey(f"no {key.get_name()} key for {hostname} in known_hosts")


def _map_error(spec: HostSpec, exc: BaseException, via: str = "", addr: str = "") -> HostError:
    if isinstance(exc, HostError):
        return exc
    host = spec.label + (f" (via {via})" if via else "")
    where = spec.known_hosts if spec.known_hosts not in (None, "none") else "~/.ssh/known_hosts"
    if isinstance(exc, paramiko.BadHostKeyException):
        return HostKeyError(
            host, f"host key changed: the server's {exc.key.get_name()} key differs from the "
            f"one in {where}", hint=f"if the host was reinstalled, remove its old line "
            f"(`ssh-keygen -R`) and run `{ssh_command(spec)}` once; otherwise this may be an "
            "attack")
    if isinstance(exc, _UnknownHostKey):
        return host_key_unknown(spec, str(exc), via)
    if isinstance(exc, paramiko.AuthenticationException):
        return auth_failed(spec, str(exc), via)
    # paramiko wraps a banner timeout in SSHException; a slow key exchange ends in "No
    # existing session".
    if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError) or \
            str(exc) == "No existing session":
        return connect_timed_out(spec, via)
    if isinstance(exc, socket.gaierror):
        return cannot_resolve(spec, str(exc.strerror), via)
    target = f" to {addr}" if addr else ""
    if isinstance(exc, (OSError, paramiko.ChannelException)):
        why = exc.strerror or exc if isinstance(exc, OSError) else exc.text
        return HostUnreachableError(host, f"cannot connect{target}: {why}",
                                    hint="is sshd running there, and `port:` right?")
    return HostUnreachableError(host, f"SSH error{target}: {type(exc).__name__}: {exc}")


def _close_all(opened: list[Any]) -> None:
    """Close a chain of sockets and clients, first waking their threads with a shutdown (a
    socket closed under a paramiko thread makes it log "Bad file descriptor" as an error)."""
    if opened and isinstance(opened[0], socket.socket):
        with contextlib.suppress(OSError):
            opened[0].shutdown(socket.SHUT_RDWR)
    for item in reversed(opened):
        if isinstance(item, paramiko.SSHClient) and item.get_transport() is not None:
            item.get_transport().join(2)  # type: ignore[union-attr]
        with contextlib.suppress(Exception):
            item.close()


async def _blocking(fn: Callable[..., Any], *args: Any,
                    on_abandon: Callable[[Any], Any] | None = None) -> Any:
    """Run ``fn`` on a worker thread; if we are cancelled meanwhile, ``on_abandon`` its result."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                              or on_abandon is None or on_abandon(f.result()))
        raise


class _Pump:
    """Moves what a channel receives into a StreamReader, one chunk at a time, on a thread.

    Back-pressure: while the StreamReader is over its limit we stop reading; paramiko then
    stops widening the SSH window and the remote stops sending. ``reader=None`` discards.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, recv: Callable[[int], bytes],
                 reader: asyncio.StreamReader | None) -> None:
        self._loop, self._recv, self._reader = loop, recv, reader
        self._go = threading.Event()
        self._go.set()
        self._paused = self._stopped = False
        if reader is not None:
            reader.set_transport(self)  # type: ignore[arg-type]  # for pause/resume only
        threading.Thread(target=self._run, name="sshpar-paramiko-read", daemon=True).start()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._go.set()

    def stop(self) -> None:
        """The channel is closing: read what is left, whether or not anyone wants it."""
        self._stopped = True
        self._go.set()

    def _feed(self, data: bytes) -> None:
        assert self._reader is not None
        self._reader.feed_data(data) if data else self._reader.feed_eof()
        if not self._paused:
            self._go.set()

    def _run(self) -> None:
        while self._go.wait():
            if self._reader is not None and not self._stopped:
                self._go.clear()  # until the loop has taken this chunk
            data = self._recv(_RECV_SIZE)
            if self._reader is not None:
                try:
                    self._loop.call_soon_threadsafe(self._feed, data)
                except RuntimeError:  # the loop has closed: nobody is reading any more
                    return
            if not data:
                return


class _ChannelWriter:
    """A StreamWriter whose thread does the sending: a full SSH window blocks it, never the
    loop. ``drain()`` waits while more than HIGH_WATER bytes are queued; ``close()`` sends
    what is queued, then closes the channel."""

    def __init__(self, chan: paramiko.Channel, loop: asyncio.AbstractEventLoop,
                 pumps: list[_Pump]) -> None:
        self._chan, self._loop, self._pumps = chan, loop, pumps
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._queued = 0
        self._room = asyncio.Event()
        self._room.set()
        self._closing = False
        self._error: str | None = None
        threading.Thread(target=self._run, name="sshpar-paramiko-write", daemon=True).start()

    def write(self, data: Any) -> None:
        self._put(bytes(data))  # a copy, as asyncio makes: callers may reuse their buffers

    def writelines(self, data: Iterable[Any]) -> None:
        self._put(b"".join(data))  # a small frame's pieces go as one SSH packet

    def _put(self, data: bytes) -> None:
        if self._error is not None:
            raise ConnectionResetError(self._error)
        if self._closing:
            raise BrokenPipeError("the stream is closed for writing")
        if data:
            self._queued += len(data)
            if self._queued > HIGH_WATER:
                self._room.clear()
            self._queue.put(data)

    async def drain(self) -> None:
        await self._room.wait()
        if self._error is not None:
            raise ConnectionResetError(self._error)

    def write_eof(self) -> None:
        if not self._closing:
            self._closing = True
            self._queue.put(_EOF)

    def close(self) -> None:
        self._closing = True
        self._queue.put(_CLOSE)

    def is_closing(self) -> bool:
        return self._closing or self._error is not None

    async def abort(self) -> None:
        """Close the channel now: a send blocked on a full window then fails."""
        self.close()
        await asyncio.to_thread(self._chan.close)

    def _sent(self, n: int, error: str | None) -> None:
        self._queued -= n
        self._error = self._error or error
        if self._queued <= HIGH_WATER or self._error is not None:
            self._room.set()

    def _run(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            try:
                while (data := self._queue.get()) is not _CLOSE:
                    self._chan.sendall(data) if data else self._chan.shutdown_write()
                    self._loop.call_soon_threadsafe(self._sent, len(data), None)
            except Exception as exc:  # noqa: BLE001 - the channel or connection is gone
                self._loop.call_soon_threadsafe(self._sent, 0, f"SSH channel closed: {exc}")
            finally:
                with contextlib.suppress(Exception):
                    self._chan.close()
                for pump in self._pumps:
                    pump.stop()


class ParamikoTransport(Transport):
    supports_unix_streams = False

    def __init__(self, spec: HostSpec) -> None:
        super().__init__(spec)
        self._opened: list[Any] = []  # socket, client, [channel, client]... to the target
        self._keeper: paramiko.Channel | None = None
        self._writers: weakref.WeakSet[_ChannelWriter] = weakref.WeakSet()

    @property
    def is_connected(self) -> bool:
        transport = self._opened[-1].get_transport() if self._opened else None
        return transport is not None and transport.is_active()

    async def connect(self) -> None:
        hops: list[_Hop] = await _blocking(_route, self.spec)
        opened: list[Any] = []
        try:
            await asyncio.wait_for(_blocking(self._connect_blocking, hops, opened,
                                             on_abandon=lambda _: _close_all(opened)),
                                   self.spec.connect_timeout * len(hops) + 1)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if opened:  # wakes the worker, which then closes what it opened
                with contextlib.suppress(OSError):
                    opened[0].shutdown(socket.SHUT_RDWR)
            if isinstance(exc, asyncio.TimeoutError):
                raise _map_error(self.spec, TimeoutError()) from None
            raise
        self._opened = opened
        # sshd turns on TCP_NODELAY for a connection only once a session asks for a pty;
        # without it, small replies stall ~40 ms (Nagle + delayed ACK). A tiny pty session
        # held open for the connection's life prevents that.
        try:
            self._keeper = await _blocking(self._exec, "exec cat >/dev/null", True,
                                           on_abandon=lambda chan: chan.close())
        except Exception as exc:  # noqa: BLE001 - latency, not correctness
            log.info("%s: could not open the pty keeper session (%s); replies may be "
                     "delayed by Nagle's algorithm", self.label, exc)

    def _connect_blocking(self, hops: list[_Hop], opened: list[Any]) -> None:
        try:
            for i, hop in enumerate(hops):
                via, addr = hops[i - 1].spec.label if i else "", f"{hop.hostname}:{hop.port}"
                try:
                    if i:
                        sock = opened[-1].get_transport().open_channel(
                            "direct-tcpip", (hop.hostname, hop.port), ("127.0.0.1", 0),
                            timeout=hop.spec.connect_timeout)
                    else:
                        sock = socket.create_connection((hop.hostname, hop.port),
                                                        timeout=hop.spec.connect_timeout)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    opened.append(sock)
                    self._login(hop, sock, opened)
                except Exception as exc:
                    raise _map_error(hop.spec, exc, via, addr) from exc
        except BaseException:
            _close_all(opened)
            raise

    def _login(self, hop: _Hop, sock: Any, opened: list[Any]) -> None:
        spec = hop.spec
        for key in hop.keys:
            if not os.path.exists(key):
                raise AuthenticationError(spec.label, f"identity file {key} does not exist",
                                          hint="fix `identity_file:` for this host")
        client = paramiko.SSHClient()
        opened.append(client)
        client.set_log_channel(_PARAMIKO_LOG)
        client.set_missing_host_key_policy(_HostKeyPolicy(accept=spec.known_hosts == "none"))
        if spec.known_hosts == "none":
            log.warning("%s: host key checking is OFF (known_hosts: none) — anyone on the path "
                        "can impersonate this host", spec.host)
        else:
            for path in ([spec.known_hosts] if spec.known_hosts else
                         ["~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts"]):
                if os.path.exists(os.path.expanduser(path)):
                    client.get_host_keys().load(os.path.expanduser(path))
        t = spec.connect_timeout
        client.connect(hop.hostname, hop.port, hop.user, sock=sock, timeout=t,
                       key_filename=list(hop.keys) or None, look_for_keys=not hop.keys,
                       banner_timeout=t, auth_timeout=t, transport_factory=_new_transport)
        client.get_transport().set_keepalive(KEEPALIVE_INTERVAL)  # type: ignore[union-attr]

    def _exec(self, command: str, pty: bool = False) -> paramiko.Channel:
        chan = self._require().open_session(timeout=self.spec.connect_timeout)
        try:
            if pty:
                chan.get_pty(term="dumb")
            chan.exec_command(command)
        except BaseException:
            chan.close()
            raise
        return chan

    async def _open(self, command: str, *, keep_stderr: bool = False) -> tuple[
            paramiko.Channel, asyncio.StreamReader, asyncio.StreamReader, _ChannelWriter]:
        try:
            chan = await _blocking(self._exec, command, on_abandon=lambda c: c.close())
        except Exception as exc:
            raise _map_error(self.spec, exc) from exc
        loop = asyncio.get_running_loop()
        out, err = asyncio.StreamReader(HIGH_WATER), asyncio.StreamReader(HIGH_WATER)
        writer = _ChannelWriter(chan, loop, [
            _Pump(loop, chan.recv, out), _Pump(loop, chan.recv_stderr, err if keep_stderr
                                               else None)])
        self._writers.add(writer)
        return chan, out, err, writer

    async def run(self, command: str, *, input: bytes = b"", timeout: float) -> CommandResult:
        chan, out, err, writer = await self._open(command, keep_stderr=True)

        async def finish() -> tuple[bytes, bytes, int]:
            writer.write(input)
            writer.write_eof()
            stdout, stderr = await asyncio.gather(out.read(), err.read())
            return stdout, stderr, await asyncio.to_thread(chan.recv_exit_status)
        try:
            stdout, stderr, status = await asyncio.wait_for(finish(), timeout)
        except asyncio.TimeoutError:
            await writer.abort()
            raise ConnectTimeoutError(
                self.label, f"remote command did not finish within {timeout:g} s") from None
        except BaseException:
            await writer.abort()
            raise
        writer.close()
        return CommandResult(status if status >= 0 else None, stdout, stderr)  # -1: signal

    async def open_unix(self, path: str) -> tuple[StreamReader, StreamWriter]:
        raise ForwardingRefused("the paramiko backend cannot open direct-streamlocal channels")

    async def open_exec(self, command: str) -> tuple[StreamReader, StreamWriter]:
        _, out, _, writer = await self._open(command)
        return out, writer

    async def close(self) -> None:
        opened, self._opened, self._keeper = self._opened, [], None
        for writer in list(self._writers):
            writer.close()
        if opened:  # closing the connection ends the keeper session too
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_blocking(_close_all, opened), 5)

    def _require(self) -> paramiko.Transport:
        transport = self._opened[-1].get_transport() if self._opened else None
        if transport is None or not transport.is_active():
            raise HostUnreachableError(self.label, "not connected")
        return transport
