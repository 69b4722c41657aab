"""preprocess(): text/JSONL/.gz inputs -> tokenized, packed, sharded corpus with a manifest.

Pipeline (the calling thread, plus `num_workers` encoder threads or processes):

    read (caller, in input order) -> chunks of documents -> workers: split by hash + encode + EOS
    -> results in chunk order (bounded in flight) -> caller: pack per split -> tar shards -> manifest

Threads are the default: SentencePiece releases the GIL while encoding, so N threads use N cores
with no start-up or pickling cost; the caller's Python work (JSON, tar) overlaps with encoding.
Processes (pool="process") also spread the hashing and id conversion, for machines where the
GIL-holding part becomes the bottleneck (many cores). tools/bench/preprocess.py measures both.

Invariants:
- Document order, the split and the packing do not depend on num_workers or the chunk size:
  results are consumed in submission order and the packer is a sequential stream.
- A document goes to "valid" iff blake2b(text) / 2**64 < valid_fraction (so duplicates share a
  split and the assignment is stable across runs and machines).
- The manifest is written last; its presence means the corpus is complete. A state file records
  each completed shard (name, samples, tokens, sha256) under a key of the inputs and settings; a
  rerun with the same key re-tokenizes but does not rewrite shards whose sha256 still matches.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zenlm.data.encode import Encoder, encode_in_worker, init_worker
from zenlm.data.format import (
    SPLITS,
    CorpusManifest,
    ShardInfo,
    SplitInfo,
    dtype_for_vocab,
    write_manifest,
)
from zenlm.data.pack import Packer, ShardSink, sample_tar_bytes, sha256_file
from zenlm.data.readers import DocumentReader
from zenlm.data.tokenizer import load_tokenizer

STATE_NAME = ".preprocess-state.json"
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
    model_path: str,
    add_bos: bool,
    valid_fraction: float,
    num_workers: int,
    pool: str,
) -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
    """Encoded chunks in input order, by num_workers threads or processes (1: this thread)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if num_workers <= 1:
        encoder = Encoder(model_path, add_bos)
        yield from (encoder(c, valid_fraction) for c in chunks)
    elif pool == "thread":
        encoder = Encoder(model_path, add_bos)  # shared: SentencePiece encode is thread-safe
        with ThreadPoolExecutor(num_workers) as ex:
            yield from _in_order(
                lambda c: ex.submit(encoder, c, valid_fraction), chunks, 2 * num_workers
            )
    else:
        # spawn: safe whatever threads the caller runs. Each worker imports encode.py (numpy,
        # sentencepiece) and whatever zenlm/data/__init__.py imports, once per run.
        init = (model_path, add_bos)
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


def _settings_key(inputs: Sequence[str | os.PathLike], settings: dict) -> str:
    files = [(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in inputs]
    blob = json.dumps({"inputs": files, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_complete(out_dir: Path, key: str) -> dict[str, ShardInfo]:
    """Shards recorded complete under the same key whose file still has the recorded sha256."""
    try:
        state = json.loads((out_dir / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if state.get("key") != key:
        return {}
    complete = {}
    for d in state.get("shards", []):
        info = ShardInfo(**d)
        path = out_dir / info.path
        if path.is_file() and sha256_file(path) == info.sha256:
            complete[info.path] = info
    return complete


def _save_state(out_dir: Path, key: str, shards: list[ShardInfo]) -> None:
    tmp = out_dir / (STATE_NAME + ".tmp")
    tmp.write_text(json.dumps({"key": key, "shards": [asdict(s) for s in shards]}, indent=1))
    os.replace(tmp, out_dir / STATE_NAME)


def preprocess_corpus(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    seq_len: int,
    shard_size_bytes: int = 256 << 20,
    valid_fraction: float = 0.0,
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
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    tok = load_tokenizer(tokenizer_path)
    np_dtype = (
        dtype_for_vocab(tok.vocab_size) if dtype is None else np.dtype(dtype).newbyteorder("<")
    )
    if np_dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        raise ValueError(f"dtype must be uint16 or uint32, got {dtype!r}")
    if tok.vocab_size > np.iinfo(np_dtype).max + 1:
        raise ValueError(f"dtype {np_dtype} cannot hold vocab_size {tok.vocab_size}")
    tokens_per_sample = seq_len + 1
    samples_per_shard = max(
        1, shard_size_bytes // sample_tar_bytes(tokens_per_sample, np_dtype.itemsize)
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
    key = _settings_key(inputs, settings)
    complete = _load_complete(out, key)
    done: list[ShardInfo] = []  # completed shards of both splits, in completion order
    written = [0]

    def on_shard(info: ShardInfo, skipped: bool) -> None:
        done.append(info)
        if not skipped:
            written[0] += 1
            _save_state(out, key, done)  # after the rename: the state never lists a partial shard

    packers = [Packer(tokens_per_sample) for _ in SPLITS]
    sinks = [ShardSink(out, s, samples_per_shard, np_dtype, complete, on_shard) for s in SPLITS]
    docs_per_split = [0] * len(SPLITS)
    reader = DocumentReader(text_field, text_mode, max_bad_fraction)
    chunks = _chunks(reader.iter_documents(inputs), chunk_chars)
    bar = tqdm(desc="preprocess", unit="tok", unit_scale=True, disable=not progress)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    for encoded in _encoded(chunks, tok.path, add_bos, valid_fraction, workers, pool):
        for s, (flat, lens) in enumerate(encoded):
            docs_per_split[s] += len(lens)
            for sample, starts in packers[s].add(flat, lens):
                sinks[s].write(sample, starts)
            bar.update(len(flat))
    for sink in sinks:
        sink.close()
    bar.close()

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
    valid_fraction: float = 0.0,
    text_field: str = "text",
    num_workers: int | None = None,
    **kwargs,
) -> CorpusManifest:
    """Tokenize, pack and shard `inputs` into a corpus at out_dir (see module docstring).

    num_workers=None uses every core; 0 or 1 encodes in the calling thread. Other keyword
    arguments (text_mode, pool, add_bos, dtype, max_bad_fraction, chunk_chars, progress) go to
    preprocess_corpus.
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
