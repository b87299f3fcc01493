"""The ``pieced`` command.

Imports are deferred into each command: ``pieced verify`` is often run on big
data in scripts, and start-up time counts against it, so it must not pay for
the daemon's event loop, HTTP server or metrics.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pieced.config.args import positive_int

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
#: The largest .torrent `pieced add` reads: the most max_metainfo_bytes may be set to.
MAX_METAINFO_READ = 1 << 30


class ProgressBar:
    """A one-line progress bar on a terminal; silent when the stream is not one."""

    line_open = False  # a bar is drawn and its line not ended: a message starts a new one

    def __init__(self, total: int, unit_bytes: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.unit_bytes = unit_bytes
        # (None when standard error is closed: no bar then)
        self.stream: TextIO | None = sys.stderr if stream is None else stream
        self.enabled = self.stream is not None and self.stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        stream = self.stream
        if not self.enabled or stream is None:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        frac = done / total if total else 1.0
        width = 30
        fill = int(frac * width)
        rate = done * self.unit_bytes / max(now - self.start, 1e-9) / 2**20
        stream.write(
            f"\r[{'#' * fill}{'.' * (width - fill)}] {frac:6.1%} {done}/{total} pieces"
            f" {rate:8.1f} MiB/s"
        )
        ProgressBar.line_open = done < total
        if done >= total:
            stream.write("\n")
        stream.flush()


def cmd_verify(args: argparse.Namespace) -> int:
    from pieced.config.descriptors import raise_open_files
    from pieced.config.settings import metainfo_limits
    from pieced.storage.errors import ConfigError, PiecedError
    from pieced.storage.hashing import HashPool
    from pieced.storage.layout import Layout
    from pieced.storage.metainfo import parse, read_metainfo
    from pieced.storage.verify import FolderFiles, ReadAhead, Unreadable, verify

    try:  # the daemon's limits on a .torrent: what it takes, this checks
        limits = metainfo_limits(Path(args.config) if args.config else None)
    except ConfigError as exc:
        print(f"pieced verify: configuration error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        meta = parse(read_metainfo(args.torrent, limits["max_bytes"]), **limits)
    except OSError as exc:
        print(f"pieced verify: cannot read {args.torrent}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except PiecedError as exc:
        print(f"pieced verify: {args.torrent}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    data = Path(args.data)
    if not data.is_dir():
        print(f"pieced verify: --data {data} is not a directory", file=sys.stderr)
        return EXIT_BAD_INPUT

    started = time.monotonic()
    pool = HashPool(args.threads)
    limit = raise_open_files()
    # (Each reading thread may hold one more file open: a file in use is not closed.)
    files = FolderFiles(meta, data, Layout(meta), descriptors=None if limit is None else
                        limit - pool.workers - ReadAhead.READERS)
    bar = ProgressBar(meta.num_pieces, meta.piece_length)
    try:
        result = verify(meta, files.reader(), pool, bar)
    except Unreadable as exc:  # not a piece found wrong: nothing can be said of them
        _complain(f"pieced verify: {exc}")
        return EXIT_BAD_INPUT
    finally:
        pool.shutdown()
        files.close()
    elapsed = time.monotonic() - started
    unchecked = meta.v2_unchecked()  # (a hybrid without piece layers: v1 checks them)

    refused = [{"path": str(path), "reason": why} for path, why in sorted(files.refused.items())]
    report = {
        "name": meta.name,
        "info_hash_v1": meta.info_hash_v1.hex() if meta.info_hash_v1 else None,
        "info_hash_v2": meta.info_hash_v2.hex() if meta.info_hash_v2 else None,
        "num_pieces": meta.num_pieces,
        "piece_length": meta.piece_length,
        "total_size": meta.total_size,
        "failed_v1": result.failed_v1,
        "failed_v2": result.failed_v2,
        "unchecked_v2": unchecked,
        "refused": refused,
        "ok": result.ok,
        "seconds": round(elapsed, 4),
    }
    failed = sorted(set(result.failed_v1 or []) | set(result.failed_v2 or []))
    human = [f"{_shown(meta.name)}: {meta.num_pieces - len(failed)}/{meta.num_pieces} pieces verify"]
    if result.failed_v1 is not None:
        human.append(f"  v1 failed: {_ranges(result.failed_v1) or 'none'}")
    if result.failed_v2 is not None:
        human.append(f"  v2 failed: {_ranges(result.failed_v2) or 'none'}")
    if unchecked:
        human.append(f"  v2 not checked (the metainfo has no piece layers for them): "
                     f"{_ranges(unchecked)}")
    for entry in refused:
        human.append(f"  not read: {_shown(entry['path'])}: {entry['reason']}")
    _print(args, report, "\n".join(human))
    return EXIT_OK if result.ok else EXIT_FAILED


def _ranges(pieces: list[int]) -> str:
    """'1-3, 7' for [1, 2, 3, 7]: long failure lists stay readable."""
    out: list[str] = []
    for p in pieces:
        if out and out[-1].split("-")[-1] == str(p - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
    return ", ".join(out)


def cmd_run(args: argparse.Namespace) -> int:
    from pieced.config.settings import load
    from pieced.storage.errors import ConfigError

    from .main import run

    overrides = {
        "socket": args.socket, "state_dir": args.state_dir, "http_port": args.http_port,
        "http_host": args.http_host, "backend": args.backend, "cache_bytes": args.cache_bytes,
    }
    try:
        settings = load(Path(args.config) if args.config else None, overrides=overrides)
    except ConfigError as exc:
        print(f"pieced: configuration error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        run(settings)
    except SystemExit as exc:  # a start-up refusal, already worded
        if isinstance(exc.code, str):
            _refused(exc.code)
            return EXIT_BAD_INPUT
        raise
    except OSError as exc:  # the state folder or socket path unusable, ...
        _refused(f"pieced run: {exc}")
        return EXIT_BAD_INPUT
    return EXIT_OK


def _refused(message: str) -> None:
    """A start-up refusal on stderr, and in the log file too once logging is set up
    (whose handlers write to stderr already): an operator reading the log finds why the
    daemon is not running, not only its last start-up lines."""
    import logging

    if logging.getLogger().handlers:  # (whose lines name the logger "pieced" already)
        logging.getLogger("pieced").critical("%s", message.removeprefix("pieced: "))
    else:
        print(message, file=sys.stderr)


class Unreachable(Exception):
    """The daemon's socket could not be reached, or the connection to it broke."""


def _client(args: argparse.Namespace) -> Any:
    from pieced.protocol.client import Client

    try:
        return Client(args.socket)
    except (OSError, ConnectionError) as exc:  # no such socket, not a socket, a bad path,
        raise Unreachable(f"cannot reach the daemon at {args.socket}: {exc}") from None


def _ih_arg(text: str) -> bytes:
    """An info_hash as given on the command line: 40 hex digits, or the 64 of a v2
    info_hash (which the daemon knows by its first 20 bytes, as BEP 52 and libtorrent)."""
    from pieced.storage.errors import BadRequest

    if not re.fullmatch(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}", text):
        raise BadRequest(f"{text!r} is not an info_hash (40 hex digits, or 64 for v2)")
    return bytes.fromhex(text)[:20]


def _known(c: Any, text: str) -> bytes:
    """The daemon's key for an info_hash given on the command line; a 64-digit one must
    be the torrent's whole v2 hash, not only start as it does (``rm`` would remove it)."""
    from pieced.storage.errors import UnknownTorrent

    ih = _ih_arg(text)
    if len(text) == 64 and (c.status(ih, files=False).get("info_hash_v2") or "") != text.lower():
        raise UnknownTorrent(f"unknown info_hash {text.lower()}")
    return ih


def _shown(text: str) -> str:
    """A name from a .torrent, for a terminal: control characters (an escape sequence
    that clears the screen or retitles it, a newline that forges a line) as escapes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class Unwritten(Exception):
    """The report could not be written to standard output (a full disk, /dev/full)."""


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    if sys.stdout is None:  # (started with it closed)
        raise Unwritten("standard output is closed")
    try:
        if args.json:
            json.dump(data, sys.stdout, default=_jsonable)
            sys.stdout.write("\n")
        else:
            print(human)
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # (the daemon's socket: see main)
        # Piped into `head`, which has read what it wanted: the rest goes nowhere, and
        # the command still exits with its verdict (a check with failed pieces, 1).
        _drop_stdout()
    except OSError as exc:
        raise Unwritten(exc.strerror or str(exc)) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(type(value).__name__)


def cmd_add(args: argparse.Namespace) -> int:
    from pieced.storage.metainfo import read_metainfo

    try:  # before connecting: a missing .torrent is not a daemon that cannot be reached
        # Read as far as any daemon may take (its max_metainfo_bytes, up to 1 GiB): the
        # daemon says whether its own limit takes it.
        raw = read_metainfo(args.torrent, MAX_METAINFO_READ)
    except OSError as exc:
        print(f"pieced add: cannot read {args.torrent}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with _client(args) as c:
        ih = c.register(raw, Path(args.save_path).resolve())
        out: dict[str, Any] = {"info_hash": ih.hex()}
        if not args.no_check:
            # What is on disk already (a download made elsewhere, a torrent added again)
            # is found at once, as any client checks a torrent added over existing data;
            # missing files cost nothing to check.
            out.update(_check(c, ih, full=False))
            if sys.stderr.isatty():
                print(f"{out['verified']}/{out['num_pieces']} pieces found on disk",
                      file=sys.stderr)
        _print(args, out, ih.hex())
    return EXIT_OK


def _check(c: Any, ih: bytes, full: bool) -> dict[str, Any]:
    """A recheck, with its progress bar on a terminal."""
    st = c.status(ih, files=False)
    bar = ProgressBar(st["num_pieces"], st["piece_length"])
    c.core.on_event = lambda name, f: bar(f["done"], f["total"]) if name == "recheck_progress" else None
    result: dict[str, Any] = c.recheck(ih, full=full)
    return result


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        rows = c.torrents()
    lines = [f"{r['info_hash']}  {r['verified_pieces']:>7}/{r['num_pieces']:<7}  {_shown(r['name'])}"
             for r in rows]
    _print(args, rows, "\n".join(lines) if lines else "no torrents")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from pieced.storage.errors import TooLarge

    with _client(args) as c:
        ih = _known(c, args.info_hash)
        try:
            st = c.status(ih)
        except TooLarge:  # a file list larger than a reply (a torrent of 40,000 files)
            st = c.status(ih, files=False)
    human = [f"{_shown(st['name'])}  {st['verified_pieces']}/{st['num_pieces']} pieces verified",
             f"  save path: {_shown(st['save_path'])}"]
    if "files" not in st:
        human.append("  (too many files to list in one reply: see "
                     f"http://HOST:PORT/torrents/{args.info_hash.lower()})")
    for f in st.get("files", []):
        done = f["verified_bytes"] * 100 // f["length"] if f["length"] else 100  # (0 bytes: had)
        human.append(f"  {done:3d}%  {_shown(f['path'])}")
    human.extend(_errors(st["errors"]))
    _print(args, st, "\n".join(human))
    return EXIT_OK


def _errors(errors: list[dict[str, Any]]) -> list[str]:
    """A torrent's errors, one line each, the times an error came again said once."""
    return [f"  error: {_shown(e['message'])}"
            + (f" ({e['count']} times" + (f", pieces {_listed(e['pieces'])}"
                                          if len(e.get("pieces") or ()) > 1 else "") + ")"
               if e.get("count", 1) > 1 else "") for e in errors]


def _listed(pieces: list[int]) -> str:
    shown = ", ".join(map(str, sorted(pieces)[:10]))
    return shown + (", ..." if len(pieces) > 10 else "")


def cmd_recheck(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ih = _known(c, args.info_hash)
        res = _check(c, ih, args.full)
        # Why pieces failed, where the check could not read them (a file refused, a
        # folder gone): the check starts the torrent's errors afresh, so these are its
        # (and those of any write meanwhile).
        res = {"info_hash": ih.hex(), **res, "errors": c.status(ih, files=False)["errors"]}
    failed = sorted(set(res.get("failed_v1") or []) | set(res.get("failed_v2") or []))
    shown = f"; failed: {_ranges(failed)}" if failed else ""
    if res.get("failed_cut"):
        shown += " and more (too many to list: see pieced status)"
    human = [f"{res['verified']}/{res['num_pieces']} pieces verify{shown}", *_errors(res["errors"])]
    _print(args, res, "\n".join(human))
    return EXIT_OK if not failed else EXIT_FAILED


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.unregister(_known(c, args.info_hash), delete_files=args.delete_files)
    _print(args, {"removed": args.info_hash}, f"removed {args.info_hash}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.stats()
    keys = ("torrents", "connected_clients", "bytes_written", "bytes_read", "pieces_verified",
            "pieces_failed", "cache_hits", "cache_misses", "cache_bytes", "write_buffer_bytes")
    lines = [f"{k:20} {s.get(k)}" for k in keys]
    errors = s.get("errors") or {}
    lines.append(f"{'errors':20} " + (", ".join(f"{k} {n}" for k, n in sorted(errors.items()))
                                       or "none"))
    lines += [f"{'at the start':20} {problem}" for problem in s.get("load_errors") or ()]
    _print(args, s, "\n".join(lines))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pieced", description="BitTorrent piece-storage daemon")
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="verify a torrent's data on disk, offline (no daemon)")
    v.add_argument("torrent", help="the .torrent file")
    v.add_argument("--data", required=True, help="the save path: the folder holding the payload")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--threads", type=positive_int, default=None,
                   help="hashing threads (default: cores)")
    v.add_argument("--config", default=os.environ.get("PIECED_CONFIG"),
                   help="the daemon's TOML file, for its limits on a .torrent (max_pieces, "
                        "max_piece_length, max_files, max_metainfo_bytes; their PIECED_* "
                        "variables too)")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("--config", default=os.environ.get("PIECED_CONFIG"), help="TOML file")
    r.add_argument("--socket", help="Unix socket path")
    r.add_argument("--state-dir", help="state folder")
    r.add_argument("--http-host", help="HTTP address (default 127.0.0.1)")
    r.add_argument("--http-port", help="HTTP port (default 9731; 0 picks one)")
    r.add_argument("--backend", help="posix, mmap, uring, direct or disabled")
    r.add_argument("--cache-bytes", help="byte budget of cache + write buffer")
    r.set_defaults(func=cmd_run)

    default_socket = os.environ.get("PIECED_SOCKET", "var/pieced.sock")
    commands = [
        ("add", "register a torrent", cmd_add),
        ("ls", "list registered torrents", cmd_ls),
        ("status", "a torrent's verified pieces, files and errors", cmd_status),
        ("recheck", "verify a torrent's data on disk", cmd_recheck),
        ("rm", "unregister a torrent", cmd_rm),
        ("stats", "the daemon's counters", cmd_stats),
    ]
    for name, help_, func in commands:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--socket", default=default_socket, help="the daemon's socket")
        p.add_argument("--json", action="store_true", help="print JSON")
        if name == "add":
            p.add_argument("torrent", help="the .torrent file")
            p.add_argument("--save-path", required=True, help="where the payload goes")
            p.add_argument("--no-check", action="store_true",
                           help="do not look for the payload's pieces on disk (a torrent "
                                "added over existing data is otherwise checked at once)")
        elif name in ("status", "recheck", "rm"):
            p.add_argument("info_hash", help="40 hex digits (or the 64 of a v2 torrent)")
        if name == "rm":
            p.add_argument("--delete-files", action="store_true", help="also delete the payload")
        if name == "recheck":
            p.add_argument("--full", action="store_true",
                           help="hash every piece with the torrent's own hashes, "
                                "ignoring the BLAKE3 fingerprints")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A name its encoding cannot spell (a file's, on a terminal not in UTF-8) is
        # written escaped, as stderr writes it: it raised UnicodeEncodeError, exit 1,
        # which says a piece failed.
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_BAD_INPUT if exc.code else EXIT_OK
    from pieced.storage.errors import PiecedError

    me = f"pieced {args.command}"
    try:
        rc: int = args.func(args)
        if sys.stdout is not None:  # (None: started with it closed)
            sys.stdout.flush()
    except BrokenPipeError as exc:
        if _stdout_gone():  # piped into `head`: end quietly, as other Unix tools do
            _drop_stdout()
            return EXIT_OK
        _complain(f"{me}: the daemon at {getattr(args, 'socket', '?')} hung up: {exc}")
        return EXIT_BAD_INPUT
    except PiecedError as exc:
        from pieced.storage.errors import AccessDenied

        if isinstance(exc, AccessDenied):  # (the daemon's refusal of us, not of a request)
            _complain(f"{me}: the daemon at {getattr(args, 'socket', '?')} refused us: {exc}")
        else:
            _complain(f"{me}: {exc}")
        return EXIT_BAD_INPUT
    except Unreachable as exc:
        _complain(f"{me}: {exc}")
        return EXIT_BAD_INPUT
    except ConnectionError as exc:
        _complain(f"{me}: the daemon at {getattr(args, 'socket', '?')} hung up: {exc}")
        return EXIT_BAD_INPUT
    except TimeoutError:
        _complain(f"{me}: the daemon at {getattr(args, 'socket', '?')} did not answer in time")
        return EXIT_BAD_INPUT
    except Unwritten as exc:  # (exit 1 would say that a piece failed)
        _drop_stdout()  # (else the flush at exit fails again, and exits 120)
        _complain(f"{me}: cannot write the report to standard output: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _complain(f"{me}: interrupted")
        return 128 + signal.SIGINT
    return rc


def _complain(message: str) -> None:
    """An error on stderr, on a line of its own (not after a progress bar's)."""
    if sys.stderr is None:  # (started with it closed: the exit status says it)
        return
    print(("\n" if ProgressBar.line_open else "") + message, file=sys.stderr)
    ProgressBar.line_open = False


def _drop_stdout() -> None:
    """Standard output to /dev/null from now on: what is left to write goes nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # (fd 1: sys.stdout may be None)


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone."""
    import select

    try:
        poll = select.poll()
        poll.register(1, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
