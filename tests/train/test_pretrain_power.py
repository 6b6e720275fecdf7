"""recipe=pretrain_power end to end through the CLI, shrunk to ~30-40 s on 2 CPU cores: the
logged lr follows the Power scheduler's Eq. 8 (recomputed here from the tokens of each row),
all three phases occur, the loss falls and the exported model loads."""

import json
import math

import pytest
import torch
import yaml

from ..tiny_tokenizer import TINY_TOKENIZER

pytestmark = pytest.mark.slow

LR_MAX, A, B = 0.01, 4.0, -0.51
# ~11 steps: warmup (n < 1024), capped at lr_max (0.5 * n**-0.51 > 0.01 for n < ~2144), the power
# law below lr_max, exponential decay over the last 1536 tokens.
TOKENS_PER_STEP, WARMUP, DECAY, TOTAL = 512, 1024, 1536, 5120
SMALL = ["recipe=pretrain_power", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
         "model.arch.num_hidden_layers=2", "model.arch.num_attention_heads=4",
         "model.arch.num_key_value_heads=2", "model.mup_base_width=32", "model.arch.logits_scaling=2.0",
         "data.max_examples=400", "data.max_length=512",
         f"trainer.tokens_per_step={TOKENS_PER_STEP}", f"trainer.micro_batch_tokens={TOKENS_PER_STEP}",
         f"trainer.max_tokens={TOTAL}", "trainer.max_steps=100", f"optim.lr={LR_MAX}",
         f"scheduler.a={A}", f"scheduler.b={B}", f"scheduler.warmup_tokens={WARMUP}",
         f"scheduler.decay_tokens={DECAY}", "scheduler.min_lr=0.0", "trainer.progress=false",
         f"data.tokenizer={TINY_TOKENIZER}"]


def power_lr(n):
    """Eq. 7: min(lr_max, a * beta * n**b), beta = tokens_per_step / 4096 sequences."""
    beta = TOKENS_PER_STEP / 4096
    return min(LR_MAX, A * beta * n ** B)


def expected_lr(n):
    """Eq. 8 with the exponential decay to min_lr = 0, at n input tokens trained before the step."""
    if n >= TOTAL - DECAY:
        p = min(1.0, (n - (TOTAL - DECAY)) / DECAY)
        return power_lr(TOTAL - DECAY) * (math.exp(-p) - math.exp(-1)) / (1 - math.exp(-1))
    if n < WARMUP:
        return n / WARMUP * power_lr(WARMUP)
    return power_lr(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cli_at):
    root = tmp_path_factory.mktemp("pretrain")
    out = root / "run"
    proc = cli_at(root, *SMALL, f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in rows if r.get("split", "train") == "train" and "lr" in r], proc.stderr


def test_lr_follows_eq8_through_all_three_phases(run):
    _, rows, _ = run
    phases = set()
    for r in rows:
        n = r["tokens_seen"] - r["input_tokens"]  # input tokens trained before this step
        assert r["lr"] == pytest.approx(expected_lr(n), rel=1e-9, abs=1e-15), r
        if n < WARMUP:
            phases.add("warmup")
        elif n < TOTAL - DECAY:
            phases.add("stable" if power_lr(n) < LR_MAX else "capped")
        else:
            phases.add("decay")
    assert phases == {"warmup", "capped", "stable", "decay"}
    assert rows[0]["lr"] == 0.0  # Eq. 8: the first step (n = 0) gets lr 0
    # The run stops once trainer.max_tokens are trained: the last step crosses it.
    assert rows[-1]["tokens_seen"] >= TOTAL > rows[-1]["tokens_seen"] - rows[-1]["input_tokens"]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_loss_falls(run):
    _, rows, _ = run
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0


def test_mup_config_and_final_model_loads(run):
    from granite_train.models import load_model

    out, _, stderr = run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["mup"] is True and saved["data"]["path"] == "demo:shakespeare"
    assert saved["data"]["format"] == "text" and saved["data"]["train_on"] == "all"
    assert "truncated" in stderr  # the data summary counts what max_length cut
    # metrics.jsonl logs the base lr; under muP the hidden matrices train at lr / m_width
    # (m_width = 64 / mup_base_width 32 = 2), as the last step's optimizer groups show.
    last_lr = run[1][-1]["lr"]
    ckpt = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    groups = {g["role"]: g["lr"] for g in state["param_groups"]}
    assert groups["hidden"] == pytest.approx(last_lr / 2) and groups["embedding"] == pytest.approx(last_lr)
    model = load_model(out / "final").eval()
    assert model.config.hidden_size == 64 and model.config.logits_scaling == 2.0
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, model.config.vocab_size, (1, 17))).logits
    assert logits.shape == (1, 17, model.config.vocab_size) and torch.isfinite(logits).all()
