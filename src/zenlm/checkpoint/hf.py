"""Hugging Face import and export (tools/convert.py; docs/convert.md).

    import_hf(hf_dir, out_ckpt)          config.json + safetensors -> a weights-only checkpoint
    export_hf(ckpt, out_dir, "bf16")     any zenlm checkpoint -> a transformers model directory

Import checks everything it can before writing anything: the config mapping (hf_config.py:
every field mapped, neutral, harmless, or refused by name), then every tensor name, shape and
dtype against the model the config describes (hf_tensors.py: all offenders in one message). It
then streams tensor by tensor into a sibling temp directory and renames it at the end, so
OUT_CKPT is either absent or complete. Export is the same in reverse, reading through the
checkpoint's meta.json index after checking the CRC-32 of every file it reads.

The weights-only checkpoint is the training format (docs/checkpoints.md) without optimizer,
trainer or RNG files: model-NNNNN.safetensors {canonical name: full fp32 tensor}, config.yaml
{model: ModelConfig}, meta.json (kind "weights", step 0, source {format, model_type, ids,
dtype, path}); checkpoint.init_from loads it at any layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

import zenlm
from zenlm.checkpoint.compat import check_compatible, expected_shapes
from zenlm.checkpoint.hf_config import hf_config_from_model, model_config_from_hf
from zenlm.checkpoint.hf_io import SOURCE_DTYPES, aligned_empty, read_span, write_streamed
from zenlm.checkpoint.hf_tensors import (
    EMBED,
    TIED_HEAD,
    Source,
    plan_import,
    read_into,
    safetensors_entries,
    split_files,
    to_hf,
)
from zenlm.checkpoint.io import (
    CheckpointError,
    FileRecord,
    fsync_dir,
    write_bytes,
    write_json,
)
from zenlm.checkpoint.store import (
    FORMAT,
    FORMAT_VERSION,
    META,
    file_records,
    read_meta,
    verify_files,
)
from zenlm.model.config import ModelConfig

IMPORT_FILE_BYTES = 2 << 30
"""Import splits the fp32 tensors into files of at most ~2 GiB (a larger tensor gets its own)."""
EXPORT_SHARD_BYTES = 5 * 10**9
"""Export shards like transformers' save_pretrained default (5 GB)."""
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja",
                   "tokenizer.model")  # fmt: skip
"""Copied from the source model (or --tokenizer DIR) into the export when present."""

Progress = Callable[[int, str], Any]


def _no_progress(total: int, desc: str) -> Any:
    return None


def tqdm_progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=None)  # None: off when no TTY


class ReadAhead:
    """Tensors in write order, read one ahead: tensor k+1 is read on a second thread while
    write_streamed converts tensor k into its staging buffer (reads, copy_ and writes all
    release the GIL).

    Two read buffers alternate, allocated once for the largest tensor and reused (a large
    allocation freed and made again touches fresh pages, which on a VM costs more than the
    conversion): memory is 2 x the largest tensor read, + write_streamed's two 64 MiB staging
    buffers. write_streamed has copied tensor k out before it asks for k + 1, so a buffer is
    never refilled while it is still needed."""

    def __init__(
        self,
        order: list[str],
        read: Callable[[str, torch.Tensor | None], torch.Tensor],
        nbytes: Callable[[str], int],
        buffered: bool = True,
    ) -> None:
        self.order, self.read, self.nbytes = order, read, nbytes
        self.pos = {n: i for i, n in enumerate(order)}
        self.buffered = buffered
        self.bufs: dict[int, torch.Tensor] = {}
        self.pool = ThreadPoolExecutor(1)
        self.ahead: dict[str, Any] = {}

    def _submit(self, i: int) -> Any:
        buf = None
        if self.buffered:
            buf = self.bufs.get(i % 2)
            if buf is None:  # aligned, with room for the aligned range around any tensor
                most = max(map(self.nbytes, self.order))
                buf = self.bufs[i % 2] = aligned_empty(read_span(most))
        return self.pool.submit(self.read, self.order[i], buf)

    def get(self, name: str) -> torch.Tensor:
        i = self.pos[name]
        fut = self.ahead.pop(name, None) or self._submit(i)
        t = fut.result()
        if i + 1 < len(self.order) and self.order[i + 1] not in self.ahead:
            self.ahead[self.order[i + 1]] = self._submit(i + 1)
        return t

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.ahead.clear()
        self.bufs.clear()


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"{out} already exists and is not empty: give a new directory (nothing was written)"
        )


def _tmp_dir(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    fsync_dir(tmp)
    if out.is_dir():  # an empty directory (checked): replaced
        out.rmdir()
    os.rename(tmp, out)
    fsync_dir(out.parent)


def _atomically(out: Path, body: Callable[[Path], Any]) -> Any:
    """Run body(tmp) in a sibling temp dir, then rename it to `out`; remove it on any error."""
    _check_out(out)
    tmp = _tmp_dir(out)
    try:
        result = body(tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    try:
        hf = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{hf_dir} holds no readable config.json: {e}") from e
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return hf


# -- import --------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportResult:
    path: Path
    model: ModelConfig
    model_type: str
    files: dict[str, FileRecord]
    parameter_count: int
    dropped: dict[str, str]
    seconds: float


def import_hf(
    hf_dir: str | os.PathLike,
    out_ckpt: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    ignore_config_keys: Iterable[str] = (),
    max_file_bytes: int = IMPORT_FILE_BYTES,
    progress: Progress = _no_progress,
) -> ImportResult:
    """A Hugging Face model directory -> a weights-only zenlm checkpoint at out_ckpt."""
    start = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out_ckpt)
    _check_out(out)
    hf = read_hf_config(hf_dir)
    name = hf.get("_name_or_path") or hf_dir.resolve().name
    cfg = model_config_from_hf(hf, name=name, ignore=ignore_config_keys)
    source = Source(hf_dir, allow_pickle=allow_pickle)
    expected = expected_shapes(cfg)
    plan = plan_import(source.tensors, expected, cfg.tie_word_embeddings, str(hf_dir))
    dropped = dict(plan.dropped)
    if plan.tied_head is not None:
        if not torch.equal(source.read(TIED_HEAD), source.read(EMBED)):
            raise CheckpointError(
                f"{hf_dir}: tie_word_embeddings is true but {TIED_HEAD} differs from {EMBED}; "
                "a tied zenlm model has one matrix (set tie_word_embeddings false to keep both)"
            )
        dropped[TIED_HEAD] = f"tied: equal to {EMBED}"

    sizes = {n: torch.Size(s).numel() * 4 for n, s in expected.items()}
    groups = split_files(sizes, max_file_bytes)
    bar = progress(len(expected), "import")
    ahead = ReadAhead(
        [n for g in groups for n in sorted(g)],  # write_streamed's order
        lambda zname, buf: source.read(plan.tensors[zname].name, buf),
        lambda zname: plan.tensors[zname].nbytes,
        buffered=not source.pickle,
    )

    def produce(zname: str) -> torch.Tensor:
        t = ahead.get(zname)
        if bar is not None:
            bar.update(1)
        return t

    def body(tmp: Path) -> dict[str, FileRecord]:
        files: dict[str, FileRecord] = {}
        index: dict[str, str] = {}
        for k, group in enumerate(groups):
            fname = f"model-{k:05d}.safetensors"
            specs = {n: (torch.float32, expected[n]) for n in group}
            files[fname] = write_streamed(tmp / fname, specs, produce)
            index.update(dict.fromkeys(group, fname))
        if bar is not None:
            bar.close()
        body_yaml = yaml.safe_dump({"model": dataclasses.asdict(cfg)}, sort_keys=False)
        files["config.yaml"] = write_bytes(tmp / "config.yaml", body_yaml.encode())
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "weights",
            "step": 0,
            "tokens_seen": 0,
            "zenlm_version": zenlm.__version__,
            "created_unix": int(time.time()),
            "tokenizer_fingerprint": None,
            "parameter_count": sum(sizes.values()) // 4,
            "tensors": {"model": index, "optim": {}},
            "shapes": {n: list(s) for n, s in expected.items()},
            "files": {n: {"crc32": r.crc32, "bytes": r.bytes} for n, r in sorted(files.items())},
            "source": {
                "format": "huggingface",
                "model_type": hf["model_type"],
                "bos_token_id": hf.get("bos_token_id"),
                "eos_token_id": hf.get("eos_token_id"),
                "pad_token_id": hf.get("pad_token_id"),
                "torch_dtype": hf.get("torch_dtype") or hf.get("dtype"),
                "path": str(hf_dir.resolve()),
            },
        }
        write_json(tmp / META, meta)  # last: a directory without it is not a checkpoint
        return files

    try:
        files = _atomically(out, body)
    finally:
        ahead.close()
        source.release()
    return ImportResult(
        out,
        cfg,
        hf["model_type"],
        files,
        sum(sizes.values()) // 4,
        dropped,
        time.perf_counter() - start,
    )


# -- export --------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    path: Path
    model_type: str
    files: list[str]
    tokenizer_files: list[str]
    seconds: float


def checkpoint_model_config(ckpt: Path, meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig in a checkpoint's config.yaml (training and weights-only alike)."""
    from zenlm.config.load import build

    if "config.yaml" not in meta["files"]:
        raise CheckpointError(f"{ckpt} has no config.yaml: the model shape is unknown")
    try:
        saved = yaml.safe_load((ckpt / "config.yaml").read_text())
        model = saved["model"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'config.yaml'} holds no model section: {e}") from e
    return build(ModelConfig, model, prefix="model")


def _token_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids: from the imported source, else the run's tokenizer (meta `tokenizer`)."""
    source = meta.get("source") or {}
    tok = meta.get("tokenizer") or {}

    def tok_id(key: str) -> Any:
        v = tok.get(key)
        return v if isinstance(v, int) and v >= 0 else None

    ids = {}
    for key, tok_key in (("bos", "bos_id"), ("eos", "eos_id"), ("pad", "pad_id")):
        v = source.get(f"{key}_token_id")
        ids[f"{key}_token_id"] = v if v is not None else tok_id(tok_key)
    return ids


def _tokenizer_dir(meta: dict[str, Any], explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not any((explicit / f).is_file() for f in TOKENIZER_FILES):
            raise CheckpointError(
                f"--tokenizer {explicit} holds none of {', '.join(TOKENIZER_FILES)}"
            )
        return explicit
    for candidate in (
        (meta.get("source") or {}).get("path"),
        (meta.get("tokenizer") or {}).get("path"),
    ):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def export_hf(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "bf16",
    *,
    max_shard_bytes: int = EXPORT_SHARD_BYTES,
    tokenizer_dir: str | os.PathLike | None = None,
    progress: Progress = _no_progress,
) -> ExportResult:
    """A zenlm checkpoint (training step_N at any layout, or weights-only) -> a transformers
    model directory that AutoModelForCausalLM.from_pretrained loads offline."""
    start = time.perf_counter()
    ckpt, out = Path(ckpt), Path(out_dir)
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: one of {', '.join(EXPORT_DTYPES)}")
    torch_dtype = EXPORT_DTYPES[dtype]
    _check_out(out)
    if not (ckpt / META).is_file():
        raise CheckpointError(f"{ckpt} holds no meta.json: not a zenlm checkpoint directory")
    meta = read_meta(ckpt)
    index: dict[str, str] = meta["tensors"]["model"]
    records = file_records(meta)
    needed = sorted({*index.values(), "config.yaml"} & set(records))
    verify_files(ckpt, records, needed)  # every file read below, against meta.json's CRC-32
    cfg = checkpoint_model_config(ckpt, meta)
    check_compatible(ckpt, meta, cfg, None)
    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in index]
    if missing:
        raise CheckpointError(f"{ckpt}: meta.json indexes no tensor for {', '.join(missing)}")
    model_type = (meta.get("source") or {}).get("model_type") or (
        "qwen2" if cfg.qkv_bias else "llama"
    )
    ids = _token_ids(meta)
    config = hf_config_from_model(cfg, model_type, torch_dtype=_DTYPE_NAMES[torch_dtype], **ids)
    tok_dir = _tokenizer_dir(meta, Path(tokenizer_dir) if tokenizer_dir else None)

    hf_names = {to_hf(n): n for n in expected}
    item = torch.empty((), dtype=torch_dtype).element_size()
    sizes = {h: torch.Size(expected[z]).numel() * item for h, z in hf_names.items()}
    groups = split_files(sizes, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    )
    entries = {f: safetensors_entries(ckpt / f) for f in sorted(set(index.values()))}
    stored = {}
    for hf_name, zname in hf_names.items():
        src = entries[index[zname]].get(zname)
        if src is None:
            raise CheckpointError(f"{ckpt / index[zname]} holds no tensor {zname}")
        if src.dtype not in SOURCE_DTYPES:
            raise CheckpointError(f"{ckpt / index[zname]}: {zname} is {src.dtype}, not a float")
        stored[hf_name] = src
    bar = progress(len(hf_names), "export")
    ahead = ReadAhead(
        [n for g in groups for n in sorted(g)],  # write_streamed's order
        lambda hf_name, buf: read_into(stored[hf_name], buf),
        lambda hf_name: stored[hf_name].nbytes,
    )

    def produce(hf_name: str) -> torch.Tensor:
        t = ahead.get(hf_name)
        if bar is not None:
            bar.update(1)
        return t

    def body(tmp: Path) -> list[str]:
        weight_map = {}
        for fname, group in zip(names, groups):
            specs = {h: (torch_dtype, expected[hf_names[h]]) for h in group}
            write_streamed(tmp / fname, specs, produce, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, fname))
        if bar is not None:
            bar.close()
        if len(names) > 1:
            write_json(
                tmp / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
            )
        write_json(tmp / "config.json", config)
        generation = {k: v for k, v in ids.items() if v is not None}
        write_json(tmp / "generation_config.json", generation)
        copied = []
        if tok_dir is not None:
            for f in TOKENIZER_FILES:
                if (tok_dir / f).is_file():
                    shutil.copyfile(tok_dir / f, tmp / f)
                    copied.append(f)
        return copied

    try:
        copied = _atomically(out, body)
    finally:
        ahead.close()
    return ExportResult(out, model_type, names, copied, time.perf_counter() - start)
