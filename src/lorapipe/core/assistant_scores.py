"""Assistant-token loss of every model variant, and how far each sits from the fine-tune.

Full-text perplexity barely moves with an SFT fine-tune (the rendered text is mostly user turns and
markup the fine-tune never trained on), so it cannot say whether the fine-tune helped, nor whether
it survived quantization. These scores can:

* loss on the assistant tokens only, masked exactly as `train` masks them (core/sft.py), on the same
  token ids for every variant: HF models get the ids as tensors, GGUFs get them through llama.cpp's
  bindings (no re-tokenization, so the numbers are comparable to the last decimal);
* KL divergence of each variant's next-token distribution from the merged (fine-tuned) HF model's,
  at those positions. `finetune_kept` = 1 - KLD(merged || quant) / KLD(merged || base): 1 when the
  quantized file predicts like the fine-tune, 0 when it predicts like the base it came from. A base
  taken from a quantized GGUF sits on that file's grid, and a LoRA update smaller than half a
  quantization step is rounded away by quantizing to the same type again (docs/toolchain.md#requantize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lorapipe.core import parity, sft
from lorapipe.core.log import progress


# Below this KLD (nats per assistant token) between base and fine-tune, the fine-tune moved the model
# too little for a ratio against quantization noise to mean anything.
MIN_FINETUNE_KLD = 0.002


@dataclass(frozen=True)
class Scores:
    loss: float          # mean NLL over the scored assistant tokens
    kld: float | None    # mean KL divergence from the reference distribution (None for the reference itself)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def examples(rows: list[dict], tokenizer, cutoff_len: int, max_tokens: int) -> list[sft.Example]:
    """The eval rows as train encodes them (assistant-only labels, cut at cutoff_len), until about
    `max_tokens` assistant tokens are scored."""
    stops = sft.stop_strings(tokenizer)
    out, scored = [], 0
    for row in rows:
        example, _ = sft.encode(tokenizer, row["messages"], cutoff_len, stops)
        n = sum(1 for label in example.labels[1:] if label != sft.IGNORE_INDEX)
        if n:
            out.append(example)
            scored += n
        if scored >= max_tokens:
            break
    return out


def positions(example: sft.Example) -> tuple[np.ndarray, np.ndarray]:
    """Positions whose next token is an assistant token, and those tokens."""
    labels = np.array(example.labels)
    at = np.nonzero(labels[1:] != sft.IGNORE_INDEX)[0]
    return at, labels[at + 1]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - (np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) + logits.max(-1, keepdims=True))


def score(logits_per_example, examples_: list[sft.Example], reference: list[np.ndarray] | None = None,
          keep: list[np.ndarray] | None = None) -> Scores:
    """Loss of one variant from its full logits per example; with `reference` (the merged model's
    log-probs per example) also its KL divergence from it. `keep` collects this variant's log-probs
    (float16, scored positions only) to serve as the reference for the others."""
    nll, kld, n = 0.0, 0.0, 0
    for i, (logits, example) in enumerate(zip(logits_per_example, examples_)):
        at, targets = positions(example)
        logp = _log_softmax(logits[at])
        nll -= float(logp[np.arange(len(at)), targets].sum())
        n += len(at)
        if keep is not None:
            keep.append(logp.astype(np.float16))
        if reference is not None:
            ref = reference[i].astype(np.float64)
            v = min(ref.shape[1], logp.shape[1])  # a GGUF's vocabulary can be padded beyond the HF one
            own = logp if v == logp.shape[1] else _log_softmax(logits[at][:, :v])
            kld += float((np.exp(ref[:, :v]) * (ref[:, :v] - own)).sum())
    return Scores(nll / n, kld / n if reference is not None else None)


def hf_logits(model, examples_: list[sft.Example], desc: str):
    """Full logits of a transformers model per example (one sequence at a time: no padding effects)."""
    import torch

    with torch.inference_mode():
        for example in progress(examples_, desc, unit="row"):
            yield model(torch.tensor([example.input_ids])).logits[0].float().numpy()


def gguf_logits(gguf, examples_: list[sft.Example], threads: int, desc: str):
    """Full logits of a GGUF per example, through llama.cpp's bindings on the very same token ids."""
    llm = parity.load_gguf(gguf, n_ctx=max(len(e.input_ids) for e in examples_) + 8, threads=threads)
    try:
        for example in progress(examples_, desc, unit="row"):
            yield parity.gguf_logits(llm, example.input_ids)
    finally:
        llm.close()


def finetune_kept(kld_quant: float, kld_base: float) -> float:
    """1 = the quantized model predicts like the fine-tune, 0 = like the base (module docstring)."""
    return 1.0 - kld_quant / kld_base
