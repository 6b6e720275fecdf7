"""The dataset shapes TRL documents (text, prompt-completion strings, conversational messages,
conversational prompt-completion): detection with data.format=auto, exact label masks, .txt
files, unknown roles, the data report's words and the smaller-than-a-step warning."""

import itertools
import json
import logging

import pytest

from granite_train.config import DataConfig, TrainerConfig, validate_data
from granite_train.data import build_train_data, load_tokenizer
from granite_train.data.chat import GraniteRenderer, JinjaRenderer
from granite_train.data.tokenizer import granite_chat_template
from granite_train.errors import UserError

TRAINER = TrainerConfig(tokens_per_step=256, micro_batch_tokens=128)
IGNORE = -100
PC = [{"prompt": "The sky is", "completion": " blue."},
      {"prompt": "Two plus two is", "completion": " four, of course."}]
CONV_PC = [{"prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi there"},
                       {"role": "assistant", "content": "Hello, human"},
                       {"role": "user", "content": "Say bye"}],
            "completion": [{"role": "assistant", "content": "Bye for now"}]}]
MESSAGES = [{"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye bye"}]}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-bundled", None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tok, path, trainer=TRAINER, **kw):
    return build_train_data(DataConfig(path=str(path), **{"max_length": 64, **kw}), trainer, tok, 0, 1)


def examples(data):
    """One epoch's examples as {input ids: labels}, read from the packed micro-batches (the
    collator sets each example's first label to -100)."""
    steps = itertools.islice(data.steps(), data.num_steps_per_epoch or 1)
    out = {}
    for step in steps:
        for mb in step.micro_batches:
            ids, labels, cu = mb["input_ids"][0].tolist(), mb["labels"][0].tolist(), mb["cu_seq_lens"].tolist()
            for a, b in zip(cu, cu[1:]):
                out[tuple(ids[a:b])] = labels[a:b]
    return out


def trained_text(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])


def granite_text(messages, eos):
    return "".join(f"<|start_of_role|>{m['role']}<|end_of_role|>{m['content']}{eos}\n" for m in messages)


def test_text_is_detected_and_every_token_trained(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world"}, {"text": "A second document."}])
    with caplog.at_level(logging.INFO, logger="granite_train.data"):
        data = build(tok, path)
    assert data.stats.format == "text"
    assert sum("data.format=auto" in r.getMessage() and "reads as text" in r.getMessage()
               for r in caplog.records) == 1
    got = examples(data)
    for text in ("Hello world", "A second document."):
        ids = tuple(tok.encode(text) + [tok.eos_token_id])
        assert got[ids] == [IGNORE] + list(ids[1:])


@pytest.mark.parametrize("fmt", ["auto", "prompt_completion"])
def test_prompt_completion_strings_train_the_completion_and_eos(tok, tmp_path, fmt, caplog):
    path = write_jsonl(tmp_path / "pc.jsonl", PC)
    with caplog.at_level(logging.INFO, logger="granite_train.data"):
        data = build(tok, path, format=fmt)
    assert data.stats.format == "prompt_completion"
    assert ("reads as prompt_completion (strings, no chat template" in caplog.text) == (fmt == "auto")
    got = examples(data)
    assert len(got) == 2
    for row in PC:
        prompt, completion = tok.encode(row["prompt"]), tok.encode(row["completion"])
        # no chat template: the plain text, whose tokens split at the prompt's end
        assert tok.encode(row["prompt"] + row["completion"]) == prompt + completion
        ids = tuple(prompt + completion + [tok.eos_token_id])
        assert got[ids] == [IGNORE] * len(prompt) + completion + [tok.eos_token_id]
    assert data.stats.trained_tokens == sum(len(tok.encode(r["completion"])) + 1 for r in PC)
    # train_on=all: every token (but each example's first, which predicts nothing)
    for ids, labels in examples(build(tok, path, format=fmt, train_on="all")).items():
        assert labels == [IGNORE] + list(ids[1:])


def test_prompt_completion_strings_with_format_chat_are_a_user_and_an_assistant_turn(tok, tmp_path):
    data = build(tok, write_jsonl(tmp_path / "pc.jsonl", PC), format="chat", chat_template="granite")
    assert data.stats.format == "prompt_completion as chat"
    got = examples(data)
    eos = tok.eos_token
    for row in PC:
        text = granite_text([{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["completion"]}], eos)
        ids = tuple(tok.encode(text))
        assert trained_text(tok, ids, got[ids]) == row["completion"] + eos


def test_conversational_messages_train_the_assistant_turns(tok, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MESSAGES)
    auto, chat = build(tok, path, chat_template="granite"), build(tok, path, format="chat", chat_template="granite")
    assert (auto.stats.format, chat.stats.format) == ("chat", "chat")
    assert examples(auto) == examples(chat)
    (ids, labels), = examples(auto).items()
    assert tok.decode(ids) == granite_text(MESSAGES[0]["messages"], tok.eos_token)
    assert trained_text(tok, ids, labels) == f"Hello{tok.eos_token}Bye bye{tok.eos_token}"


@pytest.mark.parametrize("template", ["granite", granite_chat_template()])  # built-in and jinja renderers
@pytest.mark.parametrize("streaming", [False, True])
def test_conversational_prompt_completion_trains_only_the_completion(tok, tmp_path, template, streaming):
    path = write_jsonl(tmp_path / "cpc.jsonl", CONV_PC)
    data = build(tok, path, chat_template=template, streaming=streaming)
    assert data.stats.format == "conversational prompt_completion"
    (ids, labels), = examples(data).items()
    row = CONV_PC[0]
    assert tok.decode(ids) == granite_text(row["prompt"] + row["completion"], tok.eos_token)
    # the prompt's assistant turn ("Hello, human") is context, not a target
    assert trained_text(tok, ids, labels) == "Bye for now" + tok.eos_token
    completion = tok.encode("Bye for now") + [tok.eos_token_id]
    start = len(ids) - len(completion) - 1  # ... completion + EOS + "\n"
    assert list(ids[start:-1]) == completion
    assert labels[start:-1] == completion and set(labels[:start] + labels[-1:]) == {IGNORE}


def test_renderers_train_the_messages_they_are_told(tok):
    msgs = CONV_PC[0]["prompt"] + CONV_PC[0]["completion"]
    for renderer in (GraniteRenderer(tok.eos_token), JinjaRenderer(granite_chat_template(), None, tok.eos_token)):
        text, spans = renderer.render(msgs)  # default: the assistant turns
        assert [text[a:b] for a, b in spans] == ["Hello, human" + tok.eos_token, "Bye for now" + tok.eos_token]
        _, spans = renderer.render(msgs, trained=[False, True, False, False, True])  # any role
        assert [text[a:b] for a, b in spans] == ["Hi there" + tok.eos_token, "Bye for now" + tok.eos_token]
        with pytest.raises(ValueError, match="2 flags for 5 messages"):
            renderer.render(msgs, trained=[True, False])


@pytest.mark.parametrize("rows, fmt, needle", [
    ([{"body": "x"}], "auto", "has no 'messages' field, nor 'prompt' + 'completion', nor 'text' (its columns: body)"),
    ([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}], "auto",
     "has a 'prompt' of type str and a 'completion' of type list"),
    (MESSAGES, "prompt_completion", "has no 'prompt' and 'completion' fields (its columns: messages)"),
])
def test_undetectable_shapes_are_one_line(tok, tmp_path, rows, fmt, needle):
    with pytest.raises(UserError) as err:
        build(tok, write_jsonl(tmp_path / "x.jsonl", rows), format=fmt)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_txt_files_by_document_or_paragraph(tok, tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("First para,\ntwo lines.\n\nSecond para.\n\n\nThird para.\n")
    (tmp_path / "txt" / "b.txt").write_text("Only one here.\n")
    for fmt in ("auto", "text"):
        doc = build(tok, tmp_path / "txt", format=fmt, text_field="ignored_for_txt")
        assert (doc.stats.format, doc.stats.examples) == ("text", 2)
        para = build(tok, tmp_path / "txt", format=fmt, txt_sample_by="paragraph")
        assert para.stats.examples == 4
    got = examples(para)
    ids = tuple(tok.encode("Second para.") + [tok.eos_token_id])
    assert got[ids] == [IGNORE] + list(ids[1:])
    assert build(tok, tmp_path / "txt" / "b.txt").stats.examples == 1
    with pytest.raises(UserError, match=r"is plain text \(.txt\), which data.format=chat cannot read.*"
                                        r"set data.format=text \(or auto\)"):
        build(tok, tmp_path / "txt" / "a.txt", format="chat")
    write_jsonl(tmp_path / "txt" / "c.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match=r"mixes file types \(json, text\)"):
        build(tok, tmp_path / "txt")


def test_config_values_are_checked():
    with pytest.raises(UserError, match="data.txt_sample_by='line' is not one of document, paragraph"):
        validate_data(DataConfig(txt_sample_by="line"), TrainerConfig())
    with pytest.raises(UserError, match=r"data.roles=\[\] must be a non-empty list"):
        validate_data(DataConfig(roles=[]), TrainerConfig())
    with pytest.raises(UserError, match="data.format='jsonl' is not one of auto, chat, text, prompt_completion"):
        validate_data(DataConfig(format="jsonl"), TrainerConfig())
    assert DataConfig().format == "auto" and DataConfig().roles == ["system", "user", "assistant", "tool"]


def test_unknown_role_names_the_role_and_the_row(tok, tmp_path):
    rows = MESSAGES * 5
    rows[3] = {"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(UserError) as err:
        build(tok, path)
    assert str(err.value) == (f"row 3 of {path} has unknown role 'asistant' in 'messages'; roles: system, user, "
                              f"assistant, tool; fix the row, or add the role to data.roles if the chat template "
                              f"knows it, or set data.skip_bad_rows=true")
    data = build(tok, path, skip_bad_rows=True)
    assert (data.stats.bad_rows, data.stats.dropped_no_labels, data.stats.examples) == (1, 0, 4)
    assert "0 without labels, 1 bad rows" in data.stats.report()
    # a role the template knows: allowed once listed (that row then has no assistant turn)
    data = build(tok, path, roles=["system", "user", "assistant", "tool", "asistant"])
    assert (data.stats.bad_rows, data.stats.dropped_no_labels) == (0, 1)
    # ShareGPT names map first; the completion side of conversational rows is checked too
    share = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    assert build(tok, write_jsonl(tmp_path / "s.jsonl", share), messages_field="conversations").stats.examples == 1
    bad = [{"prompt": CONV_PC[0]["prompt"], "completion": [{"role": "robot", "content": "x"}]}]
    with pytest.raises(UserError, match=r"row 0 of .* has unknown role 'robot' in 'completion'"):
        build(tok, write_jsonl(tmp_path / "c.jsonl", bad))


def test_report_explains_its_drops(tok, tmp_path):
    rows = MESSAGES * 3 + [{"messages": [{"role": "user", "content": "only a question"}]},
                           {"messages": [{"role": "user", "content": "word " * 100},
                                         {"role": "assistant", "content": "late"}]}]
    report = build(tok, write_jsonl(tmp_path / "m.jsonl", rows)).stats.report()
    assert report.startswith(f"data {tmp_path / 'm.jsonl'} (format chat): 5 rows read -> 3 examples")
    assert "dropped 0 over-long, 2 without labels (1 no assistant turn, 1 nothing left after truncation), " \
           "0 bad rows" in report
    assert "\n" not in report
    pc = PC + [{"prompt": "Empty:", "completion": ""}]
    report = build(tok, write_jsonl(tmp_path / "pc.jsonl", pc)).stats.report()
    assert "(format prompt_completion)" in report and "1 without labels (no completion)" in report
    cpc = CONV_PC + [{"prompt": CONV_PC[0]["prompt"], "completion": []}]
    report = build(tok, write_jsonl(tmp_path / "cpc.jsonl", cpc)).stats.report()
    assert "(format conversational prompt_completion)" in report and "1 without labels (no completion)" in report


def test_warns_when_the_data_is_smaller_than_one_step(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "pc.jsonl", PC)
    with caplog.at_level(logging.WARNING, logger="granite_train.data"):
        data = build(tok, path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"data {path} has {data.stats.tokens} tokens, fewer than one optimizer step takes "
                        f"(trainer.tokens_per_step=256): every step will repeat the whole data set; lower "
                        f"trainer.tokens_per_step or add data"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="granite_train.data"):
        build(tok, write_jsonl(tmp_path / "more.jsonl", PC * 30))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_cli_trains_on_prompt_completion(cli, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", PC * 20)
    out = tmp_path / "run"
    proc = cli("recipe=sft_tiny", "model=granite-tiny", f"data.path={path}", "data.format=auto",
               "data.max_length=64", "trainer.tokens_per_step=128", "trainer.micro_batch_tokens=128",
               "model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=1",
               "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=1", "trainer.max_steps=2",
               "scheduler.warmup_steps=1", "trainer.progress=false", "trainer.dtype=fp32",
               f"trainer.output_dir={out}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reads as prompt_completion (strings, no chat template" in proc.stderr
    assert "(format prompt_completion): 40 rows read -> 40 examples" in proc.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s.get("split") != "eval"] == [1, 2]
