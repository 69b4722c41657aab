"""Run a function on N real CPU processes joined in a gloo process group.

    results = run_distributed(fn, world_size=4, args=(cfg,))   # results[rank] = fn(rank, ws, cfg)

`fn` must be importable by module path (defined at module level), since children are spawned.
Each child gets the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
so deepspeed.init_distributed() and megatron-core find the process group already initialised.
A child's exception is re-raised in the parent with the child's traceback; a child that hangs is
killed after `timeout_s` and fails the call.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from zenlm.runtime.env import free_port  # re-exported for tests


class DistributedTestError(RuntimeError):
    """A rank failed or timed out."""


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
) -> list[Any]:
    """Spawn `world_size` ranks running fn(rank, world_size, *args); return their results by rank."""
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
