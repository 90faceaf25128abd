"""A direct lane to one engine: blocking calls made by the calling thread itself.

Layer: core (client only). Imports _wire, _stream and errors; the channel owns its lane.

A round trip through the IO thread wakes four threads in turn (caller -> IO thread -> engine
-> IO thread -> caller), and on a small machine each wake-up costs about as much as the work.
Where an engine's socket is reachable as a plain Unix socket on this machine (the local
transport's own socket; over SSH, the local end of an OpenSSH forwarder, see
``_transport/openssh.py``), a blocking call to idle engines (``apply_sync``, ``execute``,
``push``/``pull`` with ``block=True``) goes over a second connection instead, which the
calling thread writes and reads itself: caller -> engine -> caller.

The engine sees one more client; nothing changes there. The lane is used only when its
engine has nothing else pending from this client (so tasks still run in the order they were
submitted), and by one thread at a time. If a call cannot finish on the lane (the caller is
interrupted, or the lane breaks), the lane is handed to the IO thread (:meth:`EngineChannel.
adopt_lane`), which takes whatever results still arrive on it, waits for the engine to close
it, and fetches the rest over the channel: nothing is lost or run twice.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import _wire
from ._stream import FunctionRefs
from .errors import ProtocolError

if TYPE_CHECKING:
    from ._channel import EngineChannel
    from .asyncresult import TaskRecord

#: A waiting call looks at its channel's state this often (seconds): a lost engine or a
#: closed client ends the wait even if the socket says nothing.
LANE_POLL_MS = 250
#: A waiting call first looks for its result without sleeping, this long (seconds), if the
#: last answer came within twice that: waking a sleeping thread costs tens of microseconds on
#: a virtual machine, as much as a call. Answers over a real network take longer: no spinning.
LANE_SPIN = 400e-6
#: Connecting and the handshake must finish within this (seconds).
LANE_CONNECT_TIMEOUT = 5.0
_RECV = 1 << 18
_WRITE = 1 << 18  # signed and written in pieces this large
#: A result at least this large is acknowledged at once (the engine holds it until then);
#: smaller ones ride on the next call.
ACK_AT_ONCE = 64 * 1024


class LaneBroken(Exception):
    """The lane cannot be used any more (closed, or the engine went away)."""


class Lane:
    """A second connection to one engine, used by one calling thread at a time (``lock``)."""

    def __init__(self, channel: EngineChannel, sock: socket.socket, codec: _wire.Codec,
                 parser: _wire.FrameParser, *, local: bool) -> None:
        self.channel = channel
        # What every call asks of the engine: on this machine, to look for the next call
        # before it sleeps (its SPIN); through an SSH forwarder, to send a large result over
        # the main connection (on a small machine the forwarder is one busy process too
        # many for bulk data, measured).
        self._asks = {"spin": True} if local else {"move_large": True}
        self.sock = sock
        self.codec = codec
        self.parser = parser
        self.lock = threading.Lock()     # held by the thread using the lane
        self.closed = False
        self._refs = FunctionRefs()
        self._acks: list[str] = []       # results taken; acknowledged with the next call
        self._ack_now = False
        self._waiting: dict[str, TaskRecord] = {}
        self._moved: list[TaskRecord] = []  # large results the channel is to fetch
        self.scratch = memoryview(bytearray(_RECV))
        self._last_wait = 0.0    # from sending the last call to its answer (seconds)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._poll_out = select.poll()
        self._poll_out.register(sock, select.POLLOUT)

    @classmethod
    def connect(cls, channel: EngineChannel, path: str, key: bytes, *, local: bool) -> Lane:
        """Connect to the engine socket at ``path`` and prove ``key`` (blocking, bounded).
        ``local``: the engine runs on this machine (not through an SSH forwarder)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(LANE_CONNECT_TIMEOUT)
            sock.connect(path)
            transcript, answer = _wire.client_answer(key, _recv_exactly(sock,
                                                                       _wire.HELLO.size))
            sock.sendall(answer)
            codec = _wire.client_verify(key, transcript, _recv_exactly(sock, _wire.MAC_SIZE))
            parser = _wire.FrameParser(codec)
            frames: list[_wire.Frame] = []
            while not frames:
                frames = parser.feed(_recv_some(sock))
            hello = frames[0]
            if hello.kind is not _wire.Kind.REPLY or hello.meta.get("op") != "hello" or \
                    hello.meta.get("pid") != channel.info.pid:
                raise ProtocolError("the engine's greeting on a direct lane did not match")
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(channel, sock, codec, parser, local=local)

    # -- a call (the thread holding ``lock``) -------------------------------------------------
    def send(self, rec: TaskRecord, meta: dict, payload: list) -> None:
        """Send one task; its result is taken by :meth:`receive`."""
        rec.request = (meta, payload)     # as the channel keeps it: resent if never received
        self._waiting[rec.msg_id] = rec
        meta, payload = self._refs.compact(meta, payload)
        meta = {**meta, **self._asks}
        if self._acks:
            meta["ack"], self._acks = self._acks, []
        self._send_all(self.codec.encode(_wire.Kind.TASK, meta, payload, sign_as_sent=True))

    def receive(self) -> None:
        """Wait until every task sent has its result (finishing their records)."""
        sent = time.perf_counter()
        # Judged by the last answer, with room: a wait that spinning would have shortened
        # must not switch spinning off for good.
        spin_until = sent + (LANE_SPIN if self._last_wait < 2 * LANE_SPIN else 0.0)
        while self._waiting:
            try:
                n, frames = self.parser.receive(self.sock, self.scratch)
            except BlockingIOError:
                if time.perf_counter() < spin_until:
                    os.sched_yield()  # whatever else is ready to run here (ssh) goes first
                elif not self._poll.poll(LANE_POLL_MS):
                    self._check_channel()
                continue
            except OSError as exc:
                raise LaneBroken(f"the lane broke: {exc}") from exc
            if not n:
                raise LaneBroken("the engine closed the lane")
            for frame in frames:
                self.take(frame)
        self._last_wait = time.perf_counter() - sent
        if self._moved:  # their results come over the channel; AsyncResult.get waits for them
            moved, self._moved = self._moved, []
            for rec in moved:
                rec.request = None  # it ran: never to be sent again
            try:
                self.channel.loop.call_soon_threadsafe(self.channel.fetch_moved, moved)
            except RuntimeError:  # the client is closed: its loop is gone
                for rec in moved:
                    rec.fail(self.channel.error(f"is {self.channel.state}"), time.time())
        if self._ack_now:  # let the engine free a large result now, not at the next call:
            self._ack_now = False  # over the channel (a second write here could wait on Nagle)
            acks = self.take_acks()
            try:
                self.channel.loop.call_soon_threadsafe(self.channel.ack_now, acks)
            except RuntimeError:  # the client is closing: they go with the lane's close
                self._acks = acks

    def take(self, frame: _wire.Frame) -> None:
        """Handle one frame from the engine (results and output of this lane's tasks)."""
        kind, meta = frame.kind, frame.meta
        if kind is _wire.Kind.RESULT:
            for m, p in _wire.items(meta, frame.payload):
                rec = self._waiting.pop(m["msg_id"], None)
                if m.get("status") == "moved":  # large: the channel fetches it (move_large)
                    if rec is not None:
                        self._moved.append(rec)
                    continue
                self._acks.append(m["msg_id"])
                if _wire.payload_size(p) >= ACK_AT_ONCE:
                    self._ack_now = True
                if rec is not None:
                    rec.finish(m, p, time.time(), self.channel.clock_offset)
        elif kind is _wire.Kind.OUTPUT:
            rec = self._waiting.get(meta["msg_id"])
            if rec is not None:
                rec.add_output(meta["name"], meta["text"])
        elif kind is not _wire.Kind.REPLY:
            raise ProtocolError(f"unexpected {kind.name} frame from an engine")

    def unfinished(self) -> list[TaskRecord]:
        waiting, self._waiting = self._waiting, {}
        return list(waiting.values())

    def _send_all(self, bufs: list) -> None:
        """Write a frame; a large one is signed piece by piece as it goes (see signed_pieces),
        so the forwarder and the engine work on a piece while the next one is signed."""
        if len(bufs) == 1:  # a small frame: one buffer, usually taken whole
            try:
                n = self.sock.send(bufs[0])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                raise LaneBroken(f"the lane broke: {exc}") from exc
            if n == len(bufs[0]):
                return
            bufs = [memoryview(bufs[0])[n:]]
        for piece in _wire.signed_pieces(bufs, _WRITE):
            view = memoryview(piece).cast("B")
            while view:
                try:
                    n = self.sock.send(view)
                except BlockingIOError:
                    if not self._poll_out.poll(LANE_POLL_MS):
                        self._check_channel()
                    continue
                except OSError as exc:
                    raise LaneBroken(f"the lane broke: {exc}") from exc
                view = view[n:]

    def _check_channel(self) -> None:
        if self.closed or self.channel.state != "running":
            raise LaneBroken(f"{self.channel.info} is {self.channel.state}")

    # -- ending -------------------------------------------------------------------------------
    def take_acks(self) -> list[str]:
        acks, self._acks = self._acks, []
        return acks

    def close(self) -> None:
        """Close the socket (any thread); a caller blocked on it wakes within LANE_POLL_MS.
        Unsent acknowledgements go first if no call is using the lane."""
        if self.closed:
            return
        self.closed = True
        if self._acks and self.lock.acquire(blocking=False):
            try:
                self.sock.setblocking(False)
                self.sock.send(b"".join(self.codec.encode(
                    _wire.Kind.CONTROL, {"op": "ack", "msg_ids": self.take_acks()})))
            except OSError:
                pass  # unacknowledged results stay on the engine: harmless
            finally:
                self.lock.release()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _recv_some(sock: socket.socket) -> bytes:
    data = sock.recv(1 << 16)
    if not data:
        raise ProtocolError("the engine closed a direct lane during the handshake")
    return data


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, have = [], 0
    while have < n:  # never past n: the engine's first frame may follow at once
        part = sock.recv(n - have)
        if not part:
            raise ProtocolError("the engine closed a direct lane during the handshake")
        parts.append(part)
        have += len(part)
    return b"".join(parts)


def call(lanes: Sequence[Lane], items: Sequence[tuple[TaskRecord, dict, list]]) -> None:
    """Run one task per lane (``items[i]`` on ``lanes[i]``, each lane locked by the caller)
    and wait for the results. If the lanes cannot finish (interrupted, broken), each goes to
    its channel's IO thread, which sees the tasks through; an interrupt is raised again, a
    broken lane is not (the records finish through the channel: wait on an AsyncResult)."""
    adopted: list[Lane] = []
    try:
        for lane, (rec, meta, payload) in zip(lanes, items):
            lane.send(rec, meta, payload)
        for lane in lanes:
            lane.receive()
    except BaseException as exc:
        for lane in lanes:
            if lane._waiting or not isinstance(exc, Exception):
                adopted.append(lane)
                ch = lane.channel
                try:
                    ch.loop.call_soon_threadsafe(ch.adopt_lane, lane)
                except RuntimeError:  # the client is closed: its loop is gone
                    lane.close()
                    for rec in lane.unfinished():
                        rec.fail(ch.error(f"is {ch.state}"), time.time())
        if not isinstance(exc, (LaneBroken, ProtocolError, OSError)):
            raise
    finally:
        for lane in lanes:
            if lane not in adopted:
                lane.lock.release()
