"""Shared fixtures: payloads with awkward sizes (empty, one byte, a piece, a piece plus
one, nested folders), and torrents of them made by the real tools in
``tests/realtools.py``; the daemon as a subprocess; and the storage backends.

Backends: a test that takes a ``backend`` argument runs once on each of
:data:`BACKENDS` (ids are the names), and passes it on, to ``DiskIO(backend, ...)`` or to
``Daemon(..., backend=backend)`` (the ``daemon`` fixture does so itself). Backends a test
does not apply to are declared beside it, each with its reason::

    @pytest.mark.backends(exclude={"disabled": "stores nothing: reads the bytes back"})

They stay in the parametrization, skipped with that reason, so every run lists them
(``-ra``). A backend that cannot run here (io_uring refused by the kernel) is no
exclusion: its tests fail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pieced.storage.files import BACKENDS

from tests.realtools import make_payload

#: What ``disabled`` cannot be held to: it keeps no byte, so there is nothing to read
#: back, compare or find after a restart. The usual exclusion of byte-checking tests.
STORES_NOTHING = "stores nothing: the test reads back or compares stored bytes"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(exclude={name: reason}): backends a test taking `backend` "
                   "does not apply to, each with the reason (listed as skipped)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that takes ``backend`` over :data:`BACKENDS`."""
    if "backend" not in metafunc.fixturenames:
        return
    if any("backend" in _argnames(m) for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test names its backends itself
    exclude: dict[str, str] = {}
    for marker in metafunc.definition.iter_markers("backends"):
        for name, why in marker.kwargs.get("exclude", {}).items():
            exclude.setdefault(name, why)  # the closest marker's reason wins
    unknown = set(exclude) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown backends {unknown}")
    metafunc.parametrize("backend", [
        pytest.param(name, id=name, marks=[pytest.mark.skip(
            reason=f"not on the {name} backend: {exclude[name]}")] if name in exclude else [])
        for name in BACKENDS])


def _argnames(marker: pytest.Mark) -> list[str]:
    names: Any = marker.args[0] if marker.args else marker.kwargs.get("argnames", ())
    if isinstance(names, str):
        return [n.strip() for n in names.split(",")]
    return list(names)

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
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 256 KiB, to fill up (the tests run as root: mounting is part of the
    test)."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill_up(folder: Path) -> Path:
    """Fill ``folder``'s file system with one file until it is full; that file."""
    import contextlib

    filler = folder / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"x" * 4096)
            f.flush()
    return filler


class FreezableFs:
    """An ext4 file system of 64 MiB on a loop device, mounted at ``mount``: frozen
    (``fsfreeze``), a write to it waits until it thaws, as on a disk that hangs, while
    the other file systems go on."""

    def __init__(self, tmp_path: Path) -> None:
        import subprocess

        image = tmp_path / "ext4.img"
        self.mount = tmp_path / "frozen"
        self.mount.mkdir()
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(self.mount)], check=True)
        self.frozen = False

    def freeze(self) -> None:
        import subprocess

        subprocess.run(["fsfreeze", "-f", str(self.mount)], check=True)
        self.frozen = True

    def thaw(self) -> None:
        import subprocess

        if self.frozen:
            subprocess.run(["fsfreeze", "-u", str(self.mount)], check=True)
            self.frozen = False

    def close(self) -> None:
        import subprocess

        try:
            self.thaw()
        finally:
            subprocess.run(["umount", "-l", str(self.mount)], check=False)


@pytest.fixture
def freezable_fs(tmp_path: Path) -> Iterator[FreezableFs]:
    fs = FreezableFs(tmp_path)
    yield fs
    fs.close()


@pytest.fixture
def coarse_fs(tmp_path: Path) -> Iterator[Path]:
    """An ext4 file system of 32 MiB with 128-byte inodes, mounted: room for no more
    than whole seconds in its file times (as ext3's, or an NFS server's that keeps
    seconds; FAT keeps two)."""
    import subprocess

    image, mnt = tmp_path / "coarse.img", tmp_path / "coarse"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-I", "128", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


class UnreadableFs:
    """A btrfs file system on a loop device, whose data blocks are checksummed: a byte
    changed in its image behind the file system's back makes the block it lies in
    unreadable (EIO), as a failing disk's bad sector is."""

    def __init__(self, tmp_path: Path) -> None:
        import subprocess

        self.image = tmp_path / "btrfs.img"
        self.mount = tmp_path / "btrfs"
        self.mount.mkdir()
        with open(self.image, "wb") as f:
            f.truncate(128 << 20)  # (sparse)
        subprocess.run(["mkfs.btrfs", "-q", "-f", "--mixed", str(self.image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mount)], check=True)

    def spoil(self, needle: bytes) -> None:
        """Change a byte of the data block holding ``needle`` (unmounted meanwhile, so
        that nothing of it stays in the page cache)."""
        import subprocess

        subprocess.run(["umount", str(self.mount)], check=True)
        data = self.image.read_bytes()
        at = data.find(needle)
        assert at >= 0 and data.find(needle, at + 1) < 0, "the block is stored once"
        with open(self.image, "r+b") as f:
            f.seek(at)
            f.write(bytes([data[at] ^ 0xFF]))
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mount)], check=True)

    def close(self) -> None:
        import subprocess

        subprocess.run(["umount", "-l", str(self.mount)], check=False)


@pytest.fixture
def unreadable_fs(tmp_path: Path) -> Iterator[UnreadableFs]:
    fs = UnreadableFs(tmp_path)
    yield fs
    fs.close()


@pytest.fixture
def odd_payload(tmp_path: Path) -> tuple[Path, Path]:
    """(save path, content path) of a multi-file payload with odd sizes."""
    content = make_payload(tmp_path / "save", ODD_FILES, seed=7)
    return tmp_path / "save", content



def sparse_zero_torrent(folder: Path, name: str, piece: int, pieces: int) -> bytes:
    """A single-file v1 torrent of ``pieces`` pieces of zeros, its file already in
    ``folder`` and sparse (nothing on disk): huge pieces to recheck, for free."""
    import hashlib

    import bencodepy

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "wb") as f:
        f.truncate(pieces * piece)
    info = {b"name": name.encode(), b"piece length": piece, b"length": pieces * piece,
            b"pieces": hashlib.sha1(bytes(piece)).digest() * pieces}
    return bytes(bencodepy.encode({b"info": info}))

def proc_bytes(pid: int, key: str = "VmRSS") -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM...), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def peak_from_now(pid: int | str = "self") -> int:
    """Start a process's peak RSS (VmHWM) anew from its RSS now ("5" to clear_refs, Linux
    4.0 and later), and return that RSS: the peak later, less it, is what grew since."""
    import os

    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    return proc_bytes(pid if isinstance(pid, int) else os.getpid(), "VmRSS")


def open_fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


class Daemon:
    """A real ``pieced run`` subprocess on a private socket, state dir and HTTP port.

    ``backend``: run on that storage backend (``PIECED_BACKEND``); the daemon must say
    so in its first line, or this fails. ``wrap``: a command it runs under (``prlimit``).
    """

    started: list[Daemon] = []  # (the test's: none outlives it)

    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None,
                 backend: str | None = None, wrap: tuple[str, ...] = ()) -> None:
        import os
        import subprocess
        import sys

        self.root = root
        self.socket = root / "var" / "pieced.sock"
        Daemon.started.append(self)
        env = {**os.environ, **(env or {})}
        if backend is not None:
            env["PIECED_BACKEND"] = backend
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0", *extra],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"daemon did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.http = line.split("http://")[1].split()[0]
        if backend is not None and f"(backend {backend})" not in line:
            self.proc.kill()
            raise RuntimeError(f"daemon is not on the {backend} backend: {line!r}")

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


@pytest.fixture(autouse=True)
def _no_daemon_left() -> Iterator[None]:
    """A test that fails half-way (before its ``stop``) leaves no daemon running."""
    yield
    while Daemon.started:
        d = Daemon.started.pop()
        if getattr(d, "proc", None) is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A daemon in ``tmp_path``, on the test's ``backend`` if it takes one."""
    callspec = getattr(request.node, "callspec", None)
    d = Daemon(tmp_path, backend=callspec.params.get("backend") if callspec else None)
    yield d
    rc = d.stop()
    assert rc == 0, d.stderr()


def run_threads(*targets: Callable[[], None], timeout: float = 30.0) -> None:
    """Run the callables in threads at once; re-raise the first failure; bounded in time
    (``timeout`` for the start, twice that for the work)."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def wrap(fn: Callable[[], None]) -> None:
        try:
            start.wait(timeout)
            fn()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * timeout)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]
