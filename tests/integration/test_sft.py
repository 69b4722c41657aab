"""Supervised fine-tuning as a user runs it: import a transformers model, preprocess
prompt/completion pairs, train with configs/sft/debug.yaml under launch/train.py, export, and
generate with transformers.

- tools/convert.py import of a random transformers Llama (the corpus tokenizer's vocabulary);
- tools/preprocess_sft.py of generated prompt/completion pairs (zenlm.testing.text_corpus);
- `launch/train.py --config configs/sft/debug.yaml` with checkpoint.init_from, 30 steps, then
  validation on the first 32 valid samples (only completion tokens count);
- that validation loss is far below the imported model's own completion-token loss on the
  same 32 samples, computed here with transformers (each packed example alone, the corpus's
  mask read by an independent tar reader): the 30 steps fine-tuned the imported model;
- tools/convert.py export of the final checkpoint loads with AutoModelForCausalLM and
  `generate`s.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zenlm.testing.cli_probe import run_tool_probe
from zenlm.testing.text_corpus import build_sft_corpus, build_text_corpus

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 30


def _tool(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _val_losses(stdout: str) -> dict[int, float]:
    """{step: val_loss} from the trainer's rank-0 console lines."""
    return {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(r"step (\d+)/\d+ \|.*?val_loss ([0-9.]+)", stdout)
    }


def test_sft_from_an_imported_model(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "numerics"))
    from hf_reference import read_split

    text = build_text_corpus(tmp_path / "data")
    sft = build_sft_corpus(tmp_path / "sft", text)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=text.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    imported = tmp_path / "imported"
    _tool("tools/convert.py", "import", str(tmp_path / "hf"), str(imported))

    run = run_tool_probe(
        [
            "launch/train.py", "--config", "configs/sft/debug.yaml", *sft.overrides(),
            f"checkpoint.init_from={imported}", f"logging.run_dir={tmp_path / 'runs'}",
            f"optim.train_steps={STEPS}", "optim.lr=0.003", "optim.min_lr=0.0003",
            "optim.warmup_steps=2", "logging.eval_interval_steps=30", "logging.log_interval_steps=1",
            "data.global_batch_size_seqs=16", "data.micro_batch_size_seqs=4",
        ]
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "initialized weights from" in run.stdout
    val = _val_losses(run.stdout)
    assert set(val) == {STEPS}, val
    assert val[STEPS] < 0.8 * math.log(text.vocab_size), val  # a random model's is ~ln 384

    # The imported model's completion-token loss on the run's validation set, independently.
    valid = read_split(sft.corpus, "valid")
    samples = [(s, m) for s in range(len(valid.tokens)) for m in range(len(valid.tokens[s]))]
    assert len(samples) >= 32
    loss_sum, counted = 0.0, 0
    with torch.no_grad():
        for s, m in samples[:32]:
            tokens = torch.from_numpy(valid.tokens[s][m])
            mask = torch.from_numpy(valid.loss_masks[s][m])
            starts = [0, *[int(x) for x in valid.doc_starts[s][m]], len(tokens)]
            for a, b in itertools.pairwise(starts):  # each packed example alone
                if b - a < 2:
                    continue
                logits = model(tokens[a : b - 1][None]).logits[0].float()
                target = tokens[a + 1 : b]
                keep = mask[a + 1 : b] == 1
                if keep.any():
                    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
                    loss_sum += ce[keep].sum().item()
                    counted += int(keep.sum())
    initial = loss_sum / counted
    assert val[STEPS] < initial - 1.0, (val, initial)

    ckpts = sorted((tmp_path / "runs" / "sft-debug" / "checkpoints").glob("step_*"))
    assert ckpts and ckpts[-1].name == f"step_{STEPS:08d}"
    _tool("tools/convert.py", "export", str(ckpts[-1]), str(tmp_path / "exported"))
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    # The prompt of the first valid example: its tokens up to the first counted one.
    first = int(valid.loss_masks[0][0].argmax())
    prompt = torch.from_numpy(valid.tokens[0][0][:first].astype("int64"))[None]
    out = tuned.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
        pad_token_id=2,
    )  # fmt: skip
    assert out.shape[1] > prompt.shape[1]  # it generated (and may end with EOS, as trained)
