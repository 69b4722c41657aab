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


def mean_loss(
    factory: LayerFactory,
    logits: torch.Tensor,
    labels: torch.Tensor,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss sum over the tokens whose label is not IGNORE_INDEX, divided by `denominator`
    (default: their count, the micro batch's token mean). 0-dim fp32.

    The trainer passes denominator = (counted tokens of the whole step, all micro batches and
    data-parallel ranks) / (micro batches x DP ranks): after the engine's mean over micro batches
    and ranks, the step's loss is the mean over every counted token of the global batch, the
    same at any layout even when micro batches count different numbers of tokens (SFT masks).
    With no masked labels it equals the micro batch's count, so pre-training is unchanged."""
    if denominator is None:
        denominator = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return factory.cross_entropy(logits, labels).sum() / denominator


def next_token_accuracy(
    factory: LayerFactory, logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) token counts; a collective over the TP group at TP > 1."""
    with torch.no_grad():
        predicted = factory.argmax(logits)  # (b, s) global token ids
        valid = labels != IGNORE_INDEX
        return ((predicted == labels) & valid).sum(), valid.sum()
