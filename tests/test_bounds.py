"""What one client can make the daemon hold is bounded, and others go on meanwhile.

The bounds that storage keeps (pieces in progress, reads and rechecks of huge pieces,
the register/unregister fences) are held on each storage backend (``backend``, see
conftest.py); those of the protocol (frames, connections, descriptors passed) on the
default one.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import functools
import gc
import os
import random
import select
import shutil
import socket
import struct
import termios
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pieced.daemon.server import Server
from pieced.protocol.client import Client
from pieced.protocol.frames import FrameType, encode_read, encode_write_header
from pieced.protocol.messages import encode_request
from pieced.storage.disk import DiskIO
from pieced.storage.errors import AccessDenied

from tests.conftest import (
    STORES_NOTHING,
    Daemon,
    open_fds,
    peak_from_now,
    proc_bytes,
    run_threads,
    sparse_zero_torrent,
)
from tests.realtools import make_payload, make_torrent_lt
from tests.test_daemon import MiB, RawConn
from tests.test_disk import Source
from tests.test_integrity import has


class Meanwhile:
    """A well-behaved client downloading a torrent round after round (blocks as a peer
    sends them, through the shared-memory ring), while a stress test runs beside it.

    On exit: at least one round ran, every round verified every piece and nothing
    failed, and the daemon's peak RSS (VmHWM) stayed within its cache budget plus
    64 MiB over what it held when the test began.
    """

    def __init__(self, d: Daemon, budget: int = 256 * 1024 * 1024) -> None:
        import threading

        self.d = d
        self.budget = budget
        self.base = proc_bytes(d.proc.pid, "VmRSS")
        peak_from_now(d.proc.pid)  # the peak from here on
        content = make_payload(d.root / "meanwhile-src", {"a.bin": 400_000, "b.bin": 70_001},
                               seed=21)
        self.raw = make_torrent_lt(content, 32768, "hybrid")
        self.src = Source(self.raw, d.root / "meanwhile-src")
        self.stop = threading.Event()
        self.rounds = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            with Client(self.d.socket) as c:
                while not self.stop.is_set() or self.rounds == 0:
                    ih = c.register(self.raw, self.d.root / "meanwhile-dl")
                    for p, b, n in self.src.peer_blocks():
                        c.write_block_direct(ih, p, b, self.src.read(p, b, n))
                    c.wait_writes()
                    c.flush_all()
                    st = c.status(ih)
                    assert st["verified_pieces"] == self.src.meta.num_pieces, st
                    c.unregister(ih, delete_files=True)
                    self.rounds += 1
        except BaseException as exc:
            self.errors.append(exc)

    def __enter__(self) -> Meanwhile:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)
        assert not self.thread.is_alive(), "the well-behaved client is stuck"
        assert not self.errors, self.errors
        assert self.rounds >= 1
        peak = proc_bytes(self.d.proc.pid, "VmHWM")
        print(f"meanwhile: {self.rounds} downloads verified; daemon peak RSS "
              f"{peak / 2**20:.1f} MiB (at the start {self.base / 2**20:.1f} MiB, budget "
              f"{self.budget / 2**20:.0f} MiB)")
        assert peak <= self.base + self.budget + 64 * 1024 * 1024, peak


def test_descriptors_sent_with_other_frames_are_closed_at_once(daemon: Daemon) -> None:
    """300 requests each carrying 4 descriptors: the daemon keeps none of them, answers
    every request, and another client downloads a torrent meanwhile."""
    pid = daemon.proc.pid
    before = open_fds(pid)
    passed = daemon.root / "passed-descriptor"
    passed.write_bytes(b"")
    raw_conn = RawConn(daemon.socket)
    spare = [os.open(passed, os.O_RDONLY) for _ in range(4)]
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", spare).tobytes())]

    def held() -> int:
        """The daemon's copies of the descriptors this test sends."""
        n = 0
        for x in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                n += os.readlink(f"/proc/{pid}/fd/{x}") == str(passed)
        return n

    peak = 0
    try:
        with Meanwhile(daemon):
            for i in range(300):
                raw_conn.sock.sendmsg([encode_request(i + 1, "stats", {})], rights)
                if i % 10 == 9:
                    peak = max(peak, held())
            replies = raw_conn.replies(300)
            assert all(r.type == FrameType.RESPONSE for r in replies)
    finally:
        for fd in spare:
            os.close(fd)
    # at most a few sets wait in the socket buffer's read for the frame they came with
    # (the other client's connection, ring and payload files come and go meanwhile)
    assert peak <= 4 * 2, peak
    end = time.monotonic() + 10  # the daemon closes a finished client's descriptors soon
    while open_fds(pid) > before + 1 and time.monotonic() < end:
        time.sleep(0.05)
    assert held() == 0
    assert open_fds(pid) <= before + 1

    content = make_payload(daemon.root / "src", {"a.bin": 300_000, "b.bin": 70_001}, seed=2)
    raw = make_torrent_lt(content, 32768, "hybrid")
    src = Source(raw, daemon.root / "src")
    with Client(daemon.socket) as c:
        ih = c.register(raw, daemon.root / "dl")
        for p, b, n in src.peer_blocks():
            c.write_block_direct(ih, p, b, src.read(p, b, n))
        c.wait_writes()
        c.flush_all()
        assert c.status(ih)["verified_pieces"] == src.meta.num_pieces
    raw_conn.sock.close()


def test_descriptors_taken_by_queued_requests_are_bounded(tmp_path: Path) -> None:
    """A client's WRITE waits behind a full recheck of its torrent (a fence) that another
    client runs; behind it, the client sends attach_ring requests, each with 4
    descriptors. Each request took its descriptors into the queue: 3,000 of them held
    every descriptor the daemon could open, and the other clients' writes failed with
    EMFILE. The daemon now stops reading a client whose queued requests hold 4; the
    rest wait in the socket, the sender's, until those have run."""
    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", 4 << 20, 512)  # 2 GiB
    d = Daemon(tmp_path)
    passed = tmp_path / "passed-descriptor"
    passed.write_bytes(b"")
    pid = d.proc.pid

    def held() -> int:
        n = 0
        for x in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                n += os.readlink(f"/proc/{pid}/fd/{x}") == str(passed)
        return n

    spare = [os.open(passed, os.O_RDONLY) for _ in range(4)]
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", spare).tobytes())]
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            checking = threading.Thread(target=lambda: c.recheck(ih, full=True))
            checking.start()
            time.sleep(0.3)  # the recheck holds the torrent
            bad = RawConn(d.socket)
            bad.sock.sendall(encode_write_header(1, ih, 0, 0, 1) + b"x")  # waits for it
            bad.sock.setblocking(False)
            sent, peak = 0, 0
            for i in range(300):
                try:
                    bad.sock.sendmsg([encode_request(i + 2, "attach_ring", {"size": 4096})],
                                     rights)
                    sent += 1
                except BlockingIOError:
                    break
                if i % 10 == 9:
                    peak = max(peak, held())
            time.sleep(0.3)
            peak = max(peak, held())
            still = checking.is_alive()
            checking.join(120)
        bad.sock.setblocking(True)
        replies = bad.replies(1 + sent)  # every request answered once the recheck ended
        assert all(r.type in (FrameType.ACK, FrameType.ERROR) for r in replies[1:])
        bad.sock.close()
    finally:
        for fd in spare:
            os.close(fd)
        assert d.stop() == 0, d.stderr()
    print(f"{sent} attach_ring requests sent behind a fence: the daemon held at most "
          f"{peak} of their descriptors")
    assert still  # (the fence held while they were sent)
    assert sent > 2
    assert peak <= 8, peak  # 4 queued, 4 pending at most: not 4 a request


def test_cli_add_names_a_missing_torrent_file(daemon: Daemon, tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "pieced.daemon.cli", "add", str(tmp_path / "missing.torrent"),
         "--save-path", str(tmp_path), "--socket", str(daemon.socket)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    assert "cannot read" in r.stderr and "missing.torrent" in r.stderr
    assert "cannot reach the daemon" not in r.stderr


def test_short_requests_are_answered_while_four_rechecks_run(tmp_path: Path) -> None:
    """Four connections recheck four torrents at once (one hashing thread, so they last);
    a fifth asks for stats all along and is answered while all four still run. Before,
    the rechecks took every request worker and stats waited for one of them to end."""
    import threading

    d = Daemon(tmp_path, env={"PIECED_HASH_WORKERS": "1"})
    try:
        # one payload, four torrents of it (four piece sizes: four info hashes)
        content = make_payload(tmp_path / "src", 96 * 1024 * 1024, seed=1)
        torrents = [(make_torrent_lt(content, 16384 << k, "hybrid"), tmp_path / "src")
                    for k in range(4)]
        first_done = threading.Event()
        started = threading.Barrier(5)
        errors: list[BaseException] = []

        def recheck(raw: bytes, save: Path) -> None:
            try:
                with Client(d.socket) as c:
                    ih = c.register(raw, save)
                    started.wait(30)
                    assert c.recheck(ih, full=True)["verified"] > 0
                    first_done.set()
            except BaseException as exc:
                errors.append(exc)
                first_done.set()

        threads = [threading.Thread(target=recheck, args=t) for t in torrents]
        for t in threads:
            t.start()
        latencies = []
        answered_while_all_ran = 0
        with Client(d.socket) as c, Meanwhile(d):
            started.wait(30)
            time.sleep(0.05)  # let the four recheck requests reach the daemon
            while any(t.is_alive() for t in threads):
                t0 = time.perf_counter()
                c.stats()
                latencies.append(time.perf_counter() - t0)
                if not first_done.is_set():
                    answered_while_all_ran += 1
                time.sleep(0.005)
        for t in threads:
            t.join()
        assert not errors, errors
    finally:
        assert d.stop() == 0, d.stderr()
    latencies.sort()
    print(f"stats during four rechecks: {len(latencies)} calls, {answered_while_all_ran} while "
          f"all four ran; p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, max "
          f"{latencies[-1] * 1000:.1f} ms")
    assert answered_while_all_ran >= 5, answered_while_all_ran


def test_pieces_in_progress_are_bounded(tmp_path: Path, backend: str) -> None:
    """Each piece in progress holds hash state outside the byte budget: past the bound a
    block that would start one more is refused, clearly, and changes nothing; another
    torrent, with fewer than PARTIAL_FLOOR pieces in progress, still downloads."""
    from pieced.storage.disk import PARTIAL_FLOOR, DiskIO
    from pieced.storage.errors import TooLarge

    content = make_payload(tmp_path / "src", {"a.bin": 100 * 16384 + 5}, seed=5)
    raw = make_torrent_lt(content, 16384, "hybrid")
    src = Source(raw, tmp_path / "src")
    other = make_payload(tmp_path / "src2", {"b.bin": 300_000}, seed=6)
    raw2 = make_torrent_lt(other, 32768, "v1")
    src2 = Source(raw2, tmp_path / "src2")
    bound = PARTIAL_FLOOR + 3
    dio = DiskIO(backend, max_partial_pieces=bound)
    ih = dio.register(raw, tmp_path / "dl")
    first = {p: (p, b, min(n, 100)) for p, b, n in src.peer_blocks() if b == 0}
    for p in range(bound):
        dio.write_chunk(ih, p, 0, src.read(*first[p]))
    with pytest.raises(TooLarge, match="max_partial_pieces"):
        dio.write_block_direct(ih, bound, 0, src.read(*first[bound]))
    st = dio.status(ih)
    assert st["partial_pieces"] == bound and st["verified_pieces"] == 0
    # the bound is full, but another torrent is not stopped by it
    ih2 = dio.register(raw2, tmp_path / "dl2")
    for p, b, n in src2.peer_blocks():
        dio.write_chunk(ih2, p, b, src2.read(p, b, n))
    dio.flush_all()
    assert dio.status(ih2)["verified_pieces"] == src2.meta.num_pieces
    dio.clear_piece(ih, 2)  # a slot comes free
    dio.write_block_direct(ih, bound, 0, src.read(*first[bound]))
    for p, b, n in src.peer_blocks():  # the rest completes what is in progress first
        dio.write_chunk(ih, p, b, src.read(p, b, n))
    dio.flush_all()
    st = dio.status(ih)
    assert st["verified_pieces"] == src.meta.num_pieces and st["partial_pieces"] == 0
    assert dio._partials == 0
    dio.close()


def test_the_floor_of_pieces_in_progress_each_torrent_has_ends_at_twice_the_bound(
        tmp_path: Path) -> None:
    """Each torrent may have PARTIAL_FLOOR pieces in progress whatever the bound, so
    that one torrent filling it does not stop the others; given to thousands of
    torrents, that floor held gigabytes of hash state (100 hybrid torrents of 64 MiB
    pieces, 64 pieces begun in each: 874 MiB). It ends at twice the bound: past it, the
    daemon never holds more. A torrent under its floor then takes the hash state of a
    piece of the torrent holding the most (its bytes kept: ``parked``): 128 torrents
    begun 64 pieces each by one client stopped every other download, for good. The
    piece let go is taken up again by its next block, and verifies; a torrent holding
    as many as the others is refused, and nothing changes."""
    from pieced.storage.disk import PARTIAL_FLOOR, DiskIO
    from pieced.storage.errors import TooLarge

    bound = 2 * PARTIAL_FLOOR  # (floors of 64: the fifth torrent's runs past 2 * bound)
    dio = DiskIO("posix", max_partial_pieces=bound)
    try:
        srcs, ihs = [], []
        for k in range(6):
            content = make_payload(tmp_path / f"src{k}", {"a.bin": 80 * 16384}, seed=80 + k)
            raw = make_torrent_lt(content, 16384, "v1")
            srcs.append(Source(raw, tmp_path / f"src{k}"))
            ihs.append(dio.register(raw, tmp_path / f"dl{k}"))
        for k in range(4):  # one client begins 64 pieces in each of four torrents
            for p in range(PARTIAL_FLOOR):
                dio.write_chunk(ihs[k], p, 0, srcs[k].read(p, 0, 100))
        assert dio._partials == 2 * bound
        # another torrent downloads all the same, its pieces one after the other
        src, ih = srcs[4], ihs[4]
        for p, b, n in src.blocks():
            dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == src.meta.num_pieces
        assert dio._partials <= 2 * bound and dio.stats()["pieces_parked"] >= 1
        parked = [(k, p) for k in range(4)
                  for p in range(PARTIAL_FLOOR) if p in dio.torrent(ihs[k]).parked]
        assert parked
        k, p = parked[0]
        st = dio.status(ihs[k], partial=True)
        assert [p, [[0, 100]]] in st["partial"]  # (its bytes kept: said to the client)
        # a torrent holding as many as the most is refused, and changes nothing
        busiest = max(range(4), key=lambda j: len(dio.torrent(ihs[j]).partial))
        held = dio.status(ihs[busiest])["partial_pieces"]
        with pytest.raises(TooLarge, match="max_partial_pieces"):
            dio.write_chunk(ihs[busiest], PARTIAL_FLOOR, 0, srcs[busiest].read(PARTIAL_FLOOR, 0, 100))
        assert dio.status(ihs[busiest])["partial_pieces"] == held
        # the piece let go: its next blocks take it up again (the first 100 bytes are
        # not sent again), and it verifies from what its file holds
        dio.clear_piece(ihs[busiest], 0 if busiest != k else 1)  # (a slot comes free)
        size = srcs[k].layout.piece_size(p)
        dio.write_chunk(ihs[k], p, 100, srcs[k].read(p, 100, size - 100))
        dio.flush_all()
        assert p not in dio.torrent(ihs[k]).parked
        assert dio.torrent(ihs[k]).has(p)
        assert dio.read_piece(ihs[k], p) == srcs[k].read(p, 0, size)
    finally:
        dio.close()


def test_one_clients_pieces_in_progress_do_not_stop_anothers_download(tmp_path: Path) -> None:
    """Two real connections. One begins PARTIAL_FLOOR pieces in each of two torrents,
    twice the daemon's bound in all, and stays connected; the other then downloads its
    own torrent whole (it was refused its first block, for good: "finish or clear
    some", of pieces it had none of). The first then sends the rest of its pieces, and
    each is verified with the right bytes, those it had to let go too."""
    from pieced.storage.disk import PARTIAL_FLOOR

    d = Daemon(tmp_path, env={"PIECED_MAX_PARTIAL_PIECES": str(PARTIAL_FLOOR)})
    try:
        srcs, raws = [], []
        for k in range(3):
            content = make_payload(tmp_path / f"src{k}", {"a.bin": PARTIAL_FLOOR * 16384},
                                   seed=90 + k)
            raws.append(make_torrent_lt(content, 16384, "v1"))
            srcs.append(Source(raws[k], tmp_path / f"src{k}"))
        with Client(d.socket) as greedy, Client(d.socket) as other:
            mine = [greedy.register(raws[k], tmp_path / f"dl{k}") for k in range(2)]
            for k, ih in enumerate(mine):
                for p in range(PARTIAL_FLOOR):
                    greedy.write_chunk(ih, p, 0, srcs[k].read(p, 0, 100))
            greedy.wait_writes()
            assert sum(greedy.status(ih)["partial_pieces"] for ih in mine) == 2 * PARTIAL_FLOOR
            theirs = other.register(raws[2], tmp_path / "dl2")
            for p, b, n in srcs[2].blocks():
                other.write_chunk(theirs, p, b, srcs[2].read(p, b, n))
            other.flush_all()
            assert other.status(theirs)["verified_pieces"] == PARTIAL_FLOOR
            assert other.stats()["pieces_parked"] >= 1
            for k, ih in enumerate(mine):  # the rest of every piece: each verifies
                for p in range(PARTIAL_FLOOR):
                    greedy.write_chunk(ih, p, 100, srcs[k].read(p, 100, 16384 - 100))
            greedy.flush_all()
            for k, ih in enumerate(mine):
                assert greedy.status(ih)["verified_pieces"] == PARTIAL_FLOOR
                for p in (0, PARTIAL_FLOOR // 2, PARTIAL_FLOOR - 1):
                    assert greedy.read_piece(ih, p) == srcs[k].read(p, 0, 16384)
    finally:
        assert d.stop() == 0


def test_pieces_in_progress_spread_one_a_torrent_do_not_stop_anothers_download(
        tmp_path: Path) -> None:
    """Two real connections. One begins a single piece in each of twice
    ``max_partial_pieces`` torrents (4, with a bound of 2), the most there may be, and
    hangs up; the other then downloads its own torrent. A torrent was let go of a piece
    only when it held more than the requester would after taking one, so torrents of
    one piece each were never let go of theirs: every new piece of every other torrent
    was refused, for good (a restart too kept them under way). The piece of one of the
    four is parked now, its bytes kept, and the download completes, a piece at a time."""
    bound = 2
    d = Daemon(tmp_path, env={"PIECED_MAX_PARTIAL_PIECES": str(bound)})
    try:
        srcs, raws = [], []
        for k in range(2 * bound + 1):
            content = make_payload(tmp_path / f"src{k}", {"a.bin": 6 * 16384}, seed=60 + k)
            raws.append(make_torrent_lt(content, 16384, "v1"))
            srcs.append(Source(raws[k], tmp_path / f"src{k}"))
        with Client(d.socket) as spreader:
            begun = [spreader.register(raws[k], tmp_path / f"dl{k}") for k in range(2 * bound)]
            for k, ih in enumerate(begun):
                spreader.write_chunk(ih, 0, 0, srcs[k].read(0, 0, 100))
            spreader.wait_writes()
            assert sum(spreader.status(ih)["partial_pieces"] for ih in begun) == 2 * bound
        k = 2 * bound
        with Client(d.socket) as other:
            ih = other.register(raws[k], tmp_path / f"dl{k}")
            for p, b, n in srcs[k].blocks():
                other.write_chunk(ih, p, b, srcs[k].read(p, b, n))
            other.flush_all()
            assert other.status(ih)["verified_pieces"] == srcs[k].meta.num_pieces
            assert other.read_piece(ih, 5) == srcs[k].read(5, 0, srcs[k].layout.piece_size(5))
            assert other.stats()["pieces_parked"] >= 1
            kept = [other.status(j, files=False, partial=True)["partial"] for j in begun]
            assert all(got == [[0, [[0, 100]]]] for got in kept), kept  # (parked: kept)
    finally:
        assert d.stop() == 0


def test_torrents_at_the_bound_do_not_take_pieces_from_each_other_back_and_forth(
        tmp_path: Path) -> None:
    """Six torrents downloading at once, their blocks shuffled, with room for 4 pieces
    in progress (8 with the floors): a torrent that holds pieces under way took one of
    a torrent holding as many as it would, and that one took it back, each time a
    write-out of the piece's blocks (353 pieces parked for 144; with clients sending
    again the blocks of pieces not verified, twice the payload written). Only a
    torrent with none under way takes one of a torrent holding as many; each completes."""
    from pieced.storage.disk import DiskIO
    from pieced.storage.errors import TooLarge

    dio = DiskIO("posix", max_partial_pieces=4)
    try:
        srcs, ihs, todo = [], [], []
        for k in range(6):
            content = make_payload(tmp_path / f"src{k}", {"a.bin": 24 * 65536}, seed=70 + k)
            raw = make_torrent_lt(content, 65536, "v1")
            srcs.append(Source(raw, tmp_path / f"src{k}"))
            ihs.append(dio.register(raw, tmp_path / f"dl{k}"))
            blocks = srcs[k].blocks()
            random.Random(k).shuffle(blocks)
            todo.append(blocks)
        payload = sum(src.meta.total_size for src in srcs)
        while any(todo):
            for k in range(6):  # a block of each in turn; one refused comes again later
                if todo[k]:
                    p, b, n = todo[k].pop()
                    try:
                        dio.write_chunk(ihs[k], p, b, srcs[k].read(p, b, n))
                    except TooLarge:
                        todo[k].insert(0, (p, b, n))
        dio.flush_all()
        assert all(dio.status(ih)["verified_pieces"] == 24 for ih in ihs)
        parked = dio.stats()["pieces_parked"]
        assert parked < 6 * 24, parked  # (fewer than the pieces: before, 353 for 144)
        assert dio.stats()["bytes_written"] == payload
    finally:
        dio.close()


def _parked_one(tmp_path: Path, d: Daemon, greedy: Client, other: Client, kind: str,
                begin: int = 0) -> tuple[bytes, bytes, list[Source]]:
    """Two torrents of 8 pieces of 32 KiB; ``greedy`` begins 4 pieces of the first (a
    block at ``begin`` of each: twice the bound of 2), ``other``'s first block of the
    second makes the daemon let one of them go (parked). (the two keys, their sources)"""
    srcs, raws = [], []
    for k in range(2):
        content = make_payload(tmp_path / f"src{k}", {"a.bin": 8 * 32768}, seed=17 + k)
        raws.append(make_torrent_lt(content, 32768, kind))
        srcs.append(Source(raws[k], tmp_path / f"src{k}"))
    g = greedy.register(raws[0], tmp_path / "dl0")
    o = other.register(raws[1], tmp_path / "dl1")
    for p in range(4):
        greedy.write_chunk(g, p, begin, srcs[0].read(p, begin, 16384))
    greedy.wait_writes()
    other.write_chunk(o, 0, 0, srcs[1].read(0, 0, 16384))
    other.wait_writes()
    assert other.stats()["pieces_parked"] == 1
    assert greedy.status(g, files=False)["partial_pieces"] == 3  # (and one parked, listed)
    assert len(greedy.status(g, files=False, partial=True)["partial"]) == 4
    return g, o, srcs


def test_a_parked_piece_cleared_is_told_failed_as_any_piece_under_way(tmp_path: Path) -> None:
    """A piece let go to make room for another torrent's (parked: its blocks in its
    files, its ranges kept) holds blocks written: cleared, its writer was told nothing
    (the pieces under way were told failed, it alone not), and went on sending the rest
    of a piece that could never verify."""
    d = Daemon(tmp_path, env={"PIECED_MAX_PARTIAL_PIECES": "2"})
    try:
        events: list[tuple[str, int]] = []
        with Client(d.socket, on_event=lambda n, f: events.append((n, f["piece"]))) as greedy, \
                Client(d.socket) as other:
            g, _, srcs = _parked_one(tmp_path, d, greedy, other, "v1")
            for p in range(4):
                other.clear_piece(g, p)
            greedy.flush_all()  # (the events delivered)
            assert sorted(p for n, p in events if n == "piece_failed") == [0, 1, 2, 3]
            assert greedy.status(g, files=False, partial=True)["partial"] == []
            for p in range(8):  # told, the writer sends each piece again: all verify
                greedy.write_chunk(g, p, 0, srcs[0].read(p, 0, 32768))
            greedy.flush_all()
            assert greedy.status(g, files=False)["verified_pieces"] == 8
    finally:
        assert d.stop() == 0, d.stderr()


def test_pieces_under_way_past_the_bound_at_a_clean_stop_are_kept_parked(tmp_path: Path) -> None:
    """A clean stop keeps the pieces under way (their ranges, their blocks in their
    files), parked ones too; the start took them up until the bound of pieces in
    progress, and forgot the others: their blocks were lost, and a writer sending the
    rest of such a piece never saw it verify. Past the bound they are parked again."""
    env = {"PIECED_MAX_PARTIAL_PIECES": "2"}
    d = Daemon(tmp_path, env=env)
    try:
        with Client(d.socket) as greedy, Client(d.socket) as other:
            g, o, srcs = _parked_one(tmp_path, d, greedy, other, "hybrid", begin=16384)
    finally:
        assert d.stop() == 0, d.stderr()
    d = Daemon(tmp_path, env=env)
    try:
        with Client(d.socket) as c:
            held = dict(c.status(g, files=False, partial=True)["partial"])
            assert held == {p: [[16384, 32768]] for p in range(4)}, held
            for p in range(4):  # the rest of each: all verify
                c.write_chunk(g, p, 0, srcs[0].read(p, 0, 16384))
            c.write_chunk(o, 0, 16384, srcs[1].read(0, 16384, 16384))
            c.flush_all()
            have = c.status(g, files=False)["have"]
            assert all(has(have, p) for p in range(4)), have
            assert all(c.read_piece(g, p) == srcs[0].read(p, 0, 32768) for p in range(4))
            assert has(c.status(o, files=False)["have"], 0)
    finally:
        assert d.stop() == 0, d.stderr()


def test_more_pieces_under_way_than_a_torrents_floor_are_all_kept_by_a_clean_stop(
        tmp_path: Path) -> None:
    """70 pieces of one torrent under way at a clean stop: the start took up 64 (the
    torrent's floor) and forgot the other six, whose blocks were then fetched again.
    Those are parked now (counted in pieces_parked): listed, and the rest of each
    verifies them all."""
    from pieced.storage.disk import PARTIAL_FLOOR

    n = PARTIAL_FLOOR + 6
    content = make_payload(tmp_path / "src", {"a.bin": n * 32768}, seed=23)
    raw = make_torrent_lt(content, 32768, "v1")
    src = Source(raw, tmp_path / "src")
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            for p in range(n):
                c.write_chunk(ih, p, 16384, src.read(p, 16384, 16384))
            c.wait_writes()
            assert c.status(ih, files=False)["partial_pieces"] == n
    finally:
        assert d.stop() == 0, d.stderr()
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            listed = dict(c.status(ih, files=False, partial=True)["partial"])
            assert listed == {p: [[16384, 32768]] for p in range(n)}, sorted(listed)
            assert c.stats()["pieces_parked"] == n - PARTIAL_FLOOR
            for p in range(n):  # the rest of each
                c.write_chunk(ih, p, 0, src.read(p, 0, 16384))
                c.wait_writes()
            c.flush_all()
            assert c.status(ih, files=False)["verified_pieces"] == n
    finally:
        assert d.stop() == 0, d.stderr()


def test_blocks_refused_for_want_of_room_say_which_they_were(tmp_path: Path) -> None:
    """With as many pieces in progress as the daemon may hold, the block that would
    begin one more is refused: TOO_LARGE with EBUSY (try again later), the client's
    error naming the write it answered, and the others of its burst. A client given
    ``on_write_error`` has each handed to it as its reply comes, never raised by a
    later call; a client without it has the first raised, the burst with it. Sent again
    once there is room, the refused pieces verify."""
    import errno

    from pieced.storage.errors import PiecedError, TooLarge

    d = Daemon(tmp_path, env={"PIECED_MAX_PARTIAL_PIECES": "1"})  # (2 for one torrent)
    try:
        content = make_payload(tmp_path / "src", {"a.bin": 8 * 16384}, seed=91)
        raw = make_torrent_lt(content, 16384, "v1")
        src = Source(raw, tmp_path / "src")
        handed: list[PiecedError] = []
        with Client(d.socket, on_write_error=handed.append) as a, Client(d.socket) as b:
            ih = a.register(raw, tmp_path / "dl")
            a.write_chunk(ih, 0, 0, src.read(0, 0, 100))
            a.write_block_direct(ih, 1, 0, src.read(1, 0, 100))
            a.write_chunk(ih, 2, 0, src.read(2, 0, 100))
            a.write_block_direct(ih, 3, 0, src.read(3, 0, 100))
            a.wait_writes()  # (nothing raised: handed over)
            assert a.status(ih)["partial_pieces"] == 2
            assert [e.block for e in handed] == [(ih, 2, 0, 100), (ih, 3, 0, 100)]
            assert all(isinstance(e, TooLarge) and e.errno == errno.EBUSY for e in handed)
            for p in (4, 5):
                b.write_chunk(ih, p, 0, src.read(p, 0, 100))
            with pytest.raises(TooLarge) as got:
                b.wait_writes()
            assert got.value.errno == errno.EBUSY and got.value.others == 1
            assert got.value.block == (ih, 4, 0, 100)
            assert [e.block for e in got.value.further] == [(ih, 5, 0, 100)]
            for p in range(8):  # the first two finished, then the others whole
                a.write_chunk(ih, p, 0, src.read(p, 0, 16384))
                a.wait_writes()
            a.flush_all()
            assert a.status(ih)["verified_pieces"] == 8
            assert len(handed) == 2
    finally:
        assert d.stop() == 0


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_a_piece_written_a_byte_here_and_there_holds_no_more_ranges_than_it_has_blocks(
        tmp_path: Path, backend: str) -> None:
    """The ranges of a piece received are kept in memory, outside any budget: a client
    writing a byte at every other offset of 16 MiB pieces grew the daemon by 1.2 GiB in
    four minutes. A write that would leave more separate ranges than the piece has
    blocks, pads and files, and SPARE_SPANS, is refused (TOO_LARGE), nothing of it
    written; blocks as peers send them, every other one first, still make the whole
    piece, as do writes of a kilobyte, the even ones first (two writers at once)."""
    from pieced.storage.disk import DiskIO
    from pieced.storage.errors import TooLarge
    from pieced.storage.hashing import SPARE_SPANS

    content = make_payload(tmp_path / "src", {"a.bin": 8 * 16384}, seed=90)
    raw = make_torrent_lt(content, 8 * 16384, "hybrid")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        ranges = 8 + 1 + SPARE_SPANS  # its blocks, its one file (no pad), and the spare
        for k in range(ranges):
            dio.write_block_direct(ih, 0, 2 * k, src.read(0, 2 * k, 1))
        with pytest.raises(TooLarge, match="ranges"):
            dio.write_block_direct(ih, 0, 2 * ranges, src.read(0, 2 * ranges, 1))
        with pytest.raises(TooLarge, match="ranges"):
            dio.write_chunk(ih, 0, 2 * ranges, src.read(0, 2 * ranges, 1))
        assert len(dio.torrent(ih).partial[0].hasher.received.spans) == ranges
        dio.write_chunk(ih, 0, 1, src.read(0, 1, 1))  # (joins two: room for one more)
        dio.clear_piece(ih, 0)
        for b in [*range(0, 8, 2), *range(1, 8, 2)]:  # every other block first
            result = dio.write_block_direct(ih, 0, b * 16384, src.read(0, b * 16384, 16384))
        assert result is not None and result.ok
        size = 8 * 16384
        chunks = [(at, min(1000, size - at)) for at in range(0, size, 1000)]
        ih2 = dio.register(make_torrent_lt(content, 16384, "v1"), tmp_path / "dl2")
        src2 = Source(make_torrent_lt(content, 16384, "v1"), tmp_path / "src")
        for at, n in chunks[::2] + chunks[1::2]:  # a kilobyte at a time, the even first
            p, b = divmod(at, 16384)
            while n:
                k = min(n, 16384 - b)
                dio.write_chunk(ih2, p, b, src2.read(p, b, k))
                at, n = at + k, n - k
                p, b = divmod(at, 16384)
        dio.flush_all()
        assert dio.status(ih2)["verified_pieces"] == 8
    finally:
        dio.close()


def test_buffered_blocks_of_a_byte_are_charged_what_they_hold(tmp_path: Path) -> None:
    """A buffered block was charged its bytes alone, so blocks of a byte each filled a
    budget with hundreds of times its size in memory. Each is charged its bookkeeping
    too (DIRTY_OVERHEAD): the write buffer stays within the budget in what it holds,
    and the writes past it go straight to disk."""
    from pieced.storage.bufferpool import DIRTY_OVERHEAD
    from pieced.storage.disk import DiskIO

    content = make_payload(tmp_path / "src", {"a.bin": 64 * 16384}, seed=91)
    raw = make_torrent_lt(content, 64 * 16384, "v1")
    src = Source(raw, tmp_path / "src")
    budget = 64 * 1024
    dio = DiskIO("posix", cache_bytes=budget)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        for b in range(3000):  # one after the other: one range, 3,000 blocks
            dio.write_chunk(ih, 0, b, src.read(0, b, 1))
        held = dio.pool.dirty_blocks((dio.torrent(ih).id, 0))
        assert len(held) * (1 + DIRTY_OVERHEAD) <= budget, len(held)
        assert dio.stats()["write_buffer_bytes"] <= budget
        dio.write_chunk(ih, 0, 3000, src.read(0, 3000, 64 * 16384 - 3000))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == 1
    finally:
        dio.close()


def test_a_start_with_fewer_pieces_in_progress_allowed_than_were_kept_takes_up_what_fits(
        tmp_path: Path) -> None:
    """A clean stop kept 150 pieces in progress (3 torrents); the next start allows 20
    (max_partial_pieces lowered), so twice that at most. The daemon refused to start
    at all ("40 pieces are in progress, the limit is 20"): it takes up those that fit,
    and the others are fetched whole again."""
    from pieced.storage.disk import DiskIO

    state = tmp_path / "state"
    dio = DiskIO("posix", state_dir=state)
    ihs = []
    for k in range(3):
        content = make_payload(tmp_path / f"src{k}", {"a.bin": 60 * 16384}, seed=95 + k)
        raw = make_torrent_lt(content, 16384, "v1")
        src = Source(raw, tmp_path / f"src{k}")
        ih = dio.register(raw, tmp_path / f"dl{k}")
        for p in range(50):
            dio.write_chunk(ih, p, 0, src.read(p, 0, 1000))
        ihs.append(ih)
    dio.close()
    again = DiskIO("posix", state_dir=state, max_partial_pieces=20)
    try:
        held = [again.status(ih)["partial_pieces"] for ih in ihs]
        assert sum(held) == 40 and again._partials == 40, held
    finally:
        again.close()


def test_a_piece_buffers_no_more_blocks_than_a_64_mib_piece_has(tmp_path: Path) -> None:
    """Each new buffered block is looked for overlaps among those of its piece: blocks of
    a byte each, ten thousand of them, made every write slower than the one before
    (80,000 took 200 s on the direct backend, and held up a stop). A piece buffers at
    most MAX_DIRTY_BLOCKS; the rest go straight to disk, and the piece verifies."""
    from pieced.storage.bufferpool import MAX_DIRTY_BLOCKS
    from pieced.storage.disk import DiskIO

    size = 16384 * 4
    content = make_payload(tmp_path / "src", {"a.bin": size}, seed=92)
    raw = make_torrent_lt(content, size, "v1")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO("posix", cache_bytes=1 << 30)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        many = MAX_DIRTY_BLOCKS + 1000
        for b in range(many):
            dio.write_chunk(ih, 0, b, src.read(0, b, 1))
        assert len(dio.pool.dirty_blocks((dio.torrent(ih).id, 0))) == MAX_DIRTY_BLOCKS
        dio.write_chunk(ih, 0, many, src.read(0, many, size - many))
        dio.flush_all()
        assert dio.status(ih)["verified_pieces"] == 1
    finally:
        dio.close()


def test_the_hash_state_of_a_v2_piece_in_progress_is_33_bytes_a_leaf(tmp_path: Path) -> None:
    """Four 64 MiB pieces of a v2 torrent in progress, every block in but the first (its
    leaves hashed, its SHA-256 tree waiting): the state they hold outside the budget is
    what ``max_partial_pieces`` documents, 33 bytes a 16 KiB leaf (132 KiB a piece). It
    was a dict of digests, over 500 KiB a piece: 2 GiB at the bound of 4096. (On the
    backend that stores nothing: what is measured is the hash state alone.)"""
    import tracemalloc

    from pieced.storage.disk import DiskIO

    piece = 64 * 1024 * 1024
    (tmp_path / "src").mkdir()
    with open(tmp_path / "src" / "zeros.bin", "wb") as f:
        f.truncate(4 * piece)  # (sparse: libtorrent hashes zeros)
    raw = make_torrent_lt(tmp_path / "src" / "zeros.bin", piece, "v2")
    dio = DiskIO("disabled", cache_bytes=0, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        block = bytes(16384)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for p in range(4):
                for begin in range(16384, piece, 16384):
                    dio.write_chunk(ih, p, begin, block)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        print(f"four 64 MiB v2 pieces in progress: {held / 4 / 1024:.0f} KiB a piece")
        assert dio.status(ih)["partial_pieces"] == 4
        assert held / 4 < 160 * 1024, held
    finally:
        dio.close()


def test_register_unregister_storm_gives_no_internal_error(tmp_path: Path, backend: str) -> None:
    """Two clients register and unregister one torrent while a third writes its blocks
    and a fourth rechecks it, for a bounded time: every refusal has its code (never
    INTERNAL), and after kill -9 the torrent is registered with its save path, or absent,
    never half there. Four seconds of it on posix, two on the other backends."""
    import signal
    import threading

    from pieced.storage.errors import ErrorCode, PiecedError

    content = make_payload(tmp_path / "src", {"a.bin": 300_000, "b/c.bin": 200_001}, seed=8)
    raw = make_torrent_lt(content, 32768, "hybrid")
    src = Source(raw, tmp_path / "src")
    ih = src.meta.info_hash
    d = Daemon(tmp_path, backend=backend)
    seen: dict[str, int] = {}
    internal: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + (4.0 if backend == "posix" else 2.0)

    def note(exc: PiecedError) -> None:
        with lock:
            seen[exc.code.name] = seen.get(exc.code.name, 0) + 1
            if exc.code == ErrorCode.INTERNAL:
                internal.append(str(exc))

    def churn(k: int) -> None:
        with Client(d.socket) as c:
            while time.monotonic() < end:
                for call in (lambda: c.register(raw, tmp_path / f"dl{k}"),
                             lambda: c.unregister(ih, delete_files=k == 1)):
                    try:
                        call()
                    except PiecedError as exc:
                        note(exc)

    def write() -> None:
        with Client(d.socket) as c:
            while time.monotonic() < end:
                for p, b, n in src.peer_blocks():
                    try:
                        c.write_chunk(ih, p, b, src.read(p, b, n))
                        c.wait_writes()
                    except PiecedError as exc:
                        note(exc)

    def recheck() -> None:
        with Client(d.socket) as c:
            while time.monotonic() < end:
                try:
                    c.recheck(ih)
                except PiecedError as exc:
                    note(exc)

    threads = [threading.Thread(target=f, args=a) for f, a in
               [(churn, (0,)), (churn, (1,)), (write, ()), (recheck, ())]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    print("refusals seen:", seen)
    assert not internal, internal[:5]
    assert seen.get("UNKNOWN_TORRENT", 0) + seen.get("ALREADY_REGISTERED", 0) > 0  # it did race
    with Client(d.socket) as c:
        listed = {t["ih"]: t for t in c.torrents()}
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    d2 = Daemon(tmp_path, backend=backend)
    try:
        with Client(d2.socket) as c:
            after = {t["ih"]: t for t in c.torrents()}
            assert set(after) == set(listed)
            for key, t in after.items():
                assert t["save_path"] == listed[key]["save_path"]
                assert c.status(key)["num_pieces"] == src.meta.num_pieces
    finally:
        rc = d2.stop()
    err = d2.stderr()
    assert rc == 0, err
    assert "skipped" not in err and "damaged" not in err, err
    folders = list((tmp_path / "var" / "torrents").iterdir())
    assert len(folders) == len(listed)
    for f in folders:  # never half a record
        assert {p.name for p in f.iterdir()} >= {"metainfo.torrent", "location", "resume"}


def test_a_bencode_bomb_is_refused_early_and_disturbs_no_one(daemon: Daemon) -> None:
    """An 8 MB request body of four million empty lists: refused after a few thousand
    values (not decoded for seconds into hundreds of MiB), that client is dropped, and
    another client is answered meanwhile."""
    import threading

    from pieced.protocol.frames import HEADER

    body = b"d1:xl" + b"le" * 4_000_000 + b"ee"
    frame = HEADER.pack(8 + len(body), FrameType.REQUEST, 0, 0, 1) + body
    bomb = RawConn(daemon.socket)
    sent = threading.Thread(target=lambda: bomb.sock.sendall(frame))
    with Client(daemon.socket) as c, Meanwhile(daemon):
        sent.start()
        for _ in range(20):  # answered while the bomb arrives
            c.stats()
        (reply,) = bomb.replies(1)
        sent.join(30)
        assert reply.type == FrameType.ERROR
        assert b"too many values" in bytes(reply.body.get(b"message", b""))
        bomb.sock.settimeout(10)
        assert bomb.sock.recv(1) == b""  # the bomb was dropped...
        assert c.stats()  # ...and we were not


def _peak_rss_while(d: Daemon, threads: list[Any], base: int) -> int:
    """Start ``threads`` and sample the daemon's RSS until they end: the highest seen."""
    for t in threads:
        t.start()
    peak = base
    while any(t.is_alive() for t in threads):
        peak = max(peak, proc_bytes(d.proc.pid))
        time.sleep(0.005)
    return peak


def test_idle_connections_cost_little_and_are_dropped_without_hello(tmp_path: Path) -> None:
    """250 connections that never send a byte: each costs no receive buffer until bytes
    arrive, and each is dropped when its HELLO is overdue, freeing its client slot."""
    d = Daemon(tmp_path, env={"PIECED_HANDSHAKE_TIMEOUT_MS": "1500"})
    socks = []
    try:
        with Client(d.socket) as c:
            before = proc_bytes(d.proc.pid)
            for _ in range(250):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(d.socket))
                socks.append(s)
            deadline = time.monotonic() + 10
            while c.stats()["connected_clients"] < 251 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.stats()["connected_clients"] == 251
            grown = proc_bytes(d.proc.pid) - before
            assert grown < 64 * 1024 * 1024, grown  # not 250 x 8 MiB
            with Meanwhile(d):  # a client downloads while they time out
                for s in socks:  # each gets the reason before the daemon hangs up
                    s.settimeout(20)
                    assert s.recv(4096)
            deadline = time.monotonic() + 20
            while c.stats()["connected_clients"] > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.stats()["connected_clients"] == 1  # they went; the client that spoke did not
    finally:
        for s in socks:
            s.close()
        assert d.stop() == 0


def _mib_pieces(tmp_path: Path, size: int, seed: int) -> tuple[bytes, Source]:
    """A v1 torrent of pieces of 1 MiB over ``size`` bytes in ``tmp_path/src``."""
    content = make_payload(tmp_path / "src", size, seed=seed)
    raw = make_torrent_lt(content, 1 << 20, "v1")
    return raw, Source(raw, tmp_path / "src")


def _slow_frame_served(d: Daemon, ih: bytes, src: Source) -> None:
    """A client sends a 1 MiB block's frame in four parts a second apart: acknowledged."""
    slow = RawConn(d.socket)
    whole = encode_write_header(3, ih, 1, 0, 1 << 20) + src.read(1, 0, 1 << 20)
    for k in range(4):
        slow.sock.sendall(whole[k * len(whole) // 4 : (k + 1) * len(whole) // 4])
        time.sleep(1.0)
    (ack,) = slow.replies(1)
    assert ack.type == FrameType.ACK and ack.id == 3, ack


def _told_unfinished(conns: list[RawConn]) -> None:
    """Each connection is told its frame is unfinished (ERROR id 0), then hung up on."""
    for conn in conns:
        (why,) = conn.replies(1)
        assert why.type == FrameType.ERROR and why.id == 0, why
        assert b"unfinished" in why.body[b"message"], why.body
        with pytest.raises(ConnectionError):
            conn.replies(1)


def _given_back(d: Daemon, before: int) -> None:
    """The daemon's memory comes back within 32 MiB of ``before``."""
    deadline = time.monotonic() + 10
    while proc_bytes(d.proc.pid) - before > 32 * (1 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc_bytes(d.proc.pid) - before <= 32 * (1 << 20)


def test_a_frame_left_unfinished_is_given_up_and_its_buffer_freed(
        tmp_path: Path, freezable_fs: Any) -> None:
    """Twenty connections each send most of a 7 MiB frame, and no more: each held 7 MiB
    of receive buffer for as long as it stayed (max_clients of them, gigabytes outside
    any budget). Once nothing more has come for frame_timeout they are told why and
    dropped, their memory given back; the replies to what they sent before come first.
    A client that sends its frame slowly, and one the daemon itself stops reading (its
    writes wait for a torrent a move holds, on a frozen file system), are not dropped."""
    MiB = 1 << 20
    d = Daemon(tmp_path, env={"PIECED_FRAME_TIMEOUT_MS": "1500"})
    stalled: list[RawConn] = []
    try:
        raw, src = _mib_pieces(tmp_path, 16 * MiB, 5)
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            before = proc_bytes(d.proc.pid)
            for _ in range(20):
                conn = RawConn(d.socket)
                conn.sock.sendall(encode_request(1, "stats", {})
                                  + encode_write_header(2, ih, 0, 0, 7 * MiB) + bytes(6 * MiB))
                stalled.append(conn)
            assert all(conn.replies(1)[0].type == FrameType.RESPONSE for conn in stalled)
            held = proc_bytes(d.proc.pid) - before
            assert held > 20 * 5 * MiB, held  # (the bytes are there: 6 MiB each)
            _slow_frame_served(d, ih, src)
            _told_unfinished(stalled)
            _given_back(d, before)  # (their buffers)
            assert c.stats()["clients_dropped"] == 20

            # The daemon's own pause: the move holds the torrent on a frozen file system,
            # the writes wait, reading stops once 8 MiB of them are queued; the frame
            # begun after them waits far longer than frame_timeout, not for the client.
            freezable_fs.freeze()
            mover = RawConn(d.socket)
            mover.sock.sendall(encode_request(1, "move_storage",
                                              {"ih": ih, "new_path": str(freezable_fs.mount)}))
            time.sleep(0.5)  # (the move holds the torrent)
            held_back = RawConn(d.socket)
            frames = b"".join(encode_write_header(10 + p, ih, p, 0, MiB) + src.read(p, 0, MiB)
                              for p in range(2, 12))
            last = encode_write_header(30, ih, 12, 0, MiB) + src.read(12, 0, MiB)
            sender = threading.Thread(target=held_back.sock.sendall,
                                      args=(frames + last[: len(last) // 2],))
            sender.start()
            time.sleep(4.0)
            freezable_fs.thaw()
            sender.join(30)
            held_back.sock.sendall(last[len(last) // 2 :])
            (moved,) = mover.replies(1)
            assert moved.type == FrameType.RESPONSE, moved
            acks = held_back.replies(11)
            assert [f.type for f in acks] == [FrameType.ACK] * 11, acks
            c.flush_all()
            assert c.status(ih, files=False)["verified_pieces"] == 12  # (pieces 1 to 12)
            assert c.stats()["clients_dropped"] == 20
    finally:
        freezable_fs.thaw()
        for conn in stalled:
            conn.close()
        assert d.stop() == 0, d.stderr()


def test_a_frame_trickled_in_is_given_up_too(tmp_path: Path) -> None:
    """Ten connections each send 6 MiB of a 7 MiB frame, then go on sending it a few
    bytes at a time: nothing more for frame_timeout never came, so each held its 6 MiB
    for as long as it trickled (at max_clients, gigabytes, for ever). A frame must come
    in at 16 KiB a second at least: they are told why and dropped, their memory given
    back, while a client whose frame comes in four parts a second apart is served."""
    MiB = 1 << 20
    d = Daemon(tmp_path, env={"PIECED_FRAME_TIMEOUT_MS": "1500"})
    tricklers: list[RawConn] = []
    stop = threading.Event()
    try:
        raw, src = _mib_pieces(tmp_path, 4 * MiB, 6)
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            before = proc_bytes(d.proc.pid)
            for _ in range(10):
                conn = RawConn(d.socket)
                conn.sock.sendall(encode_write_header(2, ih, 0, 0, 7 * MiB) + bytes(6 * MiB))
                tricklers.append(conn)

            def trickle() -> None:
                while not stop.wait(0.1):
                    for conn in tricklers:
                        with contextlib.suppress(OSError):
                            conn.sock.send(bytes(8))

            threading.Thread(target=trickle, daemon=True).start()
            _slow_frame_served(d, ih, src)
            _told_unfinished(tricklers)
            stop.set()
            _given_back(d, before)  # (their buffers)
            assert c.stats()["clients_dropped"] == 10
    finally:
        stop.set()
        for conn in tricklers:
            conn.close()
        assert d.stop() == 0, d.stderr()


def test_a_frame_begun_late_in_a_window_gets_a_window_of_its_own(tmp_path: Path) -> None:
    """A request answered, then, most of a frame_timeout later, the first KiB of a
    block's frame, and the rest of it a little later: the frame was judged at the end
    of the window the first request had opened, by the bytes of that window (about a
    KiB, under 16 KiB a second), and the client dropped for a frame it had begun a
    moment before. Each frame begun has a window of its own."""
    MiB = 1 << 20
    d = Daemon(tmp_path, env={"PIECED_FRAME_TIMEOUT_MS": "1500"})
    try:
        raw, src = _mib_pieces(tmp_path, 2 * MiB, 7)
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            conn = RawConn(d.socket)
            whole = encode_write_header(3, ih, 0, 0, MiB) + src.read(0, 0, MiB)
            # (the first, in two parts: the window is opened by a frame not yet whole)
            first = encode_request(1, "stats", {})
            conn.sock.sendall(first[:10])
            time.sleep(0.1)
            conn.sock.sendall(first[10:])
            (reply,) = conn.replies(1)
            assert reply.type == FrameType.RESPONSE, reply
            time.sleep(1.2)
            conn.sock.sendall(whole[:1024])
            time.sleep(0.6)  # (past the end of the first window)
            conn.sock.sendall(whole[1024:])
            (ack,) = conn.replies(1)
            assert ack.type == FrameType.ACK and ack.id == 3, ack
            assert c.stats()["clients_dropped"] == 0
            conn.close()
    finally:
        assert d.stop() == 0, d.stderr()


def test_requests_queued_behind_a_long_one_are_bounded_in_bytes(tmp_path: Path) -> None:
    """A recheck, then 200 requests of 1 MiB each, sent at once: the daemon parses only
    about a receive buffer's worth behind the busy lane and stops reading the rest until
    the lane catches up (before, all 200 MiB were parsed and held)."""
    import threading

    d = Daemon(tmp_path, env={"PIECED_HASH_WORKERS": "1"})
    try:
        content = make_payload(tmp_path / "src", 96 * 1024 * 1024, seed=3)
        raw = make_torrent_lt(content, 16384, "hybrid")
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "src")
        conn = RawConn(d.socket)
        big = encode_request(2, "frobnicate", {"x": b"x" * (1024 * 1024)})
        frames = [encode_request(1, "recheck", {"ih": ih, "full": 1})]
        frames += [big] * 200
        sender = threading.Thread(target=lambda: conn.sock.sendall(b"".join(frames)))
        before = proc_bytes(d.proc.pid)
        with Meanwhile(d):
            sender.start()
            peak = before
            while sender.is_alive():
                peak = max(peak, proc_bytes(d.proc.pid))
                time.sleep(0.01)
            replies = conn.replies(201)
        assert replies[0].type == FrameType.RESPONSE
        assert all(r.type == FrameType.ERROR for r in replies[1:])
        grown = peak - before
        print(f"daemon RSS grew {grown / 2**20:.1f} MiB while 200 MiB of requests were sent")
        assert grown < 100 * 1024 * 1024, grown
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_million_piece_torrent_with_scattered_partial_pieces(
    tmp_path: Path, backend: str
) -> None:
    """A torrent of 1,000,000 pieces; a client writes 16 bytes into 20,000 scattered
    pieces. Past max_partial_pieces each new piece is refused (TOO_LARGE, its id only),
    and the daemon's RSS stays within its budget plus 64 MiB."""
    import random

    import bencodepy
    from pieced.storage.errors import TooLarge

    n = 1_000_000
    info = {b"name": b"huge.bin", b"piece length": 16384, b"length": 16384 * n,
            b"pieces": random.Random(1).randbytes(20 * n)}
    raw = bencodepy.encode({b"info": info})
    budget = 16 * 1024 * 1024
    # default frame limit (8 MiB): the 20 MB metainfo goes in a memfd
    d = Daemon(tmp_path, env={"PIECED_CACHE_BYTES": str(budget)}, backend=backend)
    try:
        base = proc_bytes(d.proc.pid)
        with Client(d.socket) as c:
            # Registering the 20 MB metainfo costs a few times its size for a moment
            # (bounded by max_metainfo_bytes); the bound below is on what the writes hold.
            ih = c.register(raw, tmp_path / "dl")
        registered = proc_bytes(d.proc.pid)  # the torrent's own state (its 20 MB of hashes)
        with Client(d.socket) as c, Meanwhile(d, budget):
            refused = unsent = 0
            pieces = random.Random(2).sample(range(n), 20_000)
            for p in pieces:
                try:  # a refusal is raised at the next call (which sends nothing), with
                    c.write_chunk(ih, p, 0, b"x" * 16)  # the rest of its burst
                except TooLarge as exc:
                    refused += 1 + exc.others
                    unsent += 1
            try:
                c.wait_writes()
            except TooLarge as exc:
                refused += 1 + exc.others
            st = c.status(ih)
            assert st["partial_pieces"] == 4096
            assert refused == 20_000 - unsent - 4096
            peak = proc_bytes(d.proc.pid)
        print(f"1M-piece torrent: RSS at start {base / 2**20:.1f} MiB, registered "
              f"{registered / 2**20:.1f} MiB, with 4096 partial pieces {peak / 2**20:.1f} MiB")
        assert registered <= base + 3 * len(raw), registered
        assert peak <= budget + 64 * 1024 * 1024 + registered, peak
    finally:
        assert d.stop() == 0, d.stderr()


def test_small_reads_of_huge_pieces_cost_what_they_return(tmp_path: Path, backend: str) -> None:
    """READs of 16 bytes from 64 MiB pieces, from four connections at once: each reads
    its 16 bytes, not the whole piece (which would not fit the 16 MiB budget anyway)."""
    import threading

    import bencodepy

    piece = 64 * 1024 * 1024
    info = {b"name": b"big.bin", b"piece length": piece, b"length": 4 * piece,
            b"pieces": bytes(20 * 4)}
    raw = bencodepy.encode({b"info": info})
    dl = tmp_path / "dl"
    dl.mkdir()
    with open(dl / "big.bin", "wb") as f:  # sparse: reads are zeros, nothing on disk
        f.truncate(4 * piece)
    budget = 16 * 1024 * 1024
    d = Daemon(tmp_path, env={"PIECED_CACHE_BYTES": str(budget)}, backend=backend)
    errors: list[BaseException] = []
    try:
        base = proc_bytes(d.proc.pid)
        with Client(d.socket) as c:
            ih = c.register(raw, dl)

        def reader(k: int) -> None:
            try:
                with Client(d.socket) as rc:
                    for i in range(50):
                        assert rc.read_chunk(ih, (k + i) % 4, piece - 16 - i, 16) == bytes(16)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        with Meanwhile(d, budget):
            peak = _peak_rss_while(d, threads, base)
        assert not errors, errors
        print(f"huge-piece reads: RSS {base / 2**20:.1f} -> peak {peak / 2**20:.1f} MiB")
        assert peak - base < 32 * 1024 * 1024, peak - base  # four whole pieces: 256 MiB
    finally:
        assert d.stop() == 0, d.stderr()


def test_rechecks_of_huge_pieces_read_them_in_parts(tmp_path: Path, backend: str) -> None:
    """Three connections recheck three torrents of 64 MiB pieces at once: each hashing
    thread reads into one buffer of at most 4 MiB, not a piece-sized one per recheck."""
    import threading

    piece = 64 * 1024 * 1024
    torrents = [(sparse_zero_torrent(tmp_path / f"dl{k}", f"zeros{k}.bin", piece, 2),
                 tmp_path / f"dl{k}") for k in range(3)]
    d = Daemon(tmp_path, env={"PIECED_CACHE_BYTES": str(16 * 1024 * 1024)}, backend=backend)
    errors: list[BaseException] = []
    try:
        with Client(d.socket) as c:
            ihs = [c.register(raw, dl) for raw, dl in torrents]
        base = proc_bytes(d.proc.pid)

        def recheck(ih: bytes) -> None:
            try:
                with Client(d.socket) as rc:
                    assert rc.recheck(ih, full=True)["verified"] == 2
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=recheck, args=(ih,)) for ih in ihs]
        with Meanwhile(d, 16 * 1024 * 1024):
            peak = _peak_rss_while(d, threads, base)
        assert not errors, errors
        print(f"huge-piece rechecks: RSS {base / 2**20:.1f} -> peak {peak / 2**20:.1f} MiB")
        # piece-sized buffers: two hashing threads x three rechecks x 64 MiB; one of them
        # alone is over the bound (measured 27-28 MiB, 32.2 MiB once on a busy machine)
        assert peak - base < 48 * 1024 * 1024, peak - base
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_pieces_read_in_parts_verify_as_whole_ones(tmp_path: Path, backend: str) -> None:
    """A hybrid of 8 MiB pieces (read in parts by a recheck): every piece verifies, and a
    byte changed in a piece's second part fails that piece alone, by fingerprint and by
    the torrent's own hashes."""
    from pieced.storage.disk import DiskIO
    from pieced.storage.verify import STREAM_BYTES

    piece = 8 * 1024 * 1024
    assert piece > STREAM_BYTES
    content = make_payload(tmp_path / "dl", {"a.bin": piece + 5, "b.bin": 2 * piece + 70_000},
                           seed=6)
    raw = make_torrent_lt(content, piece, "hybrid")
    dio = DiskIO(backend, roots=[tmp_path], cache_bytes=0)
    try:
        ih = dio.register(raw, tmp_path / "dl")
        first = dio.recheck(ih)
        assert first.ok and first.fingerprint_hits == 0
        assert dio.recheck(ih).fingerprint_hits == first.num_pieces
        meta = dio._torrents[ih].meta
        b_index = next(i for i, f in enumerate(meta.files) if f.path[-1] == "b.bin")
        start = dio._torrents[ih].layout.file_pieces(b_index)[0]
        with open(content / "b.bin", "r+b") as f:  # 6 MiB into the file's second piece
            f.seek(piece + 6 * 1024 * 1024)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 1]))
        for full in (False, True):
            result = dio.recheck(ih, full=full)
            assert result.failed_v1 == [start + 1] and result.failed_v2 == [start + 1], full
            assert sum(result.have) == result.num_pieces - 1
        with open(content / "b.bin", "r+b") as f:  # put back: the piece's fingerprint,
            f.seek(piece + 6 * 1024 * 1024)       # of the bytes it verified with, holds
            f.write(byte)
        again = dio.recheck(ih)
        assert again.ok and again.fingerprint_hits == again.num_pieces
    finally:
        dio.close()


def test_registers_of_large_metainfo_at_once_hold_one_at_a_time(tmp_path: Path) -> None:
    """Twelve clients register at once a 40 MB metainfo (more than a frame: it comes in
    a memfd), which fails to parse: each is read and parsed in turn, so the daemon holds
    the megabytes of one or two at a time, not twelve (sixteen such registers took it to
    0.9 GiB), and every client gets its error."""

    import bencodepy
    from pieced.storage.errors import BadMetainfo

    n = 2_000_000  # 40 MB of hashes for a torrent of one piece
    info = {b"name": b"z.bin", b"piece length": 16384, b"length": 5, b"pieces": bytes(20 * n)}
    raw = bencodepy.encode({b"info": info})
    d = Daemon(tmp_path)
    try:
        base = peak_from_now(d.proc.pid)
        errors: list[BaseException] = []

        def register(k: int) -> None:
            with Client(d.socket) as c:
                try:
                    c.register(raw, tmp_path / f"dl{k}")
                except BadMetainfo as exc:
                    errors.append(exc)

        run_threads(*(functools.partial(register, k) for k in range(12)), timeout=60)
        assert len(errors) == 12, errors
        peak = proc_bytes(d.proc.pid, "VmHWM") - base
        print(f"12 registers of {len(raw) / 2**20:.0f} MiB at once: daemon peak "
              f"+{peak / 2**20:.0f} MiB")
        assert peak < 4 * len(raw), peak
    finally:
        assert d.stop() == 0, d.stderr()


def _v2_of_many_files(count: int) -> bytes:
    """A v2 metainfo of ``count`` files of 10 bytes in 100 folders (each file under a
    block: no piece layers), about 77 bytes a file."""
    import hashlib

    folders: dict[bytes, list[bytes]] = {}
    for i in range(count):
        root = hashlib.sha256(b"%010d" % i).digest()
        folders.setdefault(b"d%03d" % (i % 100), []).append(
            b"8:f%07dd0:d6:lengthi10e11:pieces root32:%see" % (i, root))
    tree = b"d" + b"".join(b"4:%sd%se" % (name, b"".join(sorted(files)))
                           for name, files in sorted(folders.items())) + b"e"
    return (b"d4:infod9:file tree" + tree + b"12:meta versioni2e4:name1:t"
            b"12:piece lengthi16384ee12:piece layersdee")


def test_registers_of_large_metainfo_in_their_frames_are_parsed_one_at_a_time(
        tmp_path: Path) -> None:
    """A metainfo of a few MB sent in the register's frame (under max_frame_bytes) is
    parsed into a tree of Python objects some times its size. Four registers of one at
    once (each refused in the end: the torrent is registered) run in turn: the daemon's
    peak grows about as much as for one, not four times as much."""
    from pieced.storage.errors import AlreadyRegistered

    raw = _v2_of_many_files(30_000)
    assert 2 << 20 < len(raw) < 8 << 20
    d = Daemon(tmp_path)
    try:
        refused: list[BaseException] = []

        def register() -> None:
            with Client(d.socket) as c:
                try:
                    c.register(raw, tmp_path / "dl")
                except AlreadyRegistered as exc:
                    refused.append(exc)

        register()
        grown = []
        for clients in (1, 4):
            base = peak_from_now(d.proc.pid)
            run_threads(*[register] * clients, timeout=120)
            grown.append(proc_bytes(d.proc.pid, "VmHWM") - base)
        assert len(refused) == 5
        print(f"registers of {len(raw) / 2**20:.1f} MB: peak +{grown[0] / 2**20:.0f} MiB "
              f"for one, +{grown[1] / 2**20:.0f} MiB for four at once")
        assert grown[1] < 2.5 * max(grown[0], 4 << 20), grown
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_huge_piece_whose_first_block_came_last_is_finished_a_part_at_a_time(
        tmp_path: Path, backend: str) -> None:
    """A 64 MiB piece whose blocks came in reverse order (as a plugin passing blocks on
    as several peers send them may): its SHA-1 and fingerprint start at its first byte,
    so on completion the rest is read back and hashed. It was read in one buffer, the
    whole piece for each piece completing at once (eight clients: +400 MiB with a 64 MiB
    budget). A part at a time now: the peak stays near the budget."""
    from pieced.storage.disk import DiskIO

    piece = 64 * 1024 * 1024
    raw = sparse_zero_torrent(tmp_path / "src", "zeros.bin", piece, 2)
    dio = DiskIO(backend, cache_bytes=8 * 1024 * 1024, roots=[tmp_path])
    try:
        ih = dio.register(raw, tmp_path / "dl")
        block = bytes(16384)
        for begin in range(piece - 16384, 0, -16384):
            dio.write_chunk(ih, 0, begin, block)
        base = peak_from_now()
        result = dio.write_chunk(ih, 0, 0, block)  # the last block: the piece completes
        peak = proc_bytes(os.getpid(), "VmHWM") - base
        print(f"completing a 64 MiB piece out of order: peak +{peak / 2**20:.1f} MiB")
        assert result is not None and result.ok
        assert peak < 24 * 1024 * 1024, peak
    finally:
        dio.close()


def test_a_removed_torrent_is_let_go_at_once(tmp_path: Path, backend: str) -> None:
    """A torrent and its storage made a cycle (a closure of the storage's over the
    torrent): removed, a torrent of a million pieces kept its arrays (100 MB) until the
    collector came by, a minute later. Nothing holds it once it is removed."""
    import gc
    import weakref

    from pieced.storage.disk import DiskIO

    content = make_payload(tmp_path / "src", {"a.bin": 100_000, "b.bin": 5}, seed=9)
    raw = make_torrent_lt(content, 16384, "hybrid")
    src = Source(raw, tmp_path / "src")
    dio = DiskIO(backend, roots=[tmp_path])
    gc.collect()
    gc.disable()
    try:
        ih = dio.register(raw, tmp_path / "dl")
        p, b, n = src.blocks()[0]
        dio.write_chunk(ih, p, b, src.read(p, b, n))
        dio.flush_all()
        torrent = weakref.ref(dio.torrent(ih))
        dio.unregister(ih, delete_files=True)
        assert torrent() is None, [type(r) for r in gc.get_referrers(torrent())]
    finally:
        gc.enable()
        dio.close()


def test_rechecks_asked_while_one_waits_run_once(tmp_path: Path, freezable_fs: Any) -> None:
    """Twelve connections ask a recheck of one torrent while a move holds it (the move
    waits on a frozen file system); half of them hang up at once. A recheck asked while
    another of the same kind waits for the torrent joins it: one check of the data
    answers them all, and a client that asks again and again, or hangs up, queues no
    more work. Before, each ran in turn, twelve full reads of the payload, those of the
    clients gone too. The six that stayed get the full answer and their progress."""
    d = Daemon(tmp_path)
    try:
        content = make_payload(tmp_path / "src", 8 * 1024 * 1024, seed=3)
        raw = make_torrent_lt(content, 65536, "hybrid")
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "src")
            n = c.status(ih)["num_pieces"]
            assert c.recheck(ih, full=True)["verified"] == n
            read_before = c.stats()["bytes_read"]
            freezable_fs.freeze()
            conns = [RawConn(d.socket) for _ in range(13)]
            mover = conns.pop()
            mover.sock.sendall(encode_request(1, "move_storage",
                                              {"ih": ih, "new_path": str(freezable_fs.mount / "x")}))
            time.sleep(0.5)  # the move holds the torrent, waiting on the frozen file system
            for conn in conns:
                conn.sock.sendall(encode_request(1, "recheck", {"ih": ih, "full": 1}))
            time.sleep(0.3)  # (a hang-up before the daemon read the request asks nothing)
            for conn in conns[6:]:
                conn.close()
            freezable_fs.thaw()
            (moved,) = mover.replies(1)
            assert moved.type == FrameType.RESPONSE, moved
            for conn in conns[:6]:
                (reply,) = conn.replies(1)
                assert reply.type == FrameType.RESPONSE, reply
                assert reply.body[b"result"][b"verified"] == n, reply.body
                conn.close()
            mover.close()
            read = c.stats()["bytes_read"] - read_before
            assert c.status(ih, files=False)["have"] == bytes([0xFF] * (n // 8))
    finally:
        assert d.stop() == 0, d.stderr()
    print(f"twelve rechecks asked while a move held the torrent: {read} bytes read")
    assert read <= 2 * 8 * 1024 * 1024, f"{read / (8 * 1024 * 1024):.1f} reads of the payload"


@pytest.mark.parametrize("join", [True, False])
def test_a_recheck_asked_to_join_one_under_way_reads_the_data_once(
        tmp_path: Path, freezable_fs: Any, join: bool) -> None:
    """Two clients find a torrent's data on disk (two pieced-peers started together):
    the first asks a check, which starts (held here by its sync on a frozen file
    system); the second asks one too, with ``join``: it gets the first one's answer,
    and the data is read once, not once after the other. Without ``join`` a recheck
    asked while one runs checks after it (what changed meanwhile included)."""
    content = make_payload(tmp_path / "src", 4 * 1024 * 1024, seed=5)
    raw = make_torrent_lt(content, 65536, "v1")
    shutil.copytree(content.parent, freezable_fs.mount, dirs_exist_ok=True)
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as first, Client(d.socket) as second:
            ih = first.register(raw, freezable_fs.mount)
            n = first.status(ih)["num_pieces"]
            # A block buffered, not yet written: the check's flush writes it first.
            first.write_chunk(ih, 3, 0, content.read_bytes()[:16384][::-1])
            freezable_fs.freeze()
            results: list[dict[str, Any]] = []
            run_first = threading.Thread(target=lambda: results.append(
                first.recheck(ih, join=True)))
            run_first.start()
            time.sleep(1.0)  # (its check has begun: it waits on the frozen file system)
            run_second = threading.Thread(target=lambda: results.append(
                second.recheck(ih, join=join)))
            run_second.start()
            time.sleep(0.5)
            freezable_fs.thaw()
            run_first.join(60)
            run_second.join(60)
            assert [r["verified"] for r in results] == [n - 1, n - 1], results
            checked = first.stats()["recheck_verified"]
    finally:
        freezable_fs.thaw()
        assert d.stop() == 0, d.stderr()
    assert checked == (n - 1 if join else 2 * (n - 1)), checked


def test_clients_gone_with_writes_still_waiting_keep_their_places_until_those_run(
        tmp_path: Path, freezable_fs: Any) -> None:
    """A client sends a write for a torrent another operation holds (a recheck, here
    held by its sync on a frozen file system), and hangs up: its place was free at once,
    but its lane, its receive ring (8 MiB), its shared ring and a worker stayed until
    the write ran. Again and again, that took the daemon's memory and descriptors
    without bound (1.4 GB and every descriptor, other clients' writes failing EMFILE).
    Such a client keeps its place until its jobs have run: past max_clients, newcomers
    are refused, saying why; once the operation ends, the places come free."""
    content = make_payload(tmp_path / "src", 4 * 1024 * 1024, seed=6)
    raw = make_torrent_lt(content, 65536, "v1")
    shutil.copytree(content.parent, freezable_fs.mount, dirs_exist_ok=True)
    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "4"})
    try:
        with Client(d.socket) as first:
            ih = first.register(raw, freezable_fs.mount)
            first.write_chunk(ih, 3, 0, content.read_bytes()[:16384][::-1])  # (buffered)
            freezable_fs.freeze()
            checked: list[dict[str, Any]] = []
            check = threading.Thread(target=lambda: checked.append(first.recheck(ih)))
            check.start()
            time.sleep(1.0)  # (the check holds the torrent: it waits on the file system)
            gone = 0
            refusals: list[str] = []
            for _ in range(12):
                try:
                    raw_conn = RawConn(d.socket)
                except (AssertionError, OSError) as exc:
                    refusals.append(str(exc))
                    continue
                raw_conn.sock.sendall(encode_write_header(1, ih, 5, 0, 16384) + bytes(16384))
                raw_conn.sock.close()
                gone += 1
                time.sleep(0.1)  # (its write reached its lane before the next one)
            with pytest.raises(AccessDenied, match="gone"):
                Client(d.socket).close()
            freezable_fs.thaw()
            check.join(60)
            assert checked and checked[0]["verified"] == 63, checked
            for _ in range(100):  # (the writes waiting run, and the places come free)
                with contextlib.suppress(AccessDenied):
                    with Client(d.socket) as again:
                        assert again.status(ih)["num_pieces"] == 64
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("no place came free once the check ended")
        assert gone == 3 and len(refusals) == 9, (gone, refusals)  # (first held one place)
    finally:
        freezable_fs.thaw()
        assert d.stop() == 0, d.stderr()


def test_the_replies_a_client_leaves_unread_are_bounded_in_memory_not_only_in_bytes(
        tmp_path: Path) -> None:
    """A client sends one-byte WRITEs of a verified piece (each a duplicate, answered
    with a 12-byte ACK) as fast as the daemon reads them, and reads nothing. The
    daemon stops reading it once its unsent output is over the client buffer; that
    output was counted in bytes sent, but each ACK is an object of its own that costs
    four times its bytes: with 4 MiB buffers the daemon's peak grew 23.7 MiB. The
    bound now counts what a queued reply costs: 9.5 MiB (its receive ring, the
    requests parsed, and the replies)."""
    buffer = 4 * 1024 * 1024
    d = Daemon(tmp_path, env={"PIECED_MAX_FRAME_BYTES": str(buffer),
                              "PIECED_CLIENT_BUFFER_BYTES": str(buffer)})
    try:
        content = make_payload(tmp_path / "src", 16384, seed=8)
        raw = make_torrent_lt(content, 16384, "v1")
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "src")
            assert c.recheck(ih)["verified"] == 1
            base = peak_from_now(d.proc.pid)
            flood = RawConn(d.socket)
            one = encode_write_header(1, ih, 0, 0, 1) + b"x"
            burst = memoryview(one * 4096)
            flood.sock.setblocking(False)
            sent = 0
            while True:  # until the daemon has stopped reading it for a second
                try:
                    sent += flood.sock.send(burst[sent % len(burst):])
                except BlockingIOError:
                    if not select.select([], [flood.sock], [], 1.0)[1]:
                        break
            grown = proc_bytes(d.proc.pid, "VmHWM") - base
            assert c.stats()["connected_clients"] == 2  # (held back, not dropped)
            flood.close()
    finally:
        assert d.stop() == 0, d.stderr()
    print(f"{sent // len(one)} one-byte WRITEs unread: the daemon's peak grew "
          f"{grown / 2**20:.1f} MiB with {buffer / 2**20:.0f} MiB buffers")
    assert grown < 4 * buffer, f"{grown / 2**20:.1f} MiB"


def test_unread_replies_of_small_reads_do_not_hold_whole_pieces(
        tmp_path: Path, backend: str) -> None:
    """A client READs 16 KiB of each of sixteen 16 MiB pieces in turn (more than the
    64 MiB budget caches) and reads none of the replies. A reply counts 16 KiB against
    the client's buffer; it was a view of the whole piece read into the cache for it,
    which the cache soon evicted but the reply kept: 40 such replies held 640 MiB
    (2.3 GiB with 150 one-byte reads). A small read of a large buffer is now copied
    out of it."""
    piece, pieces, reads = 16 * 1024 * 1024, 16, 40
    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", piece, pieces)
    buffer = 4 * 1024 * 1024
    d = Daemon(tmp_path, env={"PIECED_CACHE_BYTES": str(64 * 1024 * 1024),
                              "PIECED_CLIENT_BUFFER_BYTES": str(buffer)}, backend=backend)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            assert c.recheck(ih)["verified"] == pieces
            base = peak_from_now(d.proc.pid)
            asked = c.stats()
            slow = RawConn(d.socket)
            for i in range(reads):
                slow.sock.sendall(encode_read(i + 1, ih, i % pieces, 0, 16384))
            deadline = time.monotonic() + 60
            while True:  # until all were read (the replies wait, unread)
                now = c.stats()
                if (now["cache_hits"] + now["cache_misses"]
                        - asked["cache_hits"] - asked["cache_misses"]) >= reads:
                    break
                assert time.monotonic() < deadline, now
                time.sleep(0.05)
            time.sleep(0.2)
            grown = proc_bytes(d.proc.pid, "VmHWM") - base
            got = slow.replies(reads)
            assert [f.id for f in got] == list(range(1, reads + 1))
            assert all(f.type == FrameType.DATA and bytes(f.payload[0]) == bytes(16384)
                       for f in got)
            slow.close()
    finally:
        assert d.stop() == 0, d.stderr()
    print(f"{reads} unread 16 KiB reads of 16 MiB pieces: the daemon's peak grew "
          f"{grown / 2**20:.1f} MiB")
    # The budget, and the pieces being read (80.6 MiB here): not one piece per reply.
    assert grown < 64 * 1024 * 1024 + 2 * piece, f"{grown / 2**20:.1f} MiB"


def test_many_clients_missing_the_cache_at_once_read_few_pieces_whole(
        tmp_path: Path, backend: str) -> None:
    """48 clients read 100 bytes of 16 MiB pieces, each its own, all at once, over a
    64 MiB budget. Each miss read its piece whole into a buffer of its own, outside the
    budget until cached: the daemon grew by a piece a client (3 GiB for 200 clients).
    Pieces are now read whole (to cache them) only while those being read take at
    most an eighth of the budget; the other reads read their range."""
    piece, pieces, clients = 16 * 1024 * 1024, 64, 48
    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", piece, pieces)
    budget = 64 * 1024 * 1024
    d = Daemon(tmp_path, env={"PIECED_CACHE_BYTES": str(budget)}, backend=backend)
    errors: list[BaseException] = []
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            assert c.recheck(ih)["verified"] == pieces
        base = peak_from_now(d.proc.pid)
        start = threading.Barrier(clients)

        def reader(k: int) -> None:
            try:
                with Client(d.socket) as rc:
                    start.wait(30)
                    for i in range(3):
                        p = (k + i * clients) % pieces
                        assert rc.read_chunk(ih, p, 1000 * i, 100) == bytes(100)
            except BaseException as exc:
                errors.append(exc)

        run_threads(*(functools.partial(reader, k) for k in range(clients)), timeout=120)
        assert not errors, errors[:3]
        grown = proc_bytes(d.proc.pid, "VmHWM") - base
    finally:
        assert d.stop() == 0, d.stderr()
    print(f"{clients} clients missing 16 MiB pieces at once: the daemon's peak grew "
          f"{grown / 2**20:.1f} MiB over a {budget >> 20} MiB budget")
    # The budget, the piece being read whole (one at a time here: 16 MiB is over an
    # eighth of it), the buffer of one the cache let go, kept for the next: 64-96 MiB.
    assert grown < budget + 3 * piece, f"{grown / 2**20:.1f} MiB"


def test_small_frames_reuse_the_start_of_the_receive_ring() -> None:
    """Frames taken one at a time, each released before the next arrives: the ring
    starts again from its first byte whenever it is empty. They walked the whole
    buffer instead, making every page of it resident for the connection's life."""
    from pieced.protocol.frames import RecvRing

    ring = RecvRing(1 << 20)
    for i in range(100_000):
        buf = ring.writable()
        assert len(buf) == ring.capacity  # at its start each time
        buf[:44] = bytes([i & 0xFF]) * 44
        ring.wrote(44)
        views, token = ring.take(44)
        assert bytes(views[0]) == bytes([i & 0xFF]) * 44
        ring.release(token)
    ring.wrote(0)
    buf = ring.writable()
    buf[:10] = b"x" * 10
    ring.wrote(10)
    views, held = ring.take(6)  # one held: the ring is not empty, nothing moves
    assert len(ring.writable()) == ring.capacity - 10
    ring.consume(4)
    ring.release(held)
    assert len(ring.writable()) == ring.capacity


def test_a_long_lived_connection_of_small_requests_keeps_its_buffer_small(
        tmp_path: Path) -> None:
    """Three connections each sending 30,000 small READs, one at a time (a plugin
    seeding for days): each made its whole 8 MiB receive buffer resident, kept while
    it stayed connected. Now they cost next to nothing."""
    content = make_payload(tmp_path / "src", 3 * 16384, seed=19)
    raw = make_torrent_lt(content, 16384, "v1")
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "src")
            assert c.recheck(ih)["verified"] == 3
        clients = [Client(d.socket) for _ in range(3)]
        try:
            clients[0].read_chunk(ih, 0, 0, 16)
            before = proc_bytes(d.proc.pid)

            def work(cl: Client) -> None:
                for i in range(30_000):
                    cl.read_chunk(ih, i % 3, 0, 16)

            threads = [threading.Thread(target=work, args=(cl,)) for cl in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            grown = proc_bytes(d.proc.pid) - before
            assert grown < 2 * 1024 * 1024, (grown, before)  # 3 x 1.3 MiB walked before
        finally:
            for cl in clients:
                cl.close()
    finally:
        assert d.stop() == 0


@contextlib.contextmanager
def _server_in_process(tmp_path: Path, workers: int | None = None
                       ) -> Iterator[tuple[Server, Path, list[RawConn]]]:
    """The daemon's server on a Unix socket, run by a loop in a thread of this process
    (its objects seen by the test): it, the socket's path, and a list for the test's
    connections to it, closed before the server stops."""
    disk = DiskIO(cache_bytes=4 * 1024 * 1024, state_dir=tmp_path / "state")
    server = Server(disk, workers=workers)
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    conns: list[RawConn] = []
    try:
        loop.call_soon_threadsafe(server.start, listener)
        yield server, path, conns
    finally:
        for conn in conns:
            conn.sock.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.executor.shutdown()
        server.long_executor.shutdown()
        disk.close()
        listener.close()


@pytest.mark.parametrize("bad", ["unknown frame type", "frame over the limit", "hangs up"])
def test_a_connection_ended_for_a_bad_frame_is_freed_at_once(tmp_path: Path, bad: str) -> None:
    """A client whose stream breaks the framing is told why and hung up on; its
    connection, and the receive ring it filled (up to a frame: 8 MiB), must go with it
    (as they go when a client hangs up).
    The error kept to be said held, through its traceback, the frame that parsed it, and
    so the connection: a cycle, freed only by a full garbage collection, which a daemon
    with a large library runs seldom. (The collector is off here: what is not freed by
    its last reference going stays, and is seen.)"""
    with _server_in_process(tmp_path) as (server, path, conns):
        gc.collect()
        gc.disable()
        try:
            conn = RawConn(path)
            conns.append(conn)
            (held,) = server.clients
            gone = weakref.ref(held)
            del held
            # A large request first (an unknown op, answered), then the bad frame.
            body = encode_request(1, "nothing", {"pad": b"x" * (6 * MiB)})
            if bad == "hangs up":
                conn.sock.sendall(body)
                assert [f.type for f in conn.replies(1)] == [FrameType.ERROR]
                conn.sock.close()
            else:
                tail = (struct.pack(">IBBHI", 8, 99, 0, 0, 2) if bad == "unknown frame type"
                        else struct.pack(">IBBHI", 64 * MiB, FrameType.REQUEST, 0, 0, 2))
                conn.sock.sendall(body + tail)
                replies = conn.replies(2)
                assert [f.type for f in replies] == [FrameType.ERROR, FrameType.ERROR]
                with pytest.raises(ConnectionError):
                    conn.replies(1)
            deadline = time.monotonic() + 10
            while gone() is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert gone() is None, gc.get_referrers(gone())
        finally:
            gc.enable()


def _flood(each: int) -> bytes:
    """READs of a torrent the daemon does not have: each answered with an error, no work
    besides."""
    return b"".join(encode_read(k + 1, bytes(range(20)), 0, 0, 1) for k in range(each))


def test_a_flood_of_requests_is_parsed_in_turns_with_the_other_clients(tmp_path: Path) -> None:
    """Twenty connections each send 4,000 requests at once and read nothing. Each one's
    were parsed in one go, in the event loop: a hundred such held it for seconds, and a
    client's every request, its connect too, waited (a `stats` took 25 s). Each is parsed
    a turn of PARSE_TURN frames at a time, the others' turns between: another client is
    answered while most of the flood waits to be parsed, and the flood is answered whole
    after. (The daemon's own objects, in this process: what is left to parse is seen.)"""
    floods, each = 20, 4000
    flood = _flood(each)
    with _server_in_process(tmp_path) as (server, path, conns):
        conns += [RawConn(path) for _ in range(floods)]
        for conn in conns:
            conn.sock.sendall(flood)

        def left_to_parse() -> int:
            return sum(c.ring.unparsed + int.from_bytes(
                fcntl.ioctl(c.fd, termios.FIONREAD, bytes(4)), "little")
                for c in list(server.clients))

        with Client(path) as good:
            good.stats()
            left = left_to_parse()
        sent = len(flood) * floods
        print(f"answered with {left / sent:.0%} of the flood left to parse")
        assert left > sent // 4, f"{left} of {sent} bytes left to parse"
        for conn in conns:
            replies = conn.replies(each)
            assert sorted(r.id for r in replies) == list(range(1, each + 1))
            assert {r.type for r in replies} == {FrameType.ERROR}


def test_a_lane_with_thousands_of_requests_runs_them_in_turns_with_the_others(
    tmp_path: Path
) -> None:
    """Three connections each have 4,000 requests parsed and waiting in their lanes, then
    another client sends one. A lane ran on its worker for as long as it had jobs: the
    other client's request waited for all 12,000. A run carries out LANE_TURN jobs, then
    the lane waits behind the others' runs: the request is answered with most of the
    flood still waiting. (One short worker, held by the test until the lanes are full;
    the daemon's own objects, in this process: what waits is seen.)"""
    floods, each = 3, 4000
    held = threading.Event()
    with _server_in_process(tmp_path, workers=1) as (server, path, conns):
        try:
            conns += [RawConn(path) for _ in range(floods)]
            server.executor.submit(held.wait, 60)  # (the one short worker, held)
            for conn in conns:
                conn.sock.sendall(_flood(each))

            def waiting() -> int:
                return sum(len(c._lane) for c in list(server.clients))

            deadline = time.monotonic() + 30
            while waiting() < floods * each and time.monotonic() < deadline:
                time.sleep(0.01)
            assert waiting() == floods * each
            good = RawConn(path)
            conns.append(good)
            good.sock.sendall(encode_request(1, "stats", {}))
            time.sleep(0.2)  # (its request parsed, its lane queued behind the floods')
            held.set()
            (reply,) = good.replies(1)
            left = waiting()
            print(f"answered with {left} of {floods * each} flooded requests waiting")
            assert reply.type == FrameType.RESPONSE
            assert left > floods * each // 2
        finally:
            held.set()
