#!/usr/bin/env python3
"""Recheck of data that is not in the page cache: pieced against libtorrent and the disk.

Prints one JSON object (progress on stderr). One file of ``--size-mib`` MiB (made once
in ``--workdir``), ``--piece-kib`` pieces, v1 and hybrid torrents made by libtorrent.
Before every run the file is dropped from the page cache (``POSIX_FADV_DONTNEED``
after an ``fsync``; the data is clean, so the kernel drops it), then, as whole
processes, best of ``--repeat``:

``read_limit``
    the file read once with buffered ``pread`` on 4 threads, 4 MiB at a time, nothing
    hashed: how fast this disk gives the bytes.
``pieced_verify``
    ``pieced verify TORRENT --data DIR --json`` (must exit 0).
``pieced_recheck_full``
    ``pieced recheck IH --full --json`` against a daemon started by this script with the
    torrent registered (the daemon's own hashes, no fingerprints).
``libtorrent``
    ``tests.realtools.lt_recheck`` in a process of its own (hashing_threads = cores,
    libtorrent's defaults otherwise), which must find every piece good.

    python bench/cold_recheck.py --size-mib 2048
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon_proc import DaemonProcess  # noqa: E402
from tests.realtools import cached_torrent_lt, make_payload  # noqa: E402

PY = sys.executable
READ = """
import os, sys, threading
path, n = sys.argv[1], 4
size = os.path.getsize(path)
chunk = 4 << 20
def work(k):
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(chunk)
    for off in range(k * chunk, size, n * chunk):
        os.preadv(fd, [buf], off)
    os.close(fd)
ts = [threading.Thread(target=work, args=(k,)) for k in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
"""
LT = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tests.realtools import lt_recheck
have = lt_recheck(Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]), timeout=3600)
assert all(have), "libtorrent found bad pieces"
"""


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(cmd: list[str], path: Path) -> float:
    evict(path)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {r.stderr[-2000:]}")
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--piece-kib", type=int, default=4096)
    ap.add_argument("--kinds", default="v1,hybrid")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "cold")
    args = ap.parse_args()
    work = args.workdir.resolve()
    content = make_payload(work / "data", {"big.bin": args.size_mib << 20}, seed=7)
    data_file = content / "big.bin"
    save = work / "data"
    out: dict[str, object] = {"size_mib": args.size_mib, "piece_kib": args.piece_kib}
    best = {"read_limit": min(timed([PY, "-c", READ, str(data_file)], data_file)
                              for _ in range(args.repeat))}
    out["read_limit_s"] = round(best["read_limit"], 3)
    pieced = str(Path(PY).parent / "pieced")
    for kind in args.kinds.split(","):
        torrent = cached_torrent_lt(work, content, args.piece_kib << 10, kind)
        row: dict[str, float] = {}
        row["pieced_verify_s"] = min(
            timed([pieced, "verify", str(torrent), "--data", str(save), "--json"], data_file)
            for _ in range(args.repeat))
        folder = work / f"daemon-{kind}"
        shutil.rmtree(folder, ignore_errors=True)
        daemon = DaemonProcess(folder, [PY, "-m", "pieced.daemon.cli", "run", "--http-port",
                                        "0"], env={**os.environ, "PIECED_ROOTS": str(work)})
        daemon.start()
        sock = str(folder / "var" / "pieced.sock")
        try:
            r = subprocess.run([pieced, "add", str(torrent), "--save-path", str(save),
                                "--socket", sock, "--json"], capture_output=True, text=True,
                               check=True)
            ih = json.loads(r.stdout)["info_hash"]
            row["pieced_recheck_full_s"] = min(
                timed([pieced, "recheck", ih, "--full", "--json", "--socket", sock], data_file)
                for _ in range(args.repeat))
        finally:
            daemon.stop()
        row["libtorrent_s"] = min(
            timed([PY, "-c", LT.format(root=str(ROOT)), str(torrent), str(save)], data_file)
            for _ in range(args.repeat))
        out[kind] = {k: round(v, 3) for k, v in row.items()}
        print(f"{kind}: {out[kind]}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
