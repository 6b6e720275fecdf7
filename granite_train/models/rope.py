"""Rotary position embedding (default RoPE, rotate-half layout as in transformers' Granite).

Frequencies are recomputed each forward in fp32 on the input's device instead of living in a
buffer: a buffer would be cast to bf16 by `model.to(bfloat16)` and lose position precision,
and there is nothing to load or save. The cost is a few hundred flops per forward.
"""

from __future__ import annotations

from typing import Tuple

import torch


def rope_cos_sin(position_ids_BT: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin), each [B, T, head_dim], for integer positions."""
    exponent_D2 = torch.arange(0, head_dim, 2, device=position_ids_BT.device, dtype=torch.int64).float() / head_dim
    inv_freq_D2 = 1.0 / (theta ** exponent_D2)
    freqs_BTD2 = position_ids_BT[..., None].float() * inv_freq_D2
    emb_BTD = torch.cat((freqs_BTD2, freqs_BTD2), dim=-1)
    return emb_BTD.cos(), emb_BTD.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BTHD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Rotate q or k ([B, T, heads, head_dim]); computed in fp32, returned in x's dtype."""
    cos_BT1D, sin_BT1D = cos_BTD.unsqueeze(2), sin_BTD.unsqueeze(2)
    x32 = x_BTHD.float()
    return (x32 * cos_BT1D + _rotate_half(x32) * sin_BT1D).to(x_BTHD.dtype)
