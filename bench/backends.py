#!/usr/bin/env python3
"""The storage backends side by side (posix, direct, uring): time to write and verify a
torrent, and how much of the page cache each leaves behind.

Prints one JSON object. A ``--size-mib`` MiB payload of three files (sizes not multiples
of 4 KiB, so blocks share pages at file boundaries), a ``--kind`` torrent of
``--piece-kib`` pieces; for each of ``--backends``, best of ``--repeat`` (the backends
in turn): ``DiskIO(backend)``
in this process takes every block with ``write_block_direct`` in order, then
``flush_all`` (every piece verified and durable). ``page_cache_mib``: how much the
system's page cache ("Cached" in /proc/meminfo) grew during the run (the save folder is
deleted and the payload dropped from the cache before each run), i.e. what the backend
pushed into memory that other programs could have used.

    python bench/backends.py --size-mib 1024
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pieced.storage.disk import DiskIO  # noqa: E402

from tests.pagecache import drop  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402
from tests.test_disk import Source  # noqa: E402


def cached_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--piece-kib", type=int, default=1024)
    ap.add_argument("--kind", default="v1")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--backends", default="posix,direct,uring")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "backends")
    args = ap.parse_args()
    work = args.workdir.resolve()
    third = (args.size_mib << 20) // 3
    content = make_payload(work / "src", {"a.bin": third + 1001, "b.bin": third - 77,
                                          "c.bin": third + 3}, seed=5)
    raw = make_torrent_lt(content, args.piece_kib << 10, args.kind)
    src = Source(raw, work / "src")
    blocks = [(p, b, src.read(p, b, n)) for p, b, n in src.peer_blocks()]  # in memory, untimed
    drop(work / "src")
    out: dict[str, object] = {"size_mib": args.size_mib, "piece_kib": args.piece_kib,
                              "kind": args.kind}
    for backend in args.backends.split(",") * args.repeat:
        save = work / "dl"
        shutil.rmtree(save, ignore_errors=True)
        os.sync()
        before = cached_mib()
        dio = DiskIO(backend, cache_bytes=64 << 20, sync_window=0.01, roots=[work])
        ih = dio.register(raw, save)
        t0 = time.perf_counter()
        for p, b, data in blocks:
            dio.write_block_direct(ih, p, b, data)
        dio.flush_all()
        secs = time.perf_counter() - t0
        grew = cached_mib() - before
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        dio.close()
        row = out.get(backend)
        if not isinstance(row, dict) or secs < row["seconds"]:
            out[backend] = {"seconds": round(secs, 3), "mib_s": round(args.size_mib / secs, 1),
                            "page_cache_mib": round(grew, 1)}
        print(f"{backend}: {secs:.3f} s, page cache +{grew:.0f} MiB", file=sys.stderr, flush=True)
    shutil.rmtree(work / "dl", ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
