"""Atomic writes and line-numbered JSONL.

Every artifact is written to a temporary sibling and renamed into place only when complete, so an
interrupted stage (Ctrl-C, kill -9, disk full) never leaves a half-written file or folder at an
output path for DVC to register.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it replaces `final`, on error it is removed.

    For a folder (is_dir=True) the temporary folder is created empty for the caller to fill.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A run killed with SIGKILL cannot remove its temporary sibling: the next write of the same
    # output does, so a killed merge does not leave a model-sized folder behind. (DVC runs one stage
    # of a repository at a time, so no live writer of this output owns one.)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        _remove(stale)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    # mkstemp/mkdtemp create private (0600/0700) paths; give the artifact the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
    try:
        yield tmp
        if is_dir:
            _remove(final)
            os.replace(tmp, final)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Small JSON (metrics, reports): sorted keys and a trailing newline so diffs stay readable."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def dump_jsonl_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


class JsonlLine:
    """One physical line of a JSONL file: its 1-based number and either a value or an error."""

    __slots__ = ("lineno", "value", "error", "text")

    def __init__(self, lineno: int, value: Any = None, error: str | None = None, text: str = ""):
        self.lineno, self.value, self.error, self.text = lineno, value, error, text


def iter_jsonl(path: str | Path) -> Iterator[JsonlLine]:
    """Yield every non-blank line of a JSONL file with its line number, never raising on bad lines.

    Reads bytes so that one line of invalid UTF-8 is reported on that line instead of failing the
    whole file; tolerates a UTF-8 BOM at file start and CRLF line ends. Blank lines are skipped
    (they hold no row), everything else comes back with `.value` or `.error`.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield JsonlLine(lineno, error=f"invalid UTF-8 at byte {exc.start}", text=raw.decode("utf-8", "replace"))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield JsonlLine(lineno, error=f"invalid JSON: {exc.msg} (column {exc.colno})", text=text)
                continue
            yield JsonlLine(lineno, value=value, text=text)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file written by a stage; any bad line is an error naming file and line."""
    rows = []
    for line in iter_jsonl(path):
        if line.error:
            raise ValueError(f"{path}:{line.lineno}: {line.error}")
        rows.append(line.value)
    return rows
