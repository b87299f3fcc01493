"""File names as libtorrent 2.1 stores them: a torrent libtorrent accepts is accepted, and
every file is at the path libtorrent gives it below the save path (names cut short,
bad UTF-8 and separators made good, colliding paths renamed, a torrent's name made
from its info hash), so that a download made by libtorrent verifies and is found by a
recheck. Where libtorrent refuses a torrent, pieced refuses it too, with BadMetainfo.

The torrents are built here byte by byte, with names no torrent maker would write, as
v1, v2-only and hybrid (v2's file tree and v1's file list of the same files, BEP 47
pads between them); libtorrent's paths are read from ``load_torrent_buffer``: the
layout, and the renames it makes (``renamed_files``), as a session applies them.
"""

from __future__ import annotations

import hashlib
import time
from bisect import bisect_right
from pathlib import Path
from typing import Any

import bencodepy
import libtorrent as lt
import pytest
from pieced.storage.disk import DiskIO
from pieced.storage.errors import BadMetainfo
from pieced.storage.merkle import BLOCK_SIZE, merkle_root, next_pow2, root_from_layer
from pieced.storage.metainfo import parse

from tests.realtools import lt_recheck, lt_session_settings
from tests.test_verify import run_verify

PIECE = BLOCK_SIZE
KINDS = ["v1", "v2", "hybrid"]
File = tuple[list[bytes], bytes]  # the raw path below the torrent's folder, the bytes


def metainfo(files: list[File], kind: str, name: bytes = b"top", single: bool = False) -> bytes:
    """A torrent of ``files`` (v2 and hybrid: in the file tree's sorted order, which is
    the order the v1 list gets too), pieces of 16 KiB, the hashes right. ``single``: a
    single-file torrent of the one file, named ``name`` (the tree's one key for v2)."""
    if kind != "v1":
        files = sorted(files, key=lambda f: f[0])
    d: dict[bytes, Any] = {b"name": name, b"piece length": PIECE}
    if kind != "v2":
        linear = bytearray()
        if single:
            ((_, data),) = files
            d[b"length"] = len(data)
            linear += data
        else:
            d[b"files"] = []
            for k, (path, data) in enumerate(files):
                d[b"files"].append({b"length": len(data), b"path": path})
                linear += data
                gap = -len(data) % PIECE
                if kind == "hybrid" and gap and k < len(files) - 1:
                    d[b"files"].append({b"attr": b"p", b"length": gap,
                                        b"path": [b".pad", str(gap).encode()]})
                    linear += bytes(gap)
        d[b"pieces"] = b"".join(hashlib.sha1(linear[i : i + PIECE]).digest()
                                for i in range(0, len(linear), PIECE))
    top: dict[bytes, Any] = {}
    if kind != "v1":
        d[b"meta version"] = 2
        tree: dict[bytes, Any] = {}
        layers: dict[bytes, bytes] = {}
        for path, data in files:
            node = tree
            for part in [name] if single else path:
                node = node.setdefault(part, {})
            leaf: dict[bytes, Any] = {b"length": len(data)}
            node[b""] = leaf
            if data:
                root, layer = _v2_hashes(data)
                leaf[b"pieces root"] = root
                if layer:
                    layers[root] = layer
        d[b"file tree"], top[b"piece layers"] = tree, layers
    top[b"info"] = d
    return bencodepy.encode(top)  # type: ignore[no-any-return]


def _v2_hashes(data: bytes) -> tuple[bytes, bytes]:
    """(pieces root, piece layer: empty for a file of one piece or less)."""
    leaves = [hashlib.sha256(data[i : i + BLOCK_SIZE]).digest()
              for i in range(0, len(data), BLOCK_SIZE)]
    if len(data) <= PIECE:
        return merkle_root(leaves, next_pow2(len(leaves))), b""
    per = PIECE // BLOCK_SIZE
    layer = b"".join(merkle_root(leaves[i : i + per], per) for i in range(0, len(leaves), per))
    return root_from_layer(layer, PIECE), layer


def lt_paths(raw: bytes) -> list[str]:
    """The paths libtorrent gives the files that are not pads, renames applied."""
    atp = lt.load_torrent_buffer(raw)
    assert atp.ti is not None
    fs = atp.ti.layout()
    return [atp.renamed_files.get(i, fs.file_path(i)) for i in range(fs.num_files())
            if not fs.file_flags(i) & lt.file_storage.flag_pad_file]


def lt_refuses(raw: bytes) -> str:
    """libtorrent's message, refusing ``raw`` (the test fails if it accepts it)."""
    with pytest.raises(RuntimeError) as caught:
        lt.load_torrent_buffer(raw)
    return str(caught.value)


def paths(raw: bytes) -> list[str]:
    """pieced's paths of the same files (pads left out), checked against libtorrent's."""
    mine = ["/".join(f.path) for f in parse(raw).files if not f.pad]
    assert mine == lt_paths(raw)
    return mine


@pytest.mark.parametrize("kind", KINDS)
def test_long_names_are_cut_as_libtorrent_cuts_them(kind: str) -> None:
    """Past 240 bytes libtorrent cuts a name short and keeps an extension found in its
    last 9 bytes (one further back is cut with the rest). They were refused past 255
    bytes, and kept whole up to 255 (where libtorrent finds none of them)."""
    x = b"x" * 100
    got = paths(metainfo([
        ([b"L" * 300 + b".txt"], x),              # cut to 240, then .txt
        ([b"M" * 250], x),                        # no extension: cut to 240
        ([b"N" * 250 + b".too-far-ext"], x),      # the dot is 12 bytes from the end
        ([b"\xc3\xa9" * 130 + b".tar.gz"], x),    # é: the cut falls after a whole one
        ([b"F" * 260, b"inside"], x),             # a folder is cut too
        ([b"P" * 239 + b"\xff\xff\xffQRS"], x),    # a bad byte's _ is not where it cuts
    ], kind))
    assert sorted(got) == sorted([
        "top/" + "L" * 240 + ".txt", "top/" + "M" * 240, "top/" + "N" * 240,
        "top/" + "é" * 120 + ".gz", "top/" + "F" * 240 + "/inside", "top/" + "P" * 239 + "___Q",
    ])


@pytest.mark.parametrize("kind", KINDS)
def test_bad_utf8_separators_and_dots_are_made_good(kind: str) -> None:
    """A bad UTF-8 sequence is one ``_`` and runs as far as its first byte says (a
    missing continuation byte takes the next character with it), a ``/`` or ``\\`` in a
    name is left out, and a name of one or two dots is ``_``: where libtorrent puts them.
    They were refused."""
    x = b"x" * 100
    files = [([b"a\xffb"], x), ([b"c\xc3"], x), ([b"\xc3ab"], x), ([b"\xf8abcdef"], x),
             ([b"\xed\xa0\x80z"], x), ([b"\xc0\xaf.q"], x), ([b"a/b"], x), ([b"c\\d"], x),
             ([b".", b"in-dot"], x), ([b"\xe2\x80\x8b.\xe2\x80\x8b.", b"in-dots"], x),
             ([b"..."], x)]
    if kind == "v1":  # (an empty key in a v2 file tree marks a file: no name)
        files.append(([b"e", b""], x))
    got = paths(metainfo(files, kind))
    want = ["top/a_b", "top/c_", "top/_b", "top/_ef", "top/_z", "top/_.q", "top/ab", "top/cd",
            "top/_/in-dot", "top/_/in-dots", "top/..."] + (["top/e/_"] if kind == "v1" else [])
    assert sorted(got) == sorted(want)


def test_an_empty_name_in_a_v2_file_tree_is_refused_as_libtorrent_refuses_it() -> None:
    """An empty key in a v2 file tree, beside others: no file's name (libtorrent:
    "failed to parse files")."""
    raw = metainfo([([b"a"], b"x" * 10)], "v2")
    raw = raw.replace(b"9:file treed1:a", b"9:file treed0:d1:ad0:d6:lengthi0eeee1:a")
    assert "failed to parse files" in lt_refuses(raw)
    with pytest.raises(BadMetainfo, match="empty name"):
        parse(raw)


@pytest.mark.parametrize("kind", KINDS)
def test_colliding_paths_are_renamed_as_libtorrent_renames_them(kind: str) -> None:
    """Two files of one path (A-Z and a-z alike, or once sanitized), or a file of a
    folder's path, were refused, or kept apart by case alone; libtorrent renames the
    later one (folders first) NAME.1.EXT, NAME.2.EXT..., and so does pieced. A v2 layout
    has a pad folder NAME/.pad: a file named .pad beside it is renamed too."""
    files = [([b"report.PDF"], b"1" * 100), ([b"Report.pdf"], b"2" * 200),
             ([b"REPORT.pdf"], b"3" * 300), ([b"x\x01.bin"], b"4" * 400),
             ([b"x\x02.bin"], b"5" * 500), ([b"a/b"], b"6" * 600), ([b"ab"], b"7" * 700),
             ([b"sub"], b"8" * 800), ([b"s\\ub", b"in"], b"9" * 900),
             ([b".pad"], b"0" * 1000), ([b"t.tar.gz"], b"t" * 10), ([b"T.TAR.GZ"], b"T" * 10)]
    got = paths(metainfo(files, kind))
    renamed = {p for p in got if any(f".{n}" in p.rsplit("/", 1)[-1] for n in (1, 2))}
    assert {p.lower() for p in renamed} >= {"top/report.1.pdf", "top/report.2.pdf",
                                             "top/x_.1.bin", "top/ab.1", "top/sub.1"}
    assert ("top/.1.pad" in got) == (kind != "v1")


def test_collisions_among_many_files_are_found() -> None:
    """Among 5,000 plain files (the quick look at a torrent's paths, not file by file), a
    case twin and a file of a folder's path are renamed as libtorrent renames them."""
    files = [([b"d", b"f%d" % i], b"z" * 10) for i in range(5000)]
    files += [([b"d", b"F17"], b"y" * 10), ([b"d", b"f18", b"inner"], b"w" * 10)]
    got = paths(metainfo(files, "v1"))
    assert got[-2:] == ["top/d/F17.1", "top/d/f18/inner"] and got[18] == "top/d/f18.1"


def test_too_many_colliding_files_are_refused_as_libtorrent_refuses_them() -> None:
    """libtorrent gives up after 500 tries of a new name (34 files of one path take 528):
    the torrent is refused, by pieced too; 33 of them (496 tries) are renamed."""
    assert paths(metainfo([([b"a"], b"x")] * 33, "v1"))[-1] == "top/a.32"
    raw = metainfo([([b"a"], b"x")] * 34, "v1")
    assert "duplicate filenames" in lt_refuses(raw)
    with pytest.raises(BadMetainfo, match="too many files of one path"):
        parse(raw)


def test_two_files_renamed_into_one_path_are_refused() -> None:
    """libtorrent renames the second ``a.txt`` to ``a.1.txt``, and keeps a third file's
    own ``a.1.txt`` (it matches names as they were): two files at one path, one of them
    lost when written. pieced refuses the torrent, saying so."""
    raw = metainfo([([b"a.txt"], b"1"), ([b"a.txt"], b"2"), ([b"a.1.txt"], b"3")], "v1")
    assert lt_paths(raw) == ["top/a.txt", "top/a.1.txt", "top/a.1.txt"]
    with pytest.raises(BadMetainfo, match=r"two files of the torrent are stored at 'top/a\.1\.txt'"):
        parse(raw)


@pytest.mark.parametrize("kind", KINDS)
def test_a_torrent_name_sanitized_to_nothing(kind: str) -> None:
    """A folder whose name sanitizes to nothing (".", invisible characters) is named by the
    hex SHA-1 of the info dictionary (a v2-only torrent's too), as libtorrent names it; an
    empty name is ``_``. The one file of a single-file torrent gets no such name: the
    torrent is refused, as libtorrent refuses it (v2-only: the tree's key, "." is ``_``)."""
    two = [([b"a"], b"x" * 10), ([b"b"], b"y" * 10)]
    for name in (b".", b"\xe2\x80\x8b\xe2\x80\xae"):
        raw = metainfo(two, kind, name=name)
        info = bencodepy.encode(bencodepy.decode(raw)[b"info"])
        folder = hashlib.sha1(info).hexdigest()
        assert paths(raw) == [f"{folder}/a", f"{folder}/b"]
        assert parse(raw).name == folder
    assert paths(metainfo(two, kind, name=b"")) == ["_/a", "_/b"]
    for name in (b".", b"\xe2\x80\x8b"):
        raw = metainfo([([b"a"], b"x" * 10)], kind, name=name, single=True)
        if kind == "v2":
            assert paths(raw) == ["_"]
            continue
        assert "missing name" in lt_refuses(raw)
        with pytest.raises(BadMetainfo, match="leaves no name"):
            parse(raw)


def test_utf8_keys_and_path_less_pads_are_read_as_libtorrent_reads_them() -> None:
    """``name.utf-8`` is taken before ``name`` (and stands for it when it is missing);
    ``path.utf-8`` before ``path`` when it is a list, ``path`` when it is not; a pad file
    may have no path. Each was refused, or read another way."""
    x = b"x" * 100
    raw = bencodepy.decode(metainfo([([b"a"], x), ([b"b"], x)], "v1"))
    raw[b"info"][b"name.utf-8"] = b"caf\xc3\xa9"
    assert paths(bencodepy.encode(raw)) == ["café/a", "café/b"]
    del raw[b"info"][b"name"]
    assert paths(bencodepy.encode(raw)) == ["café/a", "café/b"]
    raw[b"info"][b"files"][0][b"path.utf-8"] = b"not a list"
    raw[b"info"][b"files"][1][b"path.utf-8"] = [b"b\xc3\xa9"]
    assert paths(bencodepy.encode(raw)) == ["café/a", "café/bé"]
    raw = bencodepy.decode(metainfo([([b"a"], b"y" * 20000), ([b"b"], x)], "hybrid"))
    del raw[b"info"][b"meta version"], raw[b"info"][b"file tree"], raw[b"piece layers"]
    del raw[b"info"][b"files"][1][b"path"]
    assert paths(bencodepy.encode(raw)) == ["top/a", "top/b"]


@pytest.mark.parametrize("kind", KINDS)
def test_paths_deeper_than_libtorrent_takes_are_refused(kind: str) -> None:
    """libtorrent takes 100 names in a v1 file's path, and lists and dictionaries 99 deep
    in a torrent (a v2 file tree's 95 names); deeper, it refuses the torrent. They were
    taken (up to 512 deep)."""
    deepest = 100 if kind == "v1" else 95
    for depth in (deepest, deepest + 1):
        raw = metainfo([([b"d"] * (depth - 1) + [b"f"], b"x" * 10), ([b"g"], b"y")], kind)
        if depth == deepest:
            assert paths(raw)[0] == "top/" + "d/" * (depth - 1) + "f"
            continue
        lt_refuses(raw)
        with pytest.raises(BadMetainfo, match="101 names" if kind == "v1" else "99 deep"):
            parse(raw)


@pytest.mark.parametrize("kind", KINDS)
def test_names_that_escape_are_still_refused(kind: str) -> None:
    """libtorrent stores ``..`` as ``_`` and leaves out a NUL byte and the separators
    (``/etc`` is ``etc``), so nothing it accepts escapes the save path; pieced still
    refuses a name that asks to (a NUL, ``..``, a path from the root, read at ``/`` and
    ``\\``), each with a message that says which."""
    x = b"x" * 100
    for bad, why in ((b"..", "climbs"), (b"sub/../..", "climbs"), (b"..\\x", "climbs"),
                     (b"/etc", "absolute"), (b"\\x", "absolute"), (b"a\0b", "NUL")):
        raw = metainfo([([b"ok"], x), ([bad, b"f"], x)], kind)
        lt_paths(raw)  # libtorrent accepts it
        with pytest.raises(BadMetainfo, match=why):
            parse(raw)
        with pytest.raises(BadMetainfo, match=why):
            parse(metainfo([([b"ok"], x), ([b"ok2"], x)], kind, name=bad))


# Every kind of odd name at once, for the downloads: cut, made good, renamed.
ODD: list[File] = [
    ([b"L" * 300 + b".txt"], bytes(range(256)) * 80),
    ([b"a\xffb", b"x\x01y"], b"2" * 5),
    ([b"Case.bin"], b"3" * PIECE),
    ([b"case.BIN"], b"4" * 17000),
    ([b"sub"], b"5" * 100),
    ([b"s\\ub", b"in\xe2\x80\xaegpj.exe"], b"6" * 3000),
    ([b".", b"\xc3"], b"7" * 40000),
    ([b"empty"], b""),
]


def lt_writes(raw: bytes, kind: str, save: Path) -> list[str]:
    """Have a libtorrent session write the torrent's payload (``add_piece``, through its
    own storage, as a download's pieces go), up to seeding; the files it made."""
    meta = parse(raw)
    data = iter(d for _, d in (sorted(ODD) if kind != "v1" else ODD))
    linear = b"".join(bytes(f.length) if f.pad else next(data) for f in meta.files)
    # a v2-only piece is the file's bytes only: the last of a file stops at its end
    ends = sorted(f.end for f in meta.files if not f.pad) if kind == "v2" else []
    params = lt.session_params()
    params.settings = lt_session_settings()  # type: ignore[assignment]
    ses = lt.session(params)
    atp = lt.load_torrent_buffer(raw)
    atp.save_path = str(save)
    h = ses.add_torrent(atp)
    deadline = time.monotonic() + 60
    checking = (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)
    while h.status().state in checking and time.monotonic() < deadline:
        time.sleep(0.01)
    for p in range(meta.num_pieces):
        start, end = p * PIECE, (p + 1) * PIECE
        k = bisect_right(ends, start)
        h.add_piece(p, linear[start : min(end, ends[k]) if k < len(ends) else end], 0)
    while not h.status().is_seeding and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.status().is_seeding, h.status().state
    ses.remove_torrent(h)
    del ses
    return sorted(str(p.relative_to(save)) for p in save.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", KINDS)
def test_a_libtorrent_download_of_odd_names_verifies(tmp_path: Path, kind: str) -> None:
    """A download libtorrent made of a torrent of odd names (cut, made good, renamed) is
    where pieced looks: every file, ``pieced verify`` passes, and a registered torrent's
    recheck finds every piece. The torrent was refused."""
    raw = metainfo(ODD, kind)
    save = tmp_path / "save"
    made = lt_writes(raw, kind, save)
    assert made == sorted("/".join(f.path) for f in parse(raw).files if f.stored)
    assert "top/case.1.BIN" in made and "top/sub.1" in made
    code, out, err = run_verify(raw, save, tmp_path)
    assert code == 0, (out, err)
    disk = DiskIO("posix", roots=[tmp_path])
    try:
        ih = disk.register(raw, save)
        result = disk.recheck(ih, full=True)
        assert result.failed_v1 in ([], None) and result.failed_v2 in ([], None)
        assert result.failed_v1 is not None or result.failed_v2 is not None
    finally:
        disk.close()
    assert all(lt_recheck(raw, save))
