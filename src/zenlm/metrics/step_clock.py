"""Where a training step's time goes: data wait, forward + backward, optimizer, communication.

    clock = StepClock(cuda=torch.cuda.is_available())
    measured = clock.instrument(engine)        # the DeepSpeed phases it could hook
    with clock.phase("data"): batch = next(it)
    clock.step_done(step_s)                     # after each step
    times = clock.drain()                       # at a log step: per-step means over the interval

Phases (seconds per step, averaged over the steps since the last drain):
- data: waiting for the loader (next() on this rank's iterator; at PP > 1 DeepSpeed pulls the
  micro batches inside train_batch, through the same iterator, so it is measured there too).
- optimizer: DeepSpeed's `_take_model_step` (clipping, the optimizer step with ZeRO's gradient
  norm all-reduce and its parameter all-gather, zero_grad, the LR step).
- comm: the data-parallel gradient reduction DeepSpeed runs in `allreduce_gradients` (ZeRO 0/1,
  and the pipeline's reduce-grads instruction; `_bf16_reduce_grads` for bf16 pipelines) plus
  zenlm's own per-step all-reduces (loss denominator, loss). Not separable, so counted in
  fwd_bwd: tensor-parallel all-reduces inside forward/backward, pipeline send/recv inside
  train_batch, ZeRO-2/3's reduce-scatters in backward hooks and ZeRO-3's parameter gathers.
- fwd_bwd: the rest of the step (step time - data - optimizer - comm).

Host phases (data) use perf_counter. Device phases on CUDA record a pair of CUDA events on the
current stream and are read at drain(), which synchronizes once: no sync per step (each step
ends with the loss's .item(), so step times themselves are synchronous already). On CPU every
phase is perf_counter: nothing runs asynchronously there.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any

import torch

# DeepSpeed 0.19.8 methods timed per phase; each is looked up on the engine instance by
# DeepSpeed's own code (self.allreduce_gradients(), self._take_model_step()), so an instance
# attribute wraps it. tests/distributed/test_trainer_metrics.py fails if a DeepSpeed upgrade drops one.
ENGINE_PHASES = (
    ("allreduce_gradients", "comm"),
    ("_bf16_reduce_grads", "comm"),  # PipelineEngine only
    ("_take_model_step", "optimizer"),
)
PHASES = ("data", "optimizer", "comm")


class StepClock:
    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._host: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._events: dict[str, list[tuple[Any, Any]]] = {p: [] for p in PHASES}
        self._step_s = 0.0
        self._steps = 0

    @contextlib.contextmanager
    def phase(self, name: str, device: bool = False) -> Iterator[None]:
        """Time the block as `name`: a device phase (CUDA events) or a host one."""
        if device and self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events[name].append((start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._host[name] += time.perf_counter() - t0

    def wrap(self, obj: Any, attr: str, name: str) -> bool:
        """Time every call of obj.attr as device phase `name`; False when obj has no attr."""
        fn = getattr(obj, attr, None)
        if fn is None or getattr(fn, "_zenlm_phase", None) == name:
            return fn is not None

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name, device=True):
                return fn(*args, **kwargs)

        timed._zenlm_phase = name  # type: ignore[attr-defined]
        setattr(obj, attr, timed)
        return True

    def instrument(self, engine: Any) -> set[str]:
        """Wrap the engine methods of ENGINE_PHASES; the set of phases now measured."""
        measured = {"data"}
        for attr, name in ENGINE_PHASES:
            if self.wrap(engine, attr, name):
                measured.add(name)
        return measured

    def step_done(self, step_s: float) -> None:
        self._step_s += step_s
        self._steps += 1

    def drain(self) -> dict[str, float]:
        """Per-step means since the last drain (seconds): step, data, optimizer, comm, fwd_bwd;
        plus steps (the count). Resets the sums."""
        totals = dict(self._host)
        pending = [pair for pairs in self._events.values() for pair in pairs]
        if pending:
            torch.cuda.synchronize()
            for name, pairs in self._events.items():
                totals[name] += sum(s.elapsed_time(e) for s, e in pairs) / 1e3  # ms -> s
        n = max(self._steps, 1)
        out = {name: totals[name] / n for name in PHASES}
        out["step"] = self._step_s / n
        out["fwd_bwd"] = max(out["step"] - sum(out[p] for p in PHASES), 0.0)
        out["steps"] = float(self._steps)
        self._host = dict.fromkeys(PHASES, 0.0)
        self._events = {p: [] for p in PHASES}
        self._step_s, self._steps = 0.0, 0
        return out
