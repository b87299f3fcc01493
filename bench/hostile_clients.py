#!/usr/bin/env python3
"""What clients that do not play by the rules cost the daemon, and the clients that do.

Prints one JSON object on stdout. A daemon on its defaults (but the options given) in a
folder of its own under ``--workdir``, a torrent of ``--size-mib`` registered and
checked over data in its save path, then two cases, each with a fresh daemon:

``reads_unread``
    ``--conns`` connections each send ``--reads`` READs of ``--read-mib`` MiB (a quarter
    of a piece or less: each reply is a copy of its own, not a view of the cache) and
    read nothing. Meanwhile, for ``--seconds``, another client reads 16 KiB and 1 MiB
    blocks in turn and asks ``stats``: the daemon's RSS above what it was before (its
    cache warm with the torrent), the most ``unsent_bytes`` seen, and the slowest of the
    other client's reads.
``request_flood``
    ``--flood-conns`` connections each send ``--flood-requests`` READs of a torrent the
    daemon does not have (each answered with an error: no disk work), all at once, then
    read their replies; another client asks ``stats`` every 20 ms meanwhile: how long
    the flood took to be answered, and the other client's waits (median, 90th
    percentile, most).

The daemon runs from this checkout; with ``PYTHONPATH`` set to a tree of another
version's packages (``pieced/daemon``, ``pieced/storage``...), from that one, for a
comparison on the same machine in the same hour.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pieced.protocol.client import Client  # noqa: E402
from pieced.protocol.frames import encode_read  # noqa: E402

from bench.daemon_proc import DaemonProcess, proc_status  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402
from tests.test_daemon import RawConn  # noqa: E402

MiB = 1024 * 1024


def _daemon(folder: Path, env: dict[str, str]) -> DaemonProcess:
    d = DaemonProcess(folder, [sys.executable, "-m", "pieced.daemon.cli", "run",
                               "--http-port", "0"], env={**os.environ, **env})
    d.start()
    return d


def reads_unread(work: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    folder = work / "unread"
    piece = 16 * MiB
    content = make_payload(folder / "data", args.size_mib * MiB, seed=1)
    data = content.read_bytes()
    raw = make_torrent_lt(content, piece, "v1")
    pieces = -(-len(data) // piece)
    d = _daemon(folder, env)
    conns: list[RawConn] = []
    try:
        sock = folder / "var" / "pieced.sock"
        with Client(sock) as c:
            ih = c.register(raw, folder / "data")
            c.recheck(ih)
            step = min(8 * MiB - 8, piece)
            for p in range(pieces):  # (the cache warm: the baseline holds the pieces)
                for b in range(0, piece, step):
                    c.read_chunk(ih, p, b, min(step, piece - b))
            before = proc_status(d.pid)["VmRSS"]
            length = args.read_mib * MiB
            for i in range(args.conns):
                rc = RawConn(sock)
                rc.sock.sendall(b"".join(
                    encode_read(j + 1, ih, (i + j) % pieces, (j % 4) * length, length)
                    for j in range(args.reads)))
                conns.append(rc)
            peak_rss, peak_unsent = 0, -1
            small: list[float] = []
            big: list[float] = []
            end = time.monotonic() + args.seconds
            k = 0
            while time.monotonic() < end:
                t = time.monotonic()
                c.read_chunk(ih, k % pieces, 16384, 16384)
                small.append(time.monotonic() - t)
                t = time.monotonic()
                c.read_chunk(ih, k % pieces, MiB, MiB)
                big.append(time.monotonic() - t)
                k += 1
                peak_unsent = max(peak_unsent, c.stats().get("unsent_bytes", -1))
                peak_rss = max(peak_rss, proc_status(d.pid)["VmRSS"])
            stats = c.stats()
        return {
            "conns": args.conns, "reads_each": args.reads, "read_mib": args.read_mib,
            "asked_mib": args.conns * args.reads * args.read_mib,
            "rss_growth_mib": round((peak_rss - before) / MiB, 1),
            "unsent_mib_at_most": round(peak_unsent / MiB, 1) if peak_unsent >= 0 else None,
            "other_client_16k_read_s": {"median": round(statistics.median(small), 4),
                                        "max": round(max(small), 4)},
            "other_client_1m_read_s": {"median": round(statistics.median(big), 4),
                                       "max": round(max(big), 4)},
            "other_client_rounds": k,
            "clients_dropped": stats["clients_dropped"],
        }
    finally:
        for rc in conns:
            rc.sock.close()
        d.stop()


def request_flood(work: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    folder = work / "flood"
    d = _daemon(folder, env)
    try:
        sock = folder / "var" / "pieced.sock"
        unknown = bytes(range(20))
        flood = b"".join(encode_read(j + 1, unknown, 0, 0, 1)
                         for j in range(args.flood_requests))
        conns = [RawConn(sock) for _ in range(args.flood_conns)]
        waits: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with Client(sock) as c:
                while not stop.is_set():
                    t = time.monotonic()
                    c.stats()
                    waits.append(time.monotonic() - t)
                    time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(0.3)
        before = len(waits)
        t0 = time.monotonic()
        for rc in conns:
            rc.sock.sendall(flood)
        for rc in conns:
            rc.replies(args.flood_requests)
        took = time.monotonic() - t0
        stop.set()
        prober.join()
        for rc in conns:
            rc.sock.close()
        during = sorted(waits[before:])
        return {
            "conns": args.flood_conns, "requests_each": args.flood_requests,
            "flood_answered_s": round(took, 2),
            "other_client_stats_s": {
                "median": round(statistics.median(during), 4),
                "p90": round(during[int(len(during) * 0.9)], 4),
                "max": round(during[-1], 4), "asked": len(during)},
        }
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "hostile")
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--reads", type=int, default=3)
    ap.add_argument("--read-mib", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--flood-conns", type=int, default=100)
    ap.add_argument("--flood-requests", type=int, default=4000)
    ap.add_argument("--max-unsent-mib", type=int, default=None,
                    help="the daemon's max_unsent_bytes (default: its own)")
    ap.add_argument("--cases", nargs="+", default=["reads_unread", "request_flood"],
                    choices=["reads_unread", "request_flood"])
    args = ap.parse_args()
    env = {}
    if args.max_unsent_mib is not None:
        env["PIECED_MAX_UNSENT_BYTES"] = str(args.max_unsent_mib * MiB)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"benchmark": "hostile_clients", "cpus": os.cpu_count(),
                           "daemon_from": os.environ.get("PYTHONPATH") or str(REPO),
                           "load_average_at_start": list(os.getloadavg())}
    cases = {"reads_unread": reads_unread, "request_flood": request_flood}
    for name in args.cases:
        out[name] = cases[name](work, args, env)
        print(f"[hostile_clients] {name}: {json.dumps(out[name])}", file=sys.stderr)
    out["load_average_at_end"] = list(os.getloadavg())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
