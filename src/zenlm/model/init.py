"""Deterministic, layout-independent weights: init, and full (unsharded) state export/import.

Every parameter has a canonical name (its name in a single-device Transformer, e.g.
"layers.3.attention.q_proj.weight"): stage modules carry a `canonical_prefix`, so the names are
the same for a whole Transformer, a lone stage, or stages inside a pipeline wrapper.

init_weights builds each FULL tensor on CPU from a generator seeded by (seed, canonical name) and
copies this rank's shard into the local parameter (factory.shard). So a TP = N model holds
exactly the shards of the TP = 1 model with the same seed, and pipeline stages built apart agree.
Rules: normal(0, init_std) for weights; attention o_proj and MLP down_proj scaled by
1 / sqrt(2 num_layers); norms 1; biases 0; vocabulary rows beyond vocab_size 0.

Full states hold only the real vocabulary rows, so they are the same at every TP degree.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
from torch import nn

from zenlm.model.config import ModelConfig
from zenlm.model.factory import LayerFactory

_SCALED = ("attention.o_proj.weight", "mlp.down_proj.weight")


def canonical_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(canonical name, parameter) for every stage module (Embedding, Block, OutputHead) inside.

    A name can repeat with distinct parameters: a tied embedding's copy on the last pipeline
    stage has the first stage's name (both get the same init; export takes the first).
    """
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        prefix = getattr(m, "canonical_prefix", None)
        if prefix is None:
            for child in m.children():
                visit(child)
            return
        for name, p in m.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append((prefix + name, p))

    visit(module)
    if not out:
        raise ValueError(f"{type(module).__name__} holds no zenlm stage modules")
    return out


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, canonical name); stable across processes (unlike hash())."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init_tensor(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The full fp32 CPU tensor a parameter named `name` starts from."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = cfg.init_std
    if name.endswith(_SCALED):
        std /= math.sqrt(2 * cfg.num_layers)
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_weights(module: nn.Module, cfg: ModelConfig, factory: LayerFactory, seed: int) -> None:
    """Initialize every stage parameter in `module` from its full, seeded tensor."""
    for name, p in canonical_named_parameters(module):
        full = full_init_tensor(name, factory.full_shape(p), cfg, seed)
        p.copy_(factory.shard(full, p))


@torch.no_grad()
def full_state_dict(
    module: nn.Module, factory: LayerFactory, grads: bool = False
) -> dict[str, torch.Tensor]:
    """{canonical name: full CPU tensor} of the parameters (or their grads; None grads -> 0).

    A collective over the TP group at TP > 1: every TP rank must call it.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in canonical_named_parameters(module):
        if name in out:
            continue
        local = p if not grads else (p.grad if p.grad is not None else torch.zeros_like(p))
        out[name] = factory.gather(local.detach(), p).cpu().clone()
    return out


@torch.no_grad()
def load_full_state_dict(
    module: nn.Module, factory: LayerFactory, state: Mapping[str, torch.Tensor]
) -> None:
    """Copy full tensors into the (possibly sharded) parameters; strict about names and shapes."""
    params = canonical_named_parameters(module)
    missing = sorted({name for name, _ in params} - set(state))
    if missing:
        raise KeyError(f"full state lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, p in params:
        full = state[name]
        if full.shape != factory.full_shape(p):
            raise ValueError(
                f"{name}: full shape {tuple(full.shape)} != expected {tuple(factory.full_shape(p))}"
            )
        p.copy_(factory.shard(full.to(p.dtype), p))
