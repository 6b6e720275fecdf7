"""Expert parallelism (`distributed.expert_parallel_size=E`): each MoE layer's experts split
over the E ranks of an expert-parallel group.

A rank keeps experts [r * n, (r + 1) * n) of every MoE layer (n = experts / E). The router runs
on the rank's own tokens as before (data parallel); the (token, slot) rows, sorted by expert,
travel to the rank that holds their expert with one all-to-all (uneven splits), run there, and
come back with a second all-to-all (`AllToAllDispatch`, the layer's dispatcher). Both are
autograd all-to-alls: the backward sends each row's gradient back the same way, so an expert's
weight gradient is the sum over every token routed to it from any rank of the group. The
expert-data-parallel reduction (ranks that hold the same experts) is DeepSpeed's
(`parallel/deepspeed_engine.py`).

Every rank of the group must run the same number of MoE forwards (and backwards): the trainer
and evaluation run a dummy micro-batch where a rank has none (`ParallelPlan.lockstep_forwards`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from granite_train.compat import ExpertGroups
from granite_train.errors import UserError
from granite_train.models.moe import MoE, ExpertFn
from granite_train.parallel.env import Env
from granite_train.parallel.plan import ExpertParallelPlan

log = logging.getLogger("granite_train.parallel")


def moe_layers(model: nn.Module) -> List[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _block_sums(values: List[int], block: int) -> List[int]:
    return [sum(values[i:i + block]) for i in range(0, len(values), block)]


class _AllToAll(torch.autograd.Function):
    """`dist.all_to_all_single` with a backward: the reverse exchange of the gradient rows.
    (torch's own autograd versions are deprecated (`torch.distributed.nn`) or private
    (`_functional_collectives`); the public collective and an autograd.Function are all it takes.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_sizes: List[int], input_sizes: List[int], group: Any) -> torch.Tensor:
        ctx.sizes, ctx.group = (output_sizes, input_sizes), group
        out = x.new_empty((sum(output_sizes), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_sizes, input_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        output_sizes, input_sizes = ctx.sizes
        grad_in = grad_out.new_empty((sum(input_sizes), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_sizes, output_sizes, group=ctx.group)
        return grad_in, None, None, None


def _all_to_all(x: torch.Tensor, output_sizes: List[int], input_sizes: List[int], group: Any) -> torch.Tensor:
    """Rows of `x` (input_sizes per destination rank) exchanged; differentiable (the backward
    is the reverse exchange)."""
    return _AllToAll.apply(x, output_sizes, input_sizes, group)


class AllToAllDispatch:
    """The MoE dispatcher of one rank of an expert-parallel group (see the module doc)."""

    def __init__(self, group: Any, size: int) -> None:
        self.group, self.size = group, size

    def __call__(self, x_MC: torch.Tensor, counts_E: torch.Tensor, expert_fn: ExpertFn,
                 host_sizes: bool) -> torch.Tensor:
        E, R = counts_E.numel(), self.size
        n_held = E // R
        # How many rows each source rank sends to each of my experts: [R * n_held], source-major.
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E.contiguous(), group=self.group)
        send_E, recv_RL = torch.stack([counts_E, recv_counts]).tolist()  # the one host sync
        send_sizes, recv_sizes = _block_sums(send_E, n_held), _block_sums(recv_RL, n_held)

        x_recv = _all_to_all(x_MC, recv_sizes, send_sizes, self.group)
        # Received rows are grouped by source rank, then by held expert: regroup by held expert.
        with torch.no_grad():
            held_id = torch.arange(n_held, device=x_MC.device).repeat(R).repeat_interleave(recv_counts)
            order = torch.argsort(held_id, stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            counts_held = recv_counts.view(R, n_held).sum(dim=0)
        sizes = [sum(recv_RL[h::n_held]) for h in range(n_held)] if host_sizes else None
        y_sorted = expert_fn(x_recv[order], counts_held, sizes)
        y_recv = y_sorted[inverse].contiguous()
        return _all_to_all(y_recv, send_sizes, recv_sizes, self.group)


def check_expert_parallel(model: nn.Module, size: int, world_size: int, source: str) -> List[MoE]:
    """The MoE layers to split, or one UserError line saying what to change."""
    layers = moe_layers(model)
    if not layers:
        raise UserError(f"distributed.expert_parallel_size={size} needs a MoE model; "
                        f"{model.config.model_type} from {source} has no MoE layers; "
                        f"set distributed.expert_parallel_size=1")
    experts = layers[0].num_experts
    if experts % size:
        raise UserError(f"the model's {experts} experts per layer do not split over "
                        f"distributed.expert_parallel_size={size} ranks; pick a size that divides {experts}")
    if world_size % size:
        raise UserError(f"distributed.expert_parallel_size={size} does not divide the {world_size} "
                        f"rank(s) of this job; launch a multiple of {size} ranks (torchrun --nproc_per_node "
                        f"x nodes) or lower expert_parallel_size")
    return layers


def local_experts(num_experts: int, size: int, rank: int) -> range:
    """The experts global rank `rank` holds: ranks [0..size-1], [size..2*size-1], ... each split
    every layer's experts in order (DeepSpeed's ep_size_<size> groups)."""
    n = num_experts // size
    return range((rank % size) * n, (rank % size + 1) * n)


def load_slice(cfg: Any, size: int, world_size: int, rank: int) -> Optional[range]:
    """The experts a rank loads from a checkpoint of `cfg` under expert_parallel_size=`size`
    (None: everything, when there is nothing to split or the sizes do not fit, which
    `check_expert_parallel` then reports)."""
    experts = getattr(cfg, "num_local_experts", 0) or 0
    if size <= 1 or experts == 0 or experts % size or world_size % size:
        return None
    return local_experts(experts, size, rank)


def apply_expert_parallel(model: nn.Module, size: int, env: Env, source: str) -> Optional[ExpertParallelPlan]:
    """Split the experts of `model` over expert-parallel groups of `size` ranks (None when
    size is 1). Every rank calls it, once the full weights are final (loaded or resumed)."""
    if size == 1:
        return None
    layers = check_expert_parallel(model, size, env.world_size, source)
    num_experts = layers[0].num_experts
    groups = ExpertGroups(env.device, num_experts, size)
    held = local_experts(num_experts, size, env.rank)
    if groups.rank != env.rank % size:  # the layout `load_slice` read the checkpoint by
        raise RuntimeError(f"rank {env.rank} is rank {groups.rank} of its expert-parallel group, expected "
                           f"{env.rank % size}")
    dispatch = AllToAllDispatch(groups.group, size)
    for layer in layers:
        layer.keep_experts(held, dispatch)  # a layer loaded with only this slice keeps it
    plan = ExpertParallelPlan(size=size, rank=groups.rank, group=groups.group, group_name=groups.name,
                              num_experts=num_experts,
                              params=tuple(p for layer in layers for w in (layer.input_linear, layer.output_linear)
                                           for p in w.stacks()))
    if env.is_main:
        local = plan.local_experts
        log.info("expert parallel: %d experts per MoE layer over %d ranks (%d each; this rank: experts "
                 "%d-%d), expert-data-parallel groups of %d", plan.num_experts, size, plan.experts_per_rank,
                 local.start, local.stop - 1, env.world_size // size)
    return plan


def expert_stack_names_by_layer(model: nn.Module) -> List[List[str]]:
    """Per MoE layer, the state names of its expert stacks (weights and LoRA factors): the
    tensors expert parallelism slices."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [[names[id(p)] for w in (layer.input_linear, layer.output_linear) for p in w.stacks()]
            for layer in moe_layers(model)]


def expert_stack_names(model: nn.Module) -> List[str]:
    return [name for layer in expert_stack_names_by_layer(model) for name in layer]


def gathered_layers(model: nn.Module, plan: ExpertParallelPlan,
                    keep: Callable[[str], bool] = lambda name: True) -> Iterator[Dict[str, torch.Tensor]]:
    """Every expert of one MoE layer at a time, {state name: all of the group's experts stacked}
    (the weights and any LoRA factors whose names `keep` accepts): at most one layer's experts
    are ever gathered, whatever the expert-parallel size. Every rank of each expert-parallel
    group must iterate to the end (each layer is an all-gather)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for layer in moe_layers(model):
            stacks = [p for w in (layer.input_linear, layer.output_linear) for p in w.stacks() if keep(names[id(p)])]
            piece: Dict[str, torch.Tensor] = {}
            for p in stacks:  # gathered straight into the stacked tensor (its dim-0 chunks)
                full = torch.empty((plan.size * p.shape[0], *p.shape[1:]), dtype=p.dtype, device=p.device)
                dist.all_gather(list(full.chunk(plan.size)), p.detach().contiguous(), group=plan.group)
                piece[names[id(p)]] = full
            if piece:
                yield piece
