"""`chatterbot`: the YAML corpus of the installed `chatterbot-corpus` package (languages x categories).

Each `data/<language>/<category>.yml` has `conversations:`, a list of lists of strings. Two shapes
live in that one format, and the files show which is which:
- most categories (emotion, psychology, ...) are a statement followed by alternative answers
  (`[You are arrogant, Arrogance is not one of my emotions., I have no real emotions, ...]`):
  one (user, assistant) pair per answer, never a fake multi-turn chat out of the alternatives;
- `dialogue_categories` (default: conversations) are real dialogues where each line answers the
  previous one (`[Hello, Hi, How are you doing?, I am doing well., ...]`), as ChatterBot's own
  trainer reads every list: one multi-turn row, alternating user/assistant, trimmed to end on an
  assistant turn (trimmed_turns).
The YAML is read with BaseLoader so every scalar stays the text written (`yes`, `1.0`, `null` are
not turned into booleans, numbers or None), and with line numbers for origins. A list item that is
not a list of strings (the corpus has one) is quarantined; a statement without an answer becomes a
row `clean` rejects (last turn user), not a silent loss.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import yaml

from lorapipe.core.errors import LorapipeError
from lorapipe.core.inputs import Input, pinned_package
from lorapipe.sources._common import Context, turns_to_messages


def data_dir() -> Path:
    # Located without importing the package (nothing in it is needed but its data files).
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise LorapipeError("chatterbot source: the chatterbot-corpus package is not installed (pip install chatterbot-corpus)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _available(folder: Path, suffix: str = "") -> str:
    return ", ".join(sorted(p.name.removesuffix(suffix) for p in folder.iterdir() if (p.is_dir() if not suffix else p.suffix == suffix)))


def corpus_files(ctx: Context) -> list[tuple[Path, str]]:
    """(file, category) for every requested language x category; a clear error for unknown names."""
    root = data_dir()
    files = []
    for lang in ctx.source.languages:
        folder = root / lang
        if not folder.is_dir():
            raise LorapipeError(f"{ctx.key}.languages: no language {lang!r} in chatterbot-corpus; available: {_available(root)}")
        for cat in ctx.source.categories:
            path = folder / f"{cat}.yml"
            if not path.is_file():
                raise LorapipeError(f"{ctx.key}.categories: no category {cat!r} for {lang}; available: {_available(folder, '.yml')}")
            files.append((path, cat))
    return files


def _scalars(node: yaml.Node) -> list[yaml.ScalarNode] | None:
    if isinstance(node, yaml.SequenceNode) and all(isinstance(n, yaml.ScalarNode) for n in node.value):
        return node.value
    return None


def read_file(ctx: Context, path: Path, category: str, origin_name: str) -> Iterator[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        raise LorapipeError(f"{path}: not valid YAML: {exc}") from None
    convs = None
    if isinstance(root, yaml.MappingNode):
        convs = next((v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "conversations"), None)
    if not isinstance(convs, yaml.SequenceNode):
        raise LorapipeError(f"{path}: no 'conversations' list (chatterbot corpus format)")
    dialogue = category in ctx.source.dialogue_categories
    for node in convs.value:
        origin = f"{origin_name}:{node.start_mark.line + 1}"
        items = _scalars(node)
        if items is None:
            raw = text[node.start_mark.index : node.end_mark.index]
            yield ctx.quarantine(origin, "conversation is not a list of texts", raw)
        elif dialogue:
            yield ctx.row(turns_to_messages(((i % 2, n.value) for i, n in enumerate(items)), "\n", ctx), origin)
        elif len(items) == 1:
            yield ctx.row([{"role": "user", "content": items[0].value}], origin)
        else:
            statement = items[0].value
            for answer in items[1:]:
                pair = [{"role": "user", "content": statement}, {"role": "assistant", "content": answer.value}]
                yield ctx.row(pair, f"{origin_name}:{answer.start_mark.line + 1}")


def inputs(ctx: Context) -> list[Input]:
    return [pinned_package("chatterbot-corpus", ctx.key)]


def read(ctx: Context) -> Iterator[dict]:
    root = data_dir()
    for path, category in corpus_files(ctx):
        # Origins name the file inside the package, not this machine's site-packages path.
        origin_name = f"chatterbot_corpus/data/{path.relative_to(root).as_posix()}"
        yield from read_file(ctx, path, category, origin_name)
