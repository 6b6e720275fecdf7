"""usage: python -m granite_train.doctor [overrides] [--json FILE] [--bench] [--peak-tflops X]

What this machine can run and whether it runs it right; the first command on a new machine.
It prints the versions (torch, CUDA, NCCL, deepspeed, triton, flash-attn, mamba-ssm,
causal-conv1d, fla-core, transformers, peft), the device with its memory and bf16 peak; for each
layer kind (attention, mamba_conv, mamba_scan, gated_norm, moe) every backend, whether it is
available here (and why not) and which one `auto` picks; each available fast path against the
exact PyTorch reference, forward and backward, on a packed row (1-token examples, examples
across Mamba chunk edges, a long one); and one bf16 train step of each family against fp32.
Exit status 1 when any fast path or bf16 step disagrees with its reference, 0 otherwise.

  overrides          config overrides as for training: trainer.device=cpu (the device checked),
                     model.attn_backend / model.mamba_backend (the backends of the train steps)
  --json FILE        the same report as JSON (`backends`, `steps`, `bench`, `environment`)
  --bench            also time a train step at real Granite widths per backend (tokens/s, MFU, peak)
  --peak-tflops X    the device's bf16 peak for MFU, where it is not a known GPU
  -h, --help         this help

On CPU, `TRITON_INTERPRET=1` (set before the command) makes the Triton Mamba kernels available
under Triton's interpreter, and they are checked too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from granite_train.errors import UserError


OPTIONS = {"json": None, "peak-tflops": None}


def _parse(args: List[str]) -> Tuple[List[str], Dict[str, Any]]:
    """(config overrides, {json: Path or None, bench: bool, peak: float or None})."""
    from granite_train.cli import split_options

    bench = "--bench" in args
    overrides, opts = split_options([a for a in args if a != "--bench"], OPTIONS,
                                    "granite_train.doctor takes --json FILE, --bench, --peak-tflops X and config overrides")
    peak = opts["peak-tflops"]
    if peak is not None:
        try:
            peak = float(peak)
        except ValueError:
            raise UserError(f"--peak-tflops {peak!r} is not a number of TFLOP/s") from None
    return overrides, {"json": None if opts["json"] is None else Path(opts["json"]), "bench": bench, "peak": peak}


def _fmt_err(err: Optional[float]) -> str:
    return "-" if err is None else f"{err:.1e}"


def _backend_line(r) -> str:
    head = f"{r.layer:<11} {r.name:<10}"
    auto = " [auto]" if r.picked_by_auto else ""
    if not r.available:
        return f"{head} unavailable: {r.reason}{auto}"
    if r.error is not None:
        return f"{head} FAILED: {r.error}{auto}"
    if r.max_rel_err is None:
        return f"{head} available (the reference){auto}"
    how = " (interpreted)" if r.interpreted else ""
    verdict = "ok" if r.ok else "DISAGREES"
    return (f"{head} available{how}: {r.dtype} max rel err {_fmt_err(r.max_rel_err)} "
            f"(<= {r.tolerance:g}) {verdict}{auto}")


def _step_line(s) -> str:
    backends = s.attn_backend + (f" + mamba {s.mamba_backend}" if s.mamba_backend else "")
    if s.error is not None:
        return f"bf16 step  {s.family:<17} FAILED: {s.error}"
    verdict = "ok" if s.ok else "DISAGREES"
    return (f"bf16 step  {s.family:<17} loss {s.loss_fp32:.4f} (fp32) vs {s.loss_bf16:.4f} (bf16): "
            f"rel err loss {_fmt_err(s.loss_rel_err)}, gradient {_fmt_err(s.grad_rel_err)} {verdict} ({backends})")


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0
    try:
        overrides, opts = _parse(args)
        from granite_train.cli import compose_config

        cfg = compose_config(overrides)
        from granite_train.parallel.env import pick_device

        device = pick_device(cfg.trainer.device)
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
    report = doctor(device, cfg.model.attn_backend, cfg.model.mamba_backend, bench=opts["bench"],
                    peak=opts["peak"], echo=print)
    if opts["json"] is not None:
        opts["json"].parent.mkdir(parents=True, exist_ok=True)
        opts["json"].write_text(json.dumps(report, indent=1) + "\n")
        print(f"report: {opts['json']}")
    return 0 if report["ok"] else 1


def doctor(device: torch.device, attn_backend: str = "auto", mamba_backend: str = "auto", bench: bool = False,
           peak: Optional[float] = None, echo=print) -> Dict[str, Any]:
    """Every check on `device`; `echo` gets one line per check as it finishes. Returns the
    report (what --json writes)."""
    from granite_train.doctor.backends import CPU_SHAPES, CUDA_SHAPES, backend_rows, check_parity
    from granite_train.doctor.environment import device_info, versions
    from granite_train.doctor.steps import check_steps

    found = versions()
    echo("versions   " + ", ".join(f"{k} {v or '-'}" for k, v in found.items()))
    info = device_info(device, peak)
    peak_s = f"{info['peak_bf16_tflops']:g} TFLOP/s bf16 peak" if info["peak_bf16_tflops"] else "bf16 peak unknown (--peak-tflops)"
    mem = f"{info['memory_gib']:.1f} GiB" if info.get("memory_gib") else "memory unknown"
    echo(f"device     {info['type']}: {info['name']} | {mem} | bf16 {'yes' if info['bf16'] else 'no'} | {peak_s}")
    rows = backend_rows(device)
    check_parity(rows, device)
    for r in rows:
        echo(_backend_line(r))
    shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    steps = check_steps(device, shapes.lengths, attn_backend, mamba_backend)
    for s in steps:
        echo(_step_line(s))
    bench_rows: List[Dict[str, Any]] = []
    if bench:
        from granite_train.doctor.bench import run_bench

        for row in run_bench(device, info["peak_bf16_tflops"], echo=echo):
            bench_rows.append(row)
    failed = [f"{r.layer} {r.name}" for r in rows if not r.ok] + [f"bf16 step {s.family}" for s in steps if not s.ok]
    echo(f"summary    {sum(r.available for r in rows)} of {len(rows)} backends available, "
         f"{sum(r.max_rel_err is not None for r in rows)} compared with the reference; "
         f"{len(steps)} bf16 steps; " + ("all agree" if not failed else f"DISAGREE: {', '.join(failed)}"))
    return {"ok": not failed, "environment": {"versions": found, "device": info},
            "backends": [{**dataclasses.asdict(r), "ok": r.ok} for r in rows],
            "steps": [{**dataclasses.asdict(s), "ok": s.ok} for s in steps],
            "bench": bench_rows, "failed": failed}
