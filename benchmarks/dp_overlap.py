"""Plain data parallel on 2 CPU ranks (gloo): the gradient reduction overlapped with the backward
in buckets against the flat reduction after it (what `PlainEngine` did before, e7eb52a).

    python benchmarks/dp_overlap.py [--hidden 768] [--layers 6] [--vocab 49155] [--tokens 1024]
        [--micro-batches 2] [--buckets 0 5 25] [--iters 5] [--json benchmarks/results/dp_overlap.json]

Each rank (one thread, as torchrun gives it) builds the same dense Granite model once per mode
(AdamW at lr 0, so every copy keeps the same weights) and runs the trainer's own step
(`granite_train.train.step.train_step`) on the same packed micro-batches of `--tokens` tokens
each. Modes, timed round-robin (one step of each in turn, so that noise from the machine falls on
all of them alike), median of `--iters` after one warm-up:

- `flat`: autograd's gradients, zero-filled where a parameter got none, copied into one flat
  buffer, one all-reduce after the backward, copied back (the engine before buckets);
- `bucket_mb=0`: the gradients are views of one bucket, reduced after the backward (no copy);
- `bucket_mb=B`: buckets of <= B MiB, each reduced while the backward goes on.

Also recorded per mode: the bytes each step allocates for the reduction beyond the gradients
themselves (the flat copy) and every rank's loss (all modes must agree: the same sums).
Check `uptime` first: a second job on the 2 cores changes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_results  # noqa: E402

from granite_train.data import TrainStep  # noqa: E402
from granite_train.data.collator import collate_flat  # noqa: E402
from granite_train.models import GraniteConfig, GraniteForCausalLM  # noqa: E402
from granite_train.parallel.engine import PlainEngine  # noqa: E402
from granite_train.parallel.env import Env  # noqa: E402
from granite_train.parallel.grad_norm import clip_by_global_norm  # noqa: E402
from granite_train.parallel.plan import ParallelPlan  # noqa: E402
from granite_train.train.step import StepSettings, train_step  # noqa: E402


class FlatEngine(PlainEngine):
    """The plain engine before buckets: one flat copy and all-reduce after the backward."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:  # autograd's own gradients, as before
            p.grad = None
        self.buckets = None
        self.extra_bytes = 0

    def step(self, loss_is_finite: bool):
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.extra_bytes = flat.numel() * flat.element_size()
        dist.all_reduce(flat)
        for g, synced in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(synced.view_as(g))
        grad_norm = clip_by_global_norm(self.params, self.clip)
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped


def _model(args: argparse.Namespace) -> GraniteForCausalLM:
    cfg = GraniteConfig(model_type="granite", vocab_size=args.vocab, hidden_size=args.hidden,
                        intermediate_size=args.hidden * 8 // 3 // 64 * 64, num_hidden_layers=args.layers,
                        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                        max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return GraniteForCausalLM(cfg, attn_backend="sdpa")


def _micro_batches(rank: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    rng = np.random.default_rng(1000 + rank)
    mbs = []
    for _ in range(args.micro_batches):
        lengths = [args.tokens // 4] * 4  # four examples per micro-batch
        mbs.append(collate_flat(rng.integers(0, args.vocab, args.tokens, dtype=np.int64), None, np.array(lengths)))
    return mbs


def _worker(rank: int, size: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    env = Env(rank, size, 0, torch.device("cpu"), None)
    modes = ["flat", *[f"bucket_mb={b:g}" for b in args.buckets]]
    engines: Dict[str, PlainEngine] = {}
    for mode in modes:
        model = _model(args)
        plan = ParallelPlan(world_size=size, zero_stage=None, expert=None, matmul_params=model.active_matmul_params())
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        if mode == "flat":
            engines[mode] = FlatEngine(model, optimizer, env, 1.0, plan, 0.0)
        else:
            engines[mode] = PlainEngine(model, optimizer, env, 1.0, plan, float(mode.split("=")[1]))
    mbs = _micro_batches(rank, args)
    n_trained = int(sum(int((mb["labels"] != -100).sum()) for mb in mbs)) * size
    step = TrainStep(0, 0, 0, mbs, n_trained, args.tokens * args.micro_batches * size, 0)
    settings = StepSettings(torch.device("cpu"), distributed=True)
    times: Dict[str, List[float]] = {m: [] for m in modes}
    losses: Dict[str, float] = {}
    for it in range(args.iters + 1):
        for mode in modes:
            dist.barrier()
            t0 = time.perf_counter()
            outcome = train_step(engines[mode], step, settings)
            elapsed = time.perf_counter() - t0
            if it:
                times[mode].append(elapsed)
            losses[mode] = outcome.loss
    n_params = sum(p.numel() for p in engines["flat"].params)
    row = {
        "rank": rank,
        "params": n_params,
        "modes": {m: {"step_s": statistics.median(times[m]), "times_s": times[m], "loss": losses[m],
                      "buckets": len(engines[m].buckets.buckets) if engines[m].buckets else None,
                      "overlapped": engines[m].buckets.overlapped if engines[m].buckets else 0,
                      "extra_reduction_bytes": getattr(engines[m], "extra_bytes", 0)} for m in modes},
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=49155)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch")
    ap.add_argument("--micro-batches", type=int, default=2, help="per rank per step")
    ap.add_argument("--buckets", type=float, nargs="+", default=[0.0, 5.0, 25.0])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/results/dp_overlap.json", help="'' to skip")
    args = ap.parse_args()
    import tempfile

    size = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(size, port, args, out), nprocs=size, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(size)]
    modes = list(ranks[0]["modes"])
    flat = max(r["modes"]["flat"]["step_s"] for r in ranks)
    print(f"{ranks[0]['params'] / 1e6:.1f}M parameters (fp32 gradients {ranks[0]['params'] * 4 / 2**20:.0f} MiB), "
          f"{size} gloo ranks x {args.micro_batches} micro-batches of {args.tokens} tokens, "
          f"median of {args.iters}, load {os.getloadavg()[0]:.2f}")
    print(f"{'mode':<16}{'buckets':>8}{'during bwd':>11}{'step s':>9}{'vs flat':>9}{'extra MiB':>10}  loss")
    for m in modes:
        slowest = max(r["modes"][m]["step_s"] for r in ranks)
        row = ranks[0]["modes"][m]
        print(f"{m:<16}{row['buckets'] or '-':>8}{row['overlapped']:>11}{slowest:>9.3f}{flat / slowest:>8.2f}x"
              f"{row['extra_reduction_bytes'] / 2**20:>10.0f}  {row['loss']:.6f}")
    losses = {r["modes"][m]["loss"] for r in ranks for m in modes}
    if len(losses) != 1:
        raise SystemExit(f"the modes disagree on the loss: {sorted(losses)}")
    write_results(args.json, args, ranks=ranks)

if __name__ == "__main__":
    main()
