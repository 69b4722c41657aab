"""Stop signals: handlers installed once and owned by whoever installed them; DataLoader workers
survive a SIGTERM/SIGUSR1 sent by anyone but their own rank (a preemption signals every process
of the job step) and still end when their rank shuts them down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from zenlm.runtime import signals


def test_handlers_record_and_belong_to_the_first_installer():
    assert signals.install_stop_handlers()
    try:
        assert not signals.install_stop_handlers()  # the second caller does not own them
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.stop_signal_received() == signal.SIGUSR1
    finally:
        signals.uninstall_stop_handlers()
    assert signals.stop_signal_received() is None
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


class Counter(IterableDataset):
    def __iter__(self):
        i = 0
        while True:
            yield torch.tensor([i])
            i += 1


def test_workers_ignore_stop_signals_and_end_when_their_rank_stops_them():
    loader = DataLoader(
        Counter(), batch_size=None, num_workers=2, worker_init_fn=signals.ignore_in_worker
    )
    it = iter(loader)
    first = [int(next(it)) for _ in range(4)]
    workers = list(it._workers)
    for sig in ("TERM", "USR1"):
        for w in workers:  # sent by another process, like slurmstepd or torchrun
            subprocess.run(["kill", f"-{sig}", str(w.pid)], check=True)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    more = [int(next(it)) for _ in range(4)]  # the rank goes on reading
    assert first == [0, 0, 1, 1] and more == [2, 2, 3, 3]
    it._shutdown_workers()  # torch's shutdown: through its queues, no signal
    assert not any(w.is_alive() for w in workers)


EXIT_WITH_LIVE_WORKERS = """
import sys, torch
from torch.utils.data import DataLoader, IterableDataset
from zenlm.runtime import signals

class Counter(IterableDataset):
    def __iter__(self):
        i = 0
        while True:
            yield torch.tensor([i])
            i += 1

it = iter(DataLoader(Counter(), batch_size=None, num_workers=2,
                     worker_init_fn=signals.ignore_in_worker))
signals.reap_workers_at_exit(it)
print(int(next(it)), int(next(it)), [w.pid for w in it._workers], flush=True)
sys.exit(75)  # workers still running: multiprocessing's exit handler would SIGTERM and join them
"""


def test_a_rank_exits_at_once_with_workers_that_ignore_sigterm():
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_LIVE_WORKERS], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 75, r.stderr
    assert time.monotonic() - start < 30, "exit waited on the workers"
    pids = [int(p) for p in r.stdout.split("[", 1)[1].strip(" ]\n").split(",")]
    for pid in pids:  # gone, or a zombie of the exited rank waiting for init to reap it
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"
