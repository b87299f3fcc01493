"""The client library when the plugin's side goes wrong: calls cancelled at awkward
moments, callbacks that raise, timeouts in the middle of a frame, exceptions leaving
a ``with`` block, clients never closed, operations longer than the timeout. Each
against a real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import bencodepy
import pytest
from pieced.protocol.client import AsyncClient, Client
from pieced.storage.errors import AccessDenied, BadRequest, OutOfRange, UnknownTorrent

from tests.conftest import Daemon, sparse_zero_torrent
from tests.realtools import make_payload, make_torrent_lt
from tests.test_disk import Source

PIECE = 256 * 1024


def _torrent(tmp_path: Path, pieces: int = 16, piece: int = PIECE) -> tuple[bytes, Source]:
    content = make_payload(tmp_path / "src", pieces * piece, seed=40)
    raw = make_torrent_lt(content, piece, "v1")
    return raw, Source(raw, tmp_path / "src")


def _ring_memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (gone since the listing)
            n += "memfd:pieced-ring" in os.readlink(f"/proc/self/fd/{fd}")
    return n


def test_a_call_cancelled_while_it_attaches_the_ring_leaves_the_ring_usable(
        tmp_path: Path) -> None:
    """The first write_block_direct attaches the ring; cancelled while the attach was
    in flight, the client closed its ring, which the daemon had attached all the same:
    every later ring write of that client failed ("a ring is already attached"). The
    attach runs on to its end, and the client keeps the ring."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)

    async def main() -> None:
        async with AsyncClient(str(d.socket)) as c:
            ih = await c.register(raw, tmp_path / "dl")
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.write_block_direct(ih, 0, 0, src.read(0, 0, 16384)),
                                       0.0005)
            for b in range(0, PIECE, 16384):
                await c.write_block_direct(ih, 0, b, src.read(0, b, 16384))
            await c.wait_writes()
            chunk = await c.read_chunk_ring(ih, 0, 0, 16384)
            assert bytes(chunk.data) == src.read(0, 0, 16384)
            chunk.release()
            await c.flush_all()
            assert (await c.status(ih, files=False))["verified_pieces"] == 1

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert d.stop() == 0


def test_a_ring_attached_while_a_writes_error_waits_is_kept(tmp_path: Path) -> None:
    """A write's error waiting to be raised (a write to a torrent not registered), then
    the first ring write, which attaches the ring: the daemon takes the ring, and the
    write's error is raised. The client took that for a failed attach and closed its
    ring: every later ring call of the connection was refused, "a ring is already
    attached". Both clients now keep the ring the daemon took."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)
    block = src.read(0, 0, 16384)

    async def main() -> None:
        async with AsyncClient(str(d.socket)) as c:
            ih = await c.register(raw, tmp_path / "dl_async")
            await c.write_chunk(b"\1" * 20, 0, 0, block)
            with pytest.raises(UnknownTorrent):
                await c.write_block_direct(ih, 0, 0, block)
            for b in range(0, PIECE, 16384):
                await c.write_block_direct(ih, 0, b, src.read(0, b, 16384))
            await c.wait_writes()
            await c.flush_all()
            assert (await c.status(ih, files=False))["verified_pieces"] == 1

    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            c.write_chunk(b"\1" * 20, 0, 0, block)
            with pytest.raises(UnknownTorrent):
                c.write_block_direct(ih, 0, 0, block)
            for b in range(0, PIECE, 16384):
                c.write_block_direct(ih, 0, b, src.read(0, b, 16384))
            c.wait_writes()
            with c.read_chunk_ring(ih, 0, 0, 16384) as chunk:
                assert bytes(chunk.data) == block
            c.flush_all()
            assert c.status(ih, files=False)["verified_pieces"] == 1
            c.unregister(ih)
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert d.stop() == 0


def test_a_call_made_while_a_writes_error_is_on_its_way_gets_its_own_answer(
        tmp_path: Path) -> None:
    """A bad write (out of range), then at once a register: the daemon registered the
    torrent, but the client raised the write's error, which came back first, in place
    of the register's answer: the info_hash was lost with the torrent registered (a
    register again: already registered), and an unregister so made said failed, done.
    A call raises a write's error now only when it was not sent (the error was known
    first); sent, it gets its own answer, and the error is the next call's."""
    raw, _src = _torrent(tmp_path)
    other = make_torrent_lt(make_payload(tmp_path / "other", 3 * 16384, seed=41), 16384, "v1")
    d = Daemon(tmp_path)

    async def main() -> int:
        answered = 0
        async with AsyncClient(str(d.socket)) as c:
            ih = await c.register(raw, tmp_path / "dl_async")
            for _ in range(5):
                for step in ("register", "unregister"):
                    await c.write_chunk(ih, 999, 0, b"x")
                    try:
                        if step == "register":
                            ih2 = await c.register(other, tmp_path / "dl_async2")
                        else:
                            await c.unregister(ih2)
                    except OutOfRange:  # known before it was sent: not sent, not done
                        done = False
                    else:  # sent and done: the write's error is the next call's
                        done = True
                        answered += 1
                        with pytest.raises(OutOfRange):
                            await c.torrents()
                    listed = len(await c.torrents())
                    assert listed == (2 if (step == "register") == done else 1), (step, done)
                    if not done and step == "register":
                        break  # (nothing to unregister)
                    if not done:
                        await c.unregister(ih2)
        return answered

    try:
        answered = 0
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            for _ in range(5):
                for step in ("register", "unregister"):
                    c.write_chunk(ih, 999, 0, b"x")
                    try:
                        if step == "register":
                            ih2 = c.register(other, tmp_path / "dl2")
                        else:
                            c.unregister(ih2)
                    except OutOfRange:
                        done = False
                    else:
                        done = True
                        answered += 1
                        with pytest.raises(OutOfRange):
                            c.torrents()
                    listed = len(c.torrents())
                    assert listed == (2 if (step == "register") == done else 1), (step, done)
                    if not done and step == "register":
                        break
                    if not done:
                        c.unregister(ih2)
            c.unregister(ih)
        answered += asyncio.run(asyncio.wait_for(main(), 60))
        assert answered  # (the error came back during a call at least once)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("bad", ["short", "long", "int", "bad_hex"])
def test_a_block_call_with_an_info_hash_it_cannot_carry_is_refused_at_once(
        tmp_path: Path, bad: str) -> None:
    """A block frame's info_hash field is 20 bytes: one of 19 was padded with a zero,
    one of 32 cut, silently (a request for another torrent than named). And
    try_write_block_direct took whatever it was given, framed later in a callback where
    the error was lost with every later request of the client: its next call never
    returned. Every block call now refuses them when called, and the client goes on;
    hex digits, a bytearray or a memoryview are taken, as by the control requests."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)
    block = src.read(0, 0, 16384)

    async def main() -> None:
        async with AsyncClient(str(d.socket)) as c:
            ih = await c.register(raw, tmp_path / "dl")
            wrong = {"short": ih[:19], "long": ih + bytes(12), "int": 7, "bad_hex": "zz" * 20}[bad]
            await c.attach_ring(1 << 20)
            with pytest.raises(BadRequest, match="info_hash is 20 bytes"):
                c.try_write_block_direct(wrong, 0, 0, block)  # type: ignore[arg-type]
            with pytest.raises(BadRequest, match="info_hash is 20 bytes"):
                await c.write_block_direct(wrong, 0, 0, block)  # type: ignore[arg-type]
            with pytest.raises(BadRequest, match="info_hash is 20 bytes"):
                await c.write_chunk(wrong, 0, 0, block)  # type: ignore[arg-type]
            assert c.try_write_block_direct(ih, 0, 0, block)
            await c.write_chunk(ih.hex(), 0, 16384, src.read(0, 16384, 16384))  # type: ignore[arg-type]
            await c.write_block_direct(bytearray(ih), 0, 32768, src.read(0, 32768, 16384))
            await c.write_chunk(memoryview(ih), 0, 49152, src.read(0, 49152, 16384))
            await asyncio.wait_for(c.wait_writes(), 10)
            assert (await asyncio.wait_for(c.status(ih, files=False), 10))["have"] == bytes(2)
            assert (await c.status(ih, partial=True))["partial"] == [[0, [[0, 65536]]]]

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert d.stop() == 0


def test_a_register_cancelled_while_its_frame_waits_sends_its_own_descriptor(
        tmp_path: Path) -> None:
    """A metainfo over the frame limit travels as a memfd. Its register, cancelled while
    the frame waited for room in the socket (the daemon not reading for a moment), closed
    the descriptor the queued frame named: the send then failed (EBADF), every frame
    queued behind it was dropped without a word, and the client waited for their replies
    for ever. The queue holds descriptors of its own now."""
    raw, src = _torrent(tmp_path)
    n = 440_000  # pieces of 16 KiB: 8.8 MB of metainfo, over the 8 MiB frame limit
    info = {b"name": b"big.bin", b"piece length": 16384, b"length": n * 16384,
            b"pieces": hashlib.sha1(b"x").digest() * n}
    big = bytes(bencodepy.encode({b"info": info}))
    d = Daemon(tmp_path)

    async def main() -> None:
        c = await AsyncClient(str(d.socket)).connect()
        try:
            ih = await c.register(raw, tmp_path / "dl")
            await c.attach_ring()
            d.proc.send_signal(signal.SIGSTOP)
            try:
                writes = [asyncio.ensure_future(c.write_chunk(ih, k, 16384, bytes(200_000)))
                          for k in range(16)]  # more than the socket holds
                await asyncio.sleep(0.2)
                register = asyncio.ensure_future(c.register(big, tmp_path / "dl"))
                await asyncio.sleep(0.1)
                register.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await register
                for p in range(16):  # queued behind the register's frame
                    await c.write_block_direct(ih, p, 0, src.read(p, 0, 16384))
            finally:
                d.proc.send_signal(signal.SIGCONT)
            await asyncio.gather(*writes, return_exceptions=True)
            await asyncio.wait_for(c.wait_writes(), 20)
            names = {t["name"] for t in await c.torrents()}
            assert names == {src.meta.name, "big.bin"}  # (the daemon got the metainfo)
        finally:
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        d.proc.send_signal(signal.SIGCONT)
        assert d.stop() == 0


def test_a_callback_that_raises_leaves_no_reply_unread(tmp_path: Path) -> None:
    """An ``on_event`` callback raised: the replies that came in the same read as the
    event were left unparsed, and the next wait for them blocked on the socket until
    the timeout. Its exception is raised once every frame received is handled."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)

    def callback(name: str, fields: dict) -> None:
        if name == "piece_verified":
            raise RuntimeError("the plugin's bug")

    try:
        with Client(d.socket, on_event=callback, timeout=5) as c:
            ih = c.register(raw, tmp_path / "dl")
            c.subscribe(ih)
            for b in range(0, PIECE, 16384):  # piece 0 whole: one piece_verified
                c.write_chunk(ih, 0, b, src.read(0, b, 16384))
            time.sleep(0.5)
            for b in range(0, PIECE - 16384, 16384):  # replies only
                c.write_chunk(ih, 1, b, src.read(1, b, 16384))
            time.sleep(1)  # (all in the socket, read in one go)
            with pytest.raises(RuntimeError, match="plugin's bug"):
                c.wait_writes()
            started = time.monotonic()
            c.wait_writes()
            assert time.monotonic() - started < 2
            assert c.status(ih, files=False)["verified_pieces"] == 1
    finally:
        assert d.stop() == 0


def test_a_frame_cut_short_by_the_timeout_closes_the_client(tmp_path: Path) -> None:
    """The daemon read nothing for longer than the client's timeout (stopped here) in the
    middle of a 1 MiB WRITE: part of the frame was out, and the client went on, the
    daemon taking its next requests for the rest of the block. Every later call timed
    out. The client closes the connection instead, and says so at once."""
    raw, src = _torrent(tmp_path, pieces=16, piece=1 << 20)
    d = Daemon(tmp_path)
    try:
        c = Client(d.socket, timeout=1)
        ih = c.register(raw, tmp_path / "dl")
        d.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                for p in range(16):
                    c.write_chunk(ih, p, 0, src.read(p, 0, 1 << 20))
        finally:
            d.proc.send_signal(signal.SIGCONT)
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="closed"):
            c.status(ih, files=False)
        assert time.monotonic() - started < 0.5
        c.close()
        with Client(d.socket) as other:  # the daemon is none the worse
            assert other.status(ih, files=False)["errors"] == []
    finally:
        d.proc.send_signal(signal.SIGCONT)
        assert d.stop() == 0


def test_an_exception_leaving_a_with_block_is_the_one_raised(tmp_path: Path) -> None:
    """A plugin's exception left a ``with Client(...)`` block while a write that fails
    was in flight: close() raised the write's error in its place (UnknownTorrent), the
    plugin's only in its context. The plugin's comes out."""
    d = Daemon(tmp_path)

    async def async_case() -> None:
        with pytest.raises(KeyError, match="plugin"):
            async with AsyncClient(str(d.socket)) as ac:
                await ac.write_chunk(b"\1" * 20, 0, 0, bytes(16384))
                raise KeyError("the plugin's own")

    try:
        with pytest.raises(KeyError, match="plugin"), Client(d.socket) as c:
            c.write_chunk(b"\1" * 20, 0, 0, bytes(16384))
            raise KeyError("the plugin's own")
        asyncio.run(async_case())
        # (left normally, the write's error is raised)
        with pytest.raises(UnknownTorrent), Client(d.socket) as c:
            c.write_chunk(b"\1" * 20, 0, 0, bytes(16384))
    finally:
        assert d.stop() == 0


def test_a_client_never_closed_gives_its_ring_back_when_collected(tmp_path: Path) -> None:
    """Clients dropped without close(): their sockets were closed when collected, their
    rings (memfds) never: ten of them kept 160 MiB for the life of the process."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
        gc.collect()
        before = _ring_memfds()
        for _ in range(5):
            c = Client(d.socket)
            c.write_block_direct(ih, 0, 0, src.read(0, 0, 16384))
            c.wait_writes()
            del c
        gc.collect()
        assert _ring_memfds() == before
    finally:
        assert d.stop() == 0


def test_long_operations_wait_past_the_timeout(tmp_path: Path) -> None:
    """A recheck waiting behind another client's recheck of the same torrent hears
    nothing (the progress goes to the other): after the client's timeout it raised a
    bare TimeoutError while the daemon carried on, and ``pieced recheck`` printed a
    traceback and exited 1 ("pieces fail"). The operations that may take minutes
    wait as long as they take."""
    raw = sparse_zero_torrent(tmp_path / "save", "zeros.bin", 16 << 20, 64)  # 1 GiB
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "save")
        first: list[float] = []

        def recheck() -> None:
            with Client(d.socket) as a:
                started = time.monotonic()
                a.recheck(ih, full=True)
                first.append(time.monotonic() - started)

        t = threading.Thread(target=recheck)
        t.start()
        time.sleep(0.2)
        with Client(d.socket, timeout=0.3) as b:
            result = b.recheck(ih, full=True)
            assert result["failed_v1"] == []
            t.join()
            assert first and first[0] > 0.3, first  # (long enough to have timed out)
            assert b.status(ih, files=False)["verified_pieces"] == 64
    finally:
        assert d.stop() == 0


def test_close_ends_every_call_in_flight_and_every_call_after_it(tmp_path: Path) -> None:
    """close() cancelled the reader and let go of the socket, but the calls waiting for
    a reply waited for ever, and so did every call made after it (its frame dropped
    without a word). They raise now: those in flight and those after."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)

    async def main() -> None:
        c = await AsyncClient(str(d.socket)).connect()
        ih = await c.register(raw, tmp_path / "dl")
        for b in range(0, PIECE, 16384):
            await c.write_block_direct(ih, 0, b, src.read(0, b, 16384))
        await c.wait_writes()
        calls = [asyncio.ensure_future(c.status(ih)) for _ in range(50)]
        calls += [asyncio.ensure_future(c.read_piece(ih, 0)) for _ in range(50)]
        await asyncio.sleep(0)  # (sent, not answered yet)
        await c.close()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(r, (dict, bytes, ConnectionError)) for r in results), results
        assert any(isinstance(r, ConnectionError) for r in results)
        for call in (c.status(ih), c.write_chunk(ih, 1, 0, bytes(16384)),
                     c.write_block_direct(ih, 1, 0, bytes(16384)), c.read_chunk(ih, 0, 0, 16384)):
            with pytest.raises(ConnectionError, match="closed"):
                await asyncio.wait_for(call, 5)
        assert not c.try_write_block_direct(ih, 1, 0, bytes(16384))

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert d.stop() == 0


def test_a_write_waits_for_ring_space_that_reads_hold(tmp_path: Path) -> None:
    """A plugin seeds and downloads through one client: while the ring was full of
    chunks read for seeding (their replies about to come, or held until sent), a
    write_block_direct raised "ring full with no write in flight" instead of waiting,
    and the download stopped. It waits for the reads to give their space back."""
    raw_a, src_a = _torrent(tmp_path / "a")
    raw_b, src_b = _torrent(tmp_path / "b", pieces=15)  # (another torrent)
    d = Daemon(tmp_path)
    block = 16384

    async def main() -> None:
        async with AsyncClient(str(d.socket)) as c:
            await c.attach_ring(4 * block)  # (small: the reads fill it often)
            ih_a = await c.register(raw_a, tmp_path / "dl")
            for p in range(16):
                for b in range(0, PIECE, block):
                    await c.write_block_direct(ih_a, p, b, src_a.read(p, b, block))
            await c.wait_writes()
            ih_b = await c.register(raw_b, tmp_path / "dl")

            async def seed(k: int) -> None:
                for i in range(150):
                    p = (i + k) % 16
                    with await c.read_chunk_ring(ih_a, p, 0, block) as chunk:
                        assert bytes(chunk.data) == src_a.read(p, 0, block)
                        await asyncio.sleep(0)  # (sent to a peer meanwhile)

            async def download() -> None:
                for p in range(15):
                    for b in range(0, PIECE, block):
                        await c.write_block_direct(ih_b, p, b, src_b.read(p, b, block))
                        await c.wait_writes()  # (nothing else in flight: a slow peer)

            await asyncio.gather(seed(0), seed(5), seed(9), seed(12), download())
            await c.flush_all()
            assert (await c.status(ih_b, files=False))["verified_pieces"] == 15

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        assert d.stop() == 0


def test_a_cancelled_connect_leaves_no_connection_behind(tmp_path: Path) -> None:
    """A connect cancelled by its timeout left its socket open and its reader running:
    a plugin retrying against a busy daemon filled max_clients with connections nobody
    used, and every client was refused."""
    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "8"})

    async def main() -> int:
        cancelled = 0
        for i in range(40):
            c = AsyncClient(str(d.socket))
            try:
                await asyncio.wait_for(c.connect(), 0.0001 * (i % 5 + 1))
                await c.close()
            except TimeoutError:
                cancelled += 1
        return cancelled

    try:
        assert asyncio.run(main()) > 0
        time.sleep(0.5)  # (the daemon sees the closes)
        with Client(d.socket) as c:
            assert c.stats()["connected_clients"] == 1
    finally:
        assert d.stop() == 0


def test_writes_after_the_callback_raised_are_not_said_done(tmp_path: Path) -> None:
    """An ``on_event`` callback raised, which ends the connection: calls that wait for
    a reply raised, but writes went on being sent and returned as if done. They raise."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)

    def callback(name: str, fields: dict) -> None:
        if name == "piece_verified":
            raise RuntimeError("the plugin's bug")

    async def main() -> None:
        c = await AsyncClient(str(d.socket), on_event=callback).connect()
        ih = await c.register(raw, tmp_path / "dl")
        await c.subscribe(ih)
        for b in range(0, PIECE, 16384):
            await c.write_block_direct(ih, 0, b, src.read(0, b, 16384))
        for _ in range(100):  # (the event comes after the replies, once the piece is durable)
            if c.failure is not None:
                break
            await asyncio.sleep(0.05)
        assert isinstance(c.failure, RuntimeError)
        assert not c.try_write_block_direct(ih, 1, 0, src.read(1, 0, 16384))
        with pytest.raises(RuntimeError, match="plugin's bug"):
            await c.write_block_direct(ih, 1, 0, src.read(1, 0, 16384))
        with pytest.raises(RuntimeError, match="plugin's bug"):
            await c.write_chunk(ih, 1, 0, src.read(1, 0, 16384))
        await c.close()
        with Client(d.socket) as other:  # nothing of piece 1 was sent
            assert other.status(ih, files=False)["partial_pieces"] == 0

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert d.stop() == 0


def test_close_after_a_frame_cut_short_gives_the_ring_back(tmp_path: Path) -> None:
    """A send cut short by the timeout closes the socket; close() then did nothing, and
    the ring (a memfd and 16 MiB mapped) stayed until the client was collected."""
    raw, src = _torrent(tmp_path, pieces=16, piece=1 << 20)
    d = Daemon(tmp_path)
    try:
        gc.collect()
        before = _ring_memfds()
        c = Client(d.socket, timeout=1)
        ih = c.register(raw, tmp_path / "dl")
        c.write_block_direct(ih, 0, 0, src.read(0, 0, 16384))
        c.wait_writes()
        assert _ring_memfds() > before
        d.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                for p in range(1, 16):
                    c.write_chunk(ih, p, 0, src.read(p, 0, 1 << 20))
        finally:
            d.proc.send_signal(signal.SIGCONT)
        c.close()
        assert _ring_memfds() == before
        del c
    finally:
        d.proc.send_signal(signal.SIGCONT)
        assert d.stop() == 0


def test_a_refusal_sent_before_the_hello_is_read_and_raised(tmp_path: Path) -> None:
    """A daemon at max_clients refuses a connection at once (ERROR id 0, then it
    closes). When it had closed before the client sent its HELLO, the send's EPIPE ended
    the connection and was raised, the refusal and its reason unread in the socket (a
    pieced-peer said "Broken pipe" instead of "refused us: too many clients"). The
    client's connect waits here after connecting, so that the daemon closes first."""
    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "1"})

    async def main() -> None:
        async with AsyncClient(str(d.socket)) as first:
            await first.stats()
            loop = asyncio.get_running_loop()
            real = loop.sock_connect

            async def late(sock: object, address: object) -> None:
                await real(sock, address)  # type: ignore[arg-type]
                await asyncio.sleep(0.5)  # (the daemon refuses, and closes, meanwhile)

            loop.sock_connect = late  # type: ignore[method-assign]
            try:
                with pytest.raises(AccessDenied, match="max_clients") as refused:
                    await AsyncClient(str(d.socket)).connect()
                assert refused.value.errno == errno.EBUSY  # (for now: tried again later)
            finally:
                del loop.sock_connect  # type: ignore[attr-defined]

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("dead", [16, 40])
@pytest.mark.parametrize("sent", ["nothing", "a frame begun"])
def test_clients_that_hung_up_before_being_accepted_take_no_place(
        tmp_path: Path, sent: str, dead: int) -> None:
    """While the daemon was busy (stopped here), 40 connections came and went; it then
    accepted them in one go, each holding a place of max_clients (16) until its end was
    read, and a live client that came right after was refused ("too many clients"). Places
    of clients that hung up with nothing left to read are now taken back first; and of
    those that said HELLO and began a request they never finished (bytes of theirs left
    unread, or a frame begun and not ended, held their places): their bytes are read and
    their ends seen when places are wanted. (With exactly max_clients of them ahead of
    the live one, the look at them changed the set of clients it was going through: the
    accept failed with a traceback, and the live client's connection was reset.)"""
    import socket

    from pieced.protocol.frames import FrameType, encode_control
    from pieced.protocol.messages import encode_request, hello, to_wire

    begun = (encode_control(FrameType.HELLO, 0, to_wire(hello("client", "x")))
             + encode_request(1, "stats", {})[:-3])  # a frame cut short
    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "16"})
    try:
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(dead):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.socket))
                if sent != "nothing":
                    s.sendall(begun)
                s.close()
            got: list[object] = []
            late = threading.Thread(target=lambda: got.append(_stats(d)))
            late.start()
            time.sleep(0.3)  # its connect waits in the queue, behind the others
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        late.join(60)
        assert got and isinstance(got[0], dict), got
    finally:
        rc = d.stop()
        err = d.stderr()
        assert rc == 0 and "Traceback" not in err, err


def _stats(d: Daemon) -> object:
    try:
        with Client(d.socket, timeout=30) as c:
            return c.stats()
    except Exception as exc:  # (said by the assertion)
        return exc


def test_a_connect_waits_while_the_daemons_queue_of_connections_is_full(tmp_path: Path) -> None:
    """The daemon is busy (stopped) and its queue of connections (the listen backlog) is
    full: a Client with a timeout failed at once with BlockingIOError (EAGAIN: a Unix
    socket does not wait there as a TCP one does), an AsyncClient with "Transport
    endpoint is not connected". Both now wait for a place, the Client up to its timeout."""
    import socket

    d = Daemon(tmp_path)
    fillers: list[socket.socket] = []
    try:
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            while True:  # until the queue is full
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(str(d.socket))
                except BlockingIOError:
                    s.close()
                    break
                fillers.append(s)
            got: list[object] = []
            blocking = threading.Thread(target=lambda: got.append(_stats(d)))
            blocking.start()

            async def connect() -> object:
                try:
                    c = await AsyncClient(str(d.socket)).connect()
                    try:
                        return await c.stats()
                    finally:
                        await c.close()
                except Exception as exc:
                    return exc

            awaited = threading.Thread(target=lambda: got.append(asyncio.run(connect())))
            awaited.start()
            time.sleep(0.5)  # both find the queue full
            for s in fillers:
                s.close()
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        blocking.join(60)
        awaited.join(60)
        assert len(got) == 2 and all(isinstance(g, dict) for g in got), got
        assert len(fillers) > 16
    finally:
        for s in fillers:
            s.close()
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("transport", ["inline", "ring"])
def test_a_write_waiting_for_the_window_while_the_client_closes_raises(
        tmp_path: Path, transport: str) -> None:
    """One write in flight fills a window of one; ``close()`` waits for it; a second
    write waits for the window meanwhile. Woken once ``close`` had drained the window
    and let the socket go, it found the window open and was sent to no socket: inline,
    its reply was awaited for ever; through the ring, the ring was gone under it
    (AssertionError). It raises ConnectionError now, as every call after ``close``."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)

    async def main() -> None:
        c = AsyncClient(str(d.socket), window=1)
        await c.connect()
        ih = await c.register(raw, tmp_path / "dl")
        write = c.write_block_direct if transport == "ring" else c.write_chunk
        await write(ih, 0, 0, src.read(0, 0, 16384))
        closer = asyncio.create_task(c.close())
        await asyncio.sleep(0)  # close() waits for the write in flight
        second = asyncio.create_task(write(ih, 0, 16384, src.read(0, 16384, 16384)))
        await closer
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(second, 10)
        assert c.core.writes_in_flight == 0

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert d.stop() == 0


def test_a_ring_read_cancelled_once_answered_wakes_a_call_waiting_for_its_space(
        tmp_path: Path) -> None:
    """A 48 KiB ring read and a 32 KiB ring write on a 64 KiB ring: the write waits for
    the read's space. The read, cancelled after its reply came but before its task ran
    again (a ``wait_for`` timing out in that turn of the loop), freed its space and woke
    nobody: the write waited for ever. It is woken now, and goes through."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)

    async def main() -> None:
        async with AsyncClient(str(d.socket)) as setup:
            ih = await setup.register(raw, tmp_path / "dl")
            await setup.write_chunk(ih, 0, 0, src.read(0, 0, PIECE))
            await setup.flush_all()
        c = AsyncClient(str(d.socket))
        await c.connect()
        await c.attach_ring(65536)
        read = asyncio.create_task(c.read_chunk_ring(ih, 0, 0, 49152))
        await asyncio.sleep(0)  # its space taken, its READ_RING sent
        received = c.core.received

        def cancel_in_the_same_turn(n: int) -> None:
            received(n)
            if not read.done():
                read.cancel()

        c.core.received = cancel_in_the_same_turn  # type: ignore[method-assign]
        write = asyncio.create_task(c.write_block_direct(ih, 1, 0, src.read(1, 0, 32768)))
        with pytest.raises(asyncio.CancelledError):
            await read
        await asyncio.wait_for(write, 10)
        await c.wait_writes()
        await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        assert d.stop() == 0


def test_a_write_whose_send_timed_out_before_a_byte_left_is_not_awaited(
        tmp_path: Path) -> None:
    """The blocking client, ``timeout`` 0.5 s, writes through the ring to a daemon that
    stopped reading (SIGSTOP) until a send times out before any byte of its frame left.
    That write was counted in flight for ever, its ring space held: every later
    ``wait_writes`` and ``close`` timed out. It is forgotten now: once the daemon runs
    again, every write sent is answered and the client closes cleanly."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)
    try:
        c = Client(d.socket, timeout=0.5, window=100000)
        ih = c.register(raw, tmp_path / "dl")
        c.attach_ring(64 << 20)
        d.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                for p in range(16):
                    for b in range(0, PIECE, 1024):
                        c.write_block_direct(ih, p, b, src.read(p, b, 1024))
        finally:
            d.proc.send_signal(signal.SIGCONT)
        c.wait_writes()
        assert c.core.writes_in_flight == 0
        assert c.core.shm is not None and c.core.shm.head == c.core.shm.tail
        assert c.stats()["torrents"] == 1
        c.close()
    finally:
        d.proc.send_signal(signal.SIGCONT)
        assert d.stop() == 0


def test_a_ring_attach_whose_reply_times_out_leaves_the_ring_attached(tmp_path: Path) -> None:
    """The blocking client's ring attach (made by its first ring call) timed out waiting
    for its reply (a daemon stopped for a moment): the client closed the ring the daemon
    had attached, and every later ring call of the connection failed ("a ring is already
    attached"). The ring is kept now, and used once the daemon answers."""
    raw, src = _torrent(tmp_path)
    d = Daemon(tmp_path)
    try:
        c = Client(d.socket, timeout=0.3)
        ih = c.register(raw, tmp_path / "dl")
        c.write_chunk(ih, 1, 0, src.read(1, 0, PIECE))
        c.flush_all()
        d.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                c.read_chunk_ring(ih, 1, 0, 4096)
        finally:
            d.proc.send_signal(signal.SIGCONT)
        with c.read_chunk_ring(ih, 1, 0, 4096) as chunk:
            assert bytes(chunk.data) == src.read(1, 0, 4096)
        c.write_block_direct(ih, 0, 0, src.read(0, 0, 16384))
        c.wait_writes()
        c.close()
    finally:
        d.proc.send_signal(signal.SIGCONT)
        assert d.stop() == 0


@pytest.mark.parametrize("call", ["write_block_direct", "read_chunk_ring"])
def test_a_ring_call_racing_a_close_raises_as_after_a_close(tmp_path: Path, call: str) -> None:
    """A ring write (or ring read) that attaches the ring, its client closed by another
    task while the attach is under way or just done: the call raises ConnectionError,
    as any call after a close does (a bare AssertionError before), and the closed
    client keeps no ring (one was attached to it after its close, 16 MiB kept)."""
    import random

    content = make_payload(tmp_path / "src", {"a.bin": 100_000}, seed=3)
    raw = make_torrent_lt(content, 16384, "v1")
    block = (content / "a.bin").read_bytes()[:16384]
    d = Daemon(tmp_path)
    rng = random.Random(5)
    seen: dict[str, int] = {}

    async def once(ih: bytes) -> None:
        ac = await AsyncClient(str(d.socket)).connect()

        async def use() -> None:
            if call == "read_chunk_ring":
                (await ac.read_chunk_ring(ih, 0, 0, 16384)).release()
            else:
                await ac.write_block_direct(ih, 0, 0, block)

        task = asyncio.create_task(use())
        for _ in range(rng.randrange(12)):
            await asyncio.sleep(0)
        if rng.random() < 0.5:
            await asyncio.sleep(rng.random() * 0.0005)
        await ac.close()
        try:
            await task
            seen["ok"] = seen.get("ok", 0) + 1
        except ConnectionError:
            seen["closed"] = seen.get("closed", 0) + 1
        await asyncio.sleep(0)
        assert ac.core.shm is None

    async def main() -> None:
        with Client(d.socket) as c:
            ih = c.register(raw, str(tmp_path / "dl"))
            if call == "read_chunk_ring":
                c.write_chunk(ih, 0, 0, block)
        for _ in range(600):
            await once(ih)

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        assert d.stop() == 0
    assert seen.get("closed", 0) > 0, seen  # (the race was run into)


def test_the_cli_refused_for_too_many_clients_names_the_daemon(tmp_path: Path) -> None:
    """``pieced ls`` against a daemon whose places are all taken said only "too many
    clients", which did not say which daemon, nor that it was the daemon's refusal of
    the connection (not of the request)."""
    import subprocess
    import sys

    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "1"})
    try:
        with Client(d.socket):
            r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "ls", "--socket",
                                str(d.socket)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert f"the daemon at {d.socket} refused us: too many clients" in r.stderr, r.stderr
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_block_that_is_no_contiguous_buffer_is_refused_and_costs_nothing(
        tmp_path: Path) -> None:
    """A strided view (``buf[::2]``) handed as a block: the ring's copy of it failed
    after its room was taken, for good (four such blocks filled a 64 KiB ring, and
    every later write failed "the ring is full", or, through AsyncClient, waited for
    ever); inline through AsyncClient, the frame stayed at the head of the send queue,
    and every later call failed or hung. It is refused first, and nothing changes."""
    raw, src = _torrent(tmp_path, pieces=2, piece=65536)
    d = Daemon(tmp_path)
    strided = memoryview(bytearray(2 * 16384))[::2]
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            c.attach_ring(65536)
            for _ in range(8):
                with pytest.raises(ValueError, match="contiguous"):
                    c.write_block_direct(ih, 0, 0, strided)
                with pytest.raises(ValueError, match="contiguous"):
                    c.write_chunk(ih, 0, 0, strided)
            for b in range(0, 65536, 16384):
                c.write_block_direct(ih, 0, b, src.read(0, b, 16384))
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == 1

        async def main() -> None:
            async with AsyncClient(str(d.socket)) as a:
                await a.attach_ring(65536)
                for _ in range(8):
                    with pytest.raises(ValueError, match="contiguous"):
                        await a.write_block_direct(ih, 1, 0, strided)
                    with pytest.raises(ValueError, match="contiguous"):
                        await a.write_chunk(ih, 1, 0, strided)
                for b in range(0, 65536, 16384):
                    await asyncio.wait_for(a.write_block_direct(ih, 1, b, src.read(1, b, 16384)), 10)
                await asyncio.wait_for(a.flush_all(), 10)
                assert (await asyncio.wait_for(a.status(ih), 10))["verified_pieces"] == 2

        asyncio.run(main())
    finally:
        assert d.stop() == 0


def test_event_handlers_that_call_the_client_run_one_after_the_other(tmp_path: Path) -> None:
    """A ``piece_verified`` handler of the blocking Client that reads the piece pumps
    the connection, and received the next event of the burst inside that read: handlers
    nested as deep as a burst was long (165 for 4,096 pieces announced together, past
    the recursion limit, every one of them aborted). Events that come while a handler
    runs are handed over once it returns, in order."""
    raw, src = _torrent(tmp_path, pieces=1024, piece=16384)
    d = Daemon(tmp_path)
    depth, deepest, seen, errors = 0, 0, [], []

    def on_event(name: str, fields: dict) -> None:
        nonlocal depth, deepest
        if name != "piece_verified":
            return
        depth += 1
        deepest = max(deepest, depth)
        try:
            p = fields["piece"]
            if c.read_chunk(ih, p, 0, 16) != src.read(p, 0, 16):
                errors.append(p)
            seen.append(p)
        finally:
            depth -= 1

    try:
        with Client(d.socket, on_event=on_event) as c:
            ih = c.register(raw, tmp_path / "dl")
            for p, b, n in src.blocks():
                c.write_chunk(ih, p, b, src.read(p, b, n))
            c.flush_all()
            end = time.monotonic() + 30
            while len(seen) < 1024 and time.monotonic() < end:
                c.status(ih)
        assert sorted(seen) == list(range(1024)) and not errors
        assert deepest == 1
    finally:
        assert d.stop() == 0


def test_a_write_after_the_daemon_stopped_says_the_daemon_closed_the_connection(
        tmp_path: Path) -> None:
    """It said "[Errno 32] Broken pipe", naming neither the daemon nor why."""
    raw, src = _torrent(tmp_path, pieces=2)
    d = Daemon(tmp_path)
    with Client(d.socket) as c:
        ih = c.register(raw, tmp_path / "dl")
        assert d.stop() == 0
        with pytest.raises(ConnectionError, match="the daemon closed the connection"):
            for _ in range(64):  # (the first sends may land in the socket's buffer)
                c.write_chunk(ih, 0, 0, src.read(0, 0, 16384))
