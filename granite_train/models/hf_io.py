"""Load and save HF-layout checkpoints (config.json + safetensors, sharded or not).

Our parameter names are transformers' on-disk names, so loading is a key/shape check and a
copy, and `transformers.GraniteForCausalLM.from_pretrained` reads what we save.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from granite_train.errors import UserError
from granite_train.models.config import GraniteConfig
from granite_train.models.model import GraniteForCausalLM

log = logging.getLogger("granite_train.models")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ARCHITECTURES = {"granite": "GraniteForCausalLM", "granitemoe": "GraniteMoeForCausalLM",
                  "granitemoeshared": "GraniteMoeSharedForCausalLM",
                  "granitemoehybrid": "GraniteMoeHybridForCausalLM"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_MAX_LISTED = 8


def read_config(path: Union[str, Path]) -> GraniteConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json; point model.path at an HF-layout checkpoint directory")
    try:
        d = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file} is not valid JSON ({e}); fix or replace the file") from None
    return GraniteConfig.from_hf_dict(d)


def _weight_files(path: Path) -> List[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a safetensors index ({type(e).__name__}: {e}); "
                            "fix or replace the file") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{index} names shard(s) that do not exist: {', '.join(missing)}; "
                            "copy the complete checkpoint")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    hint = " (pytorch_model.bin is not read: convert it to safetensors)" if any(path.glob("*.bin")) else ""
    raise UserError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}; "
                    "point model.path at an HF-layout checkpoint directory")


def _listing(names: List[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def load_model(path: Union[str, Path], dtype: torch.dtype = torch.float32, attn_backend: str = "auto",
               activation_checkpointing: bool = False, mamba_backend: str = "auto") -> GraniteForCausalLM:
    """Load an HF-layout Granite checkpoint onto the CPU in `dtype`.

    Every missing key, unexpected key and shape mismatch is reported in one UserError.
    """
    path = Path(path)
    cfg = read_config(path)
    files = _weight_files(path)
    # Build on the meta device: no time spent initialising weights that are overwritten next.
    with torch.device("meta"):
        model = GraniteForCausalLM(cfg, attn_backend=attn_backend,
                                   activation_checkpointing=activation_checkpointing,
                                   mamba_backend=mamba_backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tolerated = set()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tolerated.add("lm_head.weight")  # some tied checkpoints store the copy anyway

    state: Dict[str, torch.Tensor] = {}
    unexpected: List[str] = []
    stored_head = None
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in expected:
                        # A fresh allocation per tensor (peak memory: model + one tensor):
                        # safetensors' buffers are not 64-byte aligned, which sends CPU matmuls
                        # down other (slower, differently rounded) kernel paths.
                        state[key] = f.get_tensor(key).to(dtype, copy=True)
                    elif key in tolerated:
                        stored_head = f.get_tensor(key).to(dtype)
                    elif not key.endswith("rotary_emb.inv_freq"):
                        unexpected.append(key)  # old checkpoints stored inv_freq: harmless
        except SafetensorError as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}); re-copy the checkpoint") from None
    embed = state.get("model.embed_tokens.weight")
    if stored_head is not None and embed is not None and not torch.equal(stored_head, embed):
        raise UserError(f"{path}: config.json says tie_word_embeddings=true but lm_head.weight differs "
                        "from the embeddings; set tie_word_embeddings=false in config.json")
    unexpected.sort()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(f"{k} (file {list(v.shape)} vs model {list(expected[k])})"
                   for k, v in state.items() if tuple(v.shape) != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if wrong:
            parts.append(f"wrong shapes: {_listing(wrong)}")
        raise UserError(f"{path} does not match its config.json: {'; '.join(parts)}; "
                        "use a checkpoint written for this config (or fix config.json)")

    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the shared Parameter; share it again
    log.info("loaded %s: %s, %d layers, %.1fM parameters", path, cfg.model_type,
             cfg.num_hidden_layers, model.num_parameters() / 1e6)
    return model


def _new_file_mode() -> int:
    """The mode `open()` gives a new file here (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def parse_size(size: Union[int, str]) -> int:
    """Bytes in 5GB / 500MB / 2GiB / 1000 (decimal units like transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
    if m is None:
        raise UserError(f"max_shard_size={size!r} is not a size; write e.g. 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def save_model(model: torch.nn.Module, path: Union[str, Path], max_shard_size: Union[int, str] = "5GB") -> None:
    """Write config.json + safetensors the way transformers does (index + shards when large)."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    assert isinstance(model, GraniteForCausalLM), type(model)
    cfg: GraniteConfig = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]  # transformers re-ties it on load
    dtype = state["model.embed_tokens.weight"].dtype

    limit = parse_size(max_shard_size)
    shards: List[Dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = t
        shard_bytes += nbytes

    # Write everything into a temporary folder next to `path` first: a save that fails half-way
    # (disk full, killed) leaves the previous checkpoint in `path` intact.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=metadata)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        d = cfg.to_hf_dict()
        d["architectures"] = [_ARCHITECTURES[cfg.model_type]]
        d["dtype"] = d["torch_dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(dict(sorted(d.items())), indent=2) + "\n")
        # Stale weights from an earlier save would make the directory ambiguous.
        for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
            old.unlink(missing_ok=True)
        mode = _new_file_mode()
        for new in tmp.iterdir():
            os.chmod(new, mode)  # safetensors writes 0600: unreadable to a serving account
            os.replace(new, path / new.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s (%d file(s), %s)", path, len(shards), d["dtype"])
