"""Stage `quantize`: models/gguf/model-<outtype>.gguf -> models/gguf/model-<quant>.gguf, plus the
HF <-> GGUF parity gate and metrics/quantize.json.

Quantization is llama.cpp's own `llama-quantize` (K-quants exist only there; gguf-py implements
none). The valid type names are read from llama-quantize's help, so any type the pinned build
accepts works and a typo gets the real list. With `export.imatrix: true` an importance matrix is
computed first with `llama-imatrix` over the train split rendered with the chat template.

The parity gate (core/parity.py) runs before the quantized file is renamed into place: a failed
gate, like an interrupted run, leaves nothing at the output path. It lives here rather than in
convert because it needs the eval split and the HF model besides the converted file, and its
thresholds (export.parity) then rerun only this stage and what follows.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tempfile
from pathlib import Path

from lorapipe.core import gguf_meta, hfmodel, llamacpp, parity, paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path, read_jsonl, write_json
from lorapipe.core.llamacpp_run import imatrix_progress, run_tool, tensor_progress, tool_error
from lorapipe.core.log import info

METRICS = paths.METRICS_DIR / "quantize.json"
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


def check_type(quant: str) -> str:
    """The canonical (upper-case) type name, or an error listing every valid one."""
    names = valid_types()
    canonical = quant.strip().upper()
    if canonical not in names or canonical == "COPY":
        raise LorapipeError(f"export.quant: unknown quantization type {quant!r}; llama-quantize accepts: "
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


def quantize(ref_gguf: str | Path, out_path: str | Path, quant: str, *, merged_dir: str | Path,
             eval_rows: list[dict], parity_params, train_rows: list[dict] | None = None,
             trust_remote_code: bool = False, threads: int = 2) -> dict:
    """Quantize, run the parity gate, then move the file into place; return the metrics."""
    ref_gguf, out_path = Path(ref_gguf), Path(out_path)
    quant = check_type(quant)
    gguf_meta.reader(ref_gguf)  # clear error for a missing or unreadable input before any work
    conversations = parity.eval_conversations(eval_rows, parity_params.n_prompts)
    if not conversations:
        raise LorapipeError(f"{paths.EVAL_JSONL}: no row with a user turn before an assistant turn to check parity on")

    with tempfile.TemporaryDirectory(prefix="lorapipe-quantize-") as work, atomic_path(out_path) as tmp:
        imatrix = None
        if train_rows is not None:
            text = calibration_text(train_rows, hfmodel.load_tokenizer(merged_dir, trust_remote_code))
            imatrix = compute_imatrix(ref_gguf, text, Path(work) / "imatrix.gguf", threads)
        info(f"quantize: {ref_gguf} -> {out_path} ({quant}{', imatrix' if imatrix else ''})")
        quantize_file(ref_gguf, tmp, quant, imatrix=imatrix, threads=threads)

        info(f"quantize: parity gate on {len(conversations)} eval prompts")
        ref_report, prompt_ids = parity.check_f16(merged_dir, ref_gguf, conversations, parity_params,
                                                  trust_remote_code=trust_remote_code, threads=threads)
        quant_report = parity.check_quant(ref_gguf, tmp, prompt_ids, parity_params, threads=threads)
        failures = ref_report.failures + quant_report.failures
        for warning in ref_report.warnings:
            info(f"quantize: warning: {warning}")
        metrics = {"quant": quant, "imatrix": imatrix is not None, **size_metrics(ref_gguf, tmp),
                   "parity": {**ref_report.figures, **quant_report.figures, "passed": not failures}}
        if failures:
            raise LorapipeError(f"parity gate failed for {ref_gguf} / {out_path} (nothing was written):\n" + "\n".join(failures))
    return metrics


def run(params) -> dict:
    ex = params.export
    ref = paths.gguf_path(ex.outtype)  # the converted file (convert's output)
    if not ref.is_file():
        raise LorapipeError(f"{ref}: not found; run `lorapipe convert` first")
    if not paths.EVAL_JSONL.is_file():
        raise LorapipeError(f"{paths.EVAL_JSONL}: not found; the parity gate needs the eval split (run `lorapipe clean`)")
    out = paths.gguf_path(ex.quant)
    if out == ref:
        raise LorapipeError(f"export.quant: {ex.quant} would overwrite the converted file {ref} (export.outtype {ex.outtype})")
    train_rows = read_jsonl(paths.TRAIN_JSONL) if ex.imatrix else None
    metrics = quantize(ref, out, ex.quant, merged_dir=paths.MERGED_DIR,
                       eval_rows=read_jsonl(paths.EVAL_JSONL), parity_params=ex.parity, train_rows=train_rows,
                       trust_remote_code=params.model.trust_remote_code, threads=ex.threads)
    write_json(METRICS, metrics)
    p = metrics["parity"]
    return {"quant": metrics["quant"], "size_ratio": metrics["size_ratio"], "bpw": metrics["bits_per_weight"],
            "f16_max_dlogit": p["f16_max_abs_logit_diff"], "quant_argmax": p["quant_argmax_agreement"],
            "stop": p["stop_fraction"], "stops_on_its_own": p["stops_on_its_own"]}
