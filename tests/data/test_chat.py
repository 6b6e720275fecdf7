"""Chat rendering and label masks: built-in Granite format and jinja templates."""

import numpy as np
import pytest

from granite_train.data import load_tokenizer
from granite_train.data.chat import GraniteRenderer, JinjaRenderer, chat_overhead, encode_chats, make_renderer
from granite_train.data.tokenizer import granite_chat_template
from granite_train.errors import UserError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there, how are you?"},
    {"role": "assistant", "content": "Fine, thanks! And you?"},
    {"role": "user", "content": "Good.\nBye"},
    {"role": "assistant", "content": " See you 👋"},
]

# Granite 3.x style: injects a default system prompt, honours add_generation_prompt.
GRANITE3_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}"
    "{%- set system_message = 'Knowledge Cutoff Date: April 2024.\nYou are Granite, developed by IBM.' %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\n' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- if loop.last and add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
    "{%- endfor %}"
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-bundled", None)


def trained_text(tok, ids, labels):
    return tok.decode([int(t) for t, y in zip(ids, labels) if y != -100])


def assistant_target(tok, messages):
    return "".join(m["content"] + tok.eos_token for m in messages if m["role"] == "assistant")


def test_granite_format_and_assistant_only_labels(tok):
    (ids, labels), = encode_chats(tok, GraniteRenderer(tok.eos_token), [CONV], "assistant")
    text = tok.decode(ids)
    assert text == "".join(f"<|start_of_role|>{m['role']}<|end_of_role|>{m['content']}<|end_of_text|>\n"
                           for m in CONV)
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    assert trained_text(tok, ids, labels) == assistant_target(tok, CONV)
    assert labels[0] == -100  # never trained: the role header of the first message
    trained = labels != -100
    assert (labels[trained] == ids[trained]).all()  # unshifted
    # role headers are not trained
    header_ids = {tok.token_to_id("<|start_of_role|>"), tok.token_to_id("<|end_of_role|>")}
    assert not any(int(t) in header_ids for t in ids[trained])


def test_train_on_all(tok):
    (ids, labels), = encode_chats(tok, GraniteRenderer(tok.eos_token), [CONV], "all")
    assert (ids == labels).all()


@pytest.mark.parametrize("template", [granite_chat_template(), GRANITE3_LIKE])
def test_jinja_template_masks_match(tok, template):
    renderer = JinjaRenderer(template, None, tok.eos_token)
    for conv in (CONV, CONV[1:], CONV[1:3]):
        (ids, labels), = encode_chats(tok, renderer, [conv], "assistant")
        assert trained_text(tok, ids, labels) == assistant_target(tok, conv)
    # the built-in template rendered by jinja equals the Python renderer, token for token
    if template == granite_chat_template():
        a = encode_chats(tok, renderer, [CONV], "assistant")[0]
        b = encode_chats(tok, GraniteRenderer(tok.eos_token), [CONV], "assistant")[0]
        assert all((x == y).all() for x, y in zip(a, b))


def test_jinja_template_without_generation_prompt(tok):
    template = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    (ids, labels), = encode_chats(tok, JinjaRenderer(template, None, tok.eos_token), [CONV[1:3]], "assistant")
    assert trained_text(tok, ids, labels) == "Fine, thanks! And you?" + tok.eos_token


def test_generation_prompt_longer_than_the_turn_header(tok):
    # Thinking-style templates add "<think>" to the generation prompt only: the role header must
    # still stay untrained.
    template = ("{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}"
                "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant"
                "<|end_of_role|><think>\n{% endif %}")
    (ids, labels), = encode_chats(tok, JinjaRenderer(template, None, tok.eos_token), [CONV[1:3]], "assistant")
    assert trained_text(tok, ids, labels) == "Fine, thanks! And you?" + tok.eos_token


def test_non_incremental_template_is_refused(tok):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}"
    with pytest.raises(UserError, match="prefix"):
        encode_chats(tok, JinjaRenderer(template, None, tok.eos_token), [CONV], "assistant")


def test_make_renderer_choices(tok, tmp_path):
    assert isinstance(make_renderer(None, tok), GraniteRenderer)
    assert isinstance(make_renderer("granite", tok), GraniteRenderer)
    assert isinstance(make_renderer(GRANITE3_LIKE, tok), JinjaRenderer)
    (tmp_path / "t.jinja").write_text(GRANITE3_LIKE)
    assert make_renderer(str(tmp_path / "t.jinja"), tok).template == GRANITE3_LIKE
    with pytest.raises(UserError, match="chat_template"):
        make_renderer("chatml", tok)


def test_overhead(tok):
    # <|start_of_role|> ROLE <|end_of_role|> <|end_of_text|> \n, for user and assistant
    roles = len(tok.encode("user")) + len(tok.encode("assistant"))
    assert chat_overhead(tok, GraniteRenderer(tok.eos_token)) == 8 + roles == 11


def test_checkpoint_template_end_to_end(tok, tmp_path):
    """A tokenizer directory with its own jinja template is used when data.chat_template is null;
    "granite" forces the built-in format."""
    import json

    from granite_train.config import DataConfig, TrainerConfig
    from granite_train.data import build_train_data, load_tokenizer

    tok.save(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    config["chat_template"] = GRANITE3_LIKE
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps(config))
    ckpt_tok = load_tokenizer(None, str(tmp_path / "ckpt"))
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CONV[1:]}) + "\n")
    trainer = TrainerConfig(tokens_per_step=256, micro_batch_tokens=128)

    def first_example(chat_template):
        cfg = DataConfig(path=str(tmp_path / "c.jsonl"), max_length=128, chat_template=chat_template)
        mb = next(build_train_data(cfg, trainer, ckpt_tok, 0, 1).steps()).micro_batches[0]
        return mb["input_ids"][0].tolist(), mb["labels"][0].tolist()

    ids, labels = first_example(None)
    assert "You are Granite" in tok.decode(ids)  # the checkpoint template's default system prompt
    assert trained_text(tok, ids, labels) == assistant_target(tok, CONV[1:])
    ids, labels = first_example("granite")
    assert "You are Granite" not in tok.decode(ids)
    assert trained_text(tok, ids, labels) == assistant_target(tok, CONV[1:])
    ids, labels = first_example(GRANITE3_LIKE)  # a literal template string
    assert "You are Granite" in tok.decode(ids)


def test_common_prefix_length_equals_commonprefix():
    import os
    import random

    from granite_train.data.chat import common_prefix_length

    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("ab<|>") for _ in range(rng.randrange(0, 40)))
        b = a[:rng.randrange(0, len(a) + 1)] + "".join(rng.choice("ab") for _ in range(rng.randrange(0, 5)))
        for x, y in ((a, b), (b, a), (a, a), ("", a)):
            assert common_prefix_length(x, y) == len(os.path.commonprefix([x, y]))
