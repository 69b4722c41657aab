"""CPU-only ranks on hosts with fewer GPUs than ranks: the decision, the env, the clear error."""

import pytest
import torch

from zenlm.runtime import env as runtime_env
from zenlm.testing.distributed import CPU_ONLY_ENV, cpu_env, cpu_only


@pytest.mark.parametrize(
    ("world_size", "visible_gpus", "expected"),
    [(1, 0, True), (2, 0, True), (1, 1, False), (2, 1, True), (8, 1, True), (2, 2, False)],
)
def test_cpu_only_when_the_world_outnumbers_the_gpus(world_size, visible_gpus, expected):
    assert cpu_only(world_size, visible_gpus) is expected


def test_cpu_env_hides_cuda_and_selects_deepspeeds_cpu_accelerator():
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    env = cpu_env(2, visible_gpus=1, base=base)
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    assert base == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}  # a copy, base untouched
    assert CPU_ONLY_ENV == {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


def test_cpu_env_leaves_a_gpu_per_rank_alone(monkeypatch):
    assert cpu_env(2, visible_gpus=2, base={"PATH": "/bin"}) == {"PATH": "/bin"}
    # Defaults: os.environ as the base, torch.cuda.device_count() as the GPU count.
    monkeypatch.setenv("ZENLM_PROBE", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    env = cpu_env(4)
    assert env["ZENLM_PROBE"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in env and "DS_ACCELERATOR" not in env
    env = cpu_env(5)
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["DS_ACCELERATOR"] == "cpu"


def test_local_rank_without_a_gpu_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: refused before the rendezvous
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(RuntimeError) as e:
        runtime_env.init_distributed(timeout_s=5)
    message = str(e.value)
    assert "\n" not in message
    assert message == (
        "rank 1 has LOCAL_RANK 1 but this process sees only 1 GPU(s) (CUDA_VISIBLE_DEVICES "
        "unset): start at most 1 process(es) per node (torchrun --nproc_per_node 1), make more "
        "GPUs visible with CUDA_VISIBLE_DEVICES, or hide them all (CUDA_VISIBLE_DEVICES='') "
        "for gloo CPU ranks"
    )
