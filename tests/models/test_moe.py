"""granitemoe / granitemoeshared: parity with transformers, packing, aux loss, config, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from granite_train.errors import UserError
from granite_train.models import GraniteConfig, load_model, save_model
from granite_train.models.moe import grouped_expert_matmul

from .conftest import VOCAB, hf_config_kwargs
from .test_packing import _examples, _pack, packed_vs_per_example_grads

import transformers

LENGTHS = [1, 5, 17, 33]
TOL = 1e-5
MOE = dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
FAMILIES = {
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {}),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         {"shared_intermediate_size": 32}),
}


def _hf_kwargs(family, **overrides):
    kw = hf_config_kwargs(**MOE, **FAMILIES[family][2])
    kw.update(overrides)
    return kw


def _make_hf(tmp_path, family, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg_cls, model_cls, _ = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**_hf_kwargs(family, **overrides))
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    out = tmp_path / family
    model.save_pretrained(out)
    return out, model


def _tiny(family, seed=0, **overrides):
    from granite_train.models import build_model

    torch.manual_seed(seed)
    kw = _hf_kwargs(family, **overrides)
    kw.pop("rope_theta")
    model = build_model(GraniteConfig(model_type=family, rope_theta=10000.0, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    return model


def _max_diff(ours, theirs, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, VOCAB, (1, n), generator=g)
            worst = max(worst, (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item())
    return worst


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tied", [True, False])
def test_load_transformers_moe_checkpoint(tmp_path, family, tied):
    path, hf = _make_hf(tmp_path, family, tie_word_embeddings=tied)
    ours = load_model(path).eval()
    assert ours.config.model_type == family
    assert ours.config.mlp_type() == ("moe+shared" if family == "granitemoeshared" else "moe")
    assert ours.config.router_aux_loss_coef == pytest.approx(0.001)
    assert _max_diff(ours, hf) <= TOL

    # Aux loss (unscaled, as transformers' `aux_loss`) and expert counts on one sequence.
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours(input_ids=ids)
        b = hf(input_ids=ids, output_router_logits=True)
    assert abs(a.aux_loss.item() - b.aux_loss.item()) <= 1e-6
    counts = torch.stack([torch.bincount(r.topk(2, dim=-1).indices.reshape(-1), minlength=4)
                          for r in b.router_logits]).float()
    assert torch.equal(a.expert_counts, counts)
    assert a.expert_counts.shape == (3, 4) and a.expert_counts.sum().item() == 3 * 40 * 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_equals_per_example_and_aux_loss_matches_transformers(tmp_path, family):
    path, hf = _make_hf(tmp_path, family)
    model = load_model(path)
    examples = _examples([1, 5, 17, 1, 33])
    batch = _pack(examples)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"})
        alone = torch.cat([model(input_ids=e.unsqueeze(0)).logits[0] for e in examples])
        # transformers' load_balancing_loss_func on the per-example router logits, concatenated.
        per_layer = [hf(input_ids=e.unsqueeze(0), output_router_logits=True).router_logits for e in examples]
    assert (packed.logits[0] - alone).abs().max().item() <= 1e-5
    from transformers.models.granitemoe.modeling_granitemoe import load_balancing_loss_func

    logits = tuple(torch.cat([r[i] for r in per_layer]) for i in range(3))
    reference = load_balancing_loss_func(logits, 4, 2)
    assert abs(packed.aux_loss.item() - reference.item()) <= 1e-6

    # Trailing filler after the last boundary stays out of the router statistics.
    ids = torch.cat([batch["input_ids"], torch.zeros(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        filled = model(input_ids=ids, cu_seq_lens=batch["cu_seq_lens"])
    assert abs(filled.aux_loss.item() - packed.aux_loss.item()) <= 1e-6
    assert torch.equal(filled.expert_counts, packed.expert_counts)


def _switch_per_layer_reference(router_logits, top_k, z_coef):
    """lm-engine's formula written out from the raw router logits of each layer [N, E]."""
    total = 0.0
    for logits in router_logits:
        E = logits.shape[-1]
        p = torch.softmax(logits, dim=-1).sum(0)
        f = torch.bincount(logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=E).float()
        total = total + E * ((p / p.sum()) * (f / f.sum())).sum()
        total = total + z_coef * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    return total


@pytest.mark.parametrize("kind,z_coef", [("switch_per_layer", None), ("switch_per_layer", 0.0),
                                         ("load_balancing", 0.5)])
def test_switch_per_layer_and_z_loss_match_the_formulas(tmp_path, kind, z_coef):
    from transformers.models.granitemoe.modeling_granitemoe import load_balancing_loss_func

    path, hf = _make_hf(tmp_path, "granitemoe")
    model = load_model(path)
    model.set_router_aux_loss(kind, z_coef)
    examples = _examples([1, 5, 17, 1, 33])
    batch = _pack(examples)
    ids = torch.cat([batch["input_ids"], torch.zeros(1, 6, dtype=torch.long)], dim=1)  # + filler
    with torch.no_grad():
        out = model(input_ids=ids, cu_seq_lens=batch["cu_seq_lens"])
        per_example = [hf(input_ids=e.unsqueeze(0), output_router_logits=True).router_logits for e in examples]
    logits = [torch.cat([r[i] for r in per_example]).float() for i in range(3)]
    if kind == "switch_per_layer":
        reference = _switch_per_layer_reference(logits, 2, 0.1 if z_coef is None else z_coef)
    else:
        z = sum((torch.logsumexp(x, dim=-1) ** 2).mean() for x in logits)
        reference = load_balancing_loss_func(tuple(logits), 4, 2) + z_coef * z
    assert abs(out.aux_loss.item() - float(reference)) <= 1e-5 * max(1.0, abs(float(reference)))
    # Uniform routing gives exactly `layers` for the switch loss (a sanity anchor for the scale).
    if kind == "switch_per_layer" and z_coef == 0.0:
        from granite_train.models.moe import switch_per_layer_loss

        uniform = torch.stack([torch.full((4,), 10.0), torch.full((4,), 5.0), torch.full((4,), 20.0),
                               torch.zeros(4)]).expand(3, 4, 4)
        assert switch_per_layer_loss(uniform).item() == pytest.approx(3.0)


def test_router_aux_loss_override_reaches_the_model(cli, tmp_path):
    from granite_train.cli import compose_config
    from granite_train.data import load_tokenizer
    from granite_train.parallel.env import Env
    from granite_train.train.build import build_run_model

    cfg = compose_config(["model=granitemoe-tiny", "model.router_aux_loss=switch_per_layer",
                          "model.router_z_loss_coef=0.25"])
    env = Env(0, 1, 0, torch.device("cpu"), None)
    model = build_run_model(cfg, load_tokenizer(cfg.data.tokenizer, None), env)
    assert (model.router_loss_kind, model.router_z_loss_coef) == ("switch_per_layer", 0.25)

    bad = cli("model=granitemoe-tiny", "model.router_aux_loss=switch", f"trainer.output_dir={tmp_path}")
    assert bad.returncode == 2 and "model.router_aux_loss='switch' is not one of" in bad.stderr


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_equal_per_example(family, checkpointing):
    model = _tiny(family, tie_word_embeddings=False)
    worst, _, _ = packed_vs_per_example_grads(model, _examples([1, 5, 17, 1, 33]), checkpointing)
    assert worst <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_model_loads_in_transformers(tmp_path, family):
    ours = _tiny(family, tie_word_embeddings=False).eval()
    out = tmp_path / "ours"
    save_model(ours, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family][1]] and config["model_type"] == family
    assert config["num_local_experts"] == 4 and "mlp_bias" not in config
    assert ("shared_intermediate_size" in config) == (family == "granitemoeshared")

    theirs = getattr(transformers, FAMILIES[family][1]).from_pretrained(out, attn_implementation="eager").eval()
    assert theirs.config.num_local_experts == 4 and theirs.config.num_experts_per_tok == 2
    assert _max_diff(ours, theirs) <= TOL
    again = load_model(out).eval()
    assert _max_diff(ours, again) == 0.0
    assert again.config == ours.config


def test_dense_outputs_have_no_aux_loss_and_no_moe_keys(tiny_model):
    model = tiny_model()
    out = model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert out.aux_loss is None and out.expert_counts is None
    d = model.config.to_hf_dict()
    assert not {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                "shared_intermediate_size"} & set(d)


def test_missing_moe_keys_mean_transformers_defaults():
    d = {"model_type": "granitemoe", "vocab_size": 64}
    cfg = GraniteConfig.from_hf_dict(d)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.router_aux_loss_coef) == (8, 2, 0.001)
    assert cfg.shared_intermediate_size == 0 and cfg.mlp_type() == "moe"
    cfg = GraniteConfig.from_hf_dict({"model_type": "granitemoeshared", "vocab_size": 64,
                                      "shared_intermediate_size": 16, "output_router_logits": True})
    assert cfg.mlp_type() == "moe+shared" and cfg.hf_extra == {"output_router_logits": True}
    assert GraniteConfig.from_hf_dict({"model_type": "granite", "vocab_size": 64}).mlp_type() == "dense"


@pytest.mark.parametrize("kw, match", [
    (dict(model_type="granitemoe", num_local_experts=0), "needs num_local_experts > 0"),
    (dict(model_type="granite", num_local_experts=4), "needs model_type granitemoe"),
    (dict(model_type="granitemoe", num_local_experts=4, shared_intermediate_size=8), "granitemoeshared"),
    (dict(model_type="granitemoe", num_local_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
    (dict(model_type="granitemoe", num_local_experts=4, mlp_bias=True), "mlp_bias"),
])
def test_bad_moe_config(kw, match):
    with pytest.raises(UserError, match=match):
        GraniteConfig(vocab_size=64, **kw).validate()


def test_bad_expert_shape_is_one_line_error(tmp_path):
    ours = _tiny("granitemoeshared", num_hidden_layers=2)
    save_model(ours, tmp_path / "ckpt")
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    state["model.layers.1.block_sparse_moe.input_linear.weight"] = torch.zeros(4, 48, 64)
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as info:
        load_model(tmp_path / "ckpt")
    message = str(info.value)
    assert "\n" not in message
    assert ("wrong shapes: model.layers.1.block_sparse_moe.input_linear.weight (file [4, 48, 64] vs "
            "model [4, 96, 64])") in message


def test_grouped_mm_path_matches_per_expert_loop():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g)
    w = torch.randn(3, 6, 8, generator=g)
    counts = torch.tensor([3, 2, 5])
    loop = grouped_expert_matmul(x, w, counts, counts.tolist())
    try:
        grouped = grouped_expert_matmul(x, w, counts, None)
    except RuntimeError as e:  # no kernel for this device / dtype in this torch build
        pytest.skip(f"torch._grouped_mm unavailable here: {e}")
    assert (loop - grouped).abs().max().item() <= 1e-5


def test_flops_count_active_experts_only():
    model = _tiny("granitemoeshared")  # 2 of 4 experts active: half the expert weights count
    expert = sum(p.numel() for n, p in model.named_parameters() if "block_sparse_moe" in n and "_linear" in n)
    full = _tiny("granitemoeshared", num_experts_per_tok=4).flops_per_token(16)
    assert full - model.flops_per_token(16) == pytest.approx(6.0 * expert / 2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_and_bf16_autocast(family):
    model = _tiny(family)
    examples = _examples([3, 17, 9, 1])
    L = max(len(e) for e in examples)
    ids = torch.stack([torch.nn.functional.pad(e, (0, L - len(e))) for e in examples])
    with torch.no_grad():
        padded = model(input_ids=ids).logits
        for row, e in enumerate(examples):
            assert (padded[row, :len(e)] - model(input_ids=e.unsqueeze(0)).logits[0]).abs().max() <= 1e-5
    batch = _pack(examples)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.loss.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    (out.loss + 0.01 * out.aux_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
