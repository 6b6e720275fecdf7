"""Read the weights out of a DeepSpeed ZeRO checkpoint offline: no ranks, no DeepSpeed engine,
never the whole model in memory.

What DeepSpeed writes under a checkpoint's `deepspeed/state/` (documented by its
`zero_to_fp32.py`, which reads them with an unrestricted `torch.load`, so we read them ourselves
through `serialization.safe_load`, memory-mapped: only the tensors asked for are paged in; the
file and key names are `compat.ZeroCheckpointNames`):

- ZeRO 0-2: `mp_rank_00_model_states.pt` holds the whole module state (the weights in the
  training dtype); the optimizer files hold only optimizer state.
- ZeRO-3: `zero_pp_rank_<r>_mp_rank_00_model_states.pt` per rank holds the parameter names and
  shapes in partition order (`param_shapes`, one dict per parameter group) and the tied pairs;
  `*zero_pp_rank_<r>_mp_rank_00_optim_states.pt` holds rank r's fp32 master partitions
  (`fp32_flat_groups`). Parameter i of `numel` elements occupies ceil(numel / world) elements of
  every rank's flat partition at the same offset; rank r's slice is elements
  [r * ceil, (r + 1) * ceil) of the (padded) flat parameter.

`ZeroWeights(state_dir)(name)` is one full tensor, assembled from the ranks' slices, in the
dtype the run trained in (bf16 weights are the bf16 rounding of the fp32 masters, which is what
DeepSpeed's bf16 mode copies into them after every step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from granite_train.compat import ZeroCheckpointNames as DS
from granite_train.errors import UserError
from granite_train.serialization import safe_load


def _load(path: Path) -> Dict:
    return safe_load(path, mmap=True)


class ZeroWeights:
    """The full weights of a ZeRO checkpoint directory, one tensor at a time (see the module doc)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        first = self.dir / DS.ZERO3_MODEL.format(rank=0)
        self.shared: Dict[str, str] = {}
        if first.is_file():
            self.stage = 3
            self._init_zero3(_load(first))
        elif (self.dir / DS.REPLICATED_MODEL).is_file():
            state = _load(self.dir / DS.REPLICATED_MODEL)
            self.stage, self.world = None, int(state.get(DS.DP_WORLD_SIZE, 1))  # 0-2: whichever, replicated
            self._module: Dict[str, torch.Tensor] = state[DS.MODULE]
            self.shared = dict(state.get(DS.SHARED_PARAMS) or {})
            self.shapes = {k: tuple(v.shape) for k, v in self._module.items()}
            self.dtype = next(iter(self._module.values())).dtype
        else:
            raise UserError(f"{self.dir} holds no DeepSpeed model states ({DS.REPLICATED_MODEL} or "
                            f"{DS.ZERO3_MODEL.format(rank=0)}); the checkpoint is incomplete")
        for alias, source in self.shared.items():
            if source in self.shapes:
                self.shapes[alias] = self.shapes[source]

    def _init_zero3(self, rank0: Dict) -> None:
        self.world = int(rank0[DS.DP_WORLD_SIZE])
        self.shared = dict(rank0.get(DS.SHARED_PARAMS) or {})
        self.dtype = next(iter(rank0[DS.MODULE].values())).dtype  # empty partitions, training dtype
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self._where: Dict[str, Tuple[int, int]] = {}  # name -> (offset, partitioned numel)
        offset = 0
        for group in rank0[DS.PARAM_SHAPES]:
            for name, shape in group.items():
                part = math.ceil(math.prod(shape) / self.world)
                self.shapes[name], self._where[name] = tuple(shape), (offset, part)
                offset += part
        self._flat: List[List[torch.Tensor]] = []
        for rank in range(self.world):
            found = sorted(self.dir.glob(DS.ZERO_OPTIM.format(rank=rank)))
            if len(found) != 1:
                raise UserError(f"{self.dir} has {len(found)} optimizer state files for rank {rank} of "
                                f"{self.world} (want 1); the checkpoint is incomplete")
            groups = _load(found[0])[DS.OPTIMIZER_STATE_DICT][DS.FP32_FLAT_GROUPS]
            self._flat.append(list(groups))
        have = sum(t.numel() for t in self._flat[0])
        if have != offset:
            raise UserError(f"{found[0]}: {have} fp32 elements per rank, the parameter list needs {offset}; "
                            f"the checkpoint is damaged")
        self._starts = [0]
        for t in self._flat[0]:
            self._starts.append(self._starts[-1] + t.numel())
        self._frozen = {name: tuple(shape) for name, shape in (rank0.get(DS.FROZEN_PARAM_SHAPES) or {}).items()}
        if self._frozen:  # frozen weights sit in each rank's model states, partitioned the same way
            others = [_load(self.dir / DS.ZERO3_MODEL.format(rank=r)) for r in range(1, self.world)]
            self._frozen_frags = [state[DS.FROZEN_PARAM_FRAGMENTS] for state in [rank0, *others]]
            self.shapes.update(self._frozen)

    def _slice(self, rank: int, start: int, length: int) -> List[torch.Tensor]:
        """Rank `rank`'s elements [start, start + length) of its flat partition (which is kept
        in several groups: a slice may cross a boundary)."""
        out, end = [], start + length
        for g, flat in enumerate(self._flat[rank]):
            lo, hi = self._starts[g], self._starts[g + 1]
            if hi > start and lo < end:
                out.append(flat[max(start, lo) - lo:min(end, hi) - lo])
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def __call__(self, name: str) -> torch.Tensor:
        name = name if name not in self.shared or self.shared[name] not in self.shapes else self.shared[name]
        shape = self.shapes[name]
        numel = math.prod(shape)
        if self.stage != 3:
            return self._module[name].clone()
        if name in self._frozen:
            parts = [frags[name].reshape(-1) for frags in self._frozen_frags]
        else:
            offset, part = self._where[name]
            parts = [s for rank in range(self.world) for s in self._slice(rank, offset, part)]
        full = torch.cat(parts)[:numel]
        return full.view(shape).to(self.dtype, copy=True)
