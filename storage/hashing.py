"""Piece hashing: SHA-1 (v1), SHA-256 Merkle (v2), and the worker pool that runs them.

hashlib releases the GIL for buffers over 2 KiB, so plain threads hash on every
core; a thread pool avoids the pickling and copying a process pool would need.

Two ways a piece gets hashed:
- :class:`PieceHasher` follows a piece while its blocks arrive: SHA-1 over the
  in-order prefix and one SHA-256 leaf per 16 KiB block as each block lands (in
  any order), so the completing block costs almost nothing and nothing is read back
  in the common case;
- :class:`PieceCheck` (and :func:`check_piece`) hashes a whole piece already in memory
  or mapped, fed in order (verify, recheck, explicit ``hash_piece``).
"""

from __future__ import annotations

import bisect
import hashlib
import operator
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from blake3 import blake3

from .merkle import BLOCK_SIZE, leaf_count, merkle_root
from .metainfo import V2Piece

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")
_ZEROS = bytes(256 * 1024)


def sub_views(bufs: Sequence[Buffer], start: int, end: int) -> list[memoryview]:
    """Views of bytes [start, end) of the logical concatenation of ``bufs``, no copy."""
    out: list[memoryview] = []
    pos = 0
    for b in bufs:
        mv = b if isinstance(b, memoryview) else memoryview(b)
        n = mv.nbytes
        lo, hi = max(start - pos, 0), min(end - pos, n)
        if lo < hi:
            out.append(mv[lo:hi])
        pos += n
        if pos >= end:
            break
    return out


def feed_zeros(h: Any, n: int) -> None:
    while n > 0:
        k = min(n, len(_ZEROS))
        h.update(_ZEROS[:k] if k < len(_ZEROS) else _ZEROS)
        n -= k


def sha256_of(views: Sequence[Buffer]) -> bytes:
    if len(views) == 1:
        return hashlib.sha256(views[0]).digest()
    h = hashlib.sha256()
    for v in views:
        h.update(v)
    return h.digest()


FINGERPRINT_BYTES = 16
NO_FINGERPRINT = bytes(FINGERPRINT_BYTES)


def fingerprint(views: Sequence[Buffer]) -> bytes:
    """BLAKE3 of a piece's bytes (pads as zeros), cut to 128 bits.

    It stands in for the torrent's own hashes when data is rechecked: only ever taken
    of bytes that passed them, so a match proves the piece is still what was verified.
    128 bits keep second preimages out of reach and the state file small.
    """
    h = blake3()
    for v in views:
        h.update(v)
    return h.digest(FINGERPRINT_BYTES)


def v2_root(data: Buffer, v2: V2Piece) -> bytes:
    """Merkle root of a v2 piece's data (its file's bytes only, no pad)."""
    check = PieceCheck(False, v2, False)
    check.update(memoryview(data)[: v2.data_length])
    root = check.result()[1]
    assert root is not None
    return root


class PieceCheck:
    """The hashes of a whole piece fed in order, in one part or several (a piece larger
    than a recheck's read buffer is read and hashed a part at a time).

    Parts are consecutive; up to the end of the v2 data, each part but the last holds
    whole 16 KiB leaves. The fingerprint is taken only when asked for: a full recheck
    of data that has one does not need it.
    """

    __slots__ = ("_fp", "_leaves", "_pos", "_sha1", "v2")

    def __init__(self, want_v1: bool, v2: V2Piece | None, want_fingerprint: bool) -> None:
        self._sha1 = hashlib.sha1() if want_v1 else None
        self._fp = blake3() if want_fingerprint else None
        self.v2 = v2
        self._leaves: list[bytes] = []
        self._pos = 0

    def update(self, part: memoryview) -> None:
        if self._sha1 is not None:
            self._sha1.update(part)
        if self._fp is not None:
            self._fp.update(part)
        n = part.nbytes
        v2 = self.v2
        if v2 is not None and self._pos < v2.data_length:
            assert self._pos % BLOCK_SIZE == 0, "parts before the last are whole leaves"
            end = min(n, v2.data_length - self._pos)
            sha = hashlib.sha256
            self._leaves += [sha(part[i : min(i + BLOCK_SIZE, end)]).digest()
                             for i in range(0, end, BLOCK_SIZE)]
        self._pos += n

    def result(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(SHA-1 digest, v2 root, fingerprint): None for what was not asked for."""
        d1 = self._sha1.digest() if self._sha1 is not None else None
        d2 = merkle_root(self._leaves, self.v2.width) if self.v2 is not None else None
        fp = self._fp.digest(FINGERPRINT_BYTES) if self._fp is not None else None
        return d1, d2, fp


def check_piece(
    views: Sequence[Buffer], v1_expected: bytes | None, v2: V2Piece | None
) -> tuple[bool | None, bool | None]:
    """(v1 ok, v2 ok) for a whole piece given as consecutive views (None: no such hash).

    The v2 part of a piece always lies in one file, so it is the first view.
    """
    if v2 is not None and memoryview(views[0]).nbytes < v2.data_length:
        views = [b"".join(views)]
    check = PieceCheck(v1_expected is not None, v2, False)
    for v in views:
        check.update(memoryview(v))
    d1, d2, _ = check.result()
    return (d1 == v1_expected if v1_expected is not None else None,
            d2 == v2.expected if v2 is not None else None)


class Intervals:
    """Sorted, merged [start, end) ranges: which bytes of a piece have arrived. Found by
    bisection: a client writing a piece a byte here and a byte there makes thousands."""

    __slots__ = ("spans",)

    def __init__(self) -> None:
        self.spans: list[list[int]] = []

    def add(self, start: int, end: int) -> None:
        spans = self.spans
        if spans and spans[-1][1] == start:
            # The usual case, the next block in order: the last span grows, and nothing
            # follows it that could need merging.
            spans[-1][1] = end
            return
        i = bisect.bisect_left(spans, start, key=_END)  # the first that ends at or after it
        j = bisect.bisect_right(spans, end, key=_START)  # past the last that starts by its end
        if i < j:
            start = min(start, spans[i][0])
            end = max(end, spans[j - 1][1])
        spans[i:j] = [[start, end]]

    def covers(self, start: int, end: int) -> bool:
        spans = self.spans
        if len(spans) == 1:
            return spans[0][0] <= start and end <= spans[0][1]
        i = bisect.bisect_right(spans, start, key=_START) - 1
        return i >= 0 and spans[i][1] >= end

    def remove(self, start: int, end: int) -> None:
        spans = self.spans
        i = bisect.bisect_right(spans, start, key=_END)  # the first that ends past it
        j = bisect.bisect_left(spans, end, key=_START)  # the first that starts at its end
        if i >= j:
            return
        left = [[spans[i][0], start]] if spans[i][0] < start else []
        right = [[end, spans[j - 1][1]]] if spans[j - 1][1] > end else []
        spans[i:j] = left + right


_START = operator.itemgetter(0)
_END = operator.itemgetter(1)


class PieceHasher:
    """Hash state of one piece whose blocks are arriving.

    The in-order prefix feeds SHA-1 (v1) and the BLAKE3 fingerprint; v2 leaves are
    hashed as each block lands, in any order. ``pads`` are the piece's pad ranges:
    they count as received zeros; the caller feeds only the stored bytes of a block
    that runs into a pad (and checks its pad bytes are zeros). A write over bytes
    already hashed (a duplicate block) invalidates what it touches, so the result is
    always the hash of the latest data.
    """

    __slots__ = (
        "_fp", "_pads", "_pos", "_sha1", "_want_v1", "bad_pads", "leaves", "received", "size", "v2",
    )

    def __init__(
        self, size: int, want_v1: bool, v2: V2Piece | None, pads: Sequence[tuple[int, int]] = ()
    ) -> None:
        self.size = size
        self.v2 = v2
        self._want_v1 = want_v1
        self.leaves: dict[int, bytes] = {}
        # Where the latest block to cover a pad had non-zero bytes (from its first such
        # byte to its last): the piece fails while any is left; a block sent again with
        # zeros there takes its range off.
        self.bad_pads = Intervals()
        self.received = Intervals()
        self._pads = list(pads)
        for s, e in self._pads:
            self.received.add(s, e)
        self._restart_prefix()

    @property
    def complete(self) -> bool:
        return self.received.covers(0, self.size)

    def _restart_prefix(self) -> None:
        self._sha1 = hashlib.sha1() if self._want_v1 else None
        self._fp = blake3()
        self._pos = 0
        self._advance_over_pads()

    def add(self, begin: int, bufs: Sequence[Buffer], length: int | None = None) -> None:
        """Account for a block written at ``begin`` (given as one or more slices)."""
        if length is None:
            length = sum(memoryview(b).nbytes for b in bufs)
        end = begin + length
        self.received.add(begin, end)
        if begin < self._pos:
            self._restart_prefix()
        if begin == self._pos:
            sha1, fp = self._sha1, self._fp
            for v in bufs:
                if sha1 is not None:
                    sha1.update(v)
                fp.update(v)
            self._pos = end
            self._advance_over_pads()
        if self.v2 is not None:
            self._add_leaves(begin, end, bufs)

    def _add_leaves(self, begin: int, end: int, bufs: Sequence[Buffer]) -> None:
        assert self.v2 is not None
        limit = self.v2.data_length
        n = end - begin
        if len(bufs) == 1 and begin % BLOCK_SIZE == 0 and end <= limit and (
            n == BLOCK_SIZE or (end == limit and n < BLOCK_SIZE)
        ):
            # One aligned leaf in one buffer (the usual block): hash it as it is.
            self.leaves[begin // BLOCK_SIZE] = hashlib.sha256(bufs[0]).digest()
            return
        first = begin // BLOCK_SIZE
        last = min(end, limit)
        k = first
        while k * BLOCK_SIZE < last:
            lo = k * BLOCK_SIZE
            hi = min(lo + BLOCK_SIZE, limit)
            if lo >= begin and hi <= end:
                self.leaves[k] = sha256_of(sub_views(bufs, lo - begin, hi - begin))
            else:
                self.leaves.pop(k, None)
            k += 1

    def _advance_over_pads(self) -> None:
        for s, e in self._pads:
            if s == self._pos:
                if self._sha1 is not None:
                    feed_zeros(self._sha1, e - s)
                feed_zeros(self._fp, e - s)
                self._pos = e

    def finish(
        self, fetch: Callable[[int, int], Buffer]
    ) -> tuple[bytes | None, bytes | None, bytes]:
        """(SHA-1 digest, v2 root, fingerprint) of the complete piece.

        ``fetch(begin, length)`` supplies bytes this state did not see in order
        (blocks that arrived out of order, or partial leaves): normally not called.
        """
        d1 = d2 = None
        if self._pos < self.size:
            rest = fetch(self._pos, self.size - self._pos)
            if self._sha1 is not None:
                self._sha1.update(rest)
            self._fp.update(rest)
        if self._sha1 is not None:
            d1 = self._sha1.digest()
        fp = self._fp.digest(FINGERPRINT_BYTES)
        if self.v2 is not None:
            n = leaf_count(self.v2.data_length)
            leaves = []
            for k in range(n):
                leaf = self.leaves.get(k)
                if leaf is None:
                    lo = k * BLOCK_SIZE
                    hi = min(lo + BLOCK_SIZE, self.v2.data_length)
                    leaf = hashlib.sha256(fetch(lo, hi - lo)).digest()
                leaves.append(leaf)
            d2 = merkle_root(leaves, self.v2.width)
        return d1, d2, fp


class HashPool:
    """The hashing workers: one thread per core unless told otherwise.

    Tracks queue depth and latency, which /metrics reports; the daemon's and the
    offline verifier's hashing both go through one of these.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pieced-hash")
        self._lock = threading.Lock()
        self.queued = 0
        self.jobs = 0
        self.seconds = 0.0

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            self.queued += 1
        start = time.perf_counter()

        def run() -> T:
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self.queued -= 1
                    self.jobs += 1
                    self.seconds += time.perf_counter() - start

        return self._pool.submit(run)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
