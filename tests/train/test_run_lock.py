"""One live run per output directory (train/run_lock.py): a second run on it is refused in one
line naming the holder; the lock of a run that was killed is taken over with a log line."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from granite_train.errors import UserError
from granite_train.train.run_lock import LOCK_FILE, RunLock

from .test_trainer import FAST

pytestmark = pytest.mark.slow


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, cli):
    out = tmp_path / "run"
    args = [*FAST, f"trainer.output_dir={out}"]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "-m", "granite_train", *args, "trainer.max_steps=100000"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first run trained no step within 5 minutes"
            time.sleep(0.5)
        second = cli(*args, "trainer.max_steps=2")
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith("granite-train: error:") and "in use by another run" in line
        assert f"pid {first.pid} on host {socket.gethostname()}" in line
        assert not (out / "checkpoints").exists()  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    third = cli(*args, "trainer.max_steps=1")  # the killed run's lock file is still there
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"left by a run that is gone (pid {first.pid}" in third.stderr


def test_a_clean_release_leaves_no_holder(tmp_path, caplog):
    with RunLock(tmp_path):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()  # a second holder, even in the same process
    assert (tmp_path / LOCK_FILE).read_text() == ""
    with caplog.at_level("INFO"), RunLock(tmp_path):
        pass
    assert "taking over" not in caplog.text
