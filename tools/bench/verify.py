"""What verifying a corpus costs: sha256 and the full check against a raw read of the same bytes.

    .venv/bin/python tools/bench/verify.py                    # ~260 MB corpus, about a minute
    .venv/bin/python tools/bench/verify.py --shards 8 --samples-per-shard 20000 --repeats 5

Writes its own corpus (seq_len 2048, uint16 ids) to a temp dir, then alternates passes over all
shards, each side in the same page-cache state:
- raw read: every shard read start to end in 8 MiB blocks (readinto, no other work): the
  baseline, what touching the bytes costs at all;
- sha256: hashlib.file_digest of every shard, what `verify_checksums=True` adds per shard and
  process in the loader (zenlm.data.shards.build_index);
- loader open, verify off / on: ShardCache.get of every shard (stat, tar index, and with verify
  the sha256), i.e. the loader's first-open cost;
- verify_shard: zenlm.data.shards.verify_shard on every shard in this process (sha256, tar
  index, every token id < vocab, doc starts): what tools/verify_corpus.py does per shard;
- tools/verify_corpus.py on the corpus as a subprocess, with 1 worker and with one per core
  (interpreter and worker start-up included).
"cold" passes first drop the shards' pages from the page cache (posix_fadvise DONTNEED, no root
needed; other files' cache is left alone), so they read from the disk; "warm" passes read from
memory. Reported: median MB/s of the repeats and the ratio to the raw read in the same state
(1.00 = as fast as reading the bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import results

from zenlm.data.shards import ShardCache, ShardSpec, verify_shard
from zenlm.testing.corpus import write_corpus

TOOLS = Path(__file__).resolve().parents[1]
SEQ_LEN = 2048
VOCAB = 50000  # > 32767: write_corpus puts index & 0x7FFF in token 0
BLOCK = 8 << 20


def drop_cache(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(specs: list[ShardSpec]) -> None:
    buf = bytearray(BLOCK)
    for s in specs:
        with open(s.path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def sha256_only(specs: list[ShardSpec]) -> None:
    for s in specs:
        with open(s.path, "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == s.sha256


def loader_open(verify: bool) -> Callable[[list[ShardSpec]], None]:
    def run(specs: list[ShardSpec]) -> None:
        cache = ShardCache(verify_checksums=verify, max_open=len(specs) + 1)
        try:
            for s in specs:
                cache.get(s)
        finally:
            cache.close()

    return run


def verify_all(specs: list[ShardSpec]) -> None:
    for s in specs:
        verify_shard(s, "<u2", VOCAB)


def verify_tool(workers: int) -> Callable[[list[ShardSpec]], None]:
    """tools/verify_corpus.py run as a user runs it (interpreter start-up included)."""

    def run(specs: list[ShardSpec]) -> None:
        corpus = str(Path(specs[0].path).parent)
        cmd = [sys.executable, str(TOOLS / "verify_corpus.py"), corpus, "--no-progress"]
        subprocess.run([*cmd, "--workers", str(workers)], check=True, capture_output=True)

    return run


SIDES = {
    "raw read (baseline)": raw_read,
    "sha256 (hashlib.file_digest)": sha256_only,
    "loader first open, verify off": loader_open(False),
    "loader first open, verify on": loader_open(True),
    "verify_shard (in process)": verify_all,
    "tools/verify_corpus.py": verify_tool(1),
    f"tools/verify_corpus.py --workers {os.cpu_count()}": verify_tool(os.cpu_count() or 1),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--samples-per-shard", type=int, default=12000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where to write the corpus (default: a temp dir)")
    results.add_argument(p)
    a = p.parse_args(argv)
    rec = results.Record("verify", "tools/bench/verify.py")

    tmp = Path(tempfile.mkdtemp(prefix="zenlm-bench-verify-", dir=a.dir))
    try:
        t = time.perf_counter()
        m = write_corpus(tmp / "c", [a.samples_per_shard] * a.shards, SEQ_LEN, vocab_size=VOCAB)
        token_bytes = m.tokens_per_sample * np.dtype(m.dtype).itemsize
        specs, first = [], 0
        for s in m.splits["train"].shards:
            specs.append(
                ShardSpec(str(tmp / "c" / s.path), s.samples, first, s.sha256, token_bytes)
            )
            first += s.samples
        paths = [s.path for s in specs]
        total = sum(os.stat(x).st_size for x in paths)
        print(
            f"corpus: {a.shards} shards, {total / 1e6:.0f} MB, {first} samples of {SEQ_LEN + 1} "
            f"uint16 tokens (written in {time.perf_counter() - t:.0f} s); {a.repeats} repeats, "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
        )
        seconds: dict[tuple[str, str], list[float]] = {}
        for _ in range(a.repeats):  # interleaved: background load hits every side alike
            for state in ("cold", "warm"):
                for name, fn in SIDES.items():
                    if state == "cold":
                        drop_cache(paths)
                    else:
                        raw_read(specs)  # make sure everything is in memory
                    t = time.perf_counter()
                    fn(specs)
                    seconds.setdefault((state, name), []).append(time.perf_counter() - t)

        print(f"\n{'pass':<40}{'cold MB/s':>11}{'ratio':>7}{'warm MB/s':>11}{'ratio':>7}")
        base = {
            st: statistics.median(seconds[(st, "raw read (baseline)")]) for st in ("cold", "warm")
        }
        table, ratio = [], {}
        for name in SIDES:
            row = f"{name:<40}"
            cells = [name]
            for st in ("cold", "warm"):
                sec = statistics.median(seconds[(st, name)])
                ratio[f"{st}/{name}"] = base[st] / sec
                row += f"{total / 1e6 / sec:>11,.0f}{base[st] / sec:>7.2f}"
                cells += [f"{total / 1e6 / sec:,.0f}", f"{base[st] / sec:.2f}"]
            print(row)
            table.append(cells)
        print(
            "ratio: throughput over the raw read's in the same page-cache state (medians); "
            f"load average now {os.getloadavg()[0]:.1f}"
        )
        rec.table(
            "verify",
            ["pass", "cold MB/s", "ratio", "warm MB/s", "ratio"],
            table,
            [
                f"Corpus: {a.shards} shards, {total / 1e6:.0f} MB, {first:,} samples of "
                f"{SEQ_LEN + 1} uint16 tokens; medians of {a.repeats} passes per side and state; "
                "ratio = throughput over the raw read's in the same page-cache state."
            ],
        )
        tool = "tools/verify_corpus.py"
        rec.summary(
            "corpus verification vs raw read",
            "report",
            f"sha256 {ratio['cold/sha256 (hashlib.file_digest)']:.2f}, {tool} "
            f"{ratio[f'cold/{tool}']:.2f} of a cold read",
            None,
        )
        rec.write(
            a.results,
            {
                "bytes": total,
                "seconds": {f"{k[0]}/{k[1]}": v for k, v in seconds.items()},
                "ratio": ratio,
            },
        )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
