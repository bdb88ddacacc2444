"""Stage `convert`: models/merged/ -> models/gguf/model-<export.outtype>.gguf with llama.cpp's converter.

The pinned tree's convert_hf_to_gguf.py runs as a subprocess of this virtualenv's Python (it needs
the gguf-py of the same tree, installed there). It writes to a temporary sibling that is renamed
into place only after the converter succeeded and the file's metadata was checked, so an
interrupted conversion leaves nothing at the output path.

general.name / general.description come from export.name / export.description through the
converter's own `--metadata` override file. The converter's pre-tokenizer check is never patched:
an unknown tokenizer fails with the converter's message, and we add a hint.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

from lorapipe.core import gguf_meta, hfmodel, llamacpp, paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path
from lorapipe.core.llamacpp_run import run_with_progress, tail, writer_progress
from lorapipe.core.log import info

PRETOKENIZER_HINT = (
    "hint: llama.cpp's converter identifies a BPE tokenizer by hashing how it tokenizes a fixed text; "
    "a tokenizer trained or modified locally never matches. Keep the base model's original tokenizer "
    "files in models/merged/ (a SentencePiece model needs its tokenizer.model), or use a model family "
    "the pinned llama.cpp supports."
)


def _converter_error(merged: Path, out: str) -> LorapipeError:
    if m := re.search(r"Model (\S+) is not supported", out):
        return LorapipeError(
            f"{merged}/config.json: architecture {m.group(1)} is not supported by the pinned llama.cpp converter "
            f"(llama.cpp {llamacpp.LLAMA_CPP_PYTHON_VERSION}); see `convert_hf_to_gguf.py --print-supported-models`")
    if "pre-tokenizer was not recognized" in out or "BPE pre-tokenizer" in out:
        return LorapipeError(f"llama.cpp converter rejected the tokenizer of {merged}:\n{tail(out)}\n{PRETOKENIZER_HINT}")
    return LorapipeError(f"llama.cpp converter failed on {merged}:\n{tail(out)}")


def _converter_view(merged: Path, view: Path) -> Path:
    """The folder to hand the converter: `merged` itself, or, when its tokenizer_config.json lacks
    `added_tokens_decoder` (a folder re-saved by transformers 5 elsewhere), a view of symlinks with a
    fixed copy of that one file. The DVC-tracked merged folder itself is never modified."""
    config = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config.get("added_tokens_decoder") or not (merged / "tokenizer.json").is_file():
        return merged
    view.mkdir()
    for item in merged.iterdir():
        if item.name != "tokenizer_config.json":
            (view / item.name).symlink_to(item.resolve())
    (view / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    n = hfmodel.restore_added_tokens_decoder(view)
    info(f"convert: restored added_tokens_decoder ({n} tokens) for the converter")
    return view


def check_gguf_metadata(path: Path, shown: Path | None = None) -> dict:
    """The converted file must carry what chat needs: template, BOS and EOS ids."""
    meta = gguf_meta.metadata(path)
    missing = [k for k in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id") if k not in meta]
    if missing:
        raise LorapipeError(f"{shown or path}: converted GGUF lacks {', '.join(missing)}; check chat_template.jinja and "
                            "tokenizer_config.json in the merged folder")
    return meta


def convert(merged_dir: str | Path, out_path: str | Path, outtype: str = "f16", *, name: str = "lorapipe-model",
            description: str = "", trust_remote_code: bool = False, timeout: float | None = None) -> dict:
    merged_dir, out_path = Path(merged_dir), Path(out_path)
    hfmodel.check_folder(merged_dir, "the merged model (run `lorapipe merge`)")
    # The converter loads some tokenizers with trust_remote_code=True: it runs no code we were not allowed to.
    hfmodel.check_trust(merged_dir, trust_remote_code)
    outtype = hfmodel.resolve_outtype(outtype, merged_dir)

    converter = llamacpp.converter()
    with tempfile.TemporaryDirectory(prefix="lorapipe-convert-") as work, atomic_path(out_path) as tmp:
        source = _converter_view(merged_dir, Path(work) / "model")
        meta_file = Path(work) / "metadata.json"
        meta_file.write_text(json.dumps({"general.name": name, "general.description": description}), encoding="utf-8")
        cmd = [sys.executable, str(converter), str(source), "--outfile", str(tmp), "--outtype", outtype,
               "--metadata", str(meta_file)]
        info(f"convert: {merged_dir} -> {out_path} ({outtype})")
        proc = run_with_progress(cmd, writer_progress("convert: tensors"), timeout=timeout)
        if proc.returncode != 0:
            raise _converter_error(merged_dir, proc.stdout + proc.stderr)
        meta = check_gguf_metadata(tmp, out_path)
        size = tmp.stat().st_size
        types = gguf_meta.tensor_types(tmp)
    return {
        "path": str(out_path),
        "outtype": outtype,
        "size_bytes": size,
        "arch": meta.get("general.architecture"),
        "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
        "bos_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_id": meta.get("tokenizer.ggml.eos_token_id"),
        "eot_id": meta.get("tokenizer.ggml.eot_token_id"),
        "tensor_types": types,
    }


def run(params) -> dict:
    ex = params.export
    result = convert(paths.MERGED_DIR, paths.gguf_path(ex.outtype), ex.outtype, name=ex.name, description=ex.description,
                     trust_remote_code=params.model.trust_remote_code)
    result.pop("tensor_types")
    return result
