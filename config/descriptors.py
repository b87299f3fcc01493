"""The descriptor limit of a pieced process (the daemon, ``pieced verify``,
``pieced-peer``): payload files, clients and peers each hold one."""

from __future__ import annotations

import contextlib
import resource

# The most any of them asks for: a soft limit raised further buys nothing.
WANTED = 1 << 20


def raise_open_files() -> int | None:
    """The soft limit (often 1024) raised to the hard one, as far as WANTED; the limit
    then in force, or None when there is none."""
    with contextlib.suppress(OSError, ValueError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = WANTED if hard == resource.RLIM_INFINITY else min(hard, WANTED)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft
