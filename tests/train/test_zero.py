"""DeepSpeed ZeRO 0/1/2/3 (distributed.zero_stage) trains the same steps as the plain
single-process run: 2 CPU processes (gloo), fp32, a tiny MoE, several micro-batches per step.

One torchrun launch runs every stage (and a ZeRO-3 resume) one after the other in the same
processes: a launch costs far more than a tiny run here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

COMMON = ["recipe=sft_tiny", "model=granitemoe-tiny", "model.arch.hidden_size=64",
          "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2",
          "model.arch.num_local_experts=4", "data.max_examples=300", "data.max_length=512",
          "trainer.tokens_per_step=4096", "trainer.micro_batch_tokens=1024", "trainer.dtype=fp32",
          "trainer.max_steps=5", "trainer.progress=false"]
STAGES = (0, 1, 2, 3)

# Runs train() once per stage in the same torchrun processes (the process group and DeepSpeed
# stay up between runs), then resumes the ZeRO-3 run from its step-3 checkpoint.
DRIVER = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from granite_train.cli import _setup_logging, compose_config
    from granite_train.train.loop import train

    _setup_logging()
    dist.destroy_process_group = lambda *a, **k: None  # the next run reuses the group
    root, common = sys.argv[1], sys.argv[2:]
    for stage in (0, 1, 2, 3):
        train(compose_config([*common, f"distributed.zero_stage={stage}",
                              f"trainer.save_every={3 if stage == 3 else 0}", f"trainer.output_dir={root}/zero{stage}"]))
    train(compose_config([*common, "distributed.zero_stage=3", f"trainer.output_dir={root}/resumed",
                          f"trainer.resume={root}/zero3/checkpoints/step_3"]))

    # A NaN loss in step 2 (on every micro-batch of rank 0 only): every rank skips that update.
    import granite_train.train.loop as loop
    from granite_train.models.model import GraniteForCausalLM
    calls = {"step": 0}
    real_forward, real_step = GraniteForCausalLM.forward, loop._train_step

    def forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        if calls["step"] == 2 and dist.get_rank() == 0:
            out.loss = out.loss * float("nan")
        return out

    def counted(*a, **k):
        calls["step"] += 1
        return real_step(*a, **k)

    GraniteForCausalLM.forward, loop._train_step = forward, counted
    for stage in (0, 2):
        calls["step"] = 0
        train(compose_config([*common, f"distributed.zero_stage={stage}", "trainer.max_steps=3",
                              f"trainer.output_dir={root}/poisoned{stage}"]))
""")


def curve(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["tokens"], r["micro_batches"]) for r in rows]


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli_at):
    root = tmp_path_factory.mktemp("zero")
    plain = root / "plain"
    proc = cli_at(root, *COMMON, f"trainer.output_dir={plain}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = root / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(root), *COMMON], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_runs_have_several_micro_batches_per_step(runs):
    rows = curve(runs / "plain")
    assert len(rows) == 5
    assert all(mb > 1 for *_, mb in rows)


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_trains_the_plain_steps(runs, stage):
    plain, zero = curve(runs / "plain"), curve(runs / f"zero{stage}")
    assert len(zero) == len(plain) == 5
    for (s, lp, gp, tp, _), (sz, lz, gz, tz, _) in zip(plain, zero):
        assert (s, tp) == (sz, tz)
        assert lz == pytest.approx(lp, rel=1e-5)
        # Both sides take the global norm in fp64 (engine.clip_by_global_norm, DeepSpeed's ZeRO
        # 1-3), so the norms agree as tightly as the losses.
        assert gz == pytest.approx(gp, rel=1e-5)


def test_sharded_stages_agree_on_the_grad_norm(runs):
    ref = curve(runs / "zero1")
    for stage in (2, 3):
        for (_, _, g1, _, _), (_, _, gz, _, _) in zip(ref, curve(runs / f"zero{stage}")):
            assert gz == pytest.approx(g1, rel=1e-6)


def test_zero3_exports_the_plain_final_weights(runs):
    plain, zero3 = weights(runs / "plain" / "final"), weights(runs / "zero3" / "final")
    assert plain.keys() == zero3.keys()
    for name, w in plain.items():
        assert zero3[name].shape == w.shape, name
        assert torch.allclose(zero3[name], w, rtol=0, atol=1e-5), name
    # The checkpoint's model/ is the consolidated HF layout too, next to DeepSpeed's shards.
    ckpt = runs / "zero3" / "checkpoints" / "step_3"
    assert (ckpt / "model" / "config.json").is_file() and (ckpt / "deepspeed").is_dir()
    assert not (ckpt / "optimizer.pt").exists()


def test_zero3_resume_continues_the_straight_run(runs):
    straight, resumed = curve(runs / "zero3"), curve(runs / "resumed")
    assert [r[0] for r in resumed] == [4, 5]
    for a, b in zip(straight[3:], resumed):
        assert b[1] == pytest.approx(a[1], rel=1e-6)
        assert b[2] == pytest.approx(a[2], rel=1e-6)
    a, b = weights(runs / "zero3" / "final"), weights(runs / "resumed" / "final")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


@pytest.mark.parametrize("stage", (0, 2))
def test_a_non_finite_step_is_skipped_on_every_rank(runs, stage):
    rows = [json.loads(line) for line in (runs / f"poisoned{stage}" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, True, False]
    assert rows[-1]["skipped_steps"] == 1
    straight = curve(runs / f"zero{stage}")
    assert rows[0]["loss"] == pytest.approx(straight[0][1], rel=1e-6)
    # Step 3 starts from the weights after step 1: not the straight run's step 3.
    assert rows[2]["loss"] != pytest.approx(straight[2][1], rel=1e-6)
    w = weights(runs / f"poisoned{stage}" / "final")
    assert all(bool(torch.isfinite(t).all()) for t in w.values())


def test_resuming_across_engines_is_refused(runs, cli_at):
    # A ZeRO checkpoint holds no optimizer.pt: the plain engine must say so, not crash.
    out = runs / "plain_from_zero"
    proc = cli_at(runs, *COMMON, "trainer.max_steps=4", f"trainer.output_dir={out}",
                  f"trainer.resume={runs / 'zero3' / 'checkpoints' / 'step_3'}")
    assert proc.returncode == 2
    assert "distributed.zero_stage=3" in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["distributed.zero_stage=4"], "is not one of 0, 1, 2, 3"),
    (["distributed.zero_stage=2", "distributed.offload_params=true"], "needs distributed.zero_stage=3"),
    (["distributed.offload_optimizer=true"], "needs DeepSpeed"),
    (["distributed.zero_stage=1", "distributed.deepspeed_config=/nonexistent.json"], "is not a file"),
])
def test_invalid_zero_settings_are_one_line_errors(overrides, message):
    from granite_train.cli import compose_config
    from granite_train.errors import UserError

    with pytest.raises(UserError) as err:
        compose_config([*COMMON, *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)
