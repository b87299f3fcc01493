"""The status page's torrent list with hundreds of torrents, against a real daemon: the
event stream sends the list whole once, then only the rows that changed and the
torrents that went (read here byte for byte); the page, in headless Chromium
(``tests/browser.py``), writes those rows in place, keeps its order, its search and its
selection through torrents added, removed and registered anew, and loads the list anew
when a change of it was lost on the way."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import bencodepy
from aiohttp import web
from pieced.protocol.client import Client

from tests.browser import Browser, Page
from tests.conftest import Daemon
from tests.test_page import assert_clean, open_page, pct_text

BLOCK = 16384


def torrent(name: str, pieces: int = 2) -> tuple[bytes, bytes]:
    """A single-file torrent of one-block pieces, and its content."""
    data = hashlib.shake_128(name.encode()).digest(pieces * BLOCK)
    info = {b"name": name.encode(), b"piece length": BLOCK, b"length": len(data),
            b"pieces": b"".join(hashlib.sha1(data[i:i + BLOCK]).digest()
                                for i in range(0, len(data), BLOCK))}
    return bencodepy.encode({b"info": info}), data


def register_many(c: Client, save: Path, count: int) -> list[bytes]:
    return [c.register(torrent(f"torrent-{i:04}")[0], save) for i in range(count)]


def reported(d: Daemon) -> dict[str, dict[str, Any]]:
    """/torrents, by info hash."""
    with urllib.request.urlopen(f"http://{d.http}/torrents", timeout=10) as r:
        return {t["info_hash"]: t for t in json.loads(r.read())}


async def verified(c: Client, ih: bytes, pieces: int) -> None:
    """Waits until the daemon reports that many pieces of the torrent verified."""
    for _ in range(200):
        if c.status(ih, files=False)["verified_pieces"] == pieces:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{pieces} pieces never verified")


class Events:
    """An event stream read as a page reads it: each event, with the bytes it came in."""

    def __init__(self, url: str) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.task = asyncio.create_task(self._read(url))

    async def _read(self, url: str) -> None:
        async with aiohttp.ClientSession() as session, session.get(url) as r:
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    self.queue.put_nowait(event + b"\n\n")

    async def next(self, timeout: float = 10) -> tuple[str, bytes, Any]:
        """(the event's name, its bytes, its data)."""
        raw = await asyncio.wait_for(self.queue.get(), timeout)
        name, data = "", None
        for line in raw.decode().split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        return name, raw, data

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


# -- the event stream ----------------------------------------------------------------------------
def test_a_tick_sends_only_the_rows_that_changed(tmp_path: Path) -> None:
    """500 torrents at rest and one that downloads: after the hello (the list whole), a
    tick that changes the list carries the downloading torrent's row alone, named by its
    info hash, and a tick in which nothing changed carries no list; a torrent removed is
    named gone, one added is sent whole, one registered anew at once is sent again. The
    changes, applied to the hello's list in order, make the list a new page is sent."""
    save = tmp_path / "dl"
    save.mkdir()
    (tmp_path / "empty").mkdir()
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            idle = register_many(c, save, 500)
            raw, data = torrent("downloading", pieces=12)
            ih = c.register(raw, save)
            asyncio.run(_only_changes(d, c, idle, ih, raw, data, tmp_path))
    finally:
        assert d.stop() == 0, d.stderr()


async def _only_changes(d: Daemon, c: Client, idle: list[bytes], ih: bytes, raw: bytes,
                        data: bytes, tmp_path: Path) -> None:
    url = f"http://{d.http}/page/events"
    stream = Events(url)
    try:
        name, hello_bytes, hello = await stream.next()
        assert name == "hello"
        rows = {r["ih"]: r for r in hello["list"]["rows"]}
        assert set(rows) == {k.hex() for k in [*idle, ih]}
        seq = hello["list"]["to"]
        others = [k.hex().encode() for k in idle]
        print(f"hello: {len(hello_bytes)} bytes for {len(rows)} torrents")

        async def changes(until: Any, ticks: int = 40) -> list[tuple[bytes, Any]]:
            """The list's changes tick after tick (each checked to follow the one
            before, and applied to ``rows``) until ``until(rows)``."""
            nonlocal seq
            seen = []
            for _ in range(ticks):
                name, tick_bytes, tick = await stream.next()
                assert name == "tick", name
                if "list" in tick:
                    change = tick["list"]
                    assert change["from"] == seq and change["to"] > seq, (change, seq)
                    seq = change["to"]
                    for key in change["gone"]:
                        del rows[key]
                    for row in change["set"]:
                        rows[row["ih"]] = row
                    seen.append((tick_bytes, change))
                if until(rows):
                    return seen
            raise AssertionError(f"not within {ticks} ticks: {rows.get(ih.hex())}")

        # One piece after another: the torrent's row alone, tick after tick.
        sizes = []
        for p in range(12):
            c.write_chunk(ih, p, 0, data[p * BLOCK:(p + 1) * BLOCK])
            c.wait_writes()
            for tick_bytes, change in await changes(
                    lambda rows, p=p: rows[ih.hex()]["verified"] == p + 1
                    and rows[ih.hex()]["partial"] == 0):
                assert [r["ih"] for r in change["set"]] == [ih.hex()] and change["gone"] == []
                assert tick_bytes.count(b'"ih":') == 1, tick_bytes
                assert not any(k in tick_bytes for k in others)
                sizes.append(len(tick_bytes))
        print(f"ticks that changed the list: {len(sizes)}, {min(sizes)} to {max(sizes)} bytes")
        assert max(sizes) < 2048 < len(hello_bytes) // 20
        # At rest: ticks without a list.
        for _ in range(3):
            name, tick_bytes, tick = await stream.next()
            assert name == "tick" and "list" not in tick, tick_bytes

        # Gone, added, registered anew (unregistered and registered at once, into an
        # empty save path: nothing verified).
        c.unregister(idle[7])
        (_, change), = await changes(lambda rows: idle[7].hex() not in rows)
        assert change["set"] == [] and change["gone"] == [idle[7].hex()]
        new = c.register(torrent("newcomer")[0], tmp_path / "dl")
        (_, change), = await changes(lambda rows: new.hex() in rows)
        assert [r["ih"] for r in change["set"]] == [new.hex()] and change["gone"] == []
        assert change["set"][0]["name"] == "newcomer"
        c.unregister(ih)
        c.register(raw, tmp_path / "empty")
        for _, change in await changes(lambda rows: ih.hex() in rows
                                       and rows[ih.hex()]["verified"] == 0):
            assert {r["ih"] for r in change["set"]} | set(change["gone"]) == {ih.hex()}

        # What the changes made of the hello's list is the list a new page is sent, and
        # the daemon's report.
        fresh = Events(url)
        try:
            name, _, hello = await fresh.next()
            assert name == "hello"
            target = hello["list"]["to"]
            if target != seq:  # (changes the first stream had yet to read)
                await changes(lambda rows: seq >= target)
            assert target == seq
            assert {r["ih"]: r for r in hello["list"]["rows"]} == rows
        finally:
            await fresh.close()
        report = reported(d)
        assert set(report) == set(rows)
        assert all(rows[k]["verified"] == t["verified_pieces"] for k, t in report.items())
    finally:
        await stream.close()


# -- the page ------------------------------------------------------------------------------------
# The rows the table holds (those in and near the window: the others are stood for by
# spacer rows), each as its info hash, its name and its verified share, as shown.
TABLE = ("[...document.querySelectorAll('#torrents tbody tr[data-ih]')].map(tr => [tr.dataset.ih, "
         "tr.cells[0].querySelector('bdi').textContent, tr.cells[2].textContent])")
# The row drawn at the middle of the window (at the middle of a row's height), and
# where the list would have it.
MIDDLE = """(() => {
  const tbody = document.querySelector('#torrents tbody');
  const rows = tbody.querySelectorAll('tr[data-ih]');
  const n = rows.length;
  const h = (rows[n - 1].getBoundingClientRect().top - rows[1].getBoundingClientRect().top) / (n - 2);
  const top = tbody.getBoundingClientRect().top;
  const at = Math.floor((innerHeight / 2 - top) / h);
  const tr = document.elementFromPoint(300, top + (at + 0.5) * h).closest('tr');
  return {ih: tr && tr.dataset.ih, at};
})()"""


def expected(d: Daemon, query: str = "") -> list[list[str]]:
    """The list the page must show, sorted on Verified (descending): the share, then the
    name (descending too), then the info hash; the torrents whose name or hash holds the
    search. (The names here sort alike by code point and by the browser's collation.)"""
    rows = [(k, t["name"], t["verified_pieces"] / t["num_pieces"])
            for k, t in reported(d).items() if query in t["name"] or query in k]
    rows.sort(key=lambda r: r[0])
    rows.sort(key=lambda r: (r[2], r[1]), reverse=True)
    return [[k, name, pct_text(share)] for k, name, share in rows]


async def shows(page: Page, d: Daemon, what: str, query: str = "") -> list[list[str]]:
    """Waits until the page lists what the daemon reports, in order, and its table holds
    the rows of the list from the first on, as they must read; the list."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while True:
        want = await asyncio.to_thread(expected, d, query)
        order = await page.eval("window.piecedPage.rows()")
        table = await page.eval(TABLE)
        if (order == [k for k, _, _ in want] and table == want[:len(table)]
                and len(table) >= min(len(want), 20)):
            return want
        if loop.time() > end:
            raise AssertionError(f"{what}: the page lists {order[:5]}..., its table holds "
                                 f"{table[:5]}..., for {want[:5]}...")
        await asyncio.sleep(0.1)


def test_the_page_writes_the_rows_that_changed_in_place(tmp_path: Path) -> None:
    """300 torrents at rest, one that downloads, one verified whole; the list sorted on
    Verified, one torrent selected. As the download goes on, and torrents are removed
    (one, then 80 at once), added, and registered anew (unregistered and registered at
    once into an empty save path), the page lists what the daemon reports, in order; its
    table holds only the rows in and near the window, each the very row it was if its
    torrent did not change (written in place, not made again), the rest of the list
    stood for by spacers of the right height (scrolled to the middle of the list, the
    row drawn there is the one the list has there); the selection stays on its row, and
    a search stays applied to the torrents that come."""
    save = tmp_path / "dl"
    save.mkdir()
    (tmp_path / "empty").mkdir()
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            idle = register_many(c, save, 300)
            raw_a, data_a = torrent("alpha", pieces=8)
            alpha = c.register(raw_a, save)
            raw_b, data_b = torrent("beta", pieces=4)
            (save / "beta").write_bytes(data_b)
            beta = c.register(raw_b, save)
            assert c.recheck(beta)["verified"] == 4
            asyncio.run(_in_place(d, c, idle, alpha, data_a, beta, raw_b, tmp_path))
    finally:
        assert d.stop() == 0, d.stderr()


async def _in_place(d: Daemon, c: Client, idle: list[bytes], alpha: bytes, data_a: bytes,
                    beta: bytes, raw_b: bytes, tmp_path: Path) -> None:
    browser = await Browser.launch(tmp_path)
    try:
        page = await open_page(browser, f"http://{d.http}/")
        await page.wait_for("window.piecedPage.rows().length === 302", what="302 torrents")
        await page.eval("document.querySelector('th[data-key=pct]').click()")
        selected = idle[295].hex()  # (near the top of the list, sorted so)
        await page.eval(f"location.hash = '{selected}'")
        await page.wait_for(f"window.piecedPage.selected() === '{selected}'")
        await shows(page, d, "the list sorted on Verified")
        held = await page.eval("window.piecedPage.list()")
        assert 20 <= held["inTable"] < 100, held  # a screenful, not 302

        for p in range(4):  # alpha to 50%, a piece at a time: it moves up behind beta
            c.write_chunk(alpha, p, 0, data_a[p * BLOCK:(p + 1) * BLOCK])
            c.wait_writes()
            await verified(c, alpha, p + 1)
            await shows(page, d, f"alpha at {p + 1} of 8")
            if p == 0:  # The rows in the table now, to tell later if they are the same.
                await page.eval("window.kept = new Map([...document.querySelectorAll("
                                "'#torrents tbody tr[data-ih]')].map(tr => [tr.dataset.ih, tr]))")
        table = await shows(page, d, "alpha at 50%")
        assert [r[1:] for r in table[:3]] == [["beta", "100%"], ["alpha", "50.0%"],
                                              ["torrent-0299", "0%"]], table[:3]

        c.unregister(idle[298])
        await shows(page, d, "a torrent removed")
        new = c.register(torrent("torrent-0298b")[0], tmp_path / "dl")
        table = await shows(page, d, "a torrent added")
        assert table.index([new.hex(), "torrent-0298b", "0%"]) == 3, table[:6]
        # Just after a tick, so that both fall within the next one (if not, the page is
        # told of the torrent gone, and then of it come: it must show the same).
        ticks = (await page.eval("window.piecedPage.counts()"))["ticks"]
        await page.wait_for(f"window.piecedPage.counts().ticks > {ticks}")
        c.unregister(beta)
        c.register(raw_b, tmp_path / "empty")
        table = await shows(page, d, "beta registered anew, nothing verified")
        assert table[0][1] == "alpha" and [beta.hex(), "beta", "0%"] in table
        for k in idle[100:180]:
            c.unregister(k)
        table = await shows(page, d, "80 torrents removed")
        assert len(table) == 302 - 1 + 1 - 80

        same = await page.eval("[...document.querySelectorAll('#torrents tbody tr[data-ih]')]"
                               ".filter(tr => window.kept.get(tr.dataset.ih) === tr)"
                               ".map(tr => tr.dataset.ih)")
        made = await page.eval("[...document.querySelectorAll('#torrents tbody tr[data-ih]')]"
                               ".filter(tr => window.kept.has(tr.dataset.ih) && "
                               "window.kept.get(tr.dataset.ih) !== tr).map(tr => tr.dataset.ih)")
        assert len(same) >= 20 and alpha.hex() in same, (same, made)
        # (beta's registration went between two ticks, or else its row went and came)
        assert set(made) <= {beta.hex()}, made
        marked = await page.eval("[...document.querySelectorAll('#torrents tr.selected')]"
                                 ".map(tr => tr.dataset.ih)")
        assert marked == [selected]
        assert (await page.eval("window.piecedPage.list()"))["resyncs"] == 0

        # The middle of the list: the spacers above it stand for rows of the right height.
        await page.eval("window.scrollTo(0, document.querySelector('#torrents tbody')"
                        ".getBoundingClientRect().top + scrollY + 110 * 32)")
        middle = await page.wait_for(f"(() => {{ const m = {MIDDLE}; "
                                     "return m.ih && window.piecedPage.rows()[m.at] === m.ih && m; })()",
                                     what="the row drawn at the middle where the list has it")
        assert 100 < middle["at"] < 140, middle
        assert table[middle["at"]][0] == middle["ih"]
        window = await page.eval(TABLE)
        first = table.index(window[0])
        assert window == table[first:first + len(window)] and first > 60, (first, window[:3])
        await page.eval("window.scrollTo(0, 0)")
        await shows(page, d, "back at the top")

        # A search stays applied: of two torrents that come, the one it matches shows.
        search = ("(q => { const s = document.getElementById('search'); s.value = q;"
                  " s.dispatchEvent(new Event('input')); })")
        await page.eval(f"{search}('torrent-029')")
        await shows(page, d, "the search", "torrent-029")
        c.register(torrent("torrent-0299b")[0], tmp_path / "dl")
        c.register(torrent("other")[0], tmp_path / "dl")
        table = await shows(page, d, "the search, two torrents later", "torrent-029")
        assert [r[1] for r in table[:3]] == ["torrent-0299b", "torrent-0299", "torrent-0298b"]
        await page.eval(f"{search}('')")
        await shows(page, d, "the search cleared")
        await page.close()
        assert_clean(page)
    finally:
        await browser.close()


class LosingProxy:
    """Between the page and the daemon, on a port of its own: passes every request and
    answer on as they are, but when told to lose one, leaves out of the event stream the
    next tick that changes the torrent list (as a page that missed it)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.lose = False
        self.lost: list[bytes] = []
        self.streams = 0
        self.runner: web.AppRunner | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        return f"127.0.0.1:{self.runner.addresses[0][1]}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        asked = {k: v for k, v in request.headers.items()
                 if k.lower() in ("accept", "accept-encoding")}
        async with self.session.get(f"http://{self.upstream}{request.rel_url}",
                                    headers=asked) as r:
            if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
                body = await r.read()
                headers = {k: v for k, v in r.headers.items()
                           if k.lower() in ("content-type", "content-encoding", "cache-control")
                           or k.lower().startswith("x-pieced-")}
                return web.Response(status=r.status, body=body, headers=headers)
            self.streams += 1
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})
            await resp.prepare(request)
            buf = b""
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                async for chunk in r.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        if self.lose and event.startswith(b"event: tick") and b'"list":' in event:
                            self.lose = False
                            self.lost.append(event)
                            continue
                        await resp.write(event + b"\n\n")
            return resp

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.runner is not None:
            await self.runner.cleanup()


def test_a_page_that_missed_a_change_of_the_list_loads_it_anew(tmp_path: Path) -> None:
    """200 torrents; the page's event stream goes through a proxy that loses the tick in
    which one of them is removed: the page, told of nothing, still lists it; the next
    change of the list follows a version of it the page does not hold, so the page
    connects again, and shows the list as the daemon has it (the torrent removed, the
    one added)."""
    save = tmp_path / "dl"
    save.mkdir()
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ihs = register_many(c, save, 200)
            asyncio.run(_lost_change(d, c, ihs, tmp_path))
    finally:
        assert d.stop() == 0, d.stderr()


async def _lost_change(d: Daemon, c: Client, ihs: list[bytes], tmp_path: Path) -> None:
    proxy = LosingProxy(d.http)
    address = await proxy.start()
    browser = await Browser.launch(tmp_path)
    try:
        page = await open_page(browser, f"http://{address}/")
        await page.wait_for("window.piecedPage.rows().length === 200", what="200 rows")
        ticks = (await page.eval("window.piecedPage.counts()"))["ticks"]
        await page.wait_for(f"window.piecedPage.counts().ticks > {ticks}")
        proxy.lose = True
        c.unregister(ihs[3])
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while not proxy.lost:
            assert loop.time() < end, "no tick removed the torrent"
            await asyncio.sleep(0.05)
        assert f'"gone":["{ihs[3].hex()}"]'.encode() in proxy.lost[0]
        ticks = (await page.eval("window.piecedPage.counts()"))["ticks"]
        await page.wait_for(f"window.piecedPage.counts().ticks > {ticks + 1}")
        rows = await page.eval("window.piecedPage.rows()")
        assert ihs[3].hex() in rows and len(rows) == 200  # (nothing told it otherwise)

        new = c.register(torrent("newcomer")[0], tmp_path / "dl")
        await page.wait_for(f"window.piecedPage.list().resyncs === 1 && "
                            f"window.piecedPage.rows().includes('{new.hex()}')",
                            what="the list loaded anew")
        rows = await page.eval("window.piecedPage.rows()")
        assert sorted(rows) == sorted(await asyncio.to_thread(reported, d))
        assert ihs[3].hex() not in rows and len(rows) == 200
        assert proxy.streams == 2
        await page.close()
        assert_clean(page)
    finally:
        await browser.close()
        await proxy.close()
