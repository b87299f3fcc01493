"""The uring backend: a call's reads and writes submitted together through io_uring
(the ``liburing`` package), on a few rings shared by every thread (see
:class:`UringStorage`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import marshal
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .errors import StorageIOError
from .files import _IOV_MAX, FileStorage
from .hashing import Buffer, sub_views
from .layout import Segment, fill_zeros
from .sharedpool import SharedPool

# io_uring ------------------------------------------------------------------------------
# Buffers an iovec of the package takes: it checks against _SC_IOV_MAX, the name of the
# sysconf setting (60), not its value (1024).
_IOVEC_MAX = 60


def check_uring() -> None:
    """Raise StorageIOError, saying why, where io_uring cannot be used (an old kernel, a
    seccomp filter, io_uring_disabled, the liburing package missing or built for another
    CPU)."""
    crashed = _probe_in_child()
    if crashed:
        raise StorageIOError(f"io_uring is not available here (the liburing package {crashed}):"
                             " choose another backend, such as posix", errno=errno.ENOSYS)
    try:
        results = _run([("nop", -1, (), 0)])
    except (ImportError, OSError) as exc:
        raise StorageIOError(f"io_uring is not available here ({exc}): choose another "
                             "backend, such as posix", errno=getattr(exc, "errno", None)
                             or errno.ENOSYS) from None
    if results[0] < 0:
        raise StorageIOError(f"io_uring refused a no-op ({os.strerror(-results[0])}): choose "
                             "another backend, such as posix", errno=-results[0])


def liburing() -> Any:
    """The liburing package, imported without writing into the folder it is installed
    in. It loads through the dynamic_import package, whose reader of its own cache
    (2024.5.2) never reads one back (a statement split over two lines), so that every
    import deleted and wrote that cache again among the installed files: refused to a
    service user (a PermissionError), and under a read-only /usr. Its reader is put
    right first, and the cache an install writes (``make``) is then read, not written."""
    with _importing:
        if "liburing" not in sys.modules:
            import dynamic_import  # noqa: F401  (its submodule below, not the function)
            loader: Any = sys.modules.get("dynamic_import.importer")
            if loader is not None and hasattr(loader, "load_cache"):
                loader.load_cache = _load_cache
        import liburing as lib
        if not _resolved:
            # The package loads each of its modules at the first use of one of its
            # names, with nothing to keep two threads from loading the same one: the
            # second is refused ("has already been imported. Re-initialisation is not
            # supported") and the other names of the module are missing meanwhile. Two
            # hashing threads of a daemon's first recheck met so. All loaded here, once.
            for name in _USED:
                getattr(lib, name)
            _resolved.append(True)
    return lib


# The package's names the backend uses (see liburing()).
_USED = ("io_uring", "io_uring_cqe", "io_uring_queue_init", "io_uring_queue_exit", "iovec",
         "io_uring_get_sqe", "io_uring_prep_nop", "io_uring_prep_writev",
         "io_uring_prep_readv", "io_uring_submit", "io_uring_wait_cqe", "io_uring_cqe_seen")
_importing = threading.Lock()
_resolved: list[bool] = []


def _load_cache(path: str, recursive: bool, exclude_file: list[str], exclude_dir: list[str],
                version: str) -> Any:
    """dynamic_import's cache of a package's names, if it is of the package as it is
    installed now; else None, and it is made again."""
    try:
        with open(path, "rb") as f:
            (cached_version, cached_recursive, cached_exclude_file, cached_exclude_dir,
             dir_mtime, data) = marshal.load(f)
        if (cached_version, cached_recursive, cached_exclude_file, cached_exclude_dir) != (
                version, recursive, exclude_file, exclude_dir):
            return None
        if any(os.stat(d).st_mtime != m for d, m in dir_mtime.items()):
            return None
        if any(os.stat(entry[1]).st_mtime != entry[3] for entry in data.values()):
            return None
        return data
    except Exception:  # (anything amiss: made again, as its own reader does)
        return None


_probed: list[str] = []  # what the child found, once a process


def _probe_in_child() -> str:
    """Make a ring in a child process first: a binding built for instructions this CPU
    lacks (a wheel of the package needs AVX-512) dies of SIGILL, and would take the
    daemon with it. What went wrong there, or "" when it worked (or could not be run)."""
    if not _probed:
        code = ("from pieced.storage.uring import liburing; lib = liburing(); "
                "r = lib.io_uring(); lib.io_uring_queue_init(2, r); lib.io_uring_queue_exit(r)")
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            _probed.append("")  # (no child to be had: the checks here say what they find)
        else:
            if done.returncode < 0:
                sig = signal.Signals(-done.returncode).name
                _probed.append(f"dies of {sig} on this machine: a build for another CPU?")
            else:
                _probed.append("")
    return _probed[0]


class _Ring:
    """An io_uring: a list of operations in, their results out (negative
    errno on failure), submitted together and waited on together.

    Each operation's buffers go into an ``iovec`` of the package made for it, which
    holds them (not an export: the buffer objects) only until the batch is done, so
    nothing written or read stays pinned, and a client's ring can be unmapped when it
    leaves."""

    DEPTH = 64
    live = False  # io_uring_queue_init succeeded: the ring is to be closed

    def __init__(self) -> None:
        self.lib = lib = liburing()
        self.ring = lib.io_uring()
        self.cqe = lib.io_uring_cqe()
        lib.io_uring_queue_init(self.DEPTH, self.ring)
        self.live = True

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self.live:
            self.live = False
            with contextlib.suppress(Exception):
                self.lib.io_uring_queue_exit(self.ring)

    def run(self, ops: Sequence[tuple[str, int, Sequence[Buffer], int]]) -> list[int]:
        """``ops``: ("readv" | "writev" | "nop", fd, buffers, offset); the buffers of a
        read must be writable. An operation of more buffers than an iovec of the
        package takes goes as several, at their offsets; its result is what the first
        of them that came short or failed leaves (bytes done before it, or its errno)."""
        parts: list[tuple[int, tuple[str, int, Sequence[memoryview], int]]] = []
        for i, (kind, fd, bufs, offset) in enumerate(ops):
            views = [memoryview(b) for b in bufs]
            views = [v.cast("B") if v.format != "B" or v.ndim != 1 else v
                     for v in views if v.nbytes]
            if kind == "nop" or not views:
                parts.append((i, ("nop", -1, (), 0)))
                continue
            if kind == "readv" and any(v.readonly for v in views):
                raise BufferError("a read into a read-only buffer")
            for k in range(0, len(views), _IOVEC_MAX):
                chunk = views[k : k + _IOVEC_MAX]
                parts.append((i, (kind, fd, chunk, offset)))
                offset += sum(v.nbytes for v in chunk)
        got = self._submit([op for _, op in parts])
        results = [0] * len(ops)
        short = [False] * len(ops)
        for (i, (_, _, sent, _)), res in zip(parts, got, strict=True):
            if short[i]:
                continue
            if res < 0:
                short[i] = True
                results[i] = results[i] or res
                continue
            results[i] += res
            short[i] = res < sum(v.nbytes for v in sent)
        return results

    def _submit(self, ops: Sequence[tuple[str, int, Sequence[memoryview], int]]) -> list[int]:
        """Each op (at most _IOVEC_MAX buffers, none empty) one entry, DEPTH at a time."""
        lib, ring, cqe = self.lib, self.ring, self.cqe
        results = [0] * len(ops)
        for first in range(0, len(ops), self.DEPTH):
            batch = ops[first : first + self.DEPTH]
            iovecs = [lib.iovec(bufs) if kind != "nop" else None for kind, _, bufs, _ in batch]
            for i, (kind, fd, _, offset) in enumerate(batch):
                sqe = lib.io_uring_get_sqe(ring)
                iov = iovecs[i]
                if iov is None:
                    lib.io_uring_prep_nop(sqe)
                elif kind == "writev":
                    lib.io_uring_prep_writev(sqe, fd, iov, len(iov), offset)
                else:
                    lib.io_uring_prep_readv(sqe, fd, iov, offset)
                sqe.user_data = first + i + 1  # (0 is refused: "no data")
            try:
                lib.io_uring_submit(ring)  # (at once: what would block goes to the kernel's workers)
                _wait(ring.ring_fd, len(batch))
                for _ in batch:  # (all there: no wait holds the GIL)
                    # One completion at a time: the package's cqe[j] and its batch peek
                    # do not follow the completion queue round its end.
                    while (err := lib.io_uring_wait_cqe(ring, cqe)) == -errno.EINTR:
                        pass
                    if err < 0:
                        raise OSError(-err, os.strerror(-err))
                    results[cqe.user_data - 1] = cqe.res
                    lib.io_uring_cqe_seen(ring, cqe)
            except BaseException:
                # Entries or completions left behind would be taken for the next call's:
                # the ring is not used again (the pool makes another).
                self.close()
                raise
            del iovecs  # the buffers are the caller's again
        return results


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_IO_URING_ENTER = 426  # (the same on every architecture)
_IORING_ENTER_GETEVENTS = 1


def _wait(ring_fd: int, n: int) -> None:
    """Wait until ``n`` completions are in the ring, with the GIL released. The
    package's own waits (io_uring_submit_and_wait, io_uring_wait_cqe) hold it while the
    kernel sleeps: a write held up by a disk that hangs (the journal of a file system
    waiting for it) then stopped every thread of the daemon, its event loop included,
    until the disk answered. A foreign call through ctypes lets it go."""
    while _libc.syscall(_SYS_IO_URING_ENTER, ctypes.c_uint(ring_fd), ctypes.c_uint(0),
                        ctypes.c_uint(n), ctypes.c_uint(_IORING_ENTER_GETEVENTS),
                        None, ctypes.c_size_t(0)) < 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


MAX_RINGS = 8
_rings: SharedPool[_Ring] = SharedPool(MAX_RINGS)


def _run(ops: list[tuple[str, int, Sequence[Buffer], int]]) -> list[int]:
    """Run a batch on one of the shared rings (a ring closed after a failure is not
    used again: another is made)."""
    with _rings.take(lambda ring: ring or _Ring(), lambda ring: ring.live) as ring:
        return ring.run(ops)


def _run_if_free(ops: list[tuple[str, int, Sequence[Buffer], int]]) -> list[int]:
    """:func:`_run`, or all zeros at once (nothing done: the caller does it all the
    plain way, as it finishes a short one) when every ring is taken. Their holders
    may be waiting on a disk that hangs: eight readers of such a disk held every ring,
    and a write to a healthy disk waited for that one."""
    with _rings.take_if_free(lambda ring: ring or _Ring(), lambda ring: ring.live) as ring:
        return ring.run(ops) if ring is not None else [0] * len(ops)


class UringStorage(FileStorage):
    """The io_uring backend: the segments of one call (a block across files, a piece
    being read) are submitted together and waited on together, on one of the shared
    rings; the ring's two slices still go out as one vectored write. Reads that must not
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
            results = _run_if_free(ops)
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
            self.written.update(s.file_index for s in todo)
        return sum(s.length for s in todo)

    # Segments read in one submission at most, each holding a descriptor of its file
    # until the submission is done: a check reads runs of small pieces (4 MiB), which
    # can span thousands of files; held all at once, they went past the handle pool's
    # bound (5,949 open with max_open_files 64), and every open walked the busy ones.
    READ_GROUP = 32

    def _pread(self, segments: Sequence[Segment], out: memoryview, nowait: int) -> bool:
        if nowait:
            return super()._pread(segments, out, nowait)
        group = max(1, min(self.READ_GROUP, self.handles.max_open // 2))
        for start in range(0, len(segments), group):
            self._pread_group(segments[start : start + group], out)
        return True

    def _pread_group(self, segments: Sequence[Segment], out: memoryview) -> None:
        with contextlib.ExitStack() as stack:
            ops: list[tuple[str, int, Sequence[Buffer], int]] = []
            todo = []
            for seg in segments:
                dst = out[seg.buf_offset : seg.buf_offset + seg.length]
                if not seg.stored:
                    fill_zeros(dst)
                    continue
                whole = self.short_is_cut(seg.file_index)  # before the read: see _check_linked
                fd = stack.enter_context(self._fd(seg.file_index, False))
                ops.append(("readv", fd, [dst], seg.file_offset))
                todo.append((seg, fd, dst, whole))
            results = _run_if_free(ops)
            for (seg, fd, dst, whole), res in zip(todo, results, strict=True):
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
                        if whole:  # cut short since its check
                            raise self._vanished(seg.file_index, f"{self.file_path(seg.file_index)}"
                                                 ": truncated behind pieced's back", gone=False)
                        dst[done:] = bytes(seg.length - done)
                        break
                    done += n
