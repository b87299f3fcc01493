"""What the interpreter's lock costs the hashing of BEP 52 leaves: hashlib's SHA-256
over 16 KiB leaves (one call each, as a v2 check makes them) against whole 4 MiB
buffers, and SHA-1 over whole buffers, on one thread and on two. Prints JSON.

hashlib lets go of the lock for any buffer over 2 KiB and takes it back after: with two
threads that is a hand-over of the lock per leaf.

    .venv/bin/python bench/leaf_hash.py [--mib-per-thread 512]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import threading
import time
from collections.abc import Callable

LEAF = 16 * 1024
BUF = 4 * 1024 * 1024


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib-per-thread", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    buf = memoryview(os.urandom(BUF))
    rounds = args.mib_per_thread * 1024 * 1024 // BUF

    def leaves() -> None:
        sha = hashlib.sha256
        for _ in range(rounds):
            [sha(buf[i : i + LEAF]).digest() for i in range(0, BUF, LEAF)]

    def sha256_whole() -> None:
        for _ in range(rounds):
            hashlib.sha256(buf).digest()

    def sha1_whole() -> None:
        for _ in range(rounds):
            hashlib.sha1(buf).digest()

    work: dict[str, Callable[[], None]] = {
        "sha256_leaves": leaves, "sha256_whole": sha256_whole, "sha1_whole": sha1_whole}
    out: dict[str, object] = {"benchmark": "leaf_hash", "mib_per_thread": args.mib_per_thread,
                              "cpus": os.cpu_count(), "results": {}}
    results: dict[str, dict[str, object]] = {}
    for name, fn in work.items():
        for threads in (1, 2):
            best = None
            for _ in range(args.repeat):
                ts = [threading.Thread(target=fn) for _ in range(threads)]
                t0, c0 = time.perf_counter(), cpu()
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                wall, used = time.perf_counter() - t0, cpu() - c0
                if best is None or wall < best[0]:
                    best = (wall, used)
            assert best is not None
            gib = threads * args.mib_per_thread / 1024
            results[f"{name}/{threads}t"] = {
                "gib_per_s": round(gib / best[0], 3),
                "cpu_seconds_per_gib": round(best[1] / gib, 3)}
    out["results"] = results
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
