"""Hostile .torrent files, one table row each: the exact bytes, what libtorrent says of
them, and what pieced must do.

Every row starts from a small torrent made by libtorrent (or mktorrent) and edits its
bencoded bytes by hand, through a codec that keeps keys in the order written and keeps
duplicates, and can write tokens verbatim (``Raw``) that no encoder would produce.

For each row three things are checked:

* libtorrent 2.1's verdict on the same bytes (``lt.torrent_info`` and
  ``lt.load_torrent_buffer``, which agree on every row), kept in the table as data, so
  the table records where pieced is stricter than libtorrent, or as strict;
* ``parse`` refuses with the expected error class and a message naming the offending key
  or path; or accepts (the control rows, and the file names libtorrent makes good), each
  file at the path ``lt.torrent_info`` gives it below the save path;
* ``DiskIO.register`` refuses as well and leaves nothing behind: the save folder stays
  empty and no torrent folder appears in the state dir; or accepts, its files where
  libtorrent's are, and (rows that say where the files land) the payload written there;
  on each storage backend (``backend``, see conftest.py).
"""

from __future__ import annotations

import gc
import hashlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import libtorrent as lt
import pytest
from pieced.storage.disk import DiskIO
from pieced.storage.errors import BadMetainfo, PiecedError, TooLarge
from pieced.storage.metainfo import parse

from tests.realtools import make_payload, make_torrent_lt, make_torrent_mktorrent
from tests.test_names import paths

PIECE = 16384
PAYLOAD = {"a.bin": 20000, "sub/b.bin": 40000, "c.txt": 133, "empty": 0}
ACCEPTED = "accepted"

# libtorrent 2.1.1's messages that several rows share
LT_DIGIT = "expected digit in bencoded string [bdecode:1]"
LT_EOF = "unexpected end of file in bencoded string [bdecode:3]"
LT_BENCODING = "invalid bencoding [libtorrent:15]"
LT_PIECE_LENGTH = "invalid or missing 'piece length' entry in torrent file [libtorrent:6]"
LT_NO_DATA = "invalid length of torrent [libtorrent:9]"
LT_HASH_COUNT = "incorrect number of piece hashes in torrent file [libtorrent:12]"
LT_LAYER = "a piece layer is invalid [libtorrent:215]"


# --------------------------------------------------------------------------- codec


class BDict(list[tuple[bytes, Any]]):
    """A bencoded dictionary as written: keys in file order, duplicates kept."""


class Raw(bytes):
    """Bytes that ``encode`` writes verbatim (a token no encoder would produce)."""


def decode(raw: bytes) -> Any:
    """Decode canonical bencode (the makers' output) into ints, bytes, lists, BDicts."""
    value, end = _decode_at(raw, 0)
    assert end == len(raw), "trailing bytes in a maker's output"
    return value


def _decode_at(raw: bytes, pos: int) -> tuple[Any, int]:
    c = raw[pos : pos + 1]
    if c == b"i":
        end = raw.index(b"e", pos)
        return int(raw[pos + 1 : end]), end + 1
    if c in (b"l", b"d"):
        items: list[Any] = []
        pos += 1
        while raw[pos : pos + 1] != b"e":
            item, pos = _decode_at(raw, pos)
            items.append(item)
        if c == b"l":
            return items, pos + 1
        return BDict(zip(items[::2], items[1::2], strict=True)), pos + 1
    colon = raw.index(b":", pos)
    start = colon + 1
    end = start + int(raw[pos:colon])
    return raw[start:end], end


def encode(value: Any) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, int) and not isinstance(value, bool):
        return b"i%de" % value
    if isinstance(value, BDict):
        return b"d" + b"".join(encode(k) + encode(v) for k, v in value) + b"e"
    if isinstance(value, list):
        return b"l" + b"".join(encode(v) for v in value) + b"e"
    raise TypeError(f"cannot bencode {value!r}")


def get(d: BDict, key: bytes, default: Any = None) -> Any:
    return next((v for k, v in d if k == key), default)


def at(value: Any, *steps: bytes | int) -> Any:
    """Walk into dicts (first occurrence of a key) and lists (an index)."""
    for step in steps:
        value = value[step] if isinstance(step, int) else get(value, step)
    return value


def put(d: BDict, key: bytes, value: Any) -> None:
    """Replace the (first) value of ``key``, or insert it where sorted order wants it."""
    for i, (k, _) in enumerate(d):
        if k == key:
            d[i] = (key, value)
            return
    i = 0
    while i < len(d) and d[i][0] < key:
        i += 1
    d.insert(i, (key, value))


def drop(d: BDict, key: bytes) -> None:
    d[:] = [(k, v) for k, v in d if k != key]


def again(d: BDict, key: bytes, value: Any) -> None:
    """Write ``key`` a second time, right after its first occurrence."""
    i = next(i for i, (k, _) in enumerate(d) if k == key)
    d.insert(i + 1, (key, value))


def rename(d: BDict, old: bytes, new: bytes) -> None:
    """Rename a key, keeping its value, and put it back in sorted order."""
    value = at(d, old)
    drop(d, old)
    put(d, new, value)


def swap(d: BDict, a: bytes, b: bytes) -> None:
    """Exchange the positions of two keys (and their values)."""
    i = next(i for i, (k, _) in enumerate(d) if k == a)
    j = next(i for i, (k, _) in enumerate(d) if k == b)
    d[i], d[j] = d[j], d[i]


# --------------------------------------------------------------------------- rows

Bases = dict[str, bytes]
Build = Callable[[Bases], bytes]


class Row(NamedTuple):
    id: str
    build: Build
    libtorrent: str  # ACCEPTED, or libtorrent's error message
    error: type[PiecedError] | None  # None: pieced accepts
    names: str = ""  # what pieced's message must contain
    lands: tuple[str, ...] = ()  # accepted: every file's path (pads left out), if given


def v1_paths(c_txt: str = "c.txt", name: str = "payload") -> tuple[str, ...]:
    """Where the v1 base's files are stored below the save path, ``c.txt`` at ``c_txt``."""
    return tuple(f"{name}/{path}" for path in ("a.bin", "empty", "sub/b.bin", c_txt))


CUT = "long" + "x" * 236  # a name past 240 bytes, cut to 240 as libtorrent cuts it


def base(kind: str) -> Build:
    return lambda b: b[kind]


def edited(kind: str, change: Callable[[BDict], object]) -> Build:
    """The ``kind`` base torrent, decoded, changed in place, encoded again."""

    def build(b: Bases) -> bytes:
        top = decode(b[kind])
        change(top)
        return encode(top)

    return build


def replaced(kind: str, old: bytes, new: bytes) -> Build:
    """The ``kind`` base torrent with one exact run of bytes replaced."""

    def build(b: Bases) -> bytes:
        assert b[kind].count(old) == 1, old
        return b[kind].replace(old, new)

    return build


def info(top: BDict) -> BDict:
    return at(top, b"info")  # type: ignore[no-any-return]


def v1_file(top: BDict, name: bytes) -> BDict:
    """The v1 ``files`` entry whose path ends with ``name``."""
    return next(f for f in at(top, b"info", b"files") if at(f, b"path")[-1] == name)  # type: ignore[no-any-return]


def set_path(name: bytes, *path: bytes) -> Callable[[BDict], None]:
    """Give the v1 file ``name`` another path."""
    return lambda top: put(v1_file(top, name), b"path", list(path))


def tree(top: BDict, *path: bytes) -> BDict:
    return at(top, b"info", b"file tree", *path)  # type: ignore[no-any-return]


def single(length: int, piece_length: int, pieces: int | None = None) -> Callable[[BDict], None]:
    """Make the single-file base say ``length`` bytes in pieces of ``piece_length``."""

    def change(top: BDict) -> None:
        put(info(top), b"length", length)
        put(info(top), b"piece length", piece_length)
        count = -(-length // piece_length) if pieces is None else pieces
        put(info(top), b"pieces", bytes(20 * count))

    return change


def unknown_keys(top: BDict) -> None:
    put(info(top), b"private", 1)
    put(info(top), b"source", b"x")


def dup_info(top: BDict) -> None:
    second = BDict(info(top))
    put(second, b"name", b"other")
    again(top, b"info", second)


def dup_pieces(top: BDict) -> None:
    again(info(top), b"pieces", bytes(len(at(top, b"info", b"pieces"))))


def dup_length(top: BDict) -> None:
    again(v1_file(top, b"c.txt"), b"length", 134)


def dup_tree_node(top: BDict) -> None:
    again(tree(top), b"c.txt", at(tree(top), b"a.bin"))


def dup_pieces_root(top: BDict) -> None:
    again(tree(top, b"c.txt", b""), b"pieces root", bytes(32))


def dup_piece_layer(top: BDict) -> None:
    layers: BDict = at(top, b"piece layers")
    key, value = layers[0]
    again(layers, key, bytes(len(value)))


def all_empty(top: BDict) -> None:
    for f in at(top, b"info", b"files"):
        put(f, b"length", 0)
    put(info(top), b"pieces", b"")


def v2_only_empty(top: BDict) -> None:
    put(info(top), b"file tree", BDict([(b"empty", BDict([(b"", BDict([(b"length", 0)]))]))]))
    drop(top, b"piece layers")


def pad_only_piece(top: BDict) -> None:
    """Grow the first pad file by a whole piece: that piece holds nothing but pad bytes."""
    pad = next(f for f in at(top, b"info", b"files") if get(f, b"attr") == b"p")
    length = at(pad, b"length")
    put(pad, b"length", length + PIECE)
    where = 20 * ((20000 + length) // PIECE)
    pieces = at(top, b"info", b"pieces")
    zeros = hashlib.sha1(bytes(PIECE)).digest()
    put(info(top), b"pieces", pieces[:where] + zeros + pieces[where:])


def v1_pad(length: int) -> Callable[[BDict], None]:
    """Put a pad file of ``length`` bytes after the first file of the v1 base."""

    def change(top: BDict) -> None:
        files = at(top, b"info", b"files")
        pad = BDict([(b"attr", b"p"), (b"length", length), (b"path", [b".pad", b"%d" % length])])
        files.insert(1, pad)
        total = sum(at(f, b"length") for f in files)
        put(info(top), b"pieces", bytes(20 * -(-total // PIECE)))

    return change


def tail_pad(length: Callable[[int], int]) -> Callable[[BDict], None]:
    """Give the hybrid base's tail pad (after its last file) ``length(its length)``
    bytes, the hashes left as they are."""

    def change(top: BDict) -> None:
        pad = at(top, b"info", b"files")[-1]
        assert get(pad, b"attr") == b"p", pad  # (libtorrent pads a hybrid's last file too)
        put(pad, b"length", length(at(pad, b"length")))

    return change


def two_pads(length: int) -> Callable[[BDict], None]:
    """``v1_pad(length)`` as two pad files, one after the other (neither covers a piece
    alone)."""

    def change(top: BDict) -> None:
        v1_pad(length)(top)
        files = at(top, b"info", b"files")
        half = length // 2
        files[1] = BDict([(b"attr", b"p"), (b"length", half), (b"path", [b".pad", b"%d" % half])])
        rest = length - half
        files.insert(2, BDict([(b"attr", b"p"), (b"length", rest), (b"path", [b".pad", b"x%d" % rest])]))

    return change


def symlink_with_length(top: BDict) -> None:
    f = v1_file(top, b"c.txt")
    put(f, b"attr", b"l")
    put(f, b"symlink path", [b"a.bin"])


def pad_symlink_with_length(top: BDict) -> None:
    """A pad file that is a symlink too: libtorrent takes the symlink (no bytes), a
    reader taking the pad's length would put every later file elsewhere."""
    v1_pad(100)(top)  # (as many pieces either way: libtorrent takes it)
    pad = next(f for f in at(top, b"info", b"files") if get(f, b"attr") == b"p")
    put(pad, b"attr", b"lp")
    put(pad, b"symlink path", [b"a.bin"])


def single_pad(top: BDict) -> None:
    put(info(top), b"attr", b"p")


def extra_layer(key: bytes) -> Callable[[BDict], None]:
    return lambda top: put(at(top, b"piece layers"), key, bytes(64))


def layer_of_small_file(top: BDict) -> None:
    """A layer for a file of one piece, which has none (its root is its piece's hash)."""
    root = at(tree(top, b"c.txt", b""), b"pieces root")
    put(at(top, b"piece layers"), root, root)


def short_layer(top: BDict) -> None:
    root = at(tree(top, b"sub", b"b.bin", b""), b"pieces root")
    put(at(top, b"piece layers"), root, at(top, b"piece layers", root)[:-32])


def wrong_layer(top: BDict) -> None:
    root = at(tree(top, b"sub", b"b.bin", b""), b"pieces root")
    put(at(top, b"piece layers"), root, bytes(96))


def missing_layer(top: BDict) -> None:
    root = at(tree(top, b"sub", b"b.bin", b""), b"pieces root")
    drop(at(top, b"piece layers"), root)


def both_file_and_folder(top: BDict) -> None:
    put(tree(top, b"sub"), b"", BDict([(b"length", 0)]))


def deep_path(top: BDict) -> None:
    put(v1_file(top, b"c.txt"), b"path", [b"deep", *[b"d" * 200] * 21])


ROWS: list[Row] = [
    # -- controls: pieced accepts these
    Row("control: libtorrent v1", base("v1"), ACCEPTED, None),
    Row("control: libtorrent v2", base("v2"), ACCEPTED, None),
    Row("control: libtorrent hybrid", base("hybrid"), ACCEPTED, None),
    Row("control: libtorrent v1 single file", base("single"), ACCEPTED, None),
    Row("control: mktorrent v1", base("mktorrent"), ACCEPTED, None),
    Row(
        "control: files differing only in case",
        edited("v1", set_path(b"c.txt", b"A.BIN")),
        ACCEPTED,
        None,
        lands=v1_paths("A.1.BIN"),  # a.bin to libtorrent too: renamed as it renames it
    ),
    Row(
        "control: unknown keys in info",
        edited("v1", unknown_keys),
        ACCEPTED,
        None,
    ),
    Row(
        "control: a 255-byte component",
        edited("v1", set_path(b"c.txt", b"long" + b"x" * 251)),
        ACCEPTED,
        None,
        lands=v1_paths(CUT),
    ),
    Row("control: v1 pad file shorter than a piece", edited("v1", v1_pad(12768)), ACCEPTED, None),
    Row("control: 64 MiB pieces", edited("single", single(133, 1 << 26)), ACCEPTED, None),
    # -- duplicate keys
    Row("second top-level info", edited("v1", dup_info), ACCEPTED, BadMetainfo, "info"),
    Row("second pieces in info", edited("v1", dup_pieces), ACCEPTED, BadMetainfo, "pieces"),
    Row(
        "second length in a files entry", edited("v1", dup_length), ACCEPTED, BadMetainfo, "length"
    ),
    Row(
        "second c.txt in a v2 file tree node",
        edited("v2", dup_tree_node),
        LT_BENCODING,
        BadMetainfo,
        "c.txt",
    ),
    Row(
        "second pieces root in a v2 file",
        edited("v2", dup_pieces_root),
        LT_BENCODING,
        BadMetainfo,
        "pieces root",
    ),
    Row(
        "second key in piece layers",
        edited("v2", dup_piece_layer),
        LT_LAYER,
        BadMetainfo,
        "piece layers",
    ),
    # -- unsorted keys
    Row(
        "unsorted info keys",
        edited("v1", lambda t: swap(info(t), b"piece length", b"pieces")),
        ACCEPTED,
        BadMetainfo,
        "piece",
    ),
    Row(
        "unsorted top-level keys",
        edited("v1", lambda t: swap(t, b"created by", b"creation date")),
        ACCEPTED,
        BadMetainfo,
        "creat",
    ),
    Row(
        "unsorted v2 file tree",
        edited("v2", lambda t: swap(tree(t), b"c.txt", b"empty")),
        LT_BENCODING,
        BadMetainfo,
        "c.txt",
    ),
    # -- integers and string lengths that are not canonical
    Row("i+133e", replaced("v1", b"i133e", b"i+133e"), LT_DIGIT, BadMetainfo, "length"),
    Row("i 133e", replaced("v1", b"i133e", b"i 133e"), LT_DIGIT, BadMetainfo, "length"),
    Row("i1_33e", replaced("v1", b"i133e", b"i1_33e"), LT_DIGIT, BadMetainfo, "length"),
    Row("i0133e", replaced("v1", b"i133e", b"i0133e"), ACCEPTED, BadMetainfo, "length"),
    Row("i-0e", replaced("v1", b"i0e", b"i-0e"), ACCEPTED, BadMetainfo, "length"),
    Row("ie", replaced("v1", b"i0e", b"ie"), LT_DIGIT, BadMetainfo, "length"),
    Row(
        "string length 07:payload",
        replaced("v1", b"7:payload", b"07:payload"),
        ACCEPTED,
        BadMetainfo,
        "name",
    ),
    Row(
        "string length past the end",
        replaced("v1", b"7:payload", b"99999:payload"),
        LT_EOF,
        BadMetainfo,
        "name",
    ),
    Row(
        "integer of 5,000 digits",
        replaced("v1", b"i133e", b"i%se" % (b"1" * 5000)),
        "integer overflow [bdecode:7]",
        BadMetainfo,
        "digits",
    ),
    Row(
        "file length 2^63",
        edited("v1", lambda t: put(v1_file(t, b"c.txt"), b"length", 1 << 63)),
        ACCEPTED,
        TooLarge,
        "total size",
    ),
    Row(
        "two file lengths adding up past 2^63",
        edited("v1", lambda t: [put(v1_file(t, n), b"length", 1 << 62) for n in (b"a.bin", b"b.bin")]),
        LT_NO_DATA,
        TooLarge,
        "total size",
    ),
    Row(
        "v2 file length 2^63",
        edited("v2", lambda t: put(tree(t, b"c.txt", b""), b"length", 1 << 63)),
        ACCEPTED,
        TooLarge,
        "total size",
    ),
    Row(
        "piece length over 64 bits",
        replaced("v1", b"i16384e", b"i99999999999999999999e"),
        LT_PIECE_LENGTH,
        TooLarge,
        "piece length",
    ),
    # -- the shape of the input
    Row("trailing bytes", lambda b: b["v1"] + b"\n", ACCEPTED, None, lands=v1_paths()),
    Row("trailing junk", lambda b: b["v1"] + b"d4:infoi1ee", ACCEPTED, None, lands=v1_paths()),
    Row("truncated in pieces", lambda b: b["v1"][:-30], LT_EOF, BadMetainfo, "pieces"),
    Row(
        "nesting bomb in info",
        edited("v1", lambda t: put(info(t), b"x-bomb", Raw(b"l" * 100_000 + b"e" * 100_000))),
        "bencoded nesting depth exceeded [bdecode:5]",
        BadMetainfo,
        "x-bomb",
    ),
    Row(
        "info is a list",
        edited("v1", lambda t: put(t, b"info", [])),
        "missing or invalid 'info' section in torrent file [libtorrent:4]",
        BadMetainfo,
        "info",
    ),
    Row(
        "name missing",
        edited("v1", lambda t: drop(info(t), b"name")),
        "missing name in torrent file [libtorrent:7]",
        BadMetainfo,
        "name",
    ),
    # -- file paths libtorrent refuses, or that would leave the save path: refused
    Row(
        "v2 node both file and folder",
        edited("v2", both_file_and_folder),
        "failed to parse files from torrent file [libtorrent:10]",
        BadMetainfo,
        "sub",
    ),
    Row("a path over 4096 bytes", edited("v1", deep_path), ACCEPTED, BadMetainfo, "deep"),
    Row(
        "component ..",
        edited("v1", set_path(b"c.txt", b"..", b"c.txt")),
        ACCEPTED,
        BadMetainfo,
        "info.files[3].path[0] '..' climbs out of its folder",
    ),
    Row(
        "NUL in a component",
        edited("v1", set_path(b"c.txt", b"c\0.txt")),
        ACCEPTED,
        BadMetainfo,
        "info.files[3].path[0] contains a NUL byte",
    ),
    Row(
        "\\ in a component",
        edited("v1", set_path(b"c.txt", b"..\\c.txt")),
        ACCEPTED,
        BadMetainfo,
        "info.files[3].path[0] '..\\\\c.txt' climbs out of its folder",
    ),
    Row(
        "absolute path",
        edited("v1", set_path(b"c.txt", b"/etc", b"c.txt")),
        ACCEPTED,
        BadMetainfo,
        "info.files[3].path[0] '/etc' is an absolute path",
    ),
    Row(
        "absolute name",
        edited("v1", lambda t: put(info(t), b"name", b"/tmp/payload")),
        ACCEPTED,
        BadMetainfo,
        "info.name '/tmp/payload' is an absolute path",
    ),
    Row(
        "v2 file tree key ..",
        edited("v2", lambda t: rename(tree(t), b"c.txt", b"..")),
        ACCEPTED,
        BadMetainfo,
        "..",
    ),
    # -- file paths libtorrent makes good: accepted, each file where libtorrent stores it
    Row(
        "same path twice",
        edited("v1", set_path(b"c.txt", b"a.bin")),
        ACCEPTED,
        None,
        lands=v1_paths("a.1.bin"),
    ),
    Row(
        "file a beside folder a/b",
        edited("v1", set_path(b"c.txt", b"sub")),
        ACCEPTED,
        None,
        lands=v1_paths("sub.1"),
    ),
    Row(
        "a 256-byte component",
        edited("v1", set_path(b"c.txt", b"long" + b"x" * 252)),
        ACCEPTED,
        None,
        lands=v1_paths(CUT),
    ),
    Row(
        "empty component",
        edited("v1", set_path(b"c.txt", b"sub", b"")),
        ACCEPTED,
        None,
        lands=v1_paths("sub/_"),
    ),
    Row(
        "component .",
        edited("v1", set_path(b"c.txt", b".", b"c.txt")),
        ACCEPTED,
        None,
        lands=v1_paths("_/c.txt"),
    ),
    Row(
        "/ in a component",
        edited("v1", set_path(b"c.txt", b"sub/c.txt")),
        ACCEPTED,
        None,
        lands=v1_paths("subc.txt"),
    ),
    Row(
        "name not UTF-8",
        edited("v1", lambda t: put(info(t), b"name", b"pay\xffload")),
        ACCEPTED,
        None,
        lands=v1_paths(name="pay_load"),
    ),
    # -- sizes
    Row(
        "total size 0, one file",
        edited("single", single(0, PIECE)),
        LT_NO_DATA,
        BadMetainfo,
        "total size",
    ),
    Row(
        "total size 0, all files empty",
        edited("v1", all_empty),
        LT_NO_DATA,
        BadMetainfo,
        "total size",
    ),
    Row("total size 0, v2", edited("v2", v2_only_empty), LT_NO_DATA, BadMetainfo, "total size"),
    Row(
        "piece length 0",
        edited("single", single(133, 0, 1)),
        LT_PIECE_LENGTH,
        BadMetainfo,
        "piece length",
    ),
    Row(
        "piece length negative",
        edited("single", single(133, -PIECE, 1)),
        LT_PIECE_LENGTH,
        BadMetainfo,
        "piece length",
    ),
    Row(
        "v2 piece length 8 KiB",
        edited("v2", lambda t: put(info(t), b"piece length", 8192)),
        LT_PIECE_LENGTH,
        BadMetainfo,
        "piece length",
    ),
    Row(
        "v2 piece length 48 KiB",
        edited("v2", lambda t: put(info(t), b"piece length", 3 * PIECE)),
        LT_PIECE_LENGTH,
        BadMetainfo,
        "piece length",
    ),
    Row(
        "1 GiB pieces, 133 bytes",
        edited("single", single(133, 1 << 30)),
        LT_PIECE_LENGTH,
        TooLarge,
        "piece length",
    ),
    Row(
        "4 EiB in 2^55-byte pieces",
        edited("single", single(1 << 62, 1 << 55)),
        LT_PIECE_LENGTH,
        TooLarge,
        "piece length",
    ),
    Row(
        "pieces not a multiple of 20",
        edited("v1", lambda t: put(info(t), b"pieces", at(t, b"info", b"pieces")[:-1])),
        LT_HASH_COUNT,
        BadMetainfo,
        "pieces",
    ),
    Row(
        "pieces one hash too many",
        edited("v1", lambda t: put(info(t), b"pieces", at(t, b"info", b"pieces") + bytes(20))),
        LT_HASH_COUNT,
        BadMetainfo,
        "pieces",
    ),
    # -- pad files and symlinks
    *(Row(
        f"hybrid tail pad {how}",
        edited("hybrid", tail_pad(length)),
        "the v1 and v2 file metadata does not match [libtorrent:213]",
        BadMetainfo,
        "does not end on a piece boundary",
    ) for how, length in (("of 0 bytes", lambda n: 0), ("of 1 byte", lambda n: 1),
                          ("one byte short", lambda n: n - 1))),
    Row("control: hybrid without its tail pad",
        edited("hybrid", lambda t: at(t, b"info", b"files").pop()), ACCEPTED, None),
    Row(
        "hybrid piece of pad bytes only",
        edited("hybrid", pad_only_piece),
        "the v1 and v2 file metadata does not match [libtorrent:213]",
        BadMetainfo,
        ".pad",
    ),
    Row(
        "v1 piece of pad bytes only",
        edited("v1", v1_pad(12768 + PIECE)),
        ACCEPTED,
        BadMetainfo,
        ".pad",
    ),
    Row(
        "v1 piece of pad bytes only, in two pad files",
        edited("v1", two_pads(12768 + PIECE)),
        ACCEPTED,
        BadMetainfo,
        ".pad",
    ),
    Row("symlink with a length", edited("v1", symlink_with_length), ACCEPTED, BadMetainfo, "c.txt"),
    Row("pad file that is a symlink, with a length", edited("v1", pad_symlink_with_length),
        ACCEPTED, BadMetainfo, ".pad"),
    Row("single file that is a pad", edited("single", single_pad), ACCEPTED, BadMetainfo, "pad"),
    Row("v2 file with the pad attribute",
        edited("v2", lambda t: put(tree(t, b"c.txt", b""), b"attr", b"p")),
        "a file in the v2 metadata has the pad attribute set [libtorrent:218]", BadMetainfo,
        "c.txt"),
    Row("piece layer of no file", edited("v2", extra_layer(b"\x01" * 32)), LT_LAYER,
        BadMetainfo, "piece layers"),
    Row("piece layer under a short key", edited("hybrid", extra_layer(b"short")), LT_LAYER,
        BadMetainfo, "piece layers"),
    Row("piece layer of a file of one piece", edited("v2", layer_of_small_file), LT_LAYER,
        BadMetainfo, "piece layers"),
    Row(  # (made as an empty file, as libtorrent makes it: checked by test_register)
        "symlink flag without a symlink path",
        edited("v1", lambda t: put(v1_file(t, b"empty"), b"attr", b"l")),
        ACCEPTED,
        None,
        lands=v1_paths(),
    ),
    Row(  # (c.txt a pad to both: left out of the paths of both)
        "BitComet pad name in a folder's name",
        edited("v1", set_path(b"c.txt", b"_____padding_file_0", b"c.txt")),
        ACCEPTED,
        None,
    ),
    Row(
        "BitComet pad name inside a file's name",
        edited("v1", set_path(b"c.txt", b"x_____padding_file_0")),
        ACCEPTED,
        None,
    ),
    # -- v2 hashes and version
    Row("v2 piece layer 32 bytes short", edited("v2", short_layer), LT_LAYER, BadMetainfo, "b.bin"),
    Row(
        "v2 piece layer of other hashes", edited("v2", wrong_layer), LT_LAYER, BadMetainfo, "b.bin"
    ),
    Row("v2 piece layer missing", edited("v2", missing_layer), ACCEPTED, BadMetainfo, "b.bin"),
    Row("v2 without piece layers", edited("v2", lambda t: drop(t, b"piece layers")), ACCEPTED,
        BadMetainfo, "info dictionary alone"),
    # A hybrid's v1 hashes check every piece: libtorrent takes it and so do we.
    Row("hybrid piece layer missing", edited("hybrid", missing_layer), ACCEPTED, None),
    Row("hybrid without piece layers", edited("hybrid", lambda t: drop(t, b"piece layers")),
        ACCEPTED, None),
    Row(
        "v2 pieces root of 31 bytes",
        edited("v2", lambda t: put(tree(t, b"c.txt", b""), b"pieces root", bytes(31))),
        "a v2 file entry has no root hash [libtorrent:216]",
        BadMetainfo,
        "c.txt",
    ),
    Row(
        "meta version 3",
        edited("v2", lambda t: put(info(t), b"meta version", 3)),
        "the torrent file has an unknown meta version [libtorrent:210]",
        BadMetainfo,
        "meta version",
    ),
]


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of four files (one of them empty) the multi-file bases are made of."""
    return make_payload(tmp_path_factory.mktemp("multi"), PAYLOAD, seed=5)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Bases:
    """The torrents every row starts from, made once: ``folder`` as v1, v2 and hybrid,
    the same folder by mktorrent, and one 133-byte file as v1."""
    root = tmp_path_factory.mktemp("bases")
    one = make_payload(root / "single", 133, seed=6)
    made = {kind: make_torrent_lt(folder, PIECE, kind) for kind in ("v1", "v2", "hybrid")}
    made["single"] = make_torrent_lt(one, PIECE, "v1")
    made["mktorrent"] = make_torrent_mktorrent(folder, 2 * PIECE)
    return made


def libtorrent_verdict(raw: bytes) -> str:
    """What libtorrent says of ``raw``: ACCEPTED or its error message. Its two ways in
    (``torrent_info`` and ``load_torrent_buffer``) must agree."""
    verdicts = []
    for load in (lt.torrent_info, lt.load_torrent_buffer):
        try:
            load(raw)
        except RuntimeError as exc:
            verdicts.append(str(exc))
        else:
            verdicts.append(ACCEPTED)
    assert verdicts[0] == verdicts[1], verdicts
    return verdicts[0]


def lt_stored(raw: bytes) -> list[str]:
    """The paths ``lt.torrent_info`` stores the files at below the save path (pads left
    out): its ``files()``, the renames it makes applied (``layout()`` is the names as
    the torrent lists them, before any rename)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # files(): deprecated in 2.x
        fs = lt.torrent_info(raw).files()
    return [fs.file_path(i) for i in range(fs.num_files())
            if not fs.file_flags(i) & lt.file_storage.flag_pad_file]


def landed(row: Row, raw: bytes) -> list[str]:
    """Where the files of an accepted row are stored: pieced's paths, checked against
    libtorrent's (``paths`` holds them to ``load_torrent_buffer``'s, renames applied;
    here to ``torrent_info``'s too) and against the row."""
    got = paths(raw)
    assert got == lt_stored(raw)
    assert not row.lands or got == list(row.lands)
    return got


ROW_PARAMS = [pytest.param(row, id=row.id) for row in ROWS]


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_libtorrent_verdict(row: Row, bases: Bases) -> None:
    assert libtorrent_verdict(row.build(bases)) == row.libtorrent


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_parse(row: Row, bases: Bases) -> None:
    """Also: a parse, accepted or refused, keeps no hold on the metainfo once its
    result is dropped (a reference cycle would, until a full garbage collection: a
    daemon refused a 60 MB torrent again and again, and grew by 60 MB a time)."""
    raw = row.build(bases)
    held = sys.getrefcount(raw)
    gc.disable()  # (else a collection could clear a cycle before it is looked for)
    try:
        if row.error is None:
            landed(row, raw)
        else:
            with pytest.raises(row.error) as caught:
                parse(raw)
            assert row.names in str(caught.value)
            del caught
        assert sys.getrefcount(raw) == held
    finally:
        gc.enable()


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_register(row: Row, bases: Bases, folder: Path, tmp_path: Path, backend: str) -> None:
    raw = row.build(bases)
    save = tmp_path / "save"
    save.mkdir()
    state = tmp_path / "state"
    disk = DiskIO(backend, hash_workers=1, cache_bytes=1 << 20, state_dir=state)
    try:
        if row.error is None:
            ih = disk.register(raw, save)
            assert len(list((state / "torrents").iterdir())) == 1
            where = landed(row, raw)
            assert [f["path"] for f in disk.status(ih)["files"]] == where
            if row.lands and backend != "disabled":  # (it stores nothing)
                write_v1_payload(disk, ih, bases, folder)
                meta = parse(raw)
                on_disk = {str(p.relative_to(save)): p.read_bytes()
                           for p in save.rglob("*") if p.is_file()}
                assert on_disk == {"/".join(f.path): (folder.parent / base).read_bytes()
                                   for f, base in zip(meta.files, v1_paths(), strict=True)}
            return
        with pytest.raises(row.error) as caught:
            disk.register(raw, save)
        assert row.names in str(caught.value)
        assert sorted(save.rglob("*")) == []
        assert sorted((state / "torrents").iterdir()) == []
    finally:
        disk.close()


def write_v1_payload(disk: DiskIO, ih: bytes, bases: Bases, folder: Path) -> None:
    """Write every piece of a row edited from the v1 base (its files' names changed,
    their lengths and order not: the base's bytes in the base's order), flushed."""
    linear = b"".join((folder.parent / path).read_bytes() for path in v1_paths())
    assert len(linear) == parse(bases["v1"]).total_size
    for p in range(0, -(-len(linear) // PIECE)):
        result = disk.write_chunk(ih, p, 0, linear[p * PIECE : (p + 1) * PIECE])
        assert result is not None and result.ok, p
    disk.flush_all()
