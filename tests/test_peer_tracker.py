"""Announce replies, read without sockets: compact (BEP 23) and dictionary peer lists,
IPv6, refusals, and garbage that never raises anything but TrackerError."""

from __future__ import annotations

import contextlib
import urllib.parse
from pathlib import Path
from typing import Any, cast

import bencodepy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pieced.peer.tracker import TrackerError, announce_url, parse_response


def test_compact_peers_and_interval() -> None:
    body = bencodepy.encode({b"interval": 900, b"peers": bytes([10, 0, 0, 1, 0x1A, 0xE1,
                                                                127, 0, 0, 1, 0, 0,
                                                                192, 168, 1, 2, 0x1A, 0xE2, 9])})
    peers, interval, *_ = parse_response(body)
    assert peers == [("10.0.0.1", 6881), ("192.168.1.2", 6882)]  # port 0 and a stray byte left out
    assert interval == 900


def test_peers_named_by_host_name_are_kept_and_others_left_out() -> None:
    names = [b"localhost", b"Peer-1.Example.org.", b"-bad.example", b"a" * 64 + b".org",
             b"under_score.org", b"sp ace", b"\xff.org", b"x." * 130]
    body = bencodepy.encode({b"peers": [{b"ip": n, b"port": 7000 + i}
                                        for i, n in enumerate(names)]})
    peers = parse_response(body).peers
    assert peers == [("localhost", 7000), ("peer-1.example.org", 7001)]


def test_dictionary_peers_and_ipv6() -> None:
    body = bencodepy.encode({
        b"peers": [{b"ip": b"10.1.2.3", b"port": 51413}, {b"ip": b"not an ip", b"port": 1},
                   {b"ip": b"10.1.2.4", b"port": 70000}, b"junk"],
        b"peers6": bytes(15) + b"\x01" + b"\x1a\xe1",
    })
    peers, interval, *_ = parse_response(body)
    assert peers == [("10.1.2.3", 51413), ("::1", 6881)]
    assert interval == 1800  # none given


@pytest.mark.parametrize("body,why", [
    (bencodepy.encode({b"failure reason": b"unregistered torrent"}), "unregistered torrent"),
    (b"<html>not bencode</html>", "not bencode"),
    (bencodepy.encode([1, 2]), "not a dictionary"),
])
def test_refusals(body: bytes, why: str) -> None:
    with pytest.raises(TrackerError, match=why):
        parse_response(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_tracker_error(body: bytes) -> None:
    try:
        peers, interval, *_ = parse_response(body)
    except TrackerError:
        return
    assert interval > 0 and all(0 < port < 65536 for _, port in peers)


def test_announce_url_escapes_binary_hashes() -> None:
    ih = bytes(range(20))
    url = announce_url("http://t.example/announce?passkey=1", ih, b"-PZ0001-abcdefabcdef", 6881,
                       "started", {"uploaded": 1, "downloaded": 2, "left": 3})
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert urllib.parse.unquote_to_bytes(url.split("info_hash=")[1].split("&")[0]) == ih
    assert query["passkey"] == ["1"] and query["event"] == ["started"] and query["compact"] == ["1"]
    assert query["left"] == ["3"] and query["port"] == ["6881"]


def test_an_interval_too_large_for_a_float_is_bounded() -> None:
    body = b"d8:intervali" + b"9" * 400 + b"e5:peers0:e"
    assert parse_response(body)[1] == 86400  # (float() of it raised OverflowError)


def test_a_fragment_of_the_announce_url_is_left_out() -> None:
    url = announce_url("http://t.example/announce?k=1#frag", bytes(20), b"-PZ0001-abcdefabcdef",
                       6881, "", {})
    parts = urllib.parse.urlsplit(url)
    assert not parts.fragment and "info_hash" in urllib.parse.parse_qs(parts.query)


def test_a_tracker_that_fails_in_any_way_leaves_the_next_one_asked() -> None:
    """A URL the HTTP client refuses (a host IDNA cannot encode) raised out of the
    announce: the trackers after it were never asked, at any announce."""
    import asyncio

    from aiohttp import web
    from pieced.peer.tracker import Tracker

    async def main() -> None:
        async def good(req: web.Request) -> web.Response:
            return web.Response(body=bencodepy.encode(
                {b"interval": 60, b"peers": bytes([127, 0, 0, 1, 0x1A, 0xE1])}))

        app = web.Application()
        app.router.add_get("/announce/good", good)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            for first in ("http://ex..ample/announce", "http://" + "a" * 64 + ".org/announce"):
                t = Tracker([[first, f"http://127.0.0.1:{port}/announce/good"]], bytes(20),
                            b"-PZ0001-abcdefabcdef", 6881)
                try:
                    assert (await t.announce({}, False))[:2] == ([("127.0.0.1", 6881)], 60.0)
                finally:
                    await t.close()
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_goodbyes_go_to_the_trackers_that_answered_each_on_its_own() -> None:
    """``completed`` then ``stopped`` go to each tracker that took an announce of ours,
    each in its own time: one that hangs holds up no other (before, every URL was told
    ``completed`` at once and ``stopped`` only after all of them, so a tracker that
    never answered used up the 5 s an exit waits, and ``stopped`` reached no one); a
    URL that never answered is told nothing; a tracker id is sent back."""
    import asyncio
    import urllib.parse

    from aiohttp import web
    from pieced.peer.tracker import Tracker

    seen: dict[str, list[tuple[str, str | None]]] = {"flaky": [], "good": [], "never": []}

    def record(name: str, req: web.Request) -> None:
        q = urllib.parse.parse_qs(req.query_string)
        seen[name].append((q.get("event", [""])[0], q.get("trackerid", [None])[0]))

    async def main() -> None:
        release = asyncio.Event()

        async def flaky(req: web.Request) -> web.Response:
            record("flaky", req)
            if len(seen["flaky"]) == 1:
                return web.Response(body=bencodepy.encode({b"interval": 60, b"peers": b""}))
            if len(seen["flaky"]) == 2:
                return web.Response(status=500)
            await release.wait()  # gone silent
            return web.Response(status=500)

        async def good(req: web.Request) -> web.Response:
            record("good", req)
            return web.Response(body=bencodepy.encode(
                {b"interval": 60, b"peers": b"", b"tracker id": b"t-42"}))

        async def never(req: web.Request) -> web.Response:
            record("never", req)
            return web.Response(status=500)

        app = web.Application()
        for name, handler in (("flaky", flaky), ("good", good), ("never", never)):
            app.router.add_get(f"/announce/{name}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}/announce"
        t = Tracker([[f"{base}/flaky", f"{base}/good", f"{base}/never"]], bytes(20),
                    b"-PZ0001-abcdefabcdef", 6881)
        try:
            await t.announce({}, False)  # the flaky one answers
            await t.announce({}, False)  # it fails: the good one answers, with its id
            await t._announce(f"{base}/good", "", {})  # again, as its interval comes
            with pytest.raises(TimeoutError):  # (the silent one hears stopped, and hangs)
                await asyncio.wait_for(t.goodbye({}, True, 3), 3)
        finally:
            await t.close()
            release.set()
            await runner.cleanup()

    asyncio.run(main())
    # (the good one's first announce says "started": it is the first it hears of us)
    assert seen["good"] == [("started", None), ("", "t-42"), ("completed", "t-42"),
                            ("stopped", "t-42")]
    # (its completed given up after half the goodbye's time: stopped is said all the same)
    assert [e for e, _ in seen["flaky"]] == ["started", "", "completed", "stopped"]
    assert seen["never"] == []


def test_local_peers_are_dialled_first_and_each_group_in_a_random_order() -> None:
    """libtorrent tries peers on this machine or its local network first (the nearest
    and fastest); within each group the order is random, since a tracker may list the
    seeds last."""
    from pieced.peer.plugin import dial_order, is_local

    local = [("127.0.0.1", 1), ("10.2.3.4", 2), ("172.31.0.9", 3), ("192.168.7.7", 4),
             ("169.254.1.1", 5), ("::1", 6), ("fd00::5", 7), ("fe80::1", 8)]
    far = [("8.8.4.4", 9), ("172.32.0.1", 10), ("2001:db8::1", 11), ("peer.example.org", 12),
           ("11.0.0.1", 13), ("192.169.0.1", 14)]
    assert all(is_local(h) for h, _ in local) and not any(is_local(h) for h, _ in far)
    orders = set()
    for _ in range(50):
        got = dial_order(far + local)
        assert sorted(got) == sorted(far + local)
        assert set(got[:len(local)]) == set(local)
        orders.add((tuple(got[:len(local)]), tuple(got[len(local):])))
    assert len({a for a, _ in orders}) > 1 and len({b for _, b in orders}) > 1


def test_an_ipv4_peer_met_on_the_dual_stack_socket_is_known_by_its_ipv4_address() -> None:
    """The listening socket takes IPv4 and IPv6: an IPv4 peer arrives as
    ``::ffff:a.b.c.d``, which was another peer than the same address dialled, and local
    to nobody."""
    from pieced.peer.plugin import is_local, unmapped

    assert unmapped("::ffff:127.0.0.1") == "127.0.0.1" and is_local(unmapped("::ffff:10.1.2.3"))
    assert not is_local("::ffff:10.1.2.3")  # (what it was taken for)
    for host in ("::1", "2001:db8::1", "192.0.2.7", "::ffff:zzz", "example.org"):
        assert unmapped(host) == host


def test_an_ipv4_peer_a_tracker_lists_in_peers6_is_known_by_its_ipv4_address() -> None:
    """A tracker may list IPv4 peers in ``peers6`` as ``::ffff:a.b.c.d``: known so, they
    shared one place group with every IPv6 peer (three from three addresses took places
    from one another), were local to nobody, and another peer than the same address
    listed plainly."""
    from types import SimpleNamespace

    from pieced.peer.plugin import Swarm

    known: dict[Any, Any] = {}
    swarm = cast(Any, SimpleNamespace(listen_port=0, known=known, _elsewhere=lambda d, a: True,
                                      done=SimpleNamespace(is_set=lambda: False)))
    Swarm.connect(swarm, "::ffff:127.0.0.2", 7000)
    Swarm.connect(swarm, "127.0.0.2", 7000)
    assert list(known) == [("127.0.0.2", 7000)]


def test_a_min_interval_longer_than_the_interval_is_kept() -> None:
    """A tracker may refuse (or ban) a client announcing sooner than its ``min
    interval``: the next announce waits for it."""
    body = bencodepy.encode({b"interval": 1, b"min interval": 120, b"peers": b""})
    assert parse_response(body).interval == 120
    body = bencodepy.encode({b"interval": 900, b"min interval": 60, b"peers": b""})
    assert parse_response(body).interval == 900


def test_a_tracker_refusal_cannot_forge_lines_or_drive_the_terminal() -> None:
    """A ``failure reason`` was printed as it came: a newline in it forged lines of our
    output ("download complete"), an escape sequence reached the terminal."""
    body = bencodepy.encode(
        {b"failure reason": b"no\npieced-peer: download complete, verified\x1b]0;x\x07"})
    with pytest.raises(TrackerError) as caught:
        parse_response(body)
    text = str(caught.value)
    assert text.isprintable() and "\\n" in text and "\\x1b" in text


def _serve(routes: dict[str, Any]) -> Any:
    """An aiohttp app on 127.0.0.1 with ``routes`` (path -> handler) under /announce:
    (runner, base URL: its /announce), to be awaited. (A request to this machine must
    be an announce: see test_requests_that_are_not_announces_are_not_sent_here.)"""
    from aiohttp import web

    async def start() -> tuple[Any, str]:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get("/announce" + path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/announce"

    return start()


def test_each_tracker_hears_started_first_and_completed_once_if_it_heard_a_leecher() -> None:
    """The events were kept for the run, not per tracker: a tracker first answering
    after another had taken ``started`` never heard ``started`` (and then got
    ``stopped``), and a tracker that heard ``started`` never heard ``completed`` when
    another one took it. As libtorrent keeps them: per tracker. The tracker that answers
    moves to the front of its tier (BEP 12)."""
    import asyncio

    from aiohttp import web
    from pieced.peer.tracker import Tracker

    seen: dict[str, list[str]] = {"a": [], "b": []}
    fail_a = asyncio.Event()

    def handler(name: str) -> Any:
        async def answer(req: web.Request) -> web.Response:
            seen[name].append(urllib.parse.parse_qs(req.query_string).get("event", [""])[0])
            if name == "a" and fail_a.is_set():
                return web.Response(status=500)
            return web.Response(body=bencodepy.encode({b"interval": 60, b"peers": b""}))
        return answer

    async def main() -> None:
        runner, base = await _serve({"/a": handler("a"), "/b": handler("b")})
        t = Tracker([[f"{base}/a", f"{base}/b"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
        try:
            await t.announce({}, False)  # a: started
            fail_a.set()
            await t.announce({}, False)  # a fails: b, started
            assert t.urls == [f"{base}/b", f"{base}/a"]
            await t.announce({}, True)  # b (first now): completed
            await t.announce({}, True)  # b: nothing more
            assert t.event(f"{base}/a", True) == "completed"  # a heard us as a leecher
            fail_a.clear()
            await t.goodbye({}, True)
        finally:
            await t.close()
            await runner.cleanup()

    asyncio.run(main())
    assert seen["a"] == ["started", "", "completed", "stopped"]
    assert seen["b"] == ["started", "completed", "", "stopped"]


def test_a_tracker_that_does_not_answer_is_named_in_the_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker that timed out gave "announce failed: " and nothing after it."""
    import asyncio

    from aiohttp import web
    from pieced.peer import tracker

    monkeypatch.setattr(tracker, "ANNOUNCE_TIMEOUT", 0.5)

    release = asyncio.Event()

    async def hang(req: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=500)

    async def main() -> str:
        runner, base = await _serve({"/hang": hang})
        t = tracker.Tracker([[f"{base}/hang"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
        try:
            with pytest.raises(TrackerError) as caught:
                await t.announce({}, False)
            return str(caught.value)
        finally:
            release.set()
            await t.close()
            await runner.cleanup()

    text = asyncio.run(main())
    assert "/hang" in text and "no answer in" in text, text


def test_announce_list_tiers_are_used_and_announce_left_aside() -> None:
    """BEP 12: with an ``announce-list``, ``announce`` is left aside (as libtorrent
    does); it came first, and a dead one was asked before any other at each announce.
    Trackers that are neither HTTP nor UDP (WebSocket ones) are left out."""
    from types import SimpleNamespace

    from pieced.peer.plugin import Swarm

    def tiers(top: dict[bytes, Any]) -> list[list[str]]:
        return Swarm.meta_trackers(cast(Any, SimpleNamespace(raw=bencodepy.encode(top))))

    info = {b"name": b"x", b"piece length": 16384, b"length": 1, b"pieces": bytes(20)}
    assert tiers({b"announce": b"http://a/x", b"info": info}) == [["http://a/x"]]
    assert tiers({b"announce": b"http://a/x", b"info": info, b"announce-list": [
        [b"udp://u:1/x", b"http://b/x"], [b"http://c/x", b"https://b/y", b"http://b/x"],
        [b"wss://only/x"]]}) == [["udp://u:1/x", "http://b/x"], ["http://c/x", "https://b/y"]]
    assert tiers({b"announce": b"http://a/x", b"info": info, b"announce-list": [[]]}) == [
        ["http://a/x"]]
    # a .torrent with a newline after its dictionary, which the daemon takes, is read too
    raw = bencodepy.encode({b"announce": b"http://a/x", b"info": info}) + b"\n"
    assert Swarm.meta_trackers(cast(Any, SimpleNamespace(raw=raw))) == [["http://a/x"]]


def test_a_download_completed_while_an_announce_runs_is_announced_at_once() -> None:
    """The last piece verified while an announce was on its way (a tracker slow to
    answer): that announce said nothing of it, and the loop took it as said, so
    ``completed`` waited a whole interval (half an hour)."""
    import asyncio
    import time
    from types import SimpleNamespace

    from aiohttp import web
    from pieced.peer.plugin import Swarm
    from pieced.peer.tracker import Tracker

    events: list[str] = []
    swarm: Any = None

    async def slow(req: web.Request) -> web.Response:
        events.append(urllib.parse.parse_qs(req.query_string).get("event", [""])[0])
        if len(events) == 1:
            await asyncio.sleep(0.3)
            swarm.done.set()  # the download completes meanwhile
        return web.Response(body=bencodepy.encode({b"interval": 1800, b"peers": b""}))

    async def main() -> None:
        nonlocal swarm
        runner, base = await _serve({"/a": slow})
        tracker = Tracker([[f"{base}/a"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
        swarm = SimpleNamespace(done=asyncio.Event(), _counters=lambda: {},
                                meta=SimpleNamespace(aliases=(bytes(20),)),
                                connect=lambda host, port, v2=False: None)
        loop = asyncio.ensure_future(Swarm._announce_loop(swarm, tracker))
        try:
            deadline = time.monotonic() + 5
            while len(events) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            loop.cancel()
            await tracker.close()
            await runner.cleanup()

    asyncio.run(main())
    assert events == ["started", "completed"]


def test_a_reply_naming_too_many_peers_gives_a_random_choice_of_them() -> None:
    """A reply of 2 MiB names 340,000 peers: reading them all and dialling each (with
    room for 1,000) held pieced-peer's loop for 10 s at each announce, no peer answered
    meanwhile. MAX_PEERS of each kind are taken, a different choice each time, so a seed
    among them is not left out for ever."""
    import time

    from pieced.peer.tracker import MAX_PEERS

    compact = b"".join(bytes([10, i >> 16 & 255, i >> 8 & 255, i & 255, 0x1A, 0xE1])
                       for i in range(340_000))
    listed = [{b"ip": b"10.0.0.%d" % (i % 250 + 1), b"port": 1000 + i} for i in range(5000)]
    body = bencodepy.encode({b"peers": compact, b"peers6": bytes(18 * 3000)})
    t0 = time.thread_time()  # (this thread's CPU time: not the time others had the CPU)
    first = parse_response(body).peers
    assert time.thread_time() - t0 < 0.2
    assert len(first) == MAX_PEERS and len(set(first)) == MAX_PEERS  # (port-0 ones left out)
    assert set(first) != set(parse_response(body).peers)
    assert len(parse_response(bencodepy.encode({b"peers": listed})).peers) == MAX_PEERS


def test_refusals_and_redirects_are_said_in_a_line() -> None:
    """A refusal of 1.5 MB was printed whole at each failed announce; a redirect to a
    udp:// URL said only that URL, and a redirect loop aiohttp's empty message and the
    whole announce query."""
    import asyncio

    from aiohttp import web
    from pieced.peer.tracker import MAX_MESSAGE, Tracker

    async def refuse(req: web.Request) -> web.Response:
        return web.Response(body=bencodepy.encode({b"failure reason": b"x" * 1_500_000}))

    async def to_udp(req: web.Request) -> web.Response:
        raise web.HTTPFound("udp://127.0.0.1:1/announce")

    async def loop(req: web.Request) -> web.Response:
        raise web.HTTPFound("/announce/loop")

    async def main() -> list[str]:
        runner, base = await _serve({"/refuse": refuse, "/to_udp": to_udp, "/loop": loop})
        said = []
        try:
            for path in ("/refuse", "/to_udp", "/loop"):
                t = Tracker([[f"{base}{path}"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
                with pytest.raises(TrackerError) as caught:
                    await t.announce({}, False)
                said.append(str(caught.value))
                await t.close()
        finally:
            await runner.cleanup()
        return said

    refused, udp, looped = asyncio.run(main())
    assert refused.endswith("tracker says: " + "x" * MAX_MESSAGE), refused[-80:]
    assert "redirected to udp://127.0.0.1:1/announce" in udp and "not an HTTP" in udp, udp
    assert looped.endswith("/loop: redirected too many times"), looped


def test_a_300_with_a_location_is_followed_and_a_port_0_refused() -> None:
    """libtorrent follows any 3xx with a Location (300 Multiple Choices was "HTTP 300"
    here); a URL with port 0 was dialled at port 80, one of 70000 said Python's
    "Port out of range 0-65535"."""
    import asyncio

    from aiohttp import web
    from pieced.peer.tracker import Tracker

    async def choices(req: web.Request) -> web.Response:
        return web.Response(status=300, headers={"Location": "/announce/good"})

    async def good(req: web.Request) -> web.Response:
        return web.Response(body=bencodepy.encode(
            {b"interval": 60, b"peers": bytes([127, 0, 0, 1, 0x1a, 0xe1])}))

    async def main() -> tuple[Any, list[str]]:
        runner, base = await _serve({"/choices": choices, "/good": good})
        try:
            t = Tracker([[f"{base}/choices"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
            reply = await t.announce({}, False)
            said = []
            for url in ("http://127.0.0.1:0/announce", "https://[::1]:0/announce",
                        "http://127.0.0.1:70000/announce"):
                with pytest.raises(TrackerError) as caught:
                    await Tracker([[url]], bytes(20), b"-PZ0001-abcdefabcdef",
                                  6881).announce({}, False)
                said.append(str(caught.value))
        finally:
            await runner.cleanup()
        return reply, said

    reply, said = asyncio.run(main())
    assert reply.peers == [("127.0.0.1", 6881)]
    assert "port 0 in" in said[0] and "port 0 in" in said[1], said
    assert "not a port" in said[2], said


def test_a_completed_cut_short_by_the_end_is_not_said_again() -> None:
    """A run stopped while a slow tracker took its ``completed``: the goodbye sent
    ``completed`` again (the tracker counted two downloads), and ``stopped`` came too
    late to be sent. It may have been heard: ``stopped`` alone is sent."""
    import asyncio

    from aiohttp import web
    from pieced.peer.tracker import Tracker

    seen: list[str] = []

    async def answer(req: web.Request) -> web.Response:
        event = urllib.parse.parse_qs(req.query_string).get("event", [""])[0]
        seen.append(event)
        if event == "completed":
            await asyncio.sleep(5)
        return web.Response(body=bencodepy.encode({b"interval": 60, b"peers": b""}))

    async def main() -> None:
        runner, base = await _serve({"/a": answer})
        t = Tracker([[f"{base}/a"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
        try:
            await t.announce({}, False)
            slow = asyncio.ensure_future(t.announce({}, True))
            await asyncio.sleep(0.3)
            slow.cancel()  # (the run ends)
            await asyncio.wait_for(t.goodbye({}, True), 3)
        finally:
            await t.close()
            await runner.cleanup()

    asyncio.run(main())
    assert seen == ["started", "completed", "stopped"], seen


@pytest.mark.parametrize("after", [b"\n", b"\r\n", b"\r\n\r\n<br />\n", b"garbage"])
def test_bytes_after_the_reply_dictionary_are_left_unread(after: bytes) -> None:
    """A reply with anything after its dictionary (a PHP tracker's newline) was refused
    whole ("data after valid prefix"), and the download never began; libtorrent reads
    the dictionary and leaves the rest. Its keys may come in any order all the same."""
    body = b"d5:peers6:" + bytes([10, 0, 0, 1, 0x1A, 0xE1]) + b"8:intervali900ee" + after
    assert parse_response(body)[:2] == ([("10.0.0.1", 6881)], 900.0)
    with pytest.raises(TrackerError, match="tracker says: gone"):
        parse_response(bencodepy.encode({b"failure reason": b"gone"}) + after)
    with pytest.raises(TrackerError, match="not bencode"):  # (what comes first still counts)
        parse_response(after + body)


def test_a_reply_with_a_newline_after_it_is_taken_over_http() -> None:
    """The same, from an HTTP tracker (its Content-Length counting the newline)."""
    import asyncio

    from aiohttp import web
    from pieced.peer.tracker import Tracker

    async def newline(req: web.Request) -> web.Response:
        return web.Response(body=bencodepy.encode(
            {b"interval": 60, b"peers": bytes([127, 0, 0, 1, 0x1A, 0xE1])}) + b"\n")

    async def main() -> Any:
        runner, base = await _serve({"/a": newline})
        t = Tracker([[f"{base}/a"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
        try:
            return await t.announce({}, False)
        finally:
            await t.close()
            await runner.cleanup()

    assert asyncio.run(main())[:2] == ([("127.0.0.1", 6881)], 60.0)


_REPLY = bencodepy.encode({b"interval": 60, b"peers": bytes([127, 0, 0, 1, 0x1A, 0xE1])})


def _raw_reply(parts: list[bytes], keep_open: bool = False) -> Any:
    """Announce to a raw HTTP server on loopback that sends ``parts`` (a moment apart)
    to the request, then closes (or, ``keep_open``, holds the connection): the reply,
    or the TrackerError, and the time it took."""
    import asyncio
    import time

    from pieced.peer.tracker import Tracker

    async def main() -> tuple[Any, float]:
        hold = asyncio.Event()
        handlers: list[asyncio.Task[Any]] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(cast(Any, asyncio.current_task()))
            try:
                await reader.readuntil(b"\r\n\r\n")
                for part in parts:
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.05)
                if keep_open:
                    await hold.wait()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t = Tracker([[f"http://127.0.0.1:{port}/announce"]], bytes(20),
                    b"-PZ0001-abcdefabcdef", 6881)
        t0 = time.monotonic()
        try:
            return await t.announce({}, False), time.monotonic() - t0
        except TrackerError as exc:
            return exc, time.monotonic() - t0
        finally:
            hold.set()
            await t.close()
            server.close()
            if handlers:  # (each ends as it comes to its close)
                await asyncio.wait(handlers, timeout=5)

    return asyncio.run(main())


_OK = b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize("name,parts", [
    # a Content-Length longer than the body, then the connection closed
    ("long", [_OK + b"Content-Length: %d\r\n\r\n" % (len(_REPLY) + 40) + _REPLY]),
    ("long, in pieces", [_OK + b"Content-Length: 4000\r\n\r\n", _REPLY[:9], _REPLY[9:]]),
    # shorter than the body, and Connection: close
    ("short", [_OK + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_REPLY)
               + _REPLY + b"<html>PHP notice: ...</html>"]),
    ("short, said twice", [_OK + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (
        len(_REPLY) + 2) + _REPLY + b"\r\nmore", b"and more"]),
    # (what was taken before: no length, chunks, gzip, a bare LF between the lines)
    ("until closed", [_OK + b"Connection: close\r\n\r\n" + _REPLY[:10], _REPLY[10:]]),
    ("chunked", [_OK + b"Transfer-Encoding: chunked\r\n\r\n7\r\n" + _REPLY[:7] + b"\r\n",
                 b"%x;ext=1\r\n" % (len(_REPLY) - 7) + _REPLY[7:] + b"\r\n0\r\n\r\n"]),
    ("chunks cut short", [_OK + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(_REPLY)
                          + _REPLY + b"\r\n"]),
    ("gzip", [_OK + b"Content-Encoding: gzip\r\n\r\n" + __import__("gzip").compress(_REPLY)]),
    ("bare LF", [b"HTTP/1.0 200 OK\nContent-Length: %d\n\n" % len(_REPLY) + _REPLY]),
    # An interim reply first (it failed: "HTTP 100"); a length said twice, the first
    # right (the last was taken); a folded line that reads as a length; a length in
    # digits of another script (a ValueError of Python's): as libtorrent reads them
    ("100 Continue", [b"HTTP/1.1 100 Continue\r\nX-A: b\r\n\r\n" + _OK
                      + b"Content-Length: %d\r\n\r\n" % len(_REPLY) + _REPLY]),
    ("two lengths", [_OK + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(_REPLY)
                     + _REPLY]),
    ("folded", [_OK + b"X-Note: see below\r\n  Content-Length: 5\r\n\r\n" + _REPLY]),
    ("odd digits", [_OK + "Content-Length: \u00b2\r\n\r\n".encode("latin-1") + _REPLY]),
])
def test_http_framing_is_read_as_leniently_as_libtorrent_reads_it(
        name: str, parts: list[bytes]) -> None:
    """A Content-Length longer than the body, the connection then closed, was refused
    (aiohttp: "Not enough data to satisfy content length header"), and one shorter than
    the body with Connection: close too ("Data after `Connection: close`"): libtorrent
    takes the peers in both. The bytes that came are read, and taken when they are a
    whole reply."""
    got, _ = _raw_reply(parts)
    assert not isinstance(got, Exception), f"{name}: {got}"
    assert got[:2] == ([("127.0.0.1", 6881)], 60.0), name


def test_what_came_of_a_reply_is_refused_when_it_is_not_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes that came are taken only when they are a complete reply; the 2 MiB
    bound holds, and so does the time an announce has (a body promised and not sent,
    the connection held open)."""
    from pieced.peer import tracker

    got, _ = _raw_reply([_OK + b"Content-Length: 4000\r\n\r\n" + _REPLY[:-3]])
    assert isinstance(got, TrackerError) and "not bencode" in str(got), got
    got, _ = _raw_reply([_OK + b"Content-Length: %d\r\n\r\n" % (tracker.MAX_REPLY + 1)])
    assert isinstance(got, TrackerError) and "larger than" in str(got), got
    got, _ = _raw_reply([_OK + b"\r\n", *[b"d" * (1 << 20)] * 3])  # (no length: until closed)
    assert isinstance(got, TrackerError) and "larger than" in str(got), got
    got, _ = _raw_reply([b"SSH-2.0-OpenSSH_9.2\r\n\r\n"])
    assert isinstance(got, TrackerError) and "not HTTP" in str(got), got
    got, _ = _raw_reply([b"HTTP/1.1 100 Continue\r\n\r\n"])
    assert isinstance(got, TrackerError) and "after an interim reply" in str(got), got
    monkeypatch.setattr(tracker, "ANNOUNCE_TIMEOUT", 0.5)
    got, took = _raw_reply([_OK + b"Content-Length: 4000\r\n\r\n" + _REPLY[:10]],
                           keep_open=True)
    assert isinstance(got, TrackerError) and "no answer in" in str(got), got
    assert took < 2, took


def test_a_tracker_silent_on_completed_still_hears_stopped_before_the_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The goodbye sent ``completed``, waited for its answer, and the exit's limit (5 s)
    cut it off: a tracker that never answered ``completed`` never heard ``stopped`` (and
    kept handing our address out). ``completed`` has half the time now: ``stopped``
    goes out in the other half."""
    import asyncio
    import time
    from types import SimpleNamespace

    from aiohttp import web
    from pieced.peer import plugin
    from pieced.peer.plugin import Swarm
    from pieced.peer.tracker import Tracker

    monkeypatch.setattr(plugin, "STOP_ANNOUNCE_TIMEOUT", 2.0)
    seen: list[tuple[str, float]] = []

    async def main() -> float:
        release = asyncio.Event()

        async def answer(req: web.Request) -> web.Response:
            event = urllib.parse.parse_qs(req.query_string).get("event", [""])[0]
            seen.append((event, time.monotonic()))
            if event == "completed":
                await release.wait()  # never, as far as the exit goes
            return web.Response(body=bencodepy.encode({b"interval": 60, b"peers": b""}))

        runner, base = await _serve({"/a": answer})
        t = Tracker([[f"{base}/a"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
        swarm = SimpleNamespace(trackers=[t], _counters=lambda: {},
                                summary=SimpleNamespace(complete=True))
        try:
            await t.announce({}, False)
            t0 = time.monotonic()
            with contextlib.suppress(TimeoutError):  # (as Swarm.close waits for them)
                await asyncio.wait_for(Swarm._final_announces(cast(Any, swarm)),
                                       plugin.STOP_ANNOUNCE_TIMEOUT)
            return t0
        finally:
            release.set()
            await t.close()
            await runner.cleanup()

    t0 = asyncio.run(main())
    assert [e for e, _ in seen] == ["started", "completed", "stopped"], seen
    assert seen[2][1] - t0 < 2.0


def test_a_trackers_warning_is_shown_escaped_and_cut() -> None:
    """A reply's ``warning message`` was never shown. It is, after the tracker's URL, with
    its control characters escaped and cut as a refusal is."""
    import asyncio
    import logging
    import time
    from types import SimpleNamespace

    from aiohttp import web
    from pieced.peer.plugin import Swarm
    from pieced.peer.tracker import MAX_MESSAGE, Tracker

    warning = b"your client is old\npieced-peer: download complete\x1b[2J" + b"!" * 1000
    body = bencodepy.encode({b"interval": 60, b"peers": b"", b"warning message": warning})
    said = parse_response(body).warning
    assert said is not None and said.isprintable() and "\\n" in said and "\\x1b" in said
    assert said.startswith("your client is old\\npieced") and len(said) < MAX_MESSAGE + 10
    assert parse_response(bencodepy.encode({b"peers": b""})).warning is None

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    async def answer(req: web.Request) -> web.Response:
        return web.Response(body=body)

    async def main() -> str:
        runner, base = await _serve({"/a": answer})
        t = Tracker([[f"{base}/a"]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
        swarm = SimpleNamespace(done=asyncio.Event(), _counters=lambda: {},
                                meta=SimpleNamespace(aliases=(bytes(20),)),
                                connect=lambda host, port, v2=False: None)
        loop = asyncio.ensure_future(Swarm._announce_loop(cast(Any, swarm), t))
        try:
            deadline = time.monotonic() + 5
            while not records and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            loop.cancel()
            await t.close()
            await runner.cleanup()
        return base

    log = logging.getLogger("pieced.peer")
    handler = Keep()
    log.addHandler(handler)
    try:
        base = asyncio.run(main())
    finally:
        log.removeHandler(handler)
    assert records == [f"tracker warning: {base}/a: {said}"], records


def test_each_key_of_a_hybrid_says_what_its_trackers_answer_once(tmp_path: Path) -> None:
    """A hybrid torrent is announced under both its keys: each failure was printed twice,
    in two identical lines, and a tracker's warning never. Each line names its key now
    (a tracker may know the torrent under one of them only)."""
    import signal
    import threading
    import time

    from pieced.storage.metainfo import parse

    from tests.conftest import Daemon
    from tests.realtools import make_payload, make_torrent_lt
    from tests.test_peer_libtorrent import _tracker, _with_tracker, downloading

    content = make_payload(tmp_path / "seed", {"a.bin": 70_000}, seed=71)
    raw = make_torrent_lt(content, 65536, "hybrid")
    v1 = parse(raw).info_hash

    def reply(query: dict[str, str]) -> bytes:
        ih = urllib.parse.unquote_to_bytes(query["raw"].split("info_hash=")[1].split("&")[0])
        if ih == v1:
            return bencodepy.encode({b"interval": 60, b"peers": b"",
                                     b"warning message": b"v1 is old"})
        return bencodepy.encode({b"failure reason": b"tracker down"})

    d = Daemon(tmp_path)
    try:
        with _tracker(reply) as (port, _):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            proc = downloading(torrent, tmp_path / "dl", d)
            lines: list[str] = []

            def read() -> None:
                assert proc.stderr is not None
                lines.extend(proc.stderr)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            deadline = time.monotonic() + 30
            while (time.monotonic() < deadline
                   and sum("tracker" in line or "announce" in line for line in lines) < 2):
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            reader.join(10)
    finally:
        assert d.stop() == 0, d.stderr()
    url = f"http://127.0.0.1:{port}/announce"
    said = [line.split(": ", 1)[1].strip() for line in lines
            if "tracker warning" in line or "announce failed" in line]
    assert sorted(said) == sorted([
        f"tracker warning (under the v1 hash): {url}: v1 is old",
        f"announce failed (under the v2 hash): {url}: tracker says: tracker down"]), lines


def test_an_https_tracker_is_asked_over_tls_and_its_certificate_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS trackers (read by pieced-peer's own HTTP client now, as libtorrent reads
    them): the reply comes over TLS when the certificate is trusted, and a certificate
    nobody vouches for is refused, in a line naming the tracker."""
    import asyncio
    import shutil
    import ssl
    import subprocess

    from aiohttp import web
    from pieced.peer import tracker

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    async def answer(req: web.Request) -> web.Response:
        return web.Response(body=_REPLY + b"\r\n")

    async def main() -> list[Any]:
        served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        served.load_cert_chain(cert, key)
        app = web.Application()
        app.router.add_get("/announce", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=served).start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}/announce"
        got: list[Any] = []
        try:
            for trusted in (False, True):
                monkeypatch.setattr(tracker, "_tls", ssl.create_default_context(
                    cafile=str(cert)) if trusted else None)
                t = tracker.Tracker([[url]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
                try:
                    got.append(await t.announce({}, False))
                except TrackerError as exc:
                    got.append(exc)
                await t.close()
        finally:
            await runner.cleanup()
        got.append(url)
        return got

    refused, reply, url = asyncio.run(main())
    assert isinstance(refused, TrackerError) and str(refused).startswith(url), refused
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused) or "certificate" in str(refused), refused
    assert reply[:2] == ([("127.0.0.1", 6881)], 60.0)


def test_requests_that_are_not_announces_are_not_sent_here() -> None:
    """A .torrent (or a tracker's redirect) could have us GET any URL, with our announce's
    arguments after it: another service of this machine, whatever it does on a GET. As
    libtorrent refuses them: a request to this machine (by any of its names: loopback,
    0.0.0.0, an IPv4-mapped IPv6 address) must be an announce (its path begins with
    /announce), and a tracker's URL may not carry announce arguments of its own. Nothing
    of a refused request reaches the service."""
    import asyncio

    from aiohttp import web
    from pieced.peer.tracker import Tracker

    hits: list[str] = []

    async def service(req: web.Request) -> web.Response:
        hits.append(req.path)
        if req.path == "/announce/to-admin":  # (an announce's path, sent elsewhere)
            raise web.HTTPFound("/admin/delete")
        return web.Response(body=bencodepy.encode({b"interval": 60, b"peers": b""}))

    async def main() -> tuple[list[str], list[str]]:
        app = web.Application()
        app.router.add_get("/{tail:.*}", service)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", 0).start()
        port = runner.addresses[0][1]
        refused, answered = [], []
        try:
            for url in (f"http://127.0.0.1:{port}/admin/delete",
                        f"http://localhost:{port}/x",
                        f"http://127.9.9.9:{port}/",
                        f"http://0.0.0.0:{port}/x",
                        f"http://[::ffff:127.0.0.1]:{port}/x",
                        f"http://127.0.0.1:{port}/announce?info_hash=forged",
                        f"http://127.0.0.1:{port}/announce?PORT=1&a=b",
                        f"http://192.0.2.7:{port}/x?peer_id=y",
                        f"http://127.0.0.1:{port}/announce/to-admin",
                        f"http://127.0.0.1:{port}/announce.php?passkey=k"):
                t = Tracker([[url]], bytes(20), b"-PZ0001-abcdefabcdef", 6881)
                try:
                    await t.announce({}, False)
                    answered.append(url)
                except TrackerError as exc:
                    refused.append(str(exc))
                finally:
                    await t.close()
        finally:
            await runner.cleanup()
        return refused, answered

    refused, answered = asyncio.run(main())
    assert hits == ["/announce/to-admin", "/announce.php"], hits  # (the admin never)
    assert [u.split("/", 3)[3] for u in answered] == ["announce.php?passkey=k"], answered
    assert all("is on this machine and is not an announce" in r for r in refused[:5]), refused
    assert "refused: the tracker's URL carries info_hash= already" in refused[5], refused
    assert "carries PORT= already" in refused[6] and "carries peer_id=" in refused[7]
    assert "/admin/delete" in refused[8] and "is on this machine" in refused[8], refused


@pytest.mark.parametrize(("host", "kept"), [
    ("192.0.2.7", ["192.0.2.7"]), ("2001:db8::1", ["2001:db8::1"]), ("127.0.0.1", None),
    ("127.200.1.1", None), ("::1", None), ("0.0.0.0", None), ("::", None),
    ("::ffff:127.0.0.1", None), ("::ffff:192.0.2.7", ["::ffff:192.0.2.7"]),
    ("localhost", None)])
def test_a_request_that_is_not_an_announce_goes_only_where_this_machine_is_not(
        host: str, kept: list[str] | None) -> None:
    """The addresses such a request may be dialled at (a private tracker's
    http://host/KEY/announce is one): every address of the host but this machine's."""
    import asyncio

    from pieced.peer.tracker import not_this_machine

    if kept is None:
        with pytest.raises(TrackerError, match="is on this machine"):
            asyncio.run(not_this_machine(f"http://{host}/x", host, 80))
    else:
        assert asyncio.run(not_this_machine(f"http://{host}/x", host, 80)) == kept
