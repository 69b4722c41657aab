"""TensorBoard scalars, written by rank 0 only."""

from __future__ import annotations

from pathlib import Path


class TensorBoardWriter:
    """A thin rank-aware wrapper: a no-op on ranks other than 0 or when disabled."""

    def __init__(self, log_dir: str | Path, enabled: bool) -> None:
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
