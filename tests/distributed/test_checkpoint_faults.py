"""Checkpoint faults through the real Trainer on the user's path: a corpus written by
tools/train_tokenizer.py and tools/preprocess.py, `Trainer(cfg)` with zenlm's own loader, cfg from
configs/debug.yaml plus overrides (one gloo rank).

- NaN loss at ZeRO-0 (zenlm's guard) and ZeRO-1 (DeepSpeed's overflow path): the step is skipped
  (weights unchanged), counted, and training goes on; N in a row stops with a clear error.
- A full disk during a save, two ways (each its own case, run in its own process, so nothing one
  does can reach another test): a real 3 MB tmpfs (where mount works; skipped, saying why, where
  it does not), and always a 3 MB "device" whose raw write(2)-level call fails with ENOSPC
  (_small_disk). Both: CheckpointError naming the full disk, no temp dir left, the previous
  checkpoint intact and chosen.
- SAVE_NOW flag file: a checkpoint at the next step, file removed. SIGUSR1 (preemption): save and
  stop; a new Trainer with resume=auto (through the loader's saved state) finishes with the
  uninterrupted run's losses, bitwise.
"""

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.text_corpus import build_text_corpus

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")
BASE = [
    "optim.train_steps=6",
    "optim.warmup_steps=1",
    "optim.lr=0.01",
    "data.global_batch_size_seqs=4",
    "data.micro_batch_size_seqs=2",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
]
# The debug model's checkpoint here is ~1.7 MB: a 3 MB device holds one, not two.
CAPACITY = 3 << 20


def _trainer(run_dir, name, overrides, extra=()):
    from zenlm.train.trainer import Trainer

    cfg = load_config(
        CONFIG,
        [*BASE, *overrides, *extra, f"logging.run_dir={run_dir}", f"logging.run_name={name}"],
    )
    return Trainer(cfg)


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


def _nonfinite(run_dir, overrides, stage):
    import math

    import torch

    # fp32 at DP 1 runs ZeRO stage 0 whatever the config says (parallel/engine.py); bf16 keeps
    # stage 1, so the stage-1 case exercises DeepSpeed's ZeRO optimizer skipping the NaN steps.
    extra = [f"parallel.zero_stage={stage}"] + (["runtime.precision=bf16"] if stage else [])
    trainer = _trainer(run_dir, f"nan{stage}", overrides, extra)
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


def _diverged(run_dir, overrides):
    from zenlm.checkpoint.faults import TrainingDivergedError

    extra = ["checkpoint.max_consecutive_nonfinite_steps=3"]
    trainer = _trainer(run_dir, "diverge", overrides, extra)
    _nan_losses(trainer, set(range(2, 100)))
    try:
        trainer.fit()
    except TrainingDivergedError as e:
        return str(e), trainer.step
    return None, trainer.step


def _small_disk(root, capacity):
    """Make `root` behave like a device of `capacity` bytes for zenlm.checkpoint.io's writes.

    Files that io.py opens for writing under `root` get a raw file (io.FileIO, whose write() is
    the write(2) call) that fails with OSError(ENOSPC) once the files under `root` would exceed
    `capacity`; deleting files frees space, as on a real device. Everything above the raw write
    is the real code: _write_chunks' buffered writes, flush, fsync, its ENOSPC handling (partial
    file removed, CheckpointError "disk full"), the session's error gathering and clean-up.
    Returns the function that undoes the patch.
    """
    import builtins
    import errno
    import io
    from pathlib import Path

    import zenlm.checkpoint.io as ckpt_io

    root = Path(root).resolve()

    def used():
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    class Device(io.FileIO):
        def write(self, b):
            if used() + memoryview(b).nbytes > capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)

    def small_open(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).resolve().is_relative_to(root):
            return io.BufferedWriter(Device(path, "wb"))
        return builtins.open(path, mode, *args, **kwargs)

    ckpt_io.open = small_open  # shadows the builtin inside io.py only

    def undo():
        del ckpt_io.open

    return undo


def _disk_full(run_dir, small_dir, overrides, inject):
    """A save at step 2 fits, the one at step 4 does not (the device holds one checkpoint)."""
    from pathlib import Path

    from zenlm.checkpoint import CheckpointError, CheckpointStore, newest_valid

    extra = [f"checkpoint.dir={small_dir}", "checkpoint.save_interval_steps=2"]
    trainer = _trainer(run_dir, f"full-{'injected' if inject else 'tmpfs'}", overrides, extra)
    undo = _small_disk(small_dir, CAPACITY) if inject else None
    try:
        trainer.fit()
        message = None
    except CheckpointError as e:
        message = str(e)
    finally:
        if undo is not None:
            undo()
    chosen = newest_valid(CheckpointStore(small_dir))
    leftovers = sorted(p.name for p in Path(small_dir).iterdir() if p.name.startswith("."))
    return message, chosen[1]["step"] if chosen else None, trainer.step, leftovers


def _preempt(run_dir, overrides):
    straight = [h["train/loss"] for h in _trainer(run_dir, "straight", overrides).fit()]
    first = _trainer(run_dir, "preempt", overrides)
    (first.run_dir / "SAVE_NOW").touch()
    _at_steps(first, {3}, lambda t, loss: os.kill(os.getpid(), signal.SIGUSR1) or loss)
    part1 = [h["train/loss"] for h in first.fit()]
    flag_left = (first.run_dir / "SAVE_NOW").exists()
    saved = first.checkpoints.store.steps()
    second = _trainer(run_dir, "preempt", overrides)  # checkpoint.resume=auto
    resumed_at = second.step
    part2 = [h["train/loss"] for h in second.fit()]
    return straight, part1, part2, flag_left, saved, resumed_at


def _worker(rank, world_size, run_dir, overrides):
    return {
        "nan0": _nonfinite(run_dir, overrides, 0),
        "nan1": _nonfinite(run_dir, overrides, 1),
        "diverged": _diverged(run_dir, overrides),
        "preempt": _preempt(run_dir, overrides),
    }


def _disk_full_worker(rank, world_size, run_dir, small_dir, overrides, inject):
    return _disk_full(run_dir, small_dir, overrides, inject)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_text_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def results(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("runs")
    (out,) = run_distributed(_worker, 1, args=(str(run_dir), corpus.overrides()), timeout_s=600)
    return out


@pytest.fixture
def small_dir(request, tmp_path):
    """The checkpoint dir on a full-able device: a real tmpfs, or the injected one."""
    small = tmp_path / "small"
    small.mkdir()
    if request.param == "injected":
        yield small
        return
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={CAPACITY}", "tmpfs", str(small)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected case runs")
    try:
        yield small
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.parametrize("small_dir", ["tmpfs", "injected"], indirect=True)
def test_disk_full_keeps_previous_checkpoint(small_dir, request, tmp_path, corpus):
    inject = request.node.callspec.params["small_dir"] == "injected"
    args = (str(tmp_path / "runs"), str(small_dir), corpus.overrides(), inject)
    ((message, chosen, step, leftovers),) = run_distributed(
        _disk_full_worker, 1, args=args, timeout_s=300
    )
    assert message is not None and "disk full" in message and "intact" in message, message
    assert os.strerror(errno.ENOSPC) in message, message  # from the failed write itself
    assert step == 4 and chosen == 2
    assert not [n for n in leftovers if n.startswith(".tmp.")], leftovers


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


def test_save_now_flag_and_preemption_signal(results):
    straight, part1, part2, flag_left, saved, resumed_at = results["preempt"]
    assert not flag_left, "SAVE_NOW was not consumed"
    assert saved == [3, 1], f"expected checkpoints at the flag (1) and the signal (3): {saved}"
    assert len(part1) == 3 and resumed_at == 3
    assert part1 + part2 == straight, "preempted + resumed run differs from the straight run"
