"""Metrics pieces on their own: FLOPs per token against torch's FLOP counter, the peak FLOP/s
table, the known-warnings list (in fresh interpreters), the run plots against the TensorBoard
events they were drawn from, and the W&B sink in offline mode (its run file read back with an
independent reader of W&B's record log).

The trainer wiring (step-time split, memory, skipped steps, W&B from a real run) is tested in
tests/distributed/test_trainer_metrics.py; the console of a real torchrun in
tests/integration/test_console.py.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zenlm.config import load_config
from zenlm.metrics.throughput import flops_per_token, lookup_peak_tflops, math_mode
from zenlm.testing.wandb_log import wandb_history

REPO = Path(__file__).resolve().parents[2]
DEBUG = str(REPO / "configs" / "debug.yaml")

# ---------------------------------------------------------------- FLOPs and peaks


@pytest.mark.parametrize("masking", [False, True])
def test_flops_per_token_equal_torchs_count_of_a_training_step(masking):
    """flops_per_token = what torch's FlopCounterMode counts in one forward + backward of the
    debug model (GQA 4:2), per token. The math SDPA kernel computes the full (T, T) scores as
    matmuls, as the documented count assumes (causal and document masks not discounted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from zenlm.model.factory import PlainFactory
    from zenlm.model.transformer import Transformer

    cfg = load_config(DEBUG, [f"model.document_masking={str(masking).lower()}"]).model
    assert cfg.kv_heads < cfg.num_attention_heads  # GQA: k/v projections narrower than q
    model = Transformer(cfg, PlainFactory(), seed=0)
    batch, seq = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    doc_ids = (torch.arange(seq) >= 25).long().expand(batch, seq)  # two documents per row
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids, doc_ids=doc_ids) if masking else model(ids)
        logits.float().square().mean().backward()
    # The loss above adds elementwise work only; every counted FLOP is a matmul.
    assert counter.get_total_flops() == pytest.approx(flops_per_token(cfg, seq) * batch * seq)


DATASHEET_SPARSE_BF16 = {
    # device name as torch.cuda.get_device_name() reports it -> BF16 tensor TFLOP/s "with
    # sparsity" from the vendor's datasheet (the table holds the dense half)
    "NVIDIA H100 80GB HBM3": 1979,  # SXM
    "NVIDIA H100 PCIe": 1513,
    "NVIDIA H100 NVL": 1671,
    "NVIDIA H200": 1979,
    "NVIDIA H200 NVL": 1671,
    "NVIDIA GH200 480GB": 1979,
    "NVIDIA A100-SXM4-80GB": 624,
    "NVIDIA A100-SXM4-40GB": 624,
    "NVIDIA A100-PCIE-40GB": 624,
    "NVIDIA A100 80GB PCIe": 624,
    "NVIDIA L40S": 724.1,  # the datasheet's dense 362.05 (its sparse "733" is not exactly 2x)
    "NVIDIA L40": 362.1,
    "NVIDIA L4": 242,
    "NVIDIA A10": 250,
}


@pytest.mark.parametrize("name", sorted(DATASHEET_SPARSE_BF16))
def test_peak_table_holds_the_dense_half_of_the_datasheet(name):
    peak, _ = lookup_peak_tflops(name, "bf16")
    assert peak == pytest.approx(DATASHEET_SPARSE_BF16[name] / 2, rel=2e-3)
    assert lookup_peak_tflops(name, "fp16")[0] == peak


def test_peak_depends_on_precision_and_tf32():
    sxm = "NVIDIA H100 80GB HBM3"
    assert math_mode("fp32", tf32_matmul=False) == "fp32"
    assert math_mode("fp32", tf32_matmul=True) == "tf32"
    assert lookup_peak_tflops(sxm, "fp32")[0] == pytest.approx(67.0)
    assert lookup_peak_tflops(sxm, "tf32")[0] == pytest.approx(989 / 2)  # 989 with sparsity
    # V100: fp16 tensor cores, no bf16 (0 = unknown, so no MFU), no TF32 (fp32 units)
    assert lookup_peak_tflops("Tesla V100-SXM2-32GB", "fp16")[0] == 125.0
    assert lookup_peak_tflops("Tesla V100-PCIE-16GB", "fp16")[0] == 112.0
    assert lookup_peak_tflops("Tesla V100-SXM2-32GB", "bf16")[0] == 0.0
    assert lookup_peak_tflops("Tesla V100-SXM2-32GB", "tf32")[0] == 15.7


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GeForce RTX 4090", "NVIDIA GB200", "cpu"])
def test_unknown_devices_have_no_peak(name):
    assert lookup_peak_tflops(name, "bf16") == (0.0, "")


# ---------------------------------------------------------------- known warnings

_EMIT = r"""
import logging, sys, warnings
from zenlm.runtime.warnings import install_known_warnings
install_known_warnings()
ds = logging.getLogger("DeepSpeed")  # as deepspeed.utils.logging builds it, after install
ds.propagate = False
ds.addHandler(logging.StreamHandler(sys.stderr))
mega = "Transformer Engine and Apex are not installed. Falling back to {}"
for what in ("Torch optimizers.", "local implementations of multi_tensor_applier"):
    warnings.warn(mega.format(what), UserWarning)  # two call sites, two texts
    warnings.warn(mega.format(what), UserWarning)
for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
    warnings.warn(f"`torch.distributed.{name}` is deprecated. Please use x", FutureWarning)
for _ in range(3):
    ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were ...")
warnings.warn("an unknown warning zenlm must not hide", UserWarning)
warnings.warn("Transformer Engine and Apex are not installed, as a DeprecationWarning",
              DeprecationWarning)  # the entry is for UserWarning only
ds.warning("an unknown DeepSpeed warning")
logging.getLogger("other").warning("Setting accelerator to CPU. If you have GPU (other logger)")
"""


def _emit(rank: int) -> str:
    env = {"RANK": str(rank), "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, "-c", _EMIT], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_known_warnings_show_once_on_rank_0_and_the_rest_passes():
    out = _emit(0)
    known = [line for line in out.splitlines() if line.startswith("warning (known, harmless")]
    assert len(known) == 3, out  # one line per entry, however often and however worded
    assert sum("megatron-core: Transformer Engine" in line for line in known) == 1
    assert sum("torch: `torch.distributed.all_gather_into_tensor`" in line for line in known) == 1
    assert sum("DeepSpeed: Setting accelerator to CPU" in line for line in known) == 1
    assert out.count("Transformer Engine and Apex") == 2  # + the DeprecationWarning's own
    assert "UserWarning: an unknown warning zenlm must not hide" in out
    assert "DeprecationWarning: Transformer Engine and Apex are not installed, as a" in out
    assert "an unknown DeepSpeed warning" in out
    assert "(other logger)" in out


def test_known_warnings_are_silent_on_other_ranks():
    out = _emit(1)
    mentions = [line for line in out.splitlines() if "Transformer Engine" in line]
    assert len(mentions) == 1 and "DeprecationWarning" in mentions[0], out
    assert (
        "is deprecated" not in out and "Setting accelerator to CPU. If you have GPU or" not in out
    )
    assert "UserWarning: an unknown warning zenlm must not hide" in out
    assert "an unknown DeepSpeed warning" in out and "(other logger)" in out


# ---------------------------------------------------------------- plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run: Path, tokens_per_step: int, steps: int, seed: int) -> dict:
    """TensorBoard events shaped like a zenlm run's, written with torch's SummaryWriter."""
    from torch.utils.tensorboard import SummaryWriter

    rng = np.random.default_rng(seed)
    written: dict[str, dict[int, float]] = {}
    writer = SummaryWriter(str(run / "tb"))
    for step in range(2, steps + 1, 2):
        values = {
            "train/loss": 7.0 / step + rng.random(),
            "train/lr": 1e-3 * step / steps,
            "train/grad_norm": 0.5 + rng.random(),
            "train/tokens_per_s": 5000 + 100 * rng.random(),
            "train/tokens_seen": float(step * tokens_per_step),
        }
        if step % 4 == 0:
            values["val/loss"] = 6.5 / step
        for tag, v in values.items():
            writer.add_scalar(tag, v, step)
            written.setdefault(tag, {})[step] = float(np.float32(v))  # events hold float32
    writer.close()
    return written


def test_plot_run_draws_the_events_of_several_runs(tmp_path):
    from zenlm.metrics.curves import PANELS, build_figure, read_curves

    written = {
        "a": _write_run(tmp_path / "a", tokens_per_step=1024, steps=20, seed=0),
        "b": _write_run(tmp_path / "b", tokens_per_step=4096, steps=12, seed=1),
    }
    out = tmp_path / "cmp.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_run.py"), str(tmp_path / "a"),
         str(tmp_path / "b"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"curves: {out}" in proc.stdout
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1200, 1200)  # width, height

    # What is drawn equals what was written: every line of every panel, both x axes.
    curves = [read_curves(tmp_path / "a"), read_curves(tmp_path / "b")]
    fig = build_figure(curves)
    axes = fig.axes
    lines_seen = 0
    for row, (_, tags, _) in enumerate(PANELS):
        for col in (0, 1):
            drawn = {line.get_label(): line for line in axes[2 * row + col].lines}
            for run, tagged in written.items():
                for tag in tags:
                    line = drawn[f"{run} {tag}"]
                    steps = sorted(tagged[tag])
                    x = steps if col == 0 else [tagged["train/tokens_seen"][s] for s in steps]
                    # val/loss steps are logged steps too, so tokens are exact, not interpolated
                    assert list(line.get_xdata()) == pytest.approx(x)
                    assert list(line.get_ydata()) == [tagged[tag][s] for s in steps]
                    lines_seen += 1
    assert lines_seen == 2 * 2 * 5  # columns x runs x tags


def test_plot_run_refuses_a_directory_without_events(tmp_path):
    (tmp_path / "empty" / "tb").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_run.py"), str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "no train/loss" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- W&B


def test_wandb_sink_writes_scalars_to_the_offline_run(tmp_path):
    pytest.importorskip("wandb")
    from zenlm.metrics.sinks import build_sinks

    cfg = load_config(
        DEBUG,
        ["logging.wandb_enabled=true", "logging.wandb_mode=offline",
         "logging.tensorboard_enabled=false", "logging.wandb_project=zenlm-test"],
    )  # fmt: skip
    sinks = build_sinks(cfg, tmp_path, rank=0)
    sent = {s: {"train/loss": 1.0 / s + 0.125, "time/data_wait_s": 0.25 * s} for s in (1, 2, 5)}
    for step, values in sent.items():
        sinks.scalars(values, step)
    sinks.close()
    rows = {r["_step"]: r for r in wandb_history(tmp_path)}
    assert sorted(rows) == [1, 2, 5]
    for step, values in sent.items():
        for tag, v in values.items():
            assert rows[step][tag] == pytest.approx(v, rel=1e-12)
    assert build_sinks(cfg, tmp_path, rank=1).sinks == []  # rank 0 only


def test_wandb_enabled_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    from zenlm.config.load import ConfigError
    from zenlm.train.preflight import preflight

    # No tokenizer: preflight reads none (configs/debug.yaml names the demo's)
    overrides = [
        f"logging.run_dir={tmp_path}",
        "data.tokenizer_path=''",
        "logging.wandb_enabled=true",
    ]
    cfg = load_config(DEBUG, overrides)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import fails
    with pytest.raises(ConfigError, match=r"wandb package is not installed: pip install wandb"):
        preflight(cfg, 1, corpora=False)
    assert not (tmp_path / "debug").exists()  # refused before creating the run directory
    preflight(load_config(DEBUG, overrides[:2]), 1, corpora=False)  # off: no package needed


def test_wandb_settings_are_checked(tmp_path):
    from zenlm.config.load import ConfigError
    from zenlm.train.preflight import preflight

    bad = [
        f"logging.run_dir={tmp_path}",
        "data.tokenizer_path=''",
        "logging.wandb_enabled=true",
        "logging.wandb_project=''",
    ]
    with pytest.raises(ConfigError, match=r"logging\.wandb_project is empty"):
        preflight(load_config(DEBUG, bad), 1, corpora=False)
    with pytest.raises(ConfigError, match="wandb_mode"):
        load_config(DEBUG, ["logging.wandb_mode=cloud"])
