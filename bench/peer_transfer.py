#!/usr/bin/env python3
"""pieced-peer against libtorrent on the same torrent, over loopback TCP, in one run.

Prints one JSON object on stdout (progress on stderr). For each ``--kinds`` torrent
(libtorrent-made, ``--size-mib`` MiB in one file of deterministic data, ``--piece-kib``
pieces) three transfers, timed from the first connection to the last byte verified:

``lt_to_lt``
    a libtorrent seeder to a libtorrent leecher (``tests/ltpeer.py``: TCP only, no
    encryption, no rate limits): the yardstick.
``lt_to_pieced``
    a libtorrent seeder -> ``pieced-peer`` -> a fresh pieced daemon (blocks through the
    shared-memory ring, every piece verified and durable before ``pieced-peer`` exits).
``pieced_to_lt``
    the daemon that just downloaded it -> ``pieced-peer --seed`` -> a libtorrent leecher.

CPU: seconds of user + system time per GiB moved, for ``pieced-peer`` and the daemon
(from ``/proc/PID/stat``). Memory: the daemon's peak RSS (``VmHWM``) against its cache
budget. ``ratio_to_lt`` = lt_to_lt seconds / this transfer's seconds (1.0: as fast as
libtorrent to libtorrent). With ``--repeat N`` the three transfers run N rounds in turn
and each figure is its best round's (the machine is shared and noisy). Before each
transfer, untimed, the page cache's dirty data is written out (``sync``): the payload just
made, or the 1 GiB the previous transfer wrote, is otherwise written back by the kernel
during the next transfer, on the same two cores, and whichever transfer comes next pays
for it.

    python bench/peer_transfer.py --size-mib 1024 --kinds v1,hybrid
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon_proc import DaemonProcess, cpu_seconds, proc_status  # noqa: E402
from tests.ltpeer import LtPeer  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settle() -> None:
    """No dirty data left from what ran before: the transfer timed next pays only for its
    own writes."""
    os.sync()


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_kind(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = args.size_mib * 1024 * 1024
    src = work / "src"
    content = make_payload(src, {"data.bin": size}, seed=1)
    raw = make_torrent_lt(content, args.piece_kib * 1024, kind)
    torrent = work / f"{kind}.torrent"
    torrent.write_bytes(raw)
    gib = size / 2**30
    out: dict[str, Any] = {}

    log(f"{kind}: lt -> lt")
    with LtPeer(raw, src, seed=True) as seeder, \
            LtPeer(raw, fresh(work / "lt-leech"), seed=False) as leecher:
        settle()
        t0 = time.monotonic()
        leecher.connect("127.0.0.1", seeder.port)
        leecher.wait_finished(3600)
        secs = time.monotonic() - t0
        assert leecher.hash_failures() == 0
    out["lt_to_lt"] = {"seconds": round(secs, 3), "mib_s": round(args.size_mib / secs, 1)}
    shutil.rmtree(work / "lt-leech")

    daemon_dir = fresh(work / "daemon")
    env = {**os.environ, "PIECED_CACHE_BYTES": str(args.cache_mib * 1024 * 1024)}
    daemon = DaemonProcess(daemon_dir, [sys.executable, "-m", "pieced.daemon.cli", "run",
                                        "--http-port", "0"], env=env)
    daemon.start()
    sock = str(daemon_dir / "var" / "pieced.sock")
    dl = fresh(daemon_dir / "dl")
    try:
        log(f"{kind}: lt -> pieced-peer -> pieced")
        with LtPeer(raw, src, seed=True) as seeder:
            settle()
            d0 = cpu_seconds(daemon.pid)
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "pieced.peer.plugin", str(torrent), "--save-path", str(dl),
                 "--peer", f"127.0.0.1:{seeder.port}", "--socket", sock, "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            cpu = 0.0
            while proc.poll() is None:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
                    cpu = cpu_seconds(proc.pid)
                time.sleep(0.05)
            secs = time.monotonic() - t0
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"pieced-peer failed: {stderr}")
            summary = json.loads(stdout)
            dcpu = cpu_seconds(daemon.pid) - d0
        out["lt_to_pieced"] = {
            "seconds": round(secs, 3), "mib_s": round(args.size_mib / secs, 1),
            "ratio_to_lt": round(out["lt_to_lt"]["seconds"] / secs, 2),
            "plugin_cpu_s_per_gib": round(cpu / gib, 2), "daemon_cpu_s_per_gib": round(dcpu / gib, 2),
            "pieces_failed": summary["pieces_failed"],
        }

        log(f"{kind}: pieced -> pieced-peer --seed -> lt")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pieced.peer.plugin", str(torrent), "--save-path", str(dl),
             "--listen", "127.0.0.1:0", "--seed", "--socket", sock, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        port = int(proc.stderr.readline().rsplit(":", 1)[1])
        with LtPeer(raw, fresh(work / "leech"), seed=False) as leecher:
            settle()
            d0 = cpu_seconds(daemon.pid)
            p0 = cpu_seconds(proc.pid)
            t0 = time.monotonic()
            leecher.connect("127.0.0.1", port)
            leecher.wait_finished(3600)
            secs = time.monotonic() - t0
            pcpu = cpu_seconds(proc.pid) - p0
            dcpu = cpu_seconds(daemon.pid) - d0
            failures = leecher.hash_failures()
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
        summary = json.loads(stdout)
        out["pieced_to_lt"] = {
            "seconds": round(secs, 3), "mib_s": round(args.size_mib / secs, 1),
            "ratio_to_lt": round(out["lt_to_lt"]["seconds"] / secs, 2),
            "plugin_cpu_s_per_gib": round(pcpu / gib, 2), "daemon_cpu_s_per_gib": round(dcpu / gib, 2),
            "leecher_hash_failures": failures, "suggests_sent": summary["suggests_sent"],
        }
        out["daemon_peak_rss_mib"] = round(proc_status(daemon.pid).get("VmHWM", 0) / 2**20, 1)
        out["daemon_budget_mib"] = args.cache_mib
    finally:
        daemon.stop()
        shutil.rmtree(work / "leech", ignore_errors=True)
        shutil.rmtree(daemon_dir, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--piece-kib", type=int, default=4096)
    ap.add_argument("--kinds", default="v1,hybrid")
    ap.add_argument("--cache-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the three transfers; each figure is from its best round")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "peer")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"size_mib": args.size_mib, "piece_kib": args.piece_kib,
                              "cpus": os.cpu_count()}
    result["repeat"] = args.repeat
    for kind in args.kinds.split(","):
        rounds = [run_kind(kind, args, work) for _ in range(args.repeat)]
        best: dict[str, Any] = {}
        for key in ("lt_to_lt", "lt_to_pieced", "pieced_to_lt"):
            best[key] = min((r[key] for r in rounds), key=lambda row: row["seconds"])
        for key in ("lt_to_pieced", "pieced_to_lt"):
            best[key]["ratio_to_lt"] = round(best["lt_to_lt"]["seconds"] / best[key]["seconds"], 2)
        best["daemon_peak_rss_mib"] = max(r["daemon_peak_rss_mib"] for r in rounds)
        best["daemon_budget_mib"] = args.cache_mib
        result[kind] = best
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
