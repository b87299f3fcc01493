"""opentracker, the tracker much of the world runs, on loopback for a test.

Debian builds it to answer only for the info hashes of its whitelist (to anything else
it says nothing but an empty header), so the hashes a test announces are listed first.
It listens for HTTP and UDP on one port number, on an address of its own in 127/8:
libtorrent keeps a UDP tracker's connection id per IP address for the whole process (its
cache is static), so a second opentracker on 127.0.0.1 within a minute would refuse the
id the first one gave, and libtorrent's announces with it. Run as root it shuts itself in
its folder (chroot) and drops to ``nobody``: the folder is made readable to all.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType

PROTOCOL_ID = 0x41727101980


class OpenTracker:
    def __init__(self, folder: Path, info_hashes: list[bytes], timeout: float = 20.0) -> None:
        exe = shutil.which("opentracker")
        if exe is None:
            raise RuntimeError("opentracker not found on PATH; install it (`make tools`)")
        self.exe = exe
        self.folder = folder
        self.info_hashes = list(info_hashes)
        self.timeout = timeout
        self.host = "127.{}.{}.{}".format(*(random.randrange(1, 255) for _ in range(3)))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def udp_url(self) -> str:
        return f"udp://{self.host}:{self.port}/announce"

    def __enter__(self) -> OpenTracker:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        listed = self.folder / "whitelist.txt"
        listed.write_text("".join(f"{ih.hex()}\n" for ih in self.info_hashes))
        listed.chmod(0o644)
        jailed = os.geteuid() == 0
        conf = self.folder / "opentracker.conf"
        conf.write_text(f"access.whitelist {'/whitelist.txt' if jailed else listed}\n")
        deadline = time.monotonic() + self.timeout
        while True:
            self.port = _free_port(self.host)
            self.proc = subprocess.Popen(
                [self.exe, "-f", str(conf), "-i", self.host, "-p", str(self.port),
                 "-P", str(self.port), "-d", str(self.folder)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._answers(deadline):
                return self
            self.close()
            if time.monotonic() > deadline:
                raise RuntimeError("opentracker did not come up")

    def _answers(self, deadline: float) -> bool:
        """It answers an announce for the first hash (``stopped``: it lists no one)."""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False  # (the port was taken meanwhile: another one)
            try:
                reply = self.ask(self.info_hashes[0], event=3, port=1)
            except OSError:
                reply = b""
            if len(reply) >= 20:
                return True
            time.sleep(0.1)
        return False

    def ask(self, info_hash: bytes, event: int, port: int, peer_id: bytes = b"") -> bytes:
        """One announce by hand, as BEP 15 lays it out: the raw reply."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            s.connect((self.host, self.port))
            s.send(struct.pack(">QII", PROTOCOL_ID, 0, 1))
            cid = struct.unpack(">IIQ", s.recv(64)[:16])[2]
            s.send(struct.pack(">QII20s20sQQQIIIiH", cid, 1, 2, info_hash,
                               peer_id or os.urandom(20), 0, 0, 0, event, 0, 0, 50, port))
            return s.recv(2048)

    def seeders(self, info_hash: bytes) -> int:
        """How many seeders it lists for ``info_hash`` (a scrape)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            s.connect((self.host, self.port))
            s.send(struct.pack(">QII", PROTOCOL_ID, 0, 1))
            cid = struct.unpack(">IIQ", s.recv(64)[:16])[2]
            s.send(struct.pack(">QII20s", cid, 2, 3, info_hash))
            reply = s.recv(64)
        return int(struct.unpack_from(">I", reply, 8)[0]) if len(reply) >= 20 else 0

    def wait_seeders(self, info_hash: bytes, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.seeders(info_hash) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"opentracker lists {self.seeders(info_hash)} seeders")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP now (taken by opentracker just after)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
            return port
