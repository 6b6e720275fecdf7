"""Per-rank host memory of a real-width Granite-4.0-H checkpoint under DeepSpeed, against theory.

    python benchmarks/zero_memory.py --layers 4 --ranks 2 --stage 3      # the 750M case of issue 15

Builds (once) a random Granite-4.0-H-Tiny-width checkpoint with `--layers` layers (hidden 1536,
64 experts of 512 top-6, shared MLP 1024, Mamba 48 x 64 heads, vocab 100352; attention at layer
1 when there are >= 2 layers), saves it in HF layout, then runs the trainer on it exactly as a
user would (`torchrun --nproc_per_node=R -m granite_train recipe=sft model.path=...`, one step of
one `--micro`-token micro-batch per rank, fp32) and reports for every rank:

- `weights loaded`: the trainer's own log line (host RSS once the weights are in place);
- `first step`: metrics.jsonl's host_rss_peak_gib_max_rank (the peak during step 1);
- `whole run`: the peak RSS (VmHWM) of each rank's process, sampled every 0.2 s until it exits,

against ZeRO's arithmetic: 16 bytes x P / R (fp32 weights + gradients + Adam m and v) for ZeRO-3,
plus DeepSpeed's fp32 master partition (4 B x P / R) it keeps besides the module's weights. A
sampler kills the run when the machine's free memory falls under 0.7 GiB (an OOM would take the
shell with it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, git_commit

GIB = 2 ** 30


def build_checkpoint(path: Path, layers: int, build: bool = False) -> int:
    """The checkpoint (kept between runs; `build`: write it if missing); returns its parameter
    count. Written by a child process so that this one stays small while the ranks run."""
    import torch

    from granite_train.cli import compose_config
    from granite_train.models import build_model, save_model

    types = ["mamba"] * layers
    if layers >= 2:
        types[1] = "attention"
    cfg = compose_config(["model=granite-4.0-h-tiny", f"model.arch.num_hidden_layers={layers}",
                          f"model.arch.layer_types=[{','.join(types)}]"]).model.arch
    if build and not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = build_model(cfg)
        save_model(model, path, max_shard_size="2GB")
        from granite_train.data.tokenizer import load_tokenizer
        load_tokenizer("gpt2-bundled", None).save(path)
        del model
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def _vm(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ranks(agent: int) -> dict:
    out = subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in map(int, out):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        found = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if found:
            ranks[int(found[0])] = pid
    return ranks


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run(ckpt: Path, out: Path, ranks: int, stage: int, micro: int, dtype: str) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "granite_train", "recipe=sft", f"model.path={ckpt}", "data.max_examples=200",
            f"data.max_length={micro}", f"trainer.micro_batch_tokens={micro}",
            f"trainer.tokens_per_step={micro * ranks}", "trainer.max_steps=1", f"trainer.dtype={dtype}",
            f"distributed.zero_stage={stage}", "model.activation_checkpointing=true", "trainer.save_every=0",
            f"trainer.output_dir={out}", "trainer.resume=false"]
    log = (out.parent / f"{out.name}.log").open("w")
    agent = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent)
    peak = {}
    killed = False
    while agent.poll() is None:
        for rank, pid in _ranks(agent.pid).items():
            peak[rank] = max(peak.get(rank, 0), _vm(pid, "VmHWM"))
        if _available() < 0.7 * GIB:
            agent.kill()
            killed = True
            break
        time.sleep(0.2)
    agent.wait()
    log.close()
    text = (out.parent / f"{out.name}.log").read_text()
    loaded = {int(r): float(g) for r, g in re.findall(r"weights loaded: rank (\d+) host RSS ([\d.]+) GiB", text)}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    return {"rc": agent.returncode, "killed_low_memory": killed, "weights_loaded_gib": loaded,
            "first_step_peak_gib_max_rank": metrics[0]["host_rss_peak_gib_max_rank"] if metrics else None,
            "run_peak_gib": {r: round(v / GIB, 2) for r, v in sorted(peak.items())},
            "log_tail": text.strip().splitlines()[-3:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--micro", type=int, default=512)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--work", type=Path, default=Path("/tmp/zero_memory"))
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / f"h-tiny-{args.layers}l"
    if args.build_only:
        build_checkpoint(ckpt, args.layers, build=True)
        return 0
    if not (ckpt / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--build-only", f"--layers={args.layers}",
                        f"--work={args.work}"], check=True)
    params = build_checkpoint(ckpt, args.layers)
    result = run(ckpt, args.work / f"run-z{args.stage}-r{args.ranks}", args.ranks, args.stage, args.micro, args.dtype)
    theory = {"zero3_16B_per_rank_gib": 16 * params / args.ranks / GIB,
              "zero3_with_fp32_master_20B_per_rank_gib": 20 * params / args.ranks / GIB,
              "replicated_16B_gib": 16 * params / GIB}
    record = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "params": params,
              "layers": args.layers, "ranks": args.ranks, "stage": args.stage, "dtype": args.dtype,
              "micro_batch_tokens": args.micro, **{k: round(v, 2) for k, v in theory.items()}, **result}
    print(json.dumps(record, indent=2))
    results = REPO / "benchmarks" / "results" / "zero_memory.json"
    old = json.loads(results.read_text()) if results.is_file() else []
    results.write_text(json.dumps(old + [record], indent=2) + "\n")
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
