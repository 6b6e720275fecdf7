"""Run a test's cases on N CPU ranks (gloo, spawned processes) and collect their failures."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Cases = Callable[[int, int, List[str]], None]  # (rank, world size, failures to append to)


def _worker(rank: int, size: int, port: int, result_dir: str, cases: Cases) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A share of the cores each, as torchrun's OMP_NUM_THREADS=1 gives its ranks: N ranks with
    # every core each spin against one another (4 ranks on 2 cores ran 2-3x slower).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    failures: List[str] = []
    try:
        cases(rank, size, failures)
    except Exception as exc:  # reported by the parent
        failures.append(f"rank {rank}/{size}: {type(exc).__name__}: {exc} {traceback.format_exc()}")
    Path(result_dir, f"rank{rank}.txt").write_text("\n".join(failures))
    # Out without destructors: tearing gloo down at exit sometimes aborts the process ("terminate
    # called without an active exception", seen once in CI after every case had passed; the
    # abandoned pytorch/pytorch#179291 describes Gloo threads outliving the interpreter). The
    # results are written; a rank still waiting on this one gets a closed connection, not a hang.
    os._exit(0)


def run_on_ranks(tmp_path: Path, size: int, cases: Cases) -> List[str]:
    """Every rank's failures (empty: all passed). `cases` must be a module-level function."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The spawned children unpickle `_worker` and `cases` by module name (tests....): they import
    # them with the parent's sys.path, which must hold the repository root (plain `pytest` with
    # --import-mode=importlib does not put it there).
    root = str(Path(__file__).resolve().parents[1])
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        mp.spawn(_worker, args=(size, port, str(tmp_path), cases), nprocs=size, join=True)
    finally:
        if added:
            sys.path.remove(root)
    return [line for r in range(size) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()]
