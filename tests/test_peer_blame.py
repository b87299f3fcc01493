"""Telling which peer sent the bad block of a failed piece (peer/blame.py), without
sockets: blocks from several peers, liars among them, the piece failing and then
verifying with good blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pieced.peer.blame import Attribution

BLOCK = 16384


def good(begin: int) -> bytes:
    return begin.to_bytes(8, "big") * (BLOCK // 8)


def bad(begin: int) -> bytes:
    return b"\xff" + good(begin)[1:]


def test_a_piece_from_one_peer_blames_it_without_hashing() -> None:
    a: Attribution[str] = Attribution(lambda piece: 8)
    for b in range(0, 8 * BLOCK, BLOCK):
        a.block(0, b, "A", bad(b) if b == 3 * BLOCK else good(b))
    assert a.hashed == 0
    assert a.failed(0) == ["A"]
    for b in range(0, 8 * BLOCK, BLOCK):
        a.block(0, b, "C", good(b))
    assert a.verified(0) == []


def test_a_hashed_liar_and_an_unhashed_liar_are_found() -> None:
    # first giver A (unhashed) honest, B (hashed) lies: B
    a: Attribution[str] = Attribution(lambda piece: 3 if piece == 5 else 2)
    a.block(5, 0, "A", good(0))
    a.block(5, BLOCK, "B", bad(BLOCK))
    a.block(5, 2 * BLOCK, "A", good(2 * BLOCK))
    assert a.hashed == 1
    assert a.failed(5) == []
    for b in range(0, 3 * BLOCK, BLOCK):
        a.block(5, b, "C", good(b))
    assert a.hashed == 4  # a piece that failed is hashed whole next time
    assert a.verified(5) == ["B"]
    # first giver A lies, B honest: A, though its blocks were never hashed
    a.block(6, 0, "A", bad(0))
    a.block(6, BLOCK, "B", good(BLOCK))
    assert a.failed(6) == []
    a.block(6, 0, "B", good(0))
    a.block(6, BLOCK, "B", good(BLOCK))
    assert a.verified(6) == ["A"]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_an_honest_peer_is_never_blamed(data: st.DataObject) -> None:
    """Blocks of one piece from up to four peers, some of them liars, over one or two
    failed attempts: whoever is blamed lied, and when an attempt had several givers
    and every hashed block in it can be compared, a liar of it is found."""
    peers = ["A", "B", "C", "D"]
    liars = set(data.draw(st.lists(st.sampled_from(peers), min_size=1, max_size=3)))
    nblocks = data.draw(st.integers(1, 6))
    a: Attribution[str] = Attribution(lambda piece: nblocks)
    blamed: list[str] = []
    lied: set[str] = set()
    verified = False
    for _ in range(data.draw(st.integers(1, 2))):
        givers = data.draw(st.lists(st.sampled_from(peers), min_size=nblocks, max_size=nblocks))
        sent_bad = False
        for i, who in enumerate(givers):
            lie = who in liars and data.draw(st.booleans())
            if lie:
                sent_bad = True
                lied.add(who)
            a.block(0, i * BLOCK, who, bad(i * BLOCK) if lie else good(i * BLOCK))
        if sent_bad:
            blamed += a.failed(0)
        else:  # every block good: the piece verifies
            blamed += a.verified(0)
            verified = True
            break
    if not verified:
        honest = [p for p in peers if p not in liars] or ["E"]
        for i in range(nblocks):
            a.block(0, i * BLOCK, honest[0], good(i * BLOCK))
        blamed += a.verified(0)
    assert set(blamed) <= lied, (blamed, liars)
    if lied:
        assert blamed, (blamed, liars)


def test_blocks_another_client_wrote_blame_no_one_of_ours() -> None:
    """Another client of the daemon (a second plugin on the torrent) wrote one block of
    the piece, a bad one: our only giver, who sent the other blocks, is not blamed for
    the failure, nor once the piece verifies."""
    a: Attribution[str] = Attribution(lambda piece: 3)
    a.block(0, 0, "A", good(0))
    a.block(0, 2 * BLOCK, "A", good(2 * BLOCK))  # block 1 came from elsewhere, bad
    assert a.failed(0) == []
    for b in range(0, 3 * BLOCK, BLOCK):
        a.block(0, b, "A", good(b))
    assert a.verified(0) == []


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_with_blocks_from_elsewhere_an_honest_peer_is_never_blamed(data: st.DataObject) -> None:
    """As above, with some blocks of each attempt written by another client (good or
    bad, not seen here): whoever is blamed lied."""
    peers = ["A", "B", "C"]
    liars = set(data.draw(st.lists(st.sampled_from(peers), max_size=2)))
    nblocks = data.draw(st.integers(1, 6))
    a: Attribution[str] = Attribution(lambda piece: nblocks)
    blamed: list[str] = []
    lied: set[str] = set()
    for _ in range(data.draw(st.integers(1, 3))):
        bad_piece = False
        for i in range(nblocks):
            who = data.draw(st.sampled_from([*peers, "elsewhere"]))
            lie = data.draw(st.booleans()) and (who in liars or who == "elsewhere")
            bad_piece |= lie
            if who == "elsewhere":
                continue
            if lie:
                lied.add(who)
            a.block(0, i * BLOCK, who, bad(i * BLOCK) if lie else good(i * BLOCK))
        if bad_piece:
            blamed += a.failed(0)
        else:
            blamed += a.verified(0)
            break
    assert set(blamed) <= lied, (blamed, liars, lied)


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_copies_sent_while_the_daemon_hashes_the_piece_blame_no_honest_peer(
        data: st.DataObject) -> None:
    """Blocks recorded in the order they are written, against a model of what the
    daemon makes of them: an attempt takes each block's last copy until every block is
    in; copies written from then on are dropped while it hashes the piece, and once a
    failed piece is reset they start the next attempt, before this process hears the
    verdict (a few writes later). An end-game copy from an honest peer sent while a
    liar's piece was hashed had the honest peer named as the attempt's only giver.
    Whoever is blamed sent a bad copy."""
    peers = ["A", "B", "C"]
    liars = set(data.draw(st.lists(st.sampled_from(peers), max_size=2)))
    n = data.draw(st.integers(1, 4))
    a: Attribution[str] = Attribution(lambda piece: n)
    blamed: list[str] = []
    lied: set[str] = set()
    attempt: dict[int, bool] = {}  # the daemon's: block -> its copy is good
    dropping = 0  # writes the daemon drops from now (it hashes the piece)
    verified = False  # in the daemon
    heard: list[list[int | bool]] = []  # verdicts on their way: [writes to come, ok]
    for _ in range(data.draw(st.integers(1, 40))):
        i = data.draw(st.integers(0, n - 1))
        who = data.draw(st.sampled_from(peers))
        lie = who in liars and data.draw(st.booleans())
        lied |= {who} if lie else set()
        a.block(0, i * BLOCK, who, bad(i * BLOCK) if lie else good(i * BLOCK))
        for v in heard:  # (written after these verdicts were given)
            v[0] = int(v[0]) - 1
        if verified or dropping:
            dropping = max(0, dropping - 1)
        else:
            attempt[i] = not lie
            if len(attempt) == n:
                ok = all(attempt.values())
                attempt = {}
                verified = ok
                dropping = data.draw(st.integers(0, 3))
                heard.append([dropping + data.draw(st.integers(0, 3)), ok])
        while heard and int(heard[0][0]) <= 0:
            _, ok = heard.pop(0)
            if ok:
                blamed += a.verified(0)
                break
            blamed += a.failed(0)
        else:
            continue
        break  # (the piece verified: nothing more is sent)
    assert set(blamed) <= lied, (blamed, liars, lied)
