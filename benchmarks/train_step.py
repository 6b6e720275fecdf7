"""One full training step (forward + backward + AdamW update) of our model on the trainer's own
packed micro-batches: eager vs `trainer.compile=true`, and the torch.profiler top operators.

    python benchmarks/train_step.py --model dense|hybrid|all --data chitchat|shakespeare \
        --tokens-per-step 4096 --steps 5 --warmup 1 --threads 2 [--profile] [--no-compile] \
        [--json benchmarks/results/train_step.json]

What is measured, per model (`model=granite-tiny` dense, `model=granite-4.0-h-tiny-scaled`
hybrid) on the first optimizer step of the recipe's data (chitchat = `recipe=sft_tiny`,
shakespeare = `recipe=pretrain_power`), fp32, CPU:

* eager vs compiled: two copies of one randomly initialised model, the second passed through
  `granite_train.models.compile.compile_model` (what `trainer.compile=true` does). The first
  compiled step (compilation included) is timed on its own; then per round each copy runs the
  same step once, alternating which goes first, and the median round time gives real tokens/s.
  Before timing, the losses and gradients of the two copies are compared (max relative error
  printed; the test suite asserts 1e-5).
* `--profile`: torch.profiler over one step of the eager copy: the top operators by self CPU
  time (the "before/after" tables in docs/benchmarks.md come from running this at two commits).

The step is the trainer's own `granite_train.train.step.train_step` on its plain engine:
`model(**inputs, labels, return_logits=False)` per micro-batch, loss weighted by its share of the
step's trained tokens, plus the router aux loss (MoE/hybrid), `backward`, global-norm clipping at
optim.grad_clip, then `AdamW.step()` (lr 0). No timed assertions: this is not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from common import git_commit, machine_info
from padding_free import PRESETS, ModelSettings, Workload, build_our_model, build_workloads, compose, run_workload


def run_step(engine, mbs: List[Dict[str, Any]], n_global: int, n_real: int, s: ModelSettings) -> float:
    """The trainer's own optimizer step (`granite_train.train.step.train_step`): forward and
    backward of every micro-batch with the trainer's weighting, global-norm clipping, the update."""
    from granite_train.data import TrainStep
    from granite_train.train.step import StepSettings
    from granite_train.train.step import train_step

    settings = StepSettings(torch.device("cpu"), aux_coef=s.aux_coef, loss_chunk_tokens=s.loss_chunk_tokens)
    return train_step(engine, TrainStep(0, 0, 0, mbs, n_global, n_real, 0), settings).loss


def plain_engine(model: torch.nn.Module, grad_clip: float):
    """The trainer's one-process plain engine with an AdamW at lr 0: the two copies' weights stay
    equal across rounds; the update's cost is measured, its effect is not needed."""
    from granite_train.parallel.engine import PlainEngine

    return PlainEngine.one_process(model, torch.optim.AdamW(model.parameters(), lr=0.0), grad_clip)


def grads_rel_err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is None:
            continue
        worst = max(worst, float((pa.grad - pb.grad).abs().max() / pa.grad.abs().max().clamp_min(1e-12)))
    return worst


def profile_table(engine, mbs, n_global, n_real, s: ModelSettings, top: int) -> List[Dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(engine, mbs, n_global, n_real, s)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [dict(op=e.key, self_ms=e.self_cpu_time_total / 1e3, share=e.self_cpu_time_total / total, calls=e.count)
            for e in events[:top]]


def bench_model(model_kind: str, args: argparse.Namespace) -> Dict[str, Any]:
    from granite_train.data import load_tokenizer

    cfg = compose(args.data, model_kind, args)
    tok = load_tokenizer(cfg.data.tokenizer, cfg.model.path)
    packed, _, info = build_workloads(cfg, tok, 1)
    mbs, n_global, n_real = packed.steps[0], packed.trained_tokens[0], packed.real_tokens[0]
    eager = build_our_model(cfg, tok)
    s = ModelSettings(float(getattr(eager.config, "router_aux_loss_coef", 0.0) or 0.0), cfg.model.loss_chunk_tokens,
                     cfg.model.router_aux_loss, cfg.model.router_z_loss_coef)
    row: Dict[str, Any] = dict(model=model_kind, preset=PRESETS[model_kind], data=args.data, shapes=packed.shapes,
                               real_tokens=n_real, trained_tokens=n_global, examples=info["examples"])
    print(f"\n== {model_kind} ({PRESETS[model_kind]}, {eager.num_parameters() / 1e6:.1f}M parameters), "
          f"{args.data}: micro-batches {packed.shapes}, {n_real} real / {n_global} trained tokens", flush=True)
    models = {"eager": eager}
    if not args.no_compile:
        from granite_train.models.compile import compile_model  # absent at commits before it

        compiled = copy.deepcopy(eager)
        row["compiled_modules"] = compile_model(compiled)
        models["compiled"] = compiled
    engines = {k: plain_engine(m, cfg.optim.grad_clip) for k, m in models.items()}
    first = {}
    for k, m in models.items():  # forward + backward only: the gradients are compared below
        t0 = time.perf_counter()
        row[f"loss_{k}"] = run_workload(m, Workload("packed", [mbs], [n_global], [n_real], 0), s)[0]["loss"]
        first[k] = time.perf_counter() - t0
    row["first_step_s"] = first
    if "compiled" in models:
        row["max_grad_rel_err"] = grads_rel_err(eager, models["compiled"])
        print(f"   first step (compiled: includes compilation) {first['compiled']:.1f} s vs eager {first['eager']:.1f} s; "
              f"loss {row['loss_compiled']:.7f} vs {row['loss_eager']:.7f}, max grad rel err {row['max_grad_rel_err']:.1e}")
    for m in models.values():
        m.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        for k, m in models.items():
            run_step(engines[k], mbs, n_global, n_real, s)
    times: Dict[str, List[float]] = {k: [] for k in models}
    names = list(models)
    for r in range(args.steps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            run_step(engines[k], mbs, n_global, n_real, s)
            times[k].append(time.perf_counter() - t0)
    row["step_s"] = times
    row["tokens_per_s"] = {k: n_real / statistics.median(v) for k, v in times.items()}
    line = "   " + " | ".join(f"{k}: median {statistics.median(v):.2f} s/step, {row['tokens_per_s'][k]:.0f} real tok/s"
                              for k, v in times.items())
    if "compiled" in models:
        row["compiled_over_eager"] = row["tokens_per_s"]["compiled"] / row["tokens_per_s"]["eager"]
        line += f" | compiled/eager {row['compiled_over_eager']:.2f}x"
    print(line, flush=True)
    if args.profile:
        row["profile"] = profile_table(engines["eager"], mbs, n_global, n_real, s, args.top)
        print(f"   top {args.top} operators by self CPU time, one eager step:")
        print(f"   {'op':<60} {'self ms':>9} {'share':>6} {'calls':>6}")
        for e in row["profile"]:
            print(f"   {e['op'][:60]:<60} {e['self_ms']:>9.1f} {e['share']:>6.1%} {e['calls']:>6}")
    return row


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*PRESETS, "all"], default="all")
    ap.add_argument("--data", choices=["chitchat", "shakespeare"], default="chitchat")
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-compile", action="store_true", help="eager only (e.g. at a commit without compile)")
    ap.add_argument("--profile", action="store_true", help="also the torch.profiler top operators")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", default="benchmarks/results/train_step.json", help="'' to skip")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    logging.disable(logging.INFO)
    import datasets

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    machine, t0 = machine_info(args.threads), time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} threads, {machine['cpu']}, load {machine['loadavg_start']}")
    rows = [bench_model(m, args) for m in (list(PRESETS) if args.model == "all" else [args.model])]
    machine["wall_s"] = time.perf_counter() - t0
    machine["loadavg_end"] = list(os.getloadavg())
    print(f"total wall time {machine['wall_s']:.0f} s")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(machine=machine, commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S %z"), args=vars(args))
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
