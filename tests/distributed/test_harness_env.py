"""run_distributed starts gloo CPU ranks whenever the world outnumbers the visible GPUs.

A one-GPU workstation is simulated with run_distributed(..., visible_gpus=1): the parent's
torch.cuda.device_count() is replaced by that argument, the children are real spawned ranks.
"""

import os

from zenlm.testing.distributed import run_distributed


def _report(rank, world_size, with_deepspeed):
    import torch
    import torch.distributed as dist

    out = {
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "backend": dist.get_backend(),
        "ranks": dist.get_world_size(),
    }
    if with_deepspeed:
        from deepspeed.accelerator import get_accelerator

        out["accelerator"] = get_accelerator().device_name()
    return out


def test_world_larger_than_visible_gpus_runs_cpu_ranks():
    before = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")}
    results = run_distributed(_report, 2, args=(True,), timeout_s=300, visible_gpus=1)
    for rank, r in enumerate(results):
        assert r["CUDA_VISIBLE_DEVICES"] == "", (rank, r)
        assert r["DS_ACCELERATOR"] == "cpu", (rank, r)
        assert r["cuda_available"] is False and r["cuda_devices"] == 0, (rank, r)
        assert r["accelerator"] == "cpu", (rank, r)
        assert r["backend"] == "gloo" and r["ranks"] == 2, (rank, r)
    # The parent's own environment is restored after the spawn.
    assert {k: os.environ.get(k) for k in before} == before


def test_a_gpu_per_rank_leaves_the_environment_alone():
    before = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR")}
    results = run_distributed(_report, 2, args=(False,), timeout_s=300, visible_gpus=2)
    for r in results:
        assert r["CUDA_VISIBLE_DEVICES"] == before["CUDA_VISIBLE_DEVICES"]
        assert r["DS_ACCELERATOR"] == before["DS_ACCELERATOR"]
