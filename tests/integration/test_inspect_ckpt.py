"""tools/inspect_ckpt.py on a real checkpoint: summary, config difference, checksum verification."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest

from zenlm.config import dump_config, load_config
from zenlm.testing.distributed import run_distributed
from zenlm.testing.reference import rank_micro_batches

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "optim.train_steps=3",
    "optim.warmup_steps=1",
    "data.global_batch_size_seqs=4",
    "data.micro_batch_size_seqs=2",
    "data.seq_len_tokens=16",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=false",
]


def _train(rank, world_size, run_dir):
    from zenlm.train.trainer import Trainer

    cfg = load_config(None, [*OVERRIDES, f"logging.run_dir={run_dir}", "logging.run_name=insp"])
    trainer = Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))
    trainer.fit()  # saves at the end
    params = sum(p.numel() for p in trainer.engine.module.parameters())
    trainer.close()
    return params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    (params,) = run_distributed(_train, 1, args=(str(run_dir),), timeout_s=300)
    return run_dir / "insp" / "checkpoints", params


def _inspect(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "inspect_ckpt.py"), *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_summary_and_config_difference(checkpoint, tmp_path):
    ckpts, params = checkpoint
    other = load_config(None, [*OVERRIDES, "optim.lr=0.5", "parallel.zero_stage=2"])
    dump_config(other, tmp_path / "other.yaml")
    out = _inspect(ckpts, "--against", tmp_path / "other.yaml", "--verify")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "step_00000003" in text and "step           3" in text
    assert "tokens seen    192" in text  # 3 steps x 4 sequences x 16 tokens
    assert f"parameters     {params:,}" in text
    assert "TP1 x PP1 x DP1 (world 1)" in text
    assert "every file matches its CRC-32" in text
    assert "optim.lr: 0.0003 -> 0.5" in text
    assert "parallel.zero_stage: 1 -> 2" in text


def test_verify_names_a_corrupted_file(checkpoint):
    ckpts, _ = checkpoint
    step = ckpts / "step_00000003"
    target = sorted(step.glob("model-*.safetensors"))[0]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    out = _inspect(step, "--verify")
    assert out.returncode != 0
    assert target.name in out.stdout + out.stderr
