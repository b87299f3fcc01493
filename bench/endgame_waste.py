#!/usr/bin/env python3
"""End-game waste: what seeds upload beyond the torrent's size, for one download from
seeds of unequal speed, by libtorrent and by ``pieced-peer``, in one run.

Prints one JSON object on stdout (progress on stderr). One torrent (libtorrent-made, v1,
``--size-mib`` MiB of deterministic data in one file, ``--piece-kib`` pieces) is seeded
by one libtorrent session per ``--rates`` entry (``tests/ltpeer.py``: TCP on loopback,
each with that upload rate limit in MiB/s, loopback peers limited too). Each of
``--rounds`` rounds downloads it twice from all those seeds at once:

``lt``
    a libtorrent leecher (``tests/ltpeer.py``, no limits of its own) into an empty folder.
``pieced``
    ``pieced-peer`` with a fresh pieced daemon (its own folder, stopped with SIGTERM
    after the download), dialling the seeds itself.

Seconds run from the first connection to the last piece verified (for ``pieced``, to
``pieced-peer``'s exit: every piece verified and durable). The waste is what the seeds
count: the payload bytes they uploaded during the download (``total_payload_upload``,
read once their counters stop moving after it) less the torrent's size, in % of it: the
blocks that came twice, from a slow seed and a fast one, in the end game (and any piece
that failed its hash). ``own_redundant_pct`` is the downloader's own count of the same
(libtorrent's ``total_redundant_bytes``, ``pieced-peer``'s ``bytes_redundant``). The
two downloads take turns at going first, round after round; before each, untimed, the
page cache's dirty data is written out (``sync``). Per download kind: every round's
figures and their medians; ``pieced_to_lt`` holds the median ratios, pieced over lt
(seconds < 1: pieced-peer was faster; waste < 1: it made the seeds send less). Every
port is one the system picks; everything the run writes is under ``--workdir`` and is
deleted at its end.

    python bench/endgame_waste.py --size-mib 128 --piece-kib 256 --rates 2,5,20 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon_proc import DaemonProcess  # noqa: E402
from tests.ltpeer import LtPeer  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402

MiB = 1024 * 1024
KINDS = ("lt", "pieced")
TIMEOUT = 600.0  # seconds a download may take before the run gives up


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def seeds_sent(seeds: list[LtPeer]) -> list[int]:
    """The payload bytes each seed has uploaded so far."""
    return [int(s.handle.status().total_payload_upload) for s in seeds]


def seeds_sent_settled(seeds: list[LtPeer], limit: float = 10.0) -> list[int]:
    """The seeds' upload counters once they stop moving (what they had queued went out),
    or as they are after ``limit`` seconds."""
    last = seeds_sent(seeds)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = seeds_sent(seeds)
        if now == last:
            break
        last = now
    return last


class Setup:
    """The payload, its .torrent, the rate-limited seeds and what every download needs."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.work = work
        self.size = args.size_mib * MiB
        self.rates = [float(r) for r in args.rates.split(",")]
        content = make_payload(fresh(work / "seed"), self.size, seed=7)
        self.raw = make_torrent_lt(content, args.piece_kib * 1024, "v1")
        self.torrent = work / "v1.torrent"
        self.torrent.write_bytes(self.raw)
        self.env = {**os.environ, "PIECED_ROOTS": str(work)}
        self.seeds: list[LtPeer] = []

    def start_seeds(self) -> None:
        for rate in self.rates:
            self.seeds.append(LtPeer(self.raw, self.work / "seed", seed=True, settings={
                "upload_rate_limit": int(rate * MiB), "limit_loopback": True}))
        log(f"seeds at {self.rates} MiB/s on ports {[s.port for s in self.seeds]}")

    def close(self) -> None:
        while self.seeds:
            self.seeds.pop().close()

    def result(self, secs: float, before: list[int], own: int) -> dict[str, Any]:
        after = seeds_sent_settled(self.seeds)
        sent = [a - b for a, b in zip(after, before, strict=True)]
        return {"seconds": round(secs, 3),
                "waste_pct": round(100 * (sum(sent) - self.size) / self.size, 3),
                "own_redundant_pct": round(100 * own / self.size, 3),
                "seed_sent_mib": [round(n / MiB, 2) for n in sent]}


def download_lt(s: Setup) -> dict[str, Any]:
    folder = fresh(s.work / "lt-leech")
    try:
        with LtPeer(s.raw, folder, seed=False) as leecher:
            os.sync()
            before = seeds_sent(s.seeds)
            t0 = time.monotonic()
            for seed in s.seeds:
                leecher.connect("127.0.0.1", seed.port)
            leecher.wait_finished(TIMEOUT)
            secs = time.monotonic() - t0
            if leecher.hash_failures():
                raise RuntimeError(f"libtorrent: {leecher.hash_failures()} pieces failed")
            own = int(leecher.handle.status().total_redundant_bytes)
        return s.result(secs, before, own)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def download_pieced(s: Setup) -> dict[str, Any]:
    folder = fresh(s.work / "daemon")
    daemon = DaemonProcess(folder, [sys.executable, "-m", "pieced.daemon.cli", "run",
                                    "--http-port", "0"], env=s.env)
    try:
        daemon.start()
        cmd = [sys.executable, "-m", "pieced.peer.command", str(s.torrent), "--save-path",
               str(fresh(folder / "dl")), "--socket", str(folder / "var" / "pieced.sock"),
               "--json"]
        for seed in s.seeds:
            cmd += ["--peer", f"127.0.0.1:{seed.port}"]
        os.sync()
        before = seeds_sent(s.seeds)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=s.env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=TIMEOUT)  # (killed on the timeout)
        secs = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"pieced-peer exited {proc.returncode}: {proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout)
        if not summary["complete"] or summary["pieces_failed"]:
            raise RuntimeError(f"pieced-peer: {summary}")
        return s.result(secs, before, int(summary["bytes_redundant"]))
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
        else:
            daemon.kill()  # (reaps one that is gone already)
        shutil.rmtree(folder, ignore_errors=True)


DOWNLOAD = {"lt": download_lt, "pieced": download_pieced}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    s = Setup(args, work)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    orders = []
    try:
        s.start_seeds()
        for r in range(args.rounds):
            order = KINDS[r % 2:] + KINDS[: r % 2]
            orders.append(list(order))
            for kind in order:
                row = DOWNLOAD[kind](s)
                runs[kind].append(row)
                log(f"round {r + 1} {kind:6} {row['seconds']:7.2f} s  waste "
                    f"{row['waste_pct']:6.2f} % (own count {row['own_redundant_pct']:6.2f} %)"
                    f"  seeds sent MiB {row['seed_sent_mib']}")
    finally:
        s.close()
    out: dict[str, Any] = {"size_mib": args.size_mib, "piece_kib": args.piece_kib,
                           "rates_mib_s": s.rates, "rounds": args.rounds, "orders": orders,
                           "cpus": os.cpu_count()}
    for kind, rows in runs.items():
        out[kind] = {
            "seconds": [row["seconds"] for row in rows],
            "waste_pct": [row["waste_pct"] for row in rows],
            "own_redundant_pct": [row["own_redundant_pct"] for row in rows],
            "seed_sent_mib": [row["seed_sent_mib"] for row in rows],
            "median_seconds": median([row["seconds"] for row in rows]),
            "median_waste_pct": median([row["waste_pct"] for row in rows]),
            "median_own_redundant_pct": median([row["own_redundant_pct"] for row in rows]),
        }
    out["pieced_to_lt"] = {
        key: ratio(out["pieced"][f"median_{key}"], out["lt"][f"median_{key}"])
        for key in ("seconds", "waste_pct")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--piece-kib", type=int, default=256)
    ap.add_argument("--rates", default="2,5,20",
                    help="one seed per entry, with this upload limit in MiB/s (default 2,5,20)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of the two downloads, which take turns at going first")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "endgame")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dir = fresh(work / f"run-{os.getpid()}")
    try:
        result = run(args, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
