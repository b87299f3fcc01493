"""Byte-weighted read caches for piece data: ARC, and plain LRU as a baseline.

pieced keeps the write buffer (dirty blocks not yet on disk) and the read cache
under one memory budget, so a burst of writes cannot push the daemon past its
limit by stacking on top of a full read cache. The owner of the budget shrinks
this cache's capacity with :meth:`ArcCache.resize` as dirty bytes grow and gives
the room back as flushes complete. Capacity therefore moves all the time, and an
eviction caused by a resize is ordinary, not an error.

Why ARC (Megiddo & Modha, FAST '03) rather than LRU: a seeder's reads mix a hot
set (rare pieces many peers ask for, the pieces around a streaming reader) with
one-pass sweeps (a peer fetching the whole torrent in order, a recheck). Under
LRU one sweep flushes the hot set. ARC keeps keys seen once (T1) apart from keys
seen again (T2), so a sweep only churns T1, and it uses ghost hits (keys it
evicted recently, B1/B2) to learn how many bytes recency deserves against
frequency.

Why bytes rather than entries: piece sizes run from 16 KiB to many MiB across
torrents, so an entry count says nothing about memory. Bytes take the place of
the paper's page counts everywhere: list lengths, the target ``p`` and the
adaptation step. With every entry the same size the behaviour is exactly the
paper's (the tests check this against a transcription of its Fig. 4).

Neither class is thread-safe: the owner already holds a lock that covers the
write buffer and this cache together, and a second lock here would only add cost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

__all__ = ["ArcCache", "LruCache"]


def _check_capacity(capacity: int) -> None:
    if capacity < 0:
        raise ValueError(f"cache capacity must be >= 0, got {capacity}")


def _check_size(size: int) -> None:
    if size < 0:
        raise ValueError(f"entry size must be >= 0, got {size}")


class ArcCache(Generic[K, V]):
    """Byte-weighted ARC. Not thread-safe: the caller holds its own lock.

    Counters ``hits`` and ``misses`` move only in :meth:`get`, so that reads
    done with :meth:`peek` (volatile reads that must not pollute the cache) and
    the ``put`` that follows a miss do not distort the hit ratio.
    """

    def __init__(self, capacity: int) -> None:
        _check_capacity(capacity)
        self._capacity = capacity
        # Target size of T1 in bytes. A float because the paper's adaptation
        # step is a ratio of ghost-list sizes; rounding it would drift from ARC.
        self._p = 0.0
        # Resident lists, LRU first: key -> (value, size).
        self._t1: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._t2: OrderedDict[K, tuple[V, int]] = OrderedDict()
        # Ghost lists, LRU first: key -> size. No values, so they cost only keys.
        self._b1: OrderedDict[K, int] = OrderedDict()
        self._b2: OrderedDict[K, int] = OrderedDict()
        self._t1_bytes = 0
        self._t2_bytes = 0
        self._b1_bytes = 0
        self._b2_bytes = 0
        self.hits = 0
        self.misses = 0
        self.on_evict: Callable[[V], None] | None = None  # given each value evicted

    # Read-only views. capacity changes only through resize(), which evicts.

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return self._t1_bytes + self._t2_bytes

    @property
    def p(self) -> float:
        """ARC's adaptive target for T1, in bytes (0 <= p <= capacity)."""
        return self._p

    @property
    def t1_bytes(self) -> int:
        return self._t1_bytes

    @property
    def t2_bytes(self) -> int:
        return self._t2_bytes

    @property
    def b1_bytes(self) -> int:
        return self._b1_bytes

    @property
    def b2_bytes(self) -> int:
        return self._b2_bytes

    def get(self, key: K) -> V | None:
        """A hit is ARC's case I: whatever list the key was in, it is now frequent.

        A key found only in a ghost list is a miss here; ARC adapts when the
        data comes back, which is the caller's :meth:`put` after the miss.
        """
        entry = self._t1.pop(key, None)
        if entry is not None:
            self._t1_bytes -= entry[1]
            self._t2[key] = entry
            self._t2_bytes += entry[1]
            self.hits += 1
            return entry[0]
        entry = self._t2.get(key)
        if entry is not None:
            self._t2.move_to_end(key)
            self.hits += 1
            return entry[0]
        self.misses += 1
        return None

    def peek(self, key: K) -> V | None:
        entry = self._t1.get(key)
        if entry is None:
            entry = self._t2.get(key)
        return None if entry is None else entry[0]

    def put(self, key: K, value: V, size: int) -> list[K]:
        """Store ``value`` and return the keys that lost residency because of it.

        An entry larger than the whole cache is not stored, and any older value
        for the key is dropped too so a later read cannot see stale data; in that
        case the key itself is in the returned list if it was resident. Replacing
        a resident key counts as a re-reference (ARC case I) and moves it to T2.
        """
        _check_size(size)
        if size > self._capacity:
            old = self._remove_resident(key)
            self._remove_ghost(key)
            return [key] if old is not None else []

        evicted: list[K] = []
        if self._remove_resident(key) is not None:
            self._make_room(size, False, evicted)
            self._insert_t2(key, value, size)
        elif key in self._b1:
            # Case II: T1 would have kept this key had it been bigger. Grow p by
            # the ghost's bytes, scaled up when B1 is the smaller ghost list.
            ghost = self._b1[key]
            ratio = self._b2_bytes / self._b1_bytes if self._b1_bytes else 1.0
            self._p = min(float(self._capacity), self._p + ghost * max(1.0, ratio))
            del self._b1[key]
            self._b1_bytes -= ghost
            self._make_room(size, False, evicted)
            self._insert_t2(key, value, size)
        elif key in self._b2:
            # Case III: T2 would have kept it; shrink p symmetrically.
            ghost = self._b2[key]
            ratio = self._b1_bytes / self._b2_bytes if self._b2_bytes else 1.0
            self._p = max(0.0, self._p - ghost * max(1.0, ratio))
            del self._b2[key]
            self._b2_bytes -= ghost
            self._make_room(size, True, evicted)
            self._insert_t2(key, value, size)
        else:
            # Case IV: first sight (or forgotten): recency list.
            self._make_room(size, False, evicted)
            self._t1[key] = (value, size)
            self._t1_bytes += size
        self._trim_ghosts()
        return evicted

    def pop(self, key: K) -> V | None:
        """Forget the key entirely, ghost included: the owner pops when the data
        changed or went away, so a ghost hit on it later would teach ARC nothing."""
        old = self._remove_resident(key)
        self._remove_ghost(key)
        return old

    def resize(self, capacity: int) -> list[K]:
        """Change the byte budget; returns the keys evicted to fit a smaller one.

        ``p`` is rescaled in proportion, so the T1/T2 balance ARC has learned
        survives the owner shrinking and regrowing the cache as dirty bytes come
        and go; merely clamping it would lose that balance on every shrink.
        """
        _check_capacity(capacity)
        old_capacity = self._capacity
        self._capacity = capacity
        if old_capacity > 0:
            self._p = min(float(capacity), self._p * capacity / old_capacity)
        else:
            self._p = 0.0
        evicted: list[K] = []
        self._make_room(0, False, evicted)
        self._trim_ghosts()
        return evicted

    def keys(self) -> list[K]:
        return [*self._t1, *self._t2]

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def _insert_t2(self, key: K, value: V, size: int) -> None:
        self._t2[key] = (value, size)
        self._t2_bytes += size

    def _remove_resident(self, key: K) -> V | None:
        entry = self._t1.pop(key, None)
        if entry is not None:
            self._t1_bytes -= entry[1]
            return entry[0]
        entry = self._t2.pop(key, None)
        if entry is not None:
            self._t2_bytes -= entry[1]
            return entry[0]
        return None

    def _remove_ghost(self, key: K) -> None:
        size = self._b1.pop(key, None)
        if size is not None:
            self._b1_bytes -= size
        size = self._b2.pop(key, None)
        if size is not None:
            self._b2_bytes -= size

    def _make_room(self, size: int, hit_in_b2: bool, evicted: list[K]) -> None:
        """Run ARC's REPLACE until ``size`` more bytes fit.

        The paper calls REPLACE once per miss because its cache is always full
        once warm; here pop() and resize() leave holes, so evict only as many
        bytes as are actually needed. ``size <= capacity`` guarantees that while
        we are over budget something resident is left to evict.
        """
        limit = self._capacity - size
        while self._t1_bytes + self._t2_bytes > limit:
            t1 = self._t1_bytes
            if self._t1 and (t1 > self._p or (hit_in_b2 and t1 == self._p) or not self._t2):
                key, (value, vsize) = self._t1.popitem(last=False)
                self._t1_bytes -= vsize
                # A zero-byte ghost could never be trimmed by the byte bounds
                # and its hit would move p by nothing, so it is not kept.
                if vsize:
                    self._b1[key] = vsize
                    self._b1_bytes += vsize
            else:
                key, (value, vsize) = self._t2.popitem(last=False)
                self._t2_bytes -= vsize
                if vsize:
                    self._b2[key] = vsize
                    self._b2_bytes += vsize
            evicted.append(key)
            if self.on_evict is not None:
                self.on_evict(value)

    def _trim_ghosts(self) -> None:
        """Keep ARC's directory bounds, in bytes: T1+B1 <= c and T1+T2+B1+B2 <= 2c.

        Dropping the oldest ghosts after the fact gives the same lists as the
        paper dropping them before REPLACE, since REPLACE only adds at the MRU
        end. Once T1+B1 <= c, and T2 <= used <= c, emptying B2 always suffices
        for the second bound.
        """
        c = self._capacity
        while self._b1 and self._t1_bytes + self._b1_bytes > c:
            _, size = self._b1.popitem(last=False)
            self._b1_bytes -= size
        while self._b2 and (
            self._t1_bytes + self._t2_bytes + self._b1_bytes + self._b2_bytes > 2 * c
        ):
            _, size = self._b2.popitem(last=False)
            self._b2_bytes -= size


class LruCache(Generic[K, V]):
    """Plain LRU by bytes, with ArcCache's interface.

    Kept as the baseline the benchmark measures ARC against, and as a drop-in
    for workloads with no scans, where ARC's ghost bookkeeping buys nothing.
    Not thread-safe: the caller holds its own lock.
    """

    def __init__(self, capacity: int) -> None:
        _check_capacity(capacity)
        self._capacity = capacity
        self._used = 0
        # LRU first: key -> (value, size).
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.on_evict: Callable[[V], None] | None = None  # given each value evicted

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return self._used

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def peek(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: K, value: V, size: int) -> list[K]:
        """Same contract as :meth:`ArcCache.put`, oversize case included."""
        _check_size(size)
        old = self._entries.pop(key, None)
        if old is not None:
            self._used -= old[1]
        if size > self._capacity:
            return [key] if old is not None else []
        evicted = self._evict_down_to(self._capacity - size)
        self._entries[key] = (value, size)
        self._used += size
        return evicted

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._used -= entry[1]
        return entry[0]

    def resize(self, capacity: int) -> list[K]:
        _check_capacity(capacity)
        self._capacity = capacity
        return self._evict_down_to(capacity)

    def keys(self) -> list[K]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _evict_down_to(self, limit: int) -> list[K]:
        evicted: list[K] = []
        while self._used > limit:
            key, (value, size) = self._entries.popitem(last=False)
            self._used -= size
            evicted.append(key)
            if self.on_evict is not None:
                self.on_evict(value)
        return evicted
