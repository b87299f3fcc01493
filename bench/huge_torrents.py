#!/usr/bin/env python3
"""Registering, restarting with and removing a huge torrent, through a daemon, beside
libtorrent's parse-and-add of the same metainfo.

Prints one JSON object. The metainfo is made here (bencode.py): ``--files`` files of
``--file-bytes`` bytes each in folders of 1,000, ``--piece-kib`` pieces, random piece
hashes (nothing is verified; no payload is written). Timed: ``register`` (the
request, up to its reply), the first check a client runs after it (``recheck``, with
none of the files on disk yet), ``status``, a restart (SIGTERM, then a new ``pieced run``
up to its first answered request, start-up of the interpreter included;
``bare_start`` is the same with no torrent, for comparison) and ``unregister``. RSS
of the daemon after each. ``libtorrent``: in a fresh interpreter, ``torrent_info``
of the same bytes and ``add_torrent`` to a session, timed, with the RSS it added, and
the same added to check its (missing) files, timed up to the end of its check.

    python bench/huge_torrents.py --files 100000
    python bench/huge_torrents.py --files 100000 --kind v2
    python bench/huge_torrents.py --files 1 --file-bytes 17179869184 --piece-kib 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bencodepy  # noqa: E402
from pieced.protocol.client import Client  # noqa: E402

from bench.daemon_proc import DaemonProcess, proc_status  # noqa: E402


def rss_mib(pid: int) -> float:
    return round(proc_status(pid).get("VmRSS", 0) / 2**20, 1)


def started(folder: Path) -> tuple[DaemonProcess, float]:
    """A daemon, and the seconds from its launch to its first answered request."""
    d = DaemonProcess(folder, [sys.executable, "-m", "pieced.daemon.cli", "run",
                               "--http-port", "0"], env=dict(os.environ))
    t0 = time.perf_counter()
    d.start()
    with Client(str(folder / "var" / "pieced.sock")) as c:
        c.torrents()
    return d, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--file-bytes", type=int, default=1000)
    ap.add_argument("--piece-kib", type=int, default=64)
    ap.add_argument("--kind", choices=("v1", "v2"), default="v1",
                    help="v2: the files in a BEP 52 file tree (each file on pieces of its "
                    "own; files of a piece or less, so no piece layers)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "huge")
    args = ap.parse_args()
    n, size, piece = args.files, args.file_bytes, args.piece_kib * 1024
    rng = random.Random(1)
    if args.kind == "v2":
        if size > piece:
            ap.error("--kind v2 takes files of a piece or less (no piece layers are made)")
        tree: dict[bytes, dict[bytes, object]] = {}
        for i in range(n):
            leaf = {b"length": size, b"pieces root": rng.randbytes(32)}
            tree.setdefault(f"d{i // 1000}".encode(), {})[f"f{i}.bin".encode()] = {b"": leaf}
        pieces = n
        info: dict[bytes, object] = {b"name": b"many", b"piece length": piece,
                                     b"meta version": 2, b"file tree": tree}
        raw = bencodepy.encode({b"info": info, b"piece layers": {}})
    else:
        files = [{b"length": size, b"path": [f"d{i // 1000}".encode(), f"f{i}.bin".encode()]}
                 for i in range(n)]
        pieces = -(-n * size // piece)
        info = {b"name": b"many", b"piece length": piece, b"files": files,
                b"pieces": rng.randbytes(20 * pieces)}
        raw = bencodepy.encode({b"info": info})
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out: dict[str, object] = {"kind": args.kind, "files": n, "pieces": pieces,
                              "metainfo_bytes": len(raw)}

    d, secs = started(work / "bare")
    out["bare_start_s"] = round(secs, 3)
    d.stop()

    folder = work / "daemon"
    d, _ = started(folder)
    sock = str(folder / "var" / "pieced.sock")
    out["rss_idle_mib"] = rss_mib(d.pid)
    with Client(sock) as c:
        t0 = time.perf_counter()
        ih = c.register(raw, folder / "dl")
        out["register_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        c.recheck(ih)
        out["first_check_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        c.status(ih)
        out["status_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        c.status(ih, files=False)  # what a plugin asks: no per-file list
        out["status_no_files_s"] = round(time.perf_counter() - t0, 3)
    out["rss_registered_mib"] = rss_mib(d.pid)
    d.stop()
    d, secs = started(folder)
    out["restart_s"] = round(secs, 3)
    out["rss_restarted_mib"] = rss_mib(d.pid)
    with Client(sock) as c:
        t0 = time.perf_counter()
        c.unregister(ih)
        out["unregister_s"] = round(time.perf_counter() - t0, 3)
    out["rss_removed_mib"] = rss_mib(d.pid)
    d.stop()
    meta = work / "huge.torrent"
    meta.write_bytes(raw)
    lt = subprocess.run([sys.executable, "-c", LIBTORRENT, str(meta), str(work / "lt")],
                        capture_output=True, text=True, check=True)
    out["libtorrent"] = json.loads(lt.stdout)
    print(json.dumps(out, indent=2))


LIBTORRENT = """
import json, sys, time
import libtorrent as lt
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
s = lt.session({'enable_dht': False, 'enable_lsd': False, 'enable_upnp': False,
                'enable_natpmp': False, 'listen_interfaces': '127.0.0.1:0'})
raw = open(sys.argv[1], 'rb').read()
before = rss()
t0 = time.perf_counter()
ti = lt.torrent_info(raw)
parsed = time.perf_counter() - t0
h = s.add_torrent({'ti': ti, 'save_path': sys.argv[2],
                   'flags': lt.torrent_flags.paused | lt.torrent_flags.no_verify_files})
added = time.perf_counter() - t0
rss_added = round(rss() - before, 1)
s.remove_torrent(h)
t0 = time.perf_counter()
h = s.add_torrent({'ti': lt.torrent_info(raw), 'save_path': sys.argv[2] + '-checked'})
checking = (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)
while h.status().state in checking or not h.status().has_metadata:
    time.sleep(0.001)
checked = time.perf_counter() - t0
print(json.dumps({'parse_s': round(parsed, 3), 'parse_and_add_s': round(added, 3),
                  'rss_added_mib': rss_added, 'add_and_check_s': round(checked, 3)}))
"""


if __name__ == "__main__":
    main()
