#!/usr/bin/env python3
"""After a SIGKILL, does the daemon still know every piece it announced, and only good ones?

Prints one JSON object on stdout (progress goes to stderr). For each of ``--kinds``
(``v1``, ``hybrid``) it makes a torrent with libtorrent of a small multi-file payload with
odd sizes (``PAYLOAD``, about 4 MiB, generated with ``tests.realtools.make_payload`` into
``--workdir`` and reused while its files and seed match; ``--piece-length`` 16-64 KiB)
and runs ``--rounds`` rounds against a real daemon: ``python -m pieced.daemon.cli run
--http-port 0`` as a subprocess whose cwd is a folder of its own (socket, state and save
path all live under it; it is emptied when the kind starts). One round:

1. start the daemon, wait for its "listening" line, connect a ``Client``;
2. round 0 registers the torrent. Later rounds find it registered and first of all check
   what the previous SIGKILL left: the first ``status`` after the restart (nothing else
   is asked of the daemon before it), and the bytes on disk of every piece it reports
   verified; then they subscribe to the torrent's events;
3. when every piece is verified, unregister with ``delete_files`` and register again, so
   that every round has something to write;
4. write every block of the pieces that are not verified, shuffled, each one either inline
   (``write_chunk``) or through a shared ring (``write_block_direct``), at random. Blocks
   are 16 KiB from the start of their piece, as a peer sends them: pad bytes (hybrid) are
   sent as zeros, a block that is all pad is not sent. At most ``--window`` writes are in
   flight (32: the client keeps close to the daemon, as a peer's pace would keep it).
   ``piece_verified`` events go to a set; a ``stats()`` call every few blocks lets them
   arrive;
5. a timer with a random delay (up to ``--max-kill-delay-ms``, 20: a whole download of
   the payload takes about 50 ms here) SIGKILLs the daemon while the writes go on. It is
   armed, in even rounds (from 0), after a random number of the blocks is sent; in odd,
   when a random number of the pieces has been announced (so that the kill finds pieces
   announced and more on their way, however long the daemon takes to announce one), or
   1 s after the last block if that never happens. Once every block is sent, ``stats()``
   calls go on until the kill lands, so some kills find the daemon idle. What the daemon
   sent before it died and is still in the socket (events included) is read after the
   kill.

One more start after the last round checks the last kill, then stops the daemon with
SIGTERM (it must exit 0). So every round ends in exactly one SIGKILL.

Reported per kill (``per_kill`` in the JSON, with the first 20 pieces forgotten or wrong):

``announced``
    pieces whose ``piece_verified`` event the client received in the round (before the
    kill, or read from the socket after it: the daemon sent them while it was alive);
``verified_after_restart``
    pieces with their ``have`` bit set in the first ``status`` after the restart;
``forgotten``
    pieces announced since the torrent was last registered (in this round or an earlier
    one) that are not verified after the restart; the goal is 0;
``wrong``
    pieces verified after the restart whose bytes on disk differ from the payload (read
    by this script, files located with libtorrent's view of the torrent); must be 0;
``failed``
    ``piece_failed`` events in the round: pieces whose blocks the daemon hashed to
    something else than the torrent's hashes. Reported, not judged here (0 expected: the
    blocks sent are the payload's; with ``--power-cut``, pieces whose sync failed after
    the cut are told failed too);
``reverifying_pieces``
    the first status's count of pieces being re-verified (a restart that found files
    changed since its state was saved); ``restarts_reverifying`` counts the kills where
    it was not 0.

The summary has the totals per kind, the most pieces forgotten by one kill, the total of
wrong pieces, the number of rounds and the seconds taken; the exit status is 1 when a
piece was forgotten or wrong. The daemon uses its default
``sync_window_ms`` (see ``config/settings.py``) unless ``--sync-window-ms`` is given,
which is passed as ``PIECED_SYNC_WINDOW_MS`` (a value of that variable in this script's
environment reaches the daemon too). Every round is bounded: the daemon's start, every
call on the socket (``--timeout``) and the kill timer.

``tests/test_crash.py`` runs the same rounds (it imports ``prepare_torrent``,
``crash_rounds`` and ``summarise`` from here) and asserts that nothing is forgotten or
wrong.

    .venv/bin/python bench/crash.py                      # 100 rounds of v1 and of hybrid
    .venv/bin/python bench/crash.py --rounds 10 --kinds hybrid --sync-window-ms 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import libtorrent as lt  # noqa: E402
from pieced.config.settings import Settings  # noqa: E402
from pieced.protocol.client import Client  # noqa: E402
from pieced.storage.errors import PiecedError  # noqa: E402

from bench.daemon_proc import DaemonProcess  # noqa: E402
from tests.realtools import TorrentKind, cached_torrent_lt, make_payload  # noqa: E402

MiB = 1 << 20
BLOCK = 16384
#: The payload: a few files of odd sizes (an empty one, a one-byte one, nested folders).
PAYLOAD: dict[str, int] = {
    "a.bin": 1_234_567,
    "b/c.bin": 777_777,
    "b/d/e.bin": 65_537,
    "empty": 0,
    "f.dat": 2_000_003,
    "g": 1,
}
SEED = 11
#: The shared ring's size: odd, so that blocks now and then wrap around its end.
RING_BYTES = MiB + 12_345
#: Writes in flight: the client stays this close to the daemon, as a peer's pace would
#: keep it, so that the block after which the kill is armed says where the daemon is.
WINDOW = 32
#: The kill lands up to this long after its trigger (a whole download takes ~50 ms here).
MAX_KILL_DELAY = 0.02
#: Seconds after the last block when a kill waiting for an announcement that never
#: comes (pieces that fail their hash check) is armed anyway.
KILL_FALLBACK = 1.0
#: (piece, begin, length) of a block.
BlockRef = tuple[int, int, int]
Progress = Callable[[str], None]
#: ``ioctl(EXT4_IOC_SHUTDOWN)`` (``_IOR('X', 125, __u32)``) with NOLOGFLUSH: the file
#: system stops at once, and what was not durable yet (data not synced, the journal not
#: committed) never reaches the disk.
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


class Ext4Image:
    """An ext4 file system in an image file, on a loop device (root only), whose power
    can be cut: :meth:`cut` drops everything not yet durable at once, as a power loss
    does (a daemon killed by SIGKILL alone leaves its unsynced writes to the kernel,
    which writes them all the same); :meth:`restore` mounts it again, its journal
    replayed as at the next boot."""

    def __init__(self, image: Path, mount: Path, size_mib: int = 256,
                 options: str = "") -> None:
        """``options``: mount options beside ``loop`` (``commit=60`` keeps what only the
        file system's journal commit makes durable undone for a minute)."""
        import subprocess

        self.image, self.mount, self.options = image, mount, options
        mount.mkdir(parents=True, exist_ok=True)
        try:
            with open(image, "wb") as f:
                f.truncate(size_mib * MiB)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True,
                           capture_output=True)
            self._mount()
        except BaseException:
            image.unlink(missing_ok=True)
            raise

    def _mount(self) -> None:
        import subprocess

        options = ",".join(o for o in ("loop", self.options) if o)
        subprocess.run(["mount", "-o", options, str(self.image), str(self.mount)], check=True)

    def cut(self) -> None:
        import fcntl
        import struct

        fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)

    def restore(self, timeout: float = 30.0) -> None:
        """Unmount (once the processes that used it are gone) and mount again. Never a
        lazy unmount: the same file system mounted twice would be damaged."""
        import subprocess

        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["umount", str(self.mount)], capture_output=True, text=True)
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot unmount {self.mount}: {r.stderr.strip()}")
            time.sleep(0.05)
        self._mount()

    def close(self) -> None:
        import subprocess

        subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)


def log(msg: str) -> None:
    print(f"[crash] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the torrent


@dataclass(frozen=True)
class CrashTorrent:
    """A torrent and its payload in piece space (pads as zeros), as libtorrent lays it out."""

    kind: str
    raw: bytes
    piece_length: int
    num_pieces: int
    #: (path under the save path, offset in piece space, length) of every stored file.
    files: tuple[tuple[str, int, int], ...]
    space: bytes
    blocks: tuple[BlockRef, ...]

    def piece_size(self, piece: int) -> int:
        return min(self.piece_length, len(self.space) - piece * self.piece_length)

    def block(self, piece: int, begin: int, length: int) -> memoryview:
        start = piece * self.piece_length + begin
        return memoryview(self.space)[start : start + length]

    def wrong_pieces(self, save: Path, pieces: Iterable[int]) -> list[int]:
        """Those of ``pieces`` whose bytes under ``save`` are not the payload's.

        A missing or short file reads as zeros there, which the payload's pseudo-random
        bytes never are.
        """
        disk = bytearray(len(self.space))
        for rel, offset, length in self.files:
            with contextlib.suppress(FileNotFoundError), (save / rel).open("rb") as fh:
                data = fh.read(length)
                disk[offset : offset + len(data)] = data
        out = []
        for p in sorted(pieces):
            lo = p * self.piece_length
            hi = lo + self.piece_size(p)
            if disk[lo:hi] != self.space[lo:hi]:
                out.append(p)
        return out


def prepare_payload(workdir: Path, spec: dict[str, int] = PAYLOAD, seed: int = SEED) -> Path:
    """Generate (or reuse, if ``manifest.json`` matches) the payload; return its folder."""
    manifest = workdir / "manifest.json"
    want = {"files": spec, "seed": seed, "generator": "tests.realtools.make_payload"}
    content = workdir / "data" / "payload"
    if content.is_dir() and manifest.exists() and json.loads(manifest.read_text()) == want:
        return content
    shutil.rmtree(workdir / "data", ignore_errors=True)
    shutil.rmtree(workdir / "torrents", ignore_errors=True)
    manifest.unlink(missing_ok=True)
    content = make_payload(workdir / "data", spec, seed=seed)
    manifest.write_text(json.dumps(want, indent=1))
    return content


def prepare_torrent(workdir: Path, kind: TorrentKind, piece_length: int,
                    spec: dict[str, int] = PAYLOAD, seed: int = SEED) -> CrashTorrent:
    """The payload (made once under ``workdir``) and its ``kind`` torrent, by libtorrent."""
    workdir.mkdir(parents=True, exist_ok=True)
    content = prepare_payload(workdir, spec, seed)
    raw = cached_torrent_lt(workdir, content, piece_length, kind).read_bytes()
    ti = lt.torrent_info(raw)
    fs = ti.layout()
    space = bytearray(fs.total_size())
    files: list[tuple[str, int, int]] = []
    for i in range(fs.num_files()):
        if fs.file_flags(i) & lt.file_storage.flag_pad_file:
            continue
        rel, offset, length = fs.file_path(i), fs.file_offset(i), fs.file_size(i)
        data = (content.parent / rel).read_bytes()
        if len(data) != length:
            raise RuntimeError(f"{rel}: {len(data)} bytes, the torrent says {length}")
        space[offset : offset + length] = data
        files.append((rel, offset, length))
    plen, num = ti.piece_length(), ti.num_pieces()
    stored = [(o, o + n) for _, o, n in files if n]
    blocks: list[BlockRef] = []
    for p in range(num):
        size = min(plen, len(space) - p * plen)
        for b in range(0, size, BLOCK):
            lo, hi = p * plen + b, p * plen + min(b + BLOCK, size)
            if any(s < hi and lo < e for s, e in stored):
                blocks.append((p, b, hi - lo))
    if {p for p, _, _ in blocks} != set(range(num)):
        raise RuntimeError(f"{kind}: a piece with no stored byte: nothing to send for it")
    return CrashTorrent(kind, raw, plen, num, tuple(files), bytes(space), tuple(blocks))


# --------------------------------------------------------------------------- the daemon


class Daemon(DaemonProcess):
    """``pieced run --http-port 0`` with ``folder`` as its cwd: default socket, state and
    roots are all under it; one log over every start."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        super().__init__(folder, [sys.executable, "-m", "pieced.daemon.cli", "run",
                                  "--http-port", "0"], env, append_log=True)
        self.socket = folder / "var" / "pieced.sock"


class CrashClient(Client):
    """The blocking client, plus what a client of a daemon that was just killed needs."""

    def drain(self) -> None:
        """Process whatever the dead daemon sent before it died, to the end of the stream."""
        with contextlib.suppress(OSError):  # ConnectionError: end of the stream
            while True:
                self._pump()

    def abandon(self) -> None:
        """Close without waiting for writes in flight: nobody will ever answer them."""
        self.sock.close()
        if self.core.shm is not None:
            self.core.shm.close()
            self.core.shm = None


@dataclass
class Events:
    """The ``piece_verified`` and ``piece_failed`` events of one round."""

    verified: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    last_at: float = 0.0  # time.monotonic() when the last piece_verified was processed
    _at: int = field(default=0, init=False)
    _then: Callable[[], None] | None = field(default=None, init=False)

    def call_at(self, count: int, then: Callable[[], None] | None) -> None:
        """Call ``then`` once ``count`` pieces are announced (None: never)."""
        self._at, self._then = count, then

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "piece_verified":
            self.verified.add(int(fields["piece"]))
            self.last_at = time.monotonic()
            if self._then is not None and len(self.verified) >= self._at:
                then, self._then = self._then, None
                then()
        elif name == "piece_failed":
            self.failed.add(int(fields["piece"]))


# --------------------------------------------------------------------------- rounds


def have_set(status: dict[str, Any], num_pieces: int) -> set[int]:
    have = status["have"]
    return {p for p in range(num_pieces) if have[p >> 3] & (0x80 >> (p & 7))}


def check_restart(c: Client, ih: bytes, t: CrashTorrent, save: Path,
                  announced: set[int]) -> tuple[dict[str, Any], set[int]]:
    """The state a kill left, from the first ``status`` after the restart; and the bits."""
    st = c.status(ih)
    have = have_set(st, t.num_pieces)
    wrong = t.wrong_pieces(save, have)
    forgotten = sorted(announced - have)
    return {
        "verified_after_restart": len(have),
        "complete_after_restart": len(have) == t.num_pieces,
        "forgotten": len(forgotten),
        "wrong": len(wrong),
        "reverifying_pieces": int(st["reverifying_pieces"]),
        "forgotten_pieces": forgotten[:20],
        "wrong_pieces": wrong[:20],
    }, have


def write_until_killed(c: CrashClient, daemon: Daemon, ih: bytes, t: CrashTorrent,
                       todo: list[BlockRef], events: Events, rng: random.Random,
                       max_kill_delay: float, by_announcement: bool,
                       power: Ext4Image | None = None) -> dict[str, Any]:
    """Send ``todo`` (both transports at random) until a timer SIGKILLs the daemon; then
    read what it sent before it died.

    The timer (a random delay up to ``max_kill_delay``) is armed after a random number of
    blocks is sent or, ``by_announcement``, when a random number of pieces has been
    announced; if that never happens, ``KILL_FALLBACK`` seconds after the last block.
    With ``power``, the timer cuts its power first (see :class:`Ext4Image`): the pieces
    announced by then are the ones promised (``promised`` in the result; an fdatasync
    can still return for a few milliseconds after the cut, the kernel's doing, and what
    it announces then may be lost, as nothing sent after a real power loss is seen).
    """
    pieces = len({p for p, _, _ in todo})
    trigger = rng.randint(1, pieces if by_announcement else len(todo))
    delay = rng.uniform(0.0, max_kill_delay)
    pump_every = rng.randint(4, 32)
    seen_at_kill = [0]
    killed_at = [0.0]
    promised: set[int] = set()
    cut = threading.Event()  # the power is cut: the daemon's answers are errors until it dies
    died_first: list[int] = []

    def kill() -> None:
        assert daemon.proc is not None
        rc = daemon.proc.poll()
        if rc is not None:
            died_first.append(rc)
        seen_at_kill[0] = len(events.verified)
        killed_at[0] = time.monotonic()
        if power is not None:
            promised.update(events.verified.copy())  # (a copy: taken at once, whole)
            cut.set()  # (first: the daemon's first error may come before cut() returns)
            power.cut()
        daemon.kill()

    timer = threading.Timer(delay, kill)

    def arm() -> None:
        if timer.ident is None:
            timer.start()

    if by_announcement:
        events.call_at(trigger, arm)
    sent = 0
    fallback = False
    t0 = time.monotonic()
    try:
        for p, b, n in todo:
            data = t.block(p, b, n)
            if rng.random() < 0.5:
                c.write_block_direct(ih, p, b, data)
            else:
                c.write_chunk(ih, p, b, data)
            sent += 1
            if sent == trigger and not by_announcement:
                arm()
            if sent % pump_every == 0:
                c.stats()
        last_block = time.monotonic()
        while True:  # everything sent: let events arrive until the kill lands
            c.stats()
            if timer.ident is None and time.monotonic() - last_block > KILL_FALLBACK:
                fallback = True
                arm()
            time.sleep(0.001)
    except TimeoutError:
        timer.cancel()
        daemon.kill()
        raise RuntimeError(f"the daemon stopped answering for {c.timeout}s\n"
                           f"{daemon.log_tail()}") from None
    except PiecedError:
        if not cut.is_set():
            timer.cancel()
            daemon.kill()
            raise
    except OSError as exc:  # the kill, or the daemon died by itself (see died_first)
        if timer.ident is None:  # not armed yet: it was not the kill
            daemon.kill()
            raise RuntimeError(f"the connection failed before the kill: {exc!r}\n"
                               f"{daemon.log_tail()}") from None
    finally:
        events.call_at(0, None)
    timer.join()
    if died_first:
        raise RuntimeError(f"the daemon died by itself (exit {died_first[0]}) before the "
                           f"kill\n{daemon.log_tail()}")
    c.drain()
    c.abandon()
    return {
        "blocks_to_write": len(todo),
        "pieces_to_write": pieces,
        "kill_trigger": ("announcement " if by_announcement else "block ") + str(trigger),
        "kill_fallback": fallback,
        "kill_delay_ms": round(delay * 1000, 2),
        "blocks_sent": sent,
        "announced": len(events.verified),
        "announced_read_after_kill": len(events.verified) - seen_at_kill[0],
        "failed": len(events.failed),
        "failed_pieces": sorted(events.failed)[:20],
        "promised": sorted(promised if power is not None else events.verified),
        "killed_after_ms": round((killed_at[0] - t0) * 1000, 1),
        "last_announcement_after_ms": round((events.last_at - t0) * 1000, 1)
        if events.verified else None,
    }


def crash_rounds(t: CrashTorrent, folder: Path, rounds: int, *, seed: int = 1,
                 sync_window_ms: int | None = None, max_kill_delay: float = MAX_KILL_DELAY,
                 window: int = WINDOW, timeout: float = 30.0,
                 progress: Progress = log, power: Ext4Image | None = None,
                 ) -> list[dict[str, Any]]:
    """``rounds`` rounds of start, check, write, SIGKILL (see the module's docstring) in
    a fresh ``folder``, plus the start that checks the last kill; one record per kill.
    With ``power`` (``folder`` on its file system), each kill is a power cut: the file
    system drops what is not durable, and is mounted again before the next start."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = dict(os.environ)
    if sync_window_ms is not None:
        env["PIECED_SYNC_WINDOW_MS"] = str(sync_window_ms)
    rng = random.Random(seed)
    save = folder / "save"
    ih = b""
    announced: set[int] = set()  # since the torrent was last registered
    kills: list[dict[str, Any]] = []
    pending: dict[str, Any] = {}
    for r in range(rounds + 1):
        started = time.monotonic()
        daemon = Daemon(folder, env)
        daemon.start(timeout)
        events = Events()
        try:
            c = CrashClient(daemon.socket, on_event=events, timeout=timeout, window=window)
            try:
                have: set[int] = set()
                if r == 0:
                    ih = c.register(t.raw, save)
                else:
                    state, have = check_restart(c, ih, t, save, announced)
                    pending.update(state)
                    kills.append(pending)
                    progress(
                        f"{t.kind} kill {r}/{rounds}: sent {pending['blocks_sent']}/"
                        f"{pending['blocks_to_write']} blocks, announced "
                        f"{pending['announced']}, verified after restart "
                        f"{state['verified_after_restart']}/{t.num_pieces}, forgotten "
                        f"{state['forgotten']}, wrong {state['wrong']}, reverifying "
                        f"{state['reverifying_pieces']}")
                    c.subscribe(ih)
                if r == rounds:
                    c.close()
                    daemon.stop(timeout)
                    break
                if len(have) == t.num_pieces:  # complete: start over
                    c.unregister(ih, delete_files=True)
                    ih = c.register(t.raw, save)
                    announced.clear()
                    have = set()
                todo = [blk for blk in t.blocks if blk[0] not in have]
                rng.shuffle(todo)
                c.attach_ring(RING_BYTES)
                pending = {"kill": r + 1, **write_until_killed(
                    c, daemon, ih, t, todo, events, rng, max_kill_delay,
                    by_announcement=r % 2 == 1, power=power)}
            except BaseException:
                c.abandon()
                raise
        except BaseException:
            daemon.kill()
            raise
        promised = pending.pop("promised")
        announced.update(promised)
        pending["promised"] = len(promised)
        pending["round_seconds"] = round(time.monotonic() - started, 3)
        if power is not None:
            power.restore()
    return kills


def summarise(kills: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the kills of one kind."""
    keys = ("blocks_sent", "announced", "announced_read_after_kill", "promised",
            "verified_after_restart", "forgotten", "wrong", "failed")
    out: dict[str, Any] = {"kills": len(kills)}
    out.update({k: sum(x[k] for x in kills) for k in keys})
    out["max_forgotten"] = max((x["forgotten"] for x in kills), default=0)
    out["kills_with_forgotten"] = sum(1 for x in kills if x["forgotten"])
    out["kills_after_announcements"] = sum(1 for x in kills if x["announced"])
    out["restarts_reverifying"] = sum(1 for x in kills if x["reverifying_pieces"])
    out["downloads_completed"] = sum(1 for x in kills if x["complete_after_restart"])
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=100, help="SIGKILLs per kind (default 100)")
    ap.add_argument("--kinds", default="v1,hybrid", help="comma-separated: v1, hybrid")
    ap.add_argument("--piece-length", type=int, default=32768, choices=(16384, 32768, 65536))
    ap.add_argument("--sync-window-ms", type=int, default=None,
                    help="the daemon's sync_window_ms (default: the daemon's own default)")
    ap.add_argument("--max-kill-delay-ms", type=float, default=MAX_KILL_DELAY * 1000,
                    help="the kill lands up to this long after its block (default "
                    f"{MAX_KILL_DELAY * 1000:g})")
    ap.add_argument("--window", type=int, default=WINDOW,
                    help=f"the client's writes in flight (default {WINDOW})")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds for the daemon to start and for each call (default 30)")
    ap.add_argument("--seed", type=int, default=1, help="of the rounds' random choices")
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "crash")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' folders")
    ap.add_argument("--power-cut", action="store_true",
                    help="cut the power instead of a bare SIGKILL: the rounds run on an ext4 "
                    "image loop-mounted in the workdir (root only), whose unsynced writes "
                    "each kill drops (see Ext4Image)")
    args = ap.parse_args()
    # A SIGTERM ends the run as Ctrl-C does, through the cleanups (an image left mounted
    # otherwise, maybe shut down).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in ("v1", "hybrid") for k in kinds):
        raise SystemExit("--kinds takes v1 and/or hybrid")
    if args.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    workdir = args.workdir.resolve()
    if args.sync_window_ms is not None:
        window, window_from = args.sync_window_ms, "--sync-window-ms"
    elif "PIECED_SYNC_WINDOW_MS" in os.environ:
        window, window_from = int(os.environ["PIECED_SYNC_WINDOW_MS"], 0), "environment"
    else:
        window, window_from = Settings().sync_window_ms, "daemon default"
    log(f"{args.rounds} rounds of {', '.join(kinds)}, sync window {window} ms "
        f"({window_from}), work in {workdir}")

    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    for i, kind in enumerate(kinds):
        t = prepare_torrent(workdir, cast(TorrentKind, kind), args.piece_length)
        log(f"{kind}: {t.num_pieces} pieces of {t.piece_length // 1024} KiB, "
            f"{len(t.blocks)} blocks, {len(t.space)} bytes of piece space")
        folder = workdir / "runs" / kind
        power = None
        if args.power_cut:
            folder.mkdir(parents=True, exist_ok=True)
            power = Ext4Image(workdir / f"{kind}.ext4", folder)
            folder = folder / "run"
        t0 = time.perf_counter()
        try:
            kills = crash_rounds(t, folder, args.rounds, seed=args.seed + 1000 * i,
                                 sync_window_ms=args.sync_window_ms,
                                 max_kill_delay=args.max_kill_delay_ms / 1000,
                                 window=args.window, timeout=args.timeout, power=power)
        finally:
            if power is not None:
                power.close()
                power.image.unlink(missing_ok=True)
        seconds = time.perf_counter() - t0
        if not args.keep:
            shutil.rmtree(workdir / "runs" / kind, ignore_errors=True)
        results[kind] = {
            "pieces": t.num_pieces,
            "blocks": len(t.blocks),
            "piece_space_bytes": len(t.space),
            "seconds": round(seconds, 1),
            "totals": summarise(kills),
            "per_kill": kills,
        }
    elapsed = time.perf_counter() - t_all
    if not args.keep:
        shutil.rmtree(workdir / "runs", ignore_errors=True)

    totals = {k: r["totals"] for k, r in results.items()}
    out = {
        "benchmark": "crash",
        "kinds": kinds,
        "rounds": args.rounds,
        "power_cut": args.power_cut,
        "seconds": round(elapsed, 1),
        "total_forgotten": sum(x["forgotten"] for x in totals.values()),
        "max_forgotten": max(x["max_forgotten"] for x in totals.values()),
        "total_wrong": sum(x["wrong"] for x in totals.values()),
        "total_failed": sum(x["failed"] for x in totals.values()),
        "ok": all(x["forgotten"] == 0 and x["wrong"] == 0 for x in totals.values()),
        "totals": totals,
        "sync_window_ms": window,
        "sync_window_from": window_from,
        "max_kill_delay_ms": args.max_kill_delay_ms,
        "client_window": args.window,
        "piece_length": args.piece_length,
        "block_size": BLOCK,
        "payload_files": PAYLOAD,
        "payload_seed": SEED,
        "seed": args.seed,
        "workdir": str(workdir),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "libtorrent": lt.__version__,
        "platform": platform.platform(),
        "notes": {
            "announced": "piece_verified events received in the round, including those read "
                         "from the socket after the kill (sent while the daemon was alive)",
            "promised": "the announced pieces that must survive the kill: all of them, or "
                        "with --power-cut those received before the cut",
            "forgotten": "pieces announced since the torrent was last registered and not "
                         "verified in the first status after the restart (goal 0)",
            "wrong": "pieces verified in that status whose bytes on disk differ from the "
                     "payload (must be 0)",
            "restarts_reverifying": "kills after which the first status showed "
                                    "reverifying_pieces > 0",
            "downloads_completed": "kills after which every piece was verified (the next "
                                   "round unregisters with delete_files and starts over)",
        },
        "results": results,
    }
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
