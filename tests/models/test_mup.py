"""muP on the model side: every parameter declares its role; the muP init of hidden matrices."""

import math

import pytest
import torch

from granite_train.errors import UserError
from granite_train.models import GraniteConfig, build_model, load_model, save_model
from granite_train.models.param_roles import (ADAPTER, BIAS, CONV, EMBEDDING, HIDDEN, NORM, OUTPUT, ROLES, SSM,
                                              mup_width_multiplier, named_param_roles, role_of)

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
FAMILIES = {
    "granite": dict(attention_bias=True, mlp_bias=True),  # biases too, so the bias role is covered
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32),
    "granitemoehybrid": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32,
                             layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_n_groups=2,
                             mamba_d_state=8, mamba_chunk_size=8, mamba_proj_bias=True),
}


def _config(family, tied=True, **overrides):
    kw = dict(BASE, **FAMILIES[family], tie_word_embeddings=tied)
    kw.update(overrides)
    return GraniteConfig(model_type=family, **kw)


def _expected_role(name):
    """The table in param_roles' docstring, written out by name (the test's independent view)."""
    leaf = name.rsplit(".", 1)[-1]
    if name == "model.embed_tokens.weight":
        return EMBEDDING
    if name == "lm_head.weight":
        return OUTPUT
    if leaf == "bias":
        return BIAS
    if name.endswith("layernorm.weight") or name in ("model.norm.weight",) or name.endswith("mamba.norm.weight"):
        return NORM
    if leaf in ("A_log", "D", "dt_bias"):
        return SSM
    if name.endswith("conv1d.weight"):
        return CONV
    return HIDDEN


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_declares_its_role(family, tied):
    model = build_model(_config(family, tied))
    roles = {name: role for name, _, role in named_param_roles(model)}  # strict: raises on a missing one
    assert set(roles) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert role_of(p) == roles[name], name  # the attribute on the Parameter agrees
        assert roles[name] == _expected_role(name), (name, roles[name])
    seen = set(roles.values())
    assert {HIDDEN, EMBEDDING, NORM} <= seen
    assert (OUTPUT in seen) == (not tied)
    if family == "granitemoehybrid":
        assert {SSM, CONV, BIAS} <= seen
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_undeclared_parameter_is_an_error():
    model = build_model(_config("granite"))
    model.model.layers[0].extra = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="layers.0.extra.weight .*no declared role"):
        list(named_param_roles(model))


def test_roles_survive_checkpoint_load(tmp_path):
    """load_model assigns new Parameter objects (assign=True): the module keeps the roles."""
    model = build_model(_config("granitemoehybrid", tied=False))
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    before = {n: r for n, _, r in named_param_roles(model)}
    after = {n: r for n, _, r in named_param_roles(loaded)}
    assert before == after


def _sample_std(model, role):
    ws = [p.detach().flatten() for n, p, r in named_param_roles(model) if r == role and p.ndim >= 2]
    return torch.cat(ws).std().item(), sum(w.numel() for w in ws)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mup_init_std_of_hidden_matrices(family):
    init, m = 0.05, 4.0
    torch.manual_seed(0)
    model = build_model(_config(family, tied=False, initializer_range=init, hidden_size=128, intermediate_size=96))
    std0, n = _sample_std(model, HIDDEN)
    model.apply_mup(m)
    std_mup, _ = _sample_std(model, HIDDEN)
    # >= 50k samples: the sample std is within ~0.5% of the truth; 5% cannot be missed by
    # accident, and the wrong scalings (std, std / m) are 100% and 50% away.
    assert n > 50_000
    assert std0 == pytest.approx(init, rel=0.05)
    assert std_mup == pytest.approx(init / math.sqrt(m), rel=0.05)
    for role in (EMBEDDING, OUTPUT):  # input and output weights keep the base std
        assert _sample_std(model, role)[0] == pytest.approx(init, rel=0.05)
    for name, p, role in named_param_roles(model):
        if role == NORM:
            assert torch.equal(p, torch.ones_like(p)), name
        elif role == BIAS and not name.endswith("conv1d.bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
    assert model.mup_width == m


def test_apply_mup_without_reinit_keeps_loaded_weights():
    model = build_model(_config("granite"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.apply_mup(4.0, reinit=False)
    assert model.mup_width == 4.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mup_width_multiplier():
    cfg = _config("granite", hidden_size=256, logits_scaling=8.0)
    assert mup_width_multiplier(cfg, None) == 8.0  # Granite: m_width = logits_scaling
    assert mup_width_multiplier(cfg, 64) == 4.0  # an explicit base width wins
    for base, match in ((0, "positive"), (512, "divide"), (96, "divide")):
        with pytest.raises(UserError, match=match):
            mup_width_multiplier(cfg, base)
    with pytest.raises(UserError, match="mup_base_width"):
        mup_width_multiplier(_config("granite", logits_scaling=1.0), None)
    assert set(ROLES) == {HIDDEN, EMBEDDING, OUTPUT, CONV, NORM, BIAS, SSM, ADAPTER}
