"""Durable state: registrations, verified pieces, and the journal between two saves.

Layout under the state directory::

    lock                                    flock'ed by the one daemon using the folder
                                            (the folder itself is flock'ed too)
    clean                                   exists only while the daemon is stopped
                                            cleanly (not written when the final save
                                            failed; removed once a start-up has
                                            recorded what the file stamps told it)
    torrents/<info_hash hex>/metainfo.torrent   the .torrent bytes, written at register
    torrents/<info_hash hex>/location       bencoded: save path and renames (written at
                                            register, move and rename; during a move
                                            or rename also where the files were, so
                                            that a restart finishes what a crash cut)
    torrents/<info_hash hex>/resume         bencoded: bitfield, BLAKE3 fingerprint of
                                            every verified piece, the journal generation
                                            that follows it, and a stamp (size,
                                            mtime_ns, ctime_ns, inode) of every payload
                                            file: at a clean stop, as it is then; while
                                            running, as at the start for a file whole,
                                            not written and not shared since, else its
                                            inode alone
    torrents/<info_hash hex>/journal.<gen>  fixed-size records appended since then
    torrents/<info_hash hex>/checking       exists while a check of the files (a
                                            recheck) is under way: a restart finishes it

Why a journal: the group commit fdatasyncs a batch of verified pieces' data, then
appends one record per piece (index and fingerprint) and fdatasyncs the journal, and
only then announces them. Appending is cheap, so every announced piece is on disk
before its event leaves, and a restart after kill -9 or power loss knows it at once,
without rehashing. The resume record is the journal compacted: written atomically
(a temporary file with a unique name, fsync, rename, fsync of the folder) by one
saver per torrent, after which the journal starts a new generation and the old one is
deleted. A crash between those steps leaves both, and loading replays every
generation from the resume record's on.

A record is ``kind, piece, fingerprint, crc32``; a torn tail (a crash mid-append)
fails its checksum and is ignored: its piece was never announced (but damage to the
last record looks the same, and it may have cleared a piece: every piece is checked
again after such a start). A bad record with
good ones after it is damage, not a crash: no piece of that torrent is then taken on
trust. The resume record carries a crc32 of itself too. Every checksum is of the
torrent's own records: a journal record's starts from the crc32 of the info hash,
and the resume and location records hold the info hash, so that one of another
torrent's, put in this one's folder, is never taken for its own. A bit is cleared
(``clear_piece``, a vanished file) by a CLEARED record, so replaying in order gives
the state as it was. A FILE record (its "piece" a file index, its inode in the
fingerprint's place) says which file held the pieces verified after it: written with
the first piece verified in a file the record or an earlier FILE record does not name,
so that a start after a crash knows every file with verified pieces by its inode (a
file swapped or put in its place meanwhile is seen), however long since the record.

Every decoded field is checked. A resume record that does not decode is never
replaced by defaults: the torrent keeps its location, gets the bits its journals
prove, and is rechecked for the rest; a location that does not decode makes the
torrent's state unusable, and it is skipped with a message, never loaded into the
daemon's start folder.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import bencodepy

from .hashing import FINGERPRINT_BYTES, FINGERPRINT_FORM
from .metainfo import MAX_METAINFO_BYTES
from .paths import read_regular

RECORD = struct.Struct("<BxxxI16sI")  # kind, piece, fingerprint, crc32 of the first 24 bytes
# The byte ranges of pieces under way a resume record keeps, at most (of a clean stop's:
# those past it are fetched again); a resume record is read no further than it can hold.
MAX_PARTIAL_RECORD = 16 << 20
REC_VERIFIED = 1
REC_CLEARED = 2
REC_FILE = 3
_KINDS = (REC_VERIFIED, REC_CLEARED, REC_FILE)
_JOURNAL = re.compile(r"journal\.(\d+)")
CHECKING = "checking"  # present while a check of the files is under way
REMOVING = ".removing-"  # a torrent's folder being deleted: never loaded, deleted at start
DELETING = "delete-files"  # in a torrent's folder: it is removed with its payload files
MAKING = ".new-"  # a torrent's folder being made by a register: never loaded, deleted at start
LOCK = "lock"  # held (flock) by the one daemon using the state folder
CLEAN = "clean"  # present while the daemon is stopped cleanly: file stamps then count
# The temporary files of write_atomic: a crash can leave them behind.
_TEMPORARY = re.compile(r"\.(resume|location|checking|metainfo\.torrent|clean|delete-files)\..+")


def _said(have: bytes, fingerprints: bytes, stamps: list[list[int]] | None,
          partial: Sequence[tuple[int, int, int]]) -> tuple[bytes, bytes, bytes | None, bytes]:
    """What a resume record says, its generation aside: the bitfield, the fingerprints,
    the file stamps and the pieces under way, packed as the record holds them."""
    if stamps is None:
        return have, fingerprints, None, b""
    kept = partial[: MAX_PARTIAL_RECORD // 24]
    return (have, fingerprints, array.array("q", [x for s in stamps for x in s]).tobytes(),
            array.array("q", [x for r in kept for x in r]).tobytes())


def write_atomic(path: Path, data: bytes, undo: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new bytes,
    and an error the old ones (unless not ``undo``: the new bytes say what is so
    whatever the caller answers, and stay in place).

    The temporary file has a unique name: two writers never share (and tear) one. When
    the folder cannot be synced once the new file is in its place, the old one is put
    back (kept meanwhile under a second name, a hard link) before the error is raised:
    the caller, told of an error, says nothing changed, and a record left in place
    was carried out at the next start (a refused move made; a refused removal's payload
    deleted).
    """
    make_folders(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    backup = tmp + ".old"  # (a temporary name too: see _TEMPORARY)
    old: str | None = backup if undo else None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if undo:
            try:
                os.link(path, backup)
            except FileNotFoundError:
                old = None  # a new file: undone by its removal
            except OSError:
                old, undo = None, False  # (no hard links here: not undone)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, old):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
        raise
    try:
        fsync_dir(path.parent)
    except BaseException:
        if undo:
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, path)
                else:
                    os.unlink(path)
                fsync_dir(path.parent)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            os.unlink(old)


def fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_folders(path: Path, sync_existing: bool = False) -> None:
    """``mkdir -p``, each folder made durable in its parent before anything is kept in
    it: a state folder the daemon made itself was lost whole to a power cut, with every
    registration and verified piece recorded in it. ``sync_existing``: the folders
    found there too (one made by a process that died before its sync, or by ``mkdir
    -p``), as far up as they can be opened."""
    missing = []
    at = Path(os.path.abspath(path))
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    if sync_existing:
        up = at
        while up.parent != up:
            try:
                fsync_dir(up.parent)
            except OSError:
                break  # (not ours to open, or to sync, above: made long before)
            up = up.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        fsync_dir(folder.parent)


def _checking_scope(path: Path) -> str | None:
    try:
        return "all" if read_regular(path) == b"all" else "missing"
    except FileNotFoundError:
        return None
    except OSError:
        return "all"


def encode_records(records: list[tuple[int, int, bytes]], seed: int = 0) -> bytes:
    out = bytearray()
    for kind, piece, fp in records:
        head = struct.pack("<BxxxI16s", kind, piece, fp)
        out += head + struct.pack("<I", zlib.crc32(head, seed))
    return bytes(out)


def file_record(index: int, inode: int) -> tuple[int, int, bytes]:
    """The journal record that says file ``index`` is the file of inode ``inode``."""
    return REC_FILE, index, struct.pack("<Q8x", inode)


def decode_records(data: bytes, seed: int = 0) -> list[tuple[int, int, bytes]]:
    """The records up to the first torn or damaged one."""
    return _decode_records(data, seed)[0]


def _decode_records(data: bytes, seed: int = 0,
                    ) -> tuple[list[tuple[int, int, bytes]], bool, bool]:
    """(the good records, whether a damaged one lies among them, whether the last
    whole record is bad). A crash tears only the last record (an append that failed
    is cut back, or goes on in a new generation), so a bad record with good ones after
    it is damage: its piece may have been one cleared, and replaying the rest would
    not say so. A bad last record is a torn append, or damage: it may have said a
    piece was verified."""
    out: list[tuple[int, int, bytes]] = []
    damaged = False
    for off in range(0, len(data) - RECORD.size + 1, RECORD.size):
        kind, piece, fp, crc = RECORD.unpack_from(data, off)
        head = data[off : off + RECORD.size - 4]
        # (from 0: a record of a version that did not start from the info hash)
        good = crc == zlib.crc32(head, seed) or (seed and crc == zlib.crc32(head))
        if not good or kind not in _KINDS:
            damaged = True
            continue
        if damaged:
            return out + _decode_records(data[off:], seed)[0], True, False
        out.append((kind, piece, fp))
    return out, False, damaged or len(data) % RECORD.size != 0  # (or one cut short last)


class Loaded(NamedTuple):
    """One torrent's saved state, checked and with its journals replayed."""

    ih_hex: str
    metainfo: Any  # what ``load_all``'s parser made of the metainfo file
    save_path: str
    renames: dict[int, tuple[str, ...]]
    have: bytearray  # bitfield of the verified pieces
    fingerprints: bytearray  # the fingerprint table (zeros: none)
    stamps: list[list[int]] | None  # per file (see DiskIO._save)
    damaged: str | None  # why the resume record could not be used, if it could not
    # A move or rename was under way (save path, renames the files had before it): files
    # not yet where the record says are still there.
    previous: tuple[str, dict[int, tuple[str, ...]]] | None = None
    # A check of the files was under way: None (none), "missing" (its pieces not yet
    # found are to be looked for), "all" (a recheck: every piece is checked again).
    checking: str | None = None
    # A clean stop's pieces under way: piece -> the byte ranges of it in its files.
    partial: dict[int, list[tuple[int, int]]] | None = None
    why_checked: str | None = None  # why every piece is checked again, said at the start
    # Pieces the journals cleared since the resume record: their files may have been
    # written since, their stamps not kept up with it.
    cleared: frozenset[int] = frozenset()
    # File index -> the inode the journals last named for it (FILE records).
    inodes: dict[int, int] | None = None
    # Which bytes its fingerprints are of (hashing.FINGERPRINT_FORM): 1 when the record
    # does not say (written before the form was recorded, or not decoded).
    fingerprint_form: int = 1
    # What its resume record says (TorrentRecord.written), when the record alone says
    # all (read whole, no journal record after it, no check under way): None otherwise.
    said: tuple[bytes, bytes, bytes | None, bytes] | None = None


class Deletion(NamedTuple):
    """A torrent removed with its files, whose files a crash may have left behind."""

    folder: Path  # its state folder, deleted once its files are
    ih_hex: str
    metainfo: Any
    save_path: str
    renames: dict[int, tuple[str, ...]]


class TorrentRecord:
    """The state folder of one torrent, and its journal. One writer at a time:
    ``save_lock`` serialises savers, ``journal_lock`` appends and generation changes."""

    def __init__(self, folder: Path, gen: int = 0) -> None:
        self.folder = folder
        self.ih = _ih_of(folder.name)  # (the folder's name is the info hash)
        # What the checksums of its journal records start from: a journal of another
        # torrent put in its folder fails them. (Taken for this one's, another torrent's
        # verified pieces were reported verified here.)
        self.seed = zlib.crc32(self.ih) if self.ih else 0
        self.gen = gen
        self.save_lock = threading.Lock()
        self.journal_lock = threading.Lock()
        self.removed = False
        self.records = 0  # appended since the last compaction
        # What the resume record on disk says, as this process last wrote it (None: not
        # written by it yet): see ``says``.
        self.written: tuple[bytes, bytes, bytes | None, bytes] | None = None
        self._fd = -1
        self._good = 0  # bytes of whole records in the journal when it was opened
        self._named = -1  # the generation whose journal's name was made durable

    # -- the journal (caller holds journal_lock) -----------------------------------
    def append(self, records: list[tuple[int, int, bytes]]) -> None:
        """Append and fdatasync: on return the records survive any crash.

        On an error (a full disk can take part of a record) the journal is cut back to
        its last whole record before the error is raised: replay stops at the first
        torn record, so a record appended after one would be lost, with the piece it
        announced. When even that fails, the next append starts a new generation."""
        if self.removed or not records:
            return
        self._open_journal()
        data = encode_records(records, self.seed)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fdatasync(self._fd)
        except OSError:
            self._cut_back()
            raise
        finally:
            # Not held between appends: a daemon with thousands of torrents would hold
            # a descriptor for each (past RLIMIT_NOFILE, every open failed with EMFILE,
            # other clients' included). An open costs little beside the fdatasync.
            self._close_journal()
        self.records += len(records)

    def _open_journal(self) -> None:
        self._fd = os.open(self.folder / f"journal.{self.gen}",
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._good = os.fstat(self._fd).st_size  # (whole records: a torn one was cut)
            if self._named != self.gen:
                fsync_dir(self.folder)  # the file's name is as durable as its records
                self._named = self.gen
        except OSError:
            self._close_journal()
            raise

    def _cut_back(self) -> None:
        try:
            os.ftruncate(self._fd, self._good)
        except OSError:
            self._close_journal()
            self.gen += 1  # replayed after this one, which ends at its torn record

    def rotate(self) -> int:
        """Start the next generation; returns it. Records appended from now on go there."""
        self._close_journal()
        self.gen += 1
        self.records = 0
        return self.gen

    def _close_journal(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- whole files (caller holds save_lock) ------------------------------------------
    def write_resume(self, have: bytes, fingerprints: bytes, gen: int,
                     stamps: list[list[int]] | None,
                     partial: Sequence[tuple[int, int, int]] = ()) -> None:
        """``stamps``: each file's (see DiskIO._save); ``partial`` (a clean stop's): the
        byte ranges of the pieces under way that are in their files, (piece, begin, end)."""
        if self.removed:
            return
        resume: dict[bytes, Any] = {b"have": have, b"fingerprints": fingerprints, b"gen": gen,
                                    b"ih": self.ih, b"fp_form": FINGERPRINT_FORM}
        said = _said(have, fingerprints, stamps, partial)
        if said[2] is not None:  # packed: a torrent of 100,000 files reads it at once
            resume[b"stamps"] = said[2]
            resume[b"stamp_fields"] = STAMP_FIELDS
            if said[3]:
                resume[b"partial"] = said[3]
        resume[b"crc"] = zlib.crc32(bencodepy.encode(resume))
        self.written = None  # (unknown while it is replaced: failed, either may be there)
        write_atomic(self.folder / "resume", bencodepy.encode(resume))
        self.written = said
        for old in self.journals():
            if old < gen:
                with contextlib.suppress(FileNotFoundError):
                    (self.folder / f"journal.{old}").unlink()

    def says(self, have: bytes, fingerprints: bytes, stamps: list[list[int]] | None,
             partial: Sequence[tuple[int, int, int]] = ()) -> bool:
        """Whether the resume record on disk, as last written here, says just this
        (its journal generation aside)."""
        return self.written is not None and self.written == _said(
            have, fingerprints, stamps, partial)

    def write_location(self, save_path: Path, renames: dict[int, tuple[str, ...]],
                       previous: tuple[Path, dict[int, tuple[str, ...]]] | None = None,
                       undo: bool = True) -> None:
        """Where the files are; with ``previous``, where they are being moved from (a
        move or rename under way: a restart finishes it, see ``Loaded.previous``).
        ``undo``: see :func:`write_atomic`."""
        if self.removed:
            return
        record: dict[bytes, Any] = _location(save_path, renames)
        record[b"ih"] = self.ih
        if previous is not None:
            record[b"from"] = _location(*previous)
        record[b"crc"] = zlib.crc32(bencodepy.encode(record))
        write_atomic(self.folder / "location", bencodepy.encode(record), undo)

    def mark_checking(self, scope: str | None) -> None:
        """Say (durably) that a check of the files is under way (``scope``: "missing"
        pieces, or "all"), or over (None): one cut short by a crash or a stop is carried
        out again after the restart."""
        if self.removed:
            return
        path = self.folder / CHECKING
        if scope is not None:
            if path.is_dir():  # (a rename cannot replace it: every check was refused)
                _remove_entry(path)
            write_atomic(path, scope.encode())
        elif _remove_entry(path):  # (a folder in its place too)
            fsync_dir(self.folder)

    def journals(self) -> list[int]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _JOURNAL.fullmatch(n)))

    def mark_deleting(self) -> None:
        """Say (durably) that the torrent is being removed with its payload files: from
        now on a restart deletes what is left of them, and loads nothing of it."""
        write_atomic(self.folder / DELETING, b"")

    def set_aside(self) -> None:
        """Rename the folder out of the way (``.removing-<hex>``), in one atomic step
        (caller holds both locks): from then on a restart deletes it and never loads the
        torrent, whatever becomes of the rest of the removal. OSError when the folder
        cannot be renamed (a read-only state file system, a folder made immutable or
        not ours) or the rename made durable: nothing has changed then (the rename is
        put back), and the removal must be refused, for a
        record left where it is would bring the torrent back at the next start, its old
        bitfield taken on trust over files the user was told are no longer its own."""
        if self.folder.name.startswith(REMOVING):
            return
        gone = self.folder.with_name(REMOVING + self.folder.name)
        try:
            os.replace(self.folder, gone)
        except FileNotFoundError:
            return  # (no record left to load: nothing to set aside)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # What an earlier removal of the torrent could not delete is in the way:
            # it was to go anyway.
            shutil.rmtree(gone, ignore_errors=True)
            os.replace(self.folder, gone)
        try:
            fsync_dir(gone.parent)
        except OSError:
            # Not durable: a power cut could bring the record back after the removal
            # was answered. Put back, and refused, as write_atomic does.
            try:
                os.replace(gone, self.folder)
            except OSError:
                self.folder = gone  # (where it is now: removed at the next start)
            raise
        self.folder = gone

    def remove(self, keep: bool = False) -> None:
        """Forget the torrent (caller holds both locks): nothing is written after this.

        The folder is renamed out of the way first (``set_aside``, unless done already),
        one atomic step: a crash part-way through deleting its files must not leave a
        record that a restart would load (without its resume record, as a torrent to
        check again). With ``keep`` the folder (marked ``mark_deleting``) stays until
        ``discard``: the payload files a crash leaves behind are deleted at the next
        start."""
        self.removed = True
        self._close_journal()
        with contextlib.suppress(OSError):  # (renaming failed: deleted where it is, as it can be)
            self.set_aside()
        if not keep:
            self.discard()

    def discard(self) -> None:
        """Delete a removed torrent's folder (its payload files are gone). The mark
        goes first: a crash during the deletion then leaves a folder the next start
        deletes without a word, not a mark with its metainfo gone, which it took for
        files it could not delete."""
        with contextlib.suppress(OSError):
            os.unlink(self.folder / DELETING)
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        with self.journal_lock:
            self._close_journal()


class StateInUse(OSError):
    """Another process (a daemon) holds the state folder."""


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "torrents"
        make_folders(self.root, sync_existing=True)  # (durable before any record in it)
        # One daemon per state folder, taken before anything in it is read or changed: a
        # second one started by mistake compacted the first one's journals away under it.
        # The folder itself is locked too: the lock file, reached by its name, could be
        # deleted under a running daemon (a cleaner of stale files) and made anew by a
        # second one, which would then lock it, while the folder cannot be. (The file
        # stays: a daemon of an earlier version locks only it.)
        self._lock_fds: list[int] = []
        try:
            for path, flags in ((self.state_dir, os.O_RDONLY | os.O_DIRECTORY),
                                (self.state_dir / LOCK, os.O_RDWR | os.O_CREAT)):
                fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
                self._lock_fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StateInUse(errno.EBUSY, f"the state folder {self.state_dir} is in "
                                                  "use by another pieced daemon") from None
        except BaseException:
            self.close()
            raise
        # Whether the last stop was clean: after a crash, a backend puts right what its
        # own writes may have left half done (``FileStorage.after_crash``). (A folder in
        # its place, which no stop made and none can replace, is not it.)
        self.was_clean = (self.state_dir / CLEAN).is_file()
        for name in os.listdir(self.state_dir):  # (the lock is ours: no writer of them)
            if _TEMPORARY.fullmatch(name):  # of a mark_clean a crash cut short
                with contextlib.suppress(OSError):
                    os.unlink(self.state_dir / name)

    def mark_clean(self) -> None:
        path = self.state_dir / CLEAN
        if path.is_dir():  # (made while the daemon ran: a rename cannot replace it)
            _remove_entry(path)
        write_atomic(path, b"")

    def mark_running(self) -> None:
        """The start-up is over: from now on the daemon changes files itself, so a
        crash is a crash (file stamps are compared at any start, those a record keeps
        being of files the daemon could not have written since: see
        ``DiskIO._load_state``)."""
        if _remove_entry(self.state_dir / CLEAN):  # (a folder too: no stop could replace it)
            fsync_dir(self.state_dir)

    def close(self) -> None:
        """Let the state folder go (another daemon may use it from now on)."""
        while self._lock_fds:
            os.close(self._lock_fds.pop())

    def create(self, ih: bytes, raw: bytes, save_path: Path, pieces: int) -> TorrentRecord:
        """A new torrent's state folder, holding its metainfo, its location and a resume
        record of no piece verified (``pieces``: how many it has): a crash before its
        first save finds a whole record, not one to be rebuilt and checked again."""
        folder = self.root / ih.hex()
        _remove_entry(folder)  # left over from a torrent whose removal did not finish
        # Files an earlier removal could not delete are this torrent's now: kept.
        shutil.rmtree(self.root / (REMOVING + ih.hex()), ignore_errors=True)
        # Made whole aside, then put in place by one rename: no half-made record (a
        # full state folder, a crash) is left to be met at every start.
        making = self.root / (MAKING + ih.hex())
        shutil.rmtree(making, ignore_errors=True)
        making.mkdir(parents=True)
        try:
            write_atomic(making / "metainfo.torrent", raw)
            made = TorrentRecord(making)
            made.write_location(save_path, {})
            made.write_resume(bytes((pieces + 7) // 8), bytes(pieces * FINGERPRINT_BYTES), 0,
                              None)
            os.rename(making, folder)
            fsync_dir(self.root)  # the torrent's folder, with all that is recorded in it
        except BaseException:
            shutil.rmtree(making, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)  # (refused: it is not registered)
            raise
        return TorrentRecord(folder)

    def record(self, ih_hex: str, gen: int) -> TorrentRecord:
        return TorrentRecord(self.root / ih_hex, gen)

    def load_all(self, parse: Any, metainfo_bytes: int = MAX_METAINFO_BYTES,
                 reading: Callable[[], None] | None = None,
                 ) -> tuple[list[tuple[Loaded, int]], list[Deletion], list[str]]:
        """Every saved torrent as (state, next journal generation), the torrents whose
        removal with their files a crash cut short, and the problems met.

        ``parse(metainfo bytes)`` parses the metainfo (raising on bad input) into an
        object with ``num_pieces``, so records can be range-checked; it is what
        ``Loaded.metainfo`` holds (parsed once: a torrent of 100,000 files takes a while).
        ``metainfo_bytes``: the most a metainfo may hold (state files are read no further
        than they can hold: a resume of 2 GB, read whole, took the daemon to 4 GB).
        ``reading()`` is called before each torrent's state is read (a service manager
        told nothing for 7 s of a library of 17,000 would give up on the start).
        """
        self._metainfo_bytes = metainfo_bytes
        out: list[tuple[Loaded, int]] = []
        deletions: list[Deletion] = []
        problems: list[str] = []
        for folder in sorted(self.root.iterdir()):
            if reading is not None:
                reading()
            ih_hex = folder.name.removeprefix(REMOVING)
            try:
                deleting = (folder / DELETING).exists()
            except OSError as exc:  # (EACCES, EIO: that torrent's alone, not the daemon's)
                problems.append(f"state of torrent {folder.name} skipped: {exc}")
                continue
            if deleting:
                try:
                    meta = _own_metainfo(folder, ih_hex, parse, metainfo_bytes)
                    save_path, renames = _read_location(
                        _decode_dict(folder / "location", _location_limit(meta)))
                except Exception as exc:
                    problems.append(f"torrent {ih_hex} was removed, but its files could "
                                    f"not be deleted: {exc}")
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                deletions.append(Deletion(folder, ih_hex, meta, save_path, renames))
                continue
            if folder.name.startswith((REMOVING, MAKING)):  # a removal or a register cut
                shutil.rmtree(folder, ignore_errors=True)  # short: finished, or undone
                continue
            try:
                loaded = self._load(folder, parse)
            except Exception as exc:
                problems.append(f"state of torrent {folder.name} skipped: {exc}")
                continue
            out.append(loaded)
        return out, deletions, problems

    def _load(self, folder: Path, parse: Any) -> tuple[Loaded, int]:
        for name in os.listdir(folder):
            if _TEMPORARY.fullmatch(name):  # a write_atomic a crash cut short
                with contextlib.suppress(OSError):
                    os.unlink(folder / name)
        meta = _own_metainfo(folder, folder.name, parse, self._metainfo_bytes)
        n = int(meta.num_pieces)
        nfiles = len(meta.files.lengths)
        # What a record of this torrent can hold, twice over: past it, it is damage.
        # (An older version kept the location in it too.)
        resume = _decode_dict(folder / "resume",
                              2 * (n // 8 + n * FINGERPRINT_BYTES + nfiles * 8 * STAMP_FIELDS
                                   + MAX_PARTIAL_RECORD) + _location_limit(meta))
        location = _decode_dict(folder / "location", _location_limit(meta))
        own = _ih_of(folder.name)
        if location is not None and not _crc_matches(location):
            # A bit flipped in a save path still decodes: the torrent's files would be
            # looked for, and written, in another folder.
            raise ValueError("its location record is damaged (its checksum does not match)")
        if location is not None and location.get(b"ih", own) != own:
            # Another torrent's: this one would take its save folder, and write over it.
            raise ValueError("its location record is of another torrent")
        if location is None and resume is not None and b"save_path" in resume:
            location = resume  # written by a version that kept the location in the resume
        save_path, renames = _read_location(location)
        previous = None
        if location is not None and b"from" in location:
            try:
                previous = _read_location(location[b"from"])
            except (ValueError, TypeError, UnicodeDecodeError):
                previous = None  # the files are looked for where the record says, only

        nbytes = (n + 7) // 8
        have = bytearray(nbytes)
        fps = bytearray(n * FINGERPRINT_BYTES)
        damaged = None
        gen = 0
        stamps = None
        form = 1
        if resume is None or not isinstance(resume.get(b"have", b""), bytes) or len(
            resume.get(b"have", b"")
        ) != nbytes or not _crc_matches(resume):
            damaged = "its resume record is missing, damaged or unreadable"
        elif resume.get(b"ih", own) != own:
            damaged = "its resume record is of another torrent"
        else:
            have[:] = resume[b"have"]
            table = resume.get(b"fingerprints")
            if table is None:  # an older version kept them in a file of their own
                with contextlib.suppress(OSError):
                    table = read_regular(folder / "fingerprints")
            if isinstance(table, bytes) and len(table) == len(fps):
                fps[:] = table
            f = resume.get(b"fp_form", 1)
            form = f if isinstance(f, int) else 1
            g = resume.get(b"gen", 0)
            gen = g if isinstance(g, int) and g >= 0 else 0
            packed = resume.get(b"stamps")
            files = resume.get(b"files")  # written by a version that kept them as lists
            width = resume.get(b"stamp_fields", 2)
            if isinstance(packed, bytes) and width in (2, STAMP_FIELDS) and len(
                    packed) % (8 * width) == 0:
                flat = array.array("q", packed).tolist()
                stamps = [flat[i:i + width] for i in range(0, len(flat), width)]
            elif isinstance(files, list) and all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s)
                for s in files
            ):
                stamps = files
        partial: dict[int, list[tuple[int, int]]] = {}
        packed_partial = resume.get(b"partial") if damaged is None and resume else None
        if isinstance(packed_partial, bytes) and len(packed_partial) % 24 == 0:
            flat = array.array("q", packed_partial).tolist()
            for i in range(0, len(flat), 3):
                piece, begin, end = flat[i:i + 3]
                if 0 <= piece < n and 0 <= begin < end:
                    partial.setdefault(piece, []).append((begin, end))
        rec = TorrentRecord(folder)
        gens = [g for g in rec.journals() if damaged or g >= gen]
        torn = tail = replayed = False
        why: str | None = None
        cleared: set[int] = set()
        inodes: dict[int, int] = {}
        # Records a generation holds at most, twice over (a compaction is due after
        # max(COMPACT_RECORDS, n / 8); a piece's and a file's records at most once each
        # per batch): past it, damage, not read (2 GB of it took 97 s and 4 GB).
        journal_limit = RECORD.size * 2 * (max(4096, n) + nfiles) + (1 << 20)
        for g in gens:
            try:
                data = read_regular(folder / f"journal.{g}", journal_limit)
            except OSError:  # (a folder in its place, EIO): what it said is unknown
                torn = True
                continue
            if len(data) > journal_limit:
                torn = True
                continue
            records, bad, ends_bad = _decode_records(data, rec.seed)
            torn = torn or bad
            tail = tail or ends_bad
            replayed = replayed or bool(records)
            for kind, piece, fp in records:
                if kind == REC_FILE:
                    if 0 <= piece < nfiles:
                        inodes[piece] = struct.unpack_from("<Q", fp)[0]
                    continue
                if not 0 <= piece < n:
                    continue
                bit = 0x80 >> (piece & 7)
                if kind == REC_VERIFIED:
                    have[piece >> 3] |= bit
                    fps[piece * FINGERPRINT_BYTES : (piece + 1) * FINGERPRINT_BYTES] = fp
                else:
                    have[piece >> 3] &= ~bit & 0xFF
                    cleared.add(piece)
        # Appends go to a new generation: never after a torn record, which would hide them.
        next_gen = max([gen, *rec.journals()]) + 1
        if torn:
            # A damaged record among good ones: what it said is unknown (a piece it
            # cleared would come back verified), so no piece is taken on trust; each is
            # looked for again (its fingerprint kept: found again at the cost of BLAKE3).
            damaged = "a record of its journal is damaged, so no piece is taken as verified"
            have[:] = bytes(len(have))
        checking = _checking_scope(folder / CHECKING)
        if tail and not torn and checking != "all":
            # What the last record said is unknown: a piece it told verified (torn by a
            # crash mid-append, it was never announced) is looked for among those
            # missing; a piece it cleared (a bit flipped later) would be taken as
            # verified over the bytes written since: so every piece is checked again
            # (reported as it was meanwhile; unchanged ones are found by fingerprint).
            checking = "all"
            why = ("the last record of its journal is damaged or cut short (a crash or a "
                   "power cut in the middle of an append, or damage on the disk)")
        said = None
        if (resume is not None and damaged is None and not (torn or tail or replayed)
                and checking is None and previous is None and form == FINGERPRINT_FORM
                and isinstance(table, bytes) and len(table) == len(fps)
                and isinstance(packed, bytes) and width == STAMP_FIELDS):
            kept = resume.get(b"partial", b"")
            said = (bytes(resume[b"have"]), table, packed, kept if isinstance(kept, bytes)
                    else b"\0")  # (a partial of another type: never what is written)
        loaded = Loaded(folder.name, meta, save_path, renames, have, fps, stamps, damaged,
                        previous, checking, partial or None, why, frozenset(cleared),
                        inodes or None, form, said)
        return loaded, next_gen


def _ih_of(folder_name: str) -> bytes:
    """The info hash a torrent's state folder is named for (b"" for another name)."""
    for prefix in (MAKING, REMOVING):
        folder_name = folder_name.removeprefix(prefix)
    try:
        return bytes.fromhex(folder_name)
    except ValueError:
        return b""


def _location(save_path: Path, renames: dict[int, tuple[str, ...]]) -> dict[bytes, Any]:
    return {b"save_path": str(save_path).encode(),
            b"renames": {str(i).encode(): "/".join(p).encode() for i, p in renames.items()}}


def _own_metainfo(folder: Path, ih_hex: str, parse: Any, limit: int) -> Any:
    """The parsed metainfo kept in a torrent's state folder, refused unless it is of the
    info_hash the folder is named for. A bit of it flipped on disk still parses: loaded,
    it was another torrent, with the pieces the record proves of the real one called
    verified, and a removal of it removed the real one's folder (or, with its files, the
    files its damaged paths name)."""
    path = folder / "metainfo.torrent"
    raw = read_regular(path, limit)
    if len(raw) > limit:
        raise ValueError(f"its metainfo ({path}) is larger than max_metainfo_bytes ({limit})")
    meta = parse(raw)
    found = bytes(meta.info_hash).hex()
    if found != ih_hex:
        raise ValueError(f"its metainfo is damaged: it is of info_hash {found}, not of the "
                         f"torrent its folder is named for")
    return meta


def _read_location(record: Any) -> tuple[str, dict[int, tuple[str, ...]]]:
    if not isinstance(record, dict) or not isinstance(record.get(b"save_path"), bytes):
        raise ValueError("its location record is missing, damaged or unreadable")
    renames: dict[int, tuple[str, ...]] = {}
    for k, v in dict(record.get(b"renames", {})).items():
        renames[int(k)] = tuple(bytes(v).decode().split("/"))
    return record[b"save_path"].decode(), renames


def _crc_matches(record: dict[bytes, Any]) -> bool:
    """A resume or location record's checksum (over the record without it) holds; a
    record from a version that wrote none passes. Not one that holds the info hash
    (written since the checksums): a bit flipped in the name of its checksum took the
    checksum away, and every other bit of the record was then taken as it was."""
    crc = record.get(b"crc")
    if crc is None:
        return b"ih" not in record and b"fp_form" not in record
    rest = {k: v for k, v in record.items() if k != b"crc"}
    return isinstance(crc, int) and zlib.crc32(bencodepy.encode(rest)) == crc


def _location_limit(meta: Any) -> int:
    """The most a torrent's location record can hold: its save path, and a new name of
    every file (a path of up to PATH_MAX bytes), twice during a move; past it, damage."""
    return (1 << 20) + 2 * len(meta.files.lengths) * (os.pathconf("/", "PC_PATH_MAX") + 32)


def _decode_dict(path: Path, limit: int = 1 << 20) -> dict[bytes, Any] | None:
    """The bencoded dict at ``path``; None if it cannot be read, does not decode or is
    over ``limit`` bytes."""
    try:
        data = read_regular(path, limit)
        if len(data) > limit:
            return None
        value = bencodepy.decode(data)
    except Exception:
        return None
    return value if isinstance(value, dict) else None


def _remove_entry(path: Path) -> bool:
    """Remove what is at ``path`` in the state folder, a folder or anything else (a
    file or symlink where the daemon keeps a folder, or the reverse, was met at every
    register or stop after); whether there was something."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def file_stamp(path: Path, identity: tuple[int, int] | None = None,
               folders: dict[str, bool] | None = None) -> list[int]:
    """[size, mtime_ns, ctime_ns, inode] of a payload file, or [-1, 0, 0, 0] when it does
    not exist: what a clean stop records, and the next start compares. The change time
    cannot be set back as the modification time can (``touch -d``), and a file put in
    the place of another has another inode. With ``identity`` (the file the daemon
    used, as (st_dev, st_ino)), a stamp of another file never matches.

    Anything the daemon would not open as the payload file counts as gone: a symlink, a
    FIFO or a folder in its place (a symlink's own size, or a folder's, passed for a
    small file's length), or a file reached through a symlink on its path (a save
    folder swapped for one): the daemon's opens refuse them all (paths.py), so none of
    their pieces can be verified. ``folders``: what was found of the folders so far, in
    a pass over many files (each folder is looked at once)."""
    st = _payload_stat(path, folders)
    if st is None:
        return [-1, 0, 0, 0]
    ctime = st.st_ctime_ns
    if identity is not None and identity != (st.st_dev, st.st_ino):
        ctime = -1  # not the file the daemon wrote and read: what it holds is unknown
    return [st.st_size, st.st_mtime_ns, ctime, st.st_ino]


# A file's times come from a clock that moves in steps: the kernel's tick (up to 10 ms)
# on most file systems, whole seconds on some (ext4 with 128-byte inodes, ext3, NFS
# servers that keep seconds) and two on FAT. A write in the same step as the one a stamp
# saw leaves its times as they were: taken in that step, the stamp would match the file
# edited after it. A stamp is settled once the clock has moved past the step of its
# times (as git takes an index entry as "racy" until then).
TICK_NS = 10_000_000
COARSE_STEP_NS = 2_000_000_000
SETTLE_BUDGET_NS = COARSE_STEP_NS + 2 * TICK_NS  # the most a stop waits for stamps to settle


def unsettled_for(stamp: list[int], now_ns: int) -> int:
    """How long (ns) before ``stamp``, taken at ``now_ns``, is settled: 0 if it is now.
    On its change time alone, which every write sets from the clock (a modification
    time can be set to any time); one in whole seconds is taken for a file system that
    keeps no more."""
    if stamp[0] < 0 or stamp[2] < 0:
        return 0  # no file, or a stamp that never matches
    step = COARSE_STEP_NS if stamp[2] % 1_000_000_000 == 0 else 0
    return max(0, stamp[2] + step + TICK_NS - now_ns)


# A descriptor of a folder itself (never a symlink's target), that opens nothing.
_FOLDER_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _payload_stat(path: Path, folders: dict[str, bool] | None = None) -> os.stat_result | None:
    """The status of ``path`` if it is a regular file reached through no symlink
    (save paths are resolved when given, and the daemon's roots at its start: a symlink
    anywhere on the path came later), else None."""
    want = os.path.abspath(path)
    try:
        st = os.stat(want, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    folder = os.path.dirname(want)
    plain = folders.get(folder) if folders is not None else None
    if plain is None:
        plain = _no_symlink_to(folder)
        if folders is not None:
            folders[folder] = plain
    return st if plain else None


def _no_symlink_to(folder: str) -> bool:
    """Whether ``folder`` (absolute) is reached through no symlink."""
    try:
        fd = os.open(folder, _FOLDER_FLAGS)
    except OSError:
        return False
    try:
        try:  # where the kernel found it: one lookup, not one a component
            there = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (no /proc)
            there = os.path.realpath(folder)
    finally:
        os.close(fd)
    return there == folder


STAMP_FIELDS = 4  # of a file_stamp (a record written before ctime and inode has two)
# In place of a stamp's size, in a record written while the daemon runs: the file's
# times are not known (it may be written any time); only its inode, if not 0, counts.
UNSTAMPED = -2
