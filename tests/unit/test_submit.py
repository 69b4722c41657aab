"""launch/submit.py: the sbatch line it renders for the README's command, the layout checked
against nodes x processes before anything is queued, and one error line for bad input.
(tests/slurm submits through it to a real Slurm cluster.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from zenlm.testing.readme import find_readme_command

ROOT = Path(__file__).resolve().parents[2]


def run_submit(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/submit.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env or os.environ,
    )


def test_readme_dry_run():
    cmd = find_readme_command(
        "On a Slurm cluster", (".venv/bin/python", "launch/submit.py"), "--dry-run"
    )
    r = run_submit(cmd[2:])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [
        "sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 "
        "--export=ALL,ZENLM_LAUNCHER=srun,ZENLM_PROCS_PER_NODE=8 "
        "slurm/pretrain.sbatch configs/runs/llama2_7b.yaml"
    ]


def test_torchrun_launcher_and_overrides_pass_through():
    r = run_submit(
        [
            "--config=configs/debug.yaml", "--nodes=2", "--gpus-per-node=4", "--launcher=torchrun",
            "--cpus-per-proc=6", "--script=finetune", "--partition=gpu", "--time=1:00:00",
            "--run-name=r1", "--dry-run", "parallel.tensor_parallel_degree=2", "optim.lr=1e-3",
        ]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "sbatch", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=1", "--cpus-per-task=24",
        "--partition=gpu", "--time=1:00:00",
        "--export=ALL,ZENLM_LAUNCHER=torchrun,ZENLM_PROCS_PER_NODE=4,ZENLM_RUN_NAME=r1",
        "slurm/finetune.sbatch", "configs/debug.yaml", "parallel.tensor_parallel_degree=2",
        "optim.lr=1e-3",
    ]  # fmt: skip


def test_a_layout_that_does_not_divide_the_job_is_refused_before_queueing():
    r = run_submit(["--config=configs/debug.yaml", "--nodes=3", "--gpus-per-node=1", "--dry-run",
                    "parallel.tensor_parallel_degree=2"])  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: world size 3 is not divisible by tensor_parallel_degree x "
        "pipeline_parallel_degree = 2 x 1 = 2"
    )
    assert r.stdout == ""


def test_without_sbatch_one_line_says_where_to_run(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no sbatch on it
    r = run_submit(["--config=configs/debug.yaml", "--nodes=1", "--gpus-per-node=0",
                    "--procs-per-node=1"], env)  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: sbatch not found: run on a Slurm login node (or use --dry-run)"
    ]
