"""What the trainer hands the model from a collated micro-batch, and how it gets to the device."""

from __future__ import annotations

from typing import Any, Dict

import torch

# The collator's keys the model's forward takes (labels go separately).
MODEL_INPUTS = ("input_ids", "position_ids", "seq_idx", "cu_seq_lens", "max_seq_len")


def to_device(mb: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in mb.items()}


def dummy_micro_batch(device: torch.device) -> Dict[str, Any]:
    """Two tokens, for a forward that every rank must run in lockstep (ZeRO-3 gathers, expert
    parallelism's all-to-alls) when this rank has no micro-batch of its own."""
    from granite_train.data.collator import collate_packed

    return to_device(collate_packed([{"input_ids": [0, 0]}]), device)
