"""One engine as the client sees it: a framed stream, the tasks it owes us, control requests.

Layer: core. Imports errors, _wire, _bootstrap, _transport and asyncresult (records).
Runs in the loop thread, except ``submit``/``sources_for``, which are thread-safe.

A channel outlives its stream: when the stream breaks it is *suspended* (its pending tasks
kept), and after the host reconnects it is reopened and *resynced*: the engine is asked for
every pending task, finished results are sent again, and tasks it never received are resent
(so each runs exactly once). Only the host session decides that an engine is lost.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import linecache
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _bootstrap, _wire
from ._lane import ACK_AT_ONCE, Lane
from ._stream import FrameSender, FunctionRefs, client_handshake, read_frames
from ._transport import ForwardingRefused, PushReader
from .asyncresult import TaskRecord
from .errors import EngineError, EngineInfo, ProtocolError, SshparError
from .errors import TimeoutError as SshparTimeoutError

if TYPE_CHECKING:
    from ._session import HostSession

log = logging.getLogger("sshpar.channel")

CONTROL_TIMEOUT = 10.0
#: Tasks up to BATCH_ITEM bytes travel in batch frames of up to BATCH_TASKS / BATCH_BYTES.
BATCH_ITEM = 16 * 1024
BATCH_TASKS = 256
BATCH_BYTES = 256 * 1024
#: After a direct lane could not be opened, the channel serves blocking calls this long.
LANE_RETRY = 5.0
LANE_ATTEMPTS = 3
#: Results are acknowledged at most this late (seconds), or once this many are waiting.
ACK_DELAY = 0.05
ACK_BATCH = 1024


class EngineChannel:
    """One engine. States: starting, running, suspended, lost, stopping, stopped, closed."""

    def __init__(self, host: HostSession, info: EngineInfo, socket_path: str) -> None:
        self.host = host
        self.info = info
        self.socket_path = socket_path
        self.pending: dict[str, TaskRecord] = {}
        self.clock_offset = 0.0
        self.remote: dict = {}
        self.state = "starting"
        self.responsive = True
        self.last_seen = time.monotonic()
        self._outbox: collections.deque[tuple[TaskRecord, dict, list]] = collections.deque()
        self._wakeup = False
        self._acks: list[str] = []
        self._ack_timer: asyncio.TimerHandle | None = None
        self._requests: dict[int, asyncio.Future] = {}
        self._req = 0
        self._sender: FrameSender | None = None
        self._writer: Any = None
        self._reader_task: asyncio.Task | None = None   # the pump, for non-push streams
        self._stream: object | None = None               # identifies the current stream
        self._closed: asyncio.Future | None = None       # done when that stream ends
        self._sent_sources: dict[str, tuple[list[str], int]] = {}
        self._refs = FunctionRefs()                # functions the engine keeps (this stream)
        self._lane: Lane | None = None
        self.bulk_mac = False  # this stream signs frames over 64 KiB with Poly1305
        self._lane_opening = threading.Lock()
        self._lane_retry_at = 0.0
        self._lane_failures = 0
        self.loop = asyncio.get_running_loop()

    @property
    def engine_id(self) -> int:
        return self.info.engine_id

    def __repr__(self) -> str:
        return f"<EngineChannel {self.info} {self.state}>"

    # -- opening ----------------------------------------------------------------------------
    async def open(self, key: bytes) -> None:
        """Connect to the engine's socket (or a relay), prove the key, read its greeting."""
        transport = self.host.transport
        relayed = False
        try:
            if not transport.supports_unix_streams:
                raise ForwardingRefused("this backend cannot forward to Unix sockets")
            reader, writer = await transport.open_unix(self.socket_path)
        except ForwardingRefused as exc:
            log.debug("%s: %s; relaying through an exec channel", self.host.label, exc)
            cmd = _bootstrap.python_command(self.host.spec, _bootstrap.build_bundle(),
                                            "relay", self.socket_path)
            reader, writer = await transport.open_exec(cmd)
            relayed = transport.supports_unix_streams
        self._writer = writer
        sent = time.time()
        codec = await client_handshake(reader, writer, key)
        if relayed:  # the relay reached the engine where forwarding did not: it is refused
            transport.note_forwarding_refused()
        parser = _wire.FrameParser(codec)
        frames: list[_wire.Frame] = []
        while not frames:
            frames = await read_frames(reader, parser)
        hello = frames.pop(0)
        now = time.time()
        if hello.kind is not _wire.Kind.REPLY or hello.meta.get("op") != "hello":
            raise ProtocolError(f"engine {self.engine_id} did not greet as expected")
        self.remote = hello.meta
        if hello.meta.get("pid") != self.info.pid:  # restarted by its nanny: a new process
            self.info = dataclasses.replace(self.info, pid=hello.meta["pid"])
        self.clock_offset = hello.meta["time"] - (sent + now) / 2
        self._sender = FrameSender(codec, writer)
        self.bulk_mac = codec.bulk_mac
        self._sent_sources.clear()
        self._refs = FunctionRefs()
        self.state = "running"
        self.responsive = True
        self.last_seen = time.monotonic()
        stream = self._stream = object()
        self._closed = self.loop.create_future()

        def on_data(data: bytes) -> None:
            self._on_data(stream, parser, data)

        def on_end(exc: BaseException | None) -> None:
            self._on_end(stream, exc)

        for frame in frames:
            self._receive(frame)
        if isinstance(reader, PushReader):  # bytes go straight to the parser
            reader.divert(on_data, on_end)
        else:
            self._reader_task = asyncio.ensure_future(self._pump(reader, on_data, on_end))

    async def resync(self, msg_ids: list[str] | None = None) -> None:
        """After reopening: have the engine account for every task we still wait for (or
        for ``msg_ids``)."""
        ids = list(self.pending) if msg_ids is None else msg_ids
        if not ids:
            return
        reply = await self.request("fetch", msg_ids=ids)
        for msg_id, where in reply["found"].items():
            rec = self.pending.get(msg_id)
            if rec is None or where != "unknown":
                continue
            if rec.request is None:
                self.pending.pop(msg_id, None)
                rec.fail(self.error("lost the task in transit"), time.time())
            else:  # never arrived: it has not run, so sending it again runs it once
                meta, payload = rec.request
                self._send_task(rec, meta, payload)
        self._flush_sender()

    # -- submitting (any thread) ------------------------------------------------------------
    def sources_for(self, files: set[str] | frozenset[str]) -> dict[str, str]:
        """Source text of ``files`` this engine has not been sent yet (for tracebacks of
        functions sent by value: the engine may not have the file, or another version)."""
        out = {}
        for name in files:
            lines = linecache.getlines(name)
            if not lines:
                continue
            sent = self._sent_sources.get(name)
            if sent is not None and sent[0] is lines:  # linecache kept it: unchanged
                continue
            text = "".join(lines)
            digest = hash(text)
            if sent is None or sent[1] != digest:
                out[name] = text
            self._sent_sources[name] = (lines, digest)
        return out

    def submit(self, rec: TaskRecord, meta: dict, payload: list) -> None:
        self._outbox.append((rec, meta, payload))
        if not self._wakeup:
            self._wakeup = True
            self.loop.call_soon_threadsafe(self._flush_outbox)

    def _flush_outbox(self) -> None:
        """Send what the caller threads queued: small tasks in batch frames (one header,
        MAC and envelope for many), a large one in a frame of its own, in order."""
        self._wakeup = False
        batch: list[tuple[dict, list]] = []
        size = 0
        while self._outbox:
            rec, meta, payload = self._outbox[0]
            if self.state not in ("running", "suspended"):
                self._outbox.popleft()
                rec.fail(self.error(f"is {self.state}"), time.time())
                continue
            self._track(rec, meta, payload)  # pending before it leaves the outbox: see lane()
            self._outbox.popleft()
            if self.state == "suspended":  # sent once the host is back (or failed if not)
                continue
            meta, payload = self._refs.compact(meta, payload)
            n = _wire.payload_size(payload)
            if n > BATCH_ITEM:
                self._send_frame(*self._batched(batch))
                batch, size = [], 0
                self._send_frame(meta, payload)
                continue
            batch.append((meta, payload))
            size += n
            if len(batch) >= BATCH_TASKS or size >= BATCH_BYTES:
                self._send_frame(*self._batched(batch))
                batch, size = [], 0
        self._send_frame(*self._batched(batch))
        self._flush_sender()

    @staticmethod
    def _batched(batch: list[tuple[dict, list]]) -> tuple[dict | None, list]:
        if len(batch) > 1:
            return _wire.join_batch(batch)
        return batch[0] if batch else (None, [])

    def _track(self, rec: TaskRecord, meta: dict, payload: list) -> None:
        """Wait for ``rec``'s result, keeping the request to resend after a reconnect."""
        rec.request = (meta, payload)
        self.pending[rec.msg_id] = rec

    def _send_task(self, rec: TaskRecord, meta: dict, payload: list) -> None:
        self._track(rec, meta, payload)
        self._send_frame(*self._refs.compact(meta, payload))

    def _send_frame(self, meta: dict | None, payload: list) -> None:
        """One TASK frame (deferred: written by _flush_sender), acknowledgements riding on it."""
        if meta is None:
            return
        if self._acks:  # acknowledgements ride along with work, saving a frame
            meta = dict(meta, ack=self._acks)
            self._acks = []
        assert self._sender is not None
        try:
            self._sender.send(_wire.Kind.TASK, meta, payload, defer=True)
        except Exception as exc:  # noqa: BLE001 - the reader notices the broken stream
            log.info("%s: send failed (%s); kept for resending", self.info, exc)

    def _flush_sender(self) -> None:
        if self._sender is not None:
            try:
                self._sender.flush_small()
            except Exception as exc:  # noqa: BLE001 - the reader notices the broken stream
                log.info("%s: write failed (%s)", self.info, exc)

    # -- the direct lane (see _lane.py) -------------------------------------------------------
    def lane(self) -> Lane | None:
        """For a blocking call (any thread): this engine's lane, locked for the caller, if
        the engine is reachable directly and has nothing else pending from us; else None."""
        if self.state != "running" or self.pending or self._outbox:
            return None
        lane = self._lane
        if lane is None:
            lane = self._open_lane()
            if lane is None:
                return None
        if not lane.lock.acquire(blocking=False):
            return None
        if lane.closed or lane is not self._lane:
            lane.lock.release()
            return None
        return lane

    def _open_lane(self) -> Lane | None:
        if time.monotonic() < self._lane_retry_at:
            return None
        path = self.host.transport.local_path(self.socket_path,
                                              [ch.socket_path for ch in self.host.channels])
        if path is None:
            return None
        with self._lane_opening:
            if self._lane is None and time.monotonic() >= self._lane_retry_at:
                try:
                    self._lane = Lane.connect(self, path, self.host.key,
                                              local=self.host.transport.on_this_machine)
                except Exception as exc:  # noqa: BLE001 - the channel serves instead
                    self._lane_failures += 1
                    wait = LANE_RETRY if self._lane_failures < LANE_ATTEMPTS else float("inf")
                    log.info("%s: no direct lane (%s); %s", self.info, exc,
                             f"trying again in {wait:g} s" if wait < float("inf")
                             else "blocking calls go through the channel")
                    self._lane_retry_at = time.monotonic() + wait
            return self._lane

    def adopt_lane(self, lane: Lane) -> None:
        """Loop thread: a call could not finish on ``lane``. Take its tasks over, let the
        engine close the lane (so it has read all we sent), then fetch what is missing."""
        if self._lane is lane:
            self._lane = None
        recs = [rec for rec in lane.unfinished() if not rec.done]
        for rec in recs:
            self.pending[rec.msg_id] = rec
        self._queue_acks(lane.take_acks())
        if self.state not in ("running", "suspended"):
            lane.close()
            self._settle_lane(recs)
            return
        try:
            lane.sock.shutdown(socket.SHUT_WR)
            lane.sock.setblocking(False)
            self.loop.add_reader(lane.sock.fileno(), self._drain_lane, lane, recs)
        except (OSError, ValueError):
            lane.close()
            self._settle_lane(recs)

    def _drain_lane(self, lane: Lane, recs: list[TaskRecord]) -> None:
        try:
            n, frames = lane.parser.receive(lane.sock, lane.scratch)
            for frame in frames:
                self._receive(frame)
            if n:
                return
        except BlockingIOError:
            return
        except ProtocolError as exc:
            log.error("%s: bad frame on a direct lane: %s", self.info, exc)
        except OSError:
            pass
        self.loop.remove_reader(lane.sock.fileno())
        lane.close()
        self._settle_lane(recs)

    def _settle_lane(self, recs: list[TaskRecord]) -> None:
        """Tasks from a closed lane, or whose large results a lane left to us, that are still
        pending: fetched (or resent if the engine never had them and they may run) while the
        channel runs; after a reconnect the resync covers them."""
        ids = [rec.msg_id for rec in recs if self.pending.get(rec.msg_id) is rec]
        if not ids:
            return
        if self.state == "running":
            asyncio.ensure_future(self._refetch(ids))
        elif self.state != "suspended":
            for msg_id in ids:
                self.pending.pop(msg_id).fail(self.error(f"is {self.state}"), time.time())

    async def _refetch(self, ids: list[str]) -> None:
        try:
            await self.resync(ids)
            self._flush_sender()
        except SshparError as exc:  # the channel broke too: its own recovery covers them
            log.info("%s: fetching after a lane closed failed: %s", self.info, exc)

    def fetch_moved(self, recs: list[TaskRecord]) -> None:
        """Loop thread: large results of lane calls, to be fetched over this channel."""
        for rec in recs:
            self.pending[rec.msg_id] = rec
        self._settle_lane(recs)

    def _close_lane(self) -> None:
        lane, self._lane = self._lane, None
        if lane is not None:
            lane.close()

    # -- control ----------------------------------------------------------------------------
    async def request(self, op: str, timeout: float = CONTROL_TIMEOUT, **kw: Any) -> dict:
        """Send a CONTROL frame and wait for the engine's REPLY."""
        if self._sender is None or self.state not in ("running", "stopping"):
            raise self.error(f"is {self.state}")
        self._req += 1
        req = self._req
        fut = self.loop.create_future()
        self._requests[req] = fut
        self._sender.send(_wire.Kind.CONTROL, {"op": op, "req": req, **kw})
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise SshparTimeoutError(f"{self.info} did not answer {op!r} within "
                                     f"{timeout:g} s") from None
        finally:
            self._requests.pop(req, None)

    def ping(self) -> None:
        if self._sender is not None and self.state == "running":
            try:
                self._sender.send(_wire.Kind.CONTROL, {"op": "ping"})
            except Exception:  # noqa: BLE001 - the reader notices
                pass

    async def fetch(self, rec: TaskRecord) -> str:
        """Ask for a task's result: "done" (on its way), "pending" or "unknown"."""
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
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        acks, self._acks = self._acks, []
        if acks and self._sender is not None and self.state == "running":
            try:
                self._sender.send(_wire.Kind.CONTROL, {"op": "ack", "msg_ids": acks})
            except Exception:  # noqa: BLE001 - unacked results stay on the engine; harmless
                pass

    # -- receiving --------------------------------------------------------------------------
    @staticmethod
    async def _pump(reader: Any, on_data: Any, on_end: Any) -> None:
        """For streams that cannot push: read and hand over, as a PushReader would."""
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    break
                on_data(data)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - reported as the stream's end
            on_end(exc)
            return
        on_end(None)

    def _on_data(self, stream: object, parser: _wire.FrameParser, data: bytes) -> None:
        if stream is not self._stream:
            return
        try:
            frames = parser.feed(data)
            self.last_seen = time.monotonic()
            self.responsive = True
            for frame in frames:
                self._receive(frame)
        except ProtocolError as exc:
            reason = f"sent a bad frame: {exc}"
            log.error("%s: %s", self.info, reason)
            self._stream_ended(stream, reason, fatal=True)
        except Exception as exc:  # noqa: BLE001 - never into the transport's callback
            log.exception("%s: failed to handle a frame", self.info)
            self._stream_ended(stream, f"channel broke: {type(exc).__name__}: {exc}")

    def _on_end(self, stream: object, exc: BaseException | None) -> None:
        if exc is None or isinstance(exc, (EOFError, asyncio.IncompleteReadError)):
            reason = "closed the connection"
        elif isinstance(exc, (ConnectionError, OSError)):
            reason = f"closed the connection ({type(exc).__name__})"
        else:  # e.g. the SSH library's ConnectionLost
            reason = f"channel broke: {type(exc).__name__}: {exc}"
            log.info("%s: %s", self.info, reason)
        self._stream_ended(stream, reason)

    def _stream_ended(self, stream: object, reason: str, *, fatal: bool = False) -> None:
        if stream is not self._stream:
            return
        self._reader_task = None
        self._drop_stream(reason)
        self.host.channel_ended(self, reason, fatal=fatal)

    def _receive(self, frame: _wire.Frame) -> None:
        kind, meta = frame.kind, frame.meta
        if kind is _wire.Kind.RESULT:
            for m, p in _wire.items(meta, frame.payload):
                self._result(m, p)
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

    def ack_now(self, ids: list[str]) -> None:
        """Acknowledge results now (loop thread): large ones a lane took."""
        self._acks.extend(ids)
        self._send_acks()

    def _queue_acks(self, ids: list[str]) -> None:
        if not ids:
            return
        if self._ack_timer is None:  # one timer at a time, not one per result
            self._ack_timer = self.loop.call_later(ACK_DELAY, self._send_acks)
        self._acks.extend(ids)
        if len(self._acks) >= ACK_BATCH:
            self._send_acks()

    def _result(self, meta: dict, payload: list) -> None:
        msg_id = meta["msg_id"]
        if meta.get("status") == "moved":  # a lane's large result, drained here: fetch it
            rec = self.pending.get(msg_id)
            if rec is not None:
                rec.request = None
                self._settle_lane([rec])
            return
        rec = self.pending.pop(msg_id, None)
        # Results stay on the engine until acknowledged; acks are batched (or ride on
        # the next task), since each frame costs a packet or two over SSH.
        self._queue_acks([msg_id])
        if _wire.payload_size(payload) >= ACK_AT_ONCE:
            self._send_acks()  # the engine holds a large result until acknowledged
        if rec is not None:
            rec.finish(meta, payload, time.time(), self.clock_offset)

    # -- states -----------------------------------------------------------------------------
    def error(self, what: str) -> EngineError:
        return EngineError(f"{self.info} {what}", engine_id=self.engine_id,
                           host=self.info.host, reason=what)

    def _drop_stream(self, reason: str) -> None:
        self._stream = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        self._sender = None
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001
                pass
            self._writer = None
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(self.error(reason))
        self._requests.clear()

    def suspend(self) -> None:
        """The stream is gone but the engine may not be: keep pending tasks for a resync."""
        self._close_lane()
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        self._drop_stream("connection suspended")
        if self.state == "running":
            self.state = "suspended"

    def fail_pending(self, error: BaseException) -> None:
        now = time.time()
        pending, self.pending = self.pending, {}
        for rec in pending.values():
            rec.fail(error, now)

    def mark_lost(self, error: BaseException) -> None:
        self.suspend()
        self.state = "lost"
        self.fail_pending(error)

    async def close(self) -> None:
        state = self.state
        self.suspend()
        self.state = "stopped" if state == "stopping" else "closed"
        # whoever still waits must not wait forever; the engine keeps the tasks
        self.fail_pending(self.error(
            "was closed by this client; its tasks keep running there: fetch their results "
            "from a new Client with get_result(msg_id)" if self.state == "closed"
            else "was stopped"))

    async def shutdown(self) -> bool:
        """Ask the engine to exit; True once its stream has closed (the process is gone)."""
        if self.state != "running":
            return False
        self.state = "stopping"
        closed = self._closed
        try:
            await self.request("shutdown", timeout=CONTROL_TIMEOUT)
        except SshparError:
            return False
        if closed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(closed), CONTROL_TIMEOUT)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                return False
        return True
