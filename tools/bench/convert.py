"""HF import: peak memory against the largest tensor, throughput against a file copy.

    python tools/bench/convert.py [--layers 5 --hidden 4096 --intermediate 11008 --vocab 32000
                                   --repeats 3 --dir /tmp]     # ~2 min (3 repeats)

Writes a synthetic Llama-7B-shaped Hugging Face checkpoint (random bf16 tensors, `--layers`
blocks, shards of ~1 GB with model.safetensors.index.json, a Llama config.json) into a temp dir,
then alternates, in one run:
  - copy: shutil.copyfile of every source shard to a new directory + fsync per file (a durable
    copy of the same bytes on the same disk);
  - import: `python tools/convert.py import SRC OUT` in a subprocess (bf16 read, fp32 write:
    twice the bytes written, CRC-32, fsync, meta.json, rename);
  - raw write: the import's output size written from memory (64 MiB pieces, O_DIRECT as the
    import writes, fsync per 2 GiB file), i.e. what the disk allows for the bytes the import
    must write, as a second baseline.
Before each pass the source shards' pages (and the last copy's) are dropped (posix_fadvise
DONTNEED), so every pass reads from the disk; an untimed buffered write of 2 x the source + 1 GB
comes first (this VM's first use of fresh memory for the page cache is 2-3x slower). MB/s = source bytes / seconds; ratio = import / copy (target >= 0.5), with the
import timed as the whole process (interpreter and torch start-up included) and as the tool's
own time (its printed seconds). Peak RSS of the import process (its VmHWM at exit) is
compared with the largest tensor, as stored (fp32) and as read (bf16): target <= 2 x largest
tensor + 1 GB. Everything is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results

REPO = Path(__file__).resolve().parents[2]


def drop_pages(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_source(path: Path, a: argparse.Namespace) -> tuple[list[Path], dict[str, int]]:
    import torch
    from safetensors.torch import save_file

    h, inner, kv = a.hidden, a.intermediate, a.hidden  # MHA, as Llama-2-7B
    shapes: dict[str, list[int]] = {"model.embed_tokens.weight": [a.vocab, h]}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": [h],
            p + "self_attn.q_proj.weight": [h, h],
            p + "self_attn.k_proj.weight": [kv, h],
            p + "self_attn.v_proj.weight": [kv, h],
            p + "self_attn.o_proj.weight": [h, h],
            p + "post_attention_layernorm.weight": [h],
            p + "mlp.gate_proj.weight": [inner, h],
            p + "mlp.up_proj.weight": [inner, h],
            p + "mlp.down_proj.weight": [h, inner],
        }
    shapes |= {"model.norm.weight": [h], "lm_head.weight": [a.vocab, h]}
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    sizes: dict[str, int] = {}

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shards[-1], name))
        files.append(path / name)
        shards[-1] = {}

    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        t.view(-1)[:] = torch.randn(t.numel(), generator=gen).to(torch.bfloat16) * 0.02
        n = t.numel() * 2
        sizes[name] = n
        if shards[-1] and size + n > a.shard_bytes:
            flush()
            size = 0
        shards[-1][name] = t
        size += n
    flush()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    )
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab,
        "hidden_size": h, "intermediate_size": inner, "num_hidden_layers": a.layers,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "use_cache": True, "initializer_range": 0.02,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return files, sizes


def copy_pass(files: list[Path], dst: Path) -> float:
    dst.mkdir()
    start = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f.name)
        fd = os.open(dst / f.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - start


def raw_write_pass(dst: Path, total: int, direct: bool = True, file_bytes: int = 2 << 30) -> float:
    """Write `total` bytes (the import's output size) from memory into files of file_bytes, in
    64 MiB pieces, with O_DIRECT as the import writes (buffered where refused, or when not
    `direct`), fsync per file: what the disk allows for the import's output alone."""
    import torch

    from zenlm.checkpoint import hf_io

    dst.mkdir()
    piece = hf_io.aligned_empty(64 << 20)
    piece.copy_(torch.frombuffer(bytearray(os.urandom(64 << 20)), dtype=torch.uint8))
    view = memoryview(piece.numpy())
    start = time.perf_counter()
    k = 0
    while total > 0:
        n = -(-min(total, file_bytes) // 4096) * 4096
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = hf_io._open(dst / f"raw-{k}", flags)[0] if direct else os.open(dst / f"raw-{k}", flags)
        try:
            left = n
            while left > 0:
                left -= os.write(fd, view[: min(left, len(view))])
            os.fsync(fd)
        finally:
            os.close(fd)
        total -= min(total, file_bytes)
        k += 1
    return time.perf_counter() - start


# The tool runs under this wrapper, which reports the process's own peak RSS (VmHWM) at exit.
# (ru_maxrss of a child is no good here: Linux carries the forked parent's peak across exec.)
_WRAPPER = """
import atexit, runpy, sys
def peak():
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
    print('PEAK_KIB', hwm.split()[1], file=sys.stderr)
atexit.register(peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def import_pass(src: Path, dst: Path) -> tuple[float, float, int, float]:
    """(wall seconds, the tool's own seconds, peak RSS bytes, CPU seconds) of one import."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    tool = str(REPO / "tools" / "convert.py")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, tool, "import", str(src), str(dst)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise SystemExit(f"import failed:\n{proc.stderr}")
    m = re.search(r", ([\d.]+) s\n", proc.stdout)
    peak = re.search(r"PEAK_KIB (\d+)", proc.stderr)
    return wall, float(m.group(1)) if m else wall, int(peak.group(1)) * 1024 if peak else -1, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-bytes", type=int, default=10**9)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir, /tmp)")
    results.add_argument(p)
    a = p.parse_args()
    rec = results.Record("convert", "tools/bench/convert.py")
    work = Path(tempfile.mkdtemp(prefix="zenlm-bench-convert-", dir=a.dir))
    try:
        src = work / "hf"
        src.mkdir()
        t0 = time.perf_counter()
        files, sizes = write_source(src, a)
        total = sum(f.stat().st_size for f in files)
        print(
            f"source: {total / 1e9:.2f} GB bf16 in {len(files)} shards, {len(sizes)} tensors "
            f"(written in {time.perf_counter() - t0:.0f} s)"
        )
        # Warm-up, untimed: on this VM the first use of fresh guest memory for the page cache
        # costs several times a normal write (5 GB: 15 s of sys time once, 5 s after), so
        # every timed pass must find recycled pages, not only the ones that happen to come later.
        warm = raw_write_pass(work / "warmup", 2 * total + (1 << 30), direct=False)
        shutil.rmtree(work / "warmup")
        print(f"warm-up write of {(2 * total + (1 << 30)) / 1e9:.1f} GB: {warm:.1f} s")
        rows: dict[str, list[float]] = {
            "copy": [],
            "import": [],
            "import_tool": [],
            "raw": [],
            "import_cpu": [],
        }
        peak = 0
        for r in range(a.repeats):
            drop_pages(files)
            rows["copy"].append(copy_pass(files, work / f"copy{r}"))
            drop_pages(sorted((work / f"copy{r}").iterdir()))  # the next round starts alike
            shutil.rmtree(work / f"copy{r}")
            drop_pages(files)
            wall, tool, rss, cpu = import_pass(src, work / f"ckpt{r}")
            rows["import_cpu"].append(cpu)
            rows["import"].append(wall)
            rows["import_tool"].append(tool)
            peak = max(peak, rss)
            written = sum(f.stat().st_size for f in (work / f"ckpt{r}").iterdir())
            shutil.rmtree(work / f"ckpt{r}")
            rows["raw"].append(raw_write_pass(work / f"raw{r}", written))
            shutil.rmtree(work / f"raw{r}")
        largest = max(sizes.values())
        med = {k: statistics.median(v) for k, v in rows.items()}
        mb = total / 1e6
        print(f"import wrote {written / 1e9:.2f} GB (fp32)")

        def rounds(key: str, base: str = "copy") -> str:
            return ", ".join(f"{c / i:.2f}" for c, i in zip(rows[base], rows[key], strict=True))

        print("| pass | median s | MB/s (source bytes) | ratio to copy | each round's ratio |")
        print("| --- | --- | --- | --- | --- |")
        print(
            f"| copy (copyfile + fsync) | {med['copy']:.1f} | {mb / med['copy']:,.0f} | 1.00 | "
            f"{', '.join(f'{c:.1f} s' for c in rows['copy'])} |"
        )
        for key, label in (
            ("import", "import, whole process"),
            ("import_tool", "import, tool time"),
        ):
            print(
                f"| {label} | {med[key]:.1f} | {mb / med[key]:,.0f} | "
                f"{med['copy'] / med[key]:.2f} | {rounds(key)} |"
            )
        print(
            f"import CPU time (user + sys, all threads): {med['import_cpu']:.1f} s; load "
            f"average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        print(
            f"raw write of the import's {written / 1e9:.2f} GB output alone (from memory, "
            f"O_DIRECT, fsync per 2 GiB file): {med['raw']:.1f} s, {written / 1e6 / med['raw']:,.0f} MB/s; "
            f"raw write time / import tool time = {med['raw'] / med['import_tool']:.2f} "
            f"(rounds: {rounds('import_tool', 'raw')})"
        )
        print(
            f"peak RSS of the import process: {peak / 2**20:,.0f} MiB; largest tensor "
            f"{largest / 2**20:,.0f} MiB bf16 = {2 * largest / 2**20:,.0f} MiB fp32; target "
            f"2 x fp32 + 1 GiB = {(4 * largest + 2**30) / 2**20:,.0f} MiB "
            f"({peak / (4 * largest + 2**30):.2f} of it)"
        )
        record(rec, a, rows, med, mb, written, peak, largest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record(
    rec: results.Record,
    a: argparse.Namespace,
    rows: dict[str, list[float]],
    med: dict[str, float],
    mb: float,
    written: int,
    peak: int,
    largest: int,
) -> None:
    """The table and summary of docs/benchmarks.md's "HF import" from one run."""

    def each(key: str, base: str = "copy") -> str:
        return ", ".join(f"{c / i:.2f}" for c, i in zip(rows[base], rows[key], strict=True))

    table = [
        [
            "copy (copyfile + fsync)",
            f"{med['copy']:.1f}",
            f"{mb / med['copy']:,.0f}",
            "1.00",
            ", ".join(f"{c:.1f} s" for c in rows["copy"]),
        ],
        *(
            [label, f"{med[k]:.1f}", f"{mb / med[k]:,.0f}", f"{med['copy'] / med[k]:.2f}", each(k)]
            for k, label in (
                ("import", "import, whole process"),
                ("import_tool", "import, tool time"),
            )
        ),
        [
            f"raw O_DIRECT write of the import's {written / 1e9:.2f} GB output",
            f"{med['raw']:.1f}",
            f"{written / 1e6 / med['raw']:,.0f} (output bytes)",
            f"{med['raw'] / med['import_tool']:.2f} of the tool time",
            each("import_tool", "raw"),
        ],
    ]
    target_rss = 4 * largest + 2**30
    notes = [
        f"Source: a synthetic Llama-shaped bf16 checkpoint, hidden {a.hidden}, MLP "
        f"{a.intermediate}, vocab {a.vocab}, {a.layers} layers, {mb / 1e3:.2f} GB; {a.repeats} "
        f"rounds; source pages dropped before each pass. Import CPU time (user + sys, all "
        f"threads): {med['import_cpu']:.1f} s. Peak RSS of the import: {peak / 2**20:,.0f} MiB; "
        f"largest tensor {largest / 2**20:,.0f} MiB bf16; target 2 x fp32 + 1 GiB = "
        f"{target_rss / 2**20:,.0f} MiB ({peak / target_rss:.2f} of it)."
    ]
    rec.table(
        "convert",
        ["pass", "median s", "MB/s (source bytes)", "ratio to copy", "each round"],
        table,
        notes,
    )
    ratio = med["copy"] / med["import"]
    rec.summary("HF import vs durable copy", ">= 0.5", f"{ratio:.2f} (whole process)", ratio >= 0.5)
    rec.summary(
        "HF import peak RSS",
        "<= 2 x largest fp32 tensor + 1 GiB",
        f"{peak / 2**20:,.0f} MiB ({peak / target_rss:.2f} of it)",
        peak <= target_rss,
    )
    rec.write(
        a.results,
        {"seconds": rows, "source_mb": mb, "written_bytes": written, "peak_rss": peak},
    )


if __name__ == "__main__":
    main()
