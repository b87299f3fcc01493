"""Files on disk: the handle pool and the posix, mmap and disabled backends.

A backend knows files, not pieces: it is handed :class:`Segment` lists by the
layout and buffers by the caller, and moves bytes. Writes are vectored
(``os.pwritev`` of the caller's own buffers, so a ring buffer's two slices reach the
kernel without a copy); reads land in the caller's buffer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import signal
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import OutOfRange, PathEscape, PiecedError, StorageIOError
from .hashing import Buffer, sub_views
from .layout import Segment
from .metainfo import Metainfo
from .paths import Beneath

BACKENDS = ("posix", "mmap", "direct", "uring", "disabled")
_IOV_MAX = 1024


class FileVanished(StorageIOError):
    """A payload file was deleted, or cut short, behind the daemon's back (ENOENT).

    ``written``: this process had written the file, so bytes of pieces not yet
    verified may have gone with it (their hash state must start over).
    """

    def __init__(self, message: str, file_index: int, written: bool) -> None:
        super().__init__(message, errno=errno.ENOENT)
        self.file_index = file_index
        self.written = written


class HandlePool:
    """A bounded LRU of open file descriptors shared by every torrent.

    A handle in use is never closed under its user: eviction skips busy entries, so
    the pool may briefly exceed its bound rather than close a descriptor another
    thread is writing through (which could then land in a reused descriptor).
    """

    def __init__(self, max_open: int = 512) -> None:
        self.max_open = max_open
        self._lock = threading.Lock()
        self._fds: OrderedDict[tuple[object, int, bool], list[int]] = OrderedDict()  # [fd, users]

    def get(self, owner: FileStorage, index: int, writable: bool) -> list[int]:
        """An open handle as ``[fd, users]``, counted as in use until :meth:`put`; a
        missing one is opened with ``owner.open_file``.

        A plain call pair rather than a context manager: this runs once per block.
        """
        key = (owner, index, writable)
        with self._lock:
            entry = self._fds.get(key)
            if entry is not None:
                entry[1] += 1
                self._fds.move_to_end(key)
                return entry
        fd = owner.open_file(index, writable)
        with self._lock:
            entry = self._fds.get(key)
            if entry is None:
                entry = self._fds[key] = [fd, 1]
                fd = -1
            else:
                entry[1] += 1
            self._evict_locked()
        if fd >= 0:  # lost a race to open the same file: keep the other one
            os.close(fd)
        return entry

    def put(self, entry: list[int]) -> None:
        with self._lock:
            entry[1] -= 1
            if len(entry) > 2 and entry[1] == 0:  # forgotten while in use: close it now
                os.close(entry[0])
            if len(self._fds) > self.max_open:
                self._evict_locked()

    def _evict_locked(self) -> None:
        excess = len(self._fds) - self.max_open
        if excess <= 0:
            return
        for key in [k for k, e in self._fds.items() if e[1] == 0][:excess]:
            os.close(self._fds.pop(key)[0])

    def close(self, owner: object) -> None:
        """Close every handle of ``owner`` (a torrent being moved or dropped): idle ones
        now, busy ones when their user puts them back."""
        with self._lock:
            for key in [k for k in self._fds if k[0] is owner]:
                entry = self._fds.pop(key)
                if entry[1] == 0:
                    os.close(entry[0])
                else:
                    entry.append(1)  # the mark ``put`` looks for

    def forget(self, owner: object, index: int) -> None:
        """Drop the handles of one file (it vanished): idle ones now, busy ones at ``put``."""
        with self._lock:
            for writable in (False, True):
                entry = self._fds.pop((owner, index, writable), None)
                if entry is None:
                    continue
                if entry[1] == 0:
                    os.close(entry[0])
                else:
                    entry.append(1)  # the mark ``put`` looks for

    @property
    def open_count(self) -> int:
        return len(self._fds)


class FileStorage:
    """The posix backend: pread/pwritev through the shared handle pool."""

    name = "posix"
    page_cached = True  # what it writes stays in the page cache for a while (read_resident)
    gathers_writes = False  # blocks given straight (the ring) are buffered to a piece first

    def __init__(
        self,
        meta: Metainfo,
        save_path: Path,
        handles: HandlePool,
        preallocate: bool = False,
        allow_hard_links: bool = False,
    ) -> None:
        self.meta = meta
        self.save_path = save_path
        self.handles = handles
        self.preallocate = preallocate
        self.renames: dict[int, tuple[str, ...]] = {}
        self.root = Beneath(save_path, allow_hard_links)  # every payload path is resolved beneath it
        self._sized: set[int] = set()
        self._dirty: set[int] = set()
        self._lock = threading.Lock()
        self._nowait = os.RWF_NOWAIT  # 0 once the file system has said it has no such flag

    # -- paths -------------------------------------------------------------
    def parts(self, index: int) -> tuple[str, ...]:
        """The file's path below the save path, after any rename."""
        return self.renames.get(index, self.meta.files[index].path)

    def file_path(self, index: int) -> Path:
        """For messages and stamps only: opening goes through ``root`` (paths.py)."""
        return self.save_path.joinpath(*self.parts(index))

    def open_file(self, index: int, writable: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        return self.root.open(self.parts(index), flags, create_dirs=writable)

    def stored_files(self) -> Iterator[int]:
        return (i for i, f in enumerate(self.meta.files) if f.stored)

    def create_empty_files(self) -> None:
        """Zero-length files have no piece to write them, so they are made up front."""
        for index in self.stored_files():
            if self.meta.files[index].length == 0:
                os.close(self.root.open(self.parts(index), os.O_WRONLY | os.O_CREAT,
                                        create_dirs=True))

    def display_path(self, index: int) -> str:
        """The file's current path relative to the save path (after any rename)."""
        return "/".join(self.parts(index))

    # -- I/O -----------------------------------------------------------------
    @contextlib.contextmanager
    def _fd(self, index: int, writable: bool) -> Iterator[int]:
        try:
            entry = self.handles.get(self, index, writable)
        except StorageIOError as exc:
            if exc.errno == errno.ENOENT and not writable and index in self._sized:
                raise self._vanished(index, exc.message) from None  # we wrote it: deleted
            raise
        try:
            if writable and index not in self._sized:
                self._size_file(entry[0], index)
            else:
                self._check_linked(entry[0], index)
            yield entry[0]
        finally:
            self.handles.put(entry)

    def _check_linked(self, fd: int, index: int) -> None:
        """Raise :class:`FileVanished` if ``fd`` no longer is the payload file as written:
        unlinked (its folder removed too), or shorter than the length we gave it."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"stat {self.file_path(index)}") from None
        if st.st_nlink == 0 or (
            index in self._sized and st.st_size < self.meta.files[index].length
        ):
            raise self._vanished(
                index, f"{self.file_path(index)}: deleted or truncated behind pieced's back"
            )

    def known_written(self, indices: Iterable[int]) -> None:
        """Files an earlier run of the daemon wrote and sized (they hold verified pieces):
        from now on their disappearance is noticed, as for files written in this run."""
        with self._lock:
            self._sized.update(indices)

    def _vanished(self, index: int, message: str) -> FileVanished:
        """Forget what we knew of a vanished file: a write creates it anew."""
        self.handles.forget(self, index)
        with self._lock:
            written = index in self._sized
            self._sized.discard(index)
            self._dirty.discard(index)
        return FileVanished(message, index, written)

    def _size_file(self, fd: int, index: int) -> None:
        """Give a file its full length on first write: sparse, or allocated if asked."""
        length = self.meta.files[index].length
        try:
            if self.preallocate and length:
                os.posix_fallocate(fd, 0, length)
            elif os.fstat(fd).st_size < length:
                os.ftruncate(fd, length)
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"size {self.file_path(index)}") from None
        with self._lock:
            self._sized.add(index)

    def writev(self, segments: Sequence[Segment], bufs: Sequence[Buffer]) -> int:
        """Write the logical concatenation of ``bufs`` to ``segments``; bytes written."""
        written = 0
        single = len(segments) == 1
        for seg in segments:
            if not seg.stored:
                continue
            # One segment covering all of bufs (the usual block): hand them over as they are.
            views = list(bufs) if single else sub_views(bufs, seg.buf_offset, seg.buf_offset + seg.length)
            self._pwrite_segment(seg, views)
            written += seg.length
        return written

    def _pwrite_segment(self, seg: Segment, views: Sequence[Buffer]) -> None:
        index = seg.file_index
        entry = self.handles.get(self, index, True)
        try:
            if index not in self._sized:
                self._size_file(entry[0], index)
            else:
                self._check_linked(entry[0], index)
            n = os.pwritev(entry[0], views[:_IOV_MAX], seg.file_offset)
            if n != seg.length:  # a short write: finish it the slow way
                self._pwritev_all(entry[0], [memoryview(v) for v in views], seg.file_offset, index, n)
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"write {self.file_path(index)}") from None
        finally:
            self.handles.put(entry)
        if index not in self._dirty:
            with self._lock:
                self._dirty.add(index)

    def _pwritev_all(
        self, fd: int, views: list[memoryview], offset: int, index: int, done: int = 0
    ) -> None:
        """Finish a vectored write of which ``done`` bytes are already written."""
        n = done
        while True:
            offset += n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]
            if not views:
                return
            try:
                n = os.pwritev(fd, views[:_IOV_MAX], offset)
            except OSError as exc:
                raise StorageIOError.wrap(exc, f"write {self.file_path(index)}") from None

    def readinto(self, segments: Sequence[Segment], out: memoryview) -> None:
        """Fill ``out`` from ``segments``; pad bytes and holes past a file's end read as zeros."""
        self._pread(segments, out, 0)

    def read_resident(self, segments: Sequence[Segment], out: memoryview) -> bool:
        """Fill ``out`` only from the page cache (preadv with RWF_NOWAIT): False, and
        nothing read from the disk, when part of it is not there any more."""
        return self._pread(segments, out, self._nowait)

    def _pread(self, segments: Sequence[Segment], out: memoryview, nowait: int) -> bool:
        for seg in segments:
            dst = out[seg.buf_offset : seg.buf_offset + seg.length]
            if not seg.stored:
                dst[:] = bytes(seg.length)
            elif not self._pread_segment(seg, dst, nowait):
                return False
        return True

    def _pread_segment(self, seg: Segment, dst: memoryview, nowait: int) -> bool:
        resident = nowait != 0
        with self._fd(seg.file_index, False) as fd:
            done = 0
            while done < seg.length:
                try:
                    n = os.preadv(fd, [dst[done:]], seg.file_offset + done, nowait)
                except BlockingIOError:
                    return False
                except OSError as exc:
                    if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL) and nowait:
                        # A file system without RWF_NOWAIT (tmpfs, some FUSE): its
                        # reads are what they are; read as usual.
                        self._nowait = nowait = 0
                        continue
                    raise StorageIOError.wrap(
                        exc, f"read {self.file_path(seg.file_index)}"
                    ) from None
                if n == 0:
                    if resident:
                        return False  # cut short behind our back: a plain read says so
                    dst[done:] = bytes(seg.length - done)
                    break
                done += n
        return True

    def advise(self, segments: Sequence[Segment]) -> None:
        """Start reading ``segments`` into the page cache (POSIX_FADV_WILLNEED): a
        recheck asks for the pieces it hashes next. Best effort: errors are the read's
        to report."""
        for seg in segments:
            if not seg.stored or not seg.length:
                continue
            try:
                with self._fd(seg.file_index, False) as fd:
                    os.posix_fadvise(fd, seg.file_offset, seg.length, os.POSIX_FADV_WILLNEED)
            except (OSError, PiecedError):
                continue

    def sync(self, indices: Sequence[int] | None = None) -> int:
        """fdatasync the files written since their last sync (all, or the given ones);
        returns how many it synced."""
        with self._lock:
            todo = sorted(self._dirty if indices is None else self._dirty & set(indices))
            self._dirty.difference_update(todo)
        for index in todo:
            try:
                self._datasync(index)
            except OSError as exc:
                with self._lock:
                    self._dirty.add(index)
                raise StorageIOError.wrap(exc, f"sync {self.file_path(index)}") from None
        return len(todo)

    def _datasync(self, index: int) -> None:
        with self._fd(index, True) as fd:
            os.fdatasync(fd)

    # -- life cycle -------------------------------------------------------------
    def close_handles(self) -> None:
        """Drop the open payload files (they are about to move, or be renamed)."""
        self.handles.close(self)

    def close(self) -> None:
        self.close_handles()
        self.root.close()

    def delete_files(self) -> None:
        self.close_handles()
        for index in self.stored_files():
            with contextlib.suppress(FileNotFoundError, PathEscape):
                self.root.unlink(self.parts(index))
        self._prune(self.root)

    def _prune(self, root: Beneath) -> None:
        """Remove the torrent's now-empty folders, deepest first, never the save path."""
        dirs = {p[:i] for p in map(self.parts, self.stored_files()) for i in range(1, len(p))}
        for d in sorted(dirs, key=len, reverse=True):
            root.rmdir(d)

    def move(self, new_path: Path) -> None:
        """Move every existing payload file under ``new_path`` (link, or copy across
        devices), never replacing a file there; undone if any step fails."""
        self.close_handles()
        new_root = Beneath(new_path, self.root.allow_hard_links)
        moved: list[tuple[str, ...]] = []
        try:
            for index in self.stored_files():
                parts = self.parts(index)
                if not self.root.exists(parts):
                    continue
                if new_root.exists(parts):
                    raise StorageIOError(f"move: {new_path.joinpath(*parts)} already exists",
                                         errno=errno.EEXIST)
                self.root.move(parts, new_root, parts)
                moved.append(parts)
        except (OSError, PiecedError) as exc:
            for parts in reversed(moved):
                with contextlib.suppress(OSError, PiecedError):
                    new_root.move(parts, self.root, parts)
            new_root.close()
            if isinstance(exc, OSError):
                raise StorageIOError.wrap(exc, "move") from None
            raise
        self._prune(self.root)
        self.root.close()
        self.root = new_root
        self.save_path = new_path

    def rename(self, index: int, new_name: str) -> None:
        """Rename one file; ``new_name`` is a relative path that must stay inside the save path."""
        if not 0 <= index < len(self.meta.files) or not self.meta.files[index].stored:
            raise OutOfRange(f"file index {index} is not a payload file")
        parts = tuple(new_name.split("/"))
        if new_name.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
            raise PathEscape(f"new name {new_name!r} must be a relative path inside the save path")
        if parts == self.parts(index):
            return
        taken = any(self.parts(i) == parts for i in self.stored_files() if i != index)
        if taken or self.root.exists(parts):
            dst = self.save_path.joinpath(*parts)
            raise StorageIOError(f"rename: {dst} already exists", errno=errno.EEXIST)
        self.close_handles()
        src = self.parts(index)
        if self.root.exists(src):
            try:
                self.root.move(src, self.root, parts)
            except OSError as exc:
                raise StorageIOError.wrap(exc, "rename") from None
        self.renames[index] = parts


# Mapped files and the leases that keep them safe to map -------------------------------
_leasing: weakref.WeakSet[MmapStorage] = weakref.WeakSet()
_leasing_lock = threading.Lock()
_watching = False


def watch_leases() -> bool:
    """Install the handler of lease breaks (SIGIO, whose default action would end the
    process); only the main thread can. True once it is installed: before that the
    mmap backend maps nothing and works as posix does."""
    global _watching
    if not _watching and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, _on_lease_break)
        _watching = True
    return _watching


def _on_lease_break(signum: int, frame: object) -> None:
    # Runs between two bytecodes of the main thread, which may hold a storage's lock:
    # the release runs on a thread of its own.
    threading.Thread(target=release_broken_leases, name="lease-break", daemon=True).start()


def release_broken_leases() -> int:
    """Unmap every file another process has asked for; how many were unmapped."""
    with _leasing_lock:
        storages = list(_leasing)
    return sum(s.release_broken() for s in storages)


class MmapStorage(FileStorage):
    """The mmap backend: payload files mapped shared, written and read by memcpy.

    A mapped file truncated by another process would kill the daemon: the next access
    past the new end faults (SIGBUS), and Python cannot recover from that. So a file is
    mapped only while the daemon holds a write lease on it (``F_SETLEASE``): another
    process's open or truncate of the file first waits while the kernel signals the
    daemon, which unmaps the file and gives the lease back, within milliseconds. The
    file is then read and written with pread/pwritev, as by the posix backend, until
    the lease can be taken again (once no one else has the file open). Files the
    daemon cannot lease (open elsewhere, owned by another user, on a file system
    without leases) are never mapped. Mappings cover the file's full length (sparse),
    so a write never faults past its end.
    """

    name = "mmap"
    RETRY_SECONDS = 1.0  # after a lease is broken or refused, how long until the next try

    def __init__(
        self,
        meta: Metainfo,
        save_path: Path,
        handles: HandlePool,
        preallocate: bool = False,
        allow_hard_links: bool = False,
    ) -> None:
        super().__init__(meta, save_path, handles, preallocate, allow_hard_links)
        self._maps: dict[int, tuple[int, mmap.mmap]] = {}  # file -> (leased fd, map)
        self._retry: dict[int, float] = {}  # file -> when its lease may be tried again
        # Held while a map is used or dropped (the copy runs under the GIL anyway);
        # reentrant because a vanished file is unmapped from inside its own write.
        self._map_lock = threading.RLock()
        # One file mapped at a time: a second open of the same file would break the
        # first one's fresh lease.
        self._open_lock = threading.Lock()
        with _leasing_lock:
            _leasing.add(self)

    def _map(self, index: int, writing: bool) -> None:
        """Lease and map a file if it can be; nothing happens otherwise. A read maps
        only a file the daemon has sized: it never creates or extends one."""
        if not _watching or not self.meta.files[index].length or not (writing or index in self._sized):
            return
        with self._open_lock:
            if index in self._maps or self._retry.get(index, 0.0) > time.monotonic():
                return
            fd = self.open_file(index, True)
            try:
                if index not in self._sized:
                    self._size_file(fd, index)
                else:
                    self._check_linked(fd, index)
                if not self._lease(fd, index):
                    os.close(fd)
                    self._retry[index] = time.monotonic() + self.RETRY_SECONDS
                    return
                m = mmap.mmap(fd, self.meta.files[index].length)
            except BaseException:
                os.close(fd)
                raise
            with self._map_lock:
                self._maps[index] = (fd, m)
        # A break that came before the map was listed found nothing to release.
        self.release_broken()

    def _lease(self, fd: int, index: int) -> bool:
        for attempt in (0, 1):
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
                return True
            except OSError as exc:
                if exc.errno != errno.EAGAIN or attempt:
                    return False
                self.handles.forget(self, index)  # our own idle handles count as opens
        return False

    def release_broken(self) -> int:
        """Unmap the files whose lease another process is breaking."""
        released = 0
        with self._map_lock:
            for index, (fd, _) in list(self._maps.items()):
                try:
                    kind = fcntl.fcntl(fd, fcntl.F_GETLEASE)
                except OSError:
                    kind = -1
                if kind != fcntl.F_WRLCK:
                    self._unmap(index)
                    released += 1
        return released

    def _unmap(self, index: int, retry: bool = True) -> None:
        """Drop a file's map and lease; the caller holds ``_map_lock``. Dirty pages stay
        in the page cache, synced by the next fdatasync like any write."""
        fd, m = self._maps.pop(index)
        m.close()
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        if retry:
            self._retry[index] = time.monotonic() + self.RETRY_SECONDS

    def _pwrite_segment(self, seg: Segment, views: Sequence[Buffer]) -> None:
        index = seg.file_index
        if index not in self._maps:
            self._map(index, True)
        with self._map_lock:
            entry = self._maps.get(index)
            if entry is not None:
                fd, m = entry
                self._check_linked(fd, index)
                pos = seg.file_offset
                for v in views:
                    n = memoryview(v).nbytes
                    m[pos : pos + n] = v
                    pos += n
                if index not in self._dirty:
                    with self._lock:
                        self._dirty.add(index)
                return
        super()._pwrite_segment(seg, views)

    def _pread_segment(self, seg: Segment, dst: memoryview, nowait: int) -> bool:
        index = seg.file_index
        if index not in self._maps:
            self._map(index, False)
        with self._map_lock:
            entry = self._maps.get(index)
            if entry is not None:
                # Mapped pages are the page cache: a read from them is what any mmap read is.
                self._check_linked(entry[0], index)
                dst[:] = entry[1][seg.file_offset : seg.file_offset + seg.length]
                return True
        return super()._pread_segment(seg, dst, nowait)

    def advise(self, segments: Sequence[Segment]) -> None:
        # Through the map where there is one: a second open would break its lease.
        rest = []
        for seg in segments:
            if not seg.stored or not seg.length:
                continue
            with self._map_lock:
                entry = self._maps.get(seg.file_index)
                if entry is not None:
                    start = seg.file_offset - seg.file_offset % mmap.PAGESIZE
                    entry[1].madvise(mmap.MADV_WILLNEED, start,
                                     seg.file_offset + seg.length - start)
                    continue
            rest.append(seg)
        super().advise(rest)

    def _datasync(self, index: int) -> None:
        with self._map_lock:
            entry = self._maps.get(index)
            fd = os.dup(entry[0]) if entry is not None else -1  # a dup keeps the lease
        if fd < 0:
            super()._datasync(index)
            return
        try:
            os.fdatasync(fd)  # writes back the map's dirty pages, as msync would
        finally:
            os.close(fd)

    def _vanished(self, index: int, message: str) -> FileVanished:
        with self._map_lock:
            if index in self._maps:
                self._unmap(index, retry=False)
        return super()._vanished(index, message)

    def close_handles(self) -> None:
        with self._map_lock:
            for index in list(self._maps):
                self._unmap(index, retry=False)
            self._retry.clear()
        super().close_handles()


class DirectStorage(FileStorage):
    """The O_DIRECT backend: payload files read and written past the page cache.

    For libraries larger than memory, whose pages would otherwise push everything else
    out of the page cache: the daemon's own cache (``cache_bytes``) is then the only one.
    O_DIRECT wants file offsets, lengths and buffers aligned to the device's blocks
    (ALIGN covers 512-byte and 4 KiB devices). Each call moves at most CHUNK bytes
    through a page-aligned bounce buffer of the thread's own; a block that starts or ends
    inside a page (files of a multi-file torrent rarely start on a page) reads that page
    first and writes it back whole (read-modify-write), under the file's lock, since the
    neighbouring block shares the page. A file's last page is written whole too, then
    the file cut back to its length. Blocks handed over one by one are gathered into
    their piece first (``gathers_writes``): a 16 KiB O_DIRECT write waits for the device.
    """

    name = "direct"
    page_cached = False
    gathers_writes = True  # a 16 KiB O_DIRECT write waits for the device: write pieces
    ALIGN = 4096
    CHUNK = 4 * 1024 * 1024  # the most one O_DIRECT call moves

    def __init__(
        self,
        meta: Metainfo,
        save_path: Path,
        handles: HandlePool,
        preallocate: bool = False,
        allow_hard_links: bool = False,
    ) -> None:
        super().__init__(meta, save_path, handles, preallocate, allow_hard_links)
        self._file_locks: dict[int, threading.Lock] = {}
        self._local = threading.local()

    def open_file(self, index: int, writable: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        try:
            return self.root.open(self.parts(index), flags | os.O_DIRECT, create_dirs=writable)
        except StorageIOError as exc:
            if exc.errno == errno.EINVAL:
                raise StorageIOError(
                    f"{self.file_path(index)}: its file system does not support O_DIRECT "
                    "(the direct backend needs one that does, such as ext4 or xfs)",
                    errno=errno.EINVAL) from None
            raise

    def _bounce(self, size: int) -> memoryview:
        """The thread's page-aligned buffer (an anonymous map), grown as needed."""
        buf: memoryview | None = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < size:
            cap = max(size, 1024 * 1024)
            cap += -cap % self.ALIGN
            buf = self._local.buf = memoryview(mmap.mmap(-1, cap))
        return buf

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
        length = self.meta.files[index].length
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
            if lock is not None:
                lock.acquire()
            try:
                buf = self._bounce(end - start)[: end - start]
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
                done = 0
                while done < end - start:
                    done += os.pwritev(fd, [buf[done:]], start + done)
                if end > length:  # the last page went whole: the file is longer than it is
                    os.ftruncate(fd, length)
            finally:
                if lock is not None:
                    lock.release()
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"write {self.file_path(index)}") from None
        finally:
            self.handles.put(entry)
        if index not in self._dirty:
            with self._lock:
                self._dirty.add(index)

    @staticmethod
    def _read_aligned(fd: int, out: memoryview, offset: int) -> None:
        """Fill ``out`` from ``offset``; past the end of the file, zeros."""
        done = 0
        while done < out.nbytes:
            n = os.preadv(fd, [out[done:]], offset + done)
            if n == 0:
                out[done:] = bytes(out.nbytes - done)
                return
            done += n

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
        with self._fd(seg.file_index, False) as fd:
            buf = self._bounce(end - start)[: end - start]
            try:
                self._read_aligned(fd, buf, start)
            except OSError as exc:
                raise StorageIOError.wrap(
                    exc, f"read {self.file_path(seg.file_index)}") from None
            off = seg.file_offset - start
            dst[:] = buf[off : off + seg.length]

    def advise(self, segments: Sequence[Segment]) -> None:
        return None  # read-ahead fills the page cache, which this backend does not use


# io_uring ------------------------------------------------------------------------------
_rings = threading.local()  # one ring per thread, shared by every torrent it works for


def check_uring() -> None:
    """Raise StorageIOError, saying why, where io_uring cannot be used (an old kernel, a
    seccomp filter, io_uring_disabled, the liburing package missing)."""
    try:
        ring = _thread_ring()
        results = ring.run([("nop", -1, None, 0)])
    except (ImportError, OSError) as exc:
        raise StorageIOError(f"io_uring is not available here ({exc}): choose another "
                             "backend, such as posix", errno=getattr(exc, "errno", None)
                             or errno.ENOSYS) from None
    if results[0] < 0:
        raise StorageIOError(f"io_uring refused a no-op ({os.strerror(-results[0])}): choose "
                             "another backend, such as posix", errno=-results[0])


class _Ring:
    """One thread's io_uring: a list of operations in, their results out (negative
    errno on failure), submitted together and waited on together."""

    DEPTH = 64

    def __init__(self) -> None:
        import liburing

        self.lib = liburing
        self.ring = liburing.Ring()
        self.cqe = liburing.Cqe()
        liburing.io_uring_queue_init(self.DEPTH, self.ring)

    def run(self, ops: Sequence[tuple[str, int, Any, int]]) -> list[int]:
        """``ops``: ("readv" | "writev" | "nop", fd, Iovec, offset)."""
        lib, ring, cqe = self.lib, self.ring, self.cqe
        results = [0] * len(ops)
        for first in range(0, len(ops), self.DEPTH):
            batch = ops[first : first + self.DEPTH]
            for i, (kind, fd, iov, offset) in enumerate(batch):
                sqe = lib.io_uring_get_sqe(ring)
                if kind == "writev":
                    lib.io_uring_prep_writev(sqe, fd, iov, offset)
                elif kind == "readv":
                    lib.io_uring_prep_readv(sqe, fd, iov, offset)
                else:
                    lib.io_uring_prep_nop(sqe)
                sqe.user_data = first + i
            lib.io_uring_submit_and_wait(ring, len(batch))
            got = 0
            while got < len(batch):
                lib.io_uring_wait_cqe(ring, cqe)
                ready = lib.io_uring_cq_ready(ring)
                for j in range(ready):
                    c = cqe[j]
                    try:
                        res = c.res
                    except OSError as exc:  # the binding raises a failed operation's errno
                        res = -(exc.errno or errno.EIO)
                    results[c.user_data] = res
                lib.io_uring_cq_advance(ring, ready)
                got += ready
        return results


def _thread_ring() -> _Ring:
    ring: _Ring | None = getattr(_rings, "ring", None)
    if ring is None:
        ring = _rings.ring = _Ring()
    return ring


class UringStorage(FileStorage):
    """The io_uring backend: the segments of one call (a block across files, a piece
    being read) are submitted together and waited on together, on the calling thread's
    ring; the ring's two slices still go out as one vectored write. Reads that must not
    touch the disk (RWF_NOWAIT, for the cache) go as in posix.
    """

    name = "uring"
    gathers_writes = True

    def writev(self, segments: Sequence[Segment], bufs: Sequence[Buffer]) -> int:
        import liburing

        todo = [s for s in segments if s.stored]
        if not todo:
            return 0
        single = len(segments) == 1
        entries: list[list[int]] = []
        ops: list[tuple[str, int, Any, int]] = []
        views: list[Sequence[Buffer]] = []
        try:
            for seg in todo:
                entry = self.handles.get(self, seg.file_index, True)
                entries.append(entry)
                if seg.file_index not in self._sized:
                    self._size_file(entry[0], seg.file_index)
                else:
                    self._check_linked(entry[0], seg.file_index)
                v: Sequence[Buffer] = list(bufs) if single else sub_views(
                    bufs, seg.buf_offset, seg.buf_offset + seg.length)
                views.append(v)
                ops.append(("writev", entry[0], liburing.Iovec(v[:_IOV_MAX]), seg.file_offset))
            results = _thread_ring().run(ops)
            for seg, entry, v, res in zip(todo, entries, views, results, strict=True):
                if res < 0:
                    raise StorageIOError.wrap(OSError(-res, os.strerror(-res)),
                                              f"write {self.file_path(seg.file_index)}")
                if res != seg.length:  # short: finish it the plain way
                    self._pwritev_all(entry[0], [memoryview(b) for b in v], seg.file_offset,
                                      seg.file_index, res)
        finally:
            for entry in entries:
                self.handles.put(entry)
        with self._lock:
            self._dirty.update(s.file_index for s in todo)
        return sum(s.length for s in todo)

    def _pread(self, segments: Sequence[Segment], out: memoryview, nowait: int) -> bool:
        import liburing

        if nowait:
            return super()._pread(segments, out, nowait)
        with contextlib.ExitStack() as stack:
            ops: list[tuple[str, int, Any, int]] = []
            todo = []
            for seg in segments:
                dst = out[seg.buf_offset : seg.buf_offset + seg.length]
                if not seg.stored:
                    dst[:] = bytes(seg.length)
                    continue
                fd = stack.enter_context(self._fd(seg.file_index, False))
                ops.append(("readv", fd, liburing.Iovec([dst]), seg.file_offset))
                todo.append((seg, fd, dst))
            results = _thread_ring().run(ops)
            for (seg, fd, dst), res in zip(todo, results, strict=True):
                if res < 0:
                    raise StorageIOError.wrap(OSError(-res, os.strerror(-res)),
                                              f"read {self.file_path(seg.file_index)}")
                done = res
                while done < seg.length:  # short (a file cut short, or a signal): go on
                    n = os.preadv(fd, [dst[done:]], seg.file_offset + done)
                    if n == 0:
                        dst[done:] = bytes(seg.length - done)
                        break
                    done += n
        return True


class DisabledStorage(FileStorage):
    """Accepts every write and stores nothing; reads are zeros.

    For measuring the rest of the pipeline (protocol, hashing, cache) without disk.
    Pieces still verify from their hash state, but a SHA-1 that needs bytes re-read
    (blocks given to ``write_block_direct`` out of order) sees zeros and fails.
    """

    name = "disabled"
    page_cached = False

    def create_empty_files(self) -> None:
        return None

    def writev(self, segments: Sequence[Segment], bufs: Sequence[Buffer]) -> int:
        return sum(s.length for s in segments if s.stored)

    def readinto(self, segments: Sequence[Segment], out: memoryview) -> None:
        for seg in segments:
            out[seg.buf_offset : seg.buf_offset + seg.length] = bytes(seg.length)

    def read_resident(self, segments: Sequence[Segment], out: memoryview) -> bool:
        return False  # nothing is stored, so nothing is cached either

    def advise(self, segments: Sequence[Segment]) -> None:
        return None

    def sync(self, indices: Sequence[int] | None = None) -> int:
        return 0

    def delete_files(self) -> None:
        return None

    def move(self, new_path: Path) -> None:
        self.root.close()
        self.root = Beneath(new_path, self.root.allow_hard_links)
        self.save_path = new_path


def make_storage(
    backend: str,
    meta: Metainfo,
    save_path: Path,
    handles: HandlePool,
    preallocate: bool = False,
    allow_hard_links: bool = False,
) -> FileStorage:
    cls = {"posix": FileStorage, "mmap": MmapStorage, "direct": DirectStorage,
           "uring": UringStorage, "disabled": DisabledStorage}.get(backend)
    if cls is None:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return cls(meta, save_path, handles, preallocate, allow_hard_links)
