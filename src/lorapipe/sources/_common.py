"""What every adapter shares: the two kinds of output record, stats, counted JSONL lines, and turning
speaker turns into roles.

Each adapter has `read(ctx)` and `inputs(ctx)`: the local files and folders `read` will open (or
the pin of the package whose data it reads), which dvc.yaml must list as deps of ingest
(core/inputs.py). An adapter converts faithfully and judges nothing: a record it can read becomes a
row (even one the `clean` stage will later reject, which then gets a file:line reason there); a
record it cannot read at all becomes a quarantine record. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from lorapipe.core.errors import LorapipeError
from lorapipe.core.inputs import Input
from lorapipe.core.io import JsonlLine, iter_jsonl

RAW_LIMIT = 2000  # characters of the original text kept in a quarantine record


@dataclass
class Context:
    """Where an adapter reads from and how to name it in errors and records."""

    source: Any  # the source's params object (one of lorapipe.params' *Source classes)
    key: str  # its params key, e.g. "data.sources[2] (support)"
    stats: Counter = field(default_factory=Counter)  # adapter-specific counts (blank_lines, trimmed_turns, ...)

    @property
    def name(self) -> str:
        return self.source.name

    def row(self, messages: Any, origin: str) -> dict:
        return {"messages": messages, "source": self.name, "origin": origin}

    def quarantine(self, origin: str, error: str, raw: Any) -> dict:
        if not isinstance(raw, str):
            raw = json.dumps(raw, ensure_ascii=False)
        return {"source": self.name, "origin": origin, "error": error, "raw": raw[:RAW_LIMIT]}

    def existing(self, path: str | None, field_name: str = "path") -> Path:
        """The local file a params key points at; a clear error naming both when it is missing."""
        if not path:
            raise LorapipeError(f"{self.key}: '{field_name}' is not set")
        p = Path(path)
        if not p.exists():
            raise LorapipeError(f"{self.key}.{field_name}: file not found: {path}")
        return p

    def input(self, path: str | None, field_name: str = "path") -> Input:
        """A local file or folder this source reads (it must exist), for the stage's `inputs`."""
        return Input(self.existing(path, field_name), f"{self.key}.{field_name}")

    def release_inputs(self) -> list[Input]:
        """A public set's inputs: its release file, or none when it comes from the hub by `hub_id`."""
        return [self.input(self.source.path)] if self.source.path else []


def load_json(path: Path, data: bytes | None = None) -> Any:
    """A whole JSON file (BOM tolerated); bad bytes or JSON are an error naming file and line."""
    try:
        return json.loads((path.read_bytes() if data is None else data).decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise LorapipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise LorapipeError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None


def jsonl_lines(path: Path, ctx: Context) -> Iterator[JsonlLine]:
    """Every non-blank line of a JSONL file (core.io.iter_jsonl); the empty or whitespace-only lines
    it skips, which hold no row, are counted in ctx.stats["blank_lines"]: rows + quarantined +
    blank_lines is the file's line count."""
    last = 0
    for line in iter_jsonl(path):
        ctx.stats["blank_lines"] += line.lineno - last - 1
        last = line.lineno
        yield line
    with open(path, "rb") as f:  # the lines after the last non-blank one, counted as iter_jsonl numbers them
        ctx.stats["blank_lines"] += sum(1 for _ in f) - last


def turns_to_messages(turns: Iterable[tuple[Any, str]], joiner: str, ctx: Context) -> list[dict]:
    """Speaker turns -> alternating user/assistant messages, ending on an assistant turn.

    Consecutive turns by the same speaker are one message (joined with `joiner`); then the first
    speaker is the user and roles alternate, which for a two-person chat is exactly "first speaker
    -> user, the other -> assistant". A trailing user turn has no reply to learn from, so it is
    trimmed and counted in stats["trimmed_turns"] — unless that would leave no exchange at all:
    then the row is passed on untrimmed and `clean` rejects it with its reason (never lost silently).
    """
    merged: list[list] = []
    for speaker, text in turns:
        if merged and merged[-1][0] == speaker:
            merged[-1][1].append(text)
        else:
            merged.append([speaker, [text]])
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": joiner.join(texts)}
        for i, (_, texts) in enumerate(merged)
    ]
    if len(messages) > 2 and messages[-1]["role"] == "user":
        messages.pop()
        ctx.stats["trimmed_turns"] += 1
    return messages
