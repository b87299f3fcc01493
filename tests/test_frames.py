"""The sans-I/O wire format: round trips, ring wrap-around, and fuzzing: any input
either parses or raises a PiecedError, never anything else, in bounded memory."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pieced.protocol.client import ClientCore
from pieced.protocol.frames import (
    HEADER,
    MAX_BLOCK,
    FrameReader,
    FrameType,
    RecvRing,
    encode_ack,
    encode_control,
    encode_read,
    encode_read_ring,
    encode_write_header,
    encode_write_ring,
)
from pieced.protocol.messages import (
    BINARY_KEYS,
    decode_error,
    encode_error,
    from_wire,
    hello,
    to_wire,
)
from pieced.storage.errors import OutOfRange, PiecedError, StorageIOError, TooLarge


def feed_all(reader: FrameReader, data: bytes, chunk: int) -> list:
    """Push ``data`` through the ring in ``chunk``-sized receives, releasing block
    payloads as soon as they are seen (as the daemon does once written)."""
    ring = reader.ring
    frames = []
    pos = 0
    while True:
        while pos < len(data):
            buf = ring.writable()
            if not buf:
                break
            n = min(len(buf), chunk, len(data) - pos)
            buf[:n] = data[pos : pos + n]
            ring.wrote(n)
            pos += n
        progressed = False
        while (f := reader.next_frame()) is not None:
            progressed = True
            if f.payload:
                f.payload = tuple(bytes(v) for v in f.payload)
            if f.token is not None:
                ring.release(f.token)
            frames.append(f)
        if pos >= len(data) and not progressed:
            return frames
        if not progressed and not ring.writable():
            raise AssertionError("ring full and nothing parsable")


ih_st = st.binary(min_size=20, max_size=20)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def frames(draw: st.DrawFn) -> tuple[bytes, tuple]:
    kind = draw(st.sampled_from(["req", "write", "ring", "read", "read_ring", "ack"]))
    rid = draw(u32)
    ih = draw(ih_st)
    if kind == "req":
        keys = st.sampled_from(sorted(BINARY_KEYS)) | st.text(min_size=1, max_size=5)
        body = draw(st.dictionaries(keys, st.integers() | st.binary(max_size=30), max_size=4))
        return encode_control(FrameType.REQUEST, rid, to_wire(body)), ("req", rid, body)
    if kind == "write":
        data = draw(st.binary(max_size=5000))
        return encode_write_header(rid, ih, draw(u32), draw(u32), len(data)) + data, ("write", rid, ih, data)
    if kind == "ring":
        p, b, off, n = draw(u32), draw(u32), draw(st.integers(0, 2**64 - 1)), draw(u32)
        return encode_write_ring(rid, ih, p, b, off, n), ("ring", rid, ih, p, b, off, n)
    if kind == "read":
        p, b, n = draw(u32), draw(u32), draw(u32)
        return encode_read(rid, ih, p, b, n, 1), ("read", rid, ih, p, b, n)
    if kind == "read_ring":
        p, b, off, n = draw(u32), draw(u32), draw(st.integers(0, 2**64 - 1)), draw(u32)
        return encode_read_ring(rid, ih, p, b, off, n, 1), ("read_ring", rid, ih, p, b, off, n)
    return encode_ack(rid), ("ack", rid)


def _request(rid: int, body: dict) -> tuple[bytes, tuple]:
    return encode_control(FrameType.REQUEST, rid, to_wire(body)), ("req", rid, body)


def _as_decoded(key: str, value: object) -> object:
    """What ``from_wire`` gives back for ``value`` sent under ``key``: bytes become text
    if they are UTF-8, except under the binary keys, where they always stay bytes."""
    if isinstance(value, bytes) and key not in BINARY_KEYS and _utf8(value):
        return value.decode()
    return value


@settings(max_examples=200, deadline=None)
@given(st.lists(frames(), max_size=20), st.integers(1, 7000), st.integers(0, 9000))
@example([_request(1, {"have": b"", "ih": b"abc", "data": b"\xff", "name": b"x", "n": b"\xfe"})], 7, 9000)
def test_round_trip_through_a_wrapping_ring(items: list, chunk: int, skew: int) -> None:
    ring = RecvRing(16384 + 64)
    reader = FrameReader(ring, max_frame=16384)
    # Start the ring part-way round, so frames straddle the wrap.
    ring.head = ring.parsed = ring.tail = skew
    out = feed_all(reader, b"".join(raw for raw, _ in items), chunk)
    assert len(out) == len(items)
    for f, (_, want) in zip(out, items, strict=True):
        kind, rid = want[0], want[1]
        assert f.id == rid
        if kind == "req":
            assert f.type == FrameType.REQUEST and from_wire(f.body) == {
                k: _as_decoded(k, v) for k, v in want[2].items()
            }
        elif kind == "write":
            assert f.type == FrameType.WRITE and f.info_hash == want[2]
            assert b"".join(f.payload) == want[3] and f.length == len(want[3])
        elif kind == "ring":
            assert (f.info_hash, f.piece, f.begin, f.ring_offset, f.length) == want[2:]
        elif kind == "read":
            assert (f.info_hash, f.piece, f.begin, f.length, f.flags) == (*want[2:], 1)
        elif kind == "read_ring":
            assert f.type == FrameType.READ_RING and f.flags == 1
            assert (f.info_hash, f.piece, f.begin, f.ring_offset, f.length) == want[2:]
        else:
            assert f.type == FrameType.ACK
    assert ring.used == 0  # every byte was released


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 500))
def test_random_bytes_parse_or_raise_protocol_errors(data: bytes, chunk: int) -> None:
    reader = FrameReader(RecvRing(4096 + 64), max_frame=4096)
    with contextlib.suppress(PiecedError):
        feed_all(reader, data, chunk)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=5), st.data())
def test_mutated_frames_parse_or_raise(items: list, data: st.DataObject) -> None:
    raw = bytearray(b"".join(r for r, _ in items))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    reader = FrameReader(RecvRing(16384 + 64), max_frame=16384)
    with contextlib.suppress(PiecedError):
        feed_all(reader, bytes(raw[:cut]), 977)


def test_specific_errors() -> None:
    def first_error(raw: bytes) -> PiecedError:
        reader = FrameReader(RecvRing(4096 + 64), max_frame=4096)
        with pytest.raises(PiecedError) as exc:
            feed_all(reader, raw, 4096)
        return exc.value

    assert isinstance(first_error(HEADER.pack(10**6, 2, 0, 0, 1)), TooLarge)
    assert "shorter than its header" in str(first_error(HEADER.pack(3, 2, 0, 0, 1)))
    assert "unknown frame type" in str(first_error(HEADER.pack(8, 99, 0, 0, 1)))
    assert "not canonical bencode" in str(first_error(HEADER.pack(8 + 3, 2, 0, 0, 1) + b"xyz"))
    assert "malformed extension" in str(first_error(HEADER.pack(8 + 3, 17, 0, 0, 1) + b"abc"))
    assert "reserved" in str(first_error(HEADER.pack(8, 20, 0, 1, 1)))


def test_errors_cross_the_wire_with_their_type_and_errno() -> None:
    for err in (OutOfRange("piece 9 is out of range"), StorageIOError("write x: No space", errno=28)):
        reader = FrameReader(RecvRing(4096 + 64), max_frame=4096)
        (frame,) = feed_all(reader, encode_error(5, err), 100)
        back = decode_error(frame.body)
        assert type(back) is type(err) and back.message == err.message and back.errno == err.errno


def test_ring_release_out_of_order() -> None:
    ring = RecvRing(100)
    ring.wrote(90)
    a = ring.take(30)[1]
    b = ring.take(30)[1]
    c = ring.take(30)[1]
    ring.release(b)
    assert ring.tail == 0 and ring.writable().nbytes == 10
    ring.release(a)
    assert ring.tail == 60
    ring.release(c)
    assert ring.used == 0 and ring.writable().nbytes == 100  # empty: from its start again
    ring.wrote(10)
    assert ring.writable().nbytes == 90
    random.seed(0)


def test_inline_block_over_max_block_is_skipped_not_fatal() -> None:
    """Within max_frame the stream is intact: the reader skips the block (the daemon then
    answers its id with an error) and the next frame parses."""
    ih = bytes(range(20))
    reader = FrameReader(RecvRing(4 * MAX_BLOCK), max_frame=2 * MAX_BLOCK)
    big = encode_write_header(7, ih, 1, 0, MAX_BLOCK + 1) + bytes(MAX_BLOCK + 1)
    small = encode_write_header(8, ih, 1, 0, 3) + b"abc"
    first, second = feed_all(reader, big + small, 65536)
    assert (first.type, first.id, first.length, first.payload, first.token) == (
        FrameType.WRITE, 7, MAX_BLOCK + 1, (), None)
    assert second.id == 8 and b"".join(second.payload) == b"abc"
    assert reader.ring.used == 0
    with pytest.raises(TooLarge):  # over max_frame it is still fatal
        feed_all(FrameReader(RecvRing(2 * MAX_BLOCK + 64), max_frame=MAX_BLOCK), big, 65536)


def test_client_adopts_the_daemons_max_frame() -> None:
    """The daemon's HELLO sets the limit for frames both ways: the client's reader takes
    it (its ring grows to hold such a frame), and the client refuses to send more."""
    for max_frame in (64 * 1024, 32 * 1024 * 1024):
        core = ClientCore()
        core.hello()
        reply = encode_control(FrameType.HELLO, 0, to_wire(hello("server", "pieced", max_frame=max_frame)))
        buf = core.ring.writable()
        buf[: len(reply)] = reply
        core.received(len(reply))
        core.hello_done()
        assert core.max_frame == core.reader.max_frame == max_frame
        assert core.ring.capacity >= max_frame + 4 and core.reader.ring is core.ring
        with pytest.raises(TooLarge):
            core.write(bytes(20), 0, 0, max_frame, False)
        with pytest.raises(TooLarge):
            core.request("register", {"metainfo": bytes(max_frame)})
        assert core.writes_in_flight == 0 and not core.waiters
