"""One adapter per data source type -> ShareGPT rows.

Each adapter module has `read(ctx) -> Iterator[dict]` yielding, per record it reads, either a row
`{"messages", "source", "origin"}` or a quarantine record `{"source", "origin", "error", "raw"}`.
The modules are imported on use, so a run pays only for the adapters its params name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# params `type` -> module in this package (the same names as lorapipe.params.SOURCE_TYPES)
ADAPTERS = ("sharegpt", "llamafactory", "empathetic_dialogues", "daily_dialog", "emotion_lines", "chatterbot", "chitchat")


def adapter(source_type: str) -> ModuleType:
    if source_type not in ADAPTERS:
        raise ValueError(f"unknown source type {source_type!r}; valid types: {', '.join(ADAPTERS)}")
    return importlib.import_module(f"lorapipe.sources.{source_type}")
