"""Faults on real filesystems under a real daemon: a disk full (tiny tmpfs), a payload
file made read-only, a payload file or folder deleted mid-download. In each case the
client gets the error with its errno, /metrics counts it, other torrents keep working,
no piece is recorded (or served as) verified that is not on disk, and the torrent
completes once the client sends the lost pieces again."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pieced.protocol.client import Client
from pieced.storage.disk import DiskIO
from pieced.storage.errors import StorageIOError
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon, FreezableFs, UnreadableFs, fill_up
from tests.realtools import TorrentKind, lt_recheck, make_payload, make_torrent_lt
from tests.test_disk import Source

# Every test runs on each backend (``backend``, see conftest.py), but not on disabled:
pytestmark = pytest.mark.backends(exclude={
    "disabled": "stores nothing: no write reaches a file system to fail"})


def test_disk_full(tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    big = make_payload(tmp_path / "src_big", 600_000, seed=1)
    small = make_payload(tmp_path / "src_small", 100_000, seed=2)
    raw_big = make_torrent_lt(big, 65536, "v1")
    raw_small = make_torrent_lt(small, 16384, "v1")
    sb, ss = Source(raw_big, tmp_path / "src_big"), Source(raw_small, tmp_path / "src_small")
    d = Daemon(tmp_path, backend=backend)
    try:
        with Client(d.socket) as c:
            ih_big = c.register(raw_big, tiny_fs)
            ih_small = c.register(raw_small, tmp_path / "dl")
            started = time.monotonic()
            with pytest.raises(StorageIOError) as exc:
                for p, b, n in sb.blocks():
                    c.write_block_direct(ih_big, p, b, sb.read(p, b, n))
                c.wait_writes()
            assert exc.value.errno == errno.ENOSPC
            # the client drops what it could not store (a backend that gathers a piece's
            # blocks before writing them holds some, which no flush could write)
            have = c.status(ih_big)["have"]
            for p in range(sb.meta.num_pieces):
                if not have[p >> 3] & (0x80 >> (p & 7)):
                    c.clear_piece(ih_big, p)
            # the other torrent is unaffected
            for p, b, n in ss.blocks():
                c.write_chunk(ih_small, p, b, ss.read(p, b, n))
            c.wait_writes()
            c.flush_all()
            assert c.status(ih_small)["verified_pieces"] == ss.meta.num_pieces
            st = c.status(ih_big)
            assert any(e["errno"] == errno.ENOSPC for e in st["errors"])
            # Pushed too, as disk_error events: at most one a second per torrent and errno.
            pushed = [f for name, f in c.events if name == "disk_error"]
            assert pushed and all(f["ih"] == ih_big and f["errno"] == errno.ENOSPC
                                  and f["code"] == 8 for f in pushed)
            assert len(pushed) <= 1 + time.monotonic() - started
            on_disk = (tiny_fs / "payload.bin").read_bytes()
            for p in range(sb.meta.num_pieces):
                if st["have"][p >> 3] & (0x80 >> (p & 7)):
                    size = sb.layout.piece_size(p)
                    assert on_disk[p * 65536 : p * 65536 + size] == sb.read(p, 0, size)
            assert st["verified_pieces"] < sb.meta.num_pieces
        with urllib.request.urlopen(f"http://{d.http}/metrics", timeout=10) as resp:
            fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        enospc = [s.value for s in fams["pieced_errors"].samples if s.labels.get("kind") == "ENOSPC"]
        assert enospc and enospc[0] >= 1
    finally:
        assert d.stop() == 0, d.stderr()


def test_on_a_full_disk_pieces_under_way_do_not_stop_rechecks_or_moves(
    tmp_path: Path, tiny_fs: Path, backend: str,
) -> None:
    """Pieces under way on a disk that filled up, their blocks held by a backend that
    gathers them (direct, uring): the flush that a recheck or a move begins with stopped
    at the first of them it could not write, the others stayed held, and every recheck
    and move failed with ENOSPC until the client had cleared each piece under way by
    hand. Each such piece now starts over, told failed, and the check finds what is
    still good; a move to a disk with room goes on; a flush says ENOSPC once."""
    content = make_payload(tmp_path / "src", 2_000_000, seed=6)
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, tmp_path / "src")
    failed: list[int] = []
    dio = DiskIO(backend, on_piece=lambda r: None if r.ok else failed.append(r.piece))
    try:
        ih = dio.register(raw, tiny_fs)
        for p, b, n in src.blocks():
            if p == 0:
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        fill_up(tiny_fs)
        under_way = list(range(2, 12))
        for p in under_way:  # three blocks of four: each piece stays partial
            for b in range(0, 3 * 16384, 16384):
                with contextlib.suppress(StorageIOError):
                    dio.write_chunk(ih, p, b, src.read(p, b, 16384))
        result = dio.recheck(ih)
        assert result.have[0] and sum(result.have) == 1
        st = dio.status(ih)
        assert st["verified_pieces"] == 1 and st["partial_pieces"] == 0
        assert set(failed) <= set(under_way)
        dio.move_storage(ih, tmp_path / "roomy")
        assert dio.status(ih)["save_path"] == str(tmp_path / "roomy")
        dio.flush_all()
        for p, b, n in src.blocks():
            if p != 0:
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert dio.recheck(ih, full=True).ok
    finally:
        dio.close()


def test_a_piece_never_written_is_read_on_a_full_tmpfs(
    tmp_path: Path, tiny_fs: Path, backend: str,
) -> None:
    """A payload file on a tmpfs is sparse where nothing was written; once the tmpfs is
    full, a fault on such a hole through a map must take a page the file system does not
    have, and the kernel answers SIGBUS, which killed the daemon (mmap backend). Reads,
    hashes and a recheck of pieces never written must answer, on every backend, and
    the daemon go on serving another torrent."""
    content = make_payload(tmp_path / "src", 2_000_000, seed=4)
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, tmp_path / "src")
    other_raw, other = _other_torrent(tmp_path)
    d = Daemon(tmp_path, backend=backend)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tiny_fs)
            _send(c, ih, src, [blk for blk in src.blocks() if blk[0] == 0])
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == 1
            fill_up(tiny_fs)
            assert c.read_piece(ih, 0) == src.read(0, 0, 65536)
            assert c.read_chunk(ih, 20, 0, 16384) == bytes(16384)  # a hole reads as zeros
            assert c.hash_piece(ih, 21) is False
            c.recheck(ih, full=True)
            st = c.status(ih)
            assert st["verified_pieces"] == 1 and _has(st["have"], 0)
            other_ih = c.register(other_raw, tmp_path / "dl_other")
            _fill_other(c, other_ih, other)
    finally:
        assert d.stop() == 0, d.stderr()


# --------------------------------------------------------------------------- helpers

def _metric_errors(http: str, kind: str) -> float:
    """The value of ``pieced_errors{kind=...}`` on /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as resp:
        fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    fam = fams.get("pieced_errors")
    if fam is None:
        return 0.0
    return sum(s.value for s in fam.samples if s.labels.get("kind") == kind)


def _has(have: bytes, p: int) -> bool:
    return bool(have[p >> 3] & (0x80 >> (p & 7)))


def _on_disk(dl: Source, p: int) -> bytes | None:
    """Piece ``p`` as it stands in the downloaded files (None: a file is missing)."""
    try:
        return dl.read(p, 0, dl.layout.piece_size(p))
    except OSError:
        return None


def _assert_verified_on_disk(c: Client, ih: bytes, src: Source, dl: Source) -> dict[str, Any]:
    """Every piece ``status`` reports verified holds the right bytes on disk."""
    c.flush_all()
    st = c.status(ih)
    for p in range(src.meta.num_pieces):
        if _has(st["have"], p):
            assert _on_disk(dl, p) == src.read(p, 0, src.layout.piece_size(p)), f"piece {p}"
    return st


def _send(c: Client, ih: bytes, src: Source, blocks: list[tuple[int, int, int]]) -> None:
    """Every other block through the shared ring, the rest inline; then wait for the acks."""
    for i, (p, b, n) in enumerate(blocks):
        if i % 2:
            c.write_block_direct(ih, p, b, src.read(p, b, n))
        else:
            c.write_chunk(ih, p, b, src.read(p, b, n))
    c.wait_writes()


def _refill(c: Client, ih: bytes, src: Source) -> None:
    """What a client does after a file error: start over every piece not verified."""
    have = c.status(ih)["have"]
    missing = [p for p in range(src.meta.num_pieces) if not _has(have, p)]
    for p in missing:
        c.clear_piece(ih, p)
    _send(c, ih, src, [blk for blk in src.blocks() if blk[0] in missing])


def _other_torrent(tmp_path: Path) -> tuple[bytes, Source]:
    content = make_payload(tmp_path / "src_other", 150_000, seed=9)
    raw = make_torrent_lt(content, 16384, "v1")
    return raw, Source(raw, tmp_path / "src_other")


def _fill_other(c: Client, ih: bytes, src: Source) -> None:
    _send(c, ih, src, src.blocks())
    c.flush_all()
    assert c.status(ih)["verified_pieces"] == src.meta.num_pieces
    for p in range(src.meta.num_pieces):
        size = src.layout.piece_size(p)
        assert c.read_piece(ih, p) == src.read(p, 0, size)


# ------------------------------------------------------------------- read-only payload

TWO_FILES = {"a.bin": 100_000, "b.bin": 100_000}


def _make_read_only(how: str, content: Path) -> Callable[[], None]:
    """Make ``content/b.bin`` unwritable for root too; return the undo.

    ``ro-mount``: the payload folder is bind-mounted read-only over itself (EROFS), as
    when a filesystem goes read-only; ``immutable``: ``chmod 0444`` and ``chattr +i``
    (EPERM), since the mode alone does not stop root, which the tests and daemon run as.
    Either way the daemon has not opened b.bin yet: a descriptor already open for
    writing keeps working (as with any program), so the fault shows on its next open.
    """
    b = content / "b.bin"
    if how == "ro-mount":
        subprocess.run(["mount", "--bind", str(content), str(content)], check=True)
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(content)], capture_output=True, text=True)
        if r.returncode:
            subprocess.run(["umount", "-l", str(content)], check=True)
            pytest.skip(f"read-only bind mount refused: {r.stderr.strip()}")

        def unmount() -> None:  # lazily: the daemon may hold a handle opened through it
            subprocess.run(["umount", "-l", str(content)], check=True)
        return unmount
    b.touch()
    b.chmod(0o444)
    r = subprocess.run(["chattr", "+i", str(b)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"chattr +i not supported here: {r.stderr.strip()}")

    def undo() -> None:
        subprocess.run(["chattr", "-i", str(b)], check=True)
        b.chmod(0o644)
    return undo


@pytest.mark.parametrize(("how", "expect"), [("ro-mount", errno.EROFS), ("immutable", errno.EPERM)])
def test_read_only_payload_file(
    tmp_path: Path, tiny_fs: Path, how: str, expect: int, backend: str
) -> None:
    content = make_payload(tmp_path / "src", TWO_FILES, seed=3)
    raw = make_torrent_lt(content, 16384, "v1")  # v1: a piece runs across the two files
    src = Source(raw, tmp_path / "src")
    dl = Source(raw, tiny_fs)
    raw_o, src_o = _other_torrent(tmp_path)
    a_index = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "a.bin")
    a_end = src.meta.files[a_index].end
    in_a = [blk for blk in src.blocks() if (blk[0] + 1) * 16384 <= a_end]
    rest = [blk for blk in src.blocks() if (blk[0] + 1) * 16384 > a_end]
    d = Daemon(tmp_path, backend=backend)
    undo: Callable[[], None] | None = None
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tiny_fs)
            ih_o = c.register(raw_o, tmp_path / "dl_other")
            _send(c, ih, src, in_a)  # the torrent is running: a.bin is open and written
            assert _assert_verified_on_disk(c, ih, src, dl)["verified_pieces"] == len({p for p, _, _ in in_a})
            undo = _make_read_only(how, tiny_fs / "payload")
            with pytest.raises(StorageIOError) as exc:
                _send(c, ih, src, rest)
            assert exc.value.errno == expect, exc.value
            # the other torrent is not disturbed, before or after the error is reported
            _fill_other(c, ih_o, src_o)
            st = _assert_verified_on_disk(c, ih, src, dl)
            assert any(e["errno"] == expect for e in st["errors"]), st["errors"]
            assert not any(_has(st["have"], p) for p, _, _ in rest)  # b.bin holds nothing
            assert st["verified_pieces"] == len({p for p, _, _ in in_a})
            for p in {p for p, _, _ in in_a}:  # what was verified is still served
                assert c.read_chunk(ih, p, 0, 16384) == src.read(p, 0, 16384)
            assert _metric_errors(d.http, errno.errorcode[expect]) >= 1
            # writable again: the client starts the failed pieces over and they verify
            undo()
            undo = None
            _refill(c, ih, src)
            st = _assert_verified_on_disk(c, ih, src, dl)
            assert st["verified_pieces"] == src.meta.num_pieces
            assert c.recheck(ih)["failed_v1"] == []
        assert (tiny_fs / "payload" / "b.bin").read_bytes() == (content / "b.bin").read_bytes()
    finally:
        if undo is not None:
            undo()
        assert d.stop() == 0, d.stderr()


# -------------------------------------------------------------------- vanished payload

VANISH_FILES = {"a.bin": 70_000, "sub/b.bin": 90_000, "sub/c.bin": 40_000, "z.bin": 50_000}


@pytest.mark.parametrize(
    ("how", "kind", "reads_first"),
    [("unlink", "v1", True), ("unlink", "hybrid", False), ("rmtree", "hybrid", True), ("rmtree", "v1", False)],
)
def test_vanished_payload_file(
    tmp_path: Path, how: str, kind: TorrentKind, reads_first: bool, backend: str
) -> None:
    """A payload file deleted (or its folder removed) mid-download: the client hears of it
    with ENOENT, no piece is reported verified (or served as such) whose bytes are not on
    disk, the other torrent goes on, and re-sending the lost pieces completes the torrent."""
    content = make_payload(tmp_path / "src", VANISH_FILES, seed=4)
    raw = make_torrent_lt(content, 32768, kind)  # two blocks a piece: a piece can be half done
    src = Source(raw, tmp_path / "src")
    save = tmp_path / "dl"
    dl = Source(raw, save)
    raw_o, src_o = _other_torrent(tmp_path)
    b_index = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "b.bin")
    b_pieces = sorted(src.layout.file_pieces(b_index))
    blocks = src.blocks()
    # everything up to the middle of b.bin arrives; the piece there is left half done
    half = b_pieces[len(b_pieces) // 2]
    first = [blk for blk in blocks if blk[0] < half] + [blk for blk in blocks if blk[0] == half][:1]
    second = [blk for blk in blocks if blk not in first]
    d = Daemon(tmp_path, backend=backend)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, save)
            ih_o = c.register(raw_o, tmp_path / "dl_other")
            _send(c, ih, src, first)
            st = _assert_verified_on_disk(c, ih, src, dl)
            lost = {p for p in b_pieces if _has(st["have"], p)}
            assert lost, "some pieces of b.bin verified before it vanishes"
            for p in sorted(lost)[:1]:  # served once from disk: a read handle is open too
                assert c.read_chunk(ih, p, 0, 100, volatile=True) == src.read(p, 0, 100)

            target = save / "payload" / "sub" / "b.bin"
            if how == "unlink":
                os.unlink(target)
            else:
                shutil.rmtree(target.parent)

            errors: list[StorageIOError] = []
            if reads_first:  # what was verified: an error, or the true bytes (a cached copy)
                for p in sorted(lost):
                    try:
                        data = c.read_piece(ih, p)
                    except StorageIOError as exc:
                        errors.append(exc)
                    else:
                        assert data == src.read(p, 0, src.layout.piece_size(p)), f"piece {p}"
            try:  # the download goes on
                _send(c, ih, src, second)
            except StorageIOError as exc:
                errors.append(exc)
            assert errors and all(e.errno == errno.ENOENT for e in errors), errors
            _fill_other(c, ih_o, src_o)

            st = _assert_verified_on_disk(c, ih, src, dl)
            assert any(e["errno"] == errno.ENOENT for e in st["errors"]), st["errors"]
            assert not any(_has(st["have"], p) for p in lost)
            assert _metric_errors(d.http, "ENOENT") >= 1
            for p in range(src.meta.num_pieces):  # verified means served as it is on disk
                if _has(st["have"], p):
                    assert c.read_piece(ih, p) == src.read(p, 0, src.layout.piece_size(p))
            res = c.recheck(ih)  # a recheck agrees with the disk
            assert res["failed_v1" if kind == "v1" else "failed_v2"]
            st = _assert_verified_on_disk(c, ih, src, dl)
            assert not any(_has(st["have"], p) for p in lost)

            # the client starts over every piece not verified: the torrent completes
            _refill(c, ih, src)
            st = _assert_verified_on_disk(c, ih, src, dl)
            assert st["verified_pieces"] == src.meta.num_pieces
            assert c.recheck(ih)["failed_v1" if kind == "v1" else "failed_v2"] == []
        assert target.read_bytes() == (content / "sub" / "b.bin").read_bytes()
    finally:
        assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, save))


# ------------------------------------------------- vanished with no descriptor open

def _file_blocks(src: Source, name: str) -> tuple[int, list[tuple[int, int, int]]]:
    """The index of the file named ``name`` and the blocks of the pieces it alone holds."""
    index = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == name)
    pieces = set(src.layout.file_pieces(index))
    return index, [blk for blk in src.blocks() if blk[0] in pieces]


def test_a_file_deleted_while_no_descriptor_is_open_is_reported_gone(
    tmp_path: Path, backend: str
) -> None:
    """One descriptor for the whole pool: a payload file is closed (another file took
    the handle) when it is deleted. The next write into it hears ENOENT, its verified
    pieces are verified no more, and no file is made in its place by that write; the
    write after it makes the file anew and the torrent completes. Before, the write
    made an empty file there with O_CREAT and then refused it as another file put in
    its place (PathEscape), every time, keeping the deleted file's pieces verified."""
    content = make_payload(tmp_path / "src", {"a.bin": 200_000, "b.bin": 100_000}, seed=6)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    a_index, a_blocks = _file_blocks(src, "a.bin")
    _, b_blocks = _file_blocks(src, "b.bin")
    dio = DiskIO(backend, cache_bytes=0, max_open_files=1)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        later = a_blocks[-2]  # a.bin's piece left for after the delete
        for p, b, n in [blk for blk in a_blocks if blk != later] + b_blocks:
            dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
        dio.flush_all()
        st = dio.status(ih)
        assert st["verified_pieces"] == src.meta.num_pieces - 1
        p, b, n = b_blocks[0]
        assert dio.read_chunk(ih, p, b, n, volatile=True) == src.read(p, b, n)  # b.bin's turn
        a_bin = tmp_path / "dl" / "payload" / "a.bin"
        a_bin.unlink()
        with pytest.raises(StorageIOError) as exc:
            dio.write_chunk(ih, later[0], later[1], src.read(*later), flush=True)
        assert exc.value.errno == errno.ENOENT, exc.value
        assert not a_bin.exists()
        have = dio.status(ih)["have"]
        assert not any(_has(have, q) for q in src.layout.file_pieces(a_index))
        for p in {blk[0] for blk in a_blocks}:  # the client starts them over: made anew
            dio.clear_piece(ih, p)
        for p, b, n in a_blocks:
            dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert a_bin.read_bytes() == (content / "a.bin").read_bytes()
    finally:
        dio.close()


def test_a_file_truncated_behind_our_back_is_written_again(
    tmp_path: Path, backend: str
) -> None:
    """Another program cuts a payload file short (the same file, shorter). A recheck
    finds the pieces past the cut gone; sent again, they are written into the same
    file, which gets its length back, and the torrent completes. Before, the file was
    taken for one gone from its place: every write and read of it was refused
    (PathEscape, "something else was put in its place") until a restart."""
    content = make_payload(tmp_path / "src", {"a.bin": 300_000, "b.bin": 100_000}, seed=7)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        for p, b, n in src.blocks():
            dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        a_bin = tmp_path / "dl" / "payload" / "a.bin"
        dio.torrent(ih).storage.close_handles()  # (a map's lease would hold the truncate up)
        os.truncate(a_bin, 100_000)
        dio.recheck(ih)
        have = dio.status(ih)["have"]
        lost = [p for p in range(src.meta.num_pieces) if not _has(have, p)]
        assert lost and all(p * 16384 + 16384 > 100_000 for p in lost)
        for p, b, n in src.blocks():
            if p in lost:
                dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        dio.torrent(ih).storage.close_handles()
        assert a_bin.read_bytes() == (content / "a.bin").read_bytes()
        assert dio.recheck(ih, full=True).ok
    finally:
        dio.close()


def test_a_truncation_between_the_check_and_the_read_is_not_read_as_zeros(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file cut short after its length was checked and before the read (the check
    is made to miss it here, as a truncation landing between the two would): the read
    reports the file truncated (ENOENT) and its pieces are verified no more, instead of
    serving zeros as the bytes of a verified piece."""
    content = make_payload(tmp_path / "src", {"a.bin": 300_000}, seed=8)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        for p, b, n in src.blocks():
            dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        storage = dio.torrent(ih).storage
        storage.close_handles()
        os.truncate(tmp_path / "dl" / "payload" / "a.bin", 100_000)
        monkeypatch.setattr(type(storage), "_check_linked", lambda self, fd, index, *_: None)
        with pytest.raises(StorageIOError) as exc:
            dio.read_chunk(ih, 10, 0, 16384, volatile=True)
        assert exc.value.errno == errno.ENOENT and "truncated" in str(exc.value)
        assert not _has(dio.status(ih)["have"], 10)  # (a recheck finds what is left)
        assert dio.recheck(ih).failed_v1 == list(range(100_000 // 16384, src.meta.num_pieces))
    finally:
        dio.close()


def test_reads_past_a_cut_met_while_it_is_journaled_serve_no_zeros(
    tmp_path: Path, backend: str, freezable_fs: FreezableFs
) -> None:
    """A verified file cut short behind the daemon's back: the first read past the cut
    finds it so, and the file's pieces are journaled as verified no more (slowly here:
    the state folder's file system hangs). Reads of other pieces past the cut meanwhile,
    from other threads as from other clients, were served zeros with no error, though
    those pieces were still reported verified: the file no longer counted as one at its
    full length, and a short read of it was taken for a download's sparse file. They
    now fail as the first read does, once the pieces are verified no more."""
    content = make_payload(tmp_path / "src", {"a.bin": 1_000_000, "b.bin": 1_024_690}, seed=71)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, cache_bytes=0, state_dir=freezable_fs.mount / "state")
    try:
        ih = dio.register(raw, tmp_path / "dl")
        for p, b, n in src.blocks():
            dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        t = dio.torrent(ih)
        past_cut = sorted(t.layout.file_pieces(1))[3:-1]  # (the cut: 10,000 bytes into b.bin)
        t.storage.close_handles()  # (a map's lease would hold the truncate up)
        os.truncate(tmp_path / "dl" / "payload" / "b.bin", 10_000)
        freezable_fs.freeze()
        got: dict[int, object] = {}

        def read(p: int) -> None:
            try:
                got[p] = dio.read_chunk(ih, p, 0, 16384)
            except StorageIOError as exc:
                got[p] = exc

        first = threading.Thread(target=read, args=(past_cut[0],))
        first.start()
        deadline = time.monotonic() + 30
        while not t.storage.remaking():  # the first read found the cut, and is journaling
            assert time.monotonic() < deadline and first.is_alive(), got
            time.sleep(0.01)
        others = [threading.Thread(target=read, args=(p,)) for p in past_cut[1:]]
        for th in others:
            th.start()
        time.sleep(0.5)
        freezable_fs.thaw()
        for th in [first, *others]:
            th.join(30)
        assert len(got) == len(past_cut)
        zeros = [p for p, v in got.items() if v == bytes(16384)]
        assert not zeros, f"zeros served for pieces {zeros}"
        assert all(isinstance(v, StorageIOError) for v in got.values()), got
        have = dio.status(ih)["have"]
        assert not [p for p in past_cut if _has(have, p)]
    finally:
        freezable_fs.thaw()
        dio.close()


@pytest.mark.parametrize("step", ["open", "fstat", "read"])
def test_a_read_racing_the_first_write_of_a_file_does_not_take_it_for_one_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A read of a file that another thread's first write makes and sizes meanwhile:
    what the read found (no file, or an empty one) came before the sizing, and does not
    make the file one deleted or cut short behind our back. (It did: the file's pieces
    started over, and after an open that found no file every later write of it was
    refused as a file put in the place of ours.) The read is held, by the test, right
    after it looked (``step``) and before it judged what it saw."""
    content = make_payload(tmp_path / "src", {"a.bin": 100_000}, seed=9)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    dl = tmp_path / "dl"
    if step != "open":  # an empty file there, as one made by the user or another tool
        (dl / "payload").mkdir(parents=True)
        (dl / "payload" / "a.bin").write_bytes(b"")
    dio = DiskIO("posix", cache_bytes=0)
    try:
        ih = dio.register(raw, dl)
        reader: list[int] = []
        looked, go = threading.Event(), threading.Event()

        def hold() -> None:
            if reader and threading.get_ident() == reader[0] and not looked.is_set():
                looked.set()
                assert go.wait(30)

        if step == "open":
            real_get = dio.handles.get

            def get(owner: Any, index: int, writable: bool) -> list[int]:
                try:
                    return real_get(owner, index, writable)
                except StorageIOError:
                    hold()
                    raise
            monkeypatch.setattr(dio.handles, "get", get)
        elif step == "fstat":
            real_fstat = os.fstat

            def fstat(fd: int) -> os.stat_result:
                st = real_fstat(fd)
                if sys._getframe(1).f_code.co_name == "_check_linked":
                    hold()
                return st
            monkeypatch.setattr(os, "fstat", fstat)
        else:
            real_preadv = os.preadv

            def preadv(fd: int, bufs: Any, offset: int, flags: int = 0) -> int:
                n = real_preadv(fd, bufs, offset, flags)
                if not flags:  # (not a look at the page cache alone)
                    hold()
                return n
            monkeypatch.setattr(os, "preadv", preadv)
        outcome: list[object] = []

        def read() -> None:
            reader.append(threading.get_ident())
            try:
                outcome.append(dio.read_chunk(ih, 0, 0, 16384, volatile=True))
            except StorageIOError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=read)
        thread.start()
        assert looked.wait(30)
        last = src.meta.num_pieces - 1  # the first write of the file: made and sized
        assert dio.write_block_direct(ih, last, 0, src.read(last, 0, 100_000 - last * 16384))
        go.set()
        thread.join(30)
        if step == "open":  # no file yet when it looked: a plain ENOENT
            assert isinstance(outcome[0], StorageIOError) and "behind" not in str(outcome[0])
        else:  # an empty file: its bytes are zeros
            assert outcome == [bytes(16384)]
        for p, b, n in src.blocks():
            if p != last:
                dio.write_block_direct(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        st = dio.status(ih)
        assert st["verified_pieces"] == src.meta.num_pieces, st["errors"]
        assert not st["errors"]
        assert dio.read_chunk(ih, 0, 0, 16384) == src.read(0, 0, 16384)
    finally:
        dio.close()


def test_writers_racing_to_make_a_vanished_file_anew_do_not_refuse_each_other(
    tmp_path: Path, backend: str
) -> None:
    """A payload file seen to go is made anew (O_EXCL) by the first write into it;
    four threads writing into it at once must not take one another's new file for
    something else put in its place. Before, the losers of the race got PathEscape
    (in most rounds on posix)."""
    import threading

    content = make_payload(tmp_path / "src", 1_000_000, seed=7)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    blocks = src.blocks()

    def write(dio: DiskIO, ih: bytes, k: int, start: threading.Barrier,
              errors: list[BaseException]) -> None:
        try:
            start.wait(30)
            for p, b, n in blocks[1 + k : 17 : 4]:
                dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
        except BaseException as exc:
            errors.append(exc)

    for rnd in range(10):
        dio = DiskIO(backend, cache_bytes=0)
        try:
            dl = tmp_path / f"dl{rnd}"
            ih = dio.register(raw, dl)
            p, b, n = blocks[0]
            dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
            next(dl.rglob("*.bin")).unlink()
            with pytest.raises(StorageIOError) as exc:  # seen to go
                dio.read_chunk(ih, 0, 0, 16, volatile=True)
            assert exc.value.errno == errno.ENOENT
            errors: list[BaseException] = []
            start = threading.Barrier(4)
            threads = [threading.Thread(target=write, args=(dio, ih, k, start, errors))
                       for k in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, f"round {rnd}: {errors[0]!r}"
            assert dio.status(ih)["verified_pieces"] == 16
        finally:
            dio.close()


def test_a_write_that_began_before_its_file_was_seen_to_go_makes_no_stray_file(
    tmp_path: Path, backend: str
) -> None:
    """A write that looked whether its file was to be made anew just before another
    thread saw the file go opened it with O_CREAT: it made an empty file at the place,
    refused it (read while it is to be made anew), and left it there, and the thread
    that then made the file anew (O_EXCL) found that one and refused it as "something
    else put in its place": every write into the file failed until a recheck. (Seen
    while a file was deleted again and again during a download; the interleaving is
    made here by calling the open as that write did.)"""
    content = make_payload(tmp_path / "src", 200_000, seed=8)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        p, b, n = src.blocks()[0]
        dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
        next((tmp_path / "dl").rglob("*.bin")).unlink()
        with pytest.raises(StorageIOError):  # seen to go
            dio.read_chunk(ih, 0, 0, 16, volatile=True)
        storage = dio._get(ih).storage
        with contextlib.suppress(StorageIOError):  # the late write (it may be refused)
            os.close(storage._open_known(0, os.O_RDWR | os.O_CREAT, True))
        for p, b, n in src.blocks():
            dio.write_chunk(ih, p, b, src.read(p, b, n), flush=True)
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    finally:
        dio.close()


def test_flush_all_flushes_every_torrent_when_one_disk_is_full(
    tmp_path: Path, tiny_fs: Path, backend: str
) -> None:
    """flush_all with blocks buffered for a torrent on a full disk and for another one:
    it reports the full disk (ENOSPC), and the other torrent's blocks are written all
    the same. Before, the first torrent's error ended the flush: the torrents after it
    were neither written nor synced, and the pieces committing were not waited for."""
    big = make_payload(tmp_path / "src_big", 600_000, seed=1)
    small = make_payload(tmp_path / "src_small", 100_000, seed=2)
    raw_big, raw_small = make_torrent_lt(big, 65536, "v1"), make_torrent_lt(small, 65536, "v1")
    sb, ss = Source(raw_big, tmp_path / "src_big"), Source(raw_small, tmp_path / "src_small")
    dio = DiskIO(backend, cache_bytes=16 * 1024 * 1024)
    try:
        ih_big = dio.register(raw_big, tiny_fs)  # flushed first
        ih_small = dio.register(raw_small, tmp_path / "dl")
        for p, b, n in sb.blocks():  # three blocks of each piece: buffered, 432 KiB
            if b < 3 * 16384:
                dio.write_chunk(ih_big, p, b, sb.read(p, b, n))
        p, b, n = ss.blocks()[0]
        dio.write_chunk(ih_small, p, b, ss.read(p, b, n))
        with pytest.raises(StorageIOError) as exc:
            dio.flush_all()
        assert exc.value.errno == errno.ENOSPC
        assert (tmp_path / "dl" / "payload.bin").read_bytes()[:n] == ss.read(p, b, n)
    finally:
        with contextlib.suppress(StorageIOError):
            dio.close()


def test_a_piece_the_disk_cannot_read_is_an_error_not_a_dead_daemon(
    tmp_path: Path, unreadable_fs: UnreadableFs, backend: str
) -> None:
    """A verified piece whose bytes the disk can no longer read (a bad sector: EIO). Read
    through a map, such a page is SIGBUS, and the mmap backend's daemon died of it at
    the first read, every client with it. Every backend answers with the error, with
    its errno, and goes on serving the other pieces."""
    content = make_payload(tmp_path / "src", 40 * 65536, seed=51)
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, tmp_path / "src")
    d = Daemon(tmp_path, backend=backend)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, unreadable_fs.mount)
            _send(c, ih, src, src.blocks())
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == 40
    finally:
        assert d.stop() == 0, d.stderr()
    unreadable_fs.spoil(src.read(7, 4096, 64))
    d = Daemon(tmp_path, backend=backend)
    try:
        with Client(d.socket) as c:
            assert c.status(ih)["verified_pieces"] == 40
            for read in (lambda: c.read_piece(ih, 7), lambda: c.read_chunk(ih, 7, 0, 16384)):
                with pytest.raises(StorageIOError) as exc:
                    read()
                assert exc.value.errno == errno.EIO
            assert c.read_piece(ih, 8) == src.read(8, 0, 65536)
            assert any(e["errno"] == errno.EIO and e["piece"] == 7
                       for e in c.status(ih)["errors"])
            # Written again (whole pages: nothing to read in), it verifies. Stored through
            # a map, the page was read in first, and that was SIGBUS too.
            c.clear_piece(ih, 7)
            _send(c, ih, src, [blk for blk in src.blocks() if blk[0] == 7])
            c.flush_all()
            assert _has(c.status(ih)["have"], 7)
            assert c.read_piece(ih, 7) == src.read(7, 0, 65536)
        assert _metric_errors(d.http, "EIO") >= 2
    finally:
        assert d.stop() == 0, d.stderr()


def _telling(tmp_path: Path, backend: str, pieces: int
             ) -> tuple[bytes, Source, DiskIO, list[tuple[int, bool, bool | None]]]:
    """A v1 torrent of ``pieces`` pieces of 64 KiB, and an engine that lists what it
    tells of pieces, as (piece, ok, v1): (metainfo, source, engine, that list)."""
    content = make_payload(tmp_path / "src", pieces * 65536, seed=5)
    raw = make_torrent_lt(content, 65536, "v1")
    told: list[tuple[int, bool, bool | None]] = []
    dio = DiskIO(backend, cache_bytes=16 * 1024 * 1024,
                 on_piece=lambda r: told.append((r.piece, r.ok, r.v1)))
    return raw, Source(raw, tmp_path / "src"), dio, told


def test_blocks_a_flush_could_not_write_are_never_taken_for_received(
    tmp_path: Path, tiny_fs: Path, backend: str
) -> None:
    """Half a piece buffered, the disk full when it is flushed: those blocks left the
    buffer to be written, and the write failed. The piece's hash state still counted
    them, so the other half, sent once the space was back, completed the piece: it
    passed its hash from memory and was announced verified over zeros on disk (on the
    backends that gather a piece's blocks before writing them; on the others, a read
    back of the lost half failed the piece, blaming its sender). The piece starts over
    instead, told failed without a hash verdict, and sent again whole it verifies."""
    raw, src, dio, told = _telling(tmp_path, backend, 4)
    filler = tiny_fs / "filler"
    try:
        ih = dio.register(raw, tiny_fs)
        for _, b, n in [blk for blk in src.blocks() if blk[0] == 0]:
            dio.write_chunk(ih, 0, b, src.read(0, b, n))
        dio.flush_all()
        assert told == [(0, True, True)]
        fill_up(tiny_fs)
        with contextlib.suppress(StorageIOError):  # (refused at once, or buffered)
            for b in (0, 16384):
                dio.write_chunk(ih, 1, b, src.read(1, b, 16384))
        with pytest.raises(StorageIOError) as exc:
            dio.flush_all()
        assert exc.value.errno == errno.ENOSPC
        filler.unlink()
        for b in (32768, 49152):  # the half never sent
            dio.write_chunk(ih, 1, b, src.read(1, b, 16384))
        dio.flush_all()
        st = dio.status(ih)
        if _has(st["have"], 1):  # (never, now: it is only here to say what went wrong)
            assert (tiny_fs / "payload.bin").read_bytes()[65536:131072] == src.read(1, 0, 65536)
        assert not _has(st["have"], 1)
        assert (1, False, None) in told and (1, False, False) not in told  # nobody to blame
        for b in range(0, 65536, 16384):  # sent again whole, as the failure asks
            dio.write_chunk(ih, 1, b, src.read(1, b, 16384))
        dio.flush_all()
        assert _has(dio.status(ih)["have"], 1)
        assert dio.read_piece(ih, 1) == src.read(1, 0, 65536)
        assert (tiny_fs / "payload.bin").read_bytes()[65536:131072] == src.read(1, 0, 65536)
    finally:
        with contextlib.suppress(StorageIOError):
            dio.close()


@pytest.mark.backends(exclude={
    "uring": "gathers a piece's blocks: its write-out fails at the last, and the blocks "
             "retried alone start the piece anew (told failed), so are answered OK",
    "direct": "gathers a piece's blocks: its write-out fails at the last, and the blocks "
              "retried alone start the piece anew (told failed), so are answered OK"})
def test_each_failed_write_is_counted_once(tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    """The disk full, a client sends the blocks of pieces back to back: the daemon merges
    them into one write, which fails, and retries each block alone so that each gets
    its own answer. The error was counted (``stats``, ``/metrics``, ``status``) for the
    merged write and again for each block: 9 or 10 for 8 failed writes. It is counted
    once for each write answered with it."""
    content = make_payload(tmp_path / "src", 1 << 20, seed=12)
    raw = make_torrent_lt(content, 131072, "v1")
    src = Source(raw, tmp_path / "src")
    d = Daemon(tmp_path, backend=backend)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tiny_fs)
            fill_up(tiny_fs)
            for p in (1, 2, 3):
                before = c.stats()["errors"].get("ENOSPC", 0)
                for b in range(0, 131072, 16384):  # (pipelined: the lane merges them)
                    c.write_chunk(ih, p, b, src.read(p, b, 16384))
                with pytest.raises(StorageIOError) as exc:
                    c.wait_writes()
                answered = 1 + exc.value.others  # the writes answered with the error
                counted = c.stats()["errors"].get("ENOSPC", 0) - before
                assert counted == answered, (p, counted, answered)
        assert d.stop() == 0
    finally:
        d.proc.kill()


def test_journal_records_the_state_disk_refuses_are_reported_with_no_sync_window(
        tmp_path: Path, tiny_fs: Path, backend: str) -> None:
    """No sync window: a piece's journal record is written by the thread that wrote its
    last block. The state folder's disk full, each piece fails (nothing is vouched for
    that a restart would not know), and each refused record is an error counted, listed
    and pushed, as with a window. Blocks sent back to back are written as one merged
    write, which dropped the errors it met on its way when it succeeded: 0 or 1 counted
    for 64 failed pieces, no ``disk_error`` pushed, and pieced-peer fetched the pieces
    again and again."""
    content = make_payload(tmp_path / "src", 64 * 32768, seed=14)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    state = tiny_fs / "state"
    d = Daemon(tmp_path, env={"PIECED_SYNC_WINDOW_MS": "0", "PIECED_STATE_DIR": str(state)},
               backend=backend)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            fill_up(tiny_fs)
            for p, b, n in src.blocks():  # (pipelined: the lane merges them)
                c.write_chunk(ih, p, b, src.read(p, b, n))
            c.wait_writes()
            st = c.status(ih)
            failed = {f["piece"] for name, f in c.events if name == "piece_failed"}
            assert st["verified_pieces"] == 0 and len(failed) == src.meta.num_pieces
            refused = [e for e in st["errors"] if e["errno"] == errno.ENOSPC]
            assert refused and sum(e.get("count", 1) for e in refused) == len(failed), refused
            assert c.stats()["errors"].get("ENOSPC", 0) == len(failed)
            pushed = [f for name, f in c.events if name == "disk_error"]
            assert pushed and all(f["ih"] == ih and f["errno"] == errno.ENOSPC for f in pushed)
        assert d.stop() == 0, d.stderr()
    finally:
        d.proc.kill()


@pytest.mark.parametrize("backend", ["uring", "direct"])
def test_a_gathered_piece_whose_write_out_fails_is_told_failed(
    tmp_path: Path, tiny_fs: Path, backend: str
) -> None:
    """On the backends that gather a piece's blocks and write them at its last one, the
    disk full then: the last block got the error (ENOSPC), the blocks before it, which
    had been acknowledged, were lost with the write, and the piece went back to missing
    without a word. A client that sent again only the block that got the error waited
    for the piece for ever. The piece is told failed (no hash verdict: nobody to blame),
    as when a flush loses buffered blocks, and sent again whole it verifies."""
    raw, src, dio, told = _telling(tmp_path, backend, 2)
    filler = tiny_fs / "filler"
    try:
        ih = dio.register(raw, tiny_fs)
        fill_up(tiny_fs)
        for b in (0, 16384, 32768):  # acknowledged: gathered in the daemon's buffer
            dio.write_chunk(ih, 0, b, src.read(0, b, 16384))
        with pytest.raises(StorageIOError) as exc:
            dio.write_chunk(ih, 0, 49152, src.read(0, 49152, 16384))
        assert exc.value.errno == errno.ENOSPC
        assert told == [(0, False, None)]
        assert dio.status(ih)["partial_pieces"] == 0
        filler.unlink()
        for b in range(0, 65536, 16384):  # sent again whole, as the failure asks
            dio.write_chunk(ih, 0, b, src.read(0, b, 16384))
        dio.flush_all()
        assert told[-1] == (0, True, True)
        assert dio.read_piece(ih, 0) == src.read(0, 0, 65536)
    finally:
        with contextlib.suppress(StorageIOError):
            dio.close()


def test_a_piece_whose_only_block_could_not_be_written_is_missing_not_under_way(
    tmp_path: Path, tiny_fs: Path, backend: str
) -> None:
    """The disk full, the first block of a new piece is refused (ENOSPC), through either
    write: the piece held nothing, and stayed "under way" all the same (in the status,
    and a slot of the bounded number of pieces in progress) for as long as nobody sent it
    again. It is missing; a piece that did hold blocks keeps them; and sent whole once
    there is room, the piece verifies."""
    content = make_payload(tmp_path / "src", 4 * 65536, seed=6)
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, cache_bytes=16 * 1024 * 1024)
    filler = tiny_fs / "filler"
    try:
        ih = dio.register(raw, tiny_fs)
        dio.write_chunk(ih, 0, 0, src.read(0, 0, 16384), flush=True)  # piece 0: one block
        fill_up(tiny_fs)
        refused = []
        for write in (lambda: dio.write_block_direct(ih, 2, 0, src.read(2, 0, 16384)),
                      lambda: dio.write_chunk(ih, 3, 16384, src.read(3, 16384, 16384),
                                              flush=True)):
            try:
                write()
            except StorageIOError as exc:
                refused.append(exc.errno)
        # (A backend that gathers a piece's blocks in memory writes them with the piece:
        # the ring's block is refused at the flush, the inline one flushed at once.)
        gathers = dio.torrent(ih).storage.gathers_writes
        assert refused == ([errno.ENOSPC] if gathers else [errno.ENOSPC, errno.ENOSPC])
        with contextlib.suppress(StorageIOError):
            dio.flush_all()
        st = dio.status(ih, partial=True)
        assert [p for p, _ in st["partial"]] == [0], st["partial"]
        assert st["partial_pieces"] == 1
        assert dio._partials == 1  # (the daemon-wide count behind max_partial_pieces)
        filler.unlink()
        for p in range(4):
            for b in range(0, 65536, 16384):
                dio.write_block_direct(ih, p, b, src.read(p, b, 16384))
        dio.flush_all()
        assert dio.status(ih)["have"] == b"\xf0"
        assert dio._partials == 0
    finally:
        with contextlib.suppress(StorageIOError):
            dio.close()


@pytest.mark.backends(exclude={
    "disabled": "stores nothing: no write reaches a file system to fail",
    "mmap": "a flush of a mapped file deleted meanwhile goes through its map: no error "
            "for anyone (its next write finds it gone)"})
def test_one_clients_broken_torrent_does_not_fail_another_clients_flush_all(
    tmp_path: Path, backend: str
) -> None:
    """Client A's payload file is deleted under a piece half written; client B, with a
    torrent of its own, downloads it and calls ``flush_all``: B's call succeeds, its
    pieces verified (once, B's flush flushed every torrent of the daemon and B got A's
    error as its own; it flushes B's torrents alone now), and A hears of its file at its
    own flush (a ``disk_error`` event with ENOENT, in its status too)."""
    content_a = make_payload(tmp_path / "src_a", {"a": 600_000, "b": 333_333}, seed=3)
    raw_a = make_torrent_lt(content_a, 32768, "hybrid")
    sa = Source(raw_a, tmp_path / "src_a")
    raw_b, sb = _other_torrent(tmp_path)
    told: list[dict[str, Any]] = []
    d = Daemon(tmp_path, backend=backend)
    try:
        with (Client(d.socket, on_event=lambda name, ev: told.append({"event": name, **ev})) as a,
              Client(d.socket) as b):
            ih_a = a.register(raw_a, tmp_path / "A")
            ih_b = b.register(raw_b, tmp_path / "B")
            blocks = [blk for blk in sa.blocks() if blk[0] == 1] + sa.blocks()[:1]
            _send(a, ih_a, sa, blocks)
            a.flush_all()
            p, bb, n = next(blk for blk in sa.blocks() if blk[0] == 2)
            a.write_chunk(ih_a, p, bb, sa.read(p, bb, n))  # half of piece 2
            a.wait_writes()
            os.unlink(tmp_path / "A" / "payload" / "a")
            _send(b, ih_b, sb, sb.blocks())
            b.flush_all()  # A's broken file is not B's error
            assert b.status(ih_b)["verified_pieces"] == sb.meta.num_pieces
            with contextlib.suppress(StorageIOError):
                a.flush_all()  # (A's own: its error, or nothing left to flush)
            assert any(e["errno"] == errno.ENOENT for e in a.status(ih_a)["errors"])
            assert any(e["event"] == "disk_error" and e["errno"] == errno.ENOENT
                       for e in told), told
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.backends(exclude={
    "disabled": "stores nothing: no write reaches a file system to fail",
    "direct": "gathers a piece's blocks and writes them at its end: no run is written alone",
    "uring": "gathers a piece's blocks and writes them at its end: no run is written alone"})
@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_a_long_run_whose_write_fails_is_taken_whole_when_sent_again(
        tmp_path: Path, backend: str, kind: TorrentKind) -> None:
    """A run of 640 KiB (blocks merged from the ring) whose write fails, the disk full:
    nothing of it counts in its piece's hash state, and the run sent again once there is
    room completes the piece, verified, with the fingerprint of its bytes (a run hashed
    twice would fail it)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(fs)], check=True)
    try:
        content = make_payload(tmp_path / "src", 2**20, seed=4)
        raw = make_torrent_lt(content, 2**20, kind)
        src = Source(raw, tmp_path / "src")
        (fs / "filler").write_bytes(bytes(1024 * 1024))  # 512 KiB left
        dio = DiskIO(backend, sync_window=0.002)
        try:
            ih = dio.register(raw, fs)
            head = bytearray(src.read(0, 0, 384 * 1024))
            assert dio.write_blocks_direct(ih, 0, 0, [memoryview(head)], 24) is None
            rest = bytearray(src.read(0, 384 * 1024, 640 * 1024))
            views = [memoryview(rest)[:100_000], memoryview(rest)[100_000:]]
            with pytest.raises(StorageIOError) as exc:
                dio.write_blocks_direct(ih, 0, 384 * 1024, views, 40)
            assert exc.value.errno in (errno.ENOSPC, errno.EFBIG)
            assert dio.status(ih)["verified_pieces"] == 0
            (fs / "filler").unlink()
            result = dio.write_blocks_direct(ih, 0, 384 * 1024, views, 40)
            assert result is not None and result.ok
            dio.flush_all()
            assert dio.status(ih)["verified_pieces"] == 1
            assert dio.torrent(ih).fingerprint(0) == src.fingerprint(0)
            assert dio.recheck(ih).fingerprint_hits == 1
        finally:
            dio.close()
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=True)


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
@pytest.mark.parametrize("via", ["ring", "inline"])
def test_a_write_that_fails_half_way_over_received_bytes_leaves_them_to_be_sent_again(
        tmp_path: Path, tiny_fs: Path, backend: str, kind: TorrentKind, via: str) -> None:
    """A block received, then a write of 32 KiB over it (a client's merged run, its first
    16 KiB a bad copy) that fails with the disk full after its first 16 KiB reached the
    file over the good ones. The piece's hash state must not go on counting the good
    bytes: completed with the other blocks, it was announced verified, journaled (so
    verified again after a kill -9) and served, over the bad copy on disk. Nothing of the
    failed write counts: the piece completes once that range is sent again."""
    content = make_payload(tmp_path / "src", 65536, seed=12)
    raw = make_torrent_lt(content, 65536, kind)
    data = (tmp_path / "src" / "payload.bin").read_bytes()
    bad = bytearray(data[:32768])
    bad[100] ^= 0xFF
    d = Daemon(tmp_path, backend=backend)
    try:
        with Client(d.socket) as c:
            def write(begin: int, block: bytes) -> None:
                if via == "ring":
                    c.write_block_direct(ih, 0, begin, block)
                else:
                    c.write_chunk(ih, 0, begin, block)
                c.wait_writes()

            def verified() -> bool:
                return bool(c.status(ih, files=False)["have"][0] & 0x80)

            ih = c.register(raw, tiny_fs)
            if via == "ring":
                c.attach_ring(1 << 20)
            write(0, data[:16384])
            filler = fill_up(tiny_fs)
            try:
                write(0, bytes(bad))
            except StorageIOError as exc:
                assert exc.errno in (errno.ENOSPC, errno.EFBIG)
            filler.unlink()
            write(16384, data[16384:])
            c.flush_all()
            on_disk = (tiny_fs / "payload.bin").read_bytes()
            if verified():
                assert on_disk == data, "a piece reported verified over other bytes on disk"
            write(0, data[:32768])
            c.flush_all()
            assert verified()
            assert (tiny_fs / "payload.bin").read_bytes() == data
            assert c.read_chunk(ih, 0, 0, 65536) == data
    finally:
        assert d.stop() == 0, d.stderr()


def test_flush_all_does_not_wait_for_another_clients_fenced_torrent(
        tmp_path: Path, backend: str) -> None:
    """Client A's torrent is held by a long recheck (a fence: it runs alone on its
    torrent); client B's ``flush_all`` of its own torrent returns meanwhile, its pieces
    verified. It used to wait for the whole recheck (and for ever behind a move that
    hung). A's own ``flush_all`` still waits for its torrent."""
    raw_a, sa = _other_torrent(tmp_path)
    content_b = make_payload(tmp_path / "src_b", 200_000, seed=5)
    raw_b = make_torrent_lt(content_b, 16384, "v1")
    sb = Source(raw_b, tmp_path / "src_b")
    dio = DiskIO(backend, sync_window=0.01)
    started, release = threading.Event(), threading.Event()

    def progress(done: int, total: int) -> None:
        started.set()
        release.wait(60)

    try:
        ih_a = dio.register(raw_a, tmp_path / "A")
        ih_b = dio.register(raw_b, tmp_path / "B")
        for p, b, n in sa.blocks():
            dio.write_chunk(ih_a, p, b, sa.read(p, b, n))
        dio.flush_all()
        checking = threading.Thread(target=lambda: dio.recheck(ih_a, progress, full=True))
        checking.start()
        assert started.wait(30)
        for p, b, n in sb.blocks():
            dio.write_chunk(ih_b, p, b, sb.read(p, b, n))
        flushed = threading.Event()
        threading.Thread(target=lambda: (dio.flush_all(raise_for=[ih_b]), flushed.set()),
                         daemon=True).start()
        assert flushed.wait(30), "B's flush_all waited for A's recheck"
        assert checking.is_alive()
        assert dio.status(ih_b)["verified_pieces"] == sb.meta.num_pieces
        mine = threading.Event()
        threading.Thread(target=lambda: (dio.flush_all(raise_for=[ih_a]), mine.set()),
                         daemon=True).start()
        assert not mine.wait(0.5)  # A's own waits for its torrent
        release.set()
        checking.join(60)
        assert mine.wait(30)
    finally:
        release.set()
        dio.close()


def test_a_stop_after_a_torrents_folder_was_deleted_is_clean(tmp_path: Path, backend: str) -> None:
    """Blocks written but not yet synced, then the torrent's save folder deleted behind
    the daemon's back: SIGTERM stops it with status 0 (the error is recorded and
    logged; the service did not stop as failed), and the other torrent's pieces are
    known verified at the next start."""
    raw_a, sa = _other_torrent(tmp_path)
    content_b = make_payload(tmp_path / "src_b", 200_000, seed=5)
    raw_b = make_torrent_lt(content_b, 16384, "v1")
    sb = Source(raw_b, tmp_path / "src_b")
    d = Daemon(tmp_path, backend=backend, env={"PIECED_SYNC_WINDOW_MS": "60000"})
    try:
        with Client(d.socket) as c:
            ih_b = c.register(raw_b, tmp_path / "B")
            _send(c, ih_b, sb, sb.blocks())
            c.flush_all()
            ih_a = c.register(raw_a, tmp_path / "A")
            _send(c, ih_a, sa, sa.blocks()[:-1])  # (the last piece waits, unwritten)
        shutil.rmtree(tmp_path / "A")
    finally:
        assert d.stop() == 0, d.stderr()
    d = Daemon(tmp_path, backend=backend)
    try:
        with Client(d.socket) as c:
            assert c.status(ih_b)["verified_pieces"] == sb.meta.num_pieces
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.backends(exclude={
    "mmap": "a store into a map waiting on a frozen file system holds the process's "
            "memory map lock (the kernel's): the whole daemon waits (README)"})
def test_a_frozen_file_system_holds_up_its_own_torrent_only(
        tmp_path: Path, freezable_fs: FreezableFs, backend: str) -> None:
    """Torrent A's file system is frozen (``fsfreeze``: a write waits until it thaws, as
    on a disk that hangs) while a client writes to it, its files preallocated. Another
    client's writes to torrent B on another file system, its ``stats`` and ``/healthz``
    are answered meanwhile."""
    raws = [make_torrent_lt(make_payload(tmp_path / n, {f"{n}.bin": 1 << 20}, seed=27),
                            65536, "v1") for n in ("a", "b")]
    sa, sb = Source(raws[0], tmp_path / "a"), Source(raws[1], tmp_path / "b")
    d = Daemon(tmp_path, backend=backend, env={"PIECED_PREALLOCATE": "true"})
    stuck_errors: list[BaseException] = []
    try:
        with Client(d.socket) as c1:
            a = c1.register(raws[0], freezable_fs.mount / "a")
            c1.write_chunk(a, 0, 0, sa.read(0, 0, 16384), flush=True)
            c1.wait_writes()  # A's file made (preallocated) before the freeze
            freezable_fs.freeze()

            def stuck() -> None:
                try:
                    c1.write_chunk(a, 2, 0, sa.read(2, 0, 16384), flush=True)
                    c1.wait_writes()
                except BaseException as exc:  # (said after the join)
                    stuck_errors.append(exc)

            writer = threading.Thread(target=stuck, daemon=True)
            writer.start()
            time.sleep(1.0)  # (the write to A waits for the thaw by now)
            answered: list[str] = []

            def other() -> None:
                with Client(d.socket) as c2:
                    b = c2.register(raws[1], tmp_path / "dl_b")
                    for begin in range(0, 65536, 16384):
                        c2.write_chunk(b, 1, begin, sb.read(1, begin, 16384), flush=True)
                    c2.wait_writes()
                    answered.append("writes")
                    assert c2.read_chunk(b, 1, 100, 1000) == sb.read(1, 100, 1000)
                    c2.stats()
                    answered.append("stats")
                with urllib.request.urlopen(f"http://{d.http}/healthz", timeout=20) as r:
                    assert r.status == 200
                answered.append("healthz")

            t = threading.Thread(target=other, daemon=True)
            t.start()
            t.join(timeout=20)
            assert answered == ["writes", "stats", "healthz"], (
                f"while A's file system was frozen, only {answered} of another client's "
                "requests were answered")
            assert writer.is_alive(), "the write to the frozen file system waits for the thaw"
            freezable_fs.thaw()
            writer.join(timeout=30)
            assert not writer.is_alive() and not stuck_errors, stuck_errors
            assert c1.read_chunk(a, 2, 0, 16384) == sa.read(2, 0, 16384)
        assert d.stop() == 0
    finally:
        freezable_fs.thaw()
        d.proc.kill()


@pytest.mark.backends(exclude={"disabled": "opens no payload file: none can vanish"})
def test_a_piece_taken_back_as_it_hashes_is_not_counted_failed(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A piece's last block arrives and, while it is hashed, its file vanishes (a write
    of another piece of the file finds it gone): the piece starts over, told failed
    without v1/v2, for its blocks to be sent again. Its hash was right: it was counted
    in ``pieces_failed`` (pieces whose blocks failed their hash check) all the same."""
    from pieced.storage import hashing

    content = make_payload(tmp_path / "src", {"a.bin": 4 * 32768}, seed=8)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    events: list[Any] = []
    dio = DiskIO(backend, cache_bytes=1 << 20, on_piece=events.append)
    ih = dio.register(raw, tmp_path / "dl")
    dio.write_chunk(ih, 1, 0, src.read(1, 0, 16384))
    dio.write_chunk(ih, 0, 0, src.read(0, 0, 16384))
    dio.flush_all()  # (the file made)
    real = hashing.PieceHasher.finish
    met: list[BaseException | None] = []
    fired: list[bool] = []

    def vanishing(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not fired:  # (once: the other write may complete its own piece)
            fired.append(True)

            def other() -> None:
                os.unlink(tmp_path / "dl" / "payload" / "a.bin")
                try:
                    dio.write_chunk(ih, 1, 16384, src.read(1, 16384, 16384))
                except StorageIOError as exc:
                    met.append(exc)
                else:
                    met.append(None)
            t = threading.Thread(target=other)
            t.start()
            t.join(30)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(hashing.PieceHasher, "finish", vanishing)
    done = dio.write_chunk(ih, 0, 16384, src.read(0, 16384, 16384))
    monkeypatch.undo()
    assert len(met) == 1
    told = [e for e in events if e.piece == 0]
    assert told and not told[-1].ok and told[-1].v1 is None, (done, told)  # taken back
    assert dio.status(ih)["verified_pieces"] == 0
    assert dio.stats()["pieces_failed"] == 0
    for p in range(4):  # sent again, every piece verifies
        for b in (0, 16384):
            dio.write_chunk(ih, p, b, src.read(p, b, 16384))
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] == 4
    assert dio.stats()["pieces_failed"] == 0
    dio.close()


@pytest.mark.backends(exclude={
    "disabled": "opens no payload file: none can vanish",
    "posix": "writes each block as it comes: the block write meets the vanished file, "
             "the piece under way (tested above)",
    "mmap": "writes each block as it comes: the block write meets the vanished file, "
            "the piece under way (tested above)"})
def test_a_piece_whose_file_vanished_as_its_blocks_are_written_out_is_told_failed(
        tmp_path: Path, backend: str) -> None:
    """A backend that gathers a piece's blocks writes them out once the piece verifies;
    the file was deleted behind the daemon's back meanwhile. The write-out finds it gone,
    the piece is taken back (its blocks with it), and the writer got the error for its
    last block alone: the piece was told failed to no one, and a client that sent that
    block again waited for the piece for ever. It is told failed, before the error."""
    content = make_payload(tmp_path / "src", {"x.bin": 4 * 65536, "y.bin": 4 * 65536}, seed=9)
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, tmp_path / "src")
    told: list[tuple[str, int | None, bool | None]] = []
    dio = DiskIO(backend, cache_bytes=1 << 20,
                 on_piece=lambda r: told.append(("piece", r.piece, r.v2)),
                 on_error=lambda ih, e: told.append(("error", e.get("piece"), None)))
    ih = dio.register(raw, tmp_path / "dl")
    for b in range(0, 3 * 16384, 16384):  # piece 0: three blocks of four, gathered
        dio.write_chunk(ih, 0, b, src.read(0, b, 16384))
    dio.write_chunk(ih, 1, 0, src.read(1, 0, 16384))
    dio.flush_piece(ih, 1)  # (x.bin made; piece 0's blocks still in memory)
    os.unlink(tmp_path / "dl" / "payload" / "x.bin")
    with pytest.raises(StorageIOError) as got:
        dio.write_chunk(ih, 0, 3 * 16384, src.read(0, 3 * 16384, 16384))
    assert got.value.errno == errno.ENOENT
    assert ("piece", 0, None) in told, told  # (failed, no hash said so)
    assert told.index(("piece", 0, None)) < told.index(("error", 0, None)), told
    assert dio.status(ih, files=False, partial=True)["partial"] == []  # (nothing kept)
    for b in range(0, 65536, 16384):  # sent again whole: it verifies
        dio.write_chunk(ih, 0, b, src.read(0, b, 16384))
    dio.flush_all()
    assert dio.read_piece(ih, 0) == src.read(0, 0, 65536)
    dio.close()
