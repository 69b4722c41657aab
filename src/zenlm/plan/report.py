"""The planner's output: a ranked text table, or JSON."""

from __future__ import annotations

import json
from typing import Any

from zenlm.plan.cluster import GIB, Cluster
from zenlm.plan.search import Plan

_HEADER = (
    f"{'#':>3} {'TP':>3} {'PP':>3} {'DP':>4} {'SP':>3} {'ZeRO':>4} {'mbs':>4} {'m':>5} "
    f"{'AC':>9} | {'param':>6} {'grad':>6} {'optim':>6} {'act':>6} {'buf':>5} {'total':>6} "
    f"GiB | {'bubble':>6} {'step s':>8} {'tok/s/GPU':>9} {'MFU':>5}"
)


def _row(i: int, p: Plan) -> str:
    m = p.memory
    g = [x / GIB for x in (m.params, m.grads, m.optimizer, m.activations + m.working)]
    zero = f"{p.zero_stage}" if p.zero_stage == p.effective_zero_stage else f"{p.zero_stage}>0"
    tok_gpu = p.step.tokens_per_s / p.step.num_gpus
    return (
        f"{i:>3} {p.tp:>3} {p.pp:>3} {p.dp:>4} {'y' if p.sequence_parallel else '-':>3} "
        f"{zero:>4} {p.micro_batch_size_seqs:>4} {p.micro_batches:>5} {p.checkpointing:>9} | "
        f"{g[0]:6.1f} {g[1]:6.1f} {g[2]:6.1f} {g[3]:6.1f} {m.buffers / GIB:5.1f} "
        f"{m.total / GIB:6.1f}     | {100 * p.bubble:5.1f}% {p.step.step_s:8.2f} "
        f"{tok_gpu:9.0f} {100 * p.step.mfu:4.0f}%"
    )


def format_table(plans: list[Plan], cluster: Cluster, title: str, top: int) -> str:
    """The first `top` fitting plans as a table, with what the numbers are."""
    fitting = [p for p in plans if p.fits][:top]
    lines = [
        title,
        f"usable memory per GPU: {cluster.usable_bytes / GIB:.1f} GiB "
        f"({cluster.gpu.memory_bytes / GIB:.1f} GiB minus {cluster.reserve_bytes / GIB:g} "
        "GiB reserve); memory on the fullest rank; act = activations + working memory",
        "ESTIMATES: step time from peak FLOP/s x efficiency and nominal link speeds "
        "(docs/plan.md); not measured",
        _HEADER,
    ]
    lines += [_row(i + 1, p) for i, p in enumerate(fitting)]
    best = fitting[0] if fitting else None
    if best is not None:
        lines.append(f"best: {' '.join(best.overrides)}")
    return "\n".join(lines)


def format_json(plans: list[Plan], cluster: Cluster, meta: dict[str, Any], top: int) -> str:
    fitting = [p for p in plans if p.fits][:top]
    return json.dumps(
        {
            **meta,
            "usable_bytes_per_gpu": cluster.usable_bytes,
            "estimate": "step time and memory are model estimates, see docs/plan.md",
            "plans": [p.to_dict() for p in fitting],
        },
        indent=1,
    )
