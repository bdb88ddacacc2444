"""`sharegpt`: the user's own JSONL corpora (the seed merges two), one conversation per line.

A line `{"messages": [{"role", "content"}, ...]}` passes through as it is (plus source and origin):
judging its structure is the `clean` stage's job. As a convenience a LLaMA-Factory style line
`{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system"?: ...}` is converted
with LLaMA-Factory's default tags. A line that cannot be read as an object (invalid UTF-8, invalid
JSON, an array, ...) becomes a quarantine record with its line number; an empty or whitespace-only
line holds no row and is counted in stats["blank_lines"].
"""

from __future__ import annotations

from typing import Iterator

from lorapipe.core.inputs import Input
from lorapipe.sources._common import Context, jsonl_lines
from lorapipe.sources.llamafactory import DEFAULT_TAGS, sharegpt_messages


def inputs(ctx: Context) -> list[Input]:
    return [ctx.input(ctx.source.path)]


def read(ctx: Context) -> Iterator[dict]:
    path = ctx.existing(ctx.source.path)
    for line in jsonl_lines(path, ctx):
        origin = f"{ctx.source.path}:{line.lineno}"
        if line.error:
            yield ctx.quarantine(origin, line.error, line.text)
        elif not isinstance(line.value, dict):
            yield ctx.quarantine(origin, f"JSON value is {type(line.value).__name__}, not an object", line.text)
        else:
            yield convert(line.value, origin, ctx)


def convert(obj: dict, origin: str, ctx: Context) -> dict:
    if "messages" not in obj and isinstance(obj.get("conversations"), list):
        ctx.stats["converted_conversations"] += 1
        return ctx.row(sharegpt_messages(obj, "conversations", DEFAULT_TAGS, system_column="system"), origin)
    if "messages" not in obj:
        # No conversation at all: passed on without `messages` so `clean` rejects it by name.
        return {"source": ctx.name, "origin": origin}
    return ctx.row(obj["messages"], origin)
