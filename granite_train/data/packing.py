"""Bin packing primitives on example lengths. Pure functions of their inputs: no randomness here.

Bins are lists of positions into the `sizes` given. Ties keep input order, so a seeded shuffle
before packing is what randomizes, and the same input always packs the same way.
"""

from __future__ import annotations

import bisect
import heapq
from typing import List, Sequence

import numpy as np

Bins = List[List[int]]
_SHIFT = 32  # a bin is keyed (remaining << 32 | bin id): one sorted list of ints serves best-fit


def best_fit(sizes: Sequence[int] | np.ndarray, capacity: int, decreasing: bool = True) -> Bins:
    """Best fit: each item into the fullest bin it fits, else a new bin; largest item first when
    `decreasing` (BFD), else in the given order. O(n log n) comparisons (bisect over open bins);
    full bins leave the search list.

    Consecutive items of one size go in bulk: the fullest bin that fits the first stays the
    fullest that fits the next (its room only shrank, and every other bin that fits had more),
    so it takes as many of the run as fit, and only then is the next bin searched. Exactly the
    item-by-item result, in one search per bin a run touches instead of one per item (sorted
    lengths repeat a lot: ~20K examples of a 4M-token step have a few thousand sizes)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > capacity:
        raise ValueError(f"an item of {int(sizes.max())} exceeds the bin capacity {capacity}")
    bins: Bins = []
    open_bins: List[int] = []
    if not len(sizes):
        return bins
    order = np.argsort(-sizes, kind="stable") if decreasing else np.arange(len(sizes))
    ordered = sizes[order]
    cuts = np.flatnonzero(np.diff(ordered)) + 1  # where a run of equal sizes ends
    firsts, ends = np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(order)])).tolist()
    items, mask = order.tolist(), (1 << _SHIFT) - 1
    find, insert = bisect.bisect_left, bisect.insort
    for a, end in zip(firsts, ends):
        size = int(ordered[a])
        while a < end:
            j = find(open_bins, size << _SHIFT)
            if j == len(open_bins):
                b, remaining = len(bins), capacity
                bins.append([])
            else:
                key = open_bins.pop(j)
                b, remaining = key & mask, key >> _SHIFT
            take = end - a if size == 0 else min(end - a, remaining // size)
            bins[b].extend(items[a: a + take])
            a += take
            remaining -= take * size
            if remaining > 0:
                insert(open_bins, (remaining << _SHIFT) | b)
    return bins


def lookahead_fill(sizes: Sequence[int] | np.ndarray, capacity: int, lookahead: int, finish: int) -> Bins:
    """Bins of at most `capacity`, filled in the given order and finished by best fit from a
    window: each bin opens with the oldest unplaced item and keeps taking the next unplaced items
    in order while at least `finish` stays free; then it takes, from the next `lookahead`
    unplaced items, the largest that still fits (the oldest of that size), again and again until
    none fits. With items of many sizes in the window the last one nearly closes the gap, so bins
    come out nearly full, and they hold whatever sizes the order brings (no sorting by size).
    Every item lands in exactly one bin; the oldest unplaced item always opens the next bin, so
    none waits. O(n log lookahead) comparisons plus list moves of at most `lookahead` entries."""
    sz = np.asarray(sizes, dtype=np.int64).tolist()
    if sz and max(sz) > capacity:
        raise ValueError(f"an item of {max(sz)} exceeds the bin capacity {capacity}")
    n, mask, lookahead = len(sz), (1 << _SHIFT) - 1, max(1, lookahead)
    placed = bytearray(n)
    window: List[int] = []  # the next `lookahead` unplaced items, keyed (size << 32 | position)
    head = tail = 0  # the oldest unplaced item; the first item not yet in the window
    bins: Bins = []
    while True:
        while tail < n and len(window) < lookahead:
            bisect.insort(window, (sz[tail] << _SHIFT) | tail)
            tail += 1
        while head < n and placed[head]:
            head += 1
        if head == n:
            return bins
        b: List[int] = []
        free = capacity
        while head < n and (not b or sz[head] <= free - finish):  # in order
            window.pop(bisect.bisect_left(window, (sz[head] << _SHIFT) | head))
            placed[head] = 1
            b.append(head)
            free -= sz[head]
            head += 1
            if tail < n:
                bisect.insort(window, (sz[tail] << _SHIFT) | tail)
                tail += 1
            while head < n and placed[head]:
                head += 1
        while window:  # best fit
            j = bisect.bisect_right(window, (free << _SHIFT) | mask) - 1
            if j < 0:
                break
            size = window[j] >> _SHIFT
            i = window.pop(bisect.bisect_left(window, size << _SHIFT)) & mask
            placed[i] = 1
            b.append(i)
            free -= size
            if tail < n:
                bisect.insort(window, (sz[tail] << _SHIFT) | tail)
                tail += 1
        bins.append(b)


def best_fit_decreasing(sizes: Sequence[int] | np.ndarray, capacity: int) -> Bins:
    return best_fit(sizes, capacity, decreasing=True)


def balanced_partition(sizes: Sequence[int] | np.ndarray, k: int, capacity: int | None = None) -> Bins:
    """Exactly `k` bins (some empty only when there are fewer items than bins) with totals as
    even as cheaply found: LPT (largest item first, into the lightest bin), then improving moves
    and swaps between the heaviest bin and the others, until every bin fits `capacity` (when
    given) or no move, or swap of one item each way, makes the heaviest bin lighter.

    Why: best-fit decreasing opens as few bins as it greedily can, but when the items nearly fill
    k bins it often leaves the last few with no room and opens a (k+1)-th bin: for a step's
    micro-batches that is a whole extra micro-batch round on every rank. Spreading the slack
    evenly over exactly k bins often fits where BFD does not; the caller checks the heaviest bin
    against its capacity and keeps the BFD bins otherwise. Deterministic (ties go by item and bin
    index); each improving step costs O(n log n), and there are at most 2n + k of them."""
    sz = np.asarray(sizes, dtype=np.int64).tolist()
    if k < 1:
        raise ValueError(f"need at least one bin, got k={k}")
    bins: Bins = [[] for _ in range(k)]
    sums = [0] * k
    heap = [(0, b) for b in range(k)]  # (total, bin id): the lightest bin on top
    for i in sorted(range(len(sz)), key=lambda i: (-sz[i], i)):
        total, b = heapq.heappop(heap)
        bins[b].append(i)
        sums[b] = total + sz[i]
        heapq.heappush(heap, (sums[b], b))
    order = sorted((sums[b], -b) for b in range(k))  # lightest first; the heaviest (lowest id) last
    for _ in range(2 * len(sz) + k):
        h = -order[-1][1]
        if capacity is not None and sums[h] <= capacity:
            break
        # Moving d tokens (one item, or an item swapped for a smaller one) from h to g leaves the
        # pair at (sums[h] - d, sums[g] + d): both under sums[h] when 0 < d < gap, the heaviest
        # lightened by min(d, gap - d) <= gap // 2. Take the largest gain, trying the lightest
        # bins first and stopping at the first whose gap cannot beat the best found.
        best = (0, 0, 0, -1)  # (gain, g, position in h, position in g or -1 for a move)
        for total, neg_g in order:
            gap = sums[h] - total
            if gap // 2 <= best[0]:
                break
            g = -neg_g
            in_g = sorted((sz[j], q) for q, j in enumerate(bins[g]))
            g_sizes = [s for s, _ in in_g]
            for p, i in enumerate(bins[h]):
                a = sz[i]
                if 0 < a < gap and min(a, gap - a) > best[0]:
                    best = (min(a, gap - a), g, p, -1)
                # the item of g whose swap moves d = a - b closest to gap / 2
                at = bisect.bisect_left(g_sizes, a - gap // 2)
                for q in (at - 1, at):
                    if 0 <= q < len(g_sizes):
                        d = a - g_sizes[q]
                        if 0 < d < gap and min(d, gap - d) > best[0]:
                            best = (min(d, gap - d), g, p, in_g[q][1])
        gain, g, p, q = best
        if gain == 0:
            break
        order.remove((sums[h], -h))
        order.remove((sums[g], -g))
        i = bins[h].pop(p)
        moved = sz[i]
        if q >= 0:
            j = bins[g].pop(q)
            bins[h].append(j)
            moved -= sz[j]
        bins[g].append(i)
        sums[h] -= moved
        sums[g] += moved
        bisect.insort(order, (sums[h], -h))
        bisect.insort(order, (sums[g], -g))
    return bins


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
