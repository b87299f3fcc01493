"""The status page: its files (``daemon/static/``) and the endpoints only it uses.

``/`` is a page of plain HTML, one script and one style sheet, served from the package
(no build step, nothing from elsewhere: the CSP forbids it). Its data comes from:

- ``/page/events?ih=IH``: Server-Sent Events, a ``hello`` and then a ``tick`` every
  half second (see ``feed.py``);
- ``/page/map/IH``: the watched torrent's piece map, one byte per piece, gzipped;
- ``/page/files/IH?first=A&last=B``: the files pieces A..B hold bytes of (hover).

All of them are GET; none changes anything. Work that grows with the pieces runs on
the feed's thread; on the loop only a bisection (``files``) and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler
from pieced.storage.disk import DiskIO
from pieced.storage.errors import PiecedError

from .feed import SLICE, TICK, Feed, Subscriber
from .server import Server

PAGE_DIR = Path(__file__).resolve().parent / "static"
ASSETS = {
    "page.js": "text/javascript",
    "page.css": "text/css",
    "favicon.svg": "image/svg+xml",
}


EVENTS_PATH = "/page/events"  # the event stream the page follows
_HEX_IH = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")


def parse_ih(text: str) -> bytes:
    """40 hex digits (v1, or a v2 hash cut to 20 bytes), or 64 (a whole v2 hash, all of
    it checked by the storage's lookup), nothing else (no spaces)."""
    if not _HEX_IH.fullmatch(text):
        raise web.HTTPBadRequest(text="info_hash must be 40 or 64 hex digits\n")
    return bytes.fromhex(text)


def add_page(app: web.Application, disk: DiskIO, server: Server, token: str = "",
             interval: float = TICK) -> Feed:
    feed = Feed(disk, server, interval)
    files = {name: (PAGE_DIR / name).read_bytes() for name in [*ASSETS, "index.html"]}
    no_store = {"Cache-Control": "no-store"}

    def known(ih_text: str) -> bytes:
        try:
            return feed.key(parse_ih(ih_text))
        except PiecedError as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None

    async def index(request: web.Request) -> web.Response:
        html = files["index.html"].decode()
        if token:  # the middleware let it in: the page's own requests carry it on
            q = quote(token, safe="")
            for name in ASSETS:
                html = html.replace(f'"{name}"', f'"{name}?token={q}"')
        return web.Response(text=html, content_type="text/html", headers=no_store)

    def asset(name: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=files[name], content_type=ASSETS[name],
                                headers={"Cache-Control": "no-cache"})
        return handler

    async def events(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":  # no stream to follow: it would never end
            return web.Response(content_type="text/event-stream", headers=no_store)
        key = None
        if request.query.get("ih"):
            with contextlib.suppress(PiecedError):
                key = feed.key(parse_ih(request.query["ih"]))
        loop = asyncio.get_running_loop()
        sub = Subscriber(key, request.transport)
        feed.subscribers.add(sub)  # before the hello: watched from the next sample on
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **no_store,
                                           "X-Accel-Buffering": "no"})
        try:
            sub.sent, head, part = await loop.run_in_executor(
                feed.executor, feed.hello, key, feed.client_keys())
            await resp.prepare(request)
            await send(resp, sub, sub.sent, (head, part))
            while not feed.closing.is_set():
                await sub.wake.wait()
                await send(resp, sub, *feed.pending(sub))
        except (ConnectionError, RuntimeError):  # the page went, or the daemon stops
            pass  # (aiohttp: a bare ConnectionError when it goes while a write waits)
        finally:
            feed.subscribers.discard(sub)
        return resp

    async def send(resp: web.StreamResponse, sub: Subscriber, since: int,
                   chunks: Iterable[bytes]) -> None:
        """Writes the chunks of ticks ``since`` and later (shared with the other pages)
        a slice at a time, waiting for the page to take each: a page that reads nothing
        holds a slice in its transport, not a copy, and is marked waiting, for the feed
        to let it go once those ticks are no longer kept for the others."""
        sub.waiting = since
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                for i in range(0, len(view), SLICE):
                    await resp.write(view[i:i + SLICE])
        finally:
            sub.waiting = None

    async def piece_map(request: web.Request) -> web.Response:
        key = known(request.match_info["ih"])
        loop = asyncio.get_running_loop()
        try:
            seq, pieces, body = await loop.run_in_executor(feed.executor, feed.map_gz, key)
        except PiecedError as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None
        headers = {**no_store, "X-Pieced-Seq": str(seq), "X-Pieced-Pieces": str(pieces)}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            headers["Content-Encoding"] = "gzip"
        else:
            body = await loop.run_in_executor(feed.executor, gzip.decompress, body)
        return web.Response(body=body, content_type="application/octet-stream",
                            headers=headers)

    async def piece_files(request: web.Request) -> web.Response:
        key = known(request.match_info["ih"])
        try:
            first = int(request.query["first"])
            last = int(request.query.get("last", first))
        except (KeyError, ValueError):
            raise web.HTTPBadRequest(text="first (and last) must be piece numbers\n") from None
        try:
            files = await asyncio.get_running_loop().run_in_executor(
                feed.executor, feed.piece_files, key, first, last)
            return web.json_response(files, headers=no_store)
        except PiecedError as exc:
            raise web.HTTPNotFound(text=f"{exc}\n") from None

    async def start(app: web.Application) -> None:
        await feed.start()

    async def stop(app: web.Application) -> None:
        await feed.stop()

    app.router.add_get("/", index)
    for name in ASSETS:
        app.router.add_get(f"/{name}", asset(name))
    app.router.add_get("/favicon.ico", asset("favicon.svg"))
    app.router.add_get(EVENTS_PATH, events)
    app.router.add_get("/page/map/{ih}", piece_map)
    app.router.add_get("/page/files/{ih}", piece_files)
    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    app[FEED] = feed  # (what it holds, for tests and for a look in a debugger)
    return feed


FEED = web.AppKey("feed", Feed)
