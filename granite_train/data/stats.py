"""What preparation did to the data, counted, and said in one paragraph."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Dict, List, Optional, Sequence

import numpy as np


class Status(IntEnum):
    """Outcome of one raw row (stored per row by the tokenizing map)."""

    OK = 0
    TRUNCATED = 1
    BAD_ROW = 2
    OVERLONG = 3  # dropped: longer than max_length with data.overlong=drop
    # Dropped without labels (nothing to train on), by reason:
    NO_LABELS = 4  # truncation at data.max_length cut every trained token
    NO_ASSISTANT = 5  # a conversation without an assistant turn
    NO_COMPLETION = 6  # an empty completion
    NO_TARGET = 7  # no trained token even untruncated (e.g. an empty document)
    SPLIT = 8  # kept whole, longer than max_length: trained as pieces (data.overlong=split)

    @staticmethod
    def kept(status: np.ndarray) -> np.ndarray:
        status = np.asarray(status)
        return (status <= Status.TRUNCATED) | (status == Status.SPLIT)


# Why rows were dropped without labels, as the report says it.
NO_LABEL_REASONS = {Status.NO_ASSISTANT: "no assistant turn", Status.NO_COMPLETION: "no completion",
                    Status.NO_LABELS: "nothing left after truncation", Status.NO_TARGET: "nothing to train on"}


@dataclass
class PrepStats:
    source: str = ""
    format: str = ""  # the row format used (detected with data.format=auto), as the report names it
    rows_read: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    split: int = 0  # documents longer than max_length, trained as `pieces` pieces (data.overlong=split)
    pieces: int = 0
    dropped_overlong: int = 0
    dropped_no_labels: int = 0  # all reasons; by reason (NO_LABEL_REASONS' words) in no_labels
    no_labels: Dict[str, int] = field(default_factory=dict)
    bad_rows: int = 0  # rows with missing/invalid fields, skipped by data.skip_bad_rows
    malformed_lines: int = 0  # JSON lines that did not parse, skipped by data.skip_bad_rows
    length_percentiles: Dict[str, int] = field(default_factory=dict)
    steps_per_epoch: Optional[int] = None
    packing_efficiency: Optional[float] = None  # real tokens / slots over epoch 0's plan
    seconds: float = 0.0

    # The counters `counts()` lists (with the no-label reasons after them): what ranks that each
    # read their own share of a stream sum into one report.
    COUNTERS = ("rows_read", "examples", "tokens", "trained_tokens", "truncated", "split", "pieces",
                "dropped_overlong", "dropped_no_labels", "bad_rows", "malformed_lines")

    def counts(self) -> List[int]:
        return [int(getattr(self, k)) for k in self.COUNTERS] + \
            [int(self.no_labels.get(r, 0)) for r in NO_LABEL_REASONS.values()]

    def add_counts(self, counts: Sequence[int]) -> None:
        """Add another `counts()` (another rank's or source's)."""
        n = len(self.COUNTERS)
        for k, v in zip(self.COUNTERS, counts[:n]):
            setattr(self, k, getattr(self, k) + int(v))
        for r, v in zip(NO_LABEL_REASONS.values(), counts[n:]):
            if v:
                self.no_labels[r] = self.no_labels.get(r, 0) + int(v)

    def count(self, status: np.ndarray, lengths: np.ndarray, n_trained: np.ndarray) -> None:
        """Add one batch of per-row outcomes (lengths/n_trained of every row, 0 where dropped)."""
        status = np.asarray(status)
        kept = Status.kept(status)
        self.rows_read += int(status.size)
        self.examples += int(kept.sum())
        self.tokens += int(np.asarray(lengths)[kept].sum())
        self.trained_tokens += int(np.asarray(n_trained)[kept].sum())
        self.truncated += int((status == Status.TRUNCATED).sum())
        self.split += int((status == Status.SPLIT).sum())
        self.bad_rows += int((status == Status.BAD_ROW).sum())
        self.dropped_overlong += int((status == Status.OVERLONG).sum())
        for code, reason in NO_LABEL_REASONS.items():
            n = int((status == code).sum())
            if n:
                self.no_labels[reason] = self.no_labels.get(reason, 0) + n
                self.dropped_no_labels += n

    def _no_labels_text(self) -> str:
        """"3 without labels (no assistant turn)", or "(2 no completion, 1 nothing left after
        truncation)" when there are several reasons."""
        text = f"{self.dropped_no_labels} without labels"
        reasons = [(r, n) for r, n in self.no_labels.items() if n]
        if len(reasons) == 1:
            return f"{text} ({reasons[0][0]})"
        if reasons:
            return f"{text} ({', '.join(f'{n} {r}' for r, n in reasons)})"
        return text

    def set_lengths(self, lengths: np.ndarray) -> None:
        if len(lengths):
            p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
            self.length_percentiles = {"p50": int(p50), "p90": int(p90), "p99": int(p99),
                                       "max": int(np.max(lengths))}

    def report(self) -> str:
        fmt = f" (format {self.format})" if self.format else ""
        parts = [f"data {self.source}{fmt}: {self.rows_read} rows read -> {self.examples} examples, "
                 f"{self.tokens} tokens ({self.trained_tokens} trained)"]
        if self.split:
            parts.append(f"split {self.split} documents longer than max_length into {self.pieces} pieces "
                         f"(no token lost)")
        parts.append(f"truncated {self.truncated}; dropped {self.dropped_overlong} over-long, "
                     f"{self._no_labels_text()}, {self.bad_rows} bad rows, "
                     f"{self.malformed_lines} malformed lines")
        if self.length_percentiles:
            p = self.length_percentiles
            parts.append(f"length p50/p90/p99/max {p['p50']}/{p['p90']}/{p['p99']}/{p['max']}")
        if self.steps_per_epoch is not None:
            parts.append(f"{self.steps_per_epoch} steps per epoch")
        if self.packing_efficiency is not None:
            parts.append(f"packing efficiency {self.packing_efficiency:.4f}")
        if self.seconds:
            parts.append(f"prepared in {self.seconds:.1f}s")
        return "; ".join(parts) + "."
