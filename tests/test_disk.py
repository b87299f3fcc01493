"""The disk interface on real files: both write paths, verification from memory,
events, reads and the cache, errors that change nothing, and the memory budget."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st
from pieced.storage.disk import DiskIO, PieceResult
from pieced.storage.errors import (
    AlreadyRegistered,
    NoHashes,
    OutOfRange,
    PathEscape,
    PiecedError,
    StorageIOError,
    UnknownTorrent,
)
from pieced.storage.files import FileVanished
from pieced.storage.hashing import Aside
from pieced.storage.layout import Layout
from pieced.storage.metainfo import Metainfo, parse
from pieced.storage.paths import Beneath

from tests.conftest import STORES_NOTHING
from tests.pagecache import drop
from tests.realtools import lt_recheck, make_payload, make_torrent_lt

BLOCK = 16384


class Source:
    """The original payload, readable in piece space (pads read as zeros)."""

    def __init__(self, raw: bytes, save: Path) -> None:
        self.meta: Metainfo = parse(raw)
        self.layout = Layout(self.meta)
        self.save = save

    def read(self, piece: int, begin: int, length: int) -> bytes:
        out = bytearray()
        for s in self.layout.map(piece, begin, length):
            if not s.stored:
                out += bytes(s.length)
                continue
            with open(self.save.joinpath(*self.meta.files[s.file_index].path), "rb") as f:
                f.seek(s.file_offset)
                out += f.read(s.length)
        return bytes(out)

    def fingerprint(self, piece: int) -> bytes:
        """What the daemon's fingerprint of the piece must be: BLAKE3 of its stored
        bytes (pads left out), cut to 128 bits."""
        stored = [self.read(piece, s.buf_offset, s.length)
                  for s in self.layout.map(piece, 0, self.layout.piece_size(piece)) if s.stored]
        return blake3(b"".join(stored)).digest(16)

    def blocks(self) -> list[tuple[int, int, int]]:
        """Every (piece, begin, length) a peer would send: pad bytes are never sent."""
        out = []
        for p in range(self.meta.num_pieces):
            size = self.layout.piece_size(p)
            stored_end = max(
                (s.buf_offset + s.length for s in self.layout.map(p, 0, size) if s.stored), default=0
            )
            for b in range(0, stored_end, BLOCK):
                out.append((p, b, min(BLOCK, stored_end - b)))
        return out

    def peer_blocks(self, clip_at_file_end: bool | None = None) -> list[tuple[int, int, int]]:
        """Every (piece, begin, length) in the order libtorrent 2.1 requests them.

        Blocks are 16 KiB from the piece's start, the last one cut at the piece's end.
        By default (a torrent with v1 hashes) a block runs on from a file's end into the
        pad file after it, the pad part being zeros (``read`` gives them), and a block
        wholly inside a pad is never asked for. With ``clip_at_file_end`` (the default
        for a v2-only torrent) a block stops where its file's data stops: it never runs
        into the alignment pad that follows, and one starting inside a pad is skipped.
        """
        if clip_at_file_end is None:
            clip_at_file_end = not self.meta.has_v1
        out = []
        for p in range(self.meta.num_pieces):
            size = self.layout.piece_size(p)
            for b in range(0, size, BLOCK):
                n = min(BLOCK, size - b)
                segs = self.layout.map(p, b, n)
                pads = [s for s in segs if self.meta.files[s.file_index].pad]
                if len(pads) == len(segs):
                    continue  # wholly inside a pad
                if clip_at_file_end and pads:
                    n = pads[0].buf_offset
                    if n == 0:
                        continue
                out.append((p, b, n))
        return out

    def pad_only_blocks(self) -> list[tuple[int, int, int]]:
        """(piece, begin, length) of ranges wholly inside pads that a peer might still send
        (zeros): each 16 KiB block of the piece lying in a pad, and the pad part of each
        block that runs from a file's end into a pad."""
        out = []
        for p in range(self.meta.num_pieces):
            size = self.layout.piece_size(p)
            for b in range(0, size, BLOCK):
                for s in self.layout.map(p, b, min(BLOCK, size - b)):
                    if self.meta.files[s.file_index].pad:
                        out.append((p, b + s.buf_offset, s.length))
        return out


@pytest.fixture(params=["v1", "v2", "hybrid"])
def torrent(request: Any, odd_payload: tuple[Path, Path]) -> tuple[bytes, Source]:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, request.param)
    return raw, Source(raw, save)


def fill(
    dio: DiskIO, ih: bytes, src: Source, seed: int | None = 0, direct_every: int = 2
) -> None:
    """Write every block, shuffled unless ``seed`` is None, every n-th through the ring path."""
    blocks = src.blocks()
    if seed is not None:
        random.Random(seed).shuffle(blocks)
    for i, (p, b, n) in enumerate(blocks):
        data = src.read(p, b, n)
        if direct_every and i % direct_every == 0:
            ring = bytearray(data)  # a ring's wrap: the block in two slices of one buffer
            cut = len(data) // 3
            dio.write_block_direct(ih, p, b, memoryview(ring)[:cut], memoryview(ring)[cut:])
        else:
            dio.write_chunk(ih, p, b, data)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("window", [0.0, 0.005])
def test_download_verifies_every_piece(tmp_path: Path, torrent: tuple[bytes, Source], backend: str, window: float) -> None:
    raw, src = torrent
    events: list[PieceResult] = []
    dio = DiskIO(backend, cache_bytes=256 * 1024, sync_window=window, on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    st = dio.status(ih)
    n = src.meta.num_pieces
    assert st["verified_pieces"] == n and st["have"] == bytes(st["have"])
    assert sorted(e.piece for e in events) == list(range(n)) and all(e.ok for e in events)
    assert all(f["verified_bytes"] == f["length"] for f in st["files"])
    for p in range(n):
        size = src.layout.piece_size(p)
        assert dio.read_chunk(ih, p, 0, size) == src.read(p, 0, size)
    stats = dio.stats()
    assert stats["pieces_verified"] == n and stats["pieces_failed"] == 0
    assert stats["cache_bytes"] + stats["write_buffer_bytes"] <= 256 * 1024
    dio.close()
    # the files are exactly the payload, pad files were never created, libtorrent agrees
    for f in src.meta.files:
        target = tmp_path / "dl" / Path(*f.path)
        if f.pad:
            assert not target.exists()
        else:
            assert target.read_bytes() == (src.save / Path(*f.path)).read_bytes()
    assert all(lt_recheck(raw, tmp_path / "dl"))


def test_corrupt_block_fails_then_recovers(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    raw, src = torrent
    events: list[PieceResult] = []
    dio = DiskIO(backend, on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    blocks = [b for b in src.blocks() if b[0] == 1]
    for i, (p, b, n) in enumerate(blocks):
        data = bytearray(src.read(p, b, n))
        if i == 1:
            data[7] ^= 1
        dio.write_chunk(ih, p, b, bytes(data))
    assert [(e.piece, e.ok) for e in events] == [(1, False)]
    assert events[0].v1 in (False, None) and events[0].v2 in (False, None)
    assert not dio.status(ih)["have"][0] & 0x40
    dio.clear_piece(ih, 1)
    for p, b, n in blocks:
        dio.write_chunk(ih, p, b, src.read(p, b, n))
    assert [(e.piece, e.ok) for e in events] == [(1, False), (1, True)]
    assert dio.status(ih)["have"][0] & 0x40
    dio.close()


@pytest.mark.backends(exclude={"disabled": "blocks out of order are read back for SHA-1, "
                                            "and it reads zeros"})
def test_out_of_order_and_duplicate_blocks(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    raw, src = torrent
    events: list[PieceResult] = []
    dio = DiskIO(backend, on_piece=events.append, cache_bytes=0)  # no buffer: everything written through
    ih = dio.register(raw, tmp_path / "dl")
    blocks = [b for b in src.blocks() if b[0] == 0]
    for p, b, n in reversed(blocks):
        dio.write_chunk(ih, p, b, src.read(p, b, n))
        if b == blocks[-1][1] and len(blocks) > 1:
            dio.write_chunk(ih, p, b, src.read(p, b, n))  # a duplicate before completion
    assert [(e.piece, e.ok) for e in events] == [(0, True)]
    p, b, n = blocks[0]
    dio.write_chunk(ih, p, b, src.read(p, b, n))  # endgame duplicate after completion
    assert len(events) == 1 and dio.stats()["duplicate_blocks"] >= 1
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_block_written_through_over_part_of_a_buffered_one_wins(
    tmp_path: Path, backend: str
) -> None:
    """A buffered write of 32 KiB with a bad byte, then the good first 16 KiB of it
    written through the ring, then the rest of the piece: the piece verifies (its hash
    sees the newer bytes) and the disk holds the newer bytes. Before, the buffered
    block, covered only in part, was written out after the verification, over them."""
    content = make_payload(tmp_path / "src", 2 * 65536, seed=21)
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend)
    ih = dio.register(raw, tmp_path / "dl")
    good = src.read(0, 0, 65536)
    bad = bytearray(good[:32768])
    bad[5] ^= 0xFF
    dio.write_chunk(ih, 0, 0, bytes(bad))
    dio.write_block_direct(ih, 0, 0, good[:16384])
    result = dio.write_block_direct(ih, 0, 32768, good[32768:])
    dio.flush_all()
    assert result is not None and result.ok
    dio.torrent(ih).storage.close_handles()
    assert (tmp_path / "dl" / content.name).read_bytes()[:65536] == good
    dio.close()


def test_write_block_direct_is_one_pwritev_of_the_callers_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = make_payload(tmp_path / "src", 5 * BLOCK, seed=1)
    raw = make_torrent_lt(content, 4 * BLOCK, "v1")
    dio = DiskIO()
    ih = dio.register(raw, tmp_path / "dl")
    ring = bytearray(os.urandom(3 * BLOCK))
    s0, s1 = memoryview(ring)[2 * BLOCK + 100 :], memoryview(ring)[: BLOCK - 100]
    calls: list[list[Any]] = []
    real = os.pwritev

    def spy(fd: int, bufs: list[Any], offset: int) -> int:
        calls.append(list(bufs))
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "pwritev", spy)
    dio.write_block_direct(ih, 0, BLOCK, s0, s1)
    assert len(calls) == 1
    assert [b.obj for b in calls[0]] == [ring, ring]  # the ring itself: no copy was made
    assert [b.nbytes for b in calls[0]] == [s0.nbytes, s1.nbytes]
    monkeypatch.undo()
    sent = bytes(s0) + bytes(s1)
    ring[:] = bytes(len(ring))  # the ring is reused: what landed on disk must not change
    assert dio.read_chunk(ih, 0, BLOCK, len(sent)) == sent
    assert (tmp_path / "dl" / "payload.bin").read_bytes()[BLOCK : BLOCK + len(sent)] == sent
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_ring_reused_after_write_block_direct_changes_nothing_stored(
    tmp_path: Path, backend: str
) -> None:
    """A block given as two slices of a ring: once the call returns the ring is the
    caller's again, and what it then writes there is neither read back nor written
    out (backends that gather blocks into their piece copy them during the call)."""
    content = make_payload(tmp_path / "src", 5 * BLOCK, seed=1)
    raw = make_torrent_lt(content, 4 * BLOCK, "v1")
    dio = DiskIO(backend)
    ih = dio.register(raw, tmp_path / "dl")
    ring = bytearray(os.urandom(3 * BLOCK))
    s0, s1 = memoryview(ring)[2 * BLOCK + 100 :], memoryview(ring)[: BLOCK - 100]
    sent = bytes(s0) + bytes(s1)
    dio.write_block_direct(ih, 0, BLOCK, s0, s1)
    ring[:] = bytes(len(ring))
    assert dio.read_chunk(ih, 0, BLOCK, len(sent)) == sent
    dio.flush_piece(ih, 0)
    assert dio.read_chunk(ih, 0, BLOCK, len(sent), volatile=True) == sent
    assert (tmp_path / "dl" / "payload.bin").read_bytes()[BLOCK : BLOCK + len(sent)] == sent
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_reads_cache_and_volatile(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    raw, src = torrent
    dio = DiskIO(backend, cache_bytes=0)
    ih = dio.register(raw, src.save)  # seed from the payload in place
    assert dio.recheck(ih).ok
    dio.close()
    dio = DiskIO(backend, cache_bytes=4 * 65536)
    ih = dio.register(raw, src.save)
    assert dio.recheck(ih).ok  # only pieces known verified are offered for SuggestPiece
    assert dio.cached_pieces(ih) == []
    assert dio.read_chunk(ih, 2, 100, 5000, volatile=True) == src.read(2, 100, 5000)
    assert dio.cached_pieces(ih) == []
    assert dio.read_chunk(ih, 2, 100, 5000) == src.read(2, 100, 5000)
    assert dio.cached_pieces(ih) == [2]
    assert dio.read_chunk(ih, 2, 0, BLOCK) == src.read(2, 0, BLOCK)
    s = dio.stats()
    assert (s["cache_hits"], s["cache_misses"]) == (1, 2)
    for p in range(src.meta.num_pieces):
        dio.read_chunk(ih, p, 0, 1)
    assert len(dio.cached_pieces(ih)) <= 4
    assert dio.stats()["cache_bytes"] <= 4 * 65536
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_hash_operations(tmp_path: Path, torrent: tuple[bytes, Source], backend: str) -> None:
    raw, src = torrent
    meta = src.meta
    dio = DiskIO(backend)
    ih = dio.register(raw, src.save)
    if meta.has_v1:
        assert dio.hash_piece(ih, 1)
        assert not dio.hash_piece(ih, 1, expected=bytes(20))
        assert dio.hash_piece(ih, 1, expected=hashlib.sha1(src.read(1, 0, meta.piece_size(1))).digest())
    else:
        with pytest.raises(NoHashes):
            dio.hash_piece(ih, 1)
    if meta.has_v2:
        assert all(dio.hash_piece_v2(ih, p) for p in range(meta.num_pieces))
        assert not dio.hash_piece_v2(ih, 1, expected=bytes(32))
    else:
        with pytest.raises(NoHashes):
            dio.hash_piece_v2(ih, 0)
    assert dio.hash_block(ih, 1, BLOCK, BLOCK) == hashlib.sha256(src.read(1, BLOCK, BLOCK)).digest()
    with pytest.raises(OutOfRange):
        dio.hash_block(ih, 1, 100, BLOCK)
    dio.close()


def test_bad_requests_change_nothing(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    raw, src = torrent
    dio = DiskIO(backend, roots=[tmp_path])
    ih = dio.register(raw, tmp_path / "dl")
    said = re.escape(f"with save path {tmp_path / 'dl'}") + "$"  # (the user may look there)
    with pytest.raises(AlreadyRegistered, match=said):
        dio.register(raw, tmp_path / "dl2")
    assert not (tmp_path / "dl2").exists()  # refused before the save path was made
    with pytest.raises(PathEscape):  # a bad save path is refused as such, registered or not
        dio.register(raw, "/etc")
    with pytest.raises(PathEscape):
        dio.register(raw, tmp_path / ".." / "elsewhere")
    def tree() -> list[tuple[str, int]]:
        return sorted((str(p), p.stat().st_size) for p in (tmp_path / "dl").rglob("*"))

    before = tree()
    with pytest.raises(UnknownTorrent):
        dio.write_chunk(bytes(20), 0, 0, b"x")
    n = src.meta.num_pieces
    for args in [(n, 0, b"x"), (-1, 0, b"x"), (0, src.layout.piece_size(0), b"x"), (0, -5, b"x"),
                 (n - 1, src.layout.piece_size(n - 1) - 1, b"xy")]:
        with pytest.raises(OutOfRange):
            dio.write_chunk(ih, *args)  # type: ignore[arg-type]
    with pytest.raises(OutOfRange):
        dio.read_chunk(ih, 0, 0, src.layout.piece_size(0) + 1)
    assert dio.status(ih)["verified_pieces"] == 0 and dio.cached_pieces(ih) == []
    assert tree() == before  # nothing was written
    dio.close()


@pytest.mark.backends(exclude={"disabled": "opens no payload file: no I/O to fail"})
def test_io_error_reported_with_errno(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    raw, src = torrent
    dio = DiskIO(backend)
    ih = dio.register(raw, tmp_path / "dl")
    first = src.meta.files[0]
    (tmp_path / "dl" / first.path[0]).mkdir(parents=True, exist_ok=True)
    (tmp_path / "dl" / Path(*first.path)).mkdir(parents=True)  # a folder where the file goes
    p, b, n = src.blocks()[0]
    with pytest.raises(StorageIOError) as exc:
        dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
    assert exc.value.errno == errno.EISDIR
    assert dio.stats()["errors"] == {"EISDIR": 1}
    assert dio.status(ih)["errors"][0]["errno"] == errno.EISDIR
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_move_rename_unregister(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    raw, src = torrent
    dio = DiskIO(backend)
    ih = dio.register(raw, tmp_path / "a")
    fill(dio, ih, src, direct_every=0)
    dio.move_storage(ih, tmp_path / "b")
    data_files = [i for i, f in enumerate(src.meta.files) if f.stored and f.length]
    first = src.meta.files[data_files[0]]
    assert (tmp_path / "b" / Path(*first.path)).exists()
    assert not (tmp_path / "a" / Path(*first.path)).exists()
    dio.rename_file(ih, data_files[0], "renamed/x.bin")
    assert (tmp_path / "b" / "renamed" / "x.bin").read_bytes() == (src.save / Path(*first.path)).read_bytes()
    with pytest.raises(PathEscape):
        dio.rename_file(ih, data_files[0], "../../escape")
    assert dio.recheck(ih).ok
    dio.unregister(ih, delete_files=True)
    assert not (tmp_path / "b" / "renamed" / "x.bin").exists()
    with pytest.raises(UnknownTorrent):
        dio.status(ih)
    dio.close()


@pytest.mark.parametrize("window", [0.0, 0.005])
@pytest.mark.parametrize("state", [False, True], ids=["no-state", "state"])
def test_on_piece_may_call_back_into_the_engine(
    tmp_path: Path, torrent: tuple[bytes, Source], window: float, state: bool
) -> None:
    """A callback told of a verified piece clears it at once (a client that no longer
    trusts it): the call returns, and the clear is told after the verdict."""
    raw, src = torrent
    events: list[tuple[int, bool]] = []
    box: list[DiskIO] = []

    def on_piece(r: PieceResult) -> None:
        events.append((r.piece, r.ok))
        if r.ok:
            box[0].clear_piece(r.info_hash, r.piece)

    dio = DiskIO(sync_window=window, on_piece=on_piece,
                 state_dir=tmp_path / "state" if state else None)
    box.append(dio)
    ih = dio.register(raw, tmp_path / "dl")
    done = threading.Event()

    def work() -> None:
        for p, b, n in src.blocks():
            if p == 0:
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        done.set()

    threading.Thread(target=work, daemon=True).start()
    assert done.wait(30), f"the engine hung in a callback that called it: told {events}"
    assert events == [(0, True), (0, False)]
    assert dio.status(ih)["verified_pieces"] == 0
    dio.close()


@pytest.mark.parametrize("window", [0.0, 0.5])
def test_an_observer_that_raises_loses_no_result_and_fails_no_write(
    tmp_path: Path, torrent: tuple[bytes, Source], window: float, caplog: Any
) -> None:
    """``on_piece`` raising for one piece (a bug of the observer's): the write that told
    it returns, the piece stays verified, and every other result of the same group
    commit is still told."""
    raw, src = torrent
    told: list[int] = []

    def on_piece(r: PieceResult) -> None:
        told.append(r.piece)
        if len(told) == 1:
            raise RuntimeError("an observer's bug")

    dio = DiskIO(sync_window=window, on_piece=on_piece)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src, seed=None)
    dio.flush_all()
    n = src.meta.num_pieces
    assert sorted(told) == list(range(n))
    assert dio.status(ih)["verified_pieces"] == n
    assert "an observer's bug" in caplog.text
    dio.close()


@pytest.mark.parametrize("window", [0.0, 0.005])
def test_flush_all_returns_after_the_results_of_what_it_waited_for(
    tmp_path: Path, torrent: tuple[bytes, Source], window: float
) -> None:
    """``flush_all`` is a barrier for piece results: a piece committed before it returns
    is told before it returns, even when the thread handing the results out is another
    one (here: a writer whose hash failure is still being told when the commit ends)."""
    raw, src = torrent
    told: list[str] = []
    failing = threading.Event()
    go = threading.Event()

    def on_piece(r: PieceResult) -> None:
        if not r.ok:
            failing.set()
            go.wait(30)  # the writer's thread is busy telling for a while
        told.append(f"{r.piece} {'verified' if r.ok else 'failed'}")

    dio = DiskIO(sync_window=window, on_piece=on_piece)
    ih = dio.register(raw, tmp_path / "dl")
    blocks = src.blocks()
    assert {p for p, _, _ in blocks} >= {0, 1}

    def bad_writer() -> None:
        for p, b, n in blocks:
            if p == 0:
                dio.write_chunk(ih, p, b, bytes(n) if b == 0 else src.read(p, b, n))

    threading.Thread(target=bad_writer, daemon=True).start()
    assert failing.wait(30)
    for p, b, n in blocks:
        if p == 1:
            dio.write_chunk(ih, p, b, src.read(p, b, n))
    flushed = threading.Event()

    def flush() -> None:
        dio.flush_all()
        told.append("flush_all returned")
        flushed.set()

    threading.Thread(target=flush, daemon=True).start()
    flushed.wait(0.5)  # returns at once only if it does not wait for the telling
    go.set()
    assert flushed.wait(30)
    assert told.index("1 verified") < told.index("flush_all returned"), told
    dio.close()


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_runs_hashed_by_two_threads_get_the_verdicts_of_one(tmp_path: Path, kind: str) -> None:
    """Runs of blocks of 128 KiB and more are hashed by two threads at once (one of them
    the writer's), the other thread's share taken in once the write is done. The same
    runs, in the same random orders, with rewrites, bad bytes (pads included) and pieces
    started again, give the same verdicts and fingerprints as one thread hashing it all."""
    content = make_payload(tmp_path / "src", {"a.bin": 700_001, "b/c.bin": 1_300_000,
                                              "one": 1, "d.bin": 262_144}, seed=11)
    raw = make_torrent_lt(content, 512 * 1024, kind)  # type: ignore[arg-type]
    src = Source(raw, tmp_path / "src")
    rng = random.Random(5)
    # (piece, begin, data, where a ring's wrap cuts it, a clear after) of each run
    ops: list[tuple[int, int, bytes, int, bool]] = []
    for _ in range(8):  # each piece downloaded eight times over, cleared in between
        for p in range(src.meta.num_pieces):
            ops.append((p, 0, b"", 0, True))
            blocks = [(b, n) for q, b, n in src.peer_blocks() if q == p]
            runs: list[tuple[int, int]] = []
            for b, n in blocks:  # adjacent blocks merged into runs of 1 to 32 blocks
                if runs and runs[-1][0] + runs[-1][1] == b and rng.random() < 0.9:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                else:
                    runs.append((b, n))
            if rng.random() < 0.5:
                rng.shuffle(runs)
            for b, n in runs + rng.sample(runs, min(2, len(runs))):  # and some again
                data = bytearray(src.read(p, b, n))
                if rng.random() < 0.15:
                    data[rng.randrange(n)] ^= 0x5A  # a bad byte (in a pad, at times)
                ops.append((p, b, bytes(data), rng.randrange(n + 1), rng.random() < 0.02))

    class Counting(Aside):
        started = 0

        def start(self, fn: Any) -> Any:
            Counting.started += 1
            return super().start(fn)

    told: dict[int, list[tuple[int, bool, bytes | None]]] = {1: [], 2: []}
    fingerprints = {}
    for workers in (1, 2):
        dio = DiskIO(hash_workers=workers, on_piece=lambda r, w=workers: told[w].append(
            (r.piece, r.ok, r.v1 if r.v1 is not None else r.v2)))
        if workers == 2:
            dio._aside = Counting(1)
        ih = dio.register(raw, tmp_path / f"dl{workers}")
        for p, b, data, cut, clear in ops:
            view = memoryview(data)
            if data:
                dio.write_blocks_direct(ih, p, b, [view[:cut], view[cut:]], -(-len(data) // BLOCK))
            if clear:
                dio.clear_piece(ih, p)
        dio.flush_all()
        t = dio.torrent(ih)
        fingerprints[workers] = [t.fingerprint(p) for p in range(src.meta.num_pieces)]
        dio.close()
    assert Counting.started > 40  # (the two-thread path was taken)
    assert told[1] == told[2]
    assert {ok for _, ok, _ in told[1]} == {True, False}
    assert fingerprints[1] == fingerprints[2]


def test_disabled_backend(tmp_path: Path, torrent: tuple[bytes, Source]) -> None:
    raw, src = torrent
    events: list[PieceResult] = []
    dio = DiskIO("disabled", on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    # In order: with nothing stored, an out-of-order direct block could not be re-read.
    fill(dio, ih, src, seed=None)
    assert len(events) == src.meta.num_pieces and all(e.ok for e in events)
    assert not any(p.is_file() for p in (tmp_path / "dl").rglob("*"))
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_concurrent_writers(tmp_path: Path, torrent: tuple[bytes, Source], backend: str) -> None:
    raw, src = torrent
    events: list[PieceResult] = []
    lock = threading.Lock()

    def on_piece(r: PieceResult) -> None:
        with lock:
            events.append(r)

    dio = DiskIO(backend, cache_bytes=128 * 1024, on_piece=on_piece, sync_window=0.002)
    ih = dio.register(raw, tmp_path / "dl")
    blocks = src.blocks() * 2  # every block twice, from different threads
    random.Random(5).shuffle(blocks)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i, (p, b, n) in enumerate(blocks):
                if i % 4 == k:
                    dio.write_chunk(ih, p, b, src.read(p, b, n))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dio.flush_all()
    assert not errors
    assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    assert all(e.ok for e in events)
    dio.close()
    assert all(lt_recheck(raw, tmp_path / "dl"))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3), st.booleans()), max_size=60),
       st.integers(0, 200_000))
def test_budget_is_never_exceeded(
    tmp_path_factory: Any, backend: str, ops: list[tuple[int, int, bool]], budget: int
) -> None:
    cache = _shared_source(tmp_path_factory)
    raw, src = cache
    dio = DiskIO(backend, cache_bytes=budget)
    ih = dio.register(raw, tmp_path_factory.mktemp("dl"))
    blocks = src.blocks()
    for idx, kind, volatile in ops:
        p, b, n = blocks[idx % len(blocks)]
        if kind == 0:
            dio.write_chunk(ih, p, b, src.read(p, b, n))
        elif kind == 1:
            try:
                dio.read_chunk(ih, p, b, n, volatile=volatile)
            except StorageIOError as exc:  # a file nothing was written to yet
                assert exc.errno == errno.ENOENT
        elif kind == 2:
            dio.flush_piece(ih, p)
        else:
            dio.clear_piece(ih, p)
        s = dio.stats()
        assert s["cache_bytes"] + s["write_buffer_bytes"] <= budget
    dio.close()


_SHARED: dict[str, tuple[bytes, Source]] = {}


def _shared_source(factory: Any) -> tuple[bytes, Source]:
    if "src" not in _SHARED:
        save = factory.mktemp("budget")
        content = make_payload(save, {"a": 150_000, "b": 70_000}, seed=2)
        raw = make_torrent_lt(content, 32768, "hybrid")
        _SHARED["src"] = (raw, Source(raw, save))
    return _SHARED["src"]


@pytest.mark.backends(exclude={"disabled": "makes and opens no payload path: no symlink "
                                            "is ever followed, nor refused"})
def test_symlinks_never_lead_out_of_the_save_path(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    outside = tmp_path / "outside"
    outside.mkdir()
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "payload").symlink_to(outside)  # the torrent's folder, planted as a symlink
    dio = DiskIO(backend)
    # Registered (as a torrent without an empty file always was; libtorrent adds it
    # too), the empty file, which would be made through it, not made and said so; and
    # nothing is written through it.
    ih = dio.register(raw, dl)
    errors = dio.status(ih)["errors"]
    assert len(errors) == 1 and "symlink" in errors[0]["message"], errors
    p, b, n = src.blocks()[0]
    with pytest.raises(PathEscape, match="symlink"):
        dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
    assert list(outside.iterdir()) == []
    dio.close()
    (dl / "payload").unlink()
    (dl / "payload").mkdir()
    (dl / "payload" / "a.bin").symlink_to(outside / "victim")  # a file planted as a symlink
    dio = DiskIO(backend)
    ih = dio.register(raw, dl)
    p, b, n = src.blocks()[0]
    with pytest.raises(PathEscape, match="symlink"):
        dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
    assert list(outside.iterdir()) == []
    # The refusal is the torrent's error too, as a disk error is: on status and counted.
    errors = dio.status(ih)["errors"]
    assert [e["piece"] for e in errors] == [p] and "symlink" in errors[0]["message"]
    assert dio.stats()["errors"] == {"path_escape": 1}
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_piece_of_more_blocks_than_iov_max(tmp_path: Path, backend: str) -> None:
    """A 32 MiB piece written out from 2048 buffered blocks: more than IOV_MAX (1024)
    views, so the vectored write must be finished in several calls."""
    content = make_payload(tmp_path / "src", 32 * 1024 * 1024 + 5, seed=4)
    raw = make_torrent_lt(content, 32 * 1024 * 1024, "v1")
    src = Source(raw, tmp_path / "src")
    events: list[PieceResult] = []
    dio = DiskIO(backend, cache_bytes=64 * 1024 * 1024, on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src, seed=None, direct_every=0)
    dio.close()
    assert [e.ok for e in events] == [True, True]
    assert (tmp_path / "dl" / "payload.bin").read_bytes() == content.read_bytes()


@pytest.mark.backends(exclude={"disabled": "has nothing to sync"})
def test_syncs_counts_real_fdatasyncs(
    tmp_path: Path, torrent: tuple[bytes, Source], monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """The ``syncs`` counter is the number of fdatasync calls made: a flush with nothing
    dirty makes none and counts none."""
    raw, src = torrent
    calls = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    dio = DiskIO(backend)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    assert calls and dio.stats()["syncs"] == len(calls)
    before = len(calls)
    dio.flush_all()
    assert len(calls) == before and dio.stats()["syncs"] == before
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_seeding_reads_reuse_evicted_buffers_never_one_still_sent(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    """Pieces read for seeding through a cache of four: the buffers of evicted pieces are
    used again for the next ones read (the reads stop costing fresh memory), every read
    returns the piece's bytes, and a view handed out before its piece was evicted (a
    reply still being sent; its piece not read again, so any reuse of its buffer would
    show) keeps its bytes however many pieces are read after it."""
    raw, src = torrent
    dio = DiskIO(backend, cache_bytes=4 * 65536)
    dio.pool.recycler.max_bytes = 3 * 65536  # the default of so small a budget is 0
    try:
        ih = dio.register(raw, src.save)
        assert dio.recheck(ih).ok
        n = src.meta.num_pieces
        full = [p for p in range(n) if src.layout.piece_size(p) == 65536]
        held = {p: dio.read_chunk_view(ih, p, 1000, 3000) for p in full[:1]}
        for _ in range(3):  # the held pieces are not read again: a reuse would show
            for p in (p for p in range(n) if p not in held):
                size = src.layout.piece_size(p)
                got = dio.read_chunk_view(ih, p, 0, size)
                assert bytes(got) == src.read(p, 0, size), p
                del got
        assert dio.pool.recycler.reused > 0
        for p, view in held.items():
            assert bytes(view) == src.read(p, 1000, 3000), p
    finally:
        dio.close()


def test_recycler_gives_a_buffer_again_only_when_no_one_holds_it() -> None:
    from pieced.storage.bufferpool import PieceBuffer, PieceData, Recycler

    r = Recycler(3 * 1000)
    a = r.take(1000)
    assert isinstance(a, PieceBuffer)
    a[:] = b"a" * 1000
    sending = memoryview(a)[10:20]
    r.give(PieceData.whole(a))
    del a
    r.take(1000)
    assert r.reused == 0  # a view of it is still being sent: a new one is made
    assert bytes(sending) == b"a" * 10
    del sending
    b = r.take(1000)
    assert r.reused == 1 and bytes(b[:3]) == b"aaa"  # the same buffer, as it was
    assert len(r.take(999)) == 999 and r.reused == 1  # only a buffer of the size asked
    r.give(PieceData.whole(bytearray(1000)))  # not one of ours: not kept
    r.give(PieceData([0, 500], [PieceBuffer(500), PieceBuffer(500)]))  # nor blocks
    for _ in range(5):
        r.give(PieceData.whole(PieceBuffer(1000)))
    assert r._bytes == 3000 and len(r._free) == 3  # bounded: the oldest went


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_no_backend_keeps_hold_of_the_buffers_it_is_given(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    """Every block written through a client's ring (a shared map here) and every piece
    read: once the calls return, the backend holds no export of their buffers, so a
    client's ring can be unmapped when it leaves and read buffers go back to memory.
    (A version of the liburing package kept every buffer given to its Iovec: the uring
    backend pinned all of them.)"""
    import mmap

    raw, src = torrent
    dio = DiskIO(backend, cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        ring = mmap.mmap(-1, 1024 * 1024)
        view = memoryview(ring)
        at = 0
        for p, b, n in src.blocks():
            if at + n > len(ring):
                at = 0
            view[at : at + n] = src.read(p, b, n)
            cut = at + n // 3
            dio.write_block_direct(ih, p, b, view[at:cut], view[cut : at + n])
            at += n
        dio.flush_all()
        assert all(dio.status(ih, files=False)["have"]) or dio.recheck(ih).ok
        view.release()
        ring.close()  # BufferError if an export of it were still held
        out = bytearray(src.layout.piece_size(0))
        dio._read_range(dio._torrents[ih], 0, 0, len(out), out)
        assert bytes(out) == src.read(0, 0, len(out))
        out.extend(b"x")  # BufferError if an export of it were still held
    finally:
        dio.close()


@pytest.mark.backends(exclude={
    "disabled": STORES_NOTHING,
    "direct": "keeps nothing in the page cache: a piece written straight through is not cached",
    "uring": "gathers a piece's blocks before writing them: it caches the blocks themselves",
})
def test_a_piece_written_straight_through_comes_whole_into_the_cache_when_read(
    tmp_path: Path, torrent: tuple[bytes, Source], backend: str
) -> None:
    """Pieces written with write_block_direct are cached as their files' pages; the
    first (not volatile) read of one brings the whole piece into the cache, into a
    recycled buffer, and the piece's other blocks are then read from there."""
    from pieced.storage.bufferpool import PieceBuffer, PieceData, ResidentPiece

    raw, src = torrent
    dio = DiskIO(backend)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill(dio, ih, src, seed=None, direct_every=1)
        dio.flush_all()
        t = dio._torrents[ih]
        n = src.meta.num_pieces
        # (a piece mostly of pads is not cached: see the test after this one)
        data = [x for x in range(n) if 4 * sum(s.length for s in src.layout.map(
            x, 0, src.layout.piece_size(x)) if s.stored) >= src.layout.piece_size(x)]
        p = next(x for x in data if x >= n // 2)
        size = src.layout.piece_size(p)
        assert isinstance(dio.pool.get((t.id, p), volatile=True), ResidentPiece)
        assert bytes(dio.read_chunk_view(ih, p, 0, 100, volatile=True)) == src.read(p, 0, 100)
        assert isinstance(dio.pool.get((t.id, p), volatile=True), ResidentPiece)
        assert bytes(dio.read_chunk_view(ih, p, 10, 200)) == src.read(p, 10, 200)
        entry = dio.pool.get((t.id, p), volatile=True)
        assert isinstance(entry, PieceData) and type(entry.read(0, size)) is memoryview
        assert isinstance(entry.read(0, size).obj, PieceBuffer)
        assert bytes(entry.read(0, size)) == src.read(p, 0, size)
        # A piece whose pages the kernel has let go meanwhile: read the usual way, once.
        q = data[-1]
        qsize = src.layout.piece_size(q)
        assert isinstance(dio.pool.get((t.id, q), volatile=True), ResidentPiece)
        drop(tmp_path / "dl")
        before = dio.stats()
        assert bytes(dio.read_chunk_view(ih, q, 0, qsize)) == src.read(q, 0, qsize)
        after = dio.stats()
        assert (after["cache_hits"] + after["cache_misses"]
                - before["cache_hits"] - before["cache_misses"]) == 1
        entry = dio.pool.get((t.id, q), volatile=True)
        assert isinstance(entry, PieceData) and bytes(entry.read(0, qsize)) == src.read(q, 0, qsize)
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_piece_mostly_of_pads_is_read_as_asked_not_whole(tmp_path: Path, backend: str) -> None:
    """A small file's piece in a v2 torrent of big pieces is its few bytes and a pad to
    the piece's end: read whole into the cache (zeros and all, its fingerprint taken
    over them), every read of it cost the whole piece, and a torrent of many small files
    was seeded many times slower than by libtorrent. Such a piece is read as asked, and
    takes no room in the cache; a piece of data is still cached whole."""
    content = tmp_path / "src" / "payload"
    content.mkdir(parents=True)
    (content / "big.bin").write_bytes(random.Random(5).randbytes(1 << 20))
    for i in range(4):
        (content / f"small{i}.txt").write_bytes(random.Random(i).randbytes(3000 + i))
    raw = make_torrent_lt(content, 1 << 20, "v2")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill(dio, ih, src, seed=None)
        dio.flush_all()
        for p in range(src.meta.num_pieces):
            stored = sum(s.length for s in src.layout.map(p, 0, src.layout.piece_size(p))
                         if s.stored)
            before = dio.stats()
            assert bytes(dio.read_chunk_view(ih, p, 0, 1000)) == src.read(p, 0, 1000)
            read = dio.stats()["bytes_read"] - before["bytes_read"]
            if stored == 1 << 20:  # (big.bin's piece: cached whole, read whole once)
                assert p in dio.cached_pieces(ih) and read in (0, 1 << 20)
            else:
                assert p not in dio.cached_pieces(ih) and read == 1000, (p, read)
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_blocks_that_land_while_a_piece_is_cleared_are_never_dropped(
        tmp_path: Path, backend: str) -> None:
    """clear_piece let its piece go (missing) and only then dropped what the buffer pool
    held of it: the blocks another client wrote meanwhile, buffered by a backend that
    gathers a piece before writing it, went with that drop, and the piece verified from
    its hash state over the old bytes on disk (announced, and kept after a restart). The
    pool lets go of a piece at the moment it is missing again, now. (The drop is made
    slow here, to hold that moment open.)"""
    content = make_payload(tmp_path / "src", 8 * BLOCK * 4, seed=13)
    raw = make_torrent_lt(content, 4 * BLOCK, "v1")
    src = Source(raw, tmp_path / "src")
    events: list[PieceResult] = []
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=0.002,
                 on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    for p, b, n in src.blocks():
        dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    piece = 3
    dio.torrent(ih).storage.close_handles()  # (a map's lease would hold this test's open)
    with open(tmp_path / "dl" / "payload.bin", "r+b") as f:  # bad bytes behind our back
        f.seek(piece * 4 * BLOCK)
        f.write(bytes(4 * BLOCK))
    slow_drop = dio.pool.drop

    def drop(key: Any) -> None:
        if threading.current_thread() is threading.main_thread():  # the clear's
            time.sleep(0.2)
        slow_drop(key)

    dio.pool.drop = drop  # type: ignore[method-assign]
    blocks = [blk for blk in src.blocks() if blk[0] == piece]

    def send_again() -> None:
        time.sleep(0.05)  # the clear is under way
        for p, b, n in blocks[:-1]:
            dio.write_chunk(ih, p, b, src.read(p, b, n))
        time.sleep(0.3)  # the last block after the clear's drop
        p, b, n = blocks[-1]
        dio.write_chunk(ih, p, b, src.read(p, b, n))

    writer = threading.Thread(target=send_again)
    writer.start()
    dio.clear_piece(ih, piece)
    writer.join()
    dio.pool.drop = slow_drop  # type: ignore[method-assign]
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    dio.torrent(ih).storage.close_handles()
    with open(tmp_path / "dl" / "payload.bin", "rb") as f:
        f.seek(piece * 4 * BLOCK)
        assert f.read(4 * BLOCK) == src.read(piece, 0, 4 * BLOCK)
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_piece_cleared_before_it_is_durable_is_told_failed(
        tmp_path: Path, backend: str) -> None:
    """A piece that passed its hashes and waits for the group commit, cleared by another
    client: it used to get no event at all (its writer waited for one for ever); it gets
    piece_failed, without v1/v2 (no hash failed it), and no piece_verified."""
    content = make_payload(tmp_path / "src", 4 * BLOCK, seed=14)
    raw = make_torrent_lt(content, 2 * BLOCK, "v1")
    src = Source(raw, tmp_path / "src")
    events: list[PieceResult] = []
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=1.0,
                 on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    for p, b, n in src.blocks():
        if p == 0:
            dio.write_chunk(ih, p, b, src.read(p, b, n))
    assert dio.status(ih)["committing_pieces"] == 1
    dio.clear_piece(ih, 0)
    dio.flush_all()
    assert [(e.piece, e.ok, e.v1) for e in events] == [(0, False, None)]
    assert dio.status(ih)["verified_pieces"] == 0
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_pieces_taken_back_by_a_clear_a_check_or_a_vanished_file_are_told(
        tmp_path: Path, backend: str) -> None:
    """Whoever follows a torrent's pieces learns of each way one stops (or starts) being
    verified without a download of its own: a piece cleared with blocks written, or
    verified, is told failed (without v1/v2), as one cleared while committing always was
    (a client sending its blocks used to wait for a verdict for ever; one serving it went
    on serving it); a recheck that fails or finds pieces, and a file found gone, tell
    ``on_change``. A clear of a missing piece, and a recheck that changes nothing, tell
    nothing."""
    content = make_payload(tmp_path / "src", {"a.bin": 6 * BLOCK, "b.bin": 2 * BLOCK}, seed=16)
    raw = make_torrent_lt(content, 2 * BLOCK, "v1")
    src = Source(raw, tmp_path / "src")
    events: list[PieceResult] = []
    changed: list[bytes] = []
    dio = DiskIO(backend, state_dir=tmp_path / "state", on_piece=events.append,
                 on_change=changed.append)
    ih = dio.register(raw, tmp_path / "dl")
    for p, b, n in src.blocks():
        if p != 1 or b == 0:  # piece 1 half written
            dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] == 3
    events.clear()
    dio.clear_piece(ih, 1)  # partial
    dio.clear_piece(ih, 2)  # verified
    dio.clear_piece(ih, 1)  # missing now: nothing to tell
    assert [(e.piece, e.ok, e.v1, e.v2) for e in events] == [(1, False, None, None),
                                                             (2, False, None, None)]
    assert changed == []
    dio.recheck(ih)  # finds piece 2 again
    assert changed == [ih] and dio.status(ih)["verified_pieces"] == 3
    dio.recheck(ih)
    assert changed == [ih]  # nothing came or went
    with open(tmp_path / "dl" / "payload" / "a.bin", "r+b") as f:
        f.seek(5 * BLOCK)
        f.write(b"\xff")
    dio.recheck(ih, full=True)  # fails piece 2
    assert changed == [ih, ih] and dio.status(ih)["verified_pieces"] == 2
    dio.torrent(ih).storage.close_handles()
    (tmp_path / "dl" / "payload" / "b.bin").unlink()
    with pytest.raises(FileVanished):
        dio.read_piece(ih, 3)
    assert changed == [ih, ih, ih] and dio.status(ih)["verified_pieces"] == 1
    assert [e.piece for e in events] == [1, 2]  # (the check and the loss: no piece event)
    dio.close()


def test_a_register_that_loses_a_race_leaves_nothing_behind(tmp_path: Path) -> None:
    """Two registers of one torrent at once, with different save paths: the loser is
    refused (already registered) and used to keep its save path's descriptor open for
    good and leave the folder it made; a client repeating it used up the daemon's
    descriptors."""
    content = make_payload(tmp_path / "src", 2 * BLOCK, seed=15)
    raw = make_torrent_lt(content, BLOCK, "v1")
    dio = DiskIO("posix", state_dir=tmp_path / "state")
    fds = len(os.listdir("/proc/self/fd"))
    refused = 0
    for k in range(30):
        start = threading.Barrier(2)
        out: list[bytes | Exception] = []

        def register(side: str, k: int = k, start: threading.Barrier = start,
                     out: list[bytes | Exception] = out) -> None:
            start.wait()
            try:
                out.append(dio.register(raw, tmp_path / f"round{k}" / side / "deep"))
            except AlreadyRegistered as exc:
                out.append(exc)

        threads = [threading.Thread(target=register, args=(side,)) for side in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [x for x in out if isinstance(x, bytes)]
        assert len(won) == 1, out
        refused += 1
        kept = dio.status(won[0])["save_path"]
        made = [str(p) for p in (tmp_path / f"round{k}").rglob("*") if p.is_dir()]
        assert all(kept == m or kept.startswith(m + "/") for m in made), (kept, made)
        dio.unregister(won[0], delete_files=True)
    assert refused == 30
    assert len(os.listdir("/proc/self/fd")) <= fds + 2
    dio.close()


def test_a_register_that_loses_a_race_leaves_the_folders_of_others_under_way(
        tmp_path: Path) -> None:
    """The loser of a race to register one torrent removes the folders it made, but not
    one another register (of another torrent) has made its save path meanwhile and is
    about to use: that one's files were made in a folder deleted under it. (Each
    register is held a while before it takes its place, to line the three up.)"""
    a = make_payload(tmp_path / "a", 2 * BLOCK, seed=17)
    b = make_payload(tmp_path / "b", {"other.bin": 2 * BLOCK}, seed=18)
    raw_a, raw_b = make_torrent_lt(a, BLOCK, "v1"), make_torrent_lt(b, BLOCK, "v1")
    dio = DiskIO("posix", state_dir=tmp_path / "state")
    shared = tmp_path / "dl" / "new" / "sub"
    held = {tmp_path / "dl" / "x1": 0.1, shared: 0.2}
    real = dio._register

    def late(meta: Any, metainfo: bytes, path: Path, *rest: Any) -> bytes:
        time.sleep(held.get(path, 0.5))
        return real(meta, metainfo, path, *rest)

    dio._register = late  # type: ignore[method-assign]
    out: dict[str, Any] = {}

    def register(name: str, raw: bytes, path: Path) -> None:
        try:
            out[name] = dio.register(raw, path)
        except AlreadyRegistered as exc:
            out[name] = exc

    threads = [threading.Thread(target=register, args=args) for args in (
        ("x1", raw_a, tmp_path / "dl" / "x1"), ("x2", raw_a, shared), ("y", raw_b, shared))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(out["x2"], AlreadyRegistered) and isinstance(out["y"], bytes), out
    src = Source(raw_b, tmp_path / "b")
    for p, begin, n in src.blocks():
        dio.write_chunk(out["y"], p, begin, src.read(p, begin, n))
    dio.flush_all()
    assert dio.status(out["y"])["verified_pieces"] == src.meta.num_pieces
    assert ((shared / "payload" / "other.bin").read_bytes()
            == (tmp_path / "b" / "payload" / "other.bin").read_bytes())
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_file_found_whole_by_a_check_and_cut_short_later_is_never_read_as_zeros(
        tmp_path: Path, backend: str) -> None:
    """Data already on disk, found good by a check, then a file cut short behind the
    daemon's back: a read of a verified piece past the new end returned zeros, without
    an error, and a seeder served them as the piece (libtorrent banned it for the hash
    failures). Now the read fails as for a file the daemon wrote, and the file's pieces
    are no longer verified."""
    piece = 65536
    files = {"a.bin": 12 * piece + 5, "b.bin": 3 * piece}
    content = make_payload(tmp_path / "save", files, seed=18)
    raw = make_torrent_lt(content, piece, "v1")
    meta = parse(raw)
    errors: list[Any] = []
    dio = DiskIO(backend, cache_bytes=0, on_error=lambda ih, e: errors.append(e))
    try:
        ih = dio.register(raw, tmp_path / "save")
        dio.recheck(ih)
        assert dio.status(ih)["verified_pieces"] == meta.num_pieces
        with open(content / "a.bin", "r+b") as f:
            f.truncate(piece)
        with pytest.raises(StorageIOError):
            dio.read_chunk(ih, 9, 0, 16384)
        have = dio.status(ih)["have"]
        assert [p for p in range(meta.num_pieces) if have[p >> 3] & (0x80 >> (p & 7))] == \
            list(range(13, meta.num_pieces))  # b.bin's (piece 12 is a.bin's tail too)
        assert errors
    finally:
        dio.torrent(ih).storage.close_handles()
        dio.close()


@pytest.mark.backends(exclude={"disabled": "reads no file: its checks hash zeros, whatever is on disk"})
@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_a_check_asks_nothing_of_files_that_are_not_there(
        tmp_path: Path, backend: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new torrent's files are not on disk yet, and its first check (which a client
    runs right after register) found that out with two failed opens a piece: seconds for
    100,000 pieces. A check now looks at each file, and fails the pieces of the files
    that are not there without asking for them; a piece shared with a file that is
    there is read as before, and the check finds what libtorrent finds."""
    piece = 16384
    files = {"a.bin": 3 * piece + 100, "b.bin": 40 * piece + 7, "sub/c.bin": 20 * piece,
             "z.bin": 2 * piece + 5}
    content = make_payload(tmp_path / "save", files, seed=19)
    raw = make_torrent_lt(content, piece, kind)
    meta = parse(raw)
    opened: list[tuple[str, ...]] = []
    real_open = Beneath.open

    def counting(self: Beneath, parts: Any, flags: int, create_dirs: bool = False) -> int:
        opened.append(tuple(parts))
        return real_open(self, parts, flags, create_dirs)

    monkeypatch.setattr(Beneath, "open", counting)
    mapped: list[int] = []
    real_map = Layout.map

    def mapping(self: Layout, piece: int, begin: int, length: int) -> Any:
        mapped.append(piece)
        return real_map(self, piece, begin, length)

    monkeypatch.setattr(Layout, "map", mapping)
    dio = DiskIO(backend, cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "new")  # nothing there at all
        mapped.clear()
        result = dio.recheck(ih)
        assert opened == []
        assert mapped == []  # (mapping each file's end pieces cost seconds with 100,000 files)
        every = list(range(meta.num_pieces))
        assert not any(result.have)
        assert (result.failed_v1, result.failed_v2) == (
            every if meta.has_v1 else None, every if meta.has_v2 else None)
        assert dio.status(ih, files=False)["verified_pieces"] == 0
        dio.unregister(ih)

        (content / "b.bin").unlink()
        (content / "sub" / "c.bin").unlink()
        (content / "sub").rmdir()
        ih = dio.register(raw, tmp_path / "save")
        opened.clear()
        result = dio.recheck(ih)
        assert result.have == lt_recheck(raw, tmp_path / "save")
        assert any(result.have)
        gone = [p for p in opened if p[-1] in ("b.bin", "c.bin")]
        # At most the four pieces they share with a file that is there, each opened for
        # the read-ahead advice and for the read.
        assert len(gone) <= 2 * 4, gone
    finally:
        dio.close()


def test_the_handle_pool_closes_the_least_recently_used_idle_handles(tmp_path: Path) -> None:
    """Past its bound the pool closes the handles used longest ago, never one in use
    (a writer's descriptor closed under it could be reused by another file)."""
    from pieced.storage.files import HandlePool

    opened: list[int] = []

    class Owner:
        def open_file(self, index: int, writable: bool) -> int:
            opened.append(index)
            return os.open(tmp_path / f"f{index}", os.O_CREAT | os.O_RDWR, 0o644)

    owner = Owner()
    pool = HandlePool(max_open=3)
    busy = pool.get(owner, 0, True)  # in use all along
    for i in (1, 2, 3):
        pool.put(pool.get(owner, i, True))  # four open: 1, the oldest idle one, closed
    pool.put(pool.get(owner, 2, True))  # 2 used again: 3 is now the oldest idle one
    pool.put(pool.get(owner, 4, True))
    opened.clear()
    for i in (0, 2, 4, 3, 1):
        pool.put(pool.get(owner, i, True))
    assert opened == [3, 1]
    assert os.fstat(busy[0])  # (never closed under its user)
    pool.put(busy)
    pool.close(owner)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_move_across_devices_undone_leaves_the_torrent_as_it_was(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A move across file systems copies each file; one that fails part-way (the new
    place's disk full at the last file) copies back what it moved. The copies back are
    other inodes than the files the daemon had opened, which it then refused as files put
    in their place: their verified pieces could not be read, and the next check dropped
    them for good. (Across file systems here: ``link`` between two folders fails with
    EXDEV, as it does between two file systems; the copy's own link of the last file
    into place, with ENOSPC.)"""
    import pieced.storage.paths as paths

    real_link = os.link

    def no_link(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int,
                follow_symlinks: bool) -> None:
        if src_dir_fd != dst_dir_fd:  # (a copy's own link of its part file, in one folder)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if dst == "b.bin":  # (the last file: it never has to be put back)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd,
                  follow_symlinks=follow_symlinks)

    content = make_payload(tmp_path / "src", {"a.bin": 200_000, "c.bin": 70_001,
                                              "d/b.bin": 90_000}, seed=23)
    raw = make_torrent_lt(content, 32768, "hybrid")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "a")
        fill(dio, ih, src, direct_every=0)
        n = src.meta.num_pieces
        assert dio.status(ih, files=False)["verified_pieces"] == n
        # Held open, so that the copies back cannot be given the inodes they had.
        held = [os.open(f, os.O_RDONLY) for f in (tmp_path / "a").rglob("*.bin")]
        monkeypatch.setattr(paths.os, "link", no_link)
        with pytest.raises(PiecedError):
            dio.move_storage(ih, tmp_path / "b")
        monkeypatch.undo()
        for fd in held:
            os.close(fd)
        assert dio.status(ih, files=False)["save_path"] == str(tmp_path / "a")
        for p in range(n):
            assert dio.read_piece(ih, p) == src.read(p, 0, src.layout.piece_size(p))
        assert dio.recheck(ih).ok
        assert dio.status(ih, files=False)["verified_pieces"] == n
    finally:
        dio.close()


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_a_rename_that_makes_a_file_and_a_folder_of_one_name_is_refused(
        tmp_path: Path, kind: str) -> None:
    """Renaming a file to a path below another file of the torrent (which would become
    a folder), or to the name of another file's folder, was taken: the other file could
    never be written again (EISDIR, or a false PathEscape), and the torrent never
    completed, restart or not. It is refused (EEXIST), as register refuses a file and a
    folder of one name, and nothing changes."""
    content = make_payload(tmp_path / "src", {"a.bin": 70_000, "d/b.bin": 50_000}, seed=29)
    raw = make_torrent_lt(content, 16384, kind)
    src = Source(raw, tmp_path / "src")
    meta = src.meta
    a = next(i for i, f in enumerate(meta.files) if f.stored and f.path[-1] == "a.bin")
    root = meta.files[a].path[0]
    dio = DiskIO("posix")
    try:
        ih = dio.register(raw, tmp_path / "dl")
        a_blocks = [b for b in src.blocks() if b[0] in Layout(meta).file_pieces(a)]
        for p, begin, n in a_blocks:  # a.bin written, b.bin not yet
            dio.write_chunk(ih, p, begin, src.read(p, begin, n))
        dio.flush_all()
        for name in (f"{root}/d/b.bin/a.bin", f"{root}/d"):
            with pytest.raises(StorageIOError) as exc:
                dio.rename_file(ih, a, name)
            assert exc.value.errno == errno.EEXIST, exc.value
        fill(dio, ih, src, direct_every=0)  # b.bin can be written
        assert dio.recheck(ih).ok
        dio.rename_file(ih, a, f"{root}/e/a.bin")  # a rename that clashes with nothing
        assert dio.recheck(ih).ok
    finally:
        dio.close()


def test_a_move_to_where_a_file_is_in_the_way_of_a_folder_is_refused_before_it_starts(
        tmp_path: Path) -> None:
    """A file at the new place where the torrent has a folder was found by the move
    half-way (PATH_ESCAPE, then every file moved so far put back); it is refused up front
    like a file of one of the torrent's names (EEXIST), and nothing moves."""
    content = make_payload(tmp_path / "src", {"a.bin": 70_000, "d/b.bin": 50_000}, seed=31)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    root = src.meta.files[0].path[0]
    dio = DiskIO("posix")
    try:
        ih = dio.register(raw, tmp_path / "a")
        fill(dio, ih, src, direct_every=0)
        (tmp_path / "b" / root).mkdir(parents=True)
        (tmp_path / "b" / root / "d").write_bytes(b"in the way")
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
        with pytest.raises(StorageIOError) as exc:
            dio.move_storage(ih, tmp_path / "b")
        assert exc.value.errno == errno.EEXIST and "in the way" in str(exc.value)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                      if p.is_file()) == before
        assert dio.recheck(ih).ok
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": "stores nothing: no file to size"})
def test_a_file_longer_than_its_torrent_says_is_cut_to_its_length_by_the_first_write(
        tmp_path: Path, backend: str) -> None:
    """A download into a save path holding a file longer than the torrent's (an older
    version, another torrent's file of that name): the bytes past its length stayed, so
    the download ended verified but not as the bytes it is of. The first write gives
    the file its length, as libtorrent does; a file only read is left as it is."""
    content = make_payload(tmp_path / "src", {"a.bin": 100_000, "b.bin": 70_001}, seed=12)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    dl = tmp_path / "dl" / "payload"
    dl.mkdir(parents=True)
    (dl / "a.bin").write_bytes(b"\x01" * 105_000)  # longer, and wrong
    (dl / "b.bin").write_bytes((content / "b.bin").read_bytes() + b"tail")  # longer, right
    dio = DiskIO(backend, cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        res = dio.recheck(ih, full=True)
        index_b = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "b.bin")
        good = set(range(src.meta.num_pieces)) - set(res.failed_v1 or [])
        assert set(src.layout.file_pieces(index_b)) - {min(src.layout.file_pieces(index_b))} <= good
        for p, b, n in src.blocks():
            if p not in good:
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert (dl / "a.bin").read_bytes() == (content / "a.bin").read_bytes()
    finally:
        dio.close()


class LongAndShort(NamedTuple):
    """One file named by two torrents with two lengths (cross-seeding)."""

    data: bytes  # the longer one's bytes (the shorter one's are the first half)
    raw_long: bytes
    raw_short: bytes
    src_long: Source
    src_short: Source


def long_and_short(tmp_path: Path, seed: int, short_piece: int = 16384) -> LongAndShort:
    """``x.bin`` of 200,000 bytes in ``tmp_path/long`` and its first 100,000 in
    ``tmp_path/short``, a v1 torrent of each (16 KiB pieces; ``short_piece`` for the
    shorter one)."""
    long_content = make_payload(tmp_path / "long", {"x.bin": 200_000}, seed=seed)
    data = (long_content / "x.bin").read_bytes()
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "x.bin").write_bytes(data[:100_000])
    raw_long = make_torrent_lt(long_content / "x.bin", 16384, "v1")
    raw_short = make_torrent_lt(tmp_path / "short" / "x.bin", short_piece, "v1")
    return LongAndShort(data, raw_long, raw_short, Source(raw_long, long_content),
                        Source(raw_short, tmp_path / "short"))


def _downloaded(dio: DiskIO, raw: bytes, src: Source, save: Path) -> bytes:
    """Register ``raw`` in ``save`` and write all of it in order, flushed: its info hash."""
    ih = dio.register(raw, save)
    fill(dio, ih, src, seed=None, direct_every=0)
    dio.flush_all()
    return ih


@pytest.mark.backends(exclude={"disabled": "stores nothing: no file to size"})
def test_a_shared_file_longer_than_one_torrent_says_is_not_cut_from_under_the_other(
        tmp_path: Path, backend: str) -> None:
    """Two torrents name one file (cross-seeding) with two lengths: the shorter one's
    first write does not cut the file to its length, which would take the other's
    verified pieces from under it unannounced (still reported verified); nor does the
    direct backend's write of the file's last page, whole."""
    data, raw_long, raw_short, src_long, src_short = long_and_short(tmp_path, seed=14)
    dio = DiskIO(backend, cache_bytes=0, roots=[tmp_path])
    try:
        ih_long = _downloaded(dio, raw_long, src_long, tmp_path / "dl")
        ih_short = _downloaded(dio, raw_short, src_short, tmp_path / "dl")
        assert dio.status(ih_short)["verified_pieces"] == src_short.meta.num_pieces
        assert (tmp_path / "dl" / "x.bin").read_bytes() == data
        assert dio.recheck(ih_long, full=True).ok
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": "stores nothing: no file to share"})
def test_writes_past_the_end_a_shorter_torrent_gives_a_shared_file_are_stored(
        tmp_path: Path, backend: str) -> None:
    """Two torrents name one file with two lengths, the shorter one registered first:
    every block of the longer one past the shorter one's end failed with an internal
    error (its pieces were looked for in the shorter torrent, past its last), and the
    longer one never finished. Those bytes are the longer one's alone."""
    data, raw_long, raw_short, src_long, src_short = long_and_short(tmp_path, seed=15,
                                                                    short_piece=32768)
    dio = DiskIO(backend, cache_bytes=0, roots=[tmp_path])
    try:
        ih_short = _downloaded(dio, raw_short, src_short, tmp_path / "dl")
        ih_long = _downloaded(dio, raw_long, src_long, tmp_path / "dl")
        assert dio.status(ih_long)["verified_pieces"] == src_long.meta.num_pieces
        assert dio.status(ih_short)["verified_pieces"] == src_short.meta.num_pieces
        assert (tmp_path / "dl" / "x.bin").read_bytes() == data
        assert dio.recheck(ih_short, full=True).ok and dio.recheck(ih_long, full=True).ok
    finally:
        dio.close()


def test_bytes_read_counts_the_payload_not_the_pads(tmp_path: Path) -> None:
    """``bytes_read`` ("payload bytes read from disk") counted the pad files of a hybrid
    torrent, which are never read (262,144 for 175,000 bytes on disk), in reads and in
    rechecks. It counts the bytes read from the files."""
    content = make_payload(tmp_path / "src", {"a.bin": 100_000, "b.bin": 75_000}, seed=31)
    raw = make_torrent_lt(content, 32768, "hybrid")
    src = Source(raw, tmp_path / "src")
    payload = 175_000
    assert src.meta.num_pieces * 32768 > payload + 32768  # (pads: there are some)
    dio = DiskIO("posix", cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "src")
        before = dio.stats()["bytes_read"]
        assert dio.recheck(ih, full=True).ok
        assert dio.stats()["bytes_read"] - before == payload
        before = dio.stats()["bytes_read"]
        for p in range(src.meta.num_pieces):
            size = src.meta.piece_size(p)
            assert dio.read_chunk(ih, p, 0, size, volatile=True) == src.read(p, 0, size)
        assert dio.stats()["bytes_read"] - before == payload
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_block_wholly_in_a_pad_leaves_its_piece_missing(tmp_path: Path, backend: str) -> None:
    """A block of zeros that lies wholly in a pad (a client that sends a piece's every
    16 KiB block; libtorrent never sends one) made its piece partial with nothing of
    it stored: a slot of max_partial_pieces taken, and every recheck, which leaves
    pieces under way alone, passed it by, good data on disk left unverified. Such a
    block stores nothing and starts nothing; one of other bytes still fails the piece."""
    content = make_payload(tmp_path / "src", {"a.bin": 3 * 65536 + 3392, "b.bin": 100_000},
                           seed=41)
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend)
    try:
        ih = dio.register(raw, tmp_path / "src")
        assert dio.recheck(ih, full=True).ok
        piece, begin = next(
            (p, b) for p in range(src.meta.num_pieces) for b in range(0, 65536, 16384)
            if b + 16384 <= src.layout.piece_size(p) and all(
                not s.stored for s in src.layout.map(p, b, 16384)))
        dio.clear_piece(ih, piece)
        dio.write_chunk(ih, piece, begin, bytes(16384))
        assert dio.status(ih, files=False)["partial_pieces"] == 0
        assert dio.recheck(ih, full=True).ok
        dio.clear_piece(ih, piece)
        dio.write_chunk(ih, piece, begin, b"\x01" * 16384)  # not zeros: the piece fails
        for p, b, n in src.blocks():
            if p == piece and b != begin:
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        assert not dio.status(ih, files=False)["have"][piece >> 3] & (0x80 >> (piece & 7))
    finally:
        dio.close()


def _without_layers(raw: bytes) -> bytes:
    """The metainfo without ``piece layers``: what a client has from a magnet link (the
    info dictionary from its peers)."""
    import bencodepy

    top = bencodepy.decode(raw)
    assert top.pop(b"piece layers")
    return bytes(bencodepy.encode(top))


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_hybrid_without_its_piece_layers_is_checked_by_its_v1_hashes(
        tmp_path: Path, odd_payload: tuple[Path, Path], backend: str) -> None:
    """A hybrid torrent's info dictionary alone (a magnet link's metadata: no piece
    layers) was refused, where libtorrent takes it and checks the pieces by their SHA-1
    until peers send the layers. Taken now: every piece is verified by v1 (a bad block
    fails its piece), the pieces of files of one piece or less by v2 too (their root is
    in the info dictionary), and a v2 check of the others needs the root given."""
    save, content = odd_payload
    full = make_torrent_lt(content, 16384, "hybrid")
    raw = _without_layers(full)
    src, whole = Source(raw, save), parse(full)
    layerless = [p for p in range(src.meta.num_pieces)
                 if src.meta.v2_piece(p) is None and not all(
                     not s.stored for s in src.layout.map(p, 0, src.layout.piece_size(p)))]
    small = [p for p in range(src.meta.num_pieces) if src.meta.v2_piece(p) is not None]
    assert len(layerless) >= 10 and small
    assert all(whole.v2_piece(p) is not None for p in layerless)
    events: list[PieceResult] = []
    dio = DiskIO(backend, roots=[tmp_path], on_piece=events.append)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        bad = layerless[3]
        blocks = src.peer_blocks()
        for p, b, n in blocks:
            data = src.read(p, b, n)
            dio.write_chunk(ih, p, b, data if (p, b) != (bad, 0) else b"\xff" * n)
        failed = [e for e in events if not e.ok]
        assert [(e.piece, e.v1, e.v2) for e in failed] == [(bad, False, None)]
        dio.clear_piece(ih, bad)
        for p, b, n in blocks:
            if p == bad:
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        status = dio.status(ih, files=False)
        assert status["verified_pieces"] == src.meta.num_pieces
        good = {e.piece: e for e in events if e.ok}
        assert all(good[p].v1 and good[p].v2 is None for p in layerless)
        assert all(good[p].v1 and good[p].v2 for p in small if p in good)
        assert all(lt_recheck(full, tmp_path / "dl"))  # libtorrent, with the layers, agrees
        with pytest.raises(NoHashes, match="no piece layer"):
            dio.hash_piece_v2(ih, layerless[0])
        want = whole.v2_piece(layerless[0])
        assert want is not None
        assert dio.hash_piece_v2(ih, layerless[0], want.expected)
        assert not dio.hash_piece_v2(ih, layerless[0], bytes(32))
        assert dio.hash_piece_v2(ih, small[0])
        assert dio.recheck(ih, full=True).ok
        assert sorted(layerless) == src.meta.v2_unchecked()
        assert status["v2_unchecked_pieces"] == len(layerless)
        with pytest.raises(AlreadyRegistered, match="without its piece layers"):
            dio.register(full, tmp_path / "dl")
    finally:
        dio.close()
