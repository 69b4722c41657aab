"""The layer factory interface the model is built against, and its single-device implementation.

The model never imports megatron: it asks a factory for its linear layers, embedding, loss and
the few tensor-parallel hooks, so parallelism is applied from outside (zenlm.parallel.tensor
provides MegatronFactory for TP > 1 and re-exports these names).

Contract of the modules a factory returns (all take and return plain tensors):
- `enter_tp()`: applied once before a group of column linears (q/k/v, gate/up, lm head).
  TP: identity forward, all-reduce of the gradient; SP: all-gather of the sequence shards forward,
  reduce-scatter backward. Column linears themselves do no communication.
- `column_linear(in, out)`: (..., in) -> (..., out / tp), rows of the full weight split by rank.
- `row_linear(in, out)`: (b, s, in / tp) -> (b, s, out) summed over the TP group
  (SP: (b, s / tp, out), reduce-scattered along the sequence).
- `embedding(vocab, h)`: ids (b, s) -> (b, s, h) (SP: (b, s / tp, h)); rows split by rank.
- `replicated_grad_sync()`: wraps the weight of a TP-replicated norm. Identity, except under SP,
  where each rank sees only its sequence shard: the backward sums the weight's gradient over the
  TP group, so no call after backward is needed.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""Labels equal to this contribute zero loss (and count as neither right nor wrong)."""


def mark_vocab_param(param: nn.Parameter, vocab_size: int) -> nn.Parameter:
    """Tag a padded (vocab, h) weight with the real vocabulary size: full states hold only the
    first `vocab_size` rows; padded rows are zero and never predicted."""
    param.zenlm_vocab = vocab_size
    return param


def vocab_rows(param: nn.Parameter) -> int | None:
    """The real vocabulary size of a weight tagged by mark_vocab_param, else None."""
    return getattr(param, "zenlm_vocab", None)


class LayerFactory(Protocol):
    """What the model needs from a parallelism backend."""

    tp_degree: int
    tp_rank: int
    sequence_parallel: bool

    def column_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module: ...
    def row_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module: ...
    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module: ...
    def lm_head(self, hidden_size: int, vocab_size: int) -> nn.Module: ...
    def enter_tp(self) -> nn.Module: ...
    def replicated_grad_sync(self) -> nn.Module: ...
    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...
    def argmax(self, logits: torch.Tensor) -> torch.Tensor: ...
    def full_shape(self, param: nn.Parameter) -> torch.Size: ...
    def shard(self, full: torch.Tensor, param: nn.Parameter) -> torch.Tensor: ...
    def gather(self, local: torch.Tensor, param: nn.Parameter) -> torch.Tensor: ...


def pad_vocab_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """(vocab, h) -> (rows, h) with zero rows appended; rows beyond the vocabulary stay zero."""
    if full.shape[0] > rows:
        raise ValueError(f"vocab weight has {full.shape[0]} rows, more than the padded {rows}")
    pad = full.new_zeros(rows - full.shape[0], *full.shape[1:])
    return torch.cat([full, pad], dim=0)


class PlainFactory:
    """TP = 1: torch layers, F.cross_entropy, no communication."""

    tp_degree = 1
    tp_rank = 0
    sequence_parallel = False

    def column_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row_linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        return nn.Embedding(num_embeddings, embedding_dim)

    def lm_head(self, hidden_size: int, vocab_size: int) -> nn.Module:
        return nn.Linear(hidden_size, vocab_size, bias=False)

    def enter_tp(self) -> nn.Module:
        return nn.Identity()

    def replicated_grad_sync(self) -> nn.Module:
        return nn.Identity()

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(b, s, vocab) logits, (b, s) labels -> (b, s) fp32 loss; 0 where labels == -100."""
        flat = logits.float().reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(
            flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        )
        return loss.view(labels.shape)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """(b, s, vocab) -> (b, s) predicted token ids."""
        return logits.argmax(dim=-1)

    def full_shape(self, param: nn.Parameter) -> torch.Size:
        rows = vocab_rows(param)
        return torch.Size([rows, *param.shape[1:]]) if rows else param.shape

    def shard(self, full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        return pad_vocab_rows(full, param.shape[0]) if vocab_rows(param) else full

    def gather(self, local: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        rows = vocab_rows(param)
        return local[:rows] if rows else local
