"""What of a file is in the page cache, found without putting any of it there.

A read with ``RWF_NOWAIT`` is no probe: a page it does not find, it starts reading in,
and when that read is done before the kernel looks again (as it can be on a loaded
machine) the probe finds the page it brought. ``mincore`` over a read-only shared map of
the file reads nothing in. Used by the tests and by the benchmarks that set up a warm or
a cold page cache.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
_BIT0 = bytes(i & 1 for i in range(256))


def page_residency(path: Path) -> bytes:
    """One byte a page of the file: 1 if the page is in the page cache, else 0."""
    size = path.stat().st_size
    if size == 0:
        return b""
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return vec.raw.translate(_BIT0)  # (the other bits are reserved)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_pages(path: Path) -> list[int]:
    """The numbers of the file's pages that are in the page cache."""
    return [i for i, b in enumerate(page_residency(path)) if b]


def drop(*paths: Path) -> float:
    """Write back and drop from the page cache the files given, and those under the
    folders given (``POSIX_FADV_DONTNEED``); return the fraction of their pages still
    resident: pages a process has mapped stay."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))
             if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    pages = [page_residency(f) for f in files]
    total = sum(map(len, pages))
    return sum(p.count(1) for p in pages) / total if total else 0.0
