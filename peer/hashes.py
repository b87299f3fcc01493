"""Answers to BEP 52 hash requests, from the piece layers of the .torrent.

A peer that has only the info dictionary (a magnet link, or a .torrent stripped of its
``piece layers``) asks for the hashes it needs to check pieces: a run of nodes of one
layer of a file's Merkle tree, with the uncle hashes that prove them against the
file's ``pieces root``. Every layer from the piece layer up can be computed from the
piece layer alone; layers below it (block hashes) would need the data, and are
refused. The answer is what libtorrent's receiver checks: the ``count`` requested nodes
(padding past the file's end included), which fold up to one node ``log2(count)``
layers higher, then that node's sibling and the sibling of each of its ancestors up to
layer ``base + proof_layers``. (libtorrent's own sender leaves out the first of these
uncles when ``count`` is 1; its receiver expects it.)
"""

from __future__ import annotations

from hashlib import sha256

from pieced.storage.merkle import BLOCK_SIZE, leaf_count, next_pow2, pad_hash
from pieced.storage.metainfo import Metainfo

from .wire import MAX_HASH_COUNT

PIECE_LAYER_RUN = 512  # the hashes of the piece layer libtorrent asks for (and takes) at once


class HashServer:
    def __init__(self, meta: Metainfo) -> None:
        self.meta = meta
        self.piece_height = (meta.piece_length // BLOCK_SIZE).bit_length() - 1
        self._files = {f.pieces_root: f.length for f in meta.files
                       if f.pieces_root is not None and f.length > 0}
        self._trees: dict[bytes, list[list[bytes]]] = {}  # root -> layers from the piece layer up

    def _tree(self, root: bytes) -> list[list[bytes]] | None:
        tree = self._trees.get(root)
        if tree is not None:
            return tree
        layer_bytes = self.meta.piece_layers.get(root)
        if layer_bytes is None:
            return None  # a file of one piece or less: only its root is known
        nodes = [layer_bytes[i : i + 32] for i in range(0, len(layer_bytes), 32)]
        width = next_pow2(leaf_count(self._files[root])) >> self.piece_height
        h = self.piece_height
        level = nodes + [pad_hash(h)] * (width - len(nodes))
        tree = [level]
        while len(level) > 1:
            level = [sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
            tree.append(level)
        if level[0] != root:
            return None  # piece layer and root disagree: answer nothing from it
        self._trees[root] = tree
        return tree

    def answer(self, root: bytes, base: int, index: int, count: int,
               proof_layers: int) -> bytes | None:
        """The HASHES payload's hashes, or None to reject the request."""
        length = self._files.get(root)
        if length is None or count <= 0 or count > MAX_HASH_COUNT or index < 0 or proof_layers < 0:
            return None
        if count & (count - 1) or index % count:
            # Nodes that are not one aligned subtree fold into no single node, and the
            # proof below would be of others (libtorrent asks 2^k nodes at a multiple of 2^k).
            return None
        num_layers = (next_pow2(leaf_count(length))).bit_length() - 1  # the root's height
        if base >= num_layers or proof_layers >= num_layers - base or base < self.piece_height:
            return None
        tree = self._tree(root)
        if tree is None:
            return None
        layer = tree[base - self.piece_height]
        if index + count > len(layer):
            return None
        if base == self.piece_height == 0:
            # libtorrent 2.1 takes hashes of the piece layer only as a run of 512, or a
            # shorter one from a multiple of 512 to the file's end (its last piece, not the layer's
            # padding past it), and drops the peer that sent others ("invalid hashes").
            # With pieces of 16 KiB that layer is the blocks', which it asks for one at a
            # time after a piece failed: answered, it dropped us (and could be left with
            # no good peer); a reject it takes, and goes on.
            pieces = -(-length // self.meta.piece_length)
            if index >= pieces or (count != PIECE_LAYER_RUN and (
                    count > PIECE_LAYER_RUN or index % PIECE_LAYER_RUN
                    or index + count < pieces)):
                return None
        out = layer[index : index + count]
        # The nodes fold up to one node k layers higher; from there each layer up to
        # base + proof_layers needs the sibling of the first node's ancestor.
        k = next_pow2(count).bit_length() - 1
        for h in range(base + k, base + proof_layers + 1):
            out.append(tree[h - self.piece_height][(index >> (h - base)) ^ 1])
        return b"".join(out)
