"""The project's text holds together: README.md, README.zh-CN.md and docs/*.md.

- every relative link points at a file that exists, and every #anchor at a heading (slugged as GitHub
  slugs it) or an explicit `<a id="...">` of the target page;
- every `lorapipe ...` command line shown in a code block names a real subcommand, and each of its
  `--flags` appears in that subcommand's `--help`;
- README.md stays short (at most 250 lines) and no page tells the project's history.

Fast: markdown parsing and argparse only, no model is loaded.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lorapipe import cli

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, REPO / "README.zh-CN.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250
# Project text states what is, never how it came to be.
HISTORY = re.compile(r"issue [0-9]|session|earlier|turned out|before the fix|used to|no longer", re.IGNORECASE)

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"""<a\s+(?:id|name)=["']([^"']+)["']""")
# [text](target) and ![alt](target); the text may hold `code` and nested [..] is not used here
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[list[tuple[int, str]]]]:
    """(prose lines, code blocks), each line with its 1-based number."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
            continue
        (prose if block is None else block).append((number, line))
    assert block is None, "a code fence is not closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text lower-cased, punctuation removed (letters of
    any script, digits, '-' and '_' kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("**", "").replace("__", "")
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ " or c.isspace())
    return re.sub(r"\s", "-", text)


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for _, line in prose:
        found.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_slug_is_githubs():
    assert slug("The stage graph") == "the-stage-graph"
    assert slug("`lorapipe chat`") == "lorapipe-chat"
    assert slug("`base` → `models/base/`") == "base--modelsbase"
    assert slug("与模型对话：`lorapipe chat`") == "与模型对话lorapipe-chat"
    assert slug("Train, the loss gap (seed)") == "train-the-loss-gap-seed"


def test_duplicate_headings_get_numbered(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A\n## A\n```\n# not a heading\n```\n## A\n", encoding="utf-8")
    assert anchors(page) == {"a", "a-1", "a-2"}


def links(path: Path) -> list[tuple[int, str]]:
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    out = []
    for number, line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            out.append((number, target))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(page):
    assert page.is_file(), f"{page} is missing"
    cache: dict[Path, set[str]] = {}
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{page.relative_to(REPO)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where}: no such file")
            continue
        if anchor:
            if dest.suffix != ".md":
                broken.append(f"{where}: an anchor into a file that is not markdown")
                continue
            if anchor not in cache.setdefault(dest, anchors(dest)):
                broken.append(f"{where}: no heading or <a id> with this anchor in {dest.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_docs_pages_are_all_linked_from_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if t.partition("#")[0]}
    missing = [p.relative_to(REPO).as_posix() for p in PAGES[2:] if p.resolve() not in linked]
    assert not missing, f"README.md links to no page of: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_table_rows_have_the_header_cell_count(page):
    """GitHub splits a table row on every unescaped |, inside `code` too: `<|im_end|>` must be
    written `<\\|im_end\\|>` in a table, or the row gets extra cells."""
    prose, _ = split_fences(page.read_text(encoding="utf-8"))
    bad, header = [], None
    for number, line in prose:
        if not line.lstrip().startswith("|"):
            header = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line.strip().strip("|")))
        if header is None:
            header = cells
        elif cells != header:
            bad.append(f"{page.relative_to(REPO)}:{number}: {cells} cells, the header has {header}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------------- commands
def command_lines(path: Path, inline: bool = False) -> list[tuple[int, list[str]]]:
    """Every shell line of a code block that runs `lorapipe` (also `.venv/bin/lorapipe`, `-m lorapipe`),
    with backslash continuations joined, as tokens after `lorapipe`; with `inline`, also every
    `lorapipe ...` code span of the prose that holds no <placeholder>."""
    prose, blocks = split_fences(path.read_text(encoding="utf-8"))
    if inline:
        spans = [(n, m.group(0).strip("`")) for n, line in prose for m in INLINE_CODE.finditer(line)]
        blocks = blocks + [[(n, span)] for n, span in spans if re.search(r"(^|[ /])lorapipe ", span) and "<" not in span]
    out = []
    for block in blocks:
        joined: list[tuple[int, str]] = []
        for number, line in block:
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line)
            else:
                joined.append((number, line))
        for number, line in joined:
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue  # not shell (Python, YAML, prose inside a block)
            for i, tok in enumerate(tokens):
                if tok == "lorapipe" or tok.endswith("bin/lorapipe"):
                    rest = []
                    for t in tokens[i + 1:]:
                        if t in ("&&", "||", "|", ";", ">", "<") or t.startswith((">", "2>")):
                            break
                        rest.append(t)
                    out.append((number, rest))
    return out


def subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_readme_shows_commands():
    """The check below has something to check: README shows the commands it promises."""
    shown = {rest[0] for _, rest in command_lines(README) if rest}
    assert {"chat", "serve", "ui"} <= shown, shown


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_lorapipe_command_lines_exist(page):
    subs = subparsers()
    bad = []
    for number, rest in command_lines(page, inline=page.name.startswith("README")):
        where = f"{page.relative_to(REPO)}:{number}: lorapipe {' '.join(rest)}"
        if not rest:
            continue
        sub = rest[0]
        if sub not in subs:
            bad.append(f"{where}: no subcommand {sub!r} (lorapipe has: {', '.join(subs)})")
            continue
        help_text = subs[sub].format_help()
        options = {opt for a in subs[sub]._actions for opt in a.option_strings}
        for tok in rest[1:]:
            if tok.startswith("--"):
                flag = tok.split("=", 1)[0]
                if flag not in options or flag not in help_text:
                    bad.append(f"{where}: `lorapipe {sub} --help` has no {flag}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------- params
def param_keys(model, prefix: str = "") -> list[str]:
    """Every dotted key of a params section model; a list of sources is its own table."""
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += param_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_params_page_documents_every_key():
    from lorapipe import params

    text = (REPO / "docs" / "params.md").read_text(encoding="utf-8")
    missing = [k for k in param_keys(params.Params) if k != "data.sources" and f"`{k}`" not in text]
    assert not missing, f"docs/params.md lacks: {missing}"
    assert "## data.sources" in text
    for model in params._SOURCE_MODELS:
        for name in model.model_fields:
            tag = params._source_type(model)
            assert f"`{tag}`" in text, f"docs/params.md lacks the source type {tag}"
            if name != "type":
                assert f"`{name}`" in text, f"docs/params.md lacks the key {name} of source type {tag}"


# ---------------------------------------------------------------------------------- size, history
def test_readme_is_short():
    lines = README.read_bytes().count(b"\n")  # what `wc -l` counts
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}); move detail to docs/"


def test_no_history_in_project_text():
    hits = []
    for page in PAGES:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            m = HISTORY.search(line)
            if m:
                hits.append(f"{page.relative_to(REPO)}:{number}: {m.group(0)!r}: {line.strip()[:120]}")
    assert not hits, "state what is, not how it came to be:\n" + "\n".join(hits)
