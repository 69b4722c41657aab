"""Where rank 0's scalars go: TensorBoard and, optionally, Weights & Biases, behind one interface.

    sinks = build_sinks(cfg, run_dir, rank)   # MetricsSinks; empty on ranks other than 0
    sinks.scalars({"train/loss": 2.3, ...}, step)
    sinks.close()

A sink is anything with `scalars(values, step)` and `close()`; the trainer never knows which.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from zenlm.config.schema import RunConfig


class MetricsSink(Protocol):
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record `values` (tag -> number) at optimizer step `step`."""

    def close(self) -> None:
        """Flush and release; later calls to scalars are not allowed, close again is a no-op."""


class MetricsSinks:
    """Fans scalars out to several sinks."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.scalars(values, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_sinks(cfg: RunConfig, run_dir: Path, rank: int) -> MetricsSinks:
    """TensorBoard under <run>/tb and W&B under <run>/wandb, as cfg.logging enables, on rank 0."""
    lg = cfg.logging
    sinks: list[MetricsSink] = []
    if rank != 0:
        return MetricsSinks(sinks)
    if lg.tensorboard_enabled:
        from zenlm.metrics.tensorboard import TensorBoardWriter

        sinks.append(TensorBoardWriter(run_dir / "tb"))
    if lg.wandb_enabled:
        from zenlm.metrics.wandb_sink import WandbSink

        sinks.append(WandbSink(cfg, run_dir))
    return MetricsSinks(sinks)
