"""Every command in the README's "Running" block (and `make demo`) runs, at 3 steps, and trains;
the 8-process torchrun command runs in tests/numerics/test_cli_layouts.py (against the reference
losses), the "On a Slurm cluster" commands in tests/unit/test_submit.py and tests/slurm.

The README is parsed: a command line in the "## Running" ```bash block that RUNNING below does
not know fails test_readme_blocks_have_no_untested_command, naming it; a command RUNNING knows
that the README dropped fails too (the table is stale).

Each command runs as written -- same script, same config file, same flags -- from a scratch
directory shaped like the repository (launch/, configs/, tools/ are symlinks to the real ones),
so its relative paths (configs/debug.yaml -> runs/demo-data/corpus, corpus/, tok/, data/*.jsonl)
resolve to data made here. The only changes:
- `.venv/bin/` is the running interpreter's bin directory;
- step-count overrides are appended (STEPS: 3 steps, warmup 1 -- validation refuses warmup >
  train_steps --, validation at step 3, a TensorBoard scalar every step) and logging.run_dir
  points at a directory of its own per command (two commands share run_name "debug");
- "your own data" is a small generated text (zenlm.testing.text_corpus.write_text, two files
  for the glob), which supports a 384-token vocabulary, not 32000: --vocab-size 384 and
  model.vocab_size=384; and --valid-fraction 0.05, because 0.001 of ~1000 documents is an
  empty valid split, which the trainer refuses.
The demo corpus (runs/demo-data/) is made by launch/demo.py's own build_data, pointed at the
scratch directory and fed 2 MiB of stdlib source instead of 24 MiB.

Every run must exit 0 and leave train/loss in TensorBoard at steps 1, 2, 3, all finite, and
val/loss at step 3.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zenlm.testing.distributed import cpu_env
from zenlm.testing.readme import bash_block
from zenlm.testing.text_corpus import write_text

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink
STEPS = [
    "optim.train_steps=3",
    "optim.warmup_steps=1",
    "logging.eval_interval_steps=3",
    "logging.log_interval_steps=1",
]
SMALL_VOCAB = 384  # what write_text's made-up word list supports (the tool rounds to 128)

# The README's commands, as written there, and the test that runs each.
RUNNING = {
    ".venv/bin/python launch/train.py --config configs/debug.yaml optim.train_steps=50":
        "test_one_process_on_the_demo_corpus",
    ".venv/bin/torchrun --nproc_per_node 8 launch/train.py --config configs/runs/debug_3d.yaml":
        "tests/numerics/test_cli_layouts.py::test_cli_layout_matches_the_reference"
        "[tp2_pp2_dp2_sp_selective]",  # against the reference's losses, not only "it trains"
    ".venv/bin/python tools/train_tokenizer.py data/*.jsonl --text-field text"
    " --vocab-size 32000 --out tok/tokenizer.model": "test_your_own_data",
    ".venv/bin/python tools/preprocess.py data/*.jsonl --tokenizer tok/tokenizer.model"
    " --seq-len 128 --valid-fraction 0.001 --out corpus/": "test_your_own_data",
    ".venv/bin/python launch/train.py --config configs/debug.yaml 'data.corpora=[{path: corpus}]'"
    " data.tokenizer_path=tok/tokenizer.model model.vocab_size=32000": "test_your_own_data",
}  # fmt: skip
# The Slurm section's commands and the tests that run them (tests/slurm reads the README too).
SLURM = {
    ".venv/bin/python launch/submit.py --config configs/runs/llama2_7b.yaml --nodes 2 --dry-run":
        "tests/unit/test_submit.py::test_readme_dry_run",
    ".venv/bin/python launch/submit.py --config configs/debug.yaml --nodes 2 --gpus-per-node 0"
    " --procs-per-node 2 parallel.tensor_parallel_degree=2":
        "tests/slurm/test_slurm_jobs.py::test_two_nodes_equal_single_node_torchrun",
}  # fmt: skip
TWO_COMMANDS = {
    "make demo": "test_make_demo",  # launch/demo.py, what the target runs after `make setup`
    "make test": None,  # the whole suite, this module included: not run from inside it
}


# ---------------------------------------------------------------- README parsing


def _unknown_and_stale(heading: str, known: dict) -> tuple[list[str], list[str]]:
    found = bash_block(heading)
    table = {tuple(shlex.split(k)) for k in known}
    unknown = [shlex.join(c) for c in found if c not in table]
    stale = [shlex.join(k) for k in table if k not in set(found)]
    return unknown, stale


def test_readme_blocks_have_no_untested_command():
    for heading, known in (
        ("Running", RUNNING),
        ("Two commands", TWO_COMMANDS),
        ("On a Slurm cluster", SLURM),
    ):
        unknown, stale = _unknown_and_stale(heading, known)
        assert not unknown, (
            f"README '## {heading}' has commands no test runs (add them to "
            f"tests/integration/test_readme_commands.py): {unknown}"
        )
        assert not stale, f"commands no longer in README '## {heading}': {stale}"


class Quoted(str):
    """A token the shell would not glob."""


def readme_command(command: str) -> list[str]:
    """The README's tokens for a command of RUNNING (failing if the README no longer has it);
    quoted ones are Quoted."""
    tokens = tuple(shlex.split(command))
    assert tokens in bash_block("Running"), f"README's Running block lost: {command}"
    raw = shlex.split(command, posix=False)  # keeps the quotes
    assert len(raw) == len(tokens), command
    return [tok if tok == r else Quoted(tok) for tok, r in zip(tokens, raw, strict=True)]


# ---------------------------------------------------------------- running


def as_run(tokens: list[str], cwd: Path, replace: dict[str, str] | None = None) -> list[str]:
    """The README command with .venv/bin/ -> this interpreter's bin, exact-token replacements
    (each must occur), and unquoted shell globs expanded in cwd."""
    replace = dict(replace or {})
    for old in replace:
        assert old in tokens, f"{old!r} not in {shlex.join(tokens)}"
    out = []
    for i, tok in enumerate(tokens):
        tok = replace.get(tok, tok)
        if i == 0 and tok.startswith(".venv/bin/"):
            tok = str(BIN / tok.removeprefix(".venv/bin/"))
            assert Path(tok).exists(), tok
        if not isinstance(tok, Quoted) and any(ch in tok for ch in "*?["):
            matches = sorted(glob.glob(tok, root_dir=cwd))
            assert matches, f"{tok} matches nothing in {cwd}"
            out.extend(matches)
        else:
            out.append(tok)
    return out


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> str:
    # CPU ranks wherever the processes outnumber the visible GPUs (one-GPU workstations).
    env = {**cpu_env(8), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}: {shlex.join(cmd)}\n{out[-6000:]}"
    return out


def train_overrides(run_dir: Path) -> list[str]:
    return [*STEPS, f"logging.run_dir={run_dir}"]


def assert_trained(run: Path, steps: int = 3, val_step: int = 3) -> dict:
    """train/loss at every step 1..steps and val/loss at val_step, all finite, read back from
    <run>/tb; returns the run's resolved config."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "val/loss" in tags, tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))
    assert all(math.isfinite(e.value) for e in loss), loss
    val = acc.Scalars("val/loss")
    assert [e.step for e in val] == [val_step] and math.isfinite(val[0].value), val
    return yaml.safe_load((run / "config.yaml").read_text())


def repo_shaped(work: Path) -> Path:
    """work/ with launch/, configs/, tools/ linked to the repository's."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("launch", "configs", "tools"):
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    return work


def load_demo(work: Path):
    """launch/demo.py as a module, its data directory at work/runs/demo-data/ (2 MiB of stdlib
    source instead of 24 MiB: plenty for 3 steps and a 64-sample validation)."""
    spec = importlib.util.spec_from_file_location("readme_demo", ROOT / "launch" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    demo.DATA = work / "runs" / "demo-data"
    demo.TOKENIZER = demo.DATA / "tokenizer.model"
    demo.CORPUS = demo.DATA / "corpus"
    demo.MAX_INPUT_BYTES = 2 << 20
    return demo


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory shaped like the repository: code symlinked, runs/demo-data/ built by
    launch/demo.py's build_data (on 2 MiB of stdlib source instead of 24 MiB)."""
    work = repo_shaped(tmp_path_factory.mktemp("repo"))
    load_demo(work).build_data()
    return work


def test_one_process_on_the_demo_corpus(workdir, tmp_path):
    (command,) = [k for k, v in RUNNING.items() if v == "test_one_process_on_the_demo_corpus"]
    cmd = as_run(readme_command(command), workdir) + train_overrides(tmp_path)
    run(cmd, workdir)
    cfg = assert_trained(tmp_path / "debug")
    assert cfg["optim"]["train_steps"] == 3  # the appended override wins over the README's 50
    assert cfg["data"]["corpora"][0]["path"] == "runs/demo-data/corpus"


def test_your_own_data(tmp_path):
    work = repo_shaped(tmp_path / "work")
    write_text(work / "data" / "a.jsonl", 500, seed=0)
    write_text(work / "data" / "b.jsonl", 500, seed=1)
    tokenizer, preprocess, train = [k for k, v in RUNNING.items() if v == "test_your_own_data"]
    small = str(SMALL_VOCAB)
    run(as_run(readme_command(tokenizer), work, {"32000": small}), work)
    out = run(as_run(readme_command(preprocess), work, {"0.001": "0.05"}), work)
    assert re.search(r"valid: \d+ shards, [1-9]\d* samples", out), out
    vocab = {"model.vocab_size=32000": f"model.vocab_size={small}"}
    cmd = as_run(readme_command(train), work, vocab) + train_overrides(tmp_path / "runs")
    run(cmd, work)
    cfg = assert_trained(tmp_path / "runs" / "debug")
    assert cfg["data"]["corpora"][0]["path"] == "corpus"
    assert cfg["data"]["tokenizer_path"] == "tok/tokenizer.model"


def test_make_demo(workdir, monkeypatch, capfd):
    """launch/demo.py's main (what `make demo` runs): data building (its rerun skips complete
    shards) and its 4-process training command, with ROOT at the scratch repository and step
    overrides passed through sys.argv as demo.py does."""
    demo = load_demo(workdir)
    demo.ROOT = workdir  # launch/, configs/, the cwd and runs/demo/ of its training command
    monkeypatch.setattr(sys, "argv", ["demo.py", *STEPS])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    assert demo.main() == 0
    out = capfd.readouterr().out
    assert "[demo] manifest" in out
    # It plots the run's curves (zenlm.metrics.curves) and says where.
    assert f"[demo] training curves: {workdir / 'runs' / 'demo' / 'curves.png'}" in out
    assert (workdir / "runs" / "demo" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # It ends by exporting the model and generating with transformers from the export.
    assert "[demo] transformers, from the exported" in out, out[-3000:]
    assert (workdir / "runs" / "demo" / "hf" / "config.json").is_file()
    cfg = assert_trained(workdir / "runs" / "demo")  # demo.yaml's run_name under cwd/runs
    p = cfg["parallel"]
    assert (p["tensor_parallel_degree"], p["pipeline_parallel_degree"], p["zero_stage"]) == (
        2,
        1,
        1,
    )
