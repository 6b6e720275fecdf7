"""data.sources mixtures: token shares within one document at every step, independent of the
number of ranks, sources repeated when they run out, resume exact."""

import json

import numpy as np
import pytest
import torch

from granite_train.config import DataConfig, SourceConfig, TrainerConfig, validate_data
from granite_train.data import build_train_data, load_tokenizer
from granite_train.errors import UserError

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-bundled", None)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    paths = []
    for name, n_docs, words in (("books", 80, 40), ("code", 25, 12), ("chat", 40, 0)):
        path = root / f"{name}.jsonl"
        if name == "chat":
            rows = [{"messages": [{"role": "user", "content": f"q{i} " * int(rng.integers(1, 9))},
                                  {"role": "assistant", "content": f"a{i} " * int(rng.integers(1, 20))}]}
                    for i in range(n_docs)]
        else:
            rows = [{"text": " ".join(f"{name}{i}_{k}" for k in range(int(rng.integers(2, words))))}
                    for i in range(n_docs)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def mixture(sources, weights, **kw):
    return DataConfig(path="unused", max_length=MAX_LENGTH, sources=[
        SourceConfig(str(p), w, format="auto") for p, w in zip(sources, weights)], **kw)


def trainer(tokens_per_step=256, micro=128):
    return TrainerConfig(tokens_per_step=tokens_per_step, micro_batch_tokens=micro)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.3, 0.7), (0.7, 0.3, 0.0001), (1, 1, 1), (5, 1, 2)])
def test_shares_stay_within_one_document(tok, sources, weights):
    """No source is more than one document ahead of its share, nor more than (sources - 1)
    behind (two sources: one document either way), after every step; steps are full to within
    one document."""
    data = build_train_data(mixture(sources[: len(weights)], weights), trainer(), tok, 0, 1)
    shares = np.array(weights, dtype=float) / sum(weights)
    names = [s.name for s in data.sources]
    assert names == ["books", "code", "chat"][: len(weights)]
    it = data.steps()
    worst = 0.0
    for _ in range(120):  # several passes of the small sources
        step = next(it)
        seen = np.array([step.source_tokens_seen[n] for n in names], dtype=float)
        err = seen - shares * seen.sum()
        assert err.max() <= MAX_LENGTH and -err.min() <= (len(weights) - 1) * MAX_LENGTH, (seen, shares)
        worst = max(worst, np.abs(err).max())
        assert sum(step.source_tokens.values()) == step.num_input_tokens
        assert 256 - MAX_LENGTH < step.num_input_tokens <= 256
    if len(weights) == 2:
        assert worst <= MAX_LENGTH
    assert max(c.passes for c in data._cursors) >= 1  # a source ran out and was repeated


def test_many_sources_with_long_documents_keep_steps_full(tok, tmp_path):
    """Four and five sources, one of documents of max_length tokens (as split pieces are): every
    step is full to within one document, the shares within their bounds."""
    paths = []
    for k, words in enumerate((3, 6, 200, 9, 14)):
        path = tmp_path / f"s{k}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(f"s{k}d{i}w{j}" for j in range(words + i % 5))}) + "\n"
                                for i in range(60)))
        paths.append(path)
    for weights in ((0.7, 0.2, 0.09, 0.01), (0.8, 0.1, 0.05, 0.04, 0.01)):
        order = [0, 1, 2, 3, 4][: len(weights)]
        data = build_train_data(mixture([paths[i] for i in order], weights), trainer(1024, 256), tok, 0, 1)
        shares = np.array(weights) / sum(weights)
        names = [s.name for s in data.sources]
        it = data.steps()
        for _ in range(150):
            step = next(it)
            assert 1024 - MAX_LENGTH < step.num_input_tokens <= 1024
            seen = np.array([step.source_tokens_seen[n] for n in names], dtype=float)
            err = seen - shares * seen.sum()
            assert err.max() <= MAX_LENGTH and -err.min() <= (len(weights) - 1) * MAX_LENGTH


def test_new_weights_on_resume_keep_positions(tok, sources):
    first = build_train_data(mixture(sources[:2], (0.5, 0.5)), trainer(), tok, 0, 1)
    it = first.steps()
    for _ in range(10):
        done = next(it)
    state = json.loads(json.dumps(first.state_dict()))
    heavier = build_train_data(mixture(sources[:2], (0.8, 0.2)), trainer(), tok, 0, 1)
    heavier.load_state_dict(state)
    names = [s.name for s in heavier.sources]
    before = np.array([done.source_tokens_seen[n] for n in names], dtype=float)
    for _, step in zip(range(40), heavier.steps()):
        seen = np.array([step.source_tokens_seen[n] for n in names], dtype=float) - before
        assert np.abs(seen - np.array([0.8, 0.2]) * seen.sum()).max() <= MAX_LENGTH  # counted from the resume
    assert [c.taken for c in heavier._cursors] != [0, 0]


def test_same_steps_on_any_number_of_ranks(tok, sources):
    cfg = mixture(sources, (0.6, 0.3, 0.1))
    one = build_train_data(cfg, trainer(), tok, 0, 1)
    two = [build_train_data(cfg, trainer(micro=64), tok, r, 2) for r in (0, 1)]
    for s, a, b in zip(one.steps(), two[0].steps(), two[1].steps()):
        assert s.example_ids == a.example_ids == b.example_ids
        assert s.source_tokens == a.source_tokens and s.num_trained_tokens == a.num_trained_tokens
        ids = lambda mbs: sorted(torch.cat([m["input_ids"] for m in mbs], 1)[0].tolist())  # noqa: E731
        assert ids(s.micro_batches) == ids(a.micro_batches + b.micro_batches)
        if s.index == 30:
            break


def test_resume_is_exact(tok, sources):
    cfg = mixture(sources, (0.5, 0.4, 0.1))
    straight = build_train_data(cfg, trainer(), tok, 0, 1)
    steps = straight.steps()
    want = [next(steps) for _ in range(60)]
    first = build_train_data(cfg, trainer(), tok, 0, 1)
    it = first.steps()
    for _ in range(23):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_train_data(cfg, trainer(), tok, 0, 1)
    resumed.load_state_dict(state)
    for w, got in zip(want[23:], resumed.steps()):
        assert (w.index, w.example_ids, w.source_tokens_seen) == (got.index, got.example_ids, got.source_tokens_seen)
        for x, y in zip(w.micro_batches, got.micro_batches):
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        if got.index == 59:
            break
    single = build_train_data(DataConfig(path=str(sources[0]), max_length=MAX_LENGTH), trainer(), tok, 0, 1)
    with pytest.raises(UserError, match="from a data.sources mixture and this run reads map-style data"):
        single.load_state_dict(state)
    other = build_train_data(mixture(sources[:2], (0.5, 0.4)), trainer(), tok, 0, 1)
    with pytest.raises(UserError, match="cannot resume the data position: sources"):
        other.load_state_dict(state)


def test_bad_mixtures_are_refused(tok, sources):
    t = trainer()
    for cfg, words in [
        (DataConfig(max_length=MAX_LENGTH, sources=[SourceConfig(str(sources[0]), 0)]), r"data.sources\[0\].weight=0 must be a positive"),
        (DataConfig(max_length=MAX_LENGTH, sources=[SourceConfig("", 1)]), r"data.sources\[0\].path is empty"),
        (DataConfig(max_length=MAX_LENGTH, sources=[SourceConfig(str(sources[0]), 1, format="xml")]), "format='xml' is not one of"),
        (DataConfig(max_length=MAX_LENGTH, sources=[SourceConfig(str(sources[0]), 1)], streaming=True), "set data.streaming=false"),
        (DataConfig(max_length=MAX_LENGTH, sources=[SourceConfig(str(sources[0]), 1)], eval_fraction=0.1), "set data.eval_path"),
    ]:
        with pytest.raises(UserError, match=words):
            validate_data(cfg, t)
    with pytest.raises(UserError, match="trainer.epochs=null"):
        validate_data(DataConfig(max_length=MAX_LENGTH, sources=[SourceConfig(str(sources[0]), 1)]), TrainerConfig(epochs=1))
    twice = DataConfig(max_length=MAX_LENGTH, sources=[SourceConfig(str(sources[0]), 1), SourceConfig(str(sources[0]), 1)])
    with pytest.raises(UserError, match="two sources are named 'books'"):
        build_train_data(twice, t, tok, 0, 1)
    missing = DataConfig(max_length=MAX_LENGTH, sources=[SourceConfig(str(sources[0]), 1),
                                                          SourceConfig("/nope/x.jsonl", 1)])
    with pytest.raises(UserError, match=r"data.sources\[1\].path=/nope/x.jsonl does not exist"):
        build_train_data(missing, t, tok, 0, 1)


@pytest.mark.parametrize("weights,tokens_per_step", [((0.7, 0.3, 0.0001), 256), ((1, 1, 1), 1024), ((5, 1, 2), 64)])
def test_bulk_selection_equals_one_by_one(tok, sources, weights, tokens_per_step):
    """`_select` (sorted windows) gives exactly the steps and positions of the definition, one
    example at a time, over several passes of every source."""
    cfg = mixture(sources, weights)
    t = trainer(tokens_per_step, 64)
    fast, slow = build_train_data(cfg, t, tok, 0, 1), build_train_data(cfg, t, tok, 0, 1)
    slow._select = slow._select_one_by_one
    for _, a, b in zip(range(150), fast.steps(), slow.steps()):
        assert a.example_ids == b.example_ids and a.source_tokens_seen == b.source_tokens_seen
    assert fast.state_dict() == slow.state_dict()
    assert max(c.passes for c in fast._cursors) >= 1  # windows across pass ends
