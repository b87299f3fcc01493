"""The client library torrent-client plugins import.

``Client`` (blocking) and ``AsyncClient`` (asyncio) are thin shells around one
sans-I/O core, :class:`ClientCore`, which builds frames and turns received frames
into completions and events; the daemon parses with the very same FrameReader.

Writes are pipelined: ``write_chunk`` and ``write_block_direct`` return once the
block is sent (the blocking client waits only when ``window`` writes are in
flight). When a write fails, the next call first lets every write in flight
settle, then raises the first error, once; how many more writes of that burst
failed is in its ``others`` attribute, those errors in ``further``, and each says the
write it answered in ``block``. Given ``on_write_error``, each write's error goes
there instead, as its reply comes, never raised by a later call. Every other call
waits for its reply. Events
(``piece_verified``, ``piece_failed``, ``pieces_changed``, ``disk_error``,
``recheck_progress``) go to the
``on_event`` callback as ``(name, fields)``, and are kept in ``events`` otherwise
(the last ``KEPT_EVENTS``; ``events_dropped`` counts those let go).

    from pieced.protocol.client import Client
    with Client("var/pieced.sock") as c:
        ih = c.register(torrent_bytes, save_path="/srv/torrents")
        c.write_chunk(ih, piece, begin, block)
        assert c.hash_piece(ih, piece)
"""

from __future__ import annotations

import array
import collections
import contextlib
import fcntl
import itertools
import mmap
import os
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn

from pieced.storage.errors import BadRequest, PiecedError, ProtocolError, TooLarge

from .frames import (
    DEFAULT_MAX_FRAME,
    FLAG_FLUSH,
    FLAG_VOLATILE,
    LENGTH_AFTER,
    MAX_BLOCK,
    WRITE_EXT,
    Frame,
    FrameReader,
    FrameType,
    RecvRing,
    encode_control,
    encode_read,
    encode_read_ring,
    encode_write_header,
    encode_write_ring,
    info_hash_bytes,
    info_hash_field,
    unencodable,
)
from .messages import check_hello, decode_error, encode_request, from_wire, hello, to_wire

_U32 = 0xFFFFFFFF  # a frame's piece and begin fields

if TYPE_CHECKING:
    # asyncio is imported where AsyncClient needs it: it costs ~60 ms of start-up that
    # every blocking user (the pieced command included) would otherwise pay.
    import asyncio

EventCallback = Callable[[str, dict[str, Any]], None]
WriteErrorCallback = Callable[[PiecedError], None]
#: A frame of the async client waiting to be sent: [views still to send, descriptors to
#: pass with its first byte, the future its sender awaits (None if nobody does)].
_Outgoing = list[Any]
DEFAULT_SOCKET = "var/pieced.sock"
#: Operations whose reply may take minutes, not a sign of a daemon gone (a recheck, or
#: one waiting for another's, of a large torrent; a move's copy to another disk; the
#: sync of a slow one): the blocking client waits for them without its timeout.
UNTIMED_OPS = frozenset({"register", "unregister", "recheck", "move_storage", "rename_file",
                         "flush_all"})
IOV_MAX = 1024  # buffers one sendmsg or writev takes (Linux)
SEND_BYTES = 1 << 20  # the most the async client offers the socket in one sendmsg


# Seconds between two tries of a connect that found the daemon's queue of connections
# full (see _connect).
CONNECT_RETRY = 0.01


def _connect(sock: socket.socket, path: str, timeout: float | None) -> None:
    """Connect, waiting while the daemon's queue of connections (its listen backlog) is
    full: a Unix socket with a timeout (non-blocking underneath) answers EAGAIN then,
    instead of waiting as a TCP one does, and a client failed at once while the daemon
    was busy accepting others."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the daemon at {path} took no new connection in "
                                   f"{timeout} s (its queue of connections stayed full)"
                                   ) from None
            time.sleep(CONNECT_RETRY)


class _Raised(Exception):
    """What ``on_event`` raised while events were handed to it (its exceptions)."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(errors)
        self.errors = errors


def block_view(data: bytes | memoryview) -> memoryview:
    """A block to write, as the bytes it is made of; a view that is not one contiguous
    run of memory (``buf[::2]``) is refused here, before anything is counted, queued or
    put in the ring (its copy failed half-way, and the ring's room or the connection's
    send queue was lost with it). Called by ``ShmRing.put`` for every ring write, and
    by the inline writes."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("a block must be one contiguous buffer (a strided view cannot be "
                         "sent): pass bytes(view)")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class ShmRing:
    """The client's half of the zero-copy transport: a sealed memfd used as a ring.

    Space is handed out in order and freed, possibly out of order, when the daemon
    acknowledges the block; a block may wrap around the end (the daemon writes the
    two slices with one pwritev).
    """

    def __init__(self, size: int) -> None:
        if type(size) is not int or size <= 0:
            raise BadRequest(f"a ring's size must be a positive number of bytes, not {size!r}")
        self.size = size
        self.fd = os.memfd_create("pieced-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        # A client dropped without close() closes its ring's descriptor when collected,
        # as its socket is: ten such clients kept 160 MiB of rings for the process's life.
        self._closer = weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.map = mmap.mmap(self.fd, size)
        self.view = memoryview(self.map)
        self.head = 0
        self.tail = 0
        self._freed: dict[int, int] = {}

    def free_bytes(self) -> int:
        return self.size - (self.head - self.tail)

    def reserve(self, n: int) -> tuple[int, memoryview, memoryview] | None:
        """Claim ``n`` bytes: (ring offset, first slice, second slice) to fill, or None if full.

        A plugin may ``recv_into`` these slices straight from a peer's socket; then the
        block is never copied between the network and the disk.
        """
        if n > self.free_bytes():
            return None
        start = self.head % self.size
        self.head += n
        first = min(n, self.size - start)
        return start, self.view[start : start + first], self.view[0 : n - first]

    def put(self, data: bytes | memoryview) -> tuple[int, tuple[int, int]] | None:
        """Copy a block in; returns (ring offset, release token), or None when full.
        (A plugin puts tens of thousands of blocks a second: a block that does not wrap,
        the usual one, goes in without making any slice.)"""
        src = block_view(data)
        n = src.nbytes
        pos = self.head
        start = pos % self.size
        if start + n <= self.size and n <= self.free_bytes():
            self.map[start : start + n] = src
            self.head = pos + n
            return start, (pos, pos + n)
        got = self.reserve(n)
        if got is None:
            return None
        _, a, b = got
        a[:] = src[: a.nbytes]
        b[:] = src[a.nbytes :]
        return start, (pos, pos + n)

    def reserve_contiguous(self, n: int) -> tuple[int, memoryview, tuple[int, int]] | None:
        """Claim ``n`` bytes in one run, for the daemon to read into (READ_RING): (ring
        offset, the view, release token), or None while the ring has no room. When the
        run would wrap, the end of the ring is skipped (and counted free at once)."""
        size = self.size
        if not 0 < n <= size:
            raise ValueError(f"a read of {n} bytes does not fit a ring of {size}")
        if self.head == self.tail and self.head % size:  # empty: start over at its start
            self.head = self.tail = self.head + size - self.head % size
        pos = self.head
        start = pos % size
        skip = size - start if start + n > size else 0
        if skip + n > self.free_bytes():
            return None
        if skip:
            self.head = pos + skip
            self.release((pos, pos + skip))
            pos += skip
            start = 0
        self.head = pos + n
        return start, self.view[start : start + n], (pos, pos + n)

    def release(self, token: tuple[int, int]) -> None:
        self._freed[token[0]] = token[1]
        while self.tail in self._freed:
            self.tail = self._freed.pop(self.tail)

    def close(self) -> None:
        self.view.release()
        # A view of it still held somewhere (a chunk not released) keeps the mapping
        # alive until it goes; the descriptor is closed either way.
        with contextlib.suppress(BufferError):
            self.map.close()
        self._closer()  # (the descriptor, once)


class RingChunk:
    """Bytes the daemon read into the shared ring (``read_chunk_ring``): ``data`` is a
    view of the ring, valid until :meth:`release` (or the end of a ``with`` block) gives
    the space back. Views sliced from ``data`` must not be used after that either: the
    space is written again by the next block or read that takes it."""

    __slots__ = ("_on_release", "_ring", "_token", "data")

    def __init__(self, data: memoryview, ring: ShmRing, token: tuple[int, int],
                 on_release: Callable[[], None] | None = None) -> None:
        self.data = data
        self._ring = ring
        self._token: tuple[int, int] | None = token
        self._on_release = on_release

    def release(self) -> None:
        if self._token is None:
            return
        token, self._token = self._token, None
        self.data.release()
        self._ring.release(token)
        if self._on_release is not None:
            self._on_release()

    def __enter__(self) -> RingChunk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Waiter:
    """One reply awaited (a slotted class: one is made per request)."""

    __slots__ = ("block", "done", "error", "into", "kind", "notify", "orphan", "result", "token")

    def __init__(self, kind: str, notify: Callable[[], None] | None = None) -> None:
        self.kind = kind  # "request", "write", "read"
        self.result: Any = None
        self.error: PiecedError | None = None
        self.done = False
        self.token: tuple[int, int] | None = None
        self.notify = notify  # called once done (AsyncClient wakes its task)
        self.into: memoryview | None = None  # a read's bytes go here, not to a new bytes
        self.orphan = False  # nobody waits any more (cancelled): free its ring space on reply
        self.block: tuple[bytes, int, int, int] | None = None  # a write's (ih, piece, begin, n)

    def took(self) -> bool:
        """Answered, and not with an error: the daemon did what was asked (an
        error raised after it was another request's, a write's)."""
        return self.done and self.error is None


def _ring_capacity(max_frame: int) -> int:
    return max(2 * max_frame, 4 * 1024 * 1024)


#: Events kept in ``events`` (about half a KiB each) when there is no ``on_event``.
KEPT_EVENTS = 65536


class ClientCore:
    """Sans-I/O client state: ids, frames to send, replies received.

    ``max_frame`` is the frame limit until the daemon's HELLO says otherwise: from
    then on the daemon's ``max_frame`` bounds frames in both directions.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.ring = RecvRing(_ring_capacity(max_frame))
        self.reader = FrameReader(self.ring, max_frame)
        self._ids = itertools.count(1)
        self.waiters: dict[int, _Waiter] = {}
        self.write_errors: collections.deque[PiecedError] = collections.deque()
        # A client that only polls (``status`` subscribes it) and never looks at its
        # events must not keep every one of them: the newest KEPT_EVENTS are.
        self.events: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(
            maxlen=KEPT_EVENTS)
        self.events_dropped = 0
        self.on_event: EventCallback | None = None
        # Given, each write's error is handed to it as it comes (its ``block`` says which
        # write), in order with the events, and never raised by a later call: a client
        # that writes from many places and can act on each refused block (a plugin asking
        # a peer for it again) does not have it raised by whichever call comes next.
        self.on_write_error: WriteErrorCallback | None = None
        # Events (and write errors) that came while a handler ran (a handler that calls
        # the client receives them), handed over once it returns: nested, one handler
        # inside the other for as long as a burst of events was, they overflowed the stack.
        self._deferred: collections.deque[tuple[str, dict[str, Any]] | PiecedError] | None = None
        self.shm: ShmRing | None = None
        self.server_hello: dict[str, Any] | None = None
        self.hello_waiter = _Waiter("hello")
        self.writes_in_flight = 0
        self.writes_done = 0  # grows with every write reply: what write-window waiters watch
        self.max_block = MAX_BLOCK  # the largest write the daemon takes (its HELLO says)
        self.heard_at = time.monotonic()  # when bytes last came from the daemon

    def hello(self) -> bytes:
        self.hello_waiter = self.waiters[0] = _Waiter("hello")
        return encode_control(FrameType.HELLO, 0, to_wire(hello("client", "pieced.protocol.client")))

    @property
    def max_frame(self) -> int:
        return self.reader.max_frame

    def unanswered_for(self, now: float) -> float:
        """Seconds the daemon has sent nothing while requests wait for its answer (0
        when none waits)."""
        return now - self.heard_at if self.waiters else 0.0

    @property
    def conn(self) -> int | None:
        """This connection's number, as the daemon gave it in its HELLO: the one piece
        events name among their ``writers`` when this connection wrote into the piece."""
        conn = (self.server_hello or {}).get("conn")
        return conn if isinstance(conn, int) else None

    def _check_size(self, length: int, what: str) -> None:
        """Refuse, before sending, a frame the daemon would hang up on (its ``length`` field)."""
        if length > self.max_frame:
            raise TooLarge(f"{what} of {length} bytes exceeds the frame limit of {self.max_frame}")

    def request(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        rid = next(self._ids)
        frame = encode_request(rid, op, args)
        self._check_size(len(frame) - 4, f"{op} request")
        self.waiters[rid] = _Waiter("request")
        return rid, frame

    def register(self, metainfo: bytes, save_path: str) -> tuple[int, bytes, int | None]:
        """A register request: the metainfo inline when the frame holds it, else in a
        memfd passed with SCM_RIGHTS (a million-piece torrent is 20 MB). Returns (id,
        frame, descriptor to pass and then close, or None)."""
        if len(metainfo) + len(save_path) + 256 <= self.max_frame:
            rid, frame = self.request("register", {"metainfo": metainfo,
                                                   "save_path": save_path})
            return rid, frame, None
        fd = os.memfd_create("pieced-metainfo", os.MFD_CLOEXEC)
        try:
            view, done = memoryview(metainfo), 0
            while done < len(metainfo):
                done += os.write(fd, view[done:])
            rid, frame = self.request("register", {"metainfo_size": len(metainfo),
                                                   "save_path": save_path})
        except BaseException:
            os.close(fd)
            raise
        return rid, frame, fd

    def write(self, ih: bytes, piece: int, begin: int, length: int, flush: bool) -> tuple[int, bytes]:
        self._check_size(LENGTH_AFTER + WRITE_EXT.size + length, "WRITE frame")
        rid = next(self._ids)
        # Encoded first: a field that does not fit raises here, and no waiter is left
        # behind for a write never sent (wait_writes would wait for it for ever).
        header = encode_write_header(rid, ih, piece, begin, length, FLAG_FLUSH if flush else 0)
        self.waiters[rid] = w = _Waiter("write")
        w.block = (ih, piece, begin, length)
        self.writes_in_flight += 1
        return rid, header

    def write_ring(
        self, ih: bytes, piece: int, begin: int, offset: int, length: int,
        token: tuple[int, int], flush: bool,
    ) -> tuple[int, bytes]:
        rid = next(self._ids)
        try:
            frame = encode_write_ring(rid, ih, piece, begin, offset, length,
                                      FLAG_FLUSH if flush else 0)
        except PiecedError:
            if self.shm is not None:
                self.shm.release(token)  # the block placed for it goes back
            raise
        self.waiters[rid] = w = _Waiter("write")
        w.token = token
        w.block = (ih, piece, begin, length)
        self.writes_in_flight += 1
        return rid, frame

    def ring_put(self, data: bytes | memoryview) -> tuple[int, tuple[int, int]] | None:
        """Copy a block into the attached ring: (offset, release token), or None while
        the ring has no room for it yet (replies to writes in flight, and chunks read
        into it once released, free some)."""
        shm = self.shm
        assert shm is not None
        n = memoryview(data).nbytes
        if n > shm.size:
            raise ValueError(f"block of {n} bytes is larger than the ring ({shm.size})")
        return shm.put(data)

    def read(self, ih: bytes, piece: int, begin: int, length: int, volatile: bool,
             into: memoryview | None = None) -> tuple[int, bytes]:
        """A READ; its bytes are copied into ``into`` (which must hold ``length`` bytes)
        if given, else returned as a new bytes."""
        if into is not None:
            if into.readonly:
                raise ValueError("a read needs a writable buffer")
            if into.nbytes < length:
                raise ValueError(f"a buffer of {into.nbytes} bytes cannot take a read of {length}")
            if into.format != "B" or into.ndim != 1:
                into = into.cast("B")  # copied into bytewise (C-contiguous, or this raises)
        rid = next(self._ids)
        frame = encode_read(rid, ih, piece, begin, length, FLAG_VOLATILE if volatile else 0)
        self.waiters[rid] = w = _Waiter("read")
        w.into = into
        return rid, frame

    def read_ring(self, ih: bytes, piece: int, begin: int, length: int,
                  volatile: bool) -> tuple[int, bytes] | None:
        """A READ_RING into space claimed in the attached ring, or None while the ring has
        no room for it. Once answered, the waiter's ``result`` is (the view of the bytes,
        the token of the space to release); after an error the space is freed here."""
        shm = self.shm
        assert shm is not None
        placed = shm.reserve_contiguous(length)
        if placed is None:
            return None
        offset, view, token = placed
        rid = next(self._ids)
        try:
            frame = encode_read_ring(rid, ih, piece, begin, offset, length,
                                     FLAG_VOLATILE if volatile else 0)
        except PiecedError:
            view.release()
            shm.release(token)
            raise
        self.waiters[rid] = w = _Waiter("read_ring")
        w.token = token
        w.into = view
        return rid, frame

    def unsent(self, rid: int) -> None:
        """The frame of request ``rid`` never left (a timeout or a signal before its first
        byte): no reply is to come. Its waiter goes, a write is no longer in flight and
        the ring space it held is free (left, every later ``wait_writes`` waited for its
        reply, until its timeout or for ever)."""
        w = self.waiters.pop(rid, None)
        if w is None:
            return
        if w.kind == "write":
            self.writes_in_flight -= 1
        if w.kind == "read_ring" and w.into is not None:  # (a READ's is the caller's)
            w.into.release()
        if w.token is not None and self.shm is not None:
            self.shm.release(w.token)

    def drop_read_ring(self, w: _Waiter) -> None:
        """The caller of a READ_RING gives up on it (cancelled, or another error raised in
        its stead): its ring space is freed now if the reply came, else when it comes
        (the daemon may still be writing there)."""
        if not w.done:
            w.orphan = True
        elif isinstance(w.result, tuple) and self.shm is not None:
            view, token = w.result
            w.result = None
            view.release()
            self.shm.release(token)

    def received(self, n: int) -> None:
        """``n`` bytes were received into ``ring.writable()``: process whole frames.

        An exception of ``on_event`` is raised once every frame received is processed:
        raised at once, it left the replies that came in the same read unparsed, and the
        caller waited for them on the socket, until its timeout."""
        self.ring.wrote(n)
        self.heard_at = time.monotonic()
        raised: list[BaseException] = []
        while True:
            frame = self.reader.next_frame()
            if frame is None:
                break
            try:
                self._handle(frame)
            except _Raised as exc:  # (the plugin's callback)
                raised += exc.errors
        if raised:
            if len(raised) > 1:
                raised[0].add_note(f"on_event raised {len(raised) - 1} more time(s) in the "
                                   "same read; the first is raised")
            raise raised[0]

    def _deliver(self, item: tuple[str, dict[str, Any]] | PiecedError) -> None:
        """Hand an event to ``on_event`` (a write's error to ``on_write_error``), and those
        that come meanwhile after it, in order; _Raised with what the handlers raised."""
        if self._deferred is not None:
            self._deferred.append(item)
            return
        self._deferred = collections.deque([item])
        errors: list[BaseException] = []
        try:
            while self._deferred:
                got = self._deferred.popleft()
                try:
                    if isinstance(got, PiecedError):
                        assert self.on_write_error is not None
                        self.on_write_error(got)
                    else:
                        assert self.on_event is not None
                        self.on_event(*got)
                except Exception as exc:
                    errors.append(exc)
        finally:
            self._deferred = None
        if errors:
            raise _Raised(errors)

    def _handle(self, f: Frame) -> None:
        if f.type == FrameType.EVENT:
            msg = from_wire(f.body)
            name = str(msg.pop("event", ""))
            if self.on_event is not None:
                self._deliver((name, msg))
            else:
                if len(self.events) == self.events.maxlen:
                    self.events_dropped += 1
                self.events.append((name, msg))
            return
        if f.type == FrameType.ERROR and f.id == 0 and 0 not in self.waiters:
            raise decode_error(f.body)  # the daemon is hanging up on us: say why
        w = self.waiters.pop(f.id, None)
        if w is None:
            if f.token is not None:
                self.ring.release(f.token)
            raise ProtocolError(f"reply to unknown request id {f.id}")
        w.done = True
        if f.type == FrameType.ERROR:
            w.error = decode_error(f.body)
        elif f.type == FrameType.HELLO:
            self.server_hello = check_hello(f.body, "server")
            max_frame = self.server_hello.get("max_frame")
            if isinstance(max_frame, int) and max_frame >= LENGTH_AFTER:
                self._adopt_max_frame(max_frame)
            max_block = self.server_hello.get("max_block")
            if isinstance(max_block, int) and max_block > 0:
                self.max_block = max_block
        elif f.type == FrameType.RESPONSE:
            w.result = from_wire(f.body).get("result")
        elif f.type == FrameType.DATA:
            if w.into is None:
                w.result = b"".join(f.payload)
            else:
                n = sum(v.nbytes for v in f.payload)
                if n > w.into.nbytes:
                    w.error = ProtocolError(f"the daemon sent {n} bytes for a read of "
                                            f"{w.into.nbytes}")
                else:
                    at = 0
                    for v in f.payload:
                        w.into[at : at + v.nbytes] = v
                        at += v.nbytes
                    w.result = n
            assert f.token is not None
            self.ring.release(f.token)
        elif f.type != FrameType.ACK:
            raise ProtocolError(f"a daemon does not send {f.type.name} frames")
        if w.kind == "read_ring":
            assert w.token is not None and w.into is not None
            if w.error is None and not w.orphan:
                w.result = (w.into, w.token)  # the caller releases them
            elif self.shm is not None:
                w.into.release()
                self.shm.release(w.token)
        refused = None
        if w.kind == "write":
            self.writes_in_flight -= 1
            self.writes_done += 1
            if w.token is not None and self.shm is not None:
                self.shm.release(w.token)
            if w.error is not None:
                w.error.block = w.block
                if self.on_write_error is not None:
                    refused = w.error
                else:
                    self.write_errors.append(w.error)
        if w.notify is not None:
            w.notify()
        if refused is not None:
            self._deliver(refused)

    def _adopt_max_frame(self, max_frame: int) -> None:
        """Take the daemon's frame limit; grow the receive ring if it cannot hold such a
        frame (nothing is held in it at handshake time but unparsed bytes, moved over)."""
        self.reader.max_frame = max_frame
        if self.ring.capacity < max_frame + 4:
            rest = self.ring.peek(self.ring.unparsed)
            self.ring = RecvRing(_ring_capacity(max_frame))
            self.ring.writable()[: len(rest)] = rest
            self.ring.wrote(len(rest))
            self.reader = FrameReader(self.ring, max_frame)

    def hello_done(self) -> None:
        """Raise the daemon's refusal of the handshake (AccessDenied, a version mismatch)."""
        if self.hello_waiter.error is not None:
            raise self.hello_waiter.error

    def take_write_error(self) -> PiecedError | None:
        """The first pending write error, with the count of the others (``err.others``)
        and the others (``err.further``; each with the ``block`` it was the answer to);
        call only once no write is in flight, so one burst is reported exactly once."""
        if not self.write_errors:
            return None
        first = self.write_errors.popleft()
        first.others = len(self.write_errors)
        first.further = list(self.write_errors)
        self.write_errors.clear()
        return first


def _close_all(fds: list[int] | None) -> None:
    for fd in fds or ():
        with contextlib.suppress(OSError):
            os.close(fd)


def _rights(fds: list[int] | None) -> list[tuple[int, int, bytes]]:
    """Ancillary data passing descriptors with SCM_RIGHTS."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


_hexless = info_hash_bytes  # (control requests: the daemon checks the length)


def _status_args(ih: bytes | str, files: bool, partial: bool) -> dict[str, Any]:
    """A status request's arguments (``partial`` sent only when asked for)."""
    args: dict[str, Any] = {"ih": _hexless(ih), "files": int(files)}
    if partial:
        args["partial"] = 1
    return args


class Client:
    """Blocking client. Not thread-safe: one per thread, or guard it with a lock.

    ``timeout``: the seconds a reply may take (TimeoutError past them), but for the
    operations of UNTIMED_OPS, which wait as long as they take."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_SOCKET,
        *,
        timeout: float | None = 60.0,
        on_event: EventCallback | None = None,
        window: int = 256,
        on_write_error: WriteErrorCallback | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.window = window
        self.core = ClientCore()
        self.core.on_event = on_event
        self.core.on_write_error = on_write_error
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            _connect(self.sock, self.path, timeout)
            # Refused at once (AccessDenied...): the reason is waiting to be read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._send(self.core.hello())
            self._wait(0)
            self.core.hello_done()
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            self.close()
        else:  # (an exception leaves the block: it is the one raised, not a write's)
            with contextlib.suppress(PiecedError, OSError):
                self.close()

    def close(self) -> None:
        try:
            if self.sock.fileno() >= 0 and self.core.writes_in_flight and not self._broken():
                self.wait_writes()
        finally:
            self.sock.close()
            if self.core.shm is not None:  # (also after a send cut short closed the socket)
                self.core.shm.close()
                self.core.shm = None

    def _broken(self) -> bool:
        return self.sock.fileno() < 0

    @property
    def events(self) -> collections.deque[tuple[str, dict[str, Any]]]:
        return self.core.events

    # -- I/O ------------------------------------------------------------------------------
    def _send(self, *parts: bytes | memoryview, fds: list[int] | None = None,
              rid: int | None = None) -> None:
        """Send one frame, whole; ``rid``: the request it carries, forgotten if not a
        byte of the frame left (see ``ClientCore.unsent``)."""
        if self._broken():
            if rid is not None:
                self.core.unsent(rid)
            raise ConnectionError("the connection to the daemon is closed")
        anc = _rights(fds)
        views = [memoryview(p) for p in parts]
        first = True
        while views:
            try:
                n = self.sock.sendmsg(views, anc if first else [])
            except BaseException as exc:
                if not first:
                    # Part of the frame is out (a timeout, a signal): the daemon would
                    # read whatever comes next as the rest of it. The connection is
                    # closed instead, and every later call says so at once.
                    self.sock.close()
                elif rid is not None:
                    self.core.unsent(rid)
                if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                    raise type(exc)(exc.errno, f"the daemon closed the connection "
                                    f"({exc.strerror}): it stopped, or dropped this client "
                                    "(its log says why)") from None
                raise
            first = False
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def _pump(self) -> None:
        if self._broken():
            raise ConnectionError("the connection to the daemon is closed")
        buf = self.core.ring.writable()
        n = self.sock.recv_into(buf)
        if n == 0:
            raise ConnectionError("the daemon closed the connection")
        self.core.received(n)

    def _wait(self, rid: int) -> None:
        while rid in self.core.waiters:
            self._pump()

    def _roundtrip(self, rid: int, frame: bytes, fds: list[int] | None = None) -> Any:
        """Send one request frame and wait for its reply; raise its error, if any.

        A write's error already received is raised first, and the request is not sent.
        One that arrives while the request is answered is kept for the next call: the
        daemon carried the request out, and its answer (a register's info_hash, an
        unregister done) is the caller's. (Raised instead of the answer, a register
        after a bad block left the torrent registered and its info_hash unknown.)"""
        if self.core.write_errors:
            try:
                self._raise_write_error()
            except BaseException:
                self.core.unsent(rid)  # (and the ring space a READ_RING claimed, free)
                raise
        waiter = self.core.waiters[rid]
        self._send(frame, fds=fds, rid=rid)
        while not waiter.done:
            self._pump()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    def _call(self, op: str, **args: Any) -> Any:
        if op not in UNTIMED_OPS:
            return self._roundtrip(*self.core.request(op, args))
        with self._untimed():
            return self._roundtrip(*self.core.request(op, args))

    @contextlib.contextmanager
    def _untimed(self) -> Iterator[None]:
        """Wait for a reply as long as it takes (see UNTIMED_OPS)."""
        self.sock.settimeout(None)
        try:
            yield
        finally:
            if not self._broken():
                self.sock.settimeout(self.timeout)

    def _raise_write_error(self) -> None:
        if self.core.write_errors:
            while self.core.writes_in_flight:
                self._pump()
            err = self.core.take_write_error()
            if err is not None:
                raise err

    def _throttle(self) -> None:
        while self.core.writes_in_flight >= self.window:
            self._pump()

    def wait_writes(self) -> None:
        """Wait until every write sent so far is acknowledged; raise the first error."""
        while self.core.writes_in_flight:
            self._pump()
        self._raise_write_error()

    # -- operations ---------------------------------------------------------------------------
    def register(self, metainfo: bytes, save_path: str | os.PathLike[str]) -> bytes:
        rid, frame, fd = self.core.register(metainfo, os.fspath(save_path))
        try:
            with self._untimed():
                res = self._roundtrip(rid, frame, fds=[fd] if fd is not None else None)
        finally:
            if fd is not None:
                os.close(fd)
        return bytes(res["ih"])

    def unregister(self, ih: bytes, delete_files: bool = False) -> None:
        self._call("unregister", ih=_hexless(ih), delete_files=delete_files)

    def torrents(self) -> list[dict[str, Any]]:
        """Every torrent registered (``list``); a library whose list is larger than a
        reply is fetched in pages."""
        try:
            return list(self._call("list") or [])
        except TooLarge:
            pass
        out: list[dict[str, Any]] = []
        while page := self._call("list", after=out[-1]["ih"] if out else b""):
            out += page
        return out

    def write_chunk(self, ih: bytes, piece: int, begin: int, data: bytes | memoryview,
                    flush: bool = False) -> None:
        """Send a block inline (the bytes follow the header in the stream)."""
        data = block_view(data)
        self._raise_write_error()
        self._throttle()
        rid, header = self.core.write(ih, piece, begin, data.nbytes, flush)
        self._send(header, data, rid=rid)

    def attach_ring(self, size: int = 16 * 1024 * 1024) -> None:
        """Create a shared-memory ring and hand it to the daemon (SCM_RIGHTS)."""
        if self.core.shm is not None:
            raise ProtocolError("a ring is already attached")
        shm = ShmRing(size)
        rid, frame = self.core.request("attach_ring", {"size": size})
        waiter = self.core.waiters[rid]
        try:
            self._roundtrip(rid, frame, fds=[shm.fd])
        except BaseException:
            if not waiter.took() and not self._attach_pending(rid, shm):
                shm.close()
                raise
            self.core.shm = shm  # (what was raised is an earlier write's error, or a timeout)
            raise
        self.core.shm = shm

    def _attach_pending(self, rid: int, shm: ShmRing) -> bool:
        """An attach_ring sent whose reply did not come in time: the ring is taken as
        attached (the daemon reads the frames in order: it attaches it before any later
        one), and let go if the reply, when it comes, is a refusal. (Closed here at the
        timeout, while the daemon kept it, it made every later ring call of the
        connection fail: "a ring is already attached".)"""
        waiter = self.core.waiters.get(rid)
        if waiter is None or waiter.done or self._broken():
            return False  # (never sent, or answered with its refusal, or the stream cut)

        def settled() -> None:
            if waiter.error is not None and self.core.shm is shm:
                self.core.shm = None
                shm.close()

        waiter.notify = settled
        return True

    def write_block_direct(self, ih: bytes, piece: int, begin: int, data: bytes | memoryview,
                           flush: bool = False) -> None:
        """Send a block through the shared ring: only (offset, length) crosses the socket."""
        if self.core.shm is None:
            self.attach_ring()
        self._raise_write_error()
        self._throttle()
        placed = self.core.ring_put(data)
        while placed is None:
            if not self.core.writes_in_flight:  # (what holds it is the caller's)
                raise ProtocolError("the ring is full and no write is in flight: release "
                                    "the chunks read into it before writing through it")
            self._pump()
            placed = self.core.ring_put(data)
        offset, token = placed
        n = memoryview(data).nbytes
        rid, frame = self.core.write_ring(ih, piece, begin, offset, n, token, flush)
        self._send(frame, rid=rid)

    def read_chunk(self, ih: bytes, piece: int, begin: int, length: int, volatile: bool = False) -> bytes:
        return bytes(self._roundtrip(*self.core.read(_hexless(ih), piece, begin, length, volatile)))

    def read_chunk_ring(self, ih: bytes, piece: int, begin: int, length: int,
                        volatile: bool = False) -> RingChunk:
        """:meth:`read_chunk` into the shared ring (attached first if need be): the daemon
        puts the bytes there and only a header crosses the socket each way. Release the
        chunk once done with its bytes (``with client.read_chunk_ring(...) as chunk:``):
        until then its space in the ring is taken."""
        if self.core.shm is None:
            self.attach_ring()
        got = self.core.read_ring(_hexless(ih), piece, begin, length, volatile)
        while got is None:
            if not self.core.writes_in_flight:
                raise ProtocolError("the ring is full of chunks not yet released")
            self._pump()  # replies to writes free ring space
            got = self.core.read_ring(_hexless(ih), piece, begin, length, volatile)
        rid, frame = got
        shm = self.core.shm
        assert shm is not None
        waiter = self.core.waiters[rid]
        try:
            view, token = self._roundtrip(rid, frame)
        except BaseException:
            self.core.drop_read_ring(waiter)  # its error, or a write's raised first
            raise
        return RingChunk(view, shm, token)

    def read_chunk_into(self, ih: bytes, piece: int, begin: int, out: memoryview,
                        volatile: bool = False) -> int:
        """:meth:`read_chunk` of ``out.nbytes`` bytes into ``out``, how many it got: for
        a caller that reads again and again into buffers of its own (a seeder), no new
        bytes each time. ``out`` is the reply's until the call returns; after a call that
        did not return (cancelled, the connection lost) the reply may still land in it."""
        return int(self._roundtrip(*self.core.read(_hexless(ih), piece, begin, out.nbytes,
                                                   volatile, out)))

    def read_piece(self, ih: bytes, piece: int) -> bytes:
        return bytes(self._call("read_piece", ih=_hexless(ih), piece=piece)["data"])

    def hash_piece(self, ih: bytes, piece: int, expected: bytes | None = None) -> bool:
        return bool(self._call("hash_piece", ih=_hexless(ih), piece=piece, expected=expected))

    def hash_piece_v2(self, ih: bytes, piece: int, expected: bytes | None = None) -> bool:
        return bool(self._call("hash_piece_v2", ih=_hexless(ih), piece=piece, expected=expected))

    def hash_block(self, ih: bytes, piece: int, begin: int, length: int) -> bytes:
        res = self._call("hash_block", ih=_hexless(ih), piece=piece, begin=begin, length=length)
        return bytes(res["digest"])

    def clear_piece(self, ih: bytes, piece: int) -> None:
        self._call("clear_piece", ih=_hexless(ih), piece=piece)

    def flush_piece(self, ih: bytes, piece: int) -> None:
        self._call("flush_piece", ih=_hexless(ih), piece=piece)

    def flush_all(self) -> None:
        self._call("flush_all")

    def cached_pieces(self, ih: bytes) -> list[int]:
        return list(self._call("cached_pieces", ih=_hexless(ih)) or [])

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats"))

    def status(self, ih: bytes, files: bool = True, partial: bool = False) -> dict[str, Any]:
        """The torrent's state; ``files=False`` leaves out the per-file progress (one
        entry per file: for a torrent of 100,000 files most of the reply); ``partial``
        adds the byte ranges the daemon holds of each piece under way."""
        return dict(self._call("status", **_status_args(ih, files, partial)))

    def recheck(self, ih: bytes, full: bool = False, join: bool = False) -> dict[str, Any]:
        """Verify everything on disk; progress arrives as ``recheck_progress`` events.

        Pieces are checked against their BLAKE3 fingerprints where they have one;
        ``full`` uses the torrent's own hashes for every piece. ``join``: a check of
        its kind under way (another client's) is joined, not run again after it."""
        return dict(self._call("recheck", ih=_hexless(ih), full=int(full), join=int(join)))

    def move_storage(self, ih: bytes, new_path: str | os.PathLike[str]) -> None:
        self._call("move_storage", ih=_hexless(ih), new_path=os.fspath(new_path))

    def rename_file(self, ih: bytes, index: int, new_name: str) -> None:
        self._call("rename_file", ih=_hexless(ih), index=index, new_name=new_name)

    def subscribe(self, ih: bytes) -> None:
        self._call("subscribe", ih=_hexless(ih))


class AsyncClient:
    """asyncio client: the same operations, awaited; writes may be issued concurrently."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_SOCKET, *,
                 on_event: EventCallback | None = None, window: int = 256,
                 on_write_error: WriteErrorCallback | None = None) -> None:
        import asyncio

        self.path = os.fspath(path)
        self.window = window
        self.core = ClientCore()
        self.core.on_event = on_event
        self.core.on_write_error = on_write_error
        self.sock: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._attach_lock = asyncio.Lock()
        self._attaching: asyncio.Future[None] | None = None  # an attach_ring in flight
        self._wake = asyncio.Event()
        self._failure: BaseException | None = None
        self._out: list[bytes] = []  # small frames queued this turn of the loop
        # Ring blocks put back to back this turn, for one piece, not yet framed:
        # [ih, piece, begin, ring offset, length, token start, token end].
        self._run: list[Any] | None = None
        self._flush_scheduled = False
        # Frames waiting for room in the socket, in order: [views left, fds, sender's future].
        self._pending: collections.deque[_Outgoing] = collections.deque()
        self._watching = False  # the loop calls _write_pending when the socket has room
        self._send_failed: BaseException | None = None  # what the last attempt to send met

    async def connect(self) -> AsyncClient:
        import asyncio

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            while True:  # (see _connect: a full queue of connections is waited out)
                try:
                    sock.connect(self.path)
                    break
                except BlockingIOError:
                    await asyncio.sleep(CONNECT_RETRY)
            self.sock = sock
            self._reader = asyncio.create_task(self._read_loop())
            hello = self.core.hello()
            woken = self._arm(self.core.hello_waiter)
            # Sent here, not through the queue: a daemon that refused us (AccessDenied)
            # may have closed already, and the queue's failed send would end the
            # connection with EPIPE before the reader got to the reason, waiting unread.
            try:
                sent = sock.send(hello)
            except (BrokenPipeError, ConnectionResetError):
                sent = len(hello)  # (refused: the reason is read next)
            except BlockingIOError:
                sent = 0
            if sent < len(hello):
                await self._send(memoryview(hello)[sent:])
            await self._sleep(self.core.hello_waiter, woken)
            self.core.hello_done()
        except BaseException:
            # Cancelled (a connect timeout) or refused: the connection goes now. Left open,
            # its reader task kept it alive, and a plugin retrying its connects filled
            # the daemon's max_clients with connections nobody used.
            self._shut(ConnectionError("the connection to the daemon was not completed"))
            sock.close()
            raise
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            await self.close()
        else:  # (an exception leaves the block: it is the one raised, not a write's)
            with contextlib.suppress(PiecedError, OSError):
                await self.close()

    async def close(self) -> None:
        self._end_run()
        try:
            if self.sock is not None and self._failure is None and self.core.writes_in_flight:
                await self.wait_writes()
        finally:
            self._shut(ConnectionError("the client is closed"))

    def _shut(self, why: BaseException) -> None:
        """End the connection: every call waiting for a reply, and every call made after,
        raises (the first failure, or ``why``), the socket and the ring are let go."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._fail(why)
        self._out.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.core.shm is not None:
            self.core.shm.close()
            self.core.shm = None

    @property
    def events(self) -> collections.deque[tuple[str, dict[str, Any]]]:
        return self.core.events

    @property
    def failure(self) -> BaseException | None:
        """Why the connection to the daemon is lost (after :meth:`close`, a
        ``ConnectionError`` saying so), or None while it is up."""
        return self._failure

    async def _read_loop(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        assert self.sock is not None
        core = self.core
        try:
            while True:
                n = await loop.sock_recv_into(self.sock, core.ring.writable())
                if n == 0:
                    raise ConnectionError("the daemon closed the connection")
                done = core.writes_done
                tail = core.shm.tail if core.shm is not None else 0
                core.received(n)  # wakes the task of each request answered
                if core.writes_done != done or (core.shm is not None and core.shm.tail != tail):
                    self._wake.set()  # writers (and reads) waiting for room in the window or ring
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """The connection is lost: every waiting task wakes and raises ``exc``."""
        if self._failure is None:
            self._failure = exc
        self._drop_pending(exc)
        self._wake.set()
        for w in list(self.core.waiters.values()):
            if w.notify is not None:
                w.notify()

    def _raise_failure(self) -> NoReturn:
        """Raise the failure that broke the connection. Every waiting task raises the one
        object: each raise starts its traceback afresh (else each adds the frames of all
        the raises before it, and a thousand reads in flight print a book)."""
        assert self._failure is not None
        raise self._failure.with_traceback(None)

    async def _until(self, cond: Callable[[], bool]) -> None:
        """Wait for ``cond``; raise the failure if the connection is lost (or closed)
        first, or meanwhile, whatever ``cond`` says then: a write waiting for the window
        while ``close`` drained it found the window open, and was sent to no socket (its
        reply awaited for ever, or the ring gone under it)."""
        while True:
            if self._failure is not None:
                self._raise_failure()
            if cond():
                return
            self._wake.clear()
            await self._wake.wait()

    # -- sending: frames in order, whole, without a task per frame -------------------------
    async def _send(self, *parts: bytes | memoryview, fds: list[int] | None = None) -> None:
        """Send one frame, after every frame sent before it, and return once it is out.

        A frame goes out whole even when its caller is cancelled: a frame cut short would
        make the daemon misread every frame after it, and a write whose frame never left
        would be awaited for ever (its reply counted on). While nothing waits to be sent,
        the frame goes to the socket at once; what the socket does not take waits in a
        queue that the event loop sends from as the socket has room. A caller cancelled
        while its frame waits there is let go at once: what is left of the frame is
        copied first, so that the caller may use its buffer again.
        """
        import asyncio

        if self._failure is not None:  # (closed, or lost: no socket to send it on)
            self._raise_failure()
        self._end_run()
        self._queue_posted()
        # The queue's own copies of the descriptors, closed once passed: the caller's may
        # be closed before the frame leaves (its task cancelled meanwhile), and the number
        # then name another of the program's files, or none.
        entry: _Outgoing = [[memoryview(p) for p in parts],
                            [os.dup(fd) for fd in fds] if fds else None, None]
        self._pending.append(entry)
        self._write_pending()
        if not self._pending or self._pending[-1] is not entry:  # no longer queued
            if self._send_failed is not None:
                raise self._send_failed
            return  # out at once: the usual case
        fut = entry[2] = asyncio.get_running_loop().create_future()
        try:
            await fut
        except asyncio.CancelledError:
            if entry[0]:  # not all out yet: the caller's buffer is theirs again
                entry[0][:] = [memoryview(b"".join(entry[0]))]
            raise

    def _queue_posted(self) -> None:
        """The small frames posted this turn join the queue, before what comes next."""
        if self._out:
            self._pending.append([[memoryview(f) for f in self._out], None, None])
            self._out.clear()

    def _write_pending(self) -> None:
        """Send queued frames while the socket takes them; when it is full, have the
        event loop call again once it has room."""
        q, sock = self._pending, self.sock
        self._send_failed = None
        while q and sock is not None:
            views: list[memoryview] = []
            anc: list[tuple[int, int, bytes]] = []
            size = 0
            for i, (vs, fds, _) in enumerate(q):
                if fds:  # descriptors ride on the first byte of their frame
                    if i:
                        break
                    anc = _rights(fds)
                views += vs
                for v in vs:
                    size += v.nbytes
                if len(views) >= IOV_MAX or size >= SEND_BYTES:
                    break  # more than a socket takes at once: the rest waits its turn
            try:
                n = sock.sendmsg(views[:IOV_MAX], anc)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # the stream is broken: no queued frame can follow
                self._fail(exc)  # (frames posted with nobody awaiting them included)
                return
            if anc and n:
                _close_all(q[0][1])
                q[0][1] = None
            while q:  # what was sent leaves the queue; its senders are told
                e = q[0]
                vs = e[0]
                while vs and n >= vs[0].nbytes:
                    n -= vs[0].nbytes
                    vs.pop(0)
                if vs:
                    if n:
                        vs[0] = vs[0][n:]
                    break
                q.popleft()
                if e[2] is not None and not e[2].done():
                    e[2].set_result(None)
        self._watch_writable(bool(q) and sock is not None)

    def _watch_writable(self, on: bool) -> None:
        if on == self._watching or self.sock is None:
            return
        import asyncio

        loop = asyncio.get_running_loop()
        if on:
            loop.add_writer(self.sock.fileno(), self._write_pending)
        else:
            loop.remove_writer(self.sock.fileno())
        self._watching = on

    def _drop_pending(self, exc: BaseException) -> None:
        """The frames still queued cannot be sent: their senders raise ``exc``."""
        self._send_failed = exc
        self._watch_writable(False)
        for _, fds, fut in self._pending:
            _close_all(fds)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    def _post(self, frame: bytes) -> None:
        """Send a small frame with the others queued in this turn of the event loop: a
        download's write and read requests cost one send per turn, not one each."""
        self._end_run()
        self._out.append(frame)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            import asyncio

            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _end_run(self) -> None:
        """Frame the blocks put in the ring back to back (one write for the run)."""
        run = self._run
        if run is not None:
            self._run = None
            ih, piece, begin, offset, length, t0, t1 = run
            self._out.append(self.core.write_ring(ih, piece, begin, offset, length, (t0, t1),
                                                  False)[1])
            self._schedule_flush()

    def _flush_out(self) -> None:
        self._end_run()
        self._flush_scheduled = False
        if not self._out or self.sock is None:
            return
        self._queue_posted()
        self._write_pending()
        if self._send_failed is not None:
            self._fail(self._send_failed)

    def _arm(self, waiter: _Waiter) -> asyncio.Future[None]:
        """A future set when the reply ``waiter`` stands for arrives (or the connection
        fails): each request wakes its own task, and no other."""
        import asyncio

        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        waiter.notify = wake
        return fut

    async def _sleep(self, waiter: _Waiter, woken: asyncio.Future[None]) -> None:
        if not waiter.done and self._failure is None:
            await woken
        if not waiter.done and self._failure is not None:
            self._raise_failure()

    async def _roundtrip(self, rid: int, frame: bytes, fds: list[int] | None = None) -> Any:
        """As :meth:`Client._roundtrip`: a write's error received is raised first, one
        that arrives meanwhile kept for the next call."""
        if self._failure is not None:  # (closed, or lost): nothing is sent any more
            self.core.waiters.pop(rid, None)
            self._raise_failure()
        if self.core.write_errors:
            try:
                await self._raise_write_error()
            except BaseException:
                self.core.unsent(rid)  # (and the ring space a READ_RING claimed, free)
                raise
        waiter = self.core.waiters[rid]
        woken = self._arm(waiter)
        if fds or len(frame) > 4096:
            await self._send(frame, fds=fds)
        else:
            self._post(frame)
        await self._sleep(waiter, woken)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    async def _call(self, op: str, **args: Any) -> Any:
        return await self._roundtrip(*self.core.request(op, args))

    async def wait_writes(self) -> None:
        self._end_run()
        await self._until(lambda: self.core.writes_in_flight == 0)
        err = self.core.take_write_error()
        if err is not None:
            raise err

    async def _raise_write_error(self) -> None:
        if self.core.write_errors:
            await self.wait_writes()

    async def register(self, metainfo: bytes, save_path: str | os.PathLike[str]) -> bytes:
        rid, frame, fd = self.core.register(metainfo, os.fspath(save_path))
        try:
            res = await self._roundtrip(rid, frame, fds=[fd] if fd is not None else None)
        finally:
            if fd is not None:
                os.close(fd)
        return bytes(res["ih"])

    async def write_chunk(self, ih: bytes, piece: int, begin: int, data: bytes | memoryview,
                          flush: bool = False) -> None:
        data = block_view(data)
        if self._failure is not None:  # (a write sent after it would be said done)
            self._raise_failure()
        await self._raise_write_error()
        await self._until(lambda: self.core.writes_in_flight < self.window)
        _, header = self.core.write(ih, piece, begin, data.nbytes, flush)
        await self._send(header, data)

    async def attach_ring(self, size: int = 16 * 1024 * 1024) -> None:
        async with self._attach_lock:
            if self.core.shm is None:
                await self._attach(size)

    async def _attach(self, size: int) -> None:
        """Attach a ring, or wait for the attach already sent. The exchange runs on to
        its end when the caller is cancelled: sent, the ring is the daemon's whether or
        not anyone waits for the reply, and a ring closed here meanwhile made every later
        ring write of the connection fail ("a ring is already attached")."""
        import asyncio

        if self._attaching is None:
            self._attaching = asyncio.ensure_future(self._attach_as(ShmRing(size), size))
            self._attaching.add_done_callback(
                lambda t: t.cancelled() or t.exception())  # (said to its waiters)
        await asyncio.shield(self._attaching)

    async def _attach_as(self, shm: ShmRing, size: int) -> None:
        rid, frame = self.core.request("attach_ring", {"size": size})
        waiter = self.core.waiters[rid]
        try:
            await self._roundtrip(rid, frame, fds=[shm.fd])
        except BaseException:
            if waiter.took() and self._failure is None:
                self.core.shm = shm  # (what was raised is an earlier write's error)
            else:
                shm.close()
            raise
        finally:
            self._attaching = None
        if self._failure is not None:  # (closed as the reply came: the ring goes with it)
            shm.close()
            self._raise_failure()
        self.core.shm = shm

    async def _ring(self) -> ShmRing:
        """The ring, attached first if it is not: a close while it is attached (or while
        this waits for another call's attach) raises as any call after a close does."""
        await self.attach_ring()
        shm = self.core.shm
        if shm is None:
            if self._failure is not None:
                self._raise_failure()
            raise ConnectionError("the client is closed")
        return shm

    def try_write_block_direct(self, ih: bytes, piece: int, begin: int,
                               data: bytes | memoryview, flush: bool = False) -> bool:
        """:meth:`write_block_direct` now, without a coroutine, when nothing has to be
        waited for (the ring attached with room, the window open, no error to report);
        False when the caller should await :meth:`write_block_direct` instead. A plugin
        writes tens of thousands of blocks a second: most go this way.

        Blocks of one piece written in order in one turn of the event loop, as a peer's
        blocks arrive, lie back to back in the ring: they go to the daemon as one ring
        write of up to ``max_block`` bytes (one frame, one reply, one pass of the daemon's
        Python), not one each."""
        core = self.core
        shm = core.shm
        if shm is None or core.write_errors or self._failure is not None:
            return False
        n = memoryview(data).nbytes
        run = self._run
        if (run is not None and not flush and run[1] == piece and run[2] + run[4] == begin
                and run[0] == ih and run[4] + n <= core.max_block and shm.head == run[6]):
            placed = shm.put(data)
            if placed is None:
                return False
            run[4] += n
            run[6] = placed[1][1]
            return True
        if core.writes_in_flight + (run is not None) >= self.window or n > shm.size:
            return False
        # Refused now: a run is framed later, in a callback, where an error could only
        # be lost (and the flushes of every later request with it).
        if type(ih) is not bytes or len(ih) != 20:
            ih = info_hash_field(ih)
        if not (0 <= piece <= _U32 and 0 <= begin <= _U32):
            raise unencodable(piece, begin, n)
        placed = shm.put(data)
        if placed is None:
            return False
        self._end_run()
        offset, (t0, t1) = placed
        if flush:
            self._out.append(core.write_ring(ih, piece, begin, offset, n, (t0, t1), True)[1])
        else:
            self._run = [ih, piece, begin, offset, n, t0, t1]
        self._schedule_flush()
        return True

    async def write_block_direct(self, ih: bytes, piece: int, begin: int,
                                 data: bytes | memoryview, flush: bool = False) -> None:
        self._end_run()  # what it waits for below may be the reply to that run
        if self._failure is not None:
            self._raise_failure()
        shm = self.core.shm
        if shm is None:
            shm = await self._ring()
        core = self.core
        if core.write_errors:  # tested here: a coroutine per block costs what the write does
            await self._raise_write_error()
        if core.writes_in_flight >= self.window:
            await self._until(lambda: core.writes_in_flight < self.window)
        n = memoryview(data).nbytes
        placed = core.ring_put(data)
        while placed is None:
            await self._until(lambda: shm.free_bytes() >= n)
            placed = self.core.ring_put(data)
        offset, token = placed
        _, frame = self.core.write_ring(ih, piece, begin, offset, n, token, flush)
        self._post(frame)

    async def read_chunk(self, ih: bytes, piece: int, begin: int, length: int,
                         volatile: bool = False) -> bytes:
        return bytes(await self._roundtrip(*self.core.read(_hexless(ih), piece, begin, length, volatile)))

    async def read_chunk_ring(self, ih: bytes, piece: int, begin: int, length: int,
                              volatile: bool = False) -> RingChunk:
        """:meth:`read_chunk` into the shared ring (see ``Client``); reads may be many in
        flight. While the ring has no room the call waits for writes in flight and
        chunks released to free some (so a task must not hold chunks while it waits for
        another: release each once its bytes are sent)."""
        shm = self.core.shm
        if shm is None:
            shm = await self._ring()
        key = _hexless(ih)
        got = self.core.read_ring(key, piece, begin, length, volatile)
        while got is None:
            await self._until(lambda: shm.free_bytes() >= 2 * length or not (
                self.core.writes_in_flight or shm.head != shm.tail))
            got = self.core.read_ring(key, piece, begin, length, volatile)
        rid, frame = got
        waiter = self.core.waiters[rid]
        try:
            view, token = await self._roundtrip(rid, frame)
        except BaseException:  # cancelled, its error, or a write's raised first
            self.core.drop_read_ring(waiter)
            self._wake.set()  # (its space, if the reply came: for a call waiting for room)
            raise
        return RingChunk(view, shm, token, self._wake.set)

    async def read_chunk_into(self, ih: bytes, piece: int, begin: int, out: memoryview,
                              volatile: bool = False) -> int:
        """:meth:`read_chunk` of ``out.nbytes`` bytes into ``out`` (see ``Client``)."""
        return int(await self._roundtrip(*self.core.read(_hexless(ih), piece, begin,
                                                         out.nbytes, volatile, out)))

    async def unregister(self, ih: bytes, delete_files: bool = False) -> None:
        await self._call("unregister", ih=_hexless(ih), delete_files=delete_files)

    async def torrents(self) -> list[dict[str, Any]]:
        """As :meth:`Client.torrents`."""
        try:
            return list(await self._call("list") or [])
        except TooLarge:
            pass
        out: list[dict[str, Any]] = []
        while page := await self._call("list", after=out[-1]["ih"] if out else b""):
            out += page
        return out

    async def read_piece(self, ih: bytes, piece: int) -> bytes:
        return bytes((await self._call("read_piece", ih=_hexless(ih), piece=piece))["data"])

    async def hash_piece(self, ih: bytes, piece: int, expected: bytes | None = None) -> bool:
        return bool(await self._call("hash_piece", ih=_hexless(ih), piece=piece, expected=expected))

    async def hash_piece_v2(self, ih: bytes, piece: int, expected: bytes | None = None) -> bool:
        return bool(await self._call("hash_piece_v2", ih=_hexless(ih), piece=piece, expected=expected))

    async def hash_block(self, ih: bytes, piece: int, begin: int, length: int) -> bytes:
        res = await self._call("hash_block", ih=_hexless(ih), piece=piece, begin=begin, length=length)
        return bytes(res["digest"])

    async def clear_piece(self, ih: bytes, piece: int) -> None:
        await self._call("clear_piece", ih=_hexless(ih), piece=piece)

    async def flush_piece(self, ih: bytes, piece: int) -> None:
        await self._call("flush_piece", ih=_hexless(ih), piece=piece)

    async def flush_all(self) -> None:
        await self._call("flush_all")

    async def cached_pieces(self, ih: bytes) -> list[int]:
        return list(await self._call("cached_pieces", ih=_hexless(ih)) or [])

    async def stats(self) -> dict[str, Any]:
        return dict(await self._call("stats"))

    async def status(self, ih: bytes, files: bool = True, partial: bool = False) -> dict[str, Any]:
        return dict(await self._call("status", **_status_args(ih, files, partial)))

    async def recheck(self, ih: bytes, full: bool = False, join: bool = False
                      ) -> dict[str, Any]:
        return dict(await self._call("recheck", ih=_hexless(ih), full=int(full),
                                     join=int(join)))

    async def move_storage(self, ih: bytes, new_path: str | os.PathLike[str]) -> None:
        await self._call("move_storage", ih=_hexless(ih), new_path=os.fspath(new_path))

    async def rename_file(self, ih: bytes, index: int, new_name: str) -> None:
        await self._call("rename_file", ih=_hexless(ih), index=index, new_name=new_name)

    async def subscribe(self, ih: bytes) -> None:
        await self._call("subscribe", ih=_hexless(ih))
