"""pieced-peer against a second BitTorrent implementation: Transmission (Debian's
transmission-cli), seeding to pieced-peer and downloading from it, over loopback.

transmission-cli has no way to be given a peer: pieced-peer dials it (``--peer``), with
Transmission's uTP, DHT, local peer discovery and encryption off (its uTP-only dialling is
said in the README). Transmission unchokes and says it is interested at its 10-second
rounds, so each transfer takes some 10-20 s whatever its size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from pieced.protocol.client import Client

from tests.conftest import Daemon
from tests.realtools import make_payload, make_torrent_mktorrent, make_torrent_transmission
from tests.test_peer_libtorrent import Seeding, _same_tree, peer_cmd

SETTINGS = {
    "dht-enabled": False, "lpd-enabled": False, "utp-enabled": False, "pex-enabled": False,
    "port-forwarding-enabled": False, "encryption": 0, "message-level": 2,
    "speed-limit-down-enabled": False, "speed-limit-up-enabled": False,
    "rename-partial-files": False, "rpc-enabled": False, "ratio-limit-enabled": False,
    "idle-seeding-limit-enabled": False, "start-added-torrents": True,
}
FILES = {"a.bin": 3 * 262144 + 1234, "sub/b.bin": 262144, "sub/one": 1, "c.bin": 700000}


class Transmission:
    """transmission-cli on one torrent, its configuration and home under ``root``."""

    def __init__(self, root: Path, torrent: Path, download: Path) -> None:
        cfg = root / "tr-cfg"
        cfg.mkdir(parents=True)
        with socket.socket() as s:  # a free port, for its listening socket
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (cfg / "settings.json").write_text(json.dumps({**SETTINGS, "peer-port": self.port}))
        download.mkdir(parents=True, exist_ok=True)
        self.log = root / "tr.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                ["transmission-cli", "-g", str(cfg), "-w", str(download), "-p", str(self.port),
                 str(torrent)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(root)})
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "transmission-cli does not listen"
                time.sleep(0.1)

    def wait_seeding(self, timeout: float) -> None:
        """Until it says it seeds: it has every piece, checked."""
        deadline = time.monotonic() + timeout
        while not re.search(r"\bSeeding\b", self.log.read_text(errors="replace")):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _torrent(tmp_path: Path, maker: str) -> tuple[Path, Path]:
    """The payload in ``tmp_path/seed`` and its .torrent, made by ``maker``."""
    content = make_payload(tmp_path / "seed", FILES, seed=40)
    make = make_torrent_transmission if maker == "transmission-create" else make_torrent_mktorrent
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(make(content, 65536))
    return content, torrent


def test_pieced_peer_downloads_from_transmission(tmp_path: Path) -> None:
    _content, torrent = _torrent(tmp_path, "transmission-create")
    shutil.copytree(tmp_path / "seed", tmp_path / "tr")
    tr = Transmission(tmp_path, torrent, tmp_path / "tr")
    d = Daemon(tmp_path)
    try:
        tr.wait_seeding(60)  # its check of what it has
        r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket,
                                    "--peer", f"127.0.0.1:{tr.port}"),
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        summary: dict[str, Any] = json.loads(r.stdout)
        assert summary["complete"] and summary["pieces_failed"] == 0, summary
        with Client(d.socket) as c:
            (t,) = c.torrents()
            st = c.status(bytes.fromhex(t["info_hash"]), files=False)
            assert st["verified_pieces"] == st["num_pieces"]
        _same_tree(tmp_path / "seed" / "payload", tmp_path / "dl" / "payload", FILES)
    finally:
        tr.close()
        assert d.stop() == 0, d.stderr()


def test_transmission_downloads_from_a_seeding_pieced_peer(tmp_path: Path) -> None:
    _content, torrent = _torrent(tmp_path, "mktorrent")
    d = Daemon(tmp_path)
    tr = Transmission(tmp_path, torrent, tmp_path / "tr")
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d, "--peer", f"127.0.0.1:{tr.port}")
        tr.wait_seeding(120)
        summary = seeding.stop()
        assert summary["bytes_up"] >= sum(FILES.values()), summary
        _same_tree(tmp_path / "seed" / "payload", tmp_path / "tr" / "payload", FILES)
    finally:
        tr.close()
        assert d.stop() == 0, d.stderr()
