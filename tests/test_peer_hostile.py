"""pieced-peer, seeding, against peers that break the rules: each is answered as the
rules say or dropped, and a libtorrent leecher beside them still gets every byte."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from pieced.peer import wire
from pieced.storage.metainfo import parse

from tests.conftest import Daemon
from tests.ltpeer import LtPeer
from tests.realtools import make_payload, make_torrent_lt
from tests.test_peer_libtorrent import Seeding, _same_tree


class RawPeer:
    """A hand-driven peer on a plain socket, speaking through the codec under test's
    encoders (the bytes are the protocol's; the parser checks what comes back)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
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


def _an_honest_leecher_gets_every_byte(raw: bytes, seeding: Seeding, tmp_path: Path,
                                       content: Path, files: dict[str, int]) -> None:
    """A libtorrent leecher downloads everything from ``seeding``, without a hash failure."""
    with LtPeer(raw, tmp_path / "leech", seed=False) as leecher:
        leecher.connect("127.0.0.1", seeding.port)
        leecher.wait_finished(60)
        assert leecher.hash_failures() == 0
    _same_tree(content, tmp_path / "leech" / "payload", files)


def test_peers_that_break_the_rules(tmp_path: Path) -> None:
    piece = 32768
    files = {"a.bin": 20 * piece + 99, "b.bin": 5000}
    content = make_payload(tmp_path / "seed", files, seed=31)
    raw = make_torrent_lt(content, piece, "v1")
    meta = parse(raw)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
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
        flood = [(i % full, 0, 16384) for i in range(900)]
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

        _an_honest_leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
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
    content = make_payload(tmp_path / "seed", files, seed=32)
    raw = make_torrent_lt(content, piece, "v1")
    meta = parse(raw)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
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


def test_peers_that_never_handshake_lose_their_slots(tmp_path: Path) -> None:
    """With every connection slot (``--max-peers``) taken by peers that send no
    handshake, one silent and one dribbling a byte a second, a newcomer is turned away;
    the handshake deadline then frees the slots, and a libtorrent leecher gets every
    byte. Without the deadline the dribbler would hold its slot for ever."""
    piece = 32768
    files = {"a.bin": 12 * piece + 5}
    content = make_payload(tmp_path / "seed", files, seed=33)
    raw = make_torrent_lt(content, piece, "v1")
    meta = parse(raw)
    torrent = tmp_path / "t.torrent"
    torrent.write_bytes(raw)
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
        _an_honest_leecher_gets_every_byte(raw, seeding, tmp_path, content, files)
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
