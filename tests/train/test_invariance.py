"""The math of a step depends on the data and tokens_per_step only: not on the micro-batch size
(gradient accumulation) and not on the number of data-parallel ranks. fp32, CPU.

The one-process runs train in this process; every 2-rank run of the module trains in one
torchrun launch (`two_ranks`), one run after the other."""

import json
import re

import pytest

from ..runs import torchrun_runs
from ..tiny_tokenizer import TINY_TOKENIZER

pytestmark = pytest.mark.slow

COMMON = ["recipe=sft_tiny", "model=granite-tiny", "data.max_examples=400", "data.max_length=512",
          "trainer.tokens_per_step=2048", "model.arch.hidden_size=64",
          "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2",
          "trainer.dtype=fp32", "trainer.max_steps=4", "trainer.progress=false",
          f"data.tokenizer={TINY_TOKENIZER}"]
# One micro-batch per step: on 2 ranks rank 1 gets none, every step (MoE: its expert counts are
# zeros, and it still takes part in every collective).
EMPTY_RANK = [*COMMON, "model=granitemoe-tiny", "model.arch.num_local_experts=4",
              "trainer.tokens_per_step=1024", "trainer.micro_batch_tokens=1024", "trainer.max_steps=4"]
HYBRID = ["recipe=sft_tiny", "model=granite-4.0-h-tiny-scaled", "model.arch.hidden_size=64",
          "model.arch.intermediate_size=32", "model.arch.shared_intermediate_size=64",
          "model.arch.num_hidden_layers=3", "model.arch.layer_types=[mamba,attention,mamba]",
          "model.arch.mamba_n_heads=4", "model.arch.mamba_d_state=16", "model.arch.mamba_chunk_size=16",
          "model.arch.num_local_experts=4", "data.max_examples=300", "data.max_length=512",
          "data.eval_fraction=0.05", "trainer.tokens_per_step=2048", "trainer.dtype=fp32",
          "trainer.max_steps=4", "trainer.progress=false", f"data.tokenizer={TINY_TOKENIZER}"]
HYBRID_CP_EP = [*HYBRID, "trainer.micro_batch_tokens=256", "distributed.context_parallel_size=2",
                "distributed.zero_stage=2", "distributed.expert_parallel_size=2", "trainer.save_every=2"]


def curve(out):
    """(loss, grad norm, tokens, input tokens) per train step of a run directory or metrics file."""
    path = out if out.suffix == ".jsonl" else out / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    return [(r["loss"], r["grad_norm"], r["tokens"], r["input_tokens"]) for r in rows if r.get("split") != "eval"]


def assert_same_curve(a, b, rel):
    assert len(a) == len(b) == 4
    for (la, ga, ta, ia), (lb, gb, tb, ib) in zip(a, b):
        assert (ta, ia) == (tb, ib)  # the same examples
        assert la == pytest.approx(lb, rel=rel)
        assert ga == pytest.approx(gb, rel=rel)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every 2-rank run of this module, in one launch: {name: (output dir, status, stderr)}."""
    root = tmp_path_factory.mktemp("two_ranks")
    cp = root / "hybrid_cp_ep"
    runs = [
        # small gradient buckets: several reduced during the backward
        {"name": "dp", "args": [*COMMON, "trainer.micro_batch_tokens=1024", "distributed.bucket_mb=0.1",
                                f"trainer.output_dir={root / 'dp'}"]},
        {"name": "empty_rank", "args": [*EMPTY_RANK, f"trainer.output_dir={root / 'empty_rank'}"]},
        {"name": "cp", "args": [*COMMON, "trainer.micro_batch_tokens=256", "distributed.context_parallel_size=2",
                                f"trainer.output_dir={root / 'cp'}"]},
        {"name": "hybrid_cp_ep", "args": [*HYBRID_CP_EP, f"trainer.output_dir={cp}"]},
        # ... resumed from step 2: the straight run's metrics kept aside, its last checkpoint and
        # export removed
        {"name": "hybrid_cp_ep_resumed", "args": [*HYBRID_CP_EP, f"trainer.output_dir={cp}"],
         "copy": [[str(cp / "metrics.jsonl"), str(root / "hybrid_cp_ep_straight.jsonl")]],
         "rmtree": [str(cp / "checkpoints" / "step_4"), str(cp / "final")]},
        {"name": "hybrid_cp_z3_ac", "args": [*HYBRID, "trainer.micro_batch_tokens=256",
                                             "distributed.context_parallel_size=2", "distributed.zero_stage=3",
                                             "model.activation_checkpointing=true",
                                             f"trainer.output_dir={root / 'hybrid_cp_z3_ac'}"]},
    ]
    proc, sections = torchrun_runs(runs, root)
    return root, proc, sections


def ran(two_ranks, name):
    root, proc, sections = two_ranks
    status, err = sections.get(name, (None, proc.stderr[-3000:]))
    assert status == 0, err[-3000:]
    return root / name, err


def test_micro_batch_size_does_not_change_the_step(cli, tmp_path):
    runs = {}
    for mbt in (512, 1024, 2048):
        out = tmp_path / f"mbt{mbt}"
        proc = cli(*COMMON, f"trainer.micro_batch_tokens={mbt}", f"trainer.output_dir={out}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[mbt] = curve(out)
    assert_same_curve(runs[512], runs[2048], rel=1e-6)  # 4 micro-batches, 2, 1 per step
    assert_same_curve(runs[1024], runs[2048], rel=1e-6)


def test_two_ranks_equal_one(cli, tmp_path, two_ranks):
    one = tmp_path / "one"
    proc = cli(*COMMON, "trainer.micro_batch_tokens=1024", f"trainer.output_dir={one}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    two, err = ran(two_ranks, "dp")
    assert_same_curve(curve(one), curve(two), rel=1e-5)
    buckets = re.search(r"gradients SUM all-reduced in (\d+) bucket\(s\) of <= [\d.]+ MiB during the backward", err)
    assert buckets and int(buckets[1]) > 2, err[-2000:]


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


def test_a_rank_with_nothing_to_train_keeps_step(cli, tmp_path, two_ranks):
    # Same curve as one process.
    one = tmp_path / "one"
    proc = cli(*EMPTY_RANK, f"trainer.output_dir={one}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    two, _ = ran(two_ranks, "empty_rank")
    assert_same_curve(curve(one), curve(two), rel=1e-5)
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(r["micro_batches"] == 1 for r in rows)
    assert all(sum(map(sum, r["expert_counts"])) > 0 for r in rows)


def test_context_parallel_rows_longer_than_a_rank_equal_one_process(cli, tmp_path, two_ranks):
    """Rows of 512 tokens split over 2 ranks of 256 each (examples up to 512): the same curve."""
    one = tmp_path / "one"
    proc = cli(*COMMON, "trainer.micro_batch_tokens=512", f"trainer.output_dir={one}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    two, _ = ran(two_ranks, "cp")
    assert_same_curve(curve(one), curve(two), rel=1e-5)


@pytest.fixture(scope="module")
def hybrid_one(tmp_path_factory, cli_at):
    """The single-process hybrid run the context-parallel runs are compared with."""
    out = tmp_path_factory.mktemp("hybrid") / "one"
    proc = cli_at(out.parent, *HYBRID, "trainer.micro_batch_tokens=512", f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_context_parallel_hybrid_with_zero2_and_expert_parallel_equals_one_process(hybrid_one, two_ranks):
    """Granite 4.0-H's design (Mamba-2 + attention + MoE): context parallel 2 x expert parallel
    2 on ZeRO-2 gives the single process's losses, grad norms, aux losses and eval loss."""
    one = hybrid_one
    two, err = ran(two_ranks, "hybrid_cp_ep")
    assert "context parallel: groups of 2 ranks share rows of <= 512 tokens" in err
    straight_metrics = two.parent / "hybrid_cp_ep_straight.jsonl"
    assert_same_curve(curve(one), curve(straight_metrics), rel=1e-5)

    # ... and a resume from step 2 trains steps 3 and 4 again exactly
    def exact(path):  # what a resume must reproduce bit for bit (not the timings)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("aux_loss"), r.get("eval_loss")) for r in rows]

    _, resumed_err = ran(two_ranks, "hybrid_cp_ep_resumed")
    assert "resuming from" in resumed_err and "step_2" in resumed_err
    assert exact(two / "metrics.jsonl") == exact(straight_metrics)
    rows = {d: [json.loads(line) for line in p.read_text().splitlines()]
            for d, p in (("one", one / "metrics.jsonl"), ("two", straight_metrics))}
    aux = {d: [r["aux_loss"] for r in rows[d] if r.get("split") != "eval"] for d in rows}
    assert aux["two"] == pytest.approx(aux["one"], rel=1e-5)
    evals = {d: [r["eval_loss"] for r in rows[d] if r.get("split") == "eval"] for d in rows}
    assert len(evals["one"]) == 1 and evals["two"] == pytest.approx(evals["one"], rel=1e-5)


def test_context_parallel_hybrid_on_zero3_with_activation_checkpointing_equals_one_process(hybrid_one, two_ranks):
    """ZeRO-3 gathers every weight while the slices exchange K/V and states, and activation
    checkpointing repeats those exchanges in backward: still the single process's curve."""
    out, _ = ran(two_ranks, "hybrid_cp_z3_ac")
    assert_same_curve(curve(hybrid_one), curve(out), rel=1e-5)
