"""Rows -> examples (input_ids, labels): tokenize, truncate or drop, count.

`Encoder` is a picklable callable for `datasets.map(batched=True, with_indices=True)`; streams
call `encode_rows` on their own batches. Every row yields one output row carrying its `status`,
so dropped rows are counted after a (possibly multi-process, possibly cached) map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import datasets
import numpy as np

from granite_train.config import DataConfig
from granite_train.data.chat import Renderer, encode_prompt_completions, encode_texts, tokenize_rendered
from granite_train.data.rows import BadRow, PromptCompletion, RowFormat, row_chat, row_prompt_completion, row_text
from granite_train.data.stats import Status
from granite_train.data.tokenizer import Tokenizer
from granite_train.errors import UserError

IGNORE = -100
# Part of the map's cache key (datasets fingerprints the Encoder's fields, not this module's
# code): bump it when tokenization output changes, so no stale cached result is reused.
# 2: drops without labels carry their reason (Status.NO_ASSISTANT/NO_COMPLETION/NO_TARGET).
# 3: data.overlong=split keeps long documents whole (Status.SPLIT).
PREP_VERSION = 3

_List = getattr(datasets, "List", datasets.Sequence)  # datasets >= 4 renamed Sequence to List
FEATURES = datasets.Features({
    "input_ids": _List(datasets.Value("int32")),
    "labels": _List(datasets.Value("int32")),
    "length": datasets.Value("int32"),
    "n_trained": datasets.Value("int32"),
    "status": datasets.Value("int8"),
})


def overlong_policy(overlong: str, row_format: RowFormat, source: str) -> str:
    """data.overlong as applied to this source: auto is split for text, truncate otherwise."""
    if overlong == "auto":
        return "split" if row_format.kind == "text" else "truncate"
    if overlong == "split" and row_format.kind != "text":
        raise UserError(f"data.overlong=split cuts documents into pieces and needs data.format=text; {source} "
                        f"reads as {row_format.name}: use data.overlong=truncate or drop for it")
    return overlong


@dataclass(frozen=True)
class Encoded:
    status: Status
    input_ids: np.ndarray  # int32, empty when dropped
    labels: np.ndarray
    n_trained: int  # labels that count: not -100 and not the first token (the collator masks it)


@dataclass(frozen=True)
class Encoder:
    tokenizer: Tokenizer
    renderer: Optional[Renderer]
    row_format: RowFormat
    train_on: str
    max_length: int
    overlong: str
    skip_bad_rows: bool
    source: str
    version: int = PREP_VERSION

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Tokenizer, renderer: Optional[Renderer],
                    row_format: RowFormat, source: str) -> "Encoder":
        return cls(tokenizer, renderer, row_format, cfg.train_on, cfg.max_length,
                   overlong_policy(cfg.overlong, row_format, source), cfg.skip_bad_rows, source)

    def _bad(self, index: int, err: BadRow) -> None:
        if not self.skip_bad_rows:
            text = str(err)
            if "; set " not in text:  # the fix is named unless the message already names a setting
                text += ", or set data.skip_bad_rows=true" if "fix the row" in text \
                    else "; fix the row or set data.skip_bad_rows=true"
            raise UserError(f"row {index} of {self.source} {text}")

    def _finish(self, ids: np.ndarray, labels: np.ndarray) -> Encoded:
        status = Status.OK
        if len(ids) > self.max_length:
            if self.overlong == "split":  # kept whole: docs.split_documents cuts it into pieces
                return Encoded(Status.SPLIT, ids, labels, int(np.count_nonzero(labels[1:] != IGNORE)))
            if self.overlong == "drop":
                return _dropped(Status.OVERLONG)
            ids, labels, status = ids[: self.max_length], labels[: self.max_length], Status.TRUNCATED
        n_trained = int(np.count_nonzero(labels[1:] != IGNORE))
        if n_trained == 0:
            return _dropped(Status.NO_LABELS if status == Status.TRUNCATED else Status.NO_TARGET)
        return Encoded(status, ids, labels, n_trained)

    def _parse(self, row: Mapping[str, Any]) -> Any:
        """A row as text, PromptCompletion or Chat (raises BadRow)."""
        kind = self.row_format.kind
        if kind == "text":
            return row_text(row, self.row_format)
        if kind == "prompt_completion":
            return row_prompt_completion(row)
        return row_chat(row, self.row_format)

    def _no_target(self, item: Any) -> Optional[Status]:
        """Why a parsed row has nothing to learn under data.train_on=assistant (None: it has)."""
        if self.train_on != "assistant" or isinstance(item, str):
            return None
        if isinstance(item, PromptCompletion):
            return Status.NO_COMPLETION if item.completion == "" else None
        if item.trained is not None:  # conversational prompt-completion
            return None if any(item.trained) else Status.NO_COMPLETION
        if self.row_format.kind == "prompt_completion_chat":
            return Status.NO_COMPLETION if item.messages[-1]["content"] == "" else None
        return None if any(m["role"] == "assistant" for m in item.messages) else Status.NO_ASSISTANT

    def encode_rows(self, rows: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> List[Encoded]:
        """One Encoded per row; bad rows raise UserError unless data.skip_bad_rows."""
        parsed: List[Tuple[int, Any]] = []  # (position in batch, text, PromptCompletion or Chat)
        out: List[Encoded] = [_dropped(Status.BAD_ROW)] * len(rows)
        for pos, (row, index) in enumerate(zip(rows, indices)):
            try:
                item = self._parse(row)
            except BadRow as e:
                self._bad(index, e)
                continue
            why = self._no_target(item)
            if why is not None:
                out[pos] = _dropped(why)  # nothing to learn: skip tokenizing it
            else:
                parsed.append((pos, item))
        if self.row_format.kind == "text":
            encoded: List[Any] = encode_texts(self.tokenizer, [item for _, item in parsed])
        elif self.row_format.kind == "prompt_completion":
            encoded = encode_prompt_completions(self.tokenizer, [(it.prompt, it.completion) for _, it in parsed],
                                                self.train_on)
        else:
            rendered, ok = [], []
            for pos, item in parsed:  # render per row so that a template error names its row
                try:
                    rendered.append(self.renderer.render(item.messages, self.train_on == "assistant", item.trained))
                    ok.append(pos)
                except BadRow as e:
                    self._bad(indices[pos], e)
            pairs = dict(zip(ok, tokenize_rendered(self.tokenizer, rendered, self.train_on)))
            encoded = [pairs.get(pos) for pos, _ in parsed]
        for (pos, _), pair in zip(parsed, encoded):
            if pair is not None:
                out[pos] = self._finish(*pair)
        return out

    def __call__(self, batch: Dict[str, List[Any]], indices: List[int]) -> Dict[str, List[Any]]:
        """datasets.map(batched=True, with_indices=True) entry point."""
        names = list(batch)
        n = len(batch[names[0]]) if names else 0
        rows = [{k: batch[k][i] for k in names} for i in range(n)]
        results = self.encode_rows(rows, indices)
        return {
            "input_ids": [r.input_ids for r in results],
            "labels": [r.labels for r in results],
            "length": [len(r.input_ids) for r in results],
            "n_trained": [r.n_trained for r in results],
            "status": [int(r.status) for r in results],
        }


_EMPTY = np.zeros(0, dtype=np.int32)


def _dropped(status: Status) -> Encoded:
    return Encoded(status, _EMPTY, _EMPTY, 0)
