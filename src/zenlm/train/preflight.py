"""Everything a run can check before it imports DeepSpeed and megatron or spends a step.

    layout = preflight(cfg, world_size)    # raises ZenlmError (one line, names the culprit)

In order: every field's range and the cross-section layout (zenlm.config.validate, except the
device's precision support, which needs DeepSpeed), the places the run writes (run dir,
TensorBoard, checkpoints: each must be a directory this process can create files in), the
tokenizer, the corpora (manifests, shards on disk, seq_len, tokenizer fingerprint, vocabulary
against model.vocab_size, a valid split when validation is on) and `checkpoint.resume` (the
value, and whether the newest readable checkpoint fits this model and tokenizer). With
`logging.wandb_enabled`, the wandb package must be installed.

launch/train.py calls it before importing the Trainer, so a bad input costs about a second (the
torch import), not the 5-50 s of the framework imports; the Trainer calls it again (cheap) so
runs built in Python get the same checks. Every error is deterministic across ranks, so the CLI
prints it once (rank 0).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from zenlm.checkpoint.compat import check_compatible
from zenlm.checkpoint.io import CheckpointError
from zenlm.checkpoint.store import CheckpointStore, read_meta, step_dir_name
from zenlm.config.load import ConfigError
from zenlm.config.schema import RunConfig
from zenlm.config.validate import Layout, checkpoint_dir, run_dir, validate
from zenlm.errors import ZenlmError
from zenlm.runtime.slurm import adopt_slurm_env


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (or SLURM_NTASKS in a bare srun task); 1 for a plain
    process."""
    adopt_slurm_env()
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment WORLD_SIZE={raw!r} is not an integer") from None


def check_writable_dir(path: Path, what: str) -> None:
    """`path` is (or can be made) a directory this process can create files in. Creates it."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file, not a directory; point it at a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what}: cannot create {path}: {parent} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".zenlm-write-probe-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{what}: cannot write in {path} ({e.strerror or e}); choose a writable place"
        ) from None


def check_output_dirs(cfg: RunConfig) -> None:
    run = run_dir(cfg)
    check_writable_dir(run, "logging.run_dir/logging.run_name (the run directory)")
    if cfg.logging.tensorboard_enabled:
        check_writable_dir(run / "tb", "TensorBoard directory (logging.tensorboard_enabled)")
    ckpt = checkpoint_dir(cfg)
    check_writable_dir(
        ckpt, f"checkpoint.dir{'' if cfg.checkpoint.dir else ' (default <run>/checkpoints)'}"
    )
    config_file = run / "config.yaml"
    if config_file.exists() and not config_file.is_file():
        raise ConfigError(f"{config_file} is not a file: the run writes its resolved config there")


def check_tokenizer(cfg: RunConfig) -> tuple[str | None, int | None]:
    """(sha256 fingerprint, vocabulary size) of data.tokenizer_path, or (None, None) when unset."""
    raw = cfg.data.tokenizer_path
    if not raw:
        return None, None
    path = Path(raw)
    key = f"data.tokenizer_path={raw}"
    if not path.exists():
        raise ConfigError(
            f"{key}: no such file or directory; give the .model file tools/train_tokenizer.py "
            "wrote, or a Hugging Face tokenizer directory"
        )
    if path.is_dir():
        if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
            raise ConfigError(
                f"{key} is a directory without tokenizer.json or tokenizer.model; give the .model "
                "file tools/train_tokenizer.py wrote, or a Hugging Face tokenizer directory"
            )
    elif path.stat().st_size == 0:
        raise ConfigError(f"{key} is an empty file, not a SentencePiece model")
    from zenlm.data.tokenizer import fingerprint_file, load_tokenizer

    try:
        vocab = load_tokenizer(path).vocab_size
    except ZenlmError as e:  # the loader's own message names the file
        raise ConfigError(f"data.tokenizer_path: {e}") from None
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
        reason = " ".join(str(e).split())[:160]
        raise ConfigError(f"{key} is not a SentencePiece model ({reason})") from None
    return fingerprint_file(path), vocab


def check_corpora(cfg: RunConfig, fingerprint: str | None, tokenizer_vocab: int | None) -> None:
    from zenlm.data.format import load_manifest
    from zenlm.data.sources import open_corpora

    d = cfg.data
    if not d.corpora:
        raise ConfigError("data.corpora is empty: give at least one corpus directory (- path: DIR)")
    paths = [c.path for c in d.corpora]
    for i, p in enumerate(paths):
        if not Path(p).is_dir():
            raise ConfigError(
                f"data.corpora[{i}].path={p}: no such directory (write one with tools/preprocess.py)"
            )
    train = open_corpora(paths, "train", d.seq_len_tokens, fingerprint, d.seed, True)
    if cfg.logging.eval_interval_steps:
        for i, p in enumerate(paths):
            valid = load_manifest(p).splits.get("valid")
            if valid is None or valid.samples == 0:
                raise ConfigError(
                    f"data.corpora[{i}].path={p} has no 'valid' samples but validation is on: "
                    "set logging.eval_interval_steps=0, or re-run tools/preprocess.py with "
                    "--valid-fraction > 0"
                )
        open_corpora(paths, "valid", d.seq_len_tokens, fingerprint, 0, False)
    need, source = train[0].manifest.tokenizer.vocab_size, f"corpus {paths[0]}'s manifest"
    if tokenizer_vocab and tokenizer_vocab > need:
        need, source = tokenizer_vocab, f"tokenizer {d.tokenizer_path}"
    if cfg.model.vocab_size < need:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of "
            f"{source} ({need}): token ids up to {need - 1} would index past the embedding; set "
            f"model.vocab_size={need} or more"
        )


def check_resume(cfg: RunConfig, fingerprint: str | None) -> None:
    """checkpoint.resume is 'auto', 'none' or one checkpoint, and what it would load fits."""
    choice = cfg.checkpoint.resume
    if choice == "none":
        return
    if choice == "auto":
        store = CheckpointStore(checkpoint_dir(cfg))
        for step in store.steps():
            path = store.path(step)
            try:
                meta = read_meta(path)
            except CheckpointError:
                continue  # torn or corrupt: the session skips it for an older one and keeps it
            check_compatible(path, meta, cfg.model, fingerprint)
            return
        return
    path = Path(choice)
    key = f"checkpoint.resume={choice}"
    if not path.is_dir():
        raise ConfigError(
            f"{key} is not 'auto', 'none' or an existing checkpoint directory"
            + (" (did you mean 'auto'?)" if choice.lower().startswith("au") else "")
        )
    if not (path / "meta.json").is_file():
        steps = CheckpointStore(path).steps()
        if steps:
            raise ConfigError(
                f"{key} is a directory of checkpoints, not one checkpoint: give one of them "
                f"(newest: {path / step_dir_name(steps[0])}), or set checkpoint.dir={choice} "
                "with checkpoint.resume=auto"
            )
        raise ConfigError(f"{key} holds no meta.json: not a zenlm checkpoint directory")
    meta = read_meta(path)
    if meta.get("kind") == "weights":
        raise ConfigError(
            f"{key} holds weights only (no optimizer or trainer state): start from it with "
            f"checkpoint.init_from={choice} (and checkpoint.resume=auto)"
        )
    check_compatible(path, meta, cfg.model, fingerprint)


def weights_source(cfg: RunConfig) -> str | None:
    """What the run will load before step 1: 'resume' (its own or an explicit checkpoint),
    'init_from', or None (random init). A load that then fails stops the run, so a model built
    for loading (no init drawn) never trains uninitialized."""
    c = cfg.checkpoint
    if c.resume not in ("auto", "none"):
        return "resume"
    if c.resume == "auto" and CheckpointStore(checkpoint_dir(cfg)).steps():
        return "resume"
    return "init_from" if c.init_from else None


def check_init_from(cfg: RunConfig, fingerprint: str | None) -> None:
    raw = cfg.checkpoint.init_from
    if not raw:
        return
    if cfg.checkpoint.resume not in ("auto", "none"):
        raise ConfigError(
            f"checkpoint.init_from={raw} with checkpoint.resume={cfg.checkpoint.resume}: give one "
            "(init_from is for a run that does not resume a checkpoint)"
        )
    if weights_source(cfg) != "init_from":
        return  # the run resumes its own checkpoint: init_from is not read
    path = Path(raw)
    key = f"checkpoint.init_from={raw}"
    if not (path / "meta.json").is_file():
        hint = ""
        if path.is_dir() and CheckpointStore(path).steps():
            hint = f" (it holds checkpoints; give one, e.g. {path / step_dir_name(CheckpointStore(path).steps()[0])})"
        elif path.is_dir() and (path / "config.json").is_file():
            hint = " (a Hugging Face directory: convert it first with tools/convert.py import)"
        raise ConfigError(f"{key} is not a zenlm checkpoint directory (no meta.json){hint}")
    check_compatible(path, read_meta(path), cfg.model, fingerprint)


def check_wandb(cfg: RunConfig) -> None:
    """logging.wandb_enabled needs the wandb package (looked up, not imported: importing it
    takes about a second)."""
    lg = cfg.logging
    if not lg.wandb_enabled:
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:  # a broken half-imported module
        found = False
    if not found:
        raise ConfigError(
            "logging.wandb_enabled=true but the wandb package is not installed: "
            "pip install wandb (zenlm's dev extras include it), or set logging.wandb_enabled=false"
        )
    if not lg.wandb_project.strip():
        raise ConfigError("logging.wandb_project is empty: give the W&B project name")


def preflight(cfg: RunConfig, world_size: int, corpora: bool = True) -> Layout:
    """Run every check that needs no DeepSpeed; return the derived Layout.

    corpora=False skips the corpus checks (runs fed by synthetic data)."""
    try:
        layout = validate(cfg, world_size, check_device=False)
        fingerprint, vocab = check_tokenizer(cfg)
        if corpora:
            check_corpora(cfg, fingerprint, vocab)
        check_resume(cfg, fingerprint)
        check_init_from(cfg, fingerprint)
        check_wandb(cfg)
        check_output_dirs(cfg)  # last: the only check that creates anything (empty dirs)
    except ZenlmError as e:
        e.same_on_all_ranks = True  # the same config and files on every rank: print once
        raise
    return layout
