"""BLAKE3 fingerprints: taken of every piece as it verifies, kept in the state directory,
and used by recheck in place of the torrent's hashes while they match; never trusted
to fail a piece, and never used by ``recheck --full``."""

from __future__ import annotations

import array
import json
import random
import subprocess
import sys
import zlib
from pathlib import Path

import bencodepy
import pytest
from blake3 import blake3
from pieced.storage.disk import DiskIO
from pieced.storage.hashing import FINGERPRINT_BYTES, fingerprint
from pieced.storage.resume import file_stamp

from tests.conftest import STORES_NOTHING, Daemon
from tests.realtools import corrupt, lt_recheck, make_payload, make_torrent_lt
from tests.test_disk import Source, fill
from tests.test_state import wait_reverified


@pytest.fixture(params=["v1", "v2", "hybrid"])
def source(request: pytest.FixtureRequest, odd_payload: tuple[Path, Path]) -> tuple[bytes, Source]:
    save, content = odd_payload
    raw = make_torrent_lt(content, 32768, request.param)
    return raw, Source(raw, save)


def test_every_verified_piece_gets_the_fingerprint_of_its_bytes(
    tmp_path: Path, source: tuple[bytes, Source]
) -> None:
    raw, src = source
    dio = DiskIO(sync_window=0.002)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)  # shuffled blocks, half through the ring path: gaps get read back
    dio.flush_all()
    t = dio.torrent(ih)
    padded = src.layout.padded_pieces()
    for p in range(src.meta.num_pieces):
        # Of the stored bytes alone: the pads, zeros wherever the torrent puts them,
        # are left out (a 16 MiB piece of a small file cost a hash of 16 MiB).
        expected = src.fingerprint(p)
        assert t.fingerprint(p) == expected, p
        whole = [src.read(p, 0, src.layout.piece_size(p))]
        assert fingerprint(whole, src.layout.pads(p)) == expected
        assert (fingerprint(whole) == expected) == (p not in padded)
    assert padded or not src.meta.has_v2  # (v2 gives each file pieces of its own)

    r = dio.recheck(ih)
    assert r.ok and r.fingerprint_hits == src.meta.num_pieces and not r.new_fingerprints
    full = dio.recheck(ih, full=True)
    assert full.ok and full.fingerprint_hits == 0 and not full.new_fingerprints
    dio.close()


def test_changed_data_falls_back_to_the_torrent_hashes(
    tmp_path: Path, source: tuple[bytes, Source]
) -> None:
    raw, src = source
    dio = DiskIO()
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src, seed=None)
    dio.flush_all()
    n = src.meta.num_pieces
    big = max(src.meta.files, key=lambda f: f.length)
    corrupt(tmp_path / "dl" / Path(*big.path), 40000)
    bad = (big.offset + 40000) // 32768
    r = dio.recheck(ih)
    assert r.have == [p != bad for p in range(n)]
    assert r.fingerprint_hits == n - 1
    if src.meta.has_v1:
        assert r.failed_v1 == [bad]
    if src.meta.has_v2:
        assert r.failed_v2 == [bad]
    # The failed piece keeps its old fingerprint: a hint, never a verdict.
    assert dio.torrent(ih).fingerprint(bad) == src.fingerprint(bad)
    assert not dio.status(ih)["have"][bad >> 3] & (0x80 >> (bad & 7))

    # A stale fingerprint on good data (a lost state write, say) costs a full hash of
    # that piece, which passes and replaces it.
    corrupt(tmp_path / "dl" / Path(*big.path), 40000)  # flip it back
    t = dio.torrent(ih)
    with t.lock:
        t.set_fingerprint(3, b"\x01" * FINGERPRINT_BYTES)
    r = dio.recheck(ih)
    assert r.ok and r.fingerprint_hits == n - 1 and set(r.new_fingerprints or {}) == {3}
    assert t.fingerprint(3) == src.fingerprint(3)
    dio.close()


def test_fingerprints_persist_and_are_made_by_the_first_recheck(
    tmp_path: Path, odd_payload: tuple[Path, Path]
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    n = Source(raw, save).meta.num_pieces
    state = tmp_path / "state"

    # Data that was already there: no fingerprints until a recheck has used the
    # torrent's hashes once.
    dio = DiskIO(state_dir=state)
    ih = dio.register(raw, save)
    r = dio.recheck(ih)
    assert r.ok and r.fingerprint_hits == 0 and len(r.new_fingerprints or {}) == n
    dio.close()
    resume = state / "torrents" / ih.hex() / "resume"

    def table() -> bytes:
        return bytes(bencodepy.decode(resume.read_bytes())[b"fingerprints"])

    assert len(table()) == n * FINGERPRINT_BYTES and table() != bytes(n * FINGERPRINT_BYTES)

    again = DiskIO(state_dir=state)
    r = again.recheck(ih)
    assert r.ok and r.fingerprint_hits == n
    again.close()

    # A lost or damaged table only costs speed.
    record = bencodepy.decode(resume.read_bytes())
    record[b"fingerprints"] = b"short"
    # (Without its checksum, as an older version wrote it, nor what came after it: a
    # record whose checksum fails is damaged as a whole, and its torrent's pieces are
    # checked again.)
    del record[b"crc"], record[b"ih"], record[b"fp_form"]
    resume.write_bytes(bencodepy.encode(record))
    third = DiskIO(state_dir=state)
    wait_reverified(third, ih)  # (its pieces with pads: checked again, being of that form)
    r = third.recheck(ih)
    assert r.ok and r.fingerprint_hits == len(Source(raw, save).layout.padded_pieces()) > 0
    third.close()
    assert len(table()) == n * FINGERPRINT_BYTES


@pytest.mark.parametrize("kind", ["v2", "hybrid"])
def test_fingerprints_taken_over_pads_are_dropped_and_their_pieces_checked_again(
    tmp_path: Path, odd_payload: tuple[Path, Path], kind: str
) -> None:
    """A state whose record does not say its fingerprints leave pads out (written when
    they were taken over every byte of the piece, pads as zeros): the fingerprints of
    pieces with pads are dropped, never compared (a mismatch would take a piece for
    changed on disk, verified no more), and those pieces are checked again at the
    start by the torrent's hashes, as pieces in doubt are. Kept verified with no
    fingerprint, one edited while the daemon was down (its stamp kept: the record of a
    kill -9 keeps a file's inode alone) was read whole and seeded as verified. No good
    piece is lost; the others keep their fingerprints."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, kind)  # type: ignore[arg-type]
    src = Source(raw, save)
    n = src.meta.num_pieces
    padded = src.layout.padded_pieces()
    assert 1 < len(padded) < n
    state = tmp_path / "state"
    dio = DiskIO(state_dir=state)
    ih = dio.register(raw, save)
    assert dio.recheck(ih).ok
    dio.close()
    # A byte of a piece with pads edited while the daemon is down, its stamp taken
    # again into the record: nothing but the fingerprint can tell.
    edited = min(padded)
    seg = next(s for s in src.layout.map(edited, 0, src.layout.piece_size(edited)) if s.stored)
    path = save.joinpath(*src.meta.files[seg.file_index].path)
    good = src.read(edited, 0, src.layout.piece_size(edited))
    with open(path, "r+b") as f:
        f.seek(seg.file_offset)
        f.write(bytes([good[seg.buf_offset] ^ 0x55]))
    resume = state / "torrents" / ih.hex() / "resume"
    record = bencodepy.decode(resume.read_bytes())
    assert record[b"fp_form"] == 2
    stamps = array.array("q", record[b"stamps"])
    stamps[4 * seg.file_index : 4 * seg.file_index + 4] = array.array("q", file_stamp(path))
    record[b"stamps"] = stamps.tobytes()
    old = b"".join(blake3(src.read(p, 0, src.layout.piece_size(p))).digest(FINGERPRINT_BYTES)
                   for p in range(n))  # every byte, pads as zeros, of the bytes verified
    old = old[: edited * 16] + blake3(good).digest(16) + old[edited * 16 + 16 :]
    record[b"fingerprints"] = old
    del record[b"fp_form"], record[b"crc"]
    record[b"crc"] = zlib.crc32(bencodepy.encode(record))
    resume.write_bytes(bencodepy.encode(record))

    again = DiskIO(state_dir=state)
    try:
        assert any("checked again" in e for e in again.load_errors), again.load_errors
        st = wait_reverified(again, ih)
        assert {p for p in range(n) if st["have"][p >> 3] & (0x80 >> (p & 7))} == set(
            range(n)) - {edited}
        t = again.torrent(ih)
        for p in set(range(n)) - {edited}:
            assert t.fingerprint(p) == src.fingerprint(p), p
            assert again.read_piece(ih, p) == src.read(p, 0, src.layout.piece_size(p)), p
        r = again.recheck(ih)
        assert r.fingerprint_hits == n - 1 and not r.have[edited]
    finally:
        again.close()
    record = bencodepy.decode(resume.read_bytes())
    assert record[b"fp_form"] == 2


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_hybrids_fingerprinted_pieces_are_read_as_far_as_their_stored_bytes(
        tmp_path: Path, backend: str) -> None:
    """A recheck by fingerprint reads a hybrid's piece as far as its stored bytes (a
    small file's piece is a few bytes and a pad to the piece's end): read whole, pads
    made as zeros, it cost ten times the BLAKE3 of the data with pieces of 16 MiB. A
    piece whose stored bytes changed is then read whole, and fails its SHA-1."""
    content = make_payload(tmp_path / "src", {"a.bin": 100_000, "b.bin": 3, "c.bin": 70_001},
                           seed=31)
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    stored = {p: sum(s.length for s in src.layout.map(p, 0, src.layout.piece_size(p)) if s.stored)
              for p in range(n)}
    padded = sorted(src.layout.padded_pieces())
    assert len(padded) >= 2
    dio = DiskIO(backend)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill(dio, ih, src)
        dio.flush_all()
        r = dio.recheck(ih)
        assert r.ok and r.fingerprint_hits == n
        assert r.bytes_hashed == sum(stored.values()) < src.meta.total_size
        bad = padded[0]  # (the end of a.bin, and a pad)
        dio.torrent(ih).storage.close_handles()
        with open(tmp_path / "dl" / "payload" / "a.bin", "r+b") as f:
            f.seek(bad * 65536 + 7)
            byte = f.read(1)
            f.seek(bad * 65536 + 7)
            f.write(bytes([byte[0] ^ 1]))
        r = dio.recheck(ih)
        assert r.failed_v1 == [bad] and r.fingerprint_hits == n - 1
        # (a piece checked whole counts whole)
        assert r.bytes_hashed == sum(stored.values()) - stored[bad] + src.layout.piece_size(bad)
    finally:
        dio.close()


def test_cli_recheck_full_and_fingerprinted(daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    tfile = daemon.root / "t.torrent"
    tfile.write_bytes(make_torrent_lt(content, 65536, "v1"))
    sock = ["--socket", str(daemon.socket)]

    def pieced(*args: str) -> dict[str, int]:
        r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", *args, "--json", *sock],
                           capture_output=True, text=True, cwd=daemon.root, timeout=60)
        assert r.returncode == 0, r.stderr
        out: dict[str, int] = json.loads(r.stdout)
        return out

    # add checks what is on disk: the first look, with the torrent's own hashes
    first = pieced("add", str(tfile), "--save-path", str(save))
    ih = str(first["info_hash"])
    assert first["fingerprint_hits"] == 0 and first["verified"] == first["num_pieces"]
    second = pieced("recheck", ih)
    assert second["fingerprint_hits"] == second["num_pieces"] == second["verified"]
    full = pieced("recheck", ih, "--full")
    assert full["fingerprint_hits"] == 0 and full["verified"] == full["num_pieces"]


LONG_FILES = {"a.bin": 3 * 2**20 + 12345, "b/c.bin": 700_000, "b/d": 1, "e.dat": 2**20}


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_runs_of_blocks_in_two_slices_give_each_piece_the_hashes_of_its_bytes(
        tmp_path: Path, kind: str) -> None:
    """The daemon merges the ring writes a client sent back to back into runs of up to
    a piece (``write_blocks_direct``). Runs of every length (16 KiB to a whole piece,
    some not on 16 KiB bounds, some running into pads), each in two slices cut anywhere
    (a ring's wrap): every piece is verified, with the fingerprint of its bytes."""
    save = tmp_path / "save"
    content = make_payload(save, LONG_FILES, seed=11)
    raw = make_torrent_lt(content, 2**20, kind)  # type: ignore[arg-type]
    src = Source(raw, save)
    rng = random.Random(kind)
    dio = DiskIO(sync_window=0.002)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        runs = 0
        ends: dict[int, int] = {}  # piece -> the end of its stored bytes
        for p, b, n in src.blocks():
            ends[p] = max(ends.get(p, 0), b + n)
        for p, end in ends.items():
            pos = 0
            while pos < end:
                n = min(end - pos, rng.choice((16384, 100_000, 262144, 300_001, 2**20)))
                data = bytearray(src.read(p, pos, n))
                cut = rng.randrange(n + 1)
                dio.write_blocks_direct(ih, p, pos, [memoryview(data)[:cut],
                                                     memoryview(data)[cut:]],
                                        -(-n // 16384), n)
                runs += n >= 256 * 1024
                pos += n
        dio.flush_all()
        assert runs >= 5
        t = dio.torrent(ih)
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        for p in range(src.meta.num_pieces):
            assert t.fingerprint(p) == src.fingerprint(p), p
        r = dio.recheck(ih)
        assert r.ok and r.fingerprint_hits == src.meta.num_pieces
    finally:
        dio.close()


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_a_piece_read_in_two_passes_keeps_the_fingerprint_of_the_pass_that_passed(
        tmp_path: Path, kind: str) -> None:
    """A piece over 4 MiB is read twice by a recheck whose fingerprint of it does not
    match: once for its fingerprint, once for its torrent hashes. Another program wrote
    the file between the two reads (here: a byte made bad, then put back right after the
    first read of it). The piece passes on the second read's bytes; it was given the
    first read's fingerprint, of bytes that never passed the hashes, and once the bad
    byte was back, a recheck took the piece for good by that fingerprint."""
    import os

    piece = 8 * 1024 * 1024
    save = tmp_path / "save"
    content = make_payload(save, {"big.bin": 2 * piece}, seed=29)
    raw = make_torrent_lt(content, piece, kind)
    big = content / "big.bin"
    at = piece - 100  # late in piece 0: in the second part of each read of it
    good = big.read_bytes()[at : at + 1]
    bad = bytes([good[0] ^ 0xFF])
    dio = DiskIO("posix", cache_bytes=0, roots=[tmp_path])
    fd = os.open(big, os.O_RDWR)
    try:
        ih = dio.register(raw, save)
        assert dio.recheck(ih, full=True).have == [True, True]  # fingerprints made
        os.pwrite(fd, bad, at)
        storage = dio.torrent(ih).storage
        plain = storage.readinto
        put_back: list[bool] = []

        def readinto(segments, out):  # type: ignore[no-untyped-def]
            plain(segments, out)
            if not put_back and any(s.file_offset <= at < s.file_offset + s.length
                                    for s in segments):
                os.pwrite(fd, good, at)  # the other program, between the two reads
                put_back.append(True)

        storage.readinto = readinto  # type: ignore[method-assign]
        result = dio.recheck(ih)
        storage.readinto = plain  # type: ignore[method-assign]
        assert put_back and result.have == [True, True]  # passed, on the good bytes
        os.pwrite(fd, bad, at)
        again = dio.recheck(ih)
        assert again.have == [False, True], "piece 0 taken for good with a bad byte"
        assert dio.recheck(ih, full=True).have == [False, True]
    finally:
        os.close(fd)
        dio.close()


SMALL_FILES = {"a.bin": 3 * 2**20 + 12345, "b/c.bin": 700_000, "b/d": 1, "b/e": 0,
               "f.dat": 2**20, "g/h.bin": 99_999, "g/i.bin": 2 * 2**20 + 1}


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_pieces_read_together_still_fail_one_by_one(
        tmp_path: Path, kind: str, backend: str) -> None:
    """A recheck reads small pieces in runs of several (up to 4 MiB in one read or one
    view) and falls back to reading them one by one when a run cannot be read. Bytes
    changed in one piece, a file deleted and a file cut short, all inside such runs:
    the recheck by fingerprint, and the full one, fail exactly the pieces libtorrent
    fails; every other piece keeps its fingerprint."""
    save = tmp_path / "save"
    content = make_payload(save, SMALL_FILES, seed=5)
    raw = make_torrent_lt(content, 16384, kind)  # type: ignore[arg-type]
    dio = DiskIO(backend, roots=[tmp_path])
    try:
        ih = dio.register(raw, save)
        first = dio.recheck(ih)
        n = len(first.have)
        assert first.ok and n > 400
        corrupt(content / "a.bin", 2**20 + 5)
        (content / "b" / "c.bin").unlink()
        with open(content / "g" / "i.bin", "r+b") as f:
            f.truncate(2**20 + 7)
        expected = [p for p, ok in enumerate(lt_recheck(raw, save)) if not ok]
        assert 50 < len(expected) < n - 100
        for full in (False, True):
            r = dio.recheck(ih, full=full)
            assert [p for p, ok in enumerate(r.have) if not ok] == expected, full
        again = dio.recheck(ih)
        assert again.fingerprint_hits == n - len(expected)
    finally:
        dio.close()


@pytest.mark.parametrize("backend", ["posix", "mmap"])
def test_a_recheck_of_small_pieces_reads_runs_of_them_not_each_alone(
        tmp_path: Path, backend: str) -> None:
    """Pieces of 16 KiB were read (and their reading advised) one by one: two read
    calls a piece, which cost more than hashing them (a fingerprint recheck of 2 GiB in
    pieces of 256 KiB took 0.54 s, against 0.35 s in pieces of 4 MiB). Now consecutive
    pieces are read together: a few calls per 4 MiB, pieces and files alike. (On mmap
    the fingerprint recheck hashes the mapped pages in place, and the full one, whose
    SHA-1 reads pages already in the page cache faster from a copy, reads them.)"""
    save = tmp_path / "save"
    content = make_payload(save, SMALL_FILES, seed=6)
    raw = make_torrent_lt(content, 16384, "hybrid")
    dio = DiskIO(backend, cache_bytes=0, roots=[tmp_path])

    def read_calls() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("syscr:")).split()[1])

    try:
        ih = dio.register(raw, save)
        assert dio.recheck(ih).ok  # (the first one gives the pieces their fingerprints)
        for full in (False, True):
            before = read_calls()
            r = dio.recheck(ih, full=full)
            calls = read_calls() - before
            assert r.ok and r.fingerprint_hits == (0 if full else r.num_pieces)
            print(f"full={full}: {r.num_pieces} pieces in {calls} read calls")
            assert calls < r.num_pieces / 8, (full, calls, r.num_pieces)
    finally:
        dio.close()


def test_a_check_long_in_one_percent_still_says_it_goes_on() -> None:
    """A check of a few terabytes on a slow disk spends minutes in one percent: told
    only when the percent changed, its client heard nothing meanwhile and took the
    daemon for stopped (pieced-peer says so after 30 s). While pieces are being done,
    an event goes at least every PROGRESS_BEAT seconds; when they come fast, at most
    one every PROGRESS_EVERY, and the last one always."""
    import itertools

    from pieced.daemon.server import PROGRESS_BEAT, PROGRESS_EVERY, ProgressPace

    total = 1_000_000  # pieces: ten thousand to a percent
    pace = ProgressPace()
    reports = [(i * 0.001, 5 * i) for i in range(1, 2001)]  # fast: 5 pieces a ms
    reports += [(2.0 + i, 10_000 + 10 * i) for i in range(1, 601)]  # slow: 10 a second
    reports.append((603.0, total))
    sent = [(now, done) for now, done in reports if pace.due(done, total, now)]
    assert sent[-1] == (603.0, total)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(sent)]
    assert min(gaps) >= PROGRESS_EVERY, min(gaps)
    slow = [b - a for (a, _), (b, _) in itertools.pairwise(sent) if a >= 2.0]
    assert max(slow) <= PROGRESS_BEAT, max(slow)  # (one event in 600 s before)
    assert len(sent) < 2 / PROGRESS_EVERY + 600 / PROGRESS_BEAT + 3, len(sent)


def test_recheck_progress_comes_about_ten_times_a_second_and_once_at_the_end(
        daemon: Daemon) -> None:
    """A recheck told its progress once a percent: a hundred events (each a wake-up of
    the event loop and of the client) in a fingerprint recheck of a quarter of a second.
    Now at most one per 0.1 s, and always the last one, of every piece."""
    import time

    from pieced.protocol.client import Client

    from tests.conftest import sparse_zero_torrent

    raw = sparse_zero_torrent(daemon.root / "data", "zeros.bin", 262144, 4096)  # 1 GiB
    seen: list[tuple[float, int, int]] = []

    def on_event(name: str, fields: dict[str, object]) -> None:
        if name == "recheck_progress":
            seen.append((time.monotonic(), int(fields["done"]), int(fields["total"])))  # type: ignore[call-overload]

    with Client(str(daemon.socket), on_event=on_event) as c:
        ih = c.register(raw, save_path=str(daemon.root / "data"))
        c.recheck(ih)  # (the first gives every piece its fingerprint)
        for full in (False, True):
            seen.clear()
            start = time.monotonic()
            result = c.recheck(ih, full=full)
            took = time.monotonic() - start
            assert result["verified"] == 4096
            print(f"full={full}: {len(seen)} events in {took:.2f} s")
            assert seen and seen[-1][1:] == (4096, 4096)
            assert [d for _, d, _ in seen] == sorted({d for _, d, _ in seen})
            assert len(seen) <= took / 0.1 + 2, (len(seen), took)
