"""Frames on the wire: a signed, sequenced envelope around pickle-5 segments.

Layer: bottom. Shipped to engines, so it imports only the standard library and sshpar.errors.

A connection starts with a handshake that proves both ends hold the cluster key and derives
one key per direction from two fresh nonces, so a frame captured on one connection is useless
on any other. After it, every frame is::

    header   !4sBBHQI   magic b"SPAR", version, kind, flags, seq, number of segments
    lengths  !Q * n     length of each segment
    segments            segment 0: the envelope ("meta", plain data); then the payload
    mac      32 bytes   HMAC-SHA256(direction key, header + lengths + segments)

A frame of more than 64 KiB (an array, a large result) may instead carry a Poly1305 tag, when
both ends have the ``cryptography`` package and agreed to in the handshake: Poly1305 over the
same bytes, keyed for that frame alone by HMAC-SHA256(direction key, "bulk" + seq); the 16-byte
tag, then 16 zero bytes, fill the same 32-byte field. Poly1305 runs at ~12 GB/s against
HMAC-SHA256's ~1.8 (with SHA extensions): a 64 MiB array is signed in 6 ms, not 37, at each
end. A key used once is what Poly1305 asks for; sequence numbers never repeat on a
connection, and direction keys are per connection.

``seq`` counts frames per direction from 0; a frame out of sequence is a replay and refused.
Nothing in a frame is unpickled before its MAC verifies, and the envelope is unpickled by a
loader that refuses every class, so reading it never runs code. Sizes are checked from the
lengths alone, before the body is read. A small frame is signed and checked in one call over
contiguous bytes; a large one is signed as it streams, its arrays never copied.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import hmac
import io
import mmap
import os
import pickle
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from .errors import ProtocolError

MAGIC = b"SPAR"
VERSION = 3
HEADER = struct.Struct("!4sBBHQI")
MAC_SIZE = 32
NONCE_SIZE = 32
HELLO = struct.Struct("!4sBB32s")  # magic, version, what the engine offers, nonce
#: Bit in the greeting's offer and the client's choice: Poly1305 for frames over 64 KiB.
BULK_POLY1305 = 1

#: Default ceiling on one frame's total size; larger frames are refused before being read.
MAX_FRAME_BYTES = 2 << 30
MAX_SEGMENTS = 4096
#: Segments at least this large are read into a writable buffer in chunks (flat memory).
_CHUNK = 1 << 20
_HUGE = 4 << 20  # segments from this size go in 2 MiB pages (see fresh_buffer)
#: Frames up to this size are sent as one joined buffer (copying is cheaper than more writes).
_JOIN = 64 * 1024
_LENGTHS: dict[int, struct.Struct] = {}


def _lengths(nseg: int) -> struct.Struct:
    st = _LENGTHS.get(nseg)
    if st is None:
        st = _LENGTHS[nseg] = struct.Struct(f"!{nseg}Q")
    return st


class Kind(enum.IntEnum):
    """What a frame carries."""

    TASK = 1        # client -> engine: run this (meta: msg_id, op; payload: pickled call)
    RESULT = 2      # engine -> client: a task finished (meta: status, times, output)
    OUTPUT = 3      # engine -> client: live stdout/stderr of a running task
    CONTROL = 4     # client -> engine: handled at once by the engine's IO thread
    REPLY = 5       # engine -> client: the answer to a CONTROL frame


_KINDS = {int(k): k for k in Kind}


class Reader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...
    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    def write(self, data: Any) -> None: ...
    def writelines(self, data: Iterable[Any]) -> None: ...
    async def drain(self) -> None: ...


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise ProtocolError(f"frame envelope refers to {module}.{name}; only plain data allowed")


def dumps_meta(meta: dict) -> bytes:
    return pickle.dumps(meta, protocol=5)


def loads_meta(data: bytes | memoryview) -> dict:
    try:
        meta = _DataOnly(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"unreadable frame envelope: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("frame envelope is not a mapping")
    return meta


class Signature:
    """The MAC of a large frame, completed as it is written: a writer feeds every buffer
    between the header and this one to ``mac`` as it sends it, then sends ``mac.digest()``."""

    __slots__ = ("mac",)

    def __init__(self, mac: Any) -> None:
        self.mac = mac


def finish_signature(bufs: list) -> list:
    """``bufs`` with a trailing :class:`Signature` computed now, for writers that do not
    sign as they send."""
    if bufs and isinstance(bufs[-1], Signature):
        mac = bufs[-1].mac
        for view in bufs[1:-1]:
            mac.update(view)
        bufs[-1] = mac.digest()
    return bufs


def signed_pieces(bufs: list, size: int) -> Iterator[Any]:
    """A frame from :meth:`Codec.encode` (``sign_as_sent=True``) as pieces of at most
    ``size`` bytes, to write in order. A large frame's MAC is fed each piece as it is handed
    out and comes last, so signing overlaps with whoever moves the pieces on."""
    signature = bufs[-1] if isinstance(bufs[-1], Signature) else None
    for i, buf in enumerate(bufs):
        if buf is signature:
            yield signature.mac.digest()
            continue
        view = memoryview(buf).cast("B")
        for start in range(0, len(view), size):
            piece = view[start:start + size]
            if signature is not None and i > 0:  # the header is signed already
                signature.mac.update(piece)
            yield piece


def buffer_size(buf: Any) -> int:
    if isinstance(buf, (bytes, bytearray)):
        return len(buf)
    return MAC_SIZE if isinstance(buf, Signature) else memoryview(buf).nbytes


def payload_size(payload: Iterable[Any]) -> int:
    """Bytes in all of a payload's segments."""
    size = 0
    for buf in payload:
        size += len(buf) if type(buf) is bytes else buffer_size(buf)
    return size


#: A task's function (its first payload segment) travels once per connection: the first task
#: sends it with ``fn_keep`` (its digest), later ones send ``fn`` and an empty segment. Only
#: pickles of this size range are kept, and at most FUNCTIONS_KEPT per connection.
FUNCTION_REF_MIN = 64
FUNCTION_KEEP_MAX = 64 * 1024
FUNCTIONS_KEPT = 512


def function_digest(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; named in 3.13


def fresh_buffer(n: int) -> Any:
    """A writable buffer of ``n`` bytes for a large segment. On Linux an anonymous mapping
    populated in one go: a page fault per 4 KiB page, as a bytearray gets, costs as much as
    the copy into it on a VM. In 2 MiB pages where the kernel allows them (transparent huge
    pages on request, Debian's default): populating 64 MiB then takes ~6 ms, not ~21."""
    if n < _CHUNK or not hasattr(mmap, "MAP_POPULATE"):
        return bytearray(n)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    try:
        buf = mmap.mmap(-1, n, flags=flags)
    except OSError:
        return bytearray(n)
    try:
        if n >= _HUGE:
            with contextlib.suppress(OSError, AttributeError):  # no THP here: small pages
                buf.madvise(mmap.MADV_HUGEPAGE)
        buf.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # a kernel before 5.14: populate while mapping
        buf.close()
        try:
            return mmap.mmap(-1, n, flags=flags | mmap.MAP_POPULATE)
        except OSError:
            return bytearray(n)
    return buf


def join_batch(items: Sequence[tuple[dict, Sequence[Any]]]) -> tuple[dict, list]:
    """Several (meta, payload) pairs as one frame's: one header, one MAC, one envelope for a
    burst of small tasks or results."""
    metas: list[dict] = []
    counts: list[int] = []
    payload: list[Any] = []
    for meta, segments in items:
        metas.append(meta)
        counts.append(len(segments))
        payload.extend(segments)
    return {"batch": metas, "segs": counts}, payload


def items(meta: dict, payload: list) -> list[tuple[dict, list]]:
    """The (meta, payload) pairs a frame carries: those of a batch, or its own."""
    return split_batch(meta, payload) if "batch" in meta else [(meta, payload)]


def split_batch(meta: dict, payload: list) -> list[tuple[dict, list]]:
    """The (meta, payload) pairs of a batch frame; ProtocolError if it does not add up."""
    metas, counts = meta.get("batch"), meta.get("segs")
    if not (isinstance(metas, list) and isinstance(counts, list) and len(metas) == len(counts)
            and all(isinstance(m, dict) for m in metas)
            and all(type(c) is int and c >= 0 for c in counts)
            and sum(counts) == len(payload)):
        raise ProtocolError("malformed batch frame")
    out, at = [], 0
    for m, c in zip(metas, counts):
        out.append((m, payload[at:at + c]))
        at += c
    return out


class Frame:
    """One received frame: its kind, envelope and payload segments."""

    __slots__ = ("kind", "meta", "payload")

    def __init__(self, kind: Kind, meta: dict, payload: list) -> None:
        self.kind = kind
        self.meta = meta
        self.payload = payload

    def __repr__(self) -> str:
        return f"<Frame {self.kind.name} {self.meta.get('op') or self.meta.get('msg_id')}>"


def _derive(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


_poly1305: Any = None  # cryptography's Poly1305 class once looked for; False: not here


def bulk_mac_available() -> bool:
    """Whether this Python can sign bulk frames with Poly1305 (``cryptography`` installed).
    Imported on first use: engines ask when their modules load, before they fork."""
    global _poly1305
    if _poly1305 is None:
        try:
            from cryptography.hazmat.primitives.poly1305 import Poly1305
        except Exception:  # noqa: BLE001 - absent or broken: HMAC-SHA256 for every frame
            _poly1305 = False
        else:
            _poly1305 = Poly1305
    return bool(_poly1305)


class _BulkMac:
    """Poly1305 over one frame with a key of its own (see the module docstring); quacks like
    the ``hmac`` object it stands in for."""

    __slots__ = ("_poly",)

    def __init__(self, direction_key: bytes, seq: int) -> None:
        self._poly = _poly1305(hmac.digest(direction_key, b"bulk" + seq.to_bytes(8, "big"),
                                           "sha256"))

    def update(self, data: Any) -> None:
        self._poly.update(data)

    def digest(self) -> bytes:
        return self._poly.finalize() + bytes(16)


class Codec:
    """Encodes and checks frames for one connection, one direction key each way."""

    def __init__(self, send_key: bytes, recv_key: bytes, *,
                 max_frame: int = MAX_FRAME_BYTES, bulk_mac: bool = False) -> None:
        # HMAC states keyed once; each frame's MAC starts from a copy (half the cost of
        # keying afresh, which hashes the key's two pads every time).
        self._send_key, self._recv_key = send_key, recv_key
        self._send_mac = hmac.new(send_key, digestmod="sha256")
        self._recv_mac = hmac.new(recv_key, digestmod="sha256")
        self.bulk_mac = bulk_mac and bulk_mac_available()
        self._send_seq = 0
        self._recv_seq = 0
        self.max_frame = max_frame

    # -- sending --------------------------------------------------------------------------
    def encode(self, kind: Kind, meta: dict, payload: Sequence[Any] = (), *,
               sign_as_sent: bool = False) -> list:
        """Return the frame as a list of buffers ready for ``writelines``: one joined buffer
        for a small frame, else the payload's own buffers (no copies).

        With ``sign_as_sent``, a large frame ends in a :class:`Signature` instead of its MAC,
        for a writer that signs each buffer as it writes it (see :func:`finish_signature`),
        so signing overlaps with sending instead of delaying it.
        """
        first = dumps_meta(meta)
        views: list[Any] = [first]
        lengths = [len(first)]
        for s in payload:
            if type(s) is bytes or isinstance(s, bytearray):
                views.append(s)
                lengths.append(len(s))
            else:
                view = memoryview(s).cast("B")
                views.append(view)
                lengths.append(view.nbytes)
        n = len(views)
        seq = self._send_seq
        head = HEADER.pack(MAGIC, VERSION, kind, 0, seq, n) + _lengths(n).pack(*lengths)
        self._send_seq += 1
        if sum(lengths) <= _JOIN:
            small = self._send_mac.copy()
            views[0] = head + first
            body = b"".join(views)
            small.update(body)
            return [body + small.digest()]
        mac: Any = _BulkMac(self._send_key, seq) if self.bulk_mac else self._send_mac.copy()
        mac.update(head)
        signature = Signature(mac)
        bufs = [head, *views, signature]
        return bufs if sign_as_sent else finish_signature(bufs)

    # -- receiving ------------------------------------------------------------------------
    def check_header(self, buf: Any, pos: int = 0) -> tuple[int, int, int]:
        """(kind, seq, number of segments) of the header at ``buf[pos:]``; refuses a
        stranger, another version or an absurd segment count."""
        magic, version, kind, _flags, seq, nseg = HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {magic!r}: not an sshpar peer, or corrupted")
        if version != VERSION:
            raise ProtocolError(f"frame version {version}, expected {VERSION}")
        if not 1 <= nseg <= MAX_SEGMENTS:
            raise ProtocolError(f"frame claims {nseg} segments (limit {MAX_SEGMENTS})")
        return kind, seq, nseg

    def check_lengths(self, buf: Any, pos: int, nseg: int) -> tuple[int, ...]:
        lengths = _lengths(nseg).unpack_from(buf, pos)
        total = sum(lengths)
        if total > self.max_frame:
            raise ProtocolError(f"frame of {total} bytes exceeds the limit of {self.max_frame}")
        return lengths

    def new_mac(self, seq: int, lengths: Sequence[int], head: Any) -> Any:
        """The MAC of received frame ``seq`` with segments of ``lengths``, fed ``head``
        (its header and lengths) so far."""
        if self.bulk_mac and sum(lengths) > _JOIN:
            mac: Any = _BulkMac(self._recv_key, seq)
        else:
            mac = self._recv_mac.copy()
        mac.update(head)
        return mac

    def verify(self, seq: int, lengths: Sequence[int], signed: Any, mac_given: Any) -> None:
        """Check the MAC over ``signed`` (one contiguous buffer: the whole frame but its
        MAC)."""
        mac = self.new_mac(seq, lengths, signed)
        if not hmac.compare_digest(mac.digest(), mac_given):
            raise ProtocolError("frame signature does not verify (wrong key or tampered frame)")

    def finish(self, kind: int, seq: int, segments: list, mac: Any = None,
               mac_given: Any = b"") -> Frame:
        """Accept a frame whose MAC is verified (or is checked here: ``mac``)."""
        if mac is not None and not hmac.compare_digest(mac.digest(), mac_given):
            raise ProtocolError("frame signature does not verify (wrong key or tampered frame)")
        if seq != self._recv_seq:
            raise ProtocolError(f"frame out of sequence ({seq}, expected {self._recv_seq}): "
                                "replayed or dropped")
        self._recv_seq += 1
        k = _KINDS.get(kind)
        if k is None:
            raise ProtocolError(f"unknown frame kind {kind}")
        return Frame(k, loads_meta(segments[0]), segments[1:])

    async def read(self, reader: Reader) -> Frame:
        """Read, check and return one frame. Raises ProtocolError on anything not genuine,
        and EOFError (asyncio.IncompleteReadError) when the stream ends between frames."""
        head = await reader.readexactly(HEADER.size)
        kind, seq, nseg = self.check_header(head)
        lens_raw = await reader.readexactly(8 * nseg)
        lengths = self.check_lengths(lens_raw, 0, nseg)
        mac = self.new_mac(seq, lengths, head + lens_raw)
        segments = []
        for n in lengths:
            seg = await _read_segment(reader, n)
            mac.update(seg)
            segments.append(seg)
        mac_given = await reader.readexactly(MAC_SIZE)
        return self.finish(kind, seq, segments, mac, mac_given)


class FrameParser:
    """Turns a byte stream into checked frames, as the bytes arrive (no awaits per field).

    A frame that is whole in the buffer is checked in place, in one MAC call. A large one
    streams: small parts gather in the buffer, and a large segment (an array) is filled in
    place, chunk by chunk, so it is held once and comes out writable. Errors are raised by
    :meth:`feed`.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._buf = bytearray()
        # a frame being streamed: (kind, seq, lengths), its MAC so far and its segments
        self._frame: tuple | None = None
        self._mac: Any = None
        self._segments: list = []
        self._big: memoryview | None = None
        self._big_obj: Any = None
        self._big_pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Take the next bytes of the stream; return the frames they complete."""
        frames: list[Frame] = []
        view = memoryview(data).cast("B")
        if not self._buf and self._big is None and self._frame is None:
            view = view[self._whole(view, frames):]  # the usual case: read in place
        while view:
            if self._big is not None:
                n = min(len(view), len(self._big) - self._big_pos)
                self._big[self._big_pos:self._big_pos + n] = view[:n]
                view = view[n:]
                self._big_advance(n, frames)
                continue
            self._buf += view
            view = view[:0]
            self._step(frames)
        return frames

    def receive(self, sock: Any, scratch: memoryview) -> tuple[int, list[Frame]]:
        """Read once from ``sock`` and return (bytes read, frames completed); 0 at the end.

        Into the large segment being filled if there is one, else into ``scratch``, a buffer
        the caller reuses: a fresh 256 KiB ``recv`` would cost an mmap and munmap each time."""
        target = self.big_target()
        if target is not None:  # an array: straight into its buffer, no copy
            n = sock.recv_into(target, min(len(target), 4 << 20))
            return n, self.filled(n) if n else []
        n = sock.recv_into(scratch)
        return n, self.feed(scratch[:n]) if n else []

    def big_target(self) -> memoryview | None:
        """While a large segment is being filled: the part still empty, to receive into
        directly (``sock.recv_into``), then report with :meth:`filled`. Else None."""
        return None if self._big is None else self._big[self._big_pos:]

    def filled(self, n: int) -> list[Frame]:
        """``n`` bytes were written into :meth:`big_target`; return the frames completed."""
        frames: list[Frame] = []
        self._big_advance(n, frames)
        return frames

    def _big_advance(self, n: int, frames: list[Frame]) -> None:
        assert self._big is not None
        self._mac.update(self._big[self._big_pos:self._big_pos + n])
        self._big_pos += n
        if self._big_pos == len(self._big):
            self._segments.append(self._big_obj)
            self._big = self._big_obj = None
            self._step(frames)

    def _whole(self, view: memoryview, frames: list[Frame]) -> int:
        """Check and take the frames that are whole in ``view``, each in one MAC call;
        return where the first that is not whole starts."""
        codec, pos, size = self.codec, 0, len(view)
        while size - pos >= HEADER.size:
            kind, seq, nseg = codec.check_header(view, pos)
            body = pos + HEADER.size + 8 * nseg
            if size < body:
                break
            # Sizes are checked as soon as they are known, before waiting for more.
            lengths = codec.check_lengths(view, pos + HEADER.size, nseg)
            end = body + sum(lengths)
            if size < end + MAC_SIZE:
                break
            codec.verify(seq, lengths, view[pos:end], view[end:end + MAC_SIZE])
            segments = []
            for n in lengths:
                segments.append(bytes(view[body:body + n]))
                body += n
            frames.append(codec.finish(kind, seq, segments))
            pos = end + MAC_SIZE
        return pos

    def _step(self, frames: list[Frame]) -> None:
        pos = 0
        try:
            while True:
                if self._frame is not None:
                    consumed, pos = pos, 0
                    if not self._stream(consumed, frames):
                        return
                    continue
                with memoryview(self._buf) as mv:
                    pos += self._whole(mv[pos:], frames)
                buf = self._buf
                if len(buf) - pos < HEADER.size:
                    return
                kind, seq, nseg = self.codec.check_header(buf, pos)
                body = pos + HEADER.size + 8 * nseg
                if len(buf) < body:
                    return
                lengths = self.codec.check_lengths(buf, pos + HEADER.size, nseg)
                if sum(lengths) < _CHUNK:
                    return  # small: whole once the rest arrives
                # large and incomplete: stream it, segment by segment
                self._frame = (kind, seq, lengths)
                self._mac = self.codec.new_mac(seq, lengths, bytes(buf[pos:body]))
                self._segments = []
                pos = body
        finally:
            if pos:
                del self._buf[:pos]

    def _stream(self, pos: int, frames: list[Frame]) -> bool:
        """Advance the frame being streamed from ``self._buf[pos:]``; False: need more."""
        del self._buf[:pos]
        buf = self._buf
        assert self._frame is not None
        kind, seq, lengths = self._frame
        while len(self._segments) < len(lengths):
            n = lengths[len(self._segments)]
            if n >= _CHUNK and len(buf) < n:
                self._big_obj = fresh_buffer(n)
                self._big = memoryview(self._big_obj)
                have = len(buf)
                self._big[:have] = buf
                self._mac.update(buf)
                self._big_pos = have
                buf.clear()
                return False
            if len(buf) < n:
                return False
            seg = bytes(buf[:n])
            del buf[:n]
            self._mac.update(seg)
            self._segments.append(seg)
        if len(buf) < MAC_SIZE:
            return False
        mac_given = bytes(buf[:MAC_SIZE])
        del buf[:MAC_SIZE]
        segments, self._segments, self._frame = self._segments, [], None
        frames.append(self.codec.finish(kind, seq, segments, self._mac, mac_given))
        return True


async def _read_segment(reader: Reader, n: int) -> bytes | bytearray:
    if n < _CHUNK:
        return await reader.readexactly(n) if n else b""
    # Large segments (array buffers) land in one writable buffer, filled in chunks, so the
    # receiver holds the data once and numpy arrays rebuilt on it are writable.
    buf = fresh_buffer(n)
    view = memoryview(buf)
    filled = 0
    while filled < n:
        chunk = await reader.read(min(n - filled, 4 * _CHUNK))
        if not chunk:
            raise EOFError(f"stream ended {n - filled} bytes into a {n}-byte segment")
        view[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return buf


# -- handshake --------------------------------------------------------------------------------
# server -> client : HELLO(magic, version, offer, nonce_s)
# client -> server : nonce_c + choice + HMAC(key, "client" + transcript)
# server -> client : HMAC(key, "server" + transcript)
# where transcript = nonce_s + nonce_c + offer + choice, and choice is a subset of offer (bits:
# BULK_POLY1305). Each side then signs with HMAC(key, "c2s"/"s2c" + transcript): distinct per
# direction and per connection; the proofs cover offer and choice, so neither can be altered.

def _offer() -> int:
    return BULK_POLY1305 if bulk_mac_available() else 0


def _transcript(nonce_s: bytes, nonce_c: bytes, offer: int, choice: int) -> bytes:
    return nonce_s + nonce_c + bytes((offer, choice))


def _codec(key: bytes, transcript: bytes, *, client: bool, max_frame: int) -> Codec:
    c2s, s2c = _derive(key, b"c2s", transcript), _derive(key, b"s2c", transcript)
    send, recv = (c2s, s2c) if client else (s2c, c2s)
    return Codec(send_key=send, recv_key=recv, max_frame=max_frame,
                 bulk_mac=bool(transcript[-1] & BULK_POLY1305))


def server_hello() -> tuple[bytes, bytes]:
    """Engine side, step 1: a fresh nonce and the greeting that carries it."""
    nonce_s = os.urandom(NONCE_SIZE)
    return nonce_s, HELLO.pack(MAGIC, VERSION, _offer(), nonce_s)


def server_verify(key: bytes, nonce_s: bytes, answer: bytes,
                  max_frame: int = MAX_FRAME_BYTES) -> tuple[bytes, Codec]:
    """Engine side, step 2: check the client's proof; return our proof and the codec."""
    if len(answer) != CLIENT_PROOF_SIZE:
        raise ProtocolError("client did not prove the cluster key")
    nonce_c, choice, proof = answer[:NONCE_SIZE], answer[NONCE_SIZE], answer[NONCE_SIZE + 1:]
    transcript = _transcript(nonce_s, nonce_c, _offer(), choice)
    if not hmac.compare_digest(proof, _derive(key, b"client", transcript)):
        raise ProtocolError("client did not prove the cluster key")
    if choice & ~_offer():
        raise ProtocolError(f"client chose what this engine did not offer ({choice:#x})")
    return (_derive(key, b"server", transcript),
            _codec(key, transcript, client=False, max_frame=max_frame))


#: Bytes the client sends in the handshake (its nonce, its choice and its proof).
CLIENT_PROOF_SIZE = NONCE_SIZE + 1 + MAC_SIZE


async def server_handshake(reader: Reader, writer: Writer, key: bytes,
                           max_frame: int = MAX_FRAME_BYTES) -> Codec:
    """Engine side: prove the peer holds the key. Returns the connection's codec."""
    nonce_s, hello = server_hello()
    writer.write(hello)
    await writer.drain()
    answer = await reader.readexactly(CLIENT_PROOF_SIZE)
    proof, codec = server_verify(key, nonce_s, answer, max_frame)
    writer.write(proof)
    await writer.drain()
    return codec


def client_answer(key: bytes, hello: bytes) -> tuple[bytes, bytes]:
    """Client side, step 1: check the engine's greeting; return (the transcript, the answer
    to send)."""
    magic, version, offer, nonce_s = HELLO.unpack(hello)
    if magic != MAGIC:
        raise ProtocolError(f"the socket did not answer as an sshpar engine ({hello[:8]!r})")
    if version != VERSION:
        raise ProtocolError(f"engine speaks protocol {version}, this client {VERSION}")
    nonce_c = os.urandom(NONCE_SIZE)
    choice = offer & _offer()
    transcript = _transcript(nonce_s, nonce_c, offer, choice)
    return transcript, nonce_c + bytes((choice,)) + _derive(key, b"client", transcript)


def client_verify(key: bytes, transcript: bytes, proof: bytes,
                  max_frame: int = MAX_FRAME_BYTES) -> Codec:
    """Client side, step 2: check the engine's proof; return the connection's codec."""
    if not hmac.compare_digest(proof, _derive(key, b"server", transcript)):
        raise ProtocolError("engine did not prove the cluster key")
    return _codec(key, transcript, client=True, max_frame=max_frame)
