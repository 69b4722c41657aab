"""zenlm's central promise, on the path a user runs: every TP x PP x DP layout trains the same
model the same way as one plain PyTorch process.

Data: a corpus this module writes from text with tools/train_tokenizer.py and
tools/preprocess.py (zenlm.testing.text_corpus), read by zenlm's real train and validation
loaders (with DataLoader workers in some cases, see below). Training: `Trainer(cfg)` and `fit()` exactly as
launch/train.py does, cfg from configs/debug.yaml plus overrides. Reference: hf_reference.py, a
plain PyTorch loop over transformers' Llama / Qwen2 models fed by an independent tar reader; it
shares nothing with zenlm but the initial weights.

Checked per case, 10 fp32 steps: every step's loss and pre-clip grad norm within 1e-5 relative of
the reference (clipping is active at every step); val loss and accuracy after step 10 within
1e-5 (the validation set is 20 samples, not a multiple of micro batch x DP for most layouts, so
the label-masked tail is exercised); the same numbers on every rank; and that each option took
effect: the engine's ZeRO stage, recomputation counted (SDPA calls per step doubled under
either AC mode, block-input norms re-run only under full AC), sequence-parallel block inputs
sharded to seq/TP, and the pipeline's stage contents.

Cases (CASES below): all 8 TP x PP x DP factorisations of 8 ranks, every factorisation of 1, 2
and 4 ranks, ZeRO 0-3, plus the feature coverage: GQA and MQA, Qwen2 q/k/v biases, tied
embeddings (PP 1, PP > 1, ZeRO-2 and -3), document masking (PP 1 and PP > 1), SP, full and
selective AC (also with ZeRO-2/3 and SP), the vocabulary padding path (384 is a multiple of 128
but not of 128 x TP at TP 2, and padded to 512 at TP 4 too), a parameter-count stage split that
differs from the layer split, bf16 at two layouts against the fp32 reference, and supervised
fine-tuning (a tools/preprocess_sft.py corpus: loss on completion tokens only, so micro batches
count different token numbers and the step loss must be the global token mean) at DP 2,
PP 2 x DP 2 and TP 2 x PP 2 x DP 2 with SP.

Which cases run at 8 ranks, and why: one case per (TP, PP, DP) factorisation of 8 (8 cases,
ZeRO-1 wherever DP > 1). ZeRO-2/3 run only at 2 and 4 ranks: they need PP = 1, so at 8 ranks they
would only repeat DP-only partitioning already proven at DP 2 and 4 (and with TP 2 x DP 2), and
each 8-rank case costs 10-15 s on a 2-core machine. One process group per world size runs all of
its cases (start-up dominates on 2 cores). DataLoader workers run in 12 cases at 1-8 ranks
(one or two per rank): each worker is one more process per rank on 2 cores, so the other cases
read in the rank itself; workers are also covered by the loader, resume and Slurm tests.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.text_corpus import build_sft_corpus, build_text_corpus

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "debug.yaml")
STEPS = 10
EVAL_SAMPLES = 20
BASE = [
    f"optim.train_steps={STEPS}",
    "optim.warmup_steps=2",
    # A well-conditioned run, so 1e-5 measures the layout and not rounding amplified by chaos:
    # at lr 3e-3 this corpus gives a loss spike at step 7 and two correct attention codes
    # (transformers' eager and SDPA) then differ by 3.6e-5 in grad norm; at 1e-3 they agree
    # within 3.7e-7, and the loss still falls by 0.5 in 10 steps.
    "optim.lr=0.001",
    "optim.min_lr=0.0001",
    # Adam turns gradients that are pure rounding noise into lr-sized updates when eps is far
    # below them: the k-projection bias (qwen2) has an exactly zero gradient in exact arithmetic
    # (softmax ignores the q.b_k added to every score of a query), and at eps 1e-8 the two
    # attention codes then differ by 1.3e-5 in grad norm at step 7. eps 1e-6 is below every
    # real gradient here and above that noise: they agree within 5.2e-7 for every variant.
    "optim.eps=1e-6",
    "optim.grad_clip_norm=0.5",  # below the grad norm: clipping is active at every step
    "data.global_batch_size_seqs=16",
    "data.micro_batch_size_seqs=2",
    "data.num_workers=1",
    "model.num_layers=4",
    "model.num_attention_heads=4",
    "model.hidden_size=64",
    "logging.eval_interval_steps=10",
    f"logging.eval_samples={EVAL_SAMPLES}",
    "logging.log_interval_steps=5",
    "logging.tensorboard_enabled=false",
]
VARIANTS = {
    "mha": ["model.num_kv_heads=4"],
    "gqa": ["model.num_kv_heads=2"],
    "mqa": ["model.num_kv_heads=1"],
    "qwen2": ["model.num_kv_heads=2", "model.qkv_bias=true"],
    "tied": ["model.num_kv_heads=4", "model.tie_word_embeddings=true"],
    "doc": ["model.num_kv_heads=4", "model.document_masking=true"],
    # A small MLP makes the embedding and head heavier than a block, so the parameter split at
    # PP 4 puts no block on the first and last stages: it differs from the layer split.
    "split": ["model.num_kv_heads=4", "model.intermediate_size=16"],
    # Supervised fine-tuning: the corpus of tools/preprocess_sft.py (prompt/completion pairs,
    # loss on completion tokens only, whole examples packed with document masking). Micro
    # batches count different token numbers, so only a global token mean matches here.
    "sft": ["model.num_kv_heads=2"],
}
TOLERANCE = 1e-5
# bf16 against the fp32 reference. bf16 keeps 8 significant bits (unit roundoff u = 2^-9 =
# 2.0e-3 for round-to-nearest): every matmul input, activation and logit is rounded, and a
# 4-layer forward chains ~10 rounded ops per residual path, so the loss of step 1 carries a
# relative error of order 10 u = 2e-2 in the worst case and ~sqrt(10) u = 6e-3 typically; over 10
# steps Adam's normalised updates keep that from compounding (master weights are fp32). So:
# every step's loss within 2e-2 relative, and the 10-step mean within 1e-2.
BF16_STEP_TOLERANCE = 2e-2
BF16_MEAN_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Case:
    tp: int
    pp: int
    dp: int
    zero: int
    variant: str
    ac: str = "none"
    sp: bool = False
    split: str = "layers"
    workers: int = 1
    precision: str = "fp32"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def name(self) -> str:
        parts = [f"TP{self.tp}xPP{self.pp}xDP{self.dp} ZeRO-{self.zero} {self.variant}"]
        if self.ac != "none":
            parts.append(f"AC {self.ac}")
        if self.sp:
            parts.append("SP")
        if self.split != "layers":
            parts.append(f"split by {self.split}")
        if self.precision != "fp32":
            parts.append(self.precision)
        parts.append(f"workers {self.workers}")
        return ", ".join(parts)

    def overrides(self) -> list[str]:
        return [
            *VARIANTS[self.variant],
            f"parallel.tensor_parallel_degree={self.tp}",
            f"parallel.pipeline_parallel_degree={self.pp}",
            f"parallel.zero_stage={self.zero}",
            f"parallel.sequence_parallel_enabled={str(self.sp).lower()}",
            f"parallel.pipeline_split={self.split}",
            f"runtime.activation_checkpointing={self.ac}",
            f"runtime.precision={self.precision}",
            f"data.num_workers={self.workers}",
        ]


CASES = [
    # 1 rank
    Case(1, 1, 1, 0, "mha", workers=0),
    Case(1, 1, 1, 0, "mqa", ac="full", workers=2),
    Case(1, 1, 1, 0, "tied", ac="selective"),
    Case(1, 1, 1, 1, "mha", precision="bf16"),
    # 2 ranks
    Case(1, 1, 2, 1, "gqa"),
    Case(1, 1, 2, 2, "tied", workers=0),
    Case(1, 1, 2, 3, "qwen2", ac="full", workers=0),
    Case(1, 1, 2, 1, "sft"),
    Case(2, 1, 1, 0, "mha"),
    Case(2, 1, 1, 0, "gqa", ac="selective", sp=True, workers=0),
    Case(1, 2, 1, 0, "doc", workers=2),
    Case(1, 2, 1, 0, "tied", ac="full", split="parameters"),
    # 4 ranks
    Case(1, 1, 4, 1, "mha"),
    Case(1, 1, 4, 2, "doc", workers=0),
    Case(1, 1, 4, 3, "tied", workers=0),
    Case(2, 1, 2, 1, "qwen2", sp=True, workers=0),
    Case(2, 1, 2, 2, "mha", ac="full", sp=True, workers=0),
    Case(2, 1, 2, 3, "gqa", ac="selective", sp=True),
    Case(4, 1, 1, 0, "mha", ac="full", sp=True, workers=0),
    Case(1, 2, 2, 1, "doc", ac="selective", workers=2),
    Case(2, 2, 1, 0, "tied", sp=True, split="parameters", workers=0),
    Case(1, 4, 1, 0, "split", split="parameters", workers=0),
    Case(1, 4, 1, 0, "mha", ac="full", workers=0),
    Case(2, 2, 1, 1, "mha", precision="bf16", workers=0),
    Case(1, 2, 2, 1, "sft", workers=0),
    # 8 ranks: one case per factorisation (see the module docstring)
    Case(4, 2, 1, 0, "mha", sp=True, workers=0),
    Case(2, 4, 1, 0, "gqa", workers=0),
    Case(4, 1, 2, 1, "mha", workers=0),
    Case(1, 4, 2, 1, "tied", split="parameters", workers=0),
    Case(2, 2, 2, 1, "mha", ac="selective", sp=True),  # configs/runs/debug_3d.yaml's layout
    Case(2, 1, 4, 1, "qwen2", sp=True, workers=0),
    Case(1, 2, 4, 1, "doc", ac="full", workers=0),
    Case(1, 1, 8, 1, "mha", workers=0),
    Case(2, 2, 2, 1, "sft", sp=True, workers=0),
]


def config(case_or_variant: Case | str, extra: list[str] = ()):
    if isinstance(case_or_variant, Case):
        overrides = case_or_variant.overrides()
    else:
        overrides = VARIANTS[case_or_variant]
    return load_config(CONFIG, [*BASE, *overrides, *extra])


# -- what runs on each rank --------------------------------------------------------------------


class _CountingFunctional:
    """Stands in for torch.nn.functional inside zenlm.model.layers and counts SDPA calls made
    with grad enabled (training forwards and their recomputation in backward, not validation)."""

    def __init__(self) -> None:
        import torch.nn.functional as F

        self._F, self.sdpa_calls = F, 0

    def __getattr__(self, name):
        return getattr(self._F, name)

    def scaled_dot_product_attention(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.sdpa_calls += 1
        return self._F.scaled_dot_product_attention(*args, **kwargs)


def _probe(trainer) -> dict:
    """Hooks that show whether AC, SP and the stage split took effect on this rank."""
    from zenlm.model import layers
    from zenlm.parallel.pipeline import local_blocks

    blocks = local_blocks(trainer.engine.module)
    counting = _CountingFunctional()
    layers.F = counting
    probe = {"norm_calls": 0, "block_seq": set(), "counting": counting, "hooks": []}

    def on_norm(module, args, output):
        if torch.is_grad_enabled():
            probe["norm_calls"] += 1

    def on_block(module, args):
        probe["block_seq"].add(int(args[0][0].shape[1]))  # (b, s_local, h)

    for b in blocks:
        probe["hooks"].append(b.attention_norm.register_forward_hook(on_norm))
        probe["hooks"].append(b.register_forward_pre_hook(on_block))
    probe["blocks"] = sorted(b.layer_idx for b in blocks)
    return probe


def _run_cases(rank, world_size, cases, corpus_overrides, run_dir, sft_overrides=()):
    import torch.nn.functional as F

    from zenlm.model import layers
    from zenlm.train.trainer import Trainer

    results = []
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        cfg = load_config(
            CONFIG,
            [
                *BASE,
                *corpus_overrides,
                *(sft_overrides if case.variant == "sft" else ()),
                *case.overrides(),
                f"logging.run_dir={run_dir}",
                f"logging.run_name=case{i}",
            ],
        )
        trainer = Trainer(cfg)
        probe = _probe(trainer)
        try:
            history = trainer.fit()
        finally:
            layers.F = F
            for h in probe["hooks"]:
                h.remove()
        micro = trainer.layout.grad_accum_steps
        results.append(
            {
                "name": case.name,
                "losses": [h["train/loss"] for h in history],
                "grad_norms": [h["train/grad_norm"] for h in history],
                "val_loss": history[-1]["val/loss"],
                "val_accuracy": history[-1]["val/accuracy"],
                "zero_stage": trainer.engine.zero_optimization_stage(),
                "param_dtype": str(next(trainer.engine.module.parameters()).dtype),
                # Per training step on this rank: forwards (+ recomputes) of the local blocks.
                "sdpa_per_step": probe["counting"].sdpa_calls / STEPS / micro,
                "norm_per_step": probe["norm_calls"] / STEPS / micro,
                "blocks": probe["blocks"],
                "block_seq": sorted(probe["block_seq"]),
                "seconds": time.perf_counter() - t0,
            }
        )
        trainer.close()
    return results


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_text_corpus(tmp_path_factory.mktemp("text_corpus"))


@pytest.fixture(scope="module")
def sft_corpus(corpus, tmp_path_factory):
    return build_sft_corpus(tmp_path_factory.mktemp("sft_corpus"), corpus)


@pytest.fixture(scope="module")
def references(corpus, sft_corpus):
    """One plain-PyTorch reference per model variant (fp32, one process)."""
    from hf_reference import reference_run

    from zenlm.model import Transformer, full_state_dict
    from zenlm.model.factory import PlainFactory

    out = {}
    for variant in sorted({c.variant for c in CASES}):
        data = sft_corpus if variant == "sft" else corpus
        cfg = config(variant, data.overrides())
        factory = PlainFactory()
        initial = full_state_dict(Transformer(cfg.model, factory, seed=cfg.runtime.seed), factory)
        out[variant] = reference_run(cfg, data.corpus, STEPS, initial)
    return out


def test_reference_document_mask_is_per_document(corpus):
    """The reference's 4-D mask + restarting positions equals running each document alone."""
    from hf_reference import batch_of, hf_model, read_split

    from zenlm.model import Transformer, full_state_dict
    from zenlm.model.factory import PlainFactory

    cfg = config("doc", corpus.overrides())
    factory = PlainFactory()
    initial = full_state_dict(Transformer(cfg.model, factory, seed=cfg.runtime.seed), factory)
    model = hf_model(cfg.model, initial).eval()
    train = read_split(corpus.corpus, "train")
    rows = [(0, m) for m in range(len(train.tokens[0])) if len(train.doc_starts[0][m]) >= 1][:3]
    assert len(rows) == 3, "corpus has too few multi-document samples"
    batch = batch_of(train, rows, document_masking=True)
    with torch.no_grad():
        full = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for i, (s, m) in enumerate(rows):
            cuts = [0, *(int(x) for x in train.doc_starts[s][m] if 0 < x < 32), 32]
            for a, b in itertools.pairwise(cuts):
                alone = model(input_ids=batch["input_ids"][i : i + 1, a:b]).logits
                torch.testing.assert_close(full[i : i + 1, a:b], alone, rtol=1e-5, atol=1e-5)


def test_case_list_covers_every_layout_and_feature():
    for ws in (1, 2, 4, 8):
        want = {
            (tp, pp, ws // (tp * pp)) for tp in (1, 2, 4) for pp in (1, 2, 4) if ws % (tp * pp) == 0
        }
        assert {(c.tp, c.pp, c.dp) for c in CASES if c.world_size == ws} == want, ws
    for ws in (2, 4):
        assert {c.zero for c in CASES if c.world_size == ws and c.pp == 1 and c.dp > 1} == {
            1, 2, 3
        }  # fmt: skip

    def have(pred) -> bool:
        return any(pred(c) for c in CASES)

    assert have(lambda c: c.variant == "gqa") and have(lambda c: c.variant == "mqa")
    assert have(lambda c: c.variant == "qwen2" and c.tp > 1)
    assert have(lambda c: c.variant == "tied" and c.pp == 1)
    assert {c.zero for c in CASES if c.variant == "tied" and c.pp == 1} >= {2, 3}
    assert have(lambda c: c.variant == "tied" and c.pp > 1)
    assert have(lambda c: c.variant == "doc" and c.pp > 1)
    for zero in (2, 3):
        assert have(lambda c, z=zero: c.zero == z and c.sp and c.ac != "none")
    assert have(lambda c: c.variant == "split" and c.split == "parameters")
    assert {c.world_size for c in CASES if c.variant == "sft"} == {2, 4, 8}
    assert have(lambda c: c.variant == "sft" and c.pp > 1 and c.tp > 1)
    assert len({(c.tp, c.pp, c.dp) for c in CASES if c.precision == "bf16"}) == 2
    assert {c.ac for c in CASES} == {"none", "full", "selective"}
    assert {c.tp for c in CASES if c.variant in ("mha", "tied")} >= {2, 4}  # padding path


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check_options(case: Case, r: dict, rank: int) -> list[str]:
    bad = []
    if r["zero_stage"] != case.zero:
        bad.append(f"engine ZeRO stage {r['zero_stage']} != {case.zero}")
    local = len(r["blocks"])
    recompute = 2 if case.ac != "none" else 1
    if r["sdpa_per_step"] != local * recompute:
        bad.append(f"SDPA calls per micro batch {r['sdpa_per_step']} != {local} x {recompute}")
    if r["norm_per_step"] != local * (2 if case.ac == "full" else 1):
        bad.append(f"attention_norm calls per micro batch {r['norm_per_step']} (AC {case.ac})")
    dtype = "torch.bfloat16" if case.precision == "bf16" else "torch.float32"
    if r["param_dtype"] != dtype:
        bad.append(f"engine module parameters are {r['param_dtype']}, not {dtype}")
    seq = 32 // case.tp if case.sp else 32
    if local and r["block_seq"] != [seq]:
        bad.append(f"block input sequence lengths {r['block_seq']} != [{seq}] (SP {case.sp})")
    return [f"rank {rank} {case.name}: {b}" for b in bad]


def _stage_blocks(case: Case, per_rank: list[list[dict]], index: int) -> list[list[int]]:
    """Blocks held by each pipeline stage (TP rank 0, DP rank 0 of each stage)."""
    return [per_rank[stage * case.dp * case.tp][index]["blocks"] for stage in range(case.pp)]


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_layout_matches_the_reference(world_size, corpus, sft_corpus, references, tmp_path):
    for variant, ref in references.items():
        assert ref["losses"][-1] < ref["losses"][0] - 0.1, f"reference {variant} does not train"
    cases = [c for c in CASES if c.world_size == world_size]
    per_rank = run_distributed(
        _run_cases,
        world_size,
        args=(cases, corpus.overrides(), str(tmp_path), sft_corpus.overrides()),
        timeout_s=1500,
    )
    failures, lines = [], []
    for index, case in enumerate(cases):
        ref = references[case.variant]
        r0 = per_rank[0][index]
        for rank in range(world_size):
            r = per_rank[rank][index]
            for key in ("losses", "grad_norms", "val_loss", "val_accuracy"):
                if r[key] != r0[key]:
                    failures.append(f"{case.name}: {key} differs between rank 0 and {rank}")
            failures += _check_options(case, r, rank)
        stages = _stage_blocks(case, per_rank, index)
        if case.variant == "split":
            if stages == [[i] for i in range(4)] or stages[0] or stages[-1]:
                failures.append(f"{case.name}: parameter split {stages} equals the layer split")
        elif case.split == "layers" and case.pp > 1:
            per = 4 // case.pp
            if stages != [list(range(s * per, (s + 1) * per)) for s in range(case.pp)]:
                failures.append(f"{case.name}: layer split gave {stages}")
        worst_loss = max(map(rel, r0["losses"], ref["losses"]))
        worst_norm = max(map(rel, r0["grad_norms"], ref["grad_norms"]))
        val = rel(r0["val_loss"], ref["val_loss"])
        acc = abs(r0["val_accuracy"] - ref["val_accuracy"])
        lines.append(
            f"{case.name}: {r0['seconds']:.1f} s, loss {worst_loss:.1e}, norm {worst_norm:.1e}, "
            f"val {val:.1e}, acc {acc:.1e}, stages {stages}"
        )
        if case.precision == "bf16":
            mean = rel(sum(r0["losses"]), sum(ref["losses"]))
            if worst_loss >= BF16_STEP_TOLERANCE or mean >= BF16_MEAN_TOLERANCE:
                failures.append(f"{case.name}: bf16 loss {worst_loss:.2e}, mean {mean:.2e}")
            if all(a == b for a, b in zip(r0["losses"], ref["losses"])):
                failures.append(f"{case.name}: bf16 equals fp32 exactly: not applied")
            continue
        # Validation: 20 samples x 32 tokens; accuracy moves in steps of 1/640 per token.
        if max(worst_loss, worst_norm, val) >= TOLERANCE or acc > 0.5 / 640:
            failures.append(
                f"{case.name}: relative difference loss {worst_loss:.2e}, grad norm "
                f"{worst_norm:.2e}, val loss {val:.2e}; accuracy {acc:.2e}"
            )
        assert math.isfinite(r0["val_loss"])
    print("\n".join(lines))
    assert not failures, "\n".join(failures)
