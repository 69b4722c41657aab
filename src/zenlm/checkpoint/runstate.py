"""The small, non-tensor state that exact resume needs besides weights and moments.

- RNG: torch (CPU and CUDA), NumPy, Python `random`, and megatron's per-TP-rank tracker streams,
  one safetensors file per rank (rng-r<rank>.safetensors); per-rank streams have no meaning at
  another layout, so there every rank is re-seeded from (seed, step, rank) instead.
- LR schedule: LambdaLR's counters and the lr of every optimizer group (the scheduler sets the
  group lr itself; restoring both gives the exact float the uninterrupted run used).
- DeepSpeed's counters (global_steps, global_samples, skipped_steps, micro_steps) and, for fp16,
  its dynamic loss scaler.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from zenlm.checkpoint.tensors import adam_step, set_adam_step, torch_optimizer

_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def _tracker() -> Any | None:
    try:
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker()
    except Exception:  # megatron absent or tracker not initialised: nothing to save
        return None


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) capturing every RNG this rank uses."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "python_mt": torch.tensor(py_state, dtype=torch.int64),
        "numpy_mt": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    tracker = _tracker()
    if tracker is not None:
        for name, s in tracker.get_states().items():
            if torch.is_tensor(s):
                tensors[f"megatron/{name}"] = s
    meta = {
        "python": json.dumps([py_version, py_gauss]),
        "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]),
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(tensors["python_mt"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    keys = tensors["numpy_mt"].numpy().astype(np.uint32)
    np.random.set_state((np_name, keys, np_pos, np_has_gauss, np_gauss))
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda/")]
        if states:
            torch.cuda.set_rng_state_all(states)
    tracker = _tracker()
    saved = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("megatron/")}
    if tracker is not None and saved:
        tracker.set_states(saved)


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh, reproducible streams for a resume at another layout."""
    mixed = (seed * 1_000_003 + step * 9_176 + rank) % 2**31
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def optimizer_state(engine: Any) -> dict[str, Any]:
    """Scheduler, AdamW step, group lrs, DeepSpeed counters and loss scaler: JSON-safe."""
    sched = engine.lr_scheduler
    out: dict[str, Any] = {
        "adam_step": adam_step(engine),
        "group_lrs": [g["lr"] for g in torch_optimizer(engine).param_groups],
        "engine": {k: int(getattr(engine, k)) for k in _ENGINE_COUNTERS},
        "scheduler": None,
        "loss_scaler": None,
    }
    if sched is not None:
        out["scheduler"] = {
            "last_epoch": sched.last_epoch,
            "_step_count": getattr(sched, "_step_count", 0),
            "base_lrs": list(sched.base_lrs),
            "_last_lr": list(getattr(sched, "_last_lr", [])),
        }
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "cur_scale"):
        out["loss_scaler"] = {f: getattr(scaler, f) for f in _SCALER_FIELDS if hasattr(scaler, f)}
        out["loss_scaler"] = {
            k: float(v) if torch.is_tensor(v) else v for k, v in out["loss_scaler"].items()
        }
    return out


def _per_group(values: list[float], num_groups: int, what: str) -> list[float]:
    """Saved per-group values for this optimizer's groups. Every group follows one schedule
    from one base lr, so the counts may differ across layouts (a pipeline stage holding only
    no-decay parameters has one group) provided the saved values agree."""
    values = list(values)
    if len(values) == num_groups or not values:
        return values
    if len(set(values)) != 1:
        raise ValueError(
            f"{num_groups} optimizer groups, checkpoint has {len(values)} with different {what} "
            f"{values}"
        )
    return values[:1] * num_groups


def set_optimizer_state(engine: Any, state: dict[str, Any], grad_accum_steps: int) -> None:
    set_adam_step(engine, int(state["adam_step"]))
    groups = torch_optimizer(engine).param_groups
    saved = _per_group(state["group_lrs"], len(groups), "learning rates")
    for g, lr in zip(groups, saved, strict=True):
        g["lr"] = lr
    s = state["scheduler"]
    if s is not None and engine.lr_scheduler is not None:
        sched = engine.lr_scheduler
        sched.last_epoch = s["last_epoch"]
        sched._step_count = s["_step_count"]
        sched.base_lrs = _per_group(s["base_lrs"], len(groups), "base lrs")
        sched._last_lr = _per_group(s["_last_lr"], len(groups), "last lrs")
    for k, v in state["engine"].items():
        setattr(engine, k, v)
    # Micro steps are per rank: at another DP size the same global step has another count.
    engine.micro_steps = engine.global_steps * grad_accum_steps
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if state.get("loss_scaler") and scaler is not None:
        for k, v in state["loss_scaler"].items():
            cur = getattr(scaler, k)
            setattr(scaler, k, torch.tensor(v, dtype=cur.dtype) if torch.is_tensor(cur) else v)
