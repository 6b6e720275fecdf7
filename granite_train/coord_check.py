"""`python -m granite_train.coord_check [overrides] [--widths 1,2,4,8] [--steps 4] [--out DIR]`

muP's coordinate check (microsoft/mup): train copies of one base model at several widths for a few
steps on one fixed batch, with muP on and off, and record the mean |activation| of every layer
(embedding output, each decoder layer's output, the logits) at every step. With muP the curves
over width are flat; with the standard parametrisation (SP) they grow with width.

Width x w multiplies `hidden_size`, `intermediate_size`, `shared_intermediate_size`, the attention
heads (query and key/value: the head dim and the GQA ratio stay fixed, so the softmax scale
needs no muP correction) and `mamba_n_heads` (Mamba head dim fixed); the number of layers,
experts, the vocabulary, `mamba_d_state` and the conv kernel stay. Under muP the width-w model
gets `logits_scaling = w * base logits_scaling` (Granite's m_width) and `model.apply_mup(w)`
(m_width = hidden_size / base hidden_size, i.e. `model.mup_base_width` = the base width); SP
keeps the base logits_scaling and no muP. Both train with the real code: `build_model`, the
optimizer from `granite_train.optim.build_optimizer` with each group's lr = optim.lr *
lr_scale, and the trainer's own optimizer step (`granite_train.train.step.train_step`: the
model's loss and router loss, global-norm clipping at optim.grad_clip), fp32 on the CPU.

The base model is the composed config (any `model=...`, `model.arch.*`, `optim.*` override) on top
of small defaults (hidden 32, 2 layers, 2 heads of 16, vocab 256, optim.lr 0.003) so the check
takes seconds. The batch is synthetic: random token sequences packed into one padding-free row.
Writes `coord_check.json` and, with matplotlib installed, `coord_check.png` under --out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from granite_train.cli import compose_config, split_options
from granite_train.data import TrainStep
from granite_train.errors import UserError
from granite_train.models import build_model
from granite_train.optim import build_optimizer, mup_width_for
from granite_train.parallel.engine import PlainEngine
from granite_train.train.step import StepSettings, set_lr, train_step

DEFAULT_OVERRIDES = (
    "model.arch.vocab_size=256",
    "model.arch.hidden_size=32",
    "model.arch.intermediate_size=64",
    "model.arch.num_hidden_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=1",
    # Large enough that the standard parametrisation visibly blows up with width in 4 steps.
    "optim.lr=0.003",
)
DOC_LENGTHS = (48, 40, 24, 16)  # the fixed packed batch: 4 examples, 128 tokens


def scaled_arch(base, w: int, mup: bool):
    """The base architecture at width x`w` (see the module docstring)."""
    changes: Dict[str, Any] = {
        "hidden_size": base.hidden_size * w,
        "intermediate_size": base.intermediate_size * w,
        "shared_intermediate_size": base.shared_intermediate_size * w,
        "num_attention_heads": base.num_attention_heads * w,
        "num_key_value_heads": base.num_key_value_heads * w,
    }
    if base.is_hybrid:
        changes["mamba_n_heads"] = base.mamba_n_heads * w
    if mup:
        changes["logits_scaling"] = base.logits_scaling * w
    arch = dataclasses.replace(base, **changes)
    arch.validate()
    return arch


def fixed_batch(vocab_size: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """One packed row of random examples (labels = inputs, first token of each example masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (sum(DOC_LENGTHS),), generator=g)
    labels = ids.clone()
    cu = [0]
    for n in DOC_LENGTHS:
        labels[cu[-1]] = -100
        cu.append(cu[-1] + n)
    return {"input_ids": ids.unsqueeze(0), "labels": labels.unsqueeze(0),
            "cu_seq_lens": torch.tensor(cu, dtype=torch.int32)}


def _record(model) -> tuple:
    """Forward hooks writing mean |activation| of every layer into the returned dict."""
    acts: Dict[str, float] = {}
    handles = []

    def hook(name):
        def _h(_module, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            acts[name] = float(t.detach().abs().mean())
        return _h

    handles.append(model.model.embed_tokens.register_forward_hook(hook("embedding")))
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(hook(f"layer.{i}")))
    handles.append(model.lm_head.register_forward_hook(hook("logits")))
    return acts, handles


def train_width(cfg, base_arch, w: int, mup: bool, steps: int, seed: int) -> List[Dict[str, float]]:
    """Mean |activation| per layer after 0..steps optimizer steps of the width-x`w` model, each
    step the trainer's own (`train.step.train_step` on a one-process plain engine)."""
    arch = scaled_arch(base_arch, w, mup)
    torch.manual_seed(seed)
    model = build_model(arch, attn_backend=cfg.model.attn_backend, mamba_backend="torch")
    model.set_router_aux_loss(cfg.model.router_aux_loss, cfg.model.router_z_loss_coef)
    optim_cfg = dataclasses.replace(cfg.optim, mup=mup)
    if mup:
        model.apply_mup(mup_width_for(model, base_arch.hidden_size))  # re-draws the muP init
    engine = PlainEngine.one_process(model, build_optimizer(model, optim_cfg), optim_cfg.grad_clip)
    batch = fixed_batch(arch.vocab_size, seed)
    step = TrainStep(0, 0, 0, [batch], num_trained_tokens=int((batch["labels"] != -100).sum()),
                     num_input_tokens=batch["input_ids"].numel(), num_slots=batch["input_ids"].numel())
    settings = StepSettings.of(model, engine.env)
    acts, handles = _record(model)
    history = []
    model.train()
    try:
        for k in range(steps + 1):
            with torch.no_grad():  # the full forward (logits included) at the weights after k updates
                model(**batch)
            history.append(dict(acts))
            if k < steps:
                set_lr(engine, optim_cfg.lr)  # constant lr: the check is about widths, not schedules
                train_step(engine, step, settings)
    finally:
        for h in handles:
            h.remove()
    return history


def loglog_slope(widths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) over log(width)."""
    xs = [math.log(w) for w in widths]
    ys = [math.log(max(v, 1e-30)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def run_coord_check(overrides: Sequence[str] = (), widths: Sequence[int] = (1, 2, 4, 8), steps: int = 4,
                    seed: int = 0) -> Dict[str, Any]:
    """The check's results: per mode ("mup", "sp"), per layer, per width, per step the mean
    |activation|, and the log-log slope over width of every layer at every step."""
    if any(o.split("=", 1)[0] in ("optim.mup", "model.mup_base_width") for o in overrides):
        raise UserError("coord_check runs muP on and off itself (m_width = width multiplier); "
                        "drop optim.mup / model.mup_base_width from the overrides")
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise UserError(f"--widths {','.join(map(str, widths))}: give at least two multipliers >= 1")
    if steps < 1:
        raise UserError(f"--steps {steps} must be >= 1")
    cfg = compose_config([*DEFAULT_OVERRIDES, *overrides])
    if cfg.model.path is not None:
        raise UserError("coord_check trains random models of several widths; drop model.path")
    base = cfg.model.arch
    if base.vocab_size is None:
        raise UserError("coord_check needs model.arch.vocab_size (it trains on random tokens)")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    results: Dict[str, Dict[str, List[List[float]]]] = {}
    slopes: Dict[str, Dict[str, List[float]]] = {}
    for mode in ("sp", "mup"):
        per_layer: Dict[str, List[List[float]]] = {}
        for w in widths:
            history = train_width(cfg, base, w, mode == "mup", steps, seed)
            for name in history[0]:
                per_layer.setdefault(name, []).append([h[name] for h in history])
        results[mode] = per_layer
        slopes[mode] = {name: [loglog_slope(widths, [v[t] for v in per_width]) for t in range(steps + 1)]
                        for name, per_width in per_layer.items()}
    return {
        "widths": list(widths),
        "hidden_sizes": [base.hidden_size * w for w in widths],
        "steps": steps,
        "lr": cfg.optim.lr,
        "model_type": base.model_type,
        "layers": list(results["sp"]),
        "mean_abs_activation": results,  # [mode][layer][width index][step 0..steps]
        "slope": slopes,  # [mode][layer][step]: d log(mean |act|) / d log(width)
    }


def plot(res: Dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps, widths = res["steps"], res["hidden_sizes"]
    modes = (("sp", "standard parametrisation"), ("mup", "muP"))
    fig, axes = plt.subplots(2, steps + 1, figsize=(3.2 * (steps + 1), 6.4), sharey=True, squeeze=False)
    for r, (mode, title) in enumerate(modes):
        for t in range(steps + 1):
            ax = axes[r][t]
            for name in res["layers"]:
                ax.plot(widths, [v[t] for v in res["mean_abs_activation"][mode][name]], marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{title}, step {t}", fontsize=9)
            ax.set_xlabel("hidden size")
    axes[0][0].set_ylabel("mean |activation|")
    axes[1][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


USAGE = """usage: python -m granite_train.coord_check [overrides] [--widths 1,2,4,8] [--steps 4] [--out DIR]

muP's coordinate check: trains copies of a small base model at several widths for a few steps on
one fixed batch, with muP on and off, and prints the log-log slope over width of every layer's
mean |activation| (near 0 with muP, clearly > 0 without). Writes DIR/coord_check.json and, with
matplotlib installed, DIR/coord_check.png.

  --widths W,W,...  width multipliers of the base model, at least two (default 1,2,4,8)
  --steps N         optimizer steps per width (default 4)
  --out DIR         output folder (default coord_check)
  -h, --help        this help

Overrides change the base model and optimizer (model=..., model.arch.*, optim.*); the defaults
are hidden 32, 2 layers, 2 heads of 16, vocab 256, optim.lr 0.003. Details: the module docstring
of granite_train/coord_check.py."""

OPTIONS = {"widths": "1,2,4,8", "steps": "4", "out": "coord_check"}


def _parse(args: Sequence[str]) -> tuple:
    """(overrides, {widths, steps, out}) from the command line; --name VALUE or --name=VALUE."""
    overrides, opts = split_options(args, OPTIONS, "coord_check takes --widths, --steps, --out and config overrides")
    try:
        widths = [int(x) for x in opts["widths"].split(",")]
        steps = int(opts["steps"])
    except ValueError:
        raise UserError("--widths wants integers like 1,2,4,8 and --steps an integer") from None
    return overrides, {"widths": widths, "steps": steps, "out": Path(opts["out"])}


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    try:
        overrides, opts = _parse(args)
        widths, steps, out = opts["widths"], opts["steps"], opts["out"]
        res = run_coord_check(overrides, widths, steps)
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(res, indent=1))
    print(f"hidden sizes {res['hidden_sizes']}, {steps} steps at lr {res['lr']}: log-log slope of mean "
          f"|activation| over width after the last step")
    print(f"{'layer':<12} {'SP':>8} {'muP':>8}")
    for name in res["layers"]:
        print(f"{name:<12} {res['slope']['sp'][name][-1]:>8.3f} {res['slope']['mup'][name][-1]:>8.3f}")
    print(f"wrote {out / 'coord_check.json'}")
    if plot(res, out / "coord_check.png"):
        print(f"wrote {out / 'coord_check.png'}")
    else:
        print("the plot needs matplotlib: pip install 'granite-train[plot]'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
