"""Next-token loss and accuracy over (possibly vocab-parallel) logits, through the factory.

At TP = 1 these are F.cross_entropy and argmax; at TP > 1 megatron's vocab_parallel_cross_entropy
and an argmax over the vocab shards (zenlm.parallel.tensor.MegatronFactory). Labels equal to
IGNORE_INDEX (-100) count neither in the loss nor in the accuracy.
"""

from __future__ import annotations

import torch

from zenlm.model.factory import IGNORE_INDEX, LayerFactory


def token_loss(factory: LayerFactory, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (b, s, local vocab), labels (b, s) -> per-token fp32 loss (b, s), 0 where ignored."""
    return factory.cross_entropy(logits, labels)


def mean_loss(factory: LayerFactory, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss over the tokens whose label is not IGNORE_INDEX (0-dim fp32)."""
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return factory.cross_entropy(logits, labels).sum() / count


def next_token_accuracy(
    factory: LayerFactory, logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) token counts; a collective over the TP group at TP > 1."""
    with torch.no_grad():
        predicted = factory.argmax(logits)  # (b, s) global token ids
        valid = labels != IGNORE_INDEX
        return ((predicted == labels) & valid).sum(), valid.sum()
