"""A torrent inside the engine: its piece states, its fence, its partial pieces.

Every piece is in exactly one state, and only the transitions below change it (each
under ``Torrent.lock``; the ``have`` bitfield follows the state, nothing else sets it):

    missing ──first block──▶ partial ──last block──▶ hashing ──pass──▶ committing
       ▲                        │                       │                  │
       └───── clear, vanished ──┴──────── fail ─────────┘     data + journal record
       ▲                                                       fdatasync'ed
       └──────── clear, vanished, recheck fails ──── verified ◀────────────┘

A block for a piece that is hashing, committing or verified is a duplicate: counted,
acknowledged, never written. So bytes that verified are never overwritten by a late
copy of one of their blocks.

The fence is libtorrent's fence job as a lock: block I/O of every connection holds the
torrent shared; recheck, move, rename and unregister hold it alone, so they run after
the block jobs in flight and before the next ones.
"""

from __future__ import annotations

import array
import mmap
import threading
from typing import Any

from .errors import PiecedError, UnknownTorrent
from .files import FileStorage
from .hashing import FINGERPRINT_BYTES, NO_FINGERPRINT, PieceHasher
from .layout import Layout
from .metainfo import Metainfo

MISSING, PARTIAL, HASHING, COMMITTING, VERIFIED = range(5)
_BITS_TO_STATE = bytes.maketrans(b"01", bytes((MISSING, VERIFIED)))


def file_progress(state: bytes, piece_length: int, offset: int, length: int) -> int:
    """Verified bytes of a file at ``offset``: its inner pieces are counted at C speed,
    only the two it may share with its neighbours are looked at one by one."""
    if length == 0:
        return 0
    first, last = offset // piece_length, (offset + length - 1) // piece_length
    if first == last:
        return length if state[first] == VERIFIED else 0
    done = state.count(VERIFIED, first + 1, last) * piece_length
    if state[first] == VERIFIED:
        done += (first + 1) * piece_length - offset
    if state[last] == VERIFIED:
        done += offset + length - last * piece_length
    return done


class Fence:
    """A readers-writer lock that prefers its writer, and takes turns.

    Once an exclusive holder waits, new shared holders wait behind it, so a recheck is
    not starved by a steady stream of blocks. When an exclusive holder lets go, the
    shared holders that waited for it go in before the next exclusive one: a client
    asking for rechecks back to back kept every other client's blocks for that torrent
    waiting for as long as it went on. Not re-entrant: code that holds the fence never
    acquires it again (the committer only ever tries, see :meth:`try_shared`). Taken
    twice per block, so the uncontended paths are one plain lock round trip.
    """

    __slots__ = ("_admit", "_cond", "_exclusive", "_lock", "_queued", "_serving", "_shared",
                 "_skipped", "_tickets", "_waiting", "closed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._queued = 0  # shared holders waiting
        self._admit = 0  # of those, how many go in before the next exclusive holder
        # Exclusive holders go in the order they came: one that let go and asks again
        # at once (a client asking for rechecks back to back) went in again before the
        # one waiting (another client's move, or full recheck), for as long as it asked.
        self._tickets = 0
        self._serving = 0
        self._skipped: set[int] = set()
        self.closed = False  # its torrent is gone: acquiring fails

    def acquire_shared(self) -> bool:
        """Hold it shared; False (and not held) once the torrent is gone."""
        with self._lock:
            if not self._exclusive and not self._waiting and not self.closed:
                self._shared += 1
                return True
        with self._cond:
            self._queued += 1
            try:
                while self._exclusive or (self._waiting and not self._admit):
                    self._cond.wait()
            finally:
                self._queued -= 1
            if self._admit:
                self._admit -= 1
                if not self._admit:
                    self._cond.notify_all()  # (an exclusive holder waits for the last)
            if self.closed:
                return False
            self._shared += 1
            return True

    def try_shared(self) -> bool:
        """Shared if nobody holds or awaits it exclusively; never waits."""
        with self._lock:
            if self._exclusive or self._waiting or self.closed:
                return False
            self._shared += 1
            return True

    def release_shared(self) -> None:
        with self._lock:
            self._shared -= 1
            if not self._shared and self._waiting:
                self._cond.notify_all()

    def acquire_exclusive(self) -> bool:
        """Hold it alone; False (and not held) once the torrent is gone."""
        with self._cond:
            ticket = self._tickets
            self._tickets += 1
            self._waiting += 1
            try:
                while (self._exclusive or self._shared or self._admit
                       or ticket != self._serving):
                    self._cond.wait()
            except BaseException:
                self._waiting -= 1
                self._skip(ticket)
                raise
            self._waiting -= 1
            if self.closed:
                self._serving += 1
                self._cond.notify_all()  # the others held back by this one
                return False
            self._exclusive = True
            return True

    def _skip(self, ticket: int) -> None:
        """(Under the lock.) A ticket given up before its turn came: passed over."""
        if ticket == self._serving:
            self._serving += 1
        else:
            # Its turn is still to come: let it pass when it does. Rare (an interrupt in
            # the wait), so a small set is enough.
            self._skipped.add(ticket)
        while self._serving in self._skipped:
            self._skipped.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._serving += 1
            while self._serving in self._skipped:
                self._skipped.discard(self._serving)
                self._serving += 1
            self._admit = self._queued  # their turn, before the next exclusive holder
            self._cond.notify_all()

    @property
    def contended(self) -> bool:
        """Someone holds or awaits it exclusively."""
        return self._exclusive or self._waiting > 0


class Partial:
    """A piece some of whose blocks have arrived: its hash state and its pad ranges."""

    __slots__ = ("cleared", "done", "hasher", "lock", "pads", "writers")

    def __init__(self, hasher: PieceHasher, pads: list[tuple[int, int]]) -> None:
        self.hasher = hasher
        self.pads = pads
        self.writers: set[int] = set()  # who gave blocks to it (PieceResult.writers)
        self.lock = threading.Lock()
        self.done = False  # verified, failed or dropped: further blocks are duplicates
        # Started over by clear_piece: a block that waited for this lock goes to the
        # piece's next hash state instead.
        self.cleared = False


class Torrent:
    def __init__(self, tid: int, meta: Metainfo, storage: FileStorage) -> None:
        self.id = tid
        self.meta = meta
        # The first part of the files' paths (the torrent's folder, or its one file):
        # where its files begin below the save path, unless renamed.
        self.first_part = meta.files.path(0)[0] if len(meta.files) else ""
        self.layout = Layout(meta)
        self.storage = storage
        self.state = bytearray(meta.num_pieces)  # one of MISSING..VERIFIED per piece
        # Pieces under way whose hash state was let go to make room for another
        # torrent's (DiskIO._park_one), missing meanwhile: piece -> (the byte ranges of it
        # received, in its files, and who gave them). A block of it takes it up again.
        self.parked: dict[int, tuple[list[tuple[int, int]], set[int]]] = {}
        # Per piece, a count (mod 2**32) of the times its bytes may have started to change
        # (back to missing, a first block): a read that filled the cache keeps its copy
        # only if the count did not move while it read. (A byte came back to where it was
        # after 128 clears and new attempts during one slow read.)
        self.epoch = array.array("I", bytes(4 * meta.num_pieces))
        self.have = bytearray((meta.num_pieces + 7) // 8)  # VERIFIED, as a bitfield
        # BLAKE3 of each piece as last verified (zeros: none yet); see hashing.fingerprint.
        # Anonymous memory: pages of pieces never verified cost nothing (16 MiB for a
        # million pieces would otherwise be resident from register on).
        self.fingerprints = mmap.mmap(-1, max(1, meta.num_pieces * FINGERPRINT_BYTES))
        self.partial: dict[int, Partial] = {}
        self.errors: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        # Piece results not yet handed to the engine's ``on_piece``, queued (under
        # ``lock``) as the pieces change, and the thread handing them out, one at a time,
        # so that they are told in the order of the changes (DiskIO._tell).
        self.to_tell: list[Any] = []
        self.tell_lock = threading.Lock()  # (taken last: nothing is taken under it)
        self.told = threading.Condition(self.tell_lock)  # notified when a teller is done
        self.telling = False
        self.fence = Fence()

        self.error_reported: dict[int | None, float] = {}  # errno -> when on_error last ran
        # Commits that failed (their pieces taken back, not verified), and the error of
        # the last: a flush_all raises one that failed while it waited for the group
        # commit (a journal it could not write, in the committer's thread).
        self.commit_failures = 0
        self.commit_error: PiecedError | None = None
        # Pieces no longer verified whose journal still says so (the record saying they
        # were cleared could not be written: a full state folder). No piece of the torrent
        # is started until it is, or a resume record says so: a crash would bring them
        # back verified, over new bytes (or over a vanished file made anew, zeros).
        self.unrecorded: set[int] = set()
        self.reverifying = 0  # pieces still being re-verified after a restart
        self.deleting = False  # being unregistered with its files: it holds none of them
        # file -> (another torrent, its file) at the same path: cross-seeded torrents share
        # their files, and a write through one changes what the other verified
        self.shared: dict[int, list[tuple[Torrent, int]]] = {}
        # Writes under way that took the torrent as sharing nothing (DiskIO._store): a
        # torrent coming to share its files waits for them (DiskIO._reshare).
        self.plain_writes = 0
        self.plain_done = threading.Condition(self.lock)
        self.plain_awaited = False  # someone waits on plain_done
        self.moving = False  # its files are being moved or renamed (a fenced operation)
        # File -> the inode the state folder names for it (the resume record's stamps,
        # then the journal's FILE records; changed under the journal lock): a piece
        # verified in a file it does not name so is journaled after a FILE record of it.
        self.inodes_said: dict[int, int] = {}
        # piece -> writes another torrent made into it: a check that read the piece
        # before one of them does not take its answer (it is checked again)
        self.written_into: dict[int, int] = {}
        # piece -> writes another torrent began into it that change its bytes: a block
        # of it stored meanwhile, not yet counted received, may have been written over
        # (its writer starts the piece over; see DiskIO._store_shared)
        self.written_over: dict[int, int] = {}
        self.to_check: set[int] = set()  # pieces such writes left to check again
        self.checker = False  # a thread is checking them
        self.checking = 0  # checks of its files (recheck, start-up check) under way
        # Rechecks asked and not started yet, by kind (full or not): one asked meanwhile
        # joins the one of its kind (``DiskIO.recheck``).
        self.rechecks: dict[bool, Any] = {}
        # And those under way, by kind: joined only by a recheck asked to (``join``).
        self.rechecks_running: dict[bool, Any] = {}
        # Verified pieces whose data is written but not yet durable: (piece, result),
        # committed by the group commit or by the next fenced operation.
        self.pending: list[tuple[int, Any]] = []
        # piece -> the result of the attempt being committed: a batch whose sync was
        # under way when the piece was cleared and completed again (committing once more,
        # its new bytes not synced by that batch) must not journal or announce it.
        self.committing: dict[int, Any] = {}

    @property
    def key(self) -> bytes:
        return self.meta.info_hash

    @property
    def removed(self) -> bool:
        """Unregistered: jobs that still hold a reference fail UnknownTorrent."""
        return self.fence.closed

    # -- the fence -------------------------------------------------------------------
    def enter(self) -> None:
        """Hold the torrent shared (block I/O); UnknownTorrent once it is unregistered.
        The write paths inline this (``fence.acquire_shared``): it runs per block."""
        if not self.fence.acquire_shared():
            raise UnknownTorrent(f"unknown info_hash {self.key.hex()}")

    def leave(self) -> None:
        self.fence.release_shared()

    def enter_alone(self) -> None:
        if not self.fence.acquire_exclusive():
            raise UnknownTorrent(f"unknown info_hash {self.key.hex()}")

    def leave_alone(self) -> None:
        self.fence.release_exclusive()

    def remove(self) -> None:
        """Mark it gone (the caller holds it alone): every later acquisition fails."""
        self.fence.closed = True

    # -- piece states (caller holds ``lock``) -------------------------------------------
    def has(self, piece: int) -> bool:
        return self.state[piece] == VERIFIED

    def set_state(self, piece: int, state: int) -> None:
        self.state[piece] = state
        if self.committing and state != COMMITTING:
            self.committing.pop(piece, None)
        if state <= PARTIAL:  # MISSING or PARTIAL: what is on disk may change from now on
            self.epoch[piece] = (self.epoch[piece] + 1) & 0xFFFFFFFF
        bit = 0x80 >> (piece & 7)
        if state == VERIFIED:
            if self.parked:  # (found whole by a check: nothing of it is to be taken up)
                self.parked.pop(piece, None)
            self.have[piece >> 3] |= bit
        else:
            self.have[piece >> 3] &= ~bit & 0xFF

    def load_have(self, have: bytes | bytearray) -> None:
        """Mark verified the pieces of a saved bitfield (the rest missing), at C speed:
        a restart of a torrent of millions of pieces must not take seconds here."""
        n = len(self.state)
        bits = bin(int.from_bytes(have, "big") | (1 << len(have) * 8))[3 : 3 + n]
        self.state[:] = bits.encode().translate(_BITS_TO_STATE)
        self.have[:] = have
        if n % 8:  # bits past the last piece are never set
            self.have[-1] &= (0xFF << (8 - n % 8)) & 0xFF

    def count(self, state: int) -> int:
        return self.state.count(state)

    def fingerprint(self, piece: int) -> bytes | None:
        fp = bytes(self.fingerprints[piece * FINGERPRINT_BYTES : (piece + 1) * FINGERPRINT_BYTES])
        return None if fp == NO_FINGERPRINT else fp

    def set_fingerprint(self, piece: int, fp: bytes) -> None:
        """Only ever given the fingerprint of bytes that passed the torrent's own hashes,
        so it stays a valid shortcut whatever happens to the piece's state."""
        self.fingerprints[piece * FINGERPRINT_BYTES : (piece + 1) * FINGERPRINT_BYTES] = fp

    # -- layout shortcuts ------------------------------------------------------------------
    def files_of(self, piece: int) -> list[int]:
        size = self.layout.piece_size(piece)
        return [s.file_index for s in self.layout.map(piece, 0, size) if s.stored]


__all__ = [
    "COMMITTING",
    "HASHING",
    "MISSING",
    "PARTIAL",
    "VERIFIED",
    "Fence",
    "Partial",
    "Torrent",
    "file_progress",
]
