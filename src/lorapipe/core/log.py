"""Progress bars and the one-line summary every stage prints."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm bar on stderr; quiet when stderr is not a terminal and the work is short."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, mininterval=1.0, dynamic_ncols=True))


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def summary(stage: str, fields: dict, seconds: float) -> str:
    """`[clean] kept=1234 rejected=5 ... (3.2 s)`: one line, stable order, floats rounded."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return f"[{stage}] {' '.join(parts)} ({seconds:.1f} s)"
