"""The io_uring backend: the payload through a daemon on it, from three clients, blocks
shaped as peers send them, files that start mid-page; what it wrote is what libtorrent
finds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from pieced.storage.disk import DiskIO
from pieced.storage.uring import check_uring

from tests.realtools import make_payload, make_torrent_lt
from tests.test_direct import FILES, daemon_on
from tests.test_disk import Source


def test_io_uring_works_here() -> None:
    check_uring()  # the machines this runs on allow it: the tests below must not skip


def test_io_uring_works_where_its_package_cannot_be_written(tmp_path: Path) -> None:
    """The liburing package rewrote a cache in its own folder at every import, so a
    daemon that may not write there (a service user, a read-only /usr) could never use
    the backend ("io_uring is not available here (Permission denied ...)"). Its folder
    made read-only (a bind mount in a mount namespace of the test's own), the backend
    still starts and writes."""
    subprocess.run([sys.executable, "-c", "from pieced.storage.uring import liburing; "
                    "liburing()"], check=True)  # (the cache an install makes)
    folder = Path(importlib.util.find_spec("liburing").origin).parent  # type: ignore[union-attr, arg-type]
    script = ("from pieced.storage.disk import DiskIO; from pieced.storage.uring import "
              "check_uring; import sys; check_uring(); d = DiskIO('uring', roots=[sys.argv[1]]); "
              "d.close(); print('started')")
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$1" && '
         'mount -o remount,bind,ro "$1" && exec "$2" -c "$3" "$4"', "sh", str(folder),
         sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "started" in done.stdout, done.stderr


_FIRST_USE = """
import os, sys, threading
sys.setswitchinterval(1e-6)  # (a thread switch at every turn: the race, if there is one)
from pieced.storage.uring import _run, check_uring
check_uring()  # (as a daemon starts: a no-op through the package)
fd = os.open(sys.argv[1], os.O_RDWR)
start = threading.Barrier(4)
failed = []
def first_use(k):
    start.wait()
    try:
        if k % 2:
            buf = bytearray(5)
            assert _run([("readv", fd, [buf], 0)]) == [5]
        else:
            assert _run([("writev", fd, [b"x" * 5], 5 * k)]) == [5]
    except BaseException as exc:
        failed.append(repr(exc))
threads = [threading.Thread(target=first_use, args=(k,)) for k in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(failed)
"""


def test_threads_that_first_read_and_write_at_once_each_get_their_io_done(
        tmp_path: Path) -> None:
    """The liburing package loads each of its modules at the first use of one of its
    names, and two threads using a name of the same module first at once loaded it
    twice: the second was refused ("Module 'file' has already been imported.
    Re-initialisation is not supported"). A uring daemon's first recheck failed so, its
    two hashing threads reading together. In a fresh interpreter each time, four threads
    read and write first at once."""
    data = tmp_path / "data"
    data.write_bytes(b"y" * 64)
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _FIRST_USE, str(data)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_a_daemon_on_io_uring(tmp_path: Path, kind: str) -> None:
    daemon_on(tmp_path, "uring", kind, 32768, seed=23)


def test_reads_across_files_in_one_submission(tmp_path: Path) -> None:
    """A piece spanning five files is read with one submission and waited on once."""
    content = make_payload(tmp_path / "dl", FILES, seed=24)
    raw = make_torrent_lt(content, 512 * 1024, "v1")  # one piece holds every file
    src = Source(raw, tmp_path / "dl")
    dio = DiskIO("uring", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        assert dio.recheck(ih, full=True).ok
        assert dio.read_piece(ih, 0) == src.read(0, 0, src.layout.piece_size(0))
    finally:
        dio.close()


def test_rings_are_few_whatever_the_number_of_threads(tmp_path: Path) -> None:
    """Rings are shared by every thread, at most MAX_RINGS of them: short-lived threads
    (each used to leave its ring open for the life of the process) and forty-eight
    threads alive at once (each used to keep one for as long as it lived: the daemon's
    pools keep about seventy threads, so as many descriptors and queues) make no more."""
    import contextlib
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pieced.storage.uring import MAX_RINGS

    def rings() -> int:
        n = 0
        for x in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):
                n += os.readlink(f"/proc/self/fd/{x}") == "anon_inode:[io_uring]"
        return n

    content = make_payload(tmp_path / "src", 600_000, seed=25)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO("uring", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        before = rings()

        def work(p: int) -> bool:
            for q, b, n in src.blocks():
                if q == p:
                    dio.write_chunk(ih, q, b, src.read(q, b, n), flush=True)
            return dio.read_chunk(ih, p, 0, 100, volatile=True) == src.read(p, 0, 100)

        for p in range(4):  # each piece from a thread of its own, one after the other
            t = threading.Thread(target=work, args=(p,))
            t.start()
            t.join()
        with ThreadPoolExecutor(48) as pool:  # the rest from 48 threads at once
            assert all(pool.map(work, range(4, src.meta.num_pieces)))
            assert rings() - before <= MAX_RINGS, rings() - before
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    finally:
        dio.close()


def test_a_binding_that_dies_on_this_cpu_is_refused_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The liburing wheels of 2026 are built for AVX-512: on a CPU without it, making a
    ring killed the whole process with SIGILL (the test suite with it). The backend now
    makes a ring in a child first; a child killed so refuses the backend, with a message,
    and this process lives on. (The binding's death is played by a package on the
    child's path that kills itself with SIGILL, as the real one does on such CPUs.)"""
    import pieced.storage.uring as uring
    from pieced.storage.errors import StorageIOError

    fake = tmp_path / "liburing"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os, signal\n"
        "def io_uring():\n"
        "    os.kill(os.getpid(), signal.SIGILL)\n"
        "def __getattr__(name):\n"  # (the package's other names)
        "    return None\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(uring, "_probed", [])
    with pytest.raises(StorageIOError, match="SIGILL"):
        check_uring()
    monkeypatch.setattr(uring, "_probed", [])
    monkeypatch.delenv("PYTHONPATH")
    check_uring()  # the real binding, in a child and here


_WAITS_WITHOUT_THE_GIL = """
import os, threading, time
from pieced.storage import uring
rd, wr = os.pipe()
buf = bytearray(5)
got = []
waiting = threading.Thread(target=lambda: got.extend(uring._run([("readv", rd, [buf], 0)])))
waiting.start()
time.sleep(0.2)  # the ring is waiting for the read by now
os.write(wr, b"hello")  # (needs the GIL: a ring that holds it while it waits never sees it)
waiting.join()
assert got == [5] and bytes(buf) == b"hello", (got, buf)
print("ok")
"""


def test_a_ring_waits_without_holding_up_the_other_threads() -> None:
    """An operation that takes long to complete (here a read of a pipe; in the daemon a
    write held up by a disk whose journal waits for it) is waited for with the GIL let
    go. The package's waits held it: every thread of the daemon, the event loop
    answering every client and the watchdog's pings, stopped until the disk answered."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _WAITS_WITHOUT_THE_GIL],
                              capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the thread waiting on the ring held every other thread up")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


_EVERY_RING_HELD = """
import os, sys, threading, time
from pathlib import Path
from pieced.storage import uring
from pieced.storage.disk import DiskIO
raw = Path(sys.argv[1]).read_bytes()
src, save = Path(sys.argv[2]), Path(sys.argv[3])
dio = DiskIO("uring", cache_bytes=0, sync_window=0)  # (io_uring checked, the package
ih = dio.register(raw, save)                        # imported: not by eight threads at once)
pipes = [os.pipe() for _ in range(uring.MAX_RINGS)]
holders = [threading.Thread(target=uring._run, args=([("readv", rd, [bytearray(1)], 0)],))
           for rd, _ in pipes]
for h in holders:
    h.start()
while uring._rings.made < uring.MAX_RINGS or uring._rings._free:
    time.sleep(0.01)  # every ring taken, each waiting on its pipe (a disk that hangs)
time.sleep(0.2)
assert all(h.is_alive() for h in holders)
try:
    data = src.read_bytes()
    for b in range(0, len(data), 16384):
        dio.write_block_direct(ih, 0, b, data[b : b + 16384])
    dio.flush_all()
    assert dio.status(ih)["verified_pieces"] == 1
    assert dio.read_piece(ih, 0) == data
    dio.close()
    assert all(h.is_alive() for h in holders)  # (every ring was held all along)
    print("ok")
finally:
    for _, wr in pipes:
        os.write(wr, b"x")
    for h in holders:
        h.join()
"""


def test_io_goes_on_when_every_ring_waits_on_a_disk_that_hangs(tmp_path: Path) -> None:
    """Every shared ring held by a wait that does not end (here reads of pipes; in the
    daemon, reads of a disk that hangs, by eight clients): a write and a read of another
    torrent, on a healthy disk, waited for a ring. They go the plain way instead."""
    import subprocess
    import sys

    content = make_payload(tmp_path / "src", {"one.bin": 65536}, seed=25)
    raw = make_torrent_lt(content, 65536, "v1")
    (tmp_path / "t.torrent").write_bytes(raw)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _EVERY_RING_HELD, str(tmp_path / "t.torrent"),
             str(content / "one.bin"), str(tmp_path / "dl")],
            capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the write waited for a ring held by a wait that does not end")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
