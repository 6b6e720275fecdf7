"""`parallelize(model, cfg, env)`: the one place that decides how the model is cut over ranks.

The model arrives whole (its final weights: loaded, resumed, muP-initialised) and knows
nothing of ranks; what comes back is the `Engine` the trainer steps, with the `ParallelPlan`
saying what was done. The order is fixed here, one step each:

1. FLOPs: count the matmul weights on the full model, before anything is cut (MFU).
2. Expert parallelism: each MoE layer keeps its rank's experts and gets an all-to-all
   dispatcher (`expert_parallel.py`).
3. Context parallelism: groups of ranks that share each packed row (`context_parallel.py`);
   the model is not changed, each forward gets its slice's shard (the step slices the rows).
4. Activation checkpointing: decoder layers recompute their forward in backward.
5. torch.compile of the modules where it is exact (`models/compile.py`), on the final
   (already cut) modules.
6. The optimizer over the parameters this rank holds, grouped by role and expert group.
7. Data parallel: the plain engine, or DeepSpeed ZeRO (`deepspeed_engine.py`), last, because it
   takes the optimizer and (ZeRO-3) shards what the steps above produced.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from typing import Dict

import torch
from torch import nn

from granite_train.compat import GuardedAdamW
from granite_train.config import RunConfig
from granite_train.errors import UserError
from granite_train.models.compile import compile_model
from granite_train.models.lora import training_matmul_params
from granite_train.models.model import full_size
from granite_train.optim import build_optimizer
from granite_train.parallel.context_parallel import apply_context_parallel
from granite_train.parallel.deepspeed_engine import DeepSpeedEngine
from granite_train.parallel.engine import Engine, PlainEngine
from granite_train.parallel.env import Env
from granite_train.parallel.expert_parallel import apply_expert_parallel
from granite_train.parallel.grad_norm import clip_by_global_norm
from granite_train.parallel.plan import ParallelPlan

log = logging.getLogger("granite_train.parallel")


def _compile(model: nn.Module, env: Env) -> Dict[str, int]:
    if env.device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise UserError("trainer.compile=true on CPU needs a C++ compiler (torch inductor builds C++ kernels) "
                        "and none was found (g++, c++, clang++ or $CXX); install one or set trainer.compile=false")
    counts = compile_model(model)
    if env.is_main:
        log.info("torch.compile (trainer.compile=true, dynamic shapes, compiles at the first step): %s; "
                 "attention, MoE dispatch and the Mamba scan stay eager",
                 ", ".join(f"{n} x{k}" for n, k in counts.items()) or "nothing to compile")
    return counts


def _check(cfg: RunConfig, env: Env) -> None:
    """What only the resolved precision can tell (the config checks the rest)."""
    d = cfg.distributed
    if d.zero_stage == 0 and env.autocast_dtype == torch.bfloat16:
        # DeepSpeed's ZeRO-0 bf16 optimizer (BF16_Optimizer) hands ours fp32 copies of the
        # weights (an expert-parallel norm could not tell the experts apart), and on the same
        # data its updates differ from ZeRO 1-3's (step-2 loss 5e-4 off where those agree with
        # fp32 to 2e-6).
        raise UserError("distributed.zero_stage=0 does not train in bf16 (DeepSpeed's ZeRO-0 bf16 optimizer does not "
                        "give ZeRO 1-3's updates); use distributed.zero_stage=1 or 2 (bf16 weights, fp32 master "
                        "weights sharded), or trainer.dtype=fp32")


def parallelize(model: nn.Module, cfg: RunConfig, env: Env) -> Engine:
    """Cut `model` over this job's ranks (see the module doc); every rank calls it."""
    _check(cfg, env)
    # 1. FLOPs of the full model (counted on a meta copy: a ZeRO-3 load may already be sharded);
    # with a frozen base (adapters) weighted by the work its backward does.
    matmul_params = full_size(model.config)[1]
    if any(not p.requires_grad for p in model.parameters()):
        matmul_params = training_matmul_params(model, matmul_params)
    # 2. Expert parallelism.
    expert = apply_expert_parallel(model, cfg.distributed.expert_parallel_size, env,
                                   source=cfg.model.path or "model.arch")
    # 3. Context parallelism: groups of ranks sharing rows (the model sees each slice's shard).
    context = apply_context_parallel(cfg.distributed.context_parallel_size, env, cfg.trainer.micro_batch_tokens)
    # 4. Activation checkpointing.
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    # ZeRO-3 with a frozen base: gradients from the first layer on (see `input_grads`).
    model.input_grads = cfg.distributed.zero_stage == 3 and any(not p.requires_grad for p in model.parameters())
    # 5. torch.compile.
    compiled = _compile(model, env) if cfg.trainer.compile else {}
    plan = ParallelPlan(world_size=env.world_size, zero_stage=cfg.distributed.zero_stage, expert=expert,
                        matmul_params=matmul_params, compiled=compiled, context=context)
    # 6. Optimizer: expert weights in groups of their own (DeepSpeed's MoE support wants them so).
    expert_groups = expert.optimizer_groups() if expert is not None else {}
    if plan.zero_stage == 0:  # DeepSpeed hands ZeRO-0 the full gradients: the optimizer clips and skips
        clip = functools.partial(clip_by_global_norm, max_norm=cfg.optim.grad_clip, expert=expert)
        optimizer = build_optimizer(model, cfg.optim, expert_groups, GuardedAdamW, clip_grads=clip)
    else:
        optimizer = build_optimizer(model, cfg.optim, expert_groups)
    # 7. Data parallel / ZeRO.
    if plan.zero_stage is None:
        if expert is not None:
            raise ValueError("expert parallelism runs on DeepSpeed (config validation lets no such run through)")
        return PlainEngine(model, optimizer, env, cfg.optim.grad_clip, plan, cfg.distributed.bucket_mb)
    return DeepSpeedEngine(model, optimizer, env, cfg, plan)
