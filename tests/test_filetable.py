"""The file table and the fast reader of a v1 file list, against the long way.

``parse`` reads a v1 ``info.files`` list without a Python object per file; every
entry of an unusual shape goes through the general decoder. These tests parse the
same bytes both ways (the fast reader swapped for the decoder) and want the same
files, or the same error, for generated torrents and for byte-level damage to them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import bencodepy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pieced.storage import metainfo
from pieced.storage.errors import PiecedError
from pieced.storage.filetable import FileEntry, FileTable
from pieced.storage.metainfo import parse

from tests.test_names import paths

PIECE = 16384


def _long_way(max_files: int, dec: Any, pos: int, path: Any, depth: int) -> Any:
    return dec.value(pos, path, depth)


def outcome(data: bytes, monkeypatch: pytest.MonkeyPatch | None = None) -> Any:
    """(files as entries, num_pieces), or the error's type and message."""
    try:
        m = parse(data)
    except PiecedError as exc:
        return type(exc).__name__, str(exc)
    return list(m.files), m.num_pieces, m.info_hash


def both_ways(data: bytes, reader: str = "_read_v1_files") -> tuple[Any, Any]:
    """The outcome of ``data`` with the fast ``reader``, and with the decoder in its
    place (the long way)."""
    fast = outcome(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metainfo, reader, _long_way)
        slow = outcome(data)
    return fast, slow


def torrent(entries: list[dict[bytes, Any]], name: bytes = b"t") -> bytes:
    total = sum(e.get(b"length", 0) if isinstance(e.get(b"length"), int) else 0 for e in entries)
    pieces = max(1, -(-total // PIECE))
    info = {b"name": name, b"piece length": PIECE, b"files": entries,
            b"pieces": bytes(20 * pieces)}
    return bencodepy.encode({b"info": info})


names = st.one_of(
    st.sampled_from([b"a", b"b.bin", b"sub", b"_____padding_file_0", b".pad", b"..", b".",
                     b"", b"x/y", b"x\\y", b"nul\0", b"\xff\xfe", "é".encode(), b"e", b"ee",
                     b"0", b"12:", b"x" * 255, b"y" * 256]),
    st.binary(min_size=1, max_size=6),
)
entries = st.fixed_dictionaries(
    {b"length": st.one_of(st.integers(0, 40_000), st.just(-1))},
    optional={
        b"path": st.lists(names, min_size=0, max_size=4),
        b"attr": st.sampled_from([b"p", b"x", b"l", b"h", b"px", b""]),
        b"path.utf-8": st.lists(names, min_size=1, max_size=2),
        b"md5sum": st.just(b"0" * 32),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entries, min_size=0, max_size=12))
def test_the_fast_reader_agrees_with_the_decoder(files: list[dict[bytes, Any]]) -> None:
    fast, slow = both_ways(torrent(files))
    assert fast == slow


def damage(raw: bytearray, start: int, end: int, data: st.DataObject) -> None:
    """One to three bytes set, inserted or deleted in ``raw[start:end]``."""
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(start, end - 1))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.sampled_from(b"0123456789:eldi-/.\0xp"))
        if op == "set":
            raw[at] = byte
        elif op == "insert":
            raw.insert(at, byte)
        else:
            del raw[at]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_file_lists_fail_or_read_alike(data: st.DataObject) -> None:
    files = [{b"length": 1000 + i, b"path": [b"d%d" % (i % 3), b"f%d.bin" % i]}
             for i in range(6)]
    files[2] = {b"attr": b"p", b"length": 7, b"path": [b".pad", b"7"]}
    raw = bytearray(torrent(files))
    start = raw.index(b"5:filesl") + 8
    end = raw.index(b"4:name")
    damage(raw, start, end, data)
    fast, slow = both_ways(bytes(raw))
    assert fast == slow


# -- the v2 file tree, read the same way ---------------------------------------------------
def tree_ways(data: bytes) -> tuple[Any, Any]:
    """The outcome of ``data`` with the file tree reader, and with the decoder and walk."""
    return both_ways(data, "_read_file_tree")


def v2_torrent(tree: Any, layers: Any = None) -> bytes:
    info = {b"name": b"t", b"piece length": PIECE, b"meta version": 2, b"file tree": tree}
    return bencodepy.encode({b"info": info, b"piece layers": layers or {}})


leaves = st.one_of(
    st.builds(lambda n, r: {b"length": n, b"pieces root": r},
              st.sampled_from([0, 1, 5000, PIECE, -1]),
              st.sampled_from([bytes(32), b"\x01" * 31, b"\x02" * 33])),
    st.builds(lambda n: {b"length": n}, st.sampled_from([0, 7])),
    st.fixed_dictionaries({b"length": st.just(9), b"pieces root": st.just(b"\x03" * 32)},
                          optional={b"attr": st.sampled_from([b"x", b"p", b"l", b""]),
                                    b"symlink path": st.just([b"a"])}),
    st.just(b"not a dict"), st.just({}),
)
tree_names = st.one_of(st.sampled_from([b"a", b"b.bin", b"..", b".", b"", b"x/y", b"nul\0",
                                        b"\xff", "é".encode(), b"\xc3", b"\xa9",
                                        b"a\\b", b"tab\t", b"x" * 240, b"y" * 241,
                                        b"_____padding_file_0"]),
                       st.binary(min_size=1, max_size=4))
trees = st.recursive(
    st.dictionaries(tree_names, st.builds(lambda leaf: {b"": leaf}, leaves), max_size=4),
    lambda children: st.dictionaries(
        tree_names, st.one_of(children, st.builds(lambda leaf: {b"": leaf}, leaves),
                              st.builds(lambda leaf, c: {b"": leaf, **c}, leaves, children)),
        max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_the_file_tree_reader_agrees_with_the_walk(tree: dict[bytes, Any]) -> None:
    fast, slow = tree_ways(v2_torrent(tree))
    assert fast == slow


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_file_trees_fail_or_read_alike(data: st.DataObject) -> None:
    tree = {b"d%d" % (i % 3): {} for i in range(3)}
    for i in range(6):
        leaf = {b"length": 1000 + i, b"pieces root": bytes([i]) * 32}
        tree[b"d%d" % (i % 3)][b"f%d.bin" % i] = {b"": leaf}
    tree[b"e.bin"] = {b"": {b"length": 0}}
    raw = bytearray(v2_torrent(tree))
    start = raw.index(b"9:file treed") + 11
    end = raw.index(b"12:meta version")
    damage(raw, start, end, data)
    fast, slow = tree_ways(bytes(raw))
    assert fast == slow


LEAF = b"d0:d6:lengthi5e11:pieces root32:" + bytes(32) + b"ee"


@pytest.mark.parametrize(("tree", "refused"), [
    (b"d1:a" + LEAF + b"1:a" + LEAF + b"e", "duplicate key"),
    (b"d1:b" + LEAF + b"1:a" + LEAF + b"e", "out of order"),
    (b"d1:ad0:d6:lengthi5e11:pieces root32:" + bytes(32) + b"e1:b" + LEAF + b"ee",
     "both a file and a folder"),
    (b"d1:ad0:d6:lengthi5e11:pieces root32:" + bytes(32) + b"12:symlink pathl1:beee"
     + b"e", ""),
    (b"d1:ad0:d6:lengthi5e11:pieces root31:" + bytes(31) + b"eee", "pieces root"),
    (b"d1:ad0:d6:lengthi5eeee", "pieces root"),
    (b"d1:ad0:d6:lengthi0e11:pieces root32:" + bytes(32) + b"ee1:b" + LEAF + b"e", ""),
    (b"d2:..d0:d6:lengthi5e11:pieces root32:" + bytes(32) + b"eee", ".."),
    (b"d0:" + LEAF + b"e", "empty name"),
    (b"d1:ade1:b" + LEAF + b"e", ""),
    (b"d1:a" + LEAF, "truncated"),
])
def test_file_trees_of_unusual_bytes_read_alike(tree: bytes, refused: str) -> None:
    """Bytes no encoder writes (a name twice, names out of order), and entries the
    reader leaves to the walk: the same outcome both ways, refused with the decoder's
    or the walk's message (or taken, where ``refused`` is empty)."""
    info = (b"d9:file tree" + tree + b"12:meta versioni2e4:name1:t12:piece lengthi16384ee")
    fast, slow = tree_ways(b"d4:info" + info + b"12:piece layersdee")
    assert fast == slow
    if refused:
        assert isinstance(fast[0], str) and refused in fast[1], fast
    else:
        assert not isinstance(fast[0], str), fast


def test_a_usual_file_tree_is_read_without_the_decoder() -> None:
    """The reader takes a tree of the usual shape as it is (and is what the outcome
    above was of); one deeper than it follows, or over max_files, is left to the walk,
    which refuses or takes it as before."""
    from pieced.storage.bencode import decode_spanning

    tree: dict[bytes, Any] = {b"a": {b"": {b"length": 5, b"pieces root": bytes(32)}}}
    top, _ = decode_spanning(v2_torrent(tree), b"info", hooks={
        b"file tree": functools.partial(metainfo._read_file_tree, 10)})
    assert isinstance(top[b"info"][b"file tree"], metainfo._ReadTree)
    deep: dict[bytes, Any] = {b"f": {b"": {b"length": 5, b"pieces root": bytes(32)}}}
    for i in range(60):
        deep = {b"d%d" % i: deep}
    fast, slow = tree_ways(v2_torrent(deep))
    assert fast == slow and not isinstance(fast[0], str), fast
    many = {b"f%d" % i: {b"": {b"length": 5, b"pieces root": bytes(32)}} for i in range(4)}
    with pytest.raises(PiecedError, match="more than 3 files"):
        parse(v2_torrent(many), max_files=3)


def test_many_files_are_columns_not_objects() -> None:
    n = 20_000
    files = [{b"length": 100, b"path": [b"d%d" % (i // 1000), b"f%d" % i]} for i in range(n)]
    m = parse(torrent(files))
    table = m.files
    assert isinstance(table, FileTable)
    assert len(table) == n and len(table.folders) == 20
    assert table[12345] == FileEntry(("t", "d12", "f12345"), 100, 1_234_500)
    assert table[-1].path == ("t", "d19", f"f{n - 1}")
    assert table.total == 100 * n and table.end(5) == 600
    with pytest.raises(IndexError):
        table[n]
    assert list(table)[:2] == table[:2]


def test_collisions_found_among_many() -> None:
    """Among 5,000 files (the quick look at the paths, not file by file), a path listed
    twice and a file that is also a folder are renamed where libtorrent renames them
    (``paths`` holds pieced's paths to libtorrent's), by either reader of the list."""
    files = [{b"length": 10, b"path": [b"d", b"f%d" % i]} for i in range(5000)]
    files.append({b"length": 10, b"path": [b"d", b"f17"]})
    got = paths(torrent(files))  # the later one of the two is renamed
    assert got[17] == "t/d/f17" and got[-1] == "t/d/f17.1" and got.count("t/d/f17.1") == 1
    fast, slow = both_ways(torrent(files))
    assert fast == slow
    files[-1] = {b"length": 10, b"path": [b"d", b"f17", b"inner"]}
    got = paths(torrent(files))  # folders first: the file is renamed, not the folder
    assert got[17] == "t/d/f17.1" and got[-1] == "t/d/f17/inner"
    fast, slow = both_ways(torrent(files))
    assert fast == slow
    # pads may share a name: they are never written, and neither is renamed
    pads = [{b"length": 10, b"path": [b"d", b"f%d" % i]} for i in range(3)]
    pads[1:1] = [{b"attr": b"p", b"length": PIECE - 10, b"path": [b".pad", b"16374"]}]
    pads[3:3] = [{b"attr": b"p", b"length": PIECE - 10, b"path": [b".pad", b"16374"]}]
    assert ["/".join(f.path) for f in parse(torrent(pads)).files] == [
        "t/d/f0", "t/.pad/16374", "t/d/f1", "t/.pad/16374", "t/d/f2"]
    assert paths(torrent(pads)) == ["t/d/f0", "t/d/f1", "t/d/f2"]


def test_a_table_is_built_from_entries_in_place() -> None:
    with pytest.raises(ValueError, match="back to back"):
        FileTable.of([FileEntry(("a",), 5, 0), FileEntry(("b",), 5, 7)])
    t = FileTable.of([FileEntry(("a", "x"), 5, 0, attr="x"),
                      FileEntry(("a", "p"), 3, 5, pad=True, attr="p"),
                      FileEntry(("r",), 4, 8, pieces_root=os.urandom(32))])
    assert [f.stored for f in t] == [True, False, True]
    assert t[0].attr == "x" and t.pieces_root(2) == t[2].pieces_root and t.total == 12
    assert list(t.special()) == [0, 1]


def test_too_many_files_is_counted_either_way() -> None:
    files = [{b"length": 10, b"path": [b"f%d" % i]} for i in range(5)]
    files[1] = {b"length": -1, b"path": [b"bad"]}  # the count is refused first, as before
    data = torrent(files)
    with pytest.raises(PiecedError, match="torrent has 5 files, the limit is 3"):
        parse(data, max_files=3)
    with pytest.raises(PiecedError, match="negative"):
        parse(data, max_files=5)


def test_per_file_progress_counts_the_verified_bytes_of_each_file(tmp_path: Any) -> None:
    """Files of odd sizes across pieces, some pieces verified: each file's verified
    bytes are its bytes inside verified pieces, counted the plain way here."""
    import hashlib
    import random

    from pieced.storage.disk import DiskIO

    rng = random.Random(5)
    sizes = [rng.choice([0, 1, 5000, PIECE, PIECE + 1, 3 * PIECE - 7]) for _ in range(14)]
    sizes[3] = 2 * PIECE
    payload = rng.randbytes(sum(sizes))
    files = [{b"length": n, b"path": [b"f%d" % i]} for i, n in enumerate(sizes)]
    pieces = b"".join(hashlib.sha1(payload[o : o + PIECE]).digest()
                      for o in range(0, len(payload), PIECE))
    raw = bencodepy.encode({b"info": {b"name": b"t", b"piece length": PIECE,
                                      b"files": files, b"pieces": pieces}})
    dio = DiskIO(roots=[tmp_path], cache_bytes=0)
    try:
        ih = dio.register(raw, str(tmp_path))
        good = sorted(rng.sample(range(len(pieces) // 20), 4))
        for p in good:
            dio.write_chunk(ih, p, 0, payload[p * PIECE : (p + 1) * PIECE], flush=True)
            assert dio.hash_piece(ih, p)
        dio.flush_all()
        st = dio.status(ih)
        assert "files" not in dio.status(ih, files=False)
        offset = 0
        for i, n in enumerate(sizes):
            want = sum(1 for b in range(offset, offset + n) if b // PIECE in good)
            assert st["files"][i] == {"index": i, "path": f"t/f{i}", "length": n,
                                      "verified_bytes": want}
            offset += n
    finally:
        dio.close()
