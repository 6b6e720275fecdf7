"""`final/` published whole: built beside it, completed by a marker, renamed into place.

A run's `final/` is what people load into transformers and vLLM, so it is either the complete
export or absent, never half of one. Rank 0 writes the weights, the tokenizer and, last, the
marker (`export.json`: the step and tokens it holds) into `.final.partial/`, then swaps it in:
the previous `final/` is renamed aside, the new one renamed into place, the old one deleted. A
kill at any point leaves either the previous complete `final/` or none: a relaunch after the end
exports again unless `final/` holds the marker (`is_complete`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict

from granite_train.train.checkpoint import fsync_dir, fsync_tree

MARKER = "export.json"


def staging_dir(out: Path) -> Path:
    return out / ".final.partial"


def begin(out: Path) -> Path:
    """Rank 0: an empty staging directory (what a killed export left there goes)."""
    for stale in (staging_dir(out), out / ".final.old"):
        shutil.rmtree(stale, ignore_errors=True)
    return staging_dir(out)


def publish(staging: Path, final: Path, marker: Dict[str, Any]) -> None:
    """Rank 0: write the marker last, then rename `staging` into `final`'s place."""
    (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    fsync_tree(staging)
    old = final.parent / ".final.old"
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def is_complete(final: Path) -> bool:
    return (final / MARKER).is_file()
