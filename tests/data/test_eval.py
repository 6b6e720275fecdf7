"""Eval data: data.eval_fraction's held-out split (deterministic, disjoint from training, the
fraction respected), data.eval_path, data.max_eval_examples, stats, and config errors."""

import json
from collections import Counter

import numpy as np
import pytest

from granite_train.config import DataConfig, RunConfig, TrainerConfig, validate
from granite_train.data import build_train_data, is_empty
from granite_train.data.eval import build_eval_data
from granite_train.data.examples import heldout_rows
from granite_train.errors import UserError

ROWS = 120


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer (+ Granite role tokens): fast to load; every word one token."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from granite_train.data.tokenizer import EOS_TOKEN, GRANITE_SPECIAL_TOKENS, Tokenizer

    words = ["<unk>", "user", "assistant", "ask", "say", "row", "eval"] + [str(i) for i in range(ROWS)]
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(GRANITE_SPECIAL_TOKENS))
    return Tokenizer(backend, EOS_TOKEN, name="tiny-words")


def write_chat(path, n, seed=0, tag="row"):
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            turns = []
            for _ in range(int(rng.integers(1, 3))):
                turns += [{"role": "user", "content": " ".join(["ask"] * int(rng.integers(1, 10)) + [tag, str(i)])},
                          {"role": "assistant", "content": " ".join(["say"] * int(rng.integers(1, 30)))}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_chat(tmp_path_factory.mktemp("eval") / "chat.jsonl", ROWS)


def cfgs(path, **kw):
    data_kw = {k: v for k, v in kw.items() if k in DataConfig.__dataclass_fields__}
    trainer_kw = {"tokens_per_step": 512, "micro_batch_tokens": 128, "seed": 7,
                  **{k: v for k, v in kw.items() if k in TrainerConfig.__dataclass_fields__}}
    return DataConfig(**{"path": str(path), "max_length": 96, **data_kw}), TrainerConfig(**trainer_kw)


def train(tok, path, rank=0, world=1, **kw):
    return build_train_data(*cfgs(path, **kw), tok, rank, world)


def evald(tok, path, rank=0, world=1, train_data=None, **kw):
    return build_eval_data(*cfgs(path, **kw), tok, rank, world, train_data=train_data)


def docs(micro_batches):
    """The examples in micro-batches, as token tuples (each example of the fixture is unique)."""
    out = Counter()
    for mb in micro_batches:
        if is_empty(mb):
            continue
        if mb["cu_seq_lens"] is None:  # padded rows
            for row, mask in zip(mb["input_ids"], mb["attention_mask"]):
                out[tuple(row[mask.bool()].tolist())] += 1
            continue
        cu = mb["cu_seq_lens"].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            out[tuple(mb["input_ids"][0, a:b].tolist())] += 1
    return out


def trained_docs(data):
    return docs(mb for step in data.steps() for mb in step.micro_batches)


def test_no_eval_set_is_none(tok, small):
    assert evald(tok, small) is None


def test_heldout_rows_deterministic_and_sized():
    a = heldout_rows(1000, 0.1, 7)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and list(a) == sorted(a)
    assert np.array_equal(a, heldout_rows(1000, 0.1, 7))
    assert not np.array_equal(a, heldout_rows(1000, 0.1, 8))
    assert len(heldout_rows(10, 0.01, 0)) == 1  # at least one eval row
    assert len(heldout_rows(2, 0.5, 0)) == 1  # at least one training row
    assert len(heldout_rows(7, 0.5, 0)) == 4
    with pytest.raises(UserError, match="at least 2 rows"):
        heldout_rows(1, 0.5, 0)


@pytest.mark.parametrize("packing", ["bfd", "none"])
def test_fraction_split_is_disjoint_from_training(tok, small, packing):
    data = train(tok, small, eval_fraction=0.2, epochs=1, packing=packing)
    ev = evald(tok, small, eval_fraction=0.2, train_data=data, packing=packing)
    n_eval = round(0.2 * ROWS)
    assert ev.stats.rows_read == n_eval and data.stats.rows_read == ROWS - n_eval
    assert ev.num_examples == ev.stats.examples == n_eval  # every fixture row is kept
    assert data.stats.examples == ROWS - n_eval
    seen = trained_docs(data)
    held = docs(ev.micro_batches())
    assert sum(held.values()) == n_eval and max(held.values()) == 1
    assert not set(seen) & set(held)  # no eval example is ever trained on
    everything = trained_docs(train(tok, small, epochs=1, packing=packing))
    assert seen + held == everything  # and nothing else is lost
    assert sum(int((mb["labels"] != -100).sum()) for mb in ev.micro_batches()) == ev.num_trained_tokens
    assert all(is_empty(mb) or mb["input_ids"].numel() <= 128 for mb in ev.micro_batches())
    # without the TrainData: the same split from the same (cached) tokenization
    again = evald(tok, small, eval_fraction=0.2, packing=packing)
    assert docs(again.micro_batches()) == held
    assert (again.num_examples, again.num_trained_tokens) == (ev.num_examples, ev.num_trained_tokens)


def test_split_depends_on_seed_and_fraction(tok, small):
    a = docs(evald(tok, small, eval_fraction=0.1).micro_batches())
    assert docs(evald(tok, small, eval_fraction=0.1).micro_batches()) == a
    assert docs(evald(tok, small, eval_fraction=0.1, seed=8).micro_batches()) != a
    assert sum(docs(evald(tok, small, eval_fraction=0.5).micro_batches()).values()) == ROWS // 2
    # max_examples caps the rows before the split
    assert evald(tok, small, eval_fraction=0.25, max_examples=40).stats.rows_read == 10


def test_max_eval_examples_caps_eval_but_keeps_rows_held_out(tok, small):
    data = train(tok, small, eval_fraction=0.2, max_eval_examples=5, epochs=1)
    ev = evald(tok, small, eval_fraction=0.2, max_eval_examples=5, train_data=data)
    assert ev.num_examples == ev.stats.rows_read == 5
    assert data.stats.rows_read == ROWS - 24  # the other held-out rows are still not trained on
    full = evald(tok, small, eval_fraction=0.2)
    assert set(docs(ev.micro_batches())) < set(docs(full.micro_batches()))


def test_eval_shards_over_ranks(tok, small):
    one = evald(tok, small, eval_fraction=0.3)
    for world, micro in ((2, 128), (3, 200)):
        ranks = [evald(tok, small, rank=r, world=world, eval_fraction=0.3, micro_batch_tokens=micro)
                 for r in range(world)]
        assert len({len(r) for r in ranks}) == 1  # the same micro-batch count on every rank
        assert sum((docs(r.micro_batches()) for r in ranks), Counter()) == docs(one.micro_batches())
        assert all(r.num_trained_tokens == one.num_trained_tokens for r in ranks)


def test_eval_path(tok, small, tmp_path):
    path = write_chat(tmp_path / "eval.jsonl", 30, seed=1, tag="eval")
    ev = evald(tok, small, eval_path=str(path))
    assert ev.num_examples == ev.stats.rows_read == 30
    assert "eval" in ev.stats.report() and "30 rows read" in ev.stats.report()
    assert sum(docs(ev.micro_batches()).values()) == 30
    assert evald(tok, small, eval_path=str(path), max_eval_examples=10).num_examples == 10
    # an eval path does not touch the training data
    assert train(tok, small, eval_path=str(path)).stats.rows_read == ROWS
    # preparation is counted like the training data's: drops and truncation
    dropped = evald(tok, small, eval_path=str(path), max_length=24, overlong="drop", micro_batch_tokens=128)
    truncated = evald(tok, small, eval_path=str(path), max_length=24, micro_batch_tokens=128)
    assert dropped.stats.dropped_overlong > 0 and dropped.num_examples == 30 - dropped.stats.dropped_overlong
    assert truncated.stats.truncated == dropped.stats.dropped_overlong and truncated.num_examples == 30
    assert "truncated" in truncated.stats.report()
    # streaming training data still gets a whole (map-style) eval set
    assert evald(tok, small, eval_path=str(path), streaming=True).num_examples == 30


def test_eval_path_errors_name_eval_path(tok, small, tmp_path):
    with pytest.raises(UserError, match="data.eval_path=.*does not exist"):
        evald(tok, small, eval_path=str(tmp_path / "missing.jsonl"))


def test_resume_refuses_another_fraction(tok, small):
    state = train(tok, small, eval_fraction=0.2).state_dict()
    train(tok, small, eval_fraction=0.2).load_state_dict(state)  # same split: fine
    for other in (0.1, None):
        with pytest.raises(UserError, match="eval_fraction 0.2 ->"):
            train(tok, small, eval_fraction=other).load_state_dict(state)
    with pytest.raises(UserError, match="eval_fraction None -> 0.1"):
        train(tok, small, eval_fraction=0.1).load_state_dict(train(tok, small).state_dict())


@pytest.mark.parametrize("data_kw, trainer_kw, match", [
    ({"eval_path": "x.jsonl", "eval_fraction": 0.1}, {}, "both set"),
    ({"eval_fraction": 0.0}, {}, r"must be in \(0, 0.5\]"),
    ({"eval_fraction": 0.6}, {}, r"must be in \(0, 0.5\]"),
    ({"eval_fraction": 0.1, "streaming": True}, {}, "map-style"),
    ({"max_eval_examples": 0}, {}, "max_eval_examples=0 must be > 0"),
    ({"eval_path": " "}, {}, "data.eval_path is empty"),
    ({}, {"eval_every": -1}, "trainer.eval_every=-1 must be >= 0"),
])
def test_config_errors(data_kw, trainer_kw, match):
    cfg = RunConfig()
    for k, v in data_kw.items():
        setattr(cfg.data, k, v)
    for k, v in trainer_kw.items():
        setattr(cfg.trainer, k, v)
    with pytest.raises(UserError, match=match) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_pipeline_checks_eval_config_too(tok, small):
    with pytest.raises(UserError, match="both set"):
        train(tok, small, eval_path=str(small), eval_fraction=0.1)
    with pytest.raises(UserError, match="both set"):
        evald(tok, small, eval_path=str(small), eval_fraction=0.1)
