import math

import pytest

from granite_train.config import SchedulerConfig
from granite_train.schedule import Schedule


def test_warmup_is_linear_and_reaches_peak():
    s = Schedule(SchedulerConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1), lr=1.0, total_steps=20)
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_ends_at_min_lr_and_is_monotone_after_warmup():
    s = Schedule(SchedulerConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1), lr=2.0, total_steps=12)
    lrs = [s.lr_at(i) for i in range(12)]
    assert lrs[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    mid = 2 + (12 - 2 - 1) / 2
    assert s.lr_at(int(mid)) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi * (int(mid) - 2) / 9)), rel=1e-9)


def test_linear_and_constant():
    lin = Schedule(SchedulerConfig(name="linear", warmup_steps=0, min_lr_ratio=0.0), lr=1.0, total_steps=11)
    assert [lin.lr_at(i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    const = Schedule(SchedulerConfig(name="constant", warmup_steps=0), lr=3e-4, total_steps=5)
    assert {const.lr_at(i) for i in range(5)} == {3e-4}


# ---------------------------------------------------------------------------------------------
# Token-based schedules: power (Shen et al. 2024, Eq. 7 and 8) and WSD.
# ---------------------------------------------------------------------------------------------
import json  # noqa: E402

from granite_train.cli import compose_config  # noqa: E402
from granite_train.errors import UserError  # noqa: E402
from granite_train.schedule import decay_shape  # noqa: E402

from .tiny_tokenizer import TINY_TOKENIZER

E = math.e
LR_MAX = 0.02


def power(**kw):
    """a=4, b=-0.51, beta=8 sequences, lr_max=0.02, warmup 1e7 tokens, decay the last 2e8 of 1e9."""
    fields = dict(name="power", a=4.0, b=-0.51, batch_size=8, warmup_tokens=10_000_000,
                  decay_tokens=200_000_000, decay="linear", min_lr=0.0)
    fields.update(kw)
    return Schedule(SchedulerConfig(**fields), lr=LR_MAX, total_steps=1000, tokens_per_step=8 * 4096,
                    total_tokens=1_000_000_000)


def test_power_hand_computed_values_in_each_phase():
    s = power()
    # Eq. 7 written out: min(lr_max, a * beta * n**b).
    assert s.lr_at(0, 100_000_000) == pytest.approx(4 * 8 * 1e8 ** -0.51, rel=1e-12)  # stable, ~2.66e-3
    assert 4 * 8 * 1e8 ** -0.51 < LR_MAX
    # Warmup: (n / N_w) * lr_power(N_w), from 0 at n = 0.
    assert s.lr_at(0, 0) == 0.0
    assert s.lr_at(0, 5_000_000) == pytest.approx(0.5 * 4 * 8 * 1e7 ** -0.51, rel=1e-12)
    assert s.lr_at(0, 2_500_000) == pytest.approx(0.25 * 4 * 8 * 1e7 ** -0.51, rel=1e-12)
    # Linear decay over [8e8, 1e9] from lr_power(8e8) to 0.
    assert s.lr_at(0, 900_000_000) == pytest.approx(0.5 * 4 * 8 * 8e8 ** -0.51, rel=1e-12)
    assert s.lr_at(0, 850_000_000) == pytest.approx(0.75 * 4 * 8 * 8e8 ** -0.51, rel=1e-12)
    # The step number plays no part: tokens do.
    assert s.lr_at(123, 100_000_000) == s.lr_at(0, 100_000_000)


def test_power_exponential_and_cosine_decay_values():
    top = 4 * 8 * 8e8 ** -0.51
    exp_mid = (math.exp(-0.5) - math.exp(-1)) / (1 - math.exp(-1))  # g(1/2), about 0.5820
    assert power(decay="exponential").lr_at(0, 900_000_000) == pytest.approx(top * exp_mid, rel=1e-12)
    assert power(decay="exponential", min_lr=1e-4).lr_at(0, 900_000_000) == pytest.approx(
        1e-4 + (top - 1e-4) * exp_mid, rel=1e-12)
    assert power(decay="cosine").lr_at(0, 900_000_000) == pytest.approx(top * 0.5, rel=1e-12)
    assert power(decay="cosine").lr_at(0, 850_000_000) == pytest.approx(
        top * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    # The exponential shape: A exp(-p) + B with g(0) = 1, g(1) = 0 (dolomite-engine's form).
    assert decay_shape("exponential", 0.0) == 1.0 and decay_shape("exponential", 1.0) == 0.0
    assert decay_shape("exponential", 0.25) == pytest.approx(
        (E * math.exp(-0.25) - 1) / (E - 1), rel=1e-12)


def test_power_is_capped_at_lr_max():
    s = power(warmup_tokens=0, decay_tokens=0)
    # 4 * 8 * 1e6**-0.51 = 0.0279 > lr_max: the cap applies.
    assert 4 * 8 * 1e6 ** -0.51 > LR_MAX
    assert s.lr_at(0, 1_000_000) == LR_MAX
    assert s.lr_at(0, 1) == LR_MAX and s.lr_at(0, 0) == LR_MAX
    # The cap also bounds the warmup target.
    w = power(warmup_tokens=1_000_000)
    assert w.lr_at(0, 500_000) == pytest.approx(0.5 * LR_MAX, rel=1e-12)


@pytest.mark.parametrize("shape", ["exponential", "linear", "cosine"])
def test_power_is_continuous_at_phase_boundaries(shape):
    s = power(decay=shape)
    for boundary in (10_000_000, 800_000_000):  # warmup end, decay start
        left, right = s.lr_at(0, boundary - 1e-3), s.lr_at(0, boundary)
        assert abs(left - right) / right < 1e-9, (boundary, left, right)
    # Warmup end meets the power law exactly.
    assert s.lr_at(0, 10_000_000) == pytest.approx(4 * 8 * 1e7 ** -0.51, rel=1e-15)


@pytest.mark.parametrize("shape", ["exponential", "linear", "cosine"])
@pytest.mark.parametrize("name", ["power", "wsd"])
def test_decay_ends_exactly_at_min_lr_and_is_monotone(shape, name):
    s = power(name=name, decay=shape, min_lr=1e-5)
    assert s.lr_at(0, 1_000_000_000) == 1e-5
    assert s.lr_at(0, 2_000_000_000) == 1e-5  # past the end: holds min_lr
    ns = [10_000_000 + i * 990_000_000 / 4000 for i in range(4001)]  # warmup end -> run end
    lrs = [s.lr_at(0, n) for n in ns]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    decay = [s.lr_at(0, 800_000_000 + i * 50_000) for i in range(4001)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[0] > decay[-1] == 1e-5
    # Warmup rises.
    warm = [s.lr_at(0, i * 10_000) for i in range(1001)]
    assert all(a <= b for a, b in zip(warm, warm[1:]))


@pytest.mark.parametrize("decay_tokens", [None, 0])
def test_power_without_decay_follows_the_power_law_forever(decay_tokens):
    s = power(decay_tokens=decay_tokens)
    for n in (1e9, 1e11, 1e12, 1e13):  # also far past the nominal run length
        assert s.lr_at(0, n) == pytest.approx(4 * 8 * n ** -0.51, rel=1e-12)


def test_power_beta_defaults_to_tokens_per_step_over_4096_and_warmup_to_steps():
    s = Schedule(SchedulerConfig(name="power", warmup_steps=3, batch_size=None), lr=LR_MAX,
                 total_steps=10_000, tokens_per_step=8 * 4096)
    assert s.beta == 8
    assert s.warmup_tokens == 3 * 8 * 4096  # warmup_tokens null: warmup_steps x tokens_per_step
    assert s.lr_at(0, 1e8) == pytest.approx(4 * 8 * 1e8 ** -0.51, rel=1e-12)
    assert s.lr_at(0, 1.5 * 8 * 4096) == pytest.approx(0.5 * min(LR_MAX, 32 * (3 * 8 * 4096) ** -0.51))


def test_wsd_phases():
    s = power(name="wsd", decay="cosine", min_lr=1e-4)
    assert s.lr_at(0, 0) == 0.0
    assert s.lr_at(0, 2_500_000) == pytest.approx(0.25 * LR_MAX, rel=1e-12)
    assert s.lr_at(0, 10_000_000) == LR_MAX
    assert s.lr_at(0, 500_000_000) == LR_MAX
    assert s.lr_at(0, 800_000_000) == pytest.approx(LR_MAX, rel=1e-15)
    assert s.lr_at(0, 900_000_000) == pytest.approx(1e-4 + (LR_MAX - 1e-4) * 0.5, rel=1e-12)
    assert s.lr_at(0, 1_000_000_000) == 1e-4
    assert power(name="wsd", decay_tokens=None).lr_at(0, 5e12) == LR_MAX


def test_token_schedules_need_tokens_seen():
    with pytest.raises(ValueError, match="tokens_seen"):
        power().lr_at(3)


def test_step_schedules_accept_warmup_tokens_rounded_up_to_steps():
    s = Schedule(SchedulerConfig(name="cosine", warmup_steps=99, warmup_tokens=10_000, min_lr_ratio=0.1),
                 lr=1.0, total_steps=20, tokens_per_step=4096)
    assert s.warmup_steps == 3  # ceil(10000 / 4096); warmup_tokens wins over warmup_steps
    assert [s.lr_at(i, 1e9) for i in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_from_config_uses_the_run_settings():
    cfg = compose_config(["scheduler=power", "optim.lr=0.01", "trainer.tokens_per_step=16384",
                          "trainer.max_steps=1000", "trainer.max_tokens=8000000",
                          "scheduler.warmup_tokens=100000", "scheduler.decay_tokens=2000000"])
    s = Schedule.from_config(cfg)
    assert (s.lr, s.beta, s.total_tokens, s.decay_start) == (0.01, 4.0, 8_000_000, 6_000_000)
    assert s.cfg.a == 4.0 and s.cfg.b == -0.51 and s.cfg.decay == "exponential" and s.cfg.min_lr == 0
    cos = Schedule.from_config(compose_config(["scheduler=cosine", "trainer.tokens_per_step=4096",
                                               "trainer.max_steps=100", "trainer.max_tokens=40000"]))
    assert cos.total_steps == 10  # step schedules end at the nominal step count of max_tokens
    plain = Schedule.from_config(compose_config(["scheduler=cosine", "trainer.max_steps=100"]))
    assert plain.total_steps == 100 and plain.warmup_steps == 10


RUN = ["scheduler=power", "trainer.tokens_per_step=16384", "trainer.max_steps=100", "optim.lr=0.01"]


@pytest.mark.parametrize("overrides, needle", [
    (["scheduler.b=0.5"], "scheduler.b=0.5 must be < 0"),
    (["scheduler.b=0"], "scheduler.b=0.0 must be < 0"),
    (["scheduler.a=0"], "scheduler.a=0.0 must be > 0"),
    (["scheduler.a=-1"], "scheduler.a=-1.0 must be > 0"),
    (["scheduler.decay_tokens=2000000"], "scheduler.decay_tokens=2000000 is more than the run's 1638400 tokens"),
    (["trainer.max_tokens=1000000", "scheduler.decay_tokens=1000001"], "(trainer.max_tokens)"),
    (["scheduler.warmup_tokens=1000000", "scheduler.decay_tokens=1000000"],
     "plus scheduler.decay_tokens=1000000 is more than the run's 1638400 tokens"),
    (["scheduler.decay_tokens=1500000"], "scheduler.warmup_steps x trainer.tokens_per_step=163840 plus"),
    (["scheduler.decay=step"], "scheduler.decay='step' is not one of exponential, linear, cosine"),
    (["scheduler.name=polynomial"], "scheduler.name='polynomial' is not one of"),
    (["trainer.max_tokens=0"], "trainer.max_tokens=0 must be > 0"),
    (["scheduler.warmup_tokens=-5"], "scheduler.warmup_tokens=-5 must be >= 0"),
    (["scheduler.min_lr=-1e-5"], "scheduler.min_lr=-1e-05 must be >= 0"),
    (["scheduler.min_lr=0.1"], "above optim.lr=0.01"),
    (["scheduler.batch_size=0"], "scheduler.batch_size=0.0 must be > 0"),
    (["trainer.max_tokens=1000000000000", "trainer.max_steps=100000000", "scheduler.decay_tokens=1000",
      "scheduler.min_lr=0.005"], "above the lr at the start of the decay"),
])
def test_bad_schedule_config_is_one_line_user_error(overrides, needle):
    with pytest.raises(UserError) as err:
        compose_config(RUN + overrides)
    assert needle in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_presets_compose():
    for name in ("power", "wsd", "cosine", "linear", "constant"):
        assert compose_config([f"scheduler={name}"]).scheduler.name == name
    assert compose_config(["scheduler.name=wsd", "scheduler.decay_tokens=100000"]).scheduler.name == "wsd"


# ---------------------------------------------------------------------------------------------
# The loop sets the lr from tokens_seen before each step and stops at trainer.max_tokens.
# ---------------------------------------------------------------------------------------------
TINY = ["recipe=sft_tiny", "model=granite-tiny", "data.max_examples=200", "data.max_length=256",
        "trainer.tokens_per_step=2048", "trainer.micro_batch_tokens=2048",
        "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
        "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4",
        "model.arch.num_key_value_heads=2", "trainer.progress=false", f"data.tokenizer={TINY_TOKENIZER}"]


@pytest.mark.slow
def test_loop_logs_the_power_lr_of_tokens_before_the_step_and_stops_at_max_tokens(cli, tmp_path):
    out = tmp_path / "run"
    # beta = 2048 / 4096 = 0.5; lr_power(n) = min(3e-3, 0.05 * 0.5 * n**-0.51) ~ 4e-4 here.
    overrides = TINY + ["scheduler=power", "scheduler.a=0.05", "scheduler.warmup_tokens=3000",
                        "scheduler.decay_tokens=4000", "scheduler.decay=linear", "trainer.max_tokens=10000",
                        "trainer.max_steps=50", f"trainer.output_dir={out}"]
    proc = cli(*overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    schedule = Schedule.from_config(compose_config(overrides))
    for r in rows:
        before = r["tokens_seen"] - r["input_tokens"]
        assert r["lr"] == pytest.approx(schedule.lr_at(r["step"] - 1, before), rel=1e-12, abs=1e-15), r
    # Stopped by max_tokens (not max_steps), on the first step that reached it.
    assert len(rows) < 50
    assert rows[-1]["tokens_seen"] >= 10000 > rows[-2]["tokens_seen"]
    assert "data exhausted" not in proc.stderr
    # The run went through warmup (lr 0 at n = 0), the power law and the decay.
    befores = [r["tokens_seen"] - r["input_tokens"] for r in rows]
    assert rows[0]["lr"] == 0.0
    assert any(3000 <= b < 6000 for b in befores) and any(b >= 6000 for b in befores)
    assert (out / "final" / "config.json").exists()
