"""Tokenizers: the bundled GPT-2 BPE + Granite tokens, directories, and transformers round trips."""

import json

import pytest

from granite_train.data import load_tokenizer
from granite_train.data.tokenizer import granite_chat_template
from granite_train.errors import UserError

TEXT = "<|start_of_role|>user<|end_of_role|> Hello wörld, 1234 tokens!\n<|end_of_text|>"


@pytest.fixture(scope="module")
def bundled():
    return load_tokenizer("gpt2-bundled", None)


def test_bundled(bundled):
    assert load_tokenizer(None, None).vocab_size == bundled.vocab_size == 50260
    assert bundled.eos_token_id == bundled.token_to_id("<|end_of_text|>") == 50257
    for special in ("<|start_of_role|>", "<|end_of_role|>"):
        assert bundled.encode(special) == [bundled.token_to_id(special)]
    ids = bundled.encode("Hello world")
    assert ids == [15496, 995]  # GPT-2's own ids: no BOS/EOS added
    assert bundled.decode(bundled.encode(TEXT)) == TEXT
    assert bundled.chat_template is None


def test_save_loads_in_transformers(bundled, tmp_path):
    import transformers
    bundled.save(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in (TEXT, "plain text", "  spaces\tand\nnewlines ünïcode 日本語"):
        assert theirs.encode(text, add_special_tokens=False) == bundled.encode(text)
    assert theirs.eos_token == "<|end_of_text|>" and theirs.eos_token_id == bundled.eos_token_id
    assert len(theirs) == bundled.vocab_size
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == (
        "<|start_of_role|>user<|end_of_role|>hi<|end_of_text|>\n"
        "<|start_of_role|>assistant<|end_of_role|>yo<|end_of_text|>\n")


def test_directory_round_trip_keeps_template_and_eos(bundled, tmp_path):
    bundled.save(tmp_path / "a")
    again = load_tokenizer(str(tmp_path / "a"), None)
    assert again.vocab_size == bundled.vocab_size and again.eos_token_id == bundled.eos_token_id
    assert again.chat_template == granite_chat_template()
    assert again.encode(TEXT) == bundled.encode(TEXT)
    # spec None: the checkpoint's own tokenizer
    assert load_tokenizer(None, str(tmp_path / "a")).chat_template == granite_chat_template()


def test_checkpoint_layouts(bundled, tmp_path):
    bundled.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|end_of_role|>", "special": True}
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = load_tokenizer(str(tmp_path), None)
    assert tok.eos_token == "<|end_of_role|>" and tok.chat_template == "{{ messages[0]['content'] }}"


def test_errors(tmp_path):
    with pytest.raises(UserError, match="neither"):
        load_tokenizer(str(tmp_path / "nope"), None)
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(None, str(tmp_path))
