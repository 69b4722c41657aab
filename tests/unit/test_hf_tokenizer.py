"""Hugging Face tokenizer directories in the corpus tools (docs/data.md, "Hugging Face tokenizers").

A tiny byte-level BPE (Llama 3 / Qwen2 style) is trained here with the `tokenizers` library and
saved as a Hugging Face directory (tokenizer.json + tokenizer_config.json with bos/eos and a
chat template); a SentencePiece directory holds a tokenizer.model trained by zenlm. Checked:
tools/preprocess.py on such a directory (manifest fingerprint and vocabulary, ids equal to
transformers' AutoTokenizer(text, add_special_tokens=False) plus EOS per document), the same
corpus at any worker count and pool kind, the fingerprint (stable across re-saves and copies,
changed by a special token), special_tokens_map.json, and one-line errors for bad directories.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from zenlm.data.encode import split_of
from zenlm.data.format import load_manifest
from zenlm.data.hf_tokenizer import HFTokenizer, canonical_tokenizer_json
from zenlm.data.readers import BadInputError
from zenlm.data.tokenizer import (
    TokenizerError,
    fingerprint_file,
    load_tokenizer,
    train_tokenizer,
)
from zenlm.data.writer import preprocess_corpus
from zenlm.testing.cli_probe import run_tool_probe

PRE = "tools/preprocess.py"
SEQ = 31  # 32 tokens per sample
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
SAMPLES = [
    "def f_3(x):\n    return x * 3",
    "  héllo  wörld\t\r\n日本語 🙂 e\u0301",
    f"text with {EOS} inside, and {BOS}",
    "",
    " x",
    "\x00\x01 control\x7f",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syll = ["ka", "to", "re", "mi", "su", "no", "ha", "ya", "lo", "ve", "dri", "ste", "pla"]
    docs = []
    for i in range(n):
        words = ["".join(rng.choices(syll, k=rng.randint(1, 3))) for _ in range(rng.randint(3, 60))]
        tail = rng.choice([".", "!\n", " 東京 🤖", "\tend", f" {EOS} x", "\n    return y"])
        docs.append(" ".join(words) + tail + f" {i}")
    return docs


def train_bpe(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(docs, trainer)
    # What a Llama 3 tokenizer.json has: BOS added by the post-processor (not in the corpus).
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tk.token_to_id(BOS))]
    )
    return tk


def save_hf_dir(tk, d: Path, **config) -> Path:
    d.mkdir(parents=True)
    tk.save(str(d / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": TEMPLATE,
        **config,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return d


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_docs(240)


@pytest.fixture(scope="module")
def data(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("hf")
    tk = train_bpe(docs)
    hf = save_hf_dir(tk, root / "hf")
    text = root / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return {"root": root, "tk": tk, "hf": hf, "text": text}


@pytest.fixture(scope="module")
def auto(data):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(data["hf"]))


def read_split(corpus: Path, split: str, dtype: str) -> np.ndarray:
    """All token ids of a split, in sample order."""
    out = []
    for shard in sorted(corpus.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as t:
            for m in sorted(t.getmembers(), key=lambda m: m.name):
                if m.name.endswith(".tokens"):
                    out.append(np.frombuffer(t.extractfile(m).read(), dtype=dtype))
    return np.concatenate(out) if out else np.zeros(0, dtype)


def test_load_directory(data):
    tok = load_tokenizer(data["hf"])
    tk = data["tk"]
    assert isinstance(tok, HFTokenizer) and tok.kind == "tokenizers"
    assert tok.path == str(data["hf"])
    assert tok.vocab_size == tk.get_vocab_size(with_added_tokens=True) == 420
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tk.token_to_id(BOS), tk.token_to_id(EOS), -1)
    assert (tok.add_bos_token, tok.add_eos_token) == (True, False)
    assert tok.chat_template == TEMPLATE
    assert tok.info().fingerprint == tok.fingerprint == fingerprint_file(data["hf"])
    assert (tok.info().vocab_size, tok.info().pad_id) == (420, -1)
    assert {tok.bos_id, tok.eos_id, tk.token_to_id(PAD)} <= tok.special_ids
    # No post-processor BOS: pre-training encodes text only.
    assert tok.encode("x") == tk.encode("x", add_special_tokens=False).ids
    assert tk.encode("x").ids[0] == tok.bos_id
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_ids_equal_transformers(data, auto):
    tok = load_tokenizer(data["hf"])
    texts = [*SAMPLES, *make_docs(40, seed=5)]
    want = [auto(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [tok.encode(t) for t in texts] == want
    assert tok.encode_batch(texts) == want
    assert (tok.bos_id, tok.eos_id) == (auto.bos_token_id, auto.eos_token_id)
    assert auto.pad_token_id is None and tok.pad_id == -1
    assert tok.vocab_size == len(auto)
    assert [ids for ids, _ in tok.encode_offsets_batch(texts)] == want


def test_preprocess_cli_with_hf_directory(data, auto, docs, tmp_path):
    out = tmp_path / "corpus"
    args = [PRE, str(data["text"]), "--tokenizer", str(data["hf"]), "--out", str(out)]
    r = run_tool_probe([*args, "--seq-len", str(SEQ), "--valid-fraction", "0.2", "--workers", "2"])
    assert r.returncode == 0, r.stderr
    m = load_manifest(out)
    tok = load_tokenizer(data["hf"])
    assert m.tokenizer.fingerprint == fingerprint_file(data["hf"]) == tok.fingerprint
    assert (m.tokenizer.vocab_size, m.tokenizer.bos_id, m.tokenizer.eos_id) == (420, 0, 1)
    assert m.tokenizer.pad_id == -1 and m.dtype == "<u2"
    # Every document: AutoTokenizer's ids without special tokens, then EOS; in input order.
    for s, split in enumerate(("train", "valid")):
        want = [
            i
            for d in docs
            if split_of(d, 0.2) == s
            for i in [*auto(d, add_special_tokens=False)["input_ids"], auto.eos_token_id]
        ]
        got = read_split(out, split, m.dtype)
        assert len(got) == m.splits[split].samples * (SEQ + 1) > 0
        assert got.tolist() == want[: len(got)]
        assert len(want) - len(got) == m.stats["dropped_tail_tokens"][split]


def test_add_bos_and_the_same_corpus_at_any_worker_count(data, docs, tmp_path):
    tok = load_tokenizer(data["hf"])
    runs = {}
    for workers, pool in ((1, "thread"), (2, "thread"), (2, "process")):
        out = tmp_path / f"c{workers}{pool}"
        m = preprocess_corpus(
            [data["text"]],
            out,
            data["hf"],
            SEQ,
            4096,
            valid_fraction=0.2,
            num_workers=workers,
            pool=pool,
            add_bos=True,
            chunk_chars=900,
            progress=False,
        ).manifest
        runs[workers, pool] = [(s.path, s.sha256) for sp in m.splits.values() for s in sp.shards]
    assert len(set(map(tuple, runs.values()))) == 1, runs
    assert len(runs[1, "thread"]) > 2  # several shards, many chunks
    train = read_split(tmp_path / "c1thread", "train", "<u2").tolist()
    first = next(d for d in docs if split_of(d, 0.2) == 0)
    assert train[: len(tok.encode(first)) + 2] == [tok.bos_id, *tok.encode(first), tok.eos_id]


def test_add_bos_without_bos_token_is_refused(data, tmp_path):
    d = save_hf_dir(data["tk"], tmp_path / "nobos", bos_token=None)
    assert load_tokenizer(d).bos_id == -1
    with pytest.raises(BadInputError, match=re.escape(f"--add-bos: tokenizer {d} has no BOS")):
        preprocess_corpus([data["text"]], tmp_path / "c", d, SEQ, add_bos=True, progress=False)
    assert not (tmp_path / "c").exists()


def test_fingerprint_stable_across_resaves_and_copies(data, tmp_path):
    from tokenizers import Tokenizer

    fp = fingerprint_file(data["hf"])
    # A copy elsewhere.
    copy = tmp_path / "elsewhere" / "tok"
    shutil.copytree(data["hf"], copy)
    # Re-saved: tokenizers' compact form, keys reordered, merges in the older "a b" form,
    # added tokens listed in another order, padding/truncation settings, config reformatted.
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    content = json.loads(Tokenizer.from_file(str(data["hf"] / "tokenizer.json")).to_str())
    content["model"]["merges"] = [" ".join(p) for p in content["model"]["merges"]]
    content["added_tokens"] = content["added_tokens"][::-1]
    content["padding"] = {
        "strategy": {"Fixed": 64},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 2,
        "pad_type_id": 0,
        "pad_token": PAD,
    }
    content = dict(reversed(list(content.items())))
    (resaved / "tokenizer.json").write_text(json.dumps(content, ensure_ascii=True))
    config = json.loads((data["hf"] / "tokenizer_config.json").read_text())
    config = {k: config[k] for k in sorted(config, reverse=True)}
    config["bos_token"] = {"__type": "AddedToken", "content": BOS, "lstrip": False}
    (resaved / "tokenizer_config.json").write_text(json.dumps(config))
    assert canonical_tokenizer_json(content) == canonical_tokenizer_json(
        json.loads((data["hf"] / "tokenizer.json").read_text())
    )
    assert fingerprint_file(copy) == fingerprint_file(resaved) == fp
    assert load_tokenizer(resaved).encode(SAMPLES[0]) == load_tokenizer(data["hf"]).encode(
        SAMPLES[0]
    )
    # The chat template, model_max_length, tokenizer_class do not change tokenization.
    other = save_hf_dir(
        data["tk"],
        tmp_path / "o",
        chat_template=None,
        model_max_length=8,
        tokenizer_class="LlamaTokenizerFast",
    )
    assert fingerprint_file(other) == fp


def test_fingerprint_changes_with_what_changes_tokenization(data, tmp_path):
    fp = fingerprint_file(data["hf"])
    changed = {
        "eos": save_hf_dir(data["tk"], tmp_path / "eos", eos_token=PAD),
        "pad": save_hf_dir(data["tk"], tmp_path / "pad", pad_token=PAD),
        "add_bos": save_hf_dir(data["tk"], tmp_path / "add_bos", add_bos_token=False),
    }
    merges = save_hf_dir(data["tk"], tmp_path / "merges")
    content = json.loads((merges / "tokenizer.json").read_text())
    content["model"]["merges"] = content["model"]["merges"][:-1]
    (merges / "tokenizer.json").write_text(json.dumps(content))
    changed["merges"] = merges
    fps = {k: fingerprint_file(d) for k, d in changed.items()}
    assert fp not in fps.values() and len(set(fps.values())) == len(fps), fps
    assert load_tokenizer(changed["eos"]).eos_id == data["tk"].token_to_id(PAD)


def test_special_tokens_map_as_transformers_reads_it(data, tmp_path, auto):
    from transformers import AutoTokenizer

    d = save_hf_dir(data["tk"], tmp_path / "map")
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": EOS, "lstrip": False}, "pad_token": PAD})
    )
    tok, hf = load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    assert (tok.eos_id, tok.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (1, 2)
    assert fingerprint_file(d) != fingerprint_file(data["hf"])  # pad differs


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, docs) -> Path:
    d = tmp_path_factory.mktemp("sp")
    (d / "train.txt").write_text("\n".join(make_docs(600, seed=9)), encoding="utf-8")
    return Path(
        train_tokenizer([d / "train.txt"], d / "t.model", 384, num_threads=1, progress=False).path
    )


def test_sentencepiece_directory(sp_model, data, docs, tmp_path):
    d = tmp_path / "spdir"
    d.mkdir()
    shutil.copyfile(sp_model, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    tok, own = load_tokenizer(d), load_tokenizer(sp_model)
    assert isinstance(tok, HFTokenizer) and tok.kind == "sentencepiece"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (384, 1, 2, 3)  # pad: model's
    texts = [*SAMPLES, *docs[:20]]
    assert (
        tok.encode_batch(texts) == [own.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    )
    # Its own fingerprint (the configs are part of it), stable across copies.
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    assert fingerprint_file(d) == fingerprint_file(copy) != fingerprint_file(sp_model)
    m = preprocess_corpus(
        [data["text"]], tmp_path / "c", d, SEQ, valid_fraction=0, num_workers=2, progress=False
    ).manifest
    assert m.tokenizer.fingerprint == fingerprint_file(d) and m.tokenizer.vocab_size == 384
    want = [i for doc in docs for i in [*own.encode(doc), 2]]
    got = read_split(tmp_path / "c", "train", "<u2").tolist()
    assert got == want[: len(got)]
    # Without configs the model's own special pieces are used.
    (d / "tokenizer_config.json").unlink()
    assert (load_tokenizer(d).bos_id, load_tokenizer(d).eos_id) == (1, 2)


def bad_dirs(root: Path, tk, sp_model: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path to give, the file or directory the message names, what it says)"""

    def hf(name: str, **config) -> Path:
        return save_hf_dir(tk, root / name, **config)

    cases = {}
    d = root / "nothing"
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("hello\n")
    cases["no-tokenizer-files"] = d, d, "is a directory without tokenizer.json or tokenizer.model"
    d = hf("empty-json")
    (d / "tokenizer.json").write_bytes(b"")
    cases["empty-json"] = d, d / "tokenizer.json", "empty file"
    d = hf("text-json")
    (d / "tokenizer.json").write_text("this is not json\n")
    cases["text-json"] = d, d / "tokenizer.json", "not a tokenizer (invalid JSON"
    d = hf("other-json")
    (d / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    cases["other-json"] = d, d / "tokenizer.json", "not a tokenizer (tokenizers cannot read it"
    d = hf("list-json")
    (d / "tokenizer.json").write_text("[1, 2]")
    cases["list-json"] = d, d / "tokenizer.json", "not a tokenizer"
    d = hf("no-eos", eos_token=None)
    cases["no-eos"] = d, d, "no eos_token in tokenizer_config.json or special_tokens_map.json"
    d = hf("eos-not-in-vocab", eos_token="<|eot|>")
    cases["eos-not-in-vocab"] = d, d / "tokenizer_config.json", "eos_token '<|eot|>' is not in"
    d = hf("eos-number", eos_token=7)
    cases["eos-number"] = d, d / "tokenizer_config.json", "eos_token must be a token string"
    d = hf("add-bos-string", add_bos_token="yes")
    cases["add-bos-string"] = d, d / "tokenizer_config.json", "add_bos_token must be true, false"
    d = hf("bad-config")
    (d / "tokenizer_config.json").write_text("{bos")
    cases["bad-config"] = d, d / "tokenizer_config.json", "not a tokenizer config (invalid JSON"
    d = root / "sp-garbage"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"\x00not a model" * 10)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    cases["sp-garbage"] = d, d / "tokenizer.model", "not a SentencePiece model"
    d = root / "sp-no-piece"
    d.mkdir()
    shutil.copyfile(sp_model, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    cases["sp-no-piece"] = d, d / "tokenizer_config.json", "eos_token '<|im_end|>' is not in"
    json_file = hf("json-file") / "tokenizer.json"
    cases["json-file-given"] = json_file, json_file, "not a SentencePiece model but a Hugging Face"
    return cases


def test_bad_directories_name_the_culprit(data, sp_model, tmp_path):
    for name, (path, culprit, what) in bad_dirs(tmp_path, data["tk"], sp_model).items():
        for fn in (load_tokenizer, fingerprint_file):
            with pytest.raises(TokenizerError) as e:
                fn(path)
            msg = str(e.value)
            assert msg.startswith(f"{culprit}: ") and what in msg, (name, msg)
            assert "\n" not in msg, (name, msg)


# One probe per kind of culprit (the rest are checked in-process above): the directory, a file
# in it, the SentencePiece model.
@pytest.mark.parametrize("name", ["no-tokenizer-files", "empty-json", "sp-garbage"])
def test_preprocess_cli_bad_directory_is_one_error_line(name, data, sp_model, tmp_path):
    path, culprit, what = bad_dirs(tmp_path / "cases", data["tk"], sp_model)[name]
    out = tmp_path / "out"
    r = run_tool_probe(
        [
            PRE,
            str(data["text"]),
            "--tokenizer",
            str(path),
            "--out",
            str(out),
            "--seq-len",
            "31",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert r.returncode == 2 and not r.traceback, r.stderr
    assert len(r.error_lines) == 1 and r.error_lines[0].startswith(f"error: {culprit}: ")
    assert what in r.error_lines[0]
    assert not out.exists()
    if name == "no-tokenizer-files":
        assert "directory" in r.error_lines[0]
    if name == "empty-json":
        assert "empty" in r.error_lines[0]
