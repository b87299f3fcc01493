"""UDP tracker announces (BEP 15): the datagrams read and made without sockets, garbage
that never raises anything but TrackerError, and the exchange against trackers written
here that lose, mix up or refuse datagrams, or do not answer."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pieced.peer import tracker, udptracker
from pieced.peer.tracker import Reply, Tracker, TrackerError
from pieced.peer.udptracker import (
    ANNOUNCE,
    CONNECT,
    PROTOCOL_ID,
    Connected,
    UdpAnnouncer,
    announce_request,
    connect_request,
    read_reply,
    split_url,
)

IH = bytes(range(20))
PID = b"-PI0001-" + bytes(12)


def test_a_connect_and_an_announce_are_laid_out_as_bep_15_says() -> None:
    assert connect_request(7) == struct.pack(">QII", PROTOCOL_ID, CONNECT, 7)
    counters = {"downloaded": 5, "left": 2**40, "uploaded": -3}
    pkt = announce_request(0x1122334455667788, 9, IH, PID, counters, "started", 0xDEADBEEF,
                           6881, "/announce?k=v")
    head = struct.unpack_from(">QII20s20sQQQIIIiH", pkt)
    assert head == (0x1122334455667788, ANNOUNCE, 9, IH, PID, 5, 2**40, 0, 2, 0, 0xDEADBEEF,
                    udptracker.NUM_WANT, 6881)
    assert pkt[98:] == bytes([2, 13]) + b"/announce?k=v"  # BEP 41's URL data
    assert len(announce_request(1, 1, IH, PID, {}, "", 0, 1, "")) == 98  # no option
    long = announce_request(1, 1, IH, PID, {}, "stopped", 0, 1, "/" + "a" * 400)
    assert long[98] == 2 and long[99] == 255 and len(long) == 98 + 2 + 255
    assert struct.unpack_from(">I", long, 80)[0] == 3


def test_replies_are_read_and_strays_left_aside() -> None:
    assert read_reply(struct.pack(">IIQ", CONNECT, 5, 42), 5, CONNECT, False) == Connected(42)
    peers = bytes([10, 0, 0, 1, 0x1A, 0xE1, 127, 0, 0, 1, 0, 0, 192, 168, 1, 2, 0x1A, 0xE2, 9])
    got = read_reply(struct.pack(">IIiII", ANNOUNCE, 5, 900, 1, 2) + peers, 5, ANNOUNCE, False)
    assert got == Reply([("10.0.0.1", 6881), ("192.168.1.2", 6882)], 900.0, None)
    six = bytes(15) + b"\x01" + b"\x1a\xe1"
    got = read_reply(struct.pack(">IIiII", ANNOUNCE, 5, -4, 0, 0) + six, 5, ANNOUNCE, True)
    assert got == Reply([("::1", 6881)], 1800.0, None)  # (a nonsense interval: the default)
    for stray, action in [
        (b"", CONNECT), (bytes(7), CONNECT),
        (struct.pack(">IIQ", CONNECT, 6, 42), CONNECT),  # another transaction's
        (struct.pack(">IIQ", CONNECT, 5, 42)[:15], CONNECT),  # too short
        (struct.pack(">IIiII", ANNOUNCE, 5, 1, 1, 1)[:19], ANNOUNCE),  # too short
        (struct.pack(">IIQ", CONNECT, 5, 42), ANNOUNCE),  # an answer to a connect
        (struct.pack(">IIiII", 2, 5, 1, 1, 1), ANNOUNCE),  # to a scrape
    ]:
        assert read_reply(stray, 5, action, False) is None, stray
    with pytest.raises(TrackerError, match="tracker says: torrent not registered"):
        read_reply(struct.pack(">II", 3, 5) + b"torrent not registered\0", 5, ANNOUNCE, False)
    with pytest.raises(TrackerError) as err:  # its words cannot forge lines of our output
        read_reply(struct.pack(">II", 3, 5) + b"no\n\x1b[2Jpe\xff", 5, CONNECT, False)
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)


@settings(max_examples=3000, deadline=None)
@given(action=st.integers(0, 4), body=st.binary(max_size=120), ipv6=st.booleans())
def test_garbage_raises_only_tracker_error(action: int, body: bytes, ipv6: bool) -> None:
    data = struct.pack(">II", action, 77) + body
    try:
        got = read_reply(data, 77, action % 2, ipv6)
    except TrackerError:
        return
    if isinstance(got, Reply):
        assert all(0 < port < 65536 for _, port in got.peers)
        assert 0 < got.interval <= 86400


@pytest.mark.parametrize(("url", "want"), [
    ("udp://tracker.example.org:1337/announce", ("tracker.example.org", 1337, "/announce")),
    ("udp://10.0.0.1:80", ("10.0.0.1", 80, "")),
    ("udp://[::1]:6969/a?b=c", ("::1", 6969, "/a?b=c")),
])
def test_urls(url: str, want: tuple[str, int, str]) -> None:
    assert split_url(url) == want


@pytest.mark.parametrize("url", ["udp://host/announce", "udp://:80/x", "udp://h:99999/x"])
def test_a_url_without_a_host_or_port_is_refused(url: str) -> None:
    with pytest.raises(TrackerError, match=url.replace("?", r"\?")):
        split_url(url)


# -- the exchange, against trackers written here -----------------------------------------

Answer = Callable[[bytes, dict[str, Any]], list[bytes]]


class _Server(asyncio.DatagramProtocol):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.state: dict[str, Any] = {"got": []}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.state["got"].append(data)
        assert self.transport is not None
        for out in self.answer(data, self.state):
            self.transport.sendto(out, addr)


def opentracker_like(peers: bytes = bytes([127, 0, 0, 1, 0x1A, 0xE1]),
                     cid: int = 0x0102030405060708) -> Answer:
    """A tracker that answers each request as BEP 15 says."""
    def answer(data: bytes, state: dict[str, Any]) -> list[bytes]:
        if len(data) == 16 and struct.unpack_from(">Q", data)[0] == PROTOCOL_ID:
            return [struct.pack(">IIQ", CONNECT, struct.unpack_from(">I", data, 12)[0], cid)]
        if len(data) >= 98 and struct.unpack_from(">Q", data)[0] == cid:
            tid = struct.unpack_from(">I", data, 12)[0]
            return [struct.pack(">IIiII", ANNOUNCE, tid, 1200, 0, 1) + peers]
        return []
    return answer


@contextmanager
def _running(answer: Answer) -> Iterator[tuple[asyncio.AbstractEventLoop, int, dict[str, Any]]]:
    loop = asyncio.new_event_loop()
    try:
        transport, proto = loop.run_until_complete(loop.create_datagram_endpoint(
            lambda: _Server(answer), local_addr=("127.0.0.1", 0)))
        port = transport.get_extra_info("sockname")[1]
        try:
            yield loop, port, proto.state
        finally:
            transport.close()
    finally:
        loop.close()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udptracker, "RESEND_AFTER", (0.2, 0.4, 0.8))
    monkeypatch.setattr(tracker, "ANNOUNCE_TIMEOUT", 3.0)


def test_an_announce_and_the_next_use_one_connection_id_and_one_key(quick: None) -> None:
    with _running(opentracker_like()) as (loop, port, state):
        udp = UdpAnnouncer(IH, PID, 51413)
        url = f"udp://127.0.0.1:{port}/announce"
        first = loop.run_until_complete(udp.announce(url, "started", {"left": 10}))
        second = loop.run_until_complete(udp.announce(url, "", {"left": 0, "downloaded": 10}))
    assert first == second == Reply([("127.0.0.1", 6881)], 1200.0, None)
    got = state["got"]
    assert [len(p) for p in got] == [16, 98 + 2 + 9, 98 + 2 + 9]  # one connect for both
    a, b = (struct.unpack_from(">QII20s20sQQQIIIiH", p) for p in got[1:])
    assert a[3] == b[3] == IH and a[4] == PID and a[12] == b[12] == 51413
    assert (a[8], b[8]) == (2, 0) and (a[6], b[6]) == (10, 0) and b[5] == 10
    assert a[10] == b[10] and a[2] != b[2]  # one key, a transaction id each


def test_lost_and_stray_datagrams_are_outlasted(quick: None) -> None:
    """The first copy of each request is lost, and strays (another transaction, another
    action, too short) come before each answer: the requests are sent again, and the
    strays left aside."""
    good = opentracker_like()

    def answer(data: bytes, state: dict[str, Any]) -> list[bytes]:
        seen = state.setdefault("seen", set())
        if data[:12] not in seen:
            seen.add(data[:12])
            return []
        tid = struct.unpack_from(">I", data, 12)[0]
        return [struct.pack(">IIQ", CONNECT, tid ^ 1, 9), struct.pack(">IIQ", 2, tid, 9),
                b"\0\0\0", *good(data, state)]

    with _running(answer) as (loop, port, state):
        t0 = time.monotonic()
        reply = loop.run_until_complete(UdpAnnouncer(IH, PID, 1).announce(
            f"udp://127.0.0.1:{port}", "started", {}))
        assert reply.peers == [("127.0.0.1", 6881)]
        assert 0.4 <= time.monotonic() - t0 < 2.5
        assert [len(p) for p in state["got"]] == [16, 16, 98, 98]


def test_a_refusal_is_said_with_the_trackers_words(quick: None) -> None:
    def answer(data: bytes, state: dict[str, Any]) -> list[bytes]:
        return [struct.pack(">II", 3, struct.unpack_from(">I", data, 12)[0]) + b"go away"]

    with _running(answer) as (loop, port, _), pytest.raises(
            TrackerError, match=rf"udp://127.0.0.1:{port}: tracker says: go away"):
        loop.run_until_complete(UdpAnnouncer(IH, PID, 1).announce(
            f"udp://127.0.0.1:{port}", "", {}))


def test_a_silent_tracker_times_out_and_a_closed_port_fails_at_once(quick: None) -> None:
    with _running(lambda data, state: []) as (loop, port, state):
        t0 = time.monotonic()
        with pytest.raises(TrackerError, match="no answer in 3 s"):
            loop.run_until_complete(UdpAnnouncer(IH, PID, 1).announce(
                f"udp://127.0.0.1:{port}", "", {}))
        assert 1.2 <= time.monotonic() - t0 < 3.5
        assert len(state["got"]) == 3  # sent, and again twice
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()
    loop = asyncio.new_event_loop()
    try:
        t0 = time.monotonic()
        with pytest.raises(TrackerError, match=r"[Rr]efused"):
            loop.run_until_complete(UdpAnnouncer(IH, PID, 1).announce(
                f"udp://127.0.0.1:{closed}", "", {}))
        assert time.monotonic() - t0 < 1.0
    finally:
        loop.close()


def test_an_address_that_does_not_answer_leaves_the_next_one_its_share(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker's name with two addresses, the first silent (an IPv6 address with no
    route there, say): the second has half the announce's time. The first took all but
    the last second of it (its resends), and a tracker a little slow to answer at the
    second address was given up."""
    monkeypatch.setattr(udptracker, "RESEND_AFTER", (0.2, 0.4, 0.8))
    monkeypatch.setattr(tracker, "ANNOUNCE_TIMEOUT", 1.5)
    good = opentracker_like()
    loop = asyncio.new_event_loop()

    class Slow(_Server):  # answers each request 0.15 s late
        def datagram_received(self, data: bytes, addr: Any) -> None:
            self.state["got"].append(data)
            for out in good(data, self.state):
                loop.call_later(0.15, self.transport.sendto, out, addr)  # type: ignore[union-attr]

    try:
        silent_t, silent = loop.run_until_complete(loop.create_datagram_endpoint(
            lambda: _Server(lambda data, state: []), local_addr=("127.0.0.2", 0)))
        slow_t, _ = loop.run_until_complete(loop.create_datagram_endpoint(
            lambda: Slow(good), local_addr=("127.0.0.1", 0)))
        addrs = [silent_t.get_extra_info("sockname"), slow_t.get_extra_info("sockname")]

        async def resolve(host: str, port: int, **kw: Any) -> list[Any]:
            return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", a) for a in addrs]

        loop.getaddrinfo = resolve  # type: ignore[method-assign,assignment]
        announcer = UdpAnnouncer(IH, PID, 1)
        shares: list[float] = []  # (the time each address is given, as it is given)
        exchange = announcer._exchange

        async def timed(family: int, addr: Any, path: str, event: str,
                        counters: dict[str, int], deadline: float) -> Any:
            shares.append(deadline - time.monotonic())
            return await exchange(family, addr, path, event, counters, deadline)

        announcer._exchange = timed  # type: ignore[method-assign]
        t0 = time.monotonic()
        reply = loop.run_until_complete(announcer.announce(
            "udp://tracker.example:6969/announce", "", {}))
        assert reply.peers == [("127.0.0.1", 6881)]
        assert 0.75 <= time.monotonic() - t0 < 1.5
        # Its share is half the announce's time (sent at 0, 0.2 and 0.6 s, were the
        # machine idle: how many went out depends on the scheduler, not on the share).
        assert len(shares) == 2 and 0.6 < shares[0] <= 0.75, shares  # (not all but the last 1 s)
        assert 2 <= len(silent.state["got"]) <= 3  # (its resends, within its share)
        silent_t.close()
        slow_t.close()
    finally:
        loop.close()


def test_an_id_the_tracker_refuses_is_asked_for_again_next_time(quick: None) -> None:
    """A tracker restarted forgets the ids it gave: its refusal fails that announce,
    and the next one connects again instead of using the refused id for a minute."""
    cids = iter([11, 22])
    good = {"cid": 0}

    def answer(data: bytes, state: dict[str, Any]) -> list[bytes]:
        tid = struct.unpack_from(">I", data, 12)[0]
        if len(data) == 16:
            good["cid"] = next(cids)
            return [struct.pack(">IIQ", CONNECT, tid, good["cid"])]
        if struct.unpack_from(">Q", data)[0] != 22:
            return [struct.pack(">II", 3, tid) + b"bad connection id"]
        return [struct.pack(">IIiII", ANNOUNCE, tid, 60, 0, 0)]

    with _running(answer) as (loop, port, state):
        udp = UdpAnnouncer(IH, PID, 1)
        url = f"udp://127.0.0.1:{port}"
        with pytest.raises(TrackerError, match="bad connection id"):
            loop.run_until_complete(udp.announce(url, "", {}))
        assert loop.run_until_complete(udp.announce(url, "", {})).interval == 60.0
        assert [len(p) for p in state["got"]] == [16, 98, 16, 98]


def test_tiers_mix_udp_and_http_trackers(quick: None) -> None:
    """A UDP tracker that refuses leaves the next one of its tier asked; the one that
    answered is asked first next time, and hears no second ``started``."""
    def refuses(data: bytes, state: dict[str, Any]) -> list[bytes]:
        return [struct.pack(">II", 3, struct.unpack_from(">I", data, 12)[0]) + b"no"]

    loop = asyncio.new_event_loop()
    try:
        servers = [loop.run_until_complete(loop.create_datagram_endpoint(
            lambda a=a: _Server(a), local_addr=("127.0.0.1", 0)))  # type: ignore[misc]
            for a in (refuses, opentracker_like())]
        bad, good = (t.get_extra_info("sockname")[1] for t, _ in servers)
        seen = servers[1][1].state
        urls = [f"udp://127.0.0.1:{bad}/a", f"udp://127.0.0.1:{good}/a"]
        t = Tracker([list(urls)], IH, PID, 6881)
        assert loop.run_until_complete(t.announce({"left": 1}, False)).peers == [
            ("127.0.0.1", 6881)]
        assert t.tiers == [[urls[1], urls[0]]] and t.answered == [urls[1]]
        loop.run_until_complete(t.announce({"left": 0}, True))
        events = [struct.unpack_from(">I", p, 80)[0] for p in seen["got"] if len(p) > 16]
        assert events == [2, 1]  # started, then completed
        loop.run_until_complete(t.goodbye({"left": 0}, True))
        events = [struct.unpack_from(">I", p, 80)[0] for p in seen["got"] if len(p) > 16]
        assert events == [2, 1, 3]
        loop.run_until_complete(t.close())
        for transport, _ in servers:
            transport.close()
    finally:
        loop.close()


def test_the_announcer_keeps_no_socket_open() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with _running(opentracker_like()) as (loop, port, _):
        udp = UdpAnnouncer(IH, PID, 1)
        for _ in range(20):
            loop.run_until_complete(udp.announce(f"udp://127.0.0.1:{port}", "", {}))
        during = len(os.listdir("/proc/self/fd"))
    assert during <= before + 4  # (the loop's own and the server's)


def test_a_flood_of_strays_does_not_push_the_answer_out(quick: None) -> None:
    """500 stray datagrams (another transaction's, too short) came before each answer:
    they filled the queue of 64 and the answer, coming last, was dropped, at every copy
    of the request (the announce timed out). They are dropped as they come now, the
    answer kept."""
    good = opentracker_like()

    def answer(data: bytes, state: dict[str, Any]) -> list[bytes]:
        tid = struct.unpack_from(">I", data, 12)[0]
        strays = [struct.pack(">IIQ", CONNECT, (tid + 1 + i) & 0xFFFFFFFF, 9) if i % 2
                  else b"\0\0\0" for i in range(500)]
        return [*strays, *good(data, state)]

    with _running(answer) as (loop, port, state):
        t0 = time.monotonic()
        reply = loop.run_until_complete(UdpAnnouncer(IH, PID, 1).announce(
            f"udp://127.0.0.1:{port}", "started", {}))
        assert reply.peers == [("127.0.0.1", 6881)]
        assert time.monotonic() - t0 < 0.2 * 2  # (no copy of a request sent again)
        assert [len(p) for p in state["got"]] == [16, 98]
