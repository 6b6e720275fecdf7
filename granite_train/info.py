"""usage: python -m granite_train.info [overrides] [--json] [--memory [--world-size N] [--device D] [--gpu-memory GiB]]

What a model config amounts to: total and active parameters, training FLOPs per token and the
layer pattern, for a preset (`model=granitemoe-tiny`), any `model.arch.*` overrides, or a
checkpoint (`model.path=DIR`, config.json only: no weights are read). Built on the meta device,
so real shapes cost nothing. Counts print as 3 significant digits (6.94B, 14.4M).

  --json       the same as JSON, exact numbers
  -h, --help   this help

With --memory, the per-rank memory of training it (granite_train/memory_plan.py): weights,
gradients, optimizer state (DeepSpeed's fp32 masters included), the ZeRO-3 live set,
activations of one trainer.micro_batch_tokens micro-batch (activation checkpointing, Mamba
states, MoE dispatch, logits) and peak_gib_per_rank, for the configured distributed.zero_stage,
expert_parallel_size, context_parallel_size, trainer.dtype and model.activation_checkpointing:

  --memory            print the plan
  --world-size N      ranks (default 1)
  --device D          cuda (default) or cpu: trainer.dtype=auto is bf16 on cuda, fp32 on cpu
  --gpu-memory GiB    also list the cheapest settings that fit (fewest ranks, no offload first)

Examples:
  python -m granite_train.info model=granitemoe-tiny
  python -m granite_train.info model.path=/ckpt/granite-3.3-2b --json
  python -m granite_train.info model=granite-4.0-h-tiny trainer.micro_batch_tokens=32768 \\
      trainer.tokens_per_step=262144 distributed.zero_stage=3 model.activation_checkpointing=true --memory --world-size 8 --gpu-memory 80
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from itertools import groupby
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch

from granite_train.cli import compose_config
from granite_train.data import load_tokenizer
from granite_train.errors import UserError
from granite_train.models import build_model
from granite_train.models.hf_io import read_config
from granite_train.models.moe import ExpertWeight

if TYPE_CHECKING:
    from granite_train.memory_plan import Settings


def human_count(n: float) -> str:
    """`n` to 3 significant digits with a K/M/B/T suffix: 6.94B, 1.47B, 14.4M, 512 (below 1000)."""
    if abs(n) < 1000:
        return f"{n:.3g}" if isinstance(n, float) else str(n)
    for power, unit in enumerate("KMBT", start=1):
        x = float(f"{n / 1000 ** power:.3g}")  # rounded first: 999.6M is 1.00B, not 1000M
        if abs(x) < 1000 or unit == "T":
            break
    decimals = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}{unit}"


def describe(model: torch.nn.Module, seq_len: int) -> Dict[str, Any]:
    c = model.config
    total = model.num_parameters()
    embed = model.model.embed_tokens.weight.numel()
    expert = sum(m.weight.numel() for m in model.modules() if isinstance(m, ExpertWeight))
    inactive = expert * (c.num_local_experts - c.num_experts_per_tok) // c.num_local_experts if expert else 0
    mixers = [c.mixer_type(i) for i in range(c.num_hidden_layers)]
    pattern = " ".join(f"{kind}x{len(list(run))}" for kind, run in groupby(mixers))
    return {
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "layer_pattern": pattern,
        "channel_mixer": c.mlp_type(),
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "parameters_total": total,
        "parameters_active": total - inactive,
        "parameters_embedding": embed,
        "experts": f"{c.num_experts_per_tok} of {c.num_local_experts}" if c.num_local_experts else None,
        "seq_len_for_flops": seq_len,
        "train_flops_per_token": model.flops_per_token(seq_len),
    }


def _build(overrides: Sequence[str]):
    cfg = compose_config(overrides)
    if cfg.model.path is not None:
        arch = read_config(cfg.model.path)
    else:
        arch = dataclasses.replace(cfg.model.arch)
        if arch.vocab_size is None:
            arch.vocab_size = load_tokenizer(cfg.data.tokenizer, None).vocab_size
    with torch.device("meta"):
        return build_model(arch), cfg


FLAGS = ("--json", "--memory")
VALUED = ("--world-size", "--gpu-memory", "--device")  # each takes a value (also as --name=value)
_TYPES = {"--world-size": int, "--gpu-memory": float, "--device": str}


def _options(args: List[str]) -> Tuple[List[str], Dict[str, Any]]:
    """(config overrides, {option: value}) of the command line; a UserError for a bad option."""
    overrides: List[str] = []
    options: Dict[str, Any] = {}
    it = iter(args)
    for a in it:
        name, _, inline = a.partition("=") if a.startswith("--") else (a, "", "")
        if name in FLAGS:
            options[name] = True
        elif name in VALUED:
            value = inline or next(it, None)
            try:
                options[name] = _TYPES[name](value)
            except (TypeError, ValueError):
                raise UserError(f"{name} needs a {_TYPES[name].__name__} value, got {value!r} (see --help)") from None
        elif a.startswith("-"):
            raise UserError(f"unknown option {a!r}; granite_train.info takes --json, --memory, --world-size, "
                            f"--device, --gpu-memory and config overrides (see --help)")
        else:
            overrides.append(a)
    if options.get("--device", "cuda") not in ("cuda", "cpu"):
        raise UserError(f"--device={options['--device']} is not one of cuda, cpu")
    if options.get("--world-size", 1) < 1:
        raise UserError(f"--world-size={options['--world-size']} must be >= 1")
    return overrides, options


def plan_settings(cfg: Any, options: Dict[str, Any]) -> "Settings":
    from granite_train.memory_plan import Settings

    device = options.get("--device", "cuda")
    dtype = cfg.trainer.dtype if cfg.trainer.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    d = cfg.distributed
    world = options.get("--world-size", 1)
    for name, size in (("expert_parallel_size", d.expert_parallel_size), ("context_parallel_size",
                                                                          d.context_parallel_size)):
        if world % size:
            raise UserError(f"distributed.{name}={size} does not divide --world-size={world}")
    return Settings(world_size=world, zero_stage=d.zero_stage, expert_parallel_size=d.expert_parallel_size,
                    context_parallel_size=d.context_parallel_size, dtype=dtype,
                    micro_batch_tokens=cfg.trainer.micro_batch_tokens,
                    activation_checkpointing=cfg.model.activation_checkpointing,
                    loss_chunk_tokens=cfg.model.loss_chunk_tokens, offload_optimizer=d.offload_optimizer,
                    device=device)


def _describe_settings(s: Any) -> str:
    zero = "plain data parallel" if s.zero_stage is None else f"ZeRO-{s.zero_stage}"
    extra = [f"EP {s.expert_parallel_size}" if s.expert_parallel_size > 1 else "",
             f"CP {s.context_parallel_size}" if s.context_parallel_size > 1 else "",
             "activation checkpointing" if s.activation_checkpointing else "",
             "optimizer offloaded" if s.offload_optimizer else ""]
    return ", ".join([f"{s.world_size} rank(s)", zero, *[e for e in extra if e], s.dtype,
                      f"{s.micro_batch_tokens} tokens per micro-batch"])


def _memory(model: Any, cfg: Any, options: Dict[str, Any]) -> int:
    from granite_train.memory_plan import GIB, HELD, PHASES, Shape, fitting, plan

    shape = Shape.of(model.config)
    settings = plan_settings(cfg, options)
    result = plan(shape, settings)
    fits = None
    if "--gpu-memory" in options:
        fits = fitting(shape, settings, options["--gpu-memory"])
    if options.get("--json"):
        out = {"model": describe(model, seq_len=cfg.data.max_length), **result.to_json()}
        if fits is not None:
            out["gpu_memory_gib"] = options["--gpu-memory"]
            out["fits"] = [f.to_json() for f in fits]
        print(json.dumps(out, indent=1))
        return 0
    print(f"{model.config.model_type}: {human_count(shape.params)} parameters "
          f"({human_count(shape.expert_params)} in experts) | {_describe_settings(settings)}")
    width = max(len(k) for k in result.bytes) + 2
    print("held through the step:")
    for key in HELD:
        print(f"  {key:<{width}}  {result.bytes[key] / GIB:8.2f} GiB")
    for phase, total in result.phase_bytes().items():
        print(f"{phase} phase: {total / GIB:.2f} GiB{' (the largest)' if phase == result.peak_phase else ''}")
        for key in PHASES[phase]:
            print(f"  {key:<{width}}  {result.bytes[key] / GIB:8.2f} GiB")
    print(f"peak_gib_per_rank {result.peak_gib_per_rank:.2f} GiB (held + the {result.peak_phase} phase)")
    if fits is not None:
        print(f"cheapest settings that fit {options['--gpu-memory']:g} GiB per rank:" if fits else
              f"nothing fits {options['--gpu-memory']:g} GiB per rank up to 1024 ranks: shorten "
              f"trainer.micro_batch_tokens")
        for f in fits:
            print(f"  {f.peak_gib_per_rank:6.2f} GiB  {_describe_settings(f.settings)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    try:
        overrides, options = _options(args)
        model, cfg = _build(overrides)
        if options.get("--memory"):
            return _memory(model, cfg, options)
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
    as_json = options.get("--json", False)
    info = describe(model, seq_len=cfg.data.max_length)
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, (int, float)) and (key.startswith("parameters") or key.endswith("flops_per_token")):
            value = human_count(value)
        elif isinstance(value, float):
            value = f"{value:.3e}"
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
