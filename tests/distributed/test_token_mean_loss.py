"""The step loss is the mean over every counted token of the global batch, at every layout.

SFT masks the prompt: micro batches then count different numbers of tokens, and the mean of
per-micro-batch means (what the engine's averaging gives on its own) weights a token by
1 / (its micro batch's count), so it depends on how the global batch is cut into micro batches,
i.e. on DP and the micro batch size. The trainer divides each micro batch's loss sum by
(step's counted tokens) / (micro batches x DP) instead (zenlm.model.loss.mean_loss).

Data: arithmetic progressions (zenlm.testing.reference.global_batches) whose labels are masked
(-100) on a random prefix of each sequence, 0 to seq_len - 1 tokens, so counts differ a lot.
Reference: a plain PyTorch loop (no DeepSpeed, no megatron, not the trainer's code) with
loss = sum of F.cross_entropy over the global batch's counted tokens / their number, torch AdamW,
clip_grad_norm_. DP 4, TP 2 x DP 2, PP 2 x DP 2 and TP 2 x PP 2 at micro batch 1 and 2 match it
per step (loss and grad norm, 1e-5 relative), and the per-micro-batch-mean alternative is
measurably different on this data (so the test can fail).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import global_batches

BASE = [
    "optim.train_steps=4",
    "optim.warmup_steps=1",
    "optim.lr=0.01",
    "optim.grad_clip_norm=0.5",
    "data.global_batch_size_seqs=8",
    "data.seq_len_tokens=16",
    "model.num_layers=2",
    "model.vocab_size=128",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
    "checkpoint.save_interval_steps=0",
]
LAYOUTS = {
    "dp4_mb1": ["data.micro_batch_size_seqs=1"],
    "dp4_mb2": ["data.micro_batch_size_seqs=2"],
    "tp2dp2": ["parallel.tensor_parallel_degree=2", "data.micro_batch_size_seqs=1"],
    "pp2dp2": ["parallel.pipeline_parallel_degree=2", "data.micro_batch_size_seqs=1"],
    "tp2pp2": [
        "parallel.tensor_parallel_degree=2",
        "parallel.pipeline_parallel_degree=2",
        "data.micro_batch_size_seqs=2",
    ],
}


def masked_batches(cfg, seed: int = 0):
    """(tokens, labels) global batches: labels = tokens[:, 1:] with a random prefix -100."""
    g = torch.Generator().manual_seed(seed + 1)
    for tokens in global_batches(cfg, seed):
        labels = tokens[:, 1:].clone()
        prefix = torch.randint(0, labels.shape[1], (labels.shape[0],), generator=g)
        labels[torch.arange(labels.shape[1]) < prefix[:, None]] = -100
        yield tokens[:, :-1].contiguous(), labels


def rank_batches(cfg, dp_rank: int, dp_size: int):
    mbs = cfg.data.micro_batch_size_seqs
    for inputs, labels in masked_batches(cfg):
        n = inputs.shape[0] // dp_size
        lo = dp_rank * n
        for i in range(lo, lo + n, mbs):
            yield {"input_ids": inputs[i : i + mbs], "labels": labels[i : i + mbs]}


def reference(cfg, steps: int, token_mean: bool = True) -> tuple[list[float], list[float]]:
    from zenlm.model.transformer import Transformer
    from zenlm.parallel.engine import build_optimizer
    from zenlm.train.schedule import build_lr_lambda

    torch.manual_seed(cfg.runtime.seed)
    model = Transformer(cfg.model, seed=cfg.runtime.seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambda(cfg.optim))
    losses, norms = [], []
    data = masked_batches(cfg)
    for _ in range(steps):
        inputs, labels = next(data)
        if token_mean:
            logits = model(inputs)[..., : cfg.model.vocab_size].float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                reduction="sum",
            ) / (labels != -100).sum()  # fmt: skip
            loss.backward()
            losses.append(loss.item())
        else:  # the mean of per-sequence means (micro batch 1), for contrast
            total = 0.0
            for i in range(inputs.shape[0]):
                logits = model(inputs[i : i + 1])[..., : cfg.model.vocab_size].float()
                loss = F.cross_entropy(logits[0], labels[i], ignore_index=-100)
                (loss / inputs.shape[0]).backward()
                total += loss.item() / inputs.shape[0]
            losses.append(total)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return losses, norms


def _layouts(rank, world_size, run_dir):
    from zenlm.train.trainer import Trainer

    out = {}
    for name, extra in LAYOUTS.items():
        cfg = load_config(
            None, [*BASE, *extra, f"logging.run_dir={run_dir}", f"logging.run_name={name}"]
        )
        trainer = Trainer(cfg, train_data=functools.partial(rank_batches, cfg))
        out[name] = [(h["train/loss"], h["train/grad_norm"]) for h in trainer.fit()]
        trainer.close()
    return out


def test_every_layout_gives_the_global_token_mean(tmp_path):
    cfg = load_config(None, BASE)
    ref_loss, ref_norm = reference(cfg, 4)
    alt_loss, _ = reference(cfg, 4, token_mean=False)
    assert abs(alt_loss[0] - ref_loss[0]) > 1e-3 * ref_loss[0], (alt_loss, ref_loss)
    per_rank = run_distributed(_layouts, 4, args=(str(tmp_path),), timeout_s=600)
    for name in LAYOUTS:
        for r in per_rank:
            got = r[name]
            assert [g[0] for g in got] == pytest.approx(ref_loss, rel=1e-5), (name, got, ref_loss)
            assert [g[1] for g in got] == pytest.approx(ref_norm, rel=1e-5), (name, got, ref_norm)
