"""The one typed config tree of a zenlm run. Every field has a docstring under it.

Loaded from YAML plus ``a.b.c=value`` overrides by zenlm.config.load; checked against the world
size by zenlm.config.validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from zenlm.model.config import ModelConfig


@dataclass
class ParallelConfig:
    """How the world is split: world = tensor x pipeline x data."""

    tensor_parallel_degree: int = 1
    """Ranks sharing each layer's weights (megatron-core TP); keep inside a node."""
    pipeline_parallel_degree: int = 1
    """Pipeline stages (DeepSpeed PipelineModule, 1F1B)."""
    data_parallel_degree: int = 0
    """Model replicas; 0 = world_size // (tensor x pipeline)."""
    sequence_parallel_enabled: bool = False
    """Shard norms/dropout activations along the sequence across the TP group (needs TP > 1)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3. Stages 2 and 3 need pipeline_parallel_degree == 1."""
    pipeline_split: Literal["layers", "parameters"] = "layers"
    """Stage split: equal transformer-layer counts, or balanced parameter counts."""


@dataclass
class CorpusConfig:
    """One corpus directory written by tools/preprocess.py, and its share of the blend."""

    path: str = ""
    """Directory holding manifest.json and the tar shards."""
    weight: float = 1.0
    """Relative sampling weight when several corpora are blended."""


@dataclass
class DataConfig:
    """Corpora, tokenizer and batch shape."""

    corpora: list[CorpusConfig] = field(default_factory=list)
    """Training corpora, blended by weight. Validation uses their 'valid' splits."""
    tokenizer_path: str = ""
    """zenlm's SentencePiece .model file, or a Hugging Face tokenizer directory (tokenizer.json
    or tokenizer.model + tokenizer_config.json); its fingerprint must equal each corpus's."""
    seq_len_tokens: int = 128
    """Tokens per training sequence; must equal the corpora's seq_len."""
    global_batch_size_seqs: int = 8
    """Sequences per optimizer step across all data-parallel ranks."""
    micro_batch_size_seqs: int = 2
    """Sequences per forward pass on one rank."""
    grad_accum_steps: int = 0
    """Micro batches per step on each rank; 0 = derived (global / (micro x DP))."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    seed: int = 1234
    """Seed of the data order (a pure function of seed, epoch and global sample index)."""
    verify_checksums: bool = False
    """Check each shard's sha256 against its manifest on first open (once per process; reads the
    whole shard once more, see docs/data.md for the cost). tools/verify_corpus.py does the same
    offline for a whole corpus."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Floor of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to norms, biases or embeddings."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Linear warmup then cosine decay / warmup-stable-decay / constant."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr."""
    decay_fraction: float = 0.2
    """WSD only: fraction of train_steps spent in the final linear decay."""
    train_steps: int = 100
    """Optimizer steps of the run."""


@dataclass
class CheckpointConfig:
    """Where and when checkpoints are written and from where a run resumes."""

    dir: str = ""
    """Checkpoint directory; '' = <run_dir>/checkpoints."""
    save_interval_steps: int = 0
    """Save every N steps; 0 = only at the end."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted after a newer one is complete)."""
    resume: str = "auto"
    """'auto' = newest complete checkpoint if any, 'none', or a checkpoint path."""
    init_from: str = ""
    """Weights to start from when the run does not resume its own checkpoint (resume=none, or
    auto finding none): a checkpoint dir, e.g. written by `tools/convert.py import`. Weights
    only: fresh optimizer, step 0, data from the start. A requeued fine-tune resumes its own
    latest checkpoint instead. '' = random init."""
    keep_every_steps: int = 0
    """Also keep every checkpoint whose step is a multiple of this, forever; 0 = none."""
    max_consecutive_nonfinite_steps: int = 10
    """Stop with an error after this many skipped non-finite steps in a row; 0 = never stop."""
    loss_spike_factor: float = 3.0
    """Log a warning when a loss exceeds this x the mean of the recent window; 0 disables."""
    loss_spike_window_steps: int = 50
    """Finite losses in the spike detector's mean (no spikes are reported before it is full)."""


@dataclass
class LoggingConfig:
    """Run directory, console lines, TensorBoard and validation cadence."""

    run_dir: str = "runs"
    """Parent of every run's directory."""
    run_name: str = "debug"
    """The run's directory is <run_dir>/<run_name>."""
    log_interval_steps: int = 10
    """Steps between rank-0 console lines and TensorBoard scalars."""
    tensorboard_enabled: bool = True
    """Write TensorBoard events under <run>/tb on rank 0."""
    eval_interval_steps: int = 50
    """Steps between validation passes; 0 disables validation."""
    eval_samples: int = 64
    """Sequences in one validation pass: the first N of the corpora's blended 'valid' stream in
    natural order, split across data-parallel ranks. The same set at every layout, so the same
    weights give the same val/loss at any TP x PP x DP (sums are reduced, not means)."""
    peak_tflops_per_device: float = 0.0
    """Dense peak TFLOP/s of one accelerator for MFU; 0 = look the CUDA device up by name and
    precision (zenlm.metrics.throughput: H100/H200 SXM, PCIe and NVL, A100, L40S, ...). A device
    not in the table reports achieved TFLOP/s only, and says so once at start."""
    wandb_enabled: bool = False
    """Also send rank 0's scalars to Weights & Biases (needs the wandb package)."""
    wandb_project: str = "zenlm"
    """W&B project."""
    wandb_run_name: str = ""
    """W&B run name; '' = logging.run_name."""
    wandb_mode: Literal["online", "offline"] = "online"
    """'online' streams to W&B (needs `wandb login` or WANDB_API_KEY); 'offline' only writes
    <run>/wandb/offline-run-*/, which `wandb sync` uploads later."""


@dataclass
class RuntimeConfig:
    """Numerics, memory trade-offs, determinism."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """bf16 and fp16 keep fp32 master weights; fp16 uses dynamic loss scaling."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute every block ('full') or only the attention core ('selective') in backward."""
    compile_enabled: bool = False
    """torch.compile (inductor) each transformer block: fused kernels, same losses up to float
    rounding (docs/gpu.md). Compiles on the first step (tens of seconds); needs a C++
    compiler on CPU, Triton on CUDA (checked before the model is built)."""
    seed: int = 1234
    """Seed of parameter init and dropout."""
    torch_threads: int = 0
    """Intra-op CPU threads per process; 0 = leave torch's default."""
    dist_timeout_s: int = 600
    """Collective timeout: a dead rank makes the others fail after this many seconds."""


@dataclass
class RunConfig:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpora and batch shape."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging and validation."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Numerics and runtime."""
