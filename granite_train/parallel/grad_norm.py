"""The global gradient norm and clipping, with each expert counted once under expert parallelism."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from granite_train.parallel.plan import ExpertParallelPlan


def _sum_sq(params: Sequence[nn.Parameter], device: torch.device) -> torch.Tensor:
    if not params:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) for p in params]).square().sum()


def clip_by_global_norm(params: Sequence[nn.Parameter], max_norm: float,
                        expert: Optional[ExpertParallelPlan] = None) -> float:
    """The global L2 norm of the gradients, accumulated in fp64, then clipped like
    `clip_grad_norm_` (scale max_norm / (norm + 1e-6) when below 1; max_norm <= 0: no clipping).
    fp64 because torch's fp32 norm of a multi-million-element CPU gradient drifts by ~1e-4
    relative, and DeepSpeed's ZeRO 1-3 norms are fp64: the same run then reports the same norm
    with or without ZeRO.

    `expert` (expert parallelism): each rank of the expert-parallel group holds other experts,
    so the experts' squared norms are summed over the group (each expert counted once, every
    rank clipping by the same norm) while the weights every rank holds count once."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    device = with_grad[0].grad.device
    if expert is None:
        total_sq = _sum_sq(with_grad, device)
    else:
        expert_sq = _sum_sq([p for p in with_grad if expert.holds(p)], device)
        dist.all_reduce(expert_sq, group=expert.group)
        total_sq = _sum_sq([p for p in with_grad if not expert.holds(p)], device) + expert_sq
    norm = float(total_sq.sqrt())
    coef = (max_norm if max_norm > 0 else float("inf")) / (norm + 1e-6)
    if coef < 1.0:  # also false for a non-finite norm: that step is skipped, not scaled
        for p in with_grad:
            p.grad.detach().mul_(coef)
    return norm
