"""pieced-peer against libtorrent 2.1 on loopback, both directions: a libtorrent seeder
-> pieced-peer -> pieced, and pieced -> pieced-peer --seed -> a libtorrent leecher, for
v1, v1 with pads, v2-only and hybrid torrents made by libtorrent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pieced.protocol.client import Client

from tests.conftest import Daemon
from tests.ltpeer import LtPeer, make_torrent_v1_pads
from tests.realtools import make_payload, make_torrent_lt


def _files(piece: int) -> dict[str, int]:
    """0 bytes, 1 byte, exactly a piece, a piece plus one, and a few pieces and a bit."""
    return {"a.bin": 3 * piece + 1000, "empty": 0, "one": 1, "sub/exact": piece,
            "sub/deeper/plus1": piece + 1}


def _torrent(kind: str, content: Path, piece: int) -> bytes:
    if kind == "v1-pads":
        return make_torrent_v1_pads(content, piece)
    return make_torrent_lt(content, piece, kind)


def _same_tree(a: Path, b: Path, files: dict[str, int]) -> None:
    for rel, size in files.items():
        got = (b / rel).read_bytes()
        assert len(got) == size, rel
        assert got == (a / rel).read_bytes(), rel


def peer_cmd(torrent: Path, save: Path, socket: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pieced.peer.plugin", str(torrent), "--save-path", str(save),
            "--socket", str(socket), "--json", *extra]


def download(torrent: Path, save: Path, d: Daemon, *peers: int, timeout: float = 120,
             extra: tuple[str, ...] = ()) -> dict[str, Any]:
    args = [a for p in peers for a in ("--peer", f"127.0.0.1:{p}")]
    r = subprocess.run(peer_cmd(torrent, save, d.socket, *args, *extra), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    summary: dict[str, Any] = json.loads(r.stdout)
    assert summary["complete"]
    return summary


class Seeding:
    """``pieced-peer --seed --listen 127.0.0.1:0`` in the background."""

    def __init__(self, torrent: Path, save: Path, d: Daemon, *extra: str) -> None:
        self.proc = subprocess.Popen(
            peer_cmd(torrent, save, d.socket, "--listen", "127.0.0.1:0", "--seed", *extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "listening on" in line, line + self.proc.stderr.read()
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        summary: dict[str, Any] = json.loads(out)
        return summary


@pytest.mark.parametrize("kind,piece", [
    ("v1", 16384), ("v1-pads", 65536), ("v2", 262144), ("hybrid", 4 * 1024 * 1024),
])
def test_download_from_libtorrent_then_seed_to_libtorrent(tmp_path: Path, kind: str,
                                                          piece: int) -> None:
    files = _files(piece)
    content = make_payload(tmp_path / "seed", files, seed=11)
    raw = _torrent(kind, content, piece)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            down = download(torrent, tmp_path / "dl", d, seeder.port)
        with Client(d.socket) as c:
            st = c.status(c.torrents()[0]["info_hash"])
            assert st["verified_pieces"] == st["num_pieces"]
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert down["bytes_down"] >= sum(files.values()) and down["pieces_failed"] == 0

        seeding = Seeding(torrent, tmp_path / "dl", d)
        with LtPeer(raw, tmp_path / "leech", seed=False, log_peer=True) as leecher:
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
            assert leecher.suggests_received() >= 1, leecher.peer_log()[-30:]
        up = seeding.stop()
        _same_tree(content, tmp_path / "leech" / "payload", files)
        assert up["bytes_up"] >= sum(files.values()) and up["suggests_sent"] >= 1
    finally:
        assert d.stop() == 0, d.stderr()
