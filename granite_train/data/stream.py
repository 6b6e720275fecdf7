"""data.streaming=true: a stream tokenized as steps are drawn, order-preserving greedy steps.

Every rank reads and tokenizes the whole stream so that all compute the same global plan (the
rank-count-independent plan of map-style data). A split document's pieces may fall into two
steps, so the position is (rows consumed, pieces of the next row consumed).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import datasets
import numpy as np

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data.docs import split_documents
from granite_train.data.steps import TrainStep, check_state, materialize
from granite_train.data.plan import plan_step
from granite_train.data.prep import Encoded, Encoder
from granite_train.data.stats import PrepStats, Status
from granite_train.errors import UserError

STREAM_BATCH = 256  # rows tokenized together from a stream


def _pieces(enc: Encoded, max_length: int) -> List[Encoded]:
    """A kept row as its examples: itself, or the pieces of a split document."""
    if enc.status != Status.SPLIT:
        return [enc]
    p = split_documents(np.array([len(enc.input_ids)]), np.array([enc.n_trained]), max_length)
    return [Encoded(Status.OK, enc.input_ids[s: s + n], enc.labels[s: s + n], int(t))
            for s, n, t in zip(p.start.tolist(), p.lengths.tolist(), p.n_trained.tolist())]


class StreamTrainData:
    """A stream: order-preserving greedy steps of trainer.tokens_per_step, no shuffling."""

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
        self._max_length = data_cfg.max_length
        # Without a global plan to compare, the settings that decide which rows survive
        # preparation and how they are cut are the stream's identity on resume.
        self._fingerprint = {"source": encoder.source, "tokens_per_step": self._budget,
                             "max_length": data_cfg.max_length, "overlong": encoder.overlong,
                             "train_on": data_cfg.train_on, "format": data_cfg.format,
                             "packing": data_cfg.packing}
        self._micro = trainer_cfg.micro_batch_tokens
        self._source = encoder.source
        self._epoch, self._consumed, self._step, self._global = 0, 0, 0, 0
        self._pieces_consumed = 0  # of row `_consumed` (a split document cut between steps)

    def _encoded(self) -> Iterator[Tuple[int, int, Encoded]]:
        """(row number, piece number, example) from the current position; counts every row into stats."""
        stream = self._raw.skip(self._consumed) if self._consumed else self._raw
        row_no, first_row, skip = self._consumed, self._consumed, self._pieces_consumed
        batch: List[Dict[str, Any]] = []
        for row in _chain(stream, [None]):
            if row is not None:
                batch.append(row)
                if len(batch) < STREAM_BATCH:
                    continue
            if not batch:
                break
            results = self._encoder.encode_rows(batch, range(row_no, row_no + len(batch)))
            status = np.array([int(r.status) for r in results])
            self.stats.count(status, np.array([len(r.input_ids) for r in results]),
                             np.array([r.n_trained for r in results]))
            for k, r in enumerate(results):
                if not Status.kept(status[k]):
                    continue
                pieces = _pieces(r, self._max_length)
                if r.status == Status.SPLIT:
                    self.stats.pieces += len(pieces)
                for j, piece in enumerate(pieces):
                    if row_no + k == first_row and j < skip:
                        continue  # trained before the checkpoint
                    yield row_no + k, j, piece
            row_no += len(batch)
            batch = []

    def _step_of(self, pending: List[Tuple[int, Encoded]]) -> TrainStep:
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
                         materialize(p, self.rank, fetch, self._padded, self._pad_id),
                         p.num_trained_tokens, p.num_input_tokens, p.num_slots, [row for row, _ in pending])

    def steps(self) -> Iterator[TrainStep]:
        while self._epochs is None or self._epoch < self._epochs:
            pending: List[Tuple[int, Encoded]] = []
            used = 0
            for row_no, piece_no, enc in self._encoded():
                if pending and used + len(enc.input_ids) > self._budget:
                    step = self._step_of(pending)
                    self._consumed, self._pieces_consumed = row_no, piece_no  # this example opens the next step
                    yield step
                    pending, used = [], 0
                pending.append((row_no, enc))
                used += len(enc.input_ids)
            if self.stats.rows_read == 0:
                raise UserError(f"data.path={self._source} has no rows; point it at a non-empty dataset")
            if pending:
                step = self._step_of(pending)
                self._consumed = self._pieces_consumed = 0
                self._epoch, self._step = self._epoch + 1, 0
                yield step
            else:
                if self._step == 0 and self._consumed == 0:
                    raise UserError(f"no examples left in data.path={self._source} after preparation "
                                    f"({self.stats.report()}); check the data and data.max_length")
                self._consumed = self._pieces_consumed = 0
                self._epoch, self._step = self._epoch + 1, 0

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "stream", "epoch": self._epoch, "rows_consumed": self._consumed,
                "pieces_consumed": self._pieces_consumed, "step_in_epoch": self._step,
                "global_step": self._global, "fingerprint": dict(self._fingerprint)}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """One UserError line when `state` (a checkpoint's) cannot resume this stream."""
        check_state(state, "stream", self._fingerprint)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_state_dict(state)
        self._epoch, self._consumed = int(state["epoch"]), int(state["rows_consumed"])
        self._pieces_consumed = int(state.get("pieces_consumed", 0))
        self._step, self._global = int(state["step_in_epoch"]), int(state["global_step"])


def _chain(first, second):
    yield from first
    yield from second
