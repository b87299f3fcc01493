"""A torrent-client plugin in miniature: hand every block of a torrent to pieced.

The payload folder stands in for the peers (it holds the torrent's file or top-level
folder, like ``pieced verify --data``). Blocks go out in piece order, exactly as a peer
(libtorrent) sends them: 16 KiB from the start of the piece, the last one cut at the
piece's end. With v1 hashes (v1 and hybrid torrents) a block runs on from a file's end
into the pad file after it, the pad part being zeros, and a block wholly inside a pad
is not sent; in a v2-only torrent a block stops at its file's end. They travel through
the shared-memory ring (``write_block_direct``) or, with ``--inline``, in the socket
stream (``write_chunk``). Exit status 1 if a piece fails:
    .venv/bin/python examples/plugin.py FILE.torrent PAYLOAD_DIR SAVE_PATH --socket SOCK [--inline]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pieced.protocol.client import Client
from pieced.storage.errors import AlreadyRegistered, PiecedError
from pieced.storage.layout import Layout, Segment
from pieced.storage.metainfo import Metainfo, parse

BLOCK = 16 * 1024


class Source:
    """What the peers would send us: the torrent's files under a folder, read with pread."""

    def __init__(self, meta: Metainfo, root: Path) -> None:
        self.meta, self.root = meta, root
        self.fds: dict[int, int] = {}

    def read(self, seg: Segment) -> bytes:
        """A segment's bytes: a file's from disk, zeros for a pad file."""
        if not seg.stored:
            return bytes(seg.length)
        fd = self.fds.get(seg.file_index)
        if fd is None:
            path = self.root.joinpath(*self.meta.files[seg.file_index].path)
            fd = self.fds[seg.file_index] = os.open(path, os.O_RDONLY)
        data = os.pread(fd, seg.length, seg.file_offset)
        if len(data) != seg.length:
            raise OSError(f"short read in {self.meta.files[seg.file_index].path}")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def peer_blocks(meta: Metainfo, layout: Layout, piece: int) -> list[tuple[int, list[Segment]]]:
    """(begin, segments) of each block of a piece, as a peer requests and sends them."""
    size = layout.piece_size(piece)
    out: list[tuple[int, list[Segment]]] = []
    for begin in range(0, size, BLOCK):
        segs = layout.map(piece, begin, min(BLOCK, size - begin))
        pads = [i for i, s in enumerate(segs) if meta.files[s.file_index].pad]
        if len(pads) == len(segs):
            continue  # wholly inside a pad: never requested
        if pads and not meta.has_v1:
            segs = segs[: pads[0]]  # v2-only: the block stops at the file's end
            if not segs:
                continue
        out.append((begin, segs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Feed a torrent's blocks to pieced, as a plugin would.")
    p.add_argument("torrent", type=Path, help="the .torrent file")
    p.add_argument("payload", type=Path, help="folder holding the torrent's data (stands in for peers)")
    p.add_argument("save_path", type=Path, help="where pieced stores the torrent")
    p.add_argument("--socket", default=os.environ.get("PIECED_SOCKET", "var/pieced.sock"))
    p.add_argument("--inline", action="store_true", help="write_chunk instead of the shared ring")
    args = p.parse_args(argv)

    raw = args.torrent.read_bytes()
    meta = parse(raw)
    layout = Layout(meta)
    counts = {"piece_verified": 0, "piece_failed": 0}
    failed: list[int] = []

    def on_event(name: str, fields: dict[str, Any]) -> None:
        if name in counts and fields.get("ih") in meta.aliases:
            counts[name] += 1
            if name == "piece_failed":
                failed.append(fields["piece"])

    source = Source(meta, args.payload)
    sent = writes = 0
    started = time.monotonic()
    try:
        with Client(args.socket, on_event=on_event) as c:
            try:
                ih = c.register(raw, args.save_path.resolve())
            except AlreadyRegistered:
                ih = meta.info_hash
                print("already registered: blocks of pieces it has are ignored")
            write = c.write_chunk if args.inline else c.write_block_direct
            for piece in range(meta.num_pieces):
                for begin, segs in peer_blocks(meta, layout, piece):
                    data = b"".join(source.read(s) for s in segs)
                    write(ih, piece, begin, data)
                    sent, writes = sent + len(data), writes + 1
            c.wait_writes()  # every block acknowledged (handled, not yet verified)
            c.flush_all()  # durable; its reply comes after every piece event before it
            st = c.status(ih, files=False)
    except (PiecedError, OSError) as exc:
        print(f"plugin: {exc}", file=sys.stderr)
        return 2
    finally:
        source.close()
    secs = time.monotonic() - started
    print(f"{meta.name} {ih.hex()} ({'inline' if args.inline else 'shared ring'})")
    print(f"  sent {writes} writes, {sent} bytes in {secs:.2f}s ({sent / 2**20 / max(secs, 1e-9):.1f} MiB/s)")
    print(f"  events: {counts['piece_verified']} piece_verified, {counts['piece_failed']} piece_failed"
          + (f" (pieces {sorted(failed)})" if failed else ""))
    print(f"  daemon: {st['verified_pieces']}/{st['num_pieces']} pieces verified")
    return 1 if failed or st["verified_pieces"] != st["num_pieces"] else 0


if __name__ == "__main__":
    sys.exit(main())
