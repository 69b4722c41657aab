"""SentencePiece tokenizer: training, loading, and the fingerprint every corpus and checkpoint records.

Training options are chosen so that ``decode(encode(text)) == text`` for any text without
U+2581 ("▁"): no normalization (``identity``), no whitespace collapsing, no dummy prefix, and
byte fallback so that characters never seen in training (emoji, CJK, control characters) become
``<0xNN>`` byte pieces instead of ``<unk>``. The one exception is U+2581 itself, SentencePiece's
whitespace meta symbol: it decodes as a space. BPE refuses ``escape_whitespaces=False``, the only
option that would change this, so it is documented (docs/data.md) rather than worked around.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from zenlm.data.format import TokenizerInfo, sha256_file
from zenlm.data.readers import DocumentReader

VOCAB_MULTIPLE = 128
"""Vocabulary sizes are rounded up to this so embedding and LM-head shards stay aligned under TP."""

# Fixed special ids (Llama convention for unk/bos/eos; pad gets the next id).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# SentencePiece skips training sentences longer than this many bytes; we chunk documents to fit.
MAX_SENTENCE_BYTES = 16384
_MAX_SENTENCE_CHARS = MAX_SENTENCE_BYTES // 4  # a UTF-8 character is at most 4 bytes


def round_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Smallest multiple of `multiple` that is >= vocab_size."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return -(-vocab_size // multiple) * multiple


def fingerprint_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (the tokenizer fingerprint when given a .model file)."""
    return sha256_file(path)


def training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Documents cut at line ends into pieces SentencePiece accepts (<= MAX_SENTENCE_BYTES).

    Newlines stay inside the pieces, so the trainer learns pieces such as "):\\n".
    """
    for doc in documents:
        buf: list[str] = []
        size = 0
        for line in doc.splitlines(keepends=True):
            while len(line) > _MAX_SENTENCE_CHARS:  # one very long line: hard cut
                if buf:
                    yield "".join(buf)
                    buf, size = [], 0
                yield line[:_MAX_SENTENCE_CHARS]
                line = line[_MAX_SENTENCE_CHARS:]
            if size + len(line) > _MAX_SENTENCE_CHARS and buf:
                yield "".join(buf)
                buf, size = [], 0
            buf.append(line)
            size += len(line)
        if buf:
            yield "".join(buf)


def train_tokenizer(
    inputs: Sequence[str | os.PathLike],
    model_path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    text_field: str = "text",
    text_mode: str = "file",
    max_sentences: int = 0,
    max_bad_fraction: float = 0.01,
    character_coverage: float = 0.9995,
    num_threads: int | None = None,
    progress: bool = True,
) -> Tokenizer:
    """Train a SentencePiece model on text/JSONL/.gz inputs and write it atomically to model_path.

    vocab_size is rounded up to a multiple of 128. max_sentences > 0 samples that many training
    sentences (SentencePiece's input_sentence_size) instead of using all of them.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    rounded = round_vocab_size(vocab_size)
    reader = DocumentReader(text_field, text_mode, max_bad_fraction)
    docs = reader.iter_documents(inputs)
    if progress:
        docs = tqdm(docs, desc="reading", unit="doc")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(docs),
            model_writer=model,
            model_type=model_type,
            vocab_size=rounded,
            # Lossless round trip: see the module docstring.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) as one piece
            split_digits=True,  # numbers as digits: no arbitrary multi-digit pieces
            character_coverage=character_coverage,
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if "Vocabulary size" in str(e):
            raise ValueError(
                f"too little training text for vocab_size {rounded} (asked {vocab_size}, rounded "
                f"to a multiple of {VOCAB_MULTIPLE}): {e}"
            ) from e
        raise
    path = Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return load_tokenizer(path)


@dataclass(frozen=True)
class Tokenizer:
    """A loaded SentencePiece model plus its fingerprint. Cheap to load; load once per process."""

    path: str
    sp: spm.SentencePieceProcessor
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            fingerprint=self.fingerprint,
            vocab_size=self.vocab_size,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
        )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no tokenizer model (train one with tools/train_tokenizer.py)"
        )
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return Tokenizer(path=str(path), sp=sp, fingerprint=fingerprint_file(path))
