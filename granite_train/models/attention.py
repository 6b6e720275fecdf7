"""Causal self-attention (RoPE, GQA, Granite's softmax scale) and its kernel choice.

Kernels, all exact (no mask tensor is ever built):
- "flash": `flash_attn_varlen_func` over the packed row (CUDA only; imported lazily on CUDA).
- "varlen": torch's own flash-attention varlen kernels (`torch.nn.attention.varlen`, CUDA only,
  torch >= 2.9): the same one call over the packed row with no extra package to build.
- "sdpa": packed rows loop `F.scaled_dot_product_attention(is_causal=True)` over examples (the
  fastest exact option measured on CPU); padded [B, L] batches run one causal SDPA call.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from granite_train.compat import varlen_attention_kernel, varlen_causal_attention
from granite_train.errors import UserError
from granite_train.models import context as cp_geometry
from granite_train.models.batch import SeqLayout
from granite_train.models.config import GraniteConfig
from granite_train.models.param_roles import HIDDEN, mark_linear
from granite_train.models.rope import apply_rope

ATTN_BACKENDS = ("auto", "sdpa", "flash", "varlen")
# The fused varlen kernels ("flash", "varlen") have no fp32 kernel: an fp32 forward without
# autocast takes the exact SDPA loop (a module attribute: tests widen it to check the glue).
FUSED_DTYPES = (torch.float16, torch.bfloat16)


def check_attn_backend(requested: str) -> None:
    if requested not in ATTN_BACKENDS:
        raise UserError(f"attn_backend={requested!r} is not one of {', '.join(ATTN_BACKENDS)}; "
                        "set model.attn_backend=auto")


def attn_backend_unavailable(backend: str, device: torch.device, dropout: float = 0.0) -> Optional[str]:
    """Why `backend` cannot run on `device` (with attention dropout `dropout`), or None."""
    if backend == "sdpa":
        return None
    if device.type != "cuda":
        return f"needs a CUDA device (its kernels run on CUDA only), this is {device.type}"
    if backend == "flash":
        # find_spec looks for the package without importing it: flash-attn must never be
        # imported on a CPU-only machine.
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash-attn package is not installed (pip install 'granite-train[gpu]')"
        return None
    if varlen_attention_kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.9)"
    if dropout > 0:
        return f"torch's varlen_attn has no dropout, the model has attention_dropout={dropout}"
    return None


def resolve_attn_backend(requested: str, device: torch.device, dropout: float = 0.0) -> str:
    """The kernel that runs for `requested` on `device`: "flash", "varlen" or "sdpa". "auto"
    takes flash-attn where installed, else torch's varlen kernels, on CUDA; SDPA elsewhere."""
    check_attn_backend(requested)
    if requested == "auto":
        for backend in ("flash", "varlen"):
            if attn_backend_unavailable(backend, device, dropout) is None:
                return backend
        return "sdpa"
    why = attn_backend_unavailable(requested, device, dropout)
    if why is not None:
        raise UserError(f"model.attn_backend={requested} cannot run: {why}; use model.attn_backend=auto")
    return requested


def _sdpa_padded(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor,
                 scale: float, dropout_p: float) -> torch.Tensor:
    o_BHTD = F.scaled_dot_product_attention(
        q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2),
        is_causal=True, scale=scale, enable_gqa=True, dropout_p=dropout_p)
    return o_BHTD.transpose(1, 2)


def _sdpa_segments(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, scale: float,
                   ranges, dropout_p: float) -> torch.Tensor:
    """SDPA per example: `ranges` holds ((query start, end), (key start, end)) per segment, in
    order. Where a segment has more keys than queries (a context-parallel slice's example that
    began in an earlier slice) the causal mask is aligned at the last query and key
    (`causal_lower_right`, which the fused kernels take without a [q, k] mask tensor)."""
    # [1, H, S, D] views, never 3-D [H, S, D]: on CPU, SDPA only dispatches 4-D inputs to its
    # flash kernel; 3-D ones take the math path, which builds the [H, S, S] scores (3.8x slower
    # forward + backward at S=1,600 and O(S^2) memory; benchmarks/padding_free.py).
    # Imported here: torch.nn.attention.bias imports torch._dynamo (~2 s at every process start).
    from torch.nn.attention.bias import causal_lower_right

    q_BHTD, k_BKTD, v_BKTD = q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2)
    outs = []
    for (s, e), (ks, ke) in ranges:
        if e == s:
            continue
        mask = causal_lower_right(e - s, ke - ks) if ke - ks > e - s else None
        o_BHSD = F.scaled_dot_product_attention(
            q_BHTD[:, :, s:e], k_BKTD[:, :, ks:ke], v_BKTD[:, :, ks:ke], attn_mask=mask,
            is_causal=mask is None, scale=scale, enable_gqa=True, dropout_p=dropout_p)
        outs.append(o_BHSD.transpose(1, 2))
    return torch.cat(outs, dim=1)


def _fused_varlen(backend: str, q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor,
                  cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, scale: float,
                  dropout_p: float) -> torch.Tensor:
    """One varlen call of `backend` ("flash" or "varlen"): causal per segment, the mask aligned
    at each segment's last query and key (bottom right)."""
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func  # only reached on CUDA

        return flash_attn_varlen_func(q_THD, k_TKD, v_TKD, cu_q, cu_k, max_q, max_k,
                                      dropout_p=dropout_p, softmax_scale=scale, causal=True)
    assert dropout_p == 0.0, "resolve_attn_backend refuses varlen with attention dropout"
    return varlen_causal_attention(q_THD, k_TKD, v_TKD, cu_q, cu_k, max_q, max_k, scale)


def _context_key_ranges(layout: SeqLayout):
    """Per local segment: (local query range, key range in the gathered row) for a
    context-parallel slice. Only the first segment can reach back into earlier slices."""
    shard = layout.context
    off, b = shard.offset, layout.bounds
    first_key = cp_geometry.example_start(shard, off)
    return [((s, e), ((first_key if i == 0 else off + s), off + e)) for i, (s, e) in enumerate(zip(b[:-1], b[1:]))]


def _fused_context(q_BTHD: torch.Tensor, kall_BTKD: torch.Tensor, vall_BTKD: torch.Tensor,
                   scale: float, layout: SeqLayout, dropout_p: float) -> torch.Tensor:
    """A fused varlen kernel on a context-parallel slice: the key ranges of the local segments
    are contiguous in the gathered row, and the kernels' causal mask aligns the last query with
    the last key (bottom right, flash-attn >= 2.1 and torch's), the global-position causal mask."""
    ranges = _context_key_ranges(layout)
    k0, k1 = ranges[0][1][0], ranges[-1][1][1]
    dev = q_BTHD.device
    cu_q = torch.tensor([0] + [e for (_, e), _ in ranges], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + [ke - k0 for _, (_, ke) in ranges], dtype=torch.int32, device=dev)
    max_k = max(ke - ks for _, (ks, ke) in ranges)
    o_THD = _fused_varlen(layout.attn_backend, q_BTHD[0], kall_BTKD[0, k0:k1], vall_BTKD[0, k0:k1],
                          cu_q, cu_k, layout.max_seq_len, max_k, scale, dropout_p)
    return o_THD.unsqueeze(0)


def causal_attention(q_BTHD: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor,
                     scale: float, layout: SeqLayout, dropout_p: float = 0.0) -> torch.Tensor:
    """Per-example causal attention; GQA when K < H heads. Returns [B, T, H, D].
    `dropout_p` drops attention probabilities (training only; the caller passes 0 in eval).
    A context-parallel slice (`layout.context`) attends over the keys and values of the whole
    row, gathered from the group (few KV heads under GQA: the cheap side to move)."""
    if layout.context is not None:
        kall_BTKD = layout.context.gather(k_BTKD, dim=1)
        vall_BTKD = layout.context.gather(v_BTKD, dim=1)
        if layout.attn_backend in ("flash", "varlen") and q_BTHD.dtype in FUSED_DTYPES:
            return _fused_context(q_BTHD, kall_BTKD, vall_BTKD, scale, layout, dropout_p)
        return _sdpa_segments(q_BTHD, kall_BTKD, vall_BTKD, scale, _context_key_ranges(layout), dropout_p)
    if not layout.packed:
        return _sdpa_padded(q_BTHD, k_BTKD, v_BTKD, scale, dropout_p)
    if layout.attn_backend in ("flash", "varlen") and q_BTHD.dtype in FUSED_DTYPES:
        cu = layout.cu_seq_lens
        o_THD = _fused_varlen(layout.attn_backend, q_BTHD[0], k_BTKD[0], v_BTKD[0], cu, cu,
                              layout.max_seq_len, layout.max_seq_len, scale, dropout_p)
        return o_THD.unsqueeze(0)
    assert layout.bounds is not None
    segments = list(zip(layout.bounds[:-1], layout.bounds[1:]))
    return _sdpa_segments(q_BTHD, k_BTKD, v_BTKD, scale, zip(segments, segments), dropout_p)


class Attention(nn.Module):
    """Granite self-attention; parameter names are transformers' (`self_attn.{q,k,v,o}_proj`)."""

    def __init__(self, cfg: GraniteConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.resolved_head_dim
        self.scale = cfg.softmax_scale
        self.dropout = cfg.attention_dropout
        c, hd, bias = cfg.hidden_size, self.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(c, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, c, bias=bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            mark_linear(proj, HIDDEN)

    def forward(self, x_BTC: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q_BTHD = self.q_proj(x_BTC).view(B, T, self.n_heads, self.head_dim)
        k_BTKD = self.k_proj(x_BTC).view(B, T, self.n_kv_heads, self.head_dim)
        v_BTKD = self.v_proj(x_BTC).view(B, T, self.n_kv_heads, self.head_dim)
        if layout.cos_BTD is not None:
            q_BTHD = apply_rope(q_BTHD, layout.cos_BTD, layout.sin_BTD)
            k_BTKD = apply_rope(k_BTKD, layout.cos_BTD, layout.sin_BTD)
        o_BTHD = causal_attention(q_BTHD, k_BTKD, v_BTKD, self.scale, layout,
                                  self.dropout if self.training else 0.0)
        return self.o_proj(o_BTHD.reshape(B, T, self.n_heads * self.head_dim))
