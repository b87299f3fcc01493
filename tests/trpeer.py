"""Transmission as a peer, for tests and benchmarks: one ``transmission-cli`` process on
one torrent, with its configuration, home and log in a folder of its own.

transmission-cli has no way to be given a peer: the other side dials it. uTP, DHT, local
peer discovery, PEX and encryption are off (pieced-peer speaks plain TCP; Transmission
dials a peer a tracker names over uTP only while uTP is on). It unchokes and says it is
interested at its 10-second rounds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

SETTINGS = {
    "dht-enabled": False, "lpd-enabled": False, "utp-enabled": False, "pex-enabled": False,
    "port-forwarding-enabled": False, "encryption": 0, "message-level": 2,
    "speed-limit-down-enabled": False, "speed-limit-up-enabled": False,
    "rename-partial-files": False, "rpc-enabled": False, "ratio-limit-enabled": False,
    "idle-seeding-limit-enabled": False, "start-added-torrents": True,
}


class Transmission:
    """transmission-cli on one torrent, its configuration and home under ``root``."""

    def __init__(self, root: Path, torrent: Path, download: Path, name: str = "tr") -> None:
        cfg = root / f"{name}-cfg"
        cfg.mkdir(parents=True)
        with socket.socket() as s:  # a free port, for its listening socket
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (cfg / "settings.json").write_text(json.dumps({**SETTINGS, "peer-port": self.port}))
        download.mkdir(parents=True, exist_ok=True)
        self.log = root / f"{name}.log"
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
