"""DeepSpeed ZeRO 0/1/2/3 (distributed.zero_stage), with and without expert parallelism
(distributed.expert_parallel_size=2), trains the same steps as the plain single-process run:
2 CPU processes (gloo), fp32, a tiny Granite-4.0-H hybrid (Mamba-2 + attention + 4 experts +
shared MLP), several micro-batches per step, an eval set.

One torchrun launch runs every configuration (and the resumes) one after the other in the same
processes: a launch costs far more than a tiny run here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from ..tiny_tokenizer import TINY_TOKENIZER

pytestmark = pytest.mark.slow

COMMON = ["recipe=sft_tiny", "model=granite-4.0-h-tiny-scaled", "model.arch.hidden_size=64",
          "model.arch.intermediate_size=32", "model.arch.shared_intermediate_size=64",
          "model.arch.num_hidden_layers=3", "model.arch.layer_types=[mamba,attention,mamba]",
          "model.arch.mamba_n_heads=4", "model.arch.mamba_d_state=16", "model.arch.mamba_chunk_size=16",
          "model.arch.num_local_experts=4", "data.max_examples=300", "data.max_length=512",
          "data.eval_fraction=0.05", "trainer.tokens_per_step=2048", "trainer.micro_batch_tokens=512",
          "trainer.dtype=fp32", "trainer.max_steps=5", "trainer.progress=false",
          f"data.tokenizer={TINY_TOKENIZER}"]
# run name -> (zero stage, expert-parallel size)
RUNS = {"zero0": (0, 1), "zero1": (1, 1), "zero2": (2, 1), "zero3": (3, 1),
        "ep_zero0": (0, 2), "ep_zero1": (1, 2), "ep_zero2": (2, 2)}
SAVED = ("zero3", "ep_zero2")  # checkpoint at step 3, resumed below
BF16 = {"zero3_bf16": (3, 1), "zero2_bf16": (2, 1)}  # DeepSpeed's bf16 mode (trainer.dtype=bf16)

# Runs train() once per configuration in the same torchrun processes (the process group and
# DeepSpeed stay up between runs), then resumes two of them from their step-3 checkpoints.
DRIVER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from granite_train.cli import _setup_logging, compose_config
    from granite_train.errors import UserError
    from granite_train.train.trainer import train

    _setup_logging()
    dist.destroy_process_group = lambda *a, **k: None  # the next run reuses the group
    root, runs, saved, common = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:]

    def settings(name):
        stage, ep = runs[name]
        # bf16 runs 3 steps: CPU bf16 kernels are slow at these widths, 3 steps show the same
        dtype = [c for c in common if c.startswith("trainer.dtype=")] if "bf16" not in name else [
            "trainer.dtype=bf16", "trainer.max_steps=3"]
        return [*(c for c in common if not c.startswith("trainer.dtype=")), *dtype,
                f"distributed.zero_stage={stage}", f"distributed.expert_parallel_size={ep}"]

    for name in runs:
        train(compose_config([*settings(name), f"trainer.save_every={3 if name in saved else 0}",
                              f"trainer.output_dir={root}/{name}"]))
    for name in saved:
        train(compose_config([*settings(name), f"trainer.output_dir={root}/{name}_resumed",
                              f"trainer.resume={root}/{name}/checkpoints/step_3"]))
    # ZeRO-3 from a checkpoint: loaded layer by layer into shards, resumed, exported streaming.
    # Its consolidated save right after the final eval once met weights the eval's prefetch
    # left in flight (DeepSpeed: "Cannot partition a param in flight").
    ft = [*settings("zero3"), f"model.path={root}/plain/final"]
    train(compose_config([*ft, "trainer.save_every=3", "trainer.checkpoint_hf_weights=always",
                          f"trainer.output_dir={root}/zero3_ft"]))
    train(compose_config([*ft, f"trainer.output_dir={root}/zero3_ft_resumed",
                          f"trainer.resume={root}/zero3_ft/checkpoints/step_3"]))
    # Expert parallelism from a checkpoint: each rank reads only its experts; resumed from its
    # model/ the same way.
    ep_ft = [*settings("ep_zero2"), f"model.path={root}/plain/final"]
    train(compose_config([*ep_ft, "trainer.save_every=3", f"trainer.output_dir={root}/ep_zero2_ft"]))
    train(compose_config([*ep_ft, f"trainer.output_dir={root}/ep_zero2_ft_resumed",
                          f"trainer.resume={root}/ep_zero2_ft/checkpoints/step_3"]))
    # An expert-parallel checkpoint resumed without expert parallelism: one clear error.
    try:
        train(compose_config([*settings("zero2"), f"trainer.output_dir={root}/refused",
                              f"trainer.resume={root}/ep_zero2/checkpoints/step_3"]))
    except UserError as exc:
        open(f"{root}/refused.txt", "w").write(str(exc))

    # A NaN loss in step 2 (on every micro-batch of rank 0 only): every rank skips that update.
    import granite_train.train.trainer as trainer
    from granite_train.models.model import GraniteForCausalLM
    calls = {"step": 0}
    real_forward, real_step = GraniteForCausalLM.forward, trainer.train_step

    def forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        if calls["step"] == 2 and dist.get_rank() == 0:
            out = out._replace(loss=out.loss * float("nan"))
        return out

    def counted(*a, **k):
        calls["step"] += 1
        return real_step(*a, **k)

    GraniteForCausalLM.forward, trainer.train_step = forward, counted
    for name in ("zero0", "zero2", "ep_zero2"):
        calls["step"] = 0
        train(compose_config([*settings(name), "trainer.max_steps=3", f"trainer.output_dir={root}/poisoned_{name}"]))
""")


def curve(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") != "eval"]
    return [(r["step"], r["loss"], r["grad_norm"], r["tokens"], r["micro_batches"]) for r in rows]


def weights(path):
    """Every tensor of an HF-layout directory (one file or shards), or of one safetensors file."""
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("model*.safetensors"))
    assert files, path
    return {k: v for f in files for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli_at):
    root = tmp_path_factory.mktemp("zero")
    plain = root / "plain"
    proc = cli_at(root, *COMMON, f"trainer.output_dir={plain}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = cli_at(root, *COMMON, f"model.path={plain / 'final'}", f"trainer.output_dir={root / 'plain_ft'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = root / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(root), json.dumps({**RUNS, **BF16}), ",".join(SAVED), *COMMON],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_runs_have_several_micro_batches_per_step(runs):
    rows = curve(runs / "plain")
    assert len(rows) == 5
    assert all(mb > 1 for *_, mb in rows)


def eval_loss(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if r.get("split") == "eval"]


@pytest.mark.parametrize("name", RUNS)
def test_distributed_run_trains_the_plain_steps(runs, name):
    plain, dist_run = curve(runs / "plain"), curve(runs / name)
    assert len(dist_run) == len(plain) == 5
    for (s, lp, gp, tp, _), (sz, lz, gz, tz, _) in zip(plain, dist_run):
        assert (s, tp) == (sz, tz)
        assert lz == pytest.approx(lp, rel=1e-5)
        # Both sides take the global norm in fp64 (parallel.grad_norm.clip_by_global_norm, DeepSpeed's ZeRO
        # 1-3), each expert counted once under expert parallelism: the norms agree as tightly
        # as the losses.
        assert gz == pytest.approx(gp, rel=1e-5)
    # The end-of-run eval over the held-out examples (lockstep forwards under ZeRO-3 and EP).
    assert len(eval_loss(runs / name)) == 1
    assert eval_loss(runs / name)[0] == pytest.approx(eval_loss(runs / "plain")[0], rel=1e-5)


@pytest.mark.parametrize("name", BF16)
def test_deepspeed_bf16_trains_bf16_weights_with_fp32_masters(runs, name):
    """trainer.dtype=bf16 under DeepSpeed: bf16 weights and gradients (final/ is bf16), fp32
    master weights in the optimizer's shards, and the fp32 run's losses to bf16 accuracy."""
    from granite_train.compat import import_deepspeed
    from granite_train.parallel.zero_checkpoint import ZeroWeights

    config = json.loads((runs / name / "deepspeed_config.json").read_text())
    assert config["bf16"] == {"enabled": True}
    assert {w.dtype for w in weights(runs / name / "final").values()} == {torch.bfloat16}
    import_deepspeed(torch.device("cpu"))
    state = runs / name / "checkpoints" / "step_3" / "deepspeed" / "state"
    optim = sorted(state.glob("*optim_states.pt"))
    assert len(optim) == 2
    from granite_train.serialization import safe_load

    masters = safe_load(optim[0], mmap=True)["optimizer_state_dict"]
    flat = masters["fp32_flat_groups"] if "fp32_flat_groups" in masters else masters["single_partition_of_fp32_groups"]
    assert {t.dtype for t in flat} == {torch.float32}
    assert ZeroWeights(state).dtype == torch.bfloat16
    fp32 = curve(runs / name.removesuffix("_bf16"))
    assert len(curve(runs / name)) == 3
    for (s, l32, g32, t32, _), (sb, lb, gb, tb, _) in zip(fp32, curve(runs / name)):
        assert (s, t32) == (sb, tb)
        assert lb == pytest.approx(l32, rel=2e-3) and gb == pytest.approx(g32, rel=5e-2)


def test_sharded_stages_agree_on_the_grad_norm(runs):
    ref = curve(runs / "zero1")
    for name in ("zero2", "zero3", "ep_zero1", "ep_zero2"):
        for (_, _, g1, _, _), (_, _, gz, _, _) in zip(ref, curve(runs / name)):
            assert gz == pytest.approx(g1, rel=1e-6)


@pytest.mark.parametrize("name", ("zero3", "ep_zero1", "ep_zero2"))
def test_sharded_runs_export_the_plain_final_weights(runs, name):
    # ZeRO-3 gathers every weight, expert parallelism every expert: final/ is the full model.
    plain, full = weights(runs / "plain" / "final"), weights(runs / name / "final")
    assert plain.keys() == full.keys()
    for key, w in plain.items():
        assert full[key].shape == w.shape, key
        assert torch.allclose(full[key], w, rtol=0, atol=1e-5), key


def test_zero_checkpoints_hold_rank_shards_and_no_consolidated_copy(runs):
    # ZeRO: the ranks' shards hold the weights (resume needs nothing else; a 7B fp32 copy would
    # be 28 GB per save); model/ keeps config.json and the tokenizer.
    ckpt = runs / "zero3" / "checkpoints" / "step_3"
    assert (ckpt / "deepspeed").is_dir() and not (ckpt / "optimizer.pt").exists()
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == [
        "config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    # Expert parallelism: each rank's file holds its optimizer, each rank its slice of the
    # experts in experts/ (nothing gathered to save), model/ every other weight.
    ckpt = runs / "ep_zero2" / "checkpoints" / "step_3"
    assert sorted(p.name for p in (ckpt / "deepspeed").iterdir()) == [
        "expert_parallel_rank_00000.pt", "expert_parallel_rank_00001.pt"]
    layers = range(len([k for k in weights(runs / "ep_zero2" / "final") if k.endswith("block_sparse_moe.input_linear.weight")]))
    assert sorted(p.name for p in (ckpt / "experts").iterdir()) == sorted(
        f"experts-{first}-of-00004.layer-{i:05d}.safetensors" for first in ("00000-00001", "00002-00003") for i in layers)
    held = {k: v for i in layers for k, v in
            weights(ckpt / "experts" / f"experts-00002-00003-of-00004.layer-{i:05d}.safetensors").items()}
    final = weights(runs / "ep_zero2" / "final")
    key = "model.layers.0.block_sparse_moe.input_linear.weight"
    assert held[key].shape[0] == 2 and final[key].shape[0] == 4  # rank 1's two (the export test: the values)
    in_model = weights(ckpt / "model")
    assert not [k for k in in_model if "block_sparse_moe.input_linear" in k or "block_sparse_moe.output_linear" in k]
    assert set(in_model) | set(held) == set(final)


@pytest.mark.parametrize("name", ("zero3", "zero2", "zero3_bf16", "zero2_bf16", "ep_zero2"))
def test_offline_export_of_the_rank_shards_is_the_final_model(runs, name, tmp_path):
    """`granite_train.export` without the ranks: the ZeRO shards of the last checkpoint, streamed
    into HF shards, are exactly the weights the run gathered into final/, and load in
    transformers with the single-process model's logits."""
    from granite_train.export import main as export_main

    out = tmp_path / "export"
    assert export_main([str(runs / name), str(out), "--max-shard-size", "200KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    final, exported = weights(runs / name / "final"), weights(out)
    assert final.keys() == exported.keys()
    for key, w in final.items():
        assert torch.equal(exported[key], w), key  # bf16: the masters' bf16 rounding, as DeepSpeed copies them
    if "bf16" in name:
        return
    from granite_train.models import load_model

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = load_model(runs / "plain" / "final").eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("name", SAVED)
def test_resume_continues_the_straight_run(runs, name):
    straight, resumed = curve(runs / name), curve(runs / f"{name}_resumed")
    assert [r[0] for r in resumed] == [4, 5]
    for a, b in zip(straight[3:], resumed):
        assert b[1] == pytest.approx(a[1], rel=1e-6)
        assert b[2] == pytest.approx(a[2], rel=1e-6)
    a, b = weights(runs / name / "final"), weights(runs / f"{name}_resumed" / "final")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-6), key


def fine_tune_equals_plain(runs, name):
    """The fine-tune run `name` (from plain/final, checkpoint at step 3) and its resume
    `<name>_resumed` against the single-process fine-tune: steps, final weights."""
    plain, run, resumed = curve(runs / "plain_ft"), curve(runs / name), curve(runs / f"{name}_resumed")
    assert len(run) == len(plain) == 5 and [r[0] for r in resumed] == [4, 5]
    for (s, lp, gp, tp, _), (sr, lr, gr, tr, _) in zip(plain, run):
        assert (s, tp) == (sr, tr)
        assert lr == pytest.approx(lp, rel=1e-5) and gr == pytest.approx(gp, rel=1e-5)
    for a, b in zip(run[3:], resumed):
        assert b[1] == pytest.approx(a[1], rel=1e-6) and b[2] == pytest.approx(a[2], rel=1e-6)
    ref = weights(runs / "plain_ft" / "final")
    for out in (name, f"{name}_resumed"):
        got = weights(runs / out / "final")
        assert got.keys() == ref.keys()
        for key, w in ref.items():
            assert torch.allclose(got[key], w, rtol=0, atol=1e-5), (out, key)


def test_zero3_from_a_checkpoint_loads_sharded_and_trains_the_plain_steps(runs):
    """model.path under ZeRO-3: every layer is sharded as it is read (no rank holds the whole
    model), and the run, its resume and its streamed, sharded export equal one process's."""
    fine_tune_equals_plain(runs, "zero3_ft")
    assert (runs / "zero3_ft" / "final" / "model.safetensors.index.json").is_file()  # <= a rank's share per shard


def test_checkpoint_hf_weights_always_adds_the_consolidated_copy(runs):
    # zero3_ft saved with trainer.checkpoint_hf_weights=always (and zero3_ft_resumed resumed
    # from it, through the sharded load of model/, above): model/ equals the ranks' shards.
    from granite_train.compat import import_deepspeed
    from granite_train.parallel.zero_checkpoint import ZeroWeights

    ckpt = runs / "zero3_ft" / "checkpoints" / "step_3"
    assert (ckpt / "model" / "model.safetensors.index.json").is_file()
    import_deepspeed(torch.device("cpu"))
    shards, copy = ZeroWeights(ckpt / "deepspeed" / "state"), weights(ckpt / "model")
    assert all(torch.equal(shards(k), w) for k, w in copy.items())


def test_expert_parallel_from_a_checkpoint_reads_its_experts_and_trains_the_plain_steps(runs):
    """model.path with expert_parallel_size=2: each rank reads only its own experts' slices
    (`tests/parallel/test_expert_parallel.py` checks the slices), and the run and its resume
    (from model/, read the same way) equal one process's."""
    fine_tune_equals_plain(runs, "ep_zero2_ft")


def test_resuming_expert_parallel_state_without_it_is_refused(runs):
    message = (runs / "refused.txt").read_text()
    assert "distributed.expert_parallel_size=2" in message and "\n" not in message


@pytest.mark.parametrize("name", ("zero0", "zero2", "ep_zero2"))
def test_a_non_finite_step_is_skipped_on_every_rank(runs, name):
    rows = [json.loads(line) for line in (runs / f"poisoned_{name}" / "metrics.jsonl").read_text().splitlines()
            if '"split": "eval"' not in line]
    assert [r.get("skipped", False) for r in rows] == [False, True, False]
    assert rows[-1]["skipped_steps"] == 1
    straight = curve(runs / name)
    assert rows[0]["loss"] == pytest.approx(straight[0][1], rel=1e-6)
    # Step 3 starts from the weights after step 1: not the straight run's step 3.
    assert rows[2]["loss"] != pytest.approx(straight[2][1], rel=1e-6)
    w = weights(runs / f"poisoned_{name}" / "final")
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
    (["distributed.expert_parallel_size=2"], "runs on DeepSpeed: set distributed.zero_stage=0, 1 or 2"),
    (["distributed.zero_stage=3", "distributed.expert_parallel_size=2"], "does not work with distributed.zero_stage=3"),
    (["distributed.zero_stage=1", "distributed.expert_parallel_size=3"], "does not split over"),
    (["distributed.zero_stage=1", "distributed.expert_parallel_size=0"], "must be >= 1"),
    (["distributed.zero_stage=1", "distributed.expert_parallel_size=2", "model.arch.num_local_experts=0"], "needs a MoE model"),
])
def test_invalid_zero_settings_are_one_line_errors(overrides, message):
    from granite_train.cli import compose_config
    from granite_train.errors import UserError

    with pytest.raises(UserError) as err:
        compose_config([*COMMON, *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_expert_parallel_size_must_divide_the_ranks(tmp_path, cli_at):
    # One process cannot hold half of the experts: refused before any training.
    proc = cli_at(tmp_path, *COMMON, "distributed.zero_stage=1", "distributed.expert_parallel_size=2",
                  f"trainer.output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert "does not divide the 1 rank(s)" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
