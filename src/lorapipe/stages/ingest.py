"""Stage `ingest`: every source listed in `data.sources` -> `data/raw/<name>.jsonl` (ShareGPT rows).

Each line of a raw file is a row `{"messages", "source", "origin"}` or, for input that could not be
read as a row at all, a quarantine record `{"source", "origin", "error", "raw"}`. Ingest converts
faithfully and judges no structure: `clean` validates every row with a file:line reason, and its
counts add up to everything written here. The one thing of an input not written is a blank line of
a JSONL file (it holds no row): counted per source, so for such a file rows + quarantined +
blank_lines is its line count. data/raw is this stage's whole output: it is rebuilt as
one folder and swapped in atomically, so files of sources no longer listed disappear with it and an
interrupted run leaves the previous folder untouched.
"""

from __future__ import annotations

from collections import Counter

from lorapipe.core.inputs import Input
from lorapipe.core.io import atomic_path, dump_jsonl_line
from lorapipe.core.log import progress
from lorapipe.core.paths import RAW_DIR
from lorapipe.sources import adapter
from lorapipe.sources._common import Context


def _contexts(params) -> list[Context]:
    return [Context(source=src, key=f"data.sources[{i}] ({src.name})") for i, src in enumerate(params.data.sources)]


def inputs(params) -> list[Input]:
    """Every file, folder or package pin the sources read: dvc.yaml lists each as a dep (core/inputs.py)."""
    return [i for ctx in _contexts(params) for i in adapter(ctx.source.type).inputs(ctx)]


def run(params) -> dict:
    sources = params.data.sources
    summary: dict = {"sources": len(sources), "rows": 0, "quarantined": 0, "blank_lines": 0}
    extra: Counter = Counter()
    with atomic_path(RAW_DIR, is_dir=True) as tmp:
        for ctx in _contexts(params):
            src = ctx.source
            rows = quarantined = 0
            # The file goes straight into the temporary folder: the folder swap is the atomic step.
            # backslashreplace: a lone surrogate (from a JSON "\\ud800" escape in the input) cannot be
            # encoded as UTF-8; written back as the same JSON escape, `clean` rejects it by name.
            with open(tmp / f"{src.name}.jsonl", "w", encoding="utf-8", errors="backslashreplace", newline="\n") as f:
                for record in progress(adapter(src.type).read(ctx), desc=f"ingest {src.name}", unit="row"):
                    f.write(dump_jsonl_line(record))
                    if "error" in record:
                        quarantined += 1
                    else:
                        rows += 1
            blank = ctx.stats.pop("blank_lines", 0)
            summary[f"rows.{src.name}"] = rows
            if quarantined:
                summary[f"quarantined.{src.name}"] = quarantined
            if blank:
                summary[f"blank_lines.{src.name}"] = blank
            summary["rows"] += rows
            summary["quarantined"] += quarantined
            summary["blank_lines"] += blank
            extra.update(ctx.stats)
    if extra.get("trimmed_turns"):
        summary["trimmed_turns"] = extra["trimmed_turns"]
    if extra.get("conversations_over_limit"):
        summary["over_cap"] = extra["conversations_over_limit"]
    return summary
