"""Render, show or submit the sbatch command of a training run.

    python launch/submit.py --config configs/runs/llama_7b.yaml --nodes 4 --dry-run
    python launch/submit.py --config configs/sft/llama3_8b.yaml --script finetune --nodes 1 \\
        --partition gpu --time 12:00:00 checkpoint.init_from=ckpts/llama3-8b
    python launch/submit.py --config configs/debug.yaml --nodes 2 --gpus-per-node 0 \\
        --procs-per-node 2 --launcher torchrun          # CPU ranks (tests, a CPU cluster)

The config and overrides are loaded and the layout checked against nodes x processes per node
here, before anything is queued; they then reach launch/train.py unchanged through
slurm/<script>.sbatch. Options given here override the script's #SBATCH lines. Run from the
zenlm checkout (sbatch records it as SLURM_SUBMIT_DIR; slurm/common.sh starts there).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from zenlm.config import load_config
from zenlm.config.load import ConfigError
from zenlm.config.validate import validate
from zenlm.runtime.cli import run_tool

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("pretrain", "finetune")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="YAML under configs/")
    p.add_argument("--script", choices=SCRIPTS, default="pretrain", help="slurm/<script>.sbatch")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU ranks")
    p.add_argument(
        "--procs-per-node",
        type=int,
        default=None,
        help="training processes per node (default: --gpus-per-node)",
    )
    p.add_argument("--cpus-per-proc", type=int, default=None, help="CPU cores per process")
    p.add_argument("--launcher", choices=("srun", "torchrun"), default="srun")
    p.add_argument("--job-name", default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--run-name", default=None, help="run directory name (default <job>-<id>)")
    p.add_argument("--sbatch-arg", action="append", default=[], help="more sbatch options")
    p.add_argument("--dry-run", action="store_true", help="print the command, submit nothing")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    return p.parse_intermixed_args(argv)  # overrides may come before and after options


def sbatch_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The sbatch argv and the variables it exports to the job (beside the caller's)."""
    procs = args.procs_per_node if args.procs_per_node is not None else args.gpus_per_node
    if args.nodes < 1:
        raise ConfigError(f"--nodes {args.nodes}: give at least 1")
    if procs < 1:
        raise ConfigError(
            f"--procs-per-node {procs}: with --gpus-per-node 0 (CPU ranks) give --procs-per-node"
        )
    if args.gpus_per_node and procs != args.gpus_per_node:
        raise ConfigError(
            f"--procs-per-node {procs} with --gpus-per-node {args.gpus_per_node}: "
            "zenlm runs one process per GPU"
        )
    # The layout must divide the world this job gets, checked now rather than after the wait
    # in the queue.
    cfg = load_config(args.config, args.overrides)
    validate(cfg, args.nodes * procs, check_device=False)

    cmd = ["sbatch", f"--nodes={args.nodes}", f"--gpus-per-node={args.gpus_per_node}"]
    if args.launcher == "srun":
        cmd.append(f"--ntasks-per-node={procs}")
        if args.cpus_per_proc:
            cmd.append(f"--cpus-per-task={args.cpus_per_proc}")
    else:  # one task per node runs torchrun, which starts `procs` workers
        cmd.append("--ntasks-per-node=1")
        if args.cpus_per_proc:
            cmd.append(f"--cpus-per-task={args.cpus_per_proc * procs}")
    for flag in ("job_name", "partition", "account", "time"):
        value = getattr(args, flag)
        if value:
            cmd.append(f"--{flag.replace('_', '-')}={value}")
    cmd += args.sbatch_arg
    env = {"ZENLM_LAUNCHER": args.launcher, "ZENLM_PROCS_PER_NODE": str(procs)}
    if args.run_name:
        env["ZENLM_RUN_NAME"] = args.run_name
    cmd.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()))
    cmd += [f"slurm/{args.script}.sbatch", args.config, *args.overrides]
    return cmd, env


def submit(args: argparse.Namespace) -> int:
    cmd, _ = sbatch_command(args)
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    # sbatch does not create the --output directory; a missing one loses the job's log.
    (ROOT / "logs").mkdir(exist_ok=True)
    try:
        out = subprocess.run(
            [*cmd[:1], "--parsable", *cmd[1:]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=os.environ,
        )
    except FileNotFoundError:
        raise ConfigError(
            "sbatch not found: run on a Slurm login node (or use --dry-run)"
        ) from None
    if out.returncode != 0:
        raise ConfigError(f"sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    print(
        f"submitted job {job_id}; log: logs/{args.job_name or 'zenlm-' + args.script}-{job_id}.out"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_tool(lambda: submit(args))


if __name__ == "__main__":
    sys.exit(main())
