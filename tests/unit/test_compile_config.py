"""runtime.compile_enabled refusals: one ConfigError line before any step, never an inductor
traceback inside the first step.

- ZeRO-3 with compile: refused by config validation (launch/train.py: exit 2, one `error:`
  line, before DeepSpeed or megatron is imported).
- A host where inductor cannot build CPU kernels: no C++ compiler at all, or a compiler that
  fails (here a stand-in g++ that answers --version and fails every build, as a g++ without
  Python's headers does). The probe names the cause; build_model, the path the Trainer takes,
  refuses before compiling anything. Runs in a subprocess with its own empty inductor cache, so
  the probe really compiles (a warm cache would load the kernel without calling the compiler).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zenlm.config import ConfigError, load_config
from zenlm.config.validate import validate
from zenlm.testing.cli_probe import run_tool_probe
from zenlm.testing.distributed import CPU_ONLY_ENV

REPO = Path(__file__).resolve().parents[2]


def test_zero3_with_compile_is_refused() -> None:
    cfg = load_config(None, ["runtime.compile_enabled=true", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"compile_enabled=true with parallel.zero_stage=3"):
        validate(cfg, world_size=1, check_device=False)
    # ZeRO-2 and compile together are fine.
    validate(load_config(None, ["runtime.compile_enabled=true", "parallel.zero_stage=2"]), 1, False)


def test_zero3_with_compile_cli_error_line() -> None:
    r = run_tool_probe(
        [
            "launch/train.py",
            "--config",
            "configs/debug.yaml",
            "runtime.compile_enabled=true",
            "parallel.zero_stage=3",
        ]
    )
    assert r.returncode == 2, r.stderr
    assert len(r.error_lines) == 1 and "zero_stage=3" in r.error_lines[0], r.stderr
    assert not r.traceback and not r.heavy_imports, (r.heavy_imports, r.stderr)


_PROBE = textwrap.dedent(
    """
    import torch._inductor.config as inductor_config
    from zenlm.config import ConfigError, load_config
    from zenlm.config import validate as v
    from zenlm.train.build import build_model

    fake = inductor_config.cpp.cxx
    inductor_config.cpp.cxx = ("/nonexistent/g++",)
    try:
        v.check_compile_supported("cpu")
    except ConfigError as e:
        print("missing:", e)
    inductor_config.cpp.cxx = fake  # the stand-in from $CXX
    v._compile_failure.cache_clear()
    cfg = load_config(None, ["runtime.compile_enabled=true"])
    try:
        build_model(cfg)
    except ConfigError as e:
        print("broken:", e)
    """
)


def test_probe_refuses_a_host_that_cannot_build_kernels(tmp_path: Path) -> None:
    fake = tmp_path / "g++"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "g++ (stand-in) 12"; exit 0; fi\n'
        'echo "fatal error: Python.h: No such file or directory" >&2; exit 1\n'
    )
    fake.chmod(0o755)
    env = {
        **os.environ,
        **CPU_ONLY_ENV,
        "CXX": str(fake),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = {ln.split(":", 1)[0]: ln for ln in out.stdout.splitlines() if ": " in ln}
    assert "no C++ compiler found" in lines.get("missing", ""), out.stdout + out.stderr
    broken = lines.get("broken", "")
    assert "CppCompileError" in broken and "Python.h" in broken, out.stdout + out.stderr
    assert "runtime.compile_enabled=false" in broken
