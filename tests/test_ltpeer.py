"""tests/ltpeer.py: a real libtorrent seed and leecher on loopback.

libtorrent -> libtorrent transfers (connected by hand, no tracker) for every kind of
torrent the pieced peer has to serve, plus raw-socket checks of the wire facts that
ltpeer.py writes down, so that a libtorrent upgrade that changes them fails here.
"""

from __future__ import annotations

import shutil
import socket
import struct
import time
from pathlib import Path

import libtorrent as lt
import pytest

from tests.ltpeer import LtPeer, handshake_info_hash, make_torrent_v1_pads
from tests.realtools import corrupt, make_payload, make_torrent_lt

PIECE = 32768
# About 1.3 MiB: files that end mid-piece, one smaller than a block, an empty one.
FILES = {
    "big.bin": 700_000,
    "sub/mid.bin": 300_001,
    "sub/deeper/tiny": 5,
    "empty": 0,
    "tail.dat": 333_333,
}
KINDS = ["v1", "v1-pads", "v2", "hybrid"]

MSG_EXTENDED, MSG_HAVE_ALL, MSG_UNCHOKE, MSG_SUGGEST = 20, 14, 1, 13


def make_torrent(content: Path, kind: str) -> bytes:
    if kind == "v1-pads":
        return make_torrent_v1_pads(content, PIECE)
    assert kind in ("v1", "v2", "hybrid")
    return make_torrent_lt(content, PIECE, kind)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(save path, content) of the seed's data, shared by the tests of this module."""
    save = tmp_path_factory.mktemp("seed")
    return save, make_payload(save, FILES, seed=11)


def data_files(torrent: bytes) -> list[tuple[str, int]]:
    """(path, size) of the torrent's files, pad files left out."""
    fs = lt.torrent_info(torrent).layout()
    return [
        (fs.file_path(i), fs.file_size(i))
        for i in range(fs.num_files())
        if not fs.file_flags(i) & lt.file_storage.flag_pad_file
    ]


def v1_pad_entries(torrent: bytes) -> int:
    """How many BEP 47 pad files the info dict's v1 ``files`` list has."""
    info = lt.bdecode(torrent)[b"info"]
    return sum(1 for f in info.get(b"files", []) if b"p" in f.get(b"attr", b""))


def assert_same_data(torrent: bytes, seed_dir: Path, leech_dir: Path) -> None:
    files = data_files(torrent)
    assert sorted(size for _, size in files) == sorted(FILES.values())
    for path, size in files:
        got = leech_dir / path
        assert got.is_file(), f"{path} missing in the leecher's save path"
        assert got.stat().st_size == size
        assert got.read_bytes() == (seed_dir / path).read_bytes(), f"{path} differs"


def assert_clean_transfer(seed: LtPeer, leech: LtPeer, torrent: bytes) -> None:
    total = sum(size for _, size in data_files(torrent))
    ss, ls = seed.status(), leech.status()
    assert ls["num_pieces"] == ls["total_pieces"] == lt.torrent_info(torrent).num_pieces()
    assert ls["progress"] == 1.0
    assert ls["state"] in ("finished", "seeding")
    assert seed.hash_failures() == leech.hash_failures() == 0
    assert ls["total_failed_bytes"] == 0
    assert ss["errors"] == [] and ls["errors"] == []
    assert ls["total_redundant_bytes"] == 0
    # Everything came over the wire from the seed. Blocks that are partly pad are sent
    # whole when pieces are v1-hashed; v2 requests stop at the end of each file.
    got, sent = ls["total_payload_download"], ss["total_payload_upload"]
    assert got <= sent <= got + PIECE
    if v1_pad_entries(torrent):
        assert total < got
    else:
        assert got == total


# --------------------------------------------------------------------------- transfers


@pytest.mark.parametrize("kind", KINDS)
def test_transfer(payload: tuple[Path, Path], tmp_path: Path, kind: str) -> None:
    save, content = payload
    torrent = make_torrent(content, kind)
    # The kinds are what they claim to be: pad files only where they were asked for.
    assert (v1_pad_entries(torrent) > 0) == (kind in ("v1-pads", "hybrid"))
    ih = lt.torrent_info(torrent).info_hashes()
    assert (ih.has_v1(), ih.has_v2()) == {
        "v1": (True, False),
        "v1-pads": (True, False),
        "v2": (False, True),
        "hybrid": (True, True),
    }[kind]

    leech_dir = tmp_path / "leech"
    with (
        LtPeer(torrent, save, seed=True) as seed,
        LtPeer(torrent, leech_dir, seed=False, log_peer=True) as leech,
    ):
        assert seed.status()["state"] == "seeding"
        assert leech.status()["num_pieces"] == 0
        assert seed.port != leech.port
        leech.connect("127.0.0.1", seed.port)
        leech.wait_finished(20)
        assert_clean_transfer(seed, leech, torrent)
        log = leech.peer_log()
        assert any("<== PIECE" in line for line in log)
        # Given the whole .torrent (piece layers too), a v2 leecher needs no hashes.
        assert not any("HASH_REQUEST" in line for line in log)
        assert leech.suggests_received() == 0
    assert_same_data(torrent, save, leech_dir)


def test_seed_connects_out(payload: tuple[Path, Path], tmp_path: Path) -> None:
    """A seed can dial a peer that only listens (how a pieced leecher gets served)."""
    save, content = payload
    torrent = make_torrent(content, "hybrid")
    with (
        LtPeer(torrent, save, seed=True) as seed,
        LtPeer(torrent, tmp_path / "leech", seed=False) as leech,
    ):
        seed.connect("127.0.0.1", leech.port)
        leech.wait_finished(20)
        assert_clean_transfer(seed, leech, torrent)
    assert_same_data(torrent, save, tmp_path / "leech")


def test_fixed_port_and_close(payload: tuple[Path, Path], tmp_path: Path) -> None:
    save, content = payload
    torrent = make_torrent(content, "v1")
    with LtPeer(torrent, save, seed=True) as first:
        port = first.port
    # close() let go of the port: a new session can listen on it at once.
    with LtPeer(torrent, save, seed=True, port=port) as again:
        assert again.port == port
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    again.close()  # a second close is harmless


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_hash_failures_are_counted(payload: tuple[Path, Path], tmp_path: Path, kind: str) -> None:
    """Data that goes bad under a running seed is sent anyway and fails at the leecher."""
    save, content = payload
    torrent = make_torrent(content, kind)
    seed_dir = tmp_path / "seed"
    shutil.copytree(save, seed_dir)
    with LtPeer(torrent, seed_dir, seed=True) as seed:
        corrupt(seed_dir / content.name / "big.bin", 5 * PIECE + 100)
        with LtPeer(torrent, tmp_path / "leech", seed=False) as leech:
            leech.connect("127.0.0.1", seed.port)
            deadline = time.monotonic() + 10
            while leech.hash_failures() == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert leech.hash_failures() >= 1
            status = leech.status()
            assert status["hash_failures"] == leech.hash_failures()
            assert status["total_failed_bytes"] >= PIECE
            assert status["num_pieces"] < status["total_pieces"]
            assert any("hash" in e for e in status["errors"])


def test_seed_without_data_is_refused(payload: tuple[Path, Path], tmp_path: Path) -> None:
    _, content = payload
    torrent = make_torrent(content, "v1")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"seed is missing data.*has 0 of"):
        LtPeer(torrent, tmp_path / "nothing", seed=True)
    assert time.monotonic() - t0 < 10


def test_wait_finished_times_out_with_status(payload: tuple[Path, Path], tmp_path: Path) -> None:
    _, content = payload
    torrent = make_torrent(content, "v2")
    with LtPeer(torrent, tmp_path / "leech", seed=False) as lonely:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=r"not finished after 0\.3s.*'progress': 0\.0"):
            lonely.wait_finished(0.3)
        assert time.monotonic() - t0 < 5
        assert lonely.status()["num_peers"] == 0


# --------------------------------------------------------------------------- raw wire


def handshake(info_hash: bytes, *, v2_bit: bool = False) -> bytes:
    reserved = bytearray(8)
    reserved[5] |= 0x10  # extension protocol
    reserved[7] |= 0x04  # fast extension
    if v2_bit:
        reserved[7] |= 0x10
    return b"\x13BitTorrent protocol" + bytes(reserved) + info_hash + b"-PT0001-abcdefghijkl"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_message(sock: socket.socket) -> bytes:
    """The next message's body (id first), keep-alives skipped."""
    while True:
        (n,) = struct.unpack(">I", recv_exact(sock, 4))
        if n:
            return recv_exact(sock, n)


def message(msg_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", 1 + len(payload), msg_id) + payload


def probe(port: int, info_hash: bytes, *, v2_bit: bool = False) -> tuple[bytes, bytes, list[int]]:
    """Handshake with the seed on ``port``; its reserved bytes, its info hash and the ids
    of its first three messages."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(handshake(info_hash, v2_bit=v2_bit))
        hs = recv_exact(sock, 68)
        assert hs[:20] == b"\x13BitTorrent protocol"
        ids = [recv_message(sock)[0] for _ in range(3)]
        return hs[20:28], hs[28:48], ids


@pytest.mark.parametrize("kind", KINDS)
def test_seed_handshake(payload: tuple[Path, Path], kind: str) -> None:
    save, content = payload
    torrent = make_torrent(content, kind)
    ih = lt.torrent_info(torrent).info_hashes()
    expect = ih.v1.to_bytes() if kind != "v2" else ih.v2.to_bytes()[:20]
    assert handshake_info_hash(torrent) == expect
    with LtPeer(torrent, save, seed=True) as seed:
        reserved, their_hash, ids = probe(seed.port, expect)
        assert their_hash == expect
        assert ids == [MSG_EXTENDED, MSG_HAVE_ALL, MSG_UNCHOKE]
        assert reserved[5] & 0x10 and reserved[7] & 0x04
        # libtorrent offers the v2 upgrade for hybrid torrents only.
        assert bool(reserved[7] & 0x10) == (kind == "hybrid")


def test_hybrid_seed_switches_to_v2_hash(payload: tuple[Path, Path]) -> None:
    save, content = payload
    torrent = make_torrent(content, "hybrid")
    ih = lt.torrent_info(torrent).info_hashes()
    v1, v2_truncated = ih.v1.to_bytes(), ih.v2.to_bytes()[:20]
    with LtPeer(torrent, save, seed=True) as seed:
        for ours in (v1, v2_truncated):
            reserved, their_hash, ids = probe(seed.port, ours, v2_bit=True)
            assert their_hash == v2_truncated
            assert not reserved[7] & 0x10
            assert ids == [MSG_EXTENDED, MSG_HAVE_ALL, MSG_UNCHOKE]


def test_v1_seed_drops_a_v2_handshake(payload: tuple[Path, Path]) -> None:
    save, content = payload
    torrent = make_torrent(content, "v1")
    with LtPeer(torrent, save, seed=True, log_peer=True) as seed:
        with pytest.raises((EOFError, ConnectionError)):
            probe(seed.port, handshake_info_hash(torrent), v2_bit=True)
        seed.wait_log("invalid info-hash")


def test_suggests_received(payload: tuple[Path, Path], tmp_path: Path) -> None:
    """A raw-socket seed suggests pieces; the leecher's peer log counts them."""
    _, content = payload
    torrent = make_torrent(content, "v1")
    info_hash = handshake_info_hash(torrent)
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        LtPeer(torrent, tmp_path / "leech", seed=False, log_peer=True) as leech,
    ):
        server.settimeout(10)
        leech.connect("127.0.0.1", server.getsockname()[1])
        sock, _ = server.accept()
        with sock:
            sock.settimeout(5)
            hs = recv_exact(sock, 68)
            assert hs[28:48] == info_hash
            suggests = b"".join(message(MSG_SUGGEST, struct.pack(">I", i)) for i in (3, 1, 4))
            sock.sendall(handshake(info_hash) + message(MSG_HAVE_ALL) + suggests)
            lines = leech.wait_log("<== SUGGEST_PIECE", count=3)
            assert [line.split("<== ")[1] for line in lines] == [
                f"SUGGEST_PIECE [ piece: {i} ]" for i in (3, 1, 4)
            ]
            assert leech.suggests_received() == 3
            assert leech.status()["num_peers"] == 1
        assert leech.hash_failures() == 0
