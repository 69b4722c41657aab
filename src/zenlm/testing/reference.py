"""The single-process reference every layout is compared against, and deterministic test data.

`reference_losses` trains the same model (PlainFactory, same init) with a plain PyTorch loop:
torch AdamW with the same parameter groups, the same LambdaLR schedule, clip_grad_norm_, and
gradient accumulation over every micro batch of the global batch. No DeepSpeed, no megatron.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from zenlm.config.schema import RunConfig
from zenlm.model.factory import PlainFactory
from zenlm.model.loss import mean_loss
from zenlm.model.transformer import Transformer
from zenlm.parallel.engine import build_optimizer
from zenlm.train.schedule import build_lr_lambda


def global_batches(cfg: RunConfig, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless (global_batch, seq_len + 1) token tensors, the same for every layout.

    Each sequence is an arithmetic progression mod vocab (random start, stride in 1..7), so a
    model can learn it within a few steps: losses move, and a wrong layout shows.
    """
    g = torch.Generator().manual_seed(seed)
    n, length, vocab = (
        cfg.data.global_batch_size_seqs,
        cfg.data.seq_len_tokens + 1,
        cfg.model.vocab_size,
    )
    while True:
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 8, (n, 1), generator=g)
        yield (start + stride * torch.arange(length)) % vocab


def _micro(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def rank_micro_batches(
    cfg: RunConfig, dp_rank: int, dp_size: int, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro batches: a contiguous 1/dp_size slice of each global batch."""
    mbs = cfg.data.micro_batch_size_seqs
    for tokens in global_batches(cfg, seed):
        per_rank = tokens.shape[0] // dp_size
        mine = tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        for i in range(0, per_rank, mbs):
            yield _micro(mine[i : i + mbs])


def reference_losses(cfg: RunConfig, steps: int, seed: int = 0) -> list[float]:
    """Per-step mean losses of a plain single-process fp32 run of cfg on global_batches(seed)."""
    return reference_run(cfg, steps, seed)[0]


def reference_run(cfg: RunConfig, steps: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """(per-step mean losses, per-step pre-clipping global grad norms) of the reference run."""
    torch.manual_seed(cfg.runtime.seed)
    factory = PlainFactory()
    model = Transformer(cfg.model, factory, seed=cfg.runtime.seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(cfg.optim))
    mbs = cfg.data.micro_batch_size_seqs
    losses, grad_norms = [], []
    data = global_batches(cfg, seed)
    for _ in range(steps):
        tokens = next(data)
        n_micro = tokens.shape[0] // mbs
        total = 0.0
        for i in range(n_micro):
            batch = _micro(tokens[i * mbs : (i + 1) * mbs])
            loss = mean_loss(factory, model(batch["input_ids"]), batch["labels"])
            (loss / n_micro).backward()
            total += loss.item()
        max_norm = cfg.optim.grad_clip_norm if cfg.optim.grad_clip_norm > 0 else float("inf")
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(total / n_micro)
    return losses, grad_norms
