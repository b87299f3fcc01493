"""Which host names the HTTP server answers for, against a real daemon: without a token
it is on loopback, and a page of another site whose name was made to point at 127.0.0.1
(DNS rebinding) is that site's own origin to a browser, free to read what it is
answered. Only the Host it names tells it apart: such requests get 421, on every route.
Raw sockets send exactly the Host (and request line) under test; headless Chromium,
told that a name of another site is 127.0.0.1, is the rebinding itself."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
from pieced.protocol.client import Client

import tests.browser
from tests.browser import Browser
from tests.conftest import Daemon, proc_bytes
from tests.realtools import make_payload, make_torrent_lt
from tests.test_page import ROUTES, TOKEN, open_page

SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options",
                    "referrer-policy", "cross-origin-resource-policy")


def ask(address: str, head: str) -> tuple[int, dict[str, str], bytes]:
    """Sends ``head`` (a request line and headers, no body) on a connection of its own;
    the status, the headers (names in lower case) and the body (what came of it, for a
    stream that never ends: the headers are enough)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as s:
        s.sendall(head.encode("latin-1") + b"Connection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"no answer to {head!r}: {data!r}"
            data += chunk
        top, _, body = data.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", -1))
        while 0 <= len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body


def get(address: str, path: str, host: str | None) -> tuple[int, dict[str, str], bytes]:
    return ask(address, f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else ""))


def torrent(tmp_path: Path) -> bytes:
    content = make_payload(tmp_path / "private-save-path", {"a.bin": 70_000}, seed=2)
    return make_torrent_lt(content, 32768, "v1")


def test_requests_for_another_host_name_get_421_on_every_route(tmp_path: Path) -> None:
    """Without a token: a request whose Host is another name (with or without the port,
    a name that merely starts with a loopback one, another loopback address, none at
    all), or whose request line is an absolute URI of another host, gets 421 with a
    word on the names taken and the usual security headers, on every route, the event
    stream and /healthz included, and none of the daemon's data. 127.0.0.1, localhost
    and [::1], in any case, with or without the port, are answered as before, as are a
    request of HTTP/1.0 that names no host and an absolute URI of 127.0.0.1. A daemon
    listening on another loopback address (127.0.0.2) takes that address too. With a
    token, the token decides, whatever the name."""
    raw = torrent(tmp_path)
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "private-save-path").hex()
        port = d.http.rsplit(":", 1)[1]
        paths = [r.replace("{ih}", ih) for r in ROUTES]
        paths[paths.index(f"/page/files/{ih}")] += "?first=0&last=1"
        foreign = ["evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}",
                   "localhost.evil.example", "127.0.0.2", f"[::2]:{port}", "0.0.0.0",
                   "LOCALHOST.example", ""]
        for path in paths:
            for host in foreign:
                status, headers, body = get(d.http, path, host)
                assert status == 421, (path, host, status, body)
                assert b"127.0.0.1, localhost, [::1]" in body, body
                assert b"private-save-path" not in body
                assert "text/plain" in headers["content-type"], headers
                assert all(h in headers for h in SECURITY_HEADERS), headers
                assert "default-src 'none'" in headers["content-security-policy"]
        for target in (f"http://evil.example:{port}/torrents", "http://evil.example/healthz"):
            status, _, body = ask(d.http, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n")
            assert status == 421 and b"private-save-path" not in body, (target, status, body)

        loopback = ["127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}",
                    "[::1]", f"[::1]:{port}", f"[0:0:0:0:0:0:0:1]:{port}"]
        for host in loopback:
            for path in paths:
                status, _, body = get(d.http, path, host)
                assert status == 200, (path, host, status, body)
            status, _, body = get(d.http, "/torrents", host)
            assert b"private-save-path" in body, (host, body)
            status, headers, _ = get(d.http, "/page/events", host)
            assert (status, headers["content-type"]) == (200, "text/event-stream"), host
        status, _, body = ask(d.http, "GET /torrents HTTP/1.0\r\n")
        assert status == 200 and b"private-save-path" in body
        for target in (f"http://127.0.0.1:{port}/stats", "http://localhost/healthz"):
            status, _, _ = ask(d.http, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert status == 200, target
    finally:
        assert d.stop() == 0, d.stderr()

    other = tmp_path / "other"
    other.mkdir()
    d = Daemon(other, env={"PIECED_HTTP_HOST": "127.0.0.2"})
    try:
        assert d.http.startswith("127.0.0.2:"), d.http
        port = d.http.rsplit(":", 1)[1]
        for host in (f"127.0.0.2:{port}", "127.0.0.2", f"localhost:{port}"):
            assert get(d.http, "/stats", host)[0] == 200, host
        status, _, body = get(d.http, "/stats", "evil.example")
        assert status == 421 and b"127.0.0.2" in body, body
    finally:
        assert d.stop() == 0, d.stderr()

    tokened = tmp_path / "tokened"
    tokened.mkdir()
    d = Daemon(tokened, env={"PIECED_HTTP_TOKEN": TOKEN})
    try:
        for host in ("evil.example", "127.0.0.1"):
            status, _, _ = ask(d.http, f"GET /stats HTTP/1.1\r\nHost: {host}\r\n"
                                       f"Authorization: Bearer {TOKEN}\r\n")
            assert status == 200, host
            assert get(d.http, "/stats", host)[0] == 401, host
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_page_of_another_site_rebound_to_loopback_reads_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chromium resolves rebound.example to 127.0.0.1, as a browser does once that
    site's DNS answer changed under it: a page of http://rebound.example:PORT is then
    the same origin as what the daemon answers there. It gets 421 for the page and for
    what its own script asks for (/torrents), none of the torrents' names or paths;
    the same browser at 127.0.0.1 reads them."""
    rules = [f for f in tests.browser.FLAGS if f.startswith("--host-resolver-rules=")]
    assert len(rules) == 1
    flags = [f for f in tests.browser.FLAGS if f not in rules]
    monkeypatch.setattr(tests.browser, "FLAGS", [
        *flags, "--host-resolver-rules=MAP rebound.example 127.0.0.1, " + rules[0].split("=", 1)[1]])
    raw = torrent(tmp_path)
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            c.register(raw, tmp_path / "private-save-path")
        port = d.http.rsplit(":", 1)[1]
        read = ("fetch('/torrents').then(async r => [r.status, await r.text()])"
                ".catch(e => [0, String(e)])")

        async def look() -> None:
            browser = await Browser.launch(tmp_path)
            try:
                page = await open_page(browser, f"http://rebound.example:{port}/")
                assert await page.eval("location.host") == f"rebound.example:{port}"
                text = await page.eval("document.body.innerText")
                assert text.startswith("421"), text
                status, body = await page.eval(read)
                assert status == 421 and "private-save-path" not in body, (status, body)
                await page.close()
                page = await open_page(browser, f"http://{d.http}/")
                status, body = await page.eval(read)
                assert status == 200 and "private-save-path" in body, (status, body)
                await page.close()
            finally:
                await browser.close()

        asyncio.run(look())
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_request_of_more_header_lines_than_a_browser_sends_is_refused(
        tmp_path: Path) -> None:
    """A request's headers are held until they end: 128 lines of 8 KiB (aiohttp's
    defaults) made a megabyte a connection, and 300 such connections took the daemon's
    memory from 218 to 343 MB. Past 32 lines, a request gets 400 at once; a browser's
    requests, with 20 lines, are answered."""
    from pieced.daemon.http import MAX_HEADERS

    d = Daemon(tmp_path)
    try:
        base = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        ok = base + "".join(f"X-Ok-{i}: {'v' * 100}\r\n" for i in range(18))
        assert ask(d.http, ok)[0] == 200
        many = base + "".join(f"X-Many-{i}: v\r\n" for i in range(MAX_HEADERS + 1))
        status, _, body = ask(d.http, many)
        assert status == 400, (status, body)
        assert MAX_HEADERS == 32
        assert ask(d.http, ok)[0] == 200  # (the next one is answered as ever)
    finally:
        d.stop()


def test_requests_with_endless_header_lines_at_once_leave_the_daemon_as_it_was(
        tmp_path: Path) -> None:
    """Sixty connections send a header line of 8 MB at once. Each is answered 400 at its
    first 8 KiB; but what a connection sent after that was parsed again, chunk by chunk,
    each chunk an error queued with the chunk held in its traceback (32 a connection), in
    reference cycles that the collector seldom reached: the daemon grew by half a
    gigabyte and stayed so (120 such connections, twice: 5 GB). What a connection sends
    after its request failed is dropped."""
    d = Daemon(tmp_path)
    try:
        assert ask(d.http, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")[0] == 200
        before = proc_bytes(d.proc.pid)
        host, port = d.http.rsplit(":", 1)
        line = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * (8 << 20)

        async def one() -> bytes:
            r, w = await asyncio.open_connection(host, int(port))
            try:  # (closed with bytes of it unread, the connection may be reset)
                w.write(line + b"\r\n\r\n")
                await asyncio.wait_for(w.drain(), 60)
                return await asyncio.wait_for(r.readline(), 60)
            except ConnectionError:
                return b"reset"
            finally:
                w.close()

        async def wave() -> list[bytes]:
            return await asyncio.gather(*(one() for _ in range(60)))

        answers = asyncio.run(wave())
        assert all(a[9:12] == b"400" or a == b"reset" for a in answers), set(answers)
        grown = proc_bytes(d.proc.pid) - before
        print(f"RSS +{grown / 2**20:.0f} MiB")
        assert grown < 96 * 2**20, grown
        assert ask(d.http, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")[0] == 200
    finally:
        d.stop()


def test_clients_without_the_token_neither_slow_nor_lock_out_those_with_it(
        tmp_path: Path) -> None:
    """With a token, 130 connections ask without it, 50 requests at a time again and
    again. Refused after their turn, they took the turns of every client (50 a second
    for all): requests with the token waited behind theirs, and, their connections
    counted as serving while they waited, took no place (128) and were closed
    unanswered, the open event stream of the status page chosen to go first. A request
    without the token is refused before any turn, its connection with it, at a pace of
    their own; those with it are answered, and the stream stays."""
    d = Daemon(tmp_path, env={"PIECED_HTTP_TOKEN": TOKEN})
    host, port = d.http.rsplit(":", 1)
    stop = threading.Event()
    refused = [0]

    def stranger() -> None:
        ask_bare = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 50
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.create_connection(
                    (host, int(port)), timeout=5) as s:
                while not stop.is_set():
                    s.sendall(ask_bare)
                    got = s.recv(65536)
                    if not got:
                        break
                    refused[0] += got.count(b" 401 ")
                    time.sleep(0.2)

    threads = [threading.Thread(target=stranger, daemon=True) for _ in range(130)]
    try:
        with socket.create_connection((host, int(port)), timeout=10) as stream:
            stream.sendall(f"GET /page/events?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n"
                           .encode())
            assert b" 200 " in stream.recv(65536).split(b"\r\n", 1)[0]
            for t in threads:
                t.start()
            time.sleep(3)
            for k in range(10):
                path = "/metrics" if k % 2 else "/healthz"
                status, _, body = ask(d.http, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                              f"Authorization: Bearer {TOKEN}\r\n")
                assert status == 200, (status, body)
                time.sleep(0.3)
            stream.settimeout(5)
            assert stream.recv(65536), "the event stream was closed"
        assert refused[0] > 0
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        d.stop()
