"""Shared fixtures: payloads with awkward sizes (empty, one byte, a piece, a piece plus
one, nested folders), and torrents of them made by the real tools in
``tests/realtools.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.realtools import make_payload

# 0 bytes, 1 byte, exactly a piece, a piece plus one, nested folders (piece = 64 KiB here).
ODD_FILES = {
    "a.bin": 200_000,
    "empty": 0,
    "one": 1,
    "sub/exact": 65536,
    "sub/deeper/plus1": 65537,
    "z/tail.dat": 12345,
}


@pytest.fixture
def odd_payload(tmp_path: Path) -> tuple[Path, Path]:
    """(save path, content path) of a multi-file payload with odd sizes."""
    content = make_payload(tmp_path / "save", ODD_FILES, seed=7)
    return tmp_path / "save", content


def proc_bytes(pid: int, key: str = "VmRSS") -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM...), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


class Daemon:
    """A real ``pieced run`` subprocess on a private socket, state dir and HTTP port."""

    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys

        self.root = root
        self.socket = root / "var" / "pieced.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0", *extra],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"daemon did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.http = line.split("http://")[1].split()[0]

    def stop(self, timeout: float = 30) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except Exception:
            self.proc.kill()
            raise

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr else ""


@pytest.fixture
def daemon(tmp_path: Path):  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path)
    yield d
    rc = d.stop()
    assert rc == 0, d.stderr()
