#!/usr/bin/env python3
"""Does a client polling the HTTP reports slow down the daemon's socket clients?

Prints one JSON object on stdout (progress goes to stderr). A real daemon (`pieced run`,
in ``--workdir``) gets ``--torrents`` torrents of ``--files`` files each (made by hand,
nothing written: their /torrents report is what costs), and one real torrent of
``--payload-mib`` MiB (made by libtorrent) that a socket client writes, 16 KiB blocks
inline with ``write_chunk``, for ``--seconds`` seconds (again and again, into a fresh
folder each time, the torrent registered anew).
It does so in turn with nobody else there (``alone``) and while one HTTP client asks
for /torrents again and again, each request right after the last answer (``polled``);
``--rounds`` times each, interleaved. Reported: the writer's MB/s and the round-trip
of a ``stats`` request asked every 20 ms meanwhile (median and 99th percentile), the
reports answered and how long each took, and ``ratio`` = polled MB/s / alone MB/s
(best round of each). The daemon builds a report off its loop, then rests four times as
long before the next (``daemon/http.py``: PACE), so that reports take about a fifth of
it at most.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import bencodepy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pieced.protocol.client import Client  # noqa: E402

from bench.daemon_proc import DaemonProcess  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402

BLOCK = 16384


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def empty_torrent(i: int, files: int) -> bytes:
    """A v1 torrent of ``files`` files and 100 pieces of 16 KiB, its hashes made up."""
    each = 100 * BLOCK // files
    info = {b"name": f"t{i:05d}".encode(), b"piece length": BLOCK,
            b"files": [{b"length": each, b"path": [f"f{j}.bin".encode()]} for j in range(files)],
            b"pieces": hashlib.sha1(str(i).encode()).digest() * -(-each * files // BLOCK)}
    return bencodepy.encode({b"info": info})


def poll(url: str, stop: threading.Event, answers: list[float], sizes: list[int]) -> None:
    """Ask for ``url`` again and again, each request right after the last answer."""
    while not stop.is_set():
        t1 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as resp:
            sizes.append(len(resp.read()))
        answers.append(time.perf_counter() - t1)


def write_for(sock: str, raw: bytes, data: bytes, piece: int, save: Path,
              seconds: float) -> tuple[float, list[float]]:
    """(MB/s written, stats round-trips in ms) over ``seconds``."""
    shutil.rmtree(save, ignore_errors=True)
    rtts: list[float] = []
    done = threading.Event()

    def ping() -> None:
        with Client(sock) as c:
            while not done.is_set():
                t0 = time.perf_counter()
                c.stats()
                rtts.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.02)

    pinger = threading.Thread(target=ping)
    with Client(sock) as c:
        ih = c.register(raw, save)
        pinger.start()
        start = time.monotonic()
        sent = at = 0
        try:
            while time.monotonic() - start < seconds:
                if at == len(data):  # all of it written: again, into a fresh folder
                    c.wait_writes()
                    c.unregister(ih, delete_files=True)
                    ih, at = c.register(raw, save), 0
                c.write_chunk(ih, at // piece, at % piece, data[at:at + BLOCK])
                at += BLOCK
                sent += BLOCK
            c.wait_writes()
            took = time.monotonic() - start
        finally:
            done.set()
            pinger.join()
        c.unregister(ih, delete_files=True)
    return sent / took / 1e6, rtts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torrents", type=int, default=1000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--payload-mib", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "http_load")
    args = ap.parse_args()
    work = args.workdir.resolve()
    shutil.rmtree(work / "daemon", ignore_errors=True)
    content = make_payload(work / "src", {"data.bin": args.payload_mib << 20}, seed=12)
    piece = 256 * 1024
    raw = make_torrent_lt(content, piece, "v1")
    data = (content / "data.bin").read_bytes()
    port = free_port()
    daemon = DaemonProcess(work / "daemon", [sys.executable, "-m", "pieced.daemon.cli", "run",
                                             "--http-port", str(port)],
                           env={**os.environ, "PIECED_ROOTS": str(work)})
    daemon.start()
    sock = str(work / "daemon" / "var" / "pieced.sock")
    out: dict[str, object] = {"benchmark": "http_load", "torrents": args.torrents,
                              "files_each": args.files, "seconds": args.seconds,
                              "cpus": os.cpu_count()}
    try:
        t0 = time.monotonic()
        with Client(sock) as c:
            for i in range(args.torrents):
                c.register(empty_torrent(i, args.files), work / "many")
        out["register_seconds"] = round(time.monotonic() - t0, 2)
        url = f"http://127.0.0.1:{port}/torrents"
        runs: dict[str, list[dict[str, object]]] = {"alone": [], "polled": []}
        for r in range(args.rounds):
            for kind in ("alone", "polled"):
                stop = threading.Event()
                answers: list[float] = []
                sizes: list[int] = []
                poller = threading.Thread(target=poll, args=(url, stop, answers, sizes))
                if kind == "polled":
                    poller.start()
                try:
                    mbps, rtts = write_for(sock, raw, data, piece, work / "dl", args.seconds)
                finally:
                    stop.set()
                    if kind == "polled":
                        poller.join()
                rtts.sort()
                row: dict[str, object] = {
                    "mb_per_s": round(mbps, 1),
                    "stats_rtt_p50_ms": round(statistics.median(rtts), 2),
                    "stats_rtt_p99_ms": round(rtts[int(0.99 * (len(rtts) - 1))], 2),
                    "reports": len(answers),
                    "report_bytes": max(sizes, default=0),
                    "report_seconds_median": round(statistics.median(answers), 3)
                    if answers else None,
                }
                runs[kind].append(row)
                print(f"[http_load] round {r + 1} {kind}: {row}", file=sys.stderr, flush=True)
        out["runs"] = runs
        best = {k: max(float(str(x["mb_per_s"])) for x in v) for k, v in runs.items()}
        out["ratio"] = round(best["polled"] / best["alone"], 3)
    finally:
        daemon.stop()
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
