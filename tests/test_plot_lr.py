"""`python -m granite_train.plot_lr`: a PNG and a CSV of the trainer's own schedule."""

import csv
import math
import os
import subprocess
import sys

import pytest

from granite_train.cli import compose_config
from granite_train.plot_lr import main
from granite_train.schedule import Schedule

import matplotlib  # noqa: F401 (a hard dependency: a broken install fails here, never skips)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POWER = ["scheduler=power", "optim.lr=0.02", "trainer.tokens_per_step=4194304", "trainer.max_steps=100000",
         "trainer.max_tokens=1000000000000", "scheduler.warmup_tokens=10000000000",
         "scheduler.decay_tokens=250000000000"]


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "tokens", "lr"]
    return [(int(s), int(t), float(lr)) for s, t, lr in rows[1:]]


def run_plot_lr(*args, cwd):
    """The real command line, once for the module (the rest call `main` in-process)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "granite_train.plot_lr", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib not installed: its import fails, as it does without the `plot` extra."""
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)


def one_error_line(stderr):
    lines = [l for l in stderr.strip().splitlines() if "granite-train: error:" in l]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_cli_writes_png_and_csv_equal_to_lr_at(tmp_path):
    # Every 100th step: the max_steps cap (100000 steps) comes before max_tokens (238419 steps).
    proc = run_plot_lr(*POWER, "--out", "plots/lr.png", "--csv=lr.csv", "--every", "100", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.rstrip().endswith("| wrote lr.csv and plots/lr.png")
    png = (tmp_path / "plots" / "lr.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    rows = read_csv(tmp_path / "lr.csv")
    schedule = Schedule.from_config(compose_config(POWER))
    assert [r[0] for r in rows] == list(range(1, 100001, 100)) + [100000]
    for step, tokens, lr in rows:
        assert tokens == (step - 1) * 4194304
        assert lr == schedule.lr_at(step - 1, tokens)  # exact: the CSV keeps every digit
    assert rows[0][2] == 0.0  # warmup starts at 0
    assert max(r[2] for r in rows) == 0.02  # capped at optim.lr


def test_csv_covers_the_run_up_to_max_tokens_and_ends_near_min_lr(tmp_path):
    args = POWER[:-4] + ["trainer.max_steps=1000000", "trainer.max_tokens=100000000000",
                         "scheduler.warmup_tokens=1000000000", "scheduler.decay_tokens=25000000000"]
    assert main([*args, f"--out={tmp_path / 'lr.png'}", f"--csv={tmp_path / 'lr.csv'}"]) == 0
    rows = read_csv(tmp_path / "lr.csv")
    assert [r[0] for r in rows] == list(range(1, math.ceil(1e11 / 4194304) + 1))  # every step
    schedule = Schedule.from_config(compose_config(args))
    assert all(lr == schedule.lr_at(s - 1, t) for s, t, lr in rows[::7])
    # The power law between warmup and decay (beta = 4194304 / 4096 = 1024), under the cap.
    mid = rows[len(rows) // 2]
    assert mid[2] == pytest.approx(4 * 1024 * mid[1] ** -0.51, rel=1e-12) and mid[2] < 0.02
    # The decay lands on min_lr = 0 at N = 1e11 tokens; the last step starts just before N.
    assert 0 < rows[-1][2] < 1e-5 and schedule.lr_at(0, 10 ** 11) == 0.0


@pytest.mark.parametrize("name", ["wsd", "cosine", "linear", "constant"])
def test_every_schedule_plots_from_the_same_code_path(tmp_path, name):
    args = [f"scheduler={name}", "trainer.tokens_per_step=4096", "trainer.max_steps=50",
            "scheduler.decay_tokens=40960"]
    assert main([*args, f"--out={tmp_path / 'lr.png'}", f"--csv={tmp_path / 'lr.csv'}"]) == 0
    assert (tmp_path / "lr.png").read_bytes().startswith(PNG_MAGIC)
    rows = read_csv(tmp_path / "lr.csv")
    schedule = Schedule.from_config(compose_config(args))
    assert len(rows) == 50
    assert [lr for _, _, lr in rows] == [schedule.lr_at(s - 1, t) for s, t, _ in rows]


@pytest.mark.parametrize("args, needle", [
    (["scheduler=power", "scheduler.b=0.3"], "scheduler.b=0.3 must be < 0"),
    (["scheduler.name=nope"], "scheduler.name='nope' is not one of"),
    (["scheduler.decy=linear"], "unknown config key 'scheduler.decy'"),
    (["--bogus"], "unknown option '--bogus'"),
    (["--every", "0"], "--every=0 must be"),
])
def test_bad_input_is_exit_2_and_one_line(tmp_path, capsys, args, needle):
    assert main([*args, f"--out={tmp_path / 'lr.png'}"]) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "lr.png").exists()


def test_bad_override_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["scheduler=power", "scheduler.decay=zigzag"]) == 2
    assert "scheduler.decay='zigzag' is not one of exponential, linear, cosine" in one_error_line(
        capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys, no_matplotlib):
    monkeypatch.chdir(tmp_path)
    assert main(["scheduler=power"]) == 2
    assert "pip install 'granite-train[plot]'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "lr.png").exists()


SHORT = ["scheduler=cosine", "trainer.tokens_per_step=4096", "trainer.max_steps=20"]


def test_csv_alone_writes_only_the_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lr.png").write_bytes(b"keep me")  # a PNG from an earlier run is left alone
    assert main([*SHORT, "--csv", "x.csv"]) == 0
    out = capsys.readouterr().out
    assert len(read_csv(tmp_path / "x.csv")) == 20
    assert (tmp_path / "lr.png").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png", "x.csv"]
    assert out.rstrip().endswith("| wrote x.csv") and "lr.png" not in out


def test_png_is_the_default_and_out_alone_writes_no_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(SHORT) == 0
    assert (tmp_path / "lr.png").read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.rstrip().endswith("| wrote lr.png")
    assert main([*SHORT, f"--out={tmp_path / 'p' / 'a.png'}"]) == 0
    assert (tmp_path / "p" / "a.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr.png", "p"]


def test_both_print_both(tmp_path, capsys):
    assert main([*SHORT, f"--csv={tmp_path / 'a.csv'}", "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"| wrote {tmp_path / 'a.csv'} and {tmp_path / 'a.png'}")
    assert (tmp_path / "a.png").read_bytes().startswith(PNG_MAGIC) and read_csv(tmp_path / "a.csv")


def test_csv_alone_needs_no_matplotlib(tmp_path, monkeypatch, no_matplotlib):
    monkeypatch.chdir(tmp_path)
    assert main([*SHORT, "--csv=x.csv"]) == 0
    assert len(read_csv(tmp_path / "x.csv")) == 20 and not (tmp_path / "lr.png").exists()


def test_help_prints_usage_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for flag in ("--help", "-h"):
        assert main(["scheduler=power", flag]) == 0
        captured = capsys.readouterr()
        assert captured.out.startswith("usage: python -m granite_train.plot_lr") and "--csv" in captured.out
        assert captured.err == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (["-x"], "unknown option '-x'; plot_lr takes --out PNG, --csv CSV, --every K and config overrides (see --help)"),
    (["--csv"], "--csv needs a value (see --help)"),
    (["--csv="], "--csv needs a file name"),
    (["--csv", "--out", "a.png"], "--csv needs a value"),
    (["scheduler=cosin"], "unknown scheduler preset 'cosin'; available: constant, cosine, linear, power, wsd "
                          "(choose with scheduler=NAME); did you mean scheduler=cosine?"),
])
def test_bad_options_point_to_help(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)  # a default lr.png would land here
    assert main(args) == 2
    assert needle in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
