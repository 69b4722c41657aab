"""One training rank of tests/integration/test_kill_during_save.py: launch/train.py, unchanged,
with the checkpoint save's file-system calls observed (and one of them turned into kill -9).

Run as a script by runpy (the test starts it in a process forked from a server that has already
imported zenlm.train.trainer, which saves ~6 s of imports per rank and launch); the parameters
come in the global PARAMS:

    rank, world_size, port   the torchrun-style environment this rank gets
    env                      more environment (e.g. CPU-only ranks on a GPU machine)
    argv                     launch/train.py's command line (after the program name)
    out_dir                  rank{r}.log (stdout and stderr) and events{r}.jsonl go here
    kill                     None, or the planned kill point (see below)

Nothing the save does is replaced: every observed call goes through to the real one. During
`CheckpointSession.save` each of these is a save event, recorded as a JSON line (written with
os.write on an O_APPEND file, so records survive the kill) and matched against `kill`:

    start / end   entering / leaving CheckpointSession.save on this rank
    write         a file written by zenlm.checkpoint.io (recorded at close with its size; a kill
                  at byte offset k writes the first k bytes of the file, flushes, and dies)
    fsync         os.fsync of a file or directory (kill before the call)
    mkdir, rename, replace, rmtree   os.mkdir, os.rename, os.replace, shutil.rmtree (kill before)

An event's key is (step, kind, basename, n) where n counts earlier events with the same kind and
name in the same save on this rank (shutil.rmtree of a trash directory happens twice).
Outside the save the rank also records every step's loss and grad norm (`after_step`), the
checkpoint resume chose (`resume`), and, on rank 0 after each save, the files meta.json lists.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import runpy
import shutil
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    def __init__(self, rank: int, kill: dict | None, events_path: Path) -> None:
        self.rank, self.kill = rank, kill
        self.fd = os.open(events_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.step: int | None = None  # the step whose save is running on this rank
        self.seen: dict[tuple[str, str], int] = {}

    def emit(self, **record) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())

    def _is_target(self, kind: str, name: str, n: int) -> bool:
        k = self.kill
        return bool(k and (k["step"], k["kind"], k["name"], k["n"]) == (self.step, kind, name, n))

    def point(self, kind: str, name: str, size: int | None = None) -> None:
        """A save event other than a write's bytes: record it, die here if it is the target."""
        if self.step is None:
            return
        n = self.seen.get((kind, name), 0)
        self.seen[(kind, name)] = n + 1
        self.emit(ev="point", step=self.step, kind=kind, name=name, n=n, bytes=size)
        if kind != "write" and self._is_target(kind, name, n):
            self.die()

    def write_target(self, name: str) -> int | None:
        """Byte offset at which to die while writing `name`, if that is the target."""
        if self.step is None:
            return None
        n = self.seen.get(("write", name), 0)
        return self.kill["offset"] if self._is_target("write", name, n) else None

    def die(self) -> None:
        self.emit(ev="kill", **self.kill)
        os.killpg(0, signal.SIGKILL)  # this rank and its DataLoader workers, like a node loss


class _ObservedFile:
    """The real file object of a checkpoint write, counting bytes (and dying at the target)."""

    def __init__(self, rec: Recorder, f, name: str) -> None:
        self.rec, self.f, self.name = rec, f, name
        self.written = 0
        self.die_at = rec.write_target(name)

    def __enter__(self) -> _ObservedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.f.__exit__(*exc)
        if exc[0] is None:
            self.rec.point("write", self.name, self.written)

    def write(self, data) -> int:
        if self.die_at is not None and self.written <= self.die_at < self.written + len(data):
            self.f.write(data[: self.die_at - self.written])
            self.f.flush()  # the torn prefix reaches the kernel, as a real crash leaves it
            self.rec.die()
        self.written += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()


def install(rank: int, kill: dict | None, events_path: Path) -> Recorder:
    import zenlm.checkpoint.io as ckpt_io
    from zenlm.checkpoint.session import CheckpointSession

    rec = Recorder(rank, kill, events_path)
    name = os.path.basename

    def observed_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (io.py closes it)
        return _ObservedFile(rec, f, name(str(path))) if "w" in mode and rec.step is not None else f

    ckpt_io.open = observed_open  # module global: shadows the builtin inside io.py only

    def wrap(module, attr, label):
        real = getattr(module, attr)

        def observed(*args, **kwargs):
            rec.point(*label(*args))
            return real(*args, **kwargs)

        setattr(module, attr, observed)

    wrap(os, "fsync", lambda fd: ("fsync", name(os.readlink(f"/proc/self/fd/{fd}"))))
    wrap(os, "mkdir", lambda p, *a: ("mkdir", name(str(p))))
    wrap(os, "rename", lambda a, b, *r: ("rename", f"{name(str(a))}>{name(str(b))}"))
    wrap(os, "replace", lambda a, b, *r: ("replace", f"{name(str(a))}>{name(str(b))}"))
    wrap(shutil, "rmtree", lambda p, *a: ("rmtree", name(str(p))))

    real_save, real_after, real_resume = (
        CheckpointSession.save,
        CheckpointSession.after_step,
        CheckpointSession.resume,
    )

    def save(self):
        rec.step, rec.seen = self.t.step, {}
        rec.point("start", "save")
        path = real_save(self)
        rec.point("end", "save")
        rec.step = None
        if rank == 0:
            meta = json.loads((path / "meta.json").read_text())
            rec.emit(ev="saved", step=meta["step"], path=str(path), files=meta["files"])
        return path

    def after_step(self, loss, skipped):
        norm = float(self.t.engine.get_global_grad_norm() or 0.0)
        rec.emit(ev="loss", step=self.t.step, loss=loss, grad_norm=norm)
        return real_after(self, loss, skipped)

    def resume(self):
        path = real_resume(self)
        rec.emit(ev="resumed", path=str(path) if path else None, step=self.t.step)
        return path

    CheckpointSession.save = save
    CheckpointSession.after_step = after_step
    CheckpointSession.resume = resume
    return rec


def main(params: dict) -> None:
    rank, out_dir = params["rank"], Path(params["out_dir"])
    os.environ.update(params["env"])
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(params["world_size"]),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(params["world_size"]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(params["port"]),
    )
    os.setpgid(0, 0)  # the rank leads a process group that its DataLoader workers join
    out = os.open(out_dir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    # The logger was made when the server imported zenlm (no RANK then): make it again.
    logging.getLogger("zenlm").handlers.clear()
    from zenlm.runtime.log import get_logger

    get_logger()
    install(rank, params["kill"], out_dir / f"events{rank}.jsonl")
    script = str(ROOT / "launch" / "train.py")
    sys.argv = [script, *params["argv"]]
    runpy.run_path(script, run_name="__main__")  # ends in sys.exit(main())


if __name__ == "__zenlm_rank__":
    main(PARAMS)  # noqa: F821 (given by runpy's init_globals)
