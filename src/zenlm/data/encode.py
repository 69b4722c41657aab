"""Worker side of preprocess(): documents -> split by hash -> token ids with EOS.

Kept apart from writer.py so that spawned worker processes import only numpy and SentencePiece
(webdataset, imported by the writer, pulls in torch: seconds of start-up per worker).
"""

from __future__ import annotations

import hashlib
from itertools import chain

import numpy as np
import sentencepiece as spm

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
    """Documents -> split + ids. Thread-safe: SentencePiece releases the GIL while encoding."""

    def __init__(self, model_path: str, add_bos: bool):
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.eos = self.sp.eos_id()
        self.bos = self.sp.bos_id() if add_bos else -1

    def __call__(
        self, docs: list[str], valid_fraction: float
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Documents -> per split [train, valid]: (concatenated uint32 ids, int64 doc lengths).

        Each document becomes [BOS] + ids + [EOS] (BOS only with add_bos); input order is kept
        within each split."""
        ids = self.sp.encode(docs)
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


def init_worker(model_path: str, add_bos: bool) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = Encoder(model_path, add_bos)


def encode_in_worker(docs: list[str], valid_fraction: float) -> list[tuple[np.ndarray, np.ndarray]]:
    return _WORKER_ENCODER(docs, valid_fraction)
