#!/usr/bin/env bash
# The first thing to run on a GPU box: the doctor's parity checks and --bench (docs/benchmarks.md,
# "The device check"). Made for an air-gapped node that has torch (CUDA), triton, transformers,
# peft and accelerate but none of this project's other packages and no network.
#
#   1. Where a package registry is reachable (any Python with torch installed, e.g. the README's
#      test install), make the wheel folder for the box's Python 3.12 (about 3 MiB; <= 64 MiB):
#        bash benchmarks/device_check.sh wheels [WHEELS=device_wheels]
#   2. Copy the repository and WHEELS to the box; there:
#        bash benchmarks/device_check.sh run [WHEELS=device_wheels] [OUT=$OUT or device_check_out]
#      `install` instead of `run` does only the first half (the packages, checked by importing
#      them).
#
# `run` installs the wheels into OUT/site (pip --target --no-index --no-deps: nothing reaches a
# network, nothing installed on the box changes), then runs
#   python -m granite_train.doctor --bench --json OUT/doctor.json   (log: OUT/doctor.log)
# under a timeout of DEVICE_CHECK_TIMEOUT seconds (480). Exit status: the doctor's (1: a fast path
# disagrees with its reference; 124: timed out).
#
# What the wheels are: hydra-core, omegaconf and antlr4 (our config), einops, fla-core (Triton conv
# and gated norm) and mamba-ssm's Python code with its CUDA extension skipped (its Triton scan
# kernels run; the causal-conv1d and selective-scan CUDA builds are what fails most often). Not
# shipped: datasets (its pyarrow alone is 55 MiB), deepspeed and flash-attn, so the doctor reports
# them "not installed" and training runs need the full install.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ACTION="${1:-run}"
WHEELS="${2:-device_wheels}"
OUT_DIR="${3:-${OUT:-device_check_out}}"
# Pinned: the versions the doctor and the interpreted-Triton shims were checked with.
PURE=(hydra-core==1.3.8 omegaconf==2.3.1 einops==0.8.2 fla-core==0.6.0)
SDISTS=(antlr4-python3-runtime==4.9.3)
MAMBA=mamba-ssm==2.3.2.post1
# mamba-ssm's package does not import without its CUDA extension; its Triton modules do, as the
# trainer imports them (granite_train/models/mamba_kernels.py).
IMPORTS="import hydra, omegaconf, einops, granite_train.doctor.run
from granite_train.models.mamba_kernels import mamba_triton_importable
mamba_triton_importable()
import mamba_ssm.ops.triton.ssd_combined, mamba_ssm.ops.triton.layernorm_gated, fla.modules.causal_conv1d"

make_wheels() {
    mkdir -p "$WHEELS"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py -d "$WHEELS" "${PURE[@]}"
    python -m pip wheel -q --no-deps -w "$WHEELS" "${SDISTS[@]}"
    # Python code only: the CUDA extensions are skipped, the Triton kernels are plain Python.
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$MAMBA"
    for whl in "$WHEELS"/*.whl; do
        case "$(basename "$whl")" in
            *-py3-none-any.whl|*-py2.py3-none-any.whl) ;;
            *) echo "device_check: $whl is not a pure-Python wheel (it would not install on the box)" >&2; exit 1 ;;
        esac
    done
    local mib
    mib=$(du -sm "$WHEELS" | cut -f1)
    if [ "$mib" -gt 64 ]; then
        echo "device_check: $WHEELS holds $mib MiB, more than the 64 MiB that can be copied to the box" >&2
        exit 1
    fi
    echo "device_check: $(ls "$WHEELS" | wc -l) wheels, $mib MiB in $WHEELS"
}

install_wheels() {
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "device_check: no wheels in $WHEELS; make them where a registry is reachable: bash benchmarks/device_check.sh wheels $WHEELS" >&2
        exit 1
    fi
    mkdir -p "$OUT_DIR"
    python -m pip install -q --no-index --no-deps --target "$OUT_DIR/site" "$WHEELS"/*.whl
    export PYTHONPATH="$OUT_DIR/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    python -c "$IMPORTS" || { echo "device_check: the installed packages do not import (above)" >&2; exit 1; }
    echo "device_check: installed $(ls "$WHEELS" | wc -l) wheels into $OUT_DIR/site; imports ok"
}

run_doctor() {
    export PYTHONPATH="$OUT_DIR/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    (nvidia-smi || true) > "$OUT_DIR/nvidia-smi.txt" 2>&1
    date -u +%FT%TZ > "$OUT_DIR/date.txt"
    (cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown) > "$OUT_DIR/commit.txt"
    set +e
    timeout "${DEVICE_CHECK_TIMEOUT:-480}" python -m granite_train.doctor --bench --json "$OUT_DIR/doctor.json" \
        2>&1 | tee "$OUT_DIR/doctor.log"
    local status=${PIPESTATUS[0]}
    set -e
    echo "device_check: doctor exited $status; results in $OUT_DIR: $(cd "$OUT_DIR" && ls -d -- *.json *.log *.txt 2>/dev/null | tr "\n" " ")"
    return "$status"
}

case "$ACTION" in
    wheels) make_wheels ;;
    install) install_wheels ;;
    run) install_wheels && run_doctor ;;
    *) echo "usage: bash benchmarks/device_check.sh wheels|install|run [WHEELS] [OUT]" >&2; exit 2 ;;
esac
