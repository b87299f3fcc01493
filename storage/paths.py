"""Payload paths, resolved beneath a torrent's save-path folder at every use.

A save path is checked against the configured roots once, at register or move, and
opened then by walking down from the root it lies in; what is below it can change at
any time (a folder swapped for a symlink, a file hard-linked to one outside). So no
payload path is ever handed to the kernel whole: the save-path folder is opened,
and every open, mkdir, unlink, rename and rmdir walks down from
that descriptor one component at a time (``openat`` with ``O_NOFOLLOW | O_DIRECTORY``,
``mkdirat``, ``unlinkat``...), refusing any symlink on the way. A payload file must be
a regular file with one link: a hard link planted to a file elsewhere is refused, not
written through or served.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import PathEscape, PiecedError, StorageIOError

Parts = Sequence[str]


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """A regular file's bytes (up to ``limit`` + 1 of them, when given: the caller tells
    a file past its limit by its length). OSError if it cannot be read or is not a
    regular file: a FIFO in its place would have its open wait for a writer for ever,
    and ``/dev/zero`` would be read for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{os.fspath(path)} is not a regular file")
        os.set_blocking(fd, True)
        chunks = []
        got = 0
        while limit is None or got <= limit:
            chunk = os.read(fd, 1 << 20 if limit is None else min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# The status flags F_SETFL sets (all others it leaves): what an open asked for of these
# is set again, O_NONBLOCK (used for the open alone) is not.
_SETFL_KEPT = os.O_APPEND | os.O_ASYNC | os.O_DIRECT | os.O_NOATIME


class SaveFolderGone(StorageIOError):
    """The save folder, let go and opened again by its path, is not there any more, or
    is another one (renamed away, deleted or replaced behind our back): what was stored
    in it is to start over (``FileStorage.root_moved``)."""


# Save-path folders kept open while no one uses them, the least recently used closed
# first beyond this: a descriptor for each registered torrent took a daemon with a few
# thousand torrents past RLIMIT_NOFILE (every open failed with EMFILE, for every client).
# Counted in the daemon's reserved descriptors.
IDLE_FOLDERS = 64


class _IdleFolders:
    """The folders held open by no one at the moment, oldest first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._idle: OrderedDict[int, Beneath] = OrderedDict()

    def idle(self, b: Beneath) -> None:
        with self._lock:
            self._idle[id(b)] = b
            self._idle.move_to_end(id(b))
            over = [self._idle.popitem(last=False)[1] for _ in range(len(self._idle) - self.limit)]
        for victim in over:
            victim._let_go()

    def busy(self, b: Beneath) -> None:
        with self._lock:
            self._idle.pop(id(b), None)


IDLE = _IdleFolders(IDLE_FOLDERS)

# Called when an open meets a lease, before it waits for the lease's holder: the mmap
# backend gives back at once the leases of its own maps that the open is breaking. Its
# SIGIO handler would too, but a Python handler runs on the main thread between two
# bytecodes: a main thread that is itself the opener (the storage used in-process) went
# into the waiting open first, and waited out the kernel's lease-break-time (45 s).
lease_met: Callable[[], object] | None = None


class Beneath:
    """A folder opened at first use (kept open while used, and among the last
    ``IDLE_FOLDERS`` used), and the paths below it.

    ``anchor``: the folder the path is reached from, one component at a time, no
    symlink followed on the way (the configured root it lies in; ``/`` when any path
    will do). Opened whole, ``O_NOFOLLOW`` would refuse only a symlink in its last
    component: a parent folder swapped for a symlink would lead the daemon outside its
    roots.

    ``allow_hard_links``: payload files with other links are used as they are. For
    libraries whose files are hard-linked into a media folder on purpose; anyone who can
    write below the save path can then make the daemon write a file elsewhere on the
    same file system.

    The folders whose entries this made or moved (a new file, folder or link) are
    remembered until :meth:`sync_made` fsyncs them: a file's data made durable is not
    enough while its name may still be lost.
    """

    def __init__(self, path: Path, allow_hard_links: bool = False,
                 anchor: Path | None = None) -> None:
        self.path = path
        self.anchor = anchor if anchor is not None else Path(path.anchor or "/")
        self.allow_hard_links = allow_hard_links
        self._fd = -1
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the first open
        self._users = 0  # holding the descriptor (held)
        self._lock = threading.Lock()
        self._made: set[tuple[str, ...]] = set()  # folders (relative) with entries to fsync
        self._syncing_made = threading.Lock()  # held for a whole sync_made

    @property
    def device(self) -> int | None:
        """The device of the folder as first opened (None before): which file system
        the files beneath it are on, as far as a sync is concerned."""
        ident = self._ident
        return ident[0] if ident is not None else None

    def changed(self, folder: Parts) -> None:
        """An entry of the folder (relative) was, or is about to be, made or moved: the
        next :meth:`sync_made` fsyncs it. (Said before a change and after it: a thread
        that finds the entry made finds it pending, and a sync that ran in between, too
        early, does not take it off for good.)"""
        with self._lock:
            self._made.add(tuple(folder))

    def sync_made(self) -> int:
        """fsync the folders whose entries this made or moved since their last fsync;
        returns how many. A second caller waits for a sync in progress (it covers what
        that caller made too), so no caller goes on before the names are durable."""
        if not self._made and not self._syncing_made.locked():
            return 0  # (the usual case: nothing made since, and no sync of it under way)
        with self._syncing_made:
            with self._lock:
                made, self._made = self._made, set()
            done = 0
            todo = sorted(made)
            try:
                for parts in todo:
                    try:
                        with self.folder(parts, False) as dfd:
                            os.fsync(dfd)
                    except (FileNotFoundError, PathEscape):
                        pass  # gone, or not ours any more: nothing of ours there to keep
                    done += 1
            except OSError as exc:
                with self._lock:
                    self._made.update(todo[done:])
                raise _error(exc, f"sync the folder {self.path.joinpath(*todo[done])}") from None
            return done

    def root(self, create: bool = False) -> None:
        """Open the folder (made, if ``create``), if it is not open: say now what is
        wrong with it. ``create``: the torrent's files are to be kept there from now on
        (a register, a move), so the folder's name, and each of its parents' names down
        from the root it lies in, is made durable too, whoever made them: a folder left
        unsynced by a process that died (or by ``mkdir -p``) was lost to a power cut,
        with every piece announced in it."""
        with self.held(create):
            if create:
                try:
                    rel = self.path.relative_to(self.anchor).parts
                    dfd = os.open(self.anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    for k, name in enumerate(rel):  # the root, and each folder to the parent
                        try:
                            os.fsync(dfd)
                        except BaseException:
                            os.close(dfd)
                            raise
                        dfd = _walk(dfd, (name,), False, self.anchor.joinpath(*rel[:k]))
                    os.close(dfd)
                except OSError as exc:
                    raise _error(exc, f"sync the folders of {self.path}") from None

    @contextlib.contextmanager
    def held(self, create: bool = False) -> Iterator[int]:
        """The folder's descriptor, open (and made, if ``create``) until the block ends.

        Opened again by its path after it was let go: when the folder first opened is
        not there any more (renamed away, deleted, or replaced behind our back),
        :class:`SaveFolderGone`, until :meth:`close` forgets it."""
        with self._lock:
            if self._fd < 0:
                try:
                    fd = open_folder(self.path, self.anchor, create)
                except PiecedError as exc:
                    if self._ident is None:
                        raise
                    raise SaveFolderGone(f"{self.path} is not there any more, or not as a "
                                         f"folder of ours ({exc})", errno=errno.ENOENT) from None
                try:
                    st = os.fstat(fd)
                except OSError as exc:
                    os.close(fd)
                    raise _error(exc, f"open the save path {self.path}") from None
                if self._ident is None:
                    self._ident = (st.st_dev, st.st_ino)
                elif self._ident != (st.st_dev, st.st_ino):
                    os.close(fd)
                    raise SaveFolderGone(
                        f"{self.path} is not the folder the torrent's files were written in "
                        "(renamed away or replaced behind pieced's back)", errno=errno.ENOENT)
                self._fd = fd
            self._users += 1
            fd = self._fd
        IDLE.busy(self)
        try:
            yield fd
        finally:
            with self._lock:
                self._users -= 1
                idle = not self._users and self._fd >= 0
            if idle:
                IDLE.idle(self)

    def _let_go(self) -> None:
        """Close the descriptor if no one holds it (it is opened again when needed);
        the folder's identity is kept."""
        with self._lock:
            if not self._users and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def close(self) -> None:
        """Close the descriptor and forget the folder: the one at the path is this
        one's from its next use on."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._ident = None
        IDLE.busy(self)

    def in_place(self) -> bool:
        """Whether the folder first opened is still the one at its path: one renamed
        away, or replaced, behind our back is not (writes would go on landing in it,
        under no name the torrent has, or in another folder)."""
        ident = self._ident
        if ident is None:
            return True  # (opened by its path at its next use)
        try:
            here = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == ident

    @contextlib.contextmanager
    def folder(self, parts: Parts, create: bool) -> Iterator[int]:
        """A descriptor of the folder ``parts`` (relative), made if ``create``."""
        with self.held() as root:
            fd = _walk(root, parts, create, self.path, self.changed, owned=False)
        try:
            yield fd
        finally:
            os.close(fd)

    def open(self, parts: Parts, flags: int, create_dirs: bool = False,
             mode: int = 0o644) -> int:
        """Open a payload file: a regular file with one link, or PathEscape. ``mode``:
        a file made by the open gets it (0o755 for an executable)."""
        return self.open_stat(parts, flags, create_dirs, mode)[0]

    def create(self, parts: Parts, flags: int, create_dirs: bool = False,
               mode: int = 0o644) -> tuple[int, os.stat_result] | None:
        """Make a payload file that is not there (``O_CREAT | O_EXCL``), with its
        ``fstat``; None if anything has the name (a symlink too): :meth:`open_stat` it.

        A file made by this very call is new, empty, regular, with one link, and no one
        else has held it: none of :meth:`open_stat`'s checks has anything to find. (Most
        first writes of a download make their file: for a file one folder down, 4 system
        calls where an open of a file found there makes 9.)
        """
        flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            with self.held() as root:
                dfd = _walk(root, parts[:-1], create_dirs, self.path, self.changed, owned=False)
            try:
                self.changed(parts[:-1])  # (before and after: see changed)
                try:
                    fd = os.open(parts[-1], flags, mode, dir_fd=dfd)
                except FileExistsError:
                    return None
                self.changed(parts[:-1])
                try:
                    return fd, os.fstat(fd)
                except BaseException:
                    os.close(fd)
                    raise
            finally:
                os.close(dfd)
        except OSError as exc:
            raise _error(exc, f"make {self.path.joinpath(*parts)}") from None

    def open_stat(self, parts: Parts, flags: int, create_dirs: bool = False,
                  mode: int = 0o644) -> tuple[int, os.stat_result]:
        """:meth:`open`, with the descriptor's ``fstat`` (taken for the checks anyway).

        The link count is read after the open, from the name and from the descriptor,
        both of one inode: read from the descriptor alone it could be 1 because the name
        beneath the save path was swapped away just after the open, leaving a file
        elsewhere (hard-linked in for the moment of the open) as the one we hold.

        This runs once for each file a torrent writes or reads (12,000 of them in a
        torrent of small files): one descriptor walked down from the save path's, the
        path for messages made only for a message.
        """
        name = parts[-1]
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        creating = flags & os.O_CREAT
        try:
            with self.held() as root:
                dfd = _walk(root, parts[:-1], create_dirs, self.path, self.changed, owned=False)
            try:
                if creating:
                    self.changed(parts[:-1])  # (it may make the name)
                try:
                    # O_NONBLOCK: a FIFO put in a payload file's place must not hang the
                    # open (it is refused below, as anything but a regular file is).
                    fd = os.open(name, flags | os.O_NONBLOCK, mode, dir_fd=dfd)
                except BlockingIOError:
                    # A lease on the file (another process's, or a map of ours): wait for
                    # its holder to let go, as any open does. (A FIFO never answers so:
                    # its non-blocking open succeeds.)
                    if lease_met is not None:
                        lease_met()
                    fd = os.open(name, flags, mode, dir_fd=dfd)
                if creating:
                    self.changed(parts[:-1])
                try:
                    named = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    st = os.fstat(fd)
                    why = _refusal(st, named, self.allow_hard_links)
                    if not why and not self.allow_hard_links:
                        # A rename over the name drops the file's link before the name
                        # lets go of it: looked at in that moment, a hard link to a file
                        # outside, being swapped away, shows one link at our name. The
                        # folder's lock waits for a rename in it to finish; name and
                        # count are then looked at again (both looks must pass: a swapper
                        # would have to catch that moment twice, a rename apart).
                        _wait_for_renames(dfd, name)
                        st = os.fstat(fd)
                        why = _refusal(st, os.stat(name, dir_fd=dfd, follow_symlinks=False),
                                       False)
                    if not why:
                        fcntl.fcntl(fd, fcntl.F_SETFL, flags & _SETFL_KEPT)  # O_NONBLOCK off
                except FileNotFoundError:  # swapped away at once: not ours to use
                    why = "changed while being opened"
                except BaseException:
                    os.close(fd)
                    raise
                if why:
                    os.close(fd)
                    raise PathEscape(f"{self.path.joinpath(*parts)} {why}: refusing to use it")
            finally:
                os.close(dfd)
        except PathEscape:
            raise
        except OSError as exc:
            where = self.path.joinpath(*parts)
            if exc.errno == errno.ELOOP:
                raise PathEscape(f"{where} is a symlink: refusing to follow it") from None
            raise _error(exc, f"open {where}") from None
        return fd, st

    def exists(self, parts: Parts) -> bool:
        return self.stat(parts) is not None

    def stat(self, parts: Parts) -> os.stat_result | None:
        """What is at ``parts`` (a symlink itself, not followed); None if nothing."""
        try:
            with self.folder(parts[:-1], False) as dfd:
                return os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except (OSError, PiecedError):  # (the save path itself missing, too)
            return None

    def missing(self, parts: Parts) -> bool:
        """Whether nothing is at ``parts``, or one of its folders is missing (ENOENT):
        an open of it could only fail so. Anything else (a symlink on the way, no
        access, a save path out of reach) is not missing: an open says what it is."""
        try:
            with self.folder(parts[:-1], False) as dfd:
                os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return True
        except (OSError, PiecedError):
            return False
        return False

    def unlink(self, parts: Parts) -> None:
        """Remove a payload file (a symlink in its place is removed, never followed)."""
        with contextlib.suppress(FileNotFoundError), self.folder(parts[:-1], False) as dfd:
            os.unlink(parts[-1], dir_fd=dfd)

    def rmdir(self, parts: Parts) -> None:
        """Remove a folder if it is empty; anything else is left as it is."""
        with contextlib.suppress(OSError, PathEscape), self.folder(parts[:-1], False) as dfd:
            os.rmdir(parts[-1], dir_fd=dfd)

    def link(self, src: Parts, dst_root: Beneath, dst: Parts) -> None:
        """Give a file a second name ``dst`` below ``dst_root`` (possibly this one), never
        replacing what is there: a link on one file system, a copy across two. The new
        name is durable after ``dst_root.sync_made()``."""
        with self.folder(src[:-1], False) as sfd, dst_root.folder(dst[:-1], True) as dfd:
            dst_root.changed(dst[:-1])
            try:
                os.link(src[-1], dst[-1], src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.EPERM and _is_folder(sfd, src[-1]):
                    # (what link() says of a folder: "Operation not permitted")
                    raise IsADirectoryError(errno.EISDIR, "a folder stands where a file of "
                                            "the torrent should be", str(self.path.joinpath(*src))
                                            ) from None
                if exc.errno != errno.EXDEV:
                    raise
                _copy(sfd, src[-1], dfd, dst[-1], self.allow_hard_links,
                      self.path.joinpath(*src))
            dst_root.changed(dst[:-1])

    def drop(self, parts: Parts) -> None:
        """Remove a name :meth:`link` gave another (an error if it is not there)."""
        with self.folder(parts[:-1], False) as dfd:
            self.changed(parts[:-1])
            os.unlink(parts[-1], dir_fd=dfd)
            self.changed(parts[:-1])

    def move(self, src: Parts, dst_root: Beneath, dst: Parts) -> None:
        """Move a file to ``dst`` below ``dst_root`` (possibly this one), never replacing
        what is there. The new name is made durable before the old one goes: with both
        names' folders synced only after (in any order), a power cut between the two
        syncs could leave the file under neither name."""
        self.link(src, dst_root, dst)
        try:
            dst_root.sync_made()
            self.drop(src)
        except BaseException:
            # Not moved after all: the new name goes (the file stays where it was,
            # and the undo of the move, which knows only the files moved, would
            # leave it there in the way of the next move).
            with contextlib.suppress(OSError, PiecedError):
                dst_root.drop(dst)
            raise


def _is_folder(dfd: int, name: str) -> bool:
    """Whether ``name`` in the folder ``dfd`` is a folder (not followed; gone: not)."""
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refusal(st: os.stat_result, named: os.stat_result, allow_hard_links: bool) -> str:
    """Why a payload file opened (``st``, from its descriptor; ``named``, from its name
    after the open) is not to be used, or ""."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
        return "changed while being opened"
    links = max(st.st_nlink, named.st_nlink)
    if links > 1 and not allow_hard_links:
        return f"has {links} hard links (one may lead out of the save path)"
    return ""


def _wait_for_renames(dfd: int, name: str) -> None:
    """Return once a rename or unlink under way in the folder has finished: a rename of
    ``name`` onto itself takes the folder's lock, then does nothing (POSIX: same file,
    no change; the folder's times stay). A read-only file system refuses it before,
    and renames nothing either. (The unlink of a name taken never to be there did the
    same, and deleted the file of that name that a torrent or its user had.)"""
    try:
        os.rename(name, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except FileNotFoundError:
        pass  # gone meanwhile: the looks that follow refuse it
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise


def remove_folder(path: Path, anchor: Path) -> None:
    """Remove the empty folder ``path``, reached from ``anchor`` one component at a
    time, never through a symlink: OSError (or PathEscape) where it cannot be. By its
    name, a parent folder swapped for a symlink meanwhile made it remove a folder of
    the same name elsewhere."""
    dfd = open_folder(path.parent, anchor, False)
    try:
        os.rmdir(path.name, dir_fd=dfd)
    finally:
        os.close(dfd)


def open_folder(path: Path, anchor: Path, create: bool) -> int:
    """A descriptor of folder ``path``, reached from ``anchor`` (which holds it) one
    component at a time, refusing symlinks; the missing folders made if ``create``."""
    try:
        rel = path.relative_to(anchor).parts
        fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except ValueError:
        raise PathEscape(f"{path} is not inside {anchor}") from None
    except OSError as exc:
        raise _error(exc, f"open {anchor}") from None
    made: list[Parts] = []
    try:
        out = _walk(fd, rel, create, anchor, made.append)
    except OSError as exc:
        raise _error(exc, f"open the save path {path}") from None
    try:
        for parts in made:  # the folders made, durable before anything is kept in them
            dfd = _walk(os.open(anchor, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
                        parts, False, anchor)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return out
    except (OSError, PathEscape) as exc:
        os.close(out)
        if isinstance(exc, PathEscape):
            raise
        raise _error(exc, f"open the save path {path}") from None


def folder_below(fd: int, parts: Parts, base: Path) -> int:
    """A descriptor of the folder ``parts`` below the open folder ``fd`` (``base``, as
    named in errors), walked one component at a time, never through a symlink."""
    try:
        return _walk(fd, parts, False, base, owned=False)
    except OSError as exc:
        raise _error(exc, f"open {base.joinpath(*parts)}") from None


def anchor_of(path: Path, roots: Sequence[Path] | None) -> Path:
    """The root a resolved save path lies in (``/`` when ``roots`` is None: anywhere),
    or PathEscape naming the roots."""
    if roots is None:
        return Path(path.anchor or "/")
    for r in roots:
        if path.is_relative_to(r):
            return r
    allowed = ", ".join(str(r) for r in roots)
    raise PathEscape(f"save path {path} is outside the allowed roots ({allowed})")


def _walk(fd: int, parts: Parts, create: bool, base: Path,
          making: Callable[[Parts], None] | None = None, owned: bool = True) -> int:
    """Down from the folder ``fd`` through ``parts``, one ``openat`` a component, never
    through a symlink. ``fd`` is taken (closed here, or returned moved on) if ``owned``;
    else it is left open and a descriptor of its own is returned. ``making`` is told of
    each folder (a prefix of ``parts``) in which one is about to be made."""
    if not owned and not parts:
        return os.dup(fd)
    mine = fd if owned else -1  # the descriptor this call holds (closed when moved on)
    try:
        for i, name in enumerate(parts):
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                if making is not None:
                    making(parts[:i])
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                    if making is not None:
                        making(parts[:i])
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = base.joinpath(*parts[: i + 1])
                    raise PathEscape(f"{where} is not a folder (a symlink or a file): "
                                     "refusing to go through it") from None
                raise
            if mine >= 0:
                os.close(mine)
            fd = mine = nxt
    except BaseException:
        if mine >= 0:
            os.close(mine)
        raise
    return fd


def part_name(name: str) -> str:
    """The name a copy across file systems is made under, beside its final name: only a
    whole copy, synced, ever has the final name (a half copy left by a crash must not be
    taken for the file)."""
    return ".pieced-part-" + hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _copy(sfd: int, src: str, dfd: int, dst: str, allow_hard_links: bool,
          where: Path) -> None:
    """Copy a payload file to another file system: only what an open of it for use
    would take (a regular file, with one link unless hard links are allowed; a FIFO
    put in its place must not hang the move, a hard link must not bring in a file from
    outside the save path)."""
    part = part_name(dst)
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=sfd)
    try:
        st = os.fstat(fin)
        why = _refusal(st, os.stat(src, dir_fd=sfd, follow_symlinks=False), allow_hard_links)
        if why:
            raise PathEscape(f"{where} {why}: refusing to move it")
        fcntl.fcntl(fin, fcntl.F_SETFL, os.O_RDONLY)  # O_NONBLOCK off
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part, dir_fd=dfd)  # one a crash left
        fout = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       st.st_mode & 0o777, dir_fd=dfd)  # (an executable stays one)
        try:
            _copy_bytes(fin, fout, st.st_size)
            # Its times kept, as mv keeps them: a start after a crash in the middle of a
            # move knows the copy from its stamp (size, modification time).
            os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fout)
            os.link(part, dst, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(fout)
            with contextlib.suppress(OSError):
                os.unlink(part, dir_fd=dfd)
        os.fsync(dfd)  # the copy's name durable before the original's goes
    finally:
        os.close(fin)


def _copy_bytes(fin: int, fout: int, size: int) -> None:
    """Copy a file's data, leaving its holes holes: a download under way is mostly
    holes (its file sized at once, sparse), and copied whole it took its full length on
    the other file system, or failed there for want of room (ENOSPC) where its data
    would have fitted. As libtorrent does: each range of data (SEEK_DATA to SEEK_HOLE),
    the file given its length first; the whole where the file system cannot tell."""
    os.ftruncate(fout, size)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fin, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole from here to the end
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _copy_range(fin, fout, pos, size)
            return
        if start >= size:
            return
        end = min(os.lseek(fin, start, os.SEEK_HOLE), size)
        _copy_range(fin, fout, start, end)
        pos = end


def _copy_range(fin: int, fout: int, start: int, end: int) -> None:
    """Bytes [start, end) in the kernel: copy_file_range, or sendfile where the two file
    systems are of different kinds (copy_file_range refuses those, EXDEV, since Linux
    5.19)."""
    done = start
    ranged = True
    while done < end:
        if ranged:
            try:
                n = os.copy_file_range(fin, fout, end - done, done, done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                ranged = False
                continue
        else:
            os.lseek(fout, done, os.SEEK_SET)  # sendfile writes at the file position
            n = os.sendfile(fout, fin, done, end - done)
        if n == 0:
            raise OSError(errno.EIO, f"copy ended at byte {done} of {end}")
        done += n


def _error(exc: OSError, what: str) -> StorageIOError:
    return StorageIOError.wrap(exc, what)


__all__ = ["Beneath", "Parts", "SaveFolderGone", "anchor_of", "open_folder"]
