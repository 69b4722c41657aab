"""The trainer in one process: accumulation equivalence, bf16/fp16 tracking, TensorBoard scalars.

All checks share one spawned 1-rank process group (start-up dominates on 2 cores).
"""

import functools
import math

import pytest

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import rank_micro_batches

BASE = [
    "optim.warmup_steps=2",
    "optim.lr=0.01",
    "optim.grad_clip_norm=0.5",
    "data.global_batch_size_seqs=8",
    "data.seq_len_tokens=32",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
]
PRECISION_STEPS = 100


def _run(overrides, steps, run_dir, name, valid=False, fit=False):
    from zenlm.train.trainer import Trainer

    cfg = load_config(
        None,
        [
            *BASE,
            *overrides,
            f"optim.train_steps={steps}",
            f"logging.run_dir={run_dir}",
            f"logging.run_name={name}",
        ],
    )
    data = functools.partial(rank_micro_batches, cfg)

    def valid_data(rank, n):
        # A fixed, re-iterable set of 2 validation micro batches.
        it = rank_micro_batches(cfg, rank, n, seed=99)
        return [next(it) for _ in range(2)]

    trainer = Trainer(cfg, train_data=data, valid_data=valid_data if valid else None)
    result = trainer.fit() if fit else [trainer.train_step() for _ in range(steps)]
    trainer.close()
    return result


def _worker(rank, world_size, run_dir):
    out = {}
    out["micro2x4"] = _run(["data.micro_batch_size_seqs=2"], 5, run_dir, "ga4")
    out["micro8x1"] = _run(["data.micro_batch_size_seqs=8"], 5, run_dir, "ga1")
    out["fp32"] = _run(["data.micro_batch_size_seqs=8"], PRECISION_STEPS, run_dir, "fp32")
    out["bf16"] = _run(
        ["data.micro_batch_size_seqs=8", "runtime.precision=bf16"], PRECISION_STEPS, run_dir, "bf16"
    )
    out["fp16"] = _run(
        ["data.micro_batch_size_seqs=8", "runtime.precision=fp16"], PRECISION_STEPS, run_dir, "fp16"
    )
    out["history"] = _run(
        [
            "data.micro_batch_size_seqs=4",
            "logging.tensorboard_enabled=true",
            "logging.log_interval_steps=2",
            "logging.eval_interval_steps=3",
            "runtime.precision=fp16",
        ],
        6,
        run_dir,
        "tb",
        valid=True,
        fit=True,
    )
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    (out,) = run_distributed(_worker, 1, args=(str(run_dir),), timeout_s=900)
    out["run_dir"] = run_dir
    return out


def test_gradient_accumulation_equals_one_big_micro_batch(results):
    for step, (a, b) in enumerate(zip(results["micro2x4"], results["micro8x1"], strict=True)):
        assert abs(a - b) / b < 1e-5, f"step {step + 1}: micro 2 x 4 -> {a}, micro 8 x 1 -> {b}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_tracks_fp32(results, precision):
    """Tolerance documented in docs/training.md: over 100 steps, 10-step mean losses within 1e-2
    relative of fp32's (measured: bf16 2.4e-3, fp16 3.4e-3) and every single step within 5e-2
    (measured: 2.9e-2, 2.0e-2; single steps drift as the runs' trajectories separate)."""
    fp32, half = results["fp32"], results[precision]
    assert fp32[-1] < fp32[0] * 0.8, "fp32 reference does not train"
    for i in range(0, PRECISION_STEPS, 10):
        a, b = sum(half[i : i + 10]), sum(fp32[i : i + 10])
        assert abs(a - b) / b < 1e-2, (
            f"{precision}: steps {i + 1}-{i + 10} mean {a / 10} vs fp32 {b / 10}"
        )
    worst = max(abs(h - f) / f for h, f in zip(half, fp32, strict=True))
    assert worst < 5e-2, f"{precision}: worst per-step relative difference {worst:.3e}"
    assert any(h != f for h, f in zip(half, fp32, strict=True)), "half precision was not applied"


def test_tensorboard_holds_the_scalars(results):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = results["history"]
    acc = EventAccumulator(str(results["run_dir"] / "tb" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/loss_scale",
        "train/tokens_per_s",
        "train/tokens_seen",
        "train/step_time_s",
        "val/loss",
        "val/perplexity",
        "val/accuracy",
    }
    assert expected <= tags, f"missing: {expected - tags}"
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    # Logged at the log interval (2, 4, 6) and at every validation step (3, 6).
    assert sorted(losses) == [2, 3, 4, 6]
    for h in history:
        if h["step"] in losses:
            assert losses[h["step"]] == pytest.approx(h["train/loss"], rel=1e-6)
    val = {e.step: e.value for e in acc.Scalars("val/loss")}
    ppl = {e.step: e.value for e in acc.Scalars("val/perplexity")}
    assert sorted(val) == [3, 6]
    assert ppl[6] == pytest.approx(math.exp(val[6]), rel=1e-5)
    seen = {e.step: e.value for e in acc.Scalars("train/tokens_seen")}
    assert seen[6] == 6 * 8 * 32
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("val/accuracy"))
    assert (results["run_dir"] / "tb" / "config.yaml").is_file()
