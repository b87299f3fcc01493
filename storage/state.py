"""Durable state: registrations and verified bitfields, so a restart needs no recheck.

Layout under the state directory, one folder per torrent::

    torrents/<info_hash hex>/metainfo.torrent   the .torrent bytes, written at register
    torrents/<info_hash hex>/resume             bencoded: save path, bitfield, renames,
                                                (size, mtime_ns) of every payload file
    torrents/<info_hash hex>/fingerprints       16 bytes per piece: BLAKE3 of its data
                                                as last verified (zeros: none)

Every file is replaced atomically (temp file, fsync, rename, fsync of the folder), so
a crash leaves the old version or the new one, never a torn one. The bitfield is
saved only after the pieces in it were fdatasync'ed, so a bit on disk always means
durable, verified data. A payload file whose size or mtime differs from the record
(changed behind our back, or written after the last save) loses its pieces' bits
on load: those pieces are simply not known verified until rechecked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import bencodepy


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "torrents"
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, ih: bytes) -> Path:
        return self.root / ih.hex()

    def save_metainfo(self, ih: bytes, raw: bytes) -> None:
        write_atomic(self._dir(ih) / "metainfo.torrent", raw)

    def save_resume(self, ih: bytes, resume: dict[bytes, Any]) -> None:
        write_atomic(self._dir(ih) / "resume", bencodepy.encode(resume))

    def save_fingerprints(self, ih: bytes, table: bytes) -> None:
        """Only a shortcut for rechecks (a stale one just costs the full hash), but
        written as atomically as the rest, so it is never half of two versions."""
        write_atomic(self._dir(ih) / "fingerprints", table)

    def remove(self, ih: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._dir(ih))

    def load_all(self) -> list[tuple[bytes, dict[bytes, Any], bytes]]:
        """(metainfo bytes, resume dict, fingerprint table) of every saved torrent;
        unreadable parts come back empty and are never silently trusted."""
        out = []
        for d in sorted(self.root.iterdir()):
            try:
                raw = (d / "metainfo.torrent").read_bytes()
            except OSError:
                continue
            try:
                resume = bencodepy.decode((d / "resume").read_bytes())
                if not isinstance(resume, dict):
                    resume = {}
            except Exception:
                resume = {}
            try:
                fps = (d / "fingerprints").read_bytes()
            except OSError:
                fps = b""
            out.append((raw, resume, fps))
        return out


def file_stamp(path: Path) -> list[int]:
    """[size, mtime_ns] of a payload file, or [-1, 0] when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return [-1, 0]
    return [st.st_size, st.st_mtime_ns]
