"""zenlm.runtime.slurm: Slurm's host lists and task counts, and the torchrun variables a bare
srun task gets from them (the expected values are what `scontrol show hostnames` and srun print
for these lists; tests/slurm runs the real thing)."""

from __future__ import annotations

import pytest

from zenlm.config.load import ConfigError
from zenlm.runtime.slurm import adopt_slurm_env, expand_hostlist, tasks_per_node


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("a[9-11]-ib,b2", ["a9-ib", "a10-ib", "a11-ib", "b2"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_bad_hostlist_is_one_config_error():
    with pytest.raises(ConfigError, match="cannot parse Slurm host list"):
        expand_hostlist("n[1-")


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8]


STEP_TASK = {
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_JOB_ID": "1234",
}


def test_a_srun_task_gets_torchrun_variables():
    env = dict(STEP_TASK)
    assert adopt_slurm_env(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }
    assert env["MASTER_ADDR"] == "n1" and env["MASTER_PORT"] == str(20000 + 1234)


def test_master_address_and_port_from_the_script_are_kept():
    env = {**STEP_TASK, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400"}
    adopt_slurm_env(env)
    assert env["MASTER_ADDR"] == "10.0.0.5" and env["MASTER_PORT"] == "29400"


def test_torchrun_and_the_batch_script_are_left_alone():
    under_torchrun = {**STEP_TASK, "RANK": "0", "WORLD_SIZE": "8"}
    assert not adopt_slurm_env(under_torchrun) and under_torchrun["WORLD_SIZE"] == "8"
    batch_script = {k: v for k, v in STEP_TASK.items() if k != "SLURM_STEP_ID"}
    assert not adopt_slurm_env(batch_script) and "RANK" not in batch_script


def test_one_gpu_bound_per_srun_task_is_device_0(monkeypatch):
    from zenlm.runtime.env import local_device_index

    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert local_device_index(local_rank=3, visible=1) == 0  # srun --gpus-per-task=1
    assert local_device_index(local_rank=3, visible=8) == 3
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun: two ranks on one GPU
    with pytest.raises(RuntimeError, match="LOCAL_RANK 3 but this process sees only 1 GPU"):
        local_device_index(local_rank=3, visible=1)
