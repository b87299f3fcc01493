"""Which block to ask which peer for: rarest piece first, pieces finished before new
ones are started, and an end game that asks an idle peer for what another is late with.

Pure state, no I/O: the plugin tells it what peers have and what arrived, and asks it
for requests to send.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator

from pieced.storage.layout import Layout
from pieced.storage.metainfo import Metainfo

BLOCK = 16384
ENDGAME_BLOCKS = 4  # blocks already asked of another given to an idle peer at a time
# The rarest-first order of the pieces not started is sorted again, when peers' pieces
# changed, at most this often (a second per 100,000 pieces): sorting every piece at each
# new piece started took most of the plugin's time on torrents of 100,000 pieces.
RANK_SECONDS = 1.0
# A peer with fewer than 1/SPARSE of the pieces is served by a look at its pieces alone,
# not by a walk down the order of every piece.
SPARSE = 16

# Equally rare pieces are taken a run of this many bytes at a time, the runs in random
# order (libtorrent's piece extent affinity): a torrent of small files is then written
# file after file, each opened once, not one piece here and one there (a random piece
# of 12,000 files each time made the daemon open a file for nearly every piece).
EXTENT = 4 * 1024 * 1024

# Refused with no piece of ours in progress (other torrents' fill the daemon), no piece is
# begun for a while: HOLD_FIRST seconds, twice as long at each such refusal, up to
# HOLD_MAX, until a piece verifies. Else each piece would be asked for, come whole, and
# be dropped again, as fast as the peers send (a download took 100 times its size).
HOLD_FIRST = 0.05
HOLD_MAX = 2.0

Block = tuple[int, int, int]  # (piece, begin, length)
_NOBODY: frozenset[object] = frozenset()


def where(flags: bytes | bytearray, value: int = 1) -> Iterator[int]:
    """The indices of ``value`` in a have-array (a byte a piece), found by the bytes'
    own search: what walks a peer's pieces walks those it has (or lacks), not every
    piece in Python (a peer of a torrent of a million pieces cost 0.2 s each)."""
    i = flags.find(value)
    while i >= 0:
        yield i
        i = flags.find(value, i + 1)


def extent_order(pieces: int, piece_length: int) -> list[int]:
    """Every piece, in runs of :data:`EXTENT` bytes of pieces in order, the runs
    shuffled: the order ties between equally rare pieces are broken in."""
    run = max(1, EXTENT // piece_length)
    starts = list(range(0, pieces, run))
    random.shuffle(starts)
    return [p for s in starts for p in range(s, min(s + run, pieces))]


def block_plan(meta: Metainfo, layout: Layout, piece: int) -> list[tuple[int, int]]:
    """The (begin, length) of each block of ``piece`` a peer is asked for.

    Blocks are 16 KiB from the piece's start. One that runs from a file's end into a
    BEP 47 pad runs on (the pad part is zeros), as libtorrent asks; one wholly inside a
    pad is never asked for (the daemon counts pads as received). In a v2-only torrent a
    block stops at its file's end: the space after it is alignment, not data.
    """
    size = layout.piece_size(piece)
    if not layout.unstored:
        return _plain_plan(size)
    # The stored runs (adjacent files merged), walked once: a piece of a small file in
    # a v2 torrent of 16 MiB pieces is 1,024 blocks of which one holds data, and a look
    # at each of them cost 2 ms a piece (most of a download of many small files).
    runs: list[list[int]] = []
    for s in layout.map(piece, 0, size):
        if not s.stored or not s.length:
            continue
        if runs and runs[-1][1] == s.buf_offset:
            runs[-1][1] += s.length
        else:
            runs.append([s.buf_offset, s.buf_offset + s.length])
    if runs == [[0, size]]:  # no pad in it: the usual piece
        return _plain_plan(size)
    clip = not meta.has_v1
    out: list[tuple[int, int]] = []
    for start, end in runs:
        first = start // BLOCK
        if clip and start % BLOCK:
            first += 1  # (a block that starts in a pad is not asked for)
        for k in range(first, -(-end // BLOCK)):
            b = k * BLOCK
            if out and out[-1][0] == b:
                continue  # (the block that runs on from the run before into this one)
            n = min(BLOCK, size - b)
            out.append((b, min(n, end - b) if clip else n))
    return out


@functools.lru_cache(maxsize=64)
def _plain_plan(size: int) -> list[tuple[int, int]]:
    """The plan of a piece without pads: the same for every piece of its size, so made
    once and shared (read-only; a torrent of a million pieces holds one, not a million)."""
    return [(b, min(BLOCK, size - b)) for b in range(0, size, BLOCK)]


class Picker:
    """Piece and block selection for one torrent."""

    def __init__(self, meta: Metainfo, have: Iterable[bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.meta = meta
        self._clock = clock
        self.layout = Layout(meta)
        n = meta.num_pieces
        self.have = bytearray(1 if h else 0 for h in have)  # (changed by the methods below)
        self._left = self.have.count(0)
        assert len(self.have) == n
        # How many peers have each piece: availability[p] + seeds. A peer with every
        # piece is counted once, in ``seeds``, not once a piece: it changes no piece's
        # rank, and connecting it costs nothing per piece.
        self.availability = [0] * n
        self.seeds = 0
        self._plans: dict[int, list[tuple[int, int]]] = {}
        # Blocks of pieces under way: asked for (block -> peers asked) and received.
        self.requested: dict[Block, set[object]] = {}
        self.received: set[Block] = set()
        self.started: dict[int, int] = {}  # piece -> blocks not yet received
        # Of those, the ones with a block not yet received (what the end game looks at),
        # and the ones with a block nobody is asked for (what a pick looks at first): a
        # pick walks these, not every piece started (thousands wait for the daemon to
        # verify them when it falls behind: a walk of them at each pick made a download
        # of 20,000 pieces take ten times as long as libtorrent's).
        self._unfinished: dict[int, None] = {}
        self._open: dict[int, None] = {}
        # How many pieces may be under way at once (None: no bound). The daemon holds a
        # few KiB of hash state for each piece in progress and refuses a block that would
        # start one past its bound (max_partial_pieces): a refusal halves it, and it grows
        # by one for as many pieces verified as it is (as TCP's window). Refusals of
        # pieces begun before the last cut are of the same cause (their blocks were on
        # their way): they cut no further. ``_begun``: piece -> the count of pieces begun
        # when it was.
        self.max_started: float | None = None
        self._begun: dict[int, int] = {}
        self._starts = 0
        self._cut_at = -1
        self._hold_until = 0.0  # (0: no hold)
        self._hold = 0.0
        # Outside end game a piece's blocks are asked for in order: the first never
        # asked for is at its cursor, and blocks given back (rejected, their peer gone)
        # wait in ``_returned``, so a pick does not walk the blocks already asked for.
        self._cursor: dict[int, int] = {}
        self._returned: dict[int, list[Block]] = {}
        # Pieces asked of one peer alone, whole, until they verify (-> that peer, or None
        # while none has taken it): a piece that failed with blocks of several peers. Its
        # next attempts from a mix of peers fail as long as one of them lies, and none
        # says which (a seeder spoiling one block in twenty of every 4 MiB piece spoilt
        # every attempt, and the download never ended); an attempt of one peer's blocks
        # says whether that peer lied.
        self._solo: dict[int, object | None] = {}
        self._order = extent_order(n, meta.piece_length)
        self._run = max(1, EXTENT // meta.piece_length)  # pieces in a run of _order
        # Pieces left to another client of the daemon (1), taken after the others as
        # rare: see left_to_others. None until there is one.
        self._yielded: bytearray | None = None
        self._tie = [0] * n  # piece -> its place in _order
        for i, p in enumerate(self._order):
            self._tie[p] = i
        # Pieces we lacked at the last sort, rarest first; those had or started since
        # are passed over as they come (the ones before _ranked_from by every pick).
        self._ranked: list[int] = []
        self._ranked_from = 0
        self._ranked_at = -math.inf
        self._rank_stale = True  # availability changed since the sort
        self._rank_every = RANK_SECONDS * max(1, n // 100_000)

    @property
    def complete(self) -> bool:
        return not self._left

    def left(self) -> int:
        return self._left

    def plan(self, piece: int) -> list[tuple[int, int]]:
        p = self._plans.get(piece)
        if p is None:
            p = self._plans[piece] = block_plan(self.meta, self.layout, piece)
        return p

    # -- what peers have --------------------------------------------------------------
    def peer_has(self, pieces: Iterable[int]) -> None:
        for p in pieces:
            self.availability[p] += 1
        self._rank_stale = True

    def peer_lost(self, pieces: Iterable[int]) -> None:
        for p in pieces:
            self.availability[p] -= 1
        self._rank_stale = True

    def unavailable(self) -> int:
        """Pieces we lack that no connected peer has (what a stalled download waits on)."""
        if self.seeds:
            return 0
        availability = self.availability
        return sum(1 for p in where(self.have, 0) if not availability[p])

    def seed_came(self) -> None:
        """A peer with every piece: one more of each, and no order changes."""
        self.seeds += 1

    def seed_gone(self) -> None:
        self.seeds -= 1

    # -- what we get -----------------------------------------------------------------
    def block_received(self, block: Block) -> set[object] | frozenset[object]:
        """Record a block; the peers it was asked of (to cancel at the others)."""
        asked = self.requested.pop(block, None)
        started = self.started
        piece = block[0]
        if piece in started and block not in self.received:
            self.received.add(block)
            started[piece] -= 1
            if not started[piece]:
                self._unfinished.pop(piece, None)
                self._open.pop(piece, None)
        return asked if asked is not None else _NOBODY

    def held(self, piece: int, blocks: Iterable[Block]) -> None:
        """Blocks of a piece the daemon holds already (an earlier run stopped in the
        middle of it): the piece is under way with those received, and its other
        blocks are asked for before any new piece's."""
        if self.have[piece]:
            return
        self._start(piece)
        for blk in blocks:
            self.block_received(blk)

    def _start(self, piece: int) -> list[tuple[int, int]]:
        """The piece under way (if it was not), every block still to come; its plan."""
        plan = self.plan(piece)
        if piece not in self.started:
            self.started[piece] = len(plan)
            self._starts += 1
            self._begun[piece] = self._starts
            if plan:
                self._unfinished[piece] = self._open[piece] = None
        return plan

    def asked(self, piece: int) -> list[tuple[Block, set[object]]]:
        """The piece's blocks asked for and not received yet, and of whom."""
        requested = self.requested
        return [(blk, who) for b, n in self.plan(piece)
                if (who := requested.get(blk := (piece, b, n)))]

    def piece_verified(self, piece: int) -> None:
        self._left -= not self.have[piece]
        self.have[piece] = 1
        self._forget(piece)
        self._solo.pop(piece, None)
        if self.max_started is not None:
            self.max_started += 1 / self.max_started
        self._hold_until = self._hold = 0.0

    def left_to_others(self, piece: int) -> None:
        """Another client of the daemon (a second plugin on the same torrent) fetches
        the run of pieces ``piece`` is in: it has just verified this one. The pieces of
        the run not begun here are taken after all others as rare. Two clients that
        came to one run went through it side by side, each fetching every piece, until
        the run ended (a fifth to a half more of a download, from both together); the
        caller leaves the run to one of the two, always the same one."""
        start = piece - piece % self._run  # (runs begin at multiples of _run: extent_order)
        yielded = self._yielded
        if yielded is None:
            yielded = self._yielded = bytearray(len(self.have))
        elif yielded[start]:
            return
        end = min(start + self._run, len(yielded))
        yielded[start:end] = b"\x01" * (end - start)
        self._ranked_at = -math.inf
        self._rank_stale = True

    def refused(self, pieces: Collection[int]) -> None:
        """The daemon refused blocks of these pieces (too many pieces in progress): each
        is asked for again from its start, and fewer pieces are begun at once."""
        since = max((self._begun.get(p, self._starts) for p in pieces), default=-1)
        for piece in pieces:
            self._forget(piece)
        self._ranked_from = 0
        if since > self._cut_at or self.max_started is None:
            self._cut_at = self._starts
            self.max_started = max(1, len(self.started) // 2)
            if not self.started:  # (none of ours under way: only others' can end)
                self._hold = min(HOLD_MAX, max(HOLD_FIRST, 2 * self._hold))
                self._hold_until = self._clock() + self._hold

    def held_for(self) -> float:
        """Seconds before a piece may be begun again after a refusal (0: now)."""
        return max(0.0, self._hold_until - self._clock()) if self._hold_until else 0.0

    def piece_lost(self, piece: int) -> None:
        """A piece we had is not verified any more (another client's recheck failed it):
        wanted again, from the start."""
        self._left += self.have[piece]
        self.have[piece] = 0
        self._forget(piece)
        self._solo.pop(piece, None)
        self._ranked_at = -math.inf  # (not in the order: it was had when it was sorted)
        self._rank_stale = True

    def piece_failed(self, piece: int) -> None:
        """All of the piece is asked for again (a block was bad; which one is unknown).
        One asked of one peer alone is taken by the next peer that is asked for it."""
        self._forget(piece)
        if piece in self._solo:
            self._solo[piece] = None
        self._ranked_from = 0  # (it may lie before: it was started)

    def ask_of_one(self, piece: int) -> None:
        """The piece (failed with blocks of several peers) is asked of one peer alone,
        whole, from now until it verifies."""
        if not self.have[piece] and piece not in self._solo:
            self._solo[piece] = None

    def taker(self, piece: int) -> object | None:
        """The peer the piece is asked of alone (None: not taken, or not asked of one)."""
        return self._solo.get(piece)

    def _forget(self, piece: int) -> None:
        self.started.pop(piece, None)
        self._begun.pop(piece, None)
        self._unfinished.pop(piece, None)
        self._open.pop(piece, None)
        self._cursor.pop(piece, None)
        self._returned.pop(piece, None)
        for b, n in self.plan(piece):
            self.received.discard((piece, b, n))
            self.requested.pop((piece, b, n), None)

    def peer_gone(self, peer: object) -> None:
        """Its outstanding requests may be given to others, and so may the pieces it
        was asked for alone."""
        for block in [b for b, who in self.requested.items() if peer in who]:
            self.request_dropped(peer, block)
        for piece in [p for p, taker in self._solo.items() if taker is peer]:
            self._solo[piece] = None

    def request_dropped(self, peer: object, block: Block) -> None:
        who = self.requested.get(block)
        if who is not None:
            who.discard(peer)
            if not who:
                del self.requested[block]
                if block not in self.received and block[0] in self.started:
                    self._returned.setdefault(block[0], []).append(block)
                    self._open[block[0]] = None
        if self._solo.get(block[0]) is peer:
            # (choked, rejected, gone, late: the next peer takes the piece over, and is
            # asked for all of it, the blocks it already has too: its copies go over the
            # others in the daemon, so that the attempt is one peer's. Finished with the
            # first peer's blocks, it failed with both as before, again and again while
            # the first was a liar that let requests time out, and no verdict came.)
            self._solo[block[0]] = None
            self._forget(block[0])
            self._ranked_from = 0  # (it may lie before: it was started)

    # -- what to ask for -----------------------------------------------------------------
    def pick(self, peer: object, peer_has: bytearray | None, want: int,
             allowed: Iterable[int] | None = None, outstanding: int = 0,
             peer_count: int | None = None, endgame: bool = True,
             live: Callable[[object], bool] | None = None,
             solo_elsewhere: Callable[[int], bool] | None = None) -> list[Block]:
        """Up to ``want`` blocks to ask ``peer`` for (``peer_has``: None when it has
        all; ``peer_count``: how many it has, if known). ``allowed``: only these pieces
        (a choked peer's allowed-fast set).
        ``outstanding``: the peer's requests not yet answered; in the end game (every
        piece left under way) only a peer with none is given blocks already asked of
        another, ENDGAME_BLOCKS at a
        time (as libtorrent does: each such block is sent twice, one copy wasted), and
        not to a third peer while two ``live`` ones have it (by default every peer is
        live; one that lets requests time out is not, and does not count). Those asked
        last are given first (the last piece begun, its last block first): the other
        peer would send them last, and the cancel that goes to it once the idle peer's
        copy comes finds them still in its queue. The first blocks of its queue are on
        their way (a seed limited to 2 MB/s had them in its send buffer): given those,
        the idle peer's copies came twice, 3 to 5 % of a download from seeds of unlike
        rates. Without ``endgame`` the peer is given no block already asked of another.
        ``solo_elsewhere(piece)``: whether a piece asked of one peer alone, and taken by
        none, is better left for another (one that sends what it is asked for): a peer
        that took it and let its requests time out, taking it again at once, held it
        for good while a seeder beside it waited with nothing to do."""
        out: list[Block] = []
        if want <= 0:
            return out

        def has(p: int) -> bool:
            return not self.have[p] and (peer_has is None or bool(peer_has[p]))

        def take(p: int, endgame: bool) -> bool:
            if p in self._solo:
                if endgame:  # (never a copy of a block of it: see _solo)
                    return False
                owner = self._solo[p]
                if owner is None:
                    if solo_elsewhere is not None and solo_elsewhere(p):
                        return False
                    self._solo[p] = peer
                elif owner is not peer:
                    return False
            plan = self._start(p)
            if not endgame:
                back = self._returned.get(p)
                while back:
                    blk = back.pop()
                    if blk not in self.received and not self.requested.get(blk):
                        self.requested[blk] = {peer}
                        out.append(blk)
                        if len(out) >= want:
                            return True
                i = self._cursor.get(p, 0)
                while i < len(plan):
                    b, n = plan[i]
                    i += 1
                    blk = (p, b, n)
                    if blk in self.received or self.requested.get(blk):
                        continue
                    self.requested[blk] = {peer}
                    out.append(blk)
                    if len(out) >= want:
                        break
                self._cursor[p] = i
                if i >= len(plan) and not back:
                    self._open.pop(p, None)  # every block asked for (until one comes back)
                return len(out) >= want
            for b, n in reversed(plan):  # (the blocks asked last first: see pick)
                blk = (p, b, n)
                if blk in self.received:
                    continue
                who = self.requested.get(blk)
                if who and (peer in who or (len(who) > 1 and (
                        live is None or sum(1 for w in who if live(w)) > 1))):
                    continue
                self.requested.setdefault(blk, set()).add(peer)
                out.append(blk)
                if len(out) >= want:
                    return True
            return False

        candidates = list(allowed) if allowed is not None else None
        # pieces already started first: finished pieces are what peers can be given
        for p in list(self._open):
            if (candidates is None or p in candidates) and has(p) and take(p, False):
                return out
        bound = self.max_started
        if bound is not None and (
                (len(self.started) >= bound and self._left > len(self.started))
                or self.held_for()):
            # As many under way as the daemon takes, or a hold: none begun; nor the end
            # game (not every piece left is asked for: the others wait for room).
            return out
        fresh: Iterable[int]
        if candidates is not None:  # (a few allowed-fast pieces)
            fresh = sorted(
                (p for p in candidates if has(p) and p not in self.started),
                key=lambda p: (self.availability[p], self._tie[p]))
        else:
            fresh = self._fresh(peer_has, peer_count)
        for p in fresh:
            if bound is not None and len(self.started) >= bound:
                return out
            if take(p, False):
                return out
        if endgame and not out and not outstanding and self._left <= len(self.started):
            # Nothing new to ask for, and every piece left under way: end game, an idle
            # peer asked for what another is late with. (Begun as soon as this peer had
            # nothing new, pieces not yet asked of anyone left, its copies of the blocks
            # queued at a slow seed came first, and the seed sent its own all the same,
            # cancelled too late: three pieced-peers beside a seed at 2 MB/s had it send
            # 20-45 % of the torrent twice. libtorrent's strict end game, its default,
            # waits for the same.)
            want = min(want, ENDGAME_BLOCKS)
            for p in reversed(list(self._unfinished)):
                if (candidates is None or p in candidates) and has(p) and take(p, True):
                    return out
        return out

    def _fresh(self, peer_has: bytearray | None, count: int | None) -> Iterator[int]:
        """The pieces not started that the peer has and we lack, rarest first."""
        have, started = self.have, self.started
        n = len(have)
        if peer_has is not None and (
                peer_has.count(1) if count is None else count) * SPARSE < n:
            mine = [p for p in where(peer_has) if not have[p] and p not in started]
            avail, tie, y = self.availability, self._tie, self._yielded
            mine.sort(key=lambda p: (avail[p], y[p] if y is not None else 0, tie[p]))
            yield from mine
            return
        now = self._clock()
        if self._rank_stale and now - self._ranked_at >= self._rank_every:
            avail, y = self.availability, self._yielded
            self._ranked = sorted((p for p in self._order if not have[p]),
                                  key=avail.__getitem__ if y is None
                                  else lambda p: 2 * avail[p] + y[p])
            self._ranked_from, self._ranked_at, self._rank_stale = 0, now, False
        ranked = self._ranked
        i = self._ranked_from
        while i < len(ranked) and (have[ranked[i]] or ranked[i] in started):
            i += 1  # nobody's to start any more (until it is forgotten: piece_failed)
        self._ranked_from = i
        for j in range(i, len(ranked)):
            p = ranked[j]
            if not have[p] and p not in started and (peer_has is None or peer_has[p]):
                yield p
