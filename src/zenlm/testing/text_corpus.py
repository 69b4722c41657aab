"""A real corpus for tests, made the way a user makes one: text -> tools/train_tokenizer.py ->
tools/preprocess.py, both run as command-line programs.

    corpus = build_text_corpus(tmp_path / "data")   # TextCorpus(tokenizer, corpus, vocab_size)
    overrides = corpus.overrides()                   # data.corpora, tokenizer_path, vocab, seq_len

The text is generated, not shipped: documents of "sentences" drawn from a small first-order
Markov chain over a made-up word list, so a tiny model's loss falls visibly within 10 steps while
the token stream still has document boundaries, varied lengths and a valid split.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
TOOLS = ROOT / "tools"

VOCAB_SIZE = 384
"""Tokenizer vocabulary: a multiple of 128 (the tool rounds to it) but not of 128 x TP for
TP >= 2, so tensor-parallel runs exercise the padded-vocabulary path."""
SEQ_LEN = 32


@dataclass(frozen=True)
class TextCorpus:
    tokenizer: Path
    corpus: Path
    vocab_size: int
    seq_len: int

    def overrides(self) -> list[str]:
        """Config overrides that point a run at this corpus and tokenizer."""
        return [
            f"data.corpora=[{{path: {self.corpus}, weight: 1.0}}]",
            f"data.tokenizer_path={self.tokenizer}",
            f"data.seq_len_tokens={self.seq_len}",
            f"model.vocab_size={self.vocab_size}",
        ]


def write_text(path: Path, num_docs: int, seed: int = 0) -> Path:
    """JSONL with a "text" field: num_docs documents of 1-4 sentences (about 40 tokens each, so
    most 32-token samples hold a document boundary)."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "do"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(400)})
    n = len(words)
    # Each word has 3 likely successors: a learnable structure with some entropy.
    successors = rng.integers(0, n, size=(n, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            sentences = []
            for _ in range(int(rng.integers(1, 5))):
                w = int(rng.integers(0, n))
                out = [words[w]]
                for _ in range(int(rng.integers(3, 12))):
                    w = int(successors[w, rng.integers(0, 3)])
                    out.append(words[w])
                sentences.append(" ".join(out).capitalize() + ".")
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def _run_tool(script: str, args: list[str]) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(TOOLS / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def build_text_corpus(
    out_dir: str | os.PathLike,
    num_docs: int = 4000,
    seq_len: int = SEQ_LEN,
    vocab_size: int = VOCAB_SIZE,
    shard_size_mb: float = 0.25,
    valid_fraction: float = 0.05,
    seed: int = 0,
) -> TextCorpus:
    """Text -> tokenizer -> sharded corpus through the real CLIs; reuses outputs that exist."""
    out = Path(out_dir)
    text = out / "text.jsonl"
    tokenizer = out / "tokenizer.model"
    corpus = out / "corpus"
    if not text.exists():
        write_text(text, num_docs, seed)
    if not tokenizer.exists():
        _run_tool(
            "train_tokenizer.py",
            [
                *(str(text), "--text-field", "text", "--vocab-size", str(vocab_size)),
                *("--out", str(tokenizer), "--threads", "1", "--no-progress"),
            ],
        )
    _run_tool(
        "preprocess.py",
        [
            *(
                str(text),
                "--text-field",
                "text",
                "--tokenizer",
                str(tokenizer),
                "--out",
                str(corpus),
            ),
            *("--seq-len", str(seq_len), "--shard-size-mb", str(shard_size_mb)),
            *("--valid-fraction", str(valid_fraction), "--workers", "1", "--no-progress"),
        ],
    )
    return TextCorpus(tokenizer, corpus, vocab_size, seq_len)


def write_sft(path: Path, num_examples: int, seed: int = 0) -> Path:
    """JSONL of {"prompt", "completion"} pairs over write_text's word list: the prompt asks to
    repeat 1-4 words in reverse, the completion does it (learnable from the prompt alone, and
    prompts and completions differ in length, so micro batches count different token numbers)."""
    same = np.random.default_rng(0)  # write_text(seed=0)'s word list: the tokenizer knows it
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "do"]
    words = sorted({"".join(same.choice(syllables, size=same.integers(1, 4))) for _ in range(400)})
    rng = np.random.default_rng(seed + 100)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_examples):
            chosen = [words[int(i)] for i in rng.integers(0, len(words), int(rng.integers(1, 5)))]
            prompt = f"Reverse: {' '.join(chosen)}\nAnswer:"
            completion = " " + " ".join(reversed(chosen)) + "."
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


@dataclass(frozen=True)
class SFTCorpus:
    tokenizer: Path
    corpus: Path
    vocab_size: int
    seq_len: int

    def overrides(self) -> list[str]:
        """The data keys of a fine-tuning run on this corpus (loss only on completions)."""
        return [
            f"data.corpora=[{{path: {self.corpus}, weight: 1.0}}]",
            f"data.tokenizer_path={self.tokenizer}",
            f"data.seq_len_tokens={self.seq_len}",
            f"model.vocab_size={self.vocab_size}",
            "model.document_masking=true",
        ]


def build_sft_corpus(
    out_dir: str | os.PathLike,
    text: TextCorpus,
    num_examples: int = 1200,
    valid_fraction: float = 0.1,
) -> SFTCorpus:
    """Prompt/completion pairs -> tools/preprocess_sft.py (the CLI) with `text`'s tokenizer."""
    out = Path(out_dir)
    jsonl = out / "sft.jsonl"
    if not jsonl.exists():
        write_sft(jsonl, num_examples)
    corpus = out / "corpus"
    _run_tool(
        "preprocess_sft.py",
        [
            *(str(jsonl), "--tokenizer", str(text.tokenizer), "--out", str(corpus)),
            *("--seq-len", str(text.seq_len), "--valid-fraction", str(valid_fraction)),
            *("--shard-size-mb", "0.05", "--no-progress"),
        ],
    )
    return SFTCorpus(text.tokenizer, corpus, text.vocab_size, text.seq_len)
