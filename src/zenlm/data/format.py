"""The on-disk corpus format shared by the writer (tools/preprocess.py) and the loader.

A corpus is a directory:

    corpus/
      manifest.json            # CorpusManifest, written last (its presence means "complete")
      train-000000.tar ...     # webdataset tar shards of the train split
      valid-000000.tar ...     # shards of the validation split

Each tar member group (one sample) has the key ``"%010d" % sample_index_in_split`` and two
members, both raw little-endian arrays (never pickled, never numpy .npy):

    <key>.tokens     tokens_per_sample = seq_len + 1 token ids, dtype from the manifest
                     (uint16 when the vocabulary fits in 16 bits, else uint32)
    <key>.docstarts  uint32 positions in [1, seq_len] where a new document begins inside the
                     sequence (position 0 always starts a segment and is not listed); possibly empty

The extra (+1) token lets a sample give inputs = tokens[:-1] and labels = tokens[1:].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zenlm.errors import ZenlmError

FORMAT_NAME = "zenlm-corpus"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "valid")
TOKENS_EXT = "tokens"
DOCSTARTS_EXT = "docstarts"


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CorpusError(ZenlmError, RuntimeError):
    """A corpus on disk is missing, corrupt, or does not match what the run expects."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids < 65536), else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(index_in_split: int) -> str:
    return f"{index_in_split:010d}"


def encode_sample(
    key: str, tokens: np.ndarray, doc_starts: np.ndarray, dtype: np.dtype
) -> dict[str, Any]:
    """The dict that webdataset's TarWriter writes for one sample (bytes values only)."""
    return {
        "__key__": key,
        TOKENS_EXT: np.ascontiguousarray(tokens, dtype=dtype).tobytes(),
        DOCSTARTS_EXT: np.ascontiguousarray(doc_starts, dtype="<u4").tobytes(),
    }


def decode_tokens(raw: bytes, dtype: np.dtype, tokens_per_sample: int, where: str) -> np.ndarray:
    """Raw bytes -> (tokens_per_sample,) array; raises CorpusError naming `where` on a bad size."""
    expected = tokens_per_sample * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise CorpusError(f"{where}: token record has {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=dtype)


def decode_doc_starts(raw: bytes, where: str) -> np.ndarray:
    if len(raw) % 4:
        raise CorpusError(f"{where}: docstarts record has {len(raw)} bytes, not a multiple of 4")
    return np.frombuffer(raw, dtype="<u4")


@dataclass
class ShardInfo:
    path: str
    """File name relative to the corpus directory."""
    samples: int
    tokens: int
    sha256: str


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass
class TokenizerInfo:
    fingerprint: str
    """sha256 of the SentencePiece model file."""
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int


@dataclass
class CorpusManifest:
    seq_len: int
    """Tokens a model sees per sample; each stored sample holds seq_len + 1."""
    dtype: str
    """numpy dtype string of stored token ids: '<u2' or '<u4'."""
    tokenizer: TokenizerInfo
    splits: dict[str, SplitInfo]
    valid_fraction: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    """Free-form counts from preprocessing (documents, bad records per file, dropped tail tokens)."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len + 1

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        for name, split in self.splits.items():
            d["splits"][name]["samples"] = split.samples
            d["splits"][name]["tokens"] = split.tokens
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> CorpusManifest:
        try:
            if d.get("format") != FORMAT_NAME:
                raise CorpusError(
                    f"{where}: not a zenlm corpus manifest (format={d.get('format')!r})"
                )
            if d.get("format_version") != FORMAT_VERSION:
                raise CorpusError(
                    f"{where}: format_version {d.get('format_version')} unsupported "
                    f"(this zenlm reads {FORMAT_VERSION})"
                )
            splits = {
                name: SplitInfo(shards=[ShardInfo(**s) for s in sd["shards"]])
                for name, sd in d["splits"].items()
            }
            return cls(
                seq_len=int(d["seq_len"]),
                dtype=str(d["dtype"]),
                tokenizer=TokenizerInfo(**d["tokenizer"]),
                splits=splits,
                valid_fraction=float(d.get("valid_fraction", 0.0)),
                stats=dict(d.get("stats", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorpusError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def load_manifest(corpus_dir: str | os.PathLike) -> CorpusManifest:
    path = Path(corpus_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CorpusError(f"{path}: no manifest (corpus missing or preprocessing unfinished)")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: unreadable manifest: {e}") from e
    return CorpusManifest.from_dict(d, where=str(path))


def write_manifest(corpus_dir: str | os.PathLike, manifest: CorpusManifest) -> Path:
    """Atomic write: temp file, fsync, rename."""
    path = Path(corpus_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def check_tokenizer(manifest: CorpusManifest, expected_fingerprint: str | None, where: str) -> None:
    """Refuse a corpus built with another tokenizer, naming both fingerprints."""
    if expected_fingerprint and manifest.tokenizer.fingerprint != expected_fingerprint:
        raise CorpusError(
            f"{where}: corpus was built with tokenizer {manifest.tokenizer.fingerprint[:16]}… "
            f"but this run uses tokenizer {expected_fingerprint[:16]}…; re-run tools/preprocess.py "
            "with the run's tokenizer"
        )
