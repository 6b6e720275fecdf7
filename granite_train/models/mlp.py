"""Dense SwiGLU MLP: `down(silu(gate(x)) * up(x))`, the `mlp` of dense Granite layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from granite_train.models.config import GraniteConfig
from granite_train.models.param_roles import HIDDEN, mark_linear


class SwiGLU(nn.Module):
    def __init__(self, cfg: GraniteConfig) -> None:
        super().__init__()
        # Separate gate/up projections (not one fused matrix) so the parameter names and
        # shapes are transformers' on-disk ones.
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            mark_linear(proj, HIDDEN)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTC)) * self.up_proj(x_BTC))
