"""pieced-peer's swarm in process, against a real daemon: how it follows the daemon's
word on which pieces are verified when other clients change it too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bencodepy
from pieced.peer.plugin import Options, Swarm
from pieced.protocol.client import Client
from pieced.storage.metainfo import Metainfo, parse

from tests.conftest import Daemon
from tests.realtools import make_payload, make_torrent_lt


def _seeding(daemon: Daemon, tmp_path: Path, size: int, piece_length: int,
             seed: int) -> tuple[bytes, Metainfo, Options]:
    """A one-file v1 torrent whose payload is in the save path, and a seeder's options."""
    content = make_payload(tmp_path / "save", {"a.bin": size}, seed=seed)
    raw = make_torrent_lt(content, piece_length, "v1")
    opts = Options(torrent=tmp_path / "t.torrent", save_path=tmp_path / "save",
                   listen=("127.0.0.1", 0), seed=True, socket=str(daemon.socket))
    return raw, parse(raw), opts


def _clearer(daemon: Daemon, ih: bytes, piece: int) -> Callable[[], None]:
    """Another client's clear of ``piece``."""
    def clear() -> None:
        with Client(daemon.socket) as c:
            c.clear_piece(ih, piece)
    return clear


def test_a_piece_cleared_while_a_status_is_on_its_way_is_not_taken_from_it(
    daemon: Daemon, tmp_path: Path
) -> None:
    """pieced-peer asks the daemon's status now and then (a reconcile); the events that
    come before the reply are as new as its snapshot, or newer. A piece another client
    clears once the snapshot is taken, its piece_failed arriving first, stays missing:
    the older snapshot does not make pieced-peer announce it and serve it again."""
    raw, meta, opts = _seeding(daemon, tmp_path, 6 * 65536 + 7, 65536, seed=3)
    victim = 2
    clear_by_another_client = _clearer(daemon, meta.info_hash, victim)

    async def run() -> None:
        swarm = Swarm(opts, raw, meta)
        await swarm.start()  # registers and checks the payload: every piece verified
        try:
            picker = swarm.picker
            assert picker is not None and picker.complete
            ask = swarm.client.status

            async def status_then_a_clear(*args: Any, **kwargs: Any) -> dict[str, Any]:
                snapshot = await ask(*args, **kwargs)
                await asyncio.to_thread(clear_by_another_client)
                for _ in range(1000):  # its piece_failed reaches the swarm first
                    if not picker.have[victim]:
                        break
                    await asyncio.sleep(0.01)
                assert not picker.have[victim], "the clear's event never came"
                return snapshot

            swarm.client.status = status_then_a_clear  # type: ignore[method-assign]
            await swarm._look()
            assert not picker.have[victim]
            assert not picker.complete
            swarm.client.status = ask  # type: ignore[method-assign]
            await swarm._look()  # the daemon's word now: still missing
            assert not picker.have[victim]
        finally:
            await swarm.close()

    asyncio.run(run())


def test_what_peers_have_is_counted_right_as_they_come_and_go(
    daemon: Daemon, tmp_path: Path
) -> None:
    """How many connected peers have each piece (the picker's rarest-first order), as
    peers say HAVE_ALL, a BITFIELD, HAVE_NONE, then HAVE and lt_donthave, and leave. A
    peer with every piece is counted once, as a seed, not a piece at a time: its
    lt_donthave and HAVE since are counted a piece at a time, and undone when it goes."""
    from pieced.peer import wire
    from pieced.peer.conn import LT_DONTHAVE

    n = 6
    content = make_payload(tmp_path / "src", {"a.bin": n * 16384 - 5}, seed=4)
    raw = make_torrent_lt(content, 16384, "v1")
    meta = parse(raw)
    opts = Options(torrent=tmp_path / "t.torrent", save_path=tmp_path / "dl",
                   listen=("127.0.0.1", 0), socket=str(daemon.socket))

    async def run() -> None:
        swarm = Swarm(opts, raw, meta)
        await swarm.start()
        writers: dict[str, asyncio.StreamWriter] = {}
        try:
            picker = swarm.picker
            assert picker is not None

            async def counted(expected: list[int]) -> None:
                for _ in range(500):
                    if [a + picker.seeds for a in picker.availability] == expected:
                        return
                    await asyncio.sleep(0.01)
                assert [a + picker.seeds for a in picker.availability] == expected

            async def peer(name: str, said: bytes) -> None:
                _, w = await asyncio.open_connection("127.0.0.1", swarm.listen_port)
                w.write(wire.handshake(meta.info_hash, b"-XX0001-" + name.encode() * 12,
                                       wire.make_reserved(extended=True, fast=True))
                        + wire.extended(0, bencodepy.encode({b"m": {b"lt_donthave": 3}}))
                        + said)
                writers[name] = w

            def donthave(piece: int) -> bytes:
                return wire.extended(LT_DONTHAVE, piece.to_bytes(4, "big"))

            async def leave(name: str) -> None:
                writers.pop(name).close()

            await peer("a", wire.have_all())
            await counted([1] * n)
            await peer("b", wire.bitfield(wire.bits_from_pieces([0, 2], n)))
            await counted([2, 1, 2, 1, 1, 1])
            writers["a"].write(donthave(2) + donthave(5) + wire.have(2))
            await counted([2, 1, 2, 1, 1, 0])
            await peer("c", wire.have_none() + wire.have(5) + wire.have(1))
            await counted([2, 2, 2, 1, 1, 1])
            await leave("a")
            await counted([1, 1, 1, 0, 0, 1])
            await leave("b")
            await counted([0, 1, 0, 0, 0, 1])
            await leave("c")
            await counted([0] * n)
            assert picker.seeds == 0
        finally:
            for w in writers.values():
                w.close()
            await swarm.close()

    asyncio.run(run())


def test_only_a_peer_that_gives_nothing_gives_its_place_up(daemon: Daemon, tmp_path: Path) -> None:
    """At ``max_peers``, a peer with every piece that has kept us choked for 30 s (its
    connection's age moved back, not waited for) gives its place to a newcomer; the same
    peer once it unchokes us, our requests on their way to it, does not (it was swapped
    for a newcomer with nothing to give), nor while our requests wait on it."""
    from pieced.peer import wire
    from pieced.peer.plugin import UNPRODUCTIVE_SECONDS

    n = 8
    content = make_payload(tmp_path / "src", {"a.bin": n * 16384 - 5}, seed=4)
    raw = make_torrent_lt(content, 16384, "v1")
    meta = parse(raw)
    opts = Options(torrent=tmp_path / "t.torrent", save_path=tmp_path / "dl",
                   listen=("127.0.0.1", 0), socket=str(daemon.socket), max_peers=1)

    async def run() -> None:
        swarm = Swarm(opts, raw, meta)
        await swarm.start()
        writers: list[asyncio.StreamWriter] = []
        try:
            _, w = await asyncio.open_connection("127.0.0.1", swarm.listen_port)
            writers.append(w)
            w.write(wire.handshake(meta.info_hash, b"-XX0001-" + b"a" * 12,
                                   wire.make_reserved(extended=True, fast=True))
                    + wire.have_all())
            for _ in range(500):
                await asyncio.sleep(0.01)
                if swarm.peers and next(iter(swarm.peers)).conn.am_interested:
                    break
            (a,) = swarm.peers
            assert swarm._idlest() is None  # (choking us, but not for long yet)
            a.opened -= UNPRODUCTIVE_SECONDS + 1
            assert swarm._idlest() is a  # choked all along: nothing given
            w.write(wire.unchoke())
            for _ in range(500):
                await asyncio.sleep(0.01)
                if a.conn.our_requests:
                    break
            assert a.conn.our_requests and not a.conn.peer_choking
            assert swarm._idlest() is None  # just unchoked us: our requests are on their way
            _, w2 = await asyncio.open_connection("127.0.0.1", swarm.listen_port)
            writers.append(w2)
            w2.write(wire.handshake(meta.info_hash, b"-XX0001-" + b"b" * 12,
                                    wire.make_reserved(extended=True, fast=True))
                     + wire.have_none())
            await asyncio.sleep(1)
            assert not a.closed and swarm.peers == {a}
        finally:
            for w in writers:
                w.close()
            await swarm.close()

    asyncio.run(run())


def test_an_interrupt_before_the_run_is_under_way_ends_it_quietly(
        tmp_path: Path, monkeypatch: Any, capsys: Any) -> None:
    """Ctrl-C in the moment before pieced-peer's own signal handlers are in place
    printed a traceback; it says it was interrupted, and exits 130 as a shell would."""
    from pieced.peer import plugin

    def interrupted(*_: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(plugin, "read_metainfo", interrupted)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(b"d4:infod4:name1:xee")
    assert plugin.main([str(torrent), "--save-path", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "pieced-peer: interrupted\n"


def test_newcomers_waiting_for_their_handshake_hold_no_place(daemon: Daemon,
                                                             tmp_path: Path) -> None:
    """Newcomers let in over ``max_peers`` wait for their handshake before a place is
    found for them. They were counted as holding places: with a place freed, the first of
    two such newcomers to handshake was dropped ("no place for it"). And eight of them
    from one address, connected again as they timed out, turned every other newcomer
    away: an address may have two waiting, the others are let in to wait as well."""
    from pieced.peer import wire

    content = make_payload(tmp_path / "src", {"a.bin": 8 * 16384 - 5}, seed=4)
    raw = make_torrent_lt(content, 16384, "v1")
    meta = parse(raw)
    opts = Options(torrent=tmp_path / "t.torrent", save_path=tmp_path / "dl",
                   listen=("127.0.0.1", 0), socket=str(daemon.socket), max_peers=3)

    def hello(n: int) -> bytes:  # (a peer id of its own: one peer's second connection goes)
        return wire.handshake(meta.info_hash, b"-XX0001-" + b"%012d" % n,
                              wire.make_reserved(extended=True, fast=True)) + wire.have_none()

    async def dial(host: str = "127.0.0.1") -> tuple[asyncio.StreamReader,
                                                    asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", swarm.listen_port,
                                              local_addr=(host, 0))

    async def answered(r: asyncio.StreamReader) -> bool:
        try:
            return bool(await asyncio.wait_for(r.read(68), 2))
        except (TimeoutError, ConnectionError):
            return False

    swarm = Swarm(opts, raw, meta)

    async def run() -> None:
        await swarm.start()
        ws: list[asyncio.StreamWriter] = []
        try:
            placed = [await dial() for _ in range(3)]
            for n, (_, w) in enumerate(placed):
                w.write(hello(n))
                ws.append(w)
            await asyncio.sleep(0.5)
            bare = [await dial() for _ in range(2)]  # over the limit: waiting
            ws.extend(w for _, w in bare)
            await asyncio.sleep(0.3)
            assert sum(p.unplaced for p in swarm.peers) == 2
            placed[0][1].close()  # a place freed
            await asyncio.sleep(0.5)
            r, w = bare[0]
            w.write(hello(9))
            assert await answered(r)  # (it takes the free place)
            assert any(not p.unplaced and not p.closed for p in swarm.peers)
            more = [await dial("127.0.0.3") for _ in range(8)]  # one address: 2 wait
            ws.extend(w for _, w in more)
            await asyncio.sleep(0.3)
            assert sum(p.unplaced for p in swarm.peers) == 1 + 2
            r, w = await dial("127.0.0.4")  # another address still waits its turn
            ws.append(w)
            await asyncio.sleep(0.3)
            assert sum(p.unplaced for p in swarm.peers) == 1 + 2 + 1
        finally:
            for w in ws:
                w.close()
            await swarm.close()

    asyncio.run(run())


def test_connections_that_never_handshake_make_way_for_a_peer_that_does(
        daemon: Daemon, tmp_path: Path, monkeypatch: Any) -> None:
    """Connections from many addresses that say nothing hold every place and every wait
    for one (made again as they time out, they would for ever): a newcomer that is let in
    over the limit once a waiting one has been silent for SILENT_SECONDS, and given the
    place of a silent one when it handshakes. (Every newcomer was turned away, or found
    "no place for it": a leecher never got in while 50 silent addresses dialled again.)"""
    from pieced.peer import plugin, wire

    monkeypatch.setattr(plugin, "SILENT_SECONDS", 0.5, raising=False)
    content = make_payload(tmp_path / "src", {"a.bin": 8 * 16384 - 5}, seed=4)
    raw = make_torrent_lt(content, 16384, "v1")
    meta = parse(raw)
    opts = Options(torrent=tmp_path / "t.torrent", save_path=tmp_path / "dl",
                   listen=("127.0.0.1", 0), socket=str(daemon.socket), max_peers=3)
    hello = wire.handshake(meta.info_hash, b"-XX0001-" + b"h" * 12,
                           wire.make_reserved(extended=True, fast=True)) + wire.have_none()
    swarm = Swarm(opts, raw, meta)

    async def dial(host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", swarm.listen_port,
                                              local_addr=(host, 0))

    async def run() -> None:
        await swarm.start()
        ws: list[asyncio.StreamWriter] = []
        try:
            silent = [await dial(f"127.0.1.{i}") for i in range(1, 12)]  # 3 placed, 8 wait
            ws.extend(w for _, w in silent)
            await asyncio.sleep(0.3)
            assert sum(not p.unplaced for p in swarm.peers) == 3
            assert sum(p.unplaced for p in swarm.peers) == plugin.UNPLACED
            await asyncio.sleep(0.5)  # (all silent for SILENT_SECONDS now)
            r, w = await dial("127.0.0.9")
            ws.append(w)
            w.write(hello)
            answer = await asyncio.wait_for(r.readexactly(68), 5)  # let in, and placed
            assert answer[28:48] == meta.info_hash
            await asyncio.sleep(0.3)
            placed = [p for p in swarm.peers if not p.unplaced and not p.closed]
            assert len(placed) == 3 and any(p.conn.handshaken for p in placed)
            assert sum(p.unplaced for p in swarm.peers if not p.closed) == plugin.UNPLACED - 1
        finally:
            for w in ws:
                w.close()
            await swarm.close()

    asyncio.run(run())


def test_addresses_on_the_command_line_take_ipv6_in_brackets_only() -> None:
    """``--peer ::1`` was read as host ``:`` and port 1, and dialled for ever without a
    word; ``fe80::1`` as ``fe80:`` port 1. A host with a colon goes in brackets."""
    import argparse

    import pytest
    from pieced.peer.plugin import _hostport

    assert _hostport("[::1]:6881") == ("::1", 6881)
    assert _hostport("10.0.0.1:80") == ("10.0.0.1", 80)
    assert _hostport("example.org:6881") == ("example.org", 6881)
    assert _hostport(":6881") == ("", 6881)
    for bad in ("::1", "fe80::1", "1:2:3:4:5:6:7:8", "::1:6881", "[::1", "[::1:6881",
                "[127.0.0.1]:5", "[nothost]:5", "host", "host:99999", "[::1]:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _hostport(bad)


def test_listening_on_every_interface_by_name_takes_ipv4_and_ipv6(
        daemon: Daemon, tmp_path: Path) -> None:
    """``--listen [::]:PORT`` made an IPv6-only socket (asyncio sets IPV6_V6ONLY), and
    ``:PORT`` an IPv4-only one, while trackers were told the port over either family:
    peers that a tracker reached over the other one found nobody there."""
    from pieced.peer import wire

    content = make_payload(tmp_path / "src", {"a.bin": 4 * 16384}, seed=5)
    raw = make_torrent_lt(content, 16384, "v1")
    meta = parse(raw)
    hello = wire.handshake(meta.info_hash, b"-XX0001-" + b"v" * 12, wire.make_reserved())

    async def answered(host: str, port: int) -> bytes:
        r, w = await asyncio.open_connection(host, port)
        try:
            w.write(hello)
            return await asyncio.wait_for(r.readexactly(68), 5)
        finally:
            w.close()

    async def run(swarm: Swarm) -> None:
        await swarm.start()
        try:
            for host in ("127.0.0.1", "::1"):
                assert (await answered(host, swarm.listen_port))[28:48] == meta.info_hash
        finally:
            await swarm.close()

    for listen in ("::", ""):
        opts = Options(torrent=tmp_path / "t.torrent", save_path=tmp_path / "dl",
                       listen=(listen, 0), socket=str(daemon.socket))
        asyncio.run(run(Swarm(opts, raw, meta)))


async def _start_with(swarm: Swarm, between: Callable[[], None]) -> None:
    """Start ``swarm``, ``between`` (another client's doing) run once the daemon's first
    status has come, before the swarm takes the torrent up; its events read meanwhile."""
    join = swarm._join

    async def join_then(*args: Any, **kwargs: Any) -> dict[str, Any]:
        st = await join(*args, **kwargs)
        await asyncio.to_thread(between)
        await asyncio.sleep(0.3)  # (the events it caused reach the swarm)
        return st

    swarm._join = join_then  # type: ignore[method-assign]
    await swarm.start()


def test_a_piece_verified_as_the_first_status_comes_is_taken_at_once(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A piece another client verifies once pieced-peer has the daemon's first status,
    before it has taken the torrent up (two pieced-peers started on one torrent at
    once): its piece_verified is not dropped, and the piece is had at once, not found at
    the next reconcile (5 s later, the download held up for it meanwhile)."""
    n = 6
    content = make_payload(tmp_path / "src", {"a.bin": n * 32768 - 9}, seed=5)
    raw = make_torrent_lt(content, 32768, "v1")
    meta = parse(raw)
    data = (content / "a.bin").read_bytes()
    opts = Options(torrent=tmp_path / "t.torrent", save_path=tmp_path / "dl",
                   listen=("127.0.0.1", 0), socket=str(daemon.socket))
    piece = 3

    def verify_by_another_client() -> None:
        with Client(daemon.socket) as c:
            for begin in (0, 16384):
                start = piece * 32768 + begin
                c.write_chunk(meta.info_hash, piece, begin, data[start:start + 16384])
            for _ in range(500):
                if c.status(meta.info_hash)["have"][0] & (0x80 >> piece):
                    return
                time.sleep(0.01)
            raise AssertionError("the other client's piece did not verify")

    async def run() -> None:
        swarm = Swarm(opts, raw, meta)
        await _start_with(swarm, verify_by_another_client)
        try:
            picker = swarm.picker
            assert picker is not None
            assert picker.have[piece]
            assert sum(picker.have) == 1
        finally:
            await swarm.close()

    asyncio.run(run())


def test_a_piece_cleared_as_the_first_status_comes_is_asked_about_at_once(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The same for a piece another client clears then: its piece_failed may be older
    than the status or newer, so the daemon is asked again at once (not at the next
    reconcile, 5 s later), and the piece is not announced or served meanwhile."""
    raw, meta, opts = _seeding(daemon, tmp_path, 6 * 32768 - 9, 32768, seed=6)
    victim = 4
    clear_by_another_client = _clearer(daemon, meta.info_hash, victim)

    async def run() -> None:
        swarm = Swarm(opts, raw, meta)
        await _start_with(swarm, clear_by_another_client)
        try:
            picker = swarm.picker
            assert picker is not None
            assert not swarm.settled.is_set() or not picker.have[victim]
            await asyncio.wait_for(swarm.settled.wait(), 10.0)
            assert not picker.have[victim]
            assert sum(picker.have) == meta.num_pieces - 1
        finally:
            await swarm.close()

    asyncio.run(run())
