#!/usr/bin/env python3
"""Does a client polling the HTTP reports slow down the daemon's socket clients?

Prints one JSON object on stdout (progress goes to stderr). A real daemon (`pieced run`,
in ``--workdir``) gets ``--torrents`` torrents of ``--files`` files each (made by hand,
nothing written: their /torrents report is what costs), and one real torrent of
``--payload-mib`` MiB (made by libtorrent) that a socket client writes, 16 KiB blocks
inline with ``write_chunk``, for ``--seconds`` seconds (again and again, into a fresh
folder each time, the torrent registered anew).
It does so in turn with nobody else there (``alone``) and while ``--pollers`` HTTP
clients (one by default) ask for ``--path`` (/torrents by default; /metrics, /stats)
again and again, each request right after the last answer (``polled``);
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
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import bencodepy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pieced.protocol.client import Client  # noqa: E402

from bench.daemon_proc import DaemonProcess  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402

BLOCK = 16384


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


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


def poll(url: str, stop: Any, out: Any) -> None:
    """Ask for ``url`` again and again, each request right after the last answer; put
    (seconds of each answer, sizes) on ``out`` once ``stop`` is set. A process of its
    own: threads of this one would take the writer's interpreter lock."""
    answers: list[float] = []
    sizes: list[int] = []
    while not stop.is_set():
        t1 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as resp:
            sizes.append(len(resp.read()))
        answers.append(time.perf_counter() - t1)
    out.put((answers, sizes))


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
    ap.add_argument("--path", default="/torrents",
                    help="what the pollers ask for: /torrents, /metrics, /stats")
    ap.add_argument("--pollers", type=int, default=1, help="HTTP clients polling at once")
    ap.add_argument("--elsewhere", action="store_true",
                    help="also with the pollers asking a bare server in another process")
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
        url = f"http://127.0.0.1:{port}{args.path}"
        out["path"], out["pollers"] = args.path, args.pollers
        kinds = ["alone", "polled"]
        control = None
        if args.elsewhere:
            # The same pollers asking a bare aiohttp server, a process of its own, for a
            # body as long: what the polling takes from the machine's cores wherever it
            # is answered (polled / elsewhere is then what it costs the daemon itself).
            size = len(urllib.request.urlopen(url, timeout=60).read())
            elsewhere = free_port()
            control = subprocess.Popen([sys.executable, "-c", (
                "import sys; from aiohttp import web; body = b'x' * int(sys.argv[2]); "
                "app = web.Application(); "
                "app.router.add_get('/{p:.*}', lambda r: web.Response(body=body)); "
                "web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]), access_log=None, "
                "print=None)"), str(elsewhere), str(size)])
            wait_port(elsewhere)
            kinds.append("elsewhere")
        runs: dict[str, list[dict[str, object]]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            for kind in kinds:
                target = url if kind != "elsewhere" else f"http://127.0.0.1:{elsewhere}{args.path}"
                stop = multiprocessing.Event()
                got: Any = multiprocessing.Queue()
                answers: list[float] = []
                sizes: list[int] = []
                pollers = [multiprocessing.Process(target=poll, args=(target, stop, got))
                           for _ in range(args.pollers if kind != "alone" else 0)]
                for t in pollers:
                    t.start()
                try:
                    mbps, rtts = write_for(sock, raw, data, piece, work / "dl", args.seconds)
                finally:
                    stop.set()
                    for _ in pollers:
                        a, z = got.get(timeout=120)
                        answers += a
                        sizes += z
                    for t in pollers:
                        t.join()
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
        if control is not None:
            out["ratio_to_elsewhere"] = round(best["polled"] / best["elsewhere"], 3)
    finally:
        if control is not None:
            control.terminate()
            control.wait()
        daemon.stop()
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
