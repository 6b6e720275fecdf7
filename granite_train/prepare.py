"""`python -m granite_train.prepare [recipe=NAME] [data.* overrides] --out DIR`: tokenize once.

Reads data.path with the run's rules (data.format, train_on, chat template, data.overlong,
data.max_length, skip_bad_rows; the tokenizer of data.tokenizer / model.path), tokenizes it with
`datasets.map` on data.num_proc processes and writes token shards and a manifest to DIR
(`granite_train/data/shards.py`). Train from it with data.path=DIR (or as one of data.sources):
no tokenization at start, and a run whose tokenizer or data settings differ is refused.

With data.overlong=split (the default for text) documents are stored whole: a run cuts them at
its own data.max_length, so one prepared corpus serves several context lengths.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from granite_train.cli import _setup_logging, compose_config, split_options
from granite_train.errors import UserError

USAGE = """usage: python -m granite_train.prepare [recipe=NAME] [key=value ...] --out DIR [--shard-tokens N]

Tokenize data.path once into memory-mapped token shards + manifest.json in DIR; then train with
data.path=DIR (or data.sources=[{path: DIR, weight: ...}, ...]). The data.* settings and the
tokenizer (data.tokenizer or model.path) are the run's: compose them as for training.
  --out DIR           the directory to write (must not exist or be empty)
  --shard-tokens N    tokens per shard file (default 268435456); documents are never cut
"""
OPTIONS = {"out": None, "shard-tokens": None}
log = logging.getLogger("granite_train.prepare")


def _parse(args: Sequence[str]):
    overrides, opts = split_options(args, OPTIONS, "prepare takes --out, --shard-tokens and config overrides")
    if not opts["out"]:
        raise UserError("--out DIR is required: the directory to write the prepared data to")
    from granite_train.data.shards import SHARD_TOKENS

    shard_tokens = SHARD_TOKENS
    if opts["shard-tokens"] is not None:
        try:
            shard_tokens = int(opts["shard-tokens"])
        except ValueError:
            shard_tokens = 0
        if shard_tokens <= 0:
            raise UserError(f"--shard-tokens {opts['shard-tokens']} must be a positive integer")
    return overrides, Path(opts["out"]).expanduser(), shard_tokens


def prepare(overrides: Sequence[str], out: Path, shard_tokens: int) -> dict:
    """Compose the config, tokenize data.path and write DIR; returns the manifest."""
    from granite_train.data.examples import open_source, tokenize
    from granite_train.data.shards import is_prepared, write_prepared
    from granite_train.data.stats import Status
    from granite_train.data.tokenizer import load_tokenizer

    cfg = compose_config(overrides)
    data = cfg.data
    if data.sources:
        raise UserError("prepare writes one source: set data.path (prepare each source of data.sources on its own)")
    if data.streaming:
        raise UserError("prepare reads data.path whole (datasets.map); set data.streaming=false")
    if is_prepared(data.path):
        raise UserError(f"data.path={data.path} is already prepared data; point data.path at the raw data")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; remove it or choose another directory")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(data.tokenizer, cfg.model.path)
    source, stats, ds, encoder = open_source(data, tokenizer)
    if data.max_examples is not None:
        ds = ds.select(range(min(len(ds), data.max_examples)))
    tokenized, status, lengths, n_trained = tokenize(ds, encoder, data)
    stats.count(status, lengths, n_trained)
    kept = Status.kept(status)
    if not kept.any():
        raise UserError(f"no examples left in data.path={source.name} after preparation ({stats.report()}); "
                        f"check the data fields, data.train_on and data.max_length")
    stats.set_lengths(lengths[kept])
    manifest = write_prepared(tokenized, encoder, data, tokenizer, stats, out, shard_tokens)
    seconds = time.perf_counter() - t0
    stats.seconds = seconds
    log.info(stats.report())
    log.info("prepared %s -> %s: %d documents, %d tokens in %d shard(s), %.0f tokens/s (data.num_proc=%d)",
             source.name, out, manifest["documents"], manifest["tokens"], len(manifest["shards"]),
             manifest["tokens"] / max(seconds, 1e-9), max(1, data.num_proc))
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    _setup_logging()
    try:
        overrides, out, shard_tokens = _parse(args)
        prepare(overrides, out, shard_tokens)
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
