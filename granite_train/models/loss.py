"""Next-token cross-entropy for packed rows, plain and chunked.

Labels are aligned with inputs: position t predicts labels[t + 1]. In packed rows the collator
masks each example's first label, so no token learns to predict the next example. The loss is
the mean over trained tokens (labels != -100); no trained token gives 0, not NaN, so gradient
accumulation stays finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_labels(labels_BT: torch.Tensor) -> torch.Tensor:
    # Shift the labels, not the logits: slicing [B, T, V] would copy it and zero-fill its grad.
    return F.pad(labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits are upcast for the softmax; fp64 (tests) stays fp64.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _targets(labels_BT: torch.Tensor, shifted: bool, device: torch.device) -> torch.Tensor:
    """[B*T] next-token targets; `shifted`: the labels are targets already (a context-parallel
    slice, whose last token's target is the next slice's first label)."""
    return (labels_BT if shifted else shift_labels(labels_BT)).to(device).reshape(-1)


def causal_lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over trained tokens, in fp32, from materialised logits."""
    V = logits_BTV.shape[-1]
    labels_N = _targets(labels_BT, shifted, logits_BTV.device)
    loss_sum = F.cross_entropy(_upcast(logits_BTV.reshape(-1, V)), labels_N,
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum / (labels_N != IGNORE_INDEX).sum().clamp_min(1)


def _chunk_loss_sum(h_NC: torch.Tensor, weight_VC: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    logits_NV = _upcast(F.linear(h_NC, weight_VC))
    return F.cross_entropy(logits_NV, labels_N, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(h_BTC: torch.Tensor, weight_VC: torch.Tensor, labels_BT: torch.Tensor,
                           chunk_tokens: int = 1024, shifted: bool = False) -> torch.Tensor:
    """The same loss as `causal_lm_loss(h @ W.T, labels)` without the [T, V] logits.

    Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory
    holds one [chunk, V] block instead of [T, V] in fp32 (T=4096, V=50k: 820 MB -> 200 MB),
    and the vocabulary-sized passes stay in cache-friendly pieces.
    """
    C = h_BTC.shape[-1]
    h_NC = h_BTC.reshape(-1, C)
    labels_N = _targets(labels_BT, shifted, h_BTC.device)
    total = h_NC.new_zeros((), dtype=torch.promote_types(h_NC.dtype, torch.float32))
    for start in range(0, h_NC.shape[0], chunk_tokens):
        end = start + chunk_tokens
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h_NC[start:end], weight_VC,
                                       labels_N[start:end], use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h_NC[start:end], weight_VC, labels_N[start:end])
    return total / (labels_N != IGNORE_INDEX).sum().clamp_min(1)


def trained_positions_loss(h_BTC: torch.Tensor, weight_VC: torch.Tensor, labels_BT: torch.Tensor,
                           chunk_tokens: int = 0, shifted: bool = False) -> torch.Tensor:
    """The same loss as `causal_lm_loss(h @ W.T, labels)`, computing logits only at the positions
    that have a trained next token. In SFT most tokens (prompts, system turns) have none, and the
    lm_head plus its softmax dominate small models: this skips their share of that work.
    `chunk_tokens > 0` also bounds the [rows, V] logits (see `chunked_causal_lm_loss`)."""
    C = h_BTC.shape[-1]
    labels_N = _targets(labels_BT, shifted, h_BTC.device)
    rows_K = (labels_N != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync (the row count)
    h_KC = h_BTC.reshape(-1, C).index_select(0, rows_K)
    labels_K = labels_N.index_select(0, rows_K)
    if chunk_tokens > 0:
        # labels are already aligned with h_KC: pad one ignored column so shift_labels lines up.
        padded_1K = F.pad(labels_K, (1, 0), value=IGNORE_INDEX).unsqueeze(0)
        h_1KC = F.pad(h_KC, (0, 0, 0, 1)).unsqueeze(0)
        return chunked_causal_lm_loss(h_1KC, weight_VC, padded_1K, chunk_tokens)
    loss_sum = F.cross_entropy(_upcast(F.linear(h_KC, weight_VC)), labels_K, reduction="sum")
    return loss_sum / max(int(rows_K.numel()), 1)
