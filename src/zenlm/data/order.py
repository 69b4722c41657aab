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
    window_shards: the permuted shard sequence of an epoch is cut into windows of this many
    shards, and the samples of each window are permuted jointly. A shard holds a contiguous run
    of the source documents (preprocessing packs in input order), so permuting within one shard
    only would train on one stretch of the corpus at a time; a window mixes W random shards while
    keeping the index memory at W shards' sample counts. W >= shard count is a full permutation.
    """

    def __init__(
        self,
        shard_sizes: Sequence[int],
        seed: int,
        stream: int = 0,
        shuffle: bool = True,
        window_shards: int = 16,
    ) -> None:
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        if self.total <= 0:
            raise ValueError("EpochOrder needs at least one sample")
        if window_shards < 1:
            raise ValueError(f"window_shards must be >= 1, got {window_shards}")
        self.seed, self.stream, self.shuffle = int(seed), int(stream), shuffle
        self.window = int(window_shards) if shuffle else 1
        # Epochs and windows in flight at once: 2 epochs (a batch may straddle the boundary) and
        # a few windows (workers read neighbouring micro batches); both are cheap to rebuild.
        self._epochs = _LRU(2)
        self._windows = _LRU(4)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard at each visiting slot, first epoch position of each window)."""
        hit = self._epochs.get(epoch)
        if hit is not None:
            return hit
        n = len(self.sizes)
        perm = seeded_permutation(n, (self.seed, self.stream, epoch, 0)) if self.shuffle else None
        perm = np.arange(n) if perm is None else perm
        window_sizes = np.add.reduceat(self.sizes[perm], np.arange(0, n, self.window))
        window_starts = np.concatenate([[0], np.cumsum(window_sizes)[:-1]])
        return self._epochs.put(epoch, (perm, window_starts))

    def _window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard of each window position, member of each window position) for window w."""
        hit = self._windows.get((epoch, w))
        if hit is not None:
            return hit
        perm, _ = self._epoch(epoch)
        shards = perm[w * self.window : (w + 1) * self.window]
        sizes = self.sizes[shards]
        shard_of = np.repeat(shards, sizes)
        member_of = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        if self.shuffle:
            mix = seeded_permutation(len(shard_of), (self.seed, self.stream, epoch, 1, w))
            shard_of, member_of = shard_of[mix], member_of[mix]
        return self._windows.put((epoch, w), (shard_of, member_of))

    def locate(self, js: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(count,) int64 corpus-local indices -> (shard, member) arrays of the same shape."""
        js = np.asarray(js, dtype=np.int64)
        epochs, pos = np.divmod(js, self.total)
        shards = np.empty_like(js)
        members = np.empty_like(js)
        for e in np.unique(epochs).tolist():
            sel = np.flatnonzero(epochs == e)
            _, window_starts = self._epoch(e)
            # side="right" - 1 skips empty windows: they share their start with the next.
            windows = np.searchsorted(window_starts, pos[sel], side="right") - 1
            for w in np.unique(windows).tolist():
                here = sel[windows == w]
                shard_of, member_of = self._window(e, w)
                offset = pos[here] - window_starts[w]
                shards[here], members[here] = shard_of[offset], member_of[offset]
        return shards, members
