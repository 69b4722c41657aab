"""Logits parity against transformers' own Llama / Qwen2 / Mistral on tiny random models.

The name map here is the minimal one for this test; the strict converter lives in
zenlm.checkpoint.hf. transformers keeps q/k in the rotate-half layout zenlm uses, so no RoPE
permutation is needed.
"""

from __future__ import annotations

import pytest
import torch

from zenlm.model import Transformer, full_state_dict, load_full_state_dict, model_config_from_hf

transformers = pytest.importorskip("transformers")

HF_TO_ZENLM = {
    "model.embed_tokens.weight": "embed.embedding.weight",
    "model.norm.weight": "head.norm.weight",
    "lm_head.weight": "head.output.weight",
}
LAYER_MAP = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    **{f"self_attn.{p}_proj.{t}": f"attention.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}  # fmt: skip


def to_zenlm(hf_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in hf_state.items():
        if key == "lm_head.weight" and tied:
            continue
        if key in HF_TO_ZENLM:
            out[HF_TO_ZENLM[key]] = value
            continue
        _, _, idx, rest = key.split(".", 3)  # model.layers.<i>.<rest>
        out[f"layers.{idx}.{LAYER_MAP[rest]}"] = value
    return out


def tiny_hf(kind: str) -> torch.nn.Module:
    common = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager",
    )  # fmt: skip
    if kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}  # fmt: skip
        config = transformers.LlamaConfig(**common, rope_parameters=rope, rms_norm_eps=1e-5)
        return transformers.LlamaForCausalLM(config)
    if kind == "qwen2_tied":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        return transformers.Qwen2ForCausalLM(config)
    config = transformers.MistralConfig(**common, sliding_window=None)
    return transformers.MistralForCausalLM(config)


@pytest.mark.parametrize("kind", ["llama3", "qwen2_tied", "mistral"])
def test_logits_match_transformers(kind: str) -> None:
    torch.manual_seed(0)
    hf = tiny_hf(kind).eval()
    with torch.no_grad():  # norms and biases start at 1 and 0: randomize them too
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    cfg = model_config_from_hf(hf.config.to_dict())
    assert cfg.qkv_bias == (kind == "qwen2_tied")
    assert cfg.tie_word_embeddings == (kind == "qwen2_tied")
    model = Transformer(cfg, seed=None)
    state = to_zenlm(hf.state_dict(), cfg.tie_word_embeddings)
    load_full_state_dict(model, model.factory, state)
    assert full_state_dict(model, model.factory).keys() == state.keys()  # every key consumed

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)[..., :300]
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"{kind}: max relative logits error {err:.1e}")
    assert err < 1e-5, err
