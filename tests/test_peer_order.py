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
    order = InOrder(PLANS.__getitem__)
    assert order.arrived(0, 0, _data(0, 0)) == [(0, _data(0, 0))]
    assert order.arrived(0, 2 * BLOCK, _data(0, 2 * BLOCK)) == []  # ahead: held
    assert order.arrived(0, 3 * BLOCK, _data(0, 3 * BLOCK)) == []
    assert order.arrived(0, 3 * BLOCK, _data(0, 3 * BLOCK)) == []  # again: dropped
    got = order.arrived(0, BLOCK, _data(0, BLOCK))  # the gap: all three go, in order
    assert [b for b, _ in got] == [BLOCK, 2 * BLOCK, 3 * BLOCK]
    assert order.held_bytes == 0 and order.reordered == 3
    # a plan with a skipped block: the next one is due after it
    assert [b for b, _ in order.arrived(1, 3 * BLOCK, b"x")] == []
    assert [b for b, _ in order.arrived(1, 0, b"x")] == [0]
    assert [b for b, _ in order.arrived(1, BLOCK, b"x")] == [BLOCK, 3 * BLOCK]


def test_past_the_bound_blocks_go_as_they_come_and_nothing_stalls() -> None:
    order = InOrder(PLANS.__getitem__)
    order.HOLD_BYTES = 10  # one small block at most
    assert order.arrived(0, 2 * BLOCK, b"tiny") == []
    assert order.arrived(0, 3 * BLOCK, b"too big for the bound") == \
        [(3 * BLOCK, b"too big for the bound")]
    got = order.arrived(0, 0, b"a") + order.arrived(0, BLOCK, b"b")
    assert [b for b, _ in got] == [0, BLOCK, 2 * BLOCK]  # 3 was passed: not waited for
    assert [b for b, _ in order.arrived(0, 4 * BLOCK, b"c")] == [4 * BLOCK]


def test_forget_drops_what_was_held() -> None:
    order = InOrder(PLANS.__getitem__)
    order.arrived(0, 5 * BLOCK, b"12345")
    assert order.held_bytes == 5
    order.forget(0)
    assert order.held_bytes == 0
    assert order.arrived(0, 0, b"x") == [(0, b"x")]  # a new attempt starts from the start


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32))
def test_any_arrival_order_gives_every_block_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    order = InOrder(PLANS.__getitem__)
    arrivals = [(p, b) for p, plan in PLANS.items() for b, _ in plan]
    rng.shuffle(arrivals)
    sent: dict[int, list[int]] = {0: [], 1: []}
    for p, b in arrivals:
        for begin, data in order.arrived(p, b, _data(p, b)):
            assert data == _data(p, begin)
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
    (the socket full, writes cut short, the transport buffering) still gets every byte,
    in order."""
    import asyncio
    import random

    from pieced.peer.conn import PeerConnection
    from pieced.peer.plugin import Peer

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
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = PeerConnection.__new__(PeerConnection)
        conn.outbox = []
        peer = Peer(conn, reader, writer, "test")
        for i in range(0, len(messages), 7):
            conn.outbox.extend(memoryview(m) if i % 2 else m for m in messages[i : i + 7])
            peer.flush()
            await asyncio.sleep(0)
        await asyncio.wait_for(done.wait(), 30)
        writer.close()
        server.close()
        return bytes(got)

    assert asyncio.run(main()) == want
