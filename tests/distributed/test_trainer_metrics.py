"""The trainer's metrics from real runs: step-time split, tokens/s, peak memory, skipped steps,
MFU, TensorBoard and W&B (offline) holding the same scalars.

Known delays are injected where each phase lives, in the rank processes only: every micro batch
of the data iterable sleeps DATA_S, DeepSpeed's gradient reduction (DeepSpeedEngine.
allreduce_gradients, at the accumulation boundary) COMM_S and its optimizer step
(_take_model_step) OPT_S. Each phase must then hold its own delay and none of the others':
the delays differ by more than the slack, so a delay counted in the wrong phase fails.
The run: two ranks at PP = 2, where DeepSpeed's PipelineEngine.train_batch runs the whole step
and pulls the micro batches itself (the harder case to split). The same hooks time PP = 1, where
zenlm drives forward, backward and step: tests/integration/test_console.py checks them there.
"""

from __future__ import annotations

import functools
import math
import time

import pytest

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import rank_micro_batches

DATA_S, COMM_S, OPT_S = 0.03, 0.2, 0.3  # per micro batch / per step / per step
GA = 4  # micro batches per step on each rank
SLACK_S = 0.09  # < every injected per-step delay (0.12, 0.2, 0.3)
BASE = [
    "optim.warmup_steps=1",
    "optim.lr=0.01",
    "data.seq_len_tokens=32",
    "data.micro_batch_size_seqs=2",
    "logging.log_interval_steps=3",
    "logging.eval_interval_steps=6",
]


def _slow_down_deepspeed():
    import deepspeed

    cls = deepspeed.runtime.engine.DeepSpeedEngine
    reduce, model_step = cls.allreduce_gradients, cls._take_model_step

    def allreduce_gradients(self, *args, **kwargs):
        if self.is_gradient_accumulation_boundary():
            time.sleep(COMM_S)
        return reduce(self, *args, **kwargs)

    def take_model_step(self, *args, **kwargs):
        time.sleep(OPT_S)
        return model_step(self, *args, **kwargs)

    cls.allreduce_gradients = allreduce_gradients
    cls._take_model_step = take_model_step


def _slow_data(cfg, dp_rank, dp_size):
    for micro in rank_micro_batches(cfg, dp_rank, dp_size):
        time.sleep(DATA_S)
        yield micro


def _vm_hwm_bytes() -> int:
    """Peak resident set of this process from /proc (the kernel's own counter)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def _worker(rank, world_size, run_dir, overrides, steps, nan_step):
    from zenlm.train.trainer import Trainer

    _slow_down_deepspeed()
    cfg = load_config(
        None,
        [*BASE, *overrides, f"optim.train_steps={steps}", f"logging.run_dir={run_dir}"],
    )

    def valid_data(dp_rank, dp_size):
        it = rank_micro_batches(cfg, dp_rank, dp_size, seed=99)
        return [next(it) for _ in range(2)]

    trainer = Trainer(cfg, functools.partial(_slow_data, cfg), valid_data)
    if nan_step:  # the loss (hence every gradient) NaN at this step: the engine skips it

        def poison(x):
            return x * float("nan") if x.is_floating_point() else x

        def hook(module, inputs, output):  # a stage's output: a tensor or a tuple of them
            if trainer.step != nan_step:
                return output
            return tuple(map(poison, output)) if isinstance(output, tuple) else poison(output)

        trainer.engine.module.register_forward_hook(hook)
    wall = []  # each step's wall time, measured here
    step = trainer.train_step

    def timed():
        t0 = time.perf_counter()
        loss = step()
        wall.append(time.perf_counter() - t0)
        return loss

    trainer.train_step = timed
    history = trainer.fit()
    out = {
        "history": history,
        "wall": wall,
        "skipped": trainer.engine.skipped_steps,
        "hwm": _vm_hwm_bytes(),
        "flops_per_token": trainer.flops_per_token,
        "tokens_per_step": trainer.layout.tokens_per_step,
    }
    trainer.close()
    return out


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory):
    """Two ranks, PP = 2 (DP 1): rank 0 is the first stage and logs."""
    run_dir = tmp_path_factory.mktemp("runs")
    overrides = [
        "parallel.pipeline_parallel_degree=2",
        "data.global_batch_size_seqs=8",  # micro 2 x GA 4
        "logging.run_name=pp",
        "logging.wandb_enabled=true",
        "logging.wandb_mode=offline",
        "logging.peak_tflops_per_device=0.5",
    ]
    outs = run_distributed(_worker, 2, args=(str(run_dir), overrides, 6, 2), timeout_s=600)
    out = outs[0]
    out["run"] = run_dir / "pp"
    out["rank1_hwm"] = outs[1]["hwm"]
    return out


def _tb(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _check_split(history_row, wall_steps):
    """The log step's split against the injected delays and the independently timed steps."""
    h = history_row
    step_s = sum(wall_steps) / len(wall_steps)
    # The loop's own step time is the mean over the interval of what was timed here.
    assert h["train/step_time_s"] == pytest.approx(step_s, rel=0.02, abs=2e-3)
    assert DATA_S * GA <= h["time/data_wait_s"] < DATA_S * GA + SLACK_S, h
    assert OPT_S <= h["time/optimizer_s"] < OPT_S + SLACK_S, h
    assert COMM_S <= h["time/comm_s"] < COMM_S + SLACK_S, h
    parts = ("data_wait", "fwd_bwd", "optimizer", "comm")
    assert sum(h[f"time/{p}_s"] for p in parts) == pytest.approx(h["train/step_time_s"])
    assert 0 < h["time/fwd_bwd_s"] < step_s - DATA_S * GA - OPT_S - COMM_S + 1e-3


def test_step_time_split_holds_each_phase(pp_run):
    history, wall = pp_run["history"], pp_run["wall"]
    logged = [h for h in history if "time/fwd_bwd_s" in h]
    assert [h["step"] for h in logged] == [3, 6]  # the log steps only
    for h, steps in zip(logged, (wall[0:3], wall[3:6]), strict=True):
        _check_split(h, steps)
        # tokens/s over the interval, and TFLOP/s and MFU from it
        tps = pp_run["tokens_per_step"] / h["train/step_time_s"]
        assert h["train/tokens_per_s"] == pytest.approx(tps)
        tflops = tps * pp_run["flops_per_token"] / 1e12 / 2  # per device: 2 ranks
        assert h["train/tflops_per_device"] == pytest.approx(tflops)
        assert h["train/mfu"] == pytest.approx(tflops / 0.5)
    # Both stages draw the micro batches (inputs on the first, labels on the last).
    assert DATA_S * GA <= h["time/data_wait_s_max"] < DATA_S * GA + SLACK_S


def test_skipped_steps_and_peak_memory(pp_run):
    history = {h["step"]: h for h in pp_run["history"]}
    assert not math.isfinite(history[2]["train/loss"])
    assert pp_run["skipped"] == 1
    assert history[3]["train/skipped_steps"] == history[6]["train/skipped_steps"] == 1
    # Peak RSS of each rank at step 6 <= the kernel's peak of that process at the end, and
    # >= 0.8 x (nothing large comes after); the run's figure is their max.
    h = history[6]
    for rank, hwm in ((0, pp_run["hwm"]), (1, pp_run["rank1_hwm"])):
        assert 0.8 * hwm <= h[f"mem/peak_gib_rank{rank}"] * 2**30 <= hwm
    assert h["mem/peak_gib"] == max(h["mem/peak_gib_rank0"], h["mem/peak_gib_rank1"])


def test_tensorboard_and_wandb_hold_the_same_scalars(pp_run):
    from zenlm.testing.wandb_log import wandb_history

    tb = _tb(pp_run["run"])
    history = {h["step"]: h for h in pp_run["history"]}
    expected = {
        "train/loss", "train/tokens_per_s", "train/step_time_s", "train/tflops_per_device",
        "train/mfu", "train/skipped_steps", "time/data_wait_s", "time/data_wait_s_max",
        "time/fwd_bwd_s", "time/optimizer_s", "time/comm_s", "mem/peak_gib", "val/loss",
    }  # fmt: skip
    assert expected <= set(tb), expected - set(tb)
    rows = {r["_step"]: r for r in wandb_history(pp_run["run"])}
    assert sorted(rows) == [3, 6]
    for tag in expected:
        for step, value in tb[tag].items():
            want = history[step][tag]
            if math.isfinite(want):
                assert value == pytest.approx(want, rel=1e-6), (tag, step)  # float32 events
                assert rows[step][tag] == pytest.approx(want, rel=1e-12), (tag, step)
