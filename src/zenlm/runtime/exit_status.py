"""What a batch script needs to know after the training step ended: did the run finish, was
it preempted (requeue it), or which rank failed first and why.

- <run_dir>/exit_status.json, written by rank 0 at a clean end: {"status": "finished" or
  "preempted", "step", "signal", "slurm_job_id", "slurm_restart_count", "time_unix"}. With one
  srun task per GPU the exit code (75) already says "preempted"; torchrun turns any worker exit
  code into its own 1, so slurm/common.sh reads this file as well.
- $ZENLM_FAILURE_DIR/rank-NNNNN.txt, written by a rank that raises (only when the variable is
  set; slurm/common.sh points it into the job's log directory): one line, "<unix time> <exit
  code> rank R (node N, pid P): ExceptionType: message". The script prints the earliest as the
  job's cause and exits with its code (srun's own code is the highest of all tasks, usually 137
  from the ones it killed after the first failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from zenlm.errors import ZenlmError
from zenlm.runtime.cli import EXIT_BAD_INPUT


def write_exit_status(run_dir: Path, status: str, step: int, signal: int | None = None) -> None:
    """Atomically (write + rename) record how the run ended."""
    record = {
        "status": status,
        "step": step,
        "signal": signal,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "time_unix": time.time(),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".exit_status.json.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run_dir / "exit_status.json")


def failure_line(e: BaseException) -> str:
    """`rank R (node N, pid P): Type: first line of the message` (one line, no traceback)."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    message = " ".join(str(e).split()) or "(no message)"
    if len(message) > 400:
        message = message[:400] + "..."
    return f"rank {rank} (node {node}, pid {os.getpid()}): {type(e).__name__}: {message}"


@contextlib.contextmanager
def record_failures() -> Iterator[None]:
    """Record an exception escaping the block in $ZENLM_FAILURE_DIR (if set), then re-raise."""
    try:
        yield
    except Exception as e:  # ZenlmError included; KeyboardInterrupt and SystemExit pass
        folder = os.environ.get("ZENLM_FAILURE_DIR")
        if folder:
            with contextlib.suppress(OSError):
                rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
                path = Path(folder) / f"rank-{rank:05d}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                code = (
                    EXIT_BAD_INPUT if isinstance(e, ZenlmError) else 1
                )  # what the rank exits with
                path.write_text(f"{time.time():.3f} {code} {failure_line(e)}\n")
        raise
