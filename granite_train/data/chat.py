"""Chat rendering: messages -> text + the character spans to train on -> tokens + mask.

Both renderers return the text and the character spans of what the model should learn to say
(assistant content plus its closing end-of-turn token; or, given `trained`, that of the messages
it marks, e.g. a prompt-completion row's completion turns). Mapping spans to tokens through the
tokenizer's character offsets works for any template and any tokenizer, so the built-in Granite
format and a checkpoint's own jinja template share one tokenization path.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from granite_train.data.rows import BadRow, Message
from granite_train.data.tokenizer import END_OF_ROLE, START_OF_ROLE, Tokenizer
from granite_train.errors import UserError

Span = Tuple[int, int]
IGNORE = -100


class Renderer(Protocol):
    def render(self, messages: Sequence[Message], want_spans: bool = True,
               trained: Optional[Sequence[bool]] = None) -> Tuple[str, List[Span]]:
        """The conversation's text and the spans of its targets (empty when not wanted):
        the messages `trained` marks (one flag per message), or by default the assistant turns."""


def _targets(messages: Sequence[Message], trained: Optional[Sequence[bool]]) -> List[bool]:
    if trained is None:
        return [m["role"] == "assistant" for m in messages]
    if len(trained) != len(messages):
        raise ValueError(f"trained has {len(trained)} flags for {len(messages)} messages")
    return [bool(t) for t in trained]


class GraniteRenderer:
    """`<|start_of_role|>{role}<|end_of_role|>{content}<|end_of_text|>\\n` per message (Granite
    3.x/4.0 model cards); no system prompt is injected."""

    def __init__(self, eos_token: str) -> None:
        self.eos_token = eos_token

    def render(self, messages: Sequence[Message], want_spans: bool = True,
               trained: Optional[Sequence[bool]] = None) -> Tuple[str, List[Span]]:
        parts: List[str] = []
        spans: List[Span] = []
        pos = 0
        for m, target in zip(messages, _targets(messages, trained)):
            head = f"{START_OF_ROLE}{m['role']}{END_OF_ROLE}"
            body = m["content"] + self.eos_token
            pos += len(head)
            if target and want_spans:
                spans.append((pos, pos + len(body)))
            parts += (head, body, "\n")
            pos += len(body) + 1
        return "".join(parts), spans


def _raise(message: str) -> None:
    raise BadRow(f"was rejected by the chat template: {message}")


class JinjaRenderer:
    """A HF-style jinja chat template, rendered in a sandbox.

    Assistant spans come from rendering growing prefixes of the conversation: the text added by
    message i, minus its role header (the `add_generation_prompt=True` render of the messages
    before it), minus trailing whitespace. That needs the template to render a prefix of the
    conversation as a prefix of the whole text, which HF templates do by design.
    """

    def __init__(self, template: str, bos_token: Optional[str], eos_token: str, name: str = "") -> None:
        self.template = template
        self.bos_token = bos_token or ""
        self.eos_token = eos_token
        self.name = name
        # Templates that print today's date (Granite 3.x) see one date for the whole preparation;
        # as a field it is part of the tokenization cache key, so a later day re-tokenizes.
        self.now = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
        self._compiled: Any = None  # built lazily: jinja templates do not pickle (datasets.map)

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_compiled": None}

    def _template(self) -> Any:
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = self.now.strftime
            try:
                self._compiled = env.from_string(self.template)
            except Exception as e:
                raise UserError(f"chat template {self.name or ''} does not compile: {e}; fix it or set "
                                f"data.chat_template=granite") from None
        return self._compiled

    def _render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        try:
            return self._template().render(messages=list(messages), add_generation_prompt=generation_prompt,
                                           bos_token=self.bos_token, eos_token=self.eos_token)
        except BadRow:
            raise
        except Exception as e:
            if not messages:  # many templates index messages[0]; an empty prefix renders as nothing
                return ""
            raise BadRow(f"could not be rendered by the chat template ({type(e).__name__}: {e})") from None

    def render(self, messages: Sequence[Message], want_spans: bool = True,
               trained: Optional[Sequence[bool]] = None) -> Tuple[str, List[Span]]:
        full = self._render(messages, False)
        if not want_spans:
            return full, []
        spans: List[Span] = []
        for i, (m, target) in enumerate(zip(messages, _targets(messages, trained))):
            if not target:
                continue
            before = self._render(messages[:i], False)
            upto = full if i == len(messages) - 1 else self._render(messages[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise UserError(
                    f"chat template {self.name} does not render the first {i + 1} messages as a prefix of "
                    f"the whole conversation, so assistant tokens cannot be located; set "
                    f"data.chat_template=granite or data.train_on=all")
            # The role header is what the generation prompt shares with the rendered turn (a
            # prompt may add more than the turn has, e.g. an empty "<think>" block). The prompt
            # opens an assistant turn: other trained roles find their content below.
            start = len(before)
            if m["role"] == "assistant":
                header = self._render(messages[:i], True)
                start = max(start, common_prefix_length(header, upto))
            if start == len(before) and m["content"].strip():
                # No header found (the template ignores add_generation_prompt, or the turn is not
                # an assistant's): skip it by finding the content.
                found = upto.find(m["content"].strip(), start)
                start = found if found >= 0 else start
            end = len(upto.rstrip())
            if end > start:
                spans.append((start, end))
        return full, spans


def common_prefix_length(a: str, b: str) -> int:
    """len(os.path.commonprefix([a, b])), by bisection over slice comparisons: those run in C,
    where commonprefix compares character by character in Python (seconds per thousand turns of
    a long conversation)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def make_renderer(chat_template: Optional[str], tokenizer: Tokenizer) -> Renderer:
    """data.chat_template: None (the tokenizer's template, else Granite), "granite", a path to a
    .jinja file, or a literal jinja string."""
    if chat_template is None:
        if tokenizer.chat_template:
            return JinjaRenderer(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                                 name=f"of {tokenizer.name}")
        return GraniteRenderer(tokenizer.eos_token)
    if chat_template == "granite":
        return GraniteRenderer(tokenizer.eos_token)
    if "{" not in chat_template and Path(chat_template).expanduser().is_file():
        text = Path(chat_template).expanduser().read_text(encoding="utf-8")
        return JinjaRenderer(text, tokenizer.bos_token, tokenizer.eos_token, name=chat_template)
    if "{%" not in chat_template and "{{" not in chat_template:
        raise UserError(f"data.chat_template={chat_template!r} is neither 'granite', a .jinja file nor a "
                        f"jinja template string; fix it or set data.chat_template=null")
    return JinjaRenderer(chat_template, tokenizer.bos_token, tokenizer.eos_token, name="data.chat_template")


def spans_to_mask(offsets: np.ndarray, spans: Sequence[Span]) -> np.ndarray:
    """Token i is trainable when its first character lies inside a span."""
    if len(spans) == 0 or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    bounds = np.asarray(spans, dtype=np.int64)
    starts = offsets[:, 0]
    j = np.searchsorted(bounds[:, 0], starts, side="right") - 1
    return (j >= 0) & (starts < bounds[np.maximum(j, 0), 1])


def _trainable(enc: Any, spans: Sequence[Span]) -> np.ndarray:
    """Token mask of the spans. A few offset look-ups per span instead of converting every
    token's offsets; tokenizers that leave characters without a token fall back on that."""
    mask = np.zeros(len(enc.ids), dtype=bool)
    for start, end in spans:
        first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
        if first is None or last is None:
            return spans_to_mask(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), spans)
        if enc.token_to_chars(first)[0] < start:  # a token straddling the span start is not in it
            first += 1
        mask[first: last + 1] = True
    return mask


def tokenize_rendered(tokenizer: Tokenizer, rendered: Sequence[Tuple[str, Sequence[Span]]],
                      train_on: str) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) per rendered conversation, int32, labels -100 where not trained
    (unshifted). One `encode_batch` call: the tokenizer runs in parallel in Rust."""
    encodings = tokenizer.encode_batch([text for text, _ in rendered])
    out = []
    for (_, spans), enc in zip(rendered, encodings):
        ids = np.asarray(enc.ids, dtype=np.int32)
        if train_on == "assistant":
            labels = np.where(_trainable(enc, spans), ids, IGNORE).astype(np.int32)
        else:
            labels = ids.copy()
        out.append((ids, labels))
    return out


def encode_chats(tokenizer: Tokenizer, renderer: Renderer, conversations: Sequence[Sequence[Message]],
                 train_on: str) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Render and tokenize conversations (raises BadRow on the first one the template rejects)."""
    rendered = [renderer.render(msgs, train_on == "assistant") for msgs in conversations]
    return tokenize_rendered(tokenizer, rendered, train_on)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """A document = its tokens + EOS, all trained."""
    out = []
    for enc in tokenizer.encode_batch(texts):
        ids = np.append(np.asarray(enc.ids, dtype=np.int32), np.int32(tokenizer.eos_token_id))
        out.append((ids, ids.copy()))
    return out


def encode_prompt_completions(tokenizer: Tokenizer, pairs: Sequence[Tuple[str, str]],
                              train_on: str) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Prompt-completion strings without a chat template (TRL's standard prompt-completion):
    the tokens of prompt + completion, + EOS. With train_on=assistant only the completion and
    the EOS are trained; a token straddling the boundary belongs to the prompt."""
    rendered = [(prompt + completion, [(len(prompt), len(prompt) + len(completion))] if completion else [])
                for prompt, completion in pairs]
    eos = np.int32(tokenizer.eos_token_id)
    return [(np.append(ids, eos), np.append(labels, eos))
            for ids, labels in tokenize_rendered(tokenizer, rendered, train_on)]


def chat_overhead(tokenizer: Tokenizer, renderer: Renderer) -> int:
    """Tokens of an empty one-turn conversation: what the template costs before any content."""
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    try:
        text, _ = renderer.render(empty, want_spans=False)
    except BadRow:
        return 0  # a template that refuses empty turns: no overhead check possible
    return len(tokenizer.encode(text))
