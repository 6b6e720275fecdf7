"""Training checkpoints: write atomically, find the latest complete one, restore exactly.

Layout of `<output_dir>/checkpoints/step_<N>/`:
- `model/`              the weights in HF layout (config.json + safetensors): loads in transformers
- `optimizer.pt`        the optimizer's state_dict (plain data parallel)
- `deepspeed/`          DeepSpeed ZeRO only: every rank's weight and optimizer shards (resume
                        with the same number of ranks and zero_stage); no optimizer.pt then
- `rng/rank_<r>.pt`     python, numpy and torch (CPU + CUDA) RNG states of every rank
- `trainer_state.json`  step, tokens seen, data-iterator position, bad-step counters, W&B run id
- `config.yaml`         the resolved run config that wrote it

Atomicity: everything goes into `checkpoints/.step_<N>.tmp` first, is fsynced, and becomes
`step_<N>` with one rename (then the parent directory is fsynced). A process killed while saving
leaves at most a `.tmp` directory behind, which is never read and is removed by the next save;
every `step_<N>` that exists is complete.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from granite_train.errors import UserError

log = logging.getLogger("granite_train.train")

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    step: int  # optimizer steps completed (including skipped ones)
    tokens_seen: int  # input tokens of the completed steps (what the lr schedule counts)
    data: Dict[str, Any]  # the data iterator's state_dict
    skipped_steps: int = 0  # non-finite steps skipped so far
    bad_steps_in_a_row: int = 0
    wandb_run_id: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: Path) -> List[Path]:
    """Complete checkpoints under `root`, oldest first (by step number)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (so the rename publishes durable data)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".step_{step}.tmp"


def begin_save(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary directory for step `step` (stale ones from a killed save go)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_dir_for(root, step)
    (tmp / "rng").mkdir(parents=True)
    return tmp


def write_rank_state(tmp: Path, rank: int) -> None:
    """Every rank: its RNG states (ranks may draw differently, e.g. dropout on other data)."""
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank}.pt")


def write_main_state(tmp: Path, model: torch.nn.Module, optimizer: Any,
                     state: TrainerState, config_yaml: str, tokenizer: Any = None) -> None:
    """Rank 0: weights + tokenizer (HF layout), optimizer, config; the trainer state last.
    `optimizer`: an optimizer or its state_dict; None when the state is sharded (DeepSpeed ZeRO
    writes its own per-rank files under `deepspeed/`)."""
    from granite_train.models import save_model

    save_model(model, tmp / "model")
    if tokenizer is not None:
        tokenizer.save(tmp / "model")
    if optimizer is not None:
        sd = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        torch.save(sd, tmp / "optimizer.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1) + "\n")


def publish(tmp: Path, step: int, keep: int) -> Path:
    """Rank 0: fsync, rename into place, then drop all but the newest `keep` checkpoints."""
    root = tmp.parent
    final = root / f"step_{step}"
    _fsync_tree(tmp)
    if final.exists():  # a save of the same step by an earlier attempt of this run
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> TrainerState:
    try:
        raw = json.loads((ckpt / STATE_FILE).read_text())
        return TrainerState(**raw)
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{ckpt} is not a granite-train checkpoint ({type(e).__name__}: {e}); "
                        f"point trainer.resume at a checkpoints/step_<N> directory") from None


def load_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))


def load_rank_rng(ckpt: Path, rank: int) -> None:
    f = ckpt / "rng" / f"rank_{rank}.pt"
    if f.is_file():
        set_rng_state(torch.load(f, weights_only=False))
    else:  # resumed on more ranks than saved: the newcomers keep their seeded state
        log.warning("%s has no RNG state for rank %d; it keeps the seeded state", ckpt, rank)


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    """`trainer.resume`: auto (the latest checkpoint of output_dir, if any) | false | a path."""
    root = checkpoints_dir(output_dir)
    if resume is None or str(resume).lower() in ("false", "none", "no", "off", "0"):
        existing = list_checkpoints(root)
        if existing:
            raise UserError(
                f"{root} already holds checkpoints of an earlier run (latest {existing[-1].name}) and "
                f"trainer.resume=false would overwrite them; set trainer.resume=auto to continue that "
                f"run, or choose another trainer.output_dir")
        return None
    if str(resume).lower() == "auto":
        return latest_checkpoint(root)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path) or latest_checkpoint(checkpoints_dir(path))
    if latest is None:
        raise UserError(f"trainer.resume={resume} is not a checkpoint (no {STATE_FILE}) nor a run/checkpoints "
                        f"directory holding one; point it at <output_dir>/checkpoints/step_<N>")
    return latest


# Keys that fix the model or the data order: a resume that changes one of them would not be the
# same run. Everything else (lr, schedule, max_steps, logging, micro_batch_tokens, ranks) may change.
CRITICAL_KEYS = ("model.arch", "model.path", "data.path", "data.format", "data.split", "data.streaming",
                 "data.messages_field", "data.text_field", "data.columns", "data.tokenizer",
                 "data.chat_template", "data.train_on", "data.max_length", "data.overlong",
                 "data.packing", "data.max_examples", "trainer.tokens_per_step", "trainer.seed",
                 "trainer.epochs")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: Dict[str, Any], now: Dict[str, Any], allow: List[str]) -> List[str]:
    """`key old -> new` for every critical key that differs and is not allowed to (a key is
    allowed when it equals or lies under an entry of `allow`)."""
    old, new = _flatten(saved), _flatten(now)
    changed = []
    for key in sorted(set(old) | set(new)):
        if not any(key == c or key.startswith(c + ".") for c in CRITICAL_KEYS):
            continue
        if any(key == a or key.startswith(a + ".") for a in allow):
            continue
        if old.get(key) != new.get(key):
            changed.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return changed
