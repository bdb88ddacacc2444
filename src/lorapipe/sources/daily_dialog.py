"""`daily_dialog`: DailyDialog (Li et al. 2017) from its release text files or the hub.

The release has one dialogue per line of `dialogues_text.txt` (or `dialogues_<split>.txt` in the
split archives), utterances separated and ended by `__eou__`, with parallel files
`dialogues_act[_<split>].txt` and `dialogues_emotion[_<split>].txt` holding one label per utterance
on the same line. Their counts must match the text line's (a mismatch means the files are not
parallel: an error naming file:line). Speakers strictly alternate: the first is the user. A
dialogue ending on the user's turn is trimmed to its last assistant reply (trimmed_turns). Text is
kept as released (tokenised, spaces before punctuation), only stripped at the ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from lorapipe.core.errors import LorapipeError
from lorapipe.core.inputs import Input
from lorapipe.sources import _hub
from lorapipe.sources._common import Context, turns_to_messages

EOU = "__eou__"


def release_files(path: Path, split: str) -> tuple[Path, Path | None, Path | None]:
    """(text, act, emotion) files of the release at `path` (its folder or its text file)."""
    if path.is_dir():
        names = ["dialogues_text.txt", f"dialogues_{split}.txt", f"{split}/dialogues_{split}.txt"]
        found = next((path / n for n in names if (path / n).is_file()), None)
        if found is None:
            raise LorapipeError(f"{path}: no DailyDialog text file in this folder (looked for {', '.join(names)})")
        path = found
    stem = path.name.removeprefix("dialogues_").removesuffix(".txt")
    suffix = "" if stem == "text" else f"_{stem}"
    act, emotion = path.with_name(f"dialogues_act{suffix}.txt"), path.with_name(f"dialogues_emotion{suffix}.txt")
    return path, act if act.is_file() else None, emotion if emotion.is_file() else None


def split_utterances(line: str) -> list[str]:
    parts = line.split(EOU)
    if not parts[-1].strip():
        parts.pop()  # the text after the final __eou__
    return [p.strip() for p in parts]


def _labels(f, path: Path, lineno: int, n: int, text_path: Path) -> None:
    """Check the parallel label line `lineno` of `path` has `n` integer labels."""
    raw = f.readline()
    if not raw:
        raise LorapipeError(f"{path}:{lineno}: file ends early, {text_path} has a dialogue on this line")
    labels = raw.split()
    if len(labels) != n:
        raise LorapipeError(f"{path}:{lineno}: {len(labels)} labels but {text_path}:{lineno} has {n} utterances")
    if not all(x.isdigit() for x in labels):
        raise LorapipeError(f"{path}:{lineno}: labels must be integers, got {raw.strip()[:80]!r}")


def _release(ctx: Context) -> Iterator[dict]:
    text_path, act_path, emo_path = release_files(ctx.existing(ctx.source.path), ctx.source.split)
    ctx.stats["label_files_checked"] = sum(p is not None for p in (act_path, emo_path))
    parallel = [(open(p, "rb"), p) for p in (act_path, emo_path) if p is not None]
    limit, n_conv = ctx.source.max_conversations, 0
    try:
        with open(text_path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                origin = f"{text_path}:{lineno}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    for lf, _ in parallel:
                        lf.readline()
                    yield ctx.quarantine(origin, f"invalid UTF-8 at byte {exc.start}", raw.decode("utf-8", "replace"))
                    continue
                utterances = split_utterances(text.lstrip("\ufeff")) if text.strip() else []
                for lf, lp in parallel:
                    _labels(lf, lp, lineno, len(utterances), text_path)
                if not utterances:
                    continue  # a blank line holds no dialogue
                n_conv += 1
                if limit is not None and n_conv > limit:
                    ctx.stats["conversations_over_limit"] += 1
                    continue
                yield ctx.row(turns_to_messages(((i % 2, u) for i, u in enumerate(utterances)), " ", ctx), origin)
        for lf, lp in parallel:
            extra = lf.read().strip()
            if extra:
                raise LorapipeError(f"{lp}: has more lines than {text_path}: the files are not parallel")
    finally:
        for lf, _ in parallel:
            lf.close()


def hub_rows(ctx: Context, rows: Iterable[dict]) -> Iterator[dict]:
    """Hub rows: {"dialog": [str], "act": [int], "emotion": [int]} (the datasets version of the release)."""
    src = ctx.source
    for i, r in enumerate(rows):
        if src.max_conversations is not None and i >= src.max_conversations:
            ctx.stats["conversations_over_limit"] += 1
            continue
        origin = f"hub:{src.hub_id}/{src.split}:#{i}"
        dialog = r.get("dialog")
        if not isinstance(dialog, list):
            raise LorapipeError(f"{origin}: expected a 'dialog' list of utterances, columns are {sorted(r)}")
        for col in ("act", "emotion"):
            if col in r and len(r[col]) != len(dialog):
                raise LorapipeError(f"{origin}: {len(r[col])} {col} labels but {len(dialog)} utterances")
        yield ctx.row(turns_to_messages(((j % 2, u.strip() if isinstance(u, str) else u) for j, u in enumerate(dialog)), " ", ctx), origin)


def inputs(ctx: Context) -> list[Input]:
    """The release folder, or its text file and the act/emotion files read beside it."""
    path = ctx.existing(ctx.source.path) if ctx.source.path else None
    if path is None or path.is_dir():
        return ctx.release_inputs()
    return [Input(p, f"{ctx.key}.path") for p in release_files(path, ctx.source.split) if p is not None]


def read(ctx: Context) -> Iterator[dict]:
    if ctx.source.path:
        return _release(ctx)
    return hub_rows(ctx, _hub.load_rows(ctx.key, ctx.source.hub_id, ctx.source.split))
