"""muP's coordinate check: activations flat over width with muP, growing without it."""

import json
import os
import subprocess
import sys

import pytest

from granite_train import coord_check


@pytest.fixture(scope="module")
def result():
    # Defaults: base hidden 32 (x1..x8 = 32..256), 2 layers, lr 0.003, 4 steps on one packed batch.
    return coord_check.run_coord_check([], widths=(1, 2, 4, 8), steps=4)


@pytest.mark.slow
def test_mup_keeps_activations_flat_over_width(result):
    late = ["layer.0", "layer.1", "logits"]
    mup, sp = result["slope"]["mup"], result["slope"]["sp"]
    for name in late:
        # after the last step: muP flat (log-log slope near 0) ...
        assert abs(mup[name][-1]) < 0.15, (name, mup[name])
        # ... and the standard parametrisation grows clearly with width
        assert sp[name][-1] > 0.5, (name, sp[name])
    for step in range(1, 5):  # hidden layers flat at every step, not only the last
        assert abs(mup["layer.1"][step]) < 0.15, mup["layer.1"]
    # the embedding trains at the base lr in both: flat either way
    assert abs(mup["embedding"][-1]) < 0.15 and abs(sp["embedding"][-1]) < 0.15
    # SP's growth is real blow-up, not noise: the widest model's last layer is far larger
    last = result["mean_abs_activation"]["sp"]["layer.1"]
    assert last[-1][-1] > 5 * last[0][-1]


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "cc"
    assert coord_check.main(["--widths", "1,2", "--steps", "1", "--out", str(out)]) == 0
    res = json.loads((out / "coord_check.json").read_text())
    assert res["hidden_sizes"] == [32, 64]
    assert set(res["mean_abs_activation"]) == {"sp", "mup"}
    assert res["layers"] == ["embedding", "layer.0", "layer.1", "logits"]
    assert len(res["mean_abs_activation"]["mup"]["logits"][1]) == 2  # steps 0 and 1
    text = capsys.readouterr().out
    assert "coord_check.png" in text or "pip install 'granite-train[plot]'" in text


def test_cli_refuses_mup_override(capsys):
    assert coord_check.main(["optim.mup=true"]) == 2
    assert "runs muP on and off itself" in capsys.readouterr().err


def test_help_exits_0_without_training(tmp_path, monkeypatch, capsys):
    # The real command line once (`python -m` wiring, a clean stderr), then -h in-process.
    proc = subprocess.run([sys.executable, "-m", "granite_train.coord_check", "model=granite-tiny", "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m granite_train.coord_check")
    assert "--widths" in proc.stdout and proc.stderr == ""
    monkeypatch.chdir(tmp_path)
    assert coord_check.main(["model=granite-tiny", "-h"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m granite_train.coord_check")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (["--bogus"], "unknown option '--bogus'; coord_check takes --widths, --steps, --out and config overrides "
                  "(see --help)"),
    (["-x", "--steps", "1"], "unknown option '-x'"),
    (["--widths", "1,2", "--steps"], "--steps needs a value (see --help)"),
    (["--widths=1,a"], "--widths wants integers"),
    (["scheduler=cosin"], "unknown scheduler preset 'cosin'; available: constant, cosine, linear, power, wsd"),
])
def test_bad_options_are_one_line(tmp_path, capsys, args, needle):
    assert coord_check.main([*args, "--out", str(tmp_path / "cc")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("granite-train: error: ") and "\n" not in err and needle in err, err
    assert not (tmp_path / "cc").exists()
