"""Read a YAML file that a person wrote, with errors that name the file (and line) and what it is for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lorapipe.core.errors import LorapipeError


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of `path`; `what` names the file in errors ("rules file (params key ...)").

    Not found, not UTF-8 or not valid YAML: a LorapipeError naming the file, and the line for a
    YAML mistake (PyYAML's problem mark).
    """
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorapipeError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as exc:
        raise LorapipeError(f"{path}: {what} is not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LorapipeError(f"{where}: {what} is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
