"""The console of a real run: `make demo`'s training command (launch/train.py under torchrun,
configs/demo.yaml) on 2 ranks (TP 1 x DP 2, ZeRO-1) for 2 steps, on a corpus made by the tools.

Each known-harmless third-party warning (zenlm.runtime.warnings.KNOWN: megatron-core's TE/Apex
notice, DeepSpeed's accelerator notice, torch's deprecated collective names, all of which this
layout triggers on every rank) prints exactly one line, and none in its raw form; warnings zenlm
does not know pass on every rank. Those are injected by a wrapper around the real CLI: each
call of zenlm.train.preflight.preflight (launch/train.py before the framework imports, the
Trainer after them) issues an unknown Python warning and an unknown DeepSpeed log record.
The step lines carry the metrics, the one-time MFU notice appears once, and the step-time split
reaches TensorBoard.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from zenlm.testing.distributed import cpu_env
from zenlm.testing.text_corpus import build_text_corpus

ROOT = Path(__file__).resolve().parents[2]

WRAPPER = r"""
import logging, os, runpy, sys, warnings
import zenlm.train.preflight as pf

real = pf.preflight

def preflight(*args, **kwargs):
    rank = os.environ["RANK"]
    warnings.warn(f"zenlm-test: rank {rank}'s warning zenlm does not know", UserWarning)
    logging.getLogger("DeepSpeed").warning(f"zenlm-test: rank {rank}'s unknown DeepSpeed record")
    return real(*args, **kwargs)

pf.preflight = preflight
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_demo_command_console(tmp_path):
    corpus = build_text_corpus(tmp_path / "data")
    wrapper = tmp_path / "wrap.py"
    wrapper.write_text(WRAPPER)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(wrapper), str(ROOT / "launch" / "train.py"),
        "--config", str(ROOT / "configs" / "demo.yaml"), *corpus.overrides(),
        "parallel.tensor_parallel_degree=1", "data.global_batch_size_seqs=8",
        "data.micro_batch_size_seqs=2", "optim.train_steps=2", "optim.warmup_steps=1",
        "logging.log_interval_steps=1", "logging.eval_interval_steps=0",
        f"logging.run_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    env = {**cpu_env(2), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # As `make demo` runs: DeepSpeed detects its accelerator (CPU, with CUDA hidden where there
    # are GPUs) and says so, rather than being told by DS_ACCELERATOR.
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    known = [line for line in out.splitlines() if line.startswith("warning (known, harmless")]
    for source, text in (
        ("megatron-core", "Transformer Engine and Apex are not installed"),
        ("DeepSpeed", "Setting accelerator to CPU"),
        ("torch", "`torch.distributed.all_gather_into_tensor` is deprecated"),
    ):
        assert sum(f"{source}: {text}" in line for line in known) == 1, out
        assert out.count(text) == 1, f"{text!r} outside its one line:\n{out}"
    assert len(known) == 3, known

    # Unknown ones: on both ranks, in their usual form.
    for rank in (0, 1):
        assert f"UserWarning: zenlm-test: rank {rank}'s warning zenlm does not know" in out, out
        assert f"zenlm-test: rank {rank}'s unknown DeepSpeed record" in out, out

    steps = [line for line in out.splitlines() if "INFO step " in line]
    assert len(steps) == 2, out
    for line in steps:
        for part in ("tokens/s", "TFLOP/s/device", "ms = data", "fwd/bwd", "opt", "comm",
                     "peak mem"):  # fmt: skip
            assert part in line, line
    assert out.count("MFU not reported: no peak FLOP/s known for cpu") == 1, out

    # PP = 1 here: the engine hooks of the step-time split fire on zenlm's forward/backward/
    # step path too (tests/distributed/test_trainer_metrics.py checks the split with known delays).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "demo" / "tb"))
    acc.Reload()
    for tag in ("time/optimizer_s", "time/comm_s", "time/fwd_bwd_s", "time/data_wait_s"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
        assert all(e.value > 0 for e in acc.Scalars(tag)), (tag, acc.Scalars(tag))
