"""usage: python -m granite_train.info [overrides] [--json]

What a model config amounts to: total and active parameters, training FLOPs per token and the
layer pattern, for a preset (`model=granitemoe-tiny`), any `model.arch.*` overrides, or a
checkpoint (`model.path=DIR`, config.json only: no weights are read). Built on the meta device,
so real shapes cost nothing. Counts print as 3 significant digits (6.94B, 14.4M).

  --json       the same as JSON, exact numbers
  -h, --help   this help

Examples:
  python -m granite_train.info model=granitemoe-tiny
  python -m granite_train.info model.path=/ckpt/granite-3.3-2b --json
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from itertools import groupby
from typing import Any, Dict, List, Optional, Sequence

import torch

from granite_train.cli import compose_config
from granite_train.data import load_tokenizer
from granite_train.errors import UserError
from granite_train.models import build_model
from granite_train.models.hf_io import read_config
from granite_train.models.moe import ExpertWeight


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


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    try:
        flags = [a for a in args if a.startswith("-")]
        if flags:
            raise UserError(f"unknown option {flags[0]!r}; granite_train.info takes --json and config "
                            f"overrides (see --help)")
        model, cfg = _build(args)
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
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
