"""The adapter: every torch and DeepSpeed name we rely on that is not their public API.

Nothing else in granite_train touches a private (`_name`) attribute of torch, DeepSpeed or
another library, or leans on an undocumented behaviour of theirs; each such dependency is
written here once, with why no public API does the job. `tests/test_compat.py` exercises every
one of them, so an upgrade that moves one fails there, loudly and by name, instead of deep
inside a run. (Where a public API does the job, the code uses it instead: tokenizers' BPE
pipeline is built from its public parts in `data/tokenizer.py`, prepared shards are mapped with
Python's `mmap` in `data/shards.py`, and numpy's array pickles are allowed through numpy's
own `__reduce__` in `serialization.py`.)

torch:
- `grouped_mm`: `torch.nn.functional.grouped_mm` (public since torch 2.9); older builds that
  have the kernel only as `torch._grouped_mm` use that.
- `varlen_causal_attention`: torch's own flash-attention varlen kernels
  (`torch.nn.attention.varlen.varlen_attn`, CUDA only, public since torch 2.9) whose keywords
  moved between releases: causal is `is_causal=True` up to 2.10 and `window_size=(-1, 0)` after,
  `enable_gqa` and `scale` are not in every release. The signature is read once and the call
  adapted (KV heads repeated where there is no `enable_gqa`, q pre-scaled where no `scale`).
- `cpu_has_native_bf16`: whether this CPU has native bf16 matmuls (AVX512-BF16 / AMX). torch
  exposes it only as `torch.ops.mkldnn._is_mkldnn_bf16_supported`.
- `parameter_slots`: the parameters a module registered itself, by name, including the ones
  registered as None (an absent bias: `nn.Linear(bias=False)` registers `bias = None`).
  Parameter roles are declared per registered name (`models/param_roles.py`); the public
  views leave those None slots out (`named_parameters(recurse=False)`) or raise on them
  (`get_parameter`), so this is a read-only view of `module._parameters`.

DeepSpeed (imported only for `distributed.zero_stage` runs; `DS_ACCELERATOR` must be chosen
before the first import, which `import_deepspeed` does):
- Expert parallelism. DeepSpeed reduces expert gradients over the expert-data-parallel group
  and partitions their ZeRO 1/2 optimizer state over it only when its engine finds one of its
  own `deepspeed.moe.layer.MoE` modules in the model, and it knows a parameter is an expert's
  by the attributes `allreduce = False` and `group_name` (`deepspeed.moe.utils.is_moe_param`).
  `ExpertGroups` builds one real `deepspeed.moe.layer.MoE` through its public constructor, as a
  marker that never runs (a gate of `num_experts` frozen weights, no experts), and creates the
  groups with its public `set_deepspeed_parallelism()`; the engine's module carries the marker
  (`parallel/deepspeed_engine.py`). `tag_expert_params` writes DeepSpeed's two attributes; our
  own code never reads them back (the expert plan says which parameters are experts').
- ZeRO-0 clipping and skipping. At ZeRO-0 DeepSpeed hands a client optimizer the full, reduced
  gradients and afterwards reads the optimizer's `_global_grad_norm` (for
  `engine.get_global_grad_norm()`) and `overflow` (to skip and count the step). `GuardedAdamW`
  is an AdamW that sets both: clipping by our fp64 global norm, skipping non-finite steps.
- Checkpoint files: ZeRO writes one `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` per rank;
  counting them is how a checkpoint says how many ranks saved it.
- Safe loading of DeepSpeed's checkpoint files: its loader unpickles them with
  `weights_only=False` (`TorchCheckpointEngine.load`), i.e. runs whatever code a file names.
  `use_safe_checkpoint_loads(engine)` swaps the engine's public `checkpoint_engine` for one
  whose `load` is `serialization.safe_load`, and `deepspeed_checkpoint_classes()` names the
  three plain-data DeepSpeed classes its ZeRO optimizer files hold (`ZeroStageEnum`,
  `LossScaler`, `fragment_address`: no `__reduce__`/`__setstate__`, so unpickling them sets
  attributes and runs nothing), which the safe loader allows.
- `zero_settings`: the buffer sizes DeepSpeed will use (its defaults filled in), for the start-up
  log line; read from its pydantic `DeepSpeedZeroConfig` (deepspeed.runtime.zero.config), whose
  field names drop the `stage3_` of the JSON keys.
- ZeRO-3 parameters: a partitioned weight holds only its shard (`.data` is empty); DeepSpeed
  marks it with attributes, `ds_id` (it is partitioned: DeepSpeed's own test,
  `deepspeed.runtime.zero.utils.is_zero_param`), `ds_shape` and `ds_numel` (the whole
  weight's). `is_zero3_partitioned`, `full_shape` and `full_numel` read them without
  importing DeepSpeed (optional, seconds to import), so model code can ask of any weight.
- Per-rank ZeRO optimizer state: a ZeRO 1/2 optimizer's `load_state_dict` takes a list of
  every rank's state dicts (`state_dict_list`, indexed by data-parallel rank) and flags, not
  torch's one dict; `load_zero_optimizer_shard` hands it this rank's.
- `ZeroCheckpointNames`: the file names of a DeepSpeed checkpoint folder and the keys inside its
  files, which `parallel/zero_checkpoint.py` reads offline. DeepSpeed defines most keys in
  `deepspeed.checkpoint.constants` (same names here); `module`, `dp_world_size` and
  `shared_params` are literals of its engine's `_common_checkpoint_state` (its own
  `zero_to_fp32.py` reads them so). Written out rather than imported: reading a checkpoint
  must not pay DeepSpeed's import (seconds, an accelerator probe); the test compares them.
- `import_deepspeed` silences torch's FutureWarning about the deprecated collectives DeepSpeed
  still calls (`all_gather_into_tensor`, `reduce_scatter_tensor`): one per rank per run, about
  DeepSpeed's code, nothing a user can act on.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import warnings
from types import MappingProxyType
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from granite_train.errors import UserError

# ---------------------------------------------------------------- torch


def grouped_mm_kernel() -> Optional[Callable[..., torch.Tensor]]:
    """`(x [M, C], w [E, C, O], offs [E] int32) -> [M, O]`, or None when this torch has no
    grouped GEMM."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm
    return getattr(torch, "_grouped_mm", None)


def varlen_attention_kernel() -> Optional[Callable[..., torch.Tensor]]:
    """torch's `varlen_attn`, or None when this torch has none (< 2.9). Imported on use only:
    the module pulls in torch's attention machinery, which a CPU run never needs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=4)
def _keywords(fn: Callable[..., Any]) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def varlen_causal_attention(q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor,
                            cu_seq_q: torch.Tensor, cu_seq_k: torch.Tensor, max_q: int, max_k: int,
                            scale: float) -> torch.Tensor:
    """Causal attention per segment of a packed row through torch's varlen kernel: segment i's
    queries `cu_seq_q[i]:cu_seq_q[i+1]` attend to its keys `cu_seq_k[i]:cu_seq_k[i+1]`, the mask
    aligned at the last query and key (bottom right, as flash-attention's). GQA when K < H."""
    fn = varlen_attention_kernel()
    if fn is None:
        raise UserError(f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.9); "
                        "use model.attn_backend=auto")
    names = _keywords(fn)
    kw: Dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True}
    if k_TKD.shape[1] != q_THD.shape[1]:
        if "enable_gqa" in names:
            kw["enable_gqa"] = True
        else:
            group = q_THD.shape[1] // k_TKD.shape[1]
            k_TKD, v_TKD = k_TKD.repeat_interleave(group, dim=1), v_TKD.repeat_interleave(group, dim=1)
    if "scale" in names:
        kw["scale"] = scale
    else:  # the kernel's own scale is 1/sqrt(D)
        q_THD = q_THD * (scale * math.sqrt(q_THD.shape[-1]))
    return fn(q_THD, k_TKD, v_TKD, cu_seq_q, cu_seq_k, max_q, max_k, **kw)


def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def parameter_slots(module: nn.Module) -> Mapping[str, Optional[nn.Parameter]]:
    """name -> Parameter (or None: registered as absent) of the parameters `module` registered
    itself (not its children's); a live, read-only view."""
    return MappingProxyType(module._parameters)


# ---------------------------------------------------------------- DeepSpeed


def import_deepspeed(device: torch.device):
    """DeepSpeed, with its CPU accelerator chosen on CPU runs (it picks one at first import)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # optional at run time: only distributed.zero_stage runs need it
    except ImportError as e:
        raise UserError(f"distributed.zero_stage needs DeepSpeed ({e}); pip install deepspeed, or set "
                        f"distributed.zero_stage=null") from None
    check_deepspeed_version(deepspeed.__version__)
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    return deepspeed


# The first release whose engine honours `managed_gradient_accumulation` (one gradient
# reduction per optimizer step) for ZeRO 0-3 and optimizer offload: 0.19.4 added the key but
# refused it with offload, and earlier releases ignore the key silently (pyproject.toml's bound).
MIN_DEEPSPEED = "0.19.5"


def check_deepspeed_version(version: str) -> None:
    """Refuse, in one line, a DeepSpeed that would train differently without saying so."""
    from packaging.version import Version

    if Version(version) < Version(MIN_DEEPSPEED):
        raise UserError(f"DeepSpeed {version} is too old: granite_train needs deepspeed>={MIN_DEEPSPEED} "
                        f"(older releases ignore managed_gradient_accumulation and reduce gradients every "
                        f"micro-batch); pip install 'deepspeed>={MIN_DEEPSPEED}'")


def is_zero3_partitioned(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 has partitioned `p` (its `.data` is then a placeholder)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole weight, also when ZeRO-3 has sharded it."""
    return int(getattr(p, "ds_numel", p.numel()))


def full_shape(p: torch.Tensor) -> Tuple[int, ...]:
    """Shape of the whole weight, also when ZeRO-3 has sharded it."""
    return tuple(getattr(p, "ds_shape", p.shape))


def load_zero_optimizer_shard(optimizer: Any, state: Dict[str, Any], rank: int, world: int) -> None:
    """Load this rank's saved state (its own `optimizer.state_dict()`) into DeepSpeed ZeRO 1/2
    optimizer `optimizer`; fp32 master weights come from the state too."""
    states: List[Optional[Dict[str, Any]]] = [None] * world
    states[rank] = state
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


class ZeroCheckpointNames:
    """Names in a DeepSpeed checkpoint folder (`save_checkpoint(dir, tag)` writes `dir/tag/`)."""

    # Files. ZeRO 0-2: the whole module state; ZeRO-3: per rank, names, shapes and frozen shards.
    REPLICATED_MODEL = "mp_rank_00_model_states.pt"
    ZERO3_MODEL = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
    # Rank r's optimizer shard (fp32 masters); `bf16_zero_pp_rank_...` when DeepSpeed trains in bf16.
    ZERO_OPTIM = "*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    # Keys of deepspeed.checkpoint.constants (same names).
    OPTIMIZER_STATE_DICT = "optimizer_state_dict"
    FP32_FLAT_GROUPS = "fp32_flat_groups"
    PARAM_SHAPES = "param_shapes"
    FROZEN_PARAM_SHAPES = "frozen_param_shapes"
    FROZEN_PARAM_FRAGMENTS = "frozen_param_fragments"
    # Keys its engine writes as literals.
    MODULE = "module"
    DP_WORLD_SIZE = "dp_world_size"
    SHARED_PARAMS = "shared_params"


def zero_settings(zero: Dict[str, Any]) -> Dict[str, Any]:
    """The effective ZeRO bucket sizes (elements) of a `zero_optimization` section."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    full = DeepSpeedZeroConfig(**zero).model_dump()
    keys = ["reduce_bucket_size"] + (["prefetch_bucket_size", "max_live_parameters", "param_persistence_threshold",
                                      "sub_group_size"]
                                     if int(zero["stage"]) == 3 else ["allgather_bucket_size"])
    return {k: int(full[k]) for k in keys}


def deepspeed_moe_marker(device: torch.device, num_experts: int, size: int) -> nn.Module:
    """A `deepspeed.moe.layer.MoE` that never runs: in the module handed to
    `deepspeed.initialize` it makes the engine treat the model's expert weights as experts (see
    the module doc). No experts, a gate of `num_experts` frozen weights."""
    deepspeed = import_deepspeed(device)
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the existing group
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    marker = DeepSpeedMoE(hidden_size=1, expert=nn.Identity(), num_experts=num_experts, ep_size=size, k=1)
    marker.requires_grad_(False)  # DeepSpeed's gradient reduction skips frozen weights
    return marker


class ExpertGroups:
    """DeepSpeed's expert-parallel process groups for `size` ranks per group ("ep_size_<size>":
    ranks [0..size-1], [size..2*size-1], ... split the experts; ranks at the same place in their
    groups hold the same experts), made by DeepSpeed's own MoE layer. Every rank constructs it
    (creating groups is a collective); the process group must exist."""

    def __init__(self, device: torch.device, num_experts: int, size: int) -> None:
        marker = deepspeed_moe_marker(device, num_experts, size)
        marker.set_deepspeed_parallelism()  # creates the groups unless they exist
        self.name: str = marker.expert_group_name
        self.group: Any = marker.deepspeed_moe.ep_group
        self.rank: int = dist.get_rank(group=self.group)


def tag_expert_params(params: Iterable[nn.Parameter], group_name: str) -> None:
    """Mark `params` as DeepSpeed expert weights of group `group_name` (see the module doc)."""
    for p in params:
        p.allreduce = False
        p.group_name = group_name


def zero_saved_ranks(state_dir) -> int:
    """How many ranks wrote ZeRO optimizer shards into DeepSpeed checkpoint folder `state_dir`
    (`zero_pp_rank_*`, and `bf16_zero_pp_rank_*` when DeepSpeed trains in bf16)."""
    return len(list(state_dir.glob("*zero_pp_rank_*_optim_states.pt")))


class GuardedAdamW(torch.optim.AdamW):
    """AdamW for DeepSpeed ZeRO-0 (full, already reduced gradients): clip by the global fp64
    norm (like `clip_grad_norm_`), skip a non-finite step, and leave the norm and
    the skip where DeepSpeed's engine reads them (`_global_grad_norm`, `overflow`).
    `clip_grads(params)` clips the gradients in place and returns their global norm
    (`parallel.grad_norm.clip_by_global_norm`, with the expert plan bound)."""

    def __init__(self, params, *, clip_grads: Callable[[Sequence[nn.Parameter]], float],
                 **adamw_kwargs: Any) -> None:
        super().__init__(params, **adamw_kwargs)
        self._clip_grads = clip_grads
        self.force_skip = False  # set by the engine when the step's loss is not finite
        self._global_grad_norm = 0.0
        self.overflow = False

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._global_grad_norm = self._clip_grads(params)
        self.overflow = self.force_skip or not math.isfinite(self._global_grad_norm)
        if not self.overflow:
            super().step(closure)


def deepspeed_checkpoint_classes() -> list:
    """The DeepSpeed classes its ZeRO optimizer checkpoints hold (see the module doc); empty
    unless DeepSpeed is loaded (only DeepSpeed runs read DeepSpeed's files)."""
    if "deepspeed" not in sys.modules:
        return []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, fragment_address]


def use_safe_checkpoint_loads(engine: Any, safe_load: Callable[..., Any]) -> None:
    """Make DeepSpeed engine `engine` read its checkpoint files with `safe_load(path,
    map_location=...)` instead of an unrestricted `torch.load`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise UserError(f"DeepSpeed uses the {type(engine.checkpoint_engine).__name__} checkpoint engine, which "
                        f"granite-train cannot make load safely; remove checkpoint engine settings from "
                        f"distributed.deepspeed_config")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(engine.checkpoint_engine.__dict__)  # same settings, safe load
    engine.checkpoint_engine = safe
