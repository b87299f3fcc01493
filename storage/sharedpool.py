"""A few objects shared by every thread, made when first needed: the direct backend's
bounce buffers and the uring backend's rings.

Each used to be one per thread, kept for as long as the thread lived (the daemon's pools
keep up to about seventy threads): memory and descriptors past every budget. A taker
holds one object for one call (a read, a write, a submit and its wait) and waits for
one to come back when all are taken; it takes it before any lock its holders may need,
so no wait is made while holding what another holder waits for.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedPool(Generic[T]):
    """At most ``limit`` objects, shared."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free: list[T] = []
        self.made = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def take(self, fit: Callable[[T | None], T],
             keep: Callable[[T], bool] = lambda _: True) -> Iterator[T]:
        """An object for the ``with`` block: ``fit`` is given a free one (None when one
        is to be made) and returns the one to use (it, or one made in its place); one
        that ``keep`` refuses afterwards (broken) is dropped, and another made later."""
        with self._take(fit, keep, True) as obj:
            assert obj is not None
            yield obj

    def take_if_free(self, fit: Callable[[T | None], T],
                     keep: Callable[[T], bool] = lambda _: True
                     ) -> contextlib.AbstractContextManager[T | None]:
        """As :meth:`take`, but None at once when every object is taken: their holders
        may be waiting on a disk that hangs, and the caller has another way."""
        return self._take(fit, keep, False)

    @contextlib.contextmanager
    def _take(self, fit: Callable[[T | None], T], keep: Callable[[T], bool],
              wait: bool) -> Iterator[T | None]:
        with self._cond:
            while not self._free and self.made >= self.limit:
                if not wait:
                    break
                self._cond.wait()
            none_free = not self._free and self.made >= self.limit
            if not none_free:
                got = self._free.pop() if self._free else None
                if got is None:
                    self.made += 1
        if none_free:
            yield None
            return
        obj = got
        try:
            obj = fit(got)
            yield obj
        finally:
            with self._cond:
                if obj is not None and keep(obj):
                    self._free.append(obj)
                else:
                    self.made -= 1
                self._cond.notify()
