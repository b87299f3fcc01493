"""Shared fixtures: payloads with the awkward sizes the issues ask for, and torrents of
them made by the real tools in ``tests/realtools.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.realtools import make_payload

# 0 bytes, 1 byte, exactly a piece, a piece plus one, nested folders (piece = 64 KiB here).
ODD_FILES = {
    "a.bin": 200_000,
    "empty": 0,
    "one": 1,
    "sub/exact": 65536,
    "sub/deeper/plus1": 65537,
    "z/tail.dat": 12345,
}


@pytest.fixture
def odd_payload(tmp_path: Path) -> tuple[Path, Path]:
    """(save path, content path) of a multi-file payload with odd sizes."""
    content = make_payload(tmp_path / "save", ODD_FILES, seed=7)
    return tmp_path / "save", content
