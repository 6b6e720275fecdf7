"""Presets of the real Granite checkpoint shapes (configs/model/*.yaml), on the meta device.

Each preset must build the same parameters, names and shapes as transformers' model for the same
config.json, and its counts must match the published model sizes.
"""

import json

import pytest
import torch

import transformers

from granite_train.cli import compose_config  # noqa: E402
from granite_train.info import describe, main as info_main  # noqa: E402
from granite_train.models import build_model  # noqa: E402

# preset -> (published total, published active, relative tolerance, where the numbers come from)
PUBLISHED = {
    # model card / ibm.com/granite/docs: "7B total / 1B activated". The active "1B" is IBM's rounded
    # name, not a count: top-6 of 64 experts plus shared MLPs, Mamba and embedding is 1.47B, so only
    # the total is held to the tolerance and active is checked to round down to 1B (see the test).
    "granite-4.0-h-tiny": (7.0e9, 1.0e9, 0.03, "model card 7B total / 1B active"),
    # ibm.com/granite/docs "3B"; the Granite-4.0 size list (ollama granite-4.0: 350m 1b 3.2b 3.4b 7b)
    "granite-4.0-h-micro": (3.2e9, 3.2e9, 0.03, "3.2B (dense)"),
    "granite-4.0-micro": (3.4e9, 3.4e9, 0.03, "3.4B (dense)"),
    "granite-3.3-2b": (2.5e9, 2.5e9, 0.03, "2.5B (dense)"),
    # REAL paper table 5: PowerMoE-3B 3.30B total, 0.88B active (model card: "3B", "800M active")
    "powermoe-3b": (3.30e9, 0.88e9, 0.03, "3.30B total / 0.88B active"),
}
PRESETS = list(PUBLISHED)

# transformers 5 keeps MoE weights under new names in memory and converts them back when saving;
# our names are the on-disk ones (REFERENCE.md "Checkpoint names on disk"). Shapes are unchanged.
# test_in_memory_to_disk_renames_are_what_save_pretrained_writes checks this table against a real
# save_pretrained, so it cannot drift from the installed transformers unnoticed.
_HF_MEMORY_TO_DISK = {
    ".block_sparse_moe.experts.gate_up_proj": ".block_sparse_moe.input_linear.weight",
    ".block_sparse_moe.experts.down_proj": ".block_sparse_moe.output_linear.weight",
    ".block_sparse_moe.router.weight": ".block_sparse_moe.router.layer.weight",
}


def _disk_name(key: str) -> str:
    for old, new in _HF_MEMORY_TO_DISK.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def _hf_config(arch):
    d = arch.to_hf_dict()
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


@pytest.fixture(scope="module")
def built():
    """preset -> (our model, transformers' model), both on the meta device in fp32."""
    out = {}
    for name in PRESETS:
        arch = compose_config([f"model={name}"]).model.arch
        with torch.device("meta"):
            ours = build_model(arch)
            hf = transformers.AutoModelForCausalLM.from_config(_hf_config(arch), dtype=torch.float32)
        out[name] = (ours, hf)
    return out


@pytest.mark.parametrize("name", PRESETS)
def test_preset_matches_transformers_parameter_for_parameter(built, name):
    ours, hf = built[name]
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf_shapes = {_disk_name(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert sorted(set(ours_shapes) ^ set(hf_shapes)) == []
    assert {k: s for k, s in ours_shapes.items() if hf_shapes[k] != s} == {}
    assert all(v.dtype == torch.float32 for v in ours.state_dict().values())
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())  # tied head counted once


@pytest.mark.parametrize("name", PRESETS)
def test_preset_config_json_round_trips(built, name):
    """transformers reads our config.json back to the same architecture (no silent defaults)."""
    ours, hf = built[name]
    d = ours.config.to_hf_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "embedding_multiplier", "residual_multiplier",
                "attention_multiplier", "logits_scaling", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings"):
        assert getattr(hf.config, key) == d[key], key
    if ours.config.is_hybrid:
        assert list(hf.config.layer_types) in (d["layer_types"],
                                               [{"mamba": "linear_attention", "attention": "full_attention"}[t]
                                                for t in d["layer_types"]])
        assert hf.config.position_embedding_type == d["position_embedding_type"]
        for key in ("num_local_experts", "shared_intermediate_size", "mamba_n_heads", "mamba_d_head",
                    "mamba_d_state", "mamba_n_groups"):
            assert getattr(hf.config, key) == d[key], key


@pytest.mark.parametrize("name", PRESETS)
def test_preset_counts_match_published_sizes(built, name):
    ours, _ = built[name]
    info = describe(ours, seq_len=4096)
    total, active, tol, _source = PUBLISHED[name]
    assert info["parameters_total"] == pytest.approx(total, rel=tol)
    if name == "granite-4.0-h-tiny":
        # IBM's "1B active" names the 1.47B (1.31B without the embedding) by rounding down.
        assert 1.0e9 <= info["parameters_active"] < 1.5e9
        assert info["parameters_active"] - info["parameters_embedding"] < 1.5e9
    else:
        assert info["parameters_active"] == pytest.approx(active, rel=tol)
    assert info["vocab_size"] == ours.config.vocab_size


def test_in_memory_to_disk_renames_are_what_save_pretrained_writes(tmp_path):
    """The rename table above, checked against what the installed transformers writes to disk."""
    from safetensors import safe_open

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
              num_local_experts=4, num_experts_per_tok=2)
    families = {"granitemoe": {}, "granitemoehybrid": dict(
        shared_intermediate_size=24, layer_types=["mamba", "attention"], mamba_n_heads=4,
        mamba_d_state=8, mamba_chunk_size=8)}
    for model_type, extra in families.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(model_type, **kw, **extra))
        hf.save_pretrained(tmp_path / model_type)
        with safe_open(str(tmp_path / model_type / "model.safetensors"), "pt") as f:
            disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        memory = {_disk_name(k): tuple(v.shape) for k, v in hf.state_dict().items()}
        memory.pop("lm_head.weight")  # tied: not written
        assert memory == disk, model_type


def test_info_cli_prints_the_real_h_tiny(capsys):
    assert info_main(["model=granite-4.0-h-tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "granitemoehybrid"
    assert info["layers"] == 40
    assert info["layer_pattern"] == ("mambax5 attentionx1 mambax9 attentionx1 mambax9 attentionx1 "
                                     "mambax9 attentionx1 mambax4")
    assert info["channel_mixer"] == "moe+shared"
    assert info["experts"] == "6 of 64"
    assert info["vocab_size"] == 100352
    assert info["parameters_total"] == 6_939_037_248
    assert info["parameters_active"] == 1_465_470_528
    assert info["parameters_embedding"] == 100352 * 1536
    assert info["train_flops_per_token"] > 6 * (info["parameters_active"] - info["parameters_embedding"])


@pytest.mark.parametrize("name", ["granite-4.0-h-tiny", "granite-4.0-h-micro"])
def test_published_nope_spelling_reads_as_nope(built, name):
    """Granite-4.0-H config.json files say position_embedding_type "nope"; that is our null."""
    from granite_train.models import GraniteConfig

    ours, _ = built[name]
    d = ours.config.to_hf_dict()
    d["position_embedding_type"] = "nope"
    back = GraniteConfig.from_hf_dict(d)
    back.validate()
    assert back.position_embedding_type is None and not back.uses_rope
    assert back.to_hf_dict() == ours.config.to_hf_dict()
