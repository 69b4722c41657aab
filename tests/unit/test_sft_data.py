"""Fine-tuning corpora: prompt/completion and chat JSONL -> packed samples with a loss mask
(format_version 2), read back by the loader as labels of -100 on everything but completions.

Everything is checked against an independent reading: the shards through stdlib tarfile, the
expected ids and masks re-tokenized here with the tokenizer library itself, the chat ids and
assistant masks from transformers' apply_chat_template."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from zenlm.data import format as fmt
from zenlm.data.format import CorpusError, load_manifest
from zenlm.data.loader import build_train_loader
from zenlm.data.pack import ExamplePacker
from zenlm.data.readers import BadInputError
from zenlm.data.sft import preprocess_sft
from zenlm.data.sources import IGNORE_INDEX, SampleSource, open_corpora
from zenlm.data.tokenizer import train_tokenizer
from zenlm.testing.corpus import write_corpus
from zenlm.testing.text_corpus import write_text

ROOT = Path(__file__).resolve().parents[2]
SEQ = 48
N = SEQ + 1


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    text = write_text(d / "text.jsonl", 300)
    tok = train_tokenizer([text], d / "tok.model", 384, progress=False)
    docs = [json.loads(line)["text"] for line in text.read_text().splitlines()]
    return tok, docs


def pc_records(docs: list[str], n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion pairs: varied lengths, a few empty completions and empty prompts, and
    a few completions far longer than a sample."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = docs[i % len(docs)][: rng.randint(0, 70)] + "\nAnswer:"
        completion = " " + docs[(i + 7) % len(docs)][: rng.randint(1, 60)]
        if i % 17 == 3:
            completion = ""  # nothing to train on: dropped
        if i % 23 == 5:
            prompt = ""  # no prompt: the completion starts the example
        if i % 29 == 11:
            completion = " " + " ".join(docs[:6])  # far longer than seq_len + 1
        out.append({"prompt": prompt, "completion": completion})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def expected_pc(sp: spm.SentencePieceProcessor, rec: dict, add_bos: bool = False):
    """The example of one record, tokenized independently: (ids, mask) or None when dropped."""
    p, c = sp.encode(rec["prompt"]), sp.encode(rec["completion"])
    ids = ([sp.bos_id()] if add_bos else []) + p + c + [sp.eos_id()]
    mask = [0] * (len(ids) - len(c) - 1) + [1] * (len(c) + 1)
    mask[0] = 0
    if not c or len(ids) > N:
        return None
    return tuple(ids), tuple(mask)


def read_samples(corpus: Path, split: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, docstarts, lossmask) of every sample of a split, in order, via stdlib tarfile."""
    m = load_manifest(corpus)
    out = []
    for s in m.splits[split].shards:
        with tarfile.open(corpus / s.path) as tf:
            members = {}
            for info in tf.getmembers():
                key, ext = info.name.split(".")
                members.setdefault(key, {})[ext] = tf.extractfile(info).read()
        for key in sorted(members):
            d = members[key]
            assert set(d) == {"tokens", "docstarts", "lossmask"}
            out.append(
                (
                    np.frombuffer(d["tokens"], m.dtype).astype(np.int64),
                    np.frombuffer(d["docstarts"], "<u4").astype(np.int64),
                    np.frombuffer(d["lossmask"], np.uint8),
                )
            )
    return out


def segments(samples, pad_id: int) -> list[tuple[tuple, tuple]]:
    """Every example in the samples, as (ids, mask); asserts each sample is whole examples
    followed by at most one padding segment (pad ids, mask 0)."""
    found = []
    for tokens, starts, mask in samples:
        bounds = [0, *starts.tolist(), len(tokens)]
        segs = list(itertools.pairwise(bounds))
        for k, (a, b) in enumerate(segs):
            t, m = tuple(tokens[a:b].tolist()), tuple(mask[a:b].tolist())
            if k == len(segs) - 1 and set(t) == {pad_id} and not any(m):
                continue  # the padding, its own segment, last
            found.append((t, m))
    return found


def test_prompt_completion_cli_masks_labels_and_packing(tmp_path, sp_tok, capsys):
    tok, docs = sp_tok
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    records = pc_records(docs, 240)
    src = write_jsonl(tmp_path / "pc.jsonl", records)
    out = tmp_path / "corpus"
    tool = load_tool("preprocess_sft")
    args = [str(src), "--tokenizer", tok.path, "--out", str(out), "--seq-len", str(SEQ)]
    assert tool.main([*args, "--valid-fraction", "0.2", "--no-progress"]) == 0
    printed = capsys.readouterr().out

    m = load_manifest(out)
    raw = json.loads((out / fmt.MANIFEST_NAME).read_text())
    assert (raw["format_version"], raw["loss_mask"], m.loss_mask) == (2, True, True)
    assert m.tokenizer == tok.info()
    want = [expected_pc(sp, r) for r in records]
    n_empty = sum(not r["completion"] for r in records)
    n_long = sum(w is None for w in want) - n_empty  # longer than seq_len + 1
    assert n_long >= 5 and n_empty >= 5
    assert m.stats["dropped"] == {"long": n_long, "empty": n_empty}
    assert m.stats["inputs"][0]["long"] == n_long and m.stats["inputs"][0]["records"] == 240
    assert f"dropped: {n_long} longer than seq_len + 1, {n_empty} with nothing" in printed
    assert m.stats["pad_id"] == sp.pad_id()

    # Every stored example is one whole record's example (none split), each exactly once.
    kept = sorted(w for w in want if w is not None)
    got = {s: segments(read_samples(out, s), sp.pad_id()) for s in fmt.SPLITS}
    assert sorted(got["train"] + got["valid"]) == kept
    assert m.stats["examples"] == {s: len(got[s]) for s in fmt.SPLITS}
    assert all(len(got[s]) > 0 for s in fmt.SPLITS)
    assert m.stats["trainable_tokens"]["train"] == sum(sum(x[1]) for x in got["train"])

    # The loader: labels are the next token where its mask is 1, -100 on prompts, padding and
    # every example's first token; inputs, positions and documents as for pre-training.
    samples = read_samples(out, "train")
    source = SampleSource(open_corpora([out], "train", SEQ, tok.fingerprint, 0, False), [1.0])
    batch = {k: v.numpy() for k, v in source.read(0, len(samples)).items()}
    tokens = np.stack([t for t, _, _ in samples])
    mask = np.stack([mk for _, _, mk in samples])
    np.testing.assert_array_equal(batch["input_ids"], tokens[:, :-1])
    np.testing.assert_array_equal(
        batch["labels"], np.where(mask[:, 1:] == 1, tokens[:, 1:], IGNORE_INDEX)
    )
    assert (batch["labels"] != IGNORE_INDEX).sum() == mask[:, 1:].sum() > 0
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) > 0).all()  # every row trains something
    for r, (_, starts, _) in enumerate(samples):
        seg_start = np.zeros(SEQ, bool)
        seg_start[0] = True
        seg_start[starts[starts < SEQ]] = True
        np.testing.assert_array_equal(batch["doc_ids"][r], np.cumsum(seg_start) - 1)
        assert (batch["position_ids"][r][seg_start] == 0).all()
    assert len(samples) < len(got["train"])  # several examples share a sample


def test_next_fit_keeps_input_order_and_add_bos(tmp_path, sp_tok):
    tok, docs = sp_tok
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    records = pc_records(docs, 80, seed=1)
    src = write_jsonl(tmp_path / "pc.jsonl", records)
    r = preprocess_sft(
        [src], tmp_path / "c", tok.path, SEQ, valid_fraction=0.0, add_bos=True, pack_window=1,
        progress=False,
    )  # fmt: skip
    assert r.manifest.splits["valid"].samples == 0
    want = [w for w in (expected_pc(sp, rec, add_bos=True) for rec in records) if w is not None]
    assert segments(read_samples(tmp_path / "c", "train"), sp.pad_id()) == want


def test_example_packer_first_fit_window():
    p = ExamplePacker(10, pad_id=9, window=2)
    ex = lambda n, v: (np.full(n, v, np.uint32), np.ones(n, np.uint8))  # noqa: E731
    out = []
    for n, v in [(6, 1), (6, 2), (3, 3), (6, 4), (1, 5), (4, 6)]:
        out += list(p.add(*ex(n, v)))
    out += list(p.flush())
    rows = [t.tolist() for t, _, _ in out]
    # 6 -> A; 6 -> B; 3 -> A (first fit); 6 -> none fits, window full: A closed, C opened;
    # 1 -> A is gone, B has 4 free: B; 4 -> C; C and B full or flushed oldest first.
    assert rows == [
        [1] * 6 + [3] * 3 + [9],
        [4] * 6 + [6] * 4,
        [2] * 6 + [5] + [9] * 3,
    ]
    assert [s.tolist() for _, s, _ in out] == [[6, 9], [6], [6, 7]]
    assert [m.tolist() for _, _, m in out][2] == [1] * 7 + [0] * 3
    assert p.pad_tokens == 4
    with pytest.raises(ValueError):
        list(p.add(*ex(11, 1)))


def test_on_long_error_names_the_line_and_leaves_nothing(tmp_path, sp_tok, capsys):
    tok, docs = sp_tok
    records = [{"prompt": "Q:", "completion": " " + d[:40]} for d in docs[:30]]
    records[12]["completion"] = " " + " ".join(docs[:8])
    src = write_jsonl(tmp_path / "pc.jsonl", [*records[:5], "", *records[5:]])  # a blank line
    out = tmp_path / "new" / "c"
    tool = load_tool("preprocess_sft")
    args = [str(src), "--tokenizer", tok.path, "--out", str(out), "--seq-len", str(SEQ)]
    rc = tool.main([*args, "--on-long", "error", "--valid-fraction", "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: {src} line 14: example has ")
    assert "--on-long drop" in err[0]
    assert not (tmp_path / "new").exists()


def test_bad_records_counted_and_refused(tmp_path, sp_tok, capsys):
    tok, docs = sp_tok
    good = [{"prompt": "Q: " + d[:30], "completion": " " + d[30:60]} for d in docs[:97]]
    lines = [json.dumps(g) for g in good]
    lines.insert(10, '{"prompt": "unterminated')  # invalid_json
    lines.insert(20, json.dumps({"prompt": "no completion"}))  # missing_field
    lines.insert(30, json.dumps({"messages": [{"role": "robot", "content": "beep"}]}))
    src = write_jsonl(tmp_path / "bad.jsonl", lines)
    r = preprocess_sft(
        [src], tmp_path / "ok", tok.path, SEQ, valid_fraction=0.0, max_bad_fraction=0.05,
        progress=False,
    )  # fmt: skip
    bad = r.manifest.stats["inputs"][0]["bad"]
    assert (bad["invalid_json"], bad["missing_field"], bad["unknown_role"]) == (1, 1, 1)
    assert r.manifest.stats["inputs"][0]["records"] == 100
    tool = load_tool("preprocess_sft")
    out = tmp_path / "refused"
    args = [str(src), "--tokenizer", tok.path, "--out", str(out), "--seq-len", str(SEQ)]
    assert tool.main([*args, "--valid-fraction", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {src}: 3 of 100 records are bad (invalid_json=1, missing_field=1, "
        "unknown_role=1), over the limit max_bad_fraction=0.01; fix the file or raise the limit"
    ]
    assert not out.exists()
    # a chat record needs a tokenizer with a chat template: one line naming the record
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(BadInputError, match=r"chat\.jsonl line 1: a chat record"):
        preprocess_sft([chat], tmp_path / "x", tok.path, SEQ, valid_fraction=0.0, progress=False)
    with pytest.raises(BadInputError, match=r"--format chat: --tokenizer .* no chat template"):
        preprocess_sft([chat], tmp_path / "x", tok.path, SEQ, format="chat", progress=False)
    assert not (tmp_path / "x").exists()


def test_out_rules_rerun_and_another_corpus(tmp_path, sp_tok):
    tok, docs = sp_tok
    src = write_jsonl(tmp_path / "pc.jsonl", pc_records(docs, 60))
    kw = {"valid_fraction": 0.0, "progress": False, "shard_size_bytes": 20 * 1536}
    first = preprocess_sft([src], tmp_path / "c", tok.path, SEQ, **kw)
    assert first.shards_written > 1
    again = preprocess_sft([src], tmp_path / "c", tok.path, SEQ, **kw)
    assert (again.shards_written, again.shards_skipped) == (0, first.shards_written)
    assert again.manifest == first.manifest
    with pytest.raises(BadInputError, match=r"holds another corpus \(made with --seq-len 48"):
        preprocess_sft([src], tmp_path / "c", tok.path, 32, **kw)
    with pytest.raises(BadInputError, match=r"holds another corpus .*--pack-window 64"):
        preprocess_sft([src], tmp_path / "c", tok.path, SEQ, pack_window=4, **kw)
    # a pre-training corpus made by tools/preprocess.py is another corpus too
    from zenlm.data.writer import preprocess

    text = write_text(tmp_path / "text.jsonl", 200)
    preprocess([text], tmp_path / "pre", tok.path, SEQ, valid_fraction=0.0, num_workers=1,
               progress=False)  # fmt: skip
    with pytest.raises(BadInputError, match=r"a pre-training corpus made by tools/preprocess\.py"):
        preprocess_sft([src], tmp_path / "pre", tok.path, SEQ, **kw)
    assert load_manifest(tmp_path / "pre").format_version == 1  # untouched


# --- the format: v1 still read, v2 refused by a v1-only reader, mask members checked -----------


def test_v1_corpora_load_unchanged_and_blend_with_masked(tmp_path, sp_tok):
    tok, docs = sp_tok
    v1 = tmp_path / "v1"
    write_corpus(v1, [40], seq_len=SEQ, vocab_size=tok.vocab_size, fingerprint=tok.fingerprint)
    raw = json.loads((v1 / fmt.MANIFEST_NAME).read_text())
    assert raw["format_version"] == 1 and "loss_mask" not in raw
    src = write_jsonl(tmp_path / "pc.jsonl", pc_records(docs, 120))
    sft = tmp_path / "sft"
    preprocess_sft([src], sft, tok.path, SEQ, valid_fraction=0.0, progress=False)
    loader = build_train_loader(
        [(v1, 0.5), (sft, 0.5)], SEQ, micro_batch_size=4, global_batch_size=8, dp_rank=0,
        dp_size=1, expected_tokenizer_fingerprint=tok.fingerprint,
    )  # fmt: skip
    batches = [next(loader) for _ in range(6)]
    assert all(set(b) == {"input_ids", "labels", "position_ids", "doc_ids"} for b in batches)
    # The same 24 rows through SampleSource, knowing which corpus each came from.
    source = SampleSource(open_corpora([v1, sft], "train", SEQ, None, 0, True), [0.5, 0.5])
    cids, _, members = source.locate(0, 24)
    b = {k: v.numpy() for k, v in source.read(0, 24).items()}
    np.testing.assert_array_equal(np.concatenate([x["labels"] for x in batches]), b["labels"])
    stored = _stored_tokens(v1)
    assert set(cids) == {0, 1}
    for r, (c, i) in enumerate(zip(cids, members)):
        if c == 0:  # pre-training rows: labels unchanged, the stored tokens[1:]
            np.testing.assert_array_equal(b["labels"][r], stored[i][1:])
        else:  # every SFT row has prompt, first-token or padding positions
            assert (b["labels"][r] == IGNORE_INDEX).any()


def _stored_tokens(corpus: Path) -> list[np.ndarray]:
    """The tokens of every sample of a one-shard v1 train split, via tarfile."""
    m = load_manifest(corpus)
    with tarfile.open(corpus / m.splits["train"].shards[0].path) as tf:
        return [
            np.frombuffer(tf.extractfile(i).read(), m.dtype).astype(np.int64)
            for i in tf.getmembers()
            if i.name.endswith(".tokens")
        ]


def test_v2_manifest_refused_by_a_v1_only_reader(tmp_path, sp_tok, monkeypatch):
    tok, docs = sp_tok
    src = write_jsonl(tmp_path / "pc.jsonl", pc_records(docs, 40))
    preprocess_sft([src], tmp_path / "c", tok.path, SEQ, valid_fraction=0.0, progress=False)
    monkeypatch.setattr(fmt, "READABLE_VERSIONS", (1,))  # what a reader before the mask had
    with pytest.raises(CorpusError, match="format_version 2 unsupported"):
        load_manifest(tmp_path / "c")
    monkeypatch.undo()
    d = json.loads((tmp_path / "c" / fmt.MANIFEST_NAME).read_text())
    d["format_version"] = 1
    with pytest.raises(CorpusError, match="loss_mask is true but format_version is 1"):
        fmt.CorpusManifest.from_dict(d)


def _rewrite_shard(corpus: Path, edit) -> Path:
    """Rewrite train shard 0, each member replaced by edit(name, data) -> [(name, data), ...],
    keeping the manifest (so only the shard is wrong)."""
    m = load_manifest(corpus)
    path = corpus / m.splits["train"].shards[0].path
    with tarfile.open(path) as tf:
        members = [(i.name, tf.extractfile(i).read()) for i in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                tf.addfile(info, io.BytesIO(new_data))
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("short_mask", r"loss-mask record 0000000003\.lossmask has 48 bytes, .* makes 49"),
        ("no_mask", r"has members \['docstarts', 'tokens'\] \(no loss mask, but the manifest"),
        ("bad_value", r"sample 0000000001 loss-mask entry 5 is 7, not 0 or 1"),
    ],
)
def test_wrong_mask_member_names_the_shard(tmp_path, sp_tok, case, match):
    tok, docs = sp_tok
    src = write_jsonl(tmp_path / "pc.jsonl", pc_records(docs, 60))
    c = tmp_path / "c"
    preprocess_sft([src], c, tok.path, SEQ, valid_fraction=0.0, progress=False)

    def edit(name, data):
        if case == "short_mask" and name == "0000000003.lossmask":
            return [(name, data[:-1])]
        if case == "no_mask" and name.endswith(".lossmask"):
            return []
        if case == "bad_value" and name == "0000000001.lossmask":
            return [(name, data[:5] + b"\x07" + data[6:])]
        return [(name, data)]

    verify = load_tool("verify_corpus")
    assert verify.main([str(c), "--tokenizer", tok.path, "--no-progress"]) == 0
    path = _rewrite_shard(c, edit)
    assert verify.main([str(c), "--no-progress"]) == 2
    from zenlm.data.shards import shard_specs, verify_shard

    spec = shard_specs(c, load_manifest(c), "train")[0]
    with pytest.raises(CorpusError, match=match) as e:
        verify_shard(spec, load_manifest(c).dtype, tok.vocab_size)
    assert str(e.value).startswith(str(path))
    if case != "bad_value":  # the loader's own checks: at start-up or on the shard's first read
        with pytest.raises(CorpusError, match=match) as e:
            SampleSource(open_corpora([c], "train", SEQ, None, 0, False), [1.0]).read(0, 1)
        assert str(e.value).startswith(str(path))


def test_mask_member_in_a_v1_corpus_is_refused(tmp_path):
    c = tmp_path / "v1"
    write_corpus(c, [5], seq_len=SEQ)

    def add_mask(name, data):
        extra = [(name.replace("tokens", "lossmask"), bytes(N))] if name.endswith("tokens") else []
        return [(name, data), *extra]

    path = _rewrite_shard(c, add_mask)
    source = SampleSource(open_corpora([c], "train", SEQ, None, 0, False), [1.0])
    with pytest.raises(
        CorpusError, match=r"a loss mask, but the manifest has loss_mask false"
    ) as e:
        source.read(0, 1)
    assert str(e.value).startswith(str(path))


def test_ignore_index_is_the_models():
    from zenlm.model.factory import IGNORE_INDEX as MODEL_IGNORE

    assert IGNORE_INDEX == MODEL_IGNORE == -100


# --- chat: the tokenizer's own template, ids and masks against transformers ----------------------

SPECIAL = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
CHATML = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System message must be first') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML (Qwen-style), with transformers' generation tags around each reply and its <|im_end|>,
so transformers' return_assistant_tokens_mask gives the mask this writer must produce."""
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
"""Llama 3's template as its tokenizer_config.json has it (content trimmed, BOS from the
template, <|eot_id|> closing every turn)."""
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital.",
    "Hello there, how are you today? I am fine, thank you very much!",
    "Please write a short poem about the sea and the wind.",
    "Numbers: 1, 2, 3, 42 and 1000 are all fine here.",
]


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    words = " ".join(SENTENCES).split()
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": say(3)}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": say(rng.randint(1, 8))})
            reply = say(rng.randint(1, 10))
            if t == 0 and i % 4 == 1:
                reply = "  " + reply + " \n"  # spacing the Llama 3 template trims
            msgs.append({"role": "assistant", "content": reply})
        out.append(msgs)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{"chatml": dir, "llama3": dir}: a tiny byte-level BPE trained here, saved by transformers
    (ChatML: chat_template.jinja) or with the template inside tokenizer_config.json (Llama 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tk.train_from_iterator(SENTENCES * 4, trainer)
    root = tmp_path_factory.mktemp("hf")
    chatml = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        chat_template=CHATML,
    )  # fmt: skip
    chatml.save_pretrained(root / "chatml")
    assert (root / "chatml" / "chat_template.jinja").is_file()
    llama = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    llama.save_pretrained(root / "llama3")
    config = json.loads((root / "llama3" / "tokenizer_config.json").read_text())
    (root / "llama3" / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": LLAMA3})
    )
    return {"chatml": root / "chatml", "llama3": root / "llama3"}


def hf_expected(hf, rec, n: int) -> tuple[tuple, tuple] | None:
    """The example transformers implies for a record: apply_chat_template's ids (+ EOS unless
    they end with it), the mask from its assistant mask (ChatML's generation tags); prompt/
    completion from its encode. None when nothing is trained or it is longer than n."""
    eos = hf.eos_token_id
    if "messages" in rec:
        if not any(m["content"] for m in rec["messages"] if m["role"] == "assistant"):
            return None  # an empty reply trains nothing (not even its <|im_end|>)
        out = hf.apply_chat_template(
            rec["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if ids[-1] != eos:
            ids, mask = [*ids, eos], [*mask, 0]
    else:
        p = hf.encode(rec["prompt"], add_special_tokens=False)
        c = hf.encode(rec["completion"], add_special_tokens=False)
        ids, mask = [*p, *c, eos], [0] * len(p) + [1] * (len(c) + 1)
    mask[0] = 0
    return (tuple(ids), tuple(mask)) if any(mask) and len(ids) <= n else None


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_chat_ids_equal_transformers_and_mask_covers_replies(hf_dirs, name):
    from transformers import AutoTokenizer

    from zenlm.data.sft import load_sft_tokenizer
    from zenlm.data.sft_chat import assistant_mask

    hf = AutoTokenizer.from_pretrained(hf_dirs[name])
    tok, chat = load_sft_tokenizer(hf_dirs[name])
    assert chat is not None and (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    for msgs in conversations(12):
        text, spans = chat.render_with_spans(msgs)
        assert text == hf.apply_chat_template(msgs, tokenize=False)
        [(ids, offsets)] = tok.encode_offsets_batch([text])
        assert ids == hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
        mask, eos_closes = assistant_mask(offsets, ids, spans, tok.special_ids)
        assert not eos_closes  # both templates close every reply with a special token
        if name == "chatml":
            out = hf.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
            assert mask.tolist() == out["assistant_masks"]
        # Each run of trained tokens is one reply's content and the token that closes it.
        bounds = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
        runs = [hf.decode(ids[a:b]) for a, b in zip(bounds[0::2], bounds[1::2])]
        close = "<|im_end|>" if name == "chatml" else "<|eot_id|>"
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        if name == "llama3":
            replies = [r.strip() for r in replies]
        assert runs == [r + close for r in replies]


def test_chat_corpus_through_the_cli(tmp_path, hf_dirs, capsys):
    from transformers import AutoTokenizer

    d = hf_dirs["chatml"]
    hf = AutoTokenizer.from_pretrained(d)
    records = [{"messages": m} for m in conversations(60, seed=3)]
    records += [{"prompt": "Q: " + s[:20], "completion": " " + s[20:40]} for s in SENTENCES]
    # no reply content: nothing to train on, dropped
    records[7]["messages"] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
    ]
    late_system = [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]
    lines = [json.dumps(r) for r in records]
    lines.insert(20, json.dumps({"messages": late_system}))  # the template raises: template_error
    lines.insert(30, json.dumps({"messages": [{"role": "tool", "content": "{}"}]}))
    src = write_jsonl(tmp_path / "chat.jsonl", lines)
    out = tmp_path / "corpus"
    tool = load_tool("preprocess_sft")
    seq = 96  # a few conversations are longer: dropped
    args = [str(src), "--tokenizer", str(d), "--out", str(out), "--seq-len", str(seq)]
    assert tool.main([*args, "--valid-fraction", "0.1", "--max-bad-fraction", "0.05"]) == 0
    assert "bad records in" in capsys.readouterr().out
    m = load_manifest(out)
    from zenlm.data.tokenizer import fingerprint_file, load_tokenizer

    assert m.tokenizer == load_tokenizer(d).info() and m.loss_mask
    assert m.tokenizer.fingerprint == fingerprint_file(d)  # what the trainer checks
    st = m.stats["inputs"][0]
    assert (st["bad"]["template_error"], st["bad"]["unknown_role"]) == (1, 1)
    want = [hf_expected(hf, r, seq + 1) for r in records]
    assert st["empty"] == 1 and 0 < st["long"] == sum(w is None for w in want) - 1 < 20
    assert m.stats["pad_id"] == hf.pad_token_id
    got = [x for s in fmt.SPLITS for x in segments(read_samples(out, s), hf.pad_token_id)]
    assert sorted(got) == sorted(w for w in want if w is not None)
    assert len(got) > 40


def test_chat_template_whose_prefixes_differ_is_refused(tmp_path, hf_dirs):
    d = tmp_path / "tok"
    d.mkdir()
    for f in hf_dirs["chatml"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
    )
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in conversations(3)])
    with pytest.raises(
        BadInputError,
        match=r"c\.jsonl line 1: .*: the chat template renders earlier turns differently",
    ):
        preprocess_sft([src], tmp_path / "out", d, SEQ, valid_fraction=0.0, progress=False)
    assert not (tmp_path / "out").exists()
