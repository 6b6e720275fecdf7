"""GraniteConfig: config.json interop and use as a Hydra (OmegaConf) schema."""

import json

import pytest
from omegaconf import OmegaConf

from granite_train.models import GraniteConfig, read_config


def test_reads_transformers_config_json(make_hf_checkpoint):
    path, hf = make_hf_checkpoint(tie_word_embeddings=False, rope_theta=50000.0)
    cfg = read_config(path)
    assert cfg.model_type == "granite" and cfg.vocab_size == 128 and cfg.num_key_value_heads == 2
    assert cfg.rope_theta == 50000.0 and cfg.tie_word_embeddings is False
    assert cfg.embedding_multiplier == 12.0 and cfg.softmax_scale == pytest.approx(0.0625)
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == 2 and cfg.pad_token_id is None
    assert cfg.hf_extra == {"use_cache": True}  # dtype, architectures, versions are dropped


def test_reads_transformers_4_layout_and_keeps_harmless_extras():
    d = {"model_type": "granite", "architectures": ["GraniteForCausalLM"], "torch_dtype": "bfloat16",
         "transformers_version": "4.46.0", "vocab_size": 49155, "hidden_size": 2048,
         "intermediate_size": 8192, "num_hidden_layers": 40, "num_attention_heads": 32,
         "num_key_value_heads": 8, "rope_theta": 10000000.0, "rope_scaling": None,
         "embedding_multiplier": 12, "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
         "logits_scaling": 8, "eos_token_id": [0, 7], "attention_dropout": 0.0}
    cfg = GraniteConfig.from_hf_dict(d)
    assert cfg.rope_theta == 1e7 and isinstance(cfg.embedding_multiplier, float)
    assert cfg.eos_token_id is None and cfg.hf_extra == {"eos_token_id": [0, 7]}
    out = cfg.to_hf_dict()
    assert out["eos_token_id"] == [0, 7] and out["rope_theta"] == 1e7
    assert out["rope_parameters"] == {"rope_theta": 1e7, "rope_type": "default"}
    assert GraniteConfig.from_hf_dict(out) == cfg


def test_round_trip_and_defaults():
    cfg = GraniteConfig(vocab_size=100, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    assert cfg.resolved_head_dim == 16 and cfg.softmax_scale == 0.25
    d = cfg.to_hf_dict()
    assert d["attention_multiplier"] == 0.25 and "head_dim" not in d  # transformers' default is 1.0
    back = GraniteConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert back.attention_multiplier == 0.25 and back.softmax_scale == cfg.softmax_scale


def test_is_an_omegaconf_schema():
    schema = OmegaConf.structured(GraniteConfig)
    merged = OmegaConf.merge(schema, {"hidden_size": 64, "num_attention_heads": 4, "hf_extra": {"a": [1]}})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, GraniteConfig) and cfg.resolved_head_dim == 16 and cfg.hf_extra == {"a": [1]}
