"""The planner (zenlm.plan, tools/plan.py): the layouts it lists are exactly those the real
validator accepts, parameter counts equal transformers' models of the same shape, DeepSpeed's
partition bookkeeping and the state bytes of small cases worked by hand, and bad input is one
`error:` line. (Bytes against the real engine: tests/distributed/test_plan_memory.py.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from zenlm.config import load_config
from zenlm.config.load import ConfigError
from zenlm.config.validate import validate
from zenlm.model.config import ModelConfig
from zenlm.parallel.engine import effective_zero_stage
from zenlm.plan.cluster import GIB, GPUS, Cluster, gpu_spec
from zenlm.plan.memory import partition_overlap_numel, state_bytes
from zenlm.plan.search import CHECKPOINTING, SearchSpace, plan_layouts
from zenlm.plan.shapes import model_parameter_count, stage_params
from zenlm.testing.cli_probe import run_tool_probe

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("plan_tool", REPO / "tools" / "plan.py")
plan_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan_tool)

SMALL = [
    "model.num_layers=4",
    "model.num_kv_heads=2",
    "data.global_batch_size_seqs=16",
    "data.seq_len_tokens=64",
]


def test_listed_layouts_are_exactly_the_validators() -> None:
    """Brute force over every degree, stage and batch shape through validate(): the accepted
    set (folded by the engine's effective ZeRO stage, TP inside a node, ZeRO <= 2) is the
    planner's set, and each listed layout's overrides load and validate to its degrees."""
    cfg = load_config(None, SMALL)
    world, per_node = 8, 4
    cluster = Cluster(gpu_spec("h100-sxm"), world, per_node)
    plans, _ = plan_layouts(cfg, cluster, SearchSpace(max_micro_batch=16))
    got = {
        (
            p.tp,
            p.pp,
            p.effective_zero_stage,
            p.sequence_parallel,
            p.micro_batch_size_seqs,
            p.checkpointing,
        )
        for p in plans
    }
    assert len(got) == len(plans), "a layout is listed twice"
    want = set()
    for tp in range(1, world + 1):
        for pp in range(1, world + 1):
            for zero in (0, 1, 2, 3):
                for sp in (False, True):
                    for mbs in range(1, 17):
                        for ac in CHECKPOINTING:
                            c = dataclasses.replace(
                                cfg,
                                parallel=dataclasses.replace(
                                    cfg.parallel,
                                    tensor_parallel_degree=tp,
                                    pipeline_parallel_degree=pp,
                                    zero_stage=zero,
                                    sequence_parallel_enabled=sp,
                                ),
                                data=dataclasses.replace(cfg.data, micro_batch_size_seqs=mbs),
                                runtime=dataclasses.replace(
                                    cfg.runtime, activation_checkpointing=ac
                                ),
                            )
                            try:
                                layout = validate(c, world, check_device=False)
                            except ConfigError:
                                continue
                            if zero <= 2 and tp <= per_node:
                                want.add((tp, pp, effective_zero_stage(c, layout), sp, mbs, ac))
    assert got == want
    for p in plans[:: max(1, len(plans) // 40)]:
        layout = validate(load_config(None, SMALL + p.overrides), world, check_device=False)
        assert (layout.tensor_parallel_degree, layout.pipeline_parallel_degree) == (p.tp, p.pp)
        assert (layout.data_parallel_degree, layout.grad_accum_steps) == (p.dp, p.micro_batches)


def _hf_numel(config) -> int:
    import torch
    import transformers

    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[config.model_type]
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter


@pytest.mark.parametrize("name", ["7b", "1b", "qwen2-small"])
def test_parameter_count_is_transformers(name: str) -> None:
    """The planner's tensor inventory at TP 1 (vocabulary padding off) against the numel of a
    transformers model of the same shape, built on the meta device."""
    transformers = pytest.importorskip("transformers")
    if name == "qwen2-small":
        m = ModelConfig(
            vocab_size=1000, hidden_size=96, intermediate_size=200, num_layers=3,
            num_attention_heads=6, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=True,
        )  # fmt: skip
        hf = transformers.Qwen2Config(
            vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
    else:
        m = load_config(REPO / "configs" / "models" / f"{name}.yaml").model
        hf = transformers.LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.kv_heads,
            head_dim=m.head_size,
            tie_word_embeddings=m.tie_word_embeddings,
        )
    unpadded = dataclasses.replace(m, vocab_pad_multiple=1)
    assert model_parameter_count(unpadded) == _hf_numel(hf)


def test_tp_and_pp_split_every_tensor_once() -> None:
    """Summed over stages and TP ranks, sharded tensors make the TP 1 model once and replicated
    ones (norms) t times; a tied embedding is held by the first and the last stage."""
    m = dataclasses.replace(load_config(REPO / "configs" / "models" / "1b.yaml").model)
    full = stage_params(m, 4, 1)[0]
    for tp, pp in ((4, 4), (2, 8), (4, 16)):
        stages = stage_params(m, tp, pp)
        assert sum(len(s.blocks) for s in stages) == m.num_layers
        norms = sum(t.numel for s in stages for t in s.tensors if "norm" in t.name)
        sharded = sum(s.numel for s in stages) - norms
        embedding = m.padded_vocab_size(tp) // tp * m.hidden_size  # the tied copy
        full_sharded = stage_params(m, tp, 1)[0].numel - sum(
            t.numel for t in full.tensors if "norm" in t.name
        )
        assert sharded == full_sharded + embedding
        assert stages[0].has_embedding and stages[-1].has_head


def test_partition_overlap_by_hand() -> None:
    # [10, 6, 4] at DP 2: partitions [0, 10) and [10, 20); no tensor straddles.
    assert partition_overlap_numel([10, 6, 4], 2) == [10, 10]
    # [7, 7, 6]: the second tensor [7, 14) straddles 10, so both ranks hold it whole.
    assert partition_overlap_numel([7, 7, 6], 2) == [14, 13]
    # One 100-element tensor over 4 partitions of 25: every rank holds all of it.
    assert partition_overlap_numel([100], 4) == [100, 100, 100, 100]


def _hand_model() -> ModelConfig:
    # vocab 128 (already a multiple of 128), h 8, MLP 16, one block, 2 heads of 4, untied.
    return ModelConfig(
        vocab_size=128, hidden_size=8, intermediate_size=16, num_layers=1, num_attention_heads=2
    )


def test_state_bytes_by_hand() -> None:
    """One block: decay group q, k, v, o (64 each), gate, up, down (128 each), LM head (1024)
    = 1664 elements; no-decay group embedding (1024) + 3 norms (8 each) = 1048."""
    stage = stage_params(_hand_model(), 1, 1)[0]
    assert stage.groups() == [[64, 64, 64, 64, 128, 128, 128, 1024], [1024, 8, 8, 8]]
    # bf16, ZeRO 1, DP 3 (BF16_Optimizer): groups padded to multiples of 2 x 3 = 6:
    # 1664 -> 1668, 1048 -> 1050; partitions 556 and 350.
    s = state_bytes(stage, "bf16", 1, 3)
    assert s.params == 2 * (1668 + 1050)
    assert s.grads == 2 * 2712 + 4 * (1668 + 1050)  # bf16 .grad per tensor + full fp32 buffer
    assert s.optimizer == 12 * (556 + 350) + 2 * 4  # master + 2 moments, one step per group
    # fp32, ZeRO 1, DP 3: each rank's gradients are the tensors overlapping its partitions,
    # whole. Decay [0, 556): q..up + down [512, 640) = 640; [556, 1112): down + head = 1152;
    # [1112, 1668): head = 1024. No decay: the embedding [0, 1024) overlaps all three
    # partitions of 350; the last also holds the norms: 1024, 1024, 1048.
    assert [state_bytes(stage, "fp32", 1, 3, r).grads for r in range(3)] == [
        4 * (640 + 1024),
        4 * (1152 + 1024),
        4 * (1024 + 1048),
    ]
    assert state_bytes(stage, "fp32", 1, 3).grads == 4 * 2176  # the worst rank
    # fp32, ZeRO 0: plain AdamW, 12 tensors: 4 B weights, 4 B grads, 8 B moments + a step each.
    z0 = state_bytes(stage, "fp32", 0, 3)
    assert (z0.params, z0.grads, z0.optimizer) == (4 * 2712, 4 * 2712, 8 * 2712 + 4 * 12)


def test_bubble_and_ranking() -> None:
    cfg = load_config(None, SMALL)
    cluster = Cluster(gpu_spec("a100-80g"), 8, 8)
    plans, _ = plan_layouts(cfg, cluster, SearchSpace(pp=(4,), micro_batch=(1,)))
    for p in plans:
        assert p.bubble == pytest.approx(3 / (p.micro_batches + 3))
    times = [round(p.step.step_s, 6) for p in plans if p.fits]  # ties: less memory first
    assert times == sorted(times)


def test_named_gpus() -> None:
    # Dense bf16 peaks from the datasheets (half the "with sparsity" figures).
    assert GPUS["h100-sxm"].peak_tflops("bf16") == pytest.approx(989.5)
    assert GPUS["h100-pcie"].peak_tflops("bf16") == pytest.approx(756.5)
    assert GPUS["h200"].peak_tflops("bf16") == pytest.approx(989.5)
    assert GPUS["a100-80g"].peak_tflops("bf16") == pytest.approx(312.0)
    assert GPUS["h200"].memory_bytes / GIB == pytest.approx(140.4, abs=0.1)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = plan_tool.main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


GOOD = ["--gpus", "8", "--global-batch", "16", "--seq-len", "64"]


def test_cli_json(capsys) -> None:
    rc, out, err = _run(capsys, "--model", "debug", *GOOD, "--json", "--top", "3")
    assert rc == 0, err
    doc = json.loads(out)
    assert len(doc["plans"]) == 3
    mem = doc["plans"][0]["memory_bytes"]
    assert {"params", "grads", "optimizer", "activations", "total"} <= set(mem)
    assert "estimate" in doc


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--model", "nosuch", *GOOD], "named size"),
        (["--model", "debug", *GOOD, "--gpu", "h900"], "--gpu"),
        (["--model", "debug", "--gpus", "12", "--gpus-per-node", "8", "--global-batch", "16",
          "--seq-len", "64"], "multiple of --gpus-per-node"),
        (["--model", "debug", *GOOD[:-1], "100000"], "max_seq_len"),
        (["--model", "70b", "--gpus", "1", "--global-batch", "8", "--seq-len", "4096"], "no layout fits"),
        (["--model", "debug", *GOOD, "--zero", "3"], "stage 3"),
        (["--model", "debug", *GOOD, "--tp", "two"], "integers"),
        (["--model", "debug", *GOOD, "--efficiency", "2"], "--efficiency"),
    ],
)  # fmt: skip
def test_cli_bad_input_is_one_error_line(capsys, argv, names) -> None:
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and names in errors[0], err
    assert "Traceback" not in err


def test_cli_as_a_user_runs_it() -> None:
    """A fresh interpreter: the table, and no deepspeed / megatron import at plan time."""
    r = run_tool_probe(["tools/plan.py", "--model", "debug", *GOOD, "--top", "2"])
    assert r.returncode == 0, r.stderr
    assert "ESTIMATES" in r.stdout and "best: parallel." in r.stdout
    assert r.heavy_imports == []
