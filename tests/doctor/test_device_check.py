"""benchmarks/device_check.sh, its install half on CPU: the wheel folder it makes (pure-Python
wheels, <= 64 MiB) installs with --no-index into a fresh venv that has only what the GPU box has
(torch, triton, transformers, peft, accelerate and their dependencies: here every package of the
test venv but those the script must bring), and then the doctor's modules import from there.
Making the folder needs the package registry, as the CI install does."""

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "device_check.sh"
# What the box lacks (and the script ships or leaves out): never visible inside the fake box.
NOT_ON_THE_BOX = ("hydra", "omegaconf", "antlr4", "einops", "fla", "mamba_ssm", "granite_train", "__editable__",
                  "datasets", "deepspeed", "flash_attn", "causal_conv1d", "fla_core", "hydra_core")


def _fake_box(tmp_path: Path) -> Path:
    """A fresh venv whose site-packages sees this venv's packages but those the box lacks."""
    box = tmp_path / "box"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(box)], check=True)
    shown = tmp_path / "box_packages"
    shown.mkdir()
    for entry in Path(site.getsitepackages()[0]).iterdir():
        name = entry.name.lower().replace("-", "_")
        if not name.startswith(NOT_ON_THE_BOX) and not name.endswith(".pth"):
            (shown / entry.name).symlink_to(entry)
    box_site = next(box.glob("lib/python*/site-packages"))
    # pip comes along as one of those packages (the box has pip).
    (box_site / "box.pth").write_text(f"{shown}\n")
    return box


@pytest.mark.slow
def test_the_wheel_folder_installs_offline_into_a_fresh_venv(tmp_path):
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    here = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    made = subprocess.run(["bash", str(SCRIPT), "wheels", str(wheels)], capture_output=True, text=True,
                          env=here, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert [n.split("-")[0] for n in names] == ["antlr4_python3_runtime", "einops", "fla_core", "hydra_core",
                                               "mamba_ssm", "omegaconf"], names
    assert sum(p.stat().st_size for p in wheels.iterdir()) <= 64 * 2 ** 20

    box = _fake_box(tmp_path)
    env = {"PATH": f"{box / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": "/dev/null"}
    probe = "import hydra"
    before = subprocess.run([str(box / "bin" / "python"), "-c", probe], capture_output=True, text=True, env=env)
    assert before.returncode != 0, "the fake box already has hydra: the check would prove nothing"

    installed = subprocess.run(["bash", str(SCRIPT), "install", str(wheels), str(out)], capture_output=True,
                               text=True, env=env, cwd=tmp_path, timeout=600)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    assert "imports ok" in installed.stdout
    where = subprocess.run(
        [str(box / "bin" / "python"), "-c", "import hydra, fla, granite_train.doctor.run as d\n"
         "from granite_train.models.mamba_kernels import mamba_triton_importable\n"
         "mamba_triton_importable(); import mamba_ssm.ops.triton.ssd_combined as scan\n"
         "print(hydra.__file__); print(scan.__file__); print(fla.__file__); print(d.__file__)"],
        capture_output=True, text=True, env={**env, "PYTHONPATH": f"{out / 'site'}:{REPO}"})
    assert where.returncode == 0, where.stderr[-3000:]
    hydra_at, mamba_at, fla_at, doctor_at = where.stdout.split()
    assert all(Path(p).is_relative_to(out / "site") for p in (hydra_at, mamba_at, fla_at))
    assert Path(doctor_at).is_relative_to(REPO)
