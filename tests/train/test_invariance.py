"""The math of a step depends on the data and tokens_per_step only: not on the micro-batch size
(gradient accumulation) and not on the number of data-parallel ranks. fp32, CPU."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

COMMON = ["recipe=sft_tiny", "model=granite-tiny", "data.max_examples=400", "data.max_length=512",
          "trainer.tokens_per_step=4096", "model.arch.hidden_size=64",
          "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
          "trainer.dtype=fp32", "trainer.max_steps=4", "trainer.progress=false"]


def curve(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"], r["tokens"], r["input_tokens"]) for r in rows]


def assert_same_curve(a, b, rel):
    assert len(a) == len(b) == 4
    for (la, ga, ta, ia), (lb, gb, tb, ib) in zip(a, b):
        assert (ta, ia) == (tb, ib)  # the same examples
        assert la == pytest.approx(lb, rel=rel)
        assert ga == pytest.approx(gb, rel=rel)


def test_micro_batch_size_does_not_change_the_step(cli, tmp_path):
    runs = {}
    for mbt in (512, 1024, 4096):
        out = tmp_path / f"mbt{mbt}"
        proc = cli(*COMMON, f"trainer.micro_batch_tokens={mbt}", f"trainer.output_dir={out}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mbt] = curve(out)
    assert_same_curve(runs[512], runs[4096], rel=1e-6)
    assert_same_curve(runs[1024], runs[4096], rel=1e-6)


def test_two_ranks_equal_one(cli, tmp_path):
    one = tmp_path / "one"
    proc = cli(*COMMON, "trainer.micro_batch_tokens=1024", f"trainer.output_dir={one}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = tmp_path / "two"
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "granite_train", *COMMON, "trainer.micro_batch_tokens=1024", f"trainer.output_dir={two}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_curve(curve(one), curve(two), rel=1e-5)


def test_padded_baseline_trains_the_same_loss_as_packed(cli, tmp_path):
    # packing=none selects examples like greedy and only collates them padded: same loss.
    curves = {}
    for packing in ("greedy", "none"):
        out = tmp_path / packing
        proc = cli(*COMMON, "trainer.micro_batch_tokens=1024", f"data.packing={packing}",
                   f"trainer.output_dir={out}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        curves[packing] = curve(out)
    assert_same_curve(curves["greedy"], curves["none"], rel=1e-6)


def test_a_rank_with_nothing_to_train_keeps_step(cli, tmp_path):
    # One micro-batch per step: rank 1 gets none, every step (MoE: its expert counts are zeros,
    # and it still takes part in every collective). Same curve as one process.
    settings = [*COMMON, "model=granitemoe-tiny", "model.arch.num_local_experts=4",
                "trainer.tokens_per_step=1024", "trainer.micro_batch_tokens=1024", "trainer.max_steps=4"]
    one = tmp_path / "one"
    proc = cli(*settings, f"trainer.output_dir={one}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "granite_train", *settings, f"trainer.output_dir={two}"],
        cwd=tmp_path, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_curve(curve(one), curve(two), rel=1e-5)
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(r["micro_batches"] == 1 for r in rows)
    assert all(sum(map(sum, r["expert_counts"])) > 0 for r in rows)
