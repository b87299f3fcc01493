"""``pieced run``: the daemon's life cycle.

Start: settings, engine, socket (ours, or systemd's), HTTP, READY. Run until
SIGTERM/SIGINT. Stop: STOPPING, stop reading from clients, let every queued
request finish, flush and fdatasync everything, close. Nothing verified is lost
on a clean stop because the engine records a piece only after its sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import itertools
import logging
import logging.handlers
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from aiohttp import web
from pieced.config.descriptors import raise_open_files
from pieced.config.settings import Settings, exposure_problem
from pieced.storage import paths
from pieced.storage.disk import DiskIO
from pieced.storage.paths import IDLE_FOLDERS
from pieced.storage.resume import make_folders

from . import systemd
from .http import (
    HTTP_SHUTDOWN_SECONDS,
    KEEPALIVE_SECONDS,
    MAX_CONNECTIONS,
    MAX_HEADERS,
    guard_connections,
    make_app,
)
from .server import Observer, Server

log = logging.getLogger("pieced")


# sun_path of struct sockaddr_un: a longer path cannot be bound (nor connected to).
UNIX_PATH_MAX = 108


def socket_path_problem(settings: Settings) -> str | None:
    """The kernel says only "AF_UNIX path too long": the setting, the path and the limit
    tell what to change (a deep working folder makes a relative ``socket`` long)."""
    size = len(os.fsencode(settings.socket))
    if size <= UNIX_PATH_MAX:
        return None
    return (f"pieced: 'socket' = {settings.socket!r} is {size} bytes long: a Unix socket path "
            f"may have at most {UNIX_PATH_MAX} (AF_UNIX); set a shorter socket path")


def make_state_dir(settings: Settings) -> None:
    """The state folder, made if it is missing; a start that cannot have it names the
    setting and says why (it said only "[Errno 20] Not a directory: '.../torrents'",
    of a folder of its own inside a file)."""
    path = Path(settings.state_dir)
    try:
        make_folders(path)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is in the way")
    except OSError as exc:
        raise SystemExit(f"pieced: 'state_dir' = {settings.state_dir!r}: cannot make the "
                         f"folder: {exc.strerror or exc}") from None


def bind_socket(settings: Settings) -> socket.socket:
    """The daemon's listening socket at ``settings.socket``; a stale one there (no one
    listening) is replaced. A start refused here names the socket and says why (a
    socket's bind and connect errors name no file)."""
    path = Path(settings.socket)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = ("a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError))
               else exc.strerror or exc)
        raise SystemExit(f"pieced: socket {path}: cannot make its folder {path.parent}: "
                         f"{why}") from None
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SystemExit(f"pieced: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise SystemExit(f"pieced: another daemon is listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()
        except PermissionError:
            raise SystemExit(f"pieced: socket {path}: this user may not connect to it, to "
                             "see whether a daemon listens there (another user's daemon "
                             "may): choose another socket, or remove it if it is stale"
                             ) from None
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o777 & ~settings.socket_mode)  # never world-accessible, even briefly
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"pieced: socket {path}: cannot bind it: "
                         f"{exc.strerror or exc}") from None
    finally:
        os.umask(old)
    try:
        os.chmod(path, settings.socket_mode)
        if settings.socket_group:
            try:
                gid = grp.getgrnam(settings.socket_group).gr_gid
            except KeyError:
                text = settings.socket_group  # a number is a gid, as chown takes
                if not (text.isascii() and text.isdigit() and int(text) < 0xFFFFFFFF):
                    raise SystemExit(f"pieced: socket_group {text!r}: no such group") from None
                gid = int(text)
            try:
                os.chown(path, -1, gid)
            except PermissionError:
                raise SystemExit(f"pieced: socket_group {settings.socket_group!r}: this "
                                 "user may not give its socket to that group (it is not "
                                 "a member)") from None
            _warn_folders_shut(path.parent, gid, settings.socket_group)
        sock.listen(128)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)  # not left behind for the next start to trip on
        raise
    return sock


def _warn_folders_shut(folder: Path, gid: int, group: str) -> None:
    """Said when a folder on the way to the socket lets no member of its group through
    (a state folder made under umask 077 holds it, by default): the socket's mode and
    group alone do not let them in."""
    for f in (folder, *folder.parents):
        try:
            st = f.stat()
        except OSError:
            return
        through = st.st_mode & (stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH)
        if not through:
            log.warning("socket_group %s: the folder %s (mode %#o) lets no member of the "
                        "group through to the socket", group, f, stat.S_IMODE(st.st_mode))
            return


# Seconds a start may go on from each word that it is still loading saved torrents
# (systemd's EXTEND_TIMEOUT_USEC, said every second): a library that took longer to load
# than TimeoutStartSec (90 s unless set) had the service killed as it started, over and
# over. A load that stops moving is still given up on that long after its last word.
LOAD_EXTEND_SECONDS = 90


def _loading_told() -> Callable[[int, int], None]:
    """What the engine tells of its load, said to the service manager once a second."""
    told = -1.0

    def tell(done: int, total: int) -> None:
        nonlocal told
        now = time.monotonic()
        if now - told < 1.0:
            return
        told = now
        status = (f"loading saved torrents: {done} of {total}" if total
                  else "reading saved torrents")
        systemd.notify(f"EXTEND_TIMEOUT_USEC={LOAD_EXTEND_SECONDS * 1_000_000}\n"
                       f"STATUS={status}")

    return tell


def make_disk(settings: Settings, observer: Observer | None = None) -> DiskIO:
    return DiskIO(
        settings.backend,
        cache_bytes=settings.cache_bytes,
        cache_policy=settings.cache_policy,
        hash_workers=settings.hash_workers or None,
        max_open_files=settings.max_open_files,
        preallocate=settings.preallocate,
        allow_hard_links=settings.allow_hard_links,
        sync_window=settings.sync_window_ms / 1000,
        roots=[Path(r) for r in settings.roots],
        state_dir=Path(settings.state_dir),
        max_partial_pieces=settings.max_partial_pieces,
        on_piece=observer.piece if observer is not None else None,
        on_error=observer.disk_error if observer is not None else None,
        on_change=observer.changed if observer is not None else None,
        metainfo_limits=settings.metainfo_limits(),
        on_load=_loading_told(),
    )


def socket_name(sock: socket.socket) -> str:
    """Where a listening socket is bound, as a client would name it."""
    name = sock.getsockname()
    if isinstance(name, bytes):  # the abstract namespace: '@' as systemd writes it
        return "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else repr(name)
    if isinstance(name, str):
        return name or "(an unnamed socket)"
    return ":".join(map(str, name[:2]))


def warn_missing_roots(settings: Settings) -> None:
    """A root that is not there is not refused (a mount may come later), but every save
    path below it is refused until it is: the log says so at once, not at each add."""
    for root in settings.roots:
        try:
            if not stat.S_ISDIR(os.stat(root).st_mode):
                log.warning("roots: %s is not a folder: no save path can lie below it", root)
        except FileNotFoundError:
            log.warning("roots: %s does not exist: every save path below it is refused "
                        "until it does", root)
        except OSError as exc:
            log.warning("roots: %s cannot be reached (%s): every save path below it is "
                        "refused until it can", root, exc.strerror or exc)


def passed_socket_problem(sock: socket.socket) -> str | None:
    """What is wrong with the socket the service manager passed, for this daemon: a TCP
    socket would serve its whole protocol, credentials unchecked, to the network; one
    not listening fails every accept."""
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        return f"the socket passed (LISTEN_FDS) cannot be used: {exc.strerror or exc}"
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        return ("the socket passed (LISTEN_FDS) must be a listening Unix stream socket "
                f"(ListenStream=/path), not {sock.family.name} {sock.type.name}"
                + ("" if listening else ", not listening"))
    return None


def warn_open_socket(settings: Settings, passed: bool) -> None:
    """A socket_mode that lets other users in, with no allow list behind it: any local
    user may register, write and remove torrents. Allowed (the operator may mean it),
    but said, since the mode is the only gate then."""
    # (Connecting to a Unix socket takes its write bit: 0o664 lets no other user in.)
    if (not passed and settings.socket_mode & 0o002 and not settings.allow_uids
            and not settings.allow_gids):
        log.warning("socket_mode %#o lets every local user use this daemon (register, "
                    "write, remove torrents): allow_uids and allow_gids are empty",
                    settings.socket_mode)


async def serve(settings: Settings, http_connections: int = MAX_CONNECTIONS) -> None:
    settings = settings.resolved()
    problem = exposure_problem(settings)
    if problem:
        raise SystemExit(f"pieced: {problem}")
    # Taken before the state is made or read: a socket path that cannot be bound stops
    # the start at once, and one passed by the service manager makes it irrelevant.
    passed = systemd.listen_fds()
    if passed:
        problem = passed_socket_problem(passed[0])
        if problem:
            raise SystemExit(f"pieced: {problem}")
    else:
        problem = socket_path_problem(settings)
        if problem:
            raise SystemExit(problem)
    warn_missing_roots(settings)
    warn_open_socket(settings, bool(passed))
    make_state_dir(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # A hang-up (a closed terminal; `kill -HUP`) stops cleanly too: nothing is to be
    # reloaded, and dying of it would skip the drain and the clean mark. Taken before the
    # state is loaded: a stop asked for during a long start-up (systemd's, at its start
    # timeout) is carried out once the start-up is over, not by dying in the middle of it.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    observer = Observer()
    # The socket before the state: a start refused there (another daemon listening, a
    # socket_group that does not exist) leaves the state as the last stop left it.
    listener = passed[0] if passed else bind_socket(settings)
    bound = None if passed else _identity(Path(settings.socket))

    def unbind() -> None:
        if bound is not None:
            _unlink_if(Path(settings.socket), bound)
        listener.close()

    try:
        disk = make_disk(settings, observer)
    except BaseException:
        unbind()
        raise
    # From here a start that fails closes the engine: loaded, its state is marked in use
    # until it is closed, and left so it reads at the next start as a crash's, whose
    # checks take files changed while it was stopped on trust.
    server: Server | None = None
    runner: web.AppRunner | None = None
    try:
        for problem in disk.load_errors:
            log.warning("%s", problem)
        server = Server(
            disk,
            ring_bytes=settings.client_buffer_bytes,
            max_frame=settings.max_frame_bytes,
            workers=settings.io_workers or None,
            max_clients=settings.max_clients,
            max_ring=settings.max_ring_bytes,
            allow_uids=set(settings.allow_uids) or None,
            allow_gids=set(settings.allow_gids) or None,
            observer=observer,
            handshake_timeout=settings.handshake_timeout_ms / 1000,
            frame_timeout=settings.frame_timeout_ms / 1000,
            max_unsent=settings.max_unsent_bytes,
        )
        server.start(listener)
        runner = web.AppRunner(make_app(disk, server, settings.http_token), access_log=None,
                               keepalive_timeout=KEEPALIVE_SECONDS,
                               shutdown_timeout=HTTP_SHUTDOWN_SECONDS,
                               max_headers=MAX_HEADERS)
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        try:
            await site.start()
        except OSError as exc:  # the port is taken, the host unknown: say so, leave nothing
            raise SystemExit(f"pieced: cannot serve HTTP on {settings.http_host}:"
                             f"{settings.http_port}: {exc.strerror or exc}") from None
    except BaseException:
        if server is not None:
            await server.close()
        if runner is not None:
            await runner.cleanup()
        await loop_executor(disk.close)
        unbind()
        raise
    http_port = runner.addresses[0][1] if runner.addresses else settings.http_port

    watchdog = systemd.watchdog_interval()
    pinger = asyncio.create_task(_watchdog(watchdog)) if watchdog else None
    assert runner.server is not None
    guard = guard_connections(runner.server, http_connections)

    systemd.notify("READY=1\nSTATUS=serving")
    # The socket in use: under socket activation the one passed, not the configured one.
    where = (f"{socket_name(listener)} (passed by the service manager)" if passed
             else settings.socket)
    host = f"[{settings.http_host}]" if ":" in settings.http_host else settings.http_host
    listening = (f"listening on {where} and http://{host}:{http_port}"
                 f" (backend {settings.backend})")
    log.info("%s", listening)
    # One line on stdout that scripts (and the tests) can wait for.
    try:
        print(f"pieced: {listening}", flush=True)
    except (OSError, ValueError) as exc:
        # Standard output full (a file on a full disk), closed or gone: nothing for the
        # daemon to stop for (it stopped, its socket left behind). What it would write
        # there goes nowhere from now on; the log has the line.
        log.warning("standard output cannot be written (%s): sent to /dev/null", exc)
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
    await stop.wait()

    systemd.notify("STOPPING=1\nSTATUS=flushing")
    log.info("stopping: draining clients and flushing")
    if pinger:
        pinger.cancel()
    guard.cancel()
    disk.stop_checks()  # a recheck under way ends now, not when it is done
    await server.close()
    await runner.cleanup()
    await loop.run_in_executor(None, disk.close)
    if bound is not None:
        _unlink_if(Path(settings.socket), bound)
    listener.close()
    log.info("stopped")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unlink_if(path: Path, identity: tuple[int, int]) -> None:
    """Remove the daemon's socket file if it is still the one it bound: one put there
    since (removed and bound again by another daemon) is that daemon's, whose clients
    would find no socket."""
    if _identity(path) == identity:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def loop_executor(fn: Callable[[], None]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, fn)


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _bound_malloc() -> None:
    """Piece-sized buffers (staged pieces, cached pieces, reads) come and go by the
    thousand. glibc raises its mmap threshold after the first such buffer is freed and
    then serves them from per-thread heaps that fragment: RSS drifts far above the
    cache budget. A fixed threshold keeps them mmapped, returned to the kernel on free."""
    import ctypes

    m_mmap_threshold = -3
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
        ctypes.CDLL(None).mallopt(m_mmap_threshold, 64 * 1024)


class _BadRequestsBriefly(logging.Filter):
    """aiohttp logs a request it cannot parse (a URL of 10,000 bytes, a bad header) at
    ERROR, with a traceback: any HTTP client could fill the log so. Such a request is
    told 400 and logged at DEBUG in one line; the errors of our own handlers stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "bad HTTP request: %s", (exc,)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
        return True


# Descriptors a client may hold: its socket, its ring's three (the memfd, a description
# of our own to probe it, the map's), 4 received and not yet taken.
FDS_PER_CLIENT = 8
# Held besides payload files, clients, HTTP connections and idle save folders: the
# state folder's files, a journal being appended to, the listening sockets, the event
# loop's, the log (about 20 at rest).
FDS_BASE = 64
# HTTP connections (at most MAX_CONNECTIONS) and save folders kept open idle (at most
# IDLE_FOLDERS) take these shares of a low limit.
HTTP_SHARE, FOLDERS_SHARE = 8, 16
FDS_RESERVED = FDS_BASE + MAX_CONNECTIONS + IDLE_FOLDERS  # under a limit of 1,024 or more


def _shares(limit: int) -> tuple[int, int, int]:
    """(HTTP connections, idle save folders, room for files and clients) of a limit."""
    http = max(4, min(MAX_CONNECTIONS, limit // HTTP_SHARE))
    folders = max(4, min(IDLE_FOLDERS, limit // FOLDERS_SHARE))
    return http, folders, limit - FDS_BASE - http - folders


class Fitted(NamedTuple):
    settings: Settings
    http_connections: int
    idle_folders: int


def fit_descriptors(settings: Settings, limit: int) -> Fitted:
    """``max_open_files`` and ``max_clients`` lowered to fit the descriptor limit, and
    under a low one the HTTP connections and idle save folders held: past it, idle
    clients took the last descriptors, and other clients' writes failed with EMFILE
    (recorded as their torrents' errors) while new clients waited unanswered in the
    backlog; under a few hundred, save folders and HTTP connections took them all, and
    no client could connect at all. Within it, a client over ``max_clients`` is refused
    at once. A limit too low for a client and a file stops the start, saying so."""
    http, folders, room = _shares(limit)
    if room < 2 + FDS_PER_CLIENT:
        least = next(n for n in itertools.count(limit) if _shares(n)[2] >= 2 + FDS_PER_CLIENT)
        raise SystemExit(f"pieced: {limit} descriptors allowed (RLIMIT_NOFILE): the daemon "
                         f"needs {least} at least (raise LimitNOFILE, or ulimit -n)")
    files = max(1, min(settings.max_open_files, room // 2))
    clients = max(1, min(settings.max_clients, (room - files) // FDS_PER_CLIENT))
    if (files, clients) != (settings.max_open_files, settings.max_clients):
        lowered = [f"{name} {was} -> {now}" for name, was, now in (
            ("max_open_files", settings.max_open_files, files),
            ("max_clients", settings.max_clients, clients)) if was != now]
        log.warning("%d descriptors allowed (RLIMIT_NOFILE): %s, HTTP connections %d, idle "
                    "save folders %d (raise LimitNOFILE to have them back)", limit,
                    ", ".join(lowered), http, folders)
        settings = replace(settings, max_open_files=files, max_clients=clients)
    return Fitted(settings, http, folders)


class _OneLine(logging.Formatter):
    """One line per record, in the file as in the journal: a traceback or a name with a
    newline in it would otherwise read as several records, the later ones without a
    time."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


class _LogFile(logging.handlers.WatchedFileHandler):
    """The log file. A record it cannot take (its disk full, its file system gone
    read-only) is said once on stderr, where every record goes too, and again when the
    file takes records again; logging's own way printed a traceback for each record
    that failed, a dozen a minute on a full disk, to the one place left to read."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self._failing = False
        self._failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        try:
            super().emit(record)
        except Exception:  # (the reopen of a file moved away or gone raises past
            self.handleError(record)  # logging's own handling, out of any log call)
        if self._failing and not self._failed_now:
            self._failing = False
            self._say(f"pieced: log_file {self.baseFilename!r}: written to again")

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)  # a record that cannot be formatted: a bug, said so
            return
        self._failed_now = True
        if not self._failing:
            self._failing = True
            self._say(f"pieced: log_file {self.baseFilename!r}: cannot write to it: "
                      f"{exc.strerror or exc} (records go to stderr alone until it can be "
                      "written again)")

    @staticmethod
    def _say(line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()


def setup_logging(settings: Settings) -> None:
    """stderr (what journald collects under systemd), and ``log_file`` when it is set:
    appended to, its folder made if missing. A file that cannot be opened stops the
    start, naming it, rather than leaving a daemon whose log goes nowhere expected."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if settings.log_file:
        path = Path(settings.log_file)
        try:
            # Made durably: by default this is the state folder, made here first.
            make_folders(path.parent)
            # Reopened when moved away or deleted (logrotate), not written into for ever.
            handlers.append(_LogFile(path))
        except OSError as exc:
            raise SystemExit(f"pieced: log_file {str(path)!r}: cannot open it: "
                             f"{exc.strerror or exc}") from None
    formatter = _OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=settings.log_level.upper(), handlers=handlers)


def run(settings: Settings) -> None:
    _bound_malloc()
    soft = raise_open_files()
    settings = settings.resolved()
    setup_logging(settings)
    logging.getLogger("aiohttp.server").addFilter(_BadRequestsBriefly())
    http_connections = MAX_CONNECTIONS
    if soft is not None:
        settings, http_connections, paths.IDLE.limit = fit_descriptors(settings, soft)
    import uvloop

    uvloop.run(serve(settings, http_connections))
