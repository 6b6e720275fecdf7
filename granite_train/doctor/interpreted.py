"""Triton kernels on CPU under Triton's interpreter: the shims they need and their install line.

`TRITON_INTERPRET=1`, set before anything imports triton, makes `triton.jit` build interpreted
kernels that run on CPU tensors with numpy: mamba-ssm's and fla-core's Triton kernels then run
here, slowly, as the same code GPU users run. What else those packages need on a CPU-only torch
is shimmed inside `interpreted_kernels()`, each shim with its reason, and undone on exit. The
shims lean on internals of the pinned versions (Autotuner.do_bench, mamba_ssm/__init__), checked
on entry. Used by the doctor on CPU and by the tests (tests/interpreted_triton.py); a training
run never enters it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from typing import Iterator, Optional
from unittest import mock

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
    """Why the interpreted kernels cannot run here, or None. Imports nothing."""
    if torch.cuda.is_available():
        return "a GPU runs these kernels compiled, not interpreted"
    missing = [m for m in PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} for the interpreted Triton kernels: {INSTALL}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET=1 is not set (set it before the process starts)"
    return None


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

    if os.environ.get("TRITON_INTERPRET") != "1" or type(tl.cumsum).__name__ != "InterpretedFunction":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set: set it before the process starts")
    found = {"triton": triton.__version__, "mamba_ssm": version("mamba-ssm"), "fla": version("fla-core")}
    if found != PINNED:
        raise RuntimeError(f"the interpreter shims were written for {PINNED}, found {found}")
    _drop_kernel_modules()
    # mamba_ssm/__init__ imports its CUDA extension (selective_scan_cuda, not built here): an
    # empty package module lets the Triton submodules import on their own.
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(importlib.util.find_spec("mamba_ssm").submodule_search_locations)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.cuda, "device", _NoCudaDevice))
        # Backward launchers size their grids by the GPU's SM count.
        stack.enter_context(mock.patch.object(
            torch.cuda, "get_device_properties", lambda d=None: types.SimpleNamespace(multi_processor_count=4)))
        stack.enter_context(mock.patch.object(Autotuner, "do_bench", property(_constant_bench)))
        # (sys.modules itself is not patched as a whole: restoring it would drop every module
        # imported meanwhile; the kernel packages' modules are dropped by name on exit.)
        sys.modules["mamba_ssm"] = pkg
        try:
            for name in KERNEL_MODULES:
                importlib.import_module(name)
            yield
        finally:
            _drop_kernel_modules()
