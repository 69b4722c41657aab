"""A real Slurm cluster on this machine for tests/slurm: munged, slurmctld and four slurmd nodes
(n1..n4, 2 CPUs each) started by tests/slurm/cluster/start.sh, which installs Debian's slurmctld,
slurmd, slurm-client and munge when they are missing (about 9 s). Torn down at the end of the
session by cluster/stop.sh: every daemon it started, by PID, and its /etc/hosts lines.

Skips with the reason where Slurm cannot be had (not root, no apt-get, the install fails).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_ROOT = Path(os.environ.get("ZENLM_TEST_SLURM_ROOT", "/tmp/zenlm-slurm"))
NODES = 4


def _cannot_install() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (it starts slurmd and edits /etc/hosts)"
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _slurm_pids() -> set[int]:
    """PIDs of running Slurm/munge daemons (to check the teardown)."""
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                comm = (d / "comm").read_text().strip()
            except OSError:
                continue
            if comm in ("slurmctld", "slurmd", "munged", "slurmstepd"):
                pids.add(int(d.name))
    return pids


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = _cannot_install()
    if reason:
        pytest.skip(reason)
    before = _slurm_pids()
    hosts_before = Path("/etc/hosts").read_text()
    env = {
        **os.environ,
        "LOCAL_SLURM_ROOT": str(CLUSTER_ROOT),
        "LOCAL_SLURM_NODES": str(NODES),
        # A requeued job may start again only after its credential expires: 5 s, not 120 s.
        "LOCAL_SLURM_CRED_EXPIRE": "5",
        "LOCAL_SLURM_CLEAN": "1",
    }
    start = subprocess.run(
        ["bash", str(HERE / "cluster" / "start.sh")], env=env, capture_output=True, text=True
    )
    if start.returncode != 0:
        subprocess.run(["bash", str(HERE / "cluster" / "stop.sh")], env=env, capture_output=True)
        if "installing" in start.stderr and "installed in" not in start.stderr:
            pytest.skip(f"cannot install Slurm here: {start.stderr.strip().splitlines()[-1:]}")
        raise RuntimeError(f"local Slurm did not start:\n{start.stderr[-3000:]}")
    slurm_env = {"SLURM_CONF": str(CLUSTER_ROOT / "etc" / "slurm.conf")}
    try:
        yield slurm_env
    finally:
        stop = subprocess.run(
            ["bash", str(HERE / "cluster" / "stop.sh")], env=env, capture_output=True, text=True
        )
        assert stop.returncode == 0, stop.stderr
        left = _slurm_pids() - before
        assert not left, f"daemons left running after stop.sh: {sorted(left)}"
        hosts = Path("/etc/hosts").read_text()
        assert "zenlm-test-slurm" not in hosts
        ours = [line for line in hosts_before.splitlines() if "zenlm-test-slurm" not in line]
        assert hosts.splitlines() == ours, "/etc/hosts changed beyond the lines start.sh added"
