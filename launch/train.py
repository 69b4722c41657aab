"""Pre-training / fine-tuning entry point. Run under torchrun (or srun + torchrun), or alone:

    torchrun --nproc_per_node 4 launch/train.py --config configs/demo.yaml optim.train_steps=50
    python launch/train.py --config configs/debug.yaml          # one process, world size 1

Positional arguments are `a.b.c=value` overrides applied on top of the YAML.
"""

from __future__ import annotations

import argparse
import sys

from zenlm.config import load_config
from zenlm.runtime.cli import run_tool


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML under configs/")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> int:
    # Known-harmless third-party warnings: once on rank 0, before the megatron and DeepSpeed
    # imports below emit them (zenlm.runtime.warnings has the list).
    from zenlm.runtime.warnings import install_known_warnings

    install_known_warnings()
    cfg = load_config(args.config, args.overrides)
    # Every check that needs no DeepSpeed (config, corpora, tokenizer, output dirs, the
    # checkpoint to resume) runs before the framework imports, which take seconds.
    from zenlm.train.preflight import preflight, world_size_from_env

    preflight(cfg, world_size_from_env())
    from zenlm.train.trainer import Trainer

    trainer = Trainer(cfg)
    history = trainer.fit()
    if trainer.rank == 0 and history:
        last = history[-1]
        summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k != "step")
        print(f"done: step {int(last['step'])}: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Errors zenlm raises on purpose print as one `error: ...` line, exit code 2.
    return run_tool(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
