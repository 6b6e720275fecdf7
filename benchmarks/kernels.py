"""GPU kernel benchmark: each CUDA fast path against the exact PyTorch reference it replaces.

    python benchmarks/kernels.py [--out benchmarks/results/kernels.json] [--iters 20]

One packed row of T=4096 tokens holding 8 examples (lengths 3..1024), Granite-4.0-H-Tiny's
mixer shapes: Mamba-2 hidden 1536, 48 heads x 64 (d_inner 3072), d_state 128, n_groups 1,
conv 4, chunk 256; attention 12 query heads, 4 KV heads, head dim 128 (the values of
configs/model/granite-4.0-h-tiny.yaml; in_proj is then 6448 wide and the conv has 3328 channels,
both multiples of 8, so the conv kernel gets a zero-copy channel-last view). Rows:

- mamba conv: `causal_conv1d_fn(..., seq_idx)` ("cuda") and fla-core's Triton
  `causal_conv1d(..., cu_seqlens)` ("triton") vs `causal_conv1d_packed` + SiLU
- mamba scan: `mamba_chunk_scan_combined(..., seq_idx)` vs softplus/clamp + `ssd_chunked` + D x
- mamba gated norm: `rmsnorm_fn(..., norm_before_gate=False)` vs `GatedRMSNorm`'s PyTorch body
- mamba mixer: the whole `Mamba2Mixer` (in_proj .. out_proj), backends "cuda" and "triton" vs "torch"
- attention: `flash_attn_varlen_func` vs per-example SDPA (bf16 only: flash has no fp32 kernel)

For each, in fp32 and bf16: max abs and max relative error of the output and of the input
gradient (fast vs reference, same inputs), forward ms and forward+backward ms (median of
`--iters` after warm-up, CUDA events), peak memory. Needs a CUDA GPU with mamba-ssm,
causal-conv1d, fla-core and flash-attn (`pip install 'granite-train[gpu]'`); rows whose package
is missing are reported as skipped. Without CUDA it prints one line and exits 0, measuring nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

DEVICE = "cuda"  # a module constant so a CPU smoke test can swap it
LENGTHS = [611, 287, 1024, 45, 733, 3, 902, 491]  # 8 examples, T = 4096
TINY = dict(hidden_size=1536, mamba_n_heads=48, mamba_d_head=64, mamba_expand=2, mamba_d_state=128,
            mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=256,
            num_attention_heads=12, num_key_value_heads=4, head_dim=128)


def _bounds() -> List[int]:
    b = [0]
    for n in LENGTHS:
        b.append(b[-1] + n)
    return b


def _time(fn: Callable[[], torch.Tensor], grad_of: Optional[List[torch.Tensor]], iters: int,
          backward: bool) -> float:
    """Median ms of fn() (and backward of a fixed cotangent when `backward`)."""
    out = fn()
    dout = torch.randn_like(out)
    times = []
    for i in range(iters + 3):
        for t in grad_of or []:
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        if backward:
            out.backward(dout)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _errors(ref: torch.Tensor, fast: torch.Tensor) -> Dict[str, float]:
    ref, fast = ref.float(), fast.float()
    err = (fast - ref).abs().max().item()
    return {"max_abs": err, "max_rel": err / max(ref.abs().max().item(), 1e-30)}


def _compare(name: str, dtype: torch.dtype, make_inputs: Callable[[], List[torch.Tensor]],
             ref_fn: Callable, fast_fn: Callable, iters: int, params: List[torch.Tensor]) -> Dict:
    autocast = dtype == torch.bfloat16
    results: Dict = {"component": name, "dtype": str(dtype).replace("torch.", "")}
    inputs = [t.to(dtype) for t in make_inputs()]  # conv/scan rows see no matmul to autocast them
    outs = {}
    for label, fn in (("reference", ref_fn), ("fast", fast_fn)):
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        for p in params:
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            run = lambda: fn(*xs)  # noqa: E731
            out = run()
            g = torch.randn(out.shape, generator=torch.Generator(device=DEVICE).manual_seed(0),
                            device=DEVICE, dtype=out.dtype)
            out.backward(g)
            outs[label] = (out.detach(), [x.grad.detach().clone() for x in xs])
            fwd = _time(lambda: fn(*[x.detach() for x in xs]), None, iters, backward=False)
            fwd_bwd = _time(run, xs + params, iters, backward=True)
        results[f"{label}_fwd_ms"] = round(fwd, 3)
        results[f"{label}_fwd_bwd_ms"] = round(fwd_bwd, 3)
        results[f"{label}_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    results["out"] = _errors(outs["reference"][0], outs["fast"][0])
    results["grad"] = _errors(outs["reference"][1][0], outs["fast"][1][0])
    results["speedup_fwd_bwd"] = round(results["reference_fwd_bwd_ms"] / results["fast_fwd_bwd_ms"], 2)
    return results


def _mamba_rows(dtype: torch.dtype, iters: int) -> List[Dict]:
    from granite_train.models import GraniteConfig, mamba_kernels
    from granite_train.models.batch import SeqLayout
    from granite_train.models.mamba import Mamba2Mixer

    cfg = GraniteConfig(model_type="granitemoehybrid", vocab_size=1024, num_hidden_layers=1,
                        layer_types=["mamba"], num_local_experts=0, shared_intermediate_size=1024,
                        **{k: v for k, v in TINY.items() if k != "head_dim"})
    torch.manual_seed(0)
    m = Mamba2Mixer(cfg).to(DEVICE)
    with torch.no_grad():
        m.in_proj.weight.normal_(0.0, 0.02)
        m.out_proj.weight.normal_(0.0, 0.02)
    bounds = _bounds()
    T = bounds[-1]
    layout = SeqLayout(attn_backend="sdpa", cu_seq_lens=torch.tensor(bounds, dtype=torch.int32, device=DEVICE),
                       bounds=bounds, max_seq_len=max(LENGTHS))
    seq_idx, pos = layout.segments(torch.device(DEVICE))
    g = torch.Generator(device=DEVICE).manual_seed(1)
    params = list(m.parameters())
    H, P, G, N = m.n_heads, m.head_dim, m.n_groups, m.d_state

    def layout_for(backend: str) -> SeqLayout:
        return SeqLayout(attn_backend="sdpa", mamba_backend=backend, cu_seq_lens=layout.cu_seq_lens,
                         bounds=bounds, max_seq_len=layout.max_seq_len, _segments=(seq_idx, pos))

    fast = [b for b in mamba_kernels.FAST_BACKENDS if mamba_kernels.kernels_installed(b)]
    conv_names = {"cuda": "causal_conv1d_fn", "triton": "fla causal_conv1d, Triton"}
    rows = [
        _compare(f"mamba conv ({conv_names[b]})", dtype,
                 lambda: [torch.randn(1, T, m.conv_dim, device=DEVICE, generator=g)],
                 lambda x: m._conv(x, seq_idx, pos, layout, "torch"),
                 lambda x, b=b: m._conv(x, seq_idx, pos, layout, b), iters, params)
        for b in fast]
    rows += [
        _compare("mamba scan (mamba_chunk_scan_combined)", dtype,
                 lambda: [torch.randn(1, T, H, P, device=DEVICE, generator=g),
                          torch.randn(1, T, H, device=DEVICE, generator=g) - 2.0,
                          torch.randn(1, T, G, N, device=DEVICE, generator=g),
                          torch.randn(1, T, G, N, device=DEVICE, generator=g)],
                 lambda x, dt, B, C: m._scan(x, dt, B, C, seq_idx, "torch"),
                 lambda x, dt, B, C: m._scan(x, dt, B, C, seq_idx, fast[0]), iters, params),
        _compare("mamba gated norm (rmsnorm_fn)", dtype,
                 lambda: [torch.randn(1, T, m.d_inner, device=DEVICE, generator=g),
                          torch.randn(1, T, m.d_inner, device=DEVICE, generator=g)],
                 lambda y, z: m.norm(y, z, "torch"), lambda y, z: m.norm(y, z, fast[0]), iters, params),
    ]
    rows += [_compare(f"mamba mixer ({b}: conv + scan + norm, in/out proj)", dtype,
                      lambda: [torch.randn(1, T, cfg.hidden_size, device=DEVICE, generator=g)],
                      lambda x: m(x, layout_for("torch")), lambda x, b=b: m(x, layout_for(b)), iters, params)
             for b in fast]
    return rows


def _attention_row(iters: int) -> Dict:
    from granite_train.models.attention import causal_attention
    from granite_train.models.batch import SeqLayout

    bounds = _bounds()
    T, Hq, Hk, D = bounds[-1], TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"]
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    lay = {b: SeqLayout(attn_backend=b, cu_seq_lens=cu, bounds=bounds, max_seq_len=max(LENGTHS))
           for b in ("sdpa", "flash")}
    scale = D ** -0.5

    def inputs():
        return [torch.randn(1, T, Hq, D, device=DEVICE, generator=g, dtype=torch.bfloat16),
                torch.randn(1, T, Hk, D, device=DEVICE, generator=g, dtype=torch.bfloat16),
                torch.randn(1, T, Hk, D, device=DEVICE, generator=g, dtype=torch.bfloat16)]

    return _compare("attention (flash_attn_varlen_func)", torch.bfloat16, inputs,
                    lambda q, k, v: causal_attention(q, k, v, scale, lay["sdpa"]),
                    lambda q, k, v: causal_attention(q, k, v, scale, lay["flash"]), iters, [])


def _version(pkg: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU with mamba-ssm, causal-conv1d or fla-core, and flash-attn "
              "(pip install 'granite-train[gpu]'); no CUDA device here, nothing measured.")
        return
    from granite_train.models import mamba_kernels

    has_mamba = any(mamba_kernels.kernels_installed(b) for b in mamba_kernels.FAST_BACKENDS)
    has_flash = importlib.util.find_spec("flash_attn") is not None
    rows: List[Dict] = []
    skipped: List[str] = []
    if has_mamba:
        for dtype in (torch.float32, torch.bfloat16):
            rows.extend(_mamba_rows(dtype, args.iters))
    else:
        skipped.append("mamba (mamba-ssm with causal-conv1d or fla-core not installed)")
    if has_flash:
        rows.append(_attention_row(args.iters))
    else:
        skipped.append("attention (flash-attn not installed)")

    print(f"T={sum(LENGTHS)} packed, {len(LENGTHS)} examples, {torch.cuda.get_device_name()}")
    hdr = (f"{'component':<48} {'dtype':<9} {'out rel':>9} {'grad rel':>9} {'ref fwd':>8} {'fast fwd':>8} "
           f"{'ref f+b':>8} {'fast f+b':>8} {'x':>6}")
    print(hdr)
    for r in rows:
        print(f"{r['component']:<48} {r['dtype']:<9} {r['out']['max_rel']:>9.2e} {r['grad']['max_rel']:>9.2e} "
              f"{r['reference_fwd_ms']:>8.2f} {r['fast_fwd_ms']:>8.2f} {r['reference_fwd_bwd_ms']:>8.2f} "
              f"{r['fast_fwd_bwd_ms']:>8.2f} {r['speedup_fwd_bwd']:>6.2f}")
    for s in skipped:
        print(f"skipped: {s}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "versions": {p: _version(p) for p in ("mamba-ssm", "causal-conv1d", "fla-core", "flash-attn", "triton")},
           "lengths": LENGTHS, "shapes": TINY, "iters": args.iters, "rows": rows, "skipped": skipped}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
