"""The unified buffer pool: write buffer and read cache under one byte budget.

Dirty blocks (written, not yet on disk) and clean pieces (cached for reads and
SuggestPiece) share ``budget`` bytes: as dirty bytes grow, the ARC cache's capacity
shrinks by the same amount and evicts clean pieces. Dirty bytes are never evicted:
when they would overflow the budget, :meth:`BufferPool.add_dirty` says no and the
caller writes the block straight through to disk. So memory is bounded by the
budget whatever the clients do, and no data is dropped to make room.

A clean piece is either bytes held here (:class:`PieceData`: blocks that were buffered,
or a piece read for seeding) or, for a piece written straight to its file (the shared
ring's path, or a write-through), a :class:`ResidentPiece`: no copy, the bytes are the
file's, still in the kernel's page cache right after they were written, and read from
it only while they are still there (a read that would touch the disk is refused). Both
count their size against the budget, so the cache never offers more than it holds:
copying every ring block once more to hold it here would cost the write path a copy and
a page fault per page for bytes the kernel already keeps.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections.abc import Callable, Sequence

from .cache import ArcCache, LruCache
from .hashing import Buffer

Key = tuple[int, int]  # (torrent id, piece)


# What a buffered block holds in memory beyond its bytes (its bytes object and its
# entry in its piece's table), charged to the budget with them: counted by its bytes
# alone, a client writing a byte at a time filled a budget of 256 MiB with a quarter
# of a billion blocks, tens of gigabytes.
DIRTY_OVERHEAD = 128
# Blocks buffered for one piece at most (a 64 MiB piece's 16 KiB blocks); past it, a
# block goes straight to disk. A new block is looked for overlaps among those of its
# piece: ten thousand blocks of a byte made each write slower than the one before.
MAX_DIRTY_BLOCKS = 4096


def _cost(data: bytes) -> int:
    return len(data) + DIRTY_OVERHEAD


class PieceData:
    """A clean piece held as the blocks it arrived in (no join, so no copy)."""

    __slots__ = ("_blocks", "_starts", "size")

    def __init__(self, starts: Sequence[int], blocks: Sequence[Buffer]) -> None:
        self._starts = list(starts)
        self._blocks = list(blocks)
        self.size = sum(memoryview(b).nbytes for b in blocks)

    @classmethod
    def whole(cls, data: Buffer) -> PieceData:
        return cls([0], [data])

    @property
    def buffer(self) -> Buffer | None:
        """The one buffer that holds the whole piece, if it is held so."""
        return self._blocks[0] if len(self._blocks) == 1 else None

    def read(self, begin: int, length: int) -> Buffer:
        """The bytes, as a view when one block holds them all (a piece's blocks are
        never written again once cached), else joined."""
        i = bisect.bisect_right(self._starts, begin) - 1
        off = begin - self._starts[i]
        block = memoryview(self._blocks[i])
        if off + length <= block.nbytes:
            return block[off : off + length]
        out = bytearray()
        while len(out) < length:
            block = memoryview(self._blocks[i])
            out += block[off : off + length - len(out)]
            i += 1
            off = 0
        return bytes(out)

    def views(self) -> list[memoryview]:
        return [memoryview(b) for b in self._blocks]


class ResidentPiece:
    """A verified piece whose bytes are in the page cache, read from there or not at all.

    ``fetch(begin, length)`` returns the bytes, or None when part of them has left the
    page cache (the entry is then dropped, and the caller reads the usual way).
    """

    __slots__ = ("fetch", "size")

    def __init__(self, size: int, fetch: Callable[[int, int], Buffer | None]) -> None:
        self.size = size
        self.fetch = fetch

    def read(self, begin: int, length: int) -> Buffer | None:
        return self.fetch(begin, length)


Clean = PieceData | ResidentPiece


class PieceBuffer(bytearray):
    """A whole piece read from disk for the cache: given back to the :class:`Recycler`
    when the cache lets it go."""

    __slots__ = ()


class Recycler:
    """Buffers of pieces the cache let go, used again for the next pieces read.

    A new buffer of a few MiB is fresh memory from the kernel, zero-filled page by page
    on first touch and handed back when freed: measured while seeding 4 MiB pieces, that
    was 44 % of the daemon's CPU, more than the reads and the sends together. So a piece
    buffer evicted from the cache is kept here (at most ``max_bytes`` of them: memory
    beyond the cache's budget) and given out again, as it is, for the next piece of its
    size: the read overwrites every byte. A buffer is given out again only when this
    list holds the last reference to it (CPython's reference count): a view of it that
    is still being sent to a client keeps it out of use until the send is done.
    """

    # References to a buffer no one else holds, as getrefcount sees them in take():
    # the list's, the local variable's and getrefcount's own argument.
    _ALONE = 3

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: list[PieceBuffer] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self.reused = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of evicted pieces' buffers kept (beyond the budget)."""
        return self._bytes

    def take(self, size: int) -> PieceBuffer:
        """A buffer of ``size`` bytes, of unspecified content."""
        with self._lock:
            free = self._free
            for i in range(len(free)):
                buf = free[i]
                if len(buf) == size and sys.getrefcount(buf) <= self._ALONE:
                    del self._free[i]
                    self._bytes -= size
                    self.reused += 1
                    return buf
        return PieceBuffer(size)

    def give(self, piece: object) -> None:
        """The cache let ``piece`` go: keep its buffer if it is one of ours (the oldest
        kept go to the allocator when there is no room)."""
        buf = piece.buffer if isinstance(piece, PieceData) else None
        if type(buf) is not PieceBuffer or len(buf) > self.max_bytes:
            return
        with self._lock:
            self._free.append(buf)
            self._bytes += len(buf)
            while self._bytes > self.max_bytes:
                self._bytes -= len(self._free.pop(0))


class BufferPool:
    def __init__(self, budget: int, policy: str = "arc") -> None:
        if policy not in ("arc", "lru"):
            raise ValueError(f"cache policy must be 'arc' or 'lru', not {policy!r}")
        self.budget = budget
        # Beyond the budget: buffers of evicted pieces, kept for the next ones read.
        self.recycler = Recycler(min(budget // 16, 16 * 1024 * 1024))
        self._lock = threading.Lock()
        self._dirty: dict[Key, dict[int, bytes]] = {}
        # Blocks taken to be written out, until their write is done (see take_dirty).
        self._leaving: dict[Key, list[list[tuple[int, bytes]]]] = {}
        # Per piece buffered, where its blocks begin and end at most: a block outside
        # that overlaps none (the usual case, blocks in order). Kept wide, never narrowed
        # until the piece's blocks go: a wider one only sends more blocks to be looked at.
        self._extent: dict[Key, list[int]] = {}
        self.dirty_bytes = 0
        self._clean: ArcCache[Key, Clean] | LruCache[Key, Clean] = (
            ArcCache(budget) if policy == "arc" else LruCache(budget)
        )
        self._clean.on_evict = self.recycler.give

    # -- write buffer --------------------------------------------------------------
    def add_dirty(self, key: Key, begin: int, data: bytes) -> bool:
        """Buffer a block; False (and nothing kept) when the budget has no room. A block
        costs its bytes and DIRTY_OVERHEAD (see :func:`_cost`)."""
        with self._lock:
            blocks = self._dirty.get(key)
            old = blocks.get(begin) if blocks else None
            delta = _cost(data) - (_cost(old) if old is not None else 0)
            if self.dirty_bytes + delta > self.budget or (
                    old is None and blocks is not None and len(blocks) >= MAX_DIRTY_BLOCKS):
                return False
            end = begin + len(data)
            if blocks is None:
                blocks = self._dirty[key] = {}
                self._extent[key] = [begin, end]
            else:
                extent = self._extent[key]
                extent[0], extent[1] = min(extent[0], begin), max(extent[1], end)
            blocks[begin] = data
            self.dirty_bytes += delta
            self.recycler.give(self._clean.pop(key))
            self._clean.resize(self.budget - self.dirty_bytes)
            return True

    def overlaps_other(self, key: Key, begin: int, end: int) -> bool:
        """Whether a buffered block of ``key`` overlaps [begin, end) without being it."""
        with self._lock:
            blocks = self._dirty.get(key)
            if not blocks:
                return False
            lo, hi = self._extent[key]
            if begin >= hi or end <= lo:
                return False
            return any(
                b < end and begin < b + len(d) and not (b == begin and b + len(d) == end)
                for b, d in blocks.items()
            )

    def has_dirty(self, key: Key) -> bool:
        return key in self._dirty

    def dirty_blocks(self, key: Key) -> list[tuple[int, bytes]]:
        """A piece's blocks not in its files yet: those on their way there first (see
        take_dirty), then those buffered, newer, sorted (where they overlap, the later
        in the list goes over the earlier)."""
        with self._lock:
            leaving = self._leaving.get(key)
            blocks = sorted(self._dirty.get(key, {}).items())
            return [b for run in leaving for b in run] + blocks if leaving else blocks

    def take_dirty(self, key: Key, leaving: bool = False) -> list[tuple[int, bytes]]:
        """Remove and return a piece's buffered blocks (written, verified or dropped).

        ``leaving``: they are taken to be written out, and dirty_blocks still gives them
        until :meth:`written` says their write is done. Between the two they are in
        neither place a look at the piece's bytes goes to (not buffered, not yet in the
        file): a write of another torrent into the same file, waiting for them, took
        identical bytes for changed ones and threw away the piece they belong to, and
        reading the piece back found zeros where they go."""
        with self._lock:
            blocks = self._dirty.pop(key, None)
            self._extent.pop(key, None)
            if not blocks:
                return []
            self.dirty_bytes -= sum(map(_cost, blocks.values()))
            self._clean.resize(self.budget - self.dirty_bytes)
            taken = sorted(blocks.items())
            if leaving:
                self._leaving.setdefault(key, []).append(taken)
            return taken

    def written(self, key: Key, taken: list[tuple[int, bytes]]) -> None:
        """Blocks taken with ``take_dirty(key, leaving=True)`` are written (or their
        write failed): no longer the pool's to show."""
        if not taken:
            return
        with self._lock:
            runs = self._leaving.get(key, [])
            for i, run in enumerate(runs):
                if run is taken:
                    del runs[i]
                    break
            if not runs:
                self._leaving.pop(key, None)

    def discard_dirty(self, key: Key, begin: int, end: int) -> None:
        """Forget buffered blocks inside [begin, end): newer data went straight to disk."""
        with self._lock:
            blocks = self._dirty.get(key)
            if not blocks:
                return
            for b in [b for b, d in blocks.items() if begin <= b and b + len(d) <= end]:
                self.dirty_bytes -= _cost(blocks.pop(b))
            if not blocks:
                del self._dirty[key]
                del self._extent[key]
            self._clean.resize(self.budget - self.dirty_bytes)

    def dirty_keys(self) -> list[Key]:
        with self._lock:
            return list(self._dirty)

    # -- read cache --------------------------------------------------------------
    def get(self, key: Key, volatile: bool = False) -> Clean | None:
        with self._lock:
            return self._clean.peek(key) if volatile else self._clean.get(key)

    def put(self, key: Key, piece: Clean) -> None:
        with self._lock:
            if key not in self._dirty:
                self._clean.put(key, piece, piece.size)

    def drop(self, key: Key) -> None:
        """Forget a piece entirely, buffered and cached."""
        self.take_dirty(key)
        self.drop_clean(key)

    def drop_clean(self, key: Key) -> None:
        """Forget a piece's cached copy (its bytes on disk changed), not its buffered
        blocks (another torrent wrote into the file where a piece under way has blocks
        still to be written out: they go over those bytes then)."""
        with self._lock:
            gone = self._clean.pop(key)
        self.recycler.give(gone)

    def pieces_of(self, tid: int) -> set[int]:
        """Pieces of a torrent held in memory, buffered or cached."""
        with self._lock:
            keys = list(self._dirty) + self._clean.keys()
        return {p for t, p in keys if t == tid}

    def cached_of(self, tid: int) -> list[int]:
        """Pieces of a torrent in the clean cache (not those only buffered)."""
        with self._lock:
            keys = self._clean.keys()
        return [p for t, p in keys if t == tid]

    @property
    def cache_bytes(self) -> int:
        return self._clean.used
