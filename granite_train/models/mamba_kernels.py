"""Fast kernels for the Mamba-2 mixer, and which backend runs.

Two fast backends, both on CUDA devices only, beside the exact PyTorch reference in `mamba.py`:

- "cuda": the conv by causal-conv1d (CUDA C++, `causal_conv1d_fn`), the SSD scan and the gated
  RMSNorm by mamba-ssm (Triton).
- "triton": the same scan and norm, the conv by fla-core's Triton varlen kernel. Everything is
  Triton, so CI checks all of it on CPU under Triton's interpreter
  (tests/models/test_mamba_triton.py); it also spares a causal-conv1d build.

"auto" takes "cuda", then "triton", then the PyTorch path (with a warning naming what is
missing). None of these packages imports on a CPU-only machine, so nothing here imports them at
module level or for a CPU device: `_missing` asks `importlib.util.find_spec` (which does not
import); for a CUDA device `import_error` then tries the imports; the glue functions import inside their bodies. A mamba-ssm installed without its CUDA
extension (`MAMBA_SKIP_CUDA_BUILD=TRUE`, the usual way around a failing build) cannot import its
package: `mamba_ssm/__init__` imports `selective_scan_cuda`. Its Triton kernels need nothing of
that, so `mamba_triton_importable` then imports them under an empty package module over the
installed directory (logged once): the "triton" backend needs only pip-installable Python code.

Kernel contracts used here (causal-conv1d 1.4+, mamba-ssm 2.2+, fla-core 0.6+):

- `causal_conv1d.causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
  return_final_states=False, final_states_out=None, activation=None)`: x [batch, dim, seqlen],
  weight [dim, width], bias [dim] (same dtype as weight), out like x. x, weight in fp32/fp16/bf16;
  width 2..4 only. `seq_idx` [batch, seqlen] int32, contiguous, and only with the channel-last
  layout (`x.stride(1) == 1`), which also needs dim, `x.stride(0)` and `x.stride(2)` to be
  multiples of 8 (csrc/causal_conv1d.cpp, `causal_conv1d_fwd`; we pad channels when dim is not). A token only reads inputs with its own seq_idx (the conv restarts at each example).
- `fla.modules.causal_conv1d.causal_conv1d(x, weight, bias, activation=None, backend="triton",
  cu_seqlens=None, cu_seqlens_cpu=None)` -> (y, final_state): x [B, T, D] (any strides with a
  unit channel stride), weight [D, W], bias [D]; `cu_seqlens` [n+1] int32 on the device (B == 1)
  restarts the conv at every example, `cu_seqlens_cpu` (int64, host) spares the host sync that
  sizes the launch grid. Backward returns grads for x, weight and bias.
- `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size,
  D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False,
  dt_limit=(0.0, inf), return_final_states=False)`: x [b, l, h, p], dt [b, l, h], A [h],
  B/C [b, l, g, n], D [h] or [h, p], dt_bias [h], seq_idx [b, l] int32; out [b, l, h, p] in x's
  dtype. In fp32 inside the kernel: `dt = dt + dt_bias`, then `softplus` (identity above 20, as
  torch's), then clamped to `dt_limit` (always, also the default (0, inf)); `y += D * x`; with
  `z`, `y *= silu(z)` (we pass no z: the gated RMSNorm does the gating). The state is reset
  wherever seq_idx changes. Its backward returns grads for x, dt, A, B, C, D, dt_bias.
- `mamba_ssm.ops.triton.layernorm_gated.rmsnorm_fn(x, weight, bias, z=None, eps=1e-6,
  group_size=None, norm_before_gate=True)`: with `norm_before_gate=False`,
  `weight * rms_norm(x * silu(z))` over groups of `group_size` channels, statistics in fp32,
  out in x's dtype; x and z need a unit last stride; group_size * itemsize <= 64 KiB.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from typing import Dict, List, Optional, Tuple

import torch

from granite_train.errors import UserError

MAMBA_BACKENDS = ("auto", "torch", "cuda", "triton")
FAST_BACKENDS = ("cuda", "triton")  # what "auto" tries, in this order
CONV_WIDTHS = (2, 3, 4)  # causal_conv1d_fn's kernels
CONV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NEEDS: Dict[str, Tuple[str, ...]] = {"cuda": ("mamba_ssm", "causal_conv1d"), "triton": ("mamba_ssm", "fla")}
_PIP_NAMES = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d", "fla": "fla-core"}
_FIX = "pip install 'granite-train[gpu]'"


def check_mamba_backend(requested: str) -> None:
    if requested not in MAMBA_BACKENDS:
        raise UserError(f"mamba_backend={requested!r} is not one of {', '.join(MAMBA_BACKENDS)}; "
                        "set model.mamba_backend=auto")


def _missing(backend: str) -> List[str]:
    """pip names of the packages `backend` needs that are not findable (never imports them)."""
    return [_PIP_NAMES[m] for m in _NEEDS[backend] if importlib.util.find_spec(m) is None]


def kernels_installed(backend: str = "cuda") -> bool:
    """The packages of `backend` are findable; never imports them (they need CUDA to import)."""
    return not _missing(backend)


def config_unsupported(d_conv: int, backend: str = "cuda") -> Optional[str]:
    """Why `backend`'s kernels cannot run this mixer shape, or None."""
    if backend == "cuda" and d_conv not in CONV_WIDTHS:
        return (f"causal_conv1d_fn supports conv widths {CONV_WIDTHS[0]}..{CONV_WIDTHS[-1]}, "
                f"the model has mamba_d_conv={d_conv}")
    return None


def mamba_triton_importable() -> None:
    """Make `mamba_ssm.ops.triton.*` importable where mamba-ssm lacks its CUDA extension (see the
    module doc); nothing when the package imports (or is already imported). Raises what the
    import raised for any other failure."""
    if "mamba_ssm" in sys.modules:
        return
    try:
        importlib.import_module("mamba_ssm")
        return
    except ImportError as exc:
        spec = importlib.util.find_spec("mamba_ssm")
        locations = getattr(spec, "submodule_search_locations", None)
        if "selective_scan_cuda" not in f"{exc.name} {exc}" or not locations:
            raise
    for name in [n for n in sys.modules if n.startswith("mamba_ssm.")]:  # left by the failed import
        del sys.modules[name]
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(locations)
    sys.modules["mamba_ssm"] = package
    logging.getLogger(__name__).info(
        "mamba-ssm is installed without its CUDA extension (selective_scan_cuda): its Triton kernels are "
        "imported on their own")


# What each backend imports first (after `mamba_triton_importable`).
_FIRST_IMPORTS = {"cuda": ("mamba_ssm.ops.triton.ssd_combined", "causal_conv1d"),
                  "triton": ("mamba_ssm.ops.triton.ssd_combined", "fla.modules.causal_conv1d")}


def import_error(backend: str) -> Optional[str]:
    """Why `backend`'s modules do not import, or None. Imports them: reached only for a CUDA
    device (never on a CPU-only machine)."""
    for name in _FIRST_IMPORTS[backend]:
        try:
            if name.startswith("mamba_ssm."):
                mamba_triton_importable()
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or a CUDA extension failing to load
            return f"import {name} failed ({type(exc).__name__}: {exc})"
    return None


def backend_unavailable(backend: str, d_conv: int) -> Optional[str]:
    """Why `backend`'s kernels cannot run a mixer of conv width `d_conv` on a CUDA device, or None."""
    missing = _missing(backend)
    if missing:
        return f"{' and '.join(missing)} not installed ({_FIX})"
    return config_unsupported(d_conv, backend) or import_error(backend)


def resolve_mamba_backend(requested: str, device: torch.device, d_conv: int) -> Tuple[str, Optional[str]]:
    """("cuda" | "triton" | "torch", why no fast kernel runs though one was wanted, or None).

    "auto": the first of FAST_BACKENDS that can run on a CUDA device, else torch (the reason is
    returned when it is a CUDA device, so the caller can warn). "cuda" or "triton" when it cannot
    run: a UserError naming the fix.
    """
    check_mamba_backend(requested)
    if requested == "torch":
        return "torch", None
    if device.type != "cuda":
        if requested != "auto":
            raise UserError(f"model.mamba_backend={requested} needs a CUDA device with "
                            f"{' and '.join(_PIP_NAMES[m] for m in _NEEDS[requested])} ({_FIX}), "
                            f"this run is on {device.type}; use model.mamba_backend=auto")
        return "torch", None
    if requested != "auto":
        why = backend_unavailable(requested, d_conv)
        if why is not None:
            raise UserError(f"model.mamba_backend={requested} cannot run: {why}; "
                            "or use model.mamba_backend=auto")
        return requested, None
    whys = []
    for backend in FAST_BACKENDS:
        why = backend_unavailable(backend, d_conv)
        if why is None:
            return backend, None
        whys.append(f"{backend}: {why}")
    return "torch", "; ".join(whys)


def _channel_last_ok(x_BCT: torch.Tensor) -> bool:
    return (x_BCT.stride(1) == 1 and x_BCT.shape[1] % 8 == 0 and x_BCT.stride(0) % 8 == 0
            and x_BCT.stride(2) % 8 == 0)


def conv_silu(xBC_BTC: torch.Tensor, weight_C1K: torch.Tensor, bias_C: Optional[torch.Tensor],
              seq_idx_BT: Optional[torch.Tensor]) -> torch.Tensor:
    """SiLU(depthwise causal conv1d) via `causal_conv1d_fn`; [B, T, C] in, [B, T, C] out.

    `seq_idx_BT` (example index per token, packed rows) keeps the conv inside each example.
    """
    from causal_conv1d import causal_conv1d_fn  # CUDA only: reached when the backend is "cuda"

    x_BCT = xBC_BTC.transpose(1, 2)  # a view: channel-last ([B, T, C] memory), what seq_idx needs
    if not _channel_last_ok(x_BCT):  # e.g. a slice of in_proj's output whose width is not 8k
        x_BCT = xBC_BTC.contiguous().transpose(1, 2)
        if not _channel_last_ok(x_BCT):  # C itself not a multiple of 8: pad channels
            pad = (-xBC_BTC.shape[-1]) % 8
            C = xBC_BTC.shape[-1]
            x_pad = torch.nn.functional.pad(xBC_BTC, (0, pad))
            w_pad = torch.nn.functional.pad(weight_C1K[:, 0, :], (0, 0, 0, pad))
            b_pad = None if bias_C is None else torch.nn.functional.pad(bias_C, (0, pad))
            return conv_silu(x_pad, w_pad.unsqueeze(1), b_pad, seq_idx_BT)[..., :C]
    seq = None
    if seq_idx_BT is not None:
        seq = seq_idx_BT.to(device=x_BCT.device, dtype=torch.int32).contiguous()
    bias = None if bias_C is None else bias_C.to(weight_C1K.dtype)
    out_BCT = causal_conv1d_fn(x_BCT, weight_C1K[:, 0, :], bias, seq_idx=seq, activation="silu")
    return out_BCT.transpose(1, 2)


def chunk_scan(x_BTHP: torch.Tensor, dt_raw_BTH: torch.Tensor, A_H: torch.Tensor,
               B_BTGN: torch.Tensor, C_BTGN: torch.Tensor, D_H: torch.Tensor, dt_bias_H: torch.Tensor,
               dt_limit: Tuple[float, float], chunk_size: int,
               seq_idx_BT: Optional[torch.Tensor]) -> torch.Tensor:
    """y = SSD(x, clamp(softplus(dt_raw + dt_bias), dt_limit), A, B, C) + D x via
    `mamba_chunk_scan_combined`; the state restarts wherever `seq_idx_BT` changes."""
    mamba_triton_importable()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # a fast backend only

    seq = None
    if seq_idx_BT is not None:
        seq = seq_idx_BT.to(device=x_BTHP.device, dtype=torch.int32).contiguous()
    return mamba_chunk_scan_combined(
        x_BTHP, dt_raw_BTH, A_H, B_BTGN, C_BTGN, chunk_size,
        D=D_H, z=None, dt_bias=dt_bias_H, seq_idx=seq, dt_softplus=True,
        dt_limit=(float(dt_limit[0]), float(dt_limit[1])))


def conv_silu_varlen(xBC_BTC: torch.Tensor, weight_C1K: torch.Tensor, bias_C: Optional[torch.Tensor],
                     cu_seq_lens: Optional[torch.Tensor], bounds: Optional[List[int]]) -> torch.Tensor:
    """SiLU(depthwise causal conv1d) via fla-core's Triton kernel; [B, T, C] in, [B, T, C] out.

    `cu_seq_lens` (device, int32) and `bounds` (the same on the host: no sync) restart the conv
    at every example of a packed row; None: each row is one sequence.
    """
    from fla.modules.causal_conv1d import causal_conv1d  # Triton: reached when the backend is "triton"

    cu_cpu = None if bounds is None else torch.tensor(bounds, dtype=torch.int64)
    bias = None if bias_C is None else bias_C.to(weight_C1K.dtype)
    out_BTC, _ = causal_conv1d(xBC_BTC, weight_C1K[:, 0, :], bias, activation="silu", backend="triton",
                               cu_seqlens=cu_seq_lens, cu_seqlens_cpu=cu_cpu)
    return out_BTC


def gated_rmsnorm(y_BTD: torch.Tensor, z_BTD: torch.Tensor, weight_D: torch.Tensor, eps: float,
                  group_size: int) -> torch.Tensor:
    """`weight * rms_norm(y * silu(z))` per group of `group_size` channels via mamba-ssm's kernel."""
    mamba_triton_importable()
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn  # Triton: a fast backend only

    return rmsnorm_fn(y_BTD, weight_D, None, z=z_BTD, eps=eps, group_size=group_size, norm_before_gate=False)


BACKEND_NAMES = {"cuda": "causal_conv1d_fn (CUDA) + mamba_chunk_scan_combined + rmsnorm_fn (Triton)",
                 "triton": "fla causal_conv1d + mamba_chunk_scan_combined + rmsnorm_fn (all Triton)",
                 "torch": "PyTorch reference (causal_conv1d_packed + ssd_chunked + GatedRMSNorm)"}
