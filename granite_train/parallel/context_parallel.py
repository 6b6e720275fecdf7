"""Context parallelism: one packed row shared by a group of ranks, each holding a contiguous slice.

The model sees a `SequenceShard` (models/batch.py) in its layout and asks it for two collectives:
`gather` (attention keys/values, the Mamba conv halo, the per-slice SSD states) and `sum` (the
router statistics). This module is where they meet the process group, and where a row is cut
into slices (`shard_row`).

Gradients: `gather`'s backward sums each slice's gradient over the group (every rank's loss uses
the whole gathered tensor) and hands each rank its own slice; `sum`'s backward is the identity
(every rank computes the same value from it and back-propagates only through its own share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from granite_train.data.collator import model_inputs
from granite_train.errors import UserError
from granite_train.models.loss import IGNORE_INDEX, shift_labels
from granite_train.parallel.env import Env
from granite_train.parallel.plan import ContextPlan


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.rank, ctx.size = dim, group, rank, size
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        # The sum over ranks of every slice's gradient, then this rank's slice (gloo has no
        # reduce-scatter; the all-reduce moves `size` times the bytes, fine at these sizes).
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, dim=ctx.dim)[ctx.rank].contiguous(), None, None, None, None


class _SumReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


@dataclass(frozen=True)
class ContextShard:
    """A `SequenceShard` over a torch process group (ranks in row order)."""

    rank: int
    size: int
    slice_len: int
    bounds: List[int]
    real_tokens: int
    group: Any = None  # None: the default group

    @property
    def offset(self) -> int:
        return self.rank * self.slice_len

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return _Gather.apply(x, dim, self.group, self.rank, self.size)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return _SumReplicated.apply(x, self.group)


def shard_row(input_ids: torch.Tensor, labels: torch.Tensor, cu_seq_lens: torch.Tensor, rank: int,
              size: int, slice_len: int, group: Any = None) -> Tuple[Dict[str, torch.Tensor], ContextShard]:
    """This rank's slice of one packed row ([1, T], T <= size * slice_len).

    The row is padded with filler (token 0, untrained) to size * slice_len tokens. The slice's
    labels come back already shifted (`labels[t]` is the target of token t, the model does not
    shift them again), so the last token of a slice is trained on the next slice's first token.
    """
    T = input_ids.shape[1]
    total = size * slice_len
    if T > total:
        raise ValueError(f"a row of {T} tokens does not fit {size} slices of {slice_len}")
    bounds = [int(b) for b in cu_seq_lens.reshape(-1).tolist()]
    real = bounds[-1]
    if real < total:
        bounds.append(total)
    targets = shift_labels(labels)
    ids = F.pad(input_ids, (0, total - T), value=0)
    targets = F.pad(targets, (0, total - T), value=IGNORE_INDEX)
    lo, hi = rank * slice_len, (rank + 1) * slice_len
    local = {"input_ids": ids[:, lo:hi], "labels": targets[:, lo:hi]}
    return local, ContextShard(rank, size, slice_len, bounds, real, group)


def apply_context_parallel(size: int, env: Env, slice_len: int) -> Optional[ContextPlan]:
    """Groups of `size` consecutive ranks (a node's GPUs share a row: the K/V and state gathers
    stay on the fast links); every rank creates every group, in the same order."""
    if size == 1:
        return None
    if env.world_size % size:
        raise UserError(f"distributed.context_parallel_size={size} does not divide the {env.world_size} ranks; "
                        f"pick a size that divides the world size (e.g. the GPUs of a node)")
    mine = None
    for start in range(0, env.world_size, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= env.rank < start + size:
            mine = group
    return ContextPlan(size=size, rank=env.rank % size, group=mine, slice_len=slice_len,
                       data_rank=env.rank // size, data_world=env.world_size // size)


def forward_inputs(mb: Dict[str, Any], plan: Optional[ContextPlan]) -> Tuple[Dict[str, Any], torch.Tensor, int]:
    """(the model's keyword inputs, labels, trained tokens) of a collated micro-batch (host
    tensors). Under context parallelism: this rank's slice with its shard as `context`, labels
    that are targets already, and the trained tokens of the slice; else the micro-batch as is."""
    if plan is None:
        return model_inputs(mb), mb["labels"], int((mb["labels"] != IGNORE_INDEX).sum())
    local, shard = shard_row(mb["input_ids"], mb["labels"], mb["cu_seq_lens"], plan.rank, plan.size,
                             plan.slice_len, plan.group)
    return {"input_ids": local["input_ids"], "context": shard}, local["labels"], int((local["labels"] != IGNORE_INDEX).sum())
