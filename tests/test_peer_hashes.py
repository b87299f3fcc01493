"""Hash requests answered from the piece layers: every answer proves its nodes against
the file's root, and what cannot be answered from the piece layer is refused."""

from __future__ import annotations

from hashlib import sha256

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pieced.peer.hashes import HashServer
from pieced.storage.merkle import BLOCK_SIZE, leaf_count, next_pow2
from pieced.storage.metainfo import parse

from tests.realtools import make_payload, make_torrent_lt

PIECE = 32768


@pytest.fixture(scope="module")
def meta(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hashes")
    content = make_payload(root, {"big.bin": 45 * PIECE + 7, "mid.bin": 4 * PIECE,
                                  "small.bin": 1000}, seed=2)
    return parse(make_torrent_lt(content, PIECE, "v2"))


def _verify(root: bytes, length: int, base: int, index: int, count: int, proof_layers: int,
            hashes: bytes) -> bool:
    """Check an answer the way a receiver does: fold the nodes up, then the uncles."""
    nodes = [hashes[i : i + 32] for i in range(0, count * 32, 32)]
    uncles = [hashes[i : i + 32] for i in range(count * 32, len(hashes), 32)]
    width = next_pow2(count)
    nodes += [b"?" * 32] * (width - count)  # unknown: must not be needed when count is 2^k
    level, pos = nodes, index
    while len(level) > 1:
        level = [sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
        pos //= 2
    node = level[0]
    height = base + (width.bit_length() - 1)
    num_layers = next_pow2(leaf_count(length)).bit_length() - 1
    for uncle in uncles:
        node = sha256(uncle + node).digest() if pos % 2 else sha256(node + uncle).digest()
        pos //= 2
        height += 1
    return height == num_layers and node == root


def test_the_piece_layer_with_its_proof(meta) -> None:  # type: ignore[no-untyped-def]
    server = HashServer(meta)
    big = next(f for f in meta.files if f.path[-1] == "big.bin")
    assert big.pieces_root is not None
    ph = (PIECE // BLOCK_SIZE).bit_length() - 1
    num_layers = next_pow2(leaf_count(big.length)).bit_length() - 1
    # all 64 (padded) nodes of the piece layer at once, with no uncle needed
    width = next_pow2(leaf_count(big.length)) >> ph
    full = server.answer(big.pieces_root, ph, 0, width, num_layers - ph - 1)
    assert full is not None and len(full) == 32 * width
    assert full[: 45 * 32] == meta.piece_layers[big.pieces_root][: 45 * 32]
    assert _verify(big.pieces_root, big.length, ph, 0, width, num_layers - ph - 1, full)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_answer_proves_itself(meta, data) -> None:  # type: ignore[no-untyped-def]
    server = HashServer(meta)
    f = data.draw(st.sampled_from([f for f in meta.files if f.pieces_root is not None
                                   and f.length > 0]))
    num_layers = next_pow2(leaf_count(f.length)).bit_length() - 1
    base = data.draw(st.integers(0, max(0, num_layers)))
    k = data.draw(st.integers(0, 6))
    count = 1 << k
    index = data.draw(st.integers(0, 80)) // count * count  # aligned, as requesters do
    proof_layers = data.draw(st.integers(0, num_layers))
    got = server.answer(f.pieces_root, base, index, count, proof_layers)
    ph = (PIECE // BLOCK_SIZE).bit_length() - 1
    level_size = next_pow2(leaf_count(f.length)) >> base if base <= num_layers else 0
    answerable = (f.length > PIECE and ph <= base < num_layers
                  and index + count <= level_size and proof_layers < num_layers - base)
    if not answerable:
        assert got is None
        return
    assert got is not None
    # with enough proof layers the answer reaches the root
    if proof_layers == num_layers - base - 1:
        assert _verify(f.pieces_root, f.length, base, index, count, proof_layers, got)


def test_refusals(meta) -> None:  # type: ignore[no-untyped-def]
    server = HashServer(meta)
    big = next(f for f in meta.files if f.path[-1] == "big.bin")
    small = next(f for f in meta.files if f.path[-1] == "small.bin")
    assert server.answer(bytes(32), 1, 0, 1, 0) is None  # no such file
    assert server.answer(big.pieces_root, 0, 0, 4, 0) is None  # block hashes: need the data
    assert server.answer(small.pieces_root, 0, 0, 1, 0) is None  # one piece: no piece layer
    assert server.answer(big.pieces_root, 1, 0, 0, 0) is None  # count 0
    assert server.answer(big.pieces_root, 1, 60, 8, 0) is None  # past the layer's end
    assert server.answer(big.pieces_root, 1, 0, 1, 99) is None  # more proof than the tree
    # nodes that are not one aligned subtree: no proof could be of them
    assert server.answer(big.pieces_root, 1, 1, 2, 3) is None  # not at a multiple of 2
    assert server.answer(big.pieces_root, 1, 0, 3, 3) is None  # not a power of 2
    assert server.answer(big.pieces_root, 1, 2, 2, 3) is not None


def test_block_hashes_of_pieces_of_16_kib_are_refused_as_libtorrent_would_refuse_them(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With 16 KiB pieces the piece layer is the blocks': after a failed piece a
    libtorrent leecher asks for one of its hashes, and dropped the peer that answered
    ("invalid hashes": it takes that layer only in runs of 512, or to the file's end),
    a good seeder lost, the download stalled when it was the only one. Such requests are
    refused; runs of 512, and the file's last run, from a multiple of 512 to its last
    piece, are answered. (The file's end was taken for the end of its layer, padded to a
    power of 2: the last run of a file of 1,025 pieces, asked as one hash at 1,024, was
    refused, thousands of times, until libtorrent was dropped for asking too much.)"""
    root = tmp_path_factory.mktemp("small")
    content = make_payload(root, {"a.bin": 1500 * BLOCK_SIZE + 5,
                                  "b.bin": 1024 * BLOCK_SIZE + 7}, seed=3)
    meta = parse(make_torrent_lt(content, BLOCK_SIZE, "v2"))
    server = HashServer(meta)
    a, b = (f for f in meta.files if f.pieces_root is not None)
    assert a.pieces_root is not None and b.pieces_root is not None
    assert leaf_count(a.length) == 1501 and leaf_count(b.length) == 1025
    num_layers = next_pow2(1501).bit_length() - 1
    assert server.answer(a.pieces_root, 0, 8, 1, 0) is None
    assert server.answer(a.pieces_root, 0, 8, 8, 3) is None
    for index in (512, 1024):  # (the last run of 512 ends in the padding)
        run = server.answer(a.pieces_root, 0, index, 512, num_layers - 1)
        assert run is not None and _verify(a.pieces_root, a.length, 0, index, 512,
                                           num_layers - 1, run)
    assert server.answer(a.pieces_root, 0, 1536, 512, 0) is None  # padding alone
    assert server.answer(a.pieces_root, 0, 1024, 1024, 1) is None  # (over 512: never taken)
    assert server.answer(a.pieces_root, 0, 2044, 4, 0) is None
    for count in (1, 2, 4):  # b's last run: its piece 1,024 alone, padded as asked
        run = server.answer(b.pieces_root, 0, 1024, count, 10)
        assert run is not None and _verify(b.pieces_root, b.length, 0, 1024, count, 10, run)
    assert server.answer(b.pieces_root, 0, 1023, 1, 0) is None  # not the run's start
