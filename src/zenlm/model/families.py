"""Model families as data: how Llama 2/3, Mistral and Qwen2 differ, as ModelConfig overrides.

    cfg = apply_family(ModelConfig(hidden_size=..., ...), "qwen2")
    cfg = model_config_from_hf(json.load(open("config.json")))   # strict: see docs/convert.md

Shapes (width, depth, heads) stay with the named sizes in configs/models/; a family fixes only
what distinguishes its architecture. The transformers config mapping itself lives in
zenlm.checkpoint.hf_config (with its policy tables); Mistral v0.1's sliding-window attention and
Qwen2's sliding-window option are refused there.
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


def model_config_from_hf(hf: dict[str, Any], name: str | None = None) -> ModelConfig:
    """ModelConfig from a transformers config dict (model_type llama, mistral or qwen2), strictly:
    every field is mapped, allowed at a value that changes nothing, or refused by name
    (zenlm.checkpoint.hf_config.HFConfigError, a ValueError). See docs/convert.md."""
    from zenlm.checkpoint.hf_config import model_config_from_hf as strict

    return strict(hf, name=name)
