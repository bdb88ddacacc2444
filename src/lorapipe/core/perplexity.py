"""Perplexity on one token stream, computed the same way by transformers and by llama-perplexity.

The eval split is rendered with the chat template, concatenated into one text and tokenized once.
llama-perplexity reads that text from a file; the HF side scores the identical token ids with
llama-perplexity's convention, so HF and GGUF numbers are directly comparable:

* the stream is cut into `n_chunks` chunks of `ctx` tokens (at most len // ctx, and the tool needs at
  least 2 * ctx tokens);
* if the vocab adds a BOS, the stream starts with one and the first token of every chunk is replaced
  by BOS (the replaced token is never scored);
* each chunk is evaluated from an empty cache at positions 0..ctx-1 and only its second half is
  scored: logits at positions ctx//2 .. ctx-2 predict tokens ctx//2+1 .. ctx-1 (ctx - 1 - ctx//2
  tokens per chunk); ppl = exp(mean NLL over all scored tokens).

Special tokens: llama-perplexity tokenizes its input file without parsing special tokens
(common_tokenize(..., parse_special=false) in tools/perplexity), so chat markers such as
`<|im_start|>` are scored as the plain text they are written as. The HF tokenizer is run with
`split_special_tokens=True` to produce the same ids, and `llama-tokenize --no-parse-special` checks
that llama.cpp's ids are exactly ours before any number is compared.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import iter_jsonl
from lorapipe.core.llamacpp_run import ToolResult, chunk_progress, run_tool, tool_error
from lorapipe.core.log import progress
from lorapipe.core.sharegpt import Invalid, validate_row

# Below this a chunk scores fewer than 8 tokens and the number means little.
MIN_CTX = 16


# ---------------------------------------------------------------------------------- the stream
def read_eval_rows(path: str | Path) -> list[dict]:
    """Eval rows; a bad line is an error naming file and line (clean writes valid rows, so this is
    a hand-edited or foreign file)."""
    rows = []
    for line in iter_jsonl(path):
        if line.error:
            raise LorapipeError(f"{path}:{line.lineno}: {line.error}")
        try:
            validate_row(line.value)
        except Invalid as exc:
            raise LorapipeError(f"{path}:{line.lineno}: not a ShareGPT row: {exc}") from None
        rows.append(line.value)
    return rows


def render_text(rows: list[dict], tokenizer, path: str | Path = "eval.jsonl") -> str:
    """Every row rendered with the chat template, concatenated.

    A template that opens with the BOS text (Gemma's `{{ bos_token }}`) has it removed per row: BOS
    belongs to the chunking convention above (added by llama.cpp per chunk), not to every dialogue.
    The text never ends with a newline: llama-perplexity's `-f` drops one trailing newline, so a text
    ending in one would be tokenized differently by the two sides.
    """
    bos_text = tokenizer.bos_token or ""
    parts = []
    for i, row in enumerate(rows, start=1):
        try:
            text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        except Exception as exc:  # jinja raises its own errors (e.g. a role the template refuses)
            raise LorapipeError(f"{path}: row {i}: the chat template cannot render it: {exc}") from None
        if bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
        parts.append(text)
    return "".join(parts).rstrip("\n")


def hf_text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as llama-perplexity sees it: special-token text not parsed, no BOS."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def llama_text_ids(gguf: str | Path, text_file: str | Path) -> list[int]:
    """llama.cpp's tokenization of the file exactly as llama-perplexity does it (BOS if the vocab adds
    one, special tokens not parsed). llama-tokenize loads the vocabulary only: about a second."""
    res = run_tool("llama-tokenize", ["-m", gguf, "-f", text_file, "--ids", "--no-parse-special", "--no-escape"],
                  what=f"tokenizing the eval text with {gguf}")
    m = re.search(r"\[([\d,\s]*)\]", res.stdout)
    if not m:
        raise tool_error(f"tokenizing the eval text with {gguf}", res, "no token id list in llama-tokenize's output")
    return json.loads("[" + m.group(1) + "]")


@dataclass(frozen=True)
class Stream:
    ids: list[int]        # the full stream as llama-perplexity sees it (BOS first when the vocab adds one)
    bos_id: int | None    # set when the vocab adds a BOS: chunk starts are replaced by it


def check_same_ids(tokenizer, hf_ids: list[int], llama_ids: list[int], gguf: str | Path) -> Stream:
    """Our ids must be llama.cpp's ids, possibly with one token in front: the BOS its vocab adds
    (common_tokenize with add_special). Else say where they differ."""
    if llama_ids == hf_ids:
        return Stream(hf_ids, None)
    if llama_ids[1:] == hf_ids:
        return Stream(llama_ids, llama_ids[0])
    ours = llama_ids[:1] + hf_ids if len(llama_ids) == len(hf_ids) + 1 else hf_ids
    first = next((k for k, (a, b) in enumerate(zip(ours, llama_ids)) if a != b), min(len(ours), len(llama_ids)))
    lo, hi = max(0, first - 3), first + 5
    pieces = lambda ids: " ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in ids)  # noqa: E731
    raise LorapipeError(
        f"the eval text tokenizes differently in transformers and in llama.cpp ({gguf}): "
        f"HF {len(ours)} tokens, llama.cpp {len(llama_ids)}, first difference at token {first}\n"
        f"  HF        {ours[lo:hi]}  {pieces(ours[lo:hi])}\n  llama.cpp {llama_ids[lo:hi]}  {pieces(llama_ids[lo:hi])}\n"
        "perplexities would not be comparable: the converted tokenizer is wrong (docs/toolchain.md#tokenizer-resave)")


@dataclass(frozen=True)
class ChunkPlan:
    ctx: int          # context length used (evaluate.ctx, or shorter for a short eval split)
    n_chunks: int
    shrunk: bool      # ctx was lowered because the stream is shorter than 2 * evaluate.ctx

    @property
    def scored_per_chunk(self) -> int:
        return self.ctx - 1 - self.ctx // 2

    @property
    def scored(self) -> int:
        return self.n_chunks * self.scored_per_chunk


def plan_chunks(n_tokens: int, ctx: int, max_chunks: int, path: str | Path = "eval split") -> ChunkPlan:
    """llama-perplexity needs >= 2 * ctx tokens. A shorter stream gets ctx = n_tokens // 2 (stated
    in the metrics as ctx_used), unless that is below MIN_CTX: then it is an error."""
    shrunk = False
    if n_tokens < 2 * ctx:
        shrunk, ctx = True, n_tokens // 2
        if ctx < MIN_CTX:
            raise LorapipeError(
                f"{path}: the eval split is {n_tokens} tokens long; perplexity needs at least {2 * MIN_CTX} "
                f"(two chunks of {MIN_CTX}). Give the eval split more rows (data.split.eval_fraction)")
    return ChunkPlan(ctx, min(max_chunks, n_tokens // ctx), shrunk)


# ------------------------------------------------------------------------------------ HF side
def hf_perplexity(model, stream: Stream, plan: ChunkPlan, batch_size: int = 4, desc: str = "perplexity (HF)") -> float:
    """Perplexity of a transformers causal LM with llama-perplexity's convention (module docstring)."""
    import torch

    ctx, first = plan.ctx, plan.ctx // 2
    chunks = torch.tensor(stream.ids[: plan.n_chunks * ctx], dtype=torch.long).view(plan.n_chunks, ctx)
    inputs = chunks.clone()
    if stream.bos_id is not None:
        inputs[:, 0] = stream.bos_id
    targets = chunks[:, first + 1:]
    nll, count = 0.0, 0
    with torch.inference_mode():
        for b in progress(range(0, plan.n_chunks, batch_size), desc, unit="batch"):
            # logits only for positions first..ctx-1 (the last one predicts past the chunk: dropped)
            logits = model(input_ids=inputs[b:b + batch_size], logits_to_keep=ctx - first).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            tok_lp = logp.gather(-1, targets[b:b + batch_size].unsqueeze(-1)).squeeze(-1)
            nll -= tok_lp.double().sum().item()
            count += tok_lp.numel()
    return math.exp(nll / count)


# ---------------------------------------------------------------------------- llama-perplexity
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|nan|inf)"


def _ppl_args(gguf, plan: ChunkPlan, threads: int) -> list:
    # -b ctx: one sequence per batch; llama-perplexity asserts n_batch % ctx == 0 for larger batches,
    # which an automatically shortened ctx would break.
    return ["-m", gguf, "-c", plan.ctx, "-b", plan.ctx, "--chunks", plan.n_chunks, "-t", threads]


def _short_text_error(what: str, res: ToolResult) -> LorapipeError | None:
    if "you need at least" in res.output:
        return tool_error(what, res, "the eval text is shorter than two context windows for llama-perplexity")
    return None


def gguf_perplexity(gguf: str | Path, text_file: str | Path, plan: ChunkPlan, threads: int,
                    logits_file: str | Path | None = None) -> float:
    """llama-perplexity's final estimate for `gguf` on the text; with `logits_file`, it also saves
    the log-probs that a later `gguf_kl_divergence` compares against."""
    what = f"llama-perplexity on {gguf}"
    args = _ppl_args(gguf, plan, threads) + ["-f", text_file]
    if logits_file is not None:
        args += ["--kl-divergence-base", logits_file]
    res = run_tool("llama-perplexity", args, what=what, expect=r"Final estimate: PPL =",
                   progress=chunk_progress(f"perplexity {Path(gguf).name}"))
    m = re.search(rf"Final estimate: PPL = ({_NUM})", res.output)
    if not m:
        raise _short_text_error(what, res) or tool_error(what, res, "no 'Final estimate: PPL' in its output")
    return float(m.group(1))


@dataclass(frozen=True)
class KldResult:
    ppl: float                  # perplexity of the compared model on the base file's tokens
    ln_ppl_ratio: float         # mean ln(PPL(Q)/PPL(base))
    kld: float                  # mean KL divergence of the compared model's distribution from the base's
    rms_dp_pct: float           # RMS of the change in the correct token's probability, %
    same_top_pct: float         # % of scored positions where both models' top token agree


def parse_kl_divergence(output: str) -> KldResult:
    """Read llama-perplexity --kl-divergence output.

    The final statistics block is printed only when >= 100 tokens were scored; otherwise the last
    per-chunk row (running totals) holds the same figures with fewer decimals, so it is the fallback.
    """
    final = {
        "ppl": rf"Mean PPL\(Q\)\s*:\s*({_NUM})",
        "ln_ppl_ratio": rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*({_NUM})",
        "kld": rf"Mean\s+KLD:\s*({_NUM})",
        "rms_dp_pct": rf"RMS Δp\s*:\s*({_NUM})",
        "same_top_pct": rf"Same top p:\s*({_NUM})",
    }
    found = {k: re.search(p, output) for k, p in final.items()}
    if all(found.values()):
        return KldResult(**{k: float(m.group(1)) for k, m in found.items()})
    pm = rf"({_NUM})\s*±\s*{_NUM}"
    rows = re.findall(rf"^\s*\d+\s+{pm}\s+{pm}\s+{pm}\s+{pm}\s*%\s+{pm}\s*%\s*$", output, flags=re.M)
    if not rows:
        raise ValueError("no KL-divergence statistics in llama-perplexity's output")
    ppl, ratio, kld, rms, same = (float(x) for x in rows[-1])
    return KldResult(ppl, ratio, kld, rms, same)


def gguf_kl_divergence(gguf: str | Path, logits_file: str | Path, plan: ChunkPlan, threads: int) -> KldResult:
    """KL divergence of `gguf` against the log-probs saved by `gguf_perplexity(..., logits_file=)`;
    the tokens come from that file, so both runs score exactly the same positions."""
    what = f"llama-perplexity --kl-divergence on {gguf}"
    # the line that must be there: the final block's last line, or (< 100 scored tokens) the last chunk's row
    expect = r"Same top p:" if plan.scored >= 100 else rf"(?m)^\s*{plan.n_chunks}\s+{_NUM}\s*±"
    res = run_tool("llama-perplexity", _ppl_args(gguf, plan, threads) + ["--kl-divergence-base", logits_file,
                                                                         "--kl-divergence"], what=what, expect=expect,
                   progress=chunk_progress(f"KL divergence {Path(gguf).name}"))
    if not re.search(expect, res.output):
        raise tool_error(what, res, f"no KL-divergence result for all {plan.n_chunks} chunks in its output")
    try:
        return parse_kl_divergence(res.output)
    except ValueError as exc:
        raise tool_error(what, res, str(exc)) from None
