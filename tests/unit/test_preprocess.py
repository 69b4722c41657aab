"""preprocess(): manifest, samples, packing and docstarts, split, bad input, .gz, rerun skip."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from zenlm.data.encode import split_of
from zenlm.data.format import (
    decode_doc_starts,
    decode_tokens,
    load_manifest,
    sample_key,
)
from zenlm.data.pack import ShardSink
from zenlm.data.readers import BadInputError
from zenlm.data.tokenizer import load_tokenizer, train_tokenizer
from zenlm.data.writer import DEFAULT_VALID_FRACTION, preprocess, preprocess_corpus

SEQ_LEN = 63  # 64 tokens per sample
ROOT = Path(__file__).resolve().parents[2]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syll = ["ka", "to", "re", "mi", "su", "no", "ha", "ya", "lo", "ve", "dri", "ste", "pla"]
    docs = []
    for i in range(n):
        words = ["".join(rng.choices(syll, k=rng.randint(1, 3))) for _ in range(rng.randint(3, 80))]
        docs.append(" ".join(words) + rng.choice([".", "!\n", " 東京 🤖", "\tend"]) + f" {i}")
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "train.txt").write_text("\n".join(make_docs(600, seed=99)), encoding="utf-8")
    return train_tokenizer([d / "train.txt"], d / "t.model", 384, progress=False)


@pytest.fixture(scope="module")
def docs():
    return make_docs(300)


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": 1}) + "\n")
    return path


def read_split(corpus: Path, manifest, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every sample of a split, in order, read with tarfile (independently of the loader)."""
    dtype = np.dtype(manifest.dtype)
    out = []
    for shard in manifest.splits[split].shards:
        with tarfile.open(corpus / shard.path) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        keys = sorted({n.rsplit(".", 1)[0] for n in members})
        assert len(keys) == shard.samples
        for k in keys:
            toks = decode_tokens(members[f"{k}.tokens"], dtype, manifest.tokens_per_sample, k)
            out.append((k, toks, decode_doc_starts(members[f"{k}.docstarts"], k)))
    return out


def expected_stream(tok, docs, split: int, valid_fraction: float, add_bos: bool = False):
    """(token stream, doc start offsets) of one split: each document [BOS] + ids + [EOS]."""
    stream, starts = [], []
    for d in docs:
        if split_of(d, valid_fraction) == split:
            starts.append(len(stream))
            stream += ([tok.bos_id] if add_bos else []) + tok.encode(d) + [tok.eos_id]
    return np.array(stream), np.array(starts)


def run(tmp_path, tok, docs, name="corpus", **kw):
    src = tmp_path / "in.jsonl"
    if not src.exists():  # rewriting would change its mtime, and so the rerun key
        write_jsonl(src, docs)
    kw = {"valid_fraction": 0.2, "num_workers": 1, "progress": False, **kw}
    return preprocess_corpus([src], tmp_path / name, tok.path, SEQ_LEN, 20 * 1536, **kw)


def test_manifest_counts_and_sha256(tmp_path, tok, docs):
    res = run(tmp_path, tok, docs)
    m = load_manifest(tmp_path / "corpus")
    assert m == res.manifest
    assert (m.seq_len, m.dtype, m.valid_fraction) == (SEQ_LEN, "<u2", 0.2)
    assert m.tokenizer == load_tokenizer(tok.path).info()
    train = m.splits["train"]
    assert len(train.shards) > 2  # small shard size: several shards
    assert [s.path for s in train.shards] == [
        f"train-{i:06d}.tar" for i in range(len(train.shards))
    ]
    for split in m.splits.values():
        for s in split.shards:
            assert s.samples * (SEQ_LEN + 1) == s.tokens
            assert (
                hashlib.sha256((tmp_path / "corpus" / s.path).read_bytes()).hexdigest() == s.sha256
            )
        assert split.tokens == split.samples * (SEQ_LEN + 1)
    # every token is stored or counted as dropped tail; one EOS per document
    total = sum(len(tok.encode(d)) + 1 for d in docs)
    stored = sum(s.tokens for s in m.splits.values())
    assert stored + sum(m.stats["dropped_tail_tokens"].values()) == total
    assert sum(m.stats["documents"].values()) == len(docs)
    assert all(0 <= v < SEQ_LEN + 1 for v in m.stats["dropped_tail_tokens"].values())
    assert not list((tmp_path / "corpus").glob("*.tmp"))


@pytest.mark.parametrize("add_bos", [False, True])
def test_samples_reconstruct_documents_with_eos_and_docstarts(tmp_path, tok, docs, add_bos):
    res = run(tmp_path, tok, docs, add_bos=add_bos)
    m = res.manifest
    for s, split in enumerate(("train", "valid")):
        samples = read_split(tmp_path / "corpus", m, split)
        assert [k for k, _, _ in samples] == [sample_key(i) for i in range(len(samples))]
        for _, toks, starts in samples:
            assert toks.dtype == np.dtype("<u2") and toks.shape == (SEQ_LEN + 1,)
            assert starts.dtype == np.dtype("<u4") and np.all((starts >= 1) & (starts <= SEQ_LEN))
        stream, doc_starts = expected_stream(tok, docs, s, 0.2, add_bos)
        got = np.concatenate([t for _, t, _ in samples])
        n = len(got)
        assert n == (len(stream) // (SEQ_LEN + 1)) * (SEQ_LEN + 1)
        np.testing.assert_array_equal(got, stream[:n])
        got_starts = [i * (SEQ_LEN + 1) + p for i, (_, _, st) in enumerate(samples) for p in st]
        want = [p for p in doc_starts if p < n and p % (SEQ_LEN + 1) != 0]
        assert got_starts == want
        for p in doc_starts[1:]:
            if p < n:  # every document is preceded by the previous one's EOS
                assert got[p - 1] == tok.eos_id
                assert got[p] == (tok.bos_id if add_bos else got[p])


def test_uint32_dtype_path(tmp_path, tok, docs):
    small = run(tmp_path, tok, docs, name="u16").manifest
    big = run(tmp_path, tok, docs, name="u32", dtype="uint32").manifest
    assert (small.dtype, big.dtype) == ("<u2", "<u4")
    for split in ("train", "valid"):
        a = read_split(tmp_path / "u16", small, split)
        b = read_split(tmp_path / "u32", big, split)
        assert all(y.dtype == np.dtype("<u4") for _, y, _ in b)
        assert len(a) == len(b) and all(np.array_equal(x, y) for (_, x, _), (_, y, _) in zip(a, b))
        with tarfile.open(tmp_path / "u32" / big.splits[split].shards[0].path) as tf:
            m = next(m for m in tf.getmembers() if m.name.endswith(".tokens"))
            assert m.size == 4 * (SEQ_LEN + 1)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        run(tmp_path, tok, docs, name="bad", dtype="int64")


def test_split_is_deterministic_across_worker_counts(tmp_path, tok, docs):
    one = run(tmp_path, tok, docs, name="w1", num_workers=1, chunk_chars=500).manifest
    two = run(tmp_path, tok, docs, name="w2", num_workers=2, chunk_chars=1500).manifest
    three = run(tmp_path, tok, docs, name="p2", num_workers=2, pool="process").manifest
    shas = [[s.sha256 for sp in m.splits.values() for s in sp.shards] for m in (one, two, three)]
    assert shas[0] == shas[1] == shas[2]
    assert one.stats["documents"] == two.stats["documents"] == three.stats["documents"]


def test_valid_fraction_roughly_right(tmp_path, tok):
    lines = [f"document number {i} says hello" for i in range(4000)]
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    m = preprocess(
        [tmp_path / "lines.txt"],
        tmp_path / "c",
        tok.path,
        SEQ_LEN,
        1 << 20,
        valid_fraction=0.25,
        num_workers=1,
        text_mode="line",
        progress=False,
    )
    n_valid = m.stats["documents"]["valid"]
    assert m.stats["documents"]["train"] + n_valid == 4000
    assert 0.22 < n_valid / 4000 < 0.28
    assert n_valid == sum(split_of(t, 0.25) for t in lines)


def bad_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "wb") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d}).encode() + b"\n")
            if i == 10:
                f.write(b'{"text": "unterminated\n')  # invalid JSON
                f.write(b'{"body": "no text field"}\n')  # missing field
                f.write(b'{"text": 42}\n')  # not a string: counted as missing
            if i == 20:
                f.write(b'{"text": "caf\xe9 latin-1"}\n')  # non-UTF-8
                f.write(b"\n")  # blank: not a record
    return path


def test_bad_records_counted_per_file(tmp_path, tok, docs):
    bad = bad_jsonl(tmp_path / "bad.jsonl", docs[:100])
    good = write_jsonl(tmp_path / "good.jsonl", docs[100:])
    text = tmp_path / "notes.txt"
    text.write_bytes(b"first line\n\xff\xfe broken line\n" + b"more text\n" * 18)
    res = preprocess_corpus(
        [bad, good, text],
        tmp_path / "c",
        tok.path,
        SEQ_LEN,
        1 << 20,
        valid_fraction=0.0,
        num_workers=1,
        max_bad_fraction=0.1,
        progress=False,
    )
    assert res.bad_records == {
        str(bad): {"non_utf8": 1, "invalid_json": 1, "missing_field": 2},
        str(text): {"non_utf8": 1, "invalid_json": 0, "missing_field": 0},
    }
    inputs = {f["path"]: f for f in res.manifest.stats["inputs"]}
    assert inputs[str(bad)]["documents"] == 100 and inputs[str(bad)]["records"] == 104
    assert inputs[str(good)]["bad"] == {"non_utf8": 0, "invalid_json": 0, "missing_field": 0}
    assert inputs[str(text)]["documents"] == 1  # text_mode="file": one document, bad line dropped
    assert res.manifest.stats["documents"]["train"] == 100 + 200 + 1


def test_over_threshold_fails_naming_the_file(tmp_path, tok, docs, capsys):
    bad = bad_jsonl(tmp_path / "bad.jsonl", docs[:100])
    good = write_jsonl(tmp_path / "good.jsonl", docs[100:])
    with pytest.raises(BadInputError, match=rf"{bad}: 4 of 104 records are bad.*0\.01"):
        preprocess([good, bad], tmp_path / "c", tok.path, SEQ_LEN, num_workers=1, progress=False)
    assert not (tmp_path / "c" / "manifest.json").exists()
    # the CLI reports it as an error message and exit status 2, not a traceback
    tool = load_tool("preprocess")
    argv = [
        str(bad),
        "--tokenizer",
        tok.path,
        "--out",
        str(tmp_path / "d"),
        "--seq-len",
        "63",
        "--valid-fraction",
        "0.2",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert tool.main(argv) == 2
    assert str(bad) in capsys.readouterr().err
    assert tool.main([*argv, "--max-bad-fraction", "0.05"]) == 0


def test_gz_inputs_match_plain(tmp_path, tok, docs):
    plain = run(tmp_path, tok, docs, name="plain").manifest
    gz = write_jsonl(tmp_path / "in.jsonl.gz", docs)
    txt = tmp_path / "doc.txt.gz"
    with gzip.open(txt, "wt", encoding="utf-8") as f:
        f.write("\n".join(docs[:5]))
    m = preprocess_corpus(
        [gz, txt],
        tmp_path / "gz",
        tok.path,
        SEQ_LEN,
        20 * 1536,
        valid_fraction=0.2,
        num_workers=1,
        progress=False,
    ).manifest
    assert m.stats["documents"]["train"] + m.stats["documents"]["valid"] == len(docs) + 1
    # same stream up to the extra document at the end: all shards but plain's last are equal
    k = len(plain.splits["train"].shards) - 1
    assert [s.sha256 for s in m.splits["train"].shards[:k]] == [
        s.sha256 for s in plain.splits["train"].shards[:k]
    ]


def test_rerun_skips_complete_shards(tmp_path, tok, docs):
    first = run(tmp_path, tok, docs)
    n = sum(len(s.shards) for s in first.manifest.splits.values())
    assert (first.shards_written, first.shards_skipped) == (n, 0)
    paths = sorted((tmp_path / "corpus").glob("*.tar"))
    mtimes = {p: p.stat().st_mtime_ns for p in paths}

    second = run(tmp_path, tok, docs)
    assert (second.shards_written, second.shards_skipped) == (0, n)
    assert {p: p.stat().st_mtime_ns for p in paths} == mtimes
    assert second.manifest == first.manifest

    # a damaged shard is rewritten, the others kept
    victim = tmp_path / "corpus" / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:-10])
    third = run(tmp_path, tok, docs)
    assert (third.shards_written, third.shards_skipped) == (1, n - 1)
    assert (
        hashlib.sha256(victim.read_bytes()).hexdigest()
        == first.manifest.splits["train"].shards[1].sha256
    )

    # other settings into the same directory: refused, naming the setting, nothing touched
    before = {p: p.read_bytes() for p in (tmp_path / "corpus").iterdir()}
    with pytest.raises(BadInputError, match=r"holds another corpus \(made with --valid-fraction"):
        run(tmp_path, tok, docs, valid_fraction=0.3)
    assert {p: p.read_bytes() for p in (tmp_path / "corpus").iterdir()} == before
    # and into another directory it is a fresh corpus
    fifth = run(tmp_path, tok, docs, name="other", valid_fraction=0.3)
    assert fifth.shards_skipped == 0


def test_resume_after_kill_and_failed_run_leaves_dir_as_found(tmp_path, tok, docs):
    """A killed run (state + some shards, no manifest) is resumed by the same command; a run
    that fails in such a directory removes only what it created and restores the state file."""
    first = run(tmp_path, tok, docs)
    corpus = tmp_path / "corpus"
    (corpus / "manifest.json").unlink()  # as if killed before the end
    (corpus / "valid-000000.tar").unlink()
    (corpus / "train-000002.tar").unlink()
    second = run(tmp_path, tok, docs)
    n = sum(len(s.shards) for s in first.manifest.splits.values())
    assert (second.shards_written, second.shards_skipped) == (2, n - 2)
    assert second.manifest == first.manifest


def test_failed_run_removes_what_it_created(tmp_path, tok, docs, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    bad = bad_jsonl(tmp_path / "bad.jsonl", docs[:50])  # fails after in.jsonl is packed
    out = tmp_path / "new" / "deeper" / "corpus"
    written, finish = [], ShardSink._finish

    def spy(self):
        finish(self)
        written.append(self.split)

    monkeypatch.setattr(ShardSink, "_finish", spy)
    kw = {"num_workers": 1, "progress": False, "chunk_chars": 500}  # in.jsonl packed first
    with pytest.raises(BadInputError, match=r"bad\.jsonl: 4 of 54 records are bad"):
        preprocess_corpus([src, bad], out, tok.path, SEQ_LEN, 4 * 2048, **kw)
    assert written  # shards were complete when it failed
    assert not (tmp_path / "new").exists()  # the directories it made are gone too
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError):
        preprocess_corpus([src, bad], empty, tok.path, SEQ_LEN, 4 * 2048, **kw)
    assert empty.is_dir() and not list(empty.iterdir())  # kept (it was there), emptied


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_cli_default_valid_fraction_gives_a_valid_split(tmp_path, tok):
    """The tool's default --valid-fraction is the library's (0.01) and gives a valid split the
    trainer accepts with validation on; too small an input for one is an error, not an empty
    split."""
    tool = load_tool("preprocess")
    assert tool.parse_args(["x", "--tokenizer", "t", "--out", "o", "--seq-len", "8"]).valid_fraction
    assert tool.DEFAULT_VALID_FRACTION == DEFAULT_VALID_FRACTION == 0.01
    src = write_jsonl(tmp_path / "in.jsonl", make_docs(2000, seed=5))
    args = ["--tokenizer", tok.path, "--seq-len", "63", "--workers", "1", "--no-progress"]
    assert tool.main([str(src), *args, "--out", str(tmp_path / "c")]) == 0
    m = load_manifest(tmp_path / "c")
    assert m.valid_fraction == 0.01 and m.splits["valid"].samples >= 1
    small = write_jsonl(tmp_path / "small.jsonl", make_docs(30, seed=6))
    with pytest.raises(BadInputError, match=r"--valid-fraction 0\.01: the valid split got"):
        preprocess_corpus([small], tmp_path / "d", tok.path, SEQ_LEN, num_workers=1, progress=False)
    assert not (tmp_path / "d").exists()
