"""Estimated time of one optimizer step: compute, TP / PP / DP communication, bubble, update.

An estimate for ranking layouts, not a measurement. The model:

- Compute: matmul FLOPs (zenlm.metrics.throughput's count: 6 x matmul weights + attention per
  token) split over TP, per pipeline stage (blocks, plus the LM head on the last), divided by
  peak x `efficiency` (default 0.5: the fraction of dense peak a well-shaped bf16 GEMM stream
  reaches in eager PyTorch; an assumption, not measured here). Recomputation adds one block
  forward ('full') or the attention core's forward ('selective').
- TP: per block and micro batch, two all-reduces of the (b, s, h) activation forward and two
  backward (with SP the same volume as all-gathers + reduce-scatters), 2·(t-1)/t of it per GPU,
  on the critical path (zenlm's layers do not overlap them); full recomputation repeats the
  forward two. Over NVLink when the TP group fits a node.
- PP (1F1B): each micro batch sends its activation forward and its gradient back across each
  stage boundary, 1/t of (b, s, h) per GPU; the step takes (m + p - 1) x the slowest stage's
  micro-batch time, so the bubble (p - 1) / (m + p - 1) is idle time.
- DP, after the last backward (not overlapped): ZeRO 0 all-reduces the gradients
  (2·(d-1)/d of them per GPU; fp32 for fp32 and for bf16's fp32 accumulator), ZeRO 1/2
  reduce-scatters them ((d-1)/d) and all-gathers the updated weights ((d-1)/d);
  BF16_Optimizer all-reduces fp32 gradients, then all-gathers bf16 weights. Tied embeddings
  add one all-reduce of the embedding gradient between the first and last stage.
- Optimizer: AdamW over this rank's partition, bound by HBM bandwidth (about 28 bytes read
  and written per element, plus the copy back into the model's weights).
- Collectives reach `comm_efficiency` (0.8) of the nominal link bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from zenlm.metrics.throughput import flops_per_token
from zenlm.model.config import ModelConfig
from zenlm.plan.cluster import Cluster
from zenlm.plan.memory import DTYPE_BYTES
from zenlm.plan.shapes import StageParams, local_vocab

GB = 1e9


@dataclass(frozen=True)
class StepInputs:
    """A layout as the cost model needs it."""

    tp: int
    pp: int
    dp: int
    micro_batch_size_seqs: int
    micro_batches: int
    """Per data-parallel rank and step (grad_accum_steps)."""
    seq_len_tokens: int
    sequence_parallel: bool
    precision: str
    zero_stage: int
    """Effective stage (zenlm.parallel.engine.effective_zero_stage)."""
    optimizer_path: str
    checkpointing: str


@dataclass(frozen=True)
class StepEstimate:
    """Seconds of one optimizer step, by part, and what follows from them."""

    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_s: float
    optimizer_s: float
    tokens_per_step: int
    model_flops_per_step: float
    num_gpus: int
    peak_tflops: float

    @property
    def step_s(self) -> float:
        return (
            self.compute_s
            + self.tp_comm_s
            + self.pp_comm_s
            + self.bubble_s
            + self.dp_comm_s
            + self.optimizer_s
        )

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation this estimate implies (useful FLOPs / peak)."""
        return self.model_flops_per_step / (self.step_s * self.num_gpus * self.peak_tflops * 1e12)


def _block_forward_flops_per_token(m: ModelConfig, seq_len: int) -> tuple[float, float]:
    """(matmul FLOPs, attention-core FLOPs) of one block's forward, per token, whole model width."""
    h, d = m.hidden_size, m.head_size
    q, kv = m.num_attention_heads * d, m.kv_heads * d
    weights = h * q + 2 * h * kv + q * h + 3 * h * m.intermediate_size
    core = 4 * m.num_attention_heads * d * seq_len  # q k^T and p v, over the whole sequence
    return 2.0 * weights, float(core)


def _ring_all_reduce_s(bytes_: float, ranks: int, gb_s: float) -> float:
    return 2 * (ranks - 1) / ranks * bytes_ / (gb_s * GB) if ranks > 1 else 0.0


def _ring_one_way_s(bytes_: float, ranks: int, gb_s: float) -> float:
    """Reduce-scatter or all-gather of a `bytes_` tensor."""
    return (ranks - 1) / ranks * bytes_ / (gb_s * GB) if ranks > 1 else 0.0


def estimate_step(
    m: ModelConfig,
    x: StepInputs,
    stages: list[StageParams],
    cluster: Cluster,
    efficiency: float = 0.5,
    comm_efficiency: float = 0.8,
) -> StepEstimate:
    """Estimated seconds of one optimizer step of layout `x` on `cluster`."""
    e = DTYPE_BYTES[x.precision]
    t, p, d = x.tp, x.pp, x.dp
    tokens = x.micro_batch_size_seqs * x.seq_len_tokens  # per micro batch
    peak = cluster.peak_tflops(x.precision)
    flops_s = peak * 1e12 * efficiency
    tp_gb_s = cluster.link_gb_s(t) * comm_efficiency
    block_mm, block_core = _block_forward_flops_per_token(m, x.seq_len_tokens)
    recompute = {"none": 0.0, "selective": block_core, "full": block_mm + block_core}
    block_flops = (3 * (block_mm + block_core) + recompute[x.checkpointing]) * tokens / t
    head_flops = 3 * 2.0 * m.hidden_size * local_vocab(m, t) * tokens  # already per TP rank
    activation = tokens * m.hidden_size * e  # one (b, s, h) tensor, bytes
    per_block_ar = 4 + (2 if x.checkpointing == "full" else 0)
    block_tp_s = per_block_ar * _ring_all_reduce_s(activation, t, tp_gb_s)
    edge_tp_s = _ring_all_reduce_s(activation, t, tp_gb_s)  # embedding fwd / head input bwd

    # Slowest stage, per micro batch (forward + backward).
    stage_compute, stage_tp = [], []
    for st in stages:
        flops = len(st.blocks) * block_flops + (head_flops if st.has_head else 0.0)
        stage_compute.append(flops / flops_s)
        comm = len(st.blocks) * block_tp_s
        comm += edge_tp_s * (int(st.has_embedding) + int(st.has_head))
        stage_tp.append(comm)
    pp_s = 0.0
    if p > 1:
        pp_gb_s = cluster.link_gb_s(2 * t * d) * comm_efficiency  # neighbouring stages
        pp_s = 2 * (activation / t) / (pp_gb_s * GB)  # activation forward, gradient back
        if not x.sequence_parallel:  # the receiver all-gathers the 1/t partitions over TP
            pp_s += 2 * _ring_one_way_s(activation, t, tp_gb_s)
    slowest = max(range(p), key=lambda i: stage_compute[i] + stage_tp[i])
    busy = stage_compute[slowest] + stage_tp[slowest] + pp_s
    mb = x.micro_batches
    compute_s = mb * stage_compute[slowest]
    tp_comm_s = mb * stage_tp[slowest]
    pp_comm_s = mb * pp_s
    bubble_s = (p - 1) * busy

    # Data parallel and the update, on the largest stage.
    n = max(st.numel for st in stages)
    dp_gb_s = cluster.link_gb_s(t * d) * comm_efficiency  # DP ranks are t apart within a stage
    path = x.optimizer_path
    if path == "torch":
        dp_s = _ring_all_reduce_s(4 * n, d, dp_gb_s)
    elif path == "fp16_unfused":
        dp_s = _ring_all_reduce_s(2 * n, d, dp_gb_s)
    elif path == "bf16_optimizer":
        dp_s = _ring_all_reduce_s(4 * n, d, dp_gb_s) + _ring_one_way_s(2 * n, d, dp_gb_s)
    else:
        dp_s = 2 * _ring_one_way_s(e * n, d, dp_gb_s)
    if p > 1 and m.tie_word_embeddings:
        emb = local_vocab(m, t) * m.hidden_size * e
        dp_s += _ring_all_reduce_s(emb, 2, cluster.link_gb_s(cluster.num_gpus) * comm_efficiency)
    partition = n / d if x.zero_stage > 0 else n
    optimizer_s = (28 * partition + e * n) / (cluster.gpu.hbm_gb_s * GB * 0.7)

    global_tokens = x.micro_batch_size_seqs * mb * d * x.seq_len_tokens
    return StepEstimate(
        compute_s=compute_s,
        tp_comm_s=tp_comm_s,
        pp_comm_s=pp_comm_s,
        bubble_s=bubble_s,
        dp_comm_s=dp_s,
        optimizer_s=optimizer_s,
        tokens_per_step=global_tokens,
        model_flops_per_step=flops_per_token(m, x.seq_len_tokens) * global_tokens,
        num_gpus=t * p * d,
        peak_tflops=peak,
    )
