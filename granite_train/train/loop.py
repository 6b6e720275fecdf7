"""The training loop: data -> model -> optimizer step -> metrics -> checkpoint -> HF export.

Loss normalisation is token-exact: every micro-batch contributes (sum of its token losses) /
(trained tokens in the whole optimizer step, all micro-batches and ranks). The data plan knows
that global count up front, so no extra collective is needed and neither the micro-batch size
nor the number of ranks changes the gradient.

A step whose loss or gradient norm is not finite is skipped (no optimizer update, counted in
metrics.jsonl); `trainer.max_bad_steps` of them in a row stop the run. Checkpoints
(`checkpoint.py`) hold everything a resumed run needs to continue exactly where the saved one
was: weights, optimizer, data position, RNG, step and token counters.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from granite_train.config import RunConfig
from granite_train.errors import UserError
from granite_train.models.compile import compile_model
from granite_train.train.engine import build_engine
from granite_train.train.env import Env, init_env, main_rank_first, peak_tflops, seed_everything
from granite_train.train.evaluate import evaluate
from granite_train.train.expert_parallel import moe_layers, setup_expert_parallel
from granite_train.train.inputs import MODEL_INPUTS, to_device
from granite_train.train import checkpoint as ckpt_io
from granite_train.train.metrics import MetricsSink, truncate_metrics
from granite_train.train.optim import build_optimizer, mup_width_for
from granite_train.train.schedule import Schedule

log = logging.getLogger("granite_train.train")



@dataclasses.dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_loss: float
    output_dir: Path


def _build_model(cfg: RunConfig, tokenizer, env: Env) -> torch.nn.Module:
    from granite_train.models import build_model, load_model

    if cfg.model.path is not None:
        model = load_model(cfg.model.path, dtype=torch.float32, attn_backend=cfg.model.attn_backend,
                           mamba_backend=cfg.model.mamba_backend)
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
        model = build_model(arch, attn_backend=cfg.model.attn_backend, mamba_backend=cfg.model.mamba_backend)
    if cfg.model.activation_checkpointing:
        model.set_activation_checkpointing(True)
    model.set_router_aux_loss(cfg.model.router_aux_loss, cfg.model.router_z_loss_coef)
    return model.to(env.device)


def _compile(model: torch.nn.Module, env: Env) -> None:
    if env.device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise UserError("trainer.compile=true on CPU needs a C++ compiler (torch inductor builds C++ kernels) "
                        "and none was found (g++, c++, clang++ or $CXX); install one or set trainer.compile=false")
    counts = compile_model(model)
    if env.is_main:
        log.info("torch.compile (trainer.compile=true, dynamic shapes, compiles at the first step): %s; "
                 "attention, MoE dispatch and the Mamba scan stay eager",
                 ", ".join(f"{n} x{k}" for n, k in counts.items()) or "nothing to compile")


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


def _expert_load(counts_LE: torch.Tensor) -> Dict[str, Any]:
    """Load balance of the step, worst layer: the busiest expert's tokens over the mean (1.0 is
    perfect balance) and over the idlest expert's (inf, logged null, when an expert got none),
    how many (layer, expert) pairs got no token, plus the per-layer counts for plots."""
    counts_LE = counts_LE.float()
    max_L = counts_LE.max(dim=1).values
    imbalance_L = max_L / counts_LE.mean(dim=1).clamp_min(1e-9)
    min_L = counts_LE.min(dim=1).values
    max_min = float("inf") if bool((min_L == 0).any()) else float((max_L / min_L).max())
    return {"expert_imbalance": float(imbalance_L.max()), "expert_max_min": max_min,
            "experts_idle": int((counts_LE == 0).sum()),
            "expert_counts": counts_LE.round().long().tolist()}


def _step_flops(model: torch.nn.Module, step, matmul_params: Optional[int] = None) -> float:
    """Model FLOPs of this rank's share of the step (forward + backward, PaLM convention):
    tokens x flops_per_token at the token-weighted mean example length, since attention and the
    SSD scan never cross examples. `matmul_params`: the full model's, counted before sharding."""
    lens: List[int] = []
    for mb in step.micro_batches:
        cu = mb.get("cu_seq_lens")
        if cu is not None:
            bounds = cu.reshape(-1).tolist()
            lens += [e - s for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        elif "attention_mask" in mb:
            lens += [int(n) for n in mb["attention_mask"].sum(dim=1).tolist() if n > 0]
    if not lens:
        return 0.0
    tokens = sum(lens)
    return tokens * model.flops_per_token(max(1, round(sum(n * n for n in lens) / tokens)), matmul_params)


def _real_tokens(mb: Dict[str, Any]) -> int:
    mask = mb.get("attention_mask")
    return int(mask.sum()) if mask is not None else mb["input_ids"].numel()


def _agree(env: Env, value: Any) -> Any:
    """Rank 0's value on every rank (decisions about files must not differ between ranks)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_resume(cfg: RunConfig, ckpt: Path, now: Dict[str, Any]) -> ckpt_io.TrainerState:
    state = ckpt_io.read_state(ckpt)
    saved = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml"), resolve=True)
    changed = ckpt_io.config_changes(saved, now, list(cfg.trainer.resume_allow_changes))
    if changed:
        raise UserError(
            f"cannot resume {ckpt}: {'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} "
            f"changed since it was saved; restore them, or allow them with "
            f"trainer.resume_allow_changes=[{','.join(c.split()[0] for c in changed[:6])}], or start "
            f"a fresh run (trainer.resume=false with a new trainer.output_dir)")
    return state


def _load_weights(model: torch.nn.Module, ckpt: Path, allow: List[str]) -> None:
    from granite_train.models import load_model

    saved = load_model(ckpt / "model")
    now_cfg, saved_cfg = model.config.to_hf_dict(), saved.config.to_hf_dict()
    diff = sorted(k for k in set(now_cfg) | set(saved_cfg) if now_cfg.get(k) != saved_cfg.get(k))
    if diff and not any(a in ("model", "model.arch", "model.path") for a in allow):
        raise UserError(
            f"cannot resume {ckpt}: the model differs from the checkpoint's in {', '.join(diff[:8])}; "
            f"use the same model settings (or trainer.resume_allow_changes=[model.arch] for changes "
            f"that keep every shape)")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, v in saved.state_dict().items() if shapes.get(k) != tuple(v.shape)]
    if wrong:
        raise UserError(f"cannot resume {ckpt}: parameter shapes differ ({', '.join(wrong[:4])}); "
                        f"the model must keep the checkpoint's shapes")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(saved.state_dict()[name])


def _save_checkpoint(env: Env, out: Path, state: ckpt_io.TrainerState, engine,
                     config_yaml: str, tokenizer, keep: int) -> None:
    root = ckpt_io.checkpoints_dir(out)
    tmp = ckpt_io.begin_save(root, state.step) if env.is_main else ckpt_io.tmp_dir_for(root, state.step)
    if env.distributed:
        dist.barrier()  # the directory exists before other ranks write into it
    ckpt_io.write_rank_state(tmp, env.rank)
    engine.save_state(tmp)  # DeepSpeed: every rank's shards (nothing for the plain engine)
    if env.distributed:
        dist.barrier()
    with engine.full_weights() as model:  # ZeRO-3: every rank takes part in the gather
        if env.is_main:
            ckpt_io.write_main_state(tmp, model, engine.optimizer_state(), state, config_yaml, tokenizer)
            final = ckpt_io.publish(tmp, state.step, keep)
            log.info("checkpoint: %s", final)
    if env.distributed:
        dist.barrier()  # nobody moves on (or exits) before the checkpoint is complete


@dataclasses.dataclass
class StepOutcome:
    loss: float
    grad_norm: float
    aux_loss: Optional[float]
    expert_counts: Optional[torch.Tensor]

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def _train_step(engine, step, env: Env, cfg: RunConfig, aux_coef: float, is_empty,
                expert_shape: Optional[tuple] = None) -> StepOutcome:
    """Forward/backward over the step's micro-batches, then the engine's gradient sync, clipping
    and update (skipped when the loss or gradient norm is not finite). `expert_shape`: (MoE
    layers, experts) for MoE models, None for dense ones."""
    n_global = step.num_trained_tokens
    loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    aux_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    # [layers, experts] top-k assignments over the whole step; zeros, not None, on a rank whose
    # micro-batches are all empty: every rank must run the same collectives below.
    expert_counts = torch.zeros(expert_shape, device=env.device) if expert_shape else None
    saw_aux = False
    for mb in step.micro_batches:
        if is_empty(mb) or n_global == 0:
            engine.backward_nothing()  # DeepSpeed: every rank runs as many backwards
            continue
        # Counted on the host copy, before the transfer: no device sync per micro-batch.
        n_mb = int((mb["labels"] != -100).sum())
        real_mb = _real_tokens(mb)
        if n_mb == 0:
            engine.backward_nothing()
            continue
        mb = to_device(mb, env.device)
        with torch.autocast(env.device.type, dtype=env.autocast_dtype, enabled=env.autocast_dtype is not None):
            output = engine.forward(**{k: mb.get(k) for k in MODEL_INPUTS}, labels=mb["labels"],
                                    loss_chunk_tokens=cfg.model.loss_chunk_tokens, return_logits=False)
        objective = output.loss * (n_mb / n_global)
        if output.aux_loss is not None:
            # The router loss is a per-token mean too: weight it by the micro-batch's share of
            # the step's real tokens, so accumulation and ranks don't change it.
            share = real_mb / step.num_input_tokens
            objective = objective + aux_coef * output.aux_loss * share
            aux_sum += output.aux_loss.detach().double() * share
            saw_aux = True
        engine.backward(objective)
        if output.expert_counts is not None:
            expert_counts = output.expert_counts if expert_counts is None else expert_counts + output.expert_counts
        loss_sum += output.loss.detach().double() * n_mb
    if env.distributed:
        dist.all_reduce(loss_sum)
        dist.all_reduce(aux_sum)
        if expert_counts is not None:
            dist.all_reduce(expert_counts)
    loss = float(loss_sum) / max(n_global, 1)
    # Every rank sees the same reduced values, so all skip together.
    grad_norm, _ = engine.step(math.isfinite(loss))
    outcome = StepOutcome(loss, grad_norm, float(aux_sum) if saw_aux else None, expert_counts)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    return outcome


def train(cfg: RunConfig) -> TrainResult:
    from granite_train.data import build_eval_data, build_train_data, is_empty, load_tokenizer
    from granite_train.models import save_model

    env = init_env(cfg.trainer, cfg.distributed)
    out = Path(cfg.trainer.output_dir)
    node = OmegaConf.structured(cfg)
    resolved: Dict[str, Any] = OmegaConf.to_container(node, resolve=True)
    config_yaml = OmegaConf.to_yaml(node)
    ckpt: Optional[Path] = None
    failure = None
    if env.is_main:
        try:
            ckpt = ckpt_io.resolve_resume(cfg.trainer.resume, out)
        except UserError as exc:
            failure = str(exc)
    ckpt, failure = _agree(env, (ckpt, failure))
    if failure:
        raise UserError(failure)
    state = _check_resume(cfg, ckpt, resolved) if ckpt is not None else None

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics = out / "metrics.jsonl"
        if state is not None:
            dropped = truncate_metrics(metrics, state.step)
            if dropped:
                log.info("metrics.jsonl: dropped %d records written after %s", dropped, ckpt.name)
        elif metrics.exists():
            # A fresh run must not append to an old run's curve.
            metrics.rename(out / f"metrics.{int(time.time())}.jsonl.old")
        (out / "config.yaml").write_text(config_yaml)
    seed_everything(cfg.trainer.seed)

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.path)
    model = _build_model(cfg, tokenizer, env)
    if cfg.optim.mup:  # muP init for a fresh model; loaded weights are never re-drawn
        model.apply_mup(mup_width_for(model, cfg.model.mup_base_width), reinit=cfg.model.path is None)
    if state is not None:
        _load_weights(model, ckpt, list(cfg.trainer.resume_allow_changes))
    if env.is_main:
        _describe(cfg, model, tokenizer, env)
    matmul_params = model.active_matmul_params()  # for MFU: the full model, before any sharding
    expert_shard = setup_expert_parallel(model, env, cfg)  # after the full weights are final
    if cfg.trainer.compile:
        _compile(model, env)
    with main_rank_first(env):  # tokenize once; the other ranks read the datasets cache
        data = build_train_data(cfg.data, cfg.trainer, tokenizer, env.rank, env.world_size)
        eval_data = build_eval_data(cfg.data, cfg.trainer, tokenizer, env.rank, env.world_size, train_data=data)

    optimizer = build_optimizer(model, cfg.optim)
    engine = build_engine(model, optimizer, env, cfg, expert_shard)
    model = engine.model  # the same module (ZeRO-3: its weights sharded)
    # Forwards that are collectives (ZeRO-3 gathers, expert all-to-alls) must run on every rank.
    lockstep_eval = cfg.distributed.zero_stage == 3 or expert_shard is not None
    schedule = Schedule.from_config(cfg)
    step_no = tokens_seen = skipped = bad_in_a_row = 0
    wandb_id = None
    if state is not None:
        engine.load_state(ckpt)
        data.load_state_dict(state.data)
        ckpt_io.load_rank_rng(ckpt, env.rank)
        step_no, tokens_seen = state.step, state.tokens_seen
        skipped, bad_in_a_row, wandb_id = state.skipped_steps, state.bad_steps_in_a_row, state.wandb_run_id
        if env.is_main:
            log.info("resuming from %s: step %d, %d tokens seen", ckpt, step_no, tokens_seen)
    sink = MetricsSink(out, cfg.tracking.wandb, resolved, cfg.trainer.max_steps, enabled=env.is_main,
                       progress=cfg.trainer.progress, initial_step=step_no, wandb_run_id=wandb_id)
    max_tokens = cfg.trainer.max_tokens
    peak = peak_tflops(cfg.trainer.peak_tflops, env.device)

    def trainer_state() -> ckpt_io.TrainerState:
        return ckpt_io.TrainerState(step=step_no, tokens_seen=tokens_seen, data=data.state_dict(),
                                    skipped_steps=skipped, bad_steps_in_a_row=bad_in_a_row,
                                    wandb_run_id=sink.wandb_run_id or wandb_id)

    def save() -> None:
        _save_checkpoint(env, out, trainer_state(), engine, config_yaml, tokenizer,
                         cfg.trainer.keep_checkpoints)

    last_eval = -1

    def run_eval() -> None:  # every rank calls it (the sums are all-reduced)
        nonlocal last_eval
        if eval_data is None or last_eval == step_no:
            return
        result = evaluate(model, eval_data, env, loss_chunk_tokens=cfg.model.loss_chunk_tokens,
                          lockstep=lockstep_eval)
        sink.log({"step": step_no, "split": "eval", **result})
        last_eval = step_no

    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    n_moe = len(moe_layers(model))
    expert_shape = (n_moe, model.config.num_local_experts) if n_moe else None
    last_loss = float("nan")
    start_step, saved_at = step_no, step_no if state is not None else -1
    out_of_tokens = max_tokens is not None and tokens_seen >= max_tokens
    model.train()
    try:
        # islice, not a break: drawing one step too many would move the data position past it.
        remaining = 0 if out_of_tokens else max(0, cfg.trainer.max_steps - step_no)
        for step in itertools.islice(data.steps(), remaining):
            t0 = time.perf_counter()
            lr = schedule.lr_at(step_no, tokens_seen)  # tokens trained before this step
            for group in engine.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            result = _train_step(engine, step, env, cfg, aux_coef, is_empty, expert_shape)
            dt = time.perf_counter() - t0
            # MFU of this rank (ranks run equal shares); absent where no peak is known (CPU).
            mfu = _step_flops(model, step, matmul_params) / dt / (peak * 1e12) if peak else None
            step_no += 1
            tokens_seen += step.num_input_tokens
            if result.finite:
                bad_in_a_row = 0
                last_loss = result.loss
            else:
                skipped += 1
                bad_in_a_row += 1
            out_of_tokens = max_tokens is not None and tokens_seen >= max_tokens
            if (not result.finite or step_no % cfg.trainer.log_every == 0
                    or step_no == cfg.trainer.max_steps or out_of_tokens):
                sink.log({
                    "step": step_no,
                    "epoch": step.epoch,
                    "loss": result.loss if result.finite else None,
                    "lr": lr,
                    "grad_norm": result.grad_norm if math.isfinite(result.grad_norm) else None,
                    "tokens": step.num_trained_tokens,
                    "input_tokens": step.num_input_tokens,
                    "tokens_seen": tokens_seen,
                    "tokens_per_sec": step.num_input_tokens / dt,
                    "packing_efficiency": step.num_input_tokens / max(step.num_slots, 1),
                    "micro_batches": len(step.micro_batches),
                    "step_time_s": dt,
                    **({"mfu": mfu} if mfu is not None else {}),
                    **({"skipped": True} if not result.finite else {}),
                    "skipped_steps": skipped,
                    **({"aux_loss": result.aux_loss} if result.aux_loss is not None else {}),
                    **(_expert_load(result.expert_counts) if result.expert_counts is not None else {}),
                })
            if bad_in_a_row >= max(1, cfg.trainer.max_bad_steps):
                last = ckpt_io.latest_checkpoint(ckpt_io.checkpoints_dir(out))
                raise UserError(
                    f"{bad_in_a_row} steps in a row had a non-finite loss or grad norm (up to step "
                    f"{step_no}; trainer.max_bad_steps={cfg.trainer.max_bad_steps}); last good checkpoint: "
                    f"{last or 'none'}; lower optim.lr, lower optim.grad_clip or use "
                    f"trainer.dtype=fp32, then resume")
            if cfg.trainer.eval_every and step_no % cfg.trainer.eval_every == 0:
                run_eval()
            if cfg.trainer.save_every and step_no % cfg.trainer.save_every == 0 and bad_in_a_row == 0:
                save()
                saved_at = step_no
            if out_of_tokens:
                break  # trainer.max_tokens reached
        if step_no == 0:
            raise UserError("the data produced no optimizer step; add data or lower trainer.tokens_per_step")
        if step_no == start_step and state is not None:
            log.info("the checkpoint %s already reached the end of this run (step %d); nothing to train",
                     ckpt, step_no)
        elif step_no < cfg.trainer.max_steps and not out_of_tokens:
            log.info("data exhausted after %d steps (trainer.epochs=%s)", step_no, cfg.trainer.epochs)
        run_eval()
        if saved_at != step_no and bad_in_a_row == 0:
            save()
        sink.summary({"final_loss": last_loss, "tokens_seen": tokens_seen, "skipped_steps": skipped})
    finally:
        sink.close()

    with engine.full_weights() as full:  # ZeRO-3: every rank takes part in the gather
        if env.is_main:
            final = out / "final"
            save_model(full, final)
            tokenizer.save(final)
            log.info("done: %d steps, %d tokens, final loss %.4f | HF checkpoint: %s",
                     step_no, tokens_seen, last_loss, final)
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(step_no, tokens_seen, last_loss, out)
