#!/usr/bin/env python3
"""pieced-peer against libtorrent on the same torrent, over loopback TCP, in one run.

Prints one JSON object on stdout (progress on stderr). For each ``--kinds`` torrent
(libtorrent-made, ``--size-mib`` MiB of deterministic data in one file, or in
``--files`` files of sizes from 0 bytes to a few pieces in 37 folders, ``--piece-kib``
pieces) three transfers, timed from the first connection to the last byte verified:

``lt_to_lt``
    a libtorrent seeder to a libtorrent leecher (``tests/ltpeer.py``: TCP only, no
    encryption, no rate limits): the yardstick.
``lt_to_pieced``
    a libtorrent seeder -> ``pieced-peer`` -> a fresh pieced daemon (blocks through the
    shared-memory ring, every piece verified and durable before ``pieced-peer`` exits).
``pieced_to_lt``
    a pieced daemon with the payload registered (checked before the clock starts) ->
    ``pieced-peer --seed`` -> a libtorrent leecher.

Each transfer has daemons of its own, started before and stopped after it, and what it
wrote is set aside once it is timed, so the three are independent of one another. With
``--files``, what a transfer wrote is deleted only at the end of the run: on ext4
without a journal (this VM's) a file made within a minute or more of thousands of
deletions is made about 15 times more slowly (its inode allocator steps over inodes
freed recently), so the transfer after one that deleted 12,000 files paid for them.

CPU: seconds of user + system time per GiB moved, for ``pieced-peer`` and the daemon
(from ``/proc/PID/stat``), and for libtorrent (this process's threads: both sessions of
``lt_to_lt``, the seeder of ``lt_to_pieced``, the leecher of ``pieced_to_lt``);
``total_cpu_s_per_gib`` adds them up, and ``median_total_cpu_ratio_to_lt`` = lt_to_lt's
over this transfer's (> 1: pieced's transfer costs the two cores less). The kernel's
writeback threads are counted by none: libtorrent leaves its writes to them, while the
daemon's fdatasyncs submit its own in its process. Memory: the daemon's peak RSS (``VmHWM``) against its cache
budget, and ``pieced-peer``'s (its shared ring with the daemon included). ``ratio_to_lt`` = lt_to_lt seconds / this transfer's seconds (1.0: as fast as
libtorrent to libtorrent). A download by ``pieced-peer`` ends once every piece is durable
(the daemon reports a piece verified only after its fdatasync), libtorrent's when the
last piece is in the page cache: ``durable_seconds`` is lt_to_lt with the leecher's files
fdatasync'ed after it finished, and ``ratio_to_lt_durable`` compares lt_to_pieced with it. With ``--repeat N`` the three transfers run N rounds, the
order turning by one each round so that each transfer comes first, second and third in
turn (on this machine where a transfer comes in a round changes its time by up to half),
and each figure is its best round's; every round's time is in ``runs_seconds``, and the
medians and their ratios in ``median_seconds`` and ``median_ratio_to_lt``. Before each
transfer, untimed, the page cache's dirty data is written out (``sync``): the payload just
made, or the 1 GiB the previous transfer wrote, is otherwise written back by the kernel
during the next transfer, on the same two cores, and whichever transfer comes next pays
for it.

    python bench/peer_transfer.py --size-mib 1024 --kinds v1,hybrid
    python bench/peer_transfer.py --size-mib 300 --files 12000 --piece-kib 16 --kinds v1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.daemon_proc import DaemonProcess, cpu_seconds, proc_status  # noqa: E402
from tests.ltpeer import LtPeer  # noqa: E402
from tests.realtools import TorrentKind, make_payload, make_torrent_lt  # noqa: E402


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


_trash: list[Path] = []  # set aside, deleted at the end of the run (see the docstring)


def discard(path: Path, many_files: bool) -> None:
    """Delete what a transfer wrote, or with ``many_files`` move it aside (a rename frees
    no inode) and leave the deletion to :func:`empty_trash`."""
    if not many_files or not path.exists():
        shutil.rmtree(path, ignore_errors=True)
        return
    aside = path.parent / "trash" / f"{len(_trash)}-{path.name}"
    aside.parent.mkdir(exist_ok=True)
    path.rename(aside)
    _trash.append(aside)


def empty_trash() -> None:
    while _trash:
        shutil.rmtree(_trash.pop(), ignore_errors=True)


def leech(leecher: LtPeer, port: int) -> float:
    """Seconds for a libtorrent ``leecher`` to download everything from 127.0.0.1:``port``
    (the dirty data of what ran before written out first, untimed), without a hash
    failure."""
    settle()
    t0 = time.monotonic()
    leecher.connect("127.0.0.1", port)
    leecher.wait_finished(3600)
    secs = time.monotonic() - t0
    assert leecher.hash_failures() == 0
    return secs


TRANSFERS = ("lt_to_lt", "lt_to_pieced", "pieced_to_lt")


def payload_files(total: int, count: int) -> dict[str, int]:
    """``count`` files of ``total`` bytes in all: sizes from 0 to a few 16 KiB blocks,
    odd ones among them, in 37 folders (a torrent of many small files); one file if 1."""
    if count <= 1:
        return {"data.bin": total}
    rng = random.Random(5)
    sizes = [rng.choice((0, 1, 3, 16383, 16384, 16385, 32771, 81920, 100000))
             for _ in range(count)]
    scale = total / max(1, sum(sizes))
    files = {f"d{i % 37}/f{i:06d}.bin": int(n * scale) for i, n in enumerate(sizes)}
    files["d0/last.bin"] = total - sum(files.values())
    return files


class Setup:
    """One torrent's payload, its .torrent and what every transfer needs."""

    def __init__(self, kind: str, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        # A folder for each payload: make_payload writes the files of its spec over
        # what is there and deletes nothing, so one folder for all runs made a torrent of
        # the 1 GiB file of one run and the 12,000 small files of another together.
        self.src = work / f"src-{args.files}x{args.size_mib}MiB"
        content = make_payload(self.src, payload_files(args.size_mib * 1024 * 1024, args.files),
                               seed=1)
        self.raw = make_torrent_lt(content, args.piece_kib * 1024, cast(TorrentKind, kind))
        self.torrent = work / f"{kind}.torrent"
        self.torrent.write_bytes(self.raw)
        self.gib = args.size_mib / 1024
        self.env = {**os.environ, "PIECED_CACHE_BYTES": str(args.cache_mib * 1024 * 1024),
                    "PIECED_ROOTS": str(work)}

    def daemon(self, name: str) -> DaemonProcess:
        folder = fresh(self.work / name)
        d = DaemonProcess(folder, [sys.executable, "-m", "pieced.daemon.cli", "run",
                                   "--http-port", "0"], env=self.env)
        d.start()
        return d


def lt_to_lt(s: Setup) -> dict[str, Any]:
    with LtPeer(s.raw, s.src, seed=True) as seeder, \
            LtPeer(s.raw, fresh(s.work / "lt-leech"), seed=False) as leecher:
        lt0 = time.process_time()
        secs = leech(leecher, seeder.port)
        lt_cpu = time.process_time() - lt0  # (settle's sync is not CPU of this process)
        t0 = time.monotonic() - secs  # (when it began: the durable time counts from then)
        # What pieced-peer waits for before it ends (every piece verified and durable):
        # libtorrent's finished download, fdatasync'ed.
        for path in (s.work / "lt-leech").rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        durable = time.monotonic() - t0
    discard(s.work / "lt-leech", s.args.files > 1)
    return {"seconds": round(secs, 3), "mib_s": round(s.args.size_mib / secs, 1),
            "durable_seconds": round(durable, 3),
            "libtorrent_cpu_s_per_gib": round(lt_cpu / s.gib, 2),
            "total_cpu_s_per_gib": round(lt_cpu / s.gib, 2)}


def lt_to_pieced(s: Setup) -> dict[str, Any]:
    """A fresh daemon downloads the torrent; its folder goes once it is done."""
    daemon = s.daemon("daemon-down")
    sock = str(daemon.folder / "var" / "pieced.sock")
    try:
        with LtPeer(s.raw, s.src, seed=True) as seeder:
            settle()
            d0 = cpu_seconds(daemon.pid)
            lt0 = time.process_time()
            t0 = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "pieced.peer.command", str(s.torrent), "--save-path",
                 str(fresh(daemon.folder / "dl")), "--peer", f"127.0.0.1:{seeder.port}",
                 "--socket", sock, "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            cpu = 0.0
            prss = 0
            while proc.poll() is None:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
                    cpu = cpu_seconds(proc.pid)
                    prss = proc_status(proc.pid).get("VmHWM", prss)
                time.sleep(0.05)
            secs = time.monotonic() - t0
            lt_cpu = time.process_time() - lt0
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"pieced-peer failed: {stderr}")
            summary = json.loads(stdout)
            dcpu = cpu_seconds(daemon.pid) - d0
        rss = proc_status(daemon.pid).get("VmHWM", 0)
    finally:
        daemon.stop()
        discard(daemon.folder, s.args.files > 1)
    return {"seconds": round(secs, 3), "mib_s": round(s.args.size_mib / secs, 1),
            "plugin_cpu_s_per_gib": round(cpu / s.gib, 2),
            "daemon_cpu_s_per_gib": round(dcpu / s.gib, 2),
            "libtorrent_cpu_s_per_gib": round(lt_cpu / s.gib, 2),
            "total_cpu_s_per_gib": round((cpu + dcpu + lt_cpu) / s.gib, 2),
            "pieces_failed": summary["pieces_failed"],
            "daemon_peak_rss_mib": round(rss / 2**20, 1),
            "plugin_peak_rss_mib": round(prss / 2**20, 1)}


def pieced_to_lt(s: Setup) -> dict[str, Any]:
    """A daemon with the payload registered (checked, untimed) seeds it to a fresh
    libtorrent leecher through ``pieced-peer --seed``."""
    daemon = s.daemon("daemon-up")
    sock = str(daemon.folder / "var" / "pieced.sock")
    proc: subprocess.Popen[str] | None = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pieced.peer.command", str(s.torrent), "--save-path",
             str(s.src), "--listen", "127.0.0.1:0", "--seed", "--socket", sock, "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        port = int(proc.stderr.readline().rsplit(":", 1)[1])  # once registered and checked
        with LtPeer(s.raw, fresh(s.work / "leech"), seed=False) as leecher:
            settle()
            d0 = cpu_seconds(daemon.pid)
            p0 = cpu_seconds(proc.pid)
            lt0 = time.process_time()
            t0 = time.monotonic()
            leecher.connect("127.0.0.1", port)
            leecher.wait_finished(3600)
            secs = time.monotonic() - t0
            lt_cpu = time.process_time() - lt0
            pcpu = cpu_seconds(proc.pid) - p0
            dcpu = cpu_seconds(daemon.pid) - d0
            failures = leecher.hash_failures()
        prss = proc_status(proc.pid).get("VmHWM", 0)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
        summary = json.loads(stdout)
        rss = proc_status(daemon.pid).get("VmHWM", 0)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        daemon.stop()
        discard(daemon.folder, s.args.files > 1)
        discard(s.work / "leech", s.args.files > 1)
    return {"seconds": round(secs, 3), "mib_s": round(s.args.size_mib / secs, 1),
            "plugin_cpu_s_per_gib": round(pcpu / s.gib, 2),
            "daemon_cpu_s_per_gib": round(dcpu / s.gib, 2),
            "libtorrent_cpu_s_per_gib": round(lt_cpu / s.gib, 2),
            "total_cpu_s_per_gib": round((pcpu + dcpu + lt_cpu) / s.gib, 2),
            "leecher_hash_failures": failures, "suggests_sent": summary["suggests_sent"],
            "daemon_peak_rss_mib": round(rss / 2**20, 1),
            "plugin_peak_rss_mib": round(prss / 2**20, 1)}


RUN = {"lt_to_lt": lt_to_lt, "lt_to_pieced": lt_to_pieced, "pieced_to_lt": pieced_to_lt}


def run_kind(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--repeat`` rounds of the three transfers, the order turning by one each round
    (round 1: lt_to_lt first, round 2: lt_to_pieced first...): where a transfer comes in
    a round changes its time on this machine, so each takes each place in turn."""
    s = Setup(kind, args, work)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in TRANSFERS}
    orders = []
    for r in range(args.repeat):
        order = TRANSFERS[r % 3:] + TRANSFERS[: r % 3]
        orders.append(list(order))
        for name in order:
            log(f"{kind}: round {r + 1}: {name}")
            runs[name].append(RUN[name](s))
    best = {k: min(rows, key=lambda row: row["seconds"]) for k, rows in runs.items()}
    for key in ("lt_to_pieced", "pieced_to_lt"):
        best[key] = {**best[key],
                     "ratio_to_lt": round(best["lt_to_lt"]["seconds"] / best[key]["seconds"], 2)}
    durable = min(row["durable_seconds"] for row in runs["lt_to_lt"])
    best["lt_to_pieced"]["ratio_to_lt_durable"] = round(
        durable / best["lt_to_pieced"]["seconds"], 2)
    out: dict[str, Any] = dict(best)
    out["daemon_peak_rss_mib"] = max(row["daemon_peak_rss_mib"]
                                     for k in ("lt_to_pieced", "pieced_to_lt") for row in runs[k])
    out["daemon_budget_mib"] = args.cache_mib
    out["plugin_peak_rss_mib"] = max(row["plugin_peak_rss_mib"]
                                     for k in ("lt_to_pieced", "pieced_to_lt") for row in runs[k])
    out["orders"] = orders
    out["runs_seconds"] = {k: [row["seconds"] for row in rows] for k, rows in runs.items()}
    # The medians, beside the best rounds: a best round of lt_to_lt alone moves a ratio.
    med = {k: statistics.median(v) for k, v in out["runs_seconds"].items()}
    out["median_seconds"] = {k: round(v, 3) for k, v in med.items()}
    out["median_ratio_to_lt"] = {k: round(med["lt_to_lt"] / med[k], 2)
                                 for k in ("lt_to_pieced", "pieced_to_lt")}
    # CPU seconds of every process of a transfer, a GiB: what it costs the two cores,
    # which holds steady when the machine is busy and the wall clock does not.
    cpu = {k: statistics.median(row["total_cpu_s_per_gib"] for row in rows)
           for k, rows in runs.items()}
    out["median_total_cpu_s_per_gib"] = {k: round(v, 2) for k, v in cpu.items()}
    out["median_total_cpu_ratio_to_lt"] = {k: round(cpu["lt_to_lt"] / cpu[k], 2)
                                           for k in ("lt_to_pieced", "pieced_to_lt")}
    durable_med = statistics.median(row["durable_seconds"] for row in runs["lt_to_lt"])
    out["median_ratio_to_lt"]["lt_to_pieced_durable"] = round(
        durable_med / med["lt_to_pieced"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--piece-kib", type=int, default=4096)
    ap.add_argument("--files", type=int, default=1,
                    help="the payload in this many files of mixed small sizes (default: one)")
    ap.add_argument("--kinds", default="v1,hybrid")
    ap.add_argument("--cache-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the three transfers (their order turning each round); "
                         "each figure is from its best round")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "peer")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"size_mib": args.size_mib, "files": args.files, "piece_kib": args.piece_kib,
                              "cpus": os.cpu_count()}
    result["repeat"] = args.repeat
    try:
        for kind in args.kinds.split(","):
            result[kind] = run_kind(kind, args, work)
    finally:
        empty_trash()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
