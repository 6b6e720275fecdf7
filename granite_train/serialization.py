"""Loading torch files from checkpoints without running code.

`torch.load(weights_only=False)` unpickles whatever a file says, including calls into any
importable function: anyone who can write into a run directory would run code on every rank
that resumes from it. Everything we read back goes through `safe_load`: `weights_only=True`,
which builds only tensors and plain data, plus a short allowlist of classes that hold plain data
and run nothing when unpickled (DeepSpeed's ZeRO optimizer files need three, named in
`compat.py`; checkpoints written before the RNG states were stored as plain data hold numpy
arrays). A file that names anything else is refused in one line, before any of it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, List, Union

import numpy as np
import torch

from granite_train.compat import deepspeed_checkpoint_classes
from granite_train.errors import UserError


def _numpy_array_classes() -> List[Any]:
    """What pickled numpy arrays name (RNG states of checkpoints written before plain-data RNG)."""
    # An array pickles as a call of numpy's private `_core.multiarray._reconstruct`: asked of its
    # public pickle protocol (`__reduce__`), not imported by that private path.
    classes = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype]
    classes += [type(np.dtype(t)) for t in ("uint32", "int64", "float64")]  # numpy >= 1.25 dtype classes
    return classes


def allowed_classes() -> List[Any]:
    return [*deepspeed_checkpoint_classes(), *_numpy_array_classes()]


def safe_load(path: Union[str, Path], map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load` that runs no code: refused with one UserError line when the file names
    anything but tensors, plain data and `allowed_classes()`. `mmap=True` maps the tensors
    instead of reading them (only what is used is paged in: offline reads of large shards)."""
    try:
        with torch.serialization.safe_globals(allowed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        try:
            named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not even a torch file: say so below
            named = []
        what = f"it names {', '.join(named[:4])}" if named else "it is not a plain torch file"
        raise UserError(f"refusing to load {path}: {what}, and checkpoints are only ever read as tensors and "
                        f"plain data (loading it would run code); the checkpoint is damaged or was not written "
                        f"by granite-train") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch's words for a cut or corrupt file
        raise UserError(f"cannot read {path} ({type(e).__name__}: {' '.join(str(e).split())[:160]}); the "
                        f"checkpoint is damaged: resume from another one") from None
