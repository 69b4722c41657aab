"""Tokens/s of the zenlm loader against reading the same tar shards raw, as a ratio in one run.

    .venv/bin/python tools/bench/loader.py                 # ~80 MB corpus, under a minute
    .venv/bin/python tools/bench/loader.py --shards 8 --samples-per-shard 5000 --repeats 5

Writes its own corpus (seq_len 2048, uint16 ids) to a temp dir, then alternates full passes:
- raw: the faster of (a) webdataset `wds.WebDataset(urls, shardshuffle=False)` with no decoding
  and (b) stdlib `tarfile` streaming, each reading every member's bytes in file order; tokens
  counted from the `.tokens` byte length. No conversion, no batching: a lower bound on the cost
  of touching the data.
- zenlm: a fresh `build_train_loader` (so shard indexing is inside the timing), one epoch of
  micro batches in the shuffled global order, each delivered as int64 input_ids / labels /
  position_ids and int32 doc_ids tensors (num_workers=0: one process).
The page cache is warm for both (the corpus was just written). The median of the repeats is
reported; targets: ratio >= 0.8 and zenlm >= 10M tokens/s per process.
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from zenlm.data import build_train_loader
from zenlm.data import format as fmt
from zenlm.testing.corpus import write_corpus

SEQ_LEN = 2048


def raw_webdataset(urls: list[str]) -> int:
    tokens = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        tokens += len(sample[fmt.TOKENS_EXT]) // 2
    return tokens


def raw_tarfile(urls: list[str]) -> int:
    tokens = 0
    for url in urls:
        with tarfile.open(url, mode="r:") as tf:
            for info in tf:
                data = tf.extractfile(info).read()
                if info.name.endswith("." + fmt.TOKENS_EXT):
                    tokens += len(data) // 2
    return tokens


def zenlm_epoch(corpus: Path, samples: int, micro_batch_size: int, seed: int) -> int:
    loader = build_train_loader(
        [(corpus, 1.0)], SEQ_LEN, micro_batch_size, micro_batch_size, 0, 1, seed=seed
    )
    tokens = 0
    for _ in range(samples // micro_batch_size):
        tokens += next(loader)["input_ids"].numel()
    return tokens


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    tokens = fn(*args)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--samples-per-shard", type=int, default=2500, help="~5.4 MB per 1000")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="zenlm-bench-") as tmp:
        corpus = Path(tmp) / "corpus"
        t0 = time.perf_counter()
        write_corpus(corpus, [args.samples_per_shard] * args.shards, SEQ_LEN, vocab_size=32000)
        urls = sorted(str(p) for p in corpus.glob("train-*.tar"))
        size_mb = sum(Path(u).stat().st_size for u in urls) / 1e6
        samples = args.shards * args.samples_per_shard
        print(
            f"corpus: {len(urls)} shards, {samples} samples of {SEQ_LEN + 1} uint16 tokens, "
            f"{size_mb:.0f} MB, written in {time.perf_counter() - t0:.1f} s"
        )

        results: dict[str, list[float]] = {"wds": [], "tarfile": [], "zenlm": []}
        for rep in range(args.repeats):  # alternate so drift and noise hit every reader alike
            results["wds"].append(timed(raw_webdataset, urls))
            results["zenlm"].append(timed(zenlm_epoch, corpus, samples, args.micro_batch_size, rep))
            results["tarfile"].append(timed(raw_tarfile, urls))
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in results.items():
            runs = " ".join(f"{x / 1e6:.1f}" for x in v)
            print(f"{k:>8}: median {med[k] / 1e6:7.1f} M tokens/s   (runs: {runs})")
        baseline = max(med["wds"], med["tarfile"])
        name = "wds" if med["wds"] >= med["tarfile"] else "tarfile"
        ratio = med["zenlm"] / baseline
        per_run = np.array(results["zenlm"]) / np.maximum(results["wds"], results["tarfile"])
        print(f"baseline (raw {name}): {baseline / 1e6:.1f} M tokens/s")
        print(f"zenlm loader:         {med['zenlm'] / 1e6:.1f} M tokens/s")
        print(f"ratio zenlm/raw:      {ratio:.2f} (per repeat {np.round(per_run, 2).tolist()})")
        print(
            f"targets: ratio >= 0.8 [{'PASS' if ratio >= 0.8 else 'FAIL'}], "
            f">= 10 M tokens/s [{'PASS' if med['zenlm'] >= 10e6 else 'FAIL'}]"
        )


if __name__ == "__main__":
    main()
