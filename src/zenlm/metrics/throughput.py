"""Model FLOPs per token and MFU (PaLM appendix B convention: 6N + 12·L·H·Q·T).

The matmul FLOPs of one training token (forward + backward = 3x forward) are
    6 * N_matmul  +  12 * num_layers * num_heads * head_dim * seq_len
where N_matmul counts the weights that take part in matmuls (all but norms and the input
embedding lookup; the output head counts, tied or not). Activation recomputation is not counted:
MFU measures useful work, not hardware FLOPs.
"""

from __future__ import annotations

import torch

from zenlm.model.config import ModelConfig

# Dense bf16 peak TFLOP/s by device name fragment (no sparsity).
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def matmul_params(m: ModelConfig) -> int:
    h, kv = m.hidden_size, m.kv_heads * m.head_size
    q = m.num_attention_heads * m.head_size
    attn = h * q + 2 * h * kv + q * h
    mlp = 3 * h * m.intermediate_size
    return m.num_layers * (attn + mlp) + h * m.vocab_size


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    attention = 12 * m.num_layers * m.num_attention_heads * m.head_size * seq_len
    return 6 * matmul_params(m) + attention


def detect_peak_tflops() -> float:
    """Peak of the local accelerator, or 0 when unknown (then MFU is not reported)."""
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_TFLOPS.items() if k in name), 0.0)


def mfu(tokens_per_s: float, flops_token: float, world_size: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]; 0 when the peak is unknown."""
    if peak_tflops <= 0:
        return 0.0
    return tokens_per_s * flops_token / (world_size * peak_tflops * 1e12)
