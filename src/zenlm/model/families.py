"""Model families as data: how Llama 2/3, Mistral and Qwen2 differ, as ModelConfig overrides.

    cfg = apply_family(ModelConfig(hidden_size=..., ...), "qwen2")
    cfg = model_config_from_hf(json.load(open("config.json")))   # a transformers config dict

Shapes (width, depth, heads) stay with the named sizes in configs/models/; a family fixes only
what distinguishes its architecture. Not covered: Mistral v0.1's sliding-window attention
(later Mistral releases dropped it) and Qwen2's sliding-window option (off in released models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from zenlm.model.config import ModelConfig, RopeScalingConfig

FAMILIES: dict[str, dict[str, Any]] = {
    "llama2": dict(rope_theta=10000.0, rms_norm_eps=1e-5, qkv_bias=False),
    "llama3": dict(rope_theta=500000.0, rms_norm_eps=1e-5, qkv_bias=False),
    # Llama 3.1 / 3.2: long-context frequency scaling (factor 8 for 3.1, 32 for 3.2).
    "llama3.1": dict(
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling=RopeScalingConfig(type="llama3", factor=8.0),
    ),
    "llama3.2": dict(
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling=RopeScalingConfig(type="llama3", factor=32.0),
        tie_word_embeddings=True,
    ),
    "mistral": dict(rope_theta=1000000.0, rms_norm_eps=1e-5, qkv_bias=False),
    "qwen2": dict(rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True),
}


def family_overrides(family: str) -> dict[str, Any]:
    """The ModelConfig fields that define `family`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return dict(FAMILIES[family])


def apply_family(cfg: ModelConfig, family: str) -> ModelConfig:
    """A copy of cfg with the family's distinguishing fields set."""
    return dataclasses.replace(cfg, **family_overrides(family))


def _rope_scaling_from_hf(hf: dict[str, Any]) -> RopeScalingConfig:
    # transformers 4.x: "rope_scaling"; 5.x: "rope_parameters" (which also holds rope_theta).
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return RopeScalingConfig()
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (only 'llama3')")
    return RopeScalingConfig(
        type="llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def model_config_from_hf(hf: dict[str, Any], name: str | None = None) -> ModelConfig:
    """ModelConfig from a transformers config dict (model_type llama, mistral or qwen2)."""
    kind = hf.get("model_type")
    if kind not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model_type {kind!r} is not a supported family (llama, mistral, qwen2)")
    if kind == "mistral" and hf.get("sliding_window"):
        raise ValueError(f"sliding_window ({hf['sliding_window']}) attention is not supported")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 use_sliding_window is not supported")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias is not supported")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        name=name or hf.get("_name_or_path") or kind,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=_rope_scaling_from_hf(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
    )
