"""pieced-peer against a second BitTorrent implementation: Transmission (Debian's
transmission-cli, ``tests/trpeer.py``), seeding to pieced-peer and downloading from it,
over loopback. pieced-peer dials it (``--peer``). Transmission unchokes and says it is
interested at its 10-second rounds, so each transfer takes some 10-20 s whatever its size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pieced.protocol.client import Client

from tests.conftest import Daemon
from tests.realtools import make_payload, make_torrent_mktorrent, make_torrent_transmission
from tests.test_peer_libtorrent import Seeding, _same_tree, peer_cmd
from tests.trpeer import Transmission

FILES = {"a.bin": 3 * 262144 + 1234, "sub/b.bin": 262144, "sub/one": 1, "c.bin": 700000}


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
