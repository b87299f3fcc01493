"""Pieces written the way real peers (libtorrent 2.1) send them.

A peer requests 16 KiB blocks from the start of a piece, the last one cut at the piece's
end. In a torrent with v1 hashes and pad files (libtorrent's hybrids, and its v1 torrents
made with ``canonical_files``) a block therefore runs on from a file's end into the pad
file after it, and the pad part is zeros; a block wholly inside a pad is never asked
for, though a peer answers one with zeros if asked. In a v2-only torrent a block stops
at its file's end. Every piece must pass its hashes however the blocks arrive:
in any order, resent, from several clients at once, inline or through the ring. A v2
leaf hashes only the file's bytes; a non-zero byte where a pad should be fails the piece.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import libtorrent as lt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pieced.protocol.client import Client
from pieced.storage.disk import DiskIO, PieceResult

from tests.conftest import ODD_FILES, Daemon, run_threads
from tests.realtools import lt_recheck, make_payload, make_torrent_lt
from tests.test_daemon import write_from_three_clients
from tests.test_disk import BLOCK, Source

Kind = Literal["v1", "v1-pads", "v1-pads-no-tail", "v2", "hybrid"]
KINDS: tuple[Kind, ...] = ("v1", "v1-pads", "v1-pads-no-tail", "v2", "hybrid")
PAD_KINDS: tuple[Kind, ...] = ("v1-pads", "v1-pads-no-tail", "hybrid")
REPO = Path(__file__).resolve().parent.parent


def make_torrent(content: Path, piece_length: int, kind: Kind) -> bytes:
    """A libtorrent-made torrent of ``content``.

    ``v1``, ``v2`` and ``hybrid`` are ``make_torrent_lt``'s. ``v1-pads`` is a v1-only
    torrent with pad files: libtorrent 2.1 makes one with ``v1_only | canonical_files``
    (files in canonical order, a pad after every file that does not end on a piece
    boundary, the last one included: the layout of its hybrids). ``v1-pads-no-tail``
    adds ``canonical_files_no_tail_padding``: the same, without a pad after the last
    file, so the last piece is cut short.
    """
    if kind in ("v1", "v2", "hybrid"):
        return make_torrent_lt(content, piece_length, kind)
    ct = lt.create_torrent
    flags = ct.v1_only | ct.canonical_files
    if kind == "v1-pads-no-tail":
        flags |= ct.canonical_files_no_tail_padding
    content = content.resolve()
    t = ct(lt.list_files(str(content)), piece_length, flags)
    t.set_creator("pieced tests/test_peer_blocks.py")
    lt.set_piece_hashes(t, str(content.parent))
    return bytes(lt.bencode(t.generate()))


def has_pads(src: Source) -> bool:
    return any(f.pad for f in src.meta.files)


def pieces_next_to_pads(src: Source) -> set[int]:
    """Pieces holding both a file's bytes and pad bytes."""
    out = set()
    for p in range(src.meta.num_pieces):
        segs = src.layout.map(p, 0, src.layout.piece_size(p))
        kinds = {src.meta.files[s.file_index].pad for s in segs}
        if kinds == {True, False}:
            out.add(p)
    return out


def send(dio: DiskIO, ih: bytes, piece: int, begin: int, data: bytes, direct: bool, cut: int) -> None:
    """One block through ``write_chunk``, or through ``write_block_direct`` as two slices of
    a ring it wraps around (its first ``cut`` bytes at the ring's end, the rest at its
    start; ``cut == len(data)``: one slice, a block that did not wrap). The ring is
    scribbled over afterwards, as a reused ring would be."""
    if not direct:
        dio.write_chunk(ih, piece, begin, data)
        return
    n = len(data)
    ring = bytearray(n + 4096)
    head = len(ring) - cut
    ring[head:] = data[:cut]
    ring[: n - cut] = data[cut:]
    view = memoryview(ring)
    dio.write_block_direct(ih, piece, begin, view[head:], view[: n - cut])
    ring[:] = b"\xa5" * len(ring)


PATHS = ("write_chunk", "ring-wrapped", "ring-one-slice")


def send_by(dio: DiskIO, ih: bytes, piece: int, begin: int, data: bytes, path: str) -> None:
    """``send`` by one of PATHS: inline, or through the ring wrapped (a few bytes before
    the wrap) or not."""
    n = len(data)
    cut = max(1, n - 10) if path == "ring-wrapped" and n > 1 else n
    send(dio, ih, piece, begin, data, path != "write_chunk", cut)


def results_by_piece(events: list[PieceResult]) -> dict[int, list[tuple[bool, bool | None, bool | None]]]:
    out: dict[int, list[tuple[bool, bool | None, bool | None]]] = {}
    for e in events:
        out.setdefault(e.piece, []).append((e.ok, e.v1, e.v2))
    return out


def assert_each_piece_verified_once(src: Source, events: list[PieceResult]) -> None:
    """Exactly one result per piece, and it is good; a report of the others otherwise."""
    got = results_by_piece(events)
    next_to_pads = pieces_next_to_pads(src)
    wrong = {
        p: (got.get(p, []), "next to a pad" if p in next_to_pads else "no pad")
        for p in range(src.meta.num_pieces)
        if [r[0] for r in got.get(p, [])] != [True]
    }
    assert not wrong, f"pieces without exactly one good result [(ok, v1, v2)]: {wrong}"
    assert set(got) == set(range(src.meta.num_pieces))


def assert_files_are_the_payload(src: Source, dl: Path) -> None:
    for f in src.meta.files:
        target = dl.joinpath(*f.path)
        if f.pad:
            assert not target.exists(), f"pad file {target} was created"
        else:
            want = src.save.joinpath(*f.path).read_bytes()
            assert target.read_bytes() == want, f"{target} differs from the payload"


# --------------------------------------------------------------------------- shapes

NAMES = ("a.bin", "empty", "one", "sub/exact", "sub/deeper/plus1", "z/tail.dat", "z/b", "m")
PIECE_LENGTHS = (16384, 32768, 65536, 131072, 262144)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[dict[str, int] | int, int]:
    """(make_payload spec, piece length): one file, or a folder of several in nested
    folders, of the sizes that sit on or next to block and piece boundaries, or anything
    up to two pieces and a block. (A folder holding one file is left out: libtorrent
    makes a single-file v2 torrent of it, with the file outside the folder.)"""
    piece = draw(st.sampled_from(PIECE_LENGTHS))
    awkward = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, piece - 1, piece, piece + 1, 2 * piece + BLOCK + 1]
    size = st.sampled_from(awkward) | st.integers(0, 2 * piece + BLOCK)
    if draw(st.booleans()):
        return draw(size.filter(bool)), piece
    names = draw(st.lists(st.sampled_from(NAMES), min_size=2, max_size=6, unique=True))
    spec = {name: draw(size) for name in names}
    if not any(spec.values()):
        spec[names[0]] = 1
    return spec, piece


# --------------------------------------------------------------------------- DiskIO


def download(
    dio: DiskIO, ih: bytes, src: Source, rng: random.Random, clients: int, pad_only: bool
) -> None:
    """Every peer block, shuffled, with a quarter of them resent (same bytes) and, with
    ``pad_only``, also the ranges wholly inside pads (zeros), split over ``clients``
    threads, each block written by ``write_chunk`` or ``write_block_direct`` at random
    (mostly wrapped into two slices, else in one)."""
    blocks = src.peer_blocks()
    plan = blocks + [rng.choice(blocks) for _ in range(len(blocks) // 4)]
    if pad_only:
        plan += src.pad_only_blocks()
    rng.shuffle(plan)
    work: list[list[tuple[int, int, int, bool, int]]] = [[] for _ in range(clients)]
    for p, b, n in plan:
        cut = rng.randint(1, n - 1) if n > 1 and rng.random() < 0.75 else n
        work[rng.randrange(clients)].append((p, b, n, rng.random() < 0.5, cut))

    def client(items: list[tuple[int, int, int, bool, int]]) -> Callable[[], None]:
        def run() -> None:
            for p, b, n, direct, cut in items:
                send(dio, ih, p, b, src.read(p, b, n), direct, cut)
        return run

    run_threads(*(client(items) for items in work))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=12, deadline=None)
@given(
    shape=payloads(),
    rng=st.randoms(use_true_random=False),
    clients=st.integers(2, 3),
    cache_bytes=st.sampled_from([0, 64 * 1024, 4 * 1024 * 1024]),
    window=st.sampled_from([0.0, 0.002]),
    pad_only=st.booleans(),
)
@example(shape=(dict(ODD_FILES), 65536), rng=random.Random(1), clients=3,
         cache_bytes=4 * 1024 * 1024, window=0.0, pad_only=True)
@example(shape=({"a.bin": 1, "sub/exact": BLOCK + 1, "z/b": 0}, 16384), rng=random.Random(2),
         clients=2, cache_bytes=0, window=0.002, pad_only=False)
def test_every_piece_verifies_from_peer_blocks(
    tmp_path_factory: Any,
    kind: Kind,
    shape: tuple[dict[str, int] | int, int],
    rng: random.Random,
    clients: int,
    cache_bytes: int,
    window: float,
    pad_only: bool,
) -> None:
    spec, piece_length = shape
    work = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        content = make_payload(work / "save", spec, seed=rng.randrange(1000))
        raw = make_torrent(content, piece_length, kind)
        src = Source(raw, work / "save")
        events: list[PieceResult] = []
        lock = threading.Lock()

        def on_piece(r: PieceResult) -> None:
            with lock:
                events.append(r)

        dio = DiskIO(cache_bytes=cache_bytes, sync_window=window, on_piece=on_piece)
        try:  # closed before its folder goes, even when an assertion fails
            ih = dio.register(raw, work / "dl")
            download(dio, ih, src, rng, clients, pad_only)
            dio.flush_all()
            assert_each_piece_verified_once(src, events)
            st_ = dio.status(ih)
            assert st_["verified_pieces"] == src.meta.num_pieces
            assert all(f["verified_bytes"] == f["length"] for f in st_["files"])
            assert dio.stats()["errors"] == {}
        finally:
            dio.close()
        assert_files_are_the_payload(src, work / "dl")
        assert all(lt_recheck(raw, work / "dl"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("piece_length", [BLOCK, 4 * BLOCK])
@pytest.mark.parametrize("window", [0.0, 0.005])
def test_block_resent_while_its_piece_is_committed_is_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_length: int, window: float
) -> None:
    """A peer's resent block (endgame) that lands after its piece verified but before the
    piece's data is synced and its bit set does not start the piece over: the piece gets
    one result, and no partial piece is left behind."""
    content = make_payload(tmp_path / "save", 2 * piece_length, seed=12)
    raw = make_torrent(content, piece_length, "v1")
    src = Source(raw, tmp_path / "save")
    events: list[PieceResult] = []
    lock = threading.Lock()

    def on_piece(r: PieceResult) -> None:
        with lock:
            events.append(r)

    dio = DiskIO(sync_window=window, on_piece=on_piece)
    ih = dio.register(raw, tmp_path / "dl")
    blocks = [blk for blk in src.peer_blocks() if blk[0] == 0]
    p, b, n = blocks[0]
    resend = threading.Thread(target=dio.write_chunk, args=(ih, p, b, src.read(p, b, n)))
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if not resend.is_alive() and resend.ident is None:
            resend.start()  # the resent block arrives while piece 0 is being committed
            resend.join(1.0)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    for p, b, n in blocks:
        dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    resend.join()
    monkeypatch.undo()
    assert resend.ident is not None
    assert [(e.piece, e.ok) for e in events] == [(0, True)]
    st_ = dio.status(ih)
    assert (st_["verified_pieces"], st_["partial_pieces"]) == (1, 0)
    assert dio.stats()["duplicate_blocks"] == 1
    dio.close()


def test_libtorrent_makes_v1_torrents_with_pads(tmp_path: Path) -> None:
    """The kinds the tests above rely on are what they claim to be."""
    content = make_payload(tmp_path / "save", {"a.bin": 40000, "b": 5}, seed=3)
    shapes = {}
    for kind in KINDS:
        src = Source(make_torrent(content, 65536, kind), tmp_path / "save")
        shapes[kind] = (src.meta.has_v1, src.meta.has_v2, has_pads(src), src.meta.total_size)
    assert shapes == {
        "v1": (True, False, False, 40005),
        "v1-pads": (True, False, True, 2 * 65536),
        "v1-pads-no-tail": (True, False, True, 65536 + 5),
        "v2": (False, True, True, 2 * 65536),  # alignment pads, implied by the format
        "hybrid": (True, True, True, 2 * 65536),
    }
    full = Source(make_torrent(content, 65536, "hybrid"), tmp_path / "save")
    clipped = Source(make_torrent(content, 65536, "v2"), tmp_path / "save")
    assert full.peer_blocks() == [(0, 0, BLOCK), (0, BLOCK, BLOCK), (0, 2 * BLOCK, BLOCK), (1, 0, BLOCK)]
    assert clipped.peer_blocks() == [(0, 0, BLOCK), (0, BLOCK, BLOCK), (0, 2 * BLOCK, 40000 - 2 * BLOCK), (1, 0, 5)]


# --------------------------------------------------------------------------- pads

PAD_PAYLOAD = {"a.bin": 40000, "b": 5, "sub/c": BLOCK + 1, "exact": 65536}


@pytest.mark.parametrize("kind", [*PAD_KINDS, "v2"])
@pytest.mark.parametrize("path", PATHS)
def test_blocks_wholly_inside_pads_are_accepted_and_harmless(tmp_path: Path, kind: Kind, path: str) -> None:
    """Zeros sent for ranges wholly inside pads, before, among and after the real blocks,
    change nothing: every piece verifies once, no pad file appears, nothing fails."""
    content = make_payload(tmp_path / "save", {**PAD_PAYLOAD, "one": 1}, seed=5)
    raw = make_torrent(content, 65536, kind)
    src = Source(raw, tmp_path / "save")
    pad_only = src.pad_only_blocks()
    assert any(n == BLOCK for _, _, n in pad_only) and any(n < BLOCK for _, _, n in pad_only)
    events: list[PieceResult] = []
    dio = DiskIO(on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    rng = random.Random(9)

    def send_pads(ranges: list[tuple[int, int, int]]) -> None:
        for p, b, n in ranges:
            send_by(dio, ih, p, b, bytes(n), path)

    send_pads(pad_only)
    for p, b, n in src.peer_blocks():
        send_by(dio, ih, p, b, src.read(p, b, n), path)
        send_pads(rng.sample(pad_only, 1))
    send_pads(pad_only)
    dio.flush_all()
    assert_each_piece_verified_once(src, events)
    assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    assert dio.stats()["errors"] == {}
    for p in range(src.meta.num_pieces):
        size = src.layout.piece_size(p)
        assert dio.read_chunk(ih, p, 0, size) == src.read(p, 0, size)
    dio.close()
    assert_files_are_the_payload(src, tmp_path / "dl")
    assert all(lt_recheck(raw, tmp_path / "dl"))


@pytest.mark.parametrize("kind", PAD_KINDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backwards", [False, True], ids=["in-order", "reversed"])
@pytest.mark.parametrize("cache_bytes", [0, 4 * 1024 * 1024], ids=["unbuffered", "buffered"])
def test_non_zero_pad_byte_fails_the_piece_until_resent_with_zeros(
    tmp_path: Path, kind: Kind, path: str, backwards: bool, cache_bytes: int
) -> None:
    """Each block that runs into a pad is sent once with its last (pad) byte non-zero:
    exactly those pieces fail, the others verify; the failed pieces, sent again with
    zeros in their pads (as a peer re-downloads a failed piece), verify."""
    content = make_payload(tmp_path / "save", PAD_PAYLOAD, seed=6)
    raw = make_torrent(content, 65536, kind)
    src = Source(raw, tmp_path / "save")
    events: list[PieceResult] = []
    dio = DiskIO(cache_bytes=cache_bytes, on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    blocks = src.peer_blocks()
    if backwards:
        blocks.reverse()

    def crosses_into_pad(p: int, b: int, n: int) -> bool:
        return src.meta.files[src.layout.map(p, b, n)[-1].file_index].pad

    tainted = {p for p, b, n in blocks if crosses_into_pad(p, b, n)}
    assert tainted and tainted != set(range(src.meta.num_pieces))
    for p, b, n in blocks:
        data = bytearray(src.read(p, b, n))
        if crosses_into_pad(p, b, n):
            assert data[-1] == 0
            data[-1] = 1
        send_by(dio, ih, p, b, bytes(data), path)
    dio.flush_all()
    got = results_by_piece(events)
    assert {p: [r[0] for r in rs] for p, rs in got.items()} == {
        p: [p not in tainted] for p in range(src.meta.num_pieces)
    }, f"a non-zero pad byte must fail its piece (and only it): {got}"
    have = dio.status(ih)["have"]
    assert [bool(have[p >> 3] & (0x80 >> (p & 7))) for p in range(src.meta.num_pieces)] == [
        p not in tainted for p in range(src.meta.num_pieces)
    ]
    events.clear()
    for p, b, n in blocks:
        if p in tainted:
            send_by(dio, ih, p, b, src.read(p, b, n), path)
    dio.flush_all()
    assert sorted((e.piece, e.ok) for e in events) == [(p, True) for p in sorted(tainted)]
    assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    for p in range(src.meta.num_pieces):
        size = src.layout.piece_size(p)
        assert dio.read_chunk(ih, p, 0, size) == src.read(p, 0, size)
    dio.close()
    assert_files_are_the_payload(src, tmp_path / "dl")
    assert all(lt_recheck(raw, tmp_path / "dl"))


@pytest.mark.parametrize("kind", PAD_KINDS)
@pytest.mark.parametrize("path", PATHS)
def test_a_block_sent_again_into_a_pad_counts_as_its_latest_copy(
    tmp_path: Path, kind: Kind, path: str
) -> None:
    """Within one attempt at a piece, a block that runs into a pad and is sent again
    replaces its earlier copy, pad bytes included: non-zero pad bytes then zeros verify,
    zeros then non-zero bytes fail, a later write that zeroes only some of the bad bytes
    still fails the piece, and writes of a zero over each bad byte mend it."""
    # each file ends in its piece's second, third or fourth block (the rest is pad)
    files = {"a.bin": 20_000, "b.bin": 40_000, "c.bin": 50_001, "d.bin": 17_000, "e": 3}
    content = make_payload(tmp_path / "save", files, seed=7)
    raw = make_torrent(content, 65536, kind)
    src = Source(raw, tmp_path / "save")
    blocks = src.peer_blocks()

    def pad_start(p: int, b: int, n: int) -> int | None:
        """Where the block's pad part starts (offset into the block), if it has one."""
        segs = src.layout.map(p, b, n)
        last = segs[-1]
        return last.buf_offset if src.meta.files[last.file_index].pad and last.buf_offset else None

    # (blocks of pieces with another block to come: the case's copies are sent first,
    # and the piece is completed only by the others)
    into_pad = [(p, b, n, k) for p, b, n in blocks if (k := pad_start(p, b, n)) is not None
                and n - k >= 2 and sum(q == p for q, _, _ in blocks) > 1]
    assert len(into_pad) >= 3, "the torrent has too few blocks running into pads"
    names = ("bad-then-good", "good-then-bad", "partly-zeroed", "each-bad-byte-zeroed")
    cases = dict(zip(names, into_pad, strict=False))
    pieces = {c[0]: name for name, c in cases.items()}
    assert len(pieces) == len(names), "each case needs a piece of its own"
    events: list[PieceResult] = []
    dio = DiskIO(on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    for case, (p, b, n, k) in cases.items():
        good = src.read(p, b, n)
        bad = bytearray(good)
        bad[k] = bad[-1] = 0x5A
        if case == "bad-then-good":
            send_by(dio, ih, p, b, bytes(bad), path)
            send_by(dio, ih, p, b, good, path)
        elif case == "good-then-bad":
            send_by(dio, ih, p, b, good, path)
            send_by(dio, ih, p, b, bytes(bad), path)
        elif case == "partly-zeroed":  # two bad bytes, then all but the last zeroed
            send_by(dio, ih, p, b, bytes(bad), path)
            send_by(dio, ih, p, b, good[:-1], path)
        else:  # two bad bytes far apart, then each sent again alone, as a zero
            send_by(dio, ih, p, b, bytes(bad), path)
            send_by(dio, ih, p, b + k, b"\0", path)
            send_by(dio, ih, p, b + n - 1, b"\0", path)
    assert events == [], "a case's piece was complete before its other blocks came"
    sent = {c[:2] for c in cases.values()}
    for p, b, n in blocks:
        if (p, b) not in sent:
            send_by(dio, ih, p, b, src.read(p, b, n), path)
    dio.flush_all()
    got = {p: [r[0] for r in rs] for p, rs in results_by_piece(events).items()}
    want = {p: [pieces.get(p) in (None, "bad-then-good", "each-bad-byte-zeroed")]
            for p in range(src.meta.num_pieces)}
    assert got == want, f"cases {cases}: {results_by_piece(events)}"
    dio.close()


# --------------------------------------------------------------------------- the daemon

DAEMON_FILES = {**ODD_FILES, "x/short": BLOCK - 1, "x/long": BLOCK + 1, "x/one-block": BLOCK}


@pytest.mark.parametrize("kind", ["hybrid", "v2"])
def test_daemon_verifies_peer_blocks_from_three_connections(
    daemon: Daemon, tmp_path: Path, kind: Kind
) -> None:
    """The same download through a real daemon: one connection writes inline, one through
    a ring (of an odd size, so blocks wrap), one both ways; blocks resent, pad-only
    ranges sent too; each piece_verified exactly once, no piece_failed."""
    content = make_payload(tmp_path / "save", DAEMON_FILES, seed=8)
    raw = make_torrent(content, 32768, kind)
    src = Source(raw, tmp_path / "save")
    assert pieces_next_to_pads(src)
    dl = daemon.root / "dl"
    events: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def on_event(name: str, fields: dict[str, Any]) -> None:
        with lock:
            events.append((name, fields))

    rng = random.Random(4)
    blocks = src.peer_blocks()
    plan = blocks + rng.sample(blocks, len(blocks) // 4) + src.pad_only_blocks()
    rng.shuffle(plan)
    n_pieces = src.meta.num_pieces
    with Client(daemon.socket, on_event=on_event) as c0:
        ih = c0.register(raw, dl)
        write_from_three_clients(daemon.socket, ih, src, plan, 5 * BLOCK + 4096)
        c0.flush_all()  # its reply follows every piece event before it
        with lock:
            verdicts = [(name, f["piece"], f.get("v1"), f.get("v2")) for name, f in events
                        if name in ("piece_verified", "piece_failed")]
        failed = [v for v in verdicts if v[0] == "piece_failed"]
        assert not failed, f"piece_failed (name, piece, v1, v2): {failed}; next to pads: {sorted(pieces_next_to_pads(src))}"
        assert Counter(v[1] for v in verdicts) == Counter(range(n_pieces))
        assert c0.status(ih)["verified_pieces"] == n_pieces
        for p in range(n_pieces):
            size = src.layout.piece_size(p)
            assert c0.read_chunk(ih, p, 0, size) == src.read(p, 0, size)
    assert daemon.stop() == 0
    assert_files_are_the_payload(src, dl)
    assert all(lt_recheck(raw, dl))


@pytest.mark.parametrize(
    ("kind", "inline"), [("hybrid", True), ("hybrid", False), ("v1-pads", True), ("v2", False)]
)
def test_example_plugin_sends_peer_blocks(daemon: Daemon, tmp_path: Path, kind: Kind, inline: bool) -> None:
    """examples/plugin.py, run against a daemon, gets every piece verified."""
    content = make_payload(tmp_path / "save", DAEMON_FILES, seed=10)
    raw = make_torrent(content, 32768, kind)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    src = Source(raw, tmp_path / "save")
    dl = daemon.root / "dl"
    cmd = [sys.executable, str(REPO / "examples" / "plugin.py"), str(torrent), str(tmp_path / "save"),
           str(dl), "--socket", str(daemon.socket), *(["--inline"] if inline else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    n = src.meta.num_pieces
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{n} piece_verified, 0 piece_failed" in proc.stdout, proc.stdout
    assert f"{n}/{n} pieces verified" in proc.stdout, proc.stdout
    assert daemon.stop() == 0
    assert_files_are_the_payload(src, dl)
    assert all(lt_recheck(raw, dl))
