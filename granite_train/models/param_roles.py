"""Parameter roles, declared where parameters are created (never guessed from names or shapes).

Every module that creates a parameter declares what it is with `mark(module, name, role)`.
The optimizer (weight decay, muP learning-rate scale) and the muP init read the roles back with
`named_param_roles(model)`. Roles:

| role        | what                                          | muP lr        | muP init std              | decay (default) |
|-------------|-----------------------------------------------|---------------|---------------------------|-----------------|
| `hidden`    | matrices whose fan-in grows with width: q/k/v/o, MLP, experts, router, shared MLP, Mamba in/out_proj | lr / m_width | initializer_range / sqrt(m_width) | yes |
| `embedding` | `embed_tokens` (and a tied `lm_head`)         | lr            | initializer_range         | yes             |
| `output`    | an untied `lm_head`                           | lr            | initializer_range         | yes             |
| `conv`      | Mamba depthwise `conv1d.weight` [C, 1, K]     | lr            | PyTorch's conv default    | yes             |
| `norm`      | RMSNorm / gated RMSNorm gains                 | lr            | ones                      | no              |
| `bias`      | every bias                                    | lr            | zeros (conv bias: default)| no              |
| `ssm`       | Mamba `A_log`, `D`, `dt_bias` (per head)      | lr            | transformers' init        | no              |
| `adapter`   | LoRA factors `lora_A` / `lora_B` (`lora.py`)  | (muP is off with adapters) | PEFT's: A kaiming-uniform, B zeros | yes |

Why (Yang et al. 2022, "Tensor Programs V", Table 8, Adam): a matrix whose fan-in grows with
width gets lr 1/fan_in and init variance 1/fan_in, i.e. lr / m_width and std / sqrt(m_width)
relative to the base model. Input-like weights (embeddings) and vectors keep the base lr and init.
The depthwise conv has a fixed fan-in (the kernel size K), so each channel is a small vector:
nothing about it changes with width, so it keeps the base lr. The output layer in muP wants lr
1/fan_in and init variance 1/fan_in^2; Granite instead divides the logits by `logits_scaling`
(= m_width) in the forward, which for Adam (invariant to the gradient's scale) is the same thing
with the base lr and the base init std: W_eff = W / m_width has init std initializer_range /
m_width and updates of lr / m_width. So `output` keeps the base lr and init, and muP needs
`logits_scaling = m_width` in the model config (Granite's configs have it).

The roles are kept in the owning module's `_granite_param_roles` dict (which survives
`load_state_dict(assign=True)` and tensor swaps that replace the Parameter object) and as a
`_granite_role` attribute on the Parameter itself (`role_of`).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from granite_train.compat import parameter_slots
from granite_train.errors import UserError

HIDDEN = "hidden"
EMBEDDING = "embedding"
OUTPUT = "output"
CONV = "conv"
NORM = "norm"
BIAS = "bias"
SSM = "ssm"
ADAPTER = "adapter"
ROLES = (HIDDEN, EMBEDDING, OUTPUT, CONV, NORM, BIAS, SSM, ADAPTER)
# Roles whose lr and init std muP scales with the width multiplier.
MUP_SCALED_ROLES = (HIDDEN,)
# Default `optim.no_decay_roles`: decaying gains, biases and the SSM's per-head scalars only
# shrinks scales (and equals the old "no decay on 1-D parameters" rule).
DEFAULT_NO_DECAY_ROLES = (NORM, BIAS, SSM)

_ROLES_ATTR = "_granite_param_roles"
_PARAM_ATTR = "_granite_role"


def mark(module: nn.Module, name: str, role: str) -> None:
    """Declare that parameter `module.<name>` has `role`. A missing (None) parameter, e.g. an
    absent bias, is skipped."""
    if role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r} (one of {', '.join(ROLES)})")
    slots = parameter_slots(module)
    if name not in slots:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r}")
    roles = module.__dict__.setdefault(_ROLES_ATTR, {})
    roles[name] = role
    param = slots[name]
    if param is not None:
        setattr(param, _PARAM_ATTR, role)


def restamp(model: nn.Module) -> None:
    """Put every declared role back on the Parameter objects under `model` (after `to_empty`,
    which replaces them)."""
    for module in model.modules():
        for name, role in module.__dict__.get(_ROLES_ATTR, {}).items():
            param = parameter_slots(module).get(name)
            if param is not None:
                setattr(param, _PARAM_ATTR, role)


def copy_roles(src: nn.Module, dst: nn.Module) -> None:
    """Give `dst` the roles `src` declared (a module that takes over `src`'s Parameters)."""
    dst.__dict__[_ROLES_ATTR] = dict(src.__dict__.get(_ROLES_ATTR, {}))


def mark_linear(linear: nn.Module, role: str) -> None:
    """`weight` gets `role`, `bias` (if any) gets `bias`."""
    mark(linear, "weight", role)
    if getattr(linear, "bias", None) is not None:
        mark(linear, "bias", BIAS)


def role_of(param: torch.Tensor) -> Optional[str]:
    """The role declared for this Parameter object (None: not declared, or the object was
    replaced since; `named_param_roles` still knows it through the module)."""
    return getattr(param, _PARAM_ATTR, None)


def declared_role(module: nn.Module, name: str) -> Optional[str]:
    return module.__dict__.get(_ROLES_ATTR, {}).get(name)


def named_param_roles(model: nn.Module, strict: bool = True) -> Iterator[Tuple[str, nn.Parameter, str]]:
    """(qualified name, parameter, role) for every unique parameter (a tied weight once, under its
    first name, as `named_parameters` does). `strict`: a parameter without a declared role is an
    error (no defaults: a new module must declare its parameters)."""
    seen = set()
    for mod_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            role = declared_role(module, name) or role_of(param)
            full = f"{mod_name}.{name}" if mod_name else name
            if role is None:
                if strict:
                    raise ValueError(f"parameter {full} ({type(module).__name__}.{name}) has no declared "
                                     "role; call granite_train.models.param_roles.mark in its constructor")
                continue
            yield full, param, role


def mup_width_multiplier(arch, base_width: Optional[int]) -> float:
    """m_width for muP: hidden_size / base_width when `base_width` is set, else the model's
    `logits_scaling` (Granite's name for m_width). One-line UserError when it cannot be had."""
    if base_width is not None:
        if base_width <= 0:
            raise UserError(f"model.mup_base_width={base_width} must be a positive width")
        if base_width > arch.hidden_size or arch.hidden_size % base_width:
            raise UserError(f"model.mup_base_width={base_width} must divide hidden_size={arch.hidden_size} "
                            "and be at most it (m_width = hidden_size / mup_base_width >= 1)")
        return arch.hidden_size / base_width
    m = float(arch.logits_scaling)
    if m == 1.0:
        raise UserError("optim.mup=true needs a width multiplier, but logits_scaling is 1.0 and "
                        "model.mup_base_width is null; set model.mup_base_width=<width of the tuned base "
                        "model> (and logits_scaling to hidden_size / it)")
    if not m > 0 or not math.isfinite(m):
        raise UserError(f"optim.mup=true needs logits_scaling > 0 as m_width (got {arch.logits_scaling})")
    return m
