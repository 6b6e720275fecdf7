"""`data.path=demo:chitchat`: the chitchat-dataset package's 7k real conversations as chat rows."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import datasets

from granite_train.errors import UserError

DEMOS = ("chitchat",)


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
    import chitchat_dataset  # imported here: it reads a 20 MB JSON file at construction

    for conversation in chitchat_dataset.Dataset().values():
        yield {"messages": chitchat_to_messages(conversation)}


def load_demo(name: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    if name not in DEMOS:
        raise UserError(f"data.path=demo:{name} is not a demo data set; use one of "
                        + ", ".join(f"demo:{d}" for d in DEMOS))
    try:
        rows = list(_chitchat_rows())
    except ImportError:
        raise UserError("data.path=demo:chitchat needs the chitchat-dataset package; "
                        "pip install chitchat-dataset") from None
    ds = datasets.Dataset.from_list(rows)
    return ds.to_iterable_dataset() if streaming else ds
