"""Command line: `python -m granite_train recipe=NAME [overrides]` (also under torchrun).

We use Hydra's compose API rather than `@hydra.main`: it gives the same override grammar and
config groups, but no per-rank `outputs/<date>` directories, no working-directory changes, and
lets us turn composition errors into one clear line. Every rank composes the config itself.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import granite_train.configs
import granite_train.recipes
from granite_train.config import RunConfig, missing_requirements, requirement_hint, validate
from granite_train.errors import Preempted, UserError

log = logging.getLogger("granite_train")

USAGE = """usage: python -m granite_train recipe=NAME [key=value ...]
       torchrun --nproc_per_node=N -m granite_train recipe=NAME [key=value ...]

  --cfg        print the resolved config and exit
  --recipes    list the recipes and exit
  -h, --help   this help

Config groups (choose with group=NAME): model, data, optim, scheduler, trainer, distributed,
tracking. Any field can be overridden with dotted keys, e.g. trainer.max_steps=100
data.path=my.jsonl model.path=/ckpt/granite. See docs/configuration.md for the main overrides.

Tools: python -m granite_train.prepare (tokenize once into shards), .export, .info, .plot_lr,
.coord_check; each takes --help."""


def config_dir() -> Path:
    return Path(granite_train.configs.__file__).parent


def recipe_dir() -> Path:
    return Path(granite_train.recipes.__file__).parent


def recipe_names() -> List[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def _register(cs) -> None:
    cs.store(name="run_schema", node=RunConfig)
    # Recipes live in their own top-level folder but act as the `recipe` config group.
    for path in sorted(recipe_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def _all_keys(node, prefix: str = "") -> List[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if OmegaConf.is_dict(v):
            keys.extend(_all_keys(v, full + "."))
    return keys


def group_options(group: str) -> List[str]:
    """The presets of a config group: the yaml files under configs/<group>/ (recipes/ for `recipe`)."""
    if group == "recipe":
        return recipe_names()
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _unknown_preset(missing: str, fallback: Sequence[str]) -> Optional[str]:
    """`unknown model preset 'x'; available: a, b (choose with model=NAME)[; did you mean model=a?]`
    for Hydra's missing `group/name`, or None when `missing` names no config group."""
    parts = missing.split("/")
    # The longest leading path that is a group folder (groups may nest: configs/a/b/*.yaml).
    for cut in range(len(parts) - 1, 0, -1):
        group = "/".join(parts[:cut])
        if group == "recipe" or (config_dir() / group).is_dir():
            break
    else:
        return None
    name = "/".join(parts[cut:])
    options = group_options(group) or sorted(fallback)
    what = "recipe" if group == "recipe" else f"{group.replace('/', '.')} preset"
    key = group.replace("/", ".")
    # 0.75, not difflib's 0.6: 'granite-foo' is no typo of 'granite-tiny', 'cosin' is of 'cosine'.
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.75) if name else []
    hint = f"; did you mean {key}={close[0]}?" if close else ""
    asked = f"unknown {what} {name!r}" if name else f"{key}= needs a {what} name"
    listed = ", ".join(options) if options else f"none (no yaml files in {config_dir() / group})"
    return f"{asked}; available: {listed} (choose with {key}=NAME){hint}"


def _explain(exc: Exception, overrides: Sequence[str]) -> str:
    """One line for a Hydra/OmegaConf composition error."""
    text = str(exc).strip()
    if isinstance(exc, MissingConfigException):
        missing = getattr(exc, "missing_cfg_file", None) or ""
        line = _unknown_preset(missing, getattr(exc, "options", None) or []) if "/" in missing else None
        if line is not None:
            return line
        return text.splitlines()[0] + " (check the group option name; see configs/)"
    if "Could not override '" in text:
        key = text.split("Could not override '", 1)[1].split("'", 1)[0]
        schema = OmegaConf.structured(RunConfig)
        close = difflib.get_close_matches(key, _all_keys(schema), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown config key '{key}'{hint}; run with --cfg to see every key"
    cause = exc.__cause__ or exc.__context__
    detail = " ".join(str(cause).split()) if cause is not None else ""
    first = " ".join(text.split())
    # OmegaConf's message carries a multi-line "full_key/object_type" footer: keep the gist.
    detail = detail.split(" full_key:")[0]
    return f"{first}: {detail}" if detail else first


def split_options(args: Sequence[str], defaults: Dict[str, Optional[str]],
                  unknown_hint: str) -> Tuple[List[str], Dict[str, Optional[str]]]:
    """(config overrides, {option: value}) of a tool's command line: `--name VALUE` or
    `--name=VALUE` for the options in `defaults`; anything else starting with '-' is one error
    line ending in `unknown_hint`."""
    opts = dict(defaults)
    overrides: List[str] = []
    it = iter(args)
    for arg in it:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or name not in opts:
            raise UserError(f"unknown option {arg!r}; {unknown_hint} (see --help)")
        if not eq:
            value = next(it, None)
            if value is None or value.startswith("--"):  # `--steps --out x`: the value is missing
                raise UserError(f"--{name} needs a value (see --help)")
        opts[name] = value
    return overrides, opts


def compose_config(overrides: Sequence[str], allow_missing: bool = False) -> RunConfig:
    """Compose the run config from configs/, the chosen recipe and the overrides (typed).
    `allow_missing`: settings the recipe requires may still be unset (`config.validate`)."""
    added = [o for o in overrides if o.startswith("+")]
    if added:
        # Hydra's "+key=value" appends a key the schema does not have: it would be ignored.
        raise UserError(f"'{added[0]}' adds a key the config does not have; every setting already "
                        f"exists, write it without '+' (see --cfg for the keys)")
    _register(ConfigStore.instance())
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = compose(config_name="train", overrides=list(overrides))
        run_cfg = OmegaConf.to_object(cfg)
    except UserError:
        raise
    except (OmegaConfBaseException, Exception) as exc:  # Hydra raises several unrelated types
        if type(exc).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        raise UserError(_explain(exc, overrides)) from None
    validate(run_cfg, allow_missing=allow_missing)
    return run_cfg


def resolved_yaml(cfg: RunConfig) -> str:
    """The config as YAML (--cfg); a setting the recipe requires and nobody set reads
    `key: ???  # required: recipe=X needs key: add key=...`, so a recipe can be read before
    its inputs (a checkpoint) exist."""
    node = OmegaConf.structured(cfg)
    missing = missing_requirements(cfg)
    for key in missing:
        OmegaConf.update(node, key, "???")  # OmegaConf's own "missing value"
    lines = OmegaConf.to_yaml(node).split("\n")
    for key in missing:
        # to_yaml indents each level by two spaces: find the key's line under its parents.
        parts, depth = key.split("."), 0
        for i, line in enumerate(lines):
            if line.startswith("  " * depth + parts[depth] + ":"):
                if depth == len(parts) - 1:
                    lines[i] = f"{line}  # required: {requirement_hint(cfg, key)}"
                    break
                depth += 1
    return "\n".join(lines)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0
        else f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    if "--recipes" in args:
        print("\n".join(recipe_names()))
        return 0
    print_cfg = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    flags = [a for a in overrides if a.startswith("-")]
    _setup_logging()
    try:
        if flags:
            raise UserError(f"unknown option {flags[0]!r}; see --help")
        cfg = compose_config(overrides, allow_missing=print_cfg)
        if print_cfg:
            print(resolved_yaml(cfg))
            return 0
        # Imported here, not at the top: the trainer and the data pipeline cost ~0.8 s to import,
        # which --cfg, --recipes and every config error line would pay for nothing.
        from granite_train.train.trainer import train

        train(cfg)
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("granite-train: interrupted", file=sys.stderr)
        return 130
    except Preempted as exc:
        print(f"granite-train: preempted: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
