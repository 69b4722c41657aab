"""Tokenize fine-tuning data (prompt/completion or chat JSONL) into a packed corpus whose samples
carry a per-token loss mask (format_version 2), for supervised fine-tuning.

    python tools/preprocess_sft.py data/sft.jsonl --tokenizer tok_dir/ --out corpus/sft \
        --seq-len 4096 --valid-fraction 0.01

Records: {"prompt": ..., "completion": ...}, or {"messages": [{"role": "system"|"user"|
"assistant", "content": ...}, ...]} rendered with the tokenizer's chat template (a Hugging Face
tokenizer directory). Only completion / assistant tokens are trained. Examples are packed whole,
never split; a longer one is dropped and counted (--on-long drop) or refused (--on-long error).
Every flag, input and the tokenizer are checked before any work; --out must be new, empty or
this same corpus. A run that fails leaves nothing behind. Bad input is one `error: ...` line and
exit code 2. See docs/finetune.md.
"""

from __future__ import annotations

import argparse
import math
import sys

from zenlm.data.readers import BadInputError, ToolArgumentParser
from zenlm.data.sft import DEFAULT_PACK_WINDOW, FORMATS, ON_LONG, preprocess_sft
from zenlm.data.writer import DEFAULT_VALID_FRACTION
from zenlm.runtime.cli import run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ToolArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", help=".jsonl/.json/.ndjson files, optionally .gz")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="Hugging Face tokenizer directory (tokenizer.json; its chat template for chat "
        "records) or SentencePiece .model file (prompt/completion only)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="corpus directory: new, empty, or one this command made (rerun skips its shards)",
    )
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sample seen by the model")
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULT_VALID_FRACTION,
        help="fraction of examples (by hash) that go to the valid split (default "
        f"{DEFAULT_VALID_FRACTION}; the split must get at least one example; 0: no valid split)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="record format (auto: chat when a record has 'messages', else prompt/completion)",
    )
    p.add_argument("--add-bos", action="store_true", help="put BOS before each example")
    p.add_argument(
        "--on-long",
        choices=ON_LONG,
        default="drop",
        help="an example longer than seq_len + 1 tokens: drop and count it, or stop with an error",
    )
    p.add_argument(
        "--pack-window",
        type=int,
        default=DEFAULT_PACK_WINDOW,
        help="open samples examples are packed into first-fit (1: next-fit, input order)",
    )
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size (MiB)")
    p.add_argument(
        "--dtype",
        choices=("uint16", "uint32"),
        default=None,
        help="token dtype (default: uint16 when the vocabulary fits)",
    )
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="fail when more than this fraction of a file's records are bad",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _main(a: argparse.Namespace) -> int:
    if not (math.isfinite(a.shard_size_mb) and a.shard_size_mb > 0):
        raise BadInputError(f"--shard-size-mb must be > 0, got {a.shard_size_mb}")
    r = preprocess_sft(
        a.inputs,
        a.out,
        a.tokenizer,
        a.seq_len,
        math.ceil(a.shard_size_mb * 2**20),
        valid_fraction=a.valid_fraction,
        format=a.format,
        add_bos=a.add_bos,
        on_long=a.on_long,
        pack_window=a.pack_window,
        dtype=a.dtype,
        max_bad_fraction=a.max_bad_fraction,
        progress=not a.no_progress,
    )
    m, st = r.manifest, r.manifest.stats
    for name, split in m.splits.items():
        n_tok = split.tokens
        fill = st["example_tokens"][name] / n_tok if n_tok else 0.0
        print(
            f"{name}: {len(split.shards)} shards, {split.samples} samples, "
            f"{st['examples'][name]} examples, {st['trainable_tokens'][name]} trainable of "
            f"{n_tok} tokens ({fill:.1%} filled, the rest padding)"
        )
    d = st["dropped"]
    print(f"dropped: {d['long']} longer than seq_len + 1, {d['empty']} with nothing to train on")
    print(f"shards written {r.shards_written}, skipped (already complete) {r.shards_skipped}")
    for f in r.stats:
        if f.bad_total:
            bad = ", ".join(f"{k}={v}" for k, v in f.bad.items() if v)
            print(f"bad records in {f.path}: {bad}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run_tool(lambda: _main(a))


if __name__ == "__main__":
    sys.exit(main())
