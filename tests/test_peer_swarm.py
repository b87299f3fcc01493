"""pieced-peer's swarm in process, against a real daemon: how it follows the daemon's
word on which pieces are verified when other clients change it too."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pieced.peer.plugin import Options, Swarm
from pieced.protocol.client import Client
from pieced.storage.metainfo import parse

from tests.conftest import Daemon
from tests.realtools import make_payload, make_torrent_lt


def test_a_piece_cleared_while_a_status_is_on_its_way_is_not_taken_from_it(
    daemon: Daemon, tmp_path: Path
) -> None:
    """pieced-peer asks the daemon's status now and then (a reconcile); the events that
    come before the reply are as new as its snapshot, or newer. A piece another client
    clears once the snapshot is taken, its piece_failed arriving first, stays missing:
    the older snapshot does not make pieced-peer announce it and serve it again."""
    content = make_payload(tmp_path / "save", {"a.bin": 6 * 65536 + 7}, seed=3)
    raw = make_torrent_lt(content, 65536, "v1")
    meta = parse(raw)
    opts = Options(torrent=tmp_path / "t.torrent", save_path=tmp_path / "save",
                   listen=("127.0.0.1", 0), seed=True, socket=str(daemon.socket))
    victim = 2

    def clear_by_another_client() -> None:
        with Client(daemon.socket) as c:
            c.clear_piece(meta.info_hash, victim)

    async def run() -> None:
        swarm = Swarm(opts, raw, meta)
        await swarm.start()  # registers and checks the payload: every piece verified
        try:
            picker = swarm.picker
            assert picker is not None and picker.complete
            ask = swarm.client.status

            async def status_then_a_clear(*args: Any, **kwargs: Any) -> dict[str, Any]:
                snapshot = await ask(*args, **kwargs)
                await asyncio.to_thread(clear_by_another_client)
                for _ in range(1000):  # its piece_failed reaches the swarm first
                    if not picker.have[victim]:
                        break
                    await asyncio.sleep(0.01)
                assert not picker.have[victim], "the clear's event never came"
                return snapshot

            swarm.client.status = status_then_a_clear  # type: ignore[method-assign]
            await swarm._look()
            assert not picker.have[victim]
            assert not picker.complete
            swarm.client.status = ask  # type: ignore[method-assign]
            await swarm._look()  # the daemon's word now: still missing
            assert not picker.have[victim]
        finally:
            await swarm.close()

    asyncio.run(run())
