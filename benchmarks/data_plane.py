"""Pretraining data plane at corpus scale: a synthetic prepared corpus of 1e9 tokens in ~5M
documents, written on local disk in the `python -m granite_train.prepare` layout.

    python benchmarks/data_plane.py [--tokens 1e9] [--docs 5e6] [--dir /tmp/gt_corpus] [--keep]
                                    [--out benchmarks/results/data_plane.json]

Measured, each in a fresh process (so peak RSS is its own):
* write: the corpus itself (random uint16 ids, log-normal lengths, mean ~200, 2..32768 tokens).
* startup + plan, single source: `build_train_data` on the directory (manifest, lengths, pieces at
  max_length 4096, epoch 0's bfd step selection), world size 8, 4M-token steps. Goal <= 60 s, <= 2 GB.
* startup + plan, mixture: the corpus as two sources (0.7 / 0.3) of data.sources.
* reader: rank 0 of 8 drawing steps (its micro-batches as tensors, memory-mapped reads, plus the
  per-step micro-batch packing), in tokens/s of its own; goal >= 100x a training step's tokens/s.
  Measured with data.prefetch_steps=0: the data thread's own speed (training overlaps it with the
  step when prefetching, the default).
* prepare: `granite_train.prepare` on demo:shakespeare (text) and demo:chitchat (chat), no cache,
  data.num_proc=1, in tokens/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import numpy as np

from common import git_commit, hwm_bytes, machine_info, rss_bytes

TOKENS_PER_STEP = 4 * 1024 * 1024
MICRO = 16384
WORLD = 8
MAX_LENGTH = 4096
# The training step the reader must outrun: a 350M-parameter Granite at 50% MFU on one H100
# (989 TFLOP/s dense bf16): 0.5 * 989e12 / (6 * 350e6) tokens/s per GPU. Larger models are slower.
TRAIN_TOKENS_PER_S = 0.5 * 989e12 / (6 * 350e6)


def rss_parts() -> Dict[str, float]:
    """Resident memory now, GiB: anonymous (the index, the plan: what a rank holds) and file-backed
    (mapped shard pages: page cache the kernel may drop at will)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 2 ** 20
    return {"rss_anon_gib": out["RssAnon"], "rss_file_gib": out["RssFile"]}


def write_corpus(out: Path, tokens: int, docs: int) -> Dict[str, Any]:
    """A prepared directory of `docs` documents, about `tokens` tokens, via the real writer."""
    from granite_train.data.shards import KIND, SHARD_TOKENS, VERSION, _ShardWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    mean = tokens / docs
    sigma = 1.0
    lengths = np.clip(rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, docs), 2, 32768).astype(np.int64)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, np.dtype(np.uint16), False, SHARD_TOKENS)
    chunk = 200_000
    for a in range(0, docs, chunk):
        lens = lengths[a: a + chunk]
        ids = rng.integers(0, 50000, int(lens.sum()), dtype=np.uint16)
        writer.add(ids, None, lens, lens - 1)
    shards = writer.finish()
    from granite_train.data.shards import tokenizer_fingerprint
    from granite_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2-bundled", None)
    manifest = {"kind": KIND, "version": VERSION, "created": "synthetic",
                "tokenizer": {"name": tok.name, "sha256": tokenizer_fingerprint(tok), "vocab_size": tok.vocab_size,
                              "eos_token_id": tok.eos_token_id},
                "settings": {"data.format": "text", "row_kind": "text", "row_format": "text", "train_on": "all",
                             "chat_template": None, "overlong": "split", "max_length": None, "source": "synthetic"},
                "dtype": "uint16", "masked": False, "documents": docs, "tokens": int(lengths.sum()),
                "trained_tokens": int((lengths - 1).sum()), "shards": shards,
                "stats": {"source": "synthetic", "format": "text", "rows_read": docs, "examples": docs,
                          "tokens": int(lengths.sum()), "trained_tokens": int((lengths - 1).sum())}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return {"seconds": time.perf_counter() - t0, "documents": docs, "tokens": int(lengths.sum()),
            "shards": len(shards), "bytes_on_disk": sum(f.stat().st_size for f in out.iterdir())}


def _build(corpus: Path, mixture: bool, rank: int = 0):
    from granite_train.config import DataConfig, SourceConfig, TrainerConfig
    from granite_train.data import build_train_data, load_tokenizer

    tok = load_tokenizer("gpt2-bundled", None)
    if mixture:
        data = DataConfig(format="text", max_length=MAX_LENGTH, prefetch_steps=0,
                          sources=[SourceConfig(str(corpus), 0.7, name="a"), SourceConfig(str(corpus), 0.3, name="b")])
    else:
        data = DataConfig(path=str(corpus), format="text", max_length=MAX_LENGTH, prefetch_steps=0)
    trainer = TrainerConfig(tokens_per_step=TOKENS_PER_STEP, micro_batch_tokens=MICRO)
    return build_train_data(data, trainer, tok, rank, WORLD)


def measure_startup(corpus: Path, mixture: bool) -> Dict[str, Any]:
    import granite_train.data  # noqa: F401  (imports are not the plan's cost)

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    data = _build(corpus, mixture)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "rss_growth_gib": (rss_bytes() - rss0) / 2 ** 30, "peak_rss_gib": hwm_bytes() / 2 ** 30,
           "examples": int(len(data.lengths)), "steps_per_epoch": data.num_steps_per_epoch, **rss_parts()}
    it = data.steps()
    next(it)  # not timed: the first step also draws the sources' first pass orders
    t0 = time.perf_counter()
    n_steps, rank_tokens = 8, 0
    for _ in range(n_steps):
        step = next(it)
        rank_tokens += sum(int(mb["input_ids"].numel()) for mb in step.micro_batches)
    reader = time.perf_counter() - t0
    out |= {"reader_steps": n_steps, "reader_rank_tokens": rank_tokens, "reader_seconds": reader,
            "reader_tokens_per_s": rank_tokens / reader, "peak_rss_after_reads_gib": hwm_bytes() / 2 ** 30,
            **{f"{k}_after_reads": v for k, v in rss_parts().items()}}
    if mixture:
        out["source_tokens_seen"] = step.source_tokens_seen
    return out


def measure_prepare(name: str) -> Dict[str, Any]:
    import datasets

    from granite_train.prepare import prepare

    datasets.disable_caching()
    out = Path(f"/tmp/gt_prepare_bench_{name}")
    shutil.rmtree(out, ignore_errors=True)
    overrides = ["recipe=pretrain_power", f"data.path=demo:{name}", "data.num_proc=1"]
    if name == "chitchat":
        overrides += ["data.format=auto", "data.train_on=assistant", "data.max_length=2048",
                      "trainer.micro_batch_tokens=2048"]
    t0 = time.perf_counter()
    manifest = prepare(overrides, out, 1 << 28)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "tokens": manifest["tokens"], "documents": manifest["documents"],
            "tokens_per_s_per_core": manifest["tokens"] / seconds}


def _child(*args: str) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--docs", type=float, default=5e6)
    ap.add_argument("--dir", default="/tmp/gt_corpus")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the corpus")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_plane.json"))
    ap.add_argument("--measure", choices=["single", "mixture", "prepare-shakespeare", "prepare-chitchat"])
    args = ap.parse_args()
    corpus = Path(args.dir)
    if args.measure:
        if args.measure.startswith("prepare-"):
            res = measure_prepare(args.measure.split("-", 1)[1])
        else:
            res = measure_startup(corpus, args.measure == "mixture")
        print(json.dumps(res))
        return
    results: Dict[str, Any] = {"commit": git_commit(), "machine": machine_info(1), "date": time.strftime("%Y-%m-%d"),
                               "tokens_per_step": TOKENS_PER_STEP, "micro_batch_tokens": MICRO, "world_size": WORLD,
                               "max_length": MAX_LENGTH, "train_tokens_per_s_reference": TRAIN_TOKENS_PER_S}
    if not (args.keep and (corpus / "manifest.json").is_file()):
        results["write"] = write_corpus(corpus, int(args.tokens), int(args.docs))
        print("write", results["write"], flush=True)
    for what in ("single", "mixture", "prepare-shakespeare", "prepare-chitchat"):
        results[what] = _child("--measure", what, "--dir", str(corpus))
        print(what, results[what], flush=True)
    for what in ("single", "mixture"):
        results[what]["reader_vs_train"] = results[what]["reader_tokens_per_s"] / TRAIN_TOKENS_PER_S
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(corpus, ignore_errors=True)


if __name__ == "__main__":
    main()
