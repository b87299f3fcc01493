#!/usr/bin/env python3
"""How long pieced-peer and libtorrent take to find the seeders among dead addresses.

Prints one JSON object on stdout (progress on stderr). A tracker on loopback (aiohttp,
the tests' ``_tracker``) answers every announce with ``--holes`` addresses that never
answer a dial (a listening socket whose one backlog place is taken: the kernel drops
every further SYN, so a connect waits for its timeout) and ``--seeders`` libtorrent
seeders, in a random order: what a public tracker hands out, where most peers sit behind
a NAT or are gone. A small v1 torrent (``--size-kib``) is then downloaded, each round,
by ``pieced-peer`` (default ``--max-peers`` 50) into a fresh daemon and by a libtorrent
leecher with its default dialling (``connection_speed`` 30 a second, connect timeout
15 s), the order turning each round. Seconds from the start of the download (the
``pieced-peer`` process, its interpreter's start included; the leecher's announce)
until every piece is in.

    python bench/peer_dials.py --holes 300 --seeders 2 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bencodepy  # noqa: E402

from tests.conftest import Daemon  # noqa: E402
from tests.ltpeer import LtPeer  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402
from tests.test_peer_libtorrent import (  # noqa: E402
    Blackholes,
    _compact,
    _tracker,
    _with_tracker,
    peer_cmd,
)


def log(msg: str) -> None:
    print(f"[peer_dials] {msg}", file=sys.stderr, flush=True)


def one(work: Path, who: str, raw: bytes, port: int) -> float:
    dl = work / "daemon" / f"dl-{who}"
    shutil.rmtree(dl, ignore_errors=True)
    if who == "pieced":
        (work / "daemon").mkdir(exist_ok=True)
        d = Daemon(work / "daemon")
        try:
            torrent = _with_tracker(raw, port, work / "t.torrent")
            t0 = time.monotonic()
            proc = subprocess.run(peer_cmd(torrent, dl, d.socket), capture_output=True,
                                  text=True, timeout=600)
            seconds = time.monotonic() - t0
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr)
        finally:
            d.stop()
            for f in (work / "daemon").iterdir():  # (the daemon's state and folders)
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink()
        return seconds
    with LtPeer(raw, dl, seed=False, settings={"connection_speed": 30,
                                               "peer_connect_timeout": 15}) as lp:
        t0 = time.monotonic()
        lp.handle.add_tracker({"url": f"http://127.0.0.1:{port}/announce"})
        lp.handle.force_reannounce()
        lp.wait_finished(600)
        return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--holes", type=int, default=300)
    ap.add_argument("--seeders", type=int, default=2)
    ap.add_argument("--size-kib", type=int, default=2560)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    random.seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="peer_dials-"))
    runs: dict[str, list[float]] = {"pieced": [], "libtorrent": []}
    try:
        content = make_payload(work / "seed", {"a.bin": args.size_kib * 1024 + 7}, seed=33)
        raw = make_torrent_lt(content, 65536, "v1")
        for r in range(args.rounds):
            holes = Blackholes(args.holes)
            seeders = [LtPeer(raw, work / "seed", seed=True) for _ in range(args.seeders)]
            try:
                ports = holes.ports + [s.port for s in seeders]
                random.shuffle(ports)
                reply = bencodepy.encode({b"interval": 600, b"peers": _compact(*ports)})
                with _tracker(lambda q, reply=reply: reply) as (port, _seen):
                    order = ["pieced", "libtorrent"] if r % 2 == 0 else ["libtorrent", "pieced"]
                    for who in order:
                        seconds = one(work, who, raw, port)
                        runs[who].append(round(seconds, 2))
                        log(f"round {r + 1}: {who} {seconds:.2f} s")
            finally:
                for s in seeders:
                    s.close()
                holes.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "holes": args.holes, "seeders": args.seeders, "size_kib": args.size_kib,
        "runs_seconds": runs,
        "median_seconds": {k: statistics.median(v) for k, v in runs.items()},
        "worst_seconds": {k: max(v) for k, v in runs.items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
