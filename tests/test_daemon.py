"""The daemon as a subprocess, driven through its socket by the real client library.

Downloads, corrupt pieces, bad input and the flush at SIGTERM run on each storage backend
(``backend``, see conftest.py; the ``daemon`` fixture starts on it); the protocol's own
tests on the default one.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pieced.daemon.server import MAX_QUEUED_JOBS
from pieced.protocol.client import AsyncClient, Client, ShmRing
from pieced.protocol.frames import (
    HEADER,
    MAX_BLOCK,
    Frame,
    FrameReader,
    FrameType,
    RecvRing,
    encode_control,
    encode_read,
    encode_write_header,
    encode_write_ring,
)
from pieced.protocol.messages import (
    MAX_ERROR_MESSAGE,
    decode_error,
    encode_request,
    encode_response,
    hello,
    to_wire,
)
from pieced.storage.errors import (
    BadRequest,
    ErrorCode,
    OutOfRange,
    PiecedError,
    TooLarge,
    UnknownTorrent,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import STORES_NOTHING, Daemon
from tests.realtools import lt_recheck, make_payload, make_torrent_lt
from tests.test_disk import Source

BLOCK_16K = 16384


def collect(events: list[tuple[str, dict[str, Any]]], lock: threading.Lock) -> Any:
    def on_event(name: str, fields: dict[str, Any]) -> None:
        with lock:
            events.append((name, fields))
    return on_event


def wait_for(cond: Any, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


def write_from_three_clients(
    path: Path, ih: bytes, src: Source, blocks: list[tuple[int, int, int]], ring_size: int
) -> None:
    """Three connections share the blocks (every third each): one sends inline, one
    through a shared ring of ``ring_size`` bytes, one alternates; all at once."""
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with Client(path) as c:
                if k == 2:
                    c.attach_ring(ring_size)
                for i, (p, b, n) in enumerate(blocks):
                    if i % 3 != k:
                        continue
                    data = src.read(p, b, n)
                    if k == 2 or (k == 1 and i % 2):
                        c.write_block_direct(ih, p, b, data)
                    else:
                        c.write_chunk(ih, p, b, data)
                c.wait_writes()
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_three_clients_both_transports(
    daemon: Daemon, odd_payload: tuple[Path, Path], kind: Any, backend: str
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, kind)
    src = Source(raw, save)
    dl = daemon.root / "dl"
    events: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()
    with Client(daemon.socket, on_event=collect(events, lock)) as c0:
        ih = c0.register(raw, dl)
        assert ih == src.meta.info_hash
        blocks = src.blocks()
        random.Random(3).shuffle(blocks)
        # odd ring size: blocks wrap around its end
        write_from_three_clients(daemon.socket, ih, src, blocks, 256 * 1024 + 4096)
        n = src.meta.num_pieces
        while len(events) < n:
            c0.stats()  # pumps the socket, delivering events
            time.sleep(0.01)
        assert sorted(f["piece"] for name, f in events if name == "piece_verified") == list(range(n))
        st = c0.status(ih)
        assert st["verified_pieces"] == n
        lean = c0.status(ih, files=False)  # the per-file list left out, the rest the same
        assert "files" not in lean and len(st["files"]) == sum(1 for f in src.meta.files if not f.pad)
        assert lean == {k: v for k, v in st.items() if k != "files"}
        for p in range(n):
            size = src.layout.piece_size(p)
            assert c0.read_chunk(ih, p, 0, size) == src.read(p, 0, size)
        assert c0.cached_pieces(ih)
        if src.meta.has_v1:
            assert c0.hash_piece(ih, 0)
        if src.meta.has_v2:
            assert c0.hash_piece_v2(ih, 0)
    daemon.stop()
    assert all(lt_recheck(raw, dl))


def test_corrupt_piece_fails_and_other_torrents_go_on(
    daemon: Daemon, odd_payload: tuple[Path, Path], backend: str
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    with Client(daemon.socket) as c:
        ih = c.register(raw, daemon.root / "dl")
        for p, b, n in src.blocks():
            if p == 1:
                data = bytearray(src.read(p, b, n))
                data[0] ^= 0xFF
                c.write_chunk(ih, p, b, bytes(data))
        c.wait_writes()
        wait_for(lambda: c.stats() and any(e[0] == "piece_failed" for e in c.events))
        _name, fields = next(e for e in c.events if e[0] == "piece_failed")
        assert fields["piece"] == 1 and fields["ih"] == ih
        assert not c.status(ih)["have"][0] & 0x40


def test_piece_events_say_how_many_connections_wrote_into_the_piece(
    daemon: Daemon, odd_payload: tuple[Path, Path], backend: str
) -> None:
    """A client that blames its peers for a failed piece must know whether the attempt
    was its own, and its own alone: every piece event names the connections that wrote
    blocks into the attempt (one through the ring, one inline) by the numbers their
    HELLOs gave them."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    with Client(daemon.socket) as a, Client(daemon.socket) as b:
        a.attach_ring(1 << 20)
        ih = a.register(raw, daemon.root / "dl")
        b.status(ih)  # (subscribed: b is told too)
        by_piece: dict[int, list[tuple[int, int, int]]] = {}
        for p, begin, n in src.blocks():
            by_piece.setdefault(p, []).append((p, begin, n))
        assert len(by_piece[0]) > 1 and len(by_piece[1]) > 1 and len(by_piece[2]) > 1
        for p, begin, n in by_piece[0]:  # all of a's: verified, one writer
            a.write_block_direct(ih, p, begin, src.read(p, begin, n))
        for i, (p, begin, n) in enumerate(by_piece[1]):  # half each, and a bad block of b's
            data = src.read(p, begin, n)
            if i == 0:
                b.write_chunk(ih, p, begin, b"\xee" * n)
                b.wait_writes()
            else:
                a.write_block_direct(ih, p, begin, data)
        for i, (p, begin, n) in enumerate(by_piece[2]):  # a's, b's good block among them
            (b.write_chunk if i == 0 else a.write_block_direct)(ih, p, begin, src.read(p, begin, n))
            b.wait_writes()
        a.wait_writes()
        a.flush_all()
        for c in (a, b):
            wait_for(lambda c=c: c.stats() and {e[1]["piece"] for e in c.events
                                                if e[0].startswith("piece_")} >= {0, 1, 2})
            got = {e[1]["piece"]: (e[0], e[1].get("writers")) for e in c.events
                   if e[0].startswith("piece_")}
            both = sorted([a.core.conn, b.core.conn])
            assert got == {0: ("piece_verified", [a.core.conn]), 1: ("piece_failed", both),
                           2: ("piece_verified", both)}, got
        assert a.core.conn != b.core.conn and None not in both


def test_a_recheck_and_a_clear_by_one_client_are_told_to_the_others(
    daemon: Daemon, odd_payload: tuple[Path, Path]
) -> None:
    """Two clients follow one torrent; a third rechecks it after a byte changed on disk,
    then clears a piece: the other two get ``pieces_changed`` (their view of the verified
    pieces is stale: they ask ``status``), the rechecking one before its RESPONSE, and
    ``piece_failed`` for the cleared piece. Before, a recheck told nobody, and a client
    serving the torrent went on serving the piece it failed."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    with Client(daemon.socket) as a, Client(daemon.socket) as b, Client(daemon.socket) as c:
        ih = a.register(raw, save)
        b.subscribe(ih)
        c.recheck(ih)
        n = c.status(ih)["verified_pieces"]
        assert n == c.status(ih)["num_pieces"] and ("pieces_changed", {"ih": ih}) in c.events
        first = next(f for f in content.rglob("*") if f.is_file() and f.stat().st_size > 65536)
        with open(first, "r+b") as f:
            f.write(b"\xff" if f.read(1) != b"\xff" else b"\0")
        c.events.clear()
        failed = c.recheck(ih, full=True)["failed_v1"]
        assert len(failed) == 1 and ("pieces_changed", {"ih": ih}) in c.events
        c.clear_piece(ih, n - 1)
        for x in (a, b):
            wait_for(lambda x=x: x.stats() and any(e[0] == "piece_failed" for e in x.events))
            assert [e for e in x.events if e[0] == "pieces_changed"] == [
                ("pieces_changed", {"ih": ih})] * 2
            (_name, fields), = [e for e in x.events if e[0] == "piece_failed"]
            assert fields["piece"] == n - 1 and "v1" not in fields
        c.recheck(ih)  # finds the cleared piece (its bytes are still there)
        c.recheck(ih)  # nothing comes or goes
        a.stats()
        assert len([e for e in a.events if e[0] == "pieces_changed"]) == 3


def test_status_tells_the_bytes_held_of_each_piece_under_way(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A plugin that stops in the middle of a piece and starts again asks which bytes
    the daemon holds of the pieces under way (``partial``), and sends only the rest."""
    piece = 65536
    content = make_payload(tmp_path / "src", {"a.bin": 4 * piece + 100}, seed=61)
    raw = make_torrent_lt(content, piece, "v1")
    src = Source(raw, tmp_path / "src")
    with Client(daemon.socket) as c:
        ih = c.register(raw, daemon.root / "dl")
        assert c.status(ih, files=False, partial=True)["partial"] == []
        assert "partial" not in c.status(ih, files=False)
        for p, b in ((1, 0), (1, 2 * BLOCK_16K), (1, 3 * BLOCK_16K), (3, BLOCK_16K), (0, 0)):
            c.write_chunk(ih, p, b, src.read(p, b, BLOCK_16K))
        for b in range(BLOCK_16K, piece, BLOCK_16K):  # piece 0 completes: not under way
            c.write_chunk(ih, 0, b, src.read(0, b, BLOCK_16K))
        c.wait_writes()
        st = c.status(ih, files=False, partial=True)
        assert st["partial"] == [[1, [[0, BLOCK_16K], [2 * BLOCK_16K, piece]]],
                                 [3, [[BLOCK_16K, 2 * BLOCK_16K]]]]
        assert st["partial_pieces"] == 2
        with pytest.raises(BadRequest, match="'partial' must be 0 or 1"):
            c._call("status", ih=ih, partial=2)


def test_bad_input_gets_errors_and_disturbs_no_one(
    daemon: Daemon, odd_payload: tuple[Path, Path], backend: str
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    good = Client(daemon.socket)
    ih = good.register(raw, daemon.root / "dl")
    blocks = src.blocks()
    half = len(blocks) // 2
    for p, b, n in blocks[:half]:
        good.write_chunk(ih, p, b, src.read(p, b, n))

    with Client(daemon.socket) as c:
        with pytest.raises(BadRequest, match="unknown op"):
            c._call("frobnicate")
        for op in (["stats"], {"stats": 1}, 7):  # (a list or a dict closed the connection)
            with pytest.raises(BadRequest, match="unknown op"):
                c._roundtrip(*c.core.request(op, {}))  # type: ignore[arg-type]
        with pytest.raises(UnknownTorrent):
            c.status(bytes(20))
        with pytest.raises(BadRequest, match="'files' must be 0 or 1"):
            c._call("status", ih=ih, files=2)
        with pytest.raises(OutOfRange):
            c.read_chunk(ih, src.meta.num_pieces, 0, 10)
        c.write_chunk(ih, 0, 10**6, b"x")
        with pytest.raises(OutOfRange):
            c.wait_writes()
        with pytest.raises(PiecedError):
            c.register(b"garbage", daemon.root / "x")
        with pytest.raises(PiecedError, match="outside the allowed roots"):
            c.register(raw, "/")
        c.attach_ring(65536)
        c.core.shm = None  # forge a frame pointing outside the ring
        _rid, frame = c.core.write_ring(ih, 0, 0, 10**9, 16384, (0, 0), False)
        c._send(frame)
        with pytest.raises(BadRequest, match="outside the ring"):
            c.wait_writes()
        for length in (0, 2 << 20):  # (not "outside the ring": too short, too long)
            _rid, frame = c.core.write_ring(ih, 0, 0, 0, length, (0, 0), False)
            c._send(frame)
            with pytest.raises(BadRequest, match="bytes at a time"):
                c.wait_writes()

    def raw_conn() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(daemon.socket))
        return s

    # random bytes with no handshake; a frame too large; a client vanishing mid-block
    s = raw_conn()
    s.sendall(os.urandom(4096))
    assert s.recv(65536)  # an ERROR frame, then the daemon hangs up
    s.close()
    s = raw_conn()
    s.sendall(encode_control(FrameType.HELLO, 0, to_wire(hello("client", "t"))))
    s.sendall(HEADER.pack(2**31, 2, 0, 0, 1))
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    assert b"exceeds the limit" in data
    s.close()
    s = raw_conn()
    s.sendall(encode_control(FrameType.HELLO, 0, to_wire(hello("client", "t"))))
    p, b, n = blocks[-1]
    s.sendall(encode_write_header(9, ih, p, b, n) + src.read(p, b, n)[: n // 2])
    s.close()

    for p, b, n in blocks[half:]:
        good.write_chunk(ih, p, b, src.read(p, b, n))
    good.wait_writes()
    wait_for(lambda: good.status(ih)["verified_pieces"] == src.meta.num_pieces)
    good.close()


def test_async_client(daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "v2")
    src = Source(raw, save)

    async def main() -> dict[str, Any]:
        async with AsyncClient(daemon.socket) as c:
            ih = await c.register(raw, daemon.root / "dl")
            blocks = src.blocks()
            await asyncio.gather(*(
                (c.write_block_direct if i % 2 else c.write_chunk)(ih, p, b, src.read(p, b, n))
                for i, (p, b, n) in enumerate(blocks)
            ))
            await c.wait_writes()
            await c.flush_all()
            st = await c.status(ih)
            assert await c.read_chunk(ih, 0, 0, 100) == src.read(0, 0, 100)
            assert await c.hash_block(ih, 0, 0, 16384) == __import__("hashlib").sha256(src.read(0, 0, 16384)).digest()
            return st

    st = asyncio.run(main())
    assert st["verified_pieces"] == src.meta.num_pieces


def test_a_name_standard_output_cannot_spell_is_written_escaped(
        daemon: Daemon, tmp_path: Path) -> None:
    """A file named in Japanese, listed on a standard output in ASCII (a terminal of
    another locale): ``pieced status`` raised UnicodeEncodeError, exit 1 (which says a
    piece failed). The name is written escaped, as stderr writes it, and it exits 0."""
    content = make_payload(tmp_path / "src" / "payload", {"\u30c7\u30fc\u30bf.bin": 5000}, seed=2)
    raw = make_torrent_lt(content, 16384, "v1")
    with Client(daemon.socket) as c:
        ih = c.register(raw, str(tmp_path / "src"))
    r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "status", ih.hex(),
                        "--socket", str(daemon.socket)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0, r.stderr
    assert "\\u30c7\\u30fc\\u30bf.bin" in r.stdout, r.stdout


def test_cli_and_http(daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    tfile = daemon.root / "t.torrent"
    tfile.write_bytes(make_torrent_lt(content, 65536, "hybrid"))
    sock = ["--socket", str(daemon.socket)]

    def pieced(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pieced.daemon.cli", *args], capture_output=True,
                              text=True, cwd=daemon.root, timeout=60)

    r = pieced("add", str(tfile), "--save-path", str(save), "--json", *sock)
    assert r.returncode == 0, r.stderr
    ih = json.loads(r.stdout)["info_hash"]
    r = pieced("recheck", ih, "--json", *sock)
    assert r.returncode == 0 and json.loads(r.stdout)["failed_v1"] == [] and r.stderr == ""
    rows = json.loads(pieced("ls", "--json", *sock).stdout)
    assert [row["info_hash"] for row in rows] == [ih]
    st = json.loads(pieced("status", ih, "--json", *sock).stdout)
    assert st["verified_pieces"] == st["num_pieces"]
    assert "verified" in pieced("status", ih, *sock).stdout

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"http://{daemon.http}{path}", timeout=10) as resp:
            return resp.read()

    assert get("/healthz") == b"ok\n"
    stats = json.loads(get("/stats"))
    assert stats["torrents"] == 1 and stats["bytes_read"] > 0
    (t,) = json.loads(get("/torrents"))
    assert t["info_hash"] == ih and bytes.fromhex(t["have"]) == bytes.fromhex(json.loads(get(f"/torrents/{ih}"))["have"])
    # the whole v2 info_hash of the hybrid names it too, on the command line and over HTTP
    assert json.loads(get(f"/torrents/{t['info_hash_v2']}"))["info_hash"] == ih
    assert pieced("status", t["info_hash_v2"], "--json", *sock).returncode == 0
    for bad in ("abc", "ab" * 4000):
        with pytest.raises(urllib.error.HTTPError) as exc:
            get(f"/torrents/{bad}")
        assert exc.value.code == 400
    r = pieced("status", "abc", *sock)
    assert r.returncode == 2 and "not an info_hash" in r.stderr
    families = {f.name: f for f in text_string_to_metric_families(get("/metrics").decode())}
    assert families["pieced_bytes_read"].samples[0].value == stats["bytes_read"]
    assert "pieced_read_latency_seconds" in families and "pieced_connected_clients" in families
    for name in ("clients_accepted", "clients_refused", "blocks_written_through",
                 "hash_workers", "hash_jobs", "hash_job_seconds"):  # (what /stats says too)
        assert f"pieced_{name}" in families, name
    assert families["pieced_clients_accepted"].samples[0].value >= 1
    # A check of the files on disk counts its verdicts (the counters of pieces completed
    # from blocks stayed 0 while a recheck failed a piece)
    with open(content / "a.bin", "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    r = pieced("recheck", ih, "--full", "--json", *sock)
    assert r.returncode == 1 and json.loads(r.stdout)["failed_v1"] == [0], r.stdout
    after = json.loads(get("/stats"))
    assert after["recheck_failed"] - stats["recheck_failed"] == 1
    assert after["recheck_verified"] - stats["recheck_verified"] == st["num_pieces"] - 1
    assert after["pieces_failed"] == stats["pieces_failed"] == 0
    families = {f.name: f for f in text_string_to_metric_families(get("/metrics").decode())}
    assert families["pieced_recheck_failed"].samples[0].value == after["recheck_failed"]

    r = pieced("rm", ih, *sock)
    assert r.returncode == 0
    assert json.loads(pieced("ls", "--json", *sock).stdout) == []
    assert (content / "a.bin").exists()  # rm without --delete-files keeps the payload
    r = pieced("status", "00" * 20, *sock)
    assert r.returncode == 2 and "unknown info_hash" in r.stderr
    json.loads(pieced("stats", "--json", *sock).stdout)


def test_a_file_that_is_refused_is_said_so_and_its_errors_are_told_once_and_forgotten_when_mended(
        daemon: Daemon) -> None:
    """A payload file that is a symlink fails every piece it holds, as it must (payload
    paths are never followed through a symlink); but `pieced verify` and `pieced
    recheck` said nothing of why, and `pieced status` listed the same error once per
    piece read, still there after the file was mended and checked good. Each command
    now names the file and why; the same error again is one entry with its count; and
    a recheck starts the torrent's errors afresh (as libtorrent's force_recheck clears
    a torrent's error)."""
    files = {"a.bin": 5 * 65536 + 7, "empty.txt": 0, "b.bin": 3000}
    content = make_payload(daemon.root / "elsewhere", files, seed=5)
    tfile = daemon.root / "t.torrent"
    tfile.write_bytes(make_torrent_lt(content, 65536, "v1"))
    save = daemon.root / "save"
    (save / "payload").mkdir(parents=True)
    for name in files:
        shutil.copyfile(content / name, save / "payload" / name)
    (save / "payload" / "a.bin").unlink()
    (save / "payload" / "a.bin").symlink_to(content / "a.bin")
    sock = ["--socket", str(daemon.socket)]

    def pieced(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pieced.daemon.cli", *args], capture_output=True,
                              text=True, cwd=daemon.root, timeout=60)

    r = pieced("verify", str(tfile), "--data", str(save))
    assert r.returncode == 1
    assert f"not read: {save / 'payload' / 'a.bin'}: a symbolic link: not followed" in r.stdout
    report = json.loads(pieced("verify", str(tfile), "--data", str(save), "--json").stdout)
    assert report["refused"] == [{"path": str(save / "payload" / "a.bin"),
                                  "reason": "a symbolic link: not followed"}]
    assert report["failed_v1"] == [0, 1, 2, 3, 4, 5]

    ih = json.loads(pieced("add", str(tfile), "--save-path", str(save), "--json", *sock).stdout)[
        "info_hash"]
    for _ in range(2):
        r = pieced("recheck", ih, "--full", "--json", *sock)
        assert r.returncode == 1
        res = json.loads(r.stdout)
        assert res["info_hash"] == ih and res["failed_v1"] == [0, 1, 2, 3, 4, 5]
        # one entry, however many pieces met it, and not one more for the second check
        (err,) = res["errors"]
        assert "a.bin is a symlink" in err["message"] and err["errno"] == errno.EPERM
        assert err["count"] == 6 and sorted(err["pieces"]) == [0, 1, 2, 3, 4, 5], err
    r = pieced("recheck", ih, *sock)
    assert "error: " in r.stdout and "a.bin is a symlink" in r.stdout and "(6 times" in r.stdout
    r = pieced("status", ih, *sock)
    assert r.stdout.count("error: ") == 1 and "(6 times, pieces 0, 1, 2, 3, 4, 5)" in r.stdout
    assert "100%  payload/empty.txt" in r.stdout  # a file of 0 bytes is had, not at 0 %
    assert re.search(r"^errors +EPERM [1-9]", pieced("stats", *sock).stdout, re.M)

    (save / "payload" / "a.bin").unlink()
    shutil.copyfile(content / "a.bin", save / "payload" / "a.bin")
    r = pieced("recheck", ih, *sock)
    assert r.returncode == 0 and "error" not in r.stdout, r.stdout
    st = json.loads(pieced("status", ih, "--json", *sock).stdout)
    assert st["errors"] == [] and st["verified_pieces"] == st["num_pieces"]
    r = pieced("verify", str(tfile), "--data", str(save), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["refused"] == []


def test_many_clients_waiting_on_one_torrent_leave_another_torrent_answered(
        tmp_path: Path, freezable_fs: Any) -> None:
    """100 clients ask a recheck of one torrent while a move holds it (waiting on a
    frozen file system): each waits holding a long-job thread. There were 64: the rest
    queued, and a status of another torrent, asked after them, waited until 36 rechecks
    were done (minutes, for a big torrent). Each client has a thread of its own now:
    the status is answered while every recheck still waits."""
    from tests.conftest import sparse_zero_torrent

    big = sparse_zero_torrent(tmp_path / "big", "zeros.bin", 1 << 20, 8)
    content = make_payload(tmp_path / "src", 3 * 16384, seed=8)
    small = make_torrent_lt(content, 16384, "v1")
    d = Daemon(tmp_path, env={"PIECED_MAX_CLIENTS": "128"})
    try:
        with Client(d.socket) as c:
            ih_big = c.register(big, tmp_path / "big")
            ih_small = c.register(small, tmp_path / "src")

        async def main() -> tuple[int, int]:
            mover = AsyncClient(d.socket)
            await mover.connect()
            freezable_fs.freeze()
            try:
                move = asyncio.create_task(mover.move_storage(ih_big, freezable_fs.mount / "x"))
                await asyncio.sleep(0.5)  # (the move holds the torrent)
                clients = [AsyncClient(d.socket) for _ in range(100)]
                for ac in clients:
                    await ac.connect()
                rechecks = [asyncio.create_task(ac.recheck(ih_big, full=True)) for ac in clients]
                await asyncio.sleep(0.5)  # (all asked, all waiting)
                async with AsyncClient(d.socket) as other:
                    st = await asyncio.wait_for(other.status(ih_small), 60)
                done_then = sum(t.done() for t in rechecks)
            finally:
                freezable_fs.thaw()
            await move
            await asyncio.gather(*rechecks)
            for ac in (mover, *clients):
                await ac.close()
            return done_then, st["num_pieces"]

        done_then, pieces = asyncio.run(main())
        assert pieces == 3
        assert done_then == 0, f"the status waited for {done_then} rechecks of another torrent"
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_command_interrupted_says_so_and_an_ipv6_address_is_bracketed(tmp_path: Path) -> None:
    """Ctrl-C on a command waiting for the daemon printed a traceback; the start-up line
    gave an IPv6 HTTP address as http://::1:PORT, which no browser or tool takes."""
    d = Daemon(tmp_path, "--http-host", "::1")
    try:
        assert d.http.rsplit(":", 1)[0] == "[::1]", d.http
        with urllib.request.urlopen(f"http://{d.http}/healthz", timeout=10) as resp:
            assert resp.read() == b"ok\n"
        os.kill(d.proc.pid, signal.SIGSTOP)  # (it answers nothing now)
        try:
            cmd = subprocess.Popen([sys.executable, "-m", "pieced.daemon.cli", "ls",
                                    "--socket", str(d.socket)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   # (a shell's background job starts with SIGINT ignored)
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline = time.monotonic() + 30
            while _sockets_of(cmd.pid) == 0:  # (connected, in the call: waiting for the reply)
                assert time.monotonic() < deadline and cmd.poll() is None
                time.sleep(0.01)
            time.sleep(0.2)
            cmd.send_signal(signal.SIGINT)
            out, err = cmd.communicate(timeout=30)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert cmd.returncode == 130 and err == "pieced ls: interrupted\n" and out == "", err
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
def test_sigterm_flushes_buffered_pieces(
    tmp_path: Path, odd_payload: tuple[Path, Path], backend: str
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    d = Daemon(tmp_path, env={"PIECED_SYNC_WINDOW_MS": "1000"}, backend=backend)
    with Client(d.socket) as c:
        ih = c.register(raw, tmp_path / "dl")
        for p, b, n in src.blocks():
            c.write_chunk(ih, p, b, src.read(p, b, n))
        c.wait_writes()
    assert d.stop() == 0, d.stderr()
    assert all(lt_recheck(raw, tmp_path / "dl"))


def test_events_reach_clients_using_the_v2_alias(daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    with Client(daemon.socket) as owner:
        ih = owner.register(raw, daemon.root / "dl")
        alias = owner.status(ih)["info_hash_v2"]
        v2_key = bytes.fromhex(alias)[:20]
        with Client(daemon.socket) as other:
            other.subscribe(v2_key)  # knows the torrent only by its truncated v2 hash
            for p, b, n in src.blocks():
                if p == 0:
                    other.write_chunk(v2_key, p, b, src.read(p, b, n))
            other.wait_writes()
            other.flush_all()
            assert ("piece_verified", 0) in [(e[0], e[1]["piece"]) for e in other.events]


# -- limits, ordering and flow control -------------------------------------------------------

MiB = 1024 * 1024
# The smallest buffers the settings allow: 64 KiB frames, a 64 KiB receive ring and so
# 64 KiB of unsent output before a client's lane pauses.
SMALL_BUFFERS = {"PIECED_MAX_FRAME_BYTES": "65536", "PIECED_CLIENT_BUFFER_BYTES": "65536"}


class RawConn:
    """A bare protocol peer on the daemon's socket: frames go out exactly as given, and
    nothing is read unless asked; what arrives is parsed with the project's FrameReader."""

    def __init__(self, path: Path, sndbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if sndbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.reader = FrameReader(RecvRing(8 * MiB), 4 * MiB)
        self.sock.sendall(encode_control(FrameType.HELLO, 0, to_wire(hello("client", "raw"))))
        (reply,) = self.replies(1)
        assert reply.type == FrameType.HELLO

    def _frames(self) -> list[Frame]:
        """Every complete frame received so far, events left out."""
        out = []
        while (f := self.reader.next_frame()) is not None:
            if f.token is not None:
                f.payload = (memoryview(b"".join(f.payload)),)
                self.reader.ring.release(f.token)
            if f.type != FrameType.EVENT:
                out.append(f)
        return out

    def _recv(self, flags: int = 0) -> None:
        n = self.sock.recv_into(self.reader.ring.writable(), 0, flags)
        if n == 0:
            raise ConnectionError("the daemon closed the connection")
        self.reader.ring.wrote(n)

    def replies(self, count: int, exact: bool = True) -> list[Frame]:
        """The next ``count`` replies, in the order they arrived (``exact=False``: at
        least that many, with those that came with them)."""
        out = self._frames()
        while len(out) < count:
            self._recv()
            out += self._frames()
        assert len(out) == count or not exact, out
        return out

    def available(self) -> list[Frame]:
        """The replies that can be read without waiting."""
        with contextlib.suppress(BlockingIOError):
            self._recv(socket.MSG_DONTWAIT)
        return self._frames()

    def close(self) -> None:
        self.sock.close()


def _write_all(c: Client, ih: bytes, src: Source) -> None:
    for p, b, n in src.blocks():
        c.write_block_direct(ih, p, b, src.read(p, b, n))
    c.wait_writes()
    c.flush_all()


@pytest.mark.parametrize("max_frame", [64 * 1024, 8 * MiB, 32 * MiB])
def test_no_frame_exceeds_the_negotiated_limit(tmp_path: Path, max_frame: int) -> None:
    """max_frame from the daemon's HELLO bounds frames both ways: the client adopts it,
    and a reply that would be larger (a 9 MiB piece) is a TooLarge error for that
    request, not a frame that breaks the connection."""
    content = make_payload(tmp_path / "src", 9 * MiB, seed=3)
    raw = make_torrent_lt(content, 16 * MiB, "v1")
    src = Source(raw, tmp_path / "src")
    piece = src.read(0, 0, 9 * MiB)
    d = Daemon(tmp_path, env={"PIECED_MAX_FRAME_BYTES": str(max_frame)})
    try:
        with Client(d.socket) as c:
            assert c.core.max_frame == max_frame
            ih = c.register(raw, tmp_path / "dl")
            _write_all(c, ih, src)
            assert c.status(ih)["verified_pieces"] == 1
            if max_frame > 9 * MiB + 64:
                assert c.read_piece(ih, 0) == piece
            else:
                with pytest.raises(TooLarge, match=r"exceeds the frame limit.*read_chunk"):
                    c.read_piece(ih, 0)
            limit = max_frame - 8  # a READ returns as much as one DATA frame holds
            if limit < 16 * MiB - 4096:
                with pytest.raises(BadRequest, match=f"reads are limited to {limit} bytes"):
                    c.read_chunk(ih, 0, 0, limit + 1)
            if max_frame < MAX_BLOCK:
                with pytest.raises(TooLarge):  # refused by the client before it is sent
                    c.write_chunk(ih, 0, 0, bytes(max_frame))
            # the connection is still good
            got = c.read_chunk(ih, 0, 4096, min(limit, 9 * MiB - 4096))
            assert got == piece[4096 : 4096 + len(got)]
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_check_failing_more_pieces_than_a_reply_holds_is_answered(tmp_path: Path) -> None:
    """A recheck of 20,000 pieces, nothing on disk, under a frame limit of 64 KiB: the
    list of failed pieces does not fit in a reply. The check ran (and changed what it
    found), and was answered TOO_LARGE; at the default limit, so was a check of a
    million-piece torrent with nothing downloaded yet. The lists are cut to what fits,
    with their lengths, and the command line says there are more."""
    import bencodepy

    pieces = 20_000
    info = {b"name": b"big.bin", b"piece length": 16384, b"length": pieces * 16384,
            b"pieces": os.urandom(20 * pieces)}
    tfile = tmp_path / "big.torrent"
    tfile.write_bytes(bencodepy.encode({b"info": info}))
    d = Daemon(tmp_path, env={"PIECED_MAX_FRAME_BYTES": str(64 * 1024)})
    try:
        with Client(d.socket) as c:
            ih = c.register(tfile.read_bytes(), tmp_path / "dl")
            res = c.recheck(ih, full=True)
            assert res["num_pieces"] == pieces and res["verified"] == 0
            assert res["failed_v1_count"] == pieces and res["failed_cut"] == 1
            assert 1000 < len(res["failed_v1"]) < pieces
            assert res["failed_v1"] == list(range(len(res["failed_v1"])))
            assert "failed_v2" not in res and "failed_v2_count" not in res
        r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "recheck", ih.hex(),
                            "--socket", str(d.socket)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
        assert r.returncode == 1, r.stderr
        assert "0/20000 pieces verify" in r.stdout and "and more" in r.stdout
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_library_larger_than_a_reply_is_listed_in_pages(tmp_path: Path) -> None:
    """``list`` of more torrents than a reply holds (some 34,000 with the default frame
    limit) was TOO_LARGE, with nothing else to ask: ``pieced ls`` failed for every
    client. Now it says to ask in pages, pages hold what the frame does, the client
    libraries and the command page by themselves, and a torrent removed by another
    client while a list is made is left out, not the list's error."""
    import bencodepy

    max_frame = 64 * 1024
    d = Daemon(tmp_path, env={"PIECED_MAX_FRAME_BYTES": str(max_frame)})
    deep = tmp_path / ("s" * 200)
    rng = random.Random(7)
    try:
        with Client(d.socket) as c:
            ihs = sorted(
                c.register(bencodepy.encode({b"info": {
                    b"name": b"t%03d" % i, b"piece length": 16384, b"length": 5,
                    b"pieces": rng.randbytes(20)}}), deep)
                for i in range(300))
            with pytest.raises(TooLarge, match="in pages, with 'after'"):
                c._call("list")  # the whole list, as before: too large, and says what to do
            first = c._call("list", after=b"")
            assert 1 < len(first) < 300
            assert len(encode_response(1, first)) <= max_frame
            assert [r["ih"] for r in first] == ihs[:len(first)]
            second = c._call("list", after=first[-1]["ih"])
            assert second[0]["ih"] == ihs[len(first)]
            assert c._call("list", after=ihs[-1]) == []
            for bad in (5, b"x" * 21, [b"x"]):
                with pytest.raises(BadRequest, match="'after'"):
                    c._call("list", after=bad)
            rows = c.torrents()
            assert [r["ih"] for r in rows] == ihs
            assert all(r["save_path"] == str(deep) and r["num_pieces"] == 1 for r in rows)

        async def listed() -> list[bytes]:
            async with AsyncClient(d.socket) as ac:
                return [r["ih"] for r in await ac.torrents()]
        assert asyncio.run(listed()) == ihs

        r = subprocess.run([sys.executable, "-m", "pieced.daemon.cli", "ls", "--socket",
                            str(d.socket)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert [line.split()[0] for line in r.stdout.splitlines()] == [ih.hex() for ih in ihs]

        # Another client removes torrents while lists are made, over two connections.
        gone: list[bytes] = []
        with Client(d.socket) as lister, Client(d.socket) as remover:
            def remove() -> None:
                for ih in ihs[::2]:
                    remover.unregister(ih)
                    gone.append(ih)
            t = threading.Thread(target=remove)
            t.start()
            seen = 0
            while t.is_alive() or not seen:
                listed_now = [r["ih"] for r in lister.torrents()]
                assert listed_now == sorted(listed_now) and set(listed_now) <= set(ihs)
                seen += 1
            t.join()
            assert [r["ih"] for r in lister.torrents()] == ihs[1::2]
    finally:
        assert d.stop() == 0, d.stderr()


def test_every_reply_keeps_its_place_in_the_lane(daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
    """attach_ring and unknown ops go through the lane like every request: an unknown
    op's error does not overtake an earlier request's reply, and a WRITE_RING sent
    before attach_ring finds no ring while one sent after it uses the new ring."""
    conn = RawConn(daemon.socket)
    conn.sock.sendall(encode_request(1, "flush_all", {}) + encode_request(2, "frobnicate", {})
                      + encode_request(3, "attach_ring", {"size": 4096}))  # no descriptor
    replies = conn.replies(3)
    assert [(f.id, f.type) for f in replies] == [
        (1, FrameType.RESPONSE), (2, FrameType.ERROR), (3, FrameType.ERROR)]
    conn.close()

    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    with Client(daemon.socket) as c:
        ih = c.register(raw, daemon.root / "dl")
        shm = ShmRing(65536)
        p, b, n = src.blocks()[0]
        offset, token = shm.put(src.read(p, b, n))
        before, f1 = c.core.write_ring(ih, p, b, offset, n, token, False)
        attach, f2 = c.core.request("attach_ring", {"size": shm.size})
        after, f3 = c.core.write_ring(ih, p, b, offset, n, token, False)
        waiters = [c.core.waiters[rid] for rid in (before, attach, after)]
        c._send(f1 + f2 + f3, fds=[shm.fd])  # one sendmsg: parsed together
        while not all(w.done for w in waiters):
            c._pump()
        c.core.shm = shm
        assert isinstance(waiters[0].error, BadRequest)
        assert "no shared-memory ring" in str(waiters[0].error)
        assert waiters[1].error is None and waiters[1].result == {"size": 65536}
        assert waiters[2].error is None
        assert isinstance(c.core.take_write_error(), BadRequest)
        assert c.read_chunk(ih, p, b, n) == src.read(p, b, n)


def test_an_error_repeating_what_a_client_sent_stays_small(tmp_path: Path) -> None:
    """An unknown op was repeated in its error as Python shows it: an op of 2 MB of
    bytes 0xff made an ERROR of 8 MB, 6 MB of them a frame larger than the limit the
    daemon itself set, which a client must take as a broken stream. Error messages are
    cut to MAX_ERROR_MESSAGE characters."""
    d = Daemon(tmp_path, env={"PIECED_MAX_FRAME_BYTES": str(4 * MiB)})
    try:
        conn = RawConn(d.socket)
        for i, op in enumerate([b"\xff" * (2 * MiB), b"x" * (4 * MiB - 64)], start=1):
            conn.sock.sendall(encode_control(FrameType.REQUEST, i, {b"op": op}))
            (reply,) = conn.replies(1)
            assert reply.type == FrameType.ERROR and reply.id == i
            err = decode_error(reply.body)
            assert isinstance(err, BadRequest) and "unknown op" in err.message
            assert len(err.message) <= MAX_ERROR_MESSAGE
        conn.sock.sendall(encode_request(9, "stats", {}))
        assert conn.replies(1)[0].type == FrameType.RESPONSE
        conn.close()
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_descriptor_no_frame_it_came_with_took_is_closed_before_later_frames(
        tmp_path: Path) -> None:
    """A descriptor sent with a `stats` request is closed once the frames its bytes
    brought are parsed; the last of those may end in later bytes. It was kept until a
    read happened to end between two frames: with the first bytes of each frame sent
    with the end of the one before, an attach_ring sent later without a descriptor of
    its own took it."""
    d = Daemon(tmp_path)
    try:
        conn = RawConn(d.socket)
        fd = os.memfd_create("stray", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 65536)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        one, two = encode_request(1, "stats", {}), encode_request(2, "stats", {})
        attach = encode_request(3, "attach_ring", {"size": 65536})
        conn.sock.sendmsg([one + two[:5]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             array.array("i", [fd]).tobytes())])
        os.close(fd)
        assert conn.replies(1)[0].id == 1
        conn.sock.sendall(two[5:] + attach[:5])
        assert conn.replies(1)[0].id == 2
        conn.sock.sendall(attach[5:])
        (reply,) = conn.replies(1)
        assert reply.id == 3 and reply.type == FrameType.ERROR
        assert "exactly one descriptor" in decode_error(reply.body).message
        conn.close()
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_ring_that_is_no_file_is_refused_saying_so(tmp_path: Path) -> None:
    """A pipe, a socket or a device passed as a ring was refused for its size ("ring
    size 65536 does not match the descriptor (0)"), which sent its writer looking at
    the wrong thing. It is refused for what it is; the connection is kept."""
    d = Daemon(tmp_path)
    try:
        conn = RawConn(d.socket)
        r, w = os.pipe()
        a, b = socket.socketpair()
        zero = os.open("/dev/zero", os.O_RDWR)
        for rid, fd in enumerate([r, a.fileno(), zero], start=1):
            conn.sock.sendmsg([encode_request(rid, "attach_ring", {"size": 65536})],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [fd]).tobytes())])
            (reply,) = conn.replies(1)
            assert reply.id == rid and reply.type == FrameType.ERROR
            assert "is not a memfd" in decode_error(reply.body).message, reply.body
        for fd in (r, w, zero):
            os.close(fd)
        a.close()
        b.close()
        conn.sock.sendall(encode_request(9, "stats", {}))
        assert conn.replies(1)[0].type == FrameType.RESPONSE
        conn.close()
    finally:
        assert d.stop() == 0, d.stderr()


def test_inline_block_over_max_block_is_refused_and_the_connection_kept(
    daemon: Daemon, odd_payload: tuple[Path, Path]
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    with Client(daemon.socket) as c:
        ih = c.register(raw, daemon.root / "dl")
        c.write_chunk(ih, 0, 0, bytes(MAX_BLOCK + 1))  # within max_frame (8 MiB)
        with pytest.raises(BadRequest, match=f"blocks are limited to {MAX_BLOCK} bytes"):
            c.wait_writes()
        _write_all(c, ih, src)
        assert c.status(ih)["verified_pieces"] == src.meta.num_pieces


def test_a_block_larger_than_the_ring_is_refused_by_both_clients(
    daemon: Daemon, odd_payload: tuple[Path, Path]
) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    block = src.read(0, 0, 16384)

    async def main() -> None:
        async with AsyncClient(daemon.socket) as c:
            ih = await c.register(raw, daemon.root / "dl")
            await c.attach_ring(65536)
            with pytest.raises(ValueError, match="larger than the ring"):
                # (wait_for only turns the hang this used to be into a failure)
                await asyncio.wait_for(c.write_block_direct(ih, 0, 0, bytes(65537)), 60)
            await c.write_block_direct(ih, 0, 0, block)
            await c.wait_writes()

    asyncio.run(main())
    with Client(daemon.socket) as c:
        ih = src.meta.info_hash
        c.attach_ring(65536)
        with pytest.raises(ValueError, match="larger than the ring"):
            c.write_block_direct(ih, 0, 0, bytes(65537))
        assert c.read_chunk(ih, 0, 0, 16384) == block
    with Client(daemon.socket) as c:  # a ring of no size: said so, and the client goes on
        for size in (0, -1, 2.5):
            with pytest.raises(BadRequest, match="positive number of bytes"):
                c.attach_ring(size)  # type: ignore[arg-type]
        c.attach_ring(65536)
        c.write_block_direct(src.meta.info_hash, 0, 0, block)
        c.wait_writes()


def test_a_client_that_never_reads_its_events_is_dropped(tmp_path: Path) -> None:
    """Events to a subscriber that never reads cannot be held back; past the daemon's
    bound it is disconnected (and counted) instead of growing the daemon's memory, and
    the client doing the work is not disturbed."""
    content = make_payload(tmp_path / "src", 16384 + 1, seed=4)  # piece 1 is one byte
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    d = Daemon(tmp_path, env=SMALL_BUFFERS)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            deaf = RawConn(d.socket)
            deaf.sock.sendall(encode_request(1, "subscribe", {"ih": ih}))  # and never reads again
            for _ in range(20_000):  # each a piece_failed event: ~1.4 MB of them
                c.write_chunk(ih, 1, 0, b"?")
            _write_all(c, ih, src)  # flush_all: every event has been sent (or dropped) by now
            assert c.status(ih)["verified_pieces"] == 2
            assert sum(name == "piece_failed" for name, _ in c.events) == 20_000
            stats = c.stats()
            assert stats["clients_dropped"] == 1 and stats["connected_clients"] == 1
            with urllib.request.urlopen(f"http://{d.http}/metrics", timeout=10) as resp:
                families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
            assert families["pieced_clients_dropped"].samples[0].value == 1
            with contextlib.suppress(ConnectionError):  # what was in flight, then EOF
                while True:
                    deaf.available() or deaf._recv()
            deaf.close()
    finally:
        assert d.stop() == 0
    assert re.search(rf"dropping a client that does not read, client \d+ \(pid {os.getpid()}, "
                     r"uid \d+\)", d.stderr()), d.stderr()


@pytest.mark.parametrize("kind", ["write", "read"])
def test_flow_control_stops_reading_a_client_the_lane_cannot_keep_up_with(
    tmp_path: Path, kind: str
) -> None:
    """With its buffers full the daemon stops reading a client instead of growing its
    memory, so the client's sends block. The storage is made slow for real: the test
    holds a write lease on piece 0's file, so a READ of it blocks the connection's lane
    (in open, until the test lets the lease go: the kernel makes an opener wait for
    that). Inline WRITEs then fill the receive ring; small frames (READ here) fill the
    lane's queue of parsed requests."""
    content = make_payload(tmp_path / "src", {"a-stuck": 16384, "b-data": 4 * MiB}, seed=5)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    (tmp_path / "dl" / "payload").mkdir(parents=True)
    stuck_file = tmp_path / "dl" / "payload" / "a-stuck"
    shutil.copyfile(content / "a-stuck", stuck_file)
    lease = Lease(stuck_file)
    d = Daemon(tmp_path, env=SMALL_BUFFERS)
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            ring_bytes = c.core.server_hello["ring_bytes"] if c.core.server_hello else 0
        conn = RawConn(d.socket, sndbuf=65536)
        conn.sock.setblocking(False)
        sndbuf = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        files = [f.path[-1] for f in src.meta.files]  # libtorrent orders them its own way
        stuck = sum(f.length for f in src.meta.files[: files.index("a-stuck")]) // 16384
        others = [p for p in range(src.meta.num_pieces) if p != stuck]
        frames = [encode_read(1, ih, stuck, 0, 16384)]
        if kind == "write":
            frames += [encode_write_header(rid, ih, p, 0, 16384) + src.read(p, 0, 16384)
                       for rid, p in zip(itertools.count(2), others, strict=False)]
            bound = ring_bytes + sndbuf + 65536
        else:
            frames += [encode_read(rid, ih, others[0], 0, 1) for rid in range(2, 100_002)]
            bound = ring_bytes + MAX_QUEUED_JOBS * len(frames[1]) + sndbuf + 65536
        data = memoryview(b"".join(frames))
        ends = list(itertools.accumulate(len(f) for f in frames))
        sent = 0
        while sent < len(data):
            try:
                sent += conn.sock.send(data[sent : sent + 65536])
            except BlockingIOError:
                if not select.select([], [conn.sock], [], 2)[1]:
                    break  # the daemon has stopped reading us
        assert sent < len(data), "the daemon read everything though it could not carry it out"
        assert sent <= bound

        wait_for(lambda: lease.broken)  # the lane is waiting in open
        lease.release()
        # Finish the frame cut short, reading replies meanwhile; every frame is answered, in order.
        k = bisect.bisect_left(ends, sent)
        got: list[Frame] = []
        while sent < ends[k] or len(got) < k + 1:
            r, w, _ = select.select([conn.sock], [conn.sock] if sent < ends[k] else [], [], 30)
            assert r or w, "stalled"
            if w:
                sent += conn.sock.send(data[sent : ends[k]])
            if r:
                got += conn.available()
        assert [f.id for f in got] == list(range(1, k + 2))
        assert got[0].type == FrameType.DATA  # read once the lease was let go
        conn.close()
        if kind == "write":
            assert all(f.type == FrameType.ACK for f in got[1:])
            with Client(d.socket) as c:
                c.flush_all()
                assert c.status(ih)["verified_pieces"] == k
    finally:
        lease.release()  # else a failed test leaves the daemon waiting in open()
        assert d.stop() == 0, d.stderr()


class Lease:
    """A write lease of this process on a file: another process's open of it waits (in
    the kernel) until :meth:`release`, or the lease break time (45 s by default)."""

    def __init__(self, path: Path) -> None:
        import fcntl
        import signal

        self.broken = False

        def on_break(signum: int, frame: object) -> None:  # SIGIO: someone opens it
            self.broken = True

        self._previous = signal.signal(signal.SIGIO, on_break)
        self.fd: int | None = os.open(path, os.O_RDWR)
        fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)

    def release(self) -> None:
        import fcntl
        import signal

        if self.fd is not None:
            fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            os.close(self.fd)
            self.fd = None
            signal.signal(signal.SIGIO, self._previous)


def test_clients_writing_to_a_disk_that_hangs_leave_workers_for_the_others(
        tmp_path: Path) -> None:
    """Six clients write to a torrent whose file cannot be opened (the test holds a write
    lease on it: the kernel makes the daemon's open wait, as a disk that hangs would).
    Each client's lane held a short worker, waiting, until none was left, and another
    client's ``stats`` waited for that disk too. One lane at a time holds a short worker
    for a file system; the others wait on the long workers, and ``stats`` is answered."""
    content = make_payload(tmp_path / "src", {"stuck": 8 * 16384}, seed=8)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    (tmp_path / "dl" / "payload").mkdir(parents=True)
    stuck = tmp_path / "dl" / "payload" / "stuck"
    with open(stuck, "wb") as f:
        f.truncate(8 * 16384)  # (there, and none of its pieces)
    d = Daemon(tmp_path)
    writers: list[threading.Thread] = []
    with Client(d.socket) as c:
        ih = c.register(raw, tmp_path / "dl")
        assert c.status(ih)["verified_pieces"] == 0
    lease = Lease(stuck)
    try:

        def write(p: int) -> None:
            with Client(d.socket) as w:
                w.write_chunk(ih, p, 0, src.read(p, 0, 16384), flush=True)  # (on its lane)
                w.wait_writes()

        for p in range(6):
            writers.append(threading.Thread(target=write, args=(p,), daemon=True))
            writers[-1].start()
        wait_for(lambda: lease.broken)  # a lane is waiting in open
        time.sleep(0.5)  # (the others meanwhile get to the disk, or wait for it)
        answered: list[dict[str, Any]] = []

        def ask() -> None:
            with Client(d.socket) as other:
                answered.append(other.stats())

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        asking.join(15)
        assert answered, "stats waited for another client's disk"
        lease.release()
        for w in writers:
            w.join(30)
        with Client(d.socket) as c:
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == 6
    finally:
        lease.release()
        assert d.stop() == 0, d.stderr()


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("transport", ["ring", "inline"])
def test_block_writes_sent_back_to_back_are_merged(
        daemon: Daemon, odd_payload: tuple[Path, Path], backend: str, transport: str) -> None:
    """Adjacent block writes (through the shared ring, or inline: written from the
    daemon's receive buffer) that reach the lane together go to disk as one write (fewer
    pwritev calls than blocks); a run holding bad blocks falls back to one write each, so
    every block still gets exactly its own answer. Inline blocks are not held in the
    write buffer (but on a backend that gathers a piece's blocks before writing them).
    Blocks are shaped as libtorrent sends them, so runs hold blocks running into pads."""
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "hybrid")
    src = Source(raw, save)
    with Client(daemon.socket) as c:
        ih = c.register(raw, daemon.root / "dl")
        c.attach_ring(4 * 1024 * 1024)
        p0, b0, n0 = src.blocks()[0]
        c.write_chunk(ih, p0, b0, src.read(p0, b0, n0))  # a piece begun, far from done
        c.wait_writes()
        begun = c.stats()["write_buffer_bytes"]
        before = c.stats()
        parts: list[bytes] = []
        blocks = src.peer_blocks()  # as libtorrent sends them: 16 KiB, running into pads
        bad_piece = blocks[-1][0]
        for p, b, n in blocks:
            data = src.read(p, b, n)
            if transport == "ring":
                placed = c.core.ring_put(data)
                assert placed is not None
                length = n if p != bad_piece else n + 65536  # runs past the piece's end
                parts.append(c.core.write_ring(ih, p, b, placed[0], length, placed[1], False)[1])
            else:
                if p == bad_piece:
                    data += bytes(65536)  # runs past the piece's end
                parts += [c.core.write(ih, p, b, len(data), False)[1], data]
        c._send(*parts)  # one sendmsg: the daemon parses them into few lane batches
        with pytest.raises(OutOfRange) as exc:
            c.wait_writes()
        buffered = c.stats()["write_buffer_bytes"]
        c.flush_all()  # drains the group commit: verified pieces are recorded
        after = c.stats()
        st = c.status(ih)
    bad = len([1 for p, _, _ in blocks if p == bad_piece])
    assert exc.value.others == bad - 1
    assert st["verified_pieces"] == src.meta.num_pieces - 1
    written = after["blocks_written"] - before["blocks_written"]
    calls = after["latency"]["write"]["count"] - before["latency"]["write"]["count"]
    assert written == len(blocks) - bad
    if backend not in ("direct", "uring"):
        assert begun == buffered == 0  # written through, not held
        assert 0 < calls < written
    with Client(daemon.socket) as c2:
        for p in range(src.meta.num_pieces):
            if p != bad_piece:
                size = src.layout.piece_size(p)
                assert c2.read_chunk(ih, p, 0, size) == src.read(p, 0, size)


def test_a_metainfo_larger_than_a_frame_registers_through_a_memfd(tmp_path: Path) -> None:
    """With a 64 KiB frame limit, a 300 KB .torrent goes in a memfd (both clients); a
    descriptor that does not hold what the request says is refused, clearly, and the
    connection goes on; one over max_metainfo_bytes is refused with TOO_LARGE."""
    import asyncio
    import os

    import bencodepy
    from pieced.protocol.client import AsyncClient
    from pieced.protocol.frames import FrameType
    from pieced.protocol.messages import encode_request
    from pieced.storage.errors import TooLarge

    def torrent(n: int, name: bytes) -> bytes:
        info = {b"name": name, b"piece length": 16384, b"length": 16384 * n,
                b"pieces": os.urandom(20 * n)}
        return bencodepy.encode({b"info": info})

    big, big2 = torrent(15_000, b"a.bin"), torrent(15_000, b"b.bin")  # 300 KB each
    huge = torrent(60_000, b"c.bin")  # 1.2 MB
    d = Daemon(tmp_path, env={"PIECED_MAX_FRAME_BYTES": str(64 * 1024),
                              "PIECED_MAX_METAINFO_BYTES": str(1024 * 1024)})
    try:
        with Client(d.socket) as c:
            assert c.core.max_frame == 64 * 1024
            ih = c.register(big, tmp_path / "dl")
            assert c.status(ih)["num_pieces"] == 15_000
            with pytest.raises(TooLarge, match="max_metainfo_bytes"):
                c.register(huge, tmp_path / "dl")

            async def via_async() -> bytes:
                async with AsyncClient(d.socket) as ac:
                    return await ac.register(big2, tmp_path / "dl2")

            ih2 = asyncio.run(via_async())
            assert c.status(ih2)["num_pieces"] == 15_000
            # a descriptor holding less than it is said to: refused, connection kept
            raw = RawConn(d.socket)
            fd = os.memfd_create("short")
            os.write(fd, big[:1000])
            req = encode_request(1, "register", {"metainfo_size": len(big),
                                                 "save_path": str(tmp_path / "dl3")})
            raw.sock.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", [fd]).tobytes())])
            os.close(fd)
            (reply,) = raw.replies(1)
            assert reply.type == FrameType.ERROR
            assert b"does not match the descriptor" in bytes(reply.body.get(b"message", b""))
            raw.sock.sendall(encode_request(2, "register", {"metainfo_size": 10,
                                                            "save_path": "x"}))
            (reply,) = raw.replies(1)  # no descriptor at all
            assert b"exactly one descriptor" in bytes(reply.body.get(b"message", b""))
            # a descriptor that cannot be read (not open for reading, a folder): the
            # client's mistake (BAD_REQUEST), not the disk's (it was IO_ERROR, EBADF)
            (tmp_path / "m.torrent").write_bytes(big)
            for rid, fd in enumerate([os.open(tmp_path / "m.torrent", os.O_WRONLY),
                                      os.open(tmp_path / "m.torrent", os.O_PATH),
                                      os.open(tmp_path, os.O_RDONLY)], start=3):
                size = len(big) if rid < 5 else os.fstat(fd).st_size
                req = encode_request(rid, "register", {"metainfo_size": size,
                                                       "save_path": str(tmp_path / "dl4")})
                raw.sock.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", [fd]).tobytes())])
                os.close(fd)
                (reply,) = raw.replies(1)
                assert reply.type == FrameType.ERROR
                assert reply.body.get(b"code") == ErrorCode.BAD_REQUEST, reply.body
                assert b"cannot be read" in bytes(reply.body.get(b"message", b"")), reply.body
            assert len(c.torrents()) == 2
    finally:
        assert d.stop() == 0, d.stderr()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_http_connections_that_do_nothing_cannot_take_every_descriptor(tmp_path: Path) -> None:
    """Hundreds of HTTP connections that send half a request and wait, against a daemon
    whose descriptors are few: they were kept for ever, the descriptors ran out, and the
    daemon's accept on its Unix socket failed, returned and was called again at once
    (all of a core, a log line each time), its clients shut out for good. Now an accept
    that fails pauses, connections past a bound are closed as they come, and those that
    have not finished a request in 20 s are closed: the clients get in again."""
    import resource

    d = Daemon(tmp_path)
    try:
        resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (200, 200))
        host, port = d.http.rsplit(":", 1)
        held = []
        for _ in range(260):
            with contextlib.suppress(OSError):
                s = socket.create_connection((host, int(port)), timeout=5)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
                held.append(s)
        cpu = _cpu_seconds(d.proc.pid)
        time.sleep(2)
        assert _cpu_seconds(d.proc.pid) - cpu < 1.0  # not spinning on a failed accept
        deadline = time.monotonic() + 40
        while True:
            try:
                with Client(d.socket, timeout=5) as c:
                    assert c.torrents() == []
                break
            except (OSError, TimeoutError):
                assert time.monotonic() < deadline, "the clients are shut out"
        with urllib.request.urlopen(f"http://{d.http}/healthz", timeout=10) as resp:
            assert resp.read() == b"ok\n"
        for s in held:
            s.close()
    finally:
        assert d.stop() == 0, d.stderr()


def _many_files(n: int, name_bytes: int = 150) -> bytes:
    """A legal v1 torrent of ``n`` one-byte files with long names (nothing on disk)."""
    import bencodepy

    files = [{b"length": 1, b"path": [b"d%d" % (i // 1000), b"f" * name_bytes + b"%d" % i]}
             for i in range(n)]
    info = {b"name": b"many", b"piece length": 16384, b"files": files,
            b"pieces": random.Random(1).randbytes(20 * -(-n // 16384))}
    return bencodepy.encode({b"info": info})


def test_a_file_list_that_cannot_fit_a_reply_is_refused_before_it_is_made(
        tmp_path: Path) -> None:
    """A status of a torrent of 200,000 files, whose list no reply could hold: the list
    was made, then encoded in small pieces (2 KB a file), and only then found too large:
    hundreds of MB for one request (2.2 GB for a million files). It is refused first;
    the status without files is answered; a list that fits is encoded in one buffer."""
    from pieced.daemon.server import FILE_ENTRY_BYTES

    d = Daemon(tmp_path)
    try:
        with Client(d.socket, timeout=60) as c:
            many = c.register(_many_files(200_000, 20), tmp_path / "many")
            some = c.register(_many_files(20_000, 20), tmp_path / "some")
            assert c.core.max_frame < 200_000 * FILE_ENTRY_BYTES
            before = _vm_hwm(d.proc.pid)
            with pytest.raises(TooLarge, match="ask with files=0"):
                c.status(many)
            assert c.status(many, files=False)["num_pieces"] >= 1
            assert len(c.status(some)["files"]) == 20_000
            grown = _vm_hwm(d.proc.pid) - before
            assert grown < 48 << 20, grown >> 20
    finally:
        assert d.stop() == 0, d.stderr()


def test_an_http_client_that_reads_nothing_does_not_hold_up_a_stop(tmp_path: Path) -> None:
    """A client asks for a large JSON document (/torrents of a torrent of 40,000 files,
    megabytes) and reads none of it: a SIGTERM then took two minutes (past systemd's stop
    timeout) before the final flush. Now the stop waits a moment for it, then goes on."""
    d = Daemon(tmp_path)
    try:
        with Client(d.socket, timeout=60) as c:
            c.register(_many_files(40_000), tmp_path / "dl")
        host, port = d.http.rstrip("/").rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /torrents HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        time.sleep(3)  # the response is under way, stuck behind a full socket
        started = time.monotonic()
        assert d.stop(timeout=60) == 0, d.stderr()
        assert time.monotonic() - started < 20
        s.close()
    finally:
        d.proc.kill()


def test_whole_piece_requests_cost_memory_within_bounds(tmp_path: Path) -> None:
    """Clients asking for hashes and reads of whole 64 MiB pieces, a dozen calls at once:
    each call held a copy of its piece (and read_piece read it before refusing it as
    too large for a reply): 800 MiB to 1.3 GiB of daemon memory over a 32 MiB budget.
    Hashes are made a part at a time now, and a piece too large for a reply is refused
    before it is read."""
    from tests.conftest import sparse_zero_torrent

    raw = sparse_zero_torrent(tmp_path / "dl", "zeros.bin", 64 << 20, 4)
    d = Daemon(tmp_path, env={"PIECED_CACHE_BYTES": str(32 << 20)})
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
        base = _vm_hwm(d.proc.pid)

        async def run() -> None:
            clients = [await AsyncClient(d.socket).connect() for _ in range(12)]

            async def calls(c: AsyncClient) -> None:
                for p in range(3):
                    assert await c.hash_piece(ih, p)
                    with contextlib.suppress(TooLarge):
                        await c.read_piece(ih, p)
            await asyncio.gather(*(calls(c) for c in clients))
            for c in clients:
                await c.close()

        asyncio.run(run())
        grown = _vm_hwm(d.proc.pid) - base
        assert grown < 200 << 20, grown >> 20
    finally:
        assert d.stop() == 0, d.stderr()


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_whole_v2_hash_must_match_all_of_it_and_status_lists_what_fits(
        tmp_path: Path) -> None:
    """A 64-digit info-hash was cut to its first 40 digits: one with a wrong tail found
    the torrent, and ``pieced rm`` removed it. Hex with spaces in it was taken too. And
    ``pieced status`` of a torrent whose file list does not fit one reply (40,000 files)
    failed (exit 2); it reports the rest, and says where the list is."""
    content = make_payload(tmp_path / "src", 40_000, seed=20)
    d = Daemon(tmp_path)

    def pieced(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pieced.daemon.cli", *args,
                               "--socket", str(d.socket)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)

    def get(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{d.http}{path}", timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    try:
        with Client(d.socket) as c:
            ih = c.register(make_torrent_lt(content, 16384, "v2"), tmp_path / "dl")
            full = c.status(ih, files=False)["info_hash_v2"]
            many = c.register(_many_files(40_000, 200), tmp_path / "many")
        wrong = full[:40] + ("0" * 24 if full[40:] != "0" * 24 else "1" * 24)
        for cmd in (("status", wrong), ("rm", wrong), ("status", full[:20] + " " + full[21:])):
            r = pieced(*cmd)
            assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert get(f"/torrents/{wrong}") == 404
        assert get(f"/torrents/{full}") == 200 and get(f"/torrents/{full[:40]}") == 200
        assert pieced("status", full).returncode == 0
        r = pieced("status", many.hex())
        assert r.returncode == 0 and "too many files to list" in r.stdout, r.stderr
        st = json.loads(pieced("status", many.hex(), "--json").stdout)
        assert st["num_pieces"] == 3 and "files" not in st
        with Client(d.socket) as c:
            assert len(c.torrents()) == 2
    finally:
        assert d.stop() == 0, d.stderr()


def test_event_streams_do_not_shut_monitoring_out(tmp_path: Path) -> None:
    """128 status-page event streams (requests that never end, one client's) held every
    HTTP place: /healthz and /metrics were refused. Past the bound the oldest stream now
    gives its place up."""
    from pieced.daemon.http import MAX_CONNECTIONS

    d = Daemon(tmp_path)
    streams = []
    try:
        host, port = d.http.rsplit(":", 1)
        before = _sockets_of(d.proc.pid)
        for _ in range(3 * MAX_CONNECTIONS):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(f"GET /page/events HTTP/1.1\r\nHost: {d.http}\r\n\r\n".encode())
            streams.append(s)
        time.sleep(2)
        # Streams arriving while one given up was still listed took it for the victim
        # again, each of them: 387 of 400 held (their descriptors, their first event).
        held = _sockets_of(d.proc.pid) - before
        assert held <= MAX_CONNECTIONS, held
        for path in ("/healthz", "/metrics"):
            with urllib.request.urlopen(f"http://{d.http}{path}", timeout=10) as resp:
                assert resp.status == 200
    finally:
        for s in streams:
            s.close()
        assert d.stop() == 0, d.stderr()


def test_a_connection_past_the_bound_is_refused_without_a_traceback(tmp_path: Path) -> None:
    """Every HTTP place held by connections with requests waiting their turn: the
    newcomer is refused (its place would be someone else's), but it was closed before
    its handler started, which failed an assertion of aiohttp's: a traceback in the log
    for every refusal, one a connection for any client that wanted to fill it."""
    from pieced.daemon.http import MAX_CONNECTIONS

    d = Daemon(tmp_path)
    held = []
    try:
        host, port = d.http.rsplit(":", 1)
        ask = f"GET /healthz HTTP/1.1\r\nHost: {d.http}\r\n\r\n".encode()
        for _ in range(MAX_CONNECTIONS + 5):  # (each with 40 requests: busy for a while)
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(ask * 40)
            held.append(s)
        time.sleep(0.5)
        refused = 0
        for _ in range(5):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(ask)
                try:
                    refused += not s.recv(100)
                except ConnectionError:
                    refused += 1
        assert refused, "no newcomer was refused: the bound was not reached"
    finally:
        for s in held:
            s.close()
        assert d.stop() == 0, d.stderr()
    assert "Traceback" not in d.stderr(), d.stderr()[-2000:]


def _sockets_of(pid: int) -> int:
    """How many sockets a process holds descriptors of."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            n += fd.readlink().name.startswith("socket:")
    return n


def test_a_stop_asked_for_during_start_up_is_a_clean_stop(tmp_path: Path) -> None:
    """A SIGTERM while the daemon loads its state (systemd's stop, or its start timeout,
    on a big library) killed it on the spot: a crash's restart, and the files' stamps of
    the last clean stop no longer counted. Now it finishes starting, then stops cleanly."""
    import signal

    d = Daemon(tmp_path)
    with Client(d.socket) as c:
        c.register(_many_files(60_000, 20), tmp_path / "dl")
    assert d.stop() == 0, d.stderr()
    clean, lock = tmp_path / "var" / "clean", str(tmp_path / "var" / "lock")
    assert clean.exists()
    proc = subprocess.Popen([sys.executable, "-m", "pieced.daemon.cli", "run", "--http-port", "0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _holds_open(proc.pid, lock):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)  # it holds its state folder: it is loading it
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    assert clean.exists()


def _holds_open(pid: int, path: str) -> bool:
    """Whether the process has ``path`` open (its descriptors come and go meanwhile)."""
    with contextlib.suppress(FileNotFoundError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    return True
    return False


def _rss_shmem_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    raise AssertionError("no RssShmem")


def test_a_ring_read_where_the_client_never_wrote_costs_the_daemon_nothing(
        tmp_path: Path) -> None:
    """A client attaches a sparse ring (a memfd of 1 GiB it never wrote) and sends
    WRITE_RING blocks from its empty parts: each page the daemon read was a new page of
    zeros, memory of the daemon's (its RssShmem grew by the gigabyte in the hunt that
    found it, and stayed while the client did). Such blocks are refused now, nothing
    written; blocks the client wrote still go; a ring over max_ring_bytes is refused."""
    import fcntl
    import mmap

    content = make_payload(tmp_path / "src", 4 * 65536, seed=31)
    raw_torrent = make_torrent_lt(content, 65536, "v1")
    src = Source(raw_torrent, tmp_path / "src")
    d = Daemon(tmp_path, env={"PIECED_MAX_RING_BYTES": str(2048 * MiB)})
    try:
        with Client(d.socket) as c:
            ih = c.register(raw_torrent, tmp_path / "dl")
        raw = RawConn(d.socket)
        size = 1024 * MiB
        fd = os.memfd_create("sparse", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        ring = mmap.mmap(fd, size)
        raw.sock.sendmsg([encode_request(1, "attach_ring", {"size": size})],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
        (reply,) = raw.replies(1)
        assert reply.type == FrameType.RESPONSE, reply
        before = _rss_shmem_kib(d.proc.pid)
        step = 1 << 20
        rid = 10
        for k in range(256):  # 256 MiB of never-written ring, a block a MiB
            raw.sock.sendall(encode_write_ring(rid + k, ih, 0, 0, 4096 + k * step, 16384))
        replies = raw.replies(256)
        assert all(r.type == FrameType.ERROR and isinstance(decode_error(r.body), BadRequest)
                   for r in replies), replies[0]
        assert "nothing written" in decode_error(replies[0].body).message
        assert _rss_shmem_kib(d.proc.pid) - before < 16 * 1024  # not 256 MiB
        with Client(d.socket) as c:
            assert c.status(ih)["verified_pieces"] == 0
        # written blocks, one of them across a page the client wrote only in part
        at = 8 * step + 100
        for i, (p, b, n) in enumerate(src.blocks()):
            ring[at : at + n] = src.read(p, b, n)
            raw.sock.sendall(encode_write_ring(1000 + i, ih, p, b, at, n))
            at += n
        replies = raw.replies(len(src.blocks()))
        assert all(r.type == FrameType.ACK for r in replies), replies
        with Client(d.socket) as c:
            c.flush_all()
            assert c.status(ih)["verified_pieces"] == src.meta.num_pieces
        raw.close()
        ring.close()
        os.close(fd)
    finally:
        assert d.stop() == 0, d.stderr()
    (tmp_path / "small").mkdir()
    small = Daemon(tmp_path / "small", env={"PIECED_MAX_RING_BYTES": str(1 << 20)})
    try:
        raw = RawConn(small.socket)
        fd = os.memfd_create("big", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 2 << 20)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        raw.sock.sendmsg([encode_request(1, "attach_ring", {"size": 2 << 20})],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
        (reply,) = raw.replies(1)
        assert reply.type == FrameType.ERROR
        err = decode_error(reply.body)
        assert isinstance(err, TooLarge) and "max_ring_bytes" in err.message, err
        os.close(fd)
        empty = os.memfd_create("empty", os.MFD_ALLOW_SEALING)  # said to match, but empty
        fcntl.fcntl(empty, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        raw.sock.sendmsg([encode_request(2, "attach_ring", {"size": 0})],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [empty]).tobytes())])
        (reply,) = raw.replies(1)
        err = decode_error(reply.body)
        assert isinstance(err, BadRequest) and "at least one" in err.message, err
        raw.close()
        os.close(empty)
    finally:
        assert small.stop() == 0, small.stderr()


def test_the_start_up_warning_names_only_the_bounds_it_lowered(
        caplog: pytest.LogCaptureFixture) -> None:
    """20,000 descriptors allowed: max_open_files is lowered, max_clients not; the
    warning said "max_clients 256 -> 256" all the same."""
    from pieced.config.settings import Settings
    from pieced.daemon.main import fit_descriptors

    with caplog.at_level(logging.WARNING, logger="pieced"):
        fitted = fit_descriptors(Settings(), 20000).settings
    assert fitted.max_clients == 256 and fitted.max_open_files < 16384
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"max_open_files 16384 -> {fitted.max_open_files}" in said, said
    assert "max_clients" not in said, said


def test_a_low_descriptor_limit_lowers_the_client_bound_instead_of_starving_clients(
        tmp_path: Path) -> None:
    """Under a descriptor limit too low for max_clients and max_open_files (400 here),
    idle clients took the last descriptors: the writes of a client already connected
    failed with EMFILE, recorded as its torrent's errors, and new clients waited
    unanswered. The bounds are lowered to fit at start-up, said in the log: a client
    past them is refused at once, and the others' writes go on."""
    from pieced.config.settings import Settings
    from pieced.daemon.main import fit_descriptors

    content = make_payload(tmp_path / "src", 40 * 16384, seed=33)
    raw = make_torrent_lt(content, 16384, "v1")
    src = Source(raw, tmp_path / "src")
    d = Daemon(tmp_path, wrap=("prlimit", "--nofile=400:400"))
    clients = fit_descriptors(Settings(), 400).settings.max_clients
    assert 1 < clients < 256
    held: list[Client] = []
    try:
        with Client(d.socket) as c:
            ih = c.register(raw, tmp_path / "dl")
            c.attach_ring(1 << 20)
            for _ in range(clients - 1):  # idle clients, each with its ring
                idle = Client(d.socket)
                idle.attach_ring(1 << 20)
                held.append(idle)
            with pytest.raises(Exception, match="too many clients"):
                Client(d.socket, timeout=10)
            for p, b, n in src.blocks():
                c.write_chunk(ih, p, b, src.read(p, b, n))
            c.flush_all()
            st = c.status(ih)
            assert st["verified_pieces"] == src.meta.num_pieces and not st["errors"]
    finally:
        for idle in held:
            idle.close()
        assert d.stop() == 0
    assert "max_clients 256 ->" in d.stderr()


def test_a_descriptor_limit_of_a_hundred_leaves_the_daemon_reachable(tmp_path: Path) -> None:
    """Under a limit of a hundred descriptors, the save folders the daemon keeps open
    (64) and its HTTP connections (128) were not fitted to it: torrents in folders of
    their own took the descriptors until every register failed ("Too many open files"),
    and a restart with them saved accepted no client at all. They are fitted now; and a
    limit too low for one client stops the start, saying so."""
    wrap = ("prlimit", "--nofile=100:100")
    d = Daemon(tmp_path, wrap=wrap)
    ihs = []
    try:
        with Client(d.socket) as c:
            for k in range(40):  # (each its own torrent, each in a folder of its own)
                content = make_payload(tmp_path / f"src{k}", 2 * 16384, seed=100 + k)
                raw = make_torrent_lt(content, 16384, "v1")
                src = Source(raw, tmp_path / f"src{k}")
                ihs.append(ih := c.register(raw, tmp_path / f"dl{k}"))
                for p, b, n in src.blocks():
                    c.write_chunk(ih, p, b, src.read(p, b, n))
            c.flush_all()
            assert [c.status(ih)["verified_pieces"] for ih in ihs] == [2] * 40
    finally:
        assert d.stop() == 0
    d = Daemon(tmp_path, wrap=wrap)
    try:
        with Client(d.socket, timeout=20) as c:
            assert [c.status(ih)["verified_pieces"] for ih in ihs] == [2] * 40
    finally:
        assert d.stop() == 0
    refused = subprocess.run(["prlimit", "--nofile=64:64", sys.executable, "-m",
                              "pieced.daemon.cli", "run", "--http-port", "0"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "64 descriptors allowed (RLIMIT_NOFILE)" in refused.stderr, refused.stderr


def test_the_hello_exchange_of_the_protocol_document_is_what_a_daemon_sends(tmp_path: Path) -> None:
    """docs/protocol.md's worked HELLO exchange, its bytes sent to a daemon just started:
    its reply is the document's, byte for byte (the document once showed a reply
    without ``conn``)."""
    import re

    doc = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = doc[doc.index("### 4.1 Worked example") : doc.index("## 5. Requests")]
    dumps = [bytes.fromhex("".join(line[6:53] for line in block.strip().splitlines()))
             for block in re.findall(r"```\n(.*?)```", section, re.S)]
    assert len(dumps) == 2
    hello_out, hello_back = dumps
    d = Daemon(tmp_path)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d.socket))
            s.settimeout(10)
            s.sendall(hello_out)
            got = b""
            while len(got) < 4 or len(got) < 4 + int.from_bytes(got[:4], "big"):
                chunk = s.recv(4096)
                assert chunk, "the daemon closed the connection"
                got += chunk
        assert got == hello_back
    finally:
        assert d.stop() == 0, d.stderr()
