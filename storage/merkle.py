"""BEP 52 Merkle trees over 16 KiB SHA-256 leaves.

The rules that are easy to get wrong, in one place:
- a leaf is SHA-256 of one 16 KiB block; the last block of a file is hashed as it
  is (short), never zero-filled;
- leaves past the end of a file are 32 zero bytes (not the hash of zeros);
- the last piece of a multi-piece file is padded with zero leaves to a full piece;
- a file of one piece or less has no piece layer: its ``pieces root`` is the root
  over its leaves padded to the next power of two;
- the piece layer is padded to a power of two with the root of a piece's worth of
  zero leaves.
"""

from __future__ import annotations

from hashlib import sha256

BLOCK_SIZE = 16 * 1024
ZERO_LEAF = bytes(32)

_pad_cache: list[bytes] = [ZERO_LEAF]


def pad_hash(height: int) -> bytes:
    """Root of a subtree of ``2**height`` zero leaves (memoised: it is asked often)."""
    while len(_pad_cache) <= height:
        h = _pad_cache[-1]
        _pad_cache.append(sha256(h + h).digest())
    return _pad_cache[height]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def merkle_root(nodes: list[bytes], width: int, pad_height: int = 0) -> bytes:
    """Root over ``nodes`` padded with ``pad_hash(pad_height)`` up to ``width``.

    ``width`` must be a power of two >= len(nodes); ``pad_height`` is the height of
    the subtree each node stands for (0 for leaves, log2(blocks per piece) for a
    piece layer).
    """
    if width & (width - 1) or width < len(nodes):
        raise ValueError(f"width {width} is not a power of two >= {len(nodes)}")
    level = list(nodes)
    height = pad_height
    while width > 1:
        if len(level) % 2:
            level.append(pad_hash(height))
        level = [sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
        height += 1
        width //= 2
    return level[0] if level else pad_hash(height)


def leaf_count(length: int) -> int:
    """Number of 16 KiB leaves covering ``length`` bytes."""
    return (length + BLOCK_SIZE - 1) // BLOCK_SIZE


def root_from_layer(layer: bytes, piece_length: int) -> bytes:
    """The file's ``pieces root`` given its piece layer (concatenated 32-byte hashes)."""
    nodes = [layer[i : i + 32] for i in range(0, len(layer), 32)]
    height = (piece_length // BLOCK_SIZE).bit_length() - 1
    return merkle_root(nodes, next_pow2(len(nodes)), pad_height=height)


def piece_width(file_length: int, piece_length: int) -> int:
    """How many leaves a piece's subtree has: a full piece, or fewer for small files."""
    if file_length > piece_length:
        return piece_length // BLOCK_SIZE
    return next_pow2(leaf_count(file_length))
