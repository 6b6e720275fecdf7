"""Preemption: a signal asks the run to stop at the next step boundary with a checkpoint.

SLURM (preemption, `scancel --signal`, `--signal=B:USR1@120`) and Kubernetes (pod deletion) send
SIGTERM, or a configured signal, some time before they kill. On one of `trainer.preemption_signals`
(default SIGTERM; e.g. [SIGTERM,SIGUSR1]) the run finishes the optimizer step it is in, writes
a checkpoint and exits with `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: "try again"), so a requeued
or restarted job running the same command resumes exactly there (`trainer.resume=auto`).

Ranks agree: after every step they all-reduce whether any rank was signalled (a signal may reach
one rank first, or only one), so all stop after the same step. A second signal more than a
second after the first exits at once (status 128 + signal), without a checkpoint; repeats within
a second count as one (torchrun forwards the signal it gets to workers that may have got it
already).

torchrun forwards SIGTERM to its workers and waits `--shutdown-timeout` seconds (default 30;
also TORCH_ELASTIC_SHUTDOWN_TIMEOUT) before killing them: raise it above a checkpoint's save
time. torchrun handles SIGTERM, SIGINT, SIGHUP and SIGQUIT itself; for SIGUSR1 add it with
`--signals-to-handle`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from granite_train.errors import PREEMPTED_EXIT_CODE
from granite_train.parallel.env import Env

log = logging.getLogger("granite_train.train")

_REPEAT_WINDOW_S = 1.0


class PreemptionWatch:
    """Installs the handlers (main thread only) for the life of a run; `close` restores the old ones."""

    def __init__(self, signal_names: Sequence[str]) -> None:
        self.received: Optional[str] = None
        self._first_at = 0.0
        self._previous: Dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            if signal_names:
                log.warning("not in the main thread: preemption signals %s are not watched", list(signal_names))
            return
        for name in signal_names:
            sig = signal.Signals[name]
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = name, now
            # (logging from a signal handler can deadlock on the handler's lock: write directly)
            sys.stderr.write(f"granite-train: {name} received: finishing this step, then a checkpoint and exit "
                             f"{PREEMPTED_EXIT_CODE} (send it again to exit at once)\n")
        elif now - self._first_at > _REPEAT_WINDOW_S:
            sys.stderr.write(f"granite-train: second {name}: exiting now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + signum)

    def requested(self, env: Env) -> Optional[str]:
        """The signal's name if any rank got one (every rank calls it after every step)."""
        if not env.distributed:
            return self.received
        flag = torch.tensor([0 if self.received is None else int(signal.Signals[self.received])],
                            dtype=torch.int64, device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return None if int(flag) == 0 else signal.Signals(int(flag)).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

