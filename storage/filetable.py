"""A torrent's files as columns: a torrent of 100,000 files in a few MiB, not a heap.

A :class:`FileEntry` per file, with its path tuple and strings, costs about 400 bytes a
file held for as long as the torrent is registered, and hundreds of thousands of objects
for the garbage collector to walk. :class:`FileTable` keeps the same facts in arrays
(lengths, offsets, flags), one string of every file name and a table of distinct
folders, and still reads as a sequence of :class:`FileEntry`, made on demand: code that
looks at a file or two asks for entries, code that walks every file uses the columns.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from typing import NamedTuple, overload


class FileEntry(NamedTuple):
    """One file of the torrent, placed in the torrent's linear byte space.

    ``offset`` is where the file starts in that space; pad files (BEP 47, and the
    implicit alignment of v2-only torrents, which are given pad entries here as
    libtorrent does) occupy space but are never written to disk.
    """

    path: tuple[str, ...]
    length: int
    offset: int
    pad: bool = False
    attr: str = ""
    pieces_root: bytes | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def stored(self) -> bool:
        """Whether the file has bytes on disk (pad files and symlinks do not)."""
        return not self.pad and "l" not in self.attr


PAD, UNSTORED = 1, 2  # flag bits: a pad file; a file with no bytes on disk (pad, symlink)
_PAD_BIT = bytes(b & PAD for b in range(256))


class TableBuilder:
    """Files appended in torrent order; offsets follow from the lengths."""

    def __init__(self) -> None:
        self.folders: dict[tuple[str, ...], int] = {}
        self.folder_of = array("I")
        self.names: list[str] = []
        self.lengths = array("q")
        self.flags = bytearray()
        self.attrs: dict[int, str] = {}
        self.roots: dict[int, bytes] = {}

    def folder(self, parts: tuple[str, ...]) -> int:
        fid = self.folders.get(parts)
        if fid is None:
            fid = self.folders[parts] = len(self.folders)
        return fid

    def add(self, folder: int, name: str, length: int, pad: bool = False, attr: str = "",
            root: bytes | None = None) -> None:
        i = len(self.lengths)
        self.folder_of.append(folder)
        self.names.append(name)
        self.lengths.append(length)
        self.flags.append((PAD | UNSTORED) if pad else UNSTORED if "l" in attr else 0)
        if attr:
            self.attrs[i] = attr
        if root is not None:
            self.roots[i] = root

    def add_entry(self, f: FileEntry) -> None:
        self.add(self.folder(f.path[:-1]), f.path[-1], f.length, f.pad, f.attr, f.pieces_root)

    def build(self, prefix: tuple[str, ...] = ()) -> FileTable:
        """The table, every folder under ``prefix`` (a multi-file torrent's name)."""
        return FileTable(self, prefix)


class FileTable(Sequence[FileEntry]):
    """The files of a torrent (see the module's docstring). Immutable once built."""

    __slots__ = ("_attrs", "_folder_of", "_folders", "_name_at", "_names", "_roots",
                 "flags", "lengths", "offsets")

    def __init__(self, b: TableBuilder, prefix: tuple[str, ...] = ()) -> None:
        folders: list[tuple[str, ...]] = [()] * len(b.folders)
        for parts, fid in b.folders.items():
            folders[fid] = (*prefix, *parts)
        self._folders = folders
        self._folder_of = b.folder_of
        # Every name in one string, each followed by "/", found by offsets (a name holds
        # no "/": it is a plain component, checked before it got here).
        self._names = "/".join(b.names)
        self._name_at = array("q", accumulate((len(n) + 1 for n in b.names), initial=0))
        self.lengths = b.lengths
        self.offsets = array("q", accumulate(b.lengths, initial=0))
        self.flags = bytes(b.flags)
        self._attrs = b.attrs
        self._roots = b.roots

    @classmethod
    def of(cls, entries: Iterable[FileEntry]) -> FileTable:
        b = TableBuilder()
        offset = 0
        for f in entries:
            if f.offset != offset:
                raise ValueError(f"file {'/'.join(f.path)!r} is at {f.offset}, not {offset}: "
                                 "files tile the torrent back to back")
            b.add_entry(f)
            offset += f.length
        return cls(b)

    def __len__(self) -> int:
        return len(self.lengths)

    @overload
    def __getitem__(self, i: int) -> FileEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[FileEntry]: ...
    def __getitem__(self, i: int | slice) -> FileEntry | list[FileEntry]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self.lengths)
        flags = self.flags[i]  # raises IndexError past the end, as a sequence must
        return FileEntry(self.path(i), self.lengths[i], self.offsets[i], bool(flags & PAD),
                         self._attrs.get(i, ""), self._roots.get(i))

    def __iter__(self) -> Iterator[FileEntry]:
        return map(self.__getitem__, range(len(self.lengths)))

    def path(self, i: int) -> tuple[str, ...]:
        return (*self._folders[self._folder_of[i]], self.name(i))

    def name(self, i: int) -> str:
        return self._names[self._name_at[i] : self._name_at[i + 1] - 1]

    def names(self) -> list[str]:
        """Every file's name, in file order."""
        return self._names.split("/") if self._names or len(self) else []

    def stored(self, i: int) -> bool:
        return not self.flags[i] & UNSTORED

    def pad(self, i: int) -> bool:
        return bool(self.flags[i] & PAD)

    def attr(self, i: int) -> str:
        """BEP 47's attributes of file ``i`` ("" for none)."""
        return self._attrs.get(i, "")

    def executable(self, i: int) -> bool:
        """BEP 47's ``x`` attribute: the file is made 0o755, as libtorrent makes it."""
        return "x" in self._attrs.get(i, "")

    def end(self, i: int) -> int:
        return self.offsets[i + 1]

    def pieces_root(self, i: int) -> bytes | None:
        return self._roots.get(i)

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def count_not_pads(self) -> int:
        """How many files are not pads (the files a status lists)."""
        return len(self.flags) - self.flags.translate(_PAD_BIT).count(1)

    @property
    def folders(self) -> list[tuple[str, ...]]:
        """The distinct folders that hold files, each once (paths below the save path)."""
        return self._folders

    def folder_index(self) -> array[int]:
        """Each file's folder, as an index into :attr:`folders`."""
        return self._folder_of

    def special(self) -> Iterator[int]:
        """Files with attributes (pads, symlinks, executables...): usually few."""
        return iter(sorted(self._attrs.keys() | {i for i, f in enumerate(self.flags) if f}))


__all__ = ["PAD", "UNSTORED", "FileEntry", "FileTable", "TableBuilder"]
