"""`empathetic_dialogues`: EmpatheticDialogues (Rashkin et al. 2019) from its release CSV or the hub.

The release (empatheticdialogues.tar.gz: train.csv, valid.csv, test.csv) has the header
`conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags`; text fields escape
commas as `_comma_` and are never quoted, so a line is split on every comma as the authors' own
loader (ParlAI) does (some lines carry a 9th field, candidate replies, which is ignored).
Utterances are grouped by conv_id (in release order), ordered by utterance_idx; the first speaker
(who describes a situation) is the user, the listener is the assistant. A conversation ending on
the speaker's turn is trimmed to its last listener reply (counted as trimmed_turns).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from lorapipe.core.errors import LorapipeError
from lorapipe.sources import _hub
from lorapipe.sources._common import Context, turns_to_messages

HEADER = ["conv_id", "utterance_idx", "context", "prompt", "speaker_idx", "utterance", "selfeval", "tags"]


def unescape(text: str) -> str:
    return text.replace("_comma_", ",")


def _release_utterances(ctx: Context) -> Iterator[dict]:
    """{conv_id, utterance_idx, speaker_idx, utterance, origin} per CSV line, or a quarantine record."""
    path = ctx.existing(ctx.source.path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if lineno == 1:
                header = raw.lstrip(b"\xef\xbb\xbf").decode("utf-8", "replace").split(",")
                if header[: len(HEADER)] != HEADER:
                    raise LorapipeError(f"{path}:1: not an EmpatheticDialogues CSV header (expected {','.join(HEADER)})")
                continue
            if not raw.strip():
                continue
            origin = f"{ctx.source.path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield ctx.quarantine(origin, f"invalid UTF-8 at byte {exc.start}", raw.decode("utf-8", "replace"))
                continue
            fields = text.split(",")
            if len(fields) < len(HEADER):
                yield ctx.quarantine(origin, f"{len(fields)} fields, expected {len(HEADER)}", text)
                continue
            try:
                idx, speaker = int(fields[1]), int(fields[4])
            except ValueError:
                yield ctx.quarantine(origin, "utterance_idx and speaker_idx must be integers", text)
                continue
            yield {"conv_id": fields[0], "utterance_idx": idx, "speaker_idx": speaker, "utterance": fields[5], "origin": origin}


def hub_utterances(ctx: Context, rows: Iterable[dict]) -> Iterator[dict]:
    """Hub rows have the release's columns (text still `_comma_`-escaped); only the origin is added."""
    src = ctx.source
    for i, r in enumerate(rows):
        yield {**r, "origin": f"hub:{src.hub_id}/{src.split}:#{i}"}


def conversations(ctx: Context, utterances: Iterable[dict]) -> Iterator[dict]:
    """Group utterance records into rows; quarantine records pass through in place."""
    convs: dict[str, list[dict]] = {}  # insertion order = release order
    for u in utterances:
        if "error" in u:
            yield u
            continue
        convs.setdefault(u["conv_id"], []).append(u)
    limit = ctx.source.max_conversations
    for n, (conv_id, utts) in enumerate(convs.items()):
        if limit is not None and n >= limit:
            ctx.stats["conversations_over_limit"] += 1
            continue
        origin = utts[0]["origin"]  # where the conversation first appears in the file
        utts.sort(key=lambda u: u["utterance_idx"])  # stable: equal indices keep file order
        turns = [(u["speaker_idx"], unescape(u["utterance"])) for u in utts]
        yield ctx.row(turns_to_messages(turns, " ", ctx), origin)


def inputs(ctx: Context) -> list:
    return ctx.release_inputs()


def read(ctx: Context) -> Iterator[dict]:
    if ctx.source.path:
        utterances = _release_utterances(ctx)
    else:
        utterances = hub_utterances(ctx, _hub.load_rows(ctx.key, ctx.source.hub_id, ctx.source.split))
    yield from conversations(ctx, utterances)
