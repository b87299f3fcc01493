"""A torrent's piece map as the status page draws it, and the deltas that keep it current.

The map is one byte per piece: the engine's state (``MISSING``..``VERIFIED``), or
``FAILED`` for a piece that failed its hash a moment ago and is missing again, with
``CACHED`` or'ed in for a piece in the piece cache (what SuggestPiece would offer). A
page gets the whole map once (gzip makes a million mostly equal bytes a few KiB) and
then only the runs of bytes that changed. Everything here is proportional to the
pieces, so the daemon calls it on its page thread, never on the event loop.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable

from pieced.storage.torrent import MISSING

FAILED = 5
CACHED = 8
# Changed bytes are looked for a block at a time (equal blocks compare at memcmp speed),
# then a word at a time inside a block that differs.
_BLOCK = 4096
_WORD = 64
_GAP = 8  # runs closer than this travel as one (a run costs 8 bytes of header)
_RUN = struct.Struct("<II")


def composite(state: bytes, failed: Iterable[int], cached: Iterable[int]) -> bytearray:
    """The page's map from a copy of ``Torrent.state``: failed pieces that are still
    missing show as failed; cached pieces carry the cache mark."""
    out = bytearray(state)
    for p in failed:
        if out[p] == MISSING:
            out[p] = FAILED
    for p in cached:
        out[p] |= CACHED
    return out


def diff(old: bytes | bytearray, new: bytes | bytearray) -> list[tuple[int, int]]:
    """[start, end) ranges where two maps of one torrent differ, in order. Cost: one
    memcmp over the maps, and a few word compares per block that changed."""
    assert len(old) == len(new)
    runs: list[tuple[int, int]] = []
    a, b = memoryview(old), memoryview(new)
    n = len(new)
    for i in range(0, n, _BLOCK):
        if a[i : i + _BLOCK] == b[i : i + _BLOCK]:
            continue
        for j in range(i, min(i + _BLOCK, n), _WORD):
            x = int.from_bytes(a[j : j + _WORD], "little") ^ int.from_bytes(b[j : j + _WORD], "little")
            if not x:
                continue
            lo = j + ((x & -x).bit_length() - 1) // 8
            hi = j + (x.bit_length() + 7) // 8
            if runs and lo - runs[-1][1] <= _GAP:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((lo, hi))
    return runs


def encode_runs(new: bytes | bytearray, runs: list[tuple[int, int]]) -> str:
    """Runs as the page reads them: base64 of (u32 start, u32 length, the new bytes)..."""
    out = bytearray()
    view = memoryview(new)
    for lo, hi in runs:
        out += _RUN.pack(lo, hi - lo)
        out += view[lo:hi]
    return base64.b64encode(out).decode()


def runs_size(runs: list[tuple[int, int]]) -> int:
    return sum(_RUN.size + hi - lo for lo, hi in runs)

