"""Mamba-2 mixer alone: chunked SSD against a per-token recurrence, packed rows against examples."""

import pytest
import torch
import torch.nn.functional as F

from granite_train.models import GraniteConfig
from granite_train.models.batch import SeqLayout
from granite_train.models.mamba import Mamba2Mixer, causal_conv1d_packed, ssd_chunked

LENGTHS = [1, 3, 8, 13, 30, 2]  # 1, < d_conv, = chunk, not a multiple of the chunk


def _cfg(**kw):
    d = dict(model_type="granitemoehybrid", vocab_size=32, hidden_size=32, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, num_local_experts=0, shared_intermediate_size=16,
             layer_types=["mamba"], mamba_n_heads=4, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
             mamba_expand=2, mamba_chunk_size=8)
    d.update(kw)
    return GraniteConfig(**d)


def _mixer(seed=0, **kw):
    torch.manual_seed(seed)
    m = Mamba2Mixer(_cfg(**kw))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("in_proj.weight", "out_proj.weight"):
                p.normal_(0.0, 0.2)
            elif name in ("dt_bias", "D", "norm.weight", "conv1d.bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif name == "A_log":
                p.add_(0.5 * torch.randn_like(p))
    return m


def _layout(lengths):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return SeqLayout(attn_backend="sdpa", cu_seq_lens=torch.tensor(bounds, dtype=torch.int32), bounds=bounds,
                     max_seq_len=max(lengths))


def _unpacked():
    return SeqLayout(attn_backend="sdpa")


def _naive_scan(x_BTHP, dt_BTH, A_H, B_BTGN, C_BTGN):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = C_t h_t (one token at a time)."""
    Bsz, T, H, P = x_BTHP.shape
    G = B_BTGN.shape[2]
    Bh = B_BTGN.repeat_interleave(H // G, dim=2)
    Ch = C_BTGN.repeat_interleave(H // G, dim=2)
    h = torch.zeros(Bsz, H, P, B_BTGN.shape[3], dtype=torch.float64)
    ys = []
    for t in range(T):
        decay = torch.exp(dt_BTH[:, t] * A_H)[..., None, None]
        h = h * decay + (dt_BTH[:, t, :, None] * x_BTHP[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("T, chunk", [(1, 8), (7, 8), (8, 8), (29, 8), (29, 4), (29, 64)])
def test_ssd_chunked_matches_recurrence(T, chunk):
    g = torch.Generator().manual_seed(T)
    H, P, G, N = 4, 3, 2, 5
    x = torch.randn(2, T, H, P, generator=g, dtype=torch.float64)
    dt = F.softplus(torch.randn(2, T, H, generator=g, dtype=torch.float64))
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 3
    B = torch.randn(2, T, G, N, generator=g, dtype=torch.float64)
    C = torch.randn(2, T, G, N, generator=g, dtype=torch.float64)
    ours = ssd_chunked(x.float(), dt.float(), A.float(), B.float(), C.float(), chunk)
    ref = _naive_scan(x, dt, A, B, C)
    assert (ours.double() - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("chunk", [4, 8, 16])
def test_ssd_chunked_restarts_at_every_boundary(chunk):
    g = torch.Generator().manual_seed(0)
    H, P, G, N = 4, 3, 2, 5
    T = sum(LENGTHS)
    x, dt = torch.randn(1, T, H, P, generator=g), F.softplus(torch.randn(1, T, H, generator=g))
    A = -torch.rand(H, generator=g) * 3
    B, C = torch.randn(1, T, G, N, generator=g), torch.randn(1, T, G, N, generator=g)
    seq_idx = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS)).unsqueeze(0)
    packed = ssd_chunked(x, dt, A, B, C, chunk, seq_idx)
    start = 0
    for n in LENGTHS:
        s = slice(start, start + n)
        alone = ssd_chunked(x[:, s], dt[:, s], A, B[:, s], C[:, s], chunk)
        # exact math; chunk alignment differs, so only fp32 rounding (relative) remains
        assert (packed[:, s] - alone).abs().max().item() <= 1e-6 * max(1.0, alone.abs().max().item())
        start += n


def test_conv_never_reads_across_examples():
    g = torch.Generator().manual_seed(0)
    T, Cc, K = sum(LENGTHS), 6, 4
    x = torch.randn(1, T, Cc, generator=g)
    w, b = torch.randn(Cc, 1, K, generator=g), torch.randn(Cc, generator=g)
    _, pos = _layout(LENGTHS).segments(x.device)
    packed = causal_conv1d_packed(x, w, b, pos)
    start = 0
    for n in LENGTHS:
        alone = causal_conv1d_packed(x[:, start:start + n], w, b, None)  # F.conv1d, zero left padding
        assert (packed[:, start:start + n] - alone).abs().max().item() <= 1e-6
        start += n


@pytest.mark.parametrize("chunk", [4, 8, 64])
@pytest.mark.parametrize("time_step_limit", [[0.0, float("inf")], [0.05, 2.0]])
def test_mixer_packed_equals_per_example(chunk, time_step_limit):
    m = _mixer(mamba_chunk_size=chunk, time_step_limit=time_step_limit)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, n, 32, generator=g) for n in LENGTHS]
    w = [torch.randn(1, n, 32, generator=g) for n in LENGTHS]  # a loss weighting every output

    m.zero_grad()
    packed_in = torch.cat(xs, dim=1).requires_grad_()
    out = m(packed_in, _layout(LENGTHS))
    (out * torch.cat(w, dim=1)).sum().backward()
    grads_packed = {k: p.grad.clone() for k, p in m.named_parameters()}

    m.zero_grad()
    outs, in_grads = [], []
    for x, wi in zip(xs, w):
        x = x.clone().requires_grad_()
        o = m(x, _unpacked())
        (o * wi).sum().backward()
        outs.append(o.detach())
        in_grads.append(x.grad)
    assert (out.detach() - torch.cat(outs, dim=1)).abs().max().item() <= 1e-5
    assert (packed_in.grad - torch.cat(in_grads, dim=1)).abs().max().item() <= 1e-5
    for k, p in m.named_parameters():
        rel = ((grads_packed[k] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
        assert rel <= 1e-5, (k, rel)


def test_mixer_padded_rows_run_per_row():
    m = _mixer()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 13, 32, generator=g)
    with torch.no_grad():
        batch = m(x, _unpacked())
        for i in range(3):
            assert (batch[i] - m(x[i:i + 1], _unpacked())[0]).abs().max().item() <= 1e-5
