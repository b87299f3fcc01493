"""HTTP observability: the status page at / (``page.py``), /healthz, /stats,
/torrents[/IH] (JSON) and /metrics. Read-only: every route is a GET.

Everything is read from the engine at request time: no second set of counters to
keep in step. /metrics maps the engine's snapshot onto Prometheus families with
prometheus-client's own exposition.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.typedefs import Handler, Middleware
from pieced.storage.disk import DiskIO
from pieced.storage.errors import PiecedError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from .feed import TICK
from .guard import add_headers, require_loopback_host, require_token
from .page import EVENTS_PATH, add_page, parse_ih
from .server import Server

# HTTP connections: what one may hold of the daemon's descriptors. A connection idle
# after a response is closed after KEEPALIVE_SECONDS; one that has not finished a
# request HEADER_SECONDS after it opened (silent, or headers a byte at a time) is
# closed; past MAX_CONNECTIONS the oldest ones not serving a request go first.
KEEPALIVE_SECONDS = 15.0
# What a stop waits for HTTP responses under way: a client that reads nothing of a
# large one (the /torrents of a torrent of 40,000 files) held it up for two minutes,
# past systemd's stop timeout, before the final flush and the clean mark.
HTTP_SHUTDOWN_SECONDS = 2.0
HEADER_SECONDS = 20.0
MAX_CONNECTIONS = 128
# Header lines a request may have (aiohttp's default: 128 of up to 8 KiB each). A
# connection holds its headers until they end: 300 connections of a megabyte of headers
# each took the daemon's memory from 218 to 343 MB; 32 lines of 8 KiB is 256 KiB a
# connection at most, and a browser's requests send about ten.
MAX_HEADERS = 32


class _Handler(web_protocol.RequestHandler):
    """aiohttp's connection, but for what a client sends after a request of its failed to
    parse (a header line past 8 KiB...): dropped, unread, until the connection is closed
    once its 400 is sent. aiohttp parsed it on, chunk by chunk, each chunk a new error
    queued (32 a connection) that held the chunk in its traceback's frames, in reference
    cycles the collector seldom reached: 60 connections sending a header line of 8 MB at
    once grew the daemon by 900 MB, for good."""

    __slots__ = ("_refused",)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_refused", False):
            return  # (its error is answered, and the connection closed after it)
        super().data_received(data)
        queued = self._messages
        if queued and isinstance(queued[-1][0], _ERROR):
            self._refused = True
            queued[-1][0].exc.__traceback__ = None  # (its frames hold the chunk)
            if self.transport is not None:
                self.transport.pause_reading()


_ERROR = web_protocol._ErrInfo

# aiohttp's stop waits on a future that the connection's request ends; its timeout
# cancels the future, and a request ending in the same turn of the loop set the result
# of the cancelled future: InvalidStateError, a traceback in the log, at a stop with
# requests waiting their turn. Read through this, a future already done is no future.
_WAITER_SLOT: Any = getattr(web_protocol.RequestHandler, "_handler_waiter", None)


def _waiter_get(h: Any) -> Any:
    waiter = _WAITER_SLOT.__get__(h)
    return None if waiter is None or waiter.done() else waiter


def _waiter_set(h: Any, value: Any) -> None:
    _WAITER_SLOT.__set__(h, value)


if _WAITER_SLOT is not None and hasattr(_WAITER_SLOT, "__set__"):
    _Handler._handler_waiter = property(  # type: ignore[misc,assignment]
        _waiter_get, _waiter_set)


class _Server(web.Server):
    __slots__ = ()

    def __call__(self) -> web_protocol.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


def guard_connections(server: web.Server, limit: int = MAX_CONNECTIONS,
                      header_seconds: float = HEADER_SECONDS) -> asyncio.Task[None]:
    """Keep the HTTP connections that hold a place and do nothing from taking the
    daemon's descriptors (a few hundred slow or silent ones took them all, and its
    clients were refused): one over ``limit`` closes, as it comes, the oldest connection
    not serving a request; once a second, those that have not finished a request
    ``header_seconds`` after they opened are closed. Returns the task of the latter.
    A connection whose request failed to parse reads no more (see _Handler)."""
    import time

    server.__class__ = _Server

    opened: dict[Any, float] = {}  # handler -> when its connection opened
    made, lost = server.connection_made, server.connection_lost

    def idle(h: Any) -> bool:
        return getattr(h, "_current_request", None) is None

    def streaming(h: Any) -> bool:
        """Following the status page's event stream: a request that never ends, so a
        place it may give up (128 of them shut /healthz and /metrics out)."""
        request = getattr(h, "_current_request", None)
        return request is not None and request.path == EVENTS_PATH

    def connection_made(handler: Any, transport: Any) -> None:
        made(handler, transport)
        opened[handler] = time.monotonic()
        # Those whose connection is open: a handler closed a moment ago stays listed
        # until its task ends (a stream's, at its next tick), and taken for a victim
        # again by every newcomer meanwhile, it let hundreds past the bound.
        conns = [h for h in server.connections if h.transport is not None]
        if len(conns) > limit:
            others = [h for h in conns if h is not handler]
            victim = min((h for h in others if idle(h)), default=None,
                         key=lambda h: opened.get(h, 0.0))
            if victim is None:
                victim = min((h for h in others if streaming(h)), default=None,
                             key=lambda h: opened.get(h, 0.0))
                if victim is not None and victim.transport is not None:
                    victim.transport.close()  # (a stream's request never ends by itself)
            if victim is not None:
                victim.force_close()
            else:  # every other one serving or waiting its turn: this one goes, unserved
                # (once its handler has started: one closed before failed an assertion of
                # aiohttp's, a traceback logged for every refusal)
                asyncio.get_running_loop().call_soon(transport.close)

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        opened.pop(handler, None)
        lost(handler, exc)

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]

    async def sweep() -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for h in list(server.connections):
                if idle(h) and getattr(h, "_request_count", 1) == 0 and \
                        now - opened.setdefault(h, now) >= header_seconds:
                    h.force_close()

    return asyncio.create_task(sweep())


# Requests answered a second, all HTTP clients together, and how many may come at once
# before they wait their turn (in the order they came). Each request costs the daemon's
# loop and its interpreter's lock, whatever it asks: four clients asking for /metrics
# back to back (a thousand a second) slowed a socket client's writes to 0.12 of their
# rate alone, /healthz to 0.23 (against 0.45 and 0.53 for the same clients asking a
# server in another process, which only shares the cores). A monitoring system asks
# every few seconds, and the status page a few times a click.
REQUESTS_PER_SECOND = 50.0
REQUEST_BURST = 50


def gone(request: web.Request) -> bool:
    """Whether the request's client has hung up (aiohttp goes on with its handler)."""
    transport = request.transport
    return transport is None or transport.is_closing()


class Pacer:
    """Turns for requests at ``rate`` a second, ``burst`` at once (a generic cell rate
    algorithm), in the order they came: one that asks again and again takes no more
    than its share. A request whose client has hung up by its turn takes none, and is
    not answered: 1,500 requests sent and given up at once held every later client's
    /healthz back 20 s, their handlers alive for all that time."""

    def __init__(self, rate: float = REQUESTS_PER_SECOND, burst: int = REQUEST_BURST) -> None:
        self.interval = 1.0 / rate
        self.tolerance = burst * self.interval
        self._due = 0.0  # (loop time) the theoretical time of the next turn
        self._waiting: collections.deque[tuple[asyncio.Future[bool], web.Request]] = (
            collections.deque())
        self._handing: asyncio.Task[None] | None = None

    def _take(self, now: float) -> float:
        """A turn taken at ``now``: 0, or how long until one is free (none taken)."""
        due = max(self._due, now)
        wait = due - self.tolerance - now
        if wait <= 0:
            self._due = due + self.interval
        return max(0.0, wait)

    def due(self) -> bool:
        """Whether a turn is free now (taken, if so); never waits."""
        return not self._waiting and not self._take(asyncio.get_running_loop().time())

    async def turn(self, request: web.Request) -> bool:
        """Wait for the request's turn: False if its client hung up meanwhile."""
        if self.due():
            return True
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[bool] = loop.create_future()
        self._waiting.append((ready, request))
        if self._handing is None or self._handing.done():
            self._handing = asyncio.create_task(self._hand_out())
        return await ready

    async def _hand_out(self) -> None:
        loop = asyncio.get_running_loop()
        waiting = self._waiting
        while waiting:
            ready, request = waiting[0]
            if ready.done() or gone(request):  # (cancelled, or hung up: no turn)
                waiting.popleft()
                if not ready.done():
                    ready.set_result(False)
                continue
            wait = self._take(loop.time())
            if wait:
                await asyncio.sleep(wait)
                continue
            waiting.popleft()
            ready.set_result(True)

    def middleware(self) -> Middleware:
        @web.middleware
        async def paced(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not await self.turn(request):  # (an answer no one reads: dropped quietly)
                return web.Response(status=503, text="hung up before its turn")
            return await handler(request)

        return paced


BUILDING = 2  # JSON reports built at once: more hold the interpreter's lock in turn
# A report's build is followed by a rest of PACE times its length before the next one
# starts: building holds the interpreter's lock, so one client asking for /torrents of
# a thousand torrents again and again (0.05-0.3 s a build) slowed the daemon's socket
# clients' writes five to nine times; paced, reports take at most about a fifth of it.
PACE = 4.0
# Bytes of JSON reports held for the clients they are being sent to, all together: past
# it the report whose client has taken nothing for the longest is cut off. (Twelve
# clients that asked for the 5 MB report of a torrent of 30,000 files and read nothing
# held 114 MB, for as long as they stayed.)
REPORT_BYTES = 64 * 1024 * 1024
REPORT_SLICE = 65536  # bytes of a report handed to its transport at a time


class _Sending:
    """A report being sent: its size, its connection, and when its client last took
    a slice of it (a count of the slices sent by all, not a time: no clock to read)."""

    __slots__ = ("size", "taken", "transport")

    def __init__(self, size: int, transport: asyncio.Transport | None, taken: int) -> None:
        self.size = size
        self.transport = transport
        self.taken = taken


class Reports:
    """The JSON reports (/torrents, /torrents/IH): built off the loop ``building`` at
    a time (a hundred requests for a torrent of 30,000 files at once starved the loop,
    and the daemon's clients with it, for seconds), then sent a slice at a time within a
    budget of ``held`` bytes for all the clients together."""

    def __init__(self, building: int = BUILDING, held: int = REPORT_BYTES,
                 pace: float = PACE) -> None:
        self.slots = asyncio.Semaphore(building)
        self.pace = pace
        self._rested = 0.0  # (loop time) when the next build may start: see PACE
        self.budget = held
        self.sending: set[_Sending] = set()
        self._slices = 0

    @property
    def held(self) -> int:
        """Bytes of the reports being sent (a sum over a few: no count to keep right)."""
        return sum(s.size for s in self.sending)

    async def respond(self, request: web.Request, make: Callable[[], Any]) -> web.StreamResponse:
        """The JSON of ``make()``; what it raises is raised here, before any answer."""

        def body() -> bytes:
            return json.dumps(make()).encode()

        loop = asyncio.get_running_loop()
        async with self.slots:
            while (rest := self._rested - loop.time()) > 0:
                await asyncio.sleep(rest)
            if gone(request):  # (eight built for clients gone held /torrents/IH 77 s back)
                return web.Response(status=503, text="hung up before its report")
            start = loop.time()
            try:
                data = await loop.run_in_executor(None, body)
            finally:
                end = loop.time()
                self._rested = max(self._rested, end + self.pace * (end - start))
        if request.method == "HEAD":
            return web.Response(body=data, content_type="application/json")
        sending = _Sending(len(data), request.transport, self._slices)
        self._make_room(len(data))
        self.sending.add(sending)
        try:
            return await self._send(request, data, sending)
        finally:
            self.sending.discard(sending)

    async def _send(self, request: web.Request, data: bytes,
                    sending: _Sending) -> web.StreamResponse:
        """Slices of the report, copied: what the transport holds of it once the
        report is let go is a slice, not the whole (a view would hold it all)."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(data)
        try:
            await resp.prepare(request)
            for i in range(0, len(data), REPORT_SLICE):
                await resp.write(data[i:i + REPORT_SLICE])
                self._slices += 1
                sending.taken = self._slices
            await resp.write_eof()
        except ConnectionError:  # the client went, or was cut off to make room
            pass
        return resp

    def _make_room(self, size: int) -> None:
        """Cuts off the reports whose clients took nothing for the longest until
        ``size`` more bytes fit in the budget (or no other report is left)."""
        held = self.held
        for victim in sorted(self.sending, key=lambda s: s.taken):
            if held + size <= self.budget:
                break
            self.sending.discard(victim)
            held -= victim.size
            if victim.transport is not None:
                victim.transport.abort()  # (its handler ends at its next write)


REPORTS = web.AppKey("reports", Reports)


def status_json(disk: DiskIO, ih: bytes) -> dict[str, Any]:
    st = disk.status(ih)
    st["have"] = st["have"].hex()
    return st


def statuses_json(disk: DiskIO) -> list[dict[str, Any]]:
    """Every torrent's status; one unregistered meanwhile is left out (it failed the
    whole list with a 500)."""
    out = []
    for ih in disk.torrents():
        with contextlib.suppress(PiecedError):
            out.append(status_json(disk, ih))
    return out


class _Collector:
    def __init__(self, disk: DiskIO, server: Server) -> None:
        self.disk = disk
        self.server = server

    def collect(self) -> Iterator[Any]:
        s = self.disk.stats()
        backend = [s["backend"]]
        for name, help_ in [
            ("bytes_written", "Payload bytes written to disk"),
            ("bytes_read", "Payload bytes read from disk"),
            ("cache_hits", "Reads served from the piece cache"),
            ("cache_misses", "Reads that went to disk"),
            ("pieces_verified", "Pieces completed from blocks that passed their hash check "
             "and are durable"),
            ("pieces_failed", "Pieces completed from blocks that failed their hash check"),
            ("recheck_verified", "Pieces a check of the files on disk found good"),
            ("recheck_failed", "Pieces a check of the files on disk found missing or bad"),
            ("blocks_written", "Blocks accepted"),
            ("blocks_written_through", "Writes that went straight to disk (not buffered)"),
            ("hash_jobs", "Batches of pieces a recheck hashed on the hash workers"),
            ("duplicate_blocks", "Blocks for pieces already complete"),
            ("syncs", "fdatasync calls (files made durable)"),
            ("fingerprint_hits", "Pieces a recheck found good by their BLAKE3 fingerprint"),
            ("piece_buffers_reused", "Pieces read into the buffer of an evicted one"),
            ("pieces_parked", "Pieces in progress whose hash state was let go to make room "
             "for another torrent's (their bytes kept)"),
        ]:
            c = CounterMetricFamily(f"pieced_{name}", help_, labels=["backend"])
            c.add_metric(backend, s[name])
            yield c
        c = CounterMetricFamily("pieced_hash_job_seconds",
                                "Seconds the hash workers spent on those batches", labels=["backend"])
        c.add_metric(backend, s["hash_job_us"] / 1e6)
        yield c
        for name, help_, value in [
            ("clients_dropped", "Clients disconnected for not reading what was sent to them, "
             "or for sending no HELLO in time",
             self.server.dropped),
            ("clients_accepted", "Clients that connected and were let in", self.server.accepted),
            ("clients_refused", "Clients refused (not allowed, or past max_clients)",
             self.server.refused),
        ]:
            c = CounterMetricFamily(f"pieced_{name}", help_)
            c.add_metric([], value)
            yield c
        errors = CounterMetricFamily("pieced_errors", "Errors by kind (errno name for I/O)", labels=["kind"])
        for kind, n in sorted(s["errors"].items()):
            errors.add_metric([kind], n)
        yield errors
        for name, help_, value in [
            ("cache_bytes", "Bytes of clean pieces cached", s["cache_bytes"]),
            ("write_buffer_bytes", "Bytes buffered, not yet written", s["write_buffer_bytes"]),
            ("budget_bytes", "The byte budget shared by cache and write buffer", s["budget_bytes"]),
            ("recycled_bytes", "Buffers of evicted pieces kept for the next reads (beyond the "
             "budget)", s["recycled_bytes"]),
            ("hash_queue_depth", "Hash jobs queued or running", s["hash_queue_depth"]),
            ("hash_workers", "Hashing threads of rechecks", s["hash_workers"]),
            ("open_files", "Open payload file descriptors", s["open_files"]),
            ("torrents", "Registered torrents", s["torrents"]),
            ("connected_clients", "Clients connected on the socket", len(self.server.clients)),
            ("unsent_bytes", "Replies and events waiting to be sent to clients, all together",
             self.server.unsent),
        ]:
            g = GaugeMetricFamily(f"pieced_{name}", help_)
            g.add_metric([], value)
            yield g
        for op, h in s["latency"].items():
            buckets = []
            acc = 0
            for bound, n in zip([*h["buckets_us"], None], h["counts"], strict=True):
                acc += n
                buckets.append(("+Inf" if bound is None else repr(bound / 1e6), acc))
            fam = HistogramMetricFamily(
                f"pieced_{op}_latency_seconds", f"Latency of {op} operations", labels=["backend"]
            )
            fam.add_metric(backend, buckets, h["sum_us"] / 1e6)
            yield fam


def make_app(disk: DiskIO, server: Server, token: str = "",
             page_interval: float = TICK) -> web.Application:
    """``token``: the http_token every request must carry. "" asks for none: the
    server is on loopback, and answers only requests for a loopback name (a page of
    another site rebound to 127.0.0.1 would read it all otherwise)."""
    registry = CollectorRegistry()
    registry.register(_Collector(disk, server))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(disk.stats() | server.stats())

    # A status counts pieces, and its JSON is megabytes for a torrent of 100,000 files
    # (75 ms to write): both off the loop that serves the daemon's clients.
    reports = Reports(BUILDING, REPORT_BYTES, PACE)

    async def torrents(request: web.Request) -> web.StreamResponse:
        return await reports.respond(request, lambda: statuses_json(disk))

    async def torrent(request: web.Request) -> web.StreamResponse:
        ih = parse_ih(request.match_info["ih"])  # 400 unless 40 or 64 hex digits
        try:
            return await reports.respond(request, lambda: status_json(disk, ih))
        except PiecedError as exc:  # UnknownTorrent and friends
            raise web.HTTPNotFound(text=f"{exc}\n") from None

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    pacer = Pacer(REQUESTS_PER_SECOND, REQUEST_BURST)
    if token:  # refused first, at a pace of their own (see require_token)
        strangers = Pacer(REQUESTS_PER_SECOND, REQUEST_BURST)
        middlewares = [require_token(token, strangers.due), pacer.middleware()]
    else:  # paced first: a request refused costs the daemon as much
        middlewares = [pacer.middleware(), require_loopback_host()]
    app = web.Application(middlewares=middlewares)
    app[REPORTS] = reports  # (what it holds, for tests and for a look in a debugger)
    app.on_response_prepare.append(add_headers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    app.router.add_get("/torrents", torrents)
    app.router.add_get("/torrents/{ih}", torrent)
    app.router.add_get("/metrics", metrics)
    add_page(app, disk, server, token, page_interval)
    return app
