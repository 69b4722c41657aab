"""Architecture of a Llama-family decoder. Architecture only: no parallel degrees, no batch sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RopeScalingConfig:
    """Rotary frequency scaling. 'llama3' is the Llama-3.1 long-context rule."""

    type: Literal["none", "llama3"] = "none"
    """'none' keeps plain RoPE frequencies; 'llama3' rescales low frequencies."""
    factor: float = 8.0
    """Llama-3 scale factor for the lowest frequencies."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are untouched."""
    original_max_position_embeddings: int = 8192
    """Context length the unscaled model was trained at."""


@dataclass
class ModelConfig:
    """A Llama-family decoder; Mistral and Qwen2 differ only in these fields."""

    name: str = "debug"
    """A label for logs and checkpoints."""
    vocab_size: int = 512
    """Tokenizer vocabulary size. The embedding is padded to vocab_pad_multiple x TP at build."""
    vocab_pad_multiple: int = 128
    """Embedding rows are padded to a multiple of this times the tensor-parallel degree."""
    hidden_size: int = 64
    """Model width (d_model)."""
    intermediate_size: int = 172
    """SwiGLU inner width."""
    num_layers: int = 2
    """Transformer blocks."""
    num_attention_heads: int = 4
    """Query heads."""
    num_kv_heads: int | None = None
    """Key/value heads: None = num_attention_heads (MHA), 1 = MQA, otherwise GQA."""
    head_dim: int | None = None
    """Per-head width; None = hidden_size // num_attention_heads."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """Optional long-context frequency scaling."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output head."""
    max_seq_len: int = 4096
    """Longest sequence the rotary tables are built for."""
    init_std: float = 0.02
    """Std of the normal init; output projections of each block are scaled by 1/sqrt(2*num_layers)."""
    document_masking: bool = False
    """Mask attention so tokens attend only within their own document of a packed sequence."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_degree: int = 1) -> int:
        multiple = self.vocab_pad_multiple * tensor_parallel_degree
        return -(-self.vocab_size // multiple) * multiple
