"""The connection state machine and the picker, without sockets.

Two ``PeerConnection``s are wired back to back (one's outbox is the other's input) and
driven at random: the handshake, the fast-extension rules (every request answered by a
piece or a reject of exactly that block), random bytes after the handshake raising
``WireError`` and nothing else. ``block_plan`` is checked against the file layout of
libtorrent-made torrents and against the blocks libtorrent requests, and the picker
against a model of what was asked of whom.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections import Counter, deque
from pathlib import Path
from typing import Any

import bencodepy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pieced.peer import picker as picker_mod
from pieced.peer import wire
from pieced.peer.conn import (
    DEFAULT_REQQ,
    MIN_REQUEST_TIMEOUT,
    OUR_REQQ,
    PeerConnection,
    choke_round,
)
from pieced.peer.picker import BLOCK, ENDGAME_BLOCKS, Picker, block_plan

from tests.conftest import ODD_FILES
from tests.ltpeer import make_torrent_v1_pads
from tests.realtools import make_payload, make_torrent_lt
from tests.test_disk import Source

Block = tuple[int, int, int]

IH = bytes(range(20))
UNKNOWN_IH = bytes(range(100, 120))
A_ID = b"-PA0001-aaaaaaaaaaaa"
B_ID = b"-PB0001-bbbbbbbbbbbb"
# three pieces: two of three blocks, a short last one of a block and a bit
SIZES = [3 * BLOCK, 3 * BLOCK, BLOCK + 1000]
FAST_ONLY = {
    "have_all": wire.have_all(),
    "have_none": wire.have_none(),
    "suggest": wire.suggest_piece(0),
    "reject": wire.reject_request(0, 0, BLOCK),
    "allowed_fast": wire.allowed_fast(0),
}


# ------------------------------------------------------------------------- helpers


def parse_all(data: bytes, handshake: bool = False) -> list[wire.Event]:
    """The messages in ``data``, which must hold whole messages only."""
    events = wire.Parser(handshake=handshake).feed(data)
    assert b"".join(wire.encode(e) for e in events) == data, "a message was cut"
    return events


def sent(conn: PeerConnection, handshake: bool = False) -> list[wire.Event]:
    """What ``conn`` queued since the last call, decoded."""
    return parse_all(b"".join(conn.take_outbox()), handshake)


def incoming(
    fast: bool = True,
    *,
    extended: bool = False,
    sizes: list[int] | None = None,
    keys: tuple[bytes, ...] = (IH,),
) -> PeerConnection:
    """An accepted connection past the handshake of a remote with or without the fast
    bit, having said it has no piece (as the plugin says what it has at once); its
    outbox (the answer) is emptied."""
    c = PeerConnection(keys, A_ID, list(sizes or SIZES), v2=False)
    c.receive(wire.handshake(keys[0], B_ID, wire.make_reserved(extended=extended, fast=fast)))
    assert c.handshaken and c.fast == fast
    c.send_bitfield(bytearray(c.num_pieces))
    c.take_outbox()
    return c


def valid_blocks(sizes: list[int]) -> list[Block]:
    return [(p, b, min(BLOCK, size - b)) for p, size in enumerate(sizes)
            for b in range(0, size, BLOCK)]


class Link:
    """One direction of a connection: what ``src`` queues is held "in flight" until
    delivered to ``dst``; a tap parses everything ``src`` ever sent. With
    ``strip_fast`` the fast bit of the handshake is cleared on the way, so that the two
    ends see a peer without the fast extension."""

    def __init__(self, src: PeerConnection, dst: PeerConnection, strip_fast: bool) -> None:
        self.src, self.dst, self.strip_fast = src, dst, strip_fast
        self.offset = 0
        self.flight = bytearray()
        self.tap = wire.Parser(handshake=True)
        self.log: list[wire.Event] = []

    def collect(self) -> None:
        data = bytearray(b"".join(self.src.take_outbox()))
        if self.strip_fast and self.offset <= 27 < self.offset + len(data):
            data[27 - self.offset] &= 0xFF ^ 0x04
        self.offset += len(data)
        self.log += self.tap.feed(bytes(data))
        self.flight += data

    def deliver(self, n: int | None = None) -> list[wire.Event]:
        self.collect()
        n = len(self.flight) if n is None else min(n, len(self.flight))
        chunk, self.flight = bytes(self.flight[:n]), self.flight[n:]
        return self.dst.receive(chunk) if chunk else []


def settle(*links: Link) -> None:
    for _ in range(100):
        for link in links:
            link.deliver()
        for link in links:
            link.collect()
        if not any(link.flight for link in links):
            return
    raise AssertionError("the connections never went quiet")


def connect(fast: bool = True, told: bool = True
            ) -> tuple[PeerConnection, PeerConnection, Link, Link]:
    """(a, b, a->b, b->a): ``b`` connected out to ``a``, both past the handshake and,
    if ``told``, each having said it has no piece (else the caller says what they have)."""
    a = PeerConnection((IH,), A_ID, list(SIZES), v2=False)
    b = PeerConnection((IH,), B_ID, list(SIZES), v2=False, outgoing_hash=IH)
    ab, ba = Link(a, b, not fast), Link(b, a, not fast)
    settle(ab, ba)
    assert a.handshaken and b.handshaken and a.fast == b.fast == fast
    if told:
        a.send_bitfield(bytearray(len(SIZES)))
        b.send_bitfield(bytearray(len(SIZES)))
        settle(ab, ba)
    return a, b, ab, ba


# ------------------------------------------------------------------------- torrents

PL_SMALL, PL_BIG = 16384, 65536
PAYLOADS: dict[str, Any] = {
    "odd": ODD_FILES,
    "one": 1,
    "exact": "piece",
    "plus1": "piece+1",
    "mixed": {"e0": 0, "one": 1, "exact": "piece", "plus1": "piece+1", "z0": 0},
}
KINDS = ("v1", "v1-pads", "v2", "hybrid")
TORRENT_KEYS = [f"{k}/{p}/{pl // 1024}k" for k in KINDS for p in PAYLOADS
                for pl in (PL_SMALL, PL_BIG)]


def _size(v: Any, pl: int) -> int:
    return {"piece": pl, "piece+1": pl + 1}.get(v, v) if isinstance(v, str) else v


@pytest.fixture(scope="module")
def torrents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Source]:
    """Every kind, payload and piece length, made by libtorrent, as ``Source``s."""
    out: dict[str, Source] = {}
    root = tmp_path_factory.mktemp("peer-conn")
    for name, spec in PAYLOADS.items():
        for pl in (PL_SMALL, PL_BIG):
            save = root / f"{name}-{pl}"
            if isinstance(spec, dict):
                content = make_payload(save, {k: _size(v, pl) for k, v in spec.items()}, seed=3)
            else:
                content = make_payload(save, _size(spec, pl), seed=3)
            for kind in KINDS:
                if kind == "v1-pads":
                    raw = make_torrent_v1_pads(content, pl)
                else:
                    raw = make_torrent_lt(content, pl, kind)
                out[f"{kind}/{name}/{pl // 1024}k"] = Source(raw, save)
    return out


# ============================================================ 1. handshake


@pytest.mark.parametrize("v2", [False, True])
def test_outgoing_connection_starts_with_a_handshake(v2: bool) -> None:
    c = PeerConnection((IH,), A_ID, list(SIZES), v2=v2, outgoing_hash=IH)
    out = b"".join(c.take_outbox())
    assert len(out) == wire.HANDSHAKE_LEN
    (hs,) = parse_all(out, handshake=True)
    assert isinstance(hs, wire.Handshake)
    assert hs.info_hash == IH and hs.peer_id == A_ID
    assert wire.supports_fast(hs.reserved) and wire.supports_extended(hs.reserved)
    assert wire.supports_v2(hs.reserved) == v2
    assert not c.handshaken  # not before the remote's handshake


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("remote_ext", [False, True])
def test_incoming_answers_with_the_key_used(
    torrents: dict[str, Source], kind: str, remote_ext: bool
) -> None:
    meta = torrents[f"{kind}/odd/64k"].meta
    keys = meta.aliases
    assert len(keys) == (2 if kind == "hybrid" else 1)
    if kind == "hybrid":
        assert set(keys) == {meta.info_hash_v1, meta.info_hash_v2[:20]}
    sizes = [meta.piece_size(p) for p in range(meta.num_pieces)]
    for key in keys:
        c = PeerConnection(keys, A_ID, sizes, v2=meta.has_v2)
        assert c.take_outbox() == []  # an incoming connection waits for the remote
        events = c.receive(wire.handshake(key, B_ID, wire.make_reserved(extended=remote_ext)))
        assert events == [wire.Handshake(wire.make_reserved(extended=remote_ext), key, B_ID)]
        out = sent(c, handshake=True)
        hs = out[0]
        assert isinstance(hs, wire.Handshake)
        assert hs.info_hash == key and hs.peer_id == A_ID
        assert wire.supports_fast(hs.reserved) and wire.supports_extended(hs.reserved)
        assert wire.supports_v2(hs.reserved) == meta.has_v2
        assert c.handshaken and c.fast and c.info_hash == key and c.remote_id == B_ID
        if remote_ext:  # the extension handshake follows, naming our reqq
            assert len(out) == 2 and isinstance(out[1], wire.Extended)
            assert out[1].ext_id == 0
            assert bencodepy.decode(out[1].payload)[b"reqq"] == OUR_REQQ
        else:
            assert len(out) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_incoming_v1_key_with_the_upgrade_bit_is_answered_with_the_v2_key(
        torrents: dict[str, Source], kind: str) -> None:
    """BEP 52's upgrade, as libtorrent answers it: a hybrid's v1 hash with bit 0x10 of
    the last reserved byte gets the truncated v2 hash back (without the bit: the v1
    hash); a torrent with one key answers with that key whatever the bit."""
    meta = torrents[f"{kind}/odd/64k"].meta
    keys = meta.aliases
    sizes = [meta.piece_size(p) for p in range(meta.num_pieces)]
    for bit in (False, True):
        c = PeerConnection(keys, A_ID, sizes, v2=meta.has_v2)
        c.receive(wire.handshake(keys[0], B_ID, wire.make_reserved(extended=True, v2=bit)))
        hs = sent(c, handshake=True)[0]
        assert isinstance(hs, wire.Handshake)
        expected = keys[1] if bit and kind == "hybrid" else keys[0]
        assert hs.info_hash == expected == c.info_hash
        assert c.handshaken and c.remote_id == B_ID


def test_outgoing_hybrid_accepts_either_key(torrents: dict[str, Source]) -> None:
    meta = torrents["hybrid/odd/64k"].meta
    v1, v2 = meta.aliases
    sizes = [meta.piece_size(p) for p in range(meta.num_pieces)]
    for answer in (v1, v2):
        c = PeerConnection(meta.aliases, A_ID, sizes, v2=True, outgoing_hash=v1)
        c.take_outbox()
        c.receive(wire.handshake(answer, B_ID, wire.make_reserved(v2=True)))
        assert c.handshaken and c.remote_id == B_ID


def test_back_to_back_handshake_exchanges_reqq() -> None:
    a, b, _, _ = connect()
    assert a.remote_id == B_ID and b.remote_id == A_ID
    assert a.extended and b.extended
    assert a.reqq == b.reqq == OUR_REQQ


@pytest.mark.parametrize(
    ("payload", "reqq"),
    [({b"reqq": 7}, 7), ({b"reqq": 10**6}, 2000), ({b"reqq": 0}, DEFAULT_REQQ),
     ({b"reqq": -3}, DEFAULT_REQQ), ({b"reqq": b"9"}, DEFAULT_REQQ), ([1, 2], DEFAULT_REQQ)],
    ids=str,
)
def test_extension_handshake_reqq(payload: Any, reqq: int) -> None:
    c = incoming(extended=True)
    c.receive(wire.extended(0, bencodepy.encode(payload)))
    assert c.reqq == reqq
    with pytest.raises(wire.WireError):
        c.receive(wire.extended(0, b"d4:reqq"))


@pytest.mark.parametrize(
    ("payload", "port"),
    [({b"p": 6881}, 6881), ({b"p": 0}, 0), ({b"p": 65536}, 0), ({b"p": -1}, 0),
     ({b"p": b"6881"}, 0), ({}, 0)],
    ids=str,
)
def test_extension_handshake_listen_port(payload: Any, port: int) -> None:
    """The port a peer says it takes connections on (``p``): kept when it is one."""
    c = incoming(extended=True)
    c.receive(wire.extended(0, bencodepy.encode(payload)))
    assert c.remote_port == port


@pytest.mark.parametrize("ours", [0, 51413])
def test_our_listen_port_is_told_when_we_listen(ours: int) -> None:
    c = PeerConnection((IH,), A_ID, list(SIZES), v2=False, listen_port=ours)
    c.receive(wire.handshake(IH, B_ID, wire.make_reserved(extended=True)))
    out = sent(c, handshake=True)
    assert isinstance(out[1], wire.Extended)
    assert bencodepy.decode(out[1].payload).get(b"p") == (ours or None)


@pytest.mark.parametrize("outgoing", [False, True])
def test_unknown_info_hash_raises(outgoing: bool) -> None:
    c = PeerConnection((IH,), A_ID, list(SIZES), v2=False,
                       outgoing_hash=IH if outgoing else None)
    c.take_outbox()
    with pytest.raises(wire.WireError):
        c.receive(wire.handshake(UNKNOWN_IH, B_ID, wire.make_reserved()))
    assert not c.handshaken
    assert c.take_outbox() == []  # no answer to a stranger
    with pytest.raises(wire.WireError):  # and the connection stays broken
        c.receive(wire.keep_alive())


_messages_st = st.sampled_from([
    wire.keep_alive(), wire.choke(), wire.unchoke(), wire.interested(),
    wire.not_interested(), wire.have(0), wire.bitfield(b"\xe0"), wire.request(0, 0, BLOCK),
    wire.piece(0, 0, b"x" * 70), wire.cancel(0, 0, BLOCK), *FAST_ONLY.values(),
    wire.extended(0, b"de"), wire.port(6881),
])


@given(st.lists(_messages_st, min_size=1, max_size=5), st.booleans(), st.integers(1, 80))
@settings(max_examples=60, deadline=None)
def test_any_message_before_the_handshake_raises(
    msgs: list[bytes], outgoing: bool, cut: int
) -> None:
    c = PeerConnection((IH,), A_ID, list(SIZES), v2=False,
                       outgoing_hash=IH if outgoing else None)
    c.take_outbox()
    data = b"".join(msgs) + wire.handshake(IH, B_ID, wire.make_reserved())
    with pytest.raises(wire.WireError):
        for i in range(0, len(data), cut):
            c.receive(data[i : i + cut])
    assert not c.handshaken
    assert c.take_outbox() == []


# ============================================================ 2. fast extension


@pytest.mark.parametrize("name", sorted(FAST_ONLY))
def test_fast_messages_without_the_fast_bit_raise(name: str) -> None:
    c = incoming(fast=False)
    with pytest.raises(wire.WireError):
        c.receive(FAST_ONLY[name])


@pytest.mark.parametrize("name", sorted(FAST_ONLY))
def test_fast_messages_with_the_fast_bit_are_accepted(name: str) -> None:
    c = incoming(fast=True)
    c.receive(FAST_ONLY[name])
    assert c.peer_count == (len(SIZES) if name == "have_all" else 0)
    assert c.allowed_fast == ({0} if name == "allowed_fast" else set())


def test_without_fast_no_fast_message_is_sent() -> None:
    a, b, _, _ = connect(fast=False, told=False)
    assert not a.fast and not b.fast
    a.send_bitfield(bytearray(len(SIZES)))  # nothing at all: no HAVE_NONE without fast
    a.send_bitfield(bytearray(b"\x01" * len(SIZES)))  # everything: a BITFIELD, no HAVE_ALL
    a.send_allowed_fast(1)
    a.send_suggest(1)
    a.send_reject((0, 0, BLOCK))
    assert sent(a) == [wire.Bitfield(wire.bits_from_pieces(b"\x01" * len(SIZES), len(SIZES)))]
    assert a.given_fast == set()


_requests_st = st.lists(
    st.sampled_from(valid_blocks(SIZES)) | st.tuples(
        st.integers(0, len(SIZES) - 1), st.integers(0, 2 * BLOCK), st.integers(1, BLOCK)
    ).filter(lambda r: r[1] + r[2] <= SIZES[r[0]]),
    max_size=30,
)


@given(_requests_st, st.sets(st.integers(0, len(SIZES) - 1)))
@settings(max_examples=100, deadline=None)
def test_every_request_while_choking_is_rejected(
    requests: list[Block], given_fast: set[int]
) -> None:
    c = incoming(fast=True)
    for p in sorted(given_fast):
        c.send_allowed_fast(p)
    assert sent(c) == [wire.AllowedFast(p) for p in sorted(given_fast)]
    assert c.am_choking
    events: list[wire.Event] = []
    for blk in requests:
        events += c.receive(wire.request(*blk))
    refused = [blk for blk in requests if blk[0] not in given_fast]
    queued = [blk for blk in requests if blk[0] in given_fast]
    assert sent(c) == [wire.RejectRequest(*blk) for blk in refused]
    assert list(c.peer_requests) == queued
    assert events == [wire.Request(*blk) for blk in queued]  # refused ones are not passed on


@given(_requests_st)
@settings(max_examples=50, deadline=None)
def test_requests_while_choking_without_fast_are_dropped_silently(requests: list[Block]) -> None:
    c = incoming(fast=False)
    for blk in requests:
        assert c.receive(wire.request(*blk)) == []
    assert c.take_outbox() == [] and not c.peer_requests


@given(_requests_st, st.sets(st.integers(0, len(SIZES) - 1)), st.booleans())
@settings(max_examples=100, deadline=None)
def test_choking_rejects_every_queued_request_but_allowed_fast(
    requests: list[Block], given_fast: set[int], fast: bool
) -> None:
    c = incoming(fast=fast)
    for p in sorted(given_fast):
        c.send_allowed_fast(p)
    c.send_choke(False)
    c.take_outbox()
    for blk in requests:
        c.receive(wire.request(*blk))
    assert list(c.peer_requests) == requests and c.take_outbox() == []
    c.send_choke(True)
    if fast:
        kept = [blk for blk in requests if blk[0] in given_fast]
        rejected = [blk for blk in requests if blk[0] not in given_fast]
        assert sent(c) == [wire.Choke()] + [wire.RejectRequest(*blk) for blk in rejected]
    else:  # no allowed-fast set without the extension, and nothing to reject with
        kept = []
        assert sent(c) == [wire.Choke()]
    assert list(c.peer_requests) == kept
    c.send_choke(True)  # already choking: nothing more
    assert c.take_outbox() == [] and list(c.peer_requests) == kept


@given(st.integers(1, 5), st.integers(0, 9), st.lists(st.tuples(st.integers(0, 11), st.booleans()), max_size=30))
@settings(max_examples=100, deadline=None)
def test_choke_rounds_take_turns(slots: int, n: int, changes: list[tuple[int, bool]]) -> None:
    """Rounds of ``choke_round`` with peers coming and losing interest: never more than
    ``slots`` unchoked after a round, only interested ones; a round with peers waiting
    and every slot taken chokes the one unchoked longest and unchokes the one that
    waited longest; with interest steady every interested peer gets its turn."""
    conns = [incoming() for _ in range(n)]
    for c in conns:
        c.receive(wire.interested())

    def one_round() -> tuple[list[PeerConnection], list[PeerConnection]]:
        before_unchoked = sorted((c for c in conns if c.peer_interested and not c.am_choking),
                                 key=lambda c: c.unchoked_at)
        before_waiting = sorted((c for c in conns if c.peer_interested and c.am_choking),
                                key=lambda c: c.unchoked_at)
        choke, unchoke = choke_round(conns, slots)
        for c in choke:
            c.send_choke(True)
        for c in unchoke:
            c.send_choke(False)
        now_unchoked = [c for c in conns if not c.am_choking]
        assert len(now_unchoked) <= slots and all(c.peer_interested for c in now_unchoked)
        if before_waiting and len(before_unchoked) >= slots:
            assert before_unchoked[0] in choke and unchoke == before_waiting[:1]
        elif before_waiting:
            assert unchoke == before_waiting[: slots - len(before_unchoked)]
        return choke, unchoke

    for i, interested in changes:
        if i < n:
            conns[i].receive(wire.interested() if interested else wire.not_interested())
        one_round()
    for c in conns:  # interest steady from here: everyone's turn comes
        if not c.peer_interested:
            c.receive(wire.interested())
    turns: set[int] = set()
    for _ in range(n + 1):
        one_round()
        turns |= {i for i, c in enumerate(conns) if not c.am_choking}
    assert turns == set(range(n))


@pytest.mark.parametrize("fast", [True, False])
def test_cancel_of_a_queued_request(fast: bool) -> None:
    c = incoming(fast=fast)
    c.send_choke(False)
    c.take_outbox()
    x, y = (0, 0, BLOCK), (0, BLOCK, BLOCK)
    c.receive(wire.request(*x) + wire.request(*y))
    assert c.receive(wire.cancel(*x)) == [wire.Cancel(*x)]
    assert list(c.peer_requests) == [y]
    assert sent(c) == ([wire.RejectRequest(*x)] if fast else [])
    # a cancel of what is not queued (served already) is no event and gets no reject
    assert c.receive(wire.cancel(*x)) == []
    assert c.take_outbox() == [] and list(c.peer_requests) == [y]


@pytest.mark.parametrize("fast", [True, False])
def test_choke_from_the_peer_clears_our_requests_only_without_fast(fast: bool) -> None:
    a, b, ab, ba = connect(fast=fast)
    a.send_choke(False)
    settle(ab, ba)
    assert not b.peer_choking
    mine = valid_blocks(SIZES)[:4]
    for blk in mine:
        b.send_request(blk)
    a.send_choke(True)  # before b's requests reach a
    ab.deliver()
    assert b.peer_choking
    assert set(b.our_requests) == (set(mine) if fast else set())
    ba.deliver()  # the requests reach a choking a: rejected with fast, dropped without
    assert not a.peer_requests
    ab.deliver()
    assert b.our_requests == {}
    rejects = [e for e in ab.log if isinstance(e, wire.RejectRequest)]
    assert rejects == ([wire.RejectRequest(*blk) for blk in mine] if fast else [])


def test_requests_are_late_only_when_the_peer_stops_sending() -> None:
    """b asks a for 40 blocks at once; a answers one every second, slower than the time
    out: none of the requests waiting behind is late, since blocks keep coming. Once a
    stops sending, every request asked that long ago, and not answered, is. (Each
    request timed on its own, the ones at the back of a slow peer's queue timed out and
    were asked again, and the peer sent them twice.)"""
    sizes = [BLOCK] * 40
    a = PeerConnection((IH,), A_ID, sizes, v2=False)
    b = PeerConnection((IH,), B_ID, sizes, v2=False, outgoing_hash=IH)
    ab, ba = Link(a, b, False), Link(b, a, False)
    settle(ab, ba)
    a.send_bitfield(bytearray(b"\x01" * len(sizes)))
    b.send_bitfield(bytearray(len(sizes)))
    a.send_choke(False)
    settle(ab, ba)
    blocks = valid_blocks(sizes)
    t0 = b.last_received
    for blk in blocks:
        b.send_request(blk)
        b.our_requests[blk] = t0  # all asked at t0
    ba.deliver()
    timeout = 5.0
    for k in range(20):  # one block a second: 20 s, four times the time out
        blk = a.peer_requests.popleft()
        a.send_piece(blk, bytes(blk[2]))
        ab.deliver()
        assert b.last_block >= t0  # noted when it came...
        b.last_block = t0 + k + 1  # ... which, by the clock of this test, is now
        assert b.late_requests(t0 + k + 1.5, timeout) == []
    # a goes quiet: what is still asked becomes late, timeout seconds after its last block
    assert b.late_requests(t0 + 20 + timeout - 0.5, timeout) == []
    assert sorted(b.late_requests(t0 + 20 + timeout, timeout)) == sorted(blocks[20:])


def test_a_peer_that_served_at_once_then_went_quiet_is_found_out_in_seconds() -> None:
    """The time a request may wait follows how long the peer has kept us waiting (as
    libtorrent's request time out): before any block, the longest (30 s here); after
    blocks that came at once, MIN_REQUEST_TIMEOUT. A peer that stops (a hung disk, a
    stopped process) has its requests given up after that, is snubbed (one request at a
    time) and unsnubbed by its next block. A block coming slowly, part after part, is
    no silence: its request is not late."""
    now = [1000.0]
    sizes = [BLOCK] * 48
    a = PeerConnection((IH,), A_ID, sizes, v2=False, clock=lambda: now[0])
    b = PeerConnection((IH,), B_ID, sizes, v2=False, outgoing_hash=IH, clock=lambda: now[0])
    ab, ba = Link(a, b, False), Link(b, a, False)
    settle(ab, ba)
    a.send_bitfield(bytearray(b"\x01" * len(sizes)))
    b.send_bitfield(bytearray(len(sizes)))
    a.send_choke(False)
    settle(ab, ba)
    blocks = valid_blocks(sizes)
    b.send_request(blocks[0])
    ba.deliver()
    now[0] += 2.5
    assert b.request_timeout(30.0) == 30.0  # nothing known of the peer yet
    assert b.give_up_late(now[0], 30.0) == [] and not b.snubbed
    for blk in blocks[:30]:  # served at once (the first after its wait)
        if blk != blocks[0]:
            b.send_request(blk)
            ba.deliver()
        a.send_piece(a.peer_requests.popleft(), bytes(blk[2]))
        now[0] += 0.01
        ab.deliver()
    assert b.request_timeout(30.0) == MIN_REQUEST_TIMEOUT
    assert b.queue_size > 1
    for blk in blocks[30:34]:
        b.send_request(blk)
    ba.deliver()  # ... and a goes quiet, but for keep-alives
    now[0] += MIN_REQUEST_TIMEOUT - 0.5
    a.send_keepalive()
    ab.deliver()
    assert b.give_up_late(now[0], 30.0) == []
    now[0] += 0.5
    assert sorted(b.give_up_late(now[0], 30.0)) == blocks[30:34]
    assert b.snubbed and b.queue_size == 1 and not b.our_requests
    ba.collect()
    assert [e for e in ba.log if isinstance(e, wire.Cancel)] == [wire.Cancel(*blk) for blk in blocks[30:34]]
    # asked again: a sends it part by part, every second, over four times the time out
    b.send_request(blocks[34])
    ba.deliver()
    a.send_piece(a.peer_requests.popleft(), bytes(BLOCK))
    ab.collect()
    for _ in range(8):
        now[0] += 1.0
        ab.deliver(len(ab.flight) // 4 or 1)
        if not b.our_requests:
            break
        assert b.give_up_late(now[0], 30.0) == []
    ab.deliver()
    assert not b.our_requests and not b.snubbed  # the block came: unsnubbed


@pytest.mark.parametrize("fast", [True, False])
def test_answers_to_what_we_no_longer_want_are_not_events(fast: bool) -> None:
    a, b, ab, ba = connect(fast=fast)
    a.send_choke(False)
    settle(ab, ba)
    x, y = valid_blocks(SIZES)[:2]
    b.send_request(x)
    b.send_request(y)
    ba.deliver()
    assert list(a.peer_requests) == [x, y]
    for blk in (a.peer_requests.popleft(), a.peer_requests.popleft()):
        a.send_piece(blk, bytes(blk[2]))
    b.send_cancel(x)  # too late: the piece is on its way
    b.send_cancel(x)  # and a second cancel of the same block is not sent
    assert ab.deliver() == [wire.Piece(y[0], y[1], bytes(y[2]))]
    assert b.our_requests == {}
    ba.deliver()
    assert [e for e in ba.log if isinstance(e, wire.Cancel)] == [wire.Cancel(*x)]
    assert a.take_outbox() == []  # nothing queued: no reject for the cancel


def test_the_reject_of_a_cancel_is_not_taken_for_the_block_asked_again() -> None:
    """A block cancelled and asked for again before the peer answered the cancel: with
    the fast extension the peer answers the cancel with a REJECT, then the new request.
    The REJECT was taken for the answer to the new request (they name the same block),
    which was dropped, and the plugin asked the piece of that peer no more until its
    next unchoke: a download whose daemon had refused a block of the piece, resumed at
    once, stood still for up to 10 s where that peer was its only seeder."""
    a, b, ab, ba = connect(fast=True)
    a.send_choke(False)
    settle(ab, ba)
    x = valid_blocks(SIZES)[0]
    b.send_request(x)
    b.send_cancel(x)
    b.send_request(x)  # asked again before the cancel was answered
    ba.deliver()
    assert ab.deliver() == []  # the answer to the cancel: nothing for the plugin
    assert [e for e in ab.log if isinstance(e, wire.RejectRequest)] == [wire.RejectRequest(*x)]
    assert x in b.our_requests
    a.send_piece(a.peer_requests.popleft(), bytes(x[2]))
    assert ab.deliver() == [wire.Piece(x[0], x[1], bytes(x[2]))]
    assert b.our_requests == {}
    # A block the peer had sent before the cancel reached it is that cancel's answer,
    # taken for the block asked again (its bytes are as good).
    b.send_request(x)
    ba.deliver()
    a.send_piece(a.peer_requests.popleft(), bytes(x[2]))
    b.send_cancel(x)
    b.send_request(x)
    assert ab.deliver() == [wire.Piece(x[0], x[1], bytes(x[2]))]  # (good bytes: taken)
    ba.deliver()
    a.send_reject(a.peer_requests.popleft())
    assert ab.deliver() == []  # (the request it answers was answered by the block)
    assert not b._cancelled


# ============================================================ 3. random sessions

_OPS = ["choke", "unchoke", "interested", "not_interested", "request", "request", "request",
        "cancel", "serve", "serve", "reject", "have", "allowed_fast", "suggest", "keepalive",
        "deliver", "deliver", "deliver_part"]


@given(st.booleans(), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_sessions_answer_every_request(fast: bool, data: st.DataObject) -> None:
    a, b, ab, ba = connect(fast=fast, told=False)
    n = len(SIZES)
    have = {
        id(a): bytearray(data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))),
        id(b): bytearray(data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))),
    }
    for x in (a, b):
        x.send_bitfield(bytearray(have[id(x)]))
    settle(ab, ba)
    assert bytes(a.peer_has) == bytes(have[id(b)]) and bytes(b.peer_has) == bytes(have[id(a)])
    out_link = {id(a): ab, id(b): ba}
    for _ in range(data.draw(st.integers(0, 80))):
        op = data.draw(st.sampled_from(_OPS))
        x, y = data.draw(st.sampled_from([(a, b), (b, a)]))
        mine = have[id(x)]
        if op in ("choke", "unchoke"):
            x.send_choke(op == "choke")
        elif op in ("interested", "not_interested"):
            x.send_interested(op == "interested")
        elif op == "request":  # what an honest peer may ask for: see can_request
            free = [blk for blk in valid_blocks(SIZES) if x.peer_has[blk[0]]
                    and x.can_request(blk[0]) and blk not in x.our_requests]
            if free:
                x.send_request(data.draw(st.sampled_from(free)))
        elif op == "cancel" and x.our_requests:
            x.send_cancel(data.draw(st.sampled_from(sorted(x.our_requests))))
        elif op in ("serve", "reject") and x.peer_requests:
            blk = x.peer_requests.popleft()
            assert not x.am_choking or blk[0] in x.given_fast
            if op == "serve" and mine[blk[0]]:
                x.send_piece(blk, memoryview(bytes([blk[0]]) * blk[2]))
            else:
                x.send_reject(blk)
        elif op == "have":
            p = data.draw(st.integers(0, n - 1))
            if not mine[p]:
                mine[p] = 1
                x.send_have(p)
        elif op == "allowed_fast":
            x.send_allowed_fast(data.draw(st.integers(0, n - 1)))
        elif op == "suggest":
            x.send_suggest(data.draw(st.integers(0, n - 1)))
        elif op == "keepalive":
            x.send_keepalive()
        elif op == "deliver":
            out_link[id(x)].deliver()
        elif op == "deliver_part":
            out_link[id(x)].deliver(data.draw(st.integers(0, 40)))
        # nothing an honest peer does is refused (a WireError would end the test)
    settle(ab, ba)

    for x, y, xy, yx in ((a, b, ab, ba), (b, a, ba, ab)):
        assert y.peer_choking == x.am_choking and y.peer_interested == x.am_interested
        assert bytes(y.peer_has) == bytes(have[id(x)])
        assert y.peer_count == sum(have[id(x)])
        assert y.allowed_fast == x.given_fast
        asked = Counter((e.piece, e.begin, e.length) for e in xy.log if isinstance(e, wire.Request))
        pieces = Counter((e.piece, e.begin, len(e.data)) for e in yx.log
                         if isinstance(e, wire.Piece))
        rejects = Counter((e.piece, e.begin, e.length) for e in yx.log
                          if isinstance(e, wire.RejectRequest))
        queued = Counter(y.peer_requests)
        if y.am_choking:
            assert all(blk[0] in y.given_fast for blk in y.peer_requests)
        if fast:
            # each request: one piece or one reject, or still waiting at y
            answered = pieces + rejects + queued
            assert {k: v for k, v in answered.items() if v} == dict(asked)
            assert set(x.our_requests) <= set(y.peer_requests)
            assert not x._cancelled  # every cancel answered, and told apart
        else:
            assert not rejects and not any(
                isinstance(e, wire.HaveAll | wire.HaveNone | wire.SuggestPiece
                           | wire.AllowedFast) for e in yx.log)
            assert all(pieces[k] <= asked[k] for k in pieces)


# ============================================================ 4. fuzz

_u32 = st.integers(0, 2**32 - 1)
_small = st.integers(0, 4)
_frame_payload = st.one_of(
    st.binary(max_size=16),
    st.builds(lambda v: struct.pack(">I", v), _small | _u32),
    st.builds(lambda a, b, c: struct.pack(">III", a, b, c),
              _small | _u32, st.integers(0, 3 * BLOCK) | _u32, st.integers(0, BLOCK + 1) | _u32),
    st.builds(lambda d: b"\x00" + bencodepy.encode(d),
              st.dictionaries(st.sampled_from([b"reqq", b"m", b"v"]),
                              st.integers(-5, 10**6) | st.binary(max_size=4), max_size=3)),
)
_frames = st.lists(
    st.builds(lambda mid, payload: struct.pack(">IB", len(payload) + 1, mid) + payload,
              st.integers(0, 25), _frame_payload)
    | st.binary(min_size=1, max_size=12),
    max_size=25,
)


def in_range(blk: Block) -> bool:
    p, b, n = blk
    return 0 <= p < len(SIZES) and b >= 0 and 0 < n <= BLOCK and b + n <= SIZES[p]


def check_state(c: PeerConnection) -> None:
    n = c.num_pieces
    assert len(c.peer_has) == n and c.peer_count == sum(c.peer_has)
    assert all(0 <= p < n for p in c.allowed_fast)
    assert all(in_range(blk) for blk in c.peer_requests)


@given(st.binary(max_size=400), st.booleans(), st.integers(1, 64), st.booleans())
@settings(max_examples=300, deadline=None)
def test_random_bytes_after_the_handshake_raise_only_wire_error(
    junk: bytes, fast: bool, cut: int, unchoked: bool
) -> None:
    c = incoming(fast=fast, extended=True)
    c.send_choke(not unchoked)
    try:
        for i in range(0, len(junk), cut):
            for ev in c.receive(junk[i : i + cut]):
                assert type(ev).__name__ in wire.__all__
    except wire.WireError:
        with pytest.raises(wire.WireError):  # the connection is done with
            c.receive(wire.keep_alive())
    check_state(c)


@given(_frames, st.booleans(), st.integers(1, 64), st.booleans())
@settings(max_examples=400, deadline=None)
def test_random_messages_after_the_handshake_raise_only_wire_error(
    frames: list[bytes], fast: bool, cut: int, unchoked: bool
) -> None:
    c = incoming(fast=fast, extended=True)
    c.send_choke(not unchoked)
    if fast:
        c.send_allowed_fast(1)
    data = b"".join(frames)
    try:
        for i in range(0, len(data), cut):
            for ev in c.receive(data[i : i + cut]):
                assert type(ev).__name__ in wire.__all__
                if isinstance(ev, wire.Request):
                    assert in_range((ev.piece, ev.begin, ev.length))
    except wire.WireError:
        pass
    check_state(c)
    assert 0 < c.reqq <= 2000


BAD_REQUESTS = [
    (len(SIZES), 0, BLOCK),  # piece == num_pieces
    (2**32 - 1, 0, 1),
    (0, 3 * BLOCK - 1, 2),  # runs past the piece's end
    (2, BLOCK, 1001),  # runs past the short last piece
    (2, BLOCK + 1000, 1),  # starts at the end
    (0, 2**32 - 1, 1),
    (0, 0, 0),  # empty
    (0, 0, BLOCK + 1),  # over 16 KiB
    (0, 0, 2**32 - 1),
]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("choking", [True, False])
@pytest.mark.parametrize("blk", BAD_REQUESTS, ids=str)
def test_requests_out_of_range_raise(blk: Block, choking: bool, fast: bool) -> None:
    c = incoming(fast=fast)
    if fast:
        c.send_allowed_fast(0)
    c.send_choke(choking)
    c.take_outbox()
    with pytest.raises(wire.WireError):
        c.receive(wire.request(*blk))
    assert not c.peer_requests and c.take_outbox() == []


@pytest.mark.parametrize("blk", [b for b in BAD_REQUESTS if b[2] <= BLOCK], ids=str)
def test_a_block_no_piece_has_raises_and_one_unasked_in_range_is_dropped(blk: Block) -> None:
    """A block nobody asked for is a late copy (after a cancel), counted and dropped;
    but one that no piece has (past the last piece, past its piece's end, empty) is a
    peer that is wrong, as libtorrent says too: it was kept on for the whole download,
    sending what no request could have asked for."""
    c = incoming()
    with pytest.raises(wire.WireError):
        c.receive(wire.piece(blk[0], blk[1], bytes(blk[2])))
    c = incoming()
    assert c.receive(wire.piece(2, BLOCK, bytes(1000))) == [] and c.unasked == 1000


@pytest.mark.parametrize("blk", [(0, 0, BLOCK), (0, 2 * BLOCK, BLOCK), (2, BLOCK, 1000),
                                 (2, BLOCK + 999, 1), (1, 5, BLOCK), (0, 3 * BLOCK - 1, 1)],
                         ids=str)
def test_requests_at_the_edges_are_accepted(blk: Block) -> None:
    c = incoming()
    c.send_choke(False)
    assert c.receive(wire.request(*blk)) == [wire.Request(*blk)]
    assert list(c.peer_requests) == [blk]


def test_have_out_of_range_raises_and_bitfield_is_checked() -> None:
    c = incoming()
    with pytest.raises(wire.WireError):
        c.receive(wire.have(len(SIZES)))
    c = incoming()
    with pytest.raises(wire.WireError):  # spare bit set past the last piece
        c.receive(wire.bitfield(b"\xf0"))
    c = incoming()
    c.receive(wire.bitfield(b"\xa0") + wire.have(1) + wire.have(1))
    assert bytes(c.peer_has) == b"\x01\x01\x01" and c.peer_count == 3 and c.is_seed


# ============================================================ 5. block plan


def stored_spans(src: Source, p: int) -> list[tuple[int, int]]:
    size = src.layout.piece_size(p)
    return [(s.buf_offset, s.buf_offset + s.length) for s in src.layout.map(p, 0, size)
            if s.stored and s.length]


@pytest.mark.parametrize("key", TORRENT_KEYS)
def test_block_plan_covers_every_stored_byte_once(torrents: dict[str, Source], key: str) -> None:
    src = torrents[key]
    meta, layout = src.meta, src.layout
    kind = key.split("/")[0]
    assert (kind == "v2") == (not meta.has_v1)
    if kind in ("v1-pads", "hybrid", "v2") and "odd" in key:
        assert any(f.pad for f in meta.files)
    plan_all: set[Block] = set()
    for p in range(meta.num_pieces):
        size = layout.piece_size(p)
        plan = block_plan(meta, layout, p)
        spans = stored_spans(src, p)
        assert plan, f"piece {p} has nothing to ask for"
        # in order, not overlapping, 16 KiB aligned, inside the piece
        ends = 0
        for b, n in plan:
            assert b % BLOCK == 0 and b >= ends and 0 < n <= BLOCK and b + n <= size
            ends = b + n
            segs = layout.map(p, b, n)
            assert segs[0].stored, f"block {(p, b, n)} starts inside a pad"
            if meta.has_v1:  # runs on into a pad: 16 KiB unless the piece ends
                assert n == min(BLOCK, size - b)
            else:  # v2 only: stops at the end of the file's bytes
                assert all(s.stored for s in segs)
                assert n == BLOCK or any(e == b + n for _, e in spans)
        # every stored byte inside exactly one block
        for s, e in spans:
            covered = sum(max(0, min(e, b + n) - max(s, b)) for b, n in plan)
            assert covered == e - s, f"piece {p} bytes {s}..{e} covered {covered}"
        # and no block is wholly outside stored bytes
        for b, n in plan:
            assert any(min(e, b + n) > max(s, b) for s, e in spans)
        plan_all |= {(p, b, n) for b, n in plan}
    # the blocks libtorrent asks for (test_disk.Source models libtorrent 2.1)
    assert plan_all == set(src.peer_blocks())


@pytest.mark.parametrize("kind", ["v2", "hybrid"])
def test_a_piece_mostly_of_pad_is_planned_by_its_stored_bytes(
        tmp_path: Path, kind: str) -> None:
    """A small file's piece in a torrent of 16 MiB pieces is 1,024 blocks of which one
    or two hold data: its plan is what a peer is asked for (the blocks with data, as
    libtorrent asks them), made by a look at its stored bytes, not at each of its 1,024
    blocks (that look cost 2 ms a piece: most of a download of many small files)."""
    content = make_payload(tmp_path / "save", {"a": 1, "b": 20_000, "c": 16384, "d": 0,
                                               "e": 5 * 2**20 + 3}, seed=5)
    src = Source(make_torrent_lt(content, 16 * 2**20, kind), tmp_path / "save")  # type: ignore[arg-type]
    looks = 0
    real_map = src.layout.map

    def counted(piece: int, begin: int, length: int) -> Any:
        nonlocal looks
        looks += 1
        return real_map(piece, begin, length)

    src.layout.map = counted  # type: ignore[method-assign]
    plans = {p: block_plan(src.meta, src.layout, p) for p in range(src.meta.num_pieces)}
    assert looks <= 2 * src.meta.num_pieces
    src.layout.map = real_map  # type: ignore[method-assign]
    assert {(p, b, n) for p, plan in plans.items() for b, n in plan} == set(src.peer_blocks())
    assert sum(map(len, plans.values())) < 400


def test_block_plan_cases_are_exercised(torrents: dict[str, Source]) -> None:
    """The fixtures hold a block wholly in a pad (skipped), one running into a pad and a
    v2 block cut at its file's end, so that the checks above could fail."""
    skipped = into_pad = clipped = 0
    for key, src in torrents.items():
        for p in range(src.meta.num_pieces):
            size = src.layout.piece_size(p)
            plan = dict(block_plan(src.meta, src.layout, p))
            for b in range(0, size, BLOCK):
                n = min(BLOCK, size - b)
                segs = src.layout.map(p, b, n)
                if all(not s.stored for s in segs):
                    skipped += 1
                    assert b not in plan
                elif not all(s.stored for s in segs):
                    if key.startswith("v2"):
                        clipped += 1
                        assert plan[b] < n
                    else:
                        into_pad += 1
                        assert plan[b] == n
    assert skipped and into_pad and clipped


# ============================================================ 6. picker

PICK_KEYS = [k for k in TORRENT_KEYS if "/odd/" in k or "/mixed/" in k]


def all_blocks(pk: Picker) -> list[Block]:
    return [(p, b, n) for p in range(pk.meta.num_pieces) for b, n in pk.plan(p)]


@given(st.sampled_from(PICK_KEYS), st.integers(1, 12), st.randoms(use_true_random=False),
       st.data())
@settings(max_examples=40, deadline=None)
def test_one_seed_gives_every_piece_each_block_once(
    torrents: dict[str, Source], key: str, want: int, rnd: Any, data: st.DataObject
) -> None:
    src = torrents[key]
    n = src.meta.num_pieces
    had = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    pk = Picker(src.meta, had)
    pk.peer_has(range(n))
    asked: set[Block] = set()
    outstanding: list[Block] = []
    got_blocks: dict[int, set[Block]] = {}
    for _ in range(10_000):
        if pk.complete:
            break
        got = pk.pick("A", None, want)
        assert len(got) <= want and len(set(got)) == len(got)
        assert not set(got) & asked, "a block asked for twice"
        assert all(not had[blk[0]] for blk in got)
        asked |= set(got)
        outstanding += got
        assert outstanding, "nothing asked for yet the download is not complete"
        rnd.shuffle(outstanding)
        k = rnd.randint(1, len(outstanding))
        for blk in outstanding[:k]:
            assert pk.block_received(blk) == {"A"}
            p = blk[0]
            got_blocks.setdefault(p, set()).add(blk)
            if got_blocks[p] == {(p, b, m) for b, m in pk.plan(p)}:
                pk.piece_verified(p)
        outstanding = outstanding[k:]
    assert pk.complete and pk.left() == 0
    want_blocks = {blk for blk in src.peer_blocks() if not had[blk[0]]}
    assert asked == want_blocks
    assert not pk.requested and not pk.started and not pk.received


@given(st.sampled_from(PICK_KEYS), st.data())
@settings(max_examples=60, deadline=None)
def test_two_peers_against_a_model(
    torrents: dict[str, Source], key: str, data: st.DataObject
) -> None:
    """Picks, arrivals, rejects and disconnects at random; the picker's answers are
    checked against a model of what is asked of whom: a block is asked of a second
    peer only in end game (nothing new left for that peer, and every piece left under
    way), never twice of one peer, and ``block_received`` names exactly the peers it
    was asked of."""
    meta = torrents[key].meta
    n = meta.num_pieces
    pk = Picker(meta, [False] * n)
    a_mask = bytearray(data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)))
    extra = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    masks = {"A": a_mask, "B": bytearray(1 if not a_mask[i] or extra[i] else 0 for i in range(n))}
    for m in masks.values():
        pk.peer_has(i for i, h in enumerate(m) if h)
    out: dict[str, set[Block]] = {"A": set(), "B": set()}
    received: set[Block] = set()
    started: set[int] = set()  # pieces a block of which was asked for, until done

    def wanted(peer: str) -> list[Block]:
        return [blk for blk in all_blocks(pk) if masks[peer][blk[0]] and not pk.have[blk[0]]
                and blk not in received]

    def pick(peer: str, want: int) -> None:
        other = "B" if peer == "A" else "A"
        fresh = {blk for blk in wanted(peer) if blk not in out["A"] | out["B"]}
        late = {blk for blk in wanted(peer) if blk in out[other] and blk not in out[peer]}
        busy = data.draw(st.booleans())  # the peer has requests out
        all_under_way = all(pk.have[p] or p in started for p in range(n))
        got = pk.pick(peer, masks[peer], want, outstanding=int(busy))
        started.update(blk[0] for blk in got)
        assert len(got) <= want and len(set(got)) == len(got)
        assert not set(got) & out[peer], "the same block asked twice of one peer"
        assert set(got) <= set(wanted(peer))
        if fresh:
            assert got and set(got) <= fresh, "a second peer asked before end game"
        elif busy:
            assert got == [], "end game for a peer that still has requests out"
        elif not all_under_way:
            assert got == [], "end game while pieces are left that nobody was asked for"
        else:
            assert set(got) <= late and len(got) <= ENDGAME_BLOCKS
            assert bool(got) == bool(late), "end game asks nobody for what is late"
        out[peer] |= set(got)

    def arrive(peer: str, blk: Block, fail: bool) -> None:
        asked = pk.block_received(blk)
        assert asked == {q for q in out if blk in out[q]}
        assert peer in asked
        assert pk.block_received(blk) == set()  # a late copy: nobody left to cancel
        for q in out:
            out[q].discard(blk)  # the others are sent a cancel
        received.add(blk)
        p = blk[0]
        plan = {(p, b, m) for b, m in pk.plan(p)}
        if plan <= received:
            received.difference_update(plan)
            started.discard(p)
            if fail:
                pk.piece_failed(p)
            else:
                pk.piece_verified(p)

    for _ in range(data.draw(st.integers(0, 60))):
        op = data.draw(st.sampled_from(["pick", "pick", "arrive", "arrive", "arrive",
                                        "reject", "gone"]))
        peer = data.draw(st.sampled_from(["A", "B"]))
        if op == "pick":
            pick(peer, data.draw(st.integers(1, 8)))
        elif op == "arrive" and out[peer]:
            blk = data.draw(st.sampled_from(sorted(out[peer])))
            arrive(peer, blk, data.draw(st.integers(0, 4)) == 0)
        elif op == "reject" and out[peer]:
            blk = data.draw(st.sampled_from(sorted(out[peer])))
            pk.request_dropped(peer, blk)
            out[peer].discard(blk)
        elif op == "gone":  # and back at once, with the same pieces
            pk.peer_gone(peer)
            out[peer].clear()
    for _ in range(1000):
        if pk.complete:
            break
        for peer in ("A", "B"):
            pick(peer, 8)
        for peer in ("A", "B"):
            for blk in sorted(out[peer]):
                if blk in out[peer]:
                    arrive(peer, blk, False)
    assert pk.complete


@given(st.sampled_from([k for k in PICK_KEYS if k.endswith("/16k")]), st.data())
@settings(max_examples=60, deadline=None)
def test_rarest_first(torrents: dict[str, Source], key: str, data: st.DataObject) -> None:
    meta = torrents[key].meta
    n = meta.num_pieces
    avail = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    mask = bytearray(data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)))
    pk = Picker(meta, [False] * n)
    for p, k in enumerate(avail):
        pk.peer_has([p] * k)
    rarest = min((avail[p] for p in range(n) if mask[p]), default=None)
    first = pk.pick("A", mask, 1)
    if rarest is None:
        assert first == []
        return
    assert len(first) == 1 and mask[first[0][0]] and avail[first[0][0]] == rarest
    # the rest, one call: pieces in order of rarity, the started one first
    rest = pk.pick("A", mask, 10**6)
    order: list[int] = []
    for p, _, _ in [*first, *rest]:
        if p not in order:
            order.append(p)
    assert order[0] == first[0][0]
    assert [avail[p] for p in order[1:]] == sorted(avail[p] for p in order[1:])
    assert set(order) == {p for p in range(n) if mask[p]}


def test_started_pieces_are_finished_before_rarer_ones(torrents: dict[str, Source]) -> None:
    meta = torrents["v1/odd/64k"].meta
    n = meta.num_pieces
    pk = Picker(meta, [False] * n)
    pk.peer_has(range(n))
    pk.peer_has([3])
    pk.peer_has(p for p in range(n) if p != 0)  # 0 is the rarest
    (blk,) = pk.pick("A", None, 1)
    assert blk[0] == 0
    pk.peer_has([0] * 10)  # now 0 is the most common, but it is under way
    got = pk.pick("A", None, len(pk.plan(0)) - 1)
    assert {b[0] for b in got} == {0}
    nxt = pk.pick("A", None, 1)
    assert nxt[0][0] != 0 and nxt[0][0] != 3  # a rare one, not the common piece 3


def test_a_run_another_client_fetches_is_left_to_it(
        torrents: dict[str, Source], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clients of the daemon on one torrent that came to the same run of pieces went
    through it side by side, each fetching every piece. Told that another client
    verified a piece, the picker takes the pieces of that run it has not begun after
    every other piece as rare, and before rarer ones; those it has begun it finishes."""
    meta = torrents["v1/odd/16k"].meta
    n = meta.num_pieces
    monkeypatch.setattr(picker_mod, "EXTENT", 4 * meta.piece_length)  # runs of 4 pieces
    assert n > 12, n
    for sparse in (False, True):
        pk = Picker(meta, [False] * n)
        pk.peer_has(range(n))
        first = pk.pick("A", None, 1)[0][0]
        run = first - first % 4
        other = (run + 4) % (n - n % 4)  # another run, whole
        pk.left_to_others(other + 1)
        pk.left_to_others(first)  # (the pieces begun here are finished all the same)
        have = None
        if sparse:  # a peer with few pieces: its own are looked at, and ranked alike
            have = bytearray(n)
            have[first] = have[other] = have[other + 3] = have[(other + 8) % n] = 1
        picked = [first]
        for blk in pk.pick("A", have, 10**6):
            if blk[0] not in picked:
                picked.append(blk[0])
        late = {p for p in range(run, min(run + 4, n)) if p != first} | set(
            range(other, other + 4))
        wanted = [p for p in range(n) if have is None or have[p]]
        assert sorted(picked) == wanted
        tail = [p for p in picked if p in late]
        assert picked[len(picked) - len(tail):] == tail, (picked, late)
    # Rarer pieces still come first: a yielded piece of one peer before others' of two.
    pk = Picker(meta, [False] * n)
    pk.peer_has(range(n))
    pk.peer_has(p for p in range(n) if p // 4 != 1)
    pk.left_to_others(4)
    picked = []
    for blk in pk.pick("A", None, 10**6):
        if blk[0] not in picked:
            picked.append(blk[0])
    assert sorted(picked[:4]) == [4, 5, 6, 7]


def test_a_piece_asked_of_one_peer_alone_is_given_to_no_other(
        torrents: dict[str, Source]) -> None:
    """A piece that failed with blocks of several peers is asked of one peer alone,
    whole: the first that is asked for it takes it, no other peer is given a block of
    it (nor a copy in the end game) while that peer has it, and it passes to the next
    peer when that one lets a request of it go (choked, rejected, late) or goes, which
    is asked for all of it, the blocks the first sent too (its copies go over them:
    the attempt is one peer's, and says whether that peer lied); it is asked of one
    alone again after another failure, until it verifies."""
    meta = torrents["v1/odd/64k"].meta
    n = meta.num_pieces
    pk = Picker(meta, [True] * n)
    pk.piece_lost(0)  # (the one piece we lack)
    pk.peer_has([0])
    pk.peer_has([0])
    per = len(pk.plan(0))
    a = pk.pick("A", None, 1)
    b = pk.pick("B", None, per)
    assert {x[0] for x in a + b} == {0} and len(a) + len(b) == per  # (both gave blocks)
    pk.piece_failed(0)
    pk.ask_of_one(0)
    assert pk.taker(0) is None
    got = pk.pick("B", None, 2)
    assert [x[0] for x in got] == [0, 0] and pk.taker(0) == "B"
    assert pk.pick("A", None, per) == []  # (not even in the end game)
    assert {x[1] for x in pk.pick("B", None, per)} == {b for b, _ in pk.plan(0)[2:]}
    pk.request_dropped("B", got[0])  # (B rejected a block: the piece passes on)
    assert pk.taker(0) is None
    assert sorted(pk.pick("A", None, per)) == [(0, b, k) for b, k in pk.plan(0)]
    assert pk.taker(0) == "A"
    assert pk.pick("B", None, per) == []
    pk.peer_gone("A")
    assert pk.taker(0) is None
    pk.piece_failed(0)  # (failed again: still asked of one alone)
    assert len(pk.pick("B", None, per)) == per and pk.taker(0) == "B"
    assert pk.pick("A", None, per) == []
    pk.piece_verified(0)
    assert pk.taker(0) is None and pk.complete


def test_refusals_of_the_daemon_halve_the_pieces_begun_and_verified_ones_grow_them(
        tmp_path: Path) -> None:
    """The daemon refuses a block when it holds as many pieces in progress as it may: the
    piece is asked for again from its start, and fewer are begun at once: half as many
    as are under way, once for a burst of refusals (pieces begun before the cut were on
    their way), growing by one for as many pieces verified as the bound is."""
    content = make_payload(tmp_path / "src", 32 * 32768, seed=9)
    meta = Source(make_torrent_lt(content, 32768, "v1"), content.parent).meta
    n = meta.num_pieces
    pk = Picker(meta, [False] * n)
    pk.peer_has(range(n))
    per = len(pk.plan(0))
    first = pk.pick("A", None, 8 * per)
    begun = sorted({b[0] for b in first})
    assert len(begun) == 8 and pk.max_started is None
    pk.refused([begun[0]])
    assert pk.max_started == 3 and begun[0] not in pk.started  # (7 under way, halved)
    assert pk.pick("B", None, 100) == []  # every block of those asked: nothing new begun
    pk.refused([begun[1]])  # begun before the cut: no further cut
    assert pk.max_started == 3 and len(pk.started) == 6
    for p in begun[2:]:  # those under way arrive and verify
        for b, size in pk.plan(p):
            pk.block_received((p, b, size))
        pk.piece_verified(p)
    assert 4 < pk.max_started < 5  # (3 + 1/3 + ... for six pieces)
    again = pk.pick("A", None, 100)
    now = sorted({b[0] for b in again})
    assert len(now) == 5 and begun[0] in now  # (begun while fewer than 4.x: the refused too)
    pk.refused([now[-1]])  # begun after the cut: cut again
    assert pk.max_started == 2


def test_a_refusal_with_nothing_of_ours_under_way_holds_new_pieces_back_a_while(
        tmp_path: Path) -> None:
    """Refused with none of our pieces in progress (others hold the daemon's places:
    only theirs can end), the picker begins nothing for 50 ms, twice as long at each
    such refusal up to 2 s, and from the start again once a piece verifies."""
    from pieced.peer.picker import HOLD_FIRST, HOLD_MAX

    content = make_payload(tmp_path / "src", 32 * 32768, seed=9)
    meta = Source(make_torrent_lt(content, 32768, "v1"), content.parent).meta
    now = [100.0]
    pk = Picker(meta, [False] * meta.num_pieces, clock=lambda: now[0])
    pk.peer_has(range(meta.num_pieces))
    holds = []
    for _ in range(8):
        (blk,) = pk.pick("A", None, 1)
        pk.refused([blk[0]])
        holds.append(pk.held_for())
        assert pk.pick("A", None, 1) == []
        now[0] += holds[-1]
    assert holds[:2] == pytest.approx([HOLD_FIRST, 2 * HOLD_FIRST])
    assert holds[-1] == pytest.approx(HOLD_MAX)
    (blk,) = pk.pick("A", None, 1)
    for b, size in pk.plan(blk[0]):
        pk.block_received((blk[0], b, size))
    pk.piece_verified(blk[0])
    assert pk.held_for() == 0
    (blk,) = pk.pick("A", None, 1)
    pk.refused([blk[0]])
    assert pk.held_for() == pytest.approx(HOLD_FIRST)


def test_peer_gone_returns_its_blocks(torrents: dict[str, Source]) -> None:
    pk = Picker(torrents["hybrid/odd/64k"].meta, [False] * torrents["hybrid/odd/64k"].meta.num_pieces)
    total = len(all_blocks(pk))
    a = pk.pick("A", None, 5)
    c = pk.pick("C", None, total)  # everything else, nothing of A's (no end game yet)
    assert len(a) == 5 and not set(a) & set(c)
    assert set(a) | set(c) == set(all_blocks(pk))
    pk.peer_gone("A")
    assert all("A" not in who for who in pk.requested.values())
    b = pk.pick("B", None, total)
    assert set(b) == set(a)
    assert pk.block_received(a[0]) == {"B"}


def test_blocks_the_daemon_holds_are_not_asked_for_and_their_piece_comes_first(
        torrents: dict[str, Source]) -> None:
    """A piece the daemon holds part of (an earlier run stopped in it): its other blocks
    are asked for before any new piece's, and the held ones never."""
    meta = torrents["v2/odd/64k"].meta
    pk = Picker(meta, [False] * meta.num_pieces)
    p = 5
    plan = [(p, b, m) for b, m in pk.plan(p)]
    assert len(plan) > 2
    pk.held(p, plan[::2])
    got = pk.pick("A", None, len(plan))
    assert got[: len(plan[1::2])] == plan[1::2], got
    assert not set(got) & set(plan[::2])
    pk.piece_failed(p)  # a failed attempt: every block of it is wanted again
    assert set(plan) <= set(pk.pick("B", None, 10_000))


def test_piece_failed_makes_every_block_pickable_again(torrents: dict[str, Source]) -> None:
    meta = torrents["v2/odd/64k"].meta
    p = 5
    pk = Picker(meta, [q != p for q in range(meta.num_pieces)])  # (the end game: p is left)
    plan = [(p, b, m) for b, m in pk.plan(p)]
    assert len(plan) > 1
    assert pk.pick("A", None, 100, allowed=[p]) == plan
    for blk in plan[:-1]:
        pk.block_received(blk)
    assert pk.pick("B", None, 100, allowed=[p]) == [plan[-1]]  # end game for the last
    pk.block_received(plan[-1])
    assert pk.pick("C", None, 100, allowed=[p]) == []  # all in: nothing to ask for
    pk.piece_failed(p)
    assert not pk.have[p]
    assert pk.pick("C", None, 100, allowed=[p]) == plan
    # a failure halfway through a piece, too
    for blk in plan[:1]:
        pk.block_received(blk)
    pk.piece_failed(p)
    assert pk.pick("D", None, 100, allowed=[p]) == plan


def test_end_game(torrents: dict[str, Source]) -> None:
    meta = torrents["v1-pads/odd/64k"].meta
    pk = Picker(meta, [False] * meta.num_pieces)
    blocks = all_blocks(pk)
    half = pk.pick("A", None, len(blocks) // 2)
    rest = pk.pick("B", None, len(blocks))
    assert not set(half) & set(rest)  # not in end game yet: B is given what A was not
    assert sorted(half + rest) == sorted(blocks)
    # now every missing block is asked of someone: a third peer, idle, gets late ones,
    # ENDGAME_BLOCKS at a time (each is sent twice: the end game wastes no more than that)
    assert pk.pick("C", None, len(blocks), outstanding=1) == []  # not idle: nothing
    late: list[Block] = []
    while got := pk.pick("C", None, len(blocks)):
        assert len(got) <= ENDGAME_BLOCKS
        late += got
    assert set(late) == set(blocks) and len(late) == len(blocks)  # never twice to one peer
    assert pk.block_received(half[0]) == {"A", "C"}
    assert pk.pick("A", None, len(blocks)) == []  # A has nothing new to be asked for
    # A is gone: its blocks go to B (asked of C already, so B is a second peer)
    pk.peer_gone("A")
    again: list[Block] = []
    while got := pk.pick("B", None, len(blocks)):
        again += got
    assert set(again) == set(half[1:]) and not set(again) & set(rest)


def test_the_end_game_gives_a_third_peer_what_two_late_peers_hold(
        torrents: dict[str, Source]) -> None:
    """In the end game a block is asked of two peers at most; but peers that let
    requests time out (snubbed) do not count: an idle peer is given what two of them
    hold. (It never was: a download whose last blocks two stalled peers held waited
    for the longest time out, while a third peer sat idle.) A snubbed peer itself is
    given nothing asked of others."""
    meta = torrents["v1-pads/odd/64k"].meta
    pk = Picker(meta, [False] * meta.num_pieces)
    blocks = all_blocks(pk)
    held = pk.pick("A", None, len(blocks))
    assert sorted(held) == sorted(blocks)
    twice = pk.pick("B", None, len(blocks))  # idle: end-game copies
    assert twice and set(twice) <= set(held)
    late = {"A", "B"}
    live = lambda q: q not in late  # noqa: E731
    assert pk.pick("C", None, len(blocks), endgame=False, live=live) == []
    assert not set(pk.pick("C", None, len(blocks))) & set(twice)  # both live: not to C
    third = pk.pick("D", None, len(blocks), live=live)
    assert set(twice) <= set(third) or len(third) == ENDGAME_BLOCKS
    assert set(third) & set(twice)  # what two late peers hold goes to a third


@given(st.sampled_from(PICK_KEYS), st.integers(1, 8), st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_the_end_game_asks_for_what_a_slow_peer_would_send_last(
        torrents: dict[str, Source], key: str, buffered: int, slow: int) -> None:
    """A slow peer S is asked for every block; it sends one every ``slow`` turns, in the
    order asked, and a cancel takes back any but the ``buffered`` at the head of its
    queue (on their way already: in its send buffer). An idle fast peer F is given
    end-game copies and sends them at once, and each copy of F's that comes first
    cancels S's request. No more blocks come twice than S could not take back: F is
    given the blocks S would send last, not those it is sending (the first blocks of
    the first piece not finished: nearly each of F's copies came twice)."""
    meta = torrents[key].meta
    pk = Picker(meta, [False] * meta.num_pieces)
    queue = deque(pk.pick("S", None, 10**6))  # S's requests, in the order asked
    assert sorted(queue) == sorted(all_blocks(pk))
    came: set[Block] = set()
    twice = 0

    def arrive(peer: str, blk: Block) -> None:
        nonlocal twice
        if blk in came:
            twice += 1
            return
        came.add(blk)
        asked = pk.block_received(blk)
        if peer == "F" and "S" in asked and blk in list(queue)[buffered:]:
            queue.remove(blk)  # cancelled in time
        p = blk[0]
        if all((p, b, n) in came for b, n in pk.plan(p)):
            pk.piece_verified(p)

    turn = 0
    while not pk.complete:
        turn += 1
        assert turn < 10 * len(all_blocks(pk)) + 10
        if turn % slow == 0 and queue:
            arrive("S", queue.popleft())
        for blk in pk.pick("F", None, 100):
            arrive("F", blk)
    while queue:  # what S sends all the same
        arrive("S", queue.popleft())
    assert twice <= buffered, (twice, len(came))


@given(st.sampled_from(PICK_KEYS), st.data())
@settings(max_examples=60, deadline=None)
def test_allowed_restricts_picks(torrents: dict[str, Source], key: str, data: st.DataObject) -> None:
    meta = torrents[key].meta
    n = meta.num_pieces
    had = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    allowed = data.draw(st.lists(st.integers(0, n - 1), max_size=n))
    mask = data.draw(st.none() | st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))
    pk = Picker(meta, had)
    pre = pk.pick("A", None, data.draw(st.integers(1, 6)))  # something under way elsewhere
    got = pk.pick("B", bytearray(mask) if mask is not None else None, 10**6, allowed=allowed)
    assert len(set(got)) == len(got)
    ok = {p for p in allowed if not had[p] and (mask is None or mask[p])}
    assert {blk[0] for blk in got} <= ok
    expect = {blk for blk in all_blocks(pk) if blk[0] in ok and blk not in pre}
    if expect:
        assert set(got) == expect
    elif all(had[p] or p in {blk[0] for blk in pre} for p in range(n)):
        # end game (every piece left under way) over what A was given, ENDGAME_BLOCKS at
        # a time
        given = {blk for blk in pre if blk[0] in ok}
        assert set(got) <= given and len(got) == min(len(given), ENDGAME_BLOCKS)
    else:  # pieces nobody was asked for are left: no end game yet
        assert got == []


@pytest.mark.parametrize("want", [0, 1, 2, 3])
def test_pick_returns_at_most_want(torrents: dict[str, Source], want: int) -> None:
    meta = torrents["v1/odd/64k"].meta
    pk = Picker(meta, [False] * meta.num_pieces)
    got = pk.pick("A", None, want)
    assert len(got) == want
    assert set(pk.requested) == set(got)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1000)), max_size=60))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_left_counts_the_pieces_missing_whatever_is_gained_and_lost(
    torrents: dict[str, Source], ops: list[tuple[bool, int]],
) -> None:
    """The picker counts missing pieces as they are verified and lost (a reconcile that
    gains 65,536 pieces asks after each whether it is complete)."""
    meta = torrents["v1/odd/16k"].meta
    pk = Picker(meta, [False] * meta.num_pieces)
    ops = [(g, p % meta.num_pieces) for g, p in ops]
    for gained, p in ops:
        if gained:
            pk.piece_verified(p)
        else:
            pk.piece_lost(p)
        assert pk.left() == pk.have.count(0)
        assert pk.complete == all(pk.have)


def test_a_stall_is_held_against_a_peer_for_a_while_not_for_good() -> None:
    """A peer that lost its slot for taking nothing waits behind the others, and is the
    first let go when a place is wanted; on a seed that runs for days, a leecher whose
    disk was busy once was last in line for good. Its stalls are forgotten STALL_MEMORY
    after the last one, and held again if it stalls again."""
    from pieced.peer.conn import STALL_MEMORY

    now = [1000.0]
    conns = [PeerConnection((IH,), A_ID, list(SIZES), v2=False, clock=lambda: now[0])
             for _ in range(3)]
    for c in conns:
        c.receive(wire.handshake(IH, B_ID, wire.make_reserved(fast=True)))
        c.receive(wire.interested())
    hog, other, third = conns
    hog.send_choke(False)
    now[0] += 30
    assert choke_round(conns, 1, {hog}, rotate=False) == ([hog], [other])
    assert hog.stalls == 1
    hog.send_choke(True)
    other.send_choke(False)
    now[0] += 30
    # The slot goes round: the one that stalled waits behind those that did not.
    assert choke_round(conns, 1) == ([other], [third])
    other.send_choke(True)
    third.send_choke(False)
    now[0] += 30
    assert choke_round(conns, 1) == ([third], [other])  # (though hog waited longer)
    now[0] += STALL_MEMORY
    assert hog.stalls == 0
    assert choke_round(conns, 1) == ([third], [hog])  # forgotten: its turn
    hog.note_stall()
    hog.note_stall()
    now[0] += STALL_MEMORY - 1
    assert hog.stalls == 2 and choke_round(conns, 1) == ([third], [other])


def test_a_connection_to_ourselves_is_dropped() -> None:
    """A handshake with our own peer id is our own dial come back (a tracker hands out
    our address): dropped, as libtorrent does."""
    c = PeerConnection((IH,), A_ID, list(SIZES), v2=False)
    with pytest.raises(wire.Ourselves):
        c.receive(wire.handshake(IH, A_ID, wire.make_reserved(fast=True)))
    # Answered first, so that the side that dialled (us) learns it too, from our id.
    [answer] = wire.Parser().feed(b"".join(c.take_outbox()))
    assert isinstance(answer, wire.Handshake) and answer.peer_id == A_ID
    dialled = PeerConnection((IH,), A_ID, list(SIZES), v2=False, outgoing_hash=IH)
    dialled.take_outbox()
    with pytest.raises(wire.Ourselves):
        dialled.receive(wire.handshake(IH, A_ID, wire.make_reserved(fast=True)))


def test_stalled_peers_give_their_unchoke_slots_to_those_waiting() -> None:
    """Unchoked peers that take nothing we send (``stalled``) are choked while others
    wait, all of them in one round, and the waiting peers that did not stall go first."""
    conns = [incoming() for _ in range(8)]
    for c in conns:
        c.receive(wire.interested())
    for c in conns[:4]:
        c.send_choke(False)
    stuck = {conns[0], conns[2], conns[5]}  # two unchoked, one waiting
    choke, unchoke = choke_round(conns, 4, stuck)
    assert set(choke) == {conns[0], conns[2]}
    assert len(unchoke) == 2 and conns[5] not in unchoke
    assert set(unchoke) <= {conns[4], conns[6], conns[7]}
    assert conns[0].stalls == conns[2].stalls == 1
    # nobody waiting: a stalled peer keeps its slot (there is no one to give it to)
    assert choke_round(conns[:4], 4, stuck) == ([], [])
    # between rounds (no rotation) only the slots of stalled peers change hands
    for c in choke:
        c.send_choke(True)
    for c in unchoke:
        c.send_choke(False)
    assert choke_round(conns, 4, set(), rotate=False) == ([], [])
    hog = unchoke[0]
    choke, unchoke = choke_round(conns, 4, {hog}, rotate=False)
    # a peer that stalled before waits behind those that never did
    assert choke == [hog] and len(unchoke) == 1
    assert unchoke[0] not in (conns[0], conns[2])


def test_of_peers_never_unchoked_the_one_that_waited_longest_goes_first() -> None:
    """Every slot held, peers that were never unchoked wait alike: the one connected
    first gets the next free slot, whatever order they are listed in. (Ties were broken
    by the order of a set: a leecher waiting behind peers that stalled, were dropped and
    dialled again, each new connection as fresh as it, waited over a minute.)"""
    now = [0.0]
    conns = []
    for t in range(6):
        now[0] = float(t)
        c = PeerConnection((IH,), A_ID, list(SIZES), v2=False, clock=lambda: now[0])
        c.receive(wire.handshake(IH, B_ID, wire.make_reserved(fast=True)) + wire.have_none())
        c.receive(wire.interested())
        c.take_outbox()
        conns.append(c)
    for c in conns[:2]:
        c.send_choke(False)
    patient = conns[2]
    for order in (conns, conns[::-1], [conns[5], conns[3], conns[1], conns[4], conns[0], conns[2]]):
        choke, unchoke = choke_round(order, 2, {conns[0]}, rotate=False)
        assert choke == [conns[0]] and unchoke == [patient]


def test_the_metadata_is_handed_out_in_pieces() -> None:
    """BEP 9: the extension handshake offers ut_metadata with the metadata's size; a
    request is answered with that piece of it (16 KiB, the last one shorter), one past
    the end is rejected, and nothing is sent to a peer that did not offer ut_metadata.
    A request is an event, answered when the plugin takes it (after the peer read what
    was sent before), never while the bytes are read."""
    from pieced.peer.conn import METADATA_PIECE, UT_METADATA, MetadataRequest

    info = bytes(range(256)) * 150  # 38,400 bytes: three pieces
    c = PeerConnection((IH,), A_ID, list(SIZES), v2=False, metadata=info)
    c.receive(wire.handshake(IH, B_ID, wire.make_reserved(extended=True, fast=True)))
    c.send_bitfield(bytearray(len(SIZES)))
    hello = [e for e in wire.Parser(handshake=True).feed(b"".join(c.take_outbox()))
             if isinstance(e, wire.Extended)]
    offer = bencodepy.decode(hello[0].payload)
    assert offer[b"m"][b"ut_metadata"] == UT_METADATA and offer[b"metadata_size"] == len(info)

    def ask(piece: int) -> list[wire.Event]:
        asked = c.receive(wire.extended(UT_METADATA, bencodepy.encode({b"msg_type": 0,
                                                                      b"piece": piece})))
        assert c.take_outbox() == []
        for ev in asked:
            assert isinstance(ev, MetadataRequest) and ev.piece == piece
            c.send_metadata(ev)
        p = wire.Parser(handshake=False)
        return list(p.feed(b"".join(c.take_outbox())))

    assert ask(0) == []  # it offered no ut_metadata of its own: no id to answer with
    c.receive(wire.extended(0, bencodepy.encode({b"m": {b"ut_metadata": 7}})))
    got = b""
    for piece in range(3):
        (ev,) = ask(piece)
        assert isinstance(ev, wire.Extended) and ev.ext_id == 7
        head = bencodepy.encode({b"msg_type": 1, b"piece": piece, b"total_size": len(info)})
        assert ev.payload.startswith(head)
        got += ev.payload[len(head):]
    assert got == info and len(ev.payload) - len(head) == len(info) - 2 * METADATA_PIECE
    (ev,) = ask(3)
    assert isinstance(ev, wire.Extended)
    assert bencodepy.decode(ev.payload) == {b"msg_type": 2, b"piece": 3}


def test_lt_donthave_both_ways() -> None:
    """BEP 54, as libtorrent has it: our extension handshake offers lt_donthave (id 7);
    a peer's lt_donthave of a piece it had takes it out of what it has and is an event;
    one of another size, out of range, or of a piece it never had changes nothing; we
    send ours only to a peer that offered the extension, with its id (which a later
    handshake may change, or turn off with 0)."""
    from pieced.peer.conn import LT_DONTHAVE, DontHave

    c = PeerConnection((IH,), A_ID, list(SIZES), v2=False)
    c.receive(wire.handshake(IH, B_ID, wire.make_reserved(extended=True, fast=True)))
    c.send_bitfield(bytearray(len(SIZES)))
    hello = [e for e in wire.Parser(handshake=True).feed(b"".join(c.take_outbox()))
             if isinstance(e, wire.Extended)]
    assert bencodepy.decode(hello[0].payload)[b"m"] == {b"lt_donthave": LT_DONTHAVE}

    c.send_dont_have(1)
    assert c.take_outbox() == []  # it offered no lt_donthave: nothing to say it with
    assert c.receive(wire.have_all()) and c.peer_count == 3

    def dont(piece: int, size: int = 4) -> list[Any]:
        return c.receive(wire.extended(LT_DONTHAVE, piece.to_bytes(8, "big")[-size:]))

    (ev,) = dont(1)
    assert type(ev) is DontHave and ev.piece == 1
    assert list(c.peer_has) == [1, 0, 1] and c.peer_count == 2
    assert dont(1) == []  # said again: it no longer had it
    assert dont(3) == [] and dont(2**32 - 1) == []  # out of range
    assert dont(0, size=5) == [] and dont(0, size=3) == []  # not 4 bytes
    assert list(c.peer_has) == [1, 0, 1] and c.peer_count == 2
    assert c.receive(wire.have(1)) and c.peer_count == 3  # and back

    c.receive(wire.extended(0, bencodepy.encode({b"m": {b"lt_donthave": 9}})))
    c.send_dont_have(2)
    (ev,) = wire.Parser(handshake=False).feed(b"".join(c.take_outbox()))
    assert ev == wire.Extended(9, (2).to_bytes(4, "big"))
    c.receive(wire.extended(0, bencodepy.encode({b"m": {b"ut_pex": 1}})))  # additive
    c.send_dont_have(2)
    assert len(c.take_outbox()) == 1
    c.receive(wire.extended(0, bencodepy.encode({b"m": {b"lt_donthave": 0}})))  # off
    c.send_dont_have(2)
    assert c.take_outbox() == []


def test_nothing_but_the_handshakes_goes_before_our_pieces() -> None:
    """A peer's handshake with requests and a CANCEL in the same read: each was answered
    (a REJECT, we choke it) while the plugin had not yet said what we have, so the
    REJECTs went out before our HAVE_ALL, which BEP 3 and 6 want first after the
    handshakes; a HAVE of a piece just verified could too. They wait behind it now."""
    c = PeerConnection((IH,), A_ID, list(SIZES), v2=False)
    c.receive(wire.handshake(IH, B_ID, wire.make_reserved(extended=True, fast=True))
              + wire.request(0, 0, BLOCK) + wire.request(1, 0, BLOCK)
              + wire.cancel(2, 0, BLOCK))
    c.send_have(2)
    c.send_choke(False)
    early = sent(c, handshake=True)
    assert [type(e) for e in early] == [wire.Handshake, wire.Extended]
    c.send_bitfield(bytearray(b"\x01" * len(SIZES)))
    assert sent(c) == [wire.HaveAll(), wire.RejectRequest(0, 0, BLOCK),
                       wire.RejectRequest(1, 0, BLOCK), wire.Have(2), wire.Unchoke()]
    c.send_have(1)
    assert sent(c) == [wire.Have(1)]  # (after it, at once)


def test_a_peer_streaming_hash_requests_that_are_rejected_is_dropped() -> None:
    """HASH_REQUEST was never chatter: a peer streaming them on a v1 torrent (each
    rejected, a flush each) kept pieced-peer's loop busy for as long as it liked, and
    slowed its other peers 3 to 5 times. A rejected one counts as chatter now. So does
    one answered, by the size of its answer (53 bytes ask for up to 256 KiB of hashes:
    a peer asking for them over and over, and reading the answers, had them built and
    sent at a gigabyte a second); what an honest peer asks, a piece layer once, stays
    far inside the budget (see the next test)."""
    root = bytes(range(32))
    ask = wire.hash_request(root, 0, 0, 512, 0)
    now = [100.0]
    for answered in (True, False):
        c = PeerConnection((IH,), A_ID, list(SIZES), v2=False, clock=lambda: now[0])
        c.receive(wire.handshake(IH, B_ID, wire.make_reserved(extended=True, fast=True,
                                                              v2=True)))
        c.send_bitfield(bytearray(len(SIZES)))
        asked = 0
        with contextlib.suppress(wire.WireError):
            for _ in range(40):
                for ev in c.receive(ask * 500):
                    assert isinstance(ev, wire.HashRequest)
                    asked += 1
                    if answered:
                        c.send_hashes(ev, bytes(32 * 512))
                    else:
                        c.send_hash_reject(ev)
                c.take_outbox()
                now[0] += 0.01
        if answered:  # (9 units each: a burst of 5,000 and 500 a second)
            assert 500 < asked < 1_000
        else:
            assert 5_000 < asked < 8_000


def test_a_peer_streaming_blocks_nobody_asked_for_is_dropped() -> None:
    """Each block not asked for cost a unit of chatter: 300 a second (5 MB/s) of them
    went on for as long as the peer liked. Past 16 MiB of them (and a quarter of what
    it sent that was asked for) the peer is dropped; the late blocks of a pipeline
    cancelled, or voided by a choke, are far fewer."""
    c, clock = _clocked()
    c.receive(wire.have_all())
    block = wire.piece(0, 0, bytes(BLOCK))
    late = 0
    for _ in range(500):  # (a pipeline's worth, late after a choke)
        assert c.receive(block) == []
        late += 1
        clock.now += 0.002
    with pytest.raises(wire.WireError):
        for _ in range(2000):
            c.receive(block)
            late += 1
            clock.now += 0.004
    assert late == 1024  # (16 MiB taken; the next one is past the bound)


def test_a_peer_asking_for_the_piece_layers_of_a_large_torrent_is_answered() -> None:
    """A leecher from a magnet link asks for each file's piece layer in runs of 512
    hashes, as fast as the answers come: the layers of a 1 TiB torrent of 4 MiB pieces
    (262,144 hashes, 8 MiB) in a second, all answered."""
    root = bytes(range(32))
    c, clock = _clocked()
    answered = 0
    for run in range(512):
        for ev in c.receive(wire.hash_request(root, 8, run * 512, 512, 10)):
            assert isinstance(ev, wire.HashRequest)
            c.send_hashes(ev, bytes(32 * (512 + 10)))
            answered += 1
        c.take_outbox()
        clock.now += 1 / 512
    assert answered == 512


def test_interest_said_again_is_no_event() -> None:
    """INTERESTED when the peer is interested already (or NOT_INTERESTED when it is not)
    changes nothing and is no event: each one used to cost the plugin a choke round and
    the daemon a request, so a stream of them kept both busy."""
    c = incoming()
    events = c.receive(wire.interested() * 1000)
    assert [type(e) for e in events] == [wire.Interested] and c.peer_interested
    events = c.receive(wire.not_interested() * 3 + wire.interested() + wire.interested())
    assert [type(e) for e in events] == [wire.NotInterested, wire.Interested]


@pytest.mark.parametrize("piece_kib", [16, 256])
def test_equally_rare_pieces_are_taken_a_run_of_4_mib_at_a_time(piece_kib: int) -> None:
    """Ties between equally rare pieces were broken piece by piece at random: a torrent
    of 12,000 small files was then written a piece of one file, then of another, and the
    daemon opened a file again for nearly every piece (its 512 open files held few of
    them). Pieces are now taken in runs of 4 MiB, the runs in random order."""
    from pieced.storage.metainfo import parse

    pl = piece_kib * 1024
    run = 4 * 1024 * 1024 // pl
    n = 5 * run + 7  # five whole runs and a short one
    info = {b"name": b"x", b"piece length": pl, b"length": pl * n, b"pieces": bytes(20 * n)}
    meta = parse(bencodepy.encode({b"info": info}))
    orders = set()
    for _ in range(4):
        pk = Picker(meta, [False] * n)
        pk.peer_has(range(n))
        pk.peer_has(range(run, 2 * run))  # the second run is the most common: taken last
        pieces = list(dict.fromkeys(b[0] for b in pk.pick("A", None, 10**6)))
        assert sorted(pieces) == list(range(n))
        assert pieces[-run:] == list(range(run, 2 * run))
        for prev, p in itertools.pairwise(pieces):
            assert p % run == 0 or p == prev + 1, (prev, p)  # a run is taken whole, in order
        orders.add(tuple(p for p in pieces if p % run == 0))
    assert len(orders) > 1  # the runs in random order (all four the same: 1 in 120**3)


def test_reads_in_flight_for_a_peer_fill_the_send_ahead_with_small_pieces() -> None:
    """No read from the daemon runs past a piece: with 8 in flight, a libtorrent leecher
    of 16 KiB pieces waited on the daemon's round trips. Small pieces get as many reads
    as fill SEND_AHEAD (up to 64); large ones keep 8, so that blocks asked for meanwhile
    join longer reads."""
    from pieced.peer.plugin import READ_BYTES, SEND_AHEAD, reads_per_peer

    assert reads_per_peer(16 * 1024) == 64
    assert reads_per_peer(64 * 1024) == 32
    for kib in (256, 1024, 4096, 16384):
        assert reads_per_peer(kib * 1024) == 8
    for kib in (16, 32, 64, 128, 256, 512, 1024, 4096):
        pl = kib * 1024
        # what a peer's reads may hold at once stays within SEND_AHEAD, or 8 reads
        assert reads_per_peer(pl) * min(pl, READ_BYTES) <= max(SEND_AHEAD, 8 * READ_BYTES)


def _picks_seconds(n: int, peer_pieces: int) -> float:
    """Seconds of 300 picks that each start a new piece (one-block pieces), another
    peer's HAVE between two of them, for a peer with ``peer_pieces`` of ``n`` pieces."""
    import time

    from pieced.storage.metainfo import parse

    info = {b"name": b"x", b"piece length": BLOCK, b"length": BLOCK * n, b"pieces": bytes(20 * n)}
    pk = Picker(parse(bencodepy.encode({b"info": info})), [False] * n)
    mask = bytearray(n)
    mask[n - peer_pieces:] = b"\x01" * peer_pieces
    pk.peer_has(range(n - peer_pieces, n))
    pk.pick("A", mask, 1, peer_count=peer_pieces)  # (the first sort)
    start = time.perf_counter()
    for k in range(300):
        pk.peer_has([k])
        pk.pick("A", mask, 1, peer_count=peer_pieces)
    return time.perf_counter() - start


@pytest.mark.parametrize("sparse", [False, True])
def test_a_pick_costs_about_the_same_whatever_the_number_of_pieces(sparse: bool) -> None:
    """Each new piece started sorted every piece by rarity (150 ms a pick at 400,000
    pieces: a download from one seeder at 9 MiB/s), and a peer with one piece had every
    piece walked at each pick (a flood of its messages kept the plugin busy for a
    minute). Forty times the pieces now costs a pick a few times as much, not forty."""
    small = min(_picks_seconds(10_000, 1 if sparse else 10_000) for _ in range(3))
    large = min(_picks_seconds(400_000, 1 if sparse else 400_000) for _ in range(3))
    assert large < 8 * small, (large, small)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _clocked(fast: bool = True) -> tuple[PeerConnection, Clock]:
    clock = Clock()
    c = PeerConnection((IH,), A_ID, list(SIZES), v2=False, clock=clock)
    c.receive(wire.handshake(IH, B_ID, wire.make_reserved(extended=True, fast=fast)))
    c.take_outbox()
    return c, clock


FLOODS = {
    "keepalive": wire.keep_alive(),
    "interest": wire.interested() + wire.not_interested(),
    "unchoke": wire.unchoke() + wire.choke(),
    "have_again": wire.have(1),
    "cancel_unknown": wire.cancel(0, 0, BLOCK),
    "request_choked": wire.request(0, 0, BLOCK),
    "suggest": wire.suggest_piece(0),
    "reject_unknown": wire.reject_request(0, 0, BLOCK),
    "extended": wire.extended(7, b"d1:xi0ee"),
}


@pytest.mark.parametrize("name", sorted(FLOODS))
def test_a_peer_streaming_messages_that_change_nothing_is_dropped(name: str) -> None:
    """A MiB of keep-alives is 262,144 messages, of INTERESTED / NOT_INTERESTED 209,715
    (each a choke round in the plugin): every one was handled, one chunk after another,
    while every other peer waited its turn (an honest leecher took minutes instead of a
    second). Past a burst and a rate no honest peer comes near, the peer broke the
    protocol; more of them later, at the rate, are taken."""
    from pieced.peer.conn import CHATTER_BURST, CHATTER_RATE

    c, clock = _clocked()
    c.receive(wire.have(1))  # (so that the next HAVE of it is said again)
    msg = FLOODS[name]
    per = len(parse_all(msg))
    c.receive(msg * ((CHATTER_BURST - 10) // per))  # a burst, taken
    with pytest.raises(wire.WireError, match="change nothing"):
        c.receive(msg * (1 + 20 // per))
    c, clock = _clocked()
    c.receive(wire.have(1))
    for _ in range(50):  # at the rate, for as long as it likes
        clock.now += 1.0
        c.receive(msg * int(CHATTER_RATE // per))
    with pytest.raises(wire.WireError):
        c.receive(msg * (CHATTER_BURST // per + 1))


def test_extension_messages_cost_chatter_by_their_size_and_are_bounded() -> None:
    """A peer sent extension handshakes of 2 MiB of bencode, each decoded in Python on
    the event loop for over a second and counted as one message of chatter: fifteen of
    them made a libtorrent leecher beside it take 20 s instead of 0.3 s. An extension
    message now costs a unit of chatter per 64 bytes, and a handshake or a ut_metadata
    message past its bound (16 KiB; 17 KiB, as libtorrent) breaks the protocol."""
    from pieced.peer.conn import MAX_EXT_HANDSHAKE, MAX_UT_METADATA, UT_METADATA

    def handshake(size: int) -> bytes:
        body = bencodepy.encode({b"m": {}, b"x": b""})
        pad = size - len(body) - 2  # (the string grows by its own length's digits too)
        body = bencodepy.encode({b"m": {}, b"x": b"z" * pad})
        body = bencodepy.encode({b"m": {}, b"x": b"z" * (pad - (len(body) - size))})
        assert len(body) == size
        return wire.extended(0, body)

    c, _ = _clocked()
    c.receive(handshake(100) * 1000)  # small ones: a thousand, taken
    c, _ = _clocked()
    eight_kib = handshake(8192)  # 129 units each
    c.receive(eight_kib * 30)  # a burst of them, taken
    with pytest.raises(wire.WireError, match="change nothing"):
        c.receive(eight_kib * 10)
    c, _ = _clocked()
    c.receive(handshake(MAX_EXT_HANDSHAKE))
    with pytest.raises(wire.WireError, match="extension handshake of 16385 bytes"):
        c.receive(handshake(MAX_EXT_HANDSHAKE + 1))
    c, _ = _clocked()
    c.receive(wire.extended(UT_METADATA, b"d8:msg_typei1e5:piecei0ee" + bytes(16384)))
    with pytest.raises(wire.WireError, match="ut_metadata message of"):
        c.receive(wire.extended(UT_METADATA, bytes(MAX_UT_METADATA + 1)))


def test_allowed_fast_pieces_kept_are_bounded() -> None:
    """Each pick while choked walks the pieces a peer allows us: a peer naming every
    piece of a large torrent would have made every pick walk them all. The first
    MAX_ALLOWED_FAST are kept (libtorrent offers 5); more are ignored."""
    from pieced.peer.conn import MAX_ALLOWED_FAST

    c, _ = _clocked()
    c.receive(b"".join(wire.allowed_fast(p % len(SIZES)) for p in range(3)))
    assert c.allowed_fast == {0, 1, 2}
    n = MAX_ALLOWED_FAST + 50
    sizes = [BLOCK] * n
    big = PeerConnection((IH,), A_ID, sizes, v2=False, clock=Clock())
    big.receive(wire.handshake(IH, B_ID, wire.make_reserved(extended=True, fast=True)))
    big.receive(b"".join(wire.allowed_fast(p) for p in range(n)))
    assert big.allowed_fast == set(range(MAX_ALLOWED_FAST))


def test_a_peer_asking_and_cancelling_over_and_over_is_dropped() -> None:
    """A REQUEST and its CANCEL change nothing, and each CANCEL looks through the peer's
    queue: a stream of such pairs behind a full queue took 2 s of CPU a MiB, and never
    counted as chatter. Cancels now do; an end game's few hundred are taken."""
    from pieced.peer.conn import CHATTER_BURST

    c, _ = _clocked()
    c.receive(wire.interested())
    c.send_choke(False)
    c.take_outbox()
    pair = wire.request(0, 0, BLOCK) + wire.cancel(0, 0, BLOCK)
    c.receive(pair * 1000)
    assert not c.peer_requests
    with pytest.raises(wire.WireError, match="change nothing"):
        c.receive(pair * CHATTER_BURST)


def test_an_honest_peer_never_runs_out_of_chatter() -> None:
    """What libtorrent sends over an hour, at its busiest: a keep-alive a minute, a
    change of interest and of choke every few seconds, ten ALLOWED_FAST and SUGGESTs,
    and every minute 500 requests in flight rejected by a choke."""
    c, clock = _clocked()
    c.receive(wire.have_none() + b"".join(wire.allowed_fast(p % 3) for p in range(10))
              + b"".join(wire.suggest_piece(p % 3) for p in range(10)))
    for second in range(3600):
        clock.now += 1.0
        data = b""
        if second % 60 == 0:
            data += wire.keep_alive() + wire.request(0, 0, BLOCK) * 500
        if second % 3 == 0:
            data += wire.interested() if second % 2 else wire.not_interested()
            data += wire.unchoke() if second % 2 else wire.choke()
        if data:
            c.receive(data)


def _picks_behind_seconds(backlog: int) -> float:
    """Seconds of 300 picks (each piece one block, received at once, none verified) with
    ``backlog`` pieces received before them and not yet verified by the daemon."""
    import time

    from pieced.storage.metainfo import parse

    n = backlog + 1000
    info = {b"name": b"x", b"piece length": BLOCK, b"length": BLOCK * n, b"pieces": bytes(20 * n)}
    pk = Picker(parse(bencodepy.encode({b"info": info})), [False] * n)
    pk.peer_has(range(n))
    for _ in range(backlog):
        (blk,) = pk.pick("A", None, 1, peer_count=n)
        pk.block_received(blk)
    start = time.perf_counter()
    for _ in range(300):
        (blk,) = pk.pick("A", None, 1, peer_count=n)
        pk.block_received(blk)
    return time.perf_counter() - start


def test_a_pick_costs_the_same_however_many_pieces_wait_to_be_verified() -> None:
    """When the daemon verifies more slowly than peers send (torrents of many small
    files), thousands of pieces are received and not yet verified; each pick walked
    them all (and the plugin picks for every peer at each piece verified): a download of
    20,000 pieces took ten times libtorrent's. A pick now looks only at the pieces with
    blocks to ask for."""
    small = min(_picks_behind_seconds(200) for _ in range(3))
    large = min(_picks_behind_seconds(20_000) for _ in range(3))
    assert large < 8 * small, (large, small)


def test_pieces_with_blocks_given_back_are_picked_again() -> None:
    """A piece whose blocks were all asked for leaves the pieces a pick looks at, and
    comes back when one of its blocks is given back (rejected, or its peer gone)."""
    from pieced.storage.metainfo import parse

    n = 4
    info = {b"name": b"x", b"piece length": 2 * BLOCK, b"length": 2 * BLOCK * n,
            b"pieces": bytes(20 * n)}
    pk = Picker(parse(bencodepy.encode({b"info": info})), [False] * n)
    pk.peer_has(range(n))
    first = pk.pick("A", None, 2, peer_count=n)
    assert len(first) == 2 and first[0][0] == first[1][0]
    pk.request_dropped("A", first[1])
    again = pk.pick("B", None, 1, peer_count=n)
    assert again == [first[1]]
    pk.block_received(first[0])
    pk.peer_gone("B")
    assert pk.pick("C", None, 1, peer_count=n) == [first[1]]


def test_the_request_queue_is_sized_as_libtorrent_sizes_it() -> None:
    """Slow start from START_QUEUE, one more a block received; it ends once a second
    brings no more than the one before; from then on the queue holds QUEUE_SECONDS of
    the peer's rate, within [MIN_QUEUE, MAX_QUEUE] and the peer's ``reqq``."""
    from pieced.peer.conn import MAX_QUEUE, MIN_QUEUE, QUEUE_SECONDS, START_QUEUE

    clock = Clock()
    pieces = [4 * BLOCK] * 1000
    c = PeerConnection((IH,), A_ID, pieces, v2=False, clock=clock)
    c.receive(wire.handshake(IH, B_ID, wire.make_reserved(extended=True, fast=True)))
    c.receive(wire.extended(0, bencodepy.encode({b"reqq": 2000})) + wire.unchoke())
    assert c.queue_size == START_QUEUE and c.slow_start
    blocks = iter([(p, b * BLOCK, BLOCK) for p in range(1000) for b in range(4)])

    def second(n: int) -> None:
        """``n`` blocks asked for and received, then a second's tick."""
        asked = [next(blocks) for _ in range(n)]
        c.send_requests(asked)
        c.receive(b"".join(wire.piece(p, b, bytes(size)) for p, b, size in asked))
        clock.now += 1.0
        c.second_tick()

    second(10)
    assert c.queue_size == START_QUEUE + 10 and c.slow_start
    second(20)  # faster: still starting
    assert c.queue_size == START_QUEUE + 30 and c.slow_start
    second(20)  # no faster: slow start is over, the queue follows the rate
    assert not c.slow_start
    assert c.queue_size == int(QUEUE_SECONDS * 17.5)  # (10, 20, 20 blocks a second, smoothed)
    second(1000)
    assert c.queue_size == MAX_QUEUE
    for _ in range(12):  # (the rate halves each second)
        second(0)
    assert c.queue_size == MIN_QUEUE  # a peer that stopped sending
    second(1000)
    c.receive(wire.extended(0, bencodepy.encode({b"reqq": 50})))
    assert c.queue_size == 50  # never more than it takes
