"""LoRA (r=16, every target) against full fine-tuning: step time and peak memory on the same
model and data, and the analytic GPU memory of 4.0-H-Tiny.

    python benchmarks/lora.py --layers 2 --micro 1024 --steps 4 --rounds 2 \
        [--json benchmarks/results/lora.json]
    python benchmarks/lora.py --table        # analytic per-GPU memory, 4.0-H-Tiny and -Small

Builds (once) the Granite-4.0-H-Tiny-width checkpoint of `benchmarks/zero_memory.py` with
`--layers` layers (hidden 1536, 64 experts of 512 top-6, shared MLP 1024, Mamba 48 x 64,
vocab 100352), then runs the trainer on it as a user would (`python -m granite_train
recipe=sft model.path=...`, `--steps` steps of one `--micro`-token micro-batch, `--dtype`), once
with full fine-tuning and once with `adapter=lora adapter.r=16
adapter.targets=[attention,mlp,shared_mlp,mamba,experts]`, alternating over `--rounds` rounds
so that both see the same machine load. Per mode: the median step time of steps 2.. (from
metrics.jsonl), the process's peak RSS (VmHWM, sampled), the trainable parameters, and the
checkpoint and final/ sizes; against the theory of bytes per parameter (weights + gradients +
AdamW's two moments: full fp32 = 16 B/param; LoRA = base 4 B (fp32) or 2 B (bf16) per base
parameter + 16 B per trainable one). Activations come on top of both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from common import git_commit, machine_info
from zero_memory import GIB, _dir_bytes, _sampled, build_checkpoint

TARGETS = "[attention,mlp,shared_mlp,mamba,experts]"


def lora_params(arch, r: int = 16) -> int:
    """Adapter parameters of `arch` with every target (counted on the meta device)."""
    import torch

    from granite_train.models import build_model
    from granite_train.models.lora import LoraSpec, attach_lora

    with torch.device("meta"):
        model = build_model(arch)
        attach_lora(model, LoraSpec(r=r, targets=("attention", "mlp", "shared_mlp", "mamba", "experts")))
        return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def run_mode(ckpt: Path, out: Path, mode: str, micro: int, steps: int, dtype: str) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "granite_train", "recipe=sft", f"model.path={ckpt}", "data.max_examples=400",
            f"data.max_length={micro}", f"trainer.micro_batch_tokens={micro}", f"trainer.tokens_per_step={micro}",
            f"trainer.max_steps={steps}", f"trainer.dtype={dtype}", "trainer.save_every=0", "trainer.resume=false",
            f"trainer.output_dir={out}", "trainer.progress=false"]
    if mode == "lora":
        args += ["adapter=lora", "adapter.r=16", "adapter.alpha=32", f"adapter.targets={TARGETS}"]
    shutil.rmtree(out, ignore_errors=True)
    rc, killed, peak, _, text = _sampled(args, out.parent / f"{out.name}.log", env)
    if rc != 0 or killed:
        raise SystemExit(f"{mode} run failed (rc {rc}, killed {killed}):\n{text[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") != "eval"]
    trainable = None
    for line in text.splitlines():
        if "M trainable parameters" in line:
            trainable = float(line.split("| ")[-1].split("M trainable")[0]) * 1e6
    ckpt_dir = sorted((out / "checkpoints").iterdir())[-1]
    return {"step_s": [r["step_time_s"] for r in rows[1:]], "loss": [r["loss"] for r in rows],
            "peak_rss_gib": peak.get(0), "trainable": trainable, "checkpoint_bytes": _dir_bytes(ckpt_dir),
            "final_bytes": _dir_bytes(out / "final"), "tokens": [r["input_tokens"] for r in rows]}


def theory_gib(n_params: int, n_lora: int, mode: str, base_bytes: int) -> float:
    if mode == "full":
        return n_params * 16 / GIB
    return (n_params * base_bytes + n_lora * 16) / GIB


def table() -> str:
    """Analytic per-GPU memory of weights + gradients + optimizer (no activations), one GPU."""
    from granite_train.cli import compose_config
    from granite_train.models.model import full_size

    lines = ["| model | parameters | LoRA r=16 (all targets) | full FT, bf16 + fp32 Adam (16 B/param) | "
             "LoRA: base bf16 + adapters fp32 with Adam (2 B + 16 B/adapter param) |",
             "|---|---|---|---|---|"]
    for preset in ("granite-4.0-h-tiny", "granite-4.0-h-micro", "granite-3.3-2b"):
        arch = compose_config([f"model={preset}"]).model.arch
        if arch.vocab_size is None:
            arch.vocab_size = 100352
        n, _ = full_size(arch)
        k = lora_params(arch)
        lines.append(f"| {preset} | {n / 1e9:.2f} B | {k / 1e6:.1f} M ({100 * k / n:.2f}%) | "
                     f"{n * 16 / 1e9:.1f} GB | {(2 * n + 16 * k) / 1e9:.1f} GB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/granite-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table())
        return 0
    ckpt = args.workdir / f"tiny-width-{args.layers}l"
    n_params = build_checkpoint(ckpt, args.layers, build=True)
    from granite_train.models.hf_io import read_config

    n_lora = lora_params(read_config(ckpt))
    load = [os.getloadavg()[0]]
    runs = {"full": [], "lora": []}
    for i in range(args.rounds):
        for mode in (("full", "lora") if i % 2 == 0 else ("lora", "full")):
            runs[mode].append(run_mode(ckpt, args.workdir / f"run-{mode}", mode, args.micro, args.steps, args.dtype))
            load.append(os.getloadavg()[0])
    base_bytes = 2 if args.dtype == "bf16" else 4
    result = {"commit": git_commit(), "machine": machine_info(os.cpu_count() or 1), "layers": args.layers,
              "micro_batch_tokens": args.micro, "steps": args.steps, "dtype": args.dtype, "parameters": n_params,
              "lora_parameters": n_lora, "loadavg_during": load}
    for mode, rs in runs.items():
        step = statistics.median(s for r in rs for s in r["step_s"])
        result[mode] = {"median_step_s": round(step, 3), "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                        "theory_state_gib": round(theory_gib(n_params, n_lora, mode, base_bytes), 2),
                        "checkpoint_mb": round(rs[-1]["checkpoint_bytes"] / 1e6, 1),
                        "final_mb": round(rs[-1]["final_bytes"] / 1e6, 1), "trainable": rs[-1]["trainable"],
                        "losses": rs[-1]["loss"]}
    result["ratio_step_time_lora_over_full"] = round(result["lora"]["median_step_s"] / result["full"]["median_step_s"], 3)
    result["ratio_peak_rss_lora_over_full"] = round(result["lora"]["peak_rss_gib"] / result["full"]["peak_rss_gib"], 3)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
