"""Training curves of one or more runs, read from their TensorBoard events, as one PNG.

    curves = [read_curves(Path("runs/demo")), read_curves(Path("runs/other"))]
    plot_curves(curves, Path("runs/demo/curves.png"))

Panels: train and validation loss, learning rate, gradient norm and tokens/s, each against
optimizer steps (left column) and training tokens (right column); one colour per run, so runs
overlay for comparison. Tokens come from the run's own train/tokens_seen scalar at the logged
steps (linear in between), so runs with different batch sizes line up on the token axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zenlm.errors import ZenlmError

# (panel title, tags drawn in it, y log scale where the values span decades)
PANELS = (
    ("loss", ("train/loss", "val/loss"), False),
    ("learning rate", ("train/lr",), False),
    ("grad norm (before clipping)", ("train/grad_norm",), True),
    ("tokens/s (log-interval mean)", ("train/tokens_per_s",), False),
)
TAGS = tuple(tag for _, tags, _ in PANELS for tag in tags)
FIGSIZE_IN = (12.0, 12.0)
DPI = 100  # FIGSIZE_IN x DPI = a 1200 x 1200 px image


class RunEventsError(ZenlmError):
    """A run directory without TensorBoard scalars to plot."""


@dataclass
class RunCurves:
    name: str
    series: dict[str, tuple[np.ndarray, np.ndarray]]
    """tag -> (steps, values), steps ascending; only tags the run logged."""
    tokens_seen: tuple[np.ndarray, np.ndarray]
    """(steps, train/tokens_seen) at the logged steps."""

    def tokens_at(self, steps: np.ndarray) -> np.ndarray:
        """Training tokens consumed after each of `steps` (linear between logged steps)."""
        s, t = self.tokens_seen
        return np.interp(steps, np.concatenate([[0], s]), np.concatenate([[0], t]))


def events_dir(run: Path) -> Path:
    """<run>/tb when it exists (a zenlm run directory), else `run` itself (a tb directory)."""
    return run / "tb" if (run / "tb").is_dir() else run


def read_curves(run: Path) -> RunCurves:
    """Every scalar of TAGS and train/tokens_seen in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    where = events_dir(run)
    if not where.is_dir():
        raise RunEventsError(f"{run}: no such run directory")
    acc = EventAccumulator(str(where), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    logged = set(acc.Tags().get("scalars", []))
    if "train/loss" not in logged:
        raise RunEventsError(
            f"{run}: no train/loss in TensorBoard events under {where} (was the run started "
            "with logging.tensorboard_enabled=true, and did it log a step?)"
        )

    def series(tag: str) -> tuple[np.ndarray, np.ndarray]:
        events = acc.Scalars(tag)
        return (
            np.array([e.step for e in events], dtype=np.int64),
            np.array([e.value for e in events], dtype=np.float64),
        )

    found = {tag: series(tag) for tag in TAGS if tag in logged}
    if "train/tokens_seen" in logged:
        tokens = series("train/tokens_seen")
    else:  # no token counts (not a zenlm run): the token axis shows steps
        steps = found["train/loss"][0]
        tokens = (steps, steps.astype(np.float64))
    return RunCurves(name=run.resolve().name, series=found, tokens_seen=tokens)


def _pyplot():  # -> the matplotlib.pyplot module, on the Agg backend
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (before pyplot picks a backend)
    import matplotlib.pyplot as plt

    return plt


def _spans_decades(series: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """Log scale pays off when positive values span more than a factor of 20 (grad norm: the
    first steps' large norms next to later small ones); a narrow range reads better linear."""
    values = np.concatenate([v for _, v in series])
    return bool(values.size and values.min() > 0 and values.max() > 20 * values.min())


def build_figure(runs: list[RunCurves]):  # -> matplotlib.figure.Figure
    """The figure: PANELS rows x (steps, tokens) columns; each line's label is 'RUN TAG'."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(PANELS), 2, figsize=FIGSIZE_IN, dpi=DPI, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (title, tags, log_y) in enumerate(PANELS):
        drawn = [r.series[t] for r in runs for t in tags if t in r.series]
        for col, axis in enumerate(("steps", "tokens")):
            ax = axes[row][col]
            for i, run in enumerate(runs):
                for tag in (t for t in tags if t in run.series):
                    steps, values = run.series[tag]
                    x = steps if axis == "steps" else run.tokens_at(steps)
                    val = tag.startswith("val/")
                    ax.plot(
                        x, values, color=colours[i % len(colours)],
                        linestyle="--" if val else "-", marker="o" if val else None,
                        markersize=3, label=f"{run.name} {tag}",
                    )  # fmt: skip
            ax.set_title(f"{title} vs {axis}", fontsize=10)
            ax.set_xlabel("optimizer step" if axis == "steps" else "training tokens")
            if log_y and drawn and _spans_decades(drawn):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(runs: list[RunCurves], out: Path) -> Path:
    """Write the PNG (FIGSIZE_IN at DPI: 1200 x 1200 px) and return its path."""
    plt = _pyplot()
    fig = build_figure(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
