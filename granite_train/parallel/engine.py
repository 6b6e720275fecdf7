"""How gradients are reduced over data-parallel ranks and how the optimizer steps.

The trainer's step (`train/step.py`) computes, per micro-batch, an objective that is already
token-exact: (sum of the micro-batch's token losses) / (trained tokens of the whole optimizer
step, all ranks). An engine turns those objectives into one optimizer update whose gradient is
the SUM over micro-batches and ranks, clipped by the global norm, skipped on every rank alike
when not finite:

- `PlainEngine`: every rank holds everything; the gradients are SUM all-reduced in buckets
  while the last backward of the step runs (`grad_buckets.py`; the default,
  `distributed.zero_stage=null`).
- `DeepSpeedEngine` (`deepspeed_engine.py`): DeepSpeed ZeRO stage 0-3, the same math.

`Engine` is the interface the trainer, evaluation and checkpoints use.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from granite_train.errors import UserError
from granite_train.parallel.env import Env
from granite_train.parallel.grad_buckets import GradBuckets
from granite_train.parallel.grad_norm import clip_by_global_norm
from granite_train.parallel.plan import ParallelPlan
from granite_train.serialization import safe_load

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.pt"  # plain engine: the optimizer's state_dict, inside a checkpoint
DS_STATE_DIR = "deepspeed"  # DeepSpeed engine: every rank's state, inside a checkpoint


class Engine(Protocol):
    model: nn.Module  # the model itself (ZeRO-3: its weights sharded; expert parallel: its experts)
    plan: ParallelPlan

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The optimizer's groups: where the trainer sets each step's lr."""

    def forward(self, **inputs: Any) -> Any: ...

    def backward(self, objective: torch.Tensor, last: bool = True) -> None:
        """`last`: this rank's last backward of the step (an engine may reduce during it)."""

    def backward_nothing(self) -> None:
        """A micro-batch that trains no token on this rank (engines whose backward is a
        collective run a dummy one, so every rank runs as many)."""

    def backwards_done(self) -> None:
        """This rank's backwards of the step are over; called before the step's other
        collectives (an engine may launch the rest of its gradient reduction here)."""

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

    def checkpoint_pieces(self) -> Iterator[Dict[str, torch.Tensor]]:
        """What a checkpoint's model/ holds (weights the engine's own state does not)."""

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


class PlainEngine:
    """Plain data parallel: local accumulation, the summed reduction overlapped with the last
    backward (buckets of `bucket_mb`), global-norm clipping."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: Env, grad_clip: float,
                 plan: ParallelPlan, bucket_mb: float = 25.0) -> None:
        self.model, self.optimizer, self.env, self.plan = model, optimizer, env, plan
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = grad_clip
        # One process reduces nothing: its gradients stay autograd's own (freed between steps).
        self.buckets = GradBuckets(self.params, int(bucket_mb * 2 ** 20)) if env.distributed else None
        if self.buckets is not None and env.is_main:
            log.info("data parallel over %d ranks: gradients SUM all-reduced in %d bucket(s) of <= %.1f MiB %s "
                     "(distributed.bucket_mb=%g)", env.world_size, len(self.buckets.buckets),
                     self.buckets.max_bucket_bytes / 2 ** 20,
                     "during the backward" if bucket_mb > 0 else "after the backward", bucket_mb)

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

    def backward(self, objective: torch.Tensor, last: bool = True) -> None:
        if last and self.buckets is not None:
            self.buckets.arm()
        objective.backward()

    def backward_nothing(self) -> None:
        pass  # `backwards_done` launches every bucket the backward did not

    def backwards_done(self) -> None:
        if self.buckets is not None:
            self.buckets.launch_rest()

    def step(self, loss_is_finite: bool) -> Tuple[float, bool]:
        if self.buckets is not None:
            self.buckets.finish()  # waits for every bucket (launching any still left)
        grad_norm = clip_by_global_norm(self.params, self.clip)
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:  # every rank sees the same reduced values, so all skip together
            self.optimizer.step()
        if self.buckets is not None:
            self.buckets.zero()  # the gradients are views of the buckets: zeroed, never dropped
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    export_shard_size = 5 * 10 ** 9  # transformers' default
    state_holds_weights = False  # optimizer.pt: the weights are model/

    def full_pieces(self, select: Optional[Callable[[str], bool]] = None) -> Iterator[Dict[str, torch.Tensor]]:
        yield {k: v for k, v in self.model.state_dict().items() if select is None or select(k)}

    def checkpoint_pieces(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self.full_pieces()

    def release_optimizer_state(self) -> None:
        self.optimizer.state.clear()
        if self.buckets is not None:  # no step follows: the gradient buckets go too
            self.buckets.release()

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
