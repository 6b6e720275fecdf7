"""Optimizer param groups from declared roles: muP lr scales, weight decay, full coverage."""

import dataclasses

import pytest
import torch

from granite_train.cli import compose_config
from granite_train.config import OptimConfig
from granite_train.errors import UserError
from granite_train.models import GraniteConfig, build_model
from granite_train.models.param_roles import named_param_roles
from granite_train.optim import build_optimizer, mup_width_for

HYBRID = dict(model_type="granitemoehybrid", vocab_size=64, hidden_size=64, intermediate_size=32,
              shared_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_local_experts=4, num_experts_per_tok=2, layer_types=["mamba", "attention"],
              mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=8, tie_word_embeddings=False,
              logits_scaling=4.0)
NO_DECAY = {"norm", "bias", "ssm"}


def _check_groups(model, opt, wd, m_width):
    roles = {id(p): r for _, p, r in named_param_roles(model)}
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "every parameter in exactly one group"
    for g in opt.param_groups:
        assert {roles[id(p)] for p in g["params"]} == {g["role"]}
        want_scale = 1.0 / m_width if (m_width and g["role"] == "hidden") else 1.0
        assert g["lr_scale"] == pytest.approx(want_scale)
        assert g["weight_decay"] == (0.0 if g["role"] in NO_DECAY else wd)


def test_mup_groups_hybrid():
    model = build_model(GraniteConfig(**HYBRID))
    cfg = OptimConfig(mup=True, weight_decay=0.1, lr=0.01)
    model.apply_mup(mup_width_for(model, None))  # m_width = logits_scaling = 4
    opt = build_optimizer(model, cfg)
    _check_groups(model, opt, 0.1, 4.0)
    by_role = {g["role"]: g for g in opt.param_groups}
    assert set(by_role) == {"hidden", "embedding", "output", "conv", "norm", "bias", "ssm"}
    assert by_role["hidden"]["lr"] == pytest.approx(0.01 / 4)  # step 0 before the loop sets it
    # the Mamba scalars and conv really are where the table says
    mamba = model.model.layers[0].mamba
    ssm_ids = {id(p) for p in by_role["ssm"]["params"]}
    assert {id(mamba.A_log), id(mamba.D), id(mamba.dt_bias)} <= ssm_ids
    assert any(p is mamba.conv1d.weight for p in by_role["conv"]["params"])
    assert any(p is model.lm_head.weight for p in by_role["output"]["params"])


def test_without_mup_keeps_the_old_grouping():
    """No muP: every lr_scale 1.0 and decay exactly on the >= 2-D parameters (the old rule)."""
    model = build_model(GraniteConfig(**HYBRID))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    _check_groups(model, opt, 0.1, None)
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0)


def test_tied_dense_and_custom_no_decay_roles():
    model = build_model(GraniteConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True))
    model.apply_mup(2.0)
    opt = build_optimizer(model, OptimConfig(mup=True, weight_decay=0.05, no_decay_roles=["norm", "embedding"]))
    groups = {g["role"]: g for g in opt.param_groups}
    assert set(groups) == {"hidden", "embedding", "norm", "bias"}  # tied: no output group
    assert groups["embedding"]["weight_decay"] == 0.0 and groups["bias"]["weight_decay"] == 0.05
    assert groups["hidden"]["lr_scale"] == 0.5 and groups["embedding"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_mup_without_apply_mup_is_a_wiring_error():
    model = build_model(GraniteConfig(**HYBRID))
    with pytest.raises(RuntimeError, match="apply_mup"):
        build_optimizer(model, OptimConfig(mup=True))


def test_lr_scale_reaches_the_update():
    """Adam's first step moves each weight by ~lr: hidden matrices by lr / m_width under muP."""
    torch.manual_seed(0)
    model = build_model(GraniteConfig(**HYBRID))
    model.apply_mup(4.0)
    opt = build_optimizer(model, OptimConfig(mup=True, lr=1e-2, weight_decay=0.0, eps=1e-12))
    before = {id(p): p.detach().clone() for p in model.parameters()}
    ids = torch.randint(0, 64, (1, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    q = model.model.layers[1].self_attn.q_proj.weight
    emb = model.model.embed_tokens.weight
    assert (q - before[id(q)]).abs().max().item() == pytest.approx(1e-2 / 4, rel=1e-3)
    moved = (emb - before[id(emb)]).abs()
    assert moved.max().item() == pytest.approx(1e-2, rel=1e-3)


@pytest.mark.parametrize("overrides, match", [
    (["optim.mup=true"], "logits_scaling is 1.0 and model.mup_base_width is null"),
    (["optim.mup=true", "model.mup_base_width=100"], "must divide hidden_size=192"),
    (["optim.mup=true", "model.mup_base_width=384"], "must divide hidden_size=192"),
    (["model.mup_base_width=0"], "positive"),
    (["optim.no_decay_roles=[norm,vectors]"], "unknown roles \\['vectors'\\]"),
])
def test_config_errors_are_one_line(overrides, match):
    with pytest.raises(UserError, match=match) as exc:
        compose_config(overrides)
    assert "\n" not in str(exc.value)


def test_config_accepts_mup():
    cfg = compose_config(["optim.mup=true", "model.mup_base_width=64"])
    assert cfg.optim.mup and cfg.model.mup_base_width == 64
    cfg = compose_config(["optim.mup=true", "model.arch.logits_scaling=3"])
    assert dataclasses.asdict(cfg.optim)["no_decay_roles"] == ["norm", "bias", "ssm"]
