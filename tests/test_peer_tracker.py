"""Announce replies, read without sockets: compact (BEP 23) and dictionary peer lists,
IPv6, refusals, and garbage that never raises anything but TrackerError."""

from __future__ import annotations

import urllib.parse
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
    peers, interval, _ = parse_response(body)
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
    peers, interval, _ = parse_response(body)
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
        peers, interval, _ = parse_response(body)
    except TrackerError:
        return
    assert interval > 0 and all(0 < port < 65536 for _, port in peers)


def test_announce_url_escapes_binary_hashes() -> None:
    ih = bytes(range(20))
    url = announce_url("http://t.example/announce?key=1", ih, b"-PZ0001-abcdefabcdef", 6881,
                       "started", {"uploaded": 1, "downloaded": 2, "left": 3})
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert urllib.parse.unquote_to_bytes(url.split("info_hash=")[1].split("&")[0]) == ih
    assert query["key"] == ["1"] and query["event"] == ["started"] and query["compact"] == ["1"]
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
        app.router.add_get("/good", good)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            for first in ("http://ex..ample/announce", "http://" + "a" * 64 + ".org/announce"):
                t = Tracker([[first, f"http://127.0.0.1:{port}/good"]], bytes(20),
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
            app.router.add_get(f"/{name}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        t = Tracker([[f"{base}/flaky", f"{base}/good", f"{base}/never"]], bytes(20),
                    b"-PZ0001-abcdefabcdef", 6881)
        try:
            await t.announce({}, False)  # the flaky one answers
            await t.announce({}, False)  # it fails: the good one answers, with its id
            await t._announce(f"{base}/good", "", {})  # again, as its interval comes
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(t.goodbye({}, True), 3)
        finally:
            await t.close()
            release.set()
            await runner.cleanup()

    asyncio.run(main())
    # (the good one's first announce says "started": it is the first it hears of us)
    assert seen["good"] == [("started", None), ("", "t-42"), ("completed", "t-42"),
                            ("stopped", "t-42")]
    assert [e for e, _ in seen["flaky"]] == ["started", "", "completed"]
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
    """An aiohttp app on 127.0.0.1 with ``routes`` (path -> handler): (runner, base URL),
    to be awaited."""
    from aiohttp import web

    async def start() -> tuple[Any, str]:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"

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
                                connect=lambda host, port: None)
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
        raise web.HTTPFound("/loop")

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
