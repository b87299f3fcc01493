"""The mmap backend survives other processes: a payload file truncated, rewritten or
just read by another program while the daemon has it mapped never kills the daemon
(a fault past the end of a mapped file is SIGBUS, which Python cannot recover from)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pieced.protocol.client import Client
from pieced.storage.disk import DiskIO
from pieced.storage.errors import PiecedError

from tests.conftest import Daemon
from tests.realtools import make_payload, make_torrent_lt
from tests.test_disk import Source

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


def test_a_reader_takes_the_map_away_and_it_comes_back(tmp_path: Path, torrent) -> None:  # type: ignore[no-untyped-def]
    raw, src = torrent
    dio = DiskIO("mmap", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        for p, b, n in src.blocks():
            dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        big = tmp_path / "dl" / "payload" / "big.bin"
        assert _mapped(big)
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


def test_truncated_while_mapped_the_daemon_lives_on(tmp_path: Path, torrent) -> None:  # type: ignore[no-untyped-def]
    """Readers hammer a mapped file in the daemon while another process truncates it:
    the daemon keeps serving, the lost pieces are reported lost, and another torrent is
    written and verified meanwhile."""
    raw, src = torrent
    other = make_payload(tmp_path / "src2", {"o.bin": 600_000}, seed=5)
    raw2 = make_torrent_lt(other, 65536, "v1")
    src2 = Source(raw2, tmp_path / "src2")
    d = Daemon(tmp_path, env={"PIECED_BACKEND": "mmap", "PIECED_CACHE_BYTES": "0"})
    try:
        with Client(str(d.socket)) as c:
            ih = c.register(raw, save_path=str(tmp_path / "dl"))
            for p, b, n in src.blocks():
                c.write_chunk(ih, p, b, src.read(p, b, n))
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == src.meta.num_pieces
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
