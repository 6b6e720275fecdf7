"""Global-norm clipping (parallel/grad_norm.py)."""

import pytest
import torch

from granite_train.parallel.grad_norm import clip_by_global_norm


def test_clip_by_global_norm_is_fp64_clip_grad_norm():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3_000_000, 7, 1)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ref = [torch.nn.Parameter(p.detach().double()) for p in params]
    for r, p in zip(ref, params):
        r.grad = p.grad.double()
    expected = float(torch.nn.utils.clip_grad_norm_(ref, 0.5))
    assert clip_by_global_norm(params, 0.5) == pytest.approx(expected, rel=1e-12)
    for r, p in zip(ref, params):
        torch.testing.assert_close(p.grad, r.grad.float(), rtol=1e-6, atol=0)
    assert clip_by_global_norm(params, 1e9) == pytest.approx(0.5, rel=1e-6)  # no further scaling
