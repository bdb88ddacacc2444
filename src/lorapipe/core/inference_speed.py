"""Inference speed on this machine: prompt and decode tokens/s of GGUF files (llama-bench) and of an
HF model (torch), the memory-copy bandwidth, and the decode bound it implies.

Used by stage `evaluate` (speed metrics) and benchmarks/inference.py (targets). Same shape of test
on both sides: prompt = one forward over `prompt_tokens` tokens; decode = `gen_tokens` tokens
generated one by one from an (almost) empty context, which is what llama-bench's tg test does.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorapipe.core.llamacpp_run import bench_progress, run_tool, tool_error
from lorapipe.core.log import Activity


def gguf_speed(gguf: str | Path, *, prompt_tokens: int, gen_tokens: int, threads: int, repetitions: int = 3) -> dict:
    """{'prompt_tok_s', 'decode_tok_s'} of `gguf` from llama-bench: the best of `repetitions` runs
    after its warm-up run, the same statistic hf_speed takes (the run least disturbed by other work).

    With flash attention on (-fa 1): llama-bench's default is off, but llama-completion and
    llama-server (what `lorapipe chat` / `serve` run) default to "auto", which picks the flash
    attention kernel on CPU, which decodes faster there. So the figure is what users get.
    """
    what = f"llama-bench on {gguf}"
    res = run_tool("llama-bench", ["-m", gguf, "-p", prompt_tokens, "-n", gen_tokens, "-t", threads,
                                   "-fa", 1, "-r", repetitions, "-o", "json", "--progress"], what=what,
                   progress=bench_progress(f"llama-bench {Path(gguf).name}"))
    try:
        rows = json.loads(res.stdout[res.stdout.index("["):])
        pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
        tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
    except (ValueError, StopIteration, KeyError, TypeError) as exc:
        raise tool_error(what, res, f"could not read llama-bench's JSON output ({exc})") from None
    return {"prompt_tok_s": _best_rate(pp), "decode_tok_s": _best_rate(tg)}


def _best_rate(row: dict) -> float:
    """The fastest of a llama-bench result's repetitions (its mean when the samples are missing)."""
    return float(max(row.get("samples_ts") or [row["avg_ts"]]))


def hf_speed(model, prompt_ids: list[int], *, gen_tokens: int, repetitions: int = 2) -> dict:
    """{'prompt_tok_s', 'decode_tok_s'} of a transformers model on the current torch threads.

    Decode is timed inside `generate` (what a user of the HF model calls), greedy, forced to produce
    exactly gen_tokens tokens from a one-token prompt: a streamer stamps each new token, and the rate
    is taken between the first and the last one, so prompt processing and set-up are not counted.
    Prompt speed is one forward pass over prompt_ids. Best of `repetitions` for each (the run least
    disturbed by other work on the machine).
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value) -> None:  # called with the prompt, then with every new token
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    prompt = torch.tensor([prompt_ids], dtype=torch.long)
    one = prompt[:, :1]
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id
        pad = pad[0] if isinstance(pad, list) else pad

    def decode_rate(n: int) -> float:
        clock = TokenClock()
        model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=pad, streamer=clock)
        new = clock.stamps[1:]  # stamps[0] is the prompt
        return (len(new) - 1) / (new[-1] - new[0])

    def prefill_seconds() -> float:
        start = time.perf_counter()
        model(input_ids=prompt, logits_to_keep=1)
        return time.perf_counter() - start

    with torch.inference_mode(), Activity("speed (HF)", total=2 * repetitions, unit="run") as act:
        def counted(value: float) -> float:
            act.update()
            return value

        decode_rate(2)  # warm-up: first calls allocate and pick kernels
        t_prompt = min(counted(prefill_seconds()) for _ in range(repetitions))
        rate = max(counted(decode_rate(gen_tokens)) for _ in range(repetitions))
    return {"prompt_tok_s": len(prompt_ids) / t_prompt, "decode_tok_s": rate}


def gguf_tensor_bytes(gguf: str | Path) -> int:
    """Bytes of all tensor data in a GGUF: what one decoded token reads from memory (every weight
    matrix is multiplied once per token; with tied embeddings the output projection reads the whole
    embedding matrix)."""
    from gguf import GGUFReader

    return int(sum(int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors))


def copy_bandwidth(threads: int, *, mib: int = 512, repetitions: int = 5) -> float:
    """Memory bandwidth in bytes/s from a numpy copy of a large array (far larger than any cache),
    split over `threads` threads (numpy releases the GIL while copying), best of `repetitions`.
    Counted the STREAM way: each copied byte is read once and written once (2 bytes moved)."""
    import numpy as np

    n = mib * 1024 * 1024 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

    def part(b: tuple[int, int]) -> None:
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repetitions):
            start = time.perf_counter()
            list(pool.map(part, bounds))
            best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best
