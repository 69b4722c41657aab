"""The single-device model: shapes, masking, RoPE, padded vocabulary, tying, init, stages."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zenlm.config import load_config
from zenlm.model import (
    Block,
    Embedding,
    ModelConfig,
    OutputHead,
    PlainFactory,
    RopeScalingConfig,
    Transformer,
    apply_family,
    build_rope_cache,
    check_model_config,
    full_state_dict,
    init_weights,
    load_full_state_dict,
    mean_loss,
    parameter_count,
    positions_from_doc_ids,
)

CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_attention_heads=8, num_kv_heads=2, max_seq_len=64)  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


def ids_for(cfg: ModelConfig, b: int = 2, s: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_shapes_and_attention_variants(kv_heads: int | None) -> None:
    cfg = dataclasses.replace(CFG, num_kv_heads=kv_heads)
    model = Transformer(cfg)
    attn = model.layers[0].attention
    assert attn.k_proj.weight.shape == (cfg.kv_heads * cfg.head_size, cfg.hidden_size)
    assert model(ids_for(cfg)).shape == (2, 16, 384)  # 300 padded to a multiple of 128


def test_causal() -> None:
    model = Transformer(CFG)
    ids = ids_for(CFG)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % CFG.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_document_masking_equals_separate_documents() -> None:
    cfg = dataclasses.replace(CFG, document_masking=True)
    model = Transformer(cfg)
    ids = ids_for(cfg, b=1, s=12)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    packed = model(ids, doc_ids=doc_ids)
    separate = torch.cat([model(ids[:, a:b]) for a, b in [(0, 5), (5, 9), (9, 12)]], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-6)
    # Without masking the later documents see the earlier ones.
    plain = Transformer(CFG)(ids, doc_ids=doc_ids)
    assert not torch.allclose(plain[:, 5:], separate[:, 5:], atol=1e-3)


def test_llama3_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = RopeScalingConfig(type="llama3", factor=8.0, original_max_position_embeddings=32)
    cfg = dataclasses.replace(CFG, rope_theta=500000.0, rope_scaling=scaling, max_seq_len=256)
    hf = LlamaConfig(
        hidden_size=64, num_attention_heads=8, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
    )  # fmt: skip
    rotary = LlamaRotaryEmbedding(hf)
    positions = torch.arange(256)[None]
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = build_rope_cache(cfg)
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    plain_cos, _ = build_rope_cache(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig()))
    assert not torch.allclose(plain_cos, cos)


def test_padded_vocab_never_predicted_and_loss_is_unpadded() -> None:
    model = Transformer(CFG)
    ids = ids_for(CFG)
    labels = torch.roll(ids, -1, dims=1)
    logits = model(ids)
    assert torch.isneginf(logits[..., CFG.vocab_size :]).all()
    assert (logits.argmax(-1) < CFG.vocab_size).all()
    loss = mean_loss(model.factory, logits, labels)
    unpadded = F.cross_entropy(logits[..., : CFG.vocab_size].reshape(-1, 300), labels.reshape(-1))
    torch.testing.assert_close(loss, unpadded, rtol=1e-6, atol=0)
    loss.backward()
    assert not model.embed.weight.grad[CFG.vocab_size :].any()
    assert not model.output.weight.grad[CFG.vocab_size :].any()
    assert not model.embed.weight[CFG.vocab_size :].any()  # padded rows start (and stay) zero


def test_ignored_labels() -> None:
    model = Transformer(CFG)
    logits = model(ids_for(CFG))
    labels = torch.full((2, 16), -100)
    labels[0, 0] = 7
    per_token = model.factory.cross_entropy(logits, labels)
    assert per_token[labels == -100].eq(0).all()
    torch.testing.assert_close(mean_loss(model.factory, logits, labels), per_token[0, 0])


def test_tied_embeddings_share_storage() -> None:
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    model = Transformer(cfg)
    assert model.output is None
    assert "head.output.weight" not in dict(model.named_parameters())
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters()) - 84 * 64
    hidden = model.head.norm(model.layers[1](model.layers[0](model.embed(ids_for(cfg))))[0])
    logits = model(ids_for(cfg))
    torch.testing.assert_close(logits[..., :300], hidden @ model.embed.weight[:300].T)


def test_init_is_scaled_and_deterministic() -> None:
    cfg = dataclasses.replace(CFG, hidden_size=256, intermediate_size=512, num_layers=8,
                              num_attention_heads=8, num_kv_heads=8, qkv_bias=True)  # fmt: skip
    model = Transformer(cfg, seed=3)
    std = cfg.init_std
    scaled = std / math.sqrt(2 * cfg.num_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert p.eq(1).all(), name
        elif name.endswith(".bias"):
            assert p.eq(0).all(), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(p.std().item() / scaled - 1) < 0.02, name
        else:
            rows = p[: cfg.vocab_size] if "embed" in name or "output" in name else p
            assert abs(rows.mean().item()) < 1e-3 and abs(rows.std().item() / std - 1) < 0.02, name
    again = full_state_dict(Transformer(cfg, seed=3), PlainFactory())
    other = full_state_dict(Transformer(cfg, seed=4), PlainFactory())
    for name, full in full_state_dict(model, PlainFactory()).items():
        assert torch.equal(full, again[name])
        assert name.endswith(("norm.weight", ".bias")) or not torch.equal(full, other[name])


def test_stages_built_apart_match_the_transformer() -> None:
    """What a pipeline split does: stages constructed alone, initialized in a container."""
    cfg = dataclasses.replace(CFG, document_masking=True)
    model = Transformer(cfg, seed=5)
    factory = PlainFactory()
    stages = nn.Sequential(Embedding(cfg, factory), *(Block(cfg, factory, i) for i in range(2)))
    head = OutputHead(cfg, factory)
    init_weights(nn.ModuleList([stages, head]), cfg, factory, seed=5)
    ids, doc_ids = ids_for(cfg), torch.tensor([[0] * 8 + [1] * 8] * 2)
    x = stages[0]((ids, None, doc_ids))  # one tuple, as a pipeline engine passes it
    for block in stages[1:]:
        x = block(x)
    assert len(x) == 3 and x[0].shape == (2, 16, 64)
    torch.testing.assert_close(head(x), model(ids, doc_ids=doc_ids), rtol=0, atol=0)


def test_tied_pipeline_stages_match_the_transformer() -> None:
    """Tied embeddings split as a pipeline does: the last stage holds its own Embedding copy
    (DeepSpeed's TiedLayerSpec keeps it in sync) and projects with Embedding.logits."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    model = Transformer(cfg, seed=5)
    factory = PlainFactory()
    first = nn.Sequential(Embedding(cfg, factory), Block(cfg, factory, 0))
    last = nn.ModuleList(
        [Block(cfg, factory, 1), OutputHead(cfg, factory), Embedding(cfg, factory)]
    )
    init_weights(nn.ModuleList([first, last]), cfg, factory, seed=5)
    assert torch.equal(first[0].weight, last[2].weight)  # same canonical name, same init
    hidden = last[1](last[0](first(ids_for(cfg))))  # (b, s, h): normed, not yet projected
    assert hidden.shape == (2, 16, 64)
    torch.testing.assert_close(last[2].logits(hidden), model(ids_for(cfg)), rtol=0, atol=0)


def test_full_state_round_trip_and_strictness() -> None:
    model, other = Transformer(CFG, seed=1), Transformer(CFG, seed=2)
    state = full_state_dict(model, model.factory)
    assert state["embed.embedding.weight"].shape == (300, 64)  # unpadded
    load_full_state_dict(other, other.factory, state)
    ids = ids_for(CFG)
    torch.testing.assert_close(other(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(KeyError, match="lacks 1 parameters"):
        load_full_state_dict(
            other,
            other.factory,
            {k: v for k, v in state.items() if "head" not in k or "norm" not in k},
        )
    bad = dict(state, **{"head.norm.weight": torch.ones(65)})
    with pytest.raises(ValueError, match=r"head.norm.weight: full shape \(65,\)"):
        load_full_state_dict(other, other.factory, bad)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_leaves_every_gradient_unchanged(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zenlm's own wrapper (as the trainer applies it): identical gradients, real recomputation."""
    from zenlm.parallel.checkpointing import apply_activation_checkpointing

    ids = ids_for(CFG)
    ref, model = Transformer(CFG), Transformer(CFG)
    assert apply_activation_checkpointing(list(model.layers), mode) == CFG.num_layers
    names_before = [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names_before  # names unchanged

    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, {"n": 0}

    def counting_sdpa(*args, **kwargs):
        calls["n"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    ref(ids).logsumexp(-1).mean().backward()
    assert calls["n"] == CFG.num_layers
    model(ids).logsumexp(-1).mean().backward()
    # Forward once per layer, then once more per layer when backward recomputes.
    assert calls["n"] == 3 * CFG.num_layers, f"{mode}: SDPA ran {calls['n']} times"
    for (name, a), b in zip(ref.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)


def test_bf16_keeps_rope_frequencies_fp32() -> None:
    model = Transformer(CFG).to(torch.bfloat16)
    logits = model(ids_for(CFG))
    assert (
        logits.dtype == torch.bfloat16 and model.layers[0].attention.inv_freq.dtype == torch.float32
    )
    assert torch.isfinite(logits[..., :300]).all()


def test_config_errors_name_the_numbers() -> None:
    with pytest.raises(
        ValueError, match=r"num_attention_heads \(8\) is not divisible by num_kv_heads \(3\)"
    ):
        check_model_config(dataclasses.replace(CFG, num_kv_heads=3))
    with pytest.raises(
        ValueError, match=r"hidden_size \(60\) is not divisible by num_attention_heads \(8\)"
    ):
        check_model_config(dataclasses.replace(CFG, hidden_size=60))


@pytest.mark.parametrize("name", ["debug", "125m", "1b", "7b", "13b", "70b"])
def test_named_sizes_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / "models" / f"{name}.yaml").model
    check_model_config(cfg, {"debug": 2, "125m": 4}.get(name, 8))  # the TP each size targets
    expected = {"debug": 156_480, "125m": 134.1e6, "1b": 1.236e9, "7b": 6.738e9,
                "13b": 13.016e9, "70b": 68.977e9}[name]  # fmt: skip
    assert abs(parameter_count(cfg) / expected - 1) < 1e-3
    if name == "debug":
        model = Transformer(cfg)
        padding = (cfg.padded_vocab_size() - cfg.vocab_size) * cfg.hidden_size * 2
        assert sum(p.numel() for p in model.parameters()) - padding == parameter_count(cfg)


def test_families_are_data() -> None:
    qwen = apply_family(CFG, "qwen2")
    assert qwen.qkv_bias and qwen.rms_norm_eps == 1e-6 and not CFG.qkv_bias
    llama32 = apply_family(CFG, "llama3.2")
    assert llama32.tie_word_embeddings and llama32.rope_scaling.factor == 32.0
    with pytest.raises(ValueError, match="unknown model family 'gpt2'"):
        apply_family(CFG, "gpt2")
    Transformer(qwen)(ids_for(CFG))


def test_lazy_exports_resolve() -> None:
    import zenlm.model

    assert set(zenlm.model.__all__) == set(zenlm.model._WHERE)
    for name in zenlm.model.__all__:
        assert getattr(zenlm.model, name) is not None
