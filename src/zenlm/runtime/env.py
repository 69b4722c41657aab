"""Distributed start-up from a torchrun or Slurm environment, seeds and thread counts."""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from zenlm.runtime.slurm import adopt_slurm_env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of this rank: LOCAL_RANK among the node's visible GPUs, or device 0 when
    srun bound one GPU to each task (srun --gpus-per-task=1 / --gpu-bind: every task sees
    exactly one). Anything else is one clear line instead of a CUDA error later."""
    if local_rank < visible:
        return local_rank
    # Only a bare srun task can have a GPU bound to it alone; under torchrun (or by hand) one
    # visible GPU for LOCAL_RANK > 0 means two ranks would share it.
    srun_task = "SLURM_STEP_ID" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ
    if visible == 1 and srun_task:
        return 0
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "unset" if cvd is None else repr(cvd)
    raise RuntimeError(
        f"rank {os.environ.get('RANK', '?')} has LOCAL_RANK {local_rank} but this process sees "
        f"only {visible} GPU(s) (CUDA_VISIBLE_DEVICES {shown}): start at most {visible} "
        f"process(es) per node (torchrun --nproc_per_node {visible}), make more GPUs visible "
        "with CUDA_VISIBLE_DEVICES, or hide them all (CUDA_VISIBLE_DEVICES='') for gloo CPU ranks"
    )


def init_distributed(timeout_s: int = 600) -> tuple[int, int]:
    """Join (or create) the default process group; return (rank, world_size).

    nccl when CUDA is present, gloo otherwise (DeepSpeed picks its CPU accelerator by itself).
    With CUDA present, a LOCAL_RANK without its own GPU is refused before joining the group. A
    task srun started without torchrun takes its rank from SLURM_* (zenlm.runtime.slurm).
    A single process without torchrun variables still gets a 1-rank group so every code path is
    the same (megatron-core and DeepSpeed both need one).
    """
    import deepspeed

    adopt_slurm_env()  # a bare srun task: RANK/WORLD_SIZE/... from SLURM_* (torchrun's win)
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    if torch.cuda.is_available():
        device = local_device_index(
            int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        )
        torch.cuda.set_device(device)
        # DeepSpeed's engine picks its device from LOCAL_RANK: with one GPU bound per task
        # that is device 0, whatever the task's index on the node.
        os.environ["LOCAL_RANK"] = str(device)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False
    )
    return dist.get_rank(), dist.get_world_size()


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(torch_threads: int) -> None:
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
