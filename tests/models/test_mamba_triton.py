"""The Mamba-2 fast path's real Triton kernels, run on CPU under Triton's interpreter.

What runs here is the kernel code GPU users run, not a fake: mamba-ssm's SSD scan
(`mamba_chunk_scan_combined`, forward and backward) and gated RMSNorm (`rmsnorm_fn`), and
fla-core's varlen causal conv1d (the "triton" backend's conv), each through our glue in
`granite_train.models.mamba_kernels` and against our exact PyTorch path. `TRITON_INTERPRET=1`
(set by tests/conftest.py before anything imports triton) makes `triton.jit` build interpreted
kernels that run on CPU tensors with numpy.

Install (CI does, .ci/run): `pip install -e '.[dev,triton-cpu]'` then
`MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation --no-deps
mamba-ssm==2.3.2.post1` (Python only; its setup cannot parse a CPU torch's CUDA version without
MAMBA_FORCE_BUILD, and its dependencies are GPU packages). Without them these tests skip, except
where GRANITE_TRAIN_KERNEL_TESTS=required (CI), where they fail. The shims that let the kernels
run on a CPU-only torch are in granite_train/doctor/interpreted.py.

Not checked here (no interpreter can): causal-conv1d (CUDA C++, the "cuda" backend's conv) and
bf16 (the interpreter's tl.dot multiplies bf16's raw bits: triton #11584).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from granite_train.models import GraniteForCausalLM
from granite_train.models import mamba_kernels
from granite_train.models import model as model_module
from granite_train.models.batch import SeqLayout
from granite_train.models.mamba import GatedRMSNorm, causal_conv1d_packed, ssd_chunked
from ..interpreted_triton import interpreted_kernels, skip_or_fail_if_unavailable
from .test_mamba import _cfg, _mixer

pytestmark = pytest.mark.triton_interpret

@pytest.fixture(scope="module")
def kernels():
    """The interpreted kernels, imported under the shims (granite_train/doctor/interpreted.py)."""
    skip_or_fail_if_unavailable()
    with interpreted_kernels():
        yield


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _seq_idx(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)


def _bounds(lengths):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return bounds


# ---------------------------------------------------------------- the SSD scan

H, P, G, N, CHUNK = 4, 16, 2, 16, 16


def _scan_inputs(lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).requires_grad_()

    x, dt = r(1, T, H, P), r(1, T, H)
    A = (-torch.rand(H, generator=g) - 0.5).requires_grad_()  # fp32, as the mixer passes it
    B, C = r(1, T, G, N, scale=0.5), r(1, T, G, N, scale=0.5)
    D, dt_bias = r(H).float().detach().requires_grad_(), r(H).float().detach().requires_grad_()
    return x, dt, A, B, C, D, dt_bias


def _reference_scan(x, dt, A, B, C, D, dt_bias, dt_limit, seq_idx):
    """Our PyTorch path in fp32 (what Mamba2Mixer._scan runs on the torch backend)."""
    d = F.softplus(dt.float() + dt_bias).clamp(*dt_limit)
    return ssd_chunked(x.float(), d, A, B.float(), C.float(), CHUNK, seq_idx) + D[:, None] * x.float()


@pytest.mark.parametrize("lengths, dt_limit", [
    # Three chunks at most: the interpreter's time grows with chunks x heads, and three chunks
    # already have examples that start in one and end in another.
    pytest.param([40], (0.0, float("inf")), marks=pytest.mark.slow),  # one example: no seq_idx, as the mixer passes it
    ([21, 10, 9], (0.0, float("inf"))),  # boundaries off chunk edges, examples across them
    pytest.param([16, 16, 16], (0.0, float("inf")), marks=pytest.mark.slow),  # boundaries on chunk edges
    pytest.param([1, 14, 2, 19, 4], (0.001, 0.1), marks=pytest.mark.slow),  # 1-token, < a chunk; dt clamped
], ids=["one-example", "off-edges", "on-edges", "short-examples-dt-limit"])
def test_chunk_scan_equals_torch_path(kernels, lengths, dt_limit):
    ins = _scan_inputs(lengths, torch.float32)
    seq = _seq_idx(lengths) if len(lengths) > 1 else None
    y = mamba_kernels.chunk_scan(*ins, dt_limit, CHUNK, seq)
    ref = _reference_scan(*ins, dt_limit, seq)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert _rel(y, ref) <= 1e-5
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(y, ins, dy)
    ref_grads = torch.autograd.grad(ref, ins, dy)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "dt_bias"), grads, ref_grads):
        assert _rel(a, b) <= 1e-5, name
    if seq is not None:  # the check has teeth: the kernel without the boundaries is far off
        leaky = mamba_kernels.chunk_scan(*ins, dt_limit, CHUNK, None)
        assert _rel(leaky, ref) > 1e-2


@pytest.mark.slow
def test_chunk_scan_fp16(kernels):
    lengths = [1, 14, 2, 19, 4]
    ins = _scan_inputs(lengths, torch.float16)
    seq = _seq_idx(lengths)
    y = mamba_kernels.chunk_scan(*ins, (0.0, float("inf")), CHUNK, seq)
    ref = _reference_scan(*ins, (0.0, float("inf")), seq)  # fp32 math on the same fp16 inputs
    assert y.dtype == torch.float16
    assert _rel(y, ref) <= 5e-3
    dy = torch.randn(ref.shape, dtype=torch.float16)
    grads = torch.autograd.grad(y, ins, dy)
    ref_grads = torch.autograd.grad(ref, ins, dy.float())
    for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "dt_bias"), grads, ref_grads):
        assert _rel(a, b) <= 1e-2, name


@pytest.mark.slow
def test_chunk_scan_deterministic_backward(kernels, monkeypatch):
    """torch.use_deterministic_algorithms (or MAMBA_DETERMINISTIC=1) swaps the backward's atomic
    adds for per-program partial sums: the other code path, the same gradients."""
    monkeypatch.setenv("MAMBA_DETERMINISTIC", "1")
    lengths = [21, 10, 9]
    ins = _scan_inputs(lengths, torch.float32, seed=3)
    seq = _seq_idx(lengths)
    y = mamba_kernels.chunk_scan(*ins, (0.0, float("inf")), CHUNK, seq)
    ref = _reference_scan(*ins, (0.0, float("inf")), seq)
    dy = torch.randn_like(ref)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "dt_bias"), torch.autograd.grad(y, ins, dy),
                          torch.autograd.grad(ref, ins, dy)):
        assert _rel(a, b) <= 1e-5, name


# ---------------------------------------------------------------- the conv (fla-core) and the norm

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("lengths", [[1, 3, 8, 13, 30, 2], [57]], ids=["packed", "one-example"])
def test_varlen_conv_equals_torch_path(kernels, dtype, tol, lengths):
    """In a slice of a wider projection (the mixer's xBC), as the mixer hands it over."""
    g = torch.Generator().manual_seed(1)
    T, C, K = sum(lengths), 96, 4
    zxbcdt = torch.randn(1, T, 16 + C + 8, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(C, 1, K, generator=g)).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(C, generator=g)).to(dtype).requires_grad_()
    packed = len(lengths) > 1
    bounds = _bounds(lengths)
    cu = torch.tensor(bounds, dtype=torch.int32) if packed else None
    out = mamba_kernels.conv_silu_varlen(zxbcdt[..., 16:16 + C], w, b, cu, bounds if packed else None)
    pos = (torch.arange(T) - torch.repeat_interleave(torch.tensor(bounds[:-1]), torch.tensor(lengths)))[None]
    ref = F.silu(causal_conv1d_packed(zxbcdt[..., 16:16 + C].float(), w.float(), b.float(),
                                      pos if packed else None))
    assert out.dtype == dtype and out.shape == ref.shape
    assert _rel(out, ref) <= tol
    dy = torch.randn(ref.shape, generator=g)
    for name, a, r in zip(("x", "weight", "bias"), torch.autograd.grad(out, (zxbcdt, w, b), dy.to(dtype)),
                          torch.autograd.grad(ref, (zxbcdt, w, b), dy)):
        assert _rel(a, r) <= tol * 2, name
    if packed:  # without the boundaries the conv reads the previous example
        leaky = mamba_kernels.conv_silu_varlen(zxbcdt[..., 16:16 + C], w, b, None, None)
        assert _rel(leaky, ref) > 1e-2


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_gated_rmsnorm_equals_torch_path(kernels, dtype, tol):
    g = torch.Generator().manual_seed(2)
    D, groups = 64, 2
    norm = GatedRMSNorm(D, D // groups, 1e-5)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(D, generator=g))
    y = torch.randn(1, 57, D, generator=g).to(dtype).requires_grad_()
    zxbcdt = torch.randn(1, 57, D + 40, generator=g).to(dtype).requires_grad_()
    z = zxbcdt[..., :D]  # a slice of in_proj's output, as in the mixer
    out = norm(y, z, "triton")
    ref = norm(y.float(), z.float(), "torch")
    assert out.dtype == dtype and _rel(out, ref) <= tol
    dy = torch.randn(ref.shape, generator=g)
    for name, a, r in zip(("y", "z", "weight"), torch.autograd.grad(out, (y, zxbcdt, norm.weight), dy.to(dtype)),
                          torch.autograd.grad(ref, (y, zxbcdt, norm.weight), dy)):
        assert _rel(a, r) <= tol * 2, name


# ---------------------------------------------------------------- the whole mixer and model

@pytest.mark.slow
def test_mixer_on_the_triton_backend_equals_torch_on_packed_rows(kernels):
    """Conv, scan and norm together: every output, every parameter and input gradient."""
    lengths = [1, 3, 8, 13, 2]  # 1, < d_conv, = chunk (8), not a multiple of it
    m = _mixer(mamba_chunk_size=8, time_step_limit=[0.01, 5.0])
    bounds = _bounds(lengths)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, bounds[-1], 32, generator=g)
    w = torch.randn(1, bounds[-1], 32, generator=g)
    results = {}
    for backend in ("torch", "triton"):
        m.zero_grad()
        xin = x.clone().requires_grad_()
        layout = SeqLayout(attn_backend="sdpa", mamba_backend=backend, bounds=bounds, max_seq_len=max(lengths),
                           cu_seq_lens=torch.tensor(bounds, dtype=torch.int32))
        out = m(xin, layout)
        (out * w).sum().backward()
        results[backend] = (out.detach(), xin.grad, {k: p.grad.clone() for k, p in m.named_parameters()})
    (out_t, gx_t, gp_t), (out_k, gx_k, gp_k) = results["torch"], results["triton"]
    assert _rel(out_k, out_t) <= 1e-5
    assert _rel(gx_k, gx_t) <= 1e-5
    for name in gp_t:
        assert _rel(gp_k[name], gp_t[name]) <= 1e-5, name


@pytest.mark.slow
def test_mixer_on_the_triton_backend_on_padded_rows(kernels):
    """[B, L] rows, one sequence each (the padded baseline): no boundaries reach the kernels."""
    m = _mixer(mamba_chunk_size=8)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(5))
    outs = {}
    for backend in ("torch", "triton"):
        m.zero_grad()
        out = m(x, SeqLayout(attn_backend="sdpa", mamba_backend=backend))
        out.square().sum().backward()
        outs[backend] = (out.detach(), {k: p.grad.clone() for k, p in m.named_parameters()})
    assert _rel(outs["triton"][0], outs["torch"][0]) <= 1e-5
    for name, ref in outs["torch"][1].items():
        assert _rel(outs["triton"][1][name], ref) <= 1e-5, name


@pytest.mark.slow
def test_hybrid_model_on_the_triton_backend_equals_torch(kernels, monkeypatch, caplog):
    """Through the model's own layout (a packed row with trailing filler), logged by name."""
    cfg = _cfg(layer_types=["mamba", "attention"], num_hidden_layers=2)
    torch.manual_seed(0)
    ref_model = GraniteForCausalLM(cfg, mamba_backend="torch")
    model = GraniteForCausalLM(cfg, mamba_backend="triton")
    model.load_state_dict(ref_model.state_dict())
    ids = torch.randint(0, 32, (1, 24))
    cu = torch.tensor([0, 1, 9, 19], dtype=torch.int32)  # tokens 19..23: filler
    real_resolve = model_module.resolve_mamba_backend
    monkeypatch.setattr(model_module, "resolve_mamba_backend",  # "triton" refuses a CPU device
                        lambda requested, device, d_conv: ("triton", None) if requested == "triton"
                        else real_resolve(requested, device, d_conv))
    with caplog.at_level(logging.INFO, logger="granite_train.models"):
        out = model(input_ids=ids, cu_seq_lens=cu)
        ref = ref_model(input_ids=ids, cu_seq_lens=cu)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mamba backend:")]
    assert len(lines) == 2 and "fla causal_conv1d" in lines[0] and "PyTorch reference" in lines[1]
    logits, ref_logits = out.logits, ref.logits
    assert _rel(logits, ref_logits) <= 1e-5
    dy = torch.randn(ref_logits.shape)
    (logits * dy).sum().backward()
    (ref_logits * dy).sum().backward()
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert _rel(p.grad, ref_grads[name].grad) <= 1e-5, name
