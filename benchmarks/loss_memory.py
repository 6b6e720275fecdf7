"""LM loss + backward at Granite vocabulary sizes: peak memory and time of each loss variant.

    python benchmarks/loss_memory.py [--vocab 49155,100352] [--tokens 4096] [--hidden 2048]
        [--trained-fraction 0.4,1.0] [--chunk-tokens 1024] [--variants all] [--steps 1]
        [--warmup 0] [--threads N] [--json benchmarks/results/loss_memory.json] [--merge] [--png FILE]

Inputs: final hidden states h [1, T, H] ~ N(0, 1) and the lm_head / tied embedding W [V, H] ~
N(0, 0.02), fp32 on CPU, both requiring grad; defaults T = 4096 (one micro-batch), H = 2048
(granite-3.3-2b), V = 49155 (the Granite 3.0 / 3.1 tokenizer; granite-3.3-2b's config says 49159)
and 100352 (the Granite 4.0 tokenizer). Labels: one packed row of examples (64 to 1024 tokens)
trained on the last `fraction` of each (the assistant turn; prompts are -100) and never on an
example's first label, as the collator does: 0.4 is SFT on the demo chitchat data, 1.0 pretraining.

Variants (granite_train/models/loss.py), one step = loss forward + backward into h and W:

* materialised: `causal_lm_loss(h @ W.T, labels)`, the [T, V] logits in memory
* trained: `trained_positions_loss(h, W, labels)`, logits only at rows with a trained label (the
  trainer's `return_logits=False` path)
* chunked: `chunked_causal_lm_loss(h, W, labels, chunk_tokens)`, [chunk, V] logits at a time,
  recomputed in backward (`model.loss_chunk_tokens`)
* trained+chunked: `trained_positions_loss(h, W, labels, chunk_tokens)`, both

materialised and chunked compute every position whatever the labels, so they run once per vocab
(with the first fraction's labels); trained and trained+chunked run for every fraction.

Exactness first, in this process at a small size (T=300, H=32, V=1000, chunk 64: several chunks
and a remainder), for every fraction: each variant's loss and its gradients of h and W against
materialised (|diff| / |materialised| in the 2-norm <= 1e-5, fp32); a mismatch raises. The
full-size losses of rows with the same labels are compared too, after the measurement.

Measurement: each (vocab, variant, fraction) in a fresh subprocess (as benchmarks/
vs_transformers.py measures memory): it allocates the inputs (same seed, so the same inputs
everywhere), records its RSS, runs `--warmup` + `--steps` steps (grads set to None between), and
reports its peak RSS = VmHWM from /proc/self/status (not ru_maxrss, which carries the parent's
high-water mark across fork + exec). "+step MiB" = peak RSS - RSS after allocating the inputs: the
step's own memory (W.grad, T x V x 4 bytes of logits per copy, ...); "logits MiB" = one fp32
[T, V] copy, for scale. Before allocating, the child runs one tiny step of its variant so that
lazily imported code (the first `checkpoint` imports ~85 MiB of modules) is not counted. The
children run with MALLOC_MMAP_THRESHOLD_=1 MiB, so RSS follows live tensors rather than glibc's
heap retention (see `measure`). Time = median forward + backward seconds of the timed steps in
that child.

Cost on 2 cores: a materialised step at T=4096, H=2048, V=100352 is ~5 TFLOP (three T x V x H
matmuls): tens of seconds; all variants are ~5.6 of those per vocabulary. With --steps 1, expect
~2-3 min for 49155 and ~4-5 min for 100352: run one vocabulary at a time, the second with
`--merge`, to get one JSON. The JSON holds per run the machine, torch version, git commit and
arguments, and per row the step times and RSS figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from granite_train.models.loss import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss, trained_positions_loss

from common import git_commit, hwm_bytes, machine_info, rss_bytes

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
CHECK_SIZE = dict(tokens=300, hidden=32, vocab=1000, chunk_tokens=64)
INIT_STD = 0.02
MMAP_THRESHOLD = 2 ** 20  # bytes; the children's MALLOC_MMAP_THRESHOLD_ (see `measure`)
ROW_KEY = ("vocab", "variant", "fraction", "tokens", "hidden", "chunk_tokens")

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
VARIANTS: Dict[str, LossFn] = {
    "materialised": lambda h, w, labels, chunk: causal_lm_loss(F.linear(h, w), labels),
    "trained": lambda h, w, labels, chunk: trained_positions_loss(h, w, labels),
    "chunked": lambda h, w, labels, chunk: chunked_causal_lm_loss(h, w, labels, chunk),
    "trained+chunked": lambda h, w, labels, chunk: trained_positions_loss(h, w, labels, chunk),
}
# Variants whose work does not depend on which labels are trained: measured once per vocab.
FRACTION_FREE = ("materialised", "chunked")


# ---------------------------------------------------------------- inputs

def make_labels(tokens: int, vocab: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """[1, T] labels of one packed row: examples of 64..1024 tokens, each trained on its last
    `fraction` (rounded up), never on its first token (the collator masks it)."""
    ids = torch.randint(0, vocab, (tokens,), generator=gen)
    labels = torch.full((tokens,), IGNORE_INDEX, dtype=torch.long)
    start = 0
    while start < tokens:
        n = min(int(torch.randint(64, 1025, (1,), generator=gen)), tokens - start)
        first_trained = start + max(1, n - math.ceil(n * fraction))
        labels[first_trained:start + n] = ids[first_trained:start + n]
        start += n
    return labels.unsqueeze(0)


def make_inputs(tokens: int, hidden: int, vocab: int, fraction: float, seed: int = 0
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h [1, T, H], W [V, H], labels [1, T]); h and W require grad. Same seed, same tensors."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(1, tokens, hidden, generator=gen).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * INIT_STD).requires_grad_()
    return h, w, make_labels(tokens, vocab, fraction, gen)


def trained_share(labels: torch.Tensor) -> float:
    """The share of positions whose next token is trained (what the loss actually averages)."""
    return float((labels[:, 1:] != IGNORE_INDEX).sum()) / labels.shape[1]


# ---------------------------------------------------------------- exactness (parent, small)

def _loss_and_grads(fn: LossFn, h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int
                    ) -> Dict[str, torch.Tensor]:
    h.grad = w.grad = None
    loss = fn(h, w, labels, chunk)
    loss.backward()
    return {"loss": loss.detach().clone(), "grad h": h.grad.clone(), "grad W": w.grad.clone()}


def check_exactness(fractions: List[float], variants: List[str]) -> Dict[str, float]:
    """Every variant's loss and grads vs materialised at CHECK_SIZE; raises on a mismatch.
    Returns the worst relative error per variant (over fractions and quantities)."""
    s = CHECK_SIZE
    worst: Dict[str, float] = {}
    for fraction in fractions:
        h, w, labels = make_inputs(s["tokens"], s["hidden"], s["vocab"], fraction, seed=1)
        ref = _loss_and_grads(VARIANTS["materialised"], h, w, labels, s["chunk_tokens"])
        for name in variants:
            got = _loss_and_grads(VARIANTS[name], h, w, labels, s["chunk_tokens"])
            errs = {k: float((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)) for k in ref}
            bad = {k: v for k, v in errs.items() if not v <= TOLERANCE}  # `not <=`: NaN fails too
            if bad:
                raise AssertionError(f"{name} != materialised (fraction {fraction}) beyond {TOLERANCE:g}: {bad}")
            worst[name] = max(worst.get(name, 0.0), *errs.values())
    return worst


# ---------------------------------------------------------------- the measuring child


def child(args: argparse.Namespace) -> None:
    """Fresh process: inputs, RSS, warmup + steps of one variant; one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    fn = VARIANTS[args.variant]
    # One tiny step first: the first checkpoint() imports ~800 modules (~85 MiB of RSS), code
    # that is not the step's memory and that a training process has loaded after its first step.
    rss_before = rss_bytes()
    _loss_and_grads(fn, *make_inputs(16, 8, 32, 1.0), chunk=8)
    code_bytes = rss_bytes() - rss_before
    h, w, labels = make_inputs(args.tokens, args.hidden, args.vocab_one, args.fraction_one)
    gc.collect()
    setup_rss, setup_hwm = rss_bytes(), hwm_bytes()
    fwd, total, loss = [], [], float("nan")
    for _ in range(args.warmup + args.steps):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        out = fn(h, w, labels, args.chunk_tokens)
        t1 = time.perf_counter()
        out.backward()
        fwd.append(t1 - t0)
        total.append(time.perf_counter() - t0)
        loss = float(out.detach())
        del out
    print(json.dumps(dict(setup_rss=setup_rss, setup_peak_rss=setup_hwm, peak_rss=hwm_bytes(), loss=loss,
                          code_warmup_rss=code_bytes,
                          fwd_times_s=fwd[args.warmup:], step_times_s=total[args.warmup:],
                          trained_share=trained_share(labels))))


def measure(variant: str, vocab: int, fraction: float, args: argparse.Namespace) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--_child", "--variant", variant, "--vocab-one", str(vocab),
           "--fraction-one", str(fraction), "--tokens", str(args.tokens), "--hidden", str(args.hidden),
           "--chunk-tokens", str(args.chunk_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    # A fixed glibc mmap threshold: every block >= 1 MiB is mmapped and returned on free, so RSS
    # follows live tensors. glibc's default threshold grows with freed blocks (up to 32 MiB), after
    # which freed mid-size blocks (e.g. [chunk, V] logits of a small chunk) stay in the heap and
    # inflate the peak by allocator retention (seen: chunk 128 at V=49155 read 2x its live bytes).
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"child {variant} V={vocab} fraction={fraction} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- rows, checks, output

def plan(args: argparse.Namespace) -> List[Tuple[int, str, float]]:
    """(vocab, variant, fraction) to measure: fraction-free variants once, with the first fraction."""
    todo = []
    for vocab in args.vocabs:
        for variant in args.variant_list:
            for fraction in (args.fractions[:1] if variant in FRACTION_FREE else args.fractions):
                todo.append((vocab, variant, fraction))
    return todo


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """+step memory and time of each row relative to materialised at the same vocab."""
    for r in rows:
        base = next((b for b in rows if b["vocab"] == r["vocab"] and b["variant"] == "materialised"), None)
        if base is not None:
            r["step_mem_over_materialised"] = r["step_bytes"] / base["step_bytes"]
            r["time_over_materialised"] = r["median_step_s"] / base["median_step_s"]


def check_full_size_losses(rows: List[Dict[str, Any]]) -> None:
    """Rows on the same labels (vocab, fraction) must report the same loss; raises otherwise."""
    for r in rows:
        for o in rows:
            if (o["vocab"], o["fraction"]) == (r["vocab"], r["fraction"]) and o is not r:
                rel = abs(o["loss"] - r["loss"]) / abs(r["loss"])
                if not rel <= TOLERANCE:
                    raise AssertionError(f"full-size loss of {o['variant']} {o['loss']} != {r['variant']} "
                                         f"{r['loss']} (V={r['vocab']}, fraction {r['fraction']}, rel {rel:.1e})")


def print_table(rows: List[Dict[str, Any]]) -> None:
    mib = 2 ** 20
    print(f"\n{'vocab':>6} {'variant':<16} {'fraction':>8} {'trained':>7} {'logits MiB':>10} {'peak MiB':>8} "
          f"{'+step MiB':>9} {'x mat.':>6} {'fwd s':>7} {'f+b s':>7} {'x mat.':>6} {'loss':>10}")
    for r in rows:
        fraction = "any" if r["variant"] in FRACTION_FREE else f"{r['fraction']:g}"
        print(f"{r['vocab']:>6} {r['variant']:<16} {fraction:>8} {r['trained_share']:>7.3f} "
              f"{r['logits_bytes'] / mib:>10.0f} {r['peak_rss'] / mib:>8.0f} {r['step_bytes'] / mib:>9.0f} "
              f"{r.get('step_mem_over_materialised', float('nan')):>6.2f} {r['median_fwd_s']:>7.2f} "
              f"{r['median_step_s']:>7.2f} {r.get('time_over_materialised', float('nan')):>6.2f} {r['loss']:>10.6f}")


def write_png(rows: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"V={r['vocab']}\n{r['variant']}" + ("" if r["variant"] in FRACTION_FREE else f"\n@{r['fraction']:g}")
              for r in rows]
    fig, (ax_mem, ax_time) = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(rows)), 7), sharex=True)
    ax_mem.bar(range(len(rows)), [r["step_bytes"] / 2 ** 20 for r in rows])
    ax_mem.set_ylabel("+step peak RSS (MiB)")
    ax_time.bar(range(len(rows)), [r["median_step_s"] for r in rows])
    ax_time.set_ylabel("forward + backward (s)")
    ax_time.set_xticks(range(len(rows)), labels, fontsize=7)
    sizes = "; ".join(f"T={t}, H={h}" for t, h in sorted({(r["tokens"], r["hidden"]) for r in rows}))
    ax_mem.set_title(f"LM loss + backward, {sizes}, fp32 CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


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


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", default="49155,100352", help="comma list of vocabulary sizes")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--trained-fraction", default="0.4,1.0", help="comma list: share of each example trained")
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--variants", default="all", help=f"'all' or a comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per child (median reported)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps per child (their memory counts)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "loss_memory.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in --json except those measured again (one file from several runs)")
    ap.add_argument("--png", default=None, help="also plot memory and time of every row of --json here")
    # internal: the measuring child
    ap.add_argument("--_child", dest="child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--vocab-one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fraction-one", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.vocabs = [int(v) for v in args.vocab.split(",")]
    args.fractions = [float(f) for f in args.trained_fraction.split(",")]
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    # materialised first: the reference of the ratios
    args.variant_list = sorted(set(names) | {"materialised"}, key=list(VARIANTS).index)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print(f"torch {torch.__version__}, commit {git_commit()}, {info['cpu']}, {args.threads} threads; "
          f"T={args.tokens}, H={args.hidden}, chunk {args.chunk_tokens}, {args.warmup} warmup + {args.steps} "
          f"timed step(s) per child")
    worst = check_exactness(args.fractions, [v for v in args.variant_list if v != "materialised"])
    print("exact vs materialised at T={tokens}, H={hidden}, V={vocab}, chunk {chunk_tokens} (max rel err of loss, "
          "grad h, grad W): ".format(**CHECK_SIZE) + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    rows: List[Dict[str, Any]] = []
    for vocab, variant, fraction in plan(args):
        res = measure(variant, vocab, fraction, args)
        row = dict(vocab=vocab, variant=variant, fraction=fraction, tokens=args.tokens, hidden=args.hidden,
                   chunk_tokens=args.chunk_tokens if "chunked" in variant else 0,
                   logits_bytes=args.tokens * vocab * 4, step_bytes=res["peak_rss"] - res["setup_rss"],
                   median_fwd_s=statistics.median(res["fwd_times_s"]),
                   median_step_s=statistics.median(res["step_times_s"]), **res)
        print(f"  V={vocab} {variant} fraction {fraction:g}: +{row['step_bytes'] / 2**20:.0f} MiB, "
              f"{row['median_step_s']:.2f} s, loss {row['loss']:.6f}", flush=True)
        rows.append(row)
    add_ratios(rows)
    print_table(rows)
    meta = dict(machine=info, torch=torch.__version__, commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M"),
                malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD),
                check=dict(**CHECK_SIZE, max_rel_err=worst),
                args={k: v for k, v in vars(args).items() if k not in ("child", "variant", "vocab_one", "fraction_one")})
    all_rows = write_json(Path(args.json), meta, rows, args.merge)
    if args.png:
        write_png(all_rows, Path(args.png))
    check_full_size_losses(rows)  # after writing: the measurement is kept for inspection either way


if __name__ == "__main__":
    main()
