"""What a person sees: the console on a terminal, train.log, a relaunch, file permissions, and
the messages that send them somewhere when they start another run in the same directory."""

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from granite_train.config import validate_model_path
from granite_train.errors import UserError

from .test_trainer import FAST, read_metrics

pytestmark = pytest.mark.slow

RUN = [a for a in FAST if a != "trainer.progress=false"] + [
    "trainer.max_steps=4", "data.eval_fraction=0.05", "trainer.eval_every=2"]
STAMP = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def _on_a_terminal(cwd, *args, cols=150):
    """`python -m granite_train ...` with stdout and stderr on a pseudo-terminal of `cols` columns:
    (exit status, raw bytes as text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    env = dict(os.environ, WANDB_MODE="disabled", COLUMNS=str(cols))
    proc = subprocess.Popen([sys.executable, "-m", "granite_train", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 600)
        if not ready:
            proc.kill()
            raise AssertionError("no output for 10 minutes")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", errors="replace")


def _screen(raw):
    """The lines a terminal shows: each carriage return goes back to the start of the line and
    what follows overwrites it (tqdm redraws and clears its bar that way)."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        if shown.strip():
            lines.append(shown.rstrip())
    return lines


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tty")
    out = root / "run"
    rc, raw = _on_a_terminal(root, *RUN, f"trainer.output_dir={out}")
    assert rc == 0, raw[-3000:]
    return root, out, raw


def test_the_progress_bar_shows_the_step_it_finished_below_the_log_lines(terminal_run):
    _, out, raw = terminal_run
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("split") != "eval"]
    # Every frame of the bar carries the loss of the step its counter says was just finished.
    frames = re.findall(r"train:\s+\d+%\|[^|]*\| (\d)/4 \[[^\]]*loss=([\d.]+)", raw)
    assert frames, raw[-2000:]
    for done, loss in frames:
        assert loss == f"{losses[int(done) - 1]:.4f}", (done, loss, losses)
    screen = _screen(raw)
    # Log lines start on their own line, never glued to the end of a bar.
    for line in screen:
        if " INFO " in line or " WARNING " in line:
            assert STAMP.match(line), line
    finished = [line for line in screen if line.startswith("train: 100%")]
    assert len(finished) == 1, finished  # drawn once, after the last step's eval line
    evals = [i for i, line in enumerate(screen) if "eval at step" in line]
    assert len(evals) == 2 and evals[-1] < screen.index(finished[0])
    assert "eval at step 2: loss " in raw and re.search(r"eval at step 2: loss \d+\.\d{4},", raw)


def test_train_log_holds_what_the_console_shows(terminal_run):
    _, out, raw = terminal_run
    text = (out / "train.log").read_text()
    for needle in ("recipe: sft_tiny", "data demo:chitchat", "attention backend", "eval at step 2",
                   "step 1/4 loss", "step 4/4 loss", "checkpoint:", "done: 4 steps"):
        assert needle in text, needle
    assert "%|" not in text  # the bar stays on the console


def test_weight_files_are_as_readable_as_every_other_file(terminal_run):
    _, out, _ = terminal_run
    mode = (out / "config.yaml").stat().st_mode & 0o777
    for weights in [out / "final" / "model.safetensors",
                    *(out / "checkpoints").glob("step_*/model/model.safetensors")]:
        assert weights.stat().st_mode & 0o777 == mode, weights


def test_a_finished_run_relaunched_says_nothing_to_train(terminal_run, cli_at):
    root, out, _ = terminal_run
    before = (out / "final" / "model.safetensors").stat().st_mtime_ns
    proc = cli_at(root, *RUN, f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train: step 4 already reached (trainer.max_steps=4)" in proc.stderr
    assert "nan" not in proc.stderr and "random init" not in proc.stderr
    assert "from checkpoint " in proc.stderr
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == before  # not re-exported
    log = (out / "train.log").read_text()
    assert log.count("---- run started") == 2 and "nothing to train" in log  # appended
    marker = json.loads((out / "final" / "export.json").read_text())
    assert marker["step"] == 4 and marker["kind"] == "hf_model"

    # Killed during the export: the new final/ never got its marker (and a staging directory
    # was left). The relaunch exports again, whole, and cleans up.
    (out / "final" / "export.json").unlink()
    (out / ".final.partial").mkdir()
    (out / ".final.partial" / "model.safetensors").write_bytes(b"half")
    proc = cli_at(root, *RUN, f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train" in proc.stderr and f"saved {out / 'final'} " in proc.stderr
    assert (out / "final" / "export.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    assert not (out / ".final.partial").exists() and not (out / ".final.old").exists()


def test_another_run_in_the_same_directory_is_sent_to_a_free_one(terminal_run, cli_at, tmp_path):
    root, out, _ = terminal_run
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                     {"role": "assistant", "content": f"answer {i}."}]}) + "\n"
                            for i in range(40)))
    (root / "run-2").mkdir()
    (root / "run-2" / "metrics.jsonl").write_text("{}\n")  # taken: the next free one is run-3
    other = cli_at(root, *RUN, f"model.path={out / 'final'}", f"data.path={mine}", "trainer.max_steps=5",
                   f"trainer.output_dir={out}")
    assert other.returncode == 2
    err = other.stderr.strip().splitlines()[-1]
    assert f"trainer.output_dir={root / 'run-3'} (free)" in err and "resume_allow_changes" not in err
    assert "model.path" in err and "data.path" in err
    assert (out / "train.log").read_text().rstrip().splitlines()[-1].endswith(err.split("error: ", 1)[1])

    # Data only: a new directory first, and allowing it is offered because it works ...
    data_only = cli_at(root, *RUN, f"data.path={mine}", "trainer.max_steps=5", f"trainer.output_dir={out}")
    err = data_only.stderr.strip().splitlines()[-1]
    assert data_only.returncode == 2 and err.index("trainer.output_dir=") < err.index("resume_allow_changes")
    # ... and does: weights, optimizer and counters continue, the new data from its first step.
    allowed = cli_at(root, *RUN, f"data.path={mine}", "trainer.max_steps=5", "trainer.resume_allow_changes=[data.path]",
                     f"trainer.output_dir={out}")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "the data from its first step" in allowed.stderr
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") != "eval"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["epoch"] == 0


def test_fine_tuning_with_a_from_scratch_lr_warns(terminal_run, cli_at, tmp_path):
    _, out, _ = terminal_run
    proc = cli_at(tmp_path, *FAST, f"model.path={out / 'final'}", "trainer.max_steps=1",
                  f"trainer.output_dir={tmp_path / 'ft'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "from-scratch learning rate" in line]
    assert len(warned) == 1 and "optim.lr=0.003" in warned[0] and "recipe=sft" in warned[0]
    quiet = cli_at(tmp_path, *FAST, f"model.path={out / 'final'}", "trainer.max_steps=1", "optim.lr=1e-5",
                   f"trainer.output_dir={tmp_path / 'ft2'}")
    assert quiet.returncode == 0 and "from-scratch" not in quiet.stderr


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: "ibm-granite/granite-3.3-2b-instruct", "looks like a Hugging Face hub id"),
    (lambda tmp: str(tmp / "nope"), "does not exist"),
    (lambda tmp: str((tmp / "config.json").write_text("{}") and tmp / "config.json"), "is a file"),
    (lambda tmp: str(tmp), "has no config.json"),
])
def test_model_path_mistakes_say_what_they_are(make, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=needle):
        validate_model_path(make(tmp_path))


def test_a_hub_id_as_model_path_is_one_line_leading_to_a_download(cli, tmp_path):
    proc = cli(*FAST, "model.path=ibm-granite/granite-3.3-2b-instruct", f"trainer.output_dir={tmp_path / 'x'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download ibm-granite/granite-3.3-2b-instruct" in lines[0]
    assert "tokenizer" not in lines[0] and not (tmp_path / "x").exists()


def test_the_sft_recipe_fine_tunes_a_checkpoint_for_its_epochs(terminal_run, cli_at, tmp_path):
    """recipe=sft on a (tiny) checkpoint, CPU-sized batches: no lr warning, the run is
    epochs x steps per epoch, the warmup and the cosine decay to 0 are shares of that run."""
    from granite_train.cli import compose_config

    _, out, _ = terminal_run
    cfg = compose_config(["recipe=sft", f"model.path={out / 'final'}"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.scheduler.warmup_fraction) == (1e-5, 0.0, 0.03)
    assert (cfg.data.max_length, cfg.data.train_on, cfg.trainer.epochs) == (8192, "assistant", 3)
    ft = tmp_path / "sft"
    proc = cli_at(tmp_path, "recipe=sft", f"model.path={out / 'final'}", "data.max_examples=200",
                  "data.max_length=512", "trainer.tokens_per_step=4096", "trainer.micro_batch_tokens=4096",
                  "trainer.epochs=1", "scheduler.warmup_fraction=0.2", "trainer.dtype=fp32",
                  f"trainer.output_dir={ft}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from-scratch" not in proc.stderr and "trainer.epochs=1 done after" in proc.stderr
    per_epoch = int(re.search(r"the run is (\d+) steps: trainer.epochs=1 x \1 steps per epoch", proc.stderr)[1])
    rows = read_metrics(ft / "metrics.jsonl")
    lrs = [r["lr"] for r in rows]
    warmup = -(-per_epoch // 5)  # ceil(0.2 x steps)
    assert len(rows) == per_epoch > warmup + 2
    assert lrs[warmup - 1] == pytest.approx(1e-5) and lrs[-1] == 0.0
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))
