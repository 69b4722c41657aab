"""Where a tensor must live to take part in a collective."""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """CUDA (this rank's device) for an NCCL group, CPU for gloo or without a process group.

    NCCL takes only CUDA tensors: a CPU scalar all-reduced over an NCCL group fails with "No
    backend type associated with device type cpu". Small bookkeeping tensors (loss
    denominators, stop flags, validation sums) are created here, reduced, then read back."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
