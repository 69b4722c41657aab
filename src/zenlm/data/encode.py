"""Worker side of preprocess(): documents -> split by hash -> token ids with EOS.

Kept apart from writer.py so that spawned worker processes import only numpy, the tokenizer
module and its library (SentencePiece, or `tokenizers` for a Hugging Face tokenizer.json), not
webdataset, which the writer imports and which pulls in torch: seconds of start-up per worker.
"""

from __future__ import annotations

import hashlib
import os
from itertools import chain

import numpy as np

from zenlm.data.tokenizer import load_tokenizer

N_SPLITS = 2  # format.SPLITS = ("train", "valid"); index 0 and 1 below


def split_of(text: str, valid_fraction: float) -> int:
    """0 (train) or 1 (valid): valid iff blake2b(UTF-8 text) / 2**64 < valid_fraction.

    A pure function of the text, so the split is the same for any worker count, chunking or
    machine, and duplicated documents land in the same split."""
    if valid_fraction <= 0.0:
        return 0
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return 1 if h / 2**64 < valid_fraction else 0


class Encoder:
    """Documents -> split + ids. Thread-safe: SentencePiece and tokenizers release the GIL while
    encoding a batch.

    tokenizer_path is a SentencePiece .model file or a Hugging Face tokenizer directory
    (tokenizer.load_tokenizer). A SentencePiece model encodes the batch on its own threads; a
    tokenizer.json through tokenizers' `encode_batch` (its Rust thread pool, shared by all
    threads of a process), without the post-processor's special tokens."""

    def __init__(self, tokenizer_path: str, add_bos: bool):
        tok = load_tokenizer(tokenizer_path)
        sp = getattr(tok, "sp", None)
        self._encode_batch = sp.encode if sp is not None else tok.encode_batch
        self.eos = tok.eos_id
        self.bos = tok.bos_id if add_bos else -1

    def __call__(
        self, docs: list[str], valid_fraction: float
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Documents -> per split [train, valid]: (concatenated uint32 ids, int64 doc lengths).

        Each document becomes [BOS] + ids + [EOS] (BOS only with add_bos); input order is kept
        within each split."""
        ids = self._encode_batch(docs)
        for x in ids:
            x.append(self.eos)
            if self.bos >= 0:
                x.insert(0, self.bos)
        which = [split_of(d, valid_fraction) for d in docs]
        out = []
        for s in range(N_SPLITS):
            sel = [x for x, w in zip(ids, which) if w == s]
            lens = np.fromiter(map(len, sel), dtype=np.int64, count=len(sel))
            flat = np.fromiter(chain.from_iterable(sel), dtype=np.uint32, count=int(lens.sum()))
            out.append((flat, lens))
        return out


# Process pool: one Encoder per worker process, built once by the pool initializer.
_WORKER_ENCODER: Encoder | None = None


def init_worker(tokenizer_path: str, add_bos: bool) -> None:
    """Build this worker process's Encoder. The pool's N processes are the parallelism, so
    tokenizers' own thread pool is off in them (one core each, not N x all cores)."""
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = Encoder(tokenizer_path, add_bos)


def encode_in_worker(docs: list[str], valid_fraction: float) -> list[tuple[np.ndarray, np.ndarray]]:
    return _WORKER_ENCODER(docs, valid_fraction)
