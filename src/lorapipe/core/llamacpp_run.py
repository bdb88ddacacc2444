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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


@dataclass(frozen=True)
class ToolProgress:
    """How to read a tool's own progress from its output, relayed to a core.log.Activity.

    `pattern` matches one progress mark; `count(match)` turns the last mark seen into (done, total or
    None); by default the groups `n` and, when the mark carries it, `of`. `total` is a regex whose
    group 1 gives the total where the marks do not ("computing over 40 chunks"). A tool that prints
    no marks still shows its elapsed time."""

    desc: str
    pattern: str
    unit: str = "it"
    total: str | None = None
    count: Callable[[re.Match], tuple[int, int | None]] | None = None
    total_count: Callable[[re.Match], int] | None = None  # the total from `total`'s match (default: group 1)

    def read(self, match: re.Match) -> tuple[int, int | None]:
        if self.count is not None:
            return self.count(match)
        of = match.groupdict().get("of")
        return int(match["n"]), int(of) if of else None


def run_with_progress(argv: list[str], prog: ToolProgress, *, env: dict | None = None, timeout: float | None = None,
                      cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True) that also reads the output as it comes and relays the
    tool's progress marks (llama.cpp prints some without a newline, so the pipes are read in chunks)."""
    from lorapipe.core.log import Activity

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                            cwd=cwd)
    pattern = re.compile(prog.pattern)
    total_re = re.compile(prog.total) if prog.total else None
    chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    with Activity(prog.desc, unit=prog.unit) as act:
        lock = threading.Lock()

        def pump(name: str, stream) -> None:
            carry = ""
            for chunk in iter(lambda: stream.read1(65536), b""):
                chunks[name].append(chunk)
                text = carry + chunk.decode("utf-8", "replace")
                carry = text[-200:]  # a mark split between two reads is still seen
                with lock:
                    total = None
                    if total_re is not None and act.total is None and (t := total_re.search(text)):
                        total = prog.total_count(t) if prog.total_count else int(t.group(1))
                    marks = list(pattern.finditer(text))
                    if marks:
                        n, of = prog.read(marks[-1])
                        act.set(max(n, act.count), of or total)
                    elif total is not None:
                        act.set(act.count, total)

        threads = [threading.Thread(target=pump, args=(n, s), daemon=True)
                   for n, s in (("out", proc.stdout), ("err", proc.stderr))]
        for t in threads:
            t.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for t in threads:
                t.join()
            raise subprocess.TimeoutExpired(argv, timeout, b"".join(chunks["out"]), b"".join(chunks["err"])) from None
        for t in threads:
            t.join()
        if proc.returncode == 0 and act.total:
            act.set(act.total)  # finished: all of it is done, even if the last mark was not printed
    out, err = (b"".join(chunks[k]).decode("utf-8", "replace") for k in ("out", "err"))
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last non-blank lines of a tool's output, indented: every failure message that quotes a
    tool (llama.cpp's, and convert's converter script) ends with this."""
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in kept)


def tool_error(what: str, result: ToolResult, reason: str) -> LorapipeError:
    """An error for a tool run that finished but produced no usable result."""
    return LorapipeError(f"{what}: {reason}\n  command: {' '.join(result.args)}\n  stderr tail:\n{tail(result.stderr or result.stdout)}")


def run_tool(name: str, args: list[str | Path], *, what: str, timeout: float | None = None,
             expect: str | None = None, attempts: int = 2, progress: ToolProgress | None = None,
             cwd: str | Path | None = None) -> ToolResult:
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
            if progress is not None:
                proc = run_with_progress(argv, progress, env=env, timeout=timeout, cwd=cwd)
            else:
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


# ------------------------------------------------------------------ the progress marks of our tools
def imatrix_progress(desc: str) -> ToolProgress:
    """llama-imatrix without perplexity prints nothing per chunk, and it decodes n_seq chunks per pass
    (16 at our context), so its steps are passes: the first says how long one takes."""
    return ToolProgress(desc, r"seconds per pass", unit="pass", count=lambda m: (1, None),
                        total=r"computing over (\d+) chunks, .*n_seq=(\d+)",
                        total_count=lambda m: -(-int(m[1]) // int(m[2])))


def chunk_progress(desc: str) -> ToolProgress:
    """llama-perplexity: `[12]4.1234,` per chunk (the running ppl), or a row per chunk
    in --kl-divergence mode (`  12    4.1234 ± ...`); the total from "over N chunks"."""
    return ToolProgress(desc, r"\[(?P<n>\d+)\]\d|(?m:^)[ \t]*(?P<k>\d+)[ \t]+[\d.]+ ± ", unit="chunk",
                        total=r"over (\d+) chunks", count=lambda m: (int(m["n"] or m["k"]), None))


def writer_progress(desc: str) -> ToolProgress:
    """convert_hf_to_gguf.py: gguf-py's `Writing:  45%|...` bar while it converts and writes the tensors."""
    return ToolProgress(desc, r"Writing:\s*(?P<n>\d+)%", unit="%", count=lambda m: (int(m["n"]), 100))


def tensor_progress(desc: str) -> ToolProgress:
    """llama-quantize: `[  12/ 272] blk.0.attn_q.weight - ...` per tensor."""
    return ToolProgress(desc, r"\[\s*(?P<n>\d+)/\s*(?P<of>\d+)\]", unit="tensor")


def bench_progress(desc: str) -> ToolProgress:
    """llama-bench --progress: `benchmark 1/2: prompt run 2/3` per timed repetition."""
    def count(m: re.Match) -> tuple[int, int]:
        b, nb, r, nr = (int(x) for x in m.groups())
        return (b - 1) * nr + r, nb * nr

    return ToolProgress(desc, r"benchmark (\d+)/(\d+): (?:prompt|generation) run (\d+)/(\d+)", unit="run", count=count)
