"""The tensor-parallel layer factory: megatron-core's TP layers behind zenlm's LayerFactory.

    initialize(ParallelDims(...))                       # zenlm.parallel.dims: megatron groups
    factory = build_factory(sequence_parallel=False)    # PlainFactory at TP 1, else Megatron
    model = Transformer(cfg, factory, seed=1234)

The model sees plain tensors: megatron's (output, bias) returns are unwrapped. Column linears do
no communication; each group of them is preceded by `enter_tp()` (megatron's
copy_to_tensor_model_parallel_region, or gather_from_sequence_parallel_region under SP), so q/k/v
share one collective and gate/up another. The model keeps activations as (b, s, h); megatron's
sequence-parallel mappings work on the first dimension, so SP transposes to (s, b, h) around them.

Parameters keep megatron's attributes (`tensor_model_parallel`, `partition_dim`): DeepSpeed's
grad norm counts a parameter once only if it carries tensor_model_parallel=True or the rank is
TP rank 0. megatron sets them only when it initializes weights itself; zenlm initializes full
weights (zenlm.model.init) and sets them here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core import tensor_parallel as mtp
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from zenlm.model.factory import (
    IGNORE_INDEX,
    LayerFactory,
    PlainFactory,
    pad_vocab_rows,
    vocab_rows,
)
from zenlm.parallel.cpu import apply_cpu_shims

__all__ = ["LayerFactory", "MegatronFactory", "PlainFactory", "build_factory"]


def _no_init(weight: torch.Tensor) -> None:
    """Weights are set by zenlm.model.init.init_weights from full, layout-independent tensors."""


def _mark_sharded(param: nn.Parameter, dim: int) -> None:
    if not hasattr(param, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)  # (b, s, h) <-> (s, b, h)


class ColumnLinear(mtp.ColumnParallelLinear):
    """(..., in) -> (..., out / tp); no communication (the caller entered the TP region)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class RowLinear(mtp.RowParallelLinear):
    """(b, s, in / tp) -> (b, s, out) all-reduced, or (b, s / tp, out) reduce-scattered (SP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.sequence_parallel:
            return _seq_first(super().forward(_seq_first(x).contiguous())[0])
        return super().forward(x)[0]


class VocabEmbedding(mtp.VocabParallelEmbedding):
    """ids (b, s) -> (b, s, h) all-reduced, or (b, s / tp, h) reduce-scattered (SP)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(ids)
        return _seq_first(out) if self.reduce_scatter_embeddings else out


class EnterTP(nn.Module):
    """Before column linears: copy (grad all-reduce), or SP all-gather (grad reduce-scatter)."""

    def __init__(self, sequence_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s_local, h) -> (b, s, h)
        if not self.sequence_parallel:
            return mtp.copy_to_tensor_model_parallel_region(x)
        gathered = mtp.gather_from_sequence_parallel_region(_seq_first(x).contiguous())
        return _seq_first(gathered)


class ReplicatedGradSync(nn.Module):
    """Identity on a TP-replicated weight whose backward sums its gradient over the TP group.

    Under SP each rank applies a norm to its own sequence shard, so its weight gradient is a
    partial sum; megatron all-reduces such grads in finalize_model_grads. Doing it in autograd
    (megatron's copy_to_tensor_model_parallel_region) needs no call from the engine and works
    the same under gradient accumulation, pipelining and activation checkpointing.
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return mtp.copy_to_tensor_model_parallel_region(weight)


class MegatronFactory:
    """TP > 1 with megatron-core layers; build after parallel_state.initialize_model_parallel."""

    def __init__(self, sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32):
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("initialize megatron's parallel_state (zenlm.parallel.dims) first")
        apply_cpu_shims()
        self.tp_degree = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        if sequence_parallel and self.tp_degree == 1:
            raise ValueError("sequence parallelism needs tensor_parallel_degree > 1 (it is 1)")
        self.sequence_parallel = sequence_parallel
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        common = dict(
            tensor_model_parallel_size=self.tp_degree,
            pipeline_model_parallel_size=pp,
            pipeline_dtype=params_dtype if pp > 1 else None,
            params_dtype=params_dtype,
            use_cpu_initialization=True,
            perform_initialization=False,
        )
        # Column linears never see SP: enter_tp gathers the sequence before them.
        self._column_config = ModelParallelConfig(**common, sequence_parallel=False)
        self._config = ModelParallelConfig(**common, sequence_parallel=sequence_parallel)

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    def column_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        module = ColumnLinear(
            in_features,
            out_features,
            config=self._column_config,
            init_method=_no_init,
            bias=bias,
            gather_output=False,
            disable_grad_reduce=True,  # enter_tp already reduces the input gradient
        )
        _mark_sharded(module.weight, 0)
        return module

    def row_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if bias and self.sequence_parallel:
            # Its gradient would be a per-shard partial sum (megatron reduces it in
            # finalize_model_grads); no Llama-family model has one, so refuse the combination.
            raise ValueError(
                "a bias on a row-parallel projection (o_proj / down_proj) is not supported with "
                "parallel.sequence_parallel_enabled: its gradient would be a per-sequence-shard "
                "partial sum; disable sequence parallelism or the bias"
            )
        module = RowLinear(
            in_features,
            out_features,
            config=self._config,
            init_method=_no_init,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        _mark_sharded(module.weight, 1)
        return module

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        module = VocabEmbedding(
            num_embeddings,
            embedding_dim,
            init_method=_no_init,
            reduce_scatter_embeddings=self.sequence_parallel,
            config=self._config,
        )
        _mark_sharded(module.weight, 0)
        return module

    def lm_head(self, hidden_size: int, vocab_size: int) -> nn.Module:
        return self.column_linear(hidden_size, vocab_size, bias=False)

    def enter_tp(self) -> nn.Module:
        return EnterTP(self.sequence_parallel)

    def replicated_grad_sync(self) -> nn.Module:
        return ReplicatedGradSync() if self.sequence_parallel else nn.Identity()

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(b, s, vocab / tp) logits, (b, s) labels -> (b, s) fp32 loss; 0 where labels == -100."""
        valid = labels != IGNORE_INDEX
        # megatron subtracts the max in place: give it its own fp32 copy of the logits.
        logits32 = logits.to(torch.float32, copy=True)
        loss = mtp.vocab_parallel_cross_entropy(logits32, labels.masked_fill(~valid, 0))
        return loss * valid

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """(b, s, vocab / tp) -> (b, s) global ids; ties resolve to the lowest id like argmax."""
        with torch.no_grad():
            local_max, local_idx = logits.float().max(dim=-1)
            global_max = local_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=self.tp_group)
            ids = local_idx + self.tp_rank * logits.shape[-1]
            no_id = torch.iinfo(ids.dtype).max
            ids = torch.where(local_max == global_max, ids, torch.full_like(ids, no_id))
            dist.all_reduce(ids, op=dist.ReduceOp.MIN, group=self.tp_group)
            return ids

    def full_shape(self, param: nn.Parameter) -> torch.Size:
        shape = list(param.shape)
        if getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= self.tp_degree
        rows = vocab_rows(param)
        if rows:
            shape[0] = rows
        return torch.Size(shape)

    def shard(self, full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """This rank's slice of a full (unpadded) tensor, shaped like `param`."""
        rows = vocab_rows(param)
        if rows:
            full = pad_vocab_rows(full, param.shape[0] * self.tp_degree)
        if not getattr(param, "tensor_model_parallel", False):
            return full
        return full.chunk(self.tp_degree, dim=param.partition_dim)[self.tp_rank]

    def gather(self, local: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """The full (unpadded) tensor from every rank's slice; a collective on the TP group."""
        if not getattr(param, "tensor_model_parallel", False):
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp_degree)]
        dist.all_gather(parts, local.contiguous(), group=self.tp_group)
        full = torch.cat(parts, dim=param.partition_dim)
        rows = vocab_rows(param)
        return full[:rows] if rows else full


def build_factory(
    sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32
) -> LayerFactory:
    """The factory for the current megatron parallel_state: plain at TP 1, megatron above."""
    tp = (
        parallel_state.get_tensor_model_parallel_world_size()
        if parallel_state.model_parallel_is_initialized()
        else 1
    )
    if tp == 1:
        if sequence_parallel:
            raise ValueError("sequence parallelism needs tensor_parallel_degree > 1 (it is 1)")
        return PlainFactory()
    return MegatronFactory(sequence_parallel=sequence_parallel, params_dtype=params_dtype)
