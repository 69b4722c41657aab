"""Parallel degrees -> megatron-core process groups, with the rank order checked.

    dims = ParallelDims(world_size=8, tp=2, pp=2)      # dp derived: 2
    initialize(dims)                                   # after torch.distributed is up

Rank order: rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank. megatron-core's default order
('tp-cp-ep-dp-pp') and DeepSpeed's pipeline topology (axes pipe, data, model) both produce it;
other orders run without error but train wrongly (notes/stack-probe.md), so initialize() asserts
each rank's coordinates and group members against this formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from zenlm.model.config import ModelConfig


@dataclass(frozen=True)
class ParallelDims:
    """world_size = tp x pp x dp; dp = 0 means world_size // (tp x pp)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int = 0

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        model = self.tp * self.pp
        if self.world_size % model:
            raise ValueError(
                f"world_size ({self.world_size}) is not divisible by tensor_parallel_degree "
                f"({self.tp}) x pipeline_parallel_degree ({self.pp}) = {model}"
            )
        if self.dp == 0:
            object.__setattr__(self, "dp", self.world_size // model)
        elif self.tp * self.pp * self.dp != self.world_size:
            raise ValueError(
                f"tensor_parallel_degree ({self.tp}) x pipeline_parallel_degree ({self.pp}) x "
                f"data_parallel_degree ({self.dp}) = {model * self.dp} != world_size "
                f"({self.world_size})"
            )

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank

    def tp_group_ranks(self, rank: int) -> list[int]:
        pp, dp, _ = self.coords(rank)
        return [self.rank_of(pp, dp, t) for t in range(self.tp)]

    def dp_group_ranks(self, rank: int) -> list[int]:
        pp, _, tp = self.coords(rank)
        return [self.rank_of(pp, d, tp) for d in range(self.dp)]

    def pp_group_ranks(self, rank: int) -> list[int]:
        _, dp, tp = self.coords(rank)
        return [self.rank_of(p, dp, tp) for p in range(self.pp)]


def validate_model_for_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError naming the numbers if cfg cannot be split over `tp` ranks.

    Key/value heads are split, not replicated (as in megatron-core): num_kv_heads must be
    divisible by tp, so multi-query attention (1 kv head) runs only at tp = 1.
    """
    from zenlm.model.transformer import check_model_config

    check_model_config(cfg, tp)


def initialize(dims: ParallelDims, seed: int | None = None) -> ParallelDims:
    """Create megatron-core's groups for dims, check the rank order; optionally seed its RNG
    tracker (megatron's model_parallel_cuda_manual_seed, CPU-shimmed without CUDA)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from zenlm.parallel.cpu import apply_cpu_shims

    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized (deepspeed.init_distributed first)"
        )
    if dist.get_world_size() != dims.world_size:
        raise ValueError(
            f"world_size ({dist.get_world_size()}) != ParallelDims.world_size ({dims.world_size})"
        )
    apply_cpu_shims()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        # megatron's extra gloo copies serve its distributed optimizer / checkpointing, which
        # zenlm does not use; on CPU they would duplicate every group (3 gloo threads each).
        create_gloo_process_groups=False,
    )
    check_rank_order(dims)
    if seed is not None:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dims


def check_rank_order(dims: ParallelDims) -> None:
    """Assert megatron's coordinates and groups for this rank equal dims' formula."""
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    expected = dims.coords(rank)
    got = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_data_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
    )
    if got != expected:
        raise RuntimeError(f"rank {rank}: megatron (pp, dp, tp) = {got}, expected {expected}")
    groups = {
        "tensor": (ps.get_tensor_model_parallel_group(), dims.tp_group_ranks(rank)),
        "data": (ps.get_data_parallel_group(), dims.dp_group_ranks(rank)),
        "pipeline": (ps.get_pipeline_model_parallel_group(), dims.pp_group_ranks(rank)),
    }
    for name, (group, ranks) in groups.items():
        members = dist.get_process_group_ranks(group)
        if members != ranks:
            raise RuntimeError(f"rank {rank}: megatron {name} group {members}, expected {ranks}")


def destroy() -> None:
    """Tear down megatron's groups (the torch.distributed default group stays)."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


def release_process_groups() -> None:
    """Destroy every process group but the default one and drop megatron's and DeepSpeed's
    references to them.

    For processes that build one layout after another (tests, benchmarks): neither megatron's
    destroy_model_parallel nor a discarded DeepSpeed engine destroys its groups, and each gloo
    group keeps three threads alive, two of them polling (measured: 1,097 threads per rank and a
    load average over 100 after 14 layouts at world size 8). deepspeed.comm's destroy also clears
    DeepSpeed's cached group references.
    """
    import deepspeed.comm as ds_comm
    from megatron.core import parallel_state as ps
    from torch.distributed.distributed_c10d import _world

    ps.destroy_model_parallel()
    for group in list(_world.pg_map):
        if group is not dist.GroupMember.WORLD:
            ds_comm.destroy_process_group(group)
