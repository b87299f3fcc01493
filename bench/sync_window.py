#!/usr/bin/env python3
"""What does the group-commit sync window cost or gain on pieced's write path?

Prints one JSON object on stdout (progress goes to stderr). It plays the same download as
``bench/write_path.py`` (and reuses its payload, torrent, ring and timing code): one file of
``--size-mib`` MiB made by ``tests.realtools.make_payload``, a v1 torrent made by libtorrent
(``--piece-length``, default 256 KiB), 16 KiB blocks handed over in order as two slices of a
receive ring (4 MiB + 12,345 bytes, so some blocks wrap), one caller thread. Filling the
ring is untimed; timed are opening the destination, the per-block calls and the final
flush that makes everything durable.

For each sync window in ``--windows-ms`` (default 0, 10 and 100 ms), on the same data and
in the same process, runs of the two variants are interleaved (best of ``--repeat``):

``pieced``
    ``DiskIO("posix", sync_window=W/1000).write_block_direct(ih, piece, begin, s0, s1)``
    per block, ``flush_all()`` at the end. ``sync_window`` is the DiskIO parameter behind
    the daemon's ``sync_window_ms`` setting (config/settings.py, default 10). With W = 0 the
    thread that completes a piece fdatasyncs it before announcing it; with W > 0 the
    committer thread waits W after the first pending piece, then fdatasyncs once for the
    whole batch and announces it (storage/disk.py ``_GroupCommit``).
``raw`` (the physical limit for the same durability scheme)
    ``os.pwritev`` of the ring slices + hashlib SHA-1 per block, digest checked per piece
    (``bench/write_path.py``'s ``Raw``). W = 0: one fdatasync right after each piece, in the
    caller thread. W > 0: the same scheme as pieced's committer, in a second thread: wait
    for a pending piece, sleep W, take the batch, one fdatasync, mark the batch durable.

Reported per run: MiB/s, fdatasync calls actually made (``os.fdatasync`` is wrapped by a
counter in this process only) and, for pieced, its own ``syncs`` metric from
``DiskIO.stats()``, plus the piece-verified latency: from the moment the piece's last block
is handed to the variant (taken as the block iterator yields it, just before the
``write_block_direct``/``pwritev`` call) to the moment the piece is durable and announced
(pieced's ``on_piece`` callback, the in-process form of the ``piece_verified`` event; for
raw, the end of the fdatasync covering it). p50/p99 are over the pieces of one run.

Everything is written under a fresh temporary folder on a real disk (``--tmp-base``,
default /tmp unless that is a tmpfs, then /work) that is deleted at the end, unless
``--workdir`` names a folder in which to cache the payload between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pieced.storage.disk import PieceResult  # noqa: E402
from pieced.storage.metainfo import Metainfo, parse  # noqa: E402

from bench.ingest import latency_summary  # noqa: E402
from bench.write_path import (  # noqa: E402
    BLOCK,
    Blocks,
    Kind,
    Pieced,
    Raw,
    Ring,
    filesystem_of,
    prepare_payload,
    prepare_torrent,
    run_once,
    warm_cache,
)

MiB = 1 << 20
KIND: Kind = "v1"
VARIANTS = ("raw", "pieced")
now_ns = time.perf_counter_ns


def log(msg: str) -> None:
    print(f"[sync_window] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- counting


class FdatasyncCounter:
    """Counts ``os.fdatasync`` calls made by anyone in this process (pieced included)."""

    def __init__(self) -> None:
        self.real = os.fdatasync
        self._lock = threading.Lock()
        self._calls = 0
        self._base = 0

    def install(self) -> None:
        real, lock = self.real, self._lock

        def fdatasync(fd: Any) -> None:
            with lock:
                self._calls += 1
            real(fd)

        os.fdatasync = fdatasync

    def uninstall(self) -> None:
        os.fdatasync = self.real

    def reset(self) -> None:
        with self._lock:
            self._base = self._calls

    def since_reset(self) -> int:
        with self._lock:
            return self._calls - self._base


FDATASYNC = FdatasyncCounter()


class MarkedBlocks(list[tuple[int, memoryview, memoryview | bytes]]):
    """A piece's blocks; iterating them records when the last one is handed out."""

    t_last = 0

    def __iter__(self) -> Iterator[tuple[int, memoryview, memoryview | bytes]]:
        last = len(self) - 1
        for i, block in enumerate(super().__iter__()):
            if i == last:
                self.t_last = now_ns()
            yield block


# --------------------------------------------------------------------------- variants


class PiecedTimed(Pieced):
    """write_path's ``pieced_direct`` with a timestamp per block handover and per callback."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args, backend="posix", direct=True)

    def setup(self) -> None:
        super().setup()
        self.t_last: dict[int, int] = {}
        self.t_done: dict[int, int] = {}
        results = self.results
        t_done = self.t_done

        def on_piece(r: PieceResult) -> None:
            t_done[r.piece] = now_ns()
            results.append(r)

        self.disk.on_piece = on_piece

    def open(self) -> None:
        FDATASYNC.reset()

    def piece(self, p: int, blocks: Blocks) -> None:
        marked = MarkedBlocks(blocks)
        super().piece(p, marked)
        self.t_last[p] = marked.t_last

    def teardown(self) -> dict[str, Any]:
        calls = FDATASYNC.since_reset()  # before close(), which makes no further data durable
        info = super().teardown()
        info["fdatasync_calls"] = calls
        info["latency_ns"] = [self.t_done[p] - t for p, t in self.t_last.items()]
        return info


class RawTimed(Raw):
    """write_path's ``raw`` with a fdatasync per piece (window 0) or pieced's group commit."""

    def __init__(self, *args: Any, sync_window: float) -> None:
        super().__init__(*args, sync_window=sync_window)
        self._cond = threading.Condition()
        self._pending: list[int] = []
        self._closing = False
        self.t_last: dict[int, int] = {}
        self.t_done: dict[int, int] = {}

    def open(self) -> None:
        FDATASYNC.reset()
        super().open()  # starts the committer thread (our _sync_loop) when the window > 0

    def piece(self, p: int, blocks: Blocks) -> None:
        marked = MarkedBlocks(blocks)
        super().piece(p, marked)
        self.t_last[p] = marked.t_last
        if self.failed and self.failed[-1] == p:
            return  # never durable-and-announced; teardown raises
        if self.sync_window <= 0:
            os.fdatasync(self.fd)
            self.syncs += 1
            self.t_done[p] = now_ns()
            return
        with self._cond:
            self._pending.append(p)
            self._cond.notify()

    def _sync_loop(self) -> None:
        """pieced's ``_GroupCommit._run``: first pending piece, sleep the window, one sync."""
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing and not self._pending:
                    return
            time.sleep(self.sync_window)
            with self._cond:
                batch, self._pending = self._pending, []
            os.fdatasync(self.fd)
            self.syncs += 1
            done = now_ns()
            for p in batch:
                self.t_done[p] = done

    def finish(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        super().finish()  # joins the committer, then one last fdatasync (as flush_all does)

    def teardown(self) -> dict[str, Any]:
        calls = FDATASYNC.since_reset()
        info = super().teardown()
        info.pop("syncs", None)  # Raw's own count: the same as fdatasync_calls
        info["fdatasync_calls"] = calls
        info["latency_ns"] = [self.t_done[p] - t for p, t in self.t_last.items()]
        return info


# --------------------------------------------------------------------------- helpers


def df(path: Path) -> dict[str, Any]:
    """What ``df`` says about the file system holding ``path``."""
    out = subprocess.run(
        ["df", "-B1", "--output=source,fstype,size,avail,target", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[-1].split()
    return {
        "path": str(path),
        "device": out[0],
        "fstype": out[1],
        "size_bytes": int(out[2]),
        "avail_bytes": int(out[3]),
        "mounted_on": out[4],
        "proc_mounts_fstype": filesystem_of(path),
    }


def pick_base(requested: Path | None) -> Path:
    candidates = [requested] if requested is not None else [Path("/tmp"), Path("/work")]
    for base in candidates:
        if base.is_dir() and filesystem_of(base) not in ("tmpfs", "ramfs", None):
            return base
    raise SystemExit(f"no real-disk folder among {[str(c) for c in candidates]} (tmpfs?)")


def summarise(runs: list[dict[str, Any]], size: int) -> dict[str, Any]:
    best = min(runs, key=lambda x: x["seconds"])
    out: dict[str, Any] = {
        "seconds": round(best["seconds"], 4),
        "mib_per_s": round(size / MiB / best["seconds"], 1),
        "final_flush_seconds": round(best["final_flush_seconds"], 4),
        "runs_seconds": [round(x["seconds"], 4) for x in runs],
        "runs_mib_per_s": [round(size / MiB / x["seconds"], 1) for x in runs],
        "pieces_ok": best["pieces_ok"],
        "fdatasync_calls": best["fdatasync_calls"],
        "runs_fdatasync_calls": [x["fdatasync_calls"] for x in runs],
        "verified_latency": latency_summary(best["latency_ns"]),
        "runs_verified_latency_p50_p99_us": [
            [(s := latency_summary(x["latency_ns"]))["p50_us"], s["p99_us"]] for x in runs
        ],
    }
    if "syncs" in best:
        out["pieced_metric_syncs"] = best["syncs"]
    if "pieced_timer_seconds" in best:
        out["pieced_timer_seconds"] = best["pieced_timer_seconds"]
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument(
        "--piece-length", type=int, default=256 * 1024, help="bytes, a power of two (256 KiB)"
    )
    ap.add_argument("--windows-ms", type=float, nargs="+", default=[0.0, 10.0, 100.0])
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    ap.add_argument("--tmp-base", type=Path, help="real-disk folder for the temp dir "
                    "(default /tmp, or /work if /tmp is a tmpfs)")
    ap.add_argument("--workdir", type=Path, help="keep the payload here between runs "
                    "(default: inside the temp dir, deleted at the end)")
    ap.add_argument("--ring-bytes", type=int, default=0,
                    help="default: max(4 MiB, piece length) + 12345")
    ap.add_argument("--cache-mib", type=int, default=256, help="pieced's buffer budget")
    ap.add_argument("--no-check", action="store_true",
                    help="skip comparing the written files with the source (first run only)")
    args = ap.parse_args()
    size = args.size_mib * MiB
    ring_bytes = args.ring_bytes or max(4 * MiB, args.piece_length) + 12_345
    if ring_bytes < args.piece_length:
        raise SystemExit("--ring-bytes must hold at least one piece")
    if any(w < 0 for w in args.windows_ms):
        raise SystemExit("--windows-ms must be >= 0")

    base = pick_base(args.tmp_base)
    tmp = Path(tempfile.mkdtemp(prefix="pieced-sync-window-", dir=base))
    load_before = os.getloadavg()
    FDATASYNC.install()
    try:
        workdir = args.workdir.resolve() if args.workdir else tmp / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        src, reused = prepare_payload(workdir, size)
        torrent = prepare_torrent(workdir, src, args.piece_length, KIND)
        meta: Metainfo = parse(torrent)
        if meta.total_size != size or len([f for f in meta.files if f.stored]) != 1:
            raise SystemExit(f"the torrent is not a plain single file of {size} bytes")
        warm = warm_cache(src)
        log(f"source page-cached ({size / MiB / warm:.0f} MiB/s); writing under {tmp}")
        ring = Ring(ring_bytes)
        fs = df(tmp)
        dest_root = tmp / "dest"

        runs: dict[float, dict[str, list[dict[str, Any]]]] = {
            w: {v: [] for v in VARIANTS} for w in args.windows_ms
        }
        t_all = time.perf_counter()
        for r in range(args.repeat):
            for w in args.windows_ms:
                opts = argparse.Namespace(**{**vars(args), "sync_window": w / 1000})
                for name in VARIANTS:
                    dest = dest_root / f"{name}-{w:g}ms-{r}"
                    vargs = (torrent, meta, dest, opts)
                    v = PiecedTimed(*vargs) if name == "pieced" else RawTimed(
                        *vargs, sync_window=w / 1000
                    )
                    run = run_once(v, src, ring, meta, check=not args.no_check and r == 0)
                    runs[w][name].append(run)
                    lat = latency_summary(run["latency_ns"])
                    log(
                        f"run {r + 1}/{args.repeat} window {w:>5g} ms {name:6} "
                        f"{run['seconds']:.3f}s ({size / MiB / run['seconds']:.0f} MiB/s), "
                        f"{run['fdatasync_calls']} fdatasyncs, verified latency p50 "
                        f"{lat['p50_us'] / 1000:.2f} ms p99 {lat['p99_us'] / 1000:.2f} ms"
                    )
        elapsed = time.perf_counter() - t_all
    finally:
        FDATASYNC.uninstall()
        shutil.rmtree(tmp, ignore_errors=True)

    results: dict[str, Any] = {}
    for w in args.windows_ms:
        entry = {name: summarise(runs[w][name], size) for name in VARIANTS}
        entry["pieced_ratio_to_raw"] = round(
            entry["raw"]["seconds"] / entry["pieced"]["seconds"], 3
        )
        results[f"{w:g}ms"] = {"sync_window_ms": w, **entry}

    out: dict[str, Any] = {
        "benchmark": "sync_window",
        "kind": KIND,
        "size_bytes": size,
        "size_mib": args.size_mib,
        "piece_length": args.piece_length,
        "pieces": meta.num_pieces,
        "block_size": BLOCK,
        "ring_bytes": ring_bytes,
        "repeat": args.repeat,
        "caller_threads": 1,
        "windows_ms": args.windows_ms,
        "pieced_cache_mib": args.cache_mib,
        "payload_reused": reused,
        "filesystem": fs,
        "filesystem_is_real_disk": fs["fstype"] not in ("tmpfs", "ramfs"),
        "temp_dir_removed": not tmp.exists(),
        "measure_seconds": round(elapsed, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "notes": {
            "timed": "open + per-block calls + final flush (fdatasync / flush_all); filling the "
            "ring from the page-cached source is untimed; best of repeat",
            "pieced": "DiskIO('posix', sync_window=W/1000).write_block_direct(ih, piece, begin, "
            "s0, s1) per block; sync_window is the DiskIO side of settings.sync_window_ms",
            "raw": "os.pwritev + hashlib SHA-1 per block, digest checked per piece; W=0: "
            "fdatasync after every piece in the caller; W>0: a second thread with pieced's "
            "_GroupCommit scheme (wait for a pending piece, sleep W, one fdatasync per batch)",
            "fdatasync_calls": "os.fdatasync calls counted in-process during open..teardown",
            "pieced_metric_syncs": "DiskIO.stats()['syncs']: _sync calls, counted even when "
            "no file was dirty (so no fdatasync was made)",
            "verified_latency": "last block handed over -> piece durable and announced "
            "(pieced on_piece callback / end of raw's covering fdatasync), per piece, one run",
            "pieced_ratio_to_raw": "raw seconds / pieced seconds",
        },
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "results": results,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
