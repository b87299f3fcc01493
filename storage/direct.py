"""The direct backend: payload files read and written with O_DIRECT (see
:class:`DirectStorage`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence

from .errors import PathEscape, PiecedError, StorageIOError
from .files import FileStorage, FileVanished
from .hashing import Buffer, sub_views
from .layout import Segment
from .sharedpool import SharedPool

MAX_BOUNCES = 8  # a file system's: 32 MiB at most (CHUNK each), whatever the number of threads
_bounces: dict[int, SharedPool[memoryview]] = {}  # by device (st_dev)
_bounces_lock = threading.Lock()


def _bounces_of(device: int) -> SharedPool[memoryview]:
    """The bounce buffers of one file system. Shared by all of them, the buffers were
    every one held by calls stuck on a disk that hangs (a dozen clients writing to it),
    and a write to a healthy disk waited for one as long."""
    with _bounces_lock:
        pool = _bounces.get(device)
        if pool is None:
            pool = _bounces[device] = SharedPool(MAX_BOUNCES)
        return pool


class DirectStorage(FileStorage):
    """The O_DIRECT backend: payload files read and written past the page cache.

    For libraries larger than memory, whose pages would otherwise push everything else
    out of the page cache: the daemon's own cache (``cache_bytes``) is then the only one.
    O_DIRECT wants file offsets, lengths and buffers aligned to the device's blocks
    (ALIGN covers 512-byte and 4 KiB devices). Each call moves at most CHUNK bytes
    through a page-aligned bounce buffer (at most MAX_BOUNCES of them a file system,
    shared by the threads); a block that starts or ends
    inside a page (files of a multi-file torrent rarely start on a page) reads that page
    first and writes it back whole (read-modify-write), under the file's lock, since the
    neighbouring block shares the page. A file's last page is written whole too, then
    the file cut back to its length. Blocks handed over one by one are gathered into
    their piece first (``gathers_writes``): a 16 KiB O_DIRECT write waits for the device.
    A read into a page-aligned buffer at a block-aligned offset (a recheck's) skips the
    bounce buffer; a recheck reads ahead of its hashing itself (``read_ahead``).
    """

    name = "direct"
    page_cached = False
    read_ahead = True  # a recheck reads ahead itself: the kernel's read-ahead does not apply
    gathers_writes = True  # a 16 KiB O_DIRECT write waits for the device: write pieces
    ALIGN = 4096
    CHUNK = 4 * 1024 * 1024  # the most one O_DIRECT call moves

    def _setup(self) -> None:
        self._file_locks: dict[int, threading.Lock] = {}

    def open_file(self, index: int, writable: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        try:
            return self._open_payload(index, flags | os.O_DIRECT, writable)
        except StorageIOError as exc:
            if exc.errno == errno.EINVAL:
                st = self.root.stat(self.parts(index))
                if st is not None and not stat.S_ISREG(st.st_mode):  # (O_DIRECT on a FIFO)
                    raise PathEscape(f"{self.file_path(index)} is not a regular file: "
                                     "refusing to use it") from None
                raise StorageIOError(
                    f"{self.file_path(index)}: its file system does not support O_DIRECT "
                    "(the direct backend needs one that does, such as ext4 or xfs)",
                    errno=errno.EINVAL) from None
            raise

    def after_crash(self, floor: Callable[[int], int] = lambda index: 0) -> None:
        """A crash between a file's last page written whole and the cut back to its
        length leaves the file up to a page longer than it is, for good (a piece found
        good is never written again): it is cut back here, by the zeros that page put
        past the end, no further. What the file held past its length before that write
        (its page read, then written back) is not of our making: a file only read
        (another program's, seeded), or one another torrent (``floor(index)``: the
        longest length another gives it) knows as longer, keeps it."""
        A = self.ALIGN
        lengths = self.meta.files.lengths
        for index in self.stored_files():
            length = lengths[index]
            parts = self.parts(index)
            st = self.root.stat(parts) if length % A else None
            if st is None or not stat.S_ISREG(st.st_mode) or not (
                    length < st.st_size <= length + A - length % A):
                continue
            try:
                fd = self.root.open(parts, os.O_RDWR)
                try:
                    tail = os.pread(fd, st.st_size - length, length)
                    keep = max(length + len(tail.rstrip(b"\0")), floor(index))
                    if keep < st.st_size:
                        os.ftruncate(fd, keep)
                        if index in self.start_stamps:  # (as it is now, cut)
                            st = os.fstat(fd)
                            self.take_stamp(index, [st.st_size, st.st_mtime_ns,
                                                    st.st_ctime_ns, st.st_ino])
                finally:
                    os.close(fd)
            except (OSError, PiecedError):
                pass  # (left longer: its pieces are as good; the next write cuts it too)

    def _bounce(self, fd: int, size: int) -> contextlib.AbstractContextManager[memoryview]:
        """A page-aligned buffer (an anonymous map) of at least ``size`` bytes, for the
        ``with`` block: one of those shared by the I/O of ``fd``'s file system, grown if
        it is too small."""
        def fit(buf: memoryview | None) -> memoryview:
            if buf is not None and buf.nbytes >= size:
                return buf
            cap = max(size, 1024 * 1024)
            return memoryview(mmap.mmap(-1, cap + -cap % self.ALIGN))

        return _bounces_of(os.fstat(fd).st_dev).take(fit)

    def _lock_of(self, index: int) -> threading.Lock:
        with self._lock:
            return self._file_locks.setdefault(index, threading.Lock())

    def _chunks(self, seg: Segment) -> list[Segment]:
        """``seg`` cut at multiples of CHUNK in the file: a thread's bounce buffer stays
        at CHUNK (+ a page) whatever the piece length."""
        out = []
        off, end = seg.file_offset, seg.file_offset + seg.length
        while off < end:
            cut = min(end, (off // self.CHUNK + 1) * self.CHUNK)
            out.append(seg._replace(file_offset=off, length=cut - off,
                                    buf_offset=seg.buf_offset + off - seg.file_offset))
            off = cut
        return out

    def _pwrite_segment(self, seg: Segment, views: Sequence[Buffer]) -> None:
        if seg.length <= self.CHUNK:
            self._pwrite_chunk(seg, views)
            return
        for part in self._chunks(seg):
            rel = part.file_offset - seg.file_offset
            self._pwrite_chunk(part, sub_views(views, rel, rel + part.length))

    def _pwrite_chunk(self, seg: Segment, views: Sequence[Buffer]) -> None:
        index = seg.file_index
        length = self.meta.files.lengths[index]
        A = self.ALIGN
        start = seg.file_offset - seg.file_offset % A
        end = seg.file_offset + seg.length
        end += -end % A
        partial = seg.file_offset != start or (end != seg.file_offset + seg.length)
        entry = self.handles.get(self, index, True)
        try:
            fd = entry[0]
            if index not in self._sized:
                self._size_file(fd, index)
            else:
                self._check_linked(fd, index)
            lock = self._lock_of(index) if partial else None
            with self._bounce(fd, end - start) as bounce:  # (taken before the file's lock)
                buf = bounce[: end - start]
                if lock is not None:
                    lock.acquire()
                try:
                    if partial:
                        # the pages the block shares with its neighbours, as they are on disk
                        self._read_aligned(fd, buf[:A], start)
                        if end - A > start:
                            self._read_aligned(fd, buf[-A:], end - A)
                    pos = seg.file_offset - start
                    for v in views:
                        mv = memoryview(v).cast("B")
                        buf[pos : pos + mv.nbytes] = mv
                        pos += mv.nbytes
                    # (a file another torrent shares may be longer: its tail is that one's)
                    before = os.fstat(fd).st_size if end > length else 0
                    done = 0
                    while done < end - start:
                        done += os.pwritev(fd, [buf[done:]], start + done)
                    if end > length:  # the last page went whole: the file is longer than it is
                        os.ftruncate(fd, max(length, before))
                finally:
                    if lock is not None:
                        lock.release()
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"write {self.file_path(index)}") from None
        finally:
            self.handles.put(entry)
        self._mark_dirty(index)

    def _read_aligned(self, fd: int, out: memoryview, offset: int) -> int:
        """Fill ``out`` from ``offset``; past the end of the file, zeros.

        A read that stops short of a block boundary met the end of the file: the rest
        is zeros, and no read is made at that unaligned offset. (One would be refused
        with EINVAL, not answered with 0, while a write of the file's last block has
        the file a block long for a moment.)"""
        done = 0
        while done < out.nbytes:
            n = os.preadv(fd, [out[done:]], offset + done)
            done += n
            if n == 0 or n % self.ALIGN:
                out[done:] = bytes(out.nbytes - done)
                break
        return done

    def _pread_segment(self, seg: Segment, dst: memoryview, nowait: int) -> bool:
        if nowait:
            return False  # nothing is in the page cache: the daemon's cache is the only one
        for part in self._chunks(seg):
            rel = part.file_offset - seg.file_offset
            self._pread_chunk(part, dst[rel : rel + part.length])
        return True

    def _pread_chunk(self, seg: Segment, dst: memoryview) -> None:
        A = self.ALIGN
        start = seg.file_offset - seg.file_offset % A
        end = seg.file_offset + seg.length
        end += -end % A
        whole = self.short_is_cut(seg.file_index)  # before the read: see _check_linked
        with self._fd(seg.file_index, False) as fd:
            try:
                if start == seg.file_offset and _aligned(dst, A):
                    # Straight into the caller's buffer (a recheck's, page-aligned); only
                    # a tail shorter than a block (the file's end) goes through the bounce.
                    body = seg.length - seg.length % A
                    got = self._read_aligned(fd, dst[:body], start)
                    if body < seg.length and got == body:
                        with self._bounce(fd, A) as bounce:
                            got += self._read_aligned(fd, bounce[:A], start + body)
                            dst[body:] = bounce[: seg.length - body]
                    elif body < seg.length:  # the file ends before: zeros, as in the body
                        dst[body:] = bytes(seg.length - body)
                    self._check_read(seg, start + got, whole)
                    return
                with self._bounce(fd, end - start) as bounce:
                    got = self._read_aligned(fd, bounce[: end - start], start)
                    if start + got >= seg.file_offset + seg.length or not whole:
                        off = seg.file_offset - start
                        dst[:] = bounce[off : off + seg.length]
            except OSError as exc:
                raise StorageIOError.wrap(
                    exc, f"read {self.file_path(seg.file_index)}") from None
            self._check_read(seg, start + got, whole)

    def _check_read(self, seg: Segment, end: int, whole: bool) -> None:
        """A read that stopped short of the segment, in a file the daemon had given its
        length before the read began: cut short since its check (zeros would pass for
        its bytes)."""
        if end < seg.file_offset + seg.length and whole:
            raise self._vanished(seg.file_index, f"{self.file_path(seg.file_index)}: "
                                 "truncated behind pieced's back", gone=False)

    def advise(self, segments: Sequence[Segment]) -> list[FileVanished]:
        return []  # read-ahead fills the page cache, which this backend does not use


def _aligned(buf: memoryview, align: int) -> bool:
    """Whether ``buf`` starts at a multiple of ``align`` in memory (False if read-only)."""
    if buf.readonly or not buf.c_contiguous:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(buf)) % align == 0
