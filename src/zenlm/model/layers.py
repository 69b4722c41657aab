"""Building blocks of a Llama-family decoder: RMSNorm, RoPE, SwiGLU MLP, attention.

Every linear layer comes from a LayerFactory (zenlm.model.factory), so the same code runs on one
device and tensor-parallel. Shapes: b = batch, s = sequence, h = hidden, n = local query heads,
k = local key/value heads, d = head_dim. Under tensor parallelism n and k are per-rank counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.model.config import ModelConfig
from zenlm.model.factory import LayerFactory


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), computed in fp32 and cast back (as transformers' LlamaRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float, factory: LayerFactory) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        # Identity, or under sequence parallelism a TP gradient all-reduce (see factory.py).
        self.grad_sync = factory.replicated_grad_sync()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, h) -> (b, s, h)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.grad_sync(self.weight) * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(d / 2,) fp32 inverse frequencies, with Llama-3.1 scaling when cfg.rope_scaling asks."""
    dim = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling.type == "none":
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (..., s) -> cos, sin (..., s, d), computed in fp32 then cast to dtype."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (..., s, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., s, d): the rotate-half layout of HF Llama
    return emb.cos().to(dtype), emb.sin().to(dtype)


def build_rope_cache(
    cfg: ModelConfig,
    seq_len: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (seq_len, d) for positions 0 .. seq_len - 1 (default cfg.max_seq_len).

    The model computes the same values on the fly from position_ids (rope_cos_sin), which keeps
    no per-layer table in memory and handles per-document positions.
    """
    positions = torch.arange(seq_len or cfg.max_seq_len, device=device)
    return rope_cos_sin(rope_inv_freq(cfg), positions, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, s, d); cos, sin (b, s, d) -> (b, heads, s, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory) -> None:
        super().__init__()
        h, inner = cfg.hidden_size, cfg.intermediate_size
        self.enter_tp = factory.enter_tp()
        self.gate_proj = factory.column_linear(h, inner, bias=False)
        self.up_proj = factory.column_linear(h, inner, bias=False)
        self.down_proj = factory.row_linear(inner, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s_local, h) -> (b, s_local, h)
        x = self.enter_tp(x)  # (b, s, h)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (b, s) -> bool (b, 1, s, s): causal, and only within the same document."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (b, s, s)
    return (same_doc & causal)[:, None]


class AttentionCore(nn.Module):
    """softmax(q k^T / sqrt(d)) v with torch SDPA: causal, optionally per-document.

    Holds no parameters and does nothing else, so selective activation checkpointing can wrap
    exactly this submodule (`block.attention.core`) from outside.
    """

    def __init__(self, document_masking: bool) -> None:
        super().__init__()
        self.document_masking = document_masking

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """q (b, n, s, d); k, v (b, k, s, d); doc_ids (b, s) or None -> (b, n, s, d)."""
        gqa = q.shape[1] != k.shape[1]
        if self.document_masking and doc_ids is not None:
            if gqa:  # explicit repeat: not every masked SDPA backend takes enable_gqa
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            mask = document_mask(doc_ids)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention with RoPE and optional q/k/v biases.

    Heads are split over the TP group: rank r holds query heads [r n, (r+1) n) and the key/value
    heads they use, so grouped-query attention needs num_kv_heads divisible by the TP degree.
    """

    def __init__(self, cfg: ModelConfig, factory: LayerFactory) -> None:
        super().__init__()
        tp = factory.tp_degree
        self.head_dim = cfg.head_size
        self.local_heads = cfg.num_attention_heads // tp
        self.local_kv_heads = cfg.kv_heads // tp
        h, d = cfg.hidden_size, cfg.head_size
        self.enter_tp = factory.enter_tp()
        self.q_proj = factory.column_linear(h, cfg.num_attention_heads * d, bias=cfg.qkv_bias)
        self.k_proj = factory.column_linear(h, cfg.kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = factory.column_linear(h, cfg.kv_heads * d, bias=cfg.qkv_bias)
        self.core = AttentionCore(cfg.document_masking)
        self.o_proj = factory.row_linear(cfg.num_attention_heads * d, h, bias=False)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = rope_inv_freq(cfg)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """x (b, s_local, h); position_ids, doc_ids (b, s) -> (b, s_local, h)."""
        x = self.enter_tp(x)  # (b, s, h): all-gathered under sequence parallelism
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.local_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.local_kv_heads, self.head_dim).transpose(1, 2)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, q.dtype)  # (b, s, d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core(q, k, v, doc_ids)  # (b, n, s, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))
