"""Checkpoint save and load throughput against raw writes and reads of the same bytes.

    python tools/bench/checkpoint.py [--hidden 512 --layers 8 --vocab 32000 --repeats 3 --dir DIR]

One process (world size 1, fp32; the default zero_stage=1 runs as ZeRO stage 0 at DP 1, see
zenlm.parallel.engine.effective_zero_stage) trains one step of a model, then alternates:
  - zenlm save: CheckpointSession.save (gather full fp32 weights + AdamW moments, safetensors,
    CRC-32, fsync per file, meta.json, rename, latest);
  - raw write: the checkpoint's own bytes (held in memory) written to new files with write()
    in 64 MiB pieces + fsync per file (no hashing, no gathering);
  - zenlm load: CheckpointSession.resume of that checkpoint (CRC-32 of every file, then every
    tensor read and copied into the engine's weights, fp32 masters and moments);
  - raw read: reading those raw files back.
Before every load and every raw read the page cache is dropped when the process may
(root: /proc/sys/vm/drop_caches), so both read from the disk; otherwise both read from cache.
MB/s = checkpoint bytes / seconds; ratio = zenlm / raw (target >= 0.5): the ratio of the medians
over repeats, and the median of each round's own ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import results

TARGET = 0.5


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_write(src: Path, dst: Path) -> float:
    """Write the checkpoint's own bytes (read into memory first, untimed) to new files + fsync."""
    dst.mkdir()
    contents = {f.name: f.read_bytes() for f in sorted(src.iterdir())}
    start = time.perf_counter()
    for name, data in contents.items():
        with open(dst / name, "wb") as out:
            view = memoryview(data)
            for i in range(0, len(view), 64 << 20):
                out.write(view[i : i + (64 << 20)])
            out.flush()
            os.fsync(out.fileno())
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start


def raw_read(dst: Path) -> float:
    start = time.perf_counter()
    for f in sorted(dst.iterdir()):
        with open(f, "rb") as src:
            while src.read(64 << 20):
                pass
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    results.add_argument(p)
    a = p.parse_args()
    rec = results.Record("checkpoint", "tools/bench/checkpoint.py")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import functools

    from zenlm.config import load_config
    from zenlm.testing.reference import rank_micro_batches
    from zenlm.train.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="zenlm-bench-ckpt-", dir=a.dir))
    cfg = load_config(
        None,
        [
            f"model.hidden_size={a.hidden}",
            f"model.num_layers={a.layers}",
            f"model.vocab_size={a.vocab}",
            "model.num_attention_heads=8",
            "model.num_kv_heads=8",
            f"model.intermediate_size={a.hidden * 11 // 4}",
            "data.seq_len_tokens=16",
            "data.global_batch_size_seqs=2",
            "data.micro_batch_size_seqs=2",
            "logging.eval_interval_steps=0",
            "logging.tensorboard_enabled=false",
            f"logging.run_dir={work}",
            "checkpoint.keep_last=1",
        ],
    )
    trainer = Trainer(cfg, train_data=functools.partial(rank_micro_batches, cfg))
    trainer.train_step()
    session = trainer.checkpoints
    rows: dict[str, list[float]] = {"save": [], "raw_write": [], "load": [], "raw_read": []}
    cold = True
    size = 0
    for _ in range(a.repeats):
        start = time.perf_counter()
        ckpt = session.save()
        rows["save"].append(time.perf_counter() - start)
        session.last_saved_step = None  # allow a re-save of the same step next round
        size = sum(f.stat().st_size for f in ckpt.iterdir())
        raw = work / "raw"
        shutil.rmtree(raw, ignore_errors=True)
        rows["raw_write"].append(raw_write(ckpt, raw))
        cold = drop_caches() and cold
        session.cfg.resume = str(ckpt)
        start = time.perf_counter()
        session.resume()
        rows["load"].append(time.perf_counter() - start)
        cold = drop_caches() and cold
        rows["raw_read"].append(raw_read(raw))
    mb = size / 1e6
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"checkpoint: {mb:.0f} MB in {len(list(ckpt.iterdir()))} files; reads {'cold' if cold else 'cached'}"
    )
    # The VM's disk speed drifts between rounds (raw reads seen from 850 to 2,100 MB/s within
    # minutes), so also report the median of each round's own ratio (adjacent runs).
    columns = ["operation", "zenlm MB/s", "raw MB/s", "ratio of medians", "median of round ratios"]
    table, ratios = [], {}
    print(" | ".join(columns))
    for op, raw_op in (("save", "raw_write"), ("load", "raw_read")):
        ours, base = mb / med[op], mb / med[raw_op]
        rounds = statistics.median(r / z for z, r in zip(rows[op], rows[raw_op], strict=True))
        ratios[op] = ours / base
        table.append([op, f"{ours:,.0f}", f"{base:,.0f}", f"{ours / base:.2f}", f"{rounds:.2f}"])
        print(" | ".join(table[-1]))
    n_files = len(list(ckpt.iterdir()))
    rec.table(
        "checkpoint",
        columns,
        table,
        [
            f"One process, fp32, a {a.hidden}-hidden {a.layers}-layer model with vocab {a.vocab}: "
            f"checkpoint {mb:.0f} MB in {n_files} files; {a.repeats} rounds; reads "
            + (
                "from disk (page cache dropped before each)."
                if cold
                else "from the page cache (drop_caches not permitted here)."
            )
        ],
    )
    rec.summary(
        "checkpoint save / load vs raw disk",
        f">= {TARGET}",
        f"save {ratios['save']:.2f}, load {ratios['load']:.2f}",
        min(ratios.values()) >= TARGET,
    )
    rec.write(a.results, {"mb": mb, "seconds": rows, "ratio": ratios, "cold": cold})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
