"""Expert parallelism: each MoE layer's experts split over the ranks of an expert-parallel group.

A rank keeps experts [rank * n_local, (rank + 1) * n_local) of every MoE layer. The router runs
on the rank's own tokens as before (data parallel); the (token, slot) rows, sorted by global
expert, travel to the rank that owns their expert with one all-to-all (uneven splits), run
there, and come back with a second all-to-all. Both are autograd all-to-alls: the backward sends
each row's gradient back the same way, so an expert's weight gradient is the sum over every
token routed to it from any rank of the group. The expert-data-parallel reduction (ranks that hold
the same experts) is the engine's job (granite_train/train/engine.py).

Every rank of the group must run the same number of MoE forwards (and backwards): the trainer
and evaluation run a dummy micro-batch where a rank has none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """This rank's place in its expert-parallel group."""

    group: Any  # torch.distributed process group of the `size` ranks that split the experts
    rank: int  # rank within `group`
    size: int
    group_name: str = ""  # DeepSpeed's name for the group ("ep_size_<size>")

    def local_range(self, num_experts: int) -> range:
        n_local = num_experts // self.size
        return range(self.rank * n_local, (self.rank + 1) * n_local)


ExpertFn = Callable[[torch.Tensor, torch.Tensor, Optional[List[int]]], torch.Tensor]


def _block_sums(values: List[int], block: int) -> List[int]:
    return [sum(values[i:i + block]) for i in range(0, len(values), block)]


def _all_to_all(x: torch.Tensor, output_sizes: List[int], input_sizes: List[int], group: Any) -> torch.Tensor:
    """Rows of `x` (input_sizes per destination rank) exchanged; differentiable (the backward
    is the reverse exchange)."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), output_sizes, input_sizes, group)
    return funcol.wait_tensor(out)


def run_experts_parallel(x_MC: torch.Tensor, counts_E: torch.Tensor, shard: ExpertShard,
                         expert_fn: ExpertFn, host_sizes: bool) -> torch.Tensor:
    """Expert outputs for the rows of `x_MC` (sorted by global expert, `counts_E` [E] rows
    each), computed on the ranks that own the experts; returned in `x_MC`'s row order.

    `expert_fn(x_rows, counts_local, sizes)` runs this rank's n_local experts on rows sorted by
    local expert (`sizes`: the counts as a host list, or None when `host_sizes` is False).
    """
    E, R = counts_E.numel(), shard.size
    n_local = E // R
    # How many rows each source rank sends to each of my local experts: [R * n_local], source-major.
    recv_counts = torch.empty_like(counts_E)
    dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=shard.group)
    send_E, recv_RL = torch.stack([counts_E, recv_counts]).tolist()  # the one host sync
    send_sizes, recv_sizes = _block_sums(send_E, n_local), _block_sums(recv_RL, n_local)

    x_recv = _all_to_all(x_MC, recv_sizes, send_sizes, shard.group)
    # Received rows are grouped by source rank, then by local expert: regroup by local expert.
    with torch.no_grad():
        local_id = torch.arange(n_local, device=x_MC.device).repeat(R).repeat_interleave(recv_counts)
        order = torch.argsort(local_id, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts_local = recv_counts.view(R, n_local).sum(dim=0)
    sizes = [sum(recv_RL[l::n_local]) for l in range(n_local)] if host_sizes else None
    y_sorted = expert_fn(x_recv[order], counts_local, sizes)
    y_recv = y_sorted[inverse].contiguous()
    return _all_to_all(y_recv, send_sizes, recv_sizes, shard.group)
