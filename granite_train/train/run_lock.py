"""One live run per output directory.

Two runs writing one `trainer.output_dir` race on its checkpoints and metrics (a relaunch
while the first run was still alive died with FileNotFoundError deep in a save). A run holds
`<output_dir>/.lock` for its whole life: an exclusive `flock` (released by the kernel when the
process ends, however it ends) on a file that says who holds it. A second run is refused in one
line naming the holder; a lock file left by a run whose process is gone is free to take, and
the new run says whose it was. (A flock is shared with forked children: if the run is killed
while `data.num_proc > 1` workers still tokenize, the directory stays held until they exit.)
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional

from granite_train.errors import UserError

log = logging.getLogger("granite_train.train")

LOCK_FILE = ".lock"


def _holder_text(info: Dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
            + (f", started {info['started']}" if info.get("started") else ""))


def _read(fd: int) -> Dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


class RunLock:
    """`with RunLock(output_dir):` holds the directory for this process (rank 0 of a run)."""

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the run directory lock {self.path} ({e.strerror}); "
                            f"check trainer.output_dir is a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another run ({_holder_text(holder)}); "
                            f"wait for it to finish or stop it, or choose another trainer.output_dir") from None
        except OSError as e:  # a file system without flock support
            os.close(fd)
            raise UserError(f"cannot lock {self.path} ({e.strerror}): the file system of trainer.output_dir "
                            f"does not support flock; put the run directory on one that does") from None
        left = _read(fd)
        if left.get("pid"):  # the lock file of a run that ended without removing it
            log.info("taking over %s left by a run that is gone (%s)", self.path, _holder_text(left))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no holder behind
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
