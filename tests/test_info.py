"""`python -m granite_train.info`: parameter counts against hand-computed formulas, the CLI."""

import json
import os
import subprocess
import sys

import pytest

from granite_train.info import _build, describe, human_count, main


def test_dense_counts_match_the_formula():
    model, _ = _build(["model.arch.vocab_size=1000", "model.arch.hidden_size=64",
                       "model.arch.intermediate_size=96", "model.arch.num_hidden_layers=3",
                       "model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=2"])
    info = describe(model, seq_len=128)
    H, I, L, V, kv = 64, 96, 3, 1000, 2 * 16
    per_layer = H * H + 2 * H * kv + H * H + 3 * H * I + 2 * H  # q, k+v, o, mlp, 2 norms
    assert info["parameters_total"] == V * H + L * per_layer + H  # tied head
    assert info["parameters_active"] == info["parameters_total"]
    assert info["layer_pattern"] == "attentionx3"


def test_moe_active_parameters_count_top_k_experts():
    model, _ = _build(["model=granitemoe-tiny", "model.arch.vocab_size=1000"])
    info = describe(model, seq_len=128)
    c = model.config
    expert_params = c.num_hidden_layers * c.num_local_experts * 3 * c.hidden_size * c.intermediate_size
    inactive = expert_params * (c.num_local_experts - c.num_experts_per_tok) // c.num_local_experts
    assert info["parameters_total"] - info["parameters_active"] == inactive
    assert info["experts"] == "2 of 8"


def run_info(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "granite_train.info", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(stderr):
    lines = [l for l in stderr.strip().splitlines() if "granite-train: error:" in l]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (1000, "1.00K"), (1499, "1.50K"), (14_400_000, "14.4M"), (9_650_000, "9.65M"),
    (153_000_000, "153M"), (999_600_000, "1.00B"), (1_465_470_528, "1.47B"), (6_939_037_248, "6.94B"),
    (2.026e10, "20.3B"), (4.2e12, "4.20T"), (1.5e15, "1500T"),
])
def test_human_count_has_three_significant_digits(n, text):
    assert human_count(n) == text


def test_help_prints_usage_and_exits_0(tmp_path):
    proc = run_info("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m granite_train.info") and "--json" in proc.stdout
    assert proc.stderr == ""


def test_short_help_and_unknown_option(capsys):
    assert main(["model=granitemoe-tiny", "-h"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m granite_train.info")
    assert main(["model=granitemoe-tiny", "--jsn"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown option '--jsn'" in line and "see --help" in line


def test_unknown_model_preset_is_one_line(capsys):
    assert main(["model=granite-foo"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "unknown model preset 'granite-foo'; available: granite-3.3-2b, granite-4.0-h-micro, " in line
    assert line.endswith("(choose with model=NAME)")


def test_human_output_rounds_and_json_stays_exact(capsys):
    assert main(["model=granite-4.0-h-tiny"]) == 0
    lines = dict(l.split(None, 1) for l in capsys.readouterr().out.splitlines())
    assert lines["parameters_total"] == "6.94B"
    assert lines["parameters_active"] == "1.47B"
    assert lines["parameters_embedding"] == "154M"  # 100352 x 1536
    assert lines["train_flops_per_token"].endswith("B")
    assert lines["hidden_size"] == "1536" and lines["vocab_size"] == "100352"  # dims stay exact
    assert main(["model=granite-4.0-h-tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters_total"] == 6_939_037_248 and info["parameters_active"] == 1_465_470_528
    assert isinstance(info["train_flops_per_token"], (int, float))
