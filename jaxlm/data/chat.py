"""Chat templates: conversations rendered and tokenized as transformers'
`apply_chat_template` does, and the tokens of the assistant's turns found.

Rendering follows transformers (`utils/chat_template_utils.py`): a jinja2
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, its `tojson` filter, `raise_exception`, `strftime_now`,
`dict` and `namespace`, and the tokenizer's named special tokens (`bos_token`,
`eos_token`, ...) as variables. The text is then tokenized whole, without added special
tokens, as `apply_chat_template(..., tokenize=True)` does.

The assistant's spans are found one of two ways:
- the template marks them with `{% generation %}...{% endgeneration %}` (transformers'
  `return_assistant_tokens_mask` convention): the characters rendered inside;
- otherwise by rendering prefixes: assistant message i spans from the end of the first
  i messages rendered with the generation prompt to the end of the first i + 1 messages,
  so it holds what the model must write after the prompt it is given at inference (the
  content and the template's end-of-turn text). This needs each prefix's rendering to be
  a prefix of the whole conversation's; a template where it is not is refused with a
  message saying to add `{% generation %}` or train on every token.
A token counts as the assistant's when it overlaps a span, the rule transformers uses.

Models without a template of their own (jaxlm's sentencepiece tokenizers, GPT-2) get
`DEFAULT_CHAT_TEMPLATE`:

    <s>System:
    You are terse.

    User:
    Hi!

    Assistant:
    Hello.</s>User:
    ...

(`<s>`, `</s>`: the tokenizer's BOS and EOS). The assistant's content and the EOS that
ends it are the generated span.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

from jaxlm.errors import JaxlmError

DEFAULT_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- 'Assistant:\\n' }}
        {%- generation %}
            {{- message['content'] + eos_token }}
        {%- endgeneration %}
    {%- else %}
        {{- message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- 'Assistant:\\n' }}
{%- endif %}
"""
GENERATION_RE = re.compile(r"\{\%-?\s*generation\s*-?\%\}")  # transformers' test for the tag
# Names a message's reasoning is passed under; templates read the first (transformers).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

Span = tuple[int, int]
_TRACKING: ContextVar[list | None] = ContextVar("jaxlm_generation_tracking", default=None)


class ChatTemplateError(JaxlmError):
    """The template does not compile or fails to render a conversation."""


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}` blocks, whose character spans are recorded while a render
        is tracked (transformers' AssistantTracker)."""

        tags = {"generation"}  # noqa: RUF012 (jinja's own class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_generation", [])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _generation(self, caller: Any) -> str:
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationTracker, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The compiled template; a syntax error is one ChatTemplateError."""
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"the chat template is not valid Jinja (template line {err.lineno}: {err.message})"
        ) from None


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to the template: None values dropped, and
    the reasoning fields aliased."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render(
    source: str,
    messages: Sequence[dict[str, Any]],
    specials: dict[str, str],
    add_generation_prompt: bool = False,
) -> tuple[str, list[Span]]:
    """(rendered text, character spans of its `{% generation %}` blocks)."""
    template = compile_template(source)
    blocks: list[str] = []
    spans: list[Span] = []
    token = _TRACKING.set((blocks, spans))
    try:
        for block in template.generate(
            messages=[_plain(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **specials,
        ):
            blocks.append(block)
    except ChatTemplateError:
        raise
    except Exception as err:  # raise_exception, undefined names, type errors, ...
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ChatTemplateError(
            f"the chat template fails to render the conversation: {message}"
        ) from None
    finally:
        _TRACKING.reset(token)
    return "".join(blocks), spans


def has_generation_tags(source: str) -> bool:
    return bool(GENERATION_RE.search(source))


def assistant_spans(
    source: str, messages: Sequence[dict[str, Any]], specials: dict[str, str], last_only: bool
) -> tuple[str, list[Span]]:
    """(the conversation's text, the character spans the assistant writes)."""
    text, tagged = render(source, messages, specials)
    if has_generation_tags(source):
        return text, tagged[-1:] if last_only else tagged
    spans: list[Span] = []
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    for i in turns[-1:] if last_only else turns:
        prompt, _ = render(source, messages[:i], specials, add_generation_prompt=True)
        upto, _ = render(source, messages[: i + 1], specials)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise ChatTemplateError(
                f"the chat template does not render message {i + 1} (assistant) as an "
                "extension of the messages before it, so its tokens cannot be told apart; "
                "mark the assistant's text with {% generation %}...{% endgeneration %} in "
                "data.chat_template, or set data.train_on=all"
            )
        if len(upto) > len(prompt):
            spans.append((len(prompt), len(upto)))
    return text, spans


def _spm_pieces(tokenizer: Any, text: str, start: int) -> tuple[list[int], list[Span]]:
    """A sentencepiece encoding of `text` with character offsets (shifted by `start`).
    Its byte offsets become characters; a piece that covers no character (the dummy
    prefix, the leading bytes of a byte-fallback character) takes the next one's span."""
    if not text:
        return [], []
    try:
        proto = tokenizer.encode(text, return_type="proto")
    except TypeError:  # sentencepiece < 0.2.1
        proto = tokenizer.encode(text, out_type="immutable_proto")
    byte_starts, at = [], 0
    for ch in text:
        byte_starts.append(at)
        at += len(ch.encode("utf-8"))
    byte_starts.append(at)
    ids, spans = [], []
    for piece in proto.pieces:
        ids.append(piece.id)
        spans.append(
            (
                bisect.bisect_left(byte_starts, piece.begin),
                bisect.bisect_left(byte_starts, piece.end),
            )
        )
    following = (len(text), len(text))
    for i in range(len(spans) - 1, -1, -1):
        if spans[i][0] == spans[i][1]:
            spans[i] = following
        following = spans[i]
    return ids, [(s + start, e + start) for s, e in spans]


def special_strings(tokenizer: Any) -> dict[str, str]:
    """The template's special-token variables (`bos_token`, `eos_token`, ...), as
    transformers' `special_tokens_map` gives them."""
    if hasattr(tokenizer, "special_token_strings"):  # data/hf_tokenizer.py
        return tokenizer.special_token_strings()
    names = {
        "bos_token": "bos_id",
        "eos_token": "eos_id",
        "unk_token": "unk_id",
        "pad_token": "pad_id",
    }
    out = {}
    for name, method in names.items():
        index = getattr(tokenizer, method)()
        if index >= 0:
            out[name] = tokenizer.id_to_piece(index)
    return out


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[Span]]:
    """Token ids of a rendered chat and each token's character span. A tokenizers
    tokenizer encodes it whole, without added special tokens; a sentencepiece one has
    its special tokens' strings (`<s>`, `</s>`) split out first, as transformers'
    slow tokenizers do, since sentencepiece reads them as plain text."""
    if hasattr(tokenizer, "encode_with_offsets"):
        return tokenizer.encode_with_offsets(text)
    specials = {
        piece: tokenizer.piece_to_id(piece) for piece in special_strings(tokenizer).values()
    }
    if not specials:
        return _spm_pieces(tokenizer, text, 0)
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    ids: list[int] = []
    spans: list[Span] = []
    at = 0
    for match in pattern.finditer(text):
        chunk_ids, chunk_spans = _spm_pieces(tokenizer, text[at : match.start()], at)
        ids += [*chunk_ids, specials[match.group()]]
        spans += [*chunk_spans, match.span()]
        at = match.end()
    chunk_ids, chunk_spans = _spm_pieces(tokenizer, text[at:], at)
    return ids + chunk_ids, spans + chunk_spans


def token_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """1 for every token overlapping a span (transformers' `return_assistant_tokens_mask`
    rule: spans and tokens are both in order, so one pass)."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask


def encode_chat(
    tokenizer: Any,
    source: str,
    messages: Sequence[dict[str, Any]],
    train_on: str = "assistant",
) -> tuple[list[int], list[int]]:
    """(token ids, 1 where the token is trained on) of a conversation: `train_on` is
    assistant (every assistant turn), last (the last one) or all (every token)."""
    specials = special_strings(tokenizer)
    if train_on == "all":
        text, _ = render(source, messages, specials)
        ids, _ = encode_with_offsets(tokenizer, text)
        return ids, [1] * len(ids)
    text, spans = assistant_spans(source, messages, specials, last_only=train_on == "last")
    ids, offsets = encode_with_offsets(tokenizer, text)
    return ids, token_mask(offsets, spans)
