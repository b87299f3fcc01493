"""The mmap backend: payload files mapped shared, under a lease that keeps them safe
to map (see :class:`MmapStorage`)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import mmap
import os
import signal
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

from . import paths
from .errors import PiecedError, StorageIOError
from .files import FileStorage, FileVanished, HandlePool
from .hashing import Buffer
from .layout import Segment, zero_views

# Mapped files and the leases that keep them safe to map -------------------------------
# A map holds two descriptors (the leased one and mmap's own), counted against the
# handle pool's bound (max_open_files) with the pool's own.
FDS_PER_MAP = 2
_leasing: weakref.WeakSet[MmapStorage] = weakref.WeakSet()
_leasing_lock = threading.Lock()
_watching = False
# The mapped files of each handle pool, least recently used first: a map holds its file
# open, so they count against the pool's bound (max_open_files) as its descriptors do.
# Keyed by (id(storage), file), to a weak reference to the storage.
_Lru = OrderedDict[tuple[int, int], "weakref.ref[MmapStorage]"]
_mapped: weakref.WeakKeyDictionary[HandlePool, _Lru] = weakref.WeakKeyDictionary()
_mapped_lock = threading.Lock()  # taken after a storage's _map_lock, never before


# File systems whose pages are their storage: a fault on a hole of a mapped file there
# must allocate a page, and a full one answers with SIGBUS, which kills the daemon (a
# read of a piece never written, on a full tmpfs). Their files are never mapped.
_TMPFS_MAGIC = 0x01021994
_HUGETLBFS_MAGIC = 0x958458F6
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _faults_allocate(fd: int) -> bool:
    """Whether a fault on a hole of ``fd``'s file takes space from its file system
    (tmpfs); True where that cannot be told (nothing is mapped then)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type (a long) comes first
    if _libc.fstatfs(fd, buf) != 0:
        return True
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF in (_TMPFS_MAGIC,
                                                                _HUGETLBFS_MAGIC)


_MADV_POPULATE_READ = 22  # (Linux 5.14, both; Python 3.11's mmap has no names for them)
_MADV_POPULATE_WRITE = 23
_populates = True  # the kernel takes it
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


def _madvise(m: mmap.mmap, advice: int, offset: int, length: int) -> None:
    """``m.madvise`` of a page-aligned range inside the map, with the interpreter's lock
    let go: a fault it makes waits for the disk (a page to read in, a file system frozen
    or hung under a write fault), and ``mmap.madvise`` holds the lock meanwhile, which
    stopped every thread of the daemon, other torrents' and the event loop's, until the
    disk answered. (The caller holds the map: it is not closed meanwhile.)"""
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))  # (that export ends here)
    if _libc.madvise(address + offset, length, advice) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _populate(m: mmap.mmap, advice: int, offset: int, length: int) -> bool | None:
    """Fault a range's pages of the map in (``advice``: MADV_POPULATE_READ or _WRITE),
    reading from the disk those not in the page cache. A page the kernel cannot read in
    (a bad sector) touched through the map is SIGBUS, which kills the daemon; here it is
    an error (EFAULT), and False. None on kernels without these advices (before 5.14)."""
    global _populates
    if not _populates:
        return None
    start = offset - offset % mmap.PAGESIZE
    try:
        _madvise(m, advice, start, offset + length - start)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            _populates = False
            return None
        return False
    return True


def _pages_in(m: mmap.mmap, offset: int, length: int) -> bool:
    """The range's pages in for writing, before a store into them: False if one cannot
    be. On a kernel that cannot say, True: the store takes its chance, as it always did.
    The store that follows finds its pages in and writable: it waits for no disk while
    it holds the interpreter's lock."""
    return _populate(m, _MADV_POPULATE_WRITE, offset, length) is not False


def _pages_read_in(m: mmap.mmap, offset: int, length: int) -> bool:
    """The range's pages in for reading: False if one cannot be, or if the kernel cannot
    say (then nothing is hashed through a map)."""
    return _populate(m, _MADV_POPULATE_READ, offset, length) is True


def watch_leases() -> bool:
    """Install the handler of lease breaks (SIGIO, whose default action would end the
    process); only the main thread can. True once it is installed: before that the
    mmap backend maps nothing and works as posix does."""
    global _watching
    if not _watching and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, _on_lease_break)
        paths.lease_met = release_broken_leases  # (an open of ours that breaks one)
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
    """The mmap backend: payload files mapped shared and written by memcpy; read with
    pread from the same file (a page that cannot be read in is SIGBUS through a map).

    A mapped file truncated by another process would kill the daemon: the next access
    past the new end faults (SIGBUS), and Python cannot recover from that. So a file is
    mapped only while the daemon holds a write lease on it (``F_SETLEASE``): another
    process's open or truncate of the file first waits while the kernel signals the
    daemon, which unmaps the file and gives the lease back, within milliseconds. The
    file is then read and written with pread/pwritev, as by the posix backend, until
    the lease can be taken again (once no one else has the file open). Files the
    daemon cannot lease (open elsewhere, owned by another user, on a file system
    without leases) are never mapped, nor are files on tmpfs (a fault on a hole there
    takes a page from the file system, and a full one answers SIGBUS). Mappings cover the file's full length (sparse),
    so a write never faults past its end, and a store allocates its blocks first
    (``posix_fallocate``), so a full disk is ENOSPC, not SIGBUS. A map holds its file
    open (two descriptors: the leased one and mmap's own), counted against
    ``max_open_files`` with the handle pool's own: at most half that many files are
    mapped, the least recently used one unmapped to map another.
    """

    name = "mmap"
    maps_files = True
    RETRY_SECONDS = 1.0  # after a lease is broken or refused, how long until the next try

    def _setup(self) -> None:
        self._maps: dict[int, tuple[int, mmap.mmap]] = {}  # file -> (leased fd, map)
        self._retry: dict[int, float] = {}  # file -> when its lease may be tried again
        # Held while a map is used or dropped (the copy runs under the GIL anyway);
        # reentrant because a vanished file is unmapped from inside its own write.
        self._map_lock = threading.RLock()
        # Views of maps handed out (:meth:`views`), per file: a map is closed only once
        # its views are given back, and takes no new ones while it waits to be.
        self._viewers: dict[int, int] = {}
        self._closing: set[int] = set()
        # Files mapped for reading only: those the daemon has not written (sized). Opened
        # read-write, a file of someone else's library looked written to every watcher
        # (a close-write event at each unmap) and was copied up whole on an overlay.
        self._read_only: set[int] = set()
        self._views_back = threading.Condition(self._map_lock)
        # One file mapped at a time: a second open of the same file would break the
        # first one's fresh lease.
        self._open_lock = threading.Lock()
        with _leasing_lock:
            _leasing.add(self)

    def _map(self, index: int, writing: bool) -> None:
        """Lease and map a file if it can be; nothing happens otherwise. A read maps
        only a file known at its full length (sized by the daemon, or found so by a
        check): it never creates or extends one."""
        if (not _watching or not self.meta.files.lengths[index]
                or not (writing or self.known_whole(index))):
            return
        with self._open_lock:
            if index in self._maps or self._retry.get(index, 0.0) > time.monotonic():
                return
            read_only = not writing and index not in self._sized
            if writing:
                fd = self.open_file(index, True)
            else:
                try:  # never O_CREAT: a file gone behind our back is not made again
                    fd = self._open_payload(index, os.O_RDONLY if read_only else os.O_RDWR,
                                            False)
                except StorageIOError as exc:
                    if isinstance(exc, FileVanished):
                        raise
                    # Gone (the plain read finds it so, and says so), or not to be
                    # written here (a read-only file system, another owner's file):
                    # read with pread, as it always could be.
                    if exc.errno != errno.ENOENT:
                        self._retry[index] = time.monotonic() + self.RETRY_SECONDS
                    return
            try:
                if writing and index not in self._sized:
                    self._size_file(fd, index)
                else:
                    self._check_linked(fd, index)  # (known whole: one found short is gone)
                if _faults_allocate(fd):
                    os.close(fd)
                    self._retry[index] = float("inf")  # until it moves
                    return
                if not self._lease(fd, index):
                    os.close(fd)
                    self._retry[index] = time.monotonic() + self.RETRY_SECONDS
                    return
                try:
                    # (Read-only: private, so that its address can be taken for
                    # madvise; nothing is ever stored into it.)
                    m = mmap.mmap(fd, self.meta.files.lengths[index],
                                  access=mmap.ACCESS_COPY if read_only else mmap.ACCESS_WRITE)
                except ValueError:  # cut short between the check and the lease
                    raise self._vanished(index, f"{self.file_path(index)}: truncated "
                                                "behind pieced's back", gone=False) from None
            except BaseException:
                os.close(fd)
                raise
            with self._map_lock:
                self._maps[index] = (fd, m)
                if read_only:
                    self._read_only.add(index)
                self.handles.reserve(FDS_PER_MAP)
                with _mapped_lock:
                    lru = _mapped.setdefault(self.handles, OrderedDict())
                    lru[(id(self), index)] = weakref.ref(self)
                    excess = []
                    while FDS_PER_MAP * len(lru) > self.handles.max_open and len(lru) > 1:
                        (_, victim), ref = lru.popitem(last=False)
                        excess.append((ref(), victim))
        # A break that came before the map was listed found nothing to release.
        self.release_broken()
        for storage, victim in excess:  # the least recently used maps, past the bound
            if storage is not None:
                storage.unmap(victim)

    def unmap(self, index: int) -> None:
        """Drop a file's map, if it has one (it is read and written by pread/pwritev
        until it is mapped again). One whose views are out is left, over the bound for a
        moment, as the handle pool leaves a busy handle: waiting here, in a thread that
        holds views of its own, could wait for ever."""
        with self._map_lock:
            if index not in self._maps:
                return
            if self._viewers.get(index):
                with _mapped_lock:
                    lru = _mapped.setdefault(self.handles, OrderedDict())
                    lru[(id(self), index)] = weakref.ref(self)
                return
            self._unmap(index, retry=False)

    # The most files one view covers. A check's run of pieces can span thousands of
    # small files: each mapped (and leased) in turn, evicting the one before, for a view
    # that could not be had in the end (a 6,000-file torrent of 700-byte files: three
    # rechecks took 3.8 s, against 1.3 s read).
    VIEW_FILES = 16

    def _few_files(self, stored: Sequence[Segment]) -> bool:
        return len({seg.file_index for seg in stored}) <= self.VIEW_FILES

    def views(self, segments: Sequence[Segment],
              ) -> tuple[list[Buffer], Callable[[], None]] | None:
        """The segments' bytes where they lie, in the files' maps, for a check to hash
        without copying them out of the page cache (BLAKE3: see ``PreadReader.views``);
        and the call that gives them back. None (and nothing held) unless every file of
        them is mapped and every page of them could be read in: the caller then reads
        them with pread, which reports what went wrong. Pads are zeros.

        Hashed through a map, a page the kernel cannot read in, or one of a file cut
        short, is SIGBUS, which kills the daemon: the pages are read in first
        (MADV_POPULATE_READ, which says EFAULT instead), and a mapped file is leased, so
        that no other program truncates it while its views are out (a lease break waits
        for them: the hashing of a check's batch, 16 MiB at most, milliseconds). Pages
        are unmapped again once hashed: they stay in the page cache, and out of the
        daemon's memory."""
        if not _populates:
            return None
        stored = [seg for seg in segments if seg.stored and seg.length]
        if not self._few_files(stored):
            return None  # many small files: read (a map each cost more, and evicted others)
        for seg in stored:  # mapped first, with nothing held (a map made may unmap another)
            if seg.file_index not in self._maps:
                self._try_map(seg.file_index)
        out: list[Buffer] = []
        taken: list[tuple[int, mmap.mmap, int, int]] = []
        given = False
        try:
            for seg in segments:
                if not seg.stored:
                    out.extend(zero_views(seg.length))
                    continue
                if not seg.length:
                    continue
                index = seg.file_index
                with self._map_lock:
                    entry = self._maps.get(index)
                    if entry is None or index in self._closing:
                        return None
                    fd, m = entry
                    try:
                        st = os.fstat(fd)
                    except OSError:
                        return None
                    if st.st_nlink == 0 or st.st_size < self.meta.files.lengths[index]:
                        return None  # gone or cut short: the read says so
                    self._viewers[index] = self._viewers.get(index, 0) + 1
                    taken.append((index, m, seg.file_offset, seg.length))
                    self._used(index)
                if not _pages_read_in(m, seg.file_offset, seg.length):
                    return None
                out.append(memoryview(m)[seg.file_offset : seg.file_offset + seg.length])
            given = True
            return out, functools.partial(self._give_back, taken, out)
        finally:
            if not given:
                self._give_back(taken, out)

    def _give_back(self, taken: list[tuple[int, mmap.mmap, int, int]],
                   views: list[Buffer]) -> None:
        for v in views:
            if isinstance(v, memoryview):
                v.release()
        for _, m, offset, length in taken:
            # The pages unmapped (not dropped: they stay in the page cache). Still
            # mapped, they counted in the daemon's memory, and could not be evicted.
            # Whole pages only: one the piece shares with the next may be another
            # thread's to hash now.
            start = offset + -offset % mmap.PAGESIZE
            end = offset + length - (offset + length) % mmap.PAGESIZE
            if end > start:
                with contextlib.suppress(OSError, ValueError):
                    _madvise(m, mmap.MADV_DONTNEED, start, end - start)
        with self._map_lock:
            for index, *_ in taken:
                n = self._viewers[index] - 1
                if n:
                    self._viewers[index] = n
                else:
                    del self._viewers[index]
            self._views_back.notify_all()

    def _used(self, index: int) -> None:
        """A map was used: it is the most recently used one (caller holds _map_lock)."""
        with _mapped_lock:
            lru = _mapped.get(self.handles)
            if lru is not None and (id(self), index) in lru:
                lru.move_to_end((id(self), index))

    def _lease(self, fd: int, index: int) -> bool:
        for attempt in (0, 1):
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
                # The kernel signals a lease break to the thread that took the lease:
                # to no one once that thread has ended (a re-verification's, a check's),
                # and the other program's open then waits out lease-break-time (45 s).
                # The process is told instead (F_SETOWN of a pid: its thread group).
                try:
                    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
                except OSError:
                    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
                    return False
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
            for index, entry in list(self._maps.items()):
                if self._maps.get(index) is not entry:
                    continue  # unmapped (or mapped anew) while an unmap waited for views
                fd = entry[0]
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
        in the page cache, synced by the next fdatasync like any write. Its views
        given out are waited for (their hashing: milliseconds)."""
        if self._viewers.get(index):
            self._closing.add(index)
            try:
                while self._viewers.get(index):
                    self._views_back.wait()
            finally:
                self._closing.discard(index)
        entry = self._maps.pop(index, None)
        if entry is None:  # (unmapped by another thread meanwhile)
            return
        self._read_only.discard(index)
        fd, m = entry
        with _mapped_lock:
            lru = _mapped.get(self.handles)
            if lru is not None:
                lru.pop((id(self), index), None)
        with contextlib.suppress(BufferError):  # (a view not let go yet: closed with it)
            m.close()
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        self.handles.reserve(-FDS_PER_MAP)
        if retry:
            self._retry[index] = time.monotonic() + self.RETRY_SECONDS

    def _pwrite_segment(self, seg: Segment, views: Sequence[Buffer]) -> None:
        index = seg.file_index
        if index in self._read_only:
            self.unmap(index)  # mapped for a check: mapped again to be written
        if index not in self._maps:
            self._map(index, True)
        with self._map_lock:
            entry = self._maps.get(index)
            if entry is not None and index not in self._read_only:
                fd, m = entry
                self._check_linked(fd, index)
                self._used(index)
                if not self.preallocate:
                    # A store into a hole the file system cannot fill (a full disk, a
                    # quota) is SIGBUS, which kills the daemon: the blocks are allocated
                    # first, so a full disk is ENOSPC here, as with a write.
                    try:
                        os.posix_fallocate(fd, seg.file_offset, seg.length)
                    except OSError as exc:
                        raise StorageIOError.wrap(
                            exc, f"write {self.file_path(index)}") from None
                if not _pages_in(m, seg.file_offset, seg.length):
                    # A page the disk cannot read (EIO): a store into it would be SIGBUS.
                    # pwrite reads in only pages it writes in part, and says EIO if so.
                    self._pwritev_all(fd, [memoryview(v) for v in views], seg.file_offset,
                                      index)
                    self._mark_dirty(index)
                    return
                pos = seg.file_offset
                for v in views:
                    n = memoryview(v).nbytes
                    m[pos : pos + n] = v
                    pos += n
                self._mark_dirty(index)
                return
        super()._pwrite_segment(seg, views)

    def _pread_segment(self, seg: Segment, dst: memoryview, nowait: int) -> bool:
        index = seg.file_index
        if index not in self._maps:
            self._map(index, False)
        whole = self.short_is_cut(index)
        with self._map_lock:
            entry = self._maps.get(index)
            if entry is not None:
                self._check_linked(entry[0], index)
                self._used(index)
                fd = os.dup(entry[0])  # (a dup keeps the lease: no open beside the map)
        if entry is None:
            return super()._pread_segment(seg, dst, nowait)
        # Read with pread from the leased file, not copied out of the map: the same page
        # cache, but a page the kernel cannot read in (EIO, a bad sector) is SIGBUS when
        # touched through a map, which killed the daemon at the first read of it.
        try:
            return self._pread_fd(fd, seg, dst, nowait, whole)
        finally:
            os.close(fd)

    def _try_map(self, index: int) -> None:
        """Map the file for a check where it can be; where it cannot, the read says why.
        But a file found gone or cut short is raised (FileVanished): the storage forgets
        it as it says so, and the read after this would not say it (see
        ``FileStorage.resident``)."""
        try:
            self._map(index, False)
        except FileVanished:
            raise
        except (OSError, PiecedError):
            pass

    def _mapped_resident(self, seg: Segment) -> bool | None:
        """Whether the segment's first byte is in the page cache, asked through the
        file's map (None if it has none): a descriptor opened beside the map would
        break its lease."""
        with self._map_lock:
            entry = self._maps.get(seg.file_index)
            fd = os.dup(entry[0]) if entry is not None else -1  # (a dup keeps the lease)
        if fd < 0:
            return None
        try:
            return self._resident(fd, seg.file_offset, bytearray(1))
        finally:
            os.close(fd)

    def resident(self, segments: Sequence[Segment]) -> bool:
        stored = [seg for seg in segments if seg.stored and seg.length]
        if not stored or not self._nowait:
            return True
        if stored[0].file_index not in self._maps:
            self._try_map(stored[0].file_index)  # (as advise maps it; one file)
        seen = self._mapped_resident(stored[0])
        return super().resident(stored) if seen is None else seen

    def advise(self, segments: Sequence[Segment]) -> list[FileVanished]:
        # Through the map, made first where it can be: an open of the file beside it
        # (the plain advice's) would break the lease of a map another thread makes
        # meanwhile, and the file be unmapped for the rest of the recheck. A segment
        # whose first byte is in the page cache is left alone, as posix leaves it (the
        # advice walked every page of a warm range: 8 ms a warm check of 2 GiB, on the
        # thread that hands the pieces out, holding the maps' lock the hashing takes).
        # A range over more files than a view takes is read, not viewed: its files are
        # not mapped for it (see VIEW_FILES).
        rest = []
        vanished = []
        probe = bytearray(1)
        stored = [seg for seg in segments if seg.stored and seg.length]
        few = self._few_files(stored)
        for seg in stored:
            if few and seg.file_index not in self._maps:
                try:
                    self._try_map(seg.file_index)
                except FileVanished as exc:
                    vanished.append(exc)
                    continue
            with self._map_lock:
                entry = self._maps.get(seg.file_index)
                if entry is not None:
                    if self._nowait and self._resident(entry[0], seg.file_offset, probe):
                        continue
                    start = seg.file_offset - seg.file_offset % mmap.PAGESIZE
                    _madvise(entry[1], mmap.MADV_WILLNEED, start,
                             seg.file_offset + seg.length - start)
                    continue
            rest.append(seg)
        return vanished + super().advise(rest)

    @contextlib.contextmanager
    def _map_fd(self, index: int) -> Iterator[int | None]:
        """A descriptor of the file's map, or None when it is not mapped: a dup of the
        leased one, which keeps the lease (an open of the file, even ours, breaks it,
        and the map goes)."""
        with self._map_lock:
            entry = self._maps.get(index)
            fd = os.dup(entry[0]) if entry is not None else -1
        if fd < 0:
            yield None
            return
        try:
            yield fd
        finally:
            os.close(fd)

    def _datasync(self, index: int, synced_dev: int | None = None) -> None:
        with self._map_fd(index) as fd:
            if fd is None:
                super()._datasync(index, synced_dev)
            else:
                self._sync_fd(fd, synced_dev)  # the map's dirty pages, as msync would

    def _fsync(self, index: int) -> None:
        with self._map_fd(index) as fd:
            if fd is None:
                super()._fsync(index)
            else:
                os.fsync(fd)

    def _vanished(self, index: int, message: str, gone: bool = True) -> FileVanished:
        with self._map_lock:
            if index in self._maps:
                self._unmap(index, retry=False)
        return super()._vanished(index, message, gone)

    def close_handles(self) -> None:
        with self._map_lock:
            for index in list(self._maps):
                self._unmap(index, retry=False)
            self._retry.clear()
        super().close_handles()
