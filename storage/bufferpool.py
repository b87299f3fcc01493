"""The unified buffer pool: write buffer and read cache under one byte budget.

Dirty blocks (written, not yet on disk) and clean pieces (cached for reads and
SuggestPiece) share ``budget`` bytes: as dirty bytes grow, the ARC cache's capacity
shrinks by the same amount and evicts clean pieces. Dirty bytes are never evicted:
when they would overflow the budget, :meth:`BufferPool.add_dirty` says no and the
caller writes the block straight through to disk. So memory is bounded by the
budget whatever the clients do, and no data is dropped to make room.

A third kind shares the budget: *staged* pieces, the copy of a piece written through
the shared ring that becomes its cache entry once it verifies. Staging takes at most
half the budget and never more than is free of dirty bytes; a piece that finds no
room is simply not cached.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

from .cache import ArcCache, LruCache
from .hashing import Buffer

Key = tuple[int, int]  # (torrent id, piece)


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

    def read(self, begin: int, length: int) -> bytes:
        i = bisect.bisect_right(self._starts, begin) - 1
        off = begin - self._starts[i]
        block = memoryview(self._blocks[i])
        if off + length <= block.nbytes:
            return bytes(block[off : off + length])
        out = bytearray()
        while len(out) < length:
            block = memoryview(self._blocks[i])
            out += block[off : off + length - len(out)]
            i += 1
            off = 0
        return bytes(out)

    def views(self) -> list[memoryview]:
        return [memoryview(b) for b in self._blocks]


class BufferPool:
    def __init__(self, budget: int, policy: str = "arc") -> None:
        if policy not in ("arc", "lru"):
            raise ValueError(f"cache policy must be 'arc' or 'lru', not {policy!r}")
        self.budget = budget
        self._lock = threading.Lock()
        self._dirty: dict[Key, dict[int, bytes]] = {}
        self.dirty_bytes = 0
        self.staged_bytes = 0
        self._clean: ArcCache[Key, PieceData] | LruCache[Key, PieceData] = (
            ArcCache(budget) if policy == "arc" else LruCache(budget)
        )

    # -- write buffer --------------------------------------------------------------
    def add_dirty(self, key: Key, begin: int, data: bytes) -> bool:
        """Buffer a block; False (and nothing kept) when the budget has no room."""
        with self._lock:
            blocks = self._dirty.get(key)
            old = blocks.get(begin) if blocks else None
            delta = len(data) - (len(old) if old is not None else 0)
            if self.dirty_bytes + delta > self.budget:
                return False
            if blocks is None:
                blocks = self._dirty[key] = {}
            blocks[begin] = data
            self.dirty_bytes += delta
            self._clean.pop(key)
            self._clean.resize(self.budget - self.dirty_bytes - self.staged_bytes)
            return True

    def overlaps_other(self, key: Key, begin: int, end: int) -> bool:
        """Whether a buffered block of ``key`` overlaps [begin, end) without being it."""
        with self._lock:
            blocks = self._dirty.get(key)
            if not blocks:
                return False
            return any(
                b < end and begin < b + len(d) and not (b == begin and b + len(d) == end)
                for b, d in blocks.items()
            )

    def stage(self, size: int) -> bytearray | None:
        """A buffer for a piece's copy, counted against the budget, or None if no room."""
        with self._lock:
            if (self.staged_bytes + size > self.budget // 2
                    or self.dirty_bytes + self.staged_bytes + size > self.budget):
                return None
            self.staged_bytes += size
            self._clean.resize(self.budget - self.dirty_bytes - self.staged_bytes)
        return bytearray(size)

    def unstage(self, size: int, key: Key | None = None, piece: PieceData | None = None) -> None:
        """Give back a staged buffer's bytes; with ``piece``, cache it under ``key``."""
        with self._lock:
            self.staged_bytes -= size
            self._clean.resize(self.budget - self.dirty_bytes - self.staged_bytes)
            if key is not None and piece is not None and key not in self._dirty:
                self._clean.put(key, piece, piece.size)

    def has_dirty(self, key: Key) -> bool:
        return key in self._dirty

    def dirty_blocks(self, key: Key) -> list[tuple[int, bytes]]:
        with self._lock:
            return sorted(self._dirty.get(key, {}).items())

    def take_dirty(self, key: Key) -> list[tuple[int, bytes]]:
        """Remove and return a piece's buffered blocks (written, verified or dropped)."""
        with self._lock:
            blocks = self._dirty.pop(key, None)
            if not blocks:
                return []
            self.dirty_bytes -= sum(len(d) for d in blocks.values())
            self._clean.resize(self.budget - self.dirty_bytes - self.staged_bytes)
            return sorted(blocks.items())

    def discard_dirty(self, key: Key, begin: int, end: int) -> None:
        """Forget buffered blocks inside [begin, end): newer data went straight to disk."""
        with self._lock:
            blocks = self._dirty.get(key)
            if not blocks:
                return
            for b in [b for b, d in blocks.items() if begin <= b and b + len(d) <= end]:
                self.dirty_bytes -= len(blocks.pop(b))
            if not blocks:
                del self._dirty[key]
            self._clean.resize(self.budget - self.dirty_bytes - self.staged_bytes)

    def dirty_keys(self) -> list[Key]:
        with self._lock:
            return list(self._dirty)

    # -- read cache --------------------------------------------------------------
    def get(self, key: Key, volatile: bool = False) -> PieceData | None:
        with self._lock:
            return self._clean.peek(key) if volatile else self._clean.get(key)

    def put(self, key: Key, piece: PieceData) -> None:
        with self._lock:
            if key not in self._dirty:
                self._clean.put(key, piece, piece.size)

    def drop(self, key: Key) -> None:
        """Forget a piece entirely, buffered and cached."""
        self.take_dirty(key)
        with self._lock:
            self._clean.pop(key)

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
