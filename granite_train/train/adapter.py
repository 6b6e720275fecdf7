"""Adapter runs (`adapter=lora`): adapters on the whole model before it is cut over ranks, the
base frozen, and checkpoints and `final/` that hold the adapters (PEFT format), not the base.

- `adapt_model`: LoRA on the configured targets (or exactly the modules of `model.adapter_path`,
  with its weights), every other weight frozen except `adapter.train_modules`; adapters and
  full-rank modules in fp32, the frozen base in the run's dtype.
- `AdapterState`: the checkpoint part that replaces `ModelState`'s weights: `adapter/` (a PEFT
  adapter directory) and `model/` (config.json + tokenizer: what the adapter applies to).
- `save_adapter_dir`: a PEFT adapter directory from the engine's full state (every rank
  iterates: a sharded engine gathers; rank 0 writes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from granite_train.compat import full_shape, is_zero3_partitioned
from granite_train.config import RunConfig
from granite_train.errors import UserError
from granite_train.models.hf_io import read_config, save_config
from granite_train.models.lora import (LoraSpec, TRAIN_MODULES, adapted_modules, attach_lora, freeze_base,
                                       is_adapter_key)
from granite_train.models.moe import MoE
from granite_train.models.peft_io import ADAPTER_CONFIG, read_adapter, save_adapter
from granite_train.parallel.env import Env

log = logging.getLogger("granite_train.train")

ADAPTER_DIR = "adapter"  # inside a checkpoint


def run_spec(cfg: RunConfig) -> LoraSpec:
    a = cfg.adapter
    return LoraSpec(r=a.r, alpha=float(a.alpha), dropout=a.dropout, targets=tuple(a.targets),
                    use_rslora=a.use_rslora, train_modules=tuple(a.train_modules))


def _num_experts(model: nn.Module) -> int:
    return next((m.num_experts for m in model.modules() if isinstance(m, MoE)), 0)


def _normal_train_modules(names: Iterable[str], tied: bool) -> tuple:
    """lm_head and embeddings are one matrix in a tied model."""
    names = set(names)
    if tied and names:
        return ("embeddings",)
    return tuple(n for n in TRAIN_MODULES if n in names)


@dataclass
class AdapterSummary:
    spec: LoraSpec
    counts: Dict[str, int]  # modules adapted per role
    trainable: int  # parameters that train (adapters + train_modules)
    source: str  # "fresh" or the adapter directory

    def line(self, total: int) -> str:
        roles = ", ".join(f"{role} x{n}" for role, n in self.counts.items() if n)
        full = f" + full-rank {', '.join(self.spec.train_modules)}" if self.spec.train_modules else ""
        return (f"adapter: LoRA r={self.spec.r} alpha={self.spec.alpha:g}{' (rslora)' if self.spec.use_rslora else ''} "
                f"dropout={self.spec.dropout:g} on {roles}{full} ({self.source}) | {self.trainable / 1e6:.3f}M "
                f"trainable parameters, {100.0 * self.trainable / max(total, 1):.3g}% of {total / 1e6:.2f}M")


def adapt_model(model: nn.Module, cfg: RunConfig, env: Optional[Env] = None) -> AdapterSummary:
    """Adapters onto the whole (unsharded, or ZeRO-3 sharded as loaded) model, in place."""
    spec = run_spec(cfg)
    tied = model.config.tie_word_embeddings
    paths: Optional[List[str]] = None
    loaded: Optional[tuple] = None
    source = "fresh: B = 0, the model starts as its base"
    if cfg.model.adapter_path is not None:
        file_spec, paths, adapters, full_rank = read_adapter(cfg.model.adapter_path, model.config, _num_experts(model))
        mine = (spec.r, spec.alpha, spec.use_rslora, set(spec.targets))
        theirs = (file_spec.r, file_spec.alpha, file_spec.use_rslora, set(file_spec.targets))
        if mine != theirs:
            log.warning("model.adapter_path=%s: its r=%d alpha=%g rslora=%s targets %s are the run's (adapter.r=%d "
                        "alpha=%g rslora=%s targets %s are not used)", cfg.model.adapter_path, file_spec.r,
                        file_spec.alpha, file_spec.use_rslora, list(file_spec.targets), spec.r, spec.alpha,
                        spec.use_rslora, list(spec.targets))
        train = _normal_train_modules([*spec.train_modules, *file_spec.train_modules], tied)
        spec = LoraSpec(r=file_spec.r, alpha=file_spec.alpha, dropout=spec.dropout, targets=file_spec.targets,
                        use_rslora=file_spec.use_rslora, train_modules=train)
        loaded = (adapters, full_rank)
        source = f"from {cfg.model.adapter_path}"
    else:
        spec = LoraSpec(r=spec.r, alpha=spec.alpha, dropout=spec.dropout, targets=spec.targets,
                        use_rslora=spec.use_rslora, train_modules=_normal_train_modules(spec.train_modules, tied))
    counts = attach_lora(model, spec, seed=cfg.trainer.seed, paths=paths)
    if not any(counts.values()):
        raise UserError(f"adapter.targets={list(spec.targets)} match no module of this {model.config.model_type} "
                        f"model; choose roles it has (attention, and mlp for dense models; shared_mlp, experts, "
                        f"mamba where the family has them)")
    trainable = freeze_base(model, spec.train_modules)
    _set_trainable_dtype(model, spec, cfg)
    if loaded is not None:
        load_adapter_weights(model, *loaded, where=cfg.model.adapter_path, env=env)
    return AdapterSummary(spec, counts, trainable, source)


def _train_module_paths(spec: LoraSpec) -> List[str]:
    return [TRAIN_MODULES[n] for n in spec.train_modules]


def _set_trainable_dtype(model: nn.Module, spec: LoraSpec, cfg: RunConfig) -> None:
    """Without DeepSpeed the trainable weights are fp32 (the optimizer updates them in place).
    Under DeepSpeed they take the base's dtype, as DeepSpeed's bf16 mode wants its working
    copies (it keeps fp32 masters of them); a ZeRO-3 partition is never re-cast in place."""
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    if cfg.distributed.zero_stage is None or frozen is None:
        for path in _train_module_paths(spec):
            model.get_submodule(path).float()
        return
    dtype = frozen.dtype
    for _, module in adapted_modules(model):
        module.lora_A.to(dtype)
        module.lora_B.to(dtype)

@torch.no_grad()
def load_adapter_weights(model: nn.Module, adapters: Dict[str, torch.Tensor], full_rank: Dict[str, torch.Tensor],
                         where: Any, env: Optional[Env] = None) -> None:
    """Copy adapter factors (experts whole: a rank holding a slice takes its slice) and full-rank
    modules into `model`; every key and shape checked first, one UserError for all. ZeRO-3
    partitioned weights (a sharded base's full-rank train_modules) need `env` (every rank calls)."""
    params = dict(model.named_parameters())
    held = {path: m for path, m in model.named_modules() if hasattr(m, "held_experts")}
    wrong = []
    missing = sorted({k for k in params if is_adapter_key(k)} - set(adapters))
    plan = []
    for key, t in {**adapters, **full_rank}.items():
        p = params.get(key)
        if p is None:
            wrong.append(f"{key} (not in the model)")
            continue
        stack = key.rsplit(".", 2)[0]  # <moe>.input_linear of <moe>.input_linear.lora_A.weight
        moe = held.get(stack.rpartition(".")[0]) if stack.endswith(("input_linear", "output_linear")) else None
        if moe is not None and len(moe.held_experts) != moe.num_experts:
            t = t[moe.held_experts.start:moe.held_experts.stop]
        shape = full_shape(p)
        if tuple(t.shape) != shape:
            wrong.append(f"{key} (file {list(t.shape)} vs model {list(shape)})")
        plan.append((p, t))
    if missing or wrong:
        raise UserError(f"the adapter in {where} does not fit this model: "
                        f"{'missing ' + ', '.join(missing[:4]) + '; ' if missing else ''}"
                        f"{'wrong ' + ', '.join(wrong[:4]) if wrong else ''}; use an adapter trained on this model")
    sharded = [(p, t) for p, t in plan if is_zero3_partitioned(p)]
    for p, t in plan:
        if not is_zero3_partitioned(p):
            p.copy_(t.to(p.dtype))
    if sharded:
        from granite_train.parallel.deepspeed_engine import copy_into_sharded

        assert env is not None, "ZeRO-3 partitioned weights need the env to be loaded"
        copy_into_sharded(sharded, env)


def trainable_keys(spec: LoraSpec) -> Callable[[str], bool]:
    """What an adapter run saves: the factors and the full-rank modules (`Engine.full_pieces`
    gathers only these)."""
    keep = {f"{TRAIN_MODULES[n]}.weight" for n in spec.train_modules}
    return lambda key: is_adapter_key(key) or key in keep


def full_adapter_state(pieces: Iterable[Dict[str, torch.Tensor]], spec: LoraSpec):
    """(adapter factors, full-rank module weights) out of the engine's full state pieces."""
    adapters: Dict[str, torch.Tensor] = {}
    full: Dict[str, torch.Tensor] = {}
    keep = {f"{TRAIN_MODULES[n]}.weight" for n in spec.train_modules}
    for piece in pieces:
        for k, v in piece.items():
            if is_adapter_key(k):
                adapters[k] = v.detach().to("cpu", torch.float32, copy=True)
            elif k in keep:
                full[k] = v.detach().to("cpu", torch.float32, copy=True)
    return adapters, full


def save_adapter_dir(path: Path, pieces: Iterable[Dict[str, torch.Tensor]], spec: LoraSpec, model: nn.Module,
                     base_model: Optional[str], is_main: bool) -> None:
    """A PEFT adapter directory from the engine's full state (every rank iterates)."""
    adapters, full = full_adapter_state(pieces, spec)
    if is_main:
        save_adapter(path, spec, adapters, full, model.config, base_model)


class AdapterState:
    """adapter/ (PEFT) + model/ (config.json and tokenizer, no weights) of an adapter run."""

    def __init__(self, model: nn.Module, summary: AdapterSummary, tokenizer: Any, base_model: Optional[str],
                 env: Env) -> None:
        self.model, self.summary, self.tokenizer, self.base_model, self.env = model, summary, tokenizer, base_model, env
        self.full_pieces: Callable[..., Iterable[Dict[str, torch.Tensor]]] = \
            lambda select=None: [self.model.state_dict()]  # the engine's, once there is one

    def save(self, tmp: Path, meta: Dict[str, Any]) -> None:
        spec = self.summary.spec
        save_adapter_dir(tmp / ADAPTER_DIR, self.full_pieces(trainable_keys(spec)), spec, self.model,
                         self.base_model, self.env.is_main)
        if self.env.is_main:
            base_dtype = next((p.dtype for p in self.model.parameters() if not p.requires_grad), torch.float32)
            save_config(self.model.config, tmp / "model", base_dtype)
            if self.tokenizer is not None:
                self.tokenizer.save(tmp / "model")
        meta["adapter"] = {"base_model": self.base_model, "trainable_parameters": self.summary.trainable}

    def check(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        if not (ckpt / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
            raise UserError(f"cannot resume {ckpt} with adapter=lora: it holds no adapter (it was saved by a full "
                            f"fine-tuning run); resume it with adapter=none, or start a fresh adapter run from its "
                            f"model/ (model.path=)")
        saved_cfg, now_cfg = read_config(ckpt / "model").to_hf_dict(), self.model.config.to_hf_dict()
        diff = sorted(k for k in set(now_cfg) | set(saved_cfg) if now_cfg.get(k) != saved_cfg.get(k))
        if diff:
            raise UserError(f"cannot resume {ckpt}: its adapter belongs to a model that differs in {', '.join(diff[:8])}")

    def load(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        spec, paths, adapters, full_rank = read_adapter(ckpt / ADAPTER_DIR, self.model.config, _num_experts(self.model))
        mine, now = sorted(p for p, _ in adapted_modules(self.model)), self.summary.spec
        if sorted(paths) != mine or (spec.r, spec.scaling) != (now.r, now.scaling):
            raise UserError(f"cannot resume {ckpt}: its adapter (r={spec.r}, alpha={spec.alpha:g}, rslora="
                            f"{spec.use_rslora}, {len(paths)} modules) is not this run's (r={now.r}, alpha={now.alpha:g}, "
                            f"rslora={now.use_rslora}, {len(mine)} modules); use the adapter settings it was saved with")
        load_adapter_weights(self.model, adapters, full_rank, where=ckpt / ADAPTER_DIR, env=self.env)
