"""Scaling on one machine: 1 vs 2 processes (gloo), with and without expert parallelism, and an
analytic estimate of the expert all-to-all traffic at a real node's scale.

    python benchmarks/scaling.py --steps 12 --warmup 2 [--model moe|hybrid] \
        [--json benchmarks/results/scaling.json]

Every configuration trains the same steps (same data, same global batch of
`--tokens-per-step` tokens in micro-batches of `--micro-batch-tokens`) through the real CLI
(`python -m granite_train` or `torchrun --nproc_per_node=2 -m granite_train`), fp32, on CPU:

* 1 process with 2 threads and with 1 thread (what a laptop smoke test runs),
* 2 processes x 1 thread: plain data parallel, DeepSpeed ZeRO-2, ZeRO-2 + expert parallelism 2.

Throughput = global input tokens per step / rank 0's step time, median over the steps after
`--warmup` (read from metrics.jsonl); the per-step losses of every configuration are compared
with the first (they must agree to ~1e-5: the same math). The configurations run one after the
other, so machine noise is not shared; repeat to see the spread.

The estimate: per MoE layer and micro-batch, every rank sends tokens x top_k rows of the hidden
size to the experts' ranks and gets as many back (forward), and the backward sends the same
again; with uniform routing (E - 1) / E of the rows leave the rank. Printed for
Granite-4.0-H-Tiny (configs/model/granite-4.0-h-tiny.yaml) at expert_parallel_size 8 in bf16,
next to the step's model FLOPs, to show how much link bandwidth keeps the all-to-all hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from common import git_commit

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "moe": ["model=granitemoe-tiny", "model.arch.num_local_experts=8"],
    "hybrid": ["model=granite-4.0-h-tiny-scaled"],
}
CONFIGS = {
    "1 proc x 2 threads": dict(procs=1, threads=2, extra=[]),
    "1 proc x 1 thread": dict(procs=1, threads=1, extra=[]),
    "2 procs plain DP": dict(procs=2, threads=1, extra=[]),
    "2 procs ZeRO-2": dict(procs=2, threads=1, extra=["distributed.zero_stage=2"]),
    "2 procs ZeRO-2 + EP 2": dict(procs=2, threads=1, extra=["distributed.zero_stage=2",
                                                              "distributed.expert_parallel_size=2"]),
}


def _run(name: str, spec: Dict[str, Any], common: List[str], out: Path) -> Dict[str, Any]:
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(spec["threads"]))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec['procs']}"]
                if spec["procs"] > 1 else [sys.executable])
    cmd = [*launcher, "-m", "granite_train", *common, *spec["extra"], f"trainer.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": [r for r in rows if r.get("split") != "eval"]}


def _summary(rows: List[Dict[str, Any]], warmup: int) -> Dict[str, float]:
    timed = rows[warmup:]
    return {"tokens_per_s": statistics.median(r["tokens_per_sec"] for r in timed),
            "step_s": statistics.median(r["step_time_s"] for r in timed)}


def all_to_all_estimate(preset: str, tokens_per_rank: int, ep: int, bytes_per_value: int) -> Dict[str, float]:
    """Bytes each rank sends per micro-batch (forward + backward) over all MoE layers."""
    from omegaconf import OmegaConf

    from granite_train.models import GraniteConfig, build_model

    arch = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{preset}.yaml").arch)
    cfg = GraniteConfig(**{k: v for k, v in arch.items() if v is not None})
    import torch

    from granite_train.models.moe import MoE

    with torch.device("meta"):
        model = build_model(cfg)
    rows = tokens_per_rank * cfg.num_experts_per_tok
    per_layer = 4 * rows * cfg.hidden_size * bytes_per_value * (ep - 1) / ep  # dispatch+combine, fwd+bwd
    moe_layers = sum(isinstance(m, MoE) for m in model.modules())
    flops = tokens_per_rank * model.flops_per_token(tokens_per_rank)
    return {"preset": preset, "tokens_per_rank": tokens_per_rank, "expert_parallel_size": ep,
            "top_k": cfg.num_experts_per_tok, "hidden_size": cfg.hidden_size, "moe_layers": moe_layers,
            "bytes_sent_per_rank": per_layer * moe_layers, "train_flops_per_rank": flops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="moe")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--micro-batch-tokens", type=int, default=2048)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--json", default="benchmarks/results/scaling.json")
    args = ap.parse_args()
    common = ["recipe=sft_tiny", *MODELS[args.model], "trainer.dtype=fp32", "trainer.progress=false",
              f"trainer.tokens_per_step={args.tokens_per_step}", f"trainer.micro_batch_tokens={args.micro_batch_tokens}",
              "data.max_length=2048", f"trainer.max_steps={args.steps}", "trainer.log_every=1",
              "trainer.save_every=0", "trainer.keep_checkpoints=1"]
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            results[name] = _run(name, CONFIGS[name], common, Path(tmp) / f"run{len(results)}")
            print(f"done: {name}", file=sys.stderr, flush=True)

    first = next(iter(results.values()))["rows"]
    table = []
    base = None
    for name, res in results.items():
        rows = res["rows"]
        drift = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(first, rows))
        s = _summary(rows, args.warmup)
        base = base or s["tokens_per_s"]
        table.append({"config": name, **s, "vs_first": s["tokens_per_s"] / base, "max_loss_rel_diff": drift})
    print(f"\n{'configuration':<26} {'tokens/s':>9} {'step s':>8} {'vs first':>9} {'loss diff':>10}")
    for r in table:
        print(f"{r['config']:<26} {r['tokens_per_s']:>9.0f} {r['step_s']:>8.3f} {r['vs_first']:>9.2f} "
              f"{r['max_loss_rel_diff']:>10.1e}")

    est = all_to_all_estimate("granite-4.0-h-tiny", 4096, 8, 2)
    gb = est["bytes_sent_per_rank"] / 1e9
    print(f"\nGranite-4.0-H-Tiny, EP 8, bf16, 4,096 tokens per rank per micro-batch: {gb:.1f} GB sent per "
          f"rank (forward + backward, {est['moe_layers']} MoE layers, top-{est['top_k']}, hidden "
          f"{est['hidden_size']}); model FLOPs {est['train_flops_per_rank']:.2e} per rank.")
    for link_gbs, label in ((450, "NVLink 4 via NVSwitch, ~450 GB/s"), (50, "400 Gb/s InfiniBand, 50 GB/s")):
        comm_ms = gb / link_gbs * 1e3
        compute_ms = est["train_flops_per_rank"] / (989e12 * 0.4) * 1e3
        print(f"  {label}: all-to-all {comm_ms:.0f} ms vs compute {compute_ms:.0f} ms at 40% MFU of an "
              f"H100 (989 TFLOP/s bf16 dense): {comm_ms / compute_ms:.0%} of compute if not overlapped")

    import torch

    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "commit": git_commit(), "args": vars(args), "rows": table,
           "all_to_all_estimate": est}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
