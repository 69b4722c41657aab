"""A transformers config.json (llama, mistral, qwen2) <-> ModelConfig, strictly.

    cfg = model_config_from_hf(json.load(open("config.json")))   # HFConfigError if unsupported
    hf = hf_config_from_model(cfg, "llama", bos_token_id=1, eos_token_id=2)

Every config.json field is in exactly one of these tables (docs/convert.md shows them):
- MAPPED: becomes a ModelConfig field (or its default when absent, as transformers defaults it);
- NEUTRAL: allowed only at the value that leaves the computation unchanged (hidden_act silu,
  attention_bias false, ...); any other value is refused, naming the field;
- HARMLESS: bookkeeping that cannot change the logits (architectures, dtype, token ids,
  generation defaults); ignored (bos/eos/pad ids and dtype are recorded by the importer);
- anything else is unknown and refused, naming it, since it might change the computation
  (`ignore` lets a user who knows better pass named unknown fields through).
All problems of one config are reported at once, in one line.

No torch here: the mapping is plain data, so it can run before any heavy import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from zenlm.errors import ZenlmError
from zenlm.model.config import ModelConfig, RopeScalingConfig

FAMILY_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

DEFAULTS: dict[str, dict[str, Any]] = {
    # transformers' class defaults for the fields that change the computation (the same in 4.4x
    # and 5.x; tests/unit/test_convert.py checks them against the installed version).
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
        sliding_window=4096,
    ),
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
    ),
}  # fmt: skip
DEFAULT_ROPE_THETA = 10000.0

MAPPED: dict[str, str] = {
    "model_type": "selects the family (llama, mistral, qwen2)",
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_kv_heads (absent = num_attention_heads)",
    "head_dim": "head_dim (absent or null = hidden_size / num_attention_heads)",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta (transformers 4.x place)",
    "rope_scaling": "rope_scaling: default or llama3 (transformers 4.x place)",
    "rope_parameters": "rope_theta and rope_scaling (transformers 5.x place)",
    "tie_word_embeddings": "tie_word_embeddings",
    "max_position_embeddings": "max_seq_len",
    "initializer_range": "init_std (used only by a fresh init)",
    "_name_or_path": "name (else the directory name)",
}

NEUTRAL: dict[str, str] = {
    # field: the value(s) allowed, and why others are refused
    "hidden_act": "silu (or its alias swish): zenlm's MLP is SwiGLU with silu",
    "attention_dropout": "0: zenlm has no dropout",
    "attention_bias": "false (llama): transformers then puts biases on q/k/v AND o_proj; "
    "zenlm has q/k/v biases only (qkv_bias), no o_proj bias",
    "mlp_bias": "false (llama): zenlm's MLP has no biases",
    "pretraining_tp": "1 (llama): other values emulate a tensor-parallel rounding order",
    "partial_rotary_factor": "1: zenlm rotates the whole head",
    "sliding_window": "mistral: null, or >= max_position_embeddings (the window then never "
    "masks a position the model is built for); qwen2: any value when use_sliding_window is "
    "false (transformers then ignores it)",
    "use_sliding_window": "false (qwen2): zenlm has no sliding-window attention",
    "max_window_layers": "any value when use_sliding_window is false (qwen2; then unused)",
    "layer_types": "every entry full_attention",
    "use_mrope": "false (qwen2): multimodal rotary sections are not implemented",
    "is_encoder_decoder": "false",
    "add_cross_attention": "false",
    "pruned_heads": "empty",
    "quantization_config": "absent or null: quantized weights are not imported",
    "auto_map": "absent: a model with custom modeling code is not one of these families",
}

HARMLESS: tuple[str, ...] = (
    # bookkeeping and identity
    "architectures", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
    "_attn_implementation_autoset", "attn_implementation", "_attn_implementation",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "problem_type",
    "id2label", "label2id", "num_labels",
    # token ids (recorded, written back on export; pad_token_id only marks the embedding row
    # transformers keeps out of gradient updates in nn.Embedding)
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    # output and inference switches
    "use_cache", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "is_decoder", "tie_encoder_decoder",
    "cross_attention_hidden_size", "chunk_size_feed_forward",
    # generation defaults older transformers wrote into config.json
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
)  # fmt: skip

_FAMILY_ONLY = {
    # NEUTRAL fields transformers reads only for these families; elsewhere they are unknown.
    "attention_bias": ("llama",),
    "mlp_bias": ("llama",),
    "pretraining_tp": ("llama",),
    "use_sliding_window": ("qwen2",),
    "max_window_layers": ("qwen2",),
    "use_mrope": ("qwen2",),
    "sliding_window": ("mistral", "qwen2"),
}

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class HFConfigError(ZenlmError, ValueError):
    """A transformers config zenlm cannot represent exactly; the message names every field."""


def _is_zero(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v == 0)


def _rope(
    d: dict[str, Any], kind: str, max_pos: int, problems: list[str]
) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, RopeScalingConfig) from either place transformers keeps them."""
    parsed = []
    for key in ("rope_scaling", "rope_parameters"):
        raw = d.get(key)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            problems.append(f"{key}={raw!r} is not a mapping")
            continue
        if raw and all(isinstance(v, dict) for v in raw.values()):
            problems.append(f"{key} is nested per layer type ({', '.join(raw)}): not supported")
            continue
        parsed.append((key, _rope_one(key, dict(raw), d, max_pos, problems)))
    if not parsed:
        theta = d.get("rope_theta")
        return float(theta if theta is not None else DEFAULT_ROPE_THETA), RopeScalingConfig()
    if len(parsed) == 2 and parsed[0][1] != parsed[1][1]:
        problems.append(
            f"rope_scaling {parsed[0][1]} and rope_parameters {parsed[1][1]} disagree "
            "(keep one of them)"
        )
    return parsed[0][1]


def _rope_one(
    key: str, p: dict[str, Any], d: dict[str, Any], max_pos: int, problems: list[str]
) -> tuple[float, RopeScalingConfig]:
    kind = p.pop("rope_type", None)
    legacy = p.pop("type", None)
    if kind and legacy and kind != legacy:
        problems.append(f"{key}: rope_type {kind!r} and type {legacy!r} disagree")
    kind = kind or legacy or "default"
    theta = p.pop("rope_theta", None)
    theta = theta if theta is not None else d.get("rope_theta")
    theta = float(theta if theta is not None else DEFAULT_ROPE_THETA)
    factor = p.pop("partial_rotary_factor", None)
    if factor not in (None, 1, 1.0):
        problems.append(f"{key}.partial_rotary_factor={factor} (only 1: zenlm rotates whole heads)")
    if kind == "default":
        scaling = RopeScalingConfig()
    elif kind == "llama3":
        missing = [k for k in _LLAMA3_KEYS[:3] if k not in p]
        if missing:
            problems.append(f"{key} (llama3) lacks {', '.join(missing)}")
            return theta, RopeScalingConfig()
        scaling = RopeScalingConfig(
            type="llama3",
            factor=float(p.pop("factor")),
            low_freq_factor=float(p.pop("low_freq_factor")),
            high_freq_factor=float(p.pop("high_freq_factor")),
            original_max_position_embeddings=int(
                p.pop("original_max_position_embeddings", max_pos)
            ),
        )
    else:
        problems.append(
            f"{key} rope_type {kind!r} is not supported (zenlm implements default and llama3 "
            "RoPE; linear, dynamic, yarn, longrope and others would change every position)"
        )
        return theta, RopeScalingConfig()
    if p:
        problems.append(
            f"{key} ({kind}) has fields zenlm does not implement: {', '.join(sorted(p))}"
        )
    return theta, scaling


def _check_neutral(kind: str, d: dict[str, Any], max_pos: int, problems: list[str]) -> None:
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act={act!r} (zenlm's MLP is SwiGLU with silu)")
    if not _is_zero(d.get("attention_dropout")):
        problems.append(f"attention_dropout={d['attention_dropout']} (zenlm has no dropout)")
    if d.get("attention_bias"):
        problems.append(
            "attention_bias=true (transformers' Llama then has biases on q/k/v and o_proj; "
            "zenlm has q/k/v biases only, no o_proj bias)"
        )
    if d.get("mlp_bias"):
        problems.append("mlp_bias=true (zenlm's MLP has no biases)")
    if d.get("pretraining_tp") not in (None, 1):
        problems.append(f"pretraining_tp={d['pretraining_tp']} (only 1)")
    if d.get("partial_rotary_factor") not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor={d['partial_rotary_factor']} (only 1)")
    if kind == "mistral":
        window = d.get("sliding_window")
        if window is not None and window < max_pos:
            problems.append(
                f"sliding_window={window} < max_position_embeddings={max_pos} (zenlm has no "
                "sliding-window attention; Mistral v0.2+ and null windows import)"
            )
    if kind == "qwen2" and d.get("use_sliding_window"):
        problems.append("use_sliding_window=true (zenlm has no sliding-window attention)")
    if d.get("use_mrope"):
        problems.append("use_mrope=true (multimodal rotary sections are not implemented)")
    layer_types = d.get("layer_types")
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            problems.append(f"layer_types has {', '.join(other)} (only full_attention)")
    for key in ("is_encoder_decoder", "add_cross_attention"):
        if d.get(key):
            problems.append(f"{key}=true (a decoder-only model only)")
    if d.get("pruned_heads"):
        problems.append("pruned_heads is not empty (heads of unequal count per layer)")
    if d.get("quantization_config") is not None:
        problems.append("quantization_config is set (quantized weights are not imported)")
    if "auto_map" in d:
        problems.append("auto_map is set (custom modeling code is not one of these families)")


def model_config_from_hf(
    hf: dict[str, Any], name: str | None = None, ignore: Iterable[str] = ()
) -> ModelConfig:
    """ModelConfig from a transformers config dict (model_type llama, mistral or qwen2).

    Raises HFConfigError listing every field it refuses; `ignore` names unknown fields to let
    through (a field zenlm knows is checked whatever `ignore` says)."""
    kind = hf.get("model_type")
    if kind not in FAMILY_TYPES:
        raise HFConfigError(
            f"config.json model_type {kind!r} is not a supported family ({', '.join(FAMILY_TYPES)})"
        )
    d = {**DEFAULTS[kind], **hf}
    problems: list[str] = []
    ignored = set(ignore)
    unknown = sorted(
        k
        for k in hf
        if k not in MAPPED
        and k not in HARMLESS
        and not (k in NEUTRAL and kind in _FAMILY_ONLY.get(k, (kind,)))
        and k not in ignored
    )
    if unknown:
        problems.append(
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (not known "
            f"to zenlm's {kind} mapping; it could change the computation — if it is harmless, "
            "pass --ignore-config-key for it)"
        )
    max_pos = int(d["max_position_embeddings"])
    _check_neutral(kind, d, max_pos, problems)
    rope_theta, rope_scaling = _rope(d, kind, max_pos, problems)
    heads = int(d["num_attention_heads"])
    kv = d.get("num_key_value_heads")
    cfg = ModelConfig(
        name=name or hf.get("_name_or_path") or kind,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_kv_heads=int(kv) if kv is not None else None,
        head_dim=int(d["head_dim"]) if d.get("head_dim") is not None else None,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(d["rms_norm_eps"]),
        qkv_bias=kind == "qwen2",
        tie_word_embeddings=bool(d["tie_word_embeddings"]),
        max_seq_len=max_pos,
        init_std=float(d["initializer_range"]),
    )
    if not problems:
        from zenlm.model.transformer import check_model_config

        try:
            check_model_config(cfg)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise HFConfigError(
            f"config.json ({kind}) cannot be imported exactly: {'; '.join(problems)}"
        )
    return cfg


def hf_config_from_model(
    cfg: ModelConfig,
    model_type: str,
    *,
    torch_dtype: str = "float32",
    bos_token_id: Any = None,
    eos_token_id: Any = None,
    pad_token_id: Any = None,
) -> dict[str, Any]:
    """config.json for `cfg` as transformers' `model_type` class (4.43+ and 5.x both read it:
    rope_theta and rope_scaling are written in the 4.x place, which 5.x converts)."""
    if model_type not in FAMILY_TYPES:
        raise HFConfigError(f"model_type {model_type!r} is not one of {', '.join(FAMILY_TYPES)}")
    if cfg.qkv_bias != (model_type == "qwen2"):
        raise HFConfigError(
            f"model.qkv_bias={cfg.qkv_bias} cannot be written as a {model_type} model "
            "(transformers' Qwen2 always has q/k/v biases, Llama and Mistral none)"
        )
    scaling = None
    if cfg.rope_scaling.type == "llama3":
        s = cfg.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    if cfg.head_dim is not None:  # absent = hidden_size / num_attention_heads, as in zenlm
        out["head_dim"] = cfg.head_dim
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif model_type == "mistral":
        out.update(sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return out
