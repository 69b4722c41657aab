"""zenlm's training step against a plain PyTorch loop on the same model, as a ratio in one run.

    .venv/bin/python tools/bench/step_overhead.py                  # ~1-2 min on 2 cores
    .venv/bin/python tools/bench/step_overhead.py --zero-stages 1 --rounds 12

Both sides run in this one process at TP = PP = DP = 1 (the Trainer makes a 1-rank gloo group):
- zenlm: `Trainer.train_step()` (DeepSpeed engine, ZeRO stage as given, client torch AdamW,
  LambdaLR, clipping, the step's loss all-reduced over DP and returned as a float);
- plain: the loop of zenlm.testing.reference: the same `Transformer` (PlainFactory, same init),
  the same AdamW parameter groups (`build_optimizer`), LambdaLR, `clip_grad_norm_`,
  `zero_grad(set_to_none=True)`, `loss.item()`.
Both read the same synthetic micro batches (zenlm.testing.reference.rank_micro_batches), fp32.

Default model: hidden 256, 4 layers, 4 heads, SwiGLU 688, vocab 4096, seq 256, micro batch 8
(one micro batch per step): ~4.2M matmul weights, ~58 GFLOP per step, a few hundred ms on
2 threads. Large enough that matmuls dominate (per-step fixed costs of the engine show up as
a ratio, not drowned), small enough that 50+ timed steps fit in a minute or two.

After warm-up, rounds alternate a block of zenlm steps and a block of plain steps (the order
flips every round), so load from other processes on the machine hits both sides alike. Reported:
the ratio of the median step times, the median of the per-round ratios (paired, robust to load
that drifts between rounds) and their spread, the ratio of process CPU times and of the fastest
steps; the load average at start and end says how busy the machine was. Target: zenlm / plain <= 1.10.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

TARGET = 1.10


def build_config(args: argparse.Namespace, zero_stage: int, run_dir: str):
    from zenlm.config import load_config

    return load_config(
        None,
        [
            f"model.hidden_size={args.hidden}",
            f"model.intermediate_size={args.intermediate}",
            f"model.num_layers={args.layers}",
            f"model.num_attention_heads={args.heads}",
            f"model.vocab_size={args.vocab}",
            f"model.max_seq_len={args.seq_len}",
            f"data.seq_len_tokens={args.seq_len}",
            f"data.micro_batch_size_seqs={args.micro_batch}",
            f"data.global_batch_size_seqs={args.micro_batch * args.grad_accum}",
            f"parallel.zero_stage={zero_stage}",
            f"runtime.torch_threads={args.threads}",
            "optim.train_steps=100000",
            "optim.warmup_steps=10",
            "optim.grad_clip_norm=1.0",
            "logging.eval_interval_steps=0",
            "logging.tensorboard_enabled=false",
            f"logging.run_dir={run_dir}",
            f"logging.run_name=zero{zero_stage}",
        ],
    )


class PlainLoop:
    """zenlm.testing.reference's loop, one optimizer step per call."""

    def __init__(self, cfg) -> None:
        import torch

        from zenlm.model.factory import PlainFactory
        from zenlm.model.transformer import Transformer
        from zenlm.parallel.engine import build_optimizer
        from zenlm.testing.reference import rank_micro_batches
        from zenlm.train.schedule import build_lr_lambda

        self.torch = torch
        self.cfg = cfg
        self.factory = PlainFactory()
        self.model = Transformer(cfg.model, self.factory, seed=cfg.runtime.seed)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, build_lr_lambda(cfg.optim)
        )
        self.data = rank_micro_batches(cfg, 0, 1)
        self.n_micro = cfg.data.global_batch_size_seqs // cfg.data.micro_batch_size_seqs

    def step(self) -> float:
        from zenlm.model.loss import mean_loss

        total = 0.0
        for _ in range(self.n_micro):
            batch = next(self.data)
            loss = mean_loss(self.factory, self.model(batch["input_ids"]), batch["labels"])
            (loss / self.n_micro).backward()
            total += loss.item()
        clip = self.cfg.optim.grad_clip_norm
        if clip > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total / self.n_micro


def timed_steps(step, n: int) -> list[tuple[float, float]]:
    """(wall s, process CPU s) of each of n steps."""
    out = []
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    return out


def measure(args: argparse.Namespace, zero_stage: int, run_dir: str) -> list[dict]:
    """Per round: {side: [(wall, cpu), ...]} for the alternating blocks of steps."""
    from zenlm.testing.reference import rank_micro_batches
    from zenlm.train.trainer import Trainer

    cfg = build_config(args, zero_stage, run_dir)
    trainer = Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))
    plain = PlainLoop(cfg)
    sides = {"zenlm": trainer.train_step, "plain": plain.step}
    for step in sides.values():
        timed_steps(step, args.warmup)
    rounds = []
    for r in range(args.rounds):
        order = ("zenlm", "plain") if r % 2 == 0 else ("plain", "zenlm")
        rounds.append({name: timed_steps(sides[name], args.steps_per_round) for name in order})
    return rounds


def summarise(stage: int, rounds: list[dict]) -> dict:
    def med(side: str, i: int, rs=rounds) -> float:
        return statistics.median(t[i] for r in rs for t in r[side])

    paired = [med("zenlm", 0, [r]) / med("plain", 0, [r]) for r in rounds]
    return {
        "stage": stage,
        "zenlm": med("zenlm", 0),
        "plain": med("plain", 0),
        "ratio": med("zenlm", 0) / med("plain", 0),
        "paired": statistics.median(paired),
        "spread": (min(paired), max(paired)),
        "cpu_ratio": med("zenlm", 1) / med("plain", 1),
        "best_ratio": min(t[0] for r in rounds for t in r["zenlm"])
        / min(t[0] for r in rounds for t in r["plain"]),
        "steps": sum(len(r["zenlm"]) for r in rounds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro batches per step")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument(
        "--zero-stages", default="0,1", help="comma list; 1 is the config default (ZeRO-1)"
    )
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps-per-round", type=int, default=3)
    args = ap.parse_args()

    # DeepSpeed JIT-builds its comm op once into this cache (as `make test` does).
    repo = Path(__file__).resolve().parents[2]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(repo / ".cache" / "torch_extensions"))
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex")
    import torch

    torch.set_num_threads(args.threads)
    from zenlm.metrics.throughput import flops_per_token, matmul_params

    stages = [int(s) for s in args.zero_stages.split(",")]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="zenlm-bench-") as run_dir:
        rows = [summarise(stage, measure(args, stage, run_dir)) for stage in stages]
    cfg = build_config(args, stages[0], "runs")
    tokens = args.micro_batch * args.grad_accum * args.seq_len
    gflop = flops_per_token(cfg.model, args.seq_len) * tokens / 1e9
    print(
        f"\nmodel: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"SwiGLU {args.intermediate}, vocab {args.vocab}; {matmul_params(cfg.model) / 1e6:.1f}M "
        f"matmul weights; step = {args.grad_accum} x {args.micro_batch} seqs x {args.seq_len} "
        f"tokens = {tokens} tokens, {gflop:.0f} GFLOP; fp32, {args.threads} threads, "
        f"TP = PP = DP = 1; {args.rounds} alternating rounds x {args.steps_per_round} steps "
        f"per side after {args.warmup} warm-up steps"
    )
    print(
        f"{'ZeRO':>4} {'zenlm ms':>9} {'plain ms':>9} {'ratio':>6} {'paired':>6} "
        f"{'rounds min-max':>14} {'CPU ratio':>9} {'best':>6}  target"
    )
    for r in rows:
        verdict = "ok" if r["ratio"] <= TARGET else "ABOVE"
        lo, hi = r["spread"]
        print(
            f"{r['stage']:>4} {1e3 * r['zenlm']:>9.1f} {1e3 * r['plain']:>9.1f} "
            f"{r['ratio']:>6.3f} {r['paired']:>6.3f} {lo:>6.3f}-{hi:<7.3f} "
            f"{r['cpu_ratio']:>9.3f} {r['best_ratio']:>6.3f}  <= {TARGET:.2f} {verdict}"
        )
    print(
        f"ratio: zenlm / plain of the median step wall times ({rows[0]['steps']} steps each); "
        "paired: median over rounds of each round's ratio; CPU ratio: the same with process CPU "
        "time (less sensitive to other load, but counts OpenMP spin-waiting); best: fastest "
        "step / fastest step (the least disturbed by other load); the verdict uses ratio"
    )
    print(f"load average (1, 5, 15 min): start {load0}, end {os.getloadavg()}")


if __name__ == "__main__":
    main()
