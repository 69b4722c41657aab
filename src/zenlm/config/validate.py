"""Cross-section checks of a RunConfig against the world size, each error naming the numbers.

Returns the derived layout (degrees and batch shape) so the rest of the code never re-derives it.
"""

from __future__ import annotations

from dataclasses import dataclass

from zenlm.config.load import ConfigError
from zenlm.config.schema import RunConfig


@dataclass(frozen=True)
class Layout:
    """Degrees and batch shape of a run, derived once from (config, world size)."""

    world_size: int
    tensor_parallel_degree: int
    pipeline_parallel_degree: int
    data_parallel_degree: int
    micro_batch_size_seqs: int
    grad_accum_steps: int
    global_batch_size_seqs: int
    seq_len_tokens: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size_seqs * self.seq_len_tokens


def _check_model(cfg: RunConfig, tp: int, pp: int) -> None:
    from zenlm.model.transformer import check_model_config

    m = cfg.model
    try:
        check_model_config(m, tp)  # heads, kv heads, head_dim, intermediate size vs TP
    except ValueError as e:
        raise ConfigError(f"model.{e}") from e
    if cfg.parallel.pipeline_split == "layers" and m.num_layers % pp:
        raise ConfigError(
            f"model.num_layers ({m.num_layers}) is not divisible by "
            f"parallel.pipeline_parallel_degree ({pp}) (or use parallel.pipeline_split=parameters)"
        )
    if m.num_layers < pp:
        raise ConfigError(
            f"model.num_layers ({m.num_layers}) is smaller than "
            f"parallel.pipeline_parallel_degree ({pp}): a stage would hold no block"
        )
    if cfg.data.seq_len_tokens > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len_tokens ({cfg.data.seq_len_tokens}) exceeds model.max_seq_len ({m.max_seq_len})"
        )


_HALF = ("bf16", "fp16")


def check_precision_supported(precision: str) -> None:
    """Refuse a half precision this process's device cannot run, naming the device and the fix.

    Asks DeepSpeed's accelerator (the one its engine will use, so the answer matches the engine's
    own sanity check at initialize): CPUs report fp16 only with mkldnn fp16 support (AVX512-FP16
    / AMX-FP16), CUDA GPUs from compute capability 7.0. fp32 is always supported and costs no
    DeepSpeed import.
    """
    if precision not in _HALF:
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"bf16": bool(acc.is_bf16_supported()), "fp16": bool(acc.is_fp16_supported())}
    if supported[precision]:
        return
    instead = [p for p in _HALF if p != precision and supported[p]] + ["fp32"]
    raise ConfigError(
        f"runtime.precision={precision} is not supported on this device ({acc.device_name()}: "
        f"DeepSpeed's accelerator reports no {precision} support); use {' or '.join(instead)}"
    )


def validate(cfg: RunConfig, world_size: int) -> Layout:
    """Check every cross-section constraint; return the derived Layout."""
    p = cfg.parallel
    tp, pp = p.tensor_parallel_degree, p.pipeline_parallel_degree
    if tp < 1 or pp < 1:
        raise ConfigError(f"parallel degrees must be >= 1 (tensor={tp}, pipeline={pp})")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_parallel_degree x "
            f"pipeline_parallel_degree = {tp} x {pp} = {tp * pp}"
        )
    dp = p.data_parallel_degree or world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ConfigError(
            f"tensor x pipeline x data = {tp} x {pp} x {dp} = {tp * pp * dp} != world size {world_size}"
        )
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage must be 0-3, got {p.zero_stage}")
    if pp > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} with pipeline_parallel_degree={pp}: DeepSpeed's "
            "pipeline engine supports ZeRO stage 0 or 1 only (stages 2/3 partition gradients or "
            "parameters, which its 1F1B schedule does not handle); use zero_stage=1"
        )
    if cfg.runtime.precision == "bf16" and p.zero_stage == 0:
        # DeepSpeed keeps fp32 master weights and fp32 gradient accumulation for bf16 only in
        # its ZeRO optimizers; at stage 0 it refuses the mix ("unsupported mix of model_dtype
        # and grad_accum_dtype") or would accumulate in bf16.
        raise ConfigError(
            "runtime.precision=bf16 needs parallel.zero_stage >= 1 (fp32 master weights and "
            "fp32 gradient accumulation live in DeepSpeed's ZeRO optimizer; at data-parallel "
            "degree 1, stage 1 partitions nothing); set parallel.zero_stage=1"
        )
    if p.sequence_parallel_enabled and tp == 1:
        raise ConfigError("parallel.sequence_parallel_enabled needs tensor_parallel_degree > 1")
    if p.sequence_parallel_enabled and cfg.data.seq_len_tokens % tp:
        raise ConfigError(
            f"data.seq_len_tokens ({cfg.data.seq_len_tokens}) is not divisible by "
            f"tensor_parallel_degree ({tp}), required by sequence parallelism"
        )
    _check_model(cfg, tp, pp)

    d = cfg.data
    gbs, mbs = d.global_batch_size_seqs, d.micro_batch_size_seqs
    if mbs < 1 or gbs < 1:
        raise ConfigError(f"batch sizes must be >= 1 (global={gbs}, micro={mbs})")
    if gbs % (mbs * dp):
        raise ConfigError(
            f"data.global_batch_size_seqs ({gbs}) is not divisible by micro_batch_size_seqs x "
            f"data-parallel degree = {mbs} x {dp} = {mbs * dp}"
        )
    ga = gbs // (mbs * dp)
    if d.grad_accum_steps and d.grad_accum_steps != ga:
        raise ConfigError(
            f"data.grad_accum_steps ({d.grad_accum_steps}) != global / (micro x DP) = "
            f"{gbs} / ({mbs} x {dp}) = {ga}"
        )
    if pp > 1 and ga < pp:
        raise ConfigError(
            f"pipeline needs at least as many micro batches per step as stages: "
            f"grad_accum_steps = {ga} < pipeline_parallel_degree = {pp}; raise "
            "data.global_batch_size_seqs or lower data.micro_batch_size_seqs"
        )
    o = cfg.optim
    if o.train_steps < 1:
        raise ConfigError(f"optim.train_steps must be >= 1, got {o.train_steps}")
    if o.warmup_steps > o.train_steps:
        raise ConfigError(
            f"optim.warmup_steps ({o.warmup_steps}) exceeds optim.train_steps ({o.train_steps})"
        )
    check_precision_supported(cfg.runtime.precision)
    return Layout(
        world_size=world_size,
        tensor_parallel_degree=tp,
        pipeline_parallel_degree=pp,
        data_parallel_degree=dp,
        micro_batch_size_seqs=mbs,
        grad_accum_steps=ga,
        global_batch_size_seqs=gbs,
        seq_len_tokens=d.seq_len_tokens,
    )
