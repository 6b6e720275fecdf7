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


def test_cli_data_errors_are_one_line(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [oops\n')
    common = ["recipe=sft_tiny", "trainer.max_steps=1", f"trainer.output_dir={tmp_path / 'out'}"]
    assert_one_line_error(cli(*common, f"data.path={bad}"), "bad.jsonl:2", "data.skip_bad_rows=true")
    assert_one_line_error(cli(*common, f"data.path={tmp_path / 'missing.jsonl'}"), "does not exist")
    assert_one_line_error(cli(*common, "data.max_length=8", "trainer.micro_batch_tokens=8",
                              "trainer.tokens_per_step=8"), "chat template overhead")
