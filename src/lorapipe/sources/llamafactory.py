"""`llamafactory`: entries of a LLaMA-Factory `dataset_info.json`, converted as LLaMA-Factory does.

Each entry names a local `file_name` (relative to the dataset_info.json's folder; a file or a folder
of .json/.jsonl files) and its `formatting`:
- `sharegpt`: `columns.messages` (default "conversations") holds a list of messages; `tags` map them:
  role_tag/content_tag (default from/value), user_tag (human), assistant_tag (gpt), system_tag
  (system), observation_tag, function_tag; `columns.system` adds a system prompt.
- `alpaca` (LLaMA-Factory's default): `columns` prompt/query/response/history/system (defaults
  instruction/input/output/none/none); history is a list of [prompt, response] pairs; prompt and
  query are joined with a newline, as LLaMA-Factory does.
Accepted beyond LLaMA-Factory, because the seed's hand-written registry uses them: `file` for
`file_name`, `format` for `formatting`; and for a sharegpt entry without explicit `columns`/`tags`,
rows in OpenAI style (`messages` of role/content) are read as such instead of failing.
Tags outside the mapping (tool observation/function turns) stay as roles; `clean` rejects them.
Blank lines of a JSON-lines file hold no record and are counted in stats["blank_lines"].
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from lorapipe.core.errors import LorapipeError
from lorapipe.core.inputs import Input
from lorapipe.sources._common import Context, jsonl_lines, load_json

DEFAULT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {**DEFAULT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}
FORMATTINGS = ("alpaca", "sharegpt")


def sharegpt_messages(obj: dict, column: str, tags: dict, system_column: str | None) -> Any:
    """LLaMA-Factory sharegpt messages -> role/content messages; odd items are kept for `clean` to judge."""
    items = obj.get(column)
    if not isinstance(items, list):
        return items
    role_of = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    for m in items:
        if isinstance(m, dict):
            tag = m.get(tags["role_tag"])
            messages.append({"role": role_of.get(tag, tag), "content": m.get(tags["content_tag"])})
        else:
            messages.append(m)
    system = obj.get(system_column) if system_column else None
    if system and not (messages and isinstance(messages[0], dict) and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def alpaca_messages(obj: dict, columns: dict) -> list[dict]:
    """LLaMA-Factory's AlpacaDatasetConverter: system, history pairs, prompt + query, response."""
    messages: list[dict] = []
    system = obj.get(columns["system"]) if columns["system"] else None
    if system:
        messages.append({"role": "system", "content": system})
    history = obj.get(columns["history"]) if columns["history"] else None
    if isinstance(history, list):
        for pair in history:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"history item is not a [prompt, response] pair: {json.dumps(pair, ensure_ascii=False)[:80]}")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = [obj[c] for c in (columns["prompt"], columns["query"]) if c and obj.get(c)]
    if not all(isinstance(q, str) for q in query):
        raise ValueError(f"'{columns['prompt']}'/'{columns['query']}' must be text")
    messages.append({"role": "user", "content": "\n".join(query)})
    messages.append({"role": "assistant", "content": obj.get(columns["response"])})
    return messages


def _file_name(entry: dict):
    """An entry's data path: `file_name`, or `file` as the seed's hand-written registry spells it."""
    return entry.get("file_name", entry.get("file"))


def _load_info(ctx: Context) -> tuple[Path, dict]:
    info_path = ctx.existing(ctx.source.dataset_info, "dataset_info")
    info = load_json(info_path)
    if not isinstance(info, dict):
        raise LorapipeError(f"{info_path}: expected an object of dataset entries, got {type(info).__name__}")
    return info_path, info


def _entry(ctx: Context, info_path: Path, info: dict, name: str) -> tuple[list[Path], str, dict, dict, bool]:
    """(files, formatting, columns, tags, auto_openai) of one dataset_info entry, validated."""
    where = f"{info_path}: entry {name!r}"
    if name not in info:
        raise LorapipeError(f"{ctx.key}.datasets: {name!r} is not in {info_path}; entries there: {', '.join(sorted(info)) or '(none)'}")
    entry = info[name]
    if not isinstance(entry, dict):
        raise LorapipeError(f"{where}: must be an object")
    file_name = _file_name(entry)
    if not file_name:
        remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry]
        what = f"has {remote[0]!r} but " if remote else ""
        raise LorapipeError(f"{where}: {what}no 'file_name'; only local files are supported (download the data and set file_name)")
    if entry.get("ranking"):
        raise LorapipeError(f"{where}: is a preference set (ranking: true), not supervised chat data")
    formatting = entry.get("formatting", entry.get("format", "alpaca"))
    if formatting not in FORMATTINGS:
        raise LorapipeError(f"{where}: formatting {formatting!r} is not supported; valid: {', '.join(FORMATTINGS)}")
    user_columns = entry.get("columns") or {}
    user_tags = entry.get("tags") or {}
    if formatting == "alpaca":
        columns = {**ALPACA_COLUMNS, **{k: v for k, v in user_columns.items() if k in ALPACA_COLUMNS}}
    else:
        columns = {"messages": user_columns.get("messages", "conversations"), "system": user_columns.get("system")}
    tags = {**DEFAULT_TAGS, **{k: v for k, v in user_tags.items() if k in DEFAULT_TAGS}}
    auto_openai = formatting == "sharegpt" and not user_tags and "messages" not in user_columns
    # Inside the dataset_info.json's folder, as LLaMA-Factory's dataset_dir reads it: so that folder
    # (or the files listed) is everything ingest reads, and DVC can check all of it.
    if not isinstance(file_name, str) or os.path.isabs(file_name) or ".." in Path(os.path.normpath(file_name)).parts:
        raise LorapipeError(f"{where}: file_name {file_name!r} must be a path inside {info_path.parent} "
                            "(no absolute path, no '..'); move or link the data into that folder")
    target = info_path.parent / file_name
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise LorapipeError(f"{where}: folder {target} holds no .json/.jsonl files")
    elif target.is_file():
        if target.suffix not in (".json", ".jsonl"):
            raise LorapipeError(f"{where}: {target}: only .json and .jsonl files are supported")
        files = [target]
    else:
        raise LorapipeError(f"{where}: file_name not found: {target} (paths are relative to {info_path.parent})")
    return files, formatting, columns, tags, auto_openai


def _records(path: Path, ctx: Context) -> Iterator[tuple[str, Any, str | None, str]]:
    """(origin, value, error, text) per record of a .json array or JSON-lines file (as `datasets` reads both)."""
    data = path.read_bytes()
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head != b"[":
        for line in jsonl_lines(path, ctx):
            yield f"{path}:{line.lineno}", line.value, line.error, line.text
        return
    records = load_json(path, data)
    for i, value in enumerate(records):
        yield f"{path}:#{i}", value, None, ""


def inputs(ctx: Context) -> list[Input]:
    """The dataset_info.json and the file or folder of every entry named in `datasets`."""
    info_path, info = _load_info(ctx)
    found = [Input(info_path, f"{ctx.key}.dataset_info")]
    for name in ctx.source.datasets:
        files = _entry(ctx, info_path, info, name)[0]
        target = info_path.parent / _file_name(info[name])
        found += [Input(target, f"{ctx.key}.datasets: {name}")] if target.is_dir() else [
            Input(f, f"{ctx.key}.datasets: {name}") for f in files]
    return found


def read(ctx: Context) -> Iterator[dict]:
    info_path, info = _load_info(ctx)
    for name in ctx.source.datasets:
        files, formatting, columns, tags, auto_openai = _entry(ctx, info_path, info, name)
        for path in files:
            for origin, value, error, text in _records(path, ctx):
                if error:
                    yield ctx.quarantine(origin, error, text)
                    continue
                if not isinstance(value, dict):
                    yield ctx.quarantine(origin, f"record is {type(value).__name__}, not an object", text or value)
                    continue
                if formatting == "alpaca":
                    try:
                        yield ctx.row(alpaca_messages(value, columns), origin)
                    except ValueError as exc:
                        yield ctx.quarantine(origin, str(exc), text or value)
                    continue
                column, row_tags = columns["messages"], tags
                if auto_openai and column not in value and isinstance(value.get("messages"), list):
                    column, row_tags = "messages", OPENAI_TAGS
                elif auto_openai and _is_openai(value.get(column)):
                    row_tags = OPENAI_TAGS
                if column not in value:
                    yield {"source": ctx.name, "origin": origin}  # no conversation: `clean` rejects it by name
                    continue
                yield ctx.row(sharegpt_messages(value, column, row_tags, columns["system"]), origin)


def _is_openai(items: Any) -> bool:
    """Messages keyed role/content rather than from/value (the seed's own rows)."""
    return isinstance(items, list) and bool(items) and isinstance(items[0], dict) and "role" in items[0] and "from" not in items[0]
