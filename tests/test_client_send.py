"""How AsyncClient sends when the daemon does not keep up: frames wait their turn in
order and go out whole, and a caller cancelled while its frame waits is let go at once
without its frame being cut short or changed when the caller reuses its buffer.

The other end is a socket of the test's own that answers the handshake and then reads
nothing until told to, so that the client's socket buffer really fills."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from pathlib import Path

import pytest
import uvloop
from pieced.protocol.client import AsyncClient
from pieced.protocol.frames import FrameReader, FrameType, RecvRing, encode_control
from pieced.protocol.messages import hello, to_wire
from pieced.storage.merkle import BLOCK_SIZE

IH = bytes(range(20))


class SlowDaemon:
    """The daemon's side of one connection: HELLO answered, then nothing read until
    :meth:`read_all`, which parses every frame that came."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None
        self.ring = RecvRing(8 * 1024 * 1024)
        self.reader = FrameReader(self.ring, 1024 * 1024)

    async def handshake(self) -> None:
        loop = asyncio.get_running_loop()
        self.conn, _ = await loop.sock_accept(self.listener)
        self.conn.setblocking(False)
        frame = None
        while frame is None:
            n = await loop.sock_recv_into(self.conn, self.ring.writable())
            assert n
            self.ring.wrote(n)
            frame = self.reader.next_frame()
        assert frame.type == FrameType.HELLO
        reply = hello("server", "pieced", max_frame=1024 * 1024, ring_bytes=0,
                      max_block=1024 * 1024)
        await loop.sock_sendall(self.conn, encode_control(FrameType.HELLO, frame.id,
                                                          to_wire(reply)))

    async def read_all(self, writes: int) -> list[tuple[int, int, bytes]]:
        """Read until ``writes`` WRITE frames came: (piece, begin, payload) of each."""
        loop = asyncio.get_running_loop()
        assert self.conn is not None
        got: list[tuple[int, int, bytes]] = []
        while len(got) < writes:
            n = await asyncio.wait_for(loop.sock_recv_into(self.conn, self.ring.writable()), 30)
            assert n, "the client closed the connection"
            self.ring.wrote(n)
            while (frame := self.reader.next_frame()) is not None:
                assert frame.type == FrameType.WRITE, frame.type
                assert frame.info_hash == IH and frame.token is not None
                got.append((frame.piece, frame.begin, b"".join(frame.payload)))
                self.ring.release(frame.token)
        return got

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_writes_cancelled_while_waiting_to_be_sent_go_out_whole_and_unchanged(
        tmp_path: Path, loop: str) -> None:
    blocks = 300  # about 5 MiB: far more than a Unix socket buffers
    rng = random.Random(7)

    async def main() -> None:
        daemon = SlowDaemon(tmp_path / "s.sock")
        accepted = asyncio.ensure_future(daemon.handshake())
        c = AsyncClient(tmp_path / "s.sock", window=blocks + 1)  # no reply ever comes
        await c.connect()
        await accepted
        bufs = [bytearray(os.urandom(BLOCK_SIZE)) for _ in range(blocks)]
        sent = [bytes(b) for b in bufs]
        tasks = [asyncio.ensure_future(c.write_chunk(IH, k, 0, memoryview(bufs[k]))) for k in range(blocks)]
        for _ in range(20):
            await asyncio.sleep(0)
        waiting = [k for k in range(blocks) if not tasks[k].done()]
        assert len(waiting) > blocks // 2, "the socket took nearly everything"
        cancelled = set(rng.sample(waiting[1:], len(waiting) // 2))
        for k in cancelled:
            tasks[k].cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        # Let go at once, though nothing more was read...
        assert all(tasks[k].cancelled() for k in cancelled)
        # ... and the others still wait for their frames to leave.
        assert all(not tasks[k].done() for k in waiting if k not in cancelled)
        for k in cancelled:  # the caller uses its buffer again
            bufs[k][:] = bytes(BLOCK_SIZE)
        got = await daemon.read_all(blocks)
        await asyncio.wait_for(asyncio.gather(
            *(tasks[k] for k in range(blocks) if k not in cancelled)), 10)
        # Every frame arrived whole, in the order it was sent, with the bytes it had.
        assert [(p, b) for p, b, _ in got] == [(k, 0) for k in range(blocks)]
        assert [data for _, _, data in got] == sent
        assert c.core.writes_in_flight == blocks  # all sent; the daemon answered none
        daemon.close()  # the client sees the connection go, and closes without waiting
        for _ in range(500):
            if c.failure is not None:
                break
            await asyncio.sleep(0.01)
        await c.close()

    (uvloop.run if loop == "uvloop" else asyncio.run)(main())
