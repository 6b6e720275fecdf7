#!/usr/bin/env bash
# One node, N processes (one per GPU, or N CPU processes with gloo).
#   bash launch/single_node.sh 8 recipe=sft_tiny model.path=/ckpt/granite-4.0-h-tiny
set -euo pipefail
NPROC=${1:?usage: single_node.sh NPROC [overrides...]}
shift
exec torchrun --standalone --nproc_per_node="$NPROC" -m granite_train "$@"
