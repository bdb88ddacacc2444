"""`emotion_lines`: EmotionLines (Hsu et al. 2018: Friends / EmotionPush) from its release JSON or the hub.

A release file (e.g. `Friends/friends_train.json`) is a JSON list of dialogues, each a list of
utterances `{"speaker", "utterance", "emotion", "annotation"}`. Consecutive utterances by the same
speaker form one turn (joined with a space); turns then alternate user/assistant starting with the
first speaker — for the two-person EmotionPush chats that is "first speaker -> user, the other ->
assistant"; Friends scenes can have more speakers, whose turns are alternated the same way. A
dialogue ending on a user turn is trimmed (trimmed_turns). Origins are `<file>:#<dialogue index>`.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from lorapipe.core.errors import LorapipeError
from lorapipe.sources import _hub
from lorapipe.sources._common import Context, load_json, turns_to_messages


def dialogue_row(ctx: Context, dialogue: Any, origin: str) -> dict:
    """One dialogue -> a row, or a quarantine record when it is not a list of speaker utterances."""
    if not isinstance(dialogue, list):
        return ctx.quarantine(origin, f"dialogue is {type(dialogue).__name__}, not a list of utterances", dialogue)
    turns = []
    for i, u in enumerate(dialogue):
        if not (isinstance(u, dict) and isinstance(u.get("speaker"), str) and isinstance(u.get("utterance"), str)):
            return ctx.quarantine(origin, f"utterance {i} lacks a text 'speaker' and 'utterance'", dialogue)
        turns.append((u["speaker"], u["utterance"]))
    return ctx.row(turns_to_messages(turns, " ", ctx), origin)


def _capped(ctx: Context, dialogues: Any) -> Iterator[tuple[int, Any]]:
    limit = ctx.source.max_conversations
    for i, d in enumerate(dialogues):
        if limit is not None and i >= limit:
            ctx.stats["conversations_over_limit"] += 1
            continue
        yield i, d


def _release(ctx: Context) -> Iterator[dict]:
    path = ctx.existing(ctx.source.path)
    dialogues = load_json(path)
    if not isinstance(dialogues, list):
        raise LorapipeError(f"{path}: expected a JSON list of dialogues (EmotionLines release format), got {type(dialogues).__name__}")
    for i, d in _capped(ctx, dialogues):
        yield dialogue_row(ctx, d, f"{ctx.source.path}:#{i}")


def hub_rows(ctx: Context, rows: Iterable[dict]) -> Iterator[dict]:
    """Hub rows holding one dialogue each: the first column that is a list of {speaker, utterance}."""
    src = ctx.source
    for i, r in _capped(ctx, rows):
        column = next((k for k, v in r.items() if isinstance(v, list) and v and isinstance(v[0], dict) and "utterance" in v[0]), None)
        if column is None:
            raise LorapipeError(
                f"{ctx.key}.hub_id: {src.hub_id!r} rows have no list of {{speaker, utterance}} (columns: {sorted(r)}); "
                f"use '{ctx.key}.path' with the EmotionLines release JSON instead"
            )
        yield dialogue_row(ctx, r[column], f"hub:{src.hub_id}/{src.split}:#{i}")


def inputs(ctx: Context) -> list:
    return ctx.release_inputs()


def read(ctx: Context) -> Iterator[dict]:
    if ctx.source.path:
        return _release(ctx)
    return hub_rows(ctx, _hub.load_rows(ctx.key, ctx.source.hub_id, ctx.source.split))
