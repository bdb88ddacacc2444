"""Greedy answers to the eval split's prompts, in LLaMA-Factory's `do_predict` file format.

A prompt is an eval row's conversation up to its last assistant turn (system and earlier turns
included), rendered with the chat template and generation prompt (core/parity.render); the label is
that last assistant reply. Every variant answers the same rendered text: the HF models in left-padded
batches through transformers, a GGUF through llama-server with parallel slots. Each variant's folder
holds `generated_predictions.jsonl` ({"prompt", "predict", "label"} per line, as LLaMA-Factory writes
it) and `predict_results.json` (its `predict_bleu-4`, `predict_rouge-*` keys plus our figures,
core/answer_scores.py).
"""

from __future__ import annotations

import json
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lorapipe.core import answer_scores, hfmodel, llama_server, parity
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import dump_jsonl_line
from lorapipe.core.log import progress

REQUEST_TIMEOUT_S = 600.0
VARIANTS = {"hf_base": "base (HF)", "hf_merged": "merged (HF)", "quant": "quantized (GGUF)"}  # key: plot label
LF_KEYS = {"bleu4": "bleu-4", "rouge1": "rouge-1", "rouge2": "rouge-2", "rougel": "rouge-l"}


@dataclass(frozen=True)
class Answer:
    text: str
    stopped: bool  # ended its turn (EOS / end-of-turn token) within max_new_tokens


def prompts_and_labels(rows: list[dict], max_rows: int | None, seed: int) -> tuple[list[list[dict]], list[str]]:
    """(conversations cut before their last assistant turn, that turn's text) of the eval rows; a
    fixed seeded subset of `max_rows` rows, in file order, when the split is larger."""
    pairs = []
    for row in rows:
        messages = row.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0 or messages[last - 1].get("role") != "user":
            continue
        pairs.append(([{"role": m["role"], "content": m["content"]} for m in messages[:last]],
                      messages[last]["content"]))
    if max_rows is not None and len(pairs) > max_rows:
        keep = sorted(random.Random(seed).sample(range(len(pairs)), max_rows))
        pairs = [pairs[i] for i in keep]
    return [p for p, _ in pairs], [label for _, label in pairs]


# ------------------------------------------------------------------------------------------- HF
def hf_generate(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int,
                desc: str = "evaluate: answers (HF)") -> list[Answer]:
    """Greedy answers of a transformers model in batches of prompts of similar length, left-padded
    with an attention mask; generation ends on core.hfmodel.stop_token_ids."""
    import torch

    stop = hfmodel.stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    ids = [parity.hf_ids(tokenizer, t) for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    out: list[Answer | None] = [None] * len(ids)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in progress(batches, desc, unit="batch"):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch])
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch])
            gen = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 repetition_penalty=1.0, eos_token_id=stop, pad_token_id=pad)
            for row, i in zip(gen[:, width:].tolist(), batch):
                # a finished sequence is filled with padding up to the batch's longest answer
                end = next((k for k, t in enumerate(row) if t in stop), None)
                new = row if end is None else row[:end]
                out[i] = Answer(tokenizer.decode(new, skip_special_tokens=True).strip(), end is not None)
    return out


# ------------------------------------------------------------------------------------ llama.cpp
def gguf_generate(gguf: Path, texts: list[str], max_new_tokens: int, *, parallel: int, threads: int,
                  startup_timeout: float = 120.0, desc: str | None = None) -> list[Answer]:
    """Greedy answers of a GGUF from llama-server with `parallel` slots, `parallel` requests at a time.
    Prompts are sent as the token ids llama.cpp's chat path makes of the rendered text
    (core/parity.llama_chat_ids, the GGUF's own tokenizer)."""
    vocab = parity.load_gguf(gguf, vocab_only=True)
    try:
        prompts = [parity.llama_chat_ids(vocab, t) for t in texts]
    finally:
        vocab.close()
    ctx = parallel * (max(len(p) for p in prompts) + max_new_tokens + 8)
    with tempfile.TemporaryDirectory(prefix="lorapipe-answers-") as work:
        sock = Path(work) / "llama-server.sock"
        cmd = llama_server.command(gguf, sock, None, ctx=ctx, alias="lorapipe-evaluate", parallel=parallel,
                                   cors_origins="localhost", threads=threads)
        endpoint = llama_server.Endpoint(socket_path=sock)
        with open(Path(work) / "llama-server.log", "w+") as log:
            proc = llama_server.start(cmd, log=log)
            try:
                try:
                    llama_server.wait_healthy(proc, endpoint, startup_timeout, what=f"llama-server on {gguf}")
                except LorapipeError as exc:
                    log.seek(0)
                    raise LorapipeError(f"{exc}; its log ends:\n{log.read()[-2000:]}") from None
                with ThreadPoolExecutor(max_workers=parallel) as pool:
                    futures = [pool.submit(_complete, endpoint, p, max_new_tokens) for p in prompts]
                    return [f.result() for f in progress(futures, desc or f"evaluate: answers {gguf.name}", unit="prompt")]
            finally:
                llama_server.stop(proc)


def _complete(endpoint: llama_server.Endpoint, prompt: list[int], max_new_tokens: int) -> Answer:
    body = {"prompt": prompt, "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0,
            "cache_prompt": False, "seed": 0}
    conn, resp = endpoint.request("POST", "/completion", json.dumps(body).encode(), timeout=REQUEST_TIMEOUT_S)
    try:
        data = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise LorapipeError(f"llama-server /completion answered {resp.status}: {data[:500]!r}")
    result = json.loads(data)
    # stop_type: "eos" = an end-of-generation token, "limit" = n_predict reached
    return Answer(result["content"].strip(), result.get("stop_type") == "eos")


# ---------------------------------------------------------------------------------------- files
def write_variant(folder: Path, prompts: list[str], answers: list[Answer], labels: list[str], results: dict) -> None:
    """One variant's LLaMA-Factory-style files into `folder` (part of a folder written atomically)."""
    folder.mkdir(parents=True)
    with open(folder / "generated_predictions.jsonl", "w", encoding="utf-8") as f:
        for prompt, answer, label in zip(prompts, answers, labels, strict=True):
            f.write(dump_jsonl_line({"prompt": prompt, "predict": answer.text, "label": label}))
    (folder / "predict_results.json").write_text(json.dumps(results, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def read_predictions(path: Path) -> list[dict]:
    """A generated_predictions.jsonl file; a line that is not an object with prompt/predict/label is
    an error naming the file and line."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise LorapipeError(f"{path}:{n}: not JSON ({exc})") from None
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("prompt", "predict", "label"))):
            raise LorapipeError(f"{path}:{n}: expected an object with string prompt, predict and label")
        rows.append(row)
    return rows



# -------------------------------------------------------------------------------------- figures
def score(answers: dict[str, list[Answer]], labels: list[str], tokenizer) -> tuple[dict, dict[str, dict], list[dict]]:
    """(flat metrics `answers_*`, each variant's predict_results.json, plot rows) of the answers of
    every variant in VARIANTS to the same prompts. n-gram figures count the tokens of `tokenizer`
    (the merged model's), for answers and references alike."""

    def tokens(texts: list[str]) -> list[list[int]]:
        return [parity.hf_ids(tokenizer, t) for t in texts]

    figs = {}
    for variant in VARIANTS:
        texts = [a.text for a in answers[variant]]
        lf = answer_scores.mean_similarity(texts, labels)
        figs[variant] = {**{k: lf[v] for k, v in LF_KEYS.items()},
                         **answer_scores.figures(texts, tokens(texts), [a.stopped for a in answers[variant]])}
    ref = answer_scores.text_figures(tokens(labels))
    agree = answer_scores.agreement([a.text for a in answers["quant"]], [a.text for a in answers["hf_merged"]])
    metrics = shared_metrics(len(labels), ref, agree)
    results = {}
    for variant, fig in figs.items():
        metrics = {**metrics, **variant_metrics(variant, fig)}
        results[variant] = {**{f"predict_{LF_KEYS.get(k, k)}": v for k, v in fig.items()},
                            **{f"label_{k}": v for k, v in ref.items()}}
    results["quant"] = {**results["quant"], **{f"predict_{k}_vs_hf_merged": v for k, v in agree.items()}}
    plot = [{"variant": label, **figs[variant]} for variant, label in VARIANTS.items()]
    return metrics, results, plot


def variant_metrics(variant: str, fig: dict) -> dict:
    """One variant's keys in metrics/eval.json."""
    return {f"answers_bleu4_{variant}": fig["bleu4"], f"answers_rouge1_{variant}": fig["rouge1"],
            f"answers_rouge2_{variant}": fig["rouge2"], f"answers_rougel_{variant}": fig["rougel"],
            f"answers_distinct1_{variant}": fig["distinct1"], f"answers_distinct2_{variant}": fig["distinct2"],
            f"answers_len_{variant}": fig["len"], f"answers_seqrep4_{variant}": fig["seqrep4"],
            f"answers_cut_{variant}": fig["cut"], f"answers_empty_{variant}": fig["empty"]}


def shared_metrics(rows: int, ref: dict, agree: dict) -> dict:
    """The keys in metrics/eval.json that are not one variant's: the references' figures, quant vs merged."""
    return {"answers_rows": rows, "answers_distinct1_ref": ref["distinct1"], "answers_distinct2_ref": ref["distinct2"],
            "answers_len_ref": ref["len"], "answers_seqrep4_ref": ref["seqrep4"],
            "answers_exact_quant_vs_merged": agree["exact"], "answers_bleu4_quant_vs_merged": agree["bleu4"]}
