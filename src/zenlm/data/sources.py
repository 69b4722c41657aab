"""Corpora opened and checked against the run, and the reader that turns global indices into batches.

`SampleSource.read(start, count)` is the whole data path: global indices [start, start + count)
-> blend -> per-corpus epoch order -> (shard, member) -> one pread each -> a collated batch.
It is a pure function of its arguments (given the corpora and seed), which is what makes the
loader's rank/worker split and resume exact.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zenlm.data import format as fmt
from zenlm.data.blend import BlendSchedule
from zenlm.data.format import CorpusError
from zenlm.data.order import EpochOrder
from zenlm.data.shards import ShardCache, ShardSpec, check_shard_file, shard_specs

# Labels equal to this count in no loss or accuracy: torch's cross-entropy default and the same
# constant as zenlm.model.factory.IGNORE_INDEX (not imported: the model package pulls in layers
# this module has no use for; tests/unit/test_sft_data.py asserts they are equal).
IGNORE_INDEX = -100


@dataclass
class Corpus:
    """One split of one corpus directory, checked against the run."""

    path: str
    split: str
    manifest: fmt.CorpusManifest
    shards: list[ShardSpec]
    order: EpochOrder

    @property
    def samples(self) -> int:
        return self.order.total

    def signature(self) -> str:
        """Identifies the sample layout the order depends on (shard names and sizes), not paths."""
        text = ";".join(f"{Path(s.path).name}:{s.samples}" for s in self.shards)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_corpora(
    paths: Sequence[str | os.PathLike],
    split: str,
    seq_len: int,
    expected_tokenizer_fingerprint: str | None,
    seed: int,
    shuffle: bool,
) -> list[Corpus]:
    """Load and check every manifest; stat every shard. Raises CorpusError naming the culprit."""
    corpora: list[Corpus] = []
    for stream, p in enumerate(paths):
        manifest = fmt.load_manifest(p)
        where = str(Path(p) / fmt.MANIFEST_NAME)
        fmt.check_tokenizer(manifest, expected_tokenizer_fingerprint, where)
        first = corpora[0].manifest.tokenizer.fingerprint if corpora else None
        if first and manifest.tokenizer.fingerprint != first:
            raise CorpusError(
                f"{where}: tokenizer {manifest.tokenizer.fingerprint[:16]}… differs from "
                f"{corpora[0].path}'s tokenizer {first[:16]}…; blended corpora must share one"
            )
        if manifest.seq_len != seq_len:
            raise CorpusError(
                f"{where}: corpus seq_len is {manifest.seq_len}, the run uses {seq_len}"
            )
        if manifest.dtype not in ("<u2", "<u4"):
            raise CorpusError(
                f"{where}: unsupported token dtype {manifest.dtype!r} (expected '<u2' or '<u4')"
            )
        if manifest.tokenizer.vocab_size > np.iinfo(np.dtype(manifest.dtype)).max + 1:
            raise CorpusError(
                f"{where}: vocab_size {manifest.tokenizer.vocab_size} does not fit token dtype "
                f"{manifest.dtype!r} (manifest edited?)"
            )
        info = manifest.splits.get(split)
        if info is None or info.samples == 0:
            raise CorpusError(f"{where}: corpus has no {split!r} samples")
        shards = shard_specs(p, manifest, split)
        for spec in shards:
            check_shard_file(spec)
        order = EpochOrder([s.samples for s in shards], seed, stream, shuffle)
        corpora.append(Corpus(str(p), split, manifest, shards, order))
    if not corpora:
        raise CorpusError("no corpora given")
    return corpora


class SampleSource:
    """Reads blended samples by global index and collates them into a batch.

    Batch (all torch tensors, batch = count rows):
      input_ids    (batch, seq_len) int64   tokens[:-1]
      labels       (batch, seq_len) int64   tokens[1:]; IGNORE_INDEX where a corpus with a loss
                                            mask has lossmask[1:] == 0 (prompt, template, padding)
      position_ids (batch, seq_len) int64   0, 1, ... restarting at every document start
      doc_ids      (batch, seq_len) int32   segment index within the row (0 = first segment)
    """

    def __init__(
        self, corpora: list[Corpus], weights: Sequence[float], verify_checksums: bool = False
    ) -> None:
        self.corpora = corpora
        self.blend = BlendSchedule(weights)
        self.seq_len = corpora[0].manifest.seq_len
        self.vocab_size = corpora[0].manifest.tokenizer.vocab_size
        self.cache = ShardCache(verify_checksums)
        self._dtypes = [np.dtype(c.manifest.dtype) for c in corpora]

    def __getstate__(self) -> dict:
        # Spawned workers get a fresh cache: file descriptors do not cross processes.
        state = self.__dict__.copy()
        state["cache"] = ShardCache(self.cache.verify_checksums)
        return state

    def locate(self, start: int, count: int) -> tuple[list[int], list[int], list[int]]:
        """Global indices -> (corpus, shard, member) lists of length count."""
        cids, local = self.blend.assign(start, count)
        shards, members = np.empty_like(local), np.empty_like(local)
        for c in np.unique(cids).tolist():
            sel = cids == c
            shards[sel], members[sel] = self.corpora[c].order.locate(local[sel])
        return cids.tolist(), shards.tolist(), members.tolist()

    def read(self, start: int, count: int) -> dict[str, torch.Tensor]:
        S = self.seq_len
        input_ids = np.empty((count, S), np.int64)
        labels = np.empty((count, S), np.int64)
        doc_starts: list[np.ndarray] = []  # raw uint32 doc starts of the rows that have any
        doc_rows: list[int] = []
        where: list[str] = []
        for i, (c, s, m) in enumerate(zip(*self.locate(start, count))):
            spec = self.corpora[c].shards[s]
            fd, index = self.cache.get(spec)
            off, length, t_rel, d_rel, d_len, m_rel = index[m]
            raw = os.pread(fd, length, off)
            if len(raw) != length:
                raise CorpusError(f"{spec.path}: short read of sample {m} (file changed on disk?)")
            tokens = np.frombuffer(raw, self._dtypes[c], S + 1, t_rel)
            input_ids[i] = tokens[:-1]  # uint -> int64 cast on copy
            labels[i] = tokens[1:]
            if m_rel >= 0:  # labels[t] predicts tokens[t + 1]: it counts iff lossmask[t + 1]
                labels[i][np.frombuffer(raw, np.uint8, S, m_rel + 1) == 0] = IGNORE_INDEX
            where.append(spec.path)
            if d_len:
                doc_starts.append(np.frombuffer(raw, "<u4", d_len // 4, d_rel))
                doc_rows.append(i)
        self._check_vocab(input_ids, labels, where)
        position_ids, doc_ids = self._segments(count, doc_starts, doc_rows, where)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "doc_ids": torch.from_numpy(doc_ids),
        }

    def _check_vocab(self, input_ids: np.ndarray, labels: np.ndarray, where: list[str]) -> None:
        # One pass over the batch: an id >= vocab_size would crash the embedding far from here.
        # labels[:, -1] is the last stored token, or IGNORE_INDEX (< V) where a mask hides it.
        V = self.vocab_size
        if max(int(input_ids.max()), int(labels[:, -1].max())) >= V:
            row = int(np.argmax((input_ids >= V).any(1) | (labels >= V).any(1)))
            raise CorpusError(
                f"{where[row]}: token id >= vocab_size {V} (corrupt data); "
                "tools/verify_corpus.py lists every bad shard"
            )

    def _segments(
        self, count: int, doc_starts: list[np.ndarray], doc_rows: list[int], where: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(count, S) int64 position_ids and int32 doc_ids from the rows' document starts."""
        S = self.seq_len
        if not doc_starts:  # no document boundary anywhere in the batch
            return np.broadcast_to(np.arange(S), (count, S)).copy(), np.zeros((count, S), np.int32)
        ds = np.concatenate(doc_starts).astype(np.int64)
        rows = np.repeat(doc_rows, [len(d) for d in doc_starts])
        bad = (ds < 1) | (ds > S)
        if bad.any():
            row = int(rows[np.argmax(bad)])
            raise CorpusError(f"{where[row]}: doc start outside [1, {S}] (corrupt data)")
        keep = ds < S  # a start at S only affects the last label, not the inputs
        # Every segment start in flat (row * S + position) coordinates, row starts included.
        starts = np.sort(np.concatenate([np.arange(count) * S, rows[keep] * S + ds[keep]]))
        lengths = np.diff(starts, append=count * S)
        if not lengths.all():
            row = int(starts[np.argmin(lengths)] // S)
            raise CorpusError(f"{where[row]}: repeated doc start (corrupt data)")
        position_ids = np.arange(count * S) - np.repeat(starts, lengths)
        first_seg = np.searchsorted(starts, np.arange(count) * S)  # (count,) segment of row start
        seg_in_row = np.arange(len(starts)) - first_seg[starts // S]
        doc_ids = np.repeat(seg_in_row.astype(np.int32), lengths)
        return position_ids.reshape(count, S), doc_ids.reshape(count, S)
