"""Preemption (train/preemption.py): SIGTERM mid-step on one rank of a 2-rank run stops both
ranks after the same step with a checkpoint and exit status 75; the same command resumes and
reproduces the uninterrupted run's per-step losses. A second signal exits at once."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ..tiny_tokenizer import TINY_TOKENIZER
from .test_rank_failure import _workers

pytestmark = pytest.mark.slow

SETTINGS = ["recipe=sft_tiny", "model=granite-tiny", "data.max_examples=400", "data.max_length=512",
            "trainer.tokens_per_step=2048", "trainer.micro_batch_tokens=512", "model.arch.hidden_size=64",
            "model.arch.intermediate_size=128", "model.arch.num_hidden_layers=2", "trainer.dtype=fp32",
            "trainer.max_steps=8", "trainer.progress=false", f"data.tokenizer={TINY_TOKENIZER}"]


def _torchrun(out, **kw):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "granite_train", *SETTINGS, f"trainer.output_dir={out}"],
                            cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") != "eval"]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def test_sigterm_to_one_rank_checkpoints_both_and_the_rerun_is_exact(tmp_path):
    ref = tmp_path / "straight"
    ref.mkdir()
    straight = _torchrun(ref / "run")
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]

    root = tmp_path / "preempted"
    root.mkdir()
    out = root / "run"
    agent = _torchrun(out)
    try:
        deadline = time.time() + 600
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert agent.poll() is None, agent.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        rank1 = [pid for pid, rank in _workers(agent.pid) if rank == 1]
        assert rank1, "rank 1's process not found"
        os.kill(rank1[0], signal.SIGTERM)  # mid-step, one rank only: rank 0 must stop with it
        _, err = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0  # torchrun reports its workers' status 75 as a failure
    assert "exitcode  : 75" in err or "exit code 75" in err or "exitcode: 75" in err, err[-3000:]
    saved = sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and 2 <= saved[0] < 8, saved
    assert f"preempted by SIGTERM after step {saved[0]}" in err

    again = _torchrun(out)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step_{saved[0]}'}" in err
    ours, theirs = _losses(out), _losses(ref / "run")
    assert len(ours) == len(theirs) == 8
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-6 * abs(b), (ours, theirs)


WATCH = textwrap.dedent("""
    import sys, time
    from granite_train.parallel.env import Env
    from granite_train.train.preemption import PreemptionWatch
    watch = PreemptionWatch(["SIGTERM"])
    print("ready", flush=True)
    deadline = time.time() + 20
    while watch.received is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # room for the second signal
    print("requested", watch.requested(Env.single()), flush=True)
""")


@pytest.mark.parametrize("gap_s, expected_rc", [(0.05, 0), (1.5, 128 + signal.SIGTERM)])
def test_a_second_signal_exits_at_once_but_a_forwarded_repeat_does_not(tmp_path, gap_s, expected_rc):
    proc = subprocess.Popen([sys.executable, "-c", WATCH], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap_s)
    proc.send_signal(signal.SIGTERM)
    started = time.time()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == expected_rc, err
    if expected_rc:
        assert time.time() - started < 5 and "second SIGTERM: exiting now" in err
    else:
        assert "requested SIGTERM" in out
