"""Packing benchmark: efficiency of bfd / greedy / none on real length distributions, and the
time the planner takes per million tokens.

    python benchmarks/packing.py [--out benchmarks/results/packing.json]

Efficiency = real tokens / token slots of the micro-batches (packed: micro_batch_tokens per
micro-batch; padded: rows x longest). Lengths come from the demo data (chitchat conversations
rendered with the Granite chat template and the bundled GPT-2 BPE) and from a synthetic
log-normal distribution with a long tail.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data import build_train_data, load_tokenizer
from granite_train.data.plan import packing_efficiency, plan_epoch


def demo_lengths(max_length: int) -> np.ndarray:
    tok = load_tokenizer("gpt2-bundled", None)
    data = build_train_data(DataConfig(path="demo:chitchat", max_length=max_length),
                            TrainerConfig(tokens_per_step=16384, micro_batch_tokens=4096), tok, 0, 1)
    return data.lengths


def lognormal_lengths(n: int, max_length: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(rng.lognormal(mean=5.5, sigma=1.2, size=n).astype(np.int64), 1, max_length)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/packing.json")
    args = ap.parse_args()
    max_length, tps = 2048, 16384
    dists = {"chitchat": demo_lengths(max_length), "lognormal": lognormal_lengths(20000, max_length)}
    rows = []
    print(f"{'lengths':<10} {'packing':<7} {'micro':>6} {'ranks':>5} {'efficiency':>10} {'s/Mtok':>8}")
    for name, lengths in dists.items():
        n_trained = lengths  # not used by the efficiency
        for packing in ("bfd", "greedy", "none"):
            for micro, world in ((4096, 1), (4096, 4), (8192, 2)):
                t0 = time.perf_counter()
                plans = plan_epoch(lengths, n_trained, seed=0, epoch=0, tokens_per_step=tps,
                                   max_length=max_length, packing=packing, micro_batch_tokens=micro,
                                   world_size=world)
                dt = time.perf_counter() - t0
                eff = packing_efficiency(plans)
                per_mtok = dt / (lengths.sum() / 1e6)
                rows.append(dict(lengths=name, packing=packing, micro_batch_tokens=micro, world_size=world,
                                 efficiency=eff, seconds_per_million_tokens=per_mtok,
                                 examples=int(len(lengths)), tokens=int(lengths.sum())))
                print(f"{name:<10} {packing:<7} {micro:>6} {world:>5} {eff:>10.4f} {per_mtok:>8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
