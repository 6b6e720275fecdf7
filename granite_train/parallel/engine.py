"""How gradients are reduced over data-parallel ranks and how the optimizer steps.

The trainer's step (`train/step.py`) computes, per micro-batch, an objective that is already
token-exact: (sum of the micro-batch's token losses) / (trained tokens of the whole optimizer
step, all ranks). An engine turns those objectives into one optimizer update whose gradient is
the SUM over micro-batches and ranks, clipped by the global norm, skipped on every rank alike
when not finite:

- `PlainEngine`: every rank holds everything; one flat SUM all-reduce per step (the default,
  `distributed.zero_stage=null`).
- `DeepSpeedEngine` (`deepspeed_engine.py`): DeepSpeed ZeRO stage 0-3, the same math.

`Engine` is the interface the trainer, evaluation and checkpoints use.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from granite_train.errors import UserError
from granite_train.parallel.env import Env
from granite_train.parallel.grad_norm import clip_by_global_norm
from granite_train.parallel.plan import ParallelPlan
from granite_train.serialization import safe_load

OPTIMIZER_FILE = "optimizer.pt"  # plain engine: the optimizer's state_dict, inside a checkpoint
DS_STATE_DIR = "deepspeed"  # DeepSpeed engine: every rank's state, inside a checkpoint


class Engine(Protocol):
    model: nn.Module  # the model itself (ZeRO-3: its weights sharded; expert parallel: its experts)
    plan: ParallelPlan

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The optimizer's groups: where the trainer sets each step's lr."""

    def forward(self, **inputs: Any) -> Any: ...

    def backward(self, objective: torch.Tensor) -> None: ...

    def backward_nothing(self) -> None:
        """A micro-batch that trains no token on this rank (engines whose backward is a
        collective run a dummy one, so every rank runs as many)."""

    def step(self, loss_is_finite: bool) -> Tuple[float, bool]:
        """Reduce, clip and update: (global grad norm, whether the update was applied)."""

    # Whether `save_state` holds the weights themselves (a checkpoint then needs no HF copy).
    state_holds_weights: bool

    # Largest safetensors shard the consolidated model is written in (bytes): a sharded engine
    # keeps the writer (rank 0) at about its share of the model.
    export_shard_size: int

    def full_pieces(self, select: Optional[Callable[[str], bool]] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """The whole model's state dict in pieces, full names (every rank must iterate; a
        sharded engine gathers one piece at a time). `select(name)`: only those tensors (and
        only those are gathered: an adapter run's checkpoint never gathers its frozen base)."""

    def release_optimizer_state(self) -> None:
        """Free the optimizer's moment estimates (after the last checkpoint: the final export
        then has that memory, 8 bytes per parameter per rank, to gather and write in)."""

    def save_state(self, directory: Path, is_main: bool) -> None:
        """Write this rank's optimizer (and, sharded, weight) state into a checkpoint."""

    def check_resume(self, ckpt: Path) -> None:
        """One UserError line when `ckpt`'s state cannot resume into this engine."""

    def load_state(self, ckpt: Path) -> None: ...


def saved_zero_stage(ckpt: Path) -> Optional[int]:
    """The distributed.zero_stage a checkpoint was saved with (None: plain, or unreadable)."""
    try:
        return OmegaConf.load(ckpt / "config.yaml").distributed.get("zero_stage")
    except Exception:  # an unreadable config: the caller's message still holds
        return None


def _allreduce_sum(tensors: List[torch.Tensor]) -> None:
    # One flat buffer: a single collective per step. Sum, because every rank already divided its
    # loss by the global token count.
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, synced in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(synced.view_as(t))


class PlainEngine:
    """Plain data parallel: local accumulation, one summed all-reduce, global-norm clipping."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: Env, grad_clip: float,
                 plan: ParallelPlan) -> None:
        self.model, self.optimizer, self.env, self.plan = model, optimizer, env, plan
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = grad_clip

    @classmethod
    def one_process(cls, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0) -> "PlainEngine":
        """The engine of a single process on the CPU, nothing cut (tools and benchmarks that run
        the trainer's step outside a run)."""
        plan = ParallelPlan(world_size=1, zero_stage=None, expert=None, matmul_params=model.active_matmul_params())
        return cls(model, optimizer, Env.single(), grad_clip, plan)

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def backward(self, objective: torch.Tensor) -> None:
        objective.backward()

    def backward_nothing(self) -> None:
        pass  # the all-reduce in `step` covers parameters without a gradient

    def step(self, loss_is_finite: bool) -> Tuple[float, bool]:
        for p in self.params:
            if p.grad is None:  # a rank whose micro-batches never touched p still syncs it
                p.grad = torch.zeros_like(p)
        if self.env.distributed:
            _allreduce_sum([p.grad for p in self.params])
        grad_norm = clip_by_global_norm(self.params, self.clip)
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:  # every rank sees the same reduced values, so all skip together
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    export_shard_size = 5 * 10 ** 9  # transformers' default
    state_holds_weights = False  # optimizer.pt: the weights are model/

    def full_pieces(self, select: Optional[Callable[[str], bool]] = None) -> Iterator[Dict[str, torch.Tensor]]:
        yield {k: v for k, v in self.model.state_dict().items() if select is None or select(k)}

    def release_optimizer_state(self) -> None:
        self.optimizer.state.clear()

    def save_state(self, directory: Path, is_main: bool) -> None:
        if is_main:  # every rank holds the same optimizer state
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def check_resume(self, ckpt: Path) -> None:
        if not (ckpt / OPTIMIZER_FILE).is_file() and (ckpt / DS_STATE_DIR).is_dir():
            raise UserError(f"cannot resume {ckpt} without DeepSpeed: it was saved with "
                            f"distributed.zero_stage={saved_zero_stage(ckpt)} (sharded optimizer state); "
                            f"resume it with that distributed.zero_stage and the same number of ranks")

    def load_state(self, ckpt: Path) -> None:
        self.optimizer.load_state_dict(safe_load(ckpt / OPTIMIZER_FILE))
