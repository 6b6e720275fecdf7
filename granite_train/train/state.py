"""What a checkpoint holds, as parts that each save, check and load their own state.

A `Checkpointer` saves a run as its named parts into one atomic checkpoint (`checkpoint.py`)
and restores chosen parts from one, as the trainer builds them: config and counters first, the
model (into the whole model, before it is cut over ranks), then engine, data and RNG. Each
`restore` checks all the parts it names before it loads any of them; a part that cannot resume
into this run says in one line what differs:

| part       | files                        | refuses to resume when                               |
|------------|------------------------------|------------------------------------------------------|
| `config`   | config.yaml                  | a setting that fixes the model or data order changed |
| `model`    | model/ (HF layout, tokenizer)| the architecture or a parameter shape differs        |
| `engine`   | optimizer.pt or deepspeed/   | ZeRO stage, ranks or expert parallelism differ       |
| `data`     | trainer_state.json "data"    | the data, its order or the step planner changed      |
| `counters` | trainer_state.json           | (never: step, tokens seen, bad steps, W&B run id)    |
| `rng`      | rng/rank_<r>.pt              | (never: a rank without a saved state keeps its seed) |

trainer_state.json and then manifest.json are written last, by rank 0; `checkpoint.verify`
checks every file against the manifest before a checkpoint is resumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol

import torch
from omegaconf import OmegaConf
from torch import nn

from granite_train.errors import UserError
from granite_train.models.expert_shards import EXPERTS_DIR
from granite_train.models.hf_io import has_weights, read_config, read_tensors, save_config, save_pieces
from granite_train.models.moe import held_experts
from granite_train.parallel.deepspeed_engine import fill_sharded
from granite_train.parallel.engine import Engine
from granite_train.parallel.env import Env, agree, barrier
from granite_train.serialization import safe_load
from granite_train.train import checkpoint as files
from granite_train.train.rng import rng_state, set_rng_state

log = logging.getLogger("granite_train.train")


class Stateful(Protocol):
    def save(self, tmp: Path, meta: Dict[str, Any]) -> None:
        """Write this rank's share into the checkpoint being built in `tmp` (every rank calls
        it); JSON-sized state goes into `meta` (trainer_state.json, written by rank 0)."""

    def check(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        """One UserError line when `ckpt` cannot resume into this run."""

    def load(self, ckpt: Path, meta: Dict[str, Any]) -> None: ...


# ---------------------------------------------------------------- parts

# Keys that fix the model or the data order: a resume that changes one of them would not be the
# same run. Everything else (lr, schedule, max_steps, logging, micro_batch_tokens, ranks) may change.
CRITICAL_KEYS = ("model.arch", "model.path", "data.path", "data.format", "data.split", "data.streaming",
                 "data.messages_field", "data.text_field", "data.columns", "data.tokenizer",
                 "data.chat_template", "data.train_on", "data.max_length", "data.overlong",
                 "data.packing", "data.max_examples", "data.sources", "trainer.tokens_per_step", "trainer.seed",
                 "trainer.epochs", "adapter.name", "adapter.r", "adapter.alpha", "adapter.use_rslora",
                 "adapter.targets", "adapter.train_modules", "model.adapter_path")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _allowed(key: str, allow: List[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def _schema_defaults() -> Dict[str, Any]:
    from granite_train.config import RunConfig

    return _flatten(OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=True))


def _under_saved(key: str, old: Dict[str, Any]) -> bool:
    """Whether a parent of `key` is a saved leaf (e.g. a None-valued group)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in old for i in range(1, len(parts)))


def _same(key: str, old: Any, new: Any) -> bool:
    # data.overlong=auto is split for text and truncate otherwise; a saved truncate/split read
    # against auto is left to the data fingerprint, which sees whether the examples changed.
    if key == "data.overlong" and "auto" in (old, new):
        return {old, new} <= {"auto", "truncate", "split"}
    return old == new


def config_changes(saved: Dict[str, Any], now: Dict[str, Any], allow: List[str]) -> List[str]:
    """`key old -> new` for every critical key that differs and is not allowed to (a key is
    allowed when it equals or lies under an entry of `allow`)."""
    old, new = _flatten(saved), _flatten(now)
    # A key the saved config predates (a newer setting) counts as its default then.
    old = {**{k: v for k, v in _schema_defaults().items() if k not in old and not _under_saved(k, old)}, **old}
    changed = []
    for key in sorted(set(old) | set(new)):
        if _allowed(key, list(CRITICAL_KEYS)) and not _allowed(key, allow) and not _same(key, old.get(key), new.get(key)):
            changed.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return changed


# Keys whose change means another data set or data order: allowing one resumes the weights,
# optimizer and counters but restarts the data from its first step (`DataState`).
DATA_KEYS = tuple(k for k in CRITICAL_KEYS if k.startswith("data.")) + ("trainer.tokens_per_step", "trainer.seed")


def free_output_dir(output_dir: Path) -> Path:
    """`<output_dir>-2`, `-3`, ...: the first that does not exist or is empty."""
    n = 2
    while True:
        candidate = output_dir.with_name(f"{output_dir.name}-{n}")
        if not candidate.exists() or (candidate.is_dir() and not any(candidate.iterdir())):
            return candidate
        n += 1


class RunConfigState:
    """config.yaml: the resolved config that wrote the checkpoint."""

    def __init__(self, config_yaml: str, resolved: Dict[str, Any], allow: List[str], env: Env) -> None:
        self.config_yaml, self.resolved, self.allow, self.env = config_yaml, resolved, allow, env
        self.allowed_data_changes: List[str] = []  # set by `check`: what DataState restarts for

    def save(self, tmp: Path, meta: Dict[str, Any]) -> None:
        if self.env.is_main:
            (tmp / "config.yaml").write_text(self.config_yaml)

    def check(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        saved = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml"), resolve=True)
        self.allowed_data_changes = [c.split()[0] for c in config_changes(saved, self.resolved, [])
                                     if _allowed(c.split()[0], list(DATA_KEYS)) and _allowed(c.split()[0], self.allow)]
        changed = config_changes(saved, self.resolved, self.allow)
        if changed:
            raise UserError(self._refusal(ckpt, changed))

    def _refusal(self, ckpt: Path, changed: List[str]) -> str:
        """The first fix a person most likely wants: a different model or data is a new run, in
        a new directory; allowing the change is offered only where resuming can work."""
        keys = [c.split()[0] for c in changed]
        what = f"{'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}"
        out = Path(self.resolved["trainer"]["output_dir"])
        new_dir = f"trainer.output_dir={free_output_dir(out)} (free)"
        if any(_allowed(k, ["model"]) for k in keys):
            return (f"{out} holds checkpoints of another run ({ckpt.name}: {what}): start this run in a new "
                    f"directory with {new_dir}, or restore those settings to continue {ckpt.name}")
        allow = f"trainer.resume_allow_changes=[{','.join(keys[:6])}]"
        if all(_allowed(k, list(DATA_KEYS)) for k in keys):
            return (f"cannot resume {ckpt}: {what} changed since it was saved: start a new run with {new_dir}, "
                    f"restore them, or continue its weights, optimizer and schedule on the changed data (from "
                    f"the data's first step) with {allow}")
        return (f"cannot resume {ckpt}: {what} changed since it was saved: restore them, allow them with "
                f"{allow}, or start a new run with {new_dir}")

    def load(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        pass  # the run's own config wins; `check` made sure nothing that matters changed


def _expert_dir(ckpt: Path) -> Optional[Path]:
    """An expert-parallel checkpoint's experts/ (each rank's slice), if it has one."""
    d = ckpt / EXPERTS_DIR
    return d if d.is_dir() else None


class ModelState:
    """model/: config.json + the tokenizer, and the consolidated weights in HF layout (loadable
    by transformers) where the engine's own state does not hold them (`hf_weights`).

    It loads into the model before `parallelize` cuts it, one tensor at a time (a ZeRO-3 load
    is already sharded: `sharded`, and each tensor is gathered, written, re-sharded); a
    checkpoint without weights in model/ gets them from the engine's state. It saves through
    `full_pieces` (the engine's `checkpoint_pieces`, once there is one: ZeRO-3 gathers one layer
    at a time; under expert parallelism the experts are not in model/ but in experts/, each
    rank's slice as it holds it, and are read back from there)."""

    def __init__(self, model: nn.Module, tokenizer: Any, allow: List[str], env: Env, sharded: bool = False) -> None:
        self.model, self.tokenizer, self.allow, self.env, self.sharded = model, tokenizer, allow, env, sharded
        self.full_pieces: Callable[[], Iterable[Dict[str, torch.Tensor]]] = lambda: [self.model.state_dict()]
        self.shard_size: int = 5 * 10 ** 9  # the engine's export_shard_size, once there is one
        self.hf_weights = True  # false once an engine whose state holds the weights exists

    def save(self, tmp: Path, meta: Dict[str, Any]) -> None:
        if self.hf_weights:  # every rank iterates the pieces (a sharded engine gathers them); rank 0 writes
            save_pieces(self.model.config, self.full_pieces(), tmp / "model", self.shard_size, write=self.env.is_main)
        elif self.env.is_main:
            save_config(self.model.config, tmp / "model", next(self.model.parameters()).dtype)
        if self.env.is_main and self.tokenizer is not None:
            self.tokenizer.save(tmp / "model")

    def check(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        saved_cfg, now_cfg = read_config(ckpt / "model").to_hf_dict(), self.model.config.to_hf_dict()
        diff = sorted(k for k in set(now_cfg) | set(saved_cfg) if now_cfg.get(k) != saved_cfg.get(k))
        if diff and not any(a in ("model", "model.arch", "model.path") for a in self.allow):
            raise UserError(
                f"cannot resume {ckpt}: the model differs from the checkpoint's in {', '.join(diff[:8])}; "
                f"use the same model settings (or trainer.resume_allow_changes=[model.arch] for changes "
                f"that keep every shape)")
        if not has_weights(ckpt / "model"):
            return  # in the engine's state (DeepSpeed checks its shapes)
        try:
            with read_tensors(ckpt / "model", self.model.config, expert_dir=_expert_dir(ckpt)):
                pass  # the files' headers against this model's shapes
        except UserError as exc:
            raise UserError(f"cannot resume {ckpt}: the model must keep the checkpoint's shapes ({exc})") from None

    def load(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        if not has_weights(ckpt / "model"):
            return  # the engine's state restores them
        if self.sharded:
            fill_sharded(self.model, ckpt / "model", self.env)
            return
        tied = self.model.config.tie_word_embeddings
        # A model loaded with only its expert-parallel slice of the experts reads only that slice.
        with read_tensors(ckpt / "model", self.model.config, experts=held_experts(self.model),
                          expert_dir=_expert_dir(ckpt)) as read, torch.no_grad():
            for name, t in self.model.state_dict().items():
                if not (tied and name == "lm_head.weight"):
                    t.copy_(read(name))


class EngineState:
    """The optimizer: optimizer.pt (plain engine), or every rank's DeepSpeed state in deepspeed/."""

    def __init__(self, engine: Engine, env: Env) -> None:
        self.engine, self.env = engine, env

    def save(self, tmp: Path, meta: Dict[str, Any]) -> None:
        self.engine.save_state(tmp, self.env.is_main)

    def check(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        self.engine.check_resume(ckpt)

    def load(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        self.engine.load_state(ckpt)


class DataState:
    """The data position (epoch, step in epoch) and what fixes the data order.

    `restart_for`: data settings the run was allowed to change (trainer.resume_allow_changes);
    when the saved position does not fit the changed data, the data starts from its first step."""

    def __init__(self, data: Any, restart_for: Callable[[], List[str]] = list) -> None:
        self.data, self.restart_for = data, restart_for
        self._restart = False

    def save(self, tmp: Path, meta: Dict[str, Any]) -> None:
        meta["data"] = self.data.state_dict()

    def check(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        if not isinstance(meta.get("data"), dict):
            raise UserError(f"cannot resume {ckpt}: its trainer_state.json holds no data position; it is "
                            f"damaged or not a granite-train checkpoint (start a fresh run from its model/)")
        self._restart = False
        try:
            self.data.check_state_dict(meta["data"])
        except UserError:
            if not self.restart_for():
                raise
            self._restart = True

    def load(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        if self._restart:
            if getattr(self.data, "rank", 0) == 0:
                log.warning("the data changed since %s (%s, allowed by trainer.resume_allow_changes): the weights, "
                            "optimizer and schedule continue from step %s, the data from its first step",
                            ckpt.name, ", ".join(self.restart_for()), meta.get("step"))
            return
        self.data.load_state_dict(meta["data"])


@dataclass
class Counters:
    """The trainer's counters: what it needs besides weights, optimizer and data to continue."""

    step: int = 0  # optimizer steps completed (including skipped ones)
    tokens_seen: int = 0  # input tokens of the completed steps (what the lr schedule counts)
    skipped_steps: int = 0  # non-finite steps skipped so far
    bad_steps_in_a_row: int = 0
    wandb_run_id: Optional[str] = None
    last_loss: Optional[float] = None  # the last finite step loss (what "final loss" reports)

    def save(self, tmp: Path, meta: Dict[str, Any]) -> None:
        meta.update(step=self.step, tokens_seen=self.tokens_seen, skipped_steps=self.skipped_steps,
                    bad_steps_in_a_row=self.bad_steps_in_a_row, wandb_run_id=self.wandb_run_id,
                    last_loss=self.last_loss)

    def check(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        pass

    def load(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(meta["step"]), int(meta.get("tokens_seen", 0))
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self.bad_steps_in_a_row = int(meta.get("bad_steps_in_a_row", 0))
        self.wandb_run_id = meta.get("wandb_run_id")
        self.last_loss = meta.get("last_loss")


class RngState:
    """rng/rank_<r>.pt: python, numpy and torch (CPU + CUDA) generators of every rank."""

    def __init__(self, env: Env) -> None:
        self.env = env

    def _file(self, ckpt: Path) -> Path:
        return ckpt / "rng" / f"rank_{self.env.rank}.pt"

    def save(self, tmp: Path, meta: Dict[str, Any]) -> None:
        # Every rank: ranks may draw differently (e.g. dropout on other data).
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), self._file(tmp))

    def check(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        pass

    def load(self, ckpt: Path, meta: Dict[str, Any]) -> None:
        f = self._file(ckpt)
        if f.is_file():
            set_rng_state(safe_load(f))
        else:  # resumed on more ranks than saved: the newcomers keep their seeded state
            log.warning("%s has no RNG state for rank %d; it keeps the seeded state", ckpt, self.env.rank)


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves a run's parts into `<output_dir>/checkpoints/step_<N>` and restores them."""

    def __init__(self, output_dir: Path, env: Env, keep: int) -> None:
        self.output_dir, self.root = Path(output_dir), files.checkpoints_dir(output_dir)
        self.env, self.keep = env, keep
        self.parts: Dict[str, Stateful] = {}

    def add(self, name: str, part: Stateful) -> None:
        self.parts[name] = part

    def find(self, resume: Optional[str]) -> Optional[Path]:
        """The checkpoint `trainer.resume` names (rank 0 decides, every rank gets its answer)."""
        found = failure = None
        if self.env.is_main:
            try:
                found = files.resolve_resume(resume, self.output_dir)
            except UserError as exc:
                failure = str(exc)
        found, failure = agree(self.env, (found, failure))
        if failure:
            raise UserError(failure)
        return found

    def restore(self, ckpt: Optional[Path], *names: str) -> None:
        """Check the named parts against `ckpt`, then load them (nothing when ckpt is None)."""
        if ckpt is None:
            return
        meta = files.read_state(ckpt)
        for name in names:
            self.parts[name].check(ckpt, meta)
        for name in names:
            self.parts[name].load(ckpt, meta)

    def latest(self) -> Optional[Path]:
        return files.latest_checkpoint(self.root)

    def save(self, step: int) -> Path:
        """Every rank calls it; the checkpoint exists completely, or not at all, when it returns.

        Disk full: the partial directory is removed and the run stops with one UserError line
        (where, how much a checkpoint needs, what is free); the previous checkpoints are untouched.
        (With several ranks, the rank that hit it stops and torchrun stops the others.)"""
        previous = self.latest()
        no_room = None
        if self.env.is_main and previous is not None:
            try:
                files.check_room(self.root, previous)  # before writing anything
            except UserError as exc:
                no_room = str(exc)
        no_room = agree(self.env, no_room)  # every rank stops, none waits in a barrier below
        if no_room:
            raise UserError(no_room)
        tmp = files.begin_save(self.root, step) if self.env.is_main else files.tmp_dir_for(self.root, step)
        barrier(self.env)  # the directory exists before other ranks write into it
        meta: Dict[str, Any] = {}
        try:
            for part in self.parts.values():
                part.save(tmp, meta)
            barrier(self.env)  # every rank's files are in
            if self.env.is_main:
                files.write_state(tmp, meta)
                files.write_manifest(tmp)  # last: it covers every other file
                log.info("checkpoint: %s", files.publish(tmp, step, self.keep))
        except Exception as exc:
            if not files.disk_full(exc, tmp):
                raise
            raise files.disk_full_error(exc, tmp, previous) from None
        barrier(self.env)  # nobody moves on (or exits) before the checkpoint is complete
        return self.root / f"step_{step}"
