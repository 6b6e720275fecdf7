"""Optimizer construction: one AdamW param group per parameter role.

Roles are declared where parameters are created (`granite_train.models.param_roles`). Each group
carries `role`, its `weight_decay` (0 for `optim.no_decay_roles`: norms, biases, Mamba's
A_log/D/dt_bias by default) and `lr_scale`: 1.0, or 1 / m_width for hidden matrices under muP
(`optim.mup=true`). The training loop sets `group["lr"] = schedule_lr * group["lr_scale"]` every step.
It sits below parallel/ and train/: `parallelize` builds the optimizer once the model is cut.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type

import torch

from granite_train.config import OptimConfig
from granite_train.models.param_roles import (DEFAULT_NO_DECAY_ROLES, MUP_SCALED_ROLES, ROLES,
                                              mup_width_multiplier, named_param_roles)

log = logging.getLogger("granite_train.train")  # lines about the run: the trainer's name


def param_groups(model: torch.nn.Module, weight_decay: float, mup_width: Optional[float] = None,
                 no_decay_roles: Sequence[str] = DEFAULT_NO_DECAY_ROLES,
                 expert_groups: Optional[Mapping[int, str]] = None) -> List[dict]:
    """Param groups by role (empty roles left out; every trainable parameter in exactly one group).
    `mup_width`: muP's m_width (None: standard parametrisation, every lr_scale 1.0).

    `expert_groups`: id(parameter) -> expert-parallel group name (`ExpertParallelPlan.
    optimizer_groups`); those weights get groups of their own, marked `moe: True` and named after
    their group, as DeepSpeed's MoE support wants."""
    by_key: Dict[tuple, List[torch.nn.Parameter]] = {}
    for _, p, role in named_param_roles(model):
        if p.requires_grad:
            by_key.setdefault((role, (expert_groups or {}).get(id(p))), []).append(p)
    groups = []
    # A fixed order (role, then shared before expert-parallel): optimizer state lines up on resume.
    for role, expert_group in sorted(by_key, key=lambda k: (ROLES.index(k[0]), k[1] is not None, k[1] or "")):
        scale = 1.0 / mup_width if (mup_width and role in MUP_SCALED_ROLES) else 1.0
        group = {"params": by_key[(role, expert_group)], "role": role, "lr_scale": scale,
                 "weight_decay": 0.0 if role in no_decay_roles else weight_decay}
        if expert_group is not None:
            group.update(moe=True, name=expert_group)
        groups.append(group)
    return groups


def model_mup_width(model: torch.nn.Module, cfg: OptimConfig) -> Optional[float]:
    """The m_width the optimizer scales by: the model's (set by `model.apply_mup`) when
    `cfg.mup`, else None. muP on without `apply_mup` is a wiring bug, not a user error."""
    if not cfg.mup:
        return None
    m = getattr(model, "mup_width", None)
    if m is None:
        raise RuntimeError("optim.mup=true but the model has no muP width: call model.apply_mup(m_width) "
                           "(granite_train.optim.mup_width_for) before build_optimizer")
    return m


def mup_width_for(model: torch.nn.Module, mup_base_width: Optional[int]) -> float:
    """m_width of `model`: hidden_size / model.mup_base_width, else its logits_scaling (UserError
    if neither gives one). Works for checkpoints too (their sizes are known only here)."""
    c = model.config
    m = mup_width_multiplier(c, mup_base_width)
    if mup_base_width is not None and c.logits_scaling != m:
        log.warning(
            "muP: m_width=%g (hidden_size %d / model.mup_base_width %d) but logits_scaling=%g: the "
            "logits get 1/%g, not muP's 1/m_width; set model.arch.logits_scaling=%g for the full muP",
            m, c.hidden_size, mup_base_width, c.logits_scaling, c.logits_scaling, m)
    return m


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, expert_groups: Optional[Mapping[int, str]] = None,
                    cls: Type[torch.optim.AdamW] = torch.optim.AdamW, **cls_kwargs: Any) -> torch.optim.Optimizer:
    """AdamW (or the subclass `cls`, given `cls_kwargs`) over `param_groups`, fused: one kernel
    per step on CPU and CUDA, with no temporaries (the unfused step allocates two the size of
    each tensor it updates: under DeepSpeed ZeRO 1-2 that tensor is a rank's whole flat fp32
    partition, 2 x 1.65 GB for a 828M model on 2 ranks)."""
    groups = param_groups(model, cfg.weight_decay, model_mup_width(model, cfg), cfg.no_decay_roles, expert_groups)
    for group in groups:  # the trainer sets lr = schedule lr * lr_scale every step; this is step 0's
        group["lr"] = cfg.lr * group["lr_scale"]
    if "foreach" not in cls_kwargs:
        cls_kwargs.setdefault("fused", all(p.device.type in ("cpu", "cuda") for p in model.parameters()))
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **cls_kwargs)
