"""The disk interface: what a torrent client asks of storage (SPEC section 2).

It ties the other modules together: metainfo says what a torrent is, the layout
maps pieces to files, a backend moves bytes, the buffer pool holds dirty blocks and
cached pieces, the hashers verify. Every operation is thread-safe; the daemon calls
them from worker threads, tests and ``pieced verify`` call them directly.

Life of a block: it is buffered (or written through when the budget is full, or at
once with ``flush``/``write_block_direct``) and fed to its piece's hasher. The block
that completes a piece triggers verification from the hash state, with no read-back
in the common case; a good piece is written out, cached clean and, once its data is
fdatasync'ed, recorded in the ``have`` bitfield and announced; a bad one is dropped.

Locks, always taken in this order: ``DiskIO._lock`` (the torrent table), a piece's
lock (its writes and hash state), a torrent's lock (its bitfield and partial
pieces), the buffer pool's lock. No thread holds two piece locks.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from .bufferpool import BufferPool, PieceData
from .errors import (
    AlreadyRegistered,
    NoHashes,
    OutOfRange,
    PathEscape,
    StorageIOError,
    UnknownTorrent,
)
from .files import BACKENDS, FileStorage, FileVanished, HandlePool, make_storage
from .hashing import FINGERPRINT_BYTES, NO_FINGERPRINT, Buffer, HashPool, PieceHasher, v2_root
from .layout import Layout
from .merkle import BLOCK_SIZE
from .metainfo import Metainfo, parse
from .state import StateStore, file_stamp
from .stats import Stats
from .verify import PreadReader, Progress, VerifyResult, verify


@dataclass(frozen=True, slots=True)
class PieceResult:
    """Outcome of a completed piece; ``v1``/``v2`` are None where the torrent has no such hash."""

    info_hash: bytes
    piece: int
    ok: bool
    v1: bool | None
    v2: bool | None


PieceCallback = Callable[[PieceResult], None]
# (torrent key, {"piece", "errno", "message"}): a storage error was recorded.
ErrorCallback = Callable[[bytes, dict[str, Any]], None]
ERROR_EVENT_INTERVAL = 1.0  # seconds between two on_error calls of one torrent and errno
RESUME_INTERVAL = 1.0  # seconds between saves of a torrent's bitfield while it downloads


class _Partial:
    """A piece some of whose blocks have arrived."""

    __slots__ = ("done", "hasher", "lock")

    def __init__(self, hasher: PieceHasher) -> None:
        self.hasher = hasher
        self.lock = threading.Lock()
        self.done = False


class Torrent:
    def __init__(self, tid: int, meta: Metainfo, storage: FileStorage) -> None:
        self.id = tid
        self.meta = meta
        self.layout = Layout(meta)
        self.storage = storage
        self.have = bytearray((meta.num_pieces + 7) // 8)
        # BLAKE3 of each piece as last verified (zeros: none yet); see hashing.fingerprint.
        self.fingerprints = bytearray(meta.num_pieces * FINGERPRINT_BYTES)
        self.fingerprints_saved = True
        self.partial: dict[int, _Partial] = {}
        self.errors: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.resume_saved = 0.0
        self.error_reported: dict[int | None, float] = {}  # errno -> when on_error last ran
        self.reverifying = 0  # pieces still being re-verified after a restart

    @property
    def key(self) -> bytes:
        return self.meta.info_hash

    def has(self, piece: int) -> bool:
        return bool(self.have[piece >> 3] & (0x80 >> (piece & 7)))

    def set_have(self, piece: int, value: bool) -> None:
        if value:
            self.have[piece >> 3] |= 0x80 >> (piece & 7)
        else:
            self.have[piece >> 3] &= ~(0x80 >> (piece & 7)) & 0xFF

    def fingerprint(self, piece: int) -> bytes | None:
        fp = bytes(self.fingerprints[piece * FINGERPRINT_BYTES : (piece + 1) * FINGERPRINT_BYTES])
        return None if fp == NO_FINGERPRINT else fp

    def set_fingerprint(self, piece: int, fp: bytes) -> None:
        """Caller holds ``lock``. Only ever given the fingerprint of bytes that passed the
        torrent's own hashes, so it stays a valid shortcut whatever happens to the bit."""
        self.fingerprints[piece * FINGERPRINT_BYTES : (piece + 1) * FINGERPRINT_BYTES] = fp
        self.fingerprints_saved = False

    def pads(self, piece: int) -> list[tuple[int, int]]:
        size = self.layout.piece_size(piece)
        return [
            (s.buf_offset, s.buf_offset + s.length)
            for s in self.layout.map(piece, 0, size)
            if not s.stored
        ]

    def files_of(self, piece: int) -> list[int]:
        size = self.layout.piece_size(piece)
        return [s.file_index for s in self.layout.map(piece, 0, size) if s.stored]


class DiskIO:
    """Storage for many torrents behind one buffer budget, handle pool and hash pool.

    ``sync_window``: 0 syncs each verified piece before it is recorded; a positive
    window batches the fdatasyncs of every piece verified within it (group commit).
    ``roots``: save paths must resolve inside one of these (None: anywhere).
    """

    def __init__(
        self,
        backend: str = "posix",
        *,
        cache_bytes: int = 256 * 1024 * 1024,
        cache_policy: str = "arc",
        hash_workers: int | None = None,
        max_open_files: int = 512,
        preallocate: bool = False,
        sync_window: float = 0.0,
        roots: Sequence[Path] | None = None,
        on_piece: PieceCallback | None = None,
        metainfo_limits: dict[str, int] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.pool = BufferPool(cache_bytes, cache_policy)
        self.hash_pool = HashPool(hash_workers)
        self.handles = HandlePool(max_open_files)
        self.preallocate = preallocate
        self.roots = [Path(r).resolve() for r in roots] if roots is not None else None
        self.on_piece = on_piece
        self.on_error: ErrorCallback | None = None
        self.metainfo_limits = metainfo_limits or {}
        self.metrics = Stats()
        self._lock = threading.Lock()
        self._torrents: dict[bytes, Torrent] = {}
        self._ids = itertools.count(1)
        self._committer = _GroupCommit(self, sync_window)
        self.state = StateStore(state_dir) if state_dir is not None else None
        self.load_errors: list[str] = []
        if self.state is not None:
            self._load_state()

    # -- registration ------------------------------------------------------------------
    def register(self, metainfo: bytes, save_path: str | Path) -> bytes:
        meta = parse(metainfo, **self.metainfo_limits)
        path = self._check_save_path(Path(save_path))
        with self._lock:
            for alias in meta.aliases:
                if alias in self._torrents:
                    raise AlreadyRegistered(f"torrent {alias.hex()} is already registered")
            storage = make_storage(self.backend, meta, path, self.handles, self.preallocate)
            storage.create_empty_files()
            t = Torrent(next(self._ids), meta, storage)
            for alias in meta.aliases:
                self._torrents[alias] = t
        if self.state is not None:
            self.state.save_metainfo(t.key, metainfo)
            self.save_resume(t)
        return meta.info_hash

    # -- durable state ----------------------------------------------------------------
    def save_resume(self, t: Torrent) -> None:
        """Record the torrent's save path, renames, verified bits and file stamps.

        Only bits whose data is durable are ever set, so saving them is always safe.
        """
        if self.state is None:
            return
        with t.lock:
            have = bytes(t.have)
            t.resume_saved = time.monotonic()
            fps = None if t.fingerprints_saved else bytes(t.fingerprints)
            t.fingerprints_saved = True
        files = [file_stamp(t.storage.file_path(i)) if f.stored else [0, 0]
                 for i, f in enumerate(t.meta.files)]
        resume = {
            b"save_path": str(t.storage.save_path).encode(),
            b"have": have,
            b"files": files,
            b"renames": {str(i).encode(): "/".join(p).encode()
                         for i, p in t.storage.renames.items()},
        }
        try:
            if fps is not None:
                self.state.save_fingerprints(t.key, fps)
            self.state.save_resume(t.key, resume)
        except OSError as exc:
            if fps is not None:
                with t.lock:
                    t.fingerprints_saved = False
            self._record_error(t, StorageIOError.wrap(exc, "save resume"), None)

    def _load_state(self) -> None:
        """Re-register every saved torrent; keep the bits of files unchanged since saved."""
        assert self.state is not None
        for raw, resume, fps in self.state.load_all():
            try:
                meta = parse(raw, **self.metainfo_limits)
                save = resume.get(b"save_path", b"").decode()
                storage = make_storage(self.backend, meta, Path(save), self.handles,
                                       self.preallocate)
                for k, v in dict(resume.get(b"renames", {})).items():
                    storage.renames[int(k)] = tuple(v.decode().split("/"))
                storage.create_empty_files()
            except Exception as exc:  # a damaged record must not stop the daemon
                self.load_errors.append(f"state record skipped: {exc}")
                continue
            t = Torrent(next(self._ids), meta, storage)
            if len(fps) == len(t.fingerprints):
                t.fingerprints[:] = fps
            have = resume.get(b"have", b"")
            stamps = resume.get(b"files", [])
            if isinstance(have, bytes) and len(have) == len(t.have):
                t.have[:] = have
                changed = [i for i, f in enumerate(meta.files) if f.stored and (
                    i >= len(stamps) or list(stamps[i]) != file_stamp(storage.file_path(i)))]
                suspect = sorted({p for i in changed for p in t.layout.file_pieces(i) if t.has(p)})
                for p in suspect:
                    t.set_have(p, False)
                storage.known_written(
                    i for i, f in enumerate(meta.files)
                    if f.stored and any(t.has(p) for p in t.layout.file_pieces(i)))
            else:
                suspect = []
            with self._lock:
                for alias in meta.aliases:
                    self._torrents[alias] = t
            if suspect:
                # Files written after the last save (a crash) or changed behind our back:
                # their recorded pieces count again only once they re-verify.
                threading.Thread(target=self._reverify, args=(t, suspect),
                                 name="pieced-reverify", daemon=True).start()

    def _reverify(self, t: Torrent, pieces: list[int]) -> None:
        """Re-verify pieces of files changed since the last save (fingerprints first)."""
        t.reverifying = len(pieces)

        def progress(done: int, total: int) -> None:
            t.reverifying = total - done

        try:
            result = self._verify(t, pieces, progress, full=False)
        except RuntimeError:  # shutting down: the rest stay unverified, as saved
            return
        with t.lock:
            for p in pieces:
                if result.have[p] and p not in t.partial:
                    t.set_have(p, True)
        t.reverifying = 0
        self.save_resume(t)

    def _verify(
        self, t: Torrent, pieces: Sequence[int] | None, progress: Progress | None, full: bool
    ) -> VerifyResult:
        """Hash pieces as they are on disk; record the fingerprints this computed."""
        def read(piece: int, buf: memoryview) -> None:
            try:
                t.storage.readinto(t.layout.map(piece, 0, buf.nbytes), buf)
            except FileVanished as exc:
                if exc.written:  # deleted under us (not a file never written): say so
                    self._record_error(t, exc, piece)
                raise

        with t.lock:
            known = bytes(t.fingerprints)
        reader = PreadReader(read, t.meta.piece_length)
        result = verify(t.meta, reader, self.hash_pool, progress, pieces, known, not full)
        with t.lock:
            for p, fp in (result.new_fingerprints or {}).items():
                t.set_fingerprint(p, fp)
        self.metrics.add("bytes_read", result.bytes_hashed)
        self.metrics.add("fingerprint_hits", result.fingerprint_hits)
        return result

    def _check_save_path(self, path: Path) -> Path:
        if "\0" in str(path):
            raise PathEscape("save path contains a NUL byte")
        if not path.is_absolute():
            path = Path.cwd() / path
        resolved = path.resolve()
        if self.roots is not None and not any(resolved.is_relative_to(r) for r in self.roots):
            allowed = ", ".join(str(r) for r in self.roots)
            raise PathEscape(f"save path {resolved} is outside the allowed roots ({allowed})")
        try:
            resolved.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageIOError.wrap(exc, f"create save path {resolved}") from None
        return resolved

    def unregister(self, ih: bytes, delete_files: bool = False) -> None:
        t = self._get(ih)
        self._flush_torrent(t, sync=not delete_files)
        with self._lock:
            for alias in t.meta.aliases:
                self._torrents.pop(alias, None)
        for piece in self.pool.pieces_of(t.id):
            self.pool.drop((t.id, piece))
        if self.state is not None:
            self.state.remove(t.key)
        if delete_files:
            t.storage.delete_files()
        t.storage.close()

    def torrents(self) -> list[bytes]:
        with self._lock:
            return sorted({t.key for t in self._torrents.values()})

    def torrent(self, ih: bytes) -> Torrent:
        return self._get(ih)

    def _get(self, ih: bytes) -> Torrent:
        t = self._torrents.get(bytes(ih))
        if t is None:
            raise UnknownTorrent(f"unknown info_hash {bytes(ih).hex()}")
        return t

    # -- writes -----------------------------------------------------------------------
    def write_chunk(
        self, ih: bytes, piece: int, begin: int, data: Buffer, flush: bool = False
    ) -> PieceResult | None:
        """Buffered write of one block; returns the piece's result if it completed it."""
        t = self._get(ih)
        length = memoryview(data).nbytes
        t.layout.check(piece, begin, length)
        partial = self._partial(t, piece)
        if partial is None:
            return None
        block = data if isinstance(data, bytes) else bytes(data)
        key = (t.id, piece)
        with partial.lock:
            if partial.done:
                self.metrics.add("duplicate_blocks")
                return None
            if self.pool.overlaps_other(key, begin, begin + length):
                self._write_out(t, piece, self.pool.take_dirty(key))
            if flush or not self.pool.add_dirty(key, begin, block):
                self._write_through(t, piece, begin, (block,), length)
                if flush:
                    self._sync(t, t.files_of(piece))
            partial.hasher.add(begin, (block,), length)
            self.metrics.add("blocks_written")
            if partial.hasher.complete:
                return self._complete(t, piece, partial)
        return None

    def write_block_direct(
        self, ih: bytes, piece: int, begin: int, s0: Buffer, s1: Buffer = b""
    ) -> PieceResult | None:
        """Write a block given as two slices (a ring buffer's wrap) with one pwritev, no copy.

        The slices are only read during the call: the caller may reuse them after.
        """
        n1 = memoryview(s1).nbytes
        return self.write_blocks_direct(ih, piece, begin, (s0, s1) if n1 else (s0,), 1)

    def write_blocks_direct(
        self, ih: bytes, piece: int, begin: int, bufs: Sequence[Buffer], blocks: int
    ) -> PieceResult | None:
        """``write_block_direct`` of a run of ``blocks`` adjacent blocks of one piece,
        given as any number of slices: still one pwritev and one pass of the hashers.
        The daemon merges the ring writes a client sent back to back into one of these.
        """
        t = self._get(ih)
        length = sum(memoryview(b).nbytes for b in bufs)
        t.layout.check(piece, begin, length)
        partial = self._partial(t, piece)
        if partial is None:
            return None
        with partial.lock:
            if partial.done:
                self.metrics.add("duplicate_blocks")
                return None
            self._write_through(t, piece, begin, bufs, length, blocks=blocks)
            partial.hasher.add(begin, bufs, length)
            if partial.hasher.complete:
                return self._complete(t, piece, partial)
        return None

    def _partial(self, t: Torrent, piece: int) -> _Partial | None:
        """The piece's hash state, or None when the piece is already verified (a duplicate)."""
        with t.lock:
            if t.has(piece):
                self.metrics.add("duplicate_blocks")
                return None
            partial = t.partial.get(piece)
            if partial is None:
                v2 = t.meta.v2_piece(piece)
                hasher = PieceHasher(
                    t.layout.piece_size(piece), t.meta.has_v1, v2, t.pads(piece)
                )
                partial = t.partial[piece] = _Partial(hasher)
            return partial

    def _write_through(
        self, t: Torrent, piece: int, begin: int, bufs: Sequence[Buffer], length: int,
        blocks: int = 0,
    ) -> None:
        """Write a range straight to disk (the range has passed ``layout.check``)."""
        key = (t.id, piece)
        if self.pool.has_dirty(key):
            self.pool.discard_dirty(key, begin, begin + length)
        segs = t.layout.map_offset(piece * t.layout.piece_length + begin, length)
        start = perf_counter()
        try:
            n = t.storage.writev(segs, bufs)
        except StorageIOError as exc:
            self._record_error(t, exc, piece)
            raise
        self.metrics.wrote(perf_counter() - start, n, blocks, 1)

    def _write_out(self, t: Torrent, piece: int, blocks: list[tuple[int, bytes]]) -> None:
        """Write buffered blocks, one vectored write per run of adjacent blocks."""
        run: list[bytes] = []
        start = end = 0
        for begin, data in [*blocks, (-1, b"")]:
            if run and begin != end:
                segs = t.layout.map(piece, start, end - start)
                started = perf_counter()
                try:
                    n = t.storage.writev(segs, run)
                    self.metrics.wrote(perf_counter() - started, n, 0, 0)
                except StorageIOError as exc:
                    self._record_error(t, exc, piece)
                    raise
                run = []
            if begin < 0:
                break
            if not run:
                start = end = begin
            run.append(data)
            end += len(data)

    def _complete(self, t: Torrent, piece: int, partial: _Partial) -> PieceResult:
        """Verify a piece whose last block just arrived (caller holds the piece lock)."""
        key = (t.id, piece)
        with self.metrics.timed("hash"):
            d1, d2, fp = partial.hasher.finish(lambda b, n: self._read_range(t, piece, b, n))
        ok1 = d1 == t.meta.v1_hash(piece) if d1 is not None else None
        v2 = partial.hasher.v2
        ok2 = d2 == v2.expected if d2 is not None and v2 is not None else None
        ok = ok1 is not False and ok2 is not False
        blocks = self.pool.take_dirty(key)
        result = PieceResult(t.key, piece, ok, ok1, ok2)
        partial.done = True
        if ok:
            with t.lock:
                t.set_fingerprint(piece, fp)
            try:
                self._write_out(t, piece, blocks)
            finally:
                with t.lock:
                    t.partial.pop(piece, None)
            cached = self._as_piece(t, piece, blocks)
            if cached is not None:
                self.pool.put(key, cached)
            self._committer.verified(t, piece, result)
        else:
            with t.lock:
                t.partial.pop(piece, None)
            self.metrics.add("pieces_failed")
            self._notify(result)
        return result

    def _as_piece(
        self, t: Torrent, piece: int, blocks: list[tuple[int, bytes]]
    ) -> PieceData | None:
        """The verified blocks as a cacheable piece, when they tile it (pads filled with zeros)."""
        parts = sorted([*blocks, *((s, bytes(e - s)) for s, e in t.pads(piece))])
        pos = 0
        for begin, data in parts:
            if begin != pos:
                return None
            pos += len(data)
        if pos != t.layout.piece_size(piece):
            return None
        return PieceData([b for b, _ in parts], [d for _, d in parts])

    def _commit(self, t: Torrent, pieces: list[tuple[int, PieceResult]]) -> None:
        """Make verified pieces durable, then record and announce them."""
        files = sorted({f for p, _ in pieces for f in t.files_of(p)})
        try:
            self._sync(t, files)
        except StorageIOError:
            for _, r in pieces:
                self._notify(PieceResult(r.info_hash, r.piece, False, r.v1, r.v2))
            return
        with t.lock:
            for p, _ in pieces:
                t.set_have(p, True)
            due = time.monotonic() - t.resume_saved >= RESUME_INTERVAL
        if due:
            self.save_resume(t)
        self.metrics.add("pieces_verified", len(pieces))
        for _, r in pieces:
            self._notify(r)

    def _notify(self, result: PieceResult) -> None:
        if self.on_piece is not None:
            self.on_piece(result)

    def _sync(self, t: Torrent, files: Sequence[int] | None) -> None:
        try:
            with self.metrics.timed("sync"):
                synced = t.storage.sync(files)
        except StorageIOError as exc:
            self._record_error(t, exc, None)
            raise
        if synced:
            self.metrics.add("syncs", synced)

    def _record_error(self, t: Torrent, exc: StorageIOError, piece: int | None) -> None:
        self.metrics.error(exc.errno)
        entry = {"piece": piece, "errno": exc.errno, "message": str(exc)}
        now = time.monotonic()
        with t.lock:
            t.errors.append(entry)
            del t.errors[:-32]
            # A full disk fails every block: one report a second per kind is enough
            # (status keeps the last 32, /metrics counts them all).
            due = now - t.error_reported.get(exc.errno, -ERROR_EVENT_INTERVAL) >= ERROR_EVENT_INTERVAL
            if due:
                t.error_reported[exc.errno] = now
        if due and self.on_error is not None:
            self.on_error(t.key, entry)
        if isinstance(exc, FileVanished):
            self._file_vanished(t, exc)

    def _file_vanished(self, t: Torrent, exc: FileVanished) -> None:
        """A payload file is gone: its pieces are verified no more (a write re-creates it
        empty), and pieces partly written to it start over, their bytes gone with it.

        Runs under at most one piece lock; a reset piece is marked done without taking
        its lock (no thread holds two), so its writers drop what they still send.
        """
        dropped = []
        with t.lock:
            for p in t.layout.file_pieces(exc.file_index):
                if t.has(p):
                    t.set_have(p, False)
                    dropped.append(p)
                elif exc.written and (partial := t.partial.pop(p, None)) is not None:
                    partial.done = True
                    dropped.append(p)
        for p in dropped:
            self.pool.drop((t.id, p))

    # -- reads ------------------------------------------------------------------------
    def _read_range(self, t: Torrent, piece: int, begin: int, length: int) -> bytearray:
        """Bytes of a piece as they stand: buffered blocks over what is on disk."""
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
            except StorageIOError as exc:
                self._record_error(t, exc, piece)
                raise
            self.metrics.add("bytes_read", e - s)
        return out

    def read_chunk(
        self, ih: bytes, piece: int, begin: int, length: int, volatile: bool = False
    ) -> bytes:
        """Read for seeding; whole pieces are cached unless ``volatile``."""
        t = self._get(ih)
        t.layout.check(piece, begin, length)
        key = (t.id, piece)
        if self.pool.has_dirty(key):
            return bytes(self._read_range(t, piece, begin, length))
        cached = self.pool.get(key, volatile)
        if cached is not None:
            self.metrics.add("cache_hits")
            return cached.read(begin, length)
        self.metrics.add("cache_misses")
        if volatile:
            return bytes(self._read_range(t, piece, begin, length))
        data = self._read_range(t, piece, 0, t.layout.piece_size(piece))
        self.pool.put(key, PieceData.whole(data))
        return bytes(memoryview(data)[begin : begin + length])

    def read_piece(self, ih: bytes, piece: int) -> bytes:
        """A whole piece, with its buffered blocks flushed to disk first."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        self.flush_piece(ih, piece, sync=False)
        return self.read_chunk(ih, piece, 0, t.layout.piece_size(piece))

    # -- hashing ------------------------------------------------------------------------
    def hash_piece(self, ih: bytes, piece: int, expected: bytes | None = None) -> bool:
        """SHA-1 check of a piece as it stands; ``expected`` defaults to the metainfo's."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        if expected is None:
            if not t.meta.has_v1:
                raise NoHashes("torrent has no v1 piece hashes: use hash_piece_v2")
            expected = t.meta.v1_hash(piece)
        data = self.read_piece(ih, piece)
        with self.metrics.timed("hash"):
            return self.hash_pool.submit(_sha1, data).result() == bytes(expected)

    def hash_piece_v2(self, ih: bytes, piece: int, expected: bytes | None = None) -> bool:
        """BEP 52 Merkle check of a piece against the piece layer (or a given root)."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        v2 = t.meta.v2_piece(piece)
        if v2 is None:
            raise NoHashes("torrent has no v2 hashes: use hash_piece")
        data = self.read_piece(ih, piece)
        with self.metrics.timed("hash"):
            root = self.hash_pool.submit(v2_root, data, v2).result()
        return root == (bytes(expected) if expected is not None else v2.expected)

    def hash_block(self, ih: bytes, piece: int, begin: int, length: int) -> bytes:
        """SHA-256 of one 16 KiB leaf block (the last one of a file may be shorter)."""
        t = self._get(ih)
        if begin % BLOCK_SIZE or not 0 < length <= BLOCK_SIZE:
            raise OutOfRange(
                f"a leaf block starts on a 16 KiB boundary and is 1..16384 bytes "
                f"(begin={begin}, length={length})"
            )
        t.layout.check(piece, begin, length)
        return hashlib.sha256(self.read_chunk(ih, piece, begin, length, volatile=True)).digest()

    # -- buffer management ----------------------------------------------------------------
    def clear_piece(self, ih: bytes, piece: int) -> None:
        """Start a piece over: drop its buffered blocks, hash state and verified bit."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        with t.lock:
            partial = t.partial.pop(piece, None)
            t.set_have(piece, False)
        if partial is not None:
            with partial.lock:
                partial.done = True
        self.pool.drop((t.id, piece))

    def flush_piece(self, ih: bytes, piece: int, sync: bool = True) -> None:
        """Write a piece's buffered blocks and fdatasync its files."""
        t = self._get(ih)
        t.layout.check(piece, 0, 0)
        with t.lock:
            partial = t.partial.get(piece)
        if partial is not None:
            with partial.lock:
                self._write_out(t, piece, self.pool.take_dirty((t.id, piece)))
        if sync:
            self._sync(t, t.files_of(piece))

    def flush_all(self) -> None:
        with self._lock:
            torrents = {t.id: t for t in self._torrents.values()}
        for t in torrents.values():
            self._flush_torrent(t, sync=True)
        self._committer.drain()

    def _flush_torrent(self, t: Torrent, sync: bool) -> None:
        for tid, piece in self.pool.dirty_keys():
            if tid == t.id:
                self.flush_piece(t.key, piece, sync=False)
        if sync:
            self._sync(t, None)

    def cached_pieces(self, ih: bytes) -> list[int]:
        """Pieces held in memory (buffered or cached), for SuggestPiece."""
        return sorted(self.pool.pieces_of(self._get(ih).id))

    # -- whole-torrent operations ----------------------------------------------------------
    def recheck(
        self, ih: bytes, progress: Progress | None = None, full: bool = False
    ) -> VerifyResult:
        """Verify everything on disk; replaces the bitfield.

        A piece with a fingerprint is checked against it (BLAKE3: faster than SHA-1,
        and one hash for a hybrid's two); a mismatch, or no fingerprint, falls back to
        the torrent's own hashes. ``full`` always uses the torrent's hashes.
        """
        t = self._get(ih)
        self._flush_torrent(t, sync=True)
        self._committer.drain()
        result = self._verify(t, None, progress, full)
        with t.lock:
            for p, ok in enumerate(result.have):
                t.set_have(p, ok)
        self.save_resume(t)
        return result

    def move_storage(self, ih: bytes, new_path: str | Path) -> None:
        t = self._get(ih)
        path = self._check_save_path(Path(new_path))
        self._flush_torrent(t, sync=True)
        t.storage.move(path)
        self.save_resume(t)

    def rename_file(self, ih: bytes, index: int, new_name: str) -> None:
        t = self._get(ih)
        self._flush_torrent(t, sync=True)
        t.storage.rename(index, new_name)
        self.save_resume(t)

    # -- reporting ------------------------------------------------------------------------
    def status(self, ih: bytes) -> dict[str, Any]:
        t = self._get(ih)
        meta = t.meta
        with t.lock:
            have = bytes(t.have)
            partial = len(t.partial)
            errors = list(t.errors)
        verified = sum(bin(b).count("1") for b in have)
        files = []
        for i, f in enumerate(meta.files):
            if f.pad:
                continue
            done = 0
            for p in t.layout.file_pieces(i):
                if have[p >> 3] & (0x80 >> (p & 7)):
                    lo = max(f.offset, p * meta.piece_length)
                    hi = min(f.end, (p + 1) * meta.piece_length)
                    done += hi - lo
            files.append({
                "index": i,
                "path": t.storage.display_path(i),
                "length": f.length,
                "verified_bytes": done,
            })
        return {
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
            "partial_pieces": partial,
            "reverifying_pieces": t.reverifying,
            "files": files,
            "errors": errors,
        }

    def stats(self) -> dict[str, Any]:
        """The counters of SPEC section 6 that storage owns, and its gauges."""
        snap = self.metrics.snapshot()
        snap.update(
            backend=self.backend,
            torrents=len(self.torrents()),
            cache_bytes=self.pool.cache_bytes,
            write_buffer_bytes=self.pool.dirty_bytes,
            budget_bytes=self.pool.budget,
            hash_queue_depth=self.hash_pool.queued,
            hash_workers=self.hash_pool.workers,
            open_files=self.handles.open_count,
        )
        return snap

    def close(self) -> None:
        """Flush and sync everything, then stop the workers. Nothing verified is lost."""
        try:
            self.flush_all()
        finally:
            self._committer.stop()
            self.hash_pool.shutdown()
            with self._lock:
                torrents = {t.id: t for t in self._torrents.values()}
            for t in torrents.values():
                t.storage.close()
                self.save_resume(t)  # after the final sync: stamps match the files


def _sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


class _GroupCommit:
    """Batches the fdatasync of verified pieces: one sync per file per window.

    With a zero window each piece is synced and recorded by the thread that verified
    it; otherwise a committer thread wakes once per window.
    """

    def __init__(self, disk: DiskIO, window: float) -> None:
        self.disk = disk
        self.window = window
        self._cond = threading.Condition()
        self._pending: dict[int, tuple[Torrent, list[tuple[int, PieceResult]]]] = {}
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        if window > 0:
            self._thread = threading.Thread(target=self._run, name="pieced-commit", daemon=True)
            self._thread.start()

    def verified(self, t: Torrent, piece: int, result: PieceResult) -> None:
        if self._thread is None:
            self.disk._commit(t, [(piece, result)])
            return
        with self._cond:
            self._pending.setdefault(t.id, (t, []))[1].append((piece, result))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop and not self._pending:
                    return
            threading.Event().wait(self.window)
            with self._cond:
                batch, self._pending = self._pending, {}
                self._busy = True
            for t, pieces in batch.values():
                self.disk._commit(t, pieces)
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every piece verified so far is committed."""
        if self._thread is None:
            return
        with self._cond:
            self._cond.notify_all()
            while self._pending or self._busy:
                self._cond.wait(0.05)

    def stop(self) -> None:
        if self._thread is None:
            return
        self.drain()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()


__all__ = ["DiskIO", "PieceResult", "Torrent"]
