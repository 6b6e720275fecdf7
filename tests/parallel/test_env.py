"""The process group comes from the launcher whenever there is one, also for a single process:
`torchrun --nproc_per_node=1 ... distributed.zero_stage=N` used to hang forever (a group on a port
of our own, while torchrun's agent store made c10d connect as a client to nobody). A bare
`python -m` still makes its own single-process group for DeepSpeed."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from granite_train.parallel.env import LAUNCHER_VARS, _pick_dtype, launched

from ..tiny_tokenizer import TINY_TOKENIZER

import deepspeed  # noqa: F401 (a hard dependency: a broken install fails here, never skips)

TINY = ["recipe=sft_tiny", "model=granite-tiny", "data.max_examples=100", "data.max_length=256",
        "trainer.tokens_per_step=1024", "trainer.micro_batch_tokens=1024", "model.arch.hidden_size=32",
        "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=1", "trainer.max_steps=1",
        "trainer.dtype=fp32", "trainer.progress=false", "distributed.zero_stage=0",
        f"data.tokenizer={TINY_TOKENIZER}"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_process_under_torchrun_with_deepspeed_finishes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={_free_port()}",
         "-m", "granite_train", *TINY, f"trainer.output_dir={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_bare_python_with_deepspeed_makes_its_own_group(cli, tmp_path):
    proc = cli(*TINY, f"trainer.output_dir={tmp_path / 'run'}", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_launched_needs_every_launcher_variable(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.setenv(var, "0")
    assert launched()
    monkeypatch.delenv("MASTER_PORT")
    assert not launched()


def test_dtype_auto_is_fp32_on_cpu_and_says_why():
    # bf16 autocast lost to fp32 on CPU at every micro-batch size measured (benchmarks/cpu_dtype.py)
    dtype, reason = _pick_dtype("auto", torch.device("cpu"))
    assert dtype is None and "benchmarks/cpu_dtype.py" in reason and "trainer.dtype=bf16" in reason
    assert _pick_dtype("bf16", torch.device("cpu")) == (torch.bfloat16, "")
    assert _pick_dtype("fp32", torch.device("cpu")) == (None, "")
