"""zenlm's central promise: every TP x PP x DP layout trains the same model the same way.

Every factorisation of 1, 2, 4 and 8 ranks with TP, PP in {1, 2, 4} (ZeRO-1 where DP > 1, plus
ZeRO-2 and -3 at PP = 1) trains the debug model for 10 fp32 steps on the same data; each step's
loss and grad norm must equal the single-process plain-PyTorch reference within 1e-5 relative.
Gradient accumulation is on wherever DP < 8 (8 sequences, micro batch 1: 8 / DP micro batches
per step). A second pass repeats every (TP, PP, DP) layout (ZeRO-0/1) with activation
checkpointing on (full and selective alternating), sequence parallelism wherever TP > 1, and
tied embeddings with the stage split by parameter count at PP > 1.

One process group per world size runs all of its cases (start-up dominates on 2 cores).
"""

import functools
import time

import pytest

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import rank_micro_batches, reference_run

STEPS = 10
BASE = [
    f"optim.train_steps={STEPS}",
    "optim.warmup_steps=2",
    # Adam amplifies float-reordering noise at high lr (at 1e-2 TP drifted to 1.6e-5 by step 9
    # with the same clipping and data); at 3e-3 every layout stays within ~1e-7.
    "optim.lr=0.003",
    "optim.grad_clip_norm=0.5",  # below the grad norm: clipping is active at every step
    "data.global_batch_size_seqs=8",
    "data.micro_batch_size_seqs=1",
    "data.seq_len_tokens=32",
    "model.num_layers=4",
    "model.num_attention_heads=4",
    "model.num_kv_heads=4",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
]
TIED = ["model.tie_word_embeddings=true"]


def layouts(world_size: int) -> list[tuple[int, int, int, int]]:
    """(tp, pp, dp, zero_stage) for every factorisation of world_size with tp, pp in {1, 2, 4}."""
    out = []
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            if world_size % (tp * pp):
                continue
            dp = world_size // (tp * pp)
            stages = [0] if dp == 1 else ([1, 2, 3] if pp == 1 else [1])
            out += [(tp, pp, dp, z) for z in stages]
    return out


def cases(world_size: int) -> list[tuple[str, list[str], list[str]]]:
    """(name, overrides, model overrides) of both passes at this world size."""
    out = []
    for i, (tp, pp, dp, zero) in enumerate(layouts(world_size)):
        layout = [
            f"parallel.tensor_parallel_degree={tp}",
            f"parallel.pipeline_parallel_degree={pp}",
            f"parallel.zero_stage={zero}",
        ]
        name = f"TP{tp}xPP{pp}xDP{dp} ZeRO-{zero}"
        out.append((name, layout, []))
        if zero > 1:
            continue
        ac = "full" if i % 2 == 0 else "selective"
        extra = [f"runtime.activation_checkpointing={ac}"]
        if tp > 1:
            extra.append("parallel.sequence_parallel_enabled=true")
        model = TIED if pp > 1 else []
        if pp > 1:
            extra.append("parallel.pipeline_split=parameters")
        flags = (
            f"AC {ac}" + (" SP" if tp > 1 else "") + (" tied, split by parameters" if model else "")
        )
        out.append((f"{name} {flags}", layout + extra, model))
    return out


def _run_cases(rank, world_size, case_list, run_dir):
    from zenlm.train.trainer import Trainer

    results = []
    for name, overrides, model in case_list:
        t0 = time.perf_counter()
        cfg = load_config(None, [*BASE, *overrides, *model, f"logging.run_dir={run_dir}"])
        trainer = Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))
        losses, norms = [], []
        for _ in range(STEPS):
            losses.append(trainer.train_step())
            norms.append(float(trainer.engine.get_global_grad_norm()))
        trainer.close()
        results.append((name, tuple(model), losses, norms, time.perf_counter() - t0))
    return results


@pytest.fixture(scope="module")
def references():
    return {
        (): reference_run(load_config(None, BASE), STEPS),
        tuple(TIED): reference_run(load_config(None, [*BASE, *TIED]), STEPS),
    }


def test_layout_list_is_complete():
    assert len(layouts(1)) == 1
    assert {(tp, pp, dp) for tp, pp, dp, _ in layouts(8)} == {
        (4, 2, 1), (2, 4, 1), (4, 1, 2), (1, 4, 2), (2, 2, 2), (2, 1, 4), (1, 2, 4), (1, 1, 8)
    }  # fmt: skip
    assert sum(len(layouts(w)) for w in (1, 2, 4, 8)) == 30


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_layout_matches_single_process(world_size, references, tmp_path):
    for key, (ref, _) in references.items():
        assert ref[-1] < ref[0] - 0.1, f"reference {key} does not train: {ref}"
    case_list = cases(world_size)
    results = run_distributed(
        _run_cases, world_size, args=(case_list, str(tmp_path)), timeout_s=1500
    )
    failures, timings = [], []
    for rank, per_rank in enumerate(results):
        for name, model, losses, norms, seconds in per_rank:
            ref_losses, ref_norms = references[model]
            worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
            # Grad norms too: a mis-counted norm can move the loss by only ~1e-5 per step.
            worst_norm = max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True))
            if rank == 0:
                timings.append(f"{name}: {seconds:.1f} s, loss {worst:.1e}, norm {worst_norm:.1e}")
            if worst >= 1e-5 or worst_norm >= 1e-5:
                failures.append(
                    f"rank {rank} {name}: worst relative difference loss {worst:.2e}, "
                    f"grad norm {worst_norm:.2e}"
                )
    print("\n".join(timings))
    assert not failures, "\n".join(failures)
