"""uTP (BEP 29) connections refused at once, so that peers fall back to TCP.

pieced-peer speaks BitTorrent over TCP only. libtorrent, with its default settings,
dials a new peer over uTP first and tries TCP only once that attempt has failed: with
no answer, after its connect timeout (about 5 s on loopback; longer elsewhere), for
every peer it meets. A uTP RESET in answer to the SYN fails the attempt at once, and
libtorrent reconnects over TCP right away and remembers that the peer has no uTP.

Sans-I/O: :func:`refusal` takes a datagram received on the listening port and returns
the datagram to send back, or None. The socket sits in ``plugin.py``.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">BBHIIIHH")  # type|version, extension, connection id, timestamp,
#                                      timestamp difference, window, seq_nr, ack_nr
ST_RESET = 3
ST_SYN = 4
VERSION = 1


def refusal(datagram: bytes, now_us: int, seq_nr: int) -> bytes | None:
    """The RESET answering a uTP SYN (version 1, at least a header long), or None for
    anything else: other uTP packets belong to no connection of ours, and what is not
    uTP is not answered at all. The RESET carries the SYN's connection id (the one the
    dialler receives on) and acknowledges its sequence number, as the dialler checks;
    it is no longer than the SYN, so the port cannot amplify a forged sender's traffic."""
    if len(datagram) < HEADER.size:
        return None
    type_ver, _ext, conn_id, _ts, _diff, _wnd, seq, _ack = HEADER.unpack_from(datagram)
    if type_ver != (ST_SYN << 4) | VERSION:
        return None
    return HEADER.pack((ST_RESET << 4) | VERSION, 0, conn_id, now_us & 0xFFFFFFFF, 0, 0,
                       seq_nr & 0xFFFF, seq)
