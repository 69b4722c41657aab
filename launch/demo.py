"""`make demo`: from nothing to a trained model on any machine, without network.

1. Trains a SentencePiece tokenizer on the Python standard library's own source files.
2. Tokenizes, packs and shards them into a webdataset corpus (train + validation split).
3. Trains the debug model at TP 2 x DP 2 with ZeRO-1 on 4 CPU processes (torchrun), validating
   every 50 steps; TensorBoard logs and the resolved config land in runs/demo/.
4. Plots the run's curves (tools/plot_run.py's code) into runs/demo/curves.png, exports the
   model with tools/convert.py and generates from it with transformers.
Steps 1-2 are skipped when their outputs exist (the corpus rerun skips complete shards); step 3
starts a fresh run in runs/demo/ every time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from zenlm.data.format import load_manifest
from zenlm.data.readers import BadInputError
from zenlm.data.tokenizer import fingerprint_file, train_tokenizer
from zenlm.data.writer import preprocess
from zenlm.runtime.cli import run_tool

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "runs" / "demo-data"
TOKENIZER = DATA / "tokenizer.model"
CORPUS = DATA / "corpus"
VOCAB_SIZE = 1024
SEQ_LEN = 128
MAX_INPUT_BYTES = 24 << 20  # enough text for a few hundred steps, quick to tokenize


def stdlib_sources() -> list[Path]:
    """Python files of the standard library, sorted, up to MAX_INPUT_BYTES (tests excluded, and
    empty files, e.g. email/mime/__init__.py, which the tokenizer trainer refuses as inputs)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in ("test", "tests", "site-packages", "idlelib") for part in path.parts):
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        files.append(path)
        total += size
        if total >= MAX_INPUT_BYTES:
            break
    return files


def build_data() -> None:
    sources = stdlib_sources()
    if not TOKENIZER.exists():
        print(f"[demo] training a {VOCAB_SIZE}-token BPE tokenizer on {len(sources)} stdlib files")
        train_tokenizer(sources, TOKENIZER, VOCAB_SIZE, model_type="bpe", max_sentences=200_000)
    print(f"[demo] tokenizer {TOKENIZER} sha256 {fingerprint_file(TOKENIZER)[:16]}…")
    print(f"[demo] preprocessing {len(sources)} files into {CORPUS}")

    def run() -> None:
        preprocess(
            sources, CORPUS, TOKENIZER, SEQ_LEN, shard_size_bytes=4 << 20, valid_fraction=0.02
        )

    try:
        run()
    except BadInputError as e:
        # preprocess refuses a directory holding another corpus. This one is the demo's own
        # (e.g. made from another Python's stdlib), so the demo replaces it.
        if not str(e).startswith("--out"):
            raise
        print(f"[demo] rebuilding its own corpus ({e})")
        shutil.rmtree(CORPUS)
        run()
    m = load_manifest(CORPUS)
    summary = {
        name: {"shards": len(s.shards), "samples": s.samples, "tokens": s.tokens}
        for name, s in m.splits.items()
    }
    print(f"[demo] manifest: seq_len {m.seq_len}, dtype {m.dtype}, {json.dumps(summary)}")


def train() -> int:
    # A fresh run each time: with checkpoint.resume=auto a finished run would resume at its end.
    shutil.rmtree(ROOT / "runs" / "demo", ignore_errors=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
        str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
        *sys.argv[1:],
    ]  # fmt: skip
    print("[demo] " + " ".join(cmd))
    return subprocess.call(cmd, cwd=ROOT)


PROMPT = "def main():\n    "


def export_and_generate() -> None:
    """Hand the trained model to transformers: export the newest checkpoint with
    tools/convert.py, load it with AutoModelForCausalLM and generate a continuation."""
    import torch
    import transformers

    from zenlm.checkpoint.store import CheckpointStore
    from zenlm.data.tokenizer import load_tokenizer

    run = ROOT / "runs" / "demo"
    steps = CheckpointStore(run / "checkpoints").steps()
    if not steps:
        print("[demo] no checkpoint to export")
        return
    ckpt = CheckpointStore(run / "checkpoints").path(steps[0])
    out = run / "hf"
    shutil.rmtree(out, ignore_errors=True)  # the demo's own export of its own run
    cmd = [sys.executable, str(ROOT / "tools" / "convert.py"), "export", str(ckpt), str(out)]
    print("[demo] " + " ".join(cmd))
    if subprocess.call(cmd, cwd=ROOT) != 0:
        raise SystemExit("[demo] export failed")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = load_tokenizer(TOKENIZER)
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
            pad_token_id=tok.eos_id,
        )  # fmt: skip
    text = tok.decode(generated[0, ids.shape[1] :].tolist())
    print(f"[demo] transformers, from the exported {out}: {PROMPT + text!r}")


def plot() -> None:
    """runs/demo/curves.png from the run's TensorBoard events (zenlm.metrics.curves)."""
    from zenlm.metrics.curves import plot_curves, read_curves

    run = ROOT / "runs" / "demo"
    out = plot_curves([read_curves(run)], run / "curves.png")
    print(f"[demo] training curves: {out}")


def main() -> int:
    start = time.perf_counter()
    build_data()
    rc = train()
    if rc == 0:
        plot()
        export_and_generate()
    curves = ROOT / "runs" / "demo" / "curves.png"
    print(
        f"[demo] finished in {time.perf_counter() - start:.0f} s (exit {rc}); "
        f"TensorBoard: tensorboard --logdir {ROOT / 'runs' / 'demo' / 'tb'}"
        + (f"; curves: {curves}" if curves.is_file() else "")
    )
    return rc


if __name__ == "__main__":
    sys.exit(run_tool(main))  # a ZenlmError: one `error: ...` line, exit 2
