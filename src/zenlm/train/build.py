"""Assemble a run from its config: process groups, model, engine, data. One function each.

The order matters and is fixed here (it was measured, see notes/stack-probe.md):
  1. torch.distributed via deepspeed.init_distributed (zenlm.runtime.env)
  2. megatron-core parallel_state groups, rank order asserted (zenlm.parallel.dims)
  3. the model from a layer factory, weights initialised from full tensors (same at any TP)
  4. activation checkpointing (wraps forwards in place; names unchanged)
  5. torch.compile of each block (runtime.compile_enabled; in place, names unchanged)
  6. DeepSpeed initialize (ZeRO / precision / accumulation / clipping)

Steps 3-6 are torchtitan's parallelize order (TP -> activation checkpointing -> compile ->
data parallel), for the same reasons: the TP layers are what compile traces, their collectives
included (megatron's autograd functions trace without a graph break); compile after
checkpointing, so the checkpoint wrappers are traced too and the recompute runs inside the
compiled backward (zenlm.parallel.compile); the engine last: ZeRO 1/2 hook gradients and wrap
the optimizer, outside the compiled graphs. (ZeRO-3's forward hooks would break every block's
graph: config validation refuses compile with it.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zenlm.config.schema import RunConfig
from zenlm.config.validate import Layout, check_compile_supported
from zenlm.model.factory import LayerFactory
from zenlm.model.init import init_weights
from zenlm.model.transformer import Transformer
from zenlm.parallel.checkpointing import apply_activation_checkpointing
from zenlm.parallel.compile import apply_compile
from zenlm.parallel.dims import ParallelDims, initialize
from zenlm.parallel.engine import build_engine
from zenlm.parallel.pipeline import build_pipeline_module, check_pipeline_grid, local_blocks
from zenlm.parallel.tensor import build_factory
from zenlm.train.loss_module import CausalLMLoss


def build_parallel(cfg: RunConfig, layout: Layout) -> ParallelDims:
    dims = ParallelDims(
        world_size=layout.world_size,
        tp=layout.tensor_parallel_degree,
        pp=layout.pipeline_parallel_degree,
        dp=layout.data_parallel_degree,
    )
    return initialize(dims, seed=cfg.runtime.seed)


def build_model(cfg: RunConfig, init: bool = True) -> tuple[nn.Module, LayerFactory]:
    """The full (PP = 1) model on this rank's TP shard, initialised identically at every TP
    (init=False: left as constructed, for weights that a checkpoint load overwrites)."""
    factory = build_factory(sequence_parallel=cfg.parallel.sequence_parallel_enabled)
    model = Transformer(cfg.model, factory, seed=cfg.runtime.seed if init else None)
    apply_block_transforms(list(model.layers), cfg)
    return model, factory


def apply_block_transforms(blocks: list[nn.Module], cfg: RunConfig) -> None:
    """Activation checkpointing, then torch.compile, on this rank's blocks (order: see top).

    The compile probe runs first, so a host where inductor cannot build kernels stops here
    with one ConfigError line, not with an inductor traceback inside the first step."""
    if cfg.runtime.compile_enabled:
        check_compile_supported()
    apply_activation_checkpointing(blocks, cfg.runtime.activation_checkpointing)
    if cfg.runtime.compile_enabled:
        apply_compile(blocks)


def build_training_engine(
    cfg: RunConfig, layout: Layout, dims: ParallelDims, init: bool = True
) -> tuple[Any, LayerFactory]:
    """DeepSpeed's plain engine over model + loss at PP = 1; its PipelineEngine at PP > 1.

    init=False skips zenlm's seeded init (a full tensor per parameter on every rank, the
    slow part at scale) when a checkpoint will be loaded before step 1."""
    if layout.pipeline_parallel_degree == 1:
        model, factory = build_model(cfg, init)
        return build_engine(CausalLMLoss(model, factory), cfg, layout), factory
    factory = build_factory(sequence_parallel=cfg.parallel.sequence_parallel_enabled)
    module = build_pipeline_module(cfg, layout, factory)
    if init:
        init_weights(module, cfg.model, factory, seed=cfg.runtime.seed)
    # PipelineModule calls each built layer as a module (layer(x)), so a block compiled in
    # place runs compiled inside its stage; the Embedding and OutputHead stages stay eager.
    apply_block_transforms(local_blocks(module), cfg)
    engine = build_engine(module, cfg, layout)
    check_pipeline_grid(engine.grid, dims)
    return engine, factory


def pipeline_batch(
    batch: dict[str, torch.Tensor],
    document_masking: bool,
    loss_denominator: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, ...], Any]:
    """The loader's batch -> DeepSpeed pipeline's (inputs, labels): inputs feed the first stage,
    labels the loss on the last ((labels, loss_denominator) when a denominator is given)."""
    inputs = model_inputs(batch, document_masking)
    first = (inputs["input_ids"],)
    if document_masking:
        first += (inputs["position_ids"], inputs["doc_ids"])
    if loss_denominator is None:
        return first, inputs["labels"]
    return first, (inputs["labels"], loss_denominator)


def model_inputs(
    batch: dict[str, torch.Tensor],
    document_masking: bool,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The loader's batch -> the loss module's keyword inputs, on `device` when given.

    Without document masking the model uses positions 0..s-1 across packed documents (as Llama
    pre-training does); with it, positions restart and attention stays inside each document.
    DeepSpeed's plain engine does not move inputs; its pipeline engine does (device=None there).
    """
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    if document_masking:
        inputs["position_ids"] = batch["position_ids"]
        inputs["doc_ids"] = batch["doc_ids"]
    if device is not None:
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs
