"""Disk full on a real (tiny tmpfs) filesystem: the client gets ENOSPC, /metrics counts
it, other torrents keep working, and no piece is recorded verified that is not on disk."""

from __future__ import annotations

import errno
import subprocess
import urllib.request
from pathlib import Path

import pytest
from pieced.protocol.client import Client
from pieced.storage.errors import StorageIOError
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon
from tests.realtools import make_payload, make_torrent_lt
from tests.test_disk import Source


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    # The tests run as root here (CI and make test); mounting is part of the test.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full(tmp_path: Path, tiny_fs: Path) -> None:
    big = make_payload(tmp_path / "src_big", 600_000, seed=1)
    small = make_payload(tmp_path / "src_small", 100_000, seed=2)
    raw_big = make_torrent_lt(big, 65536, "v1")
    raw_small = make_torrent_lt(small, 16384, "v1")
    sb, ss = Source(raw_big, tmp_path / "src_big"), Source(raw_small, tmp_path / "src_small")
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih_big = c.register(raw_big, tiny_fs)
            ih_small = c.register(raw_small, tmp_path / "dl")
            with pytest.raises(StorageIOError) as exc:
                for p, b, n in sb.blocks():
                    c.write_block_direct(ih_big, p, b, sb.read(p, b, n))
                c.wait_writes()
            assert exc.value.errno == errno.ENOSPC
            # the other torrent is unaffected
            for p, b, n in ss.blocks():
                c.write_chunk(ih_small, p, b, ss.read(p, b, n))
            c.wait_writes()
            c.flush_all()
            assert c.status(ih_small)["verified_pieces"] == ss.meta.num_pieces
            st = c.status(ih_big)
            assert any(e["errno"] == errno.ENOSPC for e in st["errors"])
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
