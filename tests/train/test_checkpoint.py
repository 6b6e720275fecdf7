"""Checkpoints: exact resume, a SIGKILL while saving, config changes, export, bad steps."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ..runs import run_in_process
from .test_trainer import FAST, read_metrics

pytestmark = pytest.mark.slow

RUN = FAST + ["trainer.dtype=fp32", "data.max_examples=300", "trainer.max_steps=8",
              "data.eval_fraction=0.1", "trainer.eval_every=4"]
TOL = 1e-6


def _losses(out):
    """Train losses (each step logged once, in order) and the train records."""
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") != "eval"]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "each step logged once, in order"
    return [r["loss"] for r in rows], rows


def _evals(out):
    return [(r["step"], r["eval_loss"]) for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "eval"]


def _assert_same_curve(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= TOL * abs(x), (a, b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cli_at):
    """The uninterrupted reference run: 8 steps, cosine schedule, checkpoints every 2 steps."""
    root = tmp_path_factory.mktemp("straight")
    out = root / "run"
    proc = cli_at(root, *RUN, "trainer.save_every=2", f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out


def test_checkpoints_layout_and_pruning(straight):
    _, out = straight
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_6", "step_8"]  # keep_checkpoints=2, no temporary leftovers
    step8 = out / "checkpoints" / "step_8"
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "optimizer.pt",
                 "rng/rank_0.pt", "trainer_state.json", "config.yaml", "manifest.json"):
        assert (step8 / name).is_file(), name
    state = json.loads((step8 / "trainer_state.json").read_text())
    _, rows = _losses(out)
    assert state["step"] == 8 and state["tokens_seen"] == rows[-1]["tokens_seen"]
    assert state["data"]["global_step"] == 8


KILLER = textwrap.dedent("""
    import os, signal, sys
    from granite_train.cli import main
    from granite_train.train.state import ModelState

    def write_then_die(self, tmp, meta):
        if tmp.name == ".step_4.tmp":  # half a checkpoint on disk, then the power goes
            real(self, tmp, meta)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, tmp, meta)

    real = ModelState.save
    ModelState.save = write_then_die
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_while_saving_then_resume_reproduces_the_straight_run(straight, tmp_path, cli_at):
    _, ref_out = straight
    out = tmp_path / "run"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    args = [*RUN, "trainer.save_every=2", f"trainer.output_dir={out}"]
    killed = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".step_4.tmp", "step_2"]  # step_2 intact

    resumed = cli_at(tmp_path, *args)  # trainer.resume=auto is the default
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step_2" in resumed.stderr
    assert not (root / ".step_4.tmp").exists()
    ours, _ = _losses(out)  # steps 3-4 of the killed attempt were dropped and re-logged
    ref, _ = _losses(ref_out)
    _assert_same_curve(ours, ref)
    ours_eval, ref_eval = _evals(out), _evals(ref_out)  # held-out loss at steps 4 and 8
    assert [s for s, _ in ours_eval] == [s for s, _ in ref_eval] == [4, 8]
    _assert_same_curve([v for _, v in ours_eval], [v for _, v in ref_eval])

    from granite_train.models import load_model

    a, b = load_model(out / "final"), load_model(ref_out / "final")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


def test_resume_can_extend_the_run(tmp_path, cli_at):
    """6 steps, then the same run resumed to 8 (constant lr, so max_steps does not shape the lr),
    equals 8 steps straight."""
    const = [*RUN, "scheduler=constant", "scheduler.warmup_steps=2"]
    straight_out, split_out = tmp_path / "straight", tmp_path / "split"
    assert cli_at(tmp_path, *const, f"trainer.output_dir={straight_out}").returncode == 0
    first = cli_at(tmp_path, *const, "trainer.max_steps=6", f"trainer.output_dir={split_out}")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli_at(tmp_path, *const, f"trainer.output_dir={split_out}")
    assert second.returncode == 0, second.stderr[-3000:]
    _assert_same_curve(_losses(split_out)[0], _losses(straight_out)[0])

    # Nothing left to do: a third launch says so and trains nothing.
    third = cli_at(tmp_path, *const, f"trainer.output_dir={split_out}")
    assert third.returncode == 0 and "nothing to train" in third.stderr
    assert len(_losses(split_out)[0]) == 8


def test_resume_refuses_changed_settings_and_fresh_runs_over_checkpoints(straight, tmp_path, cli_at):
    _, out = straight
    base = [a for a in RUN if not a.startswith("trainer.max_steps")] + [f"trainer.output_dir={out}"]
    changed = cli_at(tmp_path, *base, "trainer.max_steps=9", "trainer.tokens_per_step=8192")
    assert changed.returncode == 2
    err = changed.stderr.strip().splitlines()[-1]
    assert "trainer.tokens_per_step 4096 -> 8192" in err and "resume_allow_changes" in err

    shape = cli_at(tmp_path, *base, "trainer.max_steps=9", "model.arch.intermediate_size=96")
    assert shape.returncode == 2 and "model.arch.intermediate_size" in shape.stderr

    fresh = cli_at(tmp_path, *base, "trainer.resume=false")
    assert fresh.returncode == 2
    assert "already holds checkpoints" in fresh.stderr and "trainer.resume=auto" in fresh.stderr

    missing = cli_at(tmp_path, *RUN, f"trainer.output_dir={tmp_path / 'x'}", f"trainer.resume={tmp_path}")
    assert missing.returncode == 2 and "is not a checkpoint" in missing.stderr


def test_export_cli_writes_what_final_holds(straight, tmp_path):
    from granite_train.models import load_model

    _, out = straight
    dest = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "granite_train.export", str(out), str(dest)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step_8" in proc.stdout and (dest / "tokenizer.json").is_file()
    a, b = load_model(dest), load_model(out / "final")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    again = run_in_process(str(out), str(dest), cwd=tmp_path, entry="granite_train.export")
    assert again.returncode == 2 and "not empty" in again.stderr


def _run_in_process(out, overrides, poison_steps):
    """Train in this process with a forward that returns NaN on the given (1-based) steps."""
    from granite_train.cli import compose_config
    from granite_train.models.model import GraniteForCausalLM
    from granite_train.train.trainer import train

    real = GraniteForCausalLM.forward
    calls = {"step": 0}

    def forward(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        if calls["step"] in poison_steps:
            result = result._replace(loss=result.loss * float("nan"))
        return result

    cfg = compose_config([*RUN, "trainer.micro_batch_tokens=4096", f"trainer.output_dir={out}", *overrides])
    mp = pytest.MonkeyPatch()
    mp.setattr(GraniteForCausalLM, "forward", forward)
    import granite_train.train.trainer as trainer

    real_step = trainer.train_step

    def counted(*a, **k):
        calls["step"] += 1
        return real_step(*a, **k)

    mp.setattr(trainer, "train_step", counted)
    try:
        return train(cfg)
    finally:
        mp.undo()


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    out = tmp_path / "run"
    result = _run_in_process(out, ["trainer.max_steps=5"], poison_steps={2, 4})
    assert result.steps == 5
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") != "eval"]
    assert [r.get("skipped", False) for r in rows] == [False, True, False, True, False]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 2]
    assert rows[1]["loss"] is None and all(r["loss"] is not None for r in rows if not r.get("skipped"))


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(tmp_path):
    from granite_train.errors import UserError

    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"3 steps in a row had a non-finite loss.*step_2"):
        _run_in_process(out, ["trainer.max_steps=8", "trainer.save_every=2"], poison_steps={3, 4, 5})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]
    assert not (out / "final").exists()


def test_mup_run_scales_hidden_lrs(tmp_path):
    """optim.mup=true through the trainer: hidden matrices train at lr / m_width."""
    import granite_train.parallel.parallelize as parallelize

    seen = {}
    real = parallelize.build_optimizer

    def keep(model, cfg, *a, **k):
        seen["opt"] = real(model, cfg, *a, **k)
        seen["model"] = model
        return seen["opt"]

    mp = pytest.MonkeyPatch()
    mp.setattr(parallelize, "build_optimizer", keep)
    try:
        _run_in_process(tmp_path / "run", ["trainer.max_steps=2", "optim.mup=true",
                                           "model.arch.logits_scaling=4.0"], poison_steps=set())
    finally:
        mp.undo()
    assert seen["model"].mup_width == 4.0
    lr = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in r][-1]["lr"]
    scales = {g["role"]: g["lr_scale"] for g in seen["opt"].param_groups}
    assert scales["hidden"] == 0.25 and scales["embedding"] == 1.0
    for g in seen["opt"].param_groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"], rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Checkpoints you can trust: verified before use, never unpickled into code.
# ---------------------------------------------------------------------------------------------


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, cli_at):
    from granite_train.train.checkpoint import verify

    _, ref_out = straight
    out = _copy_run(ref_out, tmp_path / "run")
    step8 = out / "checkpoints" / "step_8"
    weights = step8 / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    weights.write_bytes(bytes(data))
    assert "model/model.safetensors differs" in verify(step8)

    resumed = cli_at(tmp_path, *RUN, "trainer.save_every=2", f"trainer.output_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint step_8: model/model.safetensors differs" in resumed.stderr
    assert "resuming from" in resumed.stderr and "step_6" in resumed.stderr
    ours, _ = _losses(out)
    _assert_same_curve(ours, _losses(ref_out)[0])  # steps 7-8 trained again, the same way
    assert verify(step8) is None  # rewritten by the resumed run


def test_truncated_or_added_files_are_named_and_export_refuses(straight, tmp_path):
    from granite_train.train.checkpoint import verify

    _, ref_out = straight
    ckpt = _copy_run(ref_out / "checkpoints" / "step_8", tmp_path / "step_8")
    assert verify(ckpt) is None
    opt = ckpt / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:1000])
    assert verify(ckpt).startswith("optimizer.pt has 1000 bytes") and "truncated" in verify(ckpt)
    proc = run_in_process(str(ckpt), str(tmp_path / "hf"), cwd=tmp_path, entry="granite_train.export")
    assert proc.returncode == 2 and "optimizer.pt has 1000 bytes" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    other = _copy_run(ref_out / "checkpoints" / "step_8", tmp_path / "step_8b")
    (other / "rng" / "rank_1.pt").write_bytes(b"planted")
    assert verify(other) == "rng/rank_1.pt is not in the manifest (added after the checkpoint was written)"


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng/rank_0.pt"])
def test_a_planted_pickle_is_refused_even_with_a_matching_manifest(straight, tmp_path, cli_at, victim):
    # The manifest proves integrity, not authorship: whoever can write the file can rewrite it.
    from granite_train.train.checkpoint import write_manifest

    from ..test_serialization import plant

    _, ref_out = straight
    out = _copy_run(ref_out, tmp_path / "run")
    step8 = out / "checkpoints" / "step_8"
    marker = tmp_path / "pwned"
    plant(step8 / victim, marker)
    write_manifest(step8)
    resumed = cli_at(tmp_path, *[a for a in RUN if not a.startswith("trainer.max_steps")], "trainer.max_steps=9",
                     f"trainer.output_dir={out}")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    line = resumed.stderr.strip().splitlines()[-1]
    assert f"refusing to load {step8 / victim}: it names posix.mkdir" in line
    assert not marker.exists()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, cli_at):
    import errno

    from granite_train.cli import compose_config
    from granite_train.errors import UserError
    from granite_train.train.checkpoint import verify
    from granite_train.train.state import ModelState
    from granite_train.train.trainer import train

    out = tmp_path / "run"
    args = [*RUN, "trainer.save_every=2", "trainer.eval_every=0", f"trainer.output_dir={out}"]
    real = ModelState.save

    def disk_fills_up(self, tmp, meta):
        if tmp.name == ".step_4.tmp":  # some bytes land, then the device is full
            (tmp / "model").mkdir()
            (tmp / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model" / "model.safetensors"))
        return real(self, tmp, meta)

    mp = pytest.MonkeyPatch()
    mp.setattr(ModelState, "save", disk_fills_up)
    try:
        with pytest.raises(UserError) as err:
            train(compose_config([*args, "trainer.max_steps=6"]))
    finally:
        mp.undo()
    msg = str(err.value)
    assert "\n" not in msg
    assert f"no space left on the device while writing {out / 'checkpoints' / '.step_4.tmp' / 'model'}" in msg
    assert "a checkpoint needs about" in msg and "(as step_2)" in msg and "step_2 is intact" in msg
    assert "it filled up after 0.0 MB of this checkpoint" in msg  # the 4 kB that landed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # the partial one is gone
    assert verify(out / "checkpoints" / "step_2") is None

    resumed = cli_at(tmp_path, *args, "trainer.max_steps=6")  # the lock was released, step_2 resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step_2" in resumed.stderr
