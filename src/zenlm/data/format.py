"""The on-disk corpus format shared by the writer (tools/preprocess.py) and the loader.

A corpus is a directory:

    corpus/
      manifest.json            # CorpusManifest, written last (its presence means "complete")
      train-000000.tar ...     # webdataset tar shards of the train split
      valid-000000.tar ...     # shards of the validation split

Each tar member group (one sample) has the key ``"%010d" % sample_index_in_split`` and two or
three members, all raw little-endian arrays (never pickled, never numpy .npy):

    <key>.tokens     tokens_per_sample = seq_len + 1 token ids, dtype from the manifest
                     (uint16 when the vocabulary fits in 16 bits, else uint32)
    <key>.docstarts  uint32 positions in [1, seq_len] where a new document begins inside the
                     sequence (position 0 always starts a segment and is not listed); possibly empty
    <key>.lossmask   only in corpora whose manifest has ``loss_mask: true`` (format_version 2),
                     and then in every sample: tokens_per_sample uint8 values, 1 where predicting
                     that token counts in the loss (a completion / assistant token), 0 where it
                     does not (prompt, user and system turns, template tokens, padding)

The extra (+1) token lets a sample give inputs = tokens[:-1] and labels = tokens[1:]; with a
loss mask, labels[t] = -100 (ignored) wherever lossmask[t + 1] == 0.

Versions: a corpus without a loss mask is written as format_version 1, exactly as before the mask
existed, so any zenlm reads it; a corpus with one is version 2, which a reader that predates the
mask refuses by its version check instead of training on prompts and padding. This reader
accepts both (READABLE_VERSIONS).
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
FORMAT_VERSION = 2
"""The newest version this code reads and writes: 2 = optional per-token loss mask."""
READABLE_VERSIONS = (1, 2)
LOSS_MASK_VERSION = 2
"""The first version that may carry a loss mask; a corpus without one is still written as 1."""
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "valid")
TOKENS_EXT = "tokens"
DOCSTARTS_EXT = "docstarts"
LOSSMASK_EXT = "lossmask"


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
    key: str,
    tokens: np.ndarray,
    doc_starts: np.ndarray,
    dtype: np.dtype,
    loss_mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """The dict that webdataset's TarWriter writes for one sample (bytes values only); the
    `loss_mask` member (uint8, one per token) only when given."""
    sample = {
        "__key__": key,
        TOKENS_EXT: np.ascontiguousarray(tokens, dtype=dtype).tobytes(),
        DOCSTARTS_EXT: np.ascontiguousarray(doc_starts, dtype="<u4").tobytes(),
    }
    if loss_mask is not None:
        if len(loss_mask) != len(tokens):
            raise ValueError(f"loss mask has {len(loss_mask)} entries for {len(tokens)} tokens")
        sample[LOSSMASK_EXT] = np.ascontiguousarray(loss_mask, dtype=np.uint8).tobytes()
    return sample


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
    loss_mask: bool = False
    """Every sample has a `<key>.lossmask` member (format_version 2)."""
    format: str = FORMAT_NAME
    format_version: int = 0
    """0 (the default) = the version the content needs: 2 with a loss mask, else 1."""

    def __post_init__(self) -> None:
        if not self.format_version:
            self.format_version = LOSS_MASK_VERSION if self.loss_mask else 1

    @property
    def tokens_per_sample(self) -> int:
        return self.seq_len + 1

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        for name, split in self.splits.items():
            d["splits"][name]["samples"] = split.samples
            d["splits"][name]["tokens"] = split.tokens
        if not self.loss_mask:
            del d["loss_mask"]  # a version-1 manifest stays exactly as before the mask existed
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> CorpusManifest:
        try:
            if d.get("format") != FORMAT_NAME:
                raise CorpusError(
                    f"{where}: not a zenlm corpus manifest (format={d.get('format')!r})"
                )
            version = d.get("format_version")
            if type(version) is not int or version not in READABLE_VERSIONS:
                raise CorpusError(
                    f"{where}: format_version {version!r} unsupported (this zenlm reads "
                    f"{', '.join(map(str, READABLE_VERSIONS))}); a newer zenlm wrote it: upgrade"
                )
            loss_mask = d.get("loss_mask", False)
            if not isinstance(loss_mask, bool):
                raise CorpusError(f"{where}: loss_mask must be true or false, got {loss_mask!r}")
            if loss_mask and version < LOSS_MASK_VERSION:
                raise CorpusError(
                    f"{where}: loss_mask is true but format_version is {version} (a loss mask "
                    f"needs {LOSS_MASK_VERSION}; manifest edited?)"
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
                loss_mask=loss_mask,
                format_version=version,
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
