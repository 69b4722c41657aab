"""kill -9 of one rank mid-training: the other rank exits non-zero within 60 s; the relaunch
resumes from the newest complete checkpoint.

Ranks are started the way srun starts them (one `python launch/train.py` per rank with RANK,
WORLD_SIZE, MASTER_ADDR/PORT set), not by torchrun, so no launcher kills the survivor for us:
the survivor must notice by itself (gloo reports the closed connection in its next collective;
runtime.dist_timeout_s bounds anything that would otherwise wait). The corpus is written from
text by tools/train_tokenizer.py and tools/preprocess.py (zenlm.testing.text_corpus).
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

from zenlm.checkpoint import CheckpointStore, newest_valid
from zenlm.testing.distributed import cpu_env, free_port
from zenlm.testing.text_corpus import build_text_corpus

ROOT = Path(__file__).resolve().parents[2]


def _launch(world_size, overrides, log_dir, tag):
    port = str(free_port())
    procs = []
    base = cpu_env(world_size)  # gloo CPU ranks unless there is a GPU for each
    for rank in range(world_size):
        env = {
            **base,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        log = open(log_dir / f"{tag}-rank{rank}.log", "w")  # noqa: SIM115 (closed by the caller)
        cmd = [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            "--config",
            str(ROOT / "configs" / "models" / "debug.yaml"),
            *overrides,
        ]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_kill_one_rank_then_relaunch_resumes(tmp_path):
    corpus = build_text_corpus(tmp_path / "data")  # text -> train_tokenizer.py -> preprocess.py
    run_dir, ckpt = tmp_path / "runs", tmp_path / "runs" / "kill" / "checkpoints"
    common = [
        *corpus.overrides(),
        "data.global_batch_size_seqs=4",
        "data.micro_batch_size_seqs=1",
        "logging.eval_interval_steps=0",
        "logging.tensorboard_enabled=false",
        f"logging.run_dir={run_dir}",
        "logging.run_name=kill",
        "checkpoint.save_interval_steps=2",
        "runtime.dist_timeout_s=30",
        "optim.train_steps=60",
        "optim.warmup_steps=2",
    ]
    procs = _launch(2, common, tmp_path, "first")
    try:
        _wait_for(
            lambda: any(s >= 4 for s in CheckpointStore(ckpt).steps()),
            180,
            "a checkpoint at step >= 4",
        )
        victim, survivor = procs[1][0], procs[0][0]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            rc = survivor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "the surviving rank did not exit within 60 s of the kill"
            ) from None
        took = time.monotonic() - killed_at
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    assert rc != 0, "the surviving rank exited 0 after its peer was killed"
    assert took < 60

    chosen = newest_valid(CheckpointStore(ckpt))
    assert chosen is not None
    last = chosen[1]["step"]
    relaunch = _launch(2, common, tmp_path, "second")  # the same command, as a requeue would
    for p, log in relaunch:
        assert p.wait(timeout=180) == 0, (tmp_path / "second-rank0.log").read_text()[-3000:]
        log.close()
    text = (tmp_path / "second-rank0.log").read_text()
    assert f"resumed from checkpoint {chosen[0]} (step {last}, same layout)" in text, text[-3000:]
    assert "step 60/60" in text
