"""The io_uring backend: the payload through a daemon on it, from three clients, blocks
shaped as peers send them, files that start mid-page; what it wrote is what libtorrent
finds."""

from __future__ import annotations

from pathlib import Path

import pytest
from pieced.protocol.client import Client
from pieced.storage.disk import DiskIO
from pieced.storage.uring import check_uring

from tests.conftest import Daemon
from tests.realtools import lt_recheck, make_payload, make_torrent_lt
from tests.test_daemon import write_from_three_clients
from tests.test_disk import Source

FILES = {"a.bin": 100_001, "b.bin": 3, "c/d.bin": 77_777, "e.bin": 250_000, "f.bin": 1}


def test_io_uring_works_here() -> None:
    check_uring()  # the machines this runs on allow it: the tests below must not skip


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_a_daemon_on_io_uring(tmp_path: Path, kind: str) -> None:
    content = make_payload(tmp_path / "src", FILES, seed=23)
    raw = make_torrent_lt(content, 32768, kind)
    src = Source(raw, tmp_path / "src")
    d = Daemon(tmp_path, env={"PIECED_BACKEND": "uring"})
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
        write_from_three_clients(d.socket, ih, src, src.peer_blocks(), 1024 * 1024)
        with Client(d.socket) as c:
            c.flush_all()
            st = c.status(ih)
            assert st["verified_pieces"] == src.meta.num_pieces and st["backend"] == "uring"
            for p in range(src.meta.num_pieces):  # read back through io_uring
                size = src.layout.piece_size(p)
                assert c.read_chunk(ih, p, 0, min(size, 16384), volatile=True) == \
                    src.read(p, 0, min(size, 16384))
            assert c.recheck(ih, full=True)["verified"] == src.meta.num_pieces
    finally:
        assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, tmp_path / "dl"))


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
