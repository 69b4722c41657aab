"""Stop/save requests (signals, flag file) and step health (non-finite skips, loss spikes).

Both decide collectively: a signal may reach only some ranks and a NaN may appear on one
pipeline stage, but every rank must take the same branch or the next collective hangs.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zenlm.errors import ZenlmError
from zenlm.runtime import signals
from zenlm.runtime.device import collective_device
from zenlm.runtime.log import get_logger

log = get_logger()

SAVE_NOW_FILE = "SAVE_NOW"
"""Touch <run_dir>/SAVE_NOW to get a checkpoint at the next step boundary (the file is removed)."""
STOP_SIGNALS = signals.STOP_SIGNALS
"""Preemption (Slurm sends SIGTERM, or SIGUSR1 with --signal): save at the step boundary, stop."""


class TrainingDivergedError(ZenlmError, RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class StopRequests:
    """The stop signals (zenlm.runtime.signals: handlers that only record) and the flag file."""

    def __init__(self, run_dir: Path) -> None:
        self.flag_file = run_dir / SAVE_NOW_FILE
        self._installed_here = False

    @property
    def signal_received(self) -> int | None:
        return signals.stop_signal_received()

    def install(self) -> None:
        """Install the handlers unless launch/train.py already did (then it owns them: a signal
        received during set-up stays recorded)."""
        self._installed_here = signals.install_stop_handlers()

    def uninstall(self) -> None:
        if self._installed_here:
            signals.uninstall_stop_handlers()
            self._installed_here = False

    def poll(self) -> tuple[bool, bool]:
        """(save now, stop after saving), agreed by all ranks (one tiny all-reduce)."""
        flags = torch.tensor(
            [float(self.flag_file.exists()), float(self.signal_received is not None)],
            device=collective_device(),
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        save, stop = bool(flags[0]), bool(flags[1])
        return save or stop, stop

    def consume_flag_file(self) -> None:
        self.flag_file.unlink(missing_ok=True)


def guard_plain_optimizer(engine: Any) -> None:
    """Make ZeRO-0 fp32 skip non-finite steps the way DeepSpeed's wrappers already do.

    DeepSpeed's ZeRO 1-3, bf16 and fp16 optimizers set `overflow` when the global grad norm is
    inf/NaN; the engine then skips the update and the LR step and counts it in skipped_steps.
    With ZeRO-0 in fp32 the engine calls torch AdamW directly and would write NaN into the
    weights. This wraps its step: check every local gradient, agree over all ranks (a NaN on
    one stage or TP shard must skip everywhere), and set `overflow` for the engine to read.
    """
    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer) or getattr(opt, "_zenlm_guarded", False):
        return
    step = opt.step

    # functools.wraps keeps the LR scheduler's marker on the step it tracks (guarded_step still
    # calls it), so LambdaLR does not warn that the step was replaced after it was built.
    @functools.wraps(step)
    def guarded_step(closure: Any = None) -> Any:
        bad = any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all())
            for g in opt.param_groups
            for p in g["params"]
        )
        flag = torch.tensor([float(bad)], device=collective_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        opt.overflow = bool(flag.item())
        return None if opt.overflow else step(closure)

    opt.step = guarded_step
    opt.overflow = False
    opt._zenlm_guarded = True


class StepHealth:
    """Counts skipped (non-finite) steps, stops after too many in a row, logs loss spikes."""

    def __init__(
        self, max_in_a_row: int, spike_factor: float, spike_window: int, fp16: bool
    ) -> None:
        self.max_in_a_row, self.spike_factor, self.fp16 = max_in_a_row, spike_factor, fp16
        self.recent: deque[float] = deque(maxlen=max(spike_window, 1))
        self.nonfinite_steps = 0
        self.in_a_row = 0
        self.spikes = 0

    def observe(self, step: int, loss: float, skipped: bool) -> None:
        """After each step: `skipped` = the engine did not apply the update."""
        # fp16 overflow skips are normal loss-scale calibration; only a non-finite loss is a fault.
        bad = not math.isfinite(loss) or (skipped and not self.fp16)
        if bad:
            self.nonfinite_steps += 1
            self.in_a_row += 1
            log.warning(
                f"step {step}: non-finite loss or gradients (loss {loss}); update skipped "
                f"({self.in_a_row} in a row, {self.nonfinite_steps} in total)"
            )
            if self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
                raise TrainingDivergedError(
                    f"training stopped at step {step}: {self.in_a_row} consecutive steps had a "
                    f"non-finite loss or gradient norm (checkpoint.max_consecutive_nonfinite_steps"
                    f"={self.max_in_a_row}); resume from the last checkpoint with a lower lr or "
                    "inspect the data around these steps"
                )
            return
        self.in_a_row = 0
        if self.spike_factor > 0 and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                self.spikes += 1
                log.warning(
                    f"step {step}: loss spike {loss:.4f} > {self.spike_factor} x mean of the "
                    f"last {len(self.recent)} steps ({mean:.4f}); {self.spikes} spikes so far"
                )
        self.recent.append(loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            "nonfinite_steps": self.nonfinite_steps,
            "in_a_row": self.in_a_row,
            "spikes": self.spikes,
            "recent": list(self.recent),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.nonfinite_steps, self.in_a_row, self.spikes = (
            s["nonfinite_steps"],
            s["in_a_row"],
            s["spikes"],
        )
        self.recent.clear()
        self.recent.extend(s["recent"])
