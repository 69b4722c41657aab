"""Verify zenlm corpora completely: manifest, every shard's tar structure, token ids, document
starts and sha256 against the manifest.

    python tools/verify_corpus.py corpus/web [corpus/code ...] [--all] [--tokenizer tok.model]

Prints a summary per split and exits 0 when everything is sound; otherwise one
`error: <shard>: <what is wrong>` line for the first bad shard and exit code 2 (`--all` checks
every shard, lists each bad one on stderr as `bad: ...`, and ends with one `error:` line that
counts them). It reads every byte once; `--workers N` checks N shards at a time (processes).
See docs/data.md for what it costs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zenlm.data import format as fmt
from zenlm.data import shards
from zenlm.data.format import CorpusError
from zenlm.data.readers import BadInputError, ToolArgumentParser
from zenlm.data.shards import ShardSpec, verify_shard_job
from zenlm.runtime.cli import run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ToolArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("corpora", nargs="+", help="corpus directories (each holds manifest.json)")
    p.add_argument("--all", action="store_true", help="check every shard, list every bad one")
    p.add_argument(
        "--split", choices=fmt.SPLITS, action="append", help="only this split (repeatable)"
    )
    p.add_argument(
        "--tokenizer", help="also require the manifest's tokenizer fingerprint to be this model's"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="shards checked at a time, one process each (default 1)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _results(jobs: list[tuple[ShardSpec, str, int]], workers: int) -> Iterator[tuple[int, str]]:
    """verify_shard_job of every job, in job order (so 'the first bad shard' is the manifest's first)."""
    if workers <= 1:
        yield from map(verify_shard_job, jobs)
        return
    with ProcessPoolExecutor(workers, mp.get_context("spawn")) as ex:
        try:
            yield from ex.map(verify_shard_job, jobs)
        finally:
            ex.shutdown(cancel_futures=True)


def check_manifest(corpus: Path, m: fmt.CorpusManifest, fingerprint: str | None) -> None:
    """What the manifest alone must satisfy (CorpusError naming manifest.json otherwise)."""
    where = corpus / fmt.MANIFEST_NAME
    if m.dtype not in ("<u2", "<u4"):
        raise CorpusError(f"{where}: unsupported token dtype {m.dtype!r} (expected '<u2' or '<u4')")
    if m.seq_len < 1:
        raise CorpusError(f"{where}: seq_len {m.seq_len} is not >= 1")
    vocab = m.tokenizer.vocab_size
    if not 0 < vocab <= np.iinfo(np.dtype(m.dtype)).max + 1:
        raise CorpusError(f"{where}: vocab_size {vocab} does not fit token dtype {m.dtype!r}")
    fmt.check_tokenizer(m, fingerprint, str(where))
    seen: set[str] = set()
    for split, info in m.splits.items():
        if split not in fmt.SPLITS:
            raise CorpusError(f"{where}: unknown split {split!r}")
        for s in info.shards:
            if Path(s.path).name != s.path or not s.path.startswith(split + "-"):
                raise CorpusError(f"{where}: shard name {s.path!r} is not a {split} shard file")
            if s.path in seen:
                raise CorpusError(f"{where}: shard {s.path} listed twice")
            seen.add(s.path)
            if s.tokens != s.samples * m.tokens_per_sample:
                raise CorpusError(
                    f"{where}: {s.path} lists {s.tokens} tokens for {s.samples} samples of "
                    f"seq_len + 1 = {m.tokens_per_sample}"
                )


def shard_specs(corpus: Path, m: fmt.CorpusManifest, split: str) -> list[ShardSpec]:
    return shards.shard_specs(corpus, m, split)  # (the loader's: loss-mask records included)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _main(a: argparse.Namespace) -> int:
    if a.workers < 1:
        raise BadInputError(f"--workers must be >= 1, got {a.workers}")
    fingerprint = None
    if a.tokenizer:
        from zenlm.data.tokenizer import fingerprint_file

        fingerprint = fingerprint_file(a.tokenizer)
    splits = a.split or list(fmt.SPLITS)
    plans = []  # (corpus, manifest, {split: specs})
    for c in a.corpora:
        corpus = Path(c)
        if not corpus.is_dir():
            raise CorpusError(f"{corpus}: not a corpus directory (does not exist or is a file)")
        m = fmt.load_manifest(corpus)
        check_manifest(corpus, m, fingerprint)
        plans.append((corpus, m, {s: shard_specs(corpus, m, s) for s in splits}))

    total = sum(_size(sp.path) for _, _, by in plans for specs in by.values() for sp in specs)
    jobs = [
        (spec, m.dtype, m.tokenizer.vocab_size)
        for _, m, by in plans
        for specs in by.values()
        for spec in specs
    ]
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=a.no_progress)
    bad: list[str] = []
    results = _results(jobs, a.workers)
    start = time.perf_counter()
    try:
        for corpus, m, by_split in plans:
            print(
                f"{corpus}: seq_len {m.seq_len}, dtype {m.dtype}, vocab_size "
                f"{m.tokenizer.vocab_size}, tokenizer {m.tokenizer.fingerprint[:12]}…"
            )
            for split, specs in by_split.items():
                n_bad, tokens = len(bad), 0
                for spec in specs:
                    n, error = next(results)
                    bar.update(_size(spec.path))
                    tokens += n
                    if error is not None:
                        if not a.all:
                            raise CorpusError(error)
                        bad.append(error)
                        bar.write(f"bad: {error}", file=sys.stderr)
                samples = sum(sp.samples for sp in specs)
                verdict = "ok" if len(bad) == n_bad else f"{len(bad) - n_bad} bad shards"
                print(
                    f"  {split}: {len(specs)} shards, {samples} samples, {tokens} tokens: {verdict}"
                )
    finally:
        results.close()
        bar.close()
    shards = len(jobs)
    seconds = time.perf_counter() - start
    print(
        f"verified {len(plans)} corpora, {shards} shards, {total / 1e6:.1f} MB in {seconds:.1f} s"
        f" ({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)"
    )
    if bad:
        raise CorpusError(f"{len(bad)} of {shards} shards bad; first: {bad[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return run_tool(lambda: _main(a))


if __name__ == "__main__":
    sys.exit(main())
