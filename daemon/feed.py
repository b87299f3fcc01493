"""The status page's live feed: one sampler for every open page.

Twice a second the sampler reads the engine once, on a thread of its own (everything
that grows with the pieces: copying a piece map, comparing it with the last one sent,
counting verified files) and the event loop only hands the result to each page's
Server-Sent Events stream. So ten pages cost one sample, and a torrent of a million
pieces costs the loop nothing but a few writes.

Each page watches at most one torrent (the one it shows). For each watched torrent the
sampler keeps the map it last sent (a *view*) and a sequence number; a page loads the
map once (``map_gz``), then applies the runs that changed, tick after tick. A page that
misses a step (it was slow, or a sample was larger than a whole map) loads the map anew,
as does every page when the torrent is registered anew (unregistered and registered
again between two samples: a new map, new files, new errors). The sequence numbers are
drawn from one counter for every view, so that a torrent's never go back: a page holding
the map of an earlier registration never takes the new one's for what it has already.

The torrent list goes the same way: a page is sent it whole in its hello, then each
tick only the rows that changed (a row is a torrent's progress, errors, clients...) and
the torrents that went, keyed by info hash, in the part of the tick every page shares.
Thousands of torrents, one of them downloading, then cost a tick one row rather than
the whole list, and the page one row to write rather than a table to rebuild. The list
has its own sequence numbers: a change says which version of the list it applies to,
and a page that holds another (it missed a change) connects again, for a hello.

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
import itertools
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
# Ticks kept for the pages (shared by all of them): a page whose write has waited this
# many ticks is let go (it reconnects, and loads everything anew), so that what a page
# that reads nothing holds is one of these ticks, never a copy of its own.
MAX_QUEUED = 16
RESYNC = b"event: resync\ndata: {}\n\n"
SLICE = 16384  # bytes handed to a page's transport at a time (then its drain is awaited)


class Subscriber:
    """One open page: the torrent it watches, the last tick it was sent, and while a
    write to it waits, the tick at which that write began."""

    __slots__ = ("ih", "sent", "transport", "waiting", "wake")

    def __init__(self, ih: bytes | None, transport: asyncio.Transport | None = None) -> None:
        self.ih = ih
        self.sent = 0
        self.wake = asyncio.Event()
        self.waiting: int | None = None  # the first tick of what is being written
        self.transport = transport

    def cut(self) -> None:
        """Let a page go that reads nothing: what its transport holds goes with it."""
        if self.transport is not None:
            self.transport.abort()
        self.wake.set()


@dataclass
class _View:
    """The map of a watched torrent as the pages have it, and what else was sent.
    ``renewed``: made for a new registration of the torrent (by a page's hello or map
    load, or a sample) and not yet announced to the pages that follow it."""

    tid: int
    seq: int
    map: bytearray
    files: str
    errors: str
    gz: tuple[int, bytes] | None = None
    renewed: bool = False


@dataclass
class Tick:
    """One sample as every page is sent it, encoded once and shared by them all: a
    page watching torrent K is sent ``head`` and then ``parts[K]`` (``NO_PART`` if it
    watches none)."""

    n: int
    head: bytes = b""  # the event up to the watched torrent's member
    parts: dict[bytes, bytes] = field(default_factory=dict)  # per watched torrent

    def chunks(self, ih: bytes | None) -> tuple[bytes, bytes]:
        part = self.parts.get(ih, NO_PART) if ih is not None else NO_PART
        return self.head, part


NO_PART = b"null}\n\n"


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
        # The last MAX_QUEUED ticks (on the loop): every page is sent from these.
        self.pushes: collections.deque[Tick] = collections.deque(maxlen=MAX_QUEUED)
        # Touched on the page thread only:
        self._tick = 0
        self._hellos: tuple[int, bytes, dict[bytes, bytes]] = (-1, b"", {})
        self._views: dict[bytes, _View] = {}
        self._seq = itertools.count(1)  # the views' sequence numbers, all of them
        self._failed: dict[bytes, dict[int, float]] = {}
        self._prev: tuple[float, dict[str, int]] | None = None
        # The torrent list as the pages have it, by key: (what the row is made of, its
        # JSON). None while no page is open: the list is then not read at all.
        self._rows: dict[bytes, tuple[tuple[Any, ...], str]] | None = None
        self._list_seq = 0
        self._list_seqs = itertools.count(1)  # never go back: see the module's doc
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
        """Keeps a tick once for every page and wakes them. A page whose write has
        waited MAX_QUEUED ticks is let go: a queue of its own per page, or its wait on
        a tick no longer kept, made memory grow with pages x torrents."""
        self.pushes.append(tick)
        for s in list(self.subscribers):
            if s.waiting is not None and tick.n - s.waiting >= MAX_QUEUED:
                self.subscribers.discard(s)
                s.cut()
            else:
                s.wake.set()

    def latest(self) -> int:
        """The number of the last tick handed to the pages."""
        return self.pushes[-1].n if self.pushes else 0

    def pending(self, sub: Subscriber) -> tuple[int, list[bytes]]:
        """What a page is to be sent next: (the first tick of it, the chunks), the
        ticks after the last it was sent, or word to start over if some of those are
        no longer kept."""
        sub.wake.clear()
        kept = self.pushes
        first = sub.sent + 1
        if not kept or kept[-1].n < first:
            return first, []
        sub.sent = kept[-1].n
        if kept[0].n > first:
            return sub.sent, [RESYNC]  # its map is behind: it loads everything again
        return first, [c for t in kept if t.n >= first for c in t.chunks(sub.ih)]

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
        tick = Tick(self._tick)
        if live:
            try:
                changes = self._list_changes(clients)
                if changes is not None:
                    members.append(f'"list":{changes}')
                for key in watched:
                    tick.parts[key] = self._update(key, now).encode() + b"}\n\n"
            except BaseException:
                # A change of the list half made, or made and never sent: the next tick
                # sends the list whole, which a page takes whatever version it holds.
                self._rows = None
                raise
        else:
            self._rows = None
        for key in [k for k in self._views if k not in watched]:
            del self._views[key]
        tick.head = (f'event: tick\ndata: {{"tick":{tick.n},' + ",".join(members)
                     + ',"torrent":').encode()
        return tick

    def hello(self, key: bytes | None,
              clients: list[frozenset[bytes]]) -> tuple[int, bytes, bytes]:
        """What a page starts from: the charts' history, and the torrent list and the
        watched torrent's files and errors as the next pushes will change them (the
        list as the last tick left it, not as it is now: the next tick's change of it
        is from that). As (tick, head,
        part): the pages that open within one tick share them (a hello is the size of
        the torrent list, and forty pages that read nothing held forty of them)."""
        tick, head, parts = self._hellos
        if tick != self._tick:
            if self._rows is None:  # no page followed the list: it starts from here
                self._list_changes(clients)
            head = (f'retry: 2000\nevent: hello\ndata: {{"tick":{self._tick},'
                    f'"interval":{self.interval},"hold":{FAILED_HOLD},'
                    f'"history":{json.dumps(list(self.history))},'
                    f'"list":{self._whole_list()},"torrent":').encode()
            parts = {}
            self._hellos = (self._tick, head, parts)
        if key is None:
            return self._tick, head, NO_PART
        part = parts.get(key)
        if part is None:
            part = parts[key] = self._hello_torrent(key).encode() + b"}\n\n"
        return self._tick, head, part

    def _hello_torrent(self, key: bytes) -> str:
        try:
            view = self._view(key, time.monotonic())
            files_total = self._static_of(self.disk.torrent(key))["files"]
        except PiecedError:
            return "null"
        return (f'{{"ih":"{key.hex()}","seq":{view.seq},"files":{view.files},'
                f'"files_total":{files_total},"errors":{view.errors}}}')

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
            view = _View(t.id, next(self._seq), m, self._files(t, state), self._errors(t),
                         renewed=view is not None)
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
        if view is None or view.tid != t.id or view.renewed:
            # A new view (a new registration, or a first sample): the pages load its map
            # and take its files and errors whole, as from a hello.
            try:
                view = self._view(key, now)
            except PiecedError:  # unregistered meanwhile
                return f'{{"ih":"{key.hex()}","gone":true}}'
            view.renewed = False
            files_total = self._static_of(t)["files"]
            return (f'{{"ih":"{key.hex()}","from":0,"to":{view.seq},"reset":true,'
                    f'"files":{view.files},"files_total":{files_total},'
                    f'"errors":{view.errors}}}')
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
            entries = [dict(e) for e in t.errors]  # (the last one may still be counting)
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

    def _list_changes(self, clients: list[frozenset[bytes]]) -> str | None:
        """The torrent list's change since the last tick, as JSON (None if it did not
        change): the rows that changed or came (``set``) and the keys of those that went
        (``gone``), from version ``from`` of the list to ``to``; the whole list
        (``rows``) if the pages had none. A torrent unregistered and registered again
        between two ticks is a row that changed (its registration is part of it), even
        if all it shows is the same.

        A row is encoded only when it changed: the cost of a tick for the torrents that
        did not is a lookup, a popcount of their bitfield (an eighth of their map) and
        a comparison of a few numbers."""
        rows = self._rows
        whole = rows is None
        if rows is None:
            rows = self._rows = {}
        follows = self._follows(clients)
        changed: list[str] = []
        present: set[bytes] = set()
        for key in self.disk.torrents():
            try:
                t = self.disk.torrent(key)
            except PiecedError:  # unregistered meanwhile
                continue
            present.add(key)
            facts = (t.id, t.storage.name, int.from_bytes(t.have, "big").bit_count(),
                     len(t.partial), len(t.errors), follows.get(key, 0))
            old = rows.get(key)
            if old is None or old[0] != facts:
                if old is not None and old[0][0] != t.id:
                    self._static.pop(old[0][0], None)
                text = json.dumps({**self._static_of(t), "backend": facts[1],
                                   "verified": facts[2], "partial": facts[3],
                                   "errors": facts[4], "clients": facts[5]})
                rows[key] = (facts, text)
                changed.append(text)
        gone = [key for key in rows if key not in present]
        for key in gone:
            self._static.pop(rows.pop(key)[0][0], None)
        if whole:
            live = {facts[0] for facts, _ in rows.values()}
            for tid in [tid for tid in self._static if tid not in live]:
                del self._static[tid]
            self._list_seq = next(self._list_seqs)
            return self._whole_list()
        if not changed and not gone:
            return None
        start, self._list_seq = self._list_seq, next(self._list_seqs)
        return (f'{{"from":{start},"to":{self._list_seq},"set":[{",".join(changed)}],'
                f'"gone":{json.dumps([key.hex() for key in gone])}}}')

    def _whole_list(self) -> str:
        """The list as the pages have it, as JSON, version ``to``: for a hello, or for
        a tick after which the pages' version would be unknown (a page takes a whole
        list whatever version it holds)."""
        rows = self._rows or {}
        return f'{{"to":{self._list_seq},"rows":[{",".join(text for _, text in rows.values())}]}}'

    def _follows(self, clients: list[frozenset[bytes]]) -> dict[bytes, int]:
        """How many clients follow each torrent (by its key), by any of its aliases: the
        keys the clients gave, looked up once each, rather than every torrent's aliases
        looked for in every client's."""
        counts: collections.Counter[bytes] = collections.Counter()
        for subscribed in clients:
            keys = set()
            for ih in subscribed:
                with contextlib.suppress(PiecedError):
                    keys.add(self.key(ih))
            counts.update(keys)
        return counts

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
            "failed": rate("pieces_failed"),  # (per second, as verified: one axis)
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
