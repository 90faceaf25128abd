"""The engine's sockets without asyncio: accept, handshake, read frames, write frames.

Layer: engine. Shipped to engines; stdlib and the shipped sshpar modules only.

One thread at a time drives the reactor (whoever holds the daemon's ``io_lock``): the main
thread between tasks, the sentry thread while a long task runs. Handshakes run in short-lived
threads, so a silent peer cannot stall the engine; a finished one is handed over through a
queue and a wake-up byte. Writes never block: what the socket does not take waits for it to
become writable, so a 1 GiB result is sent from its own buffers, never copied whole.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import _wire
from ..errors import ProtocolError

log = logging.getLogger("sshpar.engine")

# Looked for now, while the launcher imports the engine's modules: engines fork from it, so
# none pays for the import at its first handshake.
_wire.bulk_mac_available()

HANDSHAKE_TIMEOUT = 10.0
#: Frames smaller than this are joined into one write; larger ones go out from their buffers.
_SMALL = 64 * 1024
#: Deferred small frames are written once this many bytes wait (or at the next flush).
_FLUSH_BYTES = 256 * 1024
#: Results up to this size are batched (several results in one frame).
_BATCH_ITEM = 16 * 1024
_RECV = 1 << 18
#: How much one connection may read per poll before the others get a turn.
_READ_BUDGET = 16 << 20
_IOV_MAX = 64


class Conn:
    """One connected client: its socket, its frame parser and what waits to be written."""

    def __init__(self, reactor: Reactor, sock: socket.socket, codec: _wire.Codec) -> None:
        self.reactor = reactor
        self.sock = sock
        self.codec = codec
        self.parser = _wire.FrameParser(codec)
        self.open = True
        self._small: list[Any] = []
        self._small_size = 0
        self._results: list[tuple[dict, list]] = []  # small results, sent as one batch frame
        self.functions: dict[bytes, Any] = {}  # digest -> function pickle sent on this stream
        self.deferred_since = 0.0
        # (buffer, signature to feed it to as it is sent) or (None, signature): its MAC
        self._out: collections.deque[tuple[memoryview | None, Any]] = collections.deque()
        self._writing = False

    def send_result(self, meta: dict, payload: list) -> None:
        """Queue a result; small ones wait to go out together in one batch frame (at the next
        flush or frame), so a burst of tiny tasks costs one header and MAC, not one each."""
        if not self.open:
            return
        size = _wire.payload_size(payload)
        if size > _BATCH_ITEM:
            self.send(_wire.Kind.RESULT, meta, payload, defer=True)
            return
        if not self._small and not self._results:
            self.deferred_since = time.monotonic()
        self._results.append((meta, payload))
        self._small_size += size + 256
        if self._small_size >= _FLUSH_BYTES:
            self.flush()

    def _spill_results(self) -> None:
        if self._results:
            results, self._results = self._results, []
            meta, payload = (results[0] if len(results) == 1 else _wire.join_batch(results))
            self._encode(_wire.Kind.RESULT, meta, payload)

    def send(self, kind: _wire.Kind, meta: dict, payload: list | tuple = (), *,
             defer: bool = False) -> None:
        """Queue a frame; write it now unless ``defer`` (then at the next :meth:`flush`)."""
        if not self.open:
            return
        self._spill_results()  # frames keep their order
        self._encode(kind, meta, payload)
        if not defer or self._small_size >= _FLUSH_BYTES or self._out:
            self.flush()

    def _encode(self, kind: _wire.Kind, meta: dict, payload: list | tuple) -> None:
        bufs = self.codec.encode(kind, meta, payload, sign_as_sent=True)
        signature = bufs[-1] if isinstance(bufs[-1], _wire.Signature) else None
        if signature is None and len(bufs) == 1 and len(bufs[0]) < _SMALL:
            if not self._small and not self._results:
                self.deferred_since = time.monotonic()
            self._small.append(bufs[0])
            self._small_size += len(bufs[0])
        else:  # a large frame: sent from its own buffers, signed as they go
            self._spill()
            out = self._out
            out.append((memoryview(bufs[0]), None))      # the header, signed already
            for buf in bufs[1:-1] if signature is not None else bufs[1:]:
                out.append((memoryview(buf).cast("B"), signature))
            if signature is not None:
                out.append((None, signature))

    @property
    def deferred(self) -> bool:
        return bool(self._small or self._results)

    def _spill(self) -> None:
        self._spill_results()
        if self._small:
            self._out.append((memoryview(b"".join(self._small)), None))
            self._small = []
            self._small_size = 0

    def flush(self) -> None:
        """Write what the socket takes now; the rest when it becomes writable."""
        if not self.open:
            return
        if not self._out and len(self._small) == 1 and not self._results:
            data = self._small.pop()  # one small frame, nothing before it: usually sent whole
            self._small_size = 0
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.reactor.close(self, f"send failed: {exc}")
                return
            if sent == len(data):
                self.reactor.want_write(self, False)
                return
            self._out.append((memoryview(data)[sent:], None))
        self._spill()
        out = self._out
        while out:
            first, signature = out[0]
            if first is None:  # every byte of its frame is out: now its MAC
                out[0] = (memoryview(signature.mac.digest()), None)
                continue
            batch = []
            for view, _ in itertools.islice(out, _IOV_MAX):
                if view is None:
                    break
                batch.append(view)
            try:
                sent = self.sock.send(first) if len(batch) == 1 else self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.reactor.close(self, f"send failed: {exc}")
                return
            while sent:
                view, signature = out[0]
                assert view is not None
                done = view if sent >= len(view) else view[:sent]
                if signature is not None:
                    signature.mac.update(done)
                if done is view:
                    sent -= len(view)
                    out.popleft()
                else:
                    out[0] = (view[sent:], signature)
                    sent = 0
        self.reactor.want_write(self, bool(out))

    def flush_blocking(self, timeout: float) -> None:
        """Write everything queued, waiting at most ``timeout`` s (when exiting)."""
        self._spill()
        try:
            self.sock.settimeout(timeout)
            for view, signature in self._out:
                if view is None:
                    self.sock.sendall(signature.mac.digest())
                    continue
                if signature is not None:
                    signature.mac.update(view)
                self.sock.sendall(view)
        except OSError:
            pass
        self._out.clear()


class Reactor:
    """A selector over the listening socket, the clients and a wake-up socket."""

    def __init__(self, listener: socket.socket, key: bytes, *,
                 on_connect: Callable[[Conn], None],
                 on_frame: Callable[[_wire.Frame, Conn], None],
                 on_close: Callable[[Conn], None]) -> None:
        self.key = key
        self._scratch = memoryview(bytearray(_RECV))  # reused by every read: see receive()
        self.on_connect = on_connect
        self.on_frame = on_frame
        self.on_close = on_close
        self.conns: set[Conn] = set()
        self.sel = selectors.DefaultSelector()
        listener.setblocking(False)
        self.listener = listener
        self.sel.register(listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._arrivals: collections.deque[tuple[socket.socket, _wire.Codec]] = \
            collections.deque()

    # -- any thread ---------------------------------------------------------------------------
    def wake(self) -> None:
        """Make the thread driving the reactor return from :meth:`poll`."""
        try:
            self._wake_w.send(b"!")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending, or we are exiting

    def wake_fileno(self) -> int:
        """The descriptor :meth:`wake` writes to (non-blocking), for signal.set_wakeup_fd."""
        return self._wake_w.fileno()

    # -- the io_lock holder -------------------------------------------------------------------
    def poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` s (None: until something happens) and handle what did."""
        for key, mask in self.sel.select(timeout):
            data = key.data
            if data is None:
                self._accept()
            elif data == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                while self._arrivals:
                    self._register(*self._arrivals.popleft())
            else:
                if mask & selectors.EVENT_WRITE:
                    data.flush()
                if mask & selectors.EVENT_READ and data.open:
                    self._read(data)

    def flush_due(self, age: float) -> None:
        """Write deferred frames that have waited ``age`` s or more (0: all of them)."""
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.deferred and now - conn.deferred_since >= age:
                conn.flush()

    def want_write(self, conn: Conn, want: bool) -> None:
        if want != conn._writing and conn.open:
            conn._writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self.sel.modify(conn.sock, events, conn)

    def close(self, conn: Conn, why: str) -> None:
        if not conn.open:
            return
        conn.open = False
        log.info("client connection closed: %s", why)
        self.conns.discard(conn)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.on_close(conn)

    def _read(self, conn: Conn) -> None:
        sock, parser = conn.sock, conn.parser
        budget = _READ_BUDGET
        try:
            while budget > 0 and conn.open:
                n, frames = parser.receive(sock, self._scratch)
                if not n:
                    self.close(conn, "the client closed the connection")
                    return
                budget -= n
                for frame in frames:
                    self.on_frame(frame, conn)
                if n < _RECV:  # drained (or a segment filled): saves a recv that would fail
                    return
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as exc:
            log.warning("dropped a client: %s", exc)
            self.close(conn, str(exc))
        except OSError as exc:
            self.close(conn, f"receive failed: {exc}")

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if not _peer_ok(sock):
            sock.close()
            return
        threading.Thread(target=self._handshake, args=(sock,), name="sshpar-handshake",
                         daemon=True).start()

    def _handshake(self, sock: socket.socket) -> None:
        try:
            sock.setblocking(True)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            nonce, hello = _wire.server_hello()
            sock.sendall(hello)
            answer = _recv_exactly(sock, _wire.CLIENT_PROOF_SIZE)
            proof, codec = _wire.server_verify(self.key, nonce, answer)
            sock.sendall(proof)
            sock.setblocking(False)
        except (ProtocolError, OSError, EOFError) as exc:
            log.warning("handshake refused: %s", exc or type(exc).__name__)
            sock.close()
            return
        self._arrivals.append((sock, codec))
        self.wake()

    def _register(self, sock: socket.socket, codec: _wire.Codec) -> None:
        conn = Conn(self, sock, codec)
        self.conns.add(conn)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        self.on_connect(conn)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (Linux ``SO_PEERCRED``);
    elsewhere our own (the socket's 0700 directory is then the only guard)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return os.getuid()
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _peer_ok(sock: socket.socket) -> bool:
    """Only processes of the engine's own user may connect (the socket is 0600 as well)."""
    uid = peer_uid(sock)
    if uid != os.getuid():
        log.warning("refused a connection from uid %d (engine runs as uid %d)",
                    uid, os.getuid())
        return False
    return True
