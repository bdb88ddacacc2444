"""Checks and fixes for plain HF model folders (models/base, models/merged) that stages hand to
transformers and to llama.cpp's converter.

Two transformers-5 habits break the GGUF converter (docs/toolchain.md#tokenizer-resave): it no longer writes
`added_tokens_decoder` into tokenizer_config.json (the converter reads token types from it, so
`<|im_end|>`/`<end_of_turn>` would become NORMAL tokens that llama.cpp splits and never stops on),
and it does not write `tokenizer.model` again for a SentencePiece tokenizer (the converter then takes
the BPE route). `restore_added_tokens_decoder` restores the first; stages keep the second by copying
tokenizer files from the base instead of re-saving them.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorapipe.core.errors import LorapipeError
from lorapipe.core.templates import END_OF_TURN_TOKENS

# The files a tokenizer is made of, wherever a stage copies one (base keeps them, merge copies them
# byte for byte from the base). tokenizer.model matters for SentencePiece models: the converter needs
# it and transformers 5 does not write it again (docs/toolchain.md#tokenizer-resave).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
# A tokenizer's vocabulary: a folder needs at least one of these.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model")


def check_folder(folder: str | Path, what: str, *, weights: bool = True, tokenizer: bool = True) -> Path:
    """Fail with a clear message unless `folder` is an HF folder with config, safetensors weights
    and tokenizer files. A pickle `.bin` checkpoint is refused: loading one runs arbitrary code."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorapipeError(f"{folder}: {what} folder not found")
    if not (folder / "config.json").is_file():
        raise LorapipeError(f"{folder}/config.json: missing; {what} is not a complete HF model folder")
    if weights and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        if pickles:
            raise LorapipeError(
                f"{folder}/{pickles[0]}: pickle checkpoint refused (it can run arbitrary code when loaded); "
                f"re-save {what} with safetensors (save_pretrained(..., safe_serialization=True))")
        raise LorapipeError(f"{folder}: no *.safetensors weights in {what}")
    if tokenizer:
        if not any((folder / name).is_file() for name in VOCAB_FILES):
            raise LorapipeError(f"{folder}: no tokenizer ({' or '.join(VOCAB_FILES)}) in {what}")
        if not (folder / "tokenizer_config.json").is_file():
            raise LorapipeError(f"{folder}/tokenizer_config.json: missing in {what}")
    return folder


def check_adapter(folder: str | Path) -> Path:
    """A peft save_pretrained folder with safetensors weights (pickle adapter_model.bin is refused)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise LorapipeError(f"{folder}/adapter_config.json: missing; not a peft adapter folder (run `lorapipe train`)")
    if not (folder / "adapter_model.safetensors").is_file():
        if (folder / "adapter_model.bin").is_file():
            raise LorapipeError(
                f"{folder}/adapter_model.bin: pickle adapter refused (it can run arbitrary code when loaded); "
                "save the adapter with safetensors (peft's save_pretrained default)")
        raise LorapipeError(f"{folder}/adapter_model.safetensors: missing")
    return folder


# ------------------------------------------------------------------------------ dtypes
# merge.dtype values: the torch dtypes the base is loaded (and the merged model saved) in.
DTYPES = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------ GGUF outtype
# export.outtype values: the converter's unquantized types, and `auto` = per family (below).
OUTTYPES = ("auto", "f16", "bf16", "q8_0", "f32")
# Families whose activations overflow float16 at larger sizes (Gemma-3: transformers issue 36822;
# upstream ships them in bf16): `auto` converts these to bf16, everything else to f16. ggml casts
# a matmul's activations to the weights' type, so f16 weights mean f16 activations (max 65504).
BF16_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")
# export.quant: a llama-quantize type, or this: try export.quant_candidates in order and keep the
# first file that passes every gate (stage quantize).
QUANT_AUTO = "auto"


def resolve_outtype(outtype: str, model_dir: str | Path) -> str:
    """The converter's --outtype for export.outtype (docs/toolchain.md#fp16-overflow)."""
    if outtype not in OUTTYPES:
        raise LorapipeError(f"export.outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if outtype != "auto":
        return outtype
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return "bf16" if config.get("model_type") in BF16_FAMILIES else "f16"


# ---------------------------------------------------------------------------------- remote code
TRUST_KEY = "model.trust_remote_code"  # the one switch that lets any stage or command run a model's own code
CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # files whose `auto_map` names the code to run


def own_code(folder: str | Path) -> list[str]:
    """What in `folder` would make transformers run the model's own code: `auto_map` entries in its
    configs and *.py files beside them. Empty for a plain folder."""
    folder = Path(folder)
    found = sorted(p.name for p in folder.glob("*.py"))
    for name in CODE_CONFIGS:
        path = folder / name
        if path.is_file():
            auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map")
            if auto_map:
                found.append(f"{name} auto_map ({', '.join(sorted(auto_map))})")
    return found


def check_trust(folder: str | Path, trust_remote_code: bool) -> bool:
    """Refuse a folder that carries its own code unless the user opted in; return the flag to pass
    to transformers. Checked before transformers reads the folder, whatever transformers would do."""
    code = own_code(folder)
    if code and not trust_remote_code:
        raise LorapipeError(
            f"{folder}: the model carries its own code ({'; '.join(code)}), which lorapipe runs only when "
            f"{TRUST_KEY}: true is set in params.yaml. Set it only if you trust that code.")
    return bool(trust_remote_code)


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=check_trust(folder, trust_remote_code))


def load_causal_lm(folder: str | Path, trust_remote_code: bool = False, **kwargs):
    """AutoModelForCausalLM from a local folder (safetensors only), remote code only when trusted."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=check_trust(folder, trust_remote_code),
                                                use_safetensors=True, **kwargs)


def restore_added_tokens_decoder(folder: str | Path) -> int:
    """Write `added_tokens_decoder` (from tokenizer.json's added tokens) into tokenizer_config.json
    when it is missing; return how many entries it has. The field is what the converter reads to
    mark special tokens CONTROL."""
    folder = Path(folder)
    config_path, tok_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not tok_path.is_file() or not config_path.is_file():
        return 0
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("added_tokens_decoder"):
        return len(config["added_tokens_decoder"])
    added = json.loads(tok_path.read_text(encoding="utf-8")).get("added_tokens", [])
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special") if k in t}
        for t in sorted(added, key=lambda t: t["id"])
    }
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(added)


def end_of_turn_token(chat_template: str | None, vocab: dict[str, int]) -> str | None:
    """The token that closes an assistant turn in this template, if it is one we know
    (templates.END_OF_TURN_TOKENS) and in vocab: the one the template writes first."""
    if not chat_template:
        return None
    used = [t for t in END_OF_TURN_TOKENS if t in chat_template and t in vocab]
    return min(used, key=chat_template.index) if used else None


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the template's end-of-turn token: generation must stop on either."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eot = end_of_turn_token(tokenizer.chat_template, tokenizer.get_vocab())
    if eot is not None:
        ids.append(int(tokenizer.convert_tokens_to_ids(eot)))
    return sorted(set(ids), key=ids.index)
