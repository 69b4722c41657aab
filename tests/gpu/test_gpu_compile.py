"""runtime.compile_enabled on one CUDA GPU (inductor -> Triton kernels). Skipped without CUDA;
run on a lent GPU machine in its own process: `pytest tests/gpu`. (bf16 compiled training at the
1B shape is what tools/bench/gpu.py runs.)

The engine is built and stepped as Trainer.train_step does (zenlm.train.build, one micro batch
per step), eager and compiled from the same weights and data, in fp32 with the well-conditioned
settings of tests/numerics/test_compile.py: every step's loss and grad norm within 1e-5
relative, no graph break in a block, at least one compiled graph. Selective checkpointing puts
the SDPA call inside a checkpoint region of the compiled graph, so it runs too.
"""

from __future__ import annotations

import pytest
import torch

from zenlm.config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 5
TOLERANCE = 1e-5
BASE = [
    "model.hidden_size=512",
    "model.intermediate_size=1376",
    "model.num_layers=4",
    "model.num_attention_heads=8",
    "model.num_kv_heads=4",
    "model.vocab_size=4096",
    "model.max_seq_len=1024",
    "data.seq_len_tokens=1024",
    "data.global_batch_size_seqs=4",
    "data.micro_batch_size_seqs=4",
    "optim.lr=1e-3",
    "optim.eps=1e-6",
    "optim.warmup_steps=2",
    f"optim.train_steps={STEPS}",
    "optim.grad_clip_norm=0.5",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
]


def _steps(overrides: list[str]) -> tuple[list[float], list[float], dict[str, int]]:
    from zenlm.config.validate import validate
    from zenlm.parallel.dims import release_process_groups
    from zenlm.runtime.env import init_distributed, set_seeds
    from zenlm.testing.reference import rank_micro_batches
    from zenlm.train.build import build_parallel, build_training_engine, model_inputs

    init_distributed()
    cfg = load_config(None, [*BASE, *overrides])
    layout = validate(cfg, world_size=1)
    set_seeds(cfg.runtime.seed)
    counters = torch._dynamo.utils.counters
    counters.clear()
    engine, _ = build_training_engine(cfg, layout, build_parallel(cfg, layout))
    data = rank_micro_batches(cfg, 0, 1)
    losses, norms = [], []
    for _ in range(STEPS):
        loss = engine(**model_inputs(next(data), False, engine.device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    stats = {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }
    engine = None
    release_process_groups()
    return losses, norms, stats


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_compiled_steps_match_eager_on_cuda(checkpointing: str) -> None:
    ac = f"runtime.activation_checkpointing={checkpointing}"
    eager_loss, eager_norm, _ = _steps([ac])
    loss, norm, stats = _steps([ac, "runtime.compile_enabled=true"])
    assert stats["graphs"] >= 1 and stats["breaks"] == 0, stats
    for step in range(STEPS):
        for name, got, ref in [("loss", loss, eager_loss), ("grad norm", norm, eager_norm)]:
            rel = abs(got[step] - ref[step]) / abs(ref[step])
            assert rel <= TOLERANCE, f"step {step + 1} {name}: {got[step]} vs eager {ref[step]}"
    assert loss[-1] < loss[0]
