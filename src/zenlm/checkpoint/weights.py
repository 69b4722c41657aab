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
from zenlm.runtime.device import collective_device


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
    """Opens each file once; reads single tensors or slices of them (safetensors' header gives
    every tensor's offset, so a slice costs only its own bytes). `bytes_read` counts them."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.dir, self.open = ckpt_dir, {}
        self.bytes_read = 0

    def _file(self, fname: str) -> Any:
        if fname not in self.open:
            try:
                self.open[fname] = safe_open(str(self.dir / fname), framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(
                    f"{self.dir / fname}: not a valid safetensors file: {e}"
                ) from e
        return self.open[fname]

    def get(self, fname: str, key: str) -> torch.Tensor:
        try:
            t = self._file(fname).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {key!r}: {e}") from e
        self.bytes_read += t.numel() * t.element_size()
        return t

    def shape(self, fname: str, key: str) -> torch.Size:
        try:
            return torch.Size(self._file(fname).get_slice(key).get_shape())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {key!r}: {e}") from e

    def get_local(
        self, fname: str, key: str, p: torch.nn.Parameter, tp: int, tp_rank: int
    ) -> torch.Tensor:
        """This TP rank's part of a full tensor, shaped like the TP-local parameter, reading only
        that part: rows/columns [tp_rank x n, (tp_rank + 1) x n) along the partition dim, and
        zero rows past the real vocabulary (padding). Equals T.shard(full, p, tp, tp_rank)."""
        local = T.local_shape(p)
        sharded = getattr(p, "tensor_model_parallel", False)
        padded = bool(T.vocab_rows(p))
        if not sharded and not padded:
            return self.get(fname, key).float()
        dim = p.partition_dim if sharded else 0
        n = local[dim]
        start = tp_rank * n if sharded else 0
        try:
            view = self._file(fname).get_slice(key)
            stop = min(start + n, view.get_shape()[dim])
            index = [slice(None)] * len(local)
            index[dim] = slice(start, max(start, stop))
            part = view[tuple(index)] if stop > start else None
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {key!r}: {e}") from e
        out = torch.zeros(local, dtype=torch.float32)
        if part is not None:
            self.bytes_read += part.numel() * part.element_size()
            out.narrow(dim, 0, part.shape[dim]).copy_(part)
        return out


def _dp_peers() -> tuple[Any, list[int], int]:
    """(group, global ranks, my index) of this rank's data-parallel group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None, [0], 0
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    return group, ranks, ranks.index(dist.get_rank())


def load_weights(
    engine: Any, factory: Any, ckpt_dir: Path, index: dict[str, dict[str, str]], optimizer: bool
) -> int:
    """Load full tensors into this rank's (TP/PP/ZeRO-sharded) parameters and AdamW moments.

    Each rank reads only its TP slice of its stage's tensors, and the DP replicas of a slice
    split the reading (the same greedy balance as the writers) and broadcast over the DP group,
    so the checkpoint is read about once in all, not once per rank. Shapes are checked on every
    rank from the safetensors headers before any read; a read error on one rank is raised after
    the loop (the broadcasts carry zeros meanwhile), so no rank waits alone in a collective.
    Returns the bytes this rank read.
    """
    params = canonical_named_parameters(engine.module)
    T.check_supported(engine, params)
    missing = sorted({n for n, _ in params} - set(index["model"]))
    if missing:
        raise IncompatibleCheckpointError(
            f"checkpoint {ckpt_dir} does not fit this run: no tensor for {len(missing)} "
            f"parameters of this model, e.g. {missing[:3]}"
        )
    if optimizer:
        lacking = sorted({n for n, _ in params} - set(index.get("optim", {})))
        if lacking:
            raise IncompatibleCheckpointError(
                f"checkpoint {ckpt_dir} holds no optimizer state for {len(lacking)} parameters "
                f"(e.g. {lacking[0]}): a weights-only checkpoint is for checkpoint.init_from"
            )
    T.ensure_optimizer_state(engine)
    reader = _Reader(ckpt_dir)
    tp, tp_rank = factory.tp_degree, factory.tp_rank
    for name, p in params:
        saved, want = reader.shape(index["model"][name], name), T.full_shape(p, tp)
        if saved != want:
            raise IncompatibleCheckpointError(
                f"checkpoint {ckpt_dir} does not fit this run: {name} has shape "
                f"{tuple(saved)} in the checkpoint, {tuple(want)} in this model"
            )
    group, peers, me = _dp_peers()
    sizes = {n: int(T.local_shape(p).numel()) for n, p in params}
    reads = _assign_writers(sizes, len(peers))
    keys: tuple[str | None, ...] = (None, *T.MOMENTS) if optimizer else (None,)
    first_error: CheckpointError | None = None
    for name, p in params:
        for key in keys:
            fname = index["model"][name] if key is None else index["optim"][name]
            tkey = name if key is None else f"{key}/{name}"
            local = None
            if reads[name] == me and first_error is None:
                try:
                    local = reader.get_local(fname, tkey, p, tp, tp_rank)
                except CheckpointError as e:
                    first_error = e
            if local is None:
                local = torch.zeros(T.local_shape(p), dtype=torch.float32)
            if len(peers) > 1:
                local = local.to(collective_device(group))
                dist.broadcast(local, src=peers[reads[name]], group=group)
            T.set_local(engine, p, key, local)
    if first_error is not None:
        raise first_error
    return reader.bytes_read
