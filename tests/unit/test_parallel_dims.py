"""ParallelDims validation and rank order, model-vs-TP checks, and the megatron CPU shims."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zenlm.model import ModelConfig
from zenlm.parallel.dims import ParallelDims, validate_model_for_tp


def test_degrees_must_divide_the_world() -> None:
    assert ParallelDims(8, tp=2, pp=2).dp == 2
    with pytest.raises(
        ValueError, match=r"world_size \(6\) is not divisible by .* \(4\) x .* \(1\) = 4"
    ):
        ParallelDims(6, tp=4)
    with pytest.raises(
        ValueError, match=r"\(2\) x .* \(1\) x data_parallel_degree \(2\) = 4 != world_size \(8\)"
    ):
        ParallelDims(8, tp=2, dp=2)
    with pytest.raises(ValueError, match=r"tp \(0\) must be >= 1"):
        ParallelDims(8, tp=0)


def test_rank_order_is_pp_dp_tp() -> None:
    dims = ParallelDims(8, tp=2, pp=2, dp=2)
    assert [dims.coords(r) for r in range(8)] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1),
    ]  # fmt: skip
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(8))
    assert dims.tp_group_ranks(5) == [4, 5]
    assert dims.dp_group_ranks(5) == [5, 7]
    assert dims.pp_group_ranks(5) == [1, 5]


def test_initialize_single_process_checks_rank_order() -> None:
    """megatron's groups at world size 1, through a real (gloo) process group."""
    import torch.distributed as dist

    from zenlm.parallel.dims import destroy, initialize
    from zenlm.parallel.tensor import PlainFactory, build_factory
    from zenlm.testing.distributed import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        initialize(ParallelDims(1), seed=1)
        assert isinstance(build_factory(), PlainFactory)
        with pytest.raises(ValueError, match=r"needs tensor_parallel_degree > 1 \(it is 1\)"):
            build_factory(sequence_parallel=True)
        destroy()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_attention_heads=6, num_kv_heads=2, hidden_size=48), r"num_attention_heads \(6\) is not divisible by tensor_parallel_degree \(4\)"),
        (dict(num_kv_heads=2), r"num_kv_heads \(2\) is not divisible by tensor_parallel_degree \(4\)"),
        (dict(num_kv_heads=1), r"num_kv_heads \(1\) is not divisible by tensor_parallel_degree \(4\)"),
        (dict(intermediate_size=170), r"intermediate_size \(170\) is not divisible by tensor_parallel_degree \(4\)"),
    ],
)  # fmt: skip
def test_model_must_split_over_tp(change: dict, message: str) -> None:
    cfg = dataclasses.replace(ModelConfig(num_attention_heads=8, num_kv_heads=4), **change)
    validate_model_for_tp(cfg, 1)
    with pytest.raises(ValueError, match=message):
        validate_model_for_tp(cfg, 4)


@pytest.fixture
def shims():
    from zenlm.parallel import cpu

    cpu.remove_cpu_shims()
    yield cpu
    cpu.remove_cpu_shims()


def test_cpu_rng_tracker(shims) -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    assert shims.apply_cpu_shims() and shims.cpu_shims_active()

    def seeded(tp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        assert type(tracker).__name__ == "CpuRNGStatesTracker"
        before = torch.get_rng_state()
        with tracker.fork():
            a = torch.rand(4)
        with tracker.fork():
            b = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before), "fork must restore the caller's RNG"
        return a, b

    a0, b0 = seeded(0)
    assert not torch.equal(a0, b0), "a second fork continues the tracked stream"
    a0_again, _ = seeded(0)
    a1, _ = seeded(1)
    assert torch.equal(a0, a0_again) and not torch.equal(a0, a1)  # per-TP-rank streams
    with tensor_parallel.get_cuda_rng_tracker().fork(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME):
        torch.rand(1)


def test_cpu_current_device_proxy(shims) -> None:
    from megatron.core.tensor_parallel import layers, mappings

    shims.apply_cpu_shims()
    assert mappings.torch.cuda.current_device() == torch.device("cpu")
    assert layers.torch.empty(2, device=layers.torch.cuda.current_device()).device.type == "cpu"
    assert mappings.torch.distributed is torch.distributed  # everything else is torch
    shims.remove_cpu_shims()
    assert mappings.torch is torch and layers.torch is torch


def test_shims_inactive_when_cuda_is_present(shims, monkeypatch) -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom

    original = mrandom.CudaRNGStatesTracker
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert shims.apply_cpu_shims() is False
    assert not shims.cpu_shims_active()
    assert mrandom.CudaRNGStatesTracker is original and mappings.torch is torch
