"""The per-corpus sample order: corpus-local index j (0, 1, 2, ... across epochs) -> (shard, member).

Epoch e = j // N covers j in [e*N, (e+1)*N) for a corpus of N samples. Within an epoch the shards
are visited in a seeded permutation of (seed, stream, e), and the samples of each shard in a
seeded permutation of (seed, stream, e, shard): consecutive positions stay inside one shard, so
reads are shard-local, while every epoch is a permutation of all N samples. Nothing here depends
on data-parallel size or worker count; the order is a pure function of (seed, stream, j).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def seeded_permutation(n: int, key: Sequence[int]) -> np.ndarray:
    """A permutation of range(n) determined by `key` alone.

    Built from PCG64's raw bit stream (stable across NumPy versions by NumPy's policy, unlike
    Generator.permutation) and a stable argsort, so a checkpoint resumes the same order after a
    NumPy upgrade.
    """
    bits = np.random.PCG64(np.random.SeedSequence([int(k) for k in key])).random_raw(n)
    return np.argsort(bits, kind="stable")


class _LRU:
    """A small least-recently-used cache (plain attributes, so it pickles for spawned workers)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict = OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value):
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


class EpochOrder:
    """Maps corpus-local sample indices to (shard index, member index within the shard).

    shard_sizes: samples per shard, in manifest order. stream: distinguishes corpora (and
    splits) sharing a seed. shuffle=False gives the natural order (validation).
    """

    def __init__(
        self, shard_sizes: Sequence[int], seed: int, stream: int = 0, shuffle: bool = True
    ) -> None:
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        if self.total <= 0:
            raise ValueError("EpochOrder needs at least one sample")
        self.seed, self.stream, self.shuffle = int(seed), int(stream), shuffle
        # Epochs and shards in flight at once: 2 epochs (a batch may straddle the boundary) and
        # a few shards (workers read neighbouring micro batches); both are cheap to rebuild.
        self._epochs = _LRU(2)
        self._members = _LRU(16)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard at each visiting slot, first epoch position of each slot)."""
        hit = self._epochs.get(epoch)
        if hit is not None:
            return hit
        n = len(self.sizes)
        perm = seeded_permutation(n, (self.seed, self.stream, epoch, 0)) if self.shuffle else None
        perm = np.arange(n) if perm is None else perm
        starts = np.concatenate([[0], np.cumsum(self.sizes[perm])[:-1]])
        return self._epochs.put(epoch, (perm, starts))

    def _member_perm(self, epoch: int, shard: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        hit = self._members.get((epoch, shard))
        if hit is not None:
            return hit
        key = (self.seed, self.stream, epoch, 1, shard)
        return self._members.put((epoch, shard), seeded_permutation(int(self.sizes[shard]), key))

    def locate(self, js: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count,) int64 corpus-local indices -> (shard, member) arrays of the same shape."""
        js = np.asarray(js, dtype=np.int64)
        epochs, pos = np.divmod(js, self.total)
        shards = np.empty_like(js)
        members = np.empty_like(js)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            perm, starts = self._epoch(e)
            # side="right" - 1 skips empty shards: their slot shares its start with the next.
            slot = np.searchsorted(starts, pos[sel], side="right") - 1
            shard, offset = perm[slot], pos[sel] - starts[slot]
            member = offset.copy()
            for s in np.unique(shard).tolist():
                mperm = self._member_perm(e, s)
                if mperm is not None:
                    here = shard == s
                    member[here] = mperm[offset[here]]
            shards[sel], members[sel] = shard, member
        return shards, members
