"""Cross-section checks of a RunConfig against the world size, each error naming the numbers.

Returns the derived layout (degrees and batch shape) so the rest of the code never re-derives it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

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


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def check_values(cfg: RunConfig) -> None:
    """Per-field ranges: values that parse but make no sense, each naming the key and the fix."""
    m, d, o, c, lg, r = cfg.model, cfg.data, cfg.optim, cfg.checkpoint, cfg.logging, cfg.runtime
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
        value = getattr(m, key)
        _need(value >= 1, f"model.{key} must be >= 1, got {value}")
    _need(
        m.num_attention_heads >= 1,
        f"model.num_attention_heads must be >= 1, got {m.num_attention_heads}",
    )
    _need(
        m.num_kv_heads is None or m.num_kv_heads >= 1,
        f"model.num_kv_heads must be >= 1 (1 = multi-query) or null (= num_attention_heads), "
        f"got {m.num_kv_heads}",
    )
    _need(
        m.head_dim is None or m.head_dim >= 2,
        f"model.head_dim must be >= 2 or null, got {m.head_dim}",
    )
    _need(
        m.vocab_pad_multiple >= 1,
        f"model.vocab_pad_multiple must be >= 1, got {m.vocab_pad_multiple}",
    )
    _need(m.max_seq_len >= 1, f"model.max_seq_len must be >= 1, got {m.max_seq_len}")
    for key in ("rope_theta", "rms_norm_eps", "init_std"):
        value = getattr(m, key)
        _need(value > 0, f"model.{key} must be > 0, got {value}")
    if m.rope_scaling.type != "none":
        rs = m.rope_scaling
        _need(
            rs.factor > 0 and rs.low_freq_factor > 0 and rs.high_freq_factor > rs.low_freq_factor,
            "model.rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got "
            f"factor={rs.factor}, low={rs.low_freq_factor}, high={rs.high_freq_factor}",
        )
    _need(
        cfg.parallel.data_parallel_degree >= 0,
        f"parallel.data_parallel_degree must be >= 0 (0 = derived), got {cfg.parallel.data_parallel_degree}",
    )

    for i, corpus in enumerate(d.corpora):
        _need(bool(corpus.path), f"data.corpora[{i}].path is empty: give the corpus directory")
        _need(corpus.weight > 0, f"data.corpora[{i}].weight must be > 0, got {corpus.weight}")
    _need(d.seq_len_tokens >= 1, f"data.seq_len_tokens must be >= 1, got {d.seq_len_tokens}")
    _need(
        d.grad_accum_steps >= 0,
        f"data.grad_accum_steps must be >= 0 (0 = derived), got {d.grad_accum_steps}",
    )
    _need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")

    _need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _need(
        0 <= o.min_lr <= o.lr,
        f"optim.min_lr ({o.min_lr}) must be in [0, optim.lr = {o.lr}]: it is the floor the "
        "schedule decays to",
    )
    _need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        _need(0 <= value < 1, f"optim.{key} must be in [0, 1), got {value}")
    _need(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _need(
        o.grad_clip_norm >= 0,
        f"optim.grad_clip_norm must be >= 0 (0 disables clipping), got {o.grad_clip_norm}",
    )
    _need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _need(
        0 < o.decay_fraction <= 1,
        f"optim.decay_fraction must be in (0, 1] (the share of train_steps in the final decay), "
        f"got {o.decay_fraction}",
    )

    _need(
        c.save_interval_steps >= 0,
        f"checkpoint.save_interval_steps must be >= 0 (0 = only at the end), got {c.save_interval_steps}",
    )
    _need(c.keep_last >= 0, f"checkpoint.keep_last must be >= 0 (0 = keep all), got {c.keep_last}")
    _need(
        c.keep_every_steps >= 0,
        f"checkpoint.keep_every_steps must be >= 0, got {c.keep_every_steps}",
    )
    _need(
        c.max_consecutive_nonfinite_steps >= 0,
        f"checkpoint.max_consecutive_nonfinite_steps must be >= 0 (0 = never stop), got {c.max_consecutive_nonfinite_steps}",
    )
    _need(
        c.loss_spike_factor == 0 or c.loss_spike_factor > 1,
        f"checkpoint.loss_spike_factor must be 0 (off) or > 1, got {c.loss_spike_factor}",
    )
    _need(
        c.loss_spike_window_steps >= 1,
        f"checkpoint.loss_spike_window_steps must be >= 1, got {c.loss_spike_window_steps}",
    )
    _need(
        bool(c.resume.strip()),
        "checkpoint.resume is empty: use 'auto', 'none' or the path of a checkpoint directory",
    )

    _need(bool(lg.run_dir), "logging.run_dir is empty: give the parent directory of runs")
    _need(
        bool(_SAFE_NAME.match(lg.run_name)) and ".." not in lg.run_name,
        f"logging.run_name={lg.run_name!r} must be one plain directory name (letters, digits, "
        "'.', '_', '-', no '/' or '..'): the run lives in <run_dir>/<run_name>",
    )
    _need(
        lg.log_interval_steps >= 1,
        f"logging.log_interval_steps must be >= 1, got {lg.log_interval_steps}",
    )
    _need(
        lg.eval_interval_steps >= 0,
        f"logging.eval_interval_steps must be >= 0 (0 = no validation), got {lg.eval_interval_steps}",
    )
    _need(
        lg.eval_samples >= 1 or lg.eval_interval_steps == 0,
        f"logging.eval_samples must be >= 1 when validation is on, got {lg.eval_samples} "
        "(set logging.eval_interval_steps=0 to turn validation off)",
    )
    _need(
        lg.peak_tflops_per_device >= 0,
        f"logging.peak_tflops_per_device must be >= 0 (0 = detect), got {lg.peak_tflops_per_device}",
    )
    _need(
        r.torch_threads >= 0,
        f"runtime.torch_threads must be >= 0 (0 = torch's default), got {r.torch_threads}",
    )
    _need(r.dist_timeout_s >= 1, f"runtime.dist_timeout_s must be >= 1, got {r.dist_timeout_s}")


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


@functools.cache
def _compile_failure(device_type: str) -> str | None:
    """Why torch.compile (inductor) cannot build kernels for `device_type`, or None when it can.

    The cheap checks first (dynamo on this Python; a C++ compiler for CPU kernels, Triton for
    CUDA ones), then the real thing: one tiny pointwise function compiled and run on the device,
    which also catches a compiler without the headers inductor needs. Cached per process: a few
    seconds the first time (inductor's cache makes later processes faster)."""
    import torch

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) does not support this Python version"
    if device_type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:
            return (
                "no C++ compiler found: inductor builds CPU kernels with one (install g++, or "
                "point the CXX environment variable at a compiler)"
            )
    else:
        from torch.utils._triton import has_triton

        if not has_triton():
            return f"Triton is not installed or does not support this {device_type} device"

    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + 1

    try:
        x = torch.linspace(-1, 1, 16, device=device_type)
        got = torch.compile(probe, dynamic=False)(x)
        torch.testing.assert_close(got, probe(x))
    except Exception as e:
        # dynamo wraps the backend's error (BackendCompilerFailed: "backend='inductor'
        # raised:"); name the inner one, e.g. CppCompileError and the compiler's first line.
        inner = getattr(e, "inner_exception", None) or e
        # A CppCompileError carries the compiler's own output: its first error line says why.
        text = str(getattr(inner, "output", "") or inner)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        lines = errors or lines
        return (
            f"a test kernel failed to build ({type(inner).__name__}: "
            f"{lines[0][:200] if lines else 'no message'})"
        )
    return None


def check_compile_supported(device_type: str | None = None) -> None:
    """Refuse runtime.compile_enabled when torch.compile cannot build kernels on this device.

    device_type defaults to the one a run trains on: 'cuda' when CUDA is present, else 'cpu'
    (as zenlm.runtime.env picks nccl or gloo)."""
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    reason = _compile_failure(device_type)
    if reason is not None:
        raise ConfigError(
            f"runtime.compile_enabled=true cannot work on this {device_type} host: {reason}; "
            "fix that or set runtime.compile_enabled=false"
        )


def validate(cfg: RunConfig, world_size: int, check_device: bool = True) -> Layout:
    """Check every field and cross-section constraint; return the derived Layout.

    check_device=False skips the checks that ask this device (precision support via DeepSpeed;
    the torch.compile probe when runtime.compile_enabled), so a launcher can run everything else
    before importing DeepSpeed; zenlm.train.build runs the compile probe before compiling."""
    check_values(cfg)
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
    if cfg.runtime.compile_enabled and p.zero_stage == 3:
        # Measured (torch 2.13, DeepSpeed 0.19): ZeRO-3 gathers each layer's weights in forward
        # hooks that DeepSpeed marks torch.compiler.disable, so dynamo breaks the graph at every
        # linear and norm (17 graphs for 2 blocks): the losses stay right, but the fusions that
        # compile exists for are gone and each fragment still costs compile time.
        raise ConfigError(
            "runtime.compile_enabled=true with parallel.zero_stage=3: ZeRO-3's per-layer "
            "parameter gathering (forward hooks torch.compile must skip) splits every block "
            "into one graph per layer; use zero_stage 1 or 2 (tensor/pipeline parallelism for "
            "memory), or runtime.compile_enabled=false"
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
    if check_device:
        check_precision_supported(cfg.runtime.precision)
        if cfg.runtime.compile_enabled:
            check_compile_supported()
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


def run_dir(cfg: RunConfig) -> Path:
    """<logging.run_dir>/<logging.run_name>: config.yaml, tb/, the STOP flag file."""
    return Path(cfg.logging.run_dir) / cfg.logging.run_name


def checkpoint_dir(cfg: RunConfig) -> Path:
    """checkpoint.dir, or <run dir>/checkpoints when it is ''."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir(cfg) / "checkpoints"
