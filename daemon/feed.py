"""The status page's live feed: one sampler for every open page.

Twice a second the sampler reads the engine once, on a thread of its own (everything
that grows with the pieces: copying a piece map, comparing it with the last one sent,
counting verified files) and the event loop only hands the result to each page's
Server-Sent Events stream. So ten pages cost one sample, and a torrent of a million
pieces costs the loop nothing but a few writes.

Each page watches at most one torrent (the one it shows). For each watched torrent the
sampler keeps the map it last sent (a *view*) and a sequence number; a page loads the
map once (``map_gz``), then applies the runs that changed, tick after tick. A page that
misses a step (it was slow, or a sample was larger than a whole map) loads the map anew.

Pieces that fail their hash go back to missing at once in the engine; the feed hears of
them through ``DiskIO.on_piece`` and shows them failed for ``FAILED_HOLD`` seconds, or
until they are written again.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import errno
import gzip
import json
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pieced.storage.disk import DiskIO, PieceResult, Torrent
from pieced.storage.errors import PiecedError
from pieced.storage.filetable import PAD
from pieced.storage.torrent import MISSING, file_progress

from .piecemap import composite, diff, encode_runs, runs_size
from .server import Server

log = logging.getLogger("pieced.page")

TICK = 0.5  # seconds between two samples (and two pushes to every page)
HISTORY = 240  # samples kept for the charts: two minutes
FAILED_HOLD = 5.0  # seconds a piece that failed its hash shows as failed
FILES_SHOWN = 1000  # files listed with their progress (a torrent may have a million)
MAX_QUEUED = 16  # pushes waiting for a slow page before it is told to start over
RESYNC = b"event: resync\ndata: {}\n\n"


class Subscriber:
    """One open page: the torrent it watches and the pushes it has not read yet."""

    __slots__ = ("ih", "queue", "wake")

    def __init__(self, ih: bytes | None) -> None:
        self.ih = ih
        self.queue: collections.deque[tuple[int, bytes]] = collections.deque()
        self.wake = asyncio.Event()

    def push(self, tick: int, message: bytes) -> None:
        if len(self.queue) >= MAX_QUEUED:
            # Dropped pushes leave its map behind: it loads everything again instead.
            self.queue.clear()
            message = RESYNC
        self.queue.append((tick, message))
        self.wake.set()

    def take(self, after: int) -> list[bytes]:
        """Pushes of samples taken after ``after`` (older ones are in its hello)."""
        out = [m for t, m in self.queue if t > after]
        self.queue.clear()
        self.wake.clear()
        return out


@dataclass
class _View:
    """The map of a watched torrent as the pages have it, and what else was sent."""

    tid: int
    seq: int
    map: bytearray
    files: str
    errors: str
    gz: tuple[int, bytes] | None = None


@dataclass
class Tick:
    n: int
    common: str  # JSON members every page gets: the sample, the torrents when changed
    parts: dict[bytes, str] = field(default_factory=dict)  # per watched torrent


class Feed:
    def __init__(self, disk: DiskIO, server: Server, interval: float = TICK) -> None:
        self.disk = disk
        self.server = server
        self.interval = interval
        self.executor = ThreadPoolExecutor(1, "pieced-page")
        self.subscribers: set[Subscriber] = set()
        self.closing = asyncio.Event()
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self._task: asyncio.Task[None] | None = None
        # Touched on the page thread only:
        self._tick = 0
        self._views: dict[bytes, _View] = {}
        self._failed: dict[bytes, dict[int, float]] = {}
        self._prev: tuple[float, dict[str, int]] | None = None
        self._torrents_sent = ""
        self._static: dict[int, dict[str, Any]] = {}
        # Filled from worker threads (deque appends are atomic), drained by the sampler.
        self._failures: collections.deque[tuple[bytes, int, float]] = collections.deque(
            maxlen=65536)
        inner = disk.on_piece

        def on_piece(result: PieceResult) -> None:
            if not result.ok:
                self._failures.append((result.info_hash, result.piece, time.monotonic()))
            if inner is not None:
                inner(result)

        disk.on_piece = on_piece

    # -- life cycle (on the loop) -------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Ends every stream (aiohttp waits for open handlers before it stops)."""
        self.closing.set()
        for s in self.subscribers:
            s.wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False)  # a sample in flight ends on its own

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.closing.is_set():
            started = loop.time()
            subs = list(self.subscribers)
            watched = {s.ih for s in subs if s.ih is not None}
            clients = self.client_keys() if subs else []
            try:
                tick = await loop.run_in_executor(
                    self.executor, self._sample, watched, clients, len(self.server.clients),
                    bool(subs))
            except Exception:  # a page must never take the daemon down
                log.exception("status page: sampling failed")
            else:
                self._dispatch(tick)
            await asyncio.sleep(max(0.05, self.interval - (loop.time() - started)))

    def client_keys(self) -> list[frozenset[bytes]]:
        """The torrents each connected client follows (read on the loop, which owns them)."""
        return [frozenset(c.subscriptions) for c in self.server.clients]

    def _dispatch(self, tick: Tick) -> None:
        messages: dict[bytes | None, bytes] = {}
        for s in self.subscribers:
            msg = messages.get(s.ih)
            if msg is None:
                part = tick.parts.get(s.ih, "null") if s.ih is not None else "null"
                body = f'{{"tick":{tick.n},{tick.common},"torrent":{part}}}'
                msg = messages[s.ih] = b"event: tick\ndata: " + body.encode() + b"\n\n"
            s.push(tick.n, msg)

    def key(self, ih: bytes) -> bytes:
        """The torrent's own key for any of its aliases (UnknownTorrent if none)."""
        return self.disk.torrent(ih).key

    # -- on the page thread ---------------------------------------------------------------
    def _sample(self, watched: set[bytes], clients: list[frozenset[bytes]], connected: int,
                live: bool) -> Tick:
        self._tick += 1
        now = time.monotonic()
        sample = self._stats(now, connected)
        self._collect_failures(now)
        members = [f'"stats":{json.dumps(sample)}']
        tick = Tick(self._tick, "")
        if live:
            torrents = json.dumps(self._summaries(clients))
            if torrents != self._torrents_sent:
                self._torrents_sent = torrents
                members.append(f'"torrents":{torrents}')
            for key in watched:
                tick.parts[key] = self._update(key, now)
        else:
            self._torrents_sent = ""
        for key in [k for k in self._views if k not in watched]:
            del self._views[key]
        tick.common = ",".join(members)
        return tick

    def hello(self, key: bytes | None, clients: list[frozenset[bytes]]) -> tuple[int, bytes]:
        """What a page starts from: the charts' history, the torrents, and the watched
        torrent's files and errors as the next pushes will change them."""
        torrent = "null"
        if key is not None:
            try:
                view = self._view(key, time.monotonic())
                files_total = self._static_of(self.disk.torrent(key))["files"]
                torrent = (f'{{"ih":"{key.hex()}","seq":{view.seq},"files":{view.files},'
                           f'"files_total":{files_total},"errors":{view.errors}}}')
            except PiecedError:
                pass
        body = (f'{{"tick":{self._tick},"interval":{self.interval},"hold":{FAILED_HOLD},'
                f'"history":{json.dumps(list(self.history))},'
                f'"torrents":{json.dumps(self._summaries(clients))},"torrent":{torrent}}}')
        return self._tick, body.encode()

    def map_gz(self, key: bytes) -> tuple[int, int, bytes]:
        """(sequence number, pieces, gzip of the map) of a watched torrent's view."""
        view = self._view(key, time.monotonic())
        if view.gz is None or view.gz[0] != view.seq:
            view.gz = (view.seq, gzip.compress(bytes(view.map), compresslevel=1, mtime=0))
        return view.seq, len(view.map), view.gz[1]

    def _view(self, key: bytes, now: float) -> _View:
        t = self.disk.torrent(key)
        view = self._views.get(key)
        if view is None or view.tid != t.id:
            state, m = self._map(t, now)
            view = _View(t.id, 1, m, self._files(t, state), self._errors(t))
            self._views[key] = view
        return view

    def _update(self, key: bytes, now: float) -> str:
        """This tick's news of a watched torrent, as JSON: the runs of its map that
        changed (or "reset": load it again), its files and errors when they changed."""
        try:
            t = self.disk.torrent(key)
        except PiecedError:
            self._views.pop(key, None)
            return f'{{"ih":"{key.hex()}","gone":true}}'
        view = self._views.get(key)
        if view is None or view.tid != t.id:
            view = self._view(key, now)
            return f'{{"ih":"{key.hex()}","from":0,"to":{view.seq},"reset":true}}'
        state, m = self._map(t, now)
        members = [f'"ih":"{key.hex()}"']
        runs = diff(view.map, m)
        if runs:
            members.append(f'"from":{view.seq},"to":{view.seq + 1}')
            view.seq += 1
            if runs_size(runs) > max(4096, len(m) // 8):
                members.append('"reset":true')  # the gzipped map is smaller
            else:
                members.append(f'"runs":"{encode_runs(m, runs)}"')
            view.map = m
            files = self._files(t, state)
            if files != view.files:
                view.files = files
                members.append(f'"files":{files}')
        errors = self._errors(t)
        if errors != view.errors:
            view.errors = errors
            members.append(f'"errors":{errors}')
        return "{" + ",".join(members) + "}"

    def _map(self, t: Torrent, now: float) -> tuple[bytes, bytearray]:
        state = bytes(t.state)  # one copy, taken while the GIL is held: consistent
        failed = self._failed.get(t.key, {})
        for p in [p for p in failed if state[p] != MISSING]:
            del failed[p]  # written again: partial (or further) from now on
        try:
            cached: Iterable[int] = self.disk.cached_pieces(t.key)
        except PiecedError:
            cached = ()
        return state, composite(state, failed, cached)

    def _collect_failures(self, now: float) -> None:
        while self._failures:
            ih, piece, when = self._failures.popleft()
            try:
                key = self.key(ih)
            except PiecedError:
                continue
            self._failed.setdefault(key, {})[piece] = when
        for key in list(self._failed):
            pieces = self._failed[key]
            for p in [p for p, when in pieces.items() if now - when > FAILED_HOLD]:
                del pieces[p]
            if not pieces:
                del self._failed[key]

    def _files(self, t: Torrent, state: bytes) -> str:
        table, plen = t.meta.files, t.meta.piece_length
        out: list[dict[str, Any]] = []
        for i in range(len(table)):
            if table.flags[i] & PAD:
                continue
            if len(out) == FILES_SHOWN:
                break
            start, length = table.offsets[i], table.lengths[i]
            out.append({"i": i, "path": t.storage.display_path(i), "length": length,
                        "done": file_progress(state, plen, start, length)})
        return json.dumps(out)

    @staticmethod
    def _errors(t: Torrent) -> str:
        with t.lock:
            entries = list(t.errors)
        return json.dumps([{**e, "code": errno.errorcode.get(e.get("errno") or -1, "")}
                           for e in entries])

    def _static_of(self, t: Torrent) -> dict[str, Any]:
        """What never changes while the torrent is registered (counted once)."""
        s = self._static.get(t.id)
        if s is None:
            meta = t.meta
            s = self._static[t.id] = {
                "ih": t.key.hex(), "name": meta.name, "size": meta.total_size,
                "pieces": meta.num_pieces, "piece_length": meta.piece_length,
                "files": sum(1 for f in meta.files.flags if not f & PAD),
                "version": "hybrid" if meta.info_hash_v1 and meta.info_hash_v2
                else "v2" if meta.info_hash_v2 else "v1",
            }
        return s

    def _summaries(self, clients: list[frozenset[bytes]]) -> list[dict[str, Any]]:
        """One row per torrent. Its verified count is a popcount of the bitfield (an
        eighth of the map) rather than a count of the states."""
        out = []
        live = set()
        for key in self.disk.torrents():
            try:
                t = self.disk.torrent(key)
            except PiecedError:
                continue
            live.add(t.id)
            aliases = t.meta.aliases
            out.append({
                **self._static_of(t),
                "backend": t.storage.name,
                "verified": int.from_bytes(bytes(t.have), "big").bit_count(),
                "partial": len(t.partial),
                "errors": len(t.errors),
                "clients": sum(1 for c in clients if not c.isdisjoint(aliases)),
            })
        for tid in [tid for tid in self._static if tid not in live]:
            del self._static[tid]
        return out

    def _stats(self, now: float, connected: int) -> dict[str, Any]:
        s = self.disk.stats()
        h = s["latency"]["hash"]
        cur = {k: s[k] for k in ("bytes_written", "bytes_read", "cache_hits", "cache_misses",
                                 "syncs", "pieces_verified", "pieces_failed")}
        cur["hash_n"], cur["hash_us"] = h["count"], h["sum_us"]
        prev, self._prev = self._prev, (now, cur)
        dt = now - prev[0] if prev is not None else 0.0

        def delta(k: str) -> int:
            return cur[k] - prev[1][k] if prev is not None else 0

        def rate(k: str) -> float:
            return round(delta(k) / dt, 1) if dt > 0 else 0.0

        lookups = delta("cache_hits") + delta("cache_misses")
        sample = {
            "t": round(time.time() * 1000),
            "write": rate("bytes_written"),
            "read": rate("bytes_read"),
            "syncs": rate("syncs"),
            "verified": rate("pieces_verified"),
            "failed": delta("pieces_failed"),
            "hash_queue": s["hash_queue_depth"],
            "hash_ms": round(delta("hash_us") / delta("hash_n") / 1000, 3)
            if delta("hash_n") else None,
            "hit_ratio": round(delta("cache_hits") / lookups, 4) if lookups else None,
            "cache_bytes": s["cache_bytes"],
            "buffer_bytes": s["write_buffer_bytes"],
            "budget": s["budget_bytes"],
            "clients": connected,
            "torrents": s["torrents"],
            "backend": s["backend"],
        }
        self.history.append(sample)
        return sample

    # -- hover (on the loop: a bisection, whatever the torrent's size) ----------------------
    def piece_files(self, key: bytes, first: int, last: int, limit: int = 8) -> dict[str, Any]:
        """The files that pieces first..last hold bytes of: at most ``limit`` named."""
        t = self.disk.torrent(key)
        meta = t.meta
        table = meta.files
        first = max(0, min(first, meta.num_pieces - 1))
        last = max(first, min(last, meta.num_pieces - 1))
        start = first * meta.piece_length
        end = min((last + 1) * meta.piece_length, meta.total_size)
        offsets = table.offsets
        lo = max(0, bisect.bisect_right(offsets, start, 0, len(table)) - 1)
        hi = bisect.bisect_left(offsets, end, 0, len(table))  # files starting before end
        named: list[dict[str, Any]] = []
        i = lo
        # (bounded: a range of a million pad and empty files would walk them all)
        while i < hi and len(named) < limit and i - lo < 65536:
            if not table.flags[i] & PAD and table.lengths[i] and offsets[i + 1] > start:
                named.append({"i": i, "path": t.storage.display_path(i),
                              "length": table.lengths[i]})
            i += 1
        rest = range(i, hi)
        if len(rest) <= 4096:  # counted exactly; past that an upper bound (pads included)
            more = sum(1 for k in rest if not table.flags[k] & PAD and table.lengths[k])
        else:
            more = len(rest)
        return {"first": first, "last": last, "files": named, "more": more}
