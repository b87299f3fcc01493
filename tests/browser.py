"""Headless Chromium driven through the DevTools protocol over aiohttp's websocket client.

No browser driver and no dependency the daemon does not already have: Chromium is
started with ``--remote-debugging-port=0``, says where its DevTools socket is on
stderr, and every page is a session multiplexed on that one socket (flat mode). A page
records what the tests must not see: uncaught exceptions, console errors (CSP
violations among them) and requests that failed or were answered >= 400.

``make tools`` installs Debian's ``chromium``; when it is missing the tests fail, saying
so, rather than skip.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--no-default-browser-check",
    "--password-store=basic", "--use-mock-keychain", "--hide-scrollbars", "--mute-audio",
    # Ten tabs open at once are all "in the foreground": no throttled timers.
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    # Loopback only: no name is resolved (pages are asked for by address), no service
    # of the browser's own is called.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--dns-prefetch-disable", "--no-pings", "--disable-domain-reliability",
    "--disable-client-side-phishing-detection", "--disable-default-apps",
    "--disable-breakpad", "--metrics-recording-only", "--no-proxy-server",
    "--disable-features=OptimizationHints,MediaRouter,Translate,NetworkTimeServiceQuerying,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater,DnsOverHttps",
]


# The browser stands for an operator's machine, not the server's: it runs at the lowest
# priority, so that on a small test machine what is measured of the daemon is the
# daemon, not the two of them fighting over the same cores (ten pages are a score of
# browser threads waking at once: at nice 10 together they still outweigh a thread of
# the daemon).
NICE = 19


def lower_priority() -> list[str]:
    """The command prefix that starts the browser niced. Chromium raises some of its
    threads to nice -8 when it may (as root): without CAP_SYS_NICE it may not."""
    prefix = ["nice", "-n", str(NICE)]
    setpriv = shutil.which("setpriv")  # util-linux, in every Debian
    if os.geteuid() == 0 and setpriv:
        prefix = [setpriv, "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "--", *prefix]
    return prefix


class Page:
    """One tab, and what went wrong in it."""

    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id
        self.errors: list[str] = []  # exceptions and console errors
        self.failed: list[str] = []  # requests that failed or got >= 400
        self._urls: dict[str, str] = {}
        self._loaded = asyncio.Event()

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session_id)

    def on_event(self, method: str, p: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append(f"exception: {d.get('exception', {}).get('description') or d['text']}")
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            self.errors.append("console.error: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            e = p["entry"]
            self.errors.append(f"log ({e['source']}): {e['text']} {e.get('url', '')}")
        elif method == "Network.requestWillBeSent":
            self._urls[p["requestId"]] = p["request"]["url"]
        elif method == "Network.responseReceived" and p["response"]["status"] >= 400:
            self.failed.append(f"{p['response']['status']} {p['response']['url']}")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            self.failed.append(f"{p['errorText']} {self._urls.get(p['requestId'], '?')}")
        elif method == "Page.loadEventFired":
            self._loaded.set()

    async def goto(self, url: str, timeout: float = 30) -> None:
        self._loaded.clear()
        r = await self.send("Page.navigate", {"url": url})
        if r.get("errorText"):
            raise AssertionError(f"navigation to {url} failed: {r['errorText']}")
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def eval(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise AssertionError(f"{expression}: {d.get('exception', {}).get('description') or d['text']}")
        return r["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20, what: str = "") -> Any:
        """Poll until the expression is truthy; its value."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        value = None
        while loop.time() < end:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what or expression} (last: {value!r})")

    async def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            m = await self.send("Page.getLayoutMetrics")
            size = m["cssContentSize"]
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        r = await self.send("Page.captureScreenshot", params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    async def mouse_move(self, x: float, y: float) -> None:
        await self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    async def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {
                "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    async def close(self) -> None:
        await self.browser.send("Target.closeTarget", {"targetId": self.target_id})
        self.browser.pages.pop(self.session_id, None)


class Browser:
    """A headless Chromium of its own (profile in a temporary folder), stopped by
    :meth:`close`: its whole process group, which no one else is in."""

    def __init__(self, proc: asyncio.subprocess.Process, profile: Path) -> None:
        self.proc = proc
        self.profile = profile
        self.pages: dict[str, Page] = {}
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.log: list[str] = []

    @classmethod
    async def launch(cls, workdir: Path) -> Browser:
        exe = shutil.which("chromium") or CHROMIUM
        if not os.path.exists(exe):
            raise AssertionError("chromium is not installed: `make tools` installs it "
                                 "(apt-get install chromium)")
        profile = workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *lower_priority(), exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
            "about:blank", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            # A process group of its own, to stop every process of it at the end; not a
            # session of its own: where the kernel shares CPU time per session
            # (autogroup), that would put it on a par with the daemon, nice or not.
            process_group=0)
        self = cls(proc, profile)
        try:
            url = await asyncio.wait_for(self._devtools_url(), 30)
            self._tasks.append(asyncio.create_task(self._drain_stderr()))
            self._http = aiohttp.ClientSession()
            self._ws = await self._http.ws_connect(url, max_msg_size=0)
            self._tasks.append(asyncio.create_task(self._read()))
        except BaseException:
            await self.close()
            raise
        return self

    async def _devtools_url(self) -> str:
        assert self.proc.stderr is not None
        while True:
            line = (await self.proc.stderr.readline()).decode(errors="replace")
            if not line:
                raise AssertionError("chromium exited before it listened:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                return m.group(1)

    async def _drain_stderr(self) -> None:
        """Chromium logs on stderr all along: a full pipe would stop it."""
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))
            del self.log[:-200]

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._waiting.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(AssertionError(f"DevTools: {data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
            elif "sessionId" in data and data["sessionId"] in self.pages:
                self.pages[data["sessionId"]].on_event(data["method"], data.get("params", {}))
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(AssertionError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session_id: str | None = None, timeout: float = 30) -> dict[str, Any]:
        assert self._ws is not None
        mid = next(self._ids)
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session_id is not None:
            msg["sessionId"] = session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[mid] = fut
        await self._ws.send_str(json.dumps(msg))
        return await asyncio.wait_for(fut, timeout)

    async def new_page(self, width: int = 1400, height: int = 1000,
                       own_context: bool = False) -> Page:
        """A tab; ``own_context``: in a browser context of its own (as another user's
        browser: its own cookies and its own connections, where a browser keeps at
        most six per server, each open page's event stream holding one)."""
        params: dict[str, Any] = {"url": "about:blank"}
        if own_context:
            ctx = await self.send("Target.createBrowserContext", {"disposeOnDetach": True})
            params["browserContextId"] = ctx["browserContextId"]
        target = await self.send("Target.createTarget", params)
        attached = await self.send("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True})
        page = Page(self, target["targetId"], attached["sessionId"])
        self.pages[page.session_id] = page
        for domain in ("Page", "Runtime", "Log", "Network"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await self.send("Browser.close", timeout=5)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group started for it alone
            await self.proc.wait()
        for task in self._tasks:
            task.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        shutil.rmtree(self.profile, ignore_errors=True)
