"""The BitTorrent peer wire protocol, sans I/O: bytes in, events out, and back.

Covers the base protocol, the fast extension, extension messages (their bencoded
payload is left to the caller) and the v2 hash messages. Nothing here touches a
socket, so the same code serves any transport and is tested without one.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TypeAlias

__all__ = [
    "BLOCK",
    "HANDSHAKE_LEN",
    "PROTOCOL",
    "AllowedFast",
    "Bitfield",
    "Cancel",
    "Choke",
    "Event",
    "Extended",
    "Handshake",
    "HashReject",
    "HashRequest",
    "Hashes",
    "Have",
    "HaveAll",
    "HaveNone",
    "Interested",
    "KeepAlive",
    "MsgId",
    "NotInterested",
    "Parser",
    "Piece",
    "Port",
    "RejectRequest",
    "Request",
    "SuggestPiece",
    "Unchoke",
    "Unknown",
    "WireError",
    "allowed_fast",
    "allowed_fast_set",
    "bitfield",
    "bits_from_pieces",
    "cancel",
    "choke",
    "encode",
    "extended",
    "handshake",
    "hash_reject",
    "hash_request",
    "hashes",
    "have",
    "have_all",
    "have_none",
    "interested",
    "keep_alive",
    "make_reserved",
    "not_interested",
    "piece",
    "piece_header",
    "pieces_from_bits",
    "port",
    "reject_request",
    "request",
    "suggest_piece",
    "supports_extended",
    "supports_fast",
    "supports_v2",
    "unchoke",
]

PROTOCOL = b"\x13BitTorrent protocol"
HANDSHAKE_LEN = 68
BLOCK = 16384

_PSTR_LEN = len(PROTOCOL)
_ROOT_LEN = 32
_HASH_LEN = 32
_HASH_HEADER = 48  # pieces root + four u32


# ---------------------------------------------------------------- reserved bits


def make_reserved(*, extended: bool = True, fast: bool = True, v2: bool = False) -> bytes:
    r = bytearray(8)
    if extended:
        r[5] |= 0x10
    if fast:
        r[7] |= 0x04
    if v2:
        r[7] |= 0x10
    return bytes(r)


def supports_extended(reserved: bytes) -> bool:
    return len(reserved) == 8 and bool(reserved[5] & 0x10)


def supports_fast(reserved: bytes) -> bool:
    return len(reserved) == 8 and bool(reserved[7] & 0x04)


def supports_v2(reserved: bytes) -> bool:
    return len(reserved) == 8 and bool(reserved[7] & 0x10)


# ---------------------------------------------------------------- messages


class MsgId(enum.IntEnum):
    CHOKE = 0
    UNCHOKE = 1
    INTERESTED = 2
    NOT_INTERESTED = 3
    HAVE = 4
    BITFIELD = 5
    REQUEST = 6
    PIECE = 7
    CANCEL = 8
    PORT = 9
    SUGGEST_PIECE = 0x0D
    HAVE_ALL = 0x0E
    HAVE_NONE = 0x0F
    REJECT_REQUEST = 0x10
    ALLOWED_FAST = 0x11
    EXTENDED = 20
    HASH_REQUEST = 21
    HASHES = 22
    HASH_REJECT = 23


class WireError(Exception):
    """The peer sent something no correct peer sends: the connection should be dropped."""


class Ourselves(WireError):
    """The handshake carried our own peer id: we dialled an address of our own."""


@dataclass(frozen=True, slots=True)
class Handshake:
    reserved: bytes
    info_hash: bytes
    peer_id: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class Choke:
    pass


@dataclass(frozen=True, slots=True)
class Unchoke:
    pass


@dataclass(frozen=True, slots=True)
class Interested:
    pass


@dataclass(frozen=True, slots=True)
class NotInterested:
    pass


@dataclass(frozen=True, slots=True)
class Have:
    piece: int


@dataclass(frozen=True, slots=True)
class Bitfield:
    bits: bytes


@dataclass(frozen=True, slots=True)
class Request:
    piece: int
    begin: int
    length: int


@dataclass(slots=True)
class Piece:
    """A block. Not frozen, unlike the other events: a frozen dataclass is built through
    ``object.__setattr__`` per field, and a download makes 65,536 of these a GiB. From a
    parser made with ``views=True``, ``data`` is a view of the buffer fed to it."""

    piece: int
    begin: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Cancel:
    piece: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class Port:
    port: int


@dataclass(frozen=True, slots=True)
class SuggestPiece:
    piece: int


@dataclass(frozen=True, slots=True)
class HaveAll:
    pass


@dataclass(frozen=True, slots=True)
class HaveNone:
    pass


@dataclass(frozen=True, slots=True)
class RejectRequest:
    piece: int
    begin: int
    length: int


@dataclass(frozen=True, slots=True)
class AllowedFast:
    piece: int


@dataclass(frozen=True, slots=True)
class Extended:
    ext_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class HashRequest:
    pieces_root: bytes
    base_layer: int
    index: int
    length: int
    proof_layers: int


@dataclass(frozen=True, slots=True)
class Hashes:
    pieces_root: bytes
    base_layer: int
    index: int
    length: int
    proof_layers: int
    hashes: bytes


@dataclass(frozen=True, slots=True)
class HashReject:
    pieces_root: bytes
    base_layer: int
    index: int
    length: int
    proof_layers: int


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message of an id this module does not know; peers may use any id once they
    agree on it, so it is passed on rather than refused."""

    msg_id: int
    payload: bytes


Event: TypeAlias = (
    Handshake
    | KeepAlive
    | Choke
    | Unchoke
    | Interested
    | NotInterested
    | Have
    | Bitfield
    | Request
    | Piece
    | Cancel
    | Port
    | SuggestPiece
    | HaveAll
    | HaveNone
    | RejectRequest
    | AllowedFast
    | Extended
    | HashRequest
    | Hashes
    | HashReject
    | Unknown
)

# ---------------------------------------------------------------- encoders

_U32 = struct.Struct(">I")
_II = struct.Struct(">II")
_III = struct.Struct(">III")
_HASH_FIELDS = struct.Struct(">32sIIII")
_MSG = struct.Struct(">IB")
_MSG_U32 = struct.Struct(">IBI")
_MSG_III = struct.Struct(">IBIII")
_MSG_PIECE = struct.Struct(">IBII")
_MSG_PORT = struct.Struct(">IBH")
_MSG_EXT = struct.Struct(">IBB")
_MSG_HASH = struct.Struct(">IB32sIIII")

_KEEP_ALIVE_MSG = bytes(4)
_CHOKE_MSG = _MSG.pack(1, MsgId.CHOKE)
_UNCHOKE_MSG = _MSG.pack(1, MsgId.UNCHOKE)
_INTERESTED_MSG = _MSG.pack(1, MsgId.INTERESTED)
_NOT_INTERESTED_MSG = _MSG.pack(1, MsgId.NOT_INTERESTED)
_HAVE_ALL_MSG = _MSG.pack(1, MsgId.HAVE_ALL)
_HAVE_NONE_MSG = _MSG.pack(1, MsgId.HAVE_NONE)


def _check_len(what: str, value: bytes, size: int) -> None:
    # struct's "s" format pads or cuts silently; a wrong size here is a caller's bug
    # that would otherwise go out on the wire as a valid-looking message.
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, not {len(value)}")


def handshake(info_hash: bytes, peer_id: bytes, reserved: bytes) -> bytes:
    _check_len("info_hash", info_hash, 20)
    _check_len("peer_id", peer_id, 20)
    _check_len("reserved", reserved, 8)
    return b"".join((PROTOCOL, reserved, info_hash, peer_id))


def keep_alive() -> bytes:
    return _KEEP_ALIVE_MSG


def choke() -> bytes:
    return _CHOKE_MSG


def unchoke() -> bytes:
    return _UNCHOKE_MSG


def interested() -> bytes:
    return _INTERESTED_MSG


def not_interested() -> bytes:
    return _NOT_INTERESTED_MSG


def have(piece: int) -> bytes:
    return _MSG_U32.pack(5, MsgId.HAVE, piece)


def bitfield(bits: bytes) -> bytes:
    return _MSG.pack(1 + len(bits), MsgId.BITFIELD) + bits


def request(piece: int, begin: int, length: int) -> bytes:
    return _MSG_III.pack(13, MsgId.REQUEST, piece, begin, length)


def piece_header(piece: int, begin: int, length: int) -> bytes:
    """Lets a block go out from wherever it lives (a file, a shared buffer) without
    first being joined to its header."""
    return _MSG_PIECE.pack(9 + length, MsgId.PIECE, piece, begin)


def piece(piece: int, begin: int, data: bytes | memoryview) -> bytes:
    return _MSG_PIECE.pack(9 + len(data), MsgId.PIECE, piece, begin) + data


def cancel(piece: int, begin: int, length: int) -> bytes:
    return _MSG_III.pack(13, MsgId.CANCEL, piece, begin, length)


def port(port: int) -> bytes:
    return _MSG_PORT.pack(3, MsgId.PORT, port)


def suggest_piece(piece: int) -> bytes:
    return _MSG_U32.pack(5, MsgId.SUGGEST_PIECE, piece)


def have_all() -> bytes:
    return _HAVE_ALL_MSG


def have_none() -> bytes:
    return _HAVE_NONE_MSG


def reject_request(piece: int, begin: int, length: int) -> bytes:
    return _MSG_III.pack(13, MsgId.REJECT_REQUEST, piece, begin, length)


def allowed_fast(piece: int) -> bytes:
    return _MSG_U32.pack(5, MsgId.ALLOWED_FAST, piece)


def extended(ext_id: int, payload: bytes) -> bytes:
    return _MSG_EXT.pack(2 + len(payload), MsgId.EXTENDED, ext_id) + payload


def hash_request(
    pieces_root: bytes, base_layer: int, index: int, length: int, proof_layers: int
) -> bytes:
    _check_len("pieces_root", pieces_root, _ROOT_LEN)
    return _MSG_HASH.pack(
        1 + _HASH_HEADER, MsgId.HASH_REQUEST, pieces_root, base_layer, index, length,
        proof_layers,
    )


def hashes(
    pieces_root: bytes, base_layer: int, index: int, length: int, proof_layers: int,
    hashes: bytes,
) -> bytes:
    _check_len("pieces_root", pieces_root, _ROOT_LEN)
    if len(hashes) % _HASH_LEN:
        raise ValueError(f"hashes must be a multiple of {_HASH_LEN} bytes, not {len(hashes)}")
    head = _MSG_HASH.pack(
        1 + _HASH_HEADER + len(hashes), MsgId.HASHES, pieces_root, base_layer, index, length,
        proof_layers,
    )
    return head + hashes


def hash_reject(
    pieces_root: bytes, base_layer: int, index: int, length: int, proof_layers: int
) -> bytes:
    _check_len("pieces_root", pieces_root, _ROOT_LEN)
    return _MSG_HASH.pack(
        1 + _HASH_HEADER, MsgId.HASH_REJECT, pieces_root, base_layer, index, length,
        proof_layers,
    )


def encode(event: Event) -> bytes:
    """One entry point for code that queues events rather than calling the encoders."""
    match event:
        case Piece(p, b, d):
            return piece(p, b, d)
        case Request(p, b, n):
            return request(p, b, n)
        case Have(p):
            return have(p)
        case Cancel(p, b, n):
            return cancel(p, b, n)
        case RejectRequest(p, b, n):
            return reject_request(p, b, n)
        case KeepAlive():
            return _KEEP_ALIVE_MSG
        case Choke():
            return _CHOKE_MSG
        case Unchoke():
            return _UNCHOKE_MSG
        case Interested():
            return _INTERESTED_MSG
        case NotInterested():
            return _NOT_INTERESTED_MSG
        case Bitfield(bits):
            return bitfield(bits)
        case Port(p):
            return port(p)
        case SuggestPiece(p):
            return suggest_piece(p)
        case HaveAll():
            return _HAVE_ALL_MSG
        case HaveNone():
            return _HAVE_NONE_MSG
        case AllowedFast(p):
            return allowed_fast(p)
        case Extended(ext_id, payload):
            return extended(ext_id, payload)
        case HashRequest(root, base, index, length, proof):
            return hash_request(root, base, index, length, proof)
        case Hashes(root, base, index, length, proof, hs):
            return hashes(root, base, index, length, proof, hs)
        case HashReject(root, base, index, length, proof):
            return hash_reject(root, base, index, length, proof)
        case Unknown(msg_id, payload):
            return _MSG.pack(1 + len(payload), msg_id) + payload
        case Handshake(reserved, info_hash, peer_id):
            return handshake(info_hash, peer_id, reserved)
    raise TypeError(f"not a wire event: {event!r}")


# ---------------------------------------------------------------- parser

_KEEP_ALIVE = KeepAlive()
_NO_PAYLOAD: dict[int, Event] = {
    MsgId.CHOKE: Choke(),
    MsgId.UNCHOKE: Unchoke(),
    MsgId.INTERESTED: Interested(),
    MsgId.NOT_INTERESTED: NotInterested(),
    MsgId.HAVE_ALL: HaveAll(),
    MsgId.HAVE_NONE: HaveNone(),
}
_ONE_U32: dict[int, type[Have] | type[SuggestPiece] | type[AllowedFast]] = {
    MsgId.HAVE: Have,
    MsgId.SUGGEST_PIECE: SuggestPiece,
    MsgId.ALLOWED_FAST: AllowedFast,
}
_THREE_U32: dict[int, type[Request] | type[Cancel] | type[RejectRequest]] = {
    MsgId.REQUEST: Request,
    MsgId.CANCEL: Cancel,
    MsgId.REJECT_REQUEST: RejectRequest,
}
_HASH_MSGS: dict[int, type[HashRequest] | type[HashReject]] = {
    MsgId.HASH_REQUEST: HashRequest,
    MsgId.HASH_REJECT: HashReject,
}

_MSG_IDS = frozenset(int(m) for m in MsgId)
_PIECE = int(MsgId.PIECE)
_REQUEST = int(MsgId.REQUEST)
_PIECE_HEAD = 13  # length prefix, id, index, begin

MAX_HASH_COUNT = 8192  # hashes asked at once, as libtorrent: a 128 MiB piece's blocks
# The longest message of each kind a correct peer sends (its length field: the id
# byte and the payload), so that a peer cannot make a connection hold megabytes for a
# message that could never be that long. A block is at most 16 KiB (every client asks
# for that or less); an extension message of ours carries at most a 16 KiB metadata
# piece and its dictionary, other peers' (PEX, handshakes) far less; a HASHES answer
# at most MAX_HASH_COUNT hashes and the uncles of a tree as high as a file can be.
_EXTENDED_MAX = 2 + 65536
_UNKNOWN_MAX = 1 + 65536
_HASHES_MAX = 1 + _HASH_HEADER + _HASH_LEN * (MAX_HASH_COUNT + 64)
_FIXED_LENGTHS = {
    **{int(m): 1 for m in _NO_PAYLOAD},
    **{int(m): 5 for m in _ONE_U32},
    **{int(m): 13 for m in _THREE_U32},
    **{int(m): 1 + _HASH_HEADER for m in _HASH_MSGS},
    int(MsgId.PORT): 3,
}


def message_limits(*, block: int = BLOCK, bitfield_bytes: int | None = None,
                   cap: int | None = None) -> list[int]:
    """The longest length field accepted for each message id (a list of 256).

    ``bitfield_bytes`` is the torrent's bitfield size (None: any up to ``cap``); every
    limit is lowered to ``cap`` when one is given."""
    limits = [_UNKNOWN_MAX] * 256
    for mid, size in _FIXED_LENGTHS.items():
        limits[mid] = size
    limits[_PIECE] = 9 + block
    limits[MsgId.EXTENDED] = _EXTENDED_MAX
    limits[MsgId.HASHES] = _HASHES_MAX
    limits[MsgId.BITFIELD] = 1 + bitfield_bytes if bitfield_bytes is not None else 1 << 21
    if cap is not None:
        limits = [min(n, cap) for n in limits]
    return limits
# A partial message from an immutable ``bytes`` is kept as a view when at least this
# long; shorter tails are copied into one growing buffer, so a peer trickling single
# bytes costs one buffer rather than one object per byte.
_VIEW_MIN = 4096

_Buf: TypeAlias = bytes | bytearray | memoryview


def _name(mid: int) -> str:
    return MsgId(mid).name if mid in _MSG_IDS else f"id {mid}"


def _bad_size(mid: int, size: int, expected: str) -> WireError:
    return WireError(f"{_name(mid)} message with {size} bytes of payload, expected {expected}")


def _decode(buf: _Buf, start: int, end: int) -> Event:
    """The message whose id is at ``buf[start]`` and whose payload runs to ``end``."""
    mid = buf[start]
    p = start + 1
    size = end - p
    if mid == _PIECE:
        if size < 8:
            raise _bad_size(mid, size, "at least 8")
        index, begin = _II.unpack_from(buf, p)
        return Piece(index, begin, bytes(buf[p + 8 : end]))
    cls3 = _THREE_U32.get(mid)
    if cls3 is not None:
        if size != 12:
            raise _bad_size(mid, size, "12")
        a, b, c = _III.unpack_from(buf, p)
        return cls3(a, b, c)
    cls1 = _ONE_U32.get(mid)
    if cls1 is not None:
        if size != 4:
            raise _bad_size(mid, size, "4")
        (a,) = _U32.unpack_from(buf, p)
        return cls1(a)
    plain = _NO_PAYLOAD.get(mid)
    if plain is not None:
        if size:
            raise _bad_size(mid, size, "0")
        return plain
    if mid == MsgId.BITFIELD:
        return Bitfield(bytes(buf[p:end]))
    if mid == MsgId.EXTENDED:
        if size < 1:
            raise _bad_size(mid, size, "at least 1")
        return Extended(buf[p], bytes(buf[p + 1 : end]))
    clsh = _HASH_MSGS.get(mid)
    if clsh is not None:
        if size != _HASH_HEADER:
            raise _bad_size(mid, size, str(_HASH_HEADER))
        root, base, index, length, proof = _HASH_FIELDS.unpack_from(buf, p)
        return clsh(root, base, index, length, proof)
    if mid == MsgId.HASHES:
        if size < _HASH_HEADER or (size - _HASH_HEADER) % _HASH_LEN:
            raise _bad_size(mid, size, f"{_HASH_HEADER} plus a multiple of {_HASH_LEN}")
        root, base, index, length, proof = _HASH_FIELDS.unpack_from(buf, p)
        return Hashes(root, base, index, length, proof, bytes(buf[p + _HASH_HEADER : end]))
    if mid == MsgId.PORT:
        if size != 2:
            raise _bad_size(mid, size, "2")
        return Port(int.from_bytes(buf[p:end], "big"))
    return Unknown(mid, bytes(buf[p:end]))


def _check_pstr(prefix: bytes) -> None:
    # Checked on the first bytes rather than the whole handshake, so that a stray
    # HTTP request or an encrypted stream is refused at once instead of after 68 bytes.
    if prefix != PROTOCOL[: len(prefix)]:
        if prefix[0] != _PSTR_LEN - 1:
            raise WireError(f"handshake protocol length is {prefix[0]}, expected {_PSTR_LEN - 1} "
                            "(an encrypted handshake? pieced-peer speaks plain BitTorrent only)")
        raise WireError(f"handshake protocol is {prefix[1:]!r}, expected {PROTOCOL[1:]!r}")


def _handshake_event(buf: _Buf) -> Handshake:
    _check_pstr(bytes(buf[:_PSTR_LEN]))
    return Handshake(bytes(buf[20:28]), bytes(buf[28:48]), bytes(buf[48:HANDSHAKE_LEN]))


def _gather(chunks: Sequence[memoryview | bytearray], start: int, end: int) -> bytes:
    """Bytes ``start:end`` of the concatenation of ``chunks``, copied once."""
    parts: list[memoryview] = []
    pos = 0
    for c in chunks:
        n = len(c)
        if pos + n > start:
            m = c if isinstance(c, memoryview) else memoryview(c)
            parts.append(m[max(start - pos, 0) : end - pos])
        pos += n
        if pos >= end:
            break
    return b"".join(parts)


class Parser:
    """One direction of one connection.

    Complete messages are decoded straight from the data given to :meth:`feed`; only
    a message cut by the end of a feed is held back, and a block's bytes are copied
    once into its :class:`Piece` either way (twice for the part of a cut block that
    arrived in a mutable buffer, which has to be copied before the caller reuses it).
    With ``views=True`` a whole block is not copied at all: its :class:`Piece` holds a
    view of the buffer given to :meth:`feed`, valid until the caller reuses that buffer
    (a caller that copies each block once to where it goes saves the parser's copy).
    A :class:`WireError` leaves the stream at an unknown position, so the parser then
    refuses everything: the events decoded earlier in the failing feed are lost with
    the connection they belong to.
    """

    __slots__ = ("_chunks", "_error", "_expect_handshake", "_limits", "_max", "_pending",
                 "_views")

    def __init__(self, *, handshake: bool = True, max_message: int | None = None,
                 bitfield_bytes: int | None = None, views: bool = False) -> None:
        self._expect_handshake = handshake
        # Each kind of message has its own bound (message_limits), checked as soon as
        # its id arrives; the longest of them is checked on the length field alone.
        self._limits = message_limits(bitfield_bytes=bitfield_bytes, cap=max_message)
        self._max = max(self._limits)
        self._views = views
        self._chunks: list[memoryview | bytearray] = []
        self._pending = 0
        self._error: str | None = None

    @property
    def held(self) -> int:
        """Bytes held of a message not complete yet (part of a block on its way)."""
        return self._pending

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise WireError(self._error)
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        # Views of an immutable object may be kept past this call; anything else may
        # be overwritten by the caller as soon as we return.
        keep = isinstance(mv.obj, bytes)
        events: list[Event] = []
        try:
            if self._pending:
                used = self._resume(mv, keep, events)
                if used is None:
                    return events
                mv = mv[used:]
            pos = self._run(mv, events)
            if pos < len(mv):
                self._stash(mv[pos:], keep)
        except WireError as e:
            self._error = str(e)
            raise
        return events

    def _run(self, mv: memoryview, events: list[Event]) -> int:
        """Decodes the complete messages at the start of ``mv``; returns where the
        first incomplete one starts."""
        n = len(mv)
        pos = 0
        if self._expect_handshake:
            if n < HANDSHAKE_LEN:
                return 0
            events.append(_handshake_event(mv))
            self._expect_handshake = False
            pos = HANDSHAKE_LEN
        limits = self._limits
        unpack = _U32.unpack_from
        header = _II.unpack_from
        request3 = _III.unpack_from
        append = events.append
        views = self._views
        while n - pos >= 4:
            (length,) = unpack(mv, pos)
            if length == 0:
                append(_KEEP_ALIVE)
                pos += 4
                continue
            if n - pos < 5:
                self._check_length(length, None)
                break
            mid = mv[pos + 4]
            if length > limits[mid]:
                self._check_length(length, mid)
            end = pos + 4 + length
            if end > n:
                break
            if mid == _PIECE and length >= _PIECE_HEAD - 4:  # a download's message
                index, begin = header(mv, pos + 5)
                block = mv[pos + _PIECE_HEAD : end]
                append(Piece(index, begin, block if views else bytes(block)))
            elif mid == _REQUEST and length == 13:  # a seeder's
                append(Request(*request3(mv, pos + 5)))
            else:
                append(_decode(mv, pos + 4, end))
            pos = end
        return pos

    def _check_length(self, length: int, mid: int | None) -> None:
        """Refuses a length no message of id ``mid`` (None: not arrived yet) has."""
        limit = self._max if mid is None else self._limits[mid]
        if length > limit:
            what = "message" if mid is None else f"{_name(mid)} message"
            raise WireError(f"{what} of {length} bytes, more than the {limit} allowed")

    def _prefix(self, mv: memoryview, size: int) -> bytes:
        return _gather([*self._chunks, mv], 0, size)

    def _resume(self, mv: memoryview, keep: bool, events: list[Event]) -> int | None:
        """Completes the held-back message from the start of ``mv``: returns how much
        of ``mv`` it took, or None if all of ``mv`` was held back too."""
        have = self._pending
        n = len(mv)
        if self._expect_handshake:
            total = HANDSHAKE_LEN
        else:
            if have + n < 4:
                self._stash(mv, keep)
                return None
            head = self._prefix(mv, min(5, have + n))
            (length,) = _U32.unpack_from(head)
            if length:
                if len(head) < 5:
                    self._check_length(length, None)
                    self._stash(mv, keep)
                    return None
                self._check_length(length, head[4])
            total = 4 + length
        if have + n < total:
            self._stash(mv, keep)
            return None
        take = total - have
        chunks = self._chunks
        chunks.append(mv[:take])
        self._chunks = []
        self._pending = 0
        if self._expect_handshake:
            events.append(_handshake_event(_gather(chunks, 0, HANDSHAKE_LEN)))
            self._expect_handshake = False
        elif total == 4:
            events.append(_KEEP_ALIVE)
        elif total >= _PIECE_HEAD and _gather(chunks, 4, 5)[0] == _PIECE:
            # The header and the block are gathered apart so the block is copied once.
            index, begin = _II.unpack_from(_gather(chunks, 5, _PIECE_HEAD))
            events.append(Piece(index, begin, _gather(chunks, _PIECE_HEAD, total)))
        else:
            events.append(_decode(_gather(chunks, 0, total), 4, total))
        return take

    def _stash(self, mv: memoryview, keep: bool) -> None:
        if self._expect_handshake:
            self._check_handshake_prefix(mv)
        self._pending += len(mv)
        chunks = self._chunks
        if keep and len(mv) >= _VIEW_MIN:
            chunks.append(mv)
        elif chunks and isinstance(chunks[-1], bytearray):
            chunks[-1] += mv
        else:
            chunks.append(bytearray(mv))

    def _check_handshake_prefix(self, mv: memoryview) -> None:
        size = min(self._pending + len(mv), _PSTR_LEN)
        if size > self._pending:
            _check_pstr(self._prefix(mv, size))


# ---------------------------------------------------------------- helpers

# Maps a byte per piece to an ASCII binary digit: zero to "0", anything else to "1".
_FLAG_DIGITS = b"0" + b"1" * 255
_BYTE_BITS: list[tuple[bool, ...]] = [
    tuple(bool(b >> (7 - i) & 1) for i in range(8)) for b in range(256)
]


def bits_from_pieces(
    have: Iterable[int] | Sequence[bool] | bytes | bytearray | memoryview, num_pieces: int
) -> bytes:
    """A bitfield payload from piece indices, or from one flag per piece: a sequence of
    ``bool``, or a bytes-like object with one byte per piece (non-zero: have). Bytes
    are read as flags because that is how a have-array is usually kept; read as
    indices they could name no piece past 255."""
    if isinstance(have, bytes | bytearray | memoryview) or (
        isinstance(have, Sequence) and len(have) and isinstance(have[0], bool)
    ):
        flags = bytes(have)
    else:
        marks = bytearray(num_pieces)
        for i in have:
            if not 0 <= i < num_pieces:
                raise ValueError(f"piece {i} out of range for {num_pieces} pieces")
            marks[i] = 1
        flags = bytes(marks)
    if len(flags) != num_pieces:
        raise ValueError(f"{len(flags)} flags for {num_pieces} pieces")
    if not num_pieces:
        return b""
    size = (num_pieces + 7) // 8
    # Through a base-2 integer: the bit packing then runs in C, not a loop per piece.
    value = int(flags.translate(_FLAG_DIGITS), 2) << (size * 8 - num_pieces)
    return value.to_bytes(size, "big")


def pieces_from_bits(bits: bytes, num_pieces: int) -> list[bool]:
    """Validates as it unpacks, because a bitfield is only checkable once the torrent
    is known, which the parser is not told."""
    size = (num_pieces + 7) // 8
    if len(bits) != size:
        raise WireError(f"bitfield of {len(bits)} bytes for {num_pieces} pieces, expected {size}")
    spare = size * 8 - num_pieces
    if spare and bits[-1] & ((1 << spare) - 1):
        raise WireError(f"bitfield has spare bits set past piece {num_pieces - 1}")
    out = list(chain.from_iterable(map(_BYTE_BITS.__getitem__, bits)))
    del out[num_pieces:]
    return out


def allowed_fast_set(ip: str, info_hash: bytes, num_pieces: int, k: int = 10) -> list[int]:
    """The pieces a peer at ``ip`` may request while choked, in the order both ends
    derive them, so each side can compute the other's set.

    Only IPv4 (and IPv4-mapped IPv6) addresses have a canonical set; for other IPv6
    addresses the set is empty, which every peer must accept since the set is only
    an offer. ``info_hash`` is the 20 bytes sent in the handshake.
    """
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is None:
            return []
        addr = addr.ipv4_mapped
    k = min(k, num_pieces)
    if k <= 0:
        return []
    x = _U32.pack(int(addr) & 0xFFFFFF00) + info_hash
    chosen: list[int] = []
    seen: set[int] = set()
    while True:
        x = hashlib.sha1(x).digest()
        for (y,) in _U32.iter_unpack(x):
            index = y % num_pieces
            if index not in seen:
                seen.add(index)
                chosen.append(index)
                if len(chosen) == k:
                    return chosen
