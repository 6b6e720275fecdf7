"""One training step (forward + backward, fp32, CPU), ours vs transformers, same examples, same weights.

    python benchmarks/vs_transformers.py --model hybrid|moe|dense|all --steps N --tokens 4096 \
        --threads 2 [--max-length 1024] [--json out.json] [--profile]

Examples: the first optimizer step of the demo data (`demo:chitchat`, Granite chat template,
bundled GPT-2 BPE, bfd packing, `max_length`), one micro-batch of <= `--tokens` tokens.

* ours: `GraniteForCausalLM` on the packed row (cu_seq_lens, per-example attention / Mamba state).
* transformers packed: one row, `position_ids` restarting per example, `use_cache=False`, no
  attention mask (transformers' own padding-free path; dense/MoE only: it leaks across examples
  for the hybrid on CPU, REFERENCE.md section 2).
* transformers padded: the same examples right-padded into [B, L] with `attention_mask`.

Weights: a random init of the preset (`configs/model/<preset>.yaml`, vocab from the tokenizer) is
written with `save_model`; ours reads it with `load_model`, transformers with `from_pretrained`.
The step trains what the trainer trains: LM loss (+ `router_aux_loss_coef` x load-balancing loss
for MoE families; transformers: `output_router_logits=True`). Before timing, the LM losses (and
aux losses) of every configuration are compared; they must agree to ~1e-5 in fp32 (all use the
mean over trained tokens).

Timing: warmup steps, then `--steps` rounds; in each round every configuration runs one step,
in a rotating order, in this one process (noise hits all alike); median per configuration.
tokens/s counts real (non-padding) tokens. Peak memory: each configuration again in a fresh
subprocess (model from the checkpoint, batch from a file): peak RSS (VmHWM) after two steps, and
its increase over the RSS right after setup. No timed assertions: this is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from common import hwm_bytes, rss_bytes

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"hybrid": "granite-4.0-h-tiny-scaled", "moe": "granitemoe-tiny", "dense": "granite-tiny"}
HF_CLASSES = {"granitemoehybrid": "GraniteMoeHybridForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
              "granite": "GraniteForCausalLM"}
# transformers variants run per model: the hybrid cannot be packed correctly by transformers on CPU.
HF_VARIANTS = {"hybrid": ("padded",), "moe": ("packed", "padded"), "dense": ("packed", "padded")}


# ---------------------------------------------------------------- setup


def build_batches(tokens: int, max_length: int, step_index: Optional[int] = None):
    """(ours packed, transformers packed, transformers padded, tokenizer, info) for one step."""
    from granite_train.config import DataConfig, TrainerConfig
    from granite_train.data import build_train_data, collate_padded, load_tokenizer

    tok = load_tokenizer("gpt2-bundled", None)
    data = build_train_data(DataConfig(path="demo:chitchat", max_length=max_length),
                            TrainerConfig(tokens_per_step=tokens, micro_batch_tokens=tokens), tok, 0, 1)
    # bfd puts the longest examples first; take the micro-batch whose padding overhead
    # (B x longest / real tokens, if padded) is the median of the epoch: a typical one.
    plans = data.plan(0)
    ratios = []
    for p in plans:
        assert p.num_micro_batches == 1, p.num_micro_batches
        lens = data.lengths[list(p.ranks[0][0])]
        ratios.append(len(lens) * lens.max() / lens.sum())
    order = sorted(range(len(ratios)), key=lambda i: (ratios[i], i))
    index = order[len(order) // 2] if step_index is None else step_index
    step = next(itertools.islice(data.steps(), index, None))
    packed = step.micro_batches[0]
    q = lambda f: float(sorted(ratios)[int(f * (len(ratios) - 1))])
    info = dict(step_index=index, steps_in_epoch=len(plans), padded_over_real=float(ratios[index]),
                padded_over_real_p10_p50_p90=[q(0.1), q(0.5), q(0.9)])
    cu = packed["cu_seq_lens"].tolist()
    ids, labels = packed["input_ids"][0], packed["labels"][0]
    examples = [{"input_ids": ids[s:e].numpy(), "labels": labels[s:e].numpy()} for s, e in zip(cu[:-1], cu[1:])]
    padded = collate_padded(examples, tok.pad_token_id)
    hf_packed = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"], "labels": packed["labels"]}
    hf_padded = {k: padded[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
    # The same trained-token set: packed masks each example's first label; padded masks it too.
    n_packed = int((packed["labels"][:, 1:] != -100).sum())
    n_padded = int((padded["labels"][:, 1:] != -100).sum())
    assert n_packed == n_padded, (n_packed, n_padded)
    return packed, hf_packed, hf_padded, tok, info


def make_checkpoint(kind: str, tok, out: Path, seed: int = 0) -> Path:
    import yaml

    from granite_train.models import GraniteConfig, build_model, save_model

    arch = yaml.safe_load((REPO / "configs" / "model" / f"{PRESETS[kind]}.yaml").read_text())["arch"]
    cfg = GraniteConfig(**arch)
    cfg.vocab_size = tok.vocab_size
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    cfg.bos_token_id = tok.token_to_id(tok.bos_token or tok.eos_token)
    torch.manual_seed(seed)
    save_model(build_model(cfg), out / kind)
    return out / kind


def load_ours(path: Path):
    from granite_train.models import load_model

    return load_model(path, dtype=torch.float32).train()


def load_theirs(path: Path):
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, HF_CLASSES[cfg["model_type"]])
    with contextlib.redirect_stderr(io.StringIO()):
        model = cls.from_pretrained(path, dtype=torch.float32)
    return model.train()


# ---------------------------------------------------------------- steps

def ours_forward(model, batch):
    out = model(batch["input_ids"], position_ids=batch["position_ids"], seq_idx=batch["seq_idx"],
                cu_seq_lens=batch["cu_seq_lens"], max_seq_len=batch["max_seq_len"], labels=batch["labels"],
                return_logits=False)  # the trainer's path: lm_head only where a token is trained
    total = out.loss
    if out.aux_loss is not None:
        total = total + model.config.router_aux_loss_coef * out.aux_loss
    return total, out.loss, out.aux_loss


def theirs_forward(model, batch, router_logits: bool):
    kw = {"output_router_logits": True} if router_logits else {}
    out = model(**batch, use_cache=False, **kw)
    aux = getattr(out, "aux_loss", None)
    return out.loss, aux


def make_step(kind: str, model, batch) -> Callable[[], float]:
    moe = kind in ("moe", "hybrid")

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if isinstance(batch.get("cu_seq_lens"), torch.Tensor):
            loss = ours_forward(model, batch)[0]
        else:
            loss = theirs_forward(model, batch, router_logits=moe)[0]
        loss.backward()
        return float(loss.detach())

    return step


def _ours_name(hf_name: str) -> str:
    """transformers 5's in-memory parameter name -> ours (= the on-disk name)."""
    return (hf_name.replace("router.weight", "router.layer.weight")
            .replace("experts.gate_up_proj", "input_linear.weight").replace("experts.down_proj", "output_linear.weight"))


def _grads(model, step) -> Dict[str, torch.Tensor]:
    step()
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def agreement(kind: str, ours, ours_batch, theirs, hf_batches: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """LM loss, aux loss and gradients of ours vs each transformers variant (same weights).

    Gradients: max over parameters of |g_ours - g_theirs| / |g_ours|. transformers builds its
    embedding with `padding_idx=pad_token_id`, so the pad token's row gets no gradient from the
    input side; with pad = EOS (GPT-2 BPE, Granite) that row is real data, which ours trains. That
    row is compared separately (`pad_row_rel_diff`) and left out of the max.
    """
    moe = kind in ("moe", "hybrid")
    res: Dict[str, Any] = {}
    with torch.no_grad():
        _, o_loss, o_aux = ours_forward(ours, ours_batch)
    res["ours_loss"] = float(o_loss)
    if o_aux is not None:
        res["ours_aux"] = float(o_aux)
    g_ours = _grads(ours, make_step(kind, ours, ours_batch))
    pad = theirs.config.pad_token_id
    for variant, b in hf_batches.items():
        with torch.no_grad():
            t_loss, _ = theirs_forward(theirs, b, router_logits=False)  # LM loss only
            if moe:
                _, t_aux = theirs_forward(theirs, b, router_logits=True)
                res[f"{variant}_aux"] = float(t_aux)
                res[f"{variant}_aux_abs_diff"] = abs(float(t_aux) - float(o_aux))
        res[f"{variant}_loss"] = float(t_loss)
        res[f"{variant}_loss_abs_diff"] = abs(float(t_loss) - float(o_loss))
        g_theirs = {_ours_name(n): g for n, g in _grads(theirs, make_step(kind, theirs, b)).items()}
        assert set(g_theirs) == set(g_ours), sorted(set(g_theirs) ^ set(g_ours))[:6]
        worst, worst_name = 0.0, ""
        for name, go in g_ours.items():
            gt = g_theirs[name].reshape(go.shape)
            if name == "model.embed_tokens.weight" and pad is not None:
                res[f"{variant}_pad_row_rel_diff"] = float((go[pad] - gt[pad]).norm() / go[pad].norm().clamp_min(1e-30))
                go, gt = go.clone(), gt.clone()
                go[pad] = gt[pad] = 0
            rel = float((go - gt).norm() / go.norm().clamp_min(1e-30))
            if rel > worst:
                worst, worst_name = rel, name
        res[f"{variant}_grad_max_rel_diff"] = worst
        res[f"{variant}_grad_worst_param"] = worst_name
    return res


# ---------------------------------------------------------------- memory child

def memory_child(args) -> None:
    """Fresh process: load one model and one batch, two steps, report RSS."""
    torch.set_num_threads(args.threads)
    batch = torch.load(args.batch_file, weights_only=True)  # tensors and plain data only
    if args.side == "ours":
        model = load_ours(Path(args.ckpt))
    else:
        model = load_theirs(Path(args.ckpt))
    step = make_step(args.kind, model, batch)
    gc.collect()
    setup_rss, setup_hwm = rss_bytes(), hwm_bytes()
    for _ in range(2):
        step()
    peak = hwm_bytes()
    print(json.dumps({"setup_rss": setup_rss, "setup_peak_rss": setup_hwm, "peak_rss": peak}))


def measure_memory(kind: str, side: str, ckpt: Path, batch: Dict[str, Any], threads: int, tmp: Path) -> Dict[str, int]:
    batch_file = tmp / f"{kind}-{side}.pt"
    torch.save(batch, batch_file)
    cmd = [sys.executable, __file__, "--_memory-child", "--kind", kind, "--side", side, "--ckpt", str(ckpt),
           "--batch-file", str(batch_file), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise RuntimeError(f"memory child {kind}/{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- profile

def profile_ours(ours, batch, kind: str, top: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    step = make_step(kind, ours, batch)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ---------------------------------------------------------------- main

def run_model(kind: str, args, batches, tok, tmp: Path) -> List[Dict[str, Any]]:
    packed, hf_packed, hf_padded = batches
    ckpt = make_checkpoint(kind, tok, tmp)
    ours, theirs = load_ours(ckpt), load_theirs(ckpt)
    hf_batches = {v: {"packed": hf_packed, "padded": hf_padded}[v] for v in HF_VARIANTS[kind]}
    real = int(packed["input_ids"].numel())
    print(f"\n== {kind} ({PRESETS[kind]}, {ours.num_parameters() / 1e6:.1f}M parameters; transformers "
          f"attn={theirs.config._attn_implementation}"
          f"{', experts=' + str(theirs.config._experts_implementation) if kind != 'dense' else ''})")

    agree = agreement(kind, ours, packed, theirs, hf_batches)
    for v in hf_batches:
        msg = (f"   loss ours {agree['ours_loss']:.7f} vs transformers {v} {agree[f'{v}_loss']:.7f}: "
               f"|diff| {agree[f'{v}_loss_abs_diff']:.2e}")
        if f"{v}_aux" in agree:
            msg += f"; aux {agree['ours_aux']:.6f} vs {agree[f'{v}_aux']:.6f} (|diff| {agree[f'{v}_aux_abs_diff']:.1e})"
        msg += (f"; grads: max rel diff {agree[f'{v}_grad_max_rel_diff']:.1e} ({agree[f'{v}_grad_worst_param']})")
        if f"{v}_pad_row_rel_diff" in agree:
            msg += f", pad(=EOS) embedding row rel diff {agree[f'{v}_pad_row_rel_diff']:.1e} (transformers' padding_idx)"
        print(msg)

    configs = {"ours packed": (make_step(kind, ours, packed), real, real)}
    for v, b in hf_batches.items():
        configs[f"transformers {v}"] = (make_step(kind, theirs, b), real, int(b["input_ids"].numel()))
    names = list(configs)
    for _ in range(args.warmup):
        for n in names:
            configs[n][0]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(args.steps):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no fixed position
        for n in order:
            t0 = time.perf_counter()
            configs[n][0]()
            times[n].append(time.perf_counter() - t0)

    rows = []
    ours_tps = real / statistics.median(times["ours packed"])
    for n in names:
        med = statistics.median(times[n])
        slots = configs[n][2]
        side = "ours" if n.startswith("ours") else "theirs"
        batch = packed if side == "ours" else hf_batches[n.split()[-1]]
        mem = measure_memory(kind, side, ckpt, batch, args.threads, tmp) if not args.no_memory else {}
        rows.append(dict(model=kind, preset=PRESETS[kind], config=n, real_tokens=real, slots=slots,
                         shape=list(batch["input_ids"].shape), examples=len(packed["cu_seq_lens"]) - 1,
                         median_step_s=med, step_times_s=times[n], real_tokens_per_s=real / med,
                         ours_over_this=ours_tps / (real / med), **mem, agreement=agree))
    if args.profile:
        rows[0]["profile"] = profile_ours(ours, packed, kind)
    return rows


def print_table(rows: List[Dict[str, Any]]) -> None:
    print(f"\n{'model':<7} {'config':<21} {'shape':>11} {'real tok':>8} {'slots':>6} {'step s':>7} "
          f"{'real tok/s':>10} {'ours/this':>9} {'peak RSS MiB':>12} {'+step MiB':>9}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        mem = (f"{r['peak_rss'] / 2**20:>12.0f} {(r['peak_rss'] - r['setup_rss']) / 2**20:>9.0f}"
               if "peak_rss" in r else f"{'-':>12} {'-':>9}")
        print(f"{r['model']:<7} {r['config']:<21} {shape:>11} {r['real_tokens']:>8} {r['slots']:>6} "
              f"{r['median_step_s']:>7.2f} {r['real_tokens_per_s']:>10.0f} {r['ours_over_this']:>9.2f} {mem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["hybrid", "moe", "dense", "all"], default="all")
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096, help="micro-batch token budget")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--step-index", type=int, default=None,
                    help="which optimizer step's micro-batch (default: the median padding overhead)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--profile", action="store_true", help="torch.profiler top-15 ops of one step of ours")
    # internal: the peak-memory child
    ap.add_argument("--_memory-child", dest="memory_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args)

    import logging
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    import transformers

    packed, hf_packed, hf_padded, tok, info = build_batches(args.tokens, args.max_length, args.step_index)
    lens = (packed["cu_seq_lens"][1:] - packed["cu_seq_lens"][:-1]).tolist()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"batch: {len(lens)} examples, {sum(lens)} real tokens (lengths {sorted(lens, reverse=True)}); "
          f"padded [{hf_padded['input_ids'].shape[0]}, {hf_padded['input_ids'].shape[1]}] = "
          f"{hf_padded['input_ids'].numel()} slots")
    print(f"micro-batch = step {info['step_index']} of {info['steps_in_epoch']} (median padding overhead; padded "
          f"slots / real tokens p10/p50/p90 over the epoch: "
          f"{'/'.join(f'{x:.2f}' for x in info['padded_over_real_p10_p50_p90'])})")
    kinds = ["hybrid", "moe", "dense"] if args.model == "all" else [args.model]
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vs_transformers-") as d:
        for kind in kinds:
            rows += run_model(kind, args, (packed, hf_packed, hf_padded), tok, Path(d))
            print_table([r for r in rows if r["model"] == kind])
    print_table(rows)
    for r in rows:
        if "profile" in r:
            print(f"\nprofile, ours, {r['model']} (one step, top 15 by self CPU time):\n{r['profile']}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(torch=torch.__version__, transformers=transformers.__version__, threads=args.threads,
                    steps=args.steps, warmup=args.warmup, tokens=args.tokens, max_length=args.max_length,
                    batch=info)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
