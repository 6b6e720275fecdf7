"""Raw rows -> chat messages or text: which columns to read, and what makes a row bad."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from granite_train.config import DataConfig
from granite_train.errors import UserError

Message = Dict[str, str]

# ShareGPT-style rows use from/value and these speaker names.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class BadRow(Exception):
    """A row that cannot become an example. Its text reads after "row N of SOURCE ...", and
    names the fix."""


@dataclass(frozen=True)
class RowFormat:
    """Where a row's content lives: `kind` is messages | columns | text."""

    kind: str
    field: str = ""  # the messages or text column
    system: Optional[str] = None
    user: Optional[str] = None
    assistant: Optional[str] = None


def resolve_row_format(cfg: DataConfig, columns: Optional[Sequence[str]], source: str) -> RowFormat:
    """Pick the row layout from the config and the dataset's columns (None: unknown, e.g. a
    stream whose first row has not been read)."""
    known = set(columns) if columns is not None else None
    listing = f" (its columns: {', '.join(columns)})" if columns is not None else ""
    if cfg.format == "text":
        if known is not None and cfg.text_field not in known:
            raise UserError(f"row 0 of {source} has no '{cfg.text_field}' field{listing}; "
                            f"set data.text_field=<column>")
        return RowFormat("text", field=cfg.text_field)
    cols = cfg.columns
    if cols.user is not None or cols.assistant is not None:
        if cols.user is None or cols.assistant is None:
            raise UserError("data.columns.user and data.columns.assistant must be set together "
                            "(data.columns.system is optional)")
        for key in ("system", "user", "assistant"):
            name = getattr(cols, key)
            if name is not None and known is not None and name not in known:
                raise UserError(f"data.columns.{key}={name!r} is not a column of {source}{listing}; "
                                f"fix data.columns.{key}")
        return RowFormat("columns", system=cols.system, user=cols.user, assistant=cols.assistant)
    if known is not None and cfg.messages_field not in known:
        raise UserError(f"row 0 of {source} has no '{cfg.messages_field}' field{listing}; set "
                        f"data.messages_field=<column> or data.columns.user/assistant (data.format=text "
                        f"for plain documents)")
    return RowFormat("messages", field=cfg.messages_field)


def _message(item: Any, field: str) -> Message:
    if not isinstance(item, dict) and not isinstance(item, Mapping):  # dict first: the common, fast case
        raise BadRow(f"has a '{field}' entry that is not an object with role and content")
    role = item.get("role", item.get("from"))
    content = item.get("content", item.get("value"))
    if not isinstance(role, str) or not role:
        raise BadRow(f"has a '{field}' entry without a role; each message needs 'role' and 'content'")
    if not isinstance(content, str):
        raise BadRow(f"has a {role!r} message whose content is not a string")
    role = ROLE_ALIASES.get(role, role)
    return {"role": role, "content": content}


def row_messages(row: Mapping[str, Any], fmt: RowFormat) -> List[Message]:
    """The chat messages of one row (raises BadRow)."""
    if fmt.kind == "messages":
        raw = row.get(fmt.field)
        if raw is None:
            raise BadRow(f"has no '{fmt.field}' field; set data.messages_field=... or data.columns.*")
        if not isinstance(raw, list) and (isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence)) \
                or len(raw) == 0:
            raise BadRow(f"has a '{fmt.field}' field that is not a non-empty list of messages")
        return [_message(m, fmt.field) for m in raw]
    messages: List[Message] = []
    for role, column in (("system", fmt.system), ("user", fmt.user), ("assistant", fmt.assistant)):
        if column is None:
            continue
        value = row.get(column)
        if role == "system" and (value is None or value == ""):
            continue
        if not isinstance(value, str):
            raise BadRow(f"has no text in column '{column}' (data.columns.{role})")
        messages.append({"role": role, "content": value})
    return messages


def row_text(row: Mapping[str, Any], fmt: RowFormat) -> str:
    value = row.get(fmt.field)
    if value is None:
        raise BadRow(f"has no '{fmt.field}' field; set data.text_field=...")
    if not isinstance(value, str):
        raise BadRow(f"has a '{fmt.field}' field that is not a string")
    return value
