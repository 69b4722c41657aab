"""Bad input never loses work: launch/train.py and inspect_ckpt.py, as a user runs them.

Every case runs the real CLI in a fresh interpreter (zenlm.testing.cli_probe) against a real
corpus (tools/train_tokenizer.py + tools/preprocess.py) and a real run directory holding the
checkpoints of steps 2 and 4 of an earlier `launch/train.py` run, with checkpoint.resume=auto.
Each asserts:
- exit code 2 and exactly one `error: ...` line on stderr, naming the culprit, no traceback;
- the time to the error: before any step, and for every check that needs no framework before
  DeepSpeed or megatron is even imported (asserted as "not imported", which holds on any
  machine, and printed as seconds);
- nothing on disk changed: the corpora, the tokenizers and the run directory with its
  checkpoints are byte-identical afterwards (sha256 of every file), no file added or removed.

The data tools' own cases (preprocess, train_tokenizer, verify_corpus) are in
tests/unit/test_data_tool_errors.py. docs/errors.md lists what each message means.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from zenlm.testing.cli_probe import changed, run_tool_probe, snapshot
from zenlm.testing.text_corpus import TextCorpus, build_text_corpus

TRAIN = "launch/train.py"
INSPECT = "tools/inspect_ckpt.py"
SHORT = [
    "optim.train_steps=4",
    "optim.warmup_steps=1",
    "logging.eval_interval_steps=4",
    "logging.eval_samples=8",
    "logging.log_interval_steps=1",
]


@dataclass
class World:
    root: Path
    corpus: TextCorpus
    other: TextCorpus  # another text, so another tokenizer (fingerprint)
    runs: Path  # logging.run_dir of the trained run (run_name debug)

    @property
    def ckpts(self) -> Path:
        return self.runs / "debug" / "checkpoints"

    def train_args(self, *overrides: str, config: str = "configs/debug.yaml") -> list[str]:
        return [
            TRAIN,
            "--config",
            config,
            *self.corpus.overrides(),
            f"logging.run_dir={self.runs}",
            *SHORT,
            *overrides,
        ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    corpus = build_text_corpus(root / "data")
    other = build_text_corpus(root / "other", num_docs=1500, seed=7)
    w = World(root, corpus, other, root / "runs")
    first = run_tool_probe(w.train_args("checkpoint.save_interval_steps=2"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert sorted(p.name for p in w.ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    (root / "a_file").write_text("not a directory\n")
    (root / "empty.model").write_bytes(b"")
    (root / "text.model").write_text("this is not a sentencepiece model\n")
    (root / "cycle_a.yaml").write_text("base: [cycle_b.yaml]\noptim: {lr: 1.0e-3}\n")
    (root / "cycle_b.yaml").write_text("base: [cycle_a.yaml]\n")
    (root / "broken.yaml").write_text("optim:\n  lr: [1e-3\n")
    (root / "list.yaml").write_text("- just\n- a list\n")
    no_valid = root / "no_valid_corpus"
    shutil.copytree(corpus.corpus, no_valid)
    manifest = json.loads((no_valid / "manifest.json").read_text())
    manifest["splits"]["valid"]["shards"] = []
    (no_valid / "manifest.json").write_text(json.dumps(manifest))
    missing_shard = root / "missing_shard_corpus"
    shutil.copytree(corpus.corpus, missing_shard)
    (missing_shard / "train-000003.tar").unlink()
    no_manifest = root / "no_manifest_corpus"
    shutil.copytree(corpus.corpus, no_manifest)
    (no_manifest / "manifest.json").unlink()
    return w


def _corpus(path: Path | str, weight: float = 1.0) -> str:
    return f"data.corpora=[{{path: {path}, weight: {weight}}}]"


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[World], list[str]]
    culprit: tuple[str, ...]  # substrings the one error line must contain
    before_import: bool = True  # the error comes before deepspeed/megatron are imported


def T(name: str, overrides: list[str] | Callable[[World], list[str]], *culprit: str) -> Case:
    if callable(overrides):
        return Case(name, lambda w: w.train_args(*overrides(w)), culprit)
    return Case(name, lambda w: w.train_args(*overrides), culprit)


CASES = [
    # -- values that parse but make no sense --------------------------------------------------
    T("min_lr_above_lr", ["optim.min_lr=0.1"], "optim.min_lr", "optim.lr"),
    T("negative_warmup", ["optim.warmup_steps=-1"], "optim.warmup_steps"),
    T("warmup_beyond_steps", ["optim.warmup_steps=9"], "optim.warmup_steps", "train_steps"),
    T("decay_fraction_0", ["optim.decay_fraction=0"], "optim.decay_fraction"),
    T("decay_fraction_above_1", ["optim.decay_fraction=1.5"], "optim.decay_fraction"),
    T("lr_zero", ["optim.lr=0", "optim.min_lr=0"], "optim.lr"),
    T("beta2_one", ["optim.beta2=1.0"], "optim.beta2"),
    T("negative_grad_clip", ["optim.grad_clip_norm=-1"], "optim.grad_clip_norm"),
    T("eval_samples_0", ["logging.eval_samples=0"], "logging.eval_samples"),
    T("log_interval_0", ["logging.log_interval_steps=0"], "logging.log_interval_steps"),
    T("negative_eval_interval", ["logging.eval_interval_steps=-5"], "logging.eval_interval_steps"),
    T("num_kv_heads_0", ["model.num_kv_heads=0"], "model.num_kv_heads"),
    T("vocab_size_0", ["model.vocab_size=0"], "model.vocab_size"),
    T("intermediate_size_0", ["model.intermediate_size=0"], "model.intermediate_size"),
    T("hidden_not_divisible", ["model.hidden_size=66"], "hidden_size", "num_attention_heads"),
    T("torch_threads_negative", ["runtime.torch_threads=-1"], "runtime.torch_threads"),
    T("run_name_escapes", ["logging.run_name=../x"], "logging.run_name", "../x"),
    T("keep_last_negative", ["checkpoint.keep_last=-1"], "checkpoint.keep_last"),
    T("num_workers_negative", ["data.num_workers=-1"], "data.num_workers"),
    T("zero_stage_5", ["parallel.zero_stage=5"], "zero_stage"),
    T("bf16_zero0", ["runtime.precision=bf16", "parallel.zero_stage=0"], "zero_stage=1"),
    T("tp_not_dividing_world", ["parallel.tensor_parallel_degree=3"], "world size 1"),
    T("batch_not_divisible", ["data.global_batch_size_seqs=7"], "global_batch_size_seqs"),
    T("corpus_weight_0", lambda w: [_corpus(w.corpus.corpus, 0)], "data.corpora[0].weight"),
    # -- config syntax ------------------------------------------------------------------------
    T("override_bad_yaml", ["optim.lr=[1,"], "optim.lr", "not valid YAML"),
    T("override_not_key_value", ["optim.lr"], "optim.lr", "a.b.c=value"),
    T("unknown_key", ["optim.lrr=1"], "optim.lrr", "optim.lr"),
    T("wrong_type", ["optim.train_steps=abc"], "optim.train_steps", "int"),
    T("bad_literal", ["runtime.precision=fp8"], "runtime.precision", "fp8"),
    Case(
        "base_cycle",
        lambda w: w.train_args(config=str(w.root / "cycle_a.yaml")),
        ("cycle", "cycle_a.yaml", "cycle_b.yaml"),
    ),
    Case(
        "config_not_yaml",
        lambda w: w.train_args(config=str(w.root / "broken.yaml")),
        ("broken.yaml", "not valid YAML", "line"),
    ),
    Case(
        "config_not_mapping",
        lambda w: w.train_args(config=str(w.root / "list.yaml")),
        ("list.yaml", "mapping"),
    ),
    Case(
        "config_missing",
        lambda w: w.train_args(config=str(w.root / "nope.yaml")),
        ("nope.yaml", "cannot read"),
    ),
    # -- checkpoints --------------------------------------------------------------------------
    T(
        "resume_other_hidden_size",
        ["model.hidden_size=128"],
        "step_00000004",
        "model.hidden_size 64 (checkpoint) vs 128",
        "embed.embedding.weight [384, 64] vs [384, 128]",
    ),
    T(
        "resume_other_num_layers",
        ["model.num_layers=4"],
        "step_00000004",
        "model.num_layers 2 (checkpoint) vs 4",
        "parameters of this model not in the checkpoint",
    ),
    T(
        "resume_other_tokenizer",
        lambda w: w.other.overrides(),
        "step_00000004",
        "tokenizer fingerprint",
    ),
    T("resume_typo", ["checkpoint.resume=autoo"], "checkpoint.resume=autoo", "'auto'"),
    T(
        "resume_checkpoints_folder",
        lambda w: [f"checkpoint.resume={w.ckpts}"],
        "directory of checkpoints",
        "step_00000004",
    ),
    T(
        "resume_not_checkpoint",
        lambda w: [f"checkpoint.resume={w.corpus.corpus}"],
        "no meta.json",
    ),
    T("resume_empty", ["checkpoint.resume="], "checkpoint.resume"),
    # -- where the run writes -------------------------------------------------------------------
    T(
        "checkpoint_dir_is_file",
        lambda w: [f"checkpoint.dir={w.root / 'a_file'}"],
        "checkpoint.dir",
        "a_file",
        "is a file",
    ),
    T(
        "run_dir_is_file",
        lambda w: [f"logging.run_dir={w.root / 'a_file'}"],
        "a_file",
        "is a file",
    ),
    T(
        "checkpoint_dir_under_file",
        lambda w: [f"checkpoint.dir={w.root / 'a_file' / 'ckpt'}"],
        "checkpoint.dir",
        "a_file",
    ),
    # -- tokenizer and corpora ----------------------------------------------------------------
    T(
        "vocab_below_tokenizer",
        ["model.vocab_size=100"],
        "model.vocab_size (100)",
        "384",
    ),
    T(
        "tokenizer_is_dir",
        lambda w: [f"data.tokenizer_path={w.root}"],
        "data.tokenizer_path",
        "directory",
    ),
    T(
        "tokenizer_empty",
        lambda w: [f"data.tokenizer_path={w.root / 'empty.model'}"],
        "empty.model",
        "empty",
    ),
    T(
        "tokenizer_not_a_model",
        lambda w: [f"data.tokenizer_path={w.root / 'text.model'}"],
        "text.model",
        "not a SentencePiece model",
    ),
    T(
        "tokenizer_missing",
        lambda w: [f"data.tokenizer_path={w.root / 'gone.model'}"],
        "gone.model",
        "no such file",
    ),
    T(
        "corpus_other_tokenizer",
        lambda w: [f"data.tokenizer_path={w.other.tokenizer}"],
        "manifest.json",
        "tokenizer",
    ),
    T("seq_len_mismatch", ["data.seq_len_tokens=64"], "seq_len", "32", "64"),
    T(
        "corpus_missing",
        lambda w: [_corpus(w.root / "nowhere")],
        "data.corpora[0].path",
        "nowhere",
    ),
    T(
        "corpus_no_manifest",
        lambda w: [_corpus(w.root / "no_manifest_corpus")],
        "no_manifest_corpus",
        "manifest",
    ),
    T(
        "corpus_missing_shard",
        lambda w: [_corpus(w.root / "missing_shard_corpus")],
        "train-000003.tar",
    ),
    T(
        "corpus_no_valid_split",
        lambda w: [_corpus(w.root / "no_valid_corpus")],
        "no_valid_corpus",
        "'valid'",
        "logging.eval_interval_steps=0",
    ),
    T("corpora_empty", ["data.corpora=[]"], "data.corpora"),
    # -- inspect_ckpt.py ----------------------------------------------------------------------
    Case("inspect_missing", lambda w: [INSPECT, str(w.root / "nowhere")], ("nowhere",)),
    Case(
        "inspect_not_checkpoint",
        lambda w: [INSPECT, str(w.corpus.corpus)],
        ("corpus", "no complete checkpoint"),
    ),
    Case(
        "inspect_against_bad_config",
        lambda w: [INSPECT, str(w.ckpts), "--against", str(w.root / "cycle_a.yaml")],
        ("cycle",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_line_and_loses_nothing(world: World, case: Case) -> None:
    before = snapshot(world.root)
    r = run_tool_probe(case.argv(world))
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert not r.traceback, r.stderr[-3000:]
    assert len(r.error_lines) == 1, r.stderr
    line = r.error_lines[0]
    for text in case.culprit:
        assert text in line, f"{text!r} not in: {line}"
    assert not r.started_training, r.stdout[-2000:]
    if case.before_import:
        assert r.heavy_imports == [], (
            f"{r.heavy_imports} imported before the error ({r.seconds:.1f} s)"
        )
    assert changed(before, world.root) == []
    print(f"{case.name}: {r.seconds:.2f} s: {line}")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _copy_run(world: World, dst: Path) -> Path:
    shutil.copytree(world.runs, dst)
    return dst / "debug" / "checkpoints"


def test_no_checkpoint_verifies_stops_and_keeps_it(world: World, tmp_path: Path) -> None:
    """One checkpoint with one flipped byte: stop before step 1 (it is never overwritten)."""
    ckpts = _copy_run(world, tmp_path / "runs")
    shutil.rmtree(ckpts / "step_00000002")
    _flip_byte(ckpts / "step_00000004" / "model-p0-w0.safetensors")
    before = snapshot(tmp_path, world.corpus.corpus)
    r = run_tool_probe(
        [*world.train_args(f"logging.run_dir={tmp_path / 'runs'}"), "optim.train_steps=6"]
    )
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert not r.traceback and len(r.error_lines) == 1, r.stderr
    line = r.error_lines[0]
    assert "none of the 1 checkpoints" in line and "step_00000004" in line, line
    assert "CRC-32" in line and "checkpoint.resume=none" in line, line
    assert not r.started_training
    assert changed(before, tmp_path, world.corpus.corpus) == []


def test_corrupt_newest_is_skipped_kept_and_never_overwritten(world: World, tmp_path: Path) -> None:
    """Newest corrupt: resume from the older one; the corrupt one survives the run's own save of
    the same step (set aside, byte-identical) and keep_last=1 pruning."""
    ckpts = _copy_run(world, tmp_path / "runs")
    _flip_byte(ckpts / "step_00000004" / "optim-p0-w0.safetensors")
    corrupt = snapshot(ckpts / "step_00000004")
    r = run_tool_probe(
        [
            *world.train_args(f"logging.run_dir={tmp_path / 'runs'}"),
            *("optim.train_steps=6", "checkpoint.save_interval_steps=2", "checkpoint.keep_last=1"),
        ]
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from checkpoint" in r.stdout and "step_00000002" in r.stdout, r.stdout[-3000:]
    kept = list(ckpts.glob("step_00000004.kept-*"))
    assert len(kept) == 1, sorted(p.name for p in ckpts.iterdir())
    renamed = {str(kept[0] / Path(p).name): h for p, h in corrupt.items()}
    assert snapshot(kept[0]) == renamed
    names = sorted(p.name for p in ckpts.glob("step_*"))
    assert names == [kept[0].name, "step_00000006"]  # step 2 pruned: it was read, not buried


def test_resume_none_starts_over_and_keeps_old_checkpoints(world: World, tmp_path: Path) -> None:
    """checkpoint.resume=none in a directory of checkpoints: step 0, and none of the old ones is
    pruned or overwritten (the new run's saves of steps 2 and 4 set them aside)."""
    ckpts = _copy_run(world, tmp_path / "runs")
    old = {s: snapshot(ckpts / s) for s in ("step_00000002", "step_00000004")}
    r = run_tool_probe(
        [
            *world.train_args(f"logging.run_dir={tmp_path / 'runs'}", "checkpoint.resume=none"),
            *("checkpoint.save_interval_steps=2", "checkpoint.keep_last=1"),
        ]
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" not in r.stdout
    for name, files in old.items():
        (kept,) = ckpts.glob(f"{name}.kept-*")
        assert snapshot(kept) == {str(kept / Path(p).name): h for p, h in files.items()}
    assert (ckpts / "step_00000004" / "meta.json").is_file()  # the new run's
    assert not (ckpts / "step_00000002").exists()  # the new run's own, pruned by keep_last=1


def test_torchrun_prints_a_shared_error_once(world: World) -> None:
    """Two ranks under torchrun, one bad value: one `error:` line in all the output (rank 0's),
    not one per rank; the exit is non-zero."""
    import subprocess
    import sys

    from zenlm.testing.distributed import cpu_env

    args = world.train_args("optim.min_lr=0.1")
    before = snapshot(world.root)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *args],
        cwd=Path(__file__).resolve().parents[2],
        env=cpu_env(2),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0
    assert lines == ["error: optim.min_lr (0.1) must be in [0, optim.lr = 0.003]: it is the floor "
                     "the schedule decays to"], out[-3000:]  # fmt: skip
    # torchrun adds its own ChildFailedError summary (a launcher traceback); no frame of ours.
    ours = [ln for ln in out.splitlines() if ln.strip().startswith('File "') and (
        "/zenlm/" in ln or "launch/train.py" in ln)]  # fmt: skip
    assert ours == [], out[-3000:]
    assert changed(before, world.root) == []
