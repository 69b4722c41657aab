"""tools/bench/gpu.py is ready before a GPU is: its smoke run on CPU, and its parts.

- The smoke run (`--smoke`: a tiny model with the 1B's branches, tied embeddings and Llama-3.1
  RoPE scaling; 1 warm-up + 2 timed steps per path, compiled paths with the aot_eager backend)
  runs every path as the GPU run does and writes the JSON: each path "ok", the same parameter
  count in all five (the same model), finite losses, the table and the verdict printed.
- The plain PyTorch baseline (tools/bench/plain_llama.py, written independently) is the same
  function as zenlm's model: with zenlm's weights copied in, fp32 logits equal zenlm's within
  1e-5 (GQA, tied head, RoPE scaling on).
- An out-of-memory micro batch is halved and the path rebuilt; other failures are recorded and
  do not stop the run; a path that would overrun --budget-s is skipped with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zenlm.testing.distributed import CPU_ONLY_ENV

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu

        yield gpu
    finally:
        sys.path.remove(str(BENCH))


def test_smoke_run_exercises_every_path(tmp_path: Path) -> None:
    import os

    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, **CPU_ONLY_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    paths = {r["path"]: r for r in doc["paths"]}
    assert list(paths) == [
        "zenlm-eager",
        "zenlm-compiled",
        "torch-eager",
        "megatron",
        "torch-compiled",
    ]
    for name, r in paths.items():
        assert r["status"] == "ok", (name, r)
        assert len(r["losses"]) == 3 and all(map(torch.isfinite, torch.tensor(r["losses"])))
        assert r["tokens_per_s"] > 0 and r["micro_batch"] == 2 and r["graph_breaks"] == 0
    assert len({r["params"] for r in paths.values()}) == 1, {
        n: r["params"] for n, r in paths.items()
    }
    for name in ("zenlm-compiled", "torch-compiled"):
        assert paths[name]["compiled_graphs"] >= 1, name
    # zenlm's two paths start from the same weights and data: their first losses agree.
    eager, compiled = paths["zenlm-eager"]["losses"], paths["zenlm-compiled"]["losses"]
    assert abs(eager[0] - compiled[0]) < 1e-2 * abs(eager[0])
    assert "| zenlm-compiled | 2 |" in proc.stdout and "verdict:" in proc.stdout
    assert doc["verdict"]["best_zenlm"] in ("zenlm-eager", "zenlm-compiled")


def _copy_zenlm_weights(zen, plain) -> None:
    """zenlm Transformer state -> plain_llama.Llama (names differ, tensors are the same)."""
    state = {"embed.weight": zen.embed.embedding.weight, "norm.weight": zen.head.norm.weight}
    for i, layer in enumerate(zen.layers):
        a, m = layer.attention, layer.mlp
        for ours, theirs in [
            ("norm1", layer.attention_norm),
            ("wq", a.q_proj),
            ("wk", a.k_proj),
            ("wv", a.v_proj),
            ("wo", a.o_proj),
            ("norm2", layer.mlp_norm),
            ("w_gate", m.gate_proj),
            ("w_up", m.up_proj),
            ("w_down", m.down_proj),
        ]:
            state[f"blocks.{i}.{ours}.weight"] = theirs.weight
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("inv_freq")]


def test_plain_baseline_is_the_same_model(gpu_bench) -> None:
    import argparse

    import plain_llama

    from zenlm.model.transformer import Transformer

    args = argparse.Namespace(smoke=True, model=str(REPO / "configs/models/debug.yaml"), seq_len=64)
    cfg = gpu_bench.zenlm_config(args, 2, False).model
    assert (
        cfg.tie_word_embeddings
        and cfg.rope_scaling.type == "llama3"
        and cfg.kv_heads < cfg.num_attention_heads
    )
    zen = Transformer(cfg, seed=3)
    plain = plain_llama.Llama(gpu_bench.shape_of(cfg))
    _copy_zenlm_weights(zen, plain)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = plain(ids), zen(ids)[..., : cfg.vocab_size]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _args(gpu_bench, **kw):
    args = gpu_bench.parse_args(["--smoke", "--paths", "torch-eager"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_out_of_memory_halves_the_micro_batch(gpu_bench, monkeypatch) -> None:
    real = gpu_bench.build_torch
    tried = []

    def build(args, micro_batch, compiled):
        tried.append(micro_batch)
        if micro_batch > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(args, micro_batch, compiled)

    monkeypatch.setattr(gpu_bench, "build_torch", build)
    r = gpu_bench.run_path("torch-eager", _args(gpu_bench, micro_batch=4), flops_token=1.0)
    assert tried == [4, 2, 1] and r["status"] == "ok" and r["micro_batch"] == 1
    assert r["oom_micro_batches"] == [4, 2] and r["tokens_per_step"] == 64


def test_a_failing_path_is_recorded_and_budget_skips(gpu_bench, monkeypatch) -> None:
    def broken(args, micro_batch, compiled):
        raise RuntimeError("no such kernel\nsecond line")

    monkeypatch.setattr(gpu_bench, "build_torch", broken)
    r = gpu_bench.run_path("torch-eager", _args(gpu_bench), flops_token=1.0)
    assert r["status"] == "failed" and r["reason"] == "RuntimeError: no such kernel"
    assert "torch-eager | | |" in gpu_bench.table([r])

    full = gpu_bench.parse_args(["--budget-s", "100"])
    assert gpu_bench.budget_skip("torch-eager", 10.0, full) is None
    skip = gpu_bench.budget_skip("zenlm-compiled", 10.0, full)
    assert skip["status"] == "skipped" and "--budget-s 100" in skip["reason"]
