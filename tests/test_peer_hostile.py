"""pieced-peer, seeding, against peers that break the rules: each is answered as the
rules say or dropped, and a libtorrent leecher beside them still gets every byte."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import bencodepy
import pytest
from pieced.peer import wire
from pieced.peer.conn import MAX_PEER_QUEUE
from pieced.protocol.client import Client
from pieced.storage.metainfo import Metainfo, parse

from tests.conftest import Daemon
from tests.ltpeer import LtPeer
from tests.realtools import make_payload, make_torrent_lt
from tests.test_daemon import _cpu_seconds
from tests.test_peer_libtorrent import Seeding, _same_tree, leecher_gets_every_byte, peer_cmd


class RawPeer:
    """A hand-driven peer on a plain socket, speaking through the codec under test's
    encoders (the bytes are the protocol's; the parser checks what comes back)."""

    def __init__(self, port: int, rcvbuf: int = 0) -> None:
        """``rcvbuf``: a receive buffer that small, set before connecting (so that the
        window offered is that small from the start)."""
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.parser = wire.Parser(handshake=True)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def events(self, until: float = 2.0) -> tuple[list[wire.Event], bool]:
        """What arrives within ``until`` seconds of quiet, and whether the peer closed."""
        out: list[wire.Event] = []
        self.sock.settimeout(until)
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return out, False
            except ConnectionResetError:
                return out, True
            if not data:
                return out, True
            out.extend(self.parser.feed(data))

    def close(self) -> None:
        self.sock.close()


def _v1(tmp_path: Path, files: dict[str, int], piece: int, seed: int
        ) -> tuple[Path, bytes, Metainfo, Path]:
    """A v1 torrent of ``files`` in ``tmp_path/seed``: (content, metainfo bytes, parsed,
    .torrent file)."""
    content = make_payload(tmp_path / "seed", files, seed=seed)
    raw = make_torrent_lt(content, piece, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    return content, raw, parse(raw), torrent


def _hybrid(tmp_path: Path, files: dict[str, int], piece: int, seed: int
            ) -> tuple[Path, bytes, Metainfo, Path, list[bytes]]:
    """A hybrid torrent of ``files`` in ``tmp_path/seed``: (content, metainfo bytes, parsed,
    .torrent file, the files' pieces roots), for peers that send hash requests too."""
    content = make_payload(tmp_path / "seed", files, seed=seed)
    raw = make_torrent_lt(content, piece, "hybrid")
    meta = parse(raw)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    return content, raw, meta, torrent, [f.pieces_root for f in meta.files
                                         if f.pieces_root is not None]


def test_peers_that_break_the_rules(tmp_path: Path) -> None:
    piece = 32768
    files = {"a.bin": 20 * piece + 99, "b.bin": 5000}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=31)
    ih = meta.info_hash
    me = b"-XX0001-" + bytes(12)
    fast = wire.make_reserved(extended=False, fast=True)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        # 1. a torrent it does not serve: dropped without a word
        p = RawPeer(seeding.port)
        p.send(wire.handshake(bytes(20), me, fast))
        got, closed = p.events()
        assert closed and not got
        p.close()

        # 2. a length prefix of 2 GiB after the handshake: dropped
        p = RawPeer(seeding.port)
        p.send(wire.handshake(ih, me, fast))
        p.send(struct.pack(">I", 1 << 31))
        got, closed = p.events()
        assert closed  # (the answer to its handshake may not even have left)
        p.close()

        # 3. fast messages without the fast bit: dropped
        p = RawPeer(seeding.port)
        p.send(wire.handshake(ih, me, bytes(8)) + wire.have_all())
        got, closed = p.events()
        assert closed and not any(isinstance(e, (wire.HaveAll, wire.HaveNone)) for e in got)
        p.close()

        # 4. requests while choked, with fast: every one rejected, exactly as asked
        p = RawPeer(seeding.port)
        p.send(wire.handshake(ih, me, fast) + wire.have_none())
        full = meta.num_pieces - 1  # every piece but the short last one
        asks = [(i % full, (i // full) % 2 * 16384, 16384) for i in range(40)]
        p.send(b"".join(wire.request(*a) for a in asks))
        got, closed = p.events()
        assert not closed
        rejects = [(e.piece, e.begin, e.length) for e in got if isinstance(e, wire.RejectRequest)]
        assert sorted(rejects) == sorted(asks)
        assert any(isinstance(e, wire.HaveAll) for e in got)
        # ... then interested, unchoked, and a request past the end of a piece: dropped
        p.send(wire.interested())
        got, closed = p.events()
        assert any(isinstance(e, wire.Unchoke) for e in got)
        p.send(wire.request(0, piece - 100, 16384))
        got, closed = p.events()
        assert closed
        p.close()

        # 5. a flood of requests over the queue bound: the surplus rejected, the rest served
        p = RawPeer(seeding.port)
        p.send(wire.handshake(ih, me, fast) + wire.have_none() + wire.interested())
        got, _ = p.events(1.0)
        assert any(isinstance(e, wire.Unchoke) for e in got)
        flood = [(i % full, 0, 16384) for i in range(MAX_PEER_QUEUE + 400)]
        p.send(b"".join(wire.request(*a) for a in flood))
        pieces = rejects_n = 0
        deadline = time.monotonic() + 30
        while pieces + rejects_n < len(flood) and time.monotonic() < deadline:
            got, closed = p.events(2.0)
            assert not closed
            pieces += sum(isinstance(e, wire.Piece) for e in got)
            rejects_n += sum(isinstance(e, wire.RejectRequest) for e in got)
            if not got:
                break
        assert pieces + rejects_n == len(flood) and pieces > 0 and rejects_n > 0
        p.close()

        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_downloading_peer_shrugs_off_a_rogue_seeder(tmp_path: Path) -> None:
    """pieced-peer downloads from a libtorrent seeder and from a rogue one that answers
    requests with blocks of the wrong length and blocks never asked for, then names a
    piece that does not exist: the rogue is dropped, nothing it sent is stored, and the
    download completes with the real bytes."""
    import json
    import subprocess
    import threading

    from tests.test_peer_libtorrent import peer_cmd

    piece = 32768
    files = {"a.bin": 30 * piece + 7}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=32)
    listener = socket.create_server(("127.0.0.1", 0))
    rogue_port = listener.getsockname()[1]
    seen: dict[str, int] = {"requests": 0}

    def rogue() -> None:
        conn, _ = listener.accept()
        parser = wire.Parser(handshake=True)
        conn.settimeout(10)
        try:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    return
                for ev in parser.feed(data):
                    if isinstance(ev, wire.Handshake):
                        conn.sendall(wire.handshake(ev.info_hash, b"-RG0001-" + bytes(12),
                                                    wire.make_reserved(extended=False))
                                     + wire.have_all() + wire.unchoke())
                    elif isinstance(ev, wire.Request):
                        seen["requests"] += 1
                        junk = bytes([0xEE]) * 100
                        # the block asked for, cut short; and one nobody asks for (peers
                        # ask for blocks at multiples of 16 KiB)
                        conn.sendall(wire.piece(ev.piece, ev.begin, junk)
                                     + wire.piece(ev.piece, 100, bytes([0xEE]) * 16384))
                        if seen["requests"] >= 20:
                            conn.sendall(wire.have(meta.num_pieces + 5))
        except OSError:
            return
        finally:
            conn.close()

    t = threading.Thread(target=rogue, daemon=True)
    t.start()
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as good:
            r = subprocess.run(
                peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer", f"127.0.0.1:{rogue_port}",
                         "--peer", f"127.0.0.1:{good.port}"),
                capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["complete"] and summary["pieces_failed"] == 0, summary
        assert seen["requests"] > 0  # the rogue was asked, and what it sent was not taken
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        listener.close()
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("when", ["before", "at once", "during", "other family"])
def test_a_stranger_claiming_a_seeders_peer_id_does_not_cut_it_off(
        tmp_path: Path, when: str) -> None:
    """A seeder whose peer id stays the same from one connection to the next (as
    Transmission's, or pieced-peer's own) and sorts above ours: a stranger dials our
    listening port claiming that id (anyone who connects to the seeder reads it), says it
    has nothing, and stays. Its claim closed our connection to the seeder, which was
    never dialled again, and the download stalled for good. Now the stranger's
    connection goes (it does not say it listens where we dialled), whether it came
    before we reached the seeder, right after (``at once``: the seeder unchokes us 2 s
    later, no block has come) or during the download; the seeder is dialled once.
    ``other family``: the seeder is dialled over IPv6, the stranger comes from another
    IPv4 address saying (BEP 10 ``p``) it listens at the seeder's port: nothing is asked
    of it, and our connection to the seeder stays."""
    from tests.test_peer_libtorrent import listening

    piece = 65536
    files = {"a.bin": 40 * piece + 11}
    content, _, meta, torrent = _v1(tmp_path, files, piece, seed=41)
    blob = (content / "a.bin").read_bytes()
    seeder_id = b"-TR3000-" + b"s" * 12  # (above pieced-peer's "-PZ...")
    listener = (socket.create_server(("::1", 0), family=socket.AF_INET6)
                if when == "other family" else socket.create_server(("127.0.0.1", 0)))
    seeder_at = (f"[::1]:{listener.getsockname()[1]}" if when == "other family"
                 else f"127.0.0.1:{listener.getsockname()[1]}")
    listener.settimeout(60)
    served = {"blocks": 0, "dials": 0}
    up = threading.Event()

    def seed(conn: socket.socket) -> None:
        parser = wire.Parser(handshake=True)
        try:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    return
                out = []
                for ev in parser.feed(data):
                    if isinstance(ev, wire.Handshake):
                        conn.sendall(wire.handshake(ev.info_hash, seeder_id,
                                                    wire.make_reserved()))
                        if when in ("at once", "other family"):
                            time.sleep(2)  # (the stranger comes meanwhile)
                        out += [wire.have_all(), wire.unchoke()]
                    elif isinstance(ev, wire.Request):
                        time.sleep(0.01)  # (a download of a few seconds)
                        at = ev.piece * piece + ev.begin
                        out.append(wire.piece(ev.piece, ev.begin, blob[at : at + ev.length]))
                        served["blocks"] += 1
                conn.sendall(b"".join(out))
        except OSError:
            return
        finally:
            conn.close()

    def accept() -> None:
        up.wait()
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                served["dials"] += 1
                threading.Thread(target=seed, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    d = Daemon(tmp_path)
    stranger: RawPeer | None = None
    try:
        proc, port = listening(torrent, tmp_path / "dl", d, "--peer", seeder_at)
        if when != "before":
            up.set()
            deadline = time.monotonic() + 30
            while served["blocks"] < 10 if when == "during" else served["dials"] < 1:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            time.sleep(0.3)  # (its handshake has come)
        if when == "other family":
            stranger = RawPeer.__new__(RawPeer)
            stranger.sock = socket.socket()
            stranger.sock.bind(("127.0.0.2", 0))
            stranger.sock.connect(("127.0.0.1", port))
            stranger.parser = wire.Parser(handshake=True)
            stranger.send(wire.handshake(meta.info_hash, seeder_id, wire.make_reserved())
                          + wire.extended(0, bencodepy.encode(
                              {b"m": {}, b"p": listener.getsockname()[1]}))
                          + wire.have_none())
        else:
            stranger = RawPeer(port)
            stranger.send(wire.handshake(meta.info_hash, seeder_id, wire.make_reserved())
                          + wire.have_none())
        up.set()
        out, err = proc.communicate(timeout=90)  # (the stranger stays connected)
        assert proc.returncode == 0, err
        assert json.loads(out)["complete"]
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert served["dials"] == 1, err  # (its connection was never closed)
    finally:
        if stranger is not None:
            stranger.close()
        listener.close()
        assert d.stop() == 0, d.stderr()


def test_a_stranger_claiming_a_leechers_peer_id_does_not_take_its_place(
        tmp_path: Path) -> None:
    """A leecher with a stable peer id connects to pieced-peer --seed; before it asks
    for anything, a stranger dials in claiming that id. The stranger's connection is the
    one closed (two connections that dialled us are never dials crossing: the newer
    goes), not the leecher's, which then gets what it asks for."""
    piece = 32768
    files = {"a.bin": 8 * piece}
    _, _, meta, torrent = _v1(tmp_path, files, piece, seed=42)
    leecher_id = b"-TR3000-" + b"l" * 12
    hello = wire.handshake(meta.info_hash, leecher_id, wire.make_reserved())
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        leecher = RawPeer(seeding.port)
        leecher.send(hello + wire.have_none() + wire.interested())
        leecher.events(1.0)
        stranger = RawPeer(seeding.port)
        stranger.send(hello + wire.have_none())
        _, stranger_closed = stranger.events(2.0)
        assert stranger_closed
        leecher.send(wire.request(1, 0, 16384))
        got, closed = leecher.events(1.0)
        assert any(isinstance(e, wire.Piece) for e in got) and not closed
        leecher.close()
        stranger.close()
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


class _Scripted:
    """A peer on a plain socket, a thread for each connection it is given."""

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=self.serve, args=(conn,), daemon=True).start()


class _ScriptedSeeder(_Scripted):
    """A seeder of ``blob`` on a plain socket, with a stable peer id: it says it has
    every piece (or the first ``first`` of them, the others when told to) and unchokes
    once ``go`` is set; ``p`` (BEP 10: where it listens) said in its extension handshake
    when given. Counts dials, requests, blocks and connections ended."""

    def __init__(self, blob: bytes, piece: int, peer_id: bytes, go: threading.Event,
                 p: int | None = None, delay: float = 0.0, first: int | None = None,
                 spoil: float = 0.0) -> None:
        """``delay``: seconds it waits before each block it sends; ``spoil``: the share
        of its blocks it sends with a bit flipped."""
        self.blob, self.piece, self.peer_id, self.go, self.p = blob, piece, peer_id, go, p
        self.delay, self.first, self.spoil = delay, first, spoil
        self.rng = random.Random(peer_id)
        self.dials = self.requests = self.blocks = self.ended = self.spoilt = 0
        self.conns: list[socket.socket] = []
        self.sending = threading.Lock()

    def _says_it_has(self) -> bytes:
        if self.first is None:
            return wire.have_all()
        n = -(-len(self.blob) // self.piece)
        bits = bytearray(-(-n // 8))
        for i in range(self.first):
            bits[i // 8] |= 0x80 >> (i % 8)
        return wire.bitfield(bytes(bits))

    def has_the_rest(self) -> None:
        """Says HAVE of each piece it did not say at first, on every connection."""
        assert self.first is not None
        n = -(-len(self.blob) // self.piece)
        for conn in self.conns:
            with self.sending:
                conn.sendall(b"".join(wire.have(i) for i in range(self.first, n)))

    def serve(self, conn: socket.socket, dialled: bool = False) -> None:
        """``dialled``: the connection is one it dialled, its handshake sent already."""
        self.dials += not dialled
        self.conns.append(conn)
        try:
            self._serve(conn, dialled)
        finally:
            self.ended += 1

    def _serve(self, conn: socket.socket, dialled: bool) -> None:
        parser = wire.Parser(handshake=True)
        with contextlib.suppress(OSError):
            while data := conn.recv(1 << 16):
                out = []
                for ev in parser.feed(data):
                    if isinstance(ev, wire.Handshake):
                        hello = b"" if dialled else wire.handshake(
                            ev.info_hash, self.peer_id, wire.make_reserved())
                        ext = {b"m": {}} if self.p is None else {b"m": {}, b"p": self.p}
                        with self.sending:
                            conn.sendall(hello + wire.extended(0, bencodepy.encode(ext))
                                         + self._says_it_has())
                        self.go.wait(60)
                        out.append(wire.unchoke())
                    elif isinstance(ev, wire.Request):
                        self.requests += 1
                        time.sleep(self.delay)
                        at = ev.piece * self.piece + ev.begin
                        block = bytearray(self.blob[at : at + ev.length])
                        if self.spoil and self.rng.random() < self.spoil:
                            block[self.rng.randrange(len(block))] ^= 1
                            self.spoilt += 1
                        out.append(wire.piece(ev.piece, ev.begin, bytes(block)))
                        self.blocks += 1
                if out:
                    with self.sending:
                        conn.sendall(b"".join(out))
        conn.close()


class _ScriptedLeecher(_Scripted):
    """A leecher on a plain socket that completes the way Transmission 3.00 does: it
    asks for every block, and the moment it has them all closes the connection, the
    HAVEs of its last pieces unsent; every later connection is closed before its
    handshake (a seed wants nothing of a seed). Counts the connections it is given."""

    def __init__(self, piece: int, total: int, peer_id: bytes) -> None:
        self.piece, self.total, self.peer_id = piece, total, peer_id
        self.dials = 0
        self.done = threading.Event()

    def serve(self, conn: socket.socket) -> None:
        self.dials += 1
        if self.done.is_set():
            conn.close()
            return
        parser = wire.Parser(handshake=True)
        got = 0
        with contextlib.suppress(OSError):
            while data := conn.recv(1 << 16):
                out = []
                for ev in parser.feed(data):
                    if isinstance(ev, wire.Handshake):
                        out.append(wire.handshake(ev.info_hash, self.peer_id,
                                                  wire.make_reserved(extended=False))
                                   + wire.have_none() + wire.interested())
                    elif isinstance(ev, wire.Unchoke):
                        for at in range(0, self.total, wire.BLOCK):
                            p, b = divmod(at, self.piece)
                            out.append(wire.request(p, b, min(wire.BLOCK, self.total - at,
                                                              self.piece - b)))
                    elif isinstance(ev, wire.Piece):
                        got += len(ev.data)
                if got >= self.total:
                    self.done.set()
                    break
                if out:
                    conn.sendall(b"".join(out))
        conn.close()


def test_a_leecher_that_hangs_up_as_it_completes_is_not_dialled_again(tmp_path: Path) -> None:
    """A leecher named with --peer that closes the connection the moment its download
    completes, before the HAVEs of its last pieces went out (Transmission 3.00), was
    not known for a seed: dialled again and again while we seed (with Transmission,
    once a minute for good), each dial closed at once. A peer that hangs up having
    every piece it said it had or we sent it is a seed: two seeds have nothing to
    exchange."""
    piece = 32768
    files = {"a.bin": 6 * piece + 5}
    _, _, _, torrent = _v1(tmp_path, files, piece, seed=44)
    listener = socket.create_server(("127.0.0.1", 0))
    leecher = _ScriptedLeecher(piece, files["a.bin"], b"-TR3000-" + b"c" * 12)
    threading.Thread(target=leecher.accept, args=(listener,), daemon=True).start()
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d,
                          "--peer", f"127.0.0.1:{listener.getsockname()[1]}")
        assert leecher.done.wait(60), "the leecher did not get every block"
        time.sleep(8.0)  # (dialled again after 1, 2 and 4 s, were it not a seed)
        assert leecher.dials == 1, leecher.dials
        seeding.stop()
    finally:
        listener.close()
        assert d.stop() == 0, d.stderr()


def test_a_seeder_that_spoils_a_few_blocks_of_every_piece_is_found_out(tmp_path: Path) -> None:
    """Two seeders serve at the same pace; one flips a bit in one block in twenty. Each
    4 MiB piece is asked of both, so nearly every attempt holds a spoilt block and fails,
    and with two givers it says nothing of which lied: it was asked of both again, for
    ever (the download never ended, the liar never named). A piece that failed with
    several peers' blocks is asked of one peer alone, whole: that attempt names its giver
    or verifies (and the blocks of the failed ones then name the liar). The download
    completes with the right bytes, at a small cost, and the liar is dropped."""
    piece = 4 * 1024 * 1024
    files = {"a.bin": 8 * piece + 777}
    content, _, _, torrent = _v1(tmp_path, files, piece, seed=53)
    blob = (content / "a.bin").read_bytes()
    go = threading.Event()
    go.set()
    honest = _ScriptedSeeder(blob, piece, b"-HS0001-" + b"h" * 12, go, delay=0.002)
    liar = _ScriptedSeeder(blob, piece, b"-LS0001-" + b"l" * 12, go, delay=0.002, spoil=0.05)
    listeners = []
    for seeder in (honest, liar):
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=seeder.accept, args=(listener,), daemon=True).start()
        listeners.append(listener)
    d = Daemon(tmp_path)
    proc = subprocess.Popen(
        peer_cmd(torrent, tmp_path / "dl", d.socket,
                 *(a for lst in listeners for a in ("--peer", f"127.0.0.1:{lst.getsockname()[1]}"))),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"], summary
        assert liar.spoilt and summary["pieces_failed"] >= 1, summary
        # (each piece's first attempt from both, and a few of the liar's alone, wasted:
        # asked of both again and again, the download took 17 times its size, or never
        # ended)
        assert summary["bytes_down"] < 4 * len(blob), summary
        liar_addr = f"127.0.0.1:{listeners[1].getsockname()[1]}"
        assert summary["bad_peers"] == [liar_addr], summary
        assert summary["peers_dropped_for_bad_data"] == 1, summary
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for listener in listeners:
            listener.close()
        assert d.stop() == 0, d.stderr()


def test_pieces_another_client_began_that_fill_the_bound_are_taken_up(tmp_path: Path) -> None:
    """The daemon may hold two pieces in progress (max_partial_pieces 1); another client
    begins two pieces of the torrent pieced-peer downloads, once it has begun (as a
    block of a piece it gave up does: sent before the refusal of an earlier one came
    back, it is taken once the daemon has room). Every piece pieced-peer began was
    refused, for ever: it never fetched the two the daemon held (1 run of the no-room
    downloads in 3 stopped so). Refused, it asks the daemon which pieces of the torrent
    are in progress, fetches their other blocks first, and completes."""
    piece = 256 * 1024
    files = {"a.bin": 64 * piece + 5}  # (the pieces begun far past the first requests)
    content, _, meta, torrent = _v1(tmp_path, files, piece, seed=47)
    blob = (content / "a.bin").read_bytes()
    go = threading.Event()
    seeder = _ScriptedSeeder(blob, piece, b"-SS0001-" + b"o" * 12, go)
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=seeder.accept, args=(listener,), daemon=True).start()
    d = Daemon(tmp_path, env={"PIECED_MAX_PARTIAL_PIECES": "1"})  # (2 in all)
    proc = subprocess.Popen(
        peer_cmd(torrent, tmp_path / "dl", d.socket,
                 "--peer", f"127.0.0.1:{listener.getsockname()[1]}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not seeder.dials and time.monotonic() < deadline:  # (registered, taken up)
            time.sleep(0.05)
        assert seeder.dials
        begun = (meta.num_pieces - 3, meta.num_pieces - 2)  # (whole pieces, picked last)
        with Client(d.socket) as c:
            for p in begun:
                c.write_chunk(meta.info_hash, p, 0, blob[p * piece : p * piece + wire.BLOCK])
            c.wait_writes()
            assert c.status(meta.info_hash, files=False)["partial_pieces"] == 2
        go.set()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and summary["blocks_refused"] >= 1, summary
        assert summary["blocks_resumed"] == len(begun), summary  # (theirs: not fetched)
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        go.set()
        listener.close()
        assert d.stop() == 0, d.stderr()


def _turning_away() -> tuple[socket.socket, list[int]]:
    """A listening socket that closes every connection it is given at once, and the
    list that counts them (a leecher gone: where it said it listens, nothing wants us)."""
    listener = socket.create_server(("127.0.0.1", 0))
    dialled: list[int] = []

    class TurnAway(_Scripted):
        def serve(self, conn: socket.socket) -> None:
            dialled.append(1)
            conn.close()

    threading.Thread(target=TurnAway().accept, args=(listener,), daemon=True).start()
    return listener, dialled


def _come_and_gone(port: int, meta: Metainfo, peer_id: bytes, listens: int, said: bytes) -> None:
    """A leecher dials the seed at ``port``, says it listens at ``listens`` (BEP 10)
    and ``said`` (what it has, whether it is interested), and hangs up."""
    leecher = RawPeer(port)
    ext = {b"m": {}, b"p": listens}
    leecher.send(wire.handshake(meta.info_hash, peer_id, wire.make_reserved())
                 + wire.extended(0, bencodepy.encode(ext)) + said)
    leecher.events(1.0)
    leecher.close()


def test_a_leecher_gone_that_turns_our_dial_back_away_is_not_warned_of(
        tmp_path: Path) -> None:
    """A leecher that dialled a seed and left is dialled back at the port it said it
    listens on; one that has left the torrent closes that dial before its handshake.
    The seed warned of it as of a peer that may want encryption, once for every
    leecher that had come and gone (a soak of 41 leechers: 41 warnings). It spoke plain
    BitTorrent to us: nothing is said."""
    piece = 32768
    files = {"a.bin": 6 * piece + 5}
    _, _, meta, torrent = _v1(tmp_path, files, piece, seed=45)
    listener, turned = _turning_away()
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d)
        _come_and_gone(seeding.port, meta, b"-LT2000-" + b"g" * 12,
                       listener.getsockname()[1], wire.have_none() + wire.interested())
        deadline = time.monotonic() + 20
        while len(turned) < 2 and time.monotonic() < deadline:  # (dialled back, twice)
            time.sleep(0.1)
        assert len(turned) >= 2, turned
        seeding.proc.send_signal(signal.SIGTERM)
        _, err = seeding.proc.communicate(timeout=30)
        assert "before its handshake" not in err, err
    finally:
        listener.close()
        assert d.stop() == 0, d.stderr()


def test_a_leecher_that_hangs_up_on_our_last_have_is_dialled_back(tmp_path: Path) -> None:
    """libtorrent hangs up on a peer it wants nothing of that has become a seed ("an
    uninteresting upload-only peer"): a relay's last HAVE reaches it while it is not
    interested, before it takes in that it lacks that piece. A peer that hung up while
    we had every piece, not interested, was taken for a seed, and never dialled back,
    though its bitfield said it lacks a piece (the leecher waited for its own dial, a
    minute later; one that cannot dial, for ever). It is dialled back; a peer that
    said nothing of what it has is still taken for a seed (a libtorrent seed closes on
    our HAVE_ALL before its own has reached us)."""
    piece = 32768
    files = {"a.bin": 6 * piece + 5}
    _, _, meta, torrent = _v1(tmp_path, files, piece, seed=46)
    listener, dialled = _turning_away()
    d = Daemon(tmp_path)
    try:
        seeding = Seeding(torrent, tmp_path / "seed", d)
        lacking = wire.bits_from_pieces(range(meta.num_pieces - 1), meta.num_pieces)
        _come_and_gone(seeding.port, meta, b"-LT2000-" + b"h" * 12,
                       listener.getsockname()[1], wire.bitfield(lacking))  # (not interested)
        deadline = time.monotonic() + 20
        while not dialled and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dialled, "the leecher was not dialled back"
        seeding.stop()
    finally:
        listener.close()
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("claim", ["says nothing of where", "no extensions", "another port"])
def test_a_claim_of_a_seeders_peer_id_that_does_not_say_where_it_listens_goes(
        tmp_path: Path, claim: str) -> None:
    """A stranger dials in claiming the peer id of the seeder we dialled, from its
    address. Taken for the seeder's only if it says it listens at the port we dialled:
    one that says another port, or cannot say (no extension protocol), is closed at once;
    one that could say and says nothing is waited for, a few seconds, then closed. The
    connection to the seeder stays throughout (it is dialled once), and the download
    completes once the seeder unchokes."""
    from tests.test_peer_libtorrent import listening

    piece = 32768
    files = {"a.bin": 12 * piece + 5}
    content, _, meta, torrent = _v1(tmp_path, files, piece, seed=43)
    seeder_id = b"-TR3000-" + b"w" * 12
    go = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    seeder = _ScriptedSeeder((content / "a.bin").read_bytes(), piece, seeder_id, go,
                             p=listener.getsockname()[1])
    threading.Thread(target=seeder.accept, args=(listener,), daemon=True).start()
    d = Daemon(tmp_path)
    stranger: RawPeer | None = None
    try:
        proc, port = listening(torrent, tmp_path / "dl", d,
                               "--peer", f"127.0.0.1:{listener.getsockname()[1]}")
        deadline = time.monotonic() + 30
        while seeder.dials < 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)  # (its handshake has come: our connection to it is up)
        stranger = RawPeer(port)
        hello = wire.handshake(meta.info_hash, seeder_id,
                               wire.make_reserved(extended=claim != "no extensions"))
        if claim == "another port":
            hello += wire.extended(0, bencodepy.encode({b"m": {}, b"p": port + 1}))
        stranger.send(hello + wire.have_none())
        _, closed = stranger.events(15.0)  # (the wait for its word is 5 s)
        assert closed, claim
        go.set()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["complete"]
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert seeder.dials == 1, err
    finally:
        go.set()
        if stranger is not None:
            stranger.close()
        listener.close()
        assert d.stop() == 0, d.stderr()


def test_a_peers_connection_from_the_other_family_is_asked_once_our_dial_to_it_goes(
        tmp_path: Path) -> None:
    """The seeder we dialled over IPv6 dials us over IPv4 too, and says it listens at
    the port we dialled: nothing is asked on that second connection while ours lasts
    (no block comes twice). When ours goes (the seeder closes it and stops listening),
    the download goes on over the connection that is left, to the end."""
    from tests.test_peer_libtorrent import listening

    piece = 32768
    files = {"a.bin": 12 * piece + 5}
    content, _, meta, torrent = _v1(tmp_path, files, piece, seed=44)
    blob = (content / "a.bin").read_bytes()
    seeder_id = b"-TR3000-" + b"f" * 12
    listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    at6 = listener.getsockname()[1]
    never = threading.Event()  # (over IPv6 it never unchokes)
    over6 = _ScriptedSeeder(blob, piece, seeder_id, never, p=at6)
    threading.Thread(target=over6.accept, args=(listener,), daemon=True).start()
    over4 = _ScriptedSeeder(blob, piece, seeder_id, threading.Event(), p=at6)
    over4.go.set()
    d = Daemon(tmp_path)
    try:
        proc, port = listening(torrent, tmp_path / "dl", d, "--peer", f"[::1]:{at6}")
        deadline = time.monotonic() + 30
        while over6.dials < 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)  # (its handshake has come)
        dial4 = socket.socket()
        dial4.bind(("127.0.0.2", 0))
        dial4.connect(("127.0.0.1", port))
        dial4.sendall(wire.handshake(meta.info_hash, seeder_id, wire.make_reserved()))
        threading.Thread(target=over4.serve, args=(dial4, True), daemon=True).start()
        time.sleep(2.0)
        assert over4.requests == 0 and proc.poll() is None  # (muted while ours lasts)
        listener.close()
        for conn in over6.conns:
            conn.shutdown(socket.SHUT_RDWR)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["complete"]
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert over6.blocks == 0 and over4.blocks >= 12 * 2, err
    finally:
        never.set()
        listener.close()
        assert d.stop() == 0, d.stderr()


def test_a_peer_that_dialled_us_and_trades_keeps_its_place_when_we_reach_it_through_a_forward(
        tmp_path: Path) -> None:
    """A seeder dials us, says it listens at its port, and blocks come; then our own
    dial reaches it at another port (one forwarded to it, as a router does), and its
    handshake says the same peer id. Nothing tells a forwarded port from a stranger's
    claim, but the older connection has carried blocks: ours, the newer, is closed, and
    the download goes on over the seeder's, to the end, no block asked twice."""
    from tests.test_peer_libtorrent import listening

    piece = 32768
    files = {"a.bin": 40 * piece + 7}
    content, _, meta, torrent = _v1(tmp_path, files, piece, seed=45)
    blob = (content / "a.bin").read_bytes()
    seeder_id = b"-TR3000-" + b"n" * 12
    own = socket.create_server(("127.0.0.1", 0))  # (where it says it listens)
    forward = socket.socket()
    forward.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    forward.bind(("127.0.0.1", 0))  # (dials refused until it listens)
    go = threading.Event()
    go.set()
    # It says at first it has 4 pieces, the others once our dial has reached it: the
    # download cannot end before (our dial is tried again after a wait that doubles).
    its_dial = _ScriptedSeeder(blob, piece, seeder_id, go, p=own.getsockname()[1], delay=0.02,
                               first=4)
    reached = _ScriptedSeeder(blob, piece, seeder_id, go, p=own.getsockname()[1], delay=0.02)
    d = Daemon(tmp_path)
    try:
        proc, port = listening(torrent, tmp_path / "dl", d,
                               "--peer", f"127.0.0.1:{forward.getsockname()[1]}")
        dial = socket.create_connection(("127.0.0.1", port))
        dial.sendall(wire.handshake(meta.info_hash, seeder_id, wire.make_reserved()))
        threading.Thread(target=its_dial.serve, args=(dial, True), daemon=True).start()
        deadline = time.monotonic() + 60
        while its_dial.blocks < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        forward.listen()
        threading.Thread(target=reached.accept, args=(forward,), daemon=True).start()
        while reached.ended < 1:  # (our dial, tried again since, comes through: closed)
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        assert its_dial.ended == 0  # (the older connection is kept)
        its_dial.has_the_rest()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"] and summary["bytes_redundant"] == 0, out
        _same_tree(content, tmp_path / "dl" / "payload", files)
        assert reached.blocks == 0, err  # (ours closed at its handshake)
        assert its_dial.blocks == its_dial.requests == 40 * 2 + 1, err  # (never closed)
    finally:
        own.close()
        forward.close()
        assert d.stop() == 0, d.stderr()


def test_what_a_seeder_says_it_has_is_counted_message_by_message(tmp_path: Path) -> None:
    """A seeder sends its BITFIELD (every piece) and an lt_donthave of every piece in one
    write, then a HAVE of every piece a second later. The connection takes in all of a
    read before its events are handled; what the peer has was counted from what the
    connection held after the whole read, so every piece was taken off twice and the
    HAVEs only brought the count back to nothing: pieced-peer was never interested, and
    waited for ever. Counted event by event, it downloads everything."""
    import subprocess

    from pieced.peer.conn import LT_DONTHAVE

    from tests.test_peer_libtorrent import peer_cmd

    piece = 65536
    files = {"a.bin": 24 * piece + 5}
    content, _raw, meta, torrent = _v1(tmp_path, files, piece, seed=41)
    data = (content / "a.bin").read_bytes()
    n = meta.num_pieces
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    served = {"blocks": 0}

    def seeder() -> None:
        conn, _ = listener.accept()
        parser = wire.Parser(handshake=True)
        conn.settimeout(30)
        try:
            while True:
                got = conn.recv(1 << 16)
                if not got:
                    return
                for ev in parser.feed(got):
                    if isinstance(ev, wire.Handshake):
                        conn.sendall(
                            wire.handshake(ev.info_hash, b"-DH0001-" + bytes(12),
                                           wire.make_reserved(extended=True))
                            + wire.bitfield(wire.bits_from_pieces([True] * n, n))
                            + b"".join(wire.extended(LT_DONTHAVE, i.to_bytes(4, "big"))
                                       for i in range(n))
                            + wire.unchoke())
                        time.sleep(1)
                        conn.sendall(b"".join(wire.have(i) for i in range(n)))
                    elif isinstance(ev, wire.Request):
                        at = ev.piece * piece + ev.begin
                        conn.sendall(wire.piece(ev.piece, ev.begin, data[at : at + ev.length]))
                        served["blocks"] += 1
        except OSError:
            return
        finally:
            conn.close()

    t = threading.Thread(target=seeder, daemon=True)
    t.start()
    d = Daemon(tmp_path)
    try:
        r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket,
                                    "--peer", f"127.0.0.1:{port}"),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["complete"]
        assert served["blocks"] >= n
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        listener.close()
        assert d.stop() == 0, d.stderr()


def test_peers_that_never_handshake_lose_their_slots(tmp_path: Path) -> None:
    """With every connection slot (``--max-peers``) taken by peers that send no
    handshake, one silent and one dribbling a byte a second, a newcomer is turned away;
    the handshake deadline then frees the slots, and a libtorrent leecher gets every
    byte. Without the deadline the dribbler would hold its slot for ever."""
    piece = 32768
    files = {"a.bin": 12 * piece + 5}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=33)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--max-peers", "2")
    try:
        silent = RawPeer(seeding.port)
        dribbler = RawPeer(seeding.port)
        hello = wire.handshake(meta.info_hash, b"-XX0001-" + bytes(12), wire.make_reserved())
        time.sleep(0.5)
        late = RawPeer(seeding.port)  # over the limit: closed at once
        late.send(hello)
        got, closed = late.events()
        assert closed and not got
        late.close()
        # the dribbler's bytes (never a whole handshake) keep it from looking idle
        started = time.monotonic()
        closed_at: dict[str, float] = {}
        dribbled = 0
        dribbler.sock.setblocking(False)
        silent.sock.setblocking(False)
        while len(closed_at) < 2 and time.monotonic() - started < 40:
            for name, p in (("silent", silent), ("dribbler", dribbler)):
                if name in closed_at:
                    continue
                try:
                    if p.sock.recv(1) == b"":
                        closed_at[name] = time.monotonic() - started
                        continue
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed_at[name] = time.monotonic() - started
                    continue
                if name == "dribbler":
                    try:
                        p.sock.send(hello[dribbled : dribbled + 1])
                        dribbled += 1
                    except OSError:
                        closed_at[name] = time.monotonic() - started
            time.sleep(1.0)
        assert set(closed_at) == {"silent", "dribbler"}, closed_at
        assert dribbled < len(hello)
        silent.close()
        dribbler.close()
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_requests_of_any_size_inside_a_piece_are_served_exactly(tmp_path: Path) -> None:
    """A leecher may ask for any range of up to 16 KiB inside a piece, not only 16 KiB
    blocks from its start: libtorrent with ``disable_v1_hashes`` asks for v2-sized blocks
    on a hybrid (stopping at each file's end), others ask for odd ranges. Each is answered
    with exactly the bytes asked for (pads as zeros); one byte past the piece is refused
    by dropping the peer."""
    from tests.test_disk import Source

    piece = 65536
    files = {"a.bin": 3 * piece + 1234, "b.bin": 2 * piece + 7, "c.bin": 999}
    content = make_payload(tmp_path / "seed", files, seed=34)
    raw = make_torrent_lt(content, piece, "hybrid")
    src = Source(raw, tmp_path / "seed")
    meta = src.meta
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        p = RawPeer(seeding.port)
        p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes(12), wire.make_reserved())
               + wire.have_none() + wire.interested())
        got, closed = p.events(1.0)
        assert not closed and any(isinstance(e, wire.Unchoke) for e in got)
        last = meta.num_pieces - 1
        asks = [(0, 1, 1), (0, 100, 5000), (1, piece - 16384, 16384), (1, piece - 3, 3),
                (3, 1234 - 200, 200),  # the end of a.bin's data ...
                (3, 1234 - 200, 16384),  # ... and running on into its pad
                (3, 1234, 16384),  # wholly inside the pad: zeros
                (last, 0, min(16384, src.layout.piece_size(last))),
                (last, src.layout.piece_size(last) - 1, 1)]
        p.send(b"".join(wire.request(*a) for a in asks))
        answers: dict[tuple[int, int, int], bytes] = {}
        deadline = time.monotonic() + 20
        while len(answers) < len(asks) and time.monotonic() < deadline:
            got, closed = p.events(2.0)
            assert not closed
            for e in got:
                if isinstance(e, wire.Piece):
                    answers[(e.piece, e.begin, len(e.data))] = bytes(e.data)
                assert not isinstance(e, wire.RejectRequest), e
        assert sorted(answers) == sorted(asks)
        for a in asks:
            assert answers[a] == src.read(*a), a
        p.send(wire.request(last, src.layout.piece_size(last) - 1, 2))
        _, closed = p.events()
        assert closed
        p.close()
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def _random_message(rng: random.Random, num_pieces: int, piece: int,
                    roots: list[bytes]) -> bytes:
    """One message a careless or hostile peer might send: well formed or not, in range or
    not (values near the edges are likelier than others)."""
    def index() -> int:
        return rng.choice([0, num_pieces - 1, num_pieces, rng.randrange(num_pieces + 3),
                           rng.randrange(1 << 32)])

    def begin() -> int:
        return rng.choice([0, 16384, piece - 16384, piece - 1, piece, rng.randrange(piece + 2)])

    def length() -> int:
        return rng.choice([16384, 1, 16385, 0, rng.randrange(1, 20000)])

    kind = rng.randrange(22)
    if kind == 0:
        return wire.request(index(), begin(), length())
    if kind == 1:
        return wire.have(index())
    if kind == 2:
        return wire.bitfield(rng.randbytes(rng.choice([(num_pieces + 7) // 8, 0, 1, 99])))
    if kind == 3:
        return wire.cancel(index(), begin(), length())
    if kind == 4:
        return wire.reject_request(index(), begin(), length())
    if kind == 5:
        return wire.suggest_piece(index())
    if kind == 6:
        return wire.allowed_fast(index())
    if kind == 7:
        return rng.choice([wire.have_all(), wire.have_none(), wire.keep_alive()])
    if kind == 8:
        return rng.choice([wire.interested(), wire.not_interested(), wire.choke(),
                           wire.unchoke()])
    if kind == 9:
        return wire.port(rng.randrange(1 << 16))
    if kind == 10:  # an extension handshake with odd values
        body = {b"m": rng.choice([{}, {b"ut_pex": 1}, b"x"]),
                b"reqq": rng.choice([0, -5, 1, 250, 1 << 40, b"many"])}
        return wire.extended(0, bencodepy.encode(body))
    if kind == 11:
        return wire.extended(rng.randrange(256), rng.randbytes(rng.randrange(40)))
    if kind in (12, 13):
        root = rng.choice([*roots, rng.randbytes(32)])
        return wire.hash_request(root, rng.choice([0, 1, 2, 9, 40]),
                                 rng.choice([0, 1, 2, 512, 1 << 31]),
                                 rng.choice([0, 1, 2, 3, 4, 512, 1 << 31]),
                                 rng.choice([0, 1, 2, 20, 1 << 31]))
    if kind == 14:
        root = rng.choice([*roots, rng.randbytes(32)])
        return wire.hash_reject(root, 0, 0, 2, 0)
    if kind == 15:
        return wire.piece(index(), begin(), rng.randbytes(rng.choice([16384, 7, 0])))
    if kind == 16:  # a message id nobody defined, with a body
        return struct.pack(">IB", 6, rng.randrange(24, 256)) + rng.randbytes(5)
    if kind == 17:  # a known id with the wrong body size
        mid = rng.choice([0, 4, 6, 8, 13, 14, 17, 21])
        n = rng.choice([0, 3, 20])
        return struct.pack(">IB", 1 + n, mid) + rng.randbytes(n)
    if kind == 18:
        return rng.randbytes(rng.randrange(1, 64))  # garbage
    return wire.request(rng.randrange(num_pieces), rng.randrange(piece // 16384) * 16384,
                        16384)  # plain and valid


def test_random_peers_never_break_a_seeding_pieced_peer(tmp_path: Path) -> None:
    """Peers sending random sequences of messages, well formed or not, in range or not,
    to a seeding pieced-peer (hybrid torrent, so hash requests too), eight at a time: it
    answers or drops each, logs no unhandled error, keeps serving an honest libtorrent
    leecher and stops cleanly on SIGTERM."""
    import threading

    piece = 32768
    files = {"a.bin": 9 * piece + 123, "b.bin": 3 * piece, "c.bin": 5000}
    content, raw, meta, torrent, roots = _hybrid(tmp_path, files, piece, seed=35)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        def one(seed: int) -> None:
            rng = random.Random(seed)
            key = meta.info_hash if rng.random() < 0.9 else rng.randbytes(20)
            reserved = wire.make_reserved(extended=rng.random() < 0.8,
                                          fast=rng.random() < 0.8, v2=rng.random() < 0.5)
            try:
                with socket.create_connection(("127.0.0.1", seeding.port), timeout=5) as s:
                    s.sendall(wire.handshake(key, b"-FZ0001-" + rng.randbytes(12), reserved))
                    s.settimeout(0.05)
                    for _ in range(rng.randrange(1, 40)):
                        s.sendall(_random_message(rng, meta.num_pieces, piece, roots))
                        with contextlib.suppress(TimeoutError):
                            s.recv(1 << 16)
            except OSError:
                pass  # dropped by pieced-peer: allowed, what else is checked is below

        for start in range(0, 160, 8):
            threads = [threading.Thread(target=one, args=(start + k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert seeding.proc.poll() is None, seeding.proc.communicate()[1]
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.proc.send_signal(signal.SIGTERM)
        out, err = seeding.proc.communicate(timeout=30)
        assert seeding.proc.returncode == 0, err
        assert "Traceback" not in err and "exception" not in err.lower(), err
        assert json.loads(out)["bytes_up"] >= sum(files.values())
    finally:
        assert d.stop() == 0, d.stderr()


def test_random_seeders_never_break_a_downloading_pieced_peer(tmp_path: Path) -> None:
    """pieced-peer downloads from a libtorrent seeder and from six peers that answer its
    handshake, say they have everything and then send random messages, among them
    blocks of random bytes for what it asks: it completes with the seeder's bytes, none
    of theirs, and logs no unhandled error."""
    import subprocess
    import threading

    from tests.test_peer_libtorrent import peer_cmd

    piece = 32768
    files = {"a.bin": 14 * piece + 9, "b.bin": 2 * piece}
    content, raw, meta, torrent, roots = _hybrid(tmp_path, files, piece, seed=36)
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(6)]
    stop = threading.Event()

    def rogue(k: int, listener: socket.socket) -> None:
        rng = random.Random(100 + k)
        listener.settimeout(1.0)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed at the end of the test
            parser = wire.Parser(handshake=True)
            conn.settimeout(0.05)
            try:
                with conn:
                    for _ in range(300):
                        if stop.is_set():
                            return
                        try:
                            data = conn.recv(1 << 16)
                            if not data:
                                break
                        except TimeoutError:
                            data = b""
                        for ev in parser.feed(data):
                            if isinstance(ev, wire.Handshake):
                                conn.sendall(wire.handshake(ev.info_hash, b"-RZ0001-" + bytes(12),
                                                            wire.make_reserved(v2=True))
                                             + wire.have_all() + wire.unchoke())
                            elif isinstance(ev, wire.Request) and rng.random() < 0.7:
                                conn.sendall(wire.piece(ev.piece, ev.begin, rng.randbytes(ev.length)))
                        if rng.random() < 0.3:
                            conn.sendall(_random_message(rng, meta.num_pieces, piece, roots))
            except (OSError, wire.WireError):
                continue

    threads = [threading.Thread(target=rogue, args=(k, s), daemon=True)
               for k, s in enumerate(listeners)]
    for t in threads:
        t.start()
    d = Daemon(tmp_path)
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True) as good:
            args = [a for s in listeners for a in ("--peer", f"127.0.0.1:{s.getsockname()[1]}")]
            r = subprocess.run(peer_cmd(torrent, tmp_path / "dl", d.socket, *args,
                                        "--peer", f"127.0.0.1:{good.port}"),
                               capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and "exception" not in r.stderr.lower(), r.stderr
        summary = json.loads(r.stdout)
        assert summary["complete"], summary
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for s in listeners:
            s.close()
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("slots", [None, 4])
def test_an_unchoke_slot_freed_by_a_leecher_that_leaves_is_given_at_once(
        tmp_path: Path, slots: int | None) -> None:
    """One interested peer more than the unchoke slots (``--upload-slots``, 8 by
    default as in libtorrent) on a seeding pieced-peer: the slots' worth are unchoked,
    the last waits. One of them leaves (as a libtorrent leecher does once it has
    everything): the last is unchoked at once, not at the next choke round, ten seconds
    on (with five leechers and four slots, the fifth finished ten seconds after the
    others)."""
    from pieced.peer.plugin import CHOKE_INTERVAL, UNCHOKE_SLOTS

    piece = 32768
    files = {"a.bin": 8 * piece + 5}
    make_payload(tmp_path / "seed", files, seed=33)
    raw = make_torrent_lt(tmp_path / "seed" / "payload", piece, "v1")
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
    ih = parse(raw).info_hash
    fast = wire.make_reserved(extended=False, fast=True)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d,
                      *(("--upload-slots", str(slots)) if slots else ()))
    n = slots or UNCHOKE_SLOTS
    started = time.monotonic()
    peers: list[RawPeer] = []
    try:
        for k in range(n + 1):
            p = RawPeer(seeding.port)
            p.send(wire.handshake(ih, b"-XX0001-" + bytes([k]) * 12, fast)
                   + wire.have_none() + wire.interested())
            peers.append(p)
            got, closed = p.events(0.3)
            assert not closed
            unchoked = any(isinstance(e, wire.Unchoke) for e in got)
            assert unchoked == (k < n), (k, got)
        peers[0].close()
        got, closed = peers[-1].events(0.5)
        assert time.monotonic() - started < CHOKE_INTERVAL * 0.8  # the round is not due
        assert any(isinstance(e, wire.Unchoke) for e in got), got
    finally:
        for p in peers:
            p.close()
        seeding.stop()
        assert d.stop() == 0, d.stderr()


def _memory(pid: int, field: str) -> int:
    """A process's memory figure from /proc/PID/status, in bytes: VmRSS, VmHWM (its
    peak), or RssAnon (its own pages: not those of the daemon's ring it has touched,
    which are shared and bounded by the ring's size)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def test_hash_requests_of_a_peer_that_does_not_read_cost_bounded_memory(tmp_path: Path) -> None:
    """A peer sends 20,000 hash requests of 53 bytes, each answered by 64 KiB of hashes,
    and reads nothing, then hangs up. pieced-peer answered every request of what it had
    received before it waited for the peer to read: 1 MB of requests made 1.25 GiB of
    answers (7.5 GiB, with bigger files, when the peer went away). It now waits for the
    peer to read past a few MiB unsent, and stops answering once the peer is gone."""
    piece = 16384
    files = {"a.bin": 2048 * piece, "b.bin": 3 * piece}
    content, raw, meta, torrent, roots = _hybrid(tmp_path, files, piece, seed=41)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        p = RawPeer(seeding.port)
        p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes(12),
                              wire.make_reserved(extended=True, fast=True, v2=True))
               + wire.have_none())
        ask = wire.hash_request(roots[0], 0, 0, 2048, 0)
        p.send(ask * 20_000)  # (the kernel's buffers take it all)
        time.sleep(3)
        assert _memory(seeding.proc.pid, "VmRSS") < 200 << 20
        p.close()
        time.sleep(3)
        assert seeding.proc.poll() is None
        assert _memory(seeding.proc.pid, "VmHWM") < 300 << 20
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_a_peer_asking_for_hashes_over_and_over_is_dropped(tmp_path: Path) -> None:
    """A peer pipelines hash requests that can all be answered (2,048 hashes of the
    piece layer, 64 KiB of answer for 53 bytes) and reads the answers. An answered
    request cost nothing: pieced-peer built and sent them at a gigabyte a second for as
    long as the peer liked, and a leecher beside one such peer was served twelve times
    slower (sixty, beside four). An answer now costs chatter by its size: the peer is
    dropped after a few MiB, and the leecher gets every byte."""
    piece = 32768
    files = {"a.bin": 2048 * piece}
    content, raw, meta, torrent, roots = _hybrid(tmp_path, files, piece, seed=47)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        p = RawPeer(seeding.port)
        p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes(12),
                              wire.make_reserved(extended=True, fast=True, v2=True))
               + wire.have_none())
        ask = wire.hash_request(roots[0], 1, 0, 2048, 0) * 16
        got, closed = 0, False
        p.sock.setblocking(False)
        deadline = time.monotonic() + 20
        while not closed and time.monotonic() < deadline:  # (closed: reset, or at its end)
            try:
                p.sock.send(ask)
            except BlockingIOError:
                pass
            except OSError:  # (reset: dropped)
                closed = True
                break
            try:
                while data := p.sock.recv(1 << 20):
                    got += len(data)
                closed = True
            except BlockingIOError:
                time.sleep(0.001)
            except OSError:
                closed = True
        assert closed, f"still answered after {got >> 20} MiB of hashes"
        assert got < 64 << 20
        p.close()
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_messages_longer_than_their_kind_are_refused_before_their_body(tmp_path: Path) -> None:
    """Forty peers each start an extension message of 2 MiB (or a HAVE, a block or an
    unknown message of 1 MiB) and send a MiB of it. pieced-peer took any message up to
    2 MiB and held it while it came: the forty stayed connected and held 40 MiB and
    more. Each kind of message has its own bound now (a block 16 KiB, an extension
    message 64 KiB, a HAVE 4 bytes): each peer is dropped on the message's fifth byte."""
    piece = 65536
    files = {"a.bin": 40 * piece + 5}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=43)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    heads = [struct.pack(">IB", (1 << 21) - 1, wire.MsgId.EXTENDED),
             struct.pack(">IB", 1 << 20, wire.MsgId.HAVE),
             struct.pack(">IB", 1 << 20, wire.MsgId.PIECE) + struct.pack(">II", 0, 0),
             struct.pack(">IB", 1 << 20, 99)]
    peers: list[RawPeer] = []
    try:
        time.sleep(1)
        base = _memory(seeding.proc.pid, "VmRSS")
        for i in range(40):
            p = RawPeer(seeding.port)
            peers.append(p)
            p.send(wire.handshake(meta.info_hash, b"-XX0001-" + i.to_bytes(12, "big"),
                                  wire.make_reserved(extended=True, fast=True))
                   + wire.have_none() + heads[i % len(heads)])
            with contextlib.suppress(OSError):  # refused already: the pipe is broken
                for _ in range(16):
                    p.send(bytes(65536))
        dropped = 0
        for p in peers:
            _, closed = p.events(3.0)
            dropped += closed
        assert dropped == len(peers)
        assert seeding.proc.poll() is None
        assert _memory(seeding.proc.pid, "VmHWM") - base < 16 << 20
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        for p in peers:
            p.close()
        assert d.stop() == 0, d.stderr()


def test_metadata_requests_of_peers_that_do_not_read_cost_bounded_memory(tmp_path: Path) -> None:
    """Six peers send 4,900 ut_metadata requests of 31 bytes each, each answered by a
    16 KiB piece of the metadata, and read nothing. pieced-peer answered every request
    of a read at once: 80 MB queued a peer (+478 MiB for twelve of them), held while the
    peer stayed. The answers now wait for the peer to read, as hashes and blocks do; a
    leecher from a magnet link still gets the metadata, then every byte."""
    piece = 16384
    files = {"a.bin": 2500 * piece + 77}  # 2,501 pieces: 50 KB of metadata, four pieces
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=43)
    ask = wire.extended(2, bencodepy.encode({b"msg_type": 0, b"piece": 0}))
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        peers = []
        for i in range(6):
            p = RawPeer(seeding.port, rcvbuf=4096)
            p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes([i]) * 12,
                                  wire.make_reserved(extended=True, fast=True))
                   + wire.extended(0, bencodepy.encode({b"m": {b"ut_metadata": 2}})))
            peers.append(p)
        for p in peers:
            p.send(ask * 4900)  # (under the chatter burst: a peer may ask this much)
        time.sleep(3)
        assert _memory(seeding.proc.pid, "VmRSS") < 200 << 20
        for p in peers:
            p.close()
        time.sleep(1)
        assert seeding.proc.poll() is None
        assert _memory(seeding.proc.pid, "VmHWM") < 200 << 20
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files, magnet=True)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def _cpu_per_connection(tmp_path: Path, pieces: int, connections: int) -> float:
    """CPU seconds of a downloading pieced-peer (a synthetic v1 torrent of ``pieces``
    pieces, none of them anywhere) per connection that says HAVE_ALL, is found
    interesting (INTERESTED comes back: its HAVE_ALL was taken) and hangs up."""
    info = {b"name": b"big.bin", b"piece length": 16384, b"length": 16384 * pieces,
            b"pieces": random.Random(pieces).randbytes(20 * pieces)}
    raw = bencodepy.encode({b"info": info})
    ih = parse(raw).info_hash
    torrent = tmp_path / f"{pieces}.torrent"
    torrent.write_bytes(raw)
    (tmp_path / f"d{pieces}").mkdir()
    d = Daemon(tmp_path / f"d{pieces}")
    proc = subprocess.Popen(peer_cmd(torrent, tmp_path / f"d{pieces}" / "dl", d.socket, "--listen",
                                     "127.0.0.1:0"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "listening on" in line, line + proc.stderr.read()
        port = int(line.rsplit(":", 1)[1])

        def connection(k: int) -> None:
            p = RawPeer(port)
            p.send(wire.handshake(ih, b"-XX0001-" + k.to_bytes(12, "big"),
                                  wire.make_reserved(fast=True)) + wire.have_all())
            deadline = time.monotonic() + 30
            while not any(isinstance(ev, wire.Interested) for ev in p.parser.feed(p.sock.recv(1 << 16))):
                assert time.monotonic() < deadline
            p.close()

        connection(0)  # (the first pick ranks every piece, once)
        c0 = _cpu_seconds(proc.pid)
        for k in range(1, connections + 1):
            connection(k)
        time.sleep(0.5)  # (the last hang-up handled)
        return (_cpu_seconds(proc.pid) - c0) / connections
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert d.stop() == 0, d.stderr()


def test_a_peer_with_every_piece_costs_no_walk_of_every_piece(tmp_path: Path) -> None:
    """A connection that says HAVE_ALL made pieced-peer walk every piece in Python
    three times (to count them available, to count what it lacks, to take them back
    when it left): 0.2 s of CPU each with a million pieces, and a stream of such
    connections held the loop (a download beside them took six times as long). A seed
    is counted once, not once a piece: a connection costs about the same whatever the
    torrent's size. (CPU per connection compared between 1,000 and 1,000,000 pieces:
    a ratio, not a time.)"""
    small = _cpu_per_connection(tmp_path, 1000, 60)
    large = _cpu_per_connection(tmp_path, 1_000_000, 60)
    assert large < 25 * max(small, 0.001), (small, large)


def test_what_a_peer_has_is_said_once(tmp_path: Path) -> None:
    """BITFIELD, HAVE_ALL or HAVE_NONE come once, before any HAVE (BEP 3, BEP 6). Each
    one costs work in proportion to the pieces: a stream of HAVE_ALL (1 MB of them)
    held the event loop for over a minute, every other peer waiting. A second one, or
    one after a HAVE, closes the connection."""
    piece = 16384
    files = {"a.bin": 4000 * piece}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=42)
    hello = wire.handshake(meta.info_hash, b"-XX0001-" + bytes(12),
                           wire.make_reserved(extended=False, fast=True))
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        for second in (wire.have_all() * 200_000, wire.have_none(),
                       wire.bitfield(bytes((meta.num_pieces + 7) // 8))):
            p = RawPeer(seeding.port)
            p.send(hello + wire.have_all())
            with contextlib.suppress(OSError):
                p.send(second)
            got, closed = p.events(5.0)
            assert closed
            p.close()
        p = RawPeer(seeding.port)
        p.send(hello + wire.have(3) + wire.have_all())
        got, closed = p.events(5.0)
        assert closed
        p.close()
        p = RawPeer(seeding.port)  # the rules kept: served
        p.send(hello + wire.have_none() + wire.have(3) + wire.interested())
        got, closed = p.events(2.0)
        assert not closed and any(isinstance(e, wire.Unchoke) for e in got)
        p.close()
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


def test_peers_with_nothing_to_exchange_give_their_place_to_a_newcomer(tmp_path: Path) -> None:
    """Every connection slot (``--max-peers 2``) held by peers that handshook, have
    nothing, want nothing and send keep-alives: a newcomer was turned away for as long as
    they stayed. One of them now gives its place to the newcomer (as libtorrent drops a
    peer to make room), and a libtorrent leecher gets every byte. (Seeds would not stay
    at all: two seeds have nothing to exchange.)"""
    piece = 32768
    files = {"a.bin": 12 * piece + 5}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=43)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--max-peers", "2")
    try:
        squatters = [RawPeer(seeding.port) for _ in range(2)]
        for i, p in enumerate(squatters):
            p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes([i]) * 12,
                                  wire.make_reserved(extended=False, fast=True))
                   + wire.have_none())
        deadline = time.monotonic() + 13  # past IDLE_SECONDS, with keep-alives all along
        while time.monotonic() < deadline:
            for p in squatters:
                p.send(wire.keep_alive())
            time.sleep(1.0)
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        closed = 0
        for p in squatters:
            _, gone = p.events(0.5)
            closed += gone
            p.close()
        assert closed == 1  # one place was needed
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


class Sipper:
    """A peer that holds a place cheaply: it handshakes, has nothing, is interested, and
    while unchoked asks for one block every 2 s and reads it (so it neither idles nor
    stalls); keep-alives otherwise. From ``host`` (any address of 127/8 is loopback)."""

    def __init__(self, port: int, info_hash: bytes, n: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 10, (host, 0))
        self.sock.sendall(wire.handshake(info_hash, b"-XX0001-" + b"%012d" % n,
                                         wire.make_reserved(extended=False, fast=True))
                          + wire.have_none() + wire.interested())
        self.closed = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        parser = wire.Parser(handshake=True)
        unchoked = False
        asked = 0
        next_ask = time.monotonic()
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.closed = True
                return
            for ev in parser.feed(data) if data else ():
                if isinstance(ev, wire.Unchoke):
                    unchoked = True
                elif isinstance(ev, wire.Choke):
                    unchoked = False
            if time.monotonic() >= next_ask:
                next_ask += 2.0
                with contextlib.suppress(OSError):
                    self.sock.sendall(wire.request(asked % 8, 0, 16384) if unchoked
                                      else wire.keep_alive())
                    asked += unchoked

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _let_in(port: int, info_hash: bytes, host: str) -> bool:
    """Whether a newcomer from ``host`` is let in: its handshake answered."""
    p = socket.create_connection(("127.0.0.1", port), 10, (host, 0))
    try:
        p.sendall(wire.handshake(info_hash, b"-XX0001-newcomer0000",
                                 wire.make_reserved(extended=False, fast=True)))
        p.settimeout(3)
        try:
            return len(p.recv(68)) > 0
        except (TimeoutError, ConnectionResetError):
            return False
    finally:
        p.close()


def test_peers_that_sip_a_block_now_and_then_do_not_shut_newcomers_out(
        tmp_path: Path) -> None:
    """Every place (``--max-peers 4``) held by peers that are interested, ask for one
    block every 2 s while unchoked and read it: they neither idle nor stall, so every
    newcomer was turned away for as long as they stayed (a libtorrent leecher got
    nothing). Places are shared between addresses: a newcomer from another address takes
    the place of one of theirs at once, and a libtorrent leecher from it gets every byte;
    a newcomer from their own address is let in once they have been connected long
    enough to have shown what they take (TURNOVER_SECONDS), in place of the one that took
    least, and never in place of one just arrived. A bare connection takes no place:
    one is found for a newcomer once it has handshaken (a port scan dropped leechers)."""
    from pieced.peer.plugin import TURNOVER_SECONDS

    piece = 65536
    files = {"a.bin": 40 * piece + 7}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=46)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--max-peers", "4")
    sippers: list[Sipper] = []
    try:
        began = time.monotonic()
        sippers = [Sipper(seeding.port, meta.info_hash, i) for i in range(4)]
        time.sleep(1.0)
        assert not _let_in(seeding.port, meta.info_hash, "127.0.0.1")  # (young, theirs)
        # A bare connection (a port scan) from another address takes no place: it is let
        # in over the limit, and a place is found for it only once it has handshaken.
        bare = [socket.create_connection(("127.0.0.1", seeding.port), 10, ("127.0.0.3", 0))
                for _ in range(3)]
        time.sleep(1.0)
        assert not any(s.closed for s in sippers)
        for b in bare:
            b.close()
        with LtPeer(raw, tmp_path / "leech", seed=False,
                    settings={"outgoing_interfaces": "127.0.0.2"}) as leecher:
            leecher.connect("127.0.0.1", seeding.port)
            leecher.wait_finished(30)
            assert leecher.hash_failures() == 0
        _same_tree(content, tmp_path / "leech" / "payload", files)
        time.sleep(3.0)  # (the leecher's place free again)
        assert sum(s.closed for s in sippers) == 1  # one gave its place
        sippers.append(Sipper(seeding.port, meta.info_hash, 4))  # the place again: full
        time.sleep(max(0.0, began + TURNOVER_SECONDS + 1 - time.monotonic()))
        assert _let_in(seeding.port, meta.info_hash, "127.0.0.1")
        time.sleep(1.0)
        assert sum(s.closed for s in sippers) == 2
        assert not sippers[-1].closed  # (just arrived: not the one that goes)
        seeding.stop()
    finally:
        for s in sippers:
            s.close()
        assert d.stop() == 0, d.stderr()


def _leecher_beside(hogs: list[RawPeer], seconds: float, raw: bytes, seeding: Seeding,
                    tmp_path: Path, content: Path, files: dict[str, int]) -> None:
    """A libtorrent leecher gets every byte within ``seconds`` beside ``hogs``; then
    they hang up and the seeding stops."""
    with LtPeer(raw, tmp_path / "leech", seed=False) as leecher:
        leecher.connect("127.0.0.1", seeding.port)
        leecher.wait_finished(seconds)
        assert leecher.hash_failures() == 0
    _same_tree(content, tmp_path / "leech" / "payload", files)
    for p in hogs:
        p.close()
    seeding.stop()


def test_peers_that_never_read_give_their_unchoke_slots_up(tmp_path: Path) -> None:
    """Ten peers interested, asking for blocks (at once, while still choked: every
    request rejected) and never reading: they held the four unchoke slots, turning one
    slot every 10 s, so a leecher waited its turn behind them (110 s behind 40 of
    them). A peer unchoked for a few seconds that has taken nothing sent, or been sent
    nothing, gives its slot to one waiting (those that wasted a slot before wait last),
    and the leecher is served within seconds."""
    piece = 65536
    files = {"a.bin": 64 * piece}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=44)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--upload-slots", "4")
    try:
        hogs = []
        asks = b"".join(wire.request(p, b, 16384) for p in range(meta.num_pieces)
                        for b in range(0, piece, 16384))[: 13 * 490]  # under the queue bound
        for i in range(10):
            p = RawPeer(seeding.port)
            p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes([i]) * 12,
                                  wire.make_reserved(extended=False, fast=True))
                   + wire.have_none() + wire.interested() + asks)
            hogs.append(p)
        time.sleep(8)  # (past STALL_SECONDS)
        # (behind ten hogs, one slot every 10 s: over 60 s)
        _leecher_beside(hogs, 45, raw, seeding, tmp_path, content, files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_peers_that_never_read_come_a_moment_before_a_leecher_do_not_keep_it_waiting(
        tmp_path: Path) -> None:
    """Sixteen peers with small receive buffers say they are interested, ask for 1,500
    blocks and never read; a second later a leecher comes. The four slots went to the
    first four, each kept until it had wasted it for STALL_SECONDS, then to the next
    four: the leecher, waiting behind peers not yet found out, got its first byte after
    20 s (48 s behind forty). Peers that take nothing of what we sent while they wait
    (the rejects of their requests) now wait last, and while one that reads waits, a
    slot taken by a peer that takes nothing goes after a couple of seconds."""
    piece = 65536
    files = {"a.bin": 64 * piece + 1234}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=48)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--upload-slots", "4")
    try:
        n = meta.num_pieces
        asks = b"".join(wire.request(j % (n - 1), (j // (n - 1)) % 4 * 16384, 16384)
                        for j in range(1500))
        hogs = []
        for i in range(16):
            p = RawPeer(seeding.port, rcvbuf=4096)
            p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes([i]) * 12,
                                  wire.make_reserved(extended=False, fast=True))
                   + wire.have_none() + wire.interested())
            with contextlib.suppress(OSError):
                p.send(asks)
            hogs.append(p)
        time.sleep(1)
        # (behind the sixteen, four at a time: over 20 s)
        _leecher_beside(hogs, 12, raw, seeding, tmp_path, content, files)
    finally:
        assert d.stop() == 0, d.stderr()


def test_slow_readers_still_taking_what_they_asked_for_keep_their_unchoke_slots(
        tmp_path: Path) -> None:
    """Four peers each ask for 40 blocks at once and read them at about 40 KB/s, asking
    for no more meanwhile (as Transmission does while it works through what it asked
    for). Everything they asked for is handed to their sockets at once, so nothing is
    sent to them after the first second. A fifth peer is interested and waits. A peer
    was taken to "ask for nothing" once it had been sent nothing for a few seconds, so
    every second the slot went round: one of them lost it to the peer choked the
    second before, the waiter among them (unchoked, choked, unchoked again). Now a peer
    with bytes still on their way to it keeps its slot: over the choke round's ten
    seconds the waiter is unchoked once at most (the round's rotation) and never choked."""
    piece = 65536
    files = {"a.bin": 48 * piece}
    _, _, meta, torrent = _v1(tmp_path, files, piece, seed=45)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d, "--upload-slots", "4")
    got = [0] * 4
    stop = threading.Event()

    def read_slowly(i: int, p: RawPeer) -> None:
        p.sock.settimeout(0.05)
        while not stop.is_set():
            try:
                data = p.sock.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            got[i] += sum(len(ev.data) for ev in p.parser.feed(data)
                          if isinstance(ev, wire.Piece))
            time.sleep(0.05)

    readers: list[threading.Thread] = []
    try:
        slow = [RawPeer(seeding.port, rcvbuf=4096) for _ in range(4)]
        for i, p in enumerate(slow):
            p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes([i]) * 12,
                                  wire.make_reserved(extended=False, fast=True))
                   + wire.have_none() + wire.interested())
            time.sleep(0.3)  # unchoked at once (a free slot): asks while unchoked
            p.send(b"".join(wire.request(12 * i + k // 4, (k % 4) * 16384, 16384)
                            for k in range(40)))
            readers.append(threading.Thread(target=read_slowly, args=(i, p), daemon=True))
            readers[-1].start()
        time.sleep(1.0)
        waiter = RawPeer(seeding.port)
        waiter.send(wire.handshake(meta.info_hash, b"-XX0001-" + b"w" * 12,
                                   wire.make_reserved(extended=False, fast=True))
                    + wire.have_none() + wire.interested())
        time.sleep(10.0)  # (past STALL_SECONDS: the slow readers were sent nothing since)
        said = [type(ev).__name__ for ev in waiter.events(0.5)[0]
                if isinstance(ev, (wire.Choke, wire.Unchoke))]
        stop.set()
        for r in readers:
            r.join(5)
        assert said in ([], ["Unchoke"]), said
        assert all(200_000 <= g < 40 * 16384 for g in got), got  # (they read, slowly)
        waiter.close()
        for p in slow:
            p.close()
        seeding.stop()
    finally:
        stop.set()
        assert d.stop() == 0, d.stderr()


def test_a_peer_saying_interested_over_and_over_costs_the_daemon_nothing(
        tmp_path: Path) -> None:
    """Every INTERESTED (and each change of mind) used to make pieced-peer ask the daemon
    what it caches: 20,000 pairs of INTERESTED / NOT_INTERESTED (200 KB) cost the
    daemon about 2.5 CPU-seconds. What the daemon caches is asked at most once a second
    now, interest said again is no event at all, and a peer that changes its mind
    thousands of times a second is dropped."""
    piece = 16384
    files = {"a.bin": 40 * piece}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=44)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        p = RawPeer(seeding.port)
        p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes(12),
                              wire.make_reserved(extended=False, fast=True))
               + wire.have_none())
        p.events(1.0)
        before = _cpu_seconds(d.proc.pid)
        p.send((wire.interested() + wire.not_interested()) * 2_000
               + wire.interested() * 500)
        _, closed = p.events(3.0)
        assert not closed  # (a burst, under what is allowed)
        with contextlib.suppress(OSError):
            p.send((wire.interested() + wire.not_interested()) * 20_000)
        _, closed = p.events(3.0)
        assert closed
        spent = _cpu_seconds(d.proc.pid) - before
        assert spent < 0.5, spent
        p.close()
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        assert d.stop() == 0, d.stderr()


@pytest.mark.parametrize("flood", ["keepalive", "interest"])
def test_a_peer_streaming_messages_that_change_nothing_is_dropped(
        tmp_path: Path, flood: str) -> None:
    """A peer streaming keep-alives (262,144 a MiB), or INTERESTED / NOT_INTERESTED
    (each a choke round), as fast as it can: pieced-peer handled every one, a MiB at a
    time without a pause, and a libtorrent leecher beside it took minutes for what it
    gets in a second. Past a burst and a rate no honest peer comes near, the flooder is
    dropped, and the leecher gets every byte."""
    piece = 16384
    files = {"a.bin": 256 * piece + 77}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=45)
    msg = {"keepalive": wire.keep_alive(),
           "interest": wire.interested() + wire.not_interested()}[flood]
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    stop = threading.Event()
    closed: list[bool] = []

    def stream(p: RawPeer) -> None:
        chunk = msg * ((1 << 20) // len(msg))
        try:
            while not stop.is_set():
                p.send(chunk)
        except OSError:
            closed.append(True)

    try:
        p = RawPeer(seeding.port)
        p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes(12),
                              wire.make_reserved(extended=False, fast=True))
               + wire.have_none())
        flooder = threading.Thread(target=stream, args=(p,), daemon=True)
        flooder.start()
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        flooder.join(10)
        stop.set()
        flooder.join(10)
        p.close()
        assert closed == [True]
        assert seeding.proc.poll() is None
        seeding.stop()
    finally:
        stop.set()
        assert d.stop() == 0, d.stderr()


def test_blocks_of_a_leecher_gone_while_they_were_read_are_not_counted_up(
        tmp_path: Path) -> None:
    """Leechers asking for 2 MiB each and hanging up at once (a reset): the blocks read
    for them from the daemon meanwhile were queued to a closed connection, dropped, and
    counted in the summary's bytes_up (and the tracker's "uploaded") all the same: 7.7
    MiB for ten such leechers. Nothing reached them, and nothing is counted now; a
    libtorrent leecher after them is counted every byte it got."""
    piece = 1 << 20
    files = {"a.bin": 16 * piece}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=47)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    try:
        for i in range(6):
            p = RawPeer(seeding.port)
            p.send(wire.handshake(meta.info_hash, b"-RW0001-" + i.to_bytes(12, "big"),
                                  wire.make_reserved(fast=True))
                   + wire.have_none() + wire.interested())
            events, closed = p.events(1.0)
            assert wire.Unchoke() in events and not closed
            asked = [(q % meta.num_pieces, b) for q in (i, i + 1) for b in range(0, piece, 16384)]
            p.send(b"".join(wire.request(q, b, 16384) for q, b in asked))
            p.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            p.close()  # a reset: nothing more is read
            time.sleep(0.3)
        time.sleep(1)
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        up = _summary_after_sigint(seeding)["bytes_up"]
        assert isinstance(up, int)
        assert 16 * piece <= up < 17 * piece, f"{up} bytes counted up: 16 MiB were sent"
    finally:
        assert d.stop() == 0, d.stderr()


def _summary_after_sigint(seeding: Seeding) -> dict[str, object]:
    seeding.proc.send_signal(signal.SIGINT)
    out, err = seeding.proc.communicate(timeout=30)
    assert seeding.proc.returncode == 0, err
    summary: dict[str, object] = json.loads(out)
    return summary


def _lie_until_closed(port: int, info_hash: bytes, peer_id: bytes = b"-LI0001-" + bytes(12),
                      source: str | None = None) -> tuple[bool, int]:
    """Dial ``port`` (from the address ``source``) as a seeder that answers every
    request with a block of the right length and the wrong bytes, until the connection
    ends: (whether the handshake was answered, requests answered)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                 source_address=(source, 0) if source else None)
    parser = wire.Parser(handshake=True)
    s.sendall(wire.handshake(info_hash, peer_id, wire.make_reserved(extended=False, fast=True)))
    greeted, answered = False, 0
    try:
        while True:
            data = s.recv(1 << 16)
            if not data:
                break
            for ev in parser.feed(data):
                if isinstance(ev, wire.Handshake):
                    greeted = True
                    s.sendall(wire.have_all() + wire.unchoke())
                elif isinstance(ev, wire.Request):
                    s.sendall(wire.piece(ev.piece, ev.begin, b"\xee" * ev.length))
                    answered += 1
    except OSError:
        pass
    finally:
        s.close()
    return greeted, answered


def test_a_liar_that_dials_again_is_known_again(tmp_path: Path) -> None:
    """A peer that dials a downloading pieced-peer and sends bad data is dropped after
    three bad pieces; it dialled again from a new port and was a stranger each time, so
    it could go on lying for ever (and each dropped connection's MiB of buffer was kept
    by the blame records). What a peer that dials us did is kept per IP address and
    peer id: it is not let in again, and an honest seeder that dials in from the same
    address afterwards is let in, and gives every byte."""
    from tests.test_peer_libtorrent import listening

    piece = 16384
    files = {"a.bin": 24 * piece + 5}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=46)
    d = Daemon(tmp_path)
    proc, ours = listening(torrent, tmp_path / "dl", d)
    try:
        greeted, answered = _lie_until_closed(ours, meta.info_hash)
        assert greeted and answered >= 3
        for _ in range(5):
            greeted, answered = _lie_until_closed(ours, meta.info_hash)
            assert not greeted and answered == 0
        with LtPeer(raw, tmp_path / "seed", seed=True) as honest:
            honest.connect("127.0.0.1", ours)  # from the liar's address
            out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"], summary
        assert summary["bad_peers"] == ["127.0.0.1"], summary
        assert summary["peers_dropped_for_bad_data"] == 1, summary
        assert summary["pieces_failed"] >= 3, summary  # (asked for many at once)
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert d.stop() == 0, d.stderr()


def test_a_liar_taking_a_new_peer_id_at_each_dial_is_shut_out_by_its_address(
        tmp_path: Path) -> None:
    """A peer that dials us is known by its address and peer id; a liar that took a
    new peer id at each connection was a stranger each time, three more failed pieces
    each, for as long as it cared to (a download four times as long, one piece failing
    thousands of times). Once LIARS_PER_ADDRESS of them from one address are dropped,
    that address is let in no more (closed before its handshake is answered); a peer
    from another address still is, and gives every byte."""
    from pieced.peer.plugin import LIARS_PER_ADDRESS

    from tests.test_peer_libtorrent import listening

    piece = 16384
    files = {"a.bin": 40 * piece + 5}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=47)
    d = Daemon(tmp_path)
    proc, ours = listening(torrent, tmp_path / "dl", d)
    liar = "127.0.0.2"  # (loopback: any 127.x address reaches 127.0.0.1)
    try:
        for i in range(LIARS_PER_ADDRESS):
            greeted, answered = _lie_until_closed(
                ours, meta.info_hash, b"-LI0001-" + b"%012d" % i, source=liar)
            assert greeted and answered >= 3, (i, answered)
        for i in range(LIARS_PER_ADDRESS, LIARS_PER_ADDRESS + 5):
            greeted, answered = _lie_until_closed(
                ours, meta.info_hash, b"-LI0001-" + b"%012d" % i, source=liar)
            assert not greeted and answered == 0, (i, answered)
        with LtPeer(raw, tmp_path / "seed", seed=True) as honest:
            honest.connect("127.0.0.1", ours)  # another address
            out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["complete"], summary
        assert summary["bad_peers"] == [liar], summary
        assert summary["peers_dropped_for_bad_data"] == LIARS_PER_ADDRESS, summary
        assert "no more are let in from it" in err, err
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert d.stop() == 0, d.stderr()


class Staller:
    """Connections that dial a downloading pieced-peer, say they have every piece,
    unchoke it, take its requests and never answer one; each gone is replaced."""

    def __init__(self, port: int, info_hash: bytes, connections: int) -> None:
        self.port, self.info_hash = port, info_hash
        self.stop = threading.Event()
        self.requests = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(connections)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(wire.handshake(self.info_hash, b"-ST0001-" + b"%06d%06d" % (i, n),
                                             wire.make_reserved(extended=False, fast=True))
                              + wire.have_all() + wire.unchoke())
                    parser = wire.Parser(handshake=True)
                    while not self.stop.is_set():
                        try:
                            data = s.recv(1 << 16)
                        except TimeoutError:
                            continue
                        if not data:
                            break
                        self.requests += sum(isinstance(ev, wire.Request)
                                             for ev in parser.feed(data))
            except OSError:
                pass
            self.stop.wait(0.2)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_peers_that_take_requests_and_never_answer_do_not_hold_the_end_game(
        tmp_path: Path) -> None:
    """Forty connections that unchoke us and never answer, each replaced as it goes,
    beside one libtorrent seeder sending 4 MiB a second. In the end game a block asked
    of two peers is not asked of a third while both count as live, and a peer that had
    sent nothing counted: each new staller took a copy of the last blocks, and the
    seeder, idle, waited for two request timeouts after two (a 16 MiB download took 92 s
    where the seeder alone takes 5). A peer counts once it has sent a block."""
    from pieced.peer.plugin import REQUEST_TIMEOUT

    from tests.test_peer_libtorrent import listening

    piece = 65536
    files = {"a.bin": 16 * 1024 * 1024 + 12345}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=48)
    d = Daemon(tmp_path)
    with LtPeer(raw, tmp_path / "seed", seed=True,
                settings={"upload_rate_limit": 4 * 1024 * 1024, "limit_loopback": True}) as honest:
        proc, ours = listening(torrent, tmp_path / "dl", d, "--peer", f"127.0.0.1:{honest.port}")
        stallers = Staller(ours, meta.info_hash, 40)
        try:
            t0 = time.monotonic()
            out, err = proc.communicate(timeout=300)
            took = time.monotonic() - t0
        finally:
            stallers.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["complete"], summary
    assert stallers.requests > 0, "no staller was asked for anything: the case is not made"
    # (4 s of payload at the seeder's rate; no request timeout waited for)
    assert took < REQUEST_TIMEOUT, (took, summary)
    _same_tree(content, tmp_path / "dl" / "payload", files)
    assert d.stop() == 0, d.stderr()


def test_peers_that_ask_for_much_and_read_nothing_cost_bounded_memory(tmp_path: Path) -> None:
    """Twelve peers each ask for 500 blocks once unchoked (8 MiB), then read nothing.
    Every block read for them was queued on their connections: 8 MiB each, kept for as
    long as they stayed, every unchoked one adding its own (and a rotation unchokes them
    all in turn). Reads for a peer now stop once 2 MiB of its blocks are unsent, and go on
    as it reads; a libtorrent leecher beside them gets every byte."""
    piece = 262144
    files = {"a.bin": 40 * piece + 3}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=47)
    asks = b"".join(wire.request(p, b, 16384) for p in range(meta.num_pieces - 1)
                    for b in range(0, piece, 16384))[: 17 * 500]
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    hogs: list[RawPeer] = []
    try:
        for i in range(12):
            p = RawPeer(seeding.port, rcvbuf=4096)
            p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes([i]) * 12,
                                  wire.make_reserved(extended=False, fast=True))
                   + wire.have_none())
            hogs.append(p)
        time.sleep(1)
        base = _memory(seeding.proc.pid, "RssAnon")  # (with their connections' own buffers)
        for p in hogs:
            p.send(wire.interested())

        def ask_once_unchoked(p: RawPeer) -> None:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                got, closed = p.events(0.5)
                if closed:
                    return
                if any(isinstance(e, wire.Unchoke) for e in got):
                    p.send(asks)  # and reads nothing more
                    return

        askers = [threading.Thread(target=ask_once_unchoked, args=(p,), daemon=True)
                  for p in hogs]
        for t in askers:
            t.start()
        for t in askers:
            t.join(45)
        grown = _memory(seeding.proc.pid, "RssAnon") - base
        asked = 12 * len(asks) // 17 * 16384
        assert grown < asked // 3, (grown >> 20, asked >> 20)
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        for p in hogs:
            p.close()
        assert d.stop() == 0, d.stderr()


def test_bursts_and_storms_of_connections_cost_bounded_memory(tmp_path: Path) -> None:
    """Every connection read into a MiB of its own from its first byte, before the limit
    of peers was even looked at, and kept it until the collector found the cycles its
    objects make: 3,000 connections opened at once took a seeding pieced-peer to 545 MB,
    a storm of peers that handshake and hang up to 500-800 MB. A connection now reads
    into 64 KiB until a handshaken peer fills it, and lets it go as it closes."""
    import os

    piece = 262144
    files = {"a.bin": 24 * piece + 3}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=53)
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    stop = threading.Event()
    made = {"storm": 0}

    def storm() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", seeding.port), timeout=2) as sk:
                    sk.sendall(wire.handshake(meta.info_hash, b"-ST0001-" + os.urandom(12)[:12],
                                              wire.make_reserved(extended=False, fast=True))
                               + wire.have_none() + wire.interested())
                made["storm"] += 1
            except OSError:
                continue

    burst: list[socket.socket] = []
    try:
        time.sleep(1)
        base = _memory(seeding.proc.pid, "VmRSS")
        for _ in range(1500):  # at once, and silent
            sk = socket.socket()
            sk.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sk.connect(("127.0.0.1", seeding.port))
            burst.append(sk)
        time.sleep(3)
        for sk in burst:
            sk.close()
        storms = [threading.Thread(target=storm, daemon=True) for _ in range(8)]
        for t in storms:
            t.start()
        time.sleep(6)
        stop.set()
        for t in storms:
            t.join(5)
        peak = _memory(seeding.proc.pid, "VmHWM")
        assert made["storm"] > 200, made
        assert peak - base < 100 << 20, ((peak - base) >> 20, made)
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        stop.set()
        for sk in burst:
            sk.close()
        assert d.stop() == 0, d.stderr()


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets a process holds descriptors of."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().name
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
    return found


def _inode_of_connection(local_port: int, remote_port: int) -> int | None:
    """The inode of the loopback TCP socket from ``local_port`` to ``remote_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == local_port and int(f[2].split(":")[1], 16) == remote_port:
            return int(f[9])
    return None


def test_a_dropped_peer_that_reads_nothing_lets_its_socket_and_queued_blocks_go(
        tmp_path: Path) -> None:
    """Peers ask for 2,000 blocks once unchoked, read none, then break the protocol (a
    stream of keep-alives) and keep their end open. pieced-peer dropped them with a close
    that waits to send what is queued first: each kept its descriptor and MiBs of blocks
    for as long as it stayed, and a peer doing it again and again took descriptors and
    memory without bound (1.6 MiB and a descriptor a time). A dropped peer now goes at
    once (reset: not left to the kernel with its blocks either): its socket is no more
    pieced-peer's, and a libtorrent leecher still gets every byte."""
    piece = 65536
    files = {"a.bin": 256 * piece + 5}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=59)
    asks = b"".join(wire.request(j % (meta.num_pieces - 1), (j // meta.num_pieces) % 4 * 16384,
                                 16384) for j in range(MAX_PEER_QUEUE))
    d = Daemon(tmp_path)
    seeding = Seeding(torrent, tmp_path / "seed", d)
    rogues: list[RawPeer] = []
    theirs: set[int | None] = set()
    try:
        for i in range(4):  # one after another: each takes the unchoke slot of the last
            p = RawPeer(seeding.port, rcvbuf=4096)
            rogues.append(p)
            p.send(wire.handshake(meta.info_hash, b"-XX0001-" + bytes([i]) * 12,
                                  wire.make_reserved(extended=False, fast=True))
                   + wire.have_none() + wire.interested())
            got: list[wire.Event] = []
            deadline = time.monotonic() + 20
            while not any(isinstance(e, wire.Unchoke) for e in got):
                assert time.monotonic() < deadline, got
                more, closed = p.events(0.5)
                assert not closed
                got += more
            p.send(asks)  # and reads nothing more
            time.sleep(0.5)
            theirs.add(_inode_of_connection(seeding.port, p.sock.getsockname()[1]))
            p.send(wire.keep_alive() * 6000)  # past any burst of chatter: dropped
        assert None not in theirs
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and theirs & _socket_inodes(seeding.proc.pid):
            time.sleep(0.2)
        assert not theirs & _socket_inodes(seeding.proc.pid), "dropped peers' sockets kept"
        # Nor does the kernel keep them, with what was queued for them (a close left each
        # to it, its blocks unsent, for as long as the peer read nothing): reset.
        kept = [p for p in rogues
                if _inode_of_connection(seeding.port, p.sock.getsockname()[1]) is not None]
        assert not kept, "the kernel still holds the connections of dropped peers"
        assert seeding.proc.poll() is None
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        seeding.stop()
    finally:
        for p in rogues:
            p.close()
        assert d.stop() == 0, d.stderr()


def test_a_storm_of_connections_past_the_descriptor_limit_is_said_in_a_few_lines(
        tmp_path: Path) -> None:
    """pieced-peer seeding with 64 descriptors allowed (soft and hard) and the default
    --max-peers 50, and a storm of 150 peers that handshake and hold on: asyncio said
    each connection it could not accept for want of descriptors, with a traceback, some
    tens of thousands of lines in half a minute. --max-peers is now lowered to fit the
    limit (said once), a failed accept is said at most every ten seconds, and once the
    storm has gone a libtorrent leecher gets every byte."""
    import resource

    piece = 32768
    files = {"a.bin": 20 * piece + 3}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=47)
    d = Daemon(tmp_path)

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.Popen(
        peer_cmd(torrent, tmp_path / "seed", d.socket, "--listen", "127.0.0.1:0", "--seed"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=few_descriptors)
    storm: list[socket.socket] = []
    try:
        assert proc.stderr is not None
        said = [proc.stderr.readline() for _ in range(2)]
        assert "--max-peers 50 -> 1" in said[0], said
        assert "listening on" in said[1], said
        port = int(said[1].rsplit(":", 1)[1])
        hello = wire.handshake(meta.info_hash, b"-XX0001-" + b"s" * 12,
                               wire.make_reserved(extended=False, fast=True))
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), 10)
            with contextlib.suppress(OSError):
                s.sendall(hello)
            storm.append(s)
        time.sleep(5)
        for s in storm:
            s.close()
        storm.clear()
        time.sleep(1.5)  # (accepting again)
        seeding = Seeding.__new__(Seeding)
        seeding.proc, seeding.port = proc, port
        leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        lines = err.splitlines()
        assert len(lines) <= 3, lines[:20]  # (a warning or two)
        assert "Traceback" not in err
    finally:
        for s in storm:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert d.stop() == 0, d.stderr()


def _liar_dialling_in(port: int, info_hash: bytes, stop: threading.Event) -> None:
    """From 127.0.0.2: says it has every piece and unchokes, answers requests for the
    first two blocks of a piece with garbage and lets the others time out; when
    dropped, comes back half a second later with another peer id."""
    while not stop.is_set():
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            s.settimeout(0.1)
            s.connect(("127.0.0.1", port))
            s.sendall(wire.handshake(info_hash, b"-LR0001-" + random.randbytes(12),
                                     wire.make_reserved(extended=False, fast=True))
                      + wire.have_all() + wire.unchoke())
            parser = wire.Parser(handshake=True)
            while not stop.is_set():
                try:
                    data = s.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                for ev in parser.feed(data):
                    if isinstance(ev, wire.Request) and ev.begin < 2 * 16384:
                        s.sendall(wire.piece(ev.piece, ev.begin, b"\x5a" * ev.length))
        stop.wait(0.5)


@pytest.mark.parametrize("restart", [False, True], ids=["", "daemon_restarted"])
def test_a_liar_that_lets_requests_time_out_holds_no_piece_an_honest_seed_has(
        tmp_path: Path, restart: bool) -> None:
    """A downloading pieced-peer dials an honest seed (libtorrent, 800 kB/s); a liar
    dials in (see _liar_dialling_in). A piece that failed with blocks of both was asked
    of one peer alone: the liar took it again each time its requests timed out, and the
    seed waited with nothing to do (the download stopped short in 7 of 12 runs). With
    the daemon restarted midway, the pieces the liar had begun (its blocks kept by the
    daemon, their sender unknown) failed with the seed's blocks, the seed was banned
    for them with no verdict, and they were asked of the liar alone: 13 to 20 of them
    never came (4 of 4). Now a piece asked of one peer goes to one that sends what it
    is asked for and has tried it least, whole; a source that lets requests time out
    does not keep the bans of the others; the download finishes, the seed is never
    taken for a liar, and the liar is named (without the restart: see below)."""
    piece = 65536
    files = {"a.bin": 100 * piece + 777}
    content, raw, meta, torrent = _v1(tmp_path, files, piece, seed=49)
    d = Daemon(tmp_path)
    stop = threading.Event()
    proc: subprocess.Popen[str] | None = None
    try:
        with LtPeer(raw, tmp_path / "seed", seed=True,
                    settings={"upload_rate_limit": 800_000, "limit_loopback": True}) as seed:
            proc = subprocess.Popen(
                peer_cmd(torrent, tmp_path / "dl", d.socket, "--peer", f"127.0.0.1:{seed.port}",
                         "--listen", "127.0.0.1:0"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "listening on" in line, line
            port = int(line.rsplit(":", 1)[1])
            threading.Thread(target=_liar_dialling_in, args=(port, meta.info_hash, stop),
                             daemon=True).start()
            if restart:
                deadline = time.monotonic() + 60
                with Client(d.socket) as c:
                    while c.status(meta.info_hash, files=False)["verified_pieces"] < 30:
                        assert time.monotonic() < deadline and proc.poll() is None
                        time.sleep(0.05)
                assert d.stop() == 0, d.stderr()
                d = Daemon(tmp_path)
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-3000:]
            summary = json.loads(out)
            assert summary["complete"] and "127.0.0.1" not in summary["bad_peers"], summary
            # Named when one of its pieces failed with a sure record of who sent what.
            # Across the daemon's restart the blocks it kept are nobody's (its writer
            # 0), and a piece of the liar's blocks among them gives no verdict: the
            # liar, let time out and asked little after, may go unnamed (1 run in 20).
            assert restart or "127.0.0.2" in summary["bad_peers"], summary
        _same_tree(content, tmp_path / "dl" / "payload", files)
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        assert d.stop() == 0, d.stderr()
