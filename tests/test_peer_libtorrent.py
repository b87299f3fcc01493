"""pieced-peer against libtorrent 2.1 on loopback, both directions: a libtorrent seeder
-> pieced-peer -> pieced, and pieced -> pieced-peer --seed -> a libtorrent leecher, for
v1, v1 with pads, v2-only and hybrid torrents made by libtorrent."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import bencodepy
import libtorrent as lt
import pytest
from pieced.peer import wire
from pieced.peer.plugin import RECONCILE_INTERVAL
from pieced.peer.utp import ST_RESET
from pieced.protocol.client import Client
from pieced.storage.errors import PiecedError, UnknownTorrent
from pieced.storage.metainfo import parse

from tests.conftest import Daemon, sparse_zero_torrent
from tests.ltpeer import LtPeer, handshake_info_hash, make_torrent_v1_pads
from tests.opentracker import OpenTracker
from tests.realtools import TorrentKind, corrupt, lt_recheck, make_payload, make_torrent_lt
from tests.test_disk import Source
from tests.test_peer_utp import _syn


def _files(piece: int) -> dict[str, int]:
    """0 bytes, 1 byte, exactly a piece, a piece plus one, and a few pieces and a bit."""
    return {"a.bin": 3 * piece + 1000, "empty": 0, "one": 1, "sub/exact": piece,
            "sub/deeper/plus1": piece + 1}


def _torrent(kind: str, content: Path, piece: int) -> bytes:
    if kind == "v1-pads":
        return make_torrent_v1_pads(content, piece)
    return make_torrent_lt(content, piece, kind)


def _same_tree(a: Path, b: Path, files: dict[str, int]) -> None:
    for rel, size in files.items():
        got = (b / rel).read_bytes()
        assert len(got) == size, rel
        assert got == (a / rel).read_bytes(), rel


# 1 MiB/s from a libtorrent seeder: time to act mid-download (rate limits apply to
# loopback peers too with limit_loopback)
SLOW: dict[str, Any] = {"upload_rate_limit": 1024 * 1024, "limit_loopback": True}
# Long enough for pieced-peer to take the daemon's word on what is verified again
RECONCILE_WAIT = RECONCILE_INTERVAL + 2.0


def _made(tmp_path: Path, files: dict[str, int], piece: int, kind: str,
          seed: int) -> tuple[Path, bytes, Path]:
    """A payload in ``tmp_path/seed`` and its torrent: (content, metainfo, .torrent file)."""
    content = make_payload(tmp_path / "seed", files, seed=seed)
    raw = _torrent(kind, content, piece)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    return content, raw, torrent


def peer_cmd(torrent: Path, save: Path, socket: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pieced.peer.command", str(torrent), "--save-path", str(save),
            "--socket", str(socket), "--json", *extra]


def downloading(torrent: Path, save: Path, d: Daemon, *peers: int,
                extra: tuple[str, ...] = (), env: dict[str, str] | None = None,
                ) -> subprocess.Popen[str]:
    """``pieced-peer`` downloading from ``peers`` in the background (its output piped)."""
    args = [a for p in peers for a in ("--peer", f"127.0.0.1:{p}")]
    proc = subprocess.Popen(peer_cmd(torrent, save, d.socket, *args, *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env} if env else None)
    _running.append(proc)
    return proc


def download(torrent: Path, save: Path, d: Daemon, *peers: int, timeout: float = 120,
             extra: tuple[str, ...] = ()) -> dict[str, Any]:
    args = [a for p in peers for a in ("--peer", f"127.0.0.1:{p}")]
    r = subprocess.run(peer_cmd(torrent, save, d.socket, *args, *extra), capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    summary: dict[str, Any] = json.loads(r.stdout)
    assert summary["complete"]
    return summary


_running: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_plugin_left() -> Any:
    """A test that fails half-way leaves no pieced-peer behind."""
    yield
    while _running:
        proc = _running.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def listening(torrent: Path, save: Path, d: Daemon, *extra: str,
              env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    """``pieced-peer --listen 127.0.0.1:0`` in the background, once it listens: (the
    process, its port)."""
    proc = subprocess.Popen(
        peer_cmd(torrent, save, d.socket, "--listen", "127.0.0.1:0", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env} if env else None)
    _running.append(proc)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "listening on" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.rsplit(":", 1)[1])


class Seeding:
    """``pieced-peer --seed --listen 127.0.0.1:0`` in the background."""

    def __init__(self, torrent: Path, save: Path, d: Daemon, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.proc, self.port = listening(torrent, save, d, "--seed", *extra, env=env)

    def watch(self, wait: Callable[[float], None], timeout: float) -> None:
        """``wait(timeout)``; if it fails, what pieced-peer said is told with it."""
        try:
            wait(timeout)
        except Exception as exc:
            self.proc.send_signal(signal.SIGTERM)
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"{exc}\npieced-peer said:\n{err[-6000:]}") from exc

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        summary: dict[str, Any] = json.loads(out)
        return summary


def leecher_gets_every_byte(raw: bytes, seeding: Seeding, tmp_path: Path, content: Path,
                            files: dict[str, int], magnet: bool = False) -> None:
    """A libtorrent leecher (from a magnet link, if ``magnet``) downloads everything
    from ``seeding`` into ``tmp_path/leech``, without a hash failure."""
    with LtPeer(raw, tmp_path / "leech", seed=False, magnet=magnet) as leecher:
        leecher.connect("127.0.0.1", seeding.port)
        leecher.wait_finished(60)
        assert leecher.hash_failures() == 0
    _same_tree(content, tmp_path / "leech" / "payload", files)


@pytest.mark.parametrize("kind,piece", [
    ("v1", 16384), ("v1-pads", 65536), ("v2", 262144), ("hybrid", 4 * 1024 * 1024),
])
def test_download_from_libtorrent_then_seed_to_libtorrent(tmp_path: Path, kind: str,
                                                          piece: int) -> None:
    files = _files(piece)
    content = make_payload(tmp_path / "seed", files, seed=11)
    raw = _torrent(kind, content, piece)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            down = download(torrent, tmp_path / "dl", d, seeder.port)
        with Client(d.socket) as c:
            st = c.status(c.torrents()[0]["info_hash"])
            assert st["verified_pieces"] == st["num_pieces"]
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert down["bytes_down"] >= sum(files.values()) and down["pieces_failed"] == 0

        seeding = Seeding(torrent, tmp_path / "dl", d)
        with LtPeer(raw, tmp_path / "leech", seed=False, log_peer=True) as leecher:
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
            assert leecher.suggests_received() >= 1, leecher.peer_log()[-30:]
        up = seeding.stop()
        _same_tree(content, tmp_path / "leech" / "payload", files)
        assert up["bytes_up"] >= sum(files.values()) and up["suggests_sent"] >= 1
    finally:
        assert d.stop() == 0, d.stderr()


def test_the_progress_bar_on_a_terminal_ends_on_the_finished_download(tmp_path: Path) -> None:
    """pieced-peer on a terminal draws its progress every half second; the line left on
    screen once it ended was its last tick's (0 %, 49 %...), not the complete download."""
    content, raw, torrent = _made(tmp_path, {"a.bin": 12 << 20}, 1 << 20, "v1", seed=8)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, content.parent, seed=True) as seeder:
            cmd = peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer",
                           f"127.0.0.1:{seeder.port}")
            cmd.remove("--json")  # (which draws no bar)
            r = subprocess.run(["script", "-qec", shlex.join(cmd), "/dev/null"],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stdout
        last = r.stdout.rstrip().splitlines()[-1]  # (a "\r" reads as a line's end here)
        assert "100%" in last and "down 12 MiB" in last, repr(r.stdout[-300:])
        assert (tmp_path / "dl" / content.name / "a.bin").read_bytes() == (content / "a.bin").read_bytes()
    finally:
        assert d.stop() == 0, d.stderr()


def _corrupt_every_piece(path: Path, piece: int) -> None:
    """Flip one byte in every piece-sized stretch of the file (a liar's copy)."""
    with open(path, "r+b") as f:
        size = path.stat().st_size
        for off in range(piece // 2, size, piece):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


def _good_and_bad_copies(tmp_path: Path, files: dict[str, int], piece: int, kind: TorrentKind,
                         seed: int) -> tuple[Path, bytes, Path]:
    """The payload in ``tmp_path/good``, a copy of it in ``tmp_path/bad`` (for a liar to
    corrupt once its seeder has checked it), and its torrent: (content, metainfo, file)."""
    import shutil

    content = make_payload(tmp_path / "good", files, seed=seed)
    raw = make_torrent_lt(content, piece, kind)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    return content, raw, torrent


@pytest.mark.parametrize("piece", [16384, 65536])
def test_a_lying_seeder_is_found_out_and_the_download_completes(tmp_path: Path,
                                                                piece: int) -> None:
    """Two libtorrent seeders, one serving a corrupted copy (changed after it checked
    it): pieces fail, are asked for again, the liar alone is blamed (and dropped, and not
    dialled again), and every byte in the end is the real one. With pieces of four blocks, a piece's blocks
    come from both seeders, so which one lied is found by comparing blocks."""
    files = {"a.bin": 60 * piece + 123, "b.bin": 20 * piece}
    content, raw, torrent = _good_and_bad_copies(tmp_path, files, piece, "hybrid", seed=5)
    d = Daemon(tmp_path)
    try:
        # the honest one slow (1 MiB/s), so that the liar's blocks are taken too
        with LtPeer(raw, tmp_path / "good", seed=True, settings=SLOW) as good, \
                LtPeer(raw, tmp_path / "bad", seed=True) as bad:
            for rel in files:
                _corrupt_every_piece(tmp_path / "bad" / "payload" / rel, piece)
            summary = download(torrent, tmp_path / "dl", d, bad.port, good.port)
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert summary["pieces_failed"] >= 1, summary
        assert summary["bad_peers"] == [f"127.0.0.1:{bad.port}"], summary
        # dropped, and never dialled again (two handshakes: the good one's and the liar's)
        assert summary["peers_dropped_for_bad_data"] == 1 and summary["peers"] == 2, summary
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_download_whose_every_seeder_lied_stops_saying_so(tmp_path: Path) -> None:
    """The only seeder (``--peer``, no ``--listen``, no tracker) serves a corrupted copy:
    it is dropped for bad data, and then nothing could ever come. pieced-peer waited
    for ever, saying nothing; it now stops (exit 2) naming the peers it dropped, with
    its summary, and the daemon has none of the pieces it lied about."""
    piece = 16384
    files = {"a.bin": 40 * piece + 5}
    _, raw, torrent = _good_and_bad_copies(tmp_path, files, piece, "v1", seed=6)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "bad", seed=True) as bad:
            _corrupt_every_piece(tmp_path / "bad" / "payload" / "a.bin", piece)
            r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer",
                                        f"127.0.0.1:{bad.port}"),
                               capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert (f"every peer was dropped for sending bad data (127.0.0.1:{bad.port})"
                in r.stderr), r.stderr
        summary = json.loads(r.stdout)
        assert not summary["complete"] and summary["peers_dropped_for_bad_data"] == 1
        with Client(d.socket) as c:  # (the last piece, of 5 bytes, the liar left as it was)
            have = c.status(parse(raw).info_hash)["have"]
        assert [p for p in range(41) if have[p // 8] >> (7 - p % 8) & 1] in ([], [40])
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_seeder_with_one_rotten_piece_gives_every_other_one(tmp_path: Path) -> None:
    """The only seeder's copy has one bad piece (rotted on its disk after it checked
    it). That piece, asked again of it for want of another source, failed three times,
    and the seeder was dropped for three bad pieces: pieced-peer stopped with most of
    the torrent missing. Three bad pieces are three pieces now: the seeder gives every
    other piece, and pieced-peer stops (exit 2) naming the piece no peer can give."""
    piece = 16384
    files = {"a.bin": 48 * piece + 77}
    content, raw, torrent = _good_and_bad_copies(tmp_path, files, piece, "v1", seed=8)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "bad", seed=True) as bad:
            corrupt(tmp_path / "bad" / "payload" / "a.bin", 7 * piece + 100, 3)
            r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer",
                                        f"127.0.0.1:{bad.port}"),
                               capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert ("piece 7 failed 3 times with the data of every peer that has it, and no "
                "other peer can come: 1 piece missing") in r.stderr, r.stderr
        summary = json.loads(r.stdout)
        assert not summary["complete"], summary
        assert summary["pieces_failed"] == 3 and summary["peers_dropped_for_bad_data"] == 0
        with Client(d.socket) as c:
            have = c.status(parse(raw).info_hash)["have"]
        assert [p for p in range(49) if not have[p // 8] >> (7 - p % 8) & 1] == [7]
        got = (tmp_path / "dl" / "payload" / "a.bin").read_bytes()
        want = (content / "a.bin").read_bytes()
        assert got[: 7 * piece] == want[: 7 * piece] and got[8 * piece:] == want[8 * piece:]
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_rotten_piece_the_daemon_held_a_block_of_is_given_up_too(tmp_path: Path) -> None:
    """As above, but the daemon holds a block of the rotten piece already (an earlier run
    stopped in the middle of it). The first attempt, with that block not ours, gives no
    verdict, and no attempt after it did either (each might hold copies not on record):
    the piece was asked of the seeder for ever, 70,000 failures a minute, the plugin's
    memory growing. An attempt with no verdict counts as a try with each of its givers:
    pieced-peer stops as above."""
    piece = 65536
    files = {"a.bin": 20 * piece + 77}
    content, raw, torrent = _good_and_bad_copies(tmp_path, files, piece, "v1", seed=8)
    ih = parse(raw).info_hash
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "bad", seed=True) as bad:
            corrupt(tmp_path / "bad" / "payload" / "a.bin", 7 * piece + 40000, 3)
            with Client(d.socket) as c:
                c.register(raw, tmp_path / "dl")
                good = (content / "a.bin").read_bytes()
                c.write_chunk(ih, 7, 0, good[7 * piece : 7 * piece + 16384])
            r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer",
                                        f"127.0.0.1:{bad.port}"),
                               capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-3000:]
        assert "piece 7 failed 3 times with the data of every peer that has it" in r.stderr, \
            r.stderr[-3000:]
        summary = json.loads(r.stdout)
        assert 3 <= summary["pieces_failed"] <= 5 and summary["peers_dropped_for_bad_data"] == 0, \
            summary
        with Client(d.socket) as c:
            have = c.status(ih)["have"]
        assert [p for p in range(21) if not have[p // 8] >> (7 - p % 8) & 1] == [7]
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_seeder_that_dialled_in_and_left_is_dialled_back(tmp_path: Path) -> None:
    """A libtorrent seeder dials a downloading pieced-peer, then closes (paused and
    resumed: libtorrent dials again only a minute later). pieced-peer did not keep the
    port the seeder said it listens on (``p`` in its extension handshake), and waited for
    it. It dials the seeder back there, and tells peers its own ``p`` as well."""
    files = {"a.bin": 3 * 1024 * 1024 + 5}
    content = make_payload(tmp_path / "seed", files, seed=12)
    raw = make_torrent_lt(content, 65536, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    proc, ours = listening(torrent, tmp_path / "dl", d)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW, log_peer=True) as seed:
            seed.connect("127.0.0.1", ours)
            deadline = time.monotonic() + 30
            while seed.status()["total_payload_upload"] < 256 * 1024:
                assert time.monotonic() < deadline, "no block went out"
                time.sleep(0.05)
            # (our own port, told to it: it may dial us back too)
            assert any("<== EXTENDED_HANDSHAKE" in x and f"'p': {ours}" in x
                       for x in seed.peer_log())
            seed.handle.pause()
            time.sleep(0.5)
            seed.handle.resume()
            out, err = proc.communicate(timeout=40)  # (libtorrent itself: a minute)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and summary["peers"] >= 2, summary  # (it, and it again)
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:  # (pieced-peer, if still running, is stopped by _no_plugin_left)
        assert d.stop() == 0, d.stderr()


def test_a_seeder_that_takes_two_requests_at_a_time_is_not_waited_on_for_acks(
        tmp_path: Path) -> None:
    """A libtorrent seeder that takes two requests at a time (its
    ``max_allowed_in_request_queue`` at 2, so it says ``reqq`` 2) sends the tail of each
    answer in a small segment, and its next answer only once that is acknowledged; our
    next requests left before the tail came, so the ACK waited for the kernel's delayed
    ACK timer (40 ms): 32 KiB a round, 25-65 times slower than from the same seeder
    taking the default 500. What arrives is now acknowledged at once (TCP_QUICKACK).
    Timed against the download of the same torrent from a default seeder, as ratios."""
    piece = 262144
    content = make_payload(tmp_path / "seed", {"big.bin": 32 * piece + 5}, seed=12)
    raw = make_torrent_lt(content, piece, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    seconds = {}
    try:
        for reqq in (500, 2):
            save = tmp_path / f"dl{reqq}"
            with LtPeer(raw, tmp_path / "seed", seed=True,
                        settings={"max_allowed_in_request_queue": reqq}) as seeder:
                summary = download(torrent, save, d, seeder.port)
            seconds[reqq] = summary["seconds"]
            _same_tree(content, save / "payload", {"big.bin": 32 * piece + 5})
            ih = handshake_info_hash(raw)
            with Client(d.socket) as c:
                c.unregister(ih)
        assert seconds[2] < 5 * seconds[500] + 2.0, seconds  # (before: 10.7 s against 0.09 s)
    finally:
        assert d.stop() == 0, d.stderr()


def test_pieced_peer_in_the_middle_of_two_seeders_and_a_leecher(tmp_path: Path) -> None:
    """Two libtorrent seeders -> pieced-peer (stores in pieced) -> a libtorrent leecher
    that knows only pieced-peer: pieces reach it as pieced verifies them."""
    piece = 65536
    files = _files(piece) | {"big.bin": 40 * piece + 5}
    content = make_payload(tmp_path / "seed", files, seed=8)
    raw = make_torrent_lt(content, piece, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as s1, \
                LtPeer(raw, tmp_path / "seed", seed=True) as s2, \
                LtPeer(raw, tmp_path / "leech", seed=False, log_peer=True) as leecher:
            middle = Seeding(torrent, tmp_path / "dl", d, "--peer", f"127.0.0.1:{s1.port}",
                             "--peer", f"127.0.0.1:{s2.port}")
            leecher.connect("127.0.0.1", middle.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
            summary = middle.stop()
        _same_tree(content, tmp_path / "leech" / "payload", files)
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert summary["complete"] and summary["bytes_up"] >= sum(files.values())
        assert summary["peers"] == 3
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_a_daemon_with_no_room_for_more_pieces_in_progress_slows_the_download_not_stops_it(
        tmp_path: Path, kind: str) -> None:
    """The daemon may hold two pieces in progress (max_partial_pieces 1, and a torrent's
    floor up to twice it); three libtorrent seeders each give pieced-peer blocks of
    their own pieces. The daemon refuses the blocks that would begin a third: pieced-peer
    stopped on the first ("the daemon refused a block"). It asks for those pieces again,
    fewer begun at once, and the download completes, every byte right."""
    piece = 1 << 20
    files = {"a.bin": 24 * piece + 5, "b.bin": piece // 2}
    content, raw, torrent = _made(tmp_path, files, piece, kind, seed=14)
    d = Daemon(tmp_path, env={"PIECED_MAX_PARTIAL_PIECES": "1"})
    try:
        with LtPeer(raw, content.parent, seed=True) as s1, \
                LtPeer(raw, content.parent, seed=True) as s2, \
                LtPeer(raw, content.parent, seed=True) as s3:
            summary = download(torrent, tmp_path / "dl", d, s1.port, s2.port, s3.port)
        assert summary["blocks_refused"] >= 1, summary
        assert summary["pieces_failed"] == 0 and summary["peers_dropped_for_bad_data"] == 0
        _same_tree(content, tmp_path / "dl" / "payload", files)
        with Client(d.socket) as c:
            st = c.status(c.torrents()[0]["info_hash"])
            assert st["verified_pieces"] == st["num_pieces"]
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_download_with_room_for_one_piece_at_a_time_completes_near_its_size(
        tmp_path: Path) -> None:
    """Another client holds the daemon's every place for a piece in progress (one piece
    in each of two torrents, with a bound of 1: 2 in all). Every piece pieced-peer began
    was refused, dropped, and begun again at once: the download pulled two to three
    times its size from the seeders (a hundred times, with pieced-peers holding the
    places). Its torrent, with none under way, takes the place of one of theirs (their
    bytes kept), and every piece it begins past that one is refused: it waits, longer at
    each refusal, and completes a piece at a time, below twice its size in bytes (the
    blocks on their way when their piece is refused are lost: the first requests, and a
    piece now and then as it tries for two again; 1.02 to 1.68 times in 25 runs on a
    32 MiB torrent, where an 8 MiB one, asked for whole at once, went to 1.98). The
    pieces let go for it are taken up again by their next blocks, and verify."""
    piece = 256 * 1024
    files = {"a.bin": 120 * piece + 5, "b.bin": 8 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "v2", seed=15)
    d = Daemon(tmp_path, env={"PIECED_MAX_PARTIAL_PIECES": "1"})  # (2 in all)
    try:
        holders = []
        for k in range(2):
            other = make_payload(tmp_path / f"other{k}", {"x.bin": 2 * 16384}, seed=30 + k)
            holders.append((make_torrent_lt(other, 32768, "v1"), other / "x.bin"))
        with Client(d.socket) as c, LtPeer(raw, content.parent, seed=True) as s1, \
                LtPeer(raw, content.parent, seed=True) as s2:
            held = []
            for k, (other_raw, path) in enumerate(holders):
                ih = c.register(other_raw, tmp_path / f"dl-other{k}")
                c.write_chunk(ih, 0, 0, path.read_bytes()[:100])
                held.append((ih, path))
            c.wait_writes()
            out = download(torrent, tmp_path / "dl", d, s1.port, s2.port)
            assert c.stats()["pieces_parked"] >= 1
            for ih, path in held:  # the rest of theirs: taken up again, verified
                c.write_chunk(ih, 0, 100, path.read_bytes()[100:])
            c.flush_all()
            for ih, path in held:
                assert c.status(ih, files=False)["verified_pieces"] == 1
                assert c.read_piece(ih, 0) == path.read_bytes()
        assert out["blocks_refused"] >= 1, out
        size = sum(files.values())
        assert out["bytes_down"] + out["bytes_redundant"] < 2 * size, out
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_peers_that_leave_mid_piece(tmp_path: Path) -> None:
    """A seeder closes mid-download: its requests go to the other one. A leecher closes
    mid-piece: the seeding side serves the next leecher as if nothing happened."""
    import time

    piece = 262144
    files = {"a.bin": 24 * piece + 77}
    content = make_payload(tmp_path / "seed", files, seed=9)
    raw = make_torrent_lt(content, piece, "hybrid")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    # 6 MiB at 1 MiB/s: time to leave midway
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW) as s1, \
                LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW) as s2:
            proc = subprocess.Popen(
                peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer", f"127.0.0.1:{s1.port}",
                         "--peer", f"127.0.0.1:{s2.port}"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _running.append(proc)
            with Client(d.socket) as c:  # leave once a first piece is in, none too early
                deadline = time.monotonic() + 30
                while not c.torrents() or c.status(c.torrents()[0]["info_hash"])[
                        "verified_pieces"] == 0:
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.02)
            assert proc.poll() is None  # still downloading
            s1.close()
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert json.loads(out)["complete"]
        _same_tree(content, tmp_path / "dl" / "payload", files)

        seeding = Seeding(torrent, tmp_path / "dl", d)
        first = LtPeer(raw, tmp_path / "leech1", seed=False,
                       settings={"download_rate_limit": 1024 * 1024, "limit_loopback": True})
        first.connect("127.0.0.1", seeding.port)
        deadline = time.monotonic() + 30
        while (progress := first.status()["progress"]) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.close()
        assert 0 < progress < 1, progress
        with LtPeer(raw, tmp_path / "leech2", seed=False) as second:
            second.connect("127.0.0.1", seeding.port)
            second.wait_finished(60)
            assert second.hash_failures() == 0
        seeding.stop()
        _same_tree(content, tmp_path / "leech2" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


@contextlib.contextmanager
def _tracker(reply: Callable[[dict[str, str]], Any]) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """An HTTP tracker on loopback (aiohttp, on a thread of its own) answering every
    announce with ``reply(query)`` (bytes, or a coroutine that gives them: an answer held
    back holds no other); yields its port and the queries it got."""
    import asyncio
    import inspect

    from aiohttp import web

    seen: list[dict[str, str]] = []
    ready = threading.Event()
    state: dict[str, Any] = {}

    def serve() -> None:
        async def announce(request: web.Request) -> web.Response:
            query = dict(request.query)  # (binary values decoded as text, and mangled:
            query["raw"] = request.query_string  # as sent, under "raw")
            seen.append(query)
            body = reply(query)
            if inspect.isawaitable(body):
                body = await body
            return web.Response(body=body)

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/announce", announce)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            state["port"] = runner.addresses[0][1]
            state["stop"] = asyncio.Event()
            ready.set()
            await state["stop"].wait()
            await runner.cleanup()

        state["loop"] = asyncio.new_event_loop()
        try:
            state["loop"].run_until_complete(main())
        finally:
            state["loop"].close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
    try:
        yield state["port"], seen
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        t.join(10)


def _with_tracker(raw: bytes, port: int, path: Path) -> Path:
    """``raw`` with the tracker on ``port`` as its announce URL, written to ``path``."""
    return _with_announce(raw, f"http://127.0.0.1:{port}/announce", path)


def _with_announce(raw: bytes, url: str, path: Path) -> Path:
    top = bencodepy.decode(raw)
    top[b"announce"] = url.encode()
    path.write_bytes(bencodepy.encode(top))
    return path


def _compact(*ports: int) -> bytes:
    return b"".join(bytes([127, 0, 0, 1]) + p.to_bytes(2, "big") for p in ports)


def _download_via_tracker(raw: bytes, tmp_path: Path, d: Daemon, silent: list[int] | None = None,
                          extra: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """pieced-peer with no --peer downloads into ``tmp_path/dl``; its tracker names the
    ports ``silent``, then a libtorrent seeder of ``tmp_path/seed``. (summary, announces)"""
    import bencodepy

    state: dict[str, int] = {}

    def reply(query: dict[str, str]) -> bytes:
        peers = _compact(*(silent or []), state["seeder"])
        return bencodepy.encode({b"interval": 60, b"peers": peers})

    with _tracker(reply) as (port, seen):
        torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            state["seeder"] = seeder.port
            summary = download(torrent, tmp_path / "dl", d, extra=extra)
    return summary, seen


def test_a_failed_first_announce_is_sent_again_as_started_and_names_are_dialled(
        tmp_path: Path) -> None:
    """A tracker that refuses the first announce: the next one said no event, so the
    tracker never heard "started" (libtorrent sends it until one is answered). Its next
    reply names the seeder by a host name (BEP 3 allows one), which was left out: the
    download never began."""
    import bencodepy
    from pieced.peer.plugin import ANNOUNCE_RETRY_FIRST

    piece = 65536
    content = make_payload(tmp_path / "seed", {"a.bin": 5 * piece + 3}, seed=31)
    raw = make_torrent_lt(content, piece, "v1")
    d = Daemon(tmp_path)
    state: dict[str, int] = {}

    def reply(query: dict[str, str]) -> bytes:
        if not state.get("refused"):
            state["refused"] = 1
            return bencodepy.encode({b"failure reason": b"busy, try again"})
        return bencodepy.encode({b"interval": 60, b"peers": [
            {b"ip": b"localhost", b"port": state["seeder"]}]})

    try:
        with _tracker(reply) as (port, seen):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
                state["seeder"] = seeder.port
                download(torrent, tmp_path / "dl", d, timeout=ANNOUNCE_RETRY_FIRST + 60)
        events = [q.get("event", "") for q in seen]
        assert events[:2] == ["started", "started"], events
        assert (tmp_path / "dl" / "payload" / "a.bin").read_bytes() == (content / "a.bin").read_bytes()
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_tracker_hands_out_the_peers(tmp_path: Path) -> None:
    """No --peer: the HTTP tracker (written here with aiohttp) names the seeder, in BEP 23
    compact form; pieced-peer announces started, then completed, then stopped."""

    piece = 65536
    files = _files(piece)
    content = make_payload(tmp_path / "seed", files, seed=3)
    raw = make_torrent_lt(content, piece, "v2")
    d = Daemon(tmp_path)
    try:
        _, seen = _download_via_tracker(raw, tmp_path, d)
        _same_tree(content, tmp_path / "dl" / "payload", files)
        events = [q.get("event", "") for q in seen]
        assert events[0] == "started" and "completed" in events and events[-1] == "stopped", events
        assert all(q["compact"] == "1" and int(q["port"]) > 0 for q in seen)
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("kind", ["v1", "hybrid", "v2"])
def test_a_udp_tracker_brings_pieced_peer_and_libtorrent_together_both_ways(
        tmp_path: Path, kind: str) -> None:
    """opentracker over UDP (BEP 15), the .torrent naming no other source: a libtorrent
    seeder announces itself there, and pieced-peer, given no --peer, finds it through the
    tracker and downloads; then pieced-peer seeds, announced there, and a libtorrent
    leecher that knows of the tracker alone downloads from it."""
    piece = 65536
    files = _files(piece)
    content = make_payload(tmp_path / "seed", files, seed=5)
    raw = make_torrent_lt(content, piece, cast(TorrentKind, kind))
    hashes = lt.torrent_info(raw).info_hashes()
    ihs = [h for h in (hashes.v1.to_bytes(), hashes.v2.to_bytes()[:20]) if any(h)]
    ih = parse(raw).info_hash  # (what pieced-peer announces: the daemon's key)
    d = Daemon(tmp_path)
    try:
        with OpenTracker(tmp_path / "tracker", ihs) as ot:
            torrent = _with_announce(raw, ot.udp_url, tmp_path / "t.torrent")
            with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
                seeder.handle.add_tracker({"url": ot.udp_url})
                seeder.handle.force_reannounce()
                ot.wait_seeders(ih, 1)
                summary = download(torrent, tmp_path / "dl", d)
            assert summary["peers"] >= 1 and summary["bytes_down"] > 0, summary
            _same_tree(content, tmp_path / "dl" / "payload", files)
            seeding = Seeding(torrent, tmp_path / "dl", d, env={"PIECED_PEER_LOG": "INFO"})
            with LtPeer(raw, tmp_path / "leech", seed=False, log_peer=True) as leecher:
                leecher.handle.add_tracker({"url": ot.udp_url})
                leecher.handle.force_reannounce()
                seeding.watch(leecher.wait_finished, 120)
                assert leecher.hash_failures() == 0
            assert seeding.stop()["bytes_up"] > 0
            _same_tree(content, tmp_path / "leech" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_leecher_told_of_us_under_a_hybrids_v2_hash_as_it_dials_takes_our_answer(
        tmp_path: Path) -> None:
    """A libtorrent leecher of a hybrid announces under both keys. Given our address by
    the v1 announce, it dials with the v1 hash and the upgrade bit; if the v2 announce's
    reply names us too before our answer comes, it expects the v2 hash back, and closed
    on our v1 hash ("invalid info-hash"), not to dial again for a minute or more: seen
    with a real tracker when the two replies came together. Made certain here: our
    answer goes through a relay that holds it until the v2 reply is out. Answered with
    the v2 hash (as libtorrent answers such a handshake), the leecher takes it."""
    import asyncio
    import re
    import socket
    from urllib.parse import unquote_to_bytes

    import bencodepy

    piece = 65536
    content, raw, torrent = _made(tmp_path, {"a.bin": 6 * piece + 11}, piece, "hybrid", seed=43)
    meta = parse(raw)
    assert meta.info_hash_v2 is not None
    dialled, v2_out = threading.Event(), threading.Event()
    relay = socket.create_server(("127.0.0.1", 0))
    relay_port = relay.getsockname()[1]
    threads: list[threading.Thread] = []
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)

    def pump(src: socket.socket, dst: socket.socket, hold: bool) -> None:
        if hold:
            v2_out.wait(30)
            time.sleep(0.5)  # (the reply read by the leecher, its peer marked v2)
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                down, _ = relay.accept()
                up = socket.create_connection(("127.0.0.1", seeding.port))
                dialled.set()
                for src, dst, hold in ((down, up, False), (up, down, True)):
                    t = threading.Thread(target=pump, args=(src, dst, hold), daemon=True)
                    t.start()
                    threads.append(t)

    async def reply(query: dict[str, str]) -> bytes:
        found = re.search("(?:^|&)info_hash=([^&]*)", query["raw"])
        assert found is not None
        if unquote_to_bytes(found.group(1)) == meta.info_hash_v2[:20]:
            await asyncio.get_running_loop().run_in_executor(None, dialled.wait, 30)
            asyncio.get_running_loop().call_later(0.05, v2_out.set)
        return bencodepy.encode({b"interval": 1800, b"peers": _compact(relay_port)})

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with _tracker(reply) as (port, _seen), \
                LtPeer(raw, tmp_path / "leech", seed=False, log_peer=True) as leecher:
            leecher.handle.add_tracker({"url": f"http://127.0.0.1:{port}/announce"})
            leecher.handle.force_reannounce()
            seeding.watch(leecher.wait_finished, 45)
            assert dialled.is_set() and v2_out.is_set()  # (the race, made)
            assert not [line for line in leecher.peer_log() if "invalid info" in line]
            assert leecher.hash_failures() == 0
        assert seeding.stop()["bytes_up"] > 0
        _same_tree(content, tmp_path / "leech" / "payload", {"a.bin": 6 * piece + 11})
    finally:
        relay.close()
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("named_by", ["tracker", "user"])
def test_a_hybrids_peer_that_knows_it_by_its_v2_hash_alone_is_dialled_with_that_hash(
        tmp_path: Path, named_by: str) -> None:
    """A libtorrent leecher of a hybrid added from a v2 magnet link knows the torrent by
    its v2 hash alone (the v1 one comes with the metadata). pieced-peer, seeding, dialled
    it with the v1 hash: "couldn't find a torrent with the given info_hash", at every
    dial, and the leecher waited for its own next announce (half an hour on opentracker).
    A peer named under the v2 hash (by that hash's announce) is dialled with it, as
    libtorrent dials it; one named otherwise (``--peer``) that closes before its
    handshake is dialled with the other hash next."""
    import re
    from urllib.parse import unquote_to_bytes

    import bencodepy

    piece = 65536
    files = {"a.bin": 5 * piece + 77, "b.bin": 999}
    content, raw, torrent = _made(tmp_path, files, piece, "hybrid", seed=47)
    meta = parse(raw)
    assert meta.info_hash_v2 is not None
    state: dict[str, int] = {}

    def reply(query: dict[str, str]) -> bytes:
        found = re.search("(?:^|&)info_hash=([^&]*)", query["raw"])
        assert found is not None
        named = unquote_to_bytes(found.group(1)) == meta.info_hash_v2[:20]  # (the v2 swarm)
        return bencodepy.encode({b"interval": 1800,
                                 b"peers": _compact(state["leecher"]) if named else b""})

    d = Daemon(tmp_path)
    try:
        with _tracker(reply) as (port, seen), \
                LtPeer(raw, tmp_path / "leech", seed=False, magnet="v2", log_peer=True) as leecher:
            state["leecher"] = leecher.port
            if named_by == "tracker":
                seeding = Seeding(_with_tracker(raw, port, tmp_path / "t2.torrent"),
                                  tmp_path / "seed", d)
            else:
                seeding = Seeding(torrent, tmp_path / "seed", d, "--peer",
                                  f"127.0.0.1:{leecher.port}")
            seeding.watch(leecher.wait_finished, 45)
            refused = [line for line in leecher.peer_log()
                       if "invalid info" in line or "couldn't find a torrent" in line]
            assert len(refused) <= (0 if named_by == "tracker" else 2), refused
            assert leecher.hash_failures() == 0
            assert seeding.stop()["bytes_up"] > 0
        assert len(seen) >= (2 if named_by == "tracker" else 0)  # (both keys announced)
        _same_tree(content, tmp_path / "leech" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_without_listen_a_torrent_with_trackers_announces_a_port_it_answers_on(
        tmp_path: Path) -> None:
    """No --listen, and the torrent names a tracker: pieced-peer told the tracker port
    6881 and listened nowhere, so the peers the tracker sent there found nobody (or
    another program). It listens as libtorrent does, on 6881, or (taken here) a free
    port, and announces that one; a leecher the tracker sent there downloads."""
    import socket

    import bencodepy

    piece = 65536
    files = {"a.bin": 3 * piece + 7}
    content = make_payload(tmp_path / "seed", files, seed=41)
    raw = make_torrent_lt(content, piece, "v1")
    d = Daemon(tmp_path)
    taken = socket.socket()
    try:
        with contextlib.suppress(OSError):  # (taken by someone else already: as good)
            taken.bind(("0.0.0.0", 6881))
            taken.listen(1)
        with _tracker(lambda q: bencodepy.encode({b"interval": 60, b"peers": b""})) as (
                port, seen):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            proc = subprocess.Popen(peer_cmd(torrent, tmp_path / "seed", d.socket, "--seed"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _running.append(proc)
            assert proc.stderr is not None
            assert select.select([proc.stderr], [], [], 30)[0], "pieced-peer says nothing"
            line = proc.stderr.readline()
            assert "listening on" in line, line
            listening = int(line.rsplit(":", 1)[1])
            assert listening not in (0, 6881)
            # The port the system picked is ours on IPv6 too (a tracker reached over
            # IPv6 hands it out with that address), for TCP and for uTP's refusal.
            for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
                socket.create_connection((host, listening), timeout=10).close()
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    udp.settimeout(10)
                    udp.sendto(_syn(7, 1), (host, listening))
                    assert udp.recv(64)[0] >> 4 == ST_RESET, host
            deadline = time.monotonic() + 30
            while not seen and time.monotonic() < deadline:
                time.sleep(0.05)
            assert seen and int(seen[0]["port"]) == listening, seen
            with LtPeer(raw, tmp_path / "leech", seed=False) as leecher:
                leecher.connect("127.0.0.1", listening)
                leecher.wait_finished(60)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        _same_tree(content, tmp_path / "leech" / "payload", files)
    finally:
        taken.close()
        assert d.stop() == 0, d.stderr()


def test_a_bad_block_another_client_wrote_does_not_cost_the_only_source(
        tmp_path: Path) -> None:
    """pieced-peer downloads from one honest libtorrent seeder while another client of
    the daemon writes a wrong block into every piece: the pieces under way fail, all
    their blocks came through pieced-peer, so it blamed the seeder and never asked it
    for those pieces again: its only source, the download stalled for good. Pieces
    that no other peer has are now asked again of the peers blamed for them."""
    piece = 1 << 20
    n = 8
    content, raw, torrent = _made(tmp_path, {"a.bin": n * piece - 100}, piece, "hybrid", 43)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW) as seeder:
            proc = downloading(torrent, tmp_path / "dl", d, seeder.port)
            with Client(d.socket) as c:
                deadline = time.monotonic() + 30
                while not c.torrents() and time.monotonic() < deadline:
                    time.sleep(0.05)
                ih = parse(raw).info_hash
                time.sleep(2.0)  # a few pieces done, some under way
                for p in range(n):
                    with contextlib.suppress(Exception):  # (verified already: refused)
                        c.write_chunk(ih, p, 0, b"\xee" * 16384)
            out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and summary["pieces_failed"] >= 1, summary
        with Client(d.socket) as c:
            assert c.status(ih)["verified_pieces"] == n
        assert (tmp_path / "dl" / "payload" / "a.bin").read_bytes() == (content / "a.bin").read_bytes()
    finally:
        assert d.stop() == 0, d.stderr()


def test_bad_blocks_another_client_writes_into_pieces_under_way_blame_no_peer(
        tmp_path: Path) -> None:
    """pieced-peer downloads from one honest libtorrent seeder; another client of the
    daemon writes a wrong block into five pieces pieced-peer has under way, one at a
    time. Every block of those attempts came through pieced-peer, so it blamed the
    seeder for each, dropped it for good after three, and with no source left stopped
    (exit 2). The daemon now says how many connections wrote into a failed attempt:
    with two, no peer of ours is blamed."""
    piece = 262144
    n = 40
    content, raw, torrent = _made(tmp_path, {"a.bin": n * piece - 100}, piece, "hybrid", 44)
    ih = parse(raw).info_hash
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW) as seeder:
            proc = downloading(torrent, tmp_path / "dl", d, seeder.port)
            hit: set[int] = set()
            with Client(d.socket) as c:
                deadline = time.monotonic() + 60
                while len(hit) < 5 and proc.poll() is None:
                    assert time.monotonic() < deadline
                    try:
                        under_way = [p for p, _ in c.status(ih, files=0, partial=1)["partial"]]
                    except UnknownTorrent:
                        under_way = []  # (not registered yet)
                    for p in under_way:
                        if p not in hit:
                            c.write_chunk(ih, p, 0, b"\xee" * 16384)
                            c.wait_writes()
                            hit.add(p)
                            break
                    time.sleep(0.3)
            out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and not summary["bad_peers"], summary
        assert len(hit) == 5
        assert (tmp_path / "dl" / "payload" / "a.bin").read_bytes() == (content / "a.bin").read_bytes()
    finally:
        assert d.stop() == 0, d.stderr()


def test_another_clients_own_bad_attempts_blame_no_peer(tmp_path: Path) -> None:
    """pieced-peer downloads 16 KiB pieces (one block each) from one honest libtorrent
    seeder while another client writes whole wrong pieces into the missing ones: each
    such attempt is that client's alone, and fails. pieced-peer, whose blocks of those
    pieces went into the next attempts, took the failures for its own and dropped its
    only source (exit 2), as a count of writers (one) could not tell it otherwise. The
    events name the writers; pieced-peer gives no verdict on attempts it had no part in."""
    piece = 16384
    n = 200
    content, raw, torrent = _made(tmp_path, {"a.bin": n * piece + 5}, piece, "v1", 45)
    ih = parse(raw).info_hash
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings={**SLOW, "upload_rate_limit": 512 << 10}) as seeder:
            proc = downloading(torrent, tmp_path / "dl", d, seeder.port)
            written = 0
            with Client(d.socket) as c:
                deadline = time.monotonic() + 30
                while not c.torrents():
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
                for _ in range(5):  # passes over the missing pieces
                    have = c.status(ih, files=0)["have"]
                    for p in range(n - 1):
                        if not have[p >> 3] & (0x80 >> (p & 7)):
                            with contextlib.suppress(PiecedError):
                                c.write_chunk(ih, p, 0, b"\xee" * piece)
                                written += 1
                    c.wait_writes()
                    time.sleep(0.2)
            out, err = proc.communicate(timeout=120)
        assert written >= 10
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and not summary["bad_peers"], summary
        assert (tmp_path / "dl" / "payload" / "a.bin").read_bytes() == (content / "a.bin").read_bytes()
    finally:
        assert d.stop() == 0, d.stderr()


class SilentPeers:
    """Listening sockets that accept connections and never say a word; counts how many
    of their connections are open at once, at most (``most_open``), and how many of
    those open for a second or more (``most_held``: a dial that completes when every
    place is taken is closed at once)."""

    def __init__(self, n: int) -> None:
        import selectors
        import socket

        self.sel = selectors.DefaultSelector()
        self.ports: list[int] = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            self.sel.register(s, selectors.EVENT_READ, "listen")
            self.ports.append(s.getsockname()[1])
        self.open = self.most_open = self.accepted = self.most_held = 0
        self.since: dict[Any, float] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import selectors

        while not self.stopping:
            for key, _ in self.sel.select(0.05):
                sock = key.fileobj
                assert not isinstance(sock, int)
                if key.data == "listen":
                    conn, _ = sock.accept()
                    self.sel.register(conn, selectors.EVENT_READ, "conn")
                    self.since[conn] = time.monotonic()
                    self.accepted += 1
                    self.open += 1
                    self.most_open = max(self.most_open, self.open)
                else:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:  # closed by the other side
                        self.sel.unregister(sock)
                        self.since.pop(sock, None)
                        sock.close()
                        self.open -= 1
            now = time.monotonic()
            self.most_held = max(self.most_held,
                                 sum(1 for t in self.since.values() if now - t >= 1.0))
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self.stopping = True
        self.thread.join(10)


def test_a_tracker_naming_more_peers_than_max_peers(tmp_path: Path) -> None:
    """The tracker names four peers that accept and never answer, and the seeder; with
    --max-peers 3, pieced-peer never holds more than three connections open (a dial
    that completes when every place is taken is closed at once), and dials the
    addresses it had no room for once the silent ones are dropped (no handshake in
    10 s): the download completes."""

    piece = 16384
    files = {"a.bin": 5 * piece + 7}
    content = make_payload(tmp_path / "seed", files, seed=8)
    raw = make_torrent_lt(content, piece, "v1")
    silent = SilentPeers(4)
    d = Daemon(tmp_path)
    try:
        summary, _ = _download_via_tracker(raw, tmp_path, d, silent=silent.ports,
                                           extra=("--max-peers", "3"))
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert summary["peers"] >= 1
        assert silent.most_held <= 3, (silent.most_held, silent.most_open)
        # (the names are dialled in a random order: the seeder may come first or last;
        # the silent ones were not dialled again and again meanwhile)
        assert silent.accepted <= 5, silent.accepted
    finally:
        silent.close()
        assert d.stop() == 0, d.stderr()


def test_peers_a_tracker_names_later_are_dialled_though_the_first_reply_filled_the_list(
    tmp_path: Path,
) -> None:
    """The first announce names 1,000 addresses where nobody listens (the most
    pieced-peer keeps), the next ones only the seeder: it made no room for the seeder,
    for good, and downloaded nothing. Addresses that keep failing now give their place."""
    import bencodepy
    from pieced.peer.plugin import MAX_KNOWN

    piece = 16384
    files = {"a.bin": 5 * piece + 7}
    content = make_payload(tmp_path / "seed", files, seed=9)
    raw = make_torrent_lt(content, piece, "v1")
    dead = b"".join(bytes([127, 1, i >> 8, i & 255]) + (9).to_bytes(2, "big")
                    for i in range(1, MAX_KNOWN + 1))  # (the discard port: nobody there)
    state: dict[str, int] = {}

    def reply(query: dict[str, str]) -> bytes:
        state["n"] = state.get("n", 0) + 1
        peers = dead if state["n"] == 1 else _compact(state["seeder"])
        return bencodepy.encode({b"interval": 1, b"peers": peers})

    d = Daemon(tmp_path)
    try:
        with _tracker(reply) as (port, _seen):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
                state["seeder"] = seeder.port
                summary = download(torrent, tmp_path / "dl", d, timeout=120)
        assert summary["complete"] and state["n"] >= 2
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_tracker_reply_too_large_is_refused(tmp_path: Path) -> None:
    """A tracker that answers with 8 MiB of peers: the announce fails with a message
    (nothing of it is kept), and the download goes on from the peer given with --peer
    (seeding after it, so that the refusal is seen however soon the download ends)."""
    import bencodepy

    piece = 16384
    files = {"a.bin": 3 * piece + 1}
    content = make_payload(tmp_path / "seed", files, seed=9)
    raw = make_torrent_lt(content, piece, "v1")

    def reply(query: dict[str, str]) -> bytes:
        return bencodepy.encode({b"interval": 60, b"peers": bytes(8 << 20)})

    d = Daemon(tmp_path)
    try:
        with _tracker(reply) as (port, seen):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
                proc = subprocess.Popen(
                    peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer",
                             f"127.0.0.1:{seeder.port}", "--seed"),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                _running.append(proc)
                lines: list[str] = []
                assert proc.stderr is not None and proc.stdout is not None
                reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()))
                reader.start()
                deadline = time.monotonic() + 60

                def done() -> bool:  # (the download too: seeding goes on until told)
                    with Client(d.socket) as c:
                        st = c.torrents()
                        return bool(st) and c.status(st[0]["info_hash"])[
                            "verified_pieces"] == parse(raw).num_pieces

                while not (any("larger than" in line for line in lines) and done()):
                    assert time.monotonic() < deadline and proc.poll() is None, lines
                    time.sleep(0.1)
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0, lines
                reader.join(10)
        assert json.loads(proc.stdout.read())["complete"]
        assert seen
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize(("kind", "piece"), [("v2", 32768), ("hybrid", 32768), ("v2", 16384)])
def test_a_leecher_without_piece_layers_gets_them_from_us(tmp_path: Path, kind: str,
                                                          piece: int) -> None:
    """libtorrent given only the info dictionary (the .torrent without ``piece layers``)
    asks for the piece layer in hash requests; pieced-peer answers them from its own
    .torrent, with the proofs, and the leecher finishes with no hash failure. With
    pieces of 16 KiB and files of more than 512 pieces, the last run of each file was
    refused (thousands of times: the leecher asked again at each event, and was dropped
    for it)."""
    import bencodepy

    files = {"a.bin": 37 * piece + 5, "b.bin": 5 * piece, "small": 1000}
    if piece == 16384:
        files.update({"c.bin": 1025 * piece - 3, "d.bin": 1540 * piece})
    content = make_payload(tmp_path / "seed", files, seed=12)
    raw = make_torrent_lt(content, piece, kind)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    top = bencodepy.decode(raw)
    assert top.pop(b"piece layers")
    bare = bencodepy.encode(top)
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "seed")
            assert c.recheck(ih)["verified"] > 0
        seeding = Seeding(torrent, tmp_path / "seed", d)
        with LtPeer(bare, tmp_path / "leech", seed=False, log_peer=True) as leecher:
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
            asked = [line for line in leecher.peer_log() if "HASH_REQUEST" in line]
            answered = [line for line in leecher.peer_log() if "<== HASHES" in line]
            rejected = [line for line in leecher.peer_log() if "HASH_REJECT" in line]
        summary = seeding.stop()
        # a hybrid's leecher checks pieces with SHA-1 and needs no piece layer
        assert len(answered) == len(asked) == summary["hash_requests_served"]
        assert (kind == "hybrid" or len(answered) >= 1) and not rejected, asked[:5]
        _same_tree(content, tmp_path / "leech" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_hybrid_known_by_its_info_dictionary_alone_is_downloaded_and_seeded(
        tmp_path: Path) -> None:
    """A hybrid .torrent without ``piece layers`` (the metadata a magnet link gets from
    peers): pieced-peer downloads it from a libtorrent seeder, every piece checked by
    its v1 hash, and seeds it to a libtorrent leecher from a magnet link, whose hash
    requests it cannot answer (rejected), which finishes on the v1 hashes."""
    import bencodepy

    piece = 32768
    files = {"a.bin": 37 * piece + 5, "b.bin": 5 * piece, "small": 1000}
    content, raw, _ = _made(tmp_path, files, piece, "hybrid", seed=16)
    top = bencodepy.decode(raw)
    assert top.pop(b"piece layers")
    torrent = tmp_path / "bare.torrent"
    torrent.write_bytes(bencodepy.encode(top))
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            down = download(torrent, tmp_path / "dl", d, seeder.port)
        assert down["pieces_failed"] == 0
        _same_tree(content, tmp_path / "dl" / "payload", files)
        seeding = Seeding(torrent, tmp_path / "dl", d)
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files, magnet=True)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_a_leecher_from_a_magnet_link_gets_the_metadata_from_us(tmp_path: Path,
                                                               kind: str) -> None:
    """libtorrent given only the info hash (a magnet link), pieced-peer --seed its only
    peer: it asks for the metadata (BEP 9's ut_metadata), gets the info dictionary from
    us in 16 KiB pieces (the metadata of 2,000 pieces is over 40 KiB for v1), then the
    data (and, v2, the piece layers by hash requests). It used to wait for the metadata
    for ever."""
    piece = 16384
    files = {"a.bin": 2000 * piece + 5, "b.bin": 3 * piece}
    content = make_payload(tmp_path / "seed", files, seed=14)
    raw = make_torrent_lt(content, piece, kind)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d)
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files, magnet=True)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_seeder_dials_its_peers_until_they_answer(tmp_path: Path) -> None:
    """pieced-peer --seed --peer ADDR, started before the leecher at ADDR listens (and
    after it has left, for it to come back): ADDR is dialled again, with the backoff of
    a download. It was dialled once, and the seeder served no one."""
    import socket

    piece = 32768
    files = {"a.bin": 40 * piece + 3}
    content = make_payload(tmp_path / "seed", files, seed=15)
    raw = make_torrent_lt(content, piece, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d, "--peer", f"127.0.0.1:{port}")
        time.sleep(2)  # refused: nobody listens there yet
        with LtPeer(raw, tmp_path / "leech", seed=False, port=port) as leecher:
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
        summary = seeding.stop()
        assert summary["peers"] >= 1 and summary["bytes_up"] >= sum(files.values())
        _same_tree(content, tmp_path / "leech" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("squat", ["nothing", "choking"])
def test_peers_with_nothing_to_exchange_make_room_for_a_seeder_to_be_dialled(
        tmp_path: Path, squat: str) -> None:
    """Every place of a downloading pieced-peer (``--max-peers 2``) taken by peers that
    came in and either have nothing and want nothing, or have every piece and choke us
    for ever (keep-alives all along), and its seeder up only later: the seeder was
    never dialled again, and the download waited for ever. A peer with nothing to
    exchange now gives its place to a due dial, as to a newcomer that dials us; so does
    one we want pieces from that has sent none for 30 s."""
    import socket

    from pieced.peer import wire

    piece = 32768
    files = {"a.bin": 30 * piece + 9}
    content = make_payload(tmp_path / "seed", files, seed=17)
    raw = make_torrent_lt(content, piece, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    meta = parse(raw)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = Daemon(tmp_path)
    proc, ours = listening(torrent, tmp_path / "dl", d, "--max-peers", "2", "--peer",
                           f"127.0.0.1:{port}")
    squatters: list[socket.socket] = []
    try:
        for i in range(2):
            s = socket.create_connection(("127.0.0.1", ours), timeout=10)
            s.sendall(wire.handshake(meta.info_hash, b"-XX0001-" + bytes([i]) * 12,
                                     wire.make_reserved(extended=False, fast=True))
                      + (wire.have_none() if squat == "nothing" else wire.have_all()))
            squatters.append(s)
        time.sleep(3)  # the seeder's address refused, and due again; every place taken
        with LtPeer(raw, tmp_path / "seed", seed=True, port=port):
            deadline = time.monotonic() + (60 if squat == "nothing" else 120)
            while proc.poll() is None and time.monotonic() < deadline:
                for s in squatters:
                    with contextlib.suppress(OSError):
                        s.sendall(wire.keep_alive())
                time.sleep(1)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert json.loads(out)["complete"]
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        for s in squatters:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert d.stop() == 0, d.stderr()


def test_an_address_that_cannot_be_listened_on_is_said_so(tmp_path: Path) -> None:
    """``--listen`` on a port in use: exit 2 saying it cannot listen there (it blamed
    the daemon)."""
    import socket

    files = {"a.bin": 50_000}
    content = make_payload(tmp_path / "seed", files, seed=16)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(make_torrent_lt(content, 16384, "v1"))
    d = Daemon(tmp_path)
    try:
        with socket.create_server(("127.0.0.1", 0)) as busy:
            port = busy.getsockname()[1]
            r = subprocess.run(peer_cmd(torrent, tmp_path / "seed", d.socket, "--seed",
                                        "--listen", f"127.0.0.1:{port}"),
                               capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
        assert "daemon" not in r.stderr, r.stderr
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("wait", ["0", "1.5"])
def test_pieced_peer_stops_when_the_daemon_goes(tmp_path: Path, wait: str) -> None:
    """Its storage gone, a seeding pieced-peer says so and exits 2 (not serve on), its
    ``--json`` summary printed all the same: at once with ``--daemon-wait 0``, else once
    the daemon has not come back in the time given."""
    import time

    files = {"a.bin": 100_000}
    content = make_payload(tmp_path / "seed", files, seed=13)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(make_torrent_lt(content, 16384, "v1"))
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--daemon-wait", wait)
    assert d.stop() == 0
    gone = time.monotonic()
    out, err = seeding.proc.communicate(timeout=30)
    took = time.monotonic() - gone
    assert seeding.proc.returncode == 2 and "lost the daemon" in err, err
    assert json.loads(out)["complete"] is True
    if wait == "0":
        assert "waiting" not in err, err
    else:
        assert "waiting up to 1.5 s" in err and "did not come back" in err, err
        assert took >= 1.5, took


def _seeding_then_restarted(tmp_path: Path, wait: str, seed: int,
                            ) -> tuple[Seeding, Path, bytes]:
    """pieced-peer seeding a small torrent with ``--daemon-wait wait``, its daemon
    stopped: (the seeding, the torrent file, its info hash)."""
    content = make_payload(tmp_path / "seed", {"a.bin": 100_000}, seed=seed)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(make_torrent_lt(content, 16384, "v1"))
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--daemon-wait", wait)
    with Client(d.socket) as c:
        ih = bytes.fromhex(c.torrents()[0]["info_hash"])
    assert d.stop() == 0, d.stderr()
    return seeding, torrent, ih


def test_a_daemon_back_but_not_answering_is_given_up_in_time(tmp_path: Path) -> None:
    """The daemon comes back but does not answer (stopped with SIGSTOP once it listens:
    its socket takes connections all the same): pieced-peer gives it up once
    ``--daemon-wait`` is over, instead of waiting for its answer for ever."""
    seeding, _, _ = _seeding_then_restarted(tmp_path, "3", seed=26)
    gone = time.monotonic()
    d = Daemon(tmp_path)
    d.proc.send_signal(signal.SIGSTOP)
    try:
        out, err = seeding.proc.communicate(timeout=30)
        took = time.monotonic() - gone
    finally:
        d.proc.send_signal(signal.SIGCONT)
        assert d.stop() == 0, d.stderr()
    assert seeding.proc.returncode == 2, err
    assert "did not come back in 3 s" in err and "lost the daemon" in err, err
    assert 3 <= took < 10, took
    assert json.loads(out)["complete"] is True


def test_a_daemon_back_but_full_is_waited_for(tmp_path: Path) -> None:
    """The daemon comes back with every place taken (``max_clients``, by clients that
    came back first): its refusal is for now (EBUSY), and pieced-peer tries again until
    a place comes free, instead of stopping as if the daemon had refused it for good."""
    import urllib.request

    def stats() -> dict[str, int]:
        with urllib.request.urlopen(f"http://{d.http}/stats", timeout=10) as r:
            return dict(json.load(r))

    def until(cond: Callable[[dict[str, int]], bool]) -> None:
        deadline = time.monotonic() + 30
        while not cond(stats()):
            assert time.monotonic() < deadline and seeding.proc.poll() is None, \
                seeding.proc.communicate()
            time.sleep(0.05)

    seeding, torrent, ih = _seeding_then_restarted(tmp_path, "30", seed=28)
    raw = torrent.read_bytes()
    seeding.proc.send_signal(signal.SIGSTOP)  # (so that the other client is first)
    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "1"})
    try:
        with Client(d.socket) as c:
            seeding.proc.send_signal(signal.SIGCONT)
            until(lambda s: s["clients_refused"] >= 2)  # (refused, and tried again)
            assert c.status(ih)["verified_pieces"] == 7
        until(lambda s: s["clients_accepted"] == 2)  # (its place taken by pieced-peer)
        with LtPeer(raw, tmp_path / "leech", seed=False) as leecher:  # (served again)
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
        summary = seeding.stop()
        assert summary["daemon_reconnects"] == 1 and summary["complete"], summary
    finally:
        seeding.proc.send_signal(signal.SIGCONT)
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("how", ["removed", "not loaded", "refuses"])
def test_a_daemon_that_comes_back_changed_stops_pieced_peer_saying_why(
        tmp_path: Path, how: str) -> None:
    """The daemon comes back without the torrent (removed by another client before
    pieced-peer took it up again; or not loaded, its save path outside the roots the
    daemon allows now), or refusing what it asks (a smaller max_ring_bytes now):
    pieced-peer stops with that reason (exit 2), not as if the daemon had not come back,
    and does not register the torrent again."""
    seeding, _, ih = _seeding_then_restarted(tmp_path, "30", seed=27)
    if how == "removed":  # (by a client of the daemon on another socket meanwhile)
        other = tmp_path / "other.sock"
        aside = Daemon(tmp_path, env={"PIECED_SOCKET": str(other)})
        with Client(other) as c:
            c.unregister(ih)
        assert aside.stop() == 0, aside.stderr()
    env = {"refuses": {"PIECED_MAX_RING_BYTES": str(1 << 20)},
           "not loaded": {"PIECED_ROOTS": str(tmp_path / "elsewhere")}}.get(how)
    d = Daemon(tmp_path, env=env)
    try:
        out, err = seeding.proc.communicate(timeout=60)
        assert seeding.proc.returncode == 2, err
        assert "lost the daemon" not in err.splitlines()[-1], err
        if how != "refuses":
            assert "came back without the torrent" in err.splitlines()[-1], err
            assert ("removed" if how == "removed" else "not loaded") in err, err
            with Client(d.socket) as c:
                assert c.torrents() == []  # (not registered again)
        else:
            assert "max_ring_bytes" in err.splitlines()[-1], err
        assert json.loads(out)["daemon_reconnects"] == 0
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_torrent_moved_by_another_client_is_followed_across_a_restart(
        tmp_path: Path) -> None:
    """Another client moves the torrent pieced-peer seeds (move_storage), and the daemon
    restarts later: pieced-peer found the torrent registered at another save path than
    its own --save-path and stopped (exit 2), a seed gone for a move. It takes the
    torrent up where the daemon has it now, and a libtorrent leecher gets every byte."""
    content = make_payload(tmp_path / "seed", {"a.bin": 300_000}, seed=41)
    raw = make_torrent_lt(content, 16384, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--daemon-wait", "30")
    try:
        with Client(d.socket) as c:
            ih = bytes.fromhex(c.torrents()[0]["info_hash"])
            c.move_storage(ih, tmp_path / "moved")
        time.sleep(1.5)  # (pieced-peer goes on seeding, as the daemon has it)
        assert d.stop() == 0, d.stderr()
        d = Daemon(tmp_path)
        with LtPeer(raw, tmp_path / "leech", seed=False) as leecher:
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
        seeding.proc.send_signal(signal.SIGTERM)
        out, err = seeding.proc.communicate(timeout=30)
        assert seeding.proc.returncode == 0, err
        assert json.loads(out)["daemon_reconnects"] == 1, out
        assert "moved by another client" in err, err
        _same_tree(tmp_path / "moved" / "payload", tmp_path / "leech" / "payload",
                   {"a.bin": 300_000})
    finally:
        if seeding.proc.poll() is None:
            seeding.proc.kill()
        assert d.stop() == 0, d.stderr()


def _free_port() -> int:
    """A port free now on every interface, TCP and UDP, that the system hands out to no
    outgoing connection meanwhile: one of its ephemeral range (what a bind to port 0
    gives) was now and then taken, before the test's listener came, by a connection of
    the test's own (a dial of that very port gets it as its source port), and the
    listener failed with "address already in use"."""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, max(low, 10001))
        try:
            for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                with socket.socket(socket.AF_INET6, kind) as s:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    s.bind(("::", port))
        except OSError:
            continue
        return port


def _verified(socket_path: str) -> int:
    with Client(socket_path) as c:
        listed = c.torrents()
        return int(listed[0]["verified_pieces"]) if listed else 0


def test_a_file_deleted_while_seeding_stops_pieced_peer_saying_what_is_left(
        tmp_path: Path) -> None:
    """A payload file deleted while a libtorrent leecher downloads from a seeding
    pieced-peer: the daemon's read finds it gone, and pieced-peer stops (exit 2) saying
    the daemon met an error on the torrent's files, not that it cannot store them (it was
    a read). Its summary said ``complete`` still: the daemon now tells of the pieces
    the file took with it before the error, and the summary asks what is left."""
    import time

    piece = 262144
    files = {"a.bin": 120 * piece + 1000, "b.bin": 3 * piece}
    content = make_payload(tmp_path / "seed", files, seed=9)
    raw = _torrent("v1", content, piece)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d)
        with LtPeer(raw, tmp_path / "leech", seed=False,
                    settings={"download_rate_limit": 3_000_000, "limit_loopback": True}
                    ) as leecher:
            leecher.connect("127.0.0.1", seeding.port)
            deadline = time.monotonic() + 60
            while leecher.status()["progress"] < 0.2:
                assert time.monotonic() < deadline, leecher.status()
                time.sleep(0.1)
            (content / "a.bin").unlink()
            out, err = seeding.proc.communicate(timeout=60)
        assert seeding.proc.returncode == 2, err
        assert "the daemon met an error on the torrent's files" in err, err
        assert "deleted behind pieced's back" in err, err
        summary = json.loads(out)
        assert summary["complete"] is False, summary
        with Client(d.socket) as c:
            st = c.status(c.torrents()[0]["info_hash"])
        assert st["verified_pieces"] <= 4, st  # b.bin's pieces, and no more
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_download_deleted_and_started_again_is_fetched_again(tmp_path: Path) -> None:
    """A download completed, its files deleted (``rm -rf`` of the download, the daemon
    running), then the same pieced-peer command again: it ended at once, "complete",
    with nothing on disk (the daemon still had every piece verified, and found the
    files gone only at a read of them). Its register now has the daemon look at the
    files first: the download is fetched again, whole. The save folder deleted too is
    not made again (a drive not mounted would be downloaded to the disk below it, as
    Transmission refuses to): pieced-peer stops saying so."""
    piece = 262144
    files = {"a.bin": 9 * piece + 1000, "sub/b.bin": 3 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=29)
    total = sum(files.values())
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            first = download(torrent, tmp_path / "dl", d, seeder.port)
            assert first["bytes_down"] >= total
            shutil.rmtree(tmp_path / "dl" / "payload")  # the files, not the save folder
            again = download(torrent, tmp_path / "dl", d, seeder.port)
            assert again["bytes_down"] >= total, again
            _same_tree(content, tmp_path / "dl" / "payload", files)
            shutil.rmtree(tmp_path / "dl")  # the save folder too
            r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer",
                                        f"127.0.0.1:{seeder.port}"),
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
            assert "save path" in r.stderr, r.stderr
            assert not (tmp_path / "dl").exists()
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("stopped", ["plugin", "daemon"])
def test_a_download_stopped_mid_piece_fetches_only_the_rest_of_it_when_started_again(
        tmp_path: Path, stopped: str) -> None:
    """pieced-peer stopped (SIGINT) in the middle of a 4 MiB piece, or the daemon
    stopped (SIGTERM) and started again, then pieced-peer started again: the blocks the
    daemon holds of the piece under way are not fetched again (they were: with 64 MiB
    pieces, a stop cost up to a whole piece's download again, where libtorrent keeps
    partial pieces, in its resume data across its own restarts too)."""
    piece = 4 * 1024 * 1024
    files = {"a.bin": 5 * piece + 777}
    content = make_payload(tmp_path / "seed", files, seed=17)
    raw = _torrent("v1", content, piece)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    total = sum(files.values())
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True,
                    settings={"upload_rate_limit": 4_000_000, "limit_loopback": True}) as seeder:
            first = downloading(torrent, tmp_path / "dl", d, seeder.port,
                                extra=("--daemon-wait", "0"))  # (started again below)
            held: list[Any] = []
            with Client(d.socket) as c:
                deadline = time.monotonic() + 60
                while not held:
                    assert time.monotonic() < deadline, "no piece under way"
                    time.sleep(0.05)
                    if c.torrents():
                        st = c.status(c.torrents()[0]["info_hash"], files=False, partial=True)
                        held = [r for r in st["partial"]
                                if sum(e - b for b, e in r[1]) >= piece // 4]
                if stopped == "plugin":
                    first.send_signal(signal.SIGINT)
                    first.communicate(timeout=30)
            if stopped == "daemon":
                assert d.stop() == 0, d.stderr()
                first.communicate(timeout=30)
                assert first.returncode == 2
                d = Daemon(tmp_path)
            with Client(d.socket) as c:
                ih = c.torrents()[0]["info_hash"]
                st = c.status(ih, files=False, partial=True)
            assert st["partial"], st  # (a stop leaves the daemon what it was given)
            verified = sum(min(piece, total - p * piece)
                           for p, h in enumerate(wire.pieces_from_bits(bytes(st["have"]),
                                                                       st["num_pieces"])) if h)
            kept = sum(e - b for _, spans in st["partial"] for b, e in spans)
            again = download(torrent, tmp_path / "dl", d, seeder.port)
        assert again["blocks_resumed"] == sum(-(-(e - b) // 16384) for _, spans in st["partial"]
                                              for b, e in spans), (again, st["partial"])
        assert again["bytes_down"] == total - verified - kept, (again, verified, kept)
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_pieces_under_way_in_too_many_parts_to_tell_are_resumed_as_far_as_told(
        tmp_path: Path) -> None:
    """The ranges held of the pieces under way do not fit the daemon's frame limit (every
    other block of 120 pieces, and a limit of 64 KiB): the status tells the first pieces'
    (``partial_cut``), pieced-peer resumes those and fetches the others whole, instead of
    failing to start."""
    from tests.test_disk import Source

    piece = 1024 * 1024
    files = {"a.bin": 128 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=19)
    src = Source(raw, tmp_path / "seed")
    d = Daemon(tmp_path, env={"PIECED_MAX_FRAME_BYTES": str(64 * 1024)})
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            for p in range(120):
                for b in range(0, piece, 2 * 16384):
                    c.write_chunk(ih, p, b, src.read(p, b, 16384))
            c.wait_writes()
            st = c.status(ih, files=False, partial=True)
            told = [p for p, _ in st["partial"]]
            assert st["partial_cut"] == 1 and told == list(range(len(told))), told
            assert 0 < len(told) < 120 and st["partial_pieces"] == 120
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            summary = download(torrent, tmp_path / "dl", d, seeder.port)
        assert summary["blocks_resumed"] == 32 * len(told)  # every other block of 64
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_no_room_for_a_piece_and_pieces_under_way_too_many_to_tell_is_waited_out(
        tmp_path: Path) -> None:
    """Another client holds every place for a piece in progress (``max_partial_pieces``),
    each piece in more parts than a reply can list, and pieced-peer's first peer has only
    other pieces: its blocks are refused for want of room. It asked the daemon again for
    the pieces under way, was answered TOO_LARGE, and stopped (exit 2); told none of
    them, it went on beginning pieces the daemon refused (its one place taken by the
    first peer, which had none of those under way). Now the status tells the first
    pieces under way, it waits, and finishes once a seed that has them comes."""
    piece = 1024 * 1024
    files = {"a.bin": 128 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=23)
    src = Source(raw, tmp_path / "seed")
    half = tmp_path / "half" / "payload" / "a.bin"  # pieces 64 to 127 only
    half.parent.mkdir(parents=True)
    with open(content / "a.bin", "rb") as f, open(half, "wb") as out:
        out.truncate(64 * piece)
        f.seek(64 * piece)
        out.seek(64 * piece)
        shutil.copyfileobj(f, out)
    d = Daemon(tmp_path, env={"PIECED_MAX_FRAME_BYTES": str(64 * 1024),
                              "PIECED_MAX_PARTIAL_PIECES": "64"})
    proc: subprocess.Popen[str] | None = None
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            for p in range(64):
                for b in range(0, piece, 8192):
                    c.write_chunk(ih, p, b, src.read(p, b, 4096))
            c.wait_writes()
            st = c.status(ih, files=False, partial=True)
            assert st["partial_cut"] == 1 and len(st["partial"]) < 64
        port = _free_port()
        with LtPeer(raw, tmp_path / "half", seed=False) as halfway:
            assert halfway.status()["num_pieces"] == 64
            proc = downloading(torrent, tmp_path / "dl", d, halfway.port, port)
            time.sleep(4)  # blocks refused, the pieces under way asked for again
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            with LtPeer(raw, tmp_path / "seed", seed=True, port=port):
                out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        summary = json.loads(out)
        assert summary["complete"] and summary["blocks_refused"] > 0, summary
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert d.stop() == 0, d.stderr()


def test_a_piece_changed_on_disk_while_seeding_is_fetched_again_and_the_rest_served(
        tmp_path: Path) -> None:
    """A piece's bytes changed on disk behind the daemon's back while pieced-peer seeds
    (a cache too small to keep it: read whole from disk, found not what was verified):
    the daemon says so with a ``disk_error`` marked ``changed``, and the piece is
    verified no more. pieced-peer stopped (exit 2) on that error, and its leecher never got the
    pieces it still lacked. Now it serves the others on, fetches that one again from a
    seed that comes, and the leecher gets everything."""
    piece = 65536
    files = {"a.bin": 40 * piece + 11}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=29)
    shutil.copytree(content, tmp_path / "dl" / content.name)
    d = Daemon(tmp_path, env={"PIECED_CACHE_BYTES": str(piece)})
    victim = 7
    proc: subprocess.Popen[str] | None = None
    try:
        proc, port = listening(torrent, tmp_path / "dl", d, "--seed")
        with Client(d.socket) as c:
            ih = c.torrents()[0]["ih"]
            assert c.status(ih, files=False)["verified_pieces"] == 41
            with open(tmp_path / "dl" / content.name / "a.bin", "r+b") as f:
                f.seek(victim * piece + 500)
                f.write(b"changed!")
            # Read whole (as a read that fills the cache is): found changed. (A part of a
            # piece read alone is served as it is on disk, as libtorrent serves it.)
            with pytest.raises(PiecedError, match="not those verified") as found:
                c.read_piece(ih, victim)
            assert found.value.errno == errno.EIO
            st = c.status(ih, files=False)
            assert not st["have"][victim // 8] & (0x80 >> victim % 8)
            assert any(e.get("changed") == 1 and e["piece"] == victim for e in st["errors"]), st
            with LtPeer(raw, tmp_path / "leech", seed=False) as leecher:
                leecher.connect("127.0.0.1", port)
                deadline = time.monotonic() + 60
                while leecher.status()["num_pieces"] < 40:  # every other piece, from us
                    assert time.monotonic() < deadline and proc.poll() is None, (
                        leecher.status(), proc.communicate()[1][-3000:])
                    time.sleep(0.05)
                with LtPeer(raw, tmp_path / "seed", seed=True) as seed:
                    seed.connect("127.0.0.1", port)
                    leecher.wait_finished(60)
                assert leecher.hash_failures() == 0
            assert c.status(ih, files=False)["verified_pieces"] == 41
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        assert "changed on disk" in err and json.loads(out)["complete"]
        _same_tree(content, tmp_path / "dl" / content.name, files)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert d.stop() == 0, d.stderr()


def test_a_seeder_not_up_yet_or_gone_for_a_while_is_dialled_again(tmp_path: Path) -> None:
    """pieced-peer starts before its only seeder listens, and the seeder leaves mid-download
    and comes back on the same port: each time the peer is dialled again (as libtorrent
    does), and the download completes. Before, a peer was dialled once: the download
    waited for ever."""
    import time

    piece = 262144
    files = {"a.bin": 24 * piece + 77}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=10)
    port = _free_port()
    d = Daemon(tmp_path)
    try:
        proc = downloading(torrent, tmp_path / "dl", d, port)
        time.sleep(1.5)  # its first dials are refused: nothing listens there yet
        assert proc.poll() is None
        with LtPeer(raw, tmp_path / "seed", seed=True, port=port, settings=SLOW):
            deadline = time.monotonic() + 30
            while _verified(d.socket) == 0:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
        got = _verified(d.socket)
        assert 0 < got < 25 and proc.poll() is None  # the seeder left mid-download
        time.sleep(1.5)  # dialled again meanwhile, and refused
        with LtPeer(raw, tmp_path / "seed", seed=True, port=port):
            out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and summary["peers"] >= 2, summary
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_no_peer_to_talk_to_is_an_error(tmp_path: Path) -> None:
    """No --peer, no --listen and no tracker: nothing could ever come, so pieced-peer says
    so and exits 2 instead of waiting for ever; with --listen it waits for peers."""
    content = make_payload(tmp_path / "seed", {"a.bin": 100_000}, seed=14)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(make_torrent_lt(content, 16384, "v1"))
    d = Daemon(tmp_path)
    try:
        for save, extra in ((tmp_path / "dl", ()), (tmp_path / "seed", ("--seed",))):
            r = subprocess.run(peer_cmd(torrent, save, d.socket, *extra), capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 2 and "--peer HOST:PORT" in r.stderr, r.stderr
            with Client(d.socket) as c:
                for t in c.torrents():
                    c.unregister(bytes.fromhex(t["info_hash"]))
        r = subprocess.run(peer_cmd(torrent, tmp_path / "seed", d.socket), capture_output=True,
                           text=True, timeout=60)  # complete already: nothing to do
        assert r.returncode == 0 and json.loads(r.stdout)["complete"], r.stderr
        seeding = Seeding(torrent, tmp_path / "seed", d)  # --listen: it waits for peers
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_the_end_game_asks_few_blocks_twice(tmp_path: Path) -> None:
    """Eight libtorrent seeders, one pieced-peer: the seeders send not much more than the
    blocks needed (libtorrent -> libtorrent: about 1 %). The end game used to ask an
    idle peer for up to half its pipeline of what others were already sending: the
    seeders sent 1,421 blocks for 769 needed."""
    piece = 32768
    files = {"a.bin": 12 * 1024 * 1024, "b": 1}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=112)
    needed = sum(-(-n // 16384) for n in files.values())
    d = Daemon(tmp_path)
    try:
        with contextlib.ExitStack() as stack:
            seeders = [stack.enter_context(LtPeer(raw, tmp_path / "seed", seed=True,
                                                  log_peer=True)) for _ in range(8)]
            download(torrent, tmp_path / "dl", d, *(s.port for s in seeders))
            time.sleep(1.0)  # the seeders' last sends reach their logs
            sent = sum(1 for s in seeders for line in s.peer_log() if "==> PIECE" in line)
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert needed <= sent <= 1.25 * needed, (sent, needed)
    finally:
        assert d.stop() == 0, d.stderr()


class FreezingSeeds:
    """Seeders that serve requests (about 1.6 MB/s each) for ``serve`` seconds from the
    first, then answer nothing more while keeping the connection up with a keep-alive a
    second (a disk that hung, a process stopped): made here, on the project's own wire
    codec."""

    def __init__(self, n: int, raw: bytes, src: Source, serve: float) -> None:
        import socket

        meta = parse(raw)
        self.ih = meta.info_hash_v1 or (meta.info_hash_v2 or b"")[:20]
        self.src, self.serve = src, serve
        self.socks = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(4)
            self.socks.append(s)
        self.ports = [s.getsockname()[1] for s in self.socks]
        self.stopping = threading.Event()
        self.served = 0
        self.threads = [threading.Thread(target=self._accept, args=(s, i), daemon=True)
                        for i, s in enumerate(self.socks)]
        for t in self.threads:
            t.start()

    def _accept(self, listener: Any, i: int) -> None:
        listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(conn, i), daemon=True).start()

    def _serve(self, conn: Any, i: int) -> None:
        parser = wire.Parser(handshake=True)
        conn.settimeout(1.0)
        peer_id = b"-FZ0001-" + b"%012d" % i
        first: float | None = None
        with conn:
            while not self.stopping.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    conn.sendall(wire.keep_alive())
                    continue
                except OSError:
                    return
                if not data:
                    return
                for ev in parser.feed(data):
                    if isinstance(ev, wire.Handshake):
                        conn.sendall(wire.handshake(self.ih, peer_id,
                                                    wire.make_reserved(extended=False))
                                     + wire.have_all() + wire.unchoke())
                    elif isinstance(ev, wire.Request):
                        first = first or time.monotonic()
                        if time.monotonic() - first < self.serve:
                            self.served += 1
                            conn.sendall(wire.piece(ev.piece, ev.begin, self.src.read(
                                ev.piece, ev.begin, ev.length)))
                            time.sleep(0.01)

    def close(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(5)
        for s in self.socks:
            s.close()


def test_blocks_two_stalled_seeders_hold_are_fetched_from_a_third_in_seconds(
        tmp_path: Path) -> None:
    """Two seeders serve for two seconds, then stop answering but keep their
    connections up, holding the requests they were given; a libtorrent seeder serves
    everything at 1 MiB/s. pieced-peer finds the two out from how fast they had answered
    (in seconds, as libtorrent does), not after the longest a request may wait (30 s),
    and asks the third for what they held. It used to wait that long: the third was
    never idle (the end game only gives an idle peer blocks asked of others), and
    blocks asked of both stalled peers went to no third one."""
    from pieced.peer.plugin import REQUEST_TIMEOUT

    files = {"a.bin": 12_000_000}
    content, raw, torrent = _made(tmp_path, files, 1 << 20, "v1", seed=118)
    src = Source(raw, content.parent)
    d = Daemon(tmp_path)
    frozen = FreezingSeeds(2, raw, src, serve=2.0)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True,
                    settings={"upload_rate_limit": 1 << 20,
                              "ignore_limits_on_local_network": False}) as seeder:
            started = time.monotonic()
            summary = download(torrent, tmp_path / "dl", d, *frozen.ports, seeder.port)
            took = time.monotonic() - started
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert frozen.served > 0  # (they took part before they stalled)
        assert took < REQUEST_TIMEOUT, summary
    finally:
        frozen.close()
        assert d.stop() == 0, d.stderr()


def test_a_torrent_registered_with_another_save_path_is_refused(tmp_path: Path) -> None:
    """The torrent is registered with one save path and pieced-peer is given another:
    it says where the torrent is and exits 2, making nothing in the path it was given.
    (It used to go on with the registered path: "complete", with nothing in the folder
    the user named.)"""
    content = make_payload(tmp_path / "seed", {"a.bin": 50_000}, seed=16)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(make_torrent_lt(content, 16384, "v1"))
    d = Daemon(tmp_path)
    try:
        with Client(d.socket) as c:
            assert c.recheck(c.register(torrent.read_bytes(), tmp_path / "seed"))["verified"]
        r = subprocess.run(peer_cmd(torrent, tmp_path / "other", d.socket),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"registered with save path {tmp_path / 'seed'}" in r.stderr, r.stderr
        assert not (tmp_path / "other").exists()
    finally:
        assert d.stop() == 0, d.stderr()


def test_trackers_that_never_answer_hold_up_the_exit_a_few_seconds_only(
        tmp_path: Path) -> None:
    """Three trackers that take the connection and never answer: the download (from the
    seeder given with --peer) is not held up, and at the end the exit waits for their
    "completed" and "stopped" a few seconds in all (libtorrent gives them 5), not 15 s
    each, one after the other (it took 48 s)."""
    import socket
    import time

    from pieced.peer.plugin import STOP_ANNOUNCE_TIMEOUT

    content = make_payload(tmp_path / "seed", {"a.bin": 300_000}, seed=17)
    raw = make_torrent_lt(content, 16384, "v1")
    listeners = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # connections wait in the backlog, never read or answered
        listeners.append(s)
    import bencodepy

    top = bencodepy.decode(raw)
    top[b"announce-list"] = [[f"http://127.0.0.1:{s.getsockname()[1]}/announce".encode()]
                             for s in listeners]
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(bencodepy.encode(top))
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            t0 = time.monotonic()
            summary = download(torrent, tmp_path / "dl", d, seeder.port, timeout=60)
            took = time.monotonic() - t0
        assert summary["complete"]
        assert took < STOP_ANNOUNCE_TIMEOUT + 10, took  # before: 15 s a tracker, in turn
        assert summary["seconds"] < took  # the transfer's time, without the goodbyes
    finally:
        for s in listeners:
            s.close()
        assert d.stop() == 0, d.stderr()


def test_a_seeder_that_requires_encryption_is_named_as_such(tmp_path: Path) -> None:
    """A libtorrent seeder with encryption required closes every plain connection.
    pieced-peer, which speaks plain BitTorrent only, says so once (it used to dial
    again and again in silence), and keeps trying until stopped."""
    import libtorrent as lt

    content = make_payload(tmp_path / "seed", {"a.bin": 100_000}, seed=18)
    raw = make_torrent_lt(content, 16384, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    forced = {"in_enc_policy": int(lt.enc_policy.pe_forced),
              "out_enc_policy": int(lt.enc_policy.pe_forced),
              "allowed_enc_level": int(lt.enc_level.both)}
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=forced) as seeder:
            proc = downloading(torrent, tmp_path / "dl", d, seeder.port)
            assert proc.stderr is not None
            ready, _, _ = select.select([proc.stderr], [], [], 30)
            line = proc.stderr.readline() if ready else ""  # the first thing it says
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        assert "closed the connection before its handshake" in line, line + err
        assert "encryption" in line
        assert (line + err).count("before its handshake") == 1  # once, though dialled again
        assert proc.returncode == 1 and not json.loads(out)["complete"]
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_libtorrent_with_its_default_transports_falls_back_to_tcp_at_once(
        tmp_path: Path) -> None:
    """libtorrent as it comes (uTP on, encryption "enabled") dials a new peer over uTP
    first, and over TCP only once that attempt fails: pieced-peer, which has no uTP,
    did not answer, so every libtorrent that met it waited out its uTP connect timeout
    first (5 s here, "Connection timed out" in its log). The listening port's UDP side
    now answers a uTP SYN with a RESET: the attempt fails at once ("Connection reset"),
    libtorrent dials again over TCP (its encrypted handshake refused, then plain), and
    downloads every byte."""
    content = make_payload(tmp_path / "seed", {"a.bin": 300_000}, seed=19)
    raw = make_torrent_lt(content, 16384, "hybrid")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    as_it_comes = {"enable_incoming_utp": True, "enable_outgoing_utp": True,
                   "in_enc_policy": int(lt.enc_policy.pe_enabled),
                   "out_enc_policy": int(lt.enc_policy.pe_enabled),
                   "allowed_enc_level": int(lt.enc_level.both)}
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d)
        with LtPeer(raw, tmp_path / "leech", seed=False, settings=as_it_comes,
                    log_peer=True) as leecher:
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
            log = leecher.peer_log()
        first = [line for line in log if "CONNECTION [" in line or "CONNECTION_FAILED" in line]
        assert "type: uTP" in first[0], first  # (libtorrent tries uTP first, as said above)
        assert "CONNECTION_FAILED" in first[1] and "reset" in first[1], first[:3]
        assert "type: TCP" in first[2], first[:3]
        _same_tree(content, tmp_path / "leech" / "payload", {"a.bin": 300_000})
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_two_torrents_giving_one_file_other_bytes_do_not_take_it_from_each_other_for_ever(
        tmp_path: Path) -> None:
    """Two torrents in one save path name one file with other contents (a re-release
    that shares ``a.bin`` but not ``b.bin``), each downloaded and seeded by a pieced-peer
    of its own from a libtorrent seeder. Each write of one takes back the pieces the
    other had verified in that file (the daemon's rule for shared files), and each
    pieced-peer fetched them again: neither ever completed, and the two downloaded
    the file over and over. Now a pieced-peer that has lost one piece three times stops,
    saying why (exit 2), and the other completes."""
    piece = 65536
    c1 = make_payload(tmp_path / "s1", {"a.bin": 300_005, "b.bin": 500_000}, seed=171)
    c2 = make_payload(tmp_path / "s2", {"b.bin": 500_000}, seed=172)
    shutil.copy(c1 / "a.bin", c2 / "a.bin")
    raws = [make_torrent_lt(c, piece, "hybrid") for c in (c1, c2)]
    torrents = [tmp_path / "t1.torrent", tmp_path / "t2.torrent"]
    for t, raw in zip(torrents, raws, strict=True):
        t.write_bytes(raw)
    d = Daemon(tmp_path)
    procs: list[subprocess.Popen[str]] = []
    try:
        with LtPeer(raws[0], tmp_path / "s1", seed=True, settings=SLOW) as s1, \
                LtPeer(raws[1], tmp_path / "s2", seed=True, settings=SLOW) as s2:
            for t, seeder in zip(torrents, (s1, s2), strict=True):
                procs.append(subprocess.Popen(
                    peer_cmd(t, tmp_path / "dl", d.socket, "--peer", f"127.0.0.1:{seeder.port}",
                             "--seed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                _running.append(procs[-1])
                time.sleep(2)  # (the first under way when the second starts)
            deadline = time.monotonic() + 120
            while all(p.poll() is None for p in procs):
                assert time.monotonic() < deadline, "both still fetching each other's pieces"
                time.sleep(0.5)
            (loser,) = [i for i, p in enumerate(procs) if p.poll() is not None]
            winner = 1 - loser
            _, err = procs[loser].communicate(timeout=30)
            assert procs[loser].returncode == 2, err
            assert "taken back by the daemon 3 times" in err, err
            ih = parse(raws[winner]).info_hash
            with Client(d.socket) as c:
                deadline = time.monotonic() + 60
                while True:
                    st = c.status(ih, files=False)
                    if st["verified_pieces"] == st["num_pieces"]:
                        break
                    assert time.monotonic() < deadline, st["verified_pieces"]
                    time.sleep(0.5)
            procs[winner].send_signal(signal.SIGTERM)
            out, err = procs[winner].communicate(timeout=30)
            assert procs[winner].returncode == 0, err
            assert json.loads(out)["complete"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize(("kind", "family"), [("v1", "ipv4"), ("hybrid", "ipv4"),
                                              ("v1", "both")])
def test_two_pieced_peers_that_dial_each_other_keep_one_connection(
        tmp_path: Path, kind: str, family: str) -> None:
    """Two pieced-peers, each on a daemon of its own, each named to the other (as a
    tracker names them); a libtorrent seeder feeds A only, at 4 MiB/s, and B's pieces
    come from A as A gets them. Both connections stayed: B asked each block of A on both
    and took about a fifth of the torrent twice (4-5 MB of 25 MB). One is closed, the
    same one at both ends: nothing came twice. ``both``: A dials B over IPv6, B dials A
    over IPv4 (a connection from another address is one peer's only when it says it
    listens at the port dialled)."""
    piece = 65536
    files = {"a.bin": 6 * 1024 * 1024 + 4321, "b.bin": 3 * piece, "one": piece}
    content, raw, torrent = _made(tmp_path, files, piece, kind, seed=41)
    pa, pb = _free_port(), _free_port()
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    da, db = Daemon(tmp_path / "A"), Daemon(tmp_path / "B")
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True,
                    settings={"upload_rate_limit": 4 << 20, "limit_loopback": True}) as seeder:
            a = subprocess.Popen(
                peer_cmd(torrent, tmp_path / "A" / "dl", da.socket, "--seed", "--listen",
                         f"127.0.0.1:{pa}", "--peer", f"127.0.0.1:{seeder.port}",
                         "--peer", f"[::1]:{pb}" if family == "both" else f"127.0.0.1:{pb}"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _running.append(a)
            summary = download(torrent, tmp_path / "B" / "dl", db, pa, extra=(
                "--listen", f":{pb}" if family == "both" else f"127.0.0.1:{pb}"))
            a.send_signal(signal.SIGTERM)
            _, err = a.communicate(timeout=30)
            assert a.returncode == 0, err
        # (``peers`` counts handshakes: 2 when the second connection is the one kept)
        assert summary["bytes_redundant"] == 0, summary
        _same_tree(content, tmp_path / "B" / "dl" / "payload", files)
    finally:
        assert da.stop() == 0, da.stderr()
        assert db.stop() == 0, db.stderr()


def test_a_seeder_at_an_ipv4_and_an_ipv6_address_is_connected_to_once(tmp_path: Path) -> None:
    """A libtorrent seeder listening on 127.0.0.1 and ::1 (a tracker lists it in
    ``peers`` and ``peers6``): of the two connections, libtorrent closes the older as
    soon as the newer comes, before its handshake says who it is, and the address of
    the one closed was dialled again a second later, closing the other: a new connection
    every second or two for the whole download. Now an address whose peer is connected
    at another is not dialled until that connection ends."""
    piece = 65536
    files = {"a.bin": 8 * 1024 * 1024 + 17}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=43)
    port = _free_port()
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, log_peer=True, settings={
                "listen_interfaces": f"127.0.0.1:{port},[::1]:{port}",
                "upload_rate_limit": 2 << 20, "limit_loopback": True}) as seeder:
            r = subprocess.run(
                peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer", f"127.0.0.1:{port}",
                         "--peer", f"[::1]:{port}"),
                capture_output=True, text=True, timeout=120,
                env={**os.environ, "PIECED_PEER_LOG": "info"})
            assert r.returncode == 0, r.stderr
            closed = [line for line in seeder.peer_log() if "duplicate peer-id" in line]
        connected = [line for line in r.stderr.splitlines() if line.endswith(": connected")]
        assert len(connected) <= 2 and len(closed) <= 1, (connected, closed)
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_three_pieced_peers_download_one_torrent_into_one_daemon_at_once(
        tmp_path: Path, kind: str) -> None:
    """Three pieced-peer processes (three daemon connections) download the same torrent
    into the same daemon from the same seeders at once, as a user running it twice over
    would: pieces the others verified are announced to each, blocks written twice are
    counted duplicates, every process ends complete, and the bytes on disk are the
    seeders' (libtorrent rechecks them). The seeders are slow (1 MiB/s each) and the
    second and third processes start once the first is under way, so that all three
    download side by side however long a process takes to start. (The pieces the first
    has under way are the others' first: they fetch what the daemon does not hold of
    them, as after a restart, racing the first for the same blocks; 10 MiB at the
    seeders' 2 MiB/s leaves them time to start on pieces of their own.)"""
    import time

    piece = 65536
    files = {"a.bin": 140 * piece + 333, "b.bin": 17 * piece + 1, "one": 1}
    content, raw, torrent = _made(tmp_path, files, piece, kind, seed=15)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW) as s1, \
                LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW) as s2:
            peers = ("--peer", f"127.0.0.1:{s1.port}", "--peer", f"127.0.0.1:{s2.port}")

            def start() -> subprocess.Popen[str]:
                proc = subprocess.Popen(peer_cmd(torrent, tmp_path / "dl", d.socket, *peers),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                _running.append(proc)
                return proc

            procs = [start()]
            deadline = time.monotonic() + 30
            while _verified(d.socket) == 0:
                assert time.monotonic() < deadline and procs[0].poll() is None
                time.sleep(0.02)
            procs += [start(), start()]
            outs = [p.communicate(timeout=120) for p in procs]
            sent = sum(s.status()["total_payload_upload"] for s in (s1, s2))
        downloaded = []
        came = 0
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
            summary = json.loads(out)
            assert summary["complete"] and summary["pieces_failed"] == 0, summary
            downloaded.append(summary["bytes_down"])
            came += summary["bytes_down"] + summary["bytes_redundant"]
        assert sum(1 for n in downloaded if n) >= 2, downloaded  # they did run side by side
        # Every block the seeders sent is counted by the process it reached: as new, or
        # as redundant (a piece another process had verified meanwhile, a block twice).
        # (Blocks still on their way when a process finished are not: 2 MiB of slack.)
        assert sent - (2 << 20) <= came <= sent, (sent, came, downloaded)
        with Client(d.socket) as c:
            listed = c.torrents()
            assert len(listed) == 1
            assert listed[0]["verified_pieces"] == listed[0]["num_pieces"]
            ih = bytes.fromhex(listed[0]["info_hash"])
            assert c.recheck(ih, full=True)["failed_v1" if kind == "v1" else "failed_v2"] == []
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, tmp_path / "dl"))


@contextlib.contextmanager
def _downloading_slowly(raw: bytes, torrent: Path, tmp_path: Path, d: Daemon,
                        pieces: int, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """pieced-peer downloading into ``tmp_path/dl`` from a libtorrent seeder at 1 MiB/s,
    handed over once the daemon has verified ``pieces`` pieces; the seeder stays up
    until the block ends."""
    import time

    with LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW) as seeder:
        proc = downloading(torrent, tmp_path / "dl", d, seeder.port, extra=extra)
        deadline = time.monotonic() + 30
        while _verified(d.socket) < pieces:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        yield proc


@pytest.mark.parametrize("kind", ["v1-pads", "hybrid"])
def test_pieced_peer_killed_mid_download_resumes(tmp_path: Path, kind: str) -> None:
    """pieced-peer killed with SIGKILL mid-download (its ring writes cut off, pieces half
    written in the daemon): run again, it keeps what was verified and completes, and
    the bytes on disk are the seeder's."""
    piece = 65536
    files = {"a.bin": 50 * piece + 999, "b.bin": 30 * piece + 3}
    content, raw, torrent = _made(tmp_path, files, piece, kind, seed=16)
    d = Daemon(tmp_path)
    try:
        with _downloading_slowly(raw, torrent, tmp_path, d, 3) as proc:
            proc.kill()
            proc.wait()
        before = _verified(d.socket)
        assert before >= 3
        with LtPeer(raw, tmp_path / "seed", seed=True) as s2:
            summary = download(torrent, tmp_path / "dl", d, s2.port)
        assert summary["bytes_down"] < sum(files.values())  # what was verified stayed
        with Client(d.socket) as c:
            listed = c.torrents()
            ih = bytes.fromhex(listed[0]["info_hash"])
            assert listed[0]["verified_pieces"] == listed[0]["num_pieces"]
            res = c.recheck(ih, full=True)
            assert not res.get("failed_v1") and not res.get("failed_v2"), res
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, tmp_path / "dl"))


def test_daemon_killed_under_pieced_peer_keeps_what_it_reported(tmp_path: Path) -> None:
    """The daemon is killed with SIGKILL mid-download, pieced-peer told to stop when it
    loses it: it says so and exits 2; the restarted daemon reports verified every piece
    it reported verified before the kill, and pieced-peer run again completes the
    download."""
    piece = 65536
    files = {"a.bin": 70 * piece + 5, "b.bin": 9 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "hybrid", seed=17)
    d = Daemon(tmp_path)
    try:
        with _downloading_slowly(raw, torrent, tmp_path, d, 5, "--daemon-wait", "0") as proc:
            with Client(d.socket) as c:
                ih = bytes.fromhex(c.torrents()[0]["info_hash"])
                reported = bytes(c.status(ih)["have"])
            d.proc.kill()
            d.proc.wait()
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 2 and "lost the daemon" in err, err
        d = Daemon(tmp_path)
        with Client(d.socket) as c:
            have = bytes(c.status(ih)["have"])
        assert all(h & r == r for h, r in zip(have, reported, strict=True)), (have, reported)
        with LtPeer(raw, tmp_path / "seed", seed=True) as s2:
            download(torrent, tmp_path / "dl", d, s2.port)
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, tmp_path / "dl"))


@pytest.mark.parametrize("how", ["kill", "restart"])
def test_pieced_peer_carries_on_when_the_daemon_comes_back(tmp_path: Path, how: str) -> None:
    """The daemon killed with SIGKILL (or stopped, as ``systemctl restart`` does) in the
    middle of a download, and started again: the same pieced-peer takes up the torrent
    with the new daemon, keeps its seeder, and completes; every piece reported verified
    before stays so, and the bytes on disk are the seeder's."""
    import time

    piece = 65536
    files = {"a.bin": 70 * piece + 5, "b.bin": 9 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "hybrid", seed=23)
    d = Daemon(tmp_path)
    try:
        with _downloading_slowly(raw, torrent, tmp_path, d, 5) as proc:
            with Client(d.socket) as c:
                ih = bytes.fromhex(c.torrents()[0]["info_hash"])
                reported = bytes(c.status(ih)["have"])
            if how == "kill":
                d.proc.kill()
                d.proc.wait()
            else:
                assert d.stop() == 0, d.stderr()
            time.sleep(1.0)  # (down a while: dials to it fail, the peer keeps waiting)
            assert proc.poll() is None, proc.communicate()
            d = Daemon(tmp_path)
            with Client(d.socket) as c:
                have = bytes(c.status(ih)["have"])
            assert all(h & r == r for h, r in zip(have, reported, strict=True))
            out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and summary["daemon_reconnects"] == 1, summary
        assert "lost the daemon" in err and "the daemon is back" in err, err
        assert "Traceback" not in err, err[:3000]
        _same_tree(content, tmp_path / "dl" / "payload", files)
        with Client(d.socket) as c:
            assert c.status(ih)["verified_pieces"] == 80
    finally:
        assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, tmp_path / "dl"))


def test_what_pieced_peer_asked_for_is_cancelled_when_the_daemon_goes(tmp_path: Path) -> None:
    """The daemon killed in the middle of a download from a libtorrent seeder that
    sends slowly: pieced-peer, which could store nothing of what still comes, cancels
    the requests it has out, and the seeder hears each cancel, instead of sending
    blocks that would be dropped."""
    piece = 65536
    files = {"a.bin": 60 * piece}
    _, raw, torrent = _made(tmp_path, files, piece, "v1", seed=29)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=SLOW,
                    log_peer=True) as seeder:
            proc = downloading(torrent, tmp_path / "dl", d, seeder.port)
            deadline = time.monotonic() + 30
            while _verified(d.socket) < 3:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            assert not [line for line in seeder.peer_log() if "<== CANCEL" in line]
            d.proc.kill()
            d.proc.wait()
            cancels = seeder.wait_log("<== CANCEL", timeout=10)
            assert cancels, seeder.peer_log()[-40:]
            assert proc.poll() is None  # (waiting for the daemon, its peer kept)
            proc.kill()
            proc.communicate()
    finally:
        d.stop()


@contextlib.contextmanager
def _leeching_midway(raw: bytes, torrent: Path, tmp_path: Path, d: Daemon, rate: int,
                     *extra: str) -> Iterator[tuple[Seeding, LtPeer]]:
    """The torrent downloaded into ``tmp_path/dl`` through the daemon, then seeded by
    pieced-peer (with ``extra``) to a libtorrent leecher that takes ``rate`` bytes a
    second: handed over once the leecher has ``rate`` bytes (reads in flight)."""
    with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
        download(torrent, tmp_path / "dl", d, seeder.port)
    seeding = Seeding(torrent, tmp_path / "dl", d, *extra)
    limited = {"download_rate_limit": rate, "limit_loopback": True}
    with LtPeer(raw, tmp_path / "leech", seed=False, settings=limited) as leecher:
        leecher.connect("127.0.0.1", seeding.port)
        deadline = time.monotonic() + 60
        while leecher.status()["total_payload_download"] < rate:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield seeding, leecher


def test_pieced_peer_seeding_carries_on_when_the_daemon_comes_back(tmp_path: Path) -> None:
    """The daemon killed while pieced-peer --seed serves a libtorrent leecher (reads in
    flight), and started again: the leecher's requests are rejected meanwhile (with the
    fast extension, each gets an answer: none waits for its timeout), and it finishes
    from the same pieced-peer without a hash failure."""
    import time

    piece = 65536
    files = {"a.bin": 200 * piece + 17}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=24)
    d = Daemon(tmp_path)
    try:
        with _leeching_midway(raw, torrent, tmp_path, d, 2 << 20) as (seeding, leecher):
            d.proc.kill()
            d.proc.wait()
            time.sleep(1.0)
            assert seeding.proc.poll() is None, seeding.proc.communicate()
            d = Daemon(tmp_path)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
        summary = seeding.stop()
        assert summary["daemon_reconnects"] == 1 and summary["complete"], summary
        _same_tree(content, tmp_path / "leech" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("back", [False, True])
def test_a_signal_while_the_daemon_is_away_stops_a_seed_as_any_stop(
        tmp_path: Path, back: bool) -> None:
    """SIGTERM to pieced-peer --seed while it waits for its daemon (stopped; or started
    again, and not yet joined): it ended with exit 2 and "lost the daemon", an error,
    though the daemon was waited for and the stop was asked for. It stops as a signal
    stops a seed: exit 0, with its summary."""
    import time

    files = {"a.bin": 300_000, "b.bin": 1000}
    _content, _raw, torrent = _made(tmp_path, files, 32768, "v1", seed=26)
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d)
        assert d.stop() == 0, d.stderr()
        time.sleep(1.0)  # (the loss seen: waiting for it to come back)
        assert seeding.proc.poll() is None
        if back:
            d = Daemon(tmp_path)
        seeding.proc.send_signal(signal.SIGTERM)
        out, err = seeding.proc.communicate(timeout=30)
        assert seeding.proc.returncode == 0, err
        assert "lost the daemon:" not in err, err
        assert json.loads(out)["bytes_up"] == 0
    finally:
        if d.proc.poll() is None:
            assert d.stop() == 0, d.stderr()


def test_a_hybrid_is_announced_under_both_its_keys(tmp_path: Path) -> None:
    """pieced-peer seeding a hybrid torrent announced it under its v1 hash alone: a
    libtorrent leecher that knows it by its v2 hash alone (a v2 magnet link) announces
    that one, and the tracker never brought them together (no peer, no metadata after
    25 s). It is announced under both, as libtorrent does, and the leecher gets it all
    from us, metadata first."""
    import re
    import time
    from urllib.parse import unquote_to_bytes

    import bencodepy

    piece = 65536
    files = {"a.bin": 20 * piece + 5, "b.bin": 777}
    content, raw, _ = _made(tmp_path, files, piece, "hybrid", seed=27)
    meta = parse(raw)
    assert meta.info_hash_v1 is not None and meta.info_hash_v2 is not None
    swarm: dict[bytes, set[int]] = {}

    def reply(query: dict[str, str]) -> bytes:
        found = re.search("(?:^|&)info_hash=([^&]*)", query["raw"])
        assert found is not None
        key, port = unquote_to_bytes(found.group(1)), int(query["port"])
        others = sorted(swarm.setdefault(key, set()) - {port})
        swarm[key].add(port)
        return bencodepy.encode({b"interval": 60, b"peers": _compact(*others)})

    d = Daemon(tmp_path)
    try:
        with _tracker(reply) as (port, _seen):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            seeding = Seeding(torrent, tmp_path / "seed", d)
            deadline = time.monotonic() + 20
            while len(swarm) < 2:
                assert time.monotonic() < deadline, swarm
                time.sleep(0.05)
            assert set(swarm) == {meta.info_hash_v1, meta.info_hash_v2[:20]}
            with LtPeer(raw, tmp_path / "leech", seed=False, magnet="v2") as leecher:
                leecher.handle.add_tracker({"url": f"http://127.0.0.1:{port}/announce"})
                leecher.handle.force_reannounce()
                leecher.wait_finished(60)
                assert leecher.hash_failures() == 0
            summary = seeding.stop()
        assert summary["bytes_up"] >= sum(files.values())
        _same_tree(content, tmp_path / "leech" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_download_waiting_for_pieces_no_peer_has_says_so(tmp_path: Path) -> None:
    """The only peer has the first file and not the second: once the first is in,
    pieced-peer says that it waits, and for how many pieces no connected peer has,
    instead of waiting without a word."""
    import time

    from pieced.peer.plugin import WAITING_SECONDS

    piece = 32768
    files = {"a.bin": 4 * piece, "b.bin": 3 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=25)
    (content / "b.bin").unlink()  # (the peer checks what it has: the first 4 pieces)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=False) as partial:
            proc = downloading(torrent, tmp_path / "dl", d, partial.port)
            deadline = time.monotonic() + 30
            while _verified(d.socket) < 4:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            time.sleep(WAITING_SECONDS + 3)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err  # (stopped before it was complete)
        assert "no peer connected (1) has 3 of the 3 pieces left; waiting for one that " \
               "has them" in err, err
        assert err.count("waiting for one") == 1, err  # (said once, not every second)
        assert json.loads(out)["complete"] is False
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_full_disk_stops_the_download_with_its_error(tmp_path: Path, tiny_fs: Path) -> None:
    """pieced-peer downloading onto a disk that fills up stops with the daemon's error
    (exit 2, the errno named) instead of waiting for ever for pieces that cannot be
    stored; another download through the same daemon is unaffected, and once there is
    room a second run keeps what was verified and completes. (Pieces of one block: each
    block that fits verifies a piece, in whatever order the seeder sends them.)"""
    piece = 16384
    files = {"a.bin": 20 * piece + 77}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=18)
    other_files = {"b.bin": 9 * 16384 + 5}
    other_content = make_payload(tmp_path / "other", other_files, seed=19)
    other_raw = make_torrent_lt(other_content, 16384, "v1")
    other_torrent = tmp_path / "other.torrent"
    other_torrent.write_bytes(other_raw)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            r = subprocess.run(peer_cmd(torrent, tiny_fs, d.socket, "--peer",
                                        f"127.0.0.1:{seeder.port}"),
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 2, (r.returncode, r.stderr)
            assert "No space left on device" in r.stderr and "errno 28" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr, r.stderr
            before = _verified(d.socket)
            assert 0 < before < parse(raw).num_pieces
            with LtPeer(other_raw, tmp_path / "other", seed=True) as s2:
                download(other_torrent, tmp_path / "dl2", d, s2.port)
            _same_tree(other_content, tmp_path / "dl2" / "payload", other_files)
            subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_fs)], check=True)
            summary = download(torrent, tiny_fs, d, seeder.port)
        assert summary["bytes_down"] < sum(files.values())  # what was verified stayed
        _same_tree(content, tiny_fs / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def _said_until_listening(proc: subprocess.Popen[str]) -> str:
    """What pieced-peer says on stderr up to the line that it listens (once its torrent
    is checked)."""
    assert proc.stderr is not None
    said = ""
    while "listening on" not in said:
        line = proc.stderr.readline()
        assert line, said
        said += line
    return said


def _seeding_registered(torrent: Path, save: Path, d: Daemon,
                        *extra: str) -> subprocess.Popen[str]:
    """``pieced-peer --seed`` started, returned as soon as its torrent is registered (the
    daemon checking what is on disk)."""
    proc = subprocess.Popen(
        peer_cmd(torrent, save, d.socket, "--listen", "127.0.0.1:0", "--seed", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _running.append(proc)
    with Client(d.socket) as c:
        deadline = time.monotonic() + 30
        while not c.torrents():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
    return proc


def test_a_signal_during_the_first_check_stops_pieced_peer_at_once(tmp_path: Path) -> None:
    """SIGTERM while the daemon checks what is on disk of a newly registered torrent (for
    a large one, hours): pieced-peer stops at once, cleanly, and leaves the check to the
    daemon, instead of heeding the signal only once the check is over."""
    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", 4 << 20, 2048)  # 8 GiB
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    try:
        proc = _seeding_registered(torrent, tmp_path / "dl", d)
        with Client(d.socket) as c:
            time.sleep(0.2)  # the check under way
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
            st = c.status(bytes.fromhex(c.torrents()[0]["info_hash"]))
        assert proc.returncode == 0, err
        assert "listening on" not in err and "Traceback" not in err, err
        assert st["verified_pieces"] < st["num_pieces"]  # not waited for: still checking
        assert json.loads(out)["complete"] is False
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_daemon_restarted_during_the_first_check_is_waited_for(tmp_path: Path) -> None:
    """The daemon stopped (SIGTERM, as ``systemctl restart`` does), then started again,
    while it checks what is on disk of a newly registered torrent: its answer to the
    check, cut short by its stop, ended pieced-peer (exit 2), where a kill -9 was waited
    for. The stop is a loss of the daemon like any: waited for, and the check the
    restarted daemon carries out again is waited for too (the wait counted from each
    loss, not from the first)."""
    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", 4 << 20, 512)  # 2 GiB
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    try:
        proc = _seeding_registered(torrent, tmp_path / "dl", d, "--daemon-wait", "20")
        time.sleep(0.2)  # the check under way
        assert d.stop() == 0, d.stderr()
        time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        d = Daemon(tmp_path)
        said = _said_until_listening(proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, said + err
        summary = json.loads(out)
        assert summary["complete"] and summary["daemon_reconnects"] == 1, summary
    finally:
        assert d.stop() == 0, d.stderr()


def _connections_to(path: Path) -> int:
    """Sockets bound to or connected at ``path`` (the listener, and one for each
    connection taken by the kernel, accepted by the daemon or not)."""
    with open("/proc/net/unix") as f:
        return sum(1 for line in f if line.rstrip().endswith(str(path)))


def test_a_daemon_killed_as_it_takes_pieced_peer_in_is_waited_for(tmp_path: Path) -> None:
    """pieced-peer connects while the daemon does not answer (stopped, SIGSTOP): the
    kernel takes the connection, its HELLO waits; the daemon is killed (kill -9) and
    started again. pieced-peer stopped at once, exit 2 ("Connection reset by peer"), where
    the same loss a moment later was waited for (``--daemon-wait``). It waits, and
    completes. A daemon that was never reached (not running) is still said at once."""
    files = {"a.bin": 4 * 65536 + 5}
    content, raw, torrent = _made(tmp_path, files, 65536, "v1", seed=16)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, content.parent, seed=True) as s:
            d.proc.send_signal(signal.SIGSTOP)
            proc = downloading(torrent, tmp_path / "dl", d, s.port,
                               extra=("--daemon-wait", "30"))
            deadline = time.monotonic() + 30
            while _connections_to(d.socket) < 2:  # (pieced-peer's, taken by the kernel)
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            d.proc.kill()
            d.proc.wait()
            d = Daemon(tmp_path)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and summary["daemon_reconnects"] == 1, summary
        assert "waiting up to 30 s" in err, err
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert d.stop() == 0, d.stderr()
        r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket), capture_output=True,
                           text=True, timeout=30)  # (the daemon not running)
        assert r.returncode == 2 and "waiting" not in r.stderr, r.stderr
    finally:
        if d.proc.poll() is None:
            assert d.stop() == 0, d.stderr()


def _once_verified(d: Daemon, proc: subprocess.Popen[str], pieces: int) -> bytes:
    """The info-hash of the one torrent of ``d``, once ``pieces`` of it are verified
    (``proc`` downloading it)."""
    with Client(d.socket) as c:
        deadline = time.monotonic() + 60
        while not c.torrents() or c.status(bytes.fromhex(
                c.torrents()[0]["info_hash"]))["verified_pieces"] < pieces:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        return bytes.fromhex(c.torrents()[0]["info_hash"])


def test_a_signal_stops_a_download_while_the_daemon_does_not_answer(tmp_path: Path) -> None:
    """SIGTERM to a downloading pieced-peer whose daemon does not answer (stopped, as one
    stuck in fdatasync on a hung disk would be): it waited for the daemon to take the
    blocks in flight for as long as the daemon stayed silent. It now waits a few seconds
    and exits with its summary; what the daemon verified is kept."""
    piece = 262144
    files = {"a.bin": 100 * piece + 5}
    _content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=23)
    d = Daemon(tmp_path)
    slow = {"upload_rate_limit": 2 << 20, "limit_loopback": True}
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=slow) as seeder:
            proc = downloading(torrent, tmp_path / "dl", d, seeder.port)
            ih = _once_verified(d, proc, 3)
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(0.5)  # blocks sent meanwhile wait in the daemon's socket
                proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                out, err = proc.communicate(timeout=40)
                took = time.monotonic() - started
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
        assert took < 20, took  # (before: until the daemon answered again)
        assert proc.returncode == 1 and not json.loads(out)["complete"], err
        with Client(d.socket) as c:
            assert c.status(ih)["verified_pieces"] >= 3
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_daemon_that_stalls_a_while_costs_the_seeder_nothing(tmp_path: Path) -> None:
    """The daemon stops taking blocks for 25 s (stopped, as one held by a slow disk would
    be): pieced-peer reads nothing of the seeder meanwhile, and what the seeder sends
    waits in its socket. That time was counted against the seeder: its requests timed
    out, it was snubbed and its blocks asked again (a fifth of a download fetched twice,
    for stalls of half a minute; after two minutes, dropped as silent). Now no request
    times out for it, nothing comes twice, and the download goes on once the daemon
    does."""
    piece = 1 << 20
    files = {"a.bin": 24 * piece + 5}
    content, raw, torrent = _made(tmp_path, files, piece, "hybrid", seed=31)
    d = Daemon(tmp_path)
    slow = {"upload_rate_limit": 3 << 20, "limit_loopback": True}
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True, settings=slow) as seeder:
            proc = downloading(torrent, tmp_path / "dl", d, seeder.port,
                               env={"PIECED_PEER_LOG": "info"})
            _once_verified(d, proc, 2)
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(25)
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            out, err = proc.communicate(timeout=120)
            assert seeder.hash_failures() == 0
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"], summary
        assert "time out" not in err and "silent" not in err, err
        assert summary["bytes_redundant"] == 0, summary
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_daemon_that_stalls_while_seeding_blames_no_leecher(tmp_path: Path) -> None:
    """Five leechers (one more than the unchoke slots) download slowly from pieced-peer
    --seed; the daemon stops answering for 40 s. A leecher whose requests wait on the
    daemon's reads was said to ask for nothing and lost its slot, last in line from then
    on; the second's timers all waited on the daemon (a connection that never says its
    handshake was dropped only once the daemon was back); and nothing said why all
    stood still. Now no leecher is blamed, the timers go on (that connection is dropped
    while the daemon is stopped), the daemon's silence is said, and every leecher
    finishes with every byte."""
    import socket

    piece = 65536
    files = {"a.bin": 96 * piece + 3}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=37)
    d = Daemon(tmp_path)
    limited = {"download_rate_limit": 384 * 1024}
    leechers = [LtPeer(raw, tmp_path / f"leech{i}", seed=False, settings=limited)
                for i in range(5)]
    seeding = Seeding(torrent, tmp_path / "seed", d, "--upload-slots", "4",
                      env={"PIECED_PEER_LOG": "info"})
    try:
        for leecher in leechers:
            leecher.connect("127.0.0.1", seeding.port)
        deadline = time.monotonic() + 60
        while min(lt.status()["progress"] for lt in leechers) < 0.1:
            assert time.monotonic() < deadline and seeding.proc.poll() is None
            time.sleep(0.1)
        os.kill(d.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            time.sleep(12)  # (a choke round has come meanwhile, and asked the daemon)
            mute = socket.create_connection(("127.0.0.1", seeding.port))
            mute.settimeout(30)
            started = time.monotonic()
            assert mute.recv(1) == b""  # (closed: no handshake in 10 s)
            assert time.monotonic() - started < 18  # (before: once the daemon was back)
            mute.close()
            time.sleep(max(0.0, 40 - (time.monotonic() - stopped)))
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        for leecher in leechers:
            leecher.wait_finished(120)
            assert leecher.hash_failures() == 0
        seeding.proc.send_signal(signal.SIGTERM)
        out, err = seeding.proc.communicate(timeout=30)
        assert seeding.proc.returncode == 0, err
        summary = json.loads(out)
        assert "asks for nothing" not in err, err
        assert "the daemon has answered nothing for" in err, err
        assert summary["bytes_up"] >= 5 * sum(files.values())
        for i in range(5):
            _same_tree(content, tmp_path / f"leech{i}" / "payload", files)
    finally:
        for leecher in leechers:
            leecher.close()
        if seeding.proc.poll() is None:
            seeding.proc.kill()
        assert d.stop() == 0, d.stderr()


def test_an_address_found_to_be_ourselves_is_not_dialled_again(tmp_path: Path) -> None:
    """A tracker (or ``--peer``) may name us under an address other than the one we
    listen on: the handshake told so (our own peer id), but the address was dialled
    again and again, for as long as we seeded, with a warning that it hung up."""
    import socket

    piece = 65536
    _content, _raw, torrent = _made(tmp_path, {"a.bin": 3 * piece}, piece, "v1", seed=29)
    d = Daemon(tmp_path)
    relay = socket.create_server(("127.0.0.1", 0))
    relay.settimeout(0.2)
    dials: list[socket.socket] = []
    stop = threading.Event()

    def pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def serve(port: int) -> None:  # another address of ours: every connection to us
        while not stop.is_set():
            try:
                a, _ = relay.accept()
            except TimeoutError:
                continue
            except OSError:  # (closed: the test is over)
                return
            dials.append(a)
            b = socket.create_connection(("127.0.0.1", port))
            dials.append(b)
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=pipe, args=(x, y), daemon=True).start()

    try:
        seeding = Seeding(torrent, tmp_path / "seed", d, "--peer",
                          f"127.0.0.1:{relay.getsockname()[1]}")
        server = threading.Thread(target=serve, args=(seeding.port,), daemon=True)
        server.start()
        time.sleep(8)  # dialled again after 1, 2 and 4 s if it is not known for us
        seeding.proc.send_signal(signal.SIGTERM)
        _, err = seeding.proc.communicate(timeout=30)
        assert seeding.proc.returncode == 0, err
        assert len(dials) // 2 == 1, len(dials) // 2
        assert "before its handshake" not in err, err
    finally:
        stop.set()
        relay.close()
        for sock in dials:
            sock.close()
        assert d.stop() == 0, d.stderr()


def test_the_daemon_lost_while_seeding_is_said_in_one_line(tmp_path: Path) -> None:
    """The daemon killed while pieced-peer --seed has reads in flight for a leecher: it
    exits 2 saying it lost the daemon, once, instead of printing a traceback for every
    read that was waiting (each longer than the one before: 34,000 lines in one case)."""
    piece = 65536
    files = {"a.bin": 640 * piece}
    _content, raw, torrent = _made(tmp_path, files, piece, "hybrid", seed=21)
    d = Daemon(tmp_path)
    try:
        with _leeching_midway(raw, torrent, tmp_path, d, 4 << 20,
                              "--daemon-wait", "0") as (seeding, _):
            d.proc.kill()
            d.proc.wait()
            _, err = seeding.proc.communicate(timeout=60)
        assert seeding.proc.returncode == 2, err
        assert "lost the daemon" in err, err
        assert "Traceback" not in err and "exception" not in err.lower(), err[:3000]
    finally:
        d = Daemon(tmp_path)
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("wait", ["0", "60"])
def test_the_daemon_killed_during_the_first_check_finishes_it_after_a_restart(
    tmp_path: Path, wait: str,
) -> None:
    """pieced-peer --seed over a complete copy: the daemon is killed while it checks the
    files for the newly registered torrent. Restarted, it finishes the check by itself,
    and pieced-peer (the same one, waiting for it; or, told to stop when it loses it,
    run again and told the torrent is registered already) seeds the whole torrent to a
    libtorrent leecher, instead of finding nothing verified."""
    piece = 65536
    files = {"a.bin": 900 * piece + 7, "b.bin": 300 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=22)
    dl = tmp_path / "dl" / "payload"
    dl.parent.mkdir()
    import shutil

    shutil.copytree(content, dl)
    d = Daemon(tmp_path)
    try:
        proc = _seeding_registered(torrent, tmp_path / "dl", d, "--daemon-wait", wait)
        d.proc.kill()  # at once: the check has hardly begun
        d.proc.wait()
        if wait == "0":
            out, err = proc.communicate(timeout=60)
            # said as a loss under way is: the daemon lost, and the summary (nothing
            # printed on stdout, and the bare error, when the loss came before the
            # check's answer)
            assert proc.returncode == 2 and "lost the daemon" in err, (out, err)
            assert json.loads(out)["complete"] is False, out
            d = Daemon(tmp_path)
            seeding = Seeding(torrent, tmp_path / "dl", d)
        else:
            time.sleep(0.5)
            assert proc.poll() is None, proc.communicate()
            d = Daemon(tmp_path)
            said = _said_until_listening(proc)
            assert "lost the daemon" in said and "the daemon is back" in said, said
            seeding = Seeding.__new__(Seeding)
            seeding.proc, seeding.port = proc, int(said.rsplit(":", 1)[1])
        with LtPeer(raw, tmp_path / "leech", seed=False) as leecher:
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
        up = seeding.stop()
        assert up["complete"] and up["bytes_up"] >= sum(files.values())
        assert up["daemon_reconnects"] == (wait != "0"), up
        _same_tree(content, tmp_path / "leech" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_pieced_peer_follows_what_other_clients_do_to_its_torrent(tmp_path: Path) -> None:
    """Other clients of the daemon act on the torrent pieced-peer seeds. A recheck that
    fails a piece (a byte flipped on disk): pieced-peer stops serving that piece, so a
    leecher gets no bad data (it used to serve it, and the leecher failed its hash). The
    torrent removed: pieced-peer stops, exit 2, saying so (it went on refusing every
    request, and exited 0 as complete)."""
    piece = 65536
    files = {"a.bin": 40 * piece}
    _content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=23)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            download(torrent, tmp_path / "dl", d, seeder.port)
        seeding = Seeding(torrent, tmp_path / "dl", d, env={"PIECED_PEER_LOG": "info"})
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.extend(seeding.proc.stderr or []),
                                  daemon=True)
        reader.start()
        with open(tmp_path / "dl" / "payload" / "a.bin", "r+b") as f:
            f.seek(5 * piece + 100)
            f.write(b"\xff")
        with Client(d.socket) as c:
            ih = bytes.fromhex(c.torrents()[0]["info_hash"])
            assert c.recheck(ih, full=True)["failed_v1"] == [5]
            deadline = time.monotonic() + 30
            while not any("piece 5 is not verified" in line for line in list(said)):
                assert time.monotonic() < deadline, said
                time.sleep(0.05)
            with LtPeer(raw, tmp_path / "leech", seed=False) as leecher:
                leecher.connect("127.0.0.1", seeding.port)
                deadline = time.monotonic() + 60
                while leecher.status()["num_pieces"] < 39:
                    assert time.monotonic() < deadline, leecher.status()
                    time.sleep(0.1)
                time.sleep(1)
                st = leecher.status()
                assert st["hash_failures"] == 0 and st["num_pieces"] == 39, st
            c.unregister(ih)
        seeding.proc.wait(timeout=60)
        reader.join(10)
        err = "".join(said)
        assert seeding.proc.returncode == 2, err
        assert "no longer registered" in err, err
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("kind", ["v1", "hybrid", "v2"])
def test_pieces_another_clients_recheck_fails_are_not_offered_to_a_leecher_right_after(
    tmp_path: Path, kind: str,
) -> None:
    """pieced-peer --seed; three pieces damaged on disk and failed by another client's
    recheck; a libtorrent leecher connects as soon as the recheck has answered, with a
    good libtorrent seeder beside: pieced-peer's bitfield leaves those pieces out, and the
    leecher finishes without a hash failure. pieced-peer used to learn of a recheck only
    at its next look at the daemon (every 5 s): meanwhile it said it had every piece,
    and served the damaged ones."""
    piece = 65536
    files = {"a.bin": 40 * piece + 777, "one": 1}
    content, raw, torrent = _made(tmp_path, files, piece, kind, seed=26)
    shutil.copytree(tmp_path / "seed", tmp_path / "dl")
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "dl", d)
        with Client(d.socket) as c:
            ih = bytes.fromhex(c.torrents()[0]["info_hash"])
            assert c.status(ih, files=False)["verified_pieces"] == c.status(ih)["num_pieces"]
            with open(tmp_path / "dl" / "payload" / "a.bin", "r+b") as f:
                for k in (5, 6, 7):
                    f.seek(k * piece + 100)
                    f.write(b"\xff" * 8)
            res = c.recheck(ih, full=True)
            assert sorted({*(res.get("failed_v1") or []), *(res.get("failed_v2") or [])}) == [
                5, 6, 7], res
        with LtPeer(raw, tmp_path / "leech", seed=False, log_peer=True) as leecher, \
                LtPeer(raw, tmp_path / "seed", seed=True) as good:
            leecher.connect("127.0.0.1", seeding.port)
            deadline = time.monotonic() + 30
            while not (said := [line for line in leecher.peer_log()
                                if "<== BITFIELD" in line or "<== HAVE_ALL" in line]):
                assert time.monotonic() < deadline, "pieced-peer sent no bitfield"
                time.sleep(0.05)
            leecher.connect("127.0.0.1", good.port)
            leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
        assert not any("HAVE_ALL" in line for line in said), said
        _same_tree(content, tmp_path / "leech" / "payload", files)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_pieces_a_seeding_pieced_peer_loses_are_taken_back_with_lt_donthave(
    tmp_path: Path, kind: str,
) -> None:
    """pieced-peer --seed has said it has every piece to a libtorrent leecher; another
    client's recheck then fails three of them (damaged on disk): pieced-peer tells the
    leecher it no longer has them (BEP 54 ``lt_donthave``, as libtorrent does), which
    then fetches them from a good seeder without a hash failure. (The leecher does not
    want those three until then: it must not have fetched their damaged bytes first. Nor
    may it close the connection once it has every piece it wants, as libtorrent does with
    an upload-only peer it is not interested in, before the recheck is done: the test
    would then wait for a DONT_HAVE on a connection that is gone.)"""
    piece = 65536
    files = {"a.bin": 40 * piece + 777, "one": 1}
    content, raw, torrent = _made(tmp_path, files, piece, kind, seed=28)
    shutil.copytree(tmp_path / "seed", tmp_path / "dl")
    lost = (5, 6, 7)
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "dl", d)
        with LtPeer(raw, tmp_path / "leech", seed=False, log_peer=True,
                    settings={"close_redundant_connections": False}) as leecher:
            n = leecher.ti.num_pieces()
            leecher.handle.prioritize_pieces([0 if k in lost else 1 for k in range(n)])
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_log("<== HAVE_ALL", timeout=30)
            with Client(d.socket) as c:
                ih = bytes.fromhex(c.torrents()[0]["info_hash"])
                with open(tmp_path / "dl" / "payload" / "a.bin", "r+b") as f:
                    for k in lost:
                        f.seek(k * piece + 100)
                        f.write(b"\xff" * 8)
                res = c.recheck(ih, full=True)
                assert sorted({*(res.get("failed_v1") or []), *(res.get("failed_v2") or [])}) == [
                    *lost], res
            said = leecher.wait_log("<== DONT_HAVE", timeout=30, count=len(lost))
            assert sorted(int(line.rsplit(":", 1)[1].strip(" ]")) for line in said) == [*lost], said
            (ours,) = leecher.handle.get_peer_info()
            assert [k for k in range(n) if not ours.pieces[k]] == [*lost]
            leecher.handle.prioritize_pieces([1] * n)
            with LtPeer(raw, tmp_path / "seed", seed=True) as good:
                leecher.connect("127.0.0.1", good.port)
                leecher.wait_finished(60)
            assert leecher.hash_failures() == 0
        _same_tree(content, tmp_path / "leech" / "payload", files)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_peer_that_takes_its_pieces_back_with_lt_donthave_is_no_longer_wanted(
    tmp_path: Path,
) -> None:
    """A peer (a socket driven by hand) offers lt_donthave, says it has pieces 0-4, and
    once pieced-peer is interested takes them back with lt_donthave: pieced-peer says
    NOT_INTERESTED; a HAVE of one of them makes it interested again."""
    import socket as sockets

    from pieced.peer.conn import LT_DONTHAVE

    piece = 32768
    files = {"a.bin": 12 * piece + 5}
    _content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=29)
    n = lt.torrent_info(raw).num_pieces()
    listener = sockets.create_server(("127.0.0.1", 0))
    d = Daemon(tmp_path)
    proc = None
    try:
        proc = downloading(torrent, tmp_path / "dl", d, listener.getsockname()[1])
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.settimeout(30)
        parser = wire.Parser(handshake=True)
        seen: list[wire.Event] = []

        def until(kind: type) -> None:
            while not any(type(e) is kind for e in seen):
                data = conn.recv(1 << 16)
                assert data, f"closed; it said {seen}"
                seen.extend(parser.feed(data))

        until(wire.Handshake)
        hs = next(e for e in seen if isinstance(e, wire.Handshake))
        bits = bytearray(n)
        bits[0:5] = b"\x01" * 5
        conn.sendall(wire.handshake(hs.info_hash, b"-RP0001-" + bytes(12), wire.make_reserved())
                     + wire.extended(0, bencodepy.encode({b"m": {b"lt_donthave": 3}}))
                     + wire.bitfield(wire.bits_from_pieces(bits, n)))
        until(wire.Interested)
        seen.clear()
        conn.sendall(b"".join(wire.extended(LT_DONTHAVE, k.to_bytes(4, "big")) for k in range(5)))
        until(wire.NotInterested)
        seen.clear()
        conn.sendall(wire.have(2))
        until(wire.Interested)
        conn.close()
    finally:
        listener.close()
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
        assert d.stop() == 0, d.stderr()


def _seeding_dials(tmp_path: Path, d: Daemon, listener: Any, seed: int
                   ) -> tuple[Seeding, Any, wire.Parser, wire.Handshake]:
    """``pieced-peer --seed`` of a small torrent given ``listener``'s address: its
    connection there, and the parser that read its handshake (it says no more before ours)."""
    piece = 32768
    _content, _raw, torrent = _made(tmp_path, {"a.bin": 6 * piece + 5}, piece, "v1", seed=seed)
    listener.settimeout(30)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--peer",
                      f"127.0.0.1:{listener.getsockname()[1]}")
    conn, _ = listener.accept()
    conn.settimeout(30)
    parser = wire.Parser(handshake=True)
    while True:
        hs = next((e for e in parser.feed(conn.recv(1 << 16)) if isinstance(e, wire.Handshake)),
                  None)
        if hs is not None:
            return seeding, conn, parser, hs


def _not_dialled_again(listener: Any, seeding: Seeding) -> None:
    """Nothing dials ``listener`` for 12 s (pieced-peer's dials come again after 1 s,
    then 2 s...); then the seeding ends whole."""
    listener.settimeout(12)
    with pytest.raises(TimeoutError):
        listener.accept()
    assert seeding.stop()["complete"]


def test_a_seeding_pieced_peer_leaves_a_seed_alone(tmp_path: Path) -> None:
    """Two seeds have nothing to exchange: pieced-peer --seed, given a seed's address,
    drops the connection once it knows (as libtorrent does) and does not dial it again.
    It used to keep it, or (a peer that closes seed-to-seed connections, as Transmission
    does after 30 s) dial it again every half a minute for ever."""
    import socket as sockets

    listener = sockets.create_server(("127.0.0.1", 0))
    d = Daemon(tmp_path)
    try:
        seeding, conn, _parser, hs = _seeding_dials(tmp_path, d, listener, 30)
        conn.sendall(wire.handshake(hs.info_hash, b"-RS0001-" + bytes(12), wire.make_reserved())
                     + wire.have_all())
        start = time.monotonic()
        while conn.recv(1 << 16):  # until pieced-peer closes it
            pass
        assert time.monotonic() - start < 10
        conn.close()
        _not_dialled_again(listener, seeding)
    finally:
        listener.close()
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("kind", ["v1", "hybrid"])
def test_pieces_under_way_another_client_clears_are_fetched_again(
    tmp_path: Path, kind: str,
) -> None:
    """Mid-download another client clears every piece not verified yet, among them
    pieces whose first blocks pieced-peer has written: pieced-peer learns of it
    (``piece_failed``), fetches them whole again and completes. It used to send the rest
    of their blocks and wait for a verdict that never came, for ever."""
    piece = 262144
    files = {"a.bin": 5 * 1024 * 1024 + 777, "b/c.bin": 1024 * 1024 + 3, "one": 1}
    content, raw, torrent = _made(tmp_path, files, piece, kind, seed=27)
    d = Daemon(tmp_path)
    try:
        with _downloading_slowly(raw, torrent, tmp_path, d, 2) as proc:
            with Client(d.socket) as c:
                ih = bytes.fromhex(c.torrents()[0]["info_hash"])
                deadline = time.monotonic() + 30
                while not (st := c.status(ih, files=False))["partial_pieces"]:
                    assert time.monotonic() < deadline, st
                    time.sleep(0.02)
                have = bytes(st["have"])
                for p in range(st["num_pieces"]):
                    if not have[p // 8] >> (7 - p % 8) & 1:
                        c.clear_piece(ih, p)
            out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out)["complete"]
        with Client(d.socket) as c:
            st = c.status(ih, files=False)
            assert st["verified_pieces"] == st["num_pieces"]
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_download_whose_torrent_another_client_adds_again_ends_only_when_whole(
    tmp_path: Path,
) -> None:
    """Mid-download another client removes the torrent and adds it again at once (the
    new registration knows nothing verified, and sends pieced-peer no events): pieced-peer
    either stops saying the daemon refused a block, or completes with every piece
    verified in the daemon; it used to exit 0 "complete" with pieces the daemon had not."""
    piece = 65536
    files = {"a.bin": 60 * piece + 11}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=24)
    d = Daemon(tmp_path)
    try:
        with _downloading_slowly(raw, torrent, tmp_path, d, 8) as proc:
            with Client(d.socket) as c:
                ih = bytes.fromhex(c.torrents()[0]["info_hash"])
                c.unregister(ih)
                c.register(raw, tmp_path / "dl")
            out, err = proc.communicate(timeout=180)
        with Client(d.socket) as c:
            st = c.status(ih, files=False)
        if proc.returncode == 0:
            assert json.loads(out)["complete"]
            assert st["verified_pieces"] == st["num_pieces"], (st["verified_pieces"], err)
            _same_tree(content, tmp_path / "dl" / "payload", files)
        else:
            assert proc.returncode == 2 and ("refused a block" in err
                                             or "no longer registered" in err), err
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_seeding_pieced_peer_fetches_again_a_piece_another_client_failed(
    tmp_path: Path,
) -> None:
    """pieced-peer --seed, with a libtorrent seeder given by --peer: another client's
    recheck fails a piece (a byte flipped on disk). pieced-peer dials the seeder again
    (it had let it go, having everything) and fetches the piece; its summary says
    complete."""
    piece = 65536
    files = {"a.bin": 40 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=25)
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            download(torrent, tmp_path / "dl", d, seeder.port)
            seeding = Seeding(torrent, tmp_path / "dl", d, "--peer", f"127.0.0.1:{seeder.port}")
            time.sleep(2)  # connected to the seeder, and let go: both have everything
            with open(tmp_path / "dl" / "payload" / "a.bin", "r+b") as f:
                f.seek(5 * piece + 100)
                f.write(b"\xff")
            with Client(d.socket) as c:
                ih = bytes.fromhex(c.torrents()[0]["info_hash"])
                assert c.recheck(ih, full=True)["failed_v1"] == [5]
                deadline = time.monotonic() + 60
                while (st := c.status(ih, files=False))["verified_pieces"] < 40:
                    assert time.monotonic() < deadline, st
                    time.sleep(0.2)
            time.sleep(RECONCILE_WAIT)  # pieced-peer learns it has it again
            up = seeding.stop()
        assert up["complete"], up
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("good", [True, False])
def test_two_pieced_peers_over_existing_data_check_it_once(tmp_path: Path, good: bool) -> None:
    """Two pieced-peer --seed over the same existing data, started together: the second
    finds the first's check under way and waits for it, instead of asking for a second
    check of every byte; also when that check finds nothing good."""
    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", 4 << 20, 1024)  # 4 GiB
    if not good:  # other hashes: no piece of the data verifies
        raw = raw.replace(hashlib.sha1(bytes(4 << 20)).digest(), bytes(20))
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    try:
        first = _seeding_registered(torrent, tmp_path / "dl", d)
        second = Seeding(torrent, tmp_path / "dl", d)
        assert first.stderr is not None and "listening on" in first.stderr.readline()
        with Client(d.socket) as c:
            read = c.stats()["bytes_read"]
        assert read < 1.5 * (4 << 30), read
        second.stop()
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
        assert first.returncode == 0
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_storage_error_while_starting_stops_pieced_peer_saying_so(tmp_path: Path) -> None:
    """The daemon cannot read the torrent's file (a folder in its place) while it checks
    it for pieced-peer: pieced-peer exits 2 with the daemon's error and errno, in either
    mode, instead of ending quietly (1, or 0 with --seed)."""
    content = make_payload(tmp_path / "src", {"a.bin": 100_000}, seed=26)
    raw = make_torrent_lt(content, 16384, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    for seed in (False, True):
        root = tmp_path / ("seed" if seed else "down")
        save = root / "dl"
        (save / "payload" / "a.bin").mkdir(parents=True)
        d = Daemon(root)
        try:
            r = subprocess.run(peer_cmd(torrent, save, d.socket, "--listen", "127.0.0.1:0",
                                        *(["--seed"] if seed else [])),
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 2, (seed, r.returncode, r.stderr)
            assert "errno" in r.stderr, r.stderr
        finally:
            assert d.stop() == 0, d.stderr()


def test_pieces_slow_to_be_made_durable_are_not_fetched_twice(tmp_path: Path) -> None:
    """A daemon that makes pieces durable only every 12 s (its sync window): pieced-peer
    waits for their word instead of taking pieces whose blocks are all stored, and not
    yet announced, for lost and fetching them again."""
    piece = 65536
    files = {"a.bin": 40 * piece}
    content, raw, torrent = _made(tmp_path, files, piece, "v1", seed=27)
    d = Daemon(tmp_path, env={"PIECED_SYNC_WINDOW_MS": "12000"})
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            down = download(torrent, tmp_path / "dl", d, seeder.port)
        assert down["bytes_down"] == sum(files.values()), down
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        assert d.stop() == 0, d.stderr()


class Blackholes:
    """Loopback addresses that never answer a dial: a listening socket with a backlog of
    0 whose one place is taken by a connection never accepted (the kernel then drops
    every further SYN: a connect waits until it times out)."""

    def __init__(self, n: int) -> None:
        import socket as sockets

        self.socks: list[sockets.socket] = []
        self.ports: list[int] = []
        for _ in range(n):
            listener = sockets.create_server(("127.0.0.1", 0), backlog=0)
            filler = sockets.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(listener.getsockname())
            self.socks += [listener, filler]
            self.ports.append(listener.getsockname()[1])

    def close(self) -> None:
        for s in self.socks:
            s.close()


def test_a_seeder_dialling_in_is_let_in_while_dials_to_dead_addresses_wait(
        tmp_path: Path) -> None:
    """The tracker names only addresses that never answer, more than --max-peers; a
    seeder that learnt of us elsewhere dials us. It was refused: dials under way took
    every place of --max-peers for 10 s each, and were made again for ever (no byte in
    200 s with 300 such addresses). Dials have places of their own now, and an address
    that was not reached three times in a row is dialled again only every 5 minutes."""
    import bencodepy

    piece = 65536
    content = make_payload(tmp_path / "seed", {"a.bin": 12 * piece + 7}, seed=33)
    raw = make_torrent_lt(content, piece, "v1")
    holes = Blackholes(40)
    d = Daemon(tmp_path)
    try:
        with _tracker(lambda q: bencodepy.encode(
                {b"interval": 60, b"peers": _compact(*holes.ports)})) as (port, _seen):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            listen = _free_port()
            proc = subprocess.Popen(
                peer_cmd(torrent, tmp_path / "dl", d.socket, "--max-peers", "4",
                         "--listen", f"127.0.0.1:{listen}"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _running.append(proc)
            with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
                time.sleep(2)  # the dials under way by now
                seeder.connect("127.0.0.1", listen)
                out, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
        assert json.loads(out)["complete"]
        assert (tmp_path / "dl" / "payload" / "a.bin").read_bytes() == (content / "a.bin").read_bytes()
    finally:
        holes.close()
        assert d.stop() == 0, d.stderr()


def test_a_seeder_among_dead_addresses_is_dialled_before_they_time_out(tmp_path: Path) -> None:
    """The tracker names a seeder among addresses that never answer, more of them than
    --max-peers: the seeder must be dialled in the first wave, not after dials to dead
    addresses have timed out one place at a time (one dial per place of --max-peers
    took 50 s to find 2 seeders among 300 such addresses). Every dial that times out
    is logged; none may have before the download is done."""
    import bencodepy
    from pieced.peer import plugin

    piece = 65536
    content = make_payload(tmp_path / "seed", {"a.bin": 12 * piece + 7}, seed=36)
    raw = make_torrent_lt(content, piece, "v1")
    max_peers = 3
    holes = Blackholes(11)  # (with the seeder: as many as dials at once)
    assert plugin.DIALS_PER_PLACE * max_peers >= 12
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder, _tracker(
                lambda q: bencodepy.encode({b"interval": 60, b"peers": _compact(
                    *holes.ports, seeder.port)})) as (port, _seen):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            proc = subprocess.run(
                peer_cmd(torrent, tmp_path / "dl", d.socket, "--max-peers", str(max_peers)),
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "PIECED_PEER_LOG": "INFO"})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["complete"]
        assert "cannot connect" not in proc.stderr
        assert (tmp_path / "dl" / "payload" / "a.bin").read_bytes() == (content / "a.bin").read_bytes()
    finally:
        holes.close()
        assert d.stop() == 0, d.stderr()


def test_a_seed_that_hangs_up_on_our_have_all_is_not_dialled_again(tmp_path: Path) -> None:
    """A seeding pieced-peer dials a seed, which closes the connection as soon as it
    sees we have every piece, before its own HAVE_ALL reaches us (libtorrent: "upload
    to upload connection"): it was dialled again a second later, and again and again.
    A peer that hangs up on our HAVE_ALL without wanting anything is a seed too."""
    import socket as sockets

    listener = sockets.create_server(("127.0.0.1", 0))
    d = Daemon(tmp_path)
    try:
        seeding, conn, parser, hs = _seeding_dials(tmp_path, d, listener, 34)
        conn.sendall(wire.handshake(hs.info_hash, b"-LT2110-" + bytes(12), wire.make_reserved()))
        seen: list[wire.Event] = []
        while not any(isinstance(e, wire.HaveAll) for e in seen):
            seen.extend(parser.feed(conn.recv(1 << 16)))
        conn.close()  # (as libtorrent does, its own HAVE_ALL still unsent)
        _not_dialled_again(listener, seeding)
    finally:
        listener.close()
        assert d.stop() == 0, d.stderr()


def test_an_address_taken_for_a_seed_is_dialled_again_when_a_tracker_names_it(
        tmp_path: Path) -> None:
    """A seeding pieced-peer takes a peer that hangs up on its HAVE_ALL for a seed and
    does not dial it; but when the tracker names that address again (another peer may
    have taken it: a leecher that started since) it is dialled again. It was not, for
    as long as pieced-peer ran: a leecher on that address got nothing."""
    import socket as sockets

    import bencodepy

    listener = sockets.create_server(("127.0.0.1", 0))
    piece = 32768
    _content, raw, _torrent = _made(tmp_path, {"a.bin": 6 * piece + 5}, piece, "v1", seed=35)
    d = Daemon(tmp_path)
    try:
        with _tracker(lambda q: bencodepy.encode(
                {b"interval": 1, b"peers": _compact(listener.getsockname()[1])})) as (port, seen):
            torrent = _with_tracker(raw, port, tmp_path / "t.torrent")
            seeding = Seeding(torrent, tmp_path / "seed", d)
            listener.settimeout(30)
            conn, _ = listener.accept()
            conn.settimeout(30)
            parser = wire.Parser(handshake=True)
            events: list[wire.Event] = []
            while not any(isinstance(e, wire.Handshake) for e in events):
                events.extend(parser.feed(conn.recv(1 << 16)))
            hs = next(e for e in events if isinstance(e, wire.Handshake))
            conn.sendall(wire.handshake(hs.info_hash, b"-LT2110-" + bytes(12),
                                        wire.make_reserved()))
            while not any(isinstance(e, wire.HaveAll) for e in events):
                events.extend(parser.feed(conn.recv(1 << 16)))
            conn.close()  # (a seed, as libtorrent hangs up on a seed)
            announced = len(seen)
            listener.settimeout(60)  # (a re-announce comes every 30 s at most)
            again, _ = listener.accept()
            again.close()
            assert len(seen) > announced
            assert seeding.stop()["complete"]
    finally:
        listener.close()
        assert d.stop() == 0, d.stderr()


def test_a_file_that_cannot_be_written_any_more_stops_the_download_in_one_line(
        tmp_path: Path) -> None:
    """A payload file made immutable (``chattr +i``) mid-download: every block of it is
    refused (EPERM), and pieced-peer stops (exit 2) with the daemon's error in one line.
    (A refused block's error comes back with whichever request of ours comes next, in
    any task: each stops us the same way, none with a traceback.)"""
    piece = 65536
    files = {"a.bin": 60 * piece + 999}
    _, raw, torrent = _made(tmp_path, files, piece, "v1", seed=23)
    d = Daemon(tmp_path)
    target = tmp_path / "dl" / "payload" / "a.bin"
    try:
        with _downloading_slowly(raw, torrent, tmp_path, d, 4) as proc:
            subprocess.run(["chattr", "+i", str(target)], check=True)
            out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (proc.returncode, err)
        assert "Operation not permitted" in err and "errno 1" in err, err
        assert "Traceback" not in err, err
        assert json.loads(out)["complete"] is False
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=False)
        assert d.stop() == 0, d.stderr()


def test_a_pieced_peer_the_daemon_refuses_says_it_is_the_daemon_and_why(
        tmp_path: Path) -> None:
    """A pieced-peer refused for max_clients printed only "too many clients (limit 1)",
    which reads as its own BitTorrent peers; and the daemon said nothing of it. (Its
    place is waited for within --daemon-wait: 1 s here.)"""
    _, _, torrent = _made(tmp_path, {"a.bin": 40000}, 16384, "v1", seed=17)
    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "1"})
    try:
        with Client(d.socket):
            r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer",
                                        "127.0.0.1:1", "--daemon-wait", "1"),
                               capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert f"the daemon at {d.socket} refused us" in r.stderr, r.stderr
        assert "max_clients = 1" in r.stderr, r.stderr
        assert "waiting up to 1 s for a place" in r.stderr, r.stderr
    finally:
        assert d.stop() == 0, d.stderr()
    assert "a client was refused: too many clients" in d.stderr()


def test_a_daemon_full_at_the_start_is_waited_for(tmp_path: Path) -> None:
    """pieced-peer starting while every place of the daemon is taken (max_clients)
    stopped at once, where after a loss it waits for a place: it waits within
    --daemon-wait at the start too, then downloads once a place comes free."""
    content, raw, torrent = _made(tmp_path, {"a.bin": 200_000}, 16384, "v1", seed=19)
    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "1"})
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as seeder:
            with Client(d.socket) as c:
                proc = downloading(torrent, tmp_path / "dl", d, seeder.port,
                                   extra=("--daemon-wait", "30"))
                deadline = time.monotonic() + 20  # (well within --daemon-wait)
                while c.stats()["clients_refused"] < 2:  # (refused, and tried again)
                    assert time.monotonic() < deadline and proc.poll() is None
                    time.sleep(0.05)
                assert proc.poll() is None
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["complete"] and "waiting up to 30 s for a place" in err, err
        _same_tree(content, tmp_path / "dl" / "payload", {"a.bin": 200_000})
    finally:
        assert d.stop() == 0, d.stderr()


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler of its own for ``sig`` (SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_the_command_heeds_sigterm_from_its_first_moment(tmp_path: Path) -> None:
    """``pieced-peer`` sent SIGTERM as soon as it has a handler for it (its entry point
    has imported nothing of the peer yet): it stops as any stop before completion does,
    exit 1 and its ``--json`` summary. It had no handler until its run began, and a
    SIGTERM in its first few hundred milliseconds killed it, with nothing said."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pieced.peer.command; "
         "print([m for m in ('asyncio', 'pieced.peer.plugin') if m in sys.modules])"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]", probe.stdout  # (the entry point is light)
    _, _, torrent = _made(tmp_path, {"a.bin": 1 << 20}, 1 << 16, "v1", seed=5)
    d = Daemon(tmp_path)
    try:
        command = Path(sys.executable).parent / "pieced-peer"  # (as installed)
        proc = subprocess.Popen(
            [str(command), str(torrent), "--save-path", str(tmp_path / "dl"), "--socket",
             str(d.socket), "--json", "--peer", "127.0.0.1:9"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _running.append(proc)
        deadline = time.monotonic() + 30
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
            time.sleep(0.0005)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, (proc.returncode, err)
        summary = json.loads(out)
        assert not summary["complete"] and summary["bytes_down"] == 0
    finally:
        assert d.stop() == 0, d.stderr()
