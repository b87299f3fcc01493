#!/usr/bin/env python3
"""libtorrent checking a torrent's data the way operators tune it for checking.

``bench/recheck.py`` runs this as a process of its own and times it whole. The session
is ``tests.realtools.lt_session_settings`` (all networking off) with the three settings
that operators raise for checking set explicitly, whatever the core count:
``hashing_threads`` = 2, ``aio_threads`` = 4, ``checking_mem_usage`` = 4096 (16 KiB
blocks: 64 MiB in flight). The torrent is added without resume data, so libtorrent
checks what is on disk; ``stop_when_ready`` pauses it when the check ends.

Usage: ``lt_check.py TORRENT SAVE_PATH [--timeout S]``. Prints one JSON object
(``pieces``, ``failed``, ``settings``); exit status 0 when every piece is good.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import libtorrent as lt

from tests.realtools import lt_session_settings

CHECKING_SETTINGS = {"hashing_threads": 2, "aio_threads": 4, "checking_mem_usage": 4096}


def lt_check(torrent: bytes, save_path: Path, settings: dict[str, Any],
             timeout: float) -> list[bool]:
    """One bool per piece: whether a session with ``settings`` found it good."""
    ti = lt.torrent_info(torrent)
    params = lt.session_params()
    params.settings = settings  # type: ignore[assignment]
    ses = lt.session(params)
    try:
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(save_path)
        atp.flags = (lt.torrent_flags.stop_when_ready | lt.torrent_flags.disable_dht
                     | lt.torrent_flags.disable_lsd | lt.torrent_flags.disable_pex)
        h = ses.add_torrent(atp)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"libtorrent still checking after {timeout}s")
            ses.wait_for_alert(int(min(left, 0.5) * 1000) + 1)
            for a in ses.pop_alerts():
                if isinstance(a, lt.torrent_error_alert | lt.file_error_alert):
                    raise RuntimeError(f"libtorrent: {a.message()}")
                if isinstance(a, lt.torrent_checked_alert):
                    return [h.have_piece(i) for i in range(ti.num_pieces())]
    finally:
        ses.pause()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("torrent", type=Path)
    ap.add_argument("save_path", type=Path)
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    settings = {**lt_session_settings(), **CHECKING_SETTINGS}
    have = lt_check(args.torrent.read_bytes(), args.save_path, settings, args.timeout)
    failed = [i for i, ok in enumerate(have) if not ok]
    print(json.dumps({"pieces": len(have), "failed": failed[:100],
                      "settings": CHECKING_SETTINGS}))
    return 1 if failed or not have else 0


if __name__ == "__main__":
    sys.exit(main())
