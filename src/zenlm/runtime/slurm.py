"""Rank and rendezvous from Slurm's environment, for `srun` one task per GPU.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for
its workers. A task started by `srun` directly (no torchrun) gets Slurm's variables instead;
adopt_slurm_env() translates them, so the rest of zenlm (and torch.distributed's env://) reads
one set of names. Without it every srun task would be a one-rank world of its own.

    RANK              <- SLURM_PROCID
    WORLD_SIZE        <- SLURM_NTASKS (SLURM_STEP_NUM_TASKS first)
    LOCAL_RANK        <- SLURM_LOCALID
    LOCAL_WORLD_SIZE  <- this node's entry of SLURM_STEP_TASKS_PER_NODE ("2(x3),1" syntax)
    MASTER_ADDR       <- kept if set (slurm/common.sh exports it), else the first host of
                         SLURM_STEP_NODELIST / SLURM_JOB_NODELIST
    MASTER_PORT       <- kept if set, else 20000 + SLURM_JOB_ID % 20000 (the same in every task,
                         and the same again when the job is requeued under its id)

Only inside a job step (SLURM_STEP_ID set): the batch script itself also carries SLURM_PROCID=0
and SLURM_NTASKS=<all tasks>, and a process started there without srun is one process, not
rank 0 of many. Variables torchrun already set are never overridden.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

from zenlm.config.load import ConfigError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, expanded: "gpu[01-03,07],login1" -> gpu01, gpu02, gpu03,
    gpu07, login1 (the order `scontrol show hostnames` prints). Zero padding is kept."""
    hosts: list[str] = []
    for item in _split_top_level(hostlist):
        m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
        if m is None:
            if "[" in item or "]" in item:
                raise ConfigError(f"cannot parse Slurm host list {hostlist!r} at {item!r}")
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            r = _RANGE.match(part)
            if r is None:
                raise ConfigError(f"cannot parse Slurm host list {hostlist!r} at {part!r}")
            lo, hi = r.group(1), r.group(2) or r.group(1)
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _split_top_level(hostlist: str) -> list[str]:
    """Split at commas outside brackets."""
    items, depth, cur = [], 0, []
    for ch in hostlist:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [i for i in (x.strip() for x in items) if i]


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE: "2(x3),1" -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ConfigError(f"cannot parse Slurm tasks per node {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def in_slurm_step(env: MutableMapping[str, str] | None = None) -> bool:
    """True in a task that srun started (not in the batch script, not under torchrun)."""
    env = os.environ if env is None else env
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "RANK" not in env


def adopt_slurm_env(env: MutableMapping[str, str] | None = None) -> bool:
    """Set the torchrun variables from Slurm's in a bare srun task; True when it did."""
    env = os.environ if env is None else env
    if not in_slurm_step(env):
        return False
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if not ntasks:
        raise ConfigError(
            "srun task without SLURM_NTASKS: start one task per GPU with srun --ntasks, "
            "or run torchrun under srun (one task per node)"
        )
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = ntasks
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node_id = int(env.get("SLURM_NODEID", "0"))
    if per_node:
        counts = tasks_per_node(per_node)
        env["LOCAL_WORLD_SIZE"] = str(counts[min(node_id, len(counts) - 1)])
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ConfigError("srun task without SLURM_STEP_NODELIST: cannot pick MASTER_ADDR")
        env["MASTER_ADDR"] = expand_hostlist(nodelist)[0]
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return True
