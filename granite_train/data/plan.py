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

bfd: a step is built from parts of tokens_per_step / P tokens (`step_parts`): P the largest
power of two with parts of at least max_length tokens that the fill below packs to >= 99% on
average, probed on the lengths in a fixed order, else a smaller P (1: whole steps). On the demo
data with 16384 tokens a step: 8 parts of 2048 for chitchat (max_length 2048) and for shakespeare
(max_length 1024, whose ~526-token passages cannot fill parts of 1024). The shuffled examples
fill the parts one after another (`packing.lookahead_fill`): a part takes the next examples in
shuffled order until half full, then is finished best-fit from the next 512 unplaced examples
(the largest that still fits, again and again). Parts come out nearly full while holding whatever
lengths the shuffle brings; on the demo data the steps are the fewest the tokens allow. P
consecutive parts make a step; the steps are shuffled. So a step mixes lengths, and each epoch's
shuffle changes who trains together (on the demo data 0.6-1.1% of the example pairs that share a
step in one epoch share one in the next, as with greedy). Micro-batches of a power-of-two multiple
of the part size take whole parts (`plan_step`: best fit of the parts) and are as full as the
parts; other sizes fall back to best fit of the examples and a balanced partition of the step.
The planner before (version 1) packed rows of max_length by best-fit DEcreasing into steps: each
step gathered rows of nearly one size, which often could not split into the fewest micro-batches
(0.85-0.96 efficiency on demo:shakespeare), and the same examples met again every epoch (31% of
the pairs on demo:chitchat). The data state records PLANNER_VERSION, so a checkpoint planned by
another version does not silently resume mid-epoch with other steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple, Union

import numpy as np

from granite_train.data.packing import (balanced_partition, best_fit_decreasing, deal_to_ranks, greedy_fill,
                                        lookahead_fill, padded_groups)

Parts = List[List[int]]  # a step: its parts (groups of example ids; greedy and none: one example each)

# Bump when select_steps changes which examples share a step. SELECTION_SINCE: the version since
# which each packing selects as now; a data state from before it cannot resume mid-epoch.
PLANNER_VERSION = 2
SELECTION_SINCE = {"bfd": 2, "greedy": 1, "none": 1}
LOOKAHEAD = 512  # unplaced examples a part's best-fit finish chooses from
PART_FILL = 0.99  # step_parts: the finest parts that fill at least this well on average
PROBE_EXAMPLES = 65536


@dataclass(frozen=True)
class StepPlan:
    epoch: int
    step_in_epoch: int
    ranks: Tuple[Tuple[Tuple[int, ...], ...], ...]  # [rank][micro-batch] -> example ids; () = empty
    num_trained_tokens: int  # GLOBAL: labels that count, all ranks and micro-batches
    num_input_tokens: int  # GLOBAL: real tokens
    num_slots: int  # GLOBAL: packed = micro-batches x ranks x micro_batch_tokens; padded = sum B x longest

    sorted_ids: np.ndarray = field(compare=False, hash=False, repr=False)  # the step's example ids, sorted

    @property
    def example_ids(self) -> List[int]:
        return self.sorted_ids.tolist()

    @property
    def num_micro_batches(self) -> int:
        return len(self.ranks[0]) if self.ranks else 0


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def step_parts(lengths: np.ndarray, tokens_per_step: int, max_length: int) -> int:
    """How many parts a bfd step is built from: the most, by powers of two, of at least max_length
    tokens each whose parts `lookahead_fill` fills to PART_FILL on average, probed on up to
    PROBE_EXAMPLES of the lengths in a fixed pseudo-random order (so a function of the lengths,
    tokens_per_step and max_length alone); 1 (whole steps) when no split fills that well."""
    n_parts = 1
    while tokens_per_step // (2 * n_parts) >= max_length:
        n_parts *= 2
    probe = np.random.default_rng(0).permutation(len(lengths))[:PROBE_EXAMPLES]
    sample = lengths[probe]
    total = int(sample.sum())
    while n_parts > 1:
        capacity = tokens_per_step // n_parts
        if total >= PART_FILL * capacity * len(lookahead_fill(sample, capacity, LOOKAHEAD, capacity // 2)):
            break
        n_parts //= 2
    return n_parts


def select_steps(lengths: np.ndarray, *, seed: int, epoch: int, tokens_per_step: int,
                 max_length: int, packing: str) -> List[Parts]:
    """Each step's examples (as parts of example ids) for one epoch of a map-style dataset."""
    rng = epoch_rng(seed, epoch)
    perm = rng.permutation(len(lengths))
    shuffled = lengths[perm]
    if packing != "bfd":  # greedy and none: same selection, in shuffled order
        return [[[int(perm[i])] for i in step] for step in greedy_fill(shuffled, tokens_per_step)]
    n_parts = step_parts(lengths, tokens_per_step, max_length)
    capacity = tokens_per_step // n_parts
    parts = [perm[p].tolist() for p in lookahead_fill(shuffled, capacity, LOOKAHEAD, capacity // 2)]
    steps = [parts[s: s + n_parts] for s in range(0, len(parts), n_parts)]
    return [steps[i] for i in rng.permutation(len(steps))]


def _flatten(groups: Parts) -> List[int]:
    return list(itertools.chain.from_iterable(groups))


def _group_sums(groups: Parts, lengths: np.ndarray) -> np.ndarray:
    """Tokens of each (non-empty) group of example ids, in one vectorized pass."""
    if not groups:
        return np.zeros(0, dtype=np.int64)
    sizes = np.fromiter(map(len, groups), dtype=np.int64, count=len(groups))
    ids = np.fromiter(itertools.chain.from_iterable(groups), dtype=np.int64, count=int(sizes.sum()))
    return np.add.reduceat(lengths[ids], np.cumsum(sizes) - sizes)


def _micro_bins_packed(parts: Union[Parts, np.ndarray], lengths: np.ndarray, capacity: int, world_size: int) -> List[List[int]]:
    """Micro-batches (example ids) of at most `capacity` tokens: whole parts by BFD (a part larger
    than `capacity` split by BFD first), or single examples by BFD when that needs fewer
    micro-batches. When both need more rounds (micro-batches per rank) than the step's tokens do,
    a balanced partition of the examples into exactly that many rounds x world_size micro-batches
    is used instead if every one fits: all slots a step pays for, and ranks evenly loaded."""
    singles = isinstance(parts, np.ndarray)
    if singles or all(len(p) == 1 for p in parts):  # one example a part: the units are the examples
        ids = parts if singles else np.fromiter(itertools.chain.from_iterable(parts), np.int64, len(parts))
        flat = ids.tolist()
        units: Parts = []
        sizes = lengths[ids]
        bins = [[flat[j] for j in b] for b in best_fit_decreasing(sizes, capacity)]
    else:
        units = []
        for part, size in zip(parts, _group_sums(parts, lengths).tolist()):
            if size <= capacity:
                units.append(part)
            else:
                units += [[part[j] for j in b] for b in best_fit_decreasing(lengths[part], capacity)]
        flat = _flatten(units)
        bins = [_flatten([units[u] for u in b]) for b in best_fit_decreasing(_group_sums(units, lengths), capacity)]
        sizes = lengths[flat]
    cost = lambda bins: (-(-len(bins) // world_size), len(bins))  # noqa: E731
    fewest = -(-int(sizes.sum()) // capacity)  # micro-batches the tokens need
    if len(bins) > fewest and any(len(u) > 1 for u in units):
        by_examples = [[flat[j] for j in b] for b in best_fit_decreasing(sizes, capacity)]
        if cost(by_examples) < cost(bins):
            bins = by_examples
    rounds = -(-fewest // world_size)  # the fewest the tokens allow
    if cost(bins)[0] > rounds:
        balanced = balanced_partition(sizes, rounds * world_size, capacity)
        if all(int(sizes[b].sum()) <= capacity for b in balanced):
            return [[flat[j] for j in b] for b in balanced if b]
    return bins


def plan_step(parts: Union[Parts, np.ndarray], lengths: np.ndarray, n_trained: np.ndarray, *, epoch: int,
              step_in_epoch: int, micro_batch_tokens: int, world_size: int, padded: bool) -> StepPlan:
    """The step's split over ranks and micro-batches. `parts`: groups of example ids, or a 1-D
    array of ids, one example a part (streams, mixtures: no list per example)."""
    flat = parts.tolist() if isinstance(parts, np.ndarray) else _flatten(parts)
    if padded:
        bins = [[flat[j] for j in b] for b in padded_groups(lengths[flat], micro_batch_tokens)]
    else:
        bins = _micro_bins_packed(parts, lengths, micro_batch_tokens, world_size)
    bin_tokens = _group_sums(bins, lengths).tolist()
    per_rank = deal_to_ranks(bin_tokens, world_size)
    n_micro = max(len(r) for r in per_rank)
    ranks = tuple(tuple(tuple(bins[b]) for b in r) + ((),) * (n_micro - len(r)) for r in per_rank)
    if padded:
        slots = sum(len(b) * int(lengths[b].max()) for b in bins)
    else:
        slots = n_micro * world_size * micro_batch_tokens
    ids = np.asarray(flat, dtype=np.int64)
    return StepPlan(epoch, step_in_epoch, ranks, int(n_trained[ids].sum()), int(lengths[ids].sum()), slots, np.sort(ids))


class EpochPlan(Sequence[StepPlan]):
    """One epoch's steps: selected up front (`select_steps`), each split over ranks and
    micro-batches only when asked for (an epoch of a large corpus has tens of thousands)."""

    def __init__(self, steps: List[Parts], lengths: np.ndarray, n_trained: np.ndarray, *, epoch: int,
                 micro_batch_tokens: int, world_size: int, padded: bool) -> None:
        self.steps, self.lengths, self.n_trained = steps, lengths, n_trained
        self._args = dict(epoch=epoch, micro_batch_tokens=micro_batch_tokens, world_size=world_size, padded=padded)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        return plan_step(self.steps[k], self.lengths, self.n_trained, step_in_epoch=k, **self._args)


def plan_epoch(lengths: np.ndarray, n_trained: np.ndarray, *, seed: int, epoch: int, tokens_per_step: int,
               max_length: int, packing: str, micro_batch_tokens: int, world_size: int) -> EpochPlan:
    steps = select_steps(lengths, seed=seed, epoch=epoch, tokens_per_step=tokens_per_step,
                         max_length=max_length, packing=packing)
    return EpochPlan(steps, lengths, n_trained, epoch=epoch, micro_batch_tokens=micro_batch_tokens,
                     world_size=world_size, padded=packing == "none")


def packing_efficiency(plans: Sequence[StepPlan]) -> float:
    """Real tokens / slots over the plans (token-weighted)."""
    slots = sum(p.num_slots for p in plans)
    return sum(p.num_input_tokens for p in plans) / slots if slots else 0.0
