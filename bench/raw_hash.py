#!/usr/bin/env python3
"""The physical limit for checking a torrent's data: hash it and nothing else.

``bench/recheck.py`` times real checkers (libtorrent, ``pieced verify``) as whole
processes and compares them with this script, run the same way, so that "fraction of the
limit" means something: it does the same hashing work as a full recheck of a v1, v2 or
hybrid torrent, on all cores, with as little else as Python allows:

* every file is ``mmap``-ed read-only and hashed through ``memoryview`` slices, so the
  bytes go straight from the page cache into OpenSSL with no ``read()`` copy;
* ``MADV_SEQUENTIAL`` asks for aggressive read-ahead should the cache be cold; the pages
  are otherwise left to fault in, inside the hash calls, with the GIL released. Measured
  here (1 GiB, warm cache, 2 cores): pre-faulting is a loss, not a win. ``MAP_POPULATE``
  does all the mapping in one thread up front and ``MADV_POPULATE_READ`` per batch adds
  a syscall that takes the mm lock; both were ~10% slower than plain fault-around;
* ``hashlib`` drops the GIL for buffers of 2 KiB and more, so a
  ``ThreadPoolExecutor(os.cpu_count())`` really hashes on every core; each worker gets a
  contiguous run of pieces so that the per-task overhead is paid rarely;
* v1: one SHA-1 per piece (``update`` per file segment when a piece spans files; BEP 47
  pad files and v2 alignment gaps hashed as zeros from a preallocated buffer);
* v2 (and the v2 half of hybrid): SHA-256 of every 16 KiB block (the BEP 52 leaves), then
  the merkle tree up to the piece layer (or to the pieces root for files of one piece
  or less). Those 64-byte inner hashes are a few percent of the work at most.

The digests are compared with the torrent's (``pieces``, ``piece layers``, ``pieces
root``), so this is a verifier in its own right, just one with no I/O scheduling, no
resume data and no error handling worth the name. Stdlib only (it has its own tiny
bdecoder) so that interpreter start-up is the only fixed cost.

``--blake3`` instead does the work of a fingerprint recheck: one BLAKE3 per piece (of
its stored bytes: pads left out) and nothing else; there is nothing to compare them with, so
it verifies nothing. That is the limit for ``pieced recheck`` of fingerprinted data.

Usage: ``raw_hash.py TORRENT SAVE_PATH [--threads N] [--no-verify] [--blake3]``. Prints
one JSON object; exit status 0 when every piece matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCK = 16384


# --------------------------------------------------------------------------- bencode


def bdecode(data: bytes) -> Any:
    """Decode bencoded ``data`` (dict keys stay ``bytes``)."""

    def item(i: int) -> tuple[Any, int]:
        c = data[i]
        if c == 0x69:  # i<int>e
            end = data.index(b"e", i)
            return int(data[i + 1 : end]), end + 1
        if c == 0x6C:  # l...e
            out: list[Any] = []
            i += 1
            while data[i] != 0x65:
                v, i = item(i)
                out.append(v)
            return out, i + 1
        if c == 0x64:  # d...e
            d: dict[bytes, Any] = {}
            i += 1
            while data[i] != 0x65:
                k, i = item(i)
                d[k], i = item(i)
            return d, i + 1
        colon = data.index(b":", i)
        n = int(data[i:colon])
        return data[colon + 1 : colon + 1 + n], colon + 1 + n

    value, end = item(0)
    if end != len(data):
        raise ValueError("trailing data after bencoded value")
    return value


# --------------------------------------------------------------------------- layout


@dataclass
class Span:
    """A file (or, with ``path`` None, zero padding) in the torrent's piece space."""

    path: Path | None
    offset: int
    size: int
    pieces_root: bytes | None = None


def layout(meta: dict[bytes, Any], save_path: Path) -> tuple[list[Span], int]:
    """Files of the torrent in piece-space order, and the piece-space length.

    v1 and hybrid: the ``files`` list as is (pad files become zero spans); hybrid files
    also get their v2 ``pieces root``. v2-only: the file tree in key order with each
    non-empty file moved up to a piece boundary (the gap is implicit zero padding).
    """
    info = meta[b"info"]
    pl = info[b"piece length"]
    name = info[b"name"].decode()
    roots: dict[tuple[bytes, ...], bytes] = {}

    def walk(
        tree: dict[bytes, Any], prefix: tuple[bytes, ...]
    ) -> list[tuple[tuple[bytes, ...], int]]:
        out = []
        for k in sorted(tree):
            node = tree[k]
            if b"" in node:
                leaf = node[b""]
                if leaf[b"length"]:
                    roots[(*prefix, k)] = leaf[b"pieces root"]
                out.append(((*prefix, k), leaf[b"length"]))
            else:
                out.extend(walk(node, (*prefix, k)))
        return out

    tree_files = walk(info[b"file tree"], ()) if b"file tree" in info else []
    spans: list[Span] = []
    offset = 0
    if b"length" in info:  # single-file v1 / hybrid
        spans.append(Span(save_path / name, 0, info[b"length"], roots.get((info[b"name"],))))
        offset = info[b"length"]
    elif b"files" in info:
        for e in info[b"files"]:
            parts = tuple(e[b"path"])
            if b"p" in e.get(b"attr", b""):
                spans.append(Span(None, offset, e[b"length"]))
            else:
                path = save_path.joinpath(name, *(p.decode() for p in parts))
                spans.append(Span(path, offset, e[b"length"], roots.get(parts)))
            offset += e[b"length"]
    else:  # v2 only
        single = len(tree_files) == 1 and tree_files[0][0] == (info[b"name"],)
        for parts, size in tree_files:
            if size:
                offset = -(-offset // pl) * pl
            path = (
                save_path / name
                if single
                else save_path.joinpath(name, *(p.decode() for p in parts))
            )
            spans.append(Span(path, offset, size, roots.get(parts)))
            offset += size
    return spans, offset


# --------------------------------------------------------------------------- hashing


def merkle_root(leaves: list[bytes], width: int) -> bytes:
    """Root of a SHA-256 tree over ``leaves`` padded with zero hashes to ``width``."""
    layer = leaves + [bytes(32)] * (width - len(leaves))
    sha256 = hashlib.sha256
    while len(layer) > 1:
        layer = [sha256(layer[j] + layer[j + 1]).digest() for j in range(0, len(layer), 2)]
    return layer[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("torrent", type=Path)
    ap.add_argument("save_path", type=Path)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-verify", action="store_true", help="hash leaves/pieces only")
    ap.add_argument("--blake3", action="store_true", help="one BLAKE3 per piece, no check")
    args = ap.parse_args()
    t0 = time.perf_counter()

    meta = bdecode(args.torrent.read_bytes())
    info = meta[b"info"]
    pl: int = info[b"piece length"]
    v1_hashes: bytes | None = info.get(b"pieces")
    has_v2 = b"file tree" in info
    piece_layers: dict[bytes, bytes] = meta.get(b"piece layers", {})
    spans, total = layout(meta, args.save_path)
    num_pieces = -(-total // pl)
    verify = not args.no_verify and not args.blake3
    if args.blake3:
        from blake3 import blake3  # the runtime dependency pieced fingerprints with

    # Map every real, non-empty file; keep one memoryview per file for zero-copy slices.
    maps: list[mmap.mmap] = []
    views: dict[int, memoryview] = {}
    for idx, s in enumerate(spans):
        if s.path is not None and s.size:
            with s.path.open("rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            m.madvise(mmap.MADV_SEQUENTIAL)
            if len(m) != s.size:
                raise SystemExit(f"{s.path}: {len(m)} bytes on disk, torrent says {s.size}")
            maps.append(m)
            views[idx] = memoryview(m)

    # Piece -> [(span index or -1 for zeros, start in span, length)].
    segments: list[list[tuple[int, int, int]]] = [[] for _ in range(num_pieces)]
    for idx, s in enumerate(spans):
        pos, end = s.offset, s.offset + s.size
        src = idx if idx in views else -1
        while pos < end:
            p = pos // pl
            n = min(end, (p + 1) * pl) - pos
            segments[p].append((src, pos - s.offset, n))
            pos += n
    zeros = memoryview(bytes(pl))
    blocks_per_piece = pl // BLOCK

    def work(batch: range) -> tuple[list[int], list[int]]:
        sha1, sha256 = hashlib.sha1, hashlib.sha256
        bad1: list[int] = []
        bad2: list[int] = []
        for p in batch:
            segs = segments[p]
            if args.blake3:
                b = blake3()
                for src, a, n in segs:
                    if src >= 0:  # (pads left out, as pieced's fingerprints leave them)
                        b.update(views[src][a : a + n])
                b.digest(16)
                continue
            if v1_hashes is not None:
                if len(segs) == 1:
                    src, a, n = segs[0]
                    d = sha1(views[src][a : a + n] if src >= 0 else zeros[:n]).digest()
                else:
                    h = sha1()
                    for src, a, n in segs:
                        h.update(views[src][a : a + n] if src >= 0 else zeros[:n])
                    d = h.digest()
                if verify and d != v1_hashes[20 * p : 20 * p + 20]:
                    bad1.append(p)
            if has_v2:
                # In v2 piece space a piece holds data of at most one file.
                for src, a, n in segs:
                    if src < 0:
                        continue
                    v = views[src]
                    leaves = [
                        sha256(v[o : min(o + BLOCK, a + n)]).digest()
                        for o in range(a, a + n, BLOCK)
                    ]
                    if not verify:
                        continue
                    s = spans[src]
                    if s.size <= pl:
                        width = 1 << (len(leaves) - 1).bit_length()
                        ok = merkle_root(leaves, width) == s.pieces_root
                    else:
                        layer = piece_layers.get(s.pieces_root or b"", b"")
                        k = a // pl
                        ok = merkle_root(leaves, blocks_per_piece) == layer[32 * k : 32 * k + 32]
                    if not ok:
                        bad2.append(p)
        return bad1, bad2

    threads = max(1, args.threads)
    per = max(1, min(64, num_pieces // (threads * 8) or 1))
    batches = [range(i, min(i + per, num_pieces)) for i in range(0, num_pieces, per)]
    t1 = time.perf_counter()
    failed_v1: list[int] = []
    failed_v2: list[int] = []
    with ThreadPoolExecutor(threads) as ex:
        for b1, b2 in ex.map(work, batches):
            failed_v1 += b1
            failed_v2 += b2
    t2 = time.perf_counter()
    views.clear()
    for m in maps:
        m.close()

    data_bytes = sum(s.size for s in spans if s.path is not None)
    print(
        json.dumps(
            {
                "pieces": num_pieces,
                "piece_length": pl,
                "bytes": data_bytes,
                "v1": v1_hashes is not None,
                "v2": has_v2,
                "verified": verify,
                "blake3": args.blake3,
                "failed_v1": failed_v1,
                "failed_v2": failed_v2,
                "threads": threads,
                "setup_seconds": round(t1 - t0, 6),
                "hash_seconds": round(t2 - t1, 6),
            }
        )
    )
    return 1 if failed_v1 or failed_v2 else 0


if __name__ == "__main__":
    sys.exit(main())
