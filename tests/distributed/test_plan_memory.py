"""The planner's per-rank memory against what the engine really allocates (CPU, gloo).

States: for seven layouts of 4 ranks (TP, PP, DP; fp32 and bf16; ZeRO 0, 1, 2; tied
embeddings; both pipeline splits) the real Trainer runs two steps on synthetic data; at the
second optimizer step every rank measures the bytes it holds by walking its module's parameters
and the DeepSpeed optimizer's object graph (storages deduplicated by data_ptr, sized by the
storage): parameters = the module's parameter storages; optimizer states = the tensors torch
AdamW updates (fp32 masters) and its state (moments, step); gradients = every .grad and every
other tensor of the optimizer whose attribute path names a gradient. Predicted (zenlm.plan) must
be within 2% of measured on every rank. Nothing of the planner is used to measure.

Activations: the tensors alive after a forward pass (the autograd graph), tracked per storage
by a dispatch mode, against zenlm.plan.activations: single-process at TP 1 (fp32 / bf16, no /
selective / full checkpointing, document masking, tied head; also the forward's peak above
them), and at TP 2 with and without sequence parallelism, micro batch 1 and 2, inside the
distributed run. No GPU was available to compare GPU peak memory (docs/plan.md).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from zenlm.config import load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import rank_micro_batches

MODEL = [
    "model.vocab_size=500",  # padded to 512: the head shard of the last TP rank has pad rows
    "model.hidden_size=64",
    "model.intermediate_size=172",
    "model.num_layers=4",
    "model.num_attention_heads=4",
    "model.num_kv_heads=2",
]
BASE = [
    *MODEL,
    "data.global_batch_size_seqs=8",
    "data.micro_batch_size_seqs=1",
    "data.seq_len_tokens=16",
    "optim.train_steps=2",
    "optim.warmup_steps=0",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
]
P = "parallel."
LAYOUTS = {
    "tp2dp2_fp32_z0": [f"{P}tensor_parallel_degree=2", f"{P}zero_stage=0"],
    "dp4_fp32_z1": [f"{P}zero_stage=1"],
    "tp2dp2_bf16_z2_sp_bias": [
        f"{P}tensor_parallel_degree=2",
        f"{P}zero_stage=2",
        f"{P}sequence_parallel_enabled=true",
        "runtime.precision=bf16",
        "model.qkv_bias=true",
    ],
    "dp4_bf16_z1": [f"{P}zero_stage=1", "runtime.precision=bf16"],
    "pp2dp2_bf16_z1_tied": [
        f"{P}pipeline_parallel_degree=2",
        f"{P}zero_stage=1",
        "runtime.precision=bf16",
        "model.tie_word_embeddings=true",
    ],
    "pp2dp2_fp32_z1_params": [
        f"{P}pipeline_parallel_degree=2",
        f"{P}zero_stage=1",
        f"{P}pipeline_split=parameters",
    ],
    "tp2pp2_fp32_z1": [f"{P}tensor_parallel_degree=2", f"{P}pipeline_parallel_degree=2"],
}
ACTIVATION_LAYOUTS = ("tp2dp2_fp32_z0", "tp2dp2_bf16_z2_sp_bias")
ACTIVATION_SEQ_LEN = 64  # longer than the training steps': per-run scalars stay well below 1%


def _ptrs(tree) -> set[int]:
    return {
        t.untyped_storage().data_ptr()
        for t in tree_flatten(tree)[0]
        if isinstance(t, torch.Tensor) and t.device.type == "cpu"
    }


class LiveStorages(TorchDispatchMode):
    """Every storage an op allocates while active; `live()` = bytes of those still alive.

    An output sharing an input's storage (a view, an in-place op) allocates nothing, so weights
    seen through `.t()` and tensors made before the mode are never counted."""

    def __init__(self, track_peak: bool = False) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.track_peak = track_peak
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _ptrs((args, kwargs))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                old = self.refs.get(ptr)
                if ptr and ptr not in inputs and (old is None or old[0].expired()):
                    self.refs[ptr] = (StorageWeakRef(storage), storage.nbytes())
        if self.track_peak:  # after the op: its inputs may be freed only once it returns
            self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        return sum(n for ref, n in self.refs.values() if not ref.expired())


def _walk(obj, path: str, out: list, seen: set, depth: int = 0) -> None:
    """Tensors reachable from a DeepSpeed / torch optimizer object (attributes, lists, dicts)."""
    if depth > 8 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.grad is not None:
            out.append((path + ".grad", obj.grad))
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, torch.Tensor):
                _walk(k, f"{path}<key>", out, seen, depth + 1)
            _walk(v, f"{path}[{k if isinstance(k, str | int) else '.'}]", out, seen, depth + 1)
    elif isinstance(obj, list | tuple | set):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", out, seen, depth + 1)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            _walk(v, f"{path}.{k}", out, seen, depth + 1)


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.data_ptr() and s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def measure_states(engine) -> dict[str, int]:
    """Bytes this rank holds: parameters, gradients, optimizer states, other (see docstring)."""
    params = list(engine.module.parameters())
    p_st = _storages(params)
    basic = engine.basic_optimizer
    masters = [q for g in basic.param_groups for q in g["params"]]
    state = [v for s in basic.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    o_st = {k: n for k, n in _storages(masters + state).items() if k not in p_st}
    walked: list = []
    _walk(engine.optimizer, "opt", walked, set())
    for q in params:  # deepspeed attaches fp32 views / accumulators to the parameters
        _walk(vars(q), "param", walked, set())
    grads = [q.grad for q in params + masters if q.grad is not None]
    grads += [t for path, t in walked if "grad" in path.lower()]
    g_st = {k: n for k, n in _storages(grads).items() if k not in p_st and k not in o_st}
    other = {
        k: n
        for k, n in _storages(t for _, t in walked).items()
        if k not in p_st and k not in o_st and k not in g_st
    }
    return {
        "params": sum(p_st.values()),
        "grads": sum(g_st.values()),
        "optimizer": sum(o_st.values()),
        "other": sum(other.values()),
    }


def _forward_bytes(module, cfg, b: int | None = None, s: int | None = None) -> tuple[int, int]:
    """(bytes kept alive by one forward of the PP = 1 loss module, the forward's peak above
    them); ids and labels are made inside."""
    b = b or cfg.data.micro_batch_size_seqs
    s, v = s or cfg.data.seq_len_tokens, cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)
    with LiveStorages(track_peak=True) as live:
        ids = torch.randint(0, v, (b, s), generator=g)
        labels = torch.randint(0, v, (b, s), generator=g)
        loss = module(input_ids=ids, labels=labels)
        end = live.live()
    kept = end - loss.untyped_storage().nbytes()  # not the loss scalar itself
    del loss
    return kept, live.peak - end


def _forward_live_bytes(module, cfg, b: int | None = None, s: int | None = None) -> int:
    return _forward_bytes(module, cfg, b, s)[0]


def _rank_fn(rank: int, world_size: int, run_dir: str) -> dict:
    from deepspeed.runtime.utils import partition_balanced as ds_partition_balanced

    from zenlm.parallel.checkpointing import apply_activation_checkpointing
    from zenlm.parallel.engine import effective_zero_stage
    from zenlm.parallel.pipeline import local_blocks
    from zenlm.plan.shapes import partition_balanced
    from zenlm.train.trainer import Trainer

    out: dict = {"partition": []}
    if rank == 0:  # the planner's copy of DeepSpeed's stage split against DeepSpeed's own
        cases = [((0, 0, 1, 1, 1, 1, 0), 2), ((5, 0, 3, 3, 3, 3, 4), 2), ((8, 0) + (2,) * 9, 4)]
        cases += [((1, 0) + (1,) * 32 + (0, 0), p) for p in (2, 4, 8, 16)]
        for weights, parts in cases:
            out["partition"].append(
                (
                    weights,
                    parts,
                    partition_balanced(weights, parts),
                    ds_partition_balanced(weights, parts),
                )
            )
    for name, extra in LAYOUTS.items():
        cfg = load_config(
            None, [*BASE, *extra, f"logging.run_dir={run_dir}", f"logging.run_name={name}"]
        )
        trainer = Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))
        engine = trainer.engine
        measured: dict = {}
        original = engine.optimizer.step
        calls = []

        def step(*args, _original=original, _calls=calls, _measured=measured, _engine=engine, **kw):
            _calls.append(1)
            if len(_calls) == 2:  # optimizer states exist from step 1, gradients of step 2
                _measured.update(measure_states(_engine))
            return _original(*args, **kw)

        engine.optimizer.step = step
        trainer.train_step()
        trainer.train_step()
        pp_rank, dp_rank, _ = trainer.dims.coords(rank)
        res = {
            "measured": measured,
            "pp_rank": pp_rank,
            "dp_rank": dp_rank,
            "effective_zero": effective_zero_stage(cfg, trainer.layout),
            "engine_zero": engine.zero_optimization_stage(),
            "blocks": sorted(b.layer_idx for b in local_blocks(engine.module)),
        }
        if name in ACTIVATION_LAYOUTS:  # after training: checkpointing is applied in place
            res["forward_live"] = {}
            blocks = local_blocks(engine.module)
            for mode in ("none", "selective", "full"):
                if mode == "full":  # undo the selective wrapping first
                    for blk in blocks:
                        core = blk.attention.core
                        core.forward = type(core).forward.__get__(core)
                        core._zenlm_checkpointed = False
                apply_activation_checkpointing(blocks, mode)
                for b in (1, 2):
                    live = _forward_live_bytes(engine.module, cfg, b, ACTIVATION_SEQ_LEN)
                    res["forward_live"][f"{mode}-{b}"] = live
        out[name] = res
        trainer.close()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("plan_memory"))
    return run_distributed(_rank_fn, 4, args=(run_dir,), timeout_s=600)


def _close(predicted: int, measured: int, what: str) -> None:
    assert measured > 0, f"{what}: nothing measured"
    assert abs(predicted - measured) <= 0.02 * measured, (
        f"{what}: predicted {predicted} B, measured {measured} B "
        f"({100 * (predicted - measured) / measured:+.2f}%)"
    )


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_state_bytes_match_engine(results, name):
    from zenlm.config.validate import validate
    from zenlm.plan.memory import state_bytes
    from zenlm.plan.shapes import stage_params

    cfg = load_config(None, [*BASE, *LAYOUTS[name]])
    layout = validate(cfg, 4, check_device=False)
    p = cfg.parallel
    stages = stage_params(
        cfg.model, layout.tensor_parallel_degree, p.pipeline_parallel_degree, p.pipeline_split
    )
    for rank, res in enumerate(results):
        r = res[name]
        assert r["effective_zero"] == r["engine_zero"], f"{name}: effective ZeRO stage differs"
        stage = stages[r["pp_rank"]]
        assert list(stage.blocks) == r["blocks"], f"{name} rank {rank}: blocks on the stage"
        predicted = state_bytes(
            stage,
            cfg.runtime.precision,
            r["effective_zero"],
            layout.data_parallel_degree,
            r["dp_rank"],
        )
        got = r["measured"]
        for what in ("params", "grads", "optimizer"):
            _close(getattr(predicted, what), got[what], f"{name} rank {rank} {what}")
        # What the walk found outside the three categories: scalars (loss scale, norms).
        assert got["other"] < 0.01 * (got["params"] + got["grads"] + got["optimizer"]), (
            name,
            rank,
            got,
        )


def test_partition_balanced_is_deepspeeds(results):
    for weights, parts, ours, theirs in results[0]["partition"]:
        assert ours == list(theirs), (weights, parts)


@pytest.mark.parametrize("name", ACTIVATION_LAYOUTS)
def test_tp_activations_match_live_tensors(results, name):
    from zenlm.plan.activations import ActivationShape, batch_bytes, block_bytes, head_bytes

    cfg = load_config(None, [*BASE, *LAYOUTS[name]])
    m = cfg.model
    for key in results[0][name]["forward_live"]:
        mode, b = key.split("-")
        a = ActivationShape(
            int(b),
            ACTIVATION_SEQ_LEN,
            cfg.parallel.tensor_parallel_degree,
            cfg.parallel.sequence_parallel_enabled,
            cfg.runtime.precision,
            mode,
        )
        blocks = m.num_layers * block_bytes(m, a)
        predicted = blocks + head_bytes(m, a) + batch_bytes(a, True, True)
        for rank, res in enumerate(results):
            got = res[name]["forward_live"][key]
            _close(predicted, got, f"{name} rank {rank} {key} activations")


@pytest.mark.parametrize(
    "extra",
    [
        ["runtime.precision=fp32"],
        ["runtime.precision=bf16"],
        ["runtime.precision=bf16", "runtime.activation_checkpointing=selective"],
        ["runtime.precision=fp32", "runtime.activation_checkpointing=full"],
        ["runtime.precision=bf16", "model.document_masking=true"],
        [
            "runtime.precision=bf16",
            "model.document_masking=true",
            "runtime.activation_checkpointing=selective",
        ],
        [
            "runtime.precision=bf16",
            "model.tie_word_embeddings=true",
            "data.micro_batch_size_seqs=2",
        ],
        ["runtime.precision=bf16", "model.vocab_size=512"],  # no padded vocabulary rows
    ],
    ids=[
        "fp32",
        "bf16",
        "bf16-selective",
        "fp32-full",
        "bf16-docmask",
        "bf16-docmask-selective",
        "bf16-tied-mbs2",
        "bf16-unpadded",
    ],
)
def test_activations_match_live_tensors_tp1(extra):
    """TP 1 in this process: the model as zenlm builds it at PP 1 (CausalLMLoss, PlainFactory)."""
    from zenlm.model.factory import PlainFactory
    from zenlm.model.transformer import Transformer
    from zenlm.parallel.checkpointing import apply_activation_checkpointing
    from zenlm.plan.activations import (
        ActivationShape,
        batch_bytes,
        block_bytes,
        head_bytes,
        head_working_bytes,
    )
    from zenlm.train.loss_module import CausalLMLoss

    cfg = load_config(None, [*BASE, "data.seq_len_tokens=64", *extra])
    m = cfg.model
    model = Transformer(m, PlainFactory(), seed=0)
    apply_activation_checkpointing(list(model.layers), cfg.runtime.activation_checkpointing)
    dtype = torch.bfloat16 if cfg.runtime.precision == "bf16" else torch.float32
    module = CausalLMLoss(model, PlainFactory()).to(dtype)
    measured, transient = _forward_bytes(module, cfg)
    a = ActivationShape(
        cfg.data.micro_batch_size_seqs,
        cfg.data.seq_len_tokens,
        1,
        False,
        cfg.runtime.precision,
        cfg.runtime.activation_checkpointing,
    )
    predicted = m.num_layers * block_bytes(m, a) + head_bytes(m, a) + batch_bytes(a, True, True)
    _close(predicted, measured, f"TP1 {extra} activations")
    # The forward's peak above what it keeps: the logits beside their fp32 copy at the loss.
    _close(head_working_bytes(m, a), transient, f"TP1 {extra} working memory")
