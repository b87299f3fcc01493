"""Settings: embedded defaults < TOML file < ``PIECED_*`` environment < command line.

Every key is declared once in :data:`FIELDS` with its type and a check; anything
else, or a value that fails its check, stops start-up with a message that names
the key, where it came from and what is wrong. ``config/pieced.toml`` documents
every key with its default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_type_hints

from pieced.storage.errors import ConfigError

MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    state_dir: str = "var"
    socket: str = "var/pieced.sock"
    socket_mode: int = 0o660
    socket_group: str = ""
    allow_uids: list[int] = field(default_factory=list)
    allow_gids: list[int] = field(default_factory=list)
    http_host: str = "127.0.0.1"
    http_port: int = 9731
    http_token: str = ""
    backend: str = "posix"
    cache_bytes: int = 256 * MiB
    cache_policy: str = "arc"
    hash_workers: int = 0
    io_workers: int = 0
    max_open_files: int = 16384
    preallocate: bool = False
    allow_hard_links: bool = False
    sync_window_ms: int = 10
    roots: list[str] = field(default_factory=list)
    client_buffer_bytes: int = 8 * MiB
    max_frame_bytes: int = 8 * MiB
    max_metainfo_bytes: int = 64 * MiB
    max_clients: int = 256
    max_ring_bytes: int = 256 * MiB
    max_unsent_bytes: int = 256 * MiB
    handshake_timeout_ms: int = 10_000
    frame_timeout_ms: int = 60_000
    max_files: int = 1_000_000
    max_pieces: int = 4_000_000
    max_piece_length: int = 64 * MiB
    max_partial_pieces: int = 4096
    log_level: str = "info"
    log_file: str = "var/pieced.log"

    def metainfo_limits(self) -> dict[str, int]:
        """The limits on a .torrent, as ``parse`` takes them: the daemon's, and those of
        ``pieced verify``, which must take whatever the daemon takes."""
        return {arg: getattr(self, key) for key, arg in METAINFO_LIMITS.items()}

    def resolved(self, base: Path | None = None) -> Settings:
        """Relative paths are taken from ``base`` (the folder the daemon started in).
        An empty ``log_file`` stays empty: the log goes to stderr only."""
        base = base or Path.cwd()
        roots = self.roots or [str(base)]
        return replace(
            self,
            state_dir=str((base / self.state_dir).resolve()),
            socket=str((base / self.socket).resolve()),
            roots=[str((base / r).resolve()) for r in roots],
            log_file=str((base / self.log_file).resolve()) if self.log_file else "",
        )


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(allowed)}"

    return check


def _between(lo: int, hi: int, unit: str = "") -> Callable[[Any], str | None]:
    """A count or size a daemon can actually use: a huge one is accepted at start-up
    only to fail later, on every client (a receive buffer of 2**62 bytes cannot be made)."""
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}{unit}"

    return check


GiB = 1024 * MiB


def _port(v: Any) -> str | None:
    return None if 0 <= v <= 65535 else "must be a port number (0-65535)"


def _mode(v: Any) -> str | None:
    if not 0 <= v <= 0o777:
        return "must be a file mode such as 0o660"
    if not v & 0o200:  # (connecting takes the write bit: not even its own user could)
        return "must let its owner write (0o200): connecting to a socket takes its write bit"
    return None


_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,}")


def _token(v: Any) -> str | None:
    """At least 16 characters that need no escaping in a URL (``?token=`` carries it)."""
    if v == "" or _TOKEN.fullmatch(v):
        return None
    return "must be empty or at least 16 characters of A-Z a-z 0-9 . _ ~ -"


def is_loopback(host: str) -> bool:
    """Whether an HTTP address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" (every address)
        return False


SECRET = {"http_token"}  # never repeated in a message

CHECKS: dict[str, Callable[[Any], str | None]] = {
    "socket_mode": _mode,
    "http_port": _port,
    "http_token": _token,
    "backend": _choice("posix", "mmap", "direct", "uring", "disabled"),
    "cache_bytes": _non_negative,
    "cache_policy": _choice("arc", "lru"),
    "hash_workers": _between(0, 1024),
    "io_workers": _between(0, 1024),
    "max_open_files": _between(1, 1 << 20),
    "sync_window_ms": _between(0, 60_000, " (ms)"),
    "client_buffer_bytes": _between(64 * 1024, 4 * GiB, " bytes"),
    "max_frame_bytes": _between(64 * 1024, 1 * GiB, " bytes"),
    "max_metainfo_bytes": _between(64 * 1024, 1 * GiB, " bytes"),
    "max_clients": _between(1, 1 << 16),
    "max_ring_bytes": _between(64 * 1024, 64 * GiB, " bytes"),
    "max_unsent_bytes": _between(64 * 1024, 64 * GiB, " bytes"),
    "handshake_timeout_ms": _between(1, 3_600_000, " (ms)"),
    "frame_timeout_ms": _between(1, 3_600_000, " (ms)"),
    "max_files": _positive,
    "max_pieces": _positive,
    "max_partial_pieces": _positive,
    "max_piece_length": lambda v: None if v >= 16 * 1024 else "must be at least 16384",
    "log_level": _choice("debug", "info", "warning", "error"),
}

# PIECED_* variables that are not settings: the config file's path, and pieced-peer's log
# level (one environment may run the daemon and pieced-peer alike).
_NOT_SETTINGS = ("PIECED_CONFIG", "PIECED_PEER_LOG")

_TYPES: dict[str, Any] = get_type_hints(Settings)
_OCTAL = frozenset({"socket_mode"})


def _coerce(key: str, value: Any, source: str, *, text: bool = True) -> Any:
    """``text``: a string is text to read as the key's type (the environment, flags).
    A TOML file has types of its own: there a value must already be of the key's type,
    so that ``http_port = "0"`` or ``roots = "/srv"`` is refused, not read as something
    the file did not say."""
    typ = _TYPES[key]
    if not text:
        value = _toml_value(key, value, typ, source)
    if isinstance(value, str) and typ is not str:
        value = _parse_text(key, value, typ, source)
    if typ in (list[int], list[str]):
        inner = int if typ == list[int] else str
        if not isinstance(value, list) or not all(isinstance(x, inner) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{source}: '{key}' must be a list of {inner.__name__}")
        return list(value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false")
        return value
    if typ is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{source}: '{key}' must be an integer, not {value!r}")
    if typ is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a number, not {value!r}")
        value = float(value)
    if typ is str and not isinstance(value, str):
        raise ConfigError(f"{source}: '{key}' must be a string, not {value!r}")
    check = CHECKS.get(key)
    problem = check(value) if check else None
    if problem:
        shown = "(not shown)" if key in SECRET else repr(value)  # logs keep what they get
        raise ConfigError(f"{source}: '{key}' = {shown} {problem}")
    return value


_TOML_EXPECTED: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list[int]: "a list of int",
    list[str]: "a list of str",
}


def _is_toml(value: Any, typ: Any) -> bool:
    """Whether a TOML value is of the key's type. A float takes an integer too (TOML
    writes 1 for 1.0); nothing else takes a boolean, nor a string."""
    if typ is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if typ is float:
        return isinstance(value, (int, float))
    if typ in (list[int], list[str]):
        inner = int if typ == list[int] else str
        return isinstance(value, list) and all(
            isinstance(x, inner) and not isinstance(x, bool) for x in value)
    return isinstance(value, typ)


def _toml_value(key: str, value: Any, typ: Any, source: str) -> Any:
    """A value from the TOML file as the key's type, or a message naming the key, the
    file, the type expected and the one given. The one exception is a file mode, which
    may also be written as octal text ("0660"): as TOML, 660 would be decimal."""
    if key in _OCTAL and isinstance(value, str):
        return value
    if not _is_toml(value, typ):
        raise ConfigError(f"{source}: '{key}' must be {_TOML_EXPECTED[typ]}, "
                          f"not {_toml_shown(key, value)}")
    return float(value) if typ is float else value


def _toml_shown(key: str, value: Any) -> str:
    """A TOML value with its type: ``the string '0'`` says why 0 was refused."""
    if isinstance(value, bool):
        kind = "the boolean"
        shown = "true" if value else "false"
    elif isinstance(value, int):
        kind, shown = "the integer", repr(value)
    elif isinstance(value, float):
        kind, shown = "the float", repr(value)
    elif isinstance(value, str):
        kind, shown = "the string", repr(value)
    elif isinstance(value, list):
        kind, shown = "the array", repr(value)
    elif isinstance(value, dict):
        kind, shown = "a table", ""
    else:  # tomllib's dates and times
        kind, shown = "the date-time", value.isoformat()
    if key in SECRET and shown:
        shown = "(not shown)"
    return f"{kind} {shown}".rstrip()


def _parse_text(key: str, text: str, typ: Any, source: str) -> Any:
    """Environment variables and flags are text: read them as TOML values would be."""
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: '{key}' must be true or false, not {text!r}")
    if typ is int:
        try:
            if key in _OCTAL:  # file modes are octal however they are written: 660, 0660, 0o660
                return int(text.lower().removeprefix("0o"), 8)
            return int(text, 0)
        except ValueError:
            kind = "an octal file mode such as 0660" if key in _OCTAL else "an integer"
            raise ConfigError(f"{source}: '{key}' must be {kind}, not {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{source}: '{key}' must be a number, not {text!r}") from None
    if typ == list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{source}: '{key}' must be integers separated by commas") from None
    if typ == list[str]:
        return [x for x in text.split(":") if x]
    return text


# The settings that bound a .torrent, and ``parse``'s names for them.
METAINFO_LIMITS = {"max_metainfo_bytes": "max_bytes", "max_files": "max_files",
                   "max_pieces": "max_pieces", "max_piece_length": "max_piece_length"}


def metainfo_limits(path: Path | None) -> dict[str, int]:
    """The daemon's limits on a .torrent, for a tool that reads .torrents alone
    (``pieced verify``): from the config file, and from the environment the PIECED_*
    variables of these settings only (one of the daemon's others, that the tool has
    no use for, refused it: PIECED_HTTP_HOST without its token)."""
    names = {"PIECED_" + key.upper() for key in METAINFO_LIMITS}
    env = {name: value for name, value in os.environ.items() if name in names}
    return load(path, env, serving=False).metainfo_limits()


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    serving: bool = True,
) -> Settings:
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path}: not UTF-8 text") from None
        except OSError as exc:  # a folder, a file the daemon's user may not read...
            raise ConfigError(f"config file {path}: cannot read it: "
                              f"{exc.strerror or exc}") from None
        for key, value in data.items():
            if key not in _TYPES:
                raise ConfigError(f"{path}: unknown key '{key}'")
            values[key] = _coerce(key, value, str(path), text=False)
    env = os.environ if env is None else env
    for name, value in env.items():
        if not name.startswith("PIECED_") or name in _NOT_SETTINGS:
            continue
        key = name[len("PIECED_"):].lower()
        if key not in _TYPES:
            raise ConfigError(f"environment: unknown setting {name}")
        values[key] = _coerce(key, value, f"environment {name}")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _TYPES:
            raise ConfigError(f"command line: unknown setting '{key}'")
        values[key] = _coerce(key, value, "command line")
    settings = Settings(**values)
    problem = exposure_problem(settings) if serving else None
    if problem:
        raise ConfigError(problem)
    return settings


def exposure_problem(settings: Settings) -> str | None:
    """The HTTP server shows every torrent's name, files and errors: anywhere but on
    loopback it answers only requests that carry the token."""
    if settings.http_token or is_loopback(settings.http_host):
        return None
    return (f"http_host = {settings.http_host!r} is not a loopback address and http_token is "
            "not set: anyone who can reach that address would see every torrent. Set "
            "http_token (in the config file or PIECED_HTTP_TOKEN) or keep http_host = "
            "\"127.0.0.1\"")
