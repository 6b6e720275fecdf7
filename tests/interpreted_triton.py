"""Triton kernels on CPU under Triton's interpreter, for tests: the shims and their install line.

`TRITON_INTERPRET=1` (set by tests/conftest.py before anything imports triton) makes `triton.jit`
build interpreted kernels that run on CPU tensors with numpy. What else the kernel packages need
on a CPU-only torch is shimmed here, test-side only, each with its reason; the shims lean on the
internals of the pinned versions (Autotuner.do_bench, mamba_ssm/__init__), checked on entry.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from typing import Iterator, Optional

import pytest
import torch

PACKAGES = ("triton", "einops", "mamba_ssm", "fla")
INSTALL = ("pip install -e '.[dev,triton-cpu]' && MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
           "pip install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1")
PINNED = {"triton": "3.7.1", "mamba_ssm": "2.3.2.post1", "fla": "0.6.0"}
KERNEL_MODULES = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated",
                  "fla.modules.causal_conv1d")


class _NoCudaDevice(contextlib.nullcontext):
    """`with torch.cuda.device(t.device.index)` (every mamba-ssm launcher) raises on a CPU-only
    torch: the index of a CPU tensor is None. Nothing to switch to here."""

    def __init__(self, device=None) -> None:
        super().__init__()


def _constant_bench(self):
    """Autotuning times each config with the GPU driver's benchmarker, and the interpreter has
    no driver: every config "takes" 0 ms, so the first config runs (what one config would)."""
    return lambda kernel_call, quantiles: [0.0, 0.0, 0.0]


def unavailable() -> Optional[str]:
    """Why the interpreted kernels cannot run here, or None."""
    if torch.cuda.is_available():
        return "a GPU runs these kernels compiled: tests/models/test_mamba_backends.py"
    missing = [m for m in PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} for the interpreted Triton kernels: {INSTALL}"
    return None


def skip_or_fail_if_unavailable() -> None:
    """Skip without the packages, except where CI requires these tests (then fail)."""
    why = unavailable()
    if why is None:
        return
    if os.environ.get("GRANITE_TRAIN_KERNEL_TESTS") == "required" and not torch.cuda.is_available():
        pytest.fail(why)
    pytest.skip(why)


def _drop_kernel_modules() -> None:  # a later import must not see interpreted (or compiled) kernels
    for name in [n for n in sys.modules if n.split(".")[0] in ("mamba_ssm", "fla")]:
        del sys.modules[name]


@contextlib.contextmanager
def interpreted_kernels() -> Iterator[None]:
    """The kernel modules imported under the shims; everything restored on exit."""
    import triton
    import triton.language as tl
    from importlib.metadata import version
    from triton.runtime.autotuner import Autotuner

    assert os.environ.get("TRITON_INTERPRET") == "1" and type(tl.cumsum).__name__ == "InterpretedFunction", (
        "triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")
    found = {"triton": triton.__version__, "mamba_ssm": version("mamba-ssm"), "fla": version("fla-core")}
    assert found == PINNED, f"the shims were written for {PINNED}, found {found}"
    _drop_kernel_modules()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "device", _NoCudaDevice)
        # Backward launchers size their grids by the GPU's SM count.
        mp.setattr(torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(multi_processor_count=4))
        mp.setattr(Autotuner, "do_bench", property(_constant_bench))
        # mamba_ssm/__init__ imports its CUDA extension (selective_scan_cuda, not built here): an
        # empty package module lets the Triton submodules import on their own.
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(importlib.util.find_spec("mamba_ssm").submodule_search_locations)
        mp.setitem(sys.modules, "mamba_ssm", pkg)
        for name in KERNEL_MODULES:
            importlib.import_module(name)
        try:
            yield
        finally:
            _drop_kernel_modules()
