#!/usr/bin/env python3
"""Registering and removing many small torrents, one after another, in one engine.

Prints one JSON object. ``--torrents`` single-file v1 torrents (nothing on disk, one
piece each) are registered into one save path by ``DiskIO("posix")`` with a state
folder, as a daemon does; then ``--sample`` more are registered and removed (without
their files, then with them), timed one by one: what a register or a removal costs with
that many torrents already there (every register and removal looks again for the files
torrents share); then the engine is made again from the state folder, as at a restart,
and timed. A library of thousands of
torrents is usual for a seedbox.

    python bench/many_torrents.py --torrents 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bencodepy  # noqa: E402
from pieced.storage.disk import DiskIO  # noqa: E402


def torrent(i: int) -> bytes:
    info = {b"name": b"t%06d.bin" % i, b"piece length": 16384, b"length": 1000,
            b"pieces": hashlib.sha1(b"%d" % i).digest()}
    return bytes(bencodepy.encode({b"info": info}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torrents", type=int, default=1000)
    ap.add_argument("--sample", type=int, default=50)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        dio = DiskIO("posix", roots=[work], state_dir=work / "state")
        start = time.perf_counter()
        for i in range(args.torrents):
            dio.register(torrent(i), work / "dl")
        first = time.perf_counter() - start
        adds, removals, deletions = [], [], []
        for i in range(args.torrents, args.torrents + args.sample):
            t0 = time.perf_counter()
            ih = dio.register(torrent(i), work / "dl")
            t1 = time.perf_counter()
            dio.unregister(ih)
            removals.append(time.perf_counter() - t1)
            adds.append(t1 - t0)
            ih = dio.register(torrent(i), work / "dl")
            t2 = time.perf_counter()
            dio.unregister(ih, delete_files=True)
            deletions.append(time.perf_counter() - t2)
        dio.close()
        start = time.perf_counter()  # a restart: every torrent loaded from its record
        dio = DiskIO("posix", roots=[work], state_dir=work / "state")
        loaded = time.perf_counter() - start
        assert len(dio.torrents()) == args.torrents, "a torrent was not loaded"
        dio.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "torrents": args.torrents,
        "seconds_to_register_them": round(first, 2),
        "register_ms_median": round(statistics.median(adds) * 1000, 2),
        "unregister_ms_median": round(statistics.median(removals) * 1000, 2),
        "unregister_delete_files_ms_median": round(statistics.median(deletions) * 1000, 2),
        "seconds_to_load_them": round(loaded, 2),
        "sample": args.sample,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
