"""Long documents as pieces (data.overlong=split): no token lost, every target trained once."""

import json

import numpy as np
import pytest
import torch

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data import build_eval_data, build_train_data, load_tokenizer
from granite_train.data.docs import split_documents
from granite_train.errors import UserError

IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-bundled", None)


@pytest.mark.parametrize("max_length", [2, 3, 8, 64])
def test_pieces_cover_every_target_exactly_once(max_length):
    lengths = np.array([1, 2, 3, max_length, max_length + 1, 5 * max_length + 3, 17, 200])
    p = split_documents(lengths, lengths - 1, max_length)
    assert p.lengths.max() <= max_length and p.lengths.min() >= 1
    for d, n in enumerate(lengths):
        mine = np.flatnonzero(p.doc == d)
        targets = np.concatenate([np.arange(p.start[i] + 1, p.start[i] + p.lengths[i]) for i in mine])
        assert targets.tolist() == list(range(1, n))  # each target once, in order, none lost
        assert p.n_trained[mine].sum() == n - 1
        if n > max_length:
            assert (p.lengths[mine] >= 2).all()
    long = lengths > max_length
    assert p.split_docs == long.sum()
    assert p.split_pieces == np.bincount(p.doc)[long].sum()


def test_split_needs_two_tokens():
    with pytest.raises(UserError, match="max_length >= 2"):
        split_documents(np.array([5]), np.array([4]), 1)


def _docs(n_docs, words):
    return [{"text": " ".join(f"w{d}_{i}" for i in range(words * (d % 3 + 1)))} for d in range(n_docs)]


def _trained_tokens(data, epochs=1):
    """Every (token, the token before it) pair trained, over the epoch's micro-batches."""
    pairs = []
    steps = data.steps()
    for _ in range(data.num_steps_per_epoch * epochs):
        for mb in next(steps).micro_batches:
            ids, labels = mb["input_ids"][0], mb["labels"][0]
            keep = labels[1:] != IGNORE
            pairs += list(zip(ids[:-1][keep].tolist(), labels[1:][keep].tolist()))
    return pairs


def test_text_documents_several_times_max_length_lose_no_token(tok, tmp_path):
    rows = _docs(12, 60)  # 60-180 words: up to ~8x max_length tokens
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = TrainerConfig(tokens_per_step=256, micro_batch_tokens=128, epochs=1)
    data = build_train_data(DataConfig(path=str(path), max_length=64, format="text"), trainer, tok, 0, 1)
    assert data.stats.split > 0 and data.stats.pieces > data.stats.split and data.stats.truncated == 0
    assert "split" in data.stats.report() and "no token lost" in data.stats.report()
    assert data.lengths.max() <= 64
    # what an unsplit document would train: (previous token -> next token) for all its tokens
    want = []
    for r in rows:
        ids = tok.encode(r["text"]) + [tok.eos_token_id]
        want += list(zip(ids[:-1], ids[1:]))
    assert sorted(_trained_tokens(data)) == sorted(want)
    assert sum(s.num_trained_tokens for s in [*data.plan(0)]) == len(want)
    truncated = build_train_data(DataConfig(path=str(path), max_length=64, format="text", overlong="truncate"),
                                 trainer, tok, 0, 1)
    assert truncated.stats.truncated == data.stats.split and truncated.stats.split == 0
    # the eval set is cut the same way
    ev = build_eval_data(DataConfig(path=str(path), max_length=64, format="text", eval_path=str(path)),
                         trainer, tok, 0, 1)
    assert ev.num_trained_tokens == len(want) and ev.stats.pieces == data.stats.pieces


def test_split_is_for_text_only(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    with pytest.raises(UserError, match="overlong=split .* needs data.format=text"):
        build_train_data(DataConfig(path=str(path), max_length=64, overlong="split"),
                         TrainerConfig(tokens_per_step=256, micro_batch_tokens=128), tok, 0, 1)


def test_stream_splits_and_resumes_between_pieces(tok, tmp_path):
    rows = _docs(6, 80)
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(path=str(path), max_length=32, format="text", streaming=True)
    trainer = TrainerConfig(tokens_per_step=64, micro_batch_tokens=64, epochs=1)
    full = [(s.num_input_tokens, torch.cat([m["input_ids"] for m in s.micro_batches], 1))
            for s in build_train_data(cfg, trainer, tok, 0, 1).steps()]
    lengths = np.array([len(tok.encode(r["text"])) + 1 for r in rows])
    assert (lengths > 3 * 32).all()
    assert sum(n for n, _ in full) == split_documents(lengths, lengths - 1, 32).lengths.sum()
    data = build_train_data(cfg, trainer, tok, 0, 1)
    it = data.steps()
    head = [next(it) for _ in range(5)]
    state = data.state_dict()
    assert state["pieces_consumed"] > 0  # a document cut between two steps
    resumed = build_train_data(cfg, trainer, tok, 0, 1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = [(s.num_input_tokens, torch.cat([m["input_ids"] for m in s.micro_batches], 1)) for s in resumed.steps()]
    assert len(head) + len(rest) == len(full)
    for (n, x), (m, y) in zip(full[5:], rest):
        assert n == m and torch.equal(x, y)


def test_checkpoints_from_before_split_name_the_setting(tok, tmp_path):
    """A data state saved before data.overlong=auto (no overlong in its fingerprint: long text
    was truncated) is refused under split with the fix named, and resumes with truncate."""
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _docs(8, 60)))
    trainer = TrainerConfig(tokens_per_step=256, micro_batch_tokens=128)
    old = build_train_data(DataConfig(path=str(path), max_length=64, format="text", overlong="truncate"),
                           trainer, tok, 0, 1)
    state = old.state_dict()
    del state["fingerprint"]["overlong"]
    split = build_train_data(DataConfig(path=str(path), max_length=64, format="text"), trainer, tok, 0, 1)
    with pytest.raises(UserError, match=r"overlong truncate -> split .*data.overlong=truncate reproduces"):
        split.load_state_dict(state)
    old.load_state_dict(state)
