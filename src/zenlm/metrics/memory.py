"""Peak memory of this rank, and per-rank values gathered to every rank at log steps.

GPU: torch.cuda.max_memory_allocated / max_memory_reserved of this rank's device (the caching
allocator's peak of live tensors, and of what it holds from the driver: nvidia-smi shows about
the latter plus the CUDA context). CPU: the peak resident set of this rank's process
(getrusage ru_maxrss; DataLoader worker processes not included), for both.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist

GIB = float(1 << 30)


def peak_memory_bytes() -> tuple[float, float]:
    """(peak allocated, peak reserved) bytes on GPU; (peak RSS, peak RSS) on CPU."""
    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated()), float(torch.cuda.max_memory_reserved())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return float(rss), float(rss)


def gather_per_rank(values: list[float]) -> torch.Tensor:
    """(world_size, len(values)) float64: every rank's `values`, on every rank. A collective:
    every rank must call it at the same point (the trainer does at log steps)."""
    row = torch.tensor(values, dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return row.reshape(1, -1)
    if dist.get_backend() == "nccl":
        row = row.cuda()
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return torch.stack(rows).cpu()
