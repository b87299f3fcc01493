"""UDP tracker announces (BEP 15): most public torrents name ``udp://`` trackers first.

The datagrams are built and read by pure functions (``connect_request``,
``announce_request``, ``read_reply``), tested and fuzzed without sockets; ``UdpAnnouncer``
is the asyncio edge. An exchange is a connect (its connection id is good for a minute,
kept per address as libtorrent keeps it) then an announce. Each request is sent again
while no answer comes (a datagram lost costs seconds, not the whole announce), with a
new transaction id only per request, so a late answer to an earlier copy still counts.
The socket is connected to the tracker's address: the kernel drops datagrams from
anyone else, and a port nobody listens on is an error at once (ICMP), not a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import time
import urllib.parse
from typing import Any, NamedTuple

from . import tracker
from .tracker import MAX_MESSAGE, Peers, Reply, TrackerError, printable, sane_interval, strides

PROTOCOL_ID = 0x41727101980
CONNECT, ANNOUNCE, ERROR = 0, 1, 3
EVENTS = {"": 0, "completed": 1, "started": 2, "stopped": 3}
CONNECTION_ID_SECONDS = 60.0  # how long a connect's id is used (BEP 15: a minute)
#: Seconds to wait for an answer before the request is sent again, in turn (the last
#: copy waits until the announce's time is up: ANNOUNCE_TIMEOUT, shared out between the
#: tracker's addresses).
RESEND_AFTER = (2.0, 4.0, 8.0)
NUM_WANT = 50
#: Bytes of datagrams the kernel keeps for an exchange's socket until they are read (as
#: far as net.core.rmem_max allows): each datagram costs it a kernel buffer of a KiB or so,
#: and a burst of a few hundred strays filled the default 208 KiB, the answer behind
#: them dropped.
RECEIVE_BUFFER = 1 << 20
URL_DATA = 2  # BEP 41 option: the URL's path and query, as libtorrent sends them


class Connected(NamedTuple):
    connection_id: int


def connect_request(tid: int) -> bytes:
    return struct.pack(">QII", PROTOCOL_ID, CONNECT, tid)


def announce_request(connection_id: int, tid: int, info_hash: bytes, peer_id: bytes,
                     counters: dict[str, int], event: str, key: int, port: int,
                     path: str = "") -> bytes:
    """An announce; ``path`` (the URL's path and query) goes in a BEP 41 option, cut at
    255 bytes as libtorrent cuts it (trackers that know no options ignore the tail)."""
    def u64(name: str) -> int:
        return min(max(int(counters.get(name, 0)), 0), 2**63 - 1)

    head = struct.pack(">QII20s20sQQQIIIiH", connection_id, ANNOUNCE, tid, info_hash,
                       peer_id, u64("downloaded"), u64("left"), u64("uploaded"),
                       EVENTS[event], 0, key & 0xFFFFFFFF, NUM_WANT, port & 0xFFFF)
    data = path.encode("utf-8")[:255]
    return head + (bytes([URL_DATA, len(data)]) + data if data else b"")


def read_reply(data: bytes, tid: int, action: int, ipv6: bool) -> Connected | Reply | None:
    """What a datagram says to the request ``(tid, action)``: a connection id, an
    announce's peers, or None for a datagram to ignore (too short, another
    transaction's, another action's: a stray or late one). A tracker's error is
    TrackerError with its message."""
    if len(data) < 8:
        return None
    got, their_tid = struct.unpack_from(">II", data)
    if their_tid != tid:
        return None
    if got == ERROR:
        text = data[8:].decode("utf-8", "replace").rstrip("\0")[:MAX_MESSAGE]
        raise TrackerError(f"tracker says: {printable(text) or 'error'}")
    if got != action:
        return None
    if action == CONNECT:
        if len(data) < 16:
            return None
        return Connected(struct.unpack_from(">Q", data, 8)[0])
    if len(data) < 20:
        return None
    interval = struct.unpack_from(">i", data, 8)[0]
    stride = 18 if ipv6 else 6
    body = data[20:]
    peers: Peers = []
    for i in strides(len(body), stride):
        port = int.from_bytes(body[i + stride - 2 : i + stride], "big")
        if not port:
            continue
        addr = body[i : i + stride - 2]
        ip = (str(ipaddress.IPv6Address(addr)) if ipv6
              else str(ipaddress.IPv4Address(addr)))
        peers.append((ip, port))
    return Reply(peers, float(sane_interval(interval)), None)


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, path and query) of a ``udp://`` URL; TrackerError if it names no
    host or port."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TrackerError(f"{url}: not a tracker URL: {exc}") from None
    if not parts.hostname or not port:
        raise TrackerError(f"{url}: a UDP tracker's URL names its host and port")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, path


class _Datagrams(asyncio.DatagramProtocol):
    """The datagrams that may answer the request under way (``tid``, set by
    :func:`_ask`), queued; any other (from another address, too short to hold a
    transaction id, or another transaction's) is dropped as it comes, so that a flood
    of strays cannot fill the queue and push the answer out of it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=64)
        self.tid: int | None = None
        self.peer: Any = None  # the tracker's address, as the socket is connected to it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = transport.get_extra_info("peername")

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if (len(data) < 8 or self.tid is None
                or int.from_bytes(data[4:8], "big") != self.tid
                or (addr is not None and self.peer is not None
                    and tuple(addr[:2]) != tuple(self.peer[:2]))):
            return
        with contextlib.suppress(asyncio.QueueFull):  # (copies of the answer: the
            self.queue.put_nowait(data)  # first ones are what it takes)

    def error_received(self, exc: Exception) -> None:  # (ICMP: nobody listens there)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(exc)


class UdpAnnouncer:
    """Announces to ``udp://`` trackers for one torrent; :meth:`announce` raises
    TrackerError (or TimeoutError) as the HTTP announces do."""

    def __init__(self, info_hash: bytes, peer_id: bytes, port: int) -> None:
        self.info_hash = info_hash
        self.peer_id = peer_id
        self.port = port
        self.key = int.from_bytes(os.urandom(4), "big")  # the same for every announce
        self._ids: dict[tuple[Any, ...], tuple[int, float]] = {}  # address -> (id, until)

    async def announce(self, url: str, event: str, counters: dict[str, int]) -> Reply:
        host, port, path = split_url(url)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise TrackerError(f"{url}: cannot resolve {host}: {exc.strerror or exc}") from None
        end = time.monotonic() + tracker.ANNOUNCE_TIMEOUT
        last: Exception = TrackerError(f"{url}: no address for {host}")
        tried = infos[:4]
        for n, (family, _, _, _, addr) in enumerate(tried):
            # Each address in turn, with its share of what time is left: one that does
            # not answer (an IPv6 address with no route there) leaves the next one as
            # long as it had.
            left = end - time.monotonic()
            if left <= 0:
                break
            deadline = time.monotonic() + left / (len(tried) - n)
            try:
                return await self._exchange(family, addr, path, event, counters, deadline)
            except TimeoutError:
                last = TrackerError(f"{url}: no answer in {tracker.ANNOUNCE_TIMEOUT:.0f} s")
            except OSError as exc:
                last = TrackerError(f"{url}: {exc.strerror or exc}")
            except TrackerError as exc:
                raise TrackerError(f"{url}: {exc}") from None
        raise last

    async def _exchange(self, family: int, addr: Any, path: str, event: str,
                        counters: dict[str, int], deadline: float) -> Reply:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            _Datagrams, remote_addr=addr[:2], family=family)
        ipv6 = family == socket.AF_INET6
        sock = transport.get_extra_info("socket")
        if sock is not None:  # (room for a burst of strays, and the answer behind them)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        try:
            known = self._ids.get(addr)
            if known is None or known[1] <= time.monotonic():
                tid = _tid()
                got = await _ask(transport, proto, connect_request(tid), tid, CONNECT,
                                 ipv6, deadline)
                assert isinstance(got, Connected)
                known = (got.connection_id, time.monotonic() + CONNECTION_ID_SECONDS)
                self._ids[addr] = known
            tid = _tid()
            packet = announce_request(known[0], tid, self.info_hash, self.peer_id, counters,
                                      event, self.key, self.port, path)
            try:
                reply = await _ask(transport, proto, packet, tid, ANNOUNCE, ipv6, deadline)
            except (TrackerError, TimeoutError):
                self._ids.pop(addr, None)  # (its id may be what it refused: a new one next)
                raise
            assert isinstance(reply, Reply)
            return reply
        finally:
            transport.close()


def _tid() -> int:
    return int.from_bytes(os.urandom(4), "big")


async def _ask(transport: asyncio.DatagramTransport, proto: _Datagrams, packet: bytes,
               tid: int, action: int, ipv6: bool, deadline: float) -> Connected | Reply:
    """Send ``packet`` and again after each of RESEND_AFTER, until its answer comes (the
    last copy waits until ``deadline``)."""
    proto.tid = tid
    for n, wait in enumerate(RESEND_AFTER):
        transport.sendto(packet)
        until = deadline if n == len(RESEND_AFTER) - 1 else min(time.monotonic() + wait,
                                                                   deadline)
        while (left := until - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(proto.queue.get(), left)
            except TimeoutError:
                break
            if isinstance(data, BaseException):
                raise data
            got = read_reply(data, tid, action, ipv6)
            if got is not None:
                return got
        if time.monotonic() >= deadline:
            break
    raise TimeoutError
