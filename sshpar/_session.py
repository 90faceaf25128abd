"""The asyncio core: the cluster, its hosts, and the supervision that keeps engines reachable.

Layer: core. Imports config, errors, _transport, _bootstrap, _channel, _clusterfile.
Everything here runs in the loop thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import _bootstrap
from ._channel import CONTROL_TIMEOUT, EngineChannel
from ._clusterfile import ClusterRecord, EngineRecord
from ._transport import Transport, make_transport
from .config import ClusterSpec, HostSpec
from .errors import EngineError, EngineInfo, HostError, SshparError, StartError

log = logging.getLogger("sshpar.session")

#: ``on_progress(host, phase)``: told as each host connects, starts and is ready (or fails).
Progress = Callable[[str, str], None] | None

CHANNEL_TIMEOUT = 20.0
#: How long to wait for a nanny to bring a crashed engine back.
RESTART_TIMEOUT = 15.0
#: At most this many hosts connect and bootstrap at once.
START_CONCURRENCY = 32


class HostSession:
    """One host: its transport, its engines, and the watch that keeps them reachable.

    Supervision, in one place: a heartbeat notices silent engines; a broken stream is either
    the engine's death (the host still answers: read why from the nanny's exit file, reopen
    if it restarts) or the host's loss (reconnect with backoff, resync every engine, and
    only after ``lost_after`` seconds fail what was pending).
    """

    def __init__(self, spec: HostSpec, transport: Transport, key: bytes) -> None:
        self.spec = spec
        self.transport = transport
        self.key = key
        self.report: _bootstrap.LaunchReport | None = None
        self.channels: list[EngineChannel] = []
        self.state = "up"             # up | recovering
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    @property
    def label(self) -> str:
        return self.spec.label

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, cluster: str, timeout: float, progress: Progress = None) -> None:
        note = progress or (lambda host, phase: None)
        note(self.label, "connecting")
        await asyncio.wait_for(self.transport.connect(), self.spec.connect_timeout + 5)
        note(self.label, "starting engines")
        self.report = await _bootstrap.launch(self.transport, self.spec, cluster=cluster,
                                              key=self.key, engines=self.spec.engines,
                                              timeout=timeout)
        note(self.label, f"ready: {len(self.report.engines)} engine(s)")

    def watch(self) -> None:
        """Start the heartbeat (after the channels are open)."""
        self._spawn(self._heartbeat())

    # -- what a broken stream means -----------------------------------------------------
    def channel_ended(self, ch: EngineChannel, reason: str, *, fatal: bool) -> None:
        if self._closing or ch.state not in ("running",):
            return
        if fatal:
            ch.mark_lost(ch.error(reason))
            return
        ch.suspend()
        if self.state == "recovering":
            return  # the recovery reopens it
        self._spawn(self._diagnose(ch))

    async def _diagnose(self, ch: EngineChannel) -> None:
        if await self._probe(min(5.0, 3 * self.spec.heartbeat_interval)):
            await self._engine_down(ch)
        else:
            self.recover()

    async def _probe(self, timeout: float) -> bool:
        """Whether the host still answers over SSH (a cheap command, bounded)."""
        if not self.transport.is_connected:
            return False
        try:
            result = await asyncio.wait_for(self.transport.run("true", timeout=timeout),
                                            timeout + 1)
        except (SshparError, OSError, asyncio.TimeoutError):
            return False
        return result.exit_status == 0

    async def _engine_down(self, ch: EngineChannel) -> None:
        """The host answers but the engine's stream ended: the engine died."""
        dead_pid = ch.info.pid
        exit_info = await self._read_exit(ch, dead_pid)
        why = exit_info["reason"] if exit_info else "closed its connection"
        ch.fail_pending(EngineError(
            f"{ch.info} died while a task was pending: {why}", engine_id=ch.engine_id,
            host=ch.info.host, reason=why))
        ch.state = "lost"
        log.warning("%s died: %s", ch.info, why)
        if exit_info and exit_info.get("restarting"):
            await self._reopen_restarted(ch)

    async def _reopen_restarted(self, ch: EngineChannel) -> None:
        # The nanny starts a fresh engine on the same socket; connect once it listens.
        deadline = time.monotonic() + RESTART_TIMEOUT
        last: BaseException | None = None
        while time.monotonic() < deadline and not self._closing:
            try:
                await asyncio.wait_for(ch.open(self.key), CHANNEL_TIMEOUT)
                log.warning("%s restarted by its nanny (empty namespace)", ch.info)
                return
            except (SshparError, OSError, EOFError, asyncio.TimeoutError) as exc:
                last = exc
                ch.suspend()
                ch.state = "lost"
                await asyncio.sleep(0.1)
        log.warning("%s did not come back after its restart: %s", ch.info, last)

    async def _read_exit(self, ch: EngineChannel, pid: int) -> dict | None:
        """The nanny's record of how engine ``pid`` ended (it writes it right after reaping
        the engine, so allow it a moment; an older record of an earlier death is skipped)."""
        path = shlex.quote(ch.socket_path[: -len(".sock")] + ".exit")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                result = await self.transport.run(f"cat {path} 2>/dev/null",
                                                  timeout=CONTROL_TIMEOUT)
                record = json.loads(result.stdout) if result.exit_status == 0 else None
            except (SshparError, OSError, ValueError):
                record = None
            if record is not None and record.get("pid") == pid:
                return record
            await asyncio.sleep(0.05)
        return None

    # -- losing and regaining the host ----------------------------------------------------
    def recover(self) -> None:
        if self.state != "recovering" and not self._closing:
            self.state = "recovering"
            self._spawn(self._recover())

    async def _recover(self) -> None:
        for ch in self.channels:
            ch.suspend()
        deadline = time.monotonic() + self.spec.lost_after
        delay, failed, last = 0.05, False, "no answer"
        log.warning("%s: connection lost; reconnecting (grace %g s)", self.label,
                    self.spec.lost_after)
        while not self._closing:
            try:
                await self.transport.close()
                await asyncio.wait_for(self.transport.connect(), self.spec.connect_timeout + 5)
                for ch in self.channels:
                    if ch.state not in ("suspended", "lost"):
                        continue
                    try:
                        await asyncio.wait_for(ch.open(self.key), CHANNEL_TIMEOUT)
                        await ch.resync()
                    except (SshparError, OSError, EOFError, asyncio.TimeoutError) as exc:
                        log.info("%s: cannot reopen (%s)", ch.info, exc)
                        ch.suspend()
                        await self._engine_down(ch)
                self.state = "up"
                log.warning("%s: reconnected", self.label)
                return
            except (SshparError, OSError, asyncio.TimeoutError) as exc:
                last = str(exc) or type(exc).__name__
            if not failed and time.monotonic() >= deadline:
                failed = True
                for ch in self.channels:
                    if ch.state == "suspended":
                        ch.mark_lost(EngineError(
                            f"{ch.info}: host unreachable for {self.spec.lost_after:g} s "
                            f"({last})", engine_id=ch.engine_id, host=ch.info.host,
                            reason=last))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0 if failed else 2.0)

    async def _heartbeat(self) -> None:
        hb = self.spec.heartbeat_interval
        while not self._closing:
            await asyncio.sleep(hb)
            if self.state != "up":
                continue
            now = time.monotonic()
            running = [ch for ch in self.channels if ch.state == "running"]
            for ch in running:
                if now - ch.last_seen > hb:
                    ch.ping()
            silent = [ch for ch in running if now - ch.last_seen > 3 * hb]
            for ch in silent:
                if ch.responsive:
                    log.warning("%s is not answering heartbeats", ch.info)
                ch.responsive = False
            if running and len(silent) == len(running) and not await self._probe(3 * hb):
                self.recover()

    # -- engines ----------------------------------------------------------------------------
    async def launch_one(self, cluster: str, timeout: float) -> _bootstrap.StartedEngine:
        report = await _bootstrap.launch(self.transport, self.spec, cluster=cluster,
                                         key=self.key, engines=1, timeout=timeout)
        return report.engines[0]

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

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(ch.close() for ch in self.channels), return_exceptions=True)
        await self.transport.close()


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
                host = HostSession(spec, make_transport(spec), self.key)
                try:
                    await host.start(self.spec.name, timeout, on_progress)
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
        opened = await asyncio.gather(
            *(asyncio.wait_for(ch.open(self.key), CHANNEL_TIMEOUT) for ch in opening),
            return_exceptions=True)
        failed = [(ch, r) for ch, r in zip(opening, opened) if isinstance(r, BaseException)]
        if failed:
            await self.shutdown()
            ch, exc = failed[0]
            raise EngineError(f"could not open a channel to {ch.info}: "
                              f"{type(exc).__name__}: {exc}", engine_id=ch.engine_id,
                              host=ch.info.host, reason=str(exc)) from exc
        for host in self.hosts:
            host.watch()

    async def attach(self, engines: Sequence[EngineRecord], *, timeout: float) -> None:
        """Reconnect to engines started earlier (from a cluster file). Engines that cannot be
        reached are kept, marked lost; raises only if none can be reached."""
        by_host: dict[int, list[EngineRecord]] = {}
        for rec in engines:
            by_host.setdefault(rec.host, []).append(rec)

        async def attach_host(index: int, recs: list[EngineRecord]) -> None:
            spec = self.spec.hosts[index]
            host = HostSession(spec, make_transport(spec), self.key)
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
            host.watch()

        self.start_errors = {}
        await asyncio.wait_for(
            asyncio.gather(*(attach_host(i, recs) for i, recs in sorted(by_host.items()))),
            timeout)
        self.hosts.sort(key=lambda h: self.spec.hosts.index(h.spec))

    async def replace_engine(self, engine_id: int, *, timeout: float) -> None:
        """Launch a fresh engine on the host of a lost one, under the same id."""
        old = self.engines[engine_id]
        host = old.host
        started = await host.launch_one(self.spec.name, timeout)
        info = EngineInfo(engine_id, host.label, started.pid, started.uuid)
        channel = EngineChannel(host, info, started.socket)
        await asyncio.wait_for(channel.open(self.key), CHANNEL_TIMEOUT)
        host.channels[host.channels.index(old)] = channel
        self.engines[engine_id] = channel

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
        await asyncio.gather(*(host.close() for host in self.hosts), return_exceptions=True)


def _as_host_error(spec: HostSpec, exc: BaseException) -> BaseException:
    if isinstance(exc, SshparError):
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return HostError(spec.label, "timed out while starting engines",
                         hint="raise `connect_timeout:` or check the host's load")
    return HostError(spec.label, f"{type(exc).__name__}: {exc}")


def new_key() -> bytes:
    return os.urandom(32)
