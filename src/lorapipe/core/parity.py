"""HF <-> GGUF parity checks: tokens, chat template, stop tokens, generation stop, logits.

Each check returns figures for metrics plus a list of failures written as a readable diff, so the
stage that runs the gate (quantize) can fail with a message a person can act on. llama.cpp is used
through llama-cpp-python's bindings over our pinned build (`llamacpp.use_shared_libs()`), so the
tokenizer, EOG set and logits are exactly those the built tools use.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorapipe.core import gguf_meta, llamacpp
from lorapipe.core.hfmodel import end_of_turn_token, load_causal_lm, load_tokenizer, stop_token_ids
from lorapipe.core.errors import LorapipeError
from lorapipe.core.log import progress


# ------------------------------------------------------------------------------------- prompts
def eval_conversations(rows: list[dict], n: int) -> list[list[dict]]:
    """The first n eval rows cut before their last assistant turn: prompts the model answers."""
    out = []
    for row in rows:
        messages = row.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        if prompt and prompt[-1]["role"] == "user":
            out.append(prompt)
        if len(out) == n:
            break
    return out


def render(tokenizer, conversation: list[dict], template: str | None = None) -> str:
    return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False, add_generation_prompt=True)


def hf_ids(tokenizer, text: str) -> list[int]:
    # Rendered chat text already holds every special token it needs (that is how apply_chat_template
    # tokenizes), so no special tokens are added on top.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------ llama.cpp
@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs model loading on fd 2; keep it off unless LORAPIPE_LLAMA_VERBOSE is set."""
    if os.environ.get("LORAPIPE_LLAMA_VERBOSE"):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_gguf(path: str | Path, *, n_ctx: int = 512, vocab_only: bool = False, threads: int = 2):
    """A llama_cpp.Llama over our build; a file llama.cpp cannot load is a clear error."""
    llamacpp.use_shared_libs()
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise LorapipeError(f"{path}: GGUF file not found")
    try:
        with _quiet_stderr():
            return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=not vocab_only,
                         vocab_only=vocab_only, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    except (ValueError, RuntimeError, OSError) as exc:
        raise LorapipeError(f"{path}: llama.cpp failed to load this GGUF (truncated or corrupt file?): {exc}") from None


def vocab(llm):
    """The GGUF's vocabulary through llama.cpp's public C API (the bindings' own wrapper is private)."""
    import llama_cpp

    return llama_cpp.llama_model_get_vocab(llm.model)


def is_eog(llm, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(vocab(llm), token))


def adds_bos(llm) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_add_bos(vocab(llm)))


def llama_chat_ids(llm, text: str) -> list[int]:
    """Tokenize a rendered chat prompt the way llama.cpp's chat path does (common/chat.cpp): when the
    vocab adds a BOS and the text already starts with the BOS text, that text is dropped first;
    then tokenize with the vocab's add_bos and special tokens parsed."""
    import llama_cpp

    add_bos = adds_bos(llm)
    bos = llm.token_bos()
    if add_bos and bos >= 0:
        bos_text = llama_cpp.llama_vocab_get_text(vocab(llm), bos).decode("utf-8")
        if text.startswith(bos_text):
            text = text[len(bos_text):]
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy_stops(llm, ids: list[int], max_new_tokens: int) -> tuple[bool, int]:
    """Greedy generation from the GGUF: did it end on an EOG token within max_new_tokens?"""
    llm.reset()
    n = 0
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        n += 1
        if is_eog(llm, token):
            return True, n
        if n >= max_new_tokens:
            return False, n
    return False, n


# --------------------------------------------------------------------------------- comparisons
def _pieces(tokenizer, ids: list[int]) -> str:
    return " ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in ids)


def token_diff(tokenizer, i: int, hf: list[int], ll: list[int]) -> str:
    first = next((k for k, (a, b) in enumerate(zip(hf, ll)) if a != b), min(len(hf), len(ll)))
    lo, hi = max(0, first - 3), first + 5
    return (f"prompt {i}: token ids differ at position {first} (HF {len(hf)} tokens, llama.cpp {len(ll)})\n"
            f"  HF       [{lo}:{hi}] {hf[lo:hi]}  {_pieces(tokenizer, hf[lo:hi])}\n"
            f"  llama.cpp[{lo}:{hi}] {ll[lo:hi]}  {_pieces(tokenizer, ll[lo:hi])}")


def text_diff(i: int, hf: str, gguf: str) -> str:
    import difflib

    diff = "\n".join(difflib.unified_diff(hf.splitlines(), gguf.splitlines(), "HF template", "GGUF template", lineterm="", n=1))
    return f"prompt {i}: chat templates render different text\n{diff}"


def compare_logits(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a-b| over all positions and shared vocab, fraction of positions with the same argmax)."""
    v = min(a.shape[1], b.shape[1])
    a, b = a[:, :v], b[:, :v]
    return float(np.abs(a - b).max()), float((a.argmax(1) == b.argmax(1)).mean())


@dataclass
class Report:
    figures: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def hf_greedy_stops(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[tuple[bool, int]]:
    """Greedy generation of the HF model on the same prompt ids: (ended on EOS/EOT, tokens made)."""
    import torch

    stop = stop_token_ids(tokenizer)
    out = []
    with torch.inference_mode():
        for ids in progress(prompt_ids, "quantize: parity, HF greedy stop", unit="prompt"):
            x = torch.tensor([ids])
            new = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                                 repetition_penalty=1.0, eos_token_id=stop or None,
                                 pad_token_id=stop[0] if stop else None)[0, len(ids):].tolist()
            out.append((bool(new) and new[-1] in stop, len(new)))
    return out


def compare_stops(gguf_name: str, hf: list[tuple[bool, int]], gguf: list[tuple[bool, int]], max_new_tokens: int,
                  rep: Report) -> bool:
    """The GGUF must stop wherever the HF model stops; if HF itself runs on, that is the model's
    behaviour (warned about), not a conversion defect. Returns whether the model stops on its own
    (HF ends at least half of its answers)."""
    for i, ((hf_stop, hf_n), (gg_stop, gg_n)) in enumerate(zip(hf, gguf)):
        if hf_stop and not gg_stop:
            rep.failures.append(
                f"prompt {i}: the HF merged model ends its greedy answer after {hf_n} tokens, but {gguf_name} "
                f"does not stop within {gg_n}: the converted file lost the end-of-turn token (a conversion defect; "
                "check the stop-token figures above and the tokenizer files of models/merged)")
    hf_fraction = sum(s for s, _ in hf) / len(hf)
    if hf_fraction < 1:
        rep.warnings.append(
            f"the fine-tuned model itself (HF, greedy) ends only {hf_fraction:.0%} of its answers within {max_new_tokens} "
            "tokens: that is the model's behaviour, not a conversion defect. It will ramble in chat: "
            "start from an instruct/chat checkpoint, train longer (train.max_steps / epochs), or check that the "
            "training data ends each assistant turn (data/clean).")
    return hf_fraction >= 0.5


def check_f16(merged_dir: str | Path, gguf_path: str | Path, conversations: list[list[dict]], parity, *,
              trust_remote_code: bool = False, threads: int = 2) -> tuple[Report, list[list[int]]]:
    """Tokens, template, stop tokens, greedy stop and logits of the converted GGUF vs the HF folder.
    Returns the report and the prompt ids (llama.cpp's tokenization) for the quant check."""
    rep = Report()
    tokenizer = load_tokenizer(merged_dir, trust_remote_code)
    texts = [render(tokenizer, c) for c in conversations]
    hf_token_ids = [hf_ids(tokenizer, t) for t in texts]
    gguf_budget = 2 * parity.max_new_tokens  # room for an answer that took another (near-tie) path
    llm = load_gguf(gguf_path, n_ctx=max(64, max(len(x) for x in hf_token_ids) + gguf_budget + 8), threads=threads)
    try:
        ll_ids = [llama_chat_ids(llm, t) for t in texts]
        tokens = _check_tokens(rep, tokenizer, llm, hf_token_ids, ll_ids)
        template = _check_template(rep, tokenizer, llm, conversations, texts, gguf_path)
        stop_tokens = _check_stop_tokens(rep, tokenizer, llm)
        diffs, agrees, hf_stops = _run_hf(merged_dir, trust_remote_code, tokenizer, llm, hf_token_ids, parity)
        generation = _check_generation(rep, llm, ll_ids, hf_stops, gguf_budget, parity, gguf_path)
        logits = _check_logits(rep, diffs, agrees, parity, gguf_path)
    finally:
        llm.close()
    rep.figures = {"n_prompts": len(conversations), **tokens, **template, **stop_tokens, **generation, **logits}
    return rep, ll_ids


def _check_tokens(rep: Report, tokenizer, llm, hf_token_ids: list[list[int]], ll_ids: list[list[int]]) -> dict:
    """(1) the same token ids on both sides, BOS once."""
    for i, (a, b) in enumerate(zip(hf_token_ids, ll_ids)):
        if a != b:
            rep.failures.append(token_diff(tokenizer, i, a, b))
    bos = llm.token_bos()
    doubled = sum(1 for ids in ll_ids if len(ids) > 1 and ids[0] == bos and ids[1] == bos)
    if doubled:
        rep.failures.append(f"{doubled} prompt(s) start with BOS (id {bos}) twice in llama.cpp's tokenization")
    return {"tokens_match": sum(a == b for a, b in zip(hf_token_ids, ll_ids)), "bos_doubled": doubled,
            "add_bos": adds_bos(llm)}


def _check_template(rep: Report, tokenizer, llm, conversations: list[list[dict]], texts: list[str], gguf_path) -> dict:
    """(2) the GGUF's own template string renders the same text as the HF one."""
    gguf_template = llm.metadata.get("tokenizer.chat_template")
    template_matches = 0
    if not gguf_template:
        rep.failures.append(f"{gguf_path}: no tokenizer.chat_template in the GGUF metadata")
    else:
        for i, (c, t) in enumerate(zip(conversations, texts)):
            g = render(tokenizer, c, gguf_template)
            if g == t:
                template_matches += 1
            else:
                rep.failures.append(text_diff(i, t, g))
    return {"template_match": template_matches}


def _check_stop_tokens(rep: Report, tokenizer, llm) -> dict:
    """(2b) the template's end-of-turn token is EOS/EOT in the GGUF and llama.cpp ends generation on it."""
    import llama_cpp

    eot_text = end_of_turn_token(tokenizer.chat_template, tokenizer.get_vocab())
    eos_id, eot_id = llm.token_eos(), llama_cpp.llama_vocab_eot(vocab(llm))
    stop_ids_ok = True
    if eot_text is not None:
        eot_hf = tokenizer.convert_tokens_to_ids(eot_text)
        if eot_hf not in (eos_id, eot_id):
            stop_ids_ok = False
            rep.failures.append(f"end-of-turn token {eot_text!r} (id {eot_hf}) is neither EOS ({eos_id}) nor EOT ({eot_id}) in the GGUF")
        if not is_eog(llm, eot_hf):
            stop_ids_ok = False
            rep.failures.append(f"llama.cpp does not treat {eot_text!r} (id {eot_hf}) as end of generation")
        piece = llm.tokenize(eot_text.encode(), add_bos=False, special=True)
        if piece != [eot_hf]:
            stop_ids_ok = False
            rep.failures.append(f"llama.cpp splits {eot_text!r} into {piece} instead of the single token {eot_hf} (token type not CONTROL?)")
    return {"eos_id": eos_id, "eot_id": eot_id, "stop_tokens_ok": stop_ids_ok}


def _run_hf(merged_dir, trust_remote_code: bool, tokenizer, llm, hf_token_ids: list[list[int]],
            parity) -> tuple[list[float], list[float], list[tuple[bool, int]]]:
    """(3) logits of the HF model against the GGUF's at every prompt position (max |diff|, argmax
    agreement per prompt), and (4) the HF model's greedy answers; the model is freed on return."""
    import torch

    model = load_causal_lm(merged_dir, trust_remote_code, dtype=torch.float32)
    model.eval()
    diffs, agrees = [], []
    with torch.no_grad():
        for ids in progress(hf_token_ids, "quantize: parity, logits f16 vs HF", unit="prompt"):
            hf = model(torch.tensor([ids])).logits[0].float().numpy()
            d, a = compare_logits(hf, gguf_logits(llm, ids))
            diffs.append(d)
            agrees.append(a)
    return diffs, agrees, hf_greedy_stops(model, tokenizer, hf_token_ids, parity.max_new_tokens)


def _check_generation(rep: Report, llm, ll_ids: list[list[int]], hf_stops: list[tuple[bool, int]], gguf_budget: int,
                      parity, gguf_path) -> dict:
    """(4) greedy generation: the GGUF stops wherever the HF model stops."""
    stops = [greedy_stops(llm, ids, gguf_budget)
             for ids in progress(ll_ids, "quantize: parity, greedy stop", unit="prompt")]
    stops_on_its_own = compare_stops(Path(gguf_path).name, hf_stops, stops, parity.max_new_tokens, rep)
    return {"stop_fraction": sum(s for s, _ in stops) / len(stops), "gen_tokens": [n for _, n in stops],
            "hf_stop_fraction": sum(s for s, _ in hf_stops) / len(hf_stops), "hf_gen_tokens": [n for _, n in hf_stops],
            "stops_on_its_own": stops_on_its_own}


def _check_logits(rep: Report, diffs: list[float], agrees: list[float], parity, gguf_path) -> dict:
    """(3) the logits' limits: max |HF - GGUF| and argmax agreement."""
    max_diff, agreement = max(diffs), float(np.mean(agrees))
    # The limit is for F16 weights; BF16 keeps 3 fewer mantissa bits, so its rounding moves logits ~8x
    # as far (docs/quantization.md: the measured figures).
    bf16 = "BF16" in gguf_meta.tensor_types(gguf_path)
    limit = parity.max_abs_logit_diff * (8 if bf16 else 1)
    if not np.isfinite(max_diff) or max_diff > limit:  # NaN compares False: check it first
        rep.failures.append(f"logits: max |HF - GGUF| = {max_diff:.4g} > export.parity.max_abs_logit_diff = {parity.max_abs_logit_diff}"
                            f"{' x 8 for BF16 weights' if bf16 else ''} "
                            f"(per prompt: {', '.join(f'{d:.3g}' for d in diffs)})"
                            + ("" if np.isfinite(max_diff) else "; llama.cpp computed non-finite logits: the activations "
                               "overflow float16 (Gemma-3 does); use export.outtype: auto or bf16"))
    if agreement < parity.min_argmax_agreement:
        rep.failures.append(f"logits: argmax agreement {agreement:.3f} < export.parity.min_argmax_agreement = {parity.min_argmax_agreement}")
    return {"f16_max_abs_logit_diff": max_diff,
            "max_abs_logit_diff_limit": limit,  # export.parity.max_abs_logit_diff, x 8 for BF16 weights
            "f16_argmax_agreement": agreement}


class QuantCheck:
    """Argmax agreement (and max |Δlogit|) of quantized GGUFs vs the reference (f16) GGUF on the prompt
    ids: the reference is loaded and its logits computed once, for every file checked."""

    def __init__(self, ref_gguf: str | Path, prompt_ids: list[list[int]], parity, *, threads: int = 2):
        self.ref_gguf, self.prompt_ids, self.parity, self.threads = Path(ref_gguf), prompt_ids, parity, threads
        self.n_ctx = max(64, max(len(x) for x in prompt_ids) + 8)
        ref = load_gguf(ref_gguf, n_ctx=self.n_ctx, threads=threads)
        try:
            self.ref_logits = [gguf_logits(ref, ids) for ids in progress(prompt_ids, "quantize: parity, f16 logits", unit="prompt")]
        finally:
            ref.close()

    def check(self, quant_gguf: str | Path, name: str | None = None) -> Report:
        """`name` is how failures call the quantized file (default: its file name)."""
        rep, parity = Report(), self.parity
        quant = load_gguf(quant_gguf, n_ctx=self.n_ctx, threads=self.threads)
        try:
            diffs, agrees = zip(*(compare_logits(r, gguf_logits(quant, ids))
                                  for r, ids in progress(list(zip(self.ref_logits, self.prompt_ids)),
                                                         "quantize: parity, quantized logits", unit="prompt")))
        finally:
            quant.close()
        agreement = float(np.mean(agrees))
        if not agreement >= parity.min_argmax_agreement_quant:  # written so that NaN fails too
            rep.failures.append(
                f"{name or Path(quant_gguf).name}: its top token differs from {self.ref_gguf.name}'s on {1 - agreement:.0%} of "
                f"the prompt positions (agreement {agreement:.3f} < export.parity.min_argmax_agreement_quant = "
                f"{parity.min_argmax_agreement_quant}; per prompt: {', '.join(f'{a:.2f}' for a in agrees)}). The quantized "
                "file is not the converted model any more: use a finer type (q6_k or q8_0 among export.quant_candidates) or "
                "export.imatrix: true. If models/base came from a quantized GGUF, re-quantizing can snap the weights back "
                "to that file's grid and erase the fine-tune: start from full-precision weights or use q8_0.")
        rep.figures = {"quant_argmax_agreement": agreement, "quant_max_abs_logit_diff": float(max(diffs))}
        return rep


def check_quant(ref_gguf: str | Path, quant_gguf: str | Path, prompt_ids: list[list[int]], parity, *, threads: int = 2,
                name: str | None = None) -> Report:
    """QuantCheck of one quantized file."""
    return QuantCheck(ref_gguf, prompt_ids, parity, threads=threads).check(quant_gguf, name)
