"""SentencePiece tokenizer: training, loading, and the fingerprint every corpus and checkpoint records.

`load_tokenizer` and `fingerprint_file` take zenlm's own SentencePiece `.model` file or a Hugging
Face tokenizer directory (tokenizer.json or tokenizer.model plus its configs; hf_tokenizer.py).

Training options are chosen so that ``decode(encode(text)) == text`` for any text without
U+2581 ("▁"): no normalization (``identity``), no whitespace collapsing, no dummy prefix, and
byte fallback so that characters never seen in training (emoji, CJK, control characters) become
``<0xNN>`` byte pieces instead of ``<unk>``. The one exception is U+2581 itself, SentencePiece's
whitespace meta symbol: it decodes as a space. BPE refuses ``escape_whitespaces=False``, the only
option that would change this, so it is documented (docs/data.md) rather than worked around.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm
from tqdm import tqdm

from zenlm.data.format import TokenizerInfo, sha256_file
from zenlm.data.readers import BadInputError, DocumentReader, check_inputs
from zenlm.errors import ZenlmError

if TYPE_CHECKING:
    from zenlm.data.hf_tokenizer import HFTokenizer

VOCAB_MULTIPLE = 128
"""Vocabulary sizes are rounded up to this so embedding and LM-head shards stay aligned under TP."""

# Fixed special ids (Llama convention for unk/bos/eos; pad gets the next id).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MIN_VOCAB_SIZE = 4 + 256
"""Pieces byte fallback needs before any learned one: 4 special ids and the 256 byte pieces."""
# SentencePiece skips training sentences longer than this many bytes; we chunk documents to fit.
MAX_SENTENCE_BYTES = 16384
_MAX_SENTENCE_CHARS = MAX_SENTENCE_BYTES // 4  # a UTF-8 character is at most 4 bytes


class TokenizerError(ZenlmError, ValueError):
    """A tokenizer file or directory that is missing or not a usable tokenizer, or training that
    cannot produce the asked vocabulary; the message names the file and the fix."""


def round_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Smallest multiple of `multiple` that is >= vocab_size."""
    if vocab_size <= 0:
        raise BadInputError(f"--vocab-size must be positive, got {vocab_size}")
    return -(-vocab_size // multiple) * multiple


def fingerprint_file(path: str | os.PathLike) -> str:
    """The tokenizer fingerprint every corpus and checkpoint records.

    A SentencePiece .model file: the sha256 hex digest of the file. A Hugging Face tokenizer
    directory: hf_tokenizer.hf_fingerprint (sha256 of a canonical form of what changes
    tokenization; docs/data.md). A path that is neither raises TokenizerError naming it."""
    if Path(path).is_dir():
        from zenlm.data.hf_tokenizer import hf_fingerprint

        return hf_fingerprint(path)
    _check_model_file(path)
    try:
        return sha256_file(path)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer model ({e.strerror})") from e


def _check_model_file(path: str | os.PathLike) -> None:
    p = Path(path)
    if not p.exists():
        raise TokenizerError(
            f"{path}: no tokenizer model there (train one with tools/train_tokenizer.py, or give "
            "a Hugging Face tokenizer directory)"
        )
    if not p.is_file():
        raise TokenizerError(
            f"{path}: is not a file or directory, not a tokenizer; give a SentencePiece .model "
            "file or a Hugging Face tokenizer directory"
        )
    if p.stat().st_size == 0:
        raise TokenizerError(
            f"{path}: empty file, not a SentencePiece model (an interrupted write?); retrain it "
            "with tools/train_tokenizer.py"
        )
    if p.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        raise TokenizerError(
            f"{path}: not a SentencePiece model but a Hugging Face tokenizer file; give the "
            f"directory that holds it ({p.parent})"
        )


def check_output_path(path: str | os.PathLike, what: str = "--out") -> list[Path]:
    """Refuse a place a new file cannot be written to, before any work; returns the missing
    parent directories (outermost first), which the caller creates and removes on failure."""
    p = Path(path)
    if p.is_dir():
        raise BadInputError(
            f"{what} {path}: is a directory; give the path of the file to write "
            f"(e.g. {p / 'tokenizer.model'})"
        )
    if p.exists() or p.is_symlink():
        raise BadInputError(
            f"{what} {path}: already exists (corpora and checkpoints record a tokenizer's "
            "fingerprint, so it is never overwritten); pick another path or delete it yourself"
        )
    missing: list[Path] = []
    parent = p.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise BadInputError(f"{what} {path}: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise BadInputError(f"{what} {path}: cannot write in {parent} ({e.strerror})") from e
    return missing[::-1]


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

    Every argument, every input file and the output place are checked before reading any text
    (BadInputError naming the flag or file); model_path must not exist yet. On any failure
    nothing is left behind (no temp file, no directory this call created).
    """
    if model_type not in ("bpe", "unigram"):
        raise BadInputError(f"--model-type must be 'bpe' or 'unigram', got {model_type!r}")
    rounded = round_vocab_size(vocab_size)
    if rounded < MIN_VOCAB_SIZE:
        raise BadInputError(
            f"--vocab-size {vocab_size} (rounded to {rounded}) is too small: byte fallback alone "
            f"needs {MIN_VOCAB_SIZE} pieces (4 special ids + 256 bytes); use at least "
            f"{round_vocab_size(MIN_VOCAB_SIZE + 1)}"
        )
    if max_sentences < 0:
        raise BadInputError(f"--max-sentences must be >= 0 (0: all), got {max_sentences}")
    if not (math.isfinite(character_coverage) and 0.0 < character_coverage <= 1.0):
        raise BadInputError(f"--character-coverage must be in (0, 1], got {character_coverage}")
    if num_threads is not None and num_threads < 1:
        raise BadInputError(f"--threads must be >= 1, got {num_threads}")
    reader = DocumentReader(text_field, text_mode, max_bad_fraction)
    check_inputs(inputs)
    new_dirs = check_output_path(model_path)
    docs = reader.iter_documents(inputs)
    if progress:
        docs = tqdm(docs, desc="reading", unit="doc")
    failed: list[BaseException] = []  # what the sentence iterator raised, re-raised below

    def sentences() -> Iterator[str]:
        # SentencePiece turns an exception inside the iterator into a RuntimeError holding its
        # text; keep the original (a BadInputError naming the file) and stop the iteration.
        try:
            yield from training_sentences(docs)
        except Exception as e:
            failed.append(e)

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
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
        if failed:
            raise failed[0] from None
        names = _inputs_named(inputs)
        if "Vocabulary size too high" in str(e) or "Vocabulary size is smaller" in str(e):
            raise TokenizerError(
                f"too little training text for vocab_size {rounded} (asked {vocab_size}, rounded "
                f"to a multiple of {VOCAB_MULTIPLE}) in {names}: {_spm_reason(e)}; give more "
                "text or a smaller --vocab-size"
            ) from e
        if "sentences_.empty()" in str(e):
            raise TokenizerError(
                f"no training text in {names} (every document empty or skipped as bad); check "
                "--text-field / --text-mode"
            ) from e
        raise
    if failed:
        raise failed[0]
    path = Path(model_path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        for d in new_dirs:
            d.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(model.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for d in reversed(new_dirs):
            with contextlib.suppress(OSError):  # not empty: someone else's files, keep them
                d.rmdir()
        raise
    return load_tokenizer(path)


def _inputs_named(inputs: Sequence[str | os.PathLike]) -> str:
    names = [str(p) for p in inputs]
    return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more inputs"


def _spm_reason(e: RuntimeError) -> str:
    """SentencePiece's message without its source location prefix."""
    text = str(e).strip().splitlines()[0]
    return text.rsplit("] ", 1)[-1].rstrip(".")


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


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """Load a SentencePiece .model file (-> Tokenizer) or a Hugging Face tokenizer directory
    (-> hf_tokenizer.HFTokenizer, same interface). TokenizerError names the file or directory
    when it is missing, empty, not a tokenizer, or lacks the EOS the corpus writer appends to
    every document."""
    if Path(path).is_dir():
        from zenlm.data.hf_tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(path)
    _check_model_file(path)
    path = Path(path)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(
            f"{path}: not a SentencePiece model ({_spm_reason(e)}); give the .model file "
            "tools/train_tokenizer.py wrote, or a Hugging Face tokenizer directory"
        ) from e
    if sp.eos_id() < 0:
        raise TokenizerError(
            f"{path}: SentencePiece model without an EOS piece (eos_id -1); train one with "
            "tools/train_tokenizer.py"
        )
    return Tokenizer(path=str(path), sp=sp, fingerprint=fingerprint_file(path))
