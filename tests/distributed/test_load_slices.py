"""A resume reads each tensor's bytes once in all: every rank reads only its TP slice, and the DP
replicas of a slice split the reading and broadcast (zenlm.checkpoint.weights.load_weights).

TP2 x DP2 (ZeRO-1) trains 2 steps on a corpus written by the CLIs and saves; the same layout and
TP2 x PP2 x DP1 resume it. The bytes the ranks read, summed, equal the bytes of every model and
optimizer tensor in the checkpoint (counted from the safetensors headers here, independently),
plus one more read of the TP-replicated norm weights per extra TP rank:
before this, each rank read its stage's full tensors (4x the checkpoint at TP2 x DP2). No rank
reads more than its balanced share plus the largest tensor. The resumed run continues with the
uninterrupted run's step-3 loss (bitwise at the same layout, 1e-5 at TP2 x PP2) to show the slices are the right ones.
"""

from pathlib import Path

import pytest
from safetensors import safe_open

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.text_corpus import build_text_corpus

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")
BASE = [
    "model.num_layers=2",
    "optim.train_steps=3",
    "optim.warmup_steps=1",
    "data.global_batch_size_seqs=8",
    "data.micro_batch_size_seqs=2",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
    "checkpoint.save_interval_steps=2",
]


def _run(rank, world_size, corpus_overrides, run_dir):
    from zenlm.train.trainer import Trainer

    def trainer(name, extra):
        cfg = load_config(
            CONFIG,
            [*BASE, *corpus_overrides, *extra, f"logging.run_dir={run_dir}",
             f"logging.run_name={name}"],
        )  # fmt: skip
        return Trainer(cfg)

    tp2dp2 = ["parallel.tensor_parallel_degree=2"]
    t = trainer("straight", tp2dp2)
    straight = [h["train/loss"] for h in t.fit()]
    t.close()
    ckpt = Path(run_dir) / "straight" / "checkpoints" / "step_00000002"
    out = {"straight": straight}
    for name, layout in {
        "tp2dp2": tp2dp2,
        "tp2pp2": [*tp2dp2, "parallel.pipeline_parallel_degree=2"],
    }.items():
        t = trainer(name, [*layout, f"checkpoint.resume={ckpt}"])
        out[name] = (t.checkpoints.bytes_read, [h["train/loss"] for h in t.fit()])
        t.close()
    return out


def _tensor_bytes(ckpt: Path) -> tuple[int, int, int]:
    """(all tensor bytes, the largest tensor's, the RMSNorm weights': replicated over TP)."""
    total, largest, norms = 0, 0, 0
    for f in ckpt.glob("*.safetensors"):
        if f.name.startswith("rng-"):
            continue
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                shape = st.get_slice(k).get_shape()
                n = 4
                for d in shape:
                    n *= d
                total += n
                largest = max(largest, n)
                norms += n if k.endswith("norm.weight") else 0
    return total, largest, norms


def test_resume_reads_the_checkpoint_once(tmp_path):
    corpus = build_text_corpus(tmp_path / "data")
    per_rank = run_distributed(_run, 4, args=(corpus.overrides(), str(tmp_path / "runs")))
    ckpt = tmp_path / "runs" / "straight" / "checkpoints" / "step_00000002"
    total, largest, norms = _tensor_bytes(ckpt)
    for name in ("tp2dp2", "tp2pp2"):
        reads = [r[name][0] for r in per_rank]
        # TP-replicated tensors (the norms: 0.2% here, less at scale) are read by each TP rank.
        assert sum(reads) == total + norms, (name, reads, total, norms)
        assert max(reads) <= total / 4 + largest, (name, reads, total, largest)
        for r in per_rank:
            resumed, straight = r[name][1], r["straight"][2:]
            if name == "tp2dp2":  # same layout: bitwise
                assert resumed == straight, (name, resumed, straight)
            else:  # another layout: the reductions run in another order
                assert resumed == pytest.approx(straight, rel=1e-5), (name, resumed, straight)
