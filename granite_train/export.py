"""`python -m granite_train.export <checkpoint> <out_dir>`: a training checkpoint -> HF layout.

`<checkpoint>` is a `checkpoints/step_<N>` directory, a `checkpoints/` directory or a run's
output directory (the latest complete checkpoint is taken). The result is config.json +
safetensors (+ the tokenizer files) that transformers and vLLM load. The weights are read and
written again through our loader, so a damaged checkpoint fails here with a clear error rather
than in the serving stack.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from granite_train.errors import UserError
from granite_train.models import load_model, save_model
from granite_train.train.checkpoint import STATE_FILE, checkpoints_dir, latest_checkpoint, verified


def export(checkpoint: Path, out: Path, max_shard_size: str = "5GB") -> Path:
    ckpt = checkpoint
    if not (ckpt / STATE_FILE).is_file():
        ckpt = latest_checkpoint(checkpoint) or latest_checkpoint(checkpoints_dir(checkpoint))
        if ckpt is None:
            raise UserError(f"{checkpoint} is not a checkpoint and holds none; pass "
                            f"<output_dir>/checkpoints/step_<N> (or the run's output_dir)")
    verified(ckpt)  # a damaged checkpoint fails here, naming the file
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new output directory")
    model = load_model(ckpt / "model")
    save_model(model, out, max_shard_size=max_shard_size)
    # Tokenizer and chat template files travel with the weights (everything but the weights).
    for f in (ckpt / "model").iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    return ckpt


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m granite_train.export",
                                     description="Write a training checkpoint in Hugging Face layout.")
    parser.add_argument("checkpoint", type=Path, help="checkpoints/step_<N>, checkpoints/ or a run's output_dir")
    parser.add_argument("out", type=Path, help="new directory for config.json + safetensors + tokenizer")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        ckpt = export(args.checkpoint, args.out, args.max_shard_size)
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
