"""Where a context-parallel slice sits in its row: host-side geometry the layers share.

Pure functions of a `SequenceShard`'s plain fields (no collectives): the slice's own example
boundaries, global positions inside examples (RoPE), the conv window with its halo, and which
slices pass the Mamba state on to the next one.
"""

from __future__ import annotations

from typing import List

import torch

from granite_train.models.batch import SequenceShard


def window_bounds(bounds: List[int], lo: int, hi: int) -> List[int]:
    """Example boundaries of global tokens [lo, hi), relative to lo; tokens before the row (lo
    < 0, the first slice's halo) are a segment of their own."""
    inner = {b - lo for b in bounds if lo < b < hi}
    if lo < 0:
        inner.add(-lo)
    return [0, *sorted(inner), hi - lo]


def local_bounds(shard: SequenceShard) -> List[int]:
    """This slice's example boundaries, local indices; its first segment may continue an example
    of an earlier slice (see `continues`)."""
    return window_bounds(shard.bounds, shard.offset, shard.offset + shard.slice_len)


def starts_fresh(shard: SequenceShard, j: int) -> bool:
    """Slice j begins with an example's first token (nothing carries into it)."""
    return j * shard.slice_len in shard.bounds


def continues(shard: SequenceShard) -> bool:
    """This slice's first tokens belong to an example that began in an earlier slice."""
    return not starts_fresh(shard, shard.rank)


def carries_through(shard: SequenceShard, j: int) -> bool:
    """Slice j is inside one example that began before it: its end state is its own contribution
    plus the entering state, decayed over the whole slice."""
    lo, hi = j * shard.slice_len, (j + 1) * shard.slice_len
    return not starts_fresh(shard, j) and not any(lo < b < hi for b in shard.bounds)


def example_start(shard: SequenceShard, t: int) -> int:
    """Global index of the first token of the example holding global token t."""
    return max(b for b in shard.bounds[:-1] if b <= t)


def global_positions(shard: SequenceShard, device: torch.device) -> torch.Tensor:
    """[1, slice_len] position of each token inside its example, counted over the whole row."""
    lo = shard.offset
    wb = local_bounds(shard)
    starts = [example_start(shard, lo)] + [lo + b for b in wb[1:-1]]  # global start of each segment's example
    lens = torch.tensor([e - s for s, e in zip(wb[:-1], wb[1:])], device=device)
    start_T = torch.repeat_interleave(torch.tensor(starts, device=device), lens)
    return (torch.arange(lo, lo + shard.slice_len, device=device) - start_T).unsqueeze(0)
