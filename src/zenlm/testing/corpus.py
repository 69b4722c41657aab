"""Write small zenlm corpora for tests and benchmarks (no tokenizer, no text).

    write_corpus(tmp_path / "a", train_shards=[50, 13, 40], seq_len=16, tag=0)

Every sample's tokens encode who it is, so a test can check order and coverage from a batch:
token 0 = index_in_split & 0x7FFF, token 1 = index_in_split >> 15 (15 bits each so the pair fits
uint16 vocabularies), token 2 = ``tag`` (which corpus), token 3 = 0 for train and 1 for valid;
the rest are pseudo-random ids below ``vocab_size``. `sample_identity(input_ids)` decodes them.
Document starts are pseudo-random too (about one per 8 tokens when ``docs=True``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from zenlm.data import format as fmt

TEST_FINGERPRINT = "ab" * 32
"""Default tokenizer fingerprint written into test manifests (a sha256-shaped hex string)."""


def sample_tokens(
    split: str, index: int, seq_len: int, tag: int, vocab_size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The (seq_len + 1,) token ids and the doc starts of one sample; deterministic."""
    rng = np.random.default_rng([seed, tag, fmt.SPLITS.index(split), index])
    tokens = rng.integers(4, vocab_size, size=seq_len + 1, dtype=np.int64)
    tokens[0], tokens[1] = index & 0x7FFF, index >> 15
    tokens[2], tokens[3] = tag, fmt.SPLITS.index(split)
    n_docs = int(rng.integers(0, max(1, (seq_len + 1) // 8)))
    starts = np.unique(rng.integers(1, seq_len + 1, size=n_docs)).astype(np.uint32)
    return tokens, starts


def write_corpus(
    corpus_dir: str | os.PathLike,
    train_shards: list[int],
    seq_len: int = 16,
    valid_shards: tuple[int, ...] | list[int] = (),
    tag: int = 0,
    vocab_size: int = 1000,
    fingerprint: str = TEST_FINGERPRINT,
    docs: bool = True,
    seed: int = 0,
) -> fmt.CorpusManifest:
    """Write a corpus with the given samples per shard; returns its manifest.

    `tag` (< vocab_size) marks every sample of this corpus in token 2. Token dtype follows
    `vocab_size` exactly as the real writer does (uint16 up to 65536).
    """
    out = Path(corpus_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = fmt.dtype_for_vocab(vocab_size)
    splits: dict[str, fmt.SplitInfo] = {}
    for split, sizes in (("train", train_shards), ("valid", valid_shards)):
        info = fmt.SplitInfo()
        index = 0
        for shard_i, n in enumerate(sizes):
            name = fmt.shard_name(split, shard_i)
            with wds.TarWriter(str(out / name), mtime=0) as sink:
                for _ in range(n):
                    tokens, starts = sample_tokens(split, index, seq_len, tag, vocab_size, seed)
                    if not docs:
                        starts = starts[:0]
                    sink.write(fmt.encode_sample(fmt.sample_key(index), tokens, starts, dtype))
                    index += 1
            digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
            info.shards.append(fmt.ShardInfo(name, n, n * (seq_len + 1), digest))
        splits[split] = info
    tok = fmt.TokenizerInfo(
        fingerprint=fingerprint, vocab_size=vocab_size, bos_id=1, eos_id=2, pad_id=3
    )
    manifest = fmt.CorpusManifest(seq_len=seq_len, dtype=dtype.str, tokenizer=tok, splits=splits)
    fmt.write_manifest(out, manifest)
    return manifest


def sample_identity(input_ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """(batch, seq) ids -> (batch, 3) int64 rows of (index_in_split, tag, split code)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    return np.stack([ids[:, 0] | (ids[:, 1] << 15), ids[:, 2], ids[:, 3]], axis=1)
