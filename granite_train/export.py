"""`python -m granite_train.export <checkpoint> <out_dir> [--merge]`: a training checkpoint -> HF layout.

`<checkpoint>` is a `checkpoints/step_<N>` directory, a `checkpoints/` directory or a run's
output directory (the latest complete checkpoint is taken). The result is config.json +
safetensors shards (+ the tokenizer files) that transformers and vLLM load.

It runs on any machine, without the training ranks, and streams: one piece of the model (a
layer, the embedding, ...) is read, written into the current shard and dropped, so the export
holds at most one shard plus one piece, never the whole model. The weights come from the
checkpoint's `model/` when it holds them (plain data parallel, expert parallelism: with the
experts from each rank's slice in `experts/`, one layer's at a time;
`trainer.checkpoint_hf_weights=always`), else from the ranks' DeepSpeed ZeRO shards
(`parallel/zero_checkpoint.py`). The checkpoint is verified first (its manifest), and every
weight is checked against config.json, so a damaged checkpoint fails here with one clear line
rather than in the serving stack.

Adapter runs (`adapter=lora`): their checkpoints hold the adapter, not the base. Without
`--merge` the export is the PEFT adapter directory; with `--merge` every adapter is folded
into its weight (in fp32, then the base's dtype) while the base (`base_model_name_or_path`, or
`--base`) streams through piece by piece: a full HF checkpoint. `<checkpoint>` may also be any
PEFT adapter directory, e.g. an adapter run's `final/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from granite_train.errors import UserError
from granite_train.models.hf_io import checkpoint_pieces, group_keys, has_weights, read_config, save_pieces
from granite_train.models.config import GraniteConfig
from granite_train.models.expert_shards import EXPERTS_DIR
from granite_train.models.lora import merged_state
from granite_train.models.model import GraniteForCausalLM
from granite_train.models.peft_io import ADAPTER_CONFIG, read_adapter
from granite_train.train.adapter import ADAPTER_DIR
from granite_train.train.checkpoint import STATE_FILE, checkpoints_dir, latest_checkpoint, verified

log = logging.getLogger("granite_train.export")


def _zero_pieces(ckpt: Path, cfg: GraniteConfig) -> Iterator[Dict[str, torch.Tensor]]:
    """The weights of the ranks' ZeRO shards, piece by piece, checked against `cfg` first."""
    from granite_train.compat import import_deepspeed
    from granite_train.parallel.engine import DS_STATE_DIR
    from granite_train.parallel.zero_checkpoint import ZeroWeights

    import_deepspeed(torch.device("cpu"))  # its optimizer files name three of its classes
    state = ckpt / DS_STATE_DIR / "state"
    if not state.is_dir():
        raise UserError(f"{ckpt} holds neither weights in model/ nor DeepSpeed shards in {state}; "
                        f"the checkpoint is incomplete")
    weights = ZeroWeights(state)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GraniteForCausalLM(cfg).state_dict().items()}
    missing = [k for k in expected if k not in weights]
    wrong = [f"{k} ({list(weights.shapes[k])} vs {list(s)})" for k, s in expected.items()
             if k in weights and weights.shapes[k] != s]
    unexpected = sorted(set(weights.shapes) - set(expected))
    if missing or wrong or unexpected:
        raise UserError(f"{state} does not match {ckpt / 'model' / 'config.json'}: missing {missing[:4]}, wrong shapes "
                        f"{wrong[:4]}, unexpected {unexpected[:4]}; the checkpoint is damaged or mixed")
    log.info("exporting from the DeepSpeed ZeRO%s shards of %d rank(s) (%s)",
             "-3" if weights.stage == 3 else " 0-2", weights.world, str(weights.dtype).removeprefix("torch."))
    for keys in group_keys(cfg):
        yield {k: weights(k) for k in keys}


def _check_fits(piece: Dict[str, torch.Tensor], adapters: Dict[str, torch.Tensor],
                full_rank: Dict[str, torch.Tensor], r: int, adapter_dir: Path, base: Path) -> None:
    """Every factor and full-rank tensor that lands in `piece` against its weight's shape."""
    wrong = []
    for key, A in adapters.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        w = piece.get(f"{module}.weight")
        if w is None:
            continue
        B = adapters[f"{module}.lora_B.weight"]
        want_A, want_B = (*w.shape[:-2], r, w.shape[-1]), (*w.shape[:-1], r)
        if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
            wrong.append(f"{module} (A {list(A.shape)}, B {list(B.shape)} vs weight {list(w.shape)})")
    wrong += [f"{k} ({list(t.shape)} vs {list(piece[k].shape)})" for k, t in full_rank.items()
              if k in piece and t.shape != piece[k].shape]
    if wrong:
        raise UserError(f"{adapter_dir} does not fit the base {base}: {', '.join(wrong[:3])}; merge it onto the "
                        f"model it was trained on (--base)")


def _merged_pieces(adapter_dir: Path, base: Path, cfg: GraniteConfig) -> Iterator[Dict[str, torch.Tensor]]:
    """The base checkpoint's pieces with the adapter of `adapter_dir` folded in."""
    experts = cfg.num_local_experts or 0
    spec, _, adapters, full_rank = read_adapter(adapter_dir, cfg, experts)
    log.info("merging LoRA r=%d alpha=%g (%d factors%s) into %s", spec.r, spec.alpha, len(adapters),
             f", full-rank {', '.join(full_rank)}" if full_rank else "", base)
    used = set()
    for piece in checkpoint_pieces(base, cfg):
        _check_fits(piece, adapters, full_rank, spec.r, adapter_dir, base)
        merged = merged_state(piece, adapters, spec.scaling)
        for key, t in full_rank.items():
            if key in merged:
                merged[key] = t.to(piece[key].dtype)
        used |= {k for k in adapters if k.rsplit(".", 2)[0] + ".weight" in piece} | (set(full_rank) & set(piece))
        yield merged
    left = sorted((set(adapters) | set(full_rank)) - used)
    if left:
        raise UserError(f"{adapter_dir}: {len(left)} adapter tensors match no weight of {base} ({left[0]}, ...); "
                        f"the adapter was trained on another model")


def _adapter_base(adapter_dir: Path, base: Optional[Path]) -> Path:
    if base is not None:
        return base
    saved = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not saved:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG} names no base model (the run trained a random init, "
                        f"model.arch); pass --base <HF-layout checkpoint> to merge onto one")
    if not Path(saved).is_dir():
        raise UserError(f"the adapter's base model {saved} is not a local directory here; pass --base <HF-layout "
                        f"checkpoint of that model>")
    return Path(saved)


# What travels with exported weights besides config.json: the tokenizer, its chat template,
# generation defaults (never another copy of weights).
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template",
                    "generation_config")


def _copy_tokenizer(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.name.startswith(_TOKENIZER_FILES):
            shutil.copy2(f, out / f.name)


def export_adapter(adapter_dir: Path, out: Path, merge: bool, base: Optional[Path], max_shard_size: str,
                   tokenizer_dir: Optional[Path] = None, trained_on: Optional[Path] = None) -> None:
    """A PEFT adapter directory -> the same (copied), or merged into its base (full HF layout).
    `tokenizer_dir`: the tokenizer the run trained with (it wins over the base's);
    `trained_on`: the config.json directory of the model the adapter was trained on."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new output directory")
    if not merge:
        shutil.copytree(adapter_dir, out, dirs_exist_ok=True)
        if tokenizer_dir is not None:
            _copy_tokenizer(tokenizer_dir, out)
        return
    base = _adapter_base(adapter_dir, base)
    cfg = read_config(base)
    if trained_on is not None:
        trained = read_config(trained_on).to_hf_dict()
        diff = sorted(k for k in set(trained) | set(cfg.to_hf_dict()) if trained.get(k) != cfg.to_hf_dict().get(k))
        if diff:
            raise UserError(f"the base {base} is not the model the adapter was trained on ({trained_on / 'config.json'} "
                            f"differs in {', '.join(diff[:6])}); pass --base <that model>")
    save_pieces(cfg, _merged_pieces(adapter_dir, base, cfg), out, max_shard_size)
    _copy_tokenizer(base, out)
    _copy_tokenizer(adapter_dir, out)  # an adapter run's final/ carries the run's tokenizer
    if tokenizer_dir is not None:
        _copy_tokenizer(tokenizer_dir, out)


def export(checkpoint: Path, out: Path, max_shard_size: str = "5GB", merge: bool = False,
           base: Optional[Path] = None) -> Path:
    if (checkpoint / ADAPTER_CONFIG).is_file():  # a PEFT adapter directory (an adapter run's final/)
        export_adapter(checkpoint, out, merge, base, max_shard_size)
        return checkpoint
    ckpt = checkpoint
    if not (ckpt / STATE_FILE).is_file():
        ckpt = latest_checkpoint(checkpoint) or latest_checkpoint(checkpoints_dir(checkpoint))
        if ckpt is None:
            raise UserError(f"{checkpoint} is not a checkpoint and holds none; pass "
                            f"<output_dir>/checkpoints/step_<N> (or the run's output_dir)")
    verified(ckpt)  # a damaged checkpoint fails here, naming the file
    if (ckpt / ADAPTER_DIR / ADAPTER_CONFIG).is_file():  # an adapter run: the adapter, or merged
        if base is None and (ckpt / "model" / "config.json").is_file():
            saved = json.loads((ckpt / ADAPTER_DIR / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            base = Path(saved) if saved else None
        export_adapter(ckpt / ADAPTER_DIR, out, merge, base, max_shard_size, tokenizer_dir=ckpt / "model",
                       trained_on=ckpt / "model")
        return ckpt
    if merge:
        raise UserError(f"{ckpt} holds no adapter (a full fine-tuning checkpoint): export it without --merge")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new output directory")
    model_dir = ckpt / "model"
    cfg = read_config(model_dir)
    experts = ckpt / EXPERTS_DIR  # expert parallelism: each rank's slice of the experts
    pieces = (checkpoint_pieces(model_dir, cfg, experts if experts.is_dir() else None) if has_weights(model_dir)
              else _zero_pieces(ckpt, cfg))
    save_pieces(cfg, pieces, out, max_shard_size)
    # Tokenizer and chat template files travel with the weights (everything but the weights).
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    return ckpt


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m granite_train.export",
                                     description="Write a training checkpoint in Hugging Face layout.")
    parser.add_argument("checkpoint", type=Path, help="checkpoints/step_<N>, checkpoints/ or a run's output_dir")
    parser.add_argument("out", type=Path, help="new directory for config.json + safetensors + tokenizer")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--merge", action="store_true",
                        help="adapter runs: fold the LoRA adapter into its base and write the full model")
    parser.add_argument("--base", type=Path, default=None,
                        help="with --merge: the base model (default: the adapter's base_model_name_or_path)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ckpt = export(args.checkpoint, args.out, args.max_shard_size, merge=args.merge, base=args.base)
    except UserError as exc:
        print(f"granite-train: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
