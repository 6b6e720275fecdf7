"""What `parallelize` decided: how the model is cut over ranks, as plain data.

Nothing is stored on tensors or modules for our own use: whoever needs to know whether a
parameter is an expert's, which group reduces it, or which forwards must run in lockstep asks
the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from torch import nn


@dataclass(frozen=True)
class ExpertParallelPlan:
    """Experts split over the `size` ranks of an expert-parallel group.

    This rank keeps experts `local_experts` of every MoE layer; `params` are those layers'
    expert weight stacks (this rank's slices). Ranks at the same place in their groups hold the
    same experts and reduce those gradients among themselves (the expert-data-parallel group,
    world / size ranks)."""

    size: int
    rank: int  # within `group`
    group: Any  # torch process group of the `size` ranks that split the experts
    group_name: str  # DeepSpeed's name for it ("ep_size_<size>")
    num_experts: int  # per MoE layer, all ranks together
    params: Tuple[nn.Parameter, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", frozenset(id(p) for p in self.params))

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.size

    @property
    def local_experts(self) -> range:
        n = self.experts_per_rank
        return range(self.rank * n, (self.rank + 1) * n)

    def holds(self, p: nn.Parameter) -> bool:
        """Whether `p` is an expert weight (held by only some ranks)."""
        return id(p) in self._ids

    def optimizer_groups(self) -> Dict[int, str]:
        """id(parameter) -> expert group name, for the optimizer's param groups."""
        return {id(p): self.group_name for p in self.params}


@dataclass(frozen=True)
class ContextPlan:
    """Context parallelism: groups of `size` consecutive ranks share each packed row, this rank
    holding slice `rank` (of `slice_len` tokens). The data is planned for `data_world` ranks
    (one per group) with rows of size x slice_len tokens; this rank's group reads rank
    `data_rank`'s rows."""

    size: int
    rank: int  # within `group`
    group: Any  # torch process group of the `size` ranks sharing a row
    slice_len: int  # trainer.micro_batch_tokens
    data_rank: int
    data_world: int

    @property
    def row_tokens(self) -> int:
        return self.size * self.slice_len


@dataclass(frozen=True)
class ParallelPlan:
    """How this run is cut over its ranks (returned by `parallelize` with the engine)."""

    world_size: int
    zero_stage: Optional[int]  # None: plain data parallel, no DeepSpeed
    expert: Optional[ExpertParallelPlan]  # None: every rank holds every expert
    # Weights one token multiplies with, counted on the full model before anything was cut
    # (MFU must not shrink when a rank holds a slice); with a frozen base weighted by training
    # work (`lora.training_matmul_params`: MFU = 6 x this x tokens / time / peak).
    matmul_params: int
    compiled: Dict[str, int] = field(default_factory=dict)  # module kind -> count (trainer.compile)
    context: Optional[ContextPlan] = None  # None: every rank holds whole rows

    @property
    def lockstep_forwards(self) -> bool:
        """Whether every forward is a collective (ZeRO-3 gathers weights, expert parallelism
        exchanges tokens): then every rank must run as many forwards, dummies where it has none."""
        return self.zero_stage == 3 or self.expert is not None
