"""Exact resume and resume at another layout, through Trainer.fit and real gloo process groups.

- TP2 x PP2 x DP2 (ZeRO-1): 20 steps straight (saving at 10 and 20) vs resuming the step-10
  checkpoint for 10 steps: bitwise equal losses (CPU fp32).
- DP4 with ZeRO-2 and ZeRO-3: the same, 20 vs 10 + 10.
- The step-10 checkpoint of the TP2 x PP2 x DP2 run resumed at TP1 x PP1 x DP1, TP4 x PP1 x DP2,
  TP1 x PP4 x DP2 and TP2 x PP1 x DP4 with the optimizer state: the next 5 losses equal the
  straight run's steps 11-15 (relative < 1e-5).
One process group per world size runs all of its cases (start-up dominates on 2 cores).
"""

import functools

import pytest

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import rank_micro_batches

BASE = [
    "model.num_layers=4",  # PP 4
    "model.num_kv_heads=4",  # TP 4
    "optim.train_steps=20",
    "optim.warmup_steps=2",
    "optim.lr=0.01",
    "optim.grad_clip_norm=0.5",
    "data.global_batch_size_seqs=8",
    "data.micro_batch_size_seqs=1",
    "data.seq_len_tokens=32",
    "logging.eval_interval_steps=0",
    "logging.log_interval_steps=100",
    "logging.tensorboard_enabled=false",
    "checkpoint.save_interval_steps=10",
]
LAYOUTS = {  # name: (tp, pp); dp follows from the world size
    "tp4pp1dp2": (4, 1),
    "tp1pp4dp2": (1, 4),
    "tp2pp1dp4": (2, 1),
}


def _trainer(run_dir, name, extra):
    from zenlm.train.trainer import Trainer

    cfg = load_config(
        None, [*BASE, *extra, f"logging.run_dir={run_dir}", f"logging.run_name={name}"]
    )
    return Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))


def _losses(history):
    return [h["train/loss"] for h in history]


def _straight_and_resumed(run_dir, extra):
    straight = _losses(_trainer(run_dir, "straight", extra).fit())
    ckpt = f"{run_dir}/straight/checkpoints/step_00000010"
    resumed_trainer = _trainer(run_dir, "resumed", [*extra, f"checkpoint.resume={ckpt}"])
    assert resumed_trainer.step == 10
    return straight, _losses(resumed_trainer.fit()), ckpt


def _ws8(rank, world_size, run_dir):
    p3d = ["parallel.tensor_parallel_degree=2", "parallel.pipeline_parallel_degree=2"]
    straight, resumed, ckpt = _straight_and_resumed(run_dir, [*p3d, "parallel.zero_stage=1"])
    out = {"straight": straight, "resumed": resumed, "ckpt": ckpt}
    for name, (tp, pp) in LAYOUTS.items():
        extra = [
            f"parallel.tensor_parallel_degree={tp}",
            f"parallel.pipeline_parallel_degree={pp}",
            f"checkpoint.resume={ckpt}",
        ]
        trainer = _trainer(run_dir, name, extra)
        out[name] = [trainer.train_step() for _ in range(5)]
    return out


def _ws4(rank, world_size, run_dir):
    out = {}
    for stage in (2, 3):
        out[stage] = _straight_and_resumed(
            f"{run_dir}/zero{stage}", [f"parallel.zero_stage={stage}"]
        )
    return out


def _ws1(rank, world_size, ckpt, run_dir):
    trainer = _trainer(run_dir, "tp1pp1dp1", [f"checkpoint.resume={ckpt}"])
    return [trainer.train_step() for _ in range(5)]


def _assert_close(got, want, what):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) / abs(w) < 1e-5, f"{what}: step {11 + i}: {g} vs {w}"


@pytest.fixture(scope="module")
def ws8(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ws8")
    return run_distributed(_ws8, 8, args=(str(run_dir),), timeout_s=600)


def test_exact_resume_tp2_pp2_dp2_zero1(ws8):
    for rank, res in enumerate(ws8):
        assert len(res["straight"]) == 20 and len(res["resumed"]) == 10
        assert res["straight"][10:] == res["resumed"], f"rank {rank}: resume is not bitwise exact"
    assert ws8[0]["straight"][-1] < ws8[0]["straight"][0] - 0.05, "the run does not train"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_at_another_layout(ws8, layout):
    want = ws8[0]["straight"][10:15]
    for rank, res in enumerate(ws8):
        _assert_close(res[layout], want, f"{layout} rank {rank}")


def test_resume_at_single_process(ws8, tmp_path):
    (got,) = run_distributed(_ws1, 1, args=(ws8[0]["ckpt"], str(tmp_path)), timeout_s=300)
    _assert_close(got, ws8[0]["straight"][10:15], "tp1pp1dp1")


@pytest.fixture(scope="module")
def ws4(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ws4")
    return run_distributed(_ws4, 4, args=(str(run_dir),), timeout_s=600)


@pytest.mark.parametrize("stage", [2, 3])
def test_exact_resume_dp4_zero(ws4, stage):
    for rank, res in enumerate(ws4):
        straight, resumed, _ = res[stage]
        assert straight[10:] == resumed, f"ZeRO-{stage} rank {rank}: resume is not bitwise exact"
