"""CLI and config composition: bad input gives one clear line and exit status 2."""

import pytest
from omegaconf import OmegaConf

from granite_train.cli import compose_config, recipe_names
from granite_train.config import RunConfig
from granite_train.errors import UserError


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if "granite-train: error:" in l]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_recipe_composes_typed_config():
    cfg = compose_config(["recipe=sft_tiny", "trainer.seed=7", "data.packing=greedy"])
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe_name == "sft_tiny"
    assert cfg.trainer.seed == 7 and cfg.data.packing == "greedy"
    assert "sft_tiny" in recipe_names()


def test_contract_overrides_exist():
    # The overrides outside checks use (issue contract): they must all compose.
    cfg = compose_config([
        "recipe=sft_tiny", "trainer.output_dir=/tmp/x", "trainer.max_steps=5", "trainer.seed=1",
        "trainer.tokens_per_step=8192", "trainer.micro_batch_tokens=2048", "data.path=a.jsonl",
        "data.format=text", "data.max_length=1024", "data.packing=none", "model.path=/ckpt",
        "tracking.wandb.mode=offline"])
    assert cfg.trainer.micro_batch_tokens == 2048 and cfg.model.path == "/ckpt"


@pytest.mark.parametrize("overrides, needle", [
    (["recipe=nope"], "unknown recipe 'nope'"),
    (["recipe=sft_tiny", "trainer.sed=3"], "did you mean trainer.seed"),
    (["recipe=sft_tiny", "trainer.seed=abc"], "could not be converted to Integer"),
    (["recipe=sft_tiny", "data.packing=zzz"], "data.packing='zzz' is not one of"),
    (["recipe=sft_tiny", "trainer.micro_batch_tokens=512"], "smaller than data.max_length"),
    (["recipe=sft_tiny", "trainer.max_steps=0"], "must be > 0"),
    (["recipe=sft_tiny", "+trainer.bar=2"], "adds a key the config does not have"),
    (["recipe=sft_tiny", "trainer.epochs=0"], "trainer.epochs=0 must be >= 1"),
    (["recipe=sft_tiny", "optim.betas=[0.9]"], "must be two numbers"),
    (["recipe=sft_tiny", "scheduler.warmup_steps=-1"], "must be >= 0"),
    (["recipe=sft_tiny", "trainer.tokens_per_step=1024"], "a step must hold the longest example"),
    (["recipe=sft"], "recipe=sft needs model.path: add model.path=/path/to/granite-checkpoint"),
    (["recipe=sft_tiny", "scheduler.warmup_fraction=1.5"], "scheduler.warmup_fraction=1.5 must be in [0, 1)"),
    (["recipe=sft_tiny", "trainer.tokens_per_step=4096", "trainer.micro_batch_tokens=8192"],
     "trainer.micro_batch_tokens=8192 is more than trainer.tokens_per_step=4096"),
    (["recipe=sft_tiny", "trainer.preemption_signals=[SIGKILL]"], "SIGKILL is not a signal a process can catch"),
    (["recipe=sft_tiny", "trainer.preemption_signals=[TERM]"], "TERM is not a signal a process can catch"),
])
def test_bad_config_is_user_error(overrides, needle):
    with pytest.raises(UserError, match=None) as err:
        compose_config(overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args, needles", [
    (["recipe=nope"], ["unknown recipe", "sft_tiny"]),
    (["recipe=sft_tiny", "trainer.bogus=1"], ["unknown config key 'trainer.bogus'"]),
    (["recipe=sft_tiny", "--bogus"], ["unknown option"]),
])
def test_cli_errors_are_one_line(cli, args, needles):
    assert_one_line_error(cli(*args), *needles)


def test_cli_prints_config_from_any_directory(cli):
    proc = cli("recipe=sft_tiny", "trainer.seed=5", "--cfg")
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.trainer.seed == 5 and cfg.recipe_name == "sft_tiny"


def test_cfg_reads_a_recipe_before_its_checkpoint_exists(cli):
    # --cfg prints the recipe with the setting it still needs marked (OmegaConf's ??? and why) ...
    shown = cli("recipe=sft", "--cfg")
    assert shown.returncode == 0, shown.stderr
    marked = [l for l in shown.stdout.splitlines() if "???" in l]
    assert marked == ["  path: ???  # required: recipe=sft needs model.path: add model.path=/path/to/"
                      "granite-checkpoint (a local HF-layout directory: config.json, *.safetensors, tokenizer.json)"], marked
    cfg = OmegaConf.create(shown.stdout)
    assert OmegaConf.is_missing(cfg.model, "path") and cfg.recipe_name == "sft"
    # ... and a run still refuses, in one line.
    assert_one_line_error(cli("recipe=sft"), "recipe=sft needs model.path: add model.path=")


def test_cli_data_errors_are_one_line(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [oops\n')
    common = ["recipe=sft_tiny", "trainer.max_steps=1", f"trainer.output_dir={tmp_path / 'out'}"]
    assert_one_line_error(cli(*common, f"data.path={bad}"), "bad.jsonl:2", "data.skip_bad_rows=true")
    assert_one_line_error(cli(*common, f"data.path={tmp_path / 'missing.jsonl'}"), "does not exist")
    assert_one_line_error(cli(*common, "data.max_length=8", "trainer.micro_batch_tokens=8",
                              "trainer.tokens_per_step=8"), "chat template overhead")


def presets(group):
    from granite_train.cli import config_dir

    return ", ".join(sorted(p.stem for p in (config_dir() / group).glob("*.yaml")))


@pytest.mark.parametrize("overrides, expected", [
    (["model=granite-foo"],
     f"unknown model preset 'granite-foo'; available: {presets('model')} (choose with model=NAME)"),
    (["scheduler=cosin"], f"unknown scheduler preset 'cosin'; available: {presets('scheduler')} "
                          f"(choose with scheduler=NAME); did you mean scheduler=cosine?"),
    (["recipe=sft_tiny", "model=granite-4.0-h-mcro"],
     f"unknown model preset 'granite-4.0-h-mcro'; available: {presets('model')} (choose with model=NAME); "
     f"did you mean model=granite-4.0-h-micro?"),
    (["optim=adam"], "unknown optim preset 'adam'; available: adamw (choose with optim=NAME); "
                     "did you mean optim=adamw?"),
    (["recipe=sft_tny"], "unknown recipe 'sft_tny'; available: pretrain_power, sft, sft_tiny (choose with "
                         "recipe=NAME); did you mean recipe=sft_tiny?"),
    (["model="], f"model= needs a model preset name; available: {presets('model')} (choose with model=NAME)"),
])
def test_unknown_preset_lists_the_group(overrides, expected):
    with pytest.raises(UserError) as err:
        compose_config(overrides)
    assert str(err.value) == expected


def test_preset_list_is_the_configs_yaml_files():
    assert presets("model").startswith("granite-3.3-2b, granite-4.0-h-micro, ")
    assert presets("scheduler") == "constant, cosine, linear, power, wsd"


def test_cli_unknown_preset_is_one_line(cli):
    proc = cli("model=granite-foo")
    assert_one_line_error(proc, "unknown model preset 'granite-foo'; available: granite-3.3-2b, "
                                "granite-4.0-h-micro, ", "(choose with model=NAME)")
    assert "did you mean" not in proc.stderr  # nothing is close to 'granite-foo'
