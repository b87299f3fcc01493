"""The peer wire codec: every message round trips, a stream parses the same however it
is cut, malformed input raises WireError (and nothing else), and the allowed-fast set
matches its worked example."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pieced.peer.wire import (
    BLOCK,
    HANDSHAKE_LEN,
    PROTOCOL,
    AllowedFast,
    Bitfield,
    Cancel,
    Choke,
    Event,
    Extended,
    Handshake,
    Hashes,
    HashReject,
    HashRequest,
    Have,
    HaveAll,
    HaveNone,
    Interested,
    KeepAlive,
    MsgId,
    NotInterested,
    Parser,
    Piece,
    Port,
    RejectRequest,
    Request,
    SuggestPiece,
    Unchoke,
    Unknown,
    WireError,
    allowed_fast,
    allowed_fast_set,
    bitfield,
    bits_from_pieces,
    cancel,
    choke,
    encode,
    extended,
    handshake,
    hash_reject,
    hash_request,
    hashes,
    have,
    have_all,
    have_none,
    interested,
    keep_alive,
    make_reserved,
    not_interested,
    piece,
    piece_header,
    pieces_from_bits,
    port,
    reject_request,
    request,
    suggest_piece,
    supports_extended,
    supports_fast,
    supports_v2,
    unchoke,
)

INFO_HASH = bytes(range(20))
PEER_ID = b"-LT2110-abcdefghijkl"
ROOT = bytes(range(100, 132))
# libtorrent's extension handshake, abridged: bencoded, passed through undecoded.
LT_EXT_HANDSHAKE = (
    b"d1:md11:lt_donthavei7e10:share_modei8e11:upload_onlyi3e12:ut_holepunchi4e"
    b"11:ut_metadatai2e6:ut_pexi1ee13:metadata_sizei4242e4:reqqi500e1:v17:libtorrent/2.1.1e"
)

SAMPLES: list[tuple[Event, bytes]] = [
    (KeepAlive(), keep_alive()),
    (Choke(), choke()),
    (Unchoke(), unchoke()),
    (Interested(), interested()),
    (NotInterested(), not_interested()),
    (Have(7), have(7)),
    (Bitfield(b"\xff\xe0"), bitfield(b"\xff\xe0")),
    (Request(3, BLOCK, BLOCK), request(3, BLOCK, BLOCK)),
    (Piece(3, BLOCK, b"\x01" * 100), piece(3, BLOCK, b"\x01" * 100)),
    (Piece(0, 0, b""), piece(0, 0, b"")),
    (Cancel(3, 0, BLOCK), cancel(3, 0, BLOCK)),
    (Port(6881), port(6881)),
    (SuggestPiece(9), suggest_piece(9)),
    (HaveAll(), have_all()),
    (HaveNone(), have_none()),
    (RejectRequest(1, 2, 3), reject_request(1, 2, 3)),
    (AllowedFast(2**32 - 1), allowed_fast(2**32 - 1)),
    (Extended(0, LT_EXT_HANDSHAKE), extended(0, LT_EXT_HANDSHAKE)),
    (Extended(3, b""), extended(3, b"")),
    (HashRequest(ROOT, 0, 512, 512, 8), hash_request(ROOT, 0, 512, 512, 8)),
    (Hashes(ROOT, 0, 0, 2, 1, b"h" * 96), hashes(ROOT, 0, 0, 2, 1, b"h" * 96)),
    (Hashes(ROOT, 1, 2, 3, 4, b""), hashes(ROOT, 1, 2, 3, 4, b"")),
    (HashReject(ROOT, 3, 0, 4, 0), hash_reject(ROOT, 3, 0, 4, 0)),
    (Unknown(10, b"abc"), b"\0\0\0\x04\x0aabc"),
    (Unknown(255, b""), b"\0\0\0\x01\xff"),
]


def parse(data: bytes, *, handshake: bool = False, chunk: int = 0) -> list[Event]:
    p = Parser(handshake=handshake)
    if not chunk:
        return p.feed(data)
    out: list[Event] = []
    for i in range(0, len(data), chunk):
        out += p.feed(data[i : i + chunk])
    return out


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(("event", "wire"), SAMPLES, ids=lambda v: type(v).__name__)
def test_every_message_round_trips(event: Event, wire: bytes) -> None:
    assert encode(event) == wire
    (length,) = struct.unpack_from(">I", wire)
    assert length == len(wire) - 4
    assert parse(wire) == [event]
    assert parse(wire, chunk=1) == [event]


def test_wire_bytes_layout() -> None:
    assert keep_alive() == b"\0\0\0\0"
    assert choke() == b"\0\0\0\x01\x00"
    assert have(0x01020304) == b"\0\0\0\x05\x04\x01\x02\x03\x04"
    assert request(1, 2, 3) == b"\0\0\0\x0d\x06" + b"\0\0\0\x01\0\0\0\x02\0\0\0\x03"
    assert port(0x1AE1) == b"\0\0\0\x03\x09\x1a\xe1"
    assert have_all() == b"\0\0\0\x01\x0e" and have_none() == b"\0\0\0\x01\x0f"
    assert reject_request(0, 0, 0)[4] == 0x10 and allowed_fast(0)[4] == 0x11
    assert suggest_piece(0)[4] == 0x0D
    assert extended(1, b"de") == b"\0\0\0\x04\x14\x01de"
    req = hash_request(ROOT, 1, 2, 3, 4)
    assert req == b"\0\0\0\x31\x15" + ROOT + struct.pack(">IIII", 1, 2, 3, 4)
    assert hash_reject(ROOT, 1, 2, 3, 4)[4:5] == b"\x17"
    assert hashes(ROOT, 1, 2, 3, 4, b"x" * 32)[:5] == b"\0\0\0\x51\x16"


def test_handshake_round_trips() -> None:
    reserved = make_reserved(v2=True)
    wire = handshake(INFO_HASH, PEER_ID, reserved)
    assert len(wire) == HANDSHAKE_LEN and wire.startswith(PROTOCOL)
    event = Handshake(reserved, INFO_HASH, PEER_ID)
    assert parse(wire, handshake=True) == [event]
    assert encode(event) == wire


def test_piece_header_is_the_start_of_a_piece() -> None:
    data = bytes(range(256)) * 64
    assert piece_header(5, 2 * BLOCK, len(data)) + data == piece(5, 2 * BLOCK, data)
    assert len(piece_header(0, 0, BLOCK)) == 13


def test_events_are_frozen_and_slotted() -> None:
    for event, _ in SAMPLES:
        assert not hasattr(event, "__dict__")
        assert dataclasses.is_dataclass(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Have(1).piece = 2  # type: ignore[misc]


def test_msg_ids() -> None:
    assert [int(m) for m in MsgId] == [*range(10), 13, 14, 15, 16, 17, 20, 21, 22, 23]


def test_encoders_refuse_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        handshake(INFO_HASH[:19], PEER_ID, make_reserved())
    with pytest.raises(ValueError):
        handshake(INFO_HASH, PEER_ID + b"x", make_reserved())
    with pytest.raises(ValueError):
        handshake(INFO_HASH, PEER_ID, b"\0" * 7)
    with pytest.raises(ValueError):
        hash_request(ROOT[:31], 0, 0, 1, 0)
    with pytest.raises(ValueError):
        hashes(ROOT, 0, 0, 1, 0, b"x" * 33)
    with pytest.raises(TypeError):
        encode("choke")  # type: ignore[arg-type]


# ---------------------------------------------------------------- reserved bits


def test_reserved_bits() -> None:
    assert make_reserved() == b"\0\0\0\0\0\x10\0\x04"
    assert make_reserved(extended=False, fast=False) == bytes(8)
    assert make_reserved(fast=False, v2=True) == b"\0\0\0\0\0\x10\0\x10"
    r = make_reserved(v2=True)
    assert supports_extended(r) and supports_fast(r) and supports_v2(r)
    r = make_reserved(extended=False, fast=False)
    assert not (supports_extended(r) or supports_fast(r) or supports_v2(r))
    assert supports_fast(make_reserved(extended=False)) and not supports_v2(make_reserved())


# ---------------------------------------------------------------- streams


def libtorrent_stream() -> tuple[bytes, list[Event]]:
    """What a libtorrent 2.1 seed sends: handshake, its extension handshake before
    any have message, have-all (fast extension), allowed-fast, unchoke, then blocks."""
    reserved = make_reserved(v2=True)
    events: list[Event] = [
        Handshake(reserved, INFO_HASH, PEER_ID),
        Extended(0, LT_EXT_HANDSHAKE),
        HaveAll(),
        AllowedFast(4),
        AllowedFast(17),
        Unchoke(),
        *(Piece(4, i * BLOCK, bytes([i]) * BLOCK) for i in range(4)),
        Piece(17, 0, b"\x99" * 1000),
        KeepAlive(),
        Extended(2, b"d8:msg_typei1e5:piecei0ee"),
        RejectRequest(17, BLOCK, BLOCK),
    ]
    wire = handshake(INFO_HASH, PEER_ID, reserved) + b"".join(encode(e) for e in events[1:])
    return wire, events


@pytest.mark.parametrize("chunk", [0, 1, 2, 3, 7, 13, 68, 69, 1000, BLOCK - 1, BLOCK + 13])
def test_libtorrent_sequence_any_cut(chunk: int) -> None:
    wire, events = libtorrent_stream()
    assert parse(wire, handshake=True, chunk=chunk) == events


def test_cut_inputs_of_every_buffer_type() -> None:
    wire, events = libtorrent_stream()
    p = Parser()
    out: list[Event] = []
    cuts = [0, 5, 68, 70, 71, 200, 5000, 30000, 30001, 60000, len(wire)]
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        part = wire[a:b]
        out += p.feed((part, bytearray(part), memoryview(part))[i % 3])
    assert out == events


def test_mutable_input_may_be_reused_after_feed() -> None:
    """Held-back bytes from a bytearray must not change when the caller reuses it."""
    msg = piece(1, 0, b"A" * 10000)
    p = Parser(handshake=False)
    buf = bytearray(msg[:6000])
    assert p.feed(buf) == []
    buf[:] = b"Z" * len(buf)
    view = memoryview(bytearray(msg[6000:]))
    assert p.feed(view) == [Piece(1, 0, b"A" * 10000)]


def test_views_parser_hands_out_whole_blocks_uncopied_and_cut_ones_right() -> None:
    """``views=True``: a block whole in the buffer fed is a view of that buffer (the
    caller copies it once, where it goes); one cut by the end of a feed is still right
    after the caller reuses the buffer it began in."""
    a, b, c = (bytes([n]) * BLOCK for n in (1, 2, 3))
    stream = piece(0, 0, a) + have(7) + piece(0, BLOCK, b) + piece(0, 2 * BLOCK, c)
    cut = len(stream) - 5000
    p = Parser(handshake=False, views=True)
    buf = bytearray(stream[:cut])
    got = p.feed(buf)
    assert got == [Piece(0, 0, a), Have(7), Piece(0, BLOCK, b)]
    first = got[0].data
    assert isinstance(first, memoryview) and first.obj is buf
    buf[13] = 0xFF  # the view is of the caller's buffer, not a copy
    assert first[0] == 0xFF
    buf[:] = b"Z" * len(buf)  # reused: the held-back start of the third block is a copy
    assert p.feed(memoryview(bytearray(stream[cut:]))) == [Piece(0, 2 * BLOCK, c)]


def test_large_bytes_tail_is_held_without_copy_and_stays_right() -> None:
    data = bytes(range(256)) * 64
    msg = piece(2, BLOCK, data) + have(3)
    p = Parser(handshake=False)
    assert p.feed(msg[:10000]) == []
    assert p.feed(msg[10000:10001]) == []
    assert p.feed(msg[10001:]) == [Piece(2, BLOCK, data), Have(3)]


def test_handshake_then_nothing_waits() -> None:
    p = Parser()
    wire = handshake(INFO_HASH, PEER_ID, make_reserved())
    assert p.feed(wire[:48]) == []  # the info hash may arrive before the peer id
    assert p.feed(wire[48:] + interested()) == [
        Handshake(make_reserved(), INFO_HASH, PEER_ID),
        Interested(),
    ]
    assert p.feed(b"") == []


def test_parser_without_handshake() -> None:
    assert parse(unchoke() + have(1)) == [Unchoke(), Have(1)]


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "data",
    [
        b"\x12BitTorrent protoco",
        b"\x13BitTorrent protocoL" + bytes(48),
        b"GET / HTTP/1.1\r\n",
        bytes(68),
    ],
)
def test_bad_protocol_string(data: bytes) -> None:
    with pytest.raises(WireError, match="handshake"):
        Parser().feed(data)
    with pytest.raises(WireError, match="handshake"):
        parse(data, handshake=True, chunk=1)


def test_bad_protocol_string_refused_before_the_whole_handshake() -> None:
    p = Parser()
    assert p.feed(b"\x13BitTorrent prot") == []
    with pytest.raises(WireError, match="handshake"):
        p.feed(b"x")
    p = Parser()
    with pytest.raises(WireError, match="length is 18"):
        p.feed(b"\x12")


@pytest.mark.parametrize("mid,limit", [
    (MsgId.CHOKE, 1), (MsgId.HAVE_NONE, 1), (MsgId.HAVE, 5), (MsgId.SUGGEST_PIECE, 5),
    (MsgId.REQUEST, 13), (MsgId.REJECT_REQUEST, 13), (MsgId.PORT, 3),
    (MsgId.HASH_REQUEST, 49), (MsgId.PIECE, 9 + BLOCK), (MsgId.BITFIELD, 1 + 13),
    (MsgId.EXTENDED, 2 + 65536), (99, 1 + 65536),
])
def test_each_kind_of_message_is_refused_past_its_longest_as_its_id_arrives(
        mid: int, limit: int) -> None:
    """Any message up to 2 MiB was taken and held while its body came: a peer could
    make each connection hold megabytes for a HAVE or an extension message that no
    correct peer sends longer than a few bytes or 64 KiB. Each kind now has its own
    bound, checked on the fifth byte, whether it comes with the length or after."""
    for cut in (5, 4):
        p = Parser(handshake=False, bitfield_bytes=13)
        head = struct.pack(">IB", limit, mid)
        p.feed(head[:cut])
        p.feed(head[cut:])  # at the bound: taken (or waited for)
        p = Parser(handshake=False, bitfield_bytes=13)
        head = struct.pack(">IB", limit + 1, mid)
        with pytest.raises(WireError, match=f"{limit + 1} bytes, more than the {limit}"):
            p.feed(head[:cut])
            p.feed(head[cut:])
    # on a stream of whole messages too, after others in the same feed
    p = Parser(handshake=False, bitfield_bytes=13)
    with pytest.raises(WireError, match=f"more than the {limit} allowed"):
        p.feed(have(1) + struct.pack(">IB", limit + 1, mid) + bytes(64))


def test_a_bitfield_is_bounded_by_the_torrent_and_the_longest_message_by_the_cap() -> None:
    p = Parser(handshake=False, bitfield_bytes=(1_000_000 + 7) // 8)
    assert p.feed(bitfield(bytes(125_000))) == [Bitfield(bytes(125_000))]  # past 64 KiB
    with pytest.raises(WireError, match="BITFIELD message of 125002 bytes"):
        p.feed(bitfield(bytes(125_001)))
    p = Parser(handshake=False, max_message=1000)
    with pytest.raises(WireError, match="1001 bytes, more than the 1000"):
        p.feed(struct.pack(">IB", 1001, MsgId.EXTENDED))


def test_oversize_length_refused_before_the_body() -> None:
    p = Parser(handshake=False, max_message=1000)
    assert p.feed(struct.pack(">IB", 1000, 5)) == []  # at the bound: buffered
    p = Parser(handshake=False, max_message=1000)
    with pytest.raises(WireError, match="1001"):
        p.feed(struct.pack(">I", 1001))
    p = Parser(handshake=False, max_message=1000)
    assert p.feed(have(1) + b"\0\0") == [Have(1)]
    with pytest.raises(WireError):
        p.feed(b"\x03\xe9")
    with pytest.raises(WireError):
        Parser(handshake=False).feed(b"\xff\xff\xff\xff")


def test_default_bound_admits_a_large_bitfield() -> None:
    bits = b"\xff" * (1 << 20)
    assert parse(bitfield(bits)) == [Bitfield(bits)]


def frame(msg_id: int, payload: bytes) -> bytes:
    return struct.pack(">IB", 1 + len(payload), msg_id) + payload


@pytest.mark.parametrize(
    ("msg_id", "size"),
    [
        (MsgId.CHOKE, 1),
        (MsgId.HAVE_ALL, 4),
        (MsgId.HAVE, 3),
        (MsgId.HAVE, 5),
        (MsgId.SUGGEST_PIECE, 0),
        (MsgId.ALLOWED_FAST, 8),
        (MsgId.REQUEST, 11),
        (MsgId.REQUEST, 13),
        (MsgId.CANCEL, 4),
        (MsgId.REJECT_REQUEST, 16),
        (MsgId.PIECE, 7),
        (MsgId.PORT, 1),
        (MsgId.PORT, 4),
        (MsgId.EXTENDED, 0),
        (MsgId.HASH_REQUEST, 47),
        (MsgId.HASH_REJECT, 49),
        (MsgId.HASHES, 47),
        (MsgId.HASHES, 48 + 31),
        (MsgId.HASHES, 48 + 33),
    ],
)
def test_wrong_payload_size(msg_id: MsgId, size: int) -> None:
    data = frame(msg_id, bytes(size))
    with pytest.raises(WireError, match=msg_id.name):
        parse(data)
    with pytest.raises(WireError, match=msg_id.name):
        parse(data, chunk=1)


def test_error_is_sticky() -> None:
    p = Parser(handshake=False)
    with pytest.raises(WireError) as first:
        p.feed(choke() + frame(MsgId.HAVE, b"abc"))
    for data in (b"", choke(), have(1)):
        with pytest.raises(WireError) as again:
            p.feed(data)
        assert str(again.value) == str(first.value)


def test_bitfield_checks() -> None:
    with pytest.raises(WireError, match="spare"):
        pieces_from_bits(b"\xff\x01", 15)
    with pytest.raises(WireError, match="spare"):
        pieces_from_bits(b"\x80\x40", 9)
    with pytest.raises(WireError):
        pieces_from_bits(b"\xff\x80", 8)  # one byte too many
    with pytest.raises(WireError):
        pieces_from_bits(b"\xff", 9)  # one byte short
    assert pieces_from_bits(b"\xff\x80", 9) == [True] * 9
    assert pieces_from_bits(b"", 0) == []


def test_bits_are_in_bittorrent_order() -> None:
    assert bits_from_pieces([0], 8) == b"\x80"
    assert bits_from_pieces({7, 8}, 9) == b"\x01\x80"
    assert bits_from_pieces(iter([]), 3) == b"\x00"
    assert bits_from_pieces([True, False, True], 3) == b"\xa0"
    assert bits_from_pieces([], 0) == b""
    # One byte per piece, as a bytes-like object, is flags rather than indices.
    assert bits_from_pieces(bytearray(b"\x01\x00\x01\x00\x00\x00\x00\x00\x02"), 9) == b"\xa0\x80"
    assert bits_from_pieces(b"\x00\x01", 2) == b"\x40"
    assert bits_from_pieces(memoryview(b"\x01"), 1) == b"\x80"
    with pytest.raises(ValueError):
        bits_from_pieces(b"\x01\x01", 3)
    assert pieces_from_bits(b"\x40", 3) == [False, True, False]
    with pytest.raises(ValueError):
        bits_from_pieces([9], 9)
    with pytest.raises(ValueError):
        bits_from_pieces([-1], 9)
    with pytest.raises(ValueError):
        bits_from_pieces([True, True], 3)


@given(st.lists(st.booleans(), max_size=200))
@settings(max_examples=200)
def test_bits_round_trip(flags: list[bool]) -> None:
    n = len(flags)
    bits = bits_from_pieces(flags, n)
    assert len(bits) == (n + 7) // 8
    assert pieces_from_bits(bits, n) == flags
    assert bits_from_pieces([i for i, f in enumerate(flags) if f], n) == bits
    assert bits_from_pieces(bytearray(flags), n) == bits


# ---------------------------------------------------------------- allowed fast


def test_allowed_fast_worked_example() -> None:
    ih = b"\xaa" * 20
    assert allowed_fast_set("80.4.4.200", ih, 1313, 7) == [1059, 431, 808, 1217, 287, 376, 1188]
    assert allowed_fast_set("80.4.4.200", ih, 1313, 9) == [
        1059, 431, 808, 1217, 287, 376, 1188, 353, 508,
    ]
    # Only the /24 counts, and a mapped address is the IPv4 one.
    assert allowed_fast_set("80.4.4.1", ih, 1313, 9) == allowed_fast_set("80.4.4.200", ih, 1313, 9)
    assert allowed_fast_set("::ffff:80.4.4.200", ih, 1313, 7)[:2] == [1059, 431]
    assert len(allowed_fast_set("80.4.4.200", ih, 1313)) == 10


def test_allowed_fast_small_torrents() -> None:
    ih = b"\xaa" * 20
    assert sorted(allowed_fast_set("10.0.0.1", ih, 3)) == [0, 1, 2]
    assert allowed_fast_set("10.0.0.1", ih, 1) == [0]
    assert allowed_fast_set("10.0.0.1", ih, 0) == []
    assert allowed_fast_set("2001:db8::1", ih, 100) == []
    with pytest.raises(ValueError):
        allowed_fast_set("not an address", ih, 100)


# ---------------------------------------------------------------- properties

u32 = st.integers(0, 2**32 - 1)
small = st.binary(max_size=64)
roots = st.binary(min_size=32, max_size=32)
hash_runs = st.integers(0, 4).map(lambda n: b"\x5a" * (32 * n))
unknown_ids = st.integers(0, 255).filter(lambda i: i not in set(MsgId))

events_st: st.SearchStrategy[Event] = st.one_of(
    st.sampled_from([KeepAlive(), Choke(), Unchoke(), Interested(), NotInterested()]),
    st.sampled_from([HaveAll(), HaveNone()]),
    st.builds(Have, u32),
    st.builds(SuggestPiece, u32),
    st.builds(AllowedFast, u32),
    st.builds(Bitfield, small),
    st.builds(Request, u32, u32, u32),
    st.builds(Cancel, u32, u32, u32),
    st.builds(RejectRequest, u32, u32, u32),
    st.builds(Piece, u32, u32, st.binary(max_size=300)),
    st.builds(Port, st.integers(0, 65535)),
    st.builds(Extended, st.integers(0, 255), small),
    st.builds(HashRequest, roots, u32, u32, u32, u32),
    st.builds(HashReject, roots, u32, u32, u32, u32),
    st.builds(Hashes, roots, u32, u32, u32, u32, hash_runs),
    st.builds(Unknown, unknown_ids, small),
)
handshakes = st.builds(
    Handshake,
    st.binary(min_size=8, max_size=8),
    st.binary(min_size=20, max_size=20),
    st.binary(min_size=20, max_size=20),
)


@given(st.one_of(st.none(), handshakes), st.lists(events_st, max_size=12), st.data())
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_any_events_any_cuts(hs: Handshake | None, events: list[Event], data: st.DataObject) -> None:
    wire = b"".join(encode(e) for e in events)
    if hs is not None:
        wire = encode(hs) + wire
        events = [hs, *events]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    kinds = data.draw(st.lists(st.sampled_from([bytes, bytearray, memoryview]), min_size=9))
    p = Parser(handshake=hs is not None)
    out: list[Event] = []
    for kind, a, b in zip(kinds, [0, *cuts], [*cuts, len(wire)], strict=False):
        out += p.feed(kind(wire[a:b]))
    assert out == events


@given(st.lists(events_st, max_size=12), st.data())
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_views_parser_gives_the_events_of_the_copying_one(events: list[Event],
                                                          data: st.DataObject) -> None:
    wire = b"".join(encode(e) for e in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    p = Parser(handshake=False, views=True)
    out: list[Event] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=False):
        part = bytearray(wire[a:b])
        got = p.feed(part)
        # what the caller uses before it reuses its buffer
        out += [Piece(e.piece, e.begin, bytes(e.data)) if isinstance(e, Piece) else e
                for e in got]
        part[:] = bytes(len(part))
    assert out == events


def outcome(data: bytes, cuts: list[int], handshake: bool) -> list[Event] | str:
    p = Parser(handshake=handshake, max_message=4096)
    out: list[Event] = []
    try:
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=False):
            out += p.feed(data[a:b])
    except WireError:
        return "error"
    return out


@given(st.binary(max_size=400), st.booleans(), st.data())
@settings(max_examples=300)
@example(b"\0\0\0\x01\x07", False, None)
def test_random_bytes_raise_only_wire_error(
    data: bytes, handshake: bool, draw: st.DataObject | None
) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6))) if draw else [2]
    assert outcome(data, [], handshake) == outcome(data, cuts, handshake)


@given(
    st.lists(events_st, min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.data(),
)
@settings(max_examples=300)
def test_corrupted_streams_raise_only_wire_error(
    events: list[Event], flips: list[tuple[int, int]], draw: st.DataObject
) -> None:
    wire = bytearray(b"".join(encode(e) for e in events))
    for at, value in flips:
        wire[at % len(wire)] = value
    data = bytes(wire)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    assert outcome(data, [], False) == outcome(data, cuts, False)
