"""The trainer's entry point: config -> prepared examples -> optimizer steps, resumable.

Data order is a pure function of (seed, epoch): the position (epoch, step within epoch) is the
whole iterator state. Streams have no epoch plan; their state is the number of rows consumed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np

from granite_train.config import DataConfig, TrainerConfig, validate_data
from granite_train.data.chat import chat_overhead, make_renderer
from granite_train.data.collator import MicroBatch, collate_packed, collate_padded, empty_micro_batch
from granite_train.data.plan import (PLANNER_VERSION, SELECTION_SINCE, StepPlan, packing_efficiency, plan_epoch,
                                     plan_step)
from granite_train.data.prep import FEATURES, Encoder
from granite_train.data.rows import COMPLETION, PROMPT, resolve_row_format
from granite_train.data.sources import load_source
from granite_train.data.stats import PrepStats, Status
from granite_train.data.tokenizer import Tokenizer
from granite_train.errors import UserError

log = logging.getLogger("granite_train.data")
STREAM_BATCH = 256  # rows tokenized together from a stream


@dataclass
class TrainStep:
    index: int  # optimizer steps yielded before this one since training began (0-based, all epochs)
    epoch: int
    step_in_epoch: int
    micro_batches: List[MicroBatch]  # this rank's, CPU tensors; the same count on every rank
    num_trained_tokens: int  # GLOBAL over ranks and micro-batches
    num_input_tokens: int  # GLOBAL
    num_slots: int  # GLOBAL
    # GLOBAL: ids of this step's examples (prepared-data row ids; streams: raw row numbers).
    example_ids: List[int] = field(default_factory=list)

    @property
    def packing_efficiency(self) -> float:
        return self.num_input_tokens / self.num_slots if self.num_slots else 0.0


def _materialize(plan: StepPlan, rank: int, fetch, padded: bool, pad_id: int) -> List[MicroBatch]:
    """This rank's micro-batch tensors; `fetch(ids)` returns {id: example dict}."""
    mine = plan.ranks[rank]
    examples = fetch(sorted({i for mb in mine for i in mb}))
    out = []
    for mb in mine:
        if not mb:
            out.append(empty_micro_batch(padded))
        elif padded:
            out.append(collate_padded([examples[i] for i in mb], pad_id))
        else:
            out.append(collate_packed([examples[i] for i in mb]))
    return out


class TrainData:
    """Prepared (tokenized) map-style data and its deterministic step plan."""

    def __init__(self, examples: datasets.Dataset, lengths: np.ndarray, n_trained: np.ndarray,
                 stats: PrepStats, data_cfg: DataConfig, trainer_cfg: TrainerConfig, rank: int,
                 world_size: int, pad_id: int, heldout: Optional["HeldOut"] = None) -> None:
        self._examples = examples.select_columns(["input_ids", "labels"]).with_format("numpy")
        # data.eval_fraction: the held-out rows (never in `examples`), for build_eval_data.
        self.heldout = heldout
        self._eval_fraction = data_cfg.eval_fraction
        self.lengths = lengths
        self.n_trained = n_trained
        self.stats = stats
        self.rank, self.world_size = rank, world_size
        self._pad_id = pad_id
        self._padded = data_cfg.packing == "none"
        self._epochs = trainer_cfg.epochs
        self._plan_args = dict(seed=trainer_cfg.seed, tokens_per_step=trainer_cfg.tokens_per_step,
                               max_length=data_cfg.max_length, packing=data_cfg.packing,
                               micro_batch_tokens=trainer_cfg.micro_batch_tokens, world_size=world_size)
        self._cached: Tuple[int, List[StepPlan]] = (-1, [])
        self._epoch, self._step, self._global = 0, 0, 0
        self.num_steps_per_epoch: int = len(self.plan(0))

    def plan(self, epoch: int) -> List[StepPlan]:
        """The global plan of one epoch (all ranks); cached for the current epoch."""
        if self._cached[0] != epoch:
            self._cached = (epoch, plan_epoch(self.lengths, self.n_trained, epoch=epoch, **self._plan_args))
        return self._cached[1]

    def _fetch(self, ids: Sequence[int]) -> Dict[int, Dict[str, Any]]:
        batch = self._examples[list(ids)]
        return {i: {"input_ids": x, "labels": y} for i, x, y in zip(ids, batch["input_ids"], batch["labels"])}

    def steps(self) -> Iterator[TrainStep]:
        """Optimizer steps from the current position; stops after trainer.epochs (None: never)."""
        while self._epochs is None or self._epoch < self._epochs:
            plans = self.plan(self._epoch)
            while self._step < len(plans):
                p = plans[self._step]
                # Advance before yielding: a checkpoint taken after training this step resumes after it.
                self._step += 1
                self._global += 1
                yield TrainStep(self._global - 1, p.epoch, p.step_in_epoch,
                                _materialize(p, self.rank, self._fetch, self._padded, self._pad_id),
                                p.num_trained_tokens, p.num_input_tokens, p.num_slots, p.example_ids)
            self._epoch, self._step = self._epoch + 1, 0

    def _fingerprint(self) -> Dict[str, Any]:
        # What fixes the data order. micro_batch_tokens and world_size are absent on purpose:
        # resuming with other values keeps every step's examples.
        keys = ("seed", "tokens_per_step", "max_length", "packing")
        return {**{k: self._plan_args[k] for k in keys}, "num_examples": int(len(self.lengths)),
                "num_tokens": int(self.lengths.sum()), "eval_fraction": self._eval_fraction}

    def state_dict(self) -> Dict[str, Any]:
        epoch, step = self._epoch, self._step
        if step and step == len(self.plan(epoch)):  # the epoch is done: record the next one's start
            epoch, step = epoch + 1, 0
        return {"kind": "map", "epoch": epoch, "step_in_epoch": step, "global_step": self._global,
                "fingerprint": self._fingerprint(), "planner": PLANNER_VERSION}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """One UserError line when `state` (a checkpoint's) cannot resume this data."""
        if state.get("kind") != "map":
            raise UserError("the checkpoint's data state is from a streaming run; resume with "
                            "data.streaming=true")
        _check_fingerprint(state.get("fingerprint", {}), self._fingerprint())
        _check_planner(state.get("planner", 1), self._plan_args["packing"], int(state["step_in_epoch"]))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._epoch, self._step = int(state["epoch"]), int(state["step_in_epoch"])
        self._global = int(state["global_step"])


def _check_fingerprint(saved: Dict[str, Any], now: Dict[str, Any]) -> None:
    changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k]]
    if changed:
        raise UserError(f"cannot resume the data position: {', '.join(changed)} changed since the "
                        f"checkpoint; restore those settings (data, data.eval_fraction, trainer.seed, "
                        f"tokens_per_step, max_length, packing) or start a fresh run")


def _check_planner(saved: int, packing: str, step_in_epoch: int) -> None:
    """A data state saved mid-epoch by a planner that selects other steps (states without a
    version are from version 1) would repeat and skip examples in the rest of that epoch: the plan
    is recomputed from (seed, epoch). At an epoch's start nothing of it has been trained yet."""
    if step_in_epoch and not SELECTION_SINCE[packing] <= saved <= PLANNER_VERSION:
        raise UserError(f"cannot resume the data position: the checkpoint was planned by step planner version "
                        f"{saved} and this is version {PLANNER_VERSION}, which selects other data.packing={packing} "
                        f"steps, so the rest of its epoch would repeat and skip examples; resume from a checkpoint "
                        f"at an epoch start, or start a new run from its weights (trainer.resume=false "
                        f"model.path=<checkpoint>/model and a new trainer.output_dir)")


class StreamTrainData:
    """A stream (data.streaming=true): order-preserving greedy steps, no shuffling. Every rank
    reads and tokenizes the whole stream so that all compute the same global plan."""

    num_steps_per_epoch: Optional[int] = None

    def __init__(self, raw: datasets.IterableDataset, encoder: Encoder, stats: PrepStats,
                 data_cfg: DataConfig, trainer_cfg: TrainerConfig, rank: int, world_size: int,
                 pad_id: int) -> None:
        self._raw = raw
        self._encoder = encoder
        self.stats = stats
        self.rank, self.world_size = rank, world_size
        self._pad_id = pad_id
        self._padded = data_cfg.packing == "none"
        self._epochs = trainer_cfg.epochs
        self._budget = trainer_cfg.tokens_per_step
        # Without a global plan to compare, the settings that decide which rows survive
        # preparation and how they are cut are the stream's identity on resume.
        self._fingerprint = {"source": encoder.source, "tokens_per_step": self._budget,
                             "max_length": data_cfg.max_length, "overlong": data_cfg.overlong,
                             "train_on": data_cfg.train_on, "format": data_cfg.format,
                             "packing": data_cfg.packing}
        self._micro = trainer_cfg.micro_batch_tokens
        self._source = encoder.source
        self._epoch, self._consumed, self._step, self._global = 0, 0, 0, 0

    def _encoded(self) -> Iterator[Tuple[int, Any]]:
        """(row number, Encoded) from the current position; counts every row into stats."""
        stream = self._raw.skip(self._consumed) if self._consumed else self._raw
        row_no = self._consumed
        batch: List[Dict[str, Any]] = []
        for row in _chain(stream, [None]):
            if row is not None:
                batch.append(row)
                if len(batch) < STREAM_BATCH:
                    continue
            if not batch:
                break
            results = self._encoder.encode_rows(batch, range(row_no, row_no + len(batch)))
            self.stats.count(np.array([int(r.status) for r in results]),
                             np.array([len(r.input_ids) for r in results]),
                             np.array([r.n_trained for r in results]))
            for k, r in enumerate(results):
                yield row_no + k, r
            row_no += len(batch)
            batch = []

    def _step_of(self, pending: List[Tuple[int, Any]]) -> TrainStep:
        lengths = np.array([len(e.input_ids) for _, e in pending], dtype=np.int64)
        n_trained = np.array([e.n_trained for _, e in pending], dtype=np.int64)
        p = plan_step([[k] for k in range(len(pending))], lengths, n_trained, epoch=self._epoch,
                      step_in_epoch=self._step, micro_batch_tokens=self._micro,
                      world_size=self.world_size, padded=self._padded)

        def fetch(ids: Sequence[int]) -> Dict[int, Dict[str, Any]]:
            return {i: {"input_ids": pending[i][1].input_ids, "labels": pending[i][1].labels} for i in ids}

        self._step += 1
        self._global += 1
        return TrainStep(self._global - 1, self._epoch, self._step - 1,
                         _materialize(p, self.rank, fetch, self._padded, self._pad_id),
                         p.num_trained_tokens, p.num_input_tokens, p.num_slots, [row for row, _ in pending])

    def steps(self) -> Iterator[TrainStep]:
        while self._epochs is None or self._epoch < self._epochs:
            pending: List[Tuple[int, Any]] = []
            used = 0
            seen_rows = self._consumed > 0
            for row_no, enc in self._encoded():
                seen_rows = True
                if enc.status > Status.TRUNCATED:
                    continue
                if pending and used + len(enc.input_ids) > self._budget:
                    step = self._step_of(pending)
                    self._consumed = row_no  # this example opens the next step
                    yield step
                    pending, used = [], 0
                pending.append((row_no, enc))
                used += len(enc.input_ids)
            if not seen_rows:
                raise UserError(f"data.path={self._source} has no rows; point it at a non-empty dataset")
            if pending:
                step = self._step_of(pending)
                self._consumed = 0
                self._epoch, self._step = self._epoch + 1, 0
                yield step
            else:
                if self._step == 0 and self._consumed == 0:
                    raise UserError(f"no examples left in data.path={self._source} after preparation "
                                    f"({self.stats.report()}); check the data and data.max_length")
                self._consumed = 0
                self._epoch, self._step = self._epoch + 1, 0

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "stream", "epoch": self._epoch, "rows_consumed": self._consumed,
                "step_in_epoch": self._step, "global_step": self._global,
                "fingerprint": dict(self._fingerprint)}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """One UserError line when `state` (a checkpoint's) cannot resume this stream."""
        if state.get("kind") != "stream":
            raise UserError("the checkpoint's data state is from a non-streaming run; resume with "
                            "data.streaming=false")
        _check_fingerprint(state.get("fingerprint", {}), self._fingerprint)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._epoch, self._consumed = int(state["epoch"]), int(state["rows_consumed"])
        self._step, self._global = int(state["step_in_epoch"]), int(state["global_step"])


def _chain(first, second):
    yield from first
    yield from second


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


def _open(data_cfg: DataConfig, tokenizer: Tokenizer):
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


def _tokenize(ds: datasets.Dataset, encoder: Encoder, data_cfg: DataConfig):
    """(tokenized rows, status, lengths, n_trained): one output row per input row (cached map)."""
    tokenized = ds.map(encoder, batched=True, batch_size=256, with_indices=True, features=FEATURES,
                       remove_columns=ds.column_names, desc="tokenizing",
                       num_proc=data_cfg.num_proc if data_cfg.num_proc > 1 else None)
    cols = tokenized.select_columns(["status", "length", "n_trained"]).with_format("numpy")[:]
    status, lengths, n_trained = (np.asarray(cols[k]) for k in ("status", "length", "n_trained"))
    return tokenized, status, lengths, n_trained


def build_train_data(data_cfg: DataConfig, trainer_cfg: TrainerConfig, tokenizer: Tokenizer,
                     rank: int, world_size: int) -> Union[TrainData, StreamTrainData]:
    """Load, tokenize and plan. Every rank calls this and computes the same global plan.
    With data.eval_fraction the held-out rows are excluded here (see `heldout_rows`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    t0 = time.perf_counter()
    validate_data(data_cfg, trainer_cfg)  # callers that build data without the CLI
    source, stats, ds, encoder = _open(data_cfg, tokenizer)
    pad_id = tokenizer.eos_token_id

    if isinstance(ds, datasets.IterableDataset):
        if data_cfg.max_examples is not None:
            ds = ds.take(data_cfg.max_examples)
        if data_cfg.packing == "bfd":
            log.info("data.streaming: steps are filled greedily in stream order "
                     "(bfd needs the whole data set)")
        log.info("data %s: streaming; examples are tokenized as steps are drawn", source.name)
        return StreamTrainData(ds, encoder, stats, data_cfg, trainer_cfg, rank, world_size, pad_id)

    if data_cfg.max_examples is not None:
        ds = ds.select(range(min(len(ds), data_cfg.max_examples)))
    tokenized, status, lengths, n_trained = _tokenize(ds, encoder, data_cfg)
    train_rows = np.ones(len(status), dtype=bool)
    heldout = None
    if data_cfg.eval_fraction is not None:
        held = heldout_rows(len(status), data_cfg.eval_fraction, trainer_cfg.seed)
        train_rows[held] = False
        heldout = HeldOut(tokenized.select(held), status[held], lengths[held], n_trained[held], source.name)
        log.info("data.eval_fraction=%s: %d of %d rows held out for evaluation (never trained on)",
                 data_cfg.eval_fraction, held.size, len(status))
    stats.count(status[train_rows], lengths[train_rows], n_trained[train_rows])
    keep = np.flatnonzero(Status.kept(status) & train_rows)
    if keep.size == 0:
        raise UserError(f"no examples left in data.path={source.name} after preparation ({stats.report()}); "
                        f"check the data fields, data.train_on and data.max_length")
    examples = tokenized.select(keep) if keep.size < len(tokenized) else tokenized
    data = TrainData(examples, lengths[keep].astype(np.int64), n_trained[keep].astype(np.int64), stats,
                     data_cfg, trainer_cfg, rank, world_size, pad_id, heldout)
    stats.set_lengths(data.lengths)
    stats.steps_per_epoch = data.num_steps_per_epoch
    stats.packing_efficiency = packing_efficiency(data.plan(0))
    stats.seconds = time.perf_counter() - t0
    log.info(stats.report())
    _warn_if_smaller_than_a_step(stats, trainer_cfg)
    return data


def _warn_if_smaller_than_a_step(stats: PrepStats, trainer_cfg: TrainerConfig) -> None:
    # Each step then holds the whole data set: every optimizer step is one more epoch of it.
    if stats.tokens < trainer_cfg.tokens_per_step:
        log.warning("data %s has %d tokens, fewer than one optimizer step takes (trainer.tokens_per_step=%d): "
                    "every step will repeat the whole data set; lower trainer.tokens_per_step or add data",
                    stats.source, stats.tokens, trainer_cfg.tokens_per_step)
