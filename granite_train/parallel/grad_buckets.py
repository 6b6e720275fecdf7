"""Gradients reduced in buckets during the backward (what torch's DDP does, for `PlainEngine`).

Each gradient is a view of a flat bucket buffer (no copy before or after the collective). The
buckets follow the parameters in reverse order, roughly the order the backward finishes them.
During the last backward of a step (`arm`), a post-accumulate-grad hook counts each bucket's
parameters; a complete bucket is SUM all-reduced asynchronously while the backward goes on,
always in bucket order (every rank must issue the same collectives in the same order, so a
bucket waits for the ones before it). After the last backward `launch_rest` issues what is left
(parameters this rank's last backward did not reach, or a rank that had nothing to train), so
every rank issues the buckets before the step's other collectives; `finish` waits for all.

The sums are the flat reduction's, element for element: the math of a step does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class _Bucket:
    buffer: torch.Tensor
    params: List[nn.Parameter]
    arrived: int = 0  # parameters whose gradient is complete in the armed backward


class GradBuckets:
    """The gradients of `params` as views of buckets of at most `bucket_bytes` (<= 0: one bucket
    per dtype and device, reduced after the backward: no overlap, no hooks)."""

    def __init__(self, params: Sequence[nn.Parameter], bucket_bytes: int,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.buckets: List[_Bucket] = []
        self._bucket_of: Dict[int, int] = {}  # id(param) -> bucket index
        for chunk in _chunks(list(reversed(list(params))), bucket_bytes):
            buffer = torch.zeros(sum(p.numel() for p in chunk), dtype=chunk[0].dtype, device=chunk[0].device)
            offset = 0
            for p in chunk:
                p.grad = buffer[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                self._bucket_of[id(p)] = len(self.buckets)
                if bucket_bytes > 0:  # 0: nothing launched before `launch_rest`
                    p.register_post_accumulate_grad_hook(self._arrived)
            self.buckets.append(_Bucket(buffer, chunk))
        self._armed = self.released = False
        self._arrived_ids: set = set()
        self._next = 0  # the next bucket to launch
        self._works: List[dist.Work] = []
        self._by_hooks = 0
        self.overlapped = 0  # buckets of the last finished step that the backward launched

    @property
    def max_bucket_bytes(self) -> int:
        return max((b.buffer.numel() * b.buffer.element_size() for b in self.buckets), default=0)

    def arm(self) -> None:
        """The next backward is this rank's last of the step: reduce as buckets complete."""
        if self.released:
            raise RuntimeError("the gradient buckets were released (release_optimizer_state): no step may follow")
        self._armed = True

    def _arrived(self, p: nn.Parameter) -> None:
        if not self._armed:
            return
        if id(p) in self._arrived_ids:  # its bucket may already be on the wire without this part
            raise RuntimeError("a parameter's gradient was accumulated twice in one backward; bucketed "
                               "data parallel cannot reduce it (set distributed.bucket_mb=0)")
        self._arrived_ids.add(id(p))
        bucket = self.buckets[self._bucket_of[id(p)]]
        bucket.arrived += 1
        while self._next < len(self.buckets) and self._complete(self._next):
            self._launch()
            self._by_hooks += 1

    def _complete(self, i: int) -> bool:
        return self.buckets[i].arrived == len(self.buckets[i].params)

    def _launch(self) -> None:
        work = dist.all_reduce(self.buckets[self._next].buffer, group=self.group, async_op=True)
        self._works.append(work)
        self._next += 1

    def launch_rest(self) -> None:
        """Launch the buckets the backward did not, in order, without waiting (after this rank's
        last backward and before any other collective of the step: every rank then issues the
        buckets first, in the same order)."""
        if self.released:
            raise RuntimeError("the gradient buckets were released (release_optimizer_state): no step may follow")
        self._armed = False  # a later backward of this step would change what is on the wire
        while self._next < len(self.buckets):
            self._launch()

    def finish(self) -> None:
        """Launch the buckets left (`launch_rest`) and wait for every reduction of the step."""
        self.launch_rest()
        for work in self._works:
            work.wait()
        self._works.clear()
        self.overlapped, self._by_hooks = self._by_hooks, 0
        self._next = 0
        self._arrived_ids.clear()
        for bucket in self.buckets:
            bucket.arrived = 0

    def zero(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def release(self) -> None:
        """Free the buffers (after the last step: the final export has that memory)."""
        for bucket in self.buckets:
            for p in bucket.params:
                p.grad = None
        self.buckets.clear()
        self.released = True


def _chunks(params: List[nn.Parameter], bucket_bytes: int) -> List[List[nn.Parameter]]:
    """Consecutive runs of `params` of one dtype and device, each <= bucket_bytes (a parameter
    larger than that is a bucket of its own); bucket_bytes <= 0: one run per dtype and device."""
    chunks: List[List[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = chunks[-1] if chunks else None
        fits = last is not None and (bucket_bytes <= 0 or size + nbytes <= bucket_bytes)
        if fits and last[0].dtype == p.dtype and last[0].device == p.device:
            last.append(p)
            size += nbytes
        else:
            chunks.append([p])
            size = nbytes
    return chunks
