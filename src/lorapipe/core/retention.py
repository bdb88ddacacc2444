"""What a quantized GGUF keeps, and the gates on it: one measure for stage quantize (which scores
every candidate type with it and keeps the first that passes) and stage evaluate (which scores the
kept file with it again, beside the other variants).

Two things are kept or lost:

* the converted (unquantized) file: perplexity change and full-text KL divergence on the eval text,
  through llama-perplexity on the very same chunks (core/perplexity.py);
* the fine-tune: `finetune_kept` on the eval assistant tokens (core/assistant_scores.py), 1 when the
  quantized file predicts like the merged model, 0 when it predicts like the base.

`Reference` computes the unquantized and HF sides once; `measure` then costs one llama-perplexity
KL run and one pass of the quantized file over the assistant tokens. Stage quantize writes what it
measured (`Measured`, with the content hash of every file it measured on) beside the quantized file
(`measures_path`); stage evaluate reads it when the hashes match its own files instead of measuring
again.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lorapipe.core import assistant_scores
from lorapipe.core import perplexity as ppl
from lorapipe.core.assistant_scores import Scores
from lorapipe.core.errors import LorapipeError
from lorapipe.core.log import info

# Rows are cut at least at this many tokens for the assistant-token scores: a short perplexity ctx
# must not cut every answer away.
MIN_ASSISTANT_CUTOFF = 512


@dataclass(frozen=True)
class Gates:
    """The thresholds a quantized file must meet (params: evaluate.max_ppl_delta_pct, evaluate.min_finetune_kept)."""
    max_ppl_delta_pct: float
    min_finetune_kept: float


@dataclass(frozen=True)
class Figures:
    """One quantized file against the reference."""
    ppl: float             # perplexity on the eval text (llama-perplexity, the reference's chunks)
    ppl_delta_pct: float   # vs the unquantized file, in %
    kld: float             # full-text KL divergence from the unquantized file
    same_top_pct: float    # % of scored positions whose top token equals the unquantized file's
    rms_dp_pct: float
    assistant: Scores      # loss on the assistant tokens and KLD from the merged model there
    finetune_kept: float | None  # None: the fine-tune moved the model too little to measure


def pct(a: float, b: float) -> float:
    """(a - b) / b in percent."""
    return (a - b) / b * 100.0


class Reference:
    """The unquantized GGUF's perplexity (its logits saved for KL runs) and the assistant-token log-probs
    of the HF merged model (the reference) and base, all on the same token ids.

    Making one tokenizes the eval text (`stream`, `plan`, `examples`); `add_unquantized()` runs
    llama-perplexity on the unquantized file. Call `add_hf("hf_merged", model)` first, then
    `add_hf("hf_base", model)`; each model can be freed after its call, so only one is in memory at a
    time."""

    def __init__(self, rows: list[dict], tokenizer, eval_jsonl: Path, ref_gguf: Path, work: Path, *,
                 ctx: int, max_chunks: int, threads: int):
        self.rows, self.ref_gguf, self.threads = rows, Path(ref_gguf), threads
        self.text_file, self.logits_file = Path(work) / "eval.txt", Path(work) / "reference.logits"
        text = ppl.render_text(rows, tokenizer, eval_jsonl)
        self.text_file.write_text(text, encoding="utf-8")
        self.stream = ppl.check_same_ids(tokenizer, ppl.hf_text_ids(tokenizer, text),
                                         ppl.llama_text_ids(self.ref_gguf, self.text_file), self.ref_gguf)
        self.plan = ppl.plan_chunks(len(self.stream.ids), ctx, max_chunks, eval_jsonl)
        self.ppl_ref: float | None = None
        cutoff = max(ctx, MIN_ASSISTANT_CUTOFF)
        self.examples = assistant_scores.examples(rows, tokenizer, cutoff, self.plan.scored)
        if not self.examples:
            raise LorapipeError(f"{eval_jsonl}: no assistant token within the first {cutoff} tokens of any row")
        self.n_assistant = sum(len(assistant_scores.positions(e)[0]) for e in self.examples)
        self.scores: dict[str, Scores] = {}
        self._merged_logprobs: list = []

    def add_unquantized(self) -> float:
        """The unquantized file's perplexity; its logits are kept for the KL runs of `measure`."""
        self.ppl_ref = ppl.gguf_perplexity(self.ref_gguf, self.text_file, self.plan, self.threads, self.logits_file)
        return self.ppl_ref

    def add_hf(self, key: str, model) -> Scores:
        """Score a transformers model; the first one added ("hf_merged") is the reference."""
        logits = assistant_scores.hf_logits(model, self.examples, f"assistant tokens {key.replace('hf_', 'HF ')}")
        if not self.scores:
            self.scores[key] = assistant_scores.score(logits, self.examples, keep=self._merged_logprobs)
        else:
            self.scores[key] = assistant_scores.score(logits, self.examples, self._merged_logprobs)
            if not self.finetune_measurable:
                info(f"warning: the fine-tune moved the model by only {self.kld_base:.5f} (KLD from the base on "
                     "assistant tokens); finetune_kept is not measured and its gate does not apply")
        return self.scores[key]

    def add_gguf(self, key: str, gguf: Path) -> Scores:
        self.scores[key] = self.score_gguf(gguf)
        return self.scores[key]

    def score_gguf(self, gguf: Path) -> Scores:
        logits = assistant_scores.gguf_logits(gguf, self.examples, self.threads, f"assistant tokens {Path(gguf).name}")
        return assistant_scores.score(logits, self.examples, self._merged_logprobs)

    @property
    def kld_base(self) -> float:
        return self.scores["hf_base"].kld

    @property
    def finetune_measurable(self) -> bool:
        # A fine-tune that hardly moved the model leaves nothing to lose: the ratio would be noise.
        return self.kld_base >= assistant_scores.MIN_FINETUNE_KLD

    def finetune_kept(self, kld_quant: float) -> float | None:
        return assistant_scores.finetune_kept(kld_quant, self.kld_base) if self.finetune_measurable else None

    def measure(self, gguf: Path) -> Figures:
        if "hf_base" not in self.scores or self.ppl_ref is None:
            raise RuntimeError("Reference.measure needs add_unquantized(), add_hf('hf_merged', ...) and "
                               "add_hf('hf_base', ...) first")
        kl = ppl.gguf_kl_divergence(gguf, self.logits_file, self.plan, self.threads)
        scores = self.score_gguf(gguf)
        return Figures(kl.ppl, pct(kl.ppl, self.ppl_ref), kl.kld, kl.same_top_pct, kl.rms_dp_pct, scores,
                       self.finetune_kept(scores.kld))


def measures_path(quant_gguf: Path) -> Path:
    """Where stage quantize records what it measured of `quant_gguf` (models/gguf/model-quant.measures.json
    for paths.QUANT_GGUF): beside the file, named after it."""
    return Path(quant_gguf).with_suffix(".measures.json")


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in name order)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


# The inputs a Measured was measured on, by role (and how messages name them): each one's content
# hash is recorded and compared.
ROLES = {"eval_split": "eval split", "base": "base model", "merged": "merged model", "converted": "converted file",
         "quantized": "quantized file"}


def fingerprints(*, eval_jsonl: Path, base_dir: Path, merged_dir: Path, ref_gguf: Path, quant_gguf: Path) -> dict[str, str]:
    inputs = dict(zip(ROLES, (eval_jsonl, base_dir, merged_dir, ref_gguf, quant_gguf)))
    return {role: content_hash(path) for role, path in inputs.items()}


@dataclass(frozen=True)
class Measured:
    """Everything measured of one quantized file and its references on the eval split: the
    unquantized file's perplexity, the assistant-token scores of hf_merged, hf_base and the
    unquantized file ("converted"), and the quantized file's Figures. `files` holds the content hash
    of each input by role (ROLES) and `ctx`, `max_chunks` the chunking: the figures hold for exactly
    those."""
    files: dict[str, str]
    ctx: int
    max_chunks: int
    ppl_ref: float
    n_assistant: int
    scores: dict[str, Scores]
    quant: Figures

    @classmethod
    def of(cls, reference: Reference, quant: Figures, converted: Scores, files: dict[str, str], *, ctx: int,
           max_chunks: int) -> "Measured":
        scores = {"hf_merged": reference.scores["hf_merged"], "hf_base": reference.scores["hf_base"], "converted": converted}
        return cls(files, ctx, max_chunks, reference.ppl_ref, reference.n_assistant, scores, quant)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, path: Path) -> "Measured":
        """The record at `path`; LorapipeError naming the file when it is not one."""
        try:
            obj = json.loads(Path(path).read_text(encoding="utf-8"))
            quant = {**obj["quant"], "assistant": Scores(**obj["quant"]["assistant"])}
            if set(obj["scores"]) != {"hf_merged", "hf_base", "converted"}:
                raise ValueError(f"scores of {sorted(obj['scores'])}, not of hf_merged, hf_base and converted")
            return cls(dict(obj["files"]), int(obj["ctx"]), int(obj["max_chunks"]), float(obj["ppl_ref"]),
                       int(obj["n_assistant"]), {k: Scores(**v) for k, v in obj["scores"].items()}, Figures(**quant))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LorapipeError(f"{path}: not a record of stage quantize's measures ({type(exc).__name__}: {exc}); "
                                "rerun `lorapipe quantize`") from None

    def mismatch(self, files: dict[str, str], *, ctx: int, max_chunks: int) -> str | None:
        """Why these figures do not hold for `files` and this chunking; None when they do."""
        changed = [words for role, words in ROLES.items() if self.files.get(role) != files[role]]
        if changed:
            return f"measured on another {', '.join(changed)} (content hash differs)"
        if (self.ctx, self.max_chunks) != (ctx, max_chunks):
            return f"measured with ctx {self.ctx}, max_chunks {self.max_chunks}, not {ctx}, {max_chunks}"
        return None


def gate_failures(gates: Gates, figures: Figures, *, quant_gguf: Path, quant_type: str, ref_gguf: Path, ppl_ref: float,
                  scores: dict[str, Scores]) -> list[str]:
    """What is wrong with a quantized file, each failure naming the figures, the limit and what to change.
    `scores` holds at least hf_merged and hf_base (their losses are quoted)."""
    failures = []
    delta, kept = figures.ppl_delta_pct, figures.finetune_kept
    loss = ", ".join(f"{k} {v.loss:.4f}" for k, v in {**scores, "quant": figures.assistant}.items())
    if math.isnan(delta):
        failures.append(f"{quant_gguf} ({quant_type}): perplexity is not a number ({figures.ppl}): llama.cpp computed "
                        "non-finite logits for the quantized file")
    if delta > gates.max_ppl_delta_pct:
        failures.append(
            f"{quant_gguf} ({quant_type}): quantization costs too much: perplexity {figures.ppl:.4f} vs {ppl_ref:.4f} for "
            f"{ref_gguf.name} is {delta:+.2f} % (limit evaluate.max_ppl_delta_pct = {gates.max_ppl_delta_pct} %), "
            f"KLD {figures.kld:.4f}. Use export.imatrix: true or a finer type (export.quant: auto with q5_k_m, q6_k "
            "or q8_0 among export.quant_candidates).")
    if delta < -gates.max_ppl_delta_pct:
        failures.append(
            f"{quant_gguf} ({quant_type}): perplexity {figures.ppl:.4f} is {-delta:.2f} % *below* its own unquantized "
            f"file's ({ppl_ref:.4f}, {ref_gguf.name}; limit evaluate.max_ppl_delta_pct = {gates.max_ppl_delta_pct} % "
            "either way). Quantization does not make a model better: the quantized file predicts like another model, "
            f"most likely the base (finetune_kept {'n/a' if kept is None else f'{kept:.2f}'}; assistant-token loss: {loss}).")
    if kept is not None and not kept >= gates.min_finetune_kept:  # written so that NaN fails too
        failures.append(
            f"{quant_gguf} ({quant_type}): the quantized model lost the fine-tune: it kept {kept:.0%} of it (limit "
            f"evaluate.min_finetune_kept = {gates.min_finetune_kept:.0%}): on the eval assistant tokens its predictions "
            f"are {figures.assistant.kld:.4f} (KLD) away from the fine-tuned model's, the base model's "
            f"{scores['hf_base'].kld:.4f}. Assistant-token loss: {loss}. Quantizing rounds the merged weights onto the "
            f"{quant_type} grid; a base that came from a quantized GGUF already sits on such a grid, and a LoRA update "
            "smaller than half a step is rounded back to the base.")
    return failures


# What to change when no candidate type keeps the fine-tune (quantize's error ends with it).
REMEDIES = (
    "Remedies: a finer type (add q6_k or q8_0 to export.quant_candidates, or set export.quant: q8_0); a "
    "full-precision base (model.source: an HF folder or hub id rather than a quantized .gguf: a base taken from "
    "a quantized file sits on that file's grid, docs/toolchain.md); a stronger fine-tune (train.max_steps, "
    "train.lr, lora.rank); or, knowingly, looser gates (evaluate.min_finetune_kept, evaluate.max_ppl_delta_pct, "
    "export.parity.min_argmax_agreement_quant).")
