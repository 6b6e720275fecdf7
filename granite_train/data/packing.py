"""Bin packing primitives on example lengths. Pure functions of their inputs: no randomness here.

Bins are lists of positions into the `sizes` given. Ties keep input order, so a seeded shuffle
before packing is what randomizes, and the same input always packs the same way.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence

import numpy as np

Bins = List[List[int]]
_SHIFT = 32  # a bin is keyed (remaining << 32 | bin id): one sorted list of ints serves best-fit


def best_fit(sizes: Sequence[int] | np.ndarray, capacity: int, decreasing: bool = True) -> Bins:
    """Best fit: each item into the fullest bin it fits, else a new bin; largest item first when
    `decreasing` (BFD), else in the given order. O(n log n) comparisons (bisect over open bins);
    full bins leave the search list."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > capacity:
        raise ValueError(f"an item of {int(sizes.max())} exceeds the bin capacity {capacity}")
    bins: Bins = []
    open_bins: List[int] = []
    order = np.argsort(-sizes, kind="stable") if decreasing else np.arange(len(sizes))
    for i in order.tolist():
        size = int(sizes[i])
        j = bisect.bisect_left(open_bins, size << _SHIFT)
        if j == len(open_bins):
            b, remaining = len(bins), capacity - size
            bins.append([i])
        else:
            key = open_bins.pop(j)
            b, remaining = key & ((1 << _SHIFT) - 1), (key >> _SHIFT) - size
            bins[b].append(i)
        if remaining > 0:
            bisect.insort(open_bins, (remaining << _SHIFT) | b)
    return bins


def best_fit_decreasing(sizes: Sequence[int] | np.ndarray, capacity: int) -> Bins:
    return best_fit(sizes, capacity, decreasing=True)


def greedy_fill(sizes: Sequence[int] | np.ndarray, capacity: int) -> Bins:
    """Order-preserving: fill a bin until the next item would overflow it."""
    bins: Bins = []
    used = capacity + 1  # forces a first bin
    for i, size in enumerate(np.asarray(sizes, dtype=np.int64).tolist()):
        if used + size > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += size
    return bins


def padded_groups(sizes: Sequence[int] | np.ndarray, capacity: int) -> Bins:
    """Padded batches of at most `capacity` slots (rows x longest). Sorting by length first keeps
    rows of similar length together, so little is padding."""
    sizes = np.asarray(sizes, dtype=np.int64)
    bins: Bins = []
    longest = 0
    for i in np.argsort(-sizes, kind="stable").tolist():
        if not bins or (len(bins[-1]) + 1) * longest > capacity:
            bins.append([])
            longest = int(sizes[i])
        bins[-1].append(i)
    return bins


def deal_to_ranks(bin_tokens: Sequence[int], world_size: int) -> List[List[int]]:
    """Bins (by index) per rank, the same count on every rank up to one: the heaviest remaining
    bins go to the lightest ranks, one round of `world_size` bins at a time."""
    order = np.argsort(-np.asarray(bin_tokens, dtype=np.int64), kind="stable").tolist()
    ranks: List[List[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for start in range(0, len(order), world_size):
        lightest = sorted(range(world_size), key=lambda r: (load[r], r))
        for rank, b in zip(lightest, order[start: start + world_size]):
            ranks[rank].append(b)
            load[rank] += int(bin_tokens[b])
    return ranks
