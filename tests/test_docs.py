"""README.md and docs/*.md: every command they show still works as written (in-process, seconds,
no training).

Each line of every ```bash block (backslash-continued lines joined, comments dropped, `&&`, `||`,
`;` and `|` chains split into commands, leading `VAR=value` assignments skipped) is checked by
what it runs:

- `python -m granite_train ...`, `torchrun ... -m granite_train ...`, `bash
  launch/single_node.sh N ...` and `sbatch ... launch/slurm.sbatch ...`: the overrides compose
  with the CLI's own composition and value checks (`granite_train.cli.compose_config`; to stay
  fast, Hydra composes each distinct set of presets once and the `key=value` overrides are
  applied the way Hydra applies them, see `fast_compose`), so an unknown key, a bad preset, a
  wrong type or a refused combination fails here, with compose_config's one-line message. Paths
  need not exist: `model.path`, `data.path` and `trainer.output_dir` are looked at only when a
  run starts.
  The two paths the config checks themselves (`distributed.deepspeed_config` must be a file,
  `model.adapter_path` a directory) get an existing stand-in; their keys are still checked.
  torchrun's flags go through torchrun's own argument parser; `--cfg`, `--recipes` and
  `--help` are the CLI's only flags.
- `python -m granite_train.<tool> ...`: the module exists; its own command-line parsing accepts
  the line (plot_lr: its `_parse`; prepare and coord_check: `split_options` with their own
  `OPTIONS`, as their `_parse` does, without importing the data pipeline; export: its argparse,
  with the export itself stubbed out; info: `--json`), then its overrides compose as above
  (coord_check's after its `DEFAULT_OVERRIDES`).
- `python benchmarks/X.py --flag ...`: the script exists and defines every flag given.
- `pytest ...`: the files named exist, `-k` words occur in them, `-m` names a declared marker.
- `pip install -e '.[extra]'`: the extras exist in pyproject.toml; `hf download` and other console
  scripts: installed (an entry point of an installed package); `. .venv/bin/activate`, `python3
  -m venv`, `cd`, `export`: nothing to check. Any other program fails, so a new kind of command
  gets a check (or a conscious entry here) instead of going unchecked.

Inline code spans that start with `pytest ` or `python benchmarks/` get the same file and flag
checks, in every page including docs/benchmarks.md (which has no ```bash blocks). Also: README.md
is at most 300 lines, its two fresh-machine commands are the pinned ones and its test command is
.ci/run's (which may add output-only flags: pip's `-q`, pytest's `--durations=N`), and every
relative link in README.md and docs/*.md points at an existing file (and, with `#anchor`, at a
heading of that page).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the installed metadata names the extras
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

# The README's two commands for a fresh machine, character for character (the issue keeps them).
MAIN_JOB = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . "
            "&& torchrun -m granite_train recipe=sft_tiny")
TEST_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e "
                "'.[dev,triton-cpu]' && MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install "
                "--no-build-isolation --no-deps mamba-ssm==2.3.2.post1 && pytest -q")

# Programs whose lines need no check beyond their own rule below.
NOTHING_TO_CHECK = {".", "source", "cd", "export"}
# Overrides whose value `validate` checks for existence: an existing stand-in replaces the value.
PATH_CHECKED = {"distributed.deepspeed_config": "file", "model.adapter_path": "dir"}
OPERATORS = {"&&", "||", ";", "|", "&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- extraction


def bash_lines(page: Path) -> List[Tuple[int, str]]:
    """(line number, logical line) of every ```bash block of `page`."""
    out: List[Tuple[int, str]] = []
    lang, pending, start = None, "", 0
    for n, raw in enumerate(page.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)\s*$", raw)
        if fence:
            lang = fence.group(1) if lang is None else None
            continue
        if lang != "bash":
            continue
        line = raw.strip()
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            out.append((start, line))
    return out


def split_commands(line: str) -> List[List[str]]:
    """The commands of one shell line: tokens, comments dropped, split at && || ; | &."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands: List[List[str]] = [[]]
    for tok in lex:
        if tok in OPERATORS:
            commands.append([])
        else:
            commands[-1].append(tok)
    return [c for c in commands if c]


def inline_spans(page: Path) -> List[str]:
    """Inline code spans outside fenced blocks, whitespace collapsed (a span may wrap lines)."""
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M)
    return [" ".join(m.group(2).split())
            for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, flags=re.S)]


def commands_of(pages) -> List[Tuple[str, List[str]]]:
    return [(f"{rel(p)}:{n}", cmd) for p in pages for n, line in bash_lines(p) for cmd in split_commands(line)]


COMMANDS = commands_of(PAGES)


# ---------------------------------------------------------------- checks


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Dict[str, str]:
    base = tmp_path_factory.mktemp("stand_ins")
    (base / "ds.json").write_text("{}")
    (base / "adapter").mkdir()
    return {"file": str(base / "ds.json"), "dir": str(base / "adapter")}


COMPOSED: Dict[Tuple[str, ...], object] = {}  # override list -> its RunConfig (pages repeat commands)
BASES: Dict[Tuple[str, ...], object] = {}  # group choices (recipe=, model=, ...) -> Hydra's composed config


@pytest.fixture(scope="module", autouse=True)
def register_once():
    """compose_config stores the schema and the recipes in Hydra's ConfigStore on every call; the
    recipes do not change during this test, so store them once."""
    import granite_train.cli as cli

    register, done = cli._register, []

    def once(cs):
        if not done:
            register(cs)
            done.append(True)

    cli._register = once
    yield
    cli._register = register


def is_group_choice(override: str) -> bool:
    """`recipe=NAME`, `model=NAME`, ...: a preset of a config group (a folder of configs/)."""
    from granite_train.cli import config_dir

    key = override.split("=", 1)[0]
    return "=" in override and (key == "recipe" or "/" in key or (config_dir() / key).is_dir())


def fast_compose(overrides: List[str]):
    """What compose_config computes, with Hydra's composition of the group choices done once per
    distinct choice: Hydra composes the defaults (configs/, the recipe, the chosen presets) and
    then applies each `key=value` with `OmegaConf.update(cfg, key, value, merge=True)` on the
    struct config (hydra/_internal/config_loader_impl.py, `_apply_overrides_to_config`); this
    does the same, then `OmegaConf.to_object` and `validate` as compose_config does. A Hydra
    composition costs ~0.2 s and the pages hold ~40 distinct commands but a dozen distinct
    choices. `test_fast_compose_equals_compose_config` holds the two equal."""
    import copy

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    import granite_train.cli as cli
    from granite_train.config import validate

    groups = tuple(o for o in overrides if is_group_choice(o))
    values = [o for o in overrides if not is_group_choice(o)]
    if groups not in BASES:
        cli._register(ConfigStore.instance())
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(cli.config_dir()), version_base=None):
            BASES[groups] = hydra_compose(config_name="train", overrides=list(groups))
    cfg = copy.deepcopy(BASES[groups])
    for o in OverridesParser.create().parse_overrides(values):
        assert o.is_force_add() is False and not o.is_add() and not o.is_delete()
        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    run_cfg = OmegaConf.to_object(cfg)
    validate(run_cfg)
    return run_cfg


def with_stand_ins(overrides: List[str], stand_ins: Dict[str, str]) -> List[str]:
    """The overrides, with an existing file or directory for the paths `validate` looks at."""
    fixed = []
    for o in overrides:
        key = o.split("=", 1)[0]
        fixed.append(f"{key}={stand_ins[PATH_CHECKED[key]]}" if key in PATH_CHECKED and "=" in o else o)
    return fixed


def compose(overrides: List[str], stand_ins: Dict[str, str]) -> None:
    """The overrides compose into a valid RunConfig, or the test fails with the CLI's one line."""
    from granite_train.cli import compose_config

    fixed = with_stand_ins(overrides, stand_ins)
    if tuple(fixed) in COMPOSED:
        return
    if any(o.startswith(("+", "~")) for o in fixed):
        COMPOSED[tuple(fixed)] = compose_config(fixed)  # compose_config refuses these itself
        return
    try:
        COMPOSED[tuple(fixed)] = fast_compose(fixed)
    except Exception as exc:  # a mistake in the page: compose_config says it in one line
        compose_config(fixed)  # raises UserError
        raise AssertionError(f"tests/test_docs.py's composition failed ({exc!r}) where compose_config "
                             f"accepted {fixed}: fix fast_compose") from exc


def check_cli(args: List[str], stand_ins) -> None:
    """`python -m granite_train ARGS`."""
    if any(a in ("-h", "--help", "--recipes") for a in args):
        return
    args = [a for a in args if a != "--cfg"]
    flags = [a for a in args if a.startswith("-")]
    assert not flags, f"granite_train takes --cfg, --recipes, --help and overrides, not {flags}"
    compose(args, stand_ins)


def module_constant(module: str, name: str):
    """A literal module-level constant, read from the module's source without importing it."""
    import ast

    source = Path(importlib.util.find_spec(module).origin).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{module} has no literal {name}")


def check_tool(tool: str, args: List[str], stand_ins, monkeypatch) -> None:
    """`python -m granite_train.TOOL ARGS`."""
    module = f"granite_train.{tool}"
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    if any(a in ("-h", "--help") for a in args):
        return
    if tool == "info":  # importing it (the model code) would cost a second
        flags, valued = module_constant(module, "FLAGS"), module_constant(module, "VALUED")
        overrides, rest = [], iter(args)
        for a in rest:
            if a.split("=")[0] in valued:
                assert "=" in a or next(rest, None) is not None, f"{a} needs a value: {args}"
            elif a not in flags:
                overrides.append(a)
        assert not [a for a in overrides if a.startswith("-")], f"info takes {flags + valued} and overrides: {args}"
        compose(overrides, stand_ins)
        return
    if tool == "coord_check":  # importing it pulls in the training step and datasets (seconds)
        from granite_train.cli import split_options

        options, defaults = module_constant(module, "OPTIONS"), module_constant(module, "DEFAULT_OVERRIDES")
        overrides, opts = split_options(args, options, "coord_check takes --widths, --steps, --out and overrides")
        # as its _parse reads them:
        assert all(int(w) >= 1 for w in opts["widths"].split(",")) and int(opts["steps"]) >= 1
        compose([*defaults, *overrides], stand_ins)
        return
    mod = importlib.import_module(module)
    if tool == "export":
        called = []
        monkeypatch.setattr(mod, "export", lambda *a, **k: called.append((a, k)) or Path(a[0]))
        assert mod.main(args) == 0 and called, f"export did not accept {args}"
        return
    if tool == "prepare":
        # prepare._parse is split_options(OPTIONS) plus --out; it also imports the data pipeline
        # (datasets: seconds) for one default, so split the flags here the same way.
        from granite_train.cli import split_options

        overrides, opts = split_options(args, mod.OPTIONS, "prepare takes --out, --shard-tokens and overrides")
        assert opts["out"], "python -m granite_train.prepare needs --out DIR"
    elif tool == "plot_lr":
        overrides, _ = mod._parse(args)
    elif tool == "doctor":
        mod = importlib.import_module("granite_train.doctor.run")
        overrides, _ = mod._parse(args)
    else:
        pytest.fail(f"no check for python -m {module}: add one to tests/test_docs.py")
    compose(overrides, stand_ins)


def check_python_module(target: str, args: List[str], stand_ins, monkeypatch) -> None:
    if target == "granite_train":
        check_cli(args, stand_ins)
    elif target.startswith("granite_train."):
        check_tool(target.split(".", 1)[1], args, stand_ins, monkeypatch)
    elif target == "venv":
        pass
    elif target == "pytest":
        check_pytest(args)
    else:
        pytest.fail(f"no check for python -m {target}: add one to tests/test_docs.py")


def check_torchrun(args: List[str], stand_ins, monkeypatch) -> None:
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(args)  # torchrun's own parser: exits on a bad flag
    assert parsed.module, "torchrun lines run a module: -m granite_train"
    check_python_module(parsed.training_script, parsed.training_script_args, stand_ins, monkeypatch)


def check_benchmark(script: str, args: List[str]) -> None:
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    source = path.read_text()
    for a in args:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            assert f'"{flag}"' in source, f"{script} defines no {flag}"


MARKERS: List[str] = []  # pytest's declared markers (pyproject.toml), filled by the fixture below


@pytest.fixture(scope="module", autouse=True)
def declared_markers(pytestconfig):
    MARKERS[:] = [m.split(":", 1)[0].strip() for m in pytestconfig.getini("markers")]


def markers() -> List[str]:
    assert MARKERS, "pytest's markers were not read"
    return MARKERS


def extras() -> List[str]:
    if tomllib is not None:
        return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    return importlib.metadata.metadata("granite-train").get_all("Provides-Extra") or []


def check_pytest(args: List[str]) -> None:
    files, it = [], iter(args)
    for a in it:
        if a in ("-k", "-m"):
            expr = next(it, "")
            words = [w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr) if w not in ("and", "or", "not")]
            assert words, f"{a} needs an expression"
            if a == "-m":
                unknown = [w for w in words if w not in markers()]
                assert not unknown, f"-m {expr}: no marker {unknown} in pyproject.toml"
            else:
                assert files, f"-k {expr} without a test file"
                text = "".join((ROOT / f).read_text() if (ROOT / f).is_file() else "" for f in files).lower()
                missing = [w for w in words if w.lower() not in text]
                assert not missing, f"-k {expr}: {missing} occur nowhere in {files}"
        elif not a.startswith("-"):
            path = a.split("::", 1)[0]
            assert (ROOT / path).exists(), f"pytest {a}: {path} does not exist"
            files.append(path)


def check_pip(args: List[str]) -> None:
    assert args and args[0] == "install", f"pip {args}: only pip install is shown"
    known = extras()
    for a in args[1:]:
        m = re.fullmatch(r"(?:\.|granite-train)\[([^\]]+)\]", a)
        if m:
            unknown = [e for e in m.group(1).split(",") if e not in known]
            assert not unknown, f"pip install {a}: no extra {unknown} in pyproject.toml"


def console_script(name: str) -> bool:
    return any(True for _ in importlib.metadata.entry_points(group="console_scripts", name=name))


def check_command(cmd: List[str], stand_ins, monkeypatch) -> None:
    while cmd and ASSIGNMENT.match(cmd[0]):  # VAR=value before the program
        cmd = cmd[1:]
    if not cmd:
        return
    prog, args = cmd[0], cmd[1:]
    if prog in NOTHING_TO_CHECK:
        return
    if prog in ("python", "python3"):
        if args[:1] == ["-m"]:
            assert len(args) > 1, "python -m needs a module"
            check_python_module(args[1], args[2:], stand_ins, monkeypatch)
        elif args and args[0].startswith("benchmarks/"):
            check_benchmark(args[0], args[1:])
        else:
            pytest.fail(f"no check for python {' '.join(args)}: add one to tests/test_docs.py")
    elif prog == "torchrun":
        check_torchrun(args, stand_ins, monkeypatch)
    elif prog == "bash" and args[:1] == ["launch/single_node.sh"]:
        assert (ROOT / args[0]).is_file()
        assert len(args) > 1 and args[1].isdigit(), "launch/single_node.sh NPROC [overrides]"
        check_cli(args[2:], stand_ins)
    elif prog == "sbatch":
        scripts = [i for i, a in enumerate(args) if a.endswith(".sbatch")]
        assert scripts, "sbatch [options] launch/slurm.sbatch [overrides]"
        i = scripts[0]
        assert (ROOT / args[i]).is_file(), f"{args[i]} does not exist"
        assert all(a.startswith("-") for a in args[:i]), f"sbatch options go before the script: {args[:i]}"
        check_cli(args[i + 1:], stand_ins)
    elif prog == "pytest":
        check_pytest(args)
    elif prog == "pip":
        check_pip(args)
    elif prog in ("hf", "huggingface-cli"):
        assert console_script(prog), f"{prog} is not installed here (huggingface_hub's CLI)"
        assert args[:1] == ["download"] and "--local-dir" in args, f"{prog} download REPO --local-dir DIR"
    elif prog == ".ci/run":
        assert (ROOT / prog).is_file()
    else:
        pytest.fail(f"no check for the program {prog!r}: add one to tests/test_docs.py")


def command_id(where: str, cmd: List[str]) -> str:
    return f"{where}:{next((t for t in cmd if not ASSIGNMENT.match(t)), '')}"  # README.md:62:torchrun


@pytest.mark.parametrize("cmd", [c for _, c in COMMANDS], ids=[command_id(w, c) for w, c in COMMANDS])
def test_command(cmd, stand_ins, monkeypatch):
    check_command(cmd, stand_ins, monkeypatch)


def test_there_are_commands_to_check():
    """The extraction finds the pages' commands (an empty list would pass everything)."""
    readme = [c for w, c in COMMANDS if w.startswith("README.md")]
    assert sum(c[0] in ("python", "torchrun") for c in readme) >= 10
    assert {rel(p) for p in PAGES} >= {"README.md", "docs/configuration.md", "docs/troubleshooting.md"}


def cli_overrides(cmd: List[str]) -> List[str]:
    """The overrides of a `python -m granite_train` or `torchrun ... -m granite_train` line, else []."""
    while cmd and ASSIGNMENT.match(cmd[0]):
        cmd = cmd[1:]
    for i in range(len(cmd) - 1):
        if cmd[i] == "-m" and cmd[i + 1] == "granite_train" and cmd[0] in ("python", "python3", "torchrun"):
            return [a for a in cmd[i + 2:] if not a.startswith("-")]
    return []


def test_fast_compose_equals_compose_config(stand_ins):
    """The shortcut `compose` takes gives compose_config's RunConfig, field for field, on the pages'
    commands with list and dict values and a plain one (each compose_config call costs ~0.2 s)."""
    lists = sorted({tuple(o) for _, c in COMMANDS if (o := cli_overrides(c))})
    with_lists = [o for o in lists if any("[" in v for v in o)]
    sample = with_lists + [o for o in lists if o not in with_lists][:1]
    assert len(sample) >= 3
    from granite_train.cli import compose_config

    for overrides in sample:
        fixed = with_stand_ins(list(overrides), stand_ins)
        assert fast_compose(fixed) == compose_config(fixed), overrides


BROKEN = [
    "python -m granite_train recipe=sft_tiny trainer.max_step=3",               # unknown key
    "python -m granite_train recipe=sft_tiny model=granite-foo",                # unknown preset
    "python -m granite_train recipe=sft data.path=my_chats.jsonl",              # recipe=sft needs model.path
    "torchrun --nprocs_per_node=2 -m granite_train recipe=sft_tiny",            # torchrun flag
    "torchrun --nproc_per_node=2 -m granite_train recipe=sft_tiny distributed.expert_parallel_size=2",
    "python -m granite_train.plot_lr recipe=pretrain_power --outt lr.png",      # tool flag
    "python -m granite_train.export runs/x /tmp/y --merj",                      # export flag
    "python -m granite_train.nope recipe=sft_tiny",                             # no such tool
    "sbatch --nodes=2 launch/nope.sbatch recipe=sft_tiny",                      # no such script
    "bash launch/single_node.sh 8 recipe=sft_tiny trainer.max_stepz=3",
    "pytest tests/models/test_nope.py",                                         # no such test file
    "pytest tests/models/test_lora.py -k no_such_test_word",
    "pytest -m quick",                                                          # no such marker
    "python benchmarks/packing.py --billion",                                   # no such flag
    "pip install -e '.[cuda]'",                                                 # no such extra
    "frobnicate --now",                                                         # unknown program
]


@pytest.mark.parametrize("line", BROKEN)
def test_a_broken_command_fails(line, stand_ins, monkeypatch, capsys):
    """The checks have teeth: each of these mistakes fails its check."""
    from granite_train.errors import UserError

    with pytest.raises((AssertionError, UserError, SystemExit, pytest.fail.Exception)):
        for cmd in split_commands(line):
            check_command(cmd, stand_ins, monkeypatch)


def test_inline_test_and_benchmark_commands():
    """`pytest tests/...` and `python benchmarks/...` quoted in the prose name real files and flags."""
    problems = []
    for page in PAGES:
        for span in inline_spans(page):
            try:
                if span.startswith("pytest "):
                    check_pytest(shlex.split(span)[1:])
                elif span.startswith("python benchmarks/"):
                    words = shlex.split(span)
                    check_benchmark(words[1], words[2:])
            except AssertionError as e:
                problems.append(f"{rel(page)}: `{span}`: {str(e).splitlines()[0]}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the README itself


def readme_bash_lines() -> List[str]:
    return [line for _, line in bash_lines(ROOT / "README.md")]


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}: move details to docs/)"


def test_fresh_machine_commands_are_kept():
    lines = readme_bash_lines()
    assert MAIN_JOB in lines, "README.md lost its main-job command (keep it character for character)"
    assert TEST_COMMAND in lines, "README.md lost its test command (keep it character for character)"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if "README test command" in line)
    ci_command = next(line for line in ci[marker + 1:] if line.strip())
    # .ci/run may add output-only flags (pip's -q, pytest's --durations=N); otherwise it is the
    # README's command, token for token.
    ci_tokens, kept = shlex.split(ci_command), []
    for i, tok in enumerate(ci_tokens):
        quiet_pip = tok == "-q" and ci_tokens[i - 1] == "install"
        if not (quiet_pip or re.fullmatch(r"--durations=\d+", tok)):
            kept.append(tok)
    assert kept == shlex.split(TEST_COMMAND), f".ci/run runs {ci_command!r}, README.md {TEST_COMMAND!r}"


# ---------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> List[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M)
    return [slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*$", text, flags=re.M)]


def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(), flags=re.S | re.M)
        text = re.sub(r"(`+).+?\1", "", text, flags=re.S)  # no links inside code spans
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                problems.append(f"{rel(page)}: ({target}): {path} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{rel(page)}: ({target}): no heading #{anchor} in {rel(dest)}")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
