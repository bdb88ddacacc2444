"""Stage `quantize`: models/gguf/model-<outtype>.gguf -> models/gguf/model-quant.gguf, the type
chosen by what it keeps, plus metrics/quantize.json and plots/quant_candidates.json.

Quantization is llama.cpp's own `llama-quantize` (K-quants exist only there; gguf-py implements
none). The valid type names are read from llama-quantize's help, so any type the pinned build
accepts works and a typo gets the real list. With `export.imatrix: true` an importance matrix is
computed once, with `llama-imatrix` over the train split rendered with the chat template, and used
for every candidate.

Gates, in order:
1. the converted file against the HF merged model (core/parity.py: tokens, template, stop tokens,
   greedy stop, logits); a failure here is a conversion defect and ends the stage;
2. per candidate type (export.quant_candidates for `export.quant: auto`, else export.quant alone):
   argmax agreement with the converted file, perplexity change and fine-tune kept on the eval split
   (core/retention.py, the same measure stage evaluate reports). The first candidate that passes is
   kept; the table of every candidate tried goes to the metrics.

The output path is one fixed name whatever the type (chat, serve, ui and package need not know it;
DVC outs stay static). A failed gate, like an interrupted run, leaves nothing at the output path.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from lorapipe.core import gguf_meta, hfmodel, llamacpp, parity, paths, retention
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path, read_jsonl, write_json
from lorapipe.core.llamacpp_run import imatrix_progress, run_tool, tensor_progress, tool_error
from lorapipe.core.log import info

METRICS = paths.METRICS_DIR / "quantize.json"
PLOT = paths.PLOTS_DIR / "quant_candidates.json"
MB = 1_000_000
IMATRIX_CTX = 128  # short chunks: the train split of a small fine-tune is short, and tiny test models too
IMATRIX_MAX_CHUNKS = 100  # ~13k tokens: enough for a small model's activations


@functools.lru_cache(maxsize=1)
def valid_types() -> tuple[str, ...]:
    """Type names from `llama-quantize --help` ("allowed quantization types" table).

    Not through run_tool: llama-quantize prints its help and exits 1, so a failed exit says nothing here."""
    proc = subprocess.run([str(llamacpp.tool("llama-quantize")), "--help"], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    table = text.split("allowed quantization types", 1)[-1]
    names = re.findall(r"^\s+(?:\d+\s+or\s+)?([A-Z][A-Z0-9_]*)\s*:", table, flags=re.M)
    if not names:
        raise LorapipeError(f"could not read the quantization types from `llama-quantize --help`:\n{text[-2000:]}")
    return tuple(names)


def check_type(quant: str, param: str = "export.quant") -> str:
    """The canonical (upper-case) type name, or an error naming `param` and listing every valid type."""
    names = valid_types()
    canonical = quant.strip().upper()
    if canonical not in names or canonical == "COPY":
        raise LorapipeError(f"{param}: unknown quantization type {quant!r}; llama-quantize accepts: "
                            f"{', '.join(n for n in names if n != 'COPY')}")
    return canonical


def calibration_text(rows: list[dict], tokenizer) -> str:
    """Train conversations rendered with the chat template, one after another."""
    return "".join(tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows if r.get("messages"))


def compute_imatrix(ref_gguf: Path, text: str, out: Path, threads: int = 2) -> Path:
    """llama-imatrix over `text` into `out`.

    Run in a temporary folder with the text file given by its bare name: llama-imatrix records that
    name in the imatrix (and llama-quantize copies it into the quantized GGUF as
    quantize.imatrix.dataset), so a temporary path there would make every run's file different.
    """
    with tempfile.TemporaryDirectory(prefix="lorapipe-imatrix-") as work:
        (Path(work) / "calibration.txt").write_text(text, encoding="utf-8")
        args = ["-m", Path(ref_gguf).resolve(), "-f", "calibration.txt", "-o", Path(out).resolve(),
                "-c", str(IMATRIX_CTX), "--chunks", str(IMATRIX_MAX_CHUNKS), "-t", str(threads),
                "--parse-special", "--no-ppl"]
        info(f"quantize: computing importance matrix over {len(text)} characters")
        what = f"importance matrix over {paths.TRAIN_JSONL} (needs at least {2 * IMATRIX_CTX} tokens)"
        result = run_tool("llama-imatrix", args, what=what, cwd=work, progress=imatrix_progress("quantize: importance matrix"))
        if not out.is_file():
            raise tool_error(what, result, "llama-imatrix wrote no imatrix")
    return out


def quantize_file(ref_gguf: Path, out: Path, quant: str, *, imatrix: Path | None = None, threads: int = 2) -> None:
    """llama-quantize ref_gguf -> out. With an imatrix it runs in the imatrix's folder and names the
    file bare: llama-quantize records the name as given in the output (quantize.imatrix.file), and
    the same inputs must give the same bytes wherever the temporary folder is."""
    args: list[str | Path] = ["--imatrix", imatrix.name] if imatrix is not None else []
    args += [Path(ref_gguf).resolve(), Path(out).resolve(), quant, str(threads)]
    run_tool("llama-quantize", args, what=f"quantizing {ref_gguf} to {quant}",
             cwd=imatrix.parent if imatrix is not None else None, progress=tensor_progress(f"quantize: {quant}"))


def size_metrics(ref_gguf: Path, quant_gguf: Path) -> dict:
    reader = gguf_meta.reader(quant_gguf)
    size, size_ref = quant_gguf.stat().st_size, ref_gguf.stat().st_size
    return {
        "size_bytes": size,
        "size_f16_bytes": size_ref,
        "size_ratio": size / size_ref,
        # tensor data over weights, as llama.cpp's loader reports "BPW" (the vocabulary in the
        # metadata would dominate the file size of a tiny model)
        "bits_per_weight": gguf_meta.tensor_bytes(reader) * 8 / gguf_meta.n_weights(reader),
        "n_weights": gguf_meta.n_weights(reader),
        "tensor_types": gguf_meta.tensor_types(reader),
    }


def candidate_types(quant: str, candidates: list[str]) -> list[str]:
    """The types to try, in order: export.quant_candidates for `auto`, else export.quant alone."""
    if quant.strip().lower() == hfmodel.QUANT_AUTO:
        return list(dict.fromkeys(check_type(n, "export.quant_candidates") for n in candidates))
    return [check_type(quant)]


def candidate_row(quant_type: str, sizes: dict, argmax: float, figures: retention.Figures, failures: list[str]) -> dict:
    """One row of metrics/quantize.json's candidate table."""
    return {"type": quant_type, "size_mb": sizes["size_bytes"] / MB, "bits_per_weight": sizes["bits_per_weight"],
            "argmax_agreement": argmax, "ppl_delta_pct": figures.ppl_delta_pct, "kld": figures.kld,
            "kld_assistant_vs_merged": figures.assistant.kld, "finetune_kept": figures.finetune_kept,
            "passed": not failures, "failures": failures}


def table_text(rows: list[dict]) -> str:
    """The candidate table as aligned text, for the log and for the error when none passes."""
    lines = [f"  {'type':8} {'MB':>8} {'bpw':>6} {'argmax':>7} {'ppl %':>7} {'kept':>6}  passed"]
    for r in rows:
        kept = "n/a" if r["finetune_kept"] is None else f"{r['finetune_kept']:.3f}"
        lines.append(f"  {r['type']:8} {r['size_mb']:8.1f} {r['bits_per_weight']:6.2f} {r['argmax_agreement']:7.3f} "
                     f"{r['ppl_delta_pct']:+7.2f} {kept:>6}  {'yes' if r['passed'] else 'no'}")
    return "\n".join(lines)


def quantize(ref_gguf: str | Path, out_path: str | Path, quant: str, *, merged_dir: str | Path, base_dir: str | Path,
             eval_rows: list[dict], parity_params, gates: retention.Gates, candidates: list[str],
             ctx: int, max_chunks: int, eval_jsonl: Path = paths.EVAL_JSONL,
             train_rows: list[dict] | None = None, trust_remote_code: bool = False, threads: int = 2) -> dict:
    """Quantize to each candidate type in turn, keep the first that passes every gate at `out_path`,
    and return the metrics with the whole candidate table. A failed gate on the converted file, or
    no candidate passing, raises and leaves nothing at `out_path`."""
    ref_gguf, out_path = Path(ref_gguf), Path(out_path)
    types = candidate_types(quant, candidates)
    ref_type = gguf_meta.file_type(ref_gguf)  # also a clear error for a missing or unreadable input before any work
    if ref_type in types:
        raise LorapipeError(f"{'export.quant_candidates' if len(types) > 1 else 'export.quant'}: {ref_type} is the type of "
                            f"the converted file {ref_gguf} itself; quantizing it to {ref_type} again changes nothing")
    conversations = parity.eval_conversations(eval_rows, parity_params.n_prompts)
    if not conversations:
        raise LorapipeError(f"{eval_jsonl}: no row with a user turn before an assistant turn to check parity on")

    with tempfile.TemporaryDirectory(prefix="lorapipe-quantize-") as work, atomic_path(out_path) as tmp:
        work = Path(work)
        info(f"quantize: parity gate of {ref_gguf} on {len(conversations)} eval prompts")
        ref_report, prompt_ids = parity.check_f16(merged_dir, ref_gguf, conversations, parity_params,
                                                  trust_remote_code=trust_remote_code, threads=threads)
        for warning in ref_report.warnings:
            info(f"quantize: warning: {warning}")
        if ref_report.failures:
            raise LorapipeError(f"parity gate failed for {ref_gguf} (nothing was written to {out_path}):\n"
                                + "\n".join(ref_report.failures))

        imatrix = None
        if train_rows is not None:
            text = calibration_text(train_rows, hfmodel.load_tokenizer(merged_dir, trust_remote_code))
            imatrix = compute_imatrix(ref_gguf, text, work / "imatrix.gguf", threads)

        info(f"quantize: reference figures of {ref_gguf}, HF merged and HF base on {eval_jsonl}")
        reference = reference_scores(eval_rows, ref_gguf, work, merged_dir=merged_dir, base_dir=base_dir,
                                     eval_jsonl=eval_jsonl, ctx=ctx, max_chunks=max_chunks, threads=threads,
                                     trust_remote_code=trust_remote_code)
        rows, chosen = [], None
        for quant_type in types:
            info(f"quantize: {ref_gguf} -> {quant_type}{' with imatrix' if imatrix else ''}"
                 f"{f' (candidate {len(rows) + 1} of {len(types)})' if len(types) > 1 else ''}")
            # named by its type while it is measured (progress lines and messages say which candidate)
            candidate = work / f"model-{quant_type.lower()}.gguf"
            quantize_file(ref_gguf, candidate, quant_type, imatrix=imatrix, threads=threads)
            quant_report = parity.check_quant(ref_gguf, candidate, prompt_ids, parity_params, threads=threads,
                                              name=f"{out_path} ({quant_type})")
            figures = reference.measure(candidate)
            failures = quant_report.failures + retention.gate_failures(
                gates, figures, quant_gguf=out_path, quant_type=quant_type, ref_gguf=ref_gguf,
                ppl_ref=reference.ppl_ref, scores=reference.scores)
            sizes = size_metrics(ref_gguf, candidate)
            rows.append(candidate_row(quant_type, sizes, quant_report.figures["quant_argmax_agreement"], figures, failures))
            if not failures:
                shutil.copyfile(candidate, tmp)  # the work folder may be on another file system than out_path
                chosen = (quant_type, sizes, quant_report)
                break
            candidate.unlink()
            info(f"quantize: {quant_type} fails: " + " | ".join(failures))
        info("quantize: candidates\n" + table_text(rows))
        if chosen is None:
            raise LorapipeError(
                f"quantize: no candidate type passes every gate (nothing was written to {out_path}):\n"
                + table_text(rows) + "\n" + "\n".join(f for r in rows for f in r["failures"]) + "\n" + retention.REMEDIES)
        quant_type, sizes, quant_report = chosen
        choice = choice_reason(quant, types, quant_type)
        if not reference.finetune_measurable:
            choice += " (finetune_kept not measured: the fine-tune moved the model too little)"
        metrics = {"quant": quant_type, "choice": choice, "imatrix": imatrix is not None,
                   **sizes, "parity": {**ref_report.figures, **quant_report.figures, "passed": True},
                   "ppl_unquantized": reference.ppl_ref, "kld_assistant_base_vs_merged": reference.kld_base,
                   "candidates": rows}
    return metrics


def reference_scores(eval_rows: list[dict], ref_gguf: Path, work: Path, *, merged_dir, base_dir, eval_jsonl: Path, ctx: int,
                     max_chunks: int, threads: int, trust_remote_code: bool) -> retention.Reference:
    import torch

    torch.set_num_threads(threads)
    tokenizer = hfmodel.load_tokenizer(merged_dir, trust_remote_code)
    reference = retention.Reference(eval_rows, tokenizer, eval_jsonl, ref_gguf, work, ctx=ctx, max_chunks=max_chunks,
                                    threads=threads)
    for key, folder in (("hf_merged", merged_dir), ("hf_base", base_dir)):
        model = hfmodel.load_causal_lm(folder, trust_remote_code, dtype=torch.float32).eval()
        reference.add_hf(key, model)
        del model
    return reference


def choice_reason(quant: str, types: list[str], chosen: str) -> str:
    if quant.strip().lower() != hfmodel.QUANT_AUTO:
        return f"export.quant: {chosen} (fixed type; it passes every gate)"
    if chosen == types[0]:
        return f"auto: {chosen}, the first of export.quant_candidates ({', '.join(types)}), passes every gate"
    failed = types[: types.index(chosen)]
    return (f"auto: {chosen} is the first of export.quant_candidates ({', '.join(types)}) that passes every gate; "
            f"{', '.join(failed)} failed")


def candidate_plot(metrics: dict) -> list[dict]:
    """plots/quant_candidates.json: size against fine-tune kept, one point per candidate tried."""
    return [{"type": r["type"], "size_mb": r["size_mb"], "finetune_kept": r["finetune_kept"],
             "ppl_delta_pct": r["ppl_delta_pct"], "passed": r["passed"]} for r in metrics["candidates"]]


def run(params) -> dict:
    ex, ep = params.export, params.evaluate
    ref = paths.gguf_path(ex.outtype)  # the converted file (convert's output)
    if not ref.is_file():
        raise LorapipeError(f"{ref}: not found; run `lorapipe convert` first")
    if not paths.EVAL_JSONL.is_file():
        raise LorapipeError(f"{paths.EVAL_JSONL}: not found; the gates need the eval split (run `lorapipe clean`)")
    hfmodel.check_folder(paths.BASE_DIR, "the base model (made by stage base: `lorapipe base`)")
    # The output's name does not say its type: a file left by an earlier run must not outlive a failed one
    # (`dvc repro` removes outs first too).
    for stale in (paths.QUANT_GGUF, METRICS, PLOT):
        stale.unlink(missing_ok=True)
    train_rows = read_jsonl(paths.TRAIN_JSONL) if ex.imatrix else None
    metrics = quantize(ref, paths.QUANT_GGUF, ex.quant, candidates=ex.quant_candidates, merged_dir=paths.MERGED_DIR,
                       base_dir=paths.BASE_DIR, eval_rows=read_jsonl(paths.EVAL_JSONL), parity_params=ex.parity,
                       gates=retention.Gates(ep.max_ppl_delta_pct, ep.min_finetune_kept), ctx=ep.ctx,
                       max_chunks=ep.max_chunks, train_rows=train_rows, trust_remote_code=params.model.trust_remote_code,
                       threads=ex.threads)
    write_json(METRICS, metrics)
    write_json(PLOT, candidate_plot(metrics))
    p, chosen = metrics["parity"], metrics["candidates"][-1]
    return {"quant": metrics["quant"], "tried": len(metrics["candidates"]), "size_ratio": metrics["size_ratio"],
            "bpw": metrics["bits_per_weight"], "finetune_kept": chosen["finetune_kept"],
            "ppl_delta_pct": chosen["ppl_delta_pct"], "quant_argmax": p["quant_argmax_agreement"],
            "stops_on_its_own": p["stops_on_its_own"]}
