"""Stage `evaluate`: perplexity, KL divergence, size and speed of every model variant, plus sample
answers a person can read.

Variants: the HF base model (models/base), the HF merged model (models/merged), the converted GGUF
(export.outtype, normally F16) and the quantized GGUF (models/gguf/model-quant.gguf, whatever type
stage quantize chose; its type is read from the file). All perplexities are on one token stream,
the eval split rendered with the chat template (core/perplexity.py says exactly how, and how the HF
side reproduces llama-perplexity's scoring). Gates that fail the stage:

* |ppl F16 GGUF - ppl HF merged| > evaluate.max_ppl_f16_vs_hf_pct %: the conversion is wrong;
* the quantized file's gates of core/retention.py (perplexity change either way, finetune_kept),
  the very ones stage quantize chose the type with.

Outputs: metrics/eval.json (flat numbers for `dvc metrics diff`), plots/variants.json (one row per
variant for `dvc plots`), reports/samples.md. A failed gate writes none of them.

Phase `predict` (evaluate.predict params): the HF base, the HF merged model (each while it is loaded
for its perplexity) and the quantized GGUF answer the eval split's prompts, batched
(core/predictions.py); LLaMA-Factory-style files per variant go to reports/predictions/, the answer
scores (core/answer_scores.py, docs/answers.md) to metrics/eval.json (`answers_*`) and
plots/answers.json.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lorapipe.core import gguf_meta, hfmodel, inference_speed, parity, paths, predictions, retention
from lorapipe.core import perplexity as ppl
from lorapipe.core.errors import LorapipeError
from lorapipe.core.gguf_file import check_gguf
from lorapipe.core.io import atomic_path, write_json, write_text
from lorapipe.core.log import info
from lorapipe.core.retention import pct

METRICS = paths.METRICS_DIR / "eval.json"
PLOT = paths.PLOTS_DIR / "variants.json"
SAMPLES = paths.REPORTS_DIR / "samples.md"
PREDICTIONS = paths.REPORTS_DIR / "predictions"
ANSWERS_PLOT = paths.PLOTS_DIR / "answers.json"
MB = 1_000_000


# --------------------------------------------------------------------------------------- inputs
def check_inputs(eval_jsonl: Path, base_dir: Path, merged_dir: Path, ref_gguf: Path, quant_gguf: Path) -> None:
    """Every input present, each missing one named with the stage that makes it."""
    if not eval_jsonl.is_file():
        raise LorapipeError(f"{eval_jsonl}: not found; the eval split is made by stage clean (`lorapipe clean`)")
    hfmodel.check_folder(base_dir, "the base model (made by stage base: `lorapipe base`)")
    hfmodel.check_folder(merged_dir, "the merged model (made by stage merge: `lorapipe merge`)")
    check_gguf(ref_gguf, "it is made by stage convert (`lorapipe convert`)")
    check_gguf(quant_gguf, "it is made by stage quantize (`lorapipe quantize`)")


def load_hf(folder: Path, trust_remote_code: bool):
    import torch

    return hfmodel.load_causal_lm(folder, trust_remote_code, dtype=torch.float32).eval()


def hf_weights_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / MB


# -------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompts:
    """What every variant answers: evaluate.prompts (reports/samples.md) and the eval split's prompts
    (phase predict), both as rendered chat text, with the eval replies as labels."""
    samples: list[str]
    predict: list[str]
    labels: list[str]

    @classmethod
    def of(cls, ep, tokenizer, rows: list[dict], eval_jsonl: Path) -> "Prompts":
        pp = ep.predict
        conversations, labels = predictions.prompts_and_labels(rows, pp.max_rows, pp.seed)
        if not conversations:
            raise LorapipeError(f"{eval_jsonl}: no row ends with an assistant reply to a user turn; nothing to answer")
        samples = [parity.render(tokenizer, [{"role": "user", "content": p}]) for p in ep.prompts]
        return cls(samples, [parity.render(tokenizer, c) for c in conversations], labels)


@dataclass(frozen=True)
class Answers:
    """One variant's answers to Prompts, and the seconds spent on the predict ones (metrics answers_s)."""
    samples: list[predictions.Answer]
    predict: list[predictions.Answer]
    predict_s: float


def answer(ep, prompts: Prompts, generate, samples_desc: str, answers_desc: str) -> Answers:
    """`generate(texts, max_new_tokens, desc)` on the sample prompts, then, timed, on the eval prompts."""
    samples = generate(prompts.samples, ep.max_new_tokens, samples_desc)
    start = time.perf_counter()
    answers = generate(prompts.predict, ep.predict.max_new_tokens, answers_desc)
    return Answers(samples, answers, time.perf_counter() - start)


def hf_answers(ep, model, tokenizer, prompts: Prompts, key: str) -> Answers:
    def generate(texts, max_new_tokens, desc):
        return predictions.hf_generate(model, tokenizer, texts, max_new_tokens, ep.predict.batch_size, desc=desc)

    return answer(ep, prompts, generate, "evaluate: samples (HF)", f"evaluate: answers {key}")


def gguf_answers(ep, gguf: Path, prompts: Prompts) -> Answers:
    def generate(texts, max_new_tokens, desc):
        return predictions.gguf_generate(gguf, texts, max_new_tokens, parallel=ep.predict.parallel, threads=ep.threads,
                                         desc=desc)

    return answer(ep, prompts, generate, f"evaluate: samples {gguf.name}", f"evaluate: answers {gguf.name}")


def samples_markdown(prompts: list[str], answers: dict[str, list[predictions.Answer]], max_new_tokens: int) -> str:
    lines = ["# Sample answers", "",
             f"Greedy decoding, at most {max_new_tokens} new tokens, stopped at EOS / end of turn; prompts from "
             "`evaluate.prompts` in params.yaml, rendered with the model's chat template.", ""]
    for i, prompt in enumerate(prompts, start=1):
        lines += [f"## {i}. {prompt}", ""]
        for variant, per_prompt in answers.items():
            answer = per_prompt[i - 1]
            note = "" if answer.stopped else f" — cut at {max_new_tokens} tokens"
            lines += [f"**{variant}**{note}", ""]
            lines += [f"> {line}" if line else ">" for line in (answer.text or "(empty answer)").splitlines()]
            lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- evaluate
@dataclass(frozen=True)
class HFVariant:
    ppl: float                   # over the eval stream, scored as llama-perplexity scores
    answers: Answers
    speed: dict | None = None    # inference_speed.hf_speed (the merged model only)


class Result(NamedTuple):
    metrics: dict                # metrics/eval.json
    variants: list[dict]         # plots/variants.json
    samples: str                 # reports/samples.md
    answer_plot: list[dict]      # plots/answers.json
    prompts: Prompts             # with answers and answer_results: reports/predictions/<variant>/
    answers: dict[str, Answers]  # per variant: hf_base, hf_merged, quant
    answer_results: dict[str, dict]


def evaluate(ep, *, eval_jsonl: Path, base_dir: Path, merged_dir: Path, ref_gguf: Path, quant_gguf: Path,
             ref_name: str = "f16", trust_remote_code: bool = False, measures: Path | None = None) -> Result:
    """All numbers, plot rows, the samples report and every variant's answers; raises LorapipeError when a
    gate fails. `measures`: stage quantize's record of the figures it measured (retention.measures_path),
    read when it holds for these very files; without one that does, they are measured here. Each HF
    model is loaded once, for its perplexity, scores, speed and answers."""
    import torch

    check_inputs(eval_jsonl, base_dir, merged_dir, ref_gguf, quant_gguf)
    torch.set_num_threads(ep.threads)
    tokenizer = hfmodel.load_tokenizer(merged_dir, trust_remote_code)
    rows = ppl.read_eval_rows(eval_jsonl)
    if not rows:
        raise LorapipeError(f"{eval_jsonl}: the eval split is empty; set data.split.eval_fraction > 0")
    prompts = Prompts.of(ep, tokenizer, rows, eval_jsonl)
    info(f"evaluate: {len(prompts.predict)} eval prompts answered by each variant (evaluate.predict)")
    known = quantize_measures(measures, ep, eval_jsonl=eval_jsonl, base_dir=base_dir, merged_dir=merged_dir,
                              ref_gguf=ref_gguf, quant_gguf=quant_gguf)
    with tempfile.TemporaryDirectory(prefix="lorapipe-evaluate-") as work:
        ref = setup_reference(ep, tokenizer, rows, eval_jsonl, ref_gguf, Path(work))
        ppl_ref = known.ppl_ref if known else ref.add_unquantized()
        merged = hf_merged(ep, ref, tokenizer, prompts, merged_dir, ref_gguf, ppl_ref, score=known is None,
                           trust_remote_code=trust_remote_code)
        base = hf_variant(ep, ref, tokenizer, prompts, base_dir, "hf_base", score=known is None,
                          trust_remote_code=trust_remote_code)
        measured = known or retention.Measured.of(ref, ref.measure(quant_gguf), ref.score_gguf(ref_gguf), {},
                                                  ctx=ep.ctx, max_chunks=ep.max_chunks)
    quant_label = check_quant_gates(ep, measured, quant_gguf, ref_gguf, ref_name.lower())
    quant = gguf_answers(ep, quant_gguf, prompts)
    speed = gguf_speeds(ep, {ref_name.lower(): ref_gguf, quant_label: quant_gguf})
    samples = {"base (HF)": base.answers.samples, "merged (HF)": merged.answers.samples,
               f"{quant_label} (GGUF)": quant.samples}
    metrics, variants = eval_metrics(ep, ref, measured, merged, base, speed, samples, ref_label=ref_name.lower(),
                                     quant_label=quant_label, base_dir=base_dir, merged_dir=merged_dir,
                                     ref_gguf=ref_gguf, quant_gguf=quant_gguf)
    answers = {"hf_base": base.answers, "hf_merged": merged.answers, "quant": quant}
    answer_metrics, answer_plot, answer_results = score_answers(prompts, answers, tokenizer)
    return Result({**metrics, **answer_metrics}, variants, samples_markdown(ep.prompts, samples, ep.max_new_tokens),
                  answer_plot, prompts, answers, answer_results)


def quantize_measures(path: Path | None, ep, **files: Path) -> retention.Measured | None:
    """Stage quantize's figures when they were measured on these very files (content hashes) and
    chunks; None, saying why, when they must be measured here."""
    if path is None:
        return None
    if not path.is_file():
        info(f"evaluate: {path} not found (stage quantize writes it): measuring the quantized file here")
        return None
    known = retention.Measured.read(path)
    why = known.mismatch(retention.fingerprints(**files), ctx=ep.ctx, max_chunks=ep.max_chunks)
    if why:
        info(f"evaluate: {path} was {why}: measuring the quantized file here")
        return None
    info(f"evaluate: the quantized file's and the references' figures from {path} (stage quantize measured these files)")
    return known


def setup_reference(ep, tokenizer, rows: list[dict], eval_jsonl: Path, ref_gguf: Path, work: Path) -> retention.Reference:
    """The eval split as one token stream and its chunks (core/retention.py), tokenized by both sides."""
    ref = retention.Reference(rows, tokenizer, eval_jsonl, ref_gguf, work, ctx=ep.ctx, max_chunks=ep.max_chunks,
                              threads=ep.threads)
    if ref.plan.shrunk:
        info(f"evaluate: {eval_jsonl} is only {len(ref.stream.ids)} tokens (< 2 x evaluate.ctx = {2 * ep.ctx}); "
             f"using ctx {ref.plan.ctx} (metrics: ctx_used)")
    info(f"evaluate: perplexity over {ref.plan.n_chunks} chunks of {ref.plan.ctx} tokens ({ref.plan.scored} scored)")
    return ref


def hf_merged(ep, ref: retention.Reference, tokenizer, prompts: Prompts, merged_dir: Path, ref_gguf: Path,
              ppl_ref: float, *, score: bool, trust_remote_code: bool) -> HFVariant:
    """The HF merged model's perplexity, checked against the converted file's (the conversion gate),
    then its speed and answers (and its assistant-token scores when `score`)."""
    info("evaluate: HF merged model")
    model = load_hf(merged_dir, trust_remote_code)
    ppl_merged = ppl.hf_perplexity(model, ref.stream, ref.plan, desc="evaluate: perplexity HF merged")
    check_conversion(ep, ref_gguf, ppl_ref, ppl_merged, ref.plan)
    if score:
        info(f"evaluate: assistant-token loss and KLD on {ref.n_assistant} tokens of {len(ref.examples)} rows")
        ref.add_hf("hf_merged", model)
    info("evaluate: HF merged model speed and answers")
    speed_prompt = (ref.stream.ids * (ep.speed_prompt_tokens // max(len(ref.stream.ids), 1) + 1))[: ep.speed_prompt_tokens]
    speed = inference_speed.hf_speed(model, speed_prompt, gen_tokens=ep.speed_gen_tokens)
    return HFVariant(ppl_merged, hf_answers(ep, model, tokenizer, prompts, "hf_merged"), speed)


def hf_variant(ep, ref: retention.Reference, tokenizer, prompts: Prompts, folder: Path, key: str, *, score: bool,
               trust_remote_code: bool) -> HFVariant:
    """Perplexity and answers of an HF model (and its assistant-token scores when `score`)."""
    info(f"evaluate: {key.replace('hf_', 'HF ')} model")
    model = load_hf(folder, trust_remote_code)
    ppl_model = ppl.hf_perplexity(model, ref.stream, ref.plan, desc=f"evaluate: perplexity {key.replace('hf_', 'HF ')}")
    if score:
        ref.add_hf(key, model)
    return HFVariant(ppl_model, hf_answers(ep, model, tokenizer, prompts, key))


def check_conversion(ep, ref_gguf: Path, ppl_ref: float, ppl_merged: float, plan) -> None:
    ref_vs_hf = pct(ppl_ref, ppl_merged)
    if not abs(ref_vs_hf) <= ep.max_ppl_f16_vs_hf_pct:  # written so that a NaN perplexity fails too
        raise LorapipeError(
            f"{ref_gguf}: perplexity {ppl_ref:.4f} differs from the HF merged model's {ppl_merged:.4f} by "
            f"{ref_vs_hf:+.3f} % (limit evaluate.max_ppl_f16_vs_hf_pct = {ep.max_ppl_f16_vs_hf_pct} %) on the same "
            f"{plan.scored} tokens: the converted file computes another model. Check the quantize parity metrics "
            "(metrics/quantize.json); if the family overflows float16 activations (Gemma-3), use export.outtype: "
            "bf16 or auto; then rerun `lorapipe convert`.")


def check_quant_gates(ep, measured: retention.Measured, quant_gguf: Path, ref_gguf: Path, ref_label: str) -> str:
    """core/retention.py's gates on the quantized file, the very ones stage quantize chose its type
    with; returns the label of its type (read from the file)."""
    quant_name = gguf_meta.file_type(quant_gguf)  # the type stage quantize chose
    failures = retention.gate_failures(retention.Gates(ep.max_ppl_delta_pct, ep.min_finetune_kept), measured.quant,
                                       quant_gguf=quant_gguf, quant_type=quant_name, ref_gguf=ref_gguf,
                                       ppl_ref=measured.ppl_ref, scores=variant_scores(measured, ref_label))
    if failures:
        raise LorapipeError("evaluate: quantization gate failed (nothing was written):\n" + "\n".join(failures)
                            + "\n" + retention.REMEDIES)
    return quant_name.lower()


def variant_scores(measured: retention.Measured, ref_label: str) -> dict:
    """Assistant-token scores by variant label: hf_merged, hf_base and the converted file's (f16 or bf16)."""
    s = measured.scores
    return {"hf_merged": s["hf_merged"], "hf_base": s["hf_base"], ref_label: s["converted"]}


def gguf_speeds(ep, ggufs: dict[str, Path]) -> dict[str, dict]:
    info(f"evaluate: GGUF speed (llama-bench) of {', '.join(ggufs)}")
    return {label: inference_speed.gguf_speed(path, prompt_tokens=ep.speed_prompt_tokens, gen_tokens=ep.speed_gen_tokens,
                                              threads=ep.threads)
            for label, path in ggufs.items()}


def eval_metrics(ep, ref: retention.Reference, measured: retention.Measured, merged: HFVariant, base: HFVariant,
                 speed: dict[str, dict], samples: dict[str, list[predictions.Answer]], *, ref_label: str,
                 quant_label: str, base_dir: Path, merged_dir: Path, ref_gguf: Path,
                 quant_gguf: Path) -> tuple[dict, list[dict]]:
    """metrics/eval.json and plots/variants.json."""
    stream, plan, quant = ref.stream, ref.plan, measured.quant
    scores = {**variant_scores(measured, ref_label), "quant": quant.assistant}
    size_ref, size_quant = ref_gguf.stat().st_size / MB, quant_gguf.stat().st_size / MB
    metrics = {
        "eval_rows": len(ref.rows),
        "eval_tokens": len(stream.ids),
        "ctx": ep.ctx,
        "ctx_used": plan.ctx,
        "chunks": plan.n_chunks,
        "scored_tokens": plan.scored,
        "quant": quant_label,
        "unquantized": ref_label,  # the suffix of the converted file's keys below (f16 or bf16)
        "ppl_hf_base": base.ppl,
        "ppl_hf_merged": merged.ppl,
        f"ppl_{ref_label}": measured.ppl_ref,
        "ppl_quant": quant.ppl,
        f"ppl_{ref_label}_vs_hf_pct": pct(measured.ppl_ref, merged.ppl),
        "ppl_delta_pct": quant.ppl_delta_pct,
        "ppl_merged_vs_base_pct": pct(merged.ppl, base.ppl),
        "assistant_tokens": measured.n_assistant,
        **{f"loss_assistant_{k}": v.loss for k, v in scores.items()},
        **{f"kld_assistant_{k}_vs_merged": v.kld for k, v in scores.items() if v.kld is not None},
        "finetune_kept": quant.finetune_kept,
        f"kld_quant_vs_{ref_label}": quant.kld,
        "same_top_token_pct": quant.same_top_pct,
        "rms_dp_pct": quant.rms_dp_pct,
        "size_hf_merged_mb": hf_weights_mb(merged_dir),
        f"size_{ref_label}_mb": size_ref,
        "size_quant_mb": size_quant,
        "size_ratio": size_quant / size_ref,
        "threads": ep.threads,
        "prompt_tok_s_hf_merged": merged.speed["prompt_tok_s"],
        "decode_tok_s_hf_merged": merged.speed["decode_tok_s"],
        f"prompt_tok_s_{ref_label}": speed[ref_label]["prompt_tok_s"],
        f"decode_tok_s_{ref_label}": speed[ref_label]["decode_tok_s"],
        "prompt_tok_s_quant": speed[quant_label]["prompt_tok_s"],
        "decode_tok_s_quant": speed[quant_label]["decode_tok_s"],
        "decode_speedup_quant_vs_hf": speed[quant_label]["decode_tok_s"] / merged.speed["decode_tok_s"],
        "samples_stopped": sum(a.stopped for per in samples.values() for a in per),
        "samples_total": sum(len(per) for per in samples.values()),
    }
    variants = [
        {"variant": "base (HF)", "ppl": base.ppl, "ppl_assistant": scores["hf_base"].ppl,
         "size_mb": hf_weights_mb(base_dir), "decode_tok_s": None},
        {"variant": "merged (HF)", "ppl": merged.ppl, "ppl_assistant": scores["hf_merged"].ppl,
         "size_mb": metrics["size_hf_merged_mb"], "decode_tok_s": merged.speed["decode_tok_s"]},
        {"variant": f"{ref_label} (GGUF)", "ppl": measured.ppl_ref, "ppl_assistant": scores[ref_label].ppl,
         "size_mb": size_ref, "decode_tok_s": speed[ref_label]["decode_tok_s"]},
        {"variant": f"{quant_label} (GGUF)", "ppl": quant.ppl, "ppl_assistant": scores["quant"].ppl,
         "size_mb": size_quant, "decode_tok_s": speed[quant_label]["decode_tok_s"]},
    ]
    return metrics, variants


# -------------------------------------------------------------------------------------- predict
def score_answers(prompts: Prompts, answers: dict[str, Answers], tokenizer) -> tuple[dict, list[dict], dict]:
    """Phase predict's figures (core/predictions.py): metrics `answers_*` (answers_s: the seconds its
    generation and scoring took), plot rows, and each variant's predict_results.json."""
    start = time.perf_counter()
    predict = {variant: a.predict for variant, a in answers.items()}
    metrics, results, plot = predictions.score(predict, prompts.labels, tokenizer)
    timing = {"answers_s": sum(a.predict_s for a in answers.values()) + time.perf_counter() - start}
    return {**metrics, **timing}, plot, results


def write_predictions(out_dir: Path, result: Result) -> None:
    """reports/predictions/<variant>/, LLaMA-Factory's files, the folder written atomically."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        for variant in predictions.VARIANTS:
            predictions.write_variant(tmp / variant, result.prompts.predict, result.answers[variant].predict,
                                      result.prompts.labels, result.answer_results[variant])


def run(params) -> dict:
    ex = params.export
    ref_type = hfmodel.resolve_outtype(ex.outtype, paths.MERGED_DIR)  # the label of the converted file's figures
    result = evaluate(
        params.evaluate, eval_jsonl=paths.EVAL_JSONL, base_dir=paths.BASE_DIR, merged_dir=paths.MERGED_DIR,
        ref_gguf=paths.gguf_path(ex.outtype), quant_gguf=paths.QUANT_GGUF,
        ref_name=ref_type, trust_remote_code=params.model.trust_remote_code, measures=retention.measures_path(paths.QUANT_GGUF))
    metrics = result.metrics
    write_predictions(PREDICTIONS, result)
    write_json(METRICS, metrics)
    write_json(PLOT, result.variants)
    write_json(ANSWERS_PLOT, result.answer_plot)
    write_text(SAMPLES, result.samples)
    ref = ref_type
    return {"bleu4_merged": metrics["answers_bleu4_hf_merged"], "bleu4_quant": metrics["answers_bleu4_quant"],
            "ppl_merged": metrics["ppl_hf_merged"], f"ppl_{ref}": metrics[f"ppl_{ref}"], "ppl_quant": metrics["ppl_quant"],
            "delta_pct": metrics["ppl_delta_pct"], "kld": metrics[f"kld_quant_vs_{ref}"],
            "size_ratio": metrics["size_ratio"], "decode_x": metrics["decode_speedup_quant_vs_hf"],
            "finetune_kept": metrics["finetune_kept"]}
