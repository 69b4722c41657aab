"""Does a complete checkpoint fit this run? Answered from meta.json and config.yaml alone.

A checkpoint that is complete but does not fit (another model shape, another tokenizer) is never
skipped for an older one or for a fresh start: that would train a new run over the old one's
directory and let `keep_last` delete its checkpoints. The run stops with every difference listed.
Torn or corrupt checkpoints (CRC, missing files) are a different case: the session skips those
for an older one, keeps them on disk, and stops when none is left (zenlm.checkpoint.session).

No weights are read and nothing here imports DeepSpeed, so a launcher can ask before the
seconds-long framework imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from zenlm.checkpoint.io import CheckpointError
from zenlm.model.config import ModelConfig

STRUCTURAL_MODEL_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_attention_heads",
    "num_kv_heads",
    "head_dim",
    "qkv_bias",
    "tie_word_embeddings",
)
"""Model fields that change parameter names or shapes. Others (rope_theta, max_seq_len,
document_masking, init_std, vocab_pad_multiple: the saved vocabulary is unpadded) may differ,
as in long-context fine-tuning."""

_SHOWN = 4  # differences named in the one-line message; the rest are counted


class IncompatibleCheckpointError(CheckpointError):
    """A complete checkpoint that does not fit this run; the message lists the differences."""

    same_on_all_ranks = True


def expected_shapes(model: ModelConfig) -> dict[str, list[int]]:
    """Full (TP = 1, unpadded vocabulary) shape of every canonical parameter of `model`,
    from a model built on the meta device (no memory, no init)."""
    from zenlm.model.factory import PlainFactory
    from zenlm.model.init import canonical_named_parameters
    from zenlm.model.transformer import Transformer

    factory = PlainFactory()
    with torch.device("meta"):
        module = Transformer(model, factory, seed=None)
    return {n: list(factory.full_shape(p)) for n, p in canonical_named_parameters(module)}


def _kv(model: dict[str, Any]) -> Any:
    return model.get("num_kv_heads") or model.get("num_attention_heads")


def differences(
    ckpt_dir: Path, meta: dict[str, Any], model: ModelConfig, tokenizer_fingerprint: str | None
) -> list[str]:
    """Human-readable differences between a checkpoint and this run ([] = it fits)."""
    out: list[str] = []
    saved_fp = meta.get("tokenizer_fingerprint")
    if saved_fp and tokenizer_fingerprint and saved_fp != tokenizer_fingerprint:
        out.append(
            f"tokenizer fingerprint {saved_fp[:12]}… (checkpoint) vs {tokenizer_fingerprint[:12]}… "
            "(this run's data.tokenizer_path)"
        )
    try:
        saved = yaml.safe_load((ckpt_dir / "config.yaml").read_text()) or {}
        saved_model = saved.get("model", {}) if isinstance(saved, dict) else {}
    except (OSError, yaml.YAMLError):
        saved_model = {}  # pre-config checkpoints: the shapes below still decide
    now = {k: getattr(model, k) for k in STRUCTURAL_MODEL_KEYS}
    for key in STRUCTURAL_MODEL_KEYS:
        if key not in saved_model:
            continue
        a, b = saved_model[key], now[key]
        if key == "num_kv_heads":
            a, b = _kv(saved_model), model.kv_heads
        if key == "head_dim":  # null means hidden_size // num_attention_heads: compare widths
            heads = saved_model.get("num_attention_heads") or 1
            a = a or (saved_model.get("hidden_size") or 0) // heads
            b = model.head_size
        if a != b:
            out.append(f"model.{key} {a} (checkpoint) vs {b} (this run)")
    saved_shapes = meta.get("shapes") or {}
    if saved_shapes:
        want = expected_shapes(model)
        bad = [
            f"{n} {saved_shapes[n]} vs {want[n]}"
            for n in sorted(set(want) & set(saved_shapes))
            if list(saved_shapes[n]) != want[n]
        ]
        missing = sorted(set(want) - set(saved_shapes))
        extra = sorted(set(saved_shapes) - set(want))
        if bad:
            more = f" (+{len(bad) - _SHOWN} more)" if len(bad) > _SHOWN else ""
            out.append("shapes (checkpoint vs run): " + ", ".join(bad[:_SHOWN]) + more)
        if missing:
            out.append(
                f"{len(missing)} parameters of this model not in the checkpoint, e.g. {missing[0]}"
            )
        if extra:
            out.append(f"{len(extra)} checkpoint tensors this model lacks, e.g. {extra[0]}")
    return out


def check_compatible(
    ckpt_dir: Path, meta: dict[str, Any], model: ModelConfig, tokenizer_fingerprint: str | None
) -> None:
    """Raise IncompatibleCheckpointError listing every difference, or return."""
    diff = differences(ckpt_dir, meta, model, tokenizer_fingerprint)
    if diff:
        raise IncompatibleCheckpointError(
            f"checkpoint {ckpt_dir} does not fit this run: {'; '.join(diff)}. It is kept as it "
            "is. Resume it with its own model and tokenizer, or give this run another "
            "logging.run_name / checkpoint.dir (checkpoint.resume=none starts from step 0 and "
            "keeps these checkpoints)"
        )
