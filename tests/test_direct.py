"""The O_DIRECT backend: what it writes bypasses the page cache, blocks that share a
page with their neighbours (files of a multi-file torrent start anywhere) are written
whole by several threads at once, and a daemon on it serves three clients."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from pieced.protocol.client import Client
from pieced.storage.disk import DiskIO
from pieced.storage.errors import StorageIOError

from tests.conftest import Daemon, FreezableFs
from tests.pagecache import resident_pages
from tests.realtools import lt_recheck, make_payload, make_torrent_lt
from tests.test_daemon import write_from_three_clients
from tests.test_disk import Source, fill
from tests.test_state import wait_reverified

# no file a multiple of 4 KiB: every file boundary falls inside a page
FILES = {"a.bin": 100_001, "b.bin": 3, "c/d.bin": 77_777, "e.bin": 250_000, "f.bin": 1}


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_blocks_from_three_threads_across_shared_pages(tmp_path: Path, kind: str) -> None:
    content = make_payload(tmp_path / "src", FILES, seed=17)
    raw = make_torrent_lt(content, 32768, kind)
    src = Source(raw, tmp_path / "src")
    save = tmp_path / "dl"
    dio = DiskIO("direct", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, save)
        blocks = src.peer_blocks()
        errors: list[BaseException] = []

        def writer(k: int) -> None:
            try:
                for p, b, n in blocks[k::3]:  # neighbours go to different threads
                    dio.write_block_direct(ih, p, b, src.read(p, b, n))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        for p in range(src.meta.num_pieces):  # read back past the page cache too
            size = src.layout.piece_size(p)
            assert dio.read_chunk(ih, p, 0, size, volatile=True) == src.read(p, 0, size)
    finally:
        dio.close()
    # what went through O_DIRECT never passed through the page cache: no page of any
    # file is there (checked before anything else reads the files)
    resident = {rel: pages for rel in FILES if (pages := resident_pages(save / "payload" / rel))}
    assert not resident, f"pages in the page cache: {resident}"
    for rel, size in FILES.items():
        got = (save / "payload" / rel).read_bytes()
        assert len(got) == size and got == (content / rel).read_bytes(), rel
    assert 0 in resident_pages(save / "payload" / "e.bin")  # the check can tell
    assert all(lt_recheck(raw, save))


def daemon_on(tmp_path: Path, backend: str, kind: str, piece: int, seed: int) -> None:
    """A daemon on ``backend`` takes a torrent from three clients (blocks as peers send
    them, files starting mid-page), reads each piece back and rechecks it in full;
    libtorrent then finds every byte right."""
    content = make_payload(tmp_path / "src", FILES, seed=seed)
    raw = make_torrent_lt(content, piece, kind)
    src = Source(raw, tmp_path / "src")
    d = Daemon(tmp_path, env={"PIECED_BACKEND": backend})
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
        write_from_three_clients(d.socket, ih, src, src.peer_blocks(), 1024 * 1024)
        with Client(d.socket) as c:
            c.flush_all()
            st = c.status(ih)
            assert st["verified_pieces"] == src.meta.num_pieces and st["backend"] == backend
            for p in range(src.meta.num_pieces):
                n = min(src.layout.piece_size(p), 16384)
                assert c.read_chunk(ih, p, 0, n, volatile=True) == src.read(p, 0, n)
            assert c.recheck(ih, full=True)["verified"] == src.meta.num_pieces
    finally:
        assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, tmp_path / "dl"))


def test_a_daemon_on_the_direct_backend(tmp_path: Path) -> None:
    daemon_on(tmp_path, "direct", "hybrid", 65536, seed=18)


def test_pieces_larger_than_one_direct_call(tmp_path: Path) -> None:
    """8 MiB pieces (written and read 4 MiB at a time), files starting mid-page."""
    content = make_payload(tmp_path / "src", {"a.bin": 9 * 1024 * 1024 + 5,
                                              "b.bin": 5 * 1024 * 1024 - 3}, seed=19)
    raw = make_torrent_lt(content, 8 * 1024 * 1024, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO("direct", cache_bytes=64 * 1024 * 1024, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        for p, b, n in src.peer_blocks():
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        dio.pool.drop((dio._torrents[ih].id, 1))  # read it from the disk, not the cache
        assert dio.read_piece(ih, 1) == src.read(1, 0, src.layout.piece_size(1))
        assert dio.recheck(ih, full=True).ok
    finally:
        dio.close()
    assert (tmp_path / "dl" / "payload" / "b.bin").read_bytes() == (content / "b.bin").read_bytes()


def test_bounce_buffers_are_one_a_thread_not_one_a_thread_and_torrent(tmp_path: Path) -> None:
    """Eight torrents of 8 MiB pieces rechecked one after the other: the hashing threads
    read them through their bounce buffers (4 MiB each, touched whole), one a thread
    whatever the number of torrents. Before, each torrent kept its own for each thread
    for as long as it was registered: the memory grew with the number of torrents."""
    import hashlib

    import bencodepy

    from tests.conftest import proc_bytes

    piece = 8 * 1024 * 1024
    zero_hash = hashlib.sha1(bytes(piece)).digest()
    dio = DiskIO("direct", cache_bytes=0, hash_workers=2, roots=[tmp_path])
    try:
        torrents = []
        for k in range(8):
            name = f"zeros{k}.bin"
            info = {b"name": name.encode(), b"piece length": piece, b"length": 2 * piece,
                    b"pieces": zero_hash * 2}
            dl = tmp_path / f"dl{k}"
            dl.mkdir()
            with open(dl / name, "wb") as f:  # sparse: zeros, nothing on disk
                f.truncate(2 * piece)
            torrents.append(dio.register(bencodepy.encode({b"info": info}), dl))
        assert dio.recheck(torrents[0], full=True).ok  # the threads and their buffers exist
        base = proc_bytes(os.getpid())
        for ih in torrents[1:]:
            assert dio.recheck(ih, full=True).ok
        grown = proc_bytes(os.getpid()) - base
        print(f"seven more rechecks: RSS grew {grown / 2**20:.1f} MiB")
        assert grown < 16 * 1024 * 1024, grown  # 7 torrents x 2 threads x 4 MiB before
    finally:
        dio.close()


def test_bounce_buffers_are_bounded_whatever_the_number_of_threads(tmp_path: Path) -> None:
    """Forty-eight threads (the daemon's pools keep about seventy) read 4 MiB pieces at
    an offset inside a page, through bounce buffers: at most MAX_BOUNCES of them exist,
    shared, however many threads there are and for as long as they live. Before, each
    thread kept its own (4 MiB, touched whole) for as long as it lived: 192 MiB here,
    outside every budget; and every read is right. (Counted as the anonymous maps of
    4 MiB in memory, which is what a bounce buffer is: the process's RSS also holds
    what the C allocator keeps of the threads' replies, tens of MiB that vary.)"""
    from concurrent.futures import ThreadPoolExecutor

    from pieced.storage import direct
    from pieced.storage.direct import MAX_BOUNCES

    def _maps_of(size: int) -> int:
        """Anonymous maps (``mmap.mmap(-1, n)``: shared, listed as /dev/zero) of exactly
        ``size`` bytes this process has touched whole."""
        n = 0
        zero = kib = False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:  # a map's first line
                zero = "/dev/zero" in line
            elif line.startswith("Size:"):
                kib = int(line.split()[1]) == size // 1024
            elif line.startswith("Rss:") and zero and kib:
                n += int(line.split()[1]) >= size // 1024
        return n

    piece = 4 * 1024 * 1024
    content = make_payload(tmp_path / "src", {"a.bin": 4 * piece}, seed=21)
    raw = make_torrent_lt(content, piece, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO("direct", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill(dio, ih, src, seed=None, direct_every=0)
        dio.flush_all()
        with ThreadPoolExecutor(48) as pool:
            def read(k: int) -> bool:
                p = k % src.meta.num_pieces
                return dio.read_chunk(ih, p, 100, piece - 100, volatile=True) == src.read(
                    p, 100, piece - 100)

            assert all(pool.map(read, range(8)))  # (the buffers there are by now)
            base = _maps_of(piece)
            assert all(pool.map(read, range(8, 300)))
            grown = _maps_of(piece) - base
            print(f"48 threads reading: {grown} more maps of 4 MiB")
            assert direct._bounces[os.stat(tmp_path).st_dev].made <= MAX_BOUNCES
            assert grown <= MAX_BOUNCES, grown
    finally:
        dio.close()


def test_reads_of_a_verified_piece_while_the_file_end_is_written(tmp_path: Path) -> None:
    """A piece is seeded (read again and again) while another piece that shares its
    file's last page is cleared and written again and again: downloading and seeding at
    once. Writing that last page makes the file a page long for a moment; a read that
    met the file's end used to read on from that unaligned offset and fail with EINVAL
    (about one read in twenty), recorded as a disk error."""
    content = make_payload(tmp_path / "src", {"a.bin": 100_000, "b.bin": 48_000}, seed=19)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    n = src.meta.num_pieces
    seeded, written = n - 2, n - 1  # both hold bytes of b.bin's last page
    d = Daemon(tmp_path, backend="direct")
    with Client(d.socket) as c:
        ih = c.register(raw, tmp_path / "dl")
        for p, b, ln in src.blocks():
            c.write_block_direct(ih, p, b, src.read(p, b, ln))
        c.wait_writes()
        c.flush_all()
    assert d.stop() == 0
    d = Daemon(tmp_path, backend="direct")  # a cache that holds nothing: reads go to the disk
    try:
        with Client(d.socket) as c:
            want = src.read(seeded, 0, 16384)
            again = src.read(written, 0, src.layout.piece_size(written))
            stop = threading.Event()
            wrong: list[object] = []

            def seed() -> None:
                with Client(d.socket) as r:
                    while not stop.is_set():
                        try:  # volatile: from the disk each time, not from the cache
                            if r.read_chunk(ih, seeded, 0, 16384, volatile=True) != want:
                                wrong.append("bytes")
                        except Exception as exc:
                            wrong.append(exc)

            seeder = threading.Thread(target=seed)
            seeder.start()
            try:
                for _ in range(400):
                    c.clear_piece(ih, written)
                    c.write_block_direct(ih, written, 0, again)
                    c.wait_writes()
            finally:
                stop.set()
                seeder.join(30)
            assert wrong == []
            assert c.status(ih, files=False)["errors"] == []
    finally:
        assert d.stop() == 0


def test_a_check_on_a_file_system_without_o_direct_says_so_and_fails_nothing(
        tmp_path: Path) -> None:
    """Files moved to a file system that refuses O_DIRECT (ramfs): a recheck on the
    direct backend took every read's EINVAL for a bad piece, said nothing, and left
    none of the good pieces verified. It now ends with the error (its errno said), every
    piece as it was; other I/O errors of a check do the same, as a libtorrent user would
    see a file error, not a torrent whose every piece fails."""
    import subprocess

    content = make_payload(tmp_path / "src", {"a.bin": 70_000, "b.bin": 50_000}, seed=21)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    ram = tmp_path / "ram"
    ram.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ram)], check=True)
    dio = DiskIO("direct", state_dir=tmp_path / "state", roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill(dio, ih, src)
        dio.flush_all()
        n = src.meta.num_pieces
        dio.move_storage(ih, ram / "dl")
        with pytest.raises(StorageIOError) as exc:
            dio.recheck(ih, full=True)
        assert exc.value.errno == errno.EINVAL
        st = dio.status(ih)
        assert st["verified_pieces"] == n and st["errors"]
        dio.move_storage(ih, tmp_path / "back")
        assert dio.recheck(ih, full=True).ok
        assert dio.status(ih)["verified_pieces"] == n
    finally:
        dio.close()
        subprocess.run(["umount", "-l", str(ram)], check=True)


def test_a_file_end_a_crash_left_a_page_long_is_cut_back_at_the_restart(tmp_path: Path) -> None:
    """A file's last page is written whole, then the file cut back to its length: a
    kill -9 between the two left the file up to a page longer, for good (a piece found
    good is never written again). The start after a crash cuts it back; a file longer
    by more than a page is not of the daemon's making, and is left as it is. (The
    torrent's last piece, in other files, is not written: the kill comes during the
    download, as such a crash does. Once a torrent completes, its files are stamped, and
    a file found longer than stamped after a crash has its pieces checked again.)"""
    content = make_payload(tmp_path / "src", FILES, seed=19)
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO("direct", state_dir=tmp_path / "state")
    ih = dio.register(raw, tmp_path / "dl")
    last = src.meta.num_pieces - 1
    for p, b, n in src.blocks():
        if p != last:
            dio.write_block_direct(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    dio.torrent(ih).storage.close_handles()
    assert dio.state is not None
    dio.state.close()  # killed: no clean stop
    dl = tmp_path / "dl" / content.name
    for name, extra in (("a.bin", 4096 - 100_001 % 4096), ("c/d.bin", 5000)):
        with open(dl / name, "ab") as f:
            f.write(bytes(extra))  # what the write of a last page whole leaves
    again = DiskIO("direct", state_dir=tmp_path / "state")
    try:
        assert again.status(ih)["verified_pieces"] == last
        assert (dl / "a.bin").stat().st_size == FILES["a.bin"]
        assert (dl / "c/d.bin").stat().st_size == FILES["c/d.bin"] + 5000
        assert lt_recheck(raw, tmp_path / "dl")[:last] == [True] * last
    finally:
        again.close()


def test_what_a_file_held_past_its_length_is_kept_at_the_start_after_a_crash(
        tmp_path: Path) -> None:
    """The start after a crash cut any file longer than the torrent says by less than a
    page back to its length, written by the daemon or not: a user's file with bytes
    past the torrent's end, only read (seeded), lost them; a file another torrent knows
    as longer lost its tail, and that torrent its verified pieces. A file the state
    folder knows unwritten since is left as it is now; of the others, only the zeros a
    page written whole put past the end are cut, and none shorter than a torrent
    sharing it says it is."""
    content = make_payload(tmp_path / "src", {"a.bin": 5200, "b.bin": 300}, seed=23)
    long_raw = make_torrent_lt(content, 16384, "v1")
    data = (content / "a.bin").read_bytes()
    # a.bin holds 100 zeros at its end; the other torrent takes its first 5000 bytes
    (content / "a.bin").write_bytes(data[:5100] + bytes(100))
    long_raw = make_torrent_lt(content, 16384, "v1")
    short = make_payload(tmp_path / "short", {"a.bin": 5000, "b.bin": 100}, seed=23)
    (short / "a.bin").write_bytes(data[:5000])
    (short / "b.bin").write_bytes((content / "b.bin").read_bytes()[:100])
    short_raw = make_torrent_lt(short, 16384, "v1")
    dl = tmp_path / "dl"
    import shutil

    shutil.copytree(content, dl / content.name)
    dio = DiskIO("direct", state_dir=tmp_path / "state")
    first = dio.register(short_raw, dl)  # (only read: both its files are longer)
    assert dio.recheck(first).ok
    dio.torrent(first).storage.close_handles()
    assert dio.state is not None
    dio.state.close()  # killed: no clean stop
    again = DiskIO("direct", state_dir=tmp_path / "state")
    try:
        assert again.status(first)["verified_pieces"] == 1
        sizes = {n: (dl / content.name / n).stat().st_size for n in ("a.bin", "b.bin")}
        assert sizes == {"a.bin": 5200, "b.bin": 300}, sizes  # (cut to 5000, 100 before)
        second = again.register(long_raw, dl)
        assert again.recheck(second).ok
        again.torrent(second).storage.close_handles()
        assert again.state is not None
        again.state.close()  # killed again
    finally:
        again.torrent(first).storage.close_handles()
    with open(dl / content.name / "a.bin", "ab") as f:
        f.write(bytes(4096 - 5200 % 4096))  # what the write of a last page whole leaves
    third = DiskIO("direct", state_dir=tmp_path / "state")
    try:
        # Cut to 5200 (the zeros past 5100 are the longer torrent's data), not to 5000.
        assert (dl / content.name / "a.bin").stat().st_size == 5200
        for ih in (first, second):  # (found longer than stamped: checked again, good)
            assert wait_reverified(third, ih)["verified_pieces"] == 1
    finally:
        third.close()


def test_writes_stuck_on_a_frozen_file_system_leave_bounce_buffers_for_the_others(
        tmp_path: Path, freezable_fs: FreezableFs) -> None:
    """Twelve writes to torrent A wait on its file system, frozen (``fsfreeze``: writes
    wait until it thaws, as on a disk that hangs); each holds a bounce buffer meanwhile.
    A write and an unaligned read of torrent B, on another file system, took one of the
    same eight buffers and waited for A's disk; each file system has its own now."""
    from concurrent.futures import ThreadPoolExecutor

    raws = [make_torrent_lt(make_payload(tmp_path / n, {f"{n}.bin": 1 << 20}, seed=26),
                            65536, "v1") for n in ("a", "b")]
    src, src_b = Source(raws[0], tmp_path / "a"), Source(raws[1], tmp_path / "b")
    dio = DiskIO("direct", cache_bytes=0, roots=[tmp_path])
    pool = ThreadPoolExecutor(13)
    try:
        a = dio.register(raws[0], freezable_fs.mount / "a")
        b = dio.register(raws[1], tmp_path / "dl_b")
        for ih, s in ((a, src), (b, src_b)):
            dio.write_chunk(ih, 0, 0, s.read(0, 0, 16384), flush=True)  # sized, opened
        freezable_fs.freeze()
        stuck = [pool.submit(dio.write_chunk, a, p, 0, src.read(p, 0, 16384), True)
                 for p in range(1, 13)]
        threading.Event().wait(1.0)  # (each of A's writes holds its buffer, or waits for one)
        assert not any(f.done() for f in stuck), "the writes to A wait for the thaw"
        on_b = pool.submit(lambda: (dio.write_chunk(b, 1, 0, src_b.read(1, 0, 16384), True),
                                    dio.read_chunk(b, 1, 100, 1000, volatile=True)))
        try:
            assert on_b.result(timeout=20)[1] == src_b.read(1, 100, 1000)
        except TimeoutError:
            pytest.fail("B's write waited for a bounce buffer held by writes to A's frozen disk")
        freezable_fs.thaw()
        for f in stuck:
            f.result(timeout=30)
        assert dio.read_chunk(a, 12, 0, 16384, volatile=True) == src.read(12, 0, 16384)
    finally:
        freezable_fs.thaw()
        pool.shutdown(wait=True)
        dio.close()


@pytest.mark.parametrize("backend", ["direct", "posix", "mmap", "uring"])
def test_a_read_past_a_short_files_end_gives_zeros_into_an_aligned_buffer(
        tmp_path: Path, backend: str) -> None:
    """A file shorter than its torrent says (another program's, not yet sized by the
    daemon), read into a page-aligned buffer that held other bytes (a recheck reuses
    its buffers): past the file's end the buffer holds zeros on every backend. On
    direct, the part past the last whole 4 KiB page kept the buffer's old bytes, and a
    check that takes zeros for "past the end" was given something else."""
    import hashlib
    import mmap

    import bencodepy
    from pieced.storage.files import HandlePool, make_storage
    from pieced.storage.layout import Layout
    from pieced.storage.metainfo import parse

    content = hashlib.shake_128(b"short").digest(5000)
    info = {b"name": b"f.bin", b"piece length": 16384, b"length": 5000,
            b"pieces": hashlib.sha1(content).digest()}
    meta = parse(bencodepy.encode({b"info": info}))
    (tmp_path / "f.bin").write_bytes(content[:100])
    storage = make_storage(backend, meta, tmp_path, HandlePool(8), roots=[tmp_path])
    region = mmap.mmap(-1, 8192)
    try:
        buf = memoryview(region)[:5000]
        buf[:] = b"\xee" * 5000
        storage.readinto(Layout(meta).map(0, 0, 5000), buf)
        assert bytes(buf[:100]) == content[:100]
        assert bytes(buf[100:]) == bytes(4900)
        buf.release()
    finally:
        storage.close()
        region.close()


def write_piece(dio: DiskIO, ih: bytes, src: Source, piece: int) -> None:
    for p, b, n in src.blocks():
        if p == piece:
            dio.write_block_direct(ih, p, b, src.read(p, b, n))


def test_torrents_sharing_a_file_never_write_a_page_back_over_each_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two torrents of the same files with other piece lengths (cross-seeding) write one
    file through a storage each. A piece of torrent X starts inside a page of the second
    file (the first one's length shifts it off the pages): X reads that page, to write
    it back whole with its own bytes in it, and is made to wait there while torrent Y
    writes its piece that holds the page whole. Were the two writes to interleave, X
    would write back the page as it had read it, and the bytes Y had just put there, of
    a piece Y verified, would be lost: writes into files torrents share go one at a time
    (each storage's page lock is its own)."""
    from pieced.storage.direct import DirectStorage

    content = make_payload(tmp_path / "src", {"a": 50_000, "b": 100_000}, seed=18)
    raw_x = make_torrent_lt(content, 16384, "v1")
    raw_y = make_torrent_lt(content, 32768, "v1")
    src_x, src_y = Source(raw_x, tmp_path / "src"), Source(raw_y, tmp_path / "src")
    second = src_x.meta.files[1]
    at = src_x.meta.files[0].length  # where the second file starts in the torrent
    px = at // 16384 + 1
    px += px % 2 == 0  # X's piece starts half-way into one of Y's
    py = px // 2
    inside = 16384 * px - at  # where X's piece starts in the second file
    assert inside % 4096 and inside < second.length, (at, px)
    save = tmp_path / "dl"
    dio = DiskIO("direct", cache_bytes=0, roots=[tmp_path])
    x_read, y_written = threading.Event(), threading.Event()
    read = DirectStorage._read_aligned

    def read_then_wait(self: DirectStorage, fd: int, out: memoryview, offset: int) -> int:
        n = read(self, fd, out, offset)
        if threading.current_thread().name == "x" and not x_read.is_set():
            x_read.set()
            y_written.wait(2.0)  # (until Y's piece is written, or Y cannot write)
        return n

    monkeypatch.setattr(DirectStorage, "_read_aligned", read_then_wait)
    try:
        ih_x = dio.register(raw_x, save)
        ih_y = dio.register(raw_y, save)
        errors: list[BaseException] = []

        def x() -> None:
            try:
                write_piece(dio, ih_x, src_x, px)
            except BaseException as exc:
                errors.append(exc)

        tx = threading.Thread(target=x, name="x")
        tx.start()
        assert x_read.wait(10), "X never read a page to write it back whole: no case"
        write_piece(dio, ih_y, src_y, py)
        y_written.set()
        tx.join(10)
        assert not errors, errors
        dio.flush_all()
        have_x, have_y = dio.status(ih_x)["have"], dio.status(ih_y)["have"]
        assert have_x[px >> 3] & 0x80 >> (px & 7) and have_y[py >> 3] & 0x80 >> (py & 7)
    finally:
        dio.close()
    name = "/".join(second.path)
    lo, hi = max(0, 32768 * py - at), min(second.length, 32768 * (py + 1) - at)  # Y's piece
    got = (save / name).read_bytes()[lo:hi]
    want = (content.parent / name).read_bytes()[lo:hi]
    lost = [lo + i for i in range(len(want)) if got[i] != want[i]]
    assert not lost, f"{len(lost)} bytes of {name} lost, from {lost[0]} (Y's piece: {lo}-{hi})"
