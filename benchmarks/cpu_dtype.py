"""fp32 vs bf16 autocast on this CPU, by micro-batch size: what `trainer.dtype=auto` should pick.

    python benchmarks/cpu_dtype.py [--sizes 512 1024 2048 4096] [--steps 8] [--repeats 1]
        [--json benchmarks/results/cpu_dtype.json] [-- extra overrides]

For each micro-batch size it trains `recipe=sft_tiny` (the hybrid tiny model; any overrides after
`--`, e.g. `model.path=runs/sft_tiny/final recipe=sft`) with `trainer.dtype=fp32` and then
`trainer.dtype=bf16`, back to back (so both see the same machine; `data.max_length` at most the
micro-batch, over-long examples truncated alike), `--steps` optimizer steps of
4096 tokens each, and reads the run's metrics.jsonl: tokens/s (median over the steps after the
first, which compiles and warms the allocator) and the peak RSS of a step (max over steps). The
ratios bf16 / fp32 are what the choice rests on. Check `uptime` first: a second job on the cores
changes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_results  # noqa: E402


def run(size: int, dtype: str, steps: int, extra: List[str]) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "granite_train", "recipe=sft_tiny", f"trainer.dtype={dtype}",
               f"trainer.micro_batch_tokens={size}", f"data.max_length={min(size, 2048)}",
               "trainer.tokens_per_step=4096", f"trainer.max_steps={steps}",
               "trainer.progress=false", "trainer.save_every=0",
               f"trainer.output_dir={out}", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") != "eval"]
    return {"micro_batch_tokens": size, "dtype": dtype,
            "tokens_per_s": statistics.median(r["tokens_per_sec"] for r in rows[1:]),
            "peak_rss_gib": max(r["host_rss_peak_gib"] for r in rows),
            "final_loss": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default="benchmarks/results/cpu_dtype.json", help="'' to skip")
    ap.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    args = ap.parse_args()
    results = []
    print(f"load {os.getloadavg()[0]:.2f}; recipe=sft_tiny {' '.join(args.extra)}")
    print(f"{'micro-batch':>11} {'fp32 tok/s':>10} {'bf16 tok/s':>10} {'speed':>6} {'fp32 GiB':>9} {'bf16 GiB':>9} {'memory':>7}")
    for size in args.sizes:
        fp32, bf16 = (run(size, d, args.steps, args.extra) for d in ("fp32", "bf16"))
        results += [fp32, bf16]
        print(f"{size:>11} {fp32['tokens_per_s']:>10.0f} {bf16['tokens_per_s']:>10.0f} "
              f"{bf16['tokens_per_s'] / fp32['tokens_per_s']:>5.2f}x {fp32['peak_rss_gib']:>9.2f} "
              f"{bf16['peak_rss_gib']:>9.2f} {bf16['peak_rss_gib'] / fp32['peak_rss_gib']:>6.2f}x", flush=True)
    write_results(args.json, args, results=results)

if __name__ == "__main__":
    main()
