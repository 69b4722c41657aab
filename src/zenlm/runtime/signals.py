"""Stop signals: preemption asks for a save at the next step boundary, then an exit with a code
that says "requeue me".

Installed first thing in launch/train.py (before the config is read, the framework imported or
the checkpoint resumed), so a signal that arrives during set-up is remembered instead of killing
the process; the training loop then stops before its first step. The handler only records the
signal (no I/O or collectives in a handler); the loop agrees on it over all ranks
(zenlm.checkpoint.faults.StopRequests.poll).

    SIGUSR1  Slurm's `--signal=B:USR1@<s>` forwarded by slurm/common.sh, `scancel --signal=USR1`
    SIGTERM  Slurm's preemption / time limit / scancel (then SIGKILL after KillWait or GraceTime)

DataLoader worker processes ignore both when anyone but their own rank sends them
(ignore_in_worker): a signal sent to the whole process group or step reaches them too, and a
worker killed by it would crash its rank mid-step ("DataLoader worker (pid N) is killed by
signal") instead of letting the rank save. The rank still stops its workers (torch's shutdown,
multiprocessing's exit handler, torch's parent-death watchdog).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

PREEMPTED_EXIT_CODE = 75
"""launch/train.py's exit code after a stop signal and a completed save (BSD EX_TEMPFAIL: "try
again later"). slurm/common.sh requeues the job on it; 0 means the run finished, 2 a ZenlmError
(bad config or input), anything else a crash. Neither 2 nor a crash is ever requeued."""

_received: int | None = None
_previous: dict[int, Any] = {}


def _handle(signum: int, frame: Any) -> None:
    global _received
    _received = signum


def install_stop_handlers() -> bool:
    """Record SIGTERM/SIGUSR1 from now on. True when this call installed them; False when they
    were installed already (the caller then leaves uninstalling to whoever did) or off the main
    thread, where Python cannot install handlers (tests may run a Trainer in a thread)."""
    if threading.current_thread() is not threading.main_thread() or _previous:
        return False
    for sig in STOP_SIGNALS:
        _previous[sig] = signal.signal(sig, _handle)
    return True


def uninstall_stop_handlers() -> None:
    """Restore the handlers found by install_stop_handlers and forget a received signal."""
    global _received
    for sig, prev in _previous.items():
        signal.signal(sig, prev)
    _previous.clear()
    _received = None


def stop_signal_received() -> int | None:
    """The number of the last stop signal received, or None."""
    return _received


def ignore_in_worker(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: stop signals are for the training process, not its workers.

    SIGUSR1 is ignored. SIGTERM cannot simply be ignored: the worker's own parent uses it to end
    the worker (torch's shutdown, multiprocessing's exit handler, which then joins without a
    timeout, so an ignoring worker hangs the rank at exit). So SIGTERM is blocked here and taken
    by a thread with sigwaitinfo, which knows the sender: from the parent the worker exits as
    SIGTERM would make it; from anyone else (slurmstepd signalling the whole step, torchrun
    signalling its workers' process group, a user's `kill -- -PGID`) it is dropped.
    Called first thing in the worker, before it starts any thread, so every later thread
    inherits the blocked mask and only the waiting thread can receive SIGTERM.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_term() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                # Exit 0: the rank asked for it (torch's SIGCHLD check would report any other
                # code, or death by a signal, as a worker failure during the rank's exit).
                os._exit(0)

    threading.Thread(target=wait_for_term, name="zenlm-sigterm", daemon=True).start()
