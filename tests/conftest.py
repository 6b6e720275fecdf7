import os
import sys
from pathlib import Path

import pytest
import torch

from .runs import run_cli, run_in_process

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Triton's interpreter (tests/models/test_mamba_triton.py) has to be on before triton is first
# imported: triton.language's own helpers (tl.cumsum, ...) are jit functions, built interpreted
# or compiled at that import. Without a GPU nothing else here runs a Triton kernel; with one the
# kernels run compiled (test_mamba_backends.py), so it stays off.
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def cli(tmp_path):
    """The CLI on `args`, from tmp_path, in this process (see `run_in_process`)."""
    def _run(*args: str, timeout: int = 600):
        return run_in_process(*args, cwd=tmp_path, timeout=timeout)

    return _run


@pytest.fixture(scope="session")
def cli_at():
    """`cli_at(cwd, *args)`: the CLI from a chosen directory, in this process (for module-scoped
    fixtures)."""

    def _run(cwd: Path, *args: str, timeout: int = 600):
        return run_in_process(*args, cwd=cwd, timeout=timeout)

    return _run


@pytest.fixture
def cli_process(tmp_path):
    """The CLI as a real `python -m granite_train` process, for tests about the process itself."""
    def _run(*args: str, timeout: int = 600):
        return run_cli(*args, cwd=tmp_path, timeout=timeout)

    return _run
