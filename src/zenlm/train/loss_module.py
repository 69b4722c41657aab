"""The module the DeepSpeed engine runs at pipeline degree 1: model + next-token loss.

forward(input_ids, labels, position_ids, doc_ids, loss_denominator) -> this micro batch's loss
sum / loss_denominator. The trainer sets the denominator from the step's global count of counted
tokens (zenlm.model.loss.mean_loss), so DeepSpeed's mean over micro batches and data-parallel
ranks is the token mean over the global batch, also when masks (SFT) make micro batches count
different numbers of tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from zenlm.model.factory import LayerFactory
from zenlm.model.loss import mean_loss, next_token_accuracy, token_loss


class CausalLMLoss(nn.Module):
    def __init__(self, model: nn.Module, factory: LayerFactory) -> None:
        super().__init__()
        self.model = model
        self.factory = factory

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        return_stats: bool = False,
        loss_denominator: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = self.model(input_ids, position_ids, doc_ids)  # (b, s, local vocab)
        if not return_stats:
            return mean_loss(self.factory, logits, labels, loss_denominator)
        # Validation: (loss sum, correct, counted) as one fp64 tensor (3,) for a single all-reduce.
        correct, counted = next_token_accuracy(self.factory, logits, labels)
        loss_sum = token_loss(self.factory, logits, labels).sum()
        return torch.stack([loss_sum.double(), correct.double(), counted.double()])
