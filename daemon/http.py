"""HTTP observability: the status page at / (``page.py``), /healthz, /stats,
/torrents[/IH] (JSON) and /metrics. Read-only: every route is a GET.

Everything is read from the engine at request time: no second set of counters to
keep in step. /metrics maps the engine's snapshot onto Prometheus families with
prometheus-client's own exposition.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from pieced.storage.disk import DiskIO
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from .feed import TICK
from .guard import add_headers, require_token
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


def guard_connections(server: web.Server, limit: int = MAX_CONNECTIONS,
                      header_seconds: float = HEADER_SECONDS) -> asyncio.Task[None]:
    """Keep the HTTP connections that hold a place and do nothing from taking the
    daemon's descriptors (a few hundred slow or silent ones took them all, and its
    clients were refused): one over ``limit`` closes, as it comes, the oldest connection
    not serving a request; once a second, those that have not finished a request
    ``header_seconds`` after they opened are closed. Returns the task of the latter."""
    import time

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
        conns = server.connections
        if len(conns) > limit:
            others = [h for h in conns if h is not handler]
            victim = min((h for h in others if idle(h)), default=None,
                         key=lambda h: opened.get(h, 0.0))
            if victim is None:
                victim = min((h for h in others if streaming(h)), default=None,
                             key=lambda h: opened.get(h, 0.0))
                if victim is not None and victim.transport is not None:
                    victim.transport.close()  # (a stream's request never ends by itself)
            (victim or handler).force_close()

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


BUILDING = 2  # JSON reports built at once: more hold the interpreter's lock in turn


async def _json_off_loop(make: Callable[[], Any], slots: asyncio.Semaphore) -> web.Response:
    """A JSON report built off the loop, ``slots`` at a time: a hundred requests for a
    torrent of 30,000 files at once starved the loop, and the daemon's clients with it,
    for seconds."""

    def body() -> bytes:
        return json.dumps(make()).encode()

    async with slots:
        data = await asyncio.get_running_loop().run_in_executor(None, body)
    return web.Response(body=data, content_type="application/json")


def status_json(disk: DiskIO, ih: bytes) -> dict[str, Any]:
    st = disk.status(ih)
    st["have"] = st["have"].hex()
    return st


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
            ("pieces_verified", "Pieces that passed their hash check and are durable"),
            ("pieces_failed", "Pieces that failed their hash check"),
            ("blocks_written", "Blocks accepted"),
            ("duplicate_blocks", "Blocks for pieces already complete"),
            ("syncs", "fdatasync calls (files made durable)"),
            ("fingerprint_hits", "Pieces a recheck found good by their BLAKE3 fingerprint"),
            ("piece_buffers_reused", "Pieces read into the buffer of an evicted one"),
        ]:
            c = CounterMetricFamily(f"pieced_{name}", help_, labels=["backend"])
            c.add_metric(backend, s[name])
            yield c
        dropped = CounterMetricFamily(
            "pieced_clients_dropped", "Clients disconnected for not reading what was sent to them"
        )
        dropped.add_metric([], self.server.dropped)
        yield dropped
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
            ("open_files", "Open payload file descriptors", s["open_files"]),
            ("torrents", "Registered torrents", s["torrents"]),
            ("connected_clients", "Clients connected on the socket", len(self.server.clients)),
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
    """``token``: the http_token every request must carry ("" asks for none)."""
    registry = CollectorRegistry()
    registry.register(_Collector(disk, server))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(disk.stats() | server.stats())

    # A status counts pieces, and its JSON is megabytes for a torrent of 100,000 files
    # (75 ms to write): both off the loop that serves the daemon's clients.
    building = asyncio.Semaphore(BUILDING)

    async def torrents(request: web.Request) -> web.Response:
        return await _json_off_loop(lambda: [status_json(disk, ih) for ih in disk.torrents()],
                                    building)

    async def torrent(request: web.Request) -> web.Response:
        ih = parse_ih(request.match_info["ih"])  # 400 unless 40 or 64 hex digits
        try:
            return await _json_off_loop(lambda: status_json(disk, ih), building)
        except Exception as exc:  # UnknownTorrent and friends
            raise web.HTTPNotFound(text=f"{exc}\n") from None

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app = web.Application(middlewares=[require_token(token)] if token else [])
    app.on_response_prepare.append(add_headers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    app.router.add_get("/torrents", torrents)
    app.router.add_get("/torrents/{ih}", torrent)
    app.router.add_get("/metrics", metrics)
    add_page(app, disk, server, token, page_interval)
    return app
