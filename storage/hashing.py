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
import functools
import hashlib
import operator
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar, cast

from blake3 import blake3

from .layout import zero_views
from .merkle import BLOCK_SIZE, leaf_count, merkle_root
from .metainfo import V2Piece

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


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
    for z in zero_views(n):
        h.update(z)


def sha256_of(views: Sequence[Buffer]) -> bytes:
    if len(views) == 1:
        return hashlib.sha256(views[0]).digest()
    h = hashlib.sha256()
    for v in views:
        h.update(v)
    return h.digest()


FINGERPRINT_BYTES = 16
NO_FINGERPRINT = bytes(FINGERPRINT_BYTES)
HASH_PART = 1 << 20  # what is read back and hashed at a time, when bytes must be read back
# Which bytes a fingerprint is taken of, as the state records say: 2, the piece's stored
# bytes alone (its pads and symlinks left out); before it, every byte, pads as zeros.
FINGERPRINT_FORM = 2

Pads = Sequence[tuple[int, int]]  # a piece's unstored ranges, in order (Layout.pads)


def feed_stored(h: Any, part: Buffer, at: int, pads: Pads) -> None:
    """Feed ``h`` the bytes of ``part`` (bytes ``at`` on of a piece) outside ``pads``."""
    mv = part if type(part) is memoryview else memoryview(part)
    end = at + mv.nbytes
    pos = at
    for s, e in pads:
        if e <= pos:
            continue
        if s >= end:
            break
        if s > pos:
            h.update(mv[pos - at : s - at])
        pos = max(pos, e)
        if pos >= end:
            return
    if pos < end:
        h.update(mv[pos - at :] if pos > at else mv)


def fingerprint(views: Sequence[Buffer], pads: Pads = ()) -> bytes:
    """BLAKE3 of a piece's stored bytes (``pads``, the ranges never stored, left out),
    cut to 128 bits.

    It stands in for the torrent's own hashes when data is rechecked: only ever taken
    of bytes that passed them, so a match proves the piece is still what was verified.
    128 bits keep second preimages out of reach and the state file small. Pads are
    zeros by definition, where the torrent says: hashing them proved nothing, and a
    small file's piece in a v2 torrent of 16 MiB pieces cost a 16 MiB hash.
    """
    h = blake3()
    if not pads:
        for v in views:
            h.update(v)
        return h.digest(FINGERPRINT_BYTES)
    at = 0
    for v in views:
        n = memoryview(v).nbytes
        feed_stored(h, v, at, pads)
        at += n
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
    of data that has one does not need it; it is of the bytes outside ``pads``.
    """

    __slots__ = ("_fp", "_leaves", "_pads", "_pos", "_sha1", "v2")

    def __init__(self, want_v1: bool, v2: V2Piece | None, want_fingerprint: bool,
                 pads: Pads = ()) -> None:
        self._sha1 = hashlib.sha1() if want_v1 else None
        self._fp = blake3() if want_fingerprint else None
        self._pads = pads
        self.v2 = v2
        self._leaves: list[bytes] = []
        self._pos = 0

    def update(self, part: memoryview) -> None:
        if self._sha1 is not None:
            self._sha1.update(part)
        if self._fp is not None:
            if self._pads:
                feed_stored(self._fp, part, self._pos, self._pads)
            else:
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


# Separate ranges of a piece's bytes allowed beyond its blocks, pads and files: writes
# of any size, in any order, from a few writers at once (a kilobyte at a time, the even
# ones first) leave no more, and each range is held in memory outside any budget.
SPARE_SPANS = 64


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

    def count_after(self, start: int, end: int) -> int:
        """How many ranges there would be once [start, end) is added."""
        spans = self.spans
        if spans and spans[-1][1] == start:
            return len(spans)
        i = bisect.bisect_left(spans, start, key=_END)
        j = bisect.bisect_right(spans, end, key=_START)
        return len(spans) - (j - i) + 1

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


def _feed(bufs: Sequence[Buffer], *hashers: Any) -> None:
    for v in bufs:
        for h in hashers:
            if h is not None:
                h.update(v)


class Aside:
    """Threads that take part of a lane's hashing (:meth:`PieceHasher.add_beside`).

    A job not started when its lane gets to it is done by the lane itself: with more
    lanes than spare cores, a lane never waits in a queue for work it can do.
    """

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pieced-aside")

    def start(self, fn: Callable[[], T]) -> Future[T]:
        return self._pool.submit(fn)

    @staticmethod
    def finish(job: Future[T], fn: Callable[[], T]) -> T:
        """The job's result, done here if no thread has taken it yet."""
        if job.cancel():
            return fn()
        return job.result()

    @staticmethod
    def drop(job: Future[Any]) -> None:
        """Cancel the job, or wait until it is done (it reads the caller's buffers)."""
        if not job.cancel():
            job.exception()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Leaves:
    """The v2 leaf hashes of a piece whose blocks are arriving, by leaf index: 33 bytes a
    leaf, in two arrays made at the first one (a dict of digests took about 130: 530 KiB
    for a 64 MiB piece, for each of up to ``max_partial_pieces`` pieces in progress)."""

    __slots__ = ("_digests", "_have", "_n")

    def __init__(self, n: int) -> None:
        self._n = n
        self._digests = bytearray()  # (made at the first leaf)
        self._have = bytearray()

    def __setitem__(self, k: int, digest: bytes) -> None:
        if not self._have:
            self._digests, self._have = bytearray(32 * self._n), bytearray(self._n)
        self._digests[32 * k : 32 * k + 32] = digest
        self._have[k] = 1

    def get(self, k: int) -> bytes | None:
        return bytes(self._digests[32 * k : 32 * k + 32]) if self._have and self._have[k] else None

    def pop(self, k: int, default: None = None) -> None:
        if self._have:
            self._have[k] = 0

    def update(self, other: dict[int, bytes]) -> None:
        for k, digest in other.items():
            self[k] = digest


class PieceHasher:
    """Hash state of one piece whose blocks are arriving.

    The in-order prefix feeds SHA-1 (v1) and the BLAKE3 fingerprint; v2 leaves are
    hashed as each block lands, in any order. ``pads`` are the piece's pad ranges:
    they count as received zeros (for SHA-1; the fingerprint leaves them out); the
    caller feeds only the stored bytes of a block that runs into a pad (and checks its
    pad bytes are zeros). A write over bytes
    already hashed (a duplicate block) invalidates what it touches, so the result is
    always the hash of the latest data.
    """

    __slots__ = (
        "_fp", "_pads", "_pos", "_sha1", "_want_v1", "bad_pads", "leaves", "max_spans",
        "received", "size", "v2",
    )

    def __init__(
        self, size: int, want_v1: bool, v2: V2Piece | None, pads: Sequence[tuple[int, int]] = (),
        files: int = 1,
    ) -> None:
        self.size = size
        self.v2 = v2
        self._want_v1 = want_v1
        self.leaves = Leaves(leaf_count(v2.data_length) if v2 is not None else 0)
        # Where the latest block to cover a pad had non-zero bytes (from its first such
        # byte to its last): the piece fails while any is left; a block sent again with
        # zeros there takes its range off.
        self.bad_pads = Intervals()
        self.received = Intervals()
        self._pads = list(pads)
        # Ranges the received bytes may lie in: one a block, a pad and a file (of the
        # ``files`` the piece holds bytes of), and SPARE_SPANS.
        self.max_spans = -(-size // BLOCK_SIZE) + len(self._pads) + files + SPARE_SPANS
        for s, e in self._pads:
            self.received.add(s, e)
        self._restart_prefix()

    @property
    def complete(self) -> bool:
        # (``received.covers(0, size)``: its spans are merged, so one span or none)
        spans = self.received.spans
        return len(spans) == 1 and spans[0][0] == 0 and spans[0][1] >= self.size

    @property
    def empty(self) -> bool:
        """Nothing received but the pads (which count as received from the start)."""
        return (sum(e - s for s, e in self.received.spans)
                == sum(e - s for s, e in self._pads))

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
            # (_feed written out: this runs once a block, and the call is a tenth of it)
            sha1, fp = self._sha1, self._fp
            for v in bufs:
                if sha1 is not None:
                    sha1.update(v)
                fp.update(v)
            self._pos = end
            if self._pads:
                self._advance_over_pads()
        if self.v2 is not None:
            self._add_leaves(begin, end, bufs)

    def forget(self, begin: int, end: int) -> None:
        """A write of [begin, end) failed: part of it may have reached the file (a disk
        that filled up half-way), over bytes this state counted. What the file holds
        there is unknown, so none of it counts as received (the range is to be sent
        again) and what was hashed of it is stale: kept, a piece completed by the other
        blocks passed on the old bytes while the file held the new ones."""
        self.received.remove(begin, end)
        for s, e in self._pads:  # (never written: they stay received)
            if s < end and e > begin:
                self.received.add(max(s, begin), min(e, end))
        if begin < self._pos:
            self._restart_prefix()
        if self.v2 is not None:
            for k in range(begin // BLOCK_SIZE, -(-min(end, self.v2.data_length) // BLOCK_SIZE)):
                self.leaves.pop(k, None)

    def _add_leaves(self, begin: int, end: int, bufs: Sequence[Buffer]) -> None:
        for k in self._leaves_of(begin, end, bufs, self.leaves):
            self.leaves.pop(k, None)

    def _leaves_apart(
        self, begin: int, end: int, bufs: Sequence[Buffer]
    ) -> tuple[dict[int, bytes], Sequence[int]]:
        """:meth:`_leaves_of` into a dict of its own: another thread's share."""
        got: dict[int, bytes] = {}
        return got, self._leaves_of(begin, end, bufs, got)

    def _take_leaves(self, got: dict[int, bytes], gone: Sequence[int]) -> None:
        self.leaves.update(got)
        for k in gone:
            self.leaves.pop(k, None)

    def _leaves_of(
        self, begin: int, end: int, bufs: Sequence[Buffer], into: dict[int, bytes] | Leaves
    ) -> Sequence[int]:
        """Hash into ``into`` the leaves a block of [begin, end) makes whole; return
        those it touches in part (whose hash is stale from now on). Changes nothing of
        the hasher's: another thread may call it with a dict of its own."""
        assert self.v2 is not None
        limit = self.v2.data_length
        n = end - begin
        if len(bufs) == 1 and begin % BLOCK_SIZE == 0 and end <= limit and (
            n == BLOCK_SIZE or (end == limit and n < BLOCK_SIZE)
        ):
            # One aligned leaf in one buffer (the usual block): hash it as it is.
            into[begin // BLOCK_SIZE] = hashlib.sha256(bufs[0]).digest()
            return ()
        gone: list[int] = []
        first = begin // BLOCK_SIZE
        last = min(end, limit)
        k = first
        while k * BLOCK_SIZE < last:
            lo = k * BLOCK_SIZE
            hi = min(lo + BLOCK_SIZE, limit)
            if lo >= begin and hi <= end:
                into[k] = sha256_of(sub_views(bufs, lo - begin, hi - begin))
            else:
                gone.append(k)
            k += 1
        return gone

    def add_beside(
        self, begin: int, bufs: Sequence[Buffer], length: int, write: Callable[[], None],
        aside: Aside,
    ) -> None:
        """``write()`` (the block's write), then ``add``: but the hashing shared between
        this thread and one of ``aside``'s, the write done meanwhile. For a large block
        on a machine with cores to spare, where one thread doing it all would take the
        sum of them (a hybrid's SHA-1, SHA-256 leaves and fingerprint, each about a
        millisecond a MiB). The other thread hashes into copies, taken in only once the
        write succeeded: when ``write`` raises, nothing of the block is accounted for,
        as when ``add`` is not called. The slices are no longer read when it returns."""
        end = begin + length
        if begin < self._pos:  # written again over what was hashed: the plain way
            write()
            self.add(begin, bufs, length)
            return
        in_order = begin == self._pos
        sha1, fp, fp_there = self._sha1, self._fp, None
        v1_there = in_order and sha1 is not None
        there: Callable[[], Any]
        if v1_there:
            assert sha1 is not None
            # SHA-1 over there (with the fingerprint for a hybrid, whose leaves are
            # hashed here); here the write and the rest.
            sha1 = sha1.copy()
            fp_there = fp.copy() if self.v2 is not None else None
            there = functools.partial(_feed, bufs, sha1, fp_there)
        elif self.v2 is not None:
            there = functools.partial(self._leaves_apart, begin, end, bufs)
        else:  # (a v1 block out of order: nothing to hash until the prefix reaches it)
            write()
            self.add(begin, bufs, length)
            return
        job = aside.start(there)
        try:
            write()
        except BaseException:
            aside.drop(job)
            raise
        try:  # the write succeeded: the block counts
            # Here: the fingerprint of a v1 block, or a hybrid's leaves beside its SHA-1.
            if v1_there:
                if self.v2 is not None:
                    self._add_leaves(begin, end, bufs)
                else:
                    _feed(bufs, fp)
            elif in_order:  # v2 only: the leaves over there, the fingerprint here
                _feed(bufs, fp)
        finally:
            got = aside.finish(job, there)  # (the slices are not read after this)
        if v1_there:
            self._sha1 = sha1
            if fp_there is not None:
                self._fp = fp_there
        else:
            leaves, gone = cast(tuple[dict[int, bytes], Sequence[int]], got)
            self._take_leaves(leaves, gone)
        self.received.add(begin, end)
        if in_order:
            self._pos = end
            self._advance_over_pads()

    def _advance_over_pads(self) -> None:
        for s, e in self._pads:
            if s == self._pos:
                if self._sha1 is not None:
                    feed_zeros(self._sha1, e - s)
                self._pos = e

    def finish(
        self, fetch: Callable[[int, int], Buffer]
    ) -> tuple[bytes | None, bytes | None, bytes]:
        """(SHA-1 digest, v2 root, fingerprint) of the complete piece.

        ``fetch(begin, length)`` supplies bytes this state did not see in order
        (blocks that arrived out of order, or partial leaves): normally not called.
        """
        d1 = d2 = None
        for at in range(self._pos, self.size, HASH_PART):
            # (a part at a time: the rest of a 64 MiB piece whose first block came last
            # in one buffer, for each piece completing at once, was memory past every budget)
            rest = fetch(at, min(HASH_PART, self.size - at))
            if self._sha1 is not None:
                self._sha1.update(rest)
            if self._pads:
                feed_stored(self._fp, rest, at, self._pads)
            else:
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
