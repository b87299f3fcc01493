"""Integrity under concurrency, at the daemon level: a real ``pieced run``, real clients
(several connections, threads), real torrents made by libtorrent.

What these tests hold the daemon to:

1. A block for a piece that is hashing, committing or verified is a duplicate: ACKed,
   counted in ``duplicate_blocks``, never written (also when two peers race for the
   same piece in the end game and the late copy differs).
2. A ``recheck`` does not undo pieces verified by writes that ran during it.
3. Torrent-wide operations (``move_storage``, ``unregister``, ``register`` again,
   ``rename_file``) are fences: no write, commit or event of the torrent crosses them.
4. Pieces written through the shared ring are cached like inline ones (SuggestPiece).
5. No descriptor outlives a torrent that readers were using when it was unregistered.
6. Blocks shaped as a real peer sends them (whole 16 KiB blocks running into BEP 47
   pad files, the pad part zeros) verify; a non-zero pad byte fails its piece.

Every test runs on each storage backend (``backend``, see conftest.py); on ``disabled``,
which stores nothing, those whose point is the stored bytes are left out (each says why),
and the others check that no payload file is made where the rest compare the files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pieced.protocol.client import Client
from pieced.storage.errors import PathEscape, StorageIOError, UnknownTorrent

from tests.conftest import STORES_NOTHING, Daemon, run_threads
from tests.realtools import TorrentKind, lt_recheck, make_payload, make_torrent_lt
from tests.test_disk import Source

BLOCK = 16384
MiB = 1024 * 1024
TIMEOUT = 30.0  # seconds: any single wait in these tests; they take a few seconds each

Event = tuple[str, dict[str, Any]]


# -- helpers ---------------------------------------------------------------------------------


def start(root: Path, backend: str, **env: str) -> tuple[Daemon, threading.Thread, list[str]]:
    """A daemon on ``backend`` (other settings given as ``PIECED_*`` variables, by
    lower-case key) whose stderr is drained in the background, so that a chatty daemon
    never blocks on a full pipe."""
    d = Daemon(root, env={f"PIECED_{k.upper()}": v for k, v in env.items()}, backend=backend)
    log: list[str] = []

    def drain() -> None:
        if d.proc.stderr is not None:
            log.extend(d.proc.stderr)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return d, thread, log


@contextlib.contextmanager
def running(root: Path, backend: str, **env: str) -> Iterator[Daemon]:
    """:func:`start`, then a clean stop (SIGTERM, exit status 0) at the end."""
    d, drain, log = start(root, backend, **env)
    try:
        yield d
    finally:
        rc = d.stop() if d.proc.poll() is None else d.proc.returncode
        drain.join(5)
    assert rc == 0, "".join(log)


class Events:
    """Thread-safe event log for ``Client(on_event=...)``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[Event] = []

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        with self.lock:
            self.items.append((name, fields))

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)

    def pieces(self, name: str, ih: bytes) -> list[int]:
        """The pieces of ``name`` events of torrent ``ih``, in arrival order."""
        with self.lock:
            return [f["piece"] for n, f in self.items if n == name and f.get("ih") == ih]

    def after(self, since: int, ih: bytes) -> list[Event]:
        """Events of torrent ``ih`` from the ``since``-th on."""
        with self.lock:
            return [(n, f) for n, f in self.items[since:] if f.get("ih") == ih]


def client(d: Daemon, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> Client:
    return Client(d.socket, timeout=TIMEOUT, on_event=on_event)


def has(have: bytes, piece: int) -> bool:
    return bool(have[piece >> 3] & (0x80 >> (piece & 7)))


def wait_for(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


def on_disk(src: Source, save: Path, piece: int) -> bytes:
    """The piece as it is in the files under ``save`` (pads and missing bytes as zeros)."""
    out = bytearray()
    for s in src.layout.map(piece, 0, src.layout.piece_size(piece)):
        if not s.stored:
            out += bytes(s.length)
            continue
        try:
            with open(save.joinpath(*src.meta.files[s.file_index].path), "rb") as f:
                f.seek(s.file_offset)
                out += f.read(s.length).ljust(s.length, b"\0")
        except FileNotFoundError:
            out += bytes(s.length)
    return bytes(out)


def whole(src: Source, piece: int) -> bytes:
    return src.read(piece, 0, src.layout.piece_size(piece))


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def assert_payload(raw: bytes, src: Source, folder: Path, backend: str) -> None:
    """The files under ``folder`` are the payload, and libtorrent agrees; on the backend
    that stores nothing, there is no payload file at all."""
    if backend == "disabled":
        assert files_under(folder) == [], f"disabled made files: {files_under(folder)[:5]}"
        return
    for f in src.meta.files:
        if not f.pad:
            assert folder.joinpath(*f.path).read_bytes() == src.save.joinpath(*f.path).read_bytes()
    assert all(lt_recheck(raw, folder))


def send(c: Client, ih: bytes, piece: int, begin: int, data: bytes, ring: bool) -> None:
    (c.write_block_direct if ring else c.write_chunk)(ih, piece, begin, data)


def download(c: Client, ih: bytes, src: Source, blocks: list[tuple[int, int, int]] | None = None,
             ring: bool | None = None) -> None:
    """Send blocks (all by default), alternating transports unless ``ring`` says which."""
    for i, (p, b, n) in enumerate(src.blocks() if blocks is None else blocks):
        send(c, ih, p, b, src.read(p, b, n), bool(i % 2) if ring is None else ring)
    c.wait_writes()


def flipped(data: bytes) -> bytes:
    return bytes(x ^ 0xFF for x in data)


def pads(src: Source, piece: int) -> list[tuple[int, int]]:
    """The pad ranges [lo, hi) of a piece, in piece offsets."""
    size = src.layout.piece_size(piece)
    return [(s.buf_offset, s.buf_offset + s.length)
            for s in src.layout.map(piece, 0, size) if not s.stored]


def peer_blocks(src: Source) -> list[tuple[int, int, int]]:
    """Blocks as libtorrent 2.1 requests them: whole 16 KiB blocks aligned to the piece
    start, clipped only at the piece's end, so one may run from a file's end into a BEP 47
    pad file; only blocks wholly inside a pad are never requested."""
    out = []
    for p in range(src.meta.num_pieces):
        size = src.layout.piece_size(p)
        for b in range(0, size, BLOCK):
            n = min(BLOCK, size - b)
            if not any(lo <= b and b + n <= hi for lo, hi in pads(src, p)):
                out.append((p, b, n))
    return out


def torrent(root: Path, spec: dict[str, int] | int, piece_length: int, kind: TorrentKind,
            seed: int) -> tuple[bytes, Source]:
    content = make_payload(root / "src", spec, seed=seed)
    raw = make_torrent_lt(content, piece_length, kind)
    return raw, Source(raw, root / "src")


# -- 1. piece states: duplicates are never written -------------------------------------------


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("state", ["verified", "committing"])
def test_blocks_for_done_pieces_are_acked_counted_and_never_written(
    tmp_path: Path, state: str, backend: str
) -> None:
    """Different bytes sent for pieces already verified (``verified``) or whose last block
    was just ACKed and whose commit is still pending (``committing``, inside a 1 s sync
    window), through both transports, are ACKed, counted as duplicates and never reach
    the disk or the cache."""
    raw, src = torrent(tmp_path, {"a.bin": 300_000, "b/c.bin": 123_457, "d": 40_000},
                       65536, "v1", seed=11)
    dl = tmp_path / "dl"
    n = src.meta.num_pieces
    with running(tmp_path, backend, sync_window_ms="1000") as d, client(d) as c:
        ih = c.register(raw, dl)
        download(c, ih, src)
        if state == "verified":
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == n
        before = c.stats()["duplicate_blocks"]
        sent = 0
        for i, (p, b, ln) in enumerate(src.blocks()):
            # alternating transports: no two ring writes in a row, so none are merged
            send(c, ih, p, b, flipped(src.read(p, b, ln)), ring=bool(i % 2))
            sent += 1
        c.wait_writes()  # no error: duplicates are acknowledged
        c.flush_all()
        for p in range(n):
            assert on_disk(src, dl, p) == whole(src, p), f"piece {p} overwritten on disk"
            assert c.read_chunk(ih, p, 0, src.layout.piece_size(p)) == whole(src, p), p
            assert c.read_piece(ih, p) == whole(src, p), p
        st = c.status(ih)
        assert st["verified_pieces"] == n and all(has(st["have"], p) for p in range(n))
        assert c.stats()["duplicate_blocks"] - before >= sent

@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_endgame_race_a_late_wrong_block_never_overwrites_a_verified_piece(
    tmp_path: Path, backend: str
) -> None:
    """End game: two connections send the same pieces at the same time, the second one's
    copy of each piece's last block is wrong. Whatever the interleaving, a piece reported
    verified has its original bytes on disk and in reads once flushed (a late copy that
    arrives while the piece is hashing or committing is a duplicate)."""
    raw, src = torrent(tmp_path, 2 * MiB + 12_345, 65536, "v1", seed=12)
    n = src.meta.num_pieces
    by_piece: dict[int, list[tuple[int, int, int]]] = {}
    for blk in src.blocks():
        by_piece.setdefault(blk[0], []).append(blk)
    with running(tmp_path, backend, sync_window_ms="200") as d:
        for rnd in range(3):
            dl = tmp_path / f"dl{rnd}"
            events = Events()
            with client(d, events) as a, client(d) as b:
                ih = a.register(raw, dl)

                def good(a: Client = a, ih: bytes = ih) -> None:
                    for p in range(n):
                        for i, (_, beg, ln) in enumerate(by_piece[p]):
                            send(a, ih, p, beg, src.read(p, beg, ln), ring=bool((p + i) % 2))
                    a.wait_writes()

                def late(b: Client = b, ih: bytes = ih, rnd: int = rnd) -> None:
                    for p in range(n):
                        blocks = by_piece[p]
                        for i, (_, beg, ln) in enumerate(blocks):
                            data = src.read(p, beg, ln)
                            if i == len(blocks) - 1:
                                data = flipped(data)
                            send(b, ih, p, beg, data, ring=bool((p + i + rnd) % 2))
                    b.wait_writes()  # duplicates and a failing piece are no write errors

                run_threads(good, late)
                a.flush_all()
                b.flush_all()
                verified = set(events.pieces("piece_verified", ih))
                assert verified, "no piece verified: the race proved nothing"
                st = a.status(ih)
                for p in sorted(verified):
                    assert has(st["have"], p), p
                    assert on_disk(src, dl, p) == whole(src, p), (
                        f"round {rnd}: piece {p} was reported verified but a late block "
                        f"overwrote it on disk")
                    assert a.read_chunk(ih, p, 0, src.layout.piece_size(p)) == whole(src, p)
                for p in range(n):  # and the bitfield never claims more than the disk holds
                    if has(st["have"], p):
                        assert on_disk(src, dl, p) == whole(src, p), (rnd, p)
                a.unregister(ih)


# -- 2. recheck does not undo concurrent verifications -----------------------------------------

@pytest.mark.backends(exclude={"disabled": "stores nothing: a recheck reads zeros, finds "
                                            "no piece"})
def test_recheck_keeps_pieces_verified_while_it_ran(
    tmp_path: Path, backend: str
) -> None:
    """Connection A rechecks a 32 MiB torrent of 16 KiB pieces, every other piece of it
    on disk and verified, while connection B downloads the missing ones, starting once
    the recheck has reported progress (so it has already hashed some of them as missing).
    Every piece B got a ``piece_verified`` for keeps its bit; at the end the torrent is
    complete and on disk."""
    raw, src = torrent(tmp_path, 32 * MiB, BLOCK, "v1", seed=21)
    n = src.meta.num_pieces
    dl = tmp_path / "dl"
    first = [blk for blk in src.blocks() if blk[0] % 2 == 0]
    rest = [blk for blk in src.blocks() if blk[0] % 2 == 1]
    progressed = threading.Event()

    def on_progress(name: str, fields: dict[str, Any]) -> None:
        if name == "recheck_progress" and 0 < fields["done"] < fields["total"]:
            progressed.set()

    events = Events()
    # One hash worker: the recheck hashes its 8 MiB batches one after the other, so its
    # first progress event comes early, with most of its work still to do.
    with running(tmp_path, backend, hash_workers="1") as d, client(d, on_progress) as a, \
            client(d, events) as b:
        ih = a.register(raw, dl)
        download(a, ih, src, first, ring=True)
        a.flush_all()
        result: dict[str, Any] = {}

        def recheck() -> None:
            try:
                result.update(a.recheck(ih, full=True))
            finally:
                progressed.set()

        def write() -> None:
            progressed.wait(TIMEOUT)
            download(b, ih, src, rest)

        run_threads(recheck, write)
        assert result["num_pieces"] == n
        b.flush_all()
        verified = set(events.pieces("piece_verified", ih))
        assert verified == {p for p, _, _ in rest}, "not every piece B sent was verified"
        st = b.status(ih)
        lost = sorted(p for p in verified if not has(st["have"], p))
        assert not lost, f"{len(lost)} pieces verified during the recheck lost their bit: {lost[:10]}"
        assert st["verified_pieces"] == n
        for p in range(n):
            assert on_disk(src, dl, p) == whole(src, p), p
    assert all(lt_recheck(raw, dl))


# -- 3. torrent-wide operations are fences ------------------------------------------------------


def test_move_storage_while_another_connection_writes(
    tmp_path: Path, backend: str
) -> None:
    """A moves the torrent (several times) while B downloads it: B's writes all succeed,
    every piece verifies, the files end up only in the last folder, and libtorrent
    agrees with them."""
    # many files: moving them takes a while, and writes land in the middle of it
    spec = {f"f{k:03d}.bin": 100_000 + 977 * k for k in range(128)}
    raw, src = torrent(tmp_path, spec, BLOCK, "v1", seed=31)
    n = src.meta.num_pieces
    blocks = src.blocks()
    folders = [tmp_path / "dl0"]
    events = Events()
    with running(tmp_path, backend) as d, client(d) as a, client(d, events) as b:
        ih = a.register(raw, folders[0])
        writing = threading.Event()
        done = threading.Event()

        def write() -> None:
            try:
                for i, (p, beg, ln) in enumerate(blocks):
                    send(b, ih, p, beg, src.read(p, beg, ln), ring=bool(i % 2))
                    if i == 32:
                        writing.set()
                b.wait_writes()  # raises the first write error, if any
            finally:
                writing.set()
                done.set()

        def move() -> None:
            writing.wait(TIMEOUT)
            k = 1
            # a hundred moves at most: on a backend whose writes are slow (direct), an
            # unbounded mover only stretches the download it fences, move after move
            while (not done.is_set() or k < 3) and k <= 100:
                folders.append(tmp_path / f"dl{k}")
                a.move_storage(ih, folders[-1])
                k += 1

        run_threads(write, move)
        b.flush_all()
        st = a.status(ih)
        assert st["save_path"] == str(folders[-1].resolve())
        missing = sorted(set(range(n)) - set(events.pieces("piece_verified", ih)))
        assert not missing, (f"{len(missing)} pieces not verified, e.g. {missing[:5]}; failed: "
                             f"{events.pieces('piece_failed', ih)[:5]}")
        assert st["verified_pieces"] == n
    for old in folders[:-1]:
        assert files_under(old) == [], f"files (re)created under {old}"
    assert_payload(raw, src, folders[-1], backend)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_three_clients_download_torrents_of_one_payload_at_once_without_starting_over(
    tmp_path: Path, backend: str
) -> None:
    """Three connections download three torrents of one payload (v1 of 16 and 64 KiB
    pieces, hybrid of 32 KiB) into its files at once, each its blocks in its own
    shuffled order, and send again what is missing after each pass. A block for one,
    running into another's piece where that one had nothing yet, threw that piece away
    (about 40 % of the blocks sent twice); now all three end whole, as libtorrent
    checks the files, with few blocks sent again."""
    spec = {"a.bin": 300_001, "dir/b.bin": 450_000, "c.bin": 77_777}
    content = make_payload(tmp_path / "src", spec, seed=71)
    kinds: list[tuple[int, TorrentKind]] = [(BLOCK, "v1"), (4 * BLOCK, "v1"), (2 * BLOCK, "hybrid")]
    raws = [make_torrent_lt(content, pl, kind) for pl, kind in kinds]
    srcs = [Source(raw, tmp_path / "src") for raw in raws]
    sent = [0] * len(raws)
    with running(tmp_path, backend) as d:
        with client(d) as c:
            ihs = [c.register(raw, tmp_path / "dl") for raw in raws]

        def downloader(k: int) -> Callable[[], None]:
            def run() -> None:
                rng = random.Random(k)
                with client(d) as c:
                    for _ in range(20):
                        have = c.status(ihs[k], files=False)["have"]
                        todo = [blk for blk in srcs[k].blocks() if not has(have, blk[0])]
                        if not todo:
                            return
                        rng.shuffle(todo)
                        download(c, ihs[k], srcs[k], todo, ring=True)
                        sent[k] += len(todo)
                        c.flush_all()
                    raise AssertionError(f"torrent {k} not whole after 20 passes")
            return run

        run_threads(*(downloader(k) for k in range(len(raws))), timeout=60)
    needed = sum(len(src.blocks()) for src in srcs)
    assert sum(sent) <= 1.15 * needed, (sent, needed)
    assert all(lt_recheck(raws[0], tmp_path / "dl"))


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_files_another_clients_torrent_shares_are_not_moved_from_under_it(
    tmp_path: Path, backend: str
) -> None:
    """Cross-seeding over three connections. A downloads a v1 torrent; B registers a
    hybrid torrent of the same payload in the same save path (they share its files)
    and checks it. A's move and B's rename of shared files are refused over the wire,
    naming the other torrent, and change nothing (no event for B, every piece verified
    on both). With B's torrent removed, A moves its files while C registers B's torrent
    at the old place again and again: each register is refused while A's files are
    leaving, or finds nothing of them there, or (first) makes A's move wait its turn
    and be refused; A never loses a piece, and C never finds one of A's files."""
    from pieced.protocol.client import PiecedError

    spec = {f"f{k:02d}.bin": 200_000 + 977 * k for k in range(24)}
    raw_a, src = torrent(tmp_path, spec, BLOCK, "v1", seed=33)
    raw_b = make_torrent_lt(next((tmp_path / "src").iterdir()), 2 * BLOCK, "hybrid")
    n = src.meta.num_pieces
    events = Events()
    with running(tmp_path, backend) as d, client(d) as a, client(d, events) as b, \
            client(d) as c:
        ih_a = a.register(raw_a, tmp_path / "dl")
        download(a, ih_a, src)
        a.flush_all()
        ih_b = b.register(raw_b, tmp_path / "dl")
        b.subscribe(ih_b)
        assert b.recheck(ih_b, full=True)["verified"] == b.status(ih_b)["num_pieces"]
        seen = len(events)
        with pytest.raises(PiecedError, match=f"shared with torrent {ih_b.hex()}"):
            a.move_storage(ih_a, tmp_path / "elsewhere")
        with pytest.raises(PiecedError, match=f"shared with torrent {ih_a.hex()}"):
            b.rename_file(ih_b, 0, "renamed.bin")
        assert events.after(seen, ih_b) == []
        assert a.status(ih_a)["verified_pieces"] == n
        assert b.status(ih_b)["verified_pieces"] == b.status(ih_b)["num_pieces"]
        assert not (tmp_path / "elsewhere").exists()
        b.unregister(ih_b)

        moved = threading.Event()
        found: list[int] = []

        def move() -> None:
            for k in range(200):  # refused while C's registration shares the files
                try:
                    a.move_storage(ih_a, tmp_path / "dl1")
                    break
                except PiecedError as exc:
                    assert "shared with torrent" in str(exc), exc
                    time.sleep(0.001 * k)
            moved.set()

        def register() -> None:
            while not moved.is_set():
                try:
                    ih = c.register(raw_b, tmp_path / "dl")
                except PiecedError as exc:
                    assert "being moved" in str(exc), exc
                    continue
                found.append(c.status(ih)["verified_pieces"])
                c.unregister(ih)

        run_threads(move, register)
        st = a.status(ih_a)
        assert st["save_path"] == str((tmp_path / "dl1").resolve())
        assert st["verified_pieces"] == n
        assert a.recheck(ih_a, full=True)["verified"] == n
        assert set(found) <= {0}  # (a registration never took A's files for its own)
    assert files_under(tmp_path / "dl") == []
    assert_payload(raw_a, src, tmp_path / "dl1", backend)


@pytest.mark.parametrize("who", ["same", "other"])
def test_unregister_with_delete_right_after_the_last_blocks(
    tmp_path: Path, who: str, backend: str
) -> None:
    """Blocks sent, then at once (no waiting for events) unregister with delete_files,
    from the writing connection or another one: no payload file is left or re-created
    in the save folder, and no event of the torrent arrives after the reply."""
    raw, src = torrent(tmp_path, {"a.bin": 700_000, "sub/b.bin": 333_333}, 65536, "v1",
                       seed=32)
    dl = tmp_path / "dl"
    events = Events()
    with running(tmp_path, backend, sync_window_ms="500") as d, client(d, events) as u, client(d) as w:
        ih = u.register(raw, dl)
        writer = u if who == "same" else w
        for i, (p, b, ln) in enumerate(src.blocks()):
            send(writer, ih, p, b, src.read(p, b, ln), ring=bool(i % 2))
        u.unregister(ih, delete_files=True)
        mark = len(events)
        if writer is w:
            with contextlib.suppress(UnknownTorrent):  # blocks that came after the unregister
                w.wait_writes()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # pump u's socket for a second (> the sync window)
            u.stats()
            time.sleep(0.05)
        late = events.after(mark, ih)
        assert late == [], f"{len(late)} events after the unregister reply, e.g. {late[:3]}"
        assert files_under(dl) == [], f"payload files left or re-created: {files_under(dl)}"
        with pytest.raises(UnknownTorrent):
            u.status(ih)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_register_again_while_an_unregister_deletes_the_files(
    tmp_path: Path, backend: str
) -> None:
    """One connection unregisters a torrent of 400 files with delete_files; another
    registers it again at the same save path the moment it can, and downloads it. The
    second registration is refused until the files are gone, and none of its files is
    deleted: before, it could register while the deletion ran, and lost about half of
    its files, verified pieces and all."""
    from pieced.storage.errors import AlreadyRegistered

    spec = {f"d{i % 5}/f{i}.bin": 20000 + 37 * i for i in range(400)}
    raw, src = torrent(tmp_path, spec, BLOCK, "v1", seed=63)
    dl = tmp_path / "dl"
    with running(tmp_path, backend) as d, client(d) as u, client(d) as c:
        ih = u.register(raw, dl)
        download(u, ih, src, ring=True)
        u.flush_all()
        downloaded = threading.Event()

        def register_again() -> None:  # and download at once, from the last file back
            while True:
                with contextlib.suppress(AlreadyRegistered):
                    c.register(raw, dl)
                    break
            download(c, ih, src, list(reversed(src.blocks())), ring=True)
            c.flush_all()
            downloaded.set()

        again = threading.Thread(target=register_again)
        again.start()
        u.unregister(ih, delete_files=True)
        again.join(TIMEOUT)
        assert downloaded.is_set()
        st = c.status(ih, files=False)
        assert st["verified_pieces"] == src.meta.num_pieces and st["errors"] == []
        assert c.recheck(ih, full=True)["verified"] == src.meta.num_pieces
    assert_payload(raw, src, dl, backend)


def test_reregister_elsewhere_inside_a_commit_window_survives_a_crash(
    tmp_path: Path, backend: str
) -> None:
    """Unregister and register again with another save path while pieces of the first
    registration wait for their group commit (1 s window), after a download that has
    been running for more than a second; SIGKILL; the restarted daemon has the torrent
    at the new path, and every piece it calls verified is there, intact."""
    raw, src = torrent(tmp_path, 1 * MiB + 777, 65536, "v1", seed=33)
    blocks = src.blocks()
    half = len(blocks) // 2
    old, new = tmp_path / "dl-old", tmp_path / "dl-new"
    d, _, _ = start(tmp_path, backend, sync_window_ms="1000")
    try:
        with client(d) as c:
            ih = c.register(raw, old)
            download(c, ih, src, blocks[:half])
            c.flush_all()
            time.sleep(1.1)  # the download goes on for a while
            download(c, ih, src, blocks[half:])  # ACKed: these pieces now await their commit
            c.unregister(ih)
            assert c.register(raw, new) == ih
            assert c.status(ih)["save_path"] == str(new.resolve())
            time.sleep(1.5)  # past the window: the first registration's commits are done
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    with running(tmp_path, backend, sync_window_ms="1000") as d2, client(d2) as c:
        wait_for(lambda: c.status(ih)["reverifying_pieces"] == 0)
        st = c.status(ih)
        assert st["save_path"] == str(new.resolve())
        for p in range(src.meta.num_pieces):
            if has(st["have"], p):
                assert on_disk(src, new, p) == whole(src, p), f"piece {p} claimed but not at {new}"

@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_rename_a_file_onto_another_payload_file_is_refused(
    tmp_path: Path, backend: str
) -> None:
    """rename_file to the path of another file of the torrent: EEXIST, nothing changes."""
    raw, src = torrent(tmp_path, {"a.bin": 100_000, "b.bin": 80_000, "c/d.bin": 20_000},
                       BLOCK, "v1", seed=34)
    dl = tmp_path / "dl"
    with running(tmp_path, backend) as d, client(d) as c:
        ih = c.register(raw, dl)
        download(c, ih, src)
        c.flush_all()
        files = c.status(ih)["files"]
        paths = {f["index"]: f["path"] for f in files}
        by_name = {p.rsplit("/", 1)[-1]: i for i, p in paths.items()}
        a, b = by_name["a.bin"], by_name["b.bin"]
        before = {i: dl.joinpath(*p.split("/")).read_bytes() for i, p in paths.items()}
        for i, target in ((a, paths[b]), (b, paths[a]), (by_name["d.bin"], paths[a])):
            with pytest.raises(StorageIOError) as exc:
                c.rename_file(ih, i, target)
            assert exc.value.errno == errno.EEXIST, exc.value
        st = c.status(ih)
        assert {f["index"]: f["path"] for f in st["files"]} == paths
        assert st["verified_pieces"] == src.meta.num_pieces
        for i, p in paths.items():
            assert dl.joinpath(*p.split("/")).read_bytes() == before[i], p
        for p in range(src.meta.num_pieces):
            assert c.read_chunk(ih, p, 0, src.layout.piece_size(p)) == whole(src, p)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_move_or_rename_onto_the_files_of_another_torrent_not_yet_written_is_refused(
    tmp_path: Path, backend: str
) -> None:
    """Torrent A is verified in ``dl``; B, of the same file names but other bytes, is
    registered (nothing of it written yet) in ``there``, and C, one file, in ``dl``. A's
    move to ``there`` and A's renames to C's file, or below it, are refused (EEXIST)
    over one connection while another holds B and C: the files not being there yet
    let them through, B's download then overwrote A's verified pieces, and A, sharing
    its files with B from then on, could not be moved back."""
    spec = {"a.bin": 70_000, "sub/b.bin": 50_000}
    raw_a, src_a = torrent(tmp_path / "one", spec, BLOCK, "v1", seed=41)
    raw_b, src_b = torrent(tmp_path / "two", spec, BLOCK, "v1", seed=42)
    raw_c, _ = torrent(tmp_path / "three", 30_000, BLOCK, "v1", seed=43)
    n = src_a.meta.num_pieces
    with running(tmp_path, backend) as d, client(d) as a, client(d) as other:
        ih_a = a.register(raw_a, tmp_path / "dl")
        download(a, ih_a, src_a)
        a.flush_all()
        ih_b = other.register(raw_b, tmp_path / "there")
        other.register(raw_c, tmp_path / "dl")
        with pytest.raises(StorageIOError) as caught:
            a.move_storage(ih_a, tmp_path / "there")
        assert caught.value.errno == errno.EEXIST, caught.value
        for target in ("payload.bin", "payload.bin/a.bin"):
            with pytest.raises(StorageIOError) as caught:
                a.rename_file(ih_a, 0, target)
            assert caught.value.errno == errno.EEXIST, caught.value
        st = a.status(ih_a)
        assert st["save_path"] == str((tmp_path / "dl").resolve())
        assert [f["path"] for f in st["files"]] == ["payload/a.bin", "payload/sub/b.bin"]
        download(other, ih_b, src_b)
        other.flush_all()
        assert other.status(ih_b)["verified_pieces"] == n
        assert a.recheck(ih_a, full=True)["verified"] == n
        a.move_storage(ih_a, tmp_path / "elsewhere")  # (still free to move)
        assert a.status(ih_a)["verified_pieces"] == n
        assert_payload(raw_a, src_a, tmp_path / "elsewhere", backend)


def test_no_payload_file_goes_into_the_daemons_state_folder(tmp_path: Path) -> None:
    """On the embedded defaults the state folder (``var/``) lies inside the allowed root.
    A save path in it, a torrent whose files would land in it (named ``var``, saved in
    the root), a move into it and a rename into it are refused (PATH_ESCAPE), and
    nothing is made there: a payload moved into another torrent's record folder was
    deleted with that torrent's record, while still reported verified."""
    spec = {"a.bin": 40_000}
    raw_a, src_a = torrent(tmp_path / "one", spec, BLOCK, "v1", seed=44)
    made = tmp_path / "mk" / "var" / "torrents"
    made.mkdir(parents=True)
    (made / "x.bin").write_bytes(os.urandom(20_000))
    raw_var = make_torrent_lt(tmp_path / "mk" / "var", BLOCK, "v1")
    with running(tmp_path, "posix") as d, client(d) as c:
        before = sorted((tmp_path / "var").rglob("*"))
        ih_a = c.register(raw_a, tmp_path / "dl")
        download(c, ih_a, src_a)
        c.flush_all()
        record = tmp_path / "var" / "torrents" / ih_a.hex()
        assert record.is_dir()
        raw_b = raw_a.replace(b"4:name7:payload", b"4:name7:payloaD")  # (another torrent)
        raw_c = raw_a.replace(b"4:name7:payload", b"4:name7:payloaE")
        ih_b = c.register(raw_b, tmp_path)
        after_register = sorted((tmp_path / "var").rglob("*"))
        for call in (lambda: c.register(raw_c, record),
                     lambda: c.register(raw_var, tmp_path),
                     lambda: c.move_storage(ih_a, record),
                     lambda: c.move_storage(ih_a, tmp_path / "var")):
            with pytest.raises(PathEscape, match="state folder"):
                call()
        with pytest.raises(PathEscape, match="state folder"):
            c.rename_file(ih_b, 0, f"var/torrents/{ih_a.hex()}/a.bin")
        assert sorted((tmp_path / "var").rglob("*")) == after_register
        assert before != after_register
        assert c.status(ih_a)["verified_pieces"] == src_a.meta.num_pieces
        assert c.status(ih_a)["save_path"] == str((tmp_path / "dl").resolve())
        c.unregister(ih_a)
        assert_payload(raw_a, src_a, tmp_path / "dl", "posix")


# -- 4. SuggestPiece on the ring path ------------------------------------------------------------

@pytest.mark.backends(exclude={"disabled": "keeps no copy of a piece written straight "
                                            "through (nothing in the page cache) to cache"})
def test_pieces_written_through_the_ring_are_cached(
    tmp_path: Path, backend: str
) -> None:
    """A torrent downloaded only with write_block_direct: its pieces are in the cache
    (the default budget, 256 MiB, holds them all), the last one verified included, and
    read_piece of a cached piece returns its bytes."""
    raw, src = torrent(tmp_path, {"a.bin": 300_001, "b/c.bin": 99_999}, 65536, "v1", seed=41)
    n = src.meta.num_pieces
    events = Events()
    with running(tmp_path, backend) as d, client(d, events) as c:
        ih = c.register(raw, tmp_path / "dl")
        download(c, ih, src, ring=True)
        c.flush_all()
        order = events.pieces("piece_verified", ih)
        assert sorted(order) == list(range(n))
        cached = c.cached_pieces(ih)
        assert cached, "no piece written through the ring is cached"
        assert order[-1] in cached
        assert cached == list(range(n))
        for p in (order[-1], cached[0]):
            assert c.read_piece(ih, p) == whole(src, p)
        # Seeding a piece written straight to its file: its first block read brings all
        # of it in from the page cache, and its other blocks are then hits.
        p = cached[-1]
        size = src.layout.piece_size(p)
        before = c.stats()
        got = b"".join(c.read_chunk(ih, p, b, min(16384, size - b)) for b in range(0, size, 16384))
        assert got == whole(src, p)
        after = c.stats()
        assert after["cache_misses"] == before["cache_misses"]
        assert after["cache_hits"] - before["cache_hits"] == -(-size // 16384)


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_reads_racing_a_download_leave_no_stale_copy_in_the_cache(
    tmp_path: Path, backend: str
) -> None:
    """One connection downloads 2,048 pieces in order through the ring, one piece at a
    time, while two others keep reading the next pieces, not yet there. A read that
    began before a piece arrived used to put its copy (zeros) in the cache over the
    piece verified meanwhile: 2 to 7 pieces a run then read back as zeros for good."""
    raw, src = torrent(tmp_path, 2048 * BLOCK, BLOCK, "v1", seed=61)
    n = src.meta.num_pieces
    data = [whole(src, p) for p in range(n)]
    with running(tmp_path, backend) as d, client(d) as w:
        ih = w.register(raw, tmp_path / "dl")
        w.write_block_direct(ih, n - 1, 0, data[n - 1])  # the file at its full length
        w.wait_writes()
        at = [0]
        stop = threading.Event()

        def reader() -> None:
            with client(d) as r:
                while not stop.is_set():
                    for q in range(at[0] + 1, min(at[0] + 3, n - 1)):
                        r.read_chunk(ih, q, 0, BLOCK)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in readers:
            t.start()
        try:
            for p in range(n - 1):
                at[0] = p
                w.write_block_direct(ih, p, 0, data[p])
                w.wait_writes()
        finally:
            stop.set()
            for t in readers:
                t.join(TIMEOUT)
        w.flush_all()
        assert w.status(ih, files=False)["verified_pieces"] == n
        wrong = [p for p in range(n) if w.read_chunk(ih, p, 0, BLOCK) != data[p]]
        assert wrong == [], f"verified pieces read back wrong: {wrong}"


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_clear_piece_while_the_piece_is_being_verified(tmp_path: Path, backend: str) -> None:
    """A clears nothing it did not see: the piece's last block arrives (its hash takes a
    while: 32 MiB, read back from the disk), another connection clears the piece, and a
    third sends the piece again with a bad first block. The clear waits for the
    verification, then takes the piece back; blocks that came while it was hashing
    are duplicates; the piece never ends verified with the bad block, not even after
    a kill -9. Before, the clear took the piece back in the middle of its hashing, and
    the first verification, ending, committed the third connection's piece: announced
    verified, journaled, with the bad block on disk."""
    piece = 32 * MiB
    raw, src = torrent(tmp_path, 3 * piece, piece, "v1", seed=62)
    part = MiB
    verified = Events()
    d, drain, _ = start(tmp_path, backend, sync_window_ms="0")
    try:
        with client(d, verified) as a, client(d) as b, client(d) as c:
            ih = a.register(raw, tmp_path / "dl")
            for p in range(src.meta.num_pieces):
                good = [src.read(p, k, part) for k in range(0, piece, part)]
                bad = bytes([good[0][0] ^ 0xFF]) + good[0][1:]
                for k in [0, *range(2, len(good))]:
                    a.write_chunk(ih, p, k * part, good[k])
                a.wait_writes()
                a.write_chunk(ih, p, part, good[1])  # the last block: hashing from the disk
                clearing = threading.Thread(target=c.clear_piece, args=(ih, p))
                time.sleep(0.005)
                clearing.start()
                time.sleep(0.002)
                for k in [*range(1, len(good)), 0]:  # b: the piece again, block 0 bad, last
                    b.write_chunk(ih, p, k * part, good[k] if k else bad)
                b.wait_writes()
                a.wait_writes()
                clearing.join(TIMEOUT)
            a.flush_all()
            st = a.status(ih, files=False)
        assert verified.pieces("piece_verified", ih)  # the first verifications did end
        for p in range(src.meta.num_pieces):  # whatever is verified holds the good bytes
            if has(st["have"], p):
                assert _on_disk(tmp_path / "dl", src, p) == whole(src, p), p
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        drain.join(5)
    with running(tmp_path, backend) as d2, client(d2) as c2:
        st = c2.status(ih, files=False)
        for p in range(src.meta.num_pieces):
            if has(st["have"], p):
                assert _on_disk(tmp_path / "dl", src, p) == whole(src, p), p
                assert c2.hash_piece(ih, p)


def _on_disk(folder: Path, src: Source, piece: int) -> bytes:
    """A piece's bytes as the payload file holds them (one-file torrents)."""
    (f,) = src.meta.files
    with open(folder.joinpath(*f.path), "rb") as fh:
        fh.seek(piece * src.meta.piece_length)
        return fh.read(src.layout.piece_size(piece))


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_three_clients_seeding_through_a_small_cache_get_every_byte_right(
    tmp_path: Path, backend: str
) -> None:
    """Three connections read every piece of one torrent at once, each in its own order,
    through a cache of 64 pieces: pieces are evicted all the time and their buffers used
    again for the next pieces read, while the other clients' reads run on the daemon's
    other workers. Every byte each client gets is the piece's, and buffers were used
    again. (That a buffer still being sent is never used again is pinned down in
    process, where a reply can be held: tests/test_disk.py.)"""
    raw, src = torrent(tmp_path, {"a.bin": 2_400_003, "b/c.bin": 1_100_000}, 16384, "v1",
                       seed=43)
    n = src.meta.num_pieces
    assert n > 3 * 64
    with running(tmp_path, backend, cache_bytes=str(64 * 16384)) as d:
        with client(d) as c:
            ih = c.register(raw, tmp_path / "src")
            assert c.recheck(ih)["verified"] == n

        def reader(seed: int) -> Callable[[], None]:
            def run() -> None:
                order = list(range(n))
                random.Random(seed).shuffle(order)
                buf = bytearray(16384)
                with client(d) as c:
                    for i, p in enumerate(order):
                        size = src.layout.piece_size(p)
                        if i % 2:
                            view = memoryview(buf)[:size]
                            assert c.read_chunk_into(ih, p, 0, view) == size
                            assert bytes(view) == whole(src, p), p
                        else:
                            half = size // 2
                            got = c.read_chunk(ih, p, 0, half) + c.read_chunk(ih, p, half, size - half)
                            assert got == whole(src, p), p
            return run

        run_threads(reader(1), reader(2), reader(3))
        with client(d) as c:
            assert c.stats()["piece_buffers_reused"] > 0


# -- 5. descriptors -------------------------------------------------------------------------------


def test_no_descriptor_leaks_when_readers_race_unregister(
    tmp_path: Path, backend: str
) -> None:
    """A reads pieces (read_chunk, volatile: from the files every time) in a loop while B
    unregisters and registers the torrent again and again (~2 s); once it is unregistered
    for good the daemon holds exactly the descriptors it held before the torrent was
    registered (same connections open)."""
    # 300 small files in 1 MiB pieces: reading a piece opens and reads some 250 files,
    # long enough for unregisters to land in the middle of reads
    spec = {f"f{k:03d}.bin": 3_000 + 7 * k for k in range(300)}
    raw, src = torrent(tmp_path, spec, MiB, "v1", seed=51)
    n = src.meta.num_pieces
    dl = tmp_path / "dl"
    with running(tmp_path, backend) as d:
        with client(d) as c:  # put the payload on disk, then forget the torrent
            ih = c.register(raw, dl)
            download(c, ih, src)
            c.flush_all()
            c.unregister(ih)
        pid = d.proc.pid
        with client(d) as a, client(d) as b:
            a.stats()
            wait_for(lambda: b.stats()["connected_clients"] == 2)  # the first one is gone
            time.sleep(0.2)
            fds = f"/proc/{pid}/fd"
            baseline = open_fds(fds)
            stop = threading.Event()
            reads = [0]

            def read() -> None:
                rng = random.Random(5)
                while not stop.is_set():
                    p = rng.randrange(n)
                    with contextlib.suppress(UnknownTorrent):
                        a.read_chunk(ih, p, 0, src.layout.piece_size(p), volatile=True)
                        reads[0] += 1

            def churn() -> None:
                try:
                    end = time.monotonic() + 2.0
                    while time.monotonic() < end:
                        assert b.register(raw, dl) == ih
                        time.sleep(0.002)
                        b.unregister(ih)
                finally:
                    stop.set()

            run_threads(read, churn)
            assert reads[0] > 0
            with pytest.raises(UnknownTorrent):
                b.status(ih)
            end = time.monotonic() + 2
            while len(open_fds(fds)) > len(baseline) and time.monotonic() < end:
                time.sleep(0.05)
            now = open_fds(fds)
            extra = sorted(set(now) - set(baseline))
            leaked = sorted(now[x] for x in extra)
            assert len(now) == len(baseline), (
                f"{len(now) - len(baseline)} descriptors leaked, e.g. {leaked[:5]}")
            # uring's rings are the threads', one at most each (made at a thread's first
            # I/O, closed when it ends): counted apart from the torrent's descriptors
            threads = len(os.listdir(f"/proc/{pid}/task"))
            assert len(open_fds(fds, rings=True)) <= threads


def open_fds(folder: str, rings: bool = False) -> dict[str, str]:
    """A process's open descriptors (from /proc/PID/fd) and what each one is: io_uring
    instances only if ``rings``, else everything but them."""
    out = {}
    for x in os.listdir(folder):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            what = os.readlink(f"{folder}/{x}")
            if (what == "anon_inode:[io_uring]") == rings:
                out[x] = what
    return out


# -- 6. blocks as a real peer sends them ------------------------------------------------------

HYBRID_FILES = {"a.bin": 40_000, "b.bin": 70_001, "c/d.bin": 16_385, "e.bin": 5_000,
                "f.bin": 100_003}


@pytest.mark.parametrize("transport", ["inline", "ring"])
def test_peer_shaped_blocks_running_into_pads_verify(
    tmp_path: Path, transport: str, backend: str
) -> None:
    """A hybrid torrent (libtorrent pads every file to a piece boundary) downloaded in
    whole 16 KiB blocks, the pad part of a block sent as zeros: every piece verifies,
    the files are the payload."""
    raw, src = torrent(tmp_path, HYBRID_FILES, 32768, "hybrid", seed=61)
    n = src.meta.num_pieces
    blocks = peer_blocks(src)
    assert any(lo < b + ln and b < hi for p, b, ln in blocks for lo, hi in pads(src, p)), (
        "no block runs into a pad: the torrent does not test what it should")
    dl = tmp_path / "dl"
    events = Events()
    with running(tmp_path, backend) as d, client(d, events) as c:
        ih = c.register(raw, dl)
        download(c, ih, src, blocks, ring=transport == "ring")
        c.flush_all()
        assert events.pieces("piece_failed", ih) == []
        assert sorted(events.pieces("piece_verified", ih)) == list(range(n))
        assert c.status(ih)["verified_pieces"] == n
    assert_payload(raw, src, dl, backend)


@pytest.mark.parametrize("transport", ["inline", "ring"])
def test_a_nonzero_byte_in_a_pad_fails_its_piece(
    tmp_path: Path, transport: str, backend: str
) -> None:
    """The same peer-shaped download, but one block carries a non-zero byte where the
    pad file is: that piece fails (pads are zeros), every other piece verifies."""
    raw, src = torrent(tmp_path, HYBRID_FILES, 32768, "hybrid", seed=62)
    n = src.meta.num_pieces
    blocks = peer_blocks(src)
    # a block that starts in a file and runs into its pad: one byte in the middle of
    # the pad part is set
    bad = next((p, b, lo - b + (b + ln - lo) // 2) for p, b, ln in blocks
               for lo, _ in pads(src, p) if b < lo < b + ln)
    events = Events()
    with running(tmp_path, backend) as d, client(d, events) as c:
        ih = c.register(raw, tmp_path / "dl")
        for p, b, ln in blocks:
            data = bytearray(src.read(p, b, ln))
            if (p, b) == bad[:2]:
                assert data[bad[2]] == 0
                data[bad[2]] = 0x5A
            send(c, ih, p, b, bytes(data), ring=transport == "ring")
        c.wait_writes()
        c.flush_all()
        assert events.pieces("piece_failed", ih) == [bad[0]]
        assert sorted(events.pieces("piece_verified", ih)) == [p for p in range(n) if p != bad[0]]
        st = c.status(ih)
        assert not has(st["have"], bad[0])
        assert st["verified_pieces"] == n - 1


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_rechecks_back_to_back_leave_another_clients_blocks_their_turn(
    tmp_path: Path, backend: str
) -> None:
    """Connections A1 and A2 ask for rechecks of a torrent back to back, so that one
    always waits while the other runs; connection B writes the torrent's missing pieces
    meanwhile. A recheck waits for the blocks in flight and holds new ones back while it
    waits (so that it is not starved); but the blocks held back then go in before the
    next recheck. Before, the recheck waiting went first every time: B's writes waited
    for as long as A1 and A2 went on."""
    raw, src = torrent(tmp_path, 8 * MiB, 256 * 1024, "v1", seed=23)
    dl = tmp_path / "dl"
    first = [blk for blk in src.blocks() if blk[0] % 2 == 0]
    rest = [blk for blk in src.blocks() if blk[0] % 2 == 1]
    with running(tmp_path, backend) as d, client(d) as a1, client(d) as a2, \
            client(d) as b:
        ih = a1.register(raw, dl)
        download(a1, ih, src, first, ring=False)
        a1.flush_all()
        stop = threading.Event()
        rechecks = [0, 0]

        def rechecker(c: Client, k: int) -> None:
            end = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < end:
                c.recheck(ih, full=bool(k))  # (one of each kind: the two never join)
                rechecks[k] += 1

        threads = [threading.Thread(target=rechecker, args=(c, k))
                   for k, c in enumerate((a1, a2))]
        for th in threads:
            th.start()
        try:
            deadline = time.monotonic() + 30
            while min(rechecks) < 2:
                assert time.monotonic() < deadline, f"one kind of recheck starved: {rechecks}"
                time.sleep(0.01)
            started = time.monotonic()
            for p, blk, n in rest:
                b.write_chunk(ih, p, blk, src.read(p, blk, n))
            b.flush_all()
            took = time.monotonic() - started
            running_still = all(th.is_alive() for th in threads)
        finally:
            stop.set()
            for th in threads:
                th.join(90)
        assert running_still, "the rechecks ended before the writes: nothing was measured"
        assert took < 30, f"{len(rest)} blocks took {took:.1f} s beside the rechecks"
        assert b.status(ih)["verified_pieces"] == src.meta.num_pieces


def test_rechecks_with_no_gap_between_them_leave_writes_their_turn(tmp_path: Path) -> None:
    """The engine in-process, where nothing comes between one recheck and the next: two
    threads recheck (one by fingerprint, one in full: they never join) with one always
    waiting for the other, while a third writes blocks. Before, the waiting recheck went
    in first every time and the writer waited until the rechecks stopped (here, after
    20 s); and the thread that had just let go went in again before the other, which
    waited as long."""
    from pieced.storage.disk import DiskIO

    raw, src = torrent(tmp_path, 4 * MiB, 256 * 1024, "v1", seed=24)
    dio = DiskIO("posix", roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        blocks = list(src.blocks())
        for p, blk, n in blocks[: len(blocks) // 2]:
            dio.write_chunk(ih, p, blk, src.read(p, blk, n))
        dio.flush_all()
        stop = threading.Event()
        rechecks = [0, 0]

        def rechecker(k: int) -> None:
            end = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < end:
                dio.recheck(ih, full=bool(k))
                rechecks[k] += 1

        threads = [threading.Thread(target=rechecker, args=(k,)) for k in (0, 1)]
        for th in threads:
            th.start()
        try:
            deadline = time.monotonic() + 15
            while min(rechecks) < 2:  # (each kind in turn: exclusive holders take turns)
                assert time.monotonic() < deadline, f"one kind of recheck starved: {rechecks}"
                time.sleep(0.01)
            for p, blk, n in blocks[len(blocks) // 2:]:
                dio.write_chunk(ih, p, blk, src.read(p, blk, n))
            running_still = all(th.is_alive() for th in threads)
        finally:
            stop.set()
            for th in threads:
                th.join(60)
        assert running_still, "the writes waited until the rechecks stopped"
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
    finally:
        dio.close()


# -- the cache against the file: what a read or a hash answers for ------------------------


def _four_pieces(tmp_path: Path, backend: str) -> tuple[Any, bytes, Any]:
    """(engine, ih, source) of a v1 torrent of four 64 KiB pieces, all written."""
    from pieced.storage.disk import DiskIO

    from tests.test_disk import Source

    content = make_payload(tmp_path / "src", 4 * 65536, seed=3)
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, cache_bytes=64 << 20)
    ih = dio.register(raw, tmp_path / "dl")
    for p, b, n in src.blocks():
        dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    return dio, ih, src


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_read_that_outlives_many_attempts_of_its_piece_does_not_cache_its_copy(
        tmp_path: Path, backend: str) -> None:
    """A read filling the cache with a verified piece is held while the piece is
    cleared and sent again 128 times (a bad first block on disk meanwhile, read by it),
    then verified with its right bytes. The count of the piece's changes that a read
    checks before it caches its copy was a byte: back where it was, the read's copy
    (the bad block) was cached, offered for SuggestPiece and served as the piece."""
    dio, ih, src = _four_pieces(tmp_path, backend)
    t, p = dio.torrent(ih), 1
    good = src.read(p, 0, 65536)
    bad = b"\xaa" * 16384
    dio.pool.drop((t.id, p))
    go, read_once, release = threading.Event(), threading.Event(), threading.Event()
    real = t.storage.readinto

    def held(segs: Any, out: Any) -> Any:
        if threading.current_thread().name == "held-reader" and not read_once.is_set():
            go.wait(30)
            got = real(segs, out)
            read_once.set()
            release.wait(30)
            return got
        return real(segs, out)

    t.storage.readinto = held
    reader = threading.Thread(target=dio.read_chunk, args=(ih, p, 0, 16), name="held-reader")
    reader.start()
    try:
        time.sleep(0.2)
        dio.clear_piece(ih, p)
        dio.write_chunk(ih, p, 0, bad, flush=True)
        go.set()
        assert read_once.wait(30)
        for _ in range(126):
            dio.clear_piece(ih, p)
            dio.write_chunk(ih, p, 0, bad, flush=True)
        dio.clear_piece(ih, p)
        for b in range(0, 65536, 16384):
            dio.write_chunk(ih, p, b, good[b : b + 16384])
        dio.flush_all()
    finally:
        go.set()
        release.set()
        reader.join(30)
        t.storage.readinto = real
    assert dio.status(ih)["verified_pieces"] == 4
    assert dio.read_chunk(ih, p, 0, 65536) == good
    assert dio.read_piece(ih, p) == good
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_piece_cleared_as_it_completes_does_not_get_its_old_copy_cached(
        tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between a piece passing (committing) and its copy going into the cache, another
    client clears it and writes a new first block straight to the file: the old
    attempt's copy went into the cache all the same, and reads of the piece, now under
    way again, answered with it instead of the file's bytes."""
    from pieced.storage.disk import DiskIO

    content = make_payload(tmp_path / "src", 4 * 65536, seed=5)
    raw = make_torrent_lt(content, 65536, "v1")
    from tests.test_disk import Source

    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, cache_bytes=64 << 20)
    ih = dio.register(raw, tmp_path / "dl")
    p, new = 2, b"\x55" * 16384
    real = DiskIO._as_piece
    fired: list[bool] = []

    def between(self: DiskIO, t: Any, piece: int, blocks: Any, pads: Any) -> Any:
        out = real(self, t, piece, blocks, pads)
        if piece == p and not fired:
            fired.append(True)
            other = threading.Thread(target=lambda: (
                dio.clear_piece(ih, p), dio.write_block_direct(ih, p, 0, new)))
            other.start()
            other.join(30)
        return out

    monkeypatch.setattr(DiskIO, "_as_piece", between)
    for b in range(0, 65536, 16384):
        dio.write_chunk(ih, p, b, src.read(p, b, 16384))
    monkeypatch.undo()
    assert fired
    assert dio.read_chunk(ih, p, 0, 16384) == new  # the piece as it stands, not the old copy
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_hash_block_answers_for_the_file_as_hash_piece_does(
        tmp_path: Path, backend: str) -> None:
    """A piece cached whole (read by a client), then a byte of it changed behind the
    daemon's back: hash_piece (reading the file) said it fails while hash_block answered
    from the cache, for the bytes verified before. Both read the file now."""
    import hashlib

    dio, ih, src = _four_pieces(tmp_path, backend)
    p = 1
    assert dio.read_chunk(ih, p, 0, 65536) == src.read(p, 0, 65536)  # cached whole
    path = tmp_path / "dl" / "payload.bin"
    with open(path, "r+b") as f:
        f.seek(p * 65536 + 5)
        f.write(b"\x00" if src.read(p, 5, 1) != b"\x00" else b"\x01")
        f.flush()
        os.fsync(f.fileno())
    on_disk = path.read_bytes()[p * 65536 : p * 65536 + 16384]
    assert not dio.hash_piece(ih, p)
    assert dio.hash_block(ih, p, 0, 16384) == hashlib.sha256(on_disk).digest()
    dio.close()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_hash_of_a_piece_during_a_flush_of_it_answers_for_the_piece(
        tmp_path: Path, backend: str) -> None:
    """A piece whose first block is buffered (good) over a bad one on disk; one client
    flushes it while another asks hash_piece. The flush takes the blocks out of the
    buffer before they are in the file: read in between, the piece was the bad block
    on disk, and hash_piece said it fails. It waits for the piece's write now."""
    dio, ih, src = _four_pieces(tmp_path, backend)
    t, p = dio.torrent(ih), 1
    dio.clear_piece(ih, p)
    dio.write_chunk(ih, p, 0, b"\x11" * 16384, flush=True)  # on disk: a bad block 0
    dio.clear_piece(ih, p)
    dio.write_chunk(ih, p, 0, src.read(p, 0, 16384))  # buffered: the good one
    assert dio.hash_piece(ih, p)
    gate, inside = threading.Event(), threading.Event()
    real = t.storage.writev

    def held(segs: Any, bufs: Any) -> Any:
        if threading.current_thread().name == "flusher":
            inside.set()
            gate.wait(30)
        return real(segs, bufs)

    t.storage.writev = held
    answers: list[bool] = []
    flusher = threading.Thread(target=dio.flush_piece, args=(ih, p), name="flusher")
    hasher = threading.Thread(target=lambda: answers.append(dio.hash_piece(ih, p)))
    try:
        flusher.start()
        assert inside.wait(30)
        hasher.start()
        time.sleep(0.2)
    finally:
        gate.set()
        flusher.join(30)
        hasher.join(30)
        t.storage.writev = real
    assert answers == [True]
    dio.close()


def test_a_failed_write_running_into_a_pad_leaves_the_pad_received() -> None:
    """PieceHasher.forget of a block that ran from a file's end into a pad (a peer's
    16 KiB block): the file's bytes of it are to be sent again, the pad's are not (never
    written, zeros by definition); sent again, the piece completes with the hash of its
    bytes (read back, its prefix being restarted)."""
    import hashlib

    from pieced.storage.hashing import PieceHasher

    data = os.urandom(40_000) + bytes(65536 - 40_000)  # a file's end at 40,000, then its pad
    h = PieceHasher(65536, True, None, [(40_000, 65536)])
    for b in (0, 16384, 32768):
        h.add(b, [data[b : min(b + 16384, 40_000)]])
    assert h.complete
    h.forget(32768, 32768 + 16384)  # the block running into the pad: its write failed
    assert not h.complete
    assert h.received.spans == [[0, 32768], [40_000, 65536]]
    h.add(32768, [data[32768:40_000]])
    assert h.complete
    d1, _, _ = h.finish(lambda b, n: data[b : b + n])
    assert d1 == hashlib.sha1(data).digest()
