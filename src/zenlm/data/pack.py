"""Packing token streams into fixed-length samples, and writing samples into tar shards.

Packing: documents (each already ending in EOS) are concatenated in input order and cut into
samples of tokens_per_sample = seq_len + 1 tokens. A document may span samples. For each sample
the positions in [1, seq_len] where a document begins are kept (format.py ``docstarts``) so the
loader can mask attention per document. The final partial sample of a split is dropped; the
writer counts its tokens in the manifest stats.

Example packing (fine-tuning, `ExamplePacker`): whole examples, each with its loss mask, are
placed first-fit into a window of open samples and never split; the rest of a sample is padding
(its own document, loss mask 0). See docs/finetune.md.

Sharding: shard i of a split holds samples [i * S, (i + 1) * S) with S = samples_per_shard, a
pure function of the settings. The same inputs and settings therefore give byte-identical shards
(tar mtimes are fixed), which is what lets a rerun skip shards that are already complete.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from zenlm.data.format import ShardInfo, encode_sample, sample_key, sha256_file, shard_name

TAR_BLOCK = 512


class Packer:
    """Stateful cutter of one split's token stream into (tokens_per_sample,) samples."""

    def __init__(self, tokens_per_sample: int):
        self.tokens_per_sample = tokens_per_sample
        self._tail = np.zeros(0, dtype=np.uint32)  # tokens not yet in a full sample
        self._tail_starts = np.zeros(0, dtype=np.int64)  # doc starts inside _tail

    @property
    def leftover_tokens(self) -> int:
        return len(self._tail)

    def add(
        self, tokens: np.ndarray, doc_lens: np.ndarray
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Append documents (concatenated `tokens`, lengths `doc_lens`); yield each full sample.

        Yields (tokens, docstarts): a view of tokens_per_sample ids and the uint32 positions in
        [1, seq_len] where a document starts inside it.
        """
        if len(tokens) == 0:
            return
        n = self.tokens_per_sample
        offset = len(self._tail)
        stream = np.concatenate([self._tail, tokens])
        new_starts = offset + np.concatenate([[0], np.cumsum(doc_lens[:-1])]).astype(np.int64)
        starts = np.concatenate([self._tail_starts, new_starts])
        full = len(stream) // n
        # Doc starts per sample: sample index starts // n, position starts % n (0 is implicit).
        cut = np.searchsorted(starts, np.arange(1, full + 1) * n)
        begin = 0
        for k in range(full):
            s = starts[begin : cut[k]] - k * n
            begin = cut[k]
            yield stream[k * n : (k + 1) * n], s[s > 0].astype("<u4")
        self._tail = stream[full * n :]
        self._tail_starts = starts[begin:] - full * n


class ExamplePacker:
    """Whole examples -> (tokens_per_sample,) samples with doc starts and a loss mask.

    Policy (deterministic, a pure function of the examples in input order): first-fit over a
    window of at most `window` open samples, oldest first. An example goes into the first open
    sample with room for all of it; when none has room, a new sample is opened, and if `window`
    samples are already open the oldest is closed first. A sample is closed (yielded) when it is
    exactly full, when it is pushed out of the window, or at `flush()`, in that order of events.
    window=1 is next-fit: examples stay in input order. Each example is its own document (a doc
    start where it begins); the unused end of a sample is `pad_id` with loss mask 0 and is a
    document of its own too, so attention inside a real example never sees padding.

    Examples must not be longer than tokens_per_sample (the caller drops or refuses them).
    """

    def __init__(self, tokens_per_sample: int, pad_id: int, window: int = 64):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.tokens_per_sample, self.pad_id, self.window = tokens_per_sample, pad_id, window
        self._open: list[list[tuple[np.ndarray, np.ndarray]]] = []  # examples per open sample
        self._free: list[int] = []  # room left in each open sample
        self.pad_tokens = 0  # padding in the samples yielded so far

    def add(
        self, tokens: np.ndarray, mask: np.ndarray
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Place one example; yield the samples this closes as (tokens, docstarts, loss mask)."""
        n = len(tokens)
        if not 0 < n <= self.tokens_per_sample or len(mask) != n:
            raise ValueError(f"example of {n} tokens (mask {len(mask)}) does not fit a sample")
        slot = next((i for i, free in enumerate(self._free) if free >= n), -1)
        if slot < 0:
            if len(self._open) == self.window:
                yield self._close(0)
            self._open.append([])
            self._free.append(self.tokens_per_sample)
            slot = len(self._open) - 1
        self._open[slot].append((tokens, mask))
        self._free[slot] -= n
        if self._free[slot] == 0:
            yield self._close(slot)

    def flush(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Close every open sample, oldest first."""
        while self._open:
            yield self._close(0)

    def _close(self, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        examples, free = self._open.pop(slot), self._free.pop(slot)
        lens = [len(t) for t, _ in examples]
        starts = np.cumsum([0, *lens])  # each example's start, then the padding's
        tokens = np.full(self.tokens_per_sample, self.pad_id, np.uint32)
        mask = np.zeros(self.tokens_per_sample, np.uint8)
        for (t, m), a, b in zip(examples, starts[:-1], starts[1:]):
            tokens[a:b], mask[a:b] = t, m
        keep = starts[1:] if free else starts[1:-1]  # padding starts a document of its own
        self.pad_tokens += free
        return tokens, keep.astype("<u4"), mask


def sample_tar_bytes(tokens_per_sample: int, itemsize: int, loss_mask: bool = False) -> int:
    """Approximate tar bytes per sample: two members, each a header block plus padded data
    (docstarts counted as one data block, i.e. up to 128 document starts), and with a loss
    mask a third (header plus one uint8 per token, padded)."""
    data = -(-tokens_per_sample * itemsize // TAR_BLOCK) * TAR_BLOCK
    if loss_mask:
        data += TAR_BLOCK + -(-tokens_per_sample // TAR_BLOCK) * TAR_BLOCK
    return TAR_BLOCK + data + 2 * TAR_BLOCK


class ShardSink:
    """Writes one split's samples into shards of `samples_per_shard`, skipping complete ones.

    `complete` maps shard file names to ShardInfo for shards verified complete by an earlier run
    with the same settings: their samples are counted but not written again. `on_shard` is called
    with each shard's ShardInfo as it completes (written or skipped), in order.
    """

    def __init__(
        self,
        out_dir: Path,
        split: str,
        samples_per_shard: int,
        dtype: np.dtype,
        complete: dict[str, ShardInfo],
        on_shard: Callable[[ShardInfo, bool], None],
    ):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.samples_per_shard = samples_per_shard
        self.complete, self.on_shard = complete, on_shard
        self.samples = 0  # samples seen in this split (also the next sample's key)
        self._shard_index = 0
        self._in_shard = 0
        self._tokens_in_shard = 0
        self._writer = None  # webdataset.TarWriter of the open shard
        self._file = None
        self._skip = False

    def _name(self) -> str:
        return shard_name(self.split, self._shard_index)

    def _open(self) -> None:
        self._skip = self._name() in self.complete
        if not self._skip:
            # Imported here: webdataset imports torch (seconds), which the tools' argument and
            # input checks, run before the first shard, should not wait for.
            import webdataset as wds

            tmp = self.out_dir / (self._name() + ".tmp")
            self._file = open(tmp, "wb")  # noqa: SIM115 (closed in _finish, spans many writes)
            # mtime fixed and no encoder: the tar bytes depend on the samples only.
            self._writer = wds.TarWriter(self._file, encoder=False, mtime=0.0)
            # TarWriter does not pass its format on to tarfile (which then defaults to pax);
            # plain ustar headers are ~40% cheaper per member and all we need.
            self._writer.tarstream.format = tarfile.USTAR_FORMAT

    def write(
        self, tokens: np.ndarray, doc_starts: np.ndarray, loss_mask: np.ndarray | None = None
    ) -> None:
        if self._in_shard == 0:
            self._open()
        if not self._skip:
            key = sample_key(self.samples)
            self._writer.write(encode_sample(key, tokens, doc_starts, self.dtype, loss_mask))
        self.samples += 1
        self._in_shard += 1
        self._tokens_in_shard += len(tokens)
        if self._in_shard == self.samples_per_shard:
            self._finish()

    def _finish(self) -> None:
        name = self._name()
        if self._skip:
            info, skipped = self.complete[name], True
        else:
            self._writer.close()  # closes the tar stream, not our file
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            tmp = self.out_dir / (name + ".tmp")
            info = ShardInfo(name, self._in_shard, self._tokens_in_shard, sha256_file(tmp))
            os.replace(tmp, self.out_dir / name)
            skipped = False
        self._writer = self._file = None
        self.on_shard(info, skipped)
        self._shard_index += 1
        self._in_shard = 0
        self._tokens_in_shard = 0

    def close(self) -> None:
        """Finish the last, possibly smaller, shard."""
        if self._in_shard:
            self._finish()

    def abort(self) -> None:
        """Close the shard being written without finishing it (its .tmp stays for the caller
        to remove)."""
        try:
            if self._writer is not None:
                self._writer.close()  # (else its finalizer writes to the closed file)
        finally:
            if self._file is not None:
                self._file.close()
            self._writer = self._file = None
