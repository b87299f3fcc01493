"""Parsing and validating .torrent metainfo: v1, v2 (BEP 52), hybrid, BEP 47 pad files.

Everything a client hands us is untrusted: a metainfo is refused, with a message
that names the offending key, unless every file path stays inside the save path,
every length adds up, and every v2 piece layer hashes to its file's ``pieces root``.
Once a :class:`Metainfo` exists, the rest of the engine may trust it.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterator
from functools import partial
from typing import Any, NamedTuple

from .bencode import BencodeError, Path, _Decoder, decode_spanning
from .errors import BadMetainfo, PiecedError, TooLarge
from .filetable import UNSTORED, FileEntry, FileTable, TableBuilder
from .merkle import BLOCK_SIZE, leaf_count, piece_width, root_from_layer

MAX_METAINFO_BYTES = 64 * 1024 * 1024
MAX_FILES = 1_000_000
MAX_PIECES = 4_000_000
MAX_PIECE_LENGTH = 64 * 1024 * 1024
MAX_NAME_BYTES = 255  # a path component, as file systems allow (NAME_MAX)
MAX_PATH_BYTES = 4096  # a whole path below the save path (PATH_MAX)
_LEGACY_PAD_PREFIX = "_____padding_file_"


class V2Piece(NamedTuple):
    """What a v2 check of one piece needs: which file, how many bytes, what root."""

    file_index: int
    index_in_file: int
    data_length: int
    width: int
    expected: bytes


class Metainfo:
    """A parsed, validated torrent. Treat it as immutable.

    A plain class rather than a dataclass: ``pieced verify`` imports this module,
    and its start-up counts (dataclass creation and its imports cost milliseconds).
    """

    def __init__(
        self,
        name: str,
        piece_length: int,
        files: FileTable,
        total_size: int,
        num_pieces: int,
        info_hash_v1: bytes | None,
        info_hash_v2: bytes | None,
        pieces_v1: bytes | None,
        piece_layers: dict[bytes, bytes],
        _v2_first_piece: tuple[int, ...] = (),
        _v2_file_index: tuple[int, ...] = (),
        info_span: tuple[int, int] = (0, 0),
    ) -> None:
        self.name = name
        self.piece_length = piece_length
        self.files = files
        self.total_size = total_size
        self.num_pieces = num_pieces
        self.info_hash_v1 = info_hash_v1
        self.info_hash_v2 = info_hash_v2
        self.pieces_v1 = pieces_v1
        self.piece_layers = piece_layers
        # Per v2 file with data, in file order: its first piece and its index in files.
        self._v2_first_piece = _v2_first_piece
        self._v2_file_index = _v2_file_index
        # Where the info dictionary lies in the metainfo's bytes: the info hashes are
        # over them, and they are the torrent's metadata a peer hands out (BEP 9).
        self.info_span = info_span

    def __repr__(self) -> str:
        return f"Metainfo(name={self.name!r}, pieces={self.num_pieces}, files={len(self.files)})"

    @property
    def info_hash(self) -> bytes:
        """The 20-byte key: v1 SHA-1, or the v2 SHA-256 truncated for v2-only torrents."""
        if self.info_hash_v1 is not None:
            return self.info_hash_v1
        assert self.info_hash_v2 is not None
        return self.info_hash_v2[:20]

    @property
    def aliases(self) -> tuple[bytes, ...]:
        """Every 20-byte key this torrent answers to (a hybrid answers to two)."""
        keys = [self.info_hash]
        if self.info_hash_v2 is not None and self.info_hash_v2[:20] != keys[0]:
            keys.append(self.info_hash_v2[:20])
        return tuple(keys)

    @property
    def has_v1(self) -> bool:
        return self.pieces_v1 is not None

    @property
    def has_v2(self) -> bool:
        return self.info_hash_v2 is not None

    def piece_size(self, piece: int) -> int:
        if piece == self.num_pieces - 1:
            return self.total_size - piece * self.piece_length
        return self.piece_length

    def v1_hash(self, piece: int) -> bytes:
        assert self.pieces_v1 is not None
        return self.pieces_v1[piece * 20 : piece * 20 + 20]

    def v2_piece(self, piece: int) -> V2Piece | None:
        """The v2 view of a piece, or None for a v1-only torrent."""
        if not self.has_v2:
            return None
        i = bisect.bisect_right(self._v2_first_piece, piece) - 1
        fidx = self._v2_file_index[i]
        f = self.files[fidx]
        j = piece - self._v2_first_piece[i]
        data_length = min(self.piece_length, f.length - j * self.piece_length)
        assert f.pieces_root is not None
        if f.length > self.piece_length:
            expected = self.piece_layers[f.pieces_root][j * 32 : j * 32 + 32]
        else:
            expected = f.pieces_root
        return V2Piece(fidx, j, data_length, piece_width(f.length, self.piece_length), expected)


def read_metainfo(path: str | os.PathLike[str], max_bytes: int = MAX_METAINFO_BYTES) -> bytes:
    """A .torrent file's bytes, read no further than ``max_bytes`` (``/dev/zero`` given
    for a .torrent would be read for ever): OSError if it cannot be read or is not a
    regular file (a FIFO's open does not wait), TooLarge past the limit."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        chunks = []
        got = 0
        while got <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if got > max_bytes:
        raise TooLarge(f"{os.fspath(path)} is larger than {max_bytes} bytes: not a .torrent")
    return b"".join(chunks)


def parse(
    data: bytes,
    *,
    max_bytes: int = MAX_METAINFO_BYTES,
    max_files: int = MAX_FILES,
    max_pieces: int = MAX_PIECES,
    max_piece_length: int = MAX_PIECE_LENGTH,
) -> Metainfo:
    """Parse and fully validate .torrent bytes; raise BadMetainfo naming the problem.

    The bencode must be canonical (see ``bencode.py``): a duplicate key, keys out of
    order or ``i+10e`` could make this parser and another read one info hash two ways.
    """
    try:
        return _parse(data, max_bytes, max_files, max_pieces, max_piece_length)
    except OverflowError:  # from the file table's 64-bit arrays, the one place sizes add up
        raise TooLarge("a file's length or the torrent's total size is over "
                       f"{(1 << 63) - 1} bytes") from None


def _parse(data: bytes, max_bytes: int, max_files: int, max_pieces: int,
           max_piece_length: int) -> Metainfo:
    if len(data) > max_bytes:
        raise TooLarge(f"metainfo is {len(data)} bytes, the limit is {max_bytes}")
    try:
        top, span = decode_spanning(data, b"info",
                                    hook=(b"files", partial(_read_v1_files, max_files)))
    except BencodeError as exc:
        raise BadMetainfo(f"not canonical bencode: {exc}") from None
    if not isinstance(top, dict):
        raise BadMetainfo("metainfo is not a dictionary")
    info = top.get(b"info")
    if not isinstance(info, dict) or span is None:
        raise BadMetainfo("'info' is missing or not a dictionary")
    # The hashes are over the info value's exact bytes (a view: 20 MB for a million pieces).
    info_bytes = memoryview(data)[span[0] : span[1]]

    name = _component(_get(info, b"name", bytes, "info"), "info.name", info.get(b"name.utf-8"))
    piece_length = _get(info, b"piece length", int, "info")
    if piece_length <= 0:
        raise BadMetainfo(f"'piece length' must be positive, got {piece_length}")
    if piece_length > max_piece_length:
        raise TooLarge(f"'piece length' {piece_length} is over the limit of {max_piece_length}")
    meta_version = info.get(b"meta version")
    has_v2 = meta_version is not None
    if has_v2 and meta_version != 2:
        raise BadMetainfo(f"unsupported 'meta version' {meta_version!r}")
    has_v1 = b"pieces" in info
    if not has_v1 and not has_v2:
        raise BadMetainfo("'info' has neither 'pieces' (v1) nor 'meta version' 2 (v2)")
    if has_v2 and (piece_length < BLOCK_SIZE or piece_length & (piece_length - 1)):
        raise BadMetainfo(f"v2 'piece length' must be a power of two >= 16 KiB, got {piece_length}")

    v2_files: list[FileEntry] = []
    if has_v2:
        tree = _get(info, b"file tree", dict, "info")
        v2_files = _walk_tree(tree, name, max_files)
        if not v2_files:
            raise BadMetainfo("'file tree' has no files")

    if has_v1:
        pieces = _get(info, b"pieces", bytes, "info")
        if len(pieces) % 20:
            raise BadMetainfo(f"'pieces' length {len(pieces)} is not a multiple of 20")
        files = _v1_files(info, name, max_files)
        if has_v2:
            v1_files = list(files)
            _check_hybrid(v1_files, v2_files, piece_length)
            # v2 carries the pieces roots; v1 carries the pad files: merge them.
            roots = iter(v2_files)
            files = FileTable.of(f if f.pad else _with_root(f, next(roots)) for f in v1_files)
    else:
        pieces = None
        files = FileTable.of(_align_v2(v2_files, piece_length, name))

    total = files.total
    flags, lengths = files.flags, files.lengths
    if not any(lengths[i] for i in range(len(files)) if not flags[i] & UNSTORED):
        raise BadMetainfo("the torrent holds no data: every file is empty (total size 0)")
    if not _surely_fine(files):
        _check_files(list(files), name, piece_length)
    _check_special(files, piece_length)
    num_pieces = (total + piece_length - 1) // piece_length
    if num_pieces > max_pieces:
        raise TooLarge(f"torrent has {num_pieces} pieces, the limit is {max_pieces}")
    if pieces is not None and len(pieces) // 20 != num_pieces:
        raise BadMetainfo(
            f"'pieces' holds {len(pieces) // 20} hashes but the files need {num_pieces} pieces"
        )

    layers: dict[bytes, bytes] = {}
    first_piece: list[int] = []
    file_of: list[int] = []
    if has_v2:
        raw_layers = top.get(b"piece layers", {})
        if not isinstance(raw_layers, dict):
            raise BadMetainfo("'piece layers' is not a dictionary")
        for idx, f in enumerate(files):
            if f.pad or f.length == 0:
                continue
            assert f.pieces_root is not None
            first_piece.append(f.offset // piece_length)
            file_of.append(idx)
            if f.length <= piece_length:
                continue
            layer = raw_layers.get(f.pieces_root)
            where = "/".join(f.path)
            if not isinstance(layer, bytes):
                raise BadMetainfo(f"'piece layers' has no layer for file {where!r}")
            want = 32 * ((f.length + piece_length - 1) // piece_length)
            if len(layer) != want:
                raise BadMetainfo(
                    f"piece layer of {where!r} is {len(layer)} bytes, expected {want}"
                )
            if root_from_layer(layer, piece_length) != f.pieces_root:
                raise BadMetainfo(f"piece layer of {where!r} does not hash to its 'pieces root'")
            layers[f.pieces_root] = layer

    meta = Metainfo(
        name=name,
        piece_length=piece_length,
        files=files,
        total_size=total,
        num_pieces=num_pieces,
        info_hash_v1=hashlib.sha1(info_bytes).digest() if has_v1 else None,
        info_hash_v2=hashlib.sha256(info_bytes).digest() if has_v2 else None,
        pieces_v1=pieces,
        piece_layers=layers,
        _v2_first_piece=tuple(first_piece),
        _v2_file_index=tuple(file_of),
        info_span=span,
    )
    return meta


def _surely_fine(files: FileTable) -> bool:
    """Whether the paths are surely within the limits and collide nowhere, found at
    the speed of a torrent of 100,000 files; when not sure, :func:`_check_files` looks
    file by file and names what is wrong (or finds nothing)."""
    names = files.names()
    stored = [(fid, nm) for fid, nm, fl in zip(files.folder_index(), names, files.flags,
                                                strict=True) if not fl & UNSTORED]
    taken = set(stored)
    if len(taken) != len(stored):
        return False  # a path listed twice
    folders = files.folders
    fids = {parts: fid for fid, parts in enumerate(folders)}
    longest_folder = 0
    for parts in folders:
        longest_folder = max(longest_folder, len("/".join(parts)))
        if any(len(part) * 4 > MAX_NAME_BYTES for part in parts):
            return False
        for k in range(1, len(parts) + 1):  # a folder that is also a file
            parent = fids.get(parts[: k - 1])
            if parent is not None and (parent, parts[k - 1]) in taken:
                return False
    longest_name = max(map(len, names), default=0)
    return (longest_name * 4 <= MAX_NAME_BYTES
            and (longest_folder + 1 + longest_name) * 4 <= MAX_PATH_BYTES)


def _check_special(files: FileTable, piece_length: int) -> None:
    """Pad files and symlinks: what they may be. No piece may be pad bytes only (no
    block of it would ever be sent), whether one pad file covers it or several in a row
    (empty files between them hold no bytes either)."""
    total = files.total
    run_start = run_end = -1
    for i in files.special():
        f = files[i]
        if f.stored:
            continue
        where = "/".join(f.path)
        if "l" in f.attr and not f.pad and f.length:
            raise BadMetainfo(f"symlink entry {where!r} has a length ({f.length}): "
                              "a symlink carries no data")
        if f.pad and f.length:
            if f.offset != run_end:
                run_start = f.offset
            run_end = f.end
            first = -(-run_start // piece_length) * piece_length
            if first < run_end and min(first + piece_length, total) <= run_end:
                raise BadMetainfo(f"pad file {where!r} covers the whole of piece "
                                  f"{first // piece_length}: a piece of pad only")


def _check_files(files: list[FileEntry], name: str, piece_length: int) -> None:
    """The files as a whole, one by one: paths that a file system can hold and that do
    not collide. Named errors for what :func:`_surely_fine` was not sure of."""
    seen: dict[tuple[str, ...], str] = {}
    for f in files:
        if not f.stored:
            continue
        where = "/".join(f.path)
        for part in f.path:  # (UTF-8 takes at most 4 bytes a character)
            if len(part) * 4 > MAX_NAME_BYTES and len(part.encode()) > MAX_NAME_BYTES:
                raise BadMetainfo(f"path component {part[:40]!r}... of {where[:80]!r} is over "
                                  f"{MAX_NAME_BYTES} bytes")
        if len(where) * 4 > MAX_PATH_BYTES and len(where.encode()) > MAX_PATH_BYTES:
            raise BadMetainfo(f"path {where[:80]!r}... is over {MAX_PATH_BYTES} bytes")
        if f.path in seen:
            if seen[f.path] == "file":
                raise BadMetainfo(f"path {where!r} is listed twice")
            raise BadMetainfo(f"{where!r} is both a file and the folder of another file")
        seen[f.path] = "file"
        for i in range(1, len(f.path)):
            folder = f.path[:i]
            if seen.get(folder, "folder") == "file":
                raise BadMetainfo(f"{'/'.join(folder)!r} is both a file and the folder of "
                                  f"{where!r}")
            seen[folder] = "folder"


def _with_root(f: FileEntry, v2: FileEntry) -> FileEntry:
    return FileEntry(f.path, f.length, f.offset, f.pad, f.attr or v2.attr, v2.pieces_root)


def _get(d: dict[bytes, Any], key: bytes, typ: type, where: str) -> Any:
    if key not in d:
        raise BadMetainfo(f"'{where}.{key.decode()}' is missing")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise BadMetainfo(f"'{where}.{key.decode()}' must be {_typename(typ)}")
    return value


def _typename(typ: type) -> str:
    return {bytes: "a string", int: "an integer", dict: "a dictionary", list: "a list"}[typ]


def _component(raw: Any, where: str, utf8: Any = None) -> str:
    """One path component, refused unless it is a plain name inside its folder."""
    if isinstance(utf8, bytes):
        raw = utf8
    if not isinstance(raw, bytes):
        raise BadMetainfo(f"{where} must be a string")
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadMetainfo(f"{where} is not valid UTF-8") from None
    if s in ("", ".", ".."):
        raise BadMetainfo(f"{where} is {s!r}: empty and dot components are not allowed")
    if "\0" in s:
        raise BadMetainfo(f"{where} contains a NUL byte")
    if "/" in s or "\\" in s:
        raise BadMetainfo(f"{where} {s!r} contains a path separator")
    if not s.isprintable():
        s = _sanitize(s)
    return s


# Characters libtorrent leaves out of file names: zero-width, invisible, or changing the
# writing direction, they make a name look like another (``invoice<RLO>fdp.exe``).
_INVISIBLE = frozenset([0x061C, *range(0x200B, 0x2010), *range(0x202A, 0x202F),
                        *range(0x2060, 0x2065), *range(0x2066, 0x206A), 0xFEFF])


def _sanitize(s: str) -> str:
    """The name libtorrent stores ``s`` under: control characters (C0, DEL, C1) made
    ``_``, invisible ones left out; a name left empty or all dots is ``_``. The files of
    a torrent are then where libtorrent and the clients built on it put them, and a
    download made by one is found by the other."""
    out = "".join("_" if ord(c) < 32 or 0x7F <= ord(c) <= 0x9F else c
                  for c in s if ord(c) not in _INVISIBLE)
    return "_" if out in ("", ".", "..") else out


def _is_pad(path: tuple[str, ...], attr: str) -> bool:
    return "p" in attr or path[-1].startswith(_LEGACY_PAD_PREFIX)


def _attr(d: dict[bytes, Any], where: str) -> str:
    a = d.get(b"attr", b"")
    if not isinstance(a, bytes):
        raise BadMetainfo(f"{where}.attr must be a string")
    return a.decode("ascii", "replace")


def _length(d: dict[bytes, Any], where: str) -> int:
    n = _get(d, b"length", int, where)
    if n < 0:
        raise BadMetainfo(f"'{where}.length' is negative")
    return int(n)


class _ReadFiles:
    """``info.files`` as :func:`_read_v1_files` read it: a table's builder, filled, its
    folders not yet under the torrent's name (``name`` comes after ``files``), and the
    first error in an entry, raised once the whole metainfo has decoded (so that a
    bencode error anywhere comes first, as when the list is decoded whole)."""

    __slots__ = ("builder", "count", "error")

    def __init__(self, builder: TableBuilder, count: int, error: PiecedError | None) -> None:
        self.builder = builder
        self.count = count
        self.error = error


# The usual file entry up to its path's items: an optional one-letter attr, a canonical
# length. Keys in this order are the canonical order (attr < length < path).
_ENTRY = re.compile(rb"d(?:4:attr1:([a-z]))?6:lengthi(0|[1-9][0-9]{0,17})e4:pathl")


def _read_v1_files(max_files: int, dec: _Decoder, pos: int, path: Path,
                   depth: int) -> tuple[Any, int]:
    """Read a v1 ``files`` list straight into a :class:`TableBuilder`: a torrent of
    100,000 files makes no dictionary, list or path tuple per file.

    Entries of the usual shape are read here, with the decoder's rules (canonical
    lengths, keys in order) held by :data:`_ENTRY` and the checks below; any other
    entry, or anything odd in one, is decoded by the decoder and read the long way,
    which names what is wrong.
    """
    data = dec.data
    if data[pos : pos + 1] != b"l" or dec.budget >= 0 or depth + 3 >= dec.max_depth:
        return dec.value(pos, path, depth)
    b = TableBuilder()
    folders: dict[tuple[bytes, ...], int] = {}
    match = _ENTRY.match
    add_folder, add_name = b.folder_of.append, b.names.append
    add_length, add_flags = b.lengths.append, b.flags.append
    error: PiecedError | None = None
    pos += 1
    i = 0
    while True:
        c = data[pos : pos + 1]
        if c == b"e":
            if i > max_files:
                error = TooLarge(f"torrent has {i} files, the limit is {max_files}")
            return _ReadFiles(b, i, error), pos + 1
        if not c:
            raise dec.fail(path, pos, "truncated list")
        if i == max_files:
            error = error or BadMetainfo("too many files")  # stop building; count them
        m = match(data, pos) if error is None else None
        if m is not None:
            p = m.end()
            parts: list[bytes] = []
            try:
                while data[p] != 0x65:  # e: the end of the path
                    colon = data.find(b":", p, p + 4)  # a component is at most 255 bytes
                    digits = data[p:colon]
                    if colon < 0 or not digits.isdigit() or digits[0] == 0x30:
                        break
                    end = colon + 1 + int(digits)
                    if end > dec.n or end - colon > 256:
                        break
                    parts.append(data[colon + 1 : end])
                    p = end
                else:
                    if parts and data[p + 1] == 0x65:  # and the end of the entry
                        raw_folder = tuple(parts[:-1])
                        fid = folders.get(raw_folder)
                        if fid is None:
                            fid = folders[raw_folder] = b.folder(tuple(
                                _component(part, f"info.files[{i}].path[{j}]")
                                for j, part in enumerate(raw_folder)))
                        name = _plain_name(parts[-1])
                        attr = m.group(1)
                        if attr is None and not name.startswith(_LEGACY_PAD_PREFIX):
                            add_folder(fid)  # b.add(), inline: the usual file
                            add_name(name)
                            add_length(int(m.group(2)))
                            add_flags(0)
                        else:
                            a = "" if attr is None else attr.decode()
                            b.add(fid, name, int(m.group(2)),
                                  "p" in a or name.startswith(_LEGACY_PAD_PREFIX), a)
                        pos = p + 2
                        i += 1
                        continue
            except (IndexError, ValueError, UnicodeDecodeError, BadMetainfo):
                pass  # the long way says what is wrong
        fd, pos = dec.value(pos, (path, i), depth + 1)
        if error is None:
            try:
                length, fpath, attr = _v1_file(fd, f"info.files[{i}]")
                b.add(b.folder(fpath[:-1]), fpath[-1], length, _is_pad(fpath, attr), attr)
            except PiecedError as exc:
                error = exc
        i += 1


def _v1_files(info: dict[bytes, Any], name: str, max_files: int) -> FileTable:
    if b"files" not in info:
        length = _length(info, "info")
        b = TableBuilder()
        attr = _attr(info, "info")
        b.add(b.folder(()), name, length, False, attr)
        return b.build()
    raw = info[b"files"]
    if isinstance(raw, _ReadFiles):
        if not raw.count:
            raise BadMetainfo("'info.files' is empty")
        if raw.error is not None:
            raise raw.error
        return raw.builder.build((name,))
    raw = _get(info, b"files", list, "info")
    if not raw:
        raise BadMetainfo("'info.files' is empty")
    if len(raw) > max_files:
        raise TooLarge(f"torrent has {len(raw)} files, the limit is {max_files}")
    b = TableBuilder()
    for i, fd in enumerate(raw):
        length, path, attr = _v1_file(fd, f"info.files[{i}]")
        b.add(b.folder(path[:-1]), path[-1], length, _is_pad(path, attr), attr)
    return b.build((name,))


def _v1_file(fd: Any, where: str) -> tuple[int, tuple[str, ...], str]:
    """(length, path below the torrent's folder, attr) of one decoded file entry."""
    got = fd.get(b"length") if type(fd) is dict else None
    parts = fd.get(b"path.utf-8", fd.get(b"path")) if type(fd) is dict else None
    raw_attr = fd.get(b"attr") if type(fd) is dict else None
    try:
        if (type(got) is not int or got < 0 or type(parts) is not list or not parts
                or (raw_attr is not None and type(raw_attr) is not bytes)):
            raise ValueError
        path = tuple(map(_plain_name, parts))
        attr = "" if raw_attr is None else raw_attr.decode("ascii", "replace")
        return int(got), path, attr
    except (ValueError, TypeError, AttributeError):
        return _v1_file_slowly(fd, where)


def _plain_name(raw: bytes) -> str:
    """A path component that needs no message: ValueError (or UnicodeDecodeError, or
    AttributeError for a non-string) sends the caller the long way."""
    s = raw.decode("utf-8")
    if s in ("", ".", "..") or "\0" in s or "/" in s or "\\" in s or not s.isprintable():
        raise ValueError(s)
    return s


def _v1_file_slowly(fd: Any, where: str) -> tuple[int, tuple[str, ...], str]:
    if not isinstance(fd, dict):
        raise BadMetainfo(f"'{where}' is not a dictionary")
    length = _length(fd, where)
    parts = fd.get(b"path.utf-8", fd.get(b"path"))
    if not isinstance(parts, list) or not parts:
        raise BadMetainfo(f"'{where}.path' must be a non-empty list")
    path = tuple(_component(p, f"{where}.path[{j}]") for j, p in enumerate(parts))
    return length, path, _attr(fd, where)


def _walk_tree(tree: dict[bytes, Any], name: str, max_files: int) -> list[FileEntry]:
    """Files of a v2 file tree in its (sorted) order, offsets not yet assigned."""
    out: list[FileEntry] = []

    def walk(node: dict[bytes, Any], prefix: tuple[str, ...], depth: int) -> Iterator[FileEntry]:
        if depth > 256:
            raise BadMetainfo("'file tree' is nested too deeply")
        for key in sorted(node):
            child = node[key]
            where = "file tree/" + "/".join((*prefix, key.decode("utf-8", "replace")))
            if not isinstance(child, dict):
                raise BadMetainfo(f"'{where}' is not a dictionary")
            comp = _component(key, f"'{where}'")
            if b"" in child:
                if len(child) != 1:
                    raise BadMetainfo(f"'{where}' is both a file and a folder")
                leaf = child[b""]
                if not isinstance(leaf, dict):
                    raise BadMetainfo(f"'{where}' file entry is not a dictionary")
                length = _length(leaf, where)
                root = leaf.get(b"pieces root")
                if length > 0 and (not isinstance(root, bytes) or len(root) != 32):
                    raise BadMetainfo(f"'{where}' needs a 32-byte 'pieces root'")
                yield FileEntry(
                    (*prefix, comp), length, 0, attr=_attr(leaf, where),
                    pieces_root=root if length > 0 else None,
                )
            else:
                yield from walk(child, (*prefix, comp), depth + 1)

    for f in walk(tree, (), 0):
        out.append(f)
        if len(out) > max_files:
            raise TooLarge(f"torrent has more than {max_files} files")
    single = len(out) == 1 and len(out[0].path) == 1
    if not single:
        out = [FileEntry((name, *f.path), f.length, 0, f.pad, f.attr, f.pieces_root) for f in out]
    return out


def _align_v2(files: list[FileEntry], piece_length: int, name: str) -> list[FileEntry]:
    """Place v2-only files on piece boundaries with pad entries, exactly as libtorrent
    lays them out (the last file padded too, pads named NAME/.pad/SIZE), so piece and
    file indices agree with it."""
    out: list[FileEntry] = []
    pos = 0
    for f in files:
        out.append(FileEntry(f.path, f.length, pos, f.pad, f.attr, f.pieces_root))
        pos += f.length
        if pos % piece_length:
            gap = piece_length - pos % piece_length
            out.append(FileEntry((name, ".pad", str(gap)), gap, pos, pad=True, attr="p"))
            pos += gap
    return out


def _check_hybrid(v1: list[FileEntry], v2: list[FileEntry], piece_length: int) -> None:
    data = [f for f in v1 if not f.pad]
    if len(data) != len(v2):
        raise BadMetainfo(
            f"hybrid torrent: v1 lists {len(data)} files but the v2 file tree has {len(v2)}"
        )
    # A folder of one file: libtorrent writes the v2 tree as a single file at its root
    # (the v2 single-file form) beside a v1 list of NAME/FILE, and takes the v1 paths.
    single = len(v2) == 1 and len(v2[0].path) == 1
    for a, b in zip(data, v2, strict=True):
        same = a.path == b.path or (single and a.path[-1:] == b.path)
        if not same or a.length != b.length:
            raise BadMetainfo(
                f"hybrid torrent: v1 file {'/'.join(a.path)!r} ({a.length} bytes) does not "
                f"match v2 file {'/'.join(b.path)!r} ({b.length} bytes)"
            )
        if a.length and a.offset % piece_length:
            raise BadMetainfo(
                f"hybrid torrent: file {'/'.join(a.path)!r} does not start on a piece boundary"
            )


__all__ = [
    "BLOCK_SIZE",
    "FileEntry",
    "Metainfo",
    "V2Piece",
    "leaf_count",
    "parse",
]
