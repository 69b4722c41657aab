"""Write and read the model and optimizer as full tensors by canonical name, from any layout.

Files (safetensors, fp32):
    model-p{stage}-w{writer}.safetensors   {canonical name: full weight}
    optim-p{stage}-w{writer}.safetensors   {"exp_avg/<name>": ..., "exp_avg_sq/<name>": ...}

Each pipeline stage's parameters are split over the stage's DP x TP ranks (writer w = dp_rank x
TP + tp_rank) by a greedy size balance, so every rank writes about 1/(DP x TP) of its stage and
no rank holds more than its share. Gathering a full tensor is a collective over the stage's DP
and TP groups, so every rank of a stage walks the same parameters in the same order.
A name held by two stages (the tied embedding's copy on the last stage) is written by the lower
stage only; on load both copies read the same tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from zenlm.checkpoint import tensors as T
from zenlm.checkpoint.compat import IncompatibleCheckpointError
from zenlm.checkpoint.io import CheckpointError, FileRecord, write_tensors
from zenlm.model.init import canonical_named_parameters
from zenlm.parallel.dims import ParallelDims


def _owned_names(names: list[str], dims: ParallelDims) -> set[str]:
    """Names this stage writes: those no lower pipeline stage holds."""
    if dims.pp == 1:
        return set(names)
    from megatron.core import parallel_state as ps

    per_stage: list[list[str] | None] = [None] * dims.pp
    dist.all_gather_object(per_stage, names, group=ps.get_pipeline_model_parallel_group())
    stage = ps.get_pipeline_model_parallel_rank()
    lower = {n for s in range(stage) for n in (per_stage[s] or [])}
    return set(names) - lower


def _assign_writers(sizes: dict[str, int], n_writers: int) -> dict[str, int]:
    """Greedy balance: largest tensor first to the least-loaded writer (deterministic)."""
    load = [0] * n_writers
    out: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        w = min(range(n_writers), key=lambda i: (load[i], i))
        out[name] = w
        load[w] += sizes[name]
    return out


def save_weights(
    engine: Any, factory: Any, dims: ParallelDims, out_dir: Path, rank: int
) -> tuple[dict[str, FileRecord], dict[str, dict[str, str]], dict[str, list[int]]]:
    """Write this rank's share; return (file records, {"model"|"optim": {name: file}}, shapes)."""
    params = canonical_named_parameters(engine.module)
    T.check_supported(engine, params)
    T.ensure_optimizer_state(engine)
    stage, dp_rank, tp_rank = dims.coords(rank)
    owned = _owned_names([n for n, _ in params], dims)
    shapes = {n: list(T.full_shape(p, dims.tp)) for n, p in params if n in owned}
    writers = _assign_writers(
        {n: int(torch.Size(s).numel()) for n, s in shapes.items()}, dims.dp * dims.tp
    )
    me = dp_rank * dims.tp + tp_rank
    model: dict[str, torch.Tensor] = {}
    optim: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, p in params:
        if name not in owned or name in done:
            continue
        done.add(name)
        for key in (None, *T.MOMENTS):
            full = factory.gather(T.get_local(engine, p, key), p)  # collectives: DP, then TP
            # No copy: `full` may view live training state, which cannot change before the
            # files below are written (the save runs between steps).
            if writers[name] == me:
                if key is None:
                    model[name] = full
                else:
                    optim[f"{key}/{name}"] = full
    records: dict[str, FileRecord] = {}
    index: dict[str, dict[str, str]] = {"model": {}, "optim": {}}
    for kind, tensors in (("model", model), ("optim", optim)):
        if not tensors:
            continue
        fname = f"{kind}-p{stage}-w{me}.safetensors"
        records[fname] = write_tensors(out_dir / fname, tensors)
        for key in tensors:
            index[kind][key.split("/", 1)[1] if kind == "optim" else key] = fname
    return records, index, {n: s for n, s in shapes.items() if writers[n] == me}


class _Reader:
    """Opens each file once; reads single tensors (safetensors' header gives their offsets)."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.dir, self.open = ckpt_dir, {}

    def get(self, fname: str, key: str) -> torch.Tensor:
        if fname not in self.open:
            try:
                self.open[fname] = safe_open(str(self.dir / fname), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(
                    f"{self.dir / fname}: not a valid safetensors file: {e}"
                ) from e
        try:
            return self.open[fname].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {key!r}: {e}") from e


def load_weights(
    engine: Any, factory: Any, ckpt_dir: Path, index: dict[str, dict[str, str]], optimizer: bool
) -> None:
    """Load full tensors into this rank's (TP/PP/ZeRO-sharded) parameters and AdamW moments."""
    params = canonical_named_parameters(engine.module)
    T.check_supported(engine, params)
    missing = sorted({n for n, _ in params} - set(index["model"]))
    if missing:
        raise IncompatibleCheckpointError(
            f"checkpoint {ckpt_dir} does not fit this run: no tensor for {len(missing)} "
            f"parameters of this model, e.g. {missing[:3]}"
        )
    T.ensure_optimizer_state(engine)
    reader = _Reader(ckpt_dir)
    tp, tp_rank = factory.tp_degree, factory.tp_rank
    for name, p in params:
        full = reader.get(index["model"][name], name)
        want = T.full_shape(p, tp)
        if full.shape != want:
            raise IncompatibleCheckpointError(
                f"checkpoint {ckpt_dir} does not fit this run: {name} has shape "
                f"{tuple(full.shape)} in the checkpoint, {tuple(want)} in this model"
            )
        T.set_local(engine, p, None, T.shard(full.float(), p, tp, tp_rank))
        if not optimizer:
            continue
        for key in T.MOMENTS:
            moment = reader.get(index["optim"][name], f"{key}/{name}")
            T.set_local(engine, p, key, T.shard(moment.float(), p, tp, tp_rank))
