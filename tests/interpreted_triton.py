"""Triton kernels on CPU under Triton's interpreter, for tests: skip or fail where they cannot run.

The shims themselves live in `granite_train/doctor/interpreted.py` (the doctor runs the same
kernels on CPU); `TRITON_INTERPRET=1` is set by tests/conftest.py before anything imports triton.
"""

from __future__ import annotations

import os

import pytest
import torch

from granite_train.doctor.interpreted import INSTALL, PINNED, interpreted_kernels, unavailable

__all__ = ["INSTALL", "PINNED", "interpreted_kernels", "skip_or_fail_if_unavailable", "unavailable"]


def skip_or_fail_if_unavailable() -> None:
    """Skip without the packages, except where CI requires these tests (then fail)."""
    why = unavailable()
    if why is None:
        return
    if torch.cuda.is_available():
        pytest.skip(f"{why}: tests/models/test_mamba_backends.py")
    if os.environ.get("GRANITE_TRAIN_KERNEL_TESTS") == "required":
        pytest.fail(why)
    pytest.skip(why)
