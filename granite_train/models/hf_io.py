"""Load and save HF-layout checkpoints (config.json + safetensors, sharded or not).

Our parameter names are transformers' on-disk names, so loading is a key/shape check and a
copy, and `transformers.GraniteForCausalLM.from_pretrained` reads what we save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from granite_train.errors import UserError
from granite_train.models.config import GraniteConfig
from granite_train.models.expert_shards import ExpertSlices
from granite_train.models.model import GraniteForCausalLM, full_size
from granite_train.models.moe import EXPERT_KEYS, MoE, awaiting_dispatch
from granite_train.models.param_roles import restamp

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


def has_weights(path: Union[str, Path]) -> bool:
    """Whether the HF-layout directory `path` holds weight files (a checkpoint's model/ may hold
    only config.json and the tokenizer when the weights live in the ranks' shards)."""
    path = Path(path)
    return (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()


def _listing(names: List[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def checkpoint_index(path: Path, model: GraniteForCausalLM,
                     slices: Optional[ExpertSlices] = None) -> Dict[str, Path]:
    """Which file holds each of `model`'s tensors, checked against the files' headers before
    anything is read: every missing key, unexpected key and shape mismatch in one UserError.
    `slices`: the expert stacks are in those instead (an expert-parallel checkpoint's experts/)."""
    cfg = model.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong: List[str] = []
    unexpected: List[str] = []
    tolerated = set()
    if slices is not None:
        for key in slices.keys:
            if key not in expected:
                unexpected.append(f"{key} (in {slices.directory.name}/)")
            elif slices.shape(key) != expected[key]:
                wrong.append(f"{key} (slices {list(slices.shape(key))} vs model {list(expected[key])})")
            expected.pop(key, None)
            tolerated.add(key)  # a consolidated copy beside them (checkpoint_hf_weights=always)
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tolerated.add("lm_head.weight")  # some tied checkpoints store the copy anyway
    where: Dict[str, Path] = {}
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in expected or key in tolerated:
                        where[key] = file
                        shape = tuple(f.get_slice(key).get_shape())
                        if key in expected and shape != expected[key]:
                            wrong.append(f"{key} (file {list(shape)} vs model {list(expected[key])})")
                    elif not key.endswith("rotary_emb.inv_freq"):
                        unexpected.append(key)  # old checkpoints stored inv_freq: harmless
        except SafetensorError as e:
            raise UserError(f"{file} is not a readable safetensors file ({e}); re-copy the checkpoint") from None
    missing = sorted(set(expected) - set(where))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(sorted(unexpected))}")
        if wrong:
            parts.append(f"wrong shapes: {_listing(sorted(wrong))}")
        raise UserError(f"{path} does not match its config.json: {'; '.join(parts)}; "
                        "use a checkpoint written for this config (or fix config.json)")
    return where


class TensorReader:
    """`read(key)`: one checkpoint tensor, freshly allocated in `dtype` (safetensors' buffers are
    not 64-byte aligned, which sends CPU matmuls down other, differently rounded, kernels)."""

    def __init__(self, opened: Dict[Path, object], where: Dict[str, Path], dtype: Optional[torch.dtype],
                 experts: Optional[range] = None, slices: Optional[ExpertSlices] = None) -> None:
        self._opened, self._where, self._dtype, self._experts = opened, where, dtype, experts
        self._slices = slices

    def __contains__(self, key: str) -> bool:
        return key in self._where or (self._slices is not None and key in self._slices)

    def __call__(self, key: str) -> torch.Tensor:
        if self._slices is not None and key in self._slices:
            return self._slices.read(key, self._experts, self._dtype)
        f = self._opened[self._where[key]]
        if self._experts is not None and key.endswith(EXPERT_KEYS):  # only this rank's experts are read
            t = f.get_slice(key)[self._experts.start:self._experts.stop]
        else:
            t = f.get_tensor(key)
        return t.to(self._dtype or t.dtype, copy=True)


@contextlib.contextmanager
def read_tensors(path: Union[str, Path], cfg: GraniteConfig, dtype: Optional[torch.dtype] = torch.float32,
                 experts: Optional[range] = None, expert_dir: Optional[Path] = None) -> Iterator[TensorReader]:
    """A reader of the checkpoint at `path`, checked first against a model of `cfg` (missing or
    unexpected keys, shapes: one UserError); `dtype=None` keeps each tensor's saved dtype;
    `experts`: MoE expert stacks are read as that slice (an expert-parallel rank's).
    `expert_dir`: the expert stacks are read from the slices there instead (an expert-parallel
    checkpoint's experts/, models/expert_shards.py)."""
    slices = ExpertSlices(expert_dir) if expert_dir is not None else None
    with torch.device("meta"):
        where = checkpoint_index(Path(path), GraniteForCausalLM(cfg), slices)
    with contextlib.ExitStack() as files:
        opened = {f: files.enter_context(safe_open(str(f), framework="pt")) for f in sorted(set(where.values()))}
        yield TensorReader(opened, where, dtype, experts, slices)


def weight_groups(model: GraniteForCausalLM) -> List[Tuple[str, nn.Module]]:
    """(prefix, module) pieces that together hold every weight once: the embedding, each
    decoder layer, the final norm, an untied lm_head. A load fills one piece at a time."""
    groups: List[Tuple[str, nn.Module]] = []
    for name, child in model.model.named_children():
        if isinstance(child, nn.ModuleList):
            groups += [(f"model.{name}.{i}", layer) for i, layer in enumerate(child)]
        else:
            groups.append((f"model.{name}", child))
    if not model.config.tie_word_embeddings:
        groups.append(("lm_head", model.lm_head))
    return groups


def load_model(path: Union[str, Path], dtype: torch.dtype = torch.float32, attn_backend: str = "auto",
               activation_checkpointing: bool = False, mamba_backend: str = "auto",
               partition: Optional[Callable[[nn.Module], None]] = None,
               experts: Optional[range] = None) -> GraniteForCausalLM:
    """Load an HF-layout Granite checkpoint onto the CPU in `dtype`, one piece (`weight_groups`:
    a layer, the embedding, ...) at a time; peak memory: the model + one tensor.

    `partition(piece)`, when given, is called on each piece once its weights are in, before the
    next is read (ZeRO-3 shards it there: a rank then never holds more than its shard plus one
    layer). `experts`: every MoE layer holds and reads only that slice of its experts (an
    expert-parallel rank's; `parallelize` gives the layers their dispatcher). Every missing key,
    unexpected key and shape mismatch is reported in one UserError.
    """
    path = Path(path)
    cfg = read_config(path)
    # Build on the meta device: no time spent initialising weights that are overwritten next.
    with torch.device("meta"):
        model = GraniteForCausalLM(cfg, attn_backend=attn_backend,
                                   activation_checkpointing=activation_checkpointing,
                                   mamba_backend=mamba_backend)
    if experts is not None:
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.keep_experts(experts, awaiting_dispatch)
    with read_tensors(path, cfg, dtype, experts) as read:
        if cfg.tie_word_embeddings and "lm_head.weight" in read:
            if not torch.equal(read("lm_head.weight"), read("model.embed_tokens.weight")):
                raise UserError(f"{path}: config.json says tie_word_embeddings=true but lm_head.weight differs "
                                "from the embeddings; set tie_word_embeddings=false in config.json")
        for prefix, piece in weight_groups(model):
            names = [k for k in piece.state_dict()]
            piece.load_state_dict({k: read(f"{prefix}.{k}") for k in names}, strict=True, assign=True)
            if partition is not None:
                partition(piece)
    model.tie_weights()  # assign=True replaced the shared Parameter; share it again
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a weight outside every piece of `weight_groups`
        raise RuntimeError(f"load_model left {', '.join(left[:4])} unloaded")
    log.info("loaded %s: %s, %d layers, %.1fM parameters", path, cfg.model_type,
             cfg.num_hidden_layers, full_size(cfg)[0] / 1e6)
    return model


def group_keys(cfg: GraniteConfig) -> List[List[str]]:
    """The full state-dict keys of each `weight_groups` piece of a model of `cfg`, in order (a
    reader that streams a checkpoint piece by piece; counted on the meta device)."""
    with torch.device("meta"):
        model = GraniteForCausalLM(cfg)
    return [[f"{prefix}.{k}" for k in piece.state_dict()] for prefix, piece in weight_groups(model)]


def checkpoint_pieces(path: Union[str, Path], cfg: GraniteConfig,
                      expert_dir: Optional[Path] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """The weights of the HF-layout checkpoint at `path` one piece (a layer, ...) at a time, in
    the dtype they were saved in (checked against `cfg` first): a copy that never holds the
    whole model. `expert_dir`: the expert stacks from those slices (one layer's at a time)."""
    with read_tensors(path, cfg, dtype=None, expert_dir=expert_dir) as read:
        for keys in group_keys(cfg):
            yield {k: read(k) for k in keys if k in read}


def save_config(cfg: GraniteConfig, path: Union[str, Path], dtype: torch.dtype) -> None:
    """config.json alone (a checkpoint whose weights live in the ranks' shards)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    _write_config(cfg, Path(path), dtype)


def _write_config(cfg: GraniteConfig, path: Path, dtype: Optional[torch.dtype]) -> str:
    d = cfg.to_hf_dict()
    d["architectures"] = [_ARCHITECTURES[cfg.model_type]]
    d["dtype"] = d["torch_dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    (path / "config.json").write_text(json.dumps(dict(sorted(d.items())), indent=2) + "\n")
    return d["dtype"]


def init_model(cfg: GraniteConfig, partition: Optional[Callable[[nn.Module], None]] = None,
               dtype: torch.dtype = torch.float32,
               mup_width: Optional[float] = None, device: Union[str, torch.device] = "cpu", attn_backend: str = "auto",
               activation_checkpointing: bool = False, mamba_backend: str = "auto") -> GraniteForCausalLM:
    """A random init on `device`, drawn one piece (`weight_groups`) at a time, each handed to
    `partition` when given (ZeRO-3 shards it) before the next is allocated: no rank then holds
    the whole model. It draws exactly what `GraniteForCausalLM(cfg).reset_parameters()` draws,
    in the same order (with `mup_width`: muP's init, drawn once), so the same seed gives the
    same model whether it is sharded or not."""
    with torch.device("meta"):
        model = GraniteForCausalLM(cfg, attn_backend=attn_backend, activation_checkpointing=activation_checkpointing,
                                   mamba_backend=mamba_backend)
    model.mup_width = mup_width
    pieces = weight_groups(model)
    tied_piece = None
    for prefix, piece in pieces:
        piece.to_empty(device=device)
        restamp(piece)
        model.tie_weights()  # to_empty gave the embedding a new Parameter: share it again
        model.reset_parameters(piece.modules())
        if cfg.tie_word_embeddings and prefix == "model.embed_tokens":
            tied_piece = piece  # the whole-model pass draws it again last, as lm_head: wait for that
            continue
        _done(piece.to(dtype), partition)
    if tied_piece is not None:
        model.reset_parameters([model.lm_head])
        _done(tied_piece.to(dtype), partition)
    model.tie_weights()
    return model


def _done(piece: nn.Module, partition: Optional[Callable[[nn.Module], None]]) -> None:
    if partition is not None:
        partition(piece)


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
    save_pieces(model.config, [model.state_dict()], path, max_shard_size)


def save_pieces(cfg: GraniteConfig, pieces: Iterable[Dict[str, torch.Tensor]], path: Union[str, Path],
                max_shard_size: Union[int, str] = "5GB", write: bool = True,
                published_as: Optional[Path] = None) -> None:
    """`save_model` from the model's state in pieces (full names; e.g. one layer at a time, as
    a ZeRO-3 engine gathers them): each shard is written as soon as it is full, so the writer
    holds at most one shard plus one piece. Every rank may iterate (a gather is collective);
    only `write=True` writes. `published_as`: the name the log line gives (`path` is a staging
    directory renamed to it afterwards)."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    tmp = None
    if write:
        path.mkdir(parents=True, exist_ok=True)
        # Everything goes into a temporary folder next to `path` first: a save that fails
        # half-way (disk full, killed) leaves the previous checkpoint in `path` intact.
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        names: List[List[str]] = []  # keys of each written shard
        shard: Dict[str, torch.Tensor] = {}
        shard_bytes = total = 0
        dtype = None

        def flush() -> None:
            if tmp is not None:
                save_file(shard, str(tmp / f"shard-{len(names):05d}.safetensors"), metadata={"format": "pt"})
            names.append(list(shard))
            shard.clear()

        for piece in pieces:
            for key, t in piece.items():
                if cfg.tie_word_embeddings and key == "lm_head.weight":
                    continue  # transformers re-ties it on load
                if not write:
                    continue
                t = t.detach().to("cpu").contiguous()
                dtype = dtype or t.dtype
                nbytes = t.numel() * t.element_size()
                if shard and shard_bytes + nbytes > limit:
                    flush()
                    shard_bytes = 0
                shard[key] = t
                shard_bytes += nbytes
                total += nbytes
        if not write:
            return
        flush()
        if len(names) == 1:
            os.replace(tmp / "shard-00000.safetensors", tmp / SINGLE_FILE)
        else:
            weight_map = {}
            for i, keys in enumerate(names):
                name = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
                os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / name)
                weight_map.update({k: name for k in keys})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        dtype_name = _write_config(cfg, tmp, dtype)
        # Stale weights from an earlier save would make the directory ambiguous.
        for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
            old.unlink(missing_ok=True)
        mode = _new_file_mode()
        for new in tmp.iterdir():
            os.chmod(new, mode)  # safetensors writes 0600: unreadable to a serving account
            os.replace(new, path / new.name)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s (%d file(s), %s)", published_as or path, len(names), dtype_name)
