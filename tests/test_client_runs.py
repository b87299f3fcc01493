"""AsyncClient merges the blocks of one piece that a plugin writes back to back in one
turn of the event loop into one ring write: one frame and one reply for the run, the
daemon counting every 16 KiB block of it, every piece verified."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pieced.protocol.client import AsyncClient, Client

from tests.conftest import Daemon
from tests.realtools import make_torrent_lt
from tests.test_disk import Source


def test_blocks_written_back_to_back_go_as_one_write(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    blocks = src.peer_blocks()  # as libtorrent sends them: 16 KiB, running into pads
    pieces = sorted({p for p, _, _ in blocks})

    async def run() -> tuple[int, int, int]:
        async with AsyncClient(daemon.socket) as c:
            ih = await c.register(raw, daemon.root / "dl")
            await c.attach_ring(4 * 1024 * 1024)
            before = (await c.stats())["blocks_written"]
            done0 = c.core.writes_done
            direct = 0
            for p, b, n in blocks:  # all in one turn of the loop: nothing awaited
                direct += c.try_write_block_direct(ih, p, b, src.read(p, b, n))
            await c.wait_writes()
            replies = c.core.writes_done - done0
            await c.flush_all()
            st = await c.status(ih)
            assert st["verified_pieces"] == src.meta.num_pieces, st
            return direct, replies, (await c.stats())["blocks_written"] - before

    direct, replies, written = asyncio.run(run())
    assert direct == len(blocks)
    assert replies == len(pieces)  # one write a piece: its blocks are adjacent
    assert written == len(blocks)
    with Client(daemon.socket) as c:
        ih = src.meta.info_hash
        for p in pieces:
            size = src.layout.piece_size(p)
            assert c.read_chunk(ih, p, 0, size) == src.read(p, 0, size)


def test_a_run_stops_where_the_blocks_stop_following_each_other(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """A block that does not follow the last one, and a block to flush, each start a new
    write; everything still lands where it belongs."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    blocks = src.blocks()
    first = [b for b in blocks if b[0] == 0]
    assert len(first) == 4
    order = [first[1], first[2], first[0], first[3]]  # 1, 2 adjacent; then back to 0

    async def run() -> int:
        async with AsyncClient(daemon.socket) as c:
            ih = await c.register(raw, daemon.root / "dl")
            await c.attach_ring(4 * 1024 * 1024)
            done0 = c.core.writes_done
            for p, b, n in order[:3]:
                assert c.try_write_block_direct(ih, p, b, src.read(p, b, n))
            p, b, n = order[3]
            assert c.try_write_block_direct(ih, p, b, src.read(p, b, n), flush=True)
            await c.wait_writes()
            await c.flush_all()  # the group commit: verified pieces are recorded
            assert (await c.status(ih))["have"][0] & 0x80
            return c.core.writes_done - done0

    assert asyncio.run(run()) == 3  # [1, 2], [0], [3 with flush]


@pytest.mark.parametrize("transport", ["ring", "inline"])
def test_two_clients_merging_runs_of_the_same_pieces_at_once(
        daemon: Daemon, odd_payload: tuple[Path, Path], transport: str) -> None:
    """Two connections send every block of the same torrent at once, each as merged
    runs (as two plugins in end game would; through the shared ring, or inline, which the
    daemon merges as it does ring writes): every piece verifies once, none fails, and
    what one sent after the other completed a piece is counted as duplicate."""
    import threading

    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    blocks = src.peer_blocks()
    with Client(daemon.socket) as c:
        ih = c.register(raw, daemon.root / "dl")
        before = c.stats()
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    async def send(order: list[tuple[int, int, int]]) -> None:
        async with AsyncClient(daemon.socket) as ac:
            await ac.attach_ring(4 * 1024 * 1024)
            start.wait()
            for p, b, n in order:
                if transport == "inline":
                    await ac.write_chunk(ih, p, b, src.read(p, b, n))
                elif not ac.try_write_block_direct(ih, p, b, src.read(p, b, n)):
                    await ac.write_block_direct(ih, p, b, src.read(p, b, n))
            await ac.wait_writes()

    def client(order: list[tuple[int, int, int]]) -> None:
        try:
            asyncio.run(send(order))
        except BaseException as exc:  # reported below
            errors.append(exc)

    # the second from the last piece back, each piece's blocks in order: runs both ways
    backwards = sorted(blocks, key=lambda blk: (-blk[0], blk[1]))
    threads = [threading.Thread(target=client, args=(o,)) for o in (blocks, backwards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with Client(daemon.socket) as c:
        c.flush_all()
        st, after = c.status(ih), c.stats()
        assert st["verified_pieces"] == src.meta.num_pieces
        assert after["pieces_failed"] == before["pieces_failed"]
        assert after["pieces_verified"] - before["pieces_verified"] == src.meta.num_pieces
        for p in range(src.meta.num_pieces):
            size = src.layout.piece_size(p)
            assert c.read_chunk(ih, p, 0, size) == src.read(p, 0, size)


def test_reads_into_a_buffer_of_the_callers(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """read_chunk_into (both clients): the bytes of read_chunk, in the caller's buffer,
    used again and again, with many reads in flight each into its own; a read past the
    piece's end is refused as read_chunk's is, and the connection goes on."""
    import pytest
    from pieced.storage.errors import PiecedError

    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    with Client(daemon.socket) as c:
        ih = c.register(raw, save)
        assert c.recheck(ih).get("verified") == src.meta.num_pieces
        buf = bytearray(70_000)
        for p in range(src.meta.num_pieces):
            size = src.layout.piece_size(p)
            for begin, n in ((0, size), (size // 3, size - size // 3), (5, 1)):
                view = memoryview(buf)[:n]
                assert c.read_chunk_into(ih, p, begin, view) == n
                assert bytes(view) == src.read(p, begin, n) == c.read_chunk(ih, p, begin, n)
        with pytest.raises(PiecedError):  # past the piece's end: refused, as read_chunk is
            c.read_chunk_into(ih, 0, src.layout.piece_size(0) - 5, memoryview(buf)[:10])
        assert c.read_chunk(ih, 0, 0, 10) == src.read(0, 0, 10)  # the connection goes on

    async def run() -> None:
        async with AsyncClient(daemon.socket) as c:
            bufs = [bytearray(16384) for _ in range(32)]
            blocks = [b for b in src.blocks() if b[2] == 16384]

            async def one(i: int, p: int, b: int) -> None:
                view = memoryview(bufs[i % len(bufs)])
                assert await c.read_chunk_into(ih, p, b, view) == 16384
                assert bytes(view) == src.read(p, b, 16384)

            for start in range(0, len(blocks), len(bufs)):
                await asyncio.gather(*(one(i, p, b) for i, (p, b, _) in
                                       enumerate(blocks[start : start + len(bufs)])))

    asyncio.run(run())


def test_read_into_a_buffer_it_cannot_fill_is_refused_before_it_is_sent(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """A read-only buffer, or one of items wider than a byte (taken bytewise), never
    breaks the connection: the first is refused at once, the second is filled."""
    import array

    import pytest

    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    with Client(daemon.socket) as c:
        ih = c.register(raw, save)
        c.recheck(ih)
        with pytest.raises(ValueError):
            c.read_chunk_into(ih, 0, 0, memoryview(bytes(100)))
        words = array.array("I", bytes(400))
        assert c.read_chunk_into(ih, 0, 8, memoryview(words)) == 400
        assert words.tobytes() == src.read(0, 8, 400)
        assert c.read_chunk(ih, 0, 0, 10) == src.read(0, 0, 10)
