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

Sans-I/O: peers are any hashable objects; the caller acts on the verdicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from blake3 import blake3

P = TypeVar("P")

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
        self.hashed = 0  # blocks hashed, for the curious

    def block(self, piece: int, begin: int, peer: P, data: bytes | memoryview) -> None:
        """A block of ``piece`` from ``peer`` is on its way to storage."""
        sent = self._sent.get(piece)
        if sent is None:
            sent = self._sent[piece] = {}
            self._first[piece] = peer
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
        whole = alone and len(sent) >= self._blocks_in(piece)
        if len(givers) == 1 and whole:
            return givers
        if givers:
            self._suspects.setdefault(piece, []).append(
                ([(begin, peer, digest) for begin, (peer, digest) in sent.items()], whole))
        return []

    def verified(self, piece: int, reference: bool = True) -> list[P]:
        """The piece verified: the peers whose blocks of earlier failed attempts differ
        from the good ones (or, where every hashed block of an attempt matches, that
        attempt's first giver, whose blocks were not hashed). ``reference``: the attempt
        that verified was all this process's blocks; else what it sent may not be what
        verified (another client's copy may have replaced it), and no verdict is given."""
        good = self._sent.pop(piece, {})
        self._first.pop(piece, None)
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
        self._sent.pop(piece, None)
        self._first.pop(piece, None)

    def giver_count(self, piece: int) -> int:
        return len({peer for peer, _ in self._sent.get(piece, {}).values()})


__all__ = ["Attribution"]
