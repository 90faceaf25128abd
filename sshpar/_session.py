"""The asyncio core: hosts, their engines, and one framed channel per engine.

Layer: core. Imports config, errors, _wire, _transport, _bootstrap, asyncresult (records).
Everything here runs in the loop thread, except the ``submit`` entry points, which are
thread-safe and only hand work over.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import linecache
import logging
import os
import shlex
import time
from typing import Any, Callable, Sequence

from . import _bootstrap, _wire
from ._clusterfile import ClusterRecord, EngineRecord
from ._transport import ForwardingRefused, Transport, make_transport
from .asyncresult import TaskRecord
from .config import ClusterSpec, HostSpec
from .errors import (
    EngineError,
    EngineInfo,
    HostError,
    ProtocolError,
    SshparError,
    StartError,
)
from .errors import TimeoutError as SshparTimeoutError

log = logging.getLogger("sshpar.session")

#: ``on_progress(host, phase)``: told as each host connects, starts and is ready (or fails).
Progress = Callable[[str, str], None] | None

CHANNEL_TIMEOUT = 20.0
CONTROL_TIMEOUT = 10.0
#: At most this many hosts connect and bootstrap at once.
START_CONCURRENCY = 32


class EngineChannel:
    """One engine: its framed stream, the tasks it owes us, and its control requests."""

    def __init__(self, host: HostSession, info: EngineInfo, socket_path: str) -> None:
        self.host = host
        self.info = info
        self.socket_path = socket_path
        self.pending: dict[str, TaskRecord] = {}
        self.clock_offset = 0.0
        self.remote: dict = {}
        self.state = "starting"
        self._outbox: collections.deque[tuple[TaskRecord, dict, list]] = collections.deque()
        self._wakeup = False
        self._acks: list[str] = []
        self._requests: dict[int, asyncio.Future] = {}
        self._req = 0
        self._sender: _wire.FrameSender | None = None
        self._writer: Any = None
        self._reader_task: asyncio.Task | None = None
        self._sent_sources: dict[str, int] = {}
        self.loop = asyncio.get_running_loop()

    @property
    def engine_id(self) -> int:
        return self.info.engine_id

    async def open(self, key: bytes) -> None:
        transport = self.host.transport
        try:
            reader, writer = await transport.open_unix(self.socket_path)
        except ForwardingRefused:
            log.info("%s: streamlocal forwarding refused; relaying through an exec channel",
                     self.host.label)
            cmd = _bootstrap.python_command(self.host.spec, _bootstrap.build_bundle(),
                                            "relay", self.socket_path)
            reader, writer = await transport.open_exec(cmd)
        self._writer = writer
        sent = time.time()
        codec = await _wire.client_handshake(reader, writer, key)
        hello = await codec.read(reader)
        now = time.time()
        if hello.kind is not _wire.Kind.REPLY or hello.meta.get("op") != "hello":
            raise ProtocolError(f"engine {self.engine_id} did not greet as expected")
        self.remote = hello.meta
        self.clock_offset = hello.meta["time"] - (sent + now) / 2
        self._sender = _wire.FrameSender(codec, writer)
        self.state = "running"
        self._reader_task = asyncio.ensure_future(self._read_loop(reader, codec))

    def sources_for(self, files: set[str] | frozenset[str]) -> dict[str, str]:
        """Source text of ``files`` this engine has not been sent yet (for tracebacks of
        functions sent by value: the engine may not have the file, or another version)."""
        out = {}
        for name in files:
            lines = linecache.getlines(name)
            if not lines:
                continue
            text = "".join(lines)
            digest = hash(text)
            if self._sent_sources.get(name) != digest:
                self._sent_sources[name] = digest
                out[name] = text
        return out

    # -- submitting (any thread) ------------------------------------------------------------
    def submit(self, rec: TaskRecord, meta: dict, payload: list) -> None:
        self._outbox.append((rec, meta, payload))
        if not self._wakeup:
            self._wakeup = True
            self.loop.call_soon_threadsafe(self._flush_outbox)

    def _flush_outbox(self) -> None:
        self._wakeup = False
        while self._outbox:
            rec, meta, payload = self._outbox.popleft()
            if self.state != "running" or self._sender is None:
                rec.fail(self._lost_error("is not connected"), time.time())
                continue
            self.pending[rec.msg_id] = rec
            try:
                self._sender.send(_wire.Kind.TASK, meta, payload)
            except Exception as exc:  # noqa: BLE001 - the reader reports the broken stream
                self.pending.pop(rec.msg_id, None)
                rec.fail(self._lost_error(f"could not be sent to ({exc})"), time.time())

    # -- control requests (loop thread) -----------------------------------------------------
    async def request(self, op: str, timeout: float = CONTROL_TIMEOUT, **kw: Any) -> dict:
        if self._sender is None or self.state != "running":
            raise self._lost_error("is not connected")
        self._req += 1
        fut = self.loop.create_future()
        self._requests[self._req] = fut
        self._sender.send(_wire.Kind.CONTROL, {"op": op, "req": self._req, **kw})
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise SshparTimeoutError(f"{self.info} did not answer {op!r} within "
                                     f"{timeout:g} s") from None
        finally:
            self._requests.pop(self._req, None)

    async def fetch(self, rec: TaskRecord) -> str:
        """Ask the engine for a task's result: "done" (it is on its way), "pending" (it
        will come when finished) or "unknown"."""
        self.pending[rec.msg_id] = rec
        try:
            reply = await self.request("fetch", msg_ids=[rec.msg_id])
        except SshparError:
            self.pending.pop(rec.msg_id, None)
            raise
        state = reply["found"].get(rec.msg_id, "unknown")
        if state == "unknown":
            self.pending.pop(rec.msg_id, None)
        return state

    def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks and self._sender is not None and self.state == "running":
            try:
                self._sender.send(_wire.Kind.CONTROL, {"op": "ack", "msg_ids": acks})
            except Exception:  # noqa: BLE001 - unacked results stay on the engine; harmless
                pass

    # -- receiving --------------------------------------------------------------------------
    async def _read_loop(self, reader: Any, codec: _wire.Codec) -> None:
        reason = "closed the connection"
        try:
            while True:
                frame = await codec.read(reader)
                kind = frame.kind
                meta = frame.meta
                if kind is _wire.Kind.RESULT:
                    rec = self.pending.pop(meta["msg_id"], None)
                    if not self._acks:
                        self.loop.call_soon(self._send_acks)
                    self._acks.append(meta["msg_id"])
                    if rec is not None:
                        rec.finish(meta, frame.payload, time.time(), self.clock_offset)
                elif kind is _wire.Kind.OUTPUT:
                    rec = self.pending.get(meta["msg_id"])
                    if rec is not None:
                        rec.add_output(meta["name"], meta["text"])
                elif kind is _wire.Kind.REPLY:
                    fut = self._requests.get(meta.get("req", -1))
                    if fut is not None and not fut.done():
                        fut.set_result(meta)
                else:
                    raise ProtocolError(f"unexpected {kind.name} frame from an engine")
        except asyncio.CancelledError:
            reason = "was closed by this client"
            raise
        except (asyncio.IncompleteReadError, EOFError, ConnectionError, OSError) as exc:
            reason = f"closed the connection ({type(exc).__name__})" if str(exc) else reason
        except ProtocolError as exc:
            reason = f"sent a bad frame: {exc}"
            log.error("%s: %s", self.info, reason)
        except Exception as exc:  # noqa: BLE001 - any reader failure loses the channel
            reason = f"channel failed: {type(exc).__name__}: {exc}"
            log.exception("%s: reader failed", self.info)
        finally:
            self._lost(reason)

    def _lost_error(self, what: str) -> EngineError:
        return EngineError(f"{self.info} {what}", engine_id=self.engine_id,
                           host=self.info.host, reason=what)

    def _lost(self, reason: str) -> None:
        if self.state == "running":
            self.state = "lost"
        now = time.time()
        pending, self.pending = self.pending, {}
        for rec in pending.values():
            rec.fail(self._lost_error(f"{reason} while a task was pending"), now)
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(self._lost_error(reason))
        self._requests.clear()

    async def close(self) -> None:
        state = self.state
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except BaseException:  # noqa: BLE001 - cancelled on purpose
                pass
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001
                pass
        self.state = "stopped" if state == "stopping" else "closed"

    async def shutdown(self) -> bool:
        """Ask the engine to exit; True once its stream has closed (the process is gone)."""
        if self.state != "running":
            return False
        self.state = "stopping"
        try:
            await self.request("shutdown", timeout=CONTROL_TIMEOUT)
        except SshparError:
            return False
        task = self._reader_task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), CONTROL_TIMEOUT)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                return False
        return True


@dataclasses.dataclass
class HostSession:
    """One host: its transport, what the launcher reported, and its engines."""

    spec: HostSpec
    transport: Transport
    report: _bootstrap.LaunchReport | None = None
    channels: list[EngineChannel] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return self.spec.label

    async def start(self, cluster: str, key: bytes, timeout: float,
                    progress: Progress = None) -> None:
        note = progress or (lambda host, phase: None)
        note(self.label, "connecting")
        await asyncio.wait_for(self.transport.connect(), self.spec.connect_timeout + 5)
        note(self.label, "starting engines")
        self.report = await _bootstrap.launch(self.transport, self.spec, cluster=cluster,
                                              key=key, engines=self.spec.engines,
                                              timeout=timeout)
        note(self.label, f"ready: {len(self.report.engines)} engine(s)")

    async def kill_leftovers(self, pids: Sequence[int], sockets: Sequence[str]) -> None:
        if not pids or not self.transport.is_connected:
            return
        # Only signal processes that are still our engines: a pid may have been reused.
        cmd = ("for p in " + " ".join(str(int(p)) for p in pids) + "; do "
               "grep -qs 'sshpar-' /proc/$p/cmdline && kill $p; done; rm -f "
               + " ".join(shlex.quote(s) for s in sockets))
        try:
            await self.transport.run(cmd, timeout=CONTROL_TIMEOUT)
        except SshparError as exc:
            log.warning("%s: could not clean up engines %s: %s", self.label, pids, exc)


class Cluster:
    """Every host and engine of one client, owned by the loop thread."""

    def __init__(self, spec: ClusterSpec, key: bytes) -> None:
        self.spec = spec
        self.key = key
        self.hosts: list[HostSession] = []
        self.engines: dict[int, EngineChannel] = {}
        self.start_errors: dict[str, BaseException] = {}

    async def start(self, *, timeout: float, allow_partial: bool = False,
                    on_progress: Progress = None) -> None:
        """Start every host's engines, all hosts at once (bounded), then open channels."""
        sem = asyncio.Semaphore(START_CONCURRENCY)

        async def start_host(spec: HostSpec) -> HostSession:
            async with sem:
                host = HostSession(spec, make_transport(spec))
                try:
                    await host.start(self.spec.name, self.key, timeout, on_progress)
                except BaseException as exc:
                    if on_progress is not None:
                        on_progress(spec.label, f"failed: {exc}")
                    await host.transport.close()
                    raise
                return host

        results = await asyncio.gather(*(start_host(h) for h in self.spec.hosts),
                                       return_exceptions=True)
        errors: dict[str, BaseException] = {}
        for spec, res in zip(self.spec.hosts, results):
            if isinstance(res, BaseException):
                errors[spec.label] = _as_host_error(spec, res)
            else:
                self.hosts.append(res)
        if errors and (not allow_partial or not self.hosts):
            await self.shutdown()
            if len(errors) == 1 and not self.hosts:
                raise next(iter(errors.values()))
            raise StartError(errors, [h.label for h in self.hosts])
        self.start_errors = errors
        next_id = 0
        opening = []
        for host in self.hosts:
            assert host.report is not None
            for eng in host.report.engines:
                info = EngineInfo(next_id, host.label, eng.pid, eng.uuid)
                channel = EngineChannel(host, info, eng.socket)
                host.channels.append(channel)
                self.engines[next_id] = channel
                opening.append(channel)
                next_id += 1
        results = await asyncio.gather(
            *(asyncio.wait_for(ch.open(self.key), CHANNEL_TIMEOUT) for ch in opening),
            return_exceptions=True)
        failed = [(ch, r) for ch, r in zip(opening, results) if isinstance(r, BaseException)]
        if failed:
            await self.shutdown()
            ch, exc = failed[0]
            raise EngineError(f"could not open a channel to {ch.info}: "
                              f"{type(exc).__name__}: {exc}", engine_id=ch.engine_id,
                              host=ch.info.host, reason=str(exc)) from exc

    async def attach(self, engines: Sequence[EngineRecord], *, timeout: float) -> None:
        """Reconnect to engines started earlier (from a cluster file). Engines that cannot be
        reached are kept, marked lost; raises only if none can be reached."""
        by_host: dict[int, list[EngineRecord]] = {}
        for rec in engines:
            by_host.setdefault(rec.host, []).append(rec)

        async def attach_host(index: int, recs: list[EngineRecord]) -> None:
            spec = self.spec.hosts[index]
            host = HostSession(spec, make_transport(spec))
            self.hosts.append(host)
            channels = []
            for rec in recs:
                ch = EngineChannel(host, EngineInfo(rec.id, spec.label, rec.pid, rec.uuid),
                                   rec.socket)
                ch.state = "lost"
                host.channels.append(ch)
                self.engines[rec.id] = ch
                channels.append(ch)
            try:
                await asyncio.wait_for(host.transport.connect(), spec.connect_timeout + 5)
            except (SshparError, asyncio.TimeoutError, OSError) as exc:
                self.start_errors[spec.label] = _as_host_error(spec, exc)
                return
            results = await asyncio.gather(
                *(asyncio.wait_for(ch.open(self.key), CHANNEL_TIMEOUT) for ch in channels),
                return_exceptions=True)
            for ch, res in zip(channels, results):
                if isinstance(res, BaseException):
                    log.info("%s is gone: %s", ch.info, res)
                    ch.state = "lost"

        self.start_errors = {}
        await asyncio.wait_for(
            asyncio.gather(*(attach_host(i, recs) for i, recs in sorted(by_host.items()))),
            timeout)
        self.hosts.sort(key=lambda h: self.spec.hosts.index(h.spec))

    def record(self, created: str = "") -> ClusterRecord:
        """What a later client needs to reach these engines again."""
        engines = []
        for index, spec in enumerate(self.spec.hosts):
            for host in self.hosts:
                if host.spec is not spec:
                    continue
                for ch in host.channels:
                    engines.append(EngineRecord(ch.engine_id, index, ch.info.uuid,
                                                ch.info.pid, ch.socket_path))
        return ClusterRecord(name=self.spec.name, key=self.key, hosts=self.spec.hosts,
                             engines=tuple(sorted(engines, key=lambda e: e.id)),
                             created=created, source=self.spec.source)

    async def shutdown(self) -> None:
        """Stop every engine (politely, then by signal) and close every connection."""
        for host in self.hosts:
            oks = await asyncio.gather(*(ch.shutdown() for ch in host.channels))
            left = [ch for ch, ok in zip(host.channels, oks) if not ok]
            if host.report is not None and not host.channels:
                left_pids = [e.pid for e in host.report.engines]
                sockets = [e.socket for e in host.report.engines]
            else:
                left_pids = [ch.info.pid for ch in left]
                sockets = [ch.socket_path for ch in left]
            await host.kill_leftovers(left_pids, sockets)
        await self.close()

    async def close(self) -> None:
        for host in self.hosts:
            await asyncio.gather(*(ch.close() for ch in host.channels),
                                 return_exceptions=True)
            await host.transport.close()


def _as_host_error(spec: HostSpec, exc: BaseException) -> BaseException:
    if isinstance(exc, SshparError):
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return HostError(spec.label, "timed out while starting engines",
                         hint="raise `connect_timeout:` or check the host's load")
    return HostError(spec.label, f"{type(exc).__name__}: {exc}")


def new_key() -> bytes:
    return os.urandom(32)
