"""`<output_dir>/train.log`: what rank 0's console shows, kept with the run (appended on resume).

It takes the `granite_train` loggers (data report, backends, DeepSpeed, checkpoints, evals) and
DeepSpeed's own logger. `FILE_ONLY` is for what the console shows another way (the progress bar
stands for the per-step lines; the CLI prints the error line itself).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

LOG_FILE = "train.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FILE_ONLY = logging.getLogger("granite_train.run_log")
FILE_ONLY.propagate = False  # never reaches the console
FILE_ONLY.addHandler(logging.NullHandler())  # not Python's last-resort stderr handler either
_CAPTURED = ("granite_train", "DeepSpeed", FILE_ONLY.name)


class RunLog:
    """Rank 0 appends every record of the captured loggers to train.log until `close`."""

    def __init__(self, output_dir: Path, enabled: bool) -> None:
        self._handler: Optional[logging.Handler] = None
        self._levels = {name: logging.getLogger(name).level for name in _CAPTURED}
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(output_dir / LOG_FILE, mode="a", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        self._handler.setLevel(logging.INFO)
        for name in _CAPTURED:
            logger = logging.getLogger(name)
            logger.addHandler(self._handler)
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)  # the file gets INFO even where the console shows less
        FILE_ONLY.info("---- run started (pid %d)", os.getpid())

    def close(self) -> None:
        if self._handler is None:
            return
        for name in _CAPTURED:
            logging.getLogger(name).removeHandler(self._handler)
            logging.getLogger(name).setLevel(self._levels[name])
        self._handler.close()
        self._handler = None
