"""Run a function on N real CPU processes joined in a gloo process group.

    results = run_distributed(fn, world_size=4, args=(cfg,))   # results[rank] = fn(rank, ws, cfg)

`fn` must be importable by module path (defined at module level), since children are spawned.
Each child gets the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
so deepspeed.init_distributed() and megatron-core find the process group already initialised.
A child's exception is re-raised in the parent with the child's traceback; a child that hangs is
killed after `timeout_s` and fails the call.

CPU-only ranks: whenever the world is larger than the GPUs the parent sees (`cpu_only`), every
child starts with CUDA hidden (CUDA_VISIBLE_DEVICES="") and DeepSpeed's CPU accelerator selected
(DS_ACCELERATOR=cpu), so the gloo tests run the same on a CPU machine and on a one-GPU
workstation (where rank 1 would otherwise call torch.cuda.set_device(1) and DeepSpeed would pick
CUDA). The variables are in the child's environment from interpreter start, before `fn`'s module
(or anything else) is imported. Tests that launch their own rank processes (torchrun or Popen)
pass `env=cpu_env(nproc)` for the same treatment. `visible_gpus=` on both overrides the parent's
`torch.cuda.device_count()`, so tests can simulate a host with N GPUs.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zenlm.runtime.env import free_port  # re-exported for tests

__all__ = [
    "CPU_ONLY_ENV",
    "DistributedTestError",
    "cpu_env",
    "cpu_only",
    "free_port",
    "run_distributed",
]

CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
"""What a CPU-only rank's environment gets: no CUDA device, DeepSpeed's CPU accelerator."""


class DistributedTestError(RuntimeError):
    """A rank failed or timed out."""


def cpu_only(world_size: int, visible_gpus: int) -> bool:
    """Whether `world_size` local ranks must run as gloo CPU ranks: not one GPU for each."""
    return world_size > visible_gpus


def cpu_env(
    nproc: int, visible_gpus: int | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for `nproc` local rank processes (torchrun or Popen children).

    A copy of `base` (default os.environ); when cpu_only(nproc, visible_gpus) it also hides CUDA
    and selects DeepSpeed's CPU accelerator (CPU_ONLY_ENV). `visible_gpus` defaults to this
    process's torch.cuda.device_count().
    """
    env = dict(os.environ if base is None else base)
    if visible_gpus is None:
        visible_gpus = torch.cuda.device_count()
    if cpu_only(nproc, visible_gpus):
        env.update(CPU_ONLY_ENV)
    return env


@contextlib.contextmanager
def _environ(changes: Mapping[str, str]) -> Iterator[None]:
    """Set variables in this process's environment for the duration (spawned children inherit it)."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _child(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    queue: Any,
    threads: int,
    timeout_s: float,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 600,
    threads_per_rank: int = 1,
    visible_gpus: int | None = None,
) -> list[Any]:
    """Spawn `world_size` ranks running fn(rank, world_size, *args); return their results by rank.

    `visible_gpus` (default torch.cuda.device_count()) decides CPU-only ranks, see cpu_only().
    """
    if visible_gpus is None:
        visible_gpus = torch.cuda.device_count()
    child_env = CPU_ONLY_ENV if cpu_only(world_size, visible_gpus) else {}
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_child,
            args=(r, world_size, port, fn, args, queue, threads_per_rank, timeout_s),
            daemon=False,
        )
        for r in range(world_size)
    ]
    with _environ(child_env):  # in the children's environment from interpreter start
        for p in procs:
            p.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    import time

    deadline = time.monotonic() + timeout_s
    while len(results) + len(failures) < world_size:
        if time.monotonic() > deadline:
            failures.append(f"timed out after {timeout_s} s")
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                failures.append("ranks exited without reporting (killed or crashed)")
                break
            time.sleep(0.05)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = payload
        else:
            failures.append(f"rank {rank} failed:\n{payload}")
            # One rank failing usually leaves the others blocked in a collective: stop them.
            break
    for p in procs:
        p.join(timeout=5 if not failures else 0.5)
        if p.is_alive():
            p.kill()
            p.join()
    if failures:
        raise DistributedTestError("\n".join(failures))
    return [results[r] for r in range(world_size)]
