"""Optimizer construction."""

from __future__ import annotations

from typing import List

import torch

from granite_train.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    # Norm gains, biases and other vectors are not decayed (decaying them only shrinks scales).
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
