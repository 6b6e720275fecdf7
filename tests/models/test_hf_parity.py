"""Our model against transformers' GraniteForCausalLM, both directions (load theirs, save ours)."""

import json

import pytest
import torch

from granite_train.models import load_model, save_model

VOCAB = 128  # as in conftest.py

import transformers

LENGTHS = [1, 5, 17, 33]
TOL = 1e-5


def _max_diff(ours, theirs, lengths=LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, VOCAB, (1, n), generator=g)
            a = ours(input_ids=ids).logits
            b = theirs(input_ids=ids).logits
            worst = max(worst, (a - b).abs().max().item())
    return worst


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_load_transformers_checkpoint_matches_logits(make_hf_checkpoint, tied, bias):
    path, hf = make_hf_checkpoint(tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias)
    hf.config._attn_implementation = "eager"  # an independent reference, not the same SDPA call
    ours = load_model(path).eval()
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert all(p.dtype == torch.float32 and p.requires_grad for p in ours.parameters())
    assert _max_diff(ours, hf) <= TOL


def test_load_transformers_checkpoint_in_bf16(make_hf_checkpoint):
    path, _ = make_hf_checkpoint()
    ours = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("max_shard_size", ["5GB", "40KB"])
def test_save_model_loads_in_transformers(tiny_model, tmp_path, tied, max_shard_size):
    ours = tiny_model(tie_word_embeddings=tied, attention_bias=True).eval()
    out = tmp_path / "ours"
    save_model(ours, out, max_shard_size=max_shard_size)
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size == "40KB")
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (out / "model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GraniteForCausalLM"] and config["model_type"] == "granite"
    assert config["dtype"] == "float32" and config["attention_multiplier"] == pytest.approx(0.0625)

    theirs = transformers.GraniteForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert theirs.config.embedding_multiplier == 12.0 and theirs.config.logits_scaling == 6.0
    assert _max_diff(ours, theirs) <= TOL
    # ... and back into ours: bit-exact.
    again = load_model(out).eval()
    assert _max_diff(ours, again) == 0.0
    assert again.config == ours.config


def test_attention_dropout_checkpoint_trains_with_dropout(make_hf_checkpoint, tmp_path):
    """Granite 3.x configs carry attention_dropout (0.1): eval is unchanged, training drops."""
    path, hf = make_hf_checkpoint(attention_dropout=0.1)
    hf.config._attn_implementation = "eager"
    ours = load_model(path)
    assert ours.config.attention_dropout == 0.1
    assert _max_diff(ours.eval(), hf.eval()) <= TOL
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    ours.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = ours(input_ids=ids, cu_seq_lens=torch.tensor([0, 17, 40], dtype=torch.int32)).logits
        torch.manual_seed(0)
        b = ours(input_ids=ids, cu_seq_lens=torch.tensor([0, 17, 40], dtype=torch.int32)).logits
        c = ours.eval()(input_ids=ids, cu_seq_lens=torch.tensor([0, 17, 40], dtype=torch.int32)).logits
    assert torch.equal(a, b) and (a - c).abs().max().item() > 1e-3
    save_model(ours, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["attention_dropout"] == 0.1
