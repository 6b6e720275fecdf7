"""Mamba-2 backends: the CUDA-kernel glue (against fake kernels on CPU), backend selection, and,
on a CUDA machine with the packages, the real kernels against the PyTorch reference. The Triton
kernels (scan, gated norm, fla-core's conv) also run for real on CPU, under Triton's interpreter:
test_mamba_triton.py; causal-conv1d (CUDA C++) only has the fake here.

The fakes implement the kernels' documented contracts independently (per-example conv, per-token
recurrence) and assert the argument layout the real kernels require: that checks our plumbing
(shapes, seq_idx dtype, channel-last strides, keyword names, where softplus/clamp/D happen).
"""

import importlib.util
import logging
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from granite_train.errors import UserError
from granite_train.models import GraniteForCausalLM
from granite_train.models import mamba_kernels
from granite_train.models.batch import SeqLayout
from .test_mamba import _cfg, _mixer  # the same tiny mixer as the exactness tests

LENGTHS = [1, 3, 8, 13, 30, 2]  # 1, < d_conv, = chunk, not a multiple of the chunk

HAS_KERNELS = (torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None
               and importlib.util.find_spec("causal_conv1d") is not None)
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="needs CUDA, mamba-ssm and causal-conv1d")


# ---------------------------------------------------------------- fake kernels (documented contracts)

def fake_causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None,
                          return_final_states=False, final_states_out=None, activation=None):
    """causal-conv1d: x [batch, dim, seqlen], weight [dim, width]; out like x."""
    assert x.dim() == 3
    batch, dim, seqlen = x.shape
    assert weight.dim() == 2 and weight.shape[0] == dim and 2 <= weight.shape[1] <= 4
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if bias is not None:
        assert bias.shape == (dim,) and bias.dtype == weight.dtype
    assert activation in (None, "silu", "swish")
    assert initial_states is None and not return_final_states
    if seq_idx is not None:
        assert seq_idx.dtype == torch.int32 and seq_idx.shape == (batch, seqlen) and seq_idx.is_contiguous()
        # seq_idx only with the channel-last layout, whose strides must be multiples of 8
        assert x.stride(1) == 1, "seq_idx is only supported for channel last layout"
        assert dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now"
        assert x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0
    width = weight.shape[1]
    xf, wf = x.double(), weight.double()
    cols = []
    for t in range(seqlen):
        acc = torch.zeros(batch, dim, dtype=torch.float64) if bias is None else bias.double().expand(batch, dim)
        for j in range(width):  # weight[:, j] multiplies x[t - (width - 1 - j)]
            s = t - (width - 1 - j)
            if s < 0:
                continue
            term = wf[:, j] * xf[:, :, s]
            if seq_idx is not None:
                term = term * (seq_idx[:, s] == seq_idx[:, t]).double()[:, None]
            acc = acc + term
        cols.append(acc)
    out = torch.stack(cols, dim=-1)
    if activation is not None:
        out = F.silu(out)
    fake_causal_conv1d_fn.calls += 1
    return out.to(x.dtype)


fake_causal_conv1d_fn.calls = 0


def fake_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None,
                                   initial_states=None, seq_idx=None, dt_softplus=False,
                                   dt_limit=(0.0, float("inf")), return_final_states=False):
    """mamba-ssm: per-token recurrence; dt -> clamp(softplus(dt + dt_bias), dt_limit); + D x."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    assert dt.shape == (b, l, h) and A.shape == (h,) and B.shape == (b, l, g, n) and C.shape == B.shape
    assert h % g == 0 and isinstance(chunk_size, int) and chunk_size > 0
    assert D is None or D.shape in ((h,), (h, p))
    assert dt_bias is None or dt_bias.shape == (h,)
    assert initial_states is None and not return_final_states
    assert isinstance(dt_limit, tuple) and len(dt_limit) == 2
    if seq_idx is not None:
        assert seq_idx.dtype == torch.int32 and seq_idx.shape == (b, l)
    dtf = dt.double()
    if dt_bias is not None:
        dtf = dtf + dt_bias.double()
    if dt_softplus:
        dtf = torch.where(dtf <= 20.0, F.softplus(dtf), dtf)
    dtf = dtf.clamp(dt_limit[0], dt_limit[1])
    Bh = B.double().repeat_interleave(h // g, dim=2)
    Ch = C.double().repeat_interleave(h // g, dim=2)
    xf = x.double()
    state = torch.zeros(b, h, p, n, dtype=torch.float64)
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        decay = torch.exp(dtf[:, t] * A.double())[..., None, None]
        state = state * decay + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        Dd = D.double()
        y = y + (Dd[:, None] if Dd.dim() == 1 else Dd) * xf
    if z is not None:
        y = y * F.silu(z.double())
    fake_mamba_chunk_scan_combined.calls += 1
    return y.to(x.dtype)


fake_mamba_chunk_scan_combined.calls = 0


def fake_rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """mamba-ssm's gated RMSNorm: weight * rms_norm(x * silu(z)) per group (norm_before_gate=False)."""
    assert bias is None and z is not None and z.shape == x.shape and not norm_before_gate
    assert x.stride(-1) == 1 and z.stride(-1) == 1 and weight.shape == (x.shape[-1],)
    assert isinstance(group_size, int) and x.shape[-1] % group_size == 0
    h = x.double() * F.silu(z.double())
    hg = h.view(*h.shape[:-1], -1, group_size)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    fake_rmsnorm_fn.calls += 1
    return (weight.double() * hg.view(h.shape)).to(x.dtype)


fake_rmsnorm_fn.calls = 0


@pytest.fixture
def fake_kernels(monkeypatch):
    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn = fake_causal_conv1d_fn
    monkeypatch.setitem(sys.modules, "causal_conv1d", conv)
    ssd = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    ssd.mamba_chunk_scan_combined = fake_mamba_chunk_scan_combined
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.ssd_combined", ssd)
    norm = types.ModuleType("mamba_ssm.ops.triton.layernorm_gated")
    norm.rmsnorm_fn = fake_rmsnorm_fn
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.layernorm_gated", norm)
    fake_causal_conv1d_fn.calls = fake_mamba_chunk_scan_combined.calls = fake_rmsnorm_fn.calls = 0
    yield


# ---------------------------------------------------------------- helpers



def _layout(lengths, backend, device="cpu"):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return SeqLayout(attn_backend="sdpa", mamba_backend=backend,
                     cu_seq_lens=torch.tensor(bounds, dtype=torch.int32, device=device), bounds=bounds,
                     max_seq_len=max(lengths))


def _run(m, x, layout, w):
    m.zero_grad()
    x = x.clone().requires_grad_()
    out = m(x, layout)
    (out.float() * w).sum().backward()
    return out.detach(), x.grad, {k: p.grad.clone() for k, p in m.named_parameters()}


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- glue against fakes (CPU)

@pytest.mark.parametrize("kw", [
    dict(),                                                   # n_groups 2, in_proj width 164 (not 8k)
    dict(mamba_n_groups=1, mamba_d_state=5),                  # conv channels 74: the padded-channel route
    dict(mamba_n_groups=1, mamba_d_state=3, mamba_n_heads=2),  # channels 70 but in_proj width 136 = 8k
    dict(mamba_chunk_size=4, time_step_limit=[0.05, 2.0]),    # dt clamp inside the kernel
    dict(mamba_d_conv=2, mamba_n_heads=8, mamba_chunk_size=64),
])
def test_cuda_glue_equals_torch_path_on_packed_rows(fake_kernels, kw):
    m = _mixer(**kw)
    g = torch.Generator().manual_seed(1)
    T = sum(LENGTHS)
    x = torch.randn(1, T, 32, generator=g)
    w = torch.randn(1, T, 32, generator=g)
    out_t, dx_t, grads_t = _run(m, x, _layout(LENGTHS, "torch"), w)
    assert fake_causal_conv1d_fn.calls == fake_mamba_chunk_scan_combined.calls == fake_rmsnorm_fn.calls == 0
    out_k, dx_k, grads_k = _run(m, x, _layout(LENGTHS, "cuda"), w)
    assert fake_causal_conv1d_fn.calls == fake_mamba_chunk_scan_combined.calls == fake_rmsnorm_fn.calls == 1
    assert (out_k - out_t).abs().max().item() <= 1e-5
    assert (dx_k - dx_t).abs().max().item() <= 1e-5
    for k in grads_t:  # dt_bias, D, A_log, conv weight/bias reach the kernels as parameters
        assert _rel(grads_k[k], grads_t[k]) <= 1e-5, k


def test_cuda_glue_on_padded_rows_passes_no_seq_idx(fake_kernels, monkeypatch):
    m = _mixer()
    seen = []
    conv, scan = fake_causal_conv1d_fn, fake_mamba_chunk_scan_combined

    def conv_spy(*a, **k):
        seen.append(("conv", k.get("seq_idx")))
        return conv(*a, **k)

    def scan_spy(*a, **k):
        seen.append(("scan", k.get("seq_idx")))
        return scan(*a, **k)

    monkeypatch.setattr(sys.modules["causal_conv1d"], "causal_conv1d_fn", conv_spy)
    monkeypatch.setattr(sys.modules["mamba_ssm.ops.triton.ssd_combined"], "mamba_chunk_scan_combined", scan_spy)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(2))
    ref = m(x, SeqLayout(attn_backend="sdpa", mamba_backend="torch"))
    out = m(x, SeqLayout(attn_backend="sdpa", mamba_backend="cuda"))
    assert seen == [("conv", None), ("scan", None)]
    assert (out - ref).abs().max().item() <= 1e-5


def test_conv_glue_hands_the_kernel_a_channel_last_view(fake_kernels, monkeypatch):
    """When in_proj's width is a multiple of 8, x goes to the kernel as a view: no copy."""
    captured = {}

    def spy(x, weight, bias=None, **k):
        captured["x"] = x
        return fake_causal_conv1d_fn(x, weight, bias, **k)

    monkeypatch.setattr(sys.modules["causal_conv1d"], "causal_conv1d_fn", spy)
    zxbcdt = torch.randn(1, 9, 16 + 24 + 8)  # width 48
    xBC = zxbcdt[..., 16:40]
    w, b = torch.randn(24, 1, 4), torch.randn(24)
    seq = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    out = mamba_kernels.conv_silu(xBC, w, b, seq)
    assert captured["x"].data_ptr() == xBC.data_ptr() and captured["x"].stride() == (48 * 9, 1, 48)
    assert out.shape == xBC.shape


# ---------------------------------------------------------------- backend selection

def test_auto_on_cpu_is_torch_logged_once_and_kernels_never_imported(caplog):
    cfg = _cfg(layer_types=["mamba", "attention"], num_hidden_layers=2)
    model = GraniteForCausalLM(cfg, mamba_backend="auto")
    ids = torch.randint(0, 32, (1, 12))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with caplog.at_level(logging.INFO, logger="granite_train.models"):
        model(input_ids=ids, cu_seq_lens=cu)
        model(input_ids=ids, cu_seq_lens=cu)
    lines = [r for r in caplog.records if r.getMessage().startswith("mamba backend:")]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "PyTorch reference" in lines[0].getMessage() and "device cpu" in lines[0].getMessage()
    assert "mamba_ssm" not in sys.modules and "causal_conv1d" not in sys.modules


def test_no_mamba_line_for_models_without_mamba_layers(caplog):
    cfg = _cfg(layer_types=["attention"])
    model = GraniteForCausalLM(cfg, mamba_backend="cuda")  # irrelevant without Mamba layers: no error
    with caplog.at_level(logging.INFO, logger="granite_train.models"):
        model(input_ids=torch.randint(0, 32, (1, 6)))
    assert not [r for r in caplog.records if r.getMessage().startswith("mamba backend:")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_fast_backend_on_cpu_is_one_clear_user_error(backend):
    model = GraniteForCausalLM(_cfg(), mamba_backend=backend)
    with pytest.raises(UserError) as err:
        model(input_ids=torch.randint(0, 32, (1, 6)))
    msg = str(err.value)
    assert "\n" not in msg and "needs a CUDA device" in msg and "model.mamba_backend=auto" in msg
    assert "granite-train[gpu]" in msg


def test_cuda_device_without_packages(monkeypatch, caplog):
    monkeypatch.setattr(mamba_kernels.importlib.util, "find_spec", lambda name, *a: None)
    cuda = torch.device("cuda")
    for requested in ("cuda", "triton"):
        with pytest.raises(UserError) as err:
            mamba_kernels.resolve_mamba_backend(requested, cuda, 4)
        assert "\n" not in str(err.value) and "pip install 'granite-train[gpu]'" in str(err.value)
        assert "model.mamba_backend=auto" in str(err.value) and "mamba-ssm" in str(err.value)
    # auto on a CUDA device without the packages: torch, with a warning (once per device)
    model = GraniteForCausalLM(_cfg(), mamba_backend="auto")
    with caplog.at_level(logging.INFO, logger="granite_train.models"):
        assert model._resolve_mamba_backend(cuda) == "torch"
        assert model._resolve_mamba_backend(cuda) == "torch"
    lines = [r for r in caplog.records if r.getMessage().startswith("mamba backend:")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    msg = lines[0].getMessage()
    assert "NOT the fast kernels" in msg and "granite-train[gpu]" in msg
    assert "causal-conv1d" in msg and "fla-core" in msg  # what each fast backend lacks


@pytest.mark.parametrize("present, auto", [
    ({"mamba_ssm", "causal_conv1d", "fla"}, "cuda"),  # causal-conv1d first: the known kernel
    ({"mamba_ssm", "fla"}, "triton"),                  # no causal-conv1d build: all Triton
    ({"mamba_ssm", "causal_conv1d"}, "cuda"),
    ({"causal_conv1d", "fla"}, "torch"),               # no scan kernel, no fast path
])
def test_auto_picks_the_first_installed_fast_backend(monkeypatch, present, auto):
    monkeypatch.setattr(mamba_kernels.importlib.util, "find_spec",
                        lambda name, *a: object() if name in present else None)
    monkeypatch.setattr(mamba_kernels, "import_error", lambda backend: None)
    backend, why = mamba_kernels.resolve_mamba_backend("auto", torch.device("cuda"), 4)
    assert backend == auto and (why is None) == (auto != "torch")


def test_cuda_device_with_packages_and_unsupported_width(monkeypatch):
    monkeypatch.setattr(mamba_kernels.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(mamba_kernels, "import_error", lambda backend: None)
    cuda = torch.device("cuda")
    assert mamba_kernels.resolve_mamba_backend("cuda", cuda, 4) == ("cuda", None)
    assert mamba_kernels.resolve_mamba_backend("triton", cuda, 4) == ("triton", None)
    assert mamba_kernels.resolve_mamba_backend("torch", cuda, 4) == ("torch", None)
    # width 5: causal_conv1d_fn has no kernel, fla's Triton conv takes any width
    assert mamba_kernels.resolve_mamba_backend("auto", cuda, 5) == ("triton", None)
    assert mamba_kernels.resolve_mamba_backend("triton", cuda, 5) == ("triton", None)
    with pytest.raises(UserError, match="mamba_d_conv=5"):
        mamba_kernels.resolve_mamba_backend("cuda", cuda, 5)
    present = {"mamba_ssm", "causal_conv1d"}
    monkeypatch.setattr(mamba_kernels.importlib.util, "find_spec",
                        lambda name, *a: object() if name in present else None)
    backend, why = mamba_kernels.resolve_mamba_backend("auto", cuda, 5)
    assert backend == "torch" and "mamba_d_conv=5" in why and "fla-core not installed" in why


def test_a_findable_package_that_does_not_import_falls_back_with_the_reason(monkeypatch):
    """mamba-ssm installed without its CUDA build: findable, but its __init__ fails to import."""
    monkeypatch.setattr(mamba_kernels.importlib.util, "find_spec", lambda name, *a: object())

    def failing_import(name):
        raise ImportError("libselective_scan_cuda.so: cannot open shared object file")

    monkeypatch.setattr(mamba_kernels.importlib, "import_module", failing_import)
    backend, why = mamba_kernels.resolve_mamba_backend("auto", torch.device("cuda"), 4)
    assert backend == "torch" and "libselective_scan_cuda.so" in why
    with pytest.raises(UserError, match="import mamba_ssm.ops.triton.ssd_combined failed"):
        mamba_kernels.resolve_mamba_backend("triton", torch.device("cuda"), 4)


def test_unknown_backend_is_a_config_error():
    from granite_train.config import RunConfig, validate

    cfg = RunConfig()
    cfg.model.mamba_backend = "tilelang"
    with pytest.raises(UserError, match="model.mamba_backend='tilelang' is not one of auto, torch, cuda, triton"):
        validate(cfg)
    with pytest.raises(UserError, match="mamba_backend='tilelang'"):
        GraniteForCausalLM(_cfg(), mamba_backend="tilelang")


# ---------------------------------------------------------------- real kernels (CUDA only)

def _backend_runs(backend):
    return torch.cuda.is_available() and mamba_kernels.kernels_installed(backend)


@pytest.mark.parametrize("backend", [
    pytest.param("cuda", marks=pytest.mark.skipif(not _backend_runs("cuda"), reason="needs CUDA, mamba-ssm, causal-conv1d")),
    pytest.param("triton", marks=pytest.mark.skipif(not _backend_runs("triton"), reason="needs CUDA, mamba-ssm, fla-core")),
])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kw", [dict(), dict(mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=16),
                                dict(mamba_d_conv=3, time_step_limit=[0.05, 2.0])])
def test_real_kernels_match_torch_on_packed_rows(backend, dtype, tol, kw):
    m = _mixer(**kw).cuda()
    g = torch.Generator().manual_seed(1)
    T = sum(LENGTHS)
    x = torch.randn(1, T, 32, generator=g).cuda()
    w = torch.randn(1, T, 32, generator=g).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out_t, dx_t, grads_t = _run(m, x, _layout(LENGTHS, "torch", "cuda"), w)
        out_k, dx_k, grads_k = _run(m, x, _layout(LENGTHS, backend, "cuda"), w)
    assert _rel(out_k, out_t) <= tol
    assert _rel(dx_k, dx_t) <= tol
    for k in grads_t:
        assert _rel(grads_k[k], grads_t[k]) <= tol, k


@needs_kernels
def test_real_kernels_resolve_and_packed_equals_per_example():
    m = _mixer().cuda()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, n, 32, generator=g).cuda() for n in LENGTHS]
    packed = m(torch.cat(xs, dim=1), _layout(LENGTHS, "cuda", "cuda"))
    alone = torch.cat([m(x, SeqLayout(attn_backend="sdpa", mamba_backend="cuda")) for x in xs], dim=1)
    assert _rel(packed, alone) <= 1e-3
    assert mamba_kernels.resolve_mamba_backend("auto", torch.device("cuda"), 4) == ("cuda", None)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="needs CUDA and flash-attn")
def test_flash_varlen_matches_sdpa_loop():
    from granite_train.models.attention import causal_attention

    g = torch.Generator().manual_seed(0)
    lengths = [1, 7, 64, 33, 200]
    T, H, K, D = sum(lengths), 8, 2, 64
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    q = torch.randn(1, T, H, D, generator=g).cuda().bfloat16().requires_grad_()
    k = torch.randn(1, T, K, D, generator=g).cuda().bfloat16().requires_grad_()
    v = torch.randn(1, T, K, D, generator=g).cuda().bfloat16().requires_grad_()
    dout = torch.randn(1, T, H, D, generator=g).cuda().bfloat16()
    results = {}
    for backend in ("sdpa", "flash"):
        layout = SeqLayout(attn_backend=backend, cu_seq_lens=cu, bounds=bounds, max_seq_len=max(lengths))
        q.grad = k.grad = v.grad = None
        o = causal_attention(q, k, v, 0.125, layout)
        o.backward(dout)
        results[backend] = (o.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone())
    for a, b in zip(results["flash"], results["sdpa"]):
        assert _rel(a, b) <= 2e-2


def test_backend_is_passed_through_build_and_load(tmp_path):
    from granite_train.models import build_model, load_model, save_model

    model = build_model(_cfg(), mamba_backend="torch")
    assert model.mamba_backend == "torch"
    save_model(model, tmp_path / "ckpt")
    assert load_model(tmp_path / "ckpt", mamba_backend="cuda").mamba_backend == "cuda"
    assert load_model(tmp_path / "ckpt").mamba_backend == "auto"


def test_a_mamba_ssm_without_its_cuda_extension_still_gives_its_triton_kernels():
    """The install this CPU has (MAMBA_SKIP_CUDA_BUILD=TRUE, benchmarks/device_check.sh's too):
    `import mamba_ssm` fails on selective_scan_cuda, the Triton kernel modules import anyway."""
    pytest.importorskip("triton")
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm is not installed (README, 'Run the tests')")
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "try:\n    import mamba_ssm\nexcept ImportError as e:\n    print('package fails:', e.name)\n"
            "from granite_train.models.mamba_kernels import mamba_triton_importable\n"
            "mamba_triton_importable(); mamba_triton_importable()\n"
            "from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined\n"
            "from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn\nprint('kernels import')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "package fails: selective_scan_cuda" in proc.stdout and "kernels import" in proc.stdout
    assert proc.stdout.count("without its CUDA extension") == 1  # logged once
