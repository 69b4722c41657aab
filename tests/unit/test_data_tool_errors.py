"""Every bad input to the data tools is one `error:` line naming the culprit, exit code 2, no
traceback, and nothing on disk changed (docs/errors.md, "Corpus and tokenizer tools").

Each case runs the tool as a user would (zenlm.testing.cli_probe.run_tool_probe, a fresh
interpreter) on small data made once per module: a JSONL text of ~100 documents, a 384-piece
tokenizer and a corpus preprocessed from them. The files a case may touch (the shared data and
the case's own directory) are snapshotted before and compared after: no file is modified, added
or removed, and an --out that did not exist still does not.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from zenlm.data import format as fmt
from zenlm.data.tokenizer import train_tokenizer
from zenlm.data.writer import preprocess_corpus
from zenlm.testing.cli_probe import changed, run_tool_probe, snapshot
from zenlm.testing.text_corpus import write_text

PRE, TOK, VER = "tools/preprocess.py", "tools/train_tokenizer.py", "tools/verify_corpus.py"
SEQ = 32


@dataclass(frozen=True)
class Data:
    root: Path
    text: Path
    tok: Path
    corpus: Path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("data")
    text = write_text(root / "text.jsonl", 120, seed=3)  # ~16 KB
    tok = train_tokenizer([text], root / "tok.model", 384, num_threads=1, progress=False)
    corpus = root / "corpus"
    preprocess_corpus(
        [text], corpus, tok.path, SEQ, 8 * 2048, valid_fraction=0.1, num_workers=1, progress=False
    )
    return Data(root, text, Path(tok.path), corpus)


# ------------------------------------------------------------------ case set-ups (in tmp_path)


def write(name: str, content: bytes) -> Callable[[Path, Data], None]:
    def setup(case: Path, d: Data) -> None:
        (case / name).write_bytes(content)

    return setup


def gzip_of(name: str, content: bytes) -> Callable[[Path, Data], None]:
    return write(name, gzip.compress(content))


def truncated_gzip(case: Path, d: Data) -> None:
    """A .gz whose first 64 KiB decompress fine (the up-front check passes) but that ends early:
    found while reading, after the first shards are written."""
    raw = d.text.read_bytes() * 30  # ~480 KB
    packed = gzip.compress(raw)
    (case / "cut.jsonl.gz").write_bytes(packed[: int(len(packed) * 0.7)])


def a_dir(name: str, files: dict[str, bytes] | None = None) -> Callable[[Path, Data], None]:
    def setup(case: Path, d: Data) -> None:
        (case / name).mkdir()
        for f, content in (files or {}).items():
            (case / name / f).write_bytes(content)

    return setup


def corpus_copy(mutate: Callable[[Path], None] | None = None) -> Callable[[Path, Data], None]:
    def setup(case: Path, d: Data) -> None:
        shutil.copytree(d.corpus, case / "c")
        if mutate:
            mutate(case / "c")

    return setup


def flip(name: str, at: int | str, value: bytes) -> Callable[[Path], None]:
    """Overwrite bytes of a shard: at an offset, or at 'tokens' = inside the first token record."""

    def mutate(c: Path) -> None:
        path = c / name
        off = at
        if at == "tokens":
            with tarfile.open(path) as tf:
                first = next(m for m in tf.getmembers() if m.name.endswith(".tokens"))
            off = first.offset_data + 6
        raw = bytearray(path.read_bytes())
        raw[off : off + len(value)] = value
        path.write_bytes(bytes(raw))

    return mutate


def random_bytes(name: str) -> Callable[[Path], None]:
    def mutate(c: Path) -> None:
        path = c / name
        path.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(path.stat().st_size)))

    return mutate


def edit_manifest(**changes) -> Callable[[Path], None]:
    def mutate(c: Path) -> None:
        d = json.loads((c / fmt.MANIFEST_NAME).read_text())
        for k, v in changes.items():
            d[k] = v
        (c / fmt.MANIFEST_NAME).write_text(json.dumps(d))

    return mutate


def remove(name: str) -> Callable[[Path], None]:
    return lambda c: (c / name).unlink()


def foreign_shard(c: Path) -> None:
    """train-000001.tar replaced by train-000002.tar's bytes (same size, other samples)."""
    shutil.copy(c / "train-000002.tar", c / "train-000001.tar")


def several(*mutations: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(c: Path) -> None:
        for m in mutations:
            m(c)

    return mutate


# ------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Case:
    id: str
    tool: str
    args: list[str]
    """Placeholders: {text} {tok} {corpus} {root} (shared data), {case} (this case's dir)."""
    culprit: list[str]
    """Substrings the error line must contain (formatted like args): the culprit, the fix."""
    setup: Callable[[Path, Data], None] | None = None
    out: str | None = None
    """The case's --out (formatted): must be exactly as before (absent stays absent)."""
    extra: list[str] = field(default_factory=list)


def pre(*args: str) -> list[str]:
    """preprocess with the usual flags; later flags override (argparse: last one wins)."""
    base = ["--tokenizer", "{tok}", "--seq-len", str(SEQ), "--workers", "1", "--no-progress"]
    return [*base, "--valid-fraction", "0.1", *args]


NEW = "{case}/out/corpus"

CASES = [
    # --- preprocess: inputs, all checked before any tokenizing
    Case(
        "pre-second-input-missing",
        PRE,
        ["{text}", "{case}/missing.jsonl", *pre("--out", NEW)],
        ["{case}/missing.jsonl", "not found"],
        out=NEW,
    ),
    Case(
        "pre-input-is-dir",
        PRE,
        ["{text}", "{case}/d", *pre("--out", NEW)],
        ["{case}/d", "not a regular file"],
        a_dir("d"),
        out=NEW,
    ),
    Case(
        "pre-input-empty",
        PRE,
        ["{text}", "{case}/empty.jsonl", *pre("--out", NEW)],
        ["{case}/empty.jsonl", "empty"],
        write("empty.jsonl", b""),
        out=NEW,
    ),
    Case(
        "pre-gz-not-gzip",
        PRE,
        ["{case}/fake.jsonl.gz", "{text}", *pre("--out", NEW)],
        ["{case}/fake.jsonl.gz", "not gzip"],
        write("fake.jsonl.gz", b'{"text": "plain json"}\n'),
        out=NEW,
    ),
    Case(
        "pre-binary-input",
        PRE,
        ["{text}", "{case}/blob.bin", *pre("--out", NEW)],
        ["{case}/blob.bin", "binary", "NUL byte"],
        write("blob.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200)),
        out=NEW,
    ),
    Case(
        "pre-utf16-input",
        PRE,
        ["{case}/u16.txt", *pre("--out", NEW)],
        ["{case}/u16.txt", "UTF-16", "convert it to UTF-8"],
        write("u16.txt", "some text in utf-16\n".encode("utf-16")),
        out=NEW,
    ),
    Case(
        "pre-gzip-without-gz-name",
        PRE,
        ["{case}/packed.jsonl", *pre("--out", NEW)],
        ["{case}/packed.jsonl", "rename it to packed.jsonl.gz"],
        gzip_of("packed.jsonl", b'{"text": "x"}\n'),
        out=NEW,
    ),
    Case(
        "pre-gzip-truncated-mid-file",
        PRE,
        ["{case}/cut.jsonl.gz", *pre("--out", NEW, "--shard-size-mb", "0.01")],
        ["{case}/cut.jsonl.gz", "cannot read input after"],
        truncated_gzip,
        out=NEW,
    ),
    Case(
        "pre-too-many-bad-records",
        PRE,
        ["{text}", "{case}/bad.jsonl", *pre("--out", NEW, "--shard-size-mb", "0.01")],
        ["{case}/bad.jsonl", "records are bad", "max_bad_fraction"],
        write("bad.jsonl", b'{"text": "fine"}\n{"text": broken\n{"other": 1}\n'),
        out=NEW,
    ),
    # --- preprocess: tokenizer
    Case(
        "pre-tokenizer-text-file",
        PRE,
        ["{text}", *pre("--out", NEW, "--tokenizer", "{text}")],
        ["{text}", "not a SentencePiece model"],
        out=NEW,
    ),
    Case(
        "pre-tokenizer-dir",
        PRE,
        ["{text}", *pre("--out", NEW, "--tokenizer", "{root}")],
        ["{root}", "is a directory"],
        out=NEW,
    ),
    Case(
        "pre-tokenizer-empty",
        PRE,
        ["{text}", *pre("--out", NEW, "--tokenizer", "{case}/e.model")],
        ["{case}/e.model", "empty file"],
        write("e.model", b""),
        out=NEW,
    ),
    Case(
        "pre-tokenizer-missing",
        PRE,
        ["{text}", *pre("--out", NEW, "--tokenizer", "{case}/none.model")],
        ["{case}/none.model", "train_tokenizer.py"],
        out=NEW,
    ),
    # --- preprocess: numbers
    Case(
        "pre-seq-len-longer-than-corpus",
        PRE,
        ["{text}", *pre("--out", NEW, "--seq-len", "100000", "--shard-size-mb", "1")],
        ["--seq-len 100000", "longer than the corpus", "tokens", "100001"],
        out=NEW,
    ),
    Case("pre-seq-len-0", PRE, ["{text}", *pre("--out", NEW, "--seq-len", "0")], ["--seq-len"]),
    Case("pre-seq-len-neg", PRE, ["{text}", *pre("--out", NEW, "--seq-len", "-4")], ["--seq-len"]),
    Case(
        "pre-seq-len-not-int",
        PRE,
        ["{text}", *pre("--out", NEW, "--seq-len", "abc")],
        ["--seq-len", "invalid int value"],
    ),
    Case(
        "pre-shard-size-0",
        PRE,
        ["{text}", *pre("--out", NEW, "--shard-size-mb", "0")],
        ["--shard-size-mb", "> 0"],
        out=NEW,
    ),
    Case(
        "pre-shard-size-neg",
        PRE,
        ["{text}", *pre("--out", NEW, "--shard-size-mb", "-2")],
        ["--shard-size-mb"],
        out=NEW,
    ),
    Case(
        "pre-shard-smaller-than-sample",
        PRE,
        ["{text}", *pre("--out", NEW, "--shard-size-mb", "0.0001")],
        ["--shard-size-mb 0.0001", "smaller than one sample"],
        out=NEW,
    ),
    Case(
        "pre-valid-fraction-1",
        PRE,
        ["{text}", *pre("--out", NEW, "--valid-fraction", "1")],
        ["--valid-fraction", "[0, 1)"],
        out=NEW,
    ),
    Case(
        "pre-valid-fraction-neg",
        PRE,
        ["{text}", *pre("--out", NEW, "--valid-fraction", "-0.1")],
        ["--valid-fraction"],
        out=NEW,
    ),
    Case(
        "pre-valid-split-empty-default",
        PRE,
        ["{case}/small.jsonl", "--tokenizer", "{tok}", "--seq-len", "64", "--out", NEW],
        ["--valid-fraction 0.01", "valid split got", "--valid-fraction 0"],
        write("small.jsonl", b"".join(b'{"text": "doc %d says hi"}\n' % i for i in range(30))),
        out=NEW,
    ),
    Case(
        "pre-workers-0",
        PRE,
        ["{text}", *pre("--out", NEW, "--workers", "0")],
        ["--workers", ">= 1"],
        out=NEW,
    ),
    Case(
        "pre-workers-neg",
        PRE,
        ["{text}", *pre("--out", NEW, "--workers", "-3")],
        ["--workers"],
        out=NEW,
    ),
    Case(
        "pre-max-bad-fraction-2",
        PRE,
        ["{text}", *pre("--out", NEW, "--max-bad-fraction", "2")],
        ["--max-bad-fraction"],
        out=NEW,
    ),
    # --- preprocess: --out
    Case(
        "pre-out-holds-other-corpus",
        PRE,
        ["{text}", *pre("--out", "{corpus}", "--seq-len", "16")],
        ["--out {corpus}", "holds another corpus", "--seq-len 32", "pick another --out"],
    ),
    Case(
        "pre-out-holds-corpus-of-other-inputs",
        PRE,
        ["{text}", "{text}", *pre("--out", "{corpus}", "--shard-size-mb", "0.015625")],
        ["--out {corpus}", "holds another corpus", "other inputs"],
    ),
    Case(
        "pre-out-unrelated-files",
        PRE,
        ["{text}", *pre("--out", "{case}/mine")],
        ["--out {case}/mine", "not empty", "notes.txt"],
        a_dir("mine", {"notes.txt": b"keep me\n"}),
    ),
    Case(
        "pre-out-is-file",
        PRE,
        ["{text}", *pre("--out", "{case}/f")],
        ["--out {case}/f", "not a directory"],
        write("f", b"x"),
    ),
    Case(
        "pre-out-under-a-file",
        PRE,
        ["{text}", *pre("--out", "{case}/f/corpus")],
        ["--out {case}/f/corpus", "is a file"],
        write("f", b"x"),
    ),
    # --- train_tokenizer
    Case(
        "tok-input-missing",
        TOK,
        ["{text}", "{case}/gone.txt", "--vocab-size", "384", "--out", "{case}/t.model"],
        ["{case}/gone.txt", "not found"],
        out="{case}/t.model",
    ),
    Case(
        "tok-input-empty",
        TOK,
        ["{case}/e.txt", "--vocab-size", "384", "--out", "{case}/t.model"],
        ["{case}/e.txt", "empty"],
        write("e.txt", b""),
        out="{case}/t.model",
    ),
    Case(
        "tok-input-binary",
        TOK,
        ["{case}/b.txt", "--vocab-size", "384", "--out", "{case}/t.model"],
        ["{case}/b.txt", "binary"],
        write("b.txt", b"text\x00\x01\x02"),
        out="{case}/t.model",
    ),
    Case(
        "tok-input-not-gzip",
        TOK,
        ["{case}/x.txt.gz", "--vocab-size", "384", "--out", "{case}/t.model"],
        ["{case}/x.txt.gz", "not gzip"],
        write("x.txt.gz", b"hello"),
        out="{case}/t.model",
    ),
    Case(
        "tok-vocab-0",
        TOK,
        ["{text}", "--vocab-size", "0", "--out", "{case}/t.model"],
        ["--vocab-size", "positive"],
        out="{case}/t.model",
    ),
    Case(
        "tok-vocab-neg",
        TOK,
        ["{text}", "--vocab-size", "-5", "--out", "{case}/t.model"],
        ["--vocab-size"],
        out="{case}/t.model",
    ),
    Case(
        "tok-vocab-too-small",
        TOK,
        ["{text}", "--vocab-size", "200", "--out", "{case}/t.model"],
        ["--vocab-size 200", "too small", "384"],
        out="{case}/t.model",
    ),
    Case(
        "tok-vocab-too-big-for-text",
        TOK,
        ["{text}", "--vocab-size", "20000", "--out", "{case}/t.model", "--threads", "1"],
        ["{text}", "too little training text", "--vocab-size"],
        out="{case}/t.model",
    ),
    Case(
        "tok-out-is-dir",
        TOK,
        ["{text}", "--vocab-size", "384", "--out", "{case}"],
        ["--out {case}", "is a directory"],
    ),
    Case(
        "tok-out-exists",
        TOK,
        ["{text}", "--vocab-size", "384", "--out", "{tok}"],
        ["--out {tok}", "already exists", "never overwritten"],
    ),
    Case(
        "tok-out-unwritable",
        TOK,
        ["{text}", "--vocab-size", "384", "--out", "/proc/zenlm-nowhere/t.model"],
        ["--out /proc/zenlm-nowhere/t.model", "cannot write in /proc"],
    ),
    Case(
        "tok-out-under-a-file",
        TOK,
        ["{text}", "--vocab-size", "384", "--out", "{case}/f/t.model"],
        ["--out {case}/f/t.model", "is a file"],
        write("f", b"x"),
    ),
    # --- verify_corpus
    Case(
        "ver-random-bytes-shard",
        VER,
        ["{case}/c", "--no-progress"],
        ["{case}/c/train-000001.tar", "corrupt tar header", "not a tar file"],
        corpus_copy(random_bytes("train-000001.tar")),
    ),
    Case(
        "ver-sha256-mismatch",
        VER,
        ["{case}/c", "--no-progress"],
        ["{case}/c/train-000002.tar", "sha256", "does not match"],
        corpus_copy(flip("train-000002.tar", "tokens", b"\x05\x00")),
    ),
    Case(
        "ver-token-id-over-vocab",
        VER,
        ["{case}/c", "--no-progress"],
        ["{case}/c/valid-000000.tar", "not below the manifest's vocab_size 384"],
        corpus_copy(flip("valid-000000.tar", "tokens", b"\xff\xff")),
    ),
    Case(
        "ver-shard-from-other-corpus",
        VER,
        ["{case}/c", "--no-progress"],
        ["{case}/c/train-000001.tar", "where key"],
        corpus_copy(foreign_shard),
    ),
    Case(
        "ver-dtype-edited",
        VER,
        ["{case}/c", "--no-progress"],
        ["{case}/c/train-000000.tar", "manifest's seq_len and dtype", "66 bytes"],
        corpus_copy(edit_manifest(dtype="<u4")),
    ),
    Case(
        "ver-missing-shard",
        VER,
        ["{case}/c", "--no-progress"],
        ["{case}/c/train-000003.tar", "missing"],
        corpus_copy(remove("train-000003.tar")),
    ),
    Case(
        "ver-no-manifest",
        VER,
        ["{case}/c", "--no-progress"],
        ["{case}/c/manifest.json", "no manifest"],
        corpus_copy(remove(fmt.MANIFEST_NAME)),
    ),
    Case(
        "ver-all-counts-every-bad-shard",
        VER,
        ["{case}/c", "--all", "--workers", "2", "--no-progress"],
        ["3 of ", "shards bad", "{case}/c/train-000000.tar"],
        corpus_copy(
            several(
                flip("train-000000.tar", "tokens", b"\x07"),
                remove("train-000003.tar"),
                random_bytes("valid-000000.tar"),
            )
        ),
    ),
    Case("ver-workers-0", VER, ["{corpus}", "--workers", "0"], ["--workers", ">= 1"]),
    Case(
        "ver-not-a-dir",
        VER,
        ["{case}/nothing", "--no-progress"],
        ["{case}/nothing", "not a corpus directory"],
    ),
    Case(
        "ver-other-tokenizer",
        VER,
        ["{corpus}", "--tokenizer", "{case}/other.model", "--no-progress"],
        ["{corpus}/manifest.json", "built with tokenizer"],
        write("other.model", b"not the corpus's tokenizer"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_nothing_changes(case: Case, data: Data, tmp_path):
    if case.setup:
        case.setup(tmp_path, data)
    names = {"text": data.text, "tok": data.tok, "corpus": data.corpus, "root": data.root}
    names["case"] = tmp_path
    args = [case.tool, *(a.format(**names) for a in case.args)]
    out = Path(case.out.format(**names)) if case.out else None
    out_existed = out is not None and out.exists()
    before = snapshot(data.root, tmp_path)

    r = run_tool_probe(args)

    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(r.error_lines) == 1, r.stderr
    line = r.error_lines[0]
    for part in case.culprit:
        assert part.format(**names) in line, (part.format(**names), line)
    assert not r.traceback, r.stderr
    assert not r.heavy_imports, r.heavy_imports
    assert changed(before, data.root, tmp_path) == []
    if out is not None:
        assert out.exists() == out_existed, f"{out} left behind"
        assert not (tmp_path / "out").exists()


def test_table_covers_every_tool_and_many_cases():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert {c.tool for c in CASES} == {PRE, TOK, VER}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sound_corpus_verifies_ok(data, workers):
    r = subprocess.run(
        [sys.executable, VER, str(data.corpus), "--no-progress", "--workers", workers],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "train:" in r.stdout and "valid:" in r.stdout and ": ok" in r.stdout
    assert "error:" not in r.stderr
