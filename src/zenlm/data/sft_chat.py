"""Chat conversations -> token ids and a loss mask, with a Hugging Face tokenizer's own template.

The template is the tokenizer directory's `chat_template.jinja` or, without one, the
`chat_template` of its `tokenizer_config.json` (a string, or a list of named templates of which
"default" is taken), the order transformers uses. It is rendered the way transformers'
`apply_chat_template` renders it (transformers/utils/chat_template_utils.py): jinja2's
ImmutableSandboxedEnvironment (chat templates are untrusted code) with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `{% generation %}` tag that renders its body, the
globals `raise_exception`, `strftime_now`, `dict` and `namespace`, a `tojson` filter without
HTML escaping, and the variables `messages`, `tools` (None), `documents` (None),
`add_generation_prompt` and the tokenizer's named special tokens (`bos_token`, `eos_token`,
`unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`, those it has). The rendered
text is tokenized as a whole without added special tokens (`add_special_tokens=False`, as
transformers does), so the ids are exactly `apply_chat_template(messages, tokenize=True)`'s.

Which tokens are trained (loss mask 1): exactly the tokens of each assistant message's content,
plus the tokens after it up to and including the first special token (the end-of-turn token that
closes the reply, e.g. `<|im_end|>`, `<|eot_id|>`, `</s>`; a template's spacing before it goes
along). The content is found by rendering prefixes, the approach of TRL and torchtune: for
assistant message i, `render(messages[:i], add_generation_prompt=True)` is everything before the
reply (the assistant header included), `render(messages[:i + 1])` ends with the reply, and the
difference holds the content (as given, or stripped when the template trims it) followed by what
the template closes it with. A token counts when its characters overlap the content (the rule of
transformers' `return_assistant_tokens_mask`). System and user turns, headers, and template text
are 0. When no special token follows the content inside its turn, only the content is trained,
except for the conversation's last message, whose closing token is then the EOS the writer
appends. A template whose rendering of earlier turns changes once later turns follow (so prefixes
do not line up) is refused: the spans could not be found reliably.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from zenlm.data.readers import BadInputError

ROLES = ("system", "user", "assistant")
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
"""transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a template sees as variables."""


class ChatRecordError(ValueError):
    """One conversation the template cannot render (its raise_exception, a missing variable):
    a bad record, counted under `template_error`."""


class TemplatePrefixError(BadInputError):
    """The template renders a conversation's earlier turns differently once later turns follow,
    so the assistant spans cannot be found by prefix rendering; not a data problem."""


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_tokenizer_config(tok_dir: Path, template: Any) -> tuple[str | None, dict[str, str]]:
    """(chat template or None, named special tokens) of a Hugging Face tokenizer directory.

    `template` is the chat template as zenlm.data.hf_tokenizer read it (chat_template.jinja,
    else tokenizer_config.json's), so both paths see the same one; a list of named templates
    resolves to "default"."""
    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        path = tok_dir / name
        if path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise BadInputError(f"{path}: unreadable ({e}); fix or remove it") from e
            if isinstance(loaded, dict):
                config.update(loaded)
    special = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = _token_content(config.get(name))
        if token is not None:
            special[name] = token
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise BadInputError(
            f"{tok_dir}: chat_template in tokenizer_config.json is not a template string"
        )
    return template, special


@lru_cache(maxsize=8)
def compile_template(source: str):
    """The template compiled in an environment equivalent to transformers' (module doc)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks the
        span for return_assistant_tokens_mask; the prefix rendering here needs no tracking)."""

        tags = {"generation"}  # noqa: RUF012 (jinja's Extension API)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


@dataclass(frozen=True)
class AssistantSpan:
    """Character offsets in the rendered conversation of one assistant reply."""

    content_start: int
    content_end: int
    turn_end: int
    """End of what the template rendered for this message (its closing tokens included)."""
    last: bool
    """The conversation's last message."""


class ChatTemplate:
    """A tokenizer directory's chat template, rendered as transformers renders it."""

    def __init__(self, source: str, special_tokens: dict[str, str], where: str):
        self.source, self.special_tokens, self.where = source, dict(special_tokens), where
        try:
            self._template = compile_template(source)
        except Exception as e:  # jinja2.TemplateSyntaxError and friends
            raise BadInputError(f"{where}: chat_template does not compile ({e})") from e

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._template.render(
                messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.SecurityError as e:
            raise BadInputError(f"{self.where}: chat_template is unsafe ({e})") from e
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError) as e:
            raise ChatRecordError(str(e)) from e

    def render_with_spans(self, messages: Sequence[dict]) -> tuple[str, list[AssistantSpan]]:
        """The whole conversation rendered, and the span of every assistant reply with content.

        Raises ChatRecordError when the template refuses the conversation or does not render a
        reply's content verbatim (nor stripped); TemplatePrefixError when prefixes differ."""
        full = self.render(messages)
        spans: list[AssistantSpan] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or not m["content"]:
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise TemplatePrefixError(
                    f"{self.where}: the chat template renders earlier turns differently once "
                    f"later turns follow (message {i}, an assistant reply: the rendering of "
                    f"messages[:{i}] with add_generation_prompt is not a prefix of the rendering "
                    f"with the reply, or that is not a prefix of the whole conversation), so the "
                    "replies' tokens cannot be found; use a template whose earlier turns render "
                    "the same whatever follows"
                )
            turn = through[len(before) :]
            content = m["content"]
            at = turn.find(content)
            if at < 0 and content.strip():
                content = content.strip()
                at = turn.find(content)
            if at < 0:
                raise ChatRecordError(
                    f"the template does not render assistant message {i}'s content verbatim"
                )
            start = len(before) + at
            spans.append(
                AssistantSpan(start, start + len(content), len(through), i == len(messages) - 1)
            )
        return full, spans


def assistant_mask(
    offsets: Sequence[tuple[int, int]],
    ids: Sequence[int],
    spans: Sequence[AssistantSpan],
    special_ids: frozenset[int],
) -> tuple[np.ndarray, bool]:
    """(uint8 mask over the rendered ids, whether the appended EOS closes the last reply).

    Content tokens: those whose [start, end) overlaps the content span. Then the tokens after
    the content while they start inside the turn, through the first special token; without one
    in the turn, none of them (and for the last message the appended EOS closes it)."""
    mask = np.zeros(len(ids), np.uint8)
    starts = np.array([o[0] for o in offsets], np.int64)
    ends = np.array([o[1] for o in offsets], np.int64)
    eos_closes = False
    for sp in spans:
        inside = np.flatnonzero((ends > sp.content_start) & (starts < sp.content_end))
        if not len(inside):
            continue
        mask[inside] = 1
        closed = False
        j = int(inside[-1]) + 1
        while j < len(ids) and starts[j] < sp.turn_end:
            if int(ids[j]) in special_ids:
                mask[int(inside[-1]) + 1 : j + 1] = 1
                closed = True
                break
            j += 1
        if not closed and sp.last:
            eos_closes = True
    return mask, eos_closes


def load_chat_template(path: str | os.PathLike, template: Any) -> ChatTemplate | None:
    """The chat template (`template`: the loaded tokenizer's chat_template) of a Hugging Face
    tokenizer directory with a tokenizer.json (the mask needs its character offsets), or None
    (no template, or not such a directory)."""
    d = Path(path)
    if not is_hf_dir(d):
        return None
    source, special = read_tokenizer_config(d, template)
    return None if source is None else ChatTemplate(source, special, str(d))


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A directory with a tokenizer.json (what the chat path can take)."""
    return Path(path).is_dir() and (Path(path) / "tokenizer.json").is_file()
