"""Parameter gradients become ready in the same order whatever the micro-batch.

DeepSpeed ZeRO-2 copies each gradient into its reduction bucket when it becomes ready and
reduces the buckets across ranks by position: ranks whose micro-batches (one example, several
packed, two-token dummy) produced a different order would add up different parameters'
gradients. A single-example Mamba micro-batch once took another conv path than a packed one and
swapped conv1d's weight and bias.
"""

import pytest
import torch

from granite_train.data.collator import collate_packed
from granite_train.models import GraniteConfig, build_model
from granite_train.data.collator import model_inputs

from .conftest import VOCAB, hf_config_kwargs

FAMILIES = {
    "granite": {},
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32),
    "granitemoehybrid": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32,
                             layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_state=8,
                             mamba_chunk_size=8, mamba_d_conv=4, position_embedding_type=None),
}
MICRO_BATCHES = {
    "dummy": [[0, 0]],
    "one token": [[5]],
    "one example": [list(range(1, 40))],
    "packed": [list(range(1, 12)), [7, 8, 9], list(range(20, 50))],
    "packed with short ones": [[3], [4, 5], list(range(1, 30))],
    "packed, shorter than the conv": [[3], [4]],
}


def _readiness_order(model, examples):
    order = []
    handles = [p.register_post_accumulate_grad_hook(lambda p, n=name: order.append(n))
               for name, p in model.named_parameters()]
    try:
        mb = collate_packed([{"input_ids": ids} for ids in examples])
        out = model(**model_inputs(mb), labels=mb["labels"], return_logits=False)
        loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return order


def build_family(family):
    """The tiny fp32 model of `family` (seed 0), as the tests in this package build it."""
    kw = hf_config_kwargs(**FAMILIES[family])
    if family == "granitemoehybrid":
        kw.pop("rope_theta")
    torch.manual_seed(0)
    return build_model(GraniteConfig(model_type=family, **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_become_ready_in_one_order(family):
    model = build_family(family)
    orders = {name: _readiness_order(model, ex) for name, ex in MICRO_BATCHES.items()}
    reference = orders["packed"]
    assert len(reference) == len(list(model.parameters()))  # every parameter, once
    for name, order in orders.items():
        assert order == reference, name
    assert max(t for ex in MICRO_BATCHES.values() for ids in ex for t in ids) < VOCAB
