"""Raw rows -> chat messages, prompt/completion pairs or text: which columns to read, which of
the four dataset shapes TRL documents a dataset has, and what makes a row bad."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from granite_train.config import DataConfig
from granite_train.errors import UserError

Message = Dict[str, str]

# ShareGPT-style rows use from/value and these speaker names.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
PROMPT, COMPLETION = "prompt", "completion"  # TRL's column names for prompt-completion data


class BadRow(Exception):
    """A row that cannot become an example. Its text reads after "row N of SOURCE ...", and
    names the fix."""


@dataclass(frozen=True)
class RowFormat:
    """Where a row's content lives. `kind`:
    text: one document (`field`), every token trained;
    messages: a list of chat messages (`field`);
    columns: system/user/assistant strings in columns of their own (data.columns.*);
    prompt_completion: prompt + completion strings, joined without a chat template;
    prompt_completion_chat: prompt + completion strings as a user and an assistant turn;
    conversational: prompt + completion lists of messages, completion turns trained.
    """

    kind: str
    field: str = ""  # the messages or text column
    system: Optional[str] = None
    user: Optional[str] = None
    assistant: Optional[str] = None
    roles: Tuple[str, ...] = ()  # data.roles: the roles a message may have

    @property
    def templated(self) -> bool:
        """Rendered with a chat template."""
        return self.kind not in ("text", "prompt_completion")

    @property
    def name(self) -> str:
        """The format in a word or three (the data report's)."""
        return {"text": "text", "messages": "chat", "columns": "chat columns",
                "prompt_completion": "prompt_completion", "prompt_completion_chat": "prompt_completion as chat",
                "conversational": "conversational prompt_completion"}[self.kind]

    @property
    def description(self) -> str:
        """The format as the log and the data report name it."""
        return {
            "text": f"text (column '{self.field}', every token trained)",
            "messages": f"chat (column '{self.field}', chat template)",
            "columns": f"chat (columns user={self.user}, assistant={self.assistant}"
                       + (f", system={self.system}" if self.system else "") + ", chat template)",
            "prompt_completion": "prompt_completion (strings, no chat template, loss on the completion)",
            "prompt_completion_chat": "prompt_completion (strings as a user and an assistant turn, chat template)",
            "conversational": "conversational prompt_completion (messages, chat template, loss on the completion)",
        }[self.kind]


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Chat:
    messages: List[Message]
    trained: Optional[List[bool]] = None  # per message: a target? None: the assistant turns


def _listing(columns: Optional[Sequence[str]]) -> str:
    return f" (its columns: {', '.join(columns)})" if columns is not None else ""


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _prompt_completion_kind(cfg: DataConfig, first_row: Optional[Mapping[str, Any]], source: str) -> str:
    """Strings or lists of messages, from the first row (TRL's rule)."""
    if first_row is None:
        raise UserError(f"data.path={source}: the prompt/completion shape needs its first row, which could "
                        f"not be read; check the data")
    prompt, completion = first_row.get(PROMPT), first_row.get(COMPLETION)
    if isinstance(prompt, str) and isinstance(completion, str):
        return "prompt_completion_chat" if cfg.format == "chat" else "prompt_completion"
    if _is_messages(prompt) and _is_messages(completion):
        return "conversational"
    raise UserError(f"row 0 of {source} has a '{PROMPT}' of type {type(prompt).__name__} and a '{COMPLETION}' "
                    f"of type {type(completion).__name__}; both must be strings (prompt-completion) or both "
                    f"lists of {{role, content}} messages (conversational); fix the data")


def _columns_format(cfg: DataConfig, known: Optional[set], source: str, listing: str) -> RowFormat:
    cols = cfg.columns
    if cols.user is None or cols.assistant is None:
        raise UserError("data.columns.user and data.columns.assistant must be set together "
                        "(data.columns.system is optional)")
    for key in ("system", "user", "assistant"):
        name = getattr(cols, key)
        if name is not None and known is not None and name not in known:
            raise UserError(f"data.columns.{key}={name!r} is not a column of {source}{listing}; "
                            f"fix data.columns.{key}")
    return RowFormat("columns", system=cols.system, user=cols.user, assistant=cols.assistant,
                     roles=tuple(cfg.roles))


def resolve_row_format(cfg: DataConfig, columns: Optional[Sequence[str]], source: str,
                       first_row: Optional[Mapping[str, Any]] = None, plain_text: bool = False) -> RowFormat:
    """Pick the row layout from the config and the dataset's columns (None: unknown, e.g. a
    stream whose first row has not been read). `first_row` tells prompt/completion strings from
    lists; `plain_text`: the source is .txt files (one 'text' column)."""
    known = set(columns) if columns is not None else None
    listing = _listing(columns)
    roles = tuple(cfg.roles)
    if plain_text:  # sources.py refuses .txt for the formats that need structured rows
        return RowFormat("text", field="text")
    if cfg.format == "text":
        if known is not None and cfg.text_field not in known:
            raise UserError(f"row 0 of {source} has no '{cfg.text_field}' field{listing}; "
                            f"set data.text_field=<column>")
        return RowFormat("text", field=cfg.text_field)
    if cfg.format in ("auto", "chat") and (cfg.columns.user is not None or cfg.columns.assistant is not None):
        return _columns_format(cfg, known, source, listing)
    if cfg.format in ("auto", "chat") and (known is None or cfg.messages_field in known):
        return RowFormat("messages", field=cfg.messages_field, roles=roles)
    has_pc = known is not None and {PROMPT, COMPLETION} <= known
    if has_pc:
        return RowFormat(_prompt_completion_kind(cfg, first_row, source), roles=roles)
    if cfg.format == "prompt_completion":
        raise UserError(f"row 0 of {source} has no '{PROMPT}' and '{COMPLETION}' fields{listing}; "
                        f"data.format=prompt_completion needs both (or set data.format=auto)")
    if cfg.format == "auto" and cfg.text_field in known:
        return RowFormat("text", field=cfg.text_field)
    also = "" if cfg.format == "chat" else f", nor '{PROMPT}' + '{COMPLETION}', nor '{cfg.text_field}'"
    raise UserError(f"row 0 of {source} has no '{cfg.messages_field}' field{also}{listing}; set "
                    f"data.messages_field=<column> or data.columns.user/assistant (data.format=text "
                    f"with data.text_field=<column> for plain documents)")


def _message(item: Any, field: str, roles: Tuple[str, ...]) -> Message:
    if not isinstance(item, dict) and not isinstance(item, Mapping):  # dict first: the common, fast case
        raise BadRow(f"has a '{field}' entry that is not an object with role and content")
    role = item.get("role", item.get("from"))
    content = item.get("content", item.get("value"))
    if not isinstance(role, str) or not role:
        raise BadRow(f"has a '{field}' entry without a role; each message needs 'role' and 'content'")
    if not isinstance(content, str):
        raise BadRow(f"has a {role!r} message whose content is not a string")
    role = ROLE_ALIASES.get(role, role)
    if role not in roles:
        # Rendering it anyway would train on a turn the template may not know, or (as before)
        # drop the row as "without labels" with no word about why.
        raise BadRow(f"has unknown role {role!r} in '{field}'; roles: {', '.join(roles)}; fix the row, or "
                     f"add the role to data.roles if the chat template knows it")
    return {"role": role, "content": content}


def _message_list(row: Mapping[str, Any], field: str, roles: Tuple[str, ...], hint: str,
                  allow_empty: bool = False) -> List[Message]:
    raw = row.get(field)
    if raw is None:
        raise BadRow(f"has no '{field}' field; {hint}")
    if not isinstance(raw, list) and (isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence)) \
            or (len(raw) == 0 and not allow_empty):
        raise BadRow(f"has a '{field}' field that is not a non-empty list of messages")
    return [_message(m, field, roles) for m in raw]


def row_messages(row: Mapping[str, Any], fmt: RowFormat) -> List[Message]:
    """The chat messages of a messages or columns row (raises BadRow)."""
    if fmt.kind == "messages":
        return _message_list(row, fmt.field, fmt.roles, "set data.messages_field=... or data.columns.*")
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


def row_prompt_completion(row: Mapping[str, Any]) -> PromptCompletion:
    """The prompt and completion strings of a row (raises BadRow)."""
    values = []
    for column in (PROMPT, COMPLETION):
        value = row.get(column)
        if not isinstance(value, str):
            raise BadRow(f"has a '{column}' that is not a string (the first row's is)")
        values.append(value)
    return PromptCompletion(*values)


def row_chat(row: Mapping[str, Any], fmt: RowFormat) -> Chat:
    """A templated row as messages, with its targets (raises BadRow)."""
    if fmt.kind == "conversational":
        # An empty prompt or completion is a valid list; an empty completion is counted as
        # "no completion" by the encoder, not as a bad row.
        hint = "each row needs 'prompt' and 'completion' lists of messages"
        prompt = _message_list(row, PROMPT, fmt.roles, hint, allow_empty=True)
        completion = _message_list(row, COMPLETION, fmt.roles, hint, allow_empty=True)
        return Chat(prompt + completion, [False] * len(prompt) + [True] * len(completion))
    if fmt.kind == "prompt_completion_chat":
        pc = row_prompt_completion(row)
        return Chat([{"role": "user", "content": pc.prompt}, {"role": "assistant", "content": pc.completion}])
    return Chat(row_messages(row, fmt))


def row_text(row: Mapping[str, Any], fmt: RowFormat) -> str:
    value = row.get(fmt.field)
    if value is None:
        raise BadRow(f"has no '{fmt.field}' field; set data.text_field=...")
    if not isinstance(value, str):
        raise BadRow(f"has a '{fmt.field}' field that is not a string")
    return value
