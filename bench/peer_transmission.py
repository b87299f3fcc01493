#!/usr/bin/env python3
"""pieced-peer and libtorrent, each against Transmission, on the same torrent, in one run.

Prints one JSON object on stdout (progress on stderr). A v1 torrent (libtorrent-made:
Transmission 3.00 cannot read hybrid ones) of ``--size-mib`` MiB in one file, four
transfers over loopback TCP, each with a fresh Transmission (``tests/trpeer.py``):

``tr_to_lt``
    Transmission seeding to a libtorrent leecher (``tests/ltpeer.py``);
``tr_to_pieced``
    Transmission seeding to ``pieced-peer`` storing in a fresh daemon (until every piece
    is verified and durable: ``pieced-peer`` exits);
``lt_to_tr``
    a libtorrent seeder to a Transmission leecher;
``pieced_to_tr``
    a daemon with the payload registered and checked before the clock starts, through
    ``pieced-peer --seed``, to a Transmission leecher.

Seconds from the first connection (from starting ``pieced-peer`` for ``tr_to_pieced``)
until the leecher has every piece (Transmission: until it says it seeds). Transmission
unchokes and says it is interested only at its 10-second rounds, so a transfer takes at
least that. ``ratio``: libtorrent's seconds over pieced-peer's, in the same direction
(> 1: pieced-peer is faster). ``--repeat N``: N rounds, the order turning each round;
every figure is its best round's, every round's seconds in ``runs_seconds``.

    python bench/peer_transmission.py --size-mib 256 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peer_transfer import fresh, leech, log, settle  # noqa: E402
from tests.conftest import Daemon  # noqa: E402
from tests.ltpeer import LtPeer  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402
from tests.trpeer import Transmission  # noqa: E402


class Setup:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.work = work
        self.src = work / "src"
        content = make_payload(self.src, args.size_mib * 1024 * 1024, seed=2)
        self.raw = make_torrent_lt(content, args.piece_kib * 1024, "v1")
        self.torrent = work / "v1.torrent"
        self.torrent.write_bytes(self.raw)
        self.size_mib = args.size_mib


def _seconds(s: Setup, secs: float) -> dict[str, Any]:
    return {"seconds": round(secs, 3), "mib_s": round(s.size_mib / secs, 1)}


def tr_to_lt(s: Setup) -> dict[str, Any]:
    tr = Transmission(fresh(s.work / "tr"), s.torrent, s.src)
    try:
        tr.wait_seeding(600)  # its check of the payload, untimed
        with LtPeer(s.raw, fresh(s.work / "leech"), seed=False) as leecher:
            secs = leech(leecher, tr.port)
    finally:
        tr.close()
    return _seconds(s, secs)


def tr_to_pieced(s: Setup) -> dict[str, Any]:
    tr = Transmission(fresh(s.work / "tr"), s.torrent, s.src)
    folder = fresh(s.work / "daemon")
    d = Daemon(folder, env={"PIECED_ROOTS": str(s.work)})
    try:
        tr.wait_seeding(600)
        settle()
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "pieced.peer.command", str(s.torrent), "--save-path",
             str(folder / "dl"), "--peer", f"127.0.0.1:{tr.port}", "--socket", str(d.socket),
             "--json"], capture_output=True, text=True, timeout=3600)
        secs = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"pieced-peer failed: {r.stderr}")
        assert json.loads(r.stdout)["pieces_failed"] == 0
    finally:
        tr.close()
        d.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return _seconds(s, secs)


def lt_to_tr(s: Setup) -> dict[str, Any]:
    with LtPeer(s.raw, s.src, seed=True) as seeder:
        tr = Transmission(fresh(s.work / "tr"), s.torrent, fresh(s.work / "leech"))
        try:
            settle()
            t0 = time.monotonic()
            seeder.connect("127.0.0.1", tr.port)
            tr.wait_seeding(3600)
            secs = time.monotonic() - t0
        finally:
            tr.close()
    return _seconds(s, secs)


def pieced_to_tr(s: Setup) -> dict[str, Any]:
    folder = fresh(s.work / "daemon")
    d = Daemon(folder, env={"PIECED_ROOTS": str(s.work)})
    tr = Transmission(fresh(s.work / "tr"), s.torrent, fresh(s.work / "leech"))
    proc = None
    try:
        from pieced.protocol.client import Client

        with Client(d.socket) as c:  # registered and checked before the clock starts
            ih = c.register(s.raw, save_path=str(s.src))
            c.recheck(ih)
        settle()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pieced.peer.command", str(s.torrent), "--save-path",
             str(s.src), "--seed", "--peer", f"127.0.0.1:{tr.port}", "--socket",
             str(d.socket), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tr.wait_seeding(3600)
        secs = time.monotonic() - t0
    finally:
        if proc is not None:
            proc.terminate()
            proc.communicate(timeout=60)
        tr.close()
        d.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return _seconds(s, secs)


RUN = {"tr_to_lt": tr_to_lt, "tr_to_pieced": tr_to_pieced, "lt_to_tr": lt_to_tr,
       "pieced_to_tr": pieced_to_tr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--piece-kib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "transmission")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    s = Setup(args, work)
    names = list(RUN)
    runs: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeat):
        for name in names[r % 4:] + names[: r % 4]:
            log(f"round {r + 1}: {name}")
            runs[name].append(RUN[name](s)["seconds"])
    best = {k: min(v) for k, v in runs.items()}
    result: dict[str, Any] = {
        "size_mib": args.size_mib, "piece_kib": args.piece_kib, "repeat": args.repeat,
        "best_seconds": best,
        "runs_seconds": runs,
        "median_seconds": {k: round(statistics.median(v), 3) for k, v in runs.items()},
        "ratio": {"download": round(best["tr_to_lt"] / best["tr_to_pieced"], 2),
                  "seeding": round(best["lt_to_tr"] / best["pieced_to_tr"], 2)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
