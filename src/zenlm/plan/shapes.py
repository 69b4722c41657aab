"""Which parameter tensors one rank holds, in the order the engine flattens them.

Mirrors how zenlm builds a model (zenlm.model.transformer, zenlm.parallel.tensor,
zenlm.parallel.pipeline), without building it:

- Tensor parallelism (megatron-core): q/k/v, gate/up (column-parallel) and o_proj, down_proj
  (row-parallel) hold 1/t of their weight; q/k/v biases (Qwen2) 1/t of theirs; the embedding and
  the LM head (vocab-parallel) hold padded_vocab / t rows, padded_vocab = vocab rounded up to
  vocab_pad_multiple x t; RMSNorm weights are replicated (full on every TP rank).
- Pipeline parallelism (DeepSpeed PipelineModule): the layer specs are
  [Embedding, _contiguous, Block x L, OutputHead] (+ the tied logits spec when embeddings are
  tied), split by DeepSpeed's partition_balanced over one weight per spec: 1 per Block for
  pipeline_split=layers ('type:Block'), each spec's local parameter count for 'parameters'.
  A tied embedding is a full copy on the first and on the last stage (its own gradient and
  optimizer state on each).
- Optimizer groups (zenlm.parallel.engine.optimizer_param_groups): [weight decay, no decay],
  empty groups dropped; decay = matrices that are not embeddings (q/k/v/o, MLP, untied head).
  Order inside a group = module.named_parameters(): a PipelineModule registers its tied modules
  before its layers.

Everything here is integer arithmetic on the config: no torch, no model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from zenlm.model.config import ModelConfig


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor on one rank."""

    name: str
    """Canonical name, e.g. 'layers.3.attention.q_proj.weight'."""
    numel: int
    """Elements on this rank (after TP sharding)."""
    decay: bool
    """In the weight-decay optimizer group (else the no-decay group)."""


@dataclass(frozen=True)
class StageParams:
    """The parameters of one pipeline stage on one TP rank (every TP rank holds the same counts)."""

    stage: int
    blocks: tuple[int, ...]
    """Indices of the transformer blocks on this stage."""
    has_embedding: bool
    """The input embedding (or, tied, the first copy of it) lives here."""
    has_head: bool
    """The final norm and LM head (or, tied, the second embedding copy) live here."""
    tensors: tuple[ParamTensor, ...]
    """In named_parameters() order."""

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def groups(self) -> list[list[int]]:
        """numel lists of the optimizer's groups as DeepSpeed sees them: decay, then no decay,
        empty ones dropped."""
        decay = [t.numel for t in self.tensors if t.decay]
        no_decay = [t.numel for t in self.tensors if not t.decay]
        return [g for g in (decay, no_decay) if g]


def local_vocab(m: ModelConfig, tp: int) -> int:
    """Embedding / LM head rows on one TP rank: the padded vocabulary split over TP."""
    return m.padded_vocab_size(tp) // tp


def embedding_tensors(m: ModelConfig, tp: int) -> list[ParamTensor]:
    return [ParamTensor("embed.embedding.weight", local_vocab(m, tp) * m.hidden_size, False)]


def block_tensors(m: ModelConfig, tp: int, i: int) -> list[ParamTensor]:
    """Block i's tensors in registration order: norm, q, k, v (weight[, bias]), o, norm, MLP."""
    h, d = m.hidden_size, m.head_size
    q, kv = m.num_attention_heads * d // tp, m.kv_heads * d // tp  # local output widths
    p = f"layers.{i}."
    out = [ParamTensor(p + "attention_norm.weight", h, False)]
    for proj, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        out.append(ParamTensor(f"{p}attention.{proj}.weight", width * h, True))
        if m.qkv_bias:
            out.append(ParamTensor(f"{p}attention.{proj}.bias", width, False))
    out.append(ParamTensor(p + "attention.o_proj.weight", h * q, True))
    out.append(ParamTensor(p + "mlp_norm.weight", h, False))
    inner = m.intermediate_size // tp
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out.append(ParamTensor(f"{p}mlp.{proj}.weight", inner * h, True))
    return out


def head_tensors(m: ModelConfig, tp: int) -> list[ParamTensor]:
    out = [ParamTensor("head.norm.weight", m.hidden_size, False)]
    if not m.tie_word_embeddings:
        out.append(ParamTensor("head.output.weight", local_vocab(m, tp) * m.hidden_size, True))
    return out


def partition_balanced(weights: tuple[int, ...], num_parts: int) -> list[int]:
    """DeepSpeed's deepspeed.runtime.utils.partition_balanced, in plain Python.

    The linear-partition dynamic programme (minimise max - min part weight; ties go to the
    last split point, as DeepSpeed's `>=`). Returns num_parts + 1 boundaries into `weights`.
    tests/unit/test_plan.py checks it against DeepSpeed's own function.
    """
    return list(_partition_balanced(tuple(weights), num_parts))


@functools.cache
def _partition_balanced(weights: tuple[int, ...], m: int) -> tuple[int, ...]:
    n = len(weights)
    if n <= m:  # DeepSpeed's partition_uniform for this edge case
        return tuple(min(p, n) for p in range(m + 1))
    inf = float("inf")
    prefix = [0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + w
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    dp_max[0][0] = 0
    dp_cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                max_sum = max(dp_max[k][j - 1], part)
                min_sum = min(dp_min[k][j - 1], part)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j] = cost
                    dp_max[i][j] = max_sum
                    dp_min[i][j] = min_sum
                    position[i][j] = k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(position[parts[-1]][j])
    return tuple(reversed(parts))


def _spec_weights(m: ModelConfig, tp: int, split: str) -> tuple[int, ...]:
    """One weight per layer spec, as DeepSpeed's partition method sees it."""
    n_specs = m.num_layers + 3 + (1 if m.tie_word_embeddings else 0)
    if split == "layers":  # 'type:Block': 1 for each Block spec, 0 elsewhere
        return tuple(1 if 2 <= i < 2 + m.num_layers else 0 for i in range(n_specs))
    emb = sum(t.numel for t in embedding_tensors(m, tp))
    block = sum(t.numel for t in block_tensors(m, tp, 0))
    head = sum(t.numel for t in head_tensors(m, tp))
    weights = [emb, 0] + [block] * m.num_layers + [head]
    if m.tie_word_embeddings:
        weights.append(emb)  # the tied logits spec builds an Embedding too
    return tuple(weights)


def stage_params(m: ModelConfig, tp: int, pp: int, split: str = "layers") -> list[StageParams]:
    """Every pipeline stage's tensors on one TP rank (pp = 1: the whole model, as CausalLMLoss)."""
    if pp == 1:
        tensors = embedding_tensors(m, tp)
        for i in range(m.num_layers):
            tensors += block_tensors(m, tp, i)
        tensors += head_tensors(m, tp)
        return [StageParams(0, tuple(range(m.num_layers)), True, True, tuple(tensors))]
    weights = _spec_weights(m, tp, split)
    bounds = partition_balanced(weights, pp)
    last_spec = len(weights) - 1
    stages = []
    for s in range(pp):
        specs = range(bounds[s], bounds[s + 1])
        blocks = tuple(i - 2 for i in specs if 2 <= i < 2 + m.num_layers)
        has_embedding = 0 in specs
        head_spec = 2 + m.num_layers
        has_head = head_spec in specs or (m.tie_word_embeddings and last_spec in specs)
        tensors: list[ParamTensor] = []
        tied_here = m.tie_word_embeddings and (0 in specs or last_spec in specs)
        if tied_here:  # PipelineModule.tied_modules is registered before the layers
            tensors += embedding_tensors(m, tp)
        if has_embedding and not m.tie_word_embeddings:
            tensors += embedding_tensors(m, tp)
        for i in blocks:
            tensors += block_tensors(m, tp, i)
        if head_spec in specs:
            tensors += head_tensors(m, tp)
        stages.append(StageParams(s, blocks, has_embedding, has_head, tuple(tensors)))
    return stages


def model_parameter_count(m: ModelConfig) -> int:
    """Parameters of the whole model at TP 1 (padded vocabulary, a tied embedding once)."""
    return stage_params(m, 1, 1)[0].numel
