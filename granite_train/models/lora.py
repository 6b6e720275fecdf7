"""LoRA: a trainable low-rank update beside each frozen weight it targets, for every family.

    y = x W^T + scaling * dropout(x) A^T B^T,   A [r, in], B [out, r],
    scaling = alpha / r (alpha / sqrt(r) with rslora)

B starts at zero, so an adapted model starts as exactly its base; A starts as PEFT's default
(kaiming-uniform with a = sqrt(5)).

Targets, by role (`TARGET_ROLES`): `attention` (q/k/v/o_proj), `mlp` (the dense SwiGLU's
gate/up/down_proj), `shared_mlp` (input/output_linear), `mamba` (in_proj and out_proj: the
adapter is in our forward, so unlike transformers' fused path it is never skipped), `experts`
(each expert's input and output matrix) and `router`.

How it sits in the model (`attach_lora`, before anything is cut over ranks):
- a targeted `nn.Linear` becomes a `LoraLinear` (an nn.Linear whose weight and bias are the
  base's own Parameters, so the base keys stay the checkpoint's), with children `lora_A`,
  `lora_B`: state-dict keys `<module>.lora_A.weight`, `<module>.lora_B.weight`, PEFT's names.
- an expert stack (`ExpertWeight`, [E, out, in]) becomes a `LoraExpertWeight` with stacked
  factors A [E, r, in], B [E, out, r]. The MoE layer runs it on the rows it already sorted by
  expert, with the same grouped matmul as the base (`grouped_expert_matmul`): an expert's
  update is computed on its own rows only, never by a loop over experts on all tokens. The
  stacks are sliced and gathered along the expert dimension like the base (expert parallelism).

The model knows nothing of ranks or files: saving and loading in PEFT's format is
`peft_io.py`, freezing and the optimizer are the trainer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from granite_train.compat import full_numel, is_zero3_partitioned
from granite_train.models.moe import ExpertWeight, grouped_expert_matmul
from granite_train.models.param_roles import ADAPTER, copy_roles, mark

# Roles a LoRA can target, and the modules (path suffixes, ours) each role covers.
TARGET_ROLES: Dict[str, Tuple[str, ...]] = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "shared_mlp": ("shared_mlp.input_linear", "shared_mlp.output_linear"),
    "mamba": ("mamba.in_proj", "mamba.out_proj"),
    "experts": ("block_sparse_moe.input_linear", "block_sparse_moe.output_linear"),
    "router": ("block_sparse_moe.router.layer",),
}
DEFAULT_TARGETS = ("attention", "mlp", "shared_mlp", "mamba", "experts")
# Modules that can train full-rank beside the adapters (`adapter.train_modules`).
TRAIN_MODULES = {"lm_head": "lm_head", "embeddings": "model.embed_tokens"}


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how (the `adapter` config group, or a PEFT adapter_config.json)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    train_modules: Tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LowRank(nn.Module):
    """One factor, `weight` [out, in] (or a stack [E, out, in]); called, so that ZeRO-3's
    module hooks fetch it like any other layer."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        mark(self, "weight", ADAPTER)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _kaiming_a(out: int, fan_in: int, generator: Optional[torch.Generator], experts: int = 0) -> torch.Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) as PEFT draws A: U(-1/sqrt(in), 1/sqrt(in))."""
    shape = (experts, out, fan_in) if experts else (out, fan_in)
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class LoraLinear(nn.Linear):
    """`nn.Linear` plus its low-rank update (see the module doc); `weight`/`bias` are the
    adapted linear's own Parameters."""

    def __init__(self, base: nn.Linear, spec: LoraSpec, generator: Optional[torch.Generator] = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        copy_roles(base, self)
        self.lora_A = LowRank(_kaiming_a(spec.r, base.in_features, generator))
        self.lora_B = LowRank(torch.zeros(base.out_features, spec.r))
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class LoraExpertWeight(ExpertWeight):
    """An expert stack plus each expert's low-rank update: A [E, r, in], B [E, out, r]."""

    def __init__(self, base: ExpertWeight, spec: LoraSpec, generator: Optional[torch.Generator] = None,
                 held: Optional[range] = None, num_experts: Optional[int] = None) -> None:
        """`held` of `num_experts`: the experts `base` holds (expert parallelism loads a slice);
        A is drawn for all of them and sliced, so every slicing starts from the same adapters."""
        nn.Module.__init__(self)
        self.num_experts, self.in_features, self.out_features = base.num_experts, base.in_features, base.out_features
        self.weight = base.weight
        copy_roles(base, self)
        held = held if held is not None else range(base.num_experts)
        A = _kaiming_a(spec.r, base.in_features, generator, experts=num_experts or base.num_experts)
        self.lora_A = LowRank(A[held.start:held.stop].clone())
        self.lora_B = LowRank(torch.zeros(len(held), base.out_features, spec.r))
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling

    def forward(self, x_MC: torch.Tensor, counts_E: torch.Tensor, sizes: Optional[list]) -> torch.Tensor:
        base_MO = grouped_expert_matmul(x_MC, self.weight, counts_E, sizes)
        A, B = self.lora_A.weight, self.lora_B.weight
        if sizes is None:  # the grouped-GEMM path (CUDA, bf16): one dtype, as autocast would cast
            A, B = A.to(x_MC.dtype), B.to(x_MC.dtype)
            if not _grouped_mm_fits(A.shape[-2]):
                sizes = counts_E.tolist()  # grouped GEMM wants 16-byte rows: a rank that is no multiple of 8 loops
        h_MR = grouped_expert_matmul(self.lora_dropout(x_MC), A, counts_E, sizes)
        return base_MO + grouped_expert_matmul(h_MR, B, counts_E, sizes) * self.scaling

    def stacks(self) -> List[nn.Parameter]:
        return [self.weight, self.lora_A.weight, self.lora_B.weight]


def _grouped_mm_fits(r: int) -> bool:
    return r % 8 == 0


def _targets_of(spec: LoraSpec) -> Tuple[str, ...]:
    unknown = [t for t in spec.targets if t not in TARGET_ROLES]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; targets are {', '.join(TARGET_ROLES)}")
    return tuple(s for t in spec.targets for s in TARGET_ROLES[t])


def role_of_module(path: str) -> Optional[str]:
    """The target role of the module at `path` (ours), or None."""
    for role, suffixes in TARGET_ROLES.items():
        if path.endswith(suffixes):
            return role
    return None


def attach_lora(model: nn.Module, spec: LoraSpec, seed: int = 0, paths: Optional[Sequence[str]] = None
                ) -> Dict[str, int]:
    """Put LoRA on every module of `spec.targets` in `model` (in place, in module order, A drawn
    from a generator seeded with `seed`: the same adapters on every rank and for any sharding);
    `paths`: only these modules (an adapter read from a file that targets a subset).
    Returns how many modules each role got. Does not freeze anything (`freeze_base`)."""
    if spec.r <= 0:
        raise ValueError(f"LoRA rank r={spec.r} must be > 0")
    suffixes = _targets_of(spec)
    generator = torch.Generator().manual_seed(seed)
    counts: Dict[str, int] = {t: 0 for t in spec.targets}
    for path, module in list(model.named_modules()):
        if not path.endswith(suffixes) or isinstance(module, (LoraLinear, LoraExpertWeight)):
            continue
        if paths is not None and path not in paths:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        device = module.weight.device
        if isinstance(module, ExpertWeight):
            adapted: nn.Module = LoraExpertWeight(module, spec, generator, held=getattr(parent, "held_experts", None),
                                                  num_experts=getattr(parent, "num_experts", None))
        elif isinstance(module, nn.Linear):
            adapted = LoraLinear(module, spec, generator)
        else:
            raise TypeError(f"{path} is a {type(module).__name__}, not a linear map LoRA can adapt")
        for factor in (adapted.lora_A, adapted.lora_B):  # next to the weight (not on a meta or ZeRO stub)
            if device.type != "meta" and not is_zero3_partitioned(module.weight):
                factor.to(device)
        adapted.train(module.training)  # an eval-mode model stays in eval mode (no dropout)
        setattr(parent, name, adapted)
        counts[role_of_module(path)] += 1
    return counts


def adapted_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    for path, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraExpertWeight)):
            yield path, module


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """`<module>.lora_{A,B}.weight` -> tensor (ours: experts stacked [E, ...])."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def train_module_paths(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Module paths of `adapter.train_modules` (lm_head, embeddings)."""
    unknown = [n for n in names if n not in TRAIN_MODULES]
    if unknown:
        raise ValueError(f"unknown adapter.train_modules {unknown}; choose from {', '.join(TRAIN_MODULES)}")
    return [TRAIN_MODULES[n] for n in names]


def freeze_base(model: nn.Module, train_modules: Sequence[str] = ()) -> int:
    """Only the adapters (and the full-rank `train_modules`) keep requires_grad; returns the
    number of trainable parameters (a tied weight once)."""
    train = {id(p) for path in train_module_paths(model, train_modules)
             for p in model.get_submodule(path).parameters()}
    trainable, seen = 0, set()
    for name, p in model.named_parameters():
        keep = is_adapter_key(name) or id(p) in train
        p.requires_grad_(keep)
        if keep and id(p) not in seen:
            seen.add(id(p))
            trainable += full_numel(p)  # a ZeRO-3 partition's full size
    return trainable


def training_matmul_params(model: nn.Module, base_active: int) -> int:
    """The matmul parameters a token trains through, weighted by their share of the 6 FLOPs
    per weight of full training (what MFU counts: 6 x this): a frozen weight costs its forward
    and its input's gradient (4 of 6), a trainable one also its own gradient. `base_active`:
    the base model's active matmul parameters (`full_size`); adapters of experts count at the
    active share (top-k of E), as the experts do. Call before anything is cut over ranks."""
    c = model.config
    share = c.num_experts_per_tok / c.num_local_experts if c.num_local_experts else 1.0
    adapters = sum(p.numel() * (share if isinstance(m, LoraExpertWeight) else 1.0)
                   for _, m in adapted_modules(model) for p in (m.lora_A.weight, m.lora_B.weight))
    lm_head = c.vocab_size * c.hidden_size if model.lm_head.weight.requires_grad else 0
    return round(base_active * 2 / 3 + lm_head / 3 + adapters)


def delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B @ A in fp32: [out, in], or [E, out, in] for expert stacks."""
    return (B.float() @ A.float()) * scaling


def merged_state(base: Dict[str, torch.Tensor], adapters: Dict[str, torch.Tensor], scaling: float
                 ) -> Dict[str, torch.Tensor]:
    """`base` (a piece of the base model's state dict, full names) with every adapter in
    `adapters` (full names) whose module is in it folded into its weight, in the weight's dtype."""
    out = dict(base)
    for key in adapters:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        w_key = f"{module}.weight"
        if w_key in out:
            w = out[w_key]
            out[w_key] = (w.float() + delta(adapters[key], adapters[f"{module}.lora_B.weight"], scaling)).to(w.dtype)
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put the plain modules back (in place)."""
    for path, module in list(adapted_modules(model)):
        w = module.weight
        w.copy_((w.float() + delta(module.lora_A.weight, module.lora_B.weight, module.scaling)).to(w.dtype))
        parent_path, _, name = path.rpartition(".")
        with torch.device("meta"):  # the plain module, then the adapted one's Parameters in it
            if isinstance(module, LoraExpertWeight):
                plain: nn.Module = ExpertWeight(module.num_experts, module.in_features, module.out_features)
            else:
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                plain.bias = module.bias
        plain.weight = module.weight
        copy_roles(module, plain)
        setattr(model.get_submodule(parent_path), name, plain)
    return model


__all__ = ["LoraSpec", "LoraLinear", "LoraExpertWeight", "TARGET_ROLES", "DEFAULT_TARGETS", "TRAIN_MODULES",
           "attach_lora", "adapted_modules", "adapter_state", "freeze_base", "merge_lora", "merged_state",
           "is_adapter_key", "role_of_module"]
