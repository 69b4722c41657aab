"""A plain PyTorch Llama for tools/bench/gpu.py: the baseline zenlm is measured against.

Written for the bench, sharing no code with zenlm: nn.Linear / nn.Embedding, RMSNorm in fp32,
RoPE (rotate-half layout, Llama-3.1 frequency scaling), grouped-query attention through
F.scaled_dot_product_attention(is_causal=True, enable_gqa=True), SwiGLU, a tied or separate LM
head. The shape comes from a `Shape` (the same numbers as the zenlm ModelConfig it was read from),
so both models do the same matmuls. Shapes: b batch, s sequence, h hidden, n query heads,
k key/value heads, d head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    # Llama-3.1 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original length) or None.
    rope_scaling: tuple[float, float, float, int] | None


def inv_frequencies(shape: Shape) -> torch.Tensor:
    """(d / 2,) fp32 RoPE inverse frequencies, scaled as Llama 3.1 does when asked."""
    d = shape.head_dim
    inv = 1.0 / shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if shape.rope_scaling is None:
        return inv
    factor, low, high, old_len = shape.rope_scaling
    wavelen = 2 * math.pi / inv
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    blended = (1 - smooth) * inv / factor + smooth * inv  # interpolate between the two regimes
    return torch.where(
        wavelen > old_len / low, inv / factor, torch.where(wavelen < old_len / high, inv, blended)
    )


class RMSNorm(nn.Module):
    def __init__(self, h: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, s, d); cos, sin (s, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        h, d = shape.hidden_size, shape.head_dim
        self.n, self.k, self.d = shape.num_heads, shape.num_kv_heads, d
        self.norm1 = RMSNorm(h, shape.rms_norm_eps)
        self.wq = nn.Linear(h, self.n * d, bias=False)
        self.wk = nn.Linear(h, self.k * d, bias=False)
        self.wv = nn.Linear(h, self.k * d, bias=False)
        self.wo = nn.Linear(self.n * d, h, bias=False)
        self.norm2 = RMSNorm(h, shape.rms_norm_eps)
        self.w_gate = nn.Linear(h, shape.intermediate_size, bias=False)
        self.w_up = nn.Linear(h, shape.intermediate_size, bias=False)
        self.w_down = nn.Linear(shape.intermediate_size, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        y = self.norm1(x)
        q = self.wq(y).view(b, s, self.n, self.d).transpose(1, 2)  # (b, n, s, d)
        k = self.wk(y).view(b, s, self.k, self.d).transpose(1, 2)  # (b, k, s, d)
        v = self.wv(y).view(b, s, self.k, self.d).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under autocast q is bf16, the angles fp32
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.k != self.n)
        x = x + self.wo(att.transpose(1, 2).reshape(b, s, self.n * self.d))
        y = self.norm2(x)
        return x + self.w_down(F.silu(self.w_gate(y)) * self.w_up(y))


class Llama(nn.Module):
    """ids (b, s) -> logits (b, s, vocab)."""

    def __init__(self, shape: Shape, init_std: float = 0.02) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.head = None
        if not shape.tie_word_embeddings:
            self.head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_frequencies(shape), persistent=False)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        freqs = torch.arange(s, device=ids.device, dtype=torch.float32)[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # (s, d), fp32 angles
        x = self.embed(ids)
        cos, sin = emb.cos(), emb.sin()
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(x, weight)
