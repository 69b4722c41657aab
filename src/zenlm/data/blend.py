"""Deterministic blending of several corpora by weight, as a pure function of the global index.

The k-th sample (k = 0, 1, ...) of corpus c "arrives" at time tau(c, k) = (k + 0.5) / w_c, with
weights normalised to sum to 1. The blended stream is every arrival sorted by (tau, c): global
index i is the i-th arrival. This is Sainte-Lague (Webster) apportionment, a house-monotone
divisor method, so:

- counts_c(n), the number of corpus-c samples among global indices [0, n), stays within a
  small constant (about the number of corpora) of w_c * n for every n;
- counts_before(n) has a closed form up to a few corrections (floor(n * w_c + 0.5) arrivals of
  corpus c lie at or before time n), so jumping to any index costs O(C^2) for C corpora, not
  O(n): resume and DataLoader workers start anywhere without replaying the schedule;
- a run of `count` consecutive indices is one vectorised merge of O(count) candidates.

Megatron's blended dataset uses a greedy "largest deficit" rule, which has no closed form and
must be precomputed for the whole run; this schedule has the same proportions without that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class BlendSchedule:
    """Global index -> (corpus, corpus-local index). Weights must be positive and finite."""

    def __init__(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
        self.weights = w / w.sum()
        self._w = self.weights.tolist()

    @property
    def num_corpora(self) -> int:
        return len(self._w)

    def _tau(self, c: int, k: int) -> float:
        return (k + 0.5) / self._w[c]

    def counts_before(self, n: int) -> np.ndarray:
        """(C,) int64: samples of each corpus among global indices [0, n)."""
        if n < 0:
            raise ValueError(f"global index must be >= 0, got {n}")
        C, T = self.num_corpora, float(n)
        # Arrivals with tau <= T for a common T form a prefix of the (tau, c) order; the closed
        # form is checked against _tau itself so that rounding cannot break the prefix property.
        k = [max(0, math.floor(T * self._w[c] + 0.5)) for c in range(C)]
        for c in range(C):
            while k[c] > 0 and self._tau(c, k[c] - 1) > T:
                k[c] -= 1
            while self._tau(c, k[c]) <= T:
                k[c] += 1
        # The prefix holds n +- C/2 arrivals; drop the latest or add the earliest to reach n.
        total = sum(k)
        while total > n:
            c = max((c for c in range(C) if k[c] > 0), key=lambda c: (self._tau(c, k[c] - 1), c))
            k[c] -= 1
            total -= 1
        while total < n:
            c = min(range(C), key=lambda c: (self._tau(c, k[c]), c))
            k[c] += 1
            total += 1
        return np.asarray(k, dtype=np.int64)

    def assign(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Corpus ids and corpus-local indices of global indices [start, start + count)."""
        if self.num_corpora == 1:
            return np.zeros(count, np.int64), np.arange(start, start + count, dtype=np.int64)
        first = self.counts_before(start)
        margin = self.num_corpora + 2
        while True:
            # Candidates: the next ~count*w_c + margin arrivals of each corpus.
            n_cand = [math.ceil(count * w) + margin for w in self._w]
            cids = np.repeat(np.arange(self.num_corpora), n_cand)
            ks = np.concatenate([first[c] + np.arange(n) for c, n in enumerate(n_cand)])
            taus = (ks + 0.5) / self.weights[cids]
            take = np.lexsort((cids, taus))[:count]
            taken = np.bincount(cids[take], minlength=self.num_corpora)
            # If some corpus used all its candidates, its next arrival might belong in the
            # window too: widen and redo (never seen with this margin; kept for safety).
            if np.all(taken < np.asarray(n_cand)):
                return cids[take], ks[take]
            margin *= 2
