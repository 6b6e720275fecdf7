"""trainer.compile: the compiled model trains exactly like the eager one.

The compiled model must give the eager losses and gradients (fp32; inductor may reorder
reductions, hence 1e-5 relative, not bitwise), on packed rows of changing length without a
recompile per length, and keep one gradient readiness order (DeepSpeed ZeRO-2 buckets by it).
"""

import copy

import pytest
import torch

from granite_train.data.collator import collate_packed
from granite_train.models.compile import compile_model
from granite_train.data.collator import model_inputs

from .test_grad_order import MICRO_BATCHES, _readiness_order, build_family

pytestmark = pytest.mark.slow  # inductor compiles for seconds per module class

ROWS = [  # packed micro-batches of different total lengths (dynamic shapes)
    [list(range(1, 12)), [7, 8, 9], list(range(20, 50))],
    [[3], [4, 5], list(range(1, 30)), list(range(60, 77))],
    [list(range(1, 64))],
]


def _loss_and_grads(model, examples):
    mb = collate_packed([{"input_ids": ids} for ids in examples])
    out = model(**model_inputs(mb), labels=mb["labels"], return_logits=False)
    loss = out.loss if out.aux_loss is None else out.loss + 0.01 * out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("family", ["granite", "granitemoehybrid"])
def test_compiled_model_trains_like_eager(family):
    eager = build_family(family)
    compiled = copy.deepcopy(eager)
    counts = compile_model(compiled)
    expected = {"granite": {"RMSNorm": 7, "SwiGLU": 3},
                "granitemoehybrid": {"RMSNorm": 7, "GatedRMSNorm": 2, "SharedMLP": 3}}[family]
    assert counts == expected
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoint names unchanged

    torch._dynamo.utils.counters.clear()
    for examples in ROWS:
        loss_e, grads_e = _loss_and_grads(eager, examples)
        loss_c, grads_c = _loss_and_grads(compiled, examples)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
        assert grads_c.keys() == grads_e.keys()
        for name, g in grads_e.items():
            err = float((grads_c[name] - g).abs().max() / g.abs().max().clamp_min(1e-12))
            assert err < 1e-5, f"{name}: relative gradient error {err:.2e}"
    # one graph per compiled module class and grad mode, whatever the row length
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < frames <= len(expected), dict(torch._dynamo.utils.counters["stats"])

    orders = {name: _readiness_order(compiled, ex) for name, ex in MICRO_BATCHES.items()}
    first = next(iter(orders.values()))
    for name, order in orders.items():
        assert order == first, f"gradient readiness order of {name!r} differs"
