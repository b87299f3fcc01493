"""One peer connection's protocol state, both directions, without I/O.

``PeerConnection.receive`` takes bytes from the socket and returns the events the
plugin acts on; the ``send_*`` methods update the state and append the message to
``outbox`` for the plugin to write. The rules that libtorrent holds a peer to live
here: no fast-extension message unless both sides set the fast bit, and (with it)
every request answered by a piece or a reject of exactly its length.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Container, Iterable
from typing import Any

import bencodepy

from . import wire
from .picker import BLOCK, Block
from .wire import WireError

KEEPALIVE_SECONDS = 60.0
DEFAULT_REQQ = 250  # what libtorrent assumes of a peer that names no ``reqq``
# Requests a peer may have waiting on us (libtorrent's ``max_allowed_in_request_queue``);
# more is abuse. A leecher that keeps a deep queue (Transmission asks for seconds of
# data at a time) is slowed down by a shallow one.
MAX_PEER_QUEUE = 2000
OUR_REQQ = MAX_PEER_QUEUE
# Requests we keep outstanding at one peer, as libtorrent sizes them: a slow start from
# START_QUEUE growing by one a block received until a second's download is no larger than
# the one before, then QUEUE_SECONDS of the peer's rate, within [MIN_QUEUE, MAX_QUEUE]
# and the peer's ``reqq``.
START_QUEUE = 4
MIN_QUEUE = 2
MIN_REQUEST_TIMEOUT = 2.0  # seconds (libtorrent's floor too)
MAX_QUEUE = 500
# Requests cancelled and not yet answered that a connection keeps track of (see
# Conn._cancelled): a peer that never answers its cancels costs no more than this.
MAX_CANCELLED = 2 * MAX_QUEUE
QUEUE_SECONDS = 3.0
STALL_MEMORY = 600.0  # seconds a peer's stalls are held against it (see note_stall)
UT_METADATA = 2  # our id of BEP 9's ut_metadata in the extension handshake
LT_DONTHAVE = 7  # our id of BEP 54's lt_donthave (libtorrent's own)
METADATA_PIECE = 16384  # the torrent's metadata is handed out in pieces of this size
# Messages that change nothing, or only flip a state back and forth (keep-alives, CHOKE,
# INTERESTED, a HAVE said again, a request while choked...), that a peer may send at
# once, and a second over time. An honest peer sends a few a minute, a few hundred when
# a choke voids its queue; a stream of them (200,000 INTERESTED / NOT_INTERESTED a
# MiB, each a choke round) is a peer taking our CPU: it is dropped.
CHATTER_BURST = 5000
CHATTER_RATE = 500.0
# An extension message is decoded by bencode in Python, about a microsecond a byte on
# the event loop: it costs one unit of chatter per EXT_CHATTER_BYTES (at least one), so
# a stream of large ones is dropped as soon as one of small ones would be.
EXT_CHATTER_BYTES = 64
# Blocks that come not asked for (late after a cancel or a choke: at most a pipeline's
# worth at a time) are thrown away; past this many bytes of them, and a quarter of
# what the peer sent that was asked for, the peer is dropped: one streaming blocks
# nobody asked for cost a unit of chatter each, 8 MB/s of them for as long as it liked.
UNASKED_BYTES = 16 * 1024 * 1024
# A HASHES answer costs one unit of chatter per HASHES_CHATTER_BYTES of it (and one):
# 53 bytes ask for up to 256 KiB, and a peer that asked for them over and over, reading
# the answers, had them built and sent at a gigabyte a second, a leecher beside it
# served a twelfth as fast. What a peer needs is each file's piece layer once (runs of
# 512 hashes: 9 units each), far inside the burst.
HASHES_CHATTER_BYTES = 2048
# Past these, an extension handshake or a ut_metadata message breaks the protocol.
# libtorrent's handshakes are a few hundred bytes; a ut_metadata message is a small
# dictionary and, in a data message, at most 16 KiB of the metadata (libtorrent drops a
# peer that sends one of more than 17 KiB).
MAX_EXT_HANDSHAKE = 16 * 1024
MAX_UT_METADATA = 17 * 1024
# Pieces a peer may let us ask for while it chokes us (ALLOWED_FAST) that are kept:
# libtorrent offers 5, BEP 6 suggests 10. Each pick while choked walks them, so a peer
# naming every piece of a large torrent would make every pick walk them all; past this
# many, more are ignored (and count as chatter).
MAX_ALLOWED_FAST = 64
# Events whose number is bounded by something else (the pieces, our requests, the
# peer's queue, how fast it reads our answers): no chatter, however many. Not CANCEL:
# a REQUEST and its CANCEL change nothing in the end, and each CANCEL looks through the
# peer's queue (up to MAX_PEER_QUEUE): a stream of such pairs behind a full queue took
# 2 s of CPU a MiB. (libtorrent cancels a few hundred blocks at the end of a download.)
_USEFUL: frozenset[type] = frozenset({
    wire.Handshake, wire.Bitfield, wire.HaveAll, wire.HaveNone, wire.Have, wire.Piece,
    wire.Request, wire.RejectRequest, wire.HashRequest})


class DontHave:
    """The peer no longer has a piece it said it had (BEP 54's ``lt_donthave``, an
    extension message whose id the connection negotiated): already taken out of
    ``peer_has`` when this is returned."""

    __slots__ = ("piece",)

    def __init__(self, piece: int) -> None:
        self.piece = piece

    def __repr__(self) -> str:
        return f"DontHave(piece={self.piece})"


class MetadataRequest:
    """The peer asked for a piece of the metadata (BEP 9's ut_metadata, msg_type 0).
    Answered by :meth:`PeerConnection.send_metadata` when the plugin takes it, not when
    the request is read: one 31-byte request makes up to 16 KiB of answer, so the
    answers must wait, as the blocks do, for the peer to read them (a read of a few
    thousand requests, answered at once, was 80 MB queued for a peer that reads none).
    ``piece`` is None when the request named no number."""

    __slots__ = ("piece",)

    def __init__(self, piece: int | None) -> None:
        self.piece = piece

    def __repr__(self) -> str:
        return f"MetadataRequest(piece={self.piece})"


Event = wire.Event | DontHave | MetadataRequest


class PeerConnection:
    """The state of one connection; ``info_hashes`` are the keys it may use (a hybrid
    has two: the v1 hash, then the truncated v2 one)."""

    def __init__(
        self,
        info_hashes: tuple[bytes, ...],
        peer_id: bytes,
        piece_sizes: list[int],
        *,
        v2: bool,
        outgoing_hash: bytes | None = None,
        views: bool = False,
        metadata: bytes | None = None,
        listen_port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``views``: blocks are handed out as views of the buffer given to
        :meth:`receive`, valid until the caller reuses it (see ``wire.Parser``).
        ``metadata``: the torrent's info dictionary, handed out to peers that ask for it
        (BEP 9: a leecher that has only the info hash, from a magnet link).
        ``listen_port``: where we take connections, told in the extension handshake
        (``p``), so that a peer we dialled may dial us back (0: we take none)."""
        self._clock = clock
        self.listen_port = listen_port
        self.remote_port = 0  # where the peer says it takes connections (its ``p``; 0: unsaid)
        self.metadata = metadata
        self.remote_ut_metadata = 0  # its id of ut_metadata (0: it has none)
        self._metadata_piece: int | None = None  # of the ut_metadata request just read
        self.remote_donthave = 0  # its id of lt_donthave (0: it has none)
        self.info_hashes = info_hashes
        self.peer_id = peer_id
        self.piece_sizes = piece_sizes
        self.num_pieces = len(piece_sizes)
        self.v2 = v2
        self.parser = wire.Parser(handshake=True, bitfield_bytes=(self.num_pieces + 7) // 8,
                                  views=views)
        self.outbox: list[bytes | memoryview] = []
        self.reserved = wire.make_reserved(extended=True, fast=True, v2=v2)
        self.info_hash: bytes | None = outgoing_hash
        self.remote_id: bytes | None = None
        self.handshaken = False
        self.fast = False
        self.extended = False
        self.am_choking = True
        self.am_interested = False
        self.peer_choking = True
        self.unchoked_us_at = 0.0  # when the peer last unchoked us (monotonic)
        self.peer_interested = False
        self.peer_has = bytearray(self.num_pieces)
        self.peer_count = 0  # pieces it has
        self.told_pieces = False  # it sent its BITFIELD, HAVE_ALL or HAVE_NONE (or a HAVE)
        # Ours is sent (send_bitfield): BEP 3 and 6 want it, or HAVE_ALL / HAVE_NONE, first
        # after the handshakes. Messages made before (REJECTs of requests that came with
        # the peer's handshake, HAVEs of pieces just verified) wait behind it.
        self.sent_pieces = False
        self._early: list[bytes | memoryview] = []
        self.reqq = DEFAULT_REQQ
        self.allowed_fast: set[int] = set()  # pieces it lets us ask for while choked
        self.given_fast: set[int] = set()  # pieces we let it ask for while we choke it
        self.our_requests: dict[Block, float] = {}  # asked, not yet answered -> when
        # Requests we cancelled on a fast connection, not yet answered: the peer answers
        # each with its block or a REJECT, in order, before it answers the block asked
        # again. A REJECT of a cancel was taken for the answer to the block asked again
        # since (by piece, begin and length alone): that request was dropped, and the
        # piece not asked of the peer again until its next unchoke (10 s without a
        # request where it was the only seeder). Block -> answers still to come.
        self._cancelled: dict[Block, int] = {}
        self.peer_requests: deque[Block] = deque()  # it asked, not yet served
        self.last_received = clock()
        self.made_at = self.last_received  # (of peers waiting alike, the oldest is unchoked first)
        self.last_sent = self.last_received
        self._chatter = float(CHATTER_BURST)  # what it may still send of CHATTER_BURST
        self._chatter_at = self.last_received
        self.last_block = 0.0  # when the last block we asked for came (monotonic)
        self._fragment_at = 0.0  # when part of a message last came (a block on its way)
        # How long the peer keeps us waiting for a block (from the request, or from its
        # last block when it works through a queue): smoothed, and its mean deviation,
        # as TCP times its round trips; from them the time out of a request.
        self._wait_mean = 0.0
        self._wait_dev = 0.0
        self._waits = 0
        # It let requests time out: asked for one block at a time, given none asked of
        # others (the end game), until a block of it comes (libtorrent's snubbed peer).
        self.snubbed = False
        self.downloaded = 0  # bytes of the blocks we asked for that came
        self.unasked = 0  # bytes of blocks that came not asked for (late after a cancel)
        self.slow_start = True
        self._wanted_queue = START_QUEUE
        self._last_second = 0.0  # bytes a second that came between the last two ticks
        self._tick_downloaded = 0
        self._rate = 0.0  # bytes a second, smoothed over the last ticks
        self._tick_at = self.last_received
        self.unchoked_at = 0.0  # when we last unchoked it
        self._stalls = 0  # times it lost its unchoke slot for reading nothing we sent
        self._stalled_at = 0.0  # the last of them
        if outgoing_hash is not None:
            self._send_first(wire.handshake(outgoing_hash, peer_id, self.reserved))

    # -- helpers -------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        (self.outbox if self.sent_pieces else self._early).append(data)
        self.last_sent = self._clock()

    def _send_first(self, data: bytes) -> None:
        """A handshake (BitTorrent's or the extension protocol's): before our pieces."""
        self.outbox.append(data)
        self.last_sent = self._clock()

    def take_outbox(self) -> list[bytes | memoryview]:
        out, self.outbox = self.outbox, []
        return out

    @property
    def is_seed(self) -> bool:
        return self.peer_count == self.num_pieces

    def _valid_block(self, piece: int, begin: int, length: int) -> bool:
        return (0 <= piece < self.num_pieces and begin >= 0 and 0 < length <= BLOCK
                and begin + length <= self.piece_sizes[piece])

    # -- receiving -------------------------------------------------------------------------
    def receive(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """The events the plugin acts on; raises WireError when the peer broke the
        protocol (the connection is to be closed)."""
        now = self.last_received = self._clock()
        held = self.parser.held
        # The chatter budget (a token bucket) refilled for the time since the last feed;
        # a peer that runs past it breaks the protocol, at the message that does.
        budget = min(CHATTER_BURST, self._chatter + (now - self._chatter_at) * CHATTER_RATE)
        self._chatter_at = now
        out: list[Event] = []
        try:
            for ev in self.parser.feed(data):
                if self._apply(ev):
                    if type(ev) in _USEFUL:
                        out.append(ev)
                        if type(ev) is wire.HashRequest and budget < 0:
                            raise WireError("hash requests past the chatter budget "
                                            "(each one rejected counts)")
                        continue
                    if type(ev) is wire.Extended and ev.ext_id == LT_DONTHAVE:
                        out.append(DontHave(int.from_bytes(ev.payload, "big")))
                    elif type(ev) is wire.Extended and ev.ext_id == UT_METADATA:
                        out.append(MetadataRequest(self._metadata_piece))
                    else:
                        out.append(ev)
                # It changed nothing, or flipped a state, suggested, used an extension.
                if type(ev) is wire.Extended:
                    budget -= 1 + len(ev.payload) // EXT_CHATTER_BYTES
                else:
                    budget -= 1
                if budget < 0:
                    raise WireError(f"more than {CHATTER_BURST} messages that change "
                                    f"nothing or flip a state back and forth, or more "
                                    f"than {CHATTER_RATE:.0f} a second (an extension "
                                    f"message counts one per {EXT_CHATTER_BYTES} bytes)")
        finally:
            self._chatter = budget
        if self.parser.held and self.parser.held != held:
            self._fragment_at = now  # more of a block (or another message) on its way
        return out

    def _answer_key(self, ev: wire.Handshake) -> bytes:
        """The key an incoming handshake is answered with: the one it used, but for a
        hybrid's v1 hash with the upgrade bit (BEP 52), answered with the v2 one, as
        libtorrent answers it. Answered with the v1 hash, a libtorrent that had learnt
        meanwhile (from a tracker's v2 announce) that the peer speaks v2 expected the v2
        hash and closed with "invalid info-hash": a tracker's leecher never connected."""
        keys = self.info_hashes
        if len(keys) == 2 and ev.info_hash == keys[0] and wire.supports_v2(ev.reserved):
            return keys[1]
        return ev.info_hash

    def _apply(self, ev: wire.Event) -> bool:
        if type(ev) is wire.Piece and self.handshaken:  # a download's message, tested
            # first; dropped when not asked for (late after a cancel, or unsolicited)
            n = len(ev.data)
            if self._cancelled:
                # (its bytes are good all the same: taken for a request asked again)
                self._answered_cancel((ev.piece, ev.begin, n))
            asked = self.our_requests.pop((ev.piece, ev.begin, n), None)
            if asked is None:
                if not self._valid_block(ev.piece, ev.begin, n):
                    # (no piece has it: not a late copy but a peer that is wrong; as
                    # libtorrent, which closes on such a block too)
                    raise WireError(f"block out of range: piece {ev.piece}, {n} bytes at {ev.begin}")
                self.unasked += n
                if self.unasked > UNASKED_BYTES + self.downloaded // 4:
                    raise WireError(f"{self.unasked} bytes of blocks not asked for (against "
                                    f"{self.downloaded} asked for)")
                return False
            self._waited(self.last_received - max(asked, self.last_block, self._fragment_at))
            self.last_block = self.last_received
            self.snubbed = False
            self.downloaded += n
            if self.slow_start and self._wanted_queue < MAX_QUEUE:
                self._wanted_queue += 1
            return True
        if type(ev) is wire.Request and self.handshaken:  # seeding's message, tested next
            return self._request(ev)
        if isinstance(ev, wire.Handshake):
            if ev.info_hash not in self.info_hashes:
                raise WireError("handshake for a torrent we do not serve")
            if ev.peer_id == self.peer_id:
                if self.info_hash is None:
                    # Answered first, as libtorrent does: the side that dialled (us, at
                    # an address of ours) learns it too, and dials it no more.
                    self._send_first(wire.handshake(ev.info_hash, self.peer_id, self.reserved))
                raise wire.Ourselves("a connection to ourselves")
            if self.info_hash is None:  # incoming: answer with the key it used
                self.info_hash = self._answer_key(ev)
                self._send_first(wire.handshake(self.info_hash, self.peer_id, self.reserved))
            self.remote_id = ev.peer_id
            self.handshaken = True
            self.fast = wire.supports_fast(ev.reserved)
            self.extended = wire.supports_extended(ev.reserved)
            if self.extended:
                ours: dict[bytes, int] = {b"lt_donthave": LT_DONTHAVE}
                hello: dict[bytes, object] = {b"m": ours, b"reqq": OUR_REQQ, b"v": b"pieced-peer"}
                if self.metadata is not None:
                    ours[b"ut_metadata"] = UT_METADATA
                    hello[b"metadata_size"] = len(self.metadata)
                if self.listen_port:
                    hello[b"p"] = self.listen_port
                self._send_first(wire.extended(0, bencodepy.encode(hello)))
            return True
        if not self.handshaken:
            raise WireError("message before the handshake")
        fast_only = (wire.HaveAll, wire.HaveNone, wire.SuggestPiece, wire.RejectRequest,
                     wire.AllowedFast)
        if isinstance(ev, fast_only) and not self.fast:
            raise WireError(f"{type(ev).__name__} without the fast extension")
        if isinstance(ev, (wire.Bitfield, wire.HaveAll, wire.HaveNone)):
            # One of them, before any HAVE (BEP 3, BEP 6): each costs work in proportion
            # to the pieces, and a stream of them would take the peer's CPU for ever.
            if self.told_pieces:
                raise WireError(f"{type(ev).__name__} after the peer said what it has")
            self.told_pieces = True
        elif isinstance(ev, wire.Have):
            self.told_pieces = True
        if isinstance(ev, wire.Bitfield):
            have = wire.pieces_from_bits(ev.bits, self.num_pieces)
            self.peer_has = bytearray(have)
            self.peer_count = self.peer_has.count(1)
        elif isinstance(ev, wire.HaveAll):
            self.peer_has = bytearray(b"\x01" * self.num_pieces)
            self.peer_count = self.num_pieces
        elif isinstance(ev, wire.HaveNone):
            self.peer_has = bytearray(self.num_pieces)
            self.peer_count = 0
        elif isinstance(ev, wire.Have):
            if not 0 <= ev.piece < self.num_pieces:
                raise WireError(f"HAVE of piece {ev.piece} of {self.num_pieces}")
            if self.peer_has[ev.piece]:
                return False
            self.peer_has[ev.piece] = 1
            self.peer_count += 1
        elif isinstance(ev, wire.KeepAlive):
            return False  # (the time it came is noted above)
        elif isinstance(ev, wire.Choke):
            if self.peer_choking:
                return False  # said again: nothing changes (a stream of them cost a pick each)
            self.peer_choking = True
            if not self.fast:  # without the fast extension a choke drops every request
                self.our_requests.clear()
        elif isinstance(ev, wire.Unchoke):
            if not self.peer_choking:
                return False
            self.peer_choking = False
            self.unchoked_us_at = self.last_received
        elif isinstance(ev, wire.Interested):
            if self.peer_interested:
                return False  # said again: nothing changes, nothing to do
            self.peer_interested = True
        elif isinstance(ev, wire.NotInterested):
            if not self.peer_interested:
                return False
            self.peer_interested = False
        elif isinstance(ev, wire.Request):
            return self._request(ev)
        elif isinstance(ev, wire.Cancel):
            blk = (ev.piece, ev.begin, ev.length)
            try:
                self.peer_requests.remove(blk)
            except ValueError:
                return False  # already served, or being read: the piece goes out
            if self.fast:
                self._send(wire.reject_request(*blk))
        elif isinstance(ev, wire.RejectRequest):
            blk = (ev.piece, ev.begin, ev.length)
            if self._answered_cancel(blk) or self.our_requests.pop(blk, None) is None:
                return False
        elif isinstance(ev, wire.AllowedFast):
            if (not 0 <= ev.piece < self.num_pieces or ev.piece in self.allowed_fast
                    or len(self.allowed_fast) >= MAX_ALLOWED_FAST):
                return False
            self.allowed_fast.add(ev.piece)
        elif isinstance(ev, wire.Extended):
            limit = (MAX_EXT_HANDSHAKE if ev.ext_id == 0
                     else MAX_UT_METADATA if ev.ext_id == UT_METADATA else None)
            if limit is not None and len(ev.payload) > limit:
                what = "extension handshake" if ev.ext_id == 0 else "ut_metadata message"
                raise WireError(f"{what} of {len(ev.payload)} bytes (at most {limit})")
            if ev.ext_id == 0:
                try:
                    msg = bencodepy.decode(ev.payload)
                except Exception:
                    raise WireError("extension handshake is not bencode") from None
                if isinstance(msg, dict):
                    reqq = msg.get(b"reqq")
                    if isinstance(reqq, int) and reqq > 0:
                        self.reqq = min(reqq, 2000)
                    port = msg.get(b"p")
                    if isinstance(port, int) and 0 < port < 65536:
                        self.remote_port = port
                    m = msg.get(b"m")
                    if isinstance(m, dict):  # (a later handshake may change or drop an id)
                        self.remote_ut_metadata = _ext_id(m, b"ut_metadata", self.remote_ut_metadata)
                        self.remote_donthave = _ext_id(m, b"lt_donthave", self.remote_donthave)
            elif ev.ext_id == UT_METADATA:
                return self._metadata_asked(ev.payload)
            elif ev.ext_id == LT_DONTHAVE:
                # As libtorrent: a message of another size, a piece out of range, or one
                # it never said it had, is ignored (and counts as chatter).
                if len(ev.payload) != 4:
                    return False
                piece = int.from_bytes(ev.payload, "big")
                if piece >= self.num_pieces or not self.peer_has[piece]:
                    return False
                self.peer_has[piece] = 0
                self.peer_count -= 1
        elif isinstance(ev, wire.SuggestPiece) and not 0 <= ev.piece < self.num_pieces:
            return False
        return True

    def _metadata_asked(self, payload: bytes) -> bool:
        """A ut_metadata message: True for a request we can answer (its piece kept for
        the MetadataRequest event); what else comes (data, rejects: we ask for none, or
        a request when we offered no metadata or the peer no id to answer with) is left
        alone."""
        if self.metadata is None or not self.remote_ut_metadata:
            return False
        try:
            msg = bencodepy.decode(payload)
        except Exception:  # (a data message has bytes after its dictionary)
            return False
        if not isinstance(msg, dict) or msg.get(b"msg_type") != 0:
            return False
        piece = msg.get(b"piece")
        self._metadata_piece = piece if isinstance(piece, int) else None
        return True

    def send_metadata(self, ev: MetadataRequest) -> None:
        """Answer a request with its piece of the metadata, or reject one past the end."""
        piece = ev.piece
        if self.metadata is None or not self.remote_ut_metadata:
            return  # (the peer's later handshake took its id back)
        size = len(self.metadata)
        if piece is not None and piece >= 0 and piece * METADATA_PIECE < size:
            head = bencodepy.encode({b"msg_type": 1, b"piece": piece, b"total_size": size})
            chunk = self.metadata[piece * METADATA_PIECE : (piece + 1) * METADATA_PIECE]
            self._send(wire.extended(self.remote_ut_metadata, head + chunk))
        else:
            reject = {b"msg_type": 2, b"piece": piece if piece is not None else 0}
            self._send(wire.extended(self.remote_ut_metadata, bencodepy.encode(reject)))

    def _request(self, ev: wire.Request) -> bool:
        """Queue a peer's request; False (with a reject under the fast extension) when it
        asks while we choke it, or its queue is full."""
        if not self._valid_block(ev.piece, ev.begin, ev.length):
            raise WireError(f"request out of range: {ev}")
        blk = (ev.piece, ev.begin, ev.length)
        if (self.am_choking and ev.piece not in self.given_fast) or \
                len(self.peer_requests) >= MAX_PEER_QUEUE:
            if self.fast:
                self._send(wire.reject_request(*blk))
            return False
        self.peer_requests.append(blk)
        return True

    # -- sending ----------------------------------------------------------------------------
    def send_bitfield(self, have: bytearray) -> None:
        """Our pieces right after the handshake (HAVE_ALL / HAVE_NONE where allowed)."""
        count = len(have) - have.count(0)
        if self.fast and count == self.num_pieces:
            self._send_first(wire.have_all())
        elif self.fast and count == 0:
            self._send_first(wire.have_none())
        elif count:
            self._send_first(wire.bitfield(wire.bits_from_pieces(have, self.num_pieces)))
        self.sent_pieces = True
        self.outbox += self._early
        self._early = []

    def send_interested(self, interested: bool) -> None:
        if interested != self.am_interested:
            self.am_interested = interested
            self._send(wire.interested() if interested else wire.not_interested())

    def note_stall(self) -> None:
        """It lost its unchoke slot for reading nothing we sent: it waits behind the
        peers that did not, and is the first let go when a place is wanted, for
        STALL_MEMORY seconds from its last stall (a leecher whose disk was busy a while,
        on a seed that runs for days, is not last in line for good)."""
        self._stalls += 1
        self._stalled_at = self._clock()

    @property
    def stalls(self) -> int:
        """Its stalls, counted while it stalled again within STALL_MEMORY of the last."""
        if self._stalls and self._clock() - self._stalled_at >= STALL_MEMORY:
            self._stalls = 0
        return self._stalls

    def send_choke(self, choke: bool) -> None:
        if choke == self.am_choking:
            return
        self.am_choking = choke
        if not choke:
            self.unchoked_at = self._clock()
            self._send(wire.unchoke())
            return
        self._send(wire.choke())
        # Requests it had queued are void; with the fast extension each gets a reject,
        # except those for pieces it may ask for while choked.
        keep: deque[Block] = deque()
        for blk in self.peer_requests:
            if blk[0] in self.given_fast:
                keep.append(blk)
            elif self.fast:
                self._send(wire.reject_request(*blk))
        self.peer_requests = keep

    def send_request(self, blk: Block) -> None:
        self.send_requests((blk,))

    def send_requests(self, blocks: Iterable[Block]) -> None:
        """Several requests, as one piece of the outbox (a download sends 65,536 a GiB)."""
        now = self._clock()
        ours = self.our_requests
        msgs = []
        for blk in blocks:
            ours[blk] = now
            msgs.append(wire.request(*blk))
        if msgs:
            self._send(b"".join(msgs))

    def send_cancel(self, blk: Block) -> None:
        if self.our_requests.pop(blk, None) is not None:
            self._send(wire.cancel(*blk))
            if self.fast:
                cancelled = self._cancelled
                cancelled[blk] = cancelled.get(blk, 0) + 1
                if len(cancelled) > MAX_CANCELLED:  # (a peer that answers none of them)
                    del cancelled[next(iter(cancelled))]

    def _answered_cancel(self, blk: Block) -> bool:
        """Whether this answer to ``blk`` (its block or a REJECT) is the one owed to a
        request we cancelled: the peer answers in order, that one first."""
        left = self._cancelled.get(blk)
        if left is None:
            return False
        if left > 1:
            self._cancelled[blk] = left - 1
        else:
            del self._cancelled[blk]
        return True

    def send_have(self, piece: int) -> None:
        self._send(wire.have(piece))

    def send_dont_have(self, piece: int) -> None:
        """Tell a peer that supports ``lt_donthave`` we no longer have ``piece``."""
        if self.remote_donthave and self.handshaken:
            self._send(wire.extended(self.remote_donthave, piece.to_bytes(4, "big")))

    def send_suggest(self, piece: int) -> None:
        if self.fast:
            self._send(wire.suggest_piece(piece))

    def send_allowed_fast(self, piece: int) -> None:
        if self.fast and piece not in self.given_fast:
            self.given_fast.add(piece)
            self._send(wire.allowed_fast(piece))

    def send_reject(self, blk: Block) -> None:
        if self.fast:
            self._send(wire.reject_request(*blk))

    def send_piece(self, blk: Block, data: bytes | memoryview) -> None:
        if self.sent_pieces:
            self.outbox.append(wire.piece_header(*blk))
            self.outbox.append(data)
        else:  # (kept past the caller's buffer, which may be a ring's: a copy)
            self._early += (wire.piece_header(*blk), bytes(data))
        self.last_sent = self._clock()

    def send_hash_reject(self, ev: wire.HashRequest) -> None:
        # Chatter: a legitimate peer asks for hashes it can be given (of a v2 torrent,
        # its piece layers), and a stream of requests answered so costs a flush each.
        self._chatter -= 1
        self._send(wire.hash_reject(ev.pieces_root, ev.base_layer, ev.index, ev.length,
                                    ev.proof_layers))

    def send_hashes(self, ev: wire.HashRequest, hashes: bytes) -> None:
        """Raises WireError, and sends nothing, once the peer is past its chatter
        budget: the requests of one read all come before any is answered."""
        if self._chatter < 0:
            raise WireError("hash requests past the chatter budget (each one answered "
                            f"counts one per {HASHES_CHATTER_BYTES} bytes of hashes)")
        self._chatter -= 1 + len(hashes) // HASHES_CHATTER_BYTES
        self._send(wire.hashes(ev.pieces_root, ev.base_layer, ev.index, ev.length,
                               ev.proof_layers, hashes))

    def late_requests(self, now: float, timeout: float) -> list[Block]:
        """Requests to give up on: asked ``timeout`` seconds ago or more, with no block
        from the peer since (nor part of one). A peer working through a deep queue at its
        own pace keeps sending blocks, so none of its requests is late (as in
        libtorrent); one that stopped sending has all its old ones late."""
        since = max(self.last_block, self._fragment_at)
        return [b for b, t in self.our_requests.items() if now - max(t, since) >= timeout]

    def _waited(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        if not self._waits:
            self._wait_mean = seconds
        else:
            self._wait_dev += (abs(seconds - self._wait_mean) - self._wait_dev) / 4
            self._wait_mean += (seconds - self._wait_mean) / 8
        self._waits += 1

    def request_timeout(self, longest: float) -> float:
        """How long a request may wait, from how long this peer has kept us waiting so
        far: the mean and four deviations, at least MIN_REQUEST_TIMEOUT and at most
        ``longest`` (as libtorrent's ``request_timeout()``). A peer that serves at once
        and then goes quiet (a hung disk, a stopped process) is found out in seconds,
        not after ``longest``; one that always takes long is given as long."""
        if not self._waits:
            return longest
        mean, dev = self._wait_mean, self._wait_dev
        wait = mean * 1.2 if self._waits < 2 else mean + 4 * dev
        return min(longest, max(MIN_REQUEST_TIMEOUT, wait))

    def held(self, seconds: float) -> None:
        """We read nothing of the peer for ``seconds``, held up on our side (the daemon
        slow to take the blocks it sent, stopped or busy): that time was not the peer's.
        Its clocks (silence, requests late, the waits it keeps us) stop for it: what it
        sent meanwhile waited in our socket. (Counted, a daemon stalled for half a
        minute had every seeder snubbed and its blocks asked again of others, a fifth
        of the download fetched twice; for two minutes, the seeder dropped as silent.)"""
        if seconds <= 0:
            return
        now = self._clock()
        self.last_received = min(now, self.last_received + seconds)
        if self.last_block:
            self.last_block = min(now, self.last_block + seconds)
        if self._fragment_at:
            self._fragment_at = min(now, self._fragment_at + seconds)
        for blk, asked in self.our_requests.items():
            self.our_requests[blk] = min(now, asked + seconds)

    def give_up_late(self, now: float, longest: float) -> list[Block]:
        """Cancel the requests the peer let time out (see :meth:`request_timeout`) and
        snub it; returns them, to be asked of others."""
        late = self.late_requests(now, self.request_timeout(longest))
        for blk in late:
            self.send_cancel(blk)
        if late:
            self.snubbed = True
        return late

    def keepalive_due(self, now: float) -> bool:
        return now - self.last_sent >= KEEPALIVE_SECONDS

    def send_keepalive(self) -> None:
        self._send(wire.keep_alive())

    @property
    def queue_size(self) -> int:
        """How many of our requests to keep outstanding at this peer now."""
        return 1 if self.snubbed else min(self._wanted_queue, self.reqq)

    def second_tick(self) -> None:
        """Once a second: the download rate, and from it the queue size (libtorrent's
        ``update_desired_queue_size``). Slow start ends once a second brings no more than
        the one before (and we are not choked: nothing was asked then)."""
        now = self._clock()
        seconds = max(now - self._tick_at, 0.001)
        self._tick_at = now
        got = self.downloaded - self._tick_downloaded
        self._tick_downloaded = self.downloaded
        rate = got / seconds
        self._rate = (self._rate + rate) / 2 if self._rate else rate
        if (self.slow_start and not self.peer_choking and self._last_second > 0
                and self._last_second + 5000 >= rate):
            self.slow_start = False
        self._last_second = rate
        if not self.slow_start:
            want = int(QUEUE_SECONDS * self._rate / BLOCK)
            self._wanted_queue = max(MIN_QUEUE, min(MAX_QUEUE, want))

    def can_request(self, piece: int) -> bool:
        return not self.peer_choking or (self.fast and piece in self.allowed_fast)


def _ext_id(m: dict[Any, Any], name: bytes, old: int) -> int:
    """A peer's id for an extension from its handshake's ``m``: 0 turns it off, a value
    that is not an id leaves the old one (BEP 10)."""
    v = m.get(name, old)
    return v if isinstance(v, int) and 0 <= v < 256 else old


def choke_round(conns: Iterable[PeerConnection], slots: int,
                stalled: Container[PeerConnection] = (), rotate: bool = True,
                ) -> tuple[list[PeerConnection], list[PeerConnection]]:
    """This round's changes of who we choke, as (to choke, to unchoke): peers that lost
    interest are choked; while interested peers wait, the ``stalled`` ones (they take
    nothing we send) give their slots up, or else (if ``rotate``) the one unchoked
    longest gives its slot to the one that waited longest; free slots go to the longest
    waiting, those that stalled before last."""
    conns = list(conns)
    interested = [c for c in conns if c.peer_interested]
    choke = [c for c in conns if not c.peer_interested and not c.am_choking]
    unchoked = sorted((c for c in interested if not c.am_choking), key=lambda c: c.unchoked_at)
    waiting = sorted((c for c in interested if c.am_choking),
                     key=lambda c: (c in stalled, c.stalls, c.unchoked_at, c.made_at))
    if waiting:
        stuck = [c for c in unchoked if c in stalled][: len(waiting)]
        if stuck:
            for c in stuck:
                c.note_stall()
            choke += stuck
            unchoked = [c for c in unchoked if c not in stuck]
        elif rotate and len(unchoked) >= slots:
            choke.append(unchoked.pop(0))
    return choke, waiting[: max(0, slots - len(unchoked))]
