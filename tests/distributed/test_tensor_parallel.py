"""TP = 2 and 4 (also with sequence parallelism) against the TP = 1 model in the same process.

One process group per world size runs every case, since spawning and importing megatron cost
seconds. Each rank builds the TP = 1 reference with the same seed and compares: full weights
(exact), logits, loss (vocab-parallel vs F.cross_entropy and vs the unpadded vocabulary),
accuracy, every gradient, and the ZeRO-style grad norm (relative error < 1e-5).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from zenlm.model import (
    ModelConfig,
    PlainFactory,
    RopeScalingConfig,
    Transformer,
    full_state_dict,
    mean_loss,
    next_token_accuracy,
)
from zenlm.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

TOL = 1e-5

BASE = ModelConfig(
    vocab_size=300,  # padded to 384 at TP 1, 512 at TP 2 and 4: padding spans vocab shards
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_attention_heads=8,
    num_kv_heads=4,
    max_seq_len=64,
)
CASES = {
    "gqa": (BASE, False),
    "gqa_sp": (BASE, True),
    # Qwen2-like biases, tied embeddings, llama3 rope, per-document masking, MHA.
    "tied_bias_docs": (
        dataclasses.replace(
            BASE,
            num_kv_heads=None,
            qkv_bias=True,
            tie_word_embeddings=True,
            document_masking=True,
            rope_theta=500000.0,
            rope_scaling=RopeScalingConfig(
                type="llama3", factor=8.0, original_max_position_embeddings=16
            ),
        ),
        False,
    ),
}
CASES["tied_bias_docs_sp"] = (CASES["tied_bias_docs"][0], True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def batch(cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100  # ignored positions
    labels[1, 3] = -100
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 4 + [2] * 3])
    return ids, labels, doc_ids


def zero_style_grad_norm(model: torch.nn.Module, tp_group: dist.ProcessGroup | None) -> float:
    """The norm DeepSpeed/megatron compute: TP-sharded params on every rank, replicated ones
    (norm weights) on TP rank 0 only, summed over the TP group."""
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and (tp_group is None or param_is_not_tensor_parallel_duplicate(p)):
            total += p.grad.double().pow(2).sum()
    if tp_group is not None:
        dist.all_reduce(total, group=tp_group)
    return total.sqrt().item()


def run_case(cfg: ModelConfig, sp: bool) -> dict[str, float]:
    from megatron.core import parallel_state as ps

    from zenlm.parallel.tensor import build_factory

    ids, labels, doc_ids = batch(cfg)
    ref = Transformer(cfg, PlainFactory(), seed=7)
    ref_logits = ref(ids, doc_ids=doc_ids)  # (b, s, 384)
    ref_loss = mean_loss(ref.factory, ref_logits, labels)
    ref_loss.backward()
    ref_correct, _ = next_token_accuracy(ref.factory, ref_logits, labels)

    factory = build_factory(sequence_parallel=sp)
    model = Transformer(cfg, factory, seed=7)
    ref_weights, weights = full_state_dict(ref, ref.factory), full_state_dict(model, factory)
    assert ref_weights.keys() == weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], weights[name]), f"init differs: {name}"

    logits = model(ids, doc_ids=doc_ids)  # (b, s, 512 / tp)
    correct, counted = next_token_accuracy(factory, logits, labels)
    loss = mean_loss(factory, logits, labels)
    loss.backward()
    tp_group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(factory.tp_degree)]
    dist.all_gather(parts, logits.detach().contiguous(), group=tp_group)
    full_logits = torch.cat(parts, dim=-1)  # (b, s, 512)

    v = cfg.vocab_size
    assert torch.isneginf(full_logits[..., v:]).all(), "padded vocabulary must be -inf"
    unpadded = torch.nn.functional.cross_entropy(
        ref_logits[..., :v].reshape(-1, v), labels.reshape(-1), ignore_index=-100
    )
    assert correct.item() == ref_correct.item() and counted.item() == 29
    grads, ref_grads = (
        full_state_dict(model, factory, True),
        full_state_dict(ref, ref.factory, True),
    )
    errors = {
        "logits": rel_err(full_logits[..., :v], ref_logits[..., :v].detach()),
        "loss": rel_err(loss.detach(), ref_loss.detach()),
        "loss_vs_unpadded": rel_err(loss.detach(), unpadded.detach()),
        "grad_norm": abs(
            zero_style_grad_norm(model, tp_group) / zero_style_grad_norm(ref, None) - 1
        ),
        "grads": max(rel_err(grads[n], ref_grads[n]) for n in ref_grads),
    }
    worst = max(ref_grads, key=lambda n: rel_err(grads[n], ref_grads[n]))
    assert all(e < TOL for e in errors.values()), f"{errors} (worst grad: {worst})"
    # TP-replicated norm weights must stay identical across TP ranks (SP reduces their grads).
    for name, p in model.named_parameters():
        if "norm" in name:
            parts = [torch.empty_like(p.grad) for _ in range(factory.tp_degree)]
            dist.all_gather(parts, p.grad, group=tp_group)
            assert all(torch.equal(parts[0], q) for q in parts), f"{name} grad differs across TP"
    return errors


def tp_checks(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    from zenlm.parallel.dims import ParallelDims, destroy, initialize

    initialize(ParallelDims(world_size, tp=world_size), seed=5)
    try:
        return {name: run_case(cfg, sp) for name, (cfg, sp) in CASES.items()}
    finally:
        destroy()


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_matches_single_device(world_size: int) -> None:
    results = run_distributed(tp_checks, world_size, timeout_s=300)
    for name, errors in results[0].items():
        print(f"TP {world_size} {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
