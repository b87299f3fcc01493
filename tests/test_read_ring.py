"""read_chunk_ring: the daemon reads a torrent's bytes into the client's shared ring
(READ_RING, answered with an ACK), so a seeder's bytes never cross the socket.

Both clients, many reads in flight through a ring too small for all of them at once,
three connections at once, a read cancelled before its reply, and bad READ_RING frames
from a bare connection: each refused with a clear error, the connection going on."""

from __future__ import annotations

import array
import asyncio
import fcntl
import mmap
import os
import random
import socket
import time
from pathlib import Path

import pytest
from pieced.daemon.server import RING_IDLE_SECONDS
from pieced.protocol.client import AsyncClient, Client, ShmRing
from pieced.protocol.frames import FrameType, encode_control, encode_read_ring, encode_write_ring
from pieced.protocol.messages import to_wire
from pieced.storage.errors import BadRequest, OutOfRange, ProtocolError

from tests.conftest import Daemon
from tests.realtools import make_payload, make_torrent_lt
from tests.test_daemon import RawConn
from tests.test_disk import Source


def _registered(daemon: Daemon, odd_payload: tuple[Path, Path], kind: str = "hybrid"
                ) -> tuple[bytes, Source]:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, kind)
    src = Source(raw, save)
    with Client(daemon.socket) as c:
        ih = c.register(raw, save)
        assert c.recheck(ih).get("verified") == src.meta.num_pieces
    return ih, src


def test_reads_into_the_ring_give_the_bytes_of_read_chunk(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """Blocking client: every piece, whole and in parts (one of one byte), the bytes
    read_chunk gives; the space comes back on release, the view dies with it, and a read
    the daemon refuses frees its space at once."""
    ih, src = _registered(daemon, odd_payload)
    with Client(daemon.socket) as c:
        c.attach_ring(256 * 1024)  # smaller than the reads below, taken in turn: it wraps
        shm = c.core.shm
        assert shm is not None
        for p in range(src.meta.num_pieces):
            size = src.layout.piece_size(p)
            for begin, n in ((0, size), (size // 3, size - size // 3), (5, 1)):
                with c.read_chunk_ring(ih, p, begin, n) as chunk:
                    assert bytes(chunk.data) == src.read(p, begin, n) == c.read_chunk(ih, p, begin, n)
                    kept = chunk.data
                assert shm.head == shm.tail  # released
                with pytest.raises(ValueError):
                    bytes(kept)  # the view is released with its space
        with pytest.raises(OutOfRange):  # past the piece's end: refused, as read_chunk is
            c.read_chunk_ring(ih, 0, src.layout.piece_size(0) - 5, 10)
        assert shm.head == shm.tail
        held = c.read_chunk_ring(ih, 0, 0, 65536)
        with pytest.raises(ProtocolError, match="not yet released"):  # nothing will free it
            c.read_chunk_ring(ih, 1, 0, 256 * 1024 - 1000)
        held.release()
        held.release()  # twice: nothing more
        assert c.read_chunk(ih, 0, 0, 10) == src.read(0, 0, 10)  # the connection goes on


def _rss_shmem_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem in /proc/PID/status")


def test_reading_into_the_ring_does_not_make_it_the_daemons_memory(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """The ring is the client's memory: the daemon puts read bytes in through the
    descriptor, so none of its pages enters the daemon's resident set (through a
    writable mapping, every page of the ring would, 8 MiB here)."""
    ih, src = _registered(daemon, odd_payload)
    before = _rss_shmem_kib(daemon.proc.pid)
    with Client(daemon.socket) as c:
        c.attach_ring(8 * 1024 * 1024)
        blocks = list(src.blocks())
        total = 0
        last = None
        while total < 3 * 8 * 1024 * 1024:  # round the ring three times
            for p, b, n in blocks:
                chunk = c.read_chunk_ring(ih, p, b, n)
                assert bytes(chunk.data[:64]) == src.read(p, b, min(n, 64))
                if last is not None:
                    last.release()  # one held at a time: the ring never empties, and
                last = chunk  # each read goes where the one before it ended
                total += n
        assert _rss_shmem_kib(daemon.proc.pid) - before < 1024


def test_blocks_written_through_the_ring_do_not_make_it_the_daemons_memory(
        daemon: Daemon, tmp_path: Path) -> None:
    """Blocks written through a client's 16 MiB ring: the daemon reads them through its
    mapping of the ring, and every page it read stayed in its resident set, 16 MiB a
    client, for as long as the client stayed (a pieced-peer seeding for days). The
    pages are let go once the client has written nothing for a while; the bytes are
    all there."""
    content = make_payload(tmp_path / "src", {"a.bin": 40 << 20}, seed=21)
    raw = make_torrent_lt(content, 1 << 20, "v1")
    src = Source(raw, tmp_path / "src")
    before = _rss_shmem_kib(daemon.proc.pid)
    with Client(daemon.socket) as c:
        c.attach_ring(16 * 1024 * 1024)
        ih = c.register(raw, tmp_path / "dl")
        for p, b, n in src.blocks():
            c.write_block_direct(ih, p, b, src.read(p, b, n))
        c.flush_all()
        assert c.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert _rss_shmem_kib(daemon.proc.pid) - before > 8 * 1024  # in use: there
        deadline = time.monotonic() + 3 * RING_IDLE_SECONDS + 5
        while (grown := _rss_shmem_kib(daemon.proc.pid) - before) >= 1024 and (
                time.monotonic() < deadline):
            time.sleep(0.1)
        assert grown < 1024, grown  # KiB: not the ring's 16 MiB
        c.write_block_direct(ih, 0, 0, src.read(0, 0, 16384))  # (a duplicate) it goes on
    assert (tmp_path / "dl" / content.name / "a.bin").read_bytes() == (content / "a.bin").read_bytes()


def test_many_reads_in_flight_through_a_small_ring(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """AsyncClient: 48 reads at once of up to 40 KiB through a 128 KiB ring: they wait
    for room, each gets its own bytes, and every byte of the ring is free at the end."""
    ih, src = _registered(daemon, odd_payload)
    rng = random.Random(4)
    reads = []
    for _ in range(300):
        p = rng.randrange(src.meta.num_pieces)
        size = src.layout.piece_size(p)
        begin = rng.randrange(size)
        reads.append((p, begin, rng.randint(1, min(40 * 1024, size - begin))))

    async def run() -> None:
        async with AsyncClient(daemon.socket) as c:
            await c.attach_ring(128 * 1024)

            async def one(p: int, begin: int, n: int) -> None:
                chunk = await c.read_chunk_ring(ih, p, begin, n)
                try:
                    assert bytes(chunk.data) == src.read(p, begin, n)
                    await asyncio.sleep(0)  # held across a turn, as a seeder's send is
                finally:
                    chunk.release()

            for start in range(0, len(reads), 48):
                await asyncio.gather(*(one(*r) for r in reads[start : start + 48]))
            shm = c.core.shm
            assert shm is not None and shm.head == shm.tail

    asyncio.run(run())


def test_three_connections_read_into_their_rings_at_once(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """Three seeders of one torrent, each through its own ring, every byte checked."""
    ih, src = _registered(daemon, odd_payload, "v1")
    blocks = [(p, b, n) for p, b, n in src.blocks()]

    async def seeder(seed: int) -> int:
        order = blocks[:]
        random.Random(seed).shuffle(order)
        async with AsyncClient(daemon.socket) as c:
            await c.attach_ring(512 * 1024)

            async def one(p: int, b: int, n: int) -> None:
                with await c.read_chunk_ring(ih, p, b, n) as chunk:
                    assert bytes(chunk.data) == src.read(p, b, n)

            for start in range(0, len(order), 16):
                await asyncio.gather(*(one(*blk) for blk in order[start : start + 16]))
        return len(order)

    async def run() -> list[int]:
        return list(await asyncio.gather(*(seeder(s) for s in range(3))))

    assert asyncio.run(run()) == [len(blocks)] * 3


def test_a_read_answered_when_a_write_error_is_raised_frees_its_space(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """A write's error is raised by the next call: a read into the ring made while it is
    on its way gets its own answer (its chunk), and the call after it raises the error;
    a read made once the error is known raises it without being sent. Either way its
    space goes back to the ring, not kept by a chunk nobody got (both clients)."""
    ih, src = _registered(daemon, odd_payload)
    with Client(daemon.socket) as c:
        c.attach_ring(256 * 1024)
        shm = c.core.shm
        assert shm is not None
        c.write_chunk(ih, 0, 10**6, b"x")  # past the piece's end: its ERROR comes later
        try:
            chunk = c.read_chunk_ring(ih, 0, 0, 65536)
        except OutOfRange:  # (the ERROR known before the read was sent: not sent)
            pass
        else:  # sent while the ERROR was on its way: its own answer; the next call's error
            with chunk:
                assert bytes(chunk.data) == src.read(0, 0, 65536)
            with pytest.raises(OutOfRange):
                c.read_chunk_ring(ih, 0, 0, 65536)
        assert shm.head == shm.tail
        with c.read_chunk_ring(ih, 1, 0, 1000) as chunk:
            assert bytes(chunk.data) == src.read(1, 0, 1000)

    async def run() -> None:
        async with AsyncClient(daemon.socket) as c:
            await c.attach_ring(256 * 1024)
            shm = c.core.shm
            assert shm is not None
            await c.write_chunk(ih, 0, 10**6, b"x")
            try:
                got = await c.read_chunk_ring(ih, 0, 0, 65536)
            except OutOfRange:
                pass
            else:
                with got:
                    assert bytes(got.data) == src.read(0, 0, 65536)
                with pytest.raises(OutOfRange):
                    await c.read_chunk_ring(ih, 0, 0, 65536)
            assert shm.head == shm.tail
            with await c.read_chunk_ring(ih, 1, 0, 1000) as chunk:
                assert bytes(chunk.data) == src.read(1, 0, 1000)

    asyncio.run(run())


def test_a_cancelled_read_keeps_its_space_until_the_reply(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """The daemon may still be writing into a cancelled read's space: it is freed when
    the reply comes, not when the caller gives up, and the next reads are right."""
    ih, src = _registered(daemon, odd_payload)

    async def run() -> None:
        async with AsyncClient(daemon.socket) as c:
            await c.attach_ring(256 * 1024)
            shm = c.core.shm
            assert shm is not None
            task = asyncio.ensure_future(c.read_chunk_ring(ih, 0, 0, 65536))
            await asyncio.sleep(0)  # sent (queued for this turn's send)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert shm.head - shm.tail == 65536  # still taken: the reply has not come
            await c.stats()  # answered after the read, in order
            assert shm.head == shm.tail
            for p in range(src.meta.num_pieces):
                with await c.read_chunk_ring(ih, p, 0, 1000) as chunk:
                    assert bytes(chunk.data) == src.read(p, 0, 1000)

    asyncio.run(run())


def test_bad_read_ring_frames_are_refused_and_change_nothing(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """From a bare connection: READ_RING without a ring, outside the ring, longer than a
    read may be, and into a ring sealed against writes (which the daemon maps read-only:
    ring writes still work there). Each gets an ERROR that says why; the ring is not
    written and the connection goes on."""
    ih, src = _registered(daemon, odd_payload, "v1")
    conn = RawConn(daemon.socket)
    conn.sock.sendall(encode_read_ring(7, ih, 0, 0, 0, 100))
    (err,) = conn.replies(1)
    assert err.type == FrameType.ERROR and b"no shared-memory ring" in err.body[b"message"]

    ring = ShmRing(65536)
    ring.map[:] = b"\xee" * 65536
    conn.sock.sendmsg([encode_control(FrameType.REQUEST, 8, to_wire({"op": "attach_ring",
                                                                     "size": 65536}))],
                      _rights(ring.fd))
    (ok,) = conn.replies(1)
    assert ok.type == FrameType.RESPONSE
    for rid, offset, length, why in ((9, 65536, 10, b"outside the ring"),
                                     (10, 65000, 1000, None),  # wraps: written in two parts
                                     (11, 0, 65537, b"outside the ring"),
                                     (12, 0, 9 * 1024 * 1024, b"limited to")):
        conn.sock.sendall(encode_read_ring(rid, ih, 0, 0, offset, length))
        (reply,) = conn.replies(1)
        if why is None:
            assert reply.type == FrameType.ACK
            got = bytes(ring.map[65000:]) + bytes(ring.map[: 1000 - 536])
            assert got == src.read(0, 0, 1000)
            ring.map[:] = b"\xee" * 65536
        else:
            assert reply.type == FrameType.ERROR and why in reply.body[b"message"], reply
            assert bytes(ring.map) == b"\xee" * 65536
    ring.close()

    # sealed against writes: read-only to the daemon
    sealed = RawConn(daemon.socket)
    fd = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 65536)
    block = src.read(0, 0, 16384)
    os.pwrite(fd, block, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    sealed.sock.sendmsg([encode_control(FrameType.REQUEST, 1, to_wire({"op": "attach_ring",
                                                                       "size": 65536}))],
                        _rights(fd))
    (ok,) = sealed.replies(1)
    assert ok.type == FrameType.RESPONSE
    sealed.sock.sendall(encode_read_ring(2, ih, 0, 0, 0, 100))
    (reply,) = sealed.replies(1)
    assert reply.type == FrameType.ERROR and b"read-only" in reply.body[b"message"]
    view = mmap.mmap(fd, 65536, prot=mmap.PROT_READ)
    assert view[:100] == block[:100]  # untouched
    sealed.sock.sendall(encode_write_ring(3, ih, 0, 0, 0, 16384))  # writes still work
    (ack,) = sealed.replies(1)
    assert ack.type == FrameType.ACK, ack
    view.close()
    os.close(fd)
    with Client(daemon.socket) as c:
        assert c.read_chunk(ih, 0, 0, 16384) == block


def test_any_read_ring_frames_each_get_their_answer(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """300 READ_RING frames from a bare connection, sent back to back without waiting:
    pieces, begins, ring offsets and lengths at random, in range or not, some wrapping
    round the ring's end. Each gets its own reply, in order: an ACK for exactly the valid
    ones, whose bytes are where they were asked to be (where a later read did not write
    over them), or an ERROR; no byte that no acknowledged read covers has changed."""
    ih, src = _registered(daemon, odd_payload, "hybrid")
    size = 256 * 1024
    conn = RawConn(daemon.socket)
    ring = ShmRing(size)
    conn.sock.sendmsg([encode_control(FrameType.REQUEST, 1, to_wire({"op": "attach_ring",
                                                                     "size": size}))],
                      _rights(ring.fd))
    (ok,) = conn.replies(1)
    assert ok.type == FrameType.RESPONSE
    rng = random.Random(11)
    asks = []
    for rid in range(2, 302):
        if rng.random() < 0.6:  # a valid read, anywhere in the ring (wrapping or not)
            piece = rng.randrange(src.meta.num_pieces)
            psize = src.layout.piece_size(piece)
            begin = rng.randrange(psize)
            length = rng.randint(1, min(psize - begin, 40_000))
            asks.append((rid, piece, begin, rng.randrange(size), length))
            continue
        piece = rng.choice([rng.randrange(src.meta.num_pieces), src.meta.num_pieces, 2**32 - 1])
        psize = src.layout.piece_size(piece) if piece < src.meta.num_pieces else 65536
        begin = rng.choice([0, rng.randrange(psize), psize, psize + 7])
        length = rng.choice([1, rng.randint(1, 40_000), max(0, psize - begin), 0, size + 1])
        offset = rng.choice([rng.randrange(size), size - 100, size, 2**63])
        asks.append((rid, piece, begin, offset, length))
    ring.map[:] = b"\xee" * size
    conn.sock.sendall(b"".join(encode_read_ring(rid, ih, p, b, o, n) for rid, p, b, o, n in asks))
    replies = conn.replies(len(asks))
    acks = 0
    written = bytearray(size)  # 1 where an acknowledged read put bytes
    last: dict[int, int] = {}  # ring byte -> the index of the last read written there
    for i, ((rid, piece, begin, offset, length), reply) in enumerate(zip(asks, replies, strict=True)):
        assert reply.id == rid  # in order, one each
        valid = (piece < src.meta.num_pieces and 0 < length <= size and offset < size
                 and begin + length <= src.layout.piece_size(piece))
        if reply.type == FrameType.ACK:
            assert valid, (rid, piece, begin, offset, length)
            acks += 1
            for k in range(length):
                pos = (offset + k) % size
                written[pos] = 1
                last[pos] = i
        else:
            assert reply.type == FrameType.ERROR and not valid, (rid, reply.body)
    # each byte holds what the last read that covered it asked for; no other byte moved
    for pos in range(size):
        if not written[pos]:
            assert ring.map[pos] == 0xEE, pos
    for i, (_rid, piece, begin, offset, length) in enumerate(asks):
        want = src.read(piece, begin, length) if i in set(last.values()) else b""
        for k in range(len(want)):
            pos = (offset + k) % size
            if last[pos] == i:
                assert ring.map[pos] == want[k], (i, pos)
    assert acks > 150
    ring.close()
    conn.close()
    with Client(daemon.socket) as c:  # the daemon goes on
        assert c.read_chunk(ih, 0, 0, 100) == src.read(0, 0, 100)


def _rights(fd: int) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]


def test_a_read_into_the_ring_is_refused_before_it_is_sent_when_it_cannot_fit(
        daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    ih, _ = _registered(daemon, odd_payload)
    with Client(daemon.socket) as c:
        c.attach_ring(65536)
        with pytest.raises(ValueError, match="does not fit"):
            c.read_chunk_ring(ih, 0, 0, 65537)
        with pytest.raises(BadRequest):
            c._call("frobnicate")  # the connection goes on


@pytest.mark.parametrize("when", ["passed", "after"])
def test_a_ring_open_for_appending_is_still_written_at_the_offsets_asked(
        daemon: Daemon, odd_payload: tuple[Path, Path], when: str) -> None:
    """A ring whose descriptor is O_APPEND, as passed or made so by the client after the
    attach (F_SETFL on the description it shares with the daemon): a pwrite through it
    would land at the memfd's end whatever the offset, and grow it by every read. Each
    READ_RING lands where it was asked to, and the memfd stays the ring's size."""
    ih, src = _registered(daemon, odd_payload, "v1")
    size = 65536
    fd = os.memfd_create("ring", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    flags = os.O_RDWR | (os.O_APPEND if when == "passed" else 0)
    shared = os.open(f"/proc/self/fd/{fd}", flags)  # (the description the daemon gets)
    conn = RawConn(daemon.socket)
    conn.sock.sendmsg([encode_control(FrameType.REQUEST, 1, to_wire({"op": "attach_ring",
                                                                     "size": size}))],
                      _rights(shared))
    (ok,) = conn.replies(1)
    assert ok.type == FrameType.RESPONSE, ok
    if when == "after":
        fcntl.fcntl(shared, fcntl.F_SETFL, fcntl.fcntl(shared, fcntl.F_GETFL) | os.O_APPEND)
    view = mmap.mmap(fd, size)
    for i in range(40):
        offset = (i * 5000) % (size - 4096)
        conn.sock.sendall(encode_read_ring(2 + i, ih, 0, i, offset, 4096))
        (reply,) = conn.replies(1)
        assert reply.type == FrameType.ACK, reply
        assert view[offset : offset + 4096] == src.read(0, i, 4096)
    assert os.fstat(fd).st_size == size
    view.close()
    conn.close()
    os.close(shared)
    os.close(fd)
