"""SIGKILL a real daemon at random moments while a download streams in, 15 times per kind
of torrent (v1, hybrid), restarting it each time.

Every piece whose ``piece_verified`` event the daemon sent must be reported verified by
the first ``status`` after the restart (its ``have`` bit set at once, before any
rehashing), and every piece reported verified must have the payload's bytes on disk. The
rounds are ``bench/crash.py``'s, imported from there (``python bench/crash.py`` runs more
of them and prints the figures): start, check what the last kill left, write the missing
blocks shuffled over both transports, SIGKILL a random delay after a random block or a
random announcement. On each storage backend that stores (``backend``, see conftest.py),
given to the daemons as ``PIECED_BACKEND``: 15 rounds a kind on posix, 8 on the others.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pieced.protocol.client import Client
from pieced.storage.files import SYNCFS_FILES

from bench.crash import Ext4Image, crash_rounds, have_set, prepare_torrent, summarise
from tests.conftest import STORES_NOTHING, Daemon
from tests.realtools import TorrentKind

ROUNDS = 15
#: The other backends run fewer (the whole set of rounds on each would add a minute to
#: the suite).
ROUNDS_ELSEWHERE = 8
#: What the failure message shows of the first kill that forgot a piece or vouched for a
#: wrong one.
SHOWN = ("kill", "blocks_to_write", "blocks_sent", "kill_trigger", "killed_after_ms",
         "announced", "verified_after_restart", "forgotten", "wrong", "reverifying_pieces",
         "forgotten_pieces", "wrong_pieces")


@pytest.mark.slow
@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize(("kind", "piece_length", "seed"),
                         [("v1", 32768, 1), ("hybrid", 65536, 2)])
def test_a_sigkill_forgets_no_announced_piece_and_vouches_for_no_wrong_one(
    tmp_path: Path, kind: TorrentKind, piece_length: int, seed: int, backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIECED_BACKEND", backend)  # the rounds' daemons take our environment
    t = prepare_torrent(tmp_path / "work", kind, piece_length)
    rounds = ROUNDS if backend == "posix" else ROUNDS_ELSEWHERE
    kills = crash_rounds(t, tmp_path / "run", rounds, seed=seed)
    totals = summarise(kills)
    per_kill = {k: [x[k] for x in kills] for k in ("announced", "forgotten", "wrong")}
    assert totals["kills"] == rounds
    # Not vacuous: many kills came after pieces had been announced in their round (every
    # other round arms its kill on an announcement).
    assert totals["kills_after_announcements"] >= rounds // 3, per_kill
    first = next((x for x in kills if x["wrong"] or x["forgotten"]), None)
    detail = {k: first[k] for k in SHOWN} if first else None
    assert totals["wrong"] == 0, f"wrong bytes: {per_kill}; first such kill: {detail}"
    assert totals["forgotten"] == 0, f"forgotten: {per_kill}; first such kill: {detail}"


@pytest.mark.slow
@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize(("kind", "piece_length", "seed"),
                         [("v1", 32768, 3), ("hybrid", 65536, 4)])
def test_a_power_cut_forgets_no_announced_piece_and_vouches_for_no_wrong_one(
    tmp_path: Path, kind: TorrentKind, piece_length: int, seed: int, backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same rounds, with the power cut instead of a bare SIGKILL: the state folder and
    the payload on an ext4 file system that drops at once every write not yet durable
    (``bench.crash.Ext4Image``), then mounted again as after a reboot. (A SIGKILL alone
    leaves the daemon's unsynced writes to the kernel, which writes them all the same:
    it cannot tell a piece announced before its bytes or its record were durable.) The
    promises are the pieces announced before the cut."""
    monkeypatch.setenv("PIECED_BACKEND", backend)
    t = prepare_torrent(tmp_path / "work", kind, piece_length)
    rounds = ROUNDS if backend == "posix" else ROUNDS_ELSEWHERE
    power = Ext4Image(tmp_path / "ext4.img", tmp_path / "cut", 128)
    try:
        kills = crash_rounds(t, tmp_path / "cut" / "run", rounds, seed=seed, power=power)
    finally:
        power.close()
    totals = summarise(kills)
    per_kill = {k: [x[k] for x in kills] for k in ("promised", "forgotten", "wrong")}
    assert totals["kills"] == rounds
    assert totals["kills_after_announcements"] >= rounds // 3, per_kill
    assert totals["promised"] > 0, per_kill
    first = next((x for x in kills if x["wrong"] or x["forgotten"]), None)
    detail = {k: first[k] for k in SHOWN} if first else None
    assert totals["wrong"] == 0, f"wrong bytes: {per_kill}; first such cut: {detail}"
    assert totals["forgotten"] == 0, f"forgotten: {per_kill}; first such cut: {detail}"


@pytest.mark.backends(exclude={"disabled": STORES_NOTHING})
@pytest.mark.parametrize("files", [1, SYNCFS_FILES])
@pytest.mark.parametrize("end", ["completed, killed", "under way, stopped"])
def test_a_power_cut_after_blocks_written_over_checks_nothing_again(
    tmp_path: Path, backend: str, files: int, end: str,
) -> None:
    """The payload on a file system of its own, whose power is cut after the torrent
    completed (or after a clean stop); the state folder elsewhere. A piece that first
    failed (a bad block: its blocks are in the file) and is then written whole again
    changes no size and no block of its file: its fdatasync writes no inode, and the
    times the overwrite gave the file are durable only at the file system's next
    journal commit. The completion (or the stop) stamped the file with those times;
    the cut took them back, and the restart found every such file changed behind the
    daemon's back and checked it whole again (its pieces missing from the first
    ``status``, ``reverifying_pieces`` above 0). The times a stamp records are made
    durable first (an fsync a file, or one syncfs for many)."""


    spec = {f"f{i:02}.bin": 3 * 32768 + 77 * i + 5 for i in range(files)}
    t = prepare_torrent(tmp_path / "work", "v1", 32768, spec, seed=7)
    # commit=60: nothing but an fsync (or a sync) commits the journal meanwhile
    power = Ext4Image(tmp_path / "ext4.img", tmp_path / "cut", 64, options="commit=60")
    save = tmp_path / "cut" / "save"
    save.mkdir()
    (tmp_path / "d").mkdir()
    env = {"PIECED_ROOTS": str(tmp_path)}
    try:
        d = Daemon(tmp_path / "d", backend=backend, env=env)
        with Client(str(d.socket), timeout=30) as c:
            ih = c.register(t.raw, save)
            # a block of each file's first piece bad, then all the rest: they fail
            firsts = {off // t.piece_length for _, off, _ in t.files}
            left = {t.num_pieces - 1} if end == "under way, stopped" else set()
            for p, b, n in t.blocks:
                data = bytes(t.block(p, b, n))
                if p in firsts and b == 0:
                    data = bytes([data[0] ^ 1]) + data[1:]
                if p not in left:
                    c.write_chunk(ih, p, b, data)
            c.flush_all()
            want = set(range(t.num_pieces)) - left
            assert have_set(c.status(ih), t.num_pieces) == want - firsts
            time.sleep(0.05)  # (the overwrites' times are not the first writes')
            for p, b, n in t.blocks:
                if p in firsts:
                    c.write_chunk(ih, p, b, bytes(t.block(p, b, n)))
            c.flush_all()
            assert have_set(c.status(ih), t.num_pieces) == want
        if left:
            assert d.stop() == 0, d.stderr()
        else:
            d.proc.kill()
            d.proc.wait()
        power.cut()
        power.restore()
        d = Daemon(tmp_path / "d", backend=backend, env=env)
        with Client(str(d.socket), timeout=30) as c:
            st = c.status(ih)
            assert st["reverifying_pieces"] == 0, st
            assert have_set(st, t.num_pieces) == want
        assert t.wrong_pieces(save, want) == []
        assert d.stop() == 0, d.stderr()
    finally:
        power.close()
