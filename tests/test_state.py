"""Durable state: a restarted engine or daemon knows its torrents and verified pieces,
and after a crash every piece it reports verified really is on disk."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from pieced.protocol.client import Client
from pieced.storage import paths
from pieced.storage.disk import DiskIO, PieceResult
from pieced.storage.errors import PiecedError, StorageIOError
from pieced.storage.layout import Layout
from pieced.storage.metainfo import parse

from tests.conftest import STORES_NOTHING, Daemon, fill_up
from tests.realtools import corrupt, lt_recheck, make_payload, make_torrent_lt
from tests.test_disk import Source, fill

# Every test runs on each backend (``backend``, see conftest.py), but not on disabled: a
# restart finds no file behind its verified pieces, and forgets them.
pytestmark = pytest.mark.backends(exclude={"disabled": STORES_NOTHING})


def wait_reverified(dio: DiskIO, ih: bytes) -> dict:
    end = time.monotonic() + 30
    while (st := dio.status(ih))["reverifying_pieces"] and time.monotonic() < end:
        time.sleep(0.01)
    return st


def test_restart_knows_torrents_and_bits(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=0.005)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.rename_file(ih, 0, "renamed.bin")
    dio.close()

    again = DiskIO(backend, state_dir=tmp_path / "state")
    assert again.torrents() == [ih]
    st = again.status(ih)
    assert st["verified_pieces"] == src.meta.num_pieces and st["reverifying_pieces"] == 0
    assert st["files"][0]["path"] == "renamed.bin"
    assert again.read_chunk(ih, 0, 0, 100) == src.read(0, 0, 100)
    again.close()

    # A file changed behind the daemon's back: its pieces re-verify, the bad one stays out.
    corrupt(tmp_path / "dl" / "renamed.bin", 70000)
    third = DiskIO(backend, state_dir=tmp_path / "state")
    st = wait_reverified(third, ih)
    bad = 70000 // 65536
    assert st["verified_pieces"] == src.meta.num_pieces - 1
    assert not st["have"][bad >> 3] & (0x80 >> (bad & 7))
    third.unregister(ih)
    third.close()
    assert DiskIO(backend, state_dir=tmp_path / "state").torrents() == []


def test_a_crash_right_after_a_register_finds_a_whole_record(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon dies between the rename that puts a new torrent's state folder in
    place and its first save: the folder held no resume record, and the next start took
    it for a damaged one ("rebuilt from its journal") and looked for every piece of the
    files again, of a torrent registered with nothing. It is whole from the rename on."""
    _, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    monkeypatch.setattr(DiskIO, "_save", lambda self, t, rec, stamps=False: True)  # dies here
    ih = dio.register(raw, tmp_path / "dl")
    monkeypatch.undo()
    assert dio.state is not None
    dio.state.close()  # the state folder's lock, which goes with the process
    again = DiskIO(backend, state_dir=tmp_path / "state")  # (no close: as after kill -9)
    assert again.load_errors == []
    st = again.status(ih)
    assert st["verified_pieces"] == 0 and st["reverifying_pieces"] == 0
    again.close()


def test_crash_rounds(tmp_path: Path, odd_payload: tuple[Path, Path], backend: str) -> None:
    """SIGKILL the daemon mid-download, many times; after each restart every piece
    reported verified is byte-identical on disk, and the download can finish."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, save)
    rng = random.Random(42)
    dl = tmp_path / "dl"
    ih = b""
    survived = []
    for round_ in range(6):
        d = Daemon(tmp_path, backend=backend)
        with Client(d.socket) as c:
            if round_ == 0:
                ih = c.register(raw, dl)
            st = c.status(ih)
            while st["reverifying_pieces"]:
                time.sleep(0.02)
                st = c.status(ih)
            have = st["have"]
            verified = [p for p in range(src.meta.num_pieces) if have[p >> 3] & (0x80 >> (p & 7))]
            survived.append(len(verified))
            for p in verified:  # everything reported verified is really there
                size = src.layout.piece_size(p)
                assert src.read(p, 0, size) == _on_disk(src, dl, p), (round_, p)
            if round_ == 5:
                break
            todo = [b for b in src.blocks() if b[0] not in verified]
            rng.shuffle(todo)
            for p, b, n in todo[: rng.randint(5, max(6, len(todo) // 2))]:
                (c.write_block_direct if rng.random() < 0.5 else c.write_chunk)(ih, p, b, src.read(p, b, n))
            # (each block is a piece: at least one more is verified before the kill, also on
            # a machine so busy that the first group commit comes late; the rest are in flight)
            deadline = time.monotonic() + 30
            while c.status(ih)["verified_pieces"] <= len(verified) < src.meta.num_pieces:
                assert time.monotonic() < deadline, "no piece verified in 30 s"
                time.sleep(0.005)
            time.sleep(rng.random() * 0.05)
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait(10)
            with contextlib.suppress(ConnectionError):  # writes in flight died with it
                c.close()
    # Restarts keep (most of) what was verified before the kill: the test is not vacuous.
    assert survived[-1] > 0 and survived == sorted(survived), survived
    # finish the download after the last restart
    with Client(d.socket) as c:
        for p, b, n in src.blocks():
            c.write_chunk(ih, p, b, src.read(p, b, n))
        c.wait_writes()
        c.flush_all()
    assert d.stop() == 0
    assert all(lt_recheck(raw, dl))


def _on_disk(src: Source, save: Path, piece: int) -> bytes:
    out = bytearray()
    for s in src.layout.map(piece, 0, src.layout.piece_size(piece)):
        if not s.stored:
            out += bytes(s.length)
            continue
        with open(save.joinpath(*src.meta.files[s.file_index].path), "rb") as f:
            f.seek(s.file_offset)
            out += f.read(s.length).ljust(s.length, b"\0")
    return bytes(out)


def test_a_file_deleted_after_a_restart_loses_its_pieces(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    """A restarted engine knows which files it wrote in its earlier life: one deleted
    under it is reported (ENOENT) and its pieces lose their bits, even when a write
    re-creates it before anything reads it."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.close()

    again = DiskIO(backend, state_dir=tmp_path / "state")
    assert again.status(ih)["verified_pieces"] == src.meta.num_pieces
    big = max(range(len(src.meta.files)), key=lambda i: src.meta.files[i].length)
    lost = set(Layout(src.meta).file_pieces(big))
    (tmp_path / "dl").joinpath(*src.meta.files[big].path).unlink()
    # A write into the lost file re-creates it: that must not go unnoticed.
    p = min(lost)
    with pytest.raises(StorageIOError) as exc:
        again.clear_piece(ih, p)
        again.write_chunk(ih, p, 0, src.read(p, 0, 16384), flush=True)
    assert exc.value.errno == errno.ENOENT
    st = again.status(ih)
    for q in lost:
        assert not st["have"][q >> 3] & (0x80 >> (q & 7)), q
    assert any(e["errno"] == errno.ENOENT for e in st["errors"])
    again.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_record_that_still_says_all_is_not_written_again(tmp_path: Path, backend: str) -> None:
    """A stop wrote every torrent's record again, and so did a start, two fsyncs each:
    17,000 idle torrents took 16 s and more to stop. A record that would say what the
    one on disk says is left as it is (and its journal not rotated); one of a torrent
    that changed is written, and what each says holds across every start, a crash's
    too (the restart knows every piece verified, the one cleared not, nothing rehashed).
    (A torrent with an empty file is written each time: the file, made at each start,
    is stamped as written by the daemon while it runs, and as found at a stop.)"""
    content = make_payload(tmp_path / "src", {"a.bin": 200_000, "sub/b.bin": 70_001}, seed=8)
    save = content.parent
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    other_raw = make_torrent_lt(content, 16384, "v1")
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state, sync_window=0.005)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    other = dio.register(other_raw, save)  # its data there: found by its check
    dio.recheck(other)
    dio.close()

    def record(key: bytes) -> tuple[int, int]:
        st = os.stat(state / "torrents" / key.hex() / "resume")
        return st.st_ino, st.st_mtime_ns

    def verified(d: DiskIO, key: bytes) -> set[int]:
        have = d.status(key)["have"]
        return {p for p in range(len(have) * 8) if have[p >> 3] & (0x80 >> (p & 7))}

    whole = set(range(src.meta.num_pieces))
    others = set(range(parse(other_raw).num_pieces))
    for _ in range(2):  # idle: neither record written again, by the start or the stop
        before = record(ih), record(other)
        again = DiskIO(backend, state_dir=state)
        assert verified(again, ih) == whole and verified(again, other) == others
        again.close()
        assert (record(ih), record(other)) == before
    # A piece cleared: that record is written, by the stop; the other is not.
    before_other = record(other)
    again = DiskIO(backend, state_dir=state)
    again.clear_piece(other, 1)
    again.close()
    assert record(other) != before_other
    # A crash after a start that left a record as it was: what it says still holds.
    # (The other, a file of which is not whole now, is written by a start as by a
    # stop: stamped as found at a stop, by its inode alone while the daemon runs.)
    before_ih = record(ih)
    crashed = DiskIO(backend, state_dir=state)
    assert record(ih) == before_ih
    for key in (ih, other):
        crashed.torrent(key).storage.close_handles()
    assert crashed.state is not None
    crashed.state.close()
    last = DiskIO(backend, state_dir=state)
    try:
        assert verified(last, ih) == whole and verified(last, other) == others - {1}
        assert last.stats()["bytes_read"] == 0
        for p in whole:
            assert _on_disk(src, tmp_path / "dl", p) == src.read(p, 0, src.layout.piece_size(p))
    finally:
        last.close()


def test_journal_alone_restores_every_verified_piece(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    """No close, no save: what the journal holds (every announced piece) is what a
    restart reports, at once and without rehashing; concurrent compactions never tear it."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "hybrid")
    src = Source(raw, save)
    announced: list[int] = []
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=0.002,
                 on_piece=lambda r: r.ok and announced.append(r.piece))
    ih = dio.register(raw, tmp_path / "dl")
    blocks = src.peer_blocks()
    half = blocks[: len(blocks) // 2]
    threads = [threading.Thread(target=lambda k=k: [
        dio.write_chunk(ih, p, b, src.read(p, b, n)) for i, (p, b, n) in enumerate(half)
        if i % 3 == k]) for k in range(3)]
    saver = threading.Thread(target=lambda: [dio._save_now(dio.torrent(ih)) for _ in range(20)])
    for t in [*threads, saver]:
        t.start()
    for t in [*threads, saver]:
        t.join()
    dio._committer.drain()
    assert announced
    # the engine is dropped as a crash would drop it: no flush, no final save; only its
    # open files and maps go, as with the process (a map's lease would make this test's
    # own reads of the files below wait for lease-break-time: its SIGIO may be taken by
    # another thread while the main thread waits in open)
    dio.torrent(ih).storage.close_handles()
    assert dio.state is not None
    dio.state.close()  # the state folder's lock, which goes with the process
    again = DiskIO(backend, state_dir=tmp_path / "state")
    st = again.status(ih)
    have = {p for p in range(src.meta.num_pieces) if st["have"][p >> 3] & (0x80 >> (p & 7))}
    assert have == set(announced) and st["reverifying_pieces"] == 0
    assert again.stats()["bytes_read"] == 0  # nothing was rehashed
    for p in have:
        assert _on_disk(src, tmp_path / "dl", p) == src.read(p, 0, src.layout.piece_size(p))
    again.close()


def test_a_full_state_disk_loses_no_announced_piece(
    tmp_path: Path, tiny_fs: Path, backend: str
) -> None:
    """The state folder's disk fills up mid-download, then has room again. Appends to
    the journal fail meanwhile (those pieces are failed, not announced), and one of them
    leaves part of a record behind; every piece announced before and after must be
    there when the journal is replayed (a restart after a crash). A journal record
    appended after a torn one used to be lost with the pieces it announced: 254 of 400
    here."""
    import shutil

    from tests.realtools import make_payload

    content = make_payload(tmp_path / "src", 400 * 16384, seed=3)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    announced: set[int] = set()
    failed: list[int] = []
    dio = DiskIO(backend, state_dir=tiny_fs / "state",
                 on_piece=lambda r: announced.add(r.piece) if r.ok else failed.append(r.piece))
    ih = dio.register(raw, tmp_path / "dl")

    def write(pieces: list[int]) -> None:
        for p in pieces:
            for _, b, n in (blk for blk in src.blocks() if blk[0] == p):
                dio.write_chunk(ih, p, b, src.read(p, b, n))

    write(list(range(100)))  # the journal has records in its last page of the disk
    fill_up(tiny_fs)
    write(list(range(100, 200)))
    assert failed and len(announced) > 100  # some records fitted, then the disk was full
    os.unlink(tiny_fs / "filler")
    write([*failed, *range(200, 400)])
    assert len(announced) == src.meta.num_pieces
    # The state as a crash would leave it (everything appended was fdatasync'ed).
    shutil.copytree(tiny_fs / "state", tmp_path / "after")
    dio.torrent(ih).storage.close_handles()
    again = DiskIO(backend, state_dir=tmp_path / "after")
    st = again.status(ih)
    have = {p for p in range(src.meta.num_pieces) if st["have"][p >> 3] & (0x80 >> (p & 7))}
    assert have == announced and st["reverifying_pieces"] == 0
    again.close()


def test_a_stop_whose_records_cannot_be_saved_says_so(
    tmp_path: Path, tiny_fs: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The state folder's disk full at the stop: the records could not be written, the
    next start was to be a crash's (rightly), and the stop said nothing of it."""
    from tests.realtools import make_payload

    content = make_payload(tmp_path / "src", 8 * 16384, seed=5)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, state_dir=tiny_fs / "state")
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    # (a change since its record was last written: else the stop has nothing to save)
    dio.clear_piece(ih, 3)
    fill_up(tiny_fs)
    with caplog.at_level("WARNING", logger="pieced"):
        dio.close()
    said = [r.getMessage() for r in caplog.records if "could not be saved" in r.getMessage()]
    assert len(said) == 1 and ih.hex() in said[0], caplog.text
    os.unlink(tiny_fs / "filler")
    again = DiskIO(backend, state_dir=tiny_fs / "state")
    st = wait_reverified(again, ih)
    assert st["verified_pieces"] >= src.meta.num_pieces - 1 and st["have"][0] & 0x80
    again.close()


def test_a_flush_all_whose_pieces_could_not_be_journaled_says_so(
    tmp_path: Path, tiny_fs: Path, backend: str
) -> None:
    """Pieces committing when ``flush_all`` is called, the state folder's disk full: the
    group commit could not journal them, so they are not verified (told failed), and the
    error was the torrent's; but ``flush_all``, which waits for those commits, returned
    as if all were well. It raises the error. With room again, the pieces sent anew are
    verified and the next ``flush_all`` is quiet."""
    content = make_payload(tmp_path / "src", 200 * 16384, seed=4)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    told: list[tuple[int, bool]] = []
    dio = DiskIO(backend, state_dir=tiny_fs / "state", sync_window=60.0,
                 on_piece=lambda r: told.append((r.piece, r.ok)))
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill_up(tiny_fs)
        fill(dio, ih, src)  # every piece whole: committing, the window not over
        with pytest.raises(StorageIOError) as exc:
            dio.flush_all()
        assert exc.value.errno == errno.ENOSPC
        assert any(not ok for _, ok in told)
        assert _verified(dio.status(ih)) == {p for p, ok in told if ok}
        os.unlink(tiny_fs / "filler")
        again = sorted({p for p, ok in told if not ok} - {p for p, ok in told if ok})
        told.clear()
        for p, b, n in src.blocks():
            if p in again:
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert _verified(dio.status(ih)) == set(range(src.meta.num_pieces))
    finally:
        with contextlib.suppress(PiecedError):
            dio.close()


# A child process that registers and downloads a torrent, then dies (os._exit, as by
# kill -9) during a move or a rename: right after the ``die_after``-th file is moved.
def _dies(script: str, **fields: str) -> None:
    """Run ``script`` (its fields filled in, ``repo`` too) in a process of its own, which
    must die where the script means it to (status 9)."""
    import subprocess
    import sys

    head = "import json, os, sys\nfrom pathlib import Path\nsys.path[:0] = [{repo!r}]\n"
    r = subprocess.run([sys.executable, "-c", (head + script).format(
        repo=str(Path(__file__).resolve().parent.parent), **fields)],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr  # it died where it was meant to


_DIES_MOVING = """
from pieced.storage import files, paths
from pieced.storage.disk import DiskIO
from tests.test_disk import Source, fill
raw = Path({torrent!r}).read_bytes()
src = Source(raw, Path({src!r}))
dio = DiskIO({backend!r}, state_dir=Path({state!r}), sync_window=0.002)
ih = dio.register(raw, Path({old!r}))
fill(dio, ih, src)
dio.flush_all()
how, _, n = {how!r}.partition(":")
def die(*a, **k):
    os._exit(9)
if how == "after":  # the n-th file moved (its old name gone)
    moved = [0]
    real = paths.Beneath.drop
    def drop(self, *a, **k):
        real(self, *a, **k)
        moved[0] += 1
        if moved[0] == int(n):
            die()
    paths.Beneath.drop = drop
elif how == "link":  # the n-th file given its new name (the old ones all kept yet)
    linked = [0]
    real_link = paths.Beneath.link
    def link(self, *a, **k):
        real_link(self, *a, **k)
        linked[0] += 1
        if linked[0] == int(n):
            die()
    paths.Beneath.link = link
elif how == "recorded":  # where the files go is recorded; nothing made or moved yet
    files.FileStorage.move = die
    files.FileStorage.rename = die
    files.DisabledStorage.move = die
elif how == "linked":  # the first file has both names: linked, not yet unlinked
    paths.os.unlink = die
elif how == "copying":  # half of the first file copied to the other file system
    def half(fin, fout, size):
        os.sendfile(fout, fin, 0, size // 2)
        die()
    paths._copy_bytes = half
elif how == "undoing":  # every file copied over, the first one's old name gone, the
    drops = [0]         # second one's cannot go; half-way through copying the first
    real_drop = paths.Beneath.drop  # one back, the process dies
    real_copy = paths._copy_bytes
    def drop(self, *a, **k):
        drops[0] += 1
        if drops[0] == 2:
            raise OSError(13, "Permission denied")
        real_drop(self, *a, **k)
    def copy(fin, fout, size):
        if drops[0] >= 2:
            os.sendfile(fout, fin, 0, size // 2)
            die()
        real_copy(fin, fout, size)
    paths.Beneath.drop = drop
    paths._copy_bytes = copy
if {op!r} == "move":
    dio.move_storage(ih, Path({new!r}))
else:
    dio.rename_file(ih, 0, "renamed/first.bin")
os._exit(0)
"""


def _dies_moving(tmp_path: Path, backend: str, files: int, seed: int, new: Path, op: str,
                 how: str) -> tuple[Path, Source, Path]:
    """A hybrid torrent of ``files`` files in three folders, downloaded into
    ``tmp_path/old`` by a process that then dies part-way through a move to ``new`` (or
    a rename of its first file) as ``how`` says: (content, source, old save path)."""
    spec = {f"d{i % 3}/f{i}.bin": 20000 + 1000 * i for i in range(files)}
    content = make_payload(tmp_path / "src", spec, seed=seed)
    raw = make_torrent_lt(content, 16384, "hybrid")
    (tmp_path / "t.torrent").write_bytes(raw)
    old = tmp_path / "old"
    _dies(_DIES_MOVING, torrent=str(tmp_path / "t.torrent"), src=str(tmp_path / "src"),
          backend=backend, state=str(tmp_path / "state"), old=str(old), new=str(new), op=op,
          how=how)
    return content, Source(raw, tmp_path / "src"), old


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A file system of its own (a tmpfs), for moves across devices."""
    import subprocess

    mnt = tmp_path / "other_fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("op,how", [
    ("move", "after:7"), ("move", "after:1"), ("move", "link:3"), ("move", "recorded"),
    ("move", "linked"), ("move", "copying"), ("move", "undoing"), ("rename", "after:1"),
    ("rename", "linked")])
def test_a_crash_during_a_move_or_rename_keeps_every_verified_piece(
    tmp_path: Path, backend: str, op: str, how: str, request: pytest.FixtureRequest
) -> None:
    """The process dies part-way through a move_storage or a rename_file: after some
    files moved (before, the files already moved were taken for gone, with the verified
    pieces they held: 318 of 3,937 pieces in one case); once the move is recorded,
    before its folder is made (the restart could not open it, and every piece was
    lost); between the link of a file's new name and the unlink of its old one (the
    file kept two names, and was refused as a hard link); half-way through the copy of
    a file to another file system (the half copy was taken as moved); half-way through
    copying a file back while undoing a move that failed (the whole copy was deleted
    for the half one). A restart finishes the move: every file where it was going and
    nowhere else, every piece verified, the bytes right."""

    other = how in ("copying", "undoing")
    new = (request.getfixturevalue("other_fs") if other else tmp_path) / "new"
    _content, src, old = _dies_moving(tmp_path, backend, 12, 5, new, op, how)
    again = DiskIO(backend, state_dir=tmp_path / "state")
    ih = again.torrents()[0]
    st = again.status(ih)
    assert st["verified_pieces"] == src.meta.num_pieces and st["reverifying_pieces"] == 0
    assert st["save_path"] == str(new if op == "move" else old)
    # Nothing to say: the move was finished. (A crash before the new folder was made
    # was told as a save path not there, its verified pieces missing, as the same
    # start made the folder and moved the files into it.)
    assert again.load_errors == []
    where = new if op == "move" else old
    for i, f in enumerate(src.meta.files):
        if f.length and src.meta.files.stored(i):
            parts = ("renamed", "first.bin") if op == "rename" and i == 0 else f.path
            assert where.joinpath(*parts).read_bytes() == (tmp_path / "src").joinpath(
                *f.path).read_bytes()
            assert os.stat(where.joinpath(*parts)).st_nlink == 1
    for p in range(src.meta.num_pieces):  # every file usable (not refused as a hard link)
        assert again.read_piece(ih, p) == src.read(p, 0, src.layout.piece_size(p))
    if op == "move":
        assert not any(p.is_file() for p in old.rglob("*"))
    else:
        assert not old.joinpath(*src.meta.files[0].path).exists()
    assert again.recheck(ih, full=True).ok
    again.close()


@pytest.mark.parametrize("op,how,then", [
    ("move", "recorded", "blocked"), ("rename", "recorded", "blocked"),
    ("move", "link:1", "full"), ("move", "link:1", "read-only")])
def test_a_move_a_restart_cannot_finish_is_undone_and_keeps_every_verified_piece(
    tmp_path: Path, other_fs: Path, backend: str, op: str, how: str, then: str
) -> None:
    """The process dies part-way through a move or rename, and by the next start the
    place it was going to cannot take the files: a file now stands where a folder of it
    was to be (blocked), the file system is full, or read-only. The start used to load
    the torrent there all the same, take its files for gone and forget every verified
    piece for good (0 of 92 in one case), also once the place could take them again. Now
    the move is undone: the files go back where they were, and the torrent, every piece
    verified, stays there; when even that cannot be done (the file already moved cannot
    leave a read-only file system), the torrent is left as it is, not loaded, and a later
    start, once the place can take them, finishes the move with every piece."""
    new = other_fs / "new" if then != "blocked" else tmp_path / "new" / "deep"
    content, src, old = _dies_moving(tmp_path, backend, 6, 8, new, op, how)
    if then == "blocked":
        in_the_way = old / "renamed" if op == "rename" else tmp_path / "new"
        in_the_way.write_bytes(b"someone else's")
    elif then == "full":
        with contextlib.suppress(OSError):
            (other_fs / "filler").write_bytes(bytes(64 << 20))
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(other_fs)], check=True)

    def every_piece_at(where: Path, names: str) -> None:
        again = DiskIO(backend, state_dir=tmp_path / "state")
        try:
            ih = again.torrents()[0]
            st = again.status(ih)
            assert st["save_path"] == str(where), (st, again.load_errors)
            assert st["verified_pieces"] == src.meta.num_pieces, again.load_errors
            assert st["reverifying_pieces"] == 0
            for p in range(src.meta.num_pieces):
                assert again.read_piece(ih, p) == src.read(p, 0, src.layout.piece_size(p))
            assert again.status(ih)["files"][0]["path"] == names
        finally:
            again.close()

    first = src.meta.files.path(0)
    if then != "read-only":
        every_piece_at(old, "/".join((content.name, *first[1:])))
        if then == "blocked":
            assert in_the_way.read_bytes() == b"someone else's"
        return
    cut = DiskIO(backend, state_dir=tmp_path / "state")
    assert cut.torrents() == [] and any("could not be finished" in e for e in cut.load_errors)
    cut.close()
    subprocess.run(["mount", "-o", "remount,rw", str(other_fs)], check=True)
    every_piece_at(new, "/".join((content.name, *first[1:])))


@pytest.mark.parametrize("op", ["move", "move-across", "rename"])
@pytest.mark.parametrize("used", [False, True])
def test_files_the_daemon_moved_are_known_at_the_next_start(
    tmp_path: Path, other_fs: Path, backend: str, op: str, used: bool
) -> None:
    """A torrent loaded at a start (its files checked by their stamps then), its files
    read since (``used``) or not, moved or renamed by the daemon, then a clean stop: the
    next start reports every piece verified at once. The move gave the files a new change
    time (and, across devices, a new inode), and the stop's stamps said they were not
    the files known: every piece was checked again (all 184 of them, after a rename 61)."""
    _content, src, dio, ih = _filled_at_old(
        tmp_path, backend, {"a.bin": 300_000, "d/b.bin": 70_000, "c.bin": 50_000}, "v1", 9)
    dio.close()
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    if used:
        for p in range(src.meta.num_pieces):
            dio.read_piece(ih, p)
    if op == "rename":
        dio.rename_file(ih, 1, "elsewhere/b.bin")
    else:
        dio.move_storage(ih, (other_fs if op == "move-across" else tmp_path) / "new")
    dio.close()
    again = DiskIO(backend, state_dir=tmp_path / "state")
    st = again.status(ih)
    assert st["verified_pieces"] == src.meta.num_pieces and st["reverifying_pieces"] == 0, (
        st["verified_pieces"], again.load_errors)
    for p in range(src.meta.num_pieces):
        assert again.read_piece(ih, p) == src.read(p, 0, src.layout.piece_size(p))
    again.close()


def test_a_move_or_rename_through_a_file_is_refused_before_it_is_recorded(
    tmp_path: Path, backend: str
) -> None:
    """A move to a folder below a file, a rename into a folder that is a file: refused
    at once, nothing recorded, nothing moved (the move was recorded first, and refused
    half-way: a crash then left a restart to finish a move that could never be)."""
    _content, src, dio, ih = _filled_at_old(tmp_path, backend, {"a.bin": 100_000,
                                                              "b.bin": 50_000}, "v1", 10)
    (tmp_path / "blocker").write_bytes(b"x")
    (tmp_path / "old" / "junk").write_bytes(b"y")
    location = sorted((tmp_path / "state").rglob("location"))
    before = [f.read_bytes() for f in location]
    with pytest.raises(PiecedError):
        dio.move_storage(ih, tmp_path / "blocker" / "sub")
    with pytest.raises(StorageIOError) as exc:
        dio.rename_file(ih, 0, "junk/a.bin")
    assert exc.value.errno == errno.EEXIST
    assert [f.read_bytes() for f in location] == before
    st = dio.status(ih)
    assert st["save_path"] == str(tmp_path / "old")
    assert st["verified_pieces"] == src.meta.num_pieces
    assert (tmp_path / "blocker").read_bytes() == b"x"
    dio.close()


def test_a_move_to_a_folder_holding_one_of_the_names_is_refused_before_anything_moves(
    tmp_path: Path, backend: str
) -> None:
    """The new folder holds a file of one of the torrent's names: a stranger's, or one
    the torrent has not written yet. The move is refused (EEXIST) before any file moves
    or the move is recorded: a crash part-way through it used to leave a restart taking
    the stranger's file for the torrent's (its pieces verified, its bytes wrong), and a
    refused move was recorded as one to bring files back from, so that the next start
    took that folder's files for the torrent's missing ones."""
    from tests.realtools import make_payload

    spec = {"a.bin": 100_000, "b.bin": 100_000, "c.bin": 100_000}
    content = make_payload(tmp_path / "src", spec, seed=6)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    target = tmp_path / "target" / content.name
    target.mkdir(parents=True)
    stranger = b"USER DATA " * 10_000
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "old")
    for p, b, n in src.blocks():  # a.bin and b.bin only: c.bin is not made yet
        if p * 16384 + b < 200_000 - 16384:
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    before = dio.status(ih)["verified_pieces"]
    for name in ("c.bin", "b.bin"):  # one not written yet, one written
        (target / name).write_bytes(stranger)
        with pytest.raises(StorageIOError) as exc:
            dio.move_storage(ih, tmp_path / "target")
        assert exc.value.errno == errno.EEXIST
        assert sorted(p.name for p in target.iterdir()) == sorted({"c.bin", name})
        assert (tmp_path / "old" / content.name / "a.bin").exists()
    dio.close()
    again = DiskIO(backend, state_dir=tmp_path / "state")
    st = again.status(ih)
    assert st["save_path"] == str(tmp_path / "old") and st["verified_pieces"] == before
    assert (target / "b.bin").read_bytes() == stranger == (target / "c.bin").read_bytes()
    assert not (tmp_path / "old" / content.name / "c.bin").exists()
    again.close()


def _filled_at_old(tmp_path: Path, backend: str, files: dict[str, int], kind: str,
                   seed: int) -> tuple[Path, Source, DiskIO, bytes]:
    """A torrent of ``files`` (16 KiB pieces) registered at ``tmp_path/old`` with a
    state folder, every piece written and durable: (content, source, engine, ih)."""
    from tests.realtools import TorrentKind

    content = make_payload(tmp_path / "src", files, seed=seed)
    raw = make_torrent_lt(content, 16384, cast(TorrentKind, kind))
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "old")
    fill(dio, ih, src)
    dio.flush_all()
    return content, src, dio, ih


@pytest.mark.parametrize("op", ["move", "rename"])
def test_a_files_new_name_is_durable_before_its_old_one_goes(
        tmp_path: Path, backend: str, op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file moved into another folder has two folders to sync: its new name's and its
    old one's. Synced after both changes, in any order, a power cut between the two
    syncs could keep the unlink and lose the link (a file system that writes folders
    out in no set order does): the file under neither name, its verified pieces lost.
    Every new name's folder is fsynced before any old name goes."""
    content, _src, dio, ih = _filled_at_old(
        tmp_path, backend, {"a.bin": 40_000, "d/b.bin": 30_000, "e/c.bin": 20_000}, "v1", 12)
    log = _spied(monkeypatch, "fsync")
    real_unlink = os.unlink

    def unlink(path: str, *, dir_fd: int | None = None) -> None:
        if dir_fd is not None:
            log.append(f"unlink {os.readlink(f'/proc/self/fd/{dir_fd}')}/{path}")
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    if op == "rename":
        dio.rename_file(ih, 0, "zz/renamed.bin")
        new_folders = [str(tmp_path / "old" / "zz")]
    else:
        dio.move_storage(ih, tmp_path / "new")
        new_folders = [str(tmp_path / "new" / content.name / f) for f in ("", "d", "e")]
        new_folders[0] = new_folders[0].rstrip("/")
    unlinks = [i for i, e in enumerate(log) if e.startswith(f"unlink {tmp_path / 'old'}")]
    assert unlinks, log
    for folder in new_folders:
        assert folder in log[: unlinks[0]], (folder, log)
    dio.close()


def test_a_move_to_another_file_system(tmp_path: Path, other_fs: Path, backend: str) -> None:
    """A move across file systems copies the files (copy_file_range refuses file systems
    of two kinds, as ext4 and tmpfs: sendfile then), and the old ones go."""
    content, src, dio, ih = _filled_at_old(tmp_path, backend, {"a.bin": 300_000,
                                                              "d/b.bin": 70_000}, "hybrid", 7)
    dio.move_storage(ih, other_fs / "new")
    assert not any(p.is_file() for p in (tmp_path / "old").rglob("*"))
    for rel in ("a.bin", "d/b.bin"):
        assert (other_fs / "new" / content.name / rel).read_bytes() == (content / rel).read_bytes()
    assert dio.recheck(ih, full=True).ok
    assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    dio.close()


def test_a_move_to_another_file_system_keeps_the_holes_of_a_download(
        tmp_path: Path, other_fs: Path, backend: str) -> None:
    """A download just begun: a 1 GiB file with one piece written (the rest a hole). It
    was copied whole to the other file system, holes as zeros: 1 GiB there, and on this
    64 MiB one the move failed (ENOSPC) where 4 MiB of data fit. Only the data is
    copied; the file keeps its length."""
    from tests.conftest import sparse_zero_torrent

    piece = 4 * 1024 * 1024
    raw = sparse_zero_torrent(tmp_path / "src", "zeros.bin", piece, 256)
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    try:
        ih = dio.register(raw, tmp_path / "old")
        for begin in range(0, piece, 16384):
            dio.write_chunk(ih, 0, begin, bytes(16384))
        dio.flush_all()
        dio.move_storage(ih, other_fs / "new")
        moved = other_fs / "new" / "zeros.bin"
        assert moved.stat().st_size == 256 * piece
        assert moved.stat().st_blocks * 512 < 16 * 1024 * 1024, moved.stat().st_blocks
        assert dio.status(ih)["verified_pieces"] == 1
        assert dio.recheck(ih, full=True).have == [True] * 256  # (zeros, every one)
    finally:
        dio.close()


def test_a_move_to_a_full_file_system_says_which_file_and_where(
        tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    """A move to a file system without room fails and is undone; the error said only
    "move: No space left on device", naming neither the file nor where it went."""
    content, src, dio, ih = _filled_at_old(tmp_path, backend, {"a.bin": 400_000}, "v1", 9)
    try:
        with pytest.raises(StorageIOError) as exc:
            dio.move_storage(ih, tiny_fs / "new")
        assert exc.value.errno == errno.ENOSPC
        said = str(exc.value)
        assert f"{tmp_path / 'old' / content.name / 'a.bin'}" in said, said
        assert f"to {tiny_fs / 'new' / content.name / 'a.bin'}" in said, said
        assert "undone, the files are where they were" in said, said
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert (tmp_path / "old" / content.name / "a.bin").read_bytes() == (
            content / "a.bin").read_bytes()
    finally:
        dio.close()


def _downloaded_and_stopped(tmp_path: Path, odd_payload: tuple[Path, Path],
                            backend: str) -> tuple[Source, bytes]:
    """A v1 torrent of ``odd_payload`` downloaded into ``tmp_path/dl`` by an engine on
    ``tmp_path/state``, stopped cleanly: (its source, its info-hash)."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.close()
    return src, ih


def test_a_damaged_resume_record_is_rebuilt_from_the_journal(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    src, ih = _downloaded_and_stopped(tmp_path, odd_payload, backend)
    state = tmp_path / "state"
    folder = state / "torrents" / ih.hex()
    (folder / "resume").write_bytes(b"d4:have")  # torn beyond repair
    again = DiskIO(backend, state_dir=state)
    assert any("resume record" in e and "rechecking" in e for e in again.load_errors)
    st = wait_reverified(again, ih)
    # never the daemon's start folder: the location record still says where it is
    assert st["save_path"] == str((tmp_path / "dl").resolve())
    assert st["verified_pieces"] == src.meta.num_pieces
    again.close()

    (folder / "location").write_bytes(b"garbage")
    (folder / "resume").write_bytes(b"garbage")
    third = DiskIO(backend, state_dir=state)
    assert third.torrents() == []  # skipped, and said why
    assert any(ih.hex() in e and "location" in e for e in third.load_errors)
    third.close()
    assert (folder / "metainfo.torrent").exists()  # kept for the operator to look at


def test_a_metainfo_damaged_in_the_state_folder_is_not_taken_for_another_torrent(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    """One bit of a piece hash flipped in a state folder's metainfo.torrent: the metainfo
    still parsed, and was loaded as the torrent of another info_hash, its pieces called
    verified from the real one's record; the real torrent, added again, was a second one,
    and a removal of the phantom removed the real one's state folder. It is skipped now,
    saying why, and the real torrent can be added again."""
    src, ih = _downloaded_and_stopped(tmp_path, odd_payload, backend)
    state = tmp_path / "state"
    kept = state / "torrents" / ih.hex() / "metainfo.torrent"
    real = kept.read_bytes()
    raw = bytearray(real)
    raw[raw.index(b"6:pieces") + 20] ^= 1
    kept.write_bytes(raw)
    again = DiskIO(backend, state_dir=state)
    assert again.torrents() == []
    assert any(ih.hex() in e and "metainfo is damaged" in e for e in again.load_errors), \
        again.load_errors
    assert again.register(real, tmp_path / "dl") == ih
    again.close()
    third = DiskIO(backend, state_dir=state)
    assert third.torrents() == [ih] and third.load_errors == []
    assert third.status(ih)["num_pieces"] == src.meta.num_pieces
    third.close()


def test_a_removal_with_its_files_never_deletes_by_a_metainfo_of_another_torrent(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    """A removal with files that a crash cut short is finished at the next start by the
    metainfo in the torrent's state folder. Damaged into another torrent's (here: that
    of a torrent whose file lies in the same save path), it deleted that one's files."""
    _, ih = _downloaded_and_stopped(tmp_path, odd_payload, backend)
    other = make_payload(tmp_path / "dl", {"other.bin": 100_000}, seed=3)
    state = tmp_path / "state"
    folder = state / "torrents" / ih.hex()
    (folder / "metainfo.torrent").write_bytes(make_torrent_lt(other, 16384, "v1"))
    (folder / "delete-files").write_bytes(b"")  # as a removal with its files leaves it
    again = DiskIO(backend, state_dir=state)
    assert again.torrents() == []
    assert any(ih.hex() in e and "metainfo is damaged" in e for e in again.load_errors), \
        again.load_errors
    again.close()
    assert (other / "other.bin").stat().st_size == 100_000


@pytest.mark.parametrize("window", [0.0, 0.005])
def test_a_piece_is_announced_only_once_every_sync_of_its_files_has_returned(
    tmp_path: Path, backend: str, window: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Piece 3 has three blocks in a.bin and its last in b.bin. While another thread's
    sync of a.bin is still running (a slow disk, made here by holding that fdatasync
    back), the last block completes the piece: its commit must wait for that sync, which
    is what makes its first three blocks durable, not find a.bin clean and announce the
    piece (a power loss then would leave a verified piece without its bytes)."""
    pl = 65536
    content = make_payload(tmp_path / "src", {"a.bin": 3 * pl + 3 * 16384, "b.bin": 200_000},
                           seed=4)
    raw = make_torrent_lt(content, pl, "v1")
    src = Source(raw, content.parent)
    announced: list[int] = []
    dio = DiskIO(backend, sync_window=window, on_piece=lambda r: announced.append(r.piece))
    ih = dio.register(raw, tmp_path / "dl")
    blocks = {p: [(b, n) for q, b, n in src.blocks() if q == p] for p in (0, 3)}
    for b, n in blocks[0]:
        dio.write_block_direct(ih, 0, b, src.read(0, b, n))
    dio.flush_all()
    assert announced == [0]

    real, held, release = os.fdatasync, threading.Event(), threading.Event()

    def slow(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/a.bin") and not release.is_set():
            held.set()
            release.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    for b, n in blocks[3][:3]:
        dio.write_block_direct(ih, 3, b, src.read(3, b, n))
    flusher = threading.Thread(target=dio.flush_piece, args=(ih, 3))
    flusher.start()
    b, n = blocks[3][3]
    # (with no sync window the piece is committed by the call that completes it)
    last = threading.Thread(target=dio.write_block_direct, args=(ih, 3, b, src.read(3, b, n)))
    try:
        assert held.wait(30), "the flush never synced a.bin"
        last.start()
        time.sleep(0.5)
        assert announced == [0], "piece 3 announced while a.bin's sync had not returned"
    finally:
        release.set()
        flusher.join(30)
        if last.ident is not None:
            last.join(30)
    dio.flush_all()
    assert announced == [0, 3]
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_piece_completed_again_during_its_batchs_sync_waits_for_a_sync_of_its_own(
    tmp_path: Path, backend: str
) -> None:
    """Piece 0 passes and waits in the group commit; its batch syncs the file. Just as
    that sync has returned (the commit thread held there, as a busy machine may leave
    it), another client clears the piece and sends it again, a bad copy of its first
    block and then good ones, and it passes again. The batch must not journal and
    announce it: the new attempt's bytes came after the batch's sync, and a power cut
    then would leave a piece reported verified with the bad copy on disk. It is
    announced once a sync that began after its last write has returned."""
    content = make_payload(tmp_path / "src", 65536, seed=9)
    raw = make_torrent_lt(content, 32768, "v1")
    data = (tmp_path / "src" / "payload.bin").read_bytes()
    syncs = [0]  # syncs of the torrent's files begun
    announced: list[tuple[bool, int]] = []  # (ok, syncs begun when told)
    dio = DiskIO(backend, sync_window=0.02,
                 on_piece=lambda r: announced.append((r.ok, syncs[0])))
    ih = dio.register(raw, tmp_path / "dl")
    storage = dio.torrent(ih).storage
    real, held, release = storage.sync, threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        syncs[0] += 1
        done = real(*args, **kwargs)
        if threading.current_thread().name.startswith("pieced-commit") and not release.is_set():
            held.set()
            release.wait(30)
        return done

    storage.sync = slow  # type: ignore[method-assign]
    try:
        dio.write_block_direct(ih, 0, 0, data[:16384], writer=1)
        dio.write_block_direct(ih, 0, 16384, data[16384:32768], writer=1)
        assert held.wait(30), "the group commit never synced the payload"
        dio.clear_piece(ih, 0)
        dio.write_block_direct(ih, 0, 0, bytes(16384), writer=2)  # a bad copy...
        dio.write_block_direct(ih, 0, 0, data[:16384], writer=2)  # ...sent again
        last = dio.write_block_direct(ih, 0, 16384, data[16384:32768], writer=2)
        assert last is not None and last.ok
        written = syncs[0]
    finally:
        release.set()
    deadline = time.monotonic() + 30  # (no flush_all here: its own sync would come first)
    while not any(ok for ok, _ in announced) and time.monotonic() < deadline:
        time.sleep(0.005)
    verified = [n for ok, n in announced if ok]
    assert verified, announced
    assert verified[0] > written, (
        "piece 0 announced verified by a batch whose sync began before its last writes")
    assert dio.status(ih)["verified_pieces"] == 1
    dio.close()


def _spied(monkeypatch: pytest.MonkeyPatch, syscall: str) -> list[str]:
    """What happens, in order: the path of each file ``os.<syscall>`` is given, and each
    journal append (``journal [its pieces]``)."""
    from pieced.storage import resume

    log: list[str] = []
    real, real_append = getattr(os, syscall), resume.TorrentRecord.append
    monkeypatch.setattr(os, syscall, lambda fd: (
        log.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    monkeypatch.setattr(resume.TorrentRecord, "append", lambda self, recs: (  # (pieces only)
        log.append(f"journal {sorted(p for k, p, _ in recs if k != resume.REC_FILE)}"),
        real_append(self, recs))[1])
    return log


def test_a_state_folder_the_engine_makes_is_durable_before_anything_is_kept_in_it(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state folder (and the folders above it) made at start: each one's name was
    left to the file system's whim, and a power cut could take the folder whole, every
    registration and verified piece recorded in it. Each made folder's parent is
    fsynced once it is made, before the first record is written."""
    log = _spied(monkeypatch, "fsync")
    state = tmp_path / "a" / "b" / "state"
    dio = DiskIO(backend, state_dir=state)
    try:
        made = [str(f) for f in (tmp_path, tmp_path / "a", tmp_path / "a" / "b", state)]
        assert [p for p in log if p in made] == made, log  # (top down: each as it is made)
        ih = dio.register(make_torrent_lt(make_payload(tmp_path / "src", {"x": 5}), 16384,
                                          "v1"), tmp_path / "dl")
        assert dio.torrents() == [ih]
    finally:
        dio.close()


@pytest.mark.parametrize("op", ["register", "move"])
def test_save_folders_found_already_there_are_made_durable_before_they_are_relied_on(
        tmp_path: Path, backend: str, op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save path whose folders are there already (made by ``mkdir -p``, or by a
    daemon killed before it synced them) was used as it was: only the folders the
    daemon made itself were fsynced into their parents, and a power cut took the
    others with every piece announced in them. A register or a move now fsyncs every
    folder from the root down to the save path's parent, whoever made them; and a
    state folder's parents are synced at each start."""
    content = make_payload(tmp_path / "src", {"a.bin": 40_000}, seed=14)
    raw = make_torrent_lt(content, 16384, "v1")
    save = tmp_path / "x" / "y" / "save"
    save.mkdir(parents=True)  # (not synced: as mkdir -p leaves it)
    state = tmp_path / "s1" / "state"
    state.mkdir(parents=True)
    log = _spied(monkeypatch, "fsync")
    dio = DiskIO(backend, state_dir=state)
    try:
        assert str(tmp_path / "s1") in log and str(tmp_path) in log  # (the state's parents)
        log.clear()
        ih = dio.register(raw, tmp_path / "elsewhere" if op == "move" else save)
        if op == "move":
            log.clear()
            dio.move_storage(ih, save)
        for folder in (tmp_path, tmp_path / "x", tmp_path / "x" / "y"):
            assert str(folder) in log, (folder, log)
    finally:
        dio.close()


def _copied_in(tmp_path: Path, odd_payload: tuple[Path, Path],
             piece: int) -> tuple[bytes, Source, Path]:
    """A hybrid torrent of the payload (also in ``t.torrent``), and a copy of the payload
    in ``dl``, as a restart or files copied in would find it: (metainfo, source, dl)."""
    import shutil

    save, content = odd_payload
    raw = make_torrent_lt(content, piece, "hybrid")
    (tmp_path / "t.torrent").write_bytes(raw)
    shutil.copytree(save, tmp_path / "dl")
    return raw, Source(raw, save), tmp_path / "dl"


_DIES_RECHECKING = """
from pieced.storage import resume
from pieced.storage.disk import DiskIO
raw = Path({torrent!r}).read_bytes()
dio = DiskIO({backend!r}, state_dir=Path({state!r}))
ih = dio.register(raw, Path({save!r}))
def die(self, *a, **k):  # the recheck's resume save: its pieces already shown verified
    Path({seen!r}).write_text(json.dumps(dio.status(ih)["verified_pieces"]))
    os._exit(9)
resume.TorrentRecord.write_resume = die
dio.recheck(ih)
os._exit(0)
"""


def test_pieces_a_recheck_found_are_durable_before_they_are_shown_verified(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Data already on disk (a restart, files copied in): a recheck reports its pieces
    verified only once their files are fdatasynced (whoever wrote them) and the pieces
    journaled, as a download's are. Before, status showed them verified while only the
    resume record still to be written would remember them (a kill -9 then forgot them
    all), and no payload file was synced at all."""
    raw, src, dl = _copied_in(tmp_path, odd_payload, 65536)
    _dies(_DIES_RECHECKING, torrent=str(tmp_path / "t.torrent"), backend=backend,
          state=str(tmp_path / "state"), save=str(dl), seen=str(tmp_path / "seen"))
    assert int((tmp_path / "seen").read_text()) == src.meta.num_pieces
    again = DiskIO(backend, state_dir=tmp_path / "state")
    ih = again.torrents()[0]
    assert again.status(ih)["verified_pieces"] == src.meta.num_pieces  # at once
    st = wait_reverified(again, ih)  # (the recheck, cut short, carried out again)
    assert st["verified_pieces"] == src.meta.num_pieces and st["reverifying_pieces"] == 0
    again.unregister(ih)

    # in order: every payload file synced, then the pieces journaled
    order = _spied(monkeypatch, "fdatasync")
    ih = again.register(raw, dl)
    assert again.recheck(ih).ok
    journaled = order.index(f"journal {list(range(src.meta.num_pieces))}")
    stored = {str(dl.joinpath(*f.path)) for i, f in enumerate(src.meta.files)
              if f.length and src.meta.files.stored(i)}
    assert stored <= set(order[:journaled]), order
    again.close()


def test_the_names_of_new_files_and_moved_ones_are_durable_before_they_are_relied_on(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file's data made durable is not enough while its name can still be lost (a
    power loss then loses the file, and its verified pieces with it): the folders of the
    files and folders a download makes are fsynced before their pieces are journaled,
    and after a move, those the files left and went to before the new place is
    recorded."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    log = _spied(monkeypatch, "fsync")
    from pieced.storage import resume
    real_location = resume.TorrentRecord.write_location
    monkeypatch.setattr(resume.TorrentRecord, "write_location", lambda self, path, *a: (
        log.append(f"location {path}"), real_location(self, path, *a))[1])
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=0.002)
    dl = tmp_path / "dl" / "deeper"
    ih = dio.register(raw, dl)
    assert str(tmp_path / "dl") in log  # the save path's own name
    fill(dio, ih, src)
    dio.flush_all()

    def folders(root: Path, index: int) -> list[str]:
        """The folders a file's name lives in, from its own up to the save path."""
        path = root.joinpath(*src.meta.files[index].path)
        return [str(p) for p in path.parents if p.is_relative_to(root)]

    for i, f in enumerate(src.meta.files):
        if not f.length or not src.meta.files.stored(i):
            continue
        first = next(k for k, e in enumerate(log) if e.startswith("journal")
                     and set(src.layout.file_pieces(i)) & set(eval(e[8:])))
        assert set(folders(dl, i)) <= set(log[:first]), "\n".join(map(str, [f.path, *log]))
    new = tmp_path / "moved"
    del log[:]
    dio.move_storage(ih, new)
    last = max(k for k, e in enumerate(log) if e == f"location {new}")
    for i, f in enumerate(src.meta.files):
        if f.length and src.meta.files.stored(i):
            assert set(folders(new, i)) <= set(log[:last]), log
            assert str(dl.joinpath(*f.path).parent) in log[:last]
    dio.close()


_DIES_CHECKING = """
from pieced.storage import disk
raw = Path({torrent!r}).read_bytes()
dio = disk.DiskIO({backend!r}, state_dir=Path({state!r}))
ih = dio.register(raw, Path({save!r}))
real = disk.verify
def verify(meta, reader, pool, progress, *a, **k):
    def dying(done, total):
        if done * 2 >= total:
            os._exit(9)  # half-way through the check
    return real(meta, reader, pool, dying, *a, **k)
disk.verify = verify
dio.recheck(ih, full=True)
os._exit(0)
"""


def test_a_check_cut_short_by_a_crash_is_finished_after_the_restart(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    """The data is on disk; the process dies half-way through its recheck. Restarted,
    the daemon checks the files again by itself (a plugin that registered the torrent
    and asked for the check is told it is registered already, and would never ask
    again): every piece ends up verified, and a later restart has nothing to redo."""
    _raw, src, dl = _copied_in(tmp_path, odd_payload, 16384)
    _dies(_DIES_CHECKING, torrent=str(tmp_path / "t.torrent"), backend=backend,
          state=str(tmp_path / "state"), save=str(dl))
    again = DiskIO(backend, state_dir=tmp_path / "state")
    ih = again.torrents()[0]
    st = wait_reverified(again, ih)
    assert st["verified_pieces"] == src.meta.num_pieces and st["reverifying_pieces"] == 0
    again.close()
    third = DiskIO(backend, state_dir=tmp_path / "state")
    st = third.status(ih)
    assert st["verified_pieces"] == src.meta.num_pieces and st["reverifying_pieces"] == 0
    assert not list((tmp_path / "state").rglob("checking"))
    third.close()


def test_a_recheck_changes_nothing_it_reads(tmp_path: Path, backend: str) -> None:
    """A recheck makes the data it finds durable without writing to it: files on a
    read-only file system are checked (and then served) all the same, and a file cut
    short stays as it is, neither lengthened nor allocated (with ``preallocate``)."""
    import shutil
    import subprocess

    content = make_payload(tmp_path / "src", {"a.bin": 70_000, "sub/b.bin": 50_000}, seed=8)
    raw = make_torrent_lt(content, 16384, "hybrid")
    src = Source(raw, content.parent)
    dl = tmp_path / "dl"
    shutil.copytree(content.parent, dl)
    os.truncate(dl / "payload" / "a.bin", 40_000)
    dio = DiskIO(backend, preallocate=True)
    ih = dio.register(raw, dl)
    assert not dio.recheck(ih).ok
    assert (dl / "payload" / "a.bin").stat().st_size == 40_000
    assert 0 < dio.status(ih)["verified_pieces"] < src.meta.num_pieces
    dio.close()

    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ro)], check=True)
    try:
        shutil.copytree(content, ro / "payload")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        dio = DiskIO(backend)
        ih = dio.register(raw, ro)
        assert dio.recheck(ih).ok
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert dio.read_chunk(ih, 1, 0, 100, volatile=True) == src.read(1, 0, 100)
        dio.close()
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)


_DIES_WRITING = """
from pieced.storage.disk import DiskIO
from tests.test_disk import Source
raw = Path({torrent!r}).read_bytes()
src = Source(raw, Path({src!r}))
dio = DiskIO({backend!r}, state_dir=Path({state!r}), sync_window=60)
ih = dio.register(raw, Path({save!r}))
done = set()
for p, b, n in src.blocks():  # one block into every file: files and folders made
    for s in src.layout.map(p, b, n):
        if s.stored and s.file_index not in done:
            dio.write_chunk(ih, p, b, src.read(p, b, n), flush=False)
            done.add(s.file_index)
os._exit(9)  # nothing synced
"""


def test_names_made_by_a_process_that_died_are_synced_before_their_pieces_are_journaled(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The files and folders of a download were made by a daemon that died before it
    synced anything. Restarted, the daemon syncs their names too before it journals the
    pieces in them: it knows them as made by someone else, not as made by itself."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "v1")
    (tmp_path / "t.torrent").write_bytes(raw)
    src = Source(raw, save)
    dl = tmp_path / "dl"
    _dies(_DIES_WRITING, torrent=str(tmp_path / "t.torrent"), src=str(save), backend=backend,
          state=str(tmp_path / "state"), save=str(dl))
    log = _spied(monkeypatch, "fsync")
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=0.002)
    ih = dio.torrents()[0]
    fill(dio, ih, src)
    dio.flush_all()
    for i, f in enumerate(src.meta.files):
        if f.length and src.meta.files.stored(i):
            first = next(k for k, e in enumerate(log) if e.startswith("journal")
                         and set(src.layout.file_pieces(i)) & set(eval(e[8:])))
            path = dl.joinpath(*f.path)
            assert {str(p) for p in path.parents if p.is_relative_to(dl)} <= set(log[:first]), log
    assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    dio.close()


def test_a_rename_whose_name_cannot_be_made_durable_is_undone(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An I/O error syncing the folder of a renamed file: the rename fails and is undone,
    the file where the daemon says it is, its pieces still verified and read."""
    import errno

    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, save)
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/renamed"):
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StorageIOError):
        dio.rename_file(ih, 0, "renamed/first.bin")
    monkeypatch.setattr(os, "fsync", real_fsync)
    st = dio.status(ih)
    first = "/".join(src.meta.files[0].path)
    assert st["files"][0]["path"] == first
    assert st["verified_pieces"] == src.meta.num_pieces
    assert dio.read_chunk(ih, 0, 0, 1, volatile=True) == src.read(0, 0, 1)
    assert (tmp_path / "dl" / first).exists()
    dio.close()


def test_a_stop_cuts_a_recheck_short_and_the_restart_finishes_it(
    tmp_path: Path, backend: str
) -> None:
    """SIGTERM while a client's recheck of a large torrent runs: the daemon stops at once
    (cleanly, status 0) instead of when the recheck is done, the recheck's client is told
    why (ECANCELED: the reply reaches it before the daemon lets it go), and the restarted
    daemon carries the whole check out in the background: a verified piece gone bad is
    found, as the recheck would have."""
    from tests.conftest import sparse_zero_torrent

    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", 4 << 20, 2048)  # 8 GiB
    d = Daemon(tmp_path, backend=backend)
    outcome: list[BaseException | None] = []
    try:
        with Client(d.socket, timeout=120) as c:
            ih = c.register(raw, tmp_path / "dl")
            assert c.recheck(ih)["verified"] == 2048
        with open(tmp_path / "dl" / "zeros.bin", "r+b") as f:  # a verified piece goes bad
            f.seek(2000 * (4 << 20) + 5)
            f.write(b"\x01")

        def recheck() -> None:
            try:
                with Client(d.socket, timeout=120) as c:
                    c.recheck(ih, full=True)
                outcome.append(None)
            except (StorageIOError, OSError) as exc:
                outcome.append(exc)

        checker = threading.Thread(target=recheck)
        checker.start()
        time.sleep(1.0)
        assert checker.is_alive()  # (8 GiB take this machine several seconds)
        assert d.stop() == 0
        checker.join(60)
        assert outcome and isinstance(outcome[0], StorageIOError), outcome
        assert outcome[0].errno == errno.ECANCELED, outcome
        d = Daemon(tmp_path, backend=backend)
        with Client(d.socket) as c:
            st = c.status(ih, files=False)
            assert st["reverifying_pieces"] > 0, st  # carried out again, whole
            deadline = time.monotonic() + 120
            while (st := c.status(ih, files=False))["reverifying_pieces"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert st["verified_pieces"] == st["num_pieces"] - 1
            assert not st["have"][2000 >> 3] & (0x80 >> (2000 & 7))
    finally:
        assert d.stop() == 0, d.stderr()


class _WriteBackFails:
    """fdatasync as the kernel answers it when a write-back of a file failed: the error
    is told once, to the first fdatasync of the file to look (here: the first one of
    ``name`` after ``arm``), and every later one returns 0, the data still gone.
    ``hold``: that first call waits for ``release`` before it fails (a slow disk)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.name = name
        self.armed = False
        self.hold = False
        self.held, self.release = threading.Event(), threading.Event()
        self.real = os.fdatasync
        self.calls = 0
        self.second_after_first = False  # the second call returns after the first failed
        self.failed = threading.Event()
        monkeypatch.setattr(os, "fdatasync", self)

    def __call__(self, fd: int) -> None:
        if self.armed and os.readlink(f"/proc/self/fd/{fd}").endswith("/" + self.name):
            self.calls += 1
            if self.calls == 1:
                if self.hold:
                    self.held.set()
                    self.release.wait(30)
                self.failed.set()
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            if self.calls == 2 and self.second_after_first:
                self.failed.wait(30)
                time.sleep(0.2)  # the failed sync is over and gone
        self.real(fd)


def _lost_write_setup(
    tmp_path: Path, backend: str, window: float, monkeypatch: pytest.MonkeyPatch,
    slow_errors: bool = False,
) -> tuple[DiskIO, bytes, Source, dict[int, list[tuple[int, int]]], list[tuple[int, bool]],
           _WriteBackFails]:
    """Pieces 0-2 in a.bin, piece 3 in a.bin (three blocks) and b.bin (its last).
    ``slow_errors``: the error's report (``on_error``) takes a while, as a busy daemon's
    may: the pieces it takes back are taken back late."""
    pl = 65536
    content = make_payload(tmp_path / "src", {"a.bin": 3 * pl + 3 * 16384, "b.bin": 200_000},
                           seed=5)
    raw = make_torrent_lt(content, pl, "v1")
    src = Source(raw, content.parent)
    told: list[tuple[int, bool]] = []
    dio = DiskIO(backend, sync_window=window, on_piece=lambda r: told.append((r.piece, r.ok)),
                 on_error=(lambda *_: time.sleep(0.6)) if slow_errors else None)
    ih = dio.register(raw, tmp_path / "dl")
    blocks = {p: [(b, n) for q, b, n in src.blocks() if q == p] for p in range(4)}
    return dio, ih, src, blocks, told, _WriteBackFails(monkeypatch, "a.bin")


def _flushing(dio: DiskIO) -> threading.Thread:
    """``flush_all`` on a thread of its own (its error, the one injected, is expected)."""
    def flush() -> None:
        with contextlib.suppress(StorageIOError):
            dio.flush_all()

    flusher = threading.Thread(target=flush)
    flusher.start()
    return flusher


def _last_block_during_a_failing_flush(
    dio: DiskIO, ih: bytes, src: Source, blocks: dict[int, list[tuple[int, int]]], piece: int,
    fails: _WriteBackFails,
) -> None:
    """A flush whose fdatasync of a.bin is held, then fails; meanwhile the last block of
    ``piece`` completes it."""
    flusher = _flushing(dio)
    b, n = blocks[piece][3]
    last = threading.Thread(target=dio.write_block_direct,
                            args=(ih, piece, b, src.read(piece, b, n)))
    try:
        assert fails.held.wait(30), "the flush never synced a.bin"
        last.start()
        time.sleep(0.3)
    finally:
        fails.release.set()
        flusher.join(30)
        if last.ident is not None:
            last.join(30)


def _sent_again_verifies(dio: DiskIO, ih: bytes, src: Source, pieces: list[int],
                         told: list[tuple[int, bool]]) -> None:
    """The pieces sent again whole verify: the file is synced again, and what the
    status shows verified is on disk."""
    for p in pieces:
        dio.clear_piece(ih, p)
        for q, b, n in src.blocks():
            if q == p:
                dio.write_block_direct(ih, q, b, src.read(q, b, n))
    dio.flush_all()
    assert {p for p, ok in told if ok} >= set(pieces)
    st = dio.status(ih)
    for p in pieces:
        assert st["have"][p >> 3] & (0x80 >> (p & 7)), p
    dio.close()


def _many_files(tmp_path: Path, backend: str, n: int = 40
                ) -> tuple[DiskIO, bytes, Source, list[tuple[int, bool]]]:
    """A torrent of ``n`` small files (16 KiB pieces across them), registered."""
    content = make_payload(tmp_path / "src", {f"d{i % 3}/f{i:02d}.bin": 9000 + 700 * i
                                              for i in range(n)}, seed=9)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, content.parent)
    told: list[tuple[int, bool]] = []
    # (A window longer than the test: its flush commits every piece in one batch.)
    dio = DiskIO(backend, on_piece=lambda r: told.append((r.piece, r.ok)), sync_window=60)
    return dio, dio.register(raw, tmp_path / "dl"), src, told


def _payload_of(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_disk_whose_syncs_hang_holds_up_its_own_torrents_only(
        tmp_path: Path, other_fs: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Torrent A on a file system whose syncs hang (a USB disk spinning up, a network
    mount gone), B on another. One thread committed every torrent's pieces in turn, so
    B's pieces, written and hashed, were announced only once A's disk answered, and a
    flush_all of B's client waited for A's disk too. B's are announced and its flush
    returns while A's sync hangs; A's pieces are announced once it returns."""
    from pieced.storage import files

    going = threading.Event()  # set: A's disk answers again
    hanging = threading.Event()  # set: a sync of A's is hanging
    real_fdatasync, real_syncfs = os.fdatasync, files.syncfs

    def held(real):  # type: ignore[no-untyped-def]
        def sync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(other_fs)):
                hanging.set()
                assert going.wait(60)
            real(fd)
        return sync

    monkeypatch.setattr(os, "fdatasync", held(real_fdatasync))
    monkeypatch.setattr(files, "syncfs", held(real_syncfs))
    srcs, raws = {}, {}
    for name, seed in (("a", 1), ("b", 2)):
        content = make_payload(tmp_path / f"src_{name}", 16 * 16384, seed=seed)
        raws[name] = make_torrent_lt(content, 16384, "v1")
        srcs[name] = Source(raws[name], tmp_path / f"src_{name}")
    told: list[tuple[bytes, int, bool]] = []
    dio = DiskIO(backend, sync_window=0.005,
                 on_piece=lambda r: told.append((r.info_hash, r.piece, r.ok)))
    try:
        ih_a = dio.register(raws["a"], other_fs)
        ih_b = dio.register(raws["b"], tmp_path / "B")
        fill(dio, ih_a, srcs["a"])
        assert hanging.wait(10), "A's pieces were never committed"
        fill(dio, ih_b, srcs["b"])
        flushed = threading.Thread(target=dio.flush_all, kwargs={"raise_for": [ih_b]})
        flushed.start()
        flushed.join(20)
        assert not flushed.is_alive(), "B's flush_all waited for A's disk"
        assert sorted(p for ih, p, ok in told if ih == ih_b and ok) == list(range(16))
        assert not [p for ih, p, _ in told if ih == ih_a]  # (still committing)
        assert dio.status(ih_a)["verified_pieces"] == 0
        going.set()
        dio.flush_all()
        assert sorted(p for ih, p, ok in told if ih == ih_a and ok) == list(range(16))
        assert dio.status(ih_a)["verified_pieces"] == 16
    finally:
        going.set()
        dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("error", [False, True], ids=["clean", "write-back error"])
def test_a_sync_of_many_files_is_one_syncfs_and_still_tells_each_files_errors(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch, error: bool) -> None:
    """A sync of many files is one syncfs (one journal commit and cache flush, not one
    a file), then each file's write-back errors are collected from its descriptor:
    a write-back error of one file fails its pieces only, as its fdatasync's would."""
    from pieced.storage import files

    dio, ih, src, told = _many_files(tmp_path, backend)
    calls: dict[str, list[str]] = {"syncfs": [], "written_back": [], "fdatasync": []}
    real_syncfs, real_back, real_fdatasync = files.syncfs, files.written_back, os.fdatasync

    def spy_syncfs(fd: int) -> None:
        calls["syncfs"].append("")
        real_syncfs(fd)

    def spy_back(fd: int) -> None:
        name = _payload_of(fd)
        calls["written_back"].append(name)
        if error and name == "f07.bin" and calls["written_back"].count(name) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # told once, as the kernel does
        real_back(fd)

    def spy_fdatasync(fd: int) -> None:
        if _payload_of(fd).startswith("f"):
            calls["fdatasync"].append(_payload_of(fd))
        real_fdatasync(fd)

    monkeypatch.setattr(files, "syncfs", spy_syncfs)
    monkeypatch.setattr(files, "written_back", spy_back)
    monkeypatch.setattr(os, "fdatasync", spy_fdatasync)
    fill(dio, ih, src)
    if not error:
        dio.flush_all()
        # (the sync's; then the completion's, making the times its stamps record durable)
        assert len(calls["syncfs"]) == 2 and calls["fdatasync"] == []
        assert sorted(calls["written_back"]) == [f"f{i:02d}.bin" for i in range(40)]
        assert sorted(p for p, ok in told if ok) == list(range(src.meta.num_pieces))
        dio.close()
        return
    with pytest.raises(StorageIOError):
        dio.flush_all()
    layout = Layout(src.meta)
    lost = set(layout.file_pieces(next(i for i in range(40)
                                       if src.meta.files[i].path[-1] == "f07.bin")))
    good = {p for p, ok in told if ok}
    assert good == set(range(src.meta.num_pieces)) - lost, sorted(lost)
    _sent_again_verifies(dio, ih, src, sorted(lost), told)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_sync_of_many_files_on_a_fuse_file_system_is_a_fdatasync_of_each(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On FUSE, syncfs returns 0 and reaches nothing (and so does sync_file_range): the
    pieces of a sync of many files were announced verified with their bytes never made
    durable, and a power cut took them. The shortcut is taken only on the file systems
    known to make it good; elsewhere each file is fdatasynced."""
    import subprocess

    from pieced.storage import files

    fd = os.open(tmp_path, os.O_RDONLY)
    try:  # (the type is read right: as stat(1) reads it)
        here = subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)], check=True,
                              capture_output=True, text=True).stdout.strip()
        assert files.fs_type(fd) == int(here, 16)
    finally:
        os.close(fd)
    fuse = 0x65735546
    assert fuse not in files.SYNCFS_TYPES
    monkeypatch.setattr(files, "fs_type", lambda fd: fuse)
    dio, ih, src, told = _many_files(tmp_path, backend)
    calls: list[str] = []
    real_fdatasync = os.fdatasync

    def spy_fdatasync(fd: int) -> None:
        if _payload_of(fd).startswith("f"):
            calls.append(_payload_of(fd))
        real_fdatasync(fd)

    monkeypatch.setattr(files, "syncfs", lambda fd: calls.append("syncfs"))
    monkeypatch.setattr(files, "written_back", lambda fd: calls.append("written_back"))
    monkeypatch.setattr(os, "fdatasync", spy_fdatasync)
    fill(dio, ih, src)
    dio.flush_all()
    assert sorted(calls) == [f"f{i:02d}.bin" for i in range(40)]
    assert sorted(p for p, ok in told if ok) == list(range(src.meta.num_pieces))
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_files_on_another_file_system_than_the_save_path_are_fdatasynced(
        tmp_path: Path, backend: str, other_fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A syncfs makes the save path's file system durable, not one mounted on a folder
    of the torrent: the files there are fdatasynced each."""
    import subprocess

    mounted = tmp_path / "dl" / "payload" / "d1"
    mounted.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(other_fs), str(mounted)], check=True)
    try:
        dio, ih, src, told = _many_files(tmp_path, backend)
        synced: list[str] = []
        real = os.fdatasync

        def spy(fd: int) -> None:
            synced.append(_payload_of(fd))
            real(fd)

        monkeypatch.setattr(os, "fdatasync", spy)
        fill(dio, ih, src)
        dio.flush_all()
        assert sorted(p for p, ok in told if ok) == list(range(src.meta.num_pieces))
        # (d1 holds every third file: those, and only those, fdatasynced)
        assert sorted(n for n in synced if n.startswith("f")) == [
            f"f{i:02d}.bin" for i in range(40) if i % 3 == 1]
        dio.close()
    finally:
        subprocess.run(["umount", "-l", str(mounted)], check=True)


@pytest.mark.parametrize("window", [0.0, 0.005])
def test_a_sync_that_failed_is_not_made_good_by_the_next_one(
    tmp_path: Path, backend: str, window: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush's fdatasync of a.bin fails (a write-back error, on a slow disk) while
    piece 3 completes with its last block in b.bin. Its commit waits for that sync of
    a.bin, which holds its first three blocks; the sync failed, so the piece is not
    durable. It was synced again, the kernel (which tells a write-back error once)
    answered 0, and the piece was announced verified with its blocks lost."""
    dio, ih, src, blocks, told, fails = _lost_write_setup(tmp_path, backend, window, monkeypatch)
    for b, n in blocks[3][:3]:
        dio.write_block_direct(ih, 3, b, src.read(3, b, n))
    fails.armed = fails.hold = True
    _last_block_during_a_failing_flush(dio, ih, src, blocks, 3, fails)
    dio.flush_all()
    assert (3, True) not in told, "piece 3 announced verified though a.bin's sync failed"
    assert not dio.status(ih)["have"][0] & (0x80 >> 3)
    _sent_again_verifies(dio, ih, src, [3], told)


@pytest.mark.parametrize("window,order", [(0.0, "first"), (0.005, "first"), (0.0, "last"),
                                          (0.005, "last")])
def test_a_sync_beside_the_one_that_failed_fails_too(
    tmp_path: Path, backend: str, window: float, order: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two syncs of a.bin at once: the flush's, which the kernel tells of a write-back
    error, and the commit's of piece 1 (its last block was written to a.bin after the
    flush's sync began), which returns 0: the error was the other's to see. The
    commit's sync returns first (the failed one still running), or last (the failed
    one over and gone). The piece's first blocks may be what was lost: not verified."""
    dio, ih, src, blocks, told, fails = _lost_write_setup(tmp_path, backend, window, monkeypatch,
                                                          slow_errors=order == "last")
    for b, n in blocks[1][:3]:
        dio.write_block_direct(ih, 1, b, src.read(1, b, n))
    fails.armed = fails.hold = True
    fails.second_after_first = order == "last"
    _last_block_during_a_failing_flush(dio, ih, src, blocks, 1, fails)
    with contextlib.suppress(StorageIOError):
        dio.flush_all()
    assert (1, True) not in told, "piece 1 announced verified though a.bin's sync failed"
    _sent_again_verifies(dio, ih, src, [1], told)


def test_pieces_under_way_start_over_when_their_file_lost_writes(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three blocks of each of pieces 0-2 written to a.bin; its write-back fails (the
    flush is told EIO). Those blocks may be gone: the pieces start over (told failed,
    so that they are sent again), instead of verifying later with their last block
    over bytes that never reached the disk. Piece 3's, in memory, is dropped too."""
    dio, ih, src, blocks, told, fails = _lost_write_setup(tmp_path, backend, 0.0, monkeypatch)
    for p in range(3):
        for b, n in blocks[p][:3]:
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
    fails.armed = True
    with pytest.raises(StorageIOError) as exc:
        dio.flush_all()
    assert exc.value.errno == errno.EIO
    assert sorted(p for p, ok in told if not ok) == [0, 1, 2]
    for p in range(3):
        b, n = blocks[p][3]
        dio.write_block_direct(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    assert not any(ok for _, ok in told)
    assert dio.status(ih)["verified_pieces"] == 0
    _sent_again_verifies(dio, ih, src, [0, 1, 2], told)


def test_a_file_put_in_the_way_of_a_move_is_never_taken_for_the_torrents(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program writes a file of one of the torrent's names into the new folder
    while the move runs: the move meets it, fails and is undone whole. It was recorded
    as a move to bring files back from (any file of the torrent's names there taken for
    one the undo left behind), and the next start replaced the torrent's own file with
    the stranger's, its pieces verified over the stranger's bytes."""
    from pieced.storage import paths

    content, src, dio, ih = _filled_at_old(tmp_path, backend, {"a.bin": 100_000,
                                                              "b.bin": 100_000}, "v1", 8)
    stranger = b"NOT THE TORRENT'S " * 6000
    real = paths.Beneath.link

    def link(self: paths.Beneath, *a: object, **k: object) -> None:
        real(self, *a, **k)  # type: ignore[arg-type]
        (tmp_path / "new" / content.name / "b.bin").write_bytes(stranger)

    monkeypatch.setattr(paths.Beneath, "link", link)
    with pytest.raises(StorageIOError) as exc:
        dio.move_storage(ih, tmp_path / "new")
    assert exc.value.errno == errno.EEXIST
    monkeypatch.undo()
    dio.close()
    again = DiskIO(backend, state_dir=tmp_path / "state")
    st = again.status(ih)
    assert st["save_path"] == str(tmp_path / "old")
    assert st["verified_pieces"] == src.meta.num_pieces and st["reverifying_pieces"] == 0
    for p in range(src.meta.num_pieces):
        assert again.read_piece(ih, p) == src.read(p, 0, src.layout.piece_size(p))
    assert (tmp_path / "new" / content.name / "b.bin").read_bytes() == stranger
    again.close()


def _verified(st: dict) -> set[int]:
    return {p for p in range(len(st["have"]) * 8) if st["have"][p >> 3] & (0x80 >> (p & 7))}


def _crash_copy(dio: DiskIO, state: Path, to: Path, ih: bytes) -> DiskIO:
    """A new engine on a copy of ``state`` as it stands (every append was fdatasync'ed:
    what a crash leaves), ``dio`` left running."""
    import shutil

    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(state, to)
    dio.torrent(ih).storage.close_handles()  # (a map's lease would hold this test's reads)
    return DiskIO(dio.backend, state_dir=to)


def test_pieces_lost_while_stopped_and_not_recorded_at_the_start_never_come_back(
        tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    """After a crash, a file cut short while the daemon was down loses its pieces at the
    start; with the state disk full then, that could not be recorded, and nothing else
    held the pieces back: a block written into the file gave it its length again
    (zeros), and after the next crash the old record said its pieces were verified (12
    of 25 in the hunt that found it). They now take no block until recorded lost."""
    import shutil

    content = make_payload(tmp_path / "src", {"a.bin": 8 * 16384, "b.bin": 8 * 16384},
                           seed=12)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    first = DiskIO(backend, state_dir=tiny_fs / "a", sync_window=0.002)
    ih = first.register(raw, tmp_path / "dl")
    fill(first, ih, src)
    first.flush_all()
    assert first.status(ih)["verified_pieces"] == n
    shutil.copytree(tiny_fs / "a", tiny_fs / "b")  # a crash: no clean mark in the copy
    first.close()
    shutil.rmtree(tiny_fs / "a")
    os.truncate(tmp_path / "dl" / "payload" / "b.bin", 0)  # while the daemon is down
    fill_up(tiny_fs)
    second = DiskIO(backend, state_dir=tiny_fs / "b", sync_window=0.002)
    assert second.status(ih)["verified_pieces"] == n // 2  # b.bin's went, unrecorded
    last = n - 1
    with pytest.raises(StorageIOError) as exc:  # no room yet to record them lost
        second.write_chunk(ih, last, 0, src.read(last, 0, 16384), flush=True)
    assert exc.value.errno == errno.ENOSPC
    os.unlink(tiny_fs / "filler")  # room again: recorded, then written
    second.write_chunk(ih, last, 0, src.read(last, 0, 16384), flush=True)
    second.flush_all()
    assert (tmp_path / "dl" / "payload" / "b.bin").stat().st_size == 8 * 16384
    third = _crash_copy(second, tiny_fs / "b", tmp_path / "c", ih)
    try:
        st = wait_reverified(third, ih)
        third.torrent(ih).storage.close_handles()
        for p in _verified(st):
            assert _on_disk(src, tmp_path / "dl", p) == src.read(p, 0, 16384), p
        assert _verified(st) >= set(range(n // 2)) | {last}
    finally:
        third.close()
        second.close()


def test_a_second_engine_on_one_state_folder_is_refused_before_it_touches_it(
        tmp_path: Path, backend: str) -> None:
    """A second daemon started on the same state folder (by mistake, or with its own
    socket) used to load it, compact the first one's journals away under it and remove
    its clean mark: the pieces the first announced after that were lost at its next
    crash (10 of 20). It is refused now, before it reads or changes anything; the
    folder is free again once the first is closed."""
    from pieced.storage.resume import StateInUse

    content = make_payload(tmp_path / "src", 20 * 16384, seed=8)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state, sync_window=0.002)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    before = sorted(os.listdir(state / "torrents" / ih.hex()))
    with pytest.raises(StateInUse, match="in use by another pieced daemon"):
        DiskIO(backend, state_dir=state)
    # The lock file deleted under the first (a cleaner of stale files) is no way in:
    # the folder itself is held.
    (state / "lock").unlink()
    with pytest.raises(StateInUse, match="in use by another pieced daemon"):
        DiskIO(backend, state_dir=state)
    assert sorted(os.listdir(state / "torrents" / ih.hex())) == before
    dio.close()
    again = DiskIO(backend, state_dir=state)
    assert again.status(ih)["verified_pieces"] == src.meta.num_pieces
    again.close()


@pytest.mark.parametrize("how", ["socket_group", "not_a_socket", "http_port"])
def test_a_start_refused_leaves_the_state_as_the_stop_before_left_it(
        tmp_path: Path, how: str) -> None:
    """A clean stop, then a start refused after the state was loaded (a socket_group
    that does not exist, a file where the socket goes, the HTTP port taken): the engine
    was left open, its state marked in use, so the next start took it for a crash's and
    trusted the files without their stamps: a file replaced while stopped (same size,
    other bytes) kept its pieces verified, and served. The refused start leaves the state
    as the clean stop did; the next start checks that file."""
    content = make_payload(tmp_path / "src", {"a.bin": 8 * 16384, "b.bin": 8 * 16384}, seed=9)
    raw = make_torrent_lt(content, 16384, "v1")
    save = tmp_path / "dl"
    d = Daemon(tmp_path)
    with Client(d.socket) as c:
        ih = c.register(raw, save)
        shutil.copytree(content, save / content.name)
        assert c.recheck(ih)["verified"] == 16
    assert d.stop() == 0
    env, extra = dict(os.environ), []
    taken = socket.socket()
    try:
        if how == "socket_group":
            env["PIECED_SOCKET_GROUP"] = "no-such-group-here"
        elif how == "not_a_socket":
            d.socket.write_text("not a socket")
        else:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            extra = ["--http-port", str(taken.getsockname()[1])]
        r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0",
                            *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and "pieced:" in r.stderr, r.stderr
    finally:
        taken.close()
    if how == "not_a_socket":
        d.socket.unlink()
    b = save / content.name / "b.bin"
    new = b.with_name("b.new")
    new.write_bytes(os.urandom(b.stat().st_size))
    os.replace(new, b)
    again = Daemon(tmp_path)
    try:
        with Client(again.socket) as c:
            end = time.monotonic() + 30
            while (st := c.status(ih))["reverifying_pieces"] and time.monotonic() < end:
                time.sleep(0.02)
            good = lt_recheck(raw, save)
            have = [bool(st["have"][p >> 3] & (0x80 >> (p & 7))) for p in range(16)]
            assert [p for p in range(16) if have[p] and not good[p]] == [], \
                "pieces of a file replaced while stopped still verified"
            assert st["verified_pieces"] == 8
    finally:
        assert again.stop() == 0, again.stderr()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_short_file_keeps_the_pieces_before_its_end_across_a_restart(
        tmp_path: Path, backend: str) -> None:
    """A file shorter than its length (another client's partial download) keeps the
    pieces a check found before its end, as in libtorrent. After a restart it was taken
    for a file at its length: its first read said it had been cut behind pieced's back
    (ENOENT) and dropped every verified piece of it."""
    content = make_payload(tmp_path / "src", {"a.bin": 4 * 16384, "b.bin": 8 * 16384}, seed=7)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, content.parent)
    save = tmp_path / "dl"
    (save / content.name).mkdir(parents=True)
    shutil.copy(content / "a.bin", save / content.name / "a.bin")
    (save / content.name / "b.bin").write_bytes((content / "b.bin").read_bytes()[: 5 * 16384])
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, save)
    dio.recheck(ih)
    assert dio.status(ih)["verified_pieces"] == 9
    dio.close()
    again = DiskIO(backend, state_dir=tmp_path / "state")
    assert wait_reverified(again, ih)["verified_pieces"] == 9
    for p in range(9):
        assert again.read_chunk(ih, p, 0, 16384) == src.read(p, 0, 16384)
    assert again.status(ih)["verified_pieces"] == 9
    for p, b, n in src.blocks():  # and the rest completes it
        if p >= 9:
            again.write_chunk(ih, p, b, src.read(p, b, n))
    again.flush_all()
    assert again.status(ih)["verified_pieces"] == 12
    again.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("back", ["at_the_next_start", "during_the_run_changed"])
def test_a_save_folder_not_there_at_a_start_loses_no_verified_piece(
        tmp_path: Path, backend: str, back: str) -> None:
    """A start while the torrent's save folder is not there (its disk not mounted yet):
    every file was taken for deleted, its pieces dropped and the record saved so: when
    the disk came back, nothing was verified any more. They are missing for the run,
    and the record keeps a check under way: the first start that finds the folder finds
    them again. A folder that comes back during the run, a file of it changed meanwhile,
    is not taken on trust either: that file's pieces fail the check."""
    content = make_payload(tmp_path / "src", {"a.bin": 4 * 16384, "b.bin": 8 * 16384}, seed=8)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, content.parent)
    mount = tmp_path / "disk"
    save = mount / "dl"
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, save)
    fill(dio, ih, src)
    dio.flush_all()
    dio.close()
    mount.rename(tmp_path / "away")
    absent = DiskIO(backend, state_dir=tmp_path / "state")
    assert absent.status(ih)["verified_pieces"] == 0
    assert any("is not there" in e for e in absent.load_errors), absent.load_errors
    if back == "during_the_run_changed":
        (tmp_path / "away").rename(mount)
        b = save / content.name / "b.bin"
        b.write_bytes(bytes(b.stat().st_size))  # same size, other bytes
        assert absent.status(ih)["verified_pieces"] == 0  # (not taken on trust now)
    absent.close()
    if back == "at_the_next_start":
        assert not mount.exists()  # nothing made where the disk goes
        (tmp_path / "away").rename(mount)
    again = DiskIO(backend, state_dir=tmp_path / "state")
    st = wait_reverified(again, ih)
    good = lt_recheck(raw, save)
    have = [p for p in range(12) if st["have"][p >> 3] & (0x80 >> (p & 7))]
    assert [p for p in have if not good[p]] == []
    assert len(have) == (12 if back == "at_the_next_start" else 4)
    assert again.read_chunk(ih, 3, 0, 16384) == src.read(3, 0, 16384)
    again.close()


def test_a_second_daemon_on_one_state_folder_says_why_and_costs_the_first_nothing(
        tmp_path: Path) -> None:
    """The same with real daemons, the second on a socket of its own: it exits saying
    why, and everything the first announces after it survives the first's kill -9."""
    content = make_payload(tmp_path / "src", 20 * 16384, seed=9)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    blocks = src.blocks()
    first = Daemon(tmp_path)
    try:
        with Client(first.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            for p, b, n in blocks[: len(blocks) // 2]:
                c.write_chunk(ih, p, b, src.read(p, b, n))
            c.flush_all()
            with pytest.raises(RuntimeError, match="in use by another pieced daemon"):
                Daemon(tmp_path, env={"PIECED_SOCKET": str(tmp_path / "other.sock")})
            for p, b, n in blocks[len(blocks) // 2 :]:
                c.write_chunk(ih, p, b, src.read(p, b, n))
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == src.meta.num_pieces
        first.proc.kill()
        first.proc.wait()
        again = Daemon(tmp_path)
        with Client(again.socket) as c:
            assert c.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert again.stop() == 0
    finally:
        first.proc.kill()


def test_a_block_that_changes_a_piece_a_torrent_sharing_its_file_verified_waits_for_its_record(
        tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    """A v1 and a hybrid torrent of one file; the v1 complete, then the state folder's
    disk full; a bad block written for the hybrid, into a piece the v1 has verified.
    The record that the v1's piece is verified no more could not be written, and the
    block was written all the same: after a crash (or a clean stop) the v1's piece
    came back verified over the bad bytes. The write is now refused (ENOSPC) and
    changes nothing; with room again, it goes, and the v1's piece with it."""
    content = make_payload(tmp_path / "src", 16 * 65536, seed=12)
    raw_a = make_torrent_lt(content, 65536, "v1")
    raw_b = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw_a, tmp_path / "src")
    n = src.meta.num_pieces
    state = tiny_fs / "state"
    dio = DiskIO(backend, state_dir=state, sync_window=0.002)
    a = dio.register(raw_a, tmp_path / "dl")
    b = dio.register(raw_b, tmp_path / "dl")
    assert dio.torrent(a).shared
    fill(dio, a, src)
    dio.flush_all()
    assert _verified(dio.status(a)) == set(range(n))
    fill_up(tiny_fs)
    bad = bytes(x ^ 0x5A for x in src.read(3, 16384, 16384))
    refused = []
    for at in range(0, 65536, 16384):
        try:
            dio.write_block_direct(b, 3, at, bad if at == 16384 else src.read(3, at, 16384))
        except StorageIOError as exc:
            refused.append((at, exc.errno))
    with contextlib.suppress(StorageIOError):
        dio.flush_all()
    if not dio.torrent(b).storage.gathers_writes:  # (else the bad piece is never written)
        assert refused == [(16384, errno.ENOSPC)]
    assert _on_disk(src, tmp_path / "dl", 3) == src.read(3, 0, 65536), "the bad block landed"

    def truth(engine: DiskIO) -> set[int]:
        st = wait_reverified(engine, a)
        engine.torrent(a).storage.close_handles()
        for p in _verified(st):
            assert _on_disk(src, tmp_path / "dl", p) == src.read(p, 0, 65536), p
        return _verified(st)

    crashed = _crash_copy(dio, state, tmp_path / "crash1", a)
    assert truth(crashed) == set(range(n))
    crashed.close()
    os.unlink(tiny_fs / "filler")  # room again: the bad block goes, and the v1's piece
    dio.write_block_direct(b, 3, 16384, bad)
    dio.flush_all()
    crashed = _crash_copy(dio, state, tmp_path / "crash2", a)
    truth(crashed)
    crashed.close()
    assert _on_disk(src, tmp_path / "dl", 3) != src.read(3, 0, 65536)
    assert truth(dio) == set(range(n)) - {3}
    dio.close()


def test_pieces_cleared_while_the_state_disk_is_full_never_come_back_verified(
        tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    """While the state folder's disk is full, the record that a piece is verified no
    more cannot be written. ``clear_piece`` then fails and changes nothing; a piece
    whose file vanished, or that a recheck found bad, is not verified any more in
    memory, and takes no block until the record is written (a block written into it
    would otherwise come back verified, over the new bytes, after a crash: that
    happened for all three). Once there is room again, the download finishes, and a
    crash at any point reports only pieces whose bytes are right."""
    import shutil

    content = make_payload(tmp_path / "src", {"a.bin": 12 * 16384, "b.bin": 12 * 16384},
                           seed=10)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    state = tiny_fs / "state"
    dio = DiskIO(backend, state_dir=state, sync_window=0.002)
    ih = dio.register(raw, tmp_path / "dl")
    for p, b, k in src.blocks():
        if p != n - 1:  # the last piece waits
            dio.write_chunk(ih, p, b, src.read(p, b, k))
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] == n - 1
    fill_up(tiny_fs)
    dio._save_now(dio.torrent(ih))  # fails (no room), and the journal starts a new file
    assert dio.status(ih)["errors"]

    # clear_piece: refused, nothing changed.
    with pytest.raises(StorageIOError) as exc:
        dio.clear_piece(ih, 3)
    assert exc.value.errno == errno.ENOSPC
    assert _verified(dio.status(ih)) == set(range(n - 1))
    # A file deleted behind our back (seen by the next write): its pieces are gone, and
    # take no block meanwhile.
    dl = tmp_path / "dl" / "payload"
    os.unlink(dl / "b.bin")
    with pytest.raises(StorageIOError) as exc:
        dio.write_chunk(ih, n - 1, 0, src.read(n - 1, 0, 16384), flush=True)
    assert exc.value.errno == errno.ENOENT
    gone = set(range(n)) - _verified(dio.status(ih))
    assert len(gone) > 1 and all(p >= 11 for p in gone)
    first = min(gone)
    for p in (first, n - 1):  # nor does a piece never verified: it would make the file
        with pytest.raises(StorageIOError) as exc:  # anew at its length, zeros under
            dio.write_chunk(ih, p, 0, src.read(p, 0, 16384))  # the others
        assert exc.value.errno == errno.ENOSPC
    assert not (dl / "b.bin").exists()  # nothing was written
    # A recheck that finds a piece bad (room for its mark that a check is under way, one
    # page, and none for the journal after it).
    os.truncate(tiny_fs / "filler", os.path.getsize(tiny_fs / "filler") - 4096)
    dio.torrent(ih).storage.close_handles()  # (a map's lease would hold this test's open)
    corrupt(dl / "a.bin", 5 * 16384 + 100)
    result = dio.recheck(ih, full=True)
    assert 5 in result.failed_v1
    assert 5 not in _verified(dio.status(ih))
    with pytest.raises(StorageIOError):
        dio.write_chunk(ih, 5, 0, src.read(5, 0, 16384))

    def truth(engine: DiskIO) -> None:
        st = wait_reverified(engine, ih)
        engine.torrent(ih).storage.close_handles()
        for p in _verified(st):
            assert _on_disk(src, tmp_path / "dl", p) == src.read(p, 0, src.layout.piece_size(p)), p

    crashed = _crash_copy(dio, state, tmp_path / "crash1", ih)
    truth(crashed)
    crashed.close()
    # Room again: the pieces take their blocks, the download finishes.
    os.unlink(tiny_fs / "filler")
    for p, b, k in src.blocks():
        if p in gone or p == 5:
            dio.write_chunk(ih, p, b, src.read(p, b, k))
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] == n
    crashed = _crash_copy(dio, state, tmp_path / "crash2", ih)
    truth(crashed)
    assert wait_reverified(crashed, ih)["verified_pieces"] == n
    crashed.close()
    dio.close()
    shutil.rmtree(state)


def test_a_crash_while_a_torrent_is_removed_does_not_bring_it_back(
        tmp_path: Path, backend: str) -> None:
    """A kill -9 part-way through deleting a removed torrent's state folder left a
    folder that the restart loaded (without its resume record: checked again, and all
    its pieces verified): the torrent came back. The folder is renamed out of the way
    first now, in one step."""
    content = make_payload(tmp_path / "src", 6 * 16384, seed=11)
    raw = make_torrent_lt(content, 16384, "v1")
    (tmp_path / "t.torrent").write_bytes(raw)
    _dies("""
import shutil
from pieced.storage import resume
from pieced.storage.disk import DiskIO
from tests.test_disk import Source, fill
raw = Path({torrent!r}).read_bytes()
dio = DiskIO({backend!r}, state_dir=Path({state!r}))
ih = dio.register(raw, Path({dl!r}))
fill(dio, ih, Source(raw, Path({src!r})))
dio.flush_all()
def die(path, *a, **k):
    os.unlink(os.path.join(path, "resume"))  # the first of its files deleted, then killed
    os._exit(9)
resume.shutil.rmtree = die
dio.unregister(ih)
""", torrent=str(tmp_path / "t.torrent"), backend=backend, state=str(tmp_path / "state"),
          dl=str(tmp_path / "dl"), src=str(tmp_path / "src"))
    again = DiskIO(backend, state_dir=tmp_path / "state")
    assert again.torrents() == [] and again.load_errors == []
    assert os.listdir(tmp_path / "state" / "torrents") == []
    again.close()


_DIES_REGISTERING = """
from pieced.storage import resume
from pieced.storage.disk import DiskIO
raw = Path({torrent!r}).read_bytes()
dio = DiskIO({backend!r}, state_dir=Path({state!r}))
how = {how!r}
def die(*a, **k):
    os._exit(9)
if how == "deleting":  # a removal with the files: its folder's deletion cut short
    from tests.test_disk import Source, fill
    ih = dio.register(raw, Path({dl!r}))
    fill(dio, ih, Source(raw, Path({src!r})))
    dio.flush_all()
    def part_deleted(path, *a, **k):
        for name in ("metainfo.torrent", "location"):
            os.unlink(os.path.join(path, name))
        die()
    resume.shutil.rmtree = part_deleted
    dio.unregister(ih, delete_files=True)
real_write = resume.write_atomic
def write(path, data, *more):
    if how == "metainfo":
        die()
    real_write(path, data, *more)
    if path.name == how:
        die()
resume.write_atomic = write
dio.register(raw, Path({dl!r}))
"""


@pytest.mark.parametrize("how", ["metainfo", "metainfo.torrent", "location", "deleting"])
def test_a_register_or_removal_cut_short_leaves_nothing_to_warn_of_at_every_start(
        tmp_path: Path, backend: str, how: str) -> None:
    """A kill -9 part-way through ``register`` (its state folder made, its metainfo or
    location not yet written) left a half-made record that every later start warned
    of; one part-way through deleting the folder of a torrent removed with its files
    left its mark that the files go without the metainfo, which the next start took for
    files it could not delete. The record is made aside and put in place by a rename
    now, and the mark goes first."""
    content = make_payload(tmp_path / "src", 6 * 16384, seed=11)
    raw = make_torrent_lt(content, 16384, "v1")
    (tmp_path / "t.torrent").write_bytes(raw)
    _dies(_DIES_REGISTERING, torrent=str(tmp_path / "t.torrent"), backend=backend,
          state=str(tmp_path / "state"), dl=str(tmp_path / "dl"), src=str(tmp_path / "src"),
          how=how)
    for _ in range(2):
        again = DiskIO(backend, state_dir=tmp_path / "state")
        try:
            assert again.torrents() == [] and again.load_errors == []
            assert os.listdir(tmp_path / "state" / "torrents") == []
        finally:
            again.close()


_DIES_DELETING = """
from pieced.storage import paths, resume
from pieced.storage.disk import DiskIO
from tests.test_disk import Source, fill
raw = Path({torrent!r}).read_bytes()
dio = DiskIO({backend!r}, state_dir=Path({state!r}))
ih = dio.register(raw, Path({dl!r}))
fill(dio, ih, Source(raw, Path({src!r})))
dio.flush_all()
def die(*a, **k):
    os._exit(9)
how = {how!r}
if how == "marked":  # the record says its files go; nothing renamed or deleted yet
    real_write = resume.write_atomic
    def write(path, data, *more):
        real_write(path, data, *more)
        if path.name == resume.DELETING:
            die()
    resume.write_atomic = write
elif how.startswith("unlinked:"):  # that many payload files deleted
    left = [int(how.split(":")[1])]
    real = paths.Beneath.unlink
    def unlink(self, parts):
        if left[0] == 0:
            die()
        left[0] -= 1
        real(self, parts)
    paths.Beneath.unlink = unlink
elif how == "deleted":  # every payload file deleted; the record not yet
    resume.shutil.rmtree = die
elif how.startswith("refused"):  # a file cannot be deleted: the error is the client's
    real = paths.Beneath.unlink
    def unlink(self, parts):
        if parts[-1] == "b.bin":
            raise PermissionError(13, "Permission denied")
        real(self, parts)
    paths.Beneath.unlink = unlink
    try:
        dio.unregister(ih, delete_files=True)
    except Exception as exc:
        print(exc, file=sys.stderr)
        paths.Beneath.unlink = real
        if how == "refused, registered again":
            ih = dio.register(raw, Path({dl!r}))
            fill(dio, ih, Source(raw, Path({src!r})))
            dio.close()
        os._exit(9)
    os._exit(0)
dio.unregister(ih, delete_files=True)
os._exit(0)
"""


@pytest.mark.parametrize("how", ["marked", "unlinked:0", "unlinked:1", "unlinked:3",
                                 "deleted", "refused"])
def test_a_torrent_removed_with_its_files_loses_them_even_if_the_removal_is_cut_short(
        tmp_path: Path, backend: str, how: str) -> None:
    """A kill -9 part-way through ``unregister(delete_files)`` left the files it had
    not deleted yet, the torrent forgotten: nothing would ever delete them. The record
    now says that the files go before anything goes, and the restart finishes the
    deletion; so does it after a file that could not be deleted."""
    content = make_payload(tmp_path / "src", {"a.bin": 40000, "sub/b.bin": 70000,
                                              "sub/deeper/c.bin": 1, "d.bin": 16384})
    raw = make_torrent_lt(content, 16384, "hybrid")
    (tmp_path / "t.torrent").write_bytes(raw)
    dl = tmp_path / "dl"
    _dies(_DIES_DELETING, torrent=str(tmp_path / "t.torrent"), backend=backend,
          state=str(tmp_path / "state"), dl=str(dl), src=str(tmp_path / "src"), how=how)
    if backend not in STORES_NOTHING and how != "deleted":
        assert (dl / "payload").is_dir()  # (what the restart has to delete)
    again = DiskIO(backend, state_dir=tmp_path / "state")
    assert again.torrents() == [] and again.load_errors == []
    assert os.listdir(tmp_path / "state" / "torrents") == []
    assert not (dl / "payload").exists(), sorted(p.name for p in dl.rglob("*"))
    assert dl.is_dir()  # (the save path stays)
    again.close()


def test_a_removal_with_files_that_cannot_be_recorded_changes_nothing(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pieced.storage import resume

    content = make_payload(tmp_path / "src", {"a.bin": 40000, "sub/b.bin": 70000})
    raw = make_torrent_lt(content, 16384, "v1")
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, Source(raw, tmp_path / "src"))
    dio.flush_all()
    real = resume.write_atomic

    def full(path: Path, data: bytes, *more: Any) -> None:
        if path.name == resume.DELETING:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, *more)

    monkeypatch.setattr(resume, "write_atomic", full)
    with pytest.raises(StorageIOError):
        dio.unregister(ih, delete_files=True)
    n = dio.torrent(ih).meta.num_pieces
    assert dio.torrents() == [ih] and dio.status(ih)["verified_pieces"] == n
    monkeypatch.undo()
    dio.close()
    again = DiskIO(backend, state_dir=tmp_path / "state")
    assert again.torrents() == [ih] and wait_reverified(again, ih)["verified_pieces"] == n
    again.unregister(ih, delete_files=True)
    assert not (tmp_path / "dl" / "payload").exists()
    again.close()


def test_a_torrent_registered_again_keeps_the_files_an_earlier_removal_left(
        tmp_path: Path, backend: str) -> None:
    """The files a failed removal could not delete are deleted at the next start,
    unless the torrent was registered again meanwhile: they are its files now."""
    content = make_payload(tmp_path / "src", {"a.bin": 40000, "sub/b.bin": 70000})
    raw = make_torrent_lt(content, 16384, "v1")
    (tmp_path / "t.torrent").write_bytes(raw)
    _dies(_DIES_DELETING, torrent=str(tmp_path / "t.torrent"), backend=backend,
          state=str(tmp_path / "state"), dl=str(tmp_path / "dl"), src=str(tmp_path / "src"),
          how="refused, registered again")
    again = DiskIO(backend, state_dir=tmp_path / "state")
    [ih] = again.torrents()
    assert again.load_errors == []
    assert wait_reverified(again, ih)["verified_pieces"] == again.torrent(ih).meta.num_pieces
    again.close()


def _journaled(tmp_path: Path, backend: str, seed: int) -> tuple[DiskIO, bytes, int]:
    """A payload of 13 pieces (``tmp_path/src``) downloaded into ``tmp_path/dl`` by an
    engine on ``tmp_path/state`` but its last piece (a torrent that completes has its
    record written again at once), its first 12 pieces in its journal. (engine, ih,
    pieces verified)"""
    content = make_payload(tmp_path / "src", 12 * 16384 + 100, seed=seed)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=0.002)
    ih = dio.register(raw, tmp_path / "dl")
    for p, b, n in src.blocks():
        if p < 12:
            dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    return dio, ih, 12


def _engine_dies(dio: DiskIO, ih: bytes) -> None:
    """The engine's process dies: nothing more reaches its state folder."""
    dio.torrent(ih).storage.close_handles()
    assert dio.state is not None
    dio.state.close()


def test_a_damaged_journal_record_among_good_ones_takes_no_piece_on_trust(
        tmp_path: Path, backend: str) -> None:
    """One damaged record in the middle of a journal used to end the replay there,
    silently: the records after it were lost, and a piece it had cleared came back
    verified over bytes changed since. Now the good records are kept (their
    fingerprints), no piece is taken as verified, the problem is said, and every piece
    is found again by a check."""
    dio, ih, n = _journaled(tmp_path, backend, seed=12)
    state = tmp_path / "state"
    dio.clear_piece(ih, 4)
    dio.clear_piece(ih, 6)  # a good record after the one to be damaged
    _engine_dies(dio, ih)
    corrupt(tmp_path / "dl" / "payload.bin", 4 * 16384 + 7)  # piece 4's bytes change
    folder = state / "torrents" / ih.hex()
    from pieced.storage.resume import REC_CLEARED, RECORD

    journal = max(folder.glob("journal.*"), key=lambda p: int(p.suffix[1:]))
    data = bytearray(journal.read_bytes())
    cleared = [off for off in range(0, len(data), RECORD.size) if data[off] == REC_CLEARED]
    assert len(cleared) == 2
    data[cleared[0] + 4] ^= 0x01  # the CLEARED record of piece 4, damaged
    with open(journal, "r+b") as f:  # (no new name: the record stays where it was)
        f.write(data)
    again = DiskIO(backend, state_dir=state)
    assert any("journal is damaged" in e for e in again.load_errors), again.load_errors
    st = wait_reverified(again, ih)
    assert _verified(st) == set(range(n)) - {4}  # piece 6's bytes are good: found again
    again.close()


@pytest.mark.parametrize("copied", ["journal", "resume", "location"])
def test_a_record_of_another_torrent_in_a_torrents_folder_is_not_taken_for_its_own(
        tmp_path: Path, copied: str) -> None:
    """Two torrents of 12 pieces: A downloaded but its last piece (its record not yet
    written again: a completed torrent's is), B registered with nothing written. The
    engine dies; A's journal (or its resume or location record) is put in B's folder,
    in the place of B's. Its checksums passed, and B was said to have A's 11 pieces
    (their blocks then refused as duplicates, the download "complete" over nothing), or
    took A's save folder and wrote over it. Now the record fails them: B has nothing
    verified (a damaged journal: every piece looked for, none found), or B's state is
    skipped with the reason said; A keeps every piece."""
    content_a = make_payload(tmp_path / "a", 12 * 16384, seed=51)
    content_b = make_payload(tmp_path / "b", 12 * 16384, seed=52)
    raw_a = make_torrent_lt(content_a, 16384, "v1")
    raw_b = make_torrent_lt(content_b, 16384, "v1").replace(b"payload.bin", b"payloaB.bin")
    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state, sync_window=0.002)
    ih_a = dio.register(raw_a, tmp_path / "dl")
    ih_b = dio.register(raw_b, tmp_path / "dl")
    src_a = Source(raw_a, tmp_path / "a")
    for p, b, n in src_a.blocks():
        if p < 11:
            dio.write_chunk(ih_a, p, b, src_a.read(p, b, n))
    dio.flush_all()
    _engine_dies(dio, ih_a)
    folder_a, folder_b = state / "torrents" / ih_a.hex(), state / "torrents" / ih_b.hex()
    if copied == "journal":
        [journal] = folder_a.glob("journal.*")
        for old in folder_b.glob("journal.*"):
            old.unlink()
        shutil.copy(journal, folder_b / journal.name)
    else:
        shutil.copy(folder_a / copied, folder_b / copied)
    again = DiskIO("posix", state_dir=state)
    try:
        assert wait_reverified(again, ih_a)["verified_pieces"] == 11
        if copied == "location":
            assert ih_b not in again.torrents()
            assert any("of another torrent" in e for e in again.load_errors), again.load_errors
        else:
            assert wait_reverified(again, ih_b)["verified_pieces"] == 0
            assert any(ih_b.hex() in e for e in again.load_errors), again.load_errors
    finally:
        again.close()


def test_a_start_that_skips_a_torrent_still_takes_a_crash_after_it_for_a_crash(
        tmp_path: Path) -> None:
    """A clean stop; a start with the roots narrowed (B's save path outside: skipped,
    its record and its file stamps kept); a crash. The mark of the clean stop was kept
    through that start (so that B's stamps would be compared at the next), and the
    crash was taken for a clean stop (the direct backend's file tails, for one, not
    cut back). Now the mark goes at every start, and B's stamps, kept in its record,
    are compared at the next start all the same: B's file changed while it was
    skipped and the daemon down is found, its changed piece not verified."""
    state = tmp_path / "state"
    raws, srcs = {}, {}
    for name in ("a", "b"):
        content = make_payload(tmp_path / f"src-{name}", {f"{name}.bin": 6 * 16384}, seed=70)
        raws[name] = make_torrent_lt(content, 16384, "v1")
        srcs[name] = Source(raws[name], tmp_path / f"src-{name}")
    dio = DiskIO("posix", roots=[tmp_path], state_dir=state, sync_window=0.002)
    ihs = {name: dio.register(raws[name], tmp_path / f"dl-{name}") for name in ("a", "b")}
    for name, ih in ihs.items():
        fill(dio, ih, srcs[name], seed=None)
    dio.flush_all()
    assert all(dio.status(ih)["verified_pieces"] == 6 for ih in ihs.values())
    dio.close()
    assert (state / "clean").exists()
    narrowed = DiskIO("posix", roots=[tmp_path / "dl-a"], state_dir=state)
    assert ihs["b"] not in narrowed.torrents()
    assert not (state / "clean").exists(), "the mark of the clean stop outlived the start"
    _engine_dies(narrowed, ihs["a"])  # a crash
    corrupt(tmp_path / "dl-b" / "payload" / "b.bin", 2 * 16384 + 5)  # while it was down
    again = DiskIO("posix", roots=[tmp_path], state_dir=state)
    try:
        assert wait_reverified(again, ihs["a"])["verified_pieces"] == 6
        assert _verified(wait_reverified(again, ihs["b"])) == {0, 1, 3, 4, 5}
    finally:
        again.close()


def test_a_piece_whose_journal_record_is_damaged_last_is_looked_for_again(
        tmp_path: Path, backend: str) -> None:
    """A damaged last record of a journal was taken for an append a crash cut short,
    silently: when it was whole and then damaged (a bit flipped on the disk), the piece
    it said verified, whose event had been sent, was forgotten, never looked for. The
    pieces not verified are now checked after such a start, and it is found again."""
    from pieced.storage.resume import REC_VERIFIED, RECORD

    dio, ih, n = _journaled(tmp_path, backend, seed=13)
    state = tmp_path / "state"
    assert dio.status(ih)["verified_pieces"] == n
    _engine_dies(dio, ih)
    folder = state / "torrents" / ih.hex()
    journal = max(folder.glob("journal.*"), key=lambda p: int(p.suffix[1:]))
    data = bytearray(journal.read_bytes())
    assert len(data) >= RECORD.size and len(data) % RECORD.size == 0
    last = len(data) - RECORD.size
    assert data[last] == REC_VERIFIED
    data[last + 9] ^= 0x10  # the last record's fingerprint, one bit
    with open(journal, "r+b") as f:
        f.write(data)
    again = DiskIO(backend, state_dir=state)
    st = wait_reverified(again, ih)
    assert st["verified_pieces"] == n
    again.close()


@pytest.mark.parametrize("damage", ["a bit flipped", "its last byte lost"])
def test_a_piece_cleared_by_the_journal_record_damaged_last_is_not_verified_again(
        tmp_path: Path, backend: str, damage: str) -> None:
    """The last record of a journal damaged (a bit flipped on the disk, or cut short)
    was taken as a VERIFIED record torn by a crash: only the pieces not verified were
    looked for. When it was the CLEARED record of a piece written with other bytes
    since, that piece came back verified over them, and was served. Every piece is
    checked again now (by fingerprint: the unchanged ones at the cost of BLAKE3)."""
    from pieced.storage.resume import REC_CLEARED, RECORD

    dio, ih, n = _journaled(tmp_path, backend, seed=15)
    state = tmp_path / "state"
    dio.clear_piece(ih, 5)
    dio.write_chunk(ih, 5, 0, b"\x33" * 8192)  # other bytes, never verified
    dio.flush_all()
    _engine_dies(dio, ih)
    with open(tmp_path / "dl" / "payload.bin", "rb") as f:
        f.seek(5 * 16384)
        assert f.read(8192) == b"\x33" * 8192
    folder = state / "torrents" / ih.hex()
    journal = max(folder.glob("journal.*"), key=lambda p: int(p.suffix[1:]))
    data = bytearray(journal.read_bytes())
    assert data[len(data) - RECORD.size] == REC_CLEARED
    if damage == "a bit flipped":
        data[len(data) - 3] ^= 0x10  # the record's checksum, one bit
    else:
        del data[-1:]
    journal.write_bytes(data)
    again = DiskIO(backend, state_dir=state)
    try:
        # (said at the start: why every piece is checked)
        assert any(ih.hex() in e and "last record of its journal is damaged or cut short"
                   in e for e in again.load_errors), again.load_errors
        st = wait_reverified(again, ih)
        assert _verified(st) == set(range(n)) - {5}
    finally:
        again.close()


@pytest.mark.parametrize("name", ["resume", "location", "metainfo.torrent", "journal.0",
                                  "checking"])
def test_a_fifo_in_place_of_a_state_file_is_not_waited_on_at_the_start(
        tmp_path: Path, backend: str, name: str) -> None:
    """A FIFO in place of one of a torrent's state files: the start-up opened it and
    waited for a writer for ever (nothing said, SIGTERM not acted on). It is read as a
    file that cannot be read now: damaged or missing, as each one is."""
    dio, ih, n = _journaled(tmp_path, backend, seed=16)
    _engine_dies(dio, ih)
    folder = tmp_path / "state" / "torrents" / ih.hex()
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    started = concurrent.futures.ThreadPoolExecutor(1).submit(
        DiskIO, backend, state_dir=tmp_path / "state")
    again = started.result(timeout=60)
    try:
        if name in ("location", "metainfo.torrent"):
            assert again.torrents() == [] and any(ih.hex() in e for e in again.load_errors)
        else:
            assert _verified(wait_reverified(again, ih)) == set(range(n))
    finally:
        again.close()


def test_a_clean_mark_that_is_a_folder_is_no_clean_stop(tmp_path: Path) -> None:
    """``state_dir/clean`` made a folder: no stop can replace it, so it said "stopped
    cleanly" at every start after, crashes included (file stamps then count)."""
    from pieced.storage.resume import StateStore

    (tmp_path / "state" / "clean").mkdir(parents=True)
    store = StateStore(tmp_path / "state")
    try:
        assert not store.was_clean
    finally:
        store.close()
    (tmp_path / "state" / "clean").rmdir()
    (tmp_path / "state" / "clean").write_bytes(b"")
    store = StateStore(tmp_path / "state")
    try:
        assert store.was_clean
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["folder", "dangling symlink"])
def test_a_journal_that_cannot_be_read_costs_the_torrent_only_a_check(
        tmp_path: Path, backend: str, kind: str) -> None:
    """A journal that cannot be read (a folder in its place) made the whole torrent be
    skipped at the start, though its metainfo, location and resume record were good.
    It is loaded now, and what the journal said is found again by a check."""
    dio, ih, n = _journaled(tmp_path, backend, seed=17)
    _engine_dies(dio, ih)
    folder = tmp_path / "state" / "torrents" / ih.hex()
    journal = max(folder.glob("journal.*"), key=lambda p: int(p.suffix[1:]))
    journal.unlink()
    if kind == "folder":
        journal.mkdir()
    else:
        journal.symlink_to(tmp_path / "nowhere")
    again = DiskIO(backend, state_dir=tmp_path / "state")
    try:
        assert any("journal is damaged" in e for e in again.load_errors), again.load_errors
        assert _verified(wait_reverified(again, ih)) == set(range(n))
    finally:
        again.close()


def test_a_location_record_damaged_into_another_save_path_is_refused(
        tmp_path: Path, backend: str) -> None:
    """A bit flipped in the save path of a location record still decodes: the torrent
    was loaded in the other folder, silently, its pieces there reported verified after
    a crash (a folder of the same names and sizes) or all dropped. The record carries a
    checksum now, and a damaged one is refused, saying so."""
    dio, ih, _ = _journaled(tmp_path, backend, seed=18)
    shutil.copytree(tmp_path / "dl", tmp_path / "dm")  # the other folder: the same names
    for f in (tmp_path / "dm").rglob("*.bin"):
        f.write_bytes(bytes(f.stat().st_size))  # and sizes, other bytes
    _engine_dies(dio, ih)
    location = tmp_path / "state" / "torrents" / ih.hex() / "location"
    data = location.read_bytes()
    where = data.index(str((tmp_path / "dl").resolve()).encode()) + len(str(tmp_path)) + 2
    assert data[where:where + 1] == b"l"
    location.write_bytes(data[:where] + b"m" + data[where + 1:])
    again = DiskIO(backend, state_dir=tmp_path / "state")
    try:
        assert again.torrents() == []
        assert any(ih.hex() in e and "location record is damaged" in e
                   for e in again.load_errors), again.load_errors
    finally:
        again.close()


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_pieces_found_in_a_file_shorter_than_its_length_stay_verified_after_a_restart(
        tmp_path: Path, backend: str, stop: str) -> None:
    """A file shorter than the torrent says (another client's partial download: libtorrent
    leaves files as long as what it wrote) has the pieces before its end found by a
    check; every start after forgot them all, silently, and they were downloaded again.
    Only pieces with bytes past the file's end are missing now (libtorrent keeps them
    too); a file cut shorter while the daemon is down still loses those past its end."""
    import shutil

    content = make_payload(tmp_path / "src", {"a.bin": 5 * 16384, "b.bin": 10 * 16384},
                           seed=14)
    raw = make_torrent_lt(content, 16384, "v1")
    dl = tmp_path / "dl"
    shutil.copytree(content, dl / content.name)
    os.truncate(dl / content.name / "b.bin", 4 * 16384 + 100)  # a partial download
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state)
    ih = dio.register(raw, dl)
    checked = dio.recheck(ih)
    found = [p for p, h in enumerate(checked.have) if h]
    assert found == list(range(9))  # a.bin's 5, b.bin's first 4
    dio.torrent(ih).storage.close_handles()
    if stop == "clean":
        dio.close()
    else:
        assert dio.state is not None
        dio.state.close()  # (the process dies)
    again = DiskIO(backend, state_dir=state)
    assert sorted(_verified(wait_reverified(again, ih))) == found
    again.close()
    os.truncate(dl / content.name / "b.bin", 2 * 16384)  # cut shorter while stopped
    third = DiskIO(backend, state_dir=state)
    assert sorted(_verified(wait_reverified(third, ih))) == list(range(7))
    third.close()


def test_a_short_file_edited_while_the_daemon_is_down_is_checked_again(
        tmp_path: Path, backend: str) -> None:
    """A file shorter than its length keeps the pieces before its end across a start;
    its stamp was then taken to be looked at alone: edited in place while the daemon was
    stopped again, before its end, it kept them all verified, wrong bytes and all. A
    short file is compared on its stamp as any file is."""
    content = make_payload(tmp_path / "src", {"a.bin": 10 * 16384, "b.bin": 3 * 16384},
                           seed=21)
    raw = make_torrent_lt(content, 16384, "v1")
    dl = tmp_path / "dl"
    shutil.copytree(content, dl / content.name)
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state)
    ih = dio.register(raw, dl)
    assert dio.recheck(ih).ok
    dio.close()
    a = dl / content.name / "a.bin"
    os.truncate(a, 8 * 16384 + 100)  # cut while stopped: its last two pieces go
    again = DiskIO(backend, state_dir=state)
    kept = _verified(wait_reverified(again, ih))
    assert kept == set(range(13)) - {8, 9}, kept
    again.close()
    corrupt(a, 3 * 16384 + 5)  # an edit in place of piece 3, the file's length kept
    third = DiskIO(backend, state_dir=state)
    try:
        assert _verified(wait_reverified(third, ih)) == kept - {3}
    finally:
        third.close()


def _completed_at_a_second(tmp_path: Path, fs: Path, backend: str,
                           seed: int) -> tuple[DiskIO, bytes, Path]:
    """A torrent of one file of 8 pieces on ``fs``, every piece written and verified
    just after a second begins (so that what follows at once is in that second), by an
    engine on ``tmp_path/state``: (engine, info-hash, the file)."""
    content = make_payload(tmp_path / "src", 8 * 16384, seed=seed)
    raw = make_torrent_lt(content, 16384, "v1")
    data = content.read_bytes()
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, fs)
    time.sleep(1.02 - time.time() % 1)
    for p in range(8):
        dio.write_chunk(ih, p, 0, data[p * 16384:(p + 1) * 16384])
    dio.flush_all()
    assert _verified(dio.status(ih)) == set(range(8))
    return dio, ih, fs / content.name


def test_a_file_edited_in_the_second_of_the_stop_is_checked_again(
        tmp_path: Path, coarse_fs: Path, backend: str) -> None:
    """On a file system whose file times are whole seconds, the stop stamped the files
    the daemon had written in the same second as its last write: an edit in place right
    after the stop, in that second, left their times as they were, and the next start
    took the edited piece as verified. The stop stamps such a file once the clock has
    moved past its times' step."""
    state = tmp_path / "state"
    dio, ih, f = _completed_at_a_second(tmp_path, coarse_fs, backend, 24)
    dio.close()
    assert os.stat(f).st_mtime_ns % 1_000_000_000 == 0  # (whole seconds: the file system)
    corrupt(f, 3 * 16384 + 5)  # the file's length kept
    again = DiskIO(backend, state_dir=state)
    try:
        assert _verified(wait_reverified(again, ih)) == set(range(8)) - {3}
    finally:
        again.close()


@pytest.mark.parametrize("stop", ["clean", "crash"])
@pytest.mark.parametrize("check", [False, True])
def test_a_file_edited_in_the_second_its_torrent_completed_is_checked_again(
        tmp_path: Path, coarse_fs: Path, backend: str, stop: str, check: bool) -> None:
    """A torrent that completes has its files stamped (a start after a crash, or after a
    stop, compares them): on a file system of whole-second times, an edit in place in
    the second of the last write left the times stamped, and the next start, after a
    stop or a crash, took the edited piece as verified; so did a check run in that
    second (its reads stamp the files anew). A file stamped in the second of its last
    change is held as changed until stamped once the second is over."""
    state = tmp_path / "state"
    dio, ih, f = _completed_at_a_second(tmp_path, coarse_fs, backend, 25)
    if check:
        assert dio.recheck(ih).ok
    corrupt(f, 3 * 16384 + 5)  # the file's length kept
    if stop == "clean":
        dio.close()
        again = DiskIO(backend, state_dir=state)
    else:
        again = _crash_copy(dio, state, tmp_path / "crashed", ih)
    try:
        assert _verified(wait_reverified(again, ih)) == set(range(8)) - {3}
    finally:
        again.close()
        if stop == "crash":
            dio.close()


@pytest.mark.parametrize("stop", ["clean", "crash"])
def test_a_file_edited_before_a_check_that_a_stop_cut_short_is_not_taken_as_checked(
        tmp_path: Path, backend: str, stop: str) -> None:
    """A file of a complete torrent edited behind the daemon's back, then a check asked
    and cut short by a stop before it reached the edit: the check had stamped the file
    anew at its first read (as it is now, edit and all), so the stop recorded it
    unchanged, and the next start reported the edited piece verified until its check
    came by again. What a check found changed is held as changed until a check ends,
    in the stamps of a clean stop and in those a save records while the daemon runs
    (the start after a crash compares the files with those)."""
    n, size = 768, 65536  # (48 MiB: checked in batches of 8 MiB)
    content = make_payload(tmp_path / "src", n * size, seed=22)
    raw = make_torrent_lt(content, size, "v1")
    dl = tmp_path / "dl"
    dl.mkdir()
    shutil.copy(content, dl / content.name)
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state)
    ih = dio.register(raw, dl)
    assert dio.recheck(ih).ok
    dio.close()
    again = DiskIO(backend, state_dir=state)
    assert len(_verified(wait_reverified(again, ih))) == n
    corrupt(dl / content.name, (n - 1) * size + 9)  # the last piece, edited in place
    told: list[int] = []

    def progress(done: int, total: int) -> None:
        if not told:
            again.stop_checks()  # (the stop, as SIGTERM's comes: checks first)
        told.append(done)

    with pytest.raises(PiecedError):
        again.recheck(ih, progress)
    assert told and told[-1] < n
    if stop == "crash":
        again._save_now(again.torrent(ih))  # (a save while it runs, as a compaction's)
        again.torrent(ih).storage.close_handles()
        assert again.state is not None
        again.state.close()  # (the process dies)
    else:
        again.close()
    third = DiskIO(backend, state_dir=state)
    try:
        assert n - 1 not in _verified(third.status(ih))  # (not even before its check)
        assert _verified(wait_reverified(third, ih)) == set(range(n - 1))
    finally:
        third.close()


def test_a_register_refused_for_a_full_state_disk_leaves_no_record(
        tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    """A register that cannot write its record (the state folder's disk is full) fails
    and leaves nothing: it used to leave a half-made folder, met with a warning at every
    later start. Leftovers of writes a crash cut short (temporary files, a folder whose
    removal was under way) are cleaned at start-up, silently."""
    content = make_payload(tmp_path / "src", 4 * 16384, seed=16)
    raw = make_torrent_lt(content, 16384, "v1")
    state = tiny_fs / "state"
    dio = DiskIO(backend, state_dir=state)
    fill_up(tiny_fs)
    with pytest.raises(StorageIOError) as exc:
        dio.register(raw, tmp_path / "dl")
    assert exc.value.errno == errno.ENOSPC
    assert os.listdir(state / "torrents") == [] and dio.torrents() == []
    os.unlink(tiny_fs / "filler")
    ih = dio.register(raw, tmp_path / "dl")
    dio.close()
    folder = state / "torrents" / ih.hex()
    (folder / ".resume.k3j2h1").write_bytes(b"half")
    (folder / ".location.x9y8z7").write_bytes(b"")
    (state / "torrents" / ".removing-00ff").mkdir()
    (state / "torrents" / ".removing-00ff" / "resume").write_bytes(b"gone")
    again = DiskIO(backend, state_dir=state)
    assert again.load_errors == [] and again.torrents() == [ih]
    assert sorted(os.listdir(state / "torrents")) == [ih.hex()]
    assert not [n for n in os.listdir(folder) if n.startswith(".")]
    again.close()


def test_a_write_under_way_does_not_make_a_vanished_file_anew_before_it_is_recorded(
        tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    """A block already past its checks and on its way into a file (a piece under way)
    when the file is found gone, the state disk full: the write made the file anew at
    its full length, and after a crash the journal's verified pieces of the file passed
    for good, zeros. Such a file is not given its length until the journal records that
    its pieces are not verified any more (the write fails while it cannot)."""
    content = make_payload(tmp_path / "src", {"a.bin": 12 * 16384, "b.bin": 12 * 16384},
                           seed=19)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    state = tiny_fs / "state"
    dio = DiskIO(backend, state_dir=state, sync_window=0.002)
    ih = dio.register(raw, tmp_path / "dl")
    for p, b, k in src.blocks():
        if p < n - 2:
            dio.write_chunk(ih, p, b, src.read(p, b, k))
    dio.write_block_direct(ih, n - 1, 0, src.read(n - 1, 0, 16384))  # the last piece under way
    dio.flush_all()
    fill_up(tiny_fs)
    dio._save_now(dio.torrent(ih))  # fails (no room), and the journal starts a new file
    b_bin = tmp_path / "dl" / "payload" / "b.bin"
    os.unlink(b_bin)
    storage = dio.torrent(ih).storage
    real = storage.writev

    def writev(segs: object, bufs: object) -> int:
        if threading.current_thread().name == "late":
            time.sleep(0.3)  # past its checks, not yet in the file
        return real(segs, bufs)  # type: ignore[arg-type]

    storage.writev = writev  # type: ignore[method-assign]

    def write(p: int, b: int) -> None:
        with contextlib.suppress(StorageIOError):  # (through the ring: written through)
            dio.write_block_direct(ih, p, b, src.read(p, b, 16384))

    late = threading.Thread(target=write, args=(n - 1, 16384), name="late")
    late.start()
    time.sleep(0.1)
    write(n - 2, 0)  # finds the file gone
    late.join()
    storage.writev = real  # type: ignore[method-assign]
    assert not b_bin.exists() or b_bin.stat().st_size < 12 * 16384
    crashed = _crash_copy(dio, state, tmp_path / "crash", ih)
    st = wait_reverified(crashed, ih)
    crashed.torrent(ih).storage.close_handles()
    wrong = [p for p in _verified(st)
             if _on_disk(src, tmp_path / "dl", p) != src.read(p, 0, src.layout.piece_size(p))]
    assert wrong == [] and len(_verified(st)) == 6
    crashed.close()
    dio.close()


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_a_file_changed_while_stopped_is_looked_at_again_even_after_start_ups_cut_short(
        tmp_path: Path, odd_payload: tuple[Path, Path], backend: str, cut: int) -> None:
    """After a clean stop a file's pieces are taken on trust only if the file is as the
    stop left it (size, mtime). The clean mark went as soon as a start-up opened the state
    folder: one killed before it recorded the pieces in doubt (``cut`` = 1) made the next
    take the changed file's pieces verified over wrong bytes. A start-up cut short after
    it recorded them (``cut`` = 2: the one after the first) keeps them in doubt too."""
    from pieced.storage.resume import StateStore

    src, ih = _downloaded_and_stopped(tmp_path, odd_payload, backend)  # stamps recorded
    state = tmp_path / "state"
    first = next(s for s in src.layout.map(0, 0, 1) if s.stored)
    changed = (tmp_path / "dl").joinpath(*src.meta.files[first.file_index].path)
    corrupt(changed, first.file_offset)  # piece 0, the file's size as it was
    later = changed.stat().st_mtime_ns + 10**9
    os.utime(changed, ns=(later, later))
    if cut:
        StateStore(state).close()  # killed once it had opened the state folder
    if cut == 2:
        killed = DiskIO(backend, state_dir=state)  # killed once it had loaded it
        killed.stop_checks()
        killed.torrent(ih).storage.close_handles()
        assert killed.state is not None
        killed.state.close()
    again = DiskIO(backend, state_dir=state)
    try:
        st = wait_reverified(again, ih)
        assert _verified(st) == set(range(src.meta.num_pieces)) - {0}
    finally:
        again.close()


@pytest.mark.parametrize("then", ["empty", "other-bytes"])
@pytest.mark.parametrize("end", ["crash", "clean"])
@pytest.mark.parametrize("idle_folders", [paths.IDLE_FOLDERS, 0])
def test_a_save_folder_renamed_away_behind_the_daemons_back_takes_nothing_verified_with_it(
        tmp_path: Path, backend: str, then: str, end: str, idle_folders: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a torrent downloaded, its save folder renamed away and made again (empty, or
    holding a copy of the payload with other bytes) behind the engine's back, then the
    rest written. The writes went on into the folder renamed away (it was held open),
    every piece was announced verified, and a restart either lost them all or, after a
    crash with the copy in place, reported 62 pieces verified over the copy's bytes. Now
    the first commit after the swap sees the save path name another folder: the pieces
    written there start over (failed, the error said), and every piece reported verified
    afterwards, and after the restart, has its bytes at the save path. The same when the
    folder's descriptor is let go after each use (``idle_folders`` 0: as in a daemon with
    many torrents), so that the writes after the swap go to the new folder."""
    monkeypatch.setattr(paths.IDLE, "limit", idle_folders)
    content = make_payload(tmp_path / "src", {"a.bin": 300_000, "sub/b.bin": 200_000},
                           seed=13)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    save = tmp_path / "save"
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, save)
    blocks = src.blocks()
    for p, b, n in blocks[: len(blocks) // 2]:
        dio.write_block_direct(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] > 0
    save.rename(tmp_path / "save.old")
    save.mkdir()
    if then == "other-bytes":
        for f in src.meta.files:
            path = save.joinpath(*f.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\xee" * f.length)
    for p, b, n in blocks[len(blocks) // 2:]:
        with contextlib.suppress(PiecedError):  # (refused into a stranger's file)
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    st = dio.status(ih)
    assert any("not the folder" in e["message"] for e in st["errors"]), st["errors"]

    def right_where_said(engine: DiskIO) -> int:
        have = engine.status(ih)["have"]
        said = [p for p in range(src.meta.num_pieces) if have[p >> 3] & (0x80 >> (p & 7))]
        for p in said:
            assert _on_disk(src, save, p) == src.read(p, 0, src.layout.piece_size(p)), p
        return len(said)

    right_where_said(dio)
    if end == "crash":
        _engine_dies(dio, ih)
    else:
        dio.close()
    again = DiskIO(backend, state_dir=tmp_path / "state")
    right_where_said(again)
    if then == "empty":  # the rest of the download goes to the new folder, and completes
        fill(again, ih, src)
        again.flush_all()
        assert right_where_said(again) == src.meta.num_pieces
    again.close()


@pytest.mark.parametrize("then", ["gone", "file", "symlink"])
def test_a_save_folder_gone_while_its_descriptor_was_let_go_takes_its_pieces_with_it(
        tmp_path: Path, backend: str, then: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torrent's save folder, its descriptor let go (as in a daemon with many
    torrents), is renamed away and nothing, a file, or a symlink to a folder elsewhere
    put at its path. Every use of the folder failed from then on (ENOENT, PATH_ESCAPE)
    but its pieces stayed reported verified, their bytes nowhere at the save path. The
    next use finds the folder gone: the pieces of its files start over, as when a commit
    finds the folder replaced, and the error says why."""
    monkeypatch.setattr(paths.IDLE, "limit", 0)  # (every descriptor let go after its use)
    content = make_payload(tmp_path / "src", {"a.bin": 100_000, "sub/b.bin": 60_000}, seed=15)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    save = tmp_path / "save"
    changed: list[bytes] = []
    dio = DiskIO(backend, state_dir=tmp_path / "state", on_change=changed.append)
    try:
        ih = dio.register(raw, save)
        blocks = src.blocks()
        half = [b for b in blocks if b[0] < src.meta.num_pieces // 2]
        for p, b, n in half:
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces // 2
        save.rename(tmp_path / "away")
        if then == "file":
            save.write_bytes(b"not a folder")
        elif then == "symlink":
            (tmp_path / "elsewhere").mkdir()
            save.symlink_to(tmp_path / "elsewhere")
        p, b, n = blocks[-1]  # (in sub/b.bin, not opened yet: the folder is needed)
        with pytest.raises(PiecedError):
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
        st = dio.status(ih)
        assert st["verified_pieces"] == 0, st["verified_pieces"]
        assert any("not there any more" in e["message"] or "not the folder" in e["message"]
                   for e in st["errors"]), st["errors"]
        assert changed
        if then == "symlink":  # (nothing written through it)
            assert not any((tmp_path / "elsewhere").rglob("*"))
    finally:
        dio.close()


def _right_where_said(engine: DiskIO, ih: bytes, src: Source, save: Path) -> int:
    """How many pieces the engine says verified; each of them has its bytes at the
    save path."""
    have = engine.status(ih)["have"]
    said = [p for p in range(src.meta.num_pieces) if have[p >> 3] & (0x80 >> (p & 7))]
    for p in said:
        assert _on_disk(src, save, p) == src.read(p, 0, src.layout.piece_size(p)), p
    return len(said)


def _registered(tmp_path: Path, backend: str, a: int, b: int, seed: int
                ) -> tuple[DiskIO, bytes, bytes, Source, Path]:
    """An engine with a v1 torrent of ``a.bin`` and ``sub/b.bin`` (16 KiB pieces)
    registered in ``tmp_path/save``: (engine, info hash, metainfo, source, save path)."""
    content = make_payload(tmp_path / "src", {"a.bin": a, "sub/b.bin": b}, seed=seed)
    raw = make_torrent_lt(content, 16384, "v1")
    save = tmp_path / "save"
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    return dio, dio.register(raw, save), raw, Source(raw, tmp_path / "src"), save


def _send_until_done(dio: DiskIO, ih: bytes, src: Source, rounds: int = 4) -> None:
    """What a client does: send the blocks of every piece not verified, round after
    round, the errors of a round (its pieces are failed) notwithstanding."""
    for _ in range(rounds):
        have = dio.status(ih, files=False)["have"]
        todo = [b for b in src.blocks() if not have[b[0] >> 3] & (0x80 >> (b[0] & 7))]
        if not todo:
            return
        for p, b, n in todo:
            with contextlib.suppress(PiecedError):
                dio.write_block_direct(ih, p, b, src.read(p, b, n))
        with contextlib.suppress(PiecedError):
            dio.flush_all()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_save_folder_deleted_and_made_again_while_held_gets_the_rest_of_the_download(
        tmp_path: Path, backend: str) -> None:
    """Half a torrent downloaded, its save folder deleted with everything in it and made
    again (``rm -rf``; ``mkdir``) while the engine held it open. Every write failed from
    then on (ENOENT: nothing can be made in a folder deleted), for ever, and its pieces
    stayed reported verified, their files gone: only a recheck put it right. The first
    ENOENT now looks at the save path: the folder there is the torrent's from then on,
    the pieces of the old one start over, and the download completes in the new one."""
    dio, ih, raw, src, save = _registered(tmp_path, backend, 300_000, 200_000, seed=17)
    try:
        blocks = src.blocks()
        for p, b, n in blocks[: len(blocks) // 3]:  # (pieces of a.bin only)
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] > 0
        shutil.rmtree(save)
        save.mkdir()
        _send_until_done(dio, ih, src)
        assert _right_where_said(dio, ih, src, save) == src.meta.num_pieces
        assert any(e["errno"] == errno.ENOENT for e in dio.status(ih)["errors"])
    finally:
        dio.close()
    assert all(lt_recheck(raw, save))


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("what", ["file", "folder", "folder-out"])
def test_a_payload_file_renamed_away_while_open_takes_nothing_verified_with_it(
        tmp_path: Path, backend: str, what: str) -> None:
    """Part of a file downloaded, then the file (or its folder) renamed away behind the
    engine's back while it held the file open: to another name in the save path, or
    out of it, out of the roots (``folder-out``). The writes went on through the open
    descriptor into the file wherever it went, and every piece was reported verified
    with nothing at the torrent's paths (a client said the download complete). Now a
    commit looks whether the files it syncs are still under their names: a file that
    is not is forgotten as a vanished one (its pieces start over, the error says
    why), made anew at its place, and the download completes there. Whatever is
    reported verified has its bytes at the save path."""
    dio, ih, raw, src, save = _registered(tmp_path, backend, 100_000, 400_000, seed=19)
    try:
        b_pieces = src.layout.file_pieces(1)
        blocks = [blk for blk in src.blocks() if blk[0] in b_pieces]
        for p, b, n in blocks[: len(blocks) // 2]:
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        before = dio.status(ih)["verified_pieces"]
        assert before > 0
        if what == "file":
            (save / "payload" / "sub" / "b.bin").rename(save / "payload" / "sub" / "b.old")
        else:
            away = save / "payload" / "away" if what == "folder" else tmp_path / "elsewhere"
            (save / "payload" / "sub").rename(away)
        for p, b, n in blocks[len(blocks) // 2:]:
            with contextlib.suppress(PiecedError):
                dio.write_block_direct(ih, p, b, src.read(p, b, n))
        with contextlib.suppress(PiecedError):
            dio.flush_all()
        st = dio.status(ih)
        assert any("renamed away or replaced" in e["message"] for e in st["errors"]), st["errors"]
        _right_where_said(dio, ih, src, save)
        _send_until_done(dio, ih, src)
        assert _right_where_said(dio, ih, src, save) == src.meta.num_pieces
    finally:
        dio.close()
    assert all(lt_recheck(raw, save))


def test_many_torrents_with_verified_pieces_hold_few_descriptors(
        tmp_path: Path, backend: str) -> None:
    """Each registered torrent held two descriptors for as long as it was registered
    (its save folder and its journal): a daemon with a few thousand torrents went past
    RLIMIT_NOFILE, and then every open failed (EMFILE), other clients' too. Now neither
    is held between uses, beyond the last ``IDLE_FOLDERS`` folders used; and every
    torrent still works when its folder is opened again."""
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    n = paths.IDLE_FOLDERS + 100
    dio = DiskIO(backend, state_dir=tmp_path / "state", max_open_files=16)
    try:
        srcs, raws = [], []
        for i in range(n):
            content = make_payload(tmp_path / "src" / str(i), {"a.bin": 20_000 + i}, seed=i)
            raws.append(make_torrent_lt(content, 16384, "v1"))
            srcs.append(Source(raws[-1], tmp_path / "src" / str(i)))
        before = open_fds()
        ihs = []
        for i, src in enumerate(srcs):
            ih = dio.register(raws[i], tmp_path / "save" / str(i))
            p, b, n_ = src.blocks()[0]
            dio.write_block_direct(ih, p, b, src.read(p, b, n_))
            ihs.append(ih)
        dio.flush_all()
        assert all(dio.status(ih)["verified_pieces"] == 1 for ih in ihs)
        grown = open_fds() - before
        assert grown <= paths.IDLE_FOLDERS + 16 + 8, grown  # (payload files: max_open_files)
        for ih, src in zip(ihs, srcs, strict=True):  # the first folders let go: opened again
            fill(dio, ih, src)
        dio.flush_all()
        assert all(dio.status(ih)["verified_pieces"] == src.meta.num_pieces
                   for ih, src in zip(ihs, srcs, strict=True))
        assert open_fds() - before <= paths.IDLE_FOLDERS + 16 + 8
    finally:
        dio.close()


def test_a_register_refused_after_its_record_was_put_in_place_leaves_nothing_to_load(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last step of a new torrent's record, the sync of the folder it was renamed
    into, fails: the register is refused, and no record of it is left for the next
    start to load (the rename had put a whole one in place)."""
    from pieced.storage import resume

    content = make_payload(tmp_path / "src", 6 * 16384, seed=11)
    raw = make_torrent_lt(content, 16384, "v1")
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    torrents = tmp_path / "state" / "torrents"
    real = resume.fsync_dir

    def fsync_dir(path: Path) -> None:
        if Path(path) == torrents and any(not p.name.startswith(".") for p in torrents.iterdir()):
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(resume, "fsync_dir", fsync_dir)
    try:
        with pytest.raises(StorageIOError):
            dio.register(raw, tmp_path / "dl")
        assert dio.torrents() == []
    finally:
        dio.close()
    monkeypatch.setattr(resume, "fsync_dir", real)
    again = DiskIO(backend, state_dir=tmp_path / "state")
    try:
        assert again.torrents() == [] and again.load_errors == []
        assert os.listdir(torrents) == []
    finally:
        again.close()


def _checked_in_place(tmp_path: Path, backend: str, files: dict[str, int]
                      ) -> tuple[DiskIO, bytes, int]:
    """A v1 torrent of 32 KiB pieces over data already in ``tmp_path/dl``, registered
    and checked by a DiskIO whose state is in ``tmp_path/state`` (roots: ``tmp_path``):
    (the DiskIO, the info hash, the pieces verified)."""
    content = make_payload(tmp_path / "dl", files, seed=3)
    raw = make_torrent_lt(content, 32768, "v1")
    dio = DiskIO(backend, state_dir=tmp_path / "state", roots=[tmp_path])
    ih = dio.register(raw, tmp_path / "dl")
    dio.recheck(ih)
    return dio, ih, dio.status(ih)["verified_pieces"]


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("op", ["unregister with delete_files", "move_storage", "rename_file"])
def test_an_operation_refused_after_its_record_was_put_in_place_is_not_done_at_the_next_start(
        tmp_path: Path, backend: str, op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync of a torrent's state folder fails right after the operation's record
    (the mark of a removal with its files; the new location) was renamed into it: the
    operation is refused, the torrent stays as it was in the running daemon, and so it
    must at the next start. (The record stayed in place: after a clean stop, the next
    start deleted the torrent and its payload, or moved it and called its pieces
    missing.)"""
    from pieced.storage import resume

    state = tmp_path / "state"
    dio, ih, n = _checked_in_place(tmp_path, backend, {"a.bin": 200_000, "b.bin": 70_001})
    assert n == 9  # (270,001 bytes in pieces of 32 KiB)
    real = resume.fsync_dir
    armed = [True]

    def fsync_dir(path: Path) -> None:
        if armed[0] and Path(path).parent == state / "torrents":  # a torrent's own folder
            armed[0] = False
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(resume, "fsync_dir", fsync_dir)
    try:
        with pytest.raises(StorageIOError):
            if op == "move_storage":
                dio.move_storage(ih, tmp_path / "new")
            elif op == "rename_file":
                dio.rename_file(ih, 0, "renamed.bin")
            else:
                dio.unregister(ih, delete_files=True)
        assert not armed[0]
        monkeypatch.setattr(resume, "fsync_dir", real)
        st = dio.status(ih, files=True)
        assert st["save_path"] == str(tmp_path / "dl") and st["verified_pieces"] == n
    finally:
        dio.close()
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.bin"))
    assert files == [Path("dl/payload/a.bin"), Path("dl/payload/b.bin")]
    again = DiskIO(backend, state_dir=state, roots=[tmp_path])
    try:
        assert again.torrents() == [ih] and again.load_errors == []
        st = again.status(ih)
        assert st["save_path"] == str(tmp_path / "dl")
        assert st["verified_pieces"] == n and not st["reverifying_pieces"]
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.bin")) == files
        assert [p.name for p in state.rglob("*") if p.name.startswith(".")] == []
    finally:
        again.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("how", ["a move undone", "chmod", "chattr"])
def test_files_pieced_knows_are_not_taken_for_swapped_ones_at_a_move(
        tmp_path: Path, backend: str, how: str) -> None:
    """Files known by their stamps from the start (not opened since) whose change time
    moved without their being replaced (a move the daemon undid, which moved them there
    and back; a chmod; a chattr) keep their verified pieces at the next move: only
    another inode at a file's name is another file (they were all started over)."""
    content = make_payload(tmp_path / "src", {"a.bin": 70_000, "sub/b.bin": 90_000,
                                              "z.bin": 50_000}, seed=9)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    roots = tmp_path / "roots"
    roots.mkdir()
    dio = DiskIO(backend, roots=[roots], state_dir=tmp_path / "state")
    dl = roots / "dl"
    ih = dio.register(raw, dl)
    fill(dio, ih, src)
    dio.flush_all()
    dio.close()
    dio = DiskIO(backend, roots=[roots], state_dir=tmp_path / "state")
    try:
        n = src.meta.num_pieces
        assert dio.status(ih)["verified_pieces"] == n
        last = dl.joinpath(*src.meta.files[-1].path)
        if how == "a move undone":  # the last file cannot be moved: the others come back
            subprocess.run(["chattr", "+i", str(last)], check=True)
            try:
                with pytest.raises(StorageIOError):
                    dio.move_storage(ih, roots / "new")
            finally:
                subprocess.run(["chattr", "-i", str(last)], check=True)
        elif how == "chmod":
            for i in range(len(src.meta.files)):
                dl.joinpath(*src.meta.files[i].path).chmod(0o600)
        else:
            subprocess.run(["chattr", "+d", str(last)], check=True)  # (no dump: harmless)
        assert dio.status(ih)["verified_pieces"] == n
        dio.move_storage(ih, roots / "new")
        assert dio.status(ih)["verified_pieces"] == n
        assert dio.recheck(ih, full=True).ok
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_pieces_under_way_at_a_clean_stop_are_taken_up_at_the_next_start(
        tmp_path: Path, backend: str, kind: str) -> None:
    """The engine stopped cleanly with pieces under way: they were forgotten, and a
    client fetched them whole again (libtorrent keeps unfinished pieces in its resume
    data). They are under way again after the start, with the blocks they had, and
    verify once the rest comes, their hash made from the disk. Not a piece of a file
    changed while the engine was stopped (it is not known what it holds); and a block
    spoiled on disk behind the engine's back (its times put back)
    fails its piece, which verifies when sent whole again."""
    content = make_payload(tmp_path / "src", {"a.bin": 200_000, "b.bin": 300_000}, seed=37)
    raw = make_torrent_lt(content, 65536, kind)
    src = Source(raw, tmp_path / "src")
    save = tmp_path / "dl"
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, save)
    blocks = src.blocks()
    under_way = {}
    for p in range(src.meta.num_pieces):  # the first half of each piece's blocks
        mine = [b for b in blocks if b[0] == p]
        for q, b, n in mine[: max(1, len(mine) // 2)]:
            if len(mine) > 1:
                dio.write_block_direct(ih, q, b, src.read(q, b, n))
                under_way[p] = mine
    held = {p for p, _ in dio.status(ih, partial=True)["partial"]}
    assert held == set(under_way)
    dio.close()
    b_file = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "b.bin")
    b_path = save.joinpath(*src.meta.files[b_file].path)
    later = b_path.stat().st_mtime_ns + 10**9
    os.utime(b_path, ns=(later, later))  # b.bin changed while stopped: not known now
    in_b = {p for p in held if b_file in {s.file_index for s in src.layout.map(
        p, 0, src.layout.piece_size(p)) if s.stored and s.length}}
    again = DiskIO(backend, state_dir=tmp_path / "state")
    try:
        st = again.status(ih, partial=True)
        taken = {p: spans for p, spans in st["partial"]}
        assert set(taken) == held - in_b, (sorted(taken), sorted(held), sorted(in_b))
        assert taken
        told: list[PieceResult] = []
        again.on_piece = told.append
        # A block kept on disk spoiled behind the engine's back: its piece fails when
        # the rest comes, and verifies sent whole.
        spoiled = min(taken)
        first = src.layout.map(spoiled, 0, 16384)[0]
        path = save.joinpath(*src.meta.files[first.file_index].path)
        times = path.stat()
        with open(path, "r+b") as f:
            f.seek(first.file_offset)
            f.write(bytes([src.read(spoiled, 0, 1)[0] ^ 1]))
        os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        for p in sorted(taken):
            for q, b, n in under_way[p]:
                if not any(s <= b and b + n <= e for s, e in taken[p]):
                    again.write_block_direct(ih, q, b, src.read(q, b, n), writer=7)
        again.flush_all()
        have = again.status(ih)["have"]
        ok = {p for p in taken if have[p >> 3] & (0x80 >> (p & 7))}
        assert ok == set(taken) - {spoiled}, (sorted(ok), spoiled)
        # (writers: 0 stands for the blocks from before the start, no connection's)
        assert {(r.piece, r.ok, r.writers) for r in told} == {
            (p, p != spoiled, (0, 7)) for p in taken}, told
        _send_until_done(again, ih, src)
        assert _right_where_said(again, ih, src, save) == src.meta.num_pieces
    finally:
        again.close()
    assert all(lt_recheck(raw, save))


def test_journal_records_of_the_version_before_their_torrents_seed_still_replay() -> None:
    """Journal checksums start from the crc32 of the torrent's info hash; a journal left
    by the version before (checksums from 0: a crash before its first compaction) is
    still replayed whole, while one of another torrent's fails its checksums."""
    import zlib

    from pieced.storage import resume

    records = [(resume.REC_VERIFIED, p, bytes([p]) * 16) for p in range(5)]
    seed = zlib.crc32(bytes(range(20)))
    other = zlib.crc32(bytes(20))
    assert resume.decode_records(resume.encode_records(records, seed), seed) == records
    assert resume.decode_records(resume.encode_records(records), seed) == records  # legacy
    assert resume.decode_records(resume.encode_records(records, other), seed) == []


def test_a_record_that_cannot_be_saved_is_listed_not_pushed_and_nothing_is_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state folder's disk has room for journal records but not for a torrent's
    record (a few kilobytes left): its save fails. Nothing of the torrent is lost (the
    journal holds it), and nothing is for its clients to do: the error is counted and
    listed in ``status``, not pushed as a ``disk_error`` (pieced-peer stopped its download
    on it, saying the torrent's files had an error)."""
    from pieced.storage import resume

    content = make_payload(tmp_path / "src", 300_000, seed=13)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    pushed: list[Any] = []
    dio = DiskIO("posix", state_dir=tmp_path / "state",
                 on_error=lambda ih, e: pushed.append(e))
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill(dio, ih, src)
        dio.flush_all()

        def no_room(*a: Any, **k: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(resume.TorrentRecord, "write_resume", no_room)
        corrupt(tmp_path / "dl" / content.name, 5)  # (piece 0 fails: a record to save)
        assert dio.recheck(ih).failed_v1 == [0]  # (it saves the record when done)
        st = dio.status(ih)
        assert any("save resume" in e["message"] and e["errno"] == errno.ENOSPC
                   for e in st["errors"]), st["errors"]
        assert pushed == []
        monkeypatch.undo()
    finally:
        dio.close()
    again = DiskIO("posix", state_dir=tmp_path / "state")
    try:
        assert again.status(ih)["verified_pieces"] == src.meta.num_pieces - 1
    finally:
        again.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_move_refused_part_way_whose_record_back_cannot_be_synced_is_not_done_later(
        tmp_path: Path, backend: str, tiny_fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A move to a disk that fills up part-way is undone, the files brought back, and
    the record that says so is written; its folder's sync fails. That record stays:
    taken back, the one before it (going to the full disk) led the next start to finish
    the move the client was told had failed."""
    from pieced.storage import resume

    state = tmp_path / "state"
    dio, ih, n = _checked_in_place(tmp_path, backend, {"a.bin": 100_000, "b.bin": 300_001})
    assert n == 13
    real = resume.fsync_dir
    syncs: list[Path] = []

    def fsync_dir(path: Path) -> None:
        if Path(path).parent == state / "torrents":  # a torrent's own folder
            syncs.append(Path(path))
            if len(syncs) == 2:  # the record written once the move failed
                raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(resume, "fsync_dir", fsync_dir)
    try:
        with pytest.raises(StorageIOError) as exc:
            dio.move_storage(ih, tiny_fs / "new")  # (room for a.bin, not b.bin)
        assert exc.value.errno == errno.ENOSPC and len(syncs) == 2
        monkeypatch.setattr(resume, "fsync_dir", real)
        assert dio.status(ih)["save_path"] == str(tmp_path / "dl")
    finally:
        dio.close()
    again = DiskIO(backend, state_dir=state, roots=[tmp_path])
    try:
        st = again.status(ih)
        assert st["save_path"] == str(tmp_path / "dl") and again.load_errors == []
        assert st["verified_pieces"] == n
        assert not any(p.is_file() for p in tiny_fs.rglob("*.bin"))
    finally:
        again.close()


def test_temporary_files_a_crash_left_beside_the_clean_mark_are_removed_at_start(
        tmp_path: Path) -> None:
    """The clean mark is written as every record is (a temporary file renamed into
    place, the one it replaces kept meanwhile under a second name): those a crash left
    in the state folder are removed at the next start, as those of the torrents'
    records are."""
    state = tmp_path / "state"
    DiskIO("posix", state_dir=state).close()
    left = [state / ".clean.k2j4h8", state / ".clean.k2j4h8.old"]
    for path in left:
        path.write_bytes(b"")
    DiskIO("posix", state_dir=state).close()
    assert not any(p.exists() for p in left)
    assert sorted(os.listdir(state)) == sorted(["clean", "lock", "torrents"])


def test_a_move_a_crash_cut_short_waits_for_the_folder_it_was_from(
        tmp_path: Path, backend: str) -> None:
    """The process dies once a move is recorded, before any file moved; at the next
    start the folder it was moving from is not there (a disk not mounted yet). The start
    took every file for moved already, recorded the new place, and the files and their
    verified pieces were lost for good, also once the disk was back. Now the torrent is
    left as it is, not loaded, said so; the start that finds the folder again finishes
    the move with every piece."""
    new = tmp_path / "new"
    _content, src, old = _dies_moving(tmp_path, backend, 6, 21, new, "move", "recorded")
    os.rename(old, tmp_path / "unmounted")
    again = DiskIO(backend, state_dir=tmp_path / "state")
    try:
        assert again.torrents() == []
        assert any("is not there" in e for e in again.load_errors), again.load_errors
    finally:
        again.close()
    os.rename(tmp_path / "unmounted", old)
    third = DiskIO(backend, state_dir=tmp_path / "state")
    try:
        ih = third.torrents()[0]
        st = third.status(ih)
        assert st["save_path"] == str(new) and st["reverifying_pieces"] == 0
        assert st["verified_pieces"] == src.meta.num_pieces
        assert not any(p.is_file() for p in old.rglob("*"))
        assert third.recheck(ih, full=True).ok
    finally:
        third.close()


def test_on_the_disabled_backend_a_move_a_crash_cut_short_does_not_wait_for_its_folder(
        tmp_path: Path) -> None:
    """As above, on the backend that stores nothing: its files are nowhere, wherever the
    move was, and the start that finds the folder it was from gone loads the torrent at
    its new place (it refused it at every start)."""
    new = tmp_path / "new"
    _content, _src, old = _dies_moving(tmp_path, "disabled", 6, 22, new, "move", "recorded")
    shutil.rmtree(old, ignore_errors=True)
    again = DiskIO("disabled", state_dir=tmp_path / "state")
    try:
        assert len(again.torrents()) == 1 and again.load_errors == []
        assert again.status(again.torrents()[0])["save_path"] == str(new)
    finally:
        again.close()


def test_pieces_verified_while_the_records_cannot_be_written_are_known_after_a_crash(
        tmp_path: Path, backend: str) -> None:
    """A clean stop stamps every file in the resume record; the daemon started after it
    cannot write that record again (the state folder's disk full: here a file-size limit
    the record is over and the journal is not), downloads the rest and is killed. Every
    piece it reported verified is reported verified at the next start, at once: its
    writes made the stamps the clean stop left stale, which withheld every piece of
    every file written until a check of them, though the journal held them all."""
    rng = random.Random(7)
    files = {f"d{i % 7}/f{i:03d}.bin": rng.randrange(2000, 4000) for i in range(300)}
    content = make_payload(tmp_path / "src", files, seed=9)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    dl = tmp_path / "dl"
    env = {"PIECED_LOG_FILE": ""}  # (a file-size limit would stop the log file too)

    def have(c: Client, ih: bytes) -> set[int]:
        bits = c.status(ih)["have"]
        return {p for p in range(n) if bits[p >> 3] & (0x80 >> (p & 7))}

    def write(c: Client, ih: bytes, pieces: range) -> None:
        for p, b, size in src.blocks():
            if p in pieces:
                c.write_chunk(ih, p, b, src.read(p, b, size))
        c.wait_writes()

    d = Daemon(tmp_path, env=env, backend=backend)
    with Client(d.socket) as c:
        ih = c.register(raw, dl)
        write(c, ih, range(n // 2))
        c.flush_all()
    assert d.stop() == 0, d.stderr()
    record = next((tmp_path / "var").rglob("resume"))
    assert record.stat().st_size > 8192  # (300 stamps: the limit below is under it)

    d = Daemon(tmp_path, env=env, backend=backend, wrap=("prlimit", "--fsize=8192", "--"))
    with Client(d.socket) as c:
        write(c, ih, range(n // 2, n))
        deadline = time.monotonic() + 30
        while len(told := have(c, ih)) < n:
            assert time.monotonic() < deadline, f"{len(told)} of {n} pieces verified"
            time.sleep(0.02)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)

    d = Daemon(tmp_path, env=env, backend=backend)
    with Client(d.socket) as c:
        st = c.status(ih)
        assert st["reverifying_pieces"] == 0 and st["verified_pieces"] == n, (
            st["reverifying_pieces"], st["verified_pieces"], n)
    assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, dl))
