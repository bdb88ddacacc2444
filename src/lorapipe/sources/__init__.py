"""One adapter per data source type -> ShareGPT rows.

Each adapter module has `read(ctx) -> Iterator[dict]` yielding, per record it reads, either a row
`{"messages", "source", "origin"}` or a quarantine record `{"source", "origin", "error", "raw"}`.
The modules are imported on use, so a run pays only for the adapters its params name.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def adapter(source_type: str) -> ModuleType:
    """The module for a params source `type`. The valid types are listed once, in
    lorapipe.params.SOURCE_TYPES (params are validated before any stage runs); each names a module here."""
    if source_type.startswith("_") or importlib.util.find_spec(f"lorapipe.sources.{source_type}") is None:
        raise ValueError(f"unknown source type {source_type!r} (the valid ones: lorapipe.params.SOURCE_TYPES)")
    return importlib.import_module(f"lorapipe.sources.{source_type}")
