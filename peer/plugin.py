"""``pieced-peer``: download and seed a torrent over the BitTorrent wire, with the
pieced daemon as its storage.

Blocks from peers go to the daemon through the shared-memory ring
(``write_block_direct``); the daemon verifies each piece and says so with a
``piece_verified`` or ``piece_failed`` event, and only then is the piece announced
(HAVE) to peers. Blocks asked of us are read from the daemon, several at a time, and
pieces the daemon holds in its cache are offered to peers with SuggestPiece.

The protocol lives in ``wire.py`` (bytes <-> messages) and ``conn.py`` (one
connection's rules); ``picker.py`` chooses what to ask for. This file is the asyncio
edge: sockets, the daemon client, timers and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from pieced.config.args import positive_int, seconds
from pieced.config.descriptors import raise_open_files
from pieced.protocol.client import DEFAULT_SOCKET, IOV_MAX, AsyncClient
from pieced.storage.errors import (
    AccessDenied,
    AlreadyRegistered,
    PiecedError,
    TooLarge,
    UnknownTorrent,
)
from pieced.storage.metainfo import Metainfo, parse, read_metainfo

from . import wire
from .blame import Attribution
from .conn import DontHave, MetadataRequest, PeerConnection, choke_round
from .hashes import HashServer
from .picker import Block, Picker, where
from .tracker import Tracker, printable
from .utp import refusal
from .wire import Ourselves, WireError

log = logging.getLogger("pieced.peer")

# What a peer's socket buffers before we parse it (asyncio's default, 64 KiB, wakes the
# loop every four blocks): the size of each connection's receive buffer (Inbox).
STREAM_LIMIT = 1024 * 1024
# What a connection reads into until its peer has handshaken: a connection refused at
# --max-peers, or one that never says who it is, costs this, not STREAM_LIMIT.
FIRST_INBOX = 64 * 1024
# Linux's TCP_QUICKACK (12): see Inbox.buffer_updated. None where the system has none.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
TURN_EVENTS = 255  # one peer's events handled between two turns of the loop, less one
READ_BYTES = 1024 * 1024  # the most one read from the daemon asks for: 64 blocks a round trip
# Bytes of blocks for one peer read from the daemon and not yet taken by its socket: no
# read starts past it (a peer that asks for 500 blocks and reads none held 8 MiB of
# them, and every peer may); reads go on once it takes its share (SEND_LOW_WATER).
SEND_AHEAD = 2 * 1024 * 1024
# Reads from the daemon in flight for one peer's requests: at least a few (fewer, longer
# reads: the blocks of a piece asked for meanwhile join one), and for small pieces, which
# no read runs past, enough of them to fill SEND_AHEAD (8 reads of 16 KiB pieces kept a
# libtorrent leecher waiting on the daemon's round trips: 64 seeded 12,000 small files
# in 8.4-8.7 s, against 11.0-11.3 s).
READS_PER_PEER = (8, 64)
SEND_LOW_WATER = 256 * 1024
UNCHOKE_SLOTS = 8  # --upload-slots by default, as libtorrent's unchoke_slots_limit
CHOKE_INTERVAL = 10.0
REQUEST_TIMEOUT = 30.0  # the longest a request waits (PeerConnection.request_timeout)
ANNOUNCE_RETRY_FIRST = 10.0  # seconds after a failed announce, doubled at each failure
STOP_ANNOUNCE_TIMEOUT = 5.0  # seconds an exit waits for the trackers (libtorrent: 5 too)
# Seconds an exit waits for the daemon to take the blocks already sent to it (its pieces
# are then verified, not fetched again next time): a daemon that does not answer (a hung
# disk) must not hold a signal up.
STOP_DAEMON_TIMEOUT = 3.0
PEER_TIMEOUT = 120.0
DAEMON_QUIET_SECONDS = 30.0  # the daemon silent that long with requests waiting: said
# A connection whose handshake has not arrived by then is closed (libtorrent's
# handshake_timeout): one that says nothing holds a slot of max_peers and its buffer.
HANDSHAKE_TIMEOUT = 10.0
# A piece the daemon stops having verified this many times in one run (after we had it)
# is changed by another client over and over: two torrents giving one file different
# bytes, each re-fetching what the other's writes take back, for ever. The run stops.
LOSSES_PER_PIECE = 3
STALL_SECONDS = 5.0  # a peer that takes nothing we send for this long gives its slots up
# ... and for this long, while a peer that reads waits for a slot; a peer still choked
# that has taken nothing we sent (rejects of its requests) for this long waits last.
# A reader, however slow, takes some of what is on its way every moment.
LAG_SECONDS = 2.0
IDLE_SECONDS = 10.0  # a peer interested in nothing either way may give its place after
# A peer with pieces we want that has sent us no block for this long (it chokes us, or
# lets our requests time out), and that we do not serve, may give its place to a
# newcomer: peers that choke us for ever, filling every place, kept a seed that came
# later from ever being dialled or let in (libtorrent turns over such peers too).
UNPRODUCTIVE_SECONDS = 30.0
# Places are shared out between addresses (an IPv4 address, or an IPv6 /64: one host, or
# one household behind its router). When every place is held and none idles, a
# newcomer takes a place from the address holding the most, when that holds at least
# two more than the newcomer's would; a newcomer from the address holding the most takes
# the place of its least productive peer connected this long or longer (the time for a
# newcomer's first unchoke and its first blocks). Peers that handshake, take a block now
# and then, and so neither idle nor stall, held every place and shut every other peer
# out for as long as they stayed; libtorrent lets a newcomer in by dropping a peer of
# lower rank too.
TURNOVER_SECONDS = 20.0
# Peers let in over --max-peers at once, waiting for their handshake to be given a place
# (or dropped), in all and from one address (see place_group): past it, newcomers are
# turned away at once (connections from one address that never handshake, made again
# as they time out, must not shut the others out).
UNPLACED = 8
UNPLACED_PER_ADDRESS = 2
# A connection that has not handshaken within this long (a peer handshakes at once, as
# soon as its connection is made) gives its place, or its wait for one, to a newcomer:
# connections from many addresses that never say a word, made again as they time out,
# held every place and every wait, and no leecher could get in.
SILENT_SECONDS = 3.0
OUT_LIMIT = 4 * 1024 * 1024  # unsent bytes for one peer before we wait for it to read
# Seconds between two looks at what the daemon has verified: other clients may recheck
# the torrent (failing pieces), or remove and add it again (its events then stop).
RECONCILE_INTERVAL = 5.0
# A download with no piece verified for this long, lacking pieces no connected peer has,
# says so (a warning, then again every WAITING_SAY_EVERY while it lasts): else it waits
# for peers that have them without a word (the progress line shows the count too).
WAITING_SECONDS = 20.0
WAITING_SAY_EVERY = 300.0
_REMOVED = "the torrent is no longer registered in the daemon (removed by another client)"
MAX_BAD_PIECES = 3  # pieces that failed with this peer's data before it is dropped
# Peers that dialled us from one address (an IPv4 address, an IPv6 /64) and were dropped
# for bad data, each under a peer id of its own, before the address is let in no more.
# A peer is known by its address and peer id, so that one liar behind an address shared
# with others is not held against them; a liar taking a new peer id at each connection
# was otherwise never shut out (each new one three more failed pieces: a download of
# 257 pieces, four times as long, 2,700 failures of one piece).
LIARS_PER_ADDRESS = 3
# Times one piece is tried with the same peer's data (its ban lifted when no other peer
# has it): a seeder whose copy has one rotten piece serves every other one, and is
# dropped for three bad pieces, not for one piece failed three times.
MAX_PIECE_TRIES = 3
BAD_PEERS_LISTED = 100  # peers named in the summary's bad_peers (the first ones)
SUGGESTS_PER_PEER = 8
CACHED_ASK_SECONDS = 1.0  # the daemon asked what it caches at most once a second
# A peer we dial (from --peer or a tracker) that cannot be reached, or whose connection
# ends while pieces are missing, is dialled again: after RETRY_FIRST seconds, twice as
# long after each attempt that brought no block, up to RETRY_MAX (libtorrent's wait).
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
# Two connections to one peer id opened this close together, before any block went over
# the first, are two dials crossing (two peers that found each other at once): one goes,
# as libtorrent decides (see Swarm._second_connection).
DUPLICATE_FRESH = 10.0
# A connection closed as a duplicate that dialled us gets our handshake first, gracefully
# closed, when no more than SAY_WHO_BYTES went to it in all (else the kernel kept what is
# unsent, megabytes of hash answers, for as long as a peer that reads nothing lasted);
# let go for good after SAY_WHO_SECONDS.
SAY_WHO_BYTES = 4096
SAY_WHO_SECONDS = 5.0
# How long the extension handshake of a connection that set the extension bit is waited
# for, to know where it listens, before its duplicate is decided without.
SAY_WHERE_SECONDS = 5.0
# An address that could not be reached this many times in a row (libtorrent's
# max_failcount is 3 too), when we know more addresses than we dial at once, is dialled
# again only every UNREACHED_RETRY seconds, after the others, or at once when a tracker
# names it again; one given with --peer as any other.
MAX_UNREACHED = 3
UNREACHED_RETRY = 300.0
CONNECT_TIMEOUT = 10.0
# Dials under way at once, per place of --max-peers still free: most addresses a tracker
# gives cannot be reached (behind a NAT, or gone), and a dial that is not answered holds
# a socket, nothing more, for up to CONNECT_TIMEOUT. One dial per place took 50 s to
# find 2 seeders among 300 dead addresses (libtorrent, which counts its half-open
# connections in its limit of 200: 0.1-16 s).
DIALS_PER_PLACE = 4
# Connections accepted in one go (the listening socket's backlog; asyncio accepts that
# many at a time before any is looked at), and descriptors held besides peers and dials
# (standard streams, the daemon's socket, the listening sockets, trackers): with
# DIALS_PER_PLACE, what --max-peers is lowered to fit the descriptor limit.
ACCEPT_BURST = 100
FDS_RESERVED = 32
# Seconds between two warnings that accepting a peer failed for want of descriptors
# (asyncio says so, with a traceback, for each connection it could not accept: tens of
# thousands of lines in a minute under a storm of connections).
ACCEPT_ERROR_SECONDS = 10.0
MAX_KNOWN = 1000  # addresses kept to dial; a tracker's further ones are left out


@dataclass
class Options:
    torrent: Path
    save_path: Path
    peers: list[tuple[str, int]] = field(default_factory=list)
    listen: tuple[str, int] | None = None
    seed: bool = False
    socket: str = DEFAULT_SOCKET
    max_peers: int = 50
    upload_slots: int = UNCHOKE_SLOTS  # peers unchoked at once; the others take turns
    # Seconds to wait for the daemon to come back when its connection breaks under way
    # (a restart: systemd's takes seconds), the peers kept meanwhile; 0 stops at once.
    daemon_wait: float = 60.0


DEFAULT_LISTEN_PORT = 6881  # without --listen, when trackers are to be told a port


class NoSources(Exception):
    """Nothing to download from or seed to: no peer, no listening socket, no tracker."""


class CannotListen(Exception):
    """``--listen``'s address cannot be bound (in use, or not this host's)."""


# Messages whose answer may be much larger than they are (hashes, the metadata): what
# they make us send is bounded by how fast the peer reads (``Swarm._sent``).
_ANSWERED = (wire.HashRequest, MetadataRequest)


def _kernel_unsent(transport: asyncio.Transport) -> int:
    """Bytes in the socket's send queue that the peer has not acknowledged (SIOCOUTQ):
    a slow reader takes some of them every moment, one that reads nothing none."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        return 0  # (closed by its peer a moment ago: its Peer is not dropped yet)
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                     b"\0\0\0\0"))[0]
        return queued
    except (OSError, ValueError):  # (ValueError: its descriptor closed meanwhile)
        return 0


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _pieces(n: int) -> str:
    return f"{n} piece" if n == 1 else f"{n} pieces"


def _every_interface(kind: int, port: int) -> socket.socket:
    """A socket bound to ``port`` of every interface: one IPv6 socket that takes IPv4
    too (``IPV6_V6ONLY`` off), so that both families have the same port, the one the
    system picks too; IPv4 alone where the host has no IPv6."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, kind)
        except OSError:
            if family == socket.AF_INET6:
                continue
            raise
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET6 and exc.errno in (errno.EADDRNOTAVAIL,
                                                           errno.EAFNOSUPPORT):
                continue  # (no IPv6 here)
            raise
        sock.setblocking(False)
        return sock
    raise OSError(errno.EAFNOSUPPORT, "no address family to listen with")


_LOCAL_NETS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10"))


def place_group(host: str) -> object:
    """The addresses that share one share of places: an IPv4 address, an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    return int(ip) >> 64 if ip.version == 6 else ip


def unmapped(host: str) -> str:
    """An IPv4 address as itself: the listening socket takes both families, so an IPv4
    peer arrives as ``::ffff:a.b.c.d``; known so, it would be another peer than the
    same address dialled (its record, its bans), and local to nobody."""
    if host.startswith("::ffff:"):
        with contextlib.suppress(ValueError):
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
            if mapped is not None:
                return str(mapped)
    return host


def is_local(host: str) -> bool:
    """An address on this machine or its local network (libtorrent's ``is_local``): such
    peers are dialled first, as libtorrent does; they are the nearest and fastest. A host
    name is not local until resolved."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in _LOCAL_NETS if net.version == ip.version)


def dial_order(peers: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """A tracker's peers in the order they are dialled: local ones first, each group in
    a random order (the seeds may come last in a long list)."""
    out = list(peers)
    random.shuffle(out)
    out.sort(key=lambda a: not is_local(a[0]))  # (stable: still shuffled)
    return out


class ElsewhereAlready(Exception):
    """The torrent is registered with another save path than the one given: nothing is
    downloaded or seeded from a folder the user did not name."""


class Stopped(Exception):
    """A run that ended on an error once under way: ``summary`` says what it did."""

    def __init__(self, message: str, summary: Summary) -> None:
        super().__init__(message)
        self.summary = summary


class DaemonLost(Stopped, ConnectionError):
    """The connection to the daemon broke."""


class _GaveUp(Exception):
    """The daemon did not come back within ``--daemon-wait``."""


class NoSourceLeft(Stopped):
    """Every peer the download could come from was dropped for sending bad data, and
    none can come (no listening socket, no tracker): waiting would be for ever."""


class StorageFailed(Stopped):
    """The daemon could not store or read the torrent (a full disk, a read-only or
    vanished file, EIO): like libtorrent, which pauses a torrent on a file error, the
    plugin stops, and says why, instead of waiting for pieces that cannot be stored."""


@dataclass(eq=False)
class Conduct:
    """What a source of data did, across its connections: the pieces that failed with
    its data. An address we dial has one (its :class:`Dial`'s); peers that dial us have
    one per IP address and peer id, since their port is new at each connection: a liar
    that hangs up and comes back is known again, and other peers behind the same address
    are not blamed for it. Blame is kept against these, not against connections (a
    connection holds a MiB of buffer)."""

    addr: str
    bad: int = 0  # pieces that failed with its data, over all its connections
    banned: set[int] = field(default_factory=set)  # pieces not to ask it for again
    tries: dict[int, int] = field(default_factory=dict)  # times each of those failed
    live: int = 0  # its connections open now
    ourselves: bool = False  # an address of ours (a tracker lists us under any of them)
    group: object = None  # a peer's that dialled us: the addresses it shares places with

    @property
    def dropped(self) -> bool:
        """Dropped for bad data, or found to be us: never dialled again, nor let in."""
        return self.bad >= MAX_BAD_PIECES or self.ourselves


@dataclass
class Dial:
    """What we know of an address we dial, across its connections."""

    conduct: Conduct
    fails: int = 0  # attempts in a row that brought no block
    due: float = 0.0  # when to dial it again (monotonic); 0: not waiting to
    busy: bool = False  # being dialled, or connected
    warned: bool = False  # told the user it closed before its handshake
    given: bool = False  # named by the user (--peer): never forgotten
    unreached: int = 0  # attempts in a row that found nobody (no connection at all)
    seed: bool = False  # seen to have every piece: not dialled while we have them too
    peer_id: bytes = b""  # who answered there last (one peer may have two addresses)
    # A hybrid's peer known to know it by its v2 hash (named by the v2 hash's announce,
    # or it dialled us with that hash): dialled with it, as libtorrent dials such a peer.
    # Dialled with the v1 hash, a libtorrent that had it from a v2 magnet link alone
    # (no v1 hash known until the metadata came) refused every dial. (See _dialled too.)
    v2: bool = False

    @property
    def dropped(self) -> bool:
        return self.conduct.dropped


@dataclass
class Summary:
    bytes_down: int = 0  # of blocks of pieces not had yet (again for a piece that failed)
    # Blocks that came for nothing: a piece had already (verified meanwhile, by this
    # process or another writing the same torrent into the daemon), or a block of a piece
    # under way received already (the end game asks some of two peers). As libtorrent's
    # redundant bytes: a download costs bytes_down + bytes_redundant of the peers' upload.
    bytes_redundant: int = 0
    bytes_up: int = 0
    seconds: float = 0.0
    peers: int = 0  # peers that completed a handshake
    pieces_failed: int = 0
    peers_dropped_for_bad_data: int = 0
    bad_peers: list[str] = field(default_factory=list)  # the first BAD_PEERS_LISTED liars
    suggests_sent: int = 0
    hash_requests_served: int = 0
    blocks_reordered: int = 0  # arrived ahead of their turn, held to keep piece order
    blocks_resumed: int = 0  # held by the daemon at the start (of pieces under way)
    # Refused by the daemon for want of room for one more piece in progress (its
    # max_partial_pieces): their pieces were asked for again, fewer begun at once.
    blocks_refused: int = 0
    daemon_reconnects: int = 0  # the daemon's connection broke, and a new one was made
    complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


T = TypeVar("T")
#: A block to hand to the daemon: (begin, its bytes, who sent it).
Ready = tuple[int, bytes | memoryview, T]


class InOrder(Generic[T]):
    """Blocks of a piece handed to the daemon in the piece's order, each with who sent it.

    Peers answer a run of requests out of order now and then (libtorrent reads blocks on
    several disk threads). The daemon hashes a piece's in-order prefix as blocks arrive
    and must read back from disk what came out of order, so a block that runs ahead is
    held here (up to HOLD_BYTES in all) until the blocks before it are in.
    """

    HOLD_BYTES = 16 * 1024 * 1024

    def __init__(self, plan: Callable[[int], list[tuple[int, int]]]) -> None:
        self._plan = plan
        self._next: dict[int, int] = {}  # piece -> index in its plan of the block due next
        self._held: dict[int, dict[int, tuple[bytes, T]]] = {}  # piece -> begin -> a block ahead
        self._passed: dict[int, set[int]] = {}  # blocks ahead sent anyway (over the bound)
        self.held_bytes = 0
        self.reordered = 0  # blocks that arrived ahead of their turn

    def arrived(self, piece: int, begin: int, data: bytes | memoryview,
                giver: T) -> list[Ready[T]]:
        """The (begin, data, giver) blocks to send now, in order (``data`` among them as
        given: it is used before the caller's buffer is)."""
        plan = self._plan(piece)
        i = self._next.get(piece, 0)
        if i >= len(plan) or begin != plan[i][0]:
            if i < len(plan) and begin > plan[i][0]:
                self.reordered += 1
                held = self._held.setdefault(piece, {})
                old = held.get(begin)
                if old is not None:
                    # The same block again (end game): the newest copy is the one written,
                    # and its sender the one the blame records.
                    held[begin] = (bytes(data), giver)
                    self.held_bytes += len(data) - len(old[0])
                    return []
                if self.held_bytes + len(data) <= self.HOLD_BYTES:
                    held[begin] = (bytes(data), giver)  # a view of a buffer used again: copied
                    self.held_bytes += len(data)
                    return []
                self._passed.setdefault(piece, set()).add(begin)
            return [(begin, data, giver)]  # past the bound, or behind (a duplicate): as it is
        out: list[Ready[T]] = [(begin, data, giver)]
        i += 1
        waiting = self._held.get(piece)
        passed = self._passed.get(piece)
        if not waiting and not passed:  # the usual case: nothing waits behind it
            self._next[piece] = i
            return out
        held = waiting or {}
        passed = passed or set()
        while i < len(plan):
            b = plan[i][0]
            if b in held:
                block, who = held.pop(b)
                self.held_bytes -= len(block)
                out.append((b, block, who))
            elif b not in passed:
                break
            i += 1
        self._next[piece] = i
        return out

    def had(self, piece: int, begins: Collection[int]) -> None:
        """Blocks of the piece the daemon holds already (from an earlier run): not
        waited for."""
        plan = self._plan(piece)
        i = self._next.get(piece, 0)
        while i < len(plan) and plan[i][0] in begins:
            i += 1
        self._next[piece] = i
        ahead = {b for b, _ in plan[i:] if b in begins}
        if ahead:
            self._passed.setdefault(piece, set()).update(ahead)

    def forget(self, piece: int) -> None:
        """The piece is verified or failed: what was held of it is of no use."""
        self._next.pop(piece, None)
        self._passed.pop(piece, None)
        for block, _ in self._held.pop(piece, {}).values():
            self.held_bytes -= len(block)


def _after(parts: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """What is left of ``parts`` once their first ``n`` bytes are sent."""
    for i, part in enumerate(parts):
        size = len(part) if isinstance(part, bytes) else part.nbytes
        if n < size:
            return [memoryview(part)[n:] if n else part, *parts[i + 1 :]]
        n -= size
    return []


def reads_per_peer(piece_length: int) -> int:
    """How many reads from the daemon one peer may have in flight (READS_PER_PEER)."""
    low, high = READS_PER_PEER
    return max(low, min(high, SEND_AHEAD // max(1, piece_length)))


class UtpRefuser(asyncio.DatagramProtocol):
    """The listening port's UDP side: a uTP SYN gets a RESET (``utp.py``), so that a
    peer that dials over uTP first falls back to TCP at once; at most ``RESETS_PER_SECOND``
    of them, ``RESETS_PER_ADDRESS`` to one address (a flood of SYNs from one took them
    all, and the others' dials waited out their uTP timeouts), and nothing else is
    answered."""

    RESETS_PER_SECOND = 50
    RESETS_PER_ADDRESS = 5

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self._second = 0
        self._sent = 0
        self._to: dict[str, int] = {}  # this second's RESETs by address
        self._seq = int.from_bytes(os.urandom(2), "big")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (asyncio's own datagram transport does not derive from DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        now = time.monotonic()
        if int(now) != self._second:
            self._second, self._sent = int(now), 0
            self._to.clear()
        host = str(addr[0])
        sent = self._to.get(host, 0)
        if (self._sent >= self.RESETS_PER_SECOND or sent >= self.RESETS_PER_ADDRESS
                or self.transport is None):
            return
        self._seq = (self._seq + 1) & 0xFFFF
        reply = refusal(data, int(time.time() * 1e6), self._seq)
        if reply is not None:
            self._sent += 1
            self._to[host] = sent + 1
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # (an ICMP error for a RESET sent: nothing to do)


class Inbox(asyncio.BufferedProtocol):
    """A peer connection's protocol: what the peer sends lands in one buffer of the
    connection's own, used again for every read, and the write side's flow control.

    asyncio's StreamReader copies what arrives into a buffer that grows and shrinks and
    hands each read out as a new bytes object of up to STREAM_LIMIT: fresh memory each
    time, and a page fault every 4 KiB of it (measured at about a sixth of the plugin's
    CPU while downloading). What :meth:`receive` gives stays put until :meth:`consumed`:
    the blocks parsed from it are views of it, copied once, into the daemon's ring, while
    their events are handled; what arrives meanwhile is appended behind it.

    It starts at FIRST_INBOX, and grows once a handshaken peer has filled it: a burst of
    thousands of connections (each refused at the limit of peers, or closed unhandshaken)
    cost a MiB each, zero-filled, and pieced-peer's RSS reached 900 MB. :meth:`release`
    lets it go when the connection is over, not when the collector finds the cycles the
    connection's objects make.
    """

    def __init__(self, size: int = FIRST_INBOX,
                 on_connect: Callable[[asyncio.Transport, Inbox], None] | None = None) -> None:
        self._view = memoryview(bytearray(size))
        self._end = 0
        self._given = 0  # bytes handed out by receive(), in use until consumed()
        self._eof = False
        self._error: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._on_connect = on_connect
        self.filled = False  # the last receive() gave a whole buffer: the peer sends much
        self.transport: asyncio.Transport | None = None
        self._sock: Any = None  # the TCP socket, to ask for quick ACKs (Linux)
        self.on_drain: Callable[[], None] | None = None  # called when the peer took its share

    # -- the loop's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if _QUICKACK is not None and sock is not None and sock.type == socket.SOCK_STREAM:
            self._sock = sock
        if self._on_connect is not None:
            self._on_connect(transport, self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._sock is not None:
            # What arrived is acknowledged at once, not 40 ms later: a peer that takes
            # few requests at a time (libtorrent with max_allowed_in_request_queue 2)
            # sends the tail of its answer in a small segment and holds its next answer
            # until that is acknowledged; our next requests left before the tail came,
            # and a download crawled at one round trip of the delayed ACK a request or
            # two (25-65 times slower). The kernel turns QUICKACK off again by itself.
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._sock = None
        self._end += nbytes
        if self._end == len(self._view) and self.transport is not None:
            self.transport.pause_reading()  # full: nothing more until it is parsed
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._writing_paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()
        if self.on_drain is not None:
            self.on_drain()

    @property
    def writing_paused(self) -> bool:
        """The transport holds more than its high-water mark unsent."""
        return self._writing_paused

    def _wake(self) -> None:
        for fut in (self._waiter, self._drainer):
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- the reader's side
    async def receive(self) -> memoryview | None:
        """What has arrived (None at the end of the stream), valid until consumed()."""
        while not self._end:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._given = self._end
        self.filled = self._end == len(self._view)
        return self._view[: self._end]

    def consumed(self) -> None:
        """What receive() gave is used up: the buffer takes new bytes from its start,
        after any that arrived since (moved to the front)."""
        given, end = self._given, self._end
        self._given = 0
        self._end = end - given
        if self._end:
            self._view[: self._end] = bytes(self._view[given:end])
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def grow(self, size: int) -> None:
        """Read into ``size`` bytes from now on (between :meth:`consumed` and the next
        :meth:`receive`: nothing handed out is a view of the buffer then)."""
        if self._given or size <= len(self._view):
            return
        view = memoryview(bytearray(size))
        view[: self._end] = self._view[: self._end]
        self._view = view

    def release(self) -> None:
        """The connection is over: its buffer goes now (and nothing more is handed out)."""
        self._view = memoryview(bytearray(0))
        self._end = self._given = 0
        self._eof = True
        self.on_drain = None

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark unsent."""
        while self._writing_paused and not self._eof:
            self._drainer = asyncio.get_running_loop().create_future()
            await self._drainer


def _had_all(peer: Peer) -> bool:
    """Whether every piece is one the peer said it has or one we sent it blocks of."""
    has, sent = peer.conn.peer_has, peer.sent
    if len(sent) != len(has):
        return False
    return (int.from_bytes(has, "little") | int.from_bytes(sent, "little")
            ) == int.from_bytes(b"\x01" * len(has), "little")


class Peer:
    """The asyncio side of one connection."""

    def __init__(self, conn: PeerConnection, transport: asyncio.Transport, inbox: Inbox,
                 host: str, port: int, conduct: Conduct) -> None:
        self.conn = conn
        self.transport = transport
        self.inbox = inbox
        self.addr = _address(host, port)
        self.host, self.port = host, port
        self.group = place_group(host)  # whose share of places it takes
        self.conduct = conduct
        self.banned = conduct.banned  # pieces never asked of it: they failed with its data
        self.stranger: str | None = None  # its IP, when it dialled us
        self.peer_id = b""  # what its handshake said
        self.refused: set[int] = set()  # pieces it rejected a request of, since its unchoke
        self.wanted = 0  # pieces it has that we lack (and have not banned it for)
        # The pieces it has as the picker counts them, moved by its events one at a time:
        # the connection's ``peer_has`` is already past every event of a read when the
        # first is handled (a BITFIELD and a DONTHAVE of every piece in one read, counted
        # from it, took each piece off twice, and the peer looked to have nothing we lack).
        self.counted = bytearray(conn.num_pieces)
        # It had every piece when it said what it has: counted as a seed by the picker,
        # its DONT_HAVEs (and HAVEs again) since then counted a piece at a time.
        self.seed_counted = False
        self.replaced = False  # gave its place to a newcomer (see Swarm._idlest)
        self.duplicate = False  # closed: the peer's other connection stays
        self.said_where = False  # its extension handshake came (with where it listens)
        self.say_who = False  # closed once our handshake has gone out (see close)
        # Our dial to the peer it says it is, at an address of the other family: nothing
        # is asked of it while that one lasts (see Swarm._second_connection).
        self.muted_for: Peer | None = None
        # Let in over --max-peers: a place is found for it once it has handshaken (see
        # Swarm._placed), or it goes.
        self.unplaced = False
        self.hung_up = False  # it closed the connection (not we)
        self.suggested: set[int] = set()
        self.reads = 0  # reads from the daemon in flight for it
        self.reading = 0  # bytes they ask for
        self.blocks = 0  # blocks it sent us
        self.served = 0  # bytes of blocks we sent it
        self.sent = bytearray()  # pieces we sent it blocks of (made at the first)
        self.closed = False
        self.opened = time.monotonic()
        self.queued = 0  # bytes handed to its socket or transport
        self.served_at = 0.0  # when we last sent it a block (monotonic)
        self._sent_mark = 0  # bytes gone out at the last look, and when they last moved
        self._moved_at = self.opened
        self.unsent = 0  # bytes sent to it not yet taken, at the last look
        # Since when its loop waits on us (the daemon), reading nothing of it: None when
        # it does not.
        self.held_since: float | None = None

    def release(self) -> None:
        """Its loop waits on us no more: the time it did, a second or more, was not the
        peer's (its clocks are moved on by as much: see PeerConnection.held)."""
        if self.held_since is None:
            return
        held = time.monotonic() - self.held_since
        self.held_since = None
        if held >= 1.0:
            self.conn.held(held)

    def stalled(self, now: float, seconds: float = STALL_SECONDS) -> bool:
        """Nothing we sent it has reached it since ``seconds`` ago (it does not read),
        by looks at least that far apart: a slow reader takes some between any two."""
        unsent = self.unsent = self.transport.get_write_buffer_size() + _kernel_unsent(self.transport)
        sent = self.queued - unsent
        if sent != self._sent_mark or not unsent:
            self._sent_mark, self._moved_at = sent, now
            return False
        return now - self._moved_at >= seconds

    def wastes_slot(self, now: float, patience: float = STALL_SECONDS) -> str | None:
        """Why its unchoke slot is wasted, if it is: unchoked for ``patience`` seconds
        or more, and it takes nothing we send; or unchoked for STALL_SECONDS, has been
        sent nothing for that long and has nothing left to take (it asks for nothing; a
        slow reader still working through what it asked for asks for no more
        meanwhile, and keeps its slot)."""
        stalled = self.stalled(now, patience)  # (a look, whatever the answer: marks kept fresh)
        conn = self.conn
        if conn.am_choking or now - conn.unchoked_at < patience:
            return None
        if stalled:
            return "takes nothing we send"
        if now - conn.unchoked_at < STALL_SECONDS:
            return None
        if (now - self.served_at >= STALL_SECONDS and not self.unsent and not self.reads
                and not self.conn.peer_requests):
            # (one whose requests wait on us, the daemon slow to read them, asks)
            return "asks for nothing"
        return None

    def flush(self) -> None:
        """Send the messages of this turn: straight to the socket with one gathering
        write while the transport holds nothing unsent (blocks go from the buffer they
        were read into, not joined to their headers first: a copy of every byte sent),
        and what the socket does not take then goes to the transport, joined."""
        parts = self.conn.take_outbox()
        if self.closed or not parts:
            return  # dropped: nothing keeps them (blocks may be views of the daemon ring)
        transport = self.transport
        if transport.is_closing():
            # Gone (its Peer is dropped once the loop gets to it): a write now is an
            # error that asyncio logs, one line each (thousands, for HAVEs to it).
            return
        self.queued += sum(len(p) for p in parts)
        if len(parts) > 1 and transport.get_write_buffer_size() == 0:
            sock = transport.get_extra_info("socket")
            try:
                sent = os.writev(sock.fileno(), parts[:IOV_MAX]) if sock is not None else 0
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport's own write meets the error and reports it
            parts = _after(parts, sent)
            if not parts:
                return
        # Joined, so the transport holds bytes of its own: the buffers the blocks came in
        # are used again once this returns (a transport may keep what it is given).
        transport.write(b"".join(parts))

    def close(self) -> None:
        """Let the connection go now. Not ``transport.close()``, which keeps the socket
        until what is queued for the peer is sent: a peer dropped for reading nothing
        never takes it, and kept its descriptor and its MiBs of queued blocks for as long
        as it held its end open (one more of each for every time it dialled again)."""
        if not self.closed:
            if self.say_who:  # (see Swarm._second_connection)
                self.flush()
                self.closed = True
                transport = self.transport
                transport.close()  # (after what is queued, at most SAY_WHO_SECONDS)
                asyncio.get_running_loop().call_later(SAY_WHO_SECONDS, transport.abort)
                return
            self.closed = True
            self.conn.take_outbox()  # blocks queued for it may be views of the daemon ring
            # With bytes unsent, a reset: they go too. (A close, even the transport's
            # abort, left the socket to the kernel with MiBs of blocks or hash answers to
            # a peer that reads nothing, each for minutes.) Else a close, as any peer's.
            sock = self.transport.get_extra_info("socket")
            if sock is not None and _kernel_unsent(self.transport):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            self.transport.abort()


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: a close resets the connection


def _may_ask(peer: Peer, piece: int) -> bool:
    """Whether the peer has the piece, is not banned for it, and may be asked for it
    now (it unchokes us, or lets us ask for it choked)."""
    conn = peer.conn
    return bool(peer.counted[piece]) and piece not in peer.banned and (
        not conn.peer_choking or (conn.fast and piece in conn.allowed_fast))


def _live(peer: object) -> bool:
    """Whether a peer holding a block counts in the end game (see Picker.pick): one
    that has sent us a block, and not let a request time out since. A peer that has
    sent nothing yet proves nothing: peers that unchoke, take requests and never answer
    (one after another, each new one given the last blocks) held a download that a
    seeder beside them could finish at once for the whole of their request timeout."""
    conn = cast(Peer, peer).conn
    return not conn.snubbed and conn.last_block > 0.0


class Swarm:
    """One torrent's peers, its picker and its daemon connection."""

    def __init__(self, opts: Options, raw: bytes, meta: Metainfo) -> None:
        self.opts = opts
        self.raw = raw
        self.meta = meta
        self.reads_per_peer = reads_per_peer(meta.piece_length)
        self.peer_id = b"-PZ0001-" + os.urandom(6).hex().encode()
        span = meta.info_span
        self.metadata = bytes(raw[span[0] : span[1]])  # handed to peers that ask (BEP 9)
        self.piece_sizes = [meta.piece_size(p) for p in range(meta.num_pieces)]
        self.client = AsyncClient(opts.socket, on_event=self._on_event, window=512,
                                  on_write_error=self._write_refused)
        self.ih = meta.info_hash
        self.picker: Picker | None = None
        self.hash_server = HashServer(meta)
        self.order: InOrder[Conduct] = InOrder(lambda p: [])  # replaced once the picker exists
        self.peers: set[Peer] = set()
        self.connecting: set[tuple[str, int]] = set()  # dialled, not yet connected
        self.known: dict[tuple[str, int], Dial] = {}  # the addresses we dial
        # (IP, peer id) -> what the peer that dials us from there did
        self.strangers: dict[tuple[str, bytes], Conduct] = {}
        self.liars: dict[object, int] = {}  # address group -> its peers dropped for bad data
        # who sent the blocks of a bad piece
        self.blame: Attribution[Conduct] = Attribution(self._blocks_in)
        self.summary = Summary()
        self.done = asyncio.Event()
        self.stop = asyncio.Event()
        self.signalled = False  # stopped by SIGINT or SIGTERM
        self.server: asyncio.Server | None = None
        self.utp: asyncio.DatagramTransport | None = None
        self.listen_port = 0
        # One for each key the torrent answers to (a hybrid's v1 hash and its v2 hash
        # truncated): peers that know it by one alone find us there (libtorrent
        # announces both too).
        self.trackers: list[Tracker] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cached: list[int] = []
        self._cached_at = -CACHED_ASK_SECONDS  # when the daemon was last asked
        self._refill_soon = False  # a refused block's piece is to be asked for again
        self._shunned: set[int] = set()  # pieces refused, not begun again yet: see _write_refused
        self._suggesting: asyncio.Task[Any] | None = None  # the choke round's suggestions
        self._quiet_said = -60.0  # when a silent daemon was last said
        self.lost: BaseException | None = None  # the daemon connection, if it broke
        # The daemon connection broke and a new one is being made (see _come_back):
        # nothing is stored, served or asked for meanwhile; the peers stay connected.
        self.away = False
        # Failures of the last connections given up (a task may still raise one: not a
        # bug), and the one the wait under way began with (said if it is given up).
        self._dead: collections.deque[BaseException] = collections.deque(maxlen=16)
        self._first_loss: BaseException | None = None
        self.closing = False
        # Pieces with an event since the reconcile under way asked for the daemon's status:
        # the event is as new as its snapshot or newer, and the picker follows it already.
        self._told: set[int] = set()
        # The daemon's events that came before the torrent was taken up (its status on
        # its way, or read with them): applied once it is, see _begin.
        self._early: list[tuple[str, dict[str, Any]]] = []
        self._confirming = False  # a reconcile is under way
        self._again = False  # and another is to follow it
        self._looking = 0  # reconciles under way
        # Clear from the daemon's word that pieces changed (a check, another client) until
        # a reconcile has taken in what it has now: nothing is offered or served meanwhile.
        self.settled = asyncio.Event()
        self.settled.set()
        self._registration: Any = None  # the daemon's registration of the torrent
        self.save_path = opts.save_path.resolve()  # where the daemon keeps it (moves followed)
        self.storage_error: str | None = None  # why the daemon could not store the torrent
        self.no_source: str | None = None  # why no piece we lack can come any more
        self._losses: dict[int, int] = {}  # piece -> times the daemon took it back
        self._to_flush: dict[Peer, None] = {}  # peers to send what this turn queued
        self._progress_at = time.monotonic()  # when a piece was last verified
        self._waiting_said = -WAITING_SAY_EVERY
        self.unavailable = 0  # pieces we lack that no peer has, once the download waits

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.client.connect()
            await self.client.attach_ring()
        except AccessDenied as exc:
            # Every place taken (max_clients): for now, as after a loss; waited for
            # within --daemon-wait, a place tried for again and again (at a restart of
            # the daemon, its clients come back in any order).
            if exc.errno != errno.EBUSY or self.opts.daemon_wait <= 0:
                raise
            log.warning("%s: waiting up to %g s for a place", _describe(exc),
                        self.opts.daemon_wait)
            try:
                st = await self._reconnect(registered=False)
            except _GaveUp:
                raise exc from None
        except ConnectionError as exc:
            # Reached, then lost before it had taken us in (killed as it accepted us, and
            # started again): a restart, waited for as a loss under way is. A daemon never
            # reached (not running: refused, or no socket) is said at once.
            if isinstance(exc, ConnectionRefusedError) or self.opts.daemon_wait <= 0:
                raise
            st = await self._rejoined(exc)
        else:
            st = await self._joined()
        await self._begin(st)

    async def _rejoined(self, exc: BaseException) -> dict[str, Any]:
        """The first connection lost with ``exc`` before the torrent was taken up: the
        daemon waited for (a restart), the torrent joined on a new one."""
        self._wait_for_daemon(exc)
        try:
            st = await self._reconnect(registered=False)
        except _GaveUp:
            raise DaemonLost(f"lost the daemon: {exc}", self.summary) from None
        self._returned()
        return st

    async def _joined(self) -> dict[str, Any]:
        """The torrent joined on the first connection (see :meth:`_join`)."""
        try:
            st = await self._join()
        except ConnectionError as exc:
            # Lost while the daemon registers or checks the torrent (a check may take
            # hours; a restarted daemon finishes it by itself): waited for as under way,
            # else said as a loss under way is, with the summary, not as a daemon that
            # could not be reached.
            if self.opts.daemon_wait <= 0:
                raise DaemonLost(f"lost the daemon: {exc}", self.summary) from None
            st = await self._rejoined(exc)
        return st

    async def _begin(self, st: dict[str, Any]) -> None:
        """The torrent as the daemon has it (``st``, its status): taken up."""
        self._registration = st.get("registration")
        have = wire.pieces_from_bits(bytes(st["have"]), self.meta.num_pieces)
        self.picker = Picker(self.meta, have)
        self.order = InOrder[Conduct](self.picker.plan)
        for piece, spans in st.get("partial", []):
            self._resume(piece, spans)
        # Events read before this: those that came after the status's reply are newer than
        # it (a piece another client verified meanwhile would else be waited for until the
        # next reconcile). A verified piece is taken as said (had already: nothing to do),
        # pieces changed have the daemon asked again; a failed one may be older than the
        # status (and verified since), so it has the daemon asked again too.
        early, self._early = self._early, []
        again = False
        for name, msg in early:
            if name == "piece_failed":
                again = True
            else:
                self._on_event(name, msg)
        tiers = self.meta_trackers()
        urls = [u for tier in tiers for u in tier]
        if self.opts.listen is not None:
            host, port = self.opts.listen
            try:
                # Every interface, asked as such, is IPv4 and IPv6 on one port (asyncio
                # makes a socket of [::] IPv6 only): trackers are told the port over either.
                await self._listen(None if host in ("", "::") else host, port)
            except OSError as exc:
                raise CannotListen(f"cannot listen on {_address(host, port)}: "
                                   f"{exc.strerror or exc}") from None
        elif urls:
            # Trackers hand our port to the swarm: a port nobody answers on would make
            # us a leecher that no peer can reach. libtorrent's default: 6881 on every
            # interface, or a port the system picks when 6881 is taken.
            try:
                await self._listen(None, DEFAULT_LISTEN_PORT)
            except OSError:
                await self._listen(None, 0)
        if (not self.opts.peers and self.opts.listen is None and not urls
                and (self.opts.seed or not self.picker.complete)):
            raise NoSources("no peer to download from or seed to: give --peer HOST:PORT or "
                            "--listen HOST:PORT (the torrent names no HTTP or UDP tracker)")
        for host, port in self.opts.peers:
            self.connect(host, port)
            if (host, port) in self.known:
                self.known[host, port].given = True
        if urls:
            # Each tier in a random order, as libtorrent takes them (BEP 12): not every
            # client asks the same tracker of a tier first.
            keys = self.meta.aliases
            for n, key in enumerate(keys):
                # (a hybrid's two keys: each announce's words said once, naming its key)
                label = "" if len(keys) == 1 else f"v{n + 1} hash"
                tracker = Tracker([random.sample(t, len(t)) for t in tiers], key,
                                  self.peer_id, self.listen_port, label)
                self.trackers.append(tracker)
                self._spawn(self._announce_loop(tracker))
        self._spawn(self._timers())
        if again:  # (nothing served meanwhile, as for pieces changed)
            self.settled.clear()
            self._look_again()
        if self.picker.complete:
            self.summary.complete = True
            self.done.set()

    async def _join(self, registered: bool = False) -> dict[str, Any]:
        """The torrent registered (or found so), what is on disk checked, its events
        subscribed to: its status, with the pieces under way. ``registered``: it was, by
        the daemon that went (a restart): found, not registered again (UnknownTorrent if
        it was removed meanwhile: a removed torrent stops us)."""
        if registered:
            await self._found(follow=True)
        else:
            try:
                self.ih = await self.client.register(self.raw, self.opts.save_path)
                # Newly registered: what is already on disk is checked first, as any
                # client does with a torrent added over existing data (files that are not
                # there cost nothing to check).
                await self._check()
            except AlreadyRegistered:
                await self._found()
        await self.client.subscribe(self.ih)
        return await self._status_held()

    async def _status_held(self) -> dict[str, Any]:
        """The torrent's status with the byte ranges the daemon holds of its pieces under
        way; without them when they are more than a reply holds (thousands of pieces
        under way, each in many parts, some perhaps another client's): those pieces are
        then fetched again, whole. (Asked again when the daemon had no room for a new
        piece, the refusal ended the download.)"""
        try:
            return await self.client.status(self.ih, files=False, partial=True)
        except TooLarge:
            return await self.client.status(self.ih, files=False)

    async def _found(self, follow: bool = False) -> None:
        """The torrent is registered: in our save path, and checked. ``follow``: found
        again (the daemon back), wherever it is now: moved by another client meanwhile,
        its files are the daemon's to keep, and the torrent is taken up where it is (it
        stopped us, seeding for days, after any move and restart)."""
        st = await self.client.status(self.ih, files=False)
        if follow:
            if Path(st["save_path"]) != self.save_path:
                log.warning("the torrent is in %s now (moved by another client): followed",
                            st["save_path"])
                self.save_path = Path(st["save_path"])
        elif Path(st["save_path"]) != self.opts.save_path.resolve():
            raise ElsewhereAlready(
                f"the torrent is registered with save path {st['save_path']}, not "
                f"{self.opts.save_path}: run with --save-path {st['save_path']} "
                "(or remove it with `pieced rm` to start over in the other)") from None
        waited = False
        while st["reverifying_pieces"] or st.get("checking"):
            # The daemon is checking the files (for another client, or finishing a
            # check a crash cut short): what it finds is not to be fetched again.
            waited = True
            await asyncio.sleep(0.2)
            st = await self.client.status(self.ih, files=False)
        if not waited and not st["verified_pieces"] and not st["partial_pieces"]:
            # Nothing known of it: maybe never checked (the daemon went down between
            # the register and the check). What is on disk is checked now.
            await self._check()

    async def _check(self) -> None:
        """What is on disk checked by the daemon, once: a check under way for another
        client (one that found the torrent as we registered it, or registered it as we
        found it) is joined, not run again after it (two pieced-peers started together
        read the whole of it twice). A check its stop cuts short (carried out again by
        the daemon when it starts) is a loss of the daemon, waited for."""
        try:
            await self.client.recheck(self.ih, join=True)
        except PiecedError as exc:
            if exc.errno == errno.ECANCELED:
                raise ConnectionError(_describe(exc)) from None
            raise

    async def _listen(self, host: str | None, port: int) -> None:
        """Accept incoming peers on ``host`` (None: every interface, IPv4 and IPv6 on
        one port, whatever the port: a tracker reached over IPv6 hands out the port
        for that address too) and ``port`` (0: one the system picks); and refuse uTP
        there (see ``UtpRefuser``)."""
        loop = asyncio.get_running_loop()
        if host is None:
            tcp = _every_interface(socket.SOCK_STREAM, port)
            self.server = await loop.create_server(
                lambda: Inbox(on_connect=self._accepted), sock=tcp, backlog=ACCEPT_BURST)
        else:
            self.server = await loop.create_server(
                lambda: Inbox(on_connect=self._accepted), host, port, backlog=ACCEPT_BURST)
        bound = self.server.sockets[0].getsockname()
        self.listen_port = bound[1]
        try:
            if host is None:
                udp = _every_interface(socket.SOCK_DGRAM, self.listen_port)
                self.utp, _ = await loop.create_datagram_endpoint(UtpRefuser, sock=udp)
            else:
                self.utp, _ = await loop.create_datagram_endpoint(
                    UtpRefuser, local_addr=(host, self.listen_port))
        except OSError as exc:  # (the UDP port is another program's: peers wait for it)
            log.info("uTP attempts on port %d are not refused (%s): peers that try uTP "
                     "first fall back to TCP only after their timeout", self.listen_port, exc)
        print(f"pieced-peer: listening on {_address(host or bound[0], self.listen_port)}",
              file=sys.stderr, flush=True)

    def meta_trackers(self) -> list[list[str]]:
        """The .torrent's HTTP(S) and UDP announce URLs in their tiers, each once: those
        of ``announce-list`` when it has any (BEP 12: ``announce`` is then left aside, as
        libtorrent leaves it), else ``announce``. Others (WebSocket trackers) are not
        spoken to: said."""
        from pieced.storage.bencode import decode

        top = decode(self.raw, trailing=True)  # (as the daemon read it: see metainfo.parse)
        if not isinstance(top, dict):
            return []
        listed = top.get(b"announce-list")
        tiers = [[u for u in tier if isinstance(u, bytes)] for tier in listed
                 if isinstance(tier, list)] if isinstance(listed, list) else []
        if not any(tiers):
            a = top.get(b"announce")
            tiers = [[a]] if isinstance(a, bytes) else []
        seen: set[str] = set()
        out: list[list[str]] = []
        other: list[str] = []
        for tier in tiers:
            kept: list[str] = []
            for raw in tier:
                url = raw.decode("utf-8", "replace")
                if url in seen:
                    continue
                seen.add(url)
                (kept if url.startswith(("http://", "https://", "udp://")) else other).append(url)
            if kept:
                out.append(kept)
        if other:
            log.warning("trackers not spoken to (only HTTP and UDP trackers are): %s",
                        printable(", ".join(other[:5]) + (" ..." if len(other) > 5 else "")))
        return out

    def stopped_by_signal(self) -> None:
        self.signalled = True
        self.stop.set()

    async def close(self) -> None:
        if (self.picker is not None and self.picker.complete and self.storage_error is None
                and not self.away):
            # Every piece said verified by the daemon, one event each: complete, whether
            # or not the look that confirms it with the daemon's status came back before
            # the stop (a SIGTERM just after the last piece said it was not).
            self.summary.complete = True
        for t in list(self._tasks):
            t.cancel()
        if self.trackers:
            with contextlib.suppress(Exception):  # a tracker that does not answer: let it be
                await asyncio.wait_for(self._final_announces(), STOP_ANNOUNCE_TIMEOUT)
            for tracker in self.trackers:
                await tracker.close()
        if self.server is not None:
            self.server.close()
        if self.utp is not None:
            self.utp.close()
        for p in list(self.peers):
            p.close()
        if self.lost is None and self.storage_error is None and (
                self.away or self.client.failure is not None):
            if self.signalled:  # (a stop asked for, as any other: the daemon was awaited)
                log.warning("stopped while waiting for the daemon to come back")
            else:  # (stopped while the daemon was away: the run ends without it all the same)
                self.lost = self.client.failure or self._first_loss
        self.closing = True  # (the client's failure from now on is the close)
        with contextlib.suppress(PiecedError, OSError, ConnectionError, TimeoutError):
            await asyncio.wait_for(self.client.close(), STOP_DAEMON_TIMEOUT)

    async def _final_announces(self) -> None:
        counters, complete = self._counters(), self.summary.complete
        await asyncio.gather(*(t.goodbye(counters, complete, STOP_ANNOUNCE_TIMEOUT)
                               for t in self.trackers))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        """A task's failure is looked at, never left for asyncio to print: the daemon
        lost stops us (said once, at the end); anything else is a bug, logged."""
        self._tasks.discard(t)
        if t.cancelled() or (exc := t.exception()) is None:
            return
        if any(exc is dead for dead in self._dead):  # (a connection since replaced)
            return
        if self.client.failure is not None:
            self._lost()
            return
        if isinstance(exc, PiecedError):
            # The daemon's answer to whatever this task asked; a block written before
            # that the daemon refused is told with the next request too (a full disk, a
            # file gone): not a bug of ours, said in one line, and we stop.
            self._storage_failed(_REMOVED if isinstance(exc, UnknownTorrent) else
                                 f"the daemon answered with an error: {_describe(exc)}")
            return
        log.error("a task failed", exc_info=exc)

    def _lost(self) -> None:
        """The daemon connection broke: no storage, nothing to serve or fetch. The daemon
        is waited for (a restart), up to ``daemon_wait`` seconds, the peers kept: each is
        choked (its requests rejected) and nothing is asked of it meanwhile."""
        if self.closing or self.away or self.lost is not None:
            return  # (closed by us: its failure says so; or said already)
        failure = self.client.failure
        assert failure is not None
        if self.opts.daemon_wait <= 0 or self.picker is None:
            self.lost = failure
            self.stop.set()
            return
        self.away = True
        self._wait_for_daemon(failure)
        self.settled.clear()  # (what the daemon has is not known until it is back)
        for p in list(self.peers):
            for blk in list(p.conn.our_requests):  # (what comes meanwhile is dropped)
                p.conn.send_cancel(blk)
            p.conn.send_choke(True)
            p.flush()
        self._spawn(self._come_back())

    def _wait_for_daemon(self, failure: BaseException) -> None:
        """A wait for the daemon begins, lost with ``failure``."""
        self._dead.append(_bare(failure))
        self._first_loss = failure
        log.warning("lost the daemon (%s): waiting up to %g s for it to come back",
                    failure, self.opts.daemon_wait)

    def _returned(self) -> None:
        self.summary.daemon_reconnects += 1
        log.warning("the daemon is back")

    async def _come_back(self) -> None:
        """Connect to the daemon again, and take up the torrent where it is now."""
        try:
            st = await self._reconnect(registered=True)
        except _GaveUp:
            self.lost = self._first_loss  # (the loss said at the end)
            self.stop.set()
            return
        except ElsewhereAlready as exc:
            self._storage_failed(str(exc))
            return
        except UnknownTorrent:
            self._storage_failed("the daemon came back without the torrent (removed by "
                                 "another client meanwhile, or not loaded: its log says "
                                 "why)")
            return
        except PiecedError as exc:  # (a ring or frame size it refuses now, say)
            self._storage_failed(f"the daemon came back, but answered with an error: "
                                 f"{_describe(exc)}")
            return
        self._back(st)

    async def _reconnect(self, registered: bool) -> dict[str, Any]:
        """A new connection to the daemon, the torrent joined again (see :meth:`_join`):
        its status. A daemon that cannot be reached, does not answer, or is full (its
        other clients came back first) is tried again until ``daemon_wait`` seconds from
        now, then :class:`_GaveUp`; its other errors are raised."""
        deadline = time.monotonic() + self.opts.daemon_wait
        delay = 0.1
        while True:
            with contextlib.suppress(PiecedError, OSError, TimeoutError):
                # (the connection that broke, or a new one that did: its socket and ring)
                await asyncio.wait_for(self.client.close(), STOP_DAEMON_TIMEOUT)
            client = AsyncClient(self.opts.socket, on_event=self._on_event, window=512,
                                 on_write_error=self._write_refused)
            self._told = set()  # (events from here on are newer than the status below)
            try:
                try:
                    # (a listening socket takes the connection of a daemon that does not
                    # answer, stopped or not yet started: waited for until the deadline)
                    await asyncio.wait_for(self._attach(client),
                                           max(deadline - time.monotonic(), 0.05))
                except BaseException:
                    with contextlib.suppress(PiecedError, OSError, TimeoutError):
                        await asyncio.wait_for(client.close(), STOP_DAEMON_TIMEOUT)
                    raise
                self.client = client  # (connected: what tasks ask of it is sent)
                return await self._join(registered)
            except (OSError, AccessDenied) as exc:  # (ConnectionError, TimeoutError...)
                if isinstance(exc, AccessDenied) and exc.errno != errno.EBUSY:
                    raise  # (refused for good: not a daemon full for now)
                if client.failure is not None:
                    self._dead.append(_bare(client.failure))
                if self.client is client:  # reached, then lost again (a check of hours):
                    deadline = time.monotonic() + self.opts.daemon_wait  # waited anew
                    log.warning("lost the daemon again (%s): waiting up to %g s for it to "
                                "come back", str(exc) or "no answer", self.opts.daemon_wait)
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("the daemon did not come back in %g s (%s)",
                                self.opts.daemon_wait, str(exc) or "it does not answer")
                    raise _GaveUp from None
                await asyncio.sleep(min(delay, left))  # (and a last try at the deadline)
                delay = min(2 * delay, 1.0)

    @staticmethod
    async def _attach(client: AsyncClient) -> None:
        await client.connect()
        await client.attach_ring()

    def _back(self, st: dict[str, Any]) -> None:
        """The daemon is back, ``st`` its status of the torrent: the pieces under way
        start over from the blocks it holds (what it had not stored went with it), what
        it has verified is taken as it says, and the peers are served and asked again."""
        picker = self.picker
        assert picker is not None
        self._returned()
        self._registration = st.get("registration")
        have = wire.pieces_from_bits(bytes(st["have"]), self.meta.num_pieces)
        for piece in list(picker.started):
            if piece not in self._told:
                self.order.forget(piece)
                self.blame.forget(piece)
                picker.piece_failed(piece)
        for piece, spans in st.get("partial", []):
            if 0 <= piece < len(have) and not have[piece]:
                self._resume(piece, spans)
        self._follow(have)
        self.away = False
        if not self._looking:
            self.settled.set()
        self._choke_round(rotate=False)
        for peer in list(self.peers):
            self._pump_reads(peer)
        self._fill_all()
        if picker.complete:
            self.summary.complete = True
            self.done.set()

    def _counters(self) -> dict[str, int]:
        assert self.picker is not None
        left = sum(self.piece_sizes[p] for p in range(self.meta.num_pieces)
                   if not self.picker.have[p])
        return {"uploaded": self.summary.bytes_up, "downloaded": self.summary.bytes_down,
                "left": left}

    # -- connections -----------------------------------------------------------------------
    def connect(self, host: str, port: int, named: bool = True, v2: bool = False) -> bool:
        """Dial an address, now if there is room, else once there is. ``named``: a
        tracker or the user names it (again), not a dial of ours coming round. ``v2``:
        named under a hybrid's v2 hash (see Dial.v2). False when a new address cannot
        be kept: MAX_KNOWN are, and none may be forgotten."""
        host = unmapped(host)  # (a tracker's peers6 may list IPv4 peers so)
        if port == self.listen_port and host in ("127.0.0.1", "::1", "localhost") and port:
            return True  # ourselves, as a tracker may list us
        addr = (host, port)
        dial = self.known.get(addr)
        if dial is None:
            if len(self.known) >= MAX_KNOWN and not self._forget_one():
                return False
            dial = self.known[addr] = Dial(Conduct(_address(host, port)))
        dial.v2 |= v2
        if named:
            dial.unreached = 0
            dial.seed = False  # (a new peer may have taken the address; a seed says so again)
        if dial.dropped or dial.busy or self._elsewhere(dial, addr):
            return True
        if dial.seed and self.done.is_set():
            dial.due = 0.0  # two seeds: nothing to exchange, until we lose a piece
            return True
        # Dials under way have places of their own: an address that does not answer
        # holds one for up to CONNECT_TIMEOUT, and a peer dialling us must not be
        # refused because of them (nor a tracker's long list of dead addresses keep
        # the live ones from ever being dialled).
        if self._placed_peers() >= self.opts.max_peers or not self._may_dial():
            if not dial.due:
                dial.due = time.monotonic()  # dialled by _redial once there is room
            return True
        dial.due = 0.0
        dial.busy = True
        self.connecting.add(addr)
        self._spawn(self._outgoing(host, port, dial))
        return True

    def _may_dial(self) -> bool:
        free = self.opts.max_peers - self._placed_peers()
        return len(self.connecting) < DIALS_PER_PLACE * max(1, free)

    def _forget_one(self) -> bool:
        """Make room among the addresses we know: the one that failed most often (not
        one connected, one given with --peer, or one dropped for bad data, which must
        not come back), so that peers a tracker names later are dialled too."""
        worst = max(((d.fails, addr) for addr, d in self.known.items()
                     if d.fails and not d.busy and not d.given and not d.dropped), default=None)
        if worst is None:
            return False
        del self.known[worst[1]]
        return True

    async def _outgoing(self, host: str, port: int, dial: Dial) -> None:
        peer: Peer | None = None
        full = False
        try:
            transport, inbox = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(Inbox, host, port), CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            log.info("cannot connect to %s: %s", _address(host, port), exc)
        else:
            self.connecting.discard((host, port))  # a peer now: counted in self.peers
            if self._placed_peers() >= self.opts.max_peers:  # (filled while we dialled)
                full = True
                transport.close()
                inbox.release()
                return
            keys = self.meta.aliases
            conn = PeerConnection(keys, self.peer_id, self.piece_sizes, v2=self.meta.has_v2,
                                  outgoing_hash=keys[-1] if dial.v2 else keys[0], views=True,
                                  metadata=self.metadata, listen_port=self._told_port())
            assert isinstance(transport, asyncio.Transport)
            peer = Peer(conn, transport, inbox, host, port, dial.conduct)
            await self._serve_peer(peer)
        finally:
            self.connecting.discard((host, port))
            dial.busy = False
            if full:
                dial.due = time.monotonic() + RETRY_FIRST  # (reached: not a failure)
            else:
                self._dialled(dial, peer)

    def _dialled(self, dial: Dial, peer: Peer | None) -> None:
        """A dial ended (``peer``: the connection it made, or None): when to dial again."""
        twin = peer is not None and peer.hung_up and self._twin(peer)
        if peer is not None and not peer.conn.handshaken and not dial.warned and (
                not dial.conduct.ourselves) and not twin:
            dial.warned = True  # once an address: it is dialled again and again
            log.warning("%s closed the connection before its handshake (it may not "
                        "have the torrent, or be paused, or require encryption: "
                        "pieced-peer speaks plain BitTorrent only)", peer.addr)
        if peer is not None and peer.peer_id:
            dial.peer_id = peer.peer_id
        if (peer is not None and not peer.conn.handshaken and peer.hung_up and not twin
                and len(self.meta.aliases) == 2):
            # A hybrid's peer that closed before its handshake may know the torrent by
            # the other hash alone (from a magnet link of one hash: a --peer given, or
            # a tracker's list of one swarm): dialled with the other hash next.
            dial.v2 = not dial.v2
        dial.fails = 0 if peer is not None and peer.blocks else dial.fails + 1
        dial.unreached = 0 if peer is not None else dial.unreached + 1
        if peer is not None and (peer.conn.is_seed or (
                self.done.is_set() and peer.conn.handshaken and peer.hung_up
                and ((not peer.conn.peer_interested and not peer.conn.told_pieces)
                     or _had_all(peer)))):
            # It has every piece; or, while we have them all, it closed without
            # wanting any, or saying what it has: a seed too (libtorrent closes on our
            # HAVE_ALL, "upload to upload", before its own HAVE_ALL has reached us; one
            # that said it lacks pieces is a leecher that closed on our last HAVE before
            # it took it in, and is dialled back); or it closed having
            # every piece it said it had or we sent it blocks of (Transmission frees a
            # connection the moment its download completes, its last HAVEs unsent: it
            # was dialled again once a minute, and closed each time, for good).
            dial.seed = True
        if peer is not None and (peer.duplicate or twin):
            # Connected to that peer by its own dial, or at its other address: dialled
            # again when a tracker names the address again (or, for a peer that dialled
            # us, when that connection ends: see _dial_back).
            dial.due = 0.0
        elif dial.seed and self.done.is_set():
            dial.due = 0.0  # two seeds: nothing to exchange, until we lose a piece
        elif (dial.unreached >= MAX_UNREACHED and not dial.given and self._dialling()
              and len(self.known) > self.opts.max_peers):
            # More addresses than dials at once: this one makes way for the others.
            dial.due = time.monotonic() + UNREACHED_RETRY  # (or when a tracker names it)
        elif self._dialling() and not dial.dropped:
            wait = RETRY_FIRST * 2 ** min(max(0, dial.fails - 1), 16)  # (no overflow)
            if peer is not None and peer.replaced:
                wait = RETRY_MAX  # (back at once, it would take another's place)
            dial.due = time.monotonic() + min(RETRY_MAX, wait)

    def _dialling(self) -> bool:
        """Whether the addresses we know are dialled again: while pieces are missing,
        and all along when seeding (a leecher named with ``--peer`` may start after us,
        or leave and come back)."""
        return self.opts.seed or not self.done.is_set()

    def _redial(self, now: float) -> None:
        """Dial again the addresses whose wait is over."""
        if not self._dialling():
            return
        due = sorted((dial.unreached, not is_local(addr[0]), dial.due, addr)
                     for addr, dial in self.known.items() if dial.due and dial.due <= now)
        # Addresses that answered before first, local ones first among them; then who
        # has waited longest (new ones too).
        for *_, (host, port) in due:
            if not self._may_dial():
                return
            if self._elsewhere(self.known[host, port], (host, port)):
                continue
            if self._placed_peers() >= self.opts.max_peers:
                # A peer holding a place and doing nothing gives it up, as for a newcomer
                # that dials us: else peers with nothing to exchange, filling every
                # place, kept a seeder that came up later from ever being dialled.
                idle = self._idlest()
                if idle is None:
                    return
                log.info("%s: dropped to dial %s (it holds a place and gives nothing)", idle.addr,
                         _address(host, port))
                idle.replaced = True
                self._drop(idle)
            self.connect(host, port, named=False)

    def _twin(self, peer: Peer) -> bool:
        """A connection we dialled, that the peer closed, has a twin: one of ours, open,
        to the same port at an address of the other family (a peer listening on IPv4 and
        IPv6, as a tracker lists it). libtorrent closes the older of two connections from
        one peer id (ours), before its handshake on the newer one says who it is (its
        peer id is new at each connection: no use to tell it by); the address of the one
        closed, dialled again a second later, took the other's place, and so on for the
        whole download. (Another peer on that port, closing on us then, is dialled again
        only when named again too.)"""
        if peer.stranger is not None:
            return False
        v6 = ":" in peer.host
        return any(p is not peer and not p.closed and p.stranger is None
                   and p.port == peer.port and (":" in p.host) != v6 for p in self.peers)

    def _elsewhere(self, dial: Dial, addr: tuple[str, int]) -> bool:
        """The peer that answered at this address last is connected now, at another
        (IPv4 and IPv6, as a tracker lists it), or by a dial of its own from there: not
        dialled here until that connection ends. Dialled, it took the place of the other
        (libtorrent closes the older of two connections from one peer), whose address was
        then dialled again, and so on: a new connection every second or two for the
        whole download. (A connection that dialled us counts only when it says it
        listens at this address: else its peer id may be a stranger's claim.)"""
        if not dial.peer_id or not any(p.peer_id == dial.peer_id and not p.closed
                                       and (p.stranger is None or (
                                           p.host == addr[0] and _listens_at(p, addr)))
                                       for p in self.peers):
            return False
        dial.due = 0.0
        return True

    def _accepted(self, transport: asyncio.Transport, inbox: Inbox) -> None:
        self._spawn(self._incoming(transport, inbox))

    async def _incoming(self, transport: asyncio.Transport, inbox: Inbox) -> None:
        peername = transport.get_extra_info("peername")
        addr = (unmapped(peername[0]), peername[1])
        group = place_group(addr[0])
        if self.liars.get(group, 0) >= LIARS_PER_ADDRESS:
            transport.close()  # (said once, when the address was shut out)
            inbox.release()
            return
        unplaced = self._placed_peers() >= self.opts.max_peers
        if unplaced:
            waiting = [p for p in self.peers if p.unplaced and not p.closed]
            silent = self._silent(waiting) if len(waiting) >= UNPLACED else None
            if ((len(waiting) >= UNPLACED and silent is None)
                    or sum(p.group == group for p in waiting) >= UNPLACED_PER_ADDRESS):
                transport.close()
                inbox.release()
                return
            if silent is not None:
                log.info("%s: dropped for a newcomer (it said nothing)", silent.addr)
                self._drop(silent)
        conn = PeerConnection(self.meta.aliases, self.peer_id, self.piece_sizes,
                              v2=self.meta.has_v2, views=True, metadata=self.metadata,
                              listen_port=self._told_port())
        peer = Peer(conn, transport, inbox, addr[0], addr[1], Conduct(addr[0], group=group))
        peer.stranger = addr[0]  # known by its peer id too, once it says it
        peer.unplaced = unplaced
        try:
            await self._serve_peer(peer)
        finally:
            self._dial_back(addr[0], peer)

    def _told_port(self) -> int:
        """The port peers are told we listen on (0 when we take no connections)."""
        return self.listen_port if self.server is not None else 0

    def _dial_back(self, host: str, peer: Peer) -> None:
        """A peer that dialled us has gone: the address it said it listens on (its ``p``)
        is known from now on, as an address a tracker gave, and dialled again while we
        lack pieces (libtorrent keeps it so). Its conduct goes with it: a liar dropped is
        not dialled."""
        port = peer.conn.remote_port
        if not port or peer.conduct.ourselves or (
                port == self.listen_port and host in ("127.0.0.1", "::1")):  # (ourselves)
            return
        addr = (host, port)
        dial = self.known.get(addr)
        if dial is None:
            if len(self.known) >= MAX_KNOWN and not self._forget_one():
                return
            # (not warned of: a peer that dialled us, gone, closing our dial before its
            # handshake has left the torrent; it spoke plain BitTorrent to us. A seed
            # said so once for every leecher that had come and gone.)
            dial = self.known[addr] = Dial(peer.conduct, warned=True)
        keys = self.meta.aliases
        dial.v2 |= len(keys) == 2 and peer.conn.info_hash == keys[1]
        if not dial.busy:
            self._dialled(dial, peer)

    def _known_stranger(self, peer: Peer, peer_id: bytes) -> bool:
        """A peer that dialled us said who it is: what it did before is its own again.
        False (the peer is dropped) if that was sending bad data."""
        ip = peer.stranger
        assert ip is not None
        key = (ip, peer_id)
        conduct = self.strangers.get(key)
        if conduct is None:
            conduct = peer.conduct
            strangers = self.strangers
            if len(strangers) >= MAX_KNOWN:
                # The oldest record of a peer gone that sent nothing bad makes room; when
                # none does (an attack from many addresses), the newcomer's is not kept.
                clean = next((k for k, c in strangers.items() if not (c.live or c.bad)), None)
                if clean is None:
                    return True
                del strangers[clean]
            strangers[key] = conduct
            return True
        if conduct.dropped:
            log.info("%s: sent bad data before: not let in again", peer.addr)
            self._drop(peer)
            return False
        peer.conduct.live -= 1
        conduct.live += 1
        peer.conduct, peer.banned = conduct, conduct.banned
        return True

    def _second_connection(self, peer: Peer, peer_id: bytes) -> bool:
        """Two connections to one peer (two peers that dial each other, as a tracker has
        them do): one goes, the same one at both ends. Kept both, each block was asked
        of the peer on both (a fifth of a download fetched twice). Looked at when a
        connection says its peer id, and again when one that dialled us says (BEP 10
        ``p``) where it listens. True if ``peer``'s connection is the one that went.

        A peer id proves nothing: anyone who connects to a peer reads it, and a stranger
        that dialled us claiming it closed our connection to the peer, which was then
        never dialled again. So a connection that dialled us from the address we dialled
        is taken for that peer's only when it says it listens at the port we dialled;
        else it claims the id: it goes and ours stays, unless it is the older and blocks
        went over it (a peer whose port is forwarded from another: both ends close the
        newer). Two dials crossing (opened together, no block over either yet): the one
        dialled by the greater peer id stays, as libtorrent decides it at the other end.
        Any other pair: the newer goes (two that dialled us are never dials crossing).
        One that dialled us from the other family's address (IPv4 and IPv6) and says it
        listens where we dialled is not closed (nothing tells it from a stranger's claim,
        which would close ours): nothing is asked of it while ours lasts, as the peer at
        the other end asks on its own dial only: no block comes twice."""
        peer.peer_id = peer_id
        other = next((p for p in self.peers if p is not peer and not p.closed
                      and p.peer_id == peer_id and _one_peer(p, peer)), None)
        if other is None:
            return False
        newer = peer if peer.opened >= other.opened else other
        duplicate = True
        if (peer.stranger is None) != (other.stranger is None):
            ours, theirs = (peer, other) if peer.stranger is None else (other, peer)
            if theirs.host != ours.host:
                if theirs.muted_for is None:
                    theirs.muted_for = ours
                    log.info("%s: the peer of %s, at another address: asked on that one",
                             theirs.addr, ours.addr)
                    self._fill(theirs)  # (not interested there)
                return False
            if not _listens_at(theirs, (ours.host, ours.port)):
                if theirs.conn.extended and not theirs.said_where:
                    asyncio.get_running_loop().call_later(
                        SAY_WHERE_SECONDS, self._said_nothing_of_where, theirs)
                    return False  # (decided once its extension handshake says where)
                if newer is ours and (theirs.blocks or theirs.served):
                    gone = ours  # (a forwarded port, or a stranger that trades: tried again)
                    duplicate = False
                else:
                    gone = theirs  # a claim of the id: our dial stays
            elif abs(peer.opened - other.opened) <= DUPLICATE_FRESH and not (
                    other.blocks or other.served or peer.blocks or peer.served):
                gone = theirs if self.peer_id > peer_id else ours
            else:
                gone = newer
        else:
            gone = newer
        log.info("%s: a second connection to the peer of %s: %s closed", peer.addr, other.addr,
                 "the first" if gone is other else "this one")
        # Its address is not dialled again while the other lasts (see _elsewhere).
        gone.duplicate = duplicate
        if gone.stranger is not None and not (gone.served or gone.blocks) and (
                gone.queued + sum(len(m) for m in gone.conn.outbox) <= SAY_WHO_BYTES):
            # Our handshake goes out first (all that is queued for it): the peer learns
            # who we are, and that we are connected, instead of a failed dial, which it
            # dialled again, and again, for as long as the other connection lasted.
            gone.say_who = True
        self._drop(gone)
        return gone is peer

    def _said_nothing_of_where(self, peer: Peer) -> None:
        """A connection with a duplicate waited for its extension handshake in vain."""
        if not peer.closed and not peer.said_where:
            peer.said_where = True
            self._second_connection(peer, peer.peer_id)

    async def _serve_peer(self, peer: Peer) -> None:
        self.peers.add(peer)
        peer.conduct.live += 1
        _nodelay(peer.transport)
        inbox = peer.inbox
        peer.transport.set_write_buffer_limits(high=SEND_AHEAD // 2, low=SEND_LOW_WATER)
        inbox.on_drain = lambda: self._pump_reads(peer)
        try:
            peer.flush()
            while not peer.closed:
                data = await inbox.receive()
                if data is None:
                    peer.hung_up = not peer.closed
                    break
                asked = False
                try:
                    for n, ev in enumerate(peer.conn.receive(data)):  # blocks: views of data
                        if n & TURN_EVENTS == TURN_EVENTS:
                            # A long run of events lets the other peers and the daemon's
                            # replies have their turn: one peer's MiB of requests, or of
                            # haves, is not every other peer's wait.
                            await asyncio.sleep(0)
                            if peer.closed:
                                break
                        if type(ev) is wire.Piece:  # a download's message: no coroutine
                            late = self._take_block(peer, ev)
                            if late:
                                peer.held_since = time.monotonic()
                                try:
                                    await self._write_late(ev.piece, late)
                                finally:
                                    peer.release()
                        elif type(ev) is wire.Request:  # queued by the connection:
                            asked = True  # its reads start once, after the lot
                        else:
                            peer.held_since = time.monotonic()  # (what it waits on: ours)
                            try:
                                await self._handle(peer, ev)
                            finally:
                                peer.release()
                            if peer.closed:  # (dropped by what it said: the rest is moot)
                                break
                            if type(ev) in _ANSWERED and not await self._sent(peer):
                                break
                finally:
                    inbox.consumed()
                if inbox.filled and peer.conn.handshaken:
                    inbox.grow(STREAM_LIMIT)
                if asked:
                    self._pump_reads(peer)
                peer.flush()
                if peer.transport.get_write_buffer_size() > 4 * 1024 * 1024:
                    await inbox.drain()
        except Ourselves:
            peer.conduct.ourselves = True  # (an address we dialled: not dialled again)
            peer.flush()  # (our answer, when it dialled us)
            log.info("%s is ourselves", peer.addr)
        except WireError as exc:
            log.info("%s broke the protocol: %s", peer.addr, exc)
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
            peer.hung_up = not peer.closed
            log.info("%s: %s", peer.addr, exc)
        finally:
            self._drop(peer)
            inbox.release()

    def _idlest(self, but: Peer | None = None) -> Peer | None:
        """A peer whose place a newcomer may take: one that has not handshaken in
        SILENT_SECONDS (first: the one connected longest), else one that has not read what we sent
        for STALL_SECONDS, one that wasted an unchoke slot and waits for another, one
        interested in nothing either way for IDLE_SECONDS, or one we want pieces from
        that has sent none for UNPRODUCTIVE_SECONDS, nor unchoked us, and chokes us
        (none of our requests waiting on it) or let our requests time out, while we do
        not serve it (connections that hold a place and give nothing must not shut
        everyone else out); the one connected longest. A peer given up so is dialled
        again only after RETRY_MAX, not at once (to take a place back)."""
        silent = self._silent(p for p in self.peers if p is not but and not p.unplaced)
        if silent is not None:
            return silent
        now = time.monotonic()
        idle = [p for p in self.peers if not p.closed and p is not but and not p.unplaced
                and p.held_since is None and (
            p.stalled(now) or (p.conn.stalls and p.conn.am_choking)
            or (now - p.opened >= IDLE_SECONDS and not p.conn.am_interested
                and not p.conn.peer_interested)
            or (p.conn.am_interested and (p.conn.am_choking or not p.conn.peer_interested)
                and ((p.conn.peer_choking and not p.conn.our_requests) or p.conn.snubbed)
                and now - max(p.opened, p.conn.last_block, p.conn.unchoked_us_at)
                >= UNPRODUCTIVE_SECONDS))]
        return min(idle, key=lambda p: p.opened, default=None)

    @staticmethod
    def _silent(peers: Iterable[Peer]) -> Peer | None:
        """Of ``peers``, the one connected longest that has not handshaken in
        SILENT_SECONDS (see there), or None."""
        now = time.monotonic()
        return min((p for p in peers if not p.closed and not p.conn.handshaken
                    and now - p.opened >= SILENT_SECONDS), key=lambda p: p.opened, default=None)

    def _placed_peers(self) -> int:
        """The places of --max-peers held: newcomers waiting for their handshake hold
        none."""
        return sum(not p.unplaced for p in self.peers)

    def _placed(self, peer: Peer) -> bool:
        """A peer let in over --max-peers has handshaken for our torrent: a peer holding
        a place gives it up to it (see _idlest and TURNOVER_SECONDS), or it is dropped.
        (Decided at once on the connection, a bare connect, a port scan, dropped a
        leecher in the middle of its download.)"""
        peer.unplaced = False
        if self._placed_peers() <= self.opts.max_peers:  # (one left meanwhile)
            return True
        gone = self._idlest(but=peer)
        why = "it holds a place and gives nothing"
        if gone is None:
            gone = self._turned_over(peer)
            why = "its address holds the most places, and it moved the least"
        if gone is None:
            log.info("%s: no place for it", peer.addr)
            self._drop(peer)
            return False
        log.info("%s: dropped for a newcomer (%s)", gone.addr, why)
        gone.replaced = True
        self._drop(gone)  # its place goes to the newcomer, as in libtorrent
        return True

    def _turned_over(self, newcomer: Peer) -> Peer | None:
        """When every place is held and none idles: the peer whose place ``newcomer``
        takes (see TURNOVER_SECONDS), or None. Of those the rule
        offers, the one that moved the fewest bytes of blocks (both ways) for its time
        connected, those connected TURNOVER_SECONDS or longer first; never one we
        download from now (it unchoked us and our requests wait on it, not timed out, or
        it sent a block within TURNOVER_SECONDS)."""
        now = time.monotonic()
        groups: dict[object, list[Peer]] = {}
        for p in self.peers:
            if not p.closed and p is not newcomer and not p.unplaced:
                groups.setdefault(p.group, []).append(p)
        if not groups:
            return None
        mine = groups.get(newcomer.group, [])
        most = max(groups.values(), key=len)
        if len(most) >= len(mine) + 2:
            pool = most
        elif mine and len(mine) == len(most):
            pool = [p for p in mine if now - p.opened >= TURNOVER_SECONDS]
        else:
            return None
        pool = [p for p in pool if not (
            (p.conn.our_requests and not p.conn.peer_choking and not p.conn.snubbed)
            or now - p.conn.last_block < TURNOVER_SECONDS)]
        return min(pool, default=None, key=lambda p: (
            now - p.opened < TURNOVER_SECONDS,
            (p.served + p.conn.downloaded) / max(now - p.opened, 1.0)))

    def count_unasked(self, peer: Peer) -> None:
        """The blocks the peer sent unasked (cancelled, sent all the same) are bytes that
        came for nothing too: counted once, as the peer leaves or the transfer ends."""
        self.summary.bytes_redundant += peer.conn.unasked
        peer.conn.unasked = 0

    async def _sent(self, peer: Peer) -> bool:
        """Send what is queued for the peer; past OUT_LIMIT unsent, wait for it to read
        (what one message makes us send can be large: a HASHES answer is up to 256 KiB
        for a request of 53 bytes). False once the connection is closing."""
        peer.flush()
        if peer.transport.get_write_buffer_size() > OUT_LIMIT:
            await peer.inbox.drain()
        return not (peer.closed or peer.transport.is_closing())

    def _drop(self, peer: Peer) -> None:
        peer.close()
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        for p in self.peers:
            if p.muted_for is peer:  # (the peer's other connection: asked on from now)
                p.muted_for = None
        self.count_unasked(peer)
        peer.conduct.live -= 1
        if peer.conn.handshaken:
            log.info("%s: gone", peer.addr)
        if self.picker is not None:
            self.picker.peer_gone(peer)
            if peer.seed_counted:
                self.picker.seed_gone()
                self.picker.peer_has(where(peer.counted, 0))  # (its DONT_HAVEs undone)
            else:
                self.picker.peer_lost(where(peer.counted))
            self._fill_all()
        if not peer.conn.am_choking and peer.conn.peer_interested:
            self._choke_round()  # its unchoke slot is free: the peer waiting longest gets it

    # -- messages from a peer -----------------------------------------------------------------
    async def _handle(self, peer: Peer, ev: wire.Event | DontHave | MetadataRequest) -> None:
        if type(ev) is wire.Piece:  # the message of a download: tested first
            await self._block(peer, ev)
            return
        picker = self.picker
        assert picker is not None
        conn = peer.conn
        if isinstance(ev, wire.Handshake):
            if peer.stranger is not None and not self._known_stranger(peer, ev.peer_id):
                return
            if self._second_connection(peer, ev.peer_id):
                return
            if peer.unplaced and not self._placed(peer):
                return
            self.summary.peers += 1
            log.info("%s: connected", peer.addr)
            await self.settled.wait()  # (the daemon said pieces changed: what it has now)
            conn.send_bitfield(picker.have)
        elif type(ev) is wire.Extended and ev.ext_id == 0:
            peer.said_where = True  # (its p, if it has one)
            if peer.stranger is not None and peer.peer_id:
                self._second_connection(peer, peer.peer_id)
        elif isinstance(ev, (wire.Bitfield, wire.HaveAll, wire.HaveNone)):
            # The connection takes one of them only, before any HAVE: nothing was counted
            # of this peer before. A connection costs no walk of every piece in Python
            # (a stream of them, each saying HAVE_ALL, held the loop 0.2 s each with a
            # million pieces).
            n = conn.num_pieces
            if type(ev) is wire.HaveNone:
                self._fill(peer)  # (nothing to ask it for)
                return
            told = (bytearray(wire.pieces_from_bits(ev.bits, n)) if type(ev) is wire.Bitfield
                    else bytearray(b"\x01") * n)
            peer.counted = told
            if told.find(0) < 0:
                peer.seed_counted = True
                picker.seed_came()
            else:
                picker.peer_has(where(told))
            peer.wanted = self._wanted(peer)
            self._fill(peer)
        elif isinstance(ev, wire.Have):
            peer.refused.discard(ev.piece)  # (it may have lost it, and got it back)
            if not peer.counted[ev.piece]:
                peer.counted[ev.piece] = 1
                picker.peer_has((ev.piece,))
                if not picker.have[ev.piece] and ev.piece not in peer.banned:
                    peer.wanted += 1
            self._fill(peer)
        elif type(ev) is DontHave:
            if peer.counted[ev.piece]:
                peer.counted[ev.piece] = 0
                picker.peer_lost((ev.piece,))
                if not picker.have[ev.piece] and ev.piece not in peer.banned:
                    peer.wanted -= 1
            self._fill(peer)  # (no longer interested, when that was all it had for us)
        elif isinstance(ev, (wire.Unchoke, wire.AllowedFast)):
            if type(ev) is wire.Unchoke:
                peer.refused.clear()
            self._fill(peer)
        elif isinstance(ev, wire.Choke):
            if not conn.fast:
                picker.peer_gone(peer)
                self._fill_all()
        elif isinstance(ev, wire.Piece):
            await self._block(peer, ev)
        elif isinstance(ev, wire.RejectRequest):
            # Not asked of it again until it unchokes us anew: a peer that rejects every
            # request would otherwise be asked for the same block again at once, for ever.
            peer.refused.add(ev.piece)
            picker.request_dropped(peer, (ev.piece, ev.begin, ev.length))
            self._fill(peer)
        elif isinstance(ev, wire.Interested):
            self._choke_round(newcomer=peer)
            await self._suggest(peer)
        elif isinstance(ev, wire.NotInterested):
            self._choke_round()
        elif isinstance(ev, wire.Request):
            self._pump_reads(peer)
        elif type(ev) is MetadataRequest:
            conn.send_metadata(ev)
        elif isinstance(ev, wire.HashRequest):
            hashes = self.hash_server.answer(ev.pieces_root, ev.base_layer, ev.index,
                                             ev.length, ev.proof_layers)
            if hashes is None:
                conn.send_hash_reject(ev)
            else:
                conn.send_hashes(ev, hashes)
                self.summary.hash_requests_served += 1

    def _wanted(self, peer: Peer) -> int:
        """How many pieces the peer has that we lack (and have not banned it for),
        counted a byte a piece at C speed: each flag is 0 or 1, so the have-arrays read
        as integers have one bit a piece."""
        picker = self.picker
        assert picker is not None
        have, counted = picker.have, peer.counted
        lacked = int.from_bytes(counted, "little") & ~int.from_bytes(have, "little")
        return lacked.bit_count() - sum(1 for p in peer.banned if counted[p] and not have[p])

    async def _block(self, peer: Peer, ev: wire.Piece) -> None:
        late = self._take_block(peer, ev)
        if late:
            await self._write_late(ev.piece, late)

    def _take_block(self, peer: Peer, ev: wire.Piece) -> list[Ready[Conduct]]:
        """A block from ``peer``, handed to the daemon connection without a coroutine (a
        download has 65,536 a GiB); returns the blocks it could not take at once, to be
        awaited with :meth:`_write_late`."""
        picker = self.picker
        assert picker is not None
        piece = ev.piece
        data = ev.data
        blk = (piece, ev.begin, len(data))
        peer.blocks += 1
        again = picker.have[piece] or blk in picker.received
        for other in picker.block_received(blk):
            if other is not peer and isinstance(other, Peer):
                other.conn.send_cancel(blk)
                other.flush()
        late: list[Ready[Conduct]] = []
        if again:
            self.summary.bytes_redundant += len(data)
        if self.away or (self._shunned and self._shunning(piece)):
            # Dropped: the piece starts over once the daemon is back, or is begun again.
            if not again:  # (so it came for nothing)
                self.summary.bytes_redundant += len(data)
        elif not picker.have[piece]:
            if not again:
                self.summary.bytes_down += len(data)
            client = self.client
            blame = self.blame
            ready = self.order.arrived(piece, ev.begin, data, peer.conduct)
            for k, (begin, block, giver) in enumerate(ready):
                if not client.try_write_block_direct(self.ih, piece, begin, block):
                    late = ready[k:]
                    break
                # Recorded as it is written: the order the daemon has the copies in (a
                # block written late may come after another peer's copy of it).
                blame.block(piece, begin, giver, block)
        conn = peer.conn
        if len(conn.our_requests) <= conn.queue_size // 2:
            self._fill(peer)  # in batches of half the pipeline: one send, not one per block
        return late

    def _shunning(self, piece: int) -> bool:
        """Whether a block of the piece is dropped: the daemon refused one of it, and it
        has not been begun again since."""
        if piece not in self._shunned:
            return False
        assert self.picker is not None
        if piece in self.picker.started:
            self._shunned.discard(piece)
            return False
        return True

    async def _write_late(self, piece: int, blocks: list[Ready[Conduct]]) -> None:
        for begin, data, giver in blocks:
            try:
                await self.client.write_block_direct(self.ih, piece, begin, data)
            except OSError:  # (the daemon went)
                if self.client.failure is not None:
                    self._lost()
                return  # (the piece starts over once the daemon is back: see _back)
            except PiecedError as exc:  # (refused before it was sent: see _write_refused)
                self._storage_failed(f"a block could not be written: {_describe(exc)}")
                return
            if not self.picker_has(piece):  # (written now: nothing ran in between)
                self.blame.block(piece, begin, giver, data)

    def _write_refused(self, exc: PiecedError) -> None:
        """A block the daemon refused (each write's error comes here with its reply, not
        raised by the next call). Refused for want of room for one more piece in
        progress (``max_partial_pieces``: TOO_LARGE, EBUSY), the block's piece is asked
        for again, and fewer are begun at once; any other refusal, the piece would
        never verify: stop, saying why."""
        block = exc.block
        if not (isinstance(exc, TooLarge) and exc.errno == errno.EBUSY and block is not None
                and block[0] == self.ih):
            self._storage_failed(_REMOVED if isinstance(exc, UnknownTorrent) else
                                 f"the daemon refused a block: {_describe(exc)}")
            return
        self.summary.blocks_refused += 1
        picker = self.picker
        piece = block[1]
        if picker is None or picker.have[piece]:
            return
        # Its blocks asked for are cancelled, and those that come all the same dropped
        # until it is begun again: written, they would be refused again, or, taken once
        # the daemon has room, start a piece in progress we do not wait for.
        for blk, who in picker.asked(piece):
            for other in who:
                if isinstance(other, Peer):
                    other.conn.send_cancel(blk)
                    other.flush()
        self._shunned.add(piece)
        self.order.forget(piece)
        self.blame.forget(piece)
        picker.refused((piece,))
        if not self._refill_soon:
            self._refill_soon = True
            log.info("the daemon has no room for more pieces in progress: at most %d under "
                     "way from now (%s)", int(picker.max_started or 0), _describe(exc))
            asyncio.get_running_loop().call_later(picker.held_for(), self._refill)

    def _refill(self) -> None:
        """The pieces refused asked for again, once the picker's hold (if any) is over."""
        wait = self.picker.held_for() if self.picker is not None else 0.0
        if wait:
            asyncio.get_running_loop().call_later(wait, self._refill)
            return
        self._refill_soon = False
        self._spawn(self._refill_ours())

    async def _refill_ours(self) -> None:
        """The pieces the daemon holds in progress of ours that we no longer fetch taken
        up first, then the rest asked for. Writes are pipelined: a block of a piece sent
        before the refusal of an earlier one came back is taken once the daemon has room,
        and begins a piece we had given up. Left so, it held a place for ever; at a bound
        of one or two, every piece begun after it was refused, and the download stopped."""
        if self.picker is not None and not self.away:
            with contextlib.suppress(OSError):  # (a loss: told apart, see _lost)
                st = await self._status_held()
                for piece, spans in st.get("partial", []):
                    self._resume(piece, spans)
        self._fill_all()

    def _no_source_left(self) -> bool:
        """Stop a download whose every peer was dropped for bad data, or which lacks
        only pieces that failed with every peer that has them (:meth:`_rotten`), when no
        other peer can come (no listening socket, no tracker, nobody being dialled): it
        would wait for ever, saying nothing."""
        if (self.opts.seed or self.done.is_set() or self.server is not None
                or self.trackers or self.connecting or not self.known):
            return False
        if not self.peers and all(d.dropped for d in self.known.values()):
            if self.no_source is None:
                dropped = sorted(_address(*a) for a, d in self.known.items()
                                 if not d.conduct.ourselves)
                left = self.picker.left() if self.picker is not None else self.meta.num_pieces
                self.no_source = (
                    f"every peer was dropped for sending bad data ({', '.join(dropped[:10])}"
                    f"{', ...' if len(dropped) > 10 else ''}) and no other can come: "
                    f"{_pieces(left)} missing")
        else:
            rotten = self._rotten()
            if not rotten:
                return False
            left = self.picker.left() if self.picker is not None else self.meta.num_pieces
            self.no_source = (
                f"piece{'s' if len(rotten) > 1 else ''} "
                f"{', '.join(map(str, rotten[:10]))}{', ...' if len(rotten) > 10 else ''} "
                f"failed {MAX_PIECE_TRIES} times with the data of every peer that has "
                f"{'them' if len(rotten) > 1 else 'it'}, and no other peer can come: "
                f"{_pieces(left)} missing")
        log.info("stopping: %s", self.no_source)
        self.stop.set()
        return True

    def _rotten(self) -> list[int]:
        """The pieces we lack, when every one of them has been tried MAX_PIECE_TRIES times
        with every connected peer that has it (and at least one peer has each): nothing
        else is to come from these peers. Empty while any piece can still be had."""
        picker = self.picker
        if picker is None or not any(
                max(p.conduct.tries.values(), default=0) >= MAX_PIECE_TRIES for p in self.peers):
            return []
        rotten = []
        for piece in range(self.meta.num_pieces):
            if picker.have[piece]:
                continue
            sources = [p for p in self.peers if p.counted[piece]]
            if not sources or any(p.conduct.tries.get(piece, 0) < MAX_PIECE_TRIES
                                  for p in sources):
                return []
            rotten.append(piece)
        return rotten

    def _storage_failed(self, why: str) -> None:
        if self.storage_error is None:
            self.storage_error = why
            log.info("stopping: %s", why)
        self.stop.set()

    # -- what we ask for ---------------------------------------------------------------------
    def _fill(self, peer: Peer, soon: bool = False) -> None:
        """Ask the peer for more, if it has what we lack; sent at once, or with ``soon``
        at the end of the turn (see :meth:`_flush_soon`)."""
        picker = self.picker
        if picker is None or peer.closed or not peer.conn.handshaken or self.away:
            return  # (nothing is asked for while the daemon is away: see _back)
        conn = peer.conn
        wanted = peer.wanted > 0 and peer.muted_for is None
        conn.send_interested(wanted)
        if wanted:
            room = conn.queue_size - len(conn.our_requests)
            allowed = None
            if conn.peer_choking:
                allowed = [p for p in conn.allowed_fast if p not in peer.banned] if conn.fast else []
            if room > 0 and (allowed is None or allowed):
                mask = peer.counted
                if peer.banned or peer.refused:
                    mask = bytearray(mask)
                    for p in (*peer.banned, *peer.refused):
                        mask[p] = 0
                conn.send_requests(picker.pick(
                    peer, mask, room, allowed, outstanding=len(conn.our_requests),
                    peer_count=conn.peer_count, endgame=not conn.snubbed, live=_live,
                    solo_elsewhere=lambda piece: self._serves_elsewhere(piece, peer)))
        if soon:
            self._flush_soon(peer)
        else:
            peer.flush()

    def _flush_soon(self, peer: Peer) -> None:
        """Send the peer what is queued for it once this turn of the loop is over. The
        daemon's events come in batches (a group commit announces tens of pieces at
        once): a HAVE, a SuggestPiece and a few requests a piece, each batch is then one
        send to each peer, not several a piece."""
        if not self._to_flush:
            asyncio.get_running_loop().call_soon(self._flush_queued)
        self._to_flush[peer] = None

    def _flush_queued(self) -> None:
        peers, self._to_flush = self._to_flush, {}
        for p in peers:
            p.flush()

    def _fill_all(self) -> None:
        for p in list(self.peers):
            self._fill(p)

    def _trust(self, peer: Peer, piece: int) -> tuple[int, int, int, int]:
        """How far a peer is from trusted with a piece asked of one peer alone (lower
        is better): whether it does not send what it is asked for (see _live), how many
        peers of its address were dropped for bad data (a liar comes back with another
        peer id), the pieces that failed with its data, its failed tries of this one."""
        conduct = peer.conduct
        return (not _live(peer), self.liars.get(conduct.group, 0) if conduct.group else 0,
                conduct.bad, conduct.tries.get(piece, 0))

    def _serves_elsewhere(self, piece: int, but: Peer) -> bool:
        """Whether a piece asked of one peer alone is better asked of another than
        ``but``: one that sends what it is asked for, has the piece, may be asked for it
        now, and is trusted more (see _trust)."""
        mine = self._trust(but, piece)
        return any(q is not but and not q.closed and _live(q) and _may_ask(q, piece)
                   and self._trust(q, piece) < mine for q in self.peers)

    # -- what we give -------------------------------------------------------------------------
    def _pump_reads(self, peer: Peer) -> None:
        """Start reads for the peer's queued requests. Requests for consecutive blocks of
        one piece (what peers send) are read from the daemon as one range of up to
        READ_BYTES: one round trip for many blocks."""
        queue = peer.conn.peer_requests
        if self.away and not peer.closed:  # (choked: those of its fast pieces)
            while queue:
                peer.conn.send_reject(queue.popleft())
            peer.flush()
            return
        if self.client.failure is not None or peer.closed:
            return  # nothing to read from (we are stopping), or nobody to send to
        limit = min(READ_BYTES, self.client.core.max_frame - 1024)  # a DATA frame holds it
        transport = peer.transport
        while (queue and peer.reads < self.reads_per_peer and not peer.inbox.writing_paused
               and peer.reading + transport.get_write_buffer_size() < SEND_AHEAD):
            run = [queue.popleft()]
            size = run[0][2]
            while queue and size + queue[0][2] <= limit:
                nxt, last = queue[0], run[-1]
                if nxt[0] != last[0] or nxt[1] != last[1] + last[2]:
                    break
                run.append(queue.popleft())
                size += nxt[2]
            peer.reads += 1
            peer.reading += size
            self._spawn(self._serve_blocks(peer, run))

    async def _serve_blocks(self, peer: Peer, run: list[Block]) -> None:
        piece, begin = run[0][0], run[0][1]
        size = sum(b[2] for b in run)
        try:
            assert self.picker is not None
            await self.settled.wait()  # (pieces may have gone: not served until known)
            if not self.picker.have[piece]:
                for blk in run:
                    peer.conn.send_reject(blk)
                return
            try:
                chunk = await self.client.read_chunk_ring(self.ih, piece, begin, size)
            except OSError:  # (the daemon went: each request is answered all the same)
                for blk in run:
                    peer.conn.send_reject(blk)
                if self.client.failure is not None:
                    self._lost()
                return
            except PiecedError as exc:
                if isinstance(exc, UnknownTorrent):  # removed by another client: stop
                    self._storage_failed(_REMOVED)
                else:
                    log.warning("read of piece %d for %s failed: %s", piece, peer.addr, exc)
                for blk in run:
                    peer.conn.send_reject(blk)
                return
            with chunk:
                if peer.closed or peer.transport.is_closing():
                    return  # gone while it was read: nothing is sent (nor counted up)
                data = chunk.data
                conn = peer.conn
                for blk in run:
                    if conn.am_choking and piece not in conn.given_fast:
                        conn.send_reject(blk)  # choked while it was being read
                        continue
                    off = blk[1] - begin
                    conn.send_piece(blk, data[off : off + blk[2]])
                    self.summary.bytes_up += blk[2]
                    peer.served += blk[2]
                    if not peer.sent:
                        peer.sent = bytearray(conn.num_pieces)
                    peer.sent[piece] = 1
                    peer.served_at = time.monotonic()
                if begin == 0:  # the piece is in the daemon's cache now: offer it around
                    self._offer(piece, but=peer)
                # The kernel or the transport has its own copy once this returns; a closed
                # peer's queue is dropped: nothing refers to the ring's bytes after.
                peer.flush()
        finally:
            peer.reads -= 1
            peer.reading -= size
            peer.flush()
            if not peer.closed:
                self._pump_reads(peer)

    async def _suggest_unchoked(self) -> None:
        for p in list(self.peers):
            if p.conn.peer_interested and not p.conn.am_choking and not p.closed:
                await self._suggest(p)

    async def _suggest(self, peer: Peer, pieces: Iterable[int] | None = None) -> None:
        """Offer pieces the daemon holds in memory: a peer that takes them is served
        without a disk read."""
        if not peer.conn.fast or self.picker is None:
            return
        if pieces is None:
            now = time.monotonic()
            if now - self._cached_at >= CACHED_ASK_SECONDS:
                # Asked of the daemon at most so often, whoever turns interested: a peer
                # saying INTERESTED and NOT_INTERESTED in turn made one request each.
                self._cached_at = now
                try:
                    self._cached = await self.client.cached_pieces(self.ih)
                except PiecedError:
                    return
            pieces = self._cached
        sent = 0
        for p in pieces:
            if sent >= SUGGESTS_PER_PEER:
                break
            if self.picker.have[p] and not peer.conn.peer_has[p] and p not in peer.suggested:
                peer.suggested.add(p)
                peer.conn.send_suggest(p)
                self.summary.suggests_sent += 1
                sent += 1
        peer.flush()

    def _offer(self, piece: int, but: Peer | None = None) -> None:
        """Suggest a piece just verified or read to the interested peers that lack it."""
        for p in self.peers:
            conn = p.conn
            if (p is not but and conn.fast and conn.handshaken and conn.peer_interested
                    and not conn.peer_has[piece] and piece not in p.suggested
                    and len(p.suggested) < 4096):
                p.suggested.add(piece)
                conn.send_suggest(piece)
                self.summary.suggests_sent += 1
                self._flush_soon(p)

    def _choke_round(self, newcomer: Peer | None = None, rotate: bool = True) -> None:
        """Unchoke up to ``--upload-slots`` interested peers; the rest take turns (called
        every CHOKE_INTERVAL: see ``choke_round``; between rounds, every second, with
        ``rotate`` off). A ``newcomer`` that became interested is unchoked at once if a
        slot is free, or held by a peer that reads nothing."""
        if self.away:  # (every peer choked until the daemon is back)
            return
        now = time.monotonic()
        if newcomer is not None:
            if not newcomer.conn.am_choking:
                return
            unchoked = [p for p in self.peers if p.conn.peer_interested
                        and not p.conn.am_choking and not p.closed]
            if len(unchoked) >= self.opts.upload_slots:
                patience = STALL_SECONDS if newcomer.stalled(now, LAG_SECONDS) else LAG_SECONDS
                why, stuck = next(((w, p) for p in unchoked
                                   if (w := p.wastes_slot(now, patience))), (None, None))
                if stuck is None:
                    return
                log.info("%s %s: its unchoke slot goes to %s", stuck.addr, why, newcomer.addr)
                stuck.conn.note_stall()
                stuck.conn.send_choke(True)
                stuck.flush()
            newcomer.conn.send_choke(False)
            newcomer.flush()
            return
        by_conn = {p.conn: p for p in self.peers if not p.closed}
        # Peers waiting for a slot that take nothing we send (the rejects of what they
        # asked while choked) wait last: peers that never read, come a moment before a
        # leecher, took every slot in turn, STALL_SECONDS each, before it had one. While
        # one that reads waits, a slot is wasted after LAG_SECONDS.
        lagging = {c for c, p in by_conn.items()
                   if c.am_choking and c.peer_interested and p.stalled(now, LAG_SECONDS)}
        patience = (LAG_SECONDS if any(c.am_choking and c.peer_interested and c not in lagging
                                       for c in by_conn) else STALL_SECONDS)
        stalled: dict[PeerConnection, str] = {
            c: why for c, p in by_conn.items() if (why := p.wastes_slot(now, patience))}
        stalled.update((c, "takes nothing we send") for c in lagging)
        choke, unchoke = choke_round(by_conn, self.opts.upload_slots, stalled, rotate)
        for conn in choke:
            if conn in stalled:
                log.info("%s %s: its unchoke slot goes to another", by_conn[conn].addr,
                         stalled[conn])
            conn.send_choke(True)
            by_conn[conn].flush()
        for conn in unchoke:
            log.debug("%s unchoked", by_conn[conn].addr)
            conn.send_choke(False)
            by_conn[conn].flush()

    # -- the daemon's events ------------------------------------------------------------------
    def _on_event(self, name: str, msg: dict[str, Any]) -> None:
        if name == "disk_error":
            piece = msg.get("piece")
            where = f" (piece {piece})" if isinstance(piece, int) else ""
            if msg.get("changed") == 1:
                # A piece's bytes changed on disk behind the daemon's back: verified no
                # more (its pieces_changed follows), fetched again like a piece a recheck
                # failed; the other pieces are served and fetched on.
                log.warning("the daemon found a piece changed on disk%s: %s", where,
                            msg.get("message", ""))
                return
            self._storage_failed(f"the daemon met an error on the torrent's files{where}: "
                                 f"{msg.get('message', 'I/O error')} (errno {msg.get('errno')})")
            return
        picker = self.picker
        if picker is None:
            self._early.append((name, msg))
            return
        if name == "pieces_changed":  # (a check, another client's): the daemon is asked
            self.settled.clear()
            self._look_again()
            return
        if name not in ("piece_verified", "piece_failed"):
            return
        piece = int(msg.get("piece", -1))
        if not 0 <= piece < self.meta.num_pieces:
            return
        self.order.forget(piece)
        self._told.add(piece)
        # Whose blocks the attempt had (the daemon numbers its connections): ours alone,
        # ours among others', or none of ours. (None: a daemon that does not say.)
        writers, me = msg.get("writers"), self.client.core.conn
        if writers is None or me is None:
            alone = ours = True
        else:
            alone, ours = writers == [me], me in writers
        if name == "piece_verified":
            if writers is not None and me is not None and any(
                    isinstance(w, int) and 0 < w < me for w in writers):
                # An older connection of the daemon wrote into it: another client on
                # this torrent fetches that run of pieces. The younger leaves it (both
                # leaving it, or neither, it would be fetched twice all the same).
                picker.left_to_others(piece)
            # Earlier attempts are compared with this one only if it was all ours: else
            # what we sent of it may not be what verified.
            liars = self.blame.verified(piece, reference=alone)
            if picker.have[piece]:
                return
            self._gained(piece)
            for liar in liars:
                self._blame(liar, piece)  # its block of a failed attempt was not this
            return
        if picker.have[piece]:  # verified no more (another client cleared it)
            log.info("piece %d is not verified in the daemon any more: fetched again", piece)
            self._piece_lost(piece)
            return
        picker.piece_failed(piece)
        if not (msg.get("v1") == 0 or msg.get("v2") == 0):
            # Not a hash that failed: its bytes could not be made durable, or were lost
            # with their file. No peer is to blame; the piece is fetched again.
            self.blame.forget(piece)
            log.info("piece %d was not stored: fetched again", piece)
            self._fill_all()
            return
        if not ours:  # another client's attempt alone: no verdict, nothing of ours lost
            self.blame.forget(piece)
            log.info("piece %d failed its hash (another client's blocks)", piece)
            self._fill_all()
            return
        givers = self.blame.givers(piece)
        if givers:  # (else another client's: not ours to count)
            self.summary.pieces_failed += 1
        log.info("piece %d failed its hash (data from %d peers)", piece, len(givers))
        if len(givers) > 1:  # (its next attempt says which lied, or that the one did not)
            picker.ask_of_one(piece)
        # With another connection's blocks in the attempt, one of theirs may be the bad
        # one: no verdict until the piece verifies (its only giver; else known then).
        unsure = self.blame.unsure(piece)
        liars = self.blame.failed(piece, alone)
        for liar in liars:
            self._blame(liar, piece)
        if unsure and not liars:
            for giver in givers:  # no verdict: a try of the piece with each, no blame
                giver.tries[piece] = giver.tries.get(piece, 0) + 1
                self._ban(giver, piece)
        self._fill_all()

    def _gained(self, piece: int, fill: bool = True) -> None:
        """The daemon has the piece verified: say so to every peer, offer it around; the
        download ends once the daemon confirms it has them all. (``fill``: ask the peers
        for more now; a reconcile that gains many pieces does so once, at its end.)"""
        assert self.picker is not None
        # Blocks of it still asked for (another client verified it first: a second
        # pieced-peer on the same torrent, or a restart's reconcile) are cancelled: each
        # would come for nothing, and take the place of one that would not.
        for blk, who in self.picker.asked(piece):
            for other in who:
                if isinstance(other, Peer):
                    other.conn.send_cancel(blk)
        self.picker.piece_verified(piece)
        self._progress_at = time.monotonic()
        self.unavailable = 0  # (counted again if the download comes to wait again)
        for p in list(self.peers):
            if p.counted[piece] and piece not in p.banned:
                p.wanted -= 1
            if p.conn.handshaken:
                p.conn.send_have(piece)
            if fill:
                self._fill(p, soon=True)
            else:
                self._flush_soon(p)
        self._offer(piece)
        if fill and self.picker.complete and not self.done.is_set() and not self._confirming:
            self._look_again()

    def _piece_lost(self, piece: int) -> None:
        """The daemon no longer has the piece verified: not served (a peer asking is
        refused), and fetched again."""
        assert self.picker is not None
        self.picker.piece_lost(piece)
        self.summary.complete = False
        lost = self._losses[piece] = self._losses.get(piece, 0) + 1
        if lost >= LOSSES_PER_PIECE:
            self._storage_failed(
                f"piece {piece} was verified, then taken back by the daemon {lost} times: "
                "its bytes keep changing on disk (another client writing other bytes into "
                "its files, a torrent that shares a file path with this one but not its "
                "contents? or its files changed behind the daemon's back, as rechecks "
                "found); stopping rather than fetching it again for ever")
        if self.done.is_set():  # (seeding) the peers left once we had it all: dial again
            self.done.clear()
            now = time.monotonic()
            for dial in self.known.values():
                if not dial.busy and not dial.dropped and not dial.due:
                    dial.due = now
        for p in list(self.peers):
            if p.counted[piece] and piece not in p.banned:
                p.wanted += 1
            p.conn.send_dont_have(piece)  # (BEP 54, to those that take it, as libtorrent)
            self._fill(p)

    def _look_again(self) -> None:
        """Reconcile with the daemon now, or once the reconcile under way is done (what
        changed may have come after its look)."""
        if self.away:  # (taken up once it is back: see _back)
            return
        if self._confirming:
            self._again = True
            return
        self._confirming = True
        self._spawn(self._reconcile())

    async def _reconcile(self) -> None:
        """Take the daemon's word on what is verified (our own view follows its events,
        and other clients may change its state without any); once it has every piece,
        the download is complete."""
        self._looking += 1
        try:
            await self._look()
        finally:
            self._looking -= 1
            if self._again:
                self._again = False
                self._look_again()
            elif not self._looking and not self.away:
                self.settled.set()

    def _resume(self, piece: int, spans: list[list[int]]) -> None:
        """A piece the daemon holds ``spans`` of (an earlier run stopped in the middle
        of it, or a block of it came after we gave it up): only its other blocks are
        fetched. One we had, or fetch already, is left as it is."""
        picker = self.picker
        assert picker is not None
        if not 0 <= piece < self.meta.num_pieces or picker.have[piece] or piece in picker.started:
            return
        held = [(piece, b, n) for b, n in picker.plan(piece)
                if any(s <= b and b + n <= e for s, e in spans)]
        # (begun even with no whole block held: the daemon counts it in progress)
        picker.held(piece, held)
        if held:
            self.order.had(piece, {b for _, b, _ in held})
            self.summary.blocks_resumed += len(held)

    async def recount(self) -> None:
        """After an error of the daemon on the torrent's files: whether it still has
        every piece, for the summary (a file deleted while seeding took its pieces with
        it; the daemon tells of them before the error). Not known counts as not."""
        self.summary.complete = False
        with contextlib.suppress(PiecedError, OSError, ConnectionError, TimeoutError):
            st = await asyncio.wait_for(self.client.status(self.ih, files=False),
                                        STOP_DAEMON_TIMEOUT)
            self.summary.complete = all(wire.pieces_from_bits(bytes(st["have"]),
                                                              self.meta.num_pieces))

    async def _look(self) -> None:
        picker = self.picker
        assert picker is not None
        self._told = set()
        try:
            st = await self.client.status(self.ih, files=False)
        except UnknownTorrent:
            self._storage_failed(_REMOVED)
            return
        finally:
            self._confirming = False
        have = wire.pieces_from_bits(bytes(st["have"]), self.meta.num_pieces)
        self._follow(have)
        if st.get("registration") != self._registration:
            # Removed and added again by another client: the blocks of the pieces under
            # way went with the registration that is gone, and so did our subscription.
            self._registration = st.get("registration")
            log.info("the torrent was registered again in the daemon: the pieces under way "
                     "are asked for again")
            for p in [p for p in picker.started if not have[p]]:
                self.order.forget(p)
                picker.piece_failed(p)
            await self.client.subscribe(self.ih)
        self._fill_all()
        if picker.complete:
            self.summary.complete = True
            self.done.set()

    def _follow(self, have: list[bool]) -> None:
        """Take the daemon's word on the pieces it has verified, ``have``, but for those
        with an event since it was asked (:attr:`_told`: newer than it)."""
        picker = self.picker
        assert picker is not None
        told = self._told
        for p, h in enumerate(have):
            if p in told:
                continue
            if h and not picker.have[p]:
                self._gained(p, fill=False)
            elif not h and picker.have[p]:
                log.info("piece %d is not verified in the daemon any more: fetched again", p)
                self._piece_lost(p)

    def _blame(self, liar: Conduct, piece: int) -> None:
        """``liar`` sent bad data for ``piece``: do not ask it for that piece again (but
        see :meth:`_lift_bans`), and drop it (every connection of it, now and to come)
        after MAX_BAD_PIECES such pieces."""
        tries = liar.tries[piece] = liar.tries.get(piece, 0) + 1
        if tries == 1:  # (more: asked of it again, no other peer having it)
            liar.bad += 1
        listed = self.summary.bad_peers
        if len(listed) < BAD_PEERS_LISTED and liar.addr not in listed:
            listed.append(liar.addr)
        mine = self._ban(liar, piece)
        if liar.bad == MAX_BAD_PIECES and tries == 1:
            log.warning("dropping %s: %d pieces failed with its data", liar.addr, liar.bad)
            self.summary.peers_dropped_for_bad_data += 1
            for p in mine:
                self._drop(p)
            group = liar.group
            if group is not None and (group in self.liars or len(self.liars) < MAX_KNOWN):
                n = self.liars[group] = self.liars.get(group, 0) + 1
                if n == LIARS_PER_ADDRESS:
                    log.warning("%s: %d peers from its address dropped for bad data: no "
                                "more are let in from it", liar.addr, n)

    def _ban(self, source: Conduct, piece: int) -> list[Peer]:
        """Ask ``source`` for the piece no more while another peer has it (see
        :meth:`_lift_bans`); returns its connections."""
        mine = [p for p in self.peers if p.conduct is source]
        if piece not in source.banned:
            source.banned.add(piece)
            for p in mine:
                if p.counted[piece] and not self.picker_has(piece):
                    p.wanted -= 1
        return mine

    def _lift_bans(self) -> None:
        """Pieces that every connected peer having them is banned for are asked of them
        again. The blame can be wrong: another client of the daemon may have written a
        bad block into the same attempt (the daemon hashes what all of them wrote), and
        a ban for good left such a piece with no source, the download stalled for ever.
        A peer that really sends bad data is dropped after MAX_BAD_PIECES all the same."""
        picker = self.picker
        if picker is None:
            return
        banned = {piece for p in self.peers for piece in p.banned if not picker.have[piece]}
        for piece in banned:
            sources = [p for p in self.peers if p.counted[piece]]
            # (A source that lets our requests time out, chokes us, or is known for
            # bad data (its own, or its address's) does not count: a piece whose only
            # unbanned source was such a peer was asked of it alone, for good, its
            # other sources banned after one try without a verdict.)
            if not sources or any(not p.conn.snubbed and _may_ask(p, piece)
                                  and self._trust(p, piece)[1:3] == (0, 0) for p in sources):
                continue
            sources = [p for p in sources if piece in p.banned
                       and p.conduct.tries.get(piece, 0) < MAX_PIECE_TRIES]
            if not sources:
                continue  # (tried enough with each: see _no_source_left)
            log.info("piece %d: asked again of the peers it failed with (no other has it)",
                     piece)
            for p in sources:
                p.banned.discard(piece)  # (the set of its conduct: every connection of it)
            for p in sources:
                p.wanted += 1
                self._fill(p)

    def _blocks_in(self, piece: int) -> int:
        assert self.picker is not None
        return len(self.picker.plan(piece))

    def picker_has(self, piece: int) -> bool:
        return self.picker is not None and bool(self.picker.have[piece])

    # -- timers -----------------------------------------------------------------------------
    async def _timers(self) -> None:
        last_choke = last_look = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            if self.client.failure is not None:  # no storage, nothing to serve
                self._lost()
            if self.lost is not None:  # (not coming back: we stop)
                return
            now = time.monotonic()
            try:
                if now - last_look >= RECONCILE_INTERVAL and not self._confirming:
                    last_look = now
                    self._look_again()
                chokes = now - last_choke >= CHOKE_INTERVAL
                if chokes:
                    last_choke = now
                await self._tick(now, chokes)
            except Exception as exc:  # one peer's oddity must not end every timeout for good
                if self.client.failure is not None:  # the daemon went during the round
                    self._lost()
                    continue
                if any(exc is d for d in self._dead):  # (a connection since replaced)
                    continue
                if isinstance(exc, PiecedError):  # (the daemon's answer: see _task_done)
                    self._storage_failed(_REMOVED if isinstance(exc, UnknownTorrent) else
                                         f"the daemon answered with an error: {_describe(exc)}")
                    return
                log.exception("a timer round failed")

    async def _tick(self, now: float, chokes: bool) -> None:
        """One second's round: dials due, timeouts, keep-alives, choking."""
        if self._no_source_left():
            return
        self._daemon_quiet(now)
        self._waiting(now)
        self._redial(now)
        self._lift_bans()
        gave_up = False
        for p in list(self.peers):
            conn = p.conn
            if conn.told_pieces and conn.is_seed and self.done.is_set():
                log.info("%s: a seed, as we are: dropped", p.addr)  # (as libtorrent does)
                self._drop(p)
                continue
            if not conn.handshaken and now - p.opened > HANDSHAKE_TIMEOUT:
                log.info("%s sent no handshake in %.0f s: dropped", p.addr, now - p.opened)
                self._drop(p)
                continue
            if p.held_since is not None:  # (its clocks stand still: see Peer.release)
                if conn.keepalive_due(now):
                    conn.send_keepalive()
                    p.flush()
                continue
            if now - conn.last_received > PEER_TIMEOUT:
                log.info("%s silent for %.0f s: dropped", p.addr, now - conn.last_received)
                self._drop(p)
                continue
            conn.second_tick()
            late = conn.give_up_late(now, REQUEST_TIMEOUT)
            for blk in late:
                assert self.picker is not None
                self.picker.request_dropped(p, blk)
            if late:
                log.info("%s let %d requests time out: snubbed", p.addr, len(late))
                gave_up = True
            if conn.keepalive_due(now):
                conn.send_keepalive()
            p.flush()
        if gave_up:  # what the late peers had is asked of the others (the idle first,
            # the peers that let requests time out last)
            for p in sorted(self.peers, key=lambda q: (q.conn.snubbed, len(q.conn.our_requests))):
                self._fill(p)
        if chokes:
            for p in self.peers:  # what a peer rejected is asked of it again, now
                p.refused.clear()  # and then (a reject may have passing causes)
            self._choke_round()
            if self._suggesting is None or self._suggesting.done():
                # (in a task of its own: a daemon slow to answer holds the suggestions,
                # not the second's timers of every peer)
                self._suggesting = self._spawn(self._suggest_unchoked())
        else:  # between rounds, only the slots of peers that read nothing change hands
            self._choke_round(rotate=False)

    def _daemon_quiet(self, now: float) -> None:
        """Said, once a minute, while the daemon answers nothing of what waits for it
        (stopped, or held by a disk that hangs): the download or the seeding waits on
        it, not on the peers. (Nothing was said, for as long as it lasted.)"""
        quiet = self.client.core.unanswered_for(now)
        if quiet >= DAEMON_QUIET_SECONDS and now - self._quiet_said >= 60.0:
            self._quiet_said = now
            log.warning("the daemon has answered nothing for %.0f s (%d requests wait for "
                        "it): stopped, or held by its disk? Waiting for it",
                        quiet, len(self.client.core.waiters))

    def _waiting(self, now: float) -> None:
        """A download that has verified nothing for WAITING_SECONDS: the pieces it lacks
        that no connected peer has are counted, and said."""
        picker = self.picker
        if (picker is None or self.done.is_set() or self.away
                or now - self._progress_at < WAITING_SECONDS
                or self.client.core.unanswered_for(now) >= 5.0):  # (the daemon's wait)
            return
        self.unavailable = picker.unavailable()
        if self.unavailable and now - self._waiting_said >= WAITING_SAY_EVERY:
            self._waiting_said = now
            log.warning("no piece verified for %.0f s: no peer connected (%d) has %d of "
                        "the %s left; waiting for one that has %s",
                        now - self._progress_at, sum(p.conn.handshaken for p in self.peers),
                        self.unavailable, _pieces(picker.left()),
                        "it" if self.unavailable == 1 else "them")

    async def _announce_loop(self, tracker: Tracker) -> None:
        """Announce on start, on completion (at once) and every interval after (never
        sooner than the tracker's ``min interval``)."""
        fails = 0
        under = f" (under the {tracker.label})" if tracker.label else ""
        while True:
            complete = self.done.is_set()
            try:
                reply = await tracker.announce(self._counters(), complete)
                fails = 0
                log.info("announced%s: %d peers", under, len(reply.peers))
                if reply.warning is not None:
                    log.warning("tracker warning%s: %s", under, printable(reply.warning))
                v2 = len(self.meta.aliases) == 2 and tracker.info_hash == self.meta.aliases[1]
                for host, port in dial_order(list(reply.peers)):
                    if not self.connect(host, port, v2=v2):
                        break  # (no room for more: the rest of a long list is left out)
                wait = max(30.0, reply.interval)  # (at most a day: see parse_response)
            except Exception as exc:
                log.warning("announce failed%s: %s", under,
                            printable(str(exc) or type(exc).__name__))
                wait = min(ANNOUNCE_RETRY_FIRST * 2 ** min(fails, 16), 3600.0)
                fails += 1
            sleep = asyncio.ensure_future(asyncio.sleep(wait))
            waits: list[asyncio.Future[Any]] = [sleep]
            if not complete:  # completed is announced at once (done may have come while
                waits.append(asyncio.ensure_future(self.done.wait()))  # that announce ran)
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()


def _one_peer(a: Peer, b: Peer) -> bool:
    """Whether two connections with one peer id may be one peer's: from one address, or
    two we dialled (a peer at its IPv4 and IPv6 addresses), or one we dialled and one
    that says it listens there (see _listens_at). (A peer id is no secret: from
    anywhere else, it is a stranger's claim.)"""
    if a.host == b.host or (a.stranger is None and b.stranger is None):
        return True
    ours, theirs = (a, b) if a.stranger is None else (b, a)
    return ours.stranger is None and _listens_at(theirs, (ours.host, ours.port))


def _listens_at(peer: Peer, addr: tuple[str, int]) -> bool:
    """Whether a peer that dialled us says (its BEP 10 ``p``) it takes connections at
    ``addr``: that port, from that address or from one of the other family (a peer
    that dials over IPv4 and listens on IPv6 too)."""
    return peer.conn.remote_port == addr[1] and (
        peer.host == addr[0] or (":" in peer.host) != (":" in addr[0]))


def _nodelay(transport: asyncio.Transport) -> None:
    import socket

    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- command line -------------------------------------------------------------------------
def _hostport(text: str) -> tuple[str, int]:
    """HOST:PORT, an IPv6 address in brackets ([::1]:6881); an empty HOST is every
    interface (for --listen) or this machine (for --peer)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") or host.endswith("]"):
        inside = host[1:-1]
        try:
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {host} is not an IPv6 address in brackets") from None
        host = inside
    elif ":" in host:
        raise argparse.ArgumentTypeError(
            f"{text!r}: an IPv6 address goes in brackets, as in [{host}]:{port}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pieced-peer",
        description="Download and seed a torrent over BitTorrent, stored by the pieced daemon.")
    ap.add_argument("torrent", type=Path, help="the .torrent file")
    ap.add_argument("--save-path", type=Path, required=True,
                    help="the folder that holds (or will hold) the torrent's file or folder")
    ap.add_argument("--peer", action="append", type=_hostport, default=[], metavar="HOST:PORT",
                    help="a peer to connect to (repeatable)")
    ap.add_argument("--listen", type=_hostport, metavar="HOST:PORT",
                    help="accept incoming peers here (port 0: any free port); without it, a "
                         "torrent with trackers listens on port 6881 of every interface, "
                         "or on a free port when 6881 is taken")
    ap.add_argument("--seed", action="store_true",
                    help="keep serving once complete, until SIGINT or SIGTERM")
    ap.add_argument("--socket", default=os.environ.get("PIECED_SOCKET", DEFAULT_SOCKET),
                    help="the daemon's socket")
    ap.add_argument("--max-peers", type=positive_int, default=Options.max_peers, metavar="N",
                    help="connections at once, both ways (default %(default)s)")
    ap.add_argument("--upload-slots", type=positive_int, default=Options.upload_slots,
                    metavar="N",
                    help="peers served at once; the other interested peers wait their turn, "
                         "one more every 10 s (default %(default)s)")
    ap.add_argument("--daemon-wait", type=seconds, default=Options.daemon_wait,
                    metavar="SECONDS",
                    help="when the daemon's connection breaks (a restart), wait this long "
                         "for it to come back, the peers kept (default %(default)g; 0: stop "
                         "at once)")
    ap.add_argument("--json", action="store_true", help="print one summary object at the end")
    return ap


def fit_max_peers(max_peers: int, limit: int | None) -> int:
    """``--max-peers`` lowered to fit the descriptor limit: each place may have
    DIALS_PER_PLACE dials under way, and a burst of connections is accepted before any
    is refused. Past it, accepts and dials failed with EMFILE."""
    if limit is None:
        return max_peers
    fits = max(1, (limit - FDS_RESERVED - ACCEPT_BURST - UNPLACED) // DIALS_PER_PLACE)
    if fits < max_peers:
        log.warning("%d descriptors allowed (RLIMIT_NOFILE): --max-peers %d -> %d",
                    limit, max_peers, fits)
    return min(max_peers, fits)


class _AcceptErrorsBriefly:
    """The loop's exception handler: a connection that could not be accepted for want
    of descriptors or memory is said once in ACCEPT_ERROR_SECONDS, in a line (asyncio
    pauses accepting for a second meanwhile); anything else as asyncio says it."""

    def __init__(self) -> None:
        self.said = -ACCEPT_ERROR_SECONDS
        self.unsaid = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (context.get("message") == "socket.accept() out of system resource"
                and isinstance(exc, OSError)):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.said < ACCEPT_ERROR_SECONDS:
            self.unsaid += 1
            return
        more = f" ({self.unsaid} more since the last warning)" if self.unsaid else ""
        log.warning("a peer could not be accepted: %s%s; accepting again in a second",
                    exc.strerror or exc, more)
        self.said, self.unsaid = now, 0


async def run(opts: Options, *, show_progress: bool = False,
              early: list[int] | None = None) -> Summary:
    """``early``: signals received before the run's handlers were in place (a SIGTERM
    sent a moment after the start): the run stops as soon as it begins."""
    raw = read_metainfo(opts.torrent)
    meta = parse(raw)
    swarm = Swarm(opts, raw, meta)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_AcceptErrorsBriefly())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, swarm.stopped_by_signal)
    if early:
        swarm.stopped_by_signal()
    started = time.monotonic()
    try:
        # A signal is heeded at once, also while the daemon checks what is on disk (for
        # a large torrent, hours): the check goes on in the daemon, and is not ours to wait for.
        starting = asyncio.ensure_future(swarm.start())
        stopped = asyncio.ensure_future(swarm.stop.wait())
        while not (await asyncio.wait([starting, stopped], timeout=1.0,
                                      return_when=asyncio.FIRST_COMPLETED))[0]:
            swarm._daemon_quiet(time.monotonic())  # (a daemon that answers nothing: said)
        stopped.cancel()
        if not starting.done():  # a signal, or the daemon's error (said below)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            starting.result()
            progress = asyncio.ensure_future(_progress(swarm)) if show_progress else None
            waits = [asyncio.ensure_future(swarm.stop.wait())]
            if not opts.seed:
                waits.append(asyncio.ensure_future(swarm.done.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if swarm.storage_error is not None and swarm.lost is None:
                await swarm.recount()
            if progress is not None:
                progress.cancel()
                _draw(swarm)  # (as it ends: the last tick may be half a second old)
                print(file=sys.stderr)
    finally:
        # The time of the transfer: saying goodbye to trackers and daemon is not part of it.
        swarm.summary.seconds = round(time.monotonic() - started, 3)
        for peer in list(swarm.peers):
            swarm.count_unasked(peer)
        try:
            await swarm.close()
        finally:  # (a second signal meanwhile ends nothing sooner, nor loses the summary)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    if swarm.picker is not None:  # (started)
        swarm.summary.blocks_reordered = swarm.order.reordered
    if swarm.lost is not None:
        raise DaemonLost(f"lost the daemon: {swarm.lost}", swarm.summary)
    if swarm.storage_error is not None:
        raise StorageFailed(swarm.storage_error, swarm.summary)
    if swarm.no_source is not None:
        raise NoSourceLeft(swarm.no_source, swarm.summary)
    return swarm.summary


def _bare(exc: BaseException) -> BaseException:
    """``exc`` without its traceback (its frames hold what they held: blocks, buffers),
    to be kept and compared with."""
    exc.__traceback__ = None
    return exc


def _describe(exc: PiecedError) -> str:
    return f"{exc.message} (errno {exc.errno})" if exc.errno is not None else str(exc)


async def _progress(swarm: Swarm) -> None:
    while True:
        _draw(swarm)
        await asyncio.sleep(0.5)


def _draw(swarm: Swarm) -> None:
    """The progress line, drawn over the last one."""
    picker = swarm.picker
    if picker is not None:
        n = swarm.meta.num_pieces
        done = n - picker.left()
        bar = "#" * (30 * done // max(1, n))
        waits = f"  {_pieces(swarm.unavailable)} no peer has" if swarm.unavailable else ""
        print(f"\r[{bar:<30}] {100 * done // max(1, n):3d}%  {len(swarm.peers)} peers  "
              f"down {swarm.summary.bytes_down >> 20} MiB  up {swarm.summary.bytes_up >> 20} MiB"
              f"{waits}\x1b[K", end="", file=sys.stderr, flush=True)


def _said(args: argparse.Namespace, exc: BaseException) -> None:
    """With ``--json``, the summary of a run that ended on an error once under way."""
    if args.json and isinstance(exc, Stopped):
        print(json.dumps(exc.summary.as_dict()))


def main(argv: list[str] | None = None, early: list[int] | None = None) -> int:
    """The command (see ``command.py``, its entry point: ``early`` holds the signals
    received before the run's own handlers are in place)."""
    args = _parser().parse_args(argv)
    level = os.environ.get("PIECED_PEER_LOG", "WARNING").upper()
    if not isinstance(logging.getLevelName(level), int):
        print(f"pieced-peer: PIECED_PEER_LOG={level!r} is not a level (DEBUG, INFO, "
              "WARNING, ERROR)", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="pieced-peer: %(message)s")
    try:
        try:
            read_metainfo(args.torrent)
        except OSError as exc:
            print(f"pieced-peer: cannot read {args.torrent}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        peers = [(host or "127.0.0.1", port) for host, port in args.peer]
        opts = Options(args.torrent, args.save_path.resolve(), peers, args.listen,
                       args.seed, args.socket, fit_max_peers(args.max_peers, raise_open_files()),
                       args.upload_slots, args.daemon_wait)
        try:
            summary = asyncio.run(run(opts, show_progress=sys.stderr.isatty() and not args.json,
                                      early=early))
        finally:
            # The run is over: a signal now would only cut short what it says and its exit
            # status (the loop, closing, put the default handlers back: killed by it).
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
    except (PiecedError, NoSources, ElsewhereAlready, StorageFailed, NoSourceLeft,
            CannotListen) as exc:
        if isinstance(exc, AccessDenied):  # (said by the daemon, not by a peer)
            print(f"pieced-peer: the daemon at {args.socket} refused us: {exc}",
                  file=sys.stderr)
        else:
            print(f"pieced-peer: {exc}", file=sys.stderr)
        _said(args, exc)
        return 2
    except (OSError, ConnectionError) as exc:
        print(f"pieced-peer: the daemon at {args.socket}: {exc}", file=sys.stderr)
        _said(args, exc)
        return 2
    except KeyboardInterrupt:  # (before the run's own handlers were in place)
        print("pieced-peer: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary.as_dict()))
    return 0 if summary.complete or args.seed else 1
