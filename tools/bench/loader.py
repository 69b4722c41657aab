"""Tokens/s of the zenlm loader against the physical limit: reading the same shard bytes raw.

    .venv/bin/python tools/bench/loader.py                  # ~300 MB corpus, about a minute
    .venv/bin/python tools/bench/loader.py --shards 8 --samples-per-shard 8000 --repeats 7

Writes its own corpus (seq_len 4096, uint16 ids, document boundaries in every sample) to a temp
dir, then alternates full passes over it, each side in the same page-cache state:
- raw read: every shard read start to end with os.readv into one 8 MiB buffer, nothing else:
  the physical limit of getting these bytes into the process (page cache or disk);
- read + convert: the same large reads, then each micro batch's token records turned into the
  tensors the loader delivers (int64 input_ids / labels / position_ids, int32 doc_ids), in file
  order, without document boundaries, shuffling or checks: what the delivered format costs
  by itself (8 + 8 + 8 + 4 = 28 bytes written per 2-byte token read);
- read + tokens: the same, but each micro batch delivered as one (batch, seq_len + 1) int32
  token tensor (4 bytes per token), from which labels, positions and doc ids could be derived
  on the accelerator: what a leaner batch format would cost;
- zenlm: a fresh `build_train_loader` per pass (shard indexing included), num_workers=0 (one
  process), one epoch of micro batches in the shuffled global order, each read with one pread
  per sample and collated with document positions, doc ids and the vocabulary check.
"warm" passes find the shards in the page cache; "cold" passes drop the shards' pages first
(fsync + posix_fadvise DONTNEED on each shard; no root needed, other files' cache untouched;
residency checked with util-linux `fincore` where installed, falling back to
/proc/sys/vm/drop_caches; cold is skipped, saying why, where neither empties the cache).
Tokens/s = delivered input positions (samples x seq_len) / seconds, the same count for every
side; ratio = zenlm / raw read in the same state, medians of the repeats.

Targets (issue 12): zenlm >= 0.5 of the raw read per process, and the data-loader wait under 1%
of the step time at the token rate of a 1B model (configs/models/1b.yaml, seq 4096) on one H200,
computed as 0.5 x 989 TFLOP/s (dense bf16 peak, an assumed 50% MFU) / flops_per_token; with
num_workers=0 the whole loading time is on the step's critical path, so the wait share is
(H200 token rate) / (loader token rate, cold).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import results
import torch

from zenlm.data import build_train_loader
from zenlm.data.shards import ShardCache, shard_specs
from zenlm.testing.corpus import write_corpus

REPO = Path(__file__).resolve().parents[2]
BLOCK = 8 << 20
TARGET_RATIO = 0.5
TARGET_WAIT = 0.01
H200_PEAK_TFLOPS = 989.0  # H200 SXM dense bf16 (datasheet 1,979 with sparsity, halved)
ASSUMED_MFU = 0.5
MODEL_SEQ_LEN = 4096


def resident_bytes(paths: list[str]) -> int | None:
    """Bytes of these files in the page cache (fincore), or None where fincore is missing."""
    if shutil.which("fincore") is None:
        return None
    r = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *paths],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        return None
    return sum(int(x) for x in r.stdout.split())


def drop_cache(paths: list[str]) -> tuple[bool, str]:
    """Evict the shards' pages; (True, method) when they are out of the cache (or unverifiable)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    total = sum(os.stat(p).st_size for p in paths)
    left = resident_bytes(paths)
    if left is None:
        return True, "posix_fadvise DONTNEED (residency not checked: no fincore)"
    if left <= 0.01 * total:
        return True, "posix_fadvise DONTNEED, checked with fincore"
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return (
            False,
            f"{left / total:.0%} of the shards stay cached after DONTNEED; drop_caches: {e}",
        )
    left = resident_bytes(paths) or 0
    if left <= 0.01 * total:
        return True, "/proc/sys/vm/drop_caches (DONTNEED left pages), checked with fincore"
    return False, f"{left / total:.0%} of the shards stay cached even after drop_caches"


def raw_read(paths: list[str], **_) -> None:
    buf = bytearray(BLOCK)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)


def read_and_convert(
    paths: list[str], spans: dict[str, list], seq_len: int, mbs: int, tokens_only: bool = False
) -> None:
    """Large reads, then per micro batch from the bytes in memory: the loader's four tensors,
    or (tokens_only) one (mbs, seq_len + 1) int32 token tensor, 4 bytes per token."""
    positions = np.arange(seq_len, dtype=np.int64)
    for p in paths:
        size = os.stat(p).st_size
        data = bytearray(size)
        view = memoryview(data)
        fd = os.open(p, os.O_RDONLY)
        try:
            got = 0
            while got < size:
                got += os.readv(fd, [view[got : got + BLOCK]])
        finally:
            os.close(fd)
        index = spans[p]
        for first in range(0, len(index) - mbs + 1, mbs):
            rows = np.stack(
                [
                    np.frombuffer(data, np.uint16, seq_len + 1, off + t_rel)
                    for off, _, t_rel, *_ in index[first : first + mbs]
                ]
            )  # (mbs, seq_len + 1) uint16
            if tokens_only:
                batch = {"tokens": torch.from_numpy(rows.astype(np.int32))}
                continue
            batch = {
                "input_ids": torch.from_numpy(rows[:, :-1].astype(np.int64)),
                "labels": torch.from_numpy(rows[:, 1:].astype(np.int64)),
                "position_ids": torch.from_numpy(np.broadcast_to(positions, (mbs, seq_len)).copy()),
                "doc_ids": torch.from_numpy(np.zeros((mbs, seq_len), np.int32)),
            }
        del batch


def zenlm_epoch(corpus: Path, samples: int, seq_len: int, mbs: int, seed: int) -> None:
    loader = build_train_loader([(corpus, 1.0)], seq_len, mbs, mbs, 0, 1, seed=seed)
    for _ in range(samples // mbs):
        next(loader)
    loader.close()


def h200_token_rate() -> tuple[float, float]:
    """(tokens/s of a 1B model on one H200 at the assumed MFU, FLOPs per token)."""
    from zenlm.config import load_config
    from zenlm.metrics.throughput import flops_per_token

    model = load_config(str(REPO / "configs" / "models" / "1b.yaml"), []).model
    f = flops_per_token(model, MODEL_SEQ_LEN)
    return ASSUMED_MFU * H200_PEAK_TFLOPS * 1e12 / f, f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--samples-per-shard", type=int, default=8000, help="~9.2 MB per 1000")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-cold", action="store_true", help="warm page cache only")
    results.add_argument(ap)
    args = ap.parse_args()
    rec = results.Record("loader", "tools/bench/loader.py")

    tmp = Path(tempfile.mkdtemp(prefix="zenlm-bench-loader-"))
    try:
        corpus = tmp / "corpus"
        t0 = time.perf_counter()
        manifest = write_corpus(
            corpus, [args.samples_per_shard] * args.shards, args.seq_len, vocab_size=32000
        )
        specs = shard_specs(corpus, manifest, "train")
        paths = [s.path for s in specs]
        size = sum(os.stat(p).st_size for p in paths)
        samples = args.shards * args.samples_per_shard
        tokens = (samples // args.micro_batch_size) * args.micro_batch_size * args.seq_len
        cache = ShardCache(max_open=len(specs) + 1)  # the floor's sample offsets, untimed
        spans = {s.path: cache.get(s)[1] for s in specs}
        cache.close()
        print(
            f"corpus: {len(paths)} shards, {samples} samples of {args.seq_len + 1} uint16 tokens, "
            f"{size / 1e6:.0f} MB, written in {time.perf_counter() - t0:.1f} s; micro batch "
            f"{args.micro_batch_size}; {os.cpu_count()} cores, load average {results.load1()}"
        )
        common = dict(paths=paths, spans=spans, seq_len=args.seq_len, mbs=args.micro_batch_size)
        sides: dict[str, Callable[[int], None]] = {
            "raw": lambda rep: raw_read(**common),
            "convert": lambda rep: read_and_convert(**common),
            "tokens": lambda rep: read_and_convert(**common, tokens_only=True),
            "zenlm": lambda rep: zenlm_epoch(
                corpus, samples, args.seq_len, args.micro_batch_size, rep
            ),
        }
        cold_ok, cold_how = (False, "--no-cold") if args.no_cold else drop_cache(paths)
        states = ("warm", "cold") if cold_ok else ("warm",)
        if not cold_ok:
            print(f"cold cache skipped: {cold_how}")
        seconds: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats):  # alternate: drift and other load hit every side alike
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for state in states:
                for name in order:
                    if state == "cold":
                        ok, how = drop_cache(paths)
                        if not ok:
                            raise SystemExit(f"cold pass impossible after all: {how}")
                    else:
                        raw_read(paths)  # everything in memory
                    t = time.perf_counter()
                    sides[name](rep)
                    seconds.setdefault((state, name), []).append(time.perf_counter() - t)

        rate = {k: tokens / statistics.median(v) for k, v in seconds.items()}
        gpu_rate, fpt = h200_token_rate()
        labels = {
            "raw": "raw read (os.readv, 8 MiB): the limit",
            "convert": "read + convert to the batch tensors only",
            "tokens": "read + tokens as one int32 tensor only",
            "zenlm": "zenlm build_train_loader, num_workers=0",
        }
        rows, data = [], {"seconds": {f"{s}/{n}": v for (s, n), v in seconds.items()}}
        for name in sides:
            row = [labels[name]]
            for state in states:
                r = rate[(state, name)]
                base = rate[(state, "raw")]
                row += [f"{r / 1e6:,.0f}M", f"{r * size / tokens / 1e6:,.0f}", f"{r / base:.3f}"]
            rows.append(row)
        print()
        for r in rows:
            print("  ".join(f"{c:>12}" if i else f"{c:<44}" for i, c in enumerate(r)))
        ratio = {s: rate[(s, "zenlm")] / rate[(s, "raw")] for s in states}
        worst = min(rate[(s, "zenlm")] for s in states)
        wait = gpu_rate / worst
        columns = ["pass"]
        for state in states:
            columns += [f"{state} tokens/s", f"{state} MB/s", f"{state} ratio"]
        notes = [
            f"Corpus: {len(paths)} shards, {size / 1e6:.0f} MB, {samples:,} samples of "
            f"{args.seq_len + 1} uint16 tokens; micro batch {args.micro_batch_size}; medians of "
            f"{args.repeats} passes per side and state; MB/s counts shard bytes. Cold: {cold_how}."
            if cold_ok
            else f"Cold cache skipped: {cold_how}.",
            f"1B model on one H200 (configs/models/1b.yaml, seq {MODEL_SEQ_LEN}): "
            f"{fpt / 1e9:.2f} GFLOP per token; at an assumed {ASSUMED_MFU:.0%} MFU of "
            f"{H200_PEAK_TFLOPS:g} TFLOP/s dense bf16 that is {gpu_rate:,.0f} tokens/s, so the "
            f"loader's slowest rate here ({worst / 1e6:.1f}M tokens/s, one process, loading on "
            f"the critical path) costs {100 * wait:.2f}% of the step time "
            f"(target < {100 * TARGET_WAIT:.0f}%).",
        ]
        rec.table("loader", columns, rows, notes)
        met_ratio = all(r >= TARGET_RATIO for r in ratio.values())
        rec.summary(
            "loader vs raw read of the shards",
            f">= {TARGET_RATIO} of the raw read per process",
            ", ".join(f"{s} {ratio[s]:.3f}" for s in states) + f" ({worst / 1e6:.0f}M tokens/s)",
            met_ratio,
        )
        rec.summary(
            "loader wait, 1B model on one H200",
            f"< {100 * TARGET_WAIT:.0f}% of step time",
            f"{100 * wait:.2f}% ({gpu_rate / 1e3:.1f}k tokens/s at {ASSUMED_MFU:.0%} MFU)",
            wait < TARGET_WAIT,
        )
        print("\n" + "\n".join(notes))
        print(
            f"targets: ratio >= {TARGET_RATIO} [{'PASS' if met_ratio else 'FAIL'}] "
            f"({', '.join(f'{s} {v:.3f}' for s, v in ratio.items())}); wait < 1% "
            f"[{'PASS' if wait < TARGET_WAIT else 'FAIL'}]; load average now {results.load1()}"
        )
        data.update(
            tokens_per_pass=tokens,
            shard_bytes=size,
            tokens_per_s={f"{s}/{n}": v for (s, n), v in rate.items()},
            ratio=ratio,
            h200_1b_tokens_per_s=gpu_rate,
            flops_per_token_1b=fpt,
            loader_wait_share=wait,
            cold=cold_how,
        )
        rec.write(args.results, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
