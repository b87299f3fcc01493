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

from pathlib import Path

import pytest

from bench.crash import Ext4Image, crash_rounds, prepare_torrent, summarise
from tests.conftest import STORES_NOTHING
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
