"""Counters the storage layer owns, cheap enough for the hot path.

Kept as plain numbers under one lock so the engine has no dependency on
prometheus-client; the daemon's /metrics reads :meth:`Stats.snapshot`.
"""

from __future__ import annotations

import bisect
import errno as _errno
import threading
import time
from typing import Any

# Upper bounds in seconds, as prometheus-client's default histogram buckets.
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Histogram:
    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.total = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value
        self.total += 1

    def snapshot(self) -> dict[str, Any]:
        # Integers only (microseconds): the snapshot travels over bencode as it is.
        return {
            "buckets_us": [round(b * 1e6) for b in LATENCY_BUCKETS],
            "counts": list(self.counts),
            "sum_us": round(self.sum * 1e6),
            "count": self.total,
        }


COUNTERS = (
    "bytes_written",
    "bytes_read",
    "blocks_written",
    "blocks_written_through",
    "duplicate_blocks",
    "cache_hits",
    "cache_misses",
    "pieces_verified",
    "pieces_failed",
    "syncs",
    "fingerprint_hits",
    "recheck_verified",
    "recheck_failed",
    "pieces_parked",
)


class _Timed:
    __slots__ = ("_op", "_start", "_stats")

    def __init__(self, stats: Stats, op: str) -> None:
        self._stats, self._op = stats, op

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._stats.observe(self._op, time.perf_counter() - self._start)


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.errors: dict[str, int] = {}
        self.latency: dict[str, Histogram] = {
            "read": Histogram(), "write": Histogram(), "sync": Histogram(), "hash": Histogram(),
        }
        self._write_latency = self.latency["write"]

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def error(self, errno: int | None, kind: str = "io_error") -> None:
        """Count an error by kind, and by errno name for I/O errors (ENOSPC, EIO...)."""
        label = _errno.errorcode.get(errno, kind) if errno is not None else kind
        with self._lock:
            self.errors[label] = self.errors.get(label, 0) + 1

    def wrote(self, elapsed: float, nbytes: int, blocks: int, through: int) -> None:
        """Everything one write changes, under one lock acquisition (it runs per block)."""
        c = self.counters
        h = self._write_latency
        with self._lock:
            h.counts[bisect.bisect_left(LATENCY_BUCKETS, elapsed)] += 1  # (observe, inlined)
            h.sum += elapsed
            h.total += 1
            c["bytes_written"] += nbytes
            c["blocks_written"] += blocks
            c["blocks_written_through"] += through

    def timed(self, op: str) -> _Timed:
        """``with stats.timed(op):`` the block's seconds go to ``op``'s histogram (a
        class, not a generator: it runs a few times per piece)."""
        return _Timed(self, op)

    def observe(self, op: str, elapsed: float) -> None:
        with self._lock:
            self.latency[op].observe(elapsed)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self.counters,
                "errors": dict(self.errors),
                "latency": {k: h.snapshot() for k, h in self.latency.items()},
            }
