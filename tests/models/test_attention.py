"""Packed attention: which SDPA kernel the per-example loop reaches on CPU, and that it is exact."""

import dataclasses

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from granite_train.models.attention import causal_attention
from granite_train.models.batch import SeqLayout

LENGTHS = [7, 1, 40, 12]


def _qkv(T, H=4, K=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, T, n, D, generator=g, requires_grad=True) for n in (H, K, K)]


def _packed_layout(lengths):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return SeqLayout(attn_backend="sdpa", cu_seq_lens=torch.tensor(bounds, dtype=torch.int32),
                     bounds=bounds, max_seq_len=max(lengths))


def test_packed_sdpa_takes_the_cpu_flash_kernel_not_the_math_path():
    # 3-D [H, S, D] inputs silently fall back to the math path (the [H, S, S] scores in memory,
    # 3.8x slower at S=1,600); the packed loop must hand SDPA 4-D views.
    q, k, v = _qkv(sum(LENGTHS))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        causal_attention(q, k, v, 0.25, _packed_layout(LENGTHS)).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in ops, sorted(ops)
    assert not any("attention_math" in op for op in ops), sorted(ops)


def test_packed_equals_each_example_alone():
    T = sum(LENGTHS)
    q, k, v = _qkv(T)
    out = causal_attention(q, k, v, 0.25, _packed_layout(LENGTHS))
    start = 0
    for n in LENGTHS:
        qs, ks, vs = (t[:, start:start + n].transpose(1, 2) for t in (q, k, v))
        # the math reference: softmax(q k^T * scale + causal mask) v, GQA by repeating k/v heads
        ks, vs = ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1)
        scores = qs @ ks.transpose(-1, -2) * 0.25
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        ref = (scores.softmax(-1) @ vs).transpose(1, 2)
        torch.testing.assert_close(out[:, start:start + n], ref, rtol=1e-5, atol=1e-6)
        start += n


# ---- model.attn_backend=varlen: torch's varlen flash attention (CUDA only), its glue on CPU

def fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch.nn.attention.varlen.varlen_attn's signature (torch 2.13) and contract, in fp32 math:
    [T, H, D] in and out, segment i's queries attend to its keys, the causal window aligned at
    the last query and key (bottom right); GQA only with enable_gqa."""
    assert query.dim() == key.dim() == 3 and cu_seq_q.dtype == cu_seq_k.dtype == torch.int32
    assert window_size == (-1, 0), window_size  # causal
    if key.shape[1] != query.shape[1]:
        assert enable_gqa, "GQA inputs without enable_gqa"
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    for (qs, qe), (ks, ke) in zip(zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()),
                                  zip(cu_seq_k[:-1].tolist(), cu_seq_k[1:].tolist())):
        assert qe - qs <= max_q and ke - ks <= max_k
        q, k, v = query[qs:qe].transpose(0, 1), key[ks:ke].transpose(0, 1), value[ks:ke].transpose(0, 1)
        scores = q @ k.transpose(-1, -2) * scale
        n_q, n_k = qe - qs, ke - ks
        future = torch.ones(n_q, n_k, dtype=torch.bool).triu(n_k - n_q + 1)  # bottom-right causal
        outs.append((scores.masked_fill(future, float("-inf")).softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outs)


def fake_varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                          is_causal=False):
    """torch 2.10's signature: causal as a flag, no GQA, no scale (1/sqrt(D))."""
    assert is_causal and key.shape[1] == query.shape[1]
    return fake_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))


@pytest.fixture(params=["torch-2.13", "torch-2.10"])
def fake_varlen(request, monkeypatch):
    import torch.nn.attention.varlen as varlen

    from granite_train.models import attention

    monkeypatch.setattr(varlen, "varlen_attn",
                        fake_varlen_attn if request.param == "torch-2.13" else fake_varlen_attn_2_10)
    # the kernels take fp16/bf16 only: widened to fp32 to check the glue at fp32 tolerances
    monkeypatch.setattr(attention, "FUSED_DTYPES", (torch.float32,))


def _with_backend(layout, backend):
    return dataclasses.replace(layout, attn_backend=backend)


def _out_and_grads(q, k, v, scale, layout, upstream):
    out = causal_attention(q, k, v, scale, layout)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    return out, grads


def test_varlen_glue_equals_the_sdpa_loop_on_packed_rows(fake_varlen):
    q, k, v = _qkv(sum(LENGTHS))
    layout = _packed_layout(LENGTHS)
    upstream = torch.randn(1, sum(LENGTHS), 4, 16, generator=torch.Generator().manual_seed(1))
    ref, ref_grads = _out_and_grads(q, k, v, 0.3, layout, upstream)
    out, grads = _out_and_grads(q, k, v, 0.3, _with_backend(layout, "varlen"), upstream)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_varlen_glue_on_a_context_parallel_slice(fake_varlen):
    """Rank 1 of 2 over a row whose second example began in rank 0's slice: its queries attend to
    keys from the gathered row, more keys than queries, the mask aligned bottom right."""
    from granite_train.models.attention import _context_key_ranges, _fused_context, _sdpa_segments
    from granite_train.parallel.context_parallel import shard_row

    lengths, T = [5, 30, 3, 26], 64
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    ids = torch.arange(1, T + 1).unsqueeze(0)
    _, shard = shard_row(ids, ids.clone(), torch.tensor(bounds, dtype=torch.int32), 1, 2, T // 2)
    from granite_train.models import context as cp_geometry

    local = cp_geometry.local_bounds(shard)
    layout = SeqLayout(attn_backend="varlen", bounds=local, max_seq_len=max(b - a for a, b in zip(local, local[1:])),
                       context=shard, cu_seq_lens=torch.tensor(local, dtype=torch.int32))
    q_local, k_all, v_all = _qkv(T // 2)[0], *_qkv(T, seed=1)[1:]
    ranges = _context_key_ranges(layout)
    assert ranges[0][1][1] - ranges[0][1][0] > ranges[0][0][1] - ranges[0][0][0]  # reaches back
    ref = _sdpa_segments(q_local, k_all, v_all, 0.3, ranges, 0.0)
    torch.testing.assert_close(_fused_context(q_local, k_all, v_all, 0.3, layout, 0.0), ref, rtol=1e-5, atol=1e-6)


def test_varlen_is_picked_on_cuda_without_flash_attn_and_refused_off_cuda():
    from granite_train.errors import UserError
    from granite_train.models.attention import attn_backend_unavailable, resolve_attn_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # resolving looks at the type only
    if attn_backend_unavailable("flash", cuda) is None:
        pytest.skip("flash-attn is installed: auto takes it")
    assert resolve_attn_backend("auto", cuda) == "varlen"
    assert resolve_attn_backend("auto", cuda, dropout=0.1) == "sdpa"  # varlen_attn has no dropout
    assert resolve_attn_backend("auto", cpu) == "sdpa"
    for requested, device, dropout, message in [
            ("varlen", cpu, 0.0, "model.attn_backend=varlen cannot run: needs a CUDA device"),
            ("varlen", cuda, 0.1, "varlen_attn has no dropout, the model has attention_dropout=0.1"),
            ("flash", cuda, 0.0, "the flash-attn package is not installed")]:
        with pytest.raises(UserError) as err:
            resolve_attn_backend(requested, device, dropout)
        assert message in str(err.value) and "\n" not in str(err.value)
