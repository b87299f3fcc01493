"""Real-world torrent tooling for tests and benchmarks.

pieced must agree with the torrents that real clients make and with the verdicts that a
real client reaches about data on disk. Hand-written fixtures can only ever agree with
our own reading of the BEPs, so this module drives the real tools instead:

* libtorrent (the reference implementation of BEP 52 / BEP 47) makes v1, v2-only and
  hybrid torrents and is the oracle for "which pieces of this data are good";
* mktorrent and transmission-create make v1 torrents the way much of the world does.

It is imported both by the test-suite and by the benchmark scripts in ``bench/`` (which
put the repository root on ``sys.path`` and ``from tests.realtools import ...``), so it
uses only the standard library and libtorrent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import libtorrent as lt

__all__ = [
    "MKTORRENT_MAX_PIECE_LENGTH",
    "MKTORRENT_MIN_PIECE_LENGTH",
    "TRACKER_URL",
    "TorrentKind",
    "cached_torrent_lt",
    "corrupt",
    "lt_recheck",
    "lt_session_settings",
    "make_payload",
    "make_torrent_lt",
    "make_torrent_mktorrent",
    "make_torrent_transmission",
]

TorrentKind = Literal["v1", "v2", "hybrid"]

#: Announce URL written into torrents made by the CLI tools that insist on one. Nothing
#: listens on port 1, and our sessions pause torrents before they would announce anyway.
TRACKER_URL = "http://127.0.0.1:1/announce"

_CHUNK = 1 << 20


# --------------------------------------------------------------------------- payloads


def make_payload(root: Path, spec: dict[str, int] | int, seed: int = 0) -> Path:
    """Write deterministic pseudo-random files under ``root`` and return what to torrent.

    ``spec`` is either an int (one file, ``root/payload.bin``, of that many bytes) or a
    mapping of relative POSIX paths (nested folders allowed: ``"a/b/c.bin"``) to sizes
    (0 allowed), which are written under ``root/payload/``. The return value is the path a
    torrent is made from: the single file, or the top-level folder.

    The bytes are a pure function of ``seed`` and the file's path (SHAKE-128 in counter
    mode, see ``_write_random_file``) so that a failing test, or a benchmark run on
    another machine, sees the very same data (``os.urandom`` would not), and editing one
    entry of ``spec`` does not change the others. A gigabyte takes a few seconds.
    """
    root.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, int):
        target = root / "payload.bin"
        _write_random_file(target, spec, f"{seed}:payload.bin")
        return target
    if not spec:
        raise ValueError("make_payload: spec must name at least one file")
    top = root / "payload"
    top.mkdir(parents=True, exist_ok=True)
    for rel, size in spec.items():
        relpath = Path(rel)
        if relpath.is_absolute() or ".." in relpath.parts:
            raise ValueError(f"make_payload: path must be relative and inside the payload: {rel!r}")
        _write_random_file(top / relpath, size, f"{seed}:{relpath.as_posix()}")
    return top


def _write_random_file(path: Path, size: int, seed: str) -> None:
    """Write ``size`` pseudo-random bytes derived from ``seed`` to ``path``.

    Chunk ``k`` (1 MiB) is ``shake_128(f"{seed}:{k}")``: deterministic, never repeating
    within or across files (so a reader that hashes the wrong offset cannot pass by
    luck), and about twice as fast as ``random.Random.randbytes`` (~0.3 vs ~0.15 GB/s
    here), which matters for the gigabyte benchmark payloads.
    """
    if size < 0:
        raise ValueError(f"make_payload: negative size for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for k, start in enumerate(range(0, size, _CHUNK)):
            n = min(size - start, _CHUNK)
            f.write(hashlib.shake_128(f"{seed}:{k}".encode()).digest(n))


def corrupt(path: Path, offset: int, length: int = 1) -> None:
    """Flip (XOR 0xFF) ``length`` bytes of ``path`` at ``offset``, in place.

    XOR guarantees every touched byte changes (overwriting with a constant might write
    the byte that was already there), so the pieces covering the range must fail.
    """
    if length < 1:
        raise ValueError("corrupt: length must be >= 1")
    size = path.stat().st_size
    if offset < 0 or offset + length > size:
        raise ValueError(
            f"corrupt: range [{offset}, {offset + length}) outside {path} ({size} bytes)"
        )
    with path.open("r+b") as f:
        f.seek(offset)
        data = f.read(length)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# --------------------------------------------------------------------------- makers


def make_torrent_lt(content: Path, piece_length: int, kind: TorrentKind) -> bytes:
    """Make a .torrent for ``content`` (file or folder) with libtorrent; return its bytes.

    ``kind`` picks the metadata version: ``"v1"`` (``create_torrent.v1_only``: no pad
    files, pieces run across file boundaries), ``"v2"`` (``v2_only``: BEP 52 only) or
    ``"hybrid"`` (both; libtorrent inserts BEP 47 pad files so that every file starts on a
    piece boundary, which is what lets the v1 and v2 views share pieces).
    """
    flags = {"v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only, "hybrid": 0}[kind]
    _check_piece_length(piece_length)
    content = content.resolve()
    # list_files + create_torrent(list) is libtorrent 2.1's spelling of the older
    # file_storage + add_files (which still work but warn DeprecationWarning).
    entries = lt.list_files(str(content))
    if not entries:
        raise ValueError(f"make_torrent_lt: no files under {content}")
    ct = lt.create_torrent(entries, piece_length, flags)
    ct.set_creator("pieced tests/realtools.py")
    lt.set_piece_hashes(ct, str(content.parent))
    return bytes(lt.bencode(ct.generate()))


#: mktorrent 1.1 accepts ``-l 15`` to ``-l 28`` only.
MKTORRENT_MIN_PIECE_LENGTH = 1 << 15
MKTORRENT_MAX_PIECE_LENGTH = 1 << 28


def cached_torrent_lt(workdir: Path, content: Path, piece_length: int, kind: TorrentKind) -> Path:
    """The libtorrent-made ``kind`` torrent of ``content``, made once under ``workdir``.

    Benchmarks reuse their (large) payloads between runs; the torrent goes with it.
    """
    path = workdir / "torrents" / f"{kind}-{piece_length}.torrent"
    if not path.exists():
        data = make_torrent_lt(content, piece_length, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path


def make_torrent_mktorrent(content: Path, piece_length: int) -> bytes:
    """Make a v1 .torrent for ``content`` with mktorrent; return its bytes.

    mktorrent (1.1) only takes power-of-two piece lengths, as the exponent (``-l``), and
    only from 2**15 (32 KiB) to 2**28: 16 KiB pieces are refused, so this raises
    ``ValueError`` for them up front. It writes plain v1 torrents: no pad files, pieces
    run across file boundaries, files in the order it walks the folder. ``-d`` leaves out
    the creation date so that the output is a pure function of the input.
    """
    exp = _check_piece_length(piece_length)
    if not MKTORRENT_MIN_PIECE_LENGTH <= piece_length <= MKTORRENT_MAX_PIECE_LENGTH:
        raise ValueError(
            f"mktorrent only makes pieces of 32 KiB to 256 MiB, not {piece_length} bytes"
        )
    exe = _require_tool("mktorrent")
    with tempfile.TemporaryDirectory(prefix="pieced-mktorrent-") as tmp:
        out = Path(tmp) / "out.torrent"
        cmd = [exe, "-d", "-l", str(exp), "-a", TRACKER_URL, "-o", str(out), str(content)]
        _run_tool(cmd)
        return out.read_bytes()


def make_torrent_transmission(content: Path, piece_length: int) -> bytes:
    """Make a v1 .torrent for ``content`` with transmission-create; return its bytes.

    transmission-create (3.00, Debian's transmission-cli) only takes the piece size in
    whole KiB (``-s``). It honours any power of two from 4 KiB up to 1 GiB (we allow
    16 KiB and up, like the other makers) but for anything else (48 KiB, or a size that
    overflows its 32-bit byte count) it exits 0 having used its own default, with only a
    log line on stderr; we therefore verify the ``piece length`` it wrote and
    raise rather than hand back a torrent with a different piece size than asked for.
    It also leaves 0-byte files out of multi-file torrents (mktorrent and libtorrent keep
    them), and for a payload of zero bytes in all it writes nothing yet exits 0; both
    are turned into a ``RuntimeError`` here.
    """
    _check_piece_length(piece_length)
    if piece_length % 1024:
        raise ValueError("transmission-create takes piece sizes in whole KiB only")
    exe = _require_tool("transmission-create")
    with tempfile.TemporaryDirectory(prefix="pieced-transmission-") as tmp:
        out = Path(tmp) / "out.torrent"
        cmd = [
            exe,
            "-s",
            str(piece_length // 1024),
            "-t",
            TRACKER_URL,
            "-o",
            str(out),
            str(content),
        ]
        log = _run_tool(cmd)
        if not out.exists():
            # It exits 0 without writing anything when it cannot hash the input (e.g. a
            # payload of zero bytes: 'error reading "": No such file or directory').
            raise RuntimeError(f"transmission-create wrote no torrent:\n{log}")
        data = out.read_bytes()
    got = lt.torrent_info(data).piece_length()
    if got != piece_length:
        raise RuntimeError(
            f"transmission-create ignored -s {piece_length // 1024} and used {got}-byte pieces"
        )
    return data


def _check_piece_length(piece_length: int) -> int:
    """Validate a BEP 3/52 piece length (power of two, >= 16 KiB); return its log2."""
    if piece_length < 16384 or piece_length & (piece_length - 1):
        raise ValueError(f"piece length must be a power of two >= 16 KiB, got {piece_length}")
    return piece_length.bit_length() - 1


def _require_tool(name: str) -> str:
    """Return the path of executable ``name`` or raise: a missing tool must fail loudly,
    never turn into a skipped (and thus silently unproven) test."""
    exe = shutil.which(name)
    if exe is None:
        raise RuntimeError(
            f"{name} not found on PATH; install it (apt-get install -y mktorrent "
            "transmission-cli, or `make tools`)"
        )
    return exe


TOOL_TIMEOUT = 300.0  # seconds (mktorrent never ends on a tree some 80 folders deep)


def _run_tool(cmd: list[str]) -> str:
    """Run a torrent maker; return its stdout+stderr, raising with them if it fails or
    has not ended within TOOL_TIMEOUT."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          timeout=TOOL_TIMEOUT)
    log = f"{proc.stdout}\n{proc.stderr}"
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log}")
    return log


# --------------------------------------------------------------------------- checking


def lt_session_settings() -> dict[str, Any]:
    """Settings for every libtorrent session this module starts.

    The sessions exist only to hash data on disk, so all network discovery is off and the
    listen socket is on loopback with an ephemeral port (tests run in parallel and in
    sandboxes). Hashing uses every core, and the checking read-ahead is raised so that
    benchmarks measure hashing rather than a queue that is too short.
    """
    cores = os.cpu_count() or 1
    return {
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_tcp": False,
        "enable_outgoing_tcp": False,
        "listen_interfaces": "127.0.0.1:0",
        "announce_to_all_trackers": False,
        "hashing_threads": cores,
        "aio_threads": max(4, cores),
        # In 16 KiB blocks: 64 MiB in flight while checking (default is 4 MiB).
        "checking_mem_usage": 4096,
        "active_checking": 1,
        "alert_mask": lt.alert.category_t.error_notification
        | lt.alert.category_t.status_notification
        | lt.alert.category_t.storage_notification,
    }


def lt_recheck(torrent: bytes, save_path: Path, timeout: float = 120) -> list[bool]:
    """Have a real libtorrent session hash ``save_path`` against ``torrent``.

    Returns one bool per piece: ``True`` where libtorrent found the piece good. Works for
    v1, v2-only and hybrid torrents (for v2 and hybrid libtorrent checks the SHA-256
    merkle leaves against the piece layers as well as, for hybrid, the SHA-1 pieces).

    The torrent is added without resume data, which makes libtorrent check whatever is on
    disk; ``stop_when_ready`` pauses it the moment checking ends, so it never announces or
    connects anywhere. Raises ``TimeoutError`` if checking does not end within ``timeout``
    seconds and ``RuntimeError`` if libtorrent reports an error for the torrent.
    """
    ti = lt.torrent_info(torrent)
    num_pieces = ti.num_pieces()
    params = lt.session_params()
    # The stubs call this a settings_pack; the bindings take (and return) a plain dict.
    params.settings = lt_session_settings()  # type: ignore[assignment]
    ses = lt.session(params)
    try:
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(save_path)
        atp.flags = (
            lt.torrent_flags.stop_when_ready
            | lt.torrent_flags.disable_dht
            | lt.torrent_flags.disable_lsd
            | lt.torrent_flags.disable_pex
        )
        h = ses.add_torrent(atp)
        # torrent_checked_alert is posted whenever checking ends, also when there was
        # nothing on disk to check. (Polling status().state instead would be racy: it is
        # not obvious from the outside whether checking has started yet.)
        deadline = time.monotonic() + timeout
        checked = False
        while not checked:
            left = deadline - time.monotonic()
            if left <= 0:
                st = h.status()
                raise TimeoutError(
                    f"libtorrent still {st.state} ({st.progress:.1%}) after {timeout}s"
                )
            ses.wait_for_alert(int(min(left, 0.5) * 1000) + 1)
            for a in ses.pop_alerts():
                if isinstance(a, lt.torrent_checked_alert):
                    checked = True
                elif isinstance(a, lt.torrent_error_alert | lt.file_error_alert):
                    raise RuntimeError(f"libtorrent: {a.message()}")
        if h.status().errc.value():
            raise RuntimeError(f"libtorrent: {h.status().errc.message()}")
        return [h.have_piece(i) for i in range(num_pieces)]
    finally:
        ses.pause()
        del ses
