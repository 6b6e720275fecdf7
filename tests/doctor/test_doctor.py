"""`python -m granite_train.doctor`: every backend of every layer kind reported (available with
its parity against the exact reference, or unavailable with the reason), one bf16 step of each
family against fp32, the JSON contract, and exit 1 when a fast path disagrees.

On CPU the Triton Mamba kernels are available under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so their parity is checked here too; the GPU-only kernels (flash-attn,
torch's varlen, causal-conv1d, grouped GEMM) are unavailable with a reason naming CUDA.
"""

import dataclasses
import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch

from granite_train.doctor import backends as doctor_backends
from granite_train.doctor.backends import BackendCheck, backend_rows, check_parity
from granite_train.doctor.run import main
from granite_train.doctor.steps import FAMILIES

from ..interpreted_triton import skip_or_fail_if_unavailable

CPU = torch.device("cpu")
KEYS = {"layer", "name", "available", "reason", "picked_by_auto", "max_rel_err"}


@pytest.mark.slow
def test_the_cpu_report_as_a_user_runs_it(tmp_path):
    """One real launch: every backend with its parity or its reason, the bf16 steps, exit 0."""
    skip_or_fail_if_unavailable()
    out = tmp_path / "doctor.json"
    proc = subprocess.run([sys.executable, "-m", "granite_train.doctor", "trainer.device=cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["layer"], r["name"]): r for r in report["backends"]}
    assert all(KEYS <= r.keys() for r in rows.values())
    assert {layer for layer, _ in rows} == {"attention", "mamba_conv", "mamba_scan", "gated_norm", "moe"}
    assert {name for layer, name in rows if layer == "attention"} == {"sdpa", "flash", "varlen"}
    for key in [("attention", "flash"), ("attention", "varlen"), ("mamba_conv", "cuda"), ("moe", "grouped_mm")]:
        assert not rows[key]["available"] and "CUDA device" in rows[key]["reason"], rows[key]
    for key in [("attention", "sdpa"), ("mamba_conv", "triton"), ("mamba_scan", "triton"), ("gated_norm", "triton")]:
        r = rows[key]
        assert r["available"] and r["max_rel_err"] is not None and r["max_rel_err"] <= 1e-5, r
    assert rows[("mamba_scan", "triton")]["interpreted"] is True
    picked = {layer: name for (layer, name), r in rows.items() if r["picked_by_auto"]}
    assert picked == {"attention": "sdpa", "mamba_conv": "torch", "mamba_scan": "torch", "gated_norm": "torch",
                      "moe": "loop"}
    assert [s["family"] for s in report["steps"]] == list(FAMILIES) and all(s["ok"] for s in report["steps"])
    assert all(0 < s["grad_rel_err"] < 5e-2 for s in report["steps"])  # bf16 did round, within bounds
    assert report["environment"]["versions"]["torch"] == importlib.metadata.version("torch")
    lines = proc.stdout.splitlines()
    assert any(line.startswith("attention   varlen     unavailable: needs a CUDA device") for line in lines)
    assert lines[-2].startswith("summary") and "all agree" in lines[-2]


def test_auto_picks_and_reasons_on_cpu_without_running_a_kernel():
    rows = backend_rows(CPU)
    assert all(isinstance(r, BackendCheck) for r in rows)
    for layer in ("attention", "mamba_conv", "mamba_scan", "gated_norm", "moe"):
        assert sum(r.picked_by_auto for r in rows if r.layer == layer) == 1, layer
    assert all(r.reason for r in rows if not r.available)


def test_a_fast_path_that_disagrees_fails_the_report(monkeypatch, capsys):
    """A kernel 1% off its reference: the line says so and the exit status is 1."""
    real = doctor_backends.causal_attention
    monkeypatch.setattr(doctor_backends, "causal_attention", lambda *a, **k: real(*a, **k) * 1.01)
    monkeypatch.setattr(doctor_backends, "_interpreted_triton", lambda: "not in this test")
    monkeypatch.setattr("granite_train.doctor.steps.FAMILIES", ("granite",))
    assert main(["trainer.device=cpu"]) == 1
    out = capsys.readouterr().out
    assert "attention   sdpa       available: float32 max rel err 1.0e-02 (<= 1e-05) DISAGREES [auto]" in out
    assert "DISAGREE: attention sdpa" in out


def test_a_kernel_that_raises_is_a_failed_check():
    rows = [BackendCheck("attention", "sdpa", True, None, True)]
    # 4 query heads over 3 KV heads: the GQA reshape raises
    check_parity(rows, CPU, shapes=dataclasses.replace(doctor_backends.CPU_SHAPES, attn_kv_heads=3))
    assert rows[0].error is not None and not rows[0].ok


@pytest.mark.parametrize("args, message", [
    (["--jsn", "x"], "unknown option '--jsn'; granite_train.doctor takes --json FILE"),
    (["--peak-tflops", "fast"], "--peak-tflops 'fast' is not a number"),
    (["--json"], "--json needs a value"),
])
def test_bad_options_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_bench_reports_each_family_with_the_json_fields(monkeypatch):
    """--bench's rows, on presets cut to a sliver of their width (the real ones take seconds
    per CPU step: python -m granite_train.doctor --bench)."""
    from granite_train.doctor import bench

    small = ["model.arch.hidden_size=64", "model.arch.intermediate_size=64", "model.arch.vocab_size=512",
             "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2"]
    presets = [("granite", "granite-3.3-2b", [*small, "model.arch.num_hidden_layers=1"], []),
               ("granitemoe", "powermoe-3b", [*small, "model.arch.num_hidden_layers=1",
                                               "model.arch.num_local_experts=4", "model.arch.num_experts_per_tok=2"], []),
               ("granitemoehybrid", "granite-4.0-h-tiny",
                [*small, "model.arch.num_hidden_layers=2", "model.arch.layer_types=[mamba,attention]",
                 "model.arch.num_local_experts=4", "model.arch.num_experts_per_tok=2", "model.arch.mamba_n_heads=4",
                 "model.arch.mamba_d_state=16", "model.arch.mamba_chunk_size=16", "model.arch.shared_intermediate_size=64"], [])]
    lines = []
    rows = bench.run_bench(CPU, peak=1.0, echo=lines.append, presets=presets, lengths=[40, 3, 21])
    assert [r["family"] for r in rows if r["dtype"] == "fp32"] == ["granite", "granitemoe", "granitemoehybrid"]
    for r in rows:
        assert {"family", "backend", "tokens_per_s", "mfu", "peak_gib"} <= r.keys() and "error" not in r, r
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_gib"] >= 0
    assert len(lines) == len(rows) and all("tokens/s" in line for line in lines)
