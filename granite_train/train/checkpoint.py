"""Training checkpoints: write atomically, find the latest complete one, restore exactly.

Layout of `<output_dir>/checkpoints/step_<N>/` (each part written by its `state.py` part):
- `model/`              config.json + the tokenizer, and the weights in HF layout (safetensors:
                        loads in transformers) where nothing else holds them: plain data
                        parallel, expert parallelism, or `trainer.checkpoint_hf_weights=always`
- `optimizer.pt`        the optimizer's state_dict (plain data parallel)
- `deepspeed/`          DeepSpeed ZeRO only: every rank's weight and optimizer shards (resume
                        with the same number of ranks and zero_stage); no optimizer.pt then.
                        `python -m granite_train.export` turns them into HF shards offline
- `rng/rank_<r>.pt`     python, numpy and torch (CPU + CUDA) RNG states of every rank
- `trainer_state.json`  step, tokens seen, data-iterator position, bad-step counters, W&B run id
- `config.yaml`         the resolved run config that wrote it
- `manifest.json`       written last: every other file with its size and xxh3-64 hash

Verification (`verify`): before a checkpoint is resumed or exported, every file of its manifest
must be there with its size and hash, and nothing else may be. `trainer.resume=auto` takes the
newest checkpoint that verifies and says which newer ones it skipped and why. The manifest
proves the files are the ones that were written (integrity), not who wrote them: loading stays
restricted to tensors and plain data whatever the manifest says (`serialization.safe_load`).
Checkpoints written before manifests existed resume with a warning that they were not verified.

Atomicity: everything goes into `checkpoints/.step_<N>.tmp` first, is fsynced, and becomes
`step_<N>` with one rename (then the parent directory is fsynced). A process killed while saving
leaves at most a `.tmp` directory behind, which is never read and is removed by the next save;
every `step_<N>` that exists is complete.

This module is the file layer (where checkpoints live, atomic publish, which to resume);
`state.py` is what goes into one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import xxhash

from granite_train.errors import UserError

log = logging.getLogger("granite_train.train")

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 << 20


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


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (so the rename publishes durable data)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".step_{step}.tmp"


def begin_save(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary directory for step `step` (stale ones from a killed save go)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_dir_for(root, step)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, step: int, keep: int) -> Path:
    """Rank 0: fsync, rename into place, then drop all but the newest `keep` checkpoints."""
    root = tmp.parent
    final = root / f"step_{step}"
    fsync_tree(tmp)
    if final.exists():  # a save of the same step by an earlier attempt of this run
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------- disk full

_LOW_SPACE = 64 << 20  # free bytes below which a failed write is taken for a full disk


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_room(root: Path, previous: Path) -> None:
    """Rank 0 before a save: refuse to start one that cannot fit (a checkpoint is about the size
    of the previous one, which stays until the new one is complete)."""
    need, free = dir_size(previous), shutil.disk_usage(root).free
    if need > free:
        raise UserError(f"no room for the next checkpoint in {root}: one needs about {_gb(need)} (as {previous.name}), "
                        f"{_gb(free)} are free; free space or lower trainer.keep_checkpoints, then resume from "
                        f"{previous.name} (intact)")


def disk_full(exc: BaseException, tmp: Path) -> bool:
    """Whether a failed save failed for want of space: ENOSPC anywhere in the exception chain or
    its text (torch's and safetensors' writers wrap it), or (torch's writer does not always say)
    hardly any space left once it failed."""
    seen = exc
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(tmp.parent).free < _LOW_SPACE
    except OSError:
        return False


def disk_full_error(exc: BaseException, tmp: Path, previous: Optional[Path]) -> UserError:
    """Remove the partial checkpoint `tmp`; the one line to stop the run with."""
    written = dir_size(tmp) if tmp.exists() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    where = getattr(exc, "filename", None) or tmp
    need = f"; a checkpoint needs about {_gb(dir_size(previous))} (as {previous.name})" if previous else ""
    keep = f", {previous.name} is intact" if previous else ""
    return UserError(f"no space left on the device while writing {where}: it filled up after {_gb(written)} of this "
                     f"checkpoint{need}; the partial checkpoint was removed ({_gb(shutil.disk_usage(tmp.parent).free)} "
                     f"free now){keep}; free space or move trainer.output_dir, then resume")


def read_state(ckpt: Path) -> Dict[str, Any]:
    """The checkpoint's trainer_state.json (what `state.Checkpointer` parts wrote into it)."""
    try:
        raw = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raw, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "no step count in it"
    if not isinstance(raw, dict) or not isinstance(raw.get("step"), int):
        raise UserError(f"{ckpt} is not a granite-train checkpoint ({STATE_FILE}: {why}); "
                        f"point trainer.resume at a checkpoints/step_<N> directory")
    return raw


def write_state(tmp: Path, state: Dict[str, Any]) -> None:
    """Rank 0, last before `publish`: trainer_state.json marks a checkpoint as complete."""
    (tmp / STATE_FILE).write_text(json.dumps({**state, "format_version": FORMAT_VERSION}, indent=1) + "\n")


def _files(ckpt: Path) -> List[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(tmp: Path) -> None:
    """Rank 0, after every other file: what the checkpoint holds, to verify it by."""
    files = {name: {"size": (tmp / name).stat().st_size, "xxh3_64": file_hash(tmp / name)} for name in _files(tmp)}
    (tmp / MANIFEST_FILE).write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def verify(ckpt: Path) -> Optional[str]:
    """None when `ckpt` holds exactly its manifest's files with their sizes and hashes; else what
    is wrong, naming the file ("no manifest" for checkpoints written before manifests)."""
    try:
        files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({type(e).__name__})"
    for name, want in sorted(files.items()):
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']} ({'truncated' if size < want['size'] else 'grown'})"
        if file_hash(path) != want["xxh3_64"]:
            return f"{name} differs from what was written (hash mismatch: altered or damaged)"
    extra = sorted(set(_files(ckpt)) - set(files))
    if extra:
        return f"{extra[0]} is not in the manifest (added after the checkpoint was written)"
    return None


def verified(ckpt: Path) -> Path:
    """`ckpt` if it verifies (a checkpoint without a manifest with a warning); else one UserError."""
    problem = verify(ckpt)
    if problem == "no manifest":
        log.warning("%s has no manifest (written before checkpoints had one): its files are not verified", ckpt)
    elif problem is not None:
        raise UserError(f"checkpoint {ckpt} does not verify: {problem}; use another checkpoint")
    return ckpt


def newest_verified(root: Path) -> Tuple[Optional[Path], List[str]]:
    """The newest checkpoint under `root` that verifies, and a line for each newer one skipped."""
    skipped = []
    for ckpt in reversed(list_checkpoints(root)):
        problem = verify(ckpt)
        if problem is None or problem == "no manifest":
            return verified(ckpt), skipped
        skipped.append(f"{ckpt.name}: {problem}")
    return None, skipped


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    """`trainer.resume`: auto (the newest checkpoint of output_dir that verifies, if any) |
    false | a path (which must verify)."""
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
        found, skipped = newest_verified(root)
        for line in skipped:
            log.warning("skipping checkpoint %s", line)
        if found is None and skipped:
            raise UserError(f"no checkpoint under {root} verifies ({'; '.join(skipped[:3])}); restore them, or "
                            f"start a fresh run (trainer.resume=false with a new trainer.output_dir)")
        if found is not None and skipped:
            log.warning("resuming from %s, the newest checkpoint that verifies", found.name)
        return found
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return verified(path)
    latest = latest_checkpoint(path) or latest_checkpoint(checkpoints_dir(path))
    if latest is None:
        raise UserError(f"trainer.resume={resume} is not a checkpoint (no {STATE_FILE}) nor a run/checkpoints "
                        f"directory holding one; point it at <output_dir>/checkpoints/step_<N>")
    return verified(latest)
