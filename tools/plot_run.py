"""Plot training curves of one or more runs from their TensorBoard events into one PNG.

    python tools/plot_run.py runs/demo                       # -> runs/demo/curves.png
    python tools/plot_run.py runs/a runs/b --out cmp.png     # runs overlaid, one colour each

Each RUN_DIR is a run directory (holding tb/) or a TensorBoard directory. Panels: train and
validation loss, learning rate, grad norm and tokens/s, against steps and against training
tokens (zenlm.metrics.curves). Prints the PNG's path. A directory without TensorBoard scalars
is one `error: ...` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zenlm.metrics.curves import plot_curves, read_curves
from zenlm.runtime.cli import run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or tb/ directories)")
    p.add_argument("--out", type=Path, help="PNG to write (default: <first run>/curves.png)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        curves = [read_curves(run) for run in args.runs]
        out = plot_curves(curves, args.out or args.runs[0] / "curves.png")
        print(f"curves: {out}")
        return 0

    return run_tool(body)


if __name__ == "__main__":
    sys.exit(main())
