"""Benchmark: tokens/s of zenlm's preprocess pipeline vs SentencePiece's own batch encode.

    python tools/bench/preprocess.py                # ~24 MB of Python stdlib source, all cores
    python tools/bench/preprocess.py --mb 100 --workers 8 --repeats 3 --pool thread

Both sides run in this process on the same cores and the same text: the baseline is
``sp.encode(docs, num_threads=N)`` on documents already in memory; zenlm's side is the whole
pipeline (read JSONL from disk, split by hash, encode, EOS, pack, write tar shards with sha256,
manifest). The input is generated from the Python standard library's source files, which exist on
every machine. Target: zenlm / baseline >= 0.8. The best of --repeats runs is reported for each.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import results

from zenlm.data.tokenizer import load_tokenizer, train_tokenizer
from zenlm.data.writer import preprocess_corpus

TARGET = 0.8


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (all threads): load-insensitive cost."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def stdlib_documents(max_bytes: int) -> list[str]:
    """Source files of the Python standard library, in a fixed order, up to max_bytes of text."""
    root = sysconfig.get_paths()["stdlib"]
    docs, size = [], 0
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" in path:
            continue
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text.encode("utf-8"))
        if size >= max_bytes:
            break
    return docs


def write_jsonl(docs: list[str], path: Path, files: int) -> list[Path]:
    """The documents as `files` JSONL files (several files, as a real corpus has)."""
    paths = [path / f"part-{i:03d}.jsonl" for i in range(files)]
    per = -(-len(docs) // files)
    for i, p in enumerate(paths):
        with open(p, "w", encoding="utf-8") as f:
            for d in docs[i * per : (i + 1) * per]:
                f.write(json.dumps({"text": d}) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mb", type=float, default=24.0, help="MB of text to tokenize")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores for both sides")
    p.add_argument("--tokenizer", default=None, help="existing .model (default: train one)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per side")
    p.add_argument(
        "--pool",
        choices=("thread", "process", "both"),
        default="both",
        help="zenlm encoder pool(s) to measure (thread is the default pipeline)",
    )
    results.add_argument(p)
    a = p.parse_args(argv)
    rec = results.Record("preprocess", "tools/bench/preprocess.py")

    tmp = Path(tempfile.mkdtemp(prefix="zenlm-bench-preprocess-"))
    try:
        docs = stdlib_documents(int(a.mb * 1e6))
        inputs = write_jsonl(docs, tmp, files=4)
        model = a.tokenizer
        if model is None:
            t = time.perf_counter()
            model = str(tmp / "bench.model")
            train_tokenizer([inputs[0]], model, a.vocab_size, max_sentences=20000, progress=False)
            print(
                f"trained a {a.vocab_size}-piece BPE tokenizer in {time.perf_counter() - t:.1f} s"
            )
        sp = load_tokenizer(model).sp
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        print(
            f"input: {len(docs)} documents, {mb:.1f} MB, {len(inputs)} JSONL files; "
            f"{a.workers} workers; seq_len {a.seq_len}"
        )

        pools = ("thread", "process") if a.pool == "both" else (a.pool,)
        best = {"baseline": float("inf"), **{p: float("inf") for p in pools}}
        cpu = dict.fromkeys(best, float("inf"))
        for r in range(a.repeats):  # interleaved, so background load hits every side alike
            t, c = time.perf_counter(), cpu_seconds()
            ids = sp.encode(docs, num_threads=a.workers)
            best["baseline"] = min(best["baseline"], time.perf_counter() - t)
            cpu["baseline"] = min(cpu["baseline"], cpu_seconds() - c)
            tokens = sum(map(len, ids))
            del ids
            for pool in pools:
                out = tmp / f"corpus-{pool}-{r}"
                t, c = time.perf_counter(), cpu_seconds()
                res = preprocess_corpus(
                    inputs,
                    out,
                    model,
                    a.seq_len,
                    64 << 20,
                    valid_fraction=0.01,
                    num_workers=a.workers,
                    pool=pool,
                    progress=False,
                )
                best[pool] = min(best[pool], time.perf_counter() - t)
                cpu[pool] = min(cpu[pool], cpu_seconds() - c)
                m = res.manifest
                stored = sum(s.tokens for s in m.splits.values())
                dropped = sum(m.stats["dropped_tail_tokens"].values())
                eos = sum(m.stats["documents"].values())
                assert stored + dropped == tokens + eos, (stored, dropped, tokens, eos)
                shutil.rmtree(out)

        base_tps = tokens / best["baseline"]
        print(f"\n{'pipeline':<48}{'tokens/s':>12}{'seconds':>9}{'ratio':>7}{'cpu-s':>8}")
        rows = [("SentencePiece sp.encode(docs, num_threads=N)", "baseline")] + [
            (f"zenlm preprocess, {p} pool" + (" (default)" if p == "thread" else ""), p)
            for p in pools
        ]
        table = []
        for name, k in rows:
            tps = tokens / best[k]
            print(f"{name:<48}{tps:>12,.0f}{best[k]:>9.2f}{tps / base_tps:>7.2f}{cpu[k]:>8.2f}")
            table.append(
                [name, f"{tps:,.0f}", f"{best[k]:.2f}", f"{tps / base_tps:.2f}", f"{cpu[k]:.2f}"]
            )
        print("ratio: tokens/s over the baseline's (wall clock, same cores); cpu-s: CPU seconds of")
        print("all threads and worker processes (insensitive to other load on the machine)")
        ratio = best["baseline"] / best[pools[0]]
        verdict = "PASS" if ratio >= TARGET else "BELOW TARGET"
        print(
            f"\nratio {pools[0]} pool / baseline {ratio:.2f}   target >= {TARGET}   {verdict}"
            f"   ({tokens:,} tokens, best of {a.repeats})"
        )
        cpu_ratio = cpu["baseline"] / cpu[pools[0]]
        rec.table(
            "preprocess",
            ["pipeline", "tokens/s", "seconds", "ratio", "CPU s"],
            table,
            [
                f"Input: {len(docs)} documents of Python stdlib source, {mb:.1f} MB in "
                f"{len(inputs)} JSONL files, {tokens:,} tokens; {a.workers} workers; seq_len "
                f"{a.seq_len}; best of {a.repeats} runs per side. ratio: tokens/s over the "
                "baseline's (wall clock, same cores); CPU s: CPU seconds of all threads and "
                f"worker processes. CPU-time ratio of the default (thread) pool: {cpu_ratio:.2f}."
            ],
        )
        rec.summary(
            "preprocess vs SentencePiece encode",
            f">= {TARGET}",
            f"{ratio:.2f} (CPU-time ratio {cpu_ratio:.2f})",
            ratio >= TARGET,
        )
        rec.write(
            a.results,
            {
                "tokens": tokens,
                "best_s": best,
                "cpu_s": cpu,
                "ratio": ratio,
                "cpu_ratio": cpu_ratio,
            },
        )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
