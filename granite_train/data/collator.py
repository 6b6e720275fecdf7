"""Micro-batch tensors from examples.

Packed: one flattened row, the same tensors as transformers'
`DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True)` (names mapped:
cu_seq_lens_q -> cu_seq_lens, max_length_q -> max_seq_len). Labels are NOT shifted (the model
shifts); the first token of every example gets -100 so no example learns to predict across a
boundary. Boundaries are explicit tensors, never inferred from token values.

Padded (`data.packing=none`): [B, L] right-padded with the pad id, `attention_mask`, and
seq_idx/cu_seq_lens/max_seq_len set to None.

Empty micro-batch: a rank with fewer micro-batches than the others in a step gets empty ones
(`input_ids` of shape [1, 0] packed, [0, 0] padded) so every rank runs the same count; see
`is_empty`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

IGNORE = -100
Example = Mapping[str, Any]  # {"input_ids": 1-D ints, "labels": 1-D ints (optional)}
MicroBatch = Dict[str, Any]


def _arrays(examples: Sequence[Example]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    ids = [np.asarray(e["input_ids"], dtype=np.int64).reshape(-1) for e in examples]
    labels = [np.asarray(e["labels"] if e.get("labels") is not None else e["input_ids"],
                         dtype=np.int64).reshape(-1) for e in examples]
    return ids, labels


def collate_packed(examples: Sequence[Example]) -> MicroBatch:
    ids, labels = _arrays(examples)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    return collate_flat(flat_ids, np.concatenate(labels) if labels else np.zeros(0, np.int64), lengths)


def collate_flat(input_ids: np.ndarray, labels: Optional[np.ndarray], lengths: np.ndarray) -> MicroBatch:
    """`collate_packed` of examples given already flattened: int64 `input_ids` and `labels`
    (None: the ids themselves) of the examples one after another, `lengths` each. Takes
    ownership of the arrays (labels are written in place)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    cu = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    total = int(cu[-1])
    flat_labels = input_ids.copy() if labels is None else labels
    starts = cu[:-1][lengths > 0]
    flat_labels[starts] = IGNORE
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1], lengths)
    seq_idx = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return {
        "input_ids": torch.from_numpy(input_ids).view(1, total),
        "labels": torch.from_numpy(flat_labels).view(1, total),
        "position_ids": torch.from_numpy(positions).view(1, total),
        "seq_idx": torch.from_numpy(seq_idx).view(1, total),
        "cu_seq_lens": torch.from_numpy(cu.astype(np.int32)),
        "max_seq_len": int(lengths.max()) if len(lengths) else 0,
    }


def collate_padded(examples: Sequence[Example], pad_id: int) -> MicroBatch:
    ids, labels = _arrays(examples)
    width = max((len(x) for x in ids), default=0)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    out_labels = np.full((len(ids), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, (x, y) in enumerate(zip(ids, labels)):
        input_ids[row, : len(x)] = x
        out_labels[row, 1: len(x)] = y[1:]
        mask[row, : len(x)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(out_labels),
        "position_ids": torch.arange(width, dtype=torch.int64).expand(len(ids), width).contiguous(),
        "attention_mask": torch.from_numpy(mask),
        "seq_idx": None,
        "cu_seq_lens": None,
        "max_seq_len": None,
    }


def empty_micro_batch(padded: bool) -> MicroBatch:
    return collate_padded([], pad_id=0) if padded else collate_packed([])


def is_empty(micro_batch: MicroBatch | None) -> bool:
    return micro_batch is None or micro_batch["input_ids"].numel() == 0


# The collator's keys the model's forward takes (labels go separately).
MODEL_INPUTS = ("input_ids", "position_ids", "seq_idx", "cu_seq_lens", "max_seq_len")


def model_inputs(mb: MicroBatch) -> Dict[str, Any]:
    """What the model's forward takes from a collated micro-batch (absent keys as None)."""
    return {k: mb.get(k) for k in MODEL_INPUTS}


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}


def dummy_micro_batch(device: torch.device) -> MicroBatch:
    """Two tokens, for a forward that every rank must run in lockstep (ZeRO-3 gathers, expert
    parallelism's all-to-alls) when this rank has no micro-batch of its own."""
    return to_device(collate_packed([{"input_ids": [0, 0]}]), device)
