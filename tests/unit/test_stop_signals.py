"""Stop signals: handlers installed once and owned by whoever installed them; DataLoader workers
survive a SIGTERM/SIGUSR1 sent by anyone but their own rank (a preemption signals every process
of the job step) and still end when their rank shuts them down."""

from __future__ import annotations

import os
import signal
import subprocess
import time

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


def test_workers_ignore_stop_signals_from_others_but_not_their_rank():
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
    # The rank's own SIGTERM (multiprocessing's terminate, torch's shutdown fallback) ends them.
    workers[0].terminate()
    workers[0].join(timeout=10)
    assert workers[0].exitcode == 0
    it._shutdown_workers()
    assert not any(w.is_alive() for w in workers)
