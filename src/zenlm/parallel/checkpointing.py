"""Activation checkpointing applied from outside the model (the model file knows nothing of it).

'full'      recompute each transformer Block in backward (stores only block inputs)
'selective' recompute only each block's attention core (SDPA: the (b, heads, s, s)-sized work
            whose activations dominate at long sequence lengths; the matmuls' outputs are kept)

The module's forward is wrapped in place, so parameter names (and checkpoints) do not change.
torch.utils.checkpoint with use_reentrant=False restores the RNG state on recompute and supports
inputs that do not require grad.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

from torch import nn
from torch.utils.checkpoint import checkpoint


def _wrap(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed


def apply_activation_checkpointing(
    blocks: list[nn.Module], mode: Literal["none", "full", "selective"]
) -> int:
    """Wrap each block (full) or each block's `attention.core` (selective); return how many."""
    if mode == "none":
        return 0
    targets = list(blocks) if mode == "full" else [b.attention.core for b in blocks]
    for module in targets:
        if getattr(module, "_zenlm_checkpointed", False):
            continue
        module.forward = _wrap(module.forward)
        module._zenlm_checkpointed = True
    return len(targets)
