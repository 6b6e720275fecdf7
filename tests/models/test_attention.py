"""Packed attention: which SDPA kernel the per-example loop reaches on CPU, and that it is exact."""

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
