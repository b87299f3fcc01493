"""Access control with real credentials: the socket is 0660, and SO_PEERCRED decides
which other users may talk to the daemon."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from pieced.protocol.client import Client
from pieced.storage.errors import AccessDenied

from tests.conftest import Daemon


def _connect_as(uid: int, sock: Path) -> int:
    """Fork, drop to ``uid``, connect; exit 0 = served, 3 = AccessDenied (5: with an
    errno), 4 = no access."""
    pid = os.fork()
    if pid == 0:  # child: only sockets and os._exit from here on
        code = 1
        try:
            os.setgid(uid)
            os.setuid(uid)
            try:
                with Client(sock, timeout=10) as c:
                    c.stats()
                code = 0
            except AccessDenied as exc:
                code = 3 if exc.errno is None else 5  # (not EBUSY: refused for good)
            except PermissionError:
                code = 4
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_socket_mode_and_peer_credentials() -> None:
    root = Path(tempfile.mkdtemp(prefix="pieced-access-"))
    root.chmod(0o755)  # other users must be able to reach the socket's folder
    (root / "var").mkdir(mode=0o755)
    d = Daemon(root, env={"PIECED_ALLOW_UIDS": "12345"})
    try:
        mode = stat.S_IMODE(d.socket.stat().st_mode)
        assert mode == 0o660
        assert _connect_as(65534, d.socket) == 4  # not owner, not group: the kernel says no
        d.socket.chmod(0o666)  # open the door, so SO_PEERCRED is what decides
        assert _connect_as(65534, d.socket) == 3  # nobody: refused with AccessDenied
        assert _connect_as(12345, d.socket) == 0  # listed uid: served
        with Client(d.socket) as c:  # the daemon's own user always is
            assert c.stats()["clients_refused"] == 1
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_socket_group_a_folder_on_the_way_shuts_out_is_warned_of(tmp_path: Path) -> None:
    """Under umask 077 the state folder, which holds the socket by default, is made
    0700: ``socket_group`` and ``socket_mode`` 0660 then let no member of the group in,
    and nothing said why."""
    tmp_path.chmod(0o755)
    (tmp_path / "var").mkdir(mode=0o700)
    d = Daemon(tmp_path, env={"PIECED_SOCKET_GROUP": "4242"})
    assert d.stop() == 0, d.stderr()
    assert (f"socket_group 4242: the folder {tmp_path / 'var'} (mode 0o700) lets no member "
            "of the group through to the socket") in d.stderr(), d.stderr()


def test_the_socket_group_may_be_a_number_and_a_bad_one_is_refused_with_a_message(
        tmp_path: Path) -> None:
    """A group named by its number (one /etc/group does not list, as in a container) was
    refused as "no such group"; a number too large for a gid, or not in ASCII digits,
    is refused with the same clear message, not a traceback."""
    import subprocess
    import sys

    (tmp_path / "a").mkdir()
    d = Daemon(tmp_path / "a", env={"PIECED_SOCKET_GROUP": "4242"})
    try:
        assert d.socket.stat().st_gid == 4242
    finally:
        assert d.stop() == 0, d.stderr()
    for bad in ("99999999999", "4294967295", "\u0663", "no-such-group-here"):
        (tmp_path / "b").mkdir(exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0"],
                           cwd=tmp_path / "b", capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PIECED_SOCKET_GROUP": bad})
        assert r.returncode != 0 and f"socket_group {bad!r}: no such group" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
