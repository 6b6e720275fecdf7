"""One optimizer step: the unit the trainer, `coord_check` and the benchmarks run.

Loss normalisation is token-exact: every micro-batch contributes (sum of its token losses) /
(trained tokens in the whole optimizer step, all micro-batches and ranks). The data plan knows
that global count up front, so no extra collective is needed and neither the micro-batch size
nor the number of ranks changes the gradient. The router aux loss is a per-token mean too: each
micro-batch's is weighted by its share of the step's real tokens.

A step whose loss or gradient norm is not finite is not applied, on every rank alike (the
engine's `step` sees the all-reduced loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from granite_train.data.collator import MicroBatch, is_empty, to_device
from granite_train.parallel.context_parallel import forward_inputs
from granite_train.parallel.engine import Engine
from granite_train.parallel.env import Env
from granite_train.parallel.expert_parallel import moe_layers
from granite_train.parallel.plan import ContextPlan


@dataclass(frozen=True)
class StepSettings:
    """What a step needs besides the engine and the data."""

    device: torch.device
    autocast_dtype: Optional[torch.dtype] = None  # None: fp32
    distributed: bool = False  # all-reduce the loss sums over the data-parallel ranks
    aux_coef: float = 0.0  # the model's router_aux_loss_coef (MoE)
    loss_chunk_tokens: int = 0
    expert_shape: Optional[Tuple[int, int]] = None  # (MoE layers, experts) for the load metrics
    context: Optional[ContextPlan] = None  # context parallelism: each micro-batch row is sliced

    @classmethod
    def of(cls, model: nn.Module, env: Env, loss_chunk_tokens: int = 0,
           context: Optional[ContextPlan] = None) -> "StepSettings":
        n_moe = len(moe_layers(model))
        return cls(env.device, env.autocast_dtype, env.distributed,
                   float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0), loss_chunk_tokens,
                   (n_moe, model.config.num_local_experts) if n_moe else None, context)


@dataclass
class StepOutcome:
    loss: float  # token-exact LM loss of the step (all ranks)
    grad_norm: float
    aux_loss: Optional[float]  # router loss (MoE), weighted like the objective
    expert_counts: Optional[torch.Tensor]  # [layers, experts] top-k assignments (all ranks)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


@dataclass
class StepSums:
    """This rank's share of a step, before any reduction (fp64 sums on the device)."""

    loss_sum: torch.Tensor  # sum of token losses
    aux_sum: torch.Tensor  # router loss weighted by real-token share
    saw_aux: bool
    expert_counts: Optional[torch.Tensor]


def real_tokens(mb: MicroBatch) -> int:
    mask = mb.get("attention_mask")
    return int(mask.sum()) if mask is not None else mb["input_ids"].numel()


def set_lr(engine: Engine, lr: float) -> None:
    """The schedule's lr on every param group, times its muP scale."""
    for group in engine.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def forward_backward(engine: Engine, step: Any, s: StepSettings) -> StepSums:
    """Forward and backward over this rank's micro-batches of `step` (a `TrainStep`: its
    `micro_batches`, global `num_trained_tokens` and `num_input_tokens`); the gradients
    accumulate, nothing is reduced or applied."""
    n_global = step.num_trained_tokens
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    aux_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    # [layers, experts] top-k assignments over the whole step; zeros, not None, on a rank whose
    # micro-batches are all empty: every rank must run the same collectives after this.
    expert_counts = torch.zeros(s.expert_shape, device=s.device) if s.expert_shape else None
    saw_aux = False
    # Counted on the host copies, before the transfer: no device sync per micro-batch. Under
    # context parallelism the row decides (every rank of the group sees the same row).
    trained = [0 if is_empty(mb) or n_global == 0 else int((mb["labels"] != -100).sum())
               for mb in step.micro_batches]
    last = max((i for i, n in enumerate(trained) if n), default=-1)  # the engine may reduce during it
    for i, (mb, n_mb) in enumerate(zip(step.micro_batches, trained)):
        if n_mb == 0:
            engine.backward_nothing()  # every rank runs as many backwards
            continue
        real_mb = real_tokens(mb)
        inputs, labels, n_mb = forward_inputs(mb, s.context)  # under context parallelism: the slice's
        inputs, labels = to_device(inputs, s.device), labels.to(s.device, non_blocking=True)
        with torch.autocast(s.device.type, dtype=s.autocast_dtype, enabled=s.autocast_dtype is not None):
            output = engine.forward(**inputs, labels=labels, loss_chunk_tokens=s.loss_chunk_tokens,
                                    return_logits=False)
        objective = output.loss * (n_mb / n_global)
        if output.aux_loss is not None:
            # The row's share of the step's tokens. Under context parallelism every rank of the
            # group holds the whole row's aux loss and back-propagates it through its own slice
            # (the sum of those is its gradient): the full share in the objective, the metric
            # split over the group.
            share = real_mb / step.num_input_tokens
            objective = objective + s.aux_coef * output.aux_loss * share
            aux_sum += output.aux_loss.detach().double() * share / (s.context.size if s.context else 1)
            saw_aux = True
        engine.backward(objective, last=i == last)
        if output.expert_counts is not None:
            expert_counts = output.expert_counts if expert_counts is None else expert_counts + output.expert_counts
        loss_sum += output.loss.detach().double() * n_mb
    engine.backwards_done()  # before the sums' collectives: every rank issues its gradient buckets first
    return StepSums(loss_sum, aux_sum, saw_aux, expert_counts)


def train_step(engine: Engine, step: Any, s: StepSettings) -> StepOutcome:
    """One optimizer step: `forward_backward`, the loss sums reduced over ranks, then the
    engine's gradient reduction, clipping and update (not applied when the loss or the gradient
    norm is not finite). The caller sets the lr first (`set_lr`)."""
    sums = forward_backward(engine, step, s)
    if s.distributed:
        dist.all_reduce(sums.loss_sum)
        dist.all_reduce(sums.aux_sum)
        if sums.expert_counts is not None:
            dist.all_reduce(sums.expert_counts)
    loss = float(sums.loss_sum) / max(step.num_trained_tokens, 1)
    # Every rank sees the same reduced values, so all skip together.
    grad_norm, _ = engine.step(math.isfinite(loss))
    if s.device.type == "cuda":
        torch.cuda.synchronize()  # the step's time is the device's
    return StepOutcome(loss, grad_norm, float(sums.aux_sum) if sums.saw_aux else None, sums.expert_counts)
