"""The ``pieced`` command.

Imports are deferred into each command: ``pieced verify`` is often run on big
data in scripts, and start-up time counts against it, so it must not pay for
the daemon's event loop, HTTP server or metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class ProgressBar:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    def __init__(self, total: int, unit_bytes: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.unit_bytes = unit_bytes
        self.stream = stream
        self.enabled = stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        width = 30
        fill = int(frac * width)
        rate = done * self.unit_bytes / max(now - self.start, 1e-9) / 2**20
        self.stream.write(
            f"\r[{'#' * fill}{'.' * (width - fill)}] {frac:6.1%} {done}/{total} pieces"
            f" {rate:8.1f} MiB/s"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def cmd_verify(args: argparse.Namespace) -> int:
    from pieced.storage.errors import PiecedError
    from pieced.storage.hashing import HashPool
    from pieced.storage.layout import Layout
    from pieced.storage.metainfo import parse
    from pieced.storage.verify import MmapReader, verify

    try:
        meta = parse(Path(args.torrent).read_bytes())
    except OSError as exc:
        print(f"pieced verify: cannot read {args.torrent}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PiecedError as exc:
        print(f"pieced verify: {args.torrent}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    data = Path(args.data)
    if not data.is_dir():
        print(f"pieced verify: --data {data} is not a directory", file=sys.stderr)
        return EXIT_BAD_INPUT

    started = time.monotonic()
    pool = HashPool(args.threads)
    reader = MmapReader(meta, data, Layout(meta))
    bar = ProgressBar(meta.num_pieces, meta.piece_length)
    try:
        result = verify(meta, reader, pool, bar)
    finally:
        pool.shutdown()
    elapsed = time.monotonic() - started

    report = {
        "name": meta.name,
        "info_hash_v1": meta.info_hash_v1.hex() if meta.info_hash_v1 else None,
        "info_hash_v2": meta.info_hash_v2.hex() if meta.info_hash_v2 else None,
        "num_pieces": meta.num_pieces,
        "piece_length": meta.piece_length,
        "total_size": meta.total_size,
        "failed_v1": result.failed_v1,
        "failed_v2": result.failed_v2,
        "ok": result.ok,
        "seconds": round(elapsed, 4),
    }
    if args.json:
        json.dump(report, sys.stdout)
        sys.stdout.write("\n")
    else:
        failed = sorted(set(result.failed_v1 or []) | set(result.failed_v2 or []))
        print(f"{meta.name}: {meta.num_pieces - len(failed)}/{meta.num_pieces} pieces verify")
        if result.failed_v1 is not None:
            print(f"  v1 failed: {_ranges(result.failed_v1) or 'none'}")
        if result.failed_v2 is not None:
            print(f"  v2 failed: {_ranges(result.failed_v2) or 'none'}")
    return EXIT_OK if result.ok else EXIT_FAILED


def _ranges(pieces: list[int]) -> str:
    """'1-3, 7' for [1, 2, 3, 7]: long failure lists stay readable."""
    out: list[str] = []
    for p in pieces:
        if out and out[-1].split("-")[-1] == str(p - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ", ".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pieced", description="BitTorrent piece-storage daemon")
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="verify a torrent's data on disk, offline (no daemon)")
    v.add_argument("torrent", help="the .torrent file")
    v.add_argument("--data", required=True, help="the save path: the folder holding the payload")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--threads", type=int, default=None, help="hashing threads (default: cores)")
    v.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_BAD_INPUT if exc.code else EXIT_OK
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
