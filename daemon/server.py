"""The Unix-socket server: the thin I/O edge around the sans-I/O protocol.

Each connection reads with ``recvmsg_into`` straight into its own receive ring
(asyncio transports would copy, and would drop the SCM_RIGHTS a client uses to
pass its shared-memory ring). Parsed requests go to the connection's *lane*: a
queue drained in order by one worker thread at a time, so a client's requests
take effect in the order it sent them, disk and hashing stay off the event loop,
and different clients run in parallel. Replies come back to the loop in batches.

Flow control: an inline block's bytes stay in the ring until they are handled; when
the ring is full, or the lane already holds MAX_QUEUED_JOBS requests, the connection
stops reading from its socket, and the client's writes block in its kernel buffer.
Replies are bounded too: the lane pauses while a client's unsent output is over
``Server.out_limit``, and a client whose output still grows past ``drop_limit``
(events to a client that never reads) is disconnected. Memory per client is its
ring, its queued requests and that output, nothing more.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import collections
import contextlib
import ctypes
import errno
import fcntl
import itertools
import logging
import mmap
import os
import select
import socket
import stat
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pieced.protocol.frames import (
    FLAG_FLUSH,
    FLAG_VOLATILE,
    LENGTH_AFTER,
    MAX_BLOCK,
    Frame,
    FrameReader,
    FrameType,
    RecvRing,
    encode_ack,
    encode_control,
    encode_data_header,
)
from pieced.protocol.messages import (
    check_hello,
    encode_error,
    encode_event,
    encode_response,
    from_wire,
    hello,
    to_wire,
    wire_bencode,
)
from pieced.storage.disk import DiskIO, PieceResult
from pieced.storage.errors import (
    AccessDenied,
    BadRequest,
    ErrorCode,
    PiecedError,
    ProtocolError,
    StorageIOError,
    TooLarge,
    UnknownTorrent,
    detached,
)
from pieced.storage.hashing import Buffer
from pieced.storage.merkle import BLOCK_SIZE
from pieced.storage.metainfo import MAX_METAINFO_BYTES

log = logging.getLogger("pieced.server")

Out = bytes | memoryview
Token = tuple[int, int]
# A lane job: the frames of its replies, and the receive-ring space to free once they
# are sent (one range, several, or none).
Job = Callable[[], tuple[list[Out], Token | list[Token] | None]]
# Parsed requests waiting in one connection's lane before it stops reading that client:
# control, READ and WRITE_RING frames leave the receive ring once parsed, so the ring
# alone does not bound them.
MAX_QUEUED_JOBS = 4096
# Frames parsed from one connection at a turn of the event loop; the rest at its next
# turn, after every other connection's. A client's 4,000 requests sent at once were
# parsed in one go: a hundred such clients held the loop for seconds, and every other
# client's requests, its connect too, waited (a 16 KiB read took 5 s).
PARSE_TURN = 256
# Jobs a lane carries out in one run of a worker: then it waits, at the back of the queue,
# behind the other lanes' runs. A run that went on while its lane had jobs held a worker
# for a client's thousands of requests, and another client's one request waited for
# every such run before it to finish (a second, under a hundred clients' floods).
LANE_TURN = 256
# What a reply queued unsent costs beyond its bytes (its object, the queue's slot):
# counted in a client's unsent output, so that its bound holds for memory. A 12-byte
# ACK costs 56 bytes: counted by its bytes alone, the buffer held four times its size.
OUT_PART_BYTES = 48
# Descriptors a connection holds for its requests (attach_ring, or register of a metainfo
# passed as a descriptor): received and not yet taken by a frame, or taken by a request
# still queued. At this many, the connection is not read until one has run; past it,
# descriptors that come are closed.
MAX_PENDING_FDS = 4
# A frame begun must come in at this many bytes a second at least, on average over each
# frame_timeout while the daemon reads: one trickled in a byte a second kept its receive
# buffer (megabytes, with what was sent at first) for as long as the client liked, and
# max_clients of them gigabytes. A client sending what it has sends megabytes a second.
MIN_FRAME_RATE = 16 * 1024
REFUSAL_LOG_SECONDS = 10.0  # a refused connection is logged at most once so often
# Seconds without a block read through a client's shared ring after which the pages
# of it mapped in the daemon are let go (MADV_DONTNEED). They are the client's, in its
# memfd, but they count in the daemon's RSS: a client writing through its ring has it
# there whole (16 MiB a pieced-peer, up to max_ring_bytes), and a client that stopped
# writing (a pieced-peer seeding for days) kept it there. Let go while the client
# writes, every page would be mapped again at each turn of the ring: +13 % of the
# daemon's CPU, measured, for memory that is the client's all the same.
RING_IDLE_SECONDS = 2.0
# Operations that may run for seconds (whole-torrent work, syncs, whole pieces of up to
# 64 MiB read and hashed): their lane moves to the long-job workers while they run.
# ``status`` and ``list`` too: a torrent of 100,000 files takes a second to report.
LONG_OPS = frozenset({"register", "unregister", "recheck", "move_storage", "rename_file",
                      "flush_all", "flush_piece", "read_piece", "hash_piece", "hash_piece_v2",
                      "status", "list"})
LONG_WORKERS = 64
REPORT_ENTRIES = 1000  # files (status) or torrents (list) that make a report a big one
BIG_METAINFO_BYTES = 1024 * 1024  # a register of a metainfo larger is a big one too
# Operations that only answer (nothing changes): those of a client gone are not run. A
# client could queue MAX_QUEUED_JOBS reads of a frame each (32 GiB) and hang up.
QUERIES = frozenset({"list", "read_piece", "hash_block", "cached_pieces", "stats", "status"})
# Keys of torrents the daemon does not have that one connection may subscribe to.
MAX_UNKNOWN_SUBSCRIPTIONS = 1024
# Seconds a stop waits for the clients' lanes to finish (their replies sent) before it
# drops the clients (a lane can wait for a client that reads nothing).
DRAIN_SECONDS = 5.0
ACCEPT_PAUSE = 0.5  # seconds without accepting after accept failed (out of descriptors)
ACCEPT_TURN = 16  # connections accepted at most in one turn of the event loop
DEAF_LOOK = 0.5  # seconds between looks at a deaf client's socket that held nothing
# Values a control body from a client may hold: every request is a handful (a .torrent
# travels as one string), so this only stops bodies built to be slow to decode.
MAX_REQUEST_VALUES = 4096
_REQUIRED_SEALS = fcntl.F_SEAL_SHRINK
# Each connection's number, as the writer of its blocks (PieceResult.writers): never
# reused, as an object's id() is once it is gone.
_SERIALS = itertools.count(1)


class Observer:
    """What storage reports to (piece results, disk errors), made before the engine
    and handed to its constructor; the server, made after, attaches to it."""

    def __init__(self) -> None:
        self.server: Server | None = None

    def piece(self, result: PieceResult) -> None:
        if self.server is not None:
            self.server._on_piece(result)

    def disk_error(self, ih: bytes, entry: dict[str, Any]) -> None:
        if self.server is not None:
            self.server._on_disk_error(ih, entry)

    def changed(self, ih: bytes) -> None:
        if self.server is not None:
            self.server._event(ih, "pieces_changed", {"ih": ih})


class Server:
    def __init__(
        self,
        disk: DiskIO,
        *,
        ring_bytes: int = 8 * 1024 * 1024,
        max_frame: int = 8 * 1024 * 1024,
        workers: int | None = None,
        max_clients: int = 256,
        max_ring: int = 256 * 1024 * 1024,
        allow_uids: set[int] | None = None,
        allow_gids: set[int] | None = None,
        observer: Observer | None = None,
        handshake_timeout: float = 10.0,
        frame_timeout: float = 60.0,
        max_unsent: int = 256 * 1024 * 1024,
    ) -> None:
        self.disk = disk
        self.ring_bytes = max(ring_bytes, max_frame + 4)
        self.max_frame = max_frame
        # Unsent output per client: over out_limit its lane and its reading pause; lane
        # replies then stay under 2 * out_limit + one frame (<= 3 * ring_bytes), so only
        # events can push it past drop_limit, and that client is disconnected.
        self.out_limit = self.ring_bytes
        self.drop_limit = 4 * self.ring_bytes
        # Unsent output of every client together (``unsent``), and the replies of reads
        # under way (``pledged``, taken by the worker that runs them): over max_unsent, a
        # read waits for room (a client with nothing unsent gets a reply at a time). Bounded
        # per client alone, max_clients clients that send reads and read nothing held
        # gigabytes (255: 5 GiB). Those that wait are woken in turn as room is made; a
        # client that reads nothing of what it holds meanwhile is dropped (see _room_due).
        self.max_unsent = max_unsent
        self.shut = False  # the workers are shut down (see close)
        self.unsent = 0
        self.pledged = 0
        self._pledge_lock = threading.Lock()
        self._waiting_room: collections.deque[Connection] = collections.deque()
        self._room_timer: asyncio.TimerHandle | None = None
        # Client -> (what it had read, what it had been sent, when): see _watch_room.
        self._room_marks: dict[Connection, tuple[int, int, float]] = {}
        # Until when a place is wanted (a client allowed in was refused for max_clients),
        # and whether the marks of this round are of every client that leaves output unread.
        self._places_until = 0.0
        self._marked_places = False
        self.max_clients = max_clients
        self.max_ring = max_ring
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.allow_uids = allow_uids
        self.allow_gids = allow_gids
        self.executor = ThreadPoolExecutor(workers or (os.cpu_count() or 1) + 2, "pieced-io")
        # Lanes whose next job may take long (LONG_OPS, or a block of a torrent that a
        # fenced operation holds) run here instead, so that they never take every
        # worker from short requests of other clients. Threads start only when needed;
        # a lane waiting on a fence holds one. A connection's lane runs one job at a
        # time: with a thread for each client there may be, no client's job ever waits
        # behind another's (130 clients asking a recheck of one torrent held the 64
        # there were, waiting for it in turn, and a status of another torrent waited
        # for minutes behind them).
        self.long_executor = ThreadPoolExecutor(max(LONG_WORKERS, max_clients + 8),
                                                "pieced-long")
        # Short workers held by block I/O, by file system (device): one at a time each.
        # A disk whose writes hang (a USB disk spinning up, a network mount gone) keeps
        # the worker it holds; four clients writing to it took every short worker, and
        # every other client's requests waited for that disk. The lanes whose next job
        # is on a file system that holds one run on the long workers meanwhile.
        self._short_held: set[Hashable] = set()
        self._short_lock = threading.Lock()
        # Reports of many files or torrents are Python through and through: run side by
        # side they gain nothing (one interpreter lock) and starve every other thread of
        # it, the event loop's too (16 clients asking status of a 30,000-file torrent
        # held another's stats for two seconds; one at a time, a fifth of a second). The
        # others wait, asleep. (A report waits for nothing else: no fence, only the
        # torrent's lock, briefly.)
        self.report_slot = threading.Lock()
        self.clients: set[Connection] = set()
        # Clients gone with jobs of theirs still in their lane (a write waiting for a
        # torrent another operation holds): they keep their receive ring, their shared
        # ring and a worker until it drains, and count against max_clients until then
        # (a client that sent a write and hung up, again and again, took the daemon's
        # descriptors and memory without bound while a recheck held the torrent).
        self.draining: set[Connection] = set()
        # The clients' ends, watched for their hanging up (POLLRDHUP alone: poll says only
        # of those), so that a look for hung-up clients is one call whatever their number.
        self._ends = select.poll()
        self._by_fd: dict[int, Connection] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self.accepted = 0
        self.refused = 0
        self._refusal_said = -REFUSAL_LOG_SECONDS
        self.dropped = 0
        # What worker threads hand the loop (lane replies, events), in the order they
        # hand it: one wake-up of the loop for whatever arrived since it last looked.
        self._mail: collections.deque[tuple[Callable[..., None] | None, tuple[Any, ...]]] = (
            collections.deque())
        self._mail_lock = threading.Lock()
        self._mail_due = False
        if observer is not None:
            observer.server = self

    # -- listening --------------------------------------------------------------------
    def start(self, listener: socket.socket) -> None:
        self._closing = False
        self.loop = asyncio.get_running_loop()
        listener.setblocking(False)
        self._listener = listener
        self.loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        # A bounded number a turn, the other clients served between: a client connecting
        # and closing in a loop refilled the backlog as fast as it was emptied, kept the
        # loop here, and every other client waited seconds for each reply.
        for _ in range(ACCEPT_TURN):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors (EMFILE) or memory: the listener stays readable, and
                # accepting again at once would spin. Paused a moment, said once a pause.
                log.warning("accept failed: %s; accepting again in %.1f s", exc,
                            ACCEPT_PAUSE)
                assert self.loop is not None
                self.loop.remove_reader(self._listener.fileno())
                self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
                return
            sock.setblocking(False)
            refusal = self._refusal(sock)
            if refusal is not None:
                self.refused += 1
                now = time.monotonic()
                if now - self._refusal_said >= REFUSAL_LOG_SECONDS:  # (not one a connect)
                    self._refusal_said = now
                    log.warning("a client was refused: %s (%d refused so far)",
                                refusal.message, self.refused)
                with contextlib.suppress(OSError):
                    sock.send(encode_error(0, refusal))
                sock.close()
                continue
            self.accepted += 1
            conn = Connection(self, sock)
            self.clients.add(conn)
            self._ends.register(conn.fd, select.POLLRDHUP)
            self._by_fd[conn.fd] = conn
            conn.start()

    def forget_end(self, conn: Connection) -> None:
        """``conn`` is closing: its end is watched no more."""
        if self._by_fd.get(conn.fd) is conn:
            del self._by_fd[conn.fd]
            self._ends.unregister(conn.fd)

    def _resume_accepting(self) -> None:
        if self._listener is not None and self._listener.fileno() >= 0 and not self._closing:
            assert self.loop is not None
            self.loop.add_reader(self._listener.fileno(), self._accept)

    def _refusal(self, sock: socket.socket) -> AccessDenied | None:
        """Why a new connection is refused, if it is. A daemon full is said with EBUSY:
        a refusal for now (a place comes free as another client leaves), where one of
        credentials stands."""
        if len(self.clients) + len(self.draining) >= self.max_clients:
            # Clients that hung up and have not been read since count no more: a burst of
            # connections accepted in one go, each closed at once by its client, took
            # every place before their ends were read, and a live newcomer was refused.
            # Only those whose end poll finds closed are looked at (one call for them
            # all: a look at each of hundreds of clients, for each connection refused,
            # made a flood of connections dear); a look reads what the client sent, and
            # closes it when it hung up.
            for fd, _ in self._ends.poll(0):
                gone = self._by_fd.get(fd)
                if gone is not None and gone.hung_up():
                    gone.close()
        denied = self._denied(sock)
        if denied is not None:  # (full or not: a stranger is told no more than that)
            return denied
        if len(self.clients) + len(self.draining) >= self.max_clients:
            self._want_place()
            left = (f" ({len(self.draining)} of them gone, their last jobs still waiting "
                    "to be carried out)" if self.draining else "")
            return AccessDenied(f"too many clients: the daemon has max_clients = "
                                f"{self.max_clients} connected already{left}; clients that "
                                "leave their replies unread are dropped to make room",
                                errno=errno.EBUSY)
        return None

    def _denied(self, sock: socket.socket) -> AccessDenied | None:
        """The refusal of a peer whose credentials are not allowed, if they are not."""
        if self.allow_uids is None and self.allow_gids is None:
            return None
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, gid = array.array("i", creds)
        if uid == 0 or uid == os.getuid():
            return None
        if self.allow_uids is not None and uid in self.allow_uids:
            return None
        if self.allow_gids is not None and gid in self.allow_gids:
            return None
        return AccessDenied(f"uid {uid} gid {gid} (pid {pid}) is not allowed to use this daemon")

    async def close(self) -> None:
        """Stop accepting and reading, let every lane finish and its replies go out (a
        recheck cut short says so; an unregister says it was done), then drop the
        clients. Bounded: a client that reads nothing holds its lane, and is dropped."""
        self._closing = True
        if self._listener is not None and self.loop is not None:
            self.loop.remove_reader(self._listener.fileno())
        conns = list(self.clients)
        for conn in conns:
            conn.stop_reading()
        # What the lanes have left runs whatever it makes (bounded for each client as
        # ever): a client that reads nothing would hold the others' room till the drain
        # gives up on them all.
        self.max_unsent = sys.maxsize
        self.room_made()
        gone = list(self.draining)  # (clients gone with requests still to run)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.drained() for c in conns + gone)),
                                   DRAIN_SECONDS)
        deadline = time.monotonic() + 1.0
        while any(c.unsent() for c in conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in conns:
            conn.close()
        for conn in conns:
            await conn.drained()
        if self._room_timer is not None:
            self._room_timer.cancel()
            self._room_timer = None
        self.shut = True  # (lanes of clients gone meanwhile run no more)
        self.executor.shutdown(wait=True)
        self.long_executor.shutdown(wait=True)

    # -- events -------------------------------------------------------------------------
    def _on_piece(self, result: PieceResult) -> None:
        """Called from worker threads when a piece completes (after its sync, if good)."""
        if self.loop is None:
            return
        name = "piece_verified" if result.ok else "piece_failed"
        fields = {"ih": result.info_hash, "piece": result.piece, "v1": result.v1, "v2": result.v2}
        if result.writers:
            fields["writers"] = list(result.writers)
        self._event(result.info_hash, name, fields)

    def _on_disk_error(self, ih: bytes, entry: dict[str, Any]) -> None:
        """Called from worker threads when storage records an I/O error of a torrent."""
        fields = {"ih": ih, "code": int(ErrorCode.IO_ERROR), **entry}
        self._event(ih, "disk_error", fields)

    def _event(self, ih: bytes, name: str, fields: dict[str, Any]) -> None:
        if self.loop is None:
            return
        frame = encode_event(name, fields)
        try:  # a hybrid torrent's clients may know it by either of its two keys
            keys = frozenset(self.disk.torrent(ih).meta.aliases)
        except PiecedError:
            keys = frozenset((ih,))
        self.post(None, keys, frame)

    def post(self, fn: Callable[..., None] | None, *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (from any thread), after everything posted
        before it; ``fn`` None posts an event, ``(keys, frame)``, for the clients
        subscribed to any of its keys. A group commit announces tens of pieces at once:
        the loop wakes once for them all, and each client gets them in one send."""
        with self._mail_lock:
            self._mail.append((fn, args))
            if self._mail_due:
                return
            self._mail_due = True
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self.loop.call_soon_threadsafe(self._deliver)

    def forget_keys(self, keys: Iterable[bytes]) -> None:
        """(On the loop, posted by an unregister.) No connection follows ``keys`` any
        more but those awaiting them; unless the torrent was registered again meanwhile
        (its new registrant subscribed after its register: not to be undone)."""
        gone = [k for k in keys if not self.disk.knows(k)]
        for conn in self.clients:
            conn.subscriptions.difference_update([k for k in gone if k not in conn.awaited])

    def _deliver(self) -> None:
        with self._mail_lock:
            mail, self._mail = self._mail, collections.deque()
            self._mail_due = False
        events: dict[Connection, list[Out]] = {}
        for fn, args in mail:
            if fn is None:
                keys, frame = args
                for conn in self.clients:
                    if not keys.isdisjoint(conn.subscriptions):
                        events.setdefault(conn, []).append(frame)
                continue
            if events:  # what a client was told so far goes before what follows
                self._send_events(events)
            try:
                fn(*args)
            except Exception:  # one failure must not lose the rest of the mail
                log.exception("posted call %r failed", fn)
        self._send_events(events)

    @staticmethod
    def _send_events(events: dict[Connection, list[Out]]) -> None:
        for conn, frames in events.items():
            try:
                conn.send(frames)
            except Exception:  # (a bug: the other clients, and the rest of the mail, go on)
                log.exception("sending events to a client failed")
        events.clear()

    # -- the daemon-wide bound on unsent output (loop thread, but pledge) ---------------------
    def room(self, needs: int, idle: bool = False) -> bool:
        """Whether a read's reply of ``needs`` bytes fits. With nothing unsent anywhere,
        anything fits: some client must go on. ``idle``: for a client with nothing
        unsent, one reply always fits, so that a client that reads what it asks for is
        never held up by others that do not (they hold the room until they are dropped,
        see _room_due); the bound is passed by a reply a client at most, for as long."""
        held = self.unsent + self.pledged
        return idle or held + needs <= self.max_unsent or held == 0

    def pledge(self, needs: int, idle: bool, strict: bool = False) -> bool:
        """(Worker thread) Take room for replies of ``needs`` bytes, if they fit
        (``strict``: within the bound, whatever else holds)."""
        with self._pledge_lock:
            if strict:
                if self.unsent + self.pledged + needs > self.max_unsent:
                    return False
            elif not self.room(needs, idle):
                return False
            self.pledged += needs
            return True

    def over_bound(self) -> None:
        """(After output was queued) More than max_unsent_bytes is held: the clients that
        read nothing of theirs are looked for (see _room_due) even if nobody waits."""
        if self.unsent > self.max_unsent:
            self._watch_room()

    def waits_for_room(self) -> bool:
        return bool(self._waiting_room)

    def unpledge(self, n: int) -> None:
        with self._pledge_lock:
            self.pledged -= n

    def wait_for_room(self, conn: Connection) -> None:
        """``conn``'s lane waits for room (its ``needs``): woken in turn by room_made,
        or as soon as it has nothing unsent (see Connection._flush_out)."""
        if not conn.waiting_room:
            conn.waiting_room = True
            self._waiting_room.append(conn)
        self._watch_room()

    def _want_place(self) -> None:
        """A client allowed in was refused for max_clients: for two frame_timeouts from
        now, the clients that leave what they were sent unread are looked for, as for
        clients waiting for room (see _room_due), so that clients that connect and read
        nothing (their replies, or a mere HELLO's) do not hold the places for good."""
        if self.loop is None:
            return
        now = self.loop.time()
        self._places_until = now + 2 * self.frame_timeout
        if self._room_timer is None:
            self._watch_room()
        elif not self._marked_places:  # (once a round: refusals may come in floods)
            self._mark(now, True)

    def _mark(self, now: float, places: bool) -> None:
        """Mark the clients not marked yet that hold output unsent, or, while a place is
        wanted, that leave any unread in their socket (one that reads what it is sent
        holds nothing a moment later, and is not marked)."""
        marks = self._room_marks
        for c in self.clients:
            if c in marks:
                continue
            if c.holds_unsent():
                marks[c] = (c.consumed(), c.sent, now)
            elif places and not c.closed and (got := c.consumed()) < c.sent:
                marks[c] = (got, c.sent, now)
        self._marked_places = self._marked_places or places

    def _watch_room(self) -> None:
        if self._room_timer is None and self.loop is not None:
            now = self.loop.time()
            self._marked_places = False
            self._mark(now, now < self._places_until)
            self._room_timer = self.loop.call_later(self.frame_timeout, self._room_due)

    def room_made(self) -> None:
        """Output was sent or dropped, or a pledge given back: the clients waiting for
        room that now fit go on, first come first, each counted as it goes (not all
        woken at once, to find most of them no room again)."""
        held = self.unsent + self.pledged
        waiting = self._waiting_room
        while waiting:
            conn = waiting[0]
            if conn.closed or not conn.waiting_room:
                waiting.popleft()
                conn.waiting_room = False
                continue
            needs = conn.needs
            idle = not conn.holds_unsent()
            if not (idle or held + needs <= self.max_unsent or held == 0):
                break
            waiting.popleft()
            conn.waiting_room = False
            if not idle:
                held += max(needs, 1)
            conn.resume_for_room()

    def _room_due(self) -> None:
        """Clients wait for room, or more than max_unsent_bytes is held: a client that
        held output unsent for the whole of the last frame_timeout and read less than
        MIN_FRAME_RATE a second of it holds room others need, and is dropped (what it
        was sent is its own to read; it reads nothing). While nobody waits and the bound
        holds, nobody is dropped for it."""
        self._room_timer = None
        assert self.loop is not None
        now = self.loop.time()
        places = now < self._places_until
        waiting = any(c.waiting_room and not c.closed for c in self._waiting_room)
        if not waiting:
            self._waiting_room.clear()
        if not waiting and not places and self.unsent <= self.max_unsent:
            self._room_marks = {}
            return
        timeout = self.frame_timeout
        why = ("others wait for room" if waiting else "clients are refused for max_clients"
               if places else "more than max_unsent_bytes is held")
        marks, self._room_marks = self._room_marks, {}
        for conn, (mark, sent, when) in marks.items():
            if conn.closed or not (conn.holds_unsent() or places):
                continue
            read = conn.consumed()
            if read >= sent:
                continue  # (it has read all it had been sent by the mark: it reads)
            if now - when < 0.99 * timeout:  # (marked during the round: looked at next)
                self._room_marks[conn] = (mark, sent, when)
                continue
            got = read - mark
            if got < MIN_FRAME_RATE * timeout:
                log.warning("dropping a client that does not read its replies while %s (%d "
                            "bytes held unsent, %d unread in its socket, %d read in the last "
                            "%.0f s; max_unsent_bytes %d), %s", why, conn.unsent_bytes(),
                            conn.sent - read, got, timeout, self.max_unsent, conn.who)
                self.dropped += 1
                conn.close()  # (room made: those waiting go on, and may wait again)
        self._watch_room()

    def stats(self) -> dict[str, Any]:
        return {
            "unsent_bytes": self.unsent,
            "connected_clients": len(self.clients),
            "clients_accepted": self.accepted,
            "clients_refused": self.refused,
            "clients_dropped": self.dropped,
        }

    def short_held(self, device: Hashable) -> bool:
        return device in self._short_held

    def take_short(self, device: Hashable) -> bool:
        """Hold the short worker of a file system (False: another holds it)."""
        with self._short_lock:
            if device in self._short_held:
                return False
            self._short_held.add(device)
            return True

    def give_short(self, devices: Iterable[Hashable]) -> None:
        with self._short_lock:
            self._short_held.difference_update(devices)


def _who(sock: socket.socket, serial: int) -> str:
    """``client N (pid P, uid U)``: the process at the other end, as the kernel says."""
    try:
        pid, uid, _ = array.array("i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return f"client {serial}"
    return f"client {serial} (pid {pid}, uid {uid})"


class Connection:
    """One client: its socket, its receive ring, its lane, its shared-memory ring."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.disk = server.disk
        self.sock = sock
        self.fd = sock.fileno()
        self.serial = next(_SERIALS)
        self.who = _who(sock, self.serial)  # (for the log: which client it was)
        assert server.loop is not None
        self.loop = server.loop
        self.ring = RecvRing(server.ring_bytes)
        self.reader = FrameReader(self.ring, server.max_frame, MAX_REQUEST_VALUES)
        self.subscriptions: set[bytes] = set()
        # Keys `subscribe` took while the daemon did not have them: kept (at most
        # MAX_UNKNOWN_SUBSCRIPTIONS) until the connection ends. Every other key is kept
        # while its torrent is registered, and dropped once it is gone (see subscribe).
        self.awaited: set[bytes] = set()
        self._prune_at = 64
        self.handshaken = False
        self._hello_timer: asyncio.TimerHandle | None = None
        # A frame begun and not finished holds its bytes in the receive buffer (up to
        # max_frame): one that gets less than MIN_FRAME_RATE a second for frame_timeout
        # while the daemon reads is given up, and the client dropped (max_clients of
        # them held gigabytes outside any budget, for ever). ``_stall_mark``: bytes
        # received at the last look.
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_mark = 0
        self.closed = False
        self.reading = False
        self._parse_due = False  # frames left for the loop's next turn (PARSE_TURN)
        self._closing_after_send = False
        self._failing: PiecedError | None = None  # said once the lane's jobs are done
        self._ended = False  # the client shut its end for writing: its lane, then close
        # The client takes nothing more (a send failed: it hung up, or shut its end for
        # reading): output is dropped, and its queries are not carried out.
        self.deaf = False
        self._pull_timer: asyncio.TimerHandle | None = None  # (see _pull)
        self._stopped = False  # the daemon is stopping: nothing more is read
        self._out: collections.deque[Out] = collections.deque()
        self._out_bytes = 0
        self.sent = 0  # bytes of output sent, ever (see Server._room_due)
        # The lane waits for room in the daemon-wide bound on unsent output: for a reply
        # of ``needs`` bytes (0: for any room; see Server.room).
        self.waiting_room = False
        self.needs = 0
        self._writing = False
        self._lane: collections.deque[Job] = collections.deque()
        # Bytes of request bodies parsed and waiting in the lane (copied out of the ring,
        # so the ring alone does not bound them): over ring_bytes, reading pauses.
        self._queued_bytes = 0
        self._lane_lock = threading.Lock()
        self._lane_busy = False
        self._lane_idle = asyncio.Event()
        self._lane_idle.set()
        self._fds: list[int] = []
        # Bytes received so far, and where the bytes the last descriptors came with end:
        # once the frames up to there are parsed, descriptors none of them took are closed.
        self._received = 0
        self._fds_until = 0
        # Descriptors taken by requests still queued (see MAX_PENDING_FDS): 3,000 queued
        # attach_ring requests of 4 each held every descriptor the daemon could open.
        self._held_fds = 0
        self._held_lock = threading.Lock()
        self.shm: mmap.mmap | None = None
        self.shm_view: memoryview | None = None
        self.shm_fd: int | None = None  # the ring's memfd, for READ_RING (None: read-only)
        self.shm_probe: int | None = None  # a description of its own, to look for holes
        self.shm_addr = 0  # where the ring is mapped here (for mincore)
        self.shm_read = 0  # bytes read through the mapping since its pages were let go
        self._shm_seen = 0  # shm_read at the last look of the idle timer

    def start(self) -> None:
        self._resume_reading()
        # A connection that never says HELLO would hold a client slot for ever.
        self._hello_timer = self.loop.call_later(self.server.handshake_timeout,
                                                 self._handshake_due)

    def _cancel_hello_timer(self) -> None:
        """The timer holds the connection (and its buffer): let both go when done."""
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def _handshake_due(self) -> None:
        self._hello_timer = None
        if not self.handshaken and not self.closed:
            log.info("dropping a client that sent no HELLO within %.1f s, %s",
                     self.server.handshake_timeout, self.who)
            self.server.dropped += 1
            self._fail(ProtocolError(
                f"no HELLO within {self.server.handshake_timeout:g} s"))

    # -- reading ------------------------------------------------------------------------
    def _resume_reading(self) -> None:
        if (not self.reading and not self.closed and not self._closing_after_send
                and self._failing is None and not self._stopped and not self._parse_due
                and not self._ended):
            self.reading = True
            self.loop.add_reader(self.fd, self._on_readable)
            self._watch_frame()
        if self.deaf and self.reading:
            self._pull_soon(0)

    def _pull_soon(self, delay: float) -> None:
        if self._pull_timer is None and not self.closed:
            self._pull_timer = self.loop.call_later(delay, self._pull)

    def _pull(self) -> None:
        """(A deaf connection) Read without waiting to be told the socket is readable:
        a client that closed with replies unread leaves the daemon's end in error
        (ECONNRESET), which the event loop reports by no longer watching the socket,
        not by a call to the reader, and the connection, waiting for the end of the
        stream, was kept for good. What the client sent is in the socket already; while
        nothing comes, it is looked at again every DEAF_LOOK seconds."""
        self._pull_timer = None
        while self.reading and not self.closed:
            before = self._received
            self._on_readable()
            if self._received == before:
                break  # (nothing there, or the end: closed, or reading paused)
        if self.reading and not self.closed:
            self._pull_soon(DEAF_LOOK)

    def _watch_frame(self) -> None:
        """Look again in frame_timeout at a frame left unfinished, while reading (a pause
        of the daemon's own, flow control, stops the clock: the client cannot send).
        Every frame read whole stops the clock: the next one begun gets a whole window
        of its own (one begun at the end of a window kept open by the frames before it
        was judged by the bytes of that window, and its client dropped)."""
        if not self.ring.unparsed:
            self._unwatch_frame()
            return
        if self._stall_timer is None and self.reading and self.handshaken:
            self._stall_mark = self._received
            self._stall_timer = self.loop.call_later(self.server.frame_timeout,
                                                     self._frame_due)

    def _unwatch_frame(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _frame_due(self) -> None:
        self._stall_timer = None
        if self.closed or not self.reading or not self.ring.unparsed:
            return
        timeout = self.server.frame_timeout
        got = self._received - self._stall_mark
        if got >= MIN_FRAME_RATE * timeout:  # (coming in: looked at again)
            self._watch_frame()
            return
        log.info("dropping a client whose frame is unfinished, %d bytes sent in the last "
                 "%.0f s (%d bytes of it held), %s", got, timeout, self.ring.unparsed,
                 self.who)
        self.server.dropped += 1
        self._fail(ProtocolError(
            f"a frame is unfinished, {got} bytes of it sent in {timeout:g} s (at least "
            f"{MIN_FRAME_RATE} a second are wanted)" if got else
            f"a frame is unfinished, nothing more sent in {timeout:g} s"))

    def _input_blocked(self) -> bool:
        """Flow control: stop reading while any of the client's buffers is full."""
        return (not self.ring.writable() or self._out_bytes > self.server.out_limit
                or len(self._lane) >= MAX_QUEUED_JOBS
                or self._queued_bytes > self.server.ring_bytes
                or self._held_fds >= MAX_PENDING_FDS)

    def _resume(self) -> None:
        """Undo the pauses whose cause is gone (a batch done, or output sent)."""
        if self.closed or self._closing_after_send:
            return
        self._kick_lane()
        if self._failing is not None or self._stopped or self._ended:
            return  # nothing more is read: the lane finishes (then the error is said)
        if self.ring.unparsed and not self._parse_due:  # (left while the lane was full)
            self._parse()
            self._close_untaken_fds()
        if not self._input_blocked():
            self._resume_reading()

    def stop_reading(self) -> None:
        """The daemon is stopping: no more requests are read from this client."""
        self._stopped = True
        self._pause_reading()

    def unsent(self) -> bool:
        return not self.closed and bool(self._out)

    def _pause_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        self._unwatch_frame()

    def _on_readable(self) -> None:
        buf = self.ring.writable()
        if not buf:
            self._pause_reading()
            return
        try:
            n, anc, _flags, _ = self.sock.recvmsg_into([buf], socket.CMSG_SPACE(4 * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self._received += n
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self._fds_until = self._received
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                for fd in fds:  # attach_ring and register take one; never hold more than a few
                    if len(self._fds) + self._held_fds < MAX_PENDING_FDS:
                        self._fds.append(fd)
                    else:
                        os.close(fd)
        if n == 0:
            self._end()
            return
        self.ring.wrote(n)
        self._parse()
        self._close_untaken_fds()
        self._watch_frame()

    def _close_untaken_fds(self) -> None:
        """Every frame the bytes the descriptors came with brought (the last of them,
        maybe, begun there and ended in later bytes) is parsed, and none was a request
        that took them: descriptors nobody asked for are closed. Kept until a read
        happened to end between two frames, they lingered and counted against the
        connection's few, and a later attach_ring sent without one took them."""
        if self._fds and self._received - self.ring.unparsed >= self._fds_until:
            for fd in self._fds:
                os.close(fd)
            self._fds = []

    def _parse(self) -> None:
        jobs: list[Job] = []
        failed: PiecedError | None = None
        turn = PARSE_TURN
        while not self.closed and len(self._lane) + len(jobs) < MAX_QUEUED_JOBS:
            if not turn:  # (the others' turn: reading waits for the rest to be parsed)
                if not self._parse_due:
                    self._parse_due = True
                    self.loop.call_soon(self._parse_turn)
                break
            turn -= 1
            try:
                frame = self.reader.next_frame()
                if frame is None:
                    break
                job = self._dispatch(frame)
            except PiecedError as exc:
                # The stream can no longer be trusted: say why, then hang up (after the
                # requests before it, as if they had come in a read of their own).
                # (Detached: its traceback holds this frame, and so the connection, its
                # receive ring with it, in a cycle the collector seldom looks at.)
                failed = detached(exc)
                break
            except Exception as exc:  # a bug here must not leave the connection wedged
                log.exception("parsing a client's frame failed")
                failed = PiecedError(f"the daemon failed to parse a frame: {exc}")
                break
            if job is not None:
                jobs.append(job)
        if jobs:
            self._enqueue(jobs)
        if failed is not None:
            self._fail(failed)
            return
        if self._input_blocked() or self._parse_due:
            self._pause_reading()

    def _parse_turn(self) -> None:
        """The connection's next turn of parsing what it sent."""
        self._parse_due = False
        if (self.closed or self._closing_after_send or self._failing is not None
                or self._stopped or self._ended):
            return
        self._parse()
        self._close_untaken_fds()
        if not self._input_blocked():
            self._resume_reading()

    def _end(self) -> None:
        """The client's stream ended. One that hung up is closed now (its writes read
        before are carried out all the same, its queries dropped: see close). One that
        only shut its end for writing (``shutdown(SHUT_WR)``) still reads: the requests
        it sent are carried out and answered, then the connection is closed."""
        self._pause_reading()
        if self._peer_closed():
            self.close()
            return
        self._ended = True
        if not self._lane_busy and not self._lane:
            self._end_now()  # (else once the lane is done: _lane_stopped)

    def _end_now(self) -> None:
        self._closing_after_send = True
        if not self._out:
            self.close()

    def _peer_closed(self) -> bool:
        """Whether the client closed its socket, not only its writing end (on a Unix
        socket, a peer's close shuts both ways of ours, which poll says with POLLHUP)."""
        events = self._poll_now(select.POLLIN)
        return events is None or bool(events & (select.POLLHUP | select.POLLERR))

    def _poll_now(self, mask: int) -> int | None:
        """What poll says of the socket now, asked for ``mask`` (None: it could not)."""
        poller = select.poll()
        poller.register(self.fd, mask)
        try:
            ready = poller.poll(0)
        except OSError:
            return None
        return ready[0][1] if ready else 0

    def _deafen(self) -> None:
        """A send failed: the client takes nothing more (it hung up, or shut its end for
        reading). What was unsent is dropped, and so is all output after; what it sent
        before is still read and carried out, to the end of its stream, which closes the
        connection (closed at once, the writes it had sent and the daemon not yet read
        were lost, pieces left partial, for want of a place to put a reply)."""
        self.deaf = True
        self.server.unsent -= self._out_bytes
        self._out.clear()
        self._out_bytes = 0
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.fd)
        if self._closing_after_send:
            self.close()
            return
        if self.server.waits_for_room():
            self.server.room_made()
        self.loop.call_soon(self._resume)  # (output no longer holds its reading back)

    def _fail(self, exc: PiecedError) -> None:
        """Say why the connection ends, then hang up: after the replies to the requests
        read before the cause, which the lane may still be carrying out."""
        self._pause_reading()
        if self._lane_busy or self._lane:
            self._failing = exc  # said by _lane_stopped
            return
        self._fail_now(exc)

    def _fail_now(self, exc: PiecedError) -> None:
        self.send([encode_error(0, exc)])
        self._closing_after_send = True
        self._pause_reading()
        if not self._out:
            self.close()

    # -- dispatch (event-loop thread) -----------------------------------------------------
    def _dispatch(self, frame: Frame) -> Job | None:
        if not self.handshaken:
            if frame.type != FrameType.HELLO:
                raise ProtocolError("the first frame must be HELLO")
            check_hello(frame.body, "client")
            self.handshaken = True
            self._cancel_hello_timer()
            reply = hello("server", "pieced", max_frame=self.server.max_frame,
                          ring_bytes=self.server.ring_bytes, max_block=MAX_BLOCK,
                          conn=self.serial)
            self.send([encode_control(FrameType.HELLO, frame.id, to_wire(reply))])
            return None
        t = frame.type
        if t == FrameType.REQUEST:
            return self._request_job(frame)
        if t == FrameType.WRITE:
            return self._write_job(frame)
        if t == FrameType.WRITE_RING:
            return self._ring_job(frame)
        if t == FrameType.READ:
            return self._read_job(frame)
        if t == FrameType.READ_RING:
            return self._read_ring_job(frame)
        raise ProtocolError(f"a client does not send {t.name} frames")

    def _request_job(self, frame: Frame) -> Job:
        msg = from_wire(frame.body)
        op = msg.pop("op", None)
        # What the tables are looked up by: an op that is a list or a dict (unhashable)
        # was an INTERNAL error that closed the connection, not an unknown op.
        name = op if isinstance(op, str) else ""
        rid = frame.id
        handler: Op | None = OPS.get(name)
        if op == "attach_ring":
            # The descriptors arrived with these bytes: take them now, on this thread;
            # the ring is attached in the lane, after the frames sent before this one.
            fds, self._fds = self._fds, []
            self._hold_fds(len(fds))

            def attach(c: Connection, r: int, m: dict[str, Any]) -> Any:
                try:
                    return c._attach_ring(m, fds)
                finally:
                    c._hold_fds(-len(fds))

            handler = attach
        elif op == "register" and "metainfo" not in msg:
            # A metainfo larger than a frame comes in a memfd, taken as attach_ring's.
            taken, self._fds = self._fds, []
            self._hold_fds(len(taken))

            def register(c: Connection, r: int, m: dict[str, Any]) -> Any:
                try:
                    m["metainfo"] = c._read_metainfo(m, taken)
                finally:
                    c._hold_fds(-len(taken))
                return _op_register(c, r, m)

            handler = register

        key = msg.get("ih") if handler is not None and op != "attach_ring" else None

        def job() -> tuple[list[Out], tuple[int, int] | None]:
            if (self.closed or self.deaf) and name in QUERIES:
                return [], None  # nobody to answer
            try:
                if handler is None:
                    raise BadRequest(f"unknown op {op!r:.80}")
                if isinstance(key, bytes):
                    self.subscribe_known(key)
                big = _big_report(self, name, msg)
                with self.server.report_slot if big else contextlib.nullcontext():
                    reply = encode_response(rid, handler(self, rid, msg))
                if len(reply) - 4 > self.server.max_frame:
                    raise TooLarge(f"a reply of {len(reply) - 4} bytes exceeds the frame limit of "
                                   f"{self.server.max_frame}" + _TOO_LARGE_HINTS.get(op, ""))
                return [reply], None
            except PiecedError as exc:
                return [encode_error(rid, exc)], None
            except (TypeError, KeyError, ValueError) as exc:
                return [encode_error(rid, BadRequest(f"{op}: bad arguments: {exc}"))], None

        ih = msg.get("ih")
        size = frame.length  # the body's size: what the decoded request holds, about
        self._queued_bytes += size
        # (a piece's size is not known before the torrent is looked at: the most it can be)
        reply = self.server.max_frame if name == "read_piece" else 0
        return _Job(rid, None, job, name in LONG_OPS, ih if isinstance(ih, bytes) else None, size,
                    reply)

    def _write_job(self, frame: Frame) -> Job:
        return _InlineWrite(self, frame)

    def _ring_job(self, frame: Frame) -> Job:
        return _RingWrite(self, frame)

    def hung_up(self) -> bool:
        """Whether the client has closed its end: what it sent before is read and parsed
        now (the requests in it carried out, as ever; a frame it left unfinished never
        will be), and the connection closed with it. False while its end is open (or
        only shut for writing: the client reads its replies, and keeps its place), or
        while whole requests of it wait for its lane. (Its end seen only once its
        readiness was reported, clients that hung up with bytes unread, a frame begun,
        held their places: connections accepted in a burst, and any whose readiness was
        never reported, took every place, and live clients were refused.)"""
        if self.closed:
            return True
        events = self._poll_now(select.POLLIN | select.POLLRDHUP)
        if not (events or 0) & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
            return False
        while not self.closed and self.reading:  # (a blocked lane pauses reading)
            before = self._received
            self._on_readable()
            if self._received == before and not self.closed:
                break  # (nothing came: EAGAIN)
        return self.closed

    def _hold_fds(self, n: int) -> None:
        """``n`` more (or fewer) descriptors held by queued requests (any thread); once
        the request has run, the next batch's completion reads the connection again."""
        with self._held_lock:
            self._held_fds += n

    def subscribe_known(self, ih: bytes) -> None:
        """(Worker thread, before the request on ``ih`` runs.) Events for ``ih`` from now
        on, if the daemon has that torrent: a key it does not know is not kept, so that
        requests naming made-up keys cannot grow the connection's memory."""
        if ih not in self.subscriptions and self.disk.knows(ih):
            self.subscribe((ih,))

    def subscribe(self, keys: Iterable[bytes]) -> None:
        """Add ``keys``; now and then (as the set doubles) drop the keys of torrents
        the daemon no longer has, but for those awaited: a long-lived connection that
        registers and unregisters torrent after torrent keeps only those it can use."""
        self.subscriptions.update(keys)
        if len(self.subscriptions) >= self._prune_at:
            knows, awaited = self.disk.knows, self.awaited
            self.subscriptions.difference_update(  # (walks a copy: lanes of one
                [k for k in list(self.subscriptions)  # connection may add keys meanwhile)
                 if k not in awaited and not knows(k)])
            self._prune_at = 2 * len(self.subscriptions) + 64

    def _read_job(self, frame: Frame) -> Job:
        rid = frame.id
        limit = self.server.max_frame - LENGTH_AFTER  # as much as one DATA frame holds

        def job() -> tuple[list[Out], tuple[int, int] | None]:
            if self.closed or self.deaf:
                return [], None  # nobody to read for
            try:
                if frame.length > limit:
                    raise BadRequest(f"reads are limited to {limit} bytes")
                data = self.disk.read_chunk_view(frame.info_hash, frame.piece, frame.begin,
                                            frame.length, volatile=bool(frame.flags & FLAG_VOLATILE))
                return [encode_data_header(rid, len(data)), _reply_bytes(data)], None
            except PiecedError as exc:
                return [encode_error(rid, exc)], None

        return _Job(rid, None, job, False, frame.info_hash,
                    reply=min(frame.length, limit) + OUT_PART_BYTES)

    def _read_ring_job(self, frame: Frame) -> Job:
        """A READ whose bytes go into the client's ring, not the socket: one copy, from
        the piece cache into memory the client sends from, where a DATA reply costs a
        copy into the socket here and one out of it in the client."""
        rid = frame.id
        limit = self.server.max_frame - LENGTH_AFTER  # what a READ may ask for

        def job() -> tuple[list[Out], Token | None]:
            if self.closed or self.deaf:
                return [], None  # nobody to read for (its ring is going)
            try:
                if frame.length > limit:
                    raise BadRequest(f"reads are limited to {limit} bytes")
                s0, s1 = self._ring_slices(frame.ring_offset, frame.length, limit)
                fd = self.shm_fd
                if fd is None:
                    raise BadRequest(_READ_ONLY_RING)
                data = self.disk.read_chunk_view(frame.info_hash, frame.piece, frame.begin,
                                                 frame.length,
                                                 volatile=bool(frame.flags & FLAG_VOLATILE))
                src = memoryview(data)
                if src.nbytes != frame.length:  # (a bug) the client takes the whole space
                    raise StorageIOError(f"READ_RING: {src.nbytes} bytes read of "
                                         f"{frame.length}")
                # Through the descriptor, not the mapping: the ring's pages then never
                # enter the daemon's page tables (its memory is the client's, not ours).
                _pwrite_all(fd, src[: s0.nbytes], frame.ring_offset)
                if s1.nbytes:
                    _pwrite_all(fd, src[s0.nbytes :], 0)
                return [encode_ack(rid)], None
            except PiecedError as exc:
                return [encode_error(rid, exc)], None

        return _Job(rid, None, job, False, frame.info_hash)

    # -- the shared-memory ring ------------------------------------------------------------
    def _read_metainfo(self, msg: dict[str, Any], fds: list[int]) -> bytes:
        """The metainfo of a register that passed it as a descriptor (closed here)."""
        try:
            if len(fds) != 1:
                raise BadRequest("register needs 'metainfo', or 'metainfo_size' and exactly "
                                 "one descriptor passed with SCM_RIGHTS")
            size = msg.get("metainfo_size")
            limit = self.disk.metainfo_limits.get("max_bytes", MAX_METAINFO_BYTES)
            if not isinstance(size, int) or size <= 0:
                raise BadRequest("'metainfo_size' must be a positive integer")
            if size > limit:
                raise TooLarge(f"metainfo of {size} bytes exceeds max_metainfo_bytes ({limit})")
            try:
                if os.fstat(fds[0]).st_size != size:
                    raise BadRequest(f"metainfo_size {size} does not match the descriptor")
                data = os.pread(fds[0], size, 0)
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EISDIR, errno.EINVAL, errno.ESPIPE):
                    # The client's descriptor, not a disk: not open for reading (O_WRONLY,
                    # O_PATH), a folder, a pipe or a socket.
                    raise BadRequest("register: the descriptor passed cannot be read from "
                                     f"the start like a file ({exc.strerror})") from None
                raise StorageIOError.wrap(exc, "register: read the metainfo") from None
            if len(data) != size:
                raise BadRequest("the descriptor held less than metainfo_size bytes")
            return data
        finally:
            for fd in fds:
                os.close(fd)

    def _attach_ring(self, msg: dict[str, Any], fds: list[int]) -> dict[str, int]:
        """The attach_ring op (in the lane), with the descriptors received before it."""
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise BadRequest("attach_ring needs exactly one descriptor passed with SCM_RIGHTS")
        fd = fds[0]
        try:
            if self.shm is not None:
                # Blocks in flight point into the attached ring: it cannot be swapped.
                raise BadRequest("a ring is already attached to this connection")
            size = msg.get("size")
            st = os.fstat(fd)
            if not isinstance(size, int) or size <= 0:
                raise BadRequest(f"ring size {size!r}: a ring is a whole number of bytes, at "
                                 "least one")
            if not stat.S_ISREG(st.st_mode):  # (a pipe, a socket, a device: size 0)
                raise BadRequest("the ring's descriptor is not a memfd (nor any file): "
                                 "a pipe, a socket or a device")
            if st.st_size != size:
                raise BadRequest(f"ring size {size!r} does not match the descriptor ({st.st_size})")
            if size > self.server.max_ring:
                # What the daemon writes into it (READ_RING) where the client never did
                # is memory of the daemon's: bounded per client.
                raise TooLarge(f"a ring of {size} bytes exceeds max_ring_bytes "
                               f"({self.server.max_ring})")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            if not seals & _REQUIRED_SEALS:
                # Without F_SEAL_SHRINK a client could truncate the memfd under our
                # mapping and make the daemon fault (SIGBUS) mid-copy.
                raise BadRequest("the ring must be a memfd sealed with F_SEAL_SHRINK")
            self.shm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            self.shm_view = memoryview(self.shm)
            self.shm_probe = _own_description(fd)
            self.shm_addr = _address_of(self.shm_view)
            self.loop.call_soon_threadsafe(self._ring_idle)  # (its looks begin)
            # READ_RING writes into the ring through the descriptor, kept for that when
            # the client can write it too (opened read-write, not sealed against writes).
            # Through a description of the daemon's own: the client's may be O_APPEND
            # (then every pwrite lands at the end of the memfd and grows it, whatever the
            # offset: 1,500 READ_RINGs into a 16 MiB ring made it 1.5 GB), and its flags
            # are the client's to change with F_SETFL at any time. With no /proc to open
            # one, only a ring sealed against growing (where an append fails) is written.
            writable = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
                        and not seals & _WRITE_SEALS)
            if writable:
                try:
                    self.shm_fd = _reopened(fd, os.O_RDWR)
                except OSError:
                    if seals & fcntl.F_SEAL_GROW:
                        self.shm_fd, fd = fd, -1
        except OSError as exc:
            raise StorageIOError.wrap(exc, "attach_ring") from None
        finally:
            if fd >= 0:
                os.close(fd)
        return {"size": size}

    def _ring_idle(self) -> None:
        """(Event loop, every RING_IDLE_SECONDS while a ring is attached.) A ring no block
        was read through since the last look has the pages mapped here let go: safe at
        any time, reads in flight included (in a shared mapping that only unmaps them
        here; the bytes stay in the client's memfd, and a later read maps them again)."""
        shm = self.shm
        if shm is None:
            return
        read = self.shm_read
        if read and read == self._shm_seen:
            self.shm_read = self._shm_seen = 0
            with contextlib.suppress(ValueError, OSError):
                shm.madvise(mmap.MADV_DONTNEED)
        else:
            self._shm_seen = read
        self.loop.call_later(RING_IDLE_SECONDS, self._ring_idle)

    def _ring_slices(
        self, offset: int, length: int, limit: int = MAX_BLOCK
    ) -> tuple[memoryview, memoryview]:
        view = self.shm_view
        if view is None:
            raise BadRequest("no shared-memory ring is attached")
        size = view.nbytes
        if not 0 < length <= limit:
            raise BadRequest(f"a ring range of {length} bytes: 1 to {limit} bytes at a time")
        if not 0 <= offset < size or length > size:
            raise BadRequest(f"ring range offset={offset} length={length} is outside the ring ({size})")
        end = offset + length
        if end <= size:
            return view[offset:end], view[0:0]
        return view[offset:size], view[0 : end - size]

    def _drop_shm(self) -> None:
        if self.shm_view is not None:
            self.shm_view.release()
            self.shm_view = None
        if self.shm is not None:
            with contextlib.suppress(BufferError):
                self.shm.close()
            self.shm = None
        if self.shm_fd is not None:
            os.close(self.shm_fd)
            self.shm_fd = None
        if self.shm_probe is not None:
            os.close(self.shm_probe)
            self.shm_probe = None
        self.shm_addr = 0

    def _check_written(self, s0: memoryview, offset: int, s1: memoryview) -> None:
        """A WRITE_RING's bytes must be ones the client wrote: a range it never wrote
        is a hole in the memfd, and reading it here would make the kernel give the
        daemon a page of zeros for each, memory of the daemon's (a 1 TiB ring read
        where empty grew the daemon by a gigabyte a second). The pages are looked up
        in the page cache (``mincore`` of our map: a call, not a walk of the file); one
        not there (a hole, or a page the kernel swapped out) is then asked of the file
        itself (SEEK_HOLE, which takes a swapped page for data)."""
        fd, base = self.shm_probe, self.shm_addr
        if fd is None or not base:
            return
        for start, view in ((offset, s0), (0, s1)):
            if not view.nbytes:
                continue
            missing = _first_not_resident(base, start, view.nbytes)
            if missing is None:
                continue
            try:
                hole = os.lseek(fd, missing, os.SEEK_HOLE)
            except OSError as exc:
                raise StorageIOError.wrap(exc, "WRITE_RING: look at the ring") from None
            if hole < start + view.nbytes:
                raise BadRequest(f"the ring holds nothing written at offset {hole} "
                                 f"(WRITE_RING of offset {offset}): write the block into "
                                 "the ring before sending it")

    # -- the lane (worker threads) ------------------------------------------------------------
    def _enqueue(self, jobs: list[Job]) -> None:
        with self._lane_lock:
            self._lane.extend(jobs)
        self._kick_lane()

    def _kick_lane(self) -> None:
        """Start the lane's worker (loop thread only) if it has jobs and is not running,
        unless the client's unsent output is over the limit: then :meth:`_resume` starts
        it once the client has read enough. Nor while the daemon's unsent output, all
        clients', has no room for the read it waits for: then the server wakes it in
        turn, or it goes on once it has nothing unsent. (Its other jobs are not held:
        their replies are a few bytes, and a client whose writes stopped while events
        for it waited unread stopped reading, blocked in its send.) A closed connection
        finishes its jobs."""
        if self._lane_busy or not self._lane:
            return
        if self.server.shut:  # (the daemon has stopped: a client gone since has nobody
            self._lane.clear()  # to carry out its requests)
            self._lane_idle.set()
            return
        if not self.closed:
            if self._out_bytes > self.server.out_limit:
                return
            if self.needs and not self.server.room(self.needs, not self._out_bytes):
                self.server.wait_for_room(self)
                return
        self._lane_busy = True
        self._lane_idle.clear()
        if self._is_long(self._lane[0]):
            self.server.long_executor.submit(self._drain_lane, True)
        else:
            self.server.executor.submit(self._drain_lane, False)

    def _is_long(self, job: Job, held: Collection[Hashable] = ()) -> bool:
        """Whether a job may keep its worker long: a long op, a job on a torrent that a
        fenced operation holds or awaits (it will wait for it), or one on a file system
        whose short worker another lane holds (``held``: those this lane holds)."""
        if getattr(job, "long", False):
            return True
        ih = getattr(job, "ih", None)
        if ih is None:
            return False
        if self.disk.fenced(ih):
            return True
        device = self.disk.device(ih)
        return device not in held and self.server.short_held(device)

    def _drain_lane(self, long: bool) -> None:
        """Worker thread: run the lane's jobs in order, posting their replies in batches.
        Stops when the lane is empty, once this run has produced out_limit bytes of
        replies, or (on a short-job worker) at a job that may take long: the rest waits,
        in order, for the loop to restart it on the right workers."""
        held: set[Hashable] = set()  # (short workers) file systems whose worker this is
        try:
            self._drain(long, self.server.out_limit, held)
        finally:
            self.server.give_short(held)
        self._post(self._lane_stopped)

    def _drain(self, long: bool, limit: int, held: set[Hashable]) -> None:
        produced = 0
        moving = False
        server = self.server
        self.needs = 0
        ran = 0
        while produced <= limit and not moving and ran < LANE_TURN:
            with self._lane_lock:
                if not self._lane:
                    break
                if len(self._lane) <= LANE_TURN:
                    batch = list(self._lane)
                    self._lane.clear()
                else:
                    batch = [self._lane.popleft() for _ in range(LANE_TURN)]
            ran += len(batch)
            out: list[Out] = []
            tokens: list[tuple[int, int]] = []
            freed = pledged = credit = 0
            batch = _coalesce(batch)
            if not self.closed:
                # Room for the batch's replies taken at once where it fits (a lock taken
                # for every one of thousands of small reads, by every worker, made a
                # flood of them take half as long again); else a reply at a time.
                want = sum(getattr(job, "reply", 0) for job in batch)
                if want and server.pledge(want, False, strict=True):
                    pledged = credit = want
            for i, job in enumerate(batch):
                if not long and (self._is_long(job, held) or not self._hold(job, held)):
                    with self._lane_lock:
                        self._lane.extendleft(reversed(batch[i:]))
                    moving = True
                    break
                reply = getattr(job, "reply", 0)
                if reply and reply <= credit:
                    credit -= reply
                elif reply and not self.closed:
                    # Room for its reply in the daemon-wide bound, with what this run
                    # made and has not handed the loop yet (held as a pledge till then).
                    if not server.pledge(reply, not produced and not self._out_bytes):
                        with self._lane_lock:
                            self._lane.extendleft(reversed(batch[i:]))
                        self.needs = reply  # (the loop waits for room: _kick_lane)
                        moving = True
                        break
                    pledged += reply
                try:
                    frames, token = job()
                except Exception as exc:  # a bug must not kill the lane
                    log.exception("request failed")
                    frames, token = [encode_error(0, PiecedError(f"internal error: {exc}"))], None
                out.extend(frames)
                freed += getattr(job, "size", 0)
                for f in frames:
                    produced += len(f)
                if isinstance(token, list):
                    tokens.extend(token)
                elif token is not None:
                    tokens.append(token)
                if produced > limit:
                    with self._lane_lock:
                        self._lane.extendleft(reversed(batch[i + 1 :]))
                    break
            self._post(self._completed, out, tokens, freed, pledged)

    def _hold(self, job: Job, held: set[Hashable]) -> bool:
        """(Short workers) hold the short worker of the job's file system, unless this
        lane holds it already; False if another lane does."""
        ih = getattr(job, "ih", None)
        if ih is None:
            return True
        device = self.disk.device(ih)
        if device in held:
            return True
        if not self.server.take_short(device):
            return False
        held.add(device)
        return True

    def _lane_stopped(self) -> None:
        self._lane_busy = False
        self._kick_lane()
        if not self._lane_busy and not self._lane:
            self._lane_idle.set()
            if self.closed:
                self._drop_shm()
                self.server.draining.discard(self)
            elif self._failing is not None:
                exc, self._failing = self._failing, None
                self._fail_now(exc)
            elif self._ended:
                self._end_now()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self.server.post(fn, *args)

    def _completed(self, out: list[Out], tokens: list[tuple[int, int]], freed: int,
                   pledged: int) -> None:
        self._queued_bytes -= freed
        for token in tokens:
            self.ring.release(token)
        self.send(out)  # (counted unsent before the pledge is given back)
        if pledged:
            self.server.unpledge(pledged)
            self.server.room_made()
        self._resume()

    def resume_for_room(self) -> None:
        """(Server.room_made) There is room for what the lane waits for."""
        self._resume()

    def holds_unsent(self) -> bool:
        return not self.closed and self._out_bytes > 0

    def consumed(self) -> int:
        """About how many bytes of its output the client has read: what was sent less
        what its socket still holds unread. (Sent alone moves in bursts: the socket
        takes more only once the client has read most of what it holds, 200 KiB, and
        a client reading 20 KiB a second was seen to read nothing over 3-10 s.)"""
        try:
            queued: int = struct.unpack("i", fcntl.ioctl(self.fd, termios.TIOCOUTQ, _INT))[0]
        except OSError:
            queued = 0
        return self.sent - queued

    def unsent_bytes(self) -> int:
        return self._out_bytes

    async def drained(self) -> None:
        await self._lane_idle.wait()
        self._drop_shm()

    # -- writing --------------------------------------------------------------------------
    def send(self, frames: list[Out]) -> None:
        if self.closed or self.deaf:
            return
        added = 0
        for f in frames:
            self._out.append(f)
            added += len(f) + OUT_PART_BYTES
        self._out_bytes += added
        self.server.unsent += added
        self._flush_out()
        if self._out_bytes > 0:
            self.server.over_bound()
        if self._out_bytes > self.server.drop_limit and not self.closed:
            # Only events get here (lane replies pause at out_limit): the client does
            # not read them, and they cannot be held back, so it goes.
            log.warning("dropping a client that does not read, %s: %d bytes held unsent "
                        "(limit %d)", self.who, self._out_bytes, self.server.drop_limit)
            self.server.dropped += 1
            self.close()

    def _flush_out(self) -> None:
        server = self.server
        before = self._out_bytes
        while self._out:
            chunk = list(itertools.islice(self._out, 64))
            try:
                n = self.sock.sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._deafen()
                return
            self.sent += n
            gone = n
            # Empty parts are dropped too (a DATA frame of a zero-length read ends in
            # one): left at the head, sendmsg would send them for ever, 0 bytes a time.
            while self._out and n >= len(self._out[0]):
                n -= len(self._out.popleft())
                gone += OUT_PART_BYTES
            if n:
                self._out[0] = memoryview(self._out[0])[n:]
            self._out_bytes -= gone
            server.unsent -= gone
        if self._out_bytes != before and server.waits_for_room():
            if self.waiting_room and not self._out_bytes:
                self._resume()  # (a read that waits for room: it has nothing unsent now)
            server.room_made()
        if self._out and not self._writing:
            self._writing = True
            self.loop.add_writer(self.fd, self._on_writable)
        elif not self._out:
            if self._writing:
                self._writing = False
                self.loop.remove_writer(self.fd)
            if self._closing_after_send:
                self.close()

    def _on_writable(self) -> None:
        self._flush_out()
        if self._out_bytes <= self.server.out_limit:
            self._resume()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_hello_timer()
        if self._pull_timer is not None:
            self._pull_timer.cancel()
            self._pull_timer = None
        self._pause_reading()
        if self._writing:
            self.loop.remove_writer(self.fd)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.server.forget_end(self)  # (before its number can be another's)
        self.sock.close()
        self.server.clients.discard(self)
        self._out.clear()
        self.server.unsent -= self._out_bytes
        self._out_bytes = 0
        if self.server.waits_for_room():
            self.server.room_made()
        self._kick_lane()  # a lane paused on output carries out its jobs all the same
        if not self._lane_busy:
            self._drop_shm()
        else:
            self.server.draining.add(self)


_READ_ONLY_RING = ("the ring is read-only to the daemon (its descriptor is not open for "
                   "writing, or sealed against writes): READ_RING needs a writable ring")
_WRITE_SEALS = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)


_PAGE = mmap.PAGESIZE
_INT = bytes(4)
# mincore is a call of a microsecond: made holding the interpreter's lock (PyDLL), a
# lane does not give that lock up at each block and wait to get it back.
_libc = ctypes.PyDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


class _Py_buffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _address_of(view: memoryview) -> int:
    """Where a (read-only) buffer's bytes are; 0 if that cannot be learnt."""
    pb = _Py_buffer()
    try:
        if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(view), ctypes.byref(pb), 0):
            return 0
    except Exception:
        return 0
    addr = pb.buf or 0
    ctypes.pythonapi.PyBuffer_Release(ctypes.byref(pb))
    return int(addr)


def _first_not_resident(base: int, offset: int, length: int) -> int | None:
    """The offset of the first page of ``[offset, offset + length)`` of the map at
    ``base`` that is not in the page cache, or None when all are."""
    first = offset - offset % _PAGE
    pages = (offset + length - first + _PAGE - 1) // _PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(base + first, pages * _PAGE, vec) != 0:
        return first  # (cannot tell: the file is asked)
    i = bytes(vec).find(0)  # (a page in the cache is 1: the other bits are reserved)
    return None if i < 0 else first + i * _PAGE


def _reopened(fd: int, flags: int) -> int:
    """The file of ``fd`` opened again with ``flags``: a description of the daemon's
    own, whose offset and flags the client cannot change (a descriptor passed with
    SCM_RIGHTS shares the client's)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def _own_description(fd: int) -> int:
    """The file of ``fd`` opened again, read-only: a seek on it moves no offset the
    client shares."""
    try:
        return _reopened(fd, os.O_RDONLY)
    except OSError:
        return os.dup(fd)  # (no /proc: pwrite and mmap, all the client needs, take none)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` into the ring's memfd at ``offset``."""
    try:
        while data.nbytes:
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
    except PermissionError:
        raise BadRequest(_READ_ONLY_RING) from None
    except OSError as exc:
        raise StorageIOError.wrap(exc, "READ_RING: write into the ring") from None


def _run_guarded(
    rid: int, token: Token | None, job: Job
) -> tuple[list[Out], Token | list[Token] | None]:
    """Run a lane job so that its unexpected failure (a bug) still answers its own
    request id and frees its ring space: the client is never left waiting."""
    try:
        return job()
    except Exception as exc:
        log.exception("request %d failed", rid)
        return [encode_error(rid, PiecedError(f"internal error: {exc}"))], token


class _Job:
    """A lane job with what the lane needs to know to place it: whether it may run long,
    and which torrent it touches (a job on a fenced torrent waits for the fence)."""

    __slots__ = ("fn", "ih", "long", "reply", "rid", "size", "token")

    def __init__(self, rid: int, token: tuple[int, int] | None, fn: Job, long: bool,
                 ih: bytes | None, size: int = 0, reply: int = 0) -> None:
        self.rid, self.token, self.fn, self.long, self.ih = rid, token, fn, long, ih
        self.size = size  # request body bytes it holds, until it has run
        # The bytes of data its reply may hold (a read's), room for which is taken in the
        # daemon-wide bound on unsent output before it runs; 0: a reply of a few bytes.
        self.reply = reply

    def __call__(self) -> tuple[list[Out], Token | list[Token] | None]:
        return _run_guarded(self.rid, self.token, self.fn)


def _reply_bytes(data: Buffer) -> memoryview:
    """A DATA reply's bytes, holding no more memory than they count. The read gives a
    view of the buffer it read the piece into (the cache's), and a reply waiting to be
    sent counts only its own bytes against the client's buffer: a view of 16 KiB kept a
    16 MiB piece alive after the cache had let it go, and a client that did not read its
    replies held a piece a READ. A view of less than half of its buffer is copied."""
    view = memoryview(data)
    owner = view.obj
    if owner is None or owner is data:
        return view
    with memoryview(owner) as whole:
        if whole.nbytes <= 2 * view.nbytes:
            return view
    return memoryview(bytes(view))


# -- ring writes, one at a time or merged (worker threads) ----------------------------------

class _BlockWrite:
    """A WRITE or WRITE_RING job. Kept as data, not a closure, so that the lane can see
    runs of them: blocks a client sent back to back (same piece, adjacent in it) go to
    disk as one pwritev and one pass of the hashers (_WriteRun)."""

    __slots__ = ("begin", "conn", "flags", "ih", "length", "piece", "rid", "token")
    long = False
    shared = False  # its bytes are in memory the client can write (see write_blocks_direct)

    def __init__(self, conn: Connection, frame: Frame) -> None:
        self.conn = conn
        self.rid = frame.id
        self.ih = frame.info_hash
        self.piece = frame.piece
        self.begin = frame.begin
        self.length = frame.length
        self.flags = frame.flags
        self.token: Token | None = None  # receive-ring space to free once answered

    def follows(self, prev: _BlockWrite) -> bool:
        return (type(prev) is type(self) and not self.flags and not prev.flags
                and self.ih == prev.ih and self.piece == prev.piece
                and self.begin == prev.begin + prev.length
                and 0 < self.length <= MAX_BLOCK and 0 < prev.length <= MAX_BLOCK)

    def bufs(self, writes: list[_BlockWrite]) -> Sequence[Buffer]:
        """The bytes of ``writes`` (this one first, the others following it)."""
        raise NotImplementedError

    def __call__(self) -> tuple[list[Out], Token | list[Token] | None]:
        return _run_guarded(self.rid, self.token, self._write)

    def _write(self) -> tuple[list[Out], Token | list[Token] | None]:
        try:
            self.conn.subscribe_known(self.ih)
            disk = self.conn.disk
            disk.write_blocks_direct(self.ih, self.piece, self.begin, self.bufs([self]),
                                     max(1, -(-self.length // BLOCK_SIZE)),
                                     writer=self.conn.serial, shared=self.shared)
            if self.flags & FLAG_FLUSH:
                disk.flush_piece(self.ih, self.piece)
            return [encode_ack(self.rid)], self.token
        except PiecedError as exc:
            return [encode_error(self.rid, exc)], self.token


class _RingWrite(_BlockWrite):
    """A WRITE_RING: the block is in the client's shared ring."""

    __slots__ = ("offset",)
    shared = True

    def __init__(self, conn: Connection, frame: Frame) -> None:
        super().__init__(conn, frame)
        self.offset = frame.ring_offset

    def follows(self, prev: _BlockWrite) -> bool:
        view = self.conn.shm_view
        return (super().follows(prev) and view is not None and isinstance(prev, _RingWrite)
                and self.offset == (prev.offset + prev.length) % view.nbytes)

    def bufs(self, writes: list[_BlockWrite]) -> Sequence[Buffer]:
        total = sum(w.length for w in writes)  # a run: each of its writes <= MAX_BLOCK
        s0, s1 = self.conn._ring_slices(self.offset, total,
                                        limit=MAX_BLOCK if len(writes) == 1 else total)
        if len(writes) == 1:  # (a run that fails is tried again a write at a time)
            self.conn.disk.check_write(self.ih, self.piece, self.begin, self.length)
        self.conn._check_written(s0, self.offset, s1)
        self.conn.shm_read += total  # (two workers racing may lose a count: no matter)
        return (s0, s1) if s1.nbytes else (s0,)


class _InlineWrite(_BlockWrite):
    """A WRITE: the block is written to its file from the receive ring where it arrived,
    as a WRITE_RING block is from the shared ring (no copy), and its space there is freed
    once the reply is sent."""

    __slots__ = ("views",)

    def __init__(self, conn: Connection, frame: Frame) -> None:
        super().__init__(conn, frame)
        self.views = frame.payload  # empty for a block over MAX_BLOCK: skipped, refused
        self.token = frame.token

    def bufs(self, writes: list[_BlockWrite]) -> Sequence[Buffer]:
        if self.length > MAX_BLOCK:  # skipped by the reader (a run holds none such)
            raise BadRequest(f"blocks are limited to {MAX_BLOCK} bytes")
        views = [v for w in writes if isinstance(w, _InlineWrite) for v in w.views]
        return views or (b"",)


class _WriteRun:
    """Adjacent block writes done as one; if that fails, each is retried on its own so
    that every request gets exactly the answer it would have had alone."""

    __slots__ = ("ih", "writes")
    long = False

    def __init__(self, writes: list[_BlockWrite]) -> None:
        self.writes = writes
        self.ih = writes[0].ih

    def __call__(self) -> tuple[list[Out], Token | list[Token] | None]:
        first = self.writes[0]
        tokens = [w.token for w in self.writes if w.token is not None]
        disk = first.conn.disk
        try:
            with disk.errors_held() as merged:
                first.conn.subscribe_known(first.ih)
                disk.write_blocks_direct(
                    first.ih, first.piece, first.begin, first.bufs(self.writes),
                    sum(-(-w.length // BLOCK_SIZE) for w in self.writes),
                    writer=first.conn.serial, shared=first.shared)
        except Exception as exc:
            if not isinstance(exc, PiecedError):  # a bug, not a bad request: say so
                log.exception("merged write failed; retrying its blocks one by one")
            out: list[Out] = []
            # The error that failed the merged write is counted as the blocks alone meet
            # it (once each, not once more for the merged write), and only if none does;
            # the others it met on its way (a journal's, committed in this thread when
            # there is no sync window) are told as they are.
            with disk.errors_held() as alone:
                for w in self.writes:
                    out.extend(_run_guarded(w.rid, None, w._write)[0])
            on_way = [e for e in merged if e[1] is not exc]  # (recorded as raised: the same object)
            disk.tell_errors(on_way + (alone or [e for e in merged if e[1] is exc]))
            return out, tokens
        disk.tell_errors(merged)  # (met by a write that succeeded: a commit's, say)
        return [encode_ack(w.rid) for w in self.writes], tokens


def _coalesce(batch: list[Job]) -> list[Job]:
    """The batch with each run of adjacent block writes replaced by one _WriteRun."""
    out: list[Job] = []
    run: list[_BlockWrite] = []
    for job in [*batch, None]:  # None: the end, which closes the last run
        if isinstance(job, _BlockWrite) and run and job.follows(run[-1]):
            run.append(job)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else _WriteRun(run))
            run = []
        if isinstance(job, _BlockWrite):
            run.append(job)
        elif job is not None:
            out.append(job)
    return out


# -- operations (worker threads) ------------------------------------------------------------

def _ih(msg: dict[str, Any]) -> bytes:
    ih = msg.get("ih")
    if not isinstance(ih, bytes) or len(ih) != 20:
        raise BadRequest("'ih' must be the 20-byte info_hash")
    return ih


def _int(msg: dict[str, Any], key: str) -> int:
    v = msg.get(key)
    if not isinstance(v, int):
        raise BadRequest(f"'{key}' must be an integer")
    return v


def _flag(msg: dict[str, Any], key: str, default: int) -> bool:
    """A 0/1 argument (absent: ``default``). Anything else is refused, never taken for
    its truthiness: a flag sent as "0" or b"no" must not delete a torrent's files."""
    v = msg.get(key, default)
    if not isinstance(v, int) or v not in (0, 1):
        raise BadRequest(f"'{key}' must be 0 or 1")
    return bool(v)


def _str(msg: dict[str, Any], key: str) -> str:
    v = msg.get(key)
    if not isinstance(v, str):
        raise BadRequest(f"'{key}' must be a string")
    return v


def _path(msg: dict[str, Any], key: str) -> str:
    """A folder named by a client: an empty one is a mistake, not the daemon's own folder."""
    v = _str(msg, key)
    if not v:
        raise BadRequest(f"'{key}' must name a folder, not be empty")
    return v


def _op_register(c: Connection, rid: int, m: dict[str, Any]) -> Any:
    metainfo = m.get("metainfo")
    if not isinstance(metainfo, bytes):
        raise BadRequest("'metainfo' must be the .torrent bytes")
    ih = c.disk.register(metainfo, _path(m, "save_path"))
    t = c.disk.torrent(ih)
    c.subscribe(t.meta.aliases)
    return {"ih": ih, "aliases": list(t.meta.aliases)}


def _op_unregister(c: Connection, rid: int, m: dict[str, Any]) -> Any:
    ih = _ih(m)
    aliases = c.disk.torrent(ih).meta.aliases
    c.disk.unregister(ih, _flag(m, "delete_files", 0))
    c.subscriptions.difference_update([k for k in aliases if k not in c.awaited])
    # Every other connection's too, on the loop (after the events posted before: they
    # are the torrent's last ones): a client that used the torrent got the events of
    # whoever registered it again, without a word from it.
    c.server.post(c.server.forget_keys, aliases)
    return None


# The least time between two recheck_progress events of one recheck (its last one, of
# every piece done, always goes): enough for any progress bar. One per percent woke the
# event loop and the client a hundred times in a fingerprint recheck of a quarter of a
# second, on cores that the hashing wants.
PROGRESS_EVERY = 0.1
# The most time between two of them while pieces are being done, percent changed or
# not: a check of a few terabytes on a slow disk can spend minutes in one percent, and a
# client that hears nothing that long takes the daemon for stopped.
PROGRESS_BEAT = 2.0


class ProgressPace:
    """Which of a check's progress reports become events: see the two figures above."""

    __slots__ = ("at", "pct")

    def __init__(self) -> None:
        self.pct, self.at = -1, float("-inf")  # the last event's percent, and its time

    def due(self, done: int, total: int, now: float) -> bool:
        pct = done * 100 // max(total, 1)
        since = now - self.at
        if ((pct != self.pct and (since >= PROGRESS_EVERY or done == total))
                or since >= PROGRESS_BEAT):
            self.pct, self.at = pct, now
            return True
        return False


def _op_recheck(c: Connection, rid: int, m: dict[str, Any]) -> Any:
    ih, full, join = _ih(m), _flag(m, "full", 0), _flag(m, "join", 0)
    pace = ProgressPace()

    def progress(done: int, total: int) -> None:
        if pace.due(done, total, time.monotonic()):
            frame = encode_event("recheck_progress", {"ih": ih, "id": rid, "done": done, "total": total})
            c._post(c.send, [frame])

    r = c.disk.recheck(ih, progress, full=full, join=join)
    out: dict[str, Any] = {"num_pieces": r.num_pieces, "verified": sum(r.have),
                           "fingerprint_hits": r.fingerprint_hits}
    # The lists of failed pieces, as many as a reply holds: a check of a torrent of a
    # million pieces with nothing on disk yet ran, and was answered TOO_LARGE.
    budget = (c.server.max_frame - 1024) // 2
    for key, failed in (("failed_v1", r.failed_v1), ("failed_v2", r.failed_v2)):
        if failed is None:
            continue
        out[f"{key}_count"] = len(failed)
        shown = _fitting(failed, budget)
        out[key] = failed[:shown]
        if shown < len(failed):
            out["failed_cut"] = 1
    return out


def _fitting(indices: list[int], budget: int) -> int:
    """How many of the first ``indices`` a bencoded list of ``budget`` bytes holds."""
    used = 2  # "l" ... "e"
    for n, i in enumerate(indices):
        used += len(str(i)) + 2  # "i" digits "e"
        if used > budget:
            return n
    return len(indices)


# The fewest bytes a file's entry takes in a status reply:
# d5:indexi0e6:lengthi0e4:path1:x14:verified_bytesi0ee
FILE_ENTRY_BYTES = 53


def _op_status(c: Connection, rid: int, m: dict[str, Any]) -> Any:
    files = _flag(m, "files", 1)
    ih = _ih(m)
    if files:
        listed = c.disk.torrent(ih).meta.files.count_not_pads()
        if listed * FILE_ENTRY_BYTES > c.server.max_frame:
            # Refused before the list is made: a million files' entries took gigabytes
            # on the way to a reply that could never be sent.
            raise TooLarge(f"a list of {listed} files exceeds the frame limit of "
                           f"{c.server.max_frame}: ask with files=0")
    partial = _flag(m, "partial", 0)
    st = c.disk.status(ih, files=files, partial=partial)
    if partial:
        # Cut to the first pieces, as many as half a frame holds (thousands of pieces
        # under way, each in many parts: a client told none of them, that had no room
        # for a new piece, began pieces the daemon refused, for ever).
        held = st["partial"]
        room = c.server.max_frame // 2
        for n, entry in enumerate(held):
            room -= len(wire_bencode(entry))
            if room < 0:
                st["partial"], st["partial_cut"] = held[:n], 1
                break
    return st


def _big_report(c: Connection, op: str, m: dict[str, Any]) -> bool:
    """Whether a request is a report of over REPORT_ENTRIES files or torrents, or a
    register of a metainfo over BIG_METAINFO_BYTES, larger than a frame (it comes in a
    descriptor) or not (run one at a time: each holds megabytes while it runs, a tree of
    Python objects while it is parsed, and a few clients asking at once held gigabytes:
    eight registers of a 7.7 MB v2 metainfo of 100,000 files, sent in their frames, took
    the daemon from 49 MB to 1.1 GB). A request that names no torrent known is not: its
    error says why."""
    if op == "register":
        metainfo = m.get("metainfo")
        return not isinstance(metainfo, bytes) or len(metainfo) > BIG_METAINFO_BYTES
    if op == "list":
        return len(c.disk.torrents()) > REPORT_ENTRIES
    if op != "status" or m.get("files", 1) == 0:
        return False
    ih = m.get("ih")
    try:
        return isinstance(ih, bytes) and len(c.disk.torrent(ih).meta.files) > REPORT_ENTRIES
    except PiecedError:
        return False


def _op_read_piece(c: Connection, rid: int, m: dict[str, Any]) -> Any:
    ih, piece = _ih(m), _int(m, "piece")
    t = c.disk.torrent(ih)
    t.layout.check(piece, 0, 0)
    if t.layout.piece_size(piece) + 64 > c.server.max_frame:
        # Refused before it is read: a whole piece of up to 64 MiB for nothing, each.
        raise TooLarge(f"a reply of piece {piece} ({t.layout.piece_size(piece)} bytes) exceeds "
                       f"the frame limit of {c.server.max_frame}; read the piece in blocks "
                       "with READ (read_chunk)")
    return {"data": c.disk.read_piece(ih, piece)}


# What a RESPONSE frame holds around its result: the frame's header and
# "d6:result" ... "e" (a page of ``list`` is cut to fit in what is left).
RESPONSE_ENVELOPE_BYTES = 64


def _op_list(c: Connection, rid: int, m: dict[str, Any]) -> Any:
    after = m.get("after")
    if after is not None and (not isinstance(after, bytes) or len(after) > 20):
        raise BadRequest("'after' must be an info_hash of at most 20 bytes (b'' for the first page)")
    out: list[dict[str, Any]] = []
    room = c.server.max_frame - RESPONSE_ENVELOPE_BYTES - 2  # (the list's "l" ... "e")
    ihs = c.disk.torrents()  # (sorted)
    for ih in ihs[bisect.bisect_right(ihs, after):] if after is not None else ihs:
        try:
            st = c.disk.status(ih, files=False)
        except UnknownTorrent:
            continue  # removed by another client meanwhile: not listed, not an error
        entry = {k: st[k] for k in ("info_hash", "name", "num_pieces", "verified_pieces",
                                    "total_size", "save_path")} | {"ih": ih}
        if after is not None:
            # A page: as many torrents as its reply holds (the next page starts after
            # the last one); without ``after``, all of them or TOO_LARGE.
            room -= len(wire_bencode(entry))
            if room < 0 and out:
                break
        out.append(entry)
    return out


# What to do instead, said with a reply too large for a frame.
_TOO_LARGE_HINTS = {
    "read_piece": "; read the piece in blocks with READ (read_chunk)",
    "list": "; ask for it in pages, with 'after'",
}


def _op_stats(c: Connection, rid: int, m: dict[str, Any]) -> Any:
    return c.disk.stats() | c.server.stats()


def _op_subscribe(c: Connection, rid: int, m: dict[str, Any]) -> Any:
    ih = _ih(m)
    if ih not in c.awaited and not c.disk.knows(ih):
        # A torrent not registered yet (another client may register it later): kept,
        # but only so many, or a client could grow the daemon's memory without end.
        unknown = sum(1 for k in list(c.awaited) if not c.disk.knows(k))
        if unknown >= MAX_UNKNOWN_SUBSCRIPTIONS:
            raise TooLarge(f"this connection is subscribed to {unknown} keys the daemon does "
                           f"not have, the most it keeps ({MAX_UNKNOWN_SUBSCRIPTIONS})")
        c.awaited.add(ih)
    c.subscribe((ih,))
    return 1


Op = Callable[[Connection, int, dict[str, Any]], Any]
OPS: dict[str, Op] = {
    "register": _op_register,
    "unregister": _op_unregister,
    "list": _op_list,
    "read_piece": _op_read_piece,
    "hash_piece": lambda c, r, m: c.disk.hash_piece(_ih(m), _int(m, "piece"), m.get("expected")),
    "hash_piece_v2": lambda c, r, m: c.disk.hash_piece_v2(_ih(m), _int(m, "piece"), m.get("expected")),
    "hash_block": lambda c, r, m: {"digest": c.disk.hash_block(
        _ih(m), _int(m, "piece"), _int(m, "begin"), _int(m, "length"))},
    "clear_piece": lambda c, r, m: c.disk.clear_piece(_ih(m), _int(m, "piece")),
    "flush_piece": lambda c, r, m: c.disk.flush_piece(_ih(m), _int(m, "piece")),
    "flush_all": lambda c, r, m: c.disk.flush_all(raise_for=list(c.subscriptions)),
    "cached_pieces": lambda c, r, m: c.disk.cached_pieces(_ih(m)),
    "stats": _op_stats,
    "status": _op_status,
    "recheck": _op_recheck,
    "move_storage": lambda c, r, m: c.disk.move_storage(_ih(m), _path(m, "new_path")),
    "rename_file": lambda c, r, m: c.disk.rename_file(_ih(m), _int(m, "index"), _str(m, "new_name")),
    "subscribe": _op_subscribe,
}

__all__ = ["MAX_QUEUED_JOBS", "OPS", "Connection", "Observer", "Server"]
