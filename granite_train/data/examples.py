"""Sources -> examples: a prepared directory memory-mapped, or raw rows tokenized (cached by
`datasets`), long documents cut into pieces, data.eval_fraction's rows held out. The one
preparation path shared by training (single sources and each source of a mixture), evaluation
and `python -m granite_train.prepare`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

import datasets
import numpy as np

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data.chat import chat_overhead, make_renderer
from granite_train.data.docs import ArrowDocs, Examples, pieces_for
from granite_train.data.encode import FEATURES, Encoder
from granite_train.data.shards import ShardDocs, check_settings, is_prepared, prepared_stats, read_manifest
from granite_train.data.rows import COMPLETION, PROMPT, resolve_row_format
from granite_train.data.sources import load_source
from granite_train.data.stats import PrepStats, Status
from granite_train.data.tokenizer import Tokenizer
from granite_train.errors import UserError

log = logging.getLogger("granite_train.data")


def _column_names(ds: Union[datasets.Dataset, datasets.IterableDataset], name: str) -> List[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    try:  # streams of JSON may not know their columns before the first row
        first = next(iter(ds))
    except StopIteration:
        raise UserError(f"data.path={name} has no rows; point it at a non-empty dataset") from None
    return list(first)


EVAL_SPLIT_SALT = 0x6576616C  # "eval": the held-out rows' RNG stream, apart from epoch orders


def heldout_rows(num_rows: int, fraction: float, seed: int) -> np.ndarray:
    """data.eval_fraction: the sorted row numbers (of the rows after data.max_examples) held out
    for evaluation; round(fraction * rows), at least 1, and at least one row left to train on."""
    if num_rows < 2:
        raise UserError(f"data.eval_fraction={fraction} needs at least 2 rows to split; the data has "
                        f"{num_rows}")
    n_eval = min(max(1, int(round(fraction * num_rows))), num_rows - 1)
    perm = np.random.default_rng([seed, EVAL_SPLIT_SALT]).permutation(num_rows)
    return np.sort(perm[:n_eval])


@dataclass
class HeldOut:
    """Tokenized rows held out by data.eval_fraction (their own stats: rows, drops, truncation)."""

    examples: datasets.Dataset  # the held-out rows, dropped ones included (see `status`)
    status: np.ndarray
    lengths: np.ndarray
    n_trained: np.ndarray
    source: str
    malformed_lines: int = 0  # JSON lines skipped by data.skip_bad_rows (data.eval_path only)
    overlong: str = "truncate"  # the policy applied (split: long documents become pieces here)


def _first_row(ds: Union[datasets.Dataset, datasets.IterableDataset]) -> Optional[Dict[str, Any]]:
    if isinstance(ds, datasets.Dataset):
        return ds[0] if len(ds) else None
    return next(iter(ds), None)


def _chat_renderer(data_cfg: DataConfig, tokenizer: Tokenizer):
    renderer = make_renderer(data_cfg.chat_template, tokenizer)
    overhead = chat_overhead(tokenizer, renderer)
    if data_cfg.max_length <= overhead:
        raise UserError(
            f"data.max_length={data_cfg.max_length} is smaller than the chat template overhead "
            f"({overhead} tokens for an empty one-turn conversation) plus one content token; "
            f"raise data.max_length")
    return renderer


def open_source(data_cfg: DataConfig, tokenizer: Tokenizer):
    """(source, stats, raw dataset, encoder) for data_cfg.path: the one preparation path shared
    by training and evaluation data."""
    # data.format=chat checks its template before loading anything; other formats learn
    # whether they need one from the data.
    renderer = _chat_renderer(data_cfg, tokenizer) if data_cfg.format == "chat" else None
    source = load_source(data_cfg)
    stats = PrepStats(source=source.name, malformed_lines=source.malformed_lines)
    ds = source.dataset
    columns = _column_names(ds, source.name)
    # Prompt/completion columns hold strings or lists of messages: the first row tells (TRL's rule).
    first = _first_row(ds) if {PROMPT, COMPLETION} <= set(columns) else None
    row_format = resolve_row_format(data_cfg, columns, source.name, first, source.plain_text)
    stats.format = row_format.name
    if data_cfg.format == "auto":
        log.info("data.format=auto: %s reads as %s", source.name, row_format.description)
    if row_format.templated and renderer is None:
        renderer = _chat_renderer(data_cfg, tokenizer)
    encoder = Encoder.from_config(data_cfg, tokenizer, renderer, row_format, source.name)
    return source, stats, ds, encoder


def tokenize(ds: datasets.Dataset, encoder: Encoder, data_cfg: DataConfig):
    """(tokenized rows, status, lengths, n_trained): one output row per input row (cached map)."""
    tokenized = ds.map(encoder, batched=True, batch_size=256, with_indices=True, features=FEATURES,
                       remove_columns=ds.column_names, desc="tokenizing",
                       num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 else None)
    cols = tokenized.select_columns(["status", "length", "n_trained"]).with_format("numpy")[:]
    status, lengths, n_trained = (np.asarray(cols[k]) for k in ("status", "length", "n_trained"))
    return tokenized, status, lengths, n_trained


@dataclass
class Loaded:
    """One map-style source as examples: what the plan and the reads need."""

    examples: Examples
    stats: PrepStats
    heldout: Optional[HeldOut] = None
    overlong: str = "truncate"  # the policy applied (data.overlong resolved for the format)


def load_examples(data_cfg: DataConfig, trainer_cfg: TrainerConfig, tokenizer: Tokenizer) -> Loaded:
    """data_cfg.path as examples: a prepared directory memory-mapped (no tokenization), or raw rows
    tokenized (cached) with data.eval_fraction's rows held out. Long documents become pieces."""
    if is_prepared(data_cfg.path):
        return load_prepared(data_cfg, tokenizer)
    source, stats, ds, encoder = open_source(data_cfg, tokenizer)
    if data_cfg.max_examples is not None:
        ds = ds.select(range(min(len(ds), data_cfg.max_examples)))
    tokenized, status, lengths, n_trained = tokenize(ds, encoder, data_cfg)
    train_rows = np.ones(len(status), dtype=bool)
    heldout = None
    if data_cfg.eval_fraction is not None:
        held = heldout_rows(len(status), data_cfg.eval_fraction, trainer_cfg.seed)
        train_rows[held] = False
        heldout = HeldOut(tokenized.select(held), status[held], lengths[held], n_trained[held], source.name,
                          overlong=encoder.overlong)
        log.info("data.eval_fraction=%s: %d of %d rows held out for evaluation (never trained on)",
                 data_cfg.eval_fraction, held.size, len(status))
    stats.count(status[train_rows], lengths[train_rows], n_trained[train_rows])
    keep = np.flatnonzero(Status.kept(status) & train_rows)
    if keep.size == 0:
        raise UserError(f"no examples left in data.path={source.name} after preparation ({stats.report()}); "
                        f"check the data fields, data.train_on and data.max_length")
    docs = tokenized.select(keep) if keep.size < len(tokenized) else tokenized
    pieces = pieces_for(lengths[keep], n_trained[keep], encoder.overlong, data_cfg.max_length)
    stats.pieces = pieces.split_pieces
    return Loaded(Examples(pieces, ArrowDocs(docs)), stats, heldout, encoder.overlong)


def load_prepared(data_cfg: DataConfig, tokenizer: Tokenizer) -> Loaded:
    name = data_cfg.path
    if data_cfg.streaming:
        raise UserError(f"data.path={name} is prepared data, read memory-mapped; set data.streaming=false")
    if data_cfg.eval_fraction is not None:
        raise UserError(f"data.eval_fraction holds out raw rows and data.path={name} is prepared data; set "
                        f"data.eval_path to a held-out set instead")
    if data_cfg.max_examples is not None:
        raise UserError(f"data.max_examples applies to raw rows; data.path={name} is prepared data: prepare it "
                        f"with data.max_examples instead")
    manifest = read_manifest(name)
    policy = check_settings(manifest, data_cfg, tokenizer, name)
    store = ShardDocs(name, manifest)
    stats = prepared_stats(manifest, name)
    pieces = pieces_for(store.lengths, store.n_trained, policy, data_cfg.max_length)
    stats.split, stats.pieces = pieces.split_docs, pieces.split_pieces
    return Loaded(Examples(pieces, store), stats, overlong=policy)
