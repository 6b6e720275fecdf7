"""The trainer's entry point: config -> prepared examples -> optimizer steps, resumable.

Data order is a pure function of (seed, epoch): the position (epoch, step within epoch) is the
whole iterator state. Examples are pieces of documents (`docs`): raw data tokenized here (cached
by `datasets`) or a prepared directory read memory-mapped (`shards`). Mixtures of sources
(data.sources) are `mixture.MixtureTrainData`; streams (data.streaming) `stream.StreamTrainData`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

from datasets.distributed import split_dataset_by_node

from granite_train.config import DataConfig, TrainerConfig, validate_data
from granite_train.data.docs import Examples
from granite_train.data.examples import HeldOut, load_examples, open_source
from granite_train.data.mixture import MixtureTrainData, build_mixture
from granite_train.data.plan import PLANNER_VERSION, SELECTION_SINCE, StepPlan, packing_efficiency, plan_epoch
from granite_train.data.prefetch import StepSource
from granite_train.data.shards import is_prepared
from granite_train.data.train_step import TrainStep, check_state, materialize
from granite_train.data.stats import PrepStats
from granite_train.data.stream import Gather, StreamTrainData
from granite_train.data.tokenizer import Tokenizer
from granite_train.errors import UserError

log = logging.getLogger("granite_train.data")
EFFICIENCY_STEPS = 1024  # the data report's packing efficiency: over the first steps of epoch 0


class TrainData(StepSource):
    """Prepared (tokenized) map-style data and its deterministic step plan."""

    def __init__(self, examples: Examples, stats: PrepStats, data_cfg: DataConfig, trainer_cfg: TrainerConfig,
                 rank: int, world_size: int, pad_id: int, heldout: Optional[HeldOut] = None,
                 overlong: str = "truncate") -> None:
        self._examples = examples
        # data.eval_fraction: the held-out rows (never in `examples`), for build_eval_data.
        self.heldout = heldout
        self._eval_fraction = data_cfg.eval_fraction
        self._overlong = overlong
        self.lengths = examples.lengths
        self.n_trained = examples.n_trained
        self.stats = stats
        self.rank, self.world_size = rank, world_size
        self._pad_id = pad_id
        self._padded = data_cfg.packing == "none"
        self._epochs = trainer_cfg.epochs
        self._plan_args = dict(seed=trainer_cfg.seed, tokens_per_step=trainer_cfg.tokens_per_step,
                               max_length=data_cfg.max_length, packing=data_cfg.packing,
                               micro_batch_tokens=trainer_cfg.micro_batch_tokens, world_size=world_size)
        self._cached: Tuple[int, Sequence[StepPlan]] = (-1, [])
        self._epoch, self._step, self._global = 0, 0, 0
        self.prefetch_steps = data_cfg.prefetch_steps
        self._fingerprint_cache: Optional[Dict[str, Any]] = None
        self.num_steps_per_epoch: int = len(self.plan(0))

    def plan(self, epoch: int) -> Sequence[StepPlan]:
        """The global plan of one epoch (all ranks); cached for the current epoch."""
        if self._cached[0] != epoch:
            self._cached = (epoch, plan_epoch(self.lengths, self.n_trained, epoch=epoch, **self._plan_args))
        return self._cached[1]

    def _produce(self) -> Iterator[TrainStep]:
        """Optimizer steps from the current position; stops after trainer.epochs (None: never)."""
        while self._epochs is None or self._epoch < self._epochs:
            plans = self.plan(self._epoch)
            while self._step < len(plans):
                p = plans[self._step]
                # Advance before yielding: a checkpoint taken after training this step resumes after it.
                self._step += 1
                self._global += 1
                yield TrainStep(self._global - 1, p.epoch, p.step_in_epoch,
                                materialize(p, self.rank, self._examples.fetch, self._padded, self._pad_id,
                                            self._examples.fetch_flat if self._examples.reads_flat else None),
                                p.num_trained_tokens, p.num_input_tokens, p.num_slots, p.example_ids)
            self._epoch, self._step = self._epoch + 1, 0

    def _fingerprint(self) -> Dict[str, Any]:
        # What fixes the data order. micro_batch_tokens and world_size are absent on purpose:
        # resuming with other values keeps every step's examples.
        if self._fingerprint_cache is None:  # once: summing the lengths of a large corpus each step is not free
            keys = ("seed", "tokens_per_step", "max_length", "packing")
            self._fingerprint_cache = {**{k: self._plan_args[k] for k in keys}, "num_examples": int(len(self.lengths)),
                                       "num_tokens": int(self.lengths.sum()), "eval_fraction": self._eval_fraction,
                                       "overlong": self._overlong}
        return dict(self._fingerprint_cache)

    def _position(self) -> Dict[str, Any]:
        epoch, step = self._epoch, self._step
        if step and step == len(self.plan(epoch)):  # the epoch is done: record the next one's start
            epoch, step = epoch + 1, 0
        return {"kind": "map", "epoch": epoch, "step_in_epoch": step, "global_step": self._global,
                "fingerprint": self._fingerprint(), "planner": PLANNER_VERSION}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """One UserError line when `state` (a checkpoint's) cannot resume this data."""
        check_state(state, "map", self._fingerprint())
        _check_planner(state.get("planner", 1), self._plan_args["packing"], int(state["step_in_epoch"]))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._stop()  # a live steps() would set its own position back when closed
        self.check_state_dict(state)
        self._set_position(state)

    def _set_position(self, state: Dict[str, Any]) -> None:
        self._epoch, self._step = int(state["epoch"]), int(state["step_in_epoch"])
        self._global = int(state["global_step"])


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


def build_train_data(data_cfg: DataConfig, trainer_cfg: TrainerConfig, tokenizer: Tokenizer,
                     rank: int, world_size: int, gather: Optional[Gather] = None
                     ) -> Union[TrainData, StreamTrainData, MixtureTrainData]:
    """Load, tokenize and plan. Every rank calls this and computes the same global plan (a
    stream shared by rank excepted: `gather`, an all-gather over the data ranks, then makes
    each step's global counts). With data.eval_fraction the held-out rows are excluded here
    (see `heldout_rows`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    t0 = time.perf_counter()
    validate_data(data_cfg, trainer_cfg)  # callers that build data without the CLI
    pad_id = tokenizer.eos_token_id
    if data_cfg.sources:
        return build_mixture(data_cfg, trainer_cfg, tokenizer, rank, world_size)
    if data_cfg.streaming and not is_prepared(data_cfg.path):
        return _build_stream(data_cfg, trainer_cfg, tokenizer, rank, world_size, gather)

    loaded = load_examples(data_cfg, trainer_cfg, tokenizer)
    stats = loaded.stats
    data = TrainData(loaded.examples, stats, data_cfg, trainer_cfg, rank, world_size, pad_id, loaded.heldout,
                     loaded.overlong)
    stats.set_lengths(data.lengths)
    stats.steps_per_epoch = data.num_steps_per_epoch
    stats.packing_efficiency = packing_efficiency(data.plan(0)[:EFFICIENCY_STEPS])
    stats.seconds = time.perf_counter() - t0
    log.info(stats.report())
    _warn_if_smaller_than_a_step(stats, trainer_cfg)
    return data


def _build_stream(data_cfg: DataConfig, trainer_cfg: TrainerConfig, tokenizer: Tokenizer, rank: int,
                  world_size: int, gather: Optional[Gather]) -> StreamTrainData:
    source, stats, ds, encoder = open_source(data_cfg, tokenizer)
    by_rank = data_cfg.stream_share == "rank" and world_size > 1
    if data_cfg.max_examples is not None:  # before the split: max_examples rows over all ranks
        ds = ds.take(data_cfg.max_examples)
    n_shards = ds.num_shards
    if by_rank:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        if rank == 0:
            how = (f"{n_shards // world_size} of its {n_shards} shards" if n_shards % world_size == 0 else
                   f"one row in every {world_size} ({n_shards} shard(s) do not divide over {world_size} "
                   f"ranks: each rank still reads every row, and tokenizes only its own)")
            log.info("data.streaming: each of %d ranks reads its own share of %s, %s; steps depend on the "
                     "number of ranks (data.stream_share=all: every rank reads everything, rank-independent "
                     "steps)", world_size, source.name, how)
    part = trainer_cfg.tokens_per_step // world_size
    if by_rank and rank == 0 and part < 4 * data_cfg.max_length:
        log.warning("data.streaming: each rank fills %d tokens of every step (trainer.tokens_per_step=%d over %d "
                    "ranks), %.1fx data.max_length=%d: greedy parts that small leave up to one example's room "
                    "empty; raise trainer.tokens_per_step, or set data.stream_share=all (one global plan)",
                    part, trainer_cfg.tokens_per_step, world_size, part / data_cfg.max_length, data_cfg.max_length)
    if data_cfg.packing == "bfd":
        log.info("data.streaming: steps are filled greedily in stream order "
                 "(bfd needs the whole data set)")
    log.info("data %s: streaming; examples are tokenized as steps are drawn", source.name)
    return StreamTrainData(ds, encoder, stats, data_cfg, trainer_cfg, rank, world_size,
                           tokenizer.eos_token_id, gather, whole_shards=n_shards % world_size == 0)


def _warn_if_smaller_than_a_step(stats: PrepStats, trainer_cfg: TrainerConfig) -> None:
    # Each step then holds the whole data set: every optimizer step is one more epoch of it.
    if stats.tokens < trainer_cfg.tokens_per_step:
        log.warning("data %s has %d tokens, fewer than one optimizer step takes (trainer.tokens_per_step=%d): "
                    "every step will repeat the whole data set; lower trainer.tokens_per_step or add data",
                    stats.source, stats.tokens, trainer_cfg.tokens_per_step)
