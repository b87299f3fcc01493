"""Settings: the documented file equals the embedded defaults; bad input is named."""

from __future__ import annotations

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
    ],
)
def test_bad_settings_are_named(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(f, env=env)


def test_bad_config_stops_the_daemon(tmp_path: Path) -> None:
    import subprocess
    import sys

    f = tmp_path / "p.toml"
    f.write_text("cache_bytes = -5\n")
    r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "run", "--config", str(f)],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 2 and "'cache_bytes' = -5 must be >= 0" in r.stderr


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
