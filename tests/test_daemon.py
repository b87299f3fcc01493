"""The daemon as a subprocess, driven through its socket by the real client library."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pieced.protocol.client import AsyncClient, Client
from pieced.protocol.frames import HEADER, FrameType, encode_control, encode_write_header
from pieced.protocol.messages import hello, to_wire
from pieced.storage.errors import BadRequest, OutOfRange, PiecedError, UnknownTorrent
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon
from tests.realtools import lt_recheck, make_torrent_lt
from tests.test_disk import Source


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


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_three_clients_both_transports(daemon: Daemon, odd_payload: tuple[Path, Path], kind: Any) -> None:
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
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                with Client(daemon.socket) as c:
                    if k == 2:
                        c.attach_ring(256 * 1024 + 4096)  # odd size: blocks wrap around the end
                    for i, (p, b, n) in enumerate(blocks):
                        if i % 3 != k:
                            continue
                        data = src.read(p, b, n)
                        if k == 2 or (k == 1 and i % 2):
                            c.write_block_direct(ih, p, b, data)
                        else:
                            c.write_chunk(ih, p, b, data)
                    c.wait_writes()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        n = src.meta.num_pieces
        while len(events) < n:
            c0.stats()  # pumps the socket, delivering events
            time.sleep(0.01)
        assert sorted(f["piece"] for name, f in events if name == "piece_verified") == list(range(n))
        st = c0.status(ih)
        assert st["verified_pieces"] == n
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


def test_corrupt_piece_fails_and_other_torrents_go_on(daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
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


def test_bad_input_gets_errors_and_disturbs_no_one(daemon: Daemon, odd_payload: tuple[Path, Path]) -> None:
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
        with pytest.raises(UnknownTorrent):
            c.status(bytes(20))
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
    families = {f.name: f for f in text_string_to_metric_families(get("/metrics").decode())}
    assert families["pieced_bytes_read"].samples[0].value == stats["bytes_read"]
    assert "pieced_read_latency_seconds" in families and "pieced_connected_clients" in families

    r = pieced("rm", ih, *sock)
    assert r.returncode == 0
    assert json.loads(pieced("ls", "--json", *sock).stdout) == []
    assert (content / "a.bin").exists()  # rm without --delete-files keeps the payload
    r = pieced("status", "00" * 20, *sock)
    assert r.returncode == 2 and "unknown info_hash" in r.stderr
    json.loads(pieced("stats", "--json", *sock).stdout)


def test_sigterm_flushes_buffered_pieces(tmp_path: Path, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 65536, "v1")
    src = Source(raw, save)
    d = Daemon(tmp_path, env={"PIECED_SYNC_WINDOW_MS": "1000"})
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
