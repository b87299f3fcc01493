"""Which peer sent the bad block of a piece that failed its hash.

A piece's hash says only that one of its blocks is wrong. When every block came from
one peer, that peer lied. When several peers gave blocks, the piece is asked for again,
and once it verifies, each earlier block is compared with the good one: a peer whose
block differs lied (libtorrent's "smart ban" does the same with the blocks it reads
back from disk).

Comparing needs a digest of each block of the failed attempt, and hashing every block
of every download for a failure that almost never comes costs a tenth of the plugin's
CPU. So the blocks of a piece's first giver are not hashed: if the piece fails and
every hashed block of the other givers matches the good piece, the wrong block can only
be one of the first giver's. A piece that failed before is hashed whole on its next
attempt, since that attempt is the reference the earlier ones are compared with.

Other clients of the daemon may write blocks of the same piece (another plugin on the
same torrent): a verdict is given on an attempt only when this process sent every
block of it (``blocks_in``) and the daemon saw no other writer (they may have written
over one of ours), else the bad block may have been theirs.

An attempt is what the daemon had when its last missing block came: a copy of a block
sent again before then replaces the earlier one, a copy sent after it is not part of
it (the daemon drops it while it hashes the piece, or starts the next attempt with it
once the piece failed, and which of the two is not known here). So a copy that comes
once every block was sent is not recorded against the attempt, and the attempt after
it (it may hold such copies, unrecorded) gives no verdict of its own: end-game copies
of a liar's blocks from an honest seeder, arriving while the piece was hashed, had the
seeder named as the failed attempt's only giver. (Blocks must be recorded in the order
they are written.)

Sans-I/O: peers are any hashable objects; the caller acts on the verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from blake3 import blake3

P = TypeVar("P")

MAX_ATTEMPTS = 8  # failed attempts at a piece kept to compare with the good one, the latest

# (begin, peer, BLAKE3 of the block, or None for the first giver's unhashed blocks)
_Sent = list[tuple[int, P, bytes | None]]


class Attribution(Generic[P]):
    """``blocks_in(piece)``: how many blocks a whole attempt at the piece has."""

    def __init__(self, blocks_in: Callable[[int], int]) -> None:
        self._blocks_in = blocks_in
        self._sent: dict[int, dict[int, tuple[P, bytes | None]]] = {}
        self._first: dict[int, P] = {}
        # piece -> its failed attempts, and whether each was all ours
        self._suspects: dict[int, list[tuple[_Sent[P], bool]]] = {}
        # pieces whose attempt was whole and then had copies sent (not recorded); and
        # pieces whose attempt may hold such copies of the attempt before
        self._late: set[int] = set()
        self._unsure: set[int] = set()
        self.hashed = 0  # blocks hashed, for the curious

    def block(self, piece: int, begin: int, peer: P, data: bytes | memoryview) -> None:
        """A block of ``piece`` from ``peer`` is on its way to storage."""
        sent = self._sent.get(piece)
        if sent is None:
            sent = self._sent[piece] = {}
            self._first[piece] = peer
        elif len(sent) >= self._blocks_in(piece):
            self._late.add(piece)  # the attempt was whole: this copy is not part of it
            return
        if peer == self._first[piece] and piece not in self._suspects:
            sent[begin] = (peer, None)
        else:
            self.hashed += 1
            sent[begin] = (peer, blake3(data).digest(16))

    def failed(self, piece: int, alone: bool = True) -> list[P]:
        """The piece failed its hash: the peers known at once to have lied (its only
        giver); with several givers, the verdict waits for the piece to verify.
        ``alone``: no one but this process wrote into the attempt (the daemon says how
        many did); else the attempt is not all ours, whatever we sent."""
        sent = self._sent.pop(piece, {})
        self._first.pop(piece, None)
        givers = list(dict.fromkeys(peer for peer, _ in sent.values()))
        recorded = len(sent) >= self._blocks_in(piece)
        unsure = piece in self._unsure
        whole = alone and recorded and not unsure
        # Where the attempt ended among our copies is known only when it was all ours
        # and began where we began recording it: else copies recorded against it may
        # have gone to the next one.
        self._next_attempt(piece, bool(sent) and not whole)
        if len(givers) == 1 and whole:
            return givers
        if givers:
            attempts = self._suspects.setdefault(piece, [])
            attempts.append(([(begin, peer, digest) for begin, (peer, digest) in sent.items()],
                             whole))
            del attempts[:-MAX_ATTEMPTS]  # (the latest: a piece may fail again and again)
        return []

    def verified(self, piece: int, reference: bool = True) -> list[P]:
        """The piece verified: the peers whose blocks of earlier failed attempts differ
        from the good ones (or, where every hashed block of an attempt matches, that
        attempt's first giver, whose blocks were not hashed). ``reference``: the attempt
        that verified was all this process's blocks; else what it sent may not be what
        verified (another client's copy may have replaced it), and no verdict is given."""
        good = self._sent.pop(piece, {})
        self._first.pop(piece, None)
        if piece in self._unsure:
            reference = False  # (what it had may not be what we recorded of it)
        self._late.discard(piece)
        self._unsure.discard(piece)
        if not reference:
            self._suspects.pop(piece, None)
            return []
        liars: dict[P, None] = {}
        for attempt, whole in self._suspects.pop(piece, []):
            found, unsure = False, not whole  # (a block not ours may have been the bad one)
            for begin, peer, digest in attempt:
                if digest is None:
                    continue
                now = good.get(begin)
                if now is None or now[1] is None:
                    unsure = True  # nothing to compare it with: no verdict on the rest
                elif now[1] != digest:
                    liars[peer] = None
                    found = True
            if not found and not unsure:
                for _, peer, digest in attempt:
                    if digest is None:
                        liars[peer] = None
        return list(liars)

    def forget(self, piece: int) -> None:
        """The piece's attempt came to nothing, through no fault of its givers (its bytes
        were lost on the way to disk): no verdict on it. Earlier failed attempts wait
        for the piece to verify, as before."""
        self._next_attempt(piece, piece in self._sent)
        self._sent.pop(piece, None)
        self._first.pop(piece, None)

    def _next_attempt(self, piece: int, unplaced: bool) -> None:
        """The daemon ended an attempt at the piece: the next gives no verdict if copies
        of ours may be in it unrecorded (sent once the attempt was whole, or ``unplaced``:
        sent where its end among them is not known). So does every one after it until
        the piece verifies: where each began among our copies is not known either (the
        daemon may end several before we hear of the first)."""
        if unplaced or piece in self._late:
            self._unsure.add(piece)
        self._late.discard(piece)

    def givers(self, piece: int) -> list[P]:
        """Who gave the blocks recorded against the piece's attempt under way."""
        return list(dict.fromkeys(peer for peer, _ in self._sent.get(piece, {}).values()))

    def unsure(self, piece: int) -> bool:
        """Whether the attempt under way gives no verdict of its own (see above): a
        caller still counts it as a try with each of its givers, or a piece that only a
        liar has would be asked of it for ever."""
        return piece in self._unsure


__all__ = ["Attribution"]
