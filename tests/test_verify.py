"""Offline verification (``pieced verify``) on real torrents with chosen corruptions:
exactly the right v1 and v2 pieces fail, and libtorrent's own recheck agrees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pieced.storage.metainfo import parse

from tests.realtools import (
    corrupt,
    lt_recheck,
    make_payload,
    make_torrent_lt,
    make_torrent_mktorrent,
    make_torrent_transmission,
)

PIECED = [sys.executable, "-m", "pieced.daemon.cli"]


def run_verify(torrent: bytes, save: Path, tmp: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    tfile = tmp / "t.torrent"
    tfile.write_bytes(torrent)
    proc = subprocess.run(
        [*PIECED, "verify", str(tfile), "--data", str(save), "--json", *extra],
        capture_output=True, text=True, timeout=120,
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}, proc.stderr


def torrent_offset(raw: bytes, rel: str, offset: int) -> int:
    meta = parse(raw)
    for f in meta.files:
        if "/".join(f.path[1:]) == rel or "/".join(f.path) == rel:
            return f.offset + offset
    raise KeyError(rel)


CORRUPTIONS = [("a.bin", 0), ("a.bin", 199_999), ("sub/exact", 65535), ("sub/deeper/plus1", 65536), ("one", 0)]


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
@pytest.mark.parametrize("piece_length", [16384, 65536, 262144, 4 * 1024 * 1024])
def test_libtorrent_torrents(tmp_path: Path, odd_payload: tuple[Path, Path], kind: Any, piece_length: int) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, piece_length, kind)
    meta = parse(raw)
    rc, out, err = run_verify(raw, save, tmp_path)
    assert rc == 0, err
    assert out["failed_v1"] == ([] if kind != "v2" else None)
    assert out["failed_v2"] == ([] if kind != "v1" else None)
    assert out["num_pieces"] == meta.num_pieces and out["piece_length"] == piece_length
    assert out["info_hash_v1"] == (meta.info_hash_v1.hex() if meta.info_hash_v1 else None)
    if kind != "v1":
        assert len(out["info_hash_v2"]) == 64

    expect: set[int] = set()
    for rel, off in CORRUPTIONS:
        corrupt(content / rel, off)
        expect.add(torrent_offset(raw, rel, off) // piece_length)
    rc, out, _ = run_verify(raw, save, tmp_path)
    assert rc == 1
    if kind != "v2":
        assert out["failed_v1"] == sorted(expect)
    if kind != "v1":
        assert out["failed_v2"] == sorted(expect)
    lt_have = lt_recheck(raw, save)
    assert [p for p, ok in enumerate(lt_have) if not ok] == sorted(expect)


@pytest.mark.parametrize("maker", [make_torrent_mktorrent, make_torrent_transmission])
def test_other_makers(tmp_path: Path, maker: Any) -> None:
    files = {"x/a.bin": 100_000, "b": 1, "c/d/e": 32768, "f": 32769}
    content = make_payload(tmp_path / "save", files, seed=11)
    raw = maker(content, 32768)
    rc, out, err = run_verify(raw, tmp_path / "save", tmp_path)
    assert rc == 0, err
    corrupt(content / "c/d/e", 5)
    rc, out, _ = run_verify(raw, tmp_path / "save", tmp_path)
    piece = torrent_offset(raw, "c/d/e", 5) // 32768
    assert rc == 1 and out["failed_v1"] == [piece] and out["failed_v2"] is None
    assert [p for p, ok in enumerate(lt_recheck(raw, tmp_path / "save")) if not ok] == [piece]


def test_missing_and_short_files_fail_their_pieces(tmp_path: Path, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "hybrid")
    (content / "sub/exact").unlink()
    with open(content / "z/tail.dat", "r+b") as f:
        f.truncate(100)
    rc, out, _ = run_verify(raw, save, tmp_path)
    assert rc == 1
    lt_failed = [p for p, ok in enumerate(lt_recheck(raw, save)) if not ok]
    assert out["failed_v1"] == out["failed_v2"] == lt_failed
    assert len(lt_failed) == 4 + 1


def test_bad_input_exit_2(tmp_path: Path, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    raw = make_torrent_lt(content, 16384, "v1")
    rc, _, err = run_verify(b"not bencode", save, tmp_path)
    assert rc == 2 and "not canonical bencode" in err
    rc, _, err = run_verify(raw, tmp_path / "nowhere", tmp_path)
    assert rc == 2 and "not a directory" in err
    proc = subprocess.run([*PIECED, "verify", str(tmp_path / "missing.torrent"), "--data", str(save)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    proc = subprocess.run([*PIECED, "verify"], capture_output=True, text=True)
    assert proc.returncode == 2


def test_human_output_and_quiet_progress(tmp_path: Path, odd_payload: tuple[Path, Path]) -> None:
    save, content = odd_payload
    tfile = tmp_path / "t.torrent"
    tfile.write_bytes(make_torrent_lt(content, 16384, "hybrid"))
    corrupt(content / "a.bin", 20000)
    proc = subprocess.run([*PIECED, "verify", str(tfile), "--data", str(save)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "v1 failed: 1\n" in proc.stdout and "v2 failed: 1\n" in proc.stdout
    assert proc.stderr == ""  # piped: no progress bar
