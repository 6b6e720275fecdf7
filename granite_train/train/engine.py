"""How gradients are reduced over data-parallel ranks and how the optimizer steps.

The loop computes, per micro-batch, an objective that is already token-exact: (sum of the
micro-batch's token losses) / (trained tokens of the whole optimizer step, all ranks). An engine
turns those objectives into one optimizer update whose gradient is the SUM over micro-batches
and ranks, clipped by the global norm, skipped on every rank alike when not finite:

- `PlainEngine`: every rank holds everything; one flat SUM all-reduce per step (the default,
  `distributed.zero_stage=null`).
- `DeepSpeedEngine`: DeepSpeed ZeRO stage 0-3 (`distributed.zero_stage`), the same math.

Interface used by the loop: `forward(**inputs)`, `backward(objective)`, `backward_nothing()` (a
micro-batch that trains no token on this rank), `step(loss_is_finite) -> (grad_norm, stepped)`,
`param_groups` (where the loop sets the lr), `full_weights()` (a context in which `model` holds
every weight on every rank: ZeRO-3 gathers), `save_state(dir)` / `load_state(dir)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from granite_train.config import RunConfig
from granite_train.errors import UserError
from granite_train.models.expert_parallel import ExpertShard
from granite_train.train.env import Env

log = logging.getLogger("granite_train.train")

DS_STATE_DIR = "deepspeed"  # per-rank DeepSpeed state inside a checkpoint
DS_CONFIG_FILE = "deepspeed_config.json"  # the generated config, in the run's output_dir
_DS_TAG = "state"


def _allreduce_grads(params: List[torch.nn.Parameter]) -> None:
    # One flat buffer: a single collective per step. Sum, because every rank already divided its
    # loss by the global token count.
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class PlainEngine:
    """Plain data parallel: local accumulation, one summed all-reduce, global-norm clipping."""

    uses_deepspeed = False

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: Env, grad_clip: float):
        self.model, self.optimizer, self.env = model, optimizer, env
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.clip = grad_clip if grad_clip > 0 else float("inf")

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def forward(self, **inputs):
        return self.model(**inputs)

    def backward(self, objective: torch.Tensor) -> None:
        objective.backward()

    def backward_nothing(self) -> None:
        pass  # nothing to do: the all-reduce below covers parameters without a gradient

    def step(self, loss_is_finite: bool) -> Tuple[float, bool]:
        for p in self.params:
            if p.grad is None:  # a rank whose micro-batches never touched p still syncs it
                p.grad = torch.zeros_like(p)
        if self.env.distributed:
            _allreduce_grads(self.params)
        grad_norm = clip_by_global_norm(self.params, self.clip)
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:  # every rank sees the same reduced values, so all skip together
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[torch.nn.Module]:
        yield self.model

    def optimizer_state(self) -> Optional[Dict[str, Any]]:
        return self.optimizer.state_dict()

    def save_state(self, directory: Path) -> None:
        pass  # the optimizer goes into optimizer.pt (rank 0)

    def load_state(self, ckpt: Path) -> None:
        from granite_train.train import checkpoint as ckpt_io

        if not (ckpt / "optimizer.pt").is_file() and (ckpt / DS_STATE_DIR).is_dir():
            raise UserError(f"cannot resume {ckpt} without DeepSpeed: it was saved with "
                            f"distributed.zero_stage={_saved_zero_stage(ckpt)} (sharded optimizer state); "
                            f"resume it with that distributed.zero_stage and the same number of ranks")
        ckpt_io.load_optimizer(ckpt, self.optimizer)


def _saved_zero_stage(ckpt: Path) -> Optional[int]:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(ckpt / "config.yaml").distributed.get("zero_stage")
    except Exception:  # an unreadable config: the caller's message still holds
        return None


def clip_by_global_norm(params: List[torch.nn.Parameter], max_norm: float, expert_group: Any = None) -> float:
    """The global L2 norm of the gradients, accumulated in fp64, then clipped like
    `clip_grad_norm_` (scale max_norm / (norm + 1e-6) when below 1). fp64 because torch's fp32
    norm of a multi-million-element CPU gradient drifts by ~1e-4 relative, and DeepSpeed's
    ZeRO 1-3 norms are fp64: the same run then reports the same norm with or without ZeRO.

    `expert_group` (expert parallelism): the expert-parallel group; each of its ranks holds
    other experts, so their squared norms are summed over it (each expert counted once, every
    rank clipping by the same norm) while the shared weights count once."""
    from granite_train.train.expert_parallel import is_expert_param

    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0

    def sq(ps) -> torch.Tensor:
        if not ps:
            return torch.zeros((), dtype=torch.float64, device=with_grad[0].grad.device)
        return torch.stack([torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) for p in ps]).square().sum()

    if expert_group is None:
        total_sq = sq(with_grad)
    else:
        expert_sq = sq([p for p in with_grad if is_expert_param(p)])
        dist.all_reduce(expert_sq, group=expert_group)
        total_sq = sq([p for p in with_grad if not is_expert_param(p)]) + expert_sq
    grads = [p.grad for p in with_grad]
    norm = float(total_sq.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:  # also false for a non-finite norm: that step is skipped, not scaled
        for g in grads:
            g.detach().mul_(coef)
    return norm


class _GuardedAdamW(torch.optim.AdamW):
    """ZeRO-0 only (DeepSpeed hands the optimizer the full, already reduced gradients):
    clip by the global norm like `clip_grad_norm_`, skip a non-finite step. DeepSpeed's engine
    reads `_global_grad_norm` and `overflow` after `step()` (it does neither itself at ZeRO-0 in
    fp32)."""

    clip: float = float("inf")
    force_skip: bool = False
    expert_group: Any = None  # expert parallelism: see clip_by_global_norm

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._global_grad_norm = clip_by_global_norm(params, self.clip, self.expert_group)
        self.overflow = self.force_skip or not math.isfinite(self._global_grad_norm)
        if not self.overflow:
            super().step(closure)


def _import_deepspeed(env: Env):
    if env.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise UserError(f"distributed.zero_stage needs DeepSpeed ({e}); pip install deepspeed, or set "
                        f"distributed.zero_stage=null") from None
    return deepspeed


def deepspeed_config(cfg: RunConfig, env: Env) -> Dict[str, Any]:
    """The DeepSpeed config generated from ours (the user's JSON merged on top)."""
    d = cfg.distributed
    stage = int(d.zero_stage)
    zero: Dict[str, Any] = {"stage": stage}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather ourselves
    config: Dict[str, Any] = {
        # Our micro-batches are token-packed: DeepSpeed's "samples" are meaningless here. The
        # number of micro-batches differs between steps, so the loop, not a fixed
        # gradient_accumulation_steps, owns the boundary: with
        # managed_gradient_accumulation=false every backward only accumulates (ZeRO-2/3 reduce
        # each one into the shards) and engine.step() is the boundary.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.grad_clip if stage > 0 else 0.0,  # ZeRO-0: _GuardedAdamW clips
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW (DeepSpeed's own compile fused ops)
        "bf16": {"enabled": env.autocast_dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }
    if d.offload_optimizer:
        # Our torch AdamW steps the CPU shards (DeepSpeed would insist on its DeepSpeedCPUAdam,
        # which compiles a C++ op first).
        config["zero_force_ds_cpu_optimizer"] = False
    if d.deepspeed_config is not None:
        try:
            user = json.loads(Path(d.deepspeed_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"distributed.deepspeed_config={d.deepspeed_config}: {e}") from None
        config = _merge(config, user)
    return config


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _init_single_process_group(env: Env) -> None:
    """DeepSpeed always wants a process group; a single process (no torchrun) gets one of 1."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads them
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _prepare_zero3(model: torch.nn.Module) -> None:
    """ZeRO-3 fetches a module's own weights before its forward. Some of ours use weights held
    by a child whose forward they never call: fetch those with the parent."""
    from deepspeed.utils import set_z3_leaf_modules

    from granite_train.models.mamba import Mamba2Mixer
    from granite_train.models.moe import MoE

    leaf = [cls for cls in (MoE, Mamba2Mixer) if any(isinstance(m, cls) for m in model.modules())]
    if leaf:
        set_z3_leaf_modules(model, leaf)


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 with the plain engine's math.

    Token-exact: the objective is already divided by the step's global trained-token count and
    must be SUMMED over ranks. DeepSpeed AVERAGES gradients over the data-parallel ranks (it
    divides the reduced gradient by the world size at every stage, and ZeRO-3 refuses
    `gradient_allreduce_op: sum`), so every objective is multiplied by the world size first:
    (sum over ranks of world * g_r) / world = sum of g_r. With a power-of-two world size both
    scalings are exact in floating point.
    """

    uses_deepspeed = True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: Env, cfg: RunConfig,
                 expert_shard: Optional[ExpertShard] = None):
        deepspeed = _import_deepspeed(env)
        self.env, self.stage = env, int(cfg.distributed.zero_stage)
        self.world = env.world_size
        self.expert_shard = expert_shard
        if self.stage == 0:
            optimizer.__class__ = _GuardedAdamW  # same state and groups; adds the guard
            optimizer.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            optimizer.expert_group = expert_shard.group if expert_shard is not None else None
        self.base_optimizer = optimizer
        _init_single_process_group(env)
        if self.stage == 3:
            _prepare_zero3(model)
        config = deepspeed_config(cfg, env)
        if env.is_main:  # what DeepSpeed was given, for the record and for other launchers
            out = Path(cfg.trainer.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / DS_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        module = model if expert_shard is None else _expert_parallel_module(model, expert_shard)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.model = model  # the same module (ZeRO-3: its weights sharded)
        self._deepspeed = deepspeed
        self._dummy: Optional[Dict[str, Any]] = None

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        # The torch optimizer's own groups (ZeRO swaps their "params" for flat shards and keeps
        # every other key): the lr set here is the lr the update uses.
        return self.base_optimizer.param_groups

    def forward(self, **inputs):
        return self.engine(**inputs)

    def backward(self, objective: torch.Tensor) -> None:
        # scale_wrt_gas=False: the objective is already weighted by its share of the step.
        self.engine.backward(objective * self.world, scale_wrt_gas=False)

    def backward_nothing(self, poison: bool = False) -> None:
        """A backward that adds nothing (or, `poison`, NaN everywhere): ZeRO-2/3 reduce inside
        every backward, so all ranks must run the same number of them, touching every weight."""
        from granite_train.train.inputs import MODEL_INPUTS, dummy_micro_batch

        if self._dummy is None:
            self._dummy = dummy_micro_batch(self.env.device)
        mb = self._dummy
        with torch.autocast(self.env.device.type, dtype=self.env.autocast_dtype,
                            enabled=self.env.autocast_dtype is not None):
            out = self.engine(**{k: mb.get(k) for k in MODEL_INPUTS}, labels=mb["labels"], return_logits=False)
        total = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        self.engine.backward(total * (float("nan") if poison else 0.0), scale_wrt_gas=False)

    def step(self, loss_is_finite: bool) -> Tuple[float, bool]:
        if not loss_is_finite:
            # Every rank knows the (all-reduced) loss: make DeepSpeed see a non-finite gradient
            # so that it skips the update on every rank, as the plain engine does.
            if self.stage == 0:
                self.base_optimizer.force_skip = True
            else:
                self.backward_nothing(poison=True)
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if self.stage == 0:
            self.base_optimizer.force_skip = False
        norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if norm is None else float(norm)
        stepped = self.engine.skipped_steps == skipped_before and loss_is_finite and math.isfinite(grad_norm)
        return grad_norm, stepped

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[torch.nn.Module]:
        """Every rank must enter it (ZeRO-3 and expert parallelism all-gather the weights)."""
        if self.expert_shard is not None:
            from granite_train.train.expert_parallel import gathered_experts

            with gathered_experts(self.model) as model:
                yield model
        elif self.stage == 3:
            params = list(self.model.parameters())
            with self._deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield self.model
        else:
            yield self.model

    def optimizer_state(self) -> Optional[Dict[str, Any]]:
        return None  # sharded: DeepSpeed's own files under deepspeed/

    def save_state(self, directory: Path) -> None:
        """Every rank: DeepSpeed's per-rank weights + optimizer shards (resume with the same
        ranks and stage)."""
        if self.expert_shard is not None:
            self._save_expert_parallel_state(directory / DS_STATE_DIR)
            return
        self.engine.save_checkpoint(str(directory / DS_STATE_DIR), tag=_DS_TAG, save_latest=False)

    # Expert parallelism: DeepSpeed's own checkpoint code only knows its own MoE layer's
    # parameter names, so each rank writes its optimizer (ZeRO: its shard, fp32 masters included)
    # itself; the weights come from the consolidated model/ on resume.
    def _ep_state_file(self, state_dir: Path, rank: int) -> Path:
        return state_dir / f"expert_parallel_rank_{rank:05d}.pt"

    def _save_expert_parallel_state(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "zero_stage": self.stage, "world_size": self.world,
                    "expert_parallel_size": self.expert_shard.size},
                   self._ep_state_file(state_dir, self.env.rank))

    def _load_expert_parallel_state(self, ckpt: Path) -> None:
        state_dir = ckpt / DS_STATE_DIR
        path = self._ep_state_file(state_dir, self.env.rank)
        saved = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
        found = (saved["zero_stage"], saved["world_size"], saved["expert_parallel_size"]) if saved else None
        if found != (self.stage, self.world, self.expert_shard.size):
            what = (f"zero_stage={found[0]} on {found[1]} ranks with expert_parallel_size={found[2]}" if found
                    else "without expert parallelism" if (state_dir / _DS_TAG).is_dir() or (ckpt / "optimizer.pt").is_file()
                    else "with fewer ranks")
            raise UserError(f"cannot resume {ckpt}: it was saved {what}; this run has zero_stage={self.stage} on "
                            f"{self.world} ranks with expert_parallel_size={self.expert_shard.size}; resume with the "
                            f"saved settings (or start from its model/ with model.path= and a fresh run)")
        if self.stage == 0:
            self.optimizer.load_state_dict(saved["optimizer"])
        else:  # a ZeRO optimizer takes every rank's state and picks its own
            states = [None] * self.world
            states[self.env.rank] = saved["optimizer"]
            self.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)

    def load_state(self, ckpt: Path) -> None:
        if self.expert_shard is not None:
            self._load_expert_parallel_state(ckpt)
            return
        state = ckpt / DS_STATE_DIR
        ep_files = sorted(state.glob("expert_parallel_rank_*.pt"))
        if ep_files:
            saved_ep = torch.load(ep_files[0], map_location="cpu", weights_only=False)["expert_parallel_size"]
            raise UserError(f"cannot resume {ckpt}: it was saved with distributed.expert_parallel_size={saved_ep} "
                            f"on {len(ep_files)} ranks; resume it with those settings")
        if not (state / _DS_TAG).is_dir():
            raise UserError(f"cannot resume {ckpt} with distributed.zero_stage={self.stage}: it holds no "
                            f"DeepSpeed state (it was saved without DeepSpeed); resume it with "
                            f"distributed.zero_stage=null")
        saved_stage = _saved_zero_stage(ckpt)
        saved_ranks = len(list((state / _DS_TAG).glob("zero_pp_rank_*_optim_states.pt")))
        if saved_stage != self.stage or (self.stage > 0 and saved_ranks != self.world):
            raise UserError(f"cannot resume {ckpt}: it was saved with distributed.zero_stage={saved_stage}"
                            f"{f' on {saved_ranks} ranks' if saved_ranks else ''}, this run has zero_stage="
                            f"{self.stage} on {self.world}; DeepSpeed state resumes only with the same stage "
                            f"and number of ranks")
        load_path, _ = self.engine.load_checkpoint(str(state), tag=_DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise UserError(f"cannot resume {ckpt}: DeepSpeed could not load {state} (saved with another "
                            f"number of ranks or ZeRO stage?)")


def _expert_parallel_module(model: torch.nn.Module, shard: ExpertShard) -> torch.nn.Module:
    """`model` wrapped so that DeepSpeed sees MoE layers: its engine turns its MoE support on
    (expert gradients reduced over the expert-data-parallel group, ZeRO partitions of the
    expert param groups over it) only for instances of its own `MoE` class."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallelModel(DeepSpeedMoE):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)  # none of DeepSpeed's layer: only what its engine reads
            self.module = model
            self.ep_size, self.expert_group_name = shard.size, shard.group_name
            self.num_experts = model.config.num_local_experts
            self.num_local_experts = self.num_experts // shard.size

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist already (train/expert_parallel.py)

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    return ExpertParallelModel()


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: Env, cfg: RunConfig,
                 expert_shard: Optional[ExpertShard] = None):
    if cfg.distributed.zero_stage is None:
        if expert_shard is not None:
            raise ValueError("expert parallelism runs on DeepSpeed (config validation lets no such run through)")
        return PlainEngine(model, optimizer, env, cfg.optim.grad_clip)
    return DeepSpeedEngine(model, optimizer, env, cfg, expert_shard)
