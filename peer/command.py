"""The ``pieced-peer`` command's entry point, kept light so that SIGINT and SIGTERM are
heard from its first moment: sent while the rest of the peer was being imported (a few
hundred milliseconds), either killed the process, with no summary and no exit status of
its own. A signal noted before the run's own handlers are in place stops the run as
soon as it begins, as any stop does (exit 1, or 0 with ``--seed``; with ``--json``, its
summary)."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def main(argv: list[str] | None = None) -> int:
    early: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        early.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note)
    from pieced.peer.plugin import main as run_command

    return run_command(argv, early)


if __name__ == "__main__":
    sys.exit(main())
