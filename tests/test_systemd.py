"""The systemd protocols with real sockets: READY/STATUS/STOPPING over $NOTIFY_SOCKET,
and a listening socket handed over with LISTEN_FDS (socket activation)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pieced.daemon.systemd import MIN_PING_INTERVAL, watchdog_interval
from pieced.protocol.client import Client


def test_notify_and_socket_activation(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(30)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "activated.sock"))
    listener.listen(8)
    fd = listener.fileno()

    def as_fd3() -> None:  # what systemd does: the socket is descriptor 3 of the service
        os.dup2(fd, 3)

    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "LISTEN_FDS": "1",
           "WATCHDOG_USEC": "200000"}
    # LISTEN_PID/WATCHDOG_PID must name the daemon itself: exec keeps the shell's pid.
    script = (f'LISTEN_PID=$$ WATCHDOG_PID=$$ exec {sys.executable} -m pieced.daemon.cli run '
              f'--http-port 0 --socket {tmp_path}/unused.sock')
    proc = subprocess.Popen(["sh", "-c", script], cwd=tmp_path, env=env, preexec_fn=as_fd3, pass_fds=(3, fd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert any("STATUS=" in m for m in messages)
        assert not (tmp_path / "unused.sock").exists()  # it took systemd's socket instead
        # ... and says so: the socket clients reach, not the one configured and unused.
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert (f"listening on {tmp_path}/activated.sock (passed by the service manager) "
                "and http://") in line, line
        assert "unused.sock" not in line
        with Client(tmp_path / "activated.sock") as c:
            assert c.stats()["connected_clients"] == 1
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        assert proc.stderr is not None
        assert "activated.sock (passed by the service manager)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
        notify.close()


def test_a_watchdog_setting_that_makes_no_sense_gives_no_pings_and_no_traceback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC not a number stopped the start with a traceback, after the socket
    was bound; 0, a negative one or a few microseconds made the ping loop run without a
    pause."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for usec, want in (("abc", None), ("-5", None), ("0", None), ("1", MIN_PING_INTERVAL),
                       ("200000", 0.1)):
        monkeypatch.setenv("WATCHDOG_USEC", usec)
        assert watchdog_interval() == want, usec
    monkeypatch.setenv("WATCHDOG_PID", "x")
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.1


@pytest.mark.parametrize("kind", ["tcp", "datagram", "not_listening"])
def test_a_passed_socket_other_than_a_listening_unix_stream_is_refused(
        tmp_path: Path, kind: str) -> None:
    """A socket unit of ListenStream=9000 passed a TCP socket: the daemon served its
    whole protocol (rm --delete-files too) to the network, no credentials checked. A
    datagram socket, or one not listening, started "ready" and failed every accept."""
    if kind == "tcp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
    elif kind == "datagram":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / "dgram.sock"))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / "quiet.sock"))
    fd = sock.fileno()
    script = (f'LISTEN_PID=$$ exec {sys.executable} -m pieced.daemon.cli run '
              f'--http-port 0 --socket {tmp_path}/unused.sock')
    try:
        r = subprocess.run(["sh", "-c", script], cwd=tmp_path,
                           env={**os.environ, "LISTEN_FDS": "1"},
                           preexec_fn=lambda: os.dup2(fd, 3), pass_fds=(3, fd),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "must be a listening Unix stream socket" in r.stderr
        assert "listening on" not in r.stdout
    finally:
        sock.close()


def _saved_library(root: Path, n: int) -> None:
    """``n`` small torrents registered, their state saved in ``root/var``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from many_torrents import torrent
    from pieced.storage.disk import DiskIO

    dio = DiskIO("posix", roots=[root], state_dir=root / "var")
    for i in range(n):
        dio.register(torrent(i), root / "dl")
    dio.close()


def test_a_start_tells_of_its_progress_while_it_reads_each_saved_torrent(
        tmp_path: Path) -> None:
    """What the service manager is told comes from the engine's progress calls, said at
    most once a second: the first phase, reading every torrent's saved state, made
    none but its first, and with 17,000 torrents went 7.5 s without a word (past a
    start's timeout on a slower disk). It now calls once before each torrent it reads
    (``done`` and ``total`` 0: the count is not known yet), then once as each loads."""
    from pieced.storage.disk import DiskIO

    n = 20
    _saved_library(tmp_path, n)
    calls: list[tuple[int, int]] = []
    dio = DiskIO("posix", roots=[tmp_path], state_dir=tmp_path / "var",
                 on_load=lambda done, total: calls.append((done, total)))
    try:
        assert len(dio.torrents()) == n
    finally:
        dio.close()
    reading = [c for c in calls if c == (0, 0)]
    assert len(reading) >= n + 1, calls
    assert calls.index((0, n)) > calls.index((0, 0)) + n - 1, calls


def test_a_start_that_loads_many_torrents_asks_the_service_manager_for_time(
        tmp_path: Path) -> None:
    """A library of tens of thousands of torrents takes longer to load than systemd
    waits for a start (TimeoutStartSec, 90 s unless set): the service was killed as it
    started, at every start. While it loads, the daemon now says how far it is and asks
    for more time (EXTEND_TIMEOUT_USEC) once a second, before READY=1."""
    n = 1500
    _saved_library(tmp_path, n)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen([sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        loading = [m for m in messages if "EXTEND_TIMEOUT_USEC=90000000" in m]
        assert loading and "STATUS=reading saved torrents" in loading[0], messages
        assert any(f" of {n}" in m for m in loading), messages  # (it took over a second)
        with Client(tmp_path / "var" / "pieced.sock") as c:
            assert len(c.torrents()) == n
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
