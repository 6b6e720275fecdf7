"""Bad checkpoints and configs fail with one UserError line that names every problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from granite_train.errors import UserError
from granite_train.models import load_model, save_model


@pytest.fixture
def saved(tiny_model, tmp_path):
    model = tiny_model(num_hidden_layers=2)
    save_model(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_weights(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _error(path):
    with pytest.raises(UserError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_key(saved):
    _edit_weights(saved, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    assert "missing keys: model.layers.1.mlp.up_proj.weight" in _error(saved)


def test_unexpected_key(saved):
    _edit_weights(saved, lambda s: s.update({"model.layers.1.mlp.extra.weight": torch.zeros(3)}))
    assert "unexpected keys: model.layers.1.mlp.extra.weight" in _error(saved)


def test_wrong_shape(saved):
    _edit_weights(saved, lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    assert "wrong shapes: model.norm.weight (file [65] vs model [64])" in _error(saved)


def test_all_problems_in_one_message(saved):
    def edit(s):
        s.pop("model.layers.0.self_attn.q_proj.weight")
        s.pop("model.layers.1.self_attn.k_proj.weight")
        s["lm_head.bias"] = torch.zeros(128)
        s["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 95)

    _edit_weights(saved, edit)
    message = _error(saved)
    assert ("missing keys: model.layers.0.self_attn.q_proj.weight, model.layers.1.self_attn.k_proj.weight"
            in message)
    assert "unexpected keys: lm_head.bias" in message
    assert "model.layers.0.mlp.down_proj.weight (file [64, 95] vs model [64, 96])" in message


def test_tolerated_extras_load(saved):
    # A stored copy of a tied lm_head and old rotary buffers are harmless.
    _edit_weights(saved, lambda s: s.update({
        "lm_head.weight": s["model.embed_tokens.weight"].clone(),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    load_model(saved)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, expected", [
    # A dense checkpoint relabelled as a hybrid (every layer Mamba by default): a key mismatch.
    ({"model_type": "granitemoehybrid"}, "does not match its config.json: missing keys"),
    ({"model_type": "llama"}, "model_type 'llama' is not a Granite model"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' is not supported"),
    ({"attention_dropout": 1.5}, "attention_dropout=1.5 must be in [0, 1)"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_config(saved, changes, expected):
    _edit_config(saved, **changes)
    assert expected in _error(saved)


def test_missing_files(tmp_path, saved):
    assert "has no config.json" in _error(tmp_path)
    (saved / "model.safetensors").unlink()
    assert "has neither model.safetensors nor model.safetensors.index.json" in _error(saved)


def test_keys_missing_from_config_mean_transformers_defaults(make_hf_checkpoint):
    # An untied checkpoint whose config.json omits tie_word_embeddings and attention_multiplier:
    # transformers reads them as False and 1.0, so must we (not our random-init defaults).
    import transformers
    path, _ = make_hf_checkpoint(tie_word_embeddings=False)
    config = json.loads((path / "config.json").read_text())
    del config["tie_word_embeddings"], config["attention_multiplier"]
    (path / "config.json").write_text(json.dumps(config))
    ours = load_model(path)
    assert ours.config.tie_word_embeddings is False and ours.config.softmax_scale == 1.0
    theirs = transformers.GraniteForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        diff = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_tied_config_with_a_different_lm_head_is_refused(saved):
    _edit_weights(saved, lambda s: s.update({"lm_head.weight": torch.randn_like(s["model.embed_tokens.weight"])}))
    assert "tie_word_embeddings=true but lm_head.weight differs" in _error(saved)


def test_corrupt_index_and_shard(saved):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "not a readable safetensors file" in _error(saved)
    (saved / "model.safetensors.index.json").write_text("{oops")
    assert "is not a safetensors index" in _error(saved)
