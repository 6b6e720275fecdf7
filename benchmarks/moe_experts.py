"""MoE expert compute, forward + backward: our grouped layer vs the per-expert loop.

    python benchmarks/moe_experts.py [--shapes scaled|h-tiny|scaled,h-tiny] [--experts 8,32,64]
        [--top-k auto] [--tokens 4096] [--steps 20] [--warmup 2] [--threads N]
        [--hidden H --intermediate I]
        [--json benchmarks/results/moe_experts.json] [--merge] [--png benchmarks/results/moe_experts.png]

One MoE layer (`block_sparse_moe`: router + top-k SwiGLU experts), `--tokens` tokens in one row,
x ~ N(0, 1), weights ~ N(0, 0.02) (near-uniform routing, as a load-balanced model has). Shapes:
`scaled` = configs/model/granite-4.0-h-tiny-scaled.yaml (hidden 192, expert 128), `h-tiny` =
configs/model/granite-4.0-h-tiny.yaml (hidden 1536, expert 512); `--hidden/--intermediate`
replace both with one custom shape. For each shape and expert count (8, 32, 64; top-k `auto` =
top-2 for <= 8 experts, as the scaled preset, and top-6 above, as H-Tiny's 64):

* grouped: `granite_train.models.moe.MoE` itself: (token, slot) rows sorted by expert, one matmul
  per expert on its contiguous slice (`grouped_expert_matmul`: grouped GEMM, `compat.grouped_mm_kernel`, on Hopper+
  CUDA bf16, else per-expert `F.linear` on a split), results gathered back and combined. It also
  computes its [4, E] router statistics (two [N, E] passes, negligible next to the experts).
* loop: the same routing, then the per-expert loop of transformers 5's eager experts
  (`GraniteMoeExperts.forward`; Mixtral / Qwen-MoE have the same loop): a one-hot [E, k, N]
  mask, and for each expert that got a row: `torch.where` on its mask (a host sync), gather its
  tokens, SwiGLU with its weights, scale by the routing weight, `index_add_` into the output.
  Same module, same weights (`loop_layer` below).

Before timing, each configuration checks that the loop's output and the gradients of x, router,
input_linear and output_linear equal the layer's (|loop - grouped| / |grouped| in the 2-norm:
<= 1e-5 in fp32; <= 5e-2 in bf16 on CUDA, rounding only); a mismatch raises. One step = forward
+ backward of `(out * probe).sum()` with a fixed random probe, grads set to None between steps.
Timing: `--warmup` rounds (the check is the first: it runs one step of each), then `--steps`
rounds, each running both implementations of one (shape, experts) once in a rotating order, in
this one process; medians reported. tokens/s = tokens / median step time; "grouped/loop" =
grouped tokens/s over loop tokens/s (> 1: grouped is faster).

Rows: fp32 on CPU always; bf16 on CUDA too when a GPU is visible (never required; `--no-cuda`
skips it). The JSON holds per run the machine, torch version, git commit and arguments, and per
row every step time; `--merge` adds a run's rows to an existing file (replacing re-measured ones).
Cost on 2 cores: the `scaled` default takes under a minute. `h-tiny` is far heavier on CPU, and
not only for its FLOPs: both implementations index each expert's slice of the weight stacks
(`w[e]`), and autograd turns every slice's gradient into a zero-filled tensor the size of the
whole stack ([64, 1024, 1536] fp32 = 400 MB, 64 times per backward). With 64 experts that is
~40-70 s per step and implementation whatever `--tokens` is; split `h-tiny` runs by expert count
and collect them with `--merge`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
import yaml

from granite_train.models import GraniteConfig
from granite_train.models.moe import MoE

from common import git_commit, machine_info

REPO = Path(__file__).resolve().parents[1]
SHAPE_PRESETS = {"scaled": "granite-4.0-h-tiny-scaled", "h-tiny": "granite-4.0-h-tiny"}
# fp32: the same math in another order. bf16 (CUDA): rounding of a few bf16 eps (7.8e-3), cancellation in
# the router's gradient included; a wrong routing or group offset gives O(1) errors.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}
INIT_STD = 0.02
ROW_KEY = ("shape", "hidden", "intermediate", "experts", "top_k", "device", "dtype", "tokens", "impl")


@dataclass(frozen=True)
class Case:
    shape: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    device: str
    dtype: torch.dtype

    def label(self) -> str:
        return (f"{self.shape} H={self.hidden} I={self.intermediate} top-{self.top_k}/{self.experts} "
                f"{self.device} {str(self.dtype).replace('torch.', '')}")


# ---------------------------------------------------------------- the two implementations

def route(moe: MoE, x_NC: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """MoE.forward's routing, verbatim: (top-k expert ids [N, k], combine weights [N, k])."""
    logits_NE = F.linear(x_NC, moe.router.layer.weight).float()
    topk_logits_NK, topk_idx_NK = logits_NE.topk(moe.top_k, dim=-1)
    return topk_idx_NK, torch.softmax(topk_logits_NK, dim=-1).type_as(x_NC)


def loop_experts(x_NC: torch.Tensor, w_in_E2IC: torch.Tensor, w_out_ECI: torch.Tensor,
                 topk_idx_NK: torch.Tensor, combine_NK: torch.Tensor) -> torch.Tensor:
    """transformers 5's eager `GraniteMoeExperts.forward` on our weight layout (same [E, 2I, H]
    gate|up and [E, H, I] stacks): per hit expert, where -> gather -> SwiGLU -> scale -> index_add."""
    E = w_in_E2IC.shape[0]
    out_NC = torch.zeros_like(x_NC)
    with torch.no_grad():
        mask_EKN = F.one_hot(topk_idx_NK, num_classes=E).permute(2, 1, 0)
        hit = torch.greater(mask_EKN.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        slot_R, token_R = torch.where(mask_EKN[e])
        gate_RI, up_RI = F.linear(x_NC[token_R], w_in_E2IC[e]).chunk(2, dim=-1)
        y_RC = F.linear(F.silu(gate_RI) * up_RI, w_out_ECI[e]) * combine_NK[token_R, slot_R, None]
        out_NC.index_add_(0, token_R, y_RC.to(out_NC.dtype))
    return out_NC


def loop_layer(moe: MoE, x_BTC: torch.Tensor) -> torch.Tensor:
    """The MoE layer with its expert compute done by `loop_experts` (same module, same weights)."""
    B, T, C = x_BTC.shape
    x_NC = x_BTC.reshape(-1, C)
    topk_idx_NK, combine_NK = route(moe, x_NC)
    out_NC = loop_experts(x_NC, moe.input_linear.weight, moe.output_linear.weight, topk_idx_NK, combine_NK)
    return out_NC.view(B, T, C)


def grouped_layer(moe: MoE, x_BTC: torch.Tensor) -> torch.Tensor:
    return moe(x_BTC)[0]


IMPLEMENTATIONS: Dict[str, Callable[[MoE, torch.Tensor], torch.Tensor]] = {
    "grouped": grouped_layer, "loop": loop_layer}


# ---------------------------------------------------------------- setup and check

def build(case: Case, tokens: int, seed: int = 0) -> Tuple[MoE, torch.Tensor, torch.Tensor]:
    """(layer, x [1, tokens, H] requiring grad, probe cotangent) for one case."""
    cfg = GraniteConfig(model_type="granitemoe", hidden_size=case.hidden, intermediate_size=case.intermediate,
                        num_local_experts=case.experts, num_experts_per_tok=case.top_k)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, INIT_STD)
    moe = moe.to(device=case.device, dtype=case.dtype).train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, tokens, case.hidden, generator=g).to(case.device, case.dtype).requires_grad_()
    probe = torch.randn(1, tokens, case.hidden, generator=g).to(case.device, case.dtype)
    return moe, x, probe


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(impl: Callable[[MoE, torch.Tensor], torch.Tensor], moe: MoE, x: torch.Tensor,
              probe: torch.Tensor, device: str) -> Callable[[], Tuple[float, float]]:
    """One forward + backward; returns (forward seconds, forward + backward seconds)."""

    def step() -> Tuple[float, float]:
        for t in (x, *moe.parameters()):
            t.grad = None
        _sync(device)
        t0 = time.perf_counter()
        out = impl(moe, x)
        _sync(device)
        t1 = time.perf_counter()
        (out.float() * probe.float()).sum().backward()
        _sync(device)
        return t1 - t0, time.perf_counter() - t0

    return step


def _outputs_and_grads(impl: Callable[[MoE, torch.Tensor], torch.Tensor], moe: MoE, x: torch.Tensor,
                       probe: torch.Tensor) -> Dict[str, torch.Tensor]:
    for t in (x, *moe.parameters()):
        t.grad = None
    out = impl(moe, x)
    (out.float() * probe.float()).sum().backward()
    res = {"output": out.detach().clone(), "grad x": x.grad.clone()}
    for name, p in moe.named_parameters():
        res[f"grad {name}"] = p.grad.clone()
    return res


def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    ref, other = ref.double(), other.double()
    return float((other - ref).norm() / ref.norm().clamp_min(1e-30))


def check_agreement(moe: MoE, x: torch.Tensor, probe: torch.Tensor, dtype: torch.dtype) -> Dict[str, float]:
    """Relative error (norm of the difference / norm of the layer's) of the loop's output and
    gradients against the layer's; raises if any exceeds the dtype's tolerance."""
    ref = _outputs_and_grads(grouped_layer, moe, x, probe)
    got = _outputs_and_grads(loop_layer, moe, x, probe)
    errs = {k: _rel_err(ref[k], got[k]) for k in ref}
    bad = {k: v for k, v in errs.items() if not v <= TOLERANCE[dtype]}  # `not <=`: NaN fails too
    if bad:
        raise AssertionError(f"loop and grouped MoE disagree beyond {TOLERANCE[dtype]:g}: {bad}")
    return errs


# ---------------------------------------------------------------- timing

def time_case(case: Case, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Check, then time both implementations of one case (rotating order); one row each."""
    moe, x, probe = build(case, args.tokens)
    errs = check_agreement(moe, x, probe, case.dtype)  # one step of each: the first warmup round
    steps = {name: make_step(impl, moe, x, probe, case.device) for name, impl in IMPLEMENTATIONS.items()}
    names = list(steps)
    for _ in range(args.warmup - 1):
        for n in names:
            steps[n]()
    fwd: Dict[str, List[float]] = {n: [] for n in names}
    total: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(args.steps):
        for n in names[r % len(names):] + names[: r % len(names)]:  # rotate: no fixed position
            f, t = steps[n]()
            fwd[n].append(f)
            total[n].append(t)
    with torch.no_grad():
        counts = torch.bincount(route(moe, x.reshape(-1, case.hidden))[0].reshape(-1), minlength=case.experts)
    rows = []
    for n in names:
        med = statistics.median(total[n])
        rows.append(dict(shape=case.shape, hidden=case.hidden, intermediate=case.intermediate, experts=case.experts,
                         top_k=case.top_k, device=case.device, dtype=str(case.dtype).replace("torch.", ""),
                         tokens=args.tokens, impl=n, median_fwd_s=statistics.median(fwd[n]), median_step_s=med,
                         tokens_per_s=args.tokens / med, step_times_s=total[n], fwd_times_s=fwd[n],
                         rows_per_expert_min_max=[int(counts.min()), int(counts.max())],
                         loop_vs_grouped_rel_err=errs))
    grouped_tps = rows[names.index("grouped")]["tokens_per_s"]
    loop_tps = rows[names.index("loop")]["tokens_per_s"]
    for row in rows:
        row["grouped_over_loop"] = grouped_tps / loop_tps
    return rows


# ---------------------------------------------------------------- cases, output

def default_top_k(experts: int) -> int:
    # The presets: the scaled H-Tiny routes top-2 of 8; Granite-4.0-H-Tiny top-6 of 64.
    return 2 if experts <= 8 else 6


def shapes(args: argparse.Namespace) -> List[Tuple[str, int, int]]:
    """(name, hidden, expert intermediate) from the presets, or the one custom shape."""
    if args.hidden or args.intermediate:
        if not (args.hidden and args.intermediate):
            raise SystemExit("--hidden and --intermediate go together")
        return [("custom", args.hidden, args.intermediate)]
    out = []
    for name in args.shapes.split(","):
        arch = yaml.safe_load((REPO / "configs" / "model" / f"{SHAPE_PRESETS[name]}.yaml").read_text())["arch"]
        out.append((name, int(arch["hidden_size"]), int(arch["intermediate_size"])))
    return out


def cases(args: argparse.Namespace) -> List[Case]:
    experts = [int(e) for e in args.experts.split(",")]
    if args.top_k == "auto":
        top_ks = [default_top_k(e) for e in experts]
    else:
        top_ks = [int(k) for k in args.top_k.split(",")]
        top_ks = top_ks * len(experts) if len(top_ks) == 1 else top_ks
        if len(top_ks) != len(experts):
            raise SystemExit("--top-k: one value, or one per --experts entry")
    targets = [("cpu", torch.float32)]
    if torch.cuda.is_available() and not args.no_cuda:
        targets.append(("cuda", torch.bfloat16))
    return [Case(s, h, i, e, k, dev, dt) for dev, dt in targets for s, h, i in shapes(args)
            for e, k in zip(experts, top_ks)]


def write_json(path: Path, meta: Dict[str, Any], rows: List[Dict[str, Any]], merge: bool
               ) -> List[Dict[str, Any]]:
    """{"runs": [meta, ...], "rows": [...]}, each row's "run" indexing `runs`. With `merge`, the
    rows of an existing file are kept unless this run measured the same ROW_KEY again.
    Returns every row the file now holds."""
    runs: List[Dict[str, Any]] = []
    kept: List[Dict[str, Any]] = []
    if merge and path.exists():
        old = json.loads(path.read_text())
        new_keys = {tuple(r[k] for k in ROW_KEY) for r in rows}
        runs = old["runs"]
        kept = [r for r in old["rows"] if tuple(r[k] for k in ROW_KEY) not in new_keys]
    for r in rows:
        r["run"] = len(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs + [meta], "rows": kept + rows}, indent=1))
    print(f"wrote {path}" + (f" ({len(kept)} earlier rows kept)" if kept else ""))
    return kept + rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    print(f"\n{'shape':<7} {'H':>5} {'I':>4} {'top-k/E':>7} {'device':<11} {'impl':<8} {'fwd ms':>8} "
          f"{'f+b ms':>8} {'tokens/s':>9} {'grouped/loop':>12} {'max rel err':>11}")
    for r in rows:
        dev = f"{r['device']} {r['dtype']}"
        print(f"{r['shape']:<7} {r['hidden']:>5} {r['intermediate']:>4} {str(r['top_k']) + '/' + str(r['experts']):>7} "
              f"{dev:<11} {r['impl']:<8} {r['median_fwd_s'] * 1e3:>8.1f} {r['median_step_s'] * 1e3:>8.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['grouped_over_loop']:>12.2f} "
              f"{max(r['loop_vs_grouped_rel_err'].values()):>11.1e}")


def write_png(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["shape"], r["device"], r["dtype"]) for r in rows))  # first seen first
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    for ax, (shape, dev, dt) in zip(axes[0], groups):
        sel = [r for r in rows if (r["shape"], r["device"], r["dtype"]) == (shape, dev, dt)]
        cols = sorted({(r["experts"], r["top_k"]) for r in sel})
        for j, impl in enumerate(IMPLEMENTATIONS):
            tps = [next(r["tokens_per_s"] for r in sel if (r["experts"], r["top_k"]) == c and r["impl"] == impl)
                   for c in cols]
            ax.bar([i + 0.4 * j for i in range(len(cols))], tps, width=0.4, label=impl)
        for i, c in enumerate(cols):  # grouped/loop above each pair
            pair = [r for r in sel if (r["experts"], r["top_k"]) == c]
            top = max(r["tokens_per_s"] for r in pair)
            ax.annotate(f"{pair[0]['grouped_over_loop']:.2f}x", (i + 0.2, top), xytext=(0, 3),
                        textcoords="offset points", ha="center")
        ax.margins(y=0.12)
        ax.set_xticks([i + 0.2 for i in range(len(cols))], [f"top-{k}/{e}" for e, k in cols])
        h, inter = sel[0]["hidden"], sel[0]["intermediate"]
        ax.set_title(f"{shape} (H={h}, I={inter}), {dev} {dt}")
        ax.set_ylabel("tokens/s (fwd+bwd)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="scaled", help=f"comma list of {', '.join(SHAPE_PRESETS)}")
    ap.add_argument("--hidden", type=int, default=0, help="custom hidden size (with --intermediate)")
    ap.add_argument("--intermediate", type=int, default=0, help="custom expert intermediate size")
    ap.add_argument("--experts", default="8,32,64")
    ap.add_argument("--top-k", default="auto",
                    help="'auto' (2 for <= 8 experts, else 6), one k, or a comma list, one per expert count")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="warmup rounds, the agreement check included")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA bf16 rows even with a GPU")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "moe_experts.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in --json except those measured again (one file from several runs)")
    ap.add_argument("--png", default=None, help="also plot tokens/s of every row of --json here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    todo = cases(args)
    info = machine_info(args.threads)
    print(f"torch {torch.__version__}, commit {git_commit()}, {info['cpu']}, {args.threads} threads"
          + (f", {info['gpu']}" if "gpu" in info else ""))
    print(f"{args.tokens} tokens; {args.warmup} warmup + {args.steps} timed rounds; top-k per expert count: "
          + ", ".join(dict.fromkeys(f"top-{c.top_k} of {c.experts}" for c in todo)))
    rows: List[Dict[str, Any]] = []
    for case in todo:
        new = time_case(case, args)
        errs = new[0]["loop_vs_grouped_rel_err"]
        print(f"  {case.label()}: loop == grouped (max rel err {max(errs.values()):.1e}); grouped/loop "
              f"{new[0]['grouped_over_loop']:.2f}x")
        rows += new
    print_table(rows)
    meta = dict(machine=info, torch=torch.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M"),
                args=vars(args))
    all_rows = write_json(Path(args.json), meta, rows, args.merge)
    if args.png:
        write_png(all_rows, Path(args.png))


if __name__ == "__main__":
    main()
