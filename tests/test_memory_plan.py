"""The memory planner (granite_train/memory_plan.py, `python -m granite_train.info --memory`): the
state terms are ZeRO's bytes per parameter, expert parallelism splits the experts and their
ZeRO group, the cheapest fitting settings come first and fit; the CLI's options and errors.
Predicted against measured peaks: docs/benchmarks.md (a benchmark, not a test)."""

import json

import pytest

from granite_train.cli import compose_config
from granite_train.info import main
from granite_train.memory_plan import GIB, Settings, Shape, fitting, plan

DENSE = compose_config(["model=granite-tiny", "model.arch.vocab_size=1000"]).model.arch
MOE = compose_config(["model=granitemoe-tiny", "model.arch.vocab_size=1000",
                      "model.arch.num_local_experts=8"]).model.arch


def _state(p):
    return p.bytes["weights"] + p.bytes["gradients"] + p.bytes["optimizer"]


@pytest.mark.parametrize("stage,dtype,per_param", [
    (3, "bf16", lambda n: 16 / n), (3, "fp32", lambda n: 20 / n), (2, "bf16", lambda n: 2 + 14 / n),
    (1, "bf16", lambda n: 4 + 12 / n), (0, "bf16", lambda n: 16), (None, "fp32", lambda n: 16)])
def test_state_is_zeros_bytes_per_parameter(stage, dtype, per_param):
    shape = Shape.of(DENSE)
    for ranks in (1, 4):
        p = plan(shape, Settings(world_size=ranks, zero_stage=stage, dtype=dtype))
        assert _state(p) == pytest.approx(per_param(ranks) * shape.params, rel=1e-6)
        # ZeRO-1/2 flatten the rank's gradient partition (bf16: then converted to fp32) for the step
        per = (6 if dtype == "bf16" else 4) if stage in (1, 2) else 0
        assert p.bytes["step_buffer"] == int(per * shape.params / ranks)
        assert (p.bytes["live_layer"] > 0) == (p.bytes["live_embedding"] > 0) == (stage == 3)


def test_expert_parallelism_splits_the_experts_and_their_zero_group():
    shape = Shape.of(MOE)
    assert 0 < shape.expert_params < shape.params
    one = plan(shape, Settings(world_size=4, zero_stage=2, expert_parallel_size=1, dtype="bf16"))
    two = plan(shape, Settings(world_size=4, zero_stage=2, expert_parallel_size=2, dtype="bf16"))
    dense = shape.params - shape.expert_params
    # weights: every rank holds 1/EP of the experts; their gradient + Adam over world/EP ranks
    assert two.bytes["weights"] == int(2 * dense + 2 * shape.expert_params / 2)
    assert two.bytes["optimizer"] == pytest.approx(12 * dense / 4 + 12 * (shape.expert_params / 2) / 2, abs=1)
    assert two.bytes["weights"] < one.bytes["weights"] and two.bytes["optimizer"] == one.bytes["optimizer"]
    assert two.bytes["moe_dispatch"] == 2 * one.bytes["moe_dispatch"]  # the all-to-all buffers


def test_activations_grow_with_tokens_and_shrink_with_checkpointing():
    shape = Shape.of(DENSE)
    acts = lambda **kw: plan(shape, Settings(**kw)).bytes["saved_activations"]
    assert acts(micro_batch_tokens=8192) == 2 * acts(micro_batch_tokens=4096)
    assert acts(activation_checkpointing=True) < acts(activation_checkpointing=False)
    p = plan(shape, Settings(zero_stage=3, world_size=2))
    held = sum(p.bytes[k] for k in ("weights", "gradients", "optimizer", "saved_activations", "process"))
    assert p.peak_bytes == held + max(p.phase_bytes().values())  # phases do not add up
    chunked = plan(shape, Settings(loss_chunk_tokens=1024)).bytes["logits"]
    assert chunked * 4 == plan(shape, Settings()).bytes["logits"]


def test_the_cheapest_fitting_settings_come_first_and_fit():
    shape = Shape.of(MOE)
    one = plan(shape, Settings(world_size=1, zero_stage=None))
    fixed = one.bytes["process"] / GIB  # what no sharding removes
    gpu = fixed + (one.peak_gib_per_rank - fixed) * 0.6
    fits = fitting(shape, Settings(), gpu_gib=gpu)
    assert fits and all(f.peak_gib_per_rank <= gpu for f in fits)
    assert len({f.settings.world_size for f in fits}) == 1  # the fewest ranks that fit at all
    order = [(f.settings.world_size, f.settings.offload_optimizer) for f in fits]
    assert order == sorted(order)  # no offload before offload
    assert plan(shape, Settings(world_size=1, zero_stage=2)).peak_gib_per_rank > gpu  # it needed sharding or offload
    assert fitting(shape, Settings(), gpu_gib=one.peak_gib_per_rank * 2)[0].settings.world_size == 1


def test_info_memory_prints_and_writes_json(capsys):
    assert main(["model=granitemoe-tiny", "model.arch.vocab_size=1000", "distributed.zero_stage=2",
                 "distributed.expert_parallel_size=2", "--memory", "--world-size", "4", "--device=cpu"]) == 0
    text = capsys.readouterr().out
    assert "4 rank(s), ZeRO-2, EP 2, fp32" in text and "peak_gib_per_rank" in text
    assert main(["model=granitemoe-tiny", "model.arch.vocab_size=1000", "--memory", "--json",
                 "--gpu-memory", "1.0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["dtype"] == "bf16" and out["model"]["model_type"] == "granitemoe"
    held = sum(out["bytes_per_rank"][k] for k in ("weights", "gradients", "optimizer", "saved_activations", "process"))
    assert out["peak_gib_per_rank"] == pytest.approx((held / GIB + out["phase_gib_per_rank"][out["peak_phase"]]), abs=2e-3)
    assert out["fits"] and all(f["peak_gib_per_rank"] <= 1.0 for f in out["fits"])


@pytest.mark.parametrize("args,message", [
    (["--memory", "--world-size", "two"], "--world-size needs a int value"),
    (["--memory", "--world-size", "3", "distributed.expert_parallel_size=2", "distributed.zero_stage=2"],
     "does not divide --world-size=3"),
    (["--memory", "--device", "tpu"], "--device=tpu is not one of cuda, cpu"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
])
def test_info_memory_refuses_bad_options_in_one_line(args, message, capsys):
    assert main(["model=granitemoe-tiny", "model.arch.vocab_size=1000", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
