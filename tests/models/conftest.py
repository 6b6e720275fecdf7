"""Tiny Granite models for the model tests: fp32, CPU, random but non-trivial weights."""

import pytest
import torch

VOCAB = 128


def hf_config_kwargs(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              embedding_multiplier=12.0, residual_multiplier=0.22,
              attention_multiplier=0.015625 * 4, logits_scaling=6.0, rope_theta=10000.0,
              initializer_range=0.1, tie_word_embeddings=True)
    kw.update(overrides)
    return kw


@pytest.fixture
def make_hf_checkpoint(tmp_path):
    """Save a random transformers GraniteForCausalLM; returns (dir, hf_model)."""
    import transformers

    def _make(name="hf", seed=0, **overrides):
        torch.manual_seed(seed)
        cfg = transformers.GraniteConfig(**hf_config_kwargs(**overrides))
        model = transformers.GraniteForCausalLM(cfg).eval()
        with torch.no_grad():  # perturb norms and biases too, so every parameter matters
            for name_, p in model.named_parameters():
                if name_.endswith("layernorm.weight") or name_ == "model.norm.weight":
                    p.add_(0.1 * torch.randn_like(p))
                elif name_.endswith(".bias"):
                    p.normal_(0.0, 0.05)
        out = tmp_path / name
        model.save_pretrained(out)
        return out, model

    return _make


@pytest.fixture
def tiny_model():
    from granite_train.models import GraniteConfig, build_model

    def _make(seed=0, **overrides):
        torch.manual_seed(seed)
        kw = hf_config_kwargs(**overrides)
        kw.pop("rope_theta")
        cfg = GraniteConfig(rope_theta=10000.0, **kw)
        model = build_model(cfg)
        with torch.no_grad():  # non-trivial norms and biases
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.add_(0.1 * torch.randn_like(p))
                elif name.endswith(".bias"):
                    p.normal_(0.0, 0.05)
        return model

    return _make
