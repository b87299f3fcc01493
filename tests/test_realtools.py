"""Prove that tests/realtools.py tells the truth.

Everything else that leans on realtools (conformance tests, benchmarks) is only as good
as these helpers, so each is checked against an independent account of the answer: the
piece that a corrupted byte lands in is computed here from the raw .torrent (BEP 3 file
list, BEP 47 pad files, BEP 52 file tree), not from libtorrent, and libtorrent's verdict
must then match it exactly, for every maker, kind and piece size.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libtorrent as lt
import pytest

from tests.realtools import (
    MKTORRENT_MIN_PIECE_LENGTH,
    TorrentKind,
    corrupt,
    lt_recheck,
    lt_session_settings,
    make_payload,
    make_torrent_lt,
    make_torrent_mktorrent,
    make_torrent_transmission,
)

KiB = 1024

Maker = Callable[[Path, int], bytes]

MAKERS: dict[str, Maker] = {
    "lt-v1": lambda c, pl: make_torrent_lt(c, pl, "v1"),
    "lt-v2": lambda c, pl: make_torrent_lt(c, pl, "v2"),
    "lt-hybrid": lambda c, pl: make_torrent_lt(c, pl, "hybrid"),
    "mktorrent": make_torrent_mktorrent,
    "transmission": make_torrent_transmission,
}

# mktorrent 1.1 cannot make 16 KiB pieces (see test_mktorrent_refuses_16k), so it gets
# its smallest size instead; every other maker is run at 16 KiB, the BEP 52 minimum.
PIECE_LENGTHS: dict[str, tuple[int, ...]] = {
    name: ((MKTORRENT_MIN_PIECE_LENGTH, 64 * KiB) if name == "mktorrent" else (16 * KiB, 64 * KiB))
    for name in MAKERS
}

CASES = [(m, pl) for m in MAKERS for pl in PIECE_LENGTHS[m]]


def payload_specs(pl: int) -> dict[str, dict[str, int] | int]:
    """Odd shapes that trip up piece arithmetic, scaled to the piece length ``pl``."""
    return {
        "one-byte": 1,
        "one-piece": pl,
        "piece-plus-one": pl + 1,
        "nested": {
            "a/b/c.bin": 3 * pl + 123,
            "a/empty.bin": 0,
            "a/one.bin": 1,
            "d/e/f/exact.bin": pl,
            "top.bin": 5000,
            "z.bin": pl + 1,
        },
    }


# --------------------------------------------------------------------------- oracle


def info_dict(torrent: bytes) -> dict[bytes, Any]:
    """The decoded ``info`` dictionary of a .torrent."""
    meta: Any = lt.bdecode(torrent)
    info: dict[bytes, Any] = meta[b"info"]
    return info


def torrent_layout(torrent: bytes) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """Independently derive (piece_length, num_pieces, {relpath: (offset, size)}).

    Offsets are in the torrent's piece space: for v1 and hybrid the concatenation of the
    ``files`` list, pad files (BEP 47 ``attr`` ``p``) included; for v2-only torrents the
    ``file tree`` walked in key order with every non-empty file starting on a piece
    boundary (BEP 52), which is how libtorrent numbers v2 pieces. Paths are relative to
    the torrent's top folder; a single-file torrent's one path is its ``name``.
    """
    info = info_dict(torrent)
    pl: int = info[b"piece length"]
    files: dict[str, tuple[int, int]] = {}
    offset = 0
    if b"files" in info or b"length" in info:
        entries = info.get(b"files") or [{b"length": info[b"length"], b"path": [info[b"name"]]}]
        for e in entries:
            rel = "/".join(p.decode() for p in e[b"path"])
            if b"p" not in e.get(b"attr", b""):
                files[rel] = (offset, e[b"length"])
            offset += e[b"length"]
    else:

        def walk(tree: dict[bytes, Any], prefix: list[str]) -> None:
            nonlocal offset
            for name in sorted(tree):
                node = tree[name]
                if b"" in node:  # a file: {"": {"length": n, "pieces root": ...}}
                    size = node[b""][b"length"]
                    if size:
                        offset = -(-offset // pl) * pl
                    files["/".join([*prefix, name.decode()])] = (offset, size)
                    offset += size
                else:
                    walk(node, [*prefix, name.decode()])

        walk(info[b"file tree"], [])
    return pl, -(-offset // pl), files


def disk_path(content: Path, rel: str) -> Path:
    """The file on disk for torrent-relative path ``rel`` (single-file: the file itself)."""
    return content if content.is_file() else content / rel


def expected_missing(
    layout: dict[str, tuple[int, int]], pl: int, rel: str, off: int, n: int
) -> set[int]:
    """Pieces that bytes [off, off+n) of file ``rel`` fall in."""
    start = layout[rel][0] + off
    return set(range(start // pl, (start + n - 1) // pl + 1))


def probes(size: int, pl: int) -> list[tuple[int, int]]:
    """(offset, length) ranges to corrupt in a file of ``size`` bytes: its first and last
    byte, the bytes on either side of its first internal piece-sized boundary, and a
    2-byte range straddling that boundary (which must take out two pieces)."""
    if size == 0:
        return []
    out = {(0, 1), (size - 1, 1)}
    if size > pl:
        out |= {(pl - 1, 1), (pl, 1), (pl - 1, 2)}
    return sorted(out)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("maker", "pl"), CASES, ids=[f"{m}-{pl // KiB}k" for m, pl in CASES])
def test_recheck_finds_exactly_the_corrupted_pieces(tmp_path: Path, maker: str, pl: int) -> None:
    for case, spec in payload_specs(pl).items():
        content = make_payload(tmp_path / case, spec, seed=len(case))
        torrent = MAKERS[maker](content, pl)
        tpl, num_pieces, layout = torrent_layout(torrent)
        assert tpl == pl
        save_path = content.parent

        assert lt_recheck(torrent, save_path) == [True] * num_pieces, case

        sizes = spec if isinstance(spec, dict) else {content.name: spec}
        for rel, size in sizes.items():
            if rel not in layout:
                # Only transmission-create drops files, and only empty ones.
                assert maker == "transmission" and size == 0, (case, rel)
                continue
            assert layout[rel][1] == size
            for off, n in probes(size, pl):
                path = disk_path(content, rel)
                corrupt(path, off, n)
                want = expected_missing(layout, pl, rel, off, n)
                got = {i for i, ok in enumerate(lt_recheck(torrent, save_path)) if not ok}
                assert got == want, (case, rel, off, n)
                corrupt(path, off, n)  # XOR again: restored
        assert lt_recheck(torrent, save_path) == [True] * num_pieces, case


def test_makers_file_lists(tmp_path: Path) -> None:
    """Pin down what each maker puts in the file list (the quirks we document)."""
    pl = 32 * KiB
    content = make_payload(tmp_path, payload_specs(pl)["nested"])
    real = {"a/b/c.bin", "a/empty.bin", "a/one.bin", "d/e/f/exact.bin", "top.bin", "z.bin"}

    def v1_files(t: bytes) -> list[tuple[str, int, bool]]:
        info = info_dict(t)
        return [
            ("/".join(p.decode() for p in e[b"path"]), e[b"length"], b"p" in e.get(b"attr", b""))
            for e in info[b"files"]
        ]

    for name in ("lt-v1", "mktorrent"):
        files = v1_files(MAKERS[name](content, pl))
        assert {f for f, _, _ in files} == real, name
        assert not any(pad for _, _, pad in files), name  # plain v1: no BEP 47 pad files
    # transmission-create silently leaves out empty files.
    files = v1_files(make_torrent_transmission(content, pl))
    assert {f for f, _, _ in files} == real - {"a/empty.bin"}
    # libtorrent hybrid: pad files after every non-empty file that does not end on a piece
    # boundary (except the last), so every file starts a piece.
    t = make_torrent_lt(content, pl, "hybrid")
    files = v1_files(t)
    assert {f for f, _, pad in files if not pad} == real
    assert any(pad for _, _, pad in files)
    _, _, layout = torrent_layout(t)
    for rel, (off, size) in layout.items():
        assert size == 0 or off % pl == 0, rel
    info = info_dict(t)
    assert b"pieces" in info and b"file tree" in info and info[b"meta version"] == 2
    info = info_dict(make_torrent_lt(content, pl, "v2"))
    assert b"pieces" not in info and b"files" not in info and b"file tree" in info
    info = info_dict(make_torrent_lt(content, pl, "v1"))
    assert b"file tree" not in info and b"meta version" not in info


def test_v1_piece_hashes_are_sha1_of_the_data(tmp_path: Path) -> None:
    """The makers hash the bytes make_payload wrote (pieces across file boundaries)."""
    pl = 32 * KiB
    content = make_payload(tmp_path, {"x/a.bin": pl + 7, "b.bin": 3, "c.bin": 2 * pl - 1})
    for name in ("lt-v1", "mktorrent", "transmission"):
        t = MAKERS[name](content, pl)
        info = info_dict(t)
        blob = b"".join(
            (content.joinpath(*(p.decode() for p in e[b"path"]))).read_bytes()
            for e in info[b"files"]
        )
        want = b"".join(hashlib.sha1(blob[i : i + pl]).digest() for i in range(0, len(blob), pl))
        assert info[b"pieces"] == want, name


def test_mktorrent_refuses_16k(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 KiB"):
        make_torrent_mktorrent(make_payload(tmp_path, 10), 16 * KiB)


def test_transmission_rejects_what_it_would_ignore(tmp_path: Path) -> None:
    content = make_payload(tmp_path, 10)
    with pytest.raises(ValueError):
        make_torrent_transmission(content, 48 * KiB)
    with pytest.raises(RuntimeError, match="wrote no torrent"):
        make_torrent_transmission(make_payload(tmp_path / "empty", 0), 16 * KiB)


def test_piece_length_validation(tmp_path: Path) -> None:
    content = make_payload(tmp_path, 10)
    for bad in (8 * KiB, 48 * KiB):
        with pytest.raises(ValueError):
            make_torrent_lt(content, bad, "v1")


def test_make_payload(tmp_path: Path) -> None:
    spec = {"a/b/c.bin": 3 * (1 << 20) + 5, "e.bin": 0, "f.bin": 1}
    top = make_payload(tmp_path / "one", spec, seed=7)
    again = make_payload(tmp_path / "two", spec, seed=7)
    other = make_payload(tmp_path / "three", spec, seed=8)
    assert top == tmp_path / "one" / "payload" and top.is_dir()
    for rel, size in spec.items():
        data = (top / rel).read_bytes()
        assert len(data) == size
        assert data == (again / rel).read_bytes()
        if size > 1:
            assert data != (other / rel).read_bytes()
    # Per-file streams: a file's bytes do not depend on the other entries.
    solo = make_payload(tmp_path / "solo", {"f.bin": 1, "a/b/c.bin": 3 * (1 << 20) + 5}, seed=7)
    assert (solo / "a/b/c.bin").read_bytes() == (top / "a/b/c.bin").read_bytes()
    single = make_payload(tmp_path / "single", 100)
    assert single.is_file() and single.stat().st_size == 100
    with pytest.raises(ValueError):
        make_payload(tmp_path / "bad", {"../x": 1})


def test_corrupt_flips_and_restores(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(bytes(range(10)))
    corrupt(p, 3, 2)
    assert p.read_bytes() == bytes([0, 1, 2, 3 ^ 0xFF, 4 ^ 0xFF, 5, 6, 7, 8, 9])
    corrupt(p, 3, 2)
    assert p.read_bytes() == bytes(range(10))
    with pytest.raises(ValueError):
        corrupt(p, 9, 2)


def test_recheck_without_data_and_timeout(tmp_path: Path) -> None:
    content = make_payload(tmp_path / "data", {"a.bin": 40 * KiB, "b.bin": 1})
    kinds: tuple[TorrentKind, ...] = ("v1", "v2", "hybrid")
    for kind in kinds:
        t = make_torrent_lt(content, 16 * KiB, kind)
        n = lt.torrent_info(t).num_pieces()
        assert lt_recheck(t, tmp_path / "nowhere") == [False] * n
        with pytest.raises(TimeoutError):
            lt_recheck(t, content.parent, timeout=0)


def test_session_settings_are_offline() -> None:
    s = lt_session_settings()
    assert not (s["enable_dht"] or s["enable_lsd"] or s["enable_upnp"] or s["enable_natpmp"])
    assert s["listen_interfaces"].startswith("127.0.0.1:")
    assert s["hashing_threads"] >= 1


RAW_HASH = Path(__file__).resolve().parent.parent / "bench" / "raw_hash.py"


def test_bench_raw_hash_agrees_with_libtorrent(tmp_path: Path) -> None:
    """bench/raw_hash.py is the benchmark's "physical limit"; it only means something if
    it does the real work, so its verdicts must match libtorrent's, piece for piece."""
    pl = 32 * KiB
    content = make_payload(tmp_path, payload_specs(pl)["nested"])
    victims = [(content / "a/b/c.bin", pl), (content / "a/one.bin", 0), (content / "z.bin", pl)]
    for maker in MAKERS:
        torrent = MAKERS[maker](content, pl)
        tfile = tmp_path / f"{maker}.torrent"
        tfile.write_bytes(torrent)
        for victim in [None, *victims]:
            if victim:
                corrupt(*victim)
            want = [i for i, ok in enumerate(lt_recheck(torrent, tmp_path)) if not ok]
            proc = subprocess.run(
                [sys.executable, str(RAW_HASH), str(tfile), str(tmp_path)],
                capture_output=True,
                text=True,
                check=False,
            )
            out = json.loads(proc.stdout)
            assert proc.returncode == (1 if want else 0), proc.stderr
            if maker == "lt-v2":
                assert out["failed_v1"] == [] and out["failed_v2"] == want
            elif maker == "lt-hybrid":
                assert out["failed_v1"] == out["failed_v2"] == want
            else:
                assert out["failed_v1"] == want and out["failed_v2"] == []
            if victim:
                corrupt(*victim)
