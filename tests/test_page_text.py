"""What the status page makes of the text and the addresses it is given, in headless
Chromium (``tests/browser.py``) against a real daemon: long error messages and paths,
names that carry bidirectional controls, and a v2 info hash (64 hex digits) in the
fragment."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

from pieced.protocol.client import Client

from tests.browser import Browser
from tests.conftest import Daemon
from tests.realtools import make_payload, make_torrent_lt
from tests.test_page import assert_clean, open_page

RLO, LRI, PDI = "\u202e", "\u2066", "\u2069"


def report(d: Daemon, ih: bytes) -> dict[str, object]:
    with urllib.request.urlopen(f"http://{d.http}/torrents/{ih.hex()}", timeout=10) as r:
        result: dict[str, object] = json.loads(r.read())
        return result


def test_a_v2_info_hash_in_the_fragment_selects_its_torrent(tmp_path: Path) -> None:
    """``/#`` and the 64 hex digits of a v2 (or hybrid) torrent's info hash show that
    torrent, as its 40-digit key does; 64 digits no torrent has say so."""
    content = make_payload(tmp_path / "src", {"a.bin": 200_000, "b.bin": 90_000}, seed=3)
    content = content.rename(content.parent / "v2")
    hybrid = make_payload(tmp_path / "src", {"c.bin": 150_000, "d.bin": 10}, seed=4)
    hybrid = hybrid.rename(hybrid.parent / "hy")
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(make_torrent_lt(content, 32768, "v2"), tmp_path / "src")
            ih_h = c.register(make_torrent_lt(hybrid, 32768, "hybrid"), tmp_path / "src")
        v2, v2_h = str(report(d, ih)["info_hash_v2"]), str(report(d, ih_h)["info_hash_v2"])
        assert len(v2) == 64 and v2[:40] == ih.hex() and v2_h[:40] != ih_h.hex()

        async def look() -> None:
            browser = await Browser.launch(tmp_path)
            try:
                for full, key, name in ((v2, ih, "v2"), (v2_h.upper(), ih_h, "hy")):
                    page = await open_page(browser, f"http://{d.http}/#{full}")
                    await page.wait_for(f"window.piecedPage.selected() === '{key.hex()}' && "
                                        "window.piecedPage.counts().pieces > 0",
                                        what=f"the torrent of {full} selected, its map loaded")
                    assert await page.eval("document.getElementById('d-name').textContent") == name
                    assert await page.eval("document.getElementById('detail').hidden") is False
                    assert await page.eval("document.querySelector('#torrents tr.selected')"
                                           ".dataset.ih") == key.hex()
                    assert await page.eval("document.getElementById('unknown').hidden") is True
                    await page.close()
                    assert_clean(page)
                unknown = "ab" * 32
                page = await open_page(browser, f"http://{d.http}/#{unknown}")
                text = await page.wait_for(
                    "(() => { const u = document.getElementById('unknown');"
                    " return !u.hidden && u.textContent; })()", what="the hash said unknown")
                assert unknown in text and "no torrent" in text.lower(), text
                assert await page.eval("window.piecedPage.selected()") is None
                assert await page.eval("document.getElementById('detail').hidden") is True
                # Choosing a torrent then puts the notice away.
                await page.eval(f"location.hash = '{ih.hex()}'")
                await page.wait_for(f"window.piecedPage.selected() === '{ih.hex()}'")
                assert await page.eval("document.getElementById('unknown').hidden") is True
                await page.close()
                assert_clean(page)
            finally:
                await browser.close()

        asyncio.run(look())
    finally:
        assert d.stop() == 0, d.stderr()


def test_long_error_messages_and_paths_wrap_rather_than_widen_the_page(tmp_path: Path) -> None:
    """In a torrent of a 200-character name, a file 900 characters deep swapped for a
    symlink: the recheck's error names it, and the errors table shows the whole message,
    wrapped within its column; the page is no wider than the window, and the files
    table (its paths cut, whole in their tooltips) stays out of the errors' column."""
    deep = "/".join(f"{k}-" + "d" * 120 for k in range(7))
    content = make_payload(tmp_path / "dl", {f"{deep}/victim.bin": 100_000, "b.bin": 70_000},
                           seed=5)
    content = content.rename(content.parent / ("long-name-" + "n" * 190))
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(make_torrent_lt(content, 16384, "v1"), tmp_path / "dl")
            c.recheck(ih)
            victim = content / deep / "victim.bin"
            (tmp_path / "elsewhere").write_bytes(victim.read_bytes())
            victim.unlink()
            victim.symlink_to(tmp_path / "elsewhere")
            c.recheck(ih, full=True)
        errors = report(d, ih)["errors"]
        assert isinstance(errors, list) and errors
        longest = max(len(str(e["message"])) for e in errors)
        assert longest > 900, errors

        async def look() -> None:
            browser = await Browser.launch(tmp_path)
            try:
                page = await open_page(browser, f"http://{d.http}/#{ih.hex()}", 1200, 900)
                await page.wait_for("!document.getElementById('errors').hidden",
                                    what="the errors table shown")
                await page.wait_for("document.querySelectorAll('#files tbody tr').length === 2")
                await page.screenshot(tmp_path / "long-errors.png")
                sizes = await page.eval(
                    "(() => { const m = document.querySelector('#errors td.msg');"
                    " const r = m.getBoundingClientRect();"
                    " return {scroll: document.documentElement.scrollWidth,"
                    " window: document.documentElement.clientWidth,"
                    " right: r.right, height: r.height, text: m.textContent.length,"
                    " panel: document.getElementById('detail').getBoundingClientRect().right,"
                    " files: document.getElementById('files').getBoundingClientRect().right,"
                    " errors: document.getElementById('errors').getBoundingClientRect().left,"
                    " list: document.getElementById('torrents').getBoundingClientRect().right,"
                    " path: document.querySelector('#files td.path').title.length}; })()")
                assert sizes["scroll"] <= sizes["window"], sizes  # no horizontal scrolling
                assert sizes["right"] <= sizes["panel"], sizes  # within its panel
                assert sizes["height"] > 60, sizes  # on several lines
                assert sizes["text"] >= longest - 20, sizes  # all of it
                assert sizes["files"] <= sizes["errors"], sizes  # the columns apart
                assert sizes["list"] <= sizes["panel"], sizes
                assert sizes["path"] > 200, sizes  # the path whole in its tooltip
                await page.close()
                assert_clean(page)
            finally:
                await browser.close()

        asyncio.run(look())
    finally:
        assert d.stop() == 0, d.stderr()


def test_bidirectional_controls_in_names_never_reach_the_page(tmp_path: Path) -> None:
    """A torrent named ``holiday<RLO>gpj.exe`` (which a browser otherwise draws as
    "holidayexe.jpg") with files whose names carry such controls too: the torrent list,
    the detail's title, the files table, the hover and the tooltips never show the
    control itself. The names are stored as libtorrent stores them (the controls left
    out); the page would show any that came as a visible ``[U+202E]``."""
    name = f"holiday{RLO}gpj.exe"
    files = {f"invoice{RLO}fdp.scr": 70_000, f"notes{LRI}x{PDI}.txt": 20_000}
    root = make_payload(tmp_path / "dl", files, seed=6)
    content = root.rename(root.parent / name)
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(make_torrent_lt(content, 16384, "v1"), tmp_path / "dl")

        async def look() -> None:
            browser = await Browser.launch(tmp_path)
            try:
                page = await open_page(browser, f"http://{d.http}/#{ih.hex()}")
                await page.wait_for("window.piecedPage.counts().pieces > 0 && "
                                    "document.querySelectorAll('#files tbody tr').length === 2",
                                    what="the torrent and its files")
                shown = await page.eval(
                    "(() => { const q = (s) => [...document.querySelectorAll(s)];"
                    " return {row: q('#torrents tbody td.name').map(e => e.textContent),"
                    " rowTitle: q('#torrents tbody td.name').map(e => e.title),"
                    " head: document.getElementById('d-name').textContent,"
                    " paths: q('#files td.path').map(e => e.textContent),"
                    " pathTitles: q('#files td.path').map(e => e.title)}; })()")
                pt = await page.eval("window.piecedPage.cellPoint(0)")
                await page.mouse_move(pt["x"], pt["y"])
                shown["tip"] = await page.wait_for(
                    "(() => { const t = window.piecedPage.tip(); return t && t.includes('invoice') && t; })()",
                    what="the hover naming the first file")
                await page.screenshot(tmp_path / "bidi.png")
                await page.close()
                assert_clean(page)
            finally:
                await browser.close()
            text = json.dumps(shown, ensure_ascii=False)
            for control in (RLO, LRI, PDI):
                assert control not in text, shown
            assert "holidaygpj.exe" in shown["head"], shown
            assert all("holidaygpj.exe" in s for s in shown["row"] + shown["rowTitle"]), shown
            assert sorted(shown["paths"]) == sorted(shown["pathTitles"]) == [
                "holidaygpj.exe/invoicefdp.scr", "holidaygpj.exe/notesx.txt"], shown
            assert "invoicefdp.scr" in shown["tip"], shown

        asyncio.run(look())
    finally:
        assert d.stop() == 0, d.stderr()
