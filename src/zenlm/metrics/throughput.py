"""Model FLOPs per token, achieved TFLOP/s and MFU, and the peak FLOP/s of known devices.

FLOPs per training token (forward + backward = 3x forward), the PaLM appendix B count:
    6 * N_matmul  +  12 * num_layers * num_heads * head_dim * seq_len
N_matmul counts the weights that take part in matmuls: q/o projections at num_heads x head_dim,
k/v projections at num_kv_heads x head_dim (GQA and MQA shrink only these), the SwiGLU MLP's
three matrices and the output head (tied or not); not norms, not the input embedding lookup.
The attention term counts the score and context matmuls of every query head over the whole
sequence, as the kernels compute them: no halving for the causal mask (PaLM's convention) and no
discount for per-document masking, which zenlm applies as a dense mask to the full (T, T) scores.
Activation recomputation is not counted: MFU measures useful work, not hardware FLOPs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zenlm.model.config import ModelConfig


def matmul_params(m: ModelConfig) -> int:
    h, kv = m.hidden_size, m.kv_heads * m.head_size
    q = m.num_attention_heads * m.head_size
    attn = h * q + 2 * h * kv + q * h
    mlp = 3 * h * m.intermediate_size
    return m.num_layers * (attn + mlp) + h * m.vocab_size


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    attention = 12 * m.num_layers * m.num_attention_heads * m.head_size * seq_len
    return 6 * matmul_params(m) + attention


@dataclass(frozen=True)
class DevicePeak:
    """Dense (no 2:4 sparsity) peak TFLOP/s of one device by math mode; None = not supported."""

    name: str
    pattern: str
    """Regex searched in torch.cuda.get_device_name()."""
    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float


# First match wins, so specific names come before their family: "H100 NVL" and "H100 PCIe"
# before the SXM part ("NVIDIA H100 80GB HBM3"), "GH200" before "H200", "L40S" before "L40".
# Vendors publish tensor-core figures "with sparsity"; these are half of them (dense).
# Sources: NVIDIA H100 datasheet (SXM / PCIe / NVL columns), H200 datasheet (SXM / NVL), GH200
# datasheet, H800 datasheet, A100 datasheet (SXM4 and PCIe, 40 and 80 GB: the same peaks), L40S,
# L40, L4 and A10 datasheets, V100 datasheet (SXM2 / PCIe), HGX B200 datasheet (8-GPU figures
# / 8), AMD Instinct MI300X datasheet.
PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("H100 NVL", r"H100.*NVL", 835.5, 835.5, 417.5, 60.0),
    DevicePeak("H100 PCIe", r"H100.*PCIe", 756.5, 756.5, 378.0, 51.0),
    DevicePeak("GH200", r"GH200", 989.5, 989.5, 494.5, 67.0),
    DevicePeak("H200 NVL", r"H200.*NVL", 835.5, 835.5, 417.5, 60.0),
    DevicePeak("H200 SXM", r"H200", 989.5, 989.5, 494.5, 67.0),
    DevicePeak("H100 SXM", r"H100|H800", 989.5, 989.5, 494.5, 67.0),
    DevicePeak("A100", r"A100", 312.0, 312.0, 156.0, 19.5),
    DevicePeak("L40S", r"L40S", 362.05, 362.05, 183.0, 91.6),
    DevicePeak("L40", r"\bL40\b", 181.05, 181.05, 90.5, 90.5),
    DevicePeak("L4", r"\bL4\b", 121.0, 121.0, 60.0, 30.3),
    DevicePeak("A10", r"\bA10\b", 125.0, 125.0, 62.5, 31.2),
    DevicePeak("V100 PCIe", r"V100.*PCIE", None, 112.0, None, 14.0),
    DevicePeak("V100 SXM2", r"V100", None, 125.0, None, 15.7),
    DevicePeak("B200", r"\bB200\b", 2250.0, 2250.0, 1125.0, 75.0),
    DevicePeak("MI300X", r"MI300X", 1307.4, 1307.4, 653.7, 163.4),
)


def math_mode(precision: str, tf32_matmul: bool) -> str:
    """The matmul math of runtime.precision: bf16/fp16 tensor cores; fp32 runs TF32 tensor
    cores only where torch allows it (torch.backends.cuda.matmul.allow_tf32, off by default)."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32_matmul else "fp32"


def lookup_peak_tflops(device_name: str, mode: str) -> tuple[float, str]:
    """(dense peak TFLOP/s, table row) for a device name and math mode; (0, '') when unknown."""
    for peak in PEAKS:
        if re.search(peak.pattern, device_name, re.IGNORECASE):
            value = getattr(peak, mode)
            if value is None and mode == "tf32":
                value = peak.fp32  # no TF32 units: fp32 matmuls run on the FP32 units
            return (value or 0.0), peak.name
    return 0.0, ""


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def detect_peak_tflops(precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, description) of this process's device at runtime.precision; 0 unknown."""
    import torch

    name = device_name()
    if name == "cpu":
        return 0.0, "cpu"
    mode = math_mode(precision, bool(torch.backends.cuda.matmul.allow_tf32))
    value, row = lookup_peak_tflops(name, mode)
    return value, f"{name} ({row or 'not in the table'}, {mode})"


def achieved_tflops(tokens_per_s: float, flops_token: float, world_size: int) -> float:
    """Model TFLOP/s per device: tokens/s of the whole run x FLOPs per token / devices."""
    return tokens_per_s * flops_token / world_size / 1e12


def mfu(tokens_per_s: float, flops_token: float, world_size: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation in [0, 1]; 0 when the peak is unknown."""
    if peak_tflops <= 0:
        return 0.0
    return achieved_tflops(tokens_per_s, flops_token, world_size) / peak_tflops
