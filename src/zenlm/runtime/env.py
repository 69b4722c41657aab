"""Distributed start-up from a torchrun or Slurm environment, seeds and thread counts."""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_local_gpu(local_rank: int, visible: int) -> None:
    """One clear line instead of a CUDA error when a node runs more ranks than it has GPUs."""
    if local_rank < visible:
        return
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
    With CUDA present, a LOCAL_RANK without its own GPU is refused before joining the group.
    A single process without torchrun variables still gets a 1-rank group so every code path is
    the same (megatron-core and DeepSpeed both need one).
    """
    import deepspeed

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    if torch.cuda.is_available():
        _check_local_gpu(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(torch_threads: int) -> None:
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
