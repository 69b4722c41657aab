"""The trainer-facing loaders: a resumable training stream and a restartable validation pass.

Global order: global index g (0, 1, 2, ...) -> one sample, a pure function of (seed, g) for given
corpora and weights (see sources.py, blend.py, order.py). The training run consumes it in global
batches of B = global_batch_size samples per optimizer step:

    step s (counted from `base`, the consumed_samples the loader started or resumed at)
    rank r of D takes the contiguous slice   base + s*B + r*(B/D) + [0, B/D)
    micro batch a (0 <= a < A = B/(D*mbs)) of that slice is   ... + a*mbs + [0, mbs)

Each rank numbers its micro batches t = s*A + a; DataLoader worker w of W produces t = w, w+W,
w+2W, ... and torch's DataLoader hands batches back round-robin over workers, i.e. in t order.
Every rank gets exactly B/D samples per step whatever the shard sizes, and the stream never ends
(epochs roll over), so no rank can run dry while others wait in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from zenlm.data.sources import SampleSource, open_corpora
from zenlm.runtime.signals import ignore_in_worker, reap_workers_at_exit

# Labels equal to this count in no loss or accuracy (torch's cross-entropy default; the same
# constant as zenlm.model.factory.IGNORE_INDEX, asserted by tests/unit/test_blend.py).
IGNORE_INDEX = -100

STATE_VERSION = 1


@dataclass(frozen=True)
class _TrainLayout:
    """Rank micro batch t -> (first global index, count); picklable for spawned workers."""

    base: int
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def __call__(self, t: int) -> tuple[int, int]:
        m, B, D = self.micro_batch_size, self.global_batch_size, self.dp_size
        step, a = divmod(t, B // (m * D))
        return self.base + step * B + self.dp_rank * (B // D) + a * m, m


@dataclass(frozen=True)
class _ValidLayout:
    """Global micro step t covers t*mbs*D + [0, mbs*D); rank r takes its r-th mbs."""

    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def __call__(self, t: int) -> tuple[int, int]:
        m = self.micro_batch_size
        return (t * self.dp_size + self.dp_rank) * m, m


class _MicroBatchStream(IterableDataset):
    """Yields micro batches t = start, start+1, ... (< stop) of one rank; workers take every W-th.

    With `index_limit` set, rows whose global index is >= index_limit keep their tokens but get
    every label set to IGNORE_INDEX: they count in no loss, accuracy or token total. Validation
    uses it so a fixed sample count needs no divisibility by micro batch x DP.
    """

    def __init__(
        self,
        source: SampleSource,
        first_index: Callable[[int], tuple[int, int]],
        start: int,
        stop: int | None,
        index_limit: int | None = None,
    ) -> None:
        self.source, self.first_index, self.start, self.stop = source, first_index, start, stop
        self.index_limit = index_limit

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        t = self.start + w
        while self.stop is None or t < self.stop:
            g, count = self.first_index(t)
            batch = self.source.read(g, count)
            if self.index_limit is not None and g + count > self.index_limit:
                batch["labels"][max(self.index_limit - g, 0) :] = IGNORE_INDEX
            yield batch
            t += W


def _data_loader(stream: IterableDataset, num_workers: int, pin_memory: bool) -> DataLoader:
    extra = {"prefetch_factor": 4} if num_workers > 0 else {}
    # batch_size=None: the stream yields whole micro batches. Workers pass our own tensors back
    # through torch's shared-memory queue; data from disk is never unpickled.
    # generator: torch's DataLoader draws its workers' base seed from this generator each time
    # an iterator is created, from the global torch RNG without one; a resumed run creates one
    # iterator more than the uninterrupted run, so the global stream would differ after resume.
    # The streams draw no random numbers, so a fixed private generator changes nothing else.
    # worker_init_fn: workers ignore SIGTERM/SIGUSR1, which a preemption sends to every process
    # of the job step; the training process saves, and stops them without signals
    # (zenlm.runtime.signals).
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_in_worker if num_workers > 0 else None,
        **extra,
    )


def _shutdown(it: Iterator | None) -> None:
    """Stop a DataLoader iterator's workers now.

    Left to the garbage collector after a worker raised (the traceback keeps the iterator in a
    reference cycle), torch's teardown stalls 5 s per worker; shutting down explicitly takes ms.
    """
    stop = getattr(it, "_shutdown_workers", None)
    if stop is not None:
        stop()


def _batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    it = iter(loader)
    reap_workers_at_exit(it)  # its workers ignore SIGTERM (zenlm.runtime.signals)
    try:
        yield from it
    finally:
        _shutdown(it)


class TrainLoader:
    """Infinite iterator of micro batches for one DP rank; see the module doc for the split.

    `consumed_samples` counts global samples of completed steps, i.e. micro batches actually
    returned by next() (not those prefetched by workers), assuming all ranks move in lockstep.
    """

    def __init__(
        self,
        source: SampleSource,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        bad = micro_batch_size <= 0 or global_batch_size <= 0
        if bad or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of "
                f"micro_batch_size {micro_batch_size} x dp_size {dp_size}"
            )
        self.source = source
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grad_accum_steps = global_batch_size // (micro_batch_size * dp_size)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.seed = source.corpora[0].order.seed
        self._base = 0  # global index where step 0 of this loader starts
        self._micro = 0  # micro batches delivered since _base
        self._it: Iterator | None = None

    def _layout_fn(self) -> _TrainLayout:
        return _TrainLayout(
            self._base, self.global_batch_size, self.micro_batch_size, self.dp_rank, self.dp_size
        )

    @property
    def consumed_samples(self) -> int:
        return self._base + (self._micro // self.grad_accum_steps) * self.global_batch_size

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            stream = _MicroBatchStream(self.source, self._layout_fn(), self._micro, None)
            self._it = iter(_data_loader(stream, self.num_workers, self.pin_memory))
            reap_workers_at_exit(self._it)
        try:
            batch = next(self._it)
        except BaseException:
            self.close()
            raise
        self._micro += 1
        return batch

    def close(self) -> None:
        """Stop workers; the next next() restarts them at the current position."""
        _shutdown(self._it)
        self._it = None

    def _layout(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "weights": self.source.blend.weights.round(12).tolist(),
            "corpora": [c.signature() for c in self.source.corpora],
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain ints/strings/lists (JSON-safe). Resume with load_state_dict at any DP size."""
        return {
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "micro_batches_in_step": self._micro % self.grad_accum_steps,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            **self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved run's global order from its consumed_samples.

        At a step boundary any DP size, micro batch or global batch size continues the same
        global order (a new global batch size just starts its steps at consumed_samples).
        Mid-step (micro_batches_in_step > 0) needs the same batch layout.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} unsupported")
        for key, value in self._layout().items():
            if state[key] != value:
                raise ValueError(
                    f"data loader state has {key}={state[key]!r} but this loader has {value!r}; "
                    "the sample order would differ, so it cannot resume exactly"
                )
        into_step = int(state["micro_batches_in_step"])
        if into_step and any(
            state[k] != getattr(self, k)
            for k in ("global_batch_size", "micro_batch_size", "dp_size")
        ):
            raise ValueError(
                "cannot resume mid-step (micro_batches_in_step="
                f"{into_step}) with another batch layout; save at a step boundary"
            )
        self.close()
        self._base, self._micro = int(state["consumed_samples"]), into_step


class ValidLoader:
    """A fixed validation pass over the first `num_samples` global indices of the valid stream.

    The valid splits are read in natural order (not shuffled), blended by the training weights,
    wrapping around if num_samples exceeds the data. Global micro step t covers global indices
    t*mbs*D + [0, mbs*D); rank r takes the r-th mbs of it. Every rank runs the same number of
    micro batches, ceil(num_samples / (mbs*D)) (collectives and the pipeline schedule need
    that); rows past num_samples in the last step are read but fully label-masked. So the set of
    counted samples is [0, num_samples) at every DP size and micro batch size, and summed
    (loss, correct, tokens) give the same validation numbers at every layout.
    """

    def __init__(
        self,
        source: SampleSource,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_samples: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if num_samples < 1 or micro_batch_size < 1:
            raise ValueError(
                f"validation needs num_samples >= 1 and micro_batch_size >= 1, "
                f"got {num_samples} and {micro_batch_size}"
            )
        self.source, self.micro_batch_size = source, micro_batch_size
        self.dp_rank, self.dp_size, self.num_samples = dp_rank, dp_size, num_samples
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        """Micro batches per rank per pass (the same on every rank)."""
        per_step = self.micro_batch_size * self.dp_size
        return -(-self.num_samples // per_step)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        layout = _ValidLayout(self.micro_batch_size, self.dp_rank, self.dp_size)
        stream = _MicroBatchStream(self.source, layout, 0, len(self), self.num_samples)
        return _batches(_data_loader(stream, self.num_workers, self.pin_memory))


def build_train_loader(
    corpora: Sequence[tuple[str | os.PathLike, float]],
    seq_len: int,
    micro_batch_size: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    seed: int = 0,
    expected_tokenizer_fingerprint: str | None = None,
    verify_checksums: bool = False,
    pin_memory: bool = False,
) -> TrainLoader:
    """Loader over the 'train' splits of (path, weight) corpora; see TrainLoader."""
    paths, weights = [p for p, _ in corpora], [w for _, w in corpora]
    opened = open_corpora(paths, "train", seq_len, expected_tokenizer_fingerprint, seed, True)
    source = SampleSource(opened, weights, verify_checksums)
    return TrainLoader(
        source, micro_batch_size, global_batch_size, dp_rank, dp_size, num_workers, pin_memory
    )


def build_valid_loader(
    corpora: Sequence[tuple[str | os.PathLike, float]],
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_samples: int,
    num_workers: int = 0,
    expected_tokenizer_fingerprint: str | None = None,
    verify_checksums: bool = False,
    pin_memory: bool = False,
) -> ValidLoader:
    """Loader over the 'valid' splits of (path, weight) corpora; see ValidLoader."""
    paths, weights = [p for p, _ in corpora], [w for _, w in corpora]
    opened = open_corpora(paths, "valid", seq_len, expected_tokenizer_fingerprint, 0, False)
    source = SampleSource(opened, weights, verify_checksums)
    return ValidLoader(
        source, micro_batch_size, dp_rank, dp_size, num_samples, num_workers, pin_memory
    )
