"""Checkpoint faults through the real Trainer (one gloo rank, one process for every case):

- NaN loss at ZeRO-0 (zenlm's guard) and ZeRO-1 (DeepSpeed's overflow path): the step is skipped
  (weights unchanged), counted, and training goes on; N in a row stops with a clear error.
- A full disk during a save (a real tmpfs when mount works): CheckpointError naming the full
  disk, the previous checkpoint intact and chosen.
- SAVE_NOW flag file: a checkpoint at the next step, file removed. SIGUSR1 (preemption): save and
  stop; a new Trainer with resume=auto finishes with the uninterrupted run's losses, bitwise.
"""

import functools
import os
import signal
import subprocess

import pytest

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import rank_micro_batches

BASE = [
    "optim.train_steps=6",
    "optim.warmup_steps=1",
    "optim.lr=0.01",
    "data.global_batch_size_seqs=4",
    "data.micro_batch_size_seqs=2",
    "data.seq_len_tokens=16",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
]


def _trainer(run_dir, name, extra=()):
    from zenlm.train.trainer import Trainer

    cfg = load_config(
        None, [*BASE, *extra, f"logging.run_dir={run_dir}", f"logging.run_name={name}"]
    )
    return Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))


def _at_steps(trainer, steps, action):
    """Run action(trainer) right after the train steps in `steps` (before the step's checks)."""
    step = trainer.train_step

    def wrapped():
        loss = step()
        return action(trainer, loss) if trainer.step in steps else loss

    trainer.train_step = wrapped


def _nan_losses(trainer, nan_steps):
    """Make the loss (hence every gradient) NaN during the given steps."""
    import torch

    def hook(module, inputs, output):
        # train_step counts the step before running it
        return output * float("nan") if trainer.step in nan_steps else output

    trainer.engine.module.register_forward_hook(hook)
    return torch


def _weights(trainer):
    from zenlm.model.init import full_state_dict

    return {
        k: v.clone() for k, v in full_state_dict(trainer.engine.module, trainer.factory).items()
    }


def _nonfinite(run_dir, stage):
    import math

    import torch

    trainer = _trainer(run_dir, f"nan{stage}", [f"parallel.zero_stage={stage}"])
    _nan_losses(trainer, {3, 4})
    snapshots = {}
    _at_steps(trainer, {2, 4}, lambda t, loss: snapshots.setdefault(t.step, _weights(t)) and loss)
    history = trainer.fit()
    unchanged = all(torch.equal(snapshots[2][k], snapshots[4][k]) for k in snapshots[2])
    losses = [h["train/loss"] for h in history]
    return {
        "nan_steps": [i + 1 for i, x in enumerate(losses) if not math.isfinite(x)],
        "counted": history[-1]["train/nonfinite_steps"],
        "skipped": trainer.engine.skipped_steps,
        "unchanged": unchanged,
        "finite_after": all(math.isfinite(x) for x in losses[4:]),
    }


def _diverged(run_dir):
    from zenlm.checkpoint.faults import TrainingDivergedError

    trainer = _trainer(run_dir, "diverge", ["checkpoint.max_consecutive_nonfinite_steps=3"])
    _nan_losses(trainer, set(range(2, 100)))
    try:
        trainer.fit()
    except TrainingDivergedError as e:
        return str(e), trainer.step
    return None, trainer.step


def _disk_full(run_dir, small_dir, mounted):
    import errno

    from zenlm.checkpoint import CheckpointError, CheckpointStore, newest_valid

    extra = [f"checkpoint.dir={small_dir}", "checkpoint.save_interval_steps=2"]
    trainer = _trainer(run_dir, "full", extra)
    if not mounted:  # no tmpfs: make every write into a temporary checkpoint dir fail
        import zenlm.checkpoint.io as io

        real = io.write_bytes

        def full(path, data):
            if trainer.step >= 4:
                raise CheckpointError(
                    f"disk full while writing {path}: {os.strerror(errno.ENOSPC)}"
                )
            return real(path, data)

        io.write_bytes = full
    try:
        trainer.fit()
        message = None
    except CheckpointError as e:
        message = str(e)
    chosen = newest_valid(CheckpointStore(small_dir))
    return message, chosen[1]["step"] if chosen else None, trainer.step


def _preempt(run_dir):
    straight = [h["train/loss"] for h in _trainer(run_dir, "straight").fit()]
    first = _trainer(run_dir, "preempt")
    (first.run_dir / "SAVE_NOW").touch()
    _at_steps(first, {3}, lambda t, loss: os.kill(os.getpid(), signal.SIGUSR1) or loss)
    part1 = [h["train/loss"] for h in first.fit()]
    flag_left = (first.run_dir / "SAVE_NOW").exists()
    saved = first.checkpoints.store.steps()
    second = _trainer(run_dir, "preempt")  # checkpoint.resume=auto
    resumed_at = second.step
    part2 = [h["train/loss"] for h in second.fit()]
    return straight, part1, part2, flag_left, saved, resumed_at


def _worker(rank, world_size, run_dir, small_dir, mounted):
    return {
        "nan0": _nonfinite(run_dir, 0),
        "nan1": _nonfinite(run_dir, 1),
        "diverged": _diverged(run_dir),
        "disk_full": _disk_full(run_dir, small_dir, mounted),
        "preempt": _preempt(run_dir),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    small = tmp_path_factory.mktemp("small") / "ckpt"
    small.mkdir()
    # The debug model's checkpoint is ~1.3 MB: a 2 MB tmpfs holds one, not two.
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True
    )
    mounted = r.returncode == 0
    try:
        (out,) = run_distributed(
            _worker, 1, args=(str(run_dir), str(small), mounted), timeout_s=600
        )
    finally:
        if mounted:
            subprocess.run(["umount", str(small)], check=False)
    out["mounted"] = mounted
    return out


@pytest.mark.parametrize("stage", [0, 1])
def test_nonfinite_steps_are_skipped_and_counted(results, stage):
    r = results[f"nan{stage}"]
    assert r["nan_steps"] == [3, 4]
    assert r["counted"] == 2 and r["skipped"] == 2
    assert r["unchanged"], "a NaN step changed the weights"
    assert r["finite_after"]


def test_consecutive_nonfinite_steps_stop_training(results):
    message, step = results["diverged"]
    assert message is not None and step == 4, f"expected a stop at step 4 (2, 3, 4 NaN), got {step}"
    assert "3 consecutive steps" in message and "max_consecutive_nonfinite_steps" in message


def test_disk_full_keeps_previous_checkpoint(results):
    message, chosen, step = results["disk_full"]
    assert message is not None and "disk full" in message and "intact" in message, message
    assert step == 4 and chosen == 2


def test_save_now_flag_and_preemption_signal(results):
    straight, part1, part2, flag_left, saved, resumed_at = results["preempt"]
    assert not flag_left, "SAVE_NOW was not consumed"
    assert saved == [3, 1], f"expected checkpoints at the flag (1) and the signal (3): {saved}"
    assert len(part1) == 3 and resumed_at == 3
    assert part1 + part2 == straight, "preempted + resumed run differs from the straight run"
