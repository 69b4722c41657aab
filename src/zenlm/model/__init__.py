"""A plain Llama-family decoder; parallelism comes from outside through a LayerFactory.

Read transformer.py first (stages and the Transformer), then layers.py, init.py, factory.py.
Exports resolve lazily, so `zenlm.model.config` (imported by zenlm.config) does not pull torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "zenlm.model.config": ["ModelConfig", "RopeScalingConfig"],
    "zenlm.model.factory": ["IGNORE_INDEX", "LayerFactory", "PlainFactory"],
    "zenlm.model.families": [
        "FAMILIES",
        "apply_family",
        "family_overrides",
        "model_config_from_hf",
    ],
    "zenlm.model.init": [
        "canonical_named_parameters",
        "full_state_dict",
        "init_weights",
        "load_full_state_dict",
    ],
    "zenlm.model.layers": [
        "Attention",
        "AttentionCore",
        "RMSNorm",
        "SwiGLU",
        "apply_rotary",
        "build_rope_cache",
        "rope_inv_freq",
    ],
    "zenlm.model.loss": ["mean_loss", "next_token_accuracy", "token_loss"],
    "zenlm.model.transformer": [
        "Block",
        "Embedding",
        "OutputHead",
        "StageTuple",
        "Transformer",
        "check_model_config",
        "parameter_count",
        "positions_from_doc_ids",
    ],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "FAMILIES",
    "IGNORE_INDEX",
    "Attention",
    "AttentionCore",
    "Block",
    "Embedding",
    "LayerFactory",
    "ModelConfig",
    "OutputHead",
    "PlainFactory",
    "RMSNorm",
    "RopeScalingConfig",
    "StageTuple",
    "SwiGLU",
    "Transformer",
    "apply_family",
    "apply_rotary",
    "build_rope_cache",
    "canonical_named_parameters",
    "check_model_config",
    "family_overrides",
    "full_state_dict",
    "init_weights",
    "load_full_state_dict",
    "mean_loss",
    "model_config_from_hf",
    "next_token_accuracy",
    "parameter_count",
    "positions_from_doc_ids",
    "rope_inv_freq",
    "token_loss",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'zenlm.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


if TYPE_CHECKING:
    from zenlm.model.config import ModelConfig, RopeScalingConfig
    from zenlm.model.factory import IGNORE_INDEX, LayerFactory, PlainFactory
    from zenlm.model.families import (
        FAMILIES,
        apply_family,
        family_overrides,
        model_config_from_hf,
    )
    from zenlm.model.init import (
        canonical_named_parameters,
        full_state_dict,
        init_weights,
        load_full_state_dict,
    )
    from zenlm.model.layers import (
        Attention,
        AttentionCore,
        RMSNorm,
        SwiGLU,
        apply_rotary,
        build_rope_cache,
        rope_inv_freq,
    )
    from zenlm.model.loss import mean_loss, next_token_accuracy, token_loss
    from zenlm.model.transformer import (
        Block,
        Embedding,
        OutputHead,
        StageTuple,
        Transformer,
        check_model_config,
        parameter_count,
        positions_from_doc_ids,
    )
