"""Plan a run: which TP x PP x DP x ZeRO x micro batch x checkpointing layouts fit, and how fast.

    python tools/plan.py --model 7b --gpus 64 --global-batch 1024 --seq-len 4096
    python tools/plan.py --model 70b --gpus 512 --gpu h200 --gpus-per-node 8 \\
        --global-batch 1024 --seq-len 4096 --top 5 --json

--model is a named size (configs/models/<name>.yaml) or any config YAML (a run config's
precision, document masking and pipeline split are used; its parallel layout is replaced).
Prints the valid layouts that fit, ranked by estimated step time, with per-GPU memory split into
parameters, gradients, optimizer states and activations, and the pipeline bubble. Estimates:
the model, its assumptions and how it was validated are in docs/plan.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zenlm.config.load import ConfigError, load_config
from zenlm.data.readers import ToolArgumentParser
from zenlm.plan.cluster import GIB, GPUS, Cluster, gpu_spec
from zenlm.plan.report import format_json, format_table
from zenlm.plan.search import CHECKPOINTING, SearchSpace, plan_layouts
from zenlm.runtime.cli import run_tool

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ToolArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", required=True, help="named size (debug, 125m, 1b, 7b, 13b, 70b) or a config YAML"
    )
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the run")
    p.add_argument(
        "--gpu", default="h100-sxm", choices=sorted(GPUS), help="GPU model (default h100-sxm)"
    )
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: the config's")
    p.add_argument("--memory-gib", type=float, help="override the GPU's memory")
    p.add_argument("--peak-tflops", type=float, help="override the GPU's dense peak")
    p.add_argument("--nvlink-gb-s", type=float, help="intra-node GB/s per GPU and direction")
    p.add_argument(
        "--inter-node-gb-s", type=float, default=50.0, help="per GPU (default 50: 400 Gb/s)"
    )
    p.add_argument("--reserve-gib", type=float, default=4.0, help="kept free per GPU (default 4)")
    p.add_argument(
        "--efficiency", type=float, default=0.5, help="achieved / peak FLOP/s (default 0.5)"
    )
    p.add_argument("--tp", type=_ints, help="only these TP degrees, e.g. 4,8")
    p.add_argument("--pp", type=_ints, help="only these PP degrees")
    p.add_argument("--zero", type=_ints, help="only these ZeRO stages (0-2)")
    p.add_argument("--micro-batch", type=_ints, help="only these micro batch sizes")
    p.add_argument("--checkpointing", choices=CHECKPOINTING, action="append")
    p.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    return p.parse_args(argv)


def model_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    named = MODELS / f"{name}.yaml"
    if not named.is_file():
        sizes = ", ".join(sorted(f.stem for f in MODELS.glob("*.yaml")))
        raise ConfigError(f"--model {name!r} is neither a config file nor a named size ({sizes})")
    return named


def _main(args: argparse.Namespace) -> int:
    if args.zero and not set(args.zero) <= {0, 1, 2}:
        raise ConfigError(f"--zero takes stages 0, 1, 2 (stage 3 is not modelled), got {args.zero}")
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    overrides = [
        f"data.global_batch_size_seqs={args.global_batch}",
        f"data.seq_len_tokens={args.seq_len}",
    ]
    if args.precision:
        overrides.append(f"runtime.precision={args.precision}")
    cfg = load_config(model_config_path(args.model), overrides)
    gpu = gpu_spec(args.gpu, args.memory_gib, args.nvlink_gb_s)
    cluster = Cluster(
        gpu,
        args.gpus,
        args.gpus_per_node,
        args.inter_node_gb_s,
        int(args.reserve_gib * GIB),
        args.peak_tflops,
    )
    space = SearchSpace(
        args.tp, args.pp, args.zero, args.micro_batch, tuple(args.checkpointing or ()) or None
    )
    plans, refused = plan_layouts(cfg, cluster, space, args.efficiency)
    if not plans:
        reason = max(refused, key=refused.get) if refused else "no candidate layout"
        raise ConfigError(f"no valid layout for {args.gpus} GPUs: {reason}")
    if not plans[0].fits:
        need = plans[0].memory.total / GIB
        raise ConfigError(
            f"no layout fits {cluster.usable_bytes / GIB:.1f} GiB per GPU: the smallest needs {need:.1f} GiB "
            f"({' '.join(plans[0].overrides)}); add GPUs, shorten --seq-len or lower --reserve-gib"
        )
    title = (
        f"{cfg.model.name}: {sum(1 for p in plans if p.fits)} of {len(plans)} valid layouts fit; "
        f"{args.gpus} x {gpu.name}, {args.gpus_per_node}/node, global batch {args.global_batch} x {args.seq_len} "
        f"tokens, {cfg.runtime.precision}"
    )
    meta = {
        "model": cfg.model.name,
        "gpus": args.gpus,
        "gpu": gpu.name,
        "precision": cfg.runtime.precision,
    }
    print(
        format_json(plans, cluster, meta, args.top)
        if args.json
        else format_table(plans, cluster, title, args.top)
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
