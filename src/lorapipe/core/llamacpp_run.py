"""Run a pinned llama.cpp tool and turn a failure into a readable LorapipeError.

llama.cpp tools log everything (model load, system info, results) to stderr, and some of them exit 0
even when they did nothing useful (llama-perplexity on too short a text prints an error and returns
0). So callers get stdout + stderr back, and a failure message ends with the tail of stderr, where
llama.cpp says what went wrong.

The tools log through an asynchronous logger whose singleton is deliberately never destroyed
(common/log.cpp), so lines still queued when the process exits are lost: a load error can come back
as an empty stderr, and a result printed just before exit can be missing; an immediate load
failure often loses all of its output. `run_tool` therefore runs a tool a second time when it
failed silently or when the line the caller `expect`s is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lorapipe.core.errors import LorapipeError
from lorapipe.core.llamacpp import LlamaCppMissing, tool

TAIL_LINES = 25
QUICK_S = 5.0  # a failed run shorter than this is repeated up to QUICK_SILENT_TRIES times when silent
QUICK_SILENT_TRIES = 10


@dataclass(frozen=True)
class ToolResult:
    args: list[str]
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together (llama.cpp splits its report between both)."""
        return self.stdout + "\n" + self.stderr


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last non-blank lines of a tool's output, indented: every failure message that quotes a
    tool (llama.cpp's, and convert's converter script) ends with this."""
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in kept)


def tool_error(what: str, result: ToolResult, reason: str) -> LorapipeError:
    """An error for a tool run that finished but produced no usable result."""
    return LorapipeError(f"{what}: {reason}\n  command: {' '.join(result.args)}\n  stderr tail:\n{tail(result.stderr or result.stdout)}")


def run_tool(name: str, args: list[str | Path], *, what: str, timeout: float | None = None,
             expect: str | None = None, attempts: int = 2, cwd: str | Path | None = None) -> ToolResult:
    """Run `name` (e.g. 'llama-perplexity') with `args`; raise LorapipeError with the stderr tail on failure.

    `what` says in words what the run was for ("perplexity of models/gguf/model-f16.gguf"). `expect`
    is a regex the output must contain (the result line); a run without it, or a failed run whose
    output was lost, is repeated up to `attempts` times (module docstring). A result still lacking
    `expect` is returned: the caller explains what is missing. `cwd` is the folder the tool runs in.
    """
    try:
        exe = tool(name)
    except LlamaCppMissing as exc:
        raise LorapipeError(str(exc)) from None
    argv = [str(exe), *(str(a) for a in args)]
    # The tools find their shared libraries through RPATH; LD_LIBRARY_PATH is a fallback for moved builds.
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(exe.parent), env.get("LD_LIBRARY_PATH")]))
    tries = 0
    while True:
        tries += 1
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL, cwd=cwd)
        except subprocess.TimeoutExpired as exc:
            out = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise tool_error(what, ToolResult(argv, "", out), f"{name} did not finish within {timeout:.0f} s") from None
        result = ToolResult(argv, proc.stdout, proc.stderr)
        if proc.returncode == 0 and (expect is None or re.search(expect, result.output)):
            return result
        if proc.returncode != 0 and not _lost_output(result):
            break  # a real failure that says why: no point repeating it
        # A quick silent failure (a load error) costs next to nothing to repeat until its message shows.
        quick_silent = proc.returncode != 0 and time.monotonic() - start < QUICK_S
        if tries >= (QUICK_SILENT_TRIES if quick_silent else attempts):
            break
    if proc.returncode != 0:
        reason = f"{name} failed with exit code {proc.returncode}"
        if proc.returncode < 0:
            reason += f" (killed by signal {-proc.returncode})"
        if _lost_output(result):
            reason += (" and its error message was lost (llama.cpp's asynchronous log drops its last lines at exit); "
                       "run the command below by hand to see it")
        raise tool_error(what, result, reason)
    return result


def _lost_output(result: ToolResult) -> bool:
    """A failed run whose error lines never reached the pipe (only start-up lines came through)."""
    return not re.search(r"\b(E|error|failed|unable)\b", result.stderr, flags=re.I)
