"""Learning-rate schedules as multipliers of the peak lr: f(step) in [min_lr/lr, 1].

`step` is the number of optimizer steps already taken (LambdaLR's convention: f(0) is the lr of
the first step). Warmup is linear from lr/warmup_steps (never exactly 0, so step 1 moves).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from zenlm.config.schema import OptimConfig


def build_lr_lambda(o: OptimConfig) -> Callable[[int], float]:
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0
    total, warm = o.train_steps, o.warmup_steps

    def warmup(step: int) -> float | None:
        return (step + 1) / warm if step < warm else None

    if o.schedule == "constant":
        return lambda step: warmup(step) or 1.0

    if o.schedule == "cosine":

        def cosine(step: int) -> float:
            w = warmup(step)
            if w is not None:
                return w
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return cosine

    # WSD (warmup-stable-decay): hold the peak, then decay linearly to the floor over the last
    # decay_fraction of the run.
    decay_steps = max(1, round(o.decay_fraction * total))
    decay_start = total - decay_steps

    def wsd(step: int) -> float:
        w = warmup(step)
        if w is not None:
            return w
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1.0 - floor) * progress

    return wsd
