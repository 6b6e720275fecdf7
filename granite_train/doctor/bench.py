"""`doctor --bench`: a train step at real Granite widths, per backend and dtype.

A few layers of granite-3.3-2b, PowerMoE-3b and granite-4.0-h-tiny (their presets' widths and
vocabularies, fewer layers), one packed micro-batch of 8192 tokens on CUDA (512 on CPU) in
examples of mixed lengths, forward + backward + AdamW step. Reported per (family, backend,
dtype): tokens/s (median of the timed steps after a warm-up), MFU where the device's peak is
known (model FLOPs, PaLM convention, over peak bf16 TFLOP/s), and the step's peak memory (CUDA:
allocated; CPU: resident set above the start of the step). On CPU fp32 runs, and bf16 autocast
too where the CPU has native bf16 matmuls (elsewhere it is emulated, minutes per step); at
these widths a CPU step takes seconds (granite-3.3-2b's layer and 49k vocabulary: ~8 s for 512
tokens on 2 cores), so CPU times one step after the warm-up.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from granite_train.models import GraniteForCausalLM

# (family, preset, overrides that cut the layers: CPU, CUDA)
PRESETS: Sequence[Tuple[str, str, Sequence[str], Sequence[str]]] = (
    ("granite", "granite-3.3-2b", ["model.arch.num_hidden_layers=1"], ["model.arch.num_hidden_layers=4"]),
    ("granitemoe", "powermoe-3b", ["model.arch.num_hidden_layers=1"], ["model.arch.num_hidden_layers=4"]),
    ("granitemoehybrid", "granite-4.0-h-tiny",
     ["model.arch.num_hidden_layers=2", "model.arch.layer_types=[mamba,attention]"],
     ["model.arch.num_hidden_layers=8",
      "model.arch.layer_types=[mamba,mamba,mamba,attention,mamba,mamba,mamba,attention]"]),
)
CUDA_LENGTHS = [611, 287, 1024, 45, 733, 3, 902, 491] * 2  # 8192 tokens
CPU_LENGTHS = [200, 45, 3, 264]  # 512 tokens


def _preset_arch(preset: str, overrides: Sequence[str]):
    from granite_train.cli import compose_config

    return compose_config([f"model={preset}", *overrides]).model.arch


def _cpu_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_hwm_reset() -> None:
    try:  # resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _cpu_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _combos(family: str, device: torch.device) -> List[Tuple[str, str, Optional[torch.dtype]]]:
    """(attn_backend, mamba_backend, autocast dtype) to time: auto and the references."""
    if device.type != "cuda":
        from granite_train.compat import cpu_has_native_bf16

        # Without native bf16 matmuls (AVX512-BF16 / AMX) bf16 is emulated: minutes per step at
        # these widths. With them both run (trainer.dtype=auto is fp32 on CPU: bf16 autocast
        # lost there, benchmarks/cpu_dtype.py; here is this machine's own comparison).
        bf16 = [("sdpa", "torch", torch.bfloat16)] if cpu_has_native_bf16() else []
        return [("sdpa", "torch", None), *bf16]
    combos = [("auto", "auto", torch.bfloat16), ("sdpa", "auto", torch.bfloat16)]
    if family == "granitemoehybrid":
        combos.append(("auto", "torch", torch.bfloat16))
    return combos


def bench_one(arch, device: torch.device, lengths: Sequence[int], attn: str, mamba: str,
              dtype: Optional[torch.dtype], steps: int, peak: Optional[float]) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = GraniteForCausalLM(arch, attn_backend=attn, mamba_backend=mamba).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    T = sum(lengths)
    ids = torch.randint(1, arch.vocab_size, (1, T), generator=torch.Generator().manual_seed(1)).to(device)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(input_ids=ids, cu_seq_lens=cu, labels=ids, return_logits=False)
        loss = out.loss if out.aux_loss is None else out.loss + 0.01 * out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up: kernels chosen and compiled, optimizer state allocated
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _cpu_rss()
        _cpu_hwm_reset()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak_bytes = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _cpu_hwm() - base)
    attn_used, mamba_used = model.resolve_backends(device)
    seconds = statistics.median(times)
    mean_len = max(1, round(sum(n * n for n in lengths) / T))
    flops = model.flops_per_token(mean_len) * T
    mfu = None if not peak else flops / seconds / (peak * 1e12)
    backend = attn_used + (f"+mamba:{mamba_used}" if arch.model_type == "granitemoehybrid" else "")
    return {"family": arch.model_type, "backend": backend, "dtype": "bf16" if dtype else "fp32",
            "tokens": T, "layers": arch.num_hidden_layers, "step_s": seconds, "tokens_per_s": T / seconds,
            "mfu": mfu, "peak_gib": peak_bytes / 2 ** 30}


def run_bench(device: torch.device, peak: Optional[float], echo: Callable[[str], Any] = print,
              steps: Optional[int] = None, presets=None, lengths: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    on_cuda = device.type == "cuda"
    lengths = lengths or (CUDA_LENGTHS if on_cuda else CPU_LENGTHS)
    steps = steps or (5 if on_cuda else 1)
    rows = []
    for family, preset, cpu_cut, cuda_cut in presets or PRESETS:
        arch = _preset_arch(preset, cuda_cut if on_cuda else cpu_cut)
        for attn, mamba, dtype in _combos(family, device):
            try:
                row = bench_one(arch, device, lengths, attn, mamba, dtype, steps, peak)
            except Exception as exc:  # e.g. out of memory: reported, the others still run
                row = {"family": family, "backend": f"{attn}+mamba:{mamba}", "dtype": "bf16" if dtype else "fp32",
                       "tokens_per_s": None, "mfu": None, "peak_gib": None,
                       "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
            gc.collect()  # the model and its optimizer state, before the next one is built
            if on_cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            if row.get("error"):
                echo(f"bench      {family:<17} {row['backend']:<22} {row['dtype']} FAILED: {row['error']}")
            else:
                mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
                echo(f"bench      {family:<17} {row['backend']:<22} {row['dtype']}  {row['tokens_per_s']:>9.0f} tokens/s "
                     f"(T={row['tokens']}, {row['layers']} layers)  MFU {mfu}  peak {row['peak_gib']:.2f} GiB")
    return rows
