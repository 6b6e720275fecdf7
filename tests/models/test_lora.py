"""LoRA on every family: adapted = merged, gradients reach only adapters, every target acts,
the grouped expert update equals a per-expert reference, and packing stays exact."""

import copy

import pytest
import torch
import torch.nn.functional as F

from granite_train.models import GraniteConfig, build_model
from granite_train.models.lora import (LoraExpertWeight, LoraLinear, LoraSpec, TARGET_ROLES, adapter_state,
                                       attach_lora, freeze_base, merge_lora, merged_state)

from .test_packing import _pack

VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=6.0,
            initializer_range=0.1, max_position_embeddings=256)
FAMILIES = {
    "granite": dict(intermediate_size=96, tie_word_embeddings=False, attention_bias=True),
    "granitemoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
    "granitemoeshared": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=32, tie_word_embeddings=True),
    "granitemoehybrid": dict(intermediate_size=32, shared_intermediate_size=48, num_local_experts=4,
                             num_experts_per_tok=2, layer_types=["mamba", "attention"], mamba_n_heads=8,
                             mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
                             tie_word_embeddings=True),
}
ALL = tuple(TARGET_ROLES)
# The roles each family has (the others match nothing there).
ROLES = {"granite": ("attention", "mlp"), "granitemoe": ("attention", "experts", "router"),
         "granitemoeshared": ("attention", "shared_mlp", "experts", "router"),
         "granitemoehybrid": ("attention", "shared_mlp", "mamba", "experts", "router")}


def model_of(family, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(GraniteConfig(model_type=family, **{**BASE, **FAMILIES[family], **overrides}))


@torch.no_grad()
def randomize_b(model, seed=1, std=0.05):
    """B starts at zero (the model starts as its base): give it values so the adapters act."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(n=37, seed=3):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_leave_the_model_unchanged_and_merge_exactly(family):
    model = model_of(family).eval()
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    counts = attach_lora(model, LoraSpec(r=4, alpha=8, targets=ALL), seed=1)
    assert {r for r, n in counts.items() if n} == set(ROLES[family])
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)  # B = 0
    randomize_b(model)
    with torch.no_grad():
        adapted = model(x).logits
        merged = merge_lora(copy.deepcopy(model))(x).logits
    assert (adapted - base).abs().max() > 1e-2
    assert (merged - adapted).abs().max() <= 1e-5
    # merging through state dicts (what `export --merge` streams) gives the same weights
    plain = merge_lora(copy.deepcopy(model)).state_dict()
    by_state = merged_state({k: v for k, v in model.state_dict().items() if ".lora_" not in k}, adapter_state(model),
                            LoraSpec(r=4, alpha=8).scaling)
    assert by_state.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(by_state[k], plain[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,role", [(f, r) for f, roles in ROLES.items() for r in roles])
def test_every_target_changes_the_output(family, role):
    model = model_of(family).eval()
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    assert sum(attach_lora(model, LoraSpec(r=4, alpha=8, targets=(role,)), seed=1).values()) > 0
    randomize_b(model)
    with torch.no_grad():
        assert (model(x).logits - base).abs().max() > 1e-3, role


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_the_adapters(family):
    model = model_of(family)
    attach_lora(model, LoraSpec(r=4, alpha=8, targets=ALL), seed=1)
    n = freeze_base(model)
    randomize_b(model)
    assert n == sum(p.numel() for k, p in model.named_parameters() if ".lora_" in k)
    x = ids()
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_train_modules_train_full_rank_and_tied_is_one_matrix():
    model = model_of("granitemoe")  # tied
    attach_lora(model, LoraSpec(r=4, alpha=8, targets=("attention",)), seed=1)
    n_adapters = sum(p.numel() for k, p in model.named_parameters() if ".lora_" in k)
    n = freeze_base(model, ("lm_head",))
    assert n == n_adapters + model.model.embed_tokens.weight.numel()
    assert model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
    assert not model.model.layers[0].self_attn.q_proj.weight.requires_grad


def test_grouped_expert_update_equals_a_per_expert_reference():
    model = model_of("granitemoe")
    attach_lora(model, LoraSpec(r=4, alpha=8, targets=("experts",)), seed=1)
    randomize_b(model)
    w = model.model.layers[0].block_sparse_moe.input_linear
    assert isinstance(w, LoraExpertWeight)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(int(counts.sum()), w.in_features)
    grouped = w(x, counts, counts.tolist())
    rows = []
    for e, chunk in enumerate(x.split(counts.tolist())):
        W = w.weight[e] + w.scaling * w.lora_B.weight[e] @ w.lora_A.weight[e]
        rows.append(chunk @ W.T)
    torch.testing.assert_close(grouped, torch.cat(rows), rtol=1e-5, atol=1e-6)


def test_expert_dropout_drops_the_adapters_input_only():
    model = model_of("granitemoe")
    attach_lora(model, LoraSpec(r=4, alpha=8, dropout=0.5, targets=("experts",)), seed=1)
    randomize_b(model)
    w = model.model.layers[0].block_sparse_moe.input_linear
    counts = torch.tensor([3, 1, 5, 2])
    x = torch.randn(int(counts.sum()), w.in_features)
    torch.manual_seed(0)
    y = w(x, counts, counts.tolist())
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.5)
    rows = [c @ w.weight[e].T + w.scaling * d @ w.lora_A.weight[e].T @ w.lora_B.weight[e].T
            for e, (c, d) in enumerate(zip(x.split(counts.tolist()), dropped.split(counts.tolist())))]
    torch.testing.assert_close(y, torch.cat(rows), rtol=1e-5, atol=1e-6)
    w.eval()
    assert not torch.equal(w(x, counts, counts.tolist()), y)


def test_linear_adapter_is_peft_math_with_rslora_and_dropout():
    lin = torch.nn.Linear(16, 8)
    spec = LoraSpec(r=4, alpha=6, dropout=0.5, use_rslora=True)
    a = LoraLinear(lin, spec, torch.Generator().manual_seed(0))
    assert a.weight is lin.weight and a.bias is lin.bias and a.scaling == 6 / 2
    torch.nn.init.normal_(a.lora_B.weight)
    x = torch.randn(5, 16)
    a.eval()  # dropout off
    ref = F.linear(x, lin.weight, lin.bias) + 3.0 * x @ a.lora_A.weight.T @ a.lora_B.weight.T
    torch.testing.assert_close(a(x), ref)
    a.train()
    torch.manual_seed(1)
    y = a(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias) + 3.0 * dropped @ a.lora_A.weight.T @ a.lora_B.weight.T)


@pytest.mark.parametrize("family", ["granitemoeshared", "granitemoehybrid"])
def test_packed_adapted_logits_equal_per_example(family):
    model = model_of(family).eval()
    attach_lora(model, LoraSpec(r=4, alpha=8, targets=ALL), seed=1)
    randomize_b(model)
    examples = [ids(n, seed=n) for n in (1, 9, 23, 4)]
    packed = _pack([e[0] for e in examples])
    with torch.no_grad():
        out = model(**packed).logits[0]
        ref = torch.cat([model(e).logits[0] for e in examples])
    assert (out - ref).abs().max() <= 1e-5


def test_expert_slices_start_from_the_whole_models_adapters():
    """A layer holding a slice of its experts (expert parallelism loads one) draws the same A."""
    whole, part = model_of("granitemoe"), model_of("granitemoe")
    from granite_train.models.moe import MoE, awaiting_dispatch

    for moe in (m for m in part.modules() if isinstance(m, MoE)):
        moe.keep_experts(range(2, 4), awaiting_dispatch)
    spec = LoraSpec(r=4, alpha=8, targets=("experts", "attention"))
    attach_lora(whole, spec, seed=7)
    attach_lora(part, spec, seed=7)
    a_whole = whole.model.layers[1].block_sparse_moe.output_linear.lora_A.weight
    a_part = part.model.layers[1].block_sparse_moe.output_linear.lora_A.weight
    assert torch.equal(a_part, a_whole[2:4])
    assert torch.equal(part.model.layers[1].self_attn.q_proj.lora_A.weight,
                       whole.model.layers[1].self_attn.q_proj.lora_A.weight)


def test_unknown_target_and_bad_rank_are_refused():
    model = model_of("granite")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        attach_lora(model, LoraSpec(targets=("attn",)))
    with pytest.raises(ValueError, match="r=0"):
        attach_lora(model, LoraSpec(r=0))


def test_mfu_counts_a_frozen_base_at_four_flops_per_weight():
    from granite_train.models.lora import training_matmul_params
    from granite_train.models.model import full_size

    model = model_of("granitemoe")  # tied; 2 of 4 experts active
    attach_lora(model, LoraSpec(r=4, alpha=8, targets=("attention", "experts")), seed=1)
    freeze_base(model)
    base = full_size(model.config)[1]
    attn = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for n, m in model.named_modules()
               if n.endswith("_proj") and hasattr(m, "lora_A"))
    experts = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for n, m in model.named_modules()
                  if n.endswith(("input_linear", "output_linear")) and hasattr(m, "lora_A"))
    assert training_matmul_params(model, base) == round(base * 2 / 3 + attn + experts * 2 / 4)
    freeze_base(model, ("lm_head",))
    lm = model.config.vocab_size * model.config.hidden_size
    assert training_matmul_params(model, base) == round(base * 2 / 3 + lm / 3 + attn + experts * 2 / 4)
