"""SentencePiece training and the Tokenizer wrapper: vocab rounding, special ids, fingerprint,
lossless round trip, JSONL input."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from zenlm.data.readers import BadInputError
from zenlm.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TokenizerError,
    fingerprint_file,
    load_tokenizer,
    round_vocab_size,
    train_tokenizer,
)

SYLLABLES = [
    "ka",
    "to",
    "re",
    "mi",
    "su",
    "no",
    "ha",
    "ya",
    "lo",
    "ve",
    "dri",
    "ste",
    "pla",
    "quo",
    "xen",
    "ur",
    "an",
    "el",
    "is",
    "om",
]
WORDS = [a + b + c for a in SYLLABLES for b in SYLLABLES[:8] for c in ("", "n", "s")]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Deterministic English-ish documents with code, numbers, a little non-ASCII."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) + rng.choice(["", "s", "ed", "ing"]) for _ in range(12)]
            lines.append(" ".join(words) + f" {rng.randint(0, 99999)}.")
        lines.append(f"def f_{i}(x):\n    return x * {i}\n")
        lines.append(rng.choice(["café naïve", "über Größe", "東京 データ", ""]))
        docs.append("\n".join(lines))
    return docs


ROUND_TRIP = [
    "plain ascii text",
    "emoji 🤖👍🏽🇫🇷 family 👨‍👩‍👧 end",
    "CJK 中文字符 日本語のテキスト 한국어",
    "tabs\tand\nnewlines\r\nand\rreturns\n\n\n",
    "".join(chr(c) for c in range(32)) + "\x7f\x85\u2028\u2029",
    "  leading spaces",
    "trailing spaces   ",
    "multiple   inner    spaces\t\t and  tabs",
    " ",
    "",
    "ﬁ ligature, Å composed vs A\u030a decomposed, ｆｕｌｌwidth",  # no NFKC
    "numbers 1234567890 3.14159 -42",
    "<s></s><pad><unk> <0x41> ⁇ look like special pieces",
    "\U0010ffff \ud7ff private \ue000",
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tok-{request.param}")
    src = d / "train.txt"
    src.write_text("\n".join(make_docs(400)), encoding="utf-8")
    return train_tokenizer([src], d / "t.model", 300, model_type=request.param, progress=False)


def test_round_vocab_size():
    assert [round_vocab_size(v) for v in (1, 128, 129, 300, 32000)] == [128, 128, 256, 384, 32000]
    with pytest.raises(ValueError):
        round_vocab_size(0)


def test_vocab_rounded_and_special_ids(tok):
    assert tok.vocab_size == 384  # asked 300
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert [tok.sp.id_to_piece(i) for i in (1, 2, 3)] == ["<s>", "</s>", "<pad>"]
    info = tok.info()
    assert (info.vocab_size, info.bos_id, info.eos_id, info.pad_id) == (384, 1, 2, 3)


def test_fingerprint_is_sha256_of_model_file(tok):
    with open(tok.path, "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    assert tok.fingerprint == fingerprint_file(tok.path) == expected
    assert load_tokenizer(tok.path).fingerprint == expected


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert UNK_ID not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text


def test_round_trip_batch(tok):
    assert [tok.decode(x) for x in tok.encode_batch(ROUND_TRIP, num_threads=2)] == ROUND_TRIP


def test_meta_symbol_is_the_one_documented_exception(tok):
    # U+2581 is SentencePiece's whitespace marker; it decodes as a space (docs/data.md).
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_jsonl_named_field(tmp_path):
    rng = random.Random(1)
    path = tmp_path / "in.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in make_docs(300):
            # "body" is trained on; "other" holds a word that must not be learned.
            f.write(json.dumps({"body": doc + " zyxwvu" * 3, "other": "qjqjqjqjqj " * 50}) + "\n")
            if rng.random() < 0.005:
                f.write("{not json\n")
    tok = train_tokenizer(
        [path], tmp_path / "t.model", 384, text_field="body", max_bad_fraction=0.05, progress=False
    )
    assert len(tok.encode("zyxwvu")) <= 2
    assert len(tok.encode("qjqjqjqjqj")) >= 5
    with pytest.raises(BadInputError, match=str(path)):
        train_tokenizer([path], tmp_path / "u.model", 384, text_field="missing", progress=False)


def test_too_little_text_is_a_clear_error(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("just a few words\n" * 3)
    with pytest.raises(ValueError, match="too little training text"):
        train_tokenizer([src], tmp_path / "t.model", 4000, model_type="unigram", progress=False)


def test_load_and_fingerprint_name_a_bad_model_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "empty.model").write_bytes(b"")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    cases = {
        tmp_path / "notes.txt": "not a SentencePiece model",
        tmp_path / "empty.model": "empty file",
        # a directory must be a Hugging Face tokenizer directory (tests/unit/test_hf_tokenizer.py)
        tmp_path: "is a directory without tokenizer.json or tokenizer.model",
        tmp_path / "nowhere.model": "no tokenizer model there",
        tmp_path / "hf" / "tokenizer.json": "not a SentencePiece model but a Hugging Face",
    }
    for path, what in cases.items():
        with pytest.raises(TokenizerError, match=re.escape(f"{path}: {what}")):
            load_tokenizer(path)
    for path in (tmp_path, tmp_path / "hf" / "tokenizer.json"):  # fingerprint_file checks these
        with pytest.raises(TokenizerError, match=re.escape(f"{path}: ")):
            fingerprint_file(path)
    with pytest.raises(TokenizerError, match=re.escape(f"{tmp_path / 'nowhere.model'}: no")):
        fingerprint_file(tmp_path / "nowhere.model")  # what the trainer calls on tokenizer_path


def test_train_refuses_bad_arguments_and_places_before_reading(tmp_path, tok):
    src = tmp_path / "a.txt"
    src.write_text("\n".join(make_docs(50)))
    before = Path(tok.path).read_bytes()
    bad = [
        (dict(model_path=tok.path), "already exists"),
        (dict(model_path=tmp_path), "is a directory"),
        (dict(vocab_size=0), "--vocab-size must be positive"),
        (dict(vocab_size=200), "too small"),
        (dict(max_sentences=-1), "--max-sentences"),
        (dict(character_coverage=0.0), "--character-coverage"),
        (dict(num_threads=0), "--threads"),
        (dict(inputs=[src, tmp_path / "gone.txt"]), "gone.txt: input file not found"),
    ]
    for kw, what in bad:
        args = {"inputs": [src], "model_path": tmp_path / "new.model", "vocab_size": 384, **kw}
        with pytest.raises(BadInputError, match=re.escape(what)):
            train_tokenizer(**args, progress=False)
    assert Path(tok.path).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failed_training_leaves_nothing(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("just a few words\n" * 3)
    out = tmp_path / "new" / "dir" / "t.model"
    with pytest.raises(TokenizerError, match=re.escape(f"in {src}")):
        train_tokenizer([src], out, 4000, progress=False)
    assert not (tmp_path / "new").exists()
    # a file that is gzip for its first block but cut later fails naming it, from inside the
    # SentencePiece iterator (the original error, not SentencePiece's RuntimeError)
    packed = gzip.compress("\n".join(make_docs(400, seed=3)).encode() * 3)
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(packed[: len(packed) * 3 // 4])
    with pytest.raises(BadInputError, match=re.escape(f"{cut}: cannot read input")):
        train_tokenizer([cut], out, 384, progress=False)
    assert not (tmp_path / "new").exists()
