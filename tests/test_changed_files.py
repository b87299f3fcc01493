"""Payload files changed behind the daemon's back (renamed, swapped, rewritten with their
times put back), running or stopped: no piece is reported verified that libtorrent's
check of the same files fails, and a piece written again lands in the file under its
name."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pieced.protocol.client import Client
from pieced.storage.disk import HASHING, DiskIO
from pieced.storage.errors import AlreadyRegistered, PiecedError

from tests.conftest import STORES_NOTHING, Daemon, run_threads
from tests.realtools import lt_recheck, make_payload, make_torrent_lt
from tests.test_daemon import wait_for
from tests.test_disk import Source, fill
from tests.test_state import _on_disk, wait_reverified

pytestmark = pytest.mark.backends(exclude={"disabled": STORES_NOTHING})

PIECE = 32768


def _verified(st: dict) -> list[bool]:
    return [bool(st["have"][p >> 3] & (0x80 >> (p & 7))) for p in range(st["num_pieces"])]


def _verified_are_right(st: dict, src: Source, save: Path) -> None:
    """Every piece ``st`` (a status) reports verified holds the source's bytes on disk."""
    for p, v in enumerate(_verified(st)):
        if v:
            assert _on_disk(src, save, p) == src.read(p, 0, src.layout.piece_size(p)), p


def _downloaded(tmp_path: Path, backend: str, kind: str) -> tuple[bytes, Source, DiskIO, bytes]:
    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000,
                                              "dir/c.bin": 200000, "d.bin": 7})
    raw = make_torrent_lt(content, PIECE, kind)
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    assert all(_verified(dio.status(ih)))
    return raw, src, dio, ih


def _swap(folder: Path) -> None:
    """Swap two files of one size under their names, as ``mv`` does."""
    os.rename(folder / "b.bin", folder / "tmp")
    os.rename(folder / "c.bin", folder / "b.bin")
    os.rename(folder / "tmp", folder / "c.bin")


@pytest.mark.parametrize("full", [False, True], ids=["fingerprints", "full"])
@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_a_recheck_sees_files_swapped_while_the_daemon_runs(
        tmp_path: Path, backend: str, kind: str, full: bool) -> None:
    """Files swapped while the daemon had them open: the recheck read the old files
    through the descriptors it held, found every piece good, and the pieces written
    again after it went to the file now under the other name (verified, and wrong)."""
    raw, src, dio, ih = _downloaded(tmp_path, backend, kind)
    _swap(tmp_path / "dl" / "payload" / "dir")
    truth = lt_recheck(raw, tmp_path / "dl")
    assert not all(truth)  # (the swap changed what libtorrent finds)
    result = dio.recheck(ih, full=full)
    assert list(result.have) == truth
    assert _verified(dio.status(ih)) == truth
    # Written again: into the files under their names now, and good there.
    fill(dio, ih, src)
    dio.flush_all()
    assert all(_verified(dio.status(ih)))
    assert all(lt_recheck(raw, tmp_path / "dl"))
    assert dio.status(ih)["errors"] == []
    dio.close()


def test_files_swapped_while_the_daemon_runs_are_not_trusted_after_a_clean_stop(
        tmp_path: Path, backend: str) -> None:
    """The stamps of a clean stop were taken of the files under the names then, not of
    those the daemon had written: the restart trusted the swapped files."""
    raw, _, dio, ih = _downloaded(tmp_path, backend, "v1")
    _swap(tmp_path / "dl" / "payload" / "dir")
    dio.close()
    truth = lt_recheck(raw, tmp_path / "dl")
    again = DiskIO(backend, state_dir=tmp_path / "state")
    assert _verified(wait_reverified(again, ih)) == truth
    again.close()


@pytest.mark.parametrize("how", ["rewritten", "swapped"])
def test_files_changed_while_stopped_with_their_times_put_back_are_checked(
        tmp_path: Path, backend: str, how: str) -> None:
    """Bytes changed while the daemon was stopped, the modification time put back
    (``touch -d``, ``cp -p``, ``rsync -t``): the size and time matched, so the restart
    trusted the pieces. Their change time and inode now count too."""
    raw, _, dio, ih = _downloaded(tmp_path, backend, "v1")
    dio.close()
    folder = tmp_path / "dl" / "payload" / "dir"
    times = {n: os.stat(folder / n) for n in ("b.bin", "c.bin")}
    if how == "rewritten":
        with open(folder / "b.bin", "r+b") as f:
            f.seek(70000)
            f.write(b"planted!")
    else:
        _swap(folder)
    for n, st in times.items():
        os.utime(folder / n, ns=(st.st_atime_ns, st.st_mtime_ns))
    _next_start_sees_it(raw, tmp_path / "dl", backend, ih, tmp_path / "state")


def _next_start_sees_it(raw: bytes, save: Path, backend: str, ih: bytes,
                        state: Path) -> None:
    """The files changed (libtorrent's check of them fails pieces): the next start on
    ``state`` reports verified the pieces that check passes, and only those."""
    truth = lt_recheck(raw, save)
    assert not all(truth)
    again = DiskIO(backend, state_dir=state)
    try:
        assert _verified(wait_reverified(again, ih)) == truth
    finally:
        again.close()


def _plant(folder: Path, name: str = "b.bin") -> None:
    """Change bytes in the middle of a file, its size and modification time put back."""
    st = os.stat(folder / name)
    with open(folder / name, "r+b") as f:
        f.seek(70000)
        f.write(b"planted!")
    os.utime(folder / name, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("read", [False, True], ids=["unread", "seeded"])
@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_a_file_changed_while_the_daemon_seeds_it_is_checked_after_a_clean_stop(
        tmp_path: Path, backend: str, kind: str, read: bool) -> None:
    """Downloaded, then a start that only seeds: bytes of a file are changed behind the
    daemon's back (time put back), then a clean stop. The stop stamped a file the
    daemon had opened as it found it, and the next start trusted its pieces (only a
    file never opened in that run was compared with its stamp of the start). A file
    not written since the start is now compared with that stamp, read or not."""
    raw, _, dio, ih = _downloaded(tmp_path, backend, kind)
    dio.close()
    seeding = DiskIO(backend, state_dir=tmp_path / "state")
    assert all(_verified(wait_reverified(seeding, ih)))
    if read:
        n = seeding.status(ih)["num_pieces"]
        for p in range(n):
            seeding.read_piece(ih, p)
    _plant(tmp_path / "dl" / "payload" / "dir")
    seeding.close()
    _next_start_sees_it(raw, tmp_path / "dl", backend, ih, tmp_path / "state")


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_a_file_changed_after_a_register_found_it_whole_is_checked_after_a_clean_stop(
        tmp_path: Path, backend: str, kind: str) -> None:
    """A torrent registered over its data (the check at register reads every file and
    verifies every piece), bytes of a file changed behind the daemon's back, a clean
    stop: the file had no stamp of the start, and was stamped as found at the stop. Its
    first read now stamps it, and the change is seen."""
    import shutil

    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000,
                                              "dir/c.bin": 200000, "d.bin": 7})
    raw = make_torrent_lt(content, PIECE, kind)
    shutil.copytree(tmp_path / "src", tmp_path / "dl")
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    assert all(dio.recheck(ih).have)  # (what the daemon does at register)
    _plant(tmp_path / "dl" / "payload" / "dir")
    dio.close()
    _next_start_sees_it(raw, tmp_path / "dl", backend, ih, tmp_path / "state")


def test_a_file_put_back_and_rechecked_is_not_taken_for_changed_at_the_next_start(
        tmp_path: Path, backend: str) -> None:
    """A file replaced by a good copy of itself (restored from a backup: another inode,
    new times) while the daemon seeds, then a recheck, which takes the files as they are
    now: the stop compared it with its stamp of the start, and the next start took it
    for changed (its pieces missing until checked again)."""
    import shutil

    _, _, dio, ih = _downloaded(tmp_path, backend, "v1")
    dio.close()
    seeding = DiskIO(backend, state_dir=tmp_path / "state")
    assert all(_verified(wait_reverified(seeding, ih)))
    seeding.read_piece(ih, 5)
    b = tmp_path / "dl" / "payload" / "dir" / "b.bin"
    shutil.copy(b, tmp_path / "backup")
    os.unlink(b)
    shutil.copy(tmp_path / "backup", b)
    assert all(seeding.recheck(ih).have)
    seeding.close()
    again = DiskIO(backend, state_dir=tmp_path / "state")
    st = again.status(ih)
    assert all(_verified(st)) and st["reverifying_pieces"] == 0
    again.close()


def test_files_another_torrent_downloads_into_are_not_taken_for_changed_at_the_next_start(
        tmp_path: Path, backend: str) -> None:
    """A torrent seeding, a second one of the same files (cross-seeding) downloading into
    them, a clean stop: the files' new times were not the first torrent's writes, so its
    stop took them for changed behind the daemon's back, and the next start had its
    pieces missing until checked again. A write through another torrent counts as the
    daemon's."""
    _, _, dio, ih = _downloaded(tmp_path, backend, "v1")
    dio.close()
    pool = concurrent.futures.ThreadPoolExecutor(1)  # (mmap: see the tests below)
    seeding = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state"))
    assert all(_verified(_off_main(pool, wait_reverified, seeding, ih)))
    _off_main(pool, seeding.read_piece, ih, 2)
    raw_b = make_torrent_lt(tmp_path / "src" / "payload", 16384, "hybrid")
    b = _off_main(pool, seeding.register, raw_b, tmp_path / "dl")
    _off_main(pool, fill, seeding, b, Source(raw_b, tmp_path / "src"))
    _off_main(pool, seeding.flush_all)
    assert all(_verified(seeding.status(b)))
    _off_main(pool, seeding.close)
    again = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state"))
    st = again.status(ih)
    assert all(_verified(st)) and st["reverifying_pieces"] == 0
    _off_main(pool, again.close)
    pool.shutdown()


def _change(folder: Path, how: str) -> None:
    """Bytes of b.bin changed, or b.bin and c.bin swapped, their times put back."""
    if how == "rewritten":
        _plant(folder)
        return
    times = {n: os.stat(folder / n) for n in ("b.bin", "c.bin")}
    _swap(folder)
    for n, st in times.items():
        os.utime(folder / n, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("how", ["rewritten", "swapped"])
@pytest.mark.parametrize("when", ["downloaded", "seeding"])
def test_files_changed_while_the_daemon_is_down_after_a_crash_are_checked(
        tmp_path: Path, backend: str, how: str, when: str) -> None:
    """A crash (kill -9) right after a download, or while the daemon seeds, then files
    changed before the next start, their times put back: only a clean stop stamped the
    files, and every start wrote the records again without stamps, so after a crash only
    a file's size counted, and the changed pieces were reported verified. A torrent that
    completes has its files stamped and its record written at once, and a record written
    while the daemon runs keeps the stamps of the files no torrent can write."""
    import shutil

    raw, _, dio, ih = _downloaded(tmp_path, backend, "v1")
    if when == "seeding":
        dio.close()
        dio = DiskIO(backend, state_dir=tmp_path / "state")
        assert all(_verified(wait_reverified(dio, ih)))
        dio.read_piece(ih, 3)
    shutil.copytree(tmp_path / "state", tmp_path / "crash")  # a crash now
    dio.close()
    _change(tmp_path / "dl" / "payload" / "dir", how)
    _next_start_sees_it(raw, tmp_path / "dl", backend, ih, tmp_path / "crash")


@pytest.mark.parametrize("how", ["downloaded", "cleared", "moved", "renamed", "shared"])
def test_files_the_daemon_wrote_or_moved_are_not_taken_for_changed_after_a_crash(
        tmp_path: Path, backend: str, how: str) -> None:
    """After a crash, a file the daemon itself changed since its record was written keeps
    its verified pieces at the start (none is reported missing, none checked again):
    one it downloaded into, one it wrote again after a piece of it was cleared, one it
    moved, one another torrent came to share and wrote into. A file swapped in for one
    of them is still seen (its inode)."""
    import shutil

    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000,
                                              "dir/c.bin": 200000})
    raw = make_torrent_lt(content, PIECE, "v1")
    src = Source(raw, tmp_path / "src")
    save = tmp_path / "dl"
    pool = concurrent.futures.ThreadPoolExecutor(1)  # (mmap: see the tests below)
    dio = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state"))
    ih = _off_main(pool, dio.register, raw, save)
    blocks = list(src.blocks())
    first = blocks if how != "downloaded" else blocks[len(blocks) // 2:]  # (c.bin whole)
    _off_main(pool, lambda: [dio.write_block_direct(ih, p, b, src.read(p, b, n))
                             for p, b, n in first])
    _off_main(pool, dio.flush_all)
    _off_main(pool, dio.close)
    again = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state"))
    assert wait_reverified(again, ih)["reverifying_pieces"] == 0
    if how == "downloaded":
        _off_main(pool, lambda: [again.write_block_direct(ih, p, b, src.read(p, b, n))
                                 for p, b, n in blocks[:len(blocks) // 2]])
    elif how == "cleared":  # (a piece of a.bin: written again, its stamp not kept)
        again.clear_piece(ih, 0)
        _off_main(pool, lambda: [again.write_block_direct(ih, p, b, src.read(p, b, n))
                                 for p, b, n in blocks if p == 0])
    elif how == "moved":
        save = tmp_path / "elsewhere"
        _off_main(pool, again.move_storage, ih, save)
    elif how == "renamed":  # (a file renamed has a new change time)
        _off_main(pool, again.rename_file, ih, 0, "payload/renamed/a.bin")
    else:
        other = make_torrent_lt(content, 16384, "v1")
        o = _off_main(pool, again.register, other, save)
        osrc = Source(other, tmp_path / "src")
        _off_main(pool, lambda: [again.write_block_direct(o, p, b, osrc.read(p, b, n))
                                 for p, b, n in osrc.blocks()])
    _off_main(pool, again.flush_all)
    assert all(_verified(again.status(ih)))
    shutil.copytree(tmp_path / "state", tmp_path / "crash")  # a crash now
    shutil.copytree(tmp_path / "state", tmp_path / "crash2")  # (the same crash)
    _off_main(pool, again.close)
    crashed = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "crash"))
    st = crashed.status(ih)
    assert all(_verified(st)) and st["reverifying_pieces"] == 0, how
    _off_main(pool, crashed.close)
    _change(save / "payload" / "dir", "swapped")
    crashed = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "crash2"))
    assert _off_main(pool, _wrong_verified, crashed, ih, src) == []
    assert not all(_verified(crashed.status(ih)))
    _off_main(pool, crashed.close)
    pool.shutdown()


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_files_swapped_after_a_crash_early_in_a_download_are_seen(
        tmp_path: Path, backend: str, kind: str) -> None:
    """A download killed before it completed and before its record was written again
    (the record of its register names no file; one is written again every few thousand
    pieces): files swapped before the next start were trusted, their pieces reported
    verified over each other's bytes. The journal names each file by its inode with the
    first piece verified in it, and the start compares that."""

    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000,
                                              "dir/c.bin": 200000})
    raw = make_torrent_lt(content, PIECE, kind)
    src = Source(raw, tmp_path / "src")
    pool = concurrent.futures.ThreadPoolExecutor(1)  # (mmap: see _off_main)
    dio = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state"))
    ih = _off_main(pool, dio.register, raw, tmp_path / "dl")
    _off_main(pool, lambda: [dio.write_block_direct(ih, p, b, src.read(p, b, n))
                             for p, b, n in src.blocks() if p != 0])
    _off_main(pool, dio.flush_all)
    assert _verified(dio.status(ih)).count(False) == 1
    try:
        _crash_then_swap(tmp_path, backend, pool, dio, ih, src)
    finally:
        pool.shutdown()


def _crash_then_swap(tmp_path: Path, backend: str, pool: concurrent.futures.ThreadPoolExecutor,
                     dio: DiskIO, ih: bytes, src: Source) -> None:
    """A crash now, then dir/b.bin and dir/c.bin swapped: the next start reports no
    piece verified over bytes that are not its own."""
    import shutil

    shutil.copytree(tmp_path / "state", tmp_path / "crash")
    _off_main(pool, dio.close)
    _change(tmp_path / "dl" / "payload" / "dir", "swapped")
    crashed = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "crash"))
    try:
        assert _off_main(pool, _wrong_verified, crashed, ih, src) == []
    finally:
        _off_main(pool, crashed.close)


def test_a_file_with_a_piece_cleared_since_the_record_is_still_known_by_its_inode(
        tmp_path: Path, backend: str) -> None:
    """A piece cleared after the torrent's record was written (a bad byte found while
    seeding, ``clear_piece``), then a crash, then its file swapped with another: the
    start compared nothing of the cleared piece's file (the daemon may have written it
    since: its stamp's times are not to be trusted), and its other pieces were reported
    verified over the other file's bytes. It is compared on its inode."""

    _, src, dio, ih = _downloaded(tmp_path, backend, "v1")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        _off_main(pool, dio.clear_piece, ih, 4)  # (wholly in dir/b.bin)
        _crash_then_swap(tmp_path, backend, pool, dio, ih, src)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("op,where,how", [
    ("move", "not moved yet", "swapped"), ("move", "not moved yet", "edited"),
    ("move", "moved", "swapped"), ("move", "undone", "swapped"),
    ("rename", "another file", "rewritten")])
def test_files_changed_while_a_move_cut_short_waits_are_seen(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch, op: str, where: str,
        how: str) -> None:
    """A crash in the middle of a move or rename, then files changed before the next
    start: two swapped where the move left them (not moved yet, or moved, or not moved
    yet and the move then undone: the place it was going to cannot take them any more),
    one edited in place, or, during a rename of another file, one rewritten with its
    times put back.
    The start finishes the move, and compared no file of the torrent then (a moved file
    has a new change time, and a new inode if copied to another disk): the changed
    pieces were reported verified over bytes that are not theirs. A file the move left
    alone is compared as any; one it took (or was to take) elsewhere on its size,
    modification time and, on one file system, its inode; one not moved yet on its
    inode, where it is, before it is moved."""
    import shutil

    from pieced.storage import resume

    _, src, dio, ih = _downloaded(tmp_path, backend, "v1")
    real = resume.TorrentRecord.write_location

    def crash_as_the_move_begins(self: Any, path: Path, renames: Any, previous: Any = None,
                                 undo: bool = True) -> None:
        real(self, path, renames, previous, undo)
        if previous is not None and not (tmp_path / "crash").exists():
            shutil.copytree(tmp_path / "state", tmp_path / "crash")  # a crash now

    monkeypatch.setattr(resume.TorrentRecord, "write_location", crash_as_the_move_begins)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    save = tmp_path / "dl"
    try:
        to = tmp_path / "new" / "moved"
        if op == "move":
            _off_main(pool, dio.move_storage, ih, to)
        else:
            _off_main(pool, dio.rename_file, ih, 0, "payload/renamed/a.bin")
        _off_main(pool, dio.close)
        monkeypatch.undo()
        if where in ("not moved yet", "undone"):  # (as the crash left them)
            os.rename(to / "payload", save / "payload")
        elif op == "move":
            save = to
        if where == "undone":  # (a file where a folder of the place is to be)
            shutil.rmtree(tmp_path / "new")
            (tmp_path / "new").write_bytes(b"in the way")
        folder = save / "payload" / "dir"
        if how == "edited":  # (its modification time with it)
            with open(folder / "b.bin", "r+b") as f:
                f.seek(70000)
                f.write(b"edited!")
        else:
            _change(folder, how)
        crashed = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "crash"))
        try:
            assert crashed.torrents() == [ih], crashed.load_errors
            if where == "undone":
                assert crashed.status(ih)["save_path"] == str(tmp_path / "dl")
            assert _off_main(pool, _wrong_verified, crashed, ih, src) == []
            assert not all(_verified(crashed.status(ih)))
        finally:
            _off_main(pool, crashed.close)
    finally:
        pool.shutdown()


def test_stamps_of_an_earlier_version_still_count(tmp_path: Path, backend: str) -> None:
    """A resume record written before stamps held the change time and inode holds size
    and modification time: a restart compares those, and does not take every file of
    every torrent for changed."""
    import array

    import bencodepy
    from pieced.storage import resume

    _, _, dio, ih = _downloaded(tmp_path, backend, "v1")
    dio.close()
    [record] = (tmp_path / "state" / "torrents").glob("*/resume")
    old = bencodepy.decode(record.read_bytes())
    flat = array.array("q", old[b"stamps"])
    assert old[b"stamp_fields"] == 4
    old[b"stamps"] = array.array("q", [x for i in range(0, len(flat), 4)
                                       for x in flat[i:i + 2]]).tobytes()
    # (as that version wrote it: no checksum, nor what came after it)
    del old[b"stamp_fields"], old[b"crc"], old[b"ih"], old[b"fp_form"]
    resume.write_atomic(record, bencodepy.encode(old))
    again = DiskIO(backend, state_dir=tmp_path / "state")
    st = again.status(ih)
    assert all(_verified(st)) and st["reverifying_pieces"] == 0
    again.close()


def _complete(tmp_path: Path, raw: bytes, backend: str = "posix") -> tuple[DiskIO, bytes, Source]:
    """An engine with ``raw`` downloaded whole from ``tmp_path/src`` into ``tmp_path/dl``."""
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    src = Source(raw, tmp_path / "src")
    fill(dio, ih, src)
    dio.flush_all()
    return dio, ih, src


def _cross_seeded(tmp_path: Path, backend: str) -> tuple[bytes, DiskIO, bytes, bytes]:
    """A v1 torrent downloaded, and a hybrid one of the same payload registered in the
    same save path (cross-seeding: they share its files). (v1 metainfo, engine, v1, hybrid)"""
    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000})
    raw_a = make_torrent_lt(content, PIECE, "v1")
    raw_b = make_torrent_lt(content, PIECE, "hybrid")
    dio, a, _ = _complete(tmp_path, raw_a, backend)
    return raw_a, dio, a, dio.register(raw_b, tmp_path / "dl")


@pytest.mark.parametrize("when", ["at once", "at the next start"])
def test_a_torrent_removed_with_its_files_leaves_those_another_torrent_holds(
        tmp_path: Path, backend: str, when: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-seeding: a v1 and a hybrid torrent of one payload in one save path share
    its files. Removing one with its files deleted the other's too, whose pieces were
    still reported verified."""
    from pieced.storage import files

    raw_a, dio, a, b = _cross_seeded(tmp_path, backend)
    # (On mmap, B's opens break A's leases. The daemon opens files on worker threads,
    # while its main thread takes the lease-break signal; here too.)
    checked = concurrent.futures.ThreadPoolExecutor(1).submit(dio.recheck, b)
    assert all(checked.result().have)
    if when == "at once":
        dio.unregister(b, delete_files=True)
    else:  # the deletion fails part-way: finished by the next start
        def fails(self: files.FileStorage, keep: object = ()) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(files.FileStorage, "delete_files", fails)
        with pytest.raises(OSError):
            dio.unregister(b, delete_files=True)
        monkeypatch.undo()
        dio.close()
        dio = DiskIO(backend, state_dir=tmp_path / "state")
        assert dio.load_errors == []
    assert dio.torrents() == [a]
    assert all(_verified(wait_reverified(dio, a)))
    assert all(lt_recheck(raw_a, tmp_path / "dl"))
    dio.close()


def test_a_piece_under_way_in_a_file_swapped_before_a_recheck_starts_over(
        tmp_path: Path, backend: str) -> None:
    """Half a piece written, its file swapped for another, a recheck (which takes the
    files under their names from then on), then the rest of the piece: it verified from
    its hash state, its first half in the other file (wrong on disk under its name).
    The recheck now starts such a piece over, told as failed."""
    content = make_payload(tmp_path / "src", {"b.bin": 4 * PIECE, "c.bin": 4 * PIECE})
    raw = make_torrent_lt(content, PIECE, "v1")
    src = Source(raw, tmp_path / "src")
    told: list[tuple[int, bool]] = []
    dio = DiskIO(backend, on_piece=lambda r: told.append((r.piece, r.ok)))
    ih = dio.register(raw, tmp_path / "dl")
    blocks = src.blocks()
    first = [(p, b, n) for p, b, n in blocks if p == 1][:1]
    for p, b, n in [x for x in blocks if x[0] != 1] + first:
        dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    folder = tmp_path / "dl" / "payload"
    os.rename(folder / "b.bin", folder / "t")
    os.rename(folder / "c.bin", folder / "b.bin")
    os.rename(folder / "t", folder / "c.bin")
    checked = concurrent.futures.ThreadPoolExecutor(1).submit(dio.recheck, ih)
    checked.result()
    assert (1, False) in told  # started over: its blocks are to be sent again
    for p, b, n in [x for x in blocks if x[0] == 1]:
        dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    truth = lt_recheck(raw, tmp_path / "dl")
    assert _verified(dio.status(ih))[1] and truth[1]
    assert [ok for p, ok in told if p == 1] == [False, True]
    dio.close()


@pytest.mark.parametrize("how", ["swapped", "rewritten"])
def test_files_changed_during_a_run_that_never_opened_them_are_not_trusted(
        tmp_path: Path, backend: str, how: str) -> None:
    """A run that never opened the files (nothing asked of them) recorded at its clean
    stop the stamps of whatever was under their names then: files swapped, or rewritten
    with their times put back, while it ran were trusted by the next start."""
    raw, _, dio, ih = _downloaded(tmp_path, backend, "v1")
    dio.close()
    idle = DiskIO(backend, state_dir=tmp_path / "state")
    assert all(_verified(idle.status(ih)))
    folder = tmp_path / "dl" / "payload" / "dir"
    if how == "swapped":
        _swap(folder)
    else:
        _plant(folder)
    idle.close()
    _next_start_sees_it(raw, tmp_path / "dl", backend, ih, tmp_path / "state")


def test_two_cross_seeded_torrents_removed_with_their_files_at_once_leave_none(
        tmp_path: Path, backend: str) -> None:
    """Each removal kept the files for the other, itself being removed with them: both
    left every file, for good."""
    _, dio, a, b = _cross_seeded(tmp_path, backend)
    gate = threading.Barrier(2)

    def remove(ih: bytes) -> None:
        gate.wait()
        dio.unregister(ih, delete_files=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(remove, a), pool.submit(remove, b)]:
            done.result()
    assert dio.torrents() == []
    assert not (tmp_path / "dl" / "payload").exists()
    dio.close()


def _off_main(pool: concurrent.futures.ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on ``pool``'s thread, this one polling (not blocked) meanwhile."""
    import time

    done = pool.submit(fn, *args)
    while not done.done():
        time.sleep(0.01)
    return done.result()


@pytest.mark.backends(exclude={
    "disabled": STORES_NOTHING,
    "direct": "gathers a piece's blocks before writing them: none of a piece under way is on disk",
    "uring": "gathers a piece's blocks before writing them: none of a piece under way is on disk"})
@pytest.mark.parametrize("how", ["deleted", "cut short"])
def test_a_recheck_answers_for_a_file_gone_with_blocks_not_yet_synced(
        tmp_path: Path, backend: str, how: str) -> None:
    """A payload file holding blocks of a piece under way (written, not yet synced) is
    deleted or cut short behind the daemon's back, and a recheck is asked to find what
    that cost: its sync of the torrent's files met the file gone, and the recheck failed
    with ENOENT (a second one answered). It answers now: the file's pieces missing, the
    others' as the disk says."""
    content = make_payload(tmp_path / "src", {"a.bin": 300000, "b.bin": 200000}, seed=3)
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, tmp_path / "src")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    dio = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state"))
    ih = _off_main(pool, dio.register, raw, tmp_path / "dl")
    last = src.meta.num_pieces - 1
    _off_main(pool, lambda: [  # b.bin's last piece whole, a.bin's second piece begun
        *[dio.write_block_direct(ih, last, b, src.read(last, b, min(16384, src.layout.piece_size(last) - b)))
          for b in range(0, src.layout.piece_size(last), 16384)],
        dio.write_block_direct(ih, 1, 0, src.read(1, 0, 16384))])
    victim = tmp_path / "dl" / "payload" / "a.bin"
    if how == "deleted":
        subprocess.run(["rm", str(victim)], check=True)
    else:
        # (a blocking open, as most programs do: the mmap backend's lease is given back
        # as it breaks; `truncate` opens without blocking, and fails then, EAGAIN)
        subprocess.run([sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 1000)",
                        str(victim)], check=True)
    result = _off_main(pool, dio.recheck, ih)
    assert result.failed_v1 == list(range(last)) and result.have[last], result.failed_v1
    st = _off_main(pool, dio.status, ih)
    assert _verified(st) == [False] * last + [True]
    _off_main(pool, dio.close)
    pool.shutdown()


def test_a_write_into_files_a_torrent_being_removed_shares_is_stored(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two torrents of one payload share its files, both downloading. One is removed
    (another client's unregister) while a block of the other lands in a piece the first
    had under way: between the removal letting the first's pieces under way go and its
    leaving the list of torrents sharing the files, the write found that piece still
    partial with nothing under way, and failed (KeyError: INTERNAL to the client, a
    traceback in the daemon's log). The torrent being removed is now left alone."""
    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000})
    raw_a = make_torrent_lt(content, PIECE, "v1")
    raw_b = make_torrent_lt(content, PIECE, "hybrid")
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    a = dio.register(raw_a, tmp_path / "dl")
    b = dio.register(raw_b, tmp_path / "dl")
    src_a, src_b = Source(raw_a, tmp_path / "src"), Source(raw_b, tmp_path / "src")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    # B's piece 0 under way (its first block), through the file A shares
    _off_main(pool, dio.write_chunk, b, 0, 0, src_b.read(0, 0, 16384), True)
    tb = dio.torrent(b)
    reached, go = threading.Event(), threading.Event()
    reshare = DiskIO._reshare

    def held(self: DiskIO, changed: Any = None) -> None:
        if changed is tb:  # B removed, its pieces under way gone, still sharing A's files
            reached.set()
            go.wait(30)
        reshare(self, changed)

    monkeypatch.setattr(DiskIO, "_reshare", held)
    removal = concurrent.futures.ThreadPoolExecutor(1).submit(dio.unregister, b, True)
    assert reached.wait(30)
    try:  # A's piece 0: into B's piece 0, under way no more
        _off_main(pool, lambda: [dio.write_block_direct(a, 0, at, src_a.read(0, at, 16384))
                                 for at in (0, 16384)])
    finally:
        go.set()
    removal.result(30)
    monkeypatch.undo()
    _off_main(pool, fill, dio, a, src_a)
    _off_main(pool, dio.flush_all)
    assert all(_verified(dio.status(a))) and dio.torrents() == [a]
    assert all(lt_recheck(raw_a, tmp_path / "dl"))
    _off_main(pool, dio.close)
    pool.shutdown()


def test_a_bad_block_for_one_of_two_cross_seeded_torrents_unverifies_the_other(
        tmp_path: Path, backend: str) -> None:
    """Two torrents of one payload share its files. Bad blocks written for one (its
    piece fails) went into pieces the other had verified, which stayed reported
    verified, were served, and were kept after a crash (libtorrent does the same: its
    torrents do not know of each other). The other's pieces under such a write now
    start over and are checked again: the bad ones are not verified any more, before
    or after a crash; once the good blocks are written, both torrents are whole."""
    import shutil

    from tests.test_state import _on_disk

    raw_a, dio, a, b = _cross_seeded(tmp_path, backend)
    src_a = Source(raw_a, tmp_path / "src")
    raw_b = make_torrent_lt(next((tmp_path / "src").iterdir()), PIECE, "hybrid")
    # (mmap: files opened off the main thread, which polls: a lease break's signal may
    # reach another thread, and its handler runs once the main thread runs again)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    size = dio.torrent(b).layout.piece_size(0)
    results = _off_main(pool, lambda: [
        dio.write_block_direct(b, 0, at, b"\xee" * min(16384, size - at))
        for at in range(0, size, 16384)])
    assert results[-1] is not None and not results[-1].ok  # B's piece 0 failed
    st = _off_main(pool, wait_reverified, dio, a)
    lost = [p for p, v in enumerate(_verified(st)) if not v]
    if dio.torrent(b).storage.gathers_writes:
        assert lost == []  # a piece's blocks gathered, the bad ones never written
    else:
        assert 0 in lost  # A's piece under B's piece 0: not verified any more
    wrong = _off_main(pool, lambda: [p for p, v in enumerate(_verified(st)) if v and _on_disk(
        src_a, tmp_path / "dl", p) != src_a.read(p, 0, src_a.layout.piece_size(p))])
    assert wrong == []
    shutil.copytree(tmp_path / "state", tmp_path / "crash")  # a crash now
    crashed = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "crash"))
    st = _off_main(pool, wait_reverified, crashed, a)
    _off_main(pool, crashed.close)
    assert not any(_verified(st)[p] for p in lost)
    # B's good blocks: B whole, and A whole again, as checked from the disk
    _off_main(pool, fill, dio, b, Source(raw_b, tmp_path / "src"))
    _off_main(pool, dio.flush_all)
    assert all(_verified(dio.status(b)))
    assert all(_off_main(pool, dio.recheck, a).have)
    _off_main(pool, dio.close)
    pool.shutdown()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_torrent_coming_to_share_files_waits_for_the_writes_under_way_into_them(
        tmp_path: Path, backend: str) -> None:
    """A torrent registered over files another torrent was writing a bad block into,
    and checked at once: the write had taken the other as sharing nothing, and went on
    unseen. The check found the bytes there before it, the piece was verified, and the
    write then went over it: a piece reported verified over wrong bytes, after a restart
    too. (The write is held half-way here by its storage's writev.)"""
    import shutil

    from tests.test_state import _on_disk

    content = make_payload(tmp_path / "src", {"a.bin": 40 * 16384}, seed=21)
    raw_a = make_torrent_lt(content, 16384, "v1")
    raw_b = make_torrent_lt(content, 65536, "v1")
    src_b = Source(raw_b, content.parent)  # (the bytes as they should be)
    shutil.copytree(content.parent, tmp_path / "dl")
    # (mmap: files opened off the main thread, which polls: see the test above)
    pool = concurrent.futures.ThreadPoolExecutor(3)
    dio = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state"))
    try:
        a = _off_main(pool, dio.register, raw_a, tmp_path / "dl")  # (every piece missing)
        storage = dio.torrent(a).storage
        writev, going, go = storage.writev, threading.Event(), threading.Event()

        def held(segs: Any, bufs: Any) -> int:
            going.set()
            go.wait(30)
            return writev(segs, bufs)

        storage.writev = held  # type: ignore[method-assign]
        bad = pool.submit(dio.write_block_direct, a, 5, 0, b"\xee" * 16384)
        if not storage.gathers_writes:  # (else a failed piece's block is never written)
            assert going.wait(30)

        def register_and_check() -> bytes:
            b = dio.register(raw_b, tmp_path / "dl")
            dio.recheck(b, full=True)
            return b

        other = pool.submit(register_and_check)
        time.sleep(1.0)
        go.set()
        bad.result(30)
        b = other.result(30)
        storage.writev = writev  # type: ignore[method-assign]
        _off_main(pool, wait_reverified, dio, b)
        have = _verified(dio.status(b))
        wrong = _off_main(pool, lambda: [
            p for p, v in enumerate(have) if v and _on_disk(src_b, tmp_path / "dl", p)
            != src_b.read(p, 0, src_b.layout.piece_size(p))])
        assert wrong == [], "pieces of B reported verified over A's bad block"
        # (a backend that gathers a piece's blocks holds the bad one: the disk is good)
        gathers = dio.torrent(b).storage.gathers_writes
        assert sum(have) == len(have) - (0 if gathers else 1)
    finally:
        go.set()
        _off_main(pool, dio.close)
        pool.shutdown()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_good_write_for_one_cross_seeded_torrent_leaves_the_others_verified_pieces_be(
        tmp_path: Path, backend: str) -> None:
    """A, of 16 KiB pieces, has its piece 1 verified (its piece 0 not written); B, the
    same file in 32 KiB pieces, writes its piece 0, good, at once: over A's unwritten
    piece 0 and A's verified piece 1, whose bytes it leaves as they were. The write was
    compared whole, so A's piece 1 was cleared (told changed, journaled missing) and
    checked again, and a crash before the check lost it for good. Now only A's pieces
    whose bytes the write changes start over: piece 1 stays verified throughout, and
    after a crash right after the write."""
    import shutil

    content = make_payload(tmp_path / "src", 4 * 16384, seed=61)
    raw_a = make_torrent_lt(content, 16384, "v1")
    raw_b = make_torrent_lt(content, 32768, "v1")
    src_a, src_b = Source(raw_a, tmp_path / "src"), Source(raw_b, tmp_path / "src")
    changed: list[bytes] = []
    dio = DiskIO(backend, state_dir=tmp_path / "state", sync_window=0.002,
                 on_change=changed.append)
    try:
        a = dio.register(raw_a, tmp_path / "dl")
        b = dio.register(raw_b, tmp_path / "dl")
        assert dio.torrent(a).shared, "the two torrents share their file"
        r = dio.write_chunk(a, 1, 0, src_a.read(1, 0, 16384))
        assert r is not None and r.ok
        dio.flush_all()
        r = dio.write_chunk(b, 0, 0, src_b.read(0, 0, 32768))
        assert r is not None and r.ok
        assert _verified(dio.status(a))[1], "A's piece 1 cleared by a write of its bytes"
        assert a not in changed
        shutil.copytree(tmp_path / "state", tmp_path / "crash")  # a crash now
        dio.flush_all()
        assert wait_reverified(dio, a)["verified_pieces"] >= 1
    finally:
        dio.close()
    crashed = DiskIO(backend, state_dir=tmp_path / "crash")
    try:
        assert _verified(wait_reverified(crashed, a))[1]
    finally:
        crashed.close()


def _wrong_verified(dio: DiskIO, ih: bytes, src: Source) -> list[int]:
    """Pieces ``ih`` reports verified whose bytes on disk (after any rename) are not
    the payload's."""
    t = dio.torrent(ih)
    st = wait_reverified(dio, ih)
    wrong = []
    for p, v in enumerate(_verified(st)):
        if not v:
            continue
        at = 0  # (the piece's bytes in its files, against the payload's: pads left out)
        for s in t.layout.map(p, 0, t.layout.piece_size(p)):
            if s.stored:
                on = Path(t.storage.file_path(s.file_index)).read_bytes()[
                    s.file_offset:s.file_offset + s.length]
                if on != src.read(p, at, s.length):
                    wrong.append(p)
                    break
            at += s.length
    return wrong


def test_a_write_into_a_cross_seeded_piece_while_it_is_checked_is_not_missed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write for one torrent sends the other's piece to be checked again; a second
    write (bad bytes) landing while that check had read the piece and not yet said
    what it found was missed: the piece ended verified over the bad bytes. A check now
    leaves a piece written into since it began as it is, and checks it again. (A write
    of the bytes already there changes nothing, and asks for no check.)"""
    big = 1 << 20
    content = make_payload(tmp_path / "src", 2 * big, seed=17)
    raw_x = make_torrent_lt(content, big, "v1")
    raw_t = make_torrent_lt(content, 16384, "v1")
    dio, x, src_x = _complete(tmp_path, raw_x)
    t = dio.register(raw_t, tmp_path / "dl")
    good = Source(raw_t, tmp_path / "src")
    original = DiskIO._verify
    once: list[bool] = []

    def checks_then_meets_a_write(self: DiskIO, tor: Any, *args: Any, **kw: Any) -> Any:
        result = original(self, tor, *args, **kw)
        if tor.key == x and not once:  # read, not yet applied: the bad block lands
            once.append(True)
            self.write_block_direct(t, 1, 0, b"\xee" * 16384)
        return result

    monkeypatch.setattr(DiskIO, "_verify", checks_then_meets_a_write)
    dio.write_block_direct(t, 0, 0, good.read(0, 0, 16384))  # the same bytes: no check
    assert all(_verified(dio.status(x))) and not once
    dio._check_again(dio.torrent(x), [0])  # a check of X's piece 0 (as a bad write asks)
    deadline = time.monotonic() + 30
    while not once and time.monotonic() < deadline:
        time.sleep(0.01)
    assert once
    assert _wrong_verified(dio, x, src_x) == []
    assert not _verified(dio.status(x))[0]
    dio.close()


def _under_way(dio: DiskIO, ih: bytes) -> dict[int, list[list[int]]]:
    return {p: spans for p, spans in dio.status(ih, files=False, partial=True)["partial"]}


def test_two_torrents_of_one_payload_downloading_at_once_keep_each_others_pieces_under_way(
        tmp_path: Path, backend: str) -> None:
    """A (64 KiB pieces) and B (16 KiB pieces) of one payload, both downloading into
    its files. A has the first block of its piece 0; B then writes its pieces 1 and 2,
    the rest of A's piece 0, where A has nothing yet. The write was compared with the
    zeros there and threw A's piece away (told failed: sent again whole), and a fifth
    to a third of the blocks of two such downloads were sent twice. Now A's piece
    starts over only where B changes bytes A has received: not for B's good bytes, nor
    for B's bad ones where A has nothing (A's own blocks go over them), but for B's bad
    bytes over A's block."""
    content = make_payload(tmp_path / "src", 8 * 16384, seed=62)
    raw_a = make_torrent_lt(content, 65536, "v1")
    raw_b = make_torrent_lt(content, 16384, "v1")
    src_a, src_b = Source(raw_a, tmp_path / "src"), Source(raw_b, tmp_path / "src")
    told: list[tuple[bytes, int, bool]] = []
    pool = concurrent.futures.ThreadPoolExecutor(1)  # (mmap: see the tests above)
    dio = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state",
                                         on_piece=lambda r: told.append((r.info_hash, r.piece, r.ok))))
    try:
        a = _off_main(pool, dio.register, raw_a, tmp_path / "dl")
        b = _off_main(pool, dio.register, raw_b, tmp_path / "dl")
        assert dio.torrent(a).shared, "the two torrents share their file"
        _off_main(pool, dio.write_block_direct, a, 0, 0, src_a.read(0, 0, 16384))
        assert _under_way(dio, a) == {0: [[0, 16384]]}
        r = _off_main(pool, dio.write_block_direct, b, 1, 0, src_b.read(1, 0, 16384))
        assert r is not None and r.ok
        bad = _off_main(pool, dio.write_block_direct, b, 2, 0, b"\xee" * 16384)
        assert bad is not None and not bad.ok
        assert _under_way(dio, a) == {0: [[0, 16384]]}, "A's piece 0 thrown away"
        assert [x for x in told if x[0] == a] == []
        for at in (16384, 32768, 49152):  # A's blocks, over B's bad bytes too
            r = _off_main(pool, dio.write_block_direct, a, 0, at, src_a.read(0, at, 16384))
        assert r is not None and r.ok
        _off_main(pool, dio.flush_all)
        assert _wrong_verified(dio, a, src_a) == []
        # B's bad bytes over a block A has received: A's piece 1 starts over, told failed
        _off_main(pool, dio.write_block_direct, a, 1, 0, src_a.read(1, 0, 16384))
        _off_main(pool, dio.write_block_direct, b, 4, 0, b"\xee" * 16384)
        if dio.torrent(b).storage.gathers_writes:  # (B's failed piece is never written)
            assert _under_way(dio, a) == {1: [[0, 16384]]}
        else:
            assert _under_way(dio, a) == {} and (a, 1, False) in told
        _off_main(pool, fill, dio, a, src_a)
        _off_main(pool, dio.flush_all)
        assert all(_verified(dio.status(a))) and _wrong_verified(dio, a, src_a) == []
    finally:
        _off_main(pool, dio.close)
        pool.shutdown()


def _same_payload_twice(tmp_path: Path, backend: str, seed: int, pieces: int = 4,
                        ) -> tuple[DiskIO, bytes, bytes, Source, list[tuple[bytes, int, bool]]]:
    """A v1 and a hybrid torrent of one file (64 KiB pieces: the same pieces, no pads),
    registered in one folder, so that they share the file; and what the pieces were
    told (info_hash, piece, ok)."""
    content = make_payload(tmp_path / "src", pieces * 65536, seed=seed)
    raw_a = make_torrent_lt(content, 65536, "v1")
    raw_b = make_torrent_lt(content, 65536, "hybrid")
    told: list[tuple[bytes, int, bool]] = []
    dio = DiskIO(backend, state_dir=tmp_path / "state",
                 on_piece=lambda r: told.append((r.info_hash, r.piece, r.ok)))
    a = dio.register(raw_a, tmp_path / "dl")
    b = dio.register(raw_b, tmp_path / "dl")
    assert dio.torrent(a).shared, "the two torrents share their file"
    return dio, a, b, Source(raw_a, tmp_path / "src"), told


def _piece_0_kept(pool: concurrent.futures.ThreadPoolExecutor, dio: DiskIO, a: bytes,
                  src: Source, told: list[tuple[bytes, int, bool]]) -> None:
    """A's piece 0 was never told failed, and is verified, over the right bytes."""
    assert (a, 0, False) not in told
    _off_main(pool, dio.flush_all)
    assert _verified(dio.status(a))[0] and _wrong_verified(dio, a, src) == []


def test_a_piece_begun_while_a_torrent_of_the_same_payload_writes_into_it_is_kept(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """B writes the first block of a piece where A has nothing yet; A begins that piece
    (its second block) after B's write looked at A's pieces and before it went on. A
    piece missing when the write looked was started over all the same (it held
    nothing), by then with A's block in it: the block was lost and the piece told
    failed, though every byte either wrote was right (two torrents of one payload
    downloading at once lost a few pieces in a hundred this way)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)  # (mmap: see the tests above)
    dio, a, b, src, told = _off_main(pool, _same_payload_twice, tmp_path, backend, 63)
    original = DiskIO._start_over
    begun: list[bool] = []

    def a_begins_the_piece(self: DiskIO, tor: Any, *args: Any, **kw: Any) -> Any:
        if tor.key == a and not begun:
            begun.append(True)
            self.write_chunk(a, 0, 16384, src.read(0, 16384, 16384))
        return original(self, tor, *args, **kw)

    monkeypatch.setattr(DiskIO, "_start_over", a_begins_the_piece)
    try:
        _off_main(pool, dio.write_block_direct, b, 0, 0, src.read(0, 0, 16384))
        if not begun:  # (nothing was started over: A begins its piece after the write)
            _off_main(pool, dio.write_chunk, a, 0, 16384, src.read(0, 16384, 16384))
        r = None
        for at in (0, 32768, 49152):
            r = _off_main(pool, dio.write_chunk, a, 0, at, src.read(0, at, 16384))
        assert r is not None and r.ok, "A's piece was started over: its block lost"
        _piece_0_kept(pool, dio, a, src, told)
    finally:
        _off_main(pool, dio.close)
        pool.shutdown()


def test_a_piece_whose_blocks_are_on_their_way_to_the_file_is_not_thrown_away_by_its_own_bytes(
        tmp_path: Path, backend: str) -> None:
    """A's piece is complete and good, and its buffered blocks have left the buffer to
    be written, waiting for another torrent's write into the shared file: B's write
    of the same bytes, which goes first. The bytes B found there were not yet A's, and
    A's blocks were neither buffered nor in the file: B's write was taken to change
    A's piece, which was thrown away while being verified (told failed)."""
    pool = concurrent.futures.ThreadPoolExecutor(2)  # (mmap: see the tests above)
    dio, a, b, src, told = _off_main(pool, _same_payload_twice, tmp_path, backend, 64)
    ta, tb = dio.torrent(a), dio.torrent(b)
    try:
        with dio._shared_writes:  # (writes into the shared file wait: this thread polls)
            writes = pool.submit(lambda: [dio.write_chunk(a, 0, at, src.read(0, at, 16384))
                                          for at in range(0, 65536, 16384)])
            deadline = time.monotonic() + 30
            while not (ta.state[0] == HASHING and not dio.pool.has_dirty((ta.id, 0))):
                assert time.monotonic() < deadline and not writes.done(), (
                    writes.result() if writes.done() else "A's piece never got to be written")
                time.sleep(0.005)
            _off_main(pool, dio._store_shared, tb, tb.layout.map(0, 0, 16384),
                      [src.read(0, 0, 16384)])
        while not writes.done():
            time.sleep(0.01)
        r = writes.result()[-1]
        assert r is not None and r.ok, "A's piece thrown away by B's write of its bytes"
        _piece_0_kept(pool, dio, a, src, told)
    finally:
        _off_main(pool, dio.close)
        pool.shutdown()


@pytest.mark.parametrize("how", ["inline", "ring"])
def test_two_clients_writing_one_payload_for_two_torrents_at_once_lose_no_piece(
        tmp_path: Path, backend: str, how: str) -> None:
    """Two connections, each downloading one of two torrents of one file, write the
    same piece's blocks at the same moment (every byte right). A few pieces in a
    hundred were told failed, and stayed missing, though the file was right."""
    content = make_payload(tmp_path / "src", 64 * 65536, seed=65)
    raws = [make_torrent_lt(content, 65536, kind) for kind in ("v1", "hybrid")]
    src = Source(raws[0], tmp_path / "src")
    events: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def on_event(name: str, fields: dict[str, Any]) -> None:
        with lock:
            events.append((name, fields))

    (tmp_path / "d").mkdir()
    daemon = Daemon(tmp_path / "d", backend=backend)
    try:
        with Client(daemon.socket, on_event=on_event) as c0:
            ihs = [c0.register(raw, daemon.root / "dl") for raw in raws]
            for ih in ihs:
                c0.subscribe(ih)
            turn = threading.Barrier(2)

            def writer(ih: bytes) -> Callable[[], None]:
                def run() -> None:
                    with Client(daemon.socket) as c:
                        if how == "ring":
                            c.attach_ring(1 << 20)
                        for p in range(src.meta.num_pieces):
                            turn.wait(30)  # (both at the same piece at the same moment)
                            for at in range(0, 65536, 16384):
                                data = src.read(p, at, 16384)
                                if how == "ring":
                                    c.write_block_direct(ih, p, at, data)
                                else:
                                    c.write_chunk(ih, p, at, data)
                        c.wait_writes()
                        c.flush_all()
                return run

            run_threads(writer(ihs[0]), writer(ihs[1]))
            c0.flush_all()
            wait_for(lambda: all(not c0.status(ih, files=False)["reverifying_pieces"]
                                 for ih in ihs))
            failed = [(f.get("ih"), f.get("piece")) for n, f in list(events) if n == "piece_failed"]
            assert failed == []
            for ih in ihs:
                assert all(_verified(c0.status(ih, files=False))), ih.hex()
        assert (daemon.root / "dl" / content.name).read_bytes() == content.read_bytes()
    finally:
        assert daemon.stop() == 0, daemon.stderr()


def test_a_parked_piece_keeps_its_place_when_a_torrent_of_the_same_payload_writes_beside_it(
        tmp_path: Path, backend: str) -> None:
    """As above, with A's piece let go to make room for a third torrent's (parked: its
    block in its file, its ranges kept). B's good bytes where the parked piece has
    nothing threw it away all the same (told failed: fetched again whole), as they did a
    piece under way before; B's bad bytes over its block still start it over."""
    content = make_payload(tmp_path / "src", 16 * 16384, seed=62)
    raw_a = make_torrent_lt(content, 65536, "v1")
    raw_b = make_torrent_lt(content, 16384, "v1")
    other = make_payload(tmp_path / "srcc", 4 * 16384, seed=63)
    raw_c = make_torrent_lt(other, 16384, "v1")
    src_a, src_b = Source(raw_a, tmp_path / "src"), Source(raw_b, tmp_path / "src")
    src_c = Source(raw_c, tmp_path / "srcc")
    told: list[tuple[bytes, int, bool]] = []
    pool = concurrent.futures.ThreadPoolExecutor(1)  # (mmap: see the tests above)
    dio = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state",
                                         max_partial_pieces=2,
                                         on_piece=lambda r: told.append((r.info_hash, r.piece, r.ok))))
    try:
        a = _off_main(pool, dio.register, raw_a, tmp_path / "dl")
        b = _off_main(pool, dio.register, raw_b, tmp_path / "dl")
        c = _off_main(pool, dio.register, raw_c, tmp_path / "dlc")
        for p in range(4):  # A begins twice the bound: C's first block parks one of them
            _off_main(pool, dio.write_block_direct, a, p, 0, src_a.read(p, 0, 16384))
        _off_main(pool, dio.write_block_direct, c, 0, 0, src_c.read(0, 0, 8192))
        parked = sorted(dio.torrent(a).parked)
        assert parked and dio.stats()["pieces_parked"] == 1
        p = parked[0]
        for q in range(4 * p + 1, 4 * p + 3):  # B's good bytes beside A's block
            r = _off_main(pool, dio.write_block_direct, b, q, 0, src_b.read(q, 0, 16384))
            assert r is not None and r.ok
        assert _under_way(dio, a)[p] == [[0, 16384]], "A's parked piece thrown away"
        assert [x for x in told if x[0] == a] == []
        _off_main(pool, dio.write_block_direct, b, 4 * p, 0, b"\xee" * 16384)  # over its block
        if dio.torrent(b).storage.gathers_writes:  # (B's failed piece is never written)
            assert _under_way(dio, a)[p] == [[0, 16384]]
        else:
            assert p not in _under_way(dio, a) and (a, p, False) in told
        # C's piece done, A's pieces are taken up (the parked one too), one at a time
        _off_main(pool, dio.write_block_direct, c, 0, 8192, src_c.read(0, 8192, 8192))
        _off_main(pool, fill, dio, a, src_a)
        _off_main(pool, dio.flush_all)
        assert all(_verified(dio.status(a))) and _wrong_verified(dio, a, src_a) == []
    finally:
        _off_main(pool, dio.close)
        pool.shutdown()


@pytest.mark.backends(exclude={
    "disabled": STORES_NOTHING,
    "direct": "gathers a piece's blocks before writing them: none of a piece under way is on disk",
    "uring": "gathers a piece's blocks before writing them: none of a piece under way is on disk"})
def test_a_block_written_over_before_it_is_counted_received_is_not_taken_as_there(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A's first block of its piece 0 is on disk, and not yet counted received by A's
    hash state (held there), when B's bad block goes over it: B's write finds nothing of
    A's piece received there, and leaves it under way. A's hash state then counts the
    block it hashed as it was sent, while the file holds B's bytes: were the piece left
    under way, it would pass with A's next block and be reported verified over B's.
    A's writer sees the piece written into during its write, finds its block gone, and
    starts the piece over."""
    from pieced.storage.hashing import PieceHasher

    content = make_payload(tmp_path / "src", 4 * 16384, seed=63)
    raw_a = make_torrent_lt(content, 32768, "v1")
    raw_b = make_torrent_lt(content, 16384, "v1")
    src_a = Source(raw_a, tmp_path / "src")
    told: list[tuple[bytes, int, bool]] = []
    pool = concurrent.futures.ThreadPoolExecutor(2)
    dio = _off_main(pool, lambda: DiskIO(backend, state_dir=tmp_path / "state",
                                         on_piece=lambda r: told.append((r.info_hash, r.piece, r.ok))))
    try:
        a = _off_main(pool, dio.register, raw_a, tmp_path / "dl")
        b = _off_main(pool, dio.register, raw_b, tmp_path / "dl")
        add, stored, go = PieceHasher.add, threading.Event(), threading.Event()

        def held(self: PieceHasher, *args: Any, **kw: Any) -> None:
            if threading.current_thread().name == "a" and not stored.is_set():
                stored.set()
                go.wait(30)
            add(self, *args, **kw)

        monkeypatch.setattr(PieceHasher, "add", held)

        def first_block() -> Any:
            threading.current_thread().name = "a"
            try:
                return dio.write_block_direct(a, 0, 0, src_a.read(0, 0, 16384))
            finally:
                threading.current_thread().name = "not a"

        under_way = pool.submit(first_block)
        assert stored.wait(30)
        try:
            bad = _off_main(pool, dio.write_block_direct, b, 0, 0, b"\xee" * 16384)
            assert bad is not None and not bad.ok
        finally:
            go.set()
        under_way.result(30)
        monkeypatch.undo()
        r = _off_main(pool, dio.write_block_direct, a, 0, 16384, src_a.read(0, 16384, 16384))
        _off_main(pool, dio.flush_all)
        assert r is None or not r.ok
        assert (a, 0, False) in told
        assert _wrong_verified(dio, a, src_a) == []
        _off_main(pool, fill, dio, a, src_a)
        _off_main(pool, dio.flush_all)
        assert all(_verified(dio.status(a))) and _wrong_verified(dio, a, src_a) == []
    finally:
        go.set()
        _off_main(pool, dio.close)
        pool.shutdown()


def test_sharing_is_found_after_a_torrents_first_file_is_renamed_away(
        tmp_path: Path) -> None:
    """A torrent whose first file was renamed out of its folder was not seen to share
    its other files with a torrent registered after: that one's bad blocks went into
    its verified pieces, which stayed verified."""
    content = make_payload(tmp_path / "src", {"a.bin": 100000, "b.bin": 300000}, seed=18)
    raw_a = make_torrent_lt(content, 32768, "v1")
    raw_b = make_torrent_lt(content, 32768, "hybrid")
    dio, a, src_a = _complete(tmp_path, raw_a)
    ta = dio.torrent(a)
    dio.rename_file(a, 0, "elsewhere/" + ta.storage.parts(0)[-1])
    b = dio.register(raw_b, tmp_path / "dl")
    tb = dio.torrent(b)
    assert ta.shared
    j = next(i for i in tb.storage.stored_files() if tb.storage.parts(i)[-1] == "b.bin")
    for p in tb.layout.file_pieces(j):
        size = tb.layout.piece_size(p)
        for at in range(0, size, 16384):
            dio.write_block_direct(b, p, at, b"\xee" * min(16384, size - at))
    dio.flush_all()
    assert _wrong_verified(dio, a, src_a) == []
    dio.close()


def test_sharing_is_found_between_a_folder_and_a_file_saved_inside_it(tmp_path: Path) -> None:
    """A torrent of folder ``pack`` and one of its files, ``pack/sub/x.bin``, saved in
    ``pack/sub``, share that file; a torrent of ``pack-2`` beside them (a name that
    sorts between the two, character by character) shares nothing with either."""
    content = make_payload(tmp_path / "src", {"sub/x.bin": 50_000, "y.bin": 7}, seed=19)
    pack = content.rename(tmp_path / "src" / "pack")
    other = make_payload(tmp_path / "src2", {"z.bin": 10}, seed=20).rename(
        tmp_path / "src2" / "pack-2")
    raw_pack = make_torrent_lt(pack, 16384, "v1")
    raw_x = make_torrent_lt(pack / "sub" / "x.bin", 16384, "v1")
    raw_other = make_torrent_lt(other, 16384, "v1")
    dio = DiskIO("posix", roots=[tmp_path])
    try:
        a = dio.register(raw_pack, tmp_path / "dl")
        c = dio.register(raw_other, tmp_path / "dl")
        b = dio.register(raw_x, tmp_path / "dl" / "pack" / "sub")
        ta, tb, tc = dio.torrent(a), dio.torrent(b), dio.torrent(c)
        x = next(i for i in ta.storage.stored_files() if ta.storage.parts(i)[-1] == "x.bin")
        assert [(o.key, j) for o, j in ta.shared[x]] == [(b, 0)]
        assert [(o.key, j) for o, j in tb.shared[0]] == [(a, x)]
        assert len(ta.shared) == 1 and not tc.shared
        dio.unregister(b)
        assert not ta.shared
    finally:
        dio.close()


def test_files_another_torrent_shares_are_neither_moved_nor_renamed(
        tmp_path: Path, backend: str) -> None:
    """Cross-seeding: moving one of two torrents that share their files took the files
    from under the other, whose pieces stayed reported verified over files no longer
    there (lost at the next start), and whose open files then took a bad peer's blocks
    for the first one's verified pieces. A move or rename of shared files is refused,
    naming the other torrent, and changes nothing; with that one gone, the move is done."""
    from pieced.storage.errors import BadRequest

    _, dio, a, b = _cross_seeded(tmp_path, backend)
    pool = concurrent.futures.ThreadPoolExecutor(1)  # (mmap: see _off_main)
    assert all(_off_main(pool, dio.recheck, b).have)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "dl").rglob("*"))
    for ih, other in ((a, b), (b, a)):
        with pytest.raises(BadRequest, match=f"shared with torrent {other.hex()}"):
            _off_main(pool, dio.move_storage, ih, tmp_path / "elsewhere")
        for index in dio.torrent(ih).storage.stored_files():
            with pytest.raises(BadRequest, match="shared with torrent"):
                _off_main(pool, dio.rename_file, ih, index, "renamed.bin")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "dl").rglob("*")) == before
    assert not (tmp_path / "elsewhere").exists()
    assert all(_verified(dio.status(a))) and all(_verified(dio.status(b)))
    _off_main(pool, dio.unregister, b)
    _off_main(pool, dio.move_storage, a, tmp_path / "elsewhere")
    assert all(_verified(dio.status(a)))
    assert all(_off_main(pool, dio.recheck, a).have)
    _off_main(pool, dio.close)
    pool.shutdown()


def test_a_register_that_would_share_the_files_of_a_torrent_being_moved_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a torrent's files are on their way elsewhere, a torrent of the same payload
    registered in the same save path would come to share files that are leaving: it is
    refused (register again once the move is done), and the move completes whole."""
    from pieced.storage.errors import BadRequest
    from pieced.storage.files import FileStorage

    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000})
    raw_a = make_torrent_lt(content, PIECE, "v1")
    raw_b = make_torrent_lt(content, PIECE, "hybrid")
    dio, a, _ = _complete(tmp_path, raw_a)
    moving, go = threading.Event(), threading.Event()
    original = FileStorage.move

    def slow_move(self: FileStorage, new_path: Path) -> None:
        moving.set()
        assert go.wait(30)
        original(self, new_path)

    monkeypatch.setattr(FileStorage, "move", slow_move)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        moved = pool.submit(dio.move_storage, a, tmp_path / "elsewhere")
        assert moving.wait(30)
        with pytest.raises(BadRequest, match=f"being moved by torrent {a.hex()}"):
            dio.register(raw_b, tmp_path / "dl")
        go.set()
        moved.result()
    assert dio.torrents() == [a]
    assert all(_verified(dio.status(a)))
    assert all(dio.recheck(a).have)
    b = dio.register(raw_b, tmp_path / "dl")  # now: nothing of it there, nothing shared
    assert not dio.torrent(b).shared and not any(_verified(dio.status(b)))
    dio.close()


def test_a_move_into_a_folder_of_the_torrents_own_files_is_refused(tmp_path: Path) -> None:
    """A torrent "payload" of files payload/a.bin and payload/payload/a.bin, only the
    first downloaded, moved into its own folder: the first file went where the second belongs, and
    was then moved on as the second (libtorrent does the same): pieces reported verified
    over a file no longer there. Such a move is refused, and changes nothing."""
    from pieced.storage.errors import BadRequest

    content = make_payload(tmp_path / "src", {"a.bin": 65536, "payload/a.bin": 65536})
    raw = make_torrent_lt(content, 16384, "v1")
    dio = DiskIO("posix", state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    src = Source(raw, tmp_path / "src")
    t = dio.torrent(ih)
    first = next(i for i in t.storage.stored_files() if t.storage.parts(i) == ("payload", "a.bin"))
    for p in t.layout.file_pieces(first):
        size = t.layout.piece_size(p)
        for at in range(0, size, 16384):
            dio.write_block_direct(ih, p, at, src.read(p, at, min(16384, size - at)))
    dio.flush_all()
    have = _verified(dio.status(ih))
    assert any(have)
    with pytest.raises(BadRequest, match="own"):
        dio.move_storage(ih, tmp_path / "dl" / "payload")
    assert (tmp_path / "dl" / "payload" / "a.bin").is_file()
    assert not (tmp_path / "dl" / "payload" / "payload" / "payload").exists()
    assert _verified(dio.status(ih)) == have
    assert dio.recheck(ih).have == have
    dio.close()


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_a_file_whose_zero_tail_is_cut_off_fails_the_pieces_past_its_end(
        tmp_path: Path, backend: str, kind: str) -> None:
    """A file whose last 100,000 bytes are zeros in the torrent, found (or made, while
    the daemon runs) 50,000 bytes long: a read past its end gives zeros, and the pieces
    there verified, over bytes not on disk; libtorrent (and ``pieced verify``) fails
    them. A plugin took the download for complete, with the file short."""
    save = tmp_path / "save"
    save.mkdir()
    data = save / "data.bin"
    data.write_bytes(os.urandom(50000) + bytes(100000))
    raw = make_torrent_lt(data, 16384, kind)
    os.truncate(data, 50000)
    expected = lt_recheck(raw, save)
    assert expected == [True] * 3 + [False] * 7
    dio = DiskIO(backend, state_dir=tmp_path / "state")
    try:
        ih = dio.register(raw, save)
        assert dio.recheck(ih, full=True).have == expected
        assert dio.recheck(ih).have == expected  # (by fingerprint too)
        assert data.stat().st_size == 50000  # (a check changes nothing on disk)
        with open(data, "ab") as f:  # whole again: every piece verifies
            f.write(bytes(100000))
        assert dio.recheck(ih, full=True).have == [True] * 10
        os.truncate(data, 50000)  # cut short while the daemon has it verified
        assert dio.recheck(ih).have == expected
        assert dio.recheck(ih, full=True).have == expected
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("change", ["renamed-away", "replaced", "folder-away", "cut-short",
                                    "deleted"])
def test_a_file_changed_while_a_recheck_reads_it_is_not_found_good(
        tmp_path: Path, backend: str, change: str) -> None:
    """A complete torrent of three files is rechecked; while the check is in the middle
    file, that file is renamed away, replaced by another renamed over it, moved with
    its folder, cut short, or deleted. The check read on through its descriptor: every
    piece was reported verified with the file not there, or another there (a deleted
    one ended the check with ENOENT). Now the files are looked at when the check is
    done: the pieces of one changed under it are not found good, and whatever is
    reported verified has its bytes at the save path."""
    mib = 1024 * 1024
    content = make_payload(tmp_path / "src", {"a.bin": 8 * mib, "sub/b.bin": 24 * mib,
                                              "c.bin": 8 * mib}, seed=29)
    raw = make_torrent_lt(content, 256 * 1024, "v1")
    src = Source(raw, tmp_path / "src")
    meta = src.meta
    b = next(i for i, f in enumerate(meta.files) if f.path[-1] == "b.bin")
    b_pieces = src.layout.file_pieces(b)
    save = tmp_path / "src"
    path = save.joinpath(*meta.files[b].path)
    dio = DiskIO(backend, state_dir=tmp_path / "state", hash_workers=1)
    try:
        ih = dio.register(raw, save)
        assert dio.recheck(ih, full=True).ok
        done_at: list[int] = []

        def change_it(done: int, total: int) -> None:
            if done_at or done <= b_pieces[0]:  # (reported after each 8 MiB: b half read)
                return
            done_at.append(done)
            if change == "renamed-away":
                path.rename(path.with_name("b.away"))
            elif change == "replaced":
                other = path.with_name("b.new")
                other.write_bytes(os.urandom(path.stat().st_size))
                other.rename(path)
            elif change == "folder-away":
                path.parent.rename(tmp_path / "elsewhere")
            elif change == "cut-short":
                # By another program: an open or truncate of a file the mmap backend
                # has mapped waits until the daemon gives it back (a lease break), and
                # this one, as the daemon's own, would be interrupted by the break.
                subprocess.run([sys.executable, "-c", "import os, sys; "
                                "os.truncate(sys.argv[1], 1 << 20)", str(path)],
                               check=True, timeout=40)
            else:
                path.unlink()

        result = dio.recheck(ih, progress=change_it, full=True)
        assert done_at and done_at[0] < meta.num_pieces, done_at
        have = dio.status(ih)["have"]
        said = [p for p in range(meta.num_pieces) if have[p >> 3] & (0x80 >> (p & 7))]
        for p in said:
            assert _on_disk(src, save, p) == src.read(p, 0, src.layout.piece_size(p)), p
        assert sum(result.have) == len(said)
        assert set(range(meta.num_pieces)) - set(b_pieces) <= set(said)
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_shared_file_renamed_away_takes_nothing_verified_with_it_in_either_torrent(
        tmp_path: Path, backend: str) -> None:
    """Two torrents of one payload in one save path (cross-seeding): the v1 one complete,
    the hybrid one part way. A file they share is renamed out of the save path; the
    hybrid one goes on downloading. Its next commit found the file gone and started
    its pieces over, but the v1 torrent was told nothing: its pieces stayed verified,
    and were checked again (after the hybrid one's writes into the file made anew)
    through its descriptor of the file renamed away, and found good, with zeros at the
    path. Now the torrents sharing the file forget it too, and take the file the other
    made anew at its place as theirs."""
    content = make_payload(tmp_path / "src", {"a.bin": 100_000, "sub/b.bin": 600_000}, seed=31)
    raw_a = make_torrent_lt(content, 32768, "v1")
    raw_b = make_torrent_lt(content, 32768, "hybrid")
    dio, a, src_a = _complete(tmp_path, raw_a, backend)
    try:
        b = dio.register(raw_b, tmp_path / "dl")
        src_b = Source(raw_b, tmp_path / "src")
        blocks = src_b.blocks()
        for p, at, n in blocks[: len(blocks) * 2 // 5]:
            dio.write_block_direct(b, p, at, src_b.read(p, at, n))
        dio.flush_all()
        (tmp_path / "dl" / "payload" / "sub" / "b.bin").rename(tmp_path / "b.away")
        for p, at, n in blocks[len(blocks) * 2 // 5:]:
            with contextlib.suppress(PiecedError):
                dio.write_block_direct(b, p, at, src_b.read(p, at, n))
        with contextlib.suppress(PiecedError):
            dio.flush_all()
        for ih, src in ((a, src_a), (b, src_b)):
            _verified_are_right(wait_reverified(dio, ih), src, tmp_path / "dl")
        # The v1 torrent gets what it lost again, into the file the hybrid one made
        # anew (refused before as a stranger's until a recheck), and both complete.
        for ih, src in ((b, src_b), (a, src_a)):
            have = _verified(dio.status(ih))
            for p, at, n in src.blocks():
                if not have[p]:
                    dio.write_block_direct(ih, p, at, src.read(p, at, n))
            dio.flush_all()
            assert all(_verified(dio.status(ih))), (ih == a, dio.status(ih)["errors"][-3:])
    finally:
        dio.close()
    assert all(lt_recheck(raw_a, tmp_path / "dl")) and all(lt_recheck(raw_b, tmp_path / "dl"))


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("change", ["renamed away", "replaced"])
def test_a_shared_file_a_recheck_finds_changed_is_forgotten_by_every_torrent_sharing_it(
        tmp_path: Path, backend: str, change: str) -> None:
    """Cross-seeding: both torrents complete; a file they share is renamed away (or
    another put in its place), and one of them is rechecked. The recheck took the file
    at the path for its own, but the other torrent was told nothing: its pieces stayed
    reported verified, read through its descriptor of the file that went, and a write
    of other bytes into the new file by the first torrent had them checked again
    through that same descriptor, and found good, over wrong bytes at the path."""
    raw_a, dio, a, b = _cross_seeded(tmp_path, backend)
    try:
        src_a = Source(raw_a, tmp_path / "src")
        checked = concurrent.futures.ThreadPoolExecutor(1).submit(dio.recheck, b)
        assert all(checked.result().have)
        shared = tmp_path / "dl" / "payload" / "dir" / "b.bin"
        if change == "renamed away":
            shared.rename(tmp_path / "b.away")
        else:
            (tmp_path / "zeros").write_bytes(bytes(shared.stat().st_size))
            (tmp_path / "zeros").rename(shared)
        checked = concurrent.futures.ThreadPoolExecutor(1).submit(dio.recheck, b)
        assert not all(checked.result().have)
        st = wait_reverified(dio, a)
        _verified_are_right(st, src_a, tmp_path / "dl")
        assert not all(_verified(st))
        # The first torrent writes other bytes into the shared file's pieces: the other
        # one's pieces are not found good through the file that went.
        src_b = Source(make_torrent_lt(next((tmp_path / "src").iterdir()), PIECE, "hybrid"),
                       tmp_path / "src")
        have_b = _verified(dio.status(b))
        for p, at, n in src_b.blocks():
            if not have_b[p]:
                with contextlib.suppress(PiecedError):
                    dio.write_chunk(b, p, at, b"\x5a" * n)
        with contextlib.suppress(PiecedError):
            dio.flush_all()
        _verified_are_right(wait_reverified(dio, a), src_a, tmp_path / "dl")
    finally:
        dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_save_folder_a_recheck_finds_replaced_is_forgotten_by_every_torrent_in_it(
        tmp_path: Path, backend: str) -> None:
    """Cross-seeding: both torrents complete; their save folder is renamed away and an
    empty one made in its place, and one of them is rechecked. It takes the new folder
    for its own and finds nothing there; the other one, told nothing, still reported
    every piece verified, with nothing at its paths."""
    _, dio, a, b = _cross_seeded(tmp_path, backend)
    try:
        checked = concurrent.futures.ThreadPoolExecutor(1).submit(dio.recheck, b)
        assert all(checked.result().have)
        (tmp_path / "dl").rename(tmp_path / "dl.away")
        (tmp_path / "dl").mkdir()
        checked = concurrent.futures.ThreadPoolExecutor(1).submit(dio.recheck, b)
        assert not any(checked.result().have)
        assert not any(_verified(wait_reverified(dio, a)))
    finally:
        dio.close()


def test_a_file_deleted_between_the_check_and_its_sync_fails_its_pieces_and_no_others(
        tmp_path: Path) -> None:
    """A recheck fdatasyncs the files of the pieces it found good before it reports them
    verified. Another program deleted one of them in between: the recheck raised the
    vanished file, and left unapplied what it had found of the others (a piece it had
    found bad in another file was still reported verified). Now that file's pieces are
    failed and the rest of the check counts."""
    from pieced.storage.disk import DiskIO

    from tests.realtools import corrupt, make_payload, make_torrent_lt

    content = make_payload(tmp_path / "save", {"a.bin": 400_000, "b.bin": 300_000}, seed=13)
    raw = make_torrent_lt(content, 16384, "v1")
    dio = DiskIO("posix", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "save")
        t = dio.torrent(ih)
        index = {f.path[-1]: i for i, f in enumerate(t.meta.files)}
        a_pieces = set(t.layout.file_pieces(index["a.bin"]))
        b_only = [p for p in t.layout.file_pieces(index["b.bin"]) if p not in a_pieces]
        assert t.layout.file_pieces(index["a.bin"])[0] == 0  # (a.bin first, at offset 0)
        assert dio.recheck(ih).ok
        x, y = b_only[5], 3  # x in b.bin, y in a.bin
        corrupt(content / "b.bin", x * 16384 - 400_000 + 10)
        assert not dio.recheck(ih).have[x]
        corrupt(content / "b.bin", x * 16384 - 400_000 + 10)  # (back as it was)
        corrupt(content / "a.bin", y * 16384 + 10)
        plain = t.storage.sync

        def sync(files, force=False):  # type: ignore[no-untyped-def]
            if force and (content / "b.bin").exists():  # (the sync of what was found good)
                (content / "b.bin").unlink()  # the other program, between read and sync
            return plain(files, force)

        t.storage.sync = sync  # type: ignore[method-assign]
        r = dio.recheck(ih)
        t.storage.sync = plain  # type: ignore[method-assign]
        have = dio.status(ih)["have"]
        verified = {p for p in range(len(r.have)) if have[p // 8] >> (7 - p % 8) & 1}
        assert not r.have[x] and not r.have[y] and y in (r.failed_v1 or [])
        assert x in (r.failed_v1 or [])
        assert y not in verified and x not in verified
        assert verified == {p for p in range(len(r.have)) if r.have[p]}
        assert verified and verified <= a_pieces - {y}
    finally:
        dio.close()


@pytest.mark.parametrize("full", [False, True], ids=["fingerprints", "full"])
@pytest.mark.parametrize("change", ["deleted", "truncated"])
@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
def test_a_recheck_reports_a_file_deleted_or_cut_short_behind_its_back(
        tmp_path: Path, backend: str, full: bool, change: str, cold: bool) -> None:
    """Files the daemon wrote, deleted or cut short by another program: a recheck fails
    their pieces and records the error, with each file's name (``status`` errors, as a
    read that finds a file so records it). The first to find them so was the recheck's
    read-ahead advice (or its page cache probe, or a map made for a view on mmap), which
    forgot each file as it found it and said nothing: the read after it only found a
    file never written, and no error was recorded."""
    from tests.pagecache import drop

    _, src, dio, ih = _downloaded(tmp_path, backend, "v1")
    try:
        t = dio.torrent(ih)
        gone: set[int] = set()
        for name in ("b.bin", "c.bin"):  # (both in the same batch, the same advice)
            index = next(i for i, f in enumerate(t.meta.files) if f.path[-1] == name)
            path = tmp_path / "dl" / src.meta.name / "dir" / name
            pieces = set(t.layout.file_pieces(index))
            if change == "deleted":
                path.unlink()
            else:  # (another process: on mmap the file is leased, and its truncate waits)
                subprocess.run([sys.executable, "-c", f"import os; os.truncate("
                                f"{str(path)!r}, 50_000)"], check=True, timeout=30)
                cut = t.meta.files[index].offset + 50_000
                pieces = {p for p in pieces if (p + 1) * PIECE > cut}
            gone |= pieces
        if cold:
            assert drop(tmp_path / "dl") <= 0.01
        r = dio.recheck(ih, full=full)
        assert {p for p, ok in enumerate(r.have) if not ok} == gone
        errors = dio.status(ih)["errors"]
        for name in ("b.bin", "c.bin"):
            assert any(name in e["message"] for e in errors), (name, errors)
    finally:
        dio.close()


def _edit_piece_2(dio: DiskIO, ih: bytes, src: Source, dl: Path) -> tuple[bytes, Path]:
    """Bytes of piece 2 (of 64 KiB, in a.bin) changed in place behind the daemon's back:
    (what it held, the file)."""
    good = src.read(2, 0, 65536)
    a_bin = dl / "payload" / "a.bin"
    dio.torrent(ih).storage.close_handles()  # (a map's lease would hold the write up)
    with open(a_bin, "r+b") as f:
        f.seek(2 * 65536 + 1000)
        f.write(bytes(b ^ 0xFF for b in good[1000:1100]))
    return good, a_bin


@pytest.mark.parametrize("past", ["no cache", "a piece larger than it caches", "volatile",
                                  "volatile, just written"])
def test_a_whole_piece_read_past_the_cache_is_checked_too(
        tmp_path: Path, backend: str, past: str) -> None:
    """A verified piece read whole is compared with its fingerprint however it is read:
    not cached (no cache at all, a piece larger than the cache takes, a volatile read)
    its changed bytes were served as verified, with no error, and a seeder sent them
    (a libtorrent leecher failed their hashes and dropped it). Just written, a piece
    may be served from a copy of the bytes that passed (which is right), never from
    the changed file."""
    content = make_payload(tmp_path / "src", {"a.bin": 300_000, "b.bin": 200_001}, seed=29)
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, tmp_path / "src")
    cache = {"no cache": 0, "a piece larger than it caches": 4 * 65536 - 4}.get(past, 2**24)
    state = tmp_path / "state"
    dio = DiskIO(backend, cache_bytes=cache, state_dir=state)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    if past != "volatile, just written":
        # (Started again, nothing cached: a piece cached as it verified is served from
        # the copy, the bytes that passed, whatever the file holds since.)
        dio.close()
        dio = DiskIO(backend, cache_bytes=cache, state_dir=state)
    try:
        wait_reverified(dio, ih)
        n = src.meta.num_pieces
        assert dio.status(ih)["verified_pieces"] == n
        good, a_bin = _edit_piece_2(dio, ih, src, tmp_path / "dl")
        volatile = past.startswith("volatile")
        try:
            if volatile:
                got = dio.read_chunk(ih, 2, 0, 65536, volatile=True)
            else:
                got = dio.read_piece(ih, 2)
        except PiecedError as exc:
            assert "not those verified" in str(exc) and exc.errno == errno.EIO
            assert not _verified(dio.status(ih))[2]
            assert dio.status(ih)["verified_pieces"] == n - 1
        else:
            assert past == "volatile, just written" and got == good
        for p in (1, 3, n - 1):  # the others: as ever
            size = src.layout.piece_size(p)
            assert dio.read_chunk(ih, p, 0, size, volatile=volatile) == src.read(p, 0, size)
        dio.torrent(ih).storage.close_handles()
        with open(a_bin, "r+b") as f:  # mended
            f.seek(2 * 65536)
            f.write(good)
        assert dio.recheck(ih).ok and dio.read_piece(ih, 2) == good
    finally:
        dio.close()


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_bytes_changed_on_disk_are_not_cached_nor_served_once_the_file_is_mended(
        tmp_path: Path, backend: str, kind: str) -> None:
    """A verified piece's bytes changed in place behind the daemon's back (an edit, a
    bad disk), then read whole into the cache for seeding: they were cached as they
    were, unchecked, and served from there after the file was mended too, until a
    recheck or a restart (leechers failed the piece again and again). The read that
    would cache them compares them with the piece's fingerprint: the piece is verified
    no more (so after a restart too) and the read fails; once mended, the file's bytes
    are read, and a recheck finds the piece good again."""
    content = make_payload(tmp_path / "src", {"a.bin": 300_000, "b.bin": 200_001}, seed=23)
    raw = make_torrent_lt(content, 65536, kind)
    src = Source(raw, tmp_path / "src")
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.flush_all()
    dio.close()
    dio = DiskIO(backend, state_dir=state)  # (nothing cached)
    try:
        wait_reverified(dio, ih)
        n = src.meta.num_pieces
        assert dio.status(ih)["verified_pieces"] == n
        good, a_bin = _edit_piece_2(dio, ih, src, tmp_path / "dl")
        with pytest.raises(PiecedError) as exc:
            dio.read_chunk(ih, 2, 0, 16384)
        assert "not those verified" in str(exc.value)
        assert not _verified(dio.status(ih))[2] and dio.status(ih)["verified_pieces"] == n - 1
        assert 2 not in dio.cached_pieces(ih)
        for p in range(n):  # the others: as ever (pads, files' tails and v2 pieces too)
            if p != 2:
                size = src.layout.piece_size(p)
                assert dio.read_piece(ih, p) == src.read(p, 0, size)
                assert p in dio.cached_pieces(ih)
        dio.torrent(ih).storage.close_handles()
        with open(a_bin, "r+b") as f:  # mended
            f.seek(2 * 65536)
            f.write(good)
        assert dio.read_piece(ih, 2) == good
        assert dio.recheck(ih).ok
        assert dio.read_piece(ih, 2) == good and dio.status(ih)["verified_pieces"] == n
    finally:
        dio.close()


def _shares(dio: DiskIO) -> dict[int, dict[int, list[tuple[int, int]]]]:
    """Every registered torrent's shared files, by ids: torrent -> file -> (other, its file)."""
    return {t.id: {i: [(o.id, j) for o, j in os_] for i, os_ in sorted(t.shared.items())}
            for t in {t.id: t for t in dio._torrents.values()}.values()}


def test_the_files_torrents_share_are_kept_up_to_date_one_torrent_at_a_time(
        tmp_path: Path) -> None:
    """Which files registered torrents share (cross-seeding) was found again from every
    torrent at each register, removal, move and rename: among 10,000 torrents, a
    register took 0.1 s, and the daemon's other requests waited. Only the torrent that
    changed and those it shares with (before or after) are looked at now: after each
    of 600 random operations on torrents whose files begin at the same place, one
    inside another's, or apart, what each torrent shares is what a look at every
    torrent finds."""
    import random

    import bencodepy
    from pieced.storage.errors import PiecedError

    def torrent(name: str, files: list[str] | None, n: int) -> bytes:
        info: dict[bytes, object] = {b"name": name.encode(), b"piece length": 16384}
        if files is None:
            info[b"length"] = 1000 + n
            size = 1000 + n
        else:
            info[b"files"] = [{b"length": 500 + n + k, b"path": [p.encode() for p in f.split("/")]}
                              for k, f in enumerate(files)]
            size = sum(500 + n + k for k in range(len(files)))
        info[b"pieces"] = b"\x00" * 20 * ((size + 16383) // 16384)
        return bytes(bencodepy.encode({b"info": info}))

    shapes = [("p", ["a.bin", "b.bin"]), ("p", ["a.bin", "c/d.bin"]), ("a.bin", None),
              ("d.bin", None), ("q", ["a.bin"]), ("c", ["d.bin", "e.bin"]), ("p", ["c/d.bin"])]
    raws = [torrent(name, files, n) for n, (name, files) in enumerate(shapes * 3)]
    places = [tmp_path / "dl", tmp_path / "dl" / "p", tmp_path / "dl" / "p" / "c",
              tmp_path / "other"]
    rng = random.Random(5)
    dio = DiskIO("posix", roots=[tmp_path])
    registered: dict[int, bytes] = {}
    done = {"register": 0, "unregister": 0, "move": 0, "rename": 0}
    sharing = 0
    try:
        for _ in range(600):
            op = rng.random()
            n = rng.randrange(len(raws))
            try:
                if n not in registered and op < 0.5:
                    registered[n] = dio.register(raws[n], rng.choice(places))
                    done["register"] += 1
                elif n in registered and op < 0.7:
                    dio.unregister(registered.pop(n))
                    done["unregister"] += 1
                elif n in registered and op < 0.85:
                    dio.move_storage(registered[n], rng.choice(places))
                    done["move"] += 1
                elif n in registered:
                    st = dio.torrent(registered[n]).storage
                    dio.rename_file(registered[n], rng.choice(list(st.stored_files())),
                                    rng.choice(["a.bin", "d.bin", "x.bin", "c/d.bin"]))
                    done["rename"] += 1
            except PiecedError:
                pass  # (refused: shared, or the place of another torrent's file)
            kept = _shares(dio)
            dio._reshare()  # every torrent looked at
            assert _shares(dio) == kept
            sharing += any(kept.values())
        assert min(done.values()) >= 10, done
        assert sharing >= 200, sharing  # (most of the time, some torrents shared files)
    finally:
        dio.close()


@pytest.mark.parametrize("how", ["move", "rename"])
def test_a_torrent_registered_where_another_is_being_moved_is_refused(
        tmp_path: Path, how: str) -> None:
    """A torrent registered at the place another's files were being moved to (or one
    of its files renamed to) while the move went on: neither knew they shared files, so
    the newcomer's bad block went into the moved torrent's verified piece, and its
    removal with its files deleted them, still reported verified. The register is
    refused while the move is under way (nothing of it kept); once it is over, the
    newcomer registers and shares the files, as cross-seeded torrents do."""
    import threading

    from pieced.storage.errors import BadRequest

    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000})
    raw_a = make_torrent_lt(content, PIECE, "v1")
    raw_b = make_torrent_lt(content, PIECE, "hybrid")
    dio, a, _ = _complete(tmp_path, raw_a)
    st = dio.torrent(a).storage
    started, go = threading.Event(), threading.Event()
    real = st.move if how == "move" else st.rename

    def held(*args: Any) -> None:
        started.set()
        assert go.wait(30)
        real(*args)

    setattr(st, how, held)
    if how == "move":
        there = tmp_path / "dl2"
        run = threading.Thread(target=dio.move_storage, args=(a, there))
    else:  # a.bin renamed to the place of the newcomer's one file
        there = tmp_path / "dl"
        raw_b = make_torrent_lt(make_payload(tmp_path / "src2", 5000), PIECE, "v1")
        index = next(i for i in st.stored_files() if st.parts(i)[-1] == "a.bin")
        run = threading.Thread(target=dio.rename_file, args=(a, index, "payload.bin"))
    try:
        run.start()
        assert started.wait(30)
        with pytest.raises(BadRequest, match="being moved"):
            dio.register(raw_b, there)
        assert dio.knows(a) and len(dio.torrents()) == 1
    finally:
        go.set()
        run.join(30)
    if how == "move":
        b = dio.register(raw_b, there)
        assert dio.torrent(b).shared  # (cross-seeded now: both know)
    assert all(_verified(dio.status(a)))
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_shared_file_edited_after_both_torrents_completed_is_checked_again(
        tmp_path: Path, backend: str) -> None:
    """Cross-seeding: a v1 and a hybrid torrent of one payload downloaded together in
    one save path. A completed torrent's files are stamped, but not those another
    torrent shares (it may still write them): they stayed taken as written by the
    daemon, and a clean stop recorded them as it found them, an edit made after both
    had completed and all; the next start reported the edited pieces verified in both.
    They are stamped once every torrent sharing them is complete."""
    content = make_payload(tmp_path / "src", {"a.bin": 100000, "dir/b.bin": 200000})
    raw_a = make_torrent_lt(content, PIECE, "v1")
    raw_b = make_torrent_lt(content, PIECE, "hybrid")
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state)
    a = dio.register(raw_a, tmp_path / "dl")
    b = dio.register(raw_b, tmp_path / "dl")
    for ih, raw in ((a, raw_a), (b, raw_b)):
        fill(dio, ih, Source(raw, tmp_path / "src"))
    dio.flush_all()
    assert all(_verified(dio.status(a))) and all(_verified(dio.status(b)))
    time.sleep(2.1)  # (the edit in a second of its own, on any file system)
    shared = tmp_path / "dl" / "payload" / "dir" / "b.bin"
    with open(shared, "r+b") as f:
        f.seek(150000)
        byte = f.read(1)
        f.seek(150000)
        f.write(bytes([byte[0] ^ 0xFF]))
    dio.close()
    again = DiskIO(backend, state_dir=state)
    try:
        for ih, raw in ((a, raw_a), (b, raw_b)):
            src = Source(raw, tmp_path / "src")
            st = wait_reverified(again, ih)
            assert not all(_verified(st)), ih.hex()
            _verified_are_right(st, src, tmp_path / "dl")
    finally:
        again.close()


def _pieces_of(src: Source, *names: str) -> set[int]:
    """The pieces holding bytes of the files ``names`` (their paths under the torrent)."""
    meta = src.meta
    out: set[int] = set()
    for i in range(len(meta.files)):
        if "/".join(meta.files[i].path[1:]) in names:
            out.update(src.layout.file_pieces(i))
    return out


@pytest.mark.parametrize("change", ["deleted", "cut short", "renamed away", "a folder",
                                    "save folder deleted"])
@pytest.mark.parametrize("restarted", [False, True], ids=["running", "restarted"])
def test_a_torrent_registered_again_is_taken_up_with_its_files_as_they_are_now(
        tmp_path: Path, backend: str, change: str, restarted: bool) -> None:
    """A torrent client started again registers its torrent again, and takes it up as
    the daemon has it (pieced-peer does). Files of a complete torrent deleted behind the
    daemon's back while it ran (``rm -rf`` of the download, to fetch it again) were
    found only by a read of them: pieced-peer found every piece verified and ended at
    once, "complete", nothing on disk. The register refused as already registered now
    looks at the files first: the pieces of those gone, cut short, renamed away or
    replaced are verified no more, the others still are. Also when the daemon had not
    opened the files since its start."""
    raw, src, dio, ih = _downloaded(tmp_path, backend, "v1")
    save = tmp_path / "dl" / src.meta.name  # (the files; the save path is tmp_path / "dl")
    if restarted:
        dio.close()
        dio = DiskIO(backend, state_dir=tmp_path / "state")
        assert all(_verified(dio.status(ih)))
    try:
        if change == "deleted":
            (save / "dir" / "b.bin").unlink()
        elif change == "cut short":
            with open(save / "dir" / "b.bin", "r+b") as f:  # (an open waits out a lease)
                f.truncate(1000)
        elif change == "renamed away":
            os.rename(save / "dir" / "b.bin", tmp_path / "elsewhere.bin")
        elif change == "a folder":
            (save / "dir" / "b.bin").unlink()
            (save / "dir" / "b.bin").mkdir()
        else:
            shutil.rmtree(tmp_path / "dl")
        with pytest.raises(AlreadyRegistered):
            dio.register(raw, tmp_path / "dl")
        st = dio.status(ih)
        have = _verified(st)
        lost = (_pieces_of(src, "dir/b.bin") if change != "save folder deleted"
                else set(range(st["num_pieces"])))
        assert not any(have[p] for p in lost), [p for p in lost if have[p]]
        assert all(have[p] for p in range(st["num_pieces"]) if p not in lost)
        if change != "save folder deleted":
            _verified_are_right(st, src, tmp_path / "dl")
        if change == "a folder":
            (save / "dir" / "b.bin").rmdir()  # (a write does not go over a folder)
        elif change == "save folder deleted":
            # Not made again by a write, as Transmission does not (a drive not mounted
            # would be downloaded to the disk below it): said, until it is there again.
            with pytest.raises(PiecedError, match="save path"):
                fill(dio, ih, src)
            assert not any(_verified(dio.status(ih)))
            (tmp_path / "dl").mkdir()
        fill(dio, ih, src)  # fetched again, it is stored again
        dio.flush_all()
        st = dio.status(ih)
        assert all(_verified(st))
        _verified_are_right(st, src, tmp_path / "dl")
    finally:
        dio.close()


@pytest.mark.parametrize("change", ["deleted", "cut short", "replaced"])
@pytest.mark.parametrize("restarted", [False, True], ids=["running", "restarted"])
def test_a_torrent_registered_again_tells_the_torrents_sharing_its_files(
        tmp_path: Path, backend: str, change: str, restarted: bool) -> None:
    """Cross-seeding: a v1 and a hybrid torrent of one payload in one save path, both
    complete. A shared file changed behind the daemon's back, then the v1 registered
    again: its pieces of the file start over, and so do the hybrid's (a file cut short
    was found by the v1 alone: the hybrid went on reporting verified pieces whose bytes
    were not on disk any more; after a restart, one deleted too). What each reports
    verified, libtorrent finds good."""
    raw_a, dio, a, b = _cross_seeded(tmp_path, backend)
    try:
        raw_b = make_torrent_lt(next((tmp_path / "src").iterdir()), PIECE, "hybrid")
        dio.recheck(b)  # (found complete in the files the v1 wrote)
        assert all(_verified(dio.status(b)))
        if restarted:  # (neither has opened the files since)
            dio.close()
            dio = DiskIO(backend, state_dir=tmp_path / "state")
        shared = tmp_path / "dl" / "payload" / "dir" / "b.bin"
        if change == "deleted":
            shared.unlink()
        elif change == "cut short":
            with open(shared, "r+b") as f:  # (an open waits out a lease)
                f.truncate(1000)
        else:
            shared.unlink()
            shared.write_bytes(bytes(200000))
        with pytest.raises(AlreadyRegistered):
            dio.register(raw_a, tmp_path / "dl")
        for ih, raw in ((a, raw_a), (b, raw_b)):
            have = _verified(dio.status(ih))
            assert not all(have), (ih.hex(), change)
            if change != "deleted":  # (libtorrent checks what is there)
                truth = lt_recheck(raw, tmp_path / "dl")
                assert not [p for p, v in enumerate(have) if v and not truth[p]], ih.hex()
    finally:
        dio.close()
