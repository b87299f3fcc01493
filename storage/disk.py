"""The disk interface: what a torrent client asks of storage.

It ties the other modules together: metainfo says what a torrent is, the layout maps
pieces to files (``layout.py``), a backend moves bytes (``files.py``), the buffer pool
holds dirty blocks and cached pieces (``bufferpool.py``), the hashers verify
(``hashing.py``), the torrent keeps its piece states and fence (``torrent.py``), the
group commit makes verified pieces durable (``commit.py``) and the state folder
remembers them (``resume.py``). Every operation is thread-safe; the daemon calls them
from worker threads, tests and ``pieced verify`` call them directly.

Life of a block: its torrent is held shared (the fence), its piece goes from missing to
partial, the block is buffered (or written through when the budget is full, or at once
with ``flush``/``write_block_direct``) and fed to its piece's hasher; pad bytes are
checked to be zeros and never stored. The block that completes a piece moves it to
hashing and verifies it from the hash state, with no read-back in the common case; a
good piece is written out, cached clean, and committing until the group commit has
fdatasync'ed its data and journaled it; then it is verified and announced. A bad one
goes back to missing and is announced failed.

Locks, always taken in this order: a torrent's fence, ``DiskIO._lock`` (the torrent
table), a piece's lock (its writes and hash state), a torrent's journal lock, a
torrent's ``lock`` (its states and partial pieces), the buffer pool's lock. No thread
holds two piece locks.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import hashlib
import itertools
import logging
import re
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from .bufferpool import BufferPool, PieceData, ResidentPiece
from .commit import GroupCommit
from .errors import (
    AlreadyRegistered,
    BadRequest,
    NoHashes,
    OutOfRange,
    PathEscape,
    PieceChanged,
    PiecedError,
    StorageIOError,
    TooLarge,
    UnknownTorrent,
    detached,
)
from .files import BACKENDS, FileStorage, FileVanished, HandlePool, WriteLost, make_storage
from .filetable import PAD, UNSTORED
from .hashing import (
    FINGERPRINT_FORM,
    HASH_PART,
    NO_FINGERPRINT,
    Aside,
    Buffer,
    HashPool,
    Intervals,
    PieceCheck,
    PieceHasher,
    fingerprint,
    sub_views,
)
from .layout import Layout, Segment
from .mapped import watch_leases
from .merkle import BLOCK_SIZE
from .metainfo import MAX_METAINFO_BYTES, Metainfo, V2Piece, parse
from .paths import SaveFolderGone, anchor_of, remove_folder
from .resume import (
    REC_CLEARED,
    REC_VERIFIED,
    SETTLE_BUDGET_NS,
    STAMP_FIELDS,
    UNSTAMPED,
    Deletion,
    Loaded,
    StateStore,
    TorrentRecord,
    file_record,
    file_stamp,
    unsettled_for,
)
from .stats import Stats
from .torrent import (
    COMMITTING,
    HASHING,
    MISSING,
    PARTIAL,
    VERIFIED,
    Partial,
    Torrent,
    file_progress,
)
from .uring import check_uring
from .verify import PreadReader, Progress, VerifyResult, verify

log = logging.getLogger("pieced.storage")


def _observe(callback: Callable[..., object], *args: object) -> None:
    """Call an observer: its bug is not the error of the write or check that told it,
    and the results told after it must still reach it (a piece result lost here would
    never be announced)."""
    try:
        callback(*args)
    except Exception:
        log.exception("%s raised", getattr(callback, "__name__", "an observer"))
PARTIAL_FLOOR = 64  # pieces in progress any torrent may have, whatever the others hold
# A write from this size on is hashed by two threads (PieceHasher.add_beside): below
# it the hand-over (tens of microseconds) would cost more than it saves.
ASIDE_BYTES = 128 * 1024

# Bytes of another process's memory (a client's shared ring) copied before a write reads
# them (see ``write_blocks_direct``): each writing thread keeps a buffer of up to this
# size for it; a longer run gets one of its own for the call.
SNAPSHOT_KEEP = 4 * 1024 * 1024
_snapshots = threading.local()


def _room_for(partial: Partial, piece: int, begin: int, length: int) -> None:
    """Refuse (TOO_LARGE, nothing written) a write that would leave the bytes the piece
    holds in more separate ranges than ``PieceHasher.max_spans`` (its 16 KiB blocks,
    pads and files, and SPARE_SPANS): writers never leave so many, and each range is
    held in memory outside any budget (a client
    writing a byte at every other offset of 16 MiB pieces grew the daemon by a gigabyte
    in four minutes)."""
    hasher = partial.hasher
    limit = hasher.max_spans
    if hasher.received.count_after(begin, begin + length) > limit:
        raise TooLarge(f"piece {piece}: a write at {begin} of {length} bytes would leave "
                       f"what the piece holds in more than {limit} separate ranges: "
                       "write it in blocks of 16 KiB")


def _differs(there: tuple[bytes, bytearray], a: int, b: int) -> bool:
    """Whether the write changes the file's bytes ``a:b`` of its segment."""
    new, old = there
    return memoryview(new)[a:b] != memoryview(old)[a:b]


def _changes_held(spans: Sequence[Sequence[int]], at: int, start: int, stop: int,
                  there: tuple[bytes, bytearray]) -> bool:
    """Whether a write of the torrent's bytes ``start:stop`` changes bytes a piece at
    ``at`` holds in its files (``spans``: those ranges; a parked piece's, or what a piece
    under way has stored)."""
    for s, e in spans:
        lo, hi = max(at + s, start), min(at + e, stop)
        if lo < hi and _differs(there, lo - start, hi - start):
            return True
    return False


def _changes_received(partial: Partial, buffered: list[tuple[int, bytes]], at: int,
                      start: int, stop: int, there: tuple[bytes, bytearray]) -> bool:
    """Whether a write of the torrent's bytes ``start:stop`` (``there``, see
    DiskIO._bytes_there) changes bytes the piece under way at ``at`` has received and
    stored: its ``buffered`` blocks are written out later, over what the write puts
    there. (The spans are copied at once: their writer may add to them meanwhile, and a
    block it is adding was stored before the write looked, which its writer then sees.)"""
    held = Intervals()
    held.spans = [[s, e] for s, e in list(partial.hasher.received.spans)]
    for b, data in buffered:
        held.remove(b, b + len(data))
    return _changes_held(held.spans, at, start, stop, there)


def _finished(t: Torrent) -> bool:
    """Whether every piece of ``t`` is verified (and it is not being removed)."""
    with t.lock:
        return not t.removed and not t.deleting and not any(
            s in t.state for s in (MISSING, PARTIAL, HASHING, COMMITTING))


def _mostly_pads(t: Torrent, piece: int) -> bool:
    """Whether pads (and symlinks) are more than three quarters of the piece."""
    if not t.layout.unstored:
        return False
    segs = t.layout.map(piece, 0, t.layout.piece_size(piece))
    return 4 * sum(s.length for s in segs if s.stored) < t.layout.piece_size(piece)


def _snapshot(bufs: Sequence[Buffer], length: int) -> memoryview:
    """``bufs`` copied, once, into memory of this thread's: what is then written and
    what is hashed are the same bytes, whatever the memory they came from does
    meanwhile. Valid until the thread's next call."""
    buf: memoryview | None = getattr(_snapshots, "buf", None)
    if buf is None or buf.nbytes < length:
        buf = memoryview(bytearray(max(length, BLOCK_SIZE)))
        if length <= SNAPSHOT_KEEP:
            _snapshots.buf = buf
    pos = 0
    for b in bufs:
        v = b if type(b) is memoryview else memoryview(b)
        buf[pos : pos + v.nbytes] = v
        pos += v.nbytes
    return buf[:pos]


@dataclass(frozen=True, slots=True)
class PieceResult:
    """Outcome of a completed piece; ``v1``/``v2`` are None where the torrent has no such hash.

    ``writers``: who gave blocks to the attempt that completed the piece (the
    ``writer`` of the writes: the daemon's client connections), sorted; empty when it
    was not completed by writes. A client that blames its peers for a failed piece
    needs to know whether the attempt was its own, and its own alone."""

    info_hash: bytes
    piece: int
    ok: bool
    v1: bool | None
    v2: bool | None
    writers: tuple[int, ...] = ()


PieceCallback = Callable[[PieceResult], None]
# (torrent key, {"piece", "errno", "message"}): a storage error was recorded.
ErrorCallback = Callable[[bytes, dict[str, Any]], None]
# A torrent's verified pieces changed other than by a piece's result (a check found
# pieces, or lost them; a file vanished): its key.
ChangeCallback = Callable[[bytes], None]
ERROR_EVENT_INTERVAL = 1.0  # seconds between two on_error calls of one torrent and errno
MERGED_PIECES = 64  # the pieces an error met again and again names, at most
# Journal records after which the torrent's resume record is rewritten (compaction);
# a torrent of many pieces waits longer, its record being bigger.
COMPACT_RECORDS = 4096
LOAD_SAVERS = 8  # threads writing the records of saved torrents again as they load
MAX_CACHED_READ = 16 * 1024 * 1024  # see DiskIO._cacheable
# Pieces being read whole into the cache at once, in bytes: this share of the budget (and
# always one piece). A read that finds no room reads its range alone.
FILLING_SHARE = 8
Pending = tuple[PieceResult, bytes]  # a committing piece's result and fingerprint


class DiskIO:
    """Storage for many torrents behind one buffer budget, handle pool and hash pool.

    ``sync_window``: 0 syncs and journals each verified piece before it is announced;
    a positive window batches the fdatasyncs of every piece verified within it (group
    commit). ``roots``: save paths must resolve inside one of these (None: anywhere).
    ``on_piece`` and ``on_error`` observe results and storage errors, ``on_change`` the
    verified pieces that came or went otherwise (a check, a vanished file); they are
    called from worker threads, and what one of them raises is logged, not raised to the
    caller whose write or check happened to tell it.
    """

    def __init__(
        self,
        backend: str = "posix",
        *,
        cache_bytes: int = 256 * 1024 * 1024,
        cache_policy: str = "arc",
        hash_workers: int | None = None,
        max_open_files: int = 16384,
        preallocate: bool = False,
        allow_hard_links: bool = False,
        sync_window: float = 0.0,
        roots: Sequence[Path] | None = None,
        on_piece: PieceCallback | None = None,
        on_error: ErrorCallback | None = None,
        on_change: ChangeCallback | None = None,
        metainfo_limits: dict[str, int] | None = None,
        state_dir: Path | None = None,
        max_partial_pieces: int = 4096,
        on_load: Callable[[int, int], None] | None = None,
    ) -> None:
        """``on_load(done, total)``: told as the saved torrents load, one by one (a
        library of tens of thousands takes a while; a service manager is told how far)."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        if backend == "uring":
            check_uring()  # refused here, with the reason, rather than at the first write
        if backend == "mmap" and not watch_leases():
            log.warning("mmap backend started outside the main thread: files are not "
                        "mapped (read and written as by posix)")
        self.pool = BufferPool(cache_bytes, cache_policy)
        self.hash_pool = HashPool(hash_workers)
        # Threads that hash part of a large block beside the thread writing it: one
        # fewer than the hash workers (none on one core), see PieceHasher.add_beside.
        self._aside = Aside(self.hash_pool.workers - 1) if self.hash_pool.workers > 1 else None
        self.handles = HandlePool(max_open_files)
        self.preallocate = preallocate
        self.allow_hard_links = allow_hard_links
        self.roots = [Path(r).resolve() for r in roots] if roots is not None else None
        self.on_piece = on_piece
        self.on_error = on_error
        self.on_change = on_change
        self.metainfo_limits = metainfo_limits or {}
        self.metrics = Stats()
        self.max_partial_pieces = max_partial_pieces
        self._partials = 0
        self._partials_lock = threading.Lock()
        self._shared_writes = threading.Lock()  # writes into files torrents share (_store)
        # The largest piece a read brings whole into the cache (the rest are read by range).
        self._cacheable = min(MAX_CACHED_READ, cache_bytes // 4)
        # Bytes of pieces being read whole into the cache (see _fill_room).
        self._filling = 0
        self._filling_limit = cache_bytes // FILLING_SHARE
        self._filling_lock = threading.Lock()
        # Whole-piece hash_piece / hash_piece_v2 at once, per file system (see _hash_slot).
        self._hash_slots: dict[int | None, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._making: list[Path] = []  # save paths of registers under way (under _lock)
        self._torrents: dict[bytes, Torrent] = {}
        self._count = 0  # torrents in it (each under one key or two): see _keep
        # Where each registered torrent's files begin (see _reshare), kept from one
        # register to the next: torrent id -> its places; place -> the torrents there;
        # the places, sorted (those inside a place follow it).
        self._share_lock = threading.Lock()
        # Where the files of moves and renames under way go: torrent id -> those paths
        # (under _lock). A torrent registered there meanwhile is refused (see _not_others).
        self._going: dict[int, frozenset[Path]] = {}
        self._places_of: dict[int, frozenset[str]] = {}
        self._at_place: dict[str, dict[int, Torrent]] = {}
        self._places: list[str] = []
        self._records: dict[int, TorrentRecord] = {}  # torrent id -> its state folder
        self._ids = itertools.count(1)
        self._committer = GroupCommit(self._commit, sync_window,
                                      lambda t: t.storage.root.device)
        self._telling = threading.local()  # .depth: this thread is inside on_piece
        self._stopping = threading.Event()  # set: checks of files in progress give up
        # What a stop may still wait for file times to settle (see _settle), ns.
        self._settle_left = SETTLE_BUDGET_NS
        self._settle_lock = threading.Lock()
        self._held_errors = threading.local()  # see errors_held
        self._on_load = on_load
        self.state = StateStore(state_dir) if state_dir is not None else None
        # (resolved once: no payload path may lead into it, see _not_in_state)
        self._state_real = Path(state_dir).resolve() if state_dir is not None else None
        self.load_errors: list[str] = []
        if self.state is not None:
            self._load_state()

    # -- registration ------------------------------------------------------------------
    def register(self, metainfo: bytes, save_path: str | Path) -> bytes:
        meta = parse(metainfo, **self.metainfo_limits)
        path = self._check_save_path(Path(save_path))
        try:
            self._refuse_registered(meta)  # before the save path is made: refused, nothing made
        except AlreadyRegistered:
            self._look_at_files(meta)
            raise
        storage = make_storage(self.backend, meta, path, self.handles, self.preallocate,
                               self.allow_hard_links, self.roots)
        try:
            self._not_in_state(path, map(storage.parts, storage.stored_files()))
        except BaseException:
            storage.close()
            raise
        new_folders = [f for f in (path, *path.parents) if not f.exists()]  # unmade if refused
        with self._lock:
            self._making.append(path)  # (a refused register leaves this one's folders)
        try:
            try:
                # Made, and held open from now on, walking down from its root: a parent
                # folder swapped for a symlink later, or meanwhile, leads nowhere else.
                storage.root.root(create=True)
            except BaseException:
                storage.close()
                raise
            return self._register(meta, metainfo, path, storage, new_folders)
        finally:
            with self._lock:
                self._making.remove(path)

    def _register(self, meta: Metainfo, metainfo: bytes, path: Path, storage: FileStorage,
                  new_folders: list[Path]) -> bytes:
        t = self._torrent(meta, storage)
        # Held alone until its files and state record exist: a client that finds it in
        # the table (an unregister, a write) waits for a torrent that is whole, or gone.
        t.enter_alone()
        try:
            with self._lock:
                try:  # again: another register may have won meanwhile
                    self._refuse_registered(meta)
                except AlreadyRegistered:
                    # Refused, nothing left: not the folder's descriptor, nor the folders
                    # this made (those another torrent has come to use stay).
                    storage.close()
                    used = {o.storage.save_path for o in self._torrents.values()}
                    others = list(self._making)  # registers under way, ours among them
                    others.remove(path)
                    used.update(others)
                    anchor = anchor_of(path, self.roots)
                    for folder in new_folders:
                        if not any(u == folder or u.is_relative_to(folder) for u in used):
                            with contextlib.suppress(OSError, PiecedError):
                                remove_folder(folder, anchor)  # (only if empty)
                    raise
                self._keep(t)
            self._reshare(t)
            try:
                with self._lock:  # (see _not_shared: one of the two sees the other)
                    moving = {o for os_ in t.shared.values() for o, _ in os_ if o.moving}
                    going = list(self._going.values())
                if moving:
                    raise BadRequest(
                        f"files of this torrent are being moved by torrent "
                        f"{min(o.key.hex() for o in moving)}: register it again once that is done")
                if going:  # (see _going_to: one of the two sees the other)
                    clash = _clash(frozenset().union(*going),
                                   [storage.file_path(i) for i in storage.stored_files()])
                    if clash is not None:
                        there, up = clash
                        where = ("is where another torrent's files (or their folders) are "
                                 "being moved" if up is None else
                                 f"would be below {up}, where another torrent's file is being "
                                 "moved")
                        raise BadRequest(f"{there} {where}: register it again once that is done")
                unmade = storage.create_empty_files()
                if self.state is not None:
                    rec = self.state.create(t.key, metainfo, path, meta.num_pieces)
                    self._records[t.id] = rec
                    with rec.save_lock:
                        self._save(t, rec)
            except BaseException as exc:
                made = self._records.pop(t.id, None)
                if made is not None:
                    with made.save_lock, made.journal_lock:
                        made.remove()
                t.remove()
                with self._lock:
                    self._forget(t)
                self._reshare(t)
                storage.close()
                if isinstance(exc, OSError):  # (the state folder's file, if it is one)
                    raise StorageIOError.wrap(exc, "register" + (
                        f": {exc.filename}" if exc.filename else "")) from None
                raise
            for error in unmade:  # (listed in its status and counted: see create_empty_files)
                self._tell_error(t, error, None, push=False)
        finally:
            t.leave_alone()
        return meta.info_hash

    def _torrent(self, meta: Metainfo, storage: FileStorage) -> Torrent:
        t = Torrent(next(self._ids), meta, storage)
        # Through a weak reference: the torrent holds its storage, and a closure over
        # it made a cycle that kept a removed torrent (a million pieces' arrays) until
        # the collector came by, a minute later.
        torrent = weakref.ref(t)

        def before_remaking(index: int) -> None:
            live = torrent()
            if live is not None:
                self._before_remaking(live, index)

        def kin(index: int) -> list[tuple[int, int]]:
            live = torrent()
            if live is None:
                return []
            return [ident for x, j in list(live.shared.get(index, ()))
                    if (ident := x.storage.identity(j)) is not None]

        storage.before_remaking = before_remaking
        storage.kin = kin
        return t

    def _look_at_files(self, meta: Metainfo) -> None:
        """A register of a torrent registered already: the client takes it up as it is
        (a torrent client started again, which looks for its data as Transmission does
        at a start). Its files deleted, renamed away, replaced or cut short behind
        pieced's back since it last used them are found so first, their verified pieces
        started over (journaled, told), as the next read of them would find; else a
        download found every piece verified and ended at once, nothing on disk. A stat
        of each file that holds a verified piece, not a read."""
        with self._lock:
            t = next((self._torrents[a] for a in meta.aliases if a in self._torrents), None)
        if t is None or not t.fence.try_shared():
            return  # (gone meanwhile; or rechecked, moved or removed now: looked at so)
        try:
            if self._root_moved(t):  # its save folder went, the files with it
                return
            lengths = t.meta.files.lengths
            with t.lock:
                state = t.state
                holding = [i for i in t.storage.stored_files() if lengths[i] and any(
                    state[p] == VERIFIED for p in t.layout.file_pieces(i))]
            for lost in t.storage.lost(holding):
                self._record_error(t, lost, None)
                self._tell_sharers(t, lost.file_index, by_name=True)
        finally:
            t.fence.release_shared()

    def _refuse_registered(self, meta: Metainfo) -> None:
        for alias in meta.aliases:
            if alias in self._torrents:
                lacking = (self._torrents[alias].meta.v2_unchecked()
                           and not meta.v2_unchecked())
                raise AlreadyRegistered(
                    f"torrent {alias.hex()} is already registered, with save path "
                    f"{self._torrents[alias].storage.save_path}" + (
                        " (from a metainfo without its piece layers: remove it, keeping "
                        "its files, and add this one to have its pieces checked by v2 too)"
                        if lacking else ""))

    def unregister(self, ih: bytes, delete_files: bool = False) -> None:
        """Forget a torrent, after the block I/O in flight. Pieces still committing are
        cancelled: no event of the torrent follows the reply to this call."""
        t = self._get(ih)
        t.enter_alone()
        try:
            rec = self._records.get(t.id)
            if rec is not None:
                # The step that commits the removal, before anything else changes: the
                # record says the files go, or (the files kept) it is set aside, never
                # to be loaded again. When the state folder refuses it (read-only, a
                # folder not ours) nothing changed: the torrent is still registered (a
                # record left in place would bring it back at the next start).
                with rec.save_lock, rec.journal_lock:
                    try:
                        if delete_files:
                            rec.mark_deleting()
                        else:
                            rec.set_aside()
                    except OSError as exc:
                        raise StorageIOError.wrap(
                            exc, f"unregister: its state record {rec.folder} cannot be "
                                 "changed") from None
            if delete_files:
                with self._lock:  # (two torrents sharing files, removed at once with them)
                    t.deleting = True
            self._committer.take(t)
            if not delete_files:
                with contextlib.suppress(StorageIOError):  # recorded; the files stay as they are
                    self._flush_torrent(t, sync=True)
            rec = self._records.pop(t.id, None)
            if rec is not None:
                with rec.save_lock, rec.journal_lock:
                    rec.remove(keep=delete_files)
            with t.lock:
                t.remove()
                partials, t.partial = list(t.partial.values()), {}
            self._count_partials(-len(partials))
            for partial in partials:
                partial.done = True
            for piece in self.pool.pieces_of(t.id):
                self.pool.drop((t.id, piece))
            try:
                if delete_files:
                    try:
                        t.storage.delete_files(keep=self._held_near(t))
                    finally:
                        t.storage.close()
                    if rec is not None:  # (not reached on an error: the next start tries)
                        rec.discard()
                else:
                    t.storage.close()
            finally:
                # Known until its files are gone: a register of the same torrent meanwhile
                # is refused (already registered), and its files are never the ones deleted.
                with self._lock:
                    self._forget(t)
                self._reshare(t)
        finally:
            t.leave_alone()

    def _held_near(self, t: Torrent) -> set[Path]:
        """The payload paths of the other torrents whose files begin where ``t``'s do,
        above or inside (see _reshare): the only ones whose files can be ``t``'s, their
        folders, or below them. (Every torrent in, above or below its save path looked
        at: among 8,000 torrents in one save path, a removal with the files took 60-80
        ms, the other clients waiting.)"""
        with self._share_lock:
            near = list(self._partners(t).values())
        held: set[Path] = set()
        with self._lock:
            near = [o for o in near if not o.deleting]
        for o in near:
            held.update(o.storage.file_path(i) for i in o.storage.stored_files())
        return held

    def _held_by_others(self, save: Path, but: Torrent | None = None) -> set[Path]:
        """The payload paths of the other torrents in, above or below ``save``: a torrent
        removed with its files leaves those (another torrent still holds its pieces
        there; cross-seeded torrents share their files)."""
        with self._lock:
            others = {o.id: o for o in self._torrents.values()
                      if o is not but and not o.deleting}.values()
        held: set[Path] = set()
        for o in others:
            there = o.storage.save_path
            if there == save or there.is_relative_to(save) or save.is_relative_to(there):
                held.update(o.storage.file_path(i) for i in o.storage.stored_files())
        return held

    def _reshare(self, changed: Torrent | None = None) -> None:
        """Find the files two registered torrents share (cross-seeding: one payload,
        two torrents): ``t.shared`` of each. Torrents are paired by where their files
        begin (a save path joined with the torrent's name, or with a renamed file's
        first part), the same place or one inside the other; only the files of such
        pairs are compared, path by path. ``changed``: the one torrent registered,
        removed, moved or renamed since the last call (only it and the torrents it
        shared with, or shares with now, are looked at: every torrent gone through at
        each register, one among 10,000 took 0.1 s, the others' requests waiting);
        None: every torrent (at start, before the records are written).

        A torrent that comes to share files has its record written again: while it
        runs, a record keeps its stamp of a file only if no torrent can write it (see
        _kept_stamps), and the one sharing it now may."""
        came = self._reshare_now(changed)
        if changed is not None:
            for x in came:
                if x is not changed:
                    self._save_now(x)

    def _reshare_now(self, changed: Torrent | None) -> list[Torrent]:
        """:meth:`_reshare`: the torrents that came to share files they did not."""
        with self._share_lock:
            if changed is None:
                with self._lock:
                    torrents = list({t.id: t for t in self._torrents.values()}.values())
                self._places_of.clear()
                self._at_place.clear()
                self._places.clear()
                for t in torrents:
                    self._place(t)
                affected = torrents
            else:
                with self._lock:
                    here = any(self._torrents.get(a) is changed for a in changed.meta.aliases)
                before = {o.id: o for os_ in changed.shared.values() for o, _ in os_}
                self._unplace(changed)
                if here:
                    self._place(changed)
                affected = [changed, *before.values(), *self._partners(changed).values()]
            done: set[int] = set()
            changes: list[tuple[Torrent, dict[int, list[tuple[Torrent, int]]]]] = []
            for t in affected:
                if t.id in done:
                    continue
                done.add(t.id)
                now = self._shared_with(t) if t.id in self._places_of else {}
                if now or t.shared:  # (most share nothing, before and after)
                    changes.append((t, now))
            if not changes:
                return []
            came = [t for t, now in changes if not set(now) <= set(t.shared)]
            # The shares change with no write into shared files under way (it looked up
            # whose pieces it writes into before they changed), and each torrent that
            # comes to share waits for its writes that took it as sharing nothing: a
            # torrent registered meanwhile, and checked at once, took the bytes there
            # for its verified pieces, and the write then went over them unseen (another
            # torrent's bad block, in a piece reported verified, after a restart too).
            with self._shared_writes:
                for t, now in changes:
                    with t.lock:
                        t.shared = now
                        t.storage.shared_files = frozenset(now)
                for t, now in changes:
                    if now:
                        with t.lock:
                            while t.plain_writes:
                                t.plain_awaited = True
                                t.plain_done.wait()
                            t.plain_awaited = False
            return came

    def _place(self, t: Torrent) -> None:
        """Index where ``t``'s files begin (the caller holds _share_lock)."""
        # (As strings: with Path objects, hashed and split up to the root for every
        # torrent, a register among 1,000 torrents took 0.15 s.)
        places = self._places_of[t.id] = frozenset(_tops(t))
        for place in places:
            there = self._at_place.get(place)
            if there is None:
                there = self._at_place[place] = {}
                bisect.insort(self._places, place)
            there[t.id] = t

    def _unplace(self, t: Torrent) -> None:
        for place in self._places_of.pop(t.id, ()):
            there = self._at_place[place]
            del there[t.id]
            if not there:
                del self._at_place[place]
                del self._places[bisect.bisect_left(self._places, place)]

    def _partners(self, t: Torrent) -> dict[int, Torrent]:
        """The torrents whose files begin where ``t``'s do, above or inside."""
        found: dict[int, Torrent] = {}
        for place in self._places_of.get(t.id, ()):
            parts = place.split("/")
            for k in range(1, len(parts) + 1):  # the place itself, and those above it
                found.update(self._at_place.get("/".join(parts[:k]), {}))
            below = place + "/"
            i = bisect.bisect_left(self._places, below)
            while i < len(self._places) and self._places[i].startswith(below):
                found.update(self._at_place[self._places[i]])
                i += 1
        found.pop(t.id, None)
        return found

    def _shared_with(self, t: Torrent) -> dict[int, list[tuple[Torrent, int]]]:
        """``t``'s files that its partners have too: file index -> (partner, its index),
        partners in the order they registered."""
        partners = self._partners(t)
        if not partners:
            return {}
        mine = {t.storage.file_path(i): i for i in t.storage.stored_files()}
        shared: dict[int, list[tuple[Torrent, int]]] = {}
        for _, o in sorted(partners.items()):
            for j in o.storage.stored_files():
                i = mine.get(o.storage.file_path(j))
                if i is not None:
                    shared.setdefault(i, []).append((o, j))
        return shared

    def _store(self, t: Torrent, segs: Sequence[Segment], bufs: Sequence[Buffer]) -> int:
        """``t.storage.writev``, and what it means for the torrents sharing the files.

        Cross-seeded torrents share their files: bytes written for one land in pieces
        the others may have verified, or have under way. The write wins, as in
        libtorrent, but what the others verified is not taken on trust any more (a bad
        block for one went into the other's verified piece, which stayed reported
        verified). Before a write that changes the bytes there, their pieces under it
        start over, as for a file that vanished (journaled first), and are checked
        again once it is done; a write of the bytes already there (two torrents of one
        payload both downloading: the usual case) changes nothing. Each write counts in
        ``written_into`` before and after, so a check that read a piece meanwhile does
        not take its answer; a piece a check found good during the write, or one a
        write of the same bytes may have put back over another's, is checked again.
        """
        with t.lock:  # (against _reshare: either it waits for this write, or it is seen)
            plain = not t.shared
            if plain:
                t.plain_writes += 1
        if plain:
            try:
                return t.storage.writev(segs, bufs)
            finally:
                with t.lock:
                    t.plain_writes -= 1
                    if t.plain_awaited and not t.plain_writes:  # (a notify costs, per block)
                        t.plain_done.notify_all()
        # One write into shared files at a time: a write of "the bytes already there"
        # is that only if no other lands between the look and the write.
        with self._shared_writes:
            return self._store_shared(t, segs, bufs)

    def _store_shared(self, t: Torrent, segs: Sequence[Segment], bufs: Sequence[Buffer]) -> int:
        """Write into files other torrents share (cross-seeding): their pieces whose
        bytes the write changes start over (told), and are checked again once it is
        done; those it leaves as they were are left alone. (The write was compared
        whole: a block of the bytes a verified piece of the other torrent holds, running
        on into zeros not yet written, cleared that piece, and a kill -9 before its check
        lost it for good.) A piece under way starts over only where the write changes
        bytes it has received: two torrents of one payload downloading at once write
        into each other's pieces where the other has nothing yet, and each such write
        threw the other's piece away (a fifth to a third of the blocks sent twice).
        Each changed piece's ``written_over`` moves before the write, so that a block of
        it stored meanwhile, not yet counted received, is seen by its writer as written
        over (see write_blocks_direct)."""
        plan: list[tuple[Torrent, int, range, frozenset[int], list[int], list[int]]] = []
        try:
            for seg in segs:
                others = t.shared.get(seg.file_index) if seg.stored else None
                if not others:
                    continue
                there = self._bytes_there(t, seg, bufs)
                for x, j in others:
                    x.storage.note_written(j)  # (its times are the daemon's doing from now on)
                    # The other torrent may say the file is shorter: only what lies inside
                    # its length is in its pieces.
                    first, end = x.meta.files.offsets[j], x.meta.files.offsets[j + 1]
                    start = first + seg.file_offset
                    stop = min(start + seg.length, end)
                    if start >= stop:
                        continue
                    size = x.layout.piece_length
                    pieces = range(start // size, (stop - 1) // size + 1)
                    changed = [p for p in pieces if there is None or _differs(
                        there, max(p * size, start) - start, min((p + 1) * size, stop) - start)]
                    with x.lock:
                        for p in changed:
                            x.written_into[p] = x.written_into.get(p, 0) + 1
                            x.written_over[p] = x.written_over.get(p, 0) + 1
                            self.pool.drop_clean((x.id, p))  # (what it cached of them is stale)
                        seen = [x.written_into.get(p, 0) for p in pieces]
                        verified = [p for p in changed if x.state[p] == VERIFIED]
                        over = [p for p in changed
                                if self._written_over(x, p, start, stop, there)]
                    if verified:
                        # Journaled before the write, or the write is refused (a full state
                        # folder): a crash after it brought them back verified over its bytes.
                        rec = self._records.get(x.id)
                        with _journal_lock(rec):
                            self._journal_clears(x, rec, verified, must=True)
                    with x.lock:
                        for p in over:
                            self.pool.drop((x.id, p))  # (with the blocks of a piece started over)
                    if over:
                        self._start_over(x, j, verified=True, partial=True, pieces=over,
                                         journaled=verified)
                    plan.append((x, j, pieces, frozenset(changed), seen, verified))
            return t.storage.writev(segs, bufs)
        finally:
            # (Also when the write was refused: the pieces started over before it are
            # checked again.)
            for x, j, pieces, wrote, seen, verified in plan:
                with x.lock:
                    # Pieces another write went into meanwhile: what this one found
                    # there is not what it wrote over.
                    redo = [p for p, was in zip(pieces, seen, strict=True)
                            if p in wrote or x.written_into.get(p, 0) != was]
                    for p in redo:
                        x.written_into[p] = x.written_into.get(p, 0) + 1
                        # (Not the blocks: of a piece under way that the write left be,
                        # or started anew meanwhile: they go over what it wrote.)
                        self.pool.drop_clean((x.id, p))
                    found = [p for p in redo if x.state[p] == VERIFIED]
                if found:
                    self._start_over(x, j, verified=True, partial=False, pieces=found)
                self._check_again(x, sorted({*verified, *found}))

    def _written_over(self, x: Torrent, p: int, start: int, stop: int,
                      there: tuple[bytes, bytearray] | None) -> bool:
        """(Caller holds ``x.lock``.) Whether a write of ``x``'s bytes ``start:stop``
        (``there``: see _bytes_there, None where the file could not be read) changes
        what piece ``p`` of ``x`` holds, so that it starts over: a piece verified or
        committing, if it changes its bytes at all; one under way (or being hashed: its
        buffered blocks are written out after the write, over it) or parked, only if it
        changes bytes it has received (its own blocks go over the rest). A piece missing
        and not parked holds nothing: it is not started over, since by the time it would
        be (the torrent's lock let go meanwhile) a writer may have begun it, and the
        blocks it buffered would go with it, sent for nothing. (A torrent being removed
        has no pieces under way left.)"""
        state = x.state[p]
        if state == MISSING:
            k = x.parked.get(p)
            return k is not None and (
                there is None or _changes_held(k[0], p * x.layout.piece_length, start, stop,
                                               there))
        if there is None:
            return True
        if state in (PARTIAL, HASHING):
            q = x.partial.get(p)
            return q is not None and _changes_received(
                q, self.pool.dirty_blocks((x.id, p)), p * x.layout.piece_length, start, stop,
                there)
        return True

    @staticmethod
    def _bytes_there(t: Torrent, seg: Segment, bufs: Sequence[Buffer],
                     ) -> tuple[bytes, bytearray] | None:
        """(the bytes to be written where ``seg`` goes, those the file holds there), or
        None where the file cannot be read (taken as changed). A file not made yet holds
        zeros (a backend that gathers the blocks of a piece makes it at the first piece
        written out: the other torrent's blocks under way are all in its buffers)."""
        new = b"".join(sub_views(bufs, seg.buf_offset, seg.buf_offset + seg.length))
        old = bytearray(seg.length)
        try:
            t.storage.readinto([seg._replace(buf_offset=0)], memoryview(old))
        except PiecedError as exc:
            if not _never_made(exc):
                return None
        return new, old

    def _check_again(self, t: Torrent, pieces: Sequence[int]) -> None:
        """Queue pieces to be checked on the torrent's one checking thread, started if
        none runs: one a write would pile up threads, each waiting for the torrent."""
        if not pieces:
            return
        with t.lock:
            t.to_check.update(pieces)
            t.reverifying = max(t.reverifying, len(t.to_check))
            start, t.checker = not t.checker, True
        if start:
            threading.Thread(target=self._checker, args=(t,), daemon=True,
                             name="pieced-reverify").start()

    def _checker(self, t: Torrent) -> None:
        while True:
            with t.lock:
                todo = sorted(t.to_check)
                t.to_check.clear()
                if not todo or t.removed:
                    t.checker = False
                    return
            self._reverify(t, todo)

    def torrents(self) -> list[bytes]:
        with self._lock:
            return sorted({t.key for t in self._torrents.values()})

    def _keep(self, t: Torrent) -> None:
        """``t`` in the table under each of its keys (caller holds ``_lock``)."""
        for alias in t.meta.aliases:
            self._torrents[alias] = t
        self._count += 1

    def _forget(self, t: Torrent) -> None:
        """``t`` out of the table (caller holds ``_lock``); once, however often asked."""
        gone = [alias for alias in t.meta.aliases if self._torrents.get(alias) is t]
        for alias in gone:
            del self._torrents[alias]
        self._count -= bool(gone)

    def _how_many(self) -> int:
        """How many torrents are registered (a hybrid is known by two keys). (Counted
        from the keys at each report, the stats of 10,000 torrents cost 2 ms of the
        event loop, every /metrics scrape.)"""
        return self._count

    def torrent(self, ih: bytes) -> Torrent:
        return self._get(ih)

    def knows(self, ih: bytes) -> bool:
        """Whether a torrent is registered under ``ih`` (any of its keys)."""
        return bytes(ih) in self._torrents

    def _get(self, ih: bytes) -> Torrent:
        """The torrent of a 20-byte key, or of a whole (32-byte) v2 info-hash, whose
        last 12 bytes must be the torrent's too (not any hash that starts the same)."""
        key = bytes(ih)
        t = self._torrents.get(key[:20] if len(key) == 32 else key)
        if t is None or (len(key) == 32 and t.meta.info_hash_v2 != key):
            raise UnknownTorrent(f"unknown info_hash {key.hex()}")
        return t

    def fenced(self, ih: bytes) -> bool:
        """Whether a torrent-wide operation holds or awaits the torrent: its block I/O
        will wait (the daemon runs such jobs off its short-request workers)."""
        t = self._torrents.get(bytes(ih))
        return t is not None and t.fence.contended

    def device(self, ih: bytes) -> int | None:
        """The file system (device) of the torrent's save path, once opened; None for a
        torrent not known or not opened yet."""
        t = self._torrents.get(bytes(ih))
        return t.storage.root.device if t is not None else None

    @contextlib.contextmanager
    def _alone(self, ih: bytes) -> Iterator[Torrent]:
        """The torrent held alone, its committing pieces committed: a fenced operation."""
        t = self._get(ih)
        t.enter_alone()
        try:
            pieces = self._committer.take(t)
            if pieces:
                self._commit(t, pieces)
            yield t
        finally:
            t.leave_alone()

    def _check_save_path(self, path: Path) -> Path:
        """The save path, resolved, refused outside the roots (the storage makes it)."""
        if "\0" in str(path):
            raise PathEscape("save path contains a NUL byte")
        if not path.is_absolute():
            path = Path.cwd() / path
        try:
            resolved = path.resolve()
        except OSError as exc:  # (a folder swapped for a symlink while it was read)
            raise StorageIOError.wrap(exc, f"save path {path}") from None
        except RuntimeError:  # (pathlib's word for a symlink loop)
            raise StorageIOError(f"save path {path}: a loop of symlinks",
                                 errno=errno.ELOOP) from None
        anchor_of(resolved, self.roots)
        return resolved

    # -- durable state ----------------------------------------------------------------
    def _save(self, t: Torrent, rec: TorrentRecord, stamps: bool = False) -> bool:
        """Compact the journal into the resume record (caller holds ``rec.save_lock``).

        The bitfield is taken and the journal starts its next generation under the
        journal lock, so the record and the new generation together hold every
        piece: none is lost if the write below fails or the process dies during it.
        """
        if rec.removed:
            return True
        taken = None
        if rec.written is not None:
            # A record that would say what the one on disk says (a torrent seeded or
            # left alone since): not written again, the journal not rotated (what it
            # holds still follows that record). A clean stop of 17,000 idle torrents
            # spent 16 s and more in their records' two fsyncs each.
            with rec.journal_lock:
                with t.lock:
                    have, fps = bytes(t.have), bytes(t.fingerprints)
                    doubted = bool(t.unrecorded)
                quiet = not rec.records
            if quiet and not doubted:
                taken = self._record_files(t, stamps)
                if rec.says(have, fps, *taken):
                    return True
        with rec.journal_lock:
            with t.lock:
                have, fps = bytes(t.have), bytes(t.fingerprints)
                unrecorded = set(t.unrecorded)
            gen = rec.rotate()
        # A stop's stamps just taken hold (nothing writes any more: every file is
        # flushed and closed), not taken again; a running save's are taken after the
        # bitfield, as ever (they are no stat of the files, only what is known of them).
        files, partial = taken if taken is not None and stamps else self._record_files(t, stamps)
        try:
            rec.write_resume(have, fps, gen, files, partial)
            with rec.journal_lock:  # (the record names these files now, durably)
                t.inodes_said = _inodes(files)
        except OSError as exc:
            # The journal still holds it all: nothing of the torrent is lost or changed,
            # and there is nothing for its clients to do. Counted and listed, not pushed
            # (pieced-peer, told a disk error, stopped its download: the state folder's
            # disk was full, with room enough for the journal).
            self._tell_error(t, StorageIOError.wrap(exc, "save resume"), None, push=False)
            return False
        if unrecorded:  # the record now says they are not verified
            with t.lock:
                t.unrecorded.difference_update(unrecorded)
        return True

    def _record_files(self, t: Torrent, stamps: bool
                      ) -> tuple[list[list[int]] | None, list[tuple[int, int, int]]]:
        """The file stamps and the pieces under way a record of ``t`` holds (see _save)."""
        if not stamps:
            return _kept_stamps(t), []
        folders: dict[str, bool] = {}
        files = [self._stamp(t.storage, i, folders) if not flag & UNSTORED else [0, 0, 0, 0]
                 for i, flag in enumerate(t.meta.files.flags)]
        self._settle(t.storage, files, folders)
        # The pieces under way, their blocks flushed: taken up again by the next
        # start if their files are still as stamped (a clean stop's alone).
        with t.lock:
            under_way = [(p, list(part.hasher.received.spans))
                         for p, part in t.partial.items() if not part.done]
            under_way += [(p, [[b, e] for b, e in spans]) for p, (spans, _) in t.parked.items()]
        return files, [(p, s, e) for p, spans in under_way for s, e in spans]

    def _settle(self, storage: FileStorage, files: list[list[int]],
                folders: dict[str, bool]) -> None:
        """Take again, once the clock has moved past their times' step, the stamps of
        files changed in the step they were taken in (the daemon's last writes at a
        stop): an edit later in that step would keep the times they hold, and the next
        start would take the file as it left it. The wait is bounded for the whole stop
        (``_settle_left``): file times ahead of this clock (a server's) cannot hold it."""
        now = time.time_ns()
        waits = {i: w for i, s in enumerate(files) if (w := unsettled_for(s, now))}
        if not waits:
            return
        with self._settle_lock:  # (the records of a stop are saved by several threads)
            wait = min(max(waits.values()), self._settle_left)
            if wait > 0:
                self._settle_left -= wait
        if wait > 0:
            time.sleep(wait / 1e9)
        for i in waits:
            files[i] = self._stamp(storage, i, folders)

    @staticmethod
    def _stamp(storage: FileStorage, index: int, folders: dict[str, bool]) -> list[int]:
        """The stamp a clean stop records of a payload file: one that never matches if
        the file under its name is not the one the daemon used, or if it changed since
        the daemon first looked at it, unless the daemon wrote it since. (A file only
        read, seeded, kept the stamp of an edit made meanwhile: the next start took it
        as it was.)"""
        identity = storage.identity(index)
        stamp = file_stamp(storage.file_path(index), identity, folders)
        seen = storage.start_stamps.get(index)
        if ((seen is not None and index not in storage.written
                and (stamp != seen or index in storage.racy)) or index in storage.doubted):
            stamp[2] = -1  # changed behind our back since the start: what it holds is unknown
        return stamp

    def _compact_if_due(self, t: Torrent, now: bool = False) -> None:
        rec = self._records.get(t.id)
        if rec is None or not (now or rec.records >= max(COMPACT_RECORDS,
                                                         t.meta.num_pieces // 8)):
            return
        if rec.save_lock.acquire(blocking=False):  # another thread is already saving
            try:
                self._save(t, rec)
            finally:
                rec.save_lock.release()

    def _save_now(self, t: Torrent, stamps: bool = False) -> bool:
        rec = self._records.get(t.id)
        if rec is None:
            return True
        with rec.save_lock:
            return self._save(t, rec, stamps)

    def _save_location(self, t: Torrent) -> None:
        rec = self._records.get(t.id)
        if rec is None:
            return
        try:
            with rec.save_lock:
                rec.write_location(t.storage.save_path, dict(t.storage.renames))
        except OSError as exc:
            raise StorageIOError.wrap(exc, "save the torrent's location") from None

    def _finish_move(self, saved: Loaded, storage: FileStorage
                     ) -> tuple[FileStorage, bool, set[int]]:
        """Finish a move or rename a crash cut short (the files not yet where the record
        says are where they were), or, when that cannot be done (the place it was going
        to is full, read-only, or has a file in the way), undo it: the files go back
        where they were, and the torrent stays there. (The storage the torrent is to
        have, whether the record is to be written anew, the files whose pieces are to be
        checked again.) PiecedError when neither can be done: the torrent is not loaded,
        and its record is left as it is for a later start (a verified piece of a file
        not found where the torrent is loaded would be forgotten)."""
        if saved.previous is None:
            return storage, False, set()
        old, renames = saved.previous
        if self._outside_roots(Path(old)):
            return storage, True, set()  # not looked for outside the roots; recorded anew
        if Path(old) != storage.save_path and self._moved_from_nowhere(
                storage, Path(old), saved.have):
            raise StorageIOError(
                f"the folder its move was from, {old}, is not there (a disk not mounted "
                f"yet?), and files with verified pieces are not in {storage.save_path}: "
                "left as it is until a start finds it", errno=errno.ENOENT)
        # (the files the state folder names by their inode: one not moved yet is compared
        # where it is; one moved is not, its inode maybe new: copied to another disk)
        inodes = _inodes(_stamps_since(saved.stamps, set(), saved.inodes or {},
                                       len(saved.metainfo.files.lengths)))
        try:
            n, doubtful, changed = storage.finish_move(Path(old), renames, inodes)
        except (OSError, PiecedError) as exc:
            back = make_storage(self.backend, saved.metainfo, Path(old), self.handles,
                                self.preallocate, self.allow_hard_links, self.roots)
            back.renames.update(renames)
            try:
                # (from where the move was going: files the daemon copied there have
                # inodes of their own)
                n, doubtful, changed = back.finish_move(storage.save_path,
                                                        dict(storage.renames))
            except (OSError, PiecedError) as again:
                back.close()
                raise StorageIOError(
                    f"its move to {storage.save_path} could not be finished ({exc}) nor "
                    f"undone ({again}): left as it is until a start can do either") from None
            storage.close()
            self.load_errors.append(
                f"torrent {saved.ih_hex}: its move to {storage.save_path} could not be "
                f"finished ({exc}): undone, its files are in {old}")
            storage, old = back, str(storage.save_path)  # (brought back from there)
        if n:
            log.info("torrent %s: %d files moved to %s, where a move was going", saved.ih_hex,
                     n, storage.save_path)
        for i in sorted(doubtful):
            self.load_errors.append(
                f"torrent {saved.ih_hex}: {storage.file_path(i)} is in the way of its move "
                f"from {old} (left as it is, and both kept): its pieces are checked again")
        for i in sorted(changed - doubtful):
            self.load_errors.append(
                f"torrent {saved.ih_hex}: {storage.file_path(i)} was not the file its "
                "pieces were verified in when its move was finished (another put in its "
                "place while the daemon was down?): its pieces are checked again")
        return storage, True, doubtful | changed

    @staticmethod
    def _moved_from_nowhere(storage: FileStorage, old: Path, have: bytes | bytearray) -> bool:
        """Whether the folder a move cut short was from is not there while files with
        verified pieces (``have``) are missing where it was going: they are where it
        was, out of sight (a disk not mounted at this start). Finished, the move took
        them for moved already and recorded the new place: they were left behind for
        good, and their verified pieces lost. (Every such file there: the move was over
        but for its record; a file never written is nowhere.)"""
        if not storage.stores:
            return False  # (files never made: nowhere, wherever the move was)
        try:
            gone = storage.beneath(old)
        except PiecedError:
            return False  # (outside the roots: not looked for)
        try:
            gone.root()
            return False
        except PiecedError as exc:
            if exc.errno != errno.ENOENT:
                return False  # (there, and the move says what it meets)
        finally:
            gone.close()
        layout = Layout(storage.meta)
        lengths = storage.meta.files.lengths
        return any(lengths[i] and storage.root.stat(storage.parts(i)) is None
                   and any(have[p >> 3] & (0x80 >> (p & 7)) for p in layout.file_pieces(i))
                   for i in storage.stored_files())

    def _outside_roots(self, path: Path) -> bool:
        """Whether a recorded path now resolves outside the allowed roots (they changed,
        or a folder was swapped while the daemon was stopped)."""
        return self.roots is not None and not any(
            path.resolve().is_relative_to(r) for r in self.roots)

    def _load_state(self) -> None:
        """Re-register every saved torrent with the pieces its record and journal prove."""
        assert self.state is not None
        told = self._on_load or (lambda done, total: None)
        told(0, 0)
        loaded, deletions, self.load_errors = self.state.load_all(
            lambda raw: parse(raw, **self.metainfo_limits),
            self.metainfo_limits.get("max_bytes", MAX_METAINFO_BYTES), lambda: told(0, 0))
        # File stamps are compared at every start: a clean stop's, or those a record
        # written while the daemon ran kept of the files it could not have written since
        # (see _kept_stamps), but for the files of pieces the journals cleared since (they
        # may have been written, their times the daemon's own) and those of a move a
        # crash cut short; they can only put pieces in doubt.
        ends: list[tuple[Torrent, TorrentRecord, str, str | None, bool, list[int], bool]] = []
        # After a crash: what the backend's own writes left half done is put right.
        crashed: list[tuple[Torrent, list[list[int]] | None]] = []
        for done, (saved, next_gen) in enumerate(loaded):
            told(done, len(loaded))
            try:
                meta: Metainfo = saved.metainfo
                save = Path(saved.save_path)
                if self._outside_roots(save):
                    # The roots changed, or the folder was swapped while we were stopped.
                    raise PathEscape(f"its save path {save} is outside the allowed roots "
                                     "(kept on disk, not loaded)")
                storage = make_storage(self.backend, meta, save, self.handles,
                                       self.preallocate, self.allow_hard_links, self.roots)
                storage.renames.update(saved.renames)
                absent = False  # the save folder is not there (a disk not mounted yet?)
                try:
                    storage.root.root()
                except PiecedError as exc:  # gone for now: said at its first use
                    absent = exc.errno == errno.ENOENT
            except Exception as exc:  # a damaged record must not stop the daemon
                self.load_errors.append(f"state of torrent {saved.ih_hex} skipped: {exc}")
                continue
            try:
                storage, moved, doubtful = self._finish_move(saved, storage)
            except PiecedError as exc:
                storage.close()
                self.load_errors.append(f"state of torrent {saved.ih_hex} skipped: {exc}")
                continue
            if moved:  # looked at again where the move left it (the folder made since?)
                try:
                    storage.root.root()
                    absent = False
                except PiecedError as exc:
                    absent = exc.errno == errno.ENOENT
            t = self._torrent(meta, storage)
            t.fingerprints[:] = saved.fingerprints
            # Fingerprints of an older form (pads hashed as zeros) are dropped where the
            # piece has pads, and those pieces are checked again by the torrent's hashes,
            # as pieces in doubt are: kept verified without a fingerprint, a whole read
            # of one could no longer tell its bytes changed behind our back.
            old_form: set[int] = set()
            if saved.fingerprint_form != FINGERPRINT_FORM:
                old_form = t.layout.padded_pieces()
                for q in old_form:
                    t.set_fingerprint(q, NO_FINGERPRINT)
            n = meta.num_pieces
            t.load_have(saved.have)
            said = [p for p, st in enumerate(t.state) if st == VERIFIED]
            suspect: set[int] = {p for i in doubtful for p in t.layout.file_pieces(i)
                                 if t.state[p] == VERIFIED}
            again = {p for p in old_form if t.state[p] == VERIFIED}
            if again:
                suspect |= again
                self.load_errors.append(
                    f"torrent {saved.ih_hex}: {len(again)} verified pieces with pads are "
                    "checked again (their fingerprints were of an older form)")
            # (a torrent with nothing verified, a new download, has no file to look at)
            lengths, flags = meta.files.lengths, meta.files.flags
            folders: dict[str, bool] = {}  # (each looked at once)
            # The save folder not there (a disk not mounted yet): its files are taken for
            # gone, and their pieces missing, as the record is saved; but the record is
            # marked as a check's under way, so that every start looks for the missing
            # pieces again until one finds the folder (they were forgotten for good).
            keep_looking = absent and VERIFIED in t.state
            if keep_looking:
                self.load_errors.append(
                    f"torrent {saved.ih_hex}: its save path {save} is not there: its "
                    f"{t.count(VERIFIED)} verified pieces are missing until a start finds "
                    "it, which checks them again (or a recheck, once it is back)")
            short: set[int] = set()  # files gone or shorter than their length
            stamps = _stamps_since(saved.stamps, {i for p in saved.cleared for i in t.files_of(p)},
                                   saved.inodes or {}, len(lengths))
            t.inodes_said = _inodes(stamps)
            if not self.state.was_clean:
                crashed.append((t, stamps))
            # A move or rename a crash cut short, finished or undone above: the files it
            # took from one name to another have a new change time (a link), and a new
            # inode if copied to another file system: compared on the rest (see
            # _moved_stamp_kept). The others are as any file.
            moving = _moved_files(saved) if saved.previous is not None else set()
            one_fs = bool(moving) and _one_file_system(saved)
            for i in range(len(lengths) if VERIFIED in t.state else 0):
                if flags[i] & UNSTORED or lengths[i] == 0:
                    continue
                pieces = [p for p in t.layout.file_pieces(i) if t.state[p] == VERIFIED]
                if not pieces:
                    continue
                stamp = file_stamp(storage.file_path(i), folders=folders)
                storage.take_stamp(i, stamp)
                if stamp[0] < lengths[i]:
                    # Gone or short: the pieces with bytes past its end went with them. A
                    # file short from the start (another client's partial download, sparse)
                    # keeps those a check found before its end, as in libtorrent.
                    short.add(i)
                    begin, size = meta.files.offsets[i], max(stamp[0], 0)
                    pl = t.layout.piece_length
                    for p in pieces:
                        if min((p + 1) * pl, begin + lengths[i]) - begin > size:
                            t.set_state(p, MISSING)
                    pieces = [p for p in pieces if t.state[p] == VERIFIED]
                if stamps is not None and not (
                        _moved_stamp_kept(stamps, i, stamp, one_fs) if i in moving
                        else _stamp_kept(stamps, i, stamp)):
                    # Changed behind our back while we were stopped, short or not (a short
                    # file's stamp was taken to be looked at alone: edited, it kept every
                    # piece before its end).
                    suspect.update(pieces)
            for p in suspect:
                t.set_state(p, MISSING)
            if saved.partial and saved.stamps is not None:
                self._take_up(t, saved.partial, saved.stamps, folders)
            if VERIFIED in t.state:
                # Known at their full length (so that one found shorter later was cut
                # behind our back), but those short now: their first use took them for
                # cut, and dropped the pieces kept before their ends.
                storage.known_written(
                    i for i, flag in enumerate(flags)
                    if not flag & UNSTORED and i not in short
                    and any(t.state[p] == VERIFIED for p in t.layout.file_pieces(i)))
            try:
                unmade = storage.create_empty_files()
            except PiecedError as exc:  # a vanished folder: say so, go on
                unmade = [exc]
            for error in unmade:  # (a folder in an empty file's place, a planted symlink)
                self.load_errors.append(f"torrent {saved.ih_hex}: {error}")
            rec = self.state.record(saved.ih_hex, next_gen)
            rec.written = saved.said  # (a record that still says all is not written again)
            self._records[t.id] = rec
            with self._lock:
                self._keep(t)
            if saved.damaged is not None:
                self.load_errors.append(
                    f"torrent {saved.ih_hex}: {saved.damaged}; rebuilt from its journal "
                    f"({t.count(VERIFIED)} pieces), rechecking "
                    f"{'every piece' if saved.checking == 'all' else 'the rest'}")
            elif saved.why_checked is not None:
                self.load_errors.append(
                    f"torrent {saved.ih_hex}: {saved.why_checked}; every piece is checked "
                    f"again ({t.count(VERIFIED)} reported verified meanwhile)")
            if saved.checking == "all":  # a recheck cut short (or a damaged journal):
                suspect = set(range(n))     # carried out again, whole
            elif saved.checking or saved.damaged is not None:
                # Only what the journal proved is known, or a check was looking for the
                # pieces not yet found: they are looked for.
                suspect = {p for p in range(n) if t.state[p] == MISSING}
            scope = ("all" if saved.checking == "all" else "missing"
                     ) if suspect or keep_looking else None
            if absent:
                suspect = set()  # (nothing can be found there now: looked for next time)
            t.unrecorded.update(p for p in said if t.state[p] != VERIFIED)
            if suspect:
                t.reverifying = len(suspect)  # (said from now on, not once the thread runs)
            # Each torrent's record is written again (two syncs): on threads, the file
            # system takes the syncs of several records at once (one after the other, a
            # start with 4,000 torrents spent 4 of its 6 s in them).
            ends.append((t, rec, saved.ih_hex, scope, moved, sorted(suspect),
                         saved.checking == "all"))
        # The files torrents share, known before their records are written: a record
        # keeps no stamp of a file another torrent may write (see _kept_stamps).
        self._reshare()
        for t, stamps in crashed:  # (once the files they share are known)
            t.storage.after_crash(functools.partial(_crash_floor, t, stamps))
        saving = ThreadPoolExecutor(LOAD_SAVERS, thread_name_prefix="pieced-load")
        try:
            saves = [saving.submit(self._loaded, *end) for end in ends]
            for future in saves:  # (told on: a service manager waits for the start)
                told(len(loaded), len(loaded))
                future.result()
        finally:
            saving.shutdown()
        for deletion in deletions:  # (after the torrents: files one of them holds stay)
            self._finish_deletion(deletion)
        try:
            self.state.mark_running()
        except OSError as exc:
            self.load_errors.append(f"state folder: {exc}")

    def _loaded(self, t: Torrent, rec: TorrentRecord, ih_hex: str, scope: str | None,
                moved: bool, suspect: list[int], whole: bool) -> None:
        """The end of a saved torrent's load: its record written again, the check of the
        pieces in doubt started."""
        with rec.save_lock:
            try:  # before the record below forgets them: a crash meanwhile loses none
                rec.mark_checking(scope)
            except OSError as exc:
                self.load_errors.append(f"torrent {ih_hex}: {exc}")
            # The replayed journals become the resume record, without the pieces in
            # doubt (``t.unrecorded``). Until it is written (a full state disk), the
            # record still says those are verified: they take no block (as any piece
            # whose loss is not recorded), or a crash would bring them back over it.
            self._save(t, rec)
        if moved:
            try:
                self._save_location(t)  # the move is over
            except StorageIOError as exc:
                self.load_errors.append(f"torrent {ih_hex}: {exc}")
        if suspect:
            threading.Thread(target=self._reverify, args=(t, suspect, whole),
                             name="pieced-reverify", daemon=True).start()

    def _take_up(self, t: Torrent, partial: dict[int, list[tuple[int, int]]],
                 stamps: list[list[int]], folders: dict[str, bool]) -> None:
        """The pieces a clean stop left under way, with the byte ranges of them it had
        in their files: under way again, so that only the rest of each is fetched (as
        libtorrent keeps unfinished pieces in its resume data). Not where a file of the
        piece changed since (its stamp): what it holds there is not known. Their hash
        state is made from the disk when the last block comes in, and a bad byte there
        fails the piece, which is then fetched whole."""
        storage = t.storage
        same: dict[int, bool] = {}

        def unchanged(i: int) -> bool:
            if i not in same:
                stamp = storage.start_stamps.get(i)
                if stamp is None:
                    stamp = file_stamp(storage.file_path(i), folders=folders)
                    storage.take_stamp(i, stamp)
                same[i] = _stamp_kept(stamps, i, stamp)
            return same[i]

        for piece, spans in sorted(partial.items()):
            if t.state[piece] != MISSING:
                continue
            segs = t.layout.map(piece, 0, t.layout.piece_size(piece))
            if not all(unchanged(seg.file_index) for seg in segs if seg.stored and seg.length):
                continue
            pads = t.layout.pads(piece)
            hasher = PieceHasher(t.layout.piece_size(piece), t.meta.has_v1,
                                 t.meta.v2_piece(piece), pads, len(segs))
            for begin, end in spans:
                hasher.received.add(begin, min(end, hasher.size))
            if hasher.empty or hasher.complete:
                continue
            try:
                if len(t.partial) >= PARTIAL_FLOOR:
                    raise TooLarge("past the floor")  # (parked too: see below)
                self._count_partials(1)
            except TooLarge:
                # Past the bound or the torrent's floor (other torrents' pieces taken up
                # first, or the bound lowered since): parked, as _park_one leaves a
                # piece, its bytes in its files; its next block takes it up.
                t.parked[piece] = ([(b, e) for b, e in hasher.received.spans], {0})
                self.metrics.add("pieces_parked")
                continue
            part = t.partial[piece] = Partial(hasher, pads)
            part.writers.add(0)  # (no connection's: its blocks came before the start)
            t.set_state(piece, PARTIAL)

    def _finish_deletion(self, gone: Deletion) -> None:
        """Delete the files of a torrent removed with them, which a crash (or an error)
        left behind, as the removal would have: after the saved torrents are loaded, so
        that the files one of them names too stay."""
        try:
            save = Path(gone.save_path)
            if self._outside_roots(save):
                raise PathEscape(f"its save path {save} is outside the allowed roots")
            storage = make_storage(self.backend, gone.metainfo, save, self.handles,
                                   roots=self.roots)
            storage.renames.update(gone.renames)
            try:
                storage.root.root()
                storage.delete_files(keep=self._held_by_others(save))
            finally:
                storage.close()
        except (OSError, PiecedError) as exc:
            if exc.errno != errno.ENOENT:  # (a save path gone took its files with it)
                self.load_errors.append(f"torrent {gone.ih_hex} was removed, but its "
                                        f"files could not all be deleted: {exc}")
        shutil.rmtree(gone.folder, ignore_errors=True)

    def _reverify(self, t: Torrent, pieces: list[int], whole: bool = False) -> None:
        """Verify pieces whose data may be there but is not known good (fingerprints
        first); ``whole``: verified ones too (a recheck cut short, carried out again)."""
        t.reverifying = len(pieces)

        def progress(done: int, total: int) -> None:
            t.reverifying = max(1, total - done)  # 0 once what it found is shown

        try:
            with self._alone(t.key), self._checking(t, "all" if whole else "missing"):
                todo = [p for p in pieces if t.state[p] == MISSING or (
                    whole and t.state[p] == VERIFIED)]
                with t.lock:
                    gens = dict(t.written_into)
                result = self._verify(t, todo, progress, full=False)
                self._apply_verify(t, todo, result, gens)
                self._save_now(t)
        except (RuntimeError, UnknownTorrent):  # shutting down, or unregistered meanwhile
            pass
        except PiecedError as exc:  # recorded on the torrent; the check is done again next start
            (log.info if exc.errno == errno.ECANCELED else log.warning)(
                "torrent %s: checking its files: %s", t.key.hex(), exc)
        finally:
            with t.lock:
                t.reverifying = len(t.to_check)  # (0, unless more were queued meanwhile)

    @contextlib.contextmanager
    def _checking(self, t: Torrent, scope: str) -> Iterator[None]:
        """A check of the torrent's files under way: recorded, so that a crash before
        its end has it carried out again after the restart (the pieces it would have
        found otherwise stay unknown for good)."""
        rec = self._records.get(t.id)
        if rec is not None:
            with rec.save_lock:
                try:
                    rec.mark_checking(scope)
                except OSError as exc:
                    raise StorageIOError.wrap(exc, "record the check under way") from None
        t.checking += 1  # (said in status: a client need not ask for another)
        try:
            yield
        finally:
            t.checking -= 1
        if rec is not None and not t.unrecorded:
            # (Pieces this check failed that the journal could not be told of keep the
            # mark: the next start checks them again, not takes them as verified.)
            with rec.save_lock, contextlib.suppress(OSError):  # (then checked again)
                rec.mark_checking(None)

    def _verify(
        self, t: Torrent, pieces: Sequence[int] | None, progress: Progress | None, full: bool,
        vanished: set[int] | None = None,
    ) -> VerifyResult:
        """Hash pieces as they are on disk; record the fingerprints this computed.
        ``vanished`` gets the files a read found gone."""
        sizes: dict[int, int] = {}  # files not known whole: their length, looked at once
        read_bytes: list[int] = []  # payload bytes read, for the counters (pads are not)

        def past_end(segs: Sequence[Segment], buf: memoryview) -> Segment | None:
            """A segment that runs past its file's end on disk. A read there gives zeros
            (a download's sparse file), which would pass for the bytes of a file whose
            tail is zeros, cut short: the piece would verify over bytes not there. (Only
            a segment read ending in a zero byte can have been cut short: the file is
            looked at for those alone.)"""
            for seg in segs:
                index = seg.file_index
                if (not seg.stored or not seg.length or buf[seg.buf_offset + seg.length - 1]
                        or t.storage.known_whole(index)):
                    continue
                size = sizes.get(index)
                if size is None:
                    st = t.storage.root.stat(t.storage.parts(index))
                    size = sizes[index] = st.st_size if st is not None else 0
                if seg.file_offset + seg.length > size:
                    return seg
            return None

        def too_short(index: int) -> StorageIOError:
            """The error that fails a piece whose bytes run past its file's end."""
            if index not in sizes:
                st = t.storage.root.stat(t.storage.parts(index))
                sizes[index] = st.st_size if st is not None else 0
            return StorageIOError(
                f"{t.storage.file_path(index)} is {sizes[index]} bytes, shorter than the "
                f"torrent's {t.meta.files.lengths[index]}", errno=errno.ENODATA)

        def seen_vanish(exc: FileVanished, piece: int) -> None:
            """What a read that found a file gone or cut short tells, once: the storage
            forgets the file as it raises, and a read after it would not find it so."""
            if vanished is not None and exc.gone:  # (one cut short: see its size after)
                vanished.add(exc.file_index)
            if exc.written:  # deleted under us (not a file never written): say so
                self._record_error(t, exc, piece)

        def seen_vanish_in(exc: FileVanished, segs: Sequence[Segment], first: int) -> None:
            """A vanished file found by a look at ``segs``, from piece ``first`` on (a run
            read at once, or a look that is not a read: the read-ahead advice, the page
            cache probe, a view): told for the piece of its first segment there. After a
            look, the piece's read fails it (the file is not there, or is shorter)."""
            at = next((seg.buf_offset for seg in segs if seg.file_index == exc.file_index), 0)
            seen_vanish(exc, first + at // t.layout.piece_length)

        def read(piece: int, begin: int, buf: memoryview) -> None:
            segs = t.layout.map(piece, begin, buf.nbytes)
            try:
                t.storage.readinto(segs, buf)
            except FileVanished as exc:
                seen_vanish(exc, piece)
                if exc.gone:
                    raise
                try:
                    t.storage.readinto(segs, buf)  # cut short: what is left is read as it is
                except FileVanished as again:  # the piece runs past the cut (short_is_cut)
                    if again.gone:
                        raise
                    raise too_short(again.file_index) from None
            except PathEscape as exc:
                # A symlink or hard link where a payload file should be: the piece fails
                # (recorded, with EPERM) and the recheck goes on with the others.
                err = StorageIOError(str(exc), errno=errno.EPERM)
                self._record_error(t, err, piece)
                raise err from None
            except StorageIOError as exc:
                if exc.errno in _NOT_THERE:
                    if exc.errno == errno.ENXIO:  # a socket there: said, as a symlink is
                        self._record_error(t, exc, piece)
                    raise  # no file (or not a file) where the piece's bytes would be
                # The disk failing to read (EIO; EINVAL: O_DIRECT on a file system that
                # has none...) says nothing of the bytes: the check stops with the error,
                # every piece as it was, instead of failing good pieces.
                self._record_error(t, exc, piece)
                raise _CheckFailed(exc) from None
            read_bytes.append(sum(seg.length for seg in segs if seg.stored))
            cut = past_end(segs, buf)
            if cut is not None:  # (the piece fails; the file stays as it is)
                raise too_short(cut.file_index)

        def progress_or_stop(done: int, total: int) -> None:
            if self._stopping.is_set():  # (the checking mark stays: done again at start-up)
                raise StorageIOError("the check was cut short: the daemon is stopping (it "
                                     "is carried out again when it starts)",
                                     errno=errno.ECANCELED)
            if progress is not None:
                progress(done, total)

        def read_span(first: int, buf: memoryview) -> bool:
            """Consecutive pieces in one read, for pieces smaller than the read buffer.
            Whatever goes wrong, each piece is then read on its own, whose read tells the
            error and fails the piece it belongs to; told here is only a vanished file
            (see ``seen_vanish``), of the first of the pieces that read it."""
            segs = t.layout.map_offset(first * t.layout.piece_length, buf.nbytes)
            try:
                t.storage.readinto(segs, buf)
            except FileVanished as exc:
                seen_vanish_in(exc, segs, first)
                return False
            except (PiecedError, OSError):
                return False
            if past_end(segs, buf) is not None:
                return False
            read_bytes.append(sum(seg.length for seg in segs if seg.stored))
            return True

        known = bytes(t.fingerprints)
        def advise(piece: int, size: int) -> None:
            segs = t.layout.map_offset(piece * t.layout.piece_length, size)
            for exc in t.storage.advise(segs):
                seen_vanish_in(exc, segs, piece)

        def view(piece: int, begin: int, length: int) -> (
                tuple[list[Buffer], Callable[[], None]] | None):
            segs = t.layout.map_offset(piece * t.layout.piece_length + begin, length)
            try:
                seen = t.storage.views(segs)
            except FileVanished as exc:
                seen_vanish_in(exc, segs, piece)
                return None
            if seen is not None:
                read_bytes.append(sum(seg.length for seg in segs if seg.stored))
            return seen

        def resident(piece: int) -> bool:
            segs = t.layout.map(piece, 0, 1)
            try:
                return t.storage.resident(segs)
            except FileVanished as exc:
                seen_vanish_in(exc, segs, piece)
                return False

        reader = PreadReader(read, advise, getattr(t.storage, "read_ahead", False),
                             view if t.storage.maps_files else None, read_span, resident)
        try:
            result = verify(t.meta, reader, self.hash_pool, progress_or_stop, pieces, known,
                            not full, self._unreadable(t), t.layout.pads)
        except _CheckFailed as exc:
            raise exc.error from None
        with t.lock:
            for p, fp in (result.new_fingerprints or {}).items():
                t.set_fingerprint(p, fp)
        self.metrics.add("bytes_read", sum(read_bytes))
        self.metrics.add("fingerprint_hits", result.fingerprint_hits)
        good = sum(result.have)  # (of the pieces checked: the others are False)
        self.metrics.add("recheck_verified", good)
        self.metrics.add("recheck_failed", (t.meta.num_pieces if pieces is None
                                            else len(pieces)) - good)
        return result

    def _forget_moved(self, t: Torrent, files: Iterable[int],
                      sizes: dict[int, int] | None = None) -> set[int]:
        """The files among ``files`` renamed away or replaced behind our back (see
        ``FileStorage.moved_away``): their pieces start over, told so, in this torrent
        and in those sharing them (cross-seeding), whose descriptors of them would
        otherwise still read and write the file wherever it went. Returns them."""
        out = set()
        for gone in t.storage.moved_away(files, sizes):
            self._record_error(t, gone, None)
            out.add(gone.file_index)
            self._tell_sharers(t, gone.file_index)
        return out

    def _tell_sharers(self, t: Torrent, index: int, by_name: bool = False) -> None:
        """File ``index`` of ``t`` is not under its name any more (renamed away or
        replaced): the torrents sharing it forget it too, where their descriptors still
        lead to the file that went. (A sharer's pieces verified through such a
        descriptor, with other bytes at the path, would stay reported verified.)"""
        for x, j in list(t.shared.get(index, ())):
            # Not while x is unregistered, moved or rechecked (or after): its own next
            # commit or its check looks for moved files all the same.
            if not x.fence.try_shared():
                continue
            try:
                if self._root_moved(x):  # its save folder went (the file with it)
                    continue
                # ``by_name``: the file looked at by its name too (see FileStorage.lost):
                # cut short, or gone where the sharer has not opened it since its start.
                found = x.storage.lost([j]) if by_name else x.storage.moved_away([j])
                for lost in found:
                    self._record_error(x, lost, None)
            finally:
                x.fence.release_shared()

    def _distrust_changed(self, t: Torrent, result: VerifyResult,
                          vanished: set[int]) -> VerifyResult:
        """The result of a check, but for the pieces of files changed under it while it
        ran: renamed away or replaced (its reads went on through their descriptors),
        seen gone, or cut short since (the pieces past its end now). Those are not
        found good: what was read of them is not what is there now."""
        sizes: dict[int, int] = {}
        changed = vanished | self._forget_moved(t, t.storage.stored_files(), sizes)
        distrust: set[int] = set()
        for index in changed:
            distrust.update(t.layout.file_pieces(index))
        lengths = t.meta.files.lengths
        for index, size in sizes.items():
            if size >= lengths[index] or index in changed:
                continue
            for p in t.layout.file_pieces(index):  # cut short since read: past its end
                if any(seg.file_index == index and seg.file_offset + seg.length > size
                       for seg in t.layout.map(p, 0, t.layout.piece_size(p))):
                    distrust.add(p)
        distrust = {p for p in distrust if result.have[p]}
        if not distrust:
            return result
        have = list(result.have)
        for p in distrust:
            have[p] = False
        return result._replace(
            have=have,
            failed_v1=None if result.failed_v1 is None else sorted({*result.failed_v1, *distrust}),
            failed_v2=None if result.failed_v2 is None else sorted({*result.failed_v2, *distrust}))

    def _unreadable(self, t: Torrent) -> set[int]:
        """Pieces whose stored bytes all lie in files that are not there (see
        ``FileStorage.absent_files``): a check fails them without asking for them. A
        piece that shares bytes with any other file is read as before: what its read
        finds of that file (cut short, gone) is the check's to tell. (One pass over the
        files and one over the pieces: a piece holds the bytes of thousands of small
        files in some torrents.)"""
        absent = t.storage.absent_files()
        if not absent:
            return set()
        layout, lengths = t.layout, t.meta.files.lengths
        touched = bytearray(t.meta.num_pieces)  # 1: bytes of an absent file; 2: of another
        for i in t.storage.stored_files():
            if lengths[i]:
                r = layout.file_pieces(i)
                mark = 1 if i in absent else 2
                for p in (r[0], r[-1]):  # (the pieces between hold this file's bytes alone)
                    touched[p] |= mark
                if len(r) > 2:
                    touched[r[1] : r[-1]] = bytes([mark]) * (len(r) - 2)
        return {p for p, m in enumerate(touched) if m == 1}

    def _apply_verify(self, t: Torrent, pieces: Sequence[int], result: VerifyResult,
                      gens: dict[int, int]) -> None:
        """Set the states of checked pieces (caller holds the torrent alone).

        A piece found good is reported verified only as a download's is: once its data
        is durable (its files fdatasynced, dirty or not: the bytes may have been written
        by a daemon that died, or by another program) and it is journaled. A piece
        another torrent sharing its file wrote into since ``gens`` (taken before the
        check read it) is left as it is, and checked again.
        """
        def written_since() -> set[int]:
            # (caller holds t.lock) A write's count goes up before it starts over the
            # pieces it lands in, which waits for the journal lock: counts read under
            # that lock, and pieces set as they say under it, are never both stale.
            return {p for p, n in t.written_into.items() if gens.get(p) != n}

        asked = set(pieces)
        with t.lock:
            moved = written_since()
            found = [p for p in pieces if result.have[p] and t.state[p] != VERIFIED
                     and p not in moved]
        holding = sorted({f for p in found for f in t.files_of(p)})
        while found:
            try:
                self._sync(t, holding, force=True)
                break
            except FileVanished as exc:
                # Deleted or cut short since the check read it (told, and its pieces
                # started over): none of its pieces is found good, and the rest of the
                # check still counts. (Raised, it left pieces the check had found bad
                # reported verified.)
                if exc.file_index not in holding:
                    raise  # (not one this sync was for: nothing to take out and retry)
                gone = [p for p in t.layout.file_pieces(exc.file_index) if p in asked]
                for p in gone:
                    result.have[p] = False
                for failed in (result.failed_v1, result.failed_v2):
                    if failed is not None:
                        failed[:] = sorted({*failed, *gone})
                found = [p for p in found if p not in gone]
                holding = sorted({f for p in found for f in t.files_of(p)})
        rec = self._records.get(t.id)
        with _journal_lock(rec):
            with t.lock:
                moved = written_since()
            if moved:
                pieces = [p for p in pieces if p not in moved]
                found = [p for p in found if p not in moved]
            if rec is not None and found:
                try:
                    named = _unnamed_files(t, holding)
                    rec.append([*(file_record(i, inode) for i, inode in named),
                                *((REC_VERIFIED, p, t.fingerprint(p) or NO_FINGERPRINT)
                                  for p in found)])
                    t.inodes_said.update(named)
                except OSError as exc:
                    error = StorageIOError.wrap(exc, "journal verified pieces")
                    self._record_error(t, error, None)
                    raise error from None
            with t.lock:
                cleared = [p for p in pieces if not result.have[p] and t.state[p] == VERIFIED]
            self._journal_clears(t, rec, cleared)
            with t.lock:
                if rec is None:  # (no journal lock orders us with writes: looked at here)
                    late = written_since() - moved
                    moved |= late
                    pieces = [p for p in pieces if p not in late]
                for p in pieces:
                    if result.have[p]:
                        t.set_state(p, VERIFIED)
                        t.unrecorded.discard(p)  # journaled verified just above
                    elif t.state[p] == VERIFIED:
                        self._to_missing(t, p)
                checked = set(pieces)  # files seen gone, now checked as they are: settled
                settled = [i for i in t.storage.remaking() if all(
                    p in checked or t.state[p] != VERIFIED for p in t.layout.file_pieces(i))]
        for i in settled:
            t.storage.settled(i)
        t.storage.found_whole(holding)
        if found or cleared:
            self._changed(t)
        self._check_again(t, sorted(moved.intersection(asked)))  # written into meanwhile

    # -- writes -----------------------------------------------------------------------
    def write_chunk(
        self, ih: bytes, piece: int, begin: int, data: Buffer, flush: bool = False,
        writer: int = 0,
    ) -> PieceResult | None:
        """Buffered write of one block; returns the piece's result if it completed it.
        ``writer``: who writes (see PieceResult.writers)."""
        t = self._get(ih)
        length = memoryview(data).nbytes
        _check_write(t, piece, begin, length)
        block = data if isinstance(data, bytes) else bytes(data)
        if not t.fence.acquire_shared():
            raise UnknownTorrent(f"unknown info_hash {bytes(ih).hex()}")
        try:
            while True:
                partial = self._partial(t, piece, 1)
                if partial is None:
                    return None
                with partial.lock:
                    if partial.done:
                        if partial.cleared:
                            continue  # started over meanwhile: to the piece's new hash state
                        self.metrics.add("duplicate_blocks")
                        return None
                    _room_for(partial, piece, begin, length)
                    partial.writers.add(writer)
                    seen = t.written_over.get(piece)
                    try:
                        if partial.pads:
                            runs = self._cut_pads(partial, begin, (block,), length)
                            for b, views, n in runs:
                                self._buffer(t, piece, partial, b, b"".join(views), n, flush)
                            if not runs:
                                self._all_pad(t, piece, partial)
                        else:
                            self._buffer(t, piece, partial, begin, block, length, flush)
                    except BaseException:
                        self._failed_write(t, piece, partial, begin, length)
                        raise
                    if flush:
                        self._sync(t, t.files_of(piece))
                    self.metrics.add("blocks_written")
                    if t.written_over.get(piece) != seen and not self._still_there(
                            t, piece, begin, (block,), length):
                        self._abandon(t, piece, partial)
                    elif partial.hasher.complete:
                        return self._complete(t, piece, partial)
                return None
        finally:
            t.fence.release_shared()

    def _still_there(self, t: Torrent, piece: int, begin: int, bufs: Sequence[Buffer],
                     length: int) -> bool:
        """(Caller holds the piece's lock.) Whether the piece holds the block just
        written, after another torrent began to write into it during the write (see
        _store_shared): if not, it was written over before it was counted received,
        and the piece starts over (``_abandon``). Read back only in that race."""
        try:
            there = self._read_range(t, piece, begin, length)
        except PiecedError:
            return False
        return memoryview(there) == memoryview(b"".join(bufs))

    def _buffer(self, t: Torrent, piece: int, partial: Partial, begin: int, block: bytes,
                length: int, through: bool) -> None:
        """One run of stored bytes of an inline block: buffered, or written through."""
        key = (t.id, piece)
        if self.pool.overlaps_other(key, begin, begin + length):
            self._write_out_buffered(t, piece)
        if through or not self.pool.add_dirty(key, begin, block):
            self._write_through(t, piece, begin, (block,), length)
        partial.hasher.add(begin, (block,), length)

    def write_block_direct(
        self, ih: bytes, piece: int, begin: int, s0: Buffer, s1: Buffer = b"", writer: int = 0,
    ) -> PieceResult | None:
        """Write a block given as two slices (a ring buffer's wrap) with one pwritev, no copy.

        The slices are only read during the call: the caller may reuse them after. A
        "block" may be a run of 16 KiB blocks (a client merges what it wrote back to
        back); the counters count 16 KiB blocks.
        """
        n0 = s0.nbytes if type(s0) is memoryview else memoryview(s0).nbytes
        n1 = s1.nbytes if type(s1) is memoryview else len(s1) if type(s1) is bytes else memoryview(s1).nbytes
        n = n0 + n1
        return self.write_blocks_direct(ih, piece, begin, (s0, s1) if n1 else (s0,),
                                        max(1, -(-n // BLOCK_SIZE)), n, writer)

    def check_write(self, ih: bytes, piece: int, begin: int, length: int) -> None:
        """Raise what a write of this range would be refused with (an unknown torrent,
        a range outside its piece), before its bytes are looked at."""
        _check_write(self._get(ih), piece, begin, length)

    def write_blocks_direct(
        self, ih: bytes, piece: int, begin: int, bufs: Sequence[Buffer], blocks: int,
        length: int | None = None, writer: int = 0, shared: bool = False,
    ) -> PieceResult | None:
        """``write_block_direct`` of a run of ``blocks`` adjacent blocks of one piece,
        given as any number of slices (``length`` bytes in all, when the caller knows):
        still one pwritev and one pass of the hashers. The daemon merges the ring writes
        a client sent back to back into one of these.

        ``shared``: the slices are memory that another process may write meanwhile (a
        client's ring). They are then read once, into a copy that is written and hashed:
        read twice (by the write, then by the hashers), bytes changed between the two
        reads would be stored while others passed the hash, and the piece reported
        verified over bytes that never did. A backend that gathers writes copies them
        into its piece buffer anyway, and writes and hashes that.
        """
        t = self._get(ih)
        if length is None:
            length = sum(memoryview(b).nbytes for b in bufs)
        _check_write(t, piece, begin, length)
        if shared and not t.storage.gathers_writes:
            bufs = (_snapshot(bufs, length),)
        if not t.fence.acquire_shared():
            raise UnknownTorrent(f"unknown info_hash {bytes(ih).hex()}")
        try:
            while True:
                partial = self._partial(t, piece, blocks)
                if partial is None:
                    return None
                with partial.lock:
                    if partial.done:
                        if partial.cleared:
                            continue  # started over meanwhile: to the piece's new hash state
                        self.metrics.add("duplicate_blocks", blocks)
                        return None
                    _room_for(partial, piece, begin, length)
                    partial.writers.add(writer)
                    seen = t.written_over.get(piece)
                    runs = (self._cut_pads(partial, begin, bufs, length) if partial.pads
                            else [(begin, bufs, length)])
                    try:
                        for b, views, n in runs:
                            if t.storage.gathers_writes:
                                # Copied out of the ring into the piece's buffer, written with
                                # the rest of the piece: one large write instead of one a block.
                                self._buffer(t, piece, partial, b, b"".join(views), n, False)
                                self.metrics.add("blocks_written", blocks)
                            elif n >= ASIDE_BYTES and self._aside is not None:
                                partial.hasher.add_beside(b, views, n, functools.partial(
                                    self._write_through, t, piece, b, views, n, blocks=blocks),
                                    self._aside)
                            else:
                                self._write_through(t, piece, b, views, n, blocks=blocks)
                                partial.hasher.add(b, views, n)
                            blocks = 0
                    except BaseException:
                        self._failed_write(t, piece, partial, begin, length)
                        raise
                    if not runs:
                        self._all_pad(t, piece, partial)
                    if t.written_over.get(piece) != seen and not self._still_there(
                            t, piece, begin, bufs, length):
                        self._abandon(t, piece, partial)
                    elif partial.hasher.complete:
                        return self._complete(t, piece, partial)
                return None
        finally:
            t.fence.release_shared()

    def _all_pad(self, t: Torrent, piece: int, partial: Partial) -> None:
        """(Caller holds the piece's lock.) A block that lay wholly in a pad, of zeros:
        nothing of the piece is stored, and a piece it made partial is missing again.
        Left under way with no byte of it here, it took a ``max_partial_pieces`` slot,
        and every recheck, which leaves pieces under way alone, passed it by. (One of
        other bytes stays: the piece fails when complete, as v1 would say.)"""
        if not partial.hasher.bad_pads.spans:
            self._forget_if_empty(t, piece, partial)

    def _partial(self, t: Torrent, piece: int, blocks: int) -> Partial | None:
        """The piece's hash state, made if it is missing; None when it is hashing,
        committing or verified: ``blocks`` duplicates, counted."""
        with t.lock:
            state = t.state[piece]
            if state == PARTIAL:
                return t.partial[piece]
            if state != MISSING:
                self.metrics.add("duplicate_blocks", blocks)
                return None
        if t.unrecorded:
            # Any new piece, not only those: a block in another piece of a vanished file
            # would make it anew, at its full length, and after a crash the pieces the
            # journal still says verified would be taken as such, over its zeros.
            self._record_unrecorded(t)
        size = t.layout.piece_size(piece)
        pads = t.layout.pads(piece)
        files = len(t.layout.map(piece, 0, size)) if len(t.meta.files) > 1 else 1
        hasher = PieceHasher(size, t.meta.has_v1, t.meta.v2_piece(piece), pads, files)
        refused: TooLarge | None = None
        while True:
            if refused is not None:
                # Refused for the others' pieces in progress (this torrent holds fewer
                # than its floor): one of the torrent holding the most is let go to
                # make room, its bytes kept, rather than this torrent stopped by
                # another's (one client's 128 torrents, 64 pieces begun in each,
                # stopped every other download of the daemon, for good).
                if not self._park_one(t):
                    raise refused
                refused = None
            with t.lock:
                if t.state[piece] != MISSING:
                    break
                held = len(t.partial)
                try:
                    self._count_partials(1, held=held)
                except TooLarge as exc:
                    if held >= PARTIAL_FLOOR:
                        raise
                    refused = exc
                    continue
                partial = t.partial[piece] = Partial(hasher, pads)
                parked = t.parked.pop(piece, None)
                if parked is not None:  # taken up again: what it had is in its files
                    for b, e in parked[0]:
                        hasher.received.add(b, min(e, size))
                    partial.writers |= parked[1]
                t.set_state(piece, PARTIAL)
                self.pool.drop((t.id, piece))  # what a read cached of it is stale from now on
                return partial
        with t.lock:
            state = t.state[piece]
            found = t.partial.get(piece) if state == PARTIAL else None
        if found is None:
            self.metrics.add("duplicate_blocks", blocks)
        return found

    def _failed_write(self, t: Torrent, piece: int, partial: Partial, begin: int,
                      length: int) -> None:
        """(Caller holds the piece's lock.) A write of the range failed, perhaps after
        part of it reached the file: nothing of the range counts any more (see
        PieceHasher.forget), and a piece left with nothing received is missing again."""
        partial.hasher.forget(begin, begin + length)
        self._forget_if_empty(t, piece, partial)

    def _forget_if_empty(self, t: Torrent, piece: int, partial: Partial) -> None:
        """(Caller holds the piece's lock; a write of it just failed, or stored nothing.)
        A piece made partial for a block whose write failed (a full disk) holds nothing: it goes back
        to missing, instead of staying "under way" with no byte of it here, a slot of
        ``max_partial_pieces`` taken for as long as nobody sends it again."""
        if partial.hasher.empty and not self.pool.has_dirty((t.id, piece)):
            with t.lock:
                if t.partial.get(piece) is partial and t.state[piece] == PARTIAL:
                    del t.partial[piece]
                    partial.done = partial.cleared = True  # (its writers start anew)
                    self._count_partials(-1)
                    self._to_missing(t, piece)

    def _park_one(self, requester: Torrent) -> bool:
        """(Caller holds no lock.) Let go of the hash state of one piece under way of the
        torrent holding the most (more than ``requester`` would, or any if it has none
        under way: torrents of one piece under way each, twice ``max_partial_pieces``
        of them, were never let go of theirs, and stopped every new piece of every other
        torrent), its buffered blocks
        written to its files and their ranges kept in ``parked``: a block of it takes it
        up again (its hash state then made from the disk when the last block comes in,
        as for a piece a clean stop left under way). Not a piece with a bad pad, nor one
        whose blocks cannot be written. Whether one was let go."""
        others = {o.id: o for o in list(self._torrents.values()) if o is not requester}
        held = len(requester.partial)
        for o in sorted(others.values(), key=lambda o: -len(o.partial)):
            # One holding more than the requester would after taking one; or, for a
            # requester with none under way, one holding any: every torrent may have a
            # piece under way, while torrents of nearly as many do not take pieces from
            # each other back and forth (each time a write-out of its blocks).
            if len(o.partial) <= held + 1 and (held or not o.partial):
                return False
            if not o.fence.try_shared():  # (being moved or removed: another one)
                continue
            try:
                with o.lock:
                    candidates = [(p, part) for p, part in o.partial.items()
                                  if o.state[p] == PARTIAL and not part.done]
                for piece, part in candidates[:8]:
                    with part.lock:
                        if part.done or part.hasher.bad_pads.spans:
                            continue
                        try:
                            self._write_out_buffered(o, piece)
                        except PiecedError:
                            continue  # (it starts over, told failed: see the method)
                        with o.lock:
                            if (o.partial.get(piece) is not part or o.state[piece] != PARTIAL
                                    or self.pool.has_dirty((o.id, piece))):
                                continue
                            del o.partial[piece]
                            part.done = part.cleared = True  # (its writers start anew)
                            self._count_partials(-1)
                            self._to_missing(o, piece)
                            o.parked[piece] = ([(b, e) for b, e in part.hasher.received.spans],
                                               set(part.writers))
                        self.metrics.add("pieces_parked")
                        return True
            finally:
                o.fence.release_shared()
        return False

    def _partials_where(self) -> str:
        """Which torrents hold the pieces in progress (for the refusal: a client refused
        because of another's torrents was told to finish or clear pieces it had none
        of)."""
        torrents = {t.id: t for t in list(self._torrents.values())}.values()
        busy = sorted((t for t in torrents if t.partial), key=lambda t: -len(t.partial))
        if not busy:
            return ""
        return (f" in {len(busy)} torrent{'s' if len(busy) > 1 else ''} (the most, "
                f"{len(busy[0].partial)}, in {busy[0].key.hex()})")

    def _count_partials(self, delta: int, held: int = 0) -> None:
        """Pieces in progress, daemon-wide: each holds hash state (a few KiB) outside the
        byte budget, so their number is bounded instead. Refusing a block's new piece
        past the bound leaves the rest as it was. A torrent that ``held`` fewer than
        PARTIAL_FLOOR pieces in progress is never refused: one client filling the bound
        with its torrent does not stop the downloads of the others; up to twice the
        bound (that floor, given to thousands of torrents, held gigabytes of hash state
        past any setting)."""
        with self._partials_lock:
            want = self._partials + delta
            if delta > 0 and want > self.max_partial_pieces and (
                    held >= PARTIAL_FLOOR or want > 2 * self.max_partial_pieces):
                raise TooLarge(
                    f"{self._partials} pieces are in progress{self._partials_where()}, the "
                    f"limit (max_partial_pieces) is {self.max_partial_pieces}: finish or "
                    "clear some", errno=errno.EBUSY)  # (EBUSY: send it again later)
            self._partials += delta

    def _cut_pads(
        self, partial: Partial, begin: int, bufs: Sequence[Buffer], length: int
    ) -> list[tuple[int, Sequence[Buffer], int]]:
        """The runs of a block outside its piece's pads, as (begin, views, length).

        A peer sends whole 16 KiB blocks, so one may run from a file's end into a pad,
        or lie inside one; the pad bytes must be zeros (else the piece fails, as in
        libtorrent) and are never stored or hashed again: the hasher counts pads as
        zeros already. A v2 leaf so hashes only its file's bytes.
        """
        end = begin + length
        runs: list[tuple[int, Sequence[Buffer], int]] = []
        pos = begin
        bad = partial.hasher.bad_pads
        for s, e in partial.pads:
            if e <= pos or s >= end:
                continue
            lo, hi = max(s, pos), min(e, end)
            if pos < lo:
                runs.append((pos, sub_views(bufs, pos - begin, lo - begin), lo - pos))
            bad.remove(lo, hi)  # these bytes replace what was sent there before
            at = lo
            for v in sub_views(bufs, lo - begin, hi - begin):
                b = v.tobytes()
                if b.strip(b"\0"):
                    _add_nonzero_runs(bad, b, at)
                at += len(b)
            pos = hi
        if pos < end:
            runs.append((pos, sub_views(bufs, pos - begin, end - begin), end - pos))
        return runs

    def _write_through(
        self, t: Torrent, piece: int, begin: int, bufs: Sequence[Buffer], length: int,
        blocks: int = 0,
    ) -> None:
        """Write a range straight to disk (the range has passed ``layout.check``)."""
        key = (t.id, piece)
        if self.pool.has_dirty(key):
            self.pool.discard_dirty(key, begin, begin + length)  # superseded whole
            if self.pool.overlaps_other(key, begin, begin + length):
                # Buffered blocks this one covers in part: on disk first, so that the
                # newer bytes land over theirs (written later, they would undo them).
                self._write_out_buffered(t, piece)
        segs = t.layout.map_offset(piece * t.layout.piece_length + begin, length)
        start = perf_counter()
        try:
            n = self._store(t, segs, bufs)
        except (StorageIOError, PathEscape) as exc:  # (a symlink where a file should be)
            self._record_error(t, exc, piece)
            raise
        self.metrics.wrote(perf_counter() - start, n, blocks, 1)

    def _write_out_buffered(self, t: Torrent, piece: int) -> None:
        """Write a piece's buffered blocks (the caller holds its piece lock).

        They leave the buffer to be written: when the write fails (a full disk), they
        are nowhere any more, while the piece's hash state counts them received, and has
        hashed some. Sent the rest, the piece passed its hash with bytes that never
        reached the disk, and was announced verified over zeros (or failed, blaming
        its sender, where a lost block was read back). So the piece starts over, told
        failed without v1/v2 (every block of it is to be sent again), as one whose file
        vanished."""
        key = (t.id, piece)
        blocks = self.pool.take_dirty(key, leaving=True)
        try:
            self._write_out(t, piece, blocks)
        except BaseException:
            self._abandon(t, piece, t.partial.get(piece))
            raise
        finally:
            self.pool.written(key, blocks)

    def _abandon(self, t: Torrent, piece: int, partial: Partial | None) -> None:
        """(Caller holds the piece's lock.) The piece starts over, told failed without
        v1/v2 so that every block of it is sent again: what its hash state counts is not
        what the file holds (blocks lost to a failed write, or bytes written over)."""
        with t.lock:
            if partial is not None and t.partial.get(piece) is partial:
                del t.partial[piece]
                partial.done = partial.cleared = True  # (its writers start a new one)
                self._count_partials(-1)
                self._to_missing(t, piece)
                self._to_tell(t, [PieceResult(t.key, piece, False, None, None,
                                              tuple(sorted(partial.writers)))])
        self._tell(t)

    def _write_out(self, t: Torrent, piece: int, blocks: list[tuple[int, bytes]]) -> None:
        """Write buffered blocks, one vectored write per run of adjacent blocks."""
        run: list[bytes] = []
        start = end = 0
        for begin, data in [*blocks, (-1, b"")]:
            if run and begin != end:
                segs = t.layout.map(piece, start, end - start)
                started = perf_counter()
                try:
                    n = self._store(t, segs, run)
                    self.metrics.wrote(perf_counter() - started, n, 0, 0)
                except (StorageIOError, PathEscape) as exc:
                    self._record_error(t, exc, piece)
                    raise
                run = []
            if begin < 0:
                break
            if not run:
                start = end = begin
            run.append(data)
            end += len(data)

    def _complete(self, t: Torrent, piece: int, partial: Partial) -> PieceResult:
        """Verify a piece whose last block just arrived (caller holds the piece lock and
        the torrent shared)."""
        key = (t.id, piece)
        partial.done = True
        # The piece's state and its buffered blocks are this hash state's while it is the
        # piece's: a vanished file can take it back meanwhile (and a new one start), and
        # nothing this one does may then touch what belongs to the next.
        with t.lock:
            mine = t.partial.get(piece) is partial
            if mine:
                t.set_state(piece, HASHING)
        held = contextlib.ExitStack()
        errors = held.enter_context(self.errors_held())  # (told after the piece: see below)
        try:
            with self.metrics.timed("hash"):
                d1, d2, fp = partial.hasher.finish(lambda b, n: self._read_range(t, piece, b, n))
            ok1 = d1 == t.meta.v1_hash(piece) if d1 is not None else None
            v2 = partial.hasher.v2
            ok2 = d2 == v2.expected if d2 is not None and v2 is not None else None
            if partial.hasher.bad_pads.spans:  # non-zero bytes where a pad is: as v1 would say
                if ok1 is not None:
                    ok1 = False
                else:
                    ok2 = False
            ok = ok1 is not False and ok2 is not False
            result = PieceResult(t.key, piece, ok, ok1, ok2, tuple(sorted(partial.writers)))
            with t.lock:  # taken together with the check: no other hash state's blocks
                mine = t.partial.get(piece) is partial
                blocks = self.pool.take_dirty(key, leaving=ok) if mine else []
            try:
                if ok and mine:
                    self._write_out(t, piece, blocks)
            finally:
                self.pool.written(key, blocks)
        except BaseException:
            # (Its blocks could not be written out, or read back: a full disk.) The piece
            # starts over, told failed without v1/v2, as in _write_out_buffered: blocks of
            # it that were acknowledged are gone, and a client that sent again only the
            # block that got the error would wait for the piece for ever. Taken back by
            # the error itself (its file found gone: _start_over leaves a piece hashing to
            # its writer to tell), it is told here all the same; and before the error,
            # as _record_error promises (a client that stops on it knows what it has).
            held.close()
            with t.lock:
                taken = t.partial.get(piece) is not partial
                if taken:
                    self._to_tell(t, [PieceResult(t.key, piece, False, None, None,
                                                  tuple(sorted(partial.writers)))])
            if taken:
                self._tell(t)
            else:
                self._abandon(t, piece, partial)
            self._pass_on(errors)
            raise
        held.close()
        self._pass_on(errors)
        failed = result if not result.ok else PieceResult(t.key, piece, False, None, None,
                                                          result.writers)
        with t.lock:
            mine = t.partial.get(piece) is partial
            epoch = t.epoch[piece]  # (the copy below is cached only if it does not move)
            if mine:
                del t.partial[piece]
                self._count_partials(-1)
                if ok:
                    t.set_state(piece, COMMITTING)
                    t.committing[piece] = result  # (this attempt's: see _commit_pieces)
                else:
                    self._to_missing(t, piece)
            if not mine or not ok:
                self._to_tell(t, [failed])
        if not mine or not ok:
            if not ok:  # (taken back meanwhile, its hash right: told, not a failure)
                self.metrics.add("pieces_failed")
            self._tell(t)
            return failed
        # Cached either way: the buffered blocks themselves, or (written straight to the
        # file) the page cache's copy, which the write just made (a backend that keeps
        # nothing there caches only what it has in hand).
        # (Not a piece mostly of pads: its reads take what they ask; see _read_chunk.)
        sparse = _mostly_pads(t, piece)
        cached: PieceData | ResidentPiece | None = (
            None if sparse else self._as_piece(t, piece, blocks, partial.pads))
        if cached is None and t.storage.page_cached and not sparse:
            cached = self._resident(t, piece)
        if cached is not None:  # (unless cleared and started again meanwhile)
            self._cache_read(t, piece, epoch, cached)
        self._committer.verified(t, piece, (result, fp))
        return result

    def _as_piece(
        self, t: Torrent, piece: int, blocks: list[tuple[int, bytes]],
        pads: list[tuple[int, int]],
    ) -> PieceData | None:
        """The verified blocks as a cacheable piece, when they tile it (pads filled with zeros)."""
        if not blocks:  # written straight to the file: nothing here to tile it with
            return None
        parts = sorted([*blocks, *((s, bytes(e - s)) for s, e in pads)])
        pos = 0
        for begin, data in parts:
            if begin != pos:
                return None
            pos += len(data)
        if pos != t.layout.piece_size(piece):
            return None
        return PieceData([b for b, _ in parts], [d for _, d in parts])

    def _resident(self, t: Torrent, piece: int) -> ResidentPiece:
        def fetch(begin: int, length: int) -> bytearray | None:
            out = bytearray(length)
            return out if self._read_resident(t, piece, begin, out) else None

        return ResidentPiece(t.layout.piece_size(piece), fetch)

    def _read_resident(self, t: Torrent, piece: int, begin: int, out: bytearray) -> bool:
        """Fill ``out`` from ``begin`` of the piece, only from the page cache."""
        try:
            return t.storage.read_resident(t.layout.map(piece, begin, len(out)),
                                           memoryview(out))
        except StorageIOError as exc:  # as a plain read would report it
            self._record_error(t, exc, piece)
            raise

    def _commit(self, t: Torrent, pieces: list[tuple[int, Pending]]) -> None:
        """Make committing pieces durable, journal them, then mark and announce them.
        The caller holds the torrent (shared, or alone)."""
        try:
            self._commit_pieces(t, pieces)
        except BaseException:
            # Whatever went wrong (an error nobody foresaw),
            # no piece is left committing for ever: those not verified are taken back.
            self._uncommit(t, pieces)
            raise

    def _commit_pieces(self, t: Torrent, pieces: list[tuple[int, Pending]]) -> None:
        files = sorted({f for p, _ in pieces for f in t.files_of(p)})
        for _ in range(len(files) + 1):  # (each vanished file is out of the next sync)
            try:
                self._sync(t, files)
                break
            except FileVanished:
                # (Recorded: that file's pieces started over, and it is not to be synced
                # any more.) The batch's other files are synced again: their pieces are
                # as good as they were.
                continue
            except PiecedError as exc:  # (recorded) not durable where the torrent's files are
                self._uncommit(t, pieces)
                self._commit_failed(t, exc)
                return
        else:  # files vanishing again and again (made anew meanwhile): none is durable
            self._uncommit(t, pieces)
            return
        if self._root_moved(t):  # what was written is not under the save path
            self._uncommit(t, pieces)
            return
        self._forget_moved(t, files)  # (their pieces start over, told so)
        rec = self._records.get(t.id)
        error = None
        with _journal_lock(rec):
            with t.lock:
                # Pieces a vanished file or clear_piece took back are not recorded, nor
                # those taken back and completed again while the files were synced: that
                # sync may have missed their new bytes (their own batch comes next).
                live = [(p, r, fp) for p, (r, fp) in pieces if t.committing.get(p) is r]
            try:
                if rec is not None and live:
                    named = _unnamed_files(t, files)
                    rec.append([*(file_record(i, inode) for i, inode in named),
                                *((REC_VERIFIED, p, fp) for p, _, fp in live)])
                    t.inodes_said.update(named)
            except OSError as exc:
                error = StorageIOError.wrap(exc, "journal verified pieces")
            else:
                with t.lock:
                    for p, _, fp in live:
                        t.set_state(p, VERIFIED)
                        t.set_fingerprint(p, fp)
                    self._to_tell(t, [r for _, r, _ in live])
        if error is not None:
            self._record_error(t, error, None)
            self._uncommit(t, [(p, (r, fp)) for p, r, fp in live])
            self._commit_failed(t, error)
            return
        self.metrics.add("pieces_verified", len(live))
        # A torrent just completed has its files stamped as they are now (its data
        # synced) and its record written at once, before its last pieces are told (as
        # libtorrent's clients save resume data when a torrent finishes): a start after
        # a crash sees a file changed or put in place of one since.
        finished = bool(live) and _finished(t)
        if finished:
            t.storage.restamp(i for i in t.storage.stored_files() if i not in t.shared)
            self._restamp_shared(t)
            self._compact_if_due(t, True)
        self._tell(t)
        if not finished:
            self._compact_if_due(t)

    def _restamp_shared(self, t: Torrent) -> None:
        """The files ``t`` (just completed) shares with other torrents, stamped in each
        of them as a completion stamps a torrent's own, once every torrent sharing one
        is complete (none is to write it then but after clearing a piece): a file left
        taken as written by the daemon was recorded at the stop as it was found, an
        edit made after both torrents completed and all."""
        with self._lock:
            shared = {i: list(others) for i, others in t.shared.items()}
        for i, others in shared.items():
            if all(_finished(o) for o, _ in others):
                t.storage.restamp([i])
                for o, j in others:
                    o.storage.restamp([j])

    @staticmethod
    def _commit_failed(t: Torrent, exc: PiecedError) -> None:
        with t.lock:
            t.commit_failures += 1
            t.commit_error = detached(exc)  # (kept on the torrent: see detached)

    def _root_moved(self, t: Torrent) -> bool:
        """Whether the save-path folder the torrent's files are in was renamed away or
        replaced behind our back: then the folder at the save path is the torrent's
        from now on, and every piece of a file used in the old one starts over
        (journaled first: a restart would find them missing there all the same)."""
        moved = t.storage.root_moved()
        if moved is None:
            return False
        self._record_error(t, StorageIOError(
            f"{t.storage.save_path} is not the folder the torrent's files were written in "
            "any more (renamed away or replaced behind pieced's back): its pieces there "
            "start over", errno=errno.ENOENT), None)
        for index, written in moved:
            self._start_over(t, index, verified=True, partial=written)
        for index, _ in moved:
            self._tell_sharers(t, index)
        return True

    def _uncommit(self, t: Torrent, pieces: list[tuple[int, Pending]]) -> None:
        """Pieces that could not be made durable or journaled: missing again, and failed."""
        with t.lock:
            back = [(p, r) for p, (r, _) in pieces if t.committing.get(p) is r]
            for p, _ in back:
                self._to_missing(t, p)
            # the hashes matched (v1/v2 say so); the data is not durable
            self._to_tell(t, [PieceResult(t.key, p, False, r.v1, r.v2) for p, r in back])
        self._tell(t)

    def _to_missing(self, t: Torrent, piece: int) -> None:
        """(Caller holds ``t.lock``.) The piece is missing again, and what the pool holds
        of it goes at once: dropped later, it would take with it the blocks a new hash
        state of the piece buffered meanwhile (its piece would then verify from the hash
        state, over the old bytes on disk)."""
        t.set_state(piece, MISSING)
        t.parked.pop(piece, None)  # (started over: what it had here counts no more)
        self.pool.drop((t.id, piece))

    @staticmethod
    def _to_tell(t: Torrent, results: list[PieceResult]) -> None:
        """(Caller holds ``t.lock``, having just changed these pieces' states.) Their
        results, queued in the order of the changes: see :meth:`_tell`."""
        with t.tell_lock:
            t.to_tell.extend(results)

    def _tell(self, t: Torrent) -> None:
        """Hand ``on_piece`` the torrent's queued results, in order, one thread at a time,
        holding no lock of the torrent's (the callback may call back into this engine, a
        ``clear_piece`` of a piece it was just told of: its result is told next). A
        piece verified then cleared is so told in that order, whichever threads did it."""
        while True:
            with t.tell_lock:
                if t.telling or not t.to_tell:
                    return
                t.telling = True
                batch, t.to_tell = t.to_tell, []
            here = self._telling
            here.depth = getattr(here, "depth", 0) + 1  # (a callback may tell another torrent)
            try:
                if self.on_piece is not None:
                    for r in batch:
                        _observe(self.on_piece, r)
            finally:
                here.depth -= 1
                with t.tell_lock:
                    t.telling = False
                    t.told.notify_all()

    def _all_told(self, t: Torrent) -> None:
        """Wait until the torrent's queued piece results have been handed to
        ``on_piece``, whichever thread hands them out: what a barrier such as
        :meth:`flush_all` waited for is then told before it returns. (Not from within
        ``on_piece``: the results queued behind the one being told wait for it.)"""
        if getattr(self._telling, "depth", 0):
            return
        while True:
            self._tell(t)  # what is queued and not being told: told here
            with t.tell_lock:
                while t.telling:
                    t.told.wait()
                if not t.to_tell:
                    return

    def _changed(self, t: Torrent) -> None:
        """Verified pieces came or went without a piece result of their own: a client
        that follows the torrent's pieces is to look at them again."""
        if self.on_change is not None:
            _observe(self.on_change, t.key)

    def _sync(self, t: Torrent, files: Sequence[int] | None, force: bool = False) -> None:
        """Raises what the sync met, recorded on the torrent: a disk error, or a payload
        file found swapped for what pieced refuses to use (PathEscape)."""
        try:
            with self.metrics.timed("sync"):
                synced = t.storage.sync(files, force)
        except PiecedError as exc:
            self._record_error(t, exc, None)
            raise
        if synced:
            self.metrics.add("syncs", synced)

    @contextlib.contextmanager
    def errors_held(self) -> Iterator[list[tuple[Torrent, PiecedError, int | None]]]:
        """Within the block, this thread's storage errors change what they change (the
        pieces they cost start over, and are told so), but are held back from the
        counts, ``status`` and the error events: the list yields them, for
        :meth:`tell_errors`. A merged write of a client's blocks that fails is retried
        block by block, so that each gets the answer it would have had alone; its
        error was counted once, then once more for each block."""
        held: list[tuple[Torrent, PiecedError, int | None]] = []
        outer = getattr(self._held_errors, "list", None)
        self._held_errors.list = held
        try:
            yield held
        finally:
            self._held_errors.list = outer

    def tell_errors(self, errors: Sequence[tuple[Torrent, PiecedError, int | None]]) -> None:
        """Count, list and report errors held back by :meth:`errors_held`."""
        for t, exc, piece in errors:
            self._tell_error(t, exc, piece)

    def _pass_on(self, errors: Sequence[tuple[Torrent, PiecedError, int | None]]) -> None:
        """Errors an inner :meth:`errors_held` held: to the outer one's list if this
        thread is within one, else told."""
        outer = getattr(self._held_errors, "list", None)
        if outer is not None:
            outer.extend(errors)
        else:
            self.tell_errors(errors)

    def _record_error(self, t: Torrent, exc: PiecedError, piece: int | None) -> None:
        held = getattr(self._held_errors, "list", None)
        try:
            if isinstance(exc, FileVanished):
                self._start_over(t, exc.file_index, verified=True, partial=exc.written)
            elif isinstance(exc, SaveFolderGone) or exc.errno == errno.ENOENT:
                # Let go and found gone or another at the next use, or held while it
                # was removed (nothing can be made in it): as when a commit finds it so
                # (_root_moved), what was stored in it starts over, and the folder at
                # the save path is the torrent's from now on.
                for index, written in t.storage.root_moved() or ():
                    self._start_over(t, index, verified=True, partial=written)
            elif isinstance(exc, WriteLost):
                # The pieces synced before are durable; those whose bytes the file held
                # since are not: they start over, and the file may be synced again.
                self._start_over(t, exc.file_index, verified=False, partial=True)
                t.storage.lost_handled(exc)
        finally:
            # Told after the pieces it cost are (piece_failed): a client that stops on
            # the error knows by then what it still has.
            if held is not None:
                held.append((t, exc, piece))
            else:
                self._tell_error(t, exc, piece)

    def _tell_error(self, t: Torrent, exc: PiecedError, piece: int | None,
                    push: bool = True) -> None:
        """Count, list (``status``'s ``errors``) and push (``on_error``, unless not
        ``push``) an error of the torrent."""
        self.metrics.error(exc.errno, exc.kind)
        # (A symlink or hard link where a payload file should be, met by a read or a
        # write: listed and told with EPERM, as a check says it; events carry an errno.)
        code = errno.EPERM if exc.errno is None and isinstance(exc, PathEscape) else exc.errno
        entry: dict[str, Any] = {"piece": piece, "errno": code, "message": str(exc)}
        if isinstance(exc, PieceChanged):
            entry["changed"] = 1
        now = time.monotonic()
        with t.lock:
            last = t.errors[-1] if t.errors else None
            if (last is not None and last["message"] == entry["message"]
                    and last["errno"] == entry["errno"]):
                # The same error again (a full disk fails every block; a file refused
                # fails every read of it): one entry, counted, naming the latest piece,
                # and the first MERGED_PIECES pieces it was met at (a bad disk's reads
                # failed at 16 pieces, and the entry named the last alone).
                met = last.setdefault("pieces", [] if last["piece"] is None else [last["piece"]])
                if piece is not None and piece not in met and len(met) < MERGED_PIECES:
                    met.append(piece)
                last["piece"] = piece
                last["count"] = last.get("count", 1) + 1
            else:
                t.errors.append(entry)
                del t.errors[:-32]
            # A full disk fails every block: one report a second per kind is enough
            # (status keeps the last 32, /metrics counts them all).
            due = push and (now - t.error_reported.get(exc.errno, -ERROR_EVENT_INTERVAL)
                            >= ERROR_EVENT_INTERVAL)
            if due:
                t.error_reported[exc.errno] = now
        if due and self.on_error is not None and not t.removed:
            _observe(self.on_error, t.key, entry)

    def _journal_clears(self, t: Torrent, rec: TorrentRecord | None, pieces: list[int],
                        must: bool = False) -> None:
        """Journal that verified pieces are verified no more, before they are marked so
        (caller holds the journal lock, not ``t.lock``): from the moment they are, blocks
        may land in them, and a crash before the record would bring them back verified
        over the new bytes. When the record cannot be written (a full state folder):
        with ``must``, the error is raised and nothing changes; otherwise (their data is
        gone or bad all the same) they go into ``t.unrecorded`` (the torrent starts no
        piece until the record is written), and the error is reported."""
        if rec is None or not pieces:
            return
        try:
            rec.append([(REC_CLEARED, p, bytes(16)) for p in pieces])
        except OSError as exc:
            error = StorageIOError.wrap(exc, "journal pieces that are not verified any more")
            if must:
                raise error from None
            with t.lock:
                t.unrecorded.update(pieces)
            self._record_error(t, error, None)
            return
        with t.lock:
            t.unrecorded.difference_update(pieces)

    def _record_unrecorded(self, t: Torrent) -> None:
        """Journal the pieces of ``t.unrecorded`` now, or raise: a block is about to start
        a piece of the torrent."""
        rec = self._records.get(t.id)
        if rec is None:
            return
        with rec.journal_lock:
            with t.lock:  # (one verified again since was journaled so: nothing to say)
                t.unrecorded.difference_update([p for p in t.unrecorded
                                                if t.state[p] == VERIFIED])
                todo = sorted(t.unrecorded)
            try:
                rec.append([(REC_CLEARED, p, bytes(16)) for p in todo])
            except OSError as exc:
                raise StorageIOError.wrap(
                    exc, f"journal that piece {todo[0]} is not verified any more, before "
                         "anything is written into it") from None
            with t.lock:
                t.unrecorded.difference_update(todo)

    def _before_remaking(self, t: Torrent, index: int) -> None:
        """A file seen gone (or cut short) is about to be given its length again, by a
        write: its pieces still verified are not any more, journaled first (whoever saw
        it go may not have said so yet, or at all); while the journal cannot record that,
        the write fails, and the file stays as it is."""
        pieces = t.layout.file_pieces(index)
        with t.lock:
            stale = any(t.state[p] == VERIFIED for p in pieces)
        if stale:
            self._start_over(t, index, verified=True, partial=False)
        with t.lock:
            unrecorded = not t.unrecorded.isdisjoint(pieces)
        if unrecorded:
            self._record_unrecorded(t)  # raises while the state disk is full

    def _start_over(self, t: Torrent, index: int, verified: bool, partial: bool,
                    pieces: Sequence[int] | None = None, journaled: Sequence[int] = ()) -> None:
        """What a payload file held may be gone (it vanished, or its write-back failed):
        its pieces start over. Verified ones (if ``verified``: the file itself went) are
        verified no more, and a write re-creates the file empty; those hashing or
        committing are failed; those partly written (if ``partial``) start over, their
        bytes gone with it.

        Runs under at most one piece lock; a reset piece is marked done without taking
        its lock (no thread holds two), so its writers drop what they still send. The
        pieces failed or started over are told as failed (without v1/v2: no hash said
        so), so that their blocks are sent again. ``pieces``: only those of the file;
        ``journaled``: those of them the caller journaled cleared already.
        """
        failed = []
        todo = t.layout.file_pieces(index) if pieces is None else pieces
        rec = self._records.get(t.id)
        with _journal_lock(rec):
            cleared = []
            if verified:  # journaled first: a write may re-create the file at once after
                with t.lock:
                    cleared = [] if t.removed else [p for p in todo if t.state[p] == VERIFIED]
                self._journal_clears(t, rec, [p for p in cleared if p not in journaled])
            with t.lock:
                # A torrent unregistered meanwhile (by another client, while a torrent
                # sharing its files wrote into them) has nothing left to start over: its
                # pieces under way went with it. (Looked at, they were still partial, and
                # the write of the other torrent failed INTERNAL.)
                for p in () if t.removed else todo:
                    state = t.state[p]
                    if state == VERIFIED and verified:
                        pass
                    elif state == HASHING:  # its writer sees it taken back, and fails it
                        t.partial.pop(p)
                        self._count_partials(-1)
                    elif state == COMMITTING:  # its committer leaves it out
                        failed.append(p)
                    elif state == PARTIAL and partial:
                        t.partial.pop(p).done = True
                        self._count_partials(-1)
                        failed.append(p)
                    elif state == MISSING and partial and p in t.parked:  # (its bytes too)
                        failed.append(p)
                    else:
                        continue
                    self._to_missing(t, p)
                self._to_tell(t, [PieceResult(t.key, p, False, None, None) for p in failed])
        self._tell(t)
        if cleared:
            self._changed(t)

    # -- reads ------------------------------------------------------------------------
    def _read_range(self, t: Torrent, piece: int, begin: int, length: int,
                    out: bytearray | None = None) -> bytearray:
        """Bytes of a piece as they stand: buffered blocks over what is on disk (into
        ``out``, whose every byte is written, if given)."""
        if out is None:
            out = bytearray(length)
        view = memoryview(out)
        end = begin + length
        gaps = [(begin, end)]
        for b, data in self.pool.dirty_blocks((t.id, piece)):
            lo, hi = max(b, begin), min(b + len(data), end)
            if lo < hi:
                view[lo - begin : hi - begin] = memoryview(data)[lo - b : hi - b]
                gaps = [g for s, e in gaps for g in ((s, min(e, lo)), (max(s, hi), e)) if g[0] < g[1]]
        for s, e in gaps:
            segs = t.layout.map(piece, s, e - s)
            try:
                with self.metrics.timed("read"):
                    t.storage.readinto(segs, view[s - begin : e - begin])
            except (StorageIOError, PathEscape) as exc:
                if not _never_made(exc):
                    self._record_error(t, exc, piece)
                raise
            self.metrics.add("bytes_read", sum(g.length for g in segs if g.stored))  # (no pads)
        return out

    def read_chunk(
        self, ih: bytes, piece: int, begin: int, length: int, volatile: bool = False
    ) -> bytes:
        """Read for seeding; whole pieces are cached unless ``volatile``."""
        return bytes(self.read_chunk_view(ih, piece, begin, length, volatile))

    def read_chunk_view(
        self, ih: bytes, piece: int, begin: int, length: int, volatile: bool = False
    ) -> Buffer:
        """:meth:`read_chunk` without the copy: a view of the cached piece, which nothing
        writes into again, for a caller that sends it and lets it go (the daemon)."""
        t = self._get(ih)
        t.layout.check(piece, begin, length)
        t.enter()
        try:
            return self._read_chunk(t, piece, begin, length, volatile)
        finally:
            t.leave()

    def _read_chunk(self, t: Torrent, piece: int, begin: int, length: int,
                    volatile: bool) -> Buffer:
        key = (t.id, piece)
        if self.pool.has_dirty(key):
            return self._read_range(t, piece, begin, length)
        epoch = t.epoch[piece]  # what is read below is cached only if this does not move
        cached = self.pool.get(key, volatile)
        spare: bytearray | None = None  # a buffer taken for the piece, for the miss below
        held = 0  # bytes of room taken to read the piece whole (_fill_room)
        try:
            if cached is not None:
                if (not volatile and isinstance(cached, ResidentPiece)
                        and cached.size <= self._cacheable
                        and (length == cached.size or not _mostly_pads(t, piece))
                        and self._fill_room(cached.size)):
                    # The first read of a piece written straight to its file: all of it
                    # comes into the cache from the page cache (never from the disk), into
                    # a buffer used again, so that the reads of its other blocks are hits
                    # instead of one more fresh buffer and one more read each.
                    held = cached.size
                    spare = self.pool.recycler.take(cached.size)
                    if self._read_resident(t, piece, 0, spare):
                        self._vouch(t, piece, epoch, spare)
                        cached = PieceData.whole(spare)
                        self._cache_read(t, piece, epoch, cached)
                        spare = None
                hit = cached.read(begin, length) if spare is None else None
                if hit is not None:
                    self.metrics.add("cache_hits")
                    if (isinstance(cached, ResidentPiece) and length == cached.size
                            and t.state[piece] == VERIFIED):
                        # (the file's pages: vouched for whole, as a read of the file is)
                        self._vouch(t, piece, epoch, hit)
                    return hit
                self.pool.drop(key)  # the page cache let it go: read it the usual way
            self.metrics.add("cache_misses")
            size = t.layout.piece_size(piece)
            if (volatile or t.state[piece] < COMMITTING or size > self._cacheable
                    or (length < size and _mostly_pads(t, piece))):
                # Only a verified piece is cached: a copy of one still arriving would be
                # stale at once. Nor is one too big for the budget: a read of 16 bytes then
                # costs 16. Nor one mostly of pads (a small file's piece in a v2 torrent
                # of 16 MiB pieces) for a read of part of it: read whole, zeros and all,
                # and its fingerprint taken over them, each of its blocks cost 16 MiB,
                # and a torrent of many small files seeded 20 times slower than by
                # libtorrent. (A read of all of it is checked and cached, as any.)
                return self._read_uncached(t, piece, begin, length, epoch)
            if not held:
                if not self._fill_room(size):  # (no room now: its range)
                    return self._read_uncached(t, piece, begin, length, epoch)
                held = size
            if spare is None or len(spare) != size:
                spare = self.pool.recycler.take(size)
            data = self._read_range(t, piece, 0, size, spare)
            self._vouch(t, piece, epoch, data)
            self._cache_read(t, piece, epoch, PieceData.whole(data))
            return memoryview(data)[begin : begin + length]
        finally:
            if held:
                with self._filling_lock:
                    self._filling -= held

    def _read_uncached(self, t: Torrent, piece: int, begin: int, length: int,
                       epoch: int) -> Buffer:
        """A range read as it is on disk, not cached: vouched for (:meth:`_vouch`) when it
        is a verified piece whole, as a read into the cache is. Unchecked, a whole piece
        read past the cache (no cache, a piece larger than it may hold, no room at that
        moment) served bytes changed on disk as verified, and a seeder sent them."""
        data = self._read_range(t, piece, begin, length)
        if begin == 0 and length == t.layout.piece_size(piece) and t.state[piece] == VERIFIED:
            self._vouch(t, piece, epoch, data)
        return data

    def _vouch(self, t: Torrent, piece: int, epoch: int, data: Buffer) -> None:
        """A verified piece read whole from its files, to be cached, is compared with
        its fingerprint (BLAKE3: a fraction of a millisecond for 4 MiB), so that the
        cache holds only bytes the daemon vouches for. Bytes changed on disk behind its
        back (an edit, a bad disk) make the piece verified no more, journaled so, and
        the read fails (EIO). Cached, such bytes were served until a recheck or a
        restart, after the file was mended too: leechers failed the piece again and
        again. (Reads of parts of a piece that do not fill the cache serve what is on
        disk, as libtorrent does.)"""
        fp = t.fingerprint(piece)
        if fp is None or not t.storage.stores or fingerprint([data], t.layout.pads(piece)) == fp:
            return
        rec = self._records.get(t.id)
        with _journal_lock(rec):
            with t.lock:  # (not read while it changed: a new attempt at the piece is not this)
                if t.epoch[piece] != epoch or t.state[piece] != VERIFIED:
                    return
            self._journal_clears(t, rec, [piece])
            with t.lock:
                if t.state[piece] == VERIFIED:
                    self._to_missing(t, piece)
        self._changed(t)
        files = sorted({seg.file_index for seg in t.layout.map(piece, 0, len(data))
                        if seg.stored})
        error = PieceChanged(
            f"piece {piece}: its bytes on disk ({', '.join(str(t.storage.file_path(i)) for i in files)})"
            " are not those verified: changed behind pieced's back, it is verified no "
            "more")
        self._record_error(t, error, piece)
        raise error

    def _fill_room(self, size: int) -> bool:
        """Room to read a piece of ``size`` bytes whole, to cache it: its buffer is
        outside the budget until the cache takes it, and each miss took one. Reads of a
        few bytes of many 16 MiB pieces at once, from as many clients, grew the daemon
        by 16 MiB a client (3 GiB for 200 over a 64 MiB budget). Pieces being read whole
        take at most ``cache_bytes / FILLING_SHARE`` (one piece at least)."""
        with self._filling_lock:
            if self._filling and self._filling + size > self._filling_limit:
                return False
            self._filling += size
            return True

    def _cache_read(self, t: Torrent, piece: int, epoch: int,
                    data: PieceData | ResidentPiece) -> None:
        """Cache a piece read whole, unless it started to change since ``epoch`` was
        taken: its copy may hold bytes from before, and must not replace the piece that
        was verified meanwhile."""
        with t.lock:
            if t.epoch[piece] == epoch:
                self.pool.put((t.id, piece), data)

    def read_piece(self, ih: bytes, piece: int) -> bytes:
        """A whole piece, with its buffered blocks flushed to disk first."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        t.enter()
        try:
            self._flush_piece(t, piece, sync=False)
            return bytes(self._read_chunk(t, piece, 0, t.layout.piece_size(piece), False))
        finally:
            t.leave()

    # -- hashing ------------------------------------------------------------------------
    def hash_piece(self, ih: bytes, piece: int, expected: bytes | None = None) -> bool:
        """SHA-1 check of a piece as it stands; ``expected`` defaults to the metainfo's."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        if expected is None:
            if not t.meta.has_v1:
                raise NoHashes("torrent has no v1 piece hashes: use hash_piece_v2")
            expected = t.meta.v1_hash(piece)
        else:
            expected = _digest(expected, 20, "a SHA-1 digest")
        d1, _ = self._hash_as_it_stands(t, piece, True, None)
        return d1 == bytes(expected)

    def _hash_as_it_stands(self, t: Torrent, piece: int, want_v1: bool,
                           v2: V2Piece | None) -> tuple[bytes | None, bytes | None]:
        """(SHA-1, v2 root) of a piece as it stands, read and hashed a part at a time:
        a whole piece of up to 64 MiB in memory for each of a few dozen clients' calls at
        once took gigabytes, outside the cache budget."""
        size = t.layout.piece_size(piece)
        check = PieceCheck(want_v1, v2, False)
        limit = size if want_v1 or v2 is None else v2.data_length
        t.enter()
        try:
            with t.lock:
                partial = t.partial.get(piece)
            # Its lock held while it reads: a write-out of its buffered blocks takes them
            # from the buffer before they are in the file, and read in between the piece
            # was neither the one before nor the one after.
            held = partial.lock if partial is not None else contextlib.nullcontext()
            with self._hash_slot(t), held, self.metrics.timed("hash"):
                for off in range(0, limit, HASH_PART):
                    check.update(memoryview(
                        self._read_range(t, piece, off, min(HASH_PART, limit - off))))
        finally:
            t.leave()
        d1, d2, _ = check.result()
        return d1, d2

    def _hash_slot(self, t: Torrent) -> threading.BoundedSemaphore:
        """The slot a whole-piece hash of ``t`` holds while it reads and hashes: as many
        at once on its file system as there are cores to hash on. 64 clients' calls on 64 threads, each
        taking the interpreter's lock back a MiB at a time, kept the short work of every
        other client waiting for seconds. Taken once the torrent is held (a hash waiting
        for a fence on its torrent takes no slot from the others' hashes), and one set
        per file system (a disk that hangs holds the slots of its own torrents only)."""
        device = t.storage.root.device
        slot = self._hash_slots.get(device)
        if slot is None:
            with self._lock:
                slot = self._hash_slots.setdefault(
                    device, threading.BoundedSemaphore(max(2, self.hash_pool.workers)))
        return slot

    def hash_piece_v2(self, ih: bytes, piece: int, expected: bytes | None = None) -> bool:
        """BEP 52 Merkle check of a piece against the piece layer (or a given root)."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        v2 = t.meta.v2_view(piece)
        if v2 is None:
            raise NoHashes("torrent has no v2 hashes: use hash_piece")
        if expected is None and not v2.expected:
            raise NoHashes(f"the metainfo has no piece layer for piece {piece}'s file: "
                           "give the expected root, or use hash_piece")
        want = v2.expected if expected is None else _digest(expected, 32, "a SHA-256 root")
        _, root = self._hash_as_it_stands(t, piece, False, v2)
        return root == want

    def hash_block(self, ih: bytes, piece: int, begin: int, length: int) -> bytes:
        """SHA-256 of one 16 KiB leaf block (the last one of a file may be shorter)."""
        t = self._get(ih)
        if begin % BLOCK_SIZE or not 0 < length <= BLOCK_SIZE:
            raise OutOfRange(
                f"a leaf block starts on a 16 KiB boundary and is 1..16384 bytes "
                f"(begin={begin}, length={length})"
            )
        t.layout.check(piece, begin, length)
        # From the file (under the buffered blocks), as hash_piece reads: a copy in the
        # cache is what was verified, not what the file holds now.
        t.enter()
        try:
            return hashlib.sha256(self._read_range(t, piece, begin, length)).digest()
        finally:
            t.leave()

    # -- buffer management ----------------------------------------------------------------
    def clear_piece(self, ih: bytes, piece: int) -> None:
        """Start a piece over: drop its buffered blocks and hash state, and forget it
        was verified (a hash failure seen by the client, or data it no longer trusts)."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        t.enter()
        try:
            rec = self._records.get(t.id)
            while True:
                with t.lock:
                    partial = t.partial.get(piece)
                # A piece being written or hashed is cleared between two of its blocks,
                # never while its last one is being verified: its hash state is locked.
                with partial.lock if partial is not None else contextlib.nullcontext():
                    with _journal_lock(rec):
                        # Its blocks are gone (a piece committing: its committer leaves
                        # it out). Whoever sends them, or serves the piece, is told, as of
                        # any piece taken back (no hash failed: without v1/v2).
                        told = [PieceResult(t.key, piece, False, None, None)]
                        with t.lock:
                            if t.partial.get(piece) is not partial:
                                continue  # a block started (or finished) it meanwhile
                            state = t.state[piece]
                            if state != VERIFIED:
                                # (A parked piece holds blocks written too: its writers
                                # are told, as of a piece under way.)
                                parked = state == MISSING and piece in t.parked
                                if partial is not None:
                                    del t.partial[piece]
                                    self._count_partials(-1)
                                self._to_missing(t, piece)
                                if state in (PARTIAL, COMMITTING) or parked:
                                    self._to_tell(t, told)
                        if state == VERIFIED:
                            # Journaled before it is missing (no block can land in it
                            # meanwhile: it stays verified, and only the journal lock's
                            # holder changes that); if that fails, nothing changed.
                            self._journal_clears(t, rec, [piece], must=True)
                            with t.lock:
                                self._to_missing(t, piece)
                                self._to_tell(t, told)
                    if partial is not None:
                        partial.done = partial.cleared = True
                break
            self._tell(t)
        finally:
            t.leave()

    def flush_piece(self, ih: bytes, piece: int, sync: bool = True) -> None:
        """Write a piece's buffered blocks and fdatasync its files."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        t.enter()
        try:
            self._flush_piece(t, piece, sync)
        finally:
            t.leave()

    def _flush_piece(self, t: Torrent, piece: int, sync: bool) -> None:
        with t.lock:
            partial = t.partial.get(piece)
        if partial is not None:
            with partial.lock:
                self._write_out_buffered(t, piece)
        if sync:
            self._sync(t, t.files_of(piece))

    def flush_all(self, raise_for: Collection[bytes] | None = None) -> None:
        """Make every buffered block durable, and wait for the pieces committing. A
        torrent's storage error (recorded on it) is raised after the others are done.

        ``raise_for``: the keys of the torrents a daemon's client used. Only those are
        flushed and waited for: another client's torrent is not the caller's to make
        durable, and its disk may be one whose writes or syncs hang (a USB disk spinning
        up, a network mount gone), and a barrier of one client waited for every other
        client's disk. A client that used none flushes every torrent, waiting for those
        no fenced operation holds or awaits, and hears of no torrent's error: a barrier
        for whatever other connections wrote."""
        with self._lock:
            if raise_for:
                torrents = {t.id: t for k, t in self._torrents.items() if k in raise_for}
            else:
                torrents = {t.id: t for t in self._torrents.values()}
        anyone = raise_for is not None and not raise_for
        failed: PiecedError | None = None
        counts = {tid: t.commit_failures for tid, t in torrents.items()}
        for t in torrents.values():
            if not anyone:
                try:
                    t.enter()
                except UnknownTorrent:
                    continue
            elif not t.fence.try_shared():
                continue  # (a recheck or a move flushes it as it begins)
            try:
                self._flush_torrent(t, sync=True)
            except PiecedError as exc:  # (recorded on the torrent, told to its clients)
                failed = failed or exc
            finally:
                t.leave()
        self._committer.drain(torrents.keys() if raise_for else None)
        for t in torrents.values():  # the results of what was drained, told before
            self._all_told(t)
            if failed is None and t.commit_failures != counts[t.id] and not t.removed:
                # A commit it waited for failed, out of this thread's sight (a journal the
                # state folder had no room for): its pieces are not verified, and the
                # caller, told all is durable, would take them for so.
                failed = t.commit_error
        if failed is not None and not anyone:
            raise failed

    def _flush_torrent(self, t: Torrent, sync: bool, lenient: bool = False) -> None:
        """Write out a torrent's buffered blocks (the caller holds it). A piece whose
        blocks cannot be written (a full disk) starts over, told failed (see
        :meth:`_write_out_buffered`), and the others are written all the same; the first
        error is raised after the sync, or with ``lenient`` not at all (it was recorded
        and told): for the fences, which leave pieces under way as they are. (Stopped at
        the first such piece, a flush left the others buffered, and every recheck and
        move of a torrent on a full disk failed until each piece under way was
        cleared by hand.)"""
        first: PiecedError | None = None
        for tid, piece in self.pool.dirty_keys():
            if tid == t.id:
                try:
                    self._flush_piece(t, piece, sync=False)
                except PiecedError as exc:
                    first = first or exc
        if sync:
            # A file found deleted or cut short behind pieced's back stops a sync: its
            # pieces start over (recorded and told), and a fence goes on with the files
            # as they are: the others synced all the same (what a recheck then finds
            # good is durable). (Raised, a recheck asked to find what such a file cost
            # failed with ENOENT instead.)
            for _ in range(len(t.meta.files) + 1):
                try:
                    self._sync(t, None)
                    break
                except FileVanished as exc:
                    if not lenient:
                        raise
                    first = first or exc
            else:
                self._sync(t, None)
        if first is not None and not lenient:
            raise first

    def cached_pieces(self, ih: bytes) -> list[int]:
        """Verified pieces held in memory, for SuggestPiece."""
        t = self._get(ih)
        return sorted(p for p in self.pool.cached_of(t.id) if t.state[p] == VERIFIED)

    # -- whole-torrent operations: fences ---------------------------------------------------
    def recheck(
        self, ih: bytes, progress: Progress | None = None, full: bool = False,
        join: bool = False,
    ) -> VerifyResult:
        """Verify what is on disk, after the block I/O in flight and alone on the torrent.

        Pieces being downloaded (partial) are left as they are; every other piece ends
        up verified or missing as its data says. A piece with a fingerprint is checked
        against it (BLAKE3: faster than SHA-1, and one hash for a hybrid's two); a
        mismatch, or no fingerprint, falls back to the torrent's own hashes. ``full``
        always uses the torrent's hashes. A recheck asked while another of its kind
        waits for the torrent joins it (``_Recheck``): the two get one result. With
        ``join`` it joins one of its kind under way too (else it checks after it, what
        changed meanwhile included): a client that found the torrent registered by
        another, and wants what is on disk checked once, whoever asked first.
        """
        t = self._get(ih)
        with t.lock:
            mine = _Recheck()
            running = t.rechecks_running.get(full) if join else None
            run: _Recheck = running or t.rechecks.setdefault(full, mine)
            joined = run is not mine
            if progress is not None:
                run.progress.append(progress)
        if joined:
            return run.done.result()
        try:
            result = self._recheck(ih, run, full)
        except BaseException as exc:
            run.done.set_exception(exc)
            raise
        finally:
            with t.lock:
                if t.rechecks.get(full) is run:
                    del t.rechecks[full]
                if t.rechecks_running.get(full) is run:
                    del t.rechecks_running[full]
        run.done.set_result(result)
        return result

    def _recheck(self, ih: bytes, run: _Recheck, full: bool) -> VerifyResult:
        with self._alone(ih) as t, self._checking(t, "all"):
            with t.lock:  # started: a recheck asked from now on checks after this one
                if t.rechecks.get(full) is run:
                    del t.rechecks[full]
                t.rechecks_running[full] = run  # (unless it asks to join it)
                # What went wrong before is looked at again now, as libtorrent's
                # force_recheck clears a torrent's error: what is still wrong is told
                # again by this check (a file it cannot read, a folder gone).
                t.errors.clear()
            self._flush_torrent(t, sync=True, lenient=True)  # what is read below is durable
            self._root_moved(t)  # (the folder at the save path is the one checked)
            # The files as they are now under their names, as libtorrent checks them: a
            # file renamed or swapped in meanwhile is the one checked, and written after.
            # A piece under way in a file that changed so starts over (its hash state
            # holds blocks that went to the other file), told as failed.
            for index in sorted(t.storage.look_again()):
                self._start_over(t, index, verified=False, partial=True)
                self._tell_sharers(t, index)
            with t.lock:
                todo = [p for p, s in enumerate(t.state) if s != PARTIAL]
                gens = dict(t.written_into)
            vanished: set[int] = set()
            result = self._verify(t, todo, run.tell, full, vanished)
            result = self._distrust_changed(t, result, vanished)
            self._apply_verify(t, todo, result, gens)
            t.storage.doubted.clear()  # (every piece looked at: as they are now, known)
            for p in self.pool.cached_of(t.id):  # read again from what was just checked
                self.pool.drop((t.id, p))
            self._save_now(t)
            return result

    def move_storage(self, ih: bytes, new_path: str | Path) -> None:
        path = self._check_save_path(Path(new_path))
        with self._alone(ih) as t:
            if path == t.storage.save_path:
                return  # there already
            with self._not_shared(t, None):
                self._flush_torrent(t, sync=True, lenient=True)
                t.storage.check_move(path)
                st = t.storage
                self._not_in_state(path, map(st.parts, st.stored_files()))
                going = [path.joinpath(*st.parts(i)) for i in st.stored_files()]
                self._going_to(t, going)
                self._not_others(t, path, going)
                # A file put in the place of one of the torrent's behind pieced's back is
                # refused where it is; moved, it would be taken for the torrent's at the
                # new place: its pieces start over first.
                for index in t.storage.changed_files():
                    self._start_over(t, index, verified=True, partial=True)
                renames = dict(t.storage.renames)
                self._moving(t, lambda: t.storage.move(path), path, renames,
                             (t.storage.save_path, renames))

    def rename_file(self, ih: bytes, index: int, new_name: str) -> None:
        with self._alone(ih) as t, self._not_shared(t, index):
            self._flush_torrent(t, sync=True, lenient=True)
            parts = t.storage.rename_target(index, new_name)
            if parts is None:
                return
            self._not_in_state(t.storage.save_path, [parts])
            going = [t.storage.save_path.joinpath(*parts)]
            self._going_to(t, going)
            self._not_others(t, t.storage.save_path, going)
            renames = dict(t.storage.renames)
            self._moving(t, lambda: t.storage.rename(index, new_name), t.storage.save_path,
                         {**renames, index: parts}, (t.storage.save_path, renames))

    @contextlib.contextmanager
    def _not_shared(self, t: Torrent, index: int | None) -> Iterator[None]:
        """Refuse to move (``index`` None) or rename files another registered torrent
        shares (cross-seeding): they would be taken from under it, its verified pieces
        and open files left behind. Held for the move: a register that would come to
        share them meanwhile is refused instead (it looks after it has joined)."""
        with self._lock:
            t.moving = True
            shared = t.shared if index is None else {index: t.shared.get(index, [])}
            others = {(o.key.hex(), i) for i, os_ in shared.items() for o, _ in os_
                      if not o.deleting}
        try:
            if others:
                ih_hex, i = min(others)
                what = "move the files of" if index is None else "rename a file of"
                raise BadRequest(
                    f"cannot {what} this torrent: {t.storage.file_path(i)} is shared with "
                    f"torrent {ih_hex} (cross-seeding); move or remove that one first")
            yield
        finally:
            with self._lock:
                t.moving = False
                self._going.pop(t.id, None)

    def _not_in_state(self, save: Path, parts: Iterable[tuple[str, ...]]) -> None:
        """Refuse (PATH_ESCAPE) payload files in the daemon's state folder (the embedded
        defaults keep it in ``var/``, inside the allowed root): a torrent's file there
        could be a record's, and the record folder of a torrent removed is deleted whole,
        payload files in it too, while they were still reported verified."""
        state = self._state_real
        if state is None:
            return
        if save == state or save.is_relative_to(state):
            raise PathEscape(f"save path {save} is inside the daemon's state folder {state}")
        if not state.is_relative_to(save):
            return
        rel = state.relative_to(save).parts
        k = len(rel)
        for p in parts:
            if p[:k] == rel:
                raise PathEscape(f"{save.joinpath(*p)} is inside the daemon's state folder "
                                 f"{state}")

    def _going_to(self, t: Torrent, paths: Iterable[Path]) -> None:
        """Where the files of ``t``'s move or rename go, known from now until it is over
        (see _not_shared): a torrent registered there meanwhile is refused. Known before
        the move looks for other torrents there (_not_others), and a register looks
        after it has joined: one of the two sees the other. (A torrent registered at a
        move's destination while the move went on shared its files unknown to either:
        its bad block went into the moved torrent's verified piece, and its removal with
        its files deleted them.)"""
        with self._lock:
            self._going[t.id] = frozenset(paths)

    def _not_others(self, t: Torrent, save: Path, paths: Iterable[Path]) -> None:
        """Refuse (EEXIST) to move or rename files of ``t`` to the paths of another
        registered torrent's files, or to a folder of them, or below one: written or not
        yet, they are that torrent's to write, and its download would overwrite pieces
        verified here (which, shared, could then not be moved away again)."""
        held = self._held_by_others(save, t)
        clash = _clash(held, paths) if held else None
        if clash is not None:
            there, up = clash
            raise StorageIOError(
                f"{there} is the place of a file of another torrent, or of one of its folders"
                if up is None else f"{there} would be below {up}, a file of another torrent",
                errno=errno.EEXIST)

    def _moving(self, t: Torrent, move: Callable[[], None], path: Path,
                renames: dict[int, tuple[str, ...]],
                previous: tuple[Path, dict[int, tuple[str, ...]]]) -> None:
        """Move or rename files crash-safely: where they go is recorded first, with where
        they were, so that a restart after a crash part-way finishes the move (a file
        left where it was would be taken for gone, its verified pieces with it); then
        the files move; then the record says where they are."""
        rec = self._records.get(t.id)
        if rec is not None:
            try:
                with rec.save_lock:
                    rec.write_location(path, renames, previous)
            except OSError as exc:
                raise StorageIOError.wrap(exc, "save the torrent's location") from None
        t.storage.stranded = False
        try:
            move()  # undone by itself if it fails part-way (``stranded`` if not whole)
        except BaseException:
            # The files are back where they were: recorded so; if some stayed where they
            # were going, with that place to bring them back from (and only then: a file
            # of the torrent's names there would be taken for the torrent's). Left in
            # place even if its folder cannot be synced: the record before it would lead
            # the next start to finish the move that was refused.
            if rec is not None:
                with contextlib.suppress(OSError), rec.save_lock:
                    rec.write_location(previous[0], previous[1],
                                       (path, renames) if t.storage.stranded else None,
                                       undo=False)
            raise
        finally:
            self._reshare(t)  # (moved or not: where its files are now)
        # The stamps of the files where they are now (a rename changes a file's ctime),
        # before the location record says the move is over: until then a start after a
        # crash takes no stamp for its word.
        self._save_now(t)
        try:
            self._save_location(t)
        except StorageIOError as exc:  # the record above already leads a restart there
            self._record_error(t, exc, None)

    # -- reporting ------------------------------------------------------------------------
    def status(self, ih: bytes, files: bool = True, partial: bool = False) -> dict[str, Any]:
        """What a client shows of a torrent; ``files=False`` leaves out the per-file
        progress (a list of 100,000 entries for some torrents). ``partial``: with the
        byte ranges held of each piece under way (see :meth:`partial_ranges`)."""
        t = self._get(ih)
        with t.lock:
            have = bytes(t.have)
            counts = {name: t.count(s) for name, s in (
                ("partial", PARTIAL), ("hashing", HASHING), ("committing", COMMITTING))}
            # (the last one may still be counting: copied, its list of pieces too)
            errors = [{**e, "pieces": list(e["pieces"])} if "pieces" in e else dict(e)
                      for e in t.errors]
            verified = t.count(VERIFIED)
            state = bytes(t.state) if files else b""
        st = self._status(t, have, counts, errors, verified,
                          self._file_progress(t, state) if files else None)
        if partial:
            st["partial"] = self.partial_ranges(ih)
        return st

    def partial_ranges(self, ih: bytes) -> list[list[Any]]:
        """``[piece, [[begin, end], ...]]`` for each piece under way: the bytes of it the
        daemon holds (pads included), in order. A client that starts again (a plugin
        stopped mid-piece) sends only the rest, as libtorrent keeps partial pieces
        across a restart instead of fetching them whole again."""
        t = self._get(ih)
        with t.lock:
            under_way = sorted(((p, part) for p, part in t.partial.items()
                                if t.state[p] == PARTIAL), key=lambda x: x[0])
            parked = [[p, [[a, b] for a, b in spans]] for p, (spans, _) in t.parked.items()]
        out: list[list[Any]] = []
        for p, part in under_way:
            with part.lock:
                if part.done:
                    continue
                out.append([p, [[a, b] for a, b in part.hasher.received.spans]])
        return sorted(out + parked)

    def _file_progress(self, t: Torrent, state: bytes) -> list[dict[str, Any]]:
        """Verified bytes per file (pads left out), read off the columns."""
        table, plen = t.meta.files, t.meta.piece_length
        offsets, lengths, flags = table.offsets, table.lengths, table.flags
        return [{"index": i, "path": t.storage.display_path(i), "length": lengths[i],
                 "verified_bytes": file_progress(state, plen, offsets[i], lengths[i])}
                for i in range(len(table)) if not flags[i] & PAD]

    def _status(self, t: Torrent, have: bytes, counts: dict[str, int], errors: list[Any],
                verified: int, files: list[dict[str, Any]] | None) -> dict[str, Any]:
        meta = t.meta
        st = {
            "info_hash": t.key.hex(),
            "info_hash_v1": meta.info_hash_v1.hex() if meta.info_hash_v1 else None,
            "info_hash_v2": meta.info_hash_v2.hex() if meta.info_hash_v2 else None,
            "name": meta.name,
            "save_path": str(t.storage.save_path),
            "backend": t.storage.name,
            "num_pieces": meta.num_pieces,
            "piece_length": meta.piece_length,
            "total_size": meta.total_size,
            "have": have,
            "verified_pieces": verified,
            "partial_pieces": counts["partial"],
            "hashing_pieces": counts["hashing"],
            "committing_pieces": counts["committing"],
            "reverifying_pieces": t.reverifying,
            "checking": t.checking,
            "v2_unchecked_pieces": len(meta.v2_unchecked()),
            "registration": t.id,
            "errors": errors,
        }
        if files is not None:
            st["files"] = files
        return st

    def stats(self) -> dict[str, Any]:
        """The counters storage owns, and its gauges."""
        snap = self.metrics.snapshot()
        snap.update(
            backend=self.backend,
            torrents=self._how_many(),
            cache_bytes=self.pool.cache_bytes,
            write_buffer_bytes=self.pool.dirty_bytes,
            budget_bytes=self.pool.budget,
            recycled_bytes=self.pool.recycler.held_bytes,
            piece_buffers_reused=self.pool.recycler.reused,
            hash_queue_depth=self.hash_pool.queued,
            hash_workers=self.hash_pool.workers,
            hash_jobs=self.hash_pool.jobs,
            hash_job_us=int(self.hash_pool.seconds * 1e6),
            open_files=self.handles.open_count,
            # What the start found in the state folder and could not use (a torrent
            # skipped, a record damaged): the log alone said so, and a skipped torrent
            # just was not there.
            load_errors=list(self.load_errors),
        )
        return snap

    def stop_checks(self) -> None:
        """Cut short the checks of files in progress (a recheck, the start-up check): a
        stop does not wait for them; each is carried out again at the next start."""
        self._stopping.set()

    def close(self) -> None:
        """Flush and sync everything, then stop the workers. Nothing verified is lost."""
        self.stop_checks()
        try:
            self.flush_all()
        except PiecedError as exc:
            # A torrent's error (its files deleted, a disk gone): recorded on it, its
            # pieces taken back; the others are flushed and the stop goes on.
            log.warning("at the stop: %s", exc)
        finally:
            self._committer.stop()
            self.hash_pool.shutdown()
            if self._aside is not None:
                self._aside.close()
            with self._lock:
                torrents = {t.id: t for t in self._torrents.values()}

            def end(t: Torrent) -> bool:
                t.storage.times_durable(t.storage.written_files())  # (as written this run)
                t.storage.close()
                try:
                    return self._save_now(t, stamps=True)  # (after the final sync: stamps
                finally:                                    # match the files)
                    rec = self._records.get(t.id)
                    if rec is not None:
                        rec.close()

            # Several at once, as a start writes them (see _load_state): each record is
            # two fsyncs, which the file system takes together; one after the other, a
            # stop with 17,000 torrents took 16 to 38 s.
            with ThreadPoolExecutor(LOAD_SAVERS, thread_name_prefix="pieced-stop") as pool:
                ends = list(zip(torrents.values(), pool.map(end, torrents.values()),
                                strict=True))
            unsaved = [t.key.hex() for t, ok in ends if not ok]
            saved = not unsaved
            if unsaved:
                log.warning("at the stop: the record of %d torrent(s) could not be saved (%s): "
                            "their journals keep every verified piece; the next start "
                            "checks their files as after a crash", len(unsaved),
                            ", ".join(unsaved[:5]) + (", ..." if len(unsaved) > 5 else ""))
            if self.state is not None:
                try:
                    if saved:  # else the next start is a crash's: nothing taken on trust
                        self.state.mark_clean()
                finally:
                    self.state.close()


def _journal_lock(rec: TorrentRecord | None) -> contextlib.AbstractContextManager[Any]:
    """The torrent's journal lock, held while a change is journaled and made (nothing
    to hold for a torrent without a state folder)."""
    return rec.journal_lock if rec is not None else contextlib.nullcontext()


_NONZERO = re.compile(rb"[^\0]+")
MAX_PAD_RUNS = 64  # runs of non-zero pad bytes kept exactly, per copy of a range


def _add_nonzero_runs(bad: Intervals, data: bytes, at: int) -> None:
    """Mark where ``data`` (bytes of pad ranges, from ``at``) is not zero. Up to
    MAX_PAD_RUNS runs exactly; past that (junk, not a peer's slip) from its first
    non-zero byte to its last, which at worst fails a piece that a later copy of just
    the bad bytes would have mended."""
    runs: list[tuple[int, int]] = []
    for m in _NONZERO.finditer(data):
        if len(runs) == MAX_PAD_RUNS:
            head = len(data) - len(data.lstrip(b"\0"))
            bad.add(at + head, at + len(data.rstrip(b"\0")))
            return
        runs.append(m.span())
    for s, e in runs:
        bad.add(at + s, at + e)


def _clash(held: frozenset[Path] | set[Path], paths: Iterable[Path]
           ) -> tuple[Path, Path | None] | None:
    """The first of ``paths`` that meets the files ``held``: (it, None) when it is one of
    them or a folder of one, (it, that file) when it lies below one; None if none does."""
    folders = {f for h in held for f in h.parents}
    for there in paths:
        if there in held or there in folders:
            return there, None
        for up in there.parents:
            if up in held:
                return there, up
    return None


def _tops(t: Torrent) -> set[str]:
    """Where the torrent's files begin: the save path joined with the first part of
    its files' paths as the metainfo has them (its name: its folder, or its one file),
    and with the first part of each renamed file."""
    save, renames = str(t.storage.save_path).rstrip("/"), t.storage.renames  # ("/": "")
    named = {f"{save}/{t.first_part}"} if t.first_part else set()
    return named | {f"{save}/{parts[0]}" for parts in renames.values()} if renames else named


def _check_write(t: Torrent, piece: int, begin: int, length: int) -> None:
    """A block to write lies inside its piece and holds at least one byte: an empty one
    would make its piece partial (a slot of ``max_partial_pieces``) with nothing in it."""
    if length <= 0:
        raise OutOfRange(f"a block to write holds at least one byte (piece={piece}, "
                         f"begin={begin}, length={length})")
    t.layout.check(piece, begin, length)


# A read's errors that mean the piece's bytes are not there (the piece fails a check).
_NOT_THERE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENXIO, errno.ELOOP})


class _Recheck:
    """A recheck asked and not started yet. A recheck asked meanwhile joins it, since
    the run starts after both asks: one check answers them all, so rechecks queued
    behind a long one by many clients (or by one that asks again and again, or hangs
    up) read the data once, as libtorrent queues one check of a torrent."""

    __slots__ = ("done", "progress")

    def __init__(self) -> None:
        self.progress: list[Progress] = []  # the askers', told alike
        self.done: Future[VerifyResult] = Future()

    def tell(self, done: int, total: int) -> None:
        for progress in self.progress:
            progress(done, total)


class _CheckFailed(Exception):
    """A check's read failed for another reason: it ends the check (not a StorageIOError,
    which would fail the piece and go on)."""

    def __init__(self, error: StorageIOError) -> None:
        super().__init__(str(error))
        self.error = error


def _stamp_kept(stamps: list[list[int]], index: int, stamp: list[int]) -> bool:
    """Whether file ``index`` is as the record stamped it (a record of fewer fields, an
    older version's, is compared on those; one UNSTAMPED on its inode alone)."""
    if index >= len(stamps):
        return False
    kept = stamps[index]
    if kept[0] == UNSTAMPED:
        return len(kept) < STAMP_FIELDS or not kept[3] or kept[3] == stamp[3]
    return kept == stamp[:len(kept)]


def _moved_stamp_kept(stamps: list[list[int]], index: int, stamp: list[int],
                      one_fs: bool) -> bool:
    """Whether file ``index``, which a move a crash cut short took to another name (or
    was about to), is as the record stamped it: on its size and modification time (a
    move keeps them, a copy to another file system too), and on its inode where the
    move could not have copied it (``one_fs``); not on its change time, which the
    move's link changed."""
    if index >= len(stamps):
        return False
    kept = stamps[index]
    if len(kept) >= STAMP_FIELDS and kept[3] and one_fs and kept[3] != stamp[3]:
        return False
    return kept[0] == UNSTAMPED or kept[:2] == stamp[:2]


def _moved_files(saved: Loaded) -> set[int]:
    """The files whose path a move or rename under way (``saved.previous``) changes."""
    assert saved.previous is not None
    old, old_renames = saved.previous
    files = saved.metainfo.files
    return {i for i in range(len(files.lengths))
            if Path(old).joinpath(*(old_renames.get(i) or files.path(i)))
            != Path(saved.save_path).joinpath(*(saved.renames.get(i) or files.path(i)))}


def _one_file_system(saved: Loaded) -> bool:
    """Whether the places a move under way was from and to are on one file system (its
    files linked, not copied: their inodes kept); of a place not there (any more), the
    nearest folder above it that is. Not known counts as not."""
    assert saved.previous is not None
    a, b = _device(Path(saved.previous[0])), _device(Path(saved.save_path))
    return a is not None and a == b


def _device(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return p.stat().st_dev
        except OSError:
            continue
    return None


def _stamps_since(stamps: list[list[int]] | None, cleared: set[int], inodes: dict[int, int],
                  files: int) -> list[list[int]] | None:
    """The file stamps of a resume record as the journals since leave them: a file of a
    piece cleared since is compared on its inode alone (the daemon may have written it
    since, and its times are its own), a file a FILE record names on that inode (a file
    the record names by no stamp, or by an older one: made anew since)."""
    if stamps is None and not inodes:
        return None
    # (rows are replaced, never changed: the outer list alone is copied)
    out = list(stamps) if stamps is not None else [[UNSTAMPED, 0, 0, 0]] * files
    for i in cleared:
        if i < len(out) and out[i][0] != UNSTAMPED:
            out[i] = [UNSTAMPED, 0, 0, out[i][3] if len(out[i]) >= STAMP_FIELDS else 0]
    for i, inode in inodes.items():
        if i < len(out):
            out[i] = [UNSTAMPED, 0, 0, inode]
    return out


def _crash_floor(t: Torrent, stamps: list[list[int]] | None, index: int) -> int:
    """The length file ``index`` of ``t`` keeps at least when a backend puts right what
    its writes left half done at a crash (``FileStorage.after_crash``): all of it if the
    state folder's stamp of it is of the file as it is (the daemon had not written it
    since: what it holds past the torrent's end is another program's, or another
    torrent's); else the longest length a torrent sharing it gives it."""
    if (stamps is not None and index < len(stamps) and stamps[index][0] != UNSTAMPED
            and _stamp_kept(stamps, index, file_stamp(t.storage.file_path(index)))):
        return sys.maxsize
    return max((o.meta.files.lengths[i] for o, i in t.shared.get(index, ())), default=0)


def _inodes(stamps: list[list[int]] | None) -> dict[int, int]:
    """File -> inode, of the files ``stamps`` name by their inode alone. A file stamped
    whole (size and times: a clean stop's stamp, or one kept of a file nobody could
    write) is not among them: written since, it no longer matches its stamp, so a FILE
    record is journaled with the first piece verified in it, and a start after a crash
    compares it on its inode (the record's stamps of a clean stop, which a full disk kept
    from being written again, withheld every piece verified in the files written since
    until they were checked again)."""
    if stamps is None:
        return {}
    return {i: s[3] for i, s in enumerate(stamps)
            if len(s) >= STAMP_FIELDS and s[0] == UNSTAMPED and s[3] > 0}


def _unnamed_files(t: Torrent, files: Iterable[int]) -> list[tuple[int, int]]:
    """(file, inode) of those of ``files`` whose inode, as the daemon uses them, the
    state folder does not name (caller holds the journal lock): FILE records of them are
    journaled before the pieces verified in them, so that a start after a crash knows
    the file by its inode, and sees another put in its place (see _stamps_since)."""
    said, storage = t.inodes_said, t.storage
    out = []
    for i in files:
        used = storage.identity(i)
        if used is not None and said.get(i) != used[1]:
            out.append((i, used[1]))
    return out


def _kept_stamps(t: Torrent) -> list[list[int]] | None:
    """The file stamps a save records while the daemon runs (None: no file looked at or
    opened since the start), so that a start after a crash sees what was done to the files
    while the daemon was down (bytes changed, times put back, files swapped, an older
    copy put back), which it saw only after a clean stop. A file keeps its stamp of the
    start (or of its first read) only if it has been written by no torrent since, and
    can be by none until the next save: every piece of it verified (a piece cleared
    since is journaled first, and the start takes the file as unstamped), no other
    torrent sharing it (one coming to share it saves this record again). Any other file
    may be written by the daemon any time: its inode alone. No file is looked at here."""
    storage = t.storage
    start, written = storage.start_stamps, storage.written
    if not start and not storage.opened_any:
        return None
    state, layout = t.state, t.layout
    out: list[list[int]] = []
    for i, flag in enumerate(t.meta.files.flags):
        if flag & UNSTORED:
            out.append([0, 0, 0, 0])
            continue
        seen = start.get(i)
        pieces = layout.file_pieces(i)
        if seen is not None and i not in written and i not in t.shared and state[
                pieces.start:pieces.stop].count(VERIFIED) == len(pieces):
            # (a file a check found changed, not through yet, or stamped in the second
            # of its last change: a stamp that never matches)
            out.append(seen if i not in storage.doubted and i not in storage.racy
                       else [*seen[:2], -1, *seen[3:]])
        else:
            used = storage.identity(i)
            out.append([UNSTAMPED, 0, 0, used[1] if used is not None else
                        seen[3] if seen is not None else 0])
    return out


def _never_made(exc: PiecedError) -> bool:
    """A read found no file where no block was ever written (nor a verified piece kept):
    the reader's answer, not the torrent's error. Told to every client of the torrent as
    one, it stopped their downloads for a read of a piece nobody had."""
    return exc.errno == errno.ENOENT and not isinstance(exc, (FileVanished, SaveFolderGone))


def _digest(value: object, size: int, what: str) -> bytes:
    """An ``expected`` hash given by a caller: exactly ``size`` bytes, or BadRequest (an
    empty or short value would only ever compare unequal, and read as a failed piece)."""
    if not isinstance(value, (bytes, bytearray, memoryview)) or memoryview(value).nbytes != size:
        shown = f"{memoryview(value).nbytes} bytes" if isinstance(
            value, (bytes, bytearray, memoryview)) else type(value).__name__
        raise BadRequest(f"'expected' must be {what} of {size} bytes, not {shown}")
    return bytes(value)


__all__ = ["DiskIO", "PieceResult", "Torrent"]
