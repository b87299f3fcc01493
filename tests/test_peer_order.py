"""Blocks reach the daemon in their piece's order, whatever order peers answer in."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from pieced.peer.plugin import InOrder

BLOCK = 16384
# a piece of 8 blocks, and one whose third block is skipped (wholly inside a pad)
PLANS = {0: [(i * BLOCK, BLOCK) for i in range(8)],
         1: [(0, BLOCK), (BLOCK, BLOCK), (3 * BLOCK, 1000)]}


def _data(piece: int, begin: int) -> bytes:
    return bytes([piece]) + begin.to_bytes(4, "big")


def test_in_order_passes_at_once_and_ahead_waits() -> None:
    order: InOrder[str] = InOrder(PLANS.__getitem__)
    assert order.arrived(0, 0, _data(0, 0), "A") == [(0, _data(0, 0), "A")]
    assert order.arrived(0, 2 * BLOCK, _data(0, 2 * BLOCK), "A") == []  # ahead: held
    assert order.arrived(0, 3 * BLOCK, _data(0, 3 * BLOCK), "A") == []
    assert order.arrived(0, 3 * BLOCK, b"another copy", "B") == []  # again: it replaces the
    got = order.arrived(0, BLOCK, _data(0, BLOCK), "C")  # held one; the gap: all three go
    assert got == [(BLOCK, _data(0, BLOCK), "C"), (2 * BLOCK, _data(0, 2 * BLOCK), "A"),
                   (3 * BLOCK, b"another copy", "B")]  # (the newest copy, with its sender)
    assert order.held_bytes == 0 and order.reordered == 3
    # a plan with a skipped block: the next one is due after it
    assert [b for b, _, _ in order.arrived(1, 3 * BLOCK, b"x", "A")] == []
    assert [b for b, _, _ in order.arrived(1, 0, b"x", "A")] == [0]
    assert [b for b, _, _ in order.arrived(1, BLOCK, b"x", "A")] == [BLOCK, 3 * BLOCK]


def test_past_the_bound_blocks_go_as_they_come_and_nothing_stalls() -> None:
    order: InOrder[None] = InOrder(PLANS.__getitem__)
    order.HOLD_BYTES = 10  # one small block at most
    assert order.arrived(0, 2 * BLOCK, b"tiny", None) == []
    assert order.arrived(0, 3 * BLOCK, b"too big for the bound", None) == \
        [(3 * BLOCK, b"too big for the bound", None)]
    got = order.arrived(0, 0, b"a", None) + order.arrived(0, BLOCK, b"b", None)
    assert [b for b, _, _ in got] == [0, BLOCK, 2 * BLOCK]  # 3 was passed: not waited for
    assert [b for b, _, _ in order.arrived(0, 4 * BLOCK, b"c", None)] == [4 * BLOCK]


def test_forget_drops_what_was_held() -> None:
    order: InOrder[None] = InOrder(PLANS.__getitem__)
    order.arrived(0, 5 * BLOCK, b"12345", None)
    assert order.held_bytes == 5
    order.forget(0)
    assert order.held_bytes == 0
    assert order.arrived(0, 0, b"x", None) == [(0, b"x", None)]  # a new attempt starts from the start


def test_inbox_keeps_what_arrives_while_the_last_receive_is_in_use() -> None:
    """The blocks of a receive are views of the Inbox's buffer, used while their events
    are handled, and the handling may wait (for room in the daemon's ring): what arrives
    meanwhile lands behind them and must come out of the next receive, in order."""
    import asyncio

    from pieced.peer.plugin import Inbox

    async def main() -> list[bytes]:
        go = asyncio.Event()

        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"first part")
            await go.wait()
            writer.write(b"second part")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(send, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, inbox = await asyncio.get_running_loop().create_connection(
            Inbox, "127.0.0.1", port)
        got = []
        data = await inbox.receive()
        assert data is not None
        got.append(bytes(data))
        go.set()  # more comes while what was received is in use
        for _ in range(200):
            await asyncio.sleep(0.005)
            if bytes(data) != got[0] or inbox._end > len(got[0]):
                break
        assert bytes(data) == got[0]  # not overwritten while in use
        inbox.consumed()
        while (data := await inbox.receive()) is not None:
            got.append(bytes(data))
            inbox.consumed()
        server.close()
        return got

    got = asyncio.run(main())
    assert b"".join(got) == b"first partsecond part"


def test_a_held_block_is_a_copy_of_the_buffer_it_came_in() -> None:
    """Blocks come as views of a connection's receive buffer, which takes new bytes once
    they are handled: one held for later must not change with it."""
    order: InOrder[None] = InOrder(PLANS.__getitem__)
    buf = bytearray(b"A" * 100)
    assert order.arrived(0, BLOCK, memoryview(buf)[10:20], None) == []
    buf[:] = b"Z" * 100
    got = order.arrived(0, 0, b"first", None)
    assert got == [(0, b"first", None), (BLOCK, b"A" * 10, None)]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32))
def test_any_arrival_order_gives_every_block_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    order: InOrder[int] = InOrder(PLANS.__getitem__)
    arrivals = [(p, b) for p, plan in PLANS.items() for b, _ in plan]
    rng.shuffle(arrivals)
    sent: dict[int, list[int]] = {0: [], 1: []}
    for p, b in arrivals:
        for begin, data, giver in order.arrived(p, b, _data(p, b), b):
            assert data == _data(p, begin) and giver == begin
            sent[p].append(begin)
    for p, plan in PLANS.items():
        assert sent[p] == [b for b, _ in plan]
    assert order.held_bytes == 0


def test_after_drops_exactly_the_bytes_sent() -> None:
    from pieced.peer.plugin import _after

    parts: list[bytes | memoryview] = [b"abc", memoryview(b"defgh"), b"", b"ij"]
    whole = b"abcdefghij"
    for n in range(len(whole) + 1):
        rest = _after(parts, n)
        assert b"".join(bytes(p) for p in rest) == whole[n:], n


def test_flush_sends_every_byte_in_order_through_a_full_socket() -> None:
    """Peer.flush writes straight to the socket while the transport holds nothing, and
    gives the transport whatever the socket did not take: a reader that lags far behind
    (the socket full, writes cut short, the transport buffering, the sender draining)
    still gets every byte, in order."""
    import asyncio
    import random

    from pieced.peer.conn import PeerConnection
    from pieced.peer.plugin import Conduct, Inbox, Peer

    rng = random.Random(5)
    messages = [rng.randbytes(rng.choice([13, 16384, 70000])) for _ in range(400)]
    want = b"".join(messages)

    async def main() -> bytes:
        got = bytearray()
        done = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(0.3)  # let the sender fill the socket first
            while len(got) < len(want):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got.extend(chunk)
            done.set()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, inbox = await asyncio.get_running_loop().create_connection(
            Inbox, "127.0.0.1", port)
        assert isinstance(transport, asyncio.Transport)
        conn = PeerConnection.__new__(PeerConnection)
        conn.outbox = []
        conn.num_pieces = 0
        peer = Peer(conn, transport, inbox, "127.0.0.1", port, Conduct("test"))
        for i in range(0, len(messages), 7):
            conn.outbox.extend(memoryview(m) if i % 2 else m for m in messages[i : i + 7])
            peer.flush()
            if transport.get_write_buffer_size() > 4 * 1024 * 1024:
                await inbox.drain()  # returns once the reader has caught up
            await asyncio.sleep(0)
        await asyncio.wait_for(done.wait(), 30)
        transport.close()
        server.close()
        return bytes(got)

    assert asyncio.run(main()) == want


def test_inbox_hands_over_every_byte_in_order_through_its_one_buffer() -> None:
    """Inbox: a sender far faster than the reader fills its buffer (reading pauses), and
    the reader still gets every byte in order, then the end of the stream; a connection
    reset by the other end ends the reading too (with the reset raised, or as the end of
    the stream), never a wait forever."""
    import asyncio
    import random
    import socket

    from pieced.peer.plugin import Inbox

    rng = random.Random(9)
    want = rng.randbytes(5 * 1024 * 1024 + 123)

    async def main() -> tuple[bytes, int]:
        async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for i in range(0, len(want), 100_000):
                writer.write(want[i : i + 100_000])
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(send, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, inbox = await asyncio.get_running_loop().create_connection(
            lambda: Inbox(64 * 1024), "127.0.0.1", port)
        got = bytearray()
        most = 0
        while (data := await inbox.receive()) is not None:
            most = max(most, data.nbytes)
            got += data
            inbox.consumed()
            if rng.random() < 0.3:
                await asyncio.sleep(0.002)  # a slow reader: the buffer fills
        server.close()
        return bytes(got), most

    got, most = asyncio.run(main())
    assert got == want
    assert most == 64 * 1024  # it did fill, and reading went on after

    async def reset() -> None:
        async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            writer.transport.abort()

        server = await asyncio.start_server(rst, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, inbox = await asyncio.get_running_loop().create_connection(
            Inbox, "127.0.0.1", port)
        try:
            while await asyncio.wait_for(inbox.receive(), 10) is not None:
                inbox.consumed()
        except ConnectionError:
            pass  # the reset, raised to the reader
        server.close()

    asyncio.run(reset())
