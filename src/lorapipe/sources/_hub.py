"""Rows of a public set from the Hugging Face hub, through `datasets.load_dataset` (online machines only)."""

from __future__ import annotations

import os
import socket
from typing import Iterator
from urllib.parse import urlparse

from lorapipe.core.errors import LorapipeError

_TRUE = {"1", "true", "yes", "on"}


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _resolve_failure() -> str | None:
    """Why the hub's host cannot be resolved, or None. A fast check: without it huggingface_hub
    retries for about 25 s before failing on a machine with no network."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or endpoint
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"cannot resolve {host}: {exc}"
    return None


def unreachable(key: str, hub_id: str, why: str) -> LorapipeError:
    return LorapipeError(
        f"{key}.hub_id: the Hugging Face hub is unreachable ({why}), so {hub_id!r} cannot be loaded. "
        f"Download the dataset's original release and set '{key}.path' to the local file instead of 'hub_id'."
    )


def load_rows(key: str, hub_id: str, split: str) -> Iterator[dict]:
    """Yield the rows of `hub_id`'s `split` as dicts; a clear error when the hub cannot be reached."""
    if _offline():
        raise unreachable(key, hub_id, "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set")
    why = _resolve_failure()
    if why:
        raise unreachable(key, hub_id, why)
    import datasets  # heavy import: only when a hub source is really used

    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except (ConnectionError, TimeoutError) as exc:
        raise unreachable(key, hub_id, f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # datasets wraps network failures in many types; name what happened
        text = f"{type(exc).__name__}: {exc}"
        if any(w in text.lower() for w in ("connect", "offline", "resolve", "timed out", "network")):
            raise unreachable(key, hub_id, text) from None
        raise LorapipeError(f"{key}.hub_id: cannot load {hub_id!r} (split {split!r}) from the hub: {text}") from None
    yield from ds
