"""Hugging Face <-> zenlm: import a transformers model to fine-tune it, export one to hand back.

    python tools/convert.py import HF_DIR OUT_CKPT [--allow-pickle] [--ignore-config-key KEY]
    python tools/convert.py export CKPT OUT_DIR [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]
                                                [--tokenizer HF_TOKENIZER_DIR]

import: config.json (llama, mistral, qwen2) + safetensors (model.safetensors or shards with
model.safetensors.index.json; pytorch_model.bin only with --allow-pickle) -> a weights-only
zenlm checkpoint (fp32, canonical names) that checkpoint.init_from loads at any layout. Every
config field is mapped or refused by name; every tensor name and shape is checked first.
export: any zenlm checkpoint (a training step_N dir at any layout, or an import) -> config.json,
generation_config.json, safetensors, and the tokenizer files of the source model when known.
Both write into a temp dir renamed at the end, and refuse an existing non-empty output.
Bad input is one `error: ...` line and exit code 2. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from zenlm.checkpoint.io import CheckpointError
from zenlm.runtime.cli import run_tool

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?)?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '200MiB' -> 200 * 2**20, '1000' -> 1000 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise CheckpointError(f"--max-shard-size {text!r}: give a size such as 5GB or 500MB")
    return max(1, int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def do_import(args: argparse.Namespace) -> int:
    from zenlm.checkpoint.hf import import_hf, tqdm_progress

    r = import_hf(
        args.hf_dir,
        args.out_ckpt,
        allow_pickle=args.allow_pickle,
        ignore_config_keys=args.ignore_config_key,
        progress=tqdm_progress,
    )
    size = sum(f.bytes for f in r.files.values())
    print(
        f"imported {r.model_type} {r.model.name!r} ({r.model.num_layers} layers, "
        f"{r.parameter_count:,} parameters) into {r.path}: {len(r.files)} files, {_mib(size)}, "
        f"{r.seconds:.1f} s"
    )
    for name, why in r.dropped.items():
        print(f"  dropped {name}: {why}")
    print(f"fine-tune it with checkpoint.init_from={r.path}")
    return 0


def do_export(args: argparse.Namespace) -> int:
    from zenlm.checkpoint.hf import export_hf, tqdm_progress

    r = export_hf(
        args.ckpt,
        args.out_dir,
        args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        tokenizer_dir=args.tokenizer,
        progress=tqdm_progress,
    )
    tok = ", ".join(r.tokenizer_files) if r.tokenizer_files else "none (no tokenizer dir known)"
    print(
        f"exported {r.model_type} ({args.dtype}) to {r.path}: {len(r.files)} safetensors "
        f"files; tokenizer files: {tok}; {r.seconds:.1f} s"
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face model dir -> weights-only zenlm checkpoint")
    imp.add_argument("hf_dir", type=Path, help="directory with config.json and safetensors")
    imp.add_argument("out_ckpt", type=Path, help="new checkpoint directory (must not exist)")
    imp.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pytorch_model.bin (loaded with torch.load(weights_only=True))",
    )
    imp.add_argument(
        "--ignore-config-key",
        action="append",
        default=[],
        metavar="KEY",
        help="let an unknown config.json field through (you vouch it changes nothing)",
    )
    imp.set_defaults(run=do_import)
    exp = sub.add_parser("export", help="zenlm checkpoint -> Hugging Face model dir")
    exp.add_argument("ckpt", type=Path, help="a checkpoint directory (holding meta.json)")
    exp.add_argument("out_dir", type=Path, help="new model directory (must not exist)")
    exp.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    exp.add_argument("--max-shard-size", default="5GB", help="per safetensors file (default 5GB)")
    exp.add_argument(
        "--tokenizer",
        type=Path,
        help="copy tokenizer files from this dir (default: the imported model's dir, if known)",
    )
    exp.set_defaults(run=do_export)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
