"""Exact resume and resume at another layout, on the user's path: a corpus written by
tools/train_tokenizer.py and tools/preprocess.py, `Trainer(cfg)` as launch/train.py builds it
(cfg from configs/debug.yaml plus overrides, zenlm's own loader), real gloo process groups. The
data stream resumes from the loader state saved in the checkpoint (consumed samples), not by
replaying micro batches. DataLoader workers prefetch ahead, so only batches the trainer actually
took may count: the DP4 runs and the single-process resume use data.num_workers=2. The 8-rank
runs use 0: 16 worker processes beside 8 ranks on 2 cores made that process group 2.7x slower
(55 -> 150 s) and test nothing the DP4 runs do not.

- TP2 x PP2 x DP2 (ZeRO-1): 20 steps straight (saving at 10 and 20) vs resuming the step-10
  checkpoint for 10 steps: bitwise equal losses and grad norms (CPU fp32).
- DP4 with ZeRO-2 and ZeRO-3, data.num_workers=2: the same, 20 vs 10 + 10.
- The step-10 checkpoint of the TP2 x PP2 x DP2 run resumed at TP1 x PP1 x DP1 (DP 2 -> 1),
  TP4 x PP1 x DP2, TP1 x PP4 x DP2 and TP2 x PP1 x DP4 (DP 2 -> 4), same global batch, with the
  optimizer state: the next 5 losses and grad norms equal the straight run's steps 11-15
  (relative < 1e-5).
- After the exact resume the global torch RNG equals the uninterrupted run's (it was one draw
  ahead while torch's DataLoader drew its base seed from the global generator at each iterator
  creation; the loader now gives it a private generator).
One process group per world size runs all of its cases (start-up dominates on 2 cores).
"""

from pathlib import Path

import pytest

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.text_corpus import build_text_corpus

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")
BASE = [
    "model.num_layers=4",  # PP 4
    "model.num_kv_heads=4",  # TP 4
    "optim.train_steps=20",
    "optim.warmup_steps=2",
    "optim.lr=0.01",
    "optim.grad_clip_norm=0.5",
    "data.global_batch_size_seqs=8",
    "data.micro_batch_size_seqs=1",
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


def _trainer(run_dir, name, overrides, extra):
    from zenlm.train.trainer import Trainer

    cfg = load_config(
        CONFIG,
        [*BASE, *overrides, *extra, f"logging.run_dir={run_dir}", f"logging.run_name={name}"],
    )
    return Trainer(cfg)


def _done(trainer):
    trainer.train_loader.close()  # stop its DataLoader workers now
    trainer.close()


def _steps(history):
    return [(h["train/loss"], h["train/grad_norm"]) for h in history]


def _rng_state():
    import torch

    return torch.get_rng_state().tolist()


def _fit(trainer):
    out = _steps(trainer.fit()), _rng_state()
    _done(trainer)
    return out


def _next_steps(trainer, n):
    out = []
    for _ in range(n):
        loss = trainer.train_step()
        out.append((loss, float(trainer.engine.get_global_grad_norm())))
    _done(trainer)
    return out


def _straight_and_resumed(run_dir, overrides, extra):
    straight, straight_rng = _fit(_trainer(run_dir, "straight", overrides, extra))
    ckpt = f"{run_dir}/straight/checkpoints/step_00000010"
    resumed_trainer = _trainer(run_dir, "resumed", overrides, [*extra, f"checkpoint.resume={ckpt}"])
    assert resumed_trainer.step == 10
    resumed, resumed_rng = _fit(resumed_trainer)
    return {
        "straight": straight,
        "resumed": resumed,
        "ckpt": ckpt,
        "same_rng": straight_rng == resumed_rng,
    }


def _ws8(rank, world_size, run_dir, overrides):
    overrides = [*overrides, "data.num_workers=0"]
    p3d = ["parallel.tensor_parallel_degree=2", "parallel.pipeline_parallel_degree=2"]
    out = _straight_and_resumed(run_dir, overrides, [*p3d, "parallel.zero_stage=1"])
    for name, (tp, pp) in LAYOUTS.items():
        extra = [
            f"parallel.tensor_parallel_degree={tp}",
            f"parallel.pipeline_parallel_degree={pp}",
            f"checkpoint.resume={out['ckpt']}",
        ]
        out[name] = _next_steps(_trainer(run_dir, name, overrides, extra), 5)
    return out


def _ws4(rank, world_size, run_dir, overrides):
    overrides = [*overrides, "data.num_workers=2"]
    out = {}
    for stage in (2, 3):
        out[stage] = _straight_and_resumed(
            f"{run_dir}/zero{stage}", overrides, [f"parallel.zero_stage={stage}"]
        )
    return out


def _ws1(rank, world_size, ckpt, run_dir, overrides):
    overrides = [*overrides, "data.num_workers=2"]
    trainer = _trainer(run_dir, "tp1pp1dp1", overrides, [f"checkpoint.resume={ckpt}"])
    return _next_steps(trainer, 5)


def _assert_close(got, want, what):
    for i, ((g, gn), (w, wn)) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) / abs(w) < 1e-5, f"{what}: step {11 + i}: loss {g} vs {w}"
        assert abs(gn - wn) / abs(wn) < 1e-5, f"{what}: step {11 + i}: grad norm {gn} vs {wn}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_text_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ws8(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("ws8")
    return run_distributed(_ws8, 8, args=(str(run_dir), corpus.overrides()), timeout_s=900)


def test_exact_resume_tp2_pp2_dp2_zero1(ws8):
    for rank, res in enumerate(ws8):
        assert len(res["straight"]) == 20 and len(res["resumed"]) == 10
        assert res["straight"][10:] == res["resumed"], f"rank {rank}: resume is not bitwise exact"
    losses = [loss for loss, _ in ws8[0]["straight"]]
    assert losses[-1] < losses[0] - 0.05, "the run does not train"


def test_exact_resume_restores_the_rng_stream(ws8):
    assert all(res["same_rng"] for res in ws8), "the torch RNG differs after the resume"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_at_another_layout(ws8, layout):
    want = ws8[0]["straight"][10:15]
    for rank, res in enumerate(ws8):
        _assert_close(res[layout], want, f"{layout} rank {rank}")


def test_resume_at_single_process(ws8, tmp_path, corpus):
    args = (ws8[0]["ckpt"], str(tmp_path), corpus.overrides())
    (got,) = run_distributed(_ws1, 1, args=args, timeout_s=300)
    _assert_close(got, ws8[0]["straight"][10:15], "tp1pp1dp1")


@pytest.fixture(scope="module")
def ws4(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("ws4")
    return run_distributed(_ws4, 4, args=(str(run_dir), corpus.overrides()), timeout_s=900)


@pytest.mark.parametrize("stage", [2, 3])
def test_exact_resume_dp4_zero(ws4, stage):
    for rank, res in enumerate(ws4):
        straight, resumed = res[stage]["straight"], res[stage]["resumed"]
        assert straight[10:] == resumed, f"ZeRO-{stage} rank {rank}: resume is not bitwise exact"
