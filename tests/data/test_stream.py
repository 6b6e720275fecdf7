"""Streams shared by rank (data.stream_share=rank): every rank reads a disjoint share, each epoch
trains every row exactly once over all ranks, every rank sees the same global counts, epochs end
together, and resume is exact. Ranks are threads here with an all-gather made of a barrier;
`test_two_gloo_ranks` runs the trainer's own all-gather on two processes."""

import itertools
import json
import threading
from collections import Counter

import datasets
import numpy as np
import pytest
import torch

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data import build_train_data, is_empty, load_tokenizer
from granite_train.data.stream import share_of
from granite_train.errors import UserError
from tests.gloo_ranks import run_on_ranks
from tests.runs import torchrun_runs
from tests.tiny_tokenizer import TINY_TOKENIZER

MAX_LENGTH, STEP, MICRO = 96, 512, 128


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2-bundled", None)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "chat.jsonl"
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for i in range(121):  # odd: the ranks' shares differ by one row
            turns = []
            for _ in range(int(rng.integers(1, 4))):
                turns += [{"role": "user", "content": " ".join(["ask"] * int(rng.integers(1, 12)) + [str(i)])},
                          {"role": "assistant", "content": " ".join(["say"] * int(rng.integers(1, 20)))}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


@pytest.fixture(scope="module")
def long_text(tmp_path_factory):
    """Documents of 0.5-4x max_length (split into pieces), and one row per document number."""
    path = tmp_path_factory.mktemp("stream_text") / "docs.jsonl"
    rng = np.random.default_rng(1)
    with path.open("w") as f:
        for i in range(40):
            words = [f"w{int(x)}" for x in rng.integers(0, 500, int(rng.integers(20, 190)))]
            f.write(json.dumps({"text": f"doc{i} " + " ".join(words)}) + "\n")
    return path


class ThreadGather:
    """An all-gather over threads: each puts its list (first int: its rank), all read all."""

    def __init__(self, n):
        self.barrier, self.slots = threading.Barrier(n, timeout=60), [None] * n

    def __call__(self, values):
        self.slots[values[0]] = list(values)
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out


def make(tok, path, rank, world, gather, **kw):
    data_kw = {k: v for k, v in kw.items() if k in DataConfig.__dataclass_fields__}
    trainer_kw = {"tokens_per_step": STEP, "micro_batch_tokens": MICRO, "epochs": 2,
                  **{k: v for k, v in kw.items() if k in TrainerConfig.__dataclass_fields__}}
    cfg = DataConfig(**{"path": str(path), "max_length": MAX_LENGTH, "streaming": True, **data_kw})
    return build_train_data(cfg, TrainerConfig(**trainer_kw), tok, rank, world, gather=gather)


def on_threads(datas, limit=None, states=None):
    """Every rank's steps (at most `limit`), drawn on one thread per rank."""
    out = [None] * len(datas)
    errors = []

    def run(r):
        try:
            if states is not None:
                datas[r].load_state_dict(json.loads(json.dumps(states)))
            out[r] = list(itertools.islice(datas[r].steps(), limit))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            datas[r]._gather.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(datas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def ranks(tok, path, world, **kw):
    gather = ThreadGather(world)
    return [make(tok, path, r, world, gather, **kw) for r in range(world)]


def segments(mb):
    """A packed micro-batch's examples: (input ids, labels) per segment."""
    if is_empty(mb):
        return []
    cu = mb["cu_seq_lens"].tolist()
    ids, labels = mb["input_ids"][0], mb["labels"][0]
    return [(tuple(ids[a:b].tolist()), tuple(labels[a:b].tolist())) for a, b in zip(cu, cu[1:])]


def epoch_examples(steps, epoch):
    return Counter(seg for s in steps if s.epoch == epoch for mb in s.micro_batches for seg in segments(mb))


def assert_consistent(per_rank, world, step=STEP, micro=MICRO, max_length=MAX_LENGTH):
    """The ranks agree on every step's numbering, global counts and micro-batch count, and the
    counts are the sums of what the ranks hold."""
    n = len(per_rank[0])
    assert all(len(steps) == n for steps in per_rank)
    for k in range(n):
        s = [steps[k] for steps in per_rank]
        assert len({(x.index, x.epoch, x.step_in_epoch, x.num_trained_tokens, x.num_input_tokens, x.num_slots,
                     len(x.micro_batches)) for x in s}) == 1
        real = sum(int(mb["input_ids"].numel()) for x in s for mb in x.micro_batches if not is_empty(mb))
        trained = sum(int((mb["labels"] != -100).sum()) for x in s for mb in x.micro_batches if not is_empty(mb))
        assert (real, trained) == (s[0].num_input_tokens, s[0].num_trained_tokens)
        assert s[0].num_slots == len(s[0].micro_batches) * world * micro
        assert s[0].index == k
    for r, steps in enumerate(per_rank):  # greedy: a rank's part closes only when the next example overflows it
        budget = share_of(step, r, world)
        for epoch in {x.epoch for x in steps}:
            parts = [sum(len(seg[0]) for mb in x.micro_batches for seg in segments(mb)) for x in steps
                     if x.epoch == epoch]
            filled = [t for t in parts if t]
            assert filled and all(budget - max_length < t <= budget for t in filled[:-1])
            assert parts[len(filled):] == [0] * (len(parts) - len(filled))  # once out, empty to the epoch's end


@pytest.mark.parametrize("world", [2, 3])
def test_each_epoch_trains_every_row_once_over_the_ranks(tok, chat, world):
    everything = make(tok, chat, 0, 1, None, prefetch_steps=0)  # one rank reads all: the reference examples
    ref = list(everything.steps())
    per_rank = on_threads(ranks(tok, chat, world))
    assert_consistent(per_rank, world)
    for epoch in (0, 1):
        got = sum((epoch_examples(steps, epoch) for steps in per_rank), Counter())
        assert got == epoch_examples(ref, epoch)
        assert sum(got.values()) == 121
    # split_dataset_by_node with one shard: rank r holds rows r, r + world, ...
    rows = sorted(i * world + r for r, steps in enumerate(per_rank) for s in steps if s.epoch == 0
                  for i in s.example_ids)
    assert rows == list(range(121))
    assert {s.epoch for s in per_rank[0]} == {0, 1}


def test_resume_mid_epoch_on_every_rank(tok, long_text):
    kw = dict(format="text", max_length=64, tokens_per_step=256, micro_batch_tokens=64)
    straight = on_threads(ranks(tok, long_text, 2, **kw))
    assert_consistent(straight, 2, step=256, micro=64, max_length=64)
    first = ranks(tok, long_text, 2, **kw)
    head = on_threads(first, limit=7)
    state = first[0].state_dict()
    assert state["ranks"] == first[1].state_dict()["ranks"] and state["fingerprint"]["ranks"] == 2
    rest = on_threads(ranks(tok, long_text, 2, **kw), states=state)
    for r in range(2):
        assert len(head[r]) + len(rest[r]) == len(straight[r])
        for a, b in zip(head[r] + rest[r], straight[r]):
            assert (a.index, a.epoch, a.step_in_epoch, a.example_ids, a.num_input_tokens) == \
                (b.index, b.epoch, b.step_in_epoch, b.example_ids, b.num_input_tokens)
            for x, y in zip(a.micro_batches, b.micro_batches):
                assert all(torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))
    # every token but a document's first trained exactly once per epoch, over both ranks
    whole = make(tok, long_text, 0, 1, None, **kw)
    assert sum((epoch_examples(s, 0) for s in straight), Counter()) == epoch_examples(list(whole.steps()), 0)


def test_resume_at_every_step_boundary_is_exact(tok, long_text):
    """The state of each step (also where one rank's share ran out before the other's)."""
    kw = dict(format="text", max_length=64, tokens_per_step=256, micro_batch_tokens=64, epochs=1)
    first = ranks(tok, long_text, 2, **kw)
    straight = on_threads(first)
    n = len(straight[0])
    one_done, mid_document = False, False
    for cut in range(1, n):
        first = ranks(tok, long_text, 2, **kw)
        on_threads(first, limit=cut)
        state = first[0].state_dict()
        one_done |= [r for r, _ in state["ranks"]].count(-1) == 1
        mid_document |= any(p > 0 for _, p in state["ranks"])
        rest = on_threads(ranks(tok, long_text, 2, **kw), states=state)
        for r in range(2):
            assert [(s.index, s.example_ids, s.num_input_tokens) for s in rest[r]] == \
                [(s.index, s.example_ids, s.num_input_tokens) for s in straight[r][cut:]]
    assert n > 4 and one_done and mid_document  # the cuts cover both hard cases


def test_shards_that_divide_are_read_by_one_rank_each(tok, tmp_path):
    rows = [{"text": f"row {i} " + " ".join(["x"] * (i % 17 + 1))} for i in range(64)]
    ds = datasets.Dataset.from_list(rows)
    files = []
    for k in range(4):
        files.append(tmp_path / f"part{k}.jsonl")
        ds.shard(4, k, contiguous=True).to_json(str(files[k]))
    per_rank = on_threads(ranks(tok, f"{tmp_path}/part*.jsonl", 2, format="text", epochs=1))
    assert_consistent(per_rank, 2)
    texts = [[tok.decode([t for t in seg[0]]) for s in steps for mb in s.micro_batches for seg in segments(mb)]
             for steps in per_rank]
    numbers = [sorted(int(t.split()[1]) for t in rank_texts) for rank_texts in texts]
    assert sorted(numbers[0] + numbers[1]) == list(range(64))
    # whole shards: each rank's rows are two of the four files
    assert {n // 16 for n in numbers[0]}.isdisjoint({n // 16 for n in numbers[1]})


def test_max_examples_counts_rows_over_all_ranks(tok, chat):
    per_rank = on_threads(ranks(tok, chat, 2, max_examples=25, epochs=1))
    assert sum(len(s.example_ids) for steps in per_rank for s in steps) == 25


def test_refusals(tok, chat):
    two = ranks(tok, chat, 2)
    on_threads(two, limit=2)
    state = two[0].state_dict()
    three = ranks(tok, chat, 3)
    with pytest.raises(UserError, match=r"ranks 2 -> 3.*same 2 data-parallel ranks"):
        three[0].load_state_dict(state)
    everyone = ranks(tok, chat, 2, stream_share="all")
    with pytest.raises(UserError, match="data.stream_share=rank reproduces"):
        everyone[0].load_state_dict(state)
    old = {**state, "fingerprint": {k: v for k, v in state["fingerprint"].items() if k not in ("share", "ranks")}}
    with pytest.raises(UserError, match="data.stream_share=all reproduces"):
        make(tok, chat, 0, 2, ThreadGather(2)).load_state_dict(old)
    make(tok, chat, 0, 2, None, stream_share="all").load_state_dict(
        {**old, "rows_consumed": 3, "pieces_consumed": 0})  # an old state resumes with the old sharing
    with pytest.raises(ValueError, match="needs `gather`"):
        make(tok, chat, 0, 2, None)
    with pytest.raises(UserError, match="data.stream_share='both' is not one of rank, all"):
        make(tok, chat, 0, 2, None, stream_share="both")


def test_a_bad_row_on_one_rank_stops_every_rank_with_one_line(tok, tmp_path):
    """Rank 1's share holds a bad row: it raises the row's error (numbered as in the whole
    stream), rank 0 hears of it through the step's exchange and raises too: no rank waits."""
    path = tmp_path / "bad.jsonl"
    rows = [{"text": f"doc {i} " + "w " * (i % 9 + 1)} for i in range(40)]
    rows[21] = {"text": 5}  # row 21 = rank 1's 11th row (21 = 10 * 2 + 1)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datas = ranks(tok, path, 2, format="text", tokens_per_step=64, micro_batch_tokens=96, max_length=32)
    errors = [None, None]

    def run(r):
        try:
            list(datas[r].steps())
        except UserError as exc:
            errors[r] = str(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors[1] is not None and "row 21 " in errors[1] and "not a string" in errors[1]
    assert errors[0] is not None and "data rank 1 stopped reading its share" in errors[0]


def test_resumed_on_one_rank_names_the_rank_count(tok, chat):
    two = ranks(tok, chat, 2)
    on_threads(two, limit=2)
    with pytest.raises(UserError, match=r"ranks 2 -> None.*same 2 data-parallel ranks"):
        make(tok, chat, 0, 1, None).load_state_dict(two[0].state_dict())


def test_empty_share_everywhere_is_one_error_on_every_rank(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(UserError, match="no examples left"):
        on_threads(ranks(tok, path, 2))


class GlooCases:
    """On each spawned rank: the stream with the trainer's all-gather (`gather_ints`)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, rank, world, failures):
        from granite_train.parallel.env import Env, gather_ints

        tok = load_tokenizer("gpt2-bundled", None)
        data = make(tok, self.path, rank, world, gather_ints(Env(rank, world, 0, torch.device("cpu"), None)))
        steps = list(data.steps())
        mine = [(s.index, s.num_input_tokens, s.num_trained_tokens, len(s.micro_batches)) for s in steps]
        rows = [i * world + rank for s in steps if s.epoch == 0 for i in s.example_ids]
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (mine, rows))
        if any(g[0] != gathered[0][0] for g in gathered):
            failures.append(f"rank {rank}: the ranks disagree on the steps")
        if sorted(r for g in gathered for r in g[1]) != list(range(121)):
            failures.append(f"rank {rank}: epoch 0 is not every row once")


@pytest.mark.slow
def test_two_gloo_ranks(chat, tmp_path):
    assert run_on_ranks(tmp_path, 2, GlooCases(str(chat))) == []


STREAM_RUN = ["recipe=sft_tiny", "model=granite-tiny", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
              "model.arch.num_hidden_layers=2", "data.streaming=true", "data.max_examples=400",
              "data.max_length=512", "trainer.tokens_per_step=2048", "trainer.micro_batch_tokens=512",
              "trainer.max_steps=6", "trainer.save_every=3", "trainer.dtype=fp32", "trainer.progress=false",
              f"data.tokenizer={TINY_TOKENIZER}"]


@pytest.mark.slow
def test_torchrun_two_ranks_resume_exactly(tmp_path):
    """One launch: the straight run, then the same command resumed from its step-3 checkpoint."""
    out = tmp_path / "run"
    args = [*STREAM_RUN, f"trainer.output_dir={out}"]
    proc, runs = torchrun_runs([{"name": "straight", "args": args},
                                {"name": "resumed", "args": args,
                                 "copy": [[str(out / "metrics.jsonl"), str(tmp_path / "straight.jsonl")]],
                                 "rmtree": [str(out / "checkpoints" / "step_6"), str(out / "final")]}], tmp_path)
    status, err = runs.get("straight", (None, proc.stderr[-3000:]))
    assert status == 0, err[-3000:]
    assert "each of 2 ranks reads its own share of demo:chitchat" in err
    state = json.loads((out / "checkpoints" / "step_3" / "trainer_state.json").read_text())["data"]
    assert state["fingerprint"]["share"] == "rank" and len(state["ranks"]) == 2
    status, err = runs.get("resumed", (None, proc.stderr[-3000:]))
    assert status == 0, err[-3000:]
    assert "resuming from" in err

    def curve(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"], r["tokens"], r["input_tokens"]) for r in rows
                if r.get("split") != "eval"]

    a, b = curve(tmp_path / "straight.jsonl"), curve(out / "metrics.jsonl")
    assert [r[0] for r in a] == [r[0] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x[3:] == y[3:] and x[1] == pytest.approx(y[1], rel=1e-6) and x[2] == pytest.approx(y[2], rel=1e-5)
