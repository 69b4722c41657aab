"""Run a command-line tool as a user would and record what a bad-input test asserts.

    r = run_tool_probe(["tools/preprocess.py", "in.txt", "--out", "c/", ...])
    r.returncode, r.error_lines, r.traceback, r.seconds, r.heavy_imports

The tool runs in a fresh interpreter under a small wrapper that, when the tool exits, writes down
which heavy frameworks (deepspeed, megatron) it imported and how long it ran: "the error came
before any step" is asserted as "no deepspeed import and no step line", which does not depend on
the machine's speed. `snapshot(paths)` / `changed(before, paths)` check that nothing on disk was
modified, added or deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zenlm.testing.distributed import CPU_ONLY_ENV

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("deepspeed", "megatron")

_WRAPPER = r"""
import json, os, runpy, sys, time
t0 = time.perf_counter()
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
rc = 1
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    rc = 0
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
finally:
    with open(os.environ["ZENLM_PROBE_OUT"], "w") as f:
        json.dump({"rc": rc, "seconds": time.perf_counter() - t0,
                   "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))}, f)
sys.exit(rc)
""".replace("HEAVY", repr(HEAVY))


@dataclass
class ProbeResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    heavy_imports: list[str]

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error: ")]

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr + self.stdout

    @property
    def started_training(self) -> bool:
        """A step ran: the trainer's console line 'step N/M | loss ...' was printed."""
        return any(" step " in ln and " | loss " in ln for ln in self.stdout.splitlines())


def run_tool_probe(
    args: list[str],
    cwd: str | os.PathLike = REPO,
    env: dict[str, str] | None = None,
    timeout_s: float = 600,
) -> ProbeResult:
    """Run `python <args>` (args[0] a script path relative to the repo) and probe its exit."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        full_env = {**os.environ, **CPU_ONLY_ENV, "ZENLM_PROBE_OUT": str(out), **(env or {})}
        script = args[0] if os.path.isabs(args[0]) else str(REPO / args[0])
        proc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, script, *args[1:]],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        probe = json.loads(out.read_text()) if out.is_file() else {"seconds": -1, "heavy": []}
    return ProbeResult(proc.returncode, proc.stdout, proc.stderr, probe["seconds"], probe["heavy"])


def snapshot(*roots: str | os.PathLike) -> dict[str, str]:
    """{path: sha256} of every file under the roots (a missing root maps to nothing)."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changed(before: dict[str, str], *roots: str | os.PathLike) -> list[str]:
    """Paths added, removed or modified under the roots since `before` was taken."""
    after = snapshot(*roots)
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
