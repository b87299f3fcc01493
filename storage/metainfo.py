"""Parsing and validating .torrent metainfo: v1, v2 (BEP 52), hybrid, BEP 47 pad files.

Everything a client hands us is untrusted: a metainfo is refused, with a message
that names the offending key, unless every file path stays inside the save path,
every length adds up, and every v2 piece layer hashes to its file's ``pieces root``.
Once a :class:`Metainfo` exists, the rest of the engine may trust it.

File names are the ones libtorrent gives the files, so that a download made by either
is found by the other: each name sanitized as libtorrent sanitizes it (:func:`_sanitize`),
files whose paths collide renamed as libtorrent renames them (:func:`_renames`), the
torrent's folder named as libtorrent names it (:func:`_torrent_name`).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import re
from collections.abc import Iterable
from functools import partial
from itertools import compress
from typing import Any, NamedTuple

from .bencode import BencodeError, Path, _Decoder, decode_spanning
from .errors import BadMetainfo, PiecedError, TooLarge, detached
from .filetable import PAD, UNSTORED, FileEntry, FileTable, TableBuilder
from .merkle import BLOCK_SIZE, leaf_count, piece_width, root_from_layer
from .paths import read_regular

MAX_METAINFO_BYTES = 64 * 1024 * 1024
MAX_FILES = 1_000_000
MAX_PIECES = 4_000_000
MAX_PIECE_LENGTH = 64 * 1024 * 1024
MAX_NAME_BYTES = 255  # a path component, as file systems allow (NAME_MAX)
MAX_PATH_BYTES = 4096  # a whole path below the save path (PATH_MAX)
MAX_PATH_PARTS = 100  # names in a v1 file's path, as libtorrent allows
MAX_NESTING = 99  # lists and dictionaries in one another, as libtorrent allows (a v2 tree's depth)
# FileTable flags made selectors for itertools.compress: not a pad; a pad.
_NOT_PAD = bytes(0 if b & PAD else 1 for b in range(256))
_PAD_ONLY = bytes(1 if b & PAD else 0 for b in range(256))
_LEGACY_PAD_MARK = "_____padding_file_"  # BitComet's pad files, before BEP 47
_LEGACY_PAD_BYTES = _LEGACY_PAD_MARK.encode()


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
        self._unchecked: list[int] | None = None

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
        """The v2 view of a piece, or None for a v1-only torrent and for a piece of a
        hybrid's file whose piece layer the metainfo does not carry (v1 checks it)."""
        v2 = self.v2_view(piece)
        return v2 if v2 is not None and v2.expected else None

    def v2_unchecked(self) -> list[int]:
        """The pieces no v2 check is made of: those of a hybrid's files whose piece
        layer the metainfo lacks (checked by their v1 hashes alone)."""
        if self._unchecked is None:
            out: list[int] = []
            if self.has_v2 and self.has_v1:
                for first, fidx in zip(self._v2_first_piece, self._v2_file_index, strict=True):
                    f = self.files[fidx]
                    if f.length > self.piece_length and f.pieces_root not in self.piece_layers:
                        out.extend(range(first, first + -(-f.length // self.piece_length)))
            self._unchecked = out
        return self._unchecked

    def v2_view(self, piece: int) -> V2Piece | None:
        """The v2 view of a piece, None for a v1-only torrent; its ``expected`` is empty
        where the metainfo has no piece layer for its file."""
        if not self.has_v2:
            return None
        i = bisect.bisect_right(self._v2_first_piece, piece) - 1
        fidx = self._v2_file_index[i]
        f = self.files[fidx]
        j = piece - self._v2_first_piece[i]
        data_length = min(self.piece_length, f.length - j * self.piece_length)
        assert f.pieces_root is not None
        if f.length > self.piece_length:
            layer = self.piece_layers.get(f.pieces_root, b"")
            expected = layer[j * 32 : j * 32 + 32]
        else:
            expected = f.pieces_root
        return V2Piece(fidx, j, data_length, piece_width(f.length, self.piece_length), expected)


def read_metainfo(path: str | os.PathLike[str], max_bytes: int = MAX_METAINFO_BYTES) -> bytes:
    """A .torrent file's bytes, read no further than ``max_bytes``: OSError if it cannot
    be read or is not a regular file, TooLarge past the limit."""
    data = read_regular(path, max_bytes)
    if len(data) > max_bytes:
        raise TooLarge(f"{os.fspath(path)} is larger than {max_bytes} bytes: not a .torrent")
    return data


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
        top, span = decode_spanning(data, b"info", max_depth=MAX_NESTING,
                                    hooks={b"files": partial(_read_v1_files, max_files),
                                           b"file tree": partial(_read_file_tree, max_files)},
                                    trailing=True)
    except BencodeError as exc:
        raise BadMetainfo(f"not canonical bencode: {exc}") from None
    if not isinstance(top, dict):
        raise BadMetainfo("metainfo is not a dictionary")
    info = top.get(b"info")
    if not isinstance(info, dict) or span is None:
        raise BadMetainfo("'info' is missing or not a dictionary")
    # The hashes are over the info value's exact bytes (a view: 20 MB for a million pieces).
    info_bytes = memoryview(data)[span[0] : span[1]]

    raw_name = info.get(b"name.utf-8")  # preferred, as libtorrent does, when a string
    if not isinstance(raw_name, bytes):
        raw_name = _get(info, b"name", bytes, "info")
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
    name = _torrent_name(raw_name, has_v1 and b"files" not in info, info_bytes)

    v2_files: list[FileEntry] = []
    read: _ReadTree | None = None  # a tree of the usual shape, read as it is
    if has_v2:
        tree = info.get(b"file tree")
        if isinstance(tree, _ReadTree):
            read = tree
            if has_v1:
                v2_files = tree.entries(name)
        else:
            tree = _get(info, b"file tree", dict, "info")
            v2_files = _walk_tree(tree, name, max_files)
        if not (v2_files or (read is not None and read.names)):
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
        files = (read.table(name, piece_length) if read is not None
                 else _align_v2(v2_files, piece_length, name))

    total = files.total
    flags, lengths = files.flags, files.lengths
    if not any(lengths[i] for i in range(len(files)) if not flags[i] & UNSTORED):
        raise BadMetainfo("the torrent holds no data: every file is empty, a pad file or "
                          "a symlink (total size of data 0)")
    if not _surely_fine(files, name, has_v2):
        files = _check_files(files, name, has_v2, piece_length)
    if read is None or has_v1:  # (the usual v2-only tree holds nothing special: see table)
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
        # (by the table's arrays: a FileEntry a file cost 100,000-file torrents seconds)
        lengths, offsets, flags = files.lengths, files.offsets, files.flags
        rooted: set[bytes] = set()  # the roots of files of more than a piece
        file_of = [i for i in compress(range(len(files)), flags.translate(_NOT_PAD))
                   if lengths[i]]
        first_piece = [offsets[i] // piece_length for i in file_of]
        for idx in file_of:
            length = lengths[idx]
            if length <= piece_length:
                continue
            root = files.pieces_root(idx)
            assert root is not None
            rooted.add(root)
            layer = raw_layers.get(root)
            if layer is None and has_v1:
                # A hybrid's info dictionary alone (from a magnet link): its pieces are
                # checked by their v1 hashes, as libtorrent checks them until peers send
                # the layer. A v2-only torrent would have nothing to check them by.
                continue
            where = "/".join(files.path(idx))
            if layer is None:
                raise BadMetainfo(
                    f"'piece layers' has no layer for file {where!r}: a v2-only torrent needs "
                    "them to check its pieces (the whole .torrent, not its info dictionary alone)")
            if not isinstance(layer, bytes):
                raise BadMetainfo(f"the piece layer of {where!r} is not a byte string")
            want = 32 * ((length + piece_length - 1) // piece_length)
            if len(layer) != want:
                raise BadMetainfo(
                    f"piece layer of {where!r} is {len(layer)} bytes, expected {want}"
                )
            if root_from_layer(layer, piece_length) != root:
                raise BadMetainfo(f"piece layer of {where!r} does not hash to its 'pieces root'")
            layers[root] = layer
        # Every layer is a file's, as libtorrent requires (a torrent it refuses is not
        # taken here either): keyed by the 'pieces root' of a file of more than a piece.
        for key in raw_layers:
            if key not in rooted:
                shown = key.hex() if isinstance(key, bytes) and len(key) <= 64 else "a key"
                raise BadMetainfo(
                    f"'piece layers' has a layer under {shown} that is the 'pieces root' of no "
                    "file longer than a piece")

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


def _surely_fine(files: FileTable, name: str, lt_pads: bool) -> bool:
    """Whether the paths are surely within the limits and collide nowhere, found at
    the speed of a torrent of 100,000 files; when not sure, :func:`_check_files` looks
    file by file, renames what collides as libtorrent does, and names what is wrong.

    Collisions are as libtorrent sees them: letters A-Z and a-z alike, pad files too
    (``lt_pads``: v2 pads, named NAME/.pad/SIZE), a file beside a folder of its name."""
    names = files.names()
    folders = files.folders
    low = [tuple(part.lower() for part in parts) for parts in folders]
    fids = {parts: fid for fid, parts in enumerate(low)}
    if len(fids) != len(low):
        return False  # two folders one but for case: their files may collide
    # (str.lower() lowers more than A-Z: names it finds apart, libtorrent does too)
    joined = "/".join(names)
    lowered = joined.lower()
    lnames = names if lowered == joined else lowered.split("/")
    flags, fidx = files.flags, files.folder_index()
    pads: set[tuple[int, str]] = set()
    if flags.count(0) == len(flags):  # no pad, no symlink: the usual torrent
        data_fids: Iterable[int] = fidx
        data_names = lnames
    else:
        keep, drop = flags.translate(_NOT_PAD), flags.translate(_PAD_ONLY)
        data_fids, data_names = list(compress(fidx, keep)), list(compress(lnames, keep))
        sized = set(zip(compress(fidx, drop), compress(lnames, drop),
                        compress(files.lengths, drop), strict=True))
        pads = {(fid, nm) for fid, nm, _ in sized}
        if len(pads) != len(sized):
            return False  # pads of one path and two sizes
        if lt_pads and any(folders[fid] != (name, ".pad") or nm != str(length)
                           for fid, nm, length in sized):
            return False  # named otherwise in the v1 list: look with libtorrent's names
    # Two files of one path, or a file where a folder or a pad is: among names that are
    # all different (usual), only where a folder's or a pad's name is a file's too.
    unique = set(data_names)
    taken: set[tuple[int, str]] | None = None
    if len(unique) != len(data_names):
        taken = set(zip(data_fids, data_names, strict=True))
        if len(taken) != len(data_names):
            return False  # a path listed twice

    def held(fid: int, nm: str) -> bool:
        nonlocal taken
        if (fid, nm) in pads:
            return True
        if nm not in unique:
            return False
        if taken is None:
            taken = set(zip(data_fids, data_names, strict=True))
        return (fid, nm) in taken

    if any(nm in unique for _, nm in pads):
        if taken is None:
            taken = set(zip(data_fids, data_names, strict=True))
        if not taken.isdisjoint(pads):
            return False  # a pad where a file is
    root = fids.get((name.lower(),))
    if lt_pads and root is not None and held(root, ".pad"):
        return False  # libtorrent's pad folder, there even when the v1 list has no pads
    longest_folder = 0
    for parts in low:
        longest_folder = max(longest_folder, len("/".join(parts)))
        if any(len(part) * 4 > MAX_NAME_BYTES for part in parts):
            return False
        for k in range(1, len(parts) + 1):  # a folder that is also a file
            parent = fids.get(parts[: k - 1])
            if parent is not None and held(parent, parts[k - 1]):
                return False
    longest_name = max(map(len, names), default=0)
    return (longest_name * 4 <= MAX_NAME_BYTES
            and (longest_folder + 1 + longest_name) * 4 <= MAX_PATH_BYTES)


def _check_special(files: FileTable, piece_length: int) -> None:
    """Pad files and symlinks: what they may be. No piece may be pad bytes only (no
    block of it would ever be sent), whether one pad file covers it or several in a row
    (empty files between them hold no bytes either)."""
    total = files.total
    lengths, offsets, flags = files.lengths, files.offsets, files.flags
    run_start = run_end = -1
    for i in files.special():  # (by the table's arrays: pads may be half the files)
        length = lengths[i]
        if not flags[i] & UNSTORED or not length:
            continue
        if "l" in files.attr(i):
            # (a pad's too: libtorrent takes the symlink, of no bytes, and would lay the
            # torrent's data out otherwise than a reader taking the pad's length)
            raise BadMetainfo(f"symlink entry {'/'.join(files.path(i))!r} has a length "
                              f"({length}): a symlink carries no data")
        if flags[i] & PAD:
            if offsets[i] != run_end:
                run_start = offsets[i]
            run_end = offsets[i + 1]
            first = -(-run_start // piece_length) * piece_length
            if first < run_end and min(first + piece_length, total) <= run_end:
                raise BadMetainfo(f"pad file {'/'.join(files.path(i))!r} covers the whole "
                                  f"of piece {first // piece_length}: a piece of pad only")


def _check_files(files: FileTable, name: str, lt_pads: bool, piece_length: int) -> FileTable:
    """The files as a whole, one by one: paths that collide renamed as libtorrent renames
    them (see :func:`_renames`), then refused unless a file system can hold them. Named
    errors for what :func:`_surely_fine` was not sure of."""
    entries = list(files)
    data = [f for f in entries if not f.pad]
    if len(data) > 1 or len(data[0].path) > 1:  # (one file at the root collides with none)
        renamed = _renames(entries, name, lt_pads, piece_length)
        if renamed:
            entries = [f._replace(path=renamed[i]) if i in renamed else f
                       for i, f in enumerate(entries)]
            files = FileTable.of(entries)
    seen: dict[tuple[str, ...], str] = {}
    for f in entries:
        if not f.stored:
            continue
        where = "/".join(f.path)
        for part in f.path:  # (UTF-8 takes at most 4 bytes a character)
            if len(part) * 4 > MAX_NAME_BYTES and len(part.encode()) > MAX_NAME_BYTES:
                raise BadMetainfo(f"path component {part[:40]!r}... of {where[:80]!r} is over "
                                  f"{MAX_NAME_BYTES} bytes")
        if len(where) * 4 > MAX_PATH_BYTES and len(where.encode()) > MAX_PATH_BYTES:
            raise BadMetainfo(f"path {where[:80]!r}... is over {MAX_PATH_BYTES} bytes")
        # What the renaming leaves in one place: the name a file was renamed to, when a
        # later file has that very name (libtorrent gives both files the one path).
        if f.path in seen:
            if seen[f.path] == "file":
                raise BadMetainfo(f"two files of the torrent are stored at {where!r} (one "
                                  "is renamed there to be apart from a third)")
            raise BadMetainfo(f"{where!r} is both a file and the folder of another file")
        seen[f.path] = "file"
        for i in range(1, len(f.path)):
            folder = f.path[:i]
            if seen.get(folder, "folder") == "file":
                raise BadMetainfo(f"{'/'.join(folder)!r} is both a file and the folder of "
                                  f"{where!r}")
            seen[folder] = "folder"
    return files


#: Renames libtorrent makes, at most, to keep a torrent's files apart (more: it refuses it).
MAX_RENAMES = 500


def _renames(entries: list[FileEntry], name: str, lt_pads: bool,
             piece_length: int) -> dict[int, tuple[str, ...]]:
    """The new paths of the files that libtorrent renames, by index: a file whose path
    (letters A-Z and a-z alike) is a folder's, or an earlier file's, is NAME.1.EXT, or
    the first of NAME.2.EXT... that no folder or file has yet; a pad file of the path and
    size of an earlier pad is left as it is. Folders first, then the files in order;
    pad files take part, under libtorrent's names for them (``lt_pads``: NAME/.pad/SIZE,
    as the v2 layout names them; its folder NAME/.pad is there as soon as a file is
    not a whole number of pieces, with or without a pad after it in a hybrid's v1 list).

    As libtorrent does, a file is matched against the others' names as they were, not as
    renamed: a later file named what an earlier one was renamed to keeps its name, and
    :func:`_check_files` refuses the two files at one path."""

    def key(path: str) -> bytes:
        return path.encode().lower()  # (bytes: A-Z lowered, nothing else)

    paths = ["/".join((name, ".pad", str(f.length)) if f.pad and lt_pads else f.path)
             for f in entries]
    match: dict[bytes, int] = {}  # path -> -1 (a folder) or the file first there
    if lt_pads and any(f.length % piece_length for f in entries if not f.pad):
        match[key(f"{name}/.pad")] = -1
    for path in paths:
        cut = path.rfind("/")
        while cut > len(name):
            match[key(path[:cut])] = -1
            cut = path.rfind("/", 0, cut)
    taken = set(match)  # every path so far, renamed ones included
    renamed: dict[int, tuple[str, ...]] = {}
    collisions = 0
    for i, path in enumerate(paths):
        k = key(path)
        other = match.get(k)
        if other is None:
            match[k] = i
            taken.add(k)
            continue
        f = entries[i]
        if other >= 0 and f.pad and entries[other].pad and f.length == entries[other].length:
            continue
        dot = path.rfind(".")
        base, ext = (path[:dot], path[dot:]) if dot > path.rfind("/") else (path, "")
        n = 0
        while True:
            n += 1
            new = f"{base}.{n}{ext}"
            if key(new) not in taken:
                taken.add(key(new))
                break
            collisions += 1
            if collisions > MAX_RENAMES:
                raise BadMetainfo(f"too many files of one path: {path[:80]!r} and others "
                                  f"need over {MAX_RENAMES} tries of a new name (libtorrent "
                                  "refuses it too)")
        if not f.pad:
            renamed[i] = tuple(new.split("/"))
    return renamed


def _with_root(f: FileEntry, v2: FileEntry) -> FileEntry:
    """A hybrid's file: where v1 lays it out, what v2 says of it (its root, and its
    attributes, as libtorrent takes them from the file tree)."""
    return FileEntry(f.path, f.length, f.offset, f.pad, v2.attr, v2.pieces_root)


def _get(d: dict[bytes, Any], key: bytes, typ: type, where: str) -> Any:
    if key not in d:
        raise BadMetainfo(f"'{where}.{key.decode()}' is missing")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise BadMetainfo(f"'{where}.{key.decode()}' must be {_typename(typ)}")
    return value


def _typename(typ: type) -> str:
    return {bytes: "a string", int: "an integer", dict: "a dictionary", list: "a list"}[typ]


def _torrent_name(raw: bytes, single_v1: bool, info_bytes: memoryview) -> str:
    """The torrent's name as libtorrent stores it: ``info.name`` sanitized (:func:`_sanitize`,
    where "." is nothing). A v1 single-file torrent is refused when nothing is left of it
    for the file's name; a folder left without a name is named by the hex SHA-1 of the
    info dictionary, as libtorrent names it (for v2-only torrents too)."""
    _refuse_escape(raw, "info.name")
    name = _sanitize(raw, force=False)
    if single_v1 and (not raw or not name):
        raise BadMetainfo(f"info.name {_shown(raw)!r} leaves no name for the torrent's one "
                          "file (libtorrent refuses it too)")
    return name or hashlib.sha1(info_bytes).hexdigest()


def _component(raw: Any, where: str) -> str:
    """One path component of a file, as libtorrent stores it (:func:`_sanitize`); refused
    when it would reach out of its folder read as a path (see :func:`_refuse_escape`)."""
    if not isinstance(raw, bytes):
        raise BadMetainfo(f"{where} must be a string")
    _refuse_escape(raw, where)
    return _sanitize(raw)


def _shown(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


_SEPARATORS = re.compile(rb"[/\\]")


def _refuse_escape(raw: bytes, where: str) -> None:
    """Refuse what a path must never hold, even though a sanitized name would hold none
    of it: a NUL byte, ``..``, a path from the root (``/etc``). libtorrent drops the
    separators and the NUL and stores ``..`` as ``_``; a name that asks for any of them
    is a try to escape the save path."""
    if b"\0" in raw:
        raise BadMetainfo(f"{where} contains a NUL byte")
    if raw[:1] in (b"/", b"\\"):
        raise BadMetainfo(f"{where} {_shown(raw)!r} is an absolute path")
    if b".." in raw and b".." in _SEPARATORS.split(raw):
        raise BadMetainfo(f"{where} {_shown(raw)!r} climbs out of its folder with '..'")


# Characters libtorrent leaves out of file names: zero-width, invisible, or changing the
# writing direction, they make a name look like another (``invoice<RLO>fdp.exe``); and
# the path separators and NUL.
_INVISIBLE = frozenset([0x061C, *range(0x200B, 0x2010), *range(0x202A, 0x202F),
                        *range(0x2060, 0x2065), *range(0x2066, 0x206A), 0xFEFF])
_LEFT_OUT = _INVISIBLE | {0, 0x2F, 0x5C}
#: Past this many bytes libtorrent cuts a name short, keeping its extension.
NAME_CUT = 240


def _sanitize(raw: bytes, force: bool = True) -> str:
    """The name libtorrent stores a path component (or, ``force`` false, a torrent's
    name) under. A bad UTF-8 sequence is one ``_`` (see :func:`_codepoint` for how far
    it runs), a control character (C0, DEL, C1) is ``_``, an invisible one or a path
    separator is left out. A name that reaches 240 bytes is cut there, keeping an
    extension (a dot in its last 9 bytes). A name left empty or of one or two dots is
    ``_`` ("" where not ``force``; "." is "" there too). The files of a torrent are then
    where libtorrent and the clients built on it put them, and a download made by one is
    found by the other."""
    if len(raw) <= NAME_CUT:
        try:
            return _plain_name(raw)
        except ValueError:  # (UnicodeDecodeError is one)
            pass
    if not raw:
        return "_"
    if raw == b"." and not force:
        return ""
    out = bytearray()
    added = dots = 0
    cut = False
    i, n = 0, len(raw)
    while i < n:
        cp, size = _codepoint(raw, i)
        if cp in _LEFT_OUT:
            i += size
            continue
        if cp < 32 or 0x7F <= cp <= 0x9F:  # (a bad sequence is -1)
            out.append(0x5F)
            added += 1
            i += size
            continue
        out += raw[i : i + size]
        dots += cp == 0x2E
        added += size
        if added >= NAME_CUT and not cut:
            dot = raw.rfind(b".", max(n - 10, i) + 1)
            if dot < 0:
                break
            cut = True
            i = dot
            continue
        i += size
    if added == dots and added <= 2:
        return "_" if force else ""
    return out.decode()


def _codepoint(raw: bytes, i: int) -> tuple[int, int]:
    """The code point at ``raw[i]`` and its length, -1 for a bad sequence, which runs as
    libtorrent reads it: the length its first byte announces (its last bytes too when
    they are cut short; one byte when the first is no first byte)."""
    b = raw[i]
    if b < 0x80:
        return b, 1
    if b >> 5 == 0b110:
        size = 2
    elif b >> 4 == 0b1110:
        size = 3
    elif b >> 3 == 0b11110:
        size = 4
    elif b >> 2 == 0b111110:
        size = 5
    else:
        return -1, 1
    if size > len(raw) - i:
        return -1, len(raw) - i
    if size > 4:
        return -1, size
    cp = b & (0x7F >> size)
    for c in raw[i + 1 : i + size]:
        if not 0x80 <= c <= 0xBF:
            return -1, size
        cp = cp << 6 | c & 0x3F
    if cp < (0x80, 0x800, 0x10000)[size - 2] or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
        return -1, size
    return cp, size


def _is_pad(path: tuple[str, ...], attr: str) -> bool:
    """BEP 47's attribute, or BitComet's name: as libtorrent reads it, a file is a pad
    where any name of its path (a folder's too) holds :data:`_LEGACY_PAD_MARK`, so that
    both read the same bytes as zeros."""
    return "p" in attr or any(_LEGACY_PAD_MARK in part for part in path)


def _attr(d: dict[bytes, Any], where: str) -> str:
    a = d.get(b"attr", b"")
    if not isinstance(a, bytes):
        raise BadMetainfo(f"{where}.attr must be a string")
    return a.decode("ascii", "replace")


def _dangling(attr: str, d: dict[bytes, Any]) -> bool:
    """A symlink entry (attr "l") without its ``symlink path``, or with an empty one:
    libtorrent makes it an ordinary empty file, whatever length it says (a symlink's is
    0, and the flag goes once the path is found missing); so does this reader (``attr``
    without its "l")."""
    link = d.get(b"symlink path")
    return "l" in attr and not (isinstance(link, list) and link)


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
                    colon = data.find(b":", p, p + 4)  # (a plain component: 240 bytes at most)
                    digits = data[p:colon]
                    if colon < 0 or not digits.isdigit() or digits[0] == 0x30:
                        break
                    end = colon + 1 + int(digits)
                    if end > dec.n or end - colon > NAME_CUT + 1:
                        break
                    parts.append(data[colon + 1 : end])
                    p = end
                else:
                    if parts and data[p + 1] == 0x65:  # and the end of the entry
                        raw_folder = tuple(parts[:-1])
                        fid = folders.get(raw_folder)
                        if fid is None:
                            if len(parts) > MAX_PATH_PARTS:
                                raise ValueError  # the long way says what is wrong
                            fid = folders[raw_folder] = b.folder(tuple(
                                _component(part, f"info.files[{i}].path[{j}]")
                                for j, part in enumerate(raw_folder)))
                        name = _plain_name(parts[-1])
                        attr, length = m.group(1), int(m.group(2))
                        if attr == b"l":  # (no "symlink path" in this entry: see _dangling)
                            attr, length = None, 0
                        legacy = data.find(_LEGACY_PAD_BYTES, m.end(), p) >= 0  # (any name)
                        if attr is None and not legacy:
                            add_folder(fid)  # b.add(), inline: the usual file
                            add_name(name)
                            add_length(length)
                            add_flags(0)
                        else:
                            a = "" if attr is None else attr.decode()
                            b.add(fid, name, length, "p" in a or legacy, a)
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
                error = detached(exc)  # (its traceback holds this frame)
        i += 1


def _v1_files(info: dict[bytes, Any], name: str, max_files: int) -> FileTable:
    if b"files" not in info:
        attr = _attr(info, "info")
        if _dangling(attr, info):
            attr, length = attr.replace("l", ""), 0
        else:
            length = _length(info, "info")
        b = TableBuilder()
        # (a pad, as libtorrent reads it: refused below, a torrent of pad bytes only)
        b.add(b.folder(()), name, length, _is_pad((name,), attr), attr)
        return b.build()
    raw = info[b"files"]
    if isinstance(raw, _ReadFiles):
        if not raw.count:
            raise BadMetainfo("'info.files' is empty")
        if raw.error is not None:
            # Raised from a local that goes with the frame: held here (or by the
            # table), it and its traceback through this frame would make a cycle
            # holding the whole metainfo until a full garbage collection.
            error, raw.error = raw.error, None
            try:
                raise error
            finally:
                del error
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
    parts = fd.get(b"path.utf-8") if type(fd) is dict else None
    if type(parts) is not list and type(fd) is dict:
        parts = fd.get(b"path")
    raw_attr = fd.get(b"attr") if type(fd) is dict else None
    try:
        if (type(got) is not int or got < 0 or type(parts) is not list or not parts
                or (raw_attr is not None and type(raw_attr) is not bytes)):
            raise ValueError
        path = tuple(map(_plain_name, parts))
        if len(parts) > MAX_PATH_PARTS or (len(b"".join(parts)) > NAME_CUT
                                           and max(map(len, parts)) > NAME_CUT):
            raise ValueError  # a path too deep, or a name libtorrent cuts short
        attr = "" if raw_attr is None else raw_attr.decode("ascii", "replace")
        if "l" in attr and _dangling(attr, fd):
            return 0, path, attr.replace("l", "")
        return int(got), path, attr
    except (ValueError, TypeError, AttributeError):
        return _v1_file_slowly(fd, where)


def _plain_name(raw: bytes) -> str:
    """A path component of at most :data:`NAME_CUT` bytes (the caller's to see to) that
    libtorrent stores as it is, and needs no message: ValueError (or UnicodeDecodeError,
    or AttributeError for a non-string) sends the caller the long way (:func:`_sanitize`).
    Strict UTF-8 holds no sequence libtorrent finds bad; a printable name no control or
    invisible character."""
    s = raw.decode("utf-8")
    if s in ("", ".", "..") or "\0" in s or "/" in s or "\\" in s or not s.isprintable():
        raise ValueError(s)
    return s


def _plain_names(keys: list[bytes]) -> list[str]:
    """:func:`_plain_name` of each of ``keys`` (of at most NAME_CUT bytes), checked
    together, a file tree's hundred thousand names in a few C loops: joined by "/" they
    decode, are printable, free of "\\" and split back into as many, exactly when each
    one is a plain name ("/" cuts no UTF-8 sequence short that was whole, nor makes one
    whole that was not)."""
    if not keys:
        return []
    joined = b"/".join(keys).decode("utf-8")
    if not joined.isprintable() or "\\" in joined:
        raise ValueError(joined)
    names = joined.split("/")
    if len(names) != len(keys) or "" in names or "." in names or ".." in names:
        raise ValueError(joined)
    return names


def _v1_file_slowly(fd: Any, where: str) -> tuple[int, tuple[str, ...], str]:
    if not isinstance(fd, dict):
        raise BadMetainfo(f"'{where}' is not a dictionary")
    attr = _attr(fd, where)
    if _dangling(attr, fd):
        attr, length = attr.replace("l", ""), 0
    else:
        length = _length(fd, where)
    parts = fd.get(b"path.utf-8")  # preferred, as libtorrent does, when a list
    if not isinstance(parts, list):
        parts = fd.get(b"path")
    if (not isinstance(parts, list) or not parts) and "p" in attr:
        return length, (".pad", str(length)), attr  # a pad needs no path: libtorrent's name
    if not isinstance(parts, list) or not parts:
        raise BadMetainfo(f"'{where}.path' must be a non-empty list")
    if len(parts) > MAX_PATH_PARTS:
        raise BadMetainfo(f"'{where}.path' has {len(parts)} names, over {MAX_PATH_PARTS} "
                          "(libtorrent refuses it too)")
    path = tuple(_component(p, f"{where}.path[{j}]") for j, p in enumerate(parts))
    return length, path, attr


class _ReadTree:
    """A v2 ``file tree`` as :func:`_read_file_tree` read it, by columns: each file's
    folder (an index into ``folders``, paths below the torrent's folder), name, length
    and root."""

    __slots__ = ("fids", "folders", "lengths", "names", "roots")

    def __init__(self) -> None:
        self.folders: list[tuple[str, ...]] = []
        self.fids: list[int] = []
        self.names: list[str] = []
        self.lengths: list[int] = []
        self.roots: list[bytes | None] = []

    def _prefix(self, name: str) -> tuple[str, ...]:
        """Where the folders are: under NAME, unless the tree is one file at its root."""
        return () if len(self.names) == 1 and not self.folders[self.fids[0]] else (name,)

    def entries(self, name: str) -> list[FileEntry]:
        """As :func:`_walk_tree` gives them (a hybrid's v2 side, matched to its v1 list)."""
        prefix = self._prefix(name)
        folders = [(*prefix, *parts) for parts in self.folders]
        return [FileEntry((*folders[fid], leaf), length, 0, pieces_root=root)
                for fid, leaf, length, root in zip(self.fids, self.names, self.lengths,
                                                   self.roots, strict=True)]

    def table(self, name: str, piece_length: int) -> FileTable:
        """The files of a v2-only torrent laid out as :func:`_align_v2` lays them out,
        straight from the columns (no entry, nor call, a file). Nothing here is for
        :func:`_check_special` to refuse: a pad follows a file with bytes, in its last
        piece, and no file has attributes."""
        b = TableBuilder()
        prefix = self._prefix(name)
        for parts in self.folders:
            b.folder((*prefix, *parts))
        pads = -1
        folder_of, names, lengths, flags, roots, attrs = (
            b.folder_of, b.names, b.lengths, b.flags, b.roots, b.attrs)
        pad_flag = PAD | UNSTORED
        for fid, leaf, length, root in zip(self.fids, self.names, self.lengths, self.roots,
                                           strict=True):
            if root is not None:
                roots[len(names)] = root
            folder_of.append(fid)
            names.append(leaf)
            lengths.append(length)
            flags.append(0)
            gap = -length % piece_length  # (every file begins a piece)
            if gap:
                if pads < 0:
                    pads = b.folder((name, ".pad"))
                attrs[len(names)] = "p"
                folder_of.append(pads)
                names.append(str(gap))
                lengths.append(gap)
                flags.append(pad_flag)
        return b.build()


class _NotUsual(Exception):
    """A file tree the reader leaves to the decoder and :func:`_walk_tree`."""


# The usual file node of a v2 tree, from its "d0:": a leaf of a length and a pieces
# root (or of a length of 0 alone), then the ends of the leaf and of the node.
_TREE_KEY = re.compile(rb"([1-9][0-9]{0,2}):")  # a name's length (NAME_CUT: 3 digits)
_TREE_LEAF = re.compile(rb"d0:d6:lengthi(0|[1-9][0-9]{0,17})e(?:11:pieces root32:)?")
_TREE_DEPTH = 48  # folders in one another the reader follows (deeper: the long way)


def _read_file_tree(max_files: int, dec: _Decoder, pos: int, path: Path,
                    depth: int) -> tuple[Any, int]:
    """Read a v2 ``file tree`` into a :class:`_ReadTree` when every node in it is of the
    usual shape (names of at most NAME_CUT bytes that libtorrent keeps as they are, in
    order; files of a length and a 32-byte root; folders): a torrent of 100,000 files
    makes no dictionary per file or folder. Anything else, or anything wrong, anywhere
    in it: the decoder reads the whole tree and :func:`_walk_tree` walks it, which says
    what is wrong (the same outcome both ways: ``tests/test_filetable.py``)."""
    # (a folder of level L is a dictionary at depth + L, its files' at depth + L + 2:
    # every tree taken here is one the decoder takes)
    if dec.budget >= 0 or depth + _TREE_DEPTH + 2 >= dec.max_depth:
        return dec.value(pos, path, depth)
    data, n = dec.data, dec.n
    tree = _ReadTree()
    folders, fids, lengths, roots = tree.folders, tree.fids, tree.lengths, tree.roots
    keys: list[bytes] = []  # the files' names, checked together at the end
    key_head, leaf_at = _TREE_KEY.match, _TREE_LEAF.match

    def folder(p: int, parts: tuple[str, ...], level: int) -> int:
        """The folder whose dictionary begins at ``p``: its end."""
        if level > _TREE_DEPTH or data[p : p + 1] != b"d":
            raise _NotUsual
        p += 1
        last = b""
        fid = -1  # (a folder's path is its own: it is listed at its first file)
        while data[p : p + 1] != b"e":
            head = key_head(data, p)
            if head is None:
                raise _NotUsual  # (also the empty name, "0:", and one over NAME_CUT)
            p = head.end()
            end = p + int(head.group(1))
            if end > n or end - p > NAME_CUT:
                raise _NotUsual
            key = data[p:end]
            p = end
            if key <= last:
                raise _NotUsual  # (out of order, or twice: the decoder names it)
            last = key
            m = leaf_at(data, p)
            if m is not None:  # a file
                digits = m.group(1)
                length = int(digits)
                end = m.end()
                if (length > 0) != (end - p > 14 + len(digits)):
                    raise _NotUsual  # (a length without its root, or a root of no data)
                if length:
                    roots.append(data[end : end + 32])
                    end += 32
                else:
                    roots.append(None)
                if data[end : end + 2] != b"ee":
                    raise _NotUsual
                if fid < 0:
                    fid = len(folders)
                    folders.append(parts)
                fids.append(fid)
                keys.append(key)
                lengths.append(length)
                p = end + 2
            elif data[p : p + 3] == b"d0:":
                raise _NotUsual  # a file of another shape
            else:
                p = folder(p, (*parts, _plain_name(key)), level + 1)  # noqa: F821 (deleted after)
        if len(keys) > max_files:
            raise _NotUsual
        return p + 1

    try:
        end = folder(pos, (), 0)
        tree.names = _plain_names(keys)
    except (_NotUsual, ValueError, UnicodeDecodeError, IndexError):
        return dec.value(pos, path, depth)
    finally:
        # It calls itself through its own closure: a cycle that held the whole metainfo
        # (``data``) until a full garbage collection, which a busy daemon runs seldom:
        # registers of a 60 MB torrent refused one after the other took gigabytes.
        del folder
    return tree, end


def _walk_tree(tree: dict[bytes, Any], name: str, max_files: int) -> list[FileEntry]:
    """Files of a v2 file tree in its (sorted) order, offsets not yet assigned, their
    paths under the torrent's folder (NAME/...) unless the tree is one file at its
    root. The usual entry (a plain name; a leaf of a length and a 32-byte root, nothing
    else) is taken as it is; anything else the long way, which says what is wrong (a
    100,000-file tree spent a second on messages made for every node, used by none)."""
    out: list[FileEntry] = []
    append = out.append

    def where(prefix: tuple[str, ...], key: bytes) -> str:
        return "'file tree/" + "/".join((*prefix[1:], key.decode("utf-8", "replace"))) + "'"

    def walk(node: dict[bytes, Any], prefix: tuple[str, ...], depth: int) -> None:
        if depth > 256:
            raise BadMetainfo("'file tree' is nested too deeply")
        for key in sorted(node):
            child = node[key]
            if type(child) is not dict:
                raise BadMetainfo(f"{where(prefix, key)} is not a dictionary")
            if not key:
                raise BadMetainfo(f"{where(prefix, key)} has an empty name")
            try:
                if len(key) > NAME_CUT:
                    raise ValueError
                comp = _plain_name(key)
            except (ValueError, UnicodeDecodeError):
                comp = _component(key, where(prefix, key))
            leaf = child.get(b"")
            if leaf is None:
                walk(child, (*prefix, comp), depth + 1)  # noqa: F821 (deleted after)
                continue
            if len(child) != 1:
                raise BadMetainfo(f"{where(prefix, key)} is both a file and a folder")
            if type(leaf) is dict and len(leaf) == 2:  # the usual: length, pieces root
                length = leaf.get(b"length")
                root = leaf.get(b"pieces root")
                if (type(length) is int and length > 0 and type(root) is bytes
                        and len(root) == 32):
                    append(FileEntry((*prefix, comp), length, 0, pieces_root=root))
                    if len(out) > max_files:
                        raise TooLarge(f"torrent has more than {max_files} files")
                    continue
            append(_tree_leaf(leaf, (*prefix, comp), where(prefix, key)))
            if len(out) > max_files:
                raise TooLarge(f"torrent has more than {max_files} files")

    try:
        walk(tree, (name,), 0)
    finally:
        del walk  # (a cycle through its closure, holding ``out``: see _read_file_tree)
    if len(out) == 1 and len(out[0].path) == 2:  # one file at the root: NAME is its own
        f = out[0]
        out = [FileEntry(f.path[1:], f.length, 0, f.pad, f.attr, f.pieces_root)]
    return out


def _tree_leaf(leaf: Any, path: tuple[str, ...], where: str) -> FileEntry:
    """A file entry of a v2 file tree, read the long way (``where``: its place, quoted)."""
    if not isinstance(leaf, dict):
        raise BadMetainfo(f"{where} file entry is not a dictionary")
    attr = _attr(leaf, where[1:-1])
    if "p" in attr:  # (as libtorrent refuses it: pad files are v1's alone)
        raise BadMetainfo(f"{where} has the pad attribute: a v2 file tree lists no pad "
                          "files")
    # A symlink's entry (attr "l") has its "symlink path" and no length in the torrents
    # libtorrent makes: it holds no data (one with a length is refused with the v1
    # form's, in _check_special). Without its path, it is an empty file (see _dangling).
    if _dangling(attr, leaf):
        attr, length = attr.replace("l", ""), 0
    else:
        length = (0 if "l" in attr and b"length" not in leaf
                  else _length(leaf, where[1:-1]))
    root = leaf.get(b"pieces root")
    if length > 0 and (not isinstance(root, bytes) or len(root) != 32):
        raise BadMetainfo(f"{where} needs a 32-byte 'pieces root'")
    return FileEntry(path, length, 0, attr=attr, pieces_root=root if length > 0 else None)


def _align_v2(files: list[FileEntry], piece_length: int, name: str) -> FileTable:
    """Place v2-only files on piece boundaries with pad entries, exactly as libtorrent
    lays them out (the last file padded too, pads named NAME/.pad/SIZE), so piece and
    file indices agree with it. (Straight into the table: no entry made per pad.)"""
    b = TableBuilder()
    pads = -1  # (their folder, once there is one)
    pos = 0
    for f in files:
        b.add(b.folder(f.path[:-1]), f.path[-1], f.length, f.pad, f.attr, f.pieces_root)
        pos += f.length
        if pos % piece_length:
            gap = piece_length - pos % piece_length
            if pads < 0:
                pads = b.folder((name, ".pad"))
            b.add(pads, str(gap), gap, pad=True, attr="p")
            pos += gap
    return b.build()


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
    # A tail pad (after the last file) that does not end on a piece boundary (cut short,
    # or of 0 bytes) is not the layout v2 gives the payload, and libtorrent refuses it
    # ("the v1 and v2 file metadata does not match"); taken, a v1 hash of the last piece
    # made over the whole pad never passed, and the download never completed, unsaid.
    if v1 and v1[-1].pad and (v1[-1].offset + v1[-1].length) % piece_length:
        raise BadMetainfo(
            f"hybrid torrent: the pad file {'/'.join(v1[-1].path)!r} ({v1[-1].length} bytes) "
            "does not end on a piece boundary"
        )


__all__ = [
    "BLOCK_SIZE",
    "FileEntry",
    "Metainfo",
    "V2Piece",
    "leaf_count",
    "parse",
]
