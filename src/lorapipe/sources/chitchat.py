"""`chitchat`: the installed `chitchat-dataset` package (the Chit Chat Challenge: real English chats).

Its `dataset.json` (40 MB) maps a conversation id to `{"messages": [[{"text", "sender",
"timestamp"}, ...], ...], "prompt", "start", ...}`: groups of consecutive messages. Conversations
are taken in sorted id order, the first `max_conversations` of them (deterministic whatever the
file's key order). Consecutive messages by the same sender are one turn (joined with newlines, as
they were separate chat messages); the first sender is the user, the other the assistant; a chat
ending on the user's turn is trimmed to its last assistant turn (trimmed_turns).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

from lorapipe.core.errors import LorapipeError
from lorapipe.core.inputs import Input, pinned_package
from lorapipe.sources._common import Context, turns_to_messages

ORIGIN_FILE = "chitchat_dataset/dataset.json"


def dataset_path() -> Path:
    # Located without importing the package: its classes would json.load the file a second time.
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise LorapipeError("chitchat source: the chitchat-dataset package is not installed (pip install chitchat-dataset)")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset.json"


def _turns(conv: Any) -> list[tuple[str, str]] | None:
    """(sender, text) of every message in order, or None when the record is not in this format."""
    groups = conv.get("messages") if isinstance(conv, dict) else None
    if not isinstance(groups, list):
        return None
    turns = []
    for group in groups:
        if not isinstance(group, list):
            return None
        for m in group:
            if not (isinstance(m, dict) and isinstance(m.get("text"), str) and "sender" in m):
                return None
            turns.append((m["sender"], m["text"]))
    return turns


def conversation_row(ctx: Context, conv: Any, origin: str) -> dict:
    turns = _turns(conv)
    if turns is None:
        return ctx.quarantine(origin, "not a chitchat conversation (messages: list of lists of {text, sender})", conv)
    return ctx.row(turns_to_messages(turns, "\n", ctx), origin)


def inputs(ctx: Context) -> list[Input]:
    return [pinned_package("chitchat-dataset", ctx.key)]


def read(ctx: Context, path: Path | None = None) -> Iterator[dict]:
    path = path or dataset_path()
    with open(path, "rb") as f:
        data = json.load(f)  # one 40 MB file: the stdlib parser is fast enough
    ids = sorted(data)
    limit = ctx.source.max_conversations
    if limit is not None and len(ids) > limit:
        ctx.stats["conversations_over_limit"] += len(ids) - limit
        ids = ids[:limit]
    for conv_id in ids:
        yield conversation_row(ctx, data[conv_id], f"{ORIGIN_FILE}:{conv_id}")
