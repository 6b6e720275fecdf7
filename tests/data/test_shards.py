"""Prepared data (python -m granite_train.prepare): the same steps as raw data, no tokenization
at start, and every mismatch or damage refused in one line."""

import itertools
import json
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data import build_train_data, load_tokenizer
from granite_train.errors import UserError
from granite_train.prepare import prepare

TRAINER = TrainerConfig(tokens_per_step=512, micro_batch_tokens=256)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-bundled", None)


def conv(i):
    return {"messages": [{"role": "user", "content": f"question {i} " * (i % 7 + 1)},
                         {"role": "assistant", "content": f"answer {i} " * (i % 11 + 1)}]}


def text(i):
    return {"text": " ".join(f"t{i}x{k}" for k in range(10 + 37 * (i % 5)))}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    chat, txt = root / "chat.jsonl", root / "text.jsonl"
    chat.write_text("".join(json.dumps(conv(i)) + "\n" for i in range(60)))
    txt.write_text("".join(json.dumps(text(i)) + "\n" for i in range(40)))
    return {"chat": chat, "text": txt}


def _prepare(path, out, *overrides, shard_tokens=1 << 28):
    return prepare([f"data.path={path}", "data.tokenizer=gpt2-bundled", "data.max_length=96", *overrides],
                   out, shard_tokens)


def _batches(data, n_steps):
    it = data.steps()
    return [[{k: v for k, v in mb.items()} for mb in next(it).micro_batches] for _ in range(n_steps)]


def _assert_same_steps(a, b, n_steps):
    assert np.array_equal(a.lengths, b.lengths) and np.array_equal(a.n_trained, b.n_trained)
    for mbs_a, mbs_b in zip(_batches(a, n_steps), _batches(b, n_steps)):
        assert len(mbs_a) == len(mbs_b)
        for x, y in zip(mbs_a, mbs_b):
            for key in ("input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens"):
                assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("kind,extra", [("chat", ()), ("text", ("data.format=text",))])
def test_prepared_trains_the_same_steps_as_raw(tok, raw, tmp_path, kind, extra, monkeypatch):
    out = tmp_path / "prep"
    manifest = _prepare(raw[kind], out, *extra, shard_tokens=700)  # several shards
    assert len(manifest["shards"]) > 2 and manifest["masked"] == (kind == "chat")
    cfg = dict(max_length=96, format="text" if kind == "text" else "auto")
    from_raw = build_train_data(DataConfig(path=str(raw[kind]), **cfg), TRAINER, tok, 0, 1)
    if kind == "text":
        assert from_raw.stats.split > 0  # documents longer than max_length: pieces, in both
    monkeypatch.setattr(datasets.Dataset, "map", lambda *a, **k: pytest.fail("prepared data was tokenized"))
    from_dir = build_train_data(DataConfig(path=str(out), **cfg), TRAINER, tok, 0, 1)
    assert from_dir.stats.split == from_raw.stats.split and from_dir.stats.pieces == from_raw.stats.pieces
    assert from_dir.num_steps_per_epoch == from_raw.num_steps_per_epoch
    _assert_same_steps(from_raw, from_dir, from_raw.num_steps_per_epoch)
    # two ranks read disjoint halves of the same steps
    r0, r1 = (build_train_data(DataConfig(path=str(out), **cfg), TRAINER, tok, r, 2) for r in (0, 1))
    one = build_train_data(DataConfig(path=str(out), **cfg), TRAINER, tok, 0, 1)
    for s0, s1, s in itertools.islice(zip(r0.steps(), r1.steps(), one.steps()), one.num_steps_per_epoch):
        assert s0.example_ids == s.example_ids == s1.example_ids
        got = sorted(torch.cat([m["input_ids"] for m in s0.micro_batches + s1.micro_batches], 1)[0].tolist())
        assert got == sorted(torch.cat([m["input_ids"] for m in s.micro_batches], 1)[0].tolist())


def test_split_documents_follow_the_run_max_length(tok, raw, tmp_path):
    out = tmp_path / "prep"
    _prepare(raw["text"], out, "data.format=text")  # whole documents: the run cuts them
    for max_length in (64, 128):
        cfg = DataConfig(path=str(out), max_length=max_length, format="text")
        from_dir = build_train_data(cfg, TRAINER, tok, 0, 1)
        from_raw = build_train_data(DataConfig(path=str(raw["text"]), max_length=max_length, format="text"),
                                    TRAINER, tok, 0, 1)
        assert from_dir.lengths.max() <= max_length
        _assert_same_steps(from_raw, from_dir, 2)


def test_mismatched_settings_are_refused(tok, raw, tmp_path):
    out = tmp_path / "prep"
    _prepare(raw["chat"], out)
    ok = dict(path=str(out), max_length=96)
    build_train_data(DataConfig(**ok), TRAINER, tok, 0, 1)
    for change, words in [({"max_length": 80}, "data.max_length 96"), ({"train_on": "all"}, "data.train_on"),
                          ({"overlong": "drop"}, "data.overlong truncate -> drop"),
                          ({"format": "text"}, "data.format"), ({"chat_template": "{{ x }}"}, "data.chat_template"),
                          ({"streaming": True}, "data.streaming=false"), ({"max_examples": 3}, "max_examples")]:
        with pytest.raises(UserError, match=words):
            build_train_data(DataConfig(**{**ok, **change}), TRAINER, tok, 0, 1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="another tokenizer .* prepare .* again"):
        build_train_data(DataConfig(**ok), TRAINER, tok, 0, 1)


def test_damaged_directories_are_refused(tok, raw, tmp_path):
    out = tmp_path / "prep"
    manifest = _prepare(raw["chat"], out)
    tokens = out / manifest["shards"][0]["tokens"]
    tokens.write_bytes(tokens.read_bytes()[:-2])
    with pytest.raises(UserError, match="tokens-00000.bin is damaged or incomplete"):
        build_train_data(DataConfig(path=str(out), max_length=96), TRAINER, tok, 0, 1)
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(UserError, match="not a granite_train prepared-data manifest of version 1"):
        build_train_data(DataConfig(path=str(out), max_length=96), TRAINER, tok, 0, 1)


def test_prepare_command_line(raw, tmp_path, monkeypatch, capsys):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "granite_train.prepare", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    out = tmp_path / "prep"
    ok = run(f"data.path={raw['chat']}", "data.tokenizer=gpt2-bundled", "--out", str(out))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "prepared" in ok.stderr and "tokens/s" in ok.stderr and (out / "manifest.json").is_file()
    # The refusals in-process (the same `main`): exit 2, one line, nothing written.
    from granite_train.prepare import main

    monkeypatch.chdir(tmp_path)
    assert main([f"data.path={raw['chat']}", "data.tokenizer=gpt2-bundled", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([f"data.path={raw['chat']}"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main([f"data.path={tmp_path / 'nope.jsonl'}", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_prepared_eval_set_equals_raw(tok, raw, tmp_path):
    out = tmp_path / "prep"
    _prepare(raw["text"], out, "data.format=text")
    from granite_train.data import build_eval_data

    def evald(path):
        cfg = DataConfig(path=str(raw["text"]), format="text", max_length=64, eval_path=str(path))
        return build_eval_data(cfg, TRAINER, tok, 0, 1)

    a, b = evald(raw["text"]), evald(out)
    assert a.num_trained_tokens == b.num_trained_tokens and a.stats.pieces == b.stats.pieces > 0
    for x, y in zip(a.micro_batches(), b.micro_batches()):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    with pytest.raises(UserError, match="data.eval_path=.* was prepared with other settings"):
        build_eval_data(DataConfig(format="text", max_length=64, eval_path=str(out), overlong="truncate"),
                        TRAINER, tok, 0, 1)


def test_tokenizer_fingerprint_sees_ids_not_serialization(tok):
    import tokenizers

    from granite_train.data.shards import tokenizer_fingerprint
    from granite_train.data.tokenizer import Tokenizer

    same = Tokenizer(tokenizers.Tokenizer.from_str(tok.backend.to_str()), tok.eos_token, name="copy")
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(tok)
    grown = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    grown.add_tokens(["<|new|>"])
    assert tokenizer_fingerprint(Tokenizer(grown, tok.eos_token)) != tokenizer_fingerprint(tok)
    templated = Tokenizer(tokenizers.Tokenizer.from_str(tok.backend.to_str()), tok.eos_token, chat_template="{{ x }}")
    assert tokenizer_fingerprint(templated) != tokenizer_fingerprint(tok)
    # Computed once per tokenizer, and again when what it covers changes on the same object.
    before = tokenizer_fingerprint(same)
    same.chat_template = "{{ y }}"
    assert tokenizer_fingerprint(same) != before
    templated_fp = tokenizer_fingerprint(same)
    same.backend.add_tokens(["<|newer|>"])
    assert tokenizer_fingerprint(same) not in (before, templated_fp)


def test_a_mixture_of_prepared_sources_equals_the_raw_mixture(tok, raw, tmp_path):
    """Prepared sources are gathered a micro-batch at a time (one vectorized read per source,
    several shards, a masked one); raw ones example by example: the same tensors."""
    from granite_train.config import SourceConfig

    chat, text = tmp_path / "chat", tmp_path / "text"
    _prepare(raw["chat"], chat, shard_tokens=700)
    _prepare(raw["text"], text, "data.format=text", shard_tokens=900)

    def mix(a, b):
        return DataConfig(path="unused", max_length=96, sources=[SourceConfig(str(a), 0.6, name="chat"),
                                                                   SourceConfig(str(b), 0.4, name="text", format="text")])

    from_raw = build_train_data(mix(raw["chat"], raw["text"]), TRAINER, tok, 0, 1)
    from_dir = build_train_data(mix(chat, text), TRAINER, tok, 0, 1)
    assert from_dir._flat is not None and from_raw._flat is None
    _assert_same_steps(from_raw, from_dir, 12)


def test_shards_stay_mapped_after_the_directory_is_removed(raw, tmp_path):
    # ShardDocs maps each shard with Python's mmap and keeps only the arrays: they hold the map.
    import gc
    import shutil

    from granite_train.data.shards import ShardDocs, read_manifest

    out = tmp_path / "prep"
    _prepare(raw["chat"], out)
    store = ShardDocs(str(out), read_manifest(str(out)))
    docs, starts = np.arange(5), np.zeros(5, dtype=np.int64)
    before = store.read_flat(docs, starts, store.lengths[:5])
    assert not store._tokens[0].flags.writeable
    shutil.rmtree(out)
    gc.collect()
    after = store.read_flat(docs, starts, store.lengths[:5])
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
