"""Unit tests for sshpar._wire: frames, their signatures and sequence numbers, the handshake.

No processes: frames travel through in-memory asyncio.StreamReaders and socketpairs.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshpar import _serialize, _wire
from sshpar._stream import FrameSender, client_handshake
from sshpar._wire import HEADER, MAC_SIZE, MAGIC, MAX_SEGMENTS, VERSION, Codec, Frame, Kind
from sshpar.errors import ProtocolError

T = TypeVar("T")
KEY = bytes(range(32))
#: Bound on every wait in this module; only a hang (a bug) ever gets near it.
WAIT = 10.0


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), WAIT)

    return asyncio.run(bounded())


def codec_pair(max_frame: int = _wire.MAX_FRAME_BYTES, *,
               bulk: bool = False) -> tuple[Codec, Codec]:
    """(client, server) codecs as a handshake would make them: one key per direction;
    ``bulk``: frames over 64 KiB are signed with Poly1305."""
    c2s, s2c = hashlib.sha256(b"c2s").digest(), hashlib.sha256(b"s2c").digest()
    return (Codec(send_key=c2s, recv_key=s2c, max_frame=max_frame, bulk_mac=bulk),
            Codec(send_key=s2c, recv_key=c2s, max_frame=max_frame, bulk_mac=bulk))


def frame_bytes(bufs: list) -> bytes:
    return b"".join(bytes(b) for b in bufs)


async def read_bytes(codec: Codec, data: bytes, *, eof: bool = True) -> Frame:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return await codec.read(reader)


def read_one(codec: Codec, data: bytes, *, eof: bool = True) -> Frame:
    return run(lambda: read_bytes(codec, data, eof=eof))


def segment_offsets(data: bytes) -> list[tuple[int, int]]:
    """(start, length) of each segment of the frame at the start of ``data``."""
    nseg = HEADER.unpack_from(data)[5]
    lengths = struct.unpack_from(f"!{nseg}Q", data, HEADER.size)
    pos = HEADER.size + 8 * nseg
    out = []
    for n in lengths:
        out.append((pos, n))
        pos += n
    return out


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips_with_its_envelope_and_payload(kind: Kind) -> None:
    client, server = codec_pair()
    meta = {"msg_id": "m-1", "op": "x", "n": 3, "nested": {"a": [1, 2.5, None, True]},
            "b": b"\x00\xff", "t": (1, "two")}
    data = frame_bytes(client.encode(kind, meta, [b"abc", b"", bytearray(b"xyz")]))
    frame = read_one(server, data)
    assert frame.kind is kind
    assert frame.meta == meta
    assert [bytes(p) for p in frame.payload] == [b"abc", b"", b"xyz"]


def test_several_frames_in_one_stream_arrive_in_order() -> None:
    client, server = codec_pair()
    data = b"".join(frame_bytes(client.encode(Kind.TASK, {"msg_id": str(i)}, [bytes([i])]))
                    for i in range(5))

    async def scenario() -> list[Frame]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return [await server.read(reader) for _ in range(5)]

    frames = run(scenario)
    assert [f.meta["msg_id"] for f in frames] == ["0", "1", "2", "3", "4"]
    assert [bytes(f.payload[0]) for f in frames] == [bytes([i]) for i in range(5)]


@pytest.mark.parametrize("nbytes", [800, 64 << 10, 3 << 20], ids=["small", "64KiB", "3MiB"])
def test_numpy_array_travels_out_of_band_and_comes_back_equal(nbytes: int) -> None:
    client, server = codec_pair()
    array = np.arange(nbytes // 8, dtype=np.float64).reshape(-1, 4)
    segments = _serialize.dumps(array)
    assert len(segments) == 2, "the array's data should travel as its own segment"
    assert segments[1].nbytes == array.nbytes
    frame = read_one(server, frame_bytes(client.encode(Kind.RESULT, {"status": "ok"},
                                                       segments)))
    back = _serialize.loads(frame.payload)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_large_array_is_rebuilt_writable_on_one_buffer() -> None:
    client, server = codec_pair()
    array = np.ones((1 << 20) // 8 * 2, dtype=np.float64)  # 2 MiB
    frame = read_one(server, frame_bytes(client.encode(Kind.TASK, {"msg_id": "a"},
                                                       _serialize.dumps(array))))
    back = _serialize.loads(frame.payload)
    assert back.flags.writeable
    back[0] = 42.0
    assert back[0] == 42.0 and back[1] == 1.0


def _huge_pages_of(address: int) -> int:
    """kB of transparent huge pages in this process's mapping that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_segment_is_received_into_huge_pages_where_the_kernel_offers_them() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    client, server = codec_pair()
    array = np.arange((16 << 20) // 8, dtype=np.float64)  # 16 MiB: at least 6 whole 2 MiB pages
    frame = read_one(server, frame_bytes(client.encode(Kind.RESULT, {"msg_id": "h"},
                                                       _serialize.dumps(array))))
    back = _serialize.loads(frame.payload)
    np.testing.assert_array_equal(back, array)
    assert _huge_pages_of(back.__array_interface__["data"][0]) >= 6 * 2048


def test_small_array_is_rebuilt_writable_too() -> None:
    client, server = codec_pair()
    array = np.zeros(10)
    frame = read_one(server, frame_bytes(client.encode(Kind.TASK, {"msg_id": "a"},
                                                       _serialize.dumps(array))))
    back = _serialize.loads(frame.payload)
    back[0] = 1.0
    assert back[0] == 1.0


def test_large_segment_arriving_in_small_pieces_is_reassembled() -> None:
    client, server = codec_pair()
    blob = os.urandom((1 << 20) + 12345)
    data = frame_bytes(client.encode(Kind.TASK, {"msg_id": "p"}, [blob]))

    async def scenario() -> Frame:
        reader = asyncio.StreamReader()
        reading = asyncio.ensure_future(server.read(reader))
        for start in range(0, len(data), 100_003):
            reader.feed_data(data[start:start + 100_003])
            await asyncio.sleep(0)  # let the reader consume: this is the point of the test
        reader.feed_eof()
        return await reading

    frame = run(scenario)
    assert bytes(frame.payload[0]) == blob


def test_encode_does_not_copy_large_payload_buffers() -> None:
    client, _ = codec_pair()
    array = np.arange(100_000, dtype=np.int32)
    bufs = client.encode(Kind.TASK, {"msg_id": "z"}, [array.data])
    assert len(bufs) == 4  # header+lengths, envelope, payload, mac
    assert isinstance(bufs[2], memoryview)
    assert np.shares_memory(np.frombuffer(bufs[2], dtype=np.int32), array)


def test_small_frame_is_one_buffer() -> None:
    client, server = codec_pair()
    bufs = client.encode(Kind.TASK, {"msg_id": "s"}, [b"abc"])
    assert len(bufs) == 1
    assert read_one(server, bytes(bufs[0])).payload == [b"abc"]


# -- handshake --------------------------------------------------------------------------------

async def socket_streams() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter],
                                    tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    a, b = socket.socketpair()
    return (await asyncio.open_unix_connection(sock=a), await asyncio.open_unix_connection(sock=b))


async def handshake(client_key: bytes = KEY, server_key: bytes = KEY) -> tuple[Any, Any]:
    """Run both sides; return (client outcome, server outcome): a Codec or the exception."""
    (cr, cw), (sr, sw) = await socket_streams()

    async def server() -> Codec:
        try:
            return await _wire.server_handshake(sr, sw, server_key)
        finally:
            sw.close()  # like the engine: a refused client is hung up on

    try:
        client_outcome, server_outcome = await asyncio.gather(
            client_handshake(cr, cw, client_key), server(), return_exceptions=True)
        return client_outcome, server_outcome
    finally:
        cw.close()


def test_handshake_gives_each_side_matching_direction_keys() -> None:
    async def scenario() -> list[Frame]:
        (cr, cw), (sr, sw) = await socket_streams()
        client, server = await asyncio.gather(client_handshake(cr, cw, KEY),
                                              _wire.server_handshake(sr, sw, KEY))
        cw.writelines(client.encode(Kind.TASK, {"msg_id": "c"}, [b"to-server"]))
        sw.writelines(server.encode(Kind.RESULT, {"msg_id": "c"}, [b"to-client"]))
        frames = [await server.read(sr), await client.read(cr)]
        cw.close()
        sw.close()
        return frames

    to_server, to_client = run(scenario)
    assert (to_server.kind, bytes(to_server.payload[0])) == (Kind.TASK, b"to-server")
    assert (to_client.kind, bytes(to_client.payload[0])) == (Kind.RESULT, b"to-client")


def test_handshake_with_a_client_holding_the_wrong_key_is_refused_by_the_engine() -> None:
    client, server = run(lambda: handshake(client_key=b"\x01" * 32))
    assert isinstance(server, ProtocolError)
    assert "client did not prove the cluster key" in str(server)
    # The client learns only that the engine hung up on it.
    assert isinstance(client, (ProtocolError, asyncio.IncompleteReadError, ConnectionError))


def test_client_with_the_wrong_key_gets_a_protocol_error() -> None:
    client, _server = run(lambda: handshake(client_key=b"\x01" * 32))
    assert isinstance(client, ProtocolError)
    assert "key" in str(client)


def test_handshake_with_an_engine_holding_the_wrong_key_is_refused() -> None:
    _client, server = run(lambda: handshake(server_key=b"\x02" * 32))
    assert isinstance(server, ProtocolError)


def test_client_refuses_an_engine_that_cannot_prove_the_key() -> None:
    """An impostor that skips checking the client and answers with a proof from another key."""

    async def scenario() -> BaseException | Codec:
        (cr, cw), (sr, sw) = await socket_streams()
        nonce_s = os.urandom(_wire.NONCE_SIZE)

        async def impostor() -> None:
            sw.write(_wire.HELLO.pack(MAGIC, VERSION, 0, nonce_s))
            answer = await sr.readexactly(_wire.CLIENT_PROOF_SIZE)
            nonce_c, choice = answer[:_wire.NONCE_SIZE], answer[_wire.NONCE_SIZE]
            assert choice == 0  # nothing was offered
            transcript = _wire._transcript(nonce_s, nonce_c, 0, choice)
            sw.write(_wire._derive(b"\x03" * 32, b"server", transcript))
            await sw.drain()

        outcome, _ = await asyncio.gather(client_handshake(cr, cw, KEY), impostor(),
                                          return_exceptions=True)
        cw.close()
        sw.close()
        return outcome

    outcome = run(scenario)
    assert isinstance(outcome, ProtocolError)
    assert "engine did not prove the cluster key" in str(outcome)


def test_client_refuses_a_socket_that_is_not_an_engine() -> None:
    async def scenario() -> BaseException | Codec:
        (cr, cw), (_sr, sw) = await socket_streams()
        sw.write(b"SSH-2.0-OpenSSH_9.2 hello there friend\r\n")
        outcome = (await asyncio.gather(client_handshake(cr, cw, KEY),
                                        return_exceptions=True))[0]
        cw.close()
        sw.close()
        return outcome

    outcome = run(scenario)
    assert isinstance(outcome, ProtocolError)
    assert "did not answer as an sshpar engine" in str(outcome)


def test_handshake_agrees_on_poly1305_for_bulk_frames_where_both_ends_have_it() -> None:
    client, server = run(handshake)
    assert isinstance(client, Codec) and isinstance(server, Codec)
    assert _wire.bulk_mac_available()  # cryptography comes with asyncssh and paramiko
    assert client.bulk_mac and server.bulk_mac


def test_a_client_facing_an_engine_without_poly1305_signs_with_hmac_only() -> None:
    async def scenario() -> tuple[int, Codec | BaseException]:
        (cr, cw), (sr, sw) = await socket_streams()
        nonce_s = os.urandom(_wire.NONCE_SIZE)
        seen: list[int] = []

        async def engine_without_it() -> None:  # offers nothing, else a real engine
            sw.write(_wire.HELLO.pack(MAGIC, VERSION, 0, nonce_s))
            answer = await sr.readexactly(_wire.CLIENT_PROOF_SIZE)
            nonce_c, choice = answer[:_wire.NONCE_SIZE], answer[_wire.NONCE_SIZE]
            seen.append(choice)
            sw.write(_wire._derive(KEY, b"server", _wire._transcript(nonce_s, nonce_c, 0,
                                                                      choice)))
            await sw.drain()

        outcome, _ = await asyncio.gather(client_handshake(cr, cw, KEY), engine_without_it(),
                                          return_exceptions=True)
        cw.close()
        sw.close()
        return seen[0], outcome

    choice, codec = run(scenario)
    assert choice == 0
    assert isinstance(codec, Codec) and not codec.bulk_mac


def test_an_offer_altered_in_transit_fails_the_handshake() -> None:
    nonce_s, hello = _wire.server_hello()
    assert hello[5] == _wire.BULK_POLY1305
    altered = hello[:5] + b"\x00" + hello[6:]          # as if to force the slower MAC
    _transcript, answer = _wire.client_answer(KEY, altered)
    with pytest.raises(ProtocolError, match="did not prove the cluster key"):
        _wire.server_verify(KEY, nonce_s, answer)


def test_an_engine_refuses_a_choice_it_did_not_offer(monkeypatch: pytest.MonkeyPatch) -> None:
    nonce_s, hello = _wire.server_hello()
    _transcript, answer = _wire.client_answer(KEY, hello)   # chooses Poly1305
    monkeypatch.setattr(_wire, "_poly1305", False)          # an engine without cryptography
    nonce_c, choice = answer[:_wire.NONCE_SIZE], answer[_wire.NONCE_SIZE]
    transcript = _wire._transcript(nonce_s, nonce_c, 0, choice)
    forged = nonce_c + bytes((choice,)) + _wire._derive(KEY, b"client", transcript)
    with pytest.raises(ProtocolError, match="did not offer"):
        _wire.server_verify(KEY, nonce_s, forged)


def test_bulk_frames_carry_a_poly1305_tag_keyed_for_each_frame() -> None:
    client, server = codec_pair(bulk=True)
    payload = [os.urandom(100_000)]
    first = frame_bytes(client.encode(Kind.RESULT, {"msg_id": "b"}, payload))
    second = frame_bytes(client.encode(Kind.RESULT, {"msg_id": "b"}, payload))
    for data in (first, second):
        assert data[-16:] == bytes(16)                     # the 16-byte tag, then zeros
        assert read_one(server, data, eof=False).payload == payload
    assert first[-MAC_SIZE:-16] != second[-MAC_SIZE:-16]   # same bytes, another key
    # Small frames keep HMAC-SHA256: an end that does not sign bulk frames reads them...
    sender, _ = codec_pair(bulk=True)
    _, plain = codec_pair()
    assert read_one(plain, frame_bytes(sender.encode(Kind.RESULT, {"msg_id": "s"}, [b"x"])),
                    eof=False).meta == {"msg_id": "s"}
    # ...but not a bulk frame (it expects HMAC-SHA256 there).
    _, plain = codec_pair()
    with pytest.raises(ProtocolError, match="does not verify"):
        read_one(plain, first)


def test_frame_from_one_connection_does_not_verify_on_another() -> None:
    async def scenario() -> tuple[bytes, Codec]:
        first, _ = await handshake()
        _, second_server = await handshake()
        return frame_bytes(first.encode(Kind.TASK, {"msg_id": "r"}, [b"x"])), second_server

    data, other = run(scenario)
    with pytest.raises(ProtocolError, match="does not verify"):
        read_one(other, data)


# -- refusing frames that are not genuine ------------------------------------------------------

def _sample(bulk: bool = False) -> bytes:
    """A frame: small (HMAC-SHA256), or ``bulk``: over 64 KiB, between codecs that sign
    those with Poly1305."""
    client, _ = codec_pair(bulk=bulk)
    payload = bytes(range(256)) * 400 if bulk else b"payload-bytes"
    return frame_bytes(client.encode(Kind.TASK, {"msg_id": "t"}, [payload]))


def _where(bulk: bool = False) -> dict[str, int]:
    data = _sample(bulk)
    segs = segment_offsets(data)
    where = {
        "magic-free header byte (flags)": 7,
        "kind": 5,
        "seq": 15,
        "length of the envelope": HEADER.size + 7,
        "mac": len(data) - MAC_SIZE + 3,
        "envelope": segs[0][0] + 2,
        "payload": segs[1][0] + 4,
    }
    if bulk:  # the tag fills 16 of the MAC's 32 bytes; the zeros after it are checked too
        where["mac's zero half"] = len(data) - 2
        where["payload's end"] = segs[1][0] + segs[1][1] - 1
    return where


@pytest.mark.parametrize(("bulk", "where"),
                         [(False, w) for w in _where()] + [(True, w) for w in _where(True)])
def test_any_flipped_byte_is_refused_as_not_verifying(bulk: bool, where: str) -> None:
    _, server = codec_pair(bulk=bulk)
    data = _sample(bulk)
    index = _where(bulk)[where]
    if where == "length of the envelope":
        # A length made smaller still leaves a complete frame to read; a larger one would
        # only wait for bytes that never come (tested with truncation below).
        b = bytearray(data)
        b[index] -= 1
        tampered = bytes(b)
    else:
        tampered = flip(data, index)
    with pytest.raises(ProtocolError, match="does not verify"):
        read_one(server, tampered)


def test_frame_signed_with_another_key_does_not_verify() -> None:
    _, server = codec_pair()
    stranger = Codec(send_key=b"k" * 32, recv_key=b"k" * 32)
    with pytest.raises(ProtocolError, match="does not verify"):
        read_one(server, frame_bytes(stranger.encode(Kind.TASK, {"msg_id": "s"})))


def test_replayed_frame_is_refused_as_out_of_sequence() -> None:
    client, server = codec_pair()
    data = frame_bytes(client.encode(Kind.TASK, {"msg_id": "once"}, [b"x"]))

    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data + data)
        reader.feed_eof()
        first = await server.read(reader)
        assert first.meta == {"msg_id": "once"}
        with pytest.raises(ProtocolError, match="out of sequence"):
            await server.read(reader)

    run(scenario)


def test_dropped_frame_is_refused_as_out_of_sequence() -> None:
    client, server = codec_pair()
    client.encode(Kind.TASK, {"msg_id": "lost"})
    with pytest.raises(ProtocolError, match="out of sequence"):
        read_one(server, frame_bytes(client.encode(Kind.TASK, {"msg_id": "next"})))


def test_oversize_frame_is_refused_before_its_body_is_read() -> None:
    client, _ = codec_pair()
    _, server = codec_pair(max_frame=1000)
    data = frame_bytes(client.encode(Kind.TASK, {"msg_id": "big"}, [b"x" * 2000]))
    head_and_lengths = data[:HEADER.size + 8 * 2]
    # No EOF and no more bytes: the codec must decide from the lengths alone.
    with pytest.raises(ProtocolError, match="exceeds the limit of 1000"):
        read_one(server, head_and_lengths, eof=False)


def test_frame_at_the_size_limit_is_accepted() -> None:
    client, _ = codec_pair()
    envelope = len(_wire.dumps_meta({"msg_id": "edge"}))
    _, server = codec_pair(max_frame=envelope + 500)
    frame = read_one(server, frame_bytes(client.encode(Kind.TASK, {"msg_id": "edge"},
                                                       [b"y" * 500])))
    assert bytes(frame.payload[0]) == b"y" * 500


def test_unknown_kind_is_refused_even_when_signed() -> None:
    client, server = codec_pair()
    data = frame_bytes(client.encode(99, {"msg_id": "k"}))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="unknown frame kind 99"):
        read_one(server, data)


def test_bad_magic_is_refused_from_the_header_alone() -> None:
    _, server = codec_pair()
    head = HEADER.pack(b"HTTP", VERSION, int(Kind.TASK), 0, 0, 1)
    with pytest.raises(ProtocolError, match="bad frame magic"):
        read_one(server, head, eof=False)


def test_other_protocol_version_is_refused() -> None:
    _, server = codec_pair()
    head = HEADER.pack(MAGIC, VERSION + 1, int(Kind.TASK), 0, 0, 1)
    with pytest.raises(ProtocolError, match=f"frame version {VERSION + 1}"):
        read_one(server, head, eof=False)


@pytest.mark.parametrize("nseg", [0, MAX_SEGMENTS + 1, 2**32 - 1])
def test_segment_count_out_of_bounds_is_refused_from_the_header_alone(nseg: int) -> None:
    _, server = codec_pair()
    head = HEADER.pack(MAGIC, VERSION, int(Kind.TASK), 0, 0, nseg)
    with pytest.raises(ProtocolError, match=f"claims {nseg} segments"):
        read_one(server, head, eof=False)


def test_truncated_stream_ends_with_eof_errors() -> None:
    client, _ = codec_pair()
    data = frame_bytes(client.encode(Kind.TASK, {"msg_id": "cut"}, [b"p" * 300]))
    big = frame_bytes(client.encode(Kind.TASK, {"msg_id": "cut"}, [b"q" * (2 << 20)]))
    cuts = [(data, 0), (data, 3), (data, HEADER.size + 5), (data, HEADER.size + 16 + 10),
            (data, len(data) - 1), (big, len(big) - 1000)]
    for blob, cut in cuts:
        _, server = codec_pair()
        with pytest.raises(EOFError):  # asyncio.IncompleteReadError is an EOFError
            read_one(server, blob[:cut])
    _, server = codec_pair()
    with pytest.raises(asyncio.IncompleteReadError):
        read_one(server, b"")


# -- the envelope -----------------------------------------------------------------------------

def test_envelope_with_a_class_reference_is_refused_without_running_it() -> None:
    client, server = codec_pair()
    data = frame_bytes(client.encode(Kind.TASK, {"when": datetime.datetime(2024, 1, 1)}))
    with pytest.raises(ProtocolError, match="datetime"):
        read_one(server, data)


class _Boom:
    calls = 0

    def __reduce__(self) -> Any:
        return (_Boom._fire, ())

    @staticmethod
    def _fire() -> None:
        _Boom.calls += 1


def test_loads_meta_refuses_classes_and_callables() -> None:
    with pytest.raises(ProtocolError, match="datetime.date"):
        _wire.loads_meta(_wire.dumps_meta({"d": datetime.date(2020, 1, 1)}))
    with pytest.raises(ProtocolError, match="_fire"):
        _wire.loads_meta(_wire.dumps_meta({"x": _Boom()}))
    assert _Boom.calls == 0


@pytest.mark.parametrize("data, message", [
    (pickle.dumps([1, 2], protocol=5), "not a mapping"),
    (b"\x80\x05garbage", "unreadable frame envelope"),
    (b"", "unreadable frame envelope"),
])
def test_loads_meta_refuses_what_is_not_a_plain_mapping(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        _wire.loads_meta(data)


def test_loads_meta_accepts_plain_data() -> None:
    meta = {"s": "é", "i": -(2**70), "f": 1.5, "l": [None, True], "t": (b"x",), "d": {1: 2},
            "set": {1, 2}, "fs": frozenset({3})}
    assert _wire.loads_meta(memoryview(_wire.dumps_meta(meta))) == meta


# -- FrameSender ------------------------------------------------------------------------------

def test_frame_sender_keeps_order_across_small_and_large_frames() -> None:
    sizes = [10, 5 << 20, 20, 300 << 10, 30]

    async def scenario() -> list[Frame]:
        client, server = codec_pair()
        (_cr, cw), (sr, sw) = await socket_streams()
        sender = FrameSender(client, cw)
        for i, n in enumerate(sizes):
            sender.send(Kind.TASK, {"msg_id": str(i)}, [np.full(n, i % 256, dtype=np.uint8)])
        frames = [await server.read(sr) for _ in sizes]
        await sender.flush()
        assert sender.error is None
        cw.close()
        sw.close()
        return frames

    frames = run(scenario)
    assert [f.meta["msg_id"] for f in frames] == [str(i) for i in range(len(sizes))]
    for i, (f, n) in enumerate(zip(frames, sizes)):
        payload = bytes(f.payload[0])
        assert len(payload) == n and payload == bytes([i % 256]) * n


# -- fuzz -------------------------------------------------------------------------------------

_FUZZ_MAX = 1 << 16  # small, so a forged length never makes the reader allocate much


def _valid_frame() -> bytes:
    client, _ = codec_pair(max_frame=_FUZZ_MAX)
    return frame_bytes(client.encode(Kind.RESULT, {"status": "ok", "msg_id": "f"},
                                     [b"segment-one", b"", b"two" * 20]))


_VALID = _valid_frame()


def _mutated(index: int, xor: int, cut: int) -> bytes:
    data = bytearray(_VALID)
    data[index % len(data)] ^= xor
    return bytes(data[:cut])


_fuzz_input = st.one_of(
    st.binary(max_size=600),
    # a plausible header followed by anything
    st.builds(lambda kind, flags, seq, nseg, rest: HEADER.pack(MAGIC, VERSION, kind, flags,
                                                                seq, nseg) + rest,
              st.integers(0, 255), st.integers(0, 65535), st.integers(0, 3),
              st.integers(0, 8), st.binary(max_size=400)),
    # a genuine frame with one byte changed, maybe cut short
    st.builds(_mutated,
              st.integers(0, 10_000), st.integers(1, 255), st.integers(0, 10_000)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fuzz_input)
def test_fuzzed_input_only_ever_raises_protocol_or_eof_errors(data: bytes) -> None:
    _, server = codec_pair(max_frame=_FUZZ_MAX)
    try:
        read_one(server, data)
    except (ProtocolError, asyncio.IncompleteReadError, EOFError):
        return
    pytest.fail(f"a forged or garbled frame was accepted: {data!r}")


def test_the_fuzzed_valid_frame_is_itself_accepted() -> None:
    _, server = codec_pair(max_frame=_FUZZ_MAX)
    assert read_one(server, _VALID).meta == {"status": "ok", "msg_id": "f"}


# -- FrameParser: the push parser the engine and client read with ----------------------------

def _stream(codec: Codec, count: int, payload: list) -> bytes:
    return b"".join(frame_bytes(codec.encode(Kind.TASK, {"msg_id": str(i)}, payload))
                    for i in range(count))


@pytest.mark.parametrize("bulk", [False, True], ids=["hmac", "poly1305"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 16])
def test_parser_reassembles_frames_from_any_chunking(chunk: int, bulk: bool) -> None:
    client, server = codec_pair(bulk=bulk)
    array = np.arange(200_000, dtype=np.float64)  # a 1.6 MB out-of-band segment
    data = _stream(client, 3, _serialize.dumps(array))
    parser = _wire.FrameParser(server)
    frames = []
    step = chunk if chunk > 1 else 1
    if chunk == 1:  # byte by byte would be slow for 5 MB: only the first frame's header part
        head = data[:200]
        for i in range(len(head)):
            frames += parser.feed(head[i:i + 1])
        frames += parser.feed(data[200:])
    else:
        for i in range(0, len(data), step):
            frames += parser.feed(data[i:i + step])
    assert [f.meta["msg_id"] for f in frames] == ["0", "1", "2"]
    back = _serialize.loads(frames[2].payload)
    assert (back == array).all() and back.flags.writeable


def test_parser_refuses_oversize_before_the_mac_arrives() -> None:
    _, server = codec_pair(max_frame=1000)
    parser = _wire.FrameParser(server)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        parser.feed(HEADER.pack(MAGIC, VERSION, int(Kind.TASK), 0, 0, 1) + struct.pack("!Q", 5000))


def test_parser_refuses_tampering_and_replay() -> None:
    client, server = codec_pair()
    good = frame_bytes(client.encode(Kind.TASK, {"msg_id": "a"}, [b"x"]))
    bad = bytearray(good)
    bad[-1] ^= 1
    with pytest.raises(ProtocolError, match="does not verify"):
        _wire.FrameParser(server).feed(bytes(bad))
    parser = _wire.FrameParser(codec_pair()[1])
    assert len(parser.feed(good)) == 1
    with pytest.raises(ProtocolError, match="out of sequence"):
        parser.feed(good)


# -- functions sent once per stream -----------------------------------------------------------

def test_a_stream_sends_a_function_once_then_its_digest() -> None:
    from sshpar._stream import FunctionRefs

    refs = FunctionRefs()
    function, args = b"f" * 200, b"args"
    sent = [refs.compact({"msg_id": str(i)}, [function, args]) for i in range(3)]
    digest = _wire.function_digest(function)
    assert sent[0] == ({"msg_id": "0", "fn_keep": digest}, [function, args])
    assert sent[1] == ({"msg_id": "1", "fn": digest}, [b"", args])
    assert sent[2] == ({"msg_id": "2", "fn": digest}, [b"", args])
    tiny = refs.compact({"msg_id": "t"}, [b"x", args])
    assert tiny == ({"msg_id": "t"}, [b"x", args])  # not worth a reference
