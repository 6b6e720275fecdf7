"""The process's place in the job: rank and world from the launcher, device, precision, and the
one place where the process group is created.

Process group: needed with more than one rank, and by DeepSpeed (`distributed.zero_stage`) even
with one. Under a launcher (torchrun, SLURM through torchrun: RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT are set) it always comes from the launcher's rendezvous (`env://`), also for a
single process: torchrun's agent serves the store its workers must connect to (with
TORCHELASTIC_USE_AGENT_STORE=True a worker only ever connects as a client), so a group made on
a port of our own would wait for a server that never comes. Only a bare `python -m` (no
launcher) makes its own single-process group, on an in-memory store.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from granite_train.config import DistributedConfig, TrainerConfig
from granite_train.errors import UserError

log = logging.getLogger("granite_train.parallel")

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    autocast_dtype: Optional[torch.dtype]  # None: plain fp32
    dtype_reason: str = ""  # trainer.dtype=auto: why it picked what it did (the start-up line)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls, device: torch.device = torch.device("cpu"), autocast_dtype: Optional[torch.dtype] = None) -> "Env":
        """One process, no process group (tools and benchmarks that run the trainer's step)."""
        return cls(0, 1, 0, device, autocast_dtype)


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """The device `trainer.device` names for this process (set as current on CUDA)."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# bf16 autocast against fp32 on CPUs with native bf16 (AVX512-BF16), recipe=sft_tiny at
# micro-batches of 512-4096 tokens on an idle 2-core EPYC (benchmarks/cpu_dtype.py,
# docs/benchmarks.md): 0.91-1.13x the speed at 1.20-1.74x the peak memory, and 0.86-1.13x at
# 1.43-1.94x on a real fine-tune (issue 29). Autocast keeps the fp32 weights and adds bf16 copies
# and casts, and CPU kernels gain little from bf16: no speed worth the memory, and fp32 is exact.
CPU_AUTO_REASON = ("trainer.dtype=auto picks fp32 on CPU: bf16 autocast measured 0.86-1.13x its speed at "
                   "1.2-1.9x its memory (benchmarks/cpu_dtype.py); trainer.dtype=bf16 forces it")


def _pick_dtype(choice: str, device: torch.device) -> Tuple[Optional[torch.dtype], str]:
    """The autocast dtype of `trainer.dtype` (None: fp32) and, for auto, why."""
    if choice == "fp32":
        return None, ""
    if choice == "bf16":
        return torch.bfloat16, ""
    if device.type == "cuda":  # bf16 tensor cores (Ampere+): the training dtype of every Granite
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "trainer.dtype=auto picks bf16 autocast: the GPU has bf16 tensor cores"
        return None, "trainer.dtype=auto picks fp32: this GPU has no native bf16"
    return None, CPU_AUTO_REASON


def launched() -> bool:
    """Whether a launcher (torchrun, or anything setting its variables) started this process."""
    return all(v in os.environ for v in LAUNCHER_VARS)


def init_process_group(backend: str, device: torch.device, world_size: int) -> None:
    """The job's process group (see the module doc); nothing when one exists already."""
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = device if device.type == "cuda" else None
    if launched():
        dist.init_process_group(backend=backend, init_method="env://", device_id=device_id)
        return
    if world_size != 1:
        raise UserError(f"WORLD_SIZE={world_size} but no launcher variables ({', '.join(LAUNCHER_VARS)}); "
                        f"start multi-process runs with torchrun --nproc_per_node=N")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # DeepSpeed reads them
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)


def init_env(trainer: TrainerConfig, distributed: DistributedConfig) -> Env:
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(trainer.device, local_rank)
    if world_size > 1 or distributed.zero_stage is not None:
        init_process_group(distributed.backend, device, world_size)
    return Env(rank, world_size, local_rank, device, *_pick_dtype(trainer.dtype, device))


def agree(env: Env, value: Any) -> Any:
    """Rank 0's value on every rank (decisions about files must not differ between ranks)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_ints(env: Env) -> Callable[[List[int]], List[List[int]]]:
    """An all-gather of a short list of ints whose first is the sender's data rank: every data
    rank's list, in data-rank order (the ranks of a context-parallel group share a data rank
    and send the same list). A stream shared by rank exchanges its step counts with it."""
    def gather(values: List[int]) -> List[List[int]]:
        mine = torch.tensor(values, dtype=torch.int64, device=env.device)
        every = [torch.empty_like(mine) for _ in range(env.world_size)]
        dist.all_gather(every, mine)
        by_rank: Dict[int, List[int]] = {}
        for t in every:
            v = t.tolist()
            by_rank.setdefault(v[0], v)
        return [by_rank[r] for r in sorted(by_rank)]
    return gather


def barrier(env: Env) -> None:
    if env.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(env: Env) -> Iterator[None]:
    """Rank 0 runs the block first, the others after it finished: data preparation then
    tokenizes once and the other ranks load the `datasets` cache it wrote (file-backed data;
    in-memory demo data is small and tokenized on every rank). If rank 0 fails inside, the others
    wait until torchrun stops them (it does when a rank exits)."""
    if env.distributed and not env.is_main:
        dist.barrier()
    yield
    if env.distributed and env.is_main:
        dist.barrier()
