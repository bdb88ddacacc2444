"""The train YAML's `dataset` -> data.sources: one `llamafactory` source per dataset name.

The names are checked against the dataset_info.json they are registered in (--dataset-info, else
`<dataset_dir>/dataset_info.json`) when that file is there; reading the entries themselves is the
ingest adapter's job (lorapipe/sources/llamafactory.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.core.errors import LorapipeError


def dataset_sources(cfg: dict, file: str, dataset_info: str | None, warnings: list[str]) -> list[dict]:
    """The sources for `cfg["dataset"]`; an unknown name or a missing --dataset-info is an error, a
    missing default dataset_info.json a warning (appended to `warnings`)."""
    names = [n.strip() for n in (cfg["dataset"] if isinstance(cfg["dataset"], list) else str(cfg["dataset"]).split(",")) if n.strip()]
    if not names:
        raise LorapipeError(f"{file}: dataset is empty")
    info_path = Path(dataset_info) if dataset_info else Path(cfg.get("dataset_dir", "data")) / "dataset_info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise LorapipeError(f"{info_path}: not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise LorapipeError(f"{info_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(info, dict):
            raise LorapipeError(f"{info_path}: expected an object of dataset entries, got {type(info).__name__}")
        missing = [n for n in names if n not in info]
        if missing:
            raise LorapipeError(f"{file}: dataset {', '.join(missing)} not registered in {info_path} "
                                f"(it has: {', '.join(info) or 'nothing'})")
    elif dataset_info:
        raise LorapipeError(f"{info_path}: dataset_info.json not found")
    else:
        warnings.append(f"{file}: {info_path} not found; the sources point at it anyway "
                        "(pass --dataset-info to check the dataset names now)")
    return [{"name": n, "type": "llamafactory", "dataset_info": info_path.as_posix(), "datasets": [n]} for n in names]
