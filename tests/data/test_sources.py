"""Loading every kind of data.path, and every bad input as a one-line UserError."""

import json

import datasets
import numpy as np
import pytest

from granite_train.config import ColumnMap, DataConfig, TrainerConfig
from granite_train.data import build_train_data, load_tokenizer
from granite_train.data.demo import chitchat_to_messages
from granite_train.errors import UserError

TRAINER = TrainerConfig(tokens_per_step=256, micro_batch_tokens=128)


def conv(i):
    return {"messages": [{"role": "user", "content": f"question {i} " * (i % 7 + 1)},
                         {"role": "assistant", "content": f"answer {i} " * (i % 5 + 1)}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-bundled", None)


def build(tok, path, trainer=TRAINER, **kw):
    return build_train_data(DataConfig(path=str(path), **{"max_length": 64, **kw}), trainer, tok, 0, 1)


def all_examples(data):
    return sorted(i for p in data.plan(0) for i in p.example_ids)


def test_formats_and_layouts(tok, tmp_path):
    rows = [conv(i) for i in range(30)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    assert build(tok, tmp_path / "a.jsonl").stats.examples == 30
    (tmp_path / "arr.json").write_text(json.dumps(rows))
    assert build(tok, tmp_path / "arr.json").stats.examples == 30
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "d" / "x.jsonl", rows)
    write_jsonl(tmp_path / "d" / "sub" / "y.jsonl", rows[:5])
    assert build(tok, tmp_path / "d").stats.rows_read == 35
    assert build(tok, f"{tmp_path}/d/**/*.jsonl").stats.rows_read == 35
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert build(tok, tmp_path / "saved").stats.examples == 30
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    assert build(tok, tmp_path / "dd", split="test").stats.examples == 3
    with pytest.raises(UserError, match="splits"):
        build(tok, tmp_path / "dd", split="validation")
    ds.to_parquet(str(tmp_path / "a.parquet"))
    assert build(tok, tmp_path / "a.parquet").stats.examples == 30


def test_instruction_columns(tok, tmp_path):
    qa = datasets.Dataset.from_list([{"q": f"what is {i}?", "a": f"it is {i}", "s": "Be nice." if i % 2 else ""}
                                     for i in range(12)])
    qa.to_csv(str(tmp_path / "qa.csv"))
    data = build(tok, tmp_path / "qa.csv", columns=ColumnMap(user="q", assistant="a", system="s"))
    step = next(data.steps())
    labels = step.micro_batches[0]["labels"][0]
    trained = tok.decode([int(x) for x in labels if x != -100])
    assert "it is" in trained and "what is" not in trained and "Be nice" not in trained
    with pytest.raises(UserError, match="data.columns.assistant='b' is not a column"):
        build(tok, tmp_path / "qa.csv", columns=ColumnMap(user="q", assistant="b"))


def test_text_format(tok, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world"}, {"text": "A second document."}])
    data = build(tok, tmp_path / "t.jsonl", format="text")
    mb = next(data.steps()).micro_batches[0]
    cu = mb["cu_seq_lens"].tolist()
    ids, labels = mb["input_ids"][0].tolist(), mb["labels"][0].tolist()
    docs = sorted(tok.decode(ids[a:b]) for a, b in zip(cu, cu[1:]))
    assert docs == ["A second document.<|end_of_text|>", "Hello world<|end_of_text|>"]
    for a, b in zip(cu, cu[1:]):  # everything trained except the first token of each document
        assert labels[a] == -100 and labels[a + 1:b] == ids[a + 1:b]
    assert data.stats.trained_tokens == sum(b - a - 1 for a, b in zip(cu, cu[1:]))


def test_missing_path(tok, tmp_path):
    for path in (tmp_path / "nope.jsonl", tmp_path / "nope", "./nope", f"{tmp_path}/*.jsonl"):
        with pytest.raises(UserError, match="does not exist|matches no"):
            build(tok, path)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(UserError, match="contains no"):
        build(tok, tmp_path / "emptydir")
    (tmp_path / "x.xml").write_text("hi")  # (.txt is read as text: tests/data/test_formats.py)
    with pytest.raises(UserError, match="unsupported file type"):
        build(tok, tmp_path / "x.xml")


def test_empty_dataset(tok, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="has no rows"):
        build(tok, tmp_path / "e.jsonl")
    datasets.Dataset.from_dict({"messages": []}).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(UserError, match="has no rows"):
        build(tok, tmp_path / "e.parquet")


def test_missing_fields(tok, tmp_path):
    write_jsonl(tmp_path / "f.jsonl", [{"conversation": conv(0)["messages"]}])
    with pytest.raises(UserError, match=r"row 0 of .*f.jsonl has no 'messages' field.*data.messages_field"):
        build(tok, tmp_path / "f.jsonl")
    assert build(tok, tmp_path / "f.jsonl", messages_field="conversation").stats.examples == 1
    rows = [conv(i) for i in range(20)]
    rows[17] = {"other": 1}
    write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(UserError, match=r"row 17 of .*g.jsonl has no 'messages' field; set data.messages_field"):
        build(tok, tmp_path / "g.jsonl")
    data = build(tok, tmp_path / "g.jsonl", skip_bad_rows=True)
    assert data.stats.bad_rows == 1 and data.stats.examples == 19 and "1 bad rows" in data.stats.report()
    write_jsonl(tmp_path / "t.jsonl", [{"body": "x"}])
    with pytest.raises(UserError, match="no 'text' field"):
        build(tok, tmp_path / "t.jsonl", format="text")


def test_malformed_json_lines(tok, tmp_path):
    lines = [json.dumps(conv(i)) for i in range(10)]
    lines[2] = '{"messages": [oops'
    lines[6] = '[1, 2]'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:3: malformed JSON.*2 malformed lines.*data.skip_bad_rows=true"):
        build(tok, path)
    data = build(tok, path, skip_bad_rows=True)
    assert data.stats.malformed_lines == 2 and data.stats.examples == 8
    assert "2 malformed lines" in data.stats.report()
    (tmp_path / "bin.jsonl").write_bytes(json.dumps(conv(0)).encode() + b"\n\xff\xfe garbage\n")
    with pytest.raises(UserError, match=r"bin.jsonl:2: malformed JSON line \(not UTF-8\)"):
        build(tok, tmp_path / "bin.jsonl")
    (tmp_path / "arr.json").write_text('[{"messages": []},\n {"messages": ]')
    with pytest.raises(UserError, match=r"arr.json:2: malformed JSON"):
        build(tok, tmp_path / "arr.json")


def test_bad_message_rows(tok, tmp_path):
    rows = [conv(i) for i in range(5)]
    rows[1] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(UserError, match="row 1 of .*content is not a string"):
        build(tok, tmp_path / "m.jsonl")
    assert build(tok, tmp_path / "m.jsonl", skip_bad_rows=True).stats.bad_rows == 1


def test_length_guards(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [conv(i) for i in range(5)])
    with pytest.raises(UserError, match=r"data.max_length=8 is smaller than the chat template overhead \(11 tokens"):
        build(tok, tmp_path / "a.jsonl", max_length=8)
    with pytest.raises(UserError, match="trainer.micro_batch_tokens=32 is smaller than data.max_length=64"):
        build(tok, tmp_path / "a.jsonl", trainer=TrainerConfig(tokens_per_step=256, micro_batch_tokens=32))
    with pytest.raises(UserError, match="trainer.tokens_per_step=48 is smaller than data.max_length=64"):
        build(tok, tmp_path / "a.jsonl", trainer=TrainerConfig(tokens_per_step=48, micro_batch_tokens=64))
    # not a multiple of micro_batch_tokens x world_size: fine
    build(tok, tmp_path / "a.jsonl", trainer=TrainerConfig(tokens_per_step=300, micro_batch_tokens=70))


def test_overlong_truncate_drop_and_no_labels(tok, tmp_path):
    rows = [conv(i) for i in range(6)]
    rows.append({"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]})
    rows.append({"messages": [{"role": "user", "content": "only a user turn"}]})
    write_jsonl(tmp_path / "o.jsonl", rows)
    data = build(tok, tmp_path / "o.jsonl")
    # truncated to 64 tokens the long one has no assistant token left: dropped for no labels
    assert (data.stats.truncated, data.stats.dropped_no_labels, data.stats.examples) == (0, 2, 6)
    assert data.lengths.max() <= 64
    rows[6] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    write_jsonl(tmp_path / "o.jsonl", rows)
    data = build(tok, tmp_path / "o.jsonl")
    assert (data.stats.truncated, data.stats.dropped_no_labels, data.stats.examples) == (1, 1, 7)
    assert data.lengths.max() == 64
    data = build(tok, tmp_path / "o.jsonl", overlong="drop")
    assert (data.stats.dropped_overlong, data.stats.examples) == (1, 6)
    write_jsonl(tmp_path / "u.jsonl", [rows[7]])
    with pytest.raises(UserError, match="no examples left"):
        build(tok, tmp_path / "u.jsonl")


def test_chitchat_conversion():
    sender = lambda s, t: {"sender": s, "text": t}  # noqa: E731
    raw = {"messages": [[sender("a", "hi"), sender("a", "you there?")], [sender("b", "yes")],
                        [sender("b", "what's up")], [sender("a", "nothing")]]}
    assert chitchat_to_messages(raw) == [{"role": "user", "content": "hi\nyou there?"},
                                         {"role": "assistant", "content": "yes\nwhat's up"},
                                         {"role": "user", "content": "nothing"}]


def test_max_examples(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [conv(i) for i in range(30)])
    data = build(tok, tmp_path / "a.jsonl", max_examples=7)
    assert data.stats.rows_read == 7 and all_examples(data) == list(range(7))
    assert np.all(data.lengths > 0)
