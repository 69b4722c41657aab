"""Train a SentencePiece tokenizer (BPE or unigram) on text / JSONL / .gz files.

    python tools/train_tokenizer.py data/*.jsonl.gz --out tokenizer.model --vocab-size 32000

The vocabulary size is rounded up to a multiple of 128; the printed fingerprint (sha256 of the
model file) is what every corpus manifest and checkpoint records. Every flag, input and the
--out place are checked before any text is read; --out must not exist yet (a tokenizer is never
overwritten). Bad input is one `error: ...` line and exit code 2. See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys

from zenlm.data.readers import ToolArgumentParser, add_input_arguments
from zenlm.data.tokenizer import round_vocab_size, train_tokenizer
from zenlm.runtime.cli import run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ToolArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_arguments(p)
    p.add_argument("--out", required=True, help="path of the .model file to write (must be new)")
    p.add_argument(
        "--vocab-size", type=int, required=True, help="rounded up to a multiple of 128 (>= 384)"
    )
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument(
        "--max-sentences",
        type=int,
        default=0,
        help="sample this many training sentences (0: use all)",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--threads", type=int, default=None, help="trainer threads (default: all cores)")
    return p.parse_args(argv)


def _main(a: argparse.Namespace) -> int:
    tok = train_tokenizer(
        a.inputs,
        a.out,
        a.vocab_size,
        model_type=a.model_type,
        text_field=a.text_field,
        text_mode=a.text_mode,
        max_sentences=a.max_sentences,
        max_bad_fraction=a.max_bad_fraction,
        character_coverage=a.character_coverage,
        num_threads=a.threads,
        progress=not a.no_progress,
    )
    if round_vocab_size(a.vocab_size) != a.vocab_size:
        print(f"vocab size {a.vocab_size} rounded up to {tok.vocab_size}", file=sys.stderr)
    print(
        f"wrote {tok.path}: {a.model_type}, vocab_size={tok.vocab_size}, bos={tok.bos_id} "
        f"eos={tok.eos_id} pad={tok.pad_id}\nfingerprint {tok.fingerprint}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run_tool(lambda: _main(a))


if __name__ == "__main__":
    sys.exit(main())
