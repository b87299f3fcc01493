#!/usr/bin/env python3
"""Reads through ``AsyncClient`` with many in flight: does a reply wake only its waiter?

Prints one JSON object. A daemon (fresh, in ``--workdir``) holds a verified torrent of
``--size-mib`` MiB; one ``AsyncClient`` reads every 16 KiB block of it with ``--inflight``
reads outstanding at a time (that many tasks, each reading the next block), for
each value of ``--inflight``, best of ``--repeat``. If every reply woke every waiting
task, a reply would cost O(reads in flight) and 512 in flight would be slower than 64;
with a wake per waiter the rate does not fall as the number in flight grows.
``daemon_cpu_s_per_gib``: the daemon's user + system CPU over the best round, per GiB
read (what seeding costs it, as ``pieced-peer`` reads 1 MiB at a time);
``client_cpu_s_per_gib``: this process's, the reader's side.

``--via`` says how the bytes come: ``data`` (``read_chunk``: a DATA reply, a new bytes
each), ``into`` (``read_chunk_into``: the DATA reply copied into a buffer of the
reader's, used again) or ``ring`` (``read_chunk_ring``: READ_RING, the daemon puts the
bytes into the client's shared ring and only headers cross the socket; what
``pieced-peer`` seeds with). Each result is under ``via`` -> its name.

The same for writes: ``write_chunk`` (WRITE, the block's bytes in the stream after its
header: many tasks writing at once fill the socket, and their frames queue in the
client) and ``write_ring`` (``write_block_direct``: the block copied into the shared
ring, a WRITE_RING header on the socket). Each round registers the torrent anew in an
empty folder (deleted after), writes every block of it with ``--inflight`` writing
tasks, and stops the clock when every write is acknowledged (writes and reads are
measured in separate runs).

    python bench/async_reads.py --inflight 1,64,512
    python bench/async_reads.py --size-mib 1024 --piece-kib 4096 --read-kib 1024 --inflight 8 --via data,into,ring
    python bench/async_reads.py --size-mib 256 --inflight 64 --via write_chunk,write_ring
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pieced.protocol.client import AsyncClient, Client  # noqa: E402

from bench.daemon_proc import DaemonProcess, cpu_seconds  # noqa: E402
from tests.realtools import make_payload, make_torrent_lt  # noqa: E402


async def read_all(sock: str, ih: bytes, blocks: list[tuple[int, int]], inflight: int,
                   size: int, via: str) -> float:
    async with AsyncClient(sock, window=inflight) as c:
        if via == "ring":
            await c.attach_ring(max(16 << 20, 2 * inflight * size))
        todo = iter(blocks)

        async def reader() -> None:
            buf = memoryview(bytearray(size))
            for piece, begin in todo:
                if via == "data":
                    data = await c.read_chunk(ih, piece, begin, size)
                    assert len(data) == size
                elif via == "into":
                    assert await c.read_chunk_into(ih, piece, begin, buf) == size
                else:
                    with await c.read_chunk_ring(ih, piece, begin, size) as chunk:
                        assert chunk.data.nbytes == size

        t0 = time.perf_counter()
        await asyncio.gather(*(reader() for _ in range(inflight)))
        return time.perf_counter() - t0


async def write_all(sock: str, raw: bytes, save: Path, data: memoryview,
                    blocks: list[tuple[int, int]], inflight: int, piece: int, size: int,
                    via: str) -> float:
    async with AsyncClient(sock, window=inflight) as c:
        ih = await c.register(raw, save)
        if via == "write_ring":
            await c.attach_ring(max(16 << 20, 2 * inflight * size))
        todo = iter(blocks)

        async def writer() -> None:
            for p, b in todo:
                block = data[p * piece + b : p * piece + b + size]
                if via == "write_chunk":
                    await c.write_chunk(ih, p, b, block)
                else:
                    await c.write_block_direct(ih, p, b, block)

        t0 = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(inflight)))
        await c.wait_writes()
        secs = time.perf_counter() - t0
        await c.unregister(ih, delete_files=True)
        return secs


WRITES = ("write_chunk", "write_ring")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--inflight", default="1,64,512")
    ap.add_argument("--piece-kib", type=int, default=1024)
    ap.add_argument("--read-kib", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--via", default="data", help="comma-separated: data, into, ring, write_chunk, write_ring")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "async_reads")
    args = ap.parse_args()
    work = args.workdir.resolve()
    shutil.rmtree(work / "daemon", ignore_errors=True)
    content = make_payload(work / "src", {"data.bin": args.size_mib * 1024 * 1024}, seed=4)
    piece, size = args.piece_kib * 1024, args.read_kib * 1024
    raw = make_torrent_lt(content, piece, "v1")
    daemon = DaemonProcess(work / "daemon", [sys.executable, "-m", "pieced.daemon.cli", "run",
                                             "--http-port", "0"],
                           env={**os.environ, "PIECED_ROOTS": str(work)})
    daemon.start()
    sock = str(work / "daemon" / "var" / "pieced.sock")
    out: dict[str, object] = {"size_mib": args.size_mib, "piece": piece, "block": size}
    results: dict[str, dict[str, object]] = {}
    out["via"] = results
    try:
        with Client(sock) as c:
            ih = c.register(raw, work / "src")
            assert c.recheck(ih)["verified"] == args.size_mib * 1024 * 1024 // piece
        blocks = [(p, b) for p in range(args.size_mib * 1024 * 1024 // piece)
                  for b in range(0, piece, size)]
        vias = args.via.split(",")
        if any(v in WRITES for v in vias):
            if not all(v in WRITES for v in vias):
                raise SystemExit("--via: give reads or writes, not both in one run")
            with Client(sock) as c:  # written anew, into an empty folder, every round
                c.unregister(ih)
            data = memoryview((content / "data.bin").read_bytes()
                              if content.is_dir() else content.read_bytes())
        for n in (int(x) for x in args.inflight.split(",")):
            rounds: dict[str, list[tuple[float, float, float]]] = {v: [] for v in vias}
            for _ in range(args.repeat):  # the ways interleaved, round by round
                for via in vias:
                    c0, p0 = cpu_seconds(daemon.pid), time.process_time()
                    if via in WRITES:
                        secs = asyncio.run(write_all(sock, raw, work / "dl", data, blocks, n,
                                                     piece, size, via))
                    else:
                        secs = asyncio.run(read_all(sock, ih, blocks, n, size, via))
                    rounds[via].append((secs, cpu_seconds(daemon.pid) - c0,
                                        time.process_time() - p0))
            for via in vias:
                best, cpu, mine = min(rounds[via])
                results.setdefault(via, {})[f"inflight_{n}"] = {
                    "seconds": round(best, 3), "calls_per_s": round(len(blocks) / best),
                    "mib_s": round(args.size_mib / best, 1),
                    "daemon_cpu_s_per_gib": round(cpu * 1024 / args.size_mib, 2),
                    "client_cpu_s_per_gib": round(mine * 1024 / args.size_mib, 2)}
                print(f"{via}, {n} in flight: {best:.3f} s", file=sys.stderr, flush=True)
    finally:
        daemon.stop()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
