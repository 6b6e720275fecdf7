"""Examples as pieces of documents, read from a document store.

An example is a (document, start, length) piece. A document no longer than data.max_length is
one piece; with data.overlong=split a longer one becomes pieces of max_length tokens that overlap
by ONE token (stride max_length - 1): the collator never trains an example's first token, so the
overlap makes every token of the document but its very first a target exactly once, as in the
unsplit document, and no token is lost.

Stores hold whole documents: `ArrowDocs` (rows tokenized by `datasets.map`) and
`prepared.ShardDocs` (memory-mapped token shards). The plan sees only the piece lengths; a rank
reads only the pieces of its own micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import datasets
import numpy as np

from granite_train.errors import UserError

Example = Dict[str, Any]  # {"input_ids": 1-D ints, "labels": 1-D ints or None (= input_ids)}


@dataclass
class Pieces:
    """The examples of one source: piece i is tokens [start[i], start[i] + lengths[i]) of document doc[i]."""

    doc: np.ndarray  # int64
    start: np.ndarray  # int64
    lengths: np.ndarray  # int64
    n_trained: np.ndarray  # int64: targets of the piece (its first token is never one)
    split_docs: int = 0  # documents cut into more than one piece
    split_pieces: int = 0  # the pieces they became

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def whole_documents(lengths: np.ndarray, n_trained: np.ndarray) -> Pieces:
    lengths = np.asarray(lengths, dtype=np.int64)
    return Pieces(np.arange(lengths.size, dtype=np.int64), np.zeros(lengths.size, dtype=np.int64), lengths,
                  np.asarray(n_trained, dtype=np.int64))


def split_documents(lengths: np.ndarray, n_trained: np.ndarray, max_length: int) -> Pieces:
    """Documents longer than max_length as pieces of max_length tokens overlapping by one token
    (the last piece shorter, at least 2 tokens); every token is trained (data.format=text). The
    rest stay whole."""
    if max_length < 2:
        raise UserError(f"data.overlong=split needs data.max_length >= 2 (got {max_length}); raise it")
    lengths = np.asarray(lengths, dtype=np.int64)
    n_trained = np.asarray(n_trained, dtype=np.int64)
    stride = max_length - 1
    long = lengths > max_length
    counts = np.where(long, -(-(lengths - 1) // stride), 1)
    doc = np.repeat(np.arange(lengths.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    k = np.arange(doc.size, dtype=np.int64) - np.repeat(first, counts)
    start = k * stride
    piece_lengths = np.minimum(max_length, lengths[doc] - start)
    piece_trained = np.where(long[doc], piece_lengths - 1, n_trained[doc])
    return Pieces(doc, start, piece_lengths, piece_trained, int(long.sum()), int(counts[long].sum()))


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated ranges [starts[i], starts[i] + lengths[i]), in one vectorized pass."""
    lengths = np.asarray(lengths, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


# A micro-batch's examples flattened: int64 input ids, labels (None: the ids), each one's length.
Flat = Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]


class DocStore(Protocol):
    def read(self, docs: Sequence[int], starts: Sequence[int], lengths: Sequence[int]) -> List[Example]:
        """The pieces' tokens and labels (labels None: every token is its own label)."""


class ArrowDocs:
    """Documents tokenized by `datasets.map` (input_ids/labels columns), one row each."""

    def __init__(self, tokenized: datasets.Dataset) -> None:
        self._rows = tokenized.select_columns(["input_ids", "labels"]).with_format("numpy")

    def read(self, docs: Sequence[int], starts: Sequence[int], lengths: Sequence[int]) -> List[Example]:
        unique = sorted(set(int(d) for d in docs))
        batch = self._rows[unique]
        rows = {d: (x, y) for d, x, y in zip(unique, batch["input_ids"], batch["labels"])}
        out = []
        for d, s, n in zip(docs, starts, lengths):
            x, y = rows[int(d)]
            out.append({"input_ids": x[s: s + n], "labels": y[s: s + n]})
        return out


class Examples:
    """Pieces and the store they are read from: what the planner sees (lengths, n_trained) and
    what a rank fetches for its micro-batches."""

    def __init__(self, pieces: Pieces, store: DocStore) -> None:
        self.pieces = pieces
        self.store = store

    @property
    def lengths(self) -> np.ndarray:
        return self.pieces.lengths

    @property
    def n_trained(self) -> np.ndarray:
        return self.pieces.n_trained

    def __len__(self) -> int:
        return len(self.pieces)

    def fetch(self, ids: Sequence[int]) -> Dict[int, Example]:
        ids = [int(i) for i in ids]
        p = self.pieces
        got = self.store.read(p.doc[ids].tolist(), p.start[ids].tolist(), p.lengths[ids].tolist())
        return dict(zip(ids, got))

    @property
    def reads_flat(self) -> bool:
        """Whether the store gathers pieces without a loop over them (then `fetch_flat` is the fast path)."""
        return hasattr(self.store, "read_flat")

    def fetch_flat(self, ids: Sequence[int]) -> Flat:
        """The examples `ids`, in that order, flattened (what `collate_flat` takes), in one
        vectorized gather; only for stores that can (`reads_flat`: memory-mapped shards)."""
        ids = np.asarray(ids, dtype=np.int64)
        p = self.pieces
        lengths = p.lengths[ids]
        tokens, labels = self.store.read_flat(p.doc[ids], p.start[ids], lengths)
        return tokens, labels, lengths


def pieces_for(lengths: np.ndarray, n_trained: np.ndarray, overlong: str, max_length: int) -> Pieces:
    """The examples of documents prepared under `overlong` (split: cut here; truncate/drop: the
    documents already fit)."""
    if overlong == "split":
        return split_documents(lengths, n_trained, max_length)
    return whole_documents(lengths, n_trained)
