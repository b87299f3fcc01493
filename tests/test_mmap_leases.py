"""The mmap backend survives other processes: a payload file truncated, rewritten or
just read by another program while the daemon has it mapped never kills the daemon
(a fault past the end of a mapped file is SIGBUS, which Python cannot recover from)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pieced.protocol.client import Client
from pieced.storage.disk import DiskIO
from pieced.storage.errors import PiecedError
from pieced.storage.mapped import MmapStorage

from tests.conftest import Daemon, FreezableFs
from tests.realtools import make_payload, make_torrent_lt
from tests.test_disk import Source, fill, long_and_short

FILES = {"big.bin": 3 * 1024 * 1024 + 7, "small.bin": 300_000}


def _mapped(path: Path) -> bool:
    """Whether this process maps ``path`` now (the kernel's own list of mappings)."""
    return str(path) in Path("/proc/self/maps").read_text()


def _other_process(code: str, path: Path) -> float:
    """Run ``code`` on ``path`` in another process; the seconds it took. The kernel
    makes it wait up to lease-break-time (45 s) for a lease the daemon keeps."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", f"import os; p = {str(path)!r}; {code}"],
                   check=True, timeout=40)
    return time.monotonic() - start


@pytest.fixture
def torrent(tmp_path: Path) -> tuple[bytes, Source]:
    content = make_payload(tmp_path / "src", FILES, seed=3)
    raw = make_torrent_lt(content, 256 * 1024, "v1")
    return raw, Source(raw, tmp_path / "src")


def _written(dio: DiskIO, raw: bytes, src: Source, tmp_path: Path) -> tuple[bytes, Path]:
    """Register in ``tmp_path/dl``, write every block in order and flush: (the info hash,
    the big file, which the daemon has mapped)."""
    ih = dio.register(raw, tmp_path / "dl")
    fill(dio, ih, src, seed=None, direct_every=0)
    dio.flush_all()
    big = tmp_path / "dl" / "payload" / "big.bin"
    assert _mapped(big)
    return ih, big


def _daemon_with(tmp_path: Path, raw: bytes, src: Source) -> tuple[Daemon, bytes]:
    """A daemon on mmap (no cache) that has the torrent, every piece written and
    verified in ``tmp_path/dl``: (the daemon, the info hash)."""
    d = Daemon(tmp_path, env={"PIECED_BACKEND": "mmap", "PIECED_CACHE_BYTES": "0"})
    try:
        with Client(str(d.socket)) as c:
            ih = c.register(raw, save_path=str(tmp_path / "dl"))
            for p, b, n in src.blocks():
                c.write_chunk(ih, p, b, src.read(p, b, n))
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == src.meta.num_pieces
    except BaseException:
        d.stop()
        raise
    return d, ih


def test_a_reader_takes_the_map_away_and_it_comes_back(tmp_path: Path, torrent) -> None:  # type: ignore[no-untyped-def]
    raw, src = torrent
    dio = DiskIO("mmap", cache_bytes=0, roots=[tmp_path])
    try:
        ih, big = _written(dio, raw, src, tmp_path)
        # another program reads the file: it is unmapped for it, and the data is whole
        seen = subprocess.run(["sha1sum", str(big)], capture_output=True, text=True,
                              check=True, timeout=40).stdout.split()[0]
        assert seen == hashlib.sha1((tmp_path / "src" / "payload" / "big.bin").read_bytes()).hexdigest()
        assert not _mapped(big)
        # read through pread meanwhile, and mapped again once no one else has it open
        last = src.meta.num_pieces - 1  # in big.bin (libtorrent lists the small file first)
        assert src.meta.files[-1].path[-1] == "big.bin"
        assert dio.read_chunk(ih, last, 0, 16384, volatile=True) == src.read(last, 0, 16384)
        time.sleep(dio._torrents[ih].storage.RETRY_SECONDS + 0.1)
        assert dio.read_chunk(ih, last - 1, 0, 16384, volatile=True) == src.read(last - 1, 0, 16384)
        assert _mapped(big)
        assert dio.recheck(ih, full=True).failed_v1 == []
        # a truncate from another process completes only once the file is unmapped:
        # no access can fault past its new end
        took = _other_process("os.truncate(p, 1000)", big)
        print(f"a truncate of a mapped file took {took * 1000:.0f} ms (interpreter start included)")
        assert not _mapped(big) and took < 20
        with pytest.raises(PiecedError):
            dio.read_chunk(ih, last, 0, 16384, volatile=True)
    finally:
        dio.close()


def test_a_lease_taken_on_a_thread_that_ended_is_given_up_at_once(tmp_path: Path, torrent) -> None:  # type: ignore[no-untyped-def]
    """The file is mapped, and its lease taken, on a thread that then ends (as the
    daemon's re-verification after a restart, or a check of a shared file, map on
    threads of their own). The kernel sends the signal of a lease break to the thread
    that took the lease: to no one, once it had ended, so another program's open of
    the file waited out lease-break-time (45 s), for each file, and the daemon kept
    its map of a file the kernel had taken the lease of. The lease now signals the
    process."""
    raw, src = torrent
    dio = DiskIO("mmap", cache_bytes=0, roots=[tmp_path])
    try:
        done: list[tuple[bytes, Path]] = []
        writer = threading.Thread(target=lambda: done.append(_written(dio, raw, src, tmp_path)))
        writer.start()
        writer.join(60)
        (ih, big), = done
        took = _other_process("os.close(os.open(p, os.O_RDONLY))", big)
        print(f"an open of a file mapped by a thread that ended took {took * 1000:.0f} ms")
        assert took < 20 and not _mapped(big)
        last = src.meta.num_pieces - 1
        assert dio.read_chunk(ih, last, 0, 16384, volatile=True) == src.read(last, 0, 16384)
    finally:
        dio.close()


def test_truncated_while_mapped_the_daemon_lives_on(tmp_path: Path, torrent) -> None:  # type: ignore[no-untyped-def]
    """Readers hammer a mapped file in the daemon while another process truncates it:
    the daemon keeps serving, the lost pieces are reported lost, and another torrent is
    written and verified meanwhile."""
    raw, src = torrent
    other = make_payload(tmp_path / "src2", {"o.bin": 600_000}, seed=5)
    raw2 = make_torrent_lt(other, 65536, "v1")
    src2 = Source(raw2, tmp_path / "src2")
    d, ih = _daemon_with(tmp_path, raw, src)
    try:
        big = tmp_path / "dl" / "payload" / "big.bin"
        index = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "big.bin")
        big_pieces = list(src.layout.file_pieces(index))
        stop = threading.Event()
        errors: list[PiecedError] = []
        reads = [0]

        def reader() -> None:
            with Client(str(d.socket)) as rc:
                while not stop.is_set():
                    for p in big_pieces:
                        try:
                            rc.read_piece(ih, p)
                            reads[0] += 1
                        except PiecedError as exc:
                            errors.append(exc)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        # cut and regrown for a second, then cut for good: each cut meets readers mid-copy
        took = _other_process(
            "import time; n = os.stat(p).st_size; end = time.monotonic() + 1\n"
            "while time.monotonic() < end: os.truncate(p, 1000); os.truncate(p, n)\n"
            "os.truncate(p, 1000)", big)
        time.sleep(0.5)
        with Client(str(d.socket)) as c:
            ih2 = c.register(raw2, save_path=str(tmp_path / "dl2"))
            for p, b, n in src2.blocks():
                c.write_chunk(ih2, p, b, src2.read(p, b, n))
            c.flush_all()
            assert c.status(ih2)["verified_pieces"] == src2.meta.num_pieces
        stop.set()
        for t in threads:
            t.join(30)
        assert d.proc.poll() is None, d.stderr()
        assert took < 20, f"the truncates waited {took:.1f} s: the lease was not given back"
        assert reads[0] > 0
        assert big.stat().st_size == 1000
        with Client(str(d.socket)) as c:
            c.recheck(ih)
            st = c.status(ih)
            have = st["verified_pieces"]
            assert have <= src.meta.num_pieces - len(big_pieces) + 1  # only the first may survive
            assert c.stats()  # still answering
    finally:
        rc = d.stop()
    assert rc == 0


def _payload_fds(folder: Path) -> int:
    """Descriptors of this process open on files below ``folder`` (not on folders: a
    torrent holds its save path open)."""
    import contextlib
    import os

    n = 0
    for x in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/self/fd/{x}")
            n += link.startswith(str(folder)) and os.path.isfile(link)
    return n


def _mapped_below(folder: Path) -> int:
    """Files below ``folder`` this process maps now."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return len({line.split()[-1] for line in lines if str(folder) in line})


def test_mapped_files_count_against_max_open_files(tmp_path: Path) -> None:
    """Forty files on a pool of eight descriptors: a map holds its file open (the leased
    descriptor and mmap's own), and those count against the bound with the pool's own,
    so at most four files are mapped at a time and the payload descriptors stay within
    eight whatever the number of files (the ``open_files`` figure says how many), and
    every piece still verifies and reads back. Before, every file written stayed
    mapped (a large torrent ran the process out of descriptors, EMFILE), then maps
    were bounded apart from the pool: three descriptors a file, past the bound the
    daemon's descriptor budget was made with."""
    content = make_payload(tmp_path / "src", {f"f{k:02d}.bin": 20_000 + k for k in range(40)},
                           seed=8)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    dl = tmp_path / "dl"
    dio = DiskIO("mmap", cache_bytes=0, max_open_files=8)
    try:
        ih = dio.register(raw, dl)
        most_mapped = most_fds = 0
        for i, (p, b, n) in enumerate(src.blocks()):
            dio.write_chunk(ih, p, b, src.read(p, b, n))
            if i % 4 == 0:
                most_mapped = max(most_mapped, _mapped_below(dl))
                most_fds = max(most_fds, _payload_fds(dl))
                assert dio.stats()["open_files"] == _payload_fds(dl)
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        for p in range(src.meta.num_pieces):
            size = src.layout.piece_size(p)
            assert dio.read_chunk(ih, p, 0, size, volatile=True) == src.read(p, 0, size)
            most_mapped = max(most_mapped, _mapped_below(dl))
            most_fds = max(most_fds, _payload_fds(dl))
        assert 0 < most_mapped <= 4, most_mapped
        assert most_fds <= 8, most_fds
    finally:
        dio.close()


def test_a_file_deleted_while_unmapped_is_not_made_again_by_a_read(
    tmp_path: Path, torrent, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """Another program reads a payload file (its map goes, for the reader), then the
    file is deleted: the next read reports it gone (ENOENT) and its pieces are verified
    no more, as on posix. Before, the read mapped the file again by opening it with
    O_CREAT: it made an empty file in its place, refused that one as another file put
    there, and the pieces of the deleted file stayed verified."""
    import errno

    from pieced.storage.mapped import MmapStorage

    monkeypatch.setattr(MmapStorage, "RETRY_SECONDS", 0.0)  # mapped again at the next use
    raw, src = torrent
    dio = DiskIO("mmap", cache_bytes=0, roots=[tmp_path])
    try:
        ih, big = _written(dio, raw, src, tmp_path)
        index = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "big.bin")
        lost = set(src.layout.file_pieces(index))
        subprocess.run(["cat", str(big)], stdout=subprocess.DEVNULL, check=True, timeout=40)
        assert not _mapped(big)
        big.unlink()
        with pytest.raises(PiecedError) as exc:
            dio.read_chunk(ih, max(lost), 0, 16384, volatile=True)
        assert exc.value.errno == errno.ENOENT, exc.value
        assert not big.exists(), f"a read made the deleted file again ({exc.value!r})"
        have = dio.status(ih)["have"]
        assert not any(have[p >> 3] & (0x80 >> (p & 7)) for p in lost)
    finally:
        dio.close()


def test_rechecks_while_another_process_cuts_the_file_the_daemon_lives_on(
    tmp_path: Path, torrent  # type: ignore[no-untyped-def]
) -> None:
    """Full rechecks back to back (reading through the maps) while another process cuts
    the file short and grows it again: the daemon lives on, and the pieces of the file
    cut for good are failed by the last recheck."""
    raw, src = torrent
    d, ih = _daemon_with(tmp_path, raw, src)
    try:
        big = tmp_path / "dl" / "payload" / "big.bin"
        index = next(i for i, f in enumerate(src.meta.files) if f.path[-1] == "big.bin")
        stop = threading.Event()
        checks = [0]

        def rechecker() -> None:
            with Client(str(d.socket)) as rc:
                while not stop.is_set():
                    rc.recheck(ih, full=True)
                    checks[0] += 1

        threads = [threading.Thread(target=rechecker) for _ in range(2)]
        for th in threads:
            th.start()
        time.sleep(0.3)
        took = _other_process(
            "import time; n = os.stat(p).st_size; end = time.monotonic() + 2\n"
            "while time.monotonic() < end: os.truncate(p, 1000); time.sleep(0.01); "
            "os.truncate(p, n); time.sleep(0.02)\n"
            "os.truncate(p, 1000)", big)
        stop.set()
        for th in threads:
            th.join(60)
        assert d.proc.poll() is None, d.stderr()
        assert took < 30, f"the truncates waited {took:.1f} s: a lease was not given back"
        assert checks[0] > 2
        with Client(str(d.socket)) as c:
            c.recheck(ih, full=True)
            have = c.status(ih)["have"]
        lost = list(src.layout.file_pieces(index))[1:]  # the first may lie in its first 1000 bytes
        assert not any(have[p >> 3] & (0x80 >> (p & 7)) for p in lost)
    finally:
        rc = d.stop()
    assert rc == 0


def test_a_recheck_does_not_break_its_own_leases(tmp_path: Path) -> None:
    """A recheck asks for the pieces it hashes next while its hashing threads map the
    files: the asking must go through the maps (made first), not through a descriptor
    opened beside them, whose open breaks the lease the hashing thread just took, and
    the file is unmapped for the rest of the recheck (before: in 4 rounds of 8)."""
    content = make_payload(tmp_path / "src", {"a.bin": 24 << 20, "b.bin": 12 << 20}, seed=4)
    raw = make_torrent_lt(content, 1 << 20, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO("mmap", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill(dio, ih, src, seed=None, direct_every=0)
        dio.flush_all()
        storage = dio._torrents[ih].storage
        files = [tmp_path / "dl" / "payload" / name for name in ("a.bin", "b.bin")]
        for _ in range(8):
            for index in range(len(src.meta.files)):
                storage.unmap(index)
            assert dio.recheck(ih, full=True).ok
            assert all(_mapped(f) for f in files), [_mapped(f) for f in files]
    finally:
        dio.close()


def test_an_open_on_the_main_thread_that_breaks_our_own_lease_does_not_wait_it_out(
        tmp_path: Path) -> None:
    """The engine used in-process, from the main thread: a second torrent naming a file
    the first one maps reads it (cross-seeding), and that open breaks our own lease. The
    SIGIO handler that gives it back is Python's, run on the main thread between two
    bytecodes: the main thread went into the waiting open first and waited out the
    kernel's lease-break-time (45 s) for a lease of its own process. The open gives back
    our own leases it breaks before it waits."""
    assert threading.current_thread() is threading.main_thread()
    lease_break = int(Path("/proc/sys/fs/lease-break-time").read_text())
    assert lease_break >= 10, "a lease-break-time this short would hide the wait"
    data, raw_long, raw_short, src_long, _ = long_and_short(tmp_path, seed=16)
    dio = DiskIO("mmap", cache_bytes=0, roots=[tmp_path])
    try:
        ih_long = dio.register(raw_long, tmp_path / "dl")
        fill(dio, ih_long, src_long, seed=None, direct_every=0)
        dio.flush_all()
        assert _mapped(tmp_path / "dl" / "x.bin")
        ih_short = dio.register(raw_short, tmp_path / "dl")
        start = time.monotonic()
        dio.write_chunk(ih_short, 0, 0, data[:16384])  # (reads the file: same bytes?)
        took = time.monotonic() - start
        assert took < lease_break / 3, f"{took:.1f} s: the open waited out the lease break"
        dio.flush_all()
        assert dio.status(ih_short)["verified_pieces"] == 1
    finally:
        dio.close()


_STORE_WAITS = """
import sys, threading, time
from pathlib import Path
from pieced.storage.disk import DiskIO
raw, data = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes()
dio = DiskIO("mmap", cache_bytes=0, preallocate=True, roots=[Path(sys.argv[3]).parent])
ih = dio.register(raw, Path(sys.argv[3]))
dio.write_chunk(ih, 0, 0, data[:16384], flush=True)  # mapped, preallocated
print("ready", flush=True)
sys.stdin.readline()  # (frozen now)
writer = threading.Thread(target=dio.write_chunk, args=(ih, 2, 0, data[2 * 65536 :][:16384]))
writer.start()
time.sleep(0.5)
start = time.monotonic()
n = sum(1 for _ in range(100_000))  # Python code of another thread
print("ran", round(time.monotonic() - start, 2), writer.is_alive(), flush=True)
writer.join()
dio.close()
"""


def test_a_store_waiting_on_a_frozen_disk_lets_the_other_threads_run(
        tmp_path: Path, freezable_fs: FreezableFs) -> None:
    """A block stored into the map of a file on a frozen file system (as on a disk that
    hangs) waits in the page fault that makes its pages writable. That wait held the
    interpreter's lock (``mmap.madvise`` keeps it): every other thread of the process
    stood still until the thaw. It is made with the lock let go. (A thread that maps or
    unmaps memory still waits: the kernel holds the process's memory map lock over the
    fault; see the README.)"""
    content = make_payload(tmp_path / "src", {"one.bin": 4 * 65536}, seed=28)
    (tmp_path / "t.torrent").write_bytes(make_torrent_lt(content, 65536, "v1"))
    child = subprocess.Popen(
        [sys.executable, "-c", _STORE_WAITS, str(tmp_path / "t.torrent"),
         str(content / "one.bin"), str(freezable_fs.mount / "dl")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        freezable_fs.freeze()
        child.stdin.write("go\n")
        child.stdin.flush()
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(child.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=15)
        freezable_fs.thaw()
        assert got, "the other thread stood still while the store waited for the thaw"
        waiting = got[0].split()[-1]
        assert waiting == "True", "the store waits for the thaw"
        assert child.wait(timeout=30) == 0
    finally:
        freezable_fs.thaw()
        child.kill()


def _read_syscall_bytes() -> int:
    """Bytes this process has read with read/pread so far (not through maps)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _rss_file_kib() -> int:
    """The file pages this process has mapped in (RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_a_recheck_by_fingerprint_hashes_the_mapped_pages_where_they_lie(tmp_path: Path) -> None:
    """On mmap a recheck by fingerprint hashes the files' pages in their maps, without a
    copy of them out of the page cache (no byte read by pread), and gives the pages back
    after (the daemon's memory does not keep them); pieces whose bytes changed behind
    its back still fail, and a full recheck finds the same."""
    mib = 1 << 20
    content = make_payload(tmp_path / "src", {"a.bin": 40 * mib + 5, "b.bin": 24 * mib}, seed=9)
    raw = make_torrent_lt(content, mib, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO("mmap", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        fill(dio, ih, src, seed=None, direct_every=0)
        dio.flush_all()
        n = src.meta.num_pieces
        assert dio.recheck(ih, full=True).ok
        rss = _rss_file_kib()
        before = _read_syscall_bytes()
        r = dio.recheck(ih)
        read = _read_syscall_bytes() - before
        assert r.ok and r.fingerprint_hits == n
        assert read < mib, f"{read} bytes read with pread by a recheck of {n} MiB"
        assert _rss_file_kib() < rss + 8 * 1024, (rss, _rss_file_kib())
        # Bytes changed by another program (its open breaks the lease; the file is
        # read then, or mapped again): those pieces fail, by fingerprint as in full.
        a = tmp_path / "dl" / "payload" / "a.bin"
        _other_process("f = os.open(p, os.O_WRONLY); os.pwrite(f, b'x' * 10, 3 * 1048576 + 7); "
                       "os.pwrite(f, b'y', 40 * 1048576); os.close(f)", a)
        time.sleep(0.1)
        assert dio.recheck(ih).failed_v1 == [3, 40]
        assert dio.recheck(ih, full=True).failed_v1 == [3, 40]
        for _ in range(3):  # pages back where they are mapped: hashed in place again
            for p in (3, 40):
                s = src.meta.piece_size(p)
                dio.write_chunk(ih, p, 0, src.read(p, 0, s))
            dio.flush_all()
            before = _read_syscall_bytes()
            r = dio.recheck(ih)
            assert r.ok, r.failed_v1
            if _read_syscall_bytes() - before < mib:
                break
        else:
            raise AssertionError("the files were never mapped again after the lease break")
    finally:
        dio.close()


def _payload_fd_modes(folder: Path) -> dict[str, int]:
    """This process's descriptors of files under ``folder``: path -> access mode."""
    out = {}
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(folder) + "/"):
            flags = next(int(line.split()[1], 8) for line in
                         (Path("/proc/self/fdinfo") / fd.name).read_text().splitlines()
                         if line.startswith("flags:"))
            out[target] = flags & os.O_ACCMODE
    return out


def test_files_it_did_not_write_are_mapped_read_only(tmp_path: Path) -> None:
    """Data found on disk (not written by the daemon) is hashed in place by a recheck,
    through maps of descriptors opened read-only: a read-write open of someone else's
    library is a close-write event for every watcher, and a copy-up on an overlay. A
    piece written later maps its file again, for writing."""
    mib = 1 << 20
    content = make_payload(tmp_path / "src", {"a.bin": 12 * mib + 5, "b.bin": 6 * mib}, seed=11)
    raw = make_torrent_lt(content, mib, "v1")
    src = Source(raw, tmp_path / "src")
    dl = tmp_path / "dl"
    shutil.copytree(tmp_path / "src", dl)
    dio = DiskIO("mmap", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, dl)
        assert dio.recheck(ih, full=True).ok  # found whole: mapped from now on
        before = _read_syscall_bytes()
        assert dio.recheck(ih).fingerprint_hits == src.meta.num_pieces
        assert _read_syscall_bytes() - before < mib  # in place
        fds = _payload_fd_modes(dl)
        assert any(_mapped(dl / "payload" / name) for name in ("a.bin", "b.bin"))
        assert fds and all(mode == os.O_RDONLY for mode in fds.values()), fds
        # A piece written again (the bytes on disk went bad): written, and verified.
        a = dl / "payload" / "a.bin"
        _other_process("f = os.open(p, os.O_WRONLY); os.pwrite(f, b'z', 5); os.close(f)", a)
        assert dio.recheck(ih).failed_v1 == [0]
        dio.write_chunk(ih, 0, 0, src.read(0, 0, mib))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert a.read_bytes()[:mib] == src.read(0, 0, mib)
        assert dio.recheck(ih, full=True).ok
    finally:
        dio.close()


def test_pieced_verify_reads_files_a_daemon_has_mapped(tmp_path: Path, torrent) -> None:  # type: ignore[no-untyped-def]
    """`pieced verify` opens each file without waiting (a FIFO in a file's place must not
    hang it). A file an mmap daemon has mapped is leased, and such an open of it answers
    EAGAIN until the daemon lets go, in milliseconds: the command said "cannot read"
    (exit 2) of every file the daemon held. It now waits for the lease as any open does:
    every piece verifies, and the daemon maps the files again once the command is gone."""
    raw, src = torrent
    d, ih = _daemon_with(tmp_path, raw, src)
    try:
        tfile = tmp_path / "t.torrent"
        tfile.write_bytes(raw)
        with Client(str(d.socket)) as c:
            for _ in range(2):
                assert c.recheck(ih, full=True)["verified"] == src.meta.num_pieces
                assert _mapped_by(d.proc.pid, tmp_path / "dl" / "payload" / "big.bin")
                r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "verify",
                                    str(tfile), "--data", str(tmp_path / "dl"), "--json"],
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stderr
                assert json.loads(r.stdout)["failed_v1"] == []
                time.sleep(MmapStorage.RETRY_SECONDS + 0.2)  # (then mapped again at next use)
    finally:
        d.stop()


def _mapped_by(pid: int, path: Path) -> bool:
    return str(path) in Path(f"/proc/{pid}/maps").read_text()
