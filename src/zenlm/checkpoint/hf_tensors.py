"""Tensors between a Hugging Face checkpoint and zenlm: the name table, the source readers, and
the plan that checks every name and shape before anything is written (hf_io.py writes).

TENSOR_MAP is the whole correspondence, one (HF name, zenlm canonical name) row per kind of
tensor, `{i}` standing for the layer index; it is read in both directions. transformers keeps
q/k in the rotate-half layout zenlm uses, so every tensor is copied as it is (no permutation).
DROPPED lists source tensors skipped on purpose. Anything else is an error, and `plan_import`
reports every offender at once (unknown, unexpected, missing, wrong shape, unsupported dtype).

Memory: a tensor is read (at the offset its file's header gives, no mmap, into a buffer reused
across tensors) only when it is written, so peak memory is a few of the largest tensors,
whatever the size of the model.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from zenlm.checkpoint.hf_io import SOURCE_DTYPES, ST_DTYPE_NAMES, read_range
from zenlm.checkpoint.io import CheckpointError, safe_torch_load

TENSOR_MAP: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "embed.embedding.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.q_proj.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attention.q_proj.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.k_proj.weight"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attention.k_proj.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.v_proj.weight"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attention.v_proj.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.o_proj.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
    ("model.norm.weight", "head.norm.weight"),
    ("lm_head.weight", "head.output.weight"),
)
"""(Hugging Face name, zenlm canonical name); `{i}` is the layer index."""

DROPPED: tuple[tuple[str, str], ...] = (
    (
        "model.layers.{i}.self_attn.rotary_emb.inv_freq",
        "a RoPE buffer older transformers saved; zenlm computes it from the config",
    ),
)
"""Source tensors skipped on purpose (besides lm_head.weight of a tied model, which is
skipped only when it equals the embedding)."""

TIED_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_TO_ZENLM = [(_compile(hf), z) for hf, z in TENSOR_MAP]
_TO_HF = [(_compile(z), hf) for hf, z in TENSOR_MAP]
_DROPPED = [(_compile(hf), why) for hf, why in DROPPED]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.replace("{i}", m.group(1)) if m.groups() else template
    return None


def to_zenlm(hf_name: str) -> str | None:
    """The canonical zenlm name of a Hugging Face tensor name (None: no counterpart)."""
    return _translate(hf_name, _TO_ZENLM)


def to_hf(zenlm_name: str) -> str:
    name = _translate(zenlm_name, _TO_HF)
    if name is None:
        raise CheckpointError(f"{zenlm_name}: no Hugging Face name for this zenlm parameter")
    return name


def dropped_reason(hf_name: str) -> str | None:
    return _translate(hf_name, _DROPPED)


# -- sources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a checkpoint file, known from its header (nothing read yet)."""

    name: str
    file: Path
    dtype: str
    """safetensors dtype name (F32, BF16, ...)."""
    shape: tuple[int, ...]
    start: int = 0
    """Byte offset of its data in the file (safetensors)."""
    nbytes: int = 0


_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def safetensors_entries(path: Path) -> dict[str, SourceTensor]:
    """The tensors a safetensors file holds, from its JSON header (8-byte length, then JSON),
    checked against the file size: a truncated file fails here, before anything is written."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size, 100 << 20):
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a mapping")
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            shape = tuple(int(x) for x in info["shape"])
            item = _ITEM_BYTES.get(info["dtype"])
            if item is not None and b - a != torch.Size(shape).numel() * item:
                raise ValueError(f"{name}: {b - a} bytes for {info['dtype']} {list(shape)}")
            if not 0 <= a <= b <= size - 8 - n:
                raise ValueError(f"{name} ends at byte {8 + n + b}, the file has {size}")
            out[name] = SourceTensor(name, path, info["dtype"], shape, 8 + n + a, b - a)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    return out


def read_into(src: SourceTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor, read at its header's offset (no mmap; O_DIRECT where possible, see hf_io),
    into `out` (an aligned buffer of hf_io.read_span(src.nbytes) bytes reused across tensors,
    so no fresh pages are touched) or a new buffer; a view into that buffer."""
    try:
        data = read_range(src.file, src.start, src.nbytes, out)
    except OSError as e:
        raise CheckpointError(f"{src.file}: cannot read tensor {src.name}: {e}") from e
    dtype = SOURCE_DTYPES.get(src.dtype, torch.uint8)
    if data.storage_offset() % torch.empty((), dtype=dtype).element_size():
        data = data.clone()  # a tensor at an odd offset (after an odd-length bf16 one)
    return data.view(dtype).view(src.shape)


class Source:
    """The tensors of a Hugging Face model directory: model.safetensors, its shards listed by
    model.safetensors.index.json, or (allow_pickle only) pytorch_model.bin and its shards."""

    def __init__(self, hf_dir: Path, allow_pickle: bool = False) -> None:
        self.dir = hf_dir
        self.pickle = False
        self.tensors: dict[str, SourceTensor] = {}
        self._cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        files = self._files(allow_pickle)
        for path in files:
            for t in self._entries(path):
                if t.name in self.tensors:
                    raise CheckpointError(
                        f"{self.dir}: tensor {t.name} is in both "
                        f"{self.tensors[t.name].file.name} and {path.name}"
                    )
                self.tensors[t.name] = t
        self.files = files
        if self.index is not None:
            wrong = sorted(
                n for n, f in self.index.items()
                if n not in self.tensors or self.tensors[n].file.name != f
            )  # fmt: skip
            if wrong:
                raise CheckpointError(
                    f"{self.dir}: the index names tensors its files do not hold there: "
                    f"{_list(wrong)}"
                )

    def _files(self, allow_pickle: bool) -> list[Path]:
        d = self.dir
        for index, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            is_pickle = single.endswith(".bin")
            if not ((d / index).is_file() or (d / single).is_file()):
                continue
            if is_pickle and not allow_pickle:
                raise CheckpointError(
                    f"{d} holds only pickled weights ({single}): unpickling can run code. "
                    "Convert them to safetensors, or pass --allow-pickle to load them with "
                    "torch.load(weights_only=True)"
                )
            self.pickle = is_pickle
            if (d / index).is_file():
                try:
                    weight_map = json.loads((d / index).read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{d / index} is not a valid index: {e}") from e
                names = sorted(set(weight_map.values()))
                missing = [n for n in names if not (d / n).is_file()]
                if missing:
                    raise CheckpointError(f"{d / index} lists missing files: {', '.join(missing)}")
                self.index = weight_map
                return [d / n for n in names]
            self.index = None
            return [d / single]
        raise CheckpointError(
            f"{d} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )

    def _entries(self, path: Path) -> Iterable[SourceTensor]:
        if self.pickle:
            state = self._load_pickle(path)
            for name, t in state.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{path}: {name} is not a tensor")
                yield SourceTensor(
                    name, path, ST_DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)
                )
            return
        for t in safetensors_entries(path).values():
            yield t

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != path:
            self._cache = None  # free the previous shard first
            state = safe_torch_load(path)
            if not isinstance(state, dict):
                raise CheckpointError(f"{path} does not hold a state dict")
            self._cache = (path, state)
        return self._cache[1]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, as stored; `out`: a reusable uint8 buffer (see read_into)."""
        src = self.tensors[name]
        if self.pickle:
            return self._load_pickle(src.file)[name]
        return read_into(src, out)

    def release(self) -> None:
        self._cache = None


# -- the plan ------------------------------------------------------------------------------


@dataclass
class ImportPlan:
    tensors: dict[str, SourceTensor]
    """zenlm canonical name -> its source tensor, in canonical order."""
    dropped: dict[str, str]
    """source name -> why it is skipped."""
    tied_head: SourceTensor | None
    """lm_head.weight of a tied model: skipped once it is found equal to the embedding."""


def _list(items: list[str]) -> str:
    return ", ".join(items)


def plan_import(
    source: dict[str, SourceTensor], expected: dict[str, list[int]], tied: bool, where: str
) -> ImportPlan:
    """Match every source tensor to a zenlm parameter of the expected shapes, or fail naming
    every unknown, unexpected, missing, misshapen and unsupported-dtype tensor at once."""
    found: dict[str, SourceTensor] = {}
    dropped: dict[str, str] = {}
    unknown, unexpected, shapes, dtypes = [], [], [], []
    tied_head = None
    for name in sorted(source):
        src = source[name]
        why = dropped_reason(name)
        if why is not None:
            dropped[name] = why
            continue
        if name == TIED_HEAD and tied:
            tied_head = src
            continue
        target = to_zenlm(name)
        if target is None:
            unknown.append(name)
            continue
        if target not in expected:
            unexpected.append(name)
            continue
        found[target] = src
        if list(src.shape) != expected[target]:
            shapes.append(f"{name} {list(src.shape)} (config.json implies {expected[target]})")
        if src.dtype not in SOURCE_DTYPES:
            dtypes.append(f"{name} {src.dtype}")
    embed = source.get(EMBED)
    if tied_head is not None and embed is not None and tied_head.shape != embed.shape:
        shapes.append(
            f"{TIED_HEAD} {list(tied_head.shape)} (tied to {EMBED} {list(source[EMBED].shape)})"
        )
    missing = [to_hf(n) for n in expected if n not in found]
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} unknown tensors (no zenlm counterpart): {_list(unknown)}")
    if unexpected:
        parts.append(
            f"{len(unexpected)} tensors config.json does not call for (e.g. biases, layers "
            f"beyond num_hidden_layers): {_list(unexpected)}"
        )
    if missing:
        parts.append(f"{len(missing)} missing tensors: {_list(missing)}")
    if shapes:
        parts.append(f"{len(shapes)} wrong shapes: {_list(shapes)}")
    if dtypes:
        parts.append(
            f"{len(dtypes)} tensors of unsupported dtype (F32, BF16, F16 only): {_list(dtypes)}"
        )
    if parts:
        raise CheckpointError(f"{where} does not match its config.json: {'; '.join(parts)}")
    return ImportPlan({n: found[n] for n in expected}, dropped, tied_head)


def split_files(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names (in the given order) of at most max_bytes each (a tensor
    larger than max_bytes gets a file of its own)."""
    groups: list[list[str]] = [[]]
    total = 0
    for name, n in sizes.items():
        if groups[-1] and total + n > max_bytes:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += n
    return [g for g in groups if g]
