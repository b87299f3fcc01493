"""Hit ratio of ArcCache against LruCache on a seeder-like read workload.

Reads of a popular torrent are skewed: a few pieces are wanted by many peers
(Zipf-distributed piece indices), while now and then one peer sweeps a different
range of pieces once, in order (a full download, a recheck). The sweep is what
should separate the two caches: LRU lets it push the hot pieces out, ARC keeps
it in T1. Both caches see the same trace; each request is get(), and on a miss
put() of the piece, as the storage read path does.

Prints one JSON object to stdout. Pure stdlib and seeded, so two runs with the
same flags give the same ratios (only ``elapsed_s`` varies).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import random
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cache_module() -> ModuleType:
    """The installed package if there is one, else the checkout this file is in."""
    try:
        return importlib.import_module("pieced.storage.cache")
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO_ROOT))
        return importlib.import_module("storage.cache")


def make_trace(
    rng: random.Random, requests: int, pieces: int, zipf_s: float, scan_fraction: float
) -> list[int]:
    """Piece indices to read. 0..pieces-1 is the Zipf set. With probability
    ``scan_fraction`` a request is instead the next piece of one sequential scan
    over pieces ``pieces``, ``pieces + 1``, ...: read exactly once, never a hit,
    interleaved with the hot reads as a peer's sweep is with everyone else's."""
    # Rank r (1-based) has weight r**-s; shuffle which piece gets which rank so
    # the hot pieces are spread over the torrent rather than at its start.
    cum_weights = list(itertools.accumulate(r**-zipf_s for r in range(1, pieces + 1)))
    by_rank = list(range(pieces))
    rng.shuffle(by_rank)
    ranks = rng.choices(range(pieces), cum_weights=cum_weights, k=requests)
    next_scan = itertools.count(pieces)
    return [next(next_scan) if rng.random() < scan_fraction else by_rank[rank] for rank in ranks]


def run(cache: Any, trace: list[int], pieces: int, piece_size: int) -> dict[str, float]:
    get, put = cache.get, cache.put
    hot_requests = hot_hits = 0
    for piece in trace:
        hit = get(piece) is not None
        if piece < pieces:
            hot_requests += 1
            hot_hits += hit
        if not hit:
            put(piece, piece, piece_size)
    total = cache.hits + cache.misses
    return {
        "hit_ratio": round(cache.hits / total, 4) if total else 0.0,
        "hot_hit_ratio": round(hot_hits / hot_requests, 4) if hot_requests else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300_000)
    ap.add_argument("--pieces", type=int, default=20_000, help="pieces in the Zipf set")
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument(
        "--scan-fraction",
        type=float,
        default=0.2,
        help="share of requests that belong to one-pass sequential scans",
    )
    ap.add_argument(
        "--capacity-fraction",
        type=float,
        action="append",
        help="cache size as a fraction of the Zipf set's bytes; repeatable "
        "(default: 0.005 0.01 0.02 0.05 0.1 0.2)",
    )
    ap.add_argument("--piece-size", type=int, default=256 * 1024)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if not 0.0 <= args.scan_fraction < 1.0:
        ap.error("--scan-fraction must be in [0, 1)")
    fractions = args.capacity_fraction or [0.005, 0.01, 0.02, 0.05, 0.1, 0.2]

    mod = _cache_module()
    started = time.perf_counter()
    trace = make_trace(
        random.Random(args.seed), args.requests, args.pieces, args.zipf_s, args.scan_fraction
    )
    scans = sum(1 for piece in trace if piece >= args.pieces)
    working_set = args.pieces * args.piece_size

    results = []
    for fraction in fractions:
        capacity = int(working_set * fraction)
        arc = mod.ArcCache(capacity)
        lru = mod.LruCache(capacity)
        arc_stats = run(arc, trace, args.pieces, args.piece_size)
        arc_stats["p_fraction_final"] = round(arc.p / capacity, 4) if capacity else 0.0
        lru_stats = run(lru, trace, args.pieces, args.piece_size)
        results.append(
            {
                "capacity_fraction": fraction,
                "capacity_bytes": capacity,
                "capacity_pieces": capacity // args.piece_size,
                "arc": arc_stats,
                "lru": lru_stats,
                "arc_minus_lru": round(arc_stats["hit_ratio"] - lru_stats["hit_ratio"], 4),
            }
        )

    out = {
        "workload": {
            "requests": len(trace),
            "pieces": args.pieces,
            "zipf_s": args.zipf_s,
            "scan_fraction": args.scan_fraction,
            "scan_requests_actual": scans,
            "piece_size": args.piece_size,
            "working_set_bytes": working_set,
            "seed": args.seed,
        },
        "results": results,
        "elapsed_s": round(time.perf_counter() - started, 2),
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
