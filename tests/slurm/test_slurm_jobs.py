"""Training jobs on a real Slurm cluster (tests/slurm/conftest.py: slurmctld + 4 slurmd nodes on
this machine), submitted the way a user does: `launch/submit.py` -> `sbatch slurm/pretrain.sbatch`
-> slurm/common.sh -> srun (one task per rank, or one torchrun per node) -> launch/train.py.

Every job trains configs/debug.yaml at TP 2 with ZeRO-1 on a corpus made by the real corpus tools,
fp32 on CPU (gloo), logging every step to TensorBoard; the reference is one single-node torchrun
run of the same layout on 4 processes (`torchrun --standalone`), 20 steps.

- 2 nodes x 2 tasks (srun mode, DataLoader workers on; the README's command): per-step losses
  and grad norms equal the reference bit for bit (same ranks, same collectives, same data order).
- torchrun mode, preempted (`scancel --signal=USR1 --batch`: the batch shell forwards SIGUSR1,
  torchrun forwards it to its workers) after step 3: the job saves at the step boundary, exits
  75, requeues itself (Restarts=1), resumes, finishes; all 20 steps equal the reference bit for
  bit.
- srun mode, preempted after step 3, and while the requeued job waits, shrunk to 1 node (2 tasks:
  TP 2 x DP 1, grad accumulation 4 instead of 2, the same global batch): the losses up to the stop
  are bitwise the reference's, after it within 1e-5 relative (summation order changes with DP).
- A rank that crashes (rank 3, injected through sitecustomize) fails the job: FAILED with a
  non-zero exit code, Restarts=0, and one `job failed ... not requeued: rank 3 (node n2 ...):
  RuntimeError: ...` line. A config error (exit 2 from every rank) is not requeued either.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zenlm.testing.distributed import CPU_ONLY_ENV
from zenlm.testing.readme import find_readme_command
from zenlm.testing.text_corpus import build_text_corpus

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/debug.yaml"
STEPS = 20
STOP_AFTER_STEP = 3
LAYOUT = [
    f"optim.train_steps={STEPS}",
    "optim.warmup_steps=2",
    "optim.lr=0.001",
    "optim.min_lr=0.0001",
    "data.global_batch_size_seqs=16",
    "data.micro_batch_size_seqs=4",
    "parallel.tensor_parallel_degree=2",
    "parallel.zero_stage=1",
    "logging.log_interval_steps=1",
    "logging.eval_interval_steps=0",
    "logging.tensorboard_enabled=true",
    "checkpoint.save_interval_steps=0",
]
JOB_TIMEOUT_S = 300

pytestmark = pytest.mark.usefixtures("slurm_cluster")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_text_corpus(tmp_path_factory.mktemp("slurm_corpus"))


@pytest.fixture(scope="module")
def base_env(slurm_cluster, tmp_path_factory):
    import os

    work = tmp_path_factory.mktemp("slurm_jobs")
    return work, {
        **os.environ,
        **CPU_ONLY_ENV,
        **slurm_cluster,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "ZENLM_RUN_DIR": str(work / "runs"),
        "ZENLM_LOG_ROOT": str(work / "logs"),
    }


@pytest.fixture(scope="module")
def reference(corpus, base_env, tmp_path_factory):
    """The uninterrupted single-node run: torchrun --standalone, 4 processes, same layout."""
    out = tmp_path_factory.mktemp("reference")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "launch/train.py", "--config", CONFIG, *LAYOUT, *corpus.overrides(),
        "data.num_workers=2", f"logging.run_dir={out}", "logging.run_name=ref",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=base_env[1], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return scalars(out / "ref" / "tb")


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} for train/loss and train/grad_norm (the last event of a step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {
        tag: {e.step: e.value for e in acc.Scalars(tag)}
        for tag in ("train/loss", "train/grad_norm")
    }


def submit(
    name: str, env: dict[str, str], work: Path, args: list[str], readme: bool = False
) -> tuple[str, Path]:
    """launch/submit.py -> sbatch; returns (job id, the job's output file). readme=True starts
    from the README's CPU-cluster command as written there."""
    log = work / f"{name}.out"
    head = ["--config", CONFIG, "--gpus-per-node=0"]
    if readme:
        tokens = find_readme_command(
            "On a Slurm cluster", (".venv/bin/python", "launch/submit.py"), "0"
        )
        head = tokens[2:]
    cmd = [
        sys.executable, "launch/submit.py", *head, "--cpus-per-proc=1",
        f"--job-name={name}", f"--run-name={name}", "--time=10",
        f"--sbatch-arg=--output={log}", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"submitted job (\d+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1), log


def job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(predicate, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")


def wait_done(job_id: str, env: dict[str, str], log: Path) -> dict[str, str]:
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

    def ended() -> dict[str, str] | None:
        f = job_fields(job_id, env)
        never = f.get("JobState") == "PENDING" and f.get("Reason") in (
            "PartitionConfig",
            "BadConstraints",
        )
        assert not never, f"job {job_id} can never run: {f}"
        return f if f.get("JobState") in final else None

    return wait_until(
        ended,
        JOB_TIMEOUT_S,
        f"job {job_id} to end",
        log,
    )


def log_has(log: Path, pattern: str) -> bool:
    return log.exists() and re.search(pattern, log.read_text()) is not None


def preempt_after(job_id: str, env: dict[str, str], log: Path, step: int) -> None:
    """SIGUSR1 to the batch shell (what `#SBATCH --signal=B:USR1@<s>` does) once the run logged
    `step`; the run has STEPS - step steps left, so the signal lands mid-training."""

    def reached() -> bool:
        state = job_fields(job_id, env).get("JobState")
        if state not in ("PENDING", "RUNNING"):
            raise AssertionError(
                f"job {job_id} {state} before step {step}\n{log.read_text()[-4000:]}"
            )
        return log_has(log, rf"step {step}/{STEPS} ")

    wait_until(reached, JOB_TIMEOUT_S, f"step {step}", log)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)


def stopped_at(log: Path) -> int:
    m = re.search(r"stop requested \(signal 10\) at step (\d+)", log.read_text())
    assert m, f"no save-and-stop in the log:\n{log.read_text()[-4000:]}"
    step = int(m.group(1))
    assert STOP_AFTER_STEP <= step < STEPS, f"stopped at step {step}: the signal came too late"
    return step


def test_two_nodes_equal_single_node_torchrun(corpus, base_env, reference):
    work, env = base_env
    # The README's command (2 nodes x 2 CPU ranks, TP 2), with this test's steps and corpus.
    job, log = submit(
        "two-nodes", env, work, [*LAYOUT, *corpus.overrides(), "data.num_workers=2"], readme=True
    )
    fields = wait_done(job, env, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-4000:]
    assert "world 4, launcher srun" in text and "run finished" in text
    assert scalars(work / "runs" / "two-nodes" / "tb") == reference


def test_preemption_saves_requeues_and_resumes_exactly(corpus, base_env, reference):
    work, env = base_env
    job, log = submit(
        "preempt", env, work,
        ["--nodes=2", "--procs-per-node=2", "--launcher=torchrun", *LAYOUT, *corpus.overrides()],
    )  # fmt: skip
    preempt_after(job, env, log, STOP_AFTER_STEP)
    fields = wait_done(job, env, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-4000:]
    step = stopped_at(log)
    assert "requeueing (restart 1 of at most 10)" in text
    assert "resumed from" in text and f"step_{step:08d}" in text, text[-4000:]
    assert scalars(work / "runs" / "preempt" / "tb") == reference


def test_requeued_on_fewer_nodes_resumes_at_the_new_dp_size(corpus, base_env, reference):
    work, env = base_env
    job, log = submit(
        "elastic", env, work,
        ["--nodes=2", "--procs-per-node=2", *LAYOUT, *corpus.overrides(), "data.num_workers=2"],
    )  # fmt: skip
    preempt_after(job, env, log, STOP_AFTER_STEP)
    # The requeued job waits (credential expiry) before it may start: hold it, give it one node
    # (2 tasks: TP 2 x DP 1), release it.
    wait_until(
        lambda: (f := job_fields(job, env)).get("Restarts") == "1" and f["JobState"] == "PENDING",
        JOB_TIMEOUT_S,
        "the requeue",
        log,
    )
    # One field per update: Slurm checks each against the others; NumNodes=1-1 sets min and max.
    subprocess.run(["scontrol", "hold", job], env=env, check=True)
    for change in ("NumTasks=2", "NumNodes=1-1", "NumCPUs=2"):
        subprocess.run(["scontrol", "update", f"JobId={job}", change], env=env, check=True)
    subprocess.run(["scontrol", "release", job], env=env, check=True)
    fields = wait_done(job, env, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["NumNodes"] == "1", text[-4000:]
    step = stopped_at(log)
    assert "world 2, launcher srun" in text, text[-4000:]
    got = scalars(work / "runs" / "elastic" / "tb")
    for tag, ref in reference.items():
        assert sorted(got[tag]) == sorted(ref)
        for s, value in got[tag].items():
            if s <= step:
                assert value == ref[s], f"{tag} step {s} before the stop: {value} != {ref[s]}"
            else:
                assert abs(value - ref[s]) <= 1e-5 * abs(ref[s]), (
                    f"{tag} step {s}: {value} vs {ref[s]}"
                )


def test_failures_fail_the_job_and_are_never_requeued(corpus, base_env, tmp_path):
    work, env = base_env
    # A crash of one rank, injected without touching zenlm: a sitecustomize on PYTHONPATH that
    # makes rank 3's preflight raise (ranks 0-2 then wait for it in the rendezvous).
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('SLURM_STEP_ID') and os.environ.get('SLURM_PROCID') == '3':\n"
        "    import zenlm.train.preflight as p\n"
        "    def crash(*a, **k):\n"
        "        raise RuntimeError('injected fault: rank 3 lost its device')\n"
        "    p.preflight = crash\n"
    )
    crash_env = {**env, "PYTHONPATH": f"{tmp_path}:{env.get('PYTHONPATH', '')}".rstrip(":")}
    crash, crash_log = submit(
        "crash", crash_env, work, ["--nodes=2", "--procs-per-node=2", *LAYOUT, *corpus.overrides()]
    )
    # A config error every rank shares (exit 2), submitted beside it on the other two nodes.
    bad, bad_log = submit(
        "bad-config", env, work,
        ["--nodes=2", "--procs-per-node=2", *LAYOUT, *corpus.overrides(), "data.tokenizer_path=/nonexistent.model"],
    )  # fmt: skip
    for job, log, code, cause in (
        (crash, crash_log, "1", r"rank 3 \(node n2, pid \d+\): RuntimeError: injected fault: rank 3 lost its device"),
        (bad, bad_log, "2", r"rank \d \(node n\d, pid \d+\): \w+Error: .*nonexistent\.model"),
    ):  # fmt: skip
        fields = wait_done(job, env, log)
        text = log.read_text()
        assert fields["JobState"] == "FAILED", text[-4000:]
        assert fields["ExitCode"] == f"{code}:0" and fields["Restarts"] == "0", fields
        lines = [line for line in text.splitlines() if "job failed" in line]
        assert len(lines) == 1 and "not requeued" in lines[0], text[-4000:]
        assert re.search(cause, lines[0]), lines[0]
        assert "requeueing" not in text
