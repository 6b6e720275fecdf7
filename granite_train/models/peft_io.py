"""LoRA adapters in PEFT's on-disk format, both ways.

A PEFT adapter directory is `adapter_config.json` (a `peft.LoraConfig`, written by PEFT itself)
plus `adapter_model.safetensors`, whose keys are the module paths of *transformers'* model under
`base_model.model.`. Ours are the same paths except where transformers (v5) names the MoE parts
differently, and PEFT stores expert stacks in its own layout:

| ours (`lora.py`)                                   | PEFT key (transformers >= 5 names)                        |
|----------------------------------------------------|-----------------------------------------------------------|
| `<m>.lora_A.weight` [r, in], `lora_B` [out, r]     | `base_model.model.<m>.lora_A.weight`, same shapes         |
| `...block_sparse_moe.router.layer.lora_*`          | `...block_sparse_moe.router.lora_*` (target_parameters `router.weight`) |
| `...block_sparse_moe.input_linear.lora_A` [E, r, H]| `...block_sparse_moe.experts[.base_layer].lora_A.weight` [E*r, H] (target_parameters `experts.gate_up_proj`) |
| `...block_sparse_moe.input_linear.lora_B` [E, 2I, r]| `...lora_B.weight` [2I, r*E], column j*E + e = expert e's column j |
| `...block_sparse_moe.output_linear.lora_*`         | the same under `experts` (`experts.down_proj`)            |
| `lm_head.weight` / `model.embed_tokens.weight` (train_modules) | `base_model.model.lm_head.weight` / `...model.embed_tokens.weight` (modules_to_save) |

PEFT wraps several parameters of one module by nesting its wrappers in `target_parameters`
order: every wrapper but the last adds a `base_layer.` to the keys of the ones inside it
(`experts.base_layer.lora_A` is gate_up_proj's when down_proj is targeted too). Adapters saved
against transformers 4.x (`...block_sparse_moe.input_linear.lora_A.weight`, the same layout)
are read too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from granite_train.errors import UserError
from granite_train.models.config import GraniteConfig
from granite_train.models.lora import TARGET_ROLES, TRAIN_MODULES, LoraSpec, role_of_module

log = logging.getLogger("granite_train.models")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Our expert stacks -> (transformers' module, its parameter), and the router.
_EXPERT_PARAMS = {"block_sparse_moe.input_linear": "gate_up_proj", "block_sparse_moe.output_linear": "down_proj"}
_ROUTER = "block_sparse_moe.router.layer"
# PEFT's modules_to_save names of our full-rank train_modules.
_SAVED_MODULES = {"lm_head": "lm_head", "model.embed_tokens": "embed_tokens"}
# adapter_config.json fields whose non-default values change the math in ways we do not run
# (besides PEFT's LoRA variants, found by their field metadata in `_refused_fields`).
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "layers_to_transform": None,
                "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {}, "trainable_token_indices": None,
                "use_qalora": False}


def _module_of(key: str) -> Tuple[str, str]:
    """(module path, "A" or "B") of one of our adapter keys."""
    module, factor, _ = key.rsplit(".", 2)
    return module, factor[-1]


def _expert_suffix(module: str) -> Optional[str]:
    for suffix in _EXPERT_PARAMS:
        if module.endswith(suffix) and not module.endswith("shared_mlp." + suffix.rsplit(".", 1)[1]):
            return suffix
    return None


def _target_lists(modules: List[str]) -> Tuple[List[str], List[str]]:
    """PEFT's (target_modules, target_parameters) for our adapted module paths."""
    target_modules, target_parameters = set(), []
    for module in modules:
        expert = _expert_suffix(module)
        if expert is not None:
            name = f"block_sparse_moe.experts.{_EXPERT_PARAMS[expert]}"
        elif module.endswith(_ROUTER):
            name = "block_sparse_moe.router.weight"
        else:
            target_modules.add(".".join(module.split(".")[-2:]))  # e.g. self_attn.q_proj
            continue
        if name not in target_parameters:
            target_parameters.append(name)
    # gate_up before down: the order PEFT nests them in, which sets their keys (module doc).
    target_parameters.sort(key=lambda n: ("gate_up_proj" not in n, "down_proj" not in n, n))
    return sorted(target_modules), target_parameters


def _nesting(target_parameters: List[str]) -> Dict[str, str]:
    """Expert parameter name -> the `base_layer.` prefix its keys carry under `experts`. PEFT
    wraps an expert module's targeted parameters in the order the module registers them
    (gate_up_proj, then down_proj), whatever order target_parameters lists them in; each later
    wrapper is the outer one."""
    wrapped = [p for p in ("gate_up_proj", "down_proj") if any(t == p or t.endswith("." + p) for t in target_parameters)]
    return {p: "base_layer." * (len(wrapped) - 1 - i) for i, p in enumerate(wrapped)}


def to_peft(adapters: Dict[str, torch.Tensor], full_rank: Dict[str, torch.Tensor], tied: bool
            ) -> Tuple[Dict[str, torch.Tensor], List[str], List[str], List[str]]:
    """Our adapter state (experts whole, [E, ...]) and full-rank modules -> (PEFT state dict,
    target_modules, target_parameters, modules_to_save)."""
    modules = sorted({_module_of(k)[0] for k in adapters})
    target_modules, target_parameters = _target_lists(modules)
    nest = _nesting(target_parameters)
    out: Dict[str, torch.Tensor] = {}
    for key, t in adapters.items():
        module, factor = _module_of(key)
        expert = _expert_suffix(module)
        if expert is not None:
            param = _EXPERT_PARAMS[expert]
            peft_module = module[: -len(expert)] + "block_sparse_moe.experts." + nest[param].rstrip(".")
            peft_module = peft_module.rstrip(".")
            t = t.reshape(-1, t.shape[-1]) if factor == "A" else t.permute(1, 2, 0).reshape(t.shape[1], -1)
        elif module.endswith(_ROUTER):
            peft_module = module[: -len(".layer")]
        else:
            peft_module = module
        out[f"{PREFIX}{peft_module}.lora_{factor}.weight"] = t.contiguous()
    saved = []
    for key, t in full_rank.items():
        module = key.rsplit(".", 1)[0]
        saved.append(_SAVED_MODULES[module])
        out[f"{PREFIX}{key}"] = t.contiguous()
    if tied and saved:  # one matrix: PEFT copies each module it saves, so both carry it
        matrix = next(iter(full_rank.values())).contiguous()
        out[f"{PREFIX}lm_head.weight"] = matrix
        out[f"{PREFIX}model.embed_tokens.weight"] = matrix.clone()
        saved = ["embed_tokens", "lm_head"]
    return out, target_modules, target_parameters, sorted(set(saved))


def save_adapter(path: Union[str, Path], spec: LoraSpec, adapters: Dict[str, torch.Tensor],
                 full_rank: Dict[str, torch.Tensor], cfg: GraniteConfig, base_model: Optional[str]) -> None:
    """Write a PEFT adapter directory (config through PEFT's own `LoraConfig`)."""
    import peft  # (imports transformers: only where an adapter is written or checked)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state, target_modules, target_parameters, modules_to_save = to_peft(
        {k: v.detach().to("cpu") for k, v in adapters.items()}, {k: v.detach().to("cpu") for k, v in full_rank.items()},
        cfg.tie_word_embeddings)
    dropout = spec.dropout
    if target_parameters and dropout:
        # PEFT's parameter wrappers (experts, router) refuse dropout (it cannot be factored out of
        # a weight delta); it only acts in training, so the file says 0 and loads.
        dropout = 0.0
    config = peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=dropout, use_rslora=spec.use_rslora,
                             target_modules=target_modules or None, target_parameters=target_parameters or None,
                             modules_to_save=modules_to_save or None, bias="none", task_type="CAUSAL_LM",
                             # a tied matrix trained full-rank stays one matrix in PEFT too
                             ensure_weight_tying=bool(cfg.tie_word_embeddings and modules_to_save),
                             base_model_name_or_path=base_model, inference_mode=True)
    config.save_pretrained(str(path))
    save_file(state, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _peft_to_ours(key: str, nest_inverse: Dict[int, str]) -> Optional[Tuple[str, str, Optional[str]]]:
    """A PEFT key -> (our module path, factor "A"/"B", expert param or None); None: not an
    adapter factor."""
    m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
    if m is None:
        return None
    module, factor = m.group(1), m.group(2)
    em = re.fullmatch(r"(.+\.block_sparse_moe)\.experts((?:\.base_layer)*)", module)
    if em is not None:
        param = nest_inverse.get(em.group(2).count("base_layer"))
        if param is None:
            return module, factor, "?"
        ours = {v: k for k, v in _EXPERT_PARAMS.items()}[param]
        return f"{em.group(1)}.{ours.rsplit('.', 1)[1]}", factor, param
    if module.endswith("block_sparse_moe.router"):
        return module + ".layer", factor, None
    return module, factor, None


def _refused_fields(c: Dict) -> List[str]:
    """adapter_config.json fields that change the math in ways we do not run: PEFT's LoRA
    variants (fields its LoraConfig marks `is_lora_variant`), patterns, biases, ..."""
    bad = [f"{k}={c[k]!r}" for k, default in _UNSUPPORTED.items() if c.get(k) not in (default, None)]
    import peft

    defaults = peft.LoraConfig()
    for f in dataclasses.fields(peft.LoraConfig):
        if f.metadata.get("is_lora_variant") and c.get(f.name) not in (None, getattr(defaults, f.name)):
            bad.append(f"{f.name}={c[f.name]!r}")
    if c.get("bias", "none") != "none":
        bad.append(f"bias={c['bias']!r}")
    return sorted(set(bad))


def _full_rank(found: Dict[str, torch.Tensor], c: Dict, cfg: GraniteConfig, config_file: Path) -> Dict[str, torch.Tensor]:
    """modules_to_save weights by our key. A tied base holds one matrix: the file must hold it
    once (PEFT's `ensure_weight_tying`), or twice and equal."""
    if not cfg.tie_word_embeddings or not found:
        return found
    tied_in_file = bool(c.get("ensure_weight_tying"))
    if len(found) == 2:
        a, b = found["lm_head.weight"], found["model.embed_tokens.weight"]
        if a.shape != b.shape or not torch.equal(a, b):
            raise UserError(f"{config_file}: the adapter trains lm_head and embed_tokens as two matrices, but this "
                            f"model ties them (tie_word_embeddings=true): it cannot hold both; use it on an untied base")
        return {"model.embed_tokens.weight": b}
    if not tied_in_file:
        name = next(iter(found)).rsplit(".", 1)[0]
        raise UserError(f"{config_file}: the adapter trains {name} alone (PEFT unties it from the other matrix without "
                        f"ensure_weight_tying), but this model ties lm_head and embed_tokens: it cannot hold both; "
                        f"re-save it with ensure_weight_tying=true, or use it on an untied base")
    return {"model.embed_tokens.weight": next(iter(found.values()))}


def _stacked(t: torch.Tensor, factor: str, experts: int, r: int, key: str, weights: Path) -> torch.Tensor:
    """PEFT's expert stack layout -> ours ([E, r, in] for A, [E, out, r] for B)."""
    rows = t.shape[0] if factor == "A" else t.shape[-1]
    if experts <= 0 or t.dim() != 2 or rows != experts * r:
        raise UserError(f"{weights}: {key} has shape {list(t.shape)}, not a stack of {experts} experts of rank {r}; "
                        f"use an adapter trained on a model with this model's experts")
    if factor == "A":
        return t.reshape(experts, r, t.shape[-1])
    return t.reshape(t.shape[0], r, experts).permute(2, 0, 1)


def read_adapter(path: Union[str, Path], cfg: GraniteConfig, experts: int
                 ) -> Tuple[LoraSpec, List[str], Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """A PEFT adapter directory -> (its LoraSpec, our adapted module paths, our adapter state
    (experts whole, [E, ...]), full-rank module weights by our key). One UserError line for
    anything we cannot run exactly."""
    path = Path(path)
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights.is_file():
        hint = " (adapter_model.bin is not read: re-save it with safe_serialization)" if (path / "adapter_model.bin").exists() else ""
        raise UserError(f"{path} is not a PEFT adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}{hint}")
    try:
        c = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e}); fix or replace the file") from None
    if not isinstance(c, dict) or c.get("peft_type") != "LORA":
        raise UserError(f"{config_file}: peft_type {c.get('peft_type') if isinstance(c, dict) else None!r} is not LORA; "
                        f"only LoRA adapters load")
    bad = _refused_fields(c)
    if bad:
        raise UserError(f"{config_file}: {', '.join(bad)} is not supported (plain LoRA only); merge that adapter "
                        f"with PEFT and train from the merged model (model.path)")
    try:
        r, alpha = int(c["r"]), float(c["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{config_file} has no usable r / lora_alpha ({type(e).__name__}: {e}); it is damaged") from None
    saved_modules = list(c.get("modules_to_save") or [])
    unknown = [m for m in saved_modules if m.rsplit(".", 1)[-1] not in _SAVED_MODULES.values()]
    if unknown:
        raise UserError(f"{config_file}: modules_to_save {unknown} are not supported (only lm_head, embed_tokens)")
    nest = _nesting(list(c.get("target_parameters") or []))
    nest_inverse = {prefix.count("base_layer"): p for p, prefix in nest.items()}
    adapters: Dict[str, torch.Tensor] = {}
    found_full: Dict[str, torch.Tensor] = {}
    strays: List[str] = []
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                inner = key[len(PREFIX):] if key.startswith(PREFIX) else key
                if inner in ("lm_head.weight", "model.embed_tokens.weight"):
                    found_full[inner] = f.get_tensor(key).float()
                    continue
                found = _peft_to_ours(inner, nest_inverse)
                if found is None or found[2] == "?" or role_of_module(found[0]) is None:
                    strays.append(key)
                    continue
                module, factor, param = found
                t = f.get_tensor(key).float()
                if param is not None or _expert_suffix(module) is not None:  # PEFT's stacked layout
                    t = _stacked(t, factor, experts, r, key, weights)
                adapters[f"{module}.lora_{factor}.weight"] = t.contiguous()
    except SafetensorError as e:
        raise UserError(f"{weights} is not a readable safetensors file ({e}); re-copy the adapter") from None
    if strays:
        raise UserError(f"{weights} has keys that match no LoRA target of this {cfg.model_type} model: "
                        f"{', '.join(strays[:4])}{' ...' if len(strays) > 4 else ''}; use an adapter trained on "
                        f"this model family")
    if not adapters:
        raise UserError(f"{weights} holds no LoRA factors; it is not a LoRA adapter")
    modules = sorted({_module_of(k)[0] for k in adapters})
    unpaired = [m for m in modules if f"{m}.lora_A.weight" not in adapters or f"{m}.lora_B.weight" not in adapters]
    ranks = {adapters[f"{m}.lora_A.weight"].shape[-2] for m in modules if m not in unpaired}
    if unpaired or ranks != {r}:
        raise UserError(f"{weights}: {'unpaired factors at ' + unpaired[0] if unpaired else f'LoRA ranks {sorted(ranks)}'} "
                        f"(adapter_config.json says r={r}); the adapter is damaged or mixed")
    full_rank = _full_rank(found_full, c, cfg, config_file)
    train = tuple(name for name, ours in TRAIN_MODULES.items() if f"{ours}.weight" in full_rank)
    roles = tuple(t for t in TARGET_ROLES if any(role_of_module(m) == t for m in modules))
    spec = LoraSpec(r=r, alpha=alpha, dropout=float(c.get("lora_dropout") or 0.0), targets=roles,
                    use_rslora=bool(c.get("use_rslora", False)), train_modules=train)
    return spec, modules, adapters, full_rank
