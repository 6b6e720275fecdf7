"""JSON-lines checking before `datasets` sees the files.

`datasets`' JSON loader stops at the first bad line with an Arrow error that names neither the
file nor the line. A line-by-line pass with `json.loads` is cheap next to tokenization and lets
us say "file:line", or skip the bad lines (data.skip_bad_rows) by loading from a generator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from granite_train.errors import UserError


@dataclass
class LineScan:
    rows: int = 0
    bad: List[Tuple[Path, int, str]] = field(default_factory=list)  # (file, 1-based line, reason)


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _parse_line(raw: bytes) -> Tuple[Any, str]:
    """(row, "") or (None, reason)."""
    try:
        row = json.loads(raw)
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as e:
        return None, e.msg
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object"
    return row, ""


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from None


def scan_json_files(files: Sequence[Path]) -> LineScan:
    """Count good rows and list bad lines of JSON-lines files (JSON-array files: parse check)."""
    scan = LineScan()
    for path in files:
        if path.suffix == ".json" and _is_json_array(path):
            try:
                rows = json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                line = getattr(e, "lineno", 1)
                raise UserError(f"{path}:{line}: malformed JSON ({getattr(e, 'msg', e)}); the file is one "
                                f"JSON array, so the bad row cannot be skipped: fix it") from None
            scan.rows += len(rows) if isinstance(rows, list) else 0
            continue
        with _open(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                row, reason = _parse_line(raw)
                if row is None:
                    scan.bad.append((path, lineno, reason))
                else:
                    scan.rows += 1
    return scan


def raise_on_bad_lines(scan: LineScan) -> None:
    if scan.bad:
        path, line, reason = scan.bad[0]
        more = f" ({len(scan.bad)} malformed lines in all)" if len(scan.bad) > 1 else ""
        raise UserError(f"{path}:{line}: malformed JSON line ({reason}){more}; fix it or set "
                        f"data.skip_bad_rows=true")


def good_rows(files: List[Tuple[str, int, float]]) -> Iterator[Dict[str, Any]]:
    """Rows of the parseable lines. `files` holds (path, size, mtime) so that `datasets`' cache
    key changes when a file does (the generator's arguments are its fingerprint)."""
    for name, _, _ in files:
        path = Path(name)
        if path.suffix == ".json" and _is_json_array(path):
            yield from json.loads(path.read_bytes())
            continue
        with path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    row, _ = _parse_line(raw)
                    if row is not None:
                        yield row
