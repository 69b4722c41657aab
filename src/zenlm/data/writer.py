"""preprocess(): text/JSONL/.gz inputs -> tokenized, packed, sharded corpus with a manifest.

Pipeline (the calling thread, plus `num_workers` encoder threads or processes):

    read (caller, in input order) -> chunks of documents -> workers: split by hash + encode + EOS
    -> results in chunk order (bounded in flight) -> caller: pack per split -> tar shards -> manifest

Threads are the default: SentencePiece releases the GIL while encoding, so N threads use N cores
with no start-up or pickling cost; the caller's Python work (JSON, tar) overlaps with encoding.
Processes (pool="process") also spread the hashing and id conversion, for machines where the
GIL-holding part becomes the bottleneck (many cores). tools/bench/preprocess.py measures both.

The tokenizer is a SentencePiece .model file or a Hugging Face tokenizer directory. With a
tokenizer.json, `tokenizers` encodes each chunk with its Rust `encode_batch` (GIL released) on
its own thread pool: the threads of this process share that one pool (so N threads never run
more than the pool's threads; tools/preprocess.py sizes it to --workers), and each spawned worker
process switches it off (TOKENIZERS_PARALLELISM=false), so N processes use N cores, not N x all.

Invariants:
- Document order, the split and the packing do not depend on num_workers or the chunk size:
  results are consumed in submission order and the packer is a sequential stream.
- A document goes to "valid" iff blake2b(text) / 2**64 < valid_fraction (so duplicates share a
  split and the assignment is stable across runs and machines).
- The manifest is written last; its presence means the corpus is complete. A state file records
  each completed shard (name, samples, tokens, sha256) under a key of the inputs and settings; a
  rerun with the same key re-tokenizes but does not rewrite shards whose sha256 still matches.
- Nothing is lost: every argument, input and the tokenizer are checked before any work; an
  out_dir holding anything but this same corpus (another key, no state file, other files) is
  refused; a run that fails removes what it created (shards, temp files, state, directories) and
  restores the state file it found. Only a killed run leaves a partial corpus, which the same
  command resumes and any other refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zenlm.data.encode import Encoder, encode_in_worker, init_worker
from zenlm.data.format import (
    MANIFEST_NAME,
    SPLITS,
    CorpusManifest,
    ShardInfo,
    SplitInfo,
    dtype_for_vocab,
    write_manifest,
)
from zenlm.data.pack import Packer, ShardSink, sample_tar_bytes, sha256_file
from zenlm.data.readers import BadInputError, DocumentReader, check_inputs
from zenlm.data.tokenizer import load_tokenizer

STATE_NAME = ".preprocess-state.json"
DEFAULT_VALID_FRACTION = 0.01
"""1% of documents (by hash) for validation, like Megatron's small valid split. A split that
gets less than one sample is an error (see preprocess_corpus), never a silent empty split."""
OWN_FILE = re.compile(r"((train|valid)-\d{6}\.tar|manifest\.json|\.preprocess-state\.json)(\.tmp)?")
"""Names the writer creates in a corpus directory (the only ones a failed run removes)."""
SETTING_FLAGS = {
    "tokenizer": "--tokenizer",
    "seq_len": "--seq-len",
    "samples_per_shard": "--shard-size-mb",
    "valid_fraction": "--valid-fraction",
    "text_field": "--text-field",
    "text_mode": "--text-mode",
    "add_bos": "--add-bos",
    "dtype": "--dtype",
}
"""Each setting in the state file, named as the tool's flag (for 'holds another corpus')."""
POOLS = ("thread", "process")
CHUNK_CHARS = 1 << 20
"""Characters of text per task given to a worker: large enough to amortize per-task overhead,
small enough to keep all workers busy and memory flat (at most 2 x num_workers chunks in flight)."""


def _chunks(docs: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _in_order(submit, chunks: Iterator[list[str]], max_in_flight: int) -> Iterator:
    """Submit chunks, yield their results in submission order, at most max_in_flight pending.

    (Pool.imap / Executor.map would read the whole input ahead; this keeps memory flat.)"""
    pending: deque = deque()
    for c in chunks:
        pending.append(submit(c))
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _encoded(
    chunks: Iterator[list[str]],
    tokenizer_path: str,
    add_bos: bool,
    valid_fraction: float,
    num_workers: int,
    pool: str,
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """Encoded chunks in input order, by num_workers threads or processes (1: this thread)."""
    if num_workers <= 1:
        encoder = Encoder(tokenizer_path, add_bos)
        yield from (encoder(c, valid_fraction) for c in chunks)
    elif pool == "thread":
        encoder = Encoder(tokenizer_path, add_bos)  # shared: both libraries' encode is thread-safe
        with ThreadPoolExecutor(num_workers) as ex:
            yield from _in_order(
                lambda c: ex.submit(encoder, c, valid_fraction), chunks, 2 * num_workers
            )
    else:
        # spawn: safe whatever threads the caller runs (also tokenizers' pool, which a fork after
        # its use would disable). Each worker imports encode.py (numpy, the tokenizer library)
        # and whatever zenlm/data/__init__.py imports, once per run.
        init = (tokenizer_path, add_bos)
        with ProcessPoolExecutor(num_workers, mp.get_context("spawn"), init_worker, init) as ex:
            yield from _in_order(
                lambda c: ex.submit(encode_in_worker, c, valid_fraction), chunks, 2 * num_workers
            )


@dataclass
class PreprocessResult:
    manifest: CorpusManifest
    shards_written: int = 0
    shards_skipped: int = 0
    bad_records: dict[str, dict[str, int]] = field(default_factory=dict)


def _input_files(inputs: Sequence[str | os.PathLike]) -> list[list]:
    """[absolute path, size, mtime_ns] of every input: the inputs' part of the rerun key."""
    return [[str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in inputs]


def _settings_key(inputs: Sequence[str | os.PathLike], settings: dict) -> str:
    return _key(_input_files(inputs), settings)


def _key(files: list[list], settings: dict) -> str:
    blob = json.dumps({"inputs": [tuple(f) for f in files], **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_state(out_dir: Path) -> dict | None:
    """The state file's content; None when absent, BadInputError when unreadable."""
    path = out_dir / STATE_NAME
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("shards", []), list):
            raise ValueError("not a state object")
        return state
    except (OSError, ValueError) as e:
        raise BadInputError(
            f"--out {out_dir}: its {STATE_NAME} is unreadable ({e}), so this run cannot tell "
            "whether the directory holds its corpus; pick another --out or delete it yourself"
        ) from e


def _load_complete(out_dir: Path, key: str, state: dict | None = None) -> dict[str, ShardInfo]:
    """Shards recorded complete under the same key whose file still has the recorded sha256."""
    if state is None:
        try:
            state = _read_state(out_dir)
        except BadInputError:
            return {}
    if state is None or state.get("key") != key:
        return {}
    complete = {}
    for d in state.get("shards", []):
        try:
            info = ShardInfo(**d)
        except TypeError:
            continue
        path = out_dir / info.path
        if path.is_file() and sha256_file(path) == info.sha256:
            complete[info.path] = info
    return complete


def _save_state(
    out_dir: Path, key: str, shards: list[ShardInfo], record: dict | None = None
) -> None:
    tmp = out_dir / (STATE_NAME + ".tmp")
    state = {"key": key, **(record or {}), "shards": [asdict(s) for s in shards]}
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, out_dir / STATE_NAME)


def _show(setting: str, value) -> str:
    if setting == "tokenizer":
        return f"fingerprint {str(value)[:12]}…"
    if setting == "samples_per_shard":
        return f"{value} samples per shard"
    if setting == "add_bos":
        return "on" if value else "off"
    return repr(value) if isinstance(value, str) else str(value)


def _difference(state: dict, files: list[list], settings: dict) -> str:
    """What makes the corpus in a directory another one than this run's, in flag terms."""
    old = state.get("settings")
    if not isinstance(old, dict):
        return "made from other inputs or settings"
    for k, flag in SETTING_FLAGS.items():
        if old.get(k) != settings.get(k):
            return f"made with {flag} {_show(k, old.get(k))}, this run has {_show(k, settings[k])}"
    old_files = state.get("inputs") or []
    old_paths, new_paths = [f[0] for f in old_files], [f[0] for f in files]
    if old_paths != new_paths:
        first = f", the first {old_paths[0]}" if old_paths else ""
        return f"made from other inputs: {len(old_paths)} files{first}; this run has {len(files)}"
    for o, n in zip(old_files, files):
        if list(o) != list(n):
            return f"input {n[0]} changed since (size or mtime)"
    return "made from other inputs or settings"


def _probe_writable(directory: Path, flag: str, out: Path) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise BadInputError(f"{flag} {out}: cannot write in {directory} ({e.strerror})") from e


class _OutDir:
    """The corpus directory of one run: refused unless new, empty or this same corpus; undo()
    removes what the run created there and puts back the state file it found."""

    def __init__(self, out: Path, key: str, files: list[list], settings: dict):
        self.out = out
        self.missing: list[Path] = []  # directories to create, outermost first
        self.created: list[Path] = []
        self.before: set[str] = set()
        self.state: dict | None = None
        self.state_bytes: bytes | None = None
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise BadInputError(
                    f"--out {out}: exists and is not a directory; pick another --out"
                )
            try:
                entries = sorted(os.listdir(out))
            except OSError as e:
                raise BadInputError(f"--out {out}: cannot list the directory ({e.strerror})") from e
            self.state = _read_state(out)
            if self.state is not None:
                if self.state.get("key") != key:
                    raise BadInputError(
                        f"--out {out}: holds another corpus "
                        f"({_difference(self.state, files, settings)}); pick another --out, "
                        "or delete the directory yourself to rebuild it"
                    )
                self.state_bytes = (out / STATE_NAME).read_bytes()
            elif MANIFEST_NAME in entries:
                raise BadInputError(
                    f"--out {out}: holds a corpus (manifest.json) without the {STATE_NAME} that "
                    "would show it is this run's; pick another --out, or delete it yourself"
                )
            elif entries:
                shown = ", ".join(entries[:3]) + (
                    f", … ({len(entries)} entries)" if len(entries) > 3 else ""
                )
                raise BadInputError(
                    f"--out {out}: directory is not empty ({shown}) and holds no corpus of this "
                    "run; pick a new or empty directory"
                )
            self.before = set(entries)
            _probe_writable(out, "--out", out)
        else:
            parent = out.absolute()
            while not (parent.exists() or parent.is_symlink()):
                self.missing.append(parent)
                parent = parent.parent
            self.missing.reverse()
            if not parent.is_dir():
                raise BadInputError(f"--out {out}: {parent} is a file, not a directory")
            _probe_writable(parent, "--out", out)

    def create(self) -> None:
        for d in self.missing:
            d.mkdir()
            self.created.append(d)

    def undo(self) -> None:
        """Remove the files this run created (writer names only) and the directories it made;
        restore the state file it found. Files that were there before are never deleted."""
        if not self.out.is_dir():
            return
        for name in os.listdir(self.out):
            if name not in self.before and OWN_FILE.fullmatch(name):
                (self.out / name).unlink(missing_ok=True)
        if self.state_bytes is not None:
            path = self.out / STATE_NAME
            if not path.is_file() or path.read_bytes() != self.state_bytes:
                tmp = self.out / (STATE_NAME + ".tmp")
                tmp.write_bytes(self.state_bytes)
                os.replace(tmp, path)
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:  # something else was put there meanwhile: keep it
                break


def _check_arguments(
    seq_len: int,
    shard_size_bytes: int,
    valid_fraction: float,
    num_workers: int | None,
    pool: str,
    chunk_chars: int,
) -> None:
    if seq_len < 1:
        raise BadInputError(f"--seq-len must be >= 1 (tokens per sample), got {seq_len}")
    if shard_size_bytes <= 0:
        raise BadInputError(
            f"--shard-size-mb must be > 0, got {shard_size_bytes / 2**20:.3g} "
            f"({shard_size_bytes} bytes)"
        )
    if not (math.isfinite(valid_fraction) and 0.0 <= valid_fraction < 1.0):
        raise BadInputError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    if num_workers is not None and num_workers < 1:
        raise BadInputError(
            f"--workers must be >= 1 (1 encodes in the calling thread), got {num_workers}"
        )
    if pool not in POOLS:
        raise BadInputError(f"--pool must be one of {POOLS}, got {pool!r}")
    if chunk_chars < 1:
        raise BadInputError(f"chunk_chars must be >= 1, got {chunk_chars}")


def _check_split_sizes(
    seq_len: int,
    valid_fraction: float,
    samples: list[int],
    tokens: list[int],
    docs: list[int],
) -> None:
    """A split that would hold no sample is an error (the trainer refuses it), naming why."""
    need = seq_len + 1
    total = sum(tokens)
    if samples[0] == 0:
        raise BadInputError(
            f"--seq-len {seq_len} is longer than the corpus: the train split got {tokens[0]} "
            f"tokens ({docs[0]} documents, EOS included; {total} tokens in all), fewer than one "
            f"sample of seq_len + 1 = {need}; lower --seq-len or give more input"
        )
    if valid_fraction > 0 and samples[1] == 0:
        enough = 2 * need / max(total, 1)
        fix = (
            f"raise --valid-fraction (about {enough:.2g} would give one)"
            if enough < 0.5
            else "the input is too small for a valid split"
        )
        raise BadInputError(
            f"--valid-fraction {valid_fraction}: the valid split got {docs[1]} documents, "
            f"{tokens[1]} tokens, fewer than one sample of seq_len + 1 = {need} (a run with "
            f"validation on needs one); {fix}, or pass --valid-fraction 0 for a corpus without "
            "a valid split (train with validation off)"
        )


def preprocess_corpus(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    seq_len: int,
    shard_size_bytes: int = 256 << 20,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    text_field: str = "text",
    text_mode: str = "file",
    num_workers: int | None = None,
    pool: str = "thread",
    add_bos: bool = False,
    dtype: str | None = None,
    max_bad_fraction: float = 0.01,
    chunk_chars: int = CHUNK_CHARS,
    progress: bool = True,
) -> PreprocessResult:
    """Like preprocess(), returning also what this run wrote and skipped."""
    # Everything that can be checked without tokenizing, before anything is written.
    _check_arguments(seq_len, shard_size_bytes, valid_fraction, num_workers, pool, chunk_chars)
    reader = DocumentReader(text_field, text_mode, max_bad_fraction)
    check_inputs(inputs)
    tok = load_tokenizer(tokenizer_path)
    try:
        np_dtype = (
            dtype_for_vocab(tok.vocab_size) if dtype is None else np.dtype(dtype).newbyteorder("<")
        )
    except TypeError:
        np_dtype = None
    if np_dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise BadInputError(f"--dtype must be uint16 or uint32, got {dtype!r}")
    if add_bos and tok.bos_id < 0:
        raise BadInputError(
            f"--add-bos: tokenizer {tokenizer_path} has no BOS token (no bos_token in its "
            "tokenizer_config.json / special_tokens_map.json, or a model without one); drop "
            "--add-bos"
        )
    if tok.vocab_size > np.iinfo(np_dtype).max + 1:
        raise BadInputError(
            f"--dtype {np_dtype.name} cannot hold the ids of {tokenizer_path} "
            f"(vocab_size {tok.vocab_size}); use --dtype uint32"
        )
    tokens_per_sample = seq_len + 1
    sample_bytes = sample_tar_bytes(tokens_per_sample, np_dtype.itemsize)
    if shard_size_bytes < sample_bytes:
        raise BadInputError(
            f"--shard-size-mb {shard_size_bytes / 2**20:.3g} is smaller than one sample "
            f"({sample_bytes} tar bytes = {sample_bytes / 2**20:.4g} MiB at --seq-len {seq_len}, "
            f"{np_dtype.name}); give a shard room for many samples (default 256)"
        )
    samples_per_shard = shard_size_bytes // sample_bytes
    out = Path(out_dir)
    settings = dict(
        tokenizer=tok.fingerprint,
        seq_len=seq_len,
        samples_per_shard=samples_per_shard,
        valid_fraction=valid_fraction,
        text_field=text_field,
        text_mode=text_mode,
        add_bos=add_bos,
        dtype=np_dtype.str,
    )
    files = _input_files(inputs)
    key = _key(files, settings)
    target = _OutDir(out, key, files, settings)  # refuses another corpus, other files
    record = {"inputs": files, "settings": settings}
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    target.create()
    sinks: list[ShardSink] = []
    try:
        result = _run(
            inputs, out, tok, key, record, target.state, reader, settings, sinks,
            add_bos, workers, pool, chunk_chars, progress,
        )  # fmt: skip
    except BaseException:
        for sink in sinks:
            sink.abort()
        target.undo()
        raise
    return result


def _run(
    inputs, out, tok, key, record, state, reader, settings, sinks,
    add_bos, workers, pool, chunk_chars, progress,
) -> PreprocessResult:  # fmt: skip
    seq_len, valid_fraction = settings["seq_len"], settings["valid_fraction"]
    np_dtype = np.dtype(settings["dtype"])
    complete = _load_complete(out, key, state)
    done: list[ShardInfo] = []  # completed shards of both splits, in completion order
    written = [0]

    def on_shard(info: ShardInfo, skipped: bool) -> None:
        done.append(info)
        if not skipped:
            written[0] += 1
            # after the rename: the state never lists a partial shard
            _save_state(out, key, done, record)

    packers = [Packer(seq_len + 1) for _ in SPLITS]
    spp = settings["samples_per_shard"]
    sinks += [ShardSink(out, s, spp, np_dtype, complete, on_shard) for s in SPLITS]
    docs_per_split = [0] * len(SPLITS)
    tokens_per_split = [0] * len(SPLITS)
    chunks = _chunks(reader.iter_documents(inputs), chunk_chars)
    bar = tqdm(desc="preprocess", unit="tok", unit_scale=True, disable=not progress)
    encoded_chunks = _encoded(chunks, tok.path, add_bos, valid_fraction, workers, pool)
    try:
        for encoded in encoded_chunks:
            for s, (flat, lens) in enumerate(encoded):
                docs_per_split[s] += len(lens)
                tokens_per_split[s] += len(flat)
                for sample, starts in packers[s].add(flat, lens):
                    sinks[s].write(sample, starts)
                bar.update(len(flat))
    finally:
        encoded_chunks.close()  # shuts the worker pool down, also on an error
        bar.close()
    for sink in sinks:
        sink.close()
    _check_split_sizes(
        seq_len, valid_fraction, [k.samples for k in sinks], tokens_per_split, docs_per_split
    )

    splits = {s: SplitInfo([i for i in done if i.path.startswith(s + "-")]) for s in SPLITS}
    stats = {
        "documents": dict(zip(SPLITS, docs_per_split)),
        "dropped_tail_tokens": {s: p.leftover_tokens for s, p in zip(SPLITS, packers)},
        "add_bos": add_bos,
        "inputs": [asdict(f) for f in reader.stats],
    }
    manifest = CorpusManifest(
        seq_len=seq_len,
        dtype=np_dtype.str,
        tokenizer=tok.info(),
        splits=splits,
        valid_fraction=valid_fraction,
        stats=stats,
    )
    write_manifest(out, manifest)
    return PreprocessResult(
        manifest,
        shards_written=written[0],
        shards_skipped=len(done) - written[0],
        bad_records={f.path: dict(f.bad) for f in reader.stats if f.bad_total},
    )


def preprocess(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    seq_len: int,
    shard_size_bytes: int = 256 << 20,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    text_field: str = "text",
    num_workers: int | None = None,
    **kwargs,
) -> CorpusManifest:
    """Tokenize, pack and shard `inputs` into a corpus at out_dir (see module docstring).

    num_workers=None uses every core; 1 encodes in the calling thread. Other keyword arguments
    (text_mode, pool, add_bos, dtype, max_bad_fraction, chunk_chars, progress) go to
    preprocess_corpus. Bad arguments, inputs, tokenizer or out_dir raise BadInputError /
    TokenizerError (zenlm.errors.ZenlmError) naming the culprit, before any work; a failed run
    leaves out_dir as it found it.
    """
    return preprocess_corpus(
        inputs,
        out_dir,
        tokenizer_path,
        seq_len,
        shard_size_bytes,
        valid_fraction,
        text_field,
        num_workers=num_workers,
        **kwargs,
    ).manifest
