"""RMSNorm, computed in fp32 like transformers' GraniteRMSNorm (bit-compatible outputs)."""

from __future__ import annotations

import torch
from torch import nn

from granite_train.models.param_roles import NORM, mark


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        mark(self, "weight", NORM)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        # fp32 statistics even under bf16: the mean of squares overflows/loses bits otherwise.
        in_dtype = x_BTC.dtype
        x32_BTC = x_BTC.float()
        x32_BTC = x32_BTC * torch.rsqrt(x32_BTC.pow(2).mean(-1, keepdim=True) + self.eps)
        # Same order as transformers: cast back first, then scale by the (model-dtype) weight.
        return self.weight * x32_BTC.to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
