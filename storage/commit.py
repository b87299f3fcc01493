"""Group commit: verified pieces become durable, journaled and announced in batches.

A piece that passed its hashes is written and in state *committing*. Committing a
batch of a torrent's pieces is: fdatasync the files they touch, append one journal
record per piece and fdatasync the journal, mark them verified, announce them. With a
window, a committer thread does that once per window for every torrent with pieces
waiting, so one fdatasync per file covers every piece verified in the window; with no
window the thread that verified a piece commits it at once.

The committer holds a torrent's fence shared while it commits, and only tries to take
it: a torrent whose fence is held or awaited alone (recheck, move, unregister...) is
skipped, and the fenced operation commits (or, for unregister, cancels) what waits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .torrent import Torrent

log = logging.getLogger("pieced.storage")

Commit = Callable[[Torrent, list[tuple[int, Any]]], None]


class GroupCommit:
    def __init__(self, commit: Commit, window: float) -> None:
        self._commit = commit
        self.window = window
        self._cond = threading.Condition()
        self._waiting: dict[int, Torrent] = {}  # torrents with pending pieces
        self._busy = False
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

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop and not self._waiting:
                    return
            self._hurry.wait(self.window)
            with self._cond:
                self._hurry.clear()
                torrents = list(self._waiting.values())
                self._busy = True
            try:
                for t in torrents:
                    if not t.fence.try_shared():
                        continue  # a fenced operation commits (or cancels) them
                    try:
                        pieces = self.take(t)
                        if pieces and not t.removed:
                            self._commit(t, pieces)
                    except Exception:
                        # (The commit took its pieces back.) One torrent's trouble stops
                        # neither the others' commits nor the drains that wait for them.
                        log.exception("commit of pieces of torrent %s", t.key.hex())
                    finally:
                        t.fence.release_shared()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every piece verified so far is committed (or cancelled).
        The caller must not hold any torrent's fence."""
        if self._thread is None:
            return
        with self._cond:
            self._cond.notify_all()
            while self._waiting or self._busy:
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


__all__ = ["GroupCommit"]
