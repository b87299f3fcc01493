"""The wire format, sans I/O: frames in, bytes out, no sockets.

Every frame starts with a 12-byte header, big-endian::

    u32 length    bytes after this field (8 + extension + payload)
    u8  type
    u8  flags
    u16 reserved  (0)
    u32 id        request id chosen by the client; echoed in the reply; 0 for events

Control frames (HELLO, REQUEST, RESPONSE, ERROR, EVENT) carry a bencoded
dictionary. Block frames carry a fixed binary extension and raw bytes, so a 16 KiB
block costs one header and no encoding. ``docs/protocol.md`` is the same thing
written for people writing a client in another language.

:class:`FrameReader` parses from a :class:`RecvRing`: block payloads come out as up
to two memoryviews into the ring (a wrap) plus a token that frees the space once
the block is on disk. The daemon and the client use the same reader.
"""

from __future__ import annotations

import mmap
import struct
from enum import IntEnum
from typing import Any

import bencodepy
from pieced.storage.bencode import BencodeError, decode
from pieced.storage.errors import BadRequest, OutOfRange, PiecedError, ProtocolError, TooLarge

PROTOCOL_VERSION = 1
MAGIC = b"pieced"
HEADER = struct.Struct(">IBBHI")
HEADER_SIZE = HEADER.size  # 12
LENGTH_AFTER = HEADER_SIZE - 4

WRITE_EXT = struct.Struct(">20sII")  # info_hash, piece, begin
RING_EXT = struct.Struct(">20sIIQI")  # info_hash, piece, begin, ring offset, length
READ_EXT = struct.Struct(">20sIII")  # info_hash, piece, begin, length
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
MAX_BLOCK = 1024 * 1024

FLAG_FLUSH = 0x01  # WRITE / WRITE_RING: persist at once
FLAG_VOLATILE = 0x01  # READ / READ_RING: do not keep the piece in cache


class FrameType(IntEnum):
    HELLO = 1
    REQUEST = 2
    RESPONSE = 3
    ERROR = 4
    EVENT = 5
    WRITE = 16
    WRITE_RING = 17
    READ = 18
    DATA = 19
    ACK = 20
    READ_RING = 21


CONTROL = {FrameType.HELLO, FrameType.REQUEST, FrameType.RESPONSE, FrameType.ERROR, FrameType.EVENT}
_EXT = {FrameType.WRITE: WRITE_EXT, FrameType.WRITE_RING: RING_EXT, FrameType.READ: READ_EXT,
        FrameType.READ_RING: RING_EXT}


class Frame:
    """A parsed frame. ``body`` is the decoded dictionary of a control frame;
    ``payload`` is a block's bytes as one or two views into the receive ring,
    valid until :meth:`RecvRing.release` of ``token``. A WRITE whose block is over
    MAX_BLOCK has ``length`` > MAX_BLOCK and no payload: it was skipped, and is
    answered with an error.

    A plain class with slots, not a dataclass: one is made per frame, on both ends."""

    __slots__ = ("begin", "body", "flags", "id", "info_hash", "length", "payload", "piece",
                 "ring_offset", "token", "type")

    def __init__(
        self, type: FrameType, flags: int, id: int, body: dict[bytes, Any] | None = None,
        info_hash: bytes = b"", piece: int = 0, begin: int = 0, length: int = 0,
        ring_offset: int = 0, payload: tuple[memoryview, ...] = (),
        token: tuple[int, int] | None = None,
    ) -> None:
        self.type, self.flags, self.id = type, flags, id
        self.body: dict[bytes, Any] = {} if body is None else body
        self.info_hash, self.piece, self.begin, self.length = info_hash, piece, begin, length
        self.ring_offset, self.payload, self.token = ring_offset, payload, token

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in (
            "type", "flags", "id", "body", "info_hash", "piece", "begin", "length"))
        return f"Frame({fields})"


# -- encoding -------------------------------------------------------------------------

def _header(ftype: FrameType, flags: int, rid: int, rest: int) -> bytes:
    return HEADER.pack(LENGTH_AFTER + rest, ftype, flags, 0, rid)


def encode_control(ftype: FrameType, rid: int,
                   body: dict[str, Any] | dict[bytes, Any] | bytes) -> bytes:
    """A control frame; ``body`` is a dictionary, or one already bencoded."""
    payload: bytes = body if isinstance(body, bytes) else bencodepy.encode(body)
    return _header(ftype, 0, rid, len(payload)) + payload


def not_an_info_hash(ih: object) -> BadRequest:
    """The error for an info_hash argument of another type than bytes (or, where the
    client takes them, hex digits), raised before anything is sent."""
    return BadRequest(f"an info_hash is 20 bytes, not {type(ih).__name__} {ih!r:.60}")


def info_hash_bytes(ih: object) -> bytes:
    """An info_hash given as bytes (a bytearray, a memoryview) or as hex digits; anything
    else is refused before it is sent (``bytes(7)`` would have asked for a torrent of
    seven zero bytes)."""
    if isinstance(ih, str):
        try:
            return bytes.fromhex(ih)
        except ValueError:
            raise BadRequest(f"an info_hash is 20 bytes, or hex digits, not {ih!r:.70}") from None
    if isinstance(ih, (bytes, bytearray, memoryview)):
        return bytes(ih)
    raise not_an_info_hash(ih)


def info_hash_field(ih: object) -> bytes:
    """The 20 bytes of a block frame's info_hash field (as :func:`info_hash_bytes`
    takes it); refused before anything is sent otherwise: packed there, a shorter one
    was padded with zeros and a longer one cut, a request for another torrent than the
    caller named."""
    field = info_hash_bytes(ih)
    if len(field) != 20:
        raise BadRequest(f"an info_hash is 20 bytes (a v2-only torrent's is its SHA-256 "
                         f"cut to 20), not {len(field)}")
    return field


def unencodable(piece: object, begin: object, length: object,
                exc: struct.error | None = None, ih: object = b"") -> PiecedError:
    """The typed error for a block frame whose fields do not fit it (a negative or
    over-32-bit piece, begin or length; a field of the wrong type): what the daemon would
    have answered, raised before anything is sent."""
    if not isinstance(ih, (bytes, bytearray, memoryview)):
        return not_an_info_hash(ih)
    what = f"piece {piece!r}, begin {begin!r}, length {length!r}"
    if all(type(v) is int for v in (piece, begin, length)):
        return OutOfRange(f"{what}: outside the frame's unsigned 32-bit fields")
    return BadRequest(f"{what}: {exc}")


def encode_write_header(rid: int, ih: bytes, piece: int, begin: int, length: int, flags: int = 0) -> bytes:
    """Header of an inline WRITE; the caller sends the block bytes right after it
    (with sendmsg, so the block is not copied into a joined buffer)."""
    if type(ih) is not bytes or len(ih) != 20:
        ih = info_hash_field(ih)
    try:
        return _header(FrameType.WRITE, flags, rid, WRITE_EXT.size + length) + WRITE_EXT.pack(
            ih, piece, begin
        )
    except struct.error as exc:
        raise unencodable(piece, begin, length, exc, ih) from None


def encode_write_ring(
    rid: int, ih: bytes, piece: int, begin: int, offset: int, length: int, flags: int = 0
) -> bytes:
    if type(ih) is not bytes or len(ih) != 20:
        ih = info_hash_field(ih)
    try:
        return _header(FrameType.WRITE_RING, flags, rid, RING_EXT.size) + RING_EXT.pack(
            ih, piece, begin, offset, length
        )
    except struct.error as exc:
        raise unencodable(piece, begin, length, exc, ih) from None


def encode_read(rid: int, ih: bytes, piece: int, begin: int, length: int, flags: int = 0) -> bytes:
    if type(ih) is not bytes or len(ih) != 20:
        ih = info_hash_field(ih)
    try:
        return _header(FrameType.READ, flags, rid, READ_EXT.size) + READ_EXT.pack(
            ih, piece, begin, length)
    except struct.error as exc:
        raise unencodable(piece, begin, length, exc, ih) from None


def encode_read_ring(
    rid: int, ih: bytes, piece: int, begin: int, offset: int, length: int, flags: int = 0
) -> bytes:
    """A READ whose bytes the daemon puts into the client's shared ring at ``offset``
    (answered with an ACK): for a seeder, no bytes cross the socket."""
    if type(ih) is not bytes or len(ih) != 20:
        ih = info_hash_field(ih)
    try:
        return _header(FrameType.READ_RING, flags, rid, RING_EXT.size) + RING_EXT.pack(
            ih, piece, begin, offset, length
        )
    except struct.error as exc:
        raise unencodable(piece, begin, length, exc, ih) from None


def encode_data_header(rid: int, length: int) -> bytes:
    return _header(FrameType.DATA, 0, rid, length)


def encode_ack(rid: int, flags: int = 0) -> bytes:
    return _header(FrameType.ACK, flags, rid, 0)


# -- the receive ring -------------------------------------------------------------------

TRIM_OVER = 1024 * 1024 + 64  # more than the largest block frame


class RecvRing:
    """A fixed receive buffer used as a ring, with out-of-order release.

    Bytes land at ``head`` (via :meth:`writable`, for ``recv_into``); frames are
    parsed from ``parsed``; space before ``parsed`` stays taken until every block
    in it is released, oldest first. When nothing is writable the owner stops
    reading from the peer: that is the daemon's flow control.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Anonymous memory, not a bytearray (which is zeroed, so all resident at once):
        # a page costs memory only once bytes have passed through it, so an idle
        # connection's buffer costs next to nothing.
        self.buf = mmap.mmap(-1, capacity)
        self.view = memoryview(self.buf)
        self.head = 0  # total bytes ever written (monotonic)
        self.parsed = 0  # total bytes parsed
        self.tail = 0  # total bytes freed
        self._released: dict[int, int] = {}  # start -> end of regions freed out of order
        self._trim = False  # a region larger than any block passed: give pages back when empty

    @property
    def used(self) -> int:
        return self.head - self.tail

    @property
    def unparsed(self) -> int:
        return self.head - self.parsed

    def writable(self) -> memoryview:
        """The largest contiguous free region (empty when full). An empty ring starts
        again from its first byte: a connection of small frames, each answered before
        the next, otherwise walked the whole buffer and made every page of it resident
        for as long as it stayed connected (8 MiB for a plugin's reads). (Only here, in
        the owner's call before its receive: a view handed out earlier is never moved
        from under a receive in flight.)"""
        free = self.capacity - self.used
        if free <= 0:
            return self.view[0:0]
        if free == self.capacity and self.head % self.capacity:
            self.head = self.parsed = self.tail = -(-self.head // self.capacity) * self.capacity
        start = self.head % self.capacity
        return self.view[start : start + min(free, self.capacity - start)]

    def wrote(self, n: int) -> None:
        self.head += n

    def peek(self, n: int) -> bytes:
        """Copy of the next ``n`` unparsed bytes (headers are small; copying them is fine)."""
        return b"".join(self._views(self.parsed, n))

    def _views(self, pos: int, n: int) -> tuple[memoryview, ...]:
        start = pos % self.capacity
        first = min(n, self.capacity - start)
        if first == n:
            return (self.view[start : start + n],)
        return (self.view[start : start + first], self.view[0 : n - first])

    def consume(self, n: int) -> None:
        """Parse past ``n`` bytes and free them at once (headers, control frames)."""
        token = (self.parsed, self.parsed + n)
        self.parsed += n
        self.release(token)

    def take(self, n: int) -> tuple[tuple[memoryview, ...], tuple[int, int]]:
        """Parse past ``n`` bytes and keep them until ``release(token)``."""
        views = self._views(self.parsed, n)
        token = (self.parsed, self.parsed + n)
        self.parsed += n
        return views, token

    def release(self, token: tuple[int, int]) -> None:
        start, end = token
        if start == end:
            return
        self._released[start] = end
        while self.tail in self._released:
            self.tail = self._released.pop(self.tail)
        if end - start > TRIM_OVER:
            self._trim = True
        if self._trim and self.tail == self.head:
            # One large control frame (a big metainfo) touched pages no block stream
            # needs: return them to the kernel rather than hold them while connected.
            self._trim = False
            self.buf.madvise(mmap.MADV_DONTNEED)


class FrameReader:
    """Turns the bytes in a :class:`RecvRing` into :class:`Frame` objects.

    Any input either parses or raises :class:`ProtocolError` (or TooLarge); after an
    error the stream is unusable and the connection is dropped.
    """

    def __init__(
        self, ring: RecvRing, max_frame: int = DEFAULT_MAX_FRAME, max_values: int | None = None
    ) -> None:
        """``max_values``: the most values a control body may hold (see bencode.decode);
        the daemon's requests are small, so it refuses a body of a million empty lists
        after a few thousand instead of spending seconds decoding it."""
        if max_frame + 4 > ring.capacity:
            raise ValueError("the ring must hold at least one frame of max_frame bytes")
        self.ring = ring
        self.max_frame = max_frame
        self.max_values = max_values

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        ring = self.ring
        if ring.unparsed < HEADER_SIZE:
            return None
        length, ftype_raw, flags, reserved, rid = HEADER.unpack(ring.peek(HEADER_SIZE))
        if length < LENGTH_AFTER:
            raise ProtocolError(f"frame length {length} is shorter than its header")
        if length > self.max_frame:
            raise TooLarge(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        if reserved:
            raise ProtocolError("reserved header field is not zero")
        try:
            ftype = FrameType(ftype_raw)
        except ValueError:
            raise ProtocolError(f"unknown frame type {ftype_raw}") from None
        total = 4 + length
        if ring.unparsed < total:
            return None
        body_len = length - LENGTH_AFTER
        if ftype in CONTROL:
            ring.consume(HEADER_SIZE)
            raw = ring.peek(body_len)
            ring.consume(body_len)
            return Frame(ftype, flags, rid, body=_decode_body(raw, self.max_values),
                         length=body_len)
        if ftype in (FrameType.ACK, FrameType.DATA):
            ring.consume(HEADER_SIZE)
            if ftype == FrameType.ACK:
                if body_len:
                    raise ProtocolError("ACK frames carry no payload")
                return Frame(ftype, flags, rid)
            views, token = ring.take(body_len)
            return Frame(ftype, flags, rid, length=body_len, payload=views, token=token)
        ext = _EXT[ftype]
        if body_len < ext.size or (ftype != FrameType.WRITE and body_len != ext.size):
            raise ProtocolError(f"{ftype.name} frame has a malformed extension")
        ring.consume(HEADER_SIZE)
        fields = ext.unpack(ring.peek(ext.size))
        ring.consume(ext.size)
        frame = Frame(ftype, flags, rid, info_hash=fields[0], piece=fields[1], begin=fields[2])
        if ftype == FrameType.WRITE:
            frame.length = body_len - ext.size
            if frame.length > MAX_BLOCK:
                # The frame itself is within max_frame, so the stream is intact: skip the
                # block at once (no payload, no token) and let the receiver refuse it.
                ring.consume(frame.length)
            else:
                frame.payload, frame.token = ring.take(frame.length)
        elif ftype in (FrameType.WRITE_RING, FrameType.READ_RING):
            frame.ring_offset, frame.length = fields[3], fields[4]
        else:
            frame.length = fields[3]
        return frame


def _decode_body(raw: bytes, max_values: int | None = None) -> dict[bytes, Any]:
    try:
        body = decode(raw, max_depth=64, max_values=max_values)
    except BencodeError as exc:
        raise ProtocolError(f"control payload is not canonical bencode: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("control payload is not a dictionary")
    return body
