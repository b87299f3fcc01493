"""Whole-torrent verification: the offline ``pieced verify`` and the daemon's recheck.

Work is handed to the hash pool in batches of consecutive pieces (a few MiB each),
not piece by piece: with 16 KiB pieces a future per piece would cost more than the
hashing. Each worker reads into a buffer of its own and hashes it there; pieces larger
than STREAM_BYTES are read and hashed in parts, so the buffer never grows past it.

Two readers: ``pread`` (safe against files truncated behind our back, used by the
daemon) and ``mmap`` (no copy out of the page cache, used by the offline verifier,
which is a short-lived process where a SIGBUS on a truncated file only ends itself).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from blake3 import blake3

from .errors import StorageIOError
from .hashing import (
    FINGERPRINT_BYTES,
    NO_FINGERPRINT,
    Buffer,
    HashPool,
    PieceHasher,
    check_piece,
    fingerprint,
)
from .layout import Layout
from .metainfo import Metainfo

BATCH_BYTES = 8 * 1024 * 1024
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
    holds at most one, of at most STREAM_BYTES, however large the pieces."""
    buf: memoryview | None = getattr(_buffers, "buf", None)
    if buf is None or buf.nbytes < size:
        buf = _buffers.buf = memoryview(bytearray(size))
    return buf


class PreadReader:
    """Reads pieces with preadv, via a storage's ``readinto(piece, begin, out)``, into
    the hashing thread's buffer."""

    def __init__(self, read: Callable[[int, int, memoryview], None],
                 advise: Callable[[int, int], None] | None = None) -> None:
        self._read = read
        self._advise = advise

    def prefetch(self, pieces: Sequence[int], size: Callable[[int], int]) -> None:
        """Ask the kernel to start reading ``pieces`` now (they are hashed soon)."""
        if self._advise is not None:
            for p in pieces:
                self._advise(p, size(p))

    def views(self, piece: int, size: int) -> list[Buffer] | None:
        buf = _thread_buffer(size)[:size]
        try:
            self._read(piece, 0, buf)
        except StorageIOError:
            return None
        return [buf]

    def stream(self, piece: int, size: int, consume: Callable[[memoryview], object]) -> bool:
        """Hand the piece to ``consume`` in consecutive parts of at most STREAM_BYTES;
        False if it could not be read."""
        buf = _thread_buffer(min(size, STREAM_BYTES))
        for begin in range(0, size, STREAM_BYTES):
            part = buf[: min(STREAM_BYTES, size - begin)]
            try:
                self._read(piece, begin, part)
            except StorageIOError:
                return False
            consume(part)
        return True


class MmapReader:
    """Maps each payload file once, read-only, and hands out slices: zero copy."""

    def __init__(self, meta: Metainfo, save_path: Path, layout: Layout) -> None:
        self._meta = meta
        self._layout = layout
        self._maps: dict[int, mmap.mmap | None] = {}
        self._save_path = save_path
        self._lock = threading.Lock()

    def _map(self, index: int) -> mmap.mmap | None:
        if index in self._maps:
            return self._maps[index]
        with self._lock:
            if index not in self._maps:
                self._maps[index] = self._open(index)
            return self._maps[index]

    def _open(self, index: int) -> mmap.mmap | None:
        f = self._meta.files[index]
        try:
            fd = os.open(self._save_path.joinpath(*f.path), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < f.length:
                return None  # a short file cannot hold its pieces: they fail
            m = mmap.mmap(fd, f.length, prot=mmap.PROT_READ)
            m.madvise(mmap.MADV_SEQUENTIAL)
            return m
        finally:
            os.close(fd)

    def prefetch(self, pieces: Sequence[int], size: Callable[[int], int]) -> None:
        """Start the reading of ``pieces`` (MADV_WILLNEED): the disk works while the
        pieces before them are hashed."""
        for p in pieces:
            for seg in self._layout.map(p, 0, size(p)):
                m = self._map(seg.file_index) if seg.stored else None
                if m is None or not seg.length:
                    continue
                start = seg.file_offset - seg.file_offset % mmap.PAGESIZE
                with contextlib.suppress(OSError, ValueError):
                    m.madvise(mmap.MADV_WILLNEED, start, seg.file_offset + seg.length - start)

    def views(self, piece: int, size: int) -> list[Buffer] | None:
        out: list[Buffer] = []
        for seg in self._layout.map(piece, 0, size):
            if not seg.stored:
                out.append(bytes(seg.length))
                continue
            m = self._map(seg.file_index)
            if m is None:
                return None
            out.append(memoryview(m)[seg.file_offset : seg.file_offset + seg.length])
        return out

    def close(self) -> None:
        for m in self._maps.values():
            if m is not None:
                # A view may still be alive somewhere; the map then goes with it.
                with contextlib.suppress(BufferError):
                    m.close()


Reader = PreadReader | MmapReader


def _unreachable(begin: int, length: int) -> Buffer:
    raise AssertionError("a piece fed whole and in order needs nothing fetched")
# (piece, v1 ok, v2 ok, bytes hashed, new fingerprint, good by its fingerprint)
Row = tuple[int, bool | None, bool | None, int, bytes | None, bool]


def verify(
    meta: Metainfo,
    reader: Reader,
    pool: HashPool,
    progress: Progress | None = None,
    pieces: Sequence[int] | None = None,
    fingerprints: bytes | None = None,
    trust_fingerprints: bool = True,
) -> VerifyResult:
    """Hash every piece (or the given ones), in batches on the hash pool.

    ``fingerprints`` (a torrent's table, see :func:`hashing.fingerprint`): a piece
    whose fingerprint matches is good without its torrent hashes, unless
    ``trust_fingerprints`` is off (a full recheck); a piece that passes its torrent
    hashes and has no (or a stale) fingerprint gets one, in ``new_fingerprints``.
    Without a table no fingerprint is computed at all.
    """
    todo = list(pieces) if pieces is not None else range(meta.num_pieces)
    have = [False] * meta.num_pieces
    failed_v1: list[int] | None = [] if meta.has_v1 else None
    failed_v2: list[int] | None = [] if meta.has_v2 else None
    new_fps: dict[int, bytes] = {}
    per_batch = max(1, BATCH_BYTES // meta.piece_length)
    window = 2 * pool.workers + 2
    done = hashed = hits = 0
    fail = (False if meta.has_v1 else None, False if meta.has_v2 else None)
    good = (True if meta.has_v1 else None, True if meta.has_v2 else None)
    FP = FINGERPRINT_BYTES

    def run(batch: Sequence[int]) -> list[Row]:
        out: list[Row] = []
        for p in batch:
            size = meta.piece_size(p)
            known = fingerprints[p * FP : (p + 1) * FP] if fingerprints is not None else None
            if known == NO_FINGERPRINT:
                known = None
            if size > STREAM_BYTES and isinstance(reader, PreadReader):
                out.append(streamed(reader, p, size, known))
                continue
            views = reader.views(p, size)
            if views is None:
                out.append((p, *fail, 0, None, False))
                continue
            fp = None
            if known is not None and trust_fingerprints:
                fp = fingerprint(views)
                if fp == known:
                    out.append((p, *good, size, None, True))
                    continue
            ok1, ok2 = check_piece(
                views, meta.v1_hash(p) if meta.has_v1 else None, meta.v2_piece(p)
            )
            new = None
            stale = known is None or fp is not None  # fp set here means it did not match
            if fingerprints is not None and ok1 is not False and ok2 is not False and stale:
                new = fp if fp is not None else fingerprint(views)
            out.append((p, ok1, ok2, size, new, False))
        return out

    def streamed(reader: PreadReader, p: int, size: int, known: bytes | None) -> Row:
        """A large piece, read in parts: its fingerprint first (when it has one), then,
        if that does not match, its torrent hashes and fingerprint in a second pass."""
        if known is not None and trust_fingerprints:
            h = blake3()
            if not reader.stream(p, size, h.update):
                return (p, *fail, 0, None, False)
            if h.digest(FP) == known:
                return (p, *good, size, None, True)
        v2 = meta.v2_piece(p)
        hasher = PieceHasher(size, meta.has_v1, v2)
        pos = 0

        def feed(part: memoryview) -> None:
            nonlocal pos
            hasher.add(pos, (part,))
            pos += part.nbytes

        if not reader.stream(p, size, feed):
            return (p, *fail, 0, None, False)
        d1, d2, fp = hasher.finish(_unreachable)
        ok1 = d1 == meta.v1_hash(p) if meta.has_v1 else None
        ok2 = d2 == v2.expected if v2 is not None else None
        keep = fingerprints is not None and ok1 is not False and ok2 is not False
        return (p, ok1, ok2, size, fp if keep else None, False)

    def batches() -> Iterator[Sequence[int]]:
        for start in range(0, len(todo), per_batch):
            yield todo[start : start + per_batch]

    pending = []
    it = batches()
    for b in it:
        reader.prefetch(b, meta.piece_size)
        pending.append(pool.submit(run, b))
        if len(pending) >= window:
            break
    while pending:
        fut = pending.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            reader.prefetch(nxt, meta.piece_size)
            pending.append(pool.submit(run, nxt))
        for p, ok1, ok2, size, new, hit in fut.result():
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
    return VerifyResult(meta.num_pieces, failed_v1, failed_v2, have, hashed, hits, new_fps)
