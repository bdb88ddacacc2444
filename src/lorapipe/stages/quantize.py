"""Stage `quantize`: models/gguf/model-<outtype>.gguf -> models/gguf/model-quant.gguf, the type
chosen by what it keeps, plus metrics/quantize.json, plots/quant_candidates.json and
models/gguf/model-quant.measures.json (what the gates measured, which stage evaluate reads).

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorapipe.core import gguf_meta, hfmodel, llamacpp, parity, paths, retention
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path, read_jsonl, write_json
from lorapipe.core.llamacpp_run import imatrix_progress, run_tool, tensor_progress, tool_error
from lorapipe.core.log import info

if TYPE_CHECKING:  # the params sections (the stage reads params.export and four evaluate keys)
    from lorapipe.params import EvaluateParams, ExportParams

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


@dataclass(frozen=True)
class Files:
    """What quantize reads and writes: `Files.repo()` in the stage, a test's own folder in tests."""
    ref_gguf: Path               # the converted file (stage convert's output)
    out: Path                    # the kept quantized file
    merged_dir: Path
    base_dir: Path
    eval_jsonl: Path
    train_jsonl: Path | None = None  # the importance matrix's calibration text (export.imatrix)
    measures: Path | None = None     # what the gates measured, for stage evaluate (None: not written)

    @classmethod
    def repo(cls, ref_gguf: Path) -> "Files":
        return cls(ref_gguf, paths.QUANT_GGUF, paths.MERGED_DIR, paths.BASE_DIR, paths.EVAL_JSONL, paths.TRAIN_JSONL,
                   retention.measures_path(paths.QUANT_GGUF))


def quantize(ex: ExportParams, ep: EvaluateParams, files: Files, *, trust_remote_code: bool = False) -> dict:
    """Quantize to each candidate type in turn, keep the first that passes every gate at `files.out`
    (what it measured at `files.measures`), and return the metrics with the whole candidate table.
    A failed gate on the converted file, or no candidate passing, raises and leaves nothing at either."""
    types = candidate_types(ex.quant, ex.quant_candidates)
    check_not_ref_type(files.ref_gguf, types)  # also a clear error for a missing or unreadable input before any work
    eval_rows = read_jsonl(files.eval_jsonl)
    conversations = parity.eval_conversations(eval_rows, ex.parity.n_prompts)
    if not conversations:
        raise LorapipeError(f"{files.eval_jsonl}: no row with a user turn before an assistant turn to check parity on")

    with tempfile.TemporaryDirectory(prefix="lorapipe-quantize-") as work, atomic_path(files.out) as tmp:
        work = Path(work)
        ref_report, prompt_ids = parity_gate(files, conversations, ex, trust_remote_code)
        imatrix = importance_matrix(files, ex, work, trust_remote_code)
        reference = reference_scores(eval_rows, files, ep, work, threads=ex.threads, trust_remote_code=trust_remote_code)
        rows, chosen = try_candidates(types, files, ex, ep, reference, imatrix, prompt_ids, work)
        if chosen is None:
            raise LorapipeError(
                f"quantize: no candidate type passes every gate (nothing was written to {files.out}):\n"
                + table_text(rows) + "\n" + "\n".join(f for r in rows for f in r["failures"]) + "\n" + retention.REMEDIES)
        shutil.copyfile(chosen.path, tmp)  # the work folder may be on another file system than the output
        if files.measures is not None:
            write_measures(files, ep, reference, chosen)
        choice = choice_reason(ex.quant, types, chosen.type)
        if not reference.finetune_measurable:
            choice += " (finetune_kept not measured: the fine-tune moved the model too little)"
        quant_report = chosen.report
        metrics = {"quant": chosen.type, "choice": choice, "imatrix": imatrix is not None,
                   **chosen.sizes, "parity": {**ref_report.figures, **quant_report.figures, "passed": True},
                   "ppl_unquantized": reference.ppl_ref, "kld_assistant_base_vs_merged": reference.kld_base,
                   "candidates": rows}
    return metrics


def check_not_ref_type(ref_gguf: Path, types: list[str]) -> None:
    ref_type = gguf_meta.file_type(ref_gguf)
    if ref_type in types:
        raise LorapipeError(f"{'export.quant_candidates' if len(types) > 1 else 'export.quant'}: {ref_type} is the type of "
                            f"the converted file {ref_gguf} itself; quantizing it to {ref_type} again changes nothing")


def parity_gate(files: Files, conversations: list[list[dict]], ex: ExportParams,
                trust_remote_code: bool) -> tuple[parity.Report, list[list[int]]]:
    """Gate 1: the converted file against the HF merged model; its report and llama.cpp's prompt ids."""
    info(f"quantize: parity gate of {files.ref_gguf} on {len(conversations)} eval prompts")
    report, prompt_ids = parity.check_f16(files.merged_dir, files.ref_gguf, conversations, ex.parity,
                                          trust_remote_code=trust_remote_code, threads=ex.threads)
    for warning in report.warnings:
        info(f"quantize: warning: {warning}")
    if report.failures:
        raise LorapipeError(f"parity gate failed for {files.ref_gguf} (nothing was written to {files.out}):\n"
                            + "\n".join(report.failures))
    return report, prompt_ids


def importance_matrix(files: Files, ex: ExportParams, work: Path, trust_remote_code: bool) -> Path | None:
    if not ex.imatrix:
        return None
    if files.train_jsonl is None or not files.train_jsonl.is_file():
        raise LorapipeError(f"{files.train_jsonl}: not found; export.imatrix reads the train split (run `lorapipe clean`)")
    text = calibration_text(read_jsonl(files.train_jsonl), hfmodel.load_tokenizer(files.merged_dir, trust_remote_code))
    return compute_imatrix(files.ref_gguf, text, work / "imatrix.gguf", ex.threads)


@dataclass(frozen=True)
class Candidate:
    """The kept candidate: its type, file in the work folder, sizes, argmax report and figures."""
    type: str
    path: Path
    sizes: dict
    report: parity.Report
    figures: retention.Figures


def try_candidates(types: list[str], files: Files, ex: ExportParams, ep: EvaluateParams, reference: retention.Reference,
                   imatrix: Path | None, prompt_ids: list[list[int]], work: Path) -> tuple[list[dict], Candidate | None]:
    """Gate 2 on each type in turn until one passes: the table of those tried, and the one kept (None: none)."""
    gates = retention.Gates(ep.max_ppl_delta_pct, ep.min_finetune_kept)
    argmax = parity.QuantCheck(files.ref_gguf, prompt_ids, ex.parity, threads=ex.threads)
    rows = []
    for quant_type in types:
        info(f"quantize: {files.ref_gguf} -> {quant_type}{' with imatrix' if imatrix else ''}"
             f"{f' (candidate {len(rows) + 1} of {len(types)})' if len(types) > 1 else ''}")
        # named by its type while it is measured (progress lines and messages say which candidate)
        path = work / f"model-{quant_type.lower()}.gguf"
        quantize_file(files.ref_gguf, path, quant_type, imatrix=imatrix, threads=ex.threads)
        report = argmax.check(path, name=f"{files.out} ({quant_type})")
        figures = reference.measure(path)
        failures = report.failures + retention.gate_failures(
            gates, figures, quant_gguf=files.out, quant_type=quant_type, ref_gguf=files.ref_gguf,
            ppl_ref=reference.ppl_ref, scores=reference.scores)
        sizes = size_metrics(files.ref_gguf, path)
        rows.append(candidate_row(quant_type, sizes, report.figures["quant_argmax_agreement"], figures, failures))
        if not failures:
            info("quantize: candidates\n" + table_text(rows))
            return rows, Candidate(quant_type, path, sizes, report, figures)
        path.unlink()
        info(f"quantize: {quant_type} fails: " + " | ".join(failures))
    info("quantize: candidates\n" + table_text(rows))
    return rows, None


def write_measures(files: Files, ep: EvaluateParams, reference: retention.Reference, chosen: Candidate) -> None:
    """What stage evaluate would measure again: the converted file's assistant-token scores (measured
    here), the reference's and the kept file's figures, with the content hash of every file they hold for."""
    converted = reference.score_gguf(files.ref_gguf)
    hashes = retention.fingerprints(eval_jsonl=files.eval_jsonl, base_dir=files.base_dir, merged_dir=files.merged_dir,
                                    ref_gguf=files.ref_gguf, quant_gguf=chosen.path)
    measured = retention.Measured.of(reference, chosen.figures, converted, hashes, ctx=ep.ctx, max_chunks=ep.max_chunks)
    write_json(files.measures, measured.to_json())


def reference_scores(eval_rows: list[dict], files: Files, ep: EvaluateParams, work: Path, *, threads: int,
                     trust_remote_code: bool) -> retention.Reference:
    import torch

    info(f"quantize: reference figures of {files.ref_gguf}, HF merged and HF base on {files.eval_jsonl}")
    torch.set_num_threads(threads)
    tokenizer = hfmodel.load_tokenizer(files.merged_dir, trust_remote_code)
    reference = retention.Reference(eval_rows, tokenizer, files.eval_jsonl, files.ref_gguf, work, ctx=ep.ctx,
                                    max_chunks=ep.max_chunks, threads=threads)
    reference.add_unquantized()
    for key, folder in (("hf_merged", files.merged_dir), ("hf_base", files.base_dir)):
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
    ex = params.export
    ref = paths.gguf_path(ex.outtype)  # the converted file (convert's output)
    if not ref.is_file():
        raise LorapipeError(f"{ref}: not found; run `lorapipe convert` first")
    if not paths.EVAL_JSONL.is_file():
        raise LorapipeError(f"{paths.EVAL_JSONL}: not found; the gates need the eval split (run `lorapipe clean`)")
    hfmodel.check_folder(paths.BASE_DIR, "the base model (made by stage base: `lorapipe base`)")
    # The output's name does not say its type: a file left by an earlier run must not outlive a failed one
    # (`dvc repro` removes outs first too).
    for stale in (paths.QUANT_GGUF, retention.measures_path(paths.QUANT_GGUF), METRICS, PLOT):
        stale.unlink(missing_ok=True)
    metrics = quantize(ex, params.evaluate, Files.repo(ref), trust_remote_code=params.model.trust_remote_code)
    write_json(METRICS, metrics)
    write_json(PLOT, candidate_plot(metrics))
    p, chosen = metrics["parity"], metrics["candidates"][-1]
    return {"quant": metrics["quant"], "tried": len(metrics["candidates"]), "size_ratio": metrics["size_ratio"],
            "bpw": metrics["bits_per_weight"], "finetune_kept": chosen["finetune_kept"],
            "ppl_delta_pct": chosen["ppl_delta_pct"], "quant_argmax": p["quant_argmax_agreement"],
            "stops_on_its_own": p["stops_on_its_own"]}
