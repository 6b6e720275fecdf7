"""PEFT adapters both ways, on transformers' own Granite models: ours saved -> peft loads onto
transformers with equal logits; PEFT's saved -> ours loads with equal logits. Experts (PEFT's
`target_parameters`) and Mamba's out_proj included, and shown to matter."""

import json

import pytest
import torch

from granite_train.errors import UserError
from granite_train.models import save_model
from granite_train.models.lora import LoraSpec, adapter_state, attach_lora, freeze_base
from granite_train.models.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, save_adapter
from granite_train.train.adapter import load_adapter_weights

from .test_lora import model_of, randomize_b

import transformers
import peft

HF_TOL = 1e-4
CLASSES = {"granite": "GraniteForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
           "granitemoeshared": "GraniteMoeSharedForCausalLM", "granitemoehybrid": "GraniteMoeHybridForCausalLM"}
TARGETS = {"granite": ("attention", "mlp"), "granitemoe": ("attention", "experts", "router"),
           "granitemoeshared": ("attention", "shared_mlp", "experts"),
           "granitemoehybrid": ("attention", "shared_mlp", "mamba", "experts")}
# What PEFT users write for the same targets on transformers' modules.
PEFT_TARGETS = {
    "granite": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], None, None),
    # listed down before gate_up, short names: PEFT nests by the module's own parameter order
    "granitemoeshared": (["q_proj", "v_proj", "shared_mlp.input_linear"], ["down_proj", "gate_up_proj"],
                         ["embed_tokens"]),
    "granitemoehybrid": (["in_proj", "out_proj", "o_proj"], ["experts.down_proj", "router.weight"], None),
}


def ids(n=29, seed=4):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def hf_model(path, family):
    return getattr(transformers, CLASSES[family]).from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", list(TARGETS))
def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path, family):
    ours = model_of(family).eval()
    save_model(ours, tmp_path / "base")
    train = ("lm_head",) if family == "granite" else ("embeddings",)
    spec = LoraSpec(r=4, alpha=8, dropout=0.1, targets=TARGETS[family], train_modules=train)
    attach_lora(ours, spec, seed=1)
    freeze_base(ours, train)
    randomize_b(ours)
    full = {}
    with torch.no_grad():
        key = "lm_head.weight" if family == "granite" else "model.embed_tokens.weight"
        ours.get_parameter(key).add_(0.02)
        full[key] = ours.get_parameter(key)
    save_adapter(tmp_path / "adapter", spec, adapter_state(ours), full, ours.config, str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["task_type"] == "CAUSAL_LM"
    if "experts" in spec.targets:
        assert config["target_parameters"][:2] == ["block_sparse_moe.experts.gate_up_proj",
                                                   "block_sparse_moe.experts.down_proj"]
        assert ("block_sparse_moe.router.weight" in config["target_parameters"]) == ("router" in spec.targets)
        assert config["lora_dropout"] == 0.0  # PEFT's parameter wrappers refuse dropout
    if family == "granitemoehybrid":
        assert "mamba.out_proj" in config["target_modules"]

    base = hf_model(tmp_path / "base", family)
    with torch.no_grad():
        base_logits = base(input_ids=ids()).logits
    theirs = peft.PeftModel.from_pretrained(hf_model(tmp_path / "base", family), tmp_path / "adapter").eval()
    with torch.no_grad():
        a, b = ours(ids()).logits, theirs(input_ids=ids()).logits
    assert (a - b).abs().max() <= HF_TOL
    assert (a - base_logits).abs().max() > 1e-2  # the adapter acts


@pytest.mark.parametrize("family", list(PEFT_TARGETS))
def test_peft_saved_adapter_loads_into_ours_with_equal_logits(tmp_path, family):
    ours = model_of(family).eval()
    save_model(ours, tmp_path / "base")
    modules, params, saved = PEFT_TARGETS[family]
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=modules, target_parameters=params,
                             modules_to_save=saved, ensure_weight_tying=saved is not None)
    theirs = peft.get_peft_model(hf_model(tmp_path / "base", family), config).eval()
    with torch.no_grad():  # PEFT starts B at zero too
        g = torch.Generator().manual_seed(2)
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.add_(0.02)
    theirs.save_pretrained(tmp_path / "adapter")

    spec, paths, adapters, full = read_adapter(tmp_path / "adapter", ours.config, ours.config.num_local_experts)
    assert spec.r == 8 and spec.alpha == 16
    attach_lora(ours, spec, paths=paths)
    load_adapter_weights(ours, adapters, full, where=tmp_path / "adapter")
    if family == "granitemoehybrid":
        assert "model.layers.0.mamba.out_proj" in paths and "mamba" in spec.targets
        assert "model.layers.1.block_sparse_moe.output_linear" in paths
        assert "model.layers.1.block_sparse_moe.input_linear" not in paths  # only down_proj was targeted
        assert "model.layers.1.block_sparse_moe.router.layer" in paths
    if saved:
        assert spec.train_modules == ("embeddings",) and list(full) == ["model.embed_tokens.weight"]
    with torch.no_grad():
        a, b = ours(ids()).logits, theirs(input_ids=ids()).logits
    assert (a - b).abs().max() <= HF_TOL
    # ... and saved again by us, read back bit-exact
    save_adapter(tmp_path / "again", spec, adapter_state(ours), {}, ours.config, None)
    _, paths2, again, _ = read_adapter(tmp_path / "again", ours.config, ours.config.num_local_experts)
    assert sorted(paths2) == sorted(paths)
    assert all(torch.equal(again[k], adapters[k]) for k in adapters)


def _peft_dir(tmp_path, **config_changes):
    ours = model_of("granite")
    spec = LoraSpec(r=4, alpha=8, targets=("attention",))
    attach_lora(ours, spec, seed=1)
    d = tmp_path / "a"
    save_adapter(d, spec, adapter_state(ours), {}, ours.config, None)
    if config_changes:
        c = json.loads((d / ADAPTER_CONFIG).read_text())
        c.update(config_changes)
        (d / ADAPTER_CONFIG).write_text(json.dumps(c))
    return d, ours


@pytest.mark.parametrize("changes,match", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "IA3"}, "not LORA"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"r": 8}, "r=8"),
    ({"r": None}, "no usable r"),
])
def test_adapters_we_cannot_run_exactly_are_refused(tmp_path, changes, match):
    d, ours = _peft_dir(tmp_path, **changes)
    with pytest.raises(UserError, match=match):
        read_adapter(d, ours.config, 0)


def test_a_foreign_or_incomplete_adapter_is_refused(tmp_path):
    d, _ = _peft_dir(tmp_path)
    moe = model_of("granitemoehybrid")
    hybrid_cfg = moe.config
    with pytest.raises(UserError, match="match no LoRA target|does not fit"):
        spec, paths, adapters, full = read_adapter(d, hybrid_cfg, 4)
        attach_lora(moe, spec, paths=paths)
        load_adapter_weights(moe, adapters, full, where=d)
    (d / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(UserError, match="is not a PEFT adapter directory"):
        read_adapter(d, hybrid_cfg, 4)


def test_expert_adapters_onto_a_model_without_those_experts_are_one_line(tmp_path):
    moe = model_of("granitemoe")
    spec = LoraSpec(r=4, alpha=8, targets=("experts",))
    attach_lora(moe, spec, seed=1)
    save_adapter(tmp_path / "a", spec, adapter_state(moe), {}, moe.config, None)
    with pytest.raises(UserError, match="not a stack of 0 experts"):
        read_adapter(tmp_path / "a", model_of("granite").config, 0)
    with pytest.raises(UserError, match="not a stack of 3 experts"):
        read_adapter(tmp_path / "a", moe.config, 3)


def test_a_tied_base_refuses_an_untied_full_rank_copy(tmp_path):
    """PEFT without ensure_weight_tying unties a saved embedding from lm_head: a tied model cannot
    hold that, so it is refused (never loaded as if it were the one matrix)."""
    ours = model_of("granitemoe")  # tied
    save_model(ours, tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    theirs = peft.get_peft_model(hf_model(tmp_path / "base", "granitemoe"), config)
    theirs.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match="cannot hold both"):
        read_adapter(tmp_path / "adapter", ours.config, 4)
