"""The client's side of a framed stream: the handshake, reading frames, writing them.

Layer: core (client only; engines use ``_engine/reactor.py``). Imports _wire and errors.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

from ._wire import (
    FUNCTION_KEEP_MAX,
    FUNCTION_REF_MIN,
    FUNCTIONS_KEPT,
    HELLO,
    MAC_SIZE,
    MAX_FRAME_BYTES,
    Codec,
    Frame,
    FrameParser,
    Kind,
    Reader,
    Writer,
    buffer_size,
    client_answer,
    client_verify,
    finish_signature,
    function_digest,
    payload_size,
    signed_pieces,
)
from .errors import ProtocolError


async def client_handshake(reader: Reader, writer: Writer, key: bytes,
                           max_frame: int = MAX_FRAME_BYTES) -> Codec:
    """Prove the cluster key to an engine and have it prove it back; return the codec."""
    try:
        hello = await reader.readexactly(HELLO.size)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the connection closed before the engine greeted (nothing "
                            "listening on its socket?)") from None
    transcript, answer = client_answer(key, hello)
    writer.write(answer)
    await writer.drain()
    try:
        proof = await reader.readexactly(MAC_SIZE)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the engine closed the connection during the handshake: it did "
                            "not accept this client's cluster key (a stale cluster file?)"
                            ) from None
    return client_verify(key, transcript, proof, max_frame)


async def read_frames(reader: Reader, parser: FrameParser, size: int = 1 << 18
                      ) -> list[Frame]:
    """Wait for bytes and return the frames they complete (maybe none); EOFError at the end."""
    data = await reader.read(size)
    if not data:
        raise EOFError("the stream ended")
    return parser.feed(data)


#: Large frames are written (and signed) in pieces of this size, each waiting for the stream
#: to drain: about what a socket takes at once, so the transport never copies a remainder.
_WRITE_CHUNK = 256 * 1024


class FrameSender:
    """Writes frames to one stream in order, in as few writes as possible, without copying
    large buffers twice.

    Small frames are joined into one write (each write costs a syscall and, over SSH, a
    packet or two): a frame sent with ``defer=True`` waits for :meth:`flush_small`, so a
    burst of frames goes out in one write. Large frames, and anything behind them, go
    through a pump task that writes in chunks and waits for the stream to drain, so a 1 GiB
    array never sits in a transport buffer whole. Must be used from the loop thread.
    """

    _DIRECT_LIMIT = 256 * 1024

    def __init__(self, codec: Codec, writer: Writer) -> None:
        self.codec = codec
        self.writer = writer
        self._small: list[Any] = []
        self._queue: collections.deque[list] = collections.deque()
        self._pump: Any = None
        self.error: BaseException | None = None

    def send(self, kind: Kind, meta: dict, payload: Sequence[Any] = (), *,
             defer: bool = False) -> None:
        if self.error is not None:
            raise self.error
        bufs = self.codec.encode(kind, meta, payload, sign_as_sent=True)
        size = payload_size(bufs)
        if self._pump is None and size <= self._DIRECT_LIMIT:
            self._small.extend(finish_signature(bufs))
            if not defer:
                self.flush_small()
            return
        if self._small:  # keep order: what was deferred goes first
            self._queue.append([b"".join(self._small)])
            self._small = []
        self._queue.append(bufs)
        if self._pump is None:
            self._pump = asyncio.ensure_future(self._run_pump())

    def flush_small(self) -> None:
        """Write the deferred small frames, in one write."""
        if self._small:
            data = b"".join(self._small)
            self._small = []
            self.writer.write(data)

    async def _run_pump(self) -> None:
        try:
            while self._queue:
                for piece in signed_pieces(self._queue.popleft(), _WRITE_CHUNK):
                    self.writer.write(piece)
                    await self.writer.drain()
        except Exception as exc:  # the stream broke; the reader side reports it
            self.error = exc
            self._queue.clear()
        finally:
            self._pump = None

    async def flush(self) -> None:
        """Wait until everything queued has been handed to the stream."""
        self.flush_small()
        while self._pump is not None:
            await asyncio.shield(self._pump)
        await self.writer.drain()


class FunctionRefs:
    """Sends each function once per stream: after the first time, by its digest (the engine
    keeps up to FUNCTIONS_KEPT of them per connection). One per stream; not thread-safe."""

    def __init__(self) -> None:
        self.sent: set[bytes] = set()   # digests the engine keeps (this stream)
        self._last: Any = None          # the last function pickle, and its digest
        self._last_digest = b""

    def compact(self, meta: dict, payload: list) -> tuple[dict, list]:
        """The task as it goes on this stream: its function by reference where possible."""
        f = payload[0] if payload else b""
        if f is self._last:  # a reused pickle: the same bytes object, so the same digest
            digest = self._last_digest
        elif FUNCTION_REF_MIN <= buffer_size(f) <= FUNCTION_KEEP_MAX:
            digest = self._last_digest = function_digest(f)
            self._last = f
        else:
            return meta, payload
        if digest in self.sent:
            return dict(meta, fn=digest), [b"", *payload[1:]]
        if len(self.sent) < FUNCTIONS_KEPT:
            self.sent.add(digest)
            return dict(meta, fn_keep=digest), payload
        return meta, payload
