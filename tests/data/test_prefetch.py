"""Steps made ahead on a thread (data.prefetch_steps): the same steps as without, a position that
is the last step handed out (not the thread's), errors raised where they happened, and a thread
that stops when the steps are abandoned."""

import itertools
import json
import threading
import time

import numpy as np
import pytest
import torch

from granite_train.config import DataConfig, SourceConfig, TrainerConfig
from granite_train.data import build_train_data, load_tokenizer
from granite_train.data.prefetch import run_ahead
from granite_train.errors import UserError


def test_run_ahead_yields_the_same_items_and_raises_in_place():
    assert list(run_ahead(iter(range(50)), 3)) == list(range(50))
    assert list(run_ahead(iter(range(5)), 0)) == list(range(5))

    def failing():
        yield from range(4)
        raise UserError("row 4 is bad")

    got = []
    with pytest.raises(UserError, match="row 4 is bad"):
        for x in run_ahead(failing(), 2):
            got.append(x)
    assert got == [0, 1, 2, 3]


def test_closing_stops_the_thread_and_nothing_runs_on():
    made = []

    def counting():
        for i in itertools.count():
            made.append(i)
            yield i

    before = threading.active_count()
    it = run_ahead(counting(), 2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    n = len(made)
    assert n <= 3 + 2 + 1  # the consumed, the queue's depth, one blocked in put
    time.sleep(0.3)
    assert len(made) == n and threading.active_count() == before


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-bundled", None)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefetch")
    rng = np.random.default_rng(3)
    chat, text = root / "chat.jsonl", root / "text.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"q{i} " * int(rng.integers(1, 9))},
        {"role": "assistant", "content": f"a{i} " * int(rng.integers(1, 30))}]}) + "\n" for i in range(90)))
    text.write_text("".join(json.dumps({"text": " ".join(f"t{i}_{k}" for k in range(int(rng.integers(3, 150))))}) + "\n"
                            for i in range(60)))
    return {"chat": chat, "text": text}


def configs(paths):
    """Map-style, a mixture, and a stream (each on rank 1 of 2: the rank's own micro-batches)."""
    return {
        "map": DataConfig(path=str(paths["chat"]), max_length=64),
        "mixture": DataConfig(path="unused", max_length=64, sources=[
            SourceConfig(str(paths["chat"]), 0.6), SourceConfig(str(paths["text"]), 0.4, format="text")]),
        "stream": DataConfig(path=str(paths["text"]), max_length=64, format="text", streaming=True,
                             stream_share="all"),
    }


def build(tok, cfg, prefetch):
    cfg = DataConfig(**{**cfg.__dict__, "prefetch_steps": prefetch})
    epochs = None if cfg.sources else 3
    return build_train_data(cfg, TrainerConfig(tokens_per_step=256, micro_batch_tokens=128, epochs=epochs),
                            tok, 1, 2)


def same(a, b):
    assert (a.index, a.epoch, a.step_in_epoch, a.example_ids, a.num_trained_tokens, a.num_input_tokens,
            a.num_slots, a.source_tokens_seen) == (b.index, b.epoch, b.step_in_epoch, b.example_ids,
                                                   b.num_trained_tokens, b.num_input_tokens, b.num_slots,
                                                   b.source_tokens_seen)
    assert len(a.micro_batches) == len(b.micro_batches)
    for x, y in zip(a.micro_batches, b.micro_batches):
        assert all(torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))


@pytest.mark.parametrize("kind", ["map", "mixture", "stream"])
def test_prefetched_steps_and_positions_equal_plain_ones(tok, paths, kind):
    cfg = configs(paths)[kind]
    plain, ahead = build(tok, cfg, 0), build(tok, cfg, 3)
    n = 40 if kind == "mixture" else None
    ref = list(itertools.islice(plain.steps(), n))
    plain_states = []
    for cut in (1, 5, 11):
        plain = build(tok, cfg, 0)
        list(itertools.islice(plain.steps(), cut))
        plain_states.append(plain.state_dict())
    assert len(ref) > 12
    # drawn in pieces from one object: the position is the last step handed out each time, and
    # the next steps() continues right after it although the thread had made more
    got, drawn = [], 0
    for cut, want in zip((1, 5, 11), plain_states):
        it = ahead.steps()
        got += list(itertools.islice(it, cut - drawn))
        drawn = cut
        time.sleep(0.05)  # let the thread run ahead
        assert ahead.state_dict() == want
    got += list(itertools.islice(ahead.steps(), None if n is None else n - drawn))
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        same(a, b)
    # a state from the prefetching object resumes a fresh one exactly
    resumed = build(tok, cfg, 2)
    resumed.load_state_dict(json.loads(json.dumps(plain_states[1])))
    for a, b in zip(itertools.islice(resumed.steps(), 6), ref[5:11]):
        same(a, b)


def test_load_state_dict_wins_over_a_live_generator(tok, paths):
    data = build(tok, configs(paths)["map"], 2)
    start = data.state_dict()
    it = data.steps()
    first = list(itertools.islice(it, 5))
    data.load_state_dict(start)  # `it` is still alive: it must not put its own position back
    assert data.state_dict() == start
    assert [s.index for s in itertools.islice(data.steps(), 2)] == [0, 1]
    same(next(iter(itertools.islice(build(tok, configs(paths)["map"], 0).steps(), 1))), first[0])


def test_an_abandoned_generator_stops_its_thread(tok, paths):
    import gc

    data = build(tok, configs(paths)["stream"], 2)
    before = threading.active_count()
    assert len(list(itertools.islice(data.steps(), 3))) == 3  # the generator is dropped here
    gc.collect()
    assert threading.active_count() == before
    assert data.state_dict()["step_in_epoch"] == 3 and data._step == 3  # the live position is put back


def test_step_plans_compare_and_hash():
    from granite_train.data.plan import plan_step

    lengths, trained = np.array([5, 7, 3, 9]), np.array([4, 6, 2, 8])
    a, b = (plan_step([[0, 1], [2], [3]], lengths, trained, epoch=0, step_in_epoch=0, micro_batch_tokens=16,
                      world_size=2, padded=False) for _ in range(2))
    assert a == b and hash(a) == hash(b) and a.example_ids == [0, 1, 2, 3]
