"""The listening port's answer to uTP (``peer/utp.py``): a RESET for a SYN, nothing
for anything else, never longer than what came."""

from __future__ import annotations

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
