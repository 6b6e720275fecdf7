"""Build: the whole model a run starts from (random init or a checkpoint, muP applied), on its
device, before anything cuts it over ranks (`granite_train/parallel/parallelize.py`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from granite_train.config import RunConfig
from granite_train.errors import UserError
from granite_train.models import GraniteForCausalLM, build_model, load_model
from granite_train.models.hf_io import init_model, read_config
from granite_train.models.model import full_size
from granite_train.optim import mup_width_for
from granite_train.parallel.deepspeed_engine import zero3_partitioner
from granite_train.parallel.expert_parallel import load_slice
from granite_train.parallel.env import Env

log = logging.getLogger("granite_train.train")


def loads_sharded(cfg: RunConfig) -> bool:
    """A ZeRO-3 run: its model is sharded while it is built, one piece at a time, read from
    model.path or drawn (`hf_io.init_model`: the same seed gives the same model as a whole
    build), so no rank ever holds the whole model."""
    return cfg.distributed.zero_stage == 3


def weights_dtype(cfg: RunConfig, env: Env) -> torch.dtype:
    """The dtype the weights train in: bf16 under DeepSpeed's bf16 mode (fp32 masters and Adam
    state live in its optimizer), else fp32 (bf16 compute comes from autocast). An adapter run's
    frozen base is bf16 whenever the run computes in bf16 (it never updates: no master copy)."""
    bf16 = env.autocast_dtype == torch.bfloat16
    deepspeed_bf16 = cfg.distributed.zero_stage is not None and bf16
    return torch.bfloat16 if deepspeed_bf16 or (bf16 and cfg.adapter.name != "none") else torch.float32


def precision_line(cfg: RunConfig, env: Env) -> str:
    if cfg.adapter.name != "none":
        base = "bf16" if weights_dtype(cfg, env) == torch.bfloat16 else "fp32"
        adapters = ("bf16 working copies, fp32 master weights and Adam state (DeepSpeed)"
                    if cfg.distributed.zero_stage is not None and base == "bf16" else "fp32 with fp32 Adam state")
        compute = "bf16 autocast" if env.autocast_dtype else "fp32"
        return f"{compute}: frozen base {base}, adapters {adapters}"
    if weights_dtype(cfg, env) == torch.bfloat16:
        return "bf16 (DeepSpeed: bf16 weights and gradients, fp32 master weights and Adam state)"
    return "bf16 autocast (fp32 weights)" if env.autocast_dtype else "fp32"


def build_run_model(cfg: RunConfig, tokenizer: Any, env: Env) -> GraniteForCausalLM:
    """The model of `cfg` on `env.device`: `model.path`'s checkpoint, or `model.arch` with the
    tokenizer's vocabulary and special ids; muP initialised when `optim.mup` (a fresh model
    only: loaded weights are never re-drawn)."""
    sharded = loads_sharded(cfg)
    if cfg.model.path is not None:
        # ZeRO-3: each layer is sharded as it is read (no rank ever holds the whole model).
        # Expert parallelism: each rank reads only its own experts' slices.
        experts = load_slice(read_config(cfg.model.path), cfg.distributed.expert_parallel_size, env.world_size,
                             env.rank)
        model = load_model(cfg.model.path, dtype=weights_dtype(cfg, env), attn_backend=cfg.model.attn_backend,
                           mamba_backend=cfg.model.mamba_backend,
                           partition=zero3_partitioner(cfg, env) if sharded else None, experts=experts)
        vocab = model.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise UserError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but {cfg.model.path} has only "
                f"{vocab} embeddings; use the checkpoint's own tokenizer (data.tokenizer=null)")
    else:
        arch = dataclasses.replace(cfg.model.arch)
        if arch.vocab_size is None:
            arch.vocab_size = tokenizer.vocab_size
        elif arch.vocab_size < tokenizer.vocab_size:
            raise UserError(
                f"model.arch.vocab_size={arch.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer.vocab_size} tokens; set model.arch.vocab_size=null to take it from the tokenizer")
        # Special token ids from the tokenizer, so the exported config.json generates correctly.
        for key, token_id in (("eos_token_id", tokenizer.eos_token_id), ("pad_token_id", tokenizer.pad_token_id),
                              ("bos_token_id", tokenizer.token_to_id(tokenizer.bos_token or tokenizer.eos_token))):
            if getattr(arch, key) is None:
                setattr(arch, key, token_id)
        model = _init(cfg, arch, env, sharded)
    model.set_router_aux_loss(cfg.model.router_aux_loss, cfg.model.router_z_loss_coef)
    if cfg.adapter.name != "none" and not sharded:
        model = model.to(weights_dtype(cfg, env))  # the frozen base in the run's dtype (a random init was fp32)
    if not sharded:  # a sharded model's pieces are already where DeepSpeed put them
        model = model.to(env.device)
    if cfg.optim.mup and cfg.model.path is not None:  # loaded weights are never re-drawn
        model.apply_mup(mup_width_for(model, cfg.model.mup_base_width), reinit=False)
    return model


def _init(cfg: RunConfig, arch: Any, env: Env, sharded: bool) -> GraniteForCausalLM:
    """A random init of `arch`: drawn on the CPU (under muP on the run's device), once; under
    ZeRO-3 one piece at a time, each sharded before the next is drawn (the same model)."""
    mup_width = None
    if cfg.optim.mup:
        with torch.device("meta"):
            mup_width = mup_width_for(build_model(arch), cfg.model.mup_base_width)
    model = init_model(arch, zero3_partitioner(cfg, env) if sharded else None,
                       dtype=weights_dtype(cfg, env) if sharded else torch.float32, mup_width=mup_width,
                       device=env.device if cfg.optim.mup else "cpu", attn_backend=cfg.model.attn_backend,
                       mamba_backend=cfg.model.mamba_backend)
    return model


# Above this a pretrained checkpoint is being trained at a from-scratch learning rate: full
# fine-tuning of Granite-sized models uses 1e-5 to 2e-5 (recipes/sft.yaml says where from).
FINE_TUNE_MAX_LR = 1e-4


def describe(cfg: RunConfig, model: GraniteForCausalLM, tokenizer: Any, env: Env,
             resumed_from: Optional[Path] = None) -> None:
    """What a person needs to see at the start of a run (rank 0 logs it)."""
    n_params = full_size(model.config)[0]  # a ZeRO-3 load is already sharded
    c = model.config
    source = (f"checkpoint {resumed_from}" if resumed_from is not None
              else cfg.model.path or "random init (model.arch)")
    log.info("recipe: %s | output: %s", cfg.recipe_name or "(none)", cfg.trainer.output_dir)
    log.info("model: %s from %s | %.2fM parameters | %d layers, hidden %d, heads %d/%d kv, vocab %d",
             c.model_type, source, n_params / 1e6, c.num_hidden_layers, c.hidden_size,
             c.num_attention_heads, c.num_key_value_heads, c.vocab_size)
    what = (" + ".join(f"{s.path} x{s.weight:g}" for s in cfg.data.sources) if cfg.data.sources
            else cfg.data.path)
    log.info("data: %s (format %s, packing %s, max_length %d) | tokenizer: %s (%d tokens)",
             what, "per source" if cfg.data.sources else cfg.data.format, cfg.data.packing, cfg.data.max_length,
             cfg.data.tokenizer or cfg.model.path or "gpt2-bundled", tokenizer.vocab_size)
    log.info("batch: %d tokens/step over %d rank(s), micro-batches of <= %d tokens | device %s, %s%s",
             cfg.trainer.tokens_per_step, env.world_size, cfg.trainer.micro_batch_tokens,
             env.device, precision_line(cfg, env), f" ({env.dtype_reason})" if env.dtype_reason else "")
    cp = cfg.distributed.context_parallel_size
    if cp > 1:
        log.info("context parallel: groups of %d ranks share rows of <= %d tokens (%d each, examples up to "
                 "data.max_length=%d); %d data-parallel group(s)", cp, cp * cfg.trainer.micro_batch_tokens,
                 cfg.trainer.micro_batch_tokens, cfg.data.max_length, env.world_size // cp)
    if cfg.model.path is not None and cfg.optim.lr > FINE_TUNE_MAX_LR:
        log.warning("optim.lr=%g is a from-scratch learning rate: training a pretrained checkpoint "
                    "(model.path) above %g usually wrecks what it learned; use recipe=sft (lr 1e-5) or set "
                    "optim.lr=1e-5", cfg.optim.lr, FINE_TUNE_MAX_LR)
    if cfg.model.path is None and resumed_from is None:
        log.info("to fine-tune a real checkpoint: recipe=sft model.path=/path/to/granite-checkpoint (a local "
                 "HF-layout directory; its tokenizer and chat template are used)")
