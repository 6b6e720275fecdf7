"""Prepared data: documents tokenized once into memory-mapped token shards plus a manifest.

A directory written by `python -m granite_train.prepare`:
    manifest.json          what was prepared and how: tokenizer fingerprint, settings, counts, shards
    tokens-00000.bin       token ids of whole documents, back to back (uint16, or uint32 for vocabularies
                           over 65536 ids)
    lengths-00000.npy      int32 tokens per document
    trained-00000.npy      int32 trained tokens per document (labels that count, first token excluded)
    mask-00000.bin         uint8 per token, 1 = trained (only when some token is not: chat, prompt_completion)

Training reads it with no tokenization: the lengths make the plan, and each rank memory-maps the
shards and reads only its own micro-batches' tokens. Shards are cut at document boundaries.
Nothing in the directory runs code (JSON, .npy read with allow_pickle=False, raw arrays).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tokenizers

from granite_train.config import DataConfig
from granite_train.data.docs import Example, ranges
from granite_train.data.encode import IGNORE, Encoder, overlong_policy
from granite_train.data.rows import RowFormat
from granite_train.data.stats import PrepStats, Status
from granite_train.data.tokenizer import Tokenizer
from granite_train.errors import UserError

log = logging.getLogger("granite_train.data")
MANIFEST = "manifest.json"
KIND = "granite_train.prepared"
VERSION = 1
SHARD_TOKENS = 1 << 28  # 268M tokens (512 MiB of uint16) per shard by default
_BATCH_ROWS = 8192


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of what decides token ids (`Tokenizer.ids_fingerprint`): a prepared directory
    records it, and a run with another tokenizer is refused."""
    return tokenizer.ids_fingerprint()


def is_prepared(path: str) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def _format_class(kind: str) -> str:
    """The data.format a row kind belongs to."""
    return kind if kind in ("text", "prompt_completion") else "chat"


def settings_of(cfg: DataConfig, encoder: Encoder) -> Dict[str, Any]:
    kind = encoder.row_format.kind
    return {"data.format": cfg.format, "row_kind": kind, "row_format": encoder.row_format.name,
            "train_on": cfg.train_on if kind != "text" else "all", "chat_template": cfg.chat_template,
            "overlong": encoder.overlong, "max_length": None if encoder.overlong == "split" else cfg.max_length,
            "source": encoder.source, "max_examples": cfg.max_examples, "text_field": cfg.text_field,
            "messages_field": cfg.messages_field, "txt_sample_by": cfg.txt_sample_by}


# ---------------------------------------------------------------- writing


class _ShardWriter:
    def __init__(self, tmp: Path, dtype: np.dtype, masked: bool, shard_tokens: int) -> None:
        self.tmp, self.dtype, self.masked, self.shard_tokens = tmp, dtype, masked, shard_tokens
        self.shards: List[Dict[str, Any]] = []
        self._open_shard()

    def _open_shard(self) -> None:
        k = len(self.shards)
        names = {"tokens": f"tokens-{k:05d}.bin", "lengths": f"lengths-{k:05d}.npy",
                 "trained": f"trained-{k:05d}.npy"}
        if self.masked:
            names["mask"] = f"mask-{k:05d}.bin"
        self.shards.append({**names, "documents": 0, "tokens_count": 0})
        self._tokens = open(self.tmp / names["tokens"], "wb")
        self._mask = open(self.tmp / names["mask"], "wb") if self.masked else None
        self._lengths: List[np.ndarray] = []
        self._trained: List[np.ndarray] = []

    def _close_shard(self) -> None:
        s = self.shards[-1]
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        trained = np.concatenate(self._trained) if self._trained else np.zeros(0, np.int32)
        np.save(self.tmp / s["lengths"], lengths.astype(np.int32), allow_pickle=False)
        np.save(self.tmp / s["trained"], trained.astype(np.int32), allow_pickle=False)

    def add(self, ids: np.ndarray, mask: Optional[np.ndarray], lengths: np.ndarray, trained: np.ndarray) -> None:
        """Documents back to back: ids/mask flat, lengths/trained per document."""
        ends = np.cumsum(lengths)
        done_docs, done_tokens = 0, 0
        while done_docs < lengths.size:
            s = self.shards[-1]
            room = self.shard_tokens - s["tokens_count"]
            # the documents that fit (at least one in an empty shard: a document is never cut)
            n = int(np.searchsorted(ends, done_tokens + room, side="right")) - done_docs
            if n <= 0 and s["documents"] == 0:
                n = 1
            if n <= 0:
                self._close_shard()
                self._open_shard()
                continue
            end_tokens = int(ends[done_docs + n - 1])
            self._tokens.write(ids[done_tokens:end_tokens].astype(self.dtype, copy=False).tobytes())
            if self._mask is not None:
                self._mask.write(mask[done_tokens:end_tokens].astype(np.uint8, copy=False).tobytes())
            self._lengths.append(lengths[done_docs: done_docs + n])
            self._trained.append(trained[done_docs: done_docs + n])
            s["documents"] += n
            s["tokens_count"] += end_tokens - done_tokens
            done_docs += n
            done_tokens = end_tokens

    def finish(self) -> List[Dict[str, Any]]:
        self._close_shard()
        if self.shards[-1]["documents"] == 0 and len(self.shards) > 1:
            last = self.shards.pop()
            for key in ("tokens", "lengths", "trained", "mask"):
                if key in last:
                    (self.tmp / last[key]).unlink()
        return self.shards


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


def write_prepared(tokenized: datasets.Dataset, encoder: Encoder, cfg: DataConfig, tokenizer: Tokenizer,
                   stats: PrepStats, out: Path, shard_tokens: int = SHARD_TOKENS) -> Dict[str, Any]:
    """The kept documents of `tokenized` (the Encoder's map output) as shards in `out` (written
    to a temporary sibling first and renamed: a directory with a manifest is complete)."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; remove it or choose another directory")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    masked = encoder.row_format.kind != "text"
    writer = _ShardWriter(tmp, dtype, masked, shard_tokens)
    table = tokenized.select_columns(["input_ids", "labels", "status", "length", "n_trained"])
    for batch in table.with_format("arrow").iter(batch_size=_BATCH_ROWS):
        kept = pa.array(Status.kept(batch.column("status").to_numpy()))
        batch = batch.filter(kept)
        if batch.num_rows == 0:
            continue
        ids = _flat(batch.column("input_ids")).astype(np.int64, copy=False)
        labels = _flat(batch.column("labels"))
        trained_mask = labels != IGNORE
        if not np.array_equal(labels[trained_mask], ids[trained_mask]):  # the encoder's contract
            raise RuntimeError("a trained label differs from its token; the shards cannot store it as a mask")
        writer.add(ids, trained_mask if masked else None, batch.column("length").to_numpy().astype(np.int64),
                   batch.column("n_trained").to_numpy().astype(np.int64))
    shards = writer.finish()
    manifest = {
        "kind": KIND, "version": VERSION, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "tokenizer": {"name": tokenizer.name, "sha256": tokenizer_fingerprint(tokenizer),
                      "tokenizers_version": tokenizers.__version__,
                      "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_token_id},
        "settings": settings_of(cfg, encoder), "dtype": dtype.name, "masked": masked,
        "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens_count"] for s in shards),
        "trained_tokens": stats.trained_tokens, "shards": shards, "stats": dataclasses.asdict(stats),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return manifest


# ---------------------------------------------------------------- reading


def read_manifest(path: str) -> Dict[str, Any]:
    file = Path(path).expanduser() / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file}: {e}; prepare the data again (python -m granite_train.prepare)") from None
    if manifest.get("kind") != KIND or manifest.get("version") != VERSION:
        raise UserError(f"{file} is not a granite_train prepared-data manifest of version {VERSION} "
                        f"(kind {manifest.get('kind')!r}, version {manifest.get('version')!r}); prepare the data "
                        f"again with this version (python -m granite_train.prepare)")
    return manifest


def check_settings(manifest: Dict[str, Any], cfg: DataConfig, tokenizer: Tokenizer, name: str) -> str:
    """One UserError line when the run's tokenizer or data settings differ from the ones the
    directory was prepared with; returns the overlong policy it was prepared with."""
    prepared = manifest["settings"]
    again = f"prepare {name} again with this run's settings, or train with the ones it was prepared with"
    tok = manifest["tokenizer"]
    if tok["sha256"] != tokenizer_fingerprint(tokenizer):
        versions = (f", tokenizers {tok.get('tokenizers_version', '?')} then, {tokenizers.__version__} now"
                    if tok["name"] == tokenizer.name else "")
        raise UserError(f"data.path={name} was prepared with another tokenizer ({tok['name']}, sha256 "
                        f"{tok['sha256'][:12]}) than this run's ({tokenizer.name}, sha256 "
                        f"{tokenizer_fingerprint(tokenizer)[:12]}{versions}); {again} (data.tokenizer / model.path)")
    kind = prepared["row_kind"]
    problems = []
    if cfg.format not in ("auto", prepared["data.format"], _format_class(kind)):
        problems.append(f"data.format {prepared['data.format']} ({prepared['row_format']}) -> {cfg.format}")
    if kind != "text" and cfg.train_on != prepared["train_on"]:
        problems.append(f"data.train_on {prepared['train_on']} -> {cfg.train_on}")
    if kind not in ("text", "prompt_completion") and cfg.chat_template != prepared["chat_template"]:
        problems.append(f"data.chat_template {prepared['chat_template']} -> {cfg.chat_template}")
    policy = overlong_policy(cfg.overlong, RowFormat(kind), name)
    if policy != prepared["overlong"]:
        problems.append(f"data.overlong {prepared['overlong']} -> {policy}")
    elif policy != "split" and cfg.max_length != prepared["max_length"]:
        problems.append(f"data.max_length {prepared['max_length']} (data.overlong={policy}) -> {cfg.max_length}")
    if problems:
        raise UserError(f"data.path={name} was prepared with other settings: {', '.join(problems)}; {again}")
    return policy


class ShardDocs:
    """The documents of a prepared directory, memory-mapped: reading a piece touches only its
    own bytes."""

    def __init__(self, path: str, manifest: Dict[str, Any]) -> None:
        root = Path(path).expanduser()
        self.name = path
        dtype = np.dtype(manifest["dtype"])
        self._tokens: List[np.ndarray] = []
        self._masks: List[Optional[np.ndarray]] = []
        lengths, trained, first_doc = [], [], [0]
        for s in manifest["shards"]:
            n_tokens = int(s["tokens_count"])
            lens = self._load_npy(root / s["lengths"], int(s["documents"]))
            if int(lens.sum()) != n_tokens:
                self._damaged(root / s["lengths"], f"its lengths sum to {int(lens.sum())}, not {n_tokens} tokens")
            self._tokens.append(self._map(root / s["tokens"], dtype, n_tokens))
            self._masks.append(self._map(root / s["mask"], np.dtype(np.uint8), n_tokens) if "mask" in s else None)
            lengths.append(lens)
            trained.append(self._load_npy(root / s["trained"], int(s["documents"])))
            first_doc.append(first_doc[-1] + int(s["documents"]))
        self.lengths = np.concatenate(lengths).astype(np.int64)
        self.n_trained = np.concatenate(trained).astype(np.int64)
        self._first_doc = np.asarray(first_doc, dtype=np.int64)
        # token offset of each document within its shard
        self._offsets = np.zeros(self.lengths.size, dtype=np.int64)
        for k in range(len(self._tokens)):
            a, b = self._first_doc[k], self._first_doc[k + 1]
            np.cumsum(self.lengths[a: b - 1], out=self._offsets[a + 1: b])

    def _damaged(self, file: Path, why: str) -> None:
        raise UserError(f"prepared data {self.name}: {file.name} is damaged or incomplete ({why}); "
                        f"prepare the data again (python -m granite_train.prepare)")

    def _load_npy(self, file: Path, n: int) -> np.ndarray:
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as e:
            self._damaged(file, str(e).splitlines()[0] if str(e) else type(e).__name__)
        if arr.shape != (n,):
            self._damaged(file, f"shape {arr.shape}, the manifest says {n} documents")
        return arr

    def _map(self, file: Path, dtype: np.dtype, n: int) -> np.ndarray:
        size = file.stat().st_size if file.is_file() else -1
        if size != n * dtype.itemsize:
            self._damaged(file, f"{size} bytes, the manifest says {n} tokens of {dtype.itemsize} bytes")
        if n == 0:
            return np.zeros(0, dtype=dtype)
        with open(file, "rb") as f:  # the map keeps its own handle on the file
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # Reads are random (a rank's pieces, shuffled): without this the kernel reads ahead and
        # maps ~128 KiB around every ~1 KiB piece, and resident memory grows with the corpus.
        if hasattr(mmap, "MADV_RANDOM"):
            mapped.madvise(mmap.MADV_RANDOM)
        # A plain read-only ndarray over the map, which it keeps alive (its `.base`); not
        # np.memmap, whose slices pay per-slice bookkeeping and whose map is private.
        return np.frombuffer(mapped, dtype=dtype, count=n)

    def read_flat(self, docs: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The pieces' tokens one after another (int64) and their labels (None: unmasked): one
        gather per shard, no Python loop over pieces."""
        total = int(lengths.sum())
        labels = None if self._masks[0] is None else np.empty(total, dtype=np.int64)
        if len(self._tokens) == 1:
            src = ranges(self._offsets[docs] + starts, lengths)
            tokens = self._tokens[0][src].astype(np.int64)
            if labels is not None:
                np.copyto(labels, np.where(self._masks[0][src] != 0, tokens, IGNORE))
            return tokens, labels
        tokens = np.empty(total, dtype=np.int64)
        shards = np.searchsorted(self._first_doc, docs, side="right") - 1
        before = np.cumsum(lengths) - lengths  # where each piece starts in the output
        for k in np.unique(shards).tolist():
            sel = np.flatnonzero(shards == k)
            src = ranges(self._offsets[docs[sel]] + starts[sel], lengths[sel])
            out = ranges(before[sel], lengths[sel])
            tokens[out] = self._tokens[k][src]
            if labels is not None:
                labels[out] = np.where(self._masks[k][src] != 0, tokens[out], IGNORE)
        return tokens, labels

    def read(self, docs: Sequence[int], starts: Sequence[int], lengths: Sequence[int]) -> List[Example]:
        shards = np.searchsorted(self._first_doc, np.asarray(docs, dtype=np.int64), side="right") - 1
        out = []
        for d, s, n, k in zip(docs, starts, lengths, shards.tolist()):
            a = int(self._offsets[d]) + s
            ids = np.asarray(self._tokens[k][a: a + n], dtype=np.int64)
            mask = self._masks[k]
            labels = None if mask is None else np.where(np.asarray(mask[a: a + n]) != 0, ids, IGNORE)
            out.append({"input_ids": ids, "labels": labels})
        return out


def prepared_stats(manifest: Dict[str, Any], name: str) -> PrepStats:
    """The counts of preparation (rows read, dropped, truncated) as the run's data report."""
    known = {f.name for f in dataclasses.fields(PrepStats)}
    stats = PrepStats(**{k: v for k, v in manifest.get("stats", {}).items() if k in known})
    stats.source = f"{name} (prepared)"
    stats.split = stats.pieces = 0  # set by the run's own split at its max_length
    stats.seconds = 0.0
    return stats
