"""ZeRO 0/1/2/3 x DP 2 and 4: 10 fp32 steps give the single-process run's losses (rel < 1e-5).

The reference is a plain PyTorch loop (zenlm.testing.reference), not another DeepSpeed run, so
this also proves the engine (accumulation, clipping, schedule, no-decay groups) adds nothing.
One process group per world size runs all four stages, to keep the suite fast.
"""

import functools

import pytest

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import rank_micro_batches, reference_losses

STEPS = 10
BASE = [
    "optim.train_steps=10",
    "optim.warmup_steps=2",
    "optim.lr=0.01",  # large enough that every step moves the loss visibly
    "optim.grad_clip_norm=0.5",  # below the debug model's grad norm: clipping is active
    "data.global_batch_size_seqs=8",
    "data.micro_batch_size_seqs=1",
    "data.seq_len_tokens=32",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
]


def _losses_per_stage(rank, world_size, overrides, stages, run_dir):
    from zenlm.train.trainer import Trainer

    out = {}
    for stage in stages:
        cfg = load_config(
            None,
            [
                *overrides,
                f"parallel.zero_stage={stage}",
                f"logging.run_dir={run_dir}",
                f"logging.run_name=zero{stage}",
            ],
        )
        data = functools.partial(rank_micro_batches, cfg)
        trainer = Trainer(cfg, train_data=data)
        out[stage] = [trainer.train_step() for _ in range(STEPS)]
        grad_norm = float(trainer.engine.get_global_grad_norm())
        out[f"grad_norm{stage}"] = grad_norm
        trainer.close()
    return out


def _assert_close(got, want, what):
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) / abs(w) < 1e-5, f"{what}: step {step + 1}: {g} vs reference {w}"


@pytest.mark.parametrize("dp", [2, 4])
def test_zero_stages_match_single_process(dp, tmp_path):
    cfg = load_config(None, BASE)
    want = reference_losses(cfg, STEPS)
    assert want[-1] < want[0] - 0.05, f"reference does not train: {want}"
    results = run_distributed(
        _losses_per_stage, dp, args=(BASE, [0, 1, 2, 3], str(tmp_path)), timeout_s=600
    )
    for stage in (0, 1, 2, 3):
        for rank, res in enumerate(results):
            _assert_close(res[stage], want, f"ZeRO-{stage} DP{dp} rank {rank}")
        norms = {res[f"grad_norm{stage}"] for res in results}
        assert len(norms) == 1, f"ZeRO-{stage}: ranks disagree on the grad norm: {norms}"
