"""Every kernel backend of every layer kind: whether it runs here, why not, what `auto` picks,
and, for each that runs, its agreement with the exact PyTorch reference, forward and backward.

Layer kinds and their backends (the reference first; `model.attn_backend` / `mamba_backend`
choose them in a run):
- attention: sdpa (the per-example loop; checked against softmax attention written out),
  flash (flash-attn), varlen (torch's own varlen flash kernels);
- mamba_conv: torch (`causal_conv1d_packed`), cuda (causal-conv1d), triton (fla-core);
- mamba_scan: torch (`ssd_chunked`), triton (mamba-ssm's `mamba_chunk_scan_combined`, used by
  both fast Mamba backends);
- gated_norm: torch (`GatedRMSNorm`), triton (mamba-ssm's `rmsnorm_fn`);
- moe: loop (one matmul per expert), grouped_mm (torch's grouped GEMM: CUDA sm90+, bf16).

Each check runs on one packed row with 1-token examples, examples that cross a Mamba chunk
boundary and one longer than a chunk, at real Granite-4.0-H-Tiny widths on CUDA and small ones
on CPU. The kernels take fp32 where they can (flash kernels and grouped GEMM: bf16 only); the
reference runs in fp32 on the same input values. The error is max |fast - ref| / max |ref| over
the output and every input gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from granite_train.compat import grouped_mm_kernel
from granite_train.models import mamba_kernels
from granite_train.models.attention import attn_backend_unavailable, causal_attention, resolve_attn_backend
from granite_train.models.batch import SeqLayout
from granite_train.models.mamba import GatedRMSNorm, causal_conv1d_packed, ssd_chunked

LAYERS = ("attention", "mamba_conv", "mamba_scan", "gated_norm", "moe")


@dataclass
class BackendCheck:
    layer: str
    name: str
    available: bool
    reason: Optional[str]  # why it is not available (None when it is)
    picked_by_auto: bool
    max_rel_err: Optional[float] = None
    tolerance: Optional[float] = None
    dtype: Optional[str] = None
    interpreted: bool = False  # a Triton kernel run by Triton's interpreter (CPU)
    error: Optional[str] = None  # the check itself raised
    reference: bool = False  # the exact path the others are compared with

    @property
    def ok(self) -> bool:
        if not self.available or self.reference:
            return True
        return self.error is None and self.max_rel_err is not None and self.max_rel_err <= self.tolerance


@dataclass(frozen=True)
class Shapes:
    lengths: Tuple[int, ...]
    chunk: int
    heads: int  # Mamba heads x head_dim, groups x state
    head_dim: int
    groups: int
    state: int
    conv_channels: int
    conv_width: int
    attn_heads: int
    attn_kv_heads: int
    attn_head_dim: int
    experts: int
    hidden: int
    expert_out: int


# 1-token examples, examples across the 16- and 32-token chunk edges, one longer than a chunk;
# three chunks at most (the interpreter's time grows with chunks x heads).
CPU_SHAPES = Shapes(lengths=(1, 21, 1, 19, 6), chunk=16, heads=4, head_dim=16, groups=2, state=16,
                    conv_channels=64, conv_width=4, attn_heads=4, attn_kv_heads=2, attn_head_dim=16,
                    experts=4, hidden=64, expert_out=32)
# Granite-4.0-H-Tiny's widths (configs/model/granite-4.0-h-tiny.yaml): Mamba 48 x 64, state 128,
# conv over 3328 channels, chunk 256; attention 12 / 4 heads of 128; 64 experts of 1536 -> 1024.
CUDA_SHAPES = Shapes(lengths=(1, 611, 1, 1500, 3, 1980), chunk=256, heads=48, head_dim=64, groups=1,
                     state=128, conv_channels=3328, conv_width=4, attn_heads=12, attn_kv_heads=4,
                     attn_head_dim=128, experts=64, hidden=1536, expert_out=1024)


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """bf16: its 8-bit mantissa. fp32 on CUDA: Triton's tl.dot and cuBLAS take fp32 inputs as
    TF32 (10-bit mantissa) by default. fp32 on CPU: fp32 arithmetic, reordered."""
    if dtype == torch.bfloat16:
        return 3e-2
    return 5e-3 if device.type == "cuda" else 1e-5


@torch.no_grad()
def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def compare(fast: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor],
            inputs: Sequence[Tuple[torch.Tensor, bool]], dtype: torch.dtype, seed: int = 0) -> float:
    """max relative error of `fast` against `ref` over the output and each input's gradient.
    `inputs`: (fp32 tensor, whether the kernel takes it in `dtype`); `ref` gets the same values
    in fp32."""
    fast_in = [(t.to(dtype) if cast else t).detach().requires_grad_() for t, cast in inputs]
    ref_in = [t.detach().float().requires_grad_() for t in fast_in]
    out, ref_out = fast(*fast_in), ref(*ref_in)
    if out.shape != ref_out.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != the reference's {tuple(ref_out.shape)}")
    g = torch.Generator(device=out.device).manual_seed(seed)
    dy = torch.randn(ref_out.shape, generator=g, device=out.device)
    grads = torch.autograd.grad(out, fast_in, dy.to(out.dtype))
    ref_grads = torch.autograd.grad(ref_out, ref_in, dy)
    return max([_rel(out, ref_out)] + [_rel(a, b) for a, b in zip(grads, ref_grads)])


# ---------------------------------------------------------------- the packed row

def _bounds(lengths: Sequence[int]) -> List[int]:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return bounds


def _randn(*shape: int, device: torch.device, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, device=device)


def _seq_idx(s: Shapes, device: torch.device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(s.lengths), device=device),
                                   torch.tensor(s.lengths, device=device)).unsqueeze(0)


# ---------------------------------------------------------------- attention

def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         bounds: List[int]) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v per example, GQA by repeating KV heads."""
    group = q.shape[2] // k.shape[2]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[:, s:e].transpose(1, 2) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        scores = qs @ ks.transpose(-1, -2) * scale
        future = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).triu(1)
        outs.append((scores.masked_fill(future, float("-inf")).softmax(-1) @ vs).transpose(1, 2))
    return torch.cat(outs, dim=1)


def _check_attention(name: str, s: Shapes, device: torch.device) -> Tuple[float, torch.dtype]:
    bounds, T = _bounds(s.lengths), sum(s.lengths)
    dtype = torch.float32 if name == "sdpa" else torch.bfloat16
    scale = 1.0 / s.attn_head_dim  # Granite's attention_multiplier, not 1/sqrt(D)
    layout = SeqLayout(attn_backend=name, bounds=bounds, max_seq_len=max(s.lengths),
                       cu_seq_lens=torch.tensor(bounds, dtype=torch.int32, device=device))
    inputs = [(_randn(1, T, h, s.attn_head_dim, device=device, seed=i), True)
              for i, h in enumerate((s.attn_heads, s.attn_kv_heads, s.attn_kv_heads))]
    err = compare(lambda q, k, v: causal_attention(q, k, v, scale, layout),
                  lambda q, k, v: _attention_reference(q, k, v, scale, bounds), inputs, dtype)
    return err, dtype


# ---------------------------------------------------------------- Mamba-2 pieces

def _check_conv(name: str, s: Shapes, device: torch.device) -> Tuple[float, torch.dtype]:
    bounds, T, C, K = _bounds(s.lengths), sum(s.lengths), s.conv_channels, s.conv_width
    pos = (torch.arange(T, device=device)
           - torch.repeat_interleave(torch.tensor(bounds[:-1], device=device), torch.tensor(s.lengths, device=device)))[None]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    seq = _seq_idx(s, device)
    if name == "cuda":
        def fast(x, w, b):
            return mamba_kernels.conv_silu(x, w, b, seq)
    else:
        def fast(x, w, b):
            return mamba_kernels.conv_silu_varlen(x, w, b, cu, bounds)
    inputs = [(_randn(1, T, C, device=device, seed=1), True), (_randn(C, 1, K, device=device, seed=2, scale=0.3), True),
              (_randn(C, device=device, seed=3, scale=0.3), True)]
    return compare(fast, lambda x, w, b: F.silu(causal_conv1d_packed(x, w, b, pos)), inputs, torch.float32), torch.float32


def _check_scan(name: str, s: Shapes, device: torch.device) -> Tuple[float, torch.dtype]:
    T, H, P, G, N = sum(s.lengths), s.heads, s.head_dim, s.groups, s.state
    seq, limit = _seq_idx(s, device), (0.0, float("inf"))

    def ref(x, dt, A, B, C, D, dt_bias):
        d = F.softplus(dt + dt_bias).clamp(*limit)
        return ssd_chunked(x, d, A, B, C, s.chunk, seq) + D[:, None] * x

    def fast(x, dt, A, B, C, D, dt_bias):
        return mamba_kernels.chunk_scan(x, dt, A, B, C, D, dt_bias, limit, s.chunk, seq)

    inputs = [(_randn(1, T, H, P, device=device, seed=1), True), (_randn(1, T, H, device=device, seed=2), True),
              (-torch.rand(H, device=device) - 0.5, False),
              (_randn(1, T, G, N, device=device, seed=3, scale=0.5), True),
              (_randn(1, T, G, N, device=device, seed=4, scale=0.5), True),
              (_randn(H, device=device, seed=5), False), (_randn(H, device=device, seed=6), False)]
    return compare(fast, ref, inputs, torch.float32), torch.float32


def _check_gated_norm(name: str, s: Shapes, device: torch.device) -> Tuple[float, torch.dtype]:
    T, D = sum(s.lengths), s.heads * s.head_dim
    norm = GatedRMSNorm(D, D // s.groups, 1e-5).to(device)

    def with_weight(backend):  # the weight as an input, so that its gradient is compared too
        return lambda y, z, w: torch.func.functional_call(norm, {"weight": w}, (y, z, backend))

    inputs = [(_randn(1, T, D, device=device, seed=1), True), (_randn(1, T, D, device=device, seed=2), True),
              (1.0 + _randn(D, device=device, seed=3, scale=0.3), True)]
    return compare(with_weight(name), with_weight("torch"), inputs, torch.float32), torch.float32


# ---------------------------------------------------------------- MoE experts

def _check_moe(name: str, s: Shapes, device: torch.device) -> Tuple[float, torch.dtype]:
    from granite_train.models.moe import grouped_expert_matmul

    T = sum(s.lengths)
    # tokens sorted by expert: uneven counts, one expert with none
    weights = torch.arange(1, s.experts + 1, dtype=torch.float64)
    weights[1] = 0.0
    counts = (weights / weights.sum() * T).floor().long()
    counts[-1] += T - int(counts.sum())
    sizes = counts.tolist()
    counts = counts.to(device)

    def fast(x, w):
        return grouped_expert_matmul(x, w, counts, None)

    def ref(x, w):
        return grouped_expert_matmul(x, w, counts, sizes)

    inputs = [(_randn(T, s.hidden, device=device, seed=1), True),
              (_randn(s.experts, s.expert_out, s.hidden, device=device, seed=2, scale=s.hidden ** -0.5), True)]
    return compare(fast, ref, inputs, torch.bfloat16), torch.bfloat16


# ---------------------------------------------------------------- availability

def _interpreted_triton() -> Optional[str]:
    """None when the Triton Mamba kernels can run interpreted here (CPU, TRITON_INTERPRET=1)."""
    from granite_train.doctor.interpreted import unavailable

    return unavailable()


def _mamba_unavailable(name: str, device: torch.device, d_conv: int) -> Tuple[Optional[str], bool]:
    """(why `name` cannot run, whether it runs interpreted) for the mamba_backend `name`."""
    if device.type == "cuda":
        return mamba_kernels.backend_unavailable(name, d_conv), False
    if name == "triton":
        why = _interpreted_triton()
        if why is None:
            return None, True
        return f"needs a CUDA device, or Triton's interpreter on CPU ({why})", False
    return "needs a CUDA device (causal-conv1d is CUDA C++; no interpreter runs it)", False


def _moe_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "needs a CUDA device (its CPU fallback's backward fails on empty groups)"
    if grouped_mm_kernel() is None:
        return f"torch {torch.__version__} has no grouped GEMM"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "needs compute capability 9.0+ (Hopper)"
    return None


CHECKS: Dict[str, Callable[[str, Shapes, torch.device], Tuple[float, torch.dtype]]] = {
    "attention": _check_attention, "mamba_conv": _check_conv, "mamba_scan": _check_scan,
    "gated_norm": _check_gated_norm, "moe": _check_moe}


def backend_rows(device: torch.device, d_conv: int = 4) -> List[BackendCheck]:
    """Every (layer, backend) with its availability and whether `auto` picks it on `device`."""
    rows: List[BackendCheck] = []
    attn_auto = resolve_attn_backend("auto", device)
    for name in ("sdpa", "flash", "varlen"):
        why = attn_backend_unavailable(name, device)
        rows.append(BackendCheck("attention", name, why is None, why, attn_auto == name))
    mamba_auto, _ = mamba_kernels.resolve_mamba_backend("auto", device, d_conv)
    for layer, names in (("mamba_conv", ("torch", "cuda", "triton")), ("mamba_scan", ("torch", "triton")),
                         ("gated_norm", ("torch", "triton"))):
        for name in names:
            if name == "torch":
                rows.append(BackendCheck(layer, name, True, None, mamba_auto == "torch", reference=True))
                continue
            # the scan and the norm run mamba-ssm's Triton kernels under either fast backend
            candidates = (name,) if layer == "mamba_conv" else ("cuda", "triton")
            whys = [_mamba_unavailable(c, device, d_conv) for c in candidates]
            ok = [c for c, (why, _) in zip(candidates, whys) if why is None]
            interpreted = bool(ok) and dict(zip(candidates, whys))[ok[0]][1]
            reason = None if ok else "; ".join(why if len(candidates) == 1 else f"{c}: {why}"
                                               for c, (why, _) in zip(candidates, whys))
            picked = mamba_auto == name if layer == "mamba_conv" else mamba_auto in candidates
            rows.append(BackendCheck(layer, name, bool(ok), reason, picked, interpreted=interpreted))
    why = _moe_unavailable(device)
    rows.append(BackendCheck("moe", "loop", True, None, why is not None, reference=True))
    rows.append(BackendCheck("moe", "grouped_mm", why is None, why, why is None))
    return rows


def check_parity(rows: List[BackendCheck], device: torch.device, shapes: Optional[Shapes] = None) -> None:
    """Fill in max_rel_err, tolerance and dtype of every available backend (the references
    themselves have nothing to be compared with, except SDPA: checked against math attention)."""
    s = shapes or (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    interpreted = any(r.interpreted and r.available for r in rows)
    with _interpreter_context() if interpreted else contextlib.nullcontext():
        for row in rows:
            if not row.available or row.reference:
                continue
            try:
                err, dtype = CHECKS[row.layer](row.name, s, device)
            except Exception as exc:  # a kernel that raises is a failed check, reported by name
                row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                continue
            row.max_rel_err, row.dtype, row.tolerance = err, str(dtype).replace("torch.", ""), tolerance(dtype, device)


def _interpreter_context():
    from granite_train.doctor.interpreted import interpreted_kernels

    return interpreted_kernels()
