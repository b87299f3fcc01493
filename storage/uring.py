"""The uring backend: a call's reads and writes submitted together through io_uring
(the ``liburing`` package), on a ring per thread (see :class:`UringStorage`)."""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Sequence
from typing import Any

from .errors import StorageIOError
from .files import _IOV_MAX, FileStorage
from .hashing import Buffer, sub_views
from .layout import Segment

# io_uring ------------------------------------------------------------------------------
_rings = threading.local()  # one ring per thread, shared by every torrent it works for


def check_uring() -> None:
    """Raise StorageIOError, saying why, where io_uring cannot be used (an old kernel, a
    seccomp filter, io_uring_disabled, the liburing package missing)."""
    try:
        ring = _thread_ring()
        results = ring.run([("nop", -1, (), 0)])
    except (ImportError, OSError) as exc:
        raise StorageIOError(f"io_uring is not available here ({exc}): choose another "
                             "backend, such as posix", errno=getattr(exc, "errno", None)
                             or errno.ENOSYS) from None
    if results[0] < 0:
        raise StorageIOError(f"io_uring refused a no-op ({os.strerror(-results[0])}): choose "
                             "another backend, such as posix", errno=-results[0])


class _Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer: a buffer export, taken and given back through the C API."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PyBUF_WRITABLE = 0x1


class _Slot:
    """The iovec array of one operation in flight, in a ``liburing.Iovec`` made once.

    ``liburing.Iovec(buffers)`` takes an export of every buffer it is given and never
    gives it back: whatever passed through one could never be freed (every block
    written, every piece read) nor unmapped (a client's ring). So each ring makes its
    Iovecs once, over a buffer of its own, and points their entries at each
    operation's buffers, holding an export of each (taken and released through the C
    API) only while the kernel works on it. The Iovec's layout (the entry count, then
    the pointer to its ``struct iovec`` array, after the object header) is checked when
    it is made; a liburing laid out otherwise is refused with the rest of io_uring.
    """

    def __init__(self, lib: Any) -> None:
        self._own = bytearray(1)  # the export Iovec keeps forever is of this
        self.iovec = lib.Iovec([self._own] * _IOV_MAX)
        state = id(self.iovec) + object.__basicsize__
        self._count = ctypes.c_size_t.from_address(state)
        table = ctypes.c_void_p.from_address(state + ctypes.sizeof(ctypes.c_size_t)).value
        own = _PyBuffer()
        _get_buffer(self._own, own, 0)
        try:
            if (type(self.iovec).__basicsize__ < object.__basicsize__ + 2 * 8
                    or self._count.value != _IOV_MAX or not table):
                raise OSError(errno.ENOTSUP, "liburing.Iovec is not laid out as expected")
            first = _Iov.from_address(table)
            if first.base != own.buf or first.len != 1 or ctypes.sizeof(_Iov) != 16:
                raise OSError(errno.ENOTSUP, "liburing.Iovec is not laid out as expected")
        finally:
            _release_buffer(own)
        self._array: int = table  # its struct iovec entries: (base, length), 8 bytes each
        self._held: list[_PyBuffer] = []
        self._kept: list[bytes] = []

    def point(self, bufs: Sequence[Buffer], writable: bool) -> Any:
        """The Iovec, its entries on ``bufs`` (at most IOV_MAX), each held till release().

        A ``bytes`` (a gathered block: most of what is written) is held by reference,
        its bytes found at a fixed offset in the object (checked at start-up), with no
        export to take: immutable, it cannot move or change while it is referenced."""
        flags = _PyBUF_WRITABLE if writable else 0
        held, kept = self._held, self._kept
        vals = array.array("Q")
        for b in bufs:
            if type(b) is bytes and not writable and _BYTES_DATA:
                kept.append(b)
                vals.append(id(b) + _BYTES_DATA)
                vals.append(len(b))
                continue
            pb = _PyBuffer()
            _get_buffer(b, pb, flags)
            held.append(pb)
            vals.append(pb.buf)
            vals.append(pb.len)
        ctypes.memmove(self._array, vals.buffer_info()[0], len(vals) * vals.itemsize)
        self._count.value = len(bufs)
        return self.iovec

    def release(self) -> None:
        for pb in self._held:
            _release_buffer(pb)
        self._held.clear()
        self._kept.clear()


def _bytes_data_offset() -> int:
    """Where a bytes object's bytes start in it, as the buffer protocol gives them; 0 if
    that is not the same for every bytes object (then every buffer is exported)."""
    offsets = set()
    for probe in (b"probe", b"x" * 5000, bytes(range(256))):
        pb = _PyBuffer()
        _get_buffer(probe, pb, 0)
        try:
            offsets.add(pb.buf - id(probe))
        finally:
            _release_buffer(pb)
    return offsets.pop() if len(offsets) == 1 else 0


_BYTES_DATA = _bytes_data_offset()


class _Ring:
    """One thread's io_uring: a list of operations in, their results out (negative
    errno on failure), submitted together and waited on together."""

    DEPTH = 64
    live = False  # io_uring_queue_init succeeded: the ring is to be closed

    def __init__(self) -> None:
        import liburing

        self.lib = liburing
        self.ring = liburing.Ring()
        self.cqe = liburing.Cqe()
        self.slots: list[_Slot] = []  # made as batches need them, up to DEPTH
        liburing.io_uring_queue_init(self.DEPTH, self.ring)
        self.live = True

    def __del__(self) -> None:
        # The thread that owned it ended (its thread-local went): close the ring.
        if self.live:
            self.live = False
            with contextlib.suppress(Exception):
                self.lib.io_uring_queue_exit(self.ring)

    def run(self, ops: Sequence[tuple[str, int, Sequence[Buffer], int]]) -> list[int]:
        """``ops``: ("readv" | "writev" | "nop", fd, buffers, offset); the buffers of a
        read must be writable."""
        lib, ring, cqe = self.lib, self.ring, self.cqe
        results = [0] * len(ops)
        for first in range(0, len(ops), self.DEPTH):
            batch = ops[first : first + self.DEPTH]
            while len(self.slots) < len(batch):
                self.slots.append(_Slot(lib))
            try:
                # Every buffer is taken (a read-only one for a read raises here) before
                # any entry is queued: none is left queued, to go with the next batch.
                iovecs = [self.slots[i].point(bufs, kind == "readv") if kind != "nop" else None
                          for i, (kind, _, bufs, _) in enumerate(batch)]
                for i, (kind, fd, _, offset) in enumerate(batch):
                    sqe = lib.io_uring_get_sqe(ring)
                    if kind == "writev":
                        lib.io_uring_prep_writev(sqe, fd, iovecs[i], offset)
                    elif kind == "readv":
                        lib.io_uring_prep_readv(sqe, fd, iovecs[i], offset)
                    else:
                        lib.io_uring_prep_nop(sqe)
                    sqe.user_data = first + i
                lib.io_uring_submit_and_wait(ring, len(batch))
                got = 0
                while got < len(batch):
                    lib.io_uring_wait_cqe(ring, cqe)
                    ready = lib.io_uring_cq_ready(ring)
                    for j in range(ready):
                        c = cqe[j]
                        try:
                            res = c.res
                        except OSError as exc:  # the binding raises a failed operation's errno
                            res = -(exc.errno or errno.EIO)
                        results[c.user_data] = res
                    lib.io_uring_cq_advance(ring, ready)
                    got += ready
            finally:
                for slot in self.slots[: len(batch)]:
                    slot.release()
        return results


def _thread_ring() -> _Ring:
    ring: _Ring | None = getattr(_rings, "ring", None)
    if ring is None:
        ring = _rings.ring = _Ring()
    return ring


class UringStorage(FileStorage):
    """The io_uring backend: the segments of one call (a block across files, a piece
    being read) are submitted together and waited on together, on the calling thread's
    ring; the ring's two slices still go out as one vectored write. Reads that must not
    touch the disk (RWF_NOWAIT, for the cache) go as in posix.
    """

    name = "uring"
    gathers_writes = True

    def writev(self, segments: Sequence[Segment], bufs: Sequence[Buffer]) -> int:

        todo = [s for s in segments if s.stored]
        if not todo:
            return 0
        single = len(segments) == 1
        entries: list[list[int]] = []
        ops: list[tuple[str, int, Sequence[Buffer], int]] = []
        views: list[Sequence[Buffer]] = []
        try:
            for seg in todo:
                entry = self.handles.get(self, seg.file_index, True)
                entries.append(entry)
                if seg.file_index not in self._sized:
                    self._size_file(entry[0], seg.file_index)
                else:
                    self._check_linked(entry[0], seg.file_index)
                v: Sequence[Buffer] = list(bufs) if single else sub_views(
                    bufs, seg.buf_offset, seg.buf_offset + seg.length)
                views.append(v)
                ops.append(("writev", entry[0], v[:_IOV_MAX], seg.file_offset))
            results = _thread_ring().run(ops)
            for seg, entry, v, res in zip(todo, entries, views, results, strict=True):
                if res < 0:
                    raise StorageIOError.wrap(OSError(-res, os.strerror(-res)),
                                              f"write {self.file_path(seg.file_index)}")
                if res != seg.length:  # short: finish it the plain way
                    self._pwritev_all(entry[0], [memoryview(b) for b in v], seg.file_offset,
                                      seg.file_index, res)
        finally:
            for entry in entries:
                self.handles.put(entry)
        with self._lock:
            self._dirty.update(s.file_index for s in todo)
        return sum(s.length for s in todo)

    def _pread(self, segments: Sequence[Segment], out: memoryview, nowait: int) -> bool:

        if nowait:
            return super()._pread(segments, out, nowait)
        with contextlib.ExitStack() as stack:
            ops: list[tuple[str, int, Sequence[Buffer], int]] = []
            todo = []
            for seg in segments:
                dst = out[seg.buf_offset : seg.buf_offset + seg.length]
                if not seg.stored:
                    dst[:] = bytes(seg.length)
                    continue
                fd = stack.enter_context(self._fd(seg.file_index, False))
                ops.append(("readv", fd, [dst], seg.file_offset))
                todo.append((seg, fd, dst))
            results = _thread_ring().run(ops)
            for (seg, fd, dst), res in zip(todo, results, strict=True):
                if res < 0:
                    raise StorageIOError.wrap(OSError(-res, os.strerror(-res)),
                                              f"read {self.file_path(seg.file_index)}")
                done = res
                while done < seg.length:  # short (a file cut short, or a signal): go on
                    try:
                        n = os.preadv(fd, [dst[done:]], seg.file_offset + done)
                    except OSError as exc:
                        raise StorageIOError.wrap(
                            exc, f"read {self.file_path(seg.file_index)}") from None
                    if n == 0:
                        if self.known_whole(seg.file_index):  # cut short since its check
                            raise self._vanished(seg.file_index, f"{self.file_path(seg.file_index)}"
                                                 ": truncated behind pieced's back", gone=False)
                        dst[done:] = bytes(seg.length - done)
                        break
                    done += n
        return True
