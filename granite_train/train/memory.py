"""Memory a run uses: host RSS (peak per step) and, on CUDA, the device's allocated peak.

The host peak per step is Linux's VmHWM, reset before each step through /proc/self/clear_refs
("5": reset the peak RSS to the current RSS). Where that is not possible the peak is the process
maximum since start (`resource.getrusage`), said once in the log. Numbers are GiB (2**30 bytes).
"""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from granite_train.parallel.env import Env

log = logging.getLogger("granite_train.train")
GIB = float(2 ** 30)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def host_rss_gib() -> float:
    """This process's resident memory now."""
    kib = _status_kib("VmRSS")
    if kib is None:  # not Linux: the peak is the best there is
        return host_peak_gib()
    return kib * 1024 / GIB


def host_peak_gib() -> float:
    """Peak resident memory since the last `reset_host_peak` (or since start)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return maxrss / GIB if sys.platform == "darwin" else maxrss * 1024 / GIB
    return kib * 1024 / GIB


def reset_host_peak() -> bool:
    """Start a new peak at the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _max_over_ranks(values: List[float], env: Env) -> List[float]:
    if not env.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class MemoryMeter:
    """Per optimizer step: rank 0's peaks and the maximum over ranks (every rank calls both
    methods; `record` all-reduces)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.cuda = env.device.type == "cuda"
        self._resettable = reset_host_peak()
        if not self._resettable and env.is_main:
            log.info("host_rss_peak_gib is the peak since start (this system cannot reset it per step)")

    def start_step(self) -> None:
        if self._resettable:
            reset_host_peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.env.device)

    def record(self) -> Dict[str, float]:
        host = host_peak_gib()
        device = torch.cuda.max_memory_allocated(self.env.device) / GIB if self.cuda else 0.0
        host_max, device_max = _max_over_ranks([host, device], self.env)
        out = {"host_rss_peak_gib": round(host, 3), "host_rss_peak_gib_max_rank": round(host_max, 3)}
        if self.cuda:
            out.update(device_peak_gib=round(device, 3), device_peak_gib_max_rank=round(device_max, 3))
        return out


def log_weights_loaded(env: Env) -> None:
    """One line per rank (all logged by rank 0): host RSS once the weights are in place."""
    rss = torch.tensor([host_rss_gib()], dtype=torch.float64, device=env.device)
    every = [rss]
    if env.distributed:
        every = [torch.zeros_like(rss) for _ in range(env.world_size)]
        dist.all_gather(every, rss)
    if env.is_main:
        for rank, value in enumerate(every):
            log.info("weights loaded: rank %d host RSS %.2f GiB", rank, float(value))
