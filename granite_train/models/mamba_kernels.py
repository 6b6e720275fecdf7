"""CUDA kernels for the Mamba-2 mixer (causal-conv1d and mamba-ssm), and which backend runs.

Neither package builds or imports on a CPU-only machine, so nothing here imports them at module
level: `kernels_installed` asks `importlib.util.find_spec` (which does not import), and the two
glue functions import inside their bodies, which are reached only when the resolved backend is
"cuda" (a CUDA device with both packages installed).

Kernel contracts used here (causal-conv1d 1.4+, mamba-ssm 2.2+):

- `causal_conv1d.causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
  return_final_states=False, final_states_out=None, activation=None)`: x [batch, dim, seqlen],
  weight [dim, width], bias [dim] (same dtype as weight), out like x. x, weight in fp32/fp16/bf16;
  width 2..4 only. `seq_idx` [batch, seqlen] int32, contiguous, and only with the channel-last
  layout (`x.stride(1) == 1`), which also needs dim, `x.stride(0)` and `x.stride(2)` to be
  multiples of 8 (csrc/causal_conv1d.cpp, `causal_conv1d_fwd`; we pad channels when dim is not). A token only reads inputs with its own seq_idx (the conv restarts at each example).
- `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size,
  D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False,
  dt_limit=(0.0, inf), return_final_states=False)`: x [b, l, h, p], dt [b, l, h], A [h],
  B/C [b, l, g, n], D [h] or [h, p], dt_bias [h], seq_idx [b, l] int32; out [b, l, h, p] in x's
  dtype. In fp32 inside the kernel: `dt = dt + dt_bias`, then `softplus` (identity above 20, as
  torch's), then clamped to `dt_limit` (always, also the default (0, inf)); `y += D * x`; with
  `z`, `y *= silu(z)` (we pass no z: the gated RMSNorm does the gating). The state is reset
  wherever seq_idx changes. Its backward returns grads for x, dt, A, B, C, D, dt_bias.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch

from granite_train.errors import UserError

MAMBA_BACKENDS = ("auto", "torch", "cuda")
CONV_WIDTHS = (2, 3, 4)  # causal_conv1d_fn's kernels
CONV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PACKAGES = ("mamba_ssm", "causal_conv1d")
_FIX = "pip install 'granite-train[gpu]'"


def check_mamba_backend(requested: str) -> None:
    if requested not in MAMBA_BACKENDS:
        raise UserError(f"mamba_backend={requested!r} is not one of {', '.join(MAMBA_BACKENDS)}; "
                        "set model.mamba_backend=auto")


def kernels_installed() -> bool:
    """Both packages findable; never imports them (they cannot be imported without CUDA)."""
    return all(importlib.util.find_spec(name) is not None for name in _PACKAGES)


def config_unsupported(d_conv: int) -> Optional[str]:
    """Why these kernels cannot run this mixer shape, or None."""
    if d_conv not in CONV_WIDTHS:
        return (f"causal_conv1d_fn supports conv widths {CONV_WIDTHS[0]}..{CONV_WIDTHS[-1]}, "
                f"the model has mamba_d_conv={d_conv}")
    return None


def resolve_mamba_backend(requested: str, device: torch.device, d_conv: int) -> Tuple[str, Optional[str]]:
    """("cuda" | "torch", why the kernels were wanted but do not run, or None).

    "auto": the kernels on a CUDA device with both packages and a supported shape, else torch
    (the reason is returned when it is a CUDA device, so the caller can warn). "cuda" when they
    cannot run: a UserError naming the fix.
    """
    check_mamba_backend(requested)
    if requested == "torch":
        return "torch", None
    if device.type != "cuda":
        if requested == "cuda":
            raise UserError(f"model.mamba_backend=cuda needs a CUDA device with mamba-ssm and causal-conv1d "
                            f"({_FIX}), this run is on {device.type}; use model.mamba_backend=auto")
        return "torch", None
    if not kernels_installed():
        missing = [n for n in _PACKAGES if importlib.util.find_spec(n) is None]
        why = f"{' and '.join(missing)} not installed ({_FIX})"
        if requested == "cuda":
            raise UserError(f"model.mamba_backend=cuda needs mamba-ssm and causal-conv1d: {why}; "
                            "or use model.mamba_backend=auto")
        return "torch", why
    why = config_unsupported(d_conv)
    if why is not None:
        if requested == "cuda":
            raise UserError(f"model.mamba_backend=cuda cannot run this model: {why}; "
                            "use model.mamba_backend=auto")
        return "torch", why
    return "cuda", None


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
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # CUDA only

    seq = None
    if seq_idx_BT is not None:
        seq = seq_idx_BT.to(device=x_BTHP.device, dtype=torch.int32).contiguous()
    return mamba_chunk_scan_combined(
        x_BTHP, dt_raw_BTH, A_H, B_BTGN, C_BTGN, chunk_size,
        D=D_H, z=None, dt_bias=dt_bias_H, seq_idx=seq, dt_softplus=True,
        dt_limit=(float(dt_limit[0]), float(dt_limit[1])))


BACKEND_NAMES = {"cuda": "causal_conv1d_fn + mamba_chunk_scan_combined (CUDA kernels)",
                 "torch": "PyTorch reference (causal_conv1d_packed + ssd_chunked)"}
