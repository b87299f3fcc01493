"""Files on disk: the handle pool, the posix backend (which the others build on:
``mapped.py``, ``direct.py``, ``uring.py``) and the disabled one.

A backend knows files, not pieces: it is handed :class:`Segment` lists by the
layout and buffers by the caller, and moves bytes. Writes are vectored
(``os.pwritev`` of the caller's own buffers, so a ring buffer's two slices reach the
kernel without a copy); reads land in the caller's buffer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path

from .errors import BadRequest, OutOfRange, PathEscape, PiecedError, StorageIOError
from .filetable import PAD, UNSTORED
from .hashing import Buffer, sub_views
from .layout import Segment, fill_zeros
from .metainfo import MAX_NAME_BYTES, MAX_PATH_BYTES, Metainfo
from .paths import Beneath, anchor_of, part_name
from .resume import TICK_NS, file_stamp, unsettled_for

BACKENDS = ("posix", "mmap", "direct", "uring", "disabled")
_IOV_MAX = 1024
# A sync of this many files or more is one syncfs of their file system: it writes them
# all back, commits the file system's journal and flushes the disk's cache once, where
# a fdatasync a file does all three for each (a torrent of many small files: a journal
# commit and a cache flush per file verified, and the opens that create the next files
# wait behind each commit). Each file's write-back errors are then collected from its
# own descriptor (``written_back``), as its fdatasync would have reported them. The
# cost: other dirty data of that file system is written too.
SYNCFS_FILES = 16
# The file systems (statfs f_type) the shortcut is taken on: ext2/3/4, xfs, btrfs, f2fs,
# tmpfs. Elsewhere a fdatasync a file: a FUSE file system's syncfs returns 0 without
# reaching it (the kernel passes syncfs on to virtiofs alone), and sync_file_range
# never does either, so pieces were announced whose bytes a power cut then took; an
# overlay's or a network file system's files are not those of the syncfs either.
SYNCFS_TYPES = frozenset({0xEF53, 0x58465342, 0x9123683E, 0xF2F52010, 0x01021994})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_WAIT_WRITE_WAIT = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER


def _check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def syncfs(fd: int) -> None:
    """syncfs(2): make everything written to the file system that holds ``fd`` durable
    (data, metadata, and the disk's cache flushed)."""
    _check(_libc.syncfs(fd))


def fs_type(fd: int) -> int:
    """The type of the file system that holds ``fd`` (statfs's ``f_type``, its first field)."""
    buf = ctypes.create_string_buffer(256)  # (struct statfs: 120 bytes on 64-bit Linux)
    _check(_libc.fstatfs(fd, buf))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def written_back(fd: int) -> None:
    """After a syncfs: wait for any write-back of the file still under way and raise the
    write-back error this descriptor has not yet been told of, as fdatasync does (the
    same per-descriptor error state), without a journal commit or a cache flush."""
    _check(_libc.sync_file_range(fd, 0, 0, _WAIT_WRITE_WAIT))


class FileVanished(StorageIOError):
    """A payload file was deleted, or cut short, behind the daemon's back (ENOENT).

    ``written``: this process had written the file, so bytes of pieces not yet
    verified may have gone with it (their hash state must start over). ``gone``: the
    file left its place (False: it is there, cut short, and what is left can be read).
    """

    def __init__(self, message: str, file_index: int, written: bool, gone: bool = True) -> None:
        super().__init__(message, errno=errno.ENOENT)
        self.file_index = file_index
        self.written = written
        self.gone = gone


class WriteLost(StorageIOError):
    """A payload file's write-back failed: fdatasync said so (EIO, ENOSPC...), and what
    was written to the file since its last good sync may not be on disk.

    The kernel reports such an error once, to one fdatasync: the next one returns 0 with
    the data still gone. So a file stays lost (every sync of it fails, and so does a sync
    that ran beside the one told) until the pieces whose bytes it held have started over
    (``FileStorage.lost_handled``); ``generation`` counts its failures.
    """

    def __init__(self, message: str, file_index: int, generation: int, err: int | None) -> None:
        super().__init__(message, errno=err)
        self.file_index = file_index
        self.generation = generation


class HandlePool:
    """A bounded LRU of open file descriptors shared by every torrent.

    A handle in use is never closed under its user: eviction skips busy entries, so
    the pool may briefly exceed its bound rather than close a descriptor another
    thread is writing through (which could then land in a reused descriptor).
    """

    def __init__(self, max_open: int) -> None:
        self.max_open = max_open
        self._lock = threading.Lock()
        # Descriptors held outside the pool on its budget (the mmap backend's maps, two
        # each): the pool keeps fewer of its own open, so the bound holds for all.
        self._reserved = 0
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
            if len(self._fds) + self._reserved > self.max_open:
                self._evict_locked()

    def reserve(self, n: int) -> None:
        """``n`` descriptors more (or fewer, if negative) are held on the pool's budget."""
        with self._lock:
            self._reserved += n
            self._evict_locked()

    def _evict_locked(self) -> None:
        excess = len(self._fds) + self._reserved - self.max_open
        if excess <= 0:
            return
        victims = []  # the least recently used idle ones: found near the front, not by a
        for key, e in self._fds.items():  # walk of all (each open of a torrent of
            if e[1] == 0:  # 12,000 small files walked the 512 open ones)
                victims.append(key)
                if len(victims) == excess:
                    break
        for key in victims:
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
        """Payload descriptors open: the pool's and those held on its budget."""
        return len(self._fds) + self._reserved


class FileStorage:
    """The posix backend: pread/pwritev through the shared handle pool."""

    name = "posix"
    page_cached = True  # what it writes stays in the page cache for a while (read_resident)
    gathers_writes = False  # blocks given straight (the ring) are buffered to a piece first
    maps_files = False  # a check may hash its bytes where they lie (:meth:`views`)
    stores = True  # what it is given is there to read back (not so: "disabled")

    def __init__(
        self,
        meta: Metainfo,
        save_path: Path,
        handles: HandlePool,
        preallocate: bool = False,
        allow_hard_links: bool = False,
        roots: Sequence[Path] | None = None,
    ) -> None:
        self.meta = meta
        self.save_path = save_path
        self.handles = handles
        self.preallocate = preallocate
        self.roots = roots  # resolved; a save path lies in one of them (None: anywhere)
        self.allow_hard_links = allow_hard_links
        self.renames: dict[int, tuple[str, ...]] = {}
        self.stranded = False  # a move or rename failed, and was not undone whole
        self.root = self.beneath(save_path)  # every payload path is resolved beneath it
        self._sized: set[int] = set()  # given their length by us (or an earlier run)
        # Files another registered torrent shares (cross-seeding; set by the disk layer).
        self.shared_files: Container[int] = frozenset()
        # Found at full length by a check, with verified pieces (perhaps on a read-only
        # file system: not ours to write): shorter later, they were cut behind our back.
        self._whole: set[int] = set()
        self._dirty: set[int] = set()  # written since their last sync began
        self._syncing: dict[int, set[int]] = {}  # file -> the syncs of it running (tickets)
        self._failures: dict[int, int] = {}  # file -> how many of its syncs failed
        self._lost: dict[int, tuple[str, int | None]] = {}  # lost writes not handled yet:
        # file -> (message, errno) of the failure
        self._tickets = itertools.count()
        self._identity: dict[int, tuple[int, int]] = {}  # file -> (st_dev, st_ino) first seen
        # file -> its stamp (resume.file_stamp) at the start that loaded the torrent, or
        # at its first read since: a file not opened since is the one checked then only
        # if its stamp is the same, and one not written since is as it was then.
        self.start_stamps: dict[int, list[int]] = {}
        # Files a check found changed behind our back since their start stamp, before it
        # stamped them anew: until a check is over, a stop, or a save while the daemon
        # runs, records them as changed (a check cut short by the stop left pieces of
        # them verified that it never reached).
        self.doubted: set[int] = set()
        # Files whose start stamp is in whole seconds and was taken in the second of
        # their last change (see take_stamp): recorded as changed too, until stamped
        # again once the second is over.
        self.racy: set[int] = set()
        # Files the daemon has written since the start: their times are its own doing
        # (a save while it runs stamps one by its inode alone: see disk._kept_stamps).
        self.written: set[int] = set()
        self._recreate: set[int] = set()  # files seen gone: made anew (O_EXCL) or refused
        # Files seen gone (or cut short) after we wrote them: before one is given its length
        # again, ``before_remaking(index)`` (set by the disk interface) makes sure the
        # journal no longer calls its pieces verified, or raises: at its full length it
        # would pass for them after a crash, zeros under verified pieces.
        self._remaking: set[int] = set()
        self.before_remaking: Callable[[int], None] | None = None
        # (st_dev, st_ino) of the file at a file's place as the torrents sharing it
        # (cross-seeding) know it (set by the disk interface): a file one of them made
        # anew where one went behind our backs is taken as ours, not refused.
        self.kin: Callable[[int], list[tuple[int, int]]] | None = None
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)  # notified as each sync ends
        self._remake = threading.Lock()  # held while a file seen gone is made anew
        self._nowait = os.RWF_NOWAIT  # 0 once the file system has said it has no such flag
        self._setup()

    def _setup(self) -> None:
        """What a backend built on this one adds to its state."""

    # -- paths -------------------------------------------------------------
    def beneath(self, path: Path) -> Beneath:
        """A save path's folder, reached from the root it lies in (PathEscape outside)."""
        return Beneath(path, self.allow_hard_links, anchor_of(path, self.roots))

    def parts(self, index: int) -> tuple[str, ...]:
        """The file's path below the save path, after any rename."""
        return self.renames.get(index) or self.meta.files.path(index)

    def file_path(self, index: int) -> Path:
        """For messages and stamps only: opening goes through ``root`` (paths.py)."""
        return self.save_path.joinpath(*self.parts(index))

    def open_file(self, index: int, writable: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        return self._open_payload(index, flags, writable)

    def _open_payload(self, index: int, flags: int, create_dirs: bool) -> int:
        """Open a payload file, and hold it to the file it was at its first open.

        ``Beneath.open`` refuses a symlink, and a file with other links, at the moment
        of the open; a swapper quick enough can still time an outside file's link count
        around it. So a file, once opened, is known by its inode, and another one in its
        place later (a hard link swapped in) is refused. When the daemon has seen its own
        file go (``_vanished``), the file is made anew with O_EXCL, so the new inode is
        one it created (by one thread: the others then open that one); whatever else is
        found in its place is refused, until a restart. A known file found gone when it
        is opened again (no descriptor of it was open) went behind the daemon's back:
        that open says so (``_vanished``) and creates nothing.
        """
        with self._lock:
            recreate = index in self._recreate
        if recreate and flags & os.O_CREAT:
            with self._remake:
                with self._lock:
                    recreate = index in self._recreate  # or made anew meanwhile
                if recreate:
                    return self._open_known(index, flags | os.O_EXCL, create_dirs)
        return self._open_known(index, flags, create_dirs)

    def _open_known(self, index: int, flags: int, create_dirs: bool) -> int:
        with self._lock:
            recreate = index in self._recreate
            known = index in self._identity
        if recreate and flags & os.O_CREAT and not flags & os.O_EXCL:
            # Seen to go since this open began (another thread's write found it gone): it
            # is made anew by one thread, with O_EXCL. Created here, it would be refused
            # as something else put in its place, the torrent's writes with it.
            return self._open_payload(index, flags, create_dirs)
        kin = set(self.kin(index)) if recreate and self.kin is not None else set()
        if known:
            flags &= ~os.O_CREAT
        elif flags & os.O_CREAT:
            self._name_written(index)  # the first write of this process: its name too
        parts = self.parts(index)
        try:
            made = None
            mode = self.file_mode(index)
            if flags & os.O_CREAT and not known and not recreate:
                made = self.root.create(parts, flags, create_dirs, mode)  # (a new download's)
            fd, st = made or self.root.open_stat(parts, flags, create_dirs, mode)
        except StorageIOError as exc:
            if recreate and exc.errno == errno.EEXIST:
                fd, st = self._kin_file(index, flags, create_dirs, kin)
            elif known and exc.errno == errno.ENOENT:
                raise self._vanished(index, f"{self.file_path(index)}: deleted behind "
                                            "pieced's back") from None
            else:
                raise
        me = (st.st_dev, st.st_ino)
        with self._lock:
            if index in self._recreate and not flags & os.O_EXCL and me not in kin:
                first = None  # read while it is to be made anew: whatever this is, not ours
            else:
                self._recreate.discard(index)
                first = self._identity.setdefault(index, me)
                if (first == me and not known and not flags & os.O_CREAT
                        and index not in self.start_stamps):
                    # First read in this run (a check of data found there): as it was
                    # then, so that a stop sees an edit made behind our back since.
                    self.take_stamp(index, [st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                            st.st_ino])
        if first is None:
            os.close(fd)  # (a writer may be making it this moment: not there yet, for a read)
            raise StorageIOError(f"{self.file_path(index)} is gone, and not made anew yet",
                                 errno=errno.ENOENT)
        if first != me:
            os.close(fd)
            raise PathEscape(f"{self.file_path(index)} is not the file pieced opened there "
                             "before (another was put in its place): refusing to use it")
        return fd

    def _kin_file(self, index: int, flags: int, create_dirs: bool,
                  kin: set[tuple[int, int]]) -> tuple[int, os.stat_result]:
        """The file found where one that went is to be made anew: taken if a torrent
        sharing it made it (or uses it), else refused."""
        fd, st = self.root.open_stat(self.parts(index), flags & ~(os.O_CREAT | os.O_EXCL),
                                     create_dirs, self.file_mode(index))
        if (st.st_dev, st.st_ino) not in kin:
            os.close(fd)
            raise PathEscape(f"{self.file_path(index)} went away and something else was "
                             "put in its place: refusing to use it (a recheck takes the "
                             "files as they are)")
        return fd, st

    def note_written(self, index: int) -> None:
        """The file was written through another torrent's storage (they share it)."""
        if index not in self.written:
            with self._lock:
                self.written.add(index)

    def restamp(self, indices: Iterable[int]) -> None:
        """Stamp files anew, as they are now, and take them as not written since (a
        torrent just completed, its data synced: no write of it is to come but after a
        piece of it is cleared, which is journaled first). A file with writes not yet
        synced is left as it was. One stamped in the clock's step of its last write is
        stamped again once the step is over, if that is a tick (10 ms at most); else (a
        second, on some file systems) it is racy (see take_stamp)."""
        folders: dict[str, bool] = {}
        with self._lock:
            clean = [i for i in indices if i not in self._dirty]
        durable = self.times_durable(clean)
        for index in clean:
            with self._lock:
                if index in self._dirty or index not in durable:
                    continue
                used = self._identity.get(index)
            stamp = file_stamp(self.file_path(index), used, folders)
            unsettled = unsettled_for(stamp, time.time_ns())
            if 0 < unsettled <= TICK_NS:
                time.sleep(unsettled / 1e9)
                stamp = file_stamp(self.file_path(index), used, folders)
                unsettled = unsettled_for(stamp, time.time_ns())
            with self._lock:
                if index not in self._dirty and stamp[0] >= 0 and stamp[2] >= 0:
                    self.take_stamp(index, stamp)
                    self.written.discard(index)

    def written_files(self) -> list[int]:
        """The files written since they were last stamped (by us, or through a torrent
        sharing them)."""
        with self._lock:
            return sorted(self.written)

    def times_durable(self, indices: Iterable[int]) -> set[int]:
        """Make the files' times durable before a stamp records them; returns those that
        are. A fdatasync writes no inode whose size and blocks it leaves as they were
        (the blocks of a failed piece written over), so the times such writes gave the
        file are durable only at the file system's next journal commit (ext4: within
        5 s): a power cut before it took them back, and the next start, finding the
        file's times older than its stamp, took it for changed behind the daemon's back
        and checked it whole again. One syncfs for many files (see SYNCFS_FILES), on the
        file systems it reaches; else an fsync each. A file whose sync fails is left
        out (not stamped: as after any crash, its pieces are looked at again)."""
        todo = list(indices)
        durable: set[int] = set()
        if len(todo) >= SYNCFS_FILES:
            with contextlib.suppress(OSError, PiecedError), self.root.held() as root:
                if fs_type(root) in SYNCFS_TYPES:
                    syncfs(root)
                    dev = os.fstat(root).st_dev
                    with self._lock:  # (a file on another file system's mount is fsynced)
                        durable = {i for i in todo
                                   if (used := self._identity.get(i)) is not None
                                   and used[0] == dev}
        for index in todo:
            if index in durable:
                continue
            try:
                self._fsync(index)
            except (OSError, PiecedError):
                continue
            durable.add(index)
        return durable

    def _fsync(self, index: int) -> None:
        with self._fd(index, False) as fd:
            os.fsync(fd)

    def take_stamp(self, index: int, stamp: list[int]) -> None:
        """Keep ``stamp`` as the file's start stamp (what a stop, or a save while the
        daemon runs, compares it with). One in whole seconds taken in the second of the
        file's last change is racy: an edit later in that second keeps the times it
        holds, and only a read can tell it from the change before it; such a file is
        recorded as changed, so that the next start checks it again, until it is
        stamped once the second is over. (Of finer times the step is the kernel's tick,
        which a stop waits out, see DiskIO._settle, and which this kernel's file
        systems of fine times do not keep, a stat making the next change's time
        another.)"""
        self.start_stamps[index] = stamp
        if stamp[2] % 1_000_000_000 == 0 and unsettled_for(stamp, time.time_ns()):
            self.racy.add(index)
        else:
            self.racy.discard(index)

    @property
    def opened_any(self) -> bool:
        """Whether any payload file has been opened (its inode known) since the start."""
        return bool(self._identity)

    def identity(self, index: int) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the file the daemon has used at the file's place, if any."""
        with self._lock:
            return self._identity.get(index)

    def look_again(self) -> set[int]:
        """Take the files as they are now under their names, as a start does (a user's
        recheck): open descriptors would still read and write a file renamed away, and
        a file put in the place of one is known from now on (the opens still refuse
        symlinks and files with other links). Returns the files the daemon had used
        that are not under their names any more (gone, or another file in their place):
        what was written to them is not where their pieces are now."""
        self.close_handles()
        with self._lock:
            known = dict(self._identity)
            stamped = {i: s for i, s in self.start_stamps.items() if i not in self.written}
        changed = set()
        for index, ident in known.items():
            st = self.root.stat(self.parts(index))
            if st is None or (st.st_dev, st.st_ino) != ident:
                changed.add(index)
        folders: dict[str, bool] = {}
        doubted = {i for i, s in stamped.items()
                   if file_stamp(self.file_path(i), folders=folders) != s}
        with self._lock:
            self.doubted |= doubted
            self._identity.clear()
            self._recreate.clear()
            # (stamped anew by the check's reads: a file it took as it is now was stamped
            # as it was before, and taken by the next stop for one changed since)
            self.start_stamps.clear()
            self.racy.clear()
        return changed

    def moved_away(self, indices: Iterable[int],
                   sizes: dict[int, int] | None = None) -> list[FileVanished]:
        """The files among ``indices`` that the daemon has used and that are not under
        their names any more: renamed away (alone or with a folder of theirs) or
        replaced behind its back. Their descriptors would go on writing them wherever
        they went, out of the configured roots too, while the torrent's paths hold
        nothing of them. Each is forgotten as a vanished file is (its pieces start
        over; it is made anew at its place). A look that fails for another reason (no
        descriptor left, EIO) says nothing: the file is left as it is. ``sizes`` gets
        the size of each file found in place."""
        folders: dict[tuple[str, ...], list[tuple[int, str, tuple[int, int]]]] = {}
        for index in indices:  # (each folder walked to once: a batch of small files
            ident = self.identity(index)  # shares a few)
            if ident is not None:
                parts = self.parts(index)
                folders.setdefault(parts[:-1], []).append((index, parts[-1], ident))
        gone = []
        for folder, files in folders.items():
            try:
                with self.root.folder(folder, False) as dfd:
                    for index, name, ident in files:
                        try:
                            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        except FileNotFoundError:
                            gone.append(index)
                            continue
                        except OSError:
                            continue
                        if (st.st_dev, st.st_ino) != ident:
                            gone.append(index)
                        elif sizes is not None:
                            sizes[index] = st.st_size
            except (FileNotFoundError, NotADirectoryError, PathEscape):
                gone += [index for index, _, _ in files]  # (the folder went: the walk)
            except (OSError, PiecedError):
                continue
        return [self._vanished(index, (
            f"{self.file_path(index)} is not the file pieced wrote there any more "
            "(renamed away or replaced behind pieced's back): its pieces start over"))
            for index in gone]

    def lost(self, indices: Iterable[int]) -> list[FileVanished]:
        """The files among ``indices`` not at their places as the daemon left them:
        renamed away or replaced (see :meth:`moved_away`), gone, not a file any more,
        changed since the start's look at it (a file not opened since), or cut short. A
        look at each (a stat), not a read; each found so is forgotten as a
        vanished file is. A look that fails for another reason says nothing."""
        indices = list(indices)
        sizes: dict[int, int] = {}
        out = self.moved_away(indices, sizes)
        seen = {exc.file_index for exc in out}
        lengths = self.meta.files.lengths
        for index in indices:
            if index in seen:
                continue
            size = sizes.get(index)
            if size is None:  # (not one this run has opened: looked at by its name)
                if self.root.missing(self.parts(index)):
                    out.append(self._vanished(
                        index, f"{self.file_path(index)}: deleted behind pieced's back"))
                    continue
                st = self.root.stat(self.parts(index))
                if st is None:
                    continue  # (no look to be had: said by its next use)
                if not stat.S_ISREG(st.st_mode):
                    out.append(self._vanished(index, f"{self.file_path(index)}: not a file "
                                                     "any more (replaced behind pieced's back)"))
                    continue
                with self._lock:
                    stamp = None if index in self.written else self.start_stamps.get(index)
                if stamp is not None and file_stamp(self.file_path(index)) != stamp:
                    # Not the file the start found there, nor one written since: another
                    # put in its place, or changed (as a start doubts it, a look stops
                    # trusting its pieces).
                    out.append(self._vanished(index, f"{self.file_path(index)}: changed behind "
                                                     "pieced's back since it started"))
                    continue
                size = st.st_size
            if size < lengths[index]:
                out.append(self._vanished(index, f"{self.file_path(index)}: truncated behind "
                                                 "pieced's back", gone=False))
        return out

    def root_moved(self) -> list[tuple[int, bool]] | None:
        """None while the save path still names the folder the files were written in;
        else (it was renamed away, or replaced, behind our back) the folder at the save
        path is the torrent's from now on, its files are strangers (made anew, or
        refused), and what the daemon knew of the old ones is forgotten: returns the
        files it had written or used there, each with whether it had written it."""
        if self.root.in_place():
            return None
        self.close_handles()
        self.root.close()  # (opened again by its path)
        out = []
        for index in self.stored_files():
            with self._lock:
                used = index in self._identity or index in self._sized or index in self._whole
            if used:
                out.append((index, self._vanished(index, "").written))
        return out

    def after_crash(self, floor: Callable[[int], int] = lambda index: 0) -> None:
        """Put right what a crash can leave half done by this backend's own writes, at
        the start after it (before any block of this process is written). ``floor``:
        the longest length another torrent gives a file (one it shares)."""

    def stored_files(self) -> Iterator[int]:
        files = self.meta.files
        return (i for i, f in enumerate(files.flags) if not f & UNSTORED)

    def create_empty_files(self) -> list[PiecedError]:
        """Zero-length files have no piece to write them, so they are made up front.
        One that cannot be (a folder in its place, a symlink planted on its way) is no
        reason to refuse the torrent, whose pieces it is no part of (libtorrent adds
        it too): the errors are returned, for the caller to say, and the rest made."""
        lengths = self.meta.files.lengths
        errors: list[PiecedError] = []
        for index in self.stored_files():
            if lengths[index] == 0:
                try:
                    os.close(self.root.open(self.parts(index), os.O_WRONLY | os.O_CREAT,
                                            True, self.file_mode(index)))
                except PiecedError as exc:
                    errors.append(exc)
        return errors

    def file_mode(self, index: int) -> int:
        """The mode a payload file is made with."""
        return 0o755 if self.meta.files.executable(index) else 0o644

    def display_path(self, index: int) -> str:
        """The file's current path relative to the save path (after any rename)."""
        return "/".join(self.parts(index))

    # -- I/O -----------------------------------------------------------------
    @contextlib.contextmanager
    def _fd(self, index: int, writable: bool) -> Iterator[int]:
        # Whole as of before the open: a first write may make and size the file
        # meanwhile, and a file not there then was not one we had written.
        whole = self.known_whole(index)
        try:
            entry = self.handles.get(self, index, writable)
        except StorageIOError as exc:
            if (exc.errno == errno.ENOENT and not writable and whole
                    and not isinstance(exc, FileVanished)):  # (not said twice)
                raise self._vanished(index, exc.message) from None  # we wrote it: deleted
            raise
        try:
            if writable and index not in self._sized:
                self._size_file(entry[0], index)
            else:
                self._check_linked(entry[0], index, whole)
            yield entry[0]
        finally:
            self.handles.put(entry)

    def _check_linked(self, fd: int, index: int, whole: bool | None = None) -> None:
        """Raise :class:`FileVanished` if ``fd`` no longer is the payload file as written:
        unlinked (its folder removed too), or shorter than the length we gave it.

        ``whole``: whether the file was known to be at its full length before ``fd`` was
        opened (by default, now). Taken before the look at it: a file found short that
        only became known whole since (another thread's first write sized it) was not
        cut short."""
        if whole is None:
            whole = self.known_whole(index)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"stat {self.file_path(index)}") from None
        if st.st_nlink == 0:
            raise self._vanished(index, f"{self.file_path(index)}: deleted behind pieced's back")
        if whole and st.st_size < self.meta.files.lengths[index]:
            # Cut short, but still ours: its pieces are gone, and the next write gives it
            # its length again (it is not made anew: that is for a file gone from its
            # place, where anything found later is a stranger).
            raise self._vanished(index, f"{self.file_path(index)}: truncated behind "
                                        "pieced's back", gone=False)

    def remaking(self) -> list[int]:
        """The files seen gone (or cut short) whose pieces are not yet settled."""
        with self._lock:
            return sorted(self._remaking)

    def settled(self, index: int) -> None:
        """A check has seen the file as it is now: its verified pieces are its own."""
        with self._lock:
            self._remaking.discard(index)

    def known_written(self, indices: Iterable[int]) -> None:
        """Files an earlier run of the daemon wrote and sized (they hold verified pieces):
        from now on their disappearance is noticed, as for files written in this run."""
        with self._lock:
            self._sized.update(indices)

    def found_whole(self, indices: Iterable[int]) -> None:
        """Files a check found verified pieces in, at their full length: from now on one
        cut short or gone is noticed as for files this daemon wrote. (A read past the end
        of such a file cut short behind our back read zeros, served for verified pieces.)
        One still short is left out: its verified pieces lie before its end, and it
        stays as it is until a write gives it its length."""
        lengths = self.meta.files.lengths
        whole = []
        for index in indices:
            if self.known_whole(index):
                continue  # (a file of its own, or found so before: no stat of it again)
            st = self.root.stat(self.parts(index))
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_size >= lengths[index]:
                whole.append(index)
        with self._lock:
            self._whole.update(whole)

    def absent_files(self) -> set[int]:
        """The payload files with bytes that are not there, and that the daemon knows
        nothing of (never opened, sized or found whole): a read of one could only fail,
        and change nothing. A check fails their pieces without reading them: a look at
        each file (each folder, for the files of a missing one), not two failed opens
        a piece. A known file found gone is left out: the read that finds it gone is
        what tells its pieces, and the journal, so."""
        lengths = self.meta.files.lengths
        with self._lock:
            known = self._identity.keys() | self._recreate | self._sized | self._whole
        folders: dict[tuple[str, ...], bool] = {}  # folder -> missing
        absent = set()
        for index in self.stored_files():
            if not lengths[index] or index in known:
                continue
            parts = self.parts(index)
            folder = tuple(parts[:-1])
            if folder and folder not in folders:
                folders[folder] = self.root.missing(folder)
            if (folder and folders[folder]) or self.root.missing(parts):
                absent.add(index)
        return absent

    def known_whole(self, index: int) -> bool:
        """Whether the file is known to be at its full length: one found shorter was cut
        short behind our back (its bytes past the cut are gone, not zeros)."""
        return index in self._sized or index in self._whole

    def short_is_cut(self, index: int) -> bool:
        """Whether a read that ends short of what the file should hold is an error (the
        file was cut short behind our back), not a download's sparse file (zeros): the
        file is known whole, or was found cut short and is not settled since. Until the
        pieces of one found cut are journaled as verified no more, they are reported
        verified: a read of them past the cut, by another thread meanwhile, was served
        zeros. (Its membership moves from one set to the other without a moment in
        neither: see :meth:`_vanished`, :meth:`_size_file`; read without the lock.)"""
        return index in self._sized or index in self._whole or index in self._remaking

    def _vanished(self, index: int, message: str, gone: bool = True) -> FileVanished:
        """Forget what we knew of a vanished file: a write sizes it again and, if it is
        ``gone`` from its place, creates it anew."""
        self.handles.forget(self, index)
        with self._lock:
            written = index in self._sized or index in self._whole
            if written:  # its pieces may be verified still: see _size_file, short_is_cut
                self._remaking.add(index)  # (first: see short_is_cut)
            self._whole.discard(index)
            self._sized.discard(index)
            self._dirty.discard(index)
            if gone and self._identity.pop(index, None) is not None:
                self._recreate.add(index)
        return FileVanished(message, index, written, gone)

    def _size_file(self, fd: int, index: int) -> None:
        """Give a file its length on first write: sparse, or allocated if asked; one
        found longer is cut to it, as libtorrent does (a download then ends as the
        bytes it is of, not with the tail of what was there before), unless another
        registered torrent shares the file (``shared_files``): its tail is that one's.

        Not a file seen gone or cut short while the journal may still call its pieces
        verified (see ``before_remaking``)."""
        with self._lock:
            remaking = index in self._remaking
        if remaking and self.before_remaking is not None:
            self.before_remaking(index)  # (raises while it cannot be recorded)
        length = self.meta.files.lengths[index]
        try:
            if self.preallocate and length:
                os.posix_fallocate(fd, 0, length)
            size = os.fstat(fd).st_size
            if size < length or (size > length and index not in self.shared_files):
                os.ftruncate(fd, length)
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"size {self.file_path(index)}") from None
        with self._lock:
            self._sized.add(index)
            self._remaking.discard(index)

    def writev(self, segments: Sequence[Segment], bufs: Sequence[Buffer]) -> int:
        """Write the logical concatenation of ``bufs`` to ``segments``; bytes written."""
        written = 0
        single = len(segments) == 1
        for seg in segments:
            if not seg.stored:
                continue
            # One segment covering all of bufs (the usual block): hand them over as they are.
            views = bufs if single else sub_views(bufs, seg.buf_offset, seg.buf_offset + seg.length)
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
                self._check_linked(entry[0], index, True)  # (sized: known whole)
            n = os.pwritev(entry[0], views if len(views) <= _IOV_MAX else views[:_IOV_MAX],
                           seg.file_offset)
            if n != seg.length:  # a short write: finish it the slow way
                self._pwritev_all(entry[0], [memoryview(v) for v in views], seg.file_offset, index, n)
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"write {self.file_path(index)}") from None
        finally:
            self.handles.put(entry)
        self._mark_dirty(index)

    def _mark_dirty(self, index: int) -> None:
        """A write reached the file: the next sync fdatasyncs it."""
        if index not in self._dirty:  # (read without the lock: the usual case costs nothing)
            with self._lock:
                self._dirty.add(index)
                self.written.add(index)

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
        """Fill ``out`` only from the page cache (preadv with RWF_NOWAIT): False, without
        waiting for the disk, when part of it is not there any more (the kernel starts
        reading it in all the same: the read that follows a miss finds it sooner)."""
        return self._pread(segments, out, self._nowait)

    def _pread(self, segments: Sequence[Segment], out: memoryview, nowait: int) -> bool:
        for seg in segments:
            dst = out[seg.buf_offset : seg.buf_offset + seg.length]
            if not seg.stored:
                fill_zeros(dst)
            elif not self._pread_segment(seg, dst, nowait):
                return False
        return True

    def _pread_segment(self, seg: Segment, dst: memoryview, nowait: int) -> bool:
        whole = self.short_is_cut(seg.file_index)  # before the read: see _check_linked
        with self._fd(seg.file_index, False) as fd:
            return self._pread_fd(fd, seg, dst, nowait, whole)

    def _pread_fd(self, fd: int, seg: Segment, dst: memoryview, nowait: int,
                  whole: bool) -> bool:
        """Read a segment from ``fd`` (``whole``: the file was known whole before it was
        opened, so a short read means it was cut short behind our back)."""
        resident = nowait != 0
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
                if whole:
                    # Given its length by us, and shorter now: cut short since it was
                    # checked at its open (zeros here would pass for its bytes).
                    raise self._vanished(seg.file_index, f"{self.file_path(seg.file_index)}:"
                                         " truncated behind pieced's back", gone=False)
                dst[done:] = bytes(seg.length - done)
                break
            done += n
        return True

    def views(self, segments: Sequence[Segment],
              ) -> tuple[list[Buffer], Callable[[], None]] | None:
        """The segments' bytes where they lie, without a copy, and the call that gives
        them back; None where they are to be read (every backend but mmap)."""
        return None

    def advise(self, segments: Sequence[Segment]) -> list[FileVanished]:
        """Start reading ``segments`` into the page cache (POSIX_FADV_WILLNEED): a
        recheck asks for the pieces it hashes next. Best effort: errors are the read's
        to report, but for files found gone or cut short, returned for the caller to
        tell (see :meth:`resident`).

        A segment whose first byte is in the page cache is taken to be there whole and
        left alone: for a range already read the kernel walks every page of it to find
        nothing to read (30 ms of CPU in a warm recheck of 2 GiB). Where that guess is
        wrong, the hashing thread's read brings the rest, with the kernel's read-ahead.
        (Probing more bytes than the first made the next cold recheck slower: a probe
        of a page that is not there starts a read-ahead of its own from that page.)"""
        probe = bytearray(1)
        vanished = []
        for seg in segments:
            if not seg.stored or not seg.length:
                continue
            try:
                with self._fd(seg.file_index, False) as fd:
                    if self._nowait and self._resident(fd, seg.file_offset, probe):
                        continue
                    os.posix_fadvise(fd, seg.file_offset, seg.length, os.POSIX_FADV_WILLNEED)
            except FileVanished as exc:
                vanished.append(exc)
            except (OSError, PiecedError):
                continue
        return vanished

    def resident(self, segments: Sequence[Segment]) -> bool:
        """Whether the first stored byte of ``segments`` is in the page cache, which a
        recheck takes for the whole range: warm data is read in large batches, cold data
        in small ones (see ``verify.COLD_BATCH_BYTES``). Taken as warm where the file
        system cannot say (no RWF_NOWAIT), and as cold where the file cannot be opened
        (its reads say why).

        A file found gone or cut short (FileVanished) is raised (:meth:`advise` returns
        them): the storage forgets the file as it says so, so the read after this would
        not say it, and the caller must (a recheck records it)."""
        seg = next((s for s in segments if s.stored and s.length), None)
        if seg is None or not self._nowait:
            return True
        try:
            with self._fd(seg.file_index, False) as fd:
                return self._resident(fd, seg.file_offset, bytearray(1))
        except FileVanished:
            raise
        except (OSError, PiecedError):
            return False

    def _resident(self, fd: int, offset: int, probe: bytearray) -> bool:
        try:
            return os.preadv(fd, [probe], offset, self._nowait) == 1
        except OSError:  # EAGAIN: not in the page cache (or no RWF_NOWAIT here)
            return False

    def sync(self, indices: Sequence[int] | None = None, force: bool = False) -> int:
        """Make every write made to the files (all, or the given ones) before this call
        durable; returns how many files it fdatasynced. ``force``: the given files, dirty
        or not (written by someone else, whose writes we did not see).

        A file another thread is syncing is not dirty any more, yet not durable either:
        its writes before that sync began are covered only once that sync has returned,
        so this waits for it (and syncs the file itself if that sync could not run).
        Raises WriteLost when a sync of a file failed, this one's or one that may have
        taken the error that was this one's to see.
        """
        wanted = None if indices is None else set(indices)
        if force and wanted is not None:
            for index in wanted:  # made by someone else: their names may not be durable
                self._name_written(index)
        with self._lock:
            if force and wanted is not None:
                todo = sorted(wanted)
            else:
                todo = sorted(self._dirty if wanted is None else self._dirty & wanted)
            # The syncs running now: waited for, not those that start later (a busy file
            # is synced over and over by its writers, and would never be free).
            others = {i: set(tickets) for i, tickets in self._syncing.items()
                      if i not in todo and (wanted is None or i in wanted)}
            seen = self._failures_of([*todo, *others])
            ticket = self._take_for_sync(todo)
        count = self._sync_taken(todo, ticket, seen)
        if others:
            with self._lock:
                while any(self._syncing.get(i, set()) & t for i, t in others.items()):
                    self._synced.wait()
                self._check_failures(others, seen)
                failed = sorted(i for i in others if i in self._dirty)
                ticket = self._take_for_sync(failed)
            count += self._sync_taken(failed, ticket, seen)
        self.root.sync_made()  # the names of the files and folders made: durable too
        return count

    def _failures_of(self, indices: Iterable[int]) -> dict[int, int]:
        """(Caller holds ``_lock``.) The failed syncs of each file so far; WriteLost for
        a file whose lost writes are not handled yet."""
        for index in indices:
            if index in self._lost:
                raise self._lost_error(index)
        return {i: self._failures.get(i, 0) for i in indices}

    def _check_failures(self, indices: Iterable[int], seen: dict[int, int]) -> None:
        """(Caller holds ``_lock``.) WriteLost if a sync of these files failed since
        ``seen``."""
        for index in indices:
            if self._failures.get(index, 0) != seen.get(index, 0):
                raise self._lost_error(index)

    def _lost_error(self, index: int) -> WriteLost:
        """(Caller holds ``_lock``.)"""
        message, err = self._lost.get(
            index, (f"sync {self.file_path(index)}: a write-back failed meanwhile", errno.EIO))
        return WriteLost(message, index, self._failures[index], err)

    def lost_handled(self, error: WriteLost) -> None:
        """The pieces whose bytes the file held when its sync failed have started over:
        it may be synced again (unless it failed again since)."""
        with self._lock:
            if self._failures.get(error.file_index) == error.generation:
                self._lost.pop(error.file_index, None)

    def _take_for_sync(self, todo: Sequence[int]) -> int:
        """(Caller holds ``_lock``.) The files are this thread's to sync now: its ticket."""
        ticket = next(self._tickets)
        self._dirty.difference_update(todo)
        for index in todo:
            self._syncing.setdefault(index, set()).add(ticket)
        return ticket

    def _sync_taken(self, todo: Sequence[int], ticket: int, seen: dict[int, int]) -> int:
        done = 0
        skip = 0  # the file that failed, when it is not ours to sync any more
        beside: dict[int, set[int]] = {}  # file -> the other syncs of it when ours returned
        synced_dev = None  # the file system a syncfs made durable, if one did
        if len(todo) >= SYNCFS_FILES:
            # (on an error: a fdatasync each)
            with contextlib.suppress(OSError, PiecedError), self.root.held() as root:
                if fs_type(root) in SYNCFS_TYPES:
                    syncfs(root)
                    synced_dev = os.fstat(root).st_dev
        try:
            for index in todo:
                try:
                    self._datasync(index, synced_dev)
                except OSError as exc:
                    raise self._write_lost(index, exc) from None
                except PathEscape as exc:
                    # Something pieced refuses to use is at the file's name now (a
                    # symlink, a hard link, another file): what was written to the file
                    # is not there, as if it had been deleted.
                    skip = 1
                    raise self._vanished(index, exc.message) from None
                except PiecedError:  # swapped, or gone: what we wrote is not there to sync
                    skip = 1
                    raise
                with self._lock:
                    beside[index] = self._syncing[index] - {ticket}
                done += 1
        finally:
            with self._lock:
                # Not made durable: dirty still (but a file found gone is not ours to sync).
                self._dirty.update(i for i in todo[done + skip:] if i in self._sized)
                for index in todo:
                    running = self._syncing[index]
                    running.discard(ticket)
                    if not running:
                        del self._syncing[index]
                self._synced.notify_all()
        # A sync of the same file that ran beside ours may have been the one told of a
        # write-back error that lost our writes too (ours then returned 0): those still
        # running are waited for, and a failure of any since ours began is ours.
        with self._lock:
            while any(self._syncing.get(i, set()) & t for i, t in beside.items()):
                self._synced.wait()
            self._check_failures(todo, seen)
        return done

    def _write_lost(self, index: int, exc: OSError) -> WriteLost:
        with self._lock:
            self._failures[index] = self._failures.get(index, 0) + 1
            self._lost[index] = (f"sync {self.file_path(index)}: {exc.strerror or exc}",
                                 exc.errno)
            return self._lost_error(index)

    def _datasync(self, index: int, synced_dev: int | None = None) -> None:
        """Make the file's writes durable, or, on ``synced_dev`` (a file system a syncfs
        has just made durable), collect its write-back errors."""
        # A file this process has not written (a forced sync, for a recheck) is synced
        # through a read-only handle: a check changes nothing, and needs no write access.
        with self._fd(index, index in self._sized) as fd:
            self._sync_fd(fd, synced_dev)

    @staticmethod
    def _sync_fd(fd: int, synced_dev: int | None) -> None:
        if synced_dev is not None and os.fstat(fd).st_dev == synced_dev:
            written_back(fd)
        else:  # (a folder of the torrent may be another file system's mount point)
            os.fdatasync(fd)

    def _name_written(self, index: int) -> None:
        """The file's name, and its folders' up to the save path, may have been made by
        someone else (a daemon that died, another program): synced with the next sync."""
        parts = self.parts(index)
        for k in range(len(parts)):
            self.root.changed(parts[:k])

    # -- life cycle -------------------------------------------------------------
    def close_handles(self) -> None:
        """Drop the open payload files (they are about to move, or be renamed)."""
        self.handles.close(self)

    def close(self) -> None:
        self.close_handles()
        self.root.close()

    def delete_files(self, keep: Container[Path] = ()) -> None:
        """Delete the payload files, but those at a path in ``keep`` (another torrent's)."""
        self.close_handles()
        failed: StorageIOError | None = None
        for index in self.stored_files():
            if self.file_path(index) in keep:
                continue
            try:
                # (a folder in a file's place, or a symlink on its way: never the
                # torrent's, left as they are; an empty file's place may hold one)
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, PathEscape):
                    self.root.unlink(self.parts(index))
            except OSError as exc:  # (the others are deleted all the same)
                failed = failed or StorageIOError.wrap(exc, f"delete {self.file_path(index)}")
        self._prune(self.root)
        if failed is not None:
            raise failed

    def _prune(self, root: Beneath) -> None:
        """Remove the torrent's now-empty folders, deepest first, never the save path."""
        dirs = {p[:i] for p in map(self.parts, self.stored_files()) for i in range(1, len(p))}
        for d in sorted(dirs, key=len, reverse=True):
            root.rmdir(d)

    def check_move(self, new_path: Path) -> None:
        """Refuse (EEXIST) a move to a folder that holds a file of one of the torrent's
        names already, before anything is recorded or moved: a file found at the new
        place after a crash part-way is then one the move put there, never a stranger's
        to be taken for the torrent's."""
        # Into a folder of its own files (a file "a" and a folder "x", moved into "x"):
        # a file would land where another is, or is yet to be, and the next be moved on
        # from there in its turn (libtorrent makes that mess; it is refused here).
        here: dict[Path, int] = {}
        for j in range(len(self.meta.files.lengths)):
            parts = self.parts(j)
            for k in range(1, len(parts) + 1):
                here.setdefault(self.save_path.joinpath(*parts[:k]), j)
        for index in self.stored_files():
            there = new_path.joinpath(*self.parts(index))
            if there in here:
                raise BadRequest(f"move: {there} is the place of the torrent's own "
                                 f"{self.file_path(here[there])}, or of one of its folders")
        new_root = self.beneath(new_path)
        try:
            try:  # a file (or a symlink) on the way to it: never a folder to go through
                new_root.root()
            except StorageIOError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            folders: set[tuple[str, ...]] = set()
            for index in self.stored_files():
                parts = self.parts(index)
                folders.update(parts[:k] for k in range(1, len(parts)))
                if new_root.exists(parts):
                    raise StorageIOError(f"move: {new_path.joinpath(*parts)} already exists",
                                         errno=errno.EEXIST)
            # Something not a folder where the torrent has one: found here, not by the
            # move half-way (which then has to put back what it moved).
            for folder in sorted(folders, key=len):
                st = new_root.stat(folder)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    raise StorageIOError(f"move: {new_path.joinpath(*folder)} is in the way "
                                         "(the torrent has a folder of that name)",
                                         errno=errno.EEXIST)
        finally:
            new_root.close()

    def move(self, new_path: Path) -> None:
        """Move every existing payload file under ``new_path`` (link, or copy across
        devices), never replacing a file there; undone if any step fails."""
        self.close_handles()
        new_root = self.beneath(new_path)
        moved: list[tuple[int, tuple[str, ...]]] = []  # linked (or copied) there
        gone = 0  # of those, how many are no longer here
        carried: dict[int, bool] = {}
        doing = f"move to {new_path}"  # (what an error met is said of)
        try:
            new_root.root(create=True)
            for index in self.stored_files():
                parts = self.parts(index)
                if not self.root.exists(parts):
                    continue
                if new_root.exists(parts):
                    raise StorageIOError(f"move: {new_path.joinpath(*parts)} already exists",
                                         errno=errno.EEXIST)
                known = self._known_now(index)
                doing = f"move of {self.file_path(index)} to {new_path.joinpath(*parts)}"
                self.root.link(parts, new_root, parts)
                moved.append((index, parts))
                if known is not None:
                    carried[index] = known
            # Every file's new name durable before any old one goes: a power cut between
            # the syncs of an old folder and a new one could take a file under both names.
            doing = f"move to {new_path}"
            new_root.sync_made()
            for _, parts in moved:
                self.root.drop(parts)
                gone += 1
            self.root.sync_made()  # where the files are now: durable before it is recorded
        except (OSError, PiecedError) as exc:
            self.stranded = False
            for k, (index, parts) in reversed(list(enumerate(moved))):
                try:
                    if k < gone:
                        new_root.move(parts, self.root, parts)
                    else:
                        new_root.drop(parts)  # (still here: the other name goes)
                except (OSError, PiecedError):
                    self.stranded = True
                with self._lock:
                    # Copied there and back across devices: another inode, our own all
                    # the same (else it was refused as one put in its place, and its
                    # verified pieces were lost at the next check or move).
                    self._identity.pop(index, None)
                    self._recreate.discard(index)
                if index in carried:
                    self._carry(index, carried[index])
            with contextlib.suppress(OSError, PiecedError):
                self._prune(new_root)  # the folders the move made there, if empty
            new_root.close()
            if isinstance(exc, OSError):
                undone = "" if self.stranded else "; undone, the files are where they were"
                raise StorageIOError(f"{doing}: {exc.strerror or exc}{undone}",
                                     errno=exc.errno) from None
            raise
        self._prune(self.root)
        self.root.close()
        self.root = new_root
        self.save_path = new_path
        with self._lock:
            self._identity.clear()  # a copy across devices is another inode: learnt anew
            self._recreate.clear()
        for index, opened in carried.items():
            self._carry(index, opened)

    def changed_files(self) -> list[int]:
        """The files the daemon knew (used, or checked at the start) whose names hold
        another file now, put there behind its back: what their verified pieces were
        found in is not what a move would carry to the new place."""
        changed = []
        for index in self.stored_files():
            with self._lock:
                used = self._identity.get(index)
                seen = self.start_stamps.get(index)
            if used is None and seen is None:
                continue
            st = self.root.stat(self.parts(index))
            if st is None:
                continue  # gone: its pieces go when it is next used (or checked)
            # Another inode: another file (its times alone change with a chmod, a chattr).
            if used is not None:
                swapped = (st.st_dev, st.st_ino) != used
            else:
                assert seen is not None
                swapped = st.st_ino != seen[3]
            if swapped:
                changed.append(index)
        return changed

    def _known_now(self, index: int) -> bool | None:
        """Whether the file under the file's name is one the daemon knows (about to be
        moved by it): True if it is the one it used there, False if, not used since the
        start, it is the one checked then; None if neither (unknown, or changed)."""
        path = self.file_path(index)
        with self._lock:
            used = self._identity.get(index)
            seen = self.start_stamps.get(index)
        if used is not None:
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                return None
            return True if (st.st_dev, st.st_ino) == used else None
        if seen is not None and file_stamp(path) == seen:
            return False
        return None

    def _carry(self, index: int, opened: bool) -> None:
        """A file the daemon knew, moved by it: known at its new place as it was at the
        old one (a stop's stamp of it, then the next start, take it as the same file,
        which the move's new change time and, across devices, new inode would deny)."""
        path = self.file_path(index)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return
        with self._lock:
            if opened:
                self._identity[index] = (st.st_dev, st.st_ino)
            if index in self.start_stamps:  # (a rename changes the file's ctime)
                self.take_stamp(index, file_stamp(path))

    def finish_move(self, old_path: Path, old_renames: dict[int, tuple[str, ...]],
                    inodes: dict[int, int] | None = None
                    ) -> tuple[int, set[int], set[int]]:
        """Bring under the save path, as named now, the files a move or rename cut short
        by a crash left where they were (``old_path``, named by ``old_renames``).
        Returns how many it moved, and two sets of files whose pieces are to be checked
        again: those found at both places that are not one file (nothing is deleted of
        them), and those left where they were whose inode is not the one the state
        folder names (``inodes``: another file put in the place of one while the daemon
        was down; moved all the same)."""
        old_root = self.beneath(old_path) if old_path != self.save_path else self.root
        moved = 0
        doubtful: set[int] = set()
        changed: set[int] = set()
        marked: set[tuple[str, ...]] = set()
        try:
            self.root.root(create=True)  # (recorded as where to go before it was made)
            for index in self.stored_files():
                parts = self.parts(index)
                was = old_renames.get(index) or self.meta.files.path(index)
                if old_root is self.root and was == parts:
                    continue
                for k in range(len(parts)):  # folders the process that died made for it:
                    if parts[:k] not in marked:  # durable (with the next sync) before an
                        marked.add(parts[:k])  # old name goes
                        self.root.changed(parts[:k])
                for root, p in ((old_root, was), (self.root, parts)):  # half copies left
                    with contextlib.suppress(OSError, PiecedError):  # (a read-only place:
                        root.unlink((*p[:-1], part_name(p[-1])))  # left there, harmless)
                old = old_root.stat(was)
                if old is None:
                    continue  # moved already (or never made)
                if inodes and inodes.get(index, old.st_ino) != old.st_ino:
                    changed.add(index)
                new = self.root.stat(parts)
                if new is not None:
                    # Cut short between the link (or the copy, whole: a half one never
                    # has the name) and the unlink: the old name goes.
                    if (new.st_dev, new.st_ino) == (old.st_dev, old.st_ino) or \
                            _same_bytes(old_root, was, self.root, parts):
                        self.root.sync_made()  # (the folders marked above: durable
                        # before the old name goes)
                        old_root.changed(was[:-1])
                        old_root.unlink(was)
                        moved += 1
                    else:  # not the torrent's to pick from (someone else's in its way)
                        doubtful.add(index)
                    continue
                old_root.move(was, self.root, parts)
                moved += 1
            self.root.sync_made()
            old_root.sync_made()
            if moved and old_root is not self.root:
                self._prune(old_root)
        finally:
            if old_root is not self.root:
                old_root.close()
        return moved, doubtful, changed

    def rename_target(self, index: int, new_name: str) -> tuple[str, ...] | None:
        """The path a rename of file ``index`` to ``new_name`` gives it, refused (typed
        errors) as :meth:`rename` would refuse it; None when it is its name already."""
        if not 0 <= index < len(self.meta.files) or not self.meta.files.stored(index):
            raise OutOfRange(f"file index {index} is not a payload file")
        parts = tuple(new_name.split("/"))
        if new_name.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
            raise PathEscape(f"new name {new_name!r} must be a relative path inside the save path")
        # As a torrent's own paths are held to at register: what a file system can hold.
        if any(len(p.encode()) > MAX_NAME_BYTES for p in parts):
            raise BadRequest(f"new name {new_name[:80]!r}: a path component is over "
                             f"{MAX_NAME_BYTES} bytes")
        if len(new_name.encode()) > MAX_PATH_BYTES:
            raise BadRequest(f"new name {new_name[:80]!r}... is over {MAX_PATH_BYTES} bytes")
        if parts == self.parts(index):
            return None
        dst = self.save_path.joinpath(*parts)
        flags = self.meta.files.flags
        # (a symlink entry's name is the torrent's too, though nothing is stored there)
        for i in (i for i in range(len(flags)) if not flags[i] & PAD):
            other = self.parts(i)
            k = min(len(other), len(parts))
            if i == index or other[:k] != parts[:k]:
                continue
            if other == parts:
                raise StorageIOError(f"rename: {dst} already exists", errno=errno.EEXIST)
            # One a folder of the other: one of the two files could never be written.
            raise StorageIOError(
                f"rename: {dst} and {self.save_path.joinpath(*other)}, another file of the "
                "torrent, would be a file and a folder of one name", errno=errno.EEXIST)
        if self.root.exists(parts):
            raise StorageIOError(f"rename: {dst} already exists", errno=errno.EEXIST)
        for k in range(1, len(parts)):  # found here, not half-way through the rename
            st = self.root.stat(parts[:k])
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise PathEscape(f"{self.save_path.joinpath(*parts[:k])} is a symlink: "
                                 "refusing to go through it")
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise StorageIOError(f"rename: {self.save_path.joinpath(*parts[:k])} is in "
                                     "the way (not a folder)", errno=errno.EEXIST)
        return parts

    def rename(self, index: int, new_name: str) -> None:
        """Rename one file; ``new_name`` is a relative path that must stay inside the save path."""
        parts = self.rename_target(index, new_name)
        if parts is None:
            return
        self.close_handles()
        src = self.parts(index)
        known = self._known_now(index)
        if self.root.exists(src):
            try:
                self.root.move(src, self.root, parts)
            except OSError as exc:
                raise StorageIOError.wrap(exc, "rename") from None
            try:
                self.root.sync_made()  # the new name durable before it is recorded
            except PiecedError:
                self.stranded = False
                try:  # undone, as a move is
                    self.root.move(parts, self.root, src)
                except (OSError, PiecedError):
                    self.stranded = True
                raise
        self.renames[index] = parts
        if known is not None:
            self._carry(index, known)


def _same_bytes(a: Beneath, pa: tuple[str, ...], b: Beneath, pb: tuple[str, ...]) -> bool:
    """Whether two files hold the same bytes (read through, a MiB at a time)."""
    try:
        fa = a.open(pa, os.O_RDONLY)
    except (OSError, PiecedError):
        return False
    try:
        try:
            fb = b.open(pb, os.O_RDONLY)
        except (OSError, PiecedError):
            return False
        try:
            if os.fstat(fa).st_size != os.fstat(fb).st_size:
                return False
            pos = 0
            while True:
                x, y = os.pread(fa, 1 << 20, pos), os.pread(fb, 1 << 20, pos)
                if x != y:
                    return False
                if not x:
                    return True
                pos += len(x)
        finally:
            os.close(fb)
    finally:
        os.close(fa)


class DisabledStorage(FileStorage):
    """Accepts every write and stores nothing; reads are zeros.

    For measuring the rest of the pipeline (protocol, hashing, cache) without disk.
    Pieces still verify from their hash state, but a SHA-1 that needs bytes re-read
    (blocks of a piece written out of order, or one written again, whatever the
    operation) sees zeros and fails.
    """

    name = "disabled"
    page_cached = False
    stores = False

    def create_empty_files(self) -> list[PiecedError]:
        return []

    def writev(self, segments: Sequence[Segment], bufs: Sequence[Buffer]) -> int:
        return sum(s.length for s in segments if s.stored)

    def readinto(self, segments: Sequence[Segment], out: memoryview) -> None:
        for seg in segments:
            fill_zeros(out[seg.buf_offset : seg.buf_offset + seg.length])

    def read_resident(self, segments: Sequence[Segment], out: memoryview) -> bool:
        return False  # nothing is stored, so nothing is cached either

    def absent_files(self) -> set[int]:
        return set()  # every read succeeds (zeros), whatever is on disk

    def advise(self, segments: Sequence[Segment]) -> list[FileVanished]:
        return []

    def resident(self, segments: Sequence[Segment]) -> bool:
        return True  # nothing to read: large batches

    def sync(self, indices: Sequence[int] | None = None, force: bool = False) -> int:
        return 0

    def delete_files(self, keep: Container[Path] = ()) -> None:
        return None

    def move(self, new_path: Path) -> None:
        self.root.close()
        self.root = self.beneath(new_path)
        self.root.root(create=True)
        self.save_path = new_path


def make_storage(
    backend: str,
    meta: Metainfo,
    save_path: Path,
    handles: HandlePool,
    preallocate: bool = False,
    allow_hard_links: bool = False,
    roots: Sequence[Path] | None = None,
) -> FileStorage:
    from .direct import DirectStorage  # the backends that subclass this module's
    from .mapped import MmapStorage
    from .uring import UringStorage

    cls: type[FileStorage] | None = {
        "posix": FileStorage, "mmap": MmapStorage, "direct": DirectStorage,
        "uring": UringStorage, "disabled": DisabledStorage}.get(backend)
    if cls is None:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return cls(meta, save_path, handles, preallocate, allow_hard_links, roots)
