"""Pipeline parallelism: the model as DeepSpeed LayerSpecs, split into stages, run by its 1F1B
engine (`train_batch` / `eval_batch`). Megatron TP layers live inside each stage.

Stage contents, in order (each built only on the stage that owns it):
    Embedding                       -> (hidden, position_ids, doc_ids)
    Block x num_layers              -> (hidden, position_ids, doc_ids)
    OutputHead                      -> logits (untied) / normed hidden (tied)
    [tied] Embedding.logits         -> logits, through the first stage's embedding weight
With tied embeddings both ends are TiedLayerSpecs under one key: DeepSpeed keeps a copy of the
embedding on the first and last stage and all-reduces its gradient between them each step.

Split: 'layers' balances the count of Block modules per stage (partition_method='type:Block');
'parameters' balances parameter counts (DeepSpeed's 'parameters' method).

Rank order: DeepSpeed's PipeModelDataParallelTopology (axes pipe, data, model) gives
rank = pp*(DP*TP) + dp*TP + tp, as megatron-core does; check_pipeline_grid asserts it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zenlm.config.schema import RunConfig
from zenlm.config.validate import Layout
from zenlm.model.factory import LayerFactory
from zenlm.model.loss import mean_loss, next_token_accuracy, token_loss
from zenlm.model.transformer import Block, Embedding, OutputHead
from zenlm.parallel.dims import ParallelDims

TIED_KEY = "embed"


def _tied_logits(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    return embedding.logits(hidden)


def _contiguous(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Stage outputs as contiguous tensors: DeepSpeed sends them with torch.distributed's
    point-to-point calls, which refuse views. The Embedding's default position_ids are an
    expanded (stride-0) arange, contiguous only when the micro batch holds one sequence."""
    return tuple(t.contiguous() for t in outputs)


class PipelineLoss:
    """loss_fn of the PipelineModule: mean next-token loss (training) or, with `stats` set,
    the (loss sum, correct, counted) fp64 vector of a validation micro batch."""

    def __init__(self, factory: LayerFactory) -> None:
        self.factory = factory
        self.stats = False

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        # Training labels arrive as (labels, loss denominator) (zenlm.train.build.pipeline_batch).
        labels, denominator = labels if isinstance(labels, tuple | list) else (labels, None)
        if not self.stats:
            return mean_loss(self.factory, logits, labels, denominator)
        correct, counted = next_token_accuracy(self.factory, logits, labels)
        loss_sum = token_loss(self.factory, logits, labels).sum()
        return torch.stack([loss_sum.double(), correct.double(), counted.double()])


def layer_specs(cfg: RunConfig, factory: LayerFactory) -> list[Any]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    m = cfg.model
    specs: list[Any] = []
    if m.tie_word_embeddings:
        specs.append(TiedLayerSpec(TIED_KEY, Embedding, m, factory, tied_weight_attr="weight"))
    else:
        specs.append(LayerSpec(Embedding, m, factory))
    specs.append(_contiguous)  # a parameter-free step on the embedding's stage
    specs += [LayerSpec(Block, m, factory, i) for i in range(m.num_layers)]
    specs.append(LayerSpec(OutputHead, m, factory))
    if m.tie_word_embeddings:
        specs.append(
            TiedLayerSpec(
                TIED_KEY, Embedding, m, factory, forward_fn=_tied_logits, tied_weight_attr="weight"
            )
        )
    return specs


def build_pipeline_module(cfg: RunConfig, layout: Layout, factory: LayerFactory) -> nn.Module:
    """This rank's stage of the PipelineModule (only its own layers are constructed)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(
        num_pp=layout.pipeline_parallel_degree,
        num_mp=layout.tensor_parallel_degree,
        num_dp=layout.data_parallel_degree,
    )
    method = "type:Block" if cfg.parallel.pipeline_split == "layers" else "parameters"
    return PipelineModule(
        layers=layer_specs(cfg, factory),
        loss_fn=PipelineLoss(factory),
        topology=topology,
        partition_method=method,
        # zenlm applies activation checkpointing to the Blocks itself (same code at every PP).
        activation_checkpoint_interval=0,
    )


def local_blocks(module: nn.Module) -> list[Block]:
    return [m for m in module.modules() if isinstance(m, Block)]


def check_pipeline_grid(grid: Any, dims: ParallelDims) -> None:
    """DeepSpeed's pipeline grid (engine.grid) and megatron-core's groups must agree rank by rank:
    other axis orders run without error but train wrongly (notes/stack-probe.md)."""
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    ours = dims.coords(rank)
    theirs = (grid.get_stage_id(), grid.get_data_parallel_rank(), grid.get_slice_parallel_rank())
    megatron = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_data_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
    )
    if not ours == theirs == megatron:
        raise RuntimeError(
            f"rank {rank}: (pp, dp, tp) differ: zenlm {ours}, DeepSpeed grid {theirs}, "
            f"megatron {megatron}"
        )
    pairs = {
        "data": (grid.get_data_parallel_group(), ps.get_data_parallel_group()),
        "pipeline": (grid.get_pipe_parallel_group(), ps.get_pipeline_model_parallel_group()),
        "tensor": (grid.get_slice_parallel_group(), ps.get_tensor_model_parallel_group()),
    }
    for name, (ds_group, mc_group) in pairs.items():
        a, b = dist.get_process_group_ranks(ds_group), dist.get_process_group_ranks(mc_group)
        if a != b:
            raise RuntimeError(f"rank {rank}: {name} group: DeepSpeed {a} != megatron {b}")
