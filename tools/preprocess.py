"""Tokenize text / JSONL / .gz inputs into a packed, sharded webdataset corpus with a manifest.

    python tools/preprocess.py data/*.jsonl.gz --tokenizer tokenizer.model --out corpus/ \
        --seq-len 4096 --valid-fraction 0.001
    python tools/preprocess.py data/*.jsonl --tokenizer models/Qwen2-7B/ --out corpus/ --seq-len 4096

--tokenizer is zenlm's SentencePiece .model file or a Hugging Face tokenizer directory
(tokenizer.json, or a SentencePiece tokenizer.model, with tokenizer_config.json naming eos_token).

Every flag, input file and the tokenizer are checked before any tokenizing; --out must be new,
empty, or this same corpus (same inputs and settings: complete shards are then skipped). A run
that fails leaves nothing behind. Bad input is one `error: ...` line and exit code 2. See
docs/data.md and docs/errors.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from zenlm.data.readers import BadInputError, ToolArgumentParser, add_input_arguments
from zenlm.data.writer import DEFAULT_VALID_FRACTION, preprocess_corpus
from zenlm.runtime.cli import run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ToolArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_arguments(p)
    p.add_argument(
        "--tokenizer",
        required=True,
        help="SentencePiece .model file, or a Hugging Face tokenizer directory (tokenizer.json "
        "or tokenizer.model, plus tokenizer_config.json / special_tokens_map.json)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="corpus directory: new, empty, or one this command made (rerun skips its shards)",
    )
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sample seen by the model")
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (MiB)")
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULT_VALID_FRACTION,
        help="fraction of documents (by hash) that go to the valid split (default "
        f"{DEFAULT_VALID_FRACTION}; the split must get at least one sample; 0: no valid split, "
        "for training with validation off)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="encoder threads (default: all cores); with a tokenizer.json also the size of "
        "tokenizers' own thread pool (RAYON_NUM_THREADS, unless set)",
    )
    p.add_argument("--add-bos", action="store_true", help="put BOS before each document")
    p.add_argument(
        "--dtype",
        choices=("uint16", "uint32"),
        default=None,
        help="token dtype (default: uint16 when the vocabulary fits)",
    )
    return p.parse_args(argv)


def _main(a: argparse.Namespace) -> int:
    if not (math.isfinite(a.shard_size_mb) and a.shard_size_mb > 0):
        raise BadInputError(f"--shard-size-mb must be > 0, got {a.shard_size_mb}")
    if a.workers is not None and a.workers >= 1:
        # tokenizers (tokenizer.json) encodes on a Rust pool sized once, at its first use, and
        # shared by the encoder threads: sized to --workers, N workers never run more threads.
        os.environ.setdefault("RAYON_NUM_THREADS", str(a.workers))
    r = preprocess_corpus(
        a.inputs,
        a.out,
        a.tokenizer,
        a.seq_len,
        math.ceil(a.shard_size_mb * 2**20),
        valid_fraction=a.valid_fraction,
        text_field=a.text_field,
        text_mode=a.text_mode,
        num_workers=a.workers,
        add_bos=a.add_bos,
        dtype=a.dtype,
        max_bad_fraction=a.max_bad_fraction,
        progress=not a.no_progress,
    )
    m = r.manifest
    for name, split in m.splits.items():
        print(f"{name}: {len(split.shards)} shards, {split.samples} samples, {split.tokens} tokens")
    print(f"shards written {r.shards_written}, skipped (already complete) {r.shards_skipped}")
    for path, bad in r.bad_records.items():
        print(f"bad records in {path}: " + ", ".join(f"{k}={v}" for k, v in bad.items() if v))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run_tool(lambda: _main(a))


if __name__ == "__main__":
    sys.exit(main())
