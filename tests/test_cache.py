"""Tests of the byte-weighted ARC and LRU caches.

The unit tests pin down the behaviours ARC exists for (scan resistance, ghost
adaptation) and the contract the owner relies on (peek is invisible, oversize
entries are dropped, resize evicts). The property tests drive random operation
sequences against a model; for ARC with equal sizes they also compare the whole
state with a transcription of the paper's algorithm, which is the only way to
catch a REPLACE or directory-trimming rule that is plausible but wrong.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pieced.storage.cache import ArcCache, LruCache

CACHES = [ArcCache, LruCache]


def _warm_hot_set(cache: Any, hot: list[str], size: int) -> None:
    """Bring the hot keys in and re-reference them, as repeated peer requests do."""
    for key in hot:
        if cache.get(key) is None:
            cache.put(key, f"v-{key}", size)
    for _ in range(3):
        for key in hot:
            assert cache.get(key) == f"v-{key}"


def _scan(cache: Any, n: int, size: int) -> None:
    """A one-pass sequential read: every key is new and never asked for again."""
    for i in range(n):
        key = f"scan-{i}"
        assert cache.get(key) is None
        cache.put(key, i, size)


# --- scan resistance -----------------------------------------------------------


def test_scan_does_not_flush_hot_keys_from_arc() -> None:
    cache: ArcCache[str, object] = ArcCache(10 * 100)
    hot = [f"hot-{i}" for i in range(5)]
    _warm_hot_set(cache, hot, 100)
    _scan(cache, 1000, 100)
    assert all(key in cache for key in hot)
    hits = cache.hits
    for key in hot:
        assert cache.get(key) == f"v-{key}"
    assert cache.hits == hits + len(hot)


def test_scan_flushes_hot_keys_from_lru() -> None:
    # The same workload as above: the contrast is what ARC is for.
    cache: LruCache[str, object] = LruCache(10 * 100)
    hot = [f"hot-{i}" for i in range(5)]
    _warm_hot_set(cache, hot, 100)
    _scan(cache, 1000, 100)
    assert not any(key in cache for key in hot)


# --- ghost adaptation ----------------------------------------------------------


def _arc_with_one_frequent_key(capacity: int) -> ArcCache[str, int]:
    """With T2 empty and T1 full, ARC evicts from T1 without keeping a ghost
    (the paper's case IV.A), so ghost tests need something in T2 first."""
    cache: ArcCache[str, int] = ArcCache(capacity)
    cache.put("h", 0, 100)
    cache.get("h")
    return cache


def test_ghost_hit_in_b1_grows_p_and_goes_to_t2() -> None:
    cache = _arc_with_one_frequent_key(300)
    cache.put("a", 1, 100)
    cache.put("b", 1, 100)
    assert cache.put("c", 1, 100) == ["a"]  # T1 > p == 0, so T1's LRU goes
    assert "a" not in cache
    assert cache.b1_bytes == 100
    assert cache.p == 0

    evicted = cache.put("a", 2, 100)  # B1 ghost hit
    assert cache.p == 100  # one ghost's bytes, B2 being empty
    assert evicted == ["b"]
    assert cache.peek("a") == 2
    assert cache.t2_bytes == 200  # "a" came back as frequent, next to "h"
    assert cache.t1_bytes == 100


def test_t1_full_evicts_without_ghost() -> None:
    cache: ArcCache[str, int] = ArcCache(200)
    cache.put("a", 1, 100)
    cache.put("b", 1, 100)
    assert cache.put("c", 1, 100) == ["a"]
    assert cache.b1_bytes == 0  # T1 + B1 would exceed c


def test_ghost_hit_in_b1_step_scales_with_b2_over_b1() -> None:
    cache: ArcCache[str, int] = ArcCache(400)
    for key in "xyzw":
        cache.put(key, 0, 100)
        cache.get(key)
    # T2 = x y z w and T1 is empty, so each new key pushes T2's LRU into B2.
    for key, victim in zip("abc", "xyz", strict=True):
        assert cache.put(key, 0, 100) == [victim]
        if key != "c":
            cache.get(key)
    assert cache.put("d", 0, 100) == ["c"]  # T1 > p == 0: c goes to B1
    assert (cache.b1_bytes, cache.b2_bytes) == (100, 300)
    cache.put("c", 0, 100)  # B1 hit: step = 100 * B2 / B1 = 300, not 100
    assert cache.p == 300


def test_ghost_hit_in_b2_shrinks_p() -> None:
    cache = _arc_with_one_frequent_key(300)
    cache.put("a", 1, 100)
    cache.put("b", 1, 100)
    cache.put("c", 1, 100)  # a -> B1
    cache.put("a", 1, 100)  # B1 hit: p = 100, a in T2, b -> B1
    assert cache.p == 100
    cache.get("c")  # T1 empty, T2 = h a c
    assert cache.put("e", 1, 100) == ["h"]  # from T2, so h -> B2
    assert (cache.b1_bytes, cache.b2_bytes) == (100, 100)
    assert cache.put("h", 1, 100) == ["e"]  # B2 hit
    assert cache.p == 0
    assert "h" in cache


def test_b2_hit_with_t1_at_target_evicts_from_t1() -> None:
    # REPLACE's tie rule: on a B2 hit with |T1| == p, T1 gives way.
    cache: ArcCache[str, int] = ArcCache(400)
    for key in "hg":
        cache.put(key, 0, 100)
        cache.get(key)
    for key in "abcd":
        cache.put(key, 0, 100)  # a, b -> B1
    cache.put("a", 0, 100)  # B1 hit: p = 100, c -> B1
    cache.put("b", 0, 100)  # B1 hit: p = 200, T1 = d <= p, so h -> B2
    assert cache.p == 200
    assert (cache.t1_bytes, cache.b1_bytes, cache.b2_bytes) == (100, 100, 100)
    assert cache.put("h", 0, 100) == ["d"]  # p drops to 100 == T1
    assert cache.p == 100


def test_zero_size_entries_leave_no_ghosts() -> None:
    # A zero-byte ghost never counts against the byte bounds, so nothing would
    # ever trim it: keeping them would let the ghost lists grow without limit.
    cache = _arc_with_one_frequent_key(200)
    cache.put("z", 0, 0)
    cache.put("a", 0, 100)
    assert cache.put("b", 0, 100) == ["z", "a"]
    assert list(cache._b1) == ["a"]


# --- peek, replace, oversize, pop ----------------------------------------------


@pytest.mark.parametrize("cls", CACHES)
def test_peek_does_not_count_or_promote(cls: type) -> None:
    cache = cls(200)
    cache.put("a", "A", 100)
    cache.put("b", "B", 100)
    assert cache.peek("a") == "A"
    assert cache.peek("zzz") is None
    assert (cache.hits, cache.misses) == (0, 0)
    # "a" is still the least recently used, so it is the one to go.
    assert cache.put("c", "C", 100) == ["a"]


@pytest.mark.parametrize("cls", CACHES)
def test_get_does_promote(cls: type) -> None:
    cache = cls(200)
    cache.put("a", "A", 100)
    cache.put("b", "B", 100)
    assert cache.get("a") == "A"
    assert cache.get("zzz") is None
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.put("c", "C", 100) == ["b"]


def test_arc_peek_leaves_key_in_t1() -> None:
    cache: ArcCache[str, str] = ArcCache(1000)
    cache.put("a", "A", 100)
    cache.peek("a")
    assert (cache.t1_bytes, cache.t2_bytes) == (100, 0)
    cache.get("a")
    assert (cache.t1_bytes, cache.t2_bytes) == (0, 100)


@pytest.mark.parametrize("cls", CACHES)
def test_replace_updates_used_bytes_and_value(cls: type) -> None:
    cache = cls(1000)
    cache.put("a", "old", 300)
    cache.put("b", "B", 200)
    assert cache.used == 500
    assert cache.put("a", "new", 50) == []
    assert cache.used == 250
    assert len(cache) == 2
    assert cache.peek("a") == "new"
    assert cache.put("a", "bigger", 900) == ["b"]
    assert cache.used == 900
    assert cache.keys() == ["a"]


@pytest.mark.parametrize("cls", CACHES)
def test_oversize_entry_is_not_stored(cls: type) -> None:
    cache = cls(1000)
    cache.put("x", "X", 10)
    assert cache.put("big", "B", 1001) == []
    assert "big" not in cache
    assert cache.used == 10
    assert cache.keys() == ["x"]
    # Exactly the capacity fits.
    assert cache.put("full", "F", 1000) == ["x"]
    assert cache.used == 1000


@pytest.mark.parametrize("cls", CACHES)
def test_oversize_put_drops_the_old_value(cls: type) -> None:
    cache = cls(1000)
    cache.put("a", "old", 100)
    assert cache.put("a", "huge", 5000) == ["a"]
    assert "a" not in cache
    assert cache.get("a") is None
    assert cache.used == 0


@pytest.mark.parametrize("cls", CACHES)
def test_pop(cls: type) -> None:
    cache = cls(1000)
    cache.put("a", "A", 100)
    assert cache.pop("a") == "A"
    assert cache.pop("a") is None
    assert cache.used == 0
    assert len(cache) == 0


def test_arc_pop_drops_ghost() -> None:
    cache = _arc_with_one_frequent_key(200)
    cache.put("a", 1, 100)
    cache.put("b", 1, 100)  # a -> B1
    assert cache.b1_bytes == 100
    assert cache.pop("a") is None
    assert cache.b1_bytes == 0
    cache.put("a", 1, 100)  # a fresh key now, not a ghost hit
    assert cache.p == 0


@pytest.mark.parametrize("cls", CACHES)
def test_negative_sizes_rejected(cls: type) -> None:
    with pytest.raises(ValueError):
        cls(-1)
    cache = cls(10)
    with pytest.raises(ValueError):
        cache.put("a", 1, -1)
    with pytest.raises(ValueError):
        cache.resize(-1)


# --- resize ----------------------------------------------------------------------


@pytest.mark.parametrize("cls", CACHES)
def test_resize_evicts(cls: type) -> None:
    cache = cls(1000)
    for i in range(10):
        cache.put(i, i, 100)
    assert cache.resize(2000) == []
    assert len(cache) == 10
    evicted = cache.resize(350)
    assert sorted(evicted) == list(range(7))  # all were seen once: oldest go
    assert cache.used == 300
    assert cache.capacity == 350
    assert sorted(cache.keys()) == [7, 8, 9]
    assert sorted(cache.resize(0)) == [7, 8, 9]
    assert cache.used == 0
    assert len(cache) == 0
    # And it works again after growing back.
    cache.resize(500)
    assert cache.put("z", "Z", 500) == []
    assert cache.get("z") == "Z"


def test_arc_resize_keeps_ghost_bounds_and_rescales_p() -> None:
    cache: ArcCache[int, int] = ArcCache(1000)
    for i in range(5):
        cache.put(i, i, 100)
        cache.get(i)
    for i in range(10, 20):
        cache.put(i, i, 100)  # T1 holds 15..19, B1 remembers 10..14
    assert cache.b1_bytes == 500
    cache.put(10, 10, 100)  # B1 ghost hit
    assert cache.p == 100
    evicted = cache.resize(500)
    assert evicted == [16, 17, 18, 19, 0]
    assert cache.p == 50
    assert cache.used == 500
    assert cache.t1_bytes + cache.b1_bytes <= 500
    assert cache.used + cache.b1_bytes + cache.b2_bytes <= 1000
    cache.resize(1000)
    assert cache.p == 100


# --- property tests: random sequences against a model ------------------------------

KEYS = st.integers(min_value=0, max_value=11)
SIZES = st.integers(min_value=0, max_value=400)
CAPACITIES = st.integers(min_value=0, max_value=1200)


class RefLru:
    """Reference LRU, written the slow obvious way to check LruCache exactly."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[tuple[int, object, int]] = []  # LRU first

    def _find(self, key: int) -> int | None:
        for i, (k, _, _) in enumerate(self.entries):
            if k == key:
                return i
        return None

    def _evict_to(self, limit: int) -> list[int]:
        out = []
        while sum(s for _, _, s in self.entries) > limit:
            out.append(self.entries.pop(0)[0])
        return out

    def get(self, key: int) -> None:
        i = self._find(key)
        if i is not None:
            self.entries.append(self.entries.pop(i))

    def put(self, key: int, value: object, size: int) -> list[int]:
        i = self._find(key)
        was = i is not None
        if i is not None:
            self.entries.pop(i)
        if size > self.capacity:
            return [key] if was else []
        out = self._evict_to(self.capacity - size)
        self.entries.append((key, value, size))
        return out

    def pop(self, key: int) -> None:
        i = self._find(key)
        if i is not None:
            self.entries.pop(i)

    def resize(self, capacity: int) -> list[int]:
        self.capacity = capacity
        return self._evict_to(capacity)


class CacheMachine(RuleBasedStateMachine):
    """Checks the contract both classes share; subclasses add per-class checks."""

    cache_cls: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.cache: Any = None
        self.ref: RefLru | None = None
        # What must be resident: key -> (value object, size).
        self.model: dict[int, tuple[object, int]] = {}

    @initialize(capacity=CAPACITIES)
    def start(self, capacity: int) -> None:
        self.cache = self.cache_cls(capacity)

    def _drop_evicted(self, evicted: list[int]) -> None:
        assert len(evicted) == len(set(evicted)), evicted
        for key in evicted:
            assert key in self.model, f"evicted {key} that was not resident"
            del self.model[key]

    @rule(key=KEYS)
    def get(self, key: int) -> None:
        hits, misses = self.cache.hits, self.cache.misses
        got = self.cache.get(key)
        if key in self.model:
            assert got is self.model[key][0]
            assert (self.cache.hits, self.cache.misses) == (hits + 1, misses)
        else:
            assert got is None
            assert (self.cache.hits, self.cache.misses) == (hits, misses + 1)
        if self.ref is not None:
            self.ref.get(key)

    @rule(key=KEYS)
    def peek(self, key: int) -> None:
        hits, misses = self.cache.hits, self.cache.misses
        got = self.cache.peek(key)
        expected = self.model[key][0] if key in self.model else None
        assert got is expected
        assert (self.cache.hits, self.cache.misses) == (hits, misses)

    @rule(key=KEYS, size=SIZES)
    def put(self, key: int, size: int) -> None:
        value = object()  # unique, so `is` proves it is the last value put
        was_resident = key in self.model
        evicted = self.cache.put(key, value, size)
        if self.ref is not None:
            assert evicted == self.ref.put(key, value, size)
        if size > self.cache.capacity:
            assert evicted == ([key] if was_resident else [])
            self.model.pop(key, None)
            return
        assert key not in evicted
        self.model.pop(key, None)
        self._drop_evicted(evicted)
        self.model[key] = (value, size)

    @rule(key=KEYS)
    def pop(self, key: int) -> None:
        got = self.cache.pop(key)
        old = self.model.pop(key, None)
        assert got is (old[0] if old is not None else None)
        if self.ref is not None:
            self.ref.pop(key)

    @rule(capacity=CAPACITIES)
    def resize(self, capacity: int) -> None:
        evicted = self.cache.resize(capacity)
        if self.ref is not None:
            assert evicted == self.ref.resize(capacity)
        assert self.cache.capacity == capacity
        self._drop_evicted(evicted)

    @invariant()
    def consistent(self) -> None:
        if self.cache is None:
            return
        cache = self.cache
        assert cache.used <= cache.capacity
        assert cache.used == sum(size for _, size in self.model.values())
        keys = cache.keys()
        assert len(keys) == len(set(keys))
        assert set(keys) == set(self.model)
        assert len(cache) == len(self.model)
        for key in range(12):
            assert (key in cache) == (key in self.model)
        if self.ref is not None:
            assert keys == [k for k, _, _ in self.ref.entries]


class LruMachine(CacheMachine):
    cache_cls = LruCache

    @initialize(capacity=CAPACITIES)
    def start(self, capacity: int) -> None:
        super().start(capacity)
        self.ref = RefLru(capacity)


class ArcMachine(CacheMachine):
    cache_cls = ArcCache

    @invariant()
    def arc_bounds(self) -> None:
        if self.cache is None:
            return
        c = self.cache
        cap = c.capacity
        assert 0 <= c.p <= cap
        assert c.t1_bytes + c.t2_bytes == c.used
        assert c.t1_bytes + c.b1_bytes <= cap
        assert c.t1_bytes + c.t2_bytes + c.b1_bytes + c.b2_bytes <= 2 * cap
        # White-box: the byte counters match the lists, and the four lists are
        # disjoint, so no key is both resident and a ghost.
        assert c.t1_bytes == sum(s for _, s in c._t1.values())
        assert c.t2_bytes == sum(s for _, s in c._t2.values())
        assert c.b1_bytes == sum(c._b1.values())
        assert c.b2_bytes == sum(c._b2.values())
        lists = [set(c._t1), set(c._t2), set(c._b1), set(c._b2)]
        assert sum(map(len, lists)) == len(set().union(*lists))


_MACHINE_SETTINGS = settings(max_examples=100, stateful_step_count=60, deadline=None)
TestLruMachine = LruMachine.TestCase
TestLruMachine.settings = _MACHINE_SETTINGS
TestArcMachine = ArcMachine.TestCase
TestArcMachine.settings = _MACHINE_SETTINGS


# --- ARC with equal sizes is the paper's ARC ------------------------------------------


class PaperArc:
    """ARC(c) as in Fig. 4 of Megiddo & Modha, FAST '03, counting unit pages."""

    def __init__(self, c: int) -> None:
        self.c = c
        self.p = 0.0
        self.t1: list[int] = []
        self.t2: list[int] = []
        self.b1: list[int] = []
        self.b2: list[int] = []

    def _replace(self, x: int) -> None:
        if self.t1 and ((x in self.b2 and len(self.t1) == self.p) or len(self.t1) > self.p):
            self.b1.append(self.t1.pop(0))
        else:
            self.b2.append(self.t2.pop(0))

    def request(self, x: int) -> bool:
        c = self.c
        if x in self.t1 or x in self.t2:  # case I
            (self.t1 if x in self.t1 else self.t2).remove(x)
            self.t2.append(x)
            return True
        if x in self.b1:  # case II
            d1 = 1.0 if len(self.b1) >= len(self.b2) else len(self.b2) / len(self.b1)
            self.p = min(self.p + d1, c)
            self._replace(x)
            self.b1.remove(x)
            self.t2.append(x)
            return False
        if x in self.b2:  # case III
            d2 = 1.0 if len(self.b2) >= len(self.b1) else len(self.b1) / len(self.b2)
            self.p = max(self.p - d2, 0.0)
            self._replace(x)
            self.b2.remove(x)
            self.t2.append(x)
            return False
        # case IV
        if len(self.t1) + len(self.b1) == c:
            if len(self.t1) < c:
                self.b1.pop(0)
                self._replace(x)
            else:
                self.t1.pop(0)
        else:
            total = len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2)
            if total >= c:
                if total == 2 * c:
                    self.b2.pop(0)
                self._replace(x)
        self.t1.append(x)
        return False


@settings(max_examples=300, deadline=None)
@given(
    c=st.integers(min_value=1, max_value=6),
    unit=st.sampled_from([1, 4096]),  # powers of two keep the float p exact when scaled
    requests=st.lists(st.integers(min_value=0, max_value=14), max_size=150),
)
def test_equal_sizes_match_the_paper(c: int, unit: int, requests: list[int]) -> None:
    ref = PaperArc(c)
    cache: ArcCache[int, int] = ArcCache(c * unit)
    for x in requests:
        hit = cache.get(x) is not None
        if not hit:
            cache.put(x, x, unit)
        assert hit == ref.request(x)
        assert list(cache._t1) == ref.t1
        assert list(cache._t2) == ref.t2
        assert list(cache._b1) == ref.b1
        assert list(cache._b2) == ref.b2
        assert cache.p == ref.p * unit
