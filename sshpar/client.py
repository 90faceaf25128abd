"""Client: start or reach a cluster of engines and hand out views on them.

Layer: API (top). A synchronous facade over the asyncio core in ``_session``, which runs in
one background loop thread per client.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from . import _clusterfile, _lane
from ._channel import EngineChannel
from ._excepthook import install_excepthook
from ._lane import Lane
from ._loop import LoopThread
from ._session import Cluster, new_key
from .asyncresult import AsyncResult, TaskRecord, keep_running_note, resolve
from .config import ClusterSpec, load_hosts
from .errors import ConfigError, EngineError, EngineInfo, NoEnginesError
from .view import DirectView, Targets

log = logging.getLogger("sshpar.client")

DEFAULT_START_TIMEOUT = 120.0
#: Engine states that accept work (a suspended one is reconnecting; work waits for it).
_USABLE = ("running", "suspended")


class Client:
    """A connection to a cluster of engines.

    Args:
        url_file: a cluster file written by ``sshpar start`` (or by an earlier Client).
        hosts: a hosts file (path) or a :class:`~sshpar.config.ClusterSpec`; its engines are
            started over SSH (or locally, for ``transport: local``).
        cluster: name of a running cluster (``profile=`` is an alias).
        timeout: seconds allowed for connecting and starting every host.
        allow_partial: start what can be started and report the rest in
            ``start_errors`` instead of failing.

    >>> rc = Client(hosts="hosts.yaml")
    >>> rc.ids
    [0, 1, 2, 3]
    """

    def __init__(self, url_file: str | os.PathLike | None = None, *,
                 hosts: str | os.PathLike | ClusterSpec | None = None,
                 cluster: str | None = None, profile: str | None = None,
                 timeout: float = DEFAULT_START_TIMEOUT, allow_partial: bool = False,
                 on_progress: Callable[[str, str], None] | None = None) -> None:
        self._closed = True
        #: True when Client(hosts=...) found the cluster already running and attached to it.
        self.reused = False
        self._cluster: Cluster
        self.spec: ClusterSpec
        # Every result by msg_id while someone holds it; results not yet handed to the user
        # (by get()) are also held here, so a dropped AsyncResult can still be fetched.
        self._results: weakref.WeakValueDictionary[str, AsyncResult] = \
            weakref.WeakValueDictionary()
        self._unclaimed: dict[str, AsyncResult] = {}
        #: msg_ids of every task this client submitted, oldest first (as in ipyparallel)
        self.history: list[str] = []
        self._id_prefix = uuid.uuid4().hex[:16] + "-"
        self._ids = itertools.count(1)
        self._io = LoopThread()
        try:
            if hosts is not None:
                spec = hosts if isinstance(hosts, ClusterSpec) else load_hosts(hosts)
                self._start_or_reuse(spec, timeout, allow_partial, on_progress)
            else:
                name = cluster if cluster is not None else profile
                record = (_clusterfile.load(url_file) if url_file is not None
                          else _clusterfile.load_named(name))
                self._attach(record, timeout)
        except BaseException:
            self._io.stop()
            raise
        self._closed = False
        install_excepthook()  # rich loads only when there is a RemoteError to print
        self.start_errors: dict[str, BaseException] = dict(self._cluster.start_errors)
        # At interpreter exit, disconnect cleanly (engines keep running, as with close()).
        ref = weakref.ref(self)
        def close_at_exit() -> None:
            client = ref()
            if client is not None:
                client.close()

        self._atexit = close_at_exit
        atexit.register(close_at_exit)

    def _start_or_reuse(self, spec: ClusterSpec, timeout: float, allow_partial: bool,
                        on_progress: Callable[[str, str], None] | None) -> None:
        path = _clusterfile.path_for(spec.name)
        if path.exists():
            record = _clusterfile.load(path)
            self._attach(record, timeout)
            alive = bool(self.ids)
            if alive and record.hosts == spec.hosts:
                log.info("reusing running cluster %r (%d engines)", spec.name, len(self.ids))
                self.reused = True
                return
            self._io.run(self._cluster.close(), 30, what="closing connections")
            if alive:
                raise ConfigError(
                    f"cluster {spec.name!r} is already running with other hosts or settings; "
                    f"stop it first (`sshpar stop {spec.name}`) or give this one another "
                    "`name:`", file=spec.source, key="name")
        self.spec = spec
        self._cluster = Cluster(spec, new_key())
        self._io.run(self._cluster.start(timeout=timeout, allow_partial=allow_partial,
                                         on_progress=on_progress),
                     timeout + 10, what=f"starting cluster {spec.name!r}")
        _clusterfile.save(self._cluster.record(created=_clusterfile.now()))

    def _attach(self, record: _clusterfile.ClusterRecord, timeout: float) -> None:
        self.spec = record.spec
        self._cluster = Cluster(record.spec, record.key)
        self._io.run(self._cluster.attach(record.engines, timeout=timeout), timeout + 10,
                     what=f"connecting to cluster {record.name!r}")
        if not any(ch.state == "running" for ch in self._cluster.engines.values()):
            errors = "; ".join(str(e) for e in self._cluster.start_errors.values())
            if errors and len(self._cluster.start_errors) == len(self._cluster.hosts):
                log.info("cluster %r unreachable: %s", record.name, errors)

    # -- engines ----------------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """Ids of the engines that are up, in order."""
        return [i for i, ch in sorted(self._cluster.engines.items())
                if ch.state in _USABLE]

    @property
    def engine_info(self) -> dict[int, EngineInfo]:
        """Every engine this client knows (running or not): id, host, pid, uuid."""
        return {i: ch.info for i, ch in sorted(self._cluster.engines.items())}

    def engine_status(self, timeout: float = 10.0) -> dict[int, dict[str, Any]]:
        """Each engine's state as the engine reports it, asked now.

        Keys: id, host, pid, uuid, state ("idle", "busy", "unresponsive" — not answering
        heartbeats, "reconnecting" — its host's connection is being rebuilt, "lost"), and
        for engines that answer: queued, done, unacked, clients, uptime (s), python
        ("3.11.7"), executable, bulk_mac ("poly1305" where the engine's Python has
        ``cryptography``, else "hmac-sha256": how frames over 64 KiB are signed).
        """
        return self._io.run(self._status(timeout), timeout + 5, what="asking engines")

    async def _status(self, timeout: float) -> dict[int, dict[str, Any]]:
        import asyncio

        channels = sorted(self._cluster.engines.values(), key=lambda c: c.engine_id)

        async def one(ch: EngineChannel) -> dict[str, Any]:
            row: dict[str, Any] = {"id": ch.engine_id, "host": ch.info.host, "pid": ch.info.pid,
                                   "uuid": ch.info.uuid,
                                   "state": "reconnecting" if ch.state == "suspended"
                                   else "lost"}
            if ch.state != "running":
                return row
            if not ch.responsive:
                row["state"] = "unresponsive"
                return row
            try:
                info = await ch.request("info", timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - reported as the engine's state
                row["error"] = str(exc)
                return row
            row.update(state="busy" if info["busy"] else "idle", queued=info["queued"],
                       done=info["done"], unacked=info["unacked"], clients=info["clients"],
                       uptime=max(0.0, info["time"] - info["started"]),
                       python=".".join(map(str, info["python"])),
                       executable=info["executable"],
                       bulk_mac="poly1305" if ch.bulk_mac else "hmac-sha256")
            return row

        rows = await asyncio.gather(*(one(ch) for ch in channels))
        return {row["id"]: row for row in rows}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: Targets) -> DirectView:
        """``rc[0]`` (one engine), ``rc[:]``, ``rc[1:3]``, ``rc[[0, 2]]`` (several)."""
        self._resolve_targets(key)
        return DirectView(self, key)

    def direct_view(self, targets: Targets = "all") -> DirectView:
        return DirectView(self, targets)

    def _resolve_targets(self, targets: Targets) -> tuple[list[int], bool]:
        if isinstance(targets, bool):
            raise TypeError(f"targets must be an engine id, a list, a slice or 'all', "
                            f"not {targets!r}")
        if isinstance(targets, int):
            if targets < 0:
                ids = self.ids
                targets = ids[targets] if -len(ids) <= targets else targets
            self._check_ids((targets,))
            return [targets], True
        ids = self.ids
        if targets is None or targets == "all":
            if not ids:
                raise NoEnginesError(self._no_engines())
            return ids, False
        if isinstance(targets, slice):
            chosen = ids[targets]
            if not chosen:
                raise NoEnginesError(f"slice {targets} selects no engines; engines: {ids}")
            return chosen, False
        if isinstance(targets, str):
            raise TypeError(f"targets must be an engine id, a list, a slice or 'all', "
                            f"not {targets!r}")
        chosen = [int(t) for t in targets]
        self._check_ids(chosen)
        return chosen, False

    def _check_ids(self, chosen: Sequence[int]) -> None:
        engines = self._cluster.engines
        for t in chosen:
            if t not in engines:
                raise IndexError(f"no engine {t}: this client has engines {self.ids}")
            if engines[t].state not in _USABLE:
                raise NoEnginesError(f"engine {t} is {engines[t].state}; running engines: "
                                     f"{self.ids}")

    def _no_engines(self) -> str:
        return (f"no engines are running in cluster {self.spec.name!r}"
                if not self._closed else "this client is closed")

    # -- submitting -------------------------------------------------------------------------
    def _submit(self, ids: Sequence[int], single: bool, payloads: Sequence[list], *,
                fname: str, postprocess: Any = None,
                result_class: type[AsyncResult] = AsyncResult,
                code_files: set[str] | frozenset[str] = frozenset(),
                limit: float | None = None, block: bool = False) -> Any:
        """Send one task per engine (``payloads[i]`` to ``ids[i]``); return the AsyncResult,
        or with ``block`` wait and return the result itself.

        A blocking call to engines that are idle and have a direct lane is run by the calling
        thread itself (see _lane.py), and its value comes straight from the task records: no
        AsyncResult is made unless the call cannot finish there.
        """
        if self._closed:
            raise NoEnginesError("this client is closed")
        now = time.time()
        channels: list[EngineChannel] = []
        records: list[TaskRecord] = []
        items = []
        for eid, payload in zip(ids, payloads):
            ch = self._cluster.engines[eid]
            # unique across clients (random prefix) and cheap (a counter)
            rec = TaskRecord(f"{self._id_prefix}{next(self._ids):x}", ch.info, now)
            self.history.append(rec.msg_id)
            meta: dict[str, Any] = {"msg_id": rec.msg_id}
            if limit:
                meta["timeout"] = float(limit)
            sources = ch.sources_for(code_files) if code_files else None
            if sources:
                meta["sources"] = sources
            channels.append(ch)
            records.append(rec)
            items.append((rec, meta, payload))
        def tracked() -> AsyncResult:
            ar = result_class(records, single=single, fname=fname, postprocess=postprocess)
            ar._client = self
            for rec in records:
                self._results[rec.msg_id] = ar
                self._unclaimed[rec.msg_id] = ar
            return ar

        lanes = self._lanes(channels) if block else None
        if lanes is None:
            ar = tracked()
            for ch, item in zip(channels, items):
                ch.submit(*item)
            return ar.get() if block else ar
        try:
            _lane.call(lanes, items)
        except BaseException as exc:
            tracked()  # still to be had: rc.get_result(msg_id)
            keep_running_note(exc, [rec.msg_id for rec in records])
            raise
        for rec in records:
            if not rec.done:  # a lane broke: the rest comes through the channel
                return tracked().get()
        ok, value = resolve(records, single=single, fname=fname, postprocess=postprocess)
        if not ok:
            raise value
        return value

    @staticmethod
    def _lanes(channels: Sequence[EngineChannel]) -> list[Lane] | None:
        """A locked direct lane for every channel (distinct engines), or None."""
        lanes: list[Lane] = []
        if len(set(channels)) == len(channels):
            for ch in channels:
                lane = ch.lane()
                if lane is None:
                    break
                lanes.append(lane)
            else:
                return lanes
        for lane in lanes:
            lane.lock.release()
        return None

    def wait(self, jobs: Sequence[AsyncResult] | None = None,
             timeout: float | None = None) -> bool:
        """Wait for ``jobs`` (default: everything submitted through this client).

        Returns whether all finished within ``timeout`` seconds (None: wait forever).
        """
        pending = list(jobs) if jobs is not None else list(set(self._results.values()))
        deadline = None if timeout is None else time.monotonic() + timeout
        for ar in pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not ar.wait(left):
                return False
        return True

    def _claimed(self, ar: AsyncResult) -> None:
        for msg_id in ar.msg_ids:
            self._unclaimed.pop(msg_id, None)

    def _control(self, ids: Sequence[int], op: str, **kw: Any) -> list[dict]:
        import asyncio

        async def ask() -> list[dict]:
            chans = [self._cluster.engines[i] for i in ids]
            return list(await asyncio.gather(*(ch.request(op, **kw) for ch in chans)))

        return self._io.run(ask(), 30, what=op)

    def _abort(self, ids: Sequence[int], msg_ids: Sequence[str]) -> None:
        if not msg_ids:  # everything this client still waits for on these engines
            msg_ids = [m for i in ids for m in self._cluster.engines[i].pending]
        if msg_ids:
            self._control(ids, "abort", msg_ids=list(msg_ids))

    def restart_engine(self, engine_id: int, timeout: float = 60.0) -> None:
        """Start a fresh engine (empty namespace) with the id of a lost one."""
        ch = self._cluster.engines[engine_id]
        if ch.state in _USABLE:
            raise ValueError(f"engine {engine_id} is {ch.state}; shut it down or wait")
        self._io.run(self._cluster.replace_engine(engine_id, timeout=timeout), timeout + 10,
                     what=f"restarting engine {engine_id}")
        _clusterfile.save(self._cluster.record(created=_clusterfile.now()))

    def get_result(self, msg_id: str, *, block: bool = False,
                   timeout: float | None = None) -> AsyncResult | Any:
        """The AsyncResult of a task submitted earlier, by this or any earlier client.

        Results stay on the engine until a client has received them, so a task that finished
        while no client was connected can be fetched here.

        Raises:
            KeyError: no engine knows ``msg_id``.
        """
        ar = self._results.get(msg_id)
        if ar is not None and ar.done() and any(
                isinstance(rec.failure, EngineError) for rec in ar._records):
            ar = None  # it failed for want of its engine; the engine may have it by now
        if ar is None:
            ar = self._io.run(self._fetch(msg_id), 30, what=f"fetching {msg_id}")
            self._results[msg_id] = ar
        return ar.get(timeout) if block else ar

    async def _fetch(self, msg_id: str) -> AsyncResult:
        for ch in self._cluster.engines.values():
            if ch.state != "running":
                continue
            rec = TaskRecord(msg_id, ch.info, time.time())
            if await ch.fetch(rec) != "unknown":
                return AsyncResult([rec], single=True, fname="get_result")
        lost = [str(ch.info) for ch in self._cluster.engines.values() if ch.state != "running"]
        extra = f" (unreachable: {', '.join(lost)})" if lost else ""
        raise KeyError(f"no engine has a task {msg_id!r}{extra}")

    # -- lifecycle --------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every engine this client reaches, remove their sockets, and close."""
        self._end(self._cluster.shutdown, 60, "shutting down engines", forget=True)

    def close(self) -> None:
        """Disconnect, leaving engines running (they keep their namespaces)."""
        self._end(self._cluster.close, 30, "closing connections", forget=False)

    def _end(self, how: Any, timeout: float, what: str, *, forget: bool) -> None:
        if self._closed:
            return
        atexit.unregister(self._atexit)
        try:
            self._io.run(how(), timeout, what=what)
            if forget:  # the engines are gone: so is the cluster file
                _clusterfile.remove(self.spec.name)
        finally:
            self._closed = True
            self._io.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.ids)} engines"
        return f"<sshpar.Client {self.spec.name!r}: {state}>"
