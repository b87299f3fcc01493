#!/usr/bin/env python3
"""What reading cold data costs the CPU, beside hashing it: the ways a recheck can read.

A cold recheck of the daemon costs more CPU than a warm one by far more than
libtorrent's does. This script does the reading and hashing of a full v1 check of a
folder's files (SHA-1 of every 4 MiB, no torrent needed) on two threads, each way in
turn, every file dropped from the page cache before each round (``POSIX_FADV_DONTNEED``,
then checked with ``mincore`` through a map), and prints the wall clock and the user and
system CPU of each round, so that the ways compare in one run:

* ``pread``: as the daemon reads: 4 MiB ``preadv`` into each thread's own buffer, the
  main thread advising each batch of two chunks (``POSIX_FADV_WILLNEED``) as it hands it
  out, at most six batches ahead;
* ``pread_plain``: the same without the advice (the kernel's own read-ahead);
* ``mapped``: the files mapped, each chunk hashed in place (no copy, as libtorrent
  reads), ``MADV_WILLNEED`` as the batches are handed out. A page past the end of a file
  cut short under it meanwhile would be a SIGBUS: not something the daemon may do;
* ``read_only``: ``pread`` without the hashing.

Run it under ``perf record -g`` to see where the system CPU goes.

Usage: ``cold_read.py FOLDER [--modes pread,mapped,...] [--rounds N]``. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.recheck import evict  # (drops the files, checks with mincore)

CHUNK = 4 << 20
AHEAD = 6  # batches handed out and not yet done
MODES = ("pread", "pread_plain", "mapped", "read_only")


def one_round(mode: str, files: list[Path]) -> None:
    chunks = [(p, off, min(CHUNK, p.stat().st_size - off))
              for p in files for off in range(0, p.stat().st_size, CHUNK)]
    batches = [chunks[i : i + 2] for i in range(0, len(chunks), 2)]
    fds = {p: os.open(p, os.O_RDONLY) for p in files}
    maps = ({p: mmap.mmap(fd, 0, prot=mmap.PROT_READ) for p, fd in fds.items()
             if p.stat().st_size} if mode == "mapped" else {})
    local = threading.local()

    def work(batch: list[tuple[Path, int, int]]) -> None:
        if mode == "mapped":
            for p, off, n in batch:
                with memoryview(maps[p]) as view:
                    hashlib.sha1(view[off : off + n]).digest()
            return
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(CHUNK))
        for p, off, n in batch:
            got = os.preadv(fds[p], [buf[:n]], off)
            if mode != "read_only":
                hashlib.sha1(buf[:got]).digest()

    try:
        with ThreadPoolExecutor(2) as pool:
            pending = []
            for batch in batches:
                for p, off, n in batch:
                    if mode in ("pread", "read_only"):
                        os.posix_fadvise(fds[p], off, n, os.POSIX_FADV_WILLNEED)
                    elif mode == "mapped":
                        start = off - off % mmap.PAGESIZE
                        maps[p].madvise(mmap.MADV_WILLNEED, start, n + off - start)
                pending.append(pool.submit(work, batch))
                while len(pending) > AHEAD:
                    pending.pop(0).result()
            for f in pending:
                f.result()
    finally:
        for m in maps.values():
            m.close()
        for fd in fds.values():
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}: one of {', '.join(MODES)}")
    files = sorted(p for p in args.folder.rglob("*") if p.is_file() and p.stat().st_size)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            evict(files)
            t0, c0 = time.perf_counter(), os.times()
            one_round(m, files)
            c1, t1 = os.times(), time.perf_counter()
            runs[m].append({"seconds": round(t1 - t0, 3), "user": round(c1.user - c0.user, 3),
                            "system": round(c1.system - c0.system, 3)})
    print(json.dumps({
        "benchmark": "cold_read", "folder": str(args.folder),
        "bytes": sum(p.stat().st_size for p in files), "chunk": CHUNK, "threads": 2,
        "loadavg": os.getloadavg(), "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
