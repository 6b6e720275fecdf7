"""A checkpoint's experts as slices: `experts/` beside `model/`, safetensors files.

Under expert parallelism each rank holds a contiguous slice of every MoE layer's experts. A
checkpoint then stores each slice as its holder has it, one file per MoE layer
(`experts/experts-<first>-<last>-of-<E>.layer-<L>.safetensors`, L counting the MoE layers: that
layer's expert stacks under their HF names, sliced along the expert dimension; a write holds one
layer's slice, never more),
and `model/` the other weights: a save gathers nothing. A reader assembles any range of experts
from the slices that cover it: a rank's own slice on resume, every expert of one layer for an
export, never more than that.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from granite_train.errors import UserError

EXPERTS_DIR = "experts"
_NAME = re.compile(r"experts-(\d+)-(\d+)-of-(\d+)\.layer-(\d+)\.safetensors")


def slice_file(directory: Path, held: range, num_experts: int, layer: int) -> Path:
    return directory / f"experts-{held.start:05d}-{held.stop - 1:05d}-of-{num_experts:05d}.layer-{layer:05d}.safetensors"


def save_slice(tensors: Dict[str, torch.Tensor], directory: Path, held: range, num_experts: int,
               layer: int) -> Path:
    """Write one layer's slice: `tensors` are its expert stacks holding experts `held` of
    `num_experts`."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, t in tensors.items():
        if t.shape[0] != len(held):
            raise ValueError(f"{key} holds {t.shape[0]} experts, the slice {held.start}-{held.stop - 1} is {len(held)}")
    path = slice_file(directory, held, num_experts, layer)
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(path),
              metadata={"format": "pt", "first_expert": str(held.start), "num_experts": str(num_experts)})
    return path


class ExpertSlices:
    """The slices in an `experts/` directory, opened (memory-mapped) for reading."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._where: Dict[str, List[Tuple[range, object]]] = {}  # key -> (experts held, file), by first expert
        ranges: Dict[range, set] = {}  # slice -> the keys its files hold
        totals = set()
        for path in sorted(directory.glob("experts-*.safetensors")):
            m = _NAME.fullmatch(path.name)
            if m is None:
                continue
            first, last, total, _ = (int(g) for g in m.groups())
            try:
                f = safe_open(str(path), framework="pt")
            except SafetensorError as e:
                raise UserError(f"{path} is not a readable safetensors file ({e}); re-copy the checkpoint") from None
            held = range(first, last + 1)
            for key in f.keys():
                self._where.setdefault(key, []).append((held, f))
            ranges.setdefault(held, set()).update(f.keys())
            totals.add(total)
        covered = sorted(ranges, key=lambda r: r.start)
        self.num_experts = totals.pop() if len(totals) == 1 else None
        if self.num_experts is None or [r.start for r in covered] != [0, *[r.stop for r in covered[:-1]]] \
                or covered[-1].stop != self.num_experts:
            found = ", ".join(f"{r.start}-{r.stop - 1}" for r in covered) or "none"
            raise UserError(f"{directory} does not hold every expert once (slices {found}); the checkpoint is "
                            f"incomplete: copy it whole")
        if any(keys != ranges[covered[0]] for keys in ranges.values()):
            raise UserError(f"{directory}: the slices hold different tensors (a layer's file is missing?); the "
                            f"checkpoint is incomplete: copy it whole")
        for parts in self._where.values():
            parts.sort(key=lambda held_file: held_file[0].start)
        self.keys = sorted(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def shape(self, key: str) -> Tuple[int, ...]:
        """The whole stack's shape (every expert)."""
        inner = self._where[key][0][1].get_slice(key).get_shape()[1:]
        return (self.num_experts, *inner)

    def read(self, key: str, experts: Optional[range] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Experts `experts` (None: all) of the stack `key`, read from the slices covering them."""
        want = experts if experts is not None else range(self.num_experts)
        parts = []
        for held, f in self._where[key]:
            lo, hi = max(want.start, held.start), min(want.stop, held.stop)
            if lo < hi:
                t = f.get_slice(key)[lo - held.start:hi - held.start]
                parts.append(t.to(dtype or t.dtype, copy=True))
        return parts[0] if len(parts) == 1 else torch.cat(parts)
