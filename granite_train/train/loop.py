"""The training loop: data -> model -> optimizer step -> metrics -> HF export.

Loss normalisation is token-exact: every micro-batch contributes (sum of its token losses) /
(trained tokens in the whole optimizer step, all micro-batches and ranks). The data plan knows
that global count up front, so no extra collective is needed and neither the micro-batch size
nor the number of ranks changes the gradient.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from granite_train.config import RunConfig
from granite_train.errors import UserError
from granite_train.train.env import Env, init_env, seed_everything
from granite_train.train.metrics import MetricsSink
from granite_train.train.optim import build_optimizer
from granite_train.train.schedule import Schedule

log = logging.getLogger("granite_train.train")

MODEL_INPUTS = ("input_ids", "position_ids", "seq_idx", "cu_seq_lens", "max_seq_len")


@dataclasses.dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float
    output_dir: Path


def _build_model(cfg: RunConfig, tokenizer, env: Env) -> torch.nn.Module:
    from granite_train.models import build_model, load_model

    if cfg.model.path is not None:
        model = load_model(cfg.model.path, dtype=torch.float32, attn_backend=cfg.model.attn_backend)
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
        model = build_model(arch, attn_backend=cfg.model.attn_backend)
    if cfg.model.activation_checkpointing:
        model.set_activation_checkpointing(True)
    return model.to(env.device)


def _describe(cfg: RunConfig, model: torch.nn.Module, tokenizer, env: Env) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    source = cfg.model.path or "random init (model.arch)"
    log.info("recipe: %s | output: %s", cfg.recipe_name or "(none)", cfg.trainer.output_dir)
    log.info("model: %s from %s | %.2fM parameters | %d layers, hidden %d, heads %d/%d kv, vocab %d",
             c.model_type, source, n_params / 1e6, c.num_hidden_layers, c.hidden_size,
             c.num_attention_heads, c.num_key_value_heads, c.vocab_size)
    log.info("data: %s (format %s, packing %s, max_length %d) | tokenizer: %s (%d tokens)",
             cfg.data.path, cfg.data.format, cfg.data.packing, cfg.data.max_length,
             cfg.data.tokenizer or cfg.model.path or "gpt2-bundled", tokenizer.vocab_size)
    log.info("batch: %d tokens/step over %d rank(s), micro-batches of <= %d tokens | device %s, %s",
             cfg.trainer.tokens_per_step, env.world_size, cfg.trainer.micro_batch_tokens,
             env.device, "bf16 autocast" if env.autocast_dtype else "fp32")
    if cfg.model.path is None:
        log.info("to fine-tune a real checkpoint: add model.path=/path/to/granite-checkpoint "
                 "(HF layout: config.json + safetensors; its tokenizer is used automatically)")


def _to_device(mb: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in mb.items()}


def _expert_load(counts_LE: torch.Tensor) -> Dict[str, Any]:
    """Load balance of the step: the busiest expert's share relative to a uniform split (1.0 is
    perfect balance), worst layer, plus the per-layer counts for plots."""
    counts_LE = counts_LE.float()
    imbalance_L = counts_LE.max(dim=1).values / counts_LE.mean(dim=1).clamp_min(1e-9)
    return {"expert_imbalance": float(imbalance_L.max()),
            "expert_counts": counts_LE.round().long().tolist()}


def _real_tokens(mb: Dict[str, Any]) -> int:
    mask = mb.get("attention_mask")
    return int(mask.sum()) if mask is not None else mb["input_ids"].numel()


def _allreduce_grads(params: List[torch.nn.Parameter]) -> None:
    # One flat buffer: a single collective per step. Sum, because every rank already divided its
    # loss by the global token count.
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _save_run_config(cfg: RunConfig, out: Path) -> Dict[str, Any]:
    node = OmegaConf.structured(cfg)
    OmegaConf.save(node, out / "config.yaml")
    return OmegaConf.to_container(node, resolve=True)


def train(cfg: RunConfig) -> TrainResult:
    from granite_train.data import build_train_data, is_empty, load_tokenizer
    from granite_train.models import save_model

    env = init_env(cfg.trainer, cfg.distributed)
    out = Path(cfg.trainer.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "metrics.jsonl").exists():
            # A fresh run must not append to an old run's curve (resume arrives later).
            (out / "metrics.jsonl").rename(out / f"metrics.{int(time.time())}.jsonl.old")
    resolved = _save_run_config(cfg, out) if env.is_main else {}
    seed_everything(cfg.trainer.seed)

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.path)
    model = _build_model(cfg, tokenizer, env)
    if env.is_main:
        _describe(cfg, model, tokenizer, env)
    data = build_train_data(cfg.data, cfg.trainer, tokenizer, env.rank, env.world_size)

    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule(cfg.scheduler, cfg.optim.lr, cfg.trainer.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    sink = MetricsSink(out, cfg.tracking.wandb, resolved, cfg.trainer.max_steps,
                       enabled=env.is_main, progress=cfg.trainer.progress)

    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    tokens_seen = 0
    last_loss = float("nan")
    step_no = 0
    model.train()
    try:
        # islice, not a break: drawing one step too many would move the data position past it.
        for step in itertools.islice(data.steps(), cfg.trainer.max_steps):
            t0 = time.perf_counter()
            lr = schedule.lr_at(step_no)
            for group in optimizer.param_groups:
                group["lr"] = lr
            n_global = step.num_trained_tokens
            loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
            aux_sum = torch.zeros((), device=env.device, dtype=torch.float64)
            expert_counts = None  # [layers, experts] top-k assignments over the whole step
            for mb in step.micro_batches:
                if is_empty(mb) or n_global == 0:
                    continue
                mb = _to_device(mb, env.device)
                n_mb = int((mb["labels"] != -100).sum())
                if n_mb == 0:
                    continue
                with torch.autocast(env.device.type, dtype=env.autocast_dtype,
                                    enabled=env.autocast_dtype is not None):
                    output = model(**{k: mb.get(k) for k in MODEL_INPUTS}, labels=mb["labels"],
                                   loss_chunk_tokens=cfg.model.loss_chunk_tokens)
                objective = output.loss * (n_mb / n_global)
                if output.aux_loss is not None:
                    # The router loss is a per-token mean too: weight it by the micro-batch's
                    # share of the step's real tokens, so accumulation and ranks don't change it.
                    share = _real_tokens(mb) / step.num_input_tokens
                    objective = objective + aux_coef * output.aux_loss * share
                    aux_sum += output.aux_loss.detach().double() * share
                objective.backward()
                if output.expert_counts is not None:
                    expert_counts = output.expert_counts if expert_counts is None else expert_counts + output.expert_counts
                loss_sum += output.loss.detach().double() * n_mb
            for p in params:
                if p.grad is None:  # a rank whose micro-batches never touched p still syncs it
                    p.grad = torch.zeros_like(p)
            if env.distributed:
                _allreduce_grads(params)
                dist.all_reduce(loss_sum)
                dist.all_reduce(aux_sum)
                if expert_counts is not None:
                    dist.all_reduce(expert_counts)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            loss = float(loss_sum) / max(n_global, 1)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise UserError(
                    f"non-finite loss ({loss}) or grad norm ({grad_norm}) at step {step_no + 1}; "
                    f"lower optim.lr or use trainer.dtype=fp32")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step_no += 1
            tokens_seen += step.num_input_tokens
            last_loss = loss
            if step_no % cfg.trainer.log_every == 0 or step_no == cfg.trainer.max_steps:
                sink.log({
                    "step": step_no,
                    "epoch": step.epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": step.num_trained_tokens,
                    "input_tokens": step.num_input_tokens,
                    "tokens_seen": tokens_seen,
                    "tokens_per_sec": step.num_input_tokens / dt,
                    "packing_efficiency": step.num_input_tokens / max(step.num_slots, 1),
                    "micro_batches": len(step.micro_batches),
                    "step_time_s": dt,
                    **({"aux_loss": float(aux_sum)} if aux_coef else {}),
                    **(_expert_load(expert_counts) if expert_counts is not None else {}),
                })
        if step_no == 0:
            raise UserError("the data produced no optimizer step; add data or lower trainer.tokens_per_step")
        if step_no < cfg.trainer.max_steps:
            log.info("data exhausted after %d steps (trainer.epochs=%s)", step_no, cfg.trainer.epochs)
        sink.summary({"final_loss": last_loss, "tokens_seen": tokens_seen})
    finally:
        sink.close()

    if env.is_main:
        final = out / "final"
        save_model(model, final)
        tokenizer.save(final)
        log.info("done: %d steps, %d tokens, final loss %.4f | HF checkpoint: %s",
                 step_no, tokens_seen, last_loss, final)
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(step_no, tokens_seen, last_loss, out)
