"""Expert parallelism on DeepSpeed (`distributed.expert_parallel_size=E`).

Groups are DeepSpeed's (`deepspeed.utils.groups`, named "ep_size_<E>"): ranks [0..E-1],
[E..2E-1], ... each split every MoE layer's experts (expert-parallel group); ranks with the same
position in their group hold the same experts (expert-data-parallel group, world / E ranks).

- `setup_expert_parallel` checks the sizes, makes the groups, keeps this rank's experts in every
  MoE layer (models/moe.py `shard_experts`) and tags those weights the way DeepSpeed's MoE code
  expects (`allreduce=False`, `group_name`): DeepSpeed then reduces their gradients over the
  expert-data-parallel group only, and ZeRO 1/2 shard their optimizer state over it.
- `gathered_experts` puts every expert back on every rank for a while: the consolidated
  checkpoint (`model/`, `final/`) is the full model in HF layout.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from granite_train.config import RunConfig
from granite_train.errors import UserError
from granite_train.models.expert_parallel import ExpertShard
from granite_train.models.moe import MoE
from granite_train.train.env import Env

log = logging.getLogger("granite_train.train")


def moe_layers(model: torch.nn.Module) -> List[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def is_expert_param(p: torch.Tensor) -> bool:
    """A weight held by only some ranks (DeepSpeed's `is_moe_param`)."""
    return getattr(p, "allreduce", True) is False


def setup_expert_parallel(model: torch.nn.Module, env: Env, cfg: RunConfig) -> Optional[ExpertShard]:
    """Shard the experts of `model` over the expert-parallel group (None when E = 1). Every
    rank calls it, after the weights are final (loaded or resumed) and before the optimizer."""
    size = cfg.distributed.expert_parallel_size
    if size == 1:
        return None
    layers = moe_layers(model)
    if not layers:
        raise UserError(f"distributed.expert_parallel_size={size} needs a MoE model; "
                        f"{model.config.model_type} from {cfg.model.path or 'model.arch'} has no MoE layers; "
                        f"set distributed.expert_parallel_size=1")
    experts = layers[0].num_experts
    if experts % size:
        raise UserError(f"the model's {experts} experts per layer do not split over "
                        f"distributed.expert_parallel_size={size} ranks; pick a size that divides {experts}")
    if env.world_size % size:
        raise UserError(f"distributed.expert_parallel_size={size} does not divide the {env.world_size} "
                        f"rank(s) of this job; launch a multiple of {size} ranks (torchrun --nproc_per_node "
                        f"x nodes) or lower expert_parallel_size")
    from granite_train.train.engine import _import_deepspeed

    deepspeed = _import_deepspeed(env)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing process group
    from deepspeed.utils import groups

    name = f"ep_size_{size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(size)
    shard = ExpertShard(group=groups._get_expert_parallel_group(name),
                        rank=groups._get_expert_parallel_rank(name), size=size, group_name=name)
    for layer in layers:
        layer.shard_experts(shard)
        for p in (layer.input_linear.weight, layer.output_linear.weight):
            p.allreduce = False
            p.group_name = name
    if env.is_main:
        log.info("expert parallel: %d experts per MoE layer over %d ranks (%d each; this rank: experts "
                 "%d-%d), expert-data-parallel groups of %d", experts, size, experts // size,
                 shard.local_range(experts).start, shard.local_range(experts).stop - 1, env.world_size // size)
    return shard


@contextlib.contextmanager
def gathered_experts(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every rank of each expert-parallel group must enter: all of a layer's experts on every
    rank inside, this rank's own weights (untouched) again after."""
    swapped = []
    try:
        with torch.no_grad():
            for layer in moe_layers(model):
                shard = layer.expert_shard
                if shard is None:
                    continue
                for p in (layer.input_linear.weight, layer.output_linear.weight):
                    parts = [torch.empty_like(p) for _ in range(shard.size)]
                    dist.all_gather(parts, p.detach().contiguous(), group=shard.group)
                    swapped.append((p, p.data))
                    p.data = torch.cat(parts)
        yield model
    finally:
        for p, data in swapped:
            p.data = data
