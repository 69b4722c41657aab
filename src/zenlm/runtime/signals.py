"""Stop signals: preemption asks for a save at the next step boundary, then an exit with a code
that says "requeue me".

Installed first thing in launch/train.py (before the config is read, the framework imported or
the checkpoint resumed), so a signal that arrives during set-up is remembered instead of killing
the process; the training loop then stops before its first step. The handler only records the
signal (no I/O or collectives in a handler); the loop agrees on it over all ranks
(zenlm.checkpoint.faults.StopRequests.poll).

    SIGUSR1  Slurm's `--signal=B:USR1@<s>` forwarded by slurm/common.sh, `scancel --signal=USR1`
    SIGTERM  Slurm's preemption / time limit / scancel (then SIGKILL after KillWait or GraceTime)

DataLoader worker processes ignore both (ignore_in_worker): a signal sent to the whole process
group or step reaches them too, and a worker killed by it would crash its rank mid-step
("DataLoader worker (pid N) is killed by signal") instead of letting the rank save. The rank
stops its workers without signals (torch's queue shutdown; reap_workers_at_exit; torch's
parent-death watchdog).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import weakref
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

    Both are ignored outright. A worker cannot tell its rank's SIGTERM from a preemption's
    reliably: blocking SIGTERM and reading the sender with sigwaitinfo works only if no thread
    started before this function runs (not so under the spawn start method, where the child
    imports torch first). The rank instead ends its workers without SIGTERM: torch's shutdown
    asks them to stop through its queues, and reap_workers_at_exit kills what is left at
    interpreter exit, before multiprocessing's exit handler would SIGTERM them and join them
    without a timeout (a hang with ignoring workers). A worker also exits by itself when its
    rank dies (torch's parent watchdog).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_live_iterators: weakref.WeakSet = weakref.WeakSet()
_reaper_registered = False


def reap_workers_at_exit(iterator: Any) -> None:
    """Kill (SIGKILL) the workers of this DataLoader iterator that are still alive when the
    interpreter exits. Registered after multiprocessing's own exit handler, so it runs first
    (atexit is last-in, first-out)."""
    global _reaper_registered
    if not getattr(iterator, "_workers", None):
        return
    _live_iterators.add(iterator)
    if not _reaper_registered:
        atexit.register(_reap)
        _reaper_registered = True


def _reap() -> None:
    from torch.utils.data._utils import signal_handling

    for it in list(_live_iterators):
        workers = [w for w in getattr(it, "_workers", []) if w.is_alive()]
        if not workers:
            continue
        # Unregister them from torch's SIGCHLD check first (as its own shutdown does): it would
        # raise "worker killed by signal" in the middle of this function.
        if getattr(it, "_worker_pids_set", False):
            signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in workers:
            with contextlib.suppress(OSError):
                os.kill(w.pid, signal.SIGKILL)
        for w in workers:
            w.join(timeout=5)
