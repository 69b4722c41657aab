"""Bytes of parameters, gradients and optimizer states on one rank, as zenlm's engine allocates them.

zenlm passes torch AdamW to deepspeed.initialize (zenlm.parallel.engine); which DeepSpeed
optimizer wraps it follows from precision and the effective ZeRO stage (DeepSpeed 0.19
engine._do_optimizer_sanity_check):

| precision | stage | wrapper | what lives on the rank (N = elements of a group, A = N aligned up to 2·DP, P = A / DP) |
| --- | --- | --- | --- |
| fp32 | 0 | none (torch AdamW) | params 4N, grads 4N, exp_avg + exp_avg_sq 8N |
| fp16 | 0 | FP16_UnfusedOptimizer | params 2N, grads 2N, fp32 masters 4N + moments 8N |
| bf16 | 1 | BF16_Optimizer | flat params 2A; grads: per-tensor bf16 2N + flat fp32 accumulator 4A (not partitioned); fp32 master 4P + moments 8P |
| any | 1, 2 | DeepSpeedZeroOptimizer | flat params e·A; fp32 master 4P + moments 8P; grads: bf16 (fp32 accumulation) a compact fp32 partition 4P; fp32 / fp16 `grads_in_partition`, e x every tensor that overlaps the rank's partition, whole |

(bf16 at stage 0 is refused by the validator; fp32 at DP 1 runs stage 0 whatever is asked,
zenlm.parallel.engine.effective_zero_stage.) torch AdamW also keeps one 4-byte `step` tensor per
tensor it updates (the flat partition, under a wrapper).

Counted as `buffers` (transient, not in the three categories; their peak is added to the total):
DeepSpeed's gradient bucket during backward at ZeRO 1/2 (`reduce_bucket_size` = 5e8 elements,
allocated whole whatever the model size), the flat all-reduce copy at ZeRO 0 / BF16_Optimizer
(up to 5e8 elements), and the step's per-group flat gradient partition. Not counted: CUDA
context, NCCL buffers, allocator fragmentation (the planner's `reserve` covers them).
"""

from __future__ import annotations

from dataclasses import dataclass

from zenlm.plan.shapes import StageParams

BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default reduce_bucket_size and allreduce bucket (elements)."""

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class StateBytes:
    """Bytes per rank of the model states (and the transient buffers of the update)."""

    params: int
    grads: int
    optimizer: int
    buffers: int
    path: str
    """Which optimizer path: torch, fp16_unfused, bf16_optimizer, zero."""

    @property
    def static(self) -> int:
        return self.params + self.grads + self.optimizer


def optimizer_path(precision: str, zero_stage: int) -> str:
    """The DeepSpeed wrapper zenlm's config selects (see the module docstring)."""
    if zero_stage == 0:
        if precision == "bf16":
            raise ValueError("bf16 needs ZeRO stage >= 1 (the validator refuses stage 0)")
        return "torch" if precision == "fp32" else "fp16_unfused"
    if zero_stage == 3:
        raise ValueError("ZeRO stage 3 is not modelled by the planner")
    if precision == "bf16" and zero_stage == 1:
        return "bf16_optimizer"
    return "zero"


def aligned(numel: int, dp: int) -> int:
    """DeepSpeed pads each flat group to a multiple of 2 x DP elements (4-byte aligned partitions)."""
    alignment = 2 * dp
    return -(-numel // alignment) * alignment


def partition_overlap_numel(group: list[int], dp: int) -> list[int]:
    """Per DP rank: elements of the tensors of `group` that overlap that rank's partition, each
    counted whole (DeepSpeed's get_partition_info -> grads_in_partition at fp32 / fp16).

    A tensor at [start, start + n) belongs to every partition it intersects: it starts inside
    it, or straddles its start. Difference array over partitions: O(tensors + dp).
    """
    part = aligned(sum(group), dp) // dp
    diff = [0] * (dp + 1)
    offset = 0
    for n in group:
        first, last = offset // part, (offset + n - 1) // part
        diff[first] += n
        diff[last + 1] -= n
        offset += n
    out, running = [], 0
    for r in range(dp):
        running += diff[r]
        out.append(running)
    return out


def state_bytes(
    stage: StageParams,
    precision: str,
    zero_stage: int,
    dp: int,
    dp_rank: int | None = None,
) -> StateBytes:
    """Model-state bytes of one rank holding `stage`, for the effective ZeRO stage.

    dp_rank=None gives the largest over the DP ranks (ranks differ only where a tensor straddles
    a partition boundary, and by the last partition's padding, which is counted as allocated).
    A PipelineEngine rank allocates the same gradient bucket (in reduce_gradients).
    """
    e = DTYPE_BYTES[precision]
    groups = stage.groups()
    n_total = sum(sum(g) for g in groups)
    n_tensors = sum(len(g) for g in groups)
    path = optimizer_path(precision, zero_stage)
    if path == "torch":
        bucket = 4 * min(BUCKET_ELEMENTS, n_total) if dp > 1 else 0
        return StateBytes(4 * n_total, 4 * n_total, 8 * n_total + 4 * n_tensors, bucket, path)
    if path == "fp16_unfused":
        # fp32 gradients are made for one group at a time inside step(); the fp16 ones persist.
        step_grads = 4 * max(sum(g) for g in groups)
        bucket = 2 * min(BUCKET_ELEMENTS, n_total) if dp > 1 else 0
        return StateBytes(
            2 * n_total, 2 * n_total, 12 * n_total + 4 * n_tensors, bucket + step_grads, path
        )
    flat = [aligned(sum(g), dp) for g in groups]
    part = [a // dp for a in flat]
    optimizer = sum(12 * p + 4 for p in part)  # fp32 master partition + exp_avg + exp_avg_sq + step
    if path == "bf16_optimizer":
        grads = 2 * n_total + 4 * sum(flat)  # bf16 .grad per tensor + the full fp32 accumulator
        bucket = 4 * min(BUCKET_ELEMENTS, sum(flat)) if dp > 1 else 0
        return StateBytes(2 * sum(flat), grads, optimizer, bucket, path)
    # DeepSpeedZeroOptimizer (stage 1 or 2).
    compact = precision == "bf16"  # zenlm sets grad_accum_dtype fp32 for bf16 only
    if compact:
        grads = 4 * sum(part)
    else:
        per_rank = [0] * dp
        for g in groups:
            for r, n in enumerate(partition_overlap_numel(g, dp)):
                per_rank[r] += n
        grads = e * (max(per_rank) if dp_rank is None else per_rank[dp_rank])
    # Transient: the gradient bucket (whole 5e8 elements, model dtype) during backward, and in
    # step() one group's flat gradient partition (plus its fp32 copy when e != 4).
    step_copy = max(part) * (e + (4 if e != 4 else 0))
    buffers = e * BUCKET_ELEMENTS + step_copy
    return StateBytes(e * sum(flat), grads, optimizer, buffers, path)
