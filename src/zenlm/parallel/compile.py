"""torch.compile applied from outside the model, one transformer block at a time.

Each Block is compiled in place (`nn.Module.compile`: the module keeps its class and its
parameter names, so checkpoints, DeepSpeed's PipelineModule and `local_blocks` see the same
Block). Per-block rather than whole-model compile, as torchtitan does: the blocks share one
graph (parameters are graph inputs), so a 16-layer model compiles one block's forward and
backward, and the embedding, the vocab-parallel head and the loss stay eager.

Compile traces whatever the block's forward is at its first call, so it is applied after
activation checkpointing (zenlm.train.build has the order): dynamo captures
torch.utils.checkpoint as a higher-order op, and the recompute of a checkpointed region happens
inside the compiled backward.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

BACKEND = "inductor"
"""The torch.compile backend. Runs always use inductor; tools/bench/gpu.py --smoke sets
"aot_eager" (dynamo and AOT autograd without code generation) to test its own code paths in
seconds on CPU."""


def apply_compile(blocks: Iterable[nn.Module]) -> int:
    """torch.compile each block in place; return how many.

    dynamic=False: a training run has one micro-batch shape, and a static graph is the one
    inductor tunes best; a new shape (a short validation batch) compiles once more.
    """
    count = 0
    for block in blocks:
        if not getattr(block, "_zenlm_compiled", False):
            block.compile(backend=BACKEND, dynamic=False)
            block._zenlm_compiled = True
        count += 1
    return count
