"""Per-forward batch layout shared by every mixer: where the packed examples start and end.

Built once per forward by the model (one host sync for `cu_seq_lens`), then handed to each
layer, so no layer re-derives boundaries or syncs with the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Protocol, Tuple

import torch


def segment_positions(bounds: List[int], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(seq_idx [1, T] int64, position inside the example [1, T] int64) from host boundaries."""
    lens = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:])], device=device)
    starts = torch.tensor(bounds[:-1], device=device)
    seq_idx_T = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
    T = bounds[-1]
    pos_T = torch.arange(T, device=device) - torch.repeat_interleave(starts, lens)
    return seq_idx_T.unsqueeze(0), pos_T.unsqueeze(0)


class SequenceShard(Protocol):
    """This rank's contiguous slice of a packed row that several ranks share (context
    parallelism). The model sees only this seam; the ranks and collectives behind it live in
    `granite_train.parallel.context_parallel`.

    The row is `size * slice_len` tokens; this rank holds [offset, offset + slice_len). `bounds`
    are the whole row's example boundaries (host ints, from 0 to the row's end, trailing filler
    its own last segment); `real_tokens` is where that filler starts.
    """

    rank: int
    size: int
    slice_len: int
    bounds: List[int]
    real_tokens: int

    @property
    def offset(self) -> int: ...

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `x` concatenated along `dim` in rank order; backward sums each slice's
        gradient over the ranks (each rank's loss uses the whole)."""
        ...

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks, for a value every rank then uses alike; backward passes
        the gradient through unchanged (each rank back-propagates only its own share)."""
        ...


@dataclass
class SeqLayout:
    """How the tokens of a [B, T] batch group into examples.

    Packed (padding-free): B == 1 and `cu_seq_lens` holds example boundaries, cumulative, int32,
    starting at 0 and ending at T. Padded: `cu_seq_lens` is None and each row is one example,
    right-padded (causal attention needs no mask for the real tokens).
    """

    attn_backend: str  # resolved kernel: "sdpa" | "flash"
    mamba_backend: str = "torch"  # resolved Mamba-2 kernels: "torch" | "cuda" | "triton"
    cos_BTD: Optional[torch.Tensor] = None  # RoPE tables (fp32); None for NoPE models
    sin_BTD: Optional[torch.Tensor] = None
    cu_seq_lens: Optional[torch.Tensor] = None  # [n+1] int32 on the model's device
    bounds: Optional[List[int]] = None  # the same boundaries on the host
    max_seq_len: Optional[int] = None
    seq_idx: Optional[torch.Tensor] = None  # [1, T] example index per token (Mamba kernels)
    # Packed rows with trailing filler: tokens [0, real_tokens) are examples (router statistics
    # skip the rest). None: every token counts (padded [B, L] batches have no mask, so their
    # padding is counted too: a known limitation of the MoE aux loss on padded batches).
    real_tokens: Optional[int] = None
    # Context parallelism: this forward's tokens are one slice of a longer row (bounds,
    # cu_seq_lens and real_tokens above are then the slice's own, in local indices).
    context: Optional[SequenceShard] = None

    # (example index, position inside the example), each [1, T] int64, built on first use by a
    # Mamba layer from `bounds` (trailing filler included) and shared by all layers.
    _segments: Optional[Tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    @property
    def packed(self) -> bool:
        return self.cu_seq_lens is not None

    def segments(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-token (example index, position inside the example) for a packed row."""
        assert self.bounds is not None
        if self._segments is None or self._segments[0].device != device:
            self._segments = segment_positions(self.bounds, device)
        return self._segments
