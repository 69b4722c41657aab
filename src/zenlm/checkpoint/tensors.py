"""Full (layout-independent) fp32 weights and AdamW moments out of, and into, a DeepSpeed engine.

Every parameter is addressed by its canonical name (zenlm.model.init). For one parameter:

    local  = this TP rank's shard, complete over DP    (DeepSpeed's safe_get_full_* helpers
                                                        all-reduce/all-gather ZeRO 1/2/3 fragments)
    full   = factory.gather(local)                     (all-gather over TP, padded vocab rows cut)

and on load the reverse: shard the full tensor for this TP rank, then write it into the fp32
master fragment (safe_set_full_*) and into the model's own (low-precision or ZeRO-3 partitioned)
parameter. ZeRO-0 in fp32 has no wrapper: the parameter and torch AdamW's state are used directly.

Which paths are covered: fp32 with ZeRO 0-3 (plain and pipeline engine), bf16 with ZeRO 0-3 and
fp16 with ZeRO 1-3 (all keep an `_hp_mapping` or ZeRO-3 partition per parameter). fp16 with
ZeRO-0 (DeepSpeed's FP16_Optimizer) keeps flat fp32 groups without a per-parameter mapping and
is refused with a clear error.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zenlm.checkpoint.io import CheckpointError
from zenlm.model.factory import pad_vocab_rows, vocab_rows

MOMENTS = ("exp_avg", "exp_avg_sq")


def torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The client torch AdamW inside DeepSpeed's wrapper (or the engine's optimizer itself)."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def _is_mapped(p: nn.Parameter) -> bool:
    """True when DeepSpeed keeps this parameter's fp32 master copy in a ZeRO/bf16 wrapper."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def check_supported(engine: Any, params: list[tuple[str, nn.Parameter]]) -> None:
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        return  # ZeRO-0 fp32: the torch optimizer holds the parameters themselves
    unmapped = [n for n, p in params if not _is_mapped(p)]
    if unmapped:
        # Seen with fp16 at zero_stage=0 (DeepSpeed's FP16_Optimizer keeps no per-parameter
        # mapping) and with empty (0-element) parameters, which ZeRO does not map.
        raise CheckpointError(
            f"cannot checkpoint {len(unmapped)} of {len(params)} parameters (e.g. {unmapped[0]}): "
            f"{type(engine.optimizer).__name__} keeps no fp32 master mapping for them"
        )


def local_shape(p: nn.Parameter) -> torch.Size:
    """The TP-local shape (ZeRO-3 replaces p.data by a partition and keeps the shape in ds_shape)."""
    return torch.Size(p.ds_shape) if hasattr(p, "ds_id") else p.shape


def full_shape(p: nn.Parameter, tp_degree: int) -> torch.Size:
    shape = list(local_shape(p))
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp_degree
    rows = vocab_rows(p)
    if rows:
        shape[0] = rows
    return torch.Size(shape)


def shard(full: torch.Tensor, p: nn.Parameter, tp_degree: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor, shaped like the TP-local parameter."""
    sharded = getattr(p, "tensor_model_parallel", False)
    rows = local_shape(p)[0] * (tp_degree if sharded else 1)
    if vocab_rows(p) and full.shape[0] != rows:
        full = pad_vocab_rows(full, rows)
    if sharded:
        full = full.chunk(tp_degree, dim=p.partition_dim)[tp_rank]
    return full.contiguous()


def ensure_optimizer_state(engine: Any) -> None:
    """Create AdamW's state (step 0, zero moments) where the first step has not yet done so.

    DeepSpeed's wrappers create and link the per-parameter views of the optimizer state lazily
    at the first step; a load into a fresh engine (or a save before the first step) needs them
    now. The tensors are exactly what torch AdamW's lazy init would create.
    """
    inner = torch_optimizer(engine)
    # ZeRO-3 puts each flat fp32 sub-group into its param group only while stepping it.
    flat = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    for p in [q for g in inner.param_groups for q in g["params"]] + flat:
        state = inner.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            for key in MOMENTS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    wrapper = engine.optimizer
    link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        # ZeRO 1/2 and bf16: point each parameter's fragment at the state tensors. DeepSpeed
        # links once, right after the first group's step, so groups stepped later (our no-decay
        # group) stay unlinked; relinking now that every group has state fixes that.
        wrapper._hp_optimizer_states_linked = False
        link()


def adam_step(engine: Any) -> int:
    """AdamW's step counter (every tensor is updated every step, so all counters agree)."""
    inner = torch_optimizer(engine)
    steps = {float(s["step"]) for s in inner.state.values() if "step" in s}
    if len(steps) > 1:
        raise CheckpointError(f"AdamW step counters differ across tensors: {sorted(steps)}")
    return int(steps.pop()) if steps else 0


def set_adam_step(engine: Any, step: int) -> None:
    inner = torch_optimizer(engine)
    for state in inner.state.values():
        state["step"] = torch.tensor(float(step))


def get_local(engine: Any, p: nn.Parameter, key: str | None) -> torch.Tensor:
    """fp32 master weight (key None) or AdamW moment of p: TP-local, complete over DP.

    A collective over the DP group for ZeRO-wrapped parameters: all DP ranks call it in order.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None and not hasattr(p, "ds_id") and dist.get_world_size(p._dp_group) == 1:
        # One DP rank holds the whole fp32 fragment: a view, no all-reduce into a fresh buffer.
        # Callers only read it before training resumes.
        return mapping.get_hp_fragment(key).view(local_shape(p)).float()
    if _is_mapped(p):
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return t.reshape(local_shape(p)).float()
    if key is None:
        return p.detach().float()
    return torch_optimizer(engine).state[p][key].float()


@torch.no_grad()
def set_local(engine: Any, p: nn.Parameter, key: str | None, value: torch.Tensor) -> None:
    """Inverse of get_local for this rank's part. Weights also go into the model parameter."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if key is not None:
        if _is_mapped(p):
            safe_set_full_optimizer_state(p, value, key)
        else:
            torch_optimizer(engine).state[p][key].copy_(value)
        return
    if _is_mapped(p):
        safe_set_full_fp32_param(p, value)
    if hasattr(p, "ds_id"):
        import deepspeed

        # ZeRO-3: the model's parameter is partitioned; gather, overwrite, re-partition. Every DP
        # rank holds the same value, so DP rank 0's copy is the one broadcast.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.dtype))
    else:
        p.data.copy_(value.to(p.dtype))
