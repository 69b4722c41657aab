"""Hugging Face tokenizer directories: loading, special tokens, and their fingerprint.

A Hugging Face tokenizer directory holds `tokenizer.json` (read with the `tokenizers` library, as
transformers' fast tokenizers do) or, without one, a SentencePiece `tokenizer.model`; plus
`tokenizer_config.json` and/or `special_tokens_map.json` naming the bos/eos/pad tokens and the
add_bos_token / add_eos_token settings. tokenizer.json wins when both are there.

Encoding is for pre-training: no special tokens are added (``add_special_tokens=False``: the
post-processor's BOS/EOS template is not applied); the corpus writer appends EOS per document
itself, and BOS with --add-bos. Special-token strings inside a text are matched as those tokens,
like transformers does by default. Padding and truncation saved in tokenizer.json are switched off.

The fingerprint (see `fingerprint`) is the sha256 of a canonical JSON form of everything that
changes tokenization, so the same tokenizer saved twice, or copied elsewhere, has the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenlm.data.format import TokenizerInfo, sha256_file

TOKENIZER_JSON = "tokenizer.json"
SP_MODEL = "tokenizer.model"
CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
HF_FILES = (TOKENIZER_JSON, SP_MODEL, CONFIG, SPECIAL_TOKENS_MAP)
CANONICAL_FORMAT = "zenlm-hf-tokenizer/1"
"""Version tag inside the fingerprinted form (a change of the form changes every fingerprint)."""
TOKENIZER_JSON_PARTS = (
    "model",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "added_tokens",
)
"""The tokenizer.json keys the fingerprint covers (not version, truncation, padding)."""
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")


def _error(message: str) -> Exception:
    from zenlm.data.tokenizer import TokenizerError  # tokenizer.py imports this module lazily

    return TokenizerError(message)


def _one_line(e: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory holding tokenizer.json or tokenizer.model."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in (TOKENIZER_JSON, SP_MODEL))


def _check_dir(path: Path) -> Path:
    """The backend file of a tokenizer directory (tokenizer.json first), checked readable and
    non-empty; TokenizerError naming the directory or the file otherwise."""
    for name in (TOKENIZER_JSON, SP_MODEL):
        f = path / name
        if f.exists() or f.is_symlink():
            if not f.is_file():
                raise _error(
                    f"{f}: not a file (a Hugging Face tokenizer directory holds it as one)"
                )
            if f.stat().st_size == 0:
                raise _error(f"{f}: empty file, not a tokenizer (an interrupted copy?)")
            return f
    raise _error(
        f"{path}: is a directory without {TOKENIZER_JSON} or {SP_MODEL}, so not a tokenizer; "
        "give a SentencePiece .model file or a Hugging Face tokenizer directory"
    )


def _read_json(path: Path, what: str) -> Any:
    return _read_text_json(path, what)[1]


def _read_text_json(path: Path, what: str) -> tuple[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise _error(f"{path}: cannot read {what} ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise _error(f"{path}: not a {what} (not UTF-8 text)") from e
    if not text.strip():
        raise _error(f"{path}: empty file, not a {what} (an interrupted copy?)")
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(f"{path}: not a {what} (invalid JSON: {e})") from e


def _read_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object file, or {} when the file is absent."""
    if not path.exists():
        return {}
    d = _read_json(path, what)
    if not isinstance(d, dict):
        raise _error(f"{path}: not a {what} (a JSON {type(d).__name__}, not an object)")
    return d


def _token_text(value: Any, where: Path, key: str) -> str | None:
    """A special token as written in the configs: a string, an AddedToken object or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    raise _error(
        f"{where}: {key} must be a token string or an AddedToken object, got {_one_line(repr(value), 60)}"
    )


@dataclass(frozen=True)
class SpecialTokens:
    """bos/eos/pad tokens and ids (-1: none) and the add_bos/add_eos settings (None: not set)."""

    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    bos_id: int
    eos_id: int
    pad_id: int
    add_bos_token: bool | None
    add_eos_token: bool | None

    def canonical(self) -> dict[str, Any]:
        return {
            "bos_token": self.bos_token,
            "bos_id": self.bos_id,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
            "pad_token": self.pad_token,
            "pad_id": self.pad_id,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
        }


def _settings(path: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The special-token settings of a directory as transformers merges them: tokenizer_config.json,
    overridden by special_tokens_map.json for the keys it sets unless the config has an
    added_tokens_decoder (transformers reads special_tokens_map.json only then). Returns the
    settings and, per key, the file it came from (for messages)."""
    config = _read_object(path / CONFIG, "tokenizer config")
    special_map = _read_object(path / SPECIAL_TOKENS_MAP, "tokenizer special tokens map")
    settings: dict[str, Any] = {}
    source: dict[str, Path] = {}
    for key in (*SPECIAL_KEYS, "add_bos_token", "add_eos_token", "chat_template"):
        if key in config:
            settings[key], source[key] = config[key], path / CONFIG
    if "added_tokens_decoder" not in config:
        for key in SPECIAL_KEYS:
            if key in special_map:
                settings[key], source[key] = special_map[key], path / SPECIAL_TOKENS_MAP
    for key in ("add_bos_token", "add_eos_token"):
        if settings.get(key) is not None and not isinstance(settings[key], bool):
            raise _error(f"{source[key]}: {key} must be true, false or null, got {settings[key]!r}")
    return settings, source


def _special_tokens(
    path: Path,
    settings: dict[str, Any],
    source: dict[str, Path],
    to_id,
    defaults: dict[str, str | None] | None = None,
) -> SpecialTokens:
    """Resolve the settings' bos/eos/pad to ids with to_id(token) -> id | None. `defaults`
    (SentencePiece: the model's own pieces) fill tokens the configs do not name. EOS is required."""
    tokens: dict[str, str | None] = {}
    ids: dict[str, int] = {}
    for key in SPECIAL_KEYS:
        where = source.get(key, path / CONFIG)
        tok = _token_text(settings.get(key), where, key) if key in settings else None
        if key not in settings and defaults:
            tok = defaults.get(key)
        tokens[key] = tok
        if tok is None:
            ids[key] = -1
            continue
        i = to_id(tok)
        if i is None:
            raise _error(
                f"{where}: {key} {tok!r} is not in the vocabulary of {path.name}/"
                f"{'tokenizer.json' if defaults is None else SP_MODEL}; fix the config or the "
                "tokenizer"
            )
        ids[key] = int(i)
    if tokens["eos_token"] is None:
        raise _error(
            f"{path}: no eos_token in {CONFIG} or {SPECIAL_TOKENS_MAP} (zenlm ends every document "
            f'with EOS); add "eos_token": "<the end-of-text token>" to {CONFIG}'
        )
    return SpecialTokens(
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
        pad_token=tokens["pad_token"],
        bos_id=ids["bos_token"],
        eos_id=ids["eos_token"],
        pad_id=ids["pad_token"],
        add_bos_token=settings.get("add_bos_token"),
        add_eos_token=settings.get("add_eos_token"),
    )


def _chat_template(path: Path, settings_template: Any) -> str | list | None:
    """chat_template.jinja when present, else tokenizer_config.json's chat_template: the order
    transformers reads them in (its save_pretrained writes the .jinja file)."""
    f = path / CHAT_TEMPLATE_FILE
    if f.is_file():
        try:
            return f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _error(f"{f}: cannot read the chat template ({_one_line(e)})") from e
    return settings_template


def canonical_tokenizer_json(content: dict[str, Any]) -> dict[str, Any]:
    """The parts of a tokenizer.json that change tokenization, in a form independent of how it
    was written: BPE merges as [left, right] pairs (older files write "left right"), added tokens
    ordered by id. Key order and whitespace vanish in the sorted-key dump that is hashed."""
    parts = {k: content.get(k) for k in TOKENIZER_JSON_PARTS}
    model = parts.get("model")
    if isinstance(model, dict) and isinstance(model.get("merges"), list):
        model = dict(model)
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        parts["model"] = model
    added = parts.get("added_tokens")
    if isinstance(added, list) and all(isinstance(t, dict) for t in added):
        parts["added_tokens"] = sorted(
            added, key=lambda t: (t.get("id", -1), str(t.get("content")))
        )
    return parts


def _digest(form: dict[str, Any]) -> str:
    blob = json.dumps(form, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: a vocabulary may hold lone surrogates ("\\ud800" in its JSON)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class _TokenizersBackend:
    """tokenizer.json through the `tokenizers` library (Rust; its batch encode releases the GIL
    and runs on its own thread pool unless TOKENIZERS_PARALLELISM=false)."""

    def __init__(self, tk):
        self.tk = tk
        self._batch = getattr(tk, "encode_batch_fast", tk.encode_batch)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._batch(texts, add_special_tokens=False)]

    def encode_offsets_batch(self, texts: list[str]) -> list[tuple[list[int], list]]:
        return [(e.ids, e.offsets) for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def special_added_ids(self) -> set[int]:
        return {i for i, t in self.tk.get_added_tokens_decoder().items() if t.special}

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)


class _SentencePieceBackend:
    def __init__(self, sp):
        self.sp = sp

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def special_added_ids(self) -> set[int]:
        return {i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}


class HFTokenizer:
    """A loaded Hugging Face tokenizer directory: the same interface as tokenizer.Tokenizer
    (vocab_size, bos_id, eos_id, pad_id, encode, encode_batch, decode, info, path, fingerprint)
    plus the special tokens, add_bos_token / add_eos_token and chat_template of its configs."""

    def __init__(
        self,
        path: str,
        kind: str,
        backend: _TokenizersBackend | _SentencePieceBackend,
        vocab_size: int,
        specials: SpecialTokens,
        fingerprint: str,
        chat_template: str | list | None,
    ):
        self.path = path
        self.kind = kind
        """"tokenizers" (tokenizer.json) or "sentencepiece" (tokenizer.model)."""
        self.backend = backend
        self.vocab_size = vocab_size
        """Every id the tokenizer can produce is < vocab_size (added tokens included)."""
        self.specials = specials
        self.fingerprint = fingerprint
        self.chat_template = chat_template
        """As the configs hold it (a Jinja string, a list of named templates, or None); not part
        of the fingerprint (pre-training corpora do not use it)."""

    bos_id = property(lambda self: self.specials.bos_id)
    eos_id = property(lambda self: self.specials.eos_id)
    pad_id = property(lambda self: self.specials.pad_id)
    bos_token = property(lambda self: self.specials.bos_token)
    eos_token = property(lambda self: self.specials.eos_token)
    pad_token = property(lambda self: self.specials.pad_token)
    add_bos_token = property(lambda self: self.specials.add_bos_token)
    add_eos_token = property(lambda self: self.specials.add_eos_token)

    @property
    def sp(self):
        """The SentencePieceProcessor of a tokenizer.model directory (None for tokenizer.json)."""
        return getattr(self.backend, "sp", None)

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without special tokens added (add_special_tokens=False)."""
        return self.backend.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Ids of each text. tokenizer.json: one `encode_batch` call on tokenizers' own thread
        pool (num_threads is not used: TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS size it);
        tokenizer.model: SentencePiece with num_threads threads."""
        if isinstance(self.backend, _SentencePieceBackend):
            return self.backend.encode_batch(texts, num_threads)
        return self.backend.encode_batch(texts)

    def encode_offsets_batch(self, texts: list[str]) -> list[tuple[list[int], list]]:
        """(ids, character (start, end) offsets per id) of each text (tokenizer.json only: the
        chat loss mask needs the offsets)."""
        if not isinstance(self.backend, _TokenizersBackend):
            raise _error(
                f"{self.path}: offsets need a tokenizer.json; this directory has {SP_MODEL}"
            )
        return self.backend.encode_offsets_batch(texts)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special tokens: special added tokens (SentencePiece: control pieces) and the
        bos/eos/pad ids."""
        own = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0}
        return frozenset(self.backend.special_added_ids() | own)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids])

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(
            fingerprint=self.fingerprint,
            vocab_size=self.vocab_size,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            pad_id=self.pad_id,
        )

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({self.path!r}, {self.kind}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_id} eos={self.eos_id} pad={self.pad_id}, "
            f"fingerprint={self.fingerprint[:12]}…)"
        )


def _load_tokenizers(path: Path, file: Path) -> tuple[Any, int, dict[str, Any]]:
    from tokenizers import Tokenizer as TokenizersTokenizer

    text, content = _read_text_json(file, "tokenizer")
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise _error(f'{file}: not a tokenizer (no "model" object: not a tokenizer.json)')
    try:
        tk = TokenizersTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise _error(f"{file}: not a tokenizer (tokenizers cannot read it: {_one_line(e)})") from e
    tk.no_padding()
    tk.no_truncation()
    vocab = tk.get_vocab(with_added_tokens=True)
    size = max(tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    return tk, size, content


def _load_sentencepiece(file: Path) -> Any:
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(file))
    except (RuntimeError, OSError) as e:
        reason = _one_line(str(e).strip().splitlines()[0].rsplit("] ", 1)[-1] if str(e) else e)
        raise _error(
            f"{file}: not a SentencePiece model ({reason}); a Hugging Face directory without "
            f"{TOKENIZER_JSON} needs a SentencePiece {SP_MODEL}"
        ) from e


def load_hf_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """Load a Hugging Face tokenizer directory; TokenizerError names the directory or the file
    that is missing, empty, unreadable or not a tokenizer, and a special token not in the
    vocabulary or an EOS the configs do not name."""
    path = Path(path)
    file = _check_dir(path)
    signature = _signature(path)  # before reading: a change during the load is not cached
    settings, source = _settings(path)
    if file.name == TOKENIZER_JSON:
        tk, size, content = _load_tokenizers(path, file)
        specials = _special_tokens(path, settings, source, tk.token_to_id)
        form = {
            "format": CANONICAL_FORMAT,
            "tokenizer_json": canonical_tokenizer_json(content),
            "special_tokens": specials.canonical(),
        }
        backend, kind = _TokenizersBackend(tk), "tokenizers"
    else:
        sp = _load_sentencepiece(file)
        size = sp.get_piece_size()

        def to_id(tok: str) -> int | None:
            i = sp.piece_to_id(tok)
            return i if 0 <= i < size and sp.id_to_piece(i) == tok else None

        own = {
            f"{k}_token": sp.id_to_piece(i) if i >= 0 else None
            for k, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()))
        }
        specials = _special_tokens(path, settings, source, to_id, defaults=own)
        form = {
            "format": CANONICAL_FORMAT,
            "tokenizer_model_sha256": sha256_file(file),
            "special_tokens": specials.canonical(),
        }
        backend, kind = _SentencePieceBackend(sp), "sentencepiece"
    fingerprint = _digest(form)
    _FINGERPRINTS[signature] = fingerprint
    return HFTokenizer(
        path=str(path),
        kind=kind,
        backend=backend,
        vocab_size=size,
        specials=specials,
        fingerprint=fingerprint,
        chat_template=_chat_template(path, settings.get("chat_template")),
    )


def _signature(path: Path) -> tuple:
    """What identifies the directory's tokenizer files on disk (for the fingerprint cache)."""
    sig: list[Any] = [str(path.resolve())]
    for name in (*HF_FILES, CHAT_TEMPLATE_FILE):
        try:
            st = (path / name).stat()
            sig.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except OSError:
            sig.append((name, None))
    return tuple(sig)


class _Cache(dict):
    """A few recent fingerprints by file signature (preflight, trainer and checkpoint each ask)."""

    def __setitem__(self, key, value) -> None:
        if len(self) >= 16:
            self.pop(next(iter(self)))
        super().__setitem__(key, value)


_FINGERPRINTS: dict[tuple, str] = _Cache()


def hf_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint of a Hugging Face tokenizer directory (see docs/data.md): sha256 of the
    canonical JSON of its tokenizer.json parts (or tokenizer.model's sha256) and special tokens.
    Loads (and so checks) the directory once per state of its files."""
    path = Path(path)
    cached = _FINGERPRINTS.get(_signature(path))
    if cached is not None:
        return cached
    return load_hf_tokenizer(path).fingerprint
