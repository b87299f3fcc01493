"""The piece <-> file mapping: every byte of piece space maps to exactly one
(file, offset), and back, for v1 (files back to back) and v2 (files on piece
boundaries) layouts of random shapes."""

from __future__ import annotations

import hashlib

import bencodepy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pieced.storage.errors import OutOfRange
from pieced.storage.layout import Layout
from pieced.storage.metainfo import Metainfo, _align_v2, parse


def _v1_meta(sizes: list[int], piece_length: int) -> Metainfo:
    total = sum(sizes)
    n = (total + piece_length - 1) // piece_length
    info = {
        b"name": b"t",
        b"piece length": piece_length,
        b"pieces": bytes(20 * n),
        b"files": [{b"length": s, b"path": [b"f%d" % i]} for i, s in enumerate(sizes)],
    }
    return parse(bencodepy.encode({b"info": info}))


def _v2_meta(sizes: list[int], piece_length: int) -> Metainfo:
    """A v2-shaped layout (hashes are irrelevant to the mapping)."""
    from pieced.storage.metainfo import FileEntry

    files = _align_v2(
        [FileEntry(("t", f"f{i}"), s, 0, pieces_root=bytes(32)) for i, s in enumerate(sizes)],
        piece_length,
        "t",
    )
    total = files.total
    return Metainfo("t", piece_length, files, total,
                    (total + piece_length - 1) // piece_length, None,
                    hashlib.sha256(b"x").digest(), None, {}, b"")


shapes = st.tuples(
    st.lists(st.integers(0, 70_000), min_size=1, max_size=8).filter(lambda s: sum(s) > 0),
    st.sampled_from([16384, 32768, 65536]),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(shapes)
def test_every_byte_maps_once_and_back(shape: tuple[list[int], int, bool]) -> None:
    sizes, piece_length, v2 = shape
    meta = _v2_meta(sizes, piece_length) if v2 else _v1_meta(sizes, piece_length)
    layout = Layout(meta)
    seen: dict[int, list[tuple[int, int]]] = {}
    covered = 0
    for piece in range(meta.num_pieces):
        size = layout.piece_size(piece)
        segs = layout.map(piece, 0, size)
        assert sum(s.length for s in segs) == size
        assert [s.buf_offset for s in segs] == [sum(x.length for x in segs[:i]) for i in range(len(segs))]
        for s in segs:
            assert s.file_offset >= 0 and s.file_offset + s.length <= meta.files[s.file_index].length
            seen.setdefault(s.file_index, []).append((s.file_offset, s.length))
            if s.stored:
                # the inverse: the first byte of the segment maps back to where it came from
                assert layout.file_to_piece(s.file_index, s.file_offset) == (piece, s.buf_offset)
        covered += size
    assert covered == meta.total_size
    for i, f in enumerate(meta.files):
        spans = sorted(seen.get(i, []))
        pos = 0
        for off, n in spans:  # each file is tiled exactly once, no gap, no overlap
            assert off == pos
            pos += n
        assert pos == f.length
        if not f.pad and v2 and f.length:
            assert f.offset % piece_length == 0


@settings(max_examples=50, deadline=None)
@given(shapes, st.data())
def test_sub_ranges_match_whole_piece(shape: tuple[list[int], int, bool], data: st.DataObject) -> None:
    sizes, piece_length, v2 = shape
    meta = _v2_meta(sizes, piece_length) if v2 else _v1_meta(sizes, piece_length)
    layout = Layout(meta)
    piece = data.draw(st.integers(0, meta.num_pieces - 1))
    size = layout.piece_size(piece)
    begin = data.draw(st.integers(0, size))
    length = data.draw(st.integers(0, size - begin))
    whole = {}
    for s in layout.map(piece, 0, size):
        for k in range(s.length):
            whole[s.buf_offset + k] = (s.file_index, s.file_offset + k)
    for s in layout.map(piece, begin, length):
        for k in (0, s.length - 1):
            assert whole[begin + s.buf_offset + k] == (s.file_index, s.file_offset + k)


def test_out_of_range() -> None:
    layout = Layout(_v1_meta([40000], 16384))
    for piece, begin, length in [(-1, 0, 1), (3, 0, 1), (2, 0, 7233), (0, 16000, 1000), (0, -1, 1)]:
        with pytest.raises(OutOfRange):
            layout.map(piece, begin, length)
    assert layout.piece_size(2) == 40000 - 32768
