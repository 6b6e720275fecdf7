"""Step planning: which examples make each optimizer step, then how they split over ranks and
micro-batches.

Two stages, on purpose:
1. `select_steps` picks each step's examples from the GLOBAL token budget
   (trainer.tokens_per_step). It sees only (lengths, seed, epoch, tokens_per_step, max_length,
   packing), never micro_batch_tokens or world_size: changing the memory knob or the number of
   GPUs cannot change what a step trains on.
2. `plan_step` splits one step over `world_size` ranks and packs micro-batches of
   micro_batch_tokens. Every rank computes the same global plan, so global counts (trained
   tokens for loss normalization, slots for packing efficiency) need no communication.

bfd: examples are first packed (best-fit decreasing) into rows of at most max_length tokens;
the rows are shuffled, then packed (best-fit decreasing) into steps of tokens_per_step. A row
always fits a micro-batch (micro_batch_tokens >= max_length), so micro-batches built from whole
rows stay nearly full. Packing steps straight from example lengths leaves steps of a few large
examples that do not split evenly into micro-batches (~85% efficiency on the demo data, against
~99.8% this way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from granite_train.data.packing import (balanced_partition, best_fit_decreasing, deal_to_ranks, greedy_fill,
                                        padded_groups)

Rows = List[List[int]]  # a step: rows of example ids


@dataclass(frozen=True)
class StepPlan:
    epoch: int
    step_in_epoch: int
    ranks: Tuple[Tuple[Tuple[int, ...], ...], ...]  # [rank][micro-batch] -> example ids; () = empty
    num_trained_tokens: int  # GLOBAL: labels that count, all ranks and micro-batches
    num_input_tokens: int  # GLOBAL: real tokens
    num_slots: int  # GLOBAL: packed = micro-batches x ranks x micro_batch_tokens; padded = sum B x longest

    @property
    def example_ids(self) -> List[int]:
        return sorted(i for rank in self.ranks for mb in rank for i in mb)

    @property
    def num_micro_batches(self) -> int:
        return len(self.ranks[0]) if self.ranks else 0


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def select_steps(lengths: np.ndarray, *, seed: int, epoch: int, tokens_per_step: int,
                 max_length: int, packing: str) -> List[Rows]:
    """Each step's examples (as rows of example ids) for one epoch of a map-style dataset."""
    rng = epoch_rng(seed, epoch)
    perm = rng.permutation(len(lengths))
    shuffled = lengths[perm]
    if packing != "bfd":  # greedy and none: same selection, in shuffled order
        return [[[int(perm[i])] for i in step] for step in greedy_fill(shuffled, tokens_per_step)]
    rows = [[int(perm[i]) for i in row] for row in best_fit_decreasing(shuffled, max_length)]
    # Note: best-fit DEcreasing below sorts the rows by size, so this shuffle only orders rows of
    # equal size, and each step gathers rows of nearly one size (see docs/benchmarks.md, "Packing
    # efficiency": on demo:shakespeare such steps cannot always split into the fewest micro-batches).
    rows = [rows[i] for i in rng.permutation(len(rows))]
    row_sizes = np.fromiter((int(lengths[r].sum()) for r in rows), dtype=np.int64, count=len(rows))
    steps = [[rows[r] for r in step] for step in best_fit_decreasing(row_sizes, tokens_per_step)]
    return [steps[i] for i in rng.permutation(len(steps))]


def _micro_bins_packed(rows: Rows, lengths: np.ndarray, capacity: int, world_size: int) -> List[List[int]]:
    """Micro-batches (example ids) of at most `capacity` tokens: whole rows by BFD, or single
    examples by BFD when that needs fewer micro-batches per rank (capacity not a multiple of
    max_length). When both need more rounds (micro-batches per rank) than the step's tokens do,
    a balanced partition of the examples into exactly that many rounds x world_size micro-batches
    is used instead if every one fits: all slots a step pays for, and ranks evenly loaded."""
    row_sizes = np.fromiter((int(lengths[r].sum()) for r in rows), dtype=np.int64, count=len(rows))
    bins = [[i for r in b for i in rows[r]] for b in best_fit_decreasing(row_sizes, capacity)]
    cost = lambda bins: (-(-len(bins) // world_size), len(bins))  # noqa: E731
    flat = [i for r in rows for i in r]
    if any(len(r) > 1 for r in rows):
        by_examples = [[flat[j] for j in b] for b in best_fit_decreasing(lengths[flat], capacity)]
        if cost(by_examples) < cost(bins):
            bins = by_examples
    sizes = lengths[flat]
    rounds = -(-(-(-int(sizes.sum()) // capacity)) // world_size)  # the fewest the tokens allow
    if cost(bins)[0] > rounds:
        balanced = balanced_partition(sizes, rounds * world_size, capacity)
        if all(int(sizes[b].sum()) <= capacity for b in balanced):
            return [[flat[j] for j in b] for b in balanced if b]
    return bins


def plan_step(rows: Rows, lengths: np.ndarray, n_trained: np.ndarray, *, epoch: int, step_in_epoch: int,
              micro_batch_tokens: int, world_size: int, padded: bool) -> StepPlan:
    flat = [i for r in rows for i in r]
    if padded:
        bins = [[flat[j] for j in b] for b in padded_groups(lengths[flat], micro_batch_tokens)]
    else:
        bins = _micro_bins_packed(rows, lengths, micro_batch_tokens, world_size)
    bin_tokens = [int(lengths[b].sum()) for b in bins]
    per_rank = deal_to_ranks(bin_tokens, world_size)
    n_micro = max(len(r) for r in per_rank)
    ranks = tuple(tuple(tuple(bins[b]) for b in r) + ((),) * (n_micro - len(r)) for r in per_rank)
    if padded:
        slots = sum(len(b) * int(lengths[b].max()) for b in bins)
    else:
        slots = n_micro * world_size * micro_batch_tokens
    return StepPlan(epoch, step_in_epoch, ranks, int(n_trained[flat].sum()), int(lengths[flat].sum()), slots)


def plan_epoch(lengths: np.ndarray, n_trained: np.ndarray, *, seed: int, epoch: int, tokens_per_step: int,
               max_length: int, packing: str, micro_batch_tokens: int, world_size: int) -> List[StepPlan]:
    steps = select_steps(lengths, seed=seed, epoch=epoch, tokens_per_step=tokens_per_step,
                         max_length=max_length, packing=packing)
    return [plan_step(rows, lengths, n_trained, epoch=epoch, step_in_epoch=k,
                      micro_batch_tokens=micro_batch_tokens, world_size=world_size,
                      padded=packing == "none")
            for k, rows in enumerate(steps)]


def packing_efficiency(plans: Sequence[StepPlan]) -> float:
    """Real tokens / slots over the plans (token-weighted)."""
    slots = sum(p.num_slots for p in plans)
    return sum(p.num_input_tokens for p in plans) / slots if slots else 0.0
