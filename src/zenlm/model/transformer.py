"""The Llama-family decoder as three kinds of stage: Embedding, Block (x num_layers), OutputHead.

Each stage is constructible on its own from (cfg, factory) so a pipeline split can place them;
between stages flows the tuple (hidden (b, s_local, h), position_ids (b, s), doc_ids (b, s)),
where s_local = s / tp under sequence parallelism and s otherwise. `Transformer` chains them.

Padded vocabulary: the embedding and head have cfg.padded_vocab_size(tp) rows (a multiple of
vocab_pad_multiple x tp, as megatron pads), but unlike megatron, which lets the model learn to
give padded rows low logits, the head sets their logits to -inf: they are never predicted, get
zero gradient, and the loss equals the unpadded model's loss exactly at every TP degree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.model.config import ModelConfig
from zenlm.model.factory import LayerFactory, PlainFactory, mark_vocab_param
from zenlm.model.layers import Attention, RMSNorm, SwiGLU

StageTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(hidden (b, s_local, h), position_ids (b, s), doc_ids (b, s)) passed between stages."""


def check_model_config(cfg: ModelConfig, tp_degree: int = 1) -> None:
    """Raise ValueError naming the numbers when the shape cannot be built (at this TP degree)."""
    if cfg.num_attention_heads % cfg.kv_heads:
        raise ValueError(
            f"num_attention_heads ({cfg.num_attention_heads}) is not divisible by "
            f"num_kv_heads ({cfg.kv_heads})"
        )
    if cfg.head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"hidden_size ({cfg.hidden_size}) is not divisible by num_attention_heads "
            f"({cfg.num_attention_heads}); set head_dim explicitly"
        )
    if cfg.head_size % 2:
        raise ValueError(f"head_dim ({cfg.head_size}) must be even for rotary embeddings")
    for name, value in [
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_kv_heads", cfg.kv_heads),
        ("intermediate_size", cfg.intermediate_size),
    ]:
        if value % tp_degree:
            raise ValueError(
                f"{name} ({value}) is not divisible by tensor_parallel_degree ({tp_degree})"
            )


def parameter_count(cfg: ModelConfig, include_embedding: bool = True) -> int:
    """Parameters of the unpadded model (tied embeddings counted once)."""
    h, d, L = cfg.hidden_size, cfg.head_size, cfg.num_layers
    q, kv = cfg.num_attention_heads * d, cfg.kv_heads * d
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if cfg.qkv_bias else 0)
    block = attention + 3 * h * cfg.intermediate_size + 2 * h
    vocab = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return L * block + h + (vocab if include_embedding else 0)


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) document ids -> (b, s) positions restarting at 0 where the document changes."""
    idx = torch.arange(doc_ids.shape[-1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - first


class VocabLogits(nn.Module):
    """Hidden (b, s_local, h) x vocab weight shard -> logits (b, s, local vocab), padding -inf.

    The hidden state enters the TP region first (gradient all-reduce, or the SP all-gather), as
    megatron does before its output layer.
    """

    def __init__(self, cfg: ModelConfig, factory: LayerFactory) -> None:
        super().__init__()
        self.enter_tp = factory.enter_tp()
        self.local_vocab = cfg.padded_vocab_size(factory.tp_degree) // factory.tp_degree
        start = factory.tp_rank * self.local_vocab
        # Real vocabulary entries in this rank's shard; the rest are padding.
        self.local_valid = min(max(cfg.vocab_size - start, 0), self.local_vocab)

    def forward(self, x: torch.Tensor, project: nn.Module | torch.Tensor) -> torch.Tensor:
        x = self.enter_tp(x)  # (b, s, h)
        logits = F.linear(x, project) if isinstance(project, torch.Tensor) else project(x)
        if self.local_valid < self.local_vocab:
            pad = torch.arange(self.local_vocab, device=logits.device) >= self.local_valid
            logits = logits.masked_fill(pad, float("-inf"))
        return logits  # (b, s, local vocab)


class Embedding(nn.Module):
    """ids (b, s) -> StageTuple. Default positions: 0..s-1, or per document when masking.

    With tied embeddings, `logits` is the LM head (after OutputHead's norm).
    """

    canonical_prefix = "embed."

    def __init__(self, cfg: ModelConfig, factory: LayerFactory) -> None:
        super().__init__()
        self.document_masking = cfg.document_masking
        self.sp_degree = factory.tp_degree if factory.sequence_parallel else 1
        self.embedding = factory.embedding(
            cfg.padded_vocab_size(factory.tp_degree), cfg.hidden_size
        )
        mark_vocab_param(self.embedding.weight, cfg.vocab_size)
        self.tied_logits = VocabLogits(cfg, factory) if cfg.tie_word_embeddings else None

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(
        self,
        input_ids: torch.Tensor | tuple[torch.Tensor, ...],
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> StageTuple:
        if isinstance(input_ids, tuple | list):  # a pipeline engine passes one tuple
            input_ids, position_ids, doc_ids = (*input_ids, None, None)[:3]
        if input_ids.shape[1] % self.sp_degree:
            raise ValueError(
                f"sequence length ({input_ids.shape[1]}) is not divisible by "
                f"tensor_parallel_degree ({self.sp_degree}) under sequence parallelism"
            )
        if doc_ids is None:
            doc_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            if self.document_masking:
                position_ids = positions_from_doc_ids(doc_ids)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
                position_ids = position_ids.expand_as(input_ids)
        return self.embedding(input_ids), position_ids, doc_ids  # (b, s_local, h), ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: normed hidden (b, s_local, h) -> logits (b, s, local padded vocab)."""
        if self.tied_logits is None:
            raise ValueError("Embedding.logits is the tied head; tie_word_embeddings is off")
        return self.tied_logits(hidden, self.embedding.weight)


class Block(nn.Module):
    """Pre-norm decoder block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.canonical_prefix = f"layers.{layer_idx}."
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory)
        self.attention = Attention(cfg, factory)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory)
        self.mlp = SwiGLU(cfg, factory)

    def forward(self, inputs: StageTuple) -> StageTuple:
        x, position_ids, doc_ids = inputs  # (b, s_local, h), (b, s), (b, s)
        x = x + self.attention(self.attention_norm(x), position_ids, doc_ids)
        x = x + self.mlp(self.mlp_norm(x))
        return x, position_ids, doc_ids


class OutputHead(nn.Module):
    """Final norm + LM head -> logits (b, s, local padded vocab), padded entries -inf.

    With tied embeddings `output` is None and the head returns the normed hidden state
    (b, s_local, h): `Embedding.logits` projects it with the embedding's weight. In a pipeline
    that is a TiedLayerSpec over Embedding with forward_fn=Embedding.logits after this stage.
    """

    canonical_prefix = "head."

    def __init__(self, cfg: ModelConfig, factory: LayerFactory) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, factory)
        self.output = None
        self.logits = None
        if not cfg.tie_word_embeddings:
            padded = cfg.padded_vocab_size(factory.tp_degree)
            self.output = factory.lm_head(cfg.hidden_size, padded)
            mark_vocab_param(self.output.weight, cfg.vocab_size)
            self.logits = VocabLogits(cfg, factory)

    def forward(self, inputs: StageTuple | torch.Tensor) -> torch.Tensor:
        x = inputs[0] if isinstance(inputs, tuple | list) else inputs
        x = self.norm(x)  # (b, s_local, h)
        return x if self.output is None else self.logits(x, self.output)


class Transformer(nn.Module):
    """A Llama-family decoder; `factory` decides single-device or tensor-parallel layers.

    `seed` initializes weights deterministically (zenlm.model.init): the same seed gives the
    same full weights at every TP degree. seed=None leaves them uninitialized.
    """

    def __init__(
        self, cfg: ModelConfig, factory: LayerFactory | None = None, *, seed: int | None = 0
    ) -> None:
        super().__init__()
        factory = factory or PlainFactory()
        check_model_config(cfg, factory.tp_degree)
        self.cfg = cfg
        self.factory = factory
        self.embed = Embedding(cfg, factory)
        self.layers = nn.ModuleList(Block(cfg, factory, i) for i in range(cfg.num_layers))
        self.head = OutputHead(cfg, factory)
        if seed is not None:
            from zenlm.model.init import init_weights

            init_weights(self, cfg, factory, seed)

    @property
    def norm(self) -> RMSNorm:
        return self.head.norm

    @property
    def output(self) -> nn.Module | None:
        return self.head.output

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (b, s) -> logits (b, s, local padded vocab)."""
        x = self.embed(input_ids, position_ids, doc_ids)
        for layer in self.layers:
            x = layer(x)
        x = self.head(x)
        return self.embed.logits(x) if self.head.output is None else x
