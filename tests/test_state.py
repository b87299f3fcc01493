"""Durable state: a restarted engine or daemon knows its torrents and verified pieces,
and after a crash every piece it reports verified really is on disk."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from pieced.protocol.client import Client
from pieced.storage.disk import DiskIO
from pieced.storage.errors import StorageIOError
from pieced.storage.layout import Layout

from tests.conftest import STORES_NOTHING, Daemon
from tests.realtools import corrupt, lt_recheck, make_torrent_lt
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
    filler = os.open(tiny_fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    with contextlib.suppress(OSError):
        while True:
            os.write(filler, bytes(4096))
    os.close(filler)
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


# A child process that registers and downloads a torrent, then dies (os._exit, as by
# kill -9) during a move or a rename: right after the ``die_after``-th file is moved.
_DIES_MOVING = """
import os, sys
from pathlib import Path
sys.path[:0] = [{repo!r}]
from pieced.storage import paths
from pieced.storage.disk import DiskIO
from tests.test_disk import Source, fill
raw = Path({torrent!r}).read_bytes()
src = Source(raw, Path({src!r}))
dio = DiskIO({backend!r}, state_dir=Path({state!r}), sync_window=0.002)
ih = dio.register(raw, Path({old!r}))
fill(dio, ih, src)
dio.flush_all()
moved = [0]
real = paths.Beneath.move
def move(self, *a, **k):
    real(self, *a, **k)
    moved[0] += 1
    if moved[0] == {die_after}:
        os._exit(9)
paths.Beneath.move = move
if {op!r} == "move":
    dio.move_storage(ih, Path({new!r}))
else:
    dio.rename_file(ih, 0, "renamed/first.bin")
os._exit(0)
"""


@pytest.mark.parametrize("op,die_after", [("move", 7), ("move", 1), ("rename", 1)])
def test_a_crash_during_a_move_or_rename_keeps_every_verified_piece(
    tmp_path: Path, backend: str, op: str, die_after: int
) -> None:
    """The process dies part-way through a move_storage (some files moved, the others
    not yet) or right after a file is renamed, before the new location is recorded. A
    restart finishes the move: every file where it was going, every piece verified, the
    bytes right. Before, the files already moved were taken for gone, with the verified
    pieces they held (318 of 3,937 pieces were left in one case)."""
    import subprocess
    import sys

    from tests.realtools import make_payload

    spec = {f"d{i % 3}/f{i}.bin": 20000 + 1000 * i for i in range(12)}
    content = make_payload(tmp_path / "src", spec, seed=5)
    raw = make_torrent_lt(content, 16384, "hybrid")
    (tmp_path / "t.torrent").write_bytes(raw)
    src = Source(raw, tmp_path / "src")
    old, new = tmp_path / "old", tmp_path / "new"
    script = _DIES_MOVING.format(
        repo=str(Path(__file__).resolve().parent.parent), torrent=str(tmp_path / "t.torrent"),
        src=str(tmp_path / "src"), backend=backend, state=str(tmp_path / "state"),
        old=str(old), new=str(new), op=op, die_after=die_after)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 9, r.stderr  # it died where it was meant to
    again = DiskIO(backend, state_dir=tmp_path / "state")
    ih = again.torrents()[0]
    st = again.status(ih)
    assert st["verified_pieces"] == src.meta.num_pieces and st["reverifying_pieces"] == 0
    assert st["save_path"] == str(new if op == "move" else old)
    where = new if op == "move" else old
    for i, f in enumerate(src.meta.files):
        if f.length and src.meta.files.stored(i):
            parts = ("renamed", "first.bin") if op == "rename" and i == 0 else f.path
            assert where.joinpath(*parts).read_bytes() == (tmp_path / "src").joinpath(
                *f.path).read_bytes()
    assert not any(p.is_file() for p in old.rglob("*")) if op == "move" else True
    assert again.recheck(ih, full=True).ok
    again.close()


def test_a_damaged_resume_record_is_rebuilt_from_the_journal(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    state = tmp_path / "state"
    dio = DiskIO(backend, state_dir=state)
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src)
    dio.close()
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
