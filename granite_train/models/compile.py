"""`trainer.compile=true`: torch.compile on the parts of the model where it is exact and helps.

Compiled (each module's forward, dynamic shapes, so a new packed-row length does not
recompile): RMSNorm, the Mamba gated RMSNorm, the dense SwiGLU and the shared MLP: fp32
upcasts, reductions and activations that inductor fuses into the neighbouring elementwise work.

Left eager, on purpose:
- attention: the packed path loops over examples with host-side boundaries (a graph break and
  a recompile per boundary list); flash-attn varlen / SDPA are already fused kernels.
- MoE dispatch: split sizes are data dependent (a host sync per layer by design).
- the Mamba SSD scan (torch path): compiling `ssd_chunked` with dynamic shapes took 3-5 minutes
  per shape class on 2 CPU cores and ran slower than eager (docs/benchmarks.md); on CUDA the
  mamba-ssm kernels replace it anyway.

Exactness: the compiled modules compute the same formulas; inductor may reorder fp32 reductions
(tests/models/test_compile.py: losses and gradients equal eager to 1e-5 relative).
"""

from __future__ import annotations

from collections import Counter
from typing import Dict

from torch import nn

from granite_train.models.mamba import GatedRMSNorm
from granite_train.models.mlp import SwiGLU
from granite_train.models.moe import SharedMLP
from granite_train.models.norm import RMSNorm

COMPILED_MODULES = (RMSNorm, GatedRMSNorm, SwiGLU, SharedMLP)


def compile_model(model: nn.Module) -> Dict[str, int]:
    """Compile the forward of every `COMPILED_MODULES` submodule in place (`nn.Module.compile`:
    parameter names and the state_dict stay as they are). Compilation happens lazily, at the
    first forward. Returns how many modules of each kind were compiled (for the log line)."""
    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, COMPILED_MODULES):
            module.compile(dynamic=True)
            counts[type(module).__name__] += 1
    return dict(counts)
