"""Step time at PP = 1, 2, 4 with the same global batch, and the pipeline bubble against theory.

    .venv/bin/python tools/bench/pipeline.py                     # ~1 min on 2 cores
    .venv/bin/python tools/bench/pipeline.py --pp 2 --global-batch 16 --steps 10

Each pipeline degree runs the Trainer in its own gloo process group (run_distributed, TP = DP = 1,
one intra-op thread per process, fp32; zero_stage=1 configured, which runs as ZeRO stage 0 at
DP 1: zenlm.parallel.engine.effective_zero_stage) on the same model, global batch and micro batch,
so m = global / micro micro batches go through p stages per step (1F1B, DeepSpeed's
TrainSchedule). Every pipeline instruction DeepSpeed executes (ForwardPass, BackwardPass,
Send/Recv*, LoadMicroBatch, ReduceGrads, OptimizerStep) is timed on each rank, in wall time
(perf_counter, one clock for all processes) and in this thread's CPU time (thread_time).

An oversubscribed machine cannot show a bubble by wall time alone: PP = 4 puts 4 processes on
2 cores, so stages that could overlap take turns, and a stage's compute stretches while others
run. The bubble is therefore reported four ways, per pipeline degree:
  theory    (p - 1) / (m + p - 1): equal stages, free communication.
  schedule  DeepSpeed's own instruction streams replayed with equal stages (backward = 2 x
            forward) and blocking sends (a gloo send waits for its receive): the bubble of the
            schedule itself; it equals the theory.
  replay    the same streams replayed with each stage's measured CPU time per forward and
            backward: what these stages (uneven: the first holds the embedding, the last the head
            and loss) would give on dedicated devices with free communication.
  wall      measured: 1 - (time inside forward/backward) / (pipeline phase), averaged over
            stages; the phase runs from the step's start to the last backward on any stage.
            Honest only where each process has a core (PP <= 2 here, and only if the machine is
            otherwise idle).
Absolute times are those of a 2-core CPU VM with one thread per process, nothing like a GPU.
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

import results

COMPUTE = ("ForwardPass", "BackwardPass")
TAIL = ("ReduceTiedGrads", "ReduceGrads", "OptimizerStep")
SEND_PEER = {  # instruction -> (stage offset of the peer, the peer's matching instruction)
    "SendActivation": (1, "RecvActivation"),
    "RecvActivation": (-1, "SendActivation"),
    "SendGrad": (-1, "RecvGrad"),
    "RecvGrad": (1, "SendGrad"),
}


def overrides(args: argparse.Namespace, pp: int, run_dir: str) -> list[str]:
    return [
        f"model.hidden_size={args.hidden}",
        f"model.intermediate_size={args.intermediate}",
        f"model.num_layers={args.layers}",
        f"model.num_attention_heads={args.heads}",
        f"model.vocab_size={args.vocab}",
        f"model.max_seq_len={args.seq_len}",
        f"data.seq_len_tokens={args.seq_len}",
        f"data.micro_batch_size_seqs={args.micro_batch}",
        f"data.global_batch_size_seqs={args.global_batch}",
        f"parallel.pipeline_parallel_degree={pp}",
        "parallel.zero_stage=1",
        "runtime.torch_threads=1",
        "optim.train_steps=100000",
        "optim.warmup_steps=10",
        "logging.eval_interval_steps=0",
        "logging.tensorboard_enabled=false",
        f"logging.run_dir={run_dir}",
        f"logging.run_name=pp{pp}",
    ]


def _instrument(engine, events: list) -> None:
    """Time every pipeline instruction: DeepSpeed dispatches through self._INSTRUCTION_MAP, so an
    instance copy with wrapped functions sees them all without touching DeepSpeed."""

    def wrap(name, fn):
        def timed(self, **kwargs):
            w0, c0 = time.perf_counter(), time.thread_time()
            fn(self, **kwargs)
            events.append((name, w0, time.perf_counter(), time.thread_time() - c0))

        return timed

    engine._INSTRUCTION_MAP = {
        k: wrap(k.__name__, v) for k, v in type(engine)._INSTRUCTION_MAP.items()
    }


def rank_worker(rank: int, world_size: int, ov: list[str], warmup: int, steps: int) -> dict:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex")
    from zenlm.config import load_config
    from zenlm.testing.reference import rank_micro_batches
    from zenlm.train.trainer import Trainer

    cfg = load_config(None, ov)
    trainer = Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))
    events: list = []
    if trainer.pipelined:
        _instrument(trainer.engine, events)
    records = []
    for i in range(warmup + steps):
        events.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        w1, c1 = time.perf_counter(), time.process_time()
        if i >= warmup:
            records.append({"start": w0, "end": w1, "cpu": c1 - c0, "events": list(events)})
    return {"stage": trainer.dims.coords(rank)[0], "records": records}


# -- the 1F1B replay ---------------------------------------------------------------------------


def replay(streams: list[list[str]], cost: list[dict[str, float]]) -> float:
    """Bubble share of DeepSpeed's per-stage instruction streams with the given per-stage costs.

    Compute takes cost[stage][name]; a send and its matching receive complete together once
    both sides have reached them (blocking p2p), taking no time. Returns
    1 - sum(busy) / (p x makespan).
    """
    p = len(streams)
    pos, clock, busy = [0] * p, [0.0] * p, [0.0] * p
    while any(pos[s] < len(streams[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pos[s] < len(streams[s]):
                name = streams[s][pos[s]]
                if name not in SEND_PEER:
                    d = cost[s].get(name, 0.0)
                    clock[s] += d
                    busy[s] += d
                    pos[s] += 1
                    progressed = True
                    continue
                offset, match = SEND_PEER[name]
                peer = s + offset
                if pos[peer] >= len(streams[peer]) or streams[peer][pos[peer]] != match:
                    break
                clock[s] = clock[peer] = max(clock[s], clock[peer])
                pos[s] += 1
                pos[peer] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("replay deadlocked: the streams do not pair up")
    return 1 - sum(busy) / (p * max(clock))


def pipeline_streams(per_stage: list[dict]) -> list[list[str]]:
    """Each stage's instruction names of one step without the reduce/optimizer tail (not part of
    the bubble)."""
    return [
        [e[0] for e in st["records"][0]["events"] if not e[0].endswith(TAIL)] for st in per_stage
    ]


# -- analysis ----------------------------------------------------------------------------------


def analyse(per_rank: list[dict], m: int) -> dict:
    p = len(per_rank)
    per_stage = sorted(per_rank, key=lambda r: r["stage"])
    steps = len(per_stage[0]["records"])
    step_wall = [
        max(st["records"][i]["end"] for st in per_stage)
        - min(st["records"][i]["start"] for st in per_stage)
        for i in range(steps)
    ]
    step_cpu = [sum(st["records"][i]["cpu"] for st in per_stage) for i in range(steps)]
    out = {
        "p": p,
        "m": m,
        "step_s": statistics.median(step_wall),
        "cpu_s": statistics.median(step_cpu),
        "theory": (p - 1) / (m + p - 1),
    }
    if p == 1:
        return out
    stages, idle = [], []
    for i in range(steps):
        start = min(st["records"][i]["start"] for st in per_stage)
        end = max(e[2] for st in per_stage for e in st["records"][i]["events"] if e[0] in COMPUTE)
        idle.append(
            [
                1
                - sum(e[2] - e[1] for e in st["records"][i]["events"] if e[0] in COMPUTE)
                / (end - start)
                for st in per_stage
            ]
        )
    for s, st in enumerate(per_stage):

        def med(name, field, st=st):
            vals = [
                (e[2] - e[1]) if field == "wall" else e[3]
                for r in st["records"]
                for e in r["events"]
                if e[0] == name
            ]
            return statistics.median(vals) if vals else 0.0

        comm = statistics.median(
            sum(e[2] - e[1] for e in r["events"] if e[0] in SEND_PEER) for r in st["records"]
        )
        stages.append(
            {
                "fwd_cpu": med("ForwardPass", "cpu"),
                "bwd_cpu": med("BackwardPass", "cpu"),
                "fwd_wall": med("ForwardPass", "wall"),
                "bwd_wall": med("BackwardPass", "wall"),
                "load_cpu": med("LoadMicroBatch", "cpu"),
                "comm_s": comm,
                "idle": statistics.median(row[s] for row in idle),
            }
        )
    streams = pipeline_streams(per_stage)
    equal = [{"ForwardPass": 1.0, "BackwardPass": 2.0}] * p
    measured = [
        {"ForwardPass": x["fwd_cpu"], "BackwardPass": x["bwd_cpu"], "LoadMicroBatch": x["load_cpu"]}
        for x in stages
    ]
    out.update(
        stages=stages,
        schedule=replay(streams, equal),
        replay=replay(streams, measured),
        wall=statistics.median(statistics.mean(row) for row in idle),
    )
    return out


def report(rows: list[dict], args: argparse.Namespace, param_m: float) -> None:
    print(
        f"\nmodel: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, SwiGLU "
        f"{args.intermediate}, vocab {args.vocab} ({param_m:.1f}M matmul weights); global batch "
        f"{args.global_batch} x {args.seq_len} tokens, micro batch {args.micro_batch}; fp32, "
        f"TP = DP = 1, 1 thread per process; medians of {args.steps} steps after "
        f"{args.warmup} warm-up"
    )
    print("2-core CPU VM: absolute times are not GPU-like, and PP = 4 runs 4 processes on 2 cores.")
    print(
        f"\n{'PP':>2} {'m':>3} {'step ms':>8} {'CPU s/step':>10} {'theory':>7} "
        f"{'schedule':>8} {'replay':>7} {'wall':>6}"
    )
    for r in rows:
        cells = [f"{100 * r[k]:>6.1f}%" if k in r else f"{'-':>7}" for k in ("schedule", "replay")]
        wall = f"{100 * r['wall']:>5.1f}%" if "wall" in r else f"{'-':>6}"
        print(
            f"{r['p']:>2} {r['m']:>3} {1e3 * r['step_s']:>8.0f} {r['cpu_s']:>10.2f} "
            f"{100 * r['theory']:>6.1f}% {cells[0]:>8} {cells[1]} {wall}"
        )
    print(
        "theory (p-1)/(m+p-1); schedule: DeepSpeed's streams, equal stages, bwd = 2 fwd; replay: "
        "measured per-stage CPU costs; wall: measured idle share (oversubscribed at PP 4)"
    )
    for r in rows:
        if "stages" not in r:
            continue
        print(f"\nPP {r['p']}: per stage (ms per micro batch; idle share of the pipeline phase)")
        print(
            f"{'stage':>5} {'fwd cpu':>8} {'bwd cpu':>8} {'fwd wall':>9} {'bwd wall':>9} "
            f"{'p2p wait/step':>13} {'idle (wall)':>11}"
        )
        for s, x in enumerate(r["stages"]):
            print(
                f"{s:>5} {1e3 * x['fwd_cpu']:>8.1f} {1e3 * x['bwd_cpu']:>8.1f} "
                f"{1e3 * x['fwd_wall']:>9.1f} {1e3 * x['bwd_wall']:>9.1f} "
                f"{1e3 * x['comm_s']:>13.0f} {100 * x['idle']:>10.1f}%"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", default="1,2,4", help="pipeline degrees (= world sizes), comma list")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    results.add_argument(ap)
    args = ap.parse_args()
    rec = results.Record("pipeline", "tools/bench/pipeline.py")

    repo = Path(__file__).resolve().parents[2]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(repo / ".cache" / "torch_extensions"))
    from zenlm.config import load_config
    from zenlm.metrics.throughput import matmul_params
    from zenlm.testing.distributed import run_distributed

    m = args.global_batch // args.micro_batch
    rows = []
    with tempfile.TemporaryDirectory(prefix="zenlm-bench-") as run_dir:
        for pp in (int(x) for x in args.pp.split(",")):
            t0 = time.perf_counter()
            ov = overrides(args, pp, run_dir)
            outs = run_distributed(
                rank_worker, pp, args=(ov, args.warmup, args.steps), threads_per_rank=1
            )
            rows.append(analyse(outs, m))
            print(f"PP {pp}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = load_config(None, overrides(args, 1, "runs"))
    report(rows, args, matmul_params(cfg.model) / 1e6)
    print(f"\nload average (1, 5, 15 min) at the end: {os.getloadavg()}")
    record(rec, rows, args, matmul_params(cfg.model) / 1e6)
    rec.write(args.results, {"rows": rows})


def record(rec: results.Record, rows: list[dict], args: argparse.Namespace, param_m: float) -> None:
    """The two tables and the summary of docs/benchmarks.md's "Pipeline bubble"."""

    def pct(r: dict, k: str) -> str:
        return f"{100 * r[k]:.1f}%" if k in r else "-"

    table = [
        [
            str(r["p"]),
            str(r["m"]),
            f"{1e3 * r['step_s']:.0f}",
            f"{r['cpu_s']:.2f}",
            pct(r, "theory") if r["p"] > 1 else "0",
            pct(r, "schedule"),
            pct(r, "replay"),
            pct(r, "wall"),
        ]
        for r in rows
    ]
    setup = (
        f"Model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, SwiGLU "
        f"{args.intermediate}, vocab {args.vocab} ({param_m:.1f}M matmul weights); global batch "
        f"{args.global_batch} x {args.seq_len} tokens, micro batch {args.micro_batch}; fp32, TP = "
        f"DP = 1, 1 thread per process; medians of {args.steps} steps after {args.warmup} warm-up."
    )
    rec.table(
        "pipeline",
        [
            "PP",
            "m",
            "step ms",
            "CPU s per step (all ranks)",
            "theory",
            "schedule",
            "replay",
            "wall",
        ],
        table,
        [setup],
    )
    stages = []
    for r in rows:
        for s, x in enumerate(r.get("stages", [])):
            stages.append(
                [
                    str(r["p"]),
                    str(s),
                    f"{1e3 * x['fwd_cpu']:.1f}",
                    f"{1e3 * x['bwd_cpu']:.1f}",
                    f"{1e3 * x['comm_s']:.0f} ms",
                    f"{100 * x['idle']:.1f}%",
                ]
            )
    rec.table(
        "pipeline_stages",
        [
            "PP",
            "stage",
            "forward (ms, CPU)",
            "backward (ms, CPU)",
            "p2p wait per step (wall)",
            "idle (wall)",
        ],
        stages,
    )
    piped = [r for r in rows if r["p"] > 1]
    rec.summary(
        "pipeline bubble vs (p-1)/(m+p-1)",
        "report",
        "; ".join(
            f"PP{r['p']} m{r['m']}: replay {100 * r['replay']:.1f}% vs {100 * r['theory']:.1f}%"
            for r in piped
        ),
        None,
    )


if __name__ == "__main__":
    main()
