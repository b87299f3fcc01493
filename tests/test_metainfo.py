"""Metainfo parsing against torrents made by real tools, and refusal of bad input."""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

import bencodepy
import libtorrent as lt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pieced.storage.errors import BadMetainfo, TooLarge
from pieced.storage.metainfo import parse

from tests.realtools import (
    make_payload,
    make_torrent_lt,
    make_torrent_mktorrent,
    make_torrent_transmission,
)
from tests.test_names import paths


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
@pytest.mark.parametrize("piece_length", [16384, 65536, 4 * 1024 * 1024])
def test_matches_libtorrent(odd_payload: tuple[Path, Path], kind: Any, piece_length: int) -> None:
    _, content = odd_payload
    raw = make_torrent_lt(content, piece_length, kind)
    meta = parse(raw)
    ti = lt.torrent_info(raw)
    hashes = ti.info_hashes()
    if kind != "v2":
        assert meta.info_hash_v1 == bytes.fromhex(str(hashes.v1))
    else:
        assert meta.info_hash_v1 is None
    if kind != "v1":
        assert meta.info_hash_v2 == bytes.fromhex(str(hashes.v2))
        assert meta.info_hash_v2 is not None
        assert meta.info_hash == (meta.info_hash_v1 or meta.info_hash_v2[:20])
    assert meta.num_pieces == ti.num_pieces()
    assert meta.total_size == ti.total_size()
    fs = ti.layout()
    ours = [f for f in meta.files]
    # libtorrent adds pad files for v2 and hybrids just as we do: same list, same offsets.
    assert [("/".join(f.path), f.length, f.offset, f.pad) for f in ours] == [
        (fs.file_path(i), fs.file_size(i), fs.file_offset(i), bool(fs.file_flags(i) & lt.file_storage.flag_pad_file))
        for i in range(fs.num_files())
    ]


def test_hybrid_answers_to_both_hashes(odd_payload: tuple[Path, Path]) -> None:
    meta = parse(make_torrent_lt(odd_payload[1], 65536, "hybrid"))
    assert meta.info_hash_v2 is not None
    assert meta.aliases == (meta.info_hash_v1, meta.info_hash_v2[:20])


def test_single_file_torrents(tmp_path: Path) -> None:
    f = tmp_path / "single.bin"
    f.write_bytes(bytes(range(256)) * 1000)
    for kind in ("v1", "v2", "hybrid"):
        meta = parse(make_torrent_lt(f, 16384, kind))  # type: ignore[arg-type]
        assert [x.path for x in meta.files if not x.pad] == [("single.bin",)]
        assert sum(x.length for x in meta.files if not x.pad) == 256000
        assert meta.total_size == lt.torrent_info(make_torrent_lt(f, 16384, kind)).total_size()  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_a_folder_of_one_file(tmp_path: Path, kind: Any) -> None:
    """libtorrent writes a one-file folder's v2 tree as a single file at its root, and a
    hybrid's v1 list as NAME/FILE: it takes the v1 paths; so do we (the stored files)."""
    content = make_payload(tmp_path, {"a.bin": 100_000}, seed=1)
    raw = make_torrent_lt(content, 16384, kind)
    meta = parse(raw)
    fs = lt.torrent_info(raw).layout()
    theirs = [(fs.file_path(i), fs.file_size(i), fs.file_offset(i)) for i in range(fs.num_files())
              if not fs.file_flags(i) & lt.file_storage.flag_pad_file]
    assert [("/".join(f.path), f.length, f.offset) for f in meta.files if not f.pad] == theirs


def test_mktorrent_and_transmission(tmp_path: Path) -> None:
    from tests.realtools import make_payload

    content = make_payload(tmp_path, {"x/a": 70000, "b": 1, "c": 65536}, seed=3)
    for raw in (make_torrent_mktorrent(content, 32768), make_torrent_transmission(content, 32768)):
        meta = parse(raw)
        assert meta.info_hash_v1 == hashlib.sha1(bencodepy.encode(bencodepy.decode(raw)[b"info"])).digest()
        assert meta.total_size == 70000 + 1 + 65536
        assert meta.num_pieces == (meta.total_size + 32767) // 32768


def _v1(files: list[dict[bytes, Any]] | None = None, **info: Any) -> dict[bytes, Any]:
    base: dict[bytes, Any] = {
        b"name": b"t",
        b"piece length": 16384,
        b"pieces": bytes(20),
        b"files": files if files is not None else [{b"length": 10, b"path": [b"a"]}],
    }
    base.update({k.encode().replace(b"_", b" "): v for k, v in info.items()})
    return base


def _bad(info: dict[bytes, Any], **top: Any) -> bytes:
    return bencodepy.encode({b"info": info, **{k.encode(): v for k, v in top.items()}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"d4:infod", "not canonical bencode"),
        (b"i42e", "not a dictionary"),
        (bencodepy.encode({b"announce": b"x"}), "'info' is missing"),
        (_bad(_v1(files=[{b"length": 10, b"path": [b".."]}])), "'..'"),
        (_bad(_v1(files=[{b"length": 10, b"path": [b"/etc/passwd"]}])),
         "path[0] '/etc/passwd' is an absolute path"),
        (_bad(_v1(files=[{b"length": 10, b"path": [b"a\0b"]}])), "NUL"),
        (_bad(_v1(files=[{b"length": 10, b"path": []}])), "non-empty list"),
        (_bad(_v1(files=[{b"length": -1, b"path": [b"a"]}])), "negative"),
        (_bad(_v1(files=[{b"length": b"10", b"path": [b"a"]}])), "must be an integer"),
        (_bad(_v1(name=b"..")), "info.name"),
        (_bad(_v1(pieces=bytes(21))), "not a multiple of 20"),
        (_bad(_v1(pieces=bytes(40))), "holds 2 hashes but the files need 1"),
        (_bad(_v1(piece_length=0)), "must be positive"),
        (_bad({b"name": b"t", b"piece length": 16384}), "neither 'pieces'"),
    ],
)
def test_refuses_bad_metainfo(raw: bytes, message: str) -> None:
    with pytest.raises(BadMetainfo, match=re.escape(message)):
        parse(raw)


def test_an_empty_name_in_a_path_is_stored_as_libtorrent_stores_it() -> None:
    """An empty name in a v1 file's path (refused once) is ``_``, where libtorrent puts it."""
    raw = _bad(_v1(files=[{b"length": 10, b"path": [b"a", b""]}]))
    assert paths(raw) == ["t/a/_"]
    assert [f.path for f in parse(raw).files] == [("t", "a", "_")]


def test_refuses_oversized_metainfo() -> None:
    with pytest.raises(TooLarge):
        parse(_bad(_v1()), max_bytes=10)


def test_refuses_wrong_piece_layers(odd_payload: tuple[Path, Path]) -> None:
    raw = make_torrent_lt(odd_payload[1], 16384, "v2")
    top = bencodepy.decode(raw)
    layers = top[b"piece layers"]
    root = next(iter(layers))
    good = layers[root]
    top[b"piece layers"][root] = good[:-32]
    with pytest.raises(BadMetainfo, match="expected"):
        parse(bencodepy.encode(top))
    top[b"piece layers"][root] = bytes(32) + good[32:]
    with pytest.raises(BadMetainfo, match="does not hash to its 'pieces root'"):
        parse(bencodepy.encode(top))
    del top[b"piece layers"][root]
    with pytest.raises(BadMetainfo, match="has no layer"):
        parse(bencodepy.encode(top))


def test_refuses_inconsistent_hybrid(odd_payload: tuple[Path, Path]) -> None:
    top = bencodepy.decode(make_torrent_lt(odd_payload[1], 16384, "hybrid"))
    files = top[b"info"][b"files"]
    first = next(f for f in files if f[b"length"] > 0)
    first[b"length"] += 1
    with pytest.raises(BadMetainfo, match="hybrid torrent"):
        parse(bencodepy.encode(top))


def test_v2_path_escape_refused() -> None:
    info = {
        b"name": b"t",
        b"piece length": 16384,
        b"meta version": 2,
        b"file tree": {b"..": {b"": {b"length": 1, b"pieces root": bytes(32)}}},
    }
    with pytest.raises(BadMetainfo, match=r"'\.\.'"):
        parse(bencodepy.encode({b"info": info}))


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_files_libtorrent_marks_executable_are_made_executable(
        tmp_path: Path, kind: str) -> None:
    """libtorrent gives an executable file of the payload the attr "x" and makes it
    0o755 when it downloads it; the daemon made every file 0o644."""
    import os
    import stat

    from pieced.storage.disk import DiskIO

    from tests.test_disk import Source

    src = tmp_path / "seed" / "payload"
    src.mkdir(parents=True)
    for name, size, mode in [("run.sh", 40_000, 0o755), ("data.bin", 30_000, 0o644),
                             ("empty-tool", 0, 0o755)]:
        (src / name).write_bytes(os.urandom(size))
        os.chmod(src / name, mode)
    flags = {"v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only, "hybrid": 0}[kind]
    ct = lt.create_torrent(lt.list_files(str(src), lambda p: True, 0), 16384, flags)
    lt.set_piece_hashes(ct, str(src.parent))
    raw = bytes(lt.bencode(ct.generate()))
    marked = {f.path[-1] for f in parse(raw).files if "x" in f.attr}
    assert marked == {"run.sh", "empty-tool"}
    source = Source(raw, tmp_path / "seed")
    dio = DiskIO(sync_window=0.002)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        for p, b, n in source.blocks():
            dio.write_chunk(ih, p, b, source.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih, files=False)["verified_pieces"] == parse(raw).num_pieces
    finally:
        dio.close()
    for name in ("run.sh", "data.bin", "empty-tool"):
        mode = stat.S_IMODE((tmp_path / "dl" / "payload" / name).stat().st_mode)
        assert bool(mode & 0o111) == (name in marked), (name, oct(mode))


@pytest.mark.parametrize("attr", [b"l", b"lx"])
@pytest.mark.parametrize("files_at", ["list", "single"])
@pytest.mark.parametrize("link", [None, []])
def test_a_symlink_flag_without_its_path_is_an_empty_file_as_libtorrent_reads_it(
        attr: bytes, files_at: str, link: list[bytes] | None) -> None:
    """An entry marked ``l`` without a ``symlink path`` (or with an empty one): libtorrent
    takes it for an ordinary file of 0 bytes, whatever length it says (a symlink's
    length is 0; the flag goes once its path is found missing). Read as a file of its
    length, the two saw two torrents under one info hash: other bytes in other places;
    read as a symlink (an empty path), no file was made where libtorrent makes one."""
    def v1_piece_hashes(data: bytes, plen: int) -> bytes:
        return b"".join(hashlib.sha1(data[i:i + plen]).digest()
                        for i in range(0, len(data), plen))

    a = bytes(range(256)) * 80
    if files_at == "list":
        info = {b"name": b"t", b"piece length": 16384, b"files": [
            {b"length": len(a), b"path": [b"a.bin"]},
            {b"attr": attr, b"length": 100, b"path": [b"x1"],
             **({} if link is None else {b"symlink path": link})},
            {b"length": 50, b"path": [b"y"]}],
            b"pieces": v1_piece_hashes(a + bytes(50), 16384)}
    else:  # (one file of no data: refused by both)
        info = {b"name": b"t", b"piece length": 16384, b"attr": attr, b"length": 100,
                b"pieces": hashlib.sha1(bytes(100)).digest(),
                **({} if link is None else {b"symlink path": link})}
    raw = bencodepy.encode({b"info": info})
    try:
        ti = lt.torrent_info(raw)
    except RuntimeError:
        with pytest.raises(BadMetainfo):
            parse(raw)
        assert files_at == "single"
        return
    meta = parse(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # files(): deprecated in 2.x
        fs = ti.files()
    assert [f.length for f in meta.files] == [fs.file_size(i) for i in range(fs.num_files())]
    assert meta.total_size == ti.total_size() == len(a) + 50
    x1 = next(f for f in meta.files if f.path[-1] == "x1")
    assert x1.length == 0 and "l" not in x1.attr and ("x" in x1.attr) == (b"x" in attr)


@pytest.mark.parametrize(("v1_attr", "v2_attr"), [(b"x", None), (None, b"x"), (b"h", b"x")])
def test_a_hybrids_file_attributes_are_its_file_trees(
        tmp_path: Path, v1_attr: bytes | None, v2_attr: bytes | None) -> None:
    """A hybrid whose v1 list and v2 file tree give a file other attributes: libtorrent
    takes the file tree's (and makes the file 0755 only where it says ``x``); the v1
    list's were taken first, so the two made one download's file of other modes."""
    src = tmp_path / "payload"
    src.mkdir()
    (src / "a.bin").write_bytes(bytes(range(256)) * 200)
    (src / "b.bin").write_bytes(b"b" * 30_000)
    top = bencodepy.decode(make_torrent_lt(src, 16384, "hybrid"))
    info = top[b"info"]
    entry = next(f for f in info[b"files"] if f[b"path"] == [b"a.bin"])
    leaf = info[b"file tree"][b"a.bin"][b""]
    for d, attr in ((entry, v1_attr), (leaf, v2_attr)):
        d.pop(b"attr", None)
        if attr is not None:
            d[b"attr"] = attr
    raw = bencodepy.encode(top)
    meta = parse(raw)
    got = next(f.attr for f in meta.files if f.path[-1] == "a.bin")
    assert got == (v2_attr or b"").decode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # files(): deprecated in 2.x
        fs = lt.torrent_info(raw).files()
    i = next(i for i in range(fs.num_files()) if fs.file_path(i).endswith("a.bin"))
    assert bool(fs.file_flags(i) & lt.file_storage.flag_executable) == ("x" in got)


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_symlink_entries_libtorrent_makes_are_taken_in_every_kind(
        tmp_path: Path, kind: str) -> None:
    """libtorrent's ``create_torrent.symlinks`` lists a symlink of the payload as an
    entry with attr "l" and a "symlink path": in a v1 file list with length 0, in a v2
    file tree with no length at all. The v2 form was refused ("'file tree/.../link.bin
    .length' is missing") where libtorrent downloads it; now it is an entry of no data
    in both, and every piece verifies against the payload."""
    import os

    from pieced.storage.disk import DiskIO
    from pieced.storage.errors import StorageIOError

    src = tmp_path / "seed" / "payload"
    src.mkdir(parents=True)
    (src / "data.bin").write_bytes(os.urandom(100_000))
    os.symlink("data.bin", src / "link.bin")
    flags = {"v1": lt.create_torrent.v1_only, "v2": lt.create_torrent.v2_only, "hybrid": 0}[kind]
    ct = lt.create_torrent(lt.list_files(str(src), lambda p: True, lt.create_torrent.symlinks),
                           16384, flags | lt.create_torrent.symlinks)
    lt.set_piece_hashes(ct, str(src.parent))
    raw = bytes(lt.bencode(ct.generate()))
    link = [f for f in parse(raw).files if f.path[-1] == "link.bin"]
    assert len(link) == 1 and link[0].length == 0 and "l" in link[0].attr
    dio = DiskIO(sync_window=0.002)
    try:
        ih = dio.register(raw, tmp_path / "seed")
        assert dio.recheck(ih, full=True).ok
        assert dio.status(ih, files=False)["verified_pieces"] == parse(raw).num_pieces
        # (the link's name is the torrent's too, made or not: no file may be renamed there)
        (src / "link.bin").unlink()
        data = next(i for i, f in enumerate(parse(raw).files) if f.path[-1] == "data.bin")
        with pytest.raises(StorageIOError, match="already exists"):
            dio.rename_file(ih, data, "payload/link.bin")
    finally:
        dio.close()


# -- pieced reads every torrent it takes as libtorrent does ---------------------------------
_ATTRS = ["", "", "", "p", "l", "x", "h", "lp", "px", "lx", "pl"]
_NAMES = [b"a", b"b", b"c", b"d", b".pad", b"_____padding_file_0", b"A"]


@st.composite
def _v1_entries(draw: st.DrawFn) -> list[dict[bytes, Any]]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        entry: dict[bytes, Any] = {
            b"length": draw(st.sampled_from([0, 1, 100, 16383, 16384, 16385, 40000])),
            b"path": [draw(st.sampled_from(_NAMES))
                      for _ in range(draw(st.integers(1, 2)))],
        }
        attr = draw(st.sampled_from(_ATTRS))
        if attr:
            entry[b"attr"] = attr.encode()
        if "l" in attr and draw(st.booleans()):
            entry[b"symlink path"] = [draw(st.sampled_from(_NAMES))]
        out.append(entry)
    return out


def _layouts(raw: bytes) -> tuple[Any, Any]:
    """(libtorrent's, pieced's) reading of ``raw``: the data files (path, length, offset),
    piece count and total size; None for a refusal."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # files(): deprecated in 2.x
            fs = lt.torrent_info(raw).files()  # (the renames it makes applied)
        theirs: Any = (
            [(fs.file_path(i), fs.file_size(i), fs.file_offset(i)) for i in range(fs.num_files())
             if not fs.file_flags(i) & (lt.file_storage.flag_pad_file | lt.file_storage.flag_symlink)
             and fs.file_size(i)],
            fs.num_pieces(), fs.total_size())
    except RuntimeError:
        theirs = None
    try:
        meta = parse(raw)
        ours: Any = (
            [("/".join(f.path), f.length, f.offset) for f in meta.files
             if not f.pad and "l" not in f.attr and f.length],
            meta.num_pieces, meta.total_size)
    except (BadMetainfo, TooLarge):
        ours = None
    return theirs, ours


@settings(max_examples=400, deadline=None)
@given(_v1_entries(), st.sampled_from([16384, 32768]))
def test_every_v1_torrent_taken_is_laid_out_as_libtorrent_lays_it_out(
        entries: list[dict[bytes, Any]], piece_length: int) -> None:
    """Random file lists (pad files, symlinks with and without their target, BitComet's
    pad names, empty files, names that collide): whatever pieced takes, libtorrent takes
    too and puts every byte of data where pieced does. (A pad file that was a symlink
    too, with a length, was read as libtorrent's symlink of no bytes by one and a pad of
    that length by the other: every later file's offset differed under one info hash.)
    The piece count is tried both ways: each file's length counted, and the symlinks'
    left out."""
    totals = {sum(e[b"length"] for e in entries),
              sum(e[b"length"] for e in entries
                  if not (b"l" in e.get(b"attr", b"") and b"symlink path" in e))}
    for total in totals:
        info = {b"name": b"t", b"piece length": piece_length, b"files": entries,
                b"pieces": bytes(20 * -(-total // piece_length))}
        theirs, ours = _layouts(bencodepy.encode({b"info": info}))
        if ours is not None:
            assert theirs == ours


@st.composite
def _v2_tree(draw: st.DrawFn) -> dict[bytes, Any]:
    """A v2 file tree of files under a piece each (no piece layers needed)."""
    tree: dict[bytes, Any] = {}
    for _ in range(draw(st.integers(1, 5))):
        leaf: dict[bytes, Any] = {}
        length = draw(st.sampled_from([0, 1, 100, 16384, None]))
        if length is not None:
            leaf[b"length"] = length
        if length:
            leaf[b"pieces root"] = hashlib.sha256(b"%d" % length).digest()
        attr = draw(st.sampled_from(_ATTRS))
        if attr:
            leaf[b"attr"] = attr.encode()
        if "l" in attr and draw(st.booleans()):
            leaf[b"symlink path"] = [draw(st.sampled_from(_NAMES))]
        node = tree
        path = [draw(st.sampled_from(_NAMES)) for _ in range(draw(st.integers(1, 2)))]
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if b"" in node:
                break
        else:
            if path[-1] not in node:
                node[path[-1]] = {b"": leaf}
    return tree


@settings(max_examples=300, deadline=None)
@given(_v2_tree())
def test_every_v2_torrent_taken_is_laid_out_as_libtorrent_lays_it_out(
        tree: dict[bytes, Any]) -> None:
    """The same for v2 file trees: pad attributes, symlinks with and without their
    target or length, empty files, files and folders of one name."""
    info = {b"name": b"t", b"piece length": 16384, b"meta version": 2, b"file tree": tree}
    theirs, ours = _layouts(bencodepy.encode({b"info": info, b"piece layers": {}}))
    if ours is not None:
        assert theirs == ours
