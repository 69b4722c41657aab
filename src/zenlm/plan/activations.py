"""Activation memory of one rank: the tensors autograd keeps from forward to backward.

Counted from zenlm's own layers (zenlm.model.layers, zenlm.parallel.tensor), per token of a
micro batch (b x s tokens) and transformer block, e = bytes of the model dtype (2 for bf16 /
fp16, 4 for fp32), t = TP degree, q = heads x head_dim, k = kv_heads x head_dim, I = MLP width:

| saved for backward | bytes per token | why |
| --- | --- | --- |
| each RMSNorm (x2): fp32 input, rsqrt, normalised input | 4h + 4 + e·h | `x.float()`, `rsqrt`, `x32.to(dtype)` before the weight multiply |
| each norm output = input of q/k/v (gate/up) | e·h | the weight multiply's result; under SP the all-gathered (full-sequence) copy |
| RoPE cos, sin | 2·e·head_dim | the multiplies save them; not split by TP |
| q, k (after RoPE), v | e·(q + 2k)/t | SDPA's inputs |
| SDPA output = o_proj input | e·q/t | one storage (flash kernels return a (b, s, n, d) buffer); +e·q/t under SP at b > 1 (o_proj's contiguous (s, b, ·) copy) |
| SDPA logsumexp | 4·heads/t | fp32, flash / memory-efficient kernels |
| gate, silu(gate), up, gate·up | 4·e·I/t | |

Under SP the norms' own tensors are 1/t (each rank normalises s/t tokens). Flash attention
keeps no (s x s) scores: this is Korthikanti et al. (2022)'s 34·h per token without its
5·a·s/h score term, adapted to these layers (they count 2-byte activations, dropout masks and
no fp32 norm copies; zenlm has no dropout, keeps fp32 norm inputs and a gated MLP).
Per-document masking (model.document_masking) adds the (b, 1, s, s) mask per block (SDPA turns
the boolean mask into an additive one in the model dtype and keeps that: e·s per token) and,
with GQA, k and v repeated to all heads.

Activation checkpointing: 'full' keeps each block's input, e·h per token (/t under SP), and
recomputes one block at a time in backward (its full activations become working memory);
'selective' recomputes only the attention core, dropping what SDPA alone saves (logsumexp, and
the output under SP, the mask and repeated k/v): q, k, v stay as the checkpoint's inputs.

Outside the blocks: the first stage keeps the token ids, the last the labels (int64 each); the
last stage also keeps the final norm's tensors and the fp32 softmax of the local vocabulary
shard, 4·V/t per token (torch's log_softmax or megatron's vocab-parallel cross entropy).

Pipeline (DeepSpeed 1F1B): stage k holds min(p - k, m) micro batches in flight, so the first
stage keeps p micro batches' worth of its L/p blocks (about L blocks' worth, whatever p).
DeepSpeed's pipe buffers add, per in-flight micro batch, the received input (b, s, h) (s/t
under SP) on stages > 0 and the kept 1/t output on stages < p - 1.

Working memory (transient, one micro batch, on top of the saved tensors): the logits in the
model dtype while the softmax is made, plus their fp32 copy at TP 1 in bf16 (e·V/t, + 4·V per
token; at TP > 1 megatron's fp32 copy becomes the saved softmax), and under full checkpointing
one recomputed block (conservative: by then the head's softmax is freed). Saved tensors and the
forward peak are measured on CPU against live tensors: tests/distributed/test_plan_memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from zenlm.model.config import ModelConfig
from zenlm.plan.memory import DTYPE_BYTES
from zenlm.plan.shapes import local_vocab


@dataclass(frozen=True)
class ActivationShape:
    """What decides activation memory on one rank."""

    micro_batch_size_seqs: int
    seq_len_tokens: int
    tensor_parallel_degree: int
    sequence_parallel: bool
    precision: str
    checkpointing: str
    """'none', 'selective' or 'full'."""

    @property
    def tokens(self) -> int:
        return self.micro_batch_size_seqs * self.seq_len_tokens


def _norm_bytes_per_token(m: ModelConfig, a: ActivationShape) -> float:
    """One RMSNorm and the linear input it feeds (see the table)."""
    e, t, h = DTYPE_BYTES[a.precision], a.tensor_parallel_degree, m.hidden_size
    own = 4 * h + 4 + e * h
    return own / t + e * h if a.sequence_parallel else own + e * h


def block_bytes(m: ModelConfig, a: ActivationShape, mode: str | None = None) -> int:
    """Bytes one block keeps for backward per micro batch (mode defaults to a.checkpointing)."""
    mode = a.checkpointing if mode is None else mode
    e, t, s = DTYPE_BYTES[a.precision], a.tensor_parallel_degree, a.seq_len_tokens
    h, d = m.hidden_size, m.head_size
    q, kv = m.num_attention_heads * d / t, m.kv_heads * d / t
    if mode == "full":
        per_token = e * h / (t if a.sequence_parallel else 1)
        return round(per_token * a.tokens)
    per_token = 2 * _norm_bytes_per_token(m, a) + 2 * e * d  # norms + linear inputs, cos/sin
    per_token += 4 * e * m.intermediate_size / t  # gate, silu, up, product
    # Under SP, o_proj gets a (s, b, .) contiguous copy of SDPA's output, except at b = 1, where
    # that transpose is already contiguous and the copy is the output itself.
    o_proj_copy = e * q if a.sequence_parallel and a.micro_batch_size_seqs > 1 else 0.0
    masked = m.document_masking
    if mode == "selective":  # SDPA's own saves are recomputed; its inputs and output stay
        out = 0.0 if o_proj_copy else e * q  # with the copy, nothing else keeps the output
        per_token += e * (q + 2 * kv) + out + o_proj_copy
    else:
        kv_saved = q if masked else kv  # masked GQA repeats k and v to every query head
        per_token += e * (q + 2 * kv_saved) + e * q + o_proj_copy + 4 * m.num_attention_heads / t
        if masked:  # SDPA keeps the mask as an additive (b, 1, s, s) one in the model dtype
            per_token += e * s
    return round(per_token * a.tokens)


def head_bytes(m: ModelConfig, a: ActivationShape) -> int:
    """Saved by the final norm, LM head and loss per micro batch (last stage)."""
    per_token = _norm_bytes_per_token(m, a) + 4 * local_vocab(m, a.tensor_parallel_degree)
    return round(per_token * a.tokens)


def batch_bytes(a: ActivationShape, first: bool, last: bool) -> int:
    """The micro batch itself: int64 token ids on the first stage, int64 labels on the last
    (the embedding and the loss keep them for backward). At TP > 1 megatron's vocab-parallel
    embedding also keeps its shifted ids and out-of-shard mask (9 B per token), its cross
    entropy the shifted targets and mask, and zenlm's loss the valid-label mask (10 B)."""
    tp = a.tensor_parallel_degree > 1
    first_bytes = 8 + (9 if tp else 0)
    last_bytes = 8 + (10 if tp else 0)
    return a.tokens * (first_bytes * int(first) + last_bytes * int(last))


def head_working_bytes(m: ModelConfig, a: ActivationShape) -> int:
    """Transient at the loss: logits in the model dtype beside their fp32 copy (see docstring)."""
    e, t = DTYPE_BYTES[a.precision], a.tensor_parallel_degree
    v = local_vocab(m, t)
    per_token = e * v  # the logits (or their -inf-masked copy: the unmasked ones are freed)
    if t == 1 and e != 4:
        per_token += 4 * v  # torch: logits.float() is a second tensor beside the saved softmax
    return per_token * a.tokens


def pipe_buffer_bytes(m: ModelConfig, a: ActivationShape, first: bool, last: bool) -> int:
    """DeepSpeed pipe buffers of one in-flight micro batch: received input, kept output."""
    e, t = DTYPE_BYTES[a.precision], a.tensor_parallel_degree
    full = e * m.hidden_size * a.tokens
    received = 0 if first else (full // t if a.sequence_parallel else full)
    kept = 0 if last else full // t
    return received + kept


@dataclass(frozen=True)
class StageActivations:
    """Activation bytes of one pipeline stage's rank."""

    saved: int
    """Kept for backward, summed over the in-flight micro batches (pipe buffers included)."""
    working: int
    """Transient peak of one micro batch on top of `saved`."""
    in_flight: int
    """Micro batches whose activations this stage holds at once in 1F1B."""

    @property
    def total(self) -> int:
        return self.saved + self.working


def stage_activations(
    m: ModelConfig,
    a: ActivationShape,
    num_blocks: int,
    stage: int,
    pp: int,
    micro_batches: int,
) -> StageActivations:
    """Activation memory of stage `stage` of `pp`, holding `num_blocks` blocks."""
    first, last = stage == 0, stage == pp - 1
    in_flight = min(pp - stage, micro_batches)
    per_micro = num_blocks * block_bytes(m, a)
    per_micro += batch_bytes(a, first, last)
    if last:
        per_micro += head_bytes(m, a)
    if pp > 1:
        per_micro += pipe_buffer_bytes(m, a, first, last)
    working = head_working_bytes(m, a) if last else 0
    if a.checkpointing == "full" and num_blocks:
        working = max(working, block_bytes(m, a, "none"))
    return StageActivations(in_flight * per_micro, working, in_flight)
