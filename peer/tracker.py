"""Tracker announces in tiers (BEP 12): HTTP (BEP 3) with compact peer lists (BEP 23),
and UDP (BEP 15, ``udptracker.py``).

``parse_response`` is pure (bytes in, peers out) so it can be tested and fuzzed
alone; ``Tracker`` is the edge (aiohttp, or the UDP announcer) that tries each URL in turn. As libtorrent does,
the events are kept per tracker: each is sent ``started`` by the first announce it
answers, and ``completed`` once if it heard us as a leecher, whichever tracker
answered the announces between.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import re
import urllib.parse
from typing import Any, NamedTuple

import bencodepy


class TrackerError(Exception):
    """The tracker refused us, or answered something that is not an announce reply."""


Peers = list[tuple[str, int]]


class Reply(NamedTuple):
    peers: Peers
    interval: float  # seconds until the next announce
    tracker_id: bytes | None  # to be sent back in the next announces (BEP 3 "tracker id")

#: The longest announce reply read: 50 peers take 300 bytes in compact form, a few KiB
#: in the dictionary form; a tracker sending more is cut off, not buffered without end.
MAX_REPLY = 2 * 1024 * 1024
ANNOUNCE_TIMEOUT = 15.0  # seconds a tracker has to answer an announce
#: Peers taken from one reply of each kind (compact, listed, IPv6): a random choice of
#: them when it names more. A reply of 2 MiB names 340,000, and reading and dialling
#: them all held the loop (no peer answered) for 10 s at each announce.
MAX_PEERS = 1000
MAX_MESSAGE = 512  # characters of a tracker's refusal kept


def printable(text: str) -> str:
    """``text`` with its control characters escaped: a tracker's words (or a URL of a
    .torrent) printed as they came could forge lines of our output, or drive the
    terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


# A host name as a peer's address: letters, digits and hyphens in dot-separated labels.
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
                       r"(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def strides(size: int, stride: int) -> list[int] | range:
    """Where the whole entries of ``stride`` bytes begin in ``size`` bytes of compact
    peers: MAX_PEERS of them at most, a random choice in order when there are more."""
    count = size // stride
    if count <= MAX_PEERS:
        return range(0, count * stride, stride)
    return sorted(i * stride for i in random.sample(range(count), MAX_PEERS))


def sane_interval(interval: object, least: object = None) -> int:
    """Seconds until the next announce from what a tracker said: 1800 when it said
    nothing usable, never sooner than its ``least`` (a tracker may refuse, or ban,
    announces sooner), a day at most (a float of 400 digits is an OverflowError)."""
    if not isinstance(interval, int) or interval <= 0:
        interval = 1800
    if isinstance(least, int) and least > interval:
        interval = least
    return min(interval, 86400)


def parse_response(body: bytes) -> Reply:
    """The peers, re-announce interval and tracker id of an announce reply.

    Read leniently (bencode.py, not the daemon's canonical decoder): trackers in the
    wild send unsorted keys, and nothing here is keyed by a hash of the bytes.
    """
    try:
        msg = bencodepy.decode(body)
    except Exception as exc:
        raise TrackerError(f"reply is not bencode: {exc}") from None
    if not isinstance(msg, dict):
        raise TrackerError("reply is not a dictionary")
    if b"failure reason" in msg:
        reason = msg[b"failure reason"]
        text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        raise TrackerError(f"tracker says: {printable(text[:MAX_MESSAGE])}")
    interval = sane_interval(msg.get(b"interval"), msg.get(b"min interval"))
    peers: Peers = []
    raw = msg.get(b"peers", b"")
    if isinstance(raw, bytes):  # compact: 4 bytes of address, 2 of port
        for i in strides(len(raw), 6):
            ip = ".".join(str(b) for b in raw[i : i + 4])
            port = int.from_bytes(raw[i + 4 : i + 6], "big")
            if port:
                peers.append((ip, port))
    elif isinstance(raw, list):
        for entry in (raw if len(raw) <= MAX_PEERS else random.sample(raw, MAX_PEERS)):
            if not isinstance(entry, dict):
                continue
            addr, num = entry.get(b"ip"), entry.get(b"port")
            if isinstance(addr, bytes) and isinstance(num, int) and 0 < num < 65536:
                try:
                    host = addr.decode("ascii")
                    peers.append((str(ipaddress.ip_address(host)), num))
                except UnicodeDecodeError:
                    continue
                except ValueError:  # a DNS name (BEP 3 allows one): resolved when dialled
                    if _HOSTNAME.fullmatch(host):
                        peers.append((host.lower().rstrip("."), num))
    raw6 = msg.get(b"peers6", b"")
    if isinstance(raw6, bytes):
        for i in strides(len(raw6), 18):
            ip = str(ipaddress.IPv6Address(raw6[i : i + 16]))
            port = int.from_bytes(raw6[i + 16 : i + 18], "big")
            if port:
                peers.append((ip, port))
    tid = msg.get(b"tracker id")
    return Reply(peers, float(interval), tid if isinstance(tid, bytes) and tid else None)


def announce_url(base: str, info_hash: bytes, peer_id: bytes, port: int, event: str,
                 counters: dict[str, int], tracker_id: bytes | None = None) -> str:
    query = {
        "info_hash": info_hash,
        "peer_id": peer_id,
        "port": str(port),
        "uploaded": str(counters.get("uploaded", 0)),
        "downloaded": str(counters.get("downloaded", 0)),
        "left": str(counters.get("left", 0)),
        "compact": "1",
        "numwant": "50",
    }
    if event:
        query["event"] = event
    if tracker_id is not None:
        query["trackerid"] = tracker_id
    base = base.split("#", 1)[0]  # a fragment is not sent: the query goes before it
    sep = "&" if "?" in base else "?"
    return base + sep + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)


async def _read_reply(resp: Any, url: str) -> bytes:
    """The reply's body, refused (TrackerError) past MAX_REPLY bytes."""
    too_long = TrackerError(f"{url}: reply larger than {MAX_REPLY} bytes")
    if resp.content_length is not None and resp.content_length > MAX_REPLY:
        raise too_long
    body = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_REPLY:
            raise too_long
    return bytes(body)


LEECHER = "leecher"  # a tracker's state: it heard ``started`` while we were not complete
DONE = "done"  # it heard ``completed``, or heard ``started`` when we were complete already


class Tracker:
    """The torrent's trackers, in tiers (BEP 12): an announce asks each in turn, tier
    after tier, until one answers; the one that answered moves to the front of its
    tier, and is asked first next time."""

    def __init__(self, tiers: list[list[str]], info_hash: bytes, peer_id: bytes,
                 port: int) -> None:
        self.tiers = [list(t) for t in tiers if t]
        self.info_hash = info_hash
        self.peer_id = peer_id
        self.port = port
        self._session: Any = None
        self.answered: list[str] = []  # the URLs that took an announce of ours, in order
        self._heard: dict[str, str] = {}  # URL -> LEECHER or DONE, once it answered
        self._ids: dict[str, bytes] = {}  # URL -> the tracker id it gave
        self._udp: Any = None  # the UdpAnnouncer, once a udp:// URL is asked
        # URL -> the event of an announce to it that was cut short (the run ended while
        # the tracker took its time): it may have heard it, and a ``completed`` is not
        # said twice (the goodbye sends ``stopped`` alone then).
        self._cut_short: dict[str, str] = {}

    @property
    def urls(self) -> list[str]:
        return [u for tier in self.tiers for u in tier]

    def event(self, url: str, complete: bool) -> str:
        """What the next announce to ``url`` says, we being ``complete`` or not."""
        heard = self._heard.get(url)
        if heard is None:
            return "started"  # (again after a failed one, as libtorrent does)
        if complete and heard == LEECHER and self._cut_short.get(url) != "completed":
            return "completed"
        return ""

    async def announce(self, counters: dict[str, int], complete: bool) -> Reply:
        import aiohttp

        last: Exception = TrackerError("no tracker")
        for tier in self.tiers:
            for url in list(tier):  # in turn, until one answers
                try:
                    reply = await self._announce(url, self.event(url, complete), counters,
                                                 complete)
                except aiohttp.TooManyRedirects:
                    last = TrackerError(f"{url}: redirected too many times")
                    continue
                except aiohttp.RedirectClientError as exc:  # (to a URL not HTTP's)
                    last = TrackerError(f"{url}: redirected to {printable(str(exc)[:200])}, "
                                        "which is not an HTTP tracker's URL")
                    continue
                except (aiohttp.ClientError, TrackerError) as exc:
                    last = exc if str(exc).startswith(url) else TrackerError(
                        f"{url}: {str(exc) or type(exc).__name__}")
                    continue
                except TimeoutError:
                    last = TrackerError(f"{url}: no answer in {ANNOUNCE_TIMEOUT:.0f} s")
                    continue
                except Exception as exc:  # whatever else one URL does (a host IDNA
                    last = TrackerError(f"{url}: {type(exc).__name__}: {exc}")  # refuses)
                    continue
                tier.remove(url)
                tier.insert(0, url)
                return reply
        raise last

    async def goodbye(self, counters: dict[str, int], complete: bool) -> None:
        """Tell each tracker that took an announce of ours ``stopped`` (``completed``
        first if it is owed), each tracker on its own: one that does not answer holds
        up no other (libtorrent tells only those too)."""
        async def tell(url: str) -> None:
            for event in (("completed", "stopped") if self.event(url, complete) == "completed"
                          else ("stopped",)):
                with contextlib.suppress(Exception):  # (it may be gone: the next is said)
                    await self._announce(url, event, counters, complete)

        await asyncio.gather(*(tell(url) for url in self.answered))

    async def _announce(self, url: str, event: str, counters: dict[str, int],
                        complete: bool = False) -> Reply:
        try:
            if url.startswith("udp://"):
                reply = await self._announce_udp(url, event, counters)
            else:
                reply = await self._announce_http(url, event, counters)
        except asyncio.CancelledError:
            self._cut_short[url] = event
            raise
        self._cut_short.pop(url, None)
        if url not in self.answered:
            self.answered.append(url)
        if event == "started":
            self._heard[url] = DONE if complete else LEECHER
        elif event == "completed":
            self._heard[url] = DONE
        if reply.tracker_id is not None:
            self._ids[url] = reply.tracker_id[:256]
        return reply

    async def _announce_udp(self, url: str, event: str, counters: dict[str, int]) -> Reply:
        from .udptracker import UdpAnnouncer

        if self._udp is None:
            self._udp = UdpAnnouncer(self.info_hash, self.peer_id, self.port)
        reply: Reply = await self._udp.announce(url, event, counters)
        return reply

    async def _announce_http(self, url: str, event: str, counters: dict[str, int]) -> Reply:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=ANNOUNCE_TIMEOUT))
        full = announce_url(url, self.info_hash, self.peer_id, self.port, event, counters,
                            self._ids.get(url))
        async with self._session.get(full) as resp:
            if resp.status != 200:
                raise TrackerError(f"{url}: HTTP {resp.status}")
            body = await _read_reply(resp, url)
        try:
            return parse_response(body)
        except TrackerError as exc:
            raise TrackerError(f"{url}: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
