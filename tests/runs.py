"""How tests run the CLI: as a real process (`run_cli`) or in this process (`run_in_process`)."""

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m granite_train ...` as a user would, from an arbitrary directory."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "granite_train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(*args: str, cwd: Path, timeout: int = 600,
                   entry: str = "granite_train.cli") -> subprocess.CompletedProcess:
    """`entry`'s `main(args)` in this process, with what a subprocess would give: the exit code,
    stdout, and stderr holding rank 0's console log lines and the CLI's error line.

    A launch costs ~8 s of imports here, more than most tiny runs train: tests that are not
    about the process itself (signals, kills, locks, a terminal, torchrun) run in-process.
    The working directory, environment, loggers and any process group are put back after."""
    import contextlib
    import importlib
    import io
    import logging
    import traceback

    import torch.distributed as dist

    main = importlib.import_module(entry).main
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    loggers = [logging.getLogger(n) for n in ("granite_train", "DeepSpeed")]
    levels = [lg.level for lg in loggers]
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ["WANDB_MODE"] = "disabled"
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args)) or 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # what Python prints for an uncaught exception, exit status 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        os.environ.clear()
        os.environ.update(saved_env)
        if dist.is_initialized():  # a one-process DeepSpeed run keeps its group: the next run starts clean
            dist.destroy_process_group()
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


# One torchrun launch trains a list of runs one after the other in the same processes (the
# process group and DeepSpeed stay up between them): a launch costs far more than a tiny run.
# Before a run, rank 0 may copy files and remove directories (then every rank waits for it).
_DRIVER = """
import json, os, shutil, sys
import torch.distributed as dist
from granite_train.cli import _setup_logging, compose_config
from granite_train.errors import UserError
from granite_train.train.trainer import train

_setup_logging()
dist.destroy_process_group = lambda *a, **k: None  # the next run reuses the group
rank0 = os.environ.get("RANK", "0") == "0"
for item in json.load(open(sys.argv[1])):
    if rank0:
        for src, dst in item.get("copy", []):
            shutil.copy(src, dst)
        for path in item.get("rmtree", []):
            shutil.rmtree(path)
        print("==== run " + item["name"], file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.barrier()
    status = 0
    try:
        train(compose_config(item["args"]))
    except UserError as exc:
        print("granite-train: error: " + str(exc), file=sys.stderr, flush=True)
        status = 2
    if rank0:
        print("==== end " + item["name"] + " status " + str(status), file=sys.stderr, flush=True)
"""


def torchrun_runs(runs, cwd: Path, nproc: int = 2, timeout: int = 900):
    """Train `runs` ([{name, args, copy?: [[src, dst]], rmtree?: [dirs]}]) in one
    `torchrun --nproc_per_node=nproc` launch. Returns (process, {name: (exit status, stderr of
    that run)}); a run that raised anything but a UserError ends the launch (status 1 for it)."""
    import json

    plan = Path(cwd) / "torchrun_runs.json"
    plan.write_text(json.dumps(runs))
    driver = Path(cwd) / "torchrun_driver.py"
    driver.write_text(_DRIVER)
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(driver), str(plan)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    sections, name, lines = {}, None, []
    for line in proc.stderr.splitlines():
        if line.startswith("==== run "):
            name, lines = line[len("==== run "):], []
        elif line.startswith("==== end ") and name is not None:
            sections[name] = (int(line.rsplit(" ", 1)[1]), "\n".join(lines))
            name = None
        elif name is not None:
            lines.append(line)
    if name is not None:  # the launch died inside this run
        sections[name] = (1, "\n".join(lines) + "\n" + proc.stderr[-3000:])
    return proc, sections
