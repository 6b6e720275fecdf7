"""data.path -> a `datasets` Dataset (or IterableDataset when data.streaming).

Accepted: local .jsonl/.json/.parquet/.csv files, a directory or glob of them, a directory
written by `Dataset.save_to_disk`, a hub dataset name (needs network), or a demo data set
(`demo:chitchat`, `demo:shakespeare`; granite_train/data/demo.py). Plain .txt files are text
(data.format=text or auto), one example per file or per paragraph (data.txt_sample_by).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import datasets

from granite_train.config import DataConfig
from granite_train.data.demo import load_demo
from granite_train.data.jsonlines import good_rows, raise_on_bad_lines, scan_json_files
from granite_train.errors import UserError

AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
KINDS = ".jsonl/.json/.parquet/.csv/.txt"
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class Source:
    dataset: AnyDataset
    name: str  # how errors name it: the path or hub id the user wrote
    malformed_lines: int = 0  # skipped JSON lines (data.skip_bad_rows)
    plain_text: bool = False  # .txt files: one 'text' column, read as data.format=text


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist is a missing path.
    parent = Path(path).expanduser().parent
    return (path.startswith(("/", ".", "~")) or Path(path).suffix in BUILDERS
            or path.count("/") > 1 or "\\" in path or (str(parent) != "." and parent.is_dir()))


def _data_files(path: str) -> Optional[Union[List[Path], Path]]:
    """Files to load, a saved-dataset directory, or None for a hub name."""
    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / m).is_file() for m in _SAVED_MARKERS):
            return p
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in BUILDERS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise UserError(f"data.path={path} contains no {KINDS} files "
                            f"(nor a save_to_disk dataset); point it at your data")
        return files
    if p.is_file():
        if p.suffix not in BUILDERS:
            raise UserError(f"data.path={path}: unsupported file type {p.suffix!r}; use .jsonl, .json, "
                            f".parquet, .csv or .txt")
        return [p]
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True)
                       if Path(f).is_file() and Path(f).suffix in BUILDERS)
        if not files:
            raise UserError(f"data.path={path} matches no {KINDS} files; fix the pattern")
        return files
    if _looks_local(path):
        raise UserError(f"data.path={path} does not exist; fix the path (local files, a directory, "
                        f"a glob, a hub dataset name or demo:chitchat)")
    return None


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _check_readable(files: List[Path]) -> None:
    for f in files:
        try:
            with f.open("rb"):
                pass
        except OSError as e:
            raise UserError(f"cannot read {f}: {e.strerror}; check the path and its permissions") from None


def _load_files(files: List[Path], cfg: DataConfig, name: str) -> Source:
    kinds = {BUILDERS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise UserError(f"data.path={name} mixes file types ({', '.join(sorted(kinds))}); "
                        f"point it at one kind of file (e.g. a glob such as <dir>/*.jsonl)")
    builder = kinds.pop()
    if builder == "text":
        return _load_txt(files, cfg, name)
    malformed = 0
    if builder == "json":
        scan = scan_json_files(files)
        if scan.bad and not cfg.skip_bad_rows:
            raise_on_bad_lines(scan)
        if scan.rows == 0:
            raise UserError(f"data.path={name} has no rows; point it at a non-empty dataset")
        malformed = len(scan.bad)
        if scan.bad:  # load only the good lines, from a generator
            stamps = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime) for f in files]
            cls = datasets.IterableDataset if cfg.streaming else datasets.Dataset
            try:
                ds = cls.from_generator(good_rows, gen_kwargs={"files": stamps})
            except Exception as e:
                raise UserError(f"could not load data.path={name}: {_short(e)}; the rows' fields must "
                                f"have one type across the file") from None
            return Source(ds, name, malformed)
    _check_readable(files)
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                   streaming=cfg.streaming)
    except Exception as e:
        if "corresponds to no data" in str(e):  # datasets' words for an empty split
            raise UserError(f"data.path={name} has no rows; point it at a non-empty dataset") from None
        raise UserError(f"could not read data.path={name} as {builder}: {_short(e)}; check the files "
                        f"(all rows need the same fields and types)") from None
    return Source(ds, name, malformed)


def _load_txt(files: List[Path], cfg: DataConfig, name: str) -> Source:
    """.txt files through datasets' text builder: one row per file or per blank-line-separated
    paragraph (its `sample_by`); a 'text' column."""
    if cfg.format not in ("text", "auto"):
        raise UserError(f"data.path={name} is plain text (.txt), which data.format={cfg.format} cannot read "
                        f"(it needs rows with fields); set data.format=text (or auto), or convert the data "
                        f"to .jsonl rows")
    _check_readable(files)
    try:
        ds = datasets.load_dataset("text", data_files=[str(f) for f in files], split="train",
                                   sample_by=cfg.txt_sample_by, streaming=cfg.streaming)
    except Exception as e:
        if "corresponds to no data" in str(e):
            raise UserError(f"data.path={name} has no rows; point it at a non-empty dataset") from None
        raise UserError(f"could not read data.path={name} as text: {_short(e)}; check the files "
                        f"(UTF-8 text)") from None
    return Source(ds, name, plain_text=True)


def _load_saved(directory: Path, cfg: DataConfig, name: str) -> Source:
    try:
        ds = datasets.load_from_disk(str(directory))
    except Exception as e:
        raise UserError(f"could not load the saved dataset at data.path={name}: {_short(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise UserError(f"data.path={name} has splits {', '.join(ds)}, not data.split={cfg.split!r}; "
                            f"set data.split")
        ds = ds[cfg.split]
    return Source(ds.to_iterable_dataset() if cfg.streaming else ds, name)


def _load_hub(name: str, cfg: DataConfig) -> Source:
    try:
        ds = datasets.load_dataset(name, split=cfg.split, streaming=cfg.streaming)
    except Exception as e:
        raise UserError(f"could not load data.path={name} from the Hugging Face hub ({_short(e)}); "
                        f"check the name, data.split and the network, or point data.path at local "
                        f"files") from None
    return Source(ds, name)


def load_source(cfg: DataConfig) -> Source:
    """The raw rows named by data.path (not yet tokenized)."""
    path = cfg.path.strip()
    if not path:
        raise UserError("data.path is empty; set it to your data (or demo:chitchat)")
    if path.startswith("demo:"):
        source = Source(load_demo(path[len("demo:"):], cfg.streaming), path)
    else:
        found = _data_files(path)
        if found is None:
            source = _load_hub(path, cfg)
        elif isinstance(found, Path):
            source = _load_saved(found, cfg, path)
        else:
            source = _load_files(found, cfg, path)
    if isinstance(source.dataset, datasets.Dataset) and len(source.dataset) == 0:
        raise UserError(f"data.path={path} has no rows; point it at a non-empty dataset")
    return source
