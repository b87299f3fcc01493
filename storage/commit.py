"""Group commit: verified pieces become durable, journaled and announced in batches.

A piece that passed its hashes is written and in state *committing*. Committing a
batch of a torrent's pieces is: fdatasync the files they touch, append one journal
record per piece and fdatasync the journal, mark them verified, announce them. With a
window, a committer thread hands every torrent with pieces waiting to a thread of its
file system's once per window, so one fdatasync per file covers every piece verified in
the window; with no window the thread that verified a piece commits it at once.

The committer holds a torrent's fence shared while it commits, and only tries to take
it: a torrent whose fence is held or awaited alone (recheck, move, unregister...) is
skipped, and the fenced operation commits (or, for unregister, cancels) what waits.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection, Hashable
from typing import Any

from .torrent import Torrent

log = logging.getLogger("pieced.storage")

Commit = Callable[[Torrent, list[tuple[int, Any]]], None]


#: Threads that commit, each for the torrents of one file system (by device) at a
#: time: more file systems than this share them.
LANES = 8


class GroupCommit:
    """``lane_of(t)``: a key of the file system of the torrent's files (its device).
    Commits run on a thread of their file system's, so that a disk whose syncs hang (a
    USB disk spinning up, a network mount gone) holds up the pieces of its own torrents
    only: with one thread for all, every torrent's announcements waited for its syncs.
    A torrent has one commit at a time, in the order its pieces were verified."""

    def __init__(self, commit: Commit, window: float,
                 lane_of: Callable[[Torrent], Hashable] = lambda t: None) -> None:
        self._commit = commit
        self.window = window
        self._lane_of = lane_of
        self._cond = threading.Condition()
        self._waiting: dict[int, Torrent] = {}  # torrents with pending pieces
        self._running: set[int] = set()  # torrents handed to a lane, not yet committed
        self._lanes: dict[int, _Lane] = {}
        self._slots: dict[Hashable, int] = {}  # file system -> its lane
        self._stop = False
        self._hurry = threading.Event()  # set: the window is cut short (a drain waits)
        self._thread: threading.Thread | None = None
        if window > 0:
            self._thread = threading.Thread(target=self._run, name="pieced-commit", daemon=True)
            self._thread.start()

    def verified(self, t: Torrent, piece: int, result: Any) -> None:
        """A piece passed and was written; the caller holds the torrent shared."""
        if self._thread is None:
            self._commit(t, [(piece, result)])
            return
        with self._cond:
            t.pending.append((piece, result))
            self._waiting[t.id] = t
            self._cond.notify_all()

    def take(self, t: Torrent) -> list[tuple[int, Any]]:
        """The torrent's pieces waiting to be committed, now the caller's to commit or
        cancel (it holds the torrent alone, so no more arrive)."""
        with self._cond:
            pieces, t.pending = t.pending, []
            self._waiting.pop(t.id, None)
            self._cond.notify_all()
            return pieces

    def _due(self) -> list[Torrent]:
        """(Caller holds ``_cond``.) Torrents with pieces waiting and no commit under way."""
        return [t for tid, t in self._waiting.items() if tid not in self._running]

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due() and not self._stop:
                    self._cond.wait()
                if self._stop and not self._waiting:
                    return
            self._hurry.wait(self.window)
            with self._cond:
                self._hurry.clear()
                for t in self._due():
                    self._running.add(t.id)
                    self._lane(t).put(t)

    def _lane(self, t: Torrent) -> _Lane:
        """(Caller holds ``_cond``.)"""
        try:
            key = self._lane_of(t)
        except Exception:  # (a torrent being removed: any lane will do)
            key = None
        slot = self._slots.get(key)
        if slot is None:  # (the first LANES file systems seen get a lane each)
            slot = self._slots[key] = len(self._slots) % LANES
        lane = self._lanes.get(slot)
        if lane is None:
            lane = self._lanes[slot] = _Lane(self._commit_one, f"pieced-commit_{slot}")
        return lane

    def _commit_one(self, t: Torrent) -> None:
        try:
            if not t.fence.try_shared():
                return  # a fenced operation commits (or cancels) them
            try:
                pieces = self.take(t)
                if pieces and not t.removed:
                    self._commit(t, pieces)
            finally:
                t.fence.release_shared()
        except Exception:
            # (The commit took its pieces back.) One torrent's trouble stops
            # neither the others' commits nor the drains that wait for them.
            log.exception("commit of pieces of torrent %s", t.key.hex())
        finally:
            with self._cond:
                self._running.discard(t.id)
                self._cond.notify_all()

    def drain(self, ids: Collection[int] | None = None) -> None:
        """Wait until every piece verified so far is committed (or cancelled): of the
        torrents of these ids, or of all. The caller must not hold any torrent's fence."""
        if self._thread is None:
            return
        with self._cond:
            self._cond.notify_all()
            while True:
                busy = self._waiting.keys() | self._running
                if not (busy if ids is None else busy & set(ids)):
                    return
                self._hurry.set()
                self._cond.wait(0.05)

    def stop(self) -> None:
        if self._thread is None:
            return
        self.drain()
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        for lane in self._lanes.values():
            lane.stop()


class _Lane:
    """A thread committing the torrents handed to it, one after the other."""

    def __init__(self, commit: Callable[[Torrent], None], name: str) -> None:
        self._commit = commit
        self._queue: queue.SimpleQueue[Torrent | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, t: Torrent) -> None:
        self._queue.put(t)

    def _run(self) -> None:
        while (t := self._queue.get()) is not None:
            self._commit(t)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()


__all__ = ["GroupCommit"]
