"""What the machine is: package versions, the device, its memory and its bf16 peak.

Versions come from the installed distributions' metadata: nothing is imported, so a GPU package
on a CPU-only machine (or a broken build) never loads here.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Dict, Optional

import torch

# pip distribution names, in the order the report lists them
PACKAGES = ("torch", "deepspeed", "triton", "flash-attn", "mamba-ssm", "causal-conv1d", "fla-core",
            "transformers", "peft", "accelerate", "datasets", "hydra-core", "safetensors")


def versions() -> Dict[str, Optional[str]]:
    """{distribution: version or None (not installed)}, plus CUDA and NCCL as torch sees them."""
    found: Dict[str, Optional[str]] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda  # None on a CPU build
    nccl = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        v = torch.cuda.nccl.version()
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    found["nccl"] = nccl
    return found


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory_gib() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return None


def device_info(device: torch.device, peak_override: Optional[float] = None) -> Dict[str, Any]:
    """The device the checks run on: its name, memory (GiB), bf16 support and peak TFLOP/s
    (`peak_override`, else a known GPU's, else None: MFU is then not reported)."""
    from granite_train.compat import cpu_has_native_bf16
    from granite_train.train.metrics import peak_tflops

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info = {"type": "cuda", "name": props.name, "memory_gib": props.total_memory / 2 ** 30,
                "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                "bf16": bool(torch.cuda.is_bf16_supported())}
    else:
        info = {"type": "cpu", "name": _cpu_name(), "memory_gib": _host_memory_gib(),
                "cores": os.cpu_count(), "threads": torch.get_num_threads(), "bf16": cpu_has_native_bf16()}
    info["peak_bf16_tflops"] = peak_tflops(peak_override, device)
    return info
