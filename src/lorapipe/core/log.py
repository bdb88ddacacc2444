"""Progress of long steps, and the one-line summary every stage prints.

One helper for every slow step: `progress()` wraps a loop, `Activity` a step that reports counts
itself (a llama.cpp tool's output, relayed by core/llamacpp_run.py) or none at all (a blocking call:
then the elapsed time is what moves). On a terminal it is a tqdm bar; when stderr is a pipe or a file
(`dvc repro` logs, CI) it prints plain lines instead, one when the step starts, one at most every
LOG_INTERVAL_S seconds and one when it ends, so the log holds no carriage-return animation.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LOG_INTERVAL_S = 15.0  # a plain progress line at most this often when stderr is no terminal
TICK_S = 1.0  # a terminal bar is redrawn this often, so a step without counts still shows its elapsed time


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


class Activity:
    """Progress of one step: `with Activity("quantize: imatrix", total=40, unit="chunk") as a: a.update()`."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it"):
        self.desc, self.total, self.unit = desc, total, unit
        self.count = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._tty = sys.stderr.isatty()
        self._bar = None

    def __enter__(self) -> "Activity":
        self.start = time.monotonic()
        self._last_line = self.start
        if self._tty:
            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=sys.stderr, mininterval=0.5,
                             dynamic_ncols=True)
        else:
            info(f"{self.desc}: started{f' ({self.total} {self.unit})' if self.total else ''}")
        self._ticker = threading.Thread(target=self._tick, name=f"progress {self.desc}", daemon=True)
        self._ticker.start()
        return self

    def _state(self) -> str:
        done = f"{self.count}/{self.total} {self.unit}" if self.total else (f"{self.count} {self.unit}" if self.count else "")
        return ", ".join(filter(None, [done, _fmt_s(time.monotonic() - self.start)]))

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()
                elif time.monotonic() - self._last_line >= LOG_INTERVAL_S:
                    self._last_line = time.monotonic()
                    info(f"{self.desc}: {self._state()}")

    def update(self, n: int = 1) -> None:
        self.set(self.count + n)

    def set(self, count: int, total: int | None = None) -> None:
        """Absolute progress (what a tool prints: `[12/272]`); `total` once it is known."""
        with self._lock:
            if total is not None and total != self.total:
                self.total = total
                if self._bar is not None:
                    self._bar.total = total
            if count != self.count:
                if self._bar is not None:
                    self._bar.update(count - self.count)
                self.count = count

    def __exit__(self, exc_type, *exc) -> None:
        self._stop.set()
        self._ticker.join()
        if self._bar is not None:
            self._bar.close()
        else:
            info(f"{self.desc}: {'done' if exc_type is None else 'stopped'}, {self._state()}")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate `items` with an Activity: a tqdm bar on a terminal, plain lines in a log."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Activity(desc, total=total, unit=unit) as act:
        for item in items:
            yield item
            act.update()


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
