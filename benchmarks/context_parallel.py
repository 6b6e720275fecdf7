"""Context parallelism on CPU: one long packed row at Granite-4.0-H-Tiny widths over C = 1, 2, 4 ranks.

    python benchmarks/context_parallel.py [--tokens 16384] [--sizes 1 2 4] [--layers mamba,attention]
        [--iters 2] [--json benchmarks/results/context_parallel.json]

Each C spawns C gloo processes; every rank builds the same model (hidden 1536; Mamba-2 48 heads x
64, d_state 128, n_groups 1, conv 4, chunk 256; attention 12 query / 4 KV heads x 128, NoPE; a
shared SwiGLU of 1024; vocab 1024 so the LM head does not dominate) and the same row of
`--tokens` tokens holding 8 examples (one of them crosses every slice edge), then runs forward +
backward of its slice (C = 1: the plain packed forward, no context). Per rank it records:

- peak RSS above the resident size before the step (`/proc/self/clear_refs` resets the peak),
  the memory that grows with the tokens;
- wall seconds of forward + backward (median of `--iters` after one warm-up) and the row's
  tokens/s (T / the slowest rank's time). Only meaningful while C <= the cores: beyond that the
  ranks share cores;
- bytes gathered per step by kind (K/V, conv halo, SSD states), counted on the shard's `gather`
  calls (the backward all-reduces move the same again), and the attention work per rank
  (sum over its segments of queries x keys) with its max / mean (the causal load imbalance).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from granite_train.models import GraniteConfig, GraniteForCausalLM  # noqa: E402
from granite_train.models import context as cp_geometry  # noqa: E402
from granite_train.parallel.context_parallel import ContextShard, shard_row  # noqa: E402

TINY_WIDTHS = dict(hidden_size=1536, mamba_n_heads=48, mamba_d_head=64, mamba_expand=2, mamba_d_state=128,
                   mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=256, num_attention_heads=12,
                   num_key_value_heads=4, head_dim=128)


def _model(layers: List[str]) -> GraniteForCausalLM:
    cfg = GraniteConfig(model_type="granitemoehybrid", vocab_size=1024, num_hidden_layers=len(layers),
                        layer_types=layers, num_local_experts=0, shared_intermediate_size=1024,
                        position_embedding_type=None, max_position_embeddings=1 << 20,
                        **{k: v for k, v in TINY_WIDTHS.items() if k != "head_dim"})
    torch.manual_seed(0)
    return GraniteForCausalLM(cfg, attn_backend="sdpa", mamba_backend="torch")


def _row(T: int):
    # 8 examples: one long one crossing the middle slices, the rest spread around it
    shares = [0.04, 0.11, 0.38, 0.02, 0.17, 0.09, 0.13]
    lengths = [max(1, int(s * T)) for s in shares]
    lengths.append(T - sum(lengths))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (1, T), generator=g)
    labels = ids.clone()
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    labels[0, bounds[:-1]] = -100
    return ids, labels, torch.tensor(bounds, dtype=torch.int32), lengths


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def _attention_work(shard) -> int:
    """Sum over this slice's segments of (queries x keys it attends), causal."""
    lb = cp_geometry.local_bounds(shard)
    work = 0
    for i, (s, e) in enumerate(zip(lb[:-1], lb[1:])):
        first = cp_geometry.example_start(shard, shard.offset + s) if i == 0 else shard.offset + s
        before = shard.offset + s - first  # keys of earlier slices
        n = e - s
        work += n * before + n * (n + 1) // 2
    return work


def _worker(rank: int, size: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // size))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    model = _model(args.layers.split(","))
    ids, labels, cu, _ = _row(args.tokens)
    gathered: Dict[str, int] = {}
    if size == 1:
        def step():
            out = model(input_ids=ids, labels=labels, cu_seq_lens=cu, return_logits=False)
            out.loss.backward()
        shard = ContextShard(0, 1, args.tokens, [int(b) for b in cu.tolist()], args.tokens)
    else:
        local, shard = shard_row(ids, labels, cu, rank, size, args.tokens // size)
        counting = [False]

        class CountingShard(ContextShard):
            def gather(self, x, dim):
                if counting[0]:
                    kind = {1: "kv" if x.shape[1] == self.slice_len else "conv halo", 0: "ssd state"}[dim]
                    gathered[kind] = gathered.get(kind, 0) + x.numel() * x.element_size() * self.size
                return super().gather(x, dim)

        shard = CountingShard(shard.rank, shard.size, shard.slice_len, shard.bounds, shard.real_tokens)

        def step():
            out = model(input_ids=local["input_ids"], labels=local["labels"], context=shard, return_logits=False)
            out.loss.backward()

    step()  # warm-up
    model.zero_grad(set_to_none=True)
    counting_set = size > 1
    times, peaks = [], []
    for i in range(args.iters):
        if counting_set:
            counting[0] = i == 0
        base = _rss_kib()
        _reset_peak()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append(_peak_kib() - base)
        model.zero_grad(set_to_none=True)
    result = {"rank": rank, "step_s": statistics.median(times), "peak_above_start_gib": max(peaks) / 2**20,
              "attention_work": _attention_work(shard), "gathered_bytes": gathered,
              "slice_tokens": args.tokens // size}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run(size: int, args, out_dir: Path) -> List[Dict]:
    for f in out_dir.glob("rank*.json"):
        f.unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(size, port, args, str(out_dir)), nprocs=size, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(size)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", default="mamba,attention")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/context_parallel.json")
    args = ap.parse_args()
    out_dir = Path("/tmp") / f"cp_bench_{os.getpid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"T={args.tokens} layers={args.layers} cores={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
    print(f"{'C':>2} {'slice':>6} {'peak GiB/rank (max)':>20} {'x of C=1':>9} {'step s (max)':>12} "
          f"{'tok/s':>8} {'attn max/mean':>13} {'gathered MiB/step':>18}")
    base_peak = None
    for size in args.sizes:
        ranks = _run(size, args, out_dir)
        peak = max(r["peak_above_start_gib"] for r in ranks)
        step = max(r["step_s"] for r in ranks)
        work = [r["attention_work"] for r in ranks]
        gathered = {k: sum(r["gathered_bytes"].get(k, 0) for r in ranks) / size for k in ("kv", "conv halo", "ssd state")}
        base_peak = peak if base_peak is None else base_peak
        row = {"size": size, "tokens": args.tokens, "slice_tokens": args.tokens // size, "ranks": ranks,
               "peak_gib_max_rank": peak, "peak_vs_one": peak / base_peak, "step_s_max_rank": step,
               "tokens_per_s": args.tokens / step, "attention_imbalance": max(work) / statistics.mean(work),
               "gathered_bytes_per_rank": gathered}
        rows.append(row)
        print(f"{size:>2} {args.tokens // size:>6} {peak:>20.2f} {peak / base_peak:>9.2f} {step:>12.2f} "
              f"{args.tokens / step:>8.0f} {row['attention_imbalance']:>13.2f} "
              f"{sum(gathered.values()) / 2**20:>18.1f}  " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in gathered.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "widths": TINY_WIDTHS, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
