"""preprocess_sft(): prompt/completion or chat JSONL -> packed corpus with a per-token loss mask.

    read records (input order) -> examples: ids + loss mask (chunks encoded in one batch call)
    -> split by hash -> drop too long / untrainable -> ExamplePacker per split -> tar shards
    -> manifest (format_version 2, loss_mask true)

Examples (docs/finetune.md has the full rules):
- prompt/completion: `[BOS] encode(prompt) encode(completion) EOS`; prompt and completion are
  encoded separately and concatenated as given (no separator: put the space or newline you want
  into the text, as TRL does), so no token spans the boundary; mask 1 on completion and EOS.
- chat: the conversation rendered with the tokenizer's chat template (zenlm.data.sft_chat) and
  tokenized as a whole; `[BOS]` only when --add-bos and the rendering does not begin with it, EOS
  appended unless the rendering ends with it; mask 1 on the assistant replies (sft_chat doc).
- The first token of every example has mask 0 (nothing inside the example predicts it; the
  label that would is the previous example's last position).
- An example with no token of mask 1 is dropped and counted (`empty`); one longer than
  seq_len + 1 is dropped and counted (`long`) or, with on_long="error", refused naming its line.

Split: an example goes to valid iff blake2b of its canonical JSON (prompt/completion, or the
messages' roles and contents) / 2**64 < valid_fraction, so duplicates share a split.

The output directory follows tools/preprocess.py's rules, with the writer's own helpers: new,
empty, or this same corpus (a rerun skips complete shards); anything else refused; a failed run
removes what it created.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zenlm.data.encode import split_of
from zenlm.data.format import SPLITS, CorpusManifest, ShardInfo, SplitInfo, write_manifest
from zenlm.data.pack import ExamplePacker, ShardSink, sample_tar_bytes
from zenlm.data.readers import BadInputError, _reason, check_inputs, is_jsonl, open_binary
from zenlm.data.sft_chat import (
    ROLES,
    ChatRecordError,
    ChatTemplate,
    TemplatePrefixError,
    assistant_mask,
    load_chat_template,
)
from zenlm.data.tokenizer import load_tokenizer
from zenlm.data.writer import (
    DEFAULT_VALID_FRACTION,
    _input_files,
    _key,
    _load_complete,
    _OutDir,
    _read_state,
    _save_state,
)

FORMATS = ("auto", "prompt_completion", "chat")
ON_LONG = ("drop", "error")
BAD_KINDS = ("non_utf8", "invalid_json", "missing_field", "unknown_role", "template_error")
"""Bad records, counted per file against max_bad_fraction (like the text readers' kinds)."""
SETTING_FLAGS = {
    "kind": "the tool (tools/preprocess.py made it)",
    "tokenizer": "--tokenizer",
    "seq_len": "--seq-len",
    "samples_per_shard": "--shard-size-mb",
    "valid_fraction": "--valid-fraction",
    "format": "--format",
    "add_bos": "--add-bos",
    "on_long": "--on-long",
    "pack_window": "--pack-window",
    "pad_id": "a tokenizer with pad id",
    "dtype": "--dtype",
}
"""Each setting in the state file, named as the tool's flag (for 'holds another corpus')."""
DEFAULT_PACK_WINDOW = 64
CHUNK_RECORDS = 512
"""Records encoded per batch call (the tokenizer's own threads encode a batch)."""


@dataclass
class SftFileStats:
    """What one input file gave."""

    path: str
    records: int = 0
    examples: int = 0
    """Examples written (both splits)."""
    empty: int = 0
    """Dropped: no token to train on (empty completion, no assistant reply with content)."""
    long: int = 0
    """Dropped: longer than seq_len + 1 tokens."""
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_KINDS, 0))

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())


@dataclass
class _Record:
    """A parsed record waiting for its tokens."""

    file: int
    line: int
    split: int
    kind: str  # "prompt_completion" | "chat"
    texts: tuple[str, ...]  # (prompt, completion) or (rendered conversation,)
    spans: list = field(default_factory=list)  # chat: AssistantSpan list


@dataclass
class SftResult:
    manifest: CorpusManifest
    shards_written: int = 0
    shards_skipped: int = 0
    stats: list[SftFileStats] = field(default_factory=list)


def load_sft_tokenizer(path: str | os.PathLike) -> tuple[object, ChatTemplate | None]:
    """(tokenizer, chat template or None): zenlm.data.tokenizer.load_tokenizer's tokenizer (a
    SentencePiece .model file or a Hugging Face tokenizer directory, the fingerprint the trainer
    checks), and for a directory with a tokenizer.json its chat template, read the way
    transformers reads it (hf_tokenizer; sft_chat resolves named templates). The template sees the tokenizer's
    own bos/eos/pad tokens (hf_tokenizer merges the config files as transformers does)."""
    tok = load_tokenizer(path)
    chat = load_chat_template(path, getattr(tok, "chat_template", None))
    if chat is not None:
        for name in ("bos_token", "eos_token", "pad_token"):
            value = getattr(tok, name, None)
            if value is None:
                chat.special_tokens.pop(name, None)
            else:
                chat.special_tokens[name] = value
    return tok, chat


def _encode_batch(tok, texts: list[str]) -> list[list[int]]:
    return tok.encode_batch(texts, num_threads=os.cpu_count() or 1)


def _pad_id(tok) -> int:
    """The tokenizer's pad id, or its EOS id when it has none."""
    return tok.pad_id if tok.pad_id >= 0 else tok.eos_id


class RecordReader:
    """JSONL records -> _Record (rendered, split), counting bad ones per file."""

    def __init__(
        self,
        tok,
        chat: ChatTemplate | None,
        fmt_name: str,
        valid_fraction: float,
        max_bad_fraction: float,
    ):
        self.tok, self.chat, self.fmt, self.valid_fraction = tok, chat, fmt_name, valid_fraction
        self.max_bad_fraction = max_bad_fraction
        self.stats: list[SftFileStats] = []

    def records(self, paths: Sequence[str | os.PathLike]) -> Iterator[_Record]:
        for path in paths:
            stats = SftFileStats(path=str(path))
            self.stats.append(stats)
            file = len(self.stats) - 1
            try:
                with open_binary(path) as f:
                    line = 0
                    for raw in f:
                        line += 1
                        if not raw.strip():
                            continue
                        stats.records += 1
                        rec = self._parse(raw, stats, file, line)
                        if rec is not None:
                            yield rec
            except (OSError, EOFError, zlib.error) as e:
                raise BadInputError(
                    f"{path}: cannot read input after {stats.records} records: {_reason(e)}"
                ) from e
            self._check(stats)

    def _check(self, stats: SftFileStats) -> None:
        if stats.records and stats.bad_total / stats.records > self.max_bad_fraction:
            kinds = ", ".join(f"{k}={v}" for k, v in stats.bad.items() if v)
            raise BadInputError(
                f"{stats.path}: {stats.bad_total} of {stats.records} records are bad ({kinds}), "
                f"over the limit max_bad_fraction={self.max_bad_fraction}; fix the file or raise "
                "the limit"
            )

    def _parse(self, raw: bytes, stats: SftFileStats, file: int, line: int) -> _Record | None:
        try:
            obj = json.loads(raw.decode("utf-8"))
            json.dumps(obj, ensure_ascii=False).encode("utf-8")  # lone surrogates from escapes
        except UnicodeError:
            stats.bad["non_utf8"] += 1
            return None
        except json.JSONDecodeError:
            stats.bad["invalid_json"] += 1
            return None
        if not isinstance(obj, dict):
            stats.bad["missing_field"] += 1
            return None
        kind = self.fmt
        if kind == "auto":
            kind = "chat" if "messages" in obj else "prompt_completion"
        if kind == "prompt_completion":
            prompt, completion = obj.get("prompt"), obj.get("completion")
            if not (isinstance(prompt, str) and isinstance(completion, str)):
                stats.bad["missing_field"] += 1
                return None
            canon = json.dumps([prompt, completion], ensure_ascii=False)
            split = split_of(canon, self.valid_fraction)
            return _Record(file, line, split, kind, (prompt, completion))
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            stats.bad["missing_field"] += 1
            return None
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
                stats.bad["missing_field"] += 1
                return None
            if m.get("role") not in ROLES:
                stats.bad["unknown_role"] += 1
                return None
        if self.chat is None:
            raise BadInputError(
                f'{stats.path} line {line}: a chat record ("messages"), but --tokenizer '
                f"{self.tok.path} has no chat template (a Hugging Face tokenizer directory with "
                "tokenizer.json and chat_template.jinja or a chat_template in "
                "tokenizer_config.json is needed)"
            )
        try:
            rendered, spans = self.chat.render_with_spans(messages)
        except ChatRecordError:
            stats.bad["template_error"] += 1
            return None
        except TemplatePrefixError as e:
            raise TemplatePrefixError(f"{stats.path} line {line}: {e}") from e
        canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
        split = split_of(canon, self.valid_fraction)
        return _Record(file, line, split, kind, (rendered,), spans)


def _batches(records: Iterator[_Record], n: int) -> Iterator[list[_Record]]:
    batch: list[_Record] = []
    for r in records:
        batch.append(r)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_records(tok, batch: list[_Record], add_bos: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint32 ids, uint8 mask) of every record of a batch (the rules in the module doc)."""
    bos, eos = tok.bos_id, tok.eos_id
    pc = [r for r in batch if r.kind == "prompt_completion"]
    chat = [r for r in batch if r.kind == "chat"]
    out: dict[int, tuple[list[int], list[int]]] = {}
    if pc:
        ids = _encode_batch(tok, [t for r in pc for t in r.texts])
        for k, r in enumerate(pc):
            p, c = ids[2 * k], ids[2 * k + 1]
            head = [bos] if add_bos else []
            # an empty completion trains nothing, not even the EOS: the example is dropped
            out[id(r)] = (
                [*head, *p, *c, eos],
                [0] * (len(head) + len(p)) + ([1] * (len(c) + 1) if c else [0]),
            )
    if chat:
        encoded = tok.encode_offsets_batch([r.texts[0] for r in chat])
        for r, (ids, offsets) in zip(chat, encoded):
            mask, eos_closes = assistant_mask(offsets, ids, r.spans, tok.special_ids)
            mask = mask.tolist()
            if add_bos and not (ids and ids[0] == bos):
                ids, mask = [bos, *ids], [0, *mask]
            if not (ids and ids[-1] == eos):
                ids, mask = [*ids, eos], [*mask, int(eos_closes and any(mask))]
            out[id(r)] = (ids, mask)
    result = []
    for r in batch:
        ids, mask = out[id(r)]
        m = np.array(mask, np.uint8)
        if len(m):
            m[0] = 0  # nothing inside the example predicts its first token
        result.append((np.array(ids, np.uint32), m))
    return result


def _check_arguments(
    seq_len, shard_size_bytes, valid_fraction, fmt_name, on_long, pack_window, max_bad_fraction
) -> None:
    if seq_len < 1:
        raise BadInputError(f"--seq-len must be >= 1 (tokens per sample), got {seq_len}")
    if not shard_size_bytes > 0:
        raise BadInputError(f"--shard-size-mb must be > 0, got {shard_size_bytes / 2**20:.3g}")
    if not (math.isfinite(valid_fraction) and 0.0 <= valid_fraction < 1.0):
        raise BadInputError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    if fmt_name not in FORMATS:
        raise BadInputError(f"--format must be one of {FORMATS}, got {fmt_name!r}")
    if on_long not in ON_LONG:
        raise BadInputError(f"--on-long must be one of {ON_LONG}, got {on_long!r}")
    if pack_window < 1:
        raise BadInputError(f"--pack-window must be >= 1 (1: next-fit), got {pack_window}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise BadInputError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")


def preprocess_sft(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    seq_len: int,
    shard_size_bytes: int = 256 << 20,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    format: str = "auto",
    add_bos: bool = False,
    on_long: str = "drop",
    pack_window: int = DEFAULT_PACK_WINDOW,
    dtype: str | None = None,
    max_bad_fraction: float = 0.01,
    progress: bool = True,
) -> SftResult:
    """Tokenize, mask, pack and shard SFT records into a corpus at out_dir (module doc).

    Bad arguments, inputs, tokenizer or out_dir raise BadInputError / TokenizerError naming the
    culprit before any work; input found bad while reading, an empty split or a refused long
    example raise too, and the run then leaves out_dir as it found it."""
    _check_arguments(
        seq_len, shard_size_bytes, valid_fraction, format, on_long, pack_window, max_bad_fraction
    )
    check_inputs(inputs)
    for p in inputs:
        if not is_jsonl(p):
            raise BadInputError(
                f"{p}: fine-tuning inputs are JSON Lines (.jsonl, .json or .ndjson, optionally "
                ".gz) with prompt/completion or messages records"
            )
    tok, chat = load_sft_tokenizer(tokenizer_path)
    if format == "chat" and chat is None:
        raise BadInputError(
            f"--format chat: --tokenizer {tokenizer_path} has no chat template (give a Hugging "
            "Face tokenizer directory whose tokenizer_config.json has chat_template)"
        )
    if add_bos and tok.bos_id < 0:
        raise BadInputError(f"--add-bos: --tokenizer {tokenizer_path} has no BOS token")
    from zenlm.data.format import dtype_for_vocab

    try:
        np_dtype = (
            dtype_for_vocab(tok.vocab_size) if dtype is None else np.dtype(dtype).newbyteorder("<")
        )
    except TypeError:
        np_dtype = None
    if np_dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise BadInputError(f"--dtype must be uint16 or uint32, got {dtype!r}")
    if tok.vocab_size > np.iinfo(np_dtype).max + 1:
        raise BadInputError(
            f"--dtype {np_dtype.name} cannot hold the ids of {tokenizer_path} "
            f"(vocab_size {tok.vocab_size}); use --dtype uint32"
        )
    sample_bytes = sample_tar_bytes(seq_len + 1, np_dtype.itemsize, loss_mask=True)
    if shard_size_bytes < sample_bytes:
        raise BadInputError(
            f"--shard-size-mb {shard_size_bytes / 2**20:.3g} is smaller than one sample "
            f"({sample_bytes} tar bytes at --seq-len {seq_len}); give a shard room for many"
        )
    settings = dict(
        kind="sft",
        tokenizer=tok.fingerprint,
        seq_len=seq_len,
        samples_per_shard=shard_size_bytes // sample_bytes,
        valid_fraction=valid_fraction,
        format=format,
        add_bos=add_bos,
        on_long=on_long,
        pack_window=pack_window,
        pad_id=_pad_id(tok),
        dtype=np_dtype.str,
    )
    out = Path(out_dir)
    files = _input_files(inputs)
    key = _key(files, settings)
    _refuse_another_corpus(out, key, files, settings)
    target = _OutDir(out, key, files, settings)  # refuses other files, probes writability
    reader = RecordReader(tok, chat, format, valid_fraction, max_bad_fraction)
    target.create()
    sinks: list[ShardSink] = []
    try:
        return _run(
            inputs, out, tok, key, {"inputs": files, "settings": settings}, target.state,
            reader, settings, sinks, progress,
        )  # fmt: skip
    except BaseException:
        for sink in sinks:
            sink.abort()
        target.undo()
        raise


def _run(inputs, out, tok, key, record, state, reader, settings, sinks, progress) -> SftResult:
    seq_len, n = settings["seq_len"], settings["seq_len"] + 1
    complete = _load_complete(out, key, state)
    done: list[ShardInfo] = []
    written = [0]

    def on_shard(info: ShardInfo, skipped: bool) -> None:
        done.append(info)
        if not skipped:
            written[0] += 1
            _save_state(out, key, done, record)

    np_dtype = np.dtype(settings["dtype"])
    spp = settings["samples_per_shard"]
    sinks += [ShardSink(out, s, spp, np_dtype, complete, on_shard) for s in SPLITS]
    packers = [ExamplePacker(n, settings["pad_id"], settings["pack_window"]) for _ in SPLITS]
    examples = [0] * len(SPLITS)
    tokens = [0] * len(SPLITS)
    trainable = [0] * len(SPLITS)
    bar = tqdm(desc="preprocess_sft", unit="ex", unit_scale=True, disable=not progress)
    try:
        for batch in _batches(reader.records(inputs), CHUNK_RECORDS):
            for r, (ids, mask) in zip(batch, encode_records(tok, batch, settings["add_bos"])):
                stats = reader.stats[r.file]
                if len(ids) > n:
                    if settings["on_long"] == "error":
                        raise BadInputError(
                            f"{stats.path} line {r.line}: example has {len(ids)} tokens, more "
                            f"than seq_len + 1 = {n} (examples are never split); raise --seq-len "
                            "or pass --on-long drop to drop and count such examples"
                        )
                    stats.long += 1
                    continue
                if not mask.any():
                    stats.empty += 1
                    continue
                stats.examples += 1
                s = r.split
                examples[s] += 1
                tokens[s] += len(ids)
                trainable[s] += int(mask.sum())
                for sample, starts, smask in packers[s].add(ids, mask):
                    sinks[s].write(sample, starts, smask)
            bar.update(len(batch))
        for s, packer in enumerate(packers):
            for sample, starts, smask in packer.flush():
                sinks[s].write(sample, starts, smask)
    finally:
        bar.close()
    for sink in sinks:
        sink.close()
    _check_split_sizes(settings["valid_fraction"], examples, reader.stats)
    splits = {s: SplitInfo([i for i in done if i.path.startswith(s + "-")]) for s in SPLITS}
    stats = {
        "kind": "sft",
        "format": settings["format"],
        "add_bos": settings["add_bos"],
        "pad_id": settings["pad_id"],
        "packing": {"policy": "first-fit", "window": settings["pack_window"]},
        "examples": dict(zip(SPLITS, examples)),
        "example_tokens": dict(zip(SPLITS, tokens)),
        "trainable_tokens": dict(zip(SPLITS, trainable)),
        "pad_tokens": {s: p.pad_tokens for s, p in zip(SPLITS, packers)},
        "dropped": {
            "long": sum(f.long for f in reader.stats),
            "empty": sum(f.empty for f in reader.stats),
        },
        "on_long": settings["on_long"],
        "inputs": [asdict(f) for f in reader.stats],
    }
    manifest = CorpusManifest(
        seq_len=seq_len,
        dtype=np_dtype.str,
        tokenizer=tok.info(),
        splits=splits,
        valid_fraction=settings["valid_fraction"],
        stats=stats,
        loss_mask=True,
    )
    write_manifest(out, manifest)
    return SftResult(manifest, written[0], len(done) - written[0], list(reader.stats))


def _refuse_another_corpus(out: Path, key: str, files: list[list], settings: dict) -> None:
    """An --out whose state file is another corpus's: refused, naming the first difference."""
    state = _read_state(out) if out.is_dir() else None
    if state is None or state.get("key") == key:
        return
    old = state.get("settings") if isinstance(state.get("settings"), dict) else {}
    why = "made from other inputs or settings"
    if old.get("kind") != "sft":
        why = "a pre-training corpus made by tools/preprocess.py"
    else:
        for k, flag in SETTING_FLAGS.items():
            if old.get(k) != settings[k]:
                show = (lambda v: f"{str(v)[:12]}…") if k == "tokenizer" else repr
                why = f"made with {flag} {show(old.get(k))}, this run has {show(settings[k])}"
                break
        else:
            old_files = state.get("inputs") or []
            if [f[0] for f in old_files] != [f[0] for f in files]:
                why = f"made from other inputs ({len(old_files)} files; this run has {len(files)})"
            else:
                changed = [n[0] for o, n in zip(old_files, files) if list(o) != list(n)]
                if changed:
                    why = f"input {changed[0]} changed since (size or mtime)"
    raise BadInputError(
        f"--out {out}: holds another corpus ({why}); pick another --out, or delete the "
        "directory yourself to rebuild it"
    )


def _check_split_sizes(valid_fraction: float, examples: list[int], stats) -> None:
    if examples[0] == 0:
        long, empty = sum(f.long for f in stats), sum(f.empty for f in stats)
        raise BadInputError(
            f"no training example: the train split got none ({long} dropped as longer than "
            f"seq_len + 1, {empty} with nothing to train on); check the inputs, --format and "
            "--seq-len"
        )
    if valid_fraction > 0 and examples[1] == 0:
        total = sum(examples)
        enough = 2 / max(total, 1)
        fix = (
            f"raise --valid-fraction (about {enough:.2g} would give one)"
            if enough < 0.5
            else "the input is too small for a valid split"
        )
        raise BadInputError(
            f"--valid-fraction {valid_fraction}: the valid split got no example of {total} (a "
            f"run with validation on needs one); {fix}, or pass --valid-fraction 0 for a corpus "
            "without a valid split (train with validation off)"
        )
