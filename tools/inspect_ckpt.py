"""Show what a zenlm checkpoint holds, and how its config differs from another run's.

    python tools/inspect_ckpt.py runs/demo/checkpoints/step_00000500
    python tools/inspect_ckpt.py runs/demo/checkpoints            # the newest complete one
    python tools/inspect_ckpt.py CKPT --against OTHER_CKPT_OR_CONFIG.yaml [--verify]

Reads only meta.json, trainer.json and config.yaml (JSON and YAML: nothing is unpickled);
--verify also checks every file's CRC-32 against meta.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from zenlm.checkpoint import CheckpointError, CheckpointStore, newest_valid, read_meta, verify
from zenlm.checkpoint.io import read_json
from zenlm.config.load import ConfigError, load_config, to_dict
from zenlm.runtime.cli import run_tool


def resolve(path: Path) -> Path:
    """A checkpoint directory, or the newest complete one under a checkpoints directory."""
    if (path / "meta.json").is_file():
        return path
    found = newest_valid(CheckpointStore(path))
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint")
    return found[0]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_of(path: Path) -> dict[str, Any]:
    """Resolved config as a flat dict, from a checkpoint (its config.yaml) or a YAML config."""
    if path.is_dir():
        return flatten(yaml.safe_load((resolve(path) / "config.yaml").read_text()))
    return flatten(to_dict(load_config(path)))


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [
        f"  {k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def summary(ckpt: Path) -> list[str]:
    meta = read_meta(ckpt)
    if meta.get("kind") == "weights":  # tools/convert.py import: no trainer state
        size = sum(f["bytes"] for f in meta["files"].values())
        src = meta.get("source") or {}
        return [
            f"checkpoint     {ckpt} (weights only: for checkpoint.init_from)",
            f"parameters     {meta['parameter_count']:,}",
            f"source         {src.get('format', 'n/a')} {src.get('model_type', '')} "
            f"{src.get('path', '')}".rstrip(),
            f"zenlm          {meta['zenlm_version']}, format {meta['format_version']}",
            f"files          {len(meta['files'])}, {size / 2**20:.1f} MiB",
        ]
    state = read_json(ckpt / "trainer.json")
    lay = meta["layout"]
    data = state.get("data") or {}
    size = sum(f["bytes"] for f in meta["files"].values())
    return [
        f"checkpoint     {ckpt}",
        f"step           {meta['step']}",
        f"tokens seen    {meta['tokens_seen']:,}",
        f"parameters     {meta['parameter_count']:,}",
        f"layout         TP{lay['tensor_parallel_degree']} x PP{lay['pipeline_parallel_degree']} x "
        f"DP{lay['data_parallel_degree']} (world {lay['world_size']}), ZeRO-{lay['zero_stage']}, "
        f"{lay['precision']}",
        f"batch          global {lay['global_batch_size_seqs']} x {lay['seq_len_tokens']} tokens, "
        f"micro {lay['micro_batch_size_seqs']}, accumulation {lay['grad_accum_steps']}",
        f"adam step      {state['optimizer']['adam_step']} "
        f"(skipped non-finite steps: {state['health']['nonfinite_steps']})",
        f"data position  {data.get('consumed_samples', 'n/a (synthetic source)')} samples",
        f"tokenizer      {meta.get('tokenizer_fingerprint') or 'n/a'}",
        f"zenlm          {meta['zenlm_version']}, format {meta['format_version']}",
        f"files          {len(meta['files'])}, {size / 2**20:.1f} MiB",
    ]


def inspect(args: argparse.Namespace) -> int:
    if not args.checkpoint.exists():
        raise CheckpointError(f"{args.checkpoint}: no such checkpoint or checkpoints directory")
    ckpt = resolve(args.checkpoint)
    if args.verify:
        verify(ckpt)
    try:
        print("\n".join(summary(ckpt)))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt}: meta.json or trainer.json lacks {e}") from None
    if args.verify:
        print("verified       every file matches its CRC-32")
    if args.against:
        if not args.against.exists():
            raise ConfigError(f"--against {args.against}: no such checkpoint or config file")
        try:
            diff = config_diff(config_of(ckpt), config_of(args.against))
        except (OSError, yaml.YAMLError) as e:
            raise CheckpointError(f"cannot read a config.yaml to compare: {e}") from None
        print(
            f"config vs {args.against}: "
            + ("identical" if not diff else f"{len(diff)} differences")
        )
        print("\n".join(diff))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint dir, or a checkpoints dir")
    parser.add_argument("--against", type=Path, help="another checkpoint (dir) or a config YAML")
    parser.add_argument("--verify", action="store_true", help="check every file's CRC-32")
    args = parser.parse_args(argv)
    # CheckpointError / ConfigError: one `error: ...` line, exit code 2.
    return run_tool(lambda: inspect(args))


if __name__ == "__main__":
    sys.exit(main())
