"""Soak: one real daemon with a small memory budget, several clients on both transports,
several torrents (v1 and hybrid, made by libtorrent) registered, filled, read, hashed and
unregistered over and over for a bounded time.

What it holds the daemon to: the bytes read back are the bytes written; every piece
verifies, each cycle and at the end (libtorrent agrees); the daemon's peak RSS stays
within its configured budget + 64 MiB; and its open descriptors come back to where they
were after start-up once every client has gone, round after round (no leak of payload
handles, sockets or shared-memory rings).

The run lasts about ``SOAK_SECONDS`` (the environment variable ``SOAK_SECONDS``
overrides it: not ``PIECED_*``, which the daemon would refuse as an unknown setting),
plus the round in progress when the time is up. No assertion depends on timing.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from pieced.protocol.client import Client
from pieced.storage.errors import StorageIOError, UnknownTorrent

from tests.conftest import Daemon, open_fds, proc_bytes
from tests.realtools import TorrentKind, lt_recheck, make_payload, make_torrent_lt
from tests.test_disk import Source

# Popped, not just read: the daemon rejects PIECED_* variables it does not know, and it
# inherits this process's environment.
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "70"))
MiB = 1024 * 1024
BUDGET = 16 * MiB  # cache_bytes: write buffer + piece cache; the payloads are larger
CLIENT_BUFFER = 1 * MiB  # per connection; 5 connections at once
RSS_SLACK = 64 * MiB
MIN_ROUNDS = 3


@dataclass
class Torrent:
    name: str
    raw: bytes
    src: Source
    pieces: list[bytes]  # the piece space, pads as zeros
    blocks: list[tuple[int, int, int]]

    @property
    def v1(self) -> bool:
        return self.src.meta.has_v1

    @property
    def v2(self) -> bool:
        return self.src.meta.has_v2

    def block(self, p: int, b: int, n: int) -> bytes:
        return self.pieces[p][b : b + n]


def _torrent(root: Path, name: str, spec: dict[str, int] | int, piece: int, kind: TorrentKind,
             seed: int) -> Torrent:
    content = make_payload(root / name, spec, seed=seed)
    raw = make_torrent_lt(content, piece, kind)
    src = Source(raw, root / name)
    pieces = [src.read(p, 0, src.layout.piece_size(p)) for p in range(src.meta.num_pieces)]
    return Torrent(name, raw, src, pieces, src.blocks())


@dataclass
class Worker:
    """One client thread: its torrent and how it sends blocks."""

    torrent: Torrent
    transport: str  # "ring", "inline" or "mixed" (both, and now and then flush=True)


def _cycle(sock: Path, w: Worker, k: int, rnd: int, save: Path) -> None:
    """Connect, register, download everything, read it all back, hash, unregister."""
    t = w.torrent
    rng = random.Random(rnd * 100 + k)
    with Client(sock) as c:
        if w.transport != "inline":
            c.attach_ring(1 * MiB + 4096 * k + 123)  # odd size: blocks wrap around the end
        ih = c.register(t.raw, save)
        assert ih == t.src.meta.info_hash
        blocks = list(t.blocks)
        rng.shuffle(blocks)
        for i, (p, b, n) in enumerate(blocks):
            data = t.block(p, b, n)
            if w.transport == "ring" or (w.transport == "mixed" and i % 2):
                c.write_block_direct(ih, p, b, data)
            else:
                c.write_chunk(ih, p, b, data, flush=w.transport == "mixed" and i % 97 == 0)
            if i % 200 == 199:  # reads, status and cache queries while writing
                st = c.status(ih)
                done = [q for q in range(t.src.meta.num_pieces)
                        if st["have"][q >> 3] & (0x80 >> (q & 7))]
                if done:
                    q = rng.choice(done)
                    assert c.read_chunk(ih, q, 0, len(t.pieces[q])) == t.pieces[q]
                assert set(c.cached_pieces(ih)) <= set(range(t.src.meta.num_pieces))
                c.events.clear()
        c.wait_writes()
        c.flush_all()
        st = c.status(ih)
        assert st["verified_pieces"] == t.src.meta.num_pieces, (t.name, st["errors"])
        # the observer's reads of pieces not yet written may have failed with ENOENT
        assert all(e["errno"] == errno.ENOENT for e in st["errors"]), st["errors"]
        n_pieces = t.src.meta.num_pieces
        for p in range(n_pieces):
            size = len(t.pieces[p])
            begin = rng.randrange(size)
            length = rng.randint(1, min(16384, size - begin))
            assert c.read_chunk(ih, p, begin, length, volatile=bool(p % 2)) == \
                t.pieces[p][begin : begin + length]
        for p in rng.sample(range(n_pieces), min(8, n_pieces)):
            assert c.read_piece(ih, p) == t.pieces[p]
            if t.v1:
                assert c.hash_piece(ih, p)
            if t.v2:
                assert c.hash_piece_v2(ih, p)
        assert set(c.cached_pieces(ih)) <= set(range(n_pieces))
        c.unregister(ih, delete_files=rnd % 2 == 1)
        c.events.clear()


def _observe(sock: Path, stop: threading.Event, errors: list[BaseException]) -> None:
    """Another client meanwhile: stats, listings, status and reads of whatever is there.

    The torrents come and go under it, so a torrent being unknown, or its files gone
    (ENOENT) while it is unregistered with its files, is expected; nothing else is."""
    rng = random.Random(7)
    try:
        with Client(sock) as c:
            while not stop.is_set():
                assert c.stats()["budget_bytes"] == BUDGET
                for row in c.torrents():
                    ih = bytes.fromhex(row["info_hash"])
                    try:
                        st = c.status(ih)
                        c.cached_pieces(ih)
                        done = [p for p in range(st["num_pieces"])
                                if st["have"][p >> 3] & (0x80 >> (p & 7))]
                        if done:
                            c.read_chunk(ih, rng.choice(done), 0, 1, volatile=True)
                    except UnknownTorrent:
                        pass
                    except StorageIOError as exc:
                        assert exc.errno == errno.ENOENT, exc  # unregistered with its files
                c.events.clear()
                time.sleep(0.05)
    except BaseException as exc:
        errors.append(exc)


def _settled_fds(pid: int, target: int) -> int:
    """The fd count once closing connections have been reaped (polled, not timed)."""
    end = time.monotonic() + 30
    n = open_fds(pid)
    while n > target and time.monotonic() < end:
        time.sleep(0.05)
        n = open_fds(pid)
    return n


@pytest.mark.slow
def test_soak(tmp_path: Path) -> None:
    src_root = tmp_path / "src"
    torrents = [
        _torrent(src_root, "t0", 6 * MiB + 333, 262144, "v1", 1),
        _torrent(src_root, "t1", {"x/a.bin": 2_500_000, "x/b.bin": 1_000_001, "c.bin": 1_500_000,
                                  "empty": 0}, 65536, "hybrid", 2),
        _torrent(src_root, "t2", 4 * MiB + 1, 131072, "hybrid", 3),
        _torrent(src_root, "t3", {"a": 3_000_000, "b/c": 777_777}, 16384, "v1", 4),
    ]
    workers = [
        Worker(torrents[0], "ring"),
        Worker(torrents[1], "inline"),
        Worker(torrents[2], "mixed"),
        Worker(torrents[3], "inline"),
    ]
    d = Daemon(tmp_path, env={
        "PIECED_CACHE_BYTES": str(BUDGET),
        # each connection's receive ring (max(client_buffer_bytes, max_frame_bytes)) is
        # allocated, and touched, on connect, outside the cache budget: 8 MiB by default
        "PIECED_CLIENT_BUFFER_BYTES": str(CLIENT_BUFFER),
        "PIECED_MAX_FRAME_BYTES": str(CLIENT_BUFFER),
    })
    pid = d.proc.pid
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], proc_bytes(pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    fds_after: list[int] = []
    rss_after: list[int] = []  # between rounds, no client connected
    try:
        baseline = open_fds(pid)
        rss_start = proc_bytes(pid)
        rnd = 0
        kept: list[Path] = []
        while True:
            errors: list[BaseException] = []
            stop = threading.Event()
            saves = [tmp_path / "dl" / f"r{rnd}" / f"w{k}" for k in range(len(workers))]

            def run(k: int, w: Worker, save: Path, rnd: int = rnd,
                    errors: list[BaseException] = errors) -> None:
                try:
                    _cycle(d.socket, w, k, rnd, save)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(k, w, saves[k]))
                       for k, w in enumerate(workers)]
            observer = threading.Thread(target=_observe, args=(d.socket, stop, errors))
            observer.start()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            stop.set()
            observer.join()
            assert not errors, errors
            assert d.proc.poll() is None, d.stderr()
            fds_after.append(_settled_fds(pid, baseline))
            rss_after.append(proc_bytes(pid))
            if rnd % 2 == 1:  # unregistered with delete_files: nothing of them is left
                for k, save in enumerate(saves):
                    files = workers[k].torrent.src.meta.files
                    assert not any(save.joinpath(*f.path).exists() for f in files if f.length), save
            else:
                for old in kept:
                    shutil.rmtree(old)
                kept = saves
            rnd += 1
            if rnd >= MIN_ROUNDS and time.monotonic() - started >= SOAK_SECONDS:
                break

        # every piece verified at the end: the last kept payloads, by libtorrent and by
        # the daemon itself (registered again, rechecked)
        with Client(d.socket) as c:
            for k, save in enumerate(kept):
                t = workers[k].torrent
                assert all(lt_recheck(t.raw, save)), t.name
                ih = c.register(t.raw, save)
                res = c.recheck(ih)
                assert res["failed_v1" if t.v1 else "failed_v2"] == []
                assert c.status(ih)["verified_pieces"] == t.src.meta.num_pieces
                c.unregister(ih)
        fds_after.append(_settled_fds(pid, baseline))
        hwm = proc_bytes(pid, "VmHWM")
    finally:
        sampling.set()
        sampler.join()
        rc = d.stop()
    elapsed = time.monotonic() - started
    between = [r / MiB for r in rss_after]
    print(f"soak: {rnd} rounds in {elapsed:.1f} s; peak RSS sampled {peak[0] / MiB:.1f} MiB, "
          f"VmHWM {hwm / MiB:.1f} MiB (budget {BUDGET / MiB:.0f} MiB, limit "
          f"{(BUDGET + RSS_SLACK) / MiB:.0f} MiB); RSS at start {rss_start / MiB:.1f} MiB, between "
          f"rounds {min(between):.1f}..{max(between):.1f} MiB (last {between[-1]:.1f}); fds at "
          f"start {baseline}, after rounds {sorted(set(fds_after))}, after round 2 "
          f"{fds_after[1]}, at the end {fds_after[-1]}")
    assert rc == 0, d.stderr()
    assert max(peak[0], hwm) <= BUDGET + RSS_SLACK
    # descriptors: back to the start-up count once the clients are gone, and no growth
    # from round to round
    assert fds_after[-1] <= fds_after[1], fds_after
    assert fds_after[-1] == baseline, (baseline, fds_after)
