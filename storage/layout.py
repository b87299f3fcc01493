"""Piece <-> file mapping.

The torrent is one linear byte space; files (pad files included) tile it back to
back, so a (piece, begin, length) range becomes a few (file, offset, length)
segments found by bisection. Pad bytes are real bytes of piece space (they are
hashed as zeros by v1) but never touch the disk, so segments say which is which.
"""

from __future__ import annotations

import bisect
from array import array
from typing import NamedTuple

from .errors import OutOfRange
from .filetable import UNSTORED
from .metainfo import Metainfo

_ZEROS = bytes(1 << 20)


def fill_zeros(dst: memoryview) -> None:
    """Zeros into ``dst`` (a pad's bytes, read), copied from one buffer: a new
    ``bytes(n)`` a pad cost a fresh allocation of 16 MiB, faulted in page by page, for
    each small file's piece in a torrent of 16 MiB pieces."""
    n = dst.nbytes
    for at in range(0, n, len(_ZEROS)):
        k = min(len(_ZEROS), n - at)
        dst[at : at + k] = _ZEROS[:k] if k < len(_ZEROS) else _ZEROS


def zero_views(n: int) -> list[memoryview]:
    """``n`` zeros as read-only views of one buffer (no copy)."""
    z = memoryview(_ZEROS)
    return [z[: min(len(_ZEROS), n - at)] for at in range(0, n, len(_ZEROS))]


class Segment(NamedTuple):
    """``length`` bytes at ``file_offset`` of file ``file_index``, starting
    ``buf_offset`` bytes into the caller's buffer. ``stored`` is false for pad files
    and symlinks, whose bytes are zeros that are never written."""

    file_index: int
    file_offset: int
    length: int
    buf_offset: int
    stored: bool


class Layout:
    def __init__(self, meta: Metainfo) -> None:
        self.piece_length = meta.piece_length
        self.num_pieces = meta.num_pieces
        self.total_size = meta.total_size
        self._last_piece_size = meta.piece_size(meta.num_pieces - 1) if meta.num_pieces else 0
        # Only files that occupy bytes take part in the search (zero-length ones cover
        # nothing). Arrays, read by columns: a torrent of 100,000 files is 1.6 MB here.
        files = meta.files
        self._offsets = offsets = files.offsets
        self._stored = files.flags
        self._index = array("q", (i for i, n in enumerate(files.lengths) if n))
        self._starts = array("q", map(offsets.__getitem__, self._index))
        # Whether any byte of piece space is never stored (pads, symlinks): most
        # torrents have none, and then no piece has pads to look for.
        self.unstored = any(files.flags[i] & UNSTORED for i in self._index)

    def piece_size(self, piece: int) -> int:
        return self._last_piece_size if piece == self.num_pieces - 1 else self.piece_length

    def check(self, piece: int, begin: int, length: int) -> None:
        """Refuse a range that is not inside one piece (OutOfRange, naming it)."""
        if not 0 <= piece < self.num_pieces:
            raise OutOfRange(f"piece {piece} is out of range (0..{self.num_pieces - 1})")
        size = self._last_piece_size if piece == self.num_pieces - 1 else self.piece_length
        if begin < 0 or length < 0 or begin + length > size:
            raise OutOfRange(
                f"range begin={begin} length={length} is outside piece {piece} of {size} bytes"
            )

    def pads(self, piece: int) -> list[tuple[int, int]]:
        """Ranges of the piece that are never stored (BEP 47 pads, symlinks): zeros."""
        if not self.unstored:
            return []
        return [(s.buf_offset, s.buf_offset + s.length)
                for s in self.map(piece, 0, self.piece_size(piece)) if not s.stored]

    def padded_pieces(self) -> set[int]:
        """The pieces that have pads (or symlinks): see :meth:`pads`."""
        out: set[int] = set()
        if self.unstored:
            for i in self._index:
                if self._stored[i] & UNSTORED:
                    out.update(self.file_pieces(i))
        return out

    def map(self, piece: int, begin: int, length: int) -> list[Segment]:
        """Segments covering the range, in order; the range must pass :meth:`check`."""
        self.check(piece, begin, length)
        return self.map_offset(piece * self.piece_length + begin, length)

    def map_offset(self, offset: int, length: int) -> list[Segment]:
        out: list[Segment] = []
        if length <= 0:
            return out
        k = bisect.bisect_right(self._starts, offset) - 1
        idx = self._index[k]
        offsets = self._offsets
        if offset + length <= offsets[idx + 1]:  # in one file (a block, mostly): no loop
            out.append(Segment(idx, offset - offsets[idx], length, 0,
                               not self._stored[idx] & UNSTORED))
            return out
        done = 0
        while done < length:
            idx = self._index[k]
            pos = offset + done
            start = offsets[idx]
            n = min(length - done, offsets[idx + 1] - pos)
            out.append(Segment(idx, pos - start, n, done, not self._stored[idx] & UNSTORED))
            done += n
            k += 1
        return out

    def file_to_piece(self, file_index: int, file_offset: int) -> tuple[int, int]:
        """(piece, begin) of a byte of a file: the inverse of :meth:`map`."""
        start, end = self._offsets[file_index], self._offsets[file_index + 1]
        if not 0 <= file_offset < end - start:
            raise OutOfRange(f"offset {file_offset} is outside file {file_index}")
        return divmod(start + file_offset, self.piece_length)

    def file_pieces(self, file_index: int) -> range:
        """Pieces holding at least one byte of the file."""
        start, end = self._offsets[file_index], self._offsets[file_index + 1]
        if start == end:
            return range(0)
        return range(start // self.piece_length, (end - 1) // self.piece_length + 1)
