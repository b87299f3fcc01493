"""Error types with stable numeric codes.

The storage engine raises these, the daemon puts ``code`` and ``message`` on the
wire, and the client library turns them back into the same classes with
:func:`error_from_code`. Storage is the lowest layer, so the one definition lives
here and everything above imports it.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

class ErrorCode(IntEnum):
    """Codes are part of the wire protocol: never renumber, only append."""

    INTERNAL = 1
    BAD_REQUEST = 2
    BAD_METAINFO = 3
    UNKNOWN_TORRENT = 4
    ALREADY_REGISTERED = 5
    OUT_OF_RANGE = 6
    PATH_ESCAPE = 7
    IO_ERROR = 8
    PROTOCOL = 9
    TOO_LARGE = 10
    ACCESS_DENIED = 11
    CONFIG = 12
    NO_HASHES = 13


class PiecedError(Exception):
    """Base of every error pieced reports; ``code`` says which kind it is."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno
        self.others = 0  # further errors of the same burst (pipelined writes), if any
        # A write's error, as the client library raises it: the write it answered,
        # (info_hash, piece, begin, length); and on the first error of a burst, the
        # others, in order, so that a caller can tell each refused block. (Never the
        # error itself: a cycle would keep it, and every frame its traceback holds, until
        # the garbage collector ran; a daemon refusing large registers grew by gigabytes.)
        self.block: tuple[bytes, int, int, int] | None = None
        self.further: list[PiecedError] = []

    @property
    def kind(self) -> str:
        """Lower-case name of the code, used as the ``kind`` label on /metrics."""
        return self.code.name.lower()

    def __str__(self) -> str:
        if self.errno is not None:
            name = _errno.errorcode.get(self.errno, str(self.errno))
            return f"{self.message} [{name}]"
        return self.message


class BadRequest(PiecedError):
    code = ErrorCode.BAD_REQUEST


class BadMetainfo(PiecedError):
    code = ErrorCode.BAD_METAINFO


class UnknownTorrent(PiecedError):
    code = ErrorCode.UNKNOWN_TORRENT


class AlreadyRegistered(PiecedError):
    code = ErrorCode.ALREADY_REGISTERED


class OutOfRange(PiecedError):
    code = ErrorCode.OUT_OF_RANGE


class PathEscape(PiecedError):
    code = ErrorCode.PATH_ESCAPE


class StorageIOError(PiecedError):
    """A disk error; ``errno`` carries the OS error number (ENOSPC, EIO, ENOENT...)."""

    code = ErrorCode.IO_ERROR

    @classmethod
    def wrap(cls, exc: OSError, what: str) -> StorageIOError:
        return cls(f"{what}: {exc.strerror or exc}", errno=exc.errno)


class PieceChanged(StorageIOError):
    """A verified piece's bytes on disk are not those verified any more (changed behind
    the daemon's back): the piece is verified no more, to be fetched again; nothing
    else of the torrent's storage is known to be wrong. Reported with EIO, and marked
    ``changed`` in the torrent's errors and its ``disk_error`` event, so that a client
    that stops on errors of its files tells this one apart (as a recheck that fails a
    piece stops no one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno=_errno.EIO)


class ProtocolError(PiecedError):
    code = ErrorCode.PROTOCOL


class TooLarge(PiecedError):
    code = ErrorCode.TOO_LARGE


class AccessDenied(PiecedError):
    code = ErrorCode.ACCESS_DENIED


class ConfigError(PiecedError):
    code = ErrorCode.CONFIG


class NoHashes(PiecedError):
    """The torrent has no hashes of the asked kind (v2 check on a v1 torrent...)."""

    code = ErrorCode.NO_HASHES


_BY_CODE: dict[int, type[PiecedError]] = {
    cls.code: cls
    for cls in (
        PiecedError,
        BadRequest,
        BadMetainfo,
        UnknownTorrent,
        AlreadyRegistered,
        OutOfRange,
        PathEscape,
        StorageIOError,
        ProtocolError,
        TooLarge,
        AccessDenied,
        ConfigError,
        NoHashes,
    )
}


def detached(exc: E) -> E:
    """``exc``, to be kept and said or raised later: without the traceback and the
    chained errors that tie it to the frames it went through. Kept in a local of one of
    them (or in anything such a local holds), it makes a cycle that holds them all, and
    whatever they hold (a metainfo, a client's receive ring, a batch of pieces read),
    until a full garbage collection, which a busy daemon runs seldom."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


def error_from_code(code: int, message: str, errno: int | None = None) -> PiecedError:
    """Rebuild the typed error a peer reported; unknown codes become PiecedError."""
    cls = _BY_CODE.get(code, PiecedError)
    err = cls(message, errno=errno)
    if cls is PiecedError and code != ErrorCode.INTERNAL:
        err.code = ErrorCode.INTERNAL
    return err
