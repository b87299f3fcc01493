"""Touch the machine's free memory once, so that later runs do not pay for its first use.

On a virtual machine whose memory the host gives on first touch (Firecracker, and other
hosts without pre-allocated guest memory), the first time the guest uses a page costs a
fault in the host as well: here about 2.2 s a GiB more than a page used before. A cold
recheck reads 2 GiB into page-cache pages, and whether the kernel hands it pages used
before or fresh ones moved its system time from 0.6 to 4 s in one run. Holding most of
the free memory at once, a page at a time, then letting it go, leaves every page used
once: later figures measure the software, not the host. On a machine with real memory
it only costs its seconds. Prints JSON.

    .venv/bin/python bench/prefault.py [--leave-gib 3]
"""

from __future__ import annotations

import argparse
import json
import mmap
import time

GiB = 1 << 30
PAGE = mmap.PAGESIZE


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no MemAvailable in /proc/meminfo")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leave-gib", type=float, default=3.0,
                    help="memory left untouched for the rest of the machine")
    args = ap.parse_args()
    todo = max(0, int((available_bytes() - args.leave_gib * GiB) // GiB))
    held: list[mmap.mmap] = []
    per_gib: list[float] = []
    t0 = time.perf_counter()
    for _ in range(todo):
        m = mmap.mmap(-1, GiB)
        start = time.perf_counter()
        for off in range(0, GiB, PAGE):
            m[off] = 1
        per_gib.append(round(time.perf_counter() - start, 3))
        held.append(m)
    for m in held:
        m.close()
    print(json.dumps({"benchmark": "prefault", "touched_gib": todo,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "seconds_per_gib": per_gib}, indent=1))


if __name__ == "__main__":
    main()
