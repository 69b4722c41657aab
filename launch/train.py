"""Pre-training / fine-tuning entry point. Run under torchrun, srun (one task per GPU), or alone:

    torchrun --nproc_per_node 4 launch/train.py --config configs/demo.yaml optim.train_steps=50
    srun --ntasks-per-node 8 python launch/train.py --config configs/runs/llama_7b.yaml
    python launch/train.py --config configs/debug.yaml          # one process, world size 1

Positional arguments are `a.b.c=value` overrides applied on top of the YAML.

Exit codes: 0 the run finished; 75 a stop signal (SIGTERM/SIGUSR1, i.e. preemption) was saved
at a step boundary and the run should be requeued (slurm/common.sh does); 2 a bad config or input
(one `error:` line); anything else a crash. docs/slurm.md has the details.
"""

from __future__ import annotations

import argparse
import sys

# First, before anything slow: a preemption signal during set-up is recorded, not fatal.
from zenlm.runtime.signals import PREEMPTED_EXIT_CODE, install_stop_handlers

install_stop_handlers()

from zenlm.config import load_config  # noqa: E402
from zenlm.runtime.cli import run_tool  # noqa: E402
from zenlm.runtime.exit_status import record_failures, write_exit_status  # noqa: E402


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
    from zenlm.config.validate import run_dir
    from zenlm.train.trainer import Trainer

    trainer = Trainer(cfg)
    history = trainer.fit()
    preempted = trainer.stopped_by_signal is not None
    if trainer.rank == 0:
        status = "preempted" if preempted else "finished"
        write_exit_status(run_dir(cfg), status, trainer.step, trainer.stopped_by_signal)
    # No rank exits before rank 0 has recorded the outcome: srun --kill-on-bad-exit ends the
    # whole step when the first task exits 75.
    import torch.distributed as dist

    dist.barrier()
    if preempted:
        if trainer.rank == 0:
            print(
                f"stopped by signal {trainer.stopped_by_signal} at step {trainer.step}, "
                f"state saved: exit {PREEMPTED_EXIT_CODE} (requeue to resume)"
            )
        return PREEMPTED_EXIT_CODE
    if trainer.rank == 0 and history:
        last = history[-1]
        # Per-rank memory columns (one per rank) stay in TensorBoard: not a 1000-rank line.
        summary = ", ".join(
            f"{k}={v:.4g}" for k, v in last.items() if k != "step" and "_rank" not in k
        )
        print(f"done: step {int(last['step'])}: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    # Errors zenlm raises on purpose print as one `error: ...` line, exit code 2. Under Slurm
    # (ZENLM_FAILURE_DIR set by slurm/common.sh) a failing rank also leaves one line naming
    # itself and the cause, which the batch script reports.
    def body() -> int:
        with record_failures():
            return train(args)

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
