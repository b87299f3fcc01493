"""Settings: the documented file equals the embedded defaults; bad input is named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pieced.config.settings import Settings, load
from pieced.storage.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_documented_file_is_the_embedded_defaults() -> None:
    assert load(ROOT / "config" / "pieced.toml", env={}) == Settings()


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('backend = "mmap"\ncache_bytes = 1048576\nhttp_port = 1\n')
    s = load(f, env={"PIECED_CACHE_BYTES": "2097152", "PIECED_HTTP_PORT": "2"}, overrides={"http_port": "3"})
    assert (s.backend, s.cache_bytes, s.http_port) == ("mmap", 2097152, 3)


def test_pieced_peer_variables_do_not_stop_the_daemon() -> None:
    """The daemon and pieced-peer may share one environment (a unit, a shell)."""
    assert load(ROOT / "config" / "pieced.toml", env={"PIECED_PEER_LOG": "info"}) == Settings()


@pytest.mark.parametrize("written", ["0660", "660", "0o660", "0O660"])
def test_file_modes_are_octal_however_written(tmp_path: Path, written: str) -> None:
    assert load(None, env={"PIECED_SOCKET_MODE": written}).socket_mode == 0o660
    f = tmp_path / "p.toml"
    f.write_text(f'socket_mode = "{written}"\n')
    assert load(f, env={}).socket_mode == 0o660


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("cache_byts = 1\n", {}, "unknown key 'cache_byts'"),
        ('backend = "zfs"\n', {}, "'backend' = 'zfs' must be one of"),
        ('cache_bytes = "lots"\n', {}, "'cache_bytes' must be an integer"),
        ("http_port = 70000\n", {}, "must be a port number"),
        ("preallocate = 1\n", {}, "must be true or false"),
        ("roots = [1]\n", {}, "must be a list of str"),
        ("x = [\n", {}, "p.toml"),
        ("", {"PIECED_NOPE": "1"}, "unknown setting PIECED_NOPE"),
        ("", {"PIECED_SYNC_WINDOW_MS": "-1"}, "must be between 0 and 60000"),
        ("", {"PIECED_CLIENT_BUFFER_BYTES": str(1 << 62)}, "'client_buffer_bytes' = 4611"),
        ("hash_workers = 100000\n", {}, "'hash_workers' = 100000 must be between 0 and 1024"),
        ("", {"PIECED_SOCKET_MODE": "0999"}, "must be an octal file mode"),
        ("", {"PIECED_SOCKET_MODE": "0o1777"}, "must be a file mode"),
        ("", {"PIECED_SOCKET_MODE": "0444"}, "must let its owner write"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(f, env=env)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('http_port = "0"\n', "'http_port' must be an integer, not the string '0'"),
        ("http_port = 80.0\n", "'http_port' must be an integer, not the float 80.0"),
        ("http_port = true\n", "'http_port' must be an integer, not the boolean true"),
        ('roots = "/tmp/x"\n', "'roots' must be a list of str, not the string '/tmp/x'"),
        ('allow_uids = "0"\n', "'allow_uids' must be a list of int, not the string '0'"),
        ('allow_gids = ["0"]\n', "'allow_gids' must be a list of int, not the array ['0']"),
        ('preallocate = "yes"\n', "'preallocate' must be true or false, not the string 'yes'"),
        ("preallocate = 1\n", "'preallocate' must be true or false, not the integer 1"),
        ("backend = 1\n", "'backend' must be a string, not the integer 1"),
        ("state_dir = [\"var\"]\n", "'state_dir' must be a string, not the array ['var']"),
        ("log_file = {}\n", "'log_file' must be a string, not a table"),
        ("socket = 1979-05-27\n", "'socket' must be a string, not the date-time 1979-05-27"),
        ("http_token = 12345678901234567\n", "'http_token' must be a string, not the integer"
                                              " (not shown)"),
    ],
)
def test_a_file_value_of_another_type_is_named(tmp_path: Path, text: str, message: str) -> None:
    """A TOML file says what type a value is: a string where a number, a list or a flag
    is expected is a mistake in the file, not text to be read as one (the environment
    and flags, which are text, are read so)."""
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(f, env={})
    assert str(caught.value) == f"{f}: {message}"
    assert "12345678901234567" not in str(caught.value)


def test_text_is_still_read_from_the_environment_and_flags() -> None:
    env = {"PIECED_HTTP_PORT": "0", "PIECED_ROOTS": "/a:/b", "PIECED_ALLOW_UIDS": "0,7",
           "PIECED_PREALLOCATE": "yes", "PIECED_LOG_FILE": ""}
    s = load(None, env=env, overrides={"allow_gids": "5"})
    assert (s.http_port, s.roots, s.allow_uids, s.preallocate, s.allow_gids, s.log_file) == (
        0, ["/a", "/b"], [0, 7], True, [5], "")


def test_bad_config_stops_the_daemon(tmp_path: Path) -> None:
    import subprocess
    import sys

    f = tmp_path / "p.toml"
    f.write_text("cache_bytes = -5\n")
    r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "run", "--config", str(f)],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 2 and "'cache_bytes' = -5 must be >= 0" in r.stderr


@pytest.mark.parametrize("what", ["folder", "not utf-8"])
def test_a_config_file_that_cannot_be_read_stops_the_daemon_saying_why(
        tmp_path: Path, what: str) -> None:
    """A config path that is a folder, or a file that is not text: a traceback, exit 1."""
    import subprocess
    import sys

    f = tmp_path / "p.toml"
    if what == "folder":
        f.mkdir()
    else:
        f.write_bytes(b"cache_bytes = 5 # \xff\xfe\n")
    r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "run", "--config", str(f)],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    said = {"folder": "cannot read it: Is a directory", "not utf-8": "not UTF-8 text"}[what]
    assert r.returncode == 2 and r.stderr == f"pieced: configuration error: config file {f}: {said}\n", \
        r.stderr


def _unit_problems(*units: Path) -> list[str]:
    import shutil
    import subprocess

    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is installed by `make tools`"
    r = subprocess.run([exe, "verify", "--man=no", *map(str, units)],
                       capture_output=True, text=True, timeout=60)
    # A build machine has no /usr/bin/pieced: that, and nothing else, is forgiven.
    benign = ("/usr/bin/pieced is not executable", "Unit pieced.socket not found")
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln and not any(b in ln for b in benign)]


def test_systemd_units_verify(tmp_path: Path) -> None:
    units = ROOT / "systemd"
    assert _unit_problems(units / "pieced.socket", units / "pieced.service") == []
    broken = tmp_path / "pieced.service"
    broken.write_text((units / "pieced.service").read_text().replace("Type=notify", "Type=notfy"))
    assert any("notfy" in p for p in _unit_problems(broken))


def test_a_string_in_the_file_stops_the_daemon(tmp_path: Path) -> None:
    """``http_port = "0"`` once started a daemon on a free port, the file's mistake unseen."""
    import subprocess
    import sys

    f = tmp_path / "p.toml"
    f.write_text('http_port = "0"\n')
    r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "run", "--config", str(f)],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 2, r.stdout
    assert f"{f}: 'http_port' must be an integer, not the string '0'" in r.stderr
    assert not (tmp_path / "var").exists()


def test_the_service_logs_to_stderr_only() -> None:
    """The unit runs the documented file with its own ``Environment=`` lines: the log
    goes to journald through stderr, not to a file below its working folder."""
    unit = (ROOT / "systemd" / "pieced.service").read_text()
    env = dict(line.removeprefix("Environment=").split("=", 1) for line in unit.splitlines()
               if line.startswith("Environment="))
    assert "/etc/pieced/pieced.toml" in unit  # config/pieced.toml, installed
    s = load(ROOT / "config" / "pieced.toml", env=env)
    assert s.log_file == "" and s.state_dir == "/var/lib/pieced"
    assert Settings().log_file == "var/pieced.log"  # make run: next to the state and socket


def _log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_the_embedded_defaults_log_to_var(tmp_path: Path) -> None:
    """``make run`` keeps state, socket and log under ./var/: the log in var/pieced.log
    as well as on stderr, one line per record with its time, appended to."""
    import re

    from tests.conftest import Daemon

    for run in range(2):
        d = Daemon(tmp_path, env={"PIECED_LOG_FILE": "var/pieced.log"} if run else {})
        assert d.stop() == 0, d.stderr()
        lines = _log_lines(tmp_path / "var" / "pieced.log")
        started = [ln for ln in lines if "INFO pieced: listening on" in ln]
        assert len(started) == run + 1, lines  # the first run's lines are kept
        assert f"listening on {tmp_path / 'var' / 'pieced.sock'} and http://" in started[0]
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", started[0])
        assert lines[-1].endswith("INFO pieced: stopped")


def test_an_empty_log_file_logs_to_stderr_only(tmp_path: Path) -> None:
    from tests.conftest import Daemon

    f = tmp_path / "p.toml"
    f.write_text('log_file = ""\n')
    d = Daemon(tmp_path, "--config", str(f))
    assert d.stop() == 0
    assert "INFO pieced: listening on" in d.stderr()
    assert (tmp_path / "var" / "torrents").is_dir()  # the state is there, no log with it
    assert not (tmp_path / "var" / "pieced.log").exists()
    assert not list(tmp_path.rglob("*.log"))


def test_a_log_file_that_cannot_be_opened_stops_the_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "logs").mkdir()
    r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0"],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path,
                       env={**os.environ, "PIECED_LOG_FILE": "logs"})
    assert r.returncode == 2, r.stdout
    assert f"log_file '{tmp_path / 'logs'}': cannot open it: Is a directory" in r.stderr
    assert not (tmp_path / "var").exists()


def test_a_log_file_that_cannot_take_records_is_said_once_without_tracebacks(
        tmp_path: Path) -> None:
    """A log file on a full disk (here /dev/full, where every write fails with ENOSPC):
    the daemon runs and answers, each record still reaches stderr, and the failure is
    said once there, not as a traceback for every record."""
    from pieced.protocol.client import Client

    from tests.conftest import Daemon

    d = Daemon(tmp_path, env={"PIECED_LOG_FILE": "/dev/full"})
    with Client(d.socket) as c:
        for _ in range(5):
            c.stats()
    assert d.stop() == 0
    err = d.stderr()
    assert "INFO pieced: listening on" in err and "INFO pieced: stopped" in err, err
    said = [ln for ln in err.splitlines() if "log_file '/dev/full': cannot write to it" in ln]
    assert len(said) == 1 and "No space left on device" in said[0], err
    assert "Traceback" not in err and "Logging error" not in err, err


def test_a_log_file_whose_folder_is_removed_stops_no_log_call(tmp_path: Path) -> None:
    """The log file's folder removed while the daemon runs: the handler's reopen of a
    file gone raised out of every log call (past logging's own handling), so the stop's
    "stopping" line ended the daemon with a traceback, exit 1, before it closed its
    storage and removed its socket (and inside the event loop's callbacks, a full disk
    and a rotated log left a daemon that answered no one). The failure is said once."""
    import shutil

    from pieced.protocol.client import Client

    from tests.conftest import Daemon

    logs = tmp_path / "logs"
    d = Daemon(tmp_path, env={"PIECED_LOG_FILE": str(logs / "pieced.log")})
    assert (logs / "pieced.log").exists()
    shutil.rmtree(logs)
    with Client(d.socket) as c:
        c.stats()
    assert d.stop() == 0
    err = d.stderr()
    assert "INFO pieced: stopped" in err and "Traceback" not in err, err
    said = [ln for ln in err.splitlines() if "cannot write to it" in ln]
    assert len(said) == 1 and "No such file or directory" in said[0], err
    assert not d.socket.exists()


def test_a_start_refused_after_the_log_is_open_is_in_the_log(tmp_path: Path) -> None:
    """A refusal found once logging is set up (the state folder held by another daemon)
    went to stderr alone: under an init system that keeps only the log file, the log
    ended on a start-up line and never said why the daemon was not running."""
    import subprocess
    import sys

    from tests.conftest import Daemon

    first = Daemon(tmp_path)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0",
             "--socket", str(tmp_path / "other.sock")],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, "PIECED_LOG_FILE": str(tmp_path / "second.log")})
        assert r.returncode == 2, r.stderr
        said = [ln for ln in r.stderr.splitlines() if "in use by another pieced daemon" in ln]
        assert len(said) == 1, r.stderr  # once, not twice
        logged = [ln for ln in _log_lines(tmp_path / "second.log")
                  if "in use by another pieced daemon" in ln]
        assert len(logged) == 1 and " CRITICAL pieced: " in logged[0], logged
        # a refusal worded for stderr ("pieced: ..."): the logger's name is said once
        r = subprocess.run(
            [sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0",
             "--socket", str(first.socket), "--state-dir", str(tmp_path / "state3")],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, "PIECED_LOG_FILE": str(tmp_path / "third.log")})
        assert r.returncode == 2 and "another daemon is listening" in r.stderr, r.stderr
        logged = [ln for ln in _log_lines(tmp_path / "third.log") if " CRITICAL " in ln]
        assert len(logged) == 1 and " CRITICAL pieced: another daemon" in logged[0], logged
    finally:
        assert first.stop() == 0, first.stderr()


def test_a_stop_leaves_a_socket_another_daemon_bound_since(tmp_path: Path) -> None:
    """A daemon's socket file removed, and another daemon started on the same path (its
    own state): the first one's clean stop removed the second one's socket by name, and
    the second one's clients found none. A stop removes the socket it bound alone."""
    from pieced.protocol.client import Client

    from tests.conftest import Daemon

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(tmp_path / "a")
    try:
        first.socket.unlink()
        second = Daemon(tmp_path / "b", "--socket", str(first.socket))
        try:
            assert first.stop() == 0, first.stderr()
            with Client(first.socket) as c:  # (the second one's now)
                assert c.stats() is not None
        finally:
            assert second.stop() == 0, second.stderr()
        assert not first.socket.exists()  # (the second one's, removed at its stop)
    finally:
        first.stop()


def test_a_socket_whose_folder_cannot_be_made_is_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "a-file").write_text("")
    sock = tmp_path / "a-file" / "pieced.sock"
    r = subprocess.run(
        [sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0",
         "--socket", str(sock)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"socket {sock}: cannot make its folder {sock.parent}: a file is in the way" \
        in r.stderr, r.stderr


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_a_state_dir_that_cannot_be_made_is_named(tmp_path: Path, where: str) -> None:
    """It said only "[Errno 20] Not a directory: '.../torrents'", of a folder of its
    own inside the file."""
    import subprocess
    import sys

    (tmp_path / "a-file").write_text("")
    state = tmp_path / "a-file" if where == "a file" else tmp_path / "a-file" / "state"
    r = subprocess.run(
        [sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0",
         "--state-dir", str(state)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    why = "a file is in the way" if where == "a file" else "Not a directory"
    assert f"'state_dir' = '{state}': cannot make the folder: {why}" in r.stderr, r.stderr
    assert (tmp_path / "a-file").read_text() == ""


def test_a_daemon_whose_standard_output_is_full_runs_on(tmp_path: Path) -> None:
    """Its one line on standard output failed (ENOSPC: a file on a full disk, here
    /dev/full): the daemon stopped with exit 2 just after it had begun to listen, its
    socket left behind. It is said once in the log, and the daemon serves on."""
    import signal
    import subprocess
    import sys
    import time

    from pieced.protocol.client import Client

    with open("/dev/full", "w") as full:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0"],
            stdout=full, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        sock = tmp_path / "var" / "pieced.sock"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                with Client(sock) as c:
                    c.stats()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        time.sleep(0.3)  # (past the start line)
        with Client(sock) as c:
            assert c.stats() is not None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert err.count("standard output cannot be written") == 1, err
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_missing_root_is_warned_of(tmp_path: Path) -> None:
    """Every save path below it would be refused: said at start-up, not only at each
    add, and not refused (the mount it stands for may come later)."""
    from tests.conftest import Daemon

    missing, plain = tmp_path / "mnt" / "library", tmp_path / "a-file"
    plain.write_text("")
    f = tmp_path / "p.toml"
    f.write_text(f'roots = ["{missing}", "{plain}", "{tmp_path}"]\n')
    d = Daemon(tmp_path, "--config", str(f))
    assert d.stop() == 0
    warned = [ln for ln in _log_lines(tmp_path / "var" / "pieced.log")
              if "WARNING pieced: roots:" in ln]
    assert len(warned) == 2, warned
    assert f"roots: {missing} does not exist" in warned[0]
    assert f"roots: {plain} is not a folder" in warned[1]
    assert f"roots: {missing} does not exist" in d.stderr()


@pytest.mark.parametrize("extra,warned", [
    ({"PIECED_SOCKET_MODE": "666"}, True),
    ({"PIECED_SOCKET_MODE": "662"}, True),
    ({"PIECED_SOCKET_MODE": "664"}, False),  # (connecting takes the write bit: no one else)
    ({"PIECED_SOCKET_MODE": "666", "PIECED_ALLOW_UIDS": "0"}, False),
    ({}, False),
])
def test_a_socket_open_to_every_user_with_nobody_checked_is_warned_of(
        tmp_path: Path, extra: dict[str, str], warned: bool) -> None:
    """socket_mode 0666 with both allow lists empty: every local user may register and
    remove torrents. Allowed, but said at start-up."""
    from tests.conftest import Daemon

    d = Daemon(tmp_path, env=extra)
    assert d.stop() == 0
    said = [ln for ln in _log_lines(tmp_path / "var" / "pieced.log")
            if "lets every local user use this daemon" in ln]
    assert len(said) == (1 if warned else 0), said
    if warned:
        assert f"socket_mode 0o{extra['PIECED_SOCKET_MODE']}" in said[0]


def test_a_socket_path_too_long_is_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    long = tmp_path / ("s" * 120) / "pieced.sock"
    r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0",
                        "--socket", str(long)],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 2, r.stdout
    size = len(os.fsencode(str(long)))
    assert f"'socket' = '{long}' is {size} bytes long: a Unix socket path may have at most 108" \
        in r.stderr, r.stderr
    assert not (tmp_path / ("s" * 120)).exists()


def test_pieced_add_takes_a_torrent_as_large_as_the_daemon_does(tmp_path: Path) -> None:
    """A daemon whose max_metainfo_bytes is raised takes a .torrent of 70 MB; `pieced
    add` read it no further than the 64 MiB default and refused it itself."""
    import subprocess
    import sys

    import bencodepy

    from tests.conftest import Daemon
    from tests.realtools import make_payload, make_torrent_lt

    content = make_payload(tmp_path / "src", 100_000, seed=4)
    meta = bencodepy.decode(make_torrent_lt(content, 16384, "v1"))
    meta[b"x-padding"] = b"0" * (70 * 1024 * 1024)  # (outside the info dictionary)
    tfile = tmp_path / "big.torrent"
    tfile.write_bytes(bencodepy.encode(meta))
    d = Daemon(tmp_path, env={"PIECED_MAX_METAINFO_BYTES": str(100 * 1024 * 1024)})
    try:
        r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "add", str(tfile),
                            "--save-path", str(tmp_path / "dl"), "--socket", str(d.socket),
                            "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["info_hash"]) == 40
    finally:
        assert d.stop() == 0, d.stderr()


def test_pieced_peer_names_a_log_level_it_does_not_know(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pieced.peer.command", str(tmp_path / "t.torrent"),
                        "--save-path", str(tmp_path)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PIECED_PEER_LOG": "verbose"})
    assert r.returncode == 2
    assert "PIECED_PEER_LOG='VERBOSE' is not a level" in r.stderr
    assert "Traceback" not in r.stderr
