"""data.streaming=true: a stream tokenized as steps are drawn, order-preserving greedy steps.

Two ways to share a stream over ranks (data.stream_share):
- all: every rank reads and tokenizes the whole stream and computes the same global plan, so the
  steps do not depend on the number of ranks (as with map-style data) and nothing is exchanged.
- rank (the default): each rank reads its own disjoint share (`split_dataset_by_node`) and fills
  its part of every step (tokens_per_step / ranks) greedily. One small all-gather per step
  (`gather`, the trainer's) tells every rank the step's global counts (trained tokens for the
  loss, micro-batches per rank, slots) and every rank's position. A rank whose share of the epoch
  ran out trains empty micro-batches until all have: an epoch ends on every rank together. What
  it gives up: the steps depend on the number of ranks, and resume needs the same number.
A split document's pieces may fall into two steps, so a position is (rows consumed, pieces of
the next row consumed); DONE rows: the rank's share of the epoch is used up.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import numpy as np

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data.collator import MicroBatch, empty_micro_batch
from granite_train.data.docs import split_documents
from granite_train.data.plan import plan_step
from granite_train.data.prefetch import StepSource
from granite_train.data.encode import Encoded, Encoder
from granite_train.data.stats import PrepStats, Status
from granite_train.data.train_step import TrainStep, check_state, materialize
from granite_train.errors import UserError

log = logging.getLogger("granite_train.data")
STREAM_BATCH = 256  # rows tokenized together from a stream
DONE = -1  # rows consumed: this rank's share of the epoch is used up
# this rank's ints -> every data rank's, indexed by data rank (an all-gather; the trainer's)
Gather = Callable[[List[int]], List[List[int]]]


def _pieces(enc: Encoded, max_length: int) -> List[Encoded]:
    """A kept row as its examples: itself, or the pieces of a split document."""
    if enc.status != Status.SPLIT:
        return [enc]
    p = split_documents(np.array([len(enc.input_ids)]), np.array([enc.n_trained]), max_length)
    return [Encoded(Status.OK, enc.input_ids[s: s + n], enc.labels[s: s + n], int(t))
            for s, n, t in zip(p.start.tolist(), p.lengths.tolist(), p.n_trained.tolist())]


def share_of(total: int, rank: int, world_size: int) -> int:
    """Rank `rank`'s part of `total` when the parts differ by at most one and sum to it."""
    return total // world_size + (rank < total % world_size)


@dataclass
class _Part:
    """This rank's part of one step (data.stream_share=rank), or the end of its share of the
    epoch (`micro_batches` None)."""

    micro_batches: Optional[List[MicroBatch]]
    rows: List[int] = field(default_factory=list)
    num_trained_tokens: int = 0
    num_input_tokens: int = 0
    num_slots: int = 0
    position: Tuple[int, int] = (DONE, 0)  # (rows, pieces) consumed after it
    counts: List[int] = field(default_factory=list)  # the stats' counts when it was made


class StreamTrainData(StepSource):
    """A stream: order-preserving greedy steps of trainer.tokens_per_step, no shuffling."""

    num_steps_per_epoch: Optional[int] = None

    def __init__(self, raw: datasets.IterableDataset, encoder: Encoder, stats: PrepStats,
                 data_cfg: DataConfig, trainer_cfg: TrainerConfig, rank: int, world_size: int,
                 pad_id: int, gather: Optional[Gather] = None, whole_shards: bool = False) -> None:
        self._raw = raw  # this rank's share when shared by rank
        self._encoder = encoder
        self.stats = stats
        self.rank, self.world_size = rank, world_size
        self._by_rank = data_cfg.stream_share == "rank" and world_size > 1
        if self._by_rank and gather is None:
            raise ValueError("a stream shared by rank (data.stream_share=rank) needs `gather`, an all-gather "
                             "over the data ranks")
        self._gather = gather
        # By rank, rows are numbered as in the whole stream where the share is every N-th row;
        # with whole shards per rank only the share's own numbering is known (errors say so).
        self._whole_shards = self._by_rank and whole_shards
        self.prefetch_steps = data_cfg.prefetch_steps
        self._pad_id = pad_id
        self._padded = data_cfg.packing == "none"
        self._epochs = trainer_cfg.epochs
        self._step_tokens = trainer_cfg.tokens_per_step
        self._budget = share_of(trainer_cfg.tokens_per_step, rank, world_size) if self._by_rank \
            else trainer_cfg.tokens_per_step
        self._max_length = data_cfg.max_length
        # Without a global plan to compare, the settings that decide which rows survive
        # preparation and how they are cut are the stream's identity on resume.
        self._fingerprint: Dict[str, Any] = {
            "source": encoder.source, "tokens_per_step": self._step_tokens, "max_length": data_cfg.max_length,
            "overlong": encoder.overlong, "train_on": data_cfg.train_on, "format": data_cfg.format,
            "packing": data_cfg.packing, "share": "rank" if self._by_rank else "all"}
        if self._by_rank:
            self._fingerprint["ranks"] = world_size
        self._micro = trainer_cfg.micro_batch_tokens
        self._source = encoder.source
        self._epoch, self._step, self._global = 0, 0, 0
        # This rank's position in its stream (the data thread's while steps are made ahead).
        self._consumed, self._pieces_consumed = 0, 0
        self._read_epoch = 0  # the epoch this rank's reading is in (by rank: may be ahead of _epoch)
        self._positions: List[Tuple[int, int]] = [(0, 0)] * world_size  # by rank: every rank's

    # ---------------------------------------------------------------- reading

    def _encoded(self) -> Iterator[Tuple[int, int, Encoded]]:
        """(row number, piece number, example) from the current position; counts every row into stats."""
        # islice, not IterableDataset.skip: after split_dataset_by_node, skip counts rows of the whole stream.
        stream = itertools.islice(iter(self._raw), self._consumed, None)
        row_no, first_row, skip = self._consumed, self._consumed, self._pieces_consumed
        batch: List[Dict[str, Any]] = []
        for row in itertools.chain(stream, [None]):
            if row is not None:
                batch.append(row)
                if len(batch) < STREAM_BATCH:
                    continue
            if not batch:
                break
            results = self._encode(batch, row_no)
            status = np.array([int(r.status) for r in results])
            self.stats.count(status, np.array([len(r.input_ids) for r in results]),
                             np.array([r.n_trained for r in results]))
            for k, r in enumerate(results):
                if not Status.kept(status[k]):
                    continue
                pieces = _pieces(r, self._max_length)
                first = row_no + k == first_row
                if r.status == Status.SPLIT:
                    self.stats.pieces += len(pieces) - (skip if first else 0)
                for j, piece in enumerate(pieces):
                    if first and j < skip:
                        continue  # trained before the checkpoint
                    yield row_no + k, j, piece
            row_no += len(batch)
            batch = []

    def _encode(self, batch: List[Dict[str, Any]], first: int) -> List[Encoded]:
        rows = range(first, first + len(batch))
        if self._by_rank and not self._whole_shards:
            rows = range(first * self.world_size + self.rank, (first + len(batch)) * self.world_size + self.rank,
                         self.world_size)  # rank r's i-th row is row i * ranks + r of the stream
        try:
            return self._encoder.encode_rows(batch, rows)
        except UserError as e:
            if not self._whole_shards:
                raise
            raise UserError(f"{e} (row numbers count within data rank {self.rank}'s share of the stream: "
                            f"its shards {self.rank}, {self.rank + self.world_size}, ...)") from None

    def _greedy(self) -> Iterator[Tuple[List[Tuple[int, Encoded]], int, int]]:
        """The rest of this epoch as greedy steps of `_budget` tokens: (examples, rows and pieces
        consumed after them; DONE after the last)."""
        pending: List[Tuple[int, Encoded]] = []
        used = 0
        for row_no, piece_no, enc in self._encoded():
            if pending and used + len(enc.input_ids) > self._budget:
                yield pending, row_no, piece_no  # this example opens the next step
                pending, used = [], 0
            pending.append((row_no, enc))
            used += len(enc.input_ids)
        if pending:
            yield pending, DONE, 0

    def _plan(self, pending: List[Tuple[int, Encoded]], world_size: int, rank: int, epoch: int = 0, step: int = 0):
        lengths = np.array([len(e.input_ids) for _, e in pending], dtype=np.int64)
        n_trained = np.array([e.n_trained for _, e in pending], dtype=np.int64)
        p = plan_step(np.arange(len(pending), dtype=np.int64), lengths, n_trained, epoch=epoch,
                      step_in_epoch=step, micro_batch_tokens=self._micro,
                      world_size=world_size, padded=self._padded)

        def fetch(ids: Sequence[int]) -> Dict[int, Dict[str, Any]]:
            return {i: {"input_ids": pending[i][1].input_ids, "labels": pending[i][1].labels} for i in ids}

        return p, materialize(p, rank, fetch, self._padded, self._pad_id)

    def _refuse_empty(self, stats: PrepStats) -> None:
        if stats.rows_read == 0:
            raise UserError(f"data.path={self._source} has no rows; point it at a non-empty dataset")
        raise UserError(f"no examples left in data.path={self._source} after preparation "
                        f"({stats.report()}); check the data and data.max_length")

    # ---------------------------------------------------------------- every rank reads it all

    def _produce(self) -> Iterator[Any]:
        if self._by_rank:
            yield from self._produce_parts()
            return
        while self._epochs is None or self._epoch < self._epochs:
            ended = False
            for pending, rows, pieces in self._greedy():
                p, micro = self._plan(pending, self.world_size, self.rank, self._epoch, self._step)
                step = TrainStep(self._global, self._epoch, self._step, micro, p.num_trained_tokens,
                                 p.num_input_tokens, p.num_slots, [row for row, _ in pending])
                self._step, self._global = self._step + 1, self._global + 1
                self._consumed, self._pieces_consumed = (0, 0) if rows == DONE else (rows, pieces)
                if rows == DONE:
                    ended = True
                    self._end_epoch(self.stats)
                yield step
            if not ended:
                if self._step == 0 and self._consumed == 0:
                    self._refuse_empty(self.stats)
                self._consumed = self._pieces_consumed = 0
                self._end_epoch(self.stats)

    def _end_epoch(self, stats: PrepStats) -> None:
        if self.rank == 0:
            log.info("data.streaming: epoch %d done after %d steps; read by this run so far: %s",
                     self._epoch, self._step, stats.report())
        self._epoch, self._step = self._epoch + 1, 0

    # ---------------------------------------------------------------- each rank reads its share

    def _produce_parts(self) -> Iterator[_Part]:
        """On the data thread: this rank's parts of steps, each epoch closed by an end part."""
        while self._epochs is None or self._read_epoch < self._epochs:
            if self._consumed != DONE:
                for pending, rows, pieces in self._greedy():
                    p, micro = self._plan(pending, 1, 0)
                    self._consumed, self._pieces_consumed = rows, pieces
                    yield _Part(micro, [row for row, _ in pending], p.num_trained_tokens, p.num_input_tokens,
                                p.num_slots, (rows, pieces), self.stats.counts())
            self._consumed, self._pieces_consumed = DONE, 0
            yield _Part(None, counts=self.stats.counts())
            self._read_epoch += 1
            self._consumed = 0

    def _made(self) -> Iterator[Tuple[Any, Dict[str, Any]]]:
        if not self._by_rank:
            yield from super()._made()
            return
        for part in self._produce():
            yield part, {}  # the position is the caller's, after the exchange (`_main`)

    def _main(self, made: Iterator[Tuple[Any, Dict[str, Any]]]) -> Iterator[Tuple[Any, Dict[str, Any]]]:
        """By rank, on the caller's thread: each step from every rank's part, exchanged."""
        if not self._by_rank:
            yield from made
            return
        part: Optional[_Part] = None
        while self._epochs is None or self._epoch < self._epochs:
            failed: Optional[Exception] = None
            if part is None:
                try:
                    part = next(made)[0]
                except Exception as exc:  # noqa: BLE001 - raised below, after every rank has heard of it
                    failed, part = exc, _Part(None, counts=self.stats.counts())
            has = part.micro_batches is not None
            mine = [self.rank, -1 if failed else int(has), len(part.micro_batches or ()), part.num_trained_tokens,
                    part.num_input_tokens, part.num_slots, *part.position, *part.counts]
            every = self._gather(mine)  # every rank takes part, also one whose reading just failed
            if failed is not None:
                raise failed
            broken = [v[0] for v in every if v[1] < 0]
            if broken:
                raise UserError(f"data rank {broken[0]} stopped reading its share of the stream (its error is in "
                                f"its log, marked [rank {broken[0]}] where ranks map one to one); every rank stops")
            if not any(v[1] for v in every):  # every share of this epoch is used up
                stats = PrepStats(source=self.stats.source, format=self.stats.format)
                for v in every:
                    stats.add_counts(v[8:])
                if self._step == 0:
                    self._refuse_empty(stats)
                self._end_epoch(stats)
                self._positions = [(0, 0)] * self.world_size
                part = None
                continue
            n_micro = max(v[2] for v in every)
            micro = list(part.micro_batches or ()) + [empty_micro_batch(self._padded)
                                                      for _ in range(n_micro - len(part.micro_batches or ()))]
            slots = sum(v[5] for v in every) if self._padded else n_micro * self.world_size * self._micro
            step = TrainStep(self._global, self._epoch, self._step, micro, sum(v[3] for v in every),
                             sum(v[4] for v in every), slots, part.rows)
            self._step, self._global = self._step + 1, self._global + 1
            self._positions = [(v[6], v[7]) for v in every]
            if has:
                part = None
            yield step, self._position()

    # ---------------------------------------------------------------- position

    def _position(self) -> Dict[str, Any]:
        state = {"kind": "stream", "epoch": self._epoch, "rows_consumed": self._consumed,
                 "pieces_consumed": self._pieces_consumed, "step_in_epoch": self._step,
                 "global_step": self._global, "fingerprint": dict(self._fingerprint)}
        if self._by_rank:  # every rank's position; rows_consumed / pieces_consumed: this rank's
            state["ranks"] = [list(p) for p in self._positions]
            state["rows_consumed"], state["pieces_consumed"] = self._positions[self.rank]
        return state

    def _set_position(self, state: Dict[str, Any]) -> None:
        self._epoch, self._read_epoch = int(state["epoch"]), int(state["epoch"])
        self._step, self._global = int(state["step_in_epoch"]), int(state["global_step"])
        if self._by_rank:
            self._positions = [(int(r), int(p)) for r, p in state["ranks"]]
            self._consumed, self._pieces_consumed = self._positions[self.rank]
        else:
            self._consumed, self._pieces_consumed = int(state["rows_consumed"]), int(state.get("pieces_consumed", 0))

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """One UserError line when `state` (a checkpoint's) cannot resume this stream."""
        check_state(state, "stream", self._fingerprint)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._stop()  # a live steps() would set its own position back when closed
        self.check_state_dict(state)
        self._set_position(state)
