"""Whole-torrent verification: the offline ``pieced verify`` and the daemon's recheck.

Work is handed to the hash pool in batches of consecutive pieces (a few MiB each),
not piece by piece: with 16 KiB pieces a future per piece would cost more than the
hashing. Each worker reads into a buffer of its own and hashes it there; pieces larger
than STREAM_BYTES are read and hashed in parts, so the buffer never grows past it, and
smaller ones are taken several at a time (up to STREAM_BYTES in one read, or a batch in
one view of mapped files), for the same reason.

One reader, :class:`PreadReader`, for the daemon's backends and for the offline
verifier (:class:`FolderFiles`): pieces are read with pread, safe against files
truncated behind our back, or, on the mmap backend, hashed in place in its maps of
leased files (see ``MmapStorage.views``). For a backend that reads past the page cache
(O_DIRECT), where asking the kernel to read ahead starts nothing, it reads ahead
itself (:class:`ReadAhead`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import itertools
import mmap
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import NamedTuple

from .errors import PathEscape, StorageIOError, detached
from .hashing import (
    FINGERPRINT_BYTES,
    NO_FINGERPRINT,
    Buffer,
    HashPool,
    Pads,
    PieceCheck,
    check_piece,
    fingerprint,
)
from .layout import Layout, Segment, fill_zeros
from .metainfo import Metainfo
from .paths import folder_below

# Work handed to a hash worker at a time. Measured (2 GiB, 4 MiB pieces, warm): a
# fingerprint recheck on mmap took 0.29 s in batches of 8 MiB, 0.24 s in batches of
# 16 MiB viewed in place at once (half the futures, page-table calls and hand-overs of
# the interpreter's lock), the bare BLAKE3 pass 0.23 s.
# Files and folders :class:`FolderFiles` keeps open at once: far below the usual
# descriptor limit (1,024), and more than a check reads at once.
OPEN_FILES = 256
OPEN_FOLDERS = 64
BATCH_BYTES = 16 * 1024 * 1024
# Work on data not in the page cache: smaller batches, and more bytes asked of the disk
# ahead of the hashing. Measured (2 GiB, 4 MiB pieces, cold, in one process, five
# rounds of each alternating): posix 1.52-1.94 s in batches of 16 MiB, 1.17-1.55 s in
# batches of 8 MiB with 112-176 MiB asked ahead (1.30-1.63 s with 64 MiB); mmap 1.46-1.61
# against 1.14-1.87 s; a bare loop of preadv + SHA-1 on two threads 1.16-1.52 s. The two
# threads then hash neighbouring pieces, where the disk's reads come in, instead of
# one waiting for its batch while the other hashes the one before.
COLD_BATCH_BYTES = 8 * 1024 * 1024
READ_AHEAD_BYTES = 128 * 1024 * 1024
Progress = Callable[[int, int], None]  # (pieces done, pieces total)


class VerifyResult(NamedTuple):
    num_pieces: int
    failed_v1: list[int] | None
    failed_v2: list[int] | None
    have: list[bool]
    bytes_hashed: int = 0
    fingerprint_hits: int = 0  # pieces found good by their fingerprint alone
    new_fingerprints: dict[int, bytes] | None = None  # piece -> fingerprint computed

    @property
    def ok(self) -> bool:
        return all(self.have)


STREAM_BYTES = 4 * 1024 * 1024  # pieces larger than this are read and hashed in parts
_buffers = threading.local()


def _thread_buffer(size: int) -> memoryview:
    """The hashing thread's read buffer, shared by every recheck it works for: a thread
    holds at most one, of at most STREAM_BYTES, however large the pieces. Page-aligned
    (an anonymous map), so that an O_DIRECT read lands in it without a bounce."""
    buf: memoryview | None = getattr(_buffers, "buf", None)
    if buf is None or buf.nbytes < size:
        buf = _buffers.buf = memoryview(mmap.mmap(-1, max(size, 1)))
    return buf


Read = Callable[[int, int, memoryview], None]  # (piece, begin, out): StorageIOError if not
# (first piece, out): consecutive pieces read whole; False, and nothing told, if they could
# not be (each is then read on its own, whose read says what went wrong)
ReadSpan = Callable[[int, memoryview], bool]
# (piece, begin, length): the bytes where they lie (a backend's maps), and the call that
# gives them back; None where the backend cannot (see MmapStorage.views)
View = Callable[[int, int, int], "tuple[list[Buffer], Callable[[], None]] | None"]

# the states of a part read ahead
QUEUED, READING, READ, FAILED, TAKEN = range(5)


class _Part:
    """Bytes [begin, begin + length) of a piece, read ahead into ``job``'s slot at
    ``offset``."""

    __slots__ = ("begin", "error", "job", "length", "offset", "orphan", "piece", "state")

    def __init__(self, piece: int, begin: int, length: int, job: _Job, offset: int) -> None:
        self.piece, self.begin, self.length = piece, begin, length
        self.job, self.offset = job, offset
        self.state = QUEUED
        self.error: BaseException | None = None
        self.orphan = False  # no one will take it: released as soon as it is read

    def view(self) -> memoryview:
        assert self.job.slot is not None
        return self.job.slot[self.offset : self.offset + self.length]


class _Job:
    """What one reader reads into one slot: consecutive whole pieces, or one part of a
    piece longer than STREAM_BYTES."""

    __slots__ = ("held", "key", "parts", "read", "slot")

    def __init__(self, read: Read, key: tuple[int, int, int]) -> None:
        self.read = read
        self.parts: list[_Part] = []
        self.key = key
        self.slot: memoryview | None = None
        self.held = 0  # parts read (or being read) into the slot and not yet released


class ReadAhead:
    """Reader threads that read pieces into buffers of their own (slots) while the hash
    workers hash the pieces before them: for a backend that reads past the page cache
    (O_DIRECT), where POSIX_FADV_WILLNEED starts nothing and each worker would otherwise
    wait for its own read, so that reading never overlapped hashing.

    One per process, shared by every recheck, as the hash pool is. A slot holds
    STREAM_BYTES: consecutive whole pieces, each at a page-aligned offset, or one part of
    a longer piece (hashed part by part, as :meth:`PreadReader.stream` does). Slots are
    page-aligned anonymous maps, made as needed, reused, and unmapped when the readers
    have been idle for IDLE seconds.

    At most ``workers + READERS`` slots exist (16 MiB with two hash workers), whatever
    the piece length and however many rechecks run: one for each hash worker to hash,
    and one for each reader to fill meanwhile, which is what keeps the disk and the
    hashing busy together. More would only read further ahead of the hashing, which
    makes neither faster, while holding more memory.

    Nothing ever waits for a slot: a hash worker that wants a part no reader has started
    while every slot is taken (the readers are ahead on other pieces, or on another
    recheck whose batches queue behind this one's on the hash pool) takes the part back
    and reads it itself, as without read-ahead. Readers take the queued parts in the
    order the workers are expected to want them (batches in turn over the workers, a
    batch's slots in order).
    """

    READERS = 2
    IDLE = 2.0

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.slots = workers + self.READERS
        self._cond = threading.Condition()
        self._queue: list[tuple[tuple[int, int, int], int, _Job]] = []  # a heap
        self._order = itertools.count()
        self._free: list[memoryview] = []
        self._made = 0  # slots in existence
        self._readers = 0
        self.max_reading = 0  # the most reads at once seen (for tests)
        self._reading = 0

    # -- the hash workers' side ---------------------------------------------------------
    def submit(self, jobs: Sequence[_Job]) -> None:
        with self._cond:
            for job in jobs:
                heapq.heappush(self._queue, (job.key, next(self._order), job))
            if self._readers < self.READERS:
                for _ in range(self.READERS - self._readers):
                    self._readers += 1
                    threading.Thread(target=self._run, name="pieced-readahead",
                                     daemon=True).start()
            self._cond.notify_all()

    def take(self, part: _Part) -> int:
        """Wait for ``part`` to be read: READ if it was (its view is then the caller's
        until :meth:`release`), FAILED if it could not be (``error`` says why), TAKEN if
        the caller is to read it itself (it was not started, and no slot is free to
        start it)."""
        with self._cond:
            while part.state == READING or (part.state == QUEUED and self._slot_free()):
                self._cond.wait()
            state = part.state
            if state == READ:
                return READ
            if state == FAILED:
                self._release(part)
                return FAILED
            part.state = TAKEN  # (if QUEUED: the reader skips it)
            return TAKEN

    def release(self, part: _Part) -> None:
        with self._cond:
            self._release(part)

    def drop(self, part: _Part) -> None:
        """No one will take ``part``: its slot goes back as soon as it is read."""
        with self._cond:
            if part.state == QUEUED:
                part.state = TAKEN
            elif part.state == READING:
                part.orphan = True
            elif part.state in (READ, FAILED):
                self._release(part)

    def _slot_free(self) -> bool:
        return bool(self._free) or self._made < self.slots

    def _release(self, part: _Part) -> None:
        if part.state == TAKEN:
            return
        part.state = TAKEN
        job = part.job
        job.held -= 1
        if job.held == 0 and job.slot is not None:
            self._free.append(job.slot)
            job.slot = None
            self._cond.notify_all()

    # -- the readers' side --------------------------------------------------------------
    def _next(self) -> tuple[_Job, list[_Part]] | None:
        """The next job to read and its parts still wanted, with a slot; None when idle
        for IDLE seconds (this reader then ends)."""
        with self._cond:
            while True:
                while self._queue and not any(p.state == QUEUED for p in self._queue[0][2].parts):
                    heapq.heappop(self._queue)  # every part taken back by the workers
                if self._queue and self._slot_free():
                    job = heapq.heappop(self._queue)[2]
                    if self._free:
                        job.slot = self._free.pop()
                    else:
                        self._made += 1
                        job.slot = memoryview(mmap.mmap(-1, STREAM_BYTES))
                    todo = [p for p in job.parts if p.state == QUEUED]
                    for p in todo:
                        p.state = READING
                    job.held = len(todo) + 1  # + the reader's own hold, while it reads
                    self._reading += 1
                    self.max_reading = max(self.max_reading, self._reading)
                    self._cond.notify_all()  # a slot fewer: a worker may now read itself
                    return job, todo
                if not self._cond.wait(self.IDLE) and not self._queue:
                    self._readers -= 1
                    if not self._readers:  # idle: the slots go back to the system
                        self._made -= len(self._free)
                        self._free.clear()
                    return None

    def _run(self) -> None:
        while (got := self._next()) is not None:
            job, todo = got
            try:
                for part in todo:
                    try:
                        job.read(part.piece, part.begin, part.view())
                        state = READ
                    except Exception as exc:  # StorageIOError: the piece fails
                        part.error, state = detached(exc), FAILED  # (part holds its buffer)
                    with self._cond:
                        part.state = state
                        if part.orphan:
                            self._release(part)
                        self._cond.notify_all()
            finally:
                with self._cond:
                    self._reading -= 1
                    job.held -= 1
                    if job.held == 0 and job.slot is not None:
                        self._free.append(job.slot)
                        job.slot = None
                    self._cond.notify_all()


def _nothing() -> None:
    return None


def cut(views: Sequence[Buffer], start: int, length: int) -> list[memoryview]:
    """Bytes [start, start + length) of the buffers taken end to end, as views of them."""
    out: list[memoryview] = []
    pos, end = 0, start + length
    for v in views:
        mv = memoryview(v)
        n = mv.nbytes
        if pos + n > start:
            out.append(mv[max(start - pos, 0) : min(end - pos, n)])
        pos += n
        if pos >= end:
            break
    return out


_read_ahead: ReadAhead | None = None
_read_ahead_lock = threading.Lock()


def read_ahead(workers: int) -> ReadAhead:
    """The process's read-ahead (sized for the hash pool's ``workers``)."""
    global _read_ahead
    with _read_ahead_lock:
        if _read_ahead is None or _read_ahead.workers != workers:
            _read_ahead = ReadAhead(workers)
        return _read_ahead


class PreadReader:
    """Reads pieces with preadv, via a storage's ``readinto(piece, begin, out)``, into
    the hashing thread's buffer; or, with ``read_ahead`` (a backend past the page
    cache), on the :class:`ReadAhead` readers ahead of the hashing."""

    def __init__(self, read: Read, advise: Callable[[int, int], None] | None = None,
                 read_ahead: bool = False, view: View | None = None,
                 read_span: ReadSpan | None = None,
                 resident: Callable[[int], bool] | None = None) -> None:
        self._read = read
        self._resident = resident if advise is not None and not read_ahead else None
        self._read_span = read_span
        # The most bytes of consecutive pieces taken at once (see :meth:`span`): a
        # batch where they are viewed in place, what the thread's buffer holds where
        # they are read.
        self.span_bytes = BATCH_BYTES if view is not None else STREAM_BYTES
        self._advise = advise
        # A mapped backend's pages hashed where they lie, for BLAKE3 (see ``in_place``).
        self._view = view
        self._given: dict[int, Callable[[], None]] = {}  # piece -> gives its views back
        self._wants_ahead = read_ahead
        self._ahead: ReadAhead | None = None
        self._parts: dict[tuple[int, int], _Part] = {}  # read ahead, not yet taken
        self._held: dict[int, _Part] = {}  # piece -> its part in a view handed out
        self._batches = 0

    def start(self, workers: int) -> None:
        """A verification starts, with ``workers`` hashing."""
        if self._wants_ahead:
            self._ahead = read_ahead(workers)

    def finish(self) -> None:
        """The verification ended (or failed): give back whatever is still read ahead."""
        ahead = self._ahead
        if ahead is None:
            return
        parts = list(self._parts.values()) + list(self._held.values())
        self._parts.clear()
        self._held.clear()
        for part in parts:
            ahead.drop(part)

    def cold(self, piece: int) -> bool:
        """Whether the piece is to be read from the disk, as far as the page cache says
        (its first byte); False where that is not known, or the reader reads ahead
        itself (O_DIRECT: the page cache plays no part)."""
        return self._resident is not None and not self._resident(piece)

    def prefetch(self, pieces: Sequence[int], size: Callable[[int], int]) -> None:
        """Start reading ``pieces`` now (they are hashed soon): by the kernel
        (POSIX_FADV_WILLNEED), or by the read-ahead."""
        if self._advise is not None:
            # Once a run of consecutive pieces: per piece, the advice cost more than the
            # hashing of pieces of 256 KiB (the ranges to map, the page-cache probes).
            # ``advise(first piece, bytes)`` takes a range over several pieces.
            first = count = total = 0
            for p in pieces:
                if count and p == first + count:
                    count += 1
                    total += size(p)
                    continue
                if count:
                    self._advise(first, total)
                first, count, total = p, 1, size(p)
            if count:
                self._advise(first, total)
        if self._ahead is None:
            return
        # Batches go to the workers in turn: worker k hashes batch n * workers + k, so
        # the slots of batches that are hashed together are read in turn.
        seq = self._batches
        self._batches += 1
        jobs: list[_Job] = []
        job: _Job | None = None
        used = 0
        for p in pieces:
            n = size(p)
            for begin in range(0, n, STREAM_BYTES):
                length = min(STREAM_BYTES, n - begin)
                span = length + -length % mmap.PAGESIZE
                if job is None or used + span > STREAM_BYTES:
                    job = _Job(self._read, (seq // self._ahead.workers, len(jobs), seq))
                    jobs.append(job)
                    used = 0
                part = _Part(p, begin, length, job, used)
                job.parts.append(part)
                self._parts[(p, begin)] = part
                used += span
        self._ahead.submit(jobs)

    def _take(self, piece: int, begin: int) -> tuple[bool, _Part | None]:
        """(False, None) if the part read ahead at ``begin`` of ``piece`` could not be
        read; (True, part) if it was; (True, None) if the caller is to read it itself."""
        part = self._parts.pop((piece, begin), None) if self._parts else None
        if part is None:
            return True, None
        assert self._ahead is not None
        got = self._ahead.take(part)
        if got is READ:
            return True, part
        if got is FAILED:
            if not isinstance(part.error, StorageIOError):
                raise part.error or AssertionError  # what the read raised, as if here
            return False, None
        return True, None  # not started: read it here

    def views(self, piece: int, size: int, in_place: bool = False) -> list[Buffer] | None:
        """The piece's bytes (None if they cannot be read). ``in_place``: where they lie,
        if the backend has them mapped, rather than copied out: for BLAKE3, which hashes
        mapped pages faster than it copies them (a warm fingerprint recheck of 2 GiB on
        mmap: 0.26 s against 0.32 s read). Not for SHA-1 and SHA-256, which hash the
        copy faster, warm (0.68 s against 0.87 s, full recheck) or cold (a daemon's
        cold full recheck spent 1.76-1.96 CPU-seconds reading, 2.16-2.61 in place)."""
        if in_place and self._view is not None:
            seen = self._view(piece, 0, size)
            if seen is not None:
                self._given[piece] = seen[1]
                return seen[0]
        ok, got = self._take(piece, 0)
        if not ok:
            return None
        if got is not None:
            self._held[piece] = got
            return [got.view()]
        buf = _thread_buffer(size)[:size]
        try:
            self._read(piece, 0, buf)
        except StorageIOError:
            return None
        return [buf]

    def span(self, first: int, size: int, in_place: bool = False
             ) -> tuple[list[Buffer], Callable[[], None]] | None:
        """Consecutive whole pieces from ``first``, ``size`` bytes in all (at most
        ``span_bytes``), in one view or one read (of STREAM_BYTES at most), and the call
        that gives them back; None where they are to be read one by one (a read-ahead
        backend, or a read that failed: each piece's own read then says which failed,
        and why).

        Piece by piece, pieces of 256 KiB cost more in reads, page-cache probes and
        map calls than in hashing: a fingerprint recheck of 2 GiB took 0.54 s (0.76 s
        on mmap) against 0.35 s (0.29 s) with pieces of 4 MiB."""
        if self._ahead is not None:
            return None
        if in_place and self._view is not None:
            seen = self._view(first, 0, size)
            if seen is not None:
                return seen
        if self._read_span is None or size > STREAM_BYTES:
            return None
        buf = _thread_buffer(size)[:size]
        return ([buf], _nothing) if self._read_span(first, buf) else None

    def done(self, piece: int, size: int) -> None:
        """The caller is done with ``piece``'s views (a part of it left untaken, after a
        failed read, goes back too)."""
        give_back = self._given.pop(piece, None) if self._given else None
        if give_back is not None:
            give_back()
        if self._ahead is None:
            return
        held = self._held.pop(piece, None)
        if held is not None:
            self._ahead.release(held)
        if self._parts:
            for begin in range(0, size, STREAM_BYTES):
                part = self._parts.pop((piece, begin), None)
                if part is not None:
                    self._ahead.drop(part)

    def stream(self, piece: int, size: int, consume: Callable[[memoryview], object],
               in_place: bool = False) -> bool:
        """Hand the piece to ``consume`` in consecutive parts of at most STREAM_BYTES;
        False if it could not be read. ``in_place``: as for :meth:`views`."""
        buf: memoryview | None = None
        for begin in range(0, size, STREAM_BYTES):
            if in_place and self._view is not None:
                seen = self._view(piece, begin, min(STREAM_BYTES, size - begin))
                if seen is not None:
                    try:
                        for v in seen[0]:
                            consume(memoryview(v))
                    finally:
                        seen[1]()
                    continue
            ok, got = self._take(piece, begin)
            if not ok:
                return False
            if got is not None:
                assert self._ahead is not None
                try:
                    consume(got.view())
                finally:
                    self._ahead.release(got)
                continue
            if buf is None:
                buf = _thread_buffer(min(size, STREAM_BYTES))
            part = buf[: min(STREAM_BYTES, size - begin)]
            try:
                self._read(piece, begin, part)
            except StorageIOError:
                return False
            consume(part)
        return True


class Unreadable(Exception):
    """A payload file that is there but cannot be read (EACCES, EIO...): not a failed
    piece, whose bytes were read and found wrong; the check cannot say."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot read {path}: {exc.strerror or exc}")
        self.errno = exc.errno


class FolderFiles:
    """A torrent's files in a folder, read with pread for :class:`PreadReader`, with no
    daemon (``pieced verify``).

    Not mapped: a page of a mapped file cut short by another process meanwhile, or one
    the disk cannot read, is SIGBUS, which killed the command without a word. A file
    missing, not a regular file, or shorter than a piece needs fails the pieces it
    holds (StorageIOError, as a read fails them); any other error is :class:`Unreadable`.
    """

    def __init__(self, meta: Metainfo, save_path: Path, layout: Layout,
                 descriptors: int | None = None) -> None:
        """``descriptors``: the process's limit, when its files and folders must stay
        well within it (a few dozen kept for the rest)."""
        self._meta = meta
        self._layout = layout
        self._save_path = save_path
        # Files open now (None: missing, or not a file), least recently used first; at
        # most ``open_files`` descriptors, those in use by a read apart. (Every file kept
        # open, a torrent of more files than the descriptor limit, 1,024 by default,
        # stopped the check with EMFILE half way.)
        self._fds: OrderedDict[int, int | None] = OrderedDict()
        room = OPEN_FILES + OPEN_FOLDERS if descriptors is None else max(2, descriptors - 32)
        self._open_folders = max(1, min(OPEN_FOLDERS, room // 4))
        self._open_files = max(1, min(OPEN_FILES, room - self._open_folders))
        self._opened = 0  # descriptors among them
        self._using: dict[int, int] = {}  # file index -> reads using its descriptor now
        self._folders: OrderedDict[tuple[str, ...], int | None] = OrderedDict()
        # The save path, opened once: every folder is walked to from it. (Opened again
        # by its name for each folder, a parent of it swapped meanwhile for a symlink
        # made one check read some files from one tree, the rest from another.)
        self._root: int | None = None
        self._lock = threading.Lock()
        # Payload files there but not read, and why: their pieces fail, and a user who
        # sees them fail should be told why (a file is a symlink, a folder on the way a
        # symlink or a file), where a missing file needs no word.
        self.refused: dict[Path, str] = {}

    def _fd(self, index: int) -> int | None:
        """The file's descriptor, held for the caller until :meth:`_done` (not closed to
        make room meanwhile); None if it is missing or not a file (nothing to give back)."""
        with self._lock:
            fd = self._fds.get(index, -1)
            if fd == -1:
                fd = self._fds[index] = self._open(index)
                if fd is not None:
                    self._opened += 1
            else:
                self._fds.move_to_end(index)
            if fd is not None:
                # In use before any is closed: trimmed first, the file just opened was
                # closed when every other was in use, and its number read (another
                # file's, once reused).
                self._using[index] = self._using.get(index, 0) + 1
                self._trim()
            return fd

    def _done(self, index: int) -> None:
        with self._lock:
            left = self._using.pop(index) - 1
            if left:
                self._using[index] = left

    def _trim(self) -> None:
        """Descriptors closed, least recently used first, down to the bound (the caller
        holds the lock). A file forgotten so is opened again when read again."""
        if self._opened <= self._open_files:
            return
        for index in [i for i, fd in self._fds.items() if fd is not None]:
            if self._opened <= self._open_files:
                break
            if index not in self._using:
                fd = self._fds.pop(index)
                assert fd is not None
                os.close(fd)
                self._opened -= 1

    def _open(self, index: int) -> int | None:
        """The file, reached from the save path one folder at a time and never through a
        symlink, as the daemon reaches it: a symlink on the way (or in the file's place)
        fails the pieces it holds, where the daemon's check fails them too. (Followed,
        this command called good a folder the daemon then failed.)"""
        parts = self._meta.files[index].path
        path = self._save_path.joinpath(*parts)
        dfd = self._folder(tuple(parts[:-1]), path)
        if dfd is None:
            return None
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            try:
                # O_NONBLOCK: a FIFO in a payload file's place must not hang the open.
                fd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=dfd)
            except BlockingIOError:
                # A lease on the file (a daemon on the mmap backend has it mapped): wait
                # for its holder to let go, as any open does; it does within
                # milliseconds. (Said "cannot read", this failed the command. A FIFO
                # never answers so: its non-blocking open succeeds.)
                fd = os.open(parts[-1], flags, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):  # (ENXIO: a socket)
                self.refused[path] = ("a symbolic link: not followed" if exc.errno == errno.ELOOP
                                      else "not a regular file")
                return None
            raise Unreadable(path, exc) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self.refused[path] = "not a regular file"
            return None  # its pieces fail
        return fd

    def _folder(self, folder: tuple[str, ...], path: Path) -> int | None:
        """A descriptor of a folder of the torrent, walked to once for all its files
        (the caller holds the lock); None if missing, or a symlink or a file on the way."""
        if folder in self._folders:
            self._folders.move_to_end(folder)
        else:
            while len(self._folders) >= self._open_folders:  # (used only here, locked)
                _, dfd = self._folders.popitem(last=False)
                if dfd is not None:
                    os.close(dfd)
            try:
                if self._root is None:
                    try:
                        self._root = os.open(self._save_path,
                                             os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    except OSError as exc:
                        raise StorageIOError.wrap(exc, f"open {self._save_path}") from None
                self._folders[folder] = folder_below(self._root, folder, self._save_path)
            except PathEscape:
                self.refused[self._save_path.joinpath(*self._refused_part(folder))] = (
                    "not a folder (a symbolic link, not followed, or a file)")
                self._folders[folder] = None
            except StorageIOError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise Unreadable(path, OSError(exc.errno, str(exc))) from None
                self._folders[folder] = None
        return self._folders[folder]

    def _refused_part(self, folder: tuple[str, ...]) -> tuple[str, ...]:
        """The first part of ``folder``'s path that is not a folder (what to name: the
        folders below a symlink are not each one), walked again on this error only."""
        assert self._root is not None
        for k in range(1, len(folder)):
            try:
                os.close(folder_below(self._root, folder[:k], self._save_path))
            except (PathEscape, StorageIOError):
                return folder[:k]
        return folder

    def read(self, piece: int, begin: int, out: memoryview) -> None:
        self._read(self._layout.map(piece, begin, out.nbytes), out)

    def read_span(self, first: int, out: memoryview) -> bool:
        try:
            self._read(self._layout.map_offset(first * self._layout.piece_length, out.nbytes),
                       out)
        except (StorageIOError, Unreadable):
            return False  # (read piece by piece, which says which piece, and why)
        return True

    def _read(self, segments: Sequence[Segment], out: memoryview) -> None:
        pos = 0
        for seg in segments:
            dst = out[pos : pos + seg.length]
            pos += seg.length
            if not seg.stored:
                fill_zeros(dst)
                continue
            fd = self._fd(seg.file_index)
            if fd is None:
                raise StorageIOError("not there")
            try:
                done = 0
                while done < seg.length:
                    try:
                        n = os.preadv(fd, [dst[done:]], seg.file_offset + done)
                    except OSError as exc:
                        path = self._save_path.joinpath(*self._meta.files[seg.file_index].path)
                        raise Unreadable(path, exc) from None
                    if n == 0:  # shorter than the torrent says: the pieces past its end fail
                        raise StorageIOError("cut short")
                    done += n
            finally:
                self._done(seg.file_index)

    def advise(self, piece: int, size: int) -> None:
        """Start reading ``size`` bytes from the piece's start, one piece or several
        (POSIX_FADV_WILLNEED): the disk works while the pieces before them are hashed."""
        for seg in self._layout.map_offset(piece * self._layout.piece_length, size):
            fd = self._fd(seg.file_index) if seg.stored and seg.length else None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.posix_fadvise(fd, seg.file_offset, seg.length, os.POSIX_FADV_WILLNEED)
                self._done(seg.file_index)

    def resident(self, piece: int) -> bool:
        """Whether the piece's first byte is in the page cache (see PreadReader.cold)."""
        seg = next((s for s in self._layout.map(piece, 0, 1) if s.stored), None)
        try:
            fd = self._fd(seg.file_index) if seg is not None else None
        except Unreadable:
            return True  # (its read says so)
        if fd is None or seg is None:
            return True  # nothing to read there
        try:
            return os.preadv(fd, [bytearray(1)], seg.file_offset, os.RWF_NOWAIT) == 1
        except BlockingIOError:
            return False
        except OSError:
            return True  # no RWF_NOWAIT here, or a read that fails: as it was
        finally:
            self._done(seg.file_index)

    def reader(self) -> PreadReader:
        return PreadReader(self.read, self.advise, read_span=self.read_span,
                           resident=self.resident)

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._folders.values(), self._root]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._opened = 0
            self._folders.clear()
            self._root = None


def _no_pads(piece: int) -> Pads:
    return ()


def _stored_end(size: int, pads: Pads) -> int:
    """Where a piece's stored bytes end: its size less the pads it ends with."""
    end = size
    for s, e in reversed(pads):
        if e != end:
            break
        end = s
    return end or size


def _v2_extent(meta: Metainfo, piece: int) -> int:
    v2 = meta.v2_piece(piece)
    return v2.data_length if v2 is not None else meta.piece_size(piece)


# (piece, v1 ok, v2 ok, bytes hashed, new fingerprint, good by its fingerprint)
Row = tuple[int, bool | None, bool | None, int, bytes | None, bool]


def verify(
    meta: Metainfo,
    reader: PreadReader,
    pool: HashPool,
    progress: Progress | None = None,
    pieces: Sequence[int] | None = None,
    fingerprints: bytes | None = None,
    trust_fingerprints: bool = True,
    unreadable: Collection[int] = (),
    pads: Callable[[int], Pads] | None = None,
) -> VerifyResult:
    """Hash every piece (or the given ones), in batches on the hash pool.

    ``fingerprints`` (a torrent's table, see :func:`hashing.fingerprint`): a piece
    whose fingerprint matches is good without its torrent hashes, unless
    ``trust_fingerprints`` is off (a full recheck); a piece that passes its torrent
    hashes and has no (or a stale) fingerprint gets one, in ``new_fingerprints``.
    Without a table no fingerprint is computed at all.

    ``unreadable``: pieces the caller knows cannot be read (their files are not
    there); they fail as a failed read fails them, without being asked for, so that
    a torrent with nothing on disk yet costs no read, nor open, per piece.

    ``pads``: a piece's unstored ranges (``Layout.pads``, made of ``meta`` when not
    given), which fingerprints leave out.
    """
    if pads is None:
        layout = Layout(meta)
        pads = layout.pads if layout.unstored else _no_pads
    # What a check of a piece by its torrent's hashes reads: the bytes they cover. In a
    # v2-only torrent that is its file's bytes (the rest is alignment, never stored,
    # which neither its Merkle root nor its fingerprint covers): a small file's piece of
    # 16 MiB was read whole, 16 MiB of zeros made for each.
    whole: Callable[[int], int] = (meta.piece_size if meta.has_v1
                                   else functools.partial(_v2_extent, meta))
    extent = whole  # what is read first
    if meta.has_v1 and fingerprints is not None and trust_fingerprints:
        known_fps = fingerprints

        def stored_first(p: int) -> int:
            """A piece with a fingerprint is read first as far as its stored bytes go
            (a hybrid's small file in a piece of 16 MiB: a few KiB, not its pad too),
            whole only if that does not match."""
            size = meta.piece_size(p)
            if known_fps[p * FP : (p + 1) * FP] == NO_FINGERPRINT:
                return size
            return _stored_end(size, pads(p))

        extent = stored_first
    todo = list(pieces) if pieces is not None else range(meta.num_pieces)
    have = [False] * meta.num_pieces
    failed_v1: list[int] | None = [] if meta.has_v1 else None
    failed_v2: list[int] | None = [] if meta.has_v2 else None
    new_fps: dict[int, bytes] = {}
    per_batch = max(1, BATCH_BYTES // meta.piece_length)
    per_cold = max(1, COLD_BATCH_BYTES // meta.piece_length)
    window = 2 * pool.workers + 2  # batches handed out at least, READ_AHEAD_BYTES at least
    done = hashed = hits = 0
    fail = (False if meta.has_v1 else None, False if meta.has_v2 else None)
    good = (True if meta.has_v1 else None, True if meta.has_v2 else None)
    FP = FINGERPRINT_BYTES

    def run(batch: Sequence[int]) -> list[Row]:
        """The batch's pieces in runs: each run in one view (``span_bytes``); failing
        that, in reads of STREAM_BYTES; failing that, piece by piece."""
        out: list[Row] = []
        i = 0
        while i < len(batch):
            j = span_end(batch, i, len(batch), reader.span_bytes)
            if j - i > 1 and spanned(batch[i:j], out):
                i = j
                continue
            while i < j:
                k = i + 1
                if reader.span_bytes > STREAM_BYTES:
                    k = span_end(batch, i, j, STREAM_BYTES)
                    if k - i > 1 and spanned(batch[i:k], out):
                        i = k
                        continue
                for p in batch[i:k]:
                    alone(p, out)
                i = k
        return out

    def alone(p: int, out: list[Row]) -> None:
        if p in unreadable:
            out.append((p, *fail, 0, None, False))
            return
        size = extent(p)
        try:
            out.append(one(p, size))
        finally:
            reader.done(p, size)  # its views (a buffer read ahead) are given back

    def span_end(batch: Sequence[int], i: int, end: int, limit: int) -> int:
        """The end (before ``end``) of the run of pieces from ``batch[i]`` to take
        together: consecutive, readable, ``limit`` bytes at most, none after one read
        short of its piece's end (pieces are whole but for the torrent's last)."""
        j, total = i + 1, extent(batch[i])
        if batch[i] in unreadable:
            return j
        while (j < end and batch[j] == batch[j - 1] + 1 and batch[j] not in unreadable
               and extent(batch[j - 1]) == meta.piece_length
               and total + extent(batch[j]) <= limit):
            total += extent(batch[j])
            j += 1
        return j

    def spanned(pieces: Sequence[int], out: list[Row]) -> bool:
        """Hash ``pieces`` from one read of them all; False (nothing done) if that read
        could not be made."""
        first, last = pieces[0], pieces[-1]
        in_place = trust_fingerprints and fingerprints is not None and all(
            fingerprints[p * FP : (p + 1) * FP] != NO_FINGERPRINT for p in pieces)
        got = reader.span(first, (last - first) * meta.piece_length + extent(last),
                          in_place)
        if got is None:
            return False
        views, give_back = got
        try:
            for p in pieces:
                size = extent(p)
                part = cut(views, (p - first) * meta.piece_length, size)
                try:
                    out.append(one(p, size, part))
                finally:
                    for v in part:
                        v.release()
        finally:
            give_back()
        return True

    def one(p: int, size: int, given: list[memoryview] | None = None) -> Row:
        known = fingerprints[p * FP : (p + 1) * FP] if fingerprints is not None else None
        if known == NO_FINGERPRINT:
            known = None
        if size > STREAM_BYTES:
            return streamed(reader, p, size, known)
        views: Sequence[Buffer] | None = given
        if views is None:
            views = reader.views(p, size, in_place=known is not None and trust_fingerprints)
        if views is None:
            return (p, *fail, 0, None, False)
        fp = None
        if known is not None and trust_fingerprints:
            fp = fingerprint(views, pads(p))
            if fp == known:
                return (p, *good, size, None, True)
            if size < whole(p):  # (its stored bytes alone were read: all of it now)
                return streamed(reader, p, whole(p), None)
        ok1, ok2 = check_piece(
            views, meta.v1_hash(p) if meta.has_v1 else None, meta.v2_piece(p)
        )
        new = None
        stale = known is None or fp is not None  # fp set here means it did not match
        if fingerprints is not None and ok1 is not False and ok2 is not False and stale:
            new = fp if fp is not None else fingerprint(views, pads(p))
        return (p, ok1, ok2, size, new, False)

    def streamed(reader: PreadReader, p: int, size: int, known: bytes | None) -> Row:
        """A piece read in parts: its fingerprint first (when it has one), then, if that
        does not match, its torrent hashes in a second pass, with the fingerprint to
        keep. Never the first pass's: the file may have changed between the two reads
        (another program writing it), and that fingerprint would be of bytes that never
        passed the hashes, which a later recheck would then take for good."""
        stale = known is None
        if known is not None and trust_fingerprints:
            first = PieceCheck(False, None, True, pads(p))
            if not reader.stream(p, size, first.update, in_place=True):
                return (p, *fail, 0, None, False)
            if first.result()[2] == known:
                return (p, *good, size, None, True)
            stale = True
        v2 = meta.v2_piece(p)
        check = PieceCheck(meta.has_v1, v2, fingerprints is not None and stale, pads(p))
        if not reader.stream(p, whole(p), check.update):
            return (p, *fail, 0, None, False)
        d1, d2, new = check.result()
        ok1 = d1 == meta.v1_hash(p) if meta.has_v1 else None
        ok2 = d2 == v2.expected if v2 is not None else None
        keep = fingerprints is not None and ok1 is not False and ok2 is not False
        return (p, ok1, ok2, size, new if keep else None, False)

    def batches() -> Iterator[Sequence[int]]:
        """Batches of pieces: smaller where the page cache does not hold the first (see
        COLD_BATCH_BYTES), as it says just before the batch is asked for."""
        start = 0
        while start < len(todo):
            cold = todo[start] not in unreadable and reader.cold(todo[start])
            end = start + (per_cold if cold else per_batch)
            yield todo[start:end]
            start = end

    def submit(batch: Sequence[int]) -> Future[list[Row]]:
        """The batch on the pool, its readable pieces asked for first; a batch with
        none is done here (nothing to hash: it would only wait its turn on the pool)."""
        wanted = [p for p in batch if p not in unreadable] if unreadable else batch
        if not wanted:
            done_now: Future[list[Row]] = Future()
            done_now.set_result(run(batch))
            return done_now
        reader.prefetch(wanted, extent)
        return pool.submit(run, batch)

    pending: list[tuple[Future[list[Row]], int]] = []  # (batch, its bytes)
    ahead = 0  # bytes of the batches pending
    it = batches()
    reader.start(pool.workers)
    try:
        while True:
            while len(pending) < window or ahead < READ_AHEAD_BYTES:
                batch = next(it, None)
                if batch is None:
                    break
                size = sum(map(extent, batch))
                pending.append((submit(batch), size))
                ahead += size
            if not pending:
                break
            fut, size = pending[0]
            rows = fut.result()
            pending.pop(0)
            ahead -= size
            for p, ok1, ok2, size, new, hit in rows:
                hashed += size
                if ok1 is False and failed_v1 is not None:
                    failed_v1.append(p)
                if ok2 is False and failed_v2 is not None:
                    failed_v2.append(p)
                have[p] = ok1 is not False and ok2 is not False
                if new is not None:
                    new_fps[p] = new
                hits += hit
                done += 1
            if progress is not None:
                progress(done, len(todo))
    finally:
        if pending:  # failed: let the batches still running end before what they read goes
            for f, _ in pending:
                f.cancel()
            futures_wait([f for f, _ in pending])
        reader.finish()
    return VerifyResult(meta.num_pieces, failed_v1, failed_v2, have, hashed, hits, new_fps)
