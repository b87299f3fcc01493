"""Tracker announces in tiers (BEP 12): HTTP (BEP 3) with compact peer lists (BEP 23),
and UDP (BEP 15, ``udptracker.py``).

``parse_response`` is pure (bytes in, peers out) so it can be tested and fuzzed
alone; ``Tracker`` is the edge (``http_get``, or the UDP announcer) that tries each URL in
turn. As libtorrent does,
the events are kept per tracker: each is sent ``started`` by the first announce it
answers, and ``completed`` once if it heard us as a leecher, whichever tracker
answered the announces between.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import random
import re
import socket
import ssl
import urllib.parse
import zlib
from typing import Any, NamedTuple

import bencodepy


class TrackerError(Exception):
    """The tracker refused us, or answered something that is not an announce reply."""


Peers = list[tuple[str, int]]


class Reply(NamedTuple):
    peers: Peers
    interval: float  # seconds until the next announce
    tracker_id: bytes | None  # to be sent back in the next announces (BEP 3 "tracker id")
    warning: str | None = None  # its "warning message", escaped and cut: to be shown

#: The longest announce reply read: 50 peers take 300 bytes in compact form, a few KiB
#: in the dictionary form; a tracker sending more is cut off, not buffered without end.
MAX_REPLY = 2 * 1024 * 1024
ANNOUNCE_TIMEOUT = 15.0  # seconds a tracker has to answer an announce
#: Peers taken from one reply of each kind (compact, listed, IPv6): a random choice of
#: them when it names more. A reply of 2 MiB names 340,000, and reading and dialling
#: them all held the loop (no peer answered) for 10 s at each announce.
MAX_PEERS = 1000
MAX_MESSAGE = 512  # characters of a tracker's refusal kept
#: Seconds a goodbye is given (the caller's limit on it: pieced-peer's exit waits 5 s
#: for the trackers, as libtorrent's stop_tracker_timeout).
GOODBYE_WITHIN = 5.0


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


_LENIENT = bencodepy.BencodeDecoder()


def decode_first(body: bytes) -> Any:
    """The first bencoded value of ``body``; what follows it is left unread, as
    libtorrent leaves it (a tracker's script may end its reply with a newline, or HTML).

    Read leniently (bencode.py, not the daemon's canonical decoder, whose
    ``trailing=True`` reads a .torrent so): trackers in the wild send unsorted keys,
    which that decoder refuses, and nothing here is keyed by a hash of the bytes.
    """
    try:
        # (bencodepy.decode reads the same way, then refuses anything after the value)
        value, _ = _LENIENT.decode_func[body[:1]](body, 0)
    except RecursionError:
        raise TrackerError("reply is not bencode: nested too deep") from None
    except bencodepy.BencodeDecodeError as exc:
        raise TrackerError(f"reply is not bencode: {exc}") from None
    except Exception:  # (IndexError, KeyError, ValueError: as bencodepy.decode says them)
        raise TrackerError("reply is not bencode: not a valid bencoded value") from None
    return value


def _text(value: object) -> str:
    """A tracker's message as printed: escaped, MAX_MESSAGE characters at most."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return printable(text[:MAX_MESSAGE])


def parse_response(body: bytes) -> Reply:
    """The peers, re-announce interval, tracker id and warning of an announce reply
    (its first bencoded value: see :func:`decode_first`)."""
    msg = decode_first(body)
    if not isinstance(msg, dict):
        raise TrackerError("reply is not a dictionary")
    if b"failure reason" in msg:
        raise TrackerError(f"tracker says: {_text(msg[b'failure reason'])}")
    warned = msg.get(b"warning message")
    warning = _text(warned) if isinstance(warned, bytes) and warned else None
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
    return Reply(peers, float(interval), tid if isinstance(tid, bytes) and tid else None,
                 warning)


# Request forgery (a .torrent, or a tracker's redirect, that has us send a GET of its
# making to another service), refused as libtorrent refuses it: a request to this machine
# must be an announce (its path begins with /announce), and a tracker's URL may not carry
# an announce's arguments already (a GET shaped by the .torrent, ours appended after).
ANNOUNCE_PATH = "/announce"
ANNOUNCE_ARGS = frozenset({"info_hash", "event", "port", "left", "key", "uploaded",
                           "downloaded", "corrupt", "peer_id"})


def _forged_argument(base: str) -> str | None:
    """The first announce argument the URL's own query carries, if any."""
    query = urllib.parse.urlsplit(base).query
    for arg in query.split("&"):
        name = arg.partition("=")[0]
        if name.lower() in ANNOUNCE_ARGS:
            return name
    return None


def this_machine(ip: str) -> bool:
    """Whether a connection to ``ip`` reaches this machine: loopback, the unspecified
    address (0.0.0.0 is dialled as this machine), either as an IPv4-mapped IPv6 one."""
    try:
        a = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_loopback or a.is_unspecified


def announce_url(base: str, info_hash: bytes, peer_id: bytes, port: int, event: str,
                 counters: dict[str, int], tracker_id: bytes | None = None) -> str:
    """The announce's URL; TrackerError if ``base`` carries an announce argument of its
    own (see ANNOUNCE_ARGS)."""
    forged = _forged_argument(base.split("#", 1)[0])
    if forged is not None:
        raise TrackerError(f"refused: the tracker's URL carries {printable(forged[:40])}= "
                           "already, as only a forged request would")
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


MAX_HEAD = 64 * 1024  # bytes of a reply's status line and headers read
MAX_REDIRECTS = 10  # redirects followed in an announce
_DIGITS = re.compile(r"[0-9]+")  # (str.isdigit takes "²" and other scripts' digits)
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS = re.compile(rb"HTTP/\d(?:\.\d)?[ \t]+(\d{3})(?:[ \t]|$)")
_NOT_IN_TARGET = re.compile(rb"[^\x21-\x7e]")  # (escaped in a request's target)
_tls: ssl.SSLContext | None = None


def _too_long() -> TrackerError:
    return TrackerError(f"reply larger than {MAX_REPLY} bytes")


async def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` over HTTP/1.1 (``https``: TLS, the certificate checked): (status,
    headers by lower-case name, body: only a 200's is read).

    Written here, as libtorrent has its own, to read a reply as leniently as libtorrent
    does: the body is what came of what the headers promised (a Content-Length longer
    than the body, the connection then closed: the bytes that came; shorter: that
    many, whatever follows, Connection: close or not; chunks cut short: the whole ones).
    Whether that is a complete announce reply is :func:`parse_response`'s to say. At
    most MAX_REPLY bytes of body (decompressed, for gzip) and MAX_HEAD of headers are
    taken; the caller bounds the time."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host:
        raise TrackerError(f"not an HTTP URL: {printable(url[:200])}")
    try:
        ipaddress.ip_address(host)
    except ValueError:  # a name: as DNS takes it (an empty label, or one of 64 bytes: no)
        host = host.encode("idna").decode("ascii")
    default = 443 if scheme == "https" else 80
    try:
        given = parts.port
    except ValueError:  # (70000, -1, not a number)
        raise TrackerError(f"not a port: {printable(url[:200])}") from None
    if given == 0:  # (not the default port: no port at all, as libtorrent fails it)
        raise TrackerError(f"port 0 in {printable(url[:200])}")
    port = given or default
    netloc = f"[{host}]" if ":" in host else host
    if port != default:
        netloc += f":{port}"
    path = parts.path or "/"
    target = path + (f"?{parts.query}" if parts.query else "")
    lines = [b"GET " + _NOT_IN_TARGET.sub(lambda m: b"%%%02X" % m[0][0], target.encode())
             + b" HTTP/1.1", b"Host: " + netloc.encode("ascii"), b"User-Agent: pieced-peer",
             b"Accept-Encoding: gzip", b"Connection: close"]
    if parts.username is not None:
        secret = (urllib.parse.unquote(parts.username) + ":"
                  + urllib.parse.unquote(parts.password or ""))
        lines.append(b"Authorization: Basic " + base64.b64encode(secret.encode()))
    context = None
    if scheme == "https":
        global _tls
        if _tls is None:
            _tls = ssl.create_default_context()
        context = _tls
    if path.startswith(ANNOUNCE_PATH):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host if context else None,
            happy_eyeballs_delay=0.25)
    else:
        reader, writer = await _elsewhere(url, host, port, context)
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        buf = bytearray()
        while not (end := _HEAD_END.search(buf)):
            if len(buf) > MAX_HEAD:
                raise TrackerError(f"reply headers larger than {MAX_HEAD} bytes")
            chunk = await reader.read(64 * 1024)
            if not chunk:
                raise TrackerError("connection closed before a reply" if not buf
                                   else "connection closed within the reply's headers")
            buf += chunk
        while True:
            head = bytes(buf[: end.start()]).split(b"\n")
            match = _STATUS.match(head[0].rstrip(b"\r"))
            if match is None:
                raise TrackerError(f"reply is not HTTP: {printable(repr(head[0][:80]))}")
            status = int(match[1])
            if not (100 <= status < 200 and status != 101):
                break
            # An interim reply (100 Continue) before the real one: skipped, as
            # libtorrent skips it; the next reply's head is read.
            del buf[: end.end()]
            while not (end := _HEAD_END.search(buf)):
                if len(buf) > MAX_HEAD:
                    raise TrackerError(f"reply headers larger than {MAX_HEAD} bytes")
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    raise TrackerError("connection closed after an interim reply")
                buf += chunk
        headers: dict[str, str] = {}
        for line in head[1:]:
            if line[:1] in (b" ", b"\t"):
                continue  # (a folded line goes on the header before: never one of its own)
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                # The first of a header said twice, as libtorrent takes it (two lengths:
                # the first is the one it reads by).
                headers.setdefault(name.strip().lower(), value.strip())
        if status != 200:
            return status, headers, b""
        body = await _body(reader, bytes(buf[end.end() :]), headers)
    finally:
        writer.transport.abort()  # (nothing more is read from it: no goodbye awaited)
    coding = headers.get("content-encoding", "").lower()
    if coding in ("gzip", "x-gzip", "deflate"):
        inflate = zlib.decompressobj(zlib.MAX_WBITS | (16 if "gzip" in coding else 32))
        try:
            body = inflate.decompress(body, MAX_REPLY + 1)
        except zlib.error as exc:
            raise TrackerError(f"reply's {coding} does not inflate: {exc}") from None
        if len(body) > MAX_REPLY:
            raise _too_long()
    return status, headers, body


async def not_this_machine(url: str, host: str, port: int) -> list[str]:
    """The addresses of ``host`` a request that is not an announce may go to: those
    that are not this machine (resolved once, and dialled as resolved: a name that
    resolves elsewhere first and here at the dial is no way round); TrackerError if
    none is."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos if not this_machine(str(info[4][0]))]
    if not addresses:
        where = url.split("?", 1)[0].split("#", 1)[0]  # (our announce's query left out)
        raise TrackerError(f"refused: {printable(where[:200])} is on this machine and is not "
                           f"an announce (its path does not begin with {ANNOUNCE_PATH})")
    return list(dict.fromkeys(addresses))


async def _elsewhere(url: str, host: str, port: int, context: ssl.SSLContext | None) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection for a request that is not an announce (see not_this_machine): its
    host's first addresses tried in turn."""
    last: OSError = OSError(f"no address of {host} answered")
    for ip in (await not_this_machine(url, host, port))[:4]:
        try:
            return await asyncio.open_connection(
                ip, port, ssl=context, server_hostname=host if context else None)
        except OSError as exc:
            last = exc
    raise last


async def _body(reader: asyncio.StreamReader, have: bytes, headers: dict[str, str]) -> bytes:
    """A reply's body, ``have`` its first bytes (read with the headers): see http_get."""
    buf = bytearray(have)

    async def more() -> bool:  # (a connection reset ends the body as its close does)
        try:
            chunk = await reader.read(64 * 1024)
        except (ConnectionError, ssl.SSLError):
            chunk = b""
        buf.extend(chunk)
        return bool(chunk)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            while (nl := buf.find(b"\n")) < 0:
                if len(buf) > 1024 or not await more():
                    return bytes(body)  # (cut short: the chunks that came whole)
            line = bytes(buf[:nl]).split(b";")[0].strip()
            del buf[: nl + 1]
            if not line:  # (the line end after a chunk's data)
                continue
            try:
                size = int(line, 16)
            except ValueError:
                return bytes(body)
            if size <= 0:
                return bytes(body)
            if len(body) + size > MAX_REPLY:
                raise _too_long()
            while len(buf) < size:
                if not await more():
                    return bytes(body)
            body += buf[:size]
            del buf[:size]
    length = headers.get("content-length", "")
    if _DIGITS.fullmatch(length):  # (else ignored, as libtorrent ignores it: to the close)
        if int(length) > MAX_REPLY:
            raise _too_long()
        while len(buf) < int(length) and await more():
            pass
        return bytes(buf[: int(length)])  # (what follows it is no part of it)
    while len(buf) <= MAX_REPLY and await more():  # no length: until the connection closes
        pass
    if len(buf) > MAX_REPLY:
        raise _too_long()
    return bytes(buf)


LEECHER = "leecher"  # a tracker's state: it heard ``started`` while we were not complete
DONE = "done"  # it heard ``completed``, or heard ``started`` when we were complete already


class Tracker:
    """The torrent's trackers, in tiers (BEP 12): an announce asks each in turn, tier
    after tier, until one answers; the one that answered moves to the front of its
    tier, and is asked first next time."""

    def __init__(self, tiers: list[list[str]], info_hash: bytes, peer_id: bytes,
                 port: int, label: str = "") -> None:
        self.tiers = [list(t) for t in tiers if t]
        self.info_hash = info_hash
        #: Which of the torrent's keys this announces ("v2 hash" of a hybrid's two), said
        #: with what its trackers answer: "" when the torrent has one key.
        self.label = label
        self.peer_id = peer_id
        self.port = port
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
        last: Exception = TrackerError("no tracker")
        for tier in self.tiers:
            for url in list(tier):  # in turn, until one answers
                try:
                    reply = await self._announce(url, self.event(url, complete), counters,
                                                 complete)
                except TrackerError as exc:
                    last = exc if str(exc).startswith(url) else TrackerError(f"{url}: {exc}")
                    continue
                except TimeoutError:
                    last = TrackerError(f"{url}: no answer in {ANNOUNCE_TIMEOUT:.0f} s")
                    continue
                except OSError as exc:  # (no such host, refused, reset, a TLS failure)
                    last = TrackerError(f"{url}: {exc.strerror or exc or type(exc).__name__}")
                    continue
                except Exception as exc:  # whatever else one URL does (a host IDNA
                    last = TrackerError(f"{url}: {type(exc).__name__}: {exc}")  # refuses)
                    continue
                tier.remove(url)
                tier.insert(0, url)
                if reply.warning is not None:  # (named as a failure is: by its URL)
                    reply = reply._replace(warning=f"{url}: {reply.warning}")
                return reply
        raise last

    async def goodbye(self, counters: dict[str, int], complete: bool,
                      within: float = GOODBYE_WITHIN) -> None:
        """Tell each tracker that took an announce of ours ``stopped`` (``completed``
        first if it is owed), each tracker on its own: one that does not answer holds
        up no other (libtorrent tells only those too). The caller gives it ``within``
        seconds: a ``completed`` has half of them at most, so that a tracker that never
        answers it still hears ``stopped`` in the other half (cut short, it may have
        heard ``completed``: it is not said again)."""
        async def tell(url: str) -> None:
            if self.event(url, complete) == "completed":
                with contextlib.suppress(Exception):  # (it may be gone: stopped is said)
                    await asyncio.wait_for(
                        self._announce(url, "completed", counters, complete), within / 2)
            with contextlib.suppress(Exception):
                await self._announce(url, "stopped", counters, complete)

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
        full = announce_url(url, self.info_hash, self.peer_id, self.port, event, counters,
                            self._ids.get(url))
        target, body = full, b""
        async with asyncio.timeout(ANNOUNCE_TIMEOUT):  # (the redirects within it too)
            for _ in range(MAX_REDIRECTS + 1):
                status, headers, body = await http_get(target)
                if 300 <= status < 400 and "location" in headers:  # (any, as libtorrent)
                    target = urllib.parse.urljoin(target, headers["location"])
                    if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
                        raise TrackerError(f"{url}: redirected to {printable(target[:200])}, "
                                           "which is not an HTTP tracker's URL")
                    continue
                if status != 200:
                    raise TrackerError(f"{url}: HTTP {status}")
                break
            else:
                raise TrackerError(f"{url}: redirected too many times")
        try:
            return parse_response(body)
        except TrackerError as exc:
            raise TrackerError(f"{url}: {exc}") from None

    async def close(self) -> None:
        """(Nothing is kept open between announces: each HTTP one has a connection of its
        own, as libtorrent's, and each UDP one a socket.)"""
