"""Evaluation data: data.eval_path (a separate eval set) or data.eval_fraction (rows of data.path
held out from training, see `pipeline.heldout_rows`), tokenized by the same cached path as the
training data and packed by the same planner into micro-batches of trainer.micro_batch_tokens.

All eval examples form one global plan (every rank computes it); each rank evaluates its own
disjoint share of the micro-batches (the same count on every rank, empty ones included), so the
sums of token losses and trained tokens are all-reduced by `granite_train.train.evaluate`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from granite_train.config import DataConfig, TrainerConfig, validate_data
from granite_train.data.collator import MicroBatch, collate_packed, collate_padded, empty_micro_batch
from granite_train.data.docs import ArrowDocs, Examples, Pieces, pieces_for
from granite_train.data.examples import HeldOut, heldout_rows, load_prepared, open_source, tokenize
from granite_train.data.shards import is_prepared
from granite_train.data.train_data import TrainData
from granite_train.data.plan import StepPlan, packing_efficiency, plan_step
from granite_train.data.stats import PrepStats, Status
from granite_train.data.tokenizer import Tokenizer
from granite_train.errors import UserError

log = logging.getLogger("granite_train.data")


class EvalData:
    """The eval examples of one run and this rank's share of their packed micro-batches."""

    def __init__(self, examples: Examples, stats: PrepStats, data_cfg: DataConfig, trainer_cfg: TrainerConfig,
                 rank: int, world_size: int, pad_id: int) -> None:
        self.examples = examples  # the kept eval examples (pieces of long documents), in row order
        lengths, n_trained = examples.lengths, examples.n_trained
        self.lengths = lengths
        self.n_trained = n_trained
        self.stats = stats
        self.rank, self.world_size = rank, world_size
        self._pad_id = pad_id
        self._padded = data_cfg.packing == "none"
        # One global "step" of every eval example, packed like a training step (BFD of the
        # examples into micro-batches, or padded groups for packing=none), dealt to ranks.
        self.plan: StepPlan = plan_step([[i] for i in range(len(lengths))], lengths, n_trained,
                                        epoch=0, step_in_epoch=0,
                                        micro_batch_tokens=trainer_cfg.micro_batch_tokens,
                                        world_size=world_size, padded=self._padded)

    @property
    def num_examples(self) -> int:  # GLOBAL
        return int(len(self.lengths))

    @property
    def num_trained_tokens(self) -> int:  # GLOBAL: labels that count (the loss denominator)
        return self.plan.num_trained_tokens

    @property
    def num_input_tokens(self) -> int:  # GLOBAL
        return self.plan.num_input_tokens

    def __len__(self) -> int:
        """Micro-batches per rank (the same on every rank)."""
        return self.plan.num_micro_batches

    def micro_batches(self) -> Iterator[MicroBatch]:
        """This rank's micro-batches (CPU tensors), built one at a time; some may be empty."""
        for mb in self.plan.ranks[self.rank]:
            if not mb:
                yield empty_micro_batch(self._padded)
                continue
            fetched = self.examples.fetch(mb)
            rows: List[Dict[str, Any]] = [fetched[i] for i in mb]
            yield collate_padded(rows, self._pad_id) if self._padded else collate_packed(rows)


def _eval_source_cfg(data_cfg: DataConfig) -> DataConfig:
    # The eval set is always read whole (map-style), whatever data.streaming says, and capped by
    # max_eval_examples (not max_examples).
    return dataclasses.replace(data_cfg, path=data_cfg.eval_path, streaming=False,
                               max_examples=data_cfg.max_eval_examples)


def _prepare_eval_path(data_cfg: DataConfig, tokenizer: Tokenizer) -> HeldOut:
    cfg = _eval_source_cfg(data_cfg)
    try:
        source, stats, ds, encoder = open_source(cfg, tokenizer)
    except UserError as e:  # the source's errors name data.path; here it is data.eval_path
        raise UserError(str(e).replace("data.path=", "data.eval_path=")) from None
    if cfg.max_examples is not None:
        ds = ds.select(range(min(len(ds), cfg.max_examples)))
    tokenized, status, lengths, n_trained = tokenize(ds, encoder, cfg)
    return HeldOut(tokenized, status, lengths, n_trained, source.name, stats.malformed_lines, encoder.overlong)


def _prepare_fraction(data_cfg: DataConfig, trainer_cfg: TrainerConfig, tokenizer: Tokenizer) -> HeldOut:
    """The held-out rows without a TrainData at hand: the same (cached) tokenization and split
    as build_train_data."""
    source, _, ds, encoder = open_source(data_cfg, tokenizer)
    if data_cfg.max_examples is not None:
        ds = ds.select(range(min(len(ds), data_cfg.max_examples)))
    tokenized, status, lengths, n_trained = tokenize(ds, encoder, data_cfg)
    held = heldout_rows(len(status), data_cfg.eval_fraction, trainer_cfg.seed)
    return HeldOut(tokenized.select(held), status[held], lengths[held], n_trained[held], source.name,
                   overlong=encoder.overlong)


def _prepared_eval(data_cfg: DataConfig, trainer_cfg: TrainerConfig, tokenizer: Tokenizer, rank: int,
                   world_size: int, t0: float) -> EvalData:
    """data.eval_path is a prepared directory: its documents (pieces at this run's max_length)."""
    cfg = dataclasses.replace(data_cfg, path=data_cfg.eval_path, streaming=False, max_examples=None,
                              eval_path=None, eval_fraction=None)
    try:
        loaded = load_prepared(cfg, tokenizer)
    except UserError as e:
        raise UserError(str(e).replace("data.path=", "data.eval_path=")) from None
    examples, stats = loaded.examples, loaded.stats
    stats.source = f"{data_cfg.eval_path} (eval, data.eval_path, prepared)"
    if data_cfg.max_eval_examples is not None and len(examples) > data_cfg.max_eval_examples:
        p, n = examples.pieces, data_cfg.max_eval_examples
        examples = Examples(Pieces(p.doc[:n], p.start[:n], p.lengths[:n], p.n_trained[:n]), examples.store)
    data = EvalData(examples, stats, data_cfg, trainer_cfg, rank, world_size, tokenizer.eos_token_id)
    stats.set_lengths(data.lengths)
    stats.packing_efficiency = packing_efficiency([data.plan])
    stats.seconds = time.perf_counter() - t0
    log.info("%s Eval: %d micro-batch(es) per rank.", stats.report(), len(data))
    return data


def build_eval_data(data_cfg: DataConfig, trainer_cfg: TrainerConfig, tokenizer: Tokenizer, rank: int,
                    world_size: int, train_data: Optional[TrainData] = None) -> Optional[EvalData]:
    """The eval set of data.eval_path or data.eval_fraction (None when neither is set). Every
    rank calls this and computes the same global plan. Pass the run's `train_data` with
    data.eval_fraction to reuse its held-out rows instead of preparing data.path again."""
    if data_cfg.eval_path is None and data_cfg.eval_fraction is None:
        return None
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    t0 = time.perf_counter()
    validate_data(data_cfg, trainer_cfg)
    if data_cfg.eval_path is not None and is_prepared(data_cfg.eval_path):
        return _prepared_eval(data_cfg, trainer_cfg, tokenizer, rank, world_size, t0)
    if data_cfg.eval_path is not None:
        held = _prepare_eval_path(data_cfg, tokenizer)
        name, what = f"{held.source} (eval, data.eval_path)", "data.eval_path"
    else:
        held = getattr(train_data, "heldout", None)
        if held is None:
            held = _prepare_fraction(data_cfg, trainer_cfg, tokenizer)
        name = f"{held.source} (eval, data.eval_fraction={data_cfg.eval_fraction})"
        what = f"data.eval_fraction={data_cfg.eval_fraction}"
        if data_cfg.max_eval_examples is not None and len(held.status) > data_cfg.max_eval_examples:
            # Only the first rows are evaluated; the rest stay held out (never trained on).
            n = data_cfg.max_eval_examples
            held = dataclasses.replace(held, examples=held.examples.select(range(n)), status=held.status[:n],
                                       lengths=held.lengths[:n], n_trained=held.n_trained[:n])
    stats = PrepStats(source=name, malformed_lines=held.malformed_lines)
    stats.count(held.status, held.lengths, held.n_trained)
    keep = np.flatnonzero(Status.kept(held.status))
    if keep.size == 0:
        raise UserError(f"no eval examples left in {what} after preparation ({stats.report()}); "
                        f"check the eval data, data.train_on and data.max_length")
    docs = held.examples.select(keep) if keep.size < len(held.examples) else held.examples
    pieces = pieces_for(held.lengths[keep], held.n_trained[keep], held.overlong, data_cfg.max_length)
    stats.pieces = pieces.split_pieces
    data = EvalData(Examples(pieces, ArrowDocs(docs)), stats, data_cfg, trainer_cfg, rank, world_size,
                    tokenizer.eos_token_id)
    stats.set_lengths(data.lengths)
    stats.packing_efficiency = packing_efficiency([data.plan])
    stats.seconds = time.perf_counter() - t0
    log.info("%s Eval: %d micro-batch(es) per rank.", stats.report(), len(data))
    return data
