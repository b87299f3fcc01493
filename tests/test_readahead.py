"""A recheck on the direct (O_DIRECT) backend reads ahead of the hashing, on reader
threads of its own, into a bounded set of buffers: every piece is still judged as it
is on disk (good, corrupted, missing, cut short during the recheck), reads run while
the pieces before them are hashed, and the memory read ahead stays within its bound
whatever the piece length and however many rechecks run."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pieced.storage import verify as verify_mod
from pieced.storage.disk import DiskIO
from pieced.storage.hashing import HashPool
from pieced.storage.layout import Layout
from pieced.storage.metainfo import parse
from pieced.storage.verify import STREAM_BYTES, FolderFiles, PreadReader, ReadAhead

from tests.conftest import peak_from_now, proc_bytes, run_threads, sparse_zero_torrent
from tests.pagecache import drop
from tests.realtools import corrupt, make_payload, make_torrent_lt

# odd sizes: files start and end inside pages, pieces span files
FILES = {"a.bin": 3 * 1024 * 1024 + 12_345, "b.bin": 1, "c/d.bin": 5 * 1024 * 1024 + 777,
         "e.bin": 900_001}


def _piece_at(dio: DiskIO, ih: bytes, name: str, offset: int) -> int:
    meta = dio._torrents[ih].meta
    f = next(f for f in meta.files if "/".join(f.path).endswith(name))
    return (f.offset + offset) // meta.piece_length


class Watch:
    """Wraps a torrent's ``storage.readinto`` and the hashing: how many reads were in
    flight at most, on which threads, and how many hashes ran while a read did."""

    def __init__(self, dio: DiskIO, ih: bytes, delay: float = 0.0) -> None:
        storage = dio._torrents[ih].storage
        self.lock = threading.Lock()
        self.reading = self.max_reading = self.hashes = self.overlapped = 0
        self.threads: set[str] = set()
        real = storage.readinto

        def readinto(segments: Any, out: memoryview) -> None:
            with self.lock:
                self.reading += 1
                self.max_reading = max(self.max_reading, self.reading)
                self.threads.add(threading.current_thread().name.split("_")[0])
            try:
                time.sleep(delay)  # a slow disk
                real(segments, out)
            finally:
                with self.lock:
                    self.reading -= 1

        storage.readinto = readinto  # type: ignore[method-assign]

    def hashed(self) -> None:
        with self.lock:
            self.hashes += 1
            self.overlapped += self.reading > 0


@pytest.fixture
def watch_hashing(monkeypatch: pytest.MonkeyPatch) -> list[Watch]:
    """Every :class:`Watch` appended here hears of each piece hashed (check_piece)."""
    watches: list[Watch] = []
    real = verify_mod.check_piece

    def check_piece(*args: Any) -> Any:
        for w in watches:
            w.hashed()
        time.sleep(0.002)  # hashing takes time too
        return real(*args)

    monkeypatch.setattr(verify_mod, "check_piece", check_piece)
    return watches


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
@pytest.mark.parametrize("piece", [256 * 1024, 8 * 1024 * 1024])
def test_direct_recheck_finds_good_and_corrupted_pieces(tmp_path: Path, kind: Any,
                                                        piece: int) -> None:
    content = make_payload(tmp_path / "dl", FILES, seed=3)
    raw = make_torrent_lt(content, piece, kind)
    dio = DiskIO("direct", roots=[tmp_path], cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        watch = Watch(dio, ih)
        first = dio.recheck(ih, full=True)
        assert first.ok and first.num_pieces > 1, first
        assert "pieced-readahead" in watch.threads  # read ahead, not by the hash workers
        again = dio.recheck(ih)
        assert again.ok and again.fingerprint_hits == again.num_pieces

        bad = _piece_at(dio, ih, "c/d.bin", 5 * 1024 * 1024)  # a byte near d.bin's end
        corrupt(content / "c" / "d.bin", 5 * 1024 * 1024)
        for full in (False, True):
            result = dio.recheck(ih, full=full)
            if first.failed_v1 is not None:
                assert result.failed_v1 == [bad], full
            if first.failed_v2 is not None:
                assert result.failed_v2 == [bad], full
            assert [p for p, ok in enumerate(result.have) if not ok] == [bad], full
    finally:
        dio.close()


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_direct_recheck_fails_the_pieces_of_a_missing_or_replaced_file(
    tmp_path: Path, kind: Any
) -> None:
    content = make_payload(tmp_path / "dl", FILES, seed=4)
    raw = make_torrent_lt(content, 256 * 1024, kind)
    dio = DiskIO("direct", roots=[tmp_path], cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        assert dio.recheck(ih).ok
        meta = dio._torrents[ih].meta
        layout = dio._torrents[ih].layout
        index = {"/".join(f.path[1:]): i for i, f in enumerate(meta.files)}

        (content / "c" / "d.bin").unlink()
        gone = set(layout.file_pieces(index["c/d.bin"]))
        result = dio.recheck(ih, full=True)
        assert {p for p, ok in enumerate(result.have) if not ok} == gone

        # a payload file replaced by a symlink: its pieces fail, recorded with EPERM
        (tmp_path / "elsewhere").write_bytes((content / "a.bin").read_bytes())
        (content / "a.bin").unlink()
        (content / "a.bin").symlink_to(tmp_path / "elsewhere")
        gone |= set(layout.file_pieces(index["a.bin"]))
        result = dio.recheck(ih, full=True)
        assert {p for p, ok in enumerate(result.have) if not ok} == gone
        errors = dio.status(ih)["errors"]
        assert any(e["errno"] == errno.EPERM for e in errors), errors
    finally:
        dio.close()


def test_a_file_cut_short_during_the_recheck(tmp_path: Path) -> None:
    """The biggest file loses its second half as the recheck's first read starts: the
    recheck ends, the pieces still whole are good, those past the cut fail."""
    content = make_payload(tmp_path / "dl", {"big.bin": 24 * 1024 * 1024 + 5, "z.bin": 99},
                           seed=5)
    raw = make_torrent_lt(content, 1024 * 1024, "v1")
    dio = DiskIO("direct", roots=[tmp_path], cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        assert dio.recheck(ih).ok
        storage = dio._torrents[ih].storage
        real = storage.readinto
        lock = threading.Lock()
        cut: list[str] = []

        def readinto(segments: Any, out: memoryview) -> None:
            with lock:
                if not cut:
                    os.truncate(content / "big.bin", 12 * 1024 * 1024)
                    cut.append(threading.current_thread().name)
            real(segments, out)

        storage.readinto = readinto  # type: ignore[method-assign]
        for full in (True, False):
            result = dio.recheck(ih, full=full)
            assert cut
            assert result.num_pieces == 25
            assert all(result.have[:12]), full  # before the cut
            assert not any(result.have[12:]), full  # past it (the last: big.bin's end, z.bin)
    finally:
        dio.close()


def test_reads_run_while_pieces_are_hashed(tmp_path: Path, watch_hashing: list[Watch]) -> None:
    """One hash worker: without read-ahead it reads a piece, then hashes it, never both
    at once. With it, the readers have the next pieces in flight while it hashes."""
    content = make_payload(tmp_path / "dl", 24 * 1024 * 1024, seed=6)
    raw = make_torrent_lt(content, 1024 * 1024, "v1")
    dio = DiskIO("direct", roots=[tmp_path], cache_bytes=0, hash_workers=1)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        watch = Watch(dio, ih, delay=0.005)
        watch_hashing.append(watch)
        result = dio.recheck(ih, full=True)
        assert result.ok and watch.hashes == result.num_pieces == 24
        print(f"reads in flight at most {watch.max_reading}; {watch.overlapped} of "
              f"{watch.hashes} hashes ran while a read did; threads {watch.threads}")
        assert watch.max_reading >= 2, watch.max_reading
        assert watch.overlapped >= watch.hashes // 2, (watch.overlapped, watch.hashes)
    finally:
        dio.close()


def test_posix_does_not_read_ahead_itself(tmp_path: Path) -> None:
    """The page cache backends keep the kernel's read-ahead (POSIX_FADV_WILLNEED): their
    hash workers read, nothing else."""
    content = make_payload(tmp_path / "dl", 4 * 1024 * 1024, seed=7)
    raw = make_torrent_lt(content, 256 * 1024, "v1")
    dio = DiskIO("posix", roots=[tmp_path], cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        watch = Watch(dio, ih)
        assert dio.recheck(ih, full=True).ok
        assert watch.threads == {"pieced-hash"}, watch.threads
    finally:
        dio.close()


def test_memory_read_ahead_is_bounded(tmp_path: Path) -> None:
    """Three rechecks at once of torrents of 64 MiB pieces (sparse files: zeros): the
    process's peak RSS grows by no more than the read-ahead's slots plus the hash
    workers' own buffers (for the parts they read themselves), 4 MiB each, and a little
    slack; reading whole pieces ahead would take 64 MiB for each."""


    piece = 64 * 1024 * 1024
    dio = DiskIO("direct", roots=[tmp_path], cache_bytes=0, hash_workers=2)
    try:
        ihs = [dio.register(sparse_zero_torrent(tmp_path / f"dl{k}", f"zeros{k}.bin", piece, 3),
                            tmp_path / f"dl{k}") for k in range(3)]
        ahead = verify_mod.read_ahead(dio.hash_pool.workers)
        bound = (ahead.slots + dio.hash_pool.workers) * STREAM_BYTES
        base = peak_from_now()

        def recheck(ih: bytes) -> Callable[[], None]:
            def run() -> None:
                assert sum(dio.recheck(ih, full=True).have) == 3
            return run

        run_threads(*(recheck(ih) for ih in ihs))
        peak = proc_bytes(os.getpid(), "VmHWM")
        print(f"read ahead: {ahead.slots} slots, bound {bound / 2**20:.0f} MiB; RSS "
              f"{base / 2**20:.1f} -> peak {peak / 2**20:.1f} MiB")
        assert ahead.max_reading >= 1  # it did read ahead
        assert peak - base < bound + 8 * 1024 * 1024, (peak - base) / 2**20
    finally:
        dio.close()


def test_slots_are_given_back_when_the_readers_are_idle(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ReadAhead, "IDLE", 0.2)
    monkeypatch.setattr(verify_mod, "_read_ahead", None)
    content = make_payload(tmp_path / "dl", 8 * 1024 * 1024, seed=8)
    raw = make_torrent_lt(content, 1024 * 1024, "v1")
    dio = DiskIO("direct", roots=[tmp_path], cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        assert dio.recheck(ih, full=True).ok
        ahead = verify_mod.read_ahead(dio.hash_pool.workers)
        assert 0 < ahead._made <= ahead.slots

        def readers() -> list[threading.Thread]:  # (those of earlier tests' end too)
            return [t for t in threading.enumerate() if t.name == "pieced-readahead"]

        deadline = time.monotonic() + 10
        while (ahead._made or readers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ahead._made == ahead._readers == 0
        assert not readers()
        assert dio.recheck(ih, full=True).ok  # and they come back when needed
    finally:
        dio.close()


@pytest.mark.backends(exclude={
    "disabled": "stores nothing: there is no page cache to read from",
    "direct": "reads past the page cache, ahead of the hashing itself (tested above)"})
def test_a_cold_recheck_goes_in_small_batches_and_hashes_copies(tmp_path: Path,
                                                                backend: str) -> None:
    """Data not in the page cache is checked in batches of COLD_BATCH_BYTES (the two
    hash workers then take neighbouring pieces, where the disk's reads come in), with
    at least READ_AHEAD_BYTES asked ahead; data in it, in batches of BATCH_BYTES. SHA-1
    hashes a copy of the pages even on mmap; BLAKE3 hashes them where they lie. Each
    kind of check finds the piece corrupted on disk, and only that one."""
    piece = 1024 * 1024
    content = make_payload(tmp_path / "dl", {"a.bin": 30 * piece + 4321, "b/c.bin": 1,
                                            "d.bin": 17 * piece}, seed=8)
    raw = make_torrent_lt(content, piece, "v1")
    dio = DiskIO(backend, roots=[tmp_path], cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        assert dio.recheck(ih, full=True).ok  # fingerprints taken
        corrupt(tmp_path / "dl" / content.name / "d.bin", 5 * piece + 99)
        bad = _piece_at(dio, ih, "d.bin", 5 * piece + 99)
        t = dio._torrents[ih]
        batches: list[int] = []  # bytes of each batch handed to the hash pool
        real_submit = dio.hash_pool.submit

        def submit(fn: Any, *args: Any) -> Any:
            batches.append(sum(map(t.meta.piece_size, args[0])))
            return real_submit(fn, *args)

        viewed = []
        real_views = t.storage.views

        def views(segments: Any) -> Any:
            viewed.append(segments)
            return real_views(segments)

        dio.hash_pool.submit = submit  # type: ignore[method-assign]
        t.storage.views = views  # type: ignore[method-assign]
        for full in (True, False):
            assert drop(tmp_path / "dl") <= 0.01
            batches.clear()
            viewed.clear()
            result = dio.recheck(ih, full=full)
            assert [p for p, ok in enumerate(result.have) if not ok] == [bad]
            assert result.failed_v1 == [bad]
            print(f"full={full}: cold batches {[b // piece for b in batches]} MiB, "
                  f"{len(viewed)} views")
            # (A batch or two may be warm: a page the drop left, one in a hundred at
            # most, or the kernel's read-ahead of a probe, or of the batches asked
            # ahead, come in before its turn: in loaded runs it happened to the first
            # piece, and once to a batch half way. Checked warm all along, the 48 MiB
            # would be three batches over COLD_BATCH_BYTES.)
            assert max(batches) <= verify_mod.BATCH_BYTES, batches
            assert sum(b > verify_mod.COLD_BATCH_BYTES for b in batches) <= 2, batches
            if full:
                assert not viewed  # SHA-1: read, copied out
            else:
                assert bool(viewed) == (backend == "mmap")  # BLAKE3 in place where mapped
        batches.clear()
        assert dio.recheck(ih, full=True).failed_v1 == [bad]  # warm now
        assert max(batches) == verify_mod.BATCH_BYTES, batches
    finally:
        dio.close()


def test_a_cold_check_asks_for_what_it_reads_next_well_ahead(tmp_path: Path) -> None:
    """``pieced verify``'s check of data not in the page cache, on a slow disk (10 ms a
    read: the thread that asks ahead has a batch's reads, 80 ms, to wake up in, even on a
    loaded machine): when a piece is read, the read-ahead asked for (POSIX_FADV_WILLNEED) reaches
    about READ_AHEAD_BYTES past it (less the batches being read, at most three: the
    median over the pieces that far from the torrent's end)."""
    piece = 1024 * 1024
    content = make_payload(tmp_path / "dl", 160 * piece, seed=9)
    meta = parse(make_torrent_lt(content, piece, "v1"))
    files = FolderFiles(meta, tmp_path / "dl", Layout(meta))
    lock = threading.Lock()
    asked = [0]  # bytes asked for, from the start of the torrent
    ahead: list[int] = []  # bytes asked for past each piece read, MiB
    real_advise, real_read = files.advise, files.read
    far = 160 * piece - verify_mod.READ_AHEAD_BYTES

    def advise(first: int, size: int) -> None:
        with lock:
            asked[0] = max(asked[0], first * piece + size)
        real_advise(first, size)

    def read(p: int, begin: int, out: memoryview) -> None:
        time.sleep(0.010)  # a slow disk: the thread that asks ahead keeps up with it
        with lock:
            if begin == 0 and (p + 1) * piece <= far:
                ahead.append((asked[0] - (p + 1) * piece) // piece)
        real_read(p, begin, out)

    assert drop(tmp_path / "dl") <= 0.01
    pool = HashPool(2)
    try:
        result = verify_mod.verify(meta, PreadReader(read, advise, resident=files.resident),
                                   pool)
    finally:
        pool.shutdown()
        files.close()
    assert result.ok and result.num_pieces == 160
    ahead.sort()
    print(f"asked ahead of each read: {ahead[0]}-{ahead[-1]} MiB, "
          f"median {ahead[len(ahead) // 2]} MiB")
    want = (verify_mod.READ_AHEAD_BYTES - 3 * verify_mod.COLD_BATCH_BYTES) // piece
    assert ahead[len(ahead) // 2] >= want, ahead
