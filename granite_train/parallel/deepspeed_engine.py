"""DeepSpeed ZeRO 0-3 (`distributed.zero_stage`), with expert parallelism at ZeRO 0-2, behind
the plain engine's interface and math (`engine.py`).

Token-exact: the objective is already divided by the step's global trained-token count and must
be SUMMED over ranks. DeepSpeed AVERAGES gradients over the data-parallel ranks (it divides the
reduced gradient by the world size at every stage, and ZeRO-3 refuses
`gradient_allreduce_op: sum`), so every objective is multiplied by the world size first:
(sum over ranks of world * g_r) / world = sum of g_r. With a power-of-two world size both
scalings are exact in floating point.

What DeepSpeed needs that it offers no public API for (the MoE marker, the expert tags, ZeRO-0's
clipping optimizer, per-rank optimizer state) comes from `granite_train/compat.py`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from granite_train.compat import (GuardedAdamW, deepspeed_moe_marker, import_deepspeed, tag_expert_params,
                                  full_numel, load_zero_optimizer_shard, use_safe_checkpoint_loads,
                                  zero_saved_ranks, zero_settings)
from granite_train.config import RunConfig
from granite_train.data.collator import dummy_micro_batch, model_inputs
from granite_train.errors import UserError
from granite_train.models.hf_io import read_tensors, weight_groups
from granite_train.models.mamba import Mamba2Mixer
from granite_train.models.moe import MoE
from granite_train.parallel.engine import DS_STATE_DIR, OPTIMIZER_FILE, saved_zero_stage
from granite_train.parallel.env import Env
from granite_train.models.expert_shards import EXPERTS_DIR, save_slice
from granite_train.parallel.expert_parallel import expert_stack_names, expert_stack_names_by_layer, gathered_layers
from granite_train.parallel.plan import ParallelPlan
from granite_train.serialization import safe_load

log = logging.getLogger("granite_train.parallel")
DS_CONFIG_FILE = "deepspeed_config.json"  # the generated config, in the run's output_dir
_DS_TAG = "state"


def memory_settings(model: nn.Module, stage: int) -> Dict[str, int]:
    """ZeRO buffer sizes (elements) from the model, instead of DeepSpeed's defaults (reduce and
    all-gather buckets of 5e8 elements, 1e9 live ZeRO-3 parameters: 2-4 GB each in fp32 whatever
    the model). Buckets of hidden^2 (transformers' "auto" rule; a larger tensor, e.g. the
    embedding or an MoE layer's stacked experts, is reduced on its own); ZeRO-3 keeps about one
    layer live, prefetches 0.9 hidden^2, steps the optimizer 4 hidden^2 elements at a time, and
    parameters under 10 x hidden elements (norms, biases) stay whole on every rank."""
    hidden = int(model.config.hidden_size)
    layers = getattr(getattr(model, "model", model), "layers", [])
    largest_layer = max((sum(full_numel(p) for p in layer.parameters()) for layer in layers),
                        default=max(full_numel(p) for p in model.parameters()))
    sizes = {"reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden}
    if stage == 3:
        del sizes["allgather_bucket_size"]  # ZeRO-1/2 only
        sizes.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                     stage3_param_persistence_threshold=10 * hidden,
                     stage3_max_live_parameters=largest_layer, stage3_max_reuse_distance=largest_layer,
                     # The optimizer steps the fp32 shard in pieces of this many elements (a
                     # larger parameter's shard is one piece): Adam's temporaries (sqrt of v,
                     # its quotient: twice a piece) stay small, not twice a layer.
                     sub_group_size=4 * hidden * hidden)
    return sizes


def deepspeed_config(cfg: RunConfig, env: Env, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """The DeepSpeed config generated from ours (the user's JSON merged on top); with `model`,
    buffer sizes derived from it (`memory_settings`)."""
    d = cfg.distributed
    stage = int(d.zero_stage)
    zero: Dict[str, Any] = {"stage": stage}
    if model is not None and stage > 0:
        zero.update(memory_settings(model, stage))
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
        "gradient_clipping": cfg.optim.grad_clip if stage > 0 else 0.0,  # ZeRO-0: GuardedAdamW clips
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
        precision = ("bf16" if config["bf16"].get("enabled") else "fp32") if not config["fp16"].get("enabled") else "fp16"
        wanted = "bf16" if env.autocast_dtype == torch.bfloat16 else "fp32"
        if precision != wanted:
            raise UserError(f"distributed.deepspeed_config={d.deepspeed_config} asks for {precision} but the run trains in "
                            f"{wanted}; the precision is trainer.dtype's (bf16 or fp32; fp16 is not supported): remove "
                            f"the fp16/bf16 section from the JSON and set trainer.dtype")
    return config


def _announce(config: Dict[str, Any], env: Env) -> None:
    """One line before `deepspeed.initialize`, which can be silent for a while."""
    zero = config["zero_optimization"]
    offload = [name for key, name in (("offload_optimizer", "optimizer"), ("offload_param", "params"))
               if zero.get(key, {}).get("device", "none") != "none"]
    settings = zero_settings(zero)
    buckets = ", ".join(f"{k.replace('_bucket_size', '').replace('stage3_', '')} {v / 1e6:.3g}M" for k, v in settings.items())
    first_run = (" (on CPU a first run on this machine compiles DeepSpeed's shared-memory communication op "
                 "first, about 40 s; later runs load it from ~/.cache/torch_extensions)" if env.device.type == "cpu"
                 else "")
    log.info("DeepSpeed ZeRO-%d over %d rank(s) | offload: %s | buckets (elements): %s | config: %s%s", zero["stage"],
             env.world_size, ", ".join(offload) or "none", buckets, DS_CONFIG_FILE, first_run)


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def zero3_partitioner(cfg: RunConfig, env: Env) -> Callable[[nn.Module], None]:
    """ZeRO-3 loads: shards each piece of a model as `hf_io.load_model` fills it, so no rank ever
    holds more than its shard plus one piece (a layer). DeepSpeed's public
    `zero.Init(module=...)` converts a built module's weights to ZeRO-3 partitions, the state
    `deepspeed.initialize` later finds them in."""
    deepspeed = import_deepspeed(env.device)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing group
    config = deepspeed_config(cfg, env)
    remote = "cpu" if cfg.distributed.offload_params else None
    dtype = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32  # the dtype pieces are loaded in

    def partition(piece: nn.Module) -> None:
        # mem_efficient_linear=False: otherwise DeepSpeed swaps torch's F.linear process-wide.
        deepspeed.zero.Init(module=piece, config_dict_or_path=config, remote_device=remote,
                            mem_efficient_linear=False, dtype=dtype)

    return partition


def fill_sharded(model: nn.Module, path: Path, env: Env) -> None:
    """Overwrite a ZeRO-3 sharded model with a checkpoint's weights, one tensor at a time:
    gathered, written by rank 0 from the file, re-sharded (resume of a sharded load)."""
    deepspeed = import_deepspeed(env.device)

    with read_tensors(path, model.config) as read:
        for name, p in model.named_parameters():  # a tied weight appears once
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if env.is_main:
                    p.data.copy_(read(name))


def copy_into_sharded(pairs: List[Tuple[torch.Tensor, torch.Tensor]], env: Env) -> None:
    """`param.copy_(value)` for ZeRO-3 partitioned params (every rank calls; each is gathered,
    written by rank 0, re-sharded)."""
    deepspeed = import_deepspeed(env.device)
    for p, value in pairs:
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if env.is_main:
                p.data.copy_(value.to(p.dtype))


def _prepare_zero3(model: nn.Module, deepspeed) -> None:
    """ZeRO-3 fetches a module's own weights before its forward. Some of ours use weights held
    by a child whose forward they never call: fetch those with the parent."""
    leaf = [cls for cls in (MoE, Mamba2Mixer) if any(isinstance(m, cls) for m in model.modules())]
    if leaf:
        deepspeed.utils.set_z3_leaf_modules(model, leaf)


class _EngineModule(nn.Module):
    """What `deepspeed.initialize` gets under expert parallelism: the model, plus DeepSpeed's
    MoE marker (compat.deepspeed_moe_marker) that switches its expert handling on."""

    def __init__(self, model: nn.Module, marker: nn.Module) -> None:
        super().__init__()
        self.model, self.deepspeed_moe_marker = model, marker

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 with the plain engine's math (see the module doc). At ZeRO-0 the
    optimizer must be a `compat.GuardedAdamW` (DeepSpeed neither clips in fp32 nor skips there)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: Env, cfg: RunConfig,
                 plan: ParallelPlan) -> None:
        deepspeed = import_deepspeed(env.device)
        self.env, self.plan, self.stage = env, plan, int(cfg.distributed.zero_stage)
        self.world = env.world_size
        if (self.stage == 0) != isinstance(optimizer, GuardedAdamW):
            raise ValueError("DeepSpeed ZeRO-0 (and only ZeRO-0) needs the optimizer to be a GuardedAdamW")
        self.base_optimizer = optimizer
        if self.stage == 3:
            _prepare_zero3(model, deepspeed)
        config = deepspeed_config(cfg, env, model)
        if env.is_main:  # what DeepSpeed was given, for the record and for other launchers
            out = Path(cfg.trainer.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / DS_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            _announce(config, env)
        module: nn.Module = model
        if plan.expert is not None:
            tag_expert_params(plan.expert.params, plan.expert.group_name)
            module = _EngineModule(model, deepspeed_moe_marker(env.device, plan.expert.num_experts, plan.expert.size))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        use_safe_checkpoint_loads(self.engine, safe_load)  # DeepSpeed's own loader would unpickle anything
        self.model = model  # the same module (ZeRO-3: its weights sharded)
        self._frozen_base = any(not p.requires_grad for p in model.parameters())
        self._deepspeed = deepspeed
        self._dummy: Optional[Dict[str, Any]] = None
        self._ep_read: Optional[tuple] = None

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        # The torch optimizer's own groups (ZeRO swaps their "params" for flat shards and keeps
        # every other key): the lr set here is the lr the update uses.
        return self.base_optimizer.param_groups

    def forward(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

    def backward(self, objective: torch.Tensor, last: bool = True) -> None:
        # scale_wrt_gas=False: the objective is already weighted by its share of the step.
        self.engine.backward(objective * self.world, scale_wrt_gas=False)

    def _dummy_backward(self, scale: float) -> None:
        """A backward through every weight on two dummy tokens, scaled by `scale`."""
        if self._dummy is None:
            self._dummy = dummy_micro_batch(self.env.device)
        mb = self._dummy
        with torch.autocast(self.env.device.type, dtype=self.env.autocast_dtype,
                            enabled=self.env.autocast_dtype is not None):
            out = self.engine(**model_inputs(mb), labels=mb["labels"], return_logits=False)
        total = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        self.engine.backward(total * scale, scale_wrt_gas=False)

    def backward_nothing(self) -> None:
        """A backward that adds zero, through every weight: ZeRO-2/3 reduce inside every
        backward and expert parallelism exchanges tokens in it, so all ranks run the same number
        of them (at ZeRO 0/1 without experts it costs a tiny forward and is kept for uniformity)."""
        self._dummy_backward(0.0)

    def backwards_done(self) -> None:
        pass  # DeepSpeed reduces inside its backward and step

    def _backward_nan(self) -> None:
        """NaN into every gradient: DeepSpeed then skips the update (ZeRO 1-3)."""
        self._dummy_backward(float("nan"))

    def step(self, loss_is_finite: bool) -> Tuple[float, bool]:
        if not loss_is_finite:
            # Every rank knows the (all-reduced) loss: make DeepSpeed see a non-finite gradient
            # so that it skips the update on every rank, as the plain engine does.
            if self.stage == 0:
                self.base_optimizer.force_skip = True
            else:
                self._backward_nan()
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if self.stage == 0:
            self.base_optimizer.force_skip = False
        norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if norm is None else float(norm)
        stepped = self.engine.skipped_steps == skipped_before and loss_is_finite and math.isfinite(grad_norm)
        return grad_norm, stepped

    @property
    def state_holds_weights(self) -> bool:
        # DeepSpeed's own files hold the weights (ZeRO-3: as fp32 master shards); ours for
        # expert parallelism hold only the optimizer.
        return self.plan.expert is None

    @property
    def export_shard_size(self) -> int:
        """ZeRO-3: a shard is at most this rank's share of the model (rank 0 writes it while
        holding its own shard and optimizer state); else transformers' 5 GB."""
        limit = 5 * 10 ** 9
        if self.stage != 3:
            return limit
        total = sum(full_numel(p) * p.element_size() for p in self.model.parameters())
        return max(1, min(limit, total // self.world))

    def full_pieces(self, select: Optional[Callable[[str], bool]] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """The whole model's state in pieces (every rank must iterate: the weights are gathered).
        ZeRO-3 gathers one piece (a layer, the embedding, ...) at a time and copies it out, so
        no rank ever holds the whole model; expert parallelism gathers one MoE layer's experts at
        a time (`expert_parallel.gathered_layers`). `select`:
        only the tensors whose names it accepts are gathered and returned."""
        keep = (lambda name: True) if select is None else select
        if self.plan.expert is not None:
            # The weights every rank holds whole, then one MoE layer's experts at a time.
            expert_names = set(expert_stack_names(self.model))
            yield {k: v for k, v in self.model.state_dict().items() if k not in expert_names and keep(k)}
            yield from gathered_layers(self.model, self.plan.expert, keep)
        elif self.stage == 3:
            # A forward (an eval just before this save) can leave prefetched weights in flight;
            # GatheredParameters would then fail to re-partition them ("Cannot partition a
            # param in flight"). Wait for them and release every weight first.
            self.engine.empty_partition_cache()
            for prefix, piece in weight_groups(self.model):
                named = [(f"{prefix}.{k}", p) for k, p in piece.named_parameters()]
                params = [p for name, p in named if keep(name)]
                if not params and select is not None:
                    continue
                with self._deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    yield {f"{prefix}.{k}": v.detach().to("cpu", copy=True) for k, v in piece.state_dict().items()
                           if keep(f"{prefix}.{k}")}
        else:
            yield {k: v for k, v in self.model.state_dict().items() if keep(k)}

    def checkpoint_pieces(self) -> Iterator[Dict[str, torch.Tensor]]:
        """What a checkpoint's model/ holds: `full_pieces`, but under expert parallelism the
        experts stay out (each rank writes its own slice in `save_state`: nothing is gathered)."""
        if self.plan.expert is None:
            yield from self.full_pieces()
            return
        expert_names = set(expert_stack_names(self.model))
        yield from self.full_pieces(lambda name: name not in expert_names)

    def release_optimizer_state(self) -> None:
        # Adam's m and v of this rank's shard (ZeRO keeps its fp32 masters elsewhere; those stay).
        self.base_optimizer.state.clear()

    # ---- checkpoint state: every rank writes and reads its own ----

    def save_state(self, directory: Path, is_main: bool) -> None:
        """Every rank: DeepSpeed's per-rank weights + optimizer shards (resume with the same
        ranks and stage)."""
        if self.plan.expert is not None:
            self._save_expert_parallel_state(directory / DS_STATE_DIR)
            return
        # A frozen base (adapter runs) is not state: it is rebuilt from model.path on resume.
        self.engine.save_checkpoint(str(directory / DS_STATE_DIR), tag=_DS_TAG, save_latest=False,
                                    exclude_frozen_parameters=self._frozen_base)

    # Expert parallelism: DeepSpeed's own checkpoint code only knows its own MoE layer's
    # parameter names, so each rank writes its optimizer (ZeRO: its shard, fp32 masters included)
    # itself. The weights: model/ holds the ones every rank has, and the ranks of the first
    # expert-parallel group write their own slice of the experts into experts/
    # (models/expert_shards.py); a resume reads its slice from there, an export every slice.
    def _ep_state_file(self, state_dir: Path, rank: int) -> Path:
        return state_dir / f"expert_parallel_rank_{rank:05d}.pt"

    def _save_expert_parallel_state(self, state_dir: Path) -> None:
        plan = self.plan.expert
        if self.env.rank < plan.size:  # one copy of each slice: the first expert-parallel group's
            state = self.model.state_dict()
            for layer, names in enumerate(expert_stack_names_by_layer(self.model)):  # a file per layer
                save_slice({k: state[k] for k in names}, state_dir.parent / EXPERTS_DIR, plan.local_experts,
                           plan.num_experts, layer)
        state_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"optimizer": self.optimizer.state_dict(), "zero_stage": self.stage, "world_size": self.world,
                    "expert_parallel_size": self.plan.expert.size},
                   self._ep_state_file(state_dir, self.env.rank))

    def _saved_expert_parallel(self, ckpt: Path) -> Optional[Dict[str, Any]]:
        """This rank's expert-parallel state in `ckpt` (read once for check and load)."""
        if self._ep_read is None or self._ep_read[0] != ckpt:
            path = self._ep_state_file(ckpt / DS_STATE_DIR, self.env.rank)
            self._ep_read = (ckpt, safe_load(path) if path.is_file() else None)
        return self._ep_read[1]

    def check_resume(self, ckpt: Path) -> None:
        state = ckpt / DS_STATE_DIR
        if self.plan.expert is not None:
            size = self.plan.expert.size
            saved = self._saved_expert_parallel(ckpt)
            found = (saved["zero_stage"], saved["world_size"], saved["expert_parallel_size"]) if saved else None
            if found != (self.stage, self.world, size):
                what = (f"zero_stage={found[0]} on {found[1]} ranks with expert_parallel_size={found[2]}" if found
                        else "without expert parallelism" if (state / _DS_TAG).is_dir() or (ckpt / OPTIMIZER_FILE).is_file()
                        else "with fewer ranks")
                raise UserError(f"cannot resume {ckpt}: it was saved {what}; this run has zero_stage={self.stage} on "
                                f"{self.world} ranks with expert_parallel_size={size}; resume with the saved "
                                f"settings, or convert it (python -m granite_train.export {ckpt} OUT) and start a "
                                f"fresh run from OUT with model.path=OUT")
            return
        ep_files = sorted(state.glob("expert_parallel_rank_*.pt"))
        if ep_files:
            saved_ep = safe_load(ep_files[0])["expert_parallel_size"]
            raise UserError(f"cannot resume {ckpt}: it was saved with distributed.expert_parallel_size={saved_ep} "
                            f"on {len(ep_files)} ranks; resume it with those settings, or convert it (python -m "
                            f"granite_train.export {ckpt} OUT) and start a fresh run from OUT with model.path=OUT")
        if not (state / _DS_TAG).is_dir():
            raise UserError(f"cannot resume {ckpt} with distributed.zero_stage={self.stage}: it holds no "
                            f"DeepSpeed state (it was saved without DeepSpeed); resume it with "
                            f"distributed.zero_stage=null")
        saved_stage = saved_zero_stage(ckpt)
        saved_ranks = zero_saved_ranks(state / _DS_TAG)
        if saved_stage != self.stage or (self.stage > 0 and saved_ranks != self.world):
            raise UserError(f"cannot resume {ckpt}: it was saved with distributed.zero_stage={saved_stage}"
                            f"{f' on {saved_ranks} ranks' if saved_ranks else ''}, this run has zero_stage="
                            f"{self.stage} on {self.world}; DeepSpeed state resumes only with the same stage "
                            f"and number of ranks")

    def load_state(self, ckpt: Path) -> None:
        if self.plan.expert is not None:
            saved = self._saved_expert_parallel(ckpt)
            self._ep_read = None
            if self.stage == 0:
                self.optimizer.load_state_dict(saved["optimizer"])
            else:  # a ZeRO optimizer takes every rank's state and picks its own
                load_zero_optimizer_shard(self.optimizer, saved["optimizer"], self.env.rank, self.world)
            return
        state = ckpt / DS_STATE_DIR
        load_path, _ = self.engine.load_checkpoint(str(state), tag=_DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False,
                                                   load_module_strict=not self._frozen_base)
        if load_path is None:
            raise UserError(f"cannot resume {ckpt}: DeepSpeed could not load {state} (saved with another "
                            f"number of ranks or ZeRO stage?)")
