"""Enumerate TP x PP x DP x ZeRO x micro batch x checkpointing layouts, keep those the real
validator accepts and that fit in memory, rank them by estimated step time.

Every candidate is a RunConfig passed to zenlm.config.validate.validate (check_device=False):
the planner applies exactly the rules a run is held to, it does not restate them. Candidates
the engine runs identically are folded (fp32 at DP 1 runs ZeRO 0 whatever stage is asked:
zenlm.parallel.engine.effective_zero_stage). TP stays inside a node (at most gpus_per_node).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from zenlm.config.load import ConfigError
from zenlm.config.schema import RunConfig
from zenlm.config.validate import Layout, validate
from zenlm.plan.activations import ActivationShape, StageActivations, stage_activations
from zenlm.plan.cluster import Cluster
from zenlm.plan.cost import StepEstimate, StepInputs, estimate_step
from zenlm.plan.memory import StateBytes, optimizer_path, state_bytes
from zenlm.plan.shapes import StageParams, stage_params

CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class SearchSpace:
    """Which values each dimension may take; None = every value that can be valid."""

    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    zero: tuple[int, ...] | None = None
    micro_batch: tuple[int, ...] | None = None
    checkpointing: tuple[str, ...] | None = None
    sequence_parallel: tuple[bool, ...] | None = None
    max_micro_batch: int = 16


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes on the layout's fullest rank (the pipeline stage with the largest total)."""

    stage: int
    params: int
    grads: int
    optimizer: int
    activations: int
    """Saved for backward over the stage's in-flight micro batches (+ pipe buffers)."""
    working: int
    """One micro batch's transient peak (logits at the loss, a recomputed block)."""
    buffers: int
    """DeepSpeed's transient gradient bucket / flat copies (see zenlm.plan.memory)."""
    in_flight: int

    @property
    def total(self) -> int:
        return (
            self.params
            + self.grads
            + self.optimizer
            + self.activations
            + self.working
            + self.buffers
        )


@dataclass(frozen=True)
class Plan:
    """One layout with its memory and step-time estimates."""

    tp: int
    pp: int
    dp: int
    zero_stage: int
    """As configured (parallel.zero_stage)."""
    effective_zero_stage: int
    sequence_parallel: bool
    micro_batch_size_seqs: int
    micro_batches: int
    checkpointing: str
    precision: str
    optimizer_path: str
    memory: MemoryPlan
    bubble: float
    step: StepEstimate
    fits: bool
    overrides: list[str] = field(default_factory=list)
    """The config overrides that select this layout."""

    def to_dict(self) -> dict[str, Any]:
        mem = dataclasses.asdict(self.memory) | {"total": self.memory.total}
        step = dataclasses.asdict(self.step) | {
            "step_s": self.step.step_s,
            "tokens_per_s": self.step.tokens_per_s,
            "mfu": self.step.mfu,
        }
        out = dataclasses.asdict(self) | {"memory_bytes": mem, "step": step}
        out.pop("memory")
        return out


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _candidate_config(base: RunConfig, **v: Any) -> RunConfig:
    return dataclasses.replace(
        base,
        parallel=dataclasses.replace(
            base.parallel,
            tensor_parallel_degree=v["tp"],
            pipeline_parallel_degree=v["pp"],
            data_parallel_degree=0,
            zero_stage=v["zero"],
            sequence_parallel_enabled=v["sp"],
        ),
        data=dataclasses.replace(
            base.data,
            micro_batch_size_seqs=v["mbs"],
            grad_accum_steps=0,
        ),
        runtime=dataclasses.replace(base.runtime, activation_checkpointing=v["ac"]),
    )


def _overrides(cfg: RunConfig, v: dict[str, Any]) -> list[str]:
    """The overrides that turn the planned config into this layout (launch/train.py form)."""
    return [
        f"parallel.tensor_parallel_degree={v['tp']}",
        f"parallel.pipeline_parallel_degree={v['pp']}",
        f"parallel.zero_stage={v['zero']}",
        f"parallel.sequence_parallel_enabled={str(v['sp']).lower()}",
        f"data.global_batch_size_seqs={cfg.data.global_batch_size_seqs}",
        f"data.micro_batch_size_seqs={v['mbs']}",
        f"data.seq_len_tokens={cfg.data.seq_len_tokens}",
        f"runtime.precision={cfg.runtime.precision}",
        f"runtime.activation_checkpointing={v['ac']}",
    ]


def layout_memory(
    cfg: RunConfig,
    layout: Layout,
    zero_stage: int,
    stages: list[StageParams],
) -> tuple[MemoryPlan, list[tuple[StateBytes, StageActivations]]]:
    """Memory of every stage of `layout` (zero_stage = the effective one); the fullest first."""
    a = ActivationShape(
        micro_batch_size_seqs=layout.micro_batch_size_seqs,
        seq_len_tokens=layout.seq_len_tokens,
        tensor_parallel_degree=layout.tensor_parallel_degree,
        sequence_parallel=cfg.parallel.sequence_parallel_enabled,
        precision=cfg.runtime.precision,
        checkpointing=cfg.runtime.activation_checkpointing,
    )
    pp = layout.pipeline_parallel_degree
    per_stage = []
    for st in stages:
        states = state_bytes(st, cfg.runtime.precision, zero_stage, layout.data_parallel_degree)
        act = stage_activations(cfg.model, a, len(st.blocks), st.stage, pp, layout.grad_accum_steps)
        per_stage.append((states, act))
    totals = [s.static + s.buffers + act.total for s, act in per_stage]
    k = max(range(pp), key=totals.__getitem__)
    s, act = per_stage[k]
    mem = MemoryPlan(
        k, s.params, s.grads, s.optimizer, act.saved, act.working, s.buffers, act.in_flight
    )
    return mem, per_stage


def _candidates(base: RunConfig, cluster: Cluster, space: SearchSpace) -> Iterator[dict[str, Any]]:
    """Every (tp, pp, zero, sp, mbs, ac) to try; the validator decides which are valid."""
    m, world = base.model, cluster.num_gpus
    tps = space.tp or _divisors(min(world, cluster.gpus_per_node))
    pps = space.pp or [p for p in _divisors(world) if p <= m.num_layers]
    for tp, pp in itertools.product(tps, pps):
        if world % (tp * pp):
            continue
        per_dp = base.data.global_batch_size_seqs // (world // (tp * pp))
        mbss = space.micro_batch or [
            b for b in _divisors(max(per_dp, 1)) if b <= space.max_micro_batch
        ]
        sps = space.sequence_parallel or ((False, True) if tp > 1 else (False,))
        for zero, sp, mbs, ac in itertools.product(
            space.zero or (0, 1, 2), sps, mbss, space.checkpointing or CHECKPOINTING
        ):
            yield dict(tp=tp, pp=pp, zero=zero, sp=sp, mbs=mbs, ac=ac)


def plan_layouts(
    base: RunConfig,
    cluster: Cluster,
    space: SearchSpace = SearchSpace(),
    efficiency: float = 0.5,
) -> tuple[list[Plan], dict[str, int]]:
    """(every valid layout of `base` on `cluster`, ranked: fitting ones by step time, then the
    rest by memory; the validator's refusals, message -> count)."""
    from zenlm.parallel.engine import effective_zero_stage

    if not 0 < efficiency <= 1:
        raise ConfigError(f"--efficiency must be in (0, 1], got {efficiency}")
    stage_cache: dict[tuple[int, int], list[StageParams]] = {}
    plans: list[Plan] = []
    refused: dict[str, int] = {}
    seen: set[tuple] = set()
    for v in _candidates(base, cluster, space):
        cfg = _candidate_config(base, **v)
        try:
            layout = validate(cfg, cluster.num_gpus, check_device=False)
        except ConfigError as e:
            refused[str(e)] = refused.get(str(e), 0) + 1
            continue
        eff = effective_zero_stage(cfg, layout)
        key = (v["tp"], v["pp"], eff, v["sp"], v["mbs"], v["ac"])
        if key in seen:  # the same run as a lower requested stage
            continue
        seen.add(key)
        tp_pp = (v["tp"], v["pp"])
        if tp_pp not in stage_cache:
            stage_cache[tp_pp] = stage_params(base.model, *tp_pp, cfg.parallel.pipeline_split)
        plans.append(_plan(cfg, layout, eff, stage_cache[tp_pp], cluster, efficiency, v))
    # Fitting plans by step time (equal times: less memory first), then the rest by memory.
    plans.sort(key=lambda p: (not p.fits, round(p.step.step_s, 6) if p.fits else 0, p.memory.total))
    return plans, refused


def _plan(
    cfg: RunConfig,
    layout: Layout,
    eff: int,
    stages: list[StageParams],
    cluster: Cluster,
    efficiency: float,
    v: dict[str, Any],
) -> Plan:
    precision = cfg.runtime.precision
    path = optimizer_path(precision, eff)
    mem, _ = layout_memory(cfg, layout, eff, stages)
    x = StepInputs(
        tp=layout.tensor_parallel_degree,
        pp=layout.pipeline_parallel_degree,
        dp=layout.data_parallel_degree,
        micro_batch_size_seqs=layout.micro_batch_size_seqs,
        micro_batches=layout.grad_accum_steps,
        seq_len_tokens=layout.seq_len_tokens,
        sequence_parallel=cfg.parallel.sequence_parallel_enabled,
        precision=precision,
        zero_stage=eff,
        optimizer_path=path,
        checkpointing=cfg.runtime.activation_checkpointing,
    )
    step = estimate_step(cfg.model, x, stages, cluster, efficiency)
    p, mb = x.pp, x.micro_batches
    return Plan(
        tp=x.tp,
        pp=p,
        dp=x.dp,
        zero_stage=v["zero"],
        effective_zero_stage=eff,
        sequence_parallel=x.sequence_parallel,
        micro_batch_size_seqs=x.micro_batch_size_seqs,
        micro_batches=mb,
        checkpointing=x.checkpointing,
        precision=precision,
        optimizer_path=path,
        memory=mem,
        bubble=(p - 1) / (mb + p - 1),
        step=step,
        fits=mem.total <= cluster.usable_bytes,
        overrides=_overrides(cfg, v),
    )
