"""The listening port's answer to uTP (``peer/utp.py``): a RESET for a SYN, nothing
for anything else, never longer than what came."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import given
from hypothesis import strategies as st
from pieced.peer.utp import HEADER, ST_RESET, ST_SYN, refusal


def _syn(conn_id: int, seq: int, extra: bytes = b"") -> bytes:
    # As libtorrent sends it: connection id = the id it receives on, ack_nr 0.
    return HEADER.pack((ST_SYN << 4) | 1, 0, conn_id, 123456, 0, 1048576, seq, 0) + extra


def test_a_syn_gets_a_reset_on_its_connection_acknowledging_it() -> None:
    reply = refusal(_syn(0xBEEF, 4242, b"\x00" * 10), now_us=(1 << 32) + 7, seq_nr=0x1_0005)
    assert reply is not None and len(reply) == 20
    type_ver, ext, conn_id, ts, diff, wnd, seq, ack = struct.unpack(">BBHIIIHH", reply)
    assert (type_ver >> 4, type_ver & 15) == (ST_RESET, 1)
    assert (ext, conn_id, ts, diff, wnd, seq, ack) == (0, 0xBEEF, 7, 0, 0, 5, 4242)


def test_what_is_not_a_version_1_syn_gets_nothing() -> None:
    syn = _syn(1, 2)
    assert refusal(syn[:19], 0, 0) is None  # short
    for type_ver in (0x01, 0x21, 0x31, 0x42, 0x40, 0x14):  # DATA, STATE, RESET, v2, v0...
        assert refusal(bytes([type_ver]) + syn[1:], 0, 0) is None
    assert refusal(b"d1:ad2:id20:" + bytes(20) + b"e1:q4:ping1:t2:aa1:y1:qe", 0, 0) is None


@given(st.binary(max_size=64), st.integers(0, 2**40), st.integers(0, 2**20))
def test_any_datagram_is_answered_at_most_by_its_own_length(
        data: bytes, now: int, seq: int) -> None:
    reply = refusal(data, now, seq)
    if reply is not None:
        assert len(data) >= 20 and data[0] == 0x41
        assert len(reply) <= len(data) and reply[2:4] == data[2:4]


def test_a_flood_of_syns_from_one_address_leaves_resets_for_the_others() -> None:
    """The port answers at most 50 SYNs a second: a flood from one address took them
    all, and a real peer dialling over uTP meanwhile got no RESET, and fell back to TCP
    only after its uTP timeout (3 s more). One address gets a few of them a second."""
    import asyncio
    import socket
    import time

    from pieced.peer.plugin import UtpRefuser

    async def main() -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(UtpRefuser,
                                                           local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.bind(("127.0.0.1", 0))
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.2", 0))
        for s in (flood, peer):
            s.setblocking(False)
        try:
            if time.time() % 1 > 0.8:  # (the flood and the dial in one second)
                await asyncio.sleep(1 - time.time() % 1)
            for k in range(500):
                flood.sendto(_syn(k, k), ("127.0.0.1", port))
            await asyncio.sleep(0.05)
            peer.sendto(_syn(0xAAAA, 7), ("127.0.0.1", port))
            await asyncio.sleep(0.1)
            flooded = 0
            with contextlib.suppress(BlockingIOError):
                while flood.recv(64):
                    flooded += 1
            try:
                answered = peer.recv(64)[2:4] == b"\xaa\xaa"
            except BlockingIOError:
                answered = False
            return flooded, answered
        finally:
            transport.close()
            flood.close()
            peer.close()

    flooded, answered = asyncio.run(main())
    assert answered
    assert 0 < flooded < 50
