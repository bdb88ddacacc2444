"""Stage `merge`: models/base/ + models/adapter/ -> models/merged/ (a plain HF folder that chats as is).

The base is always loaded unquantized in `merge.dtype` (float32/float16/bfloat16), even when the
adapter was trained with QLoRA: folding LoRA deltas into 4-bit weights would round them away, so
after QLoRA the full-precision base is reloaded and the adapter merged into that (peft's
merge_and_unload does the arithmetic; we only choose what it merges into).

The merged folder gets the base's tokenizer, chat template and a generation_config whose
eos_token_id lists EOS and the template's end-of-turn token, plus the two fixes the GGUF converter
needs (core/hfmodel.py): `added_tokens_decoder` in tokenizer_config.json and the base's
tokenizer.model where it had one (tokenizer files are copied from the base, never re-saved).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorapipe.core import hfmodel, paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path
from lorapipe.core.log import Activity, info



def merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32", *,
          trust_remote_code: bool = False) -> dict:
    import torch
    from peft import PeftModel
    from transformers import GenerationConfig

    if dtype not in hfmodel.DTYPES:
        raise LorapipeError(f"merge.dtype: {dtype!r} is not one of {', '.join(hfmodel.DTYPES)}")
    base_dir, adapter_dir = hfmodel.check_folder(base_dir, "the base model"), hfmodel.check_adapter(adapter_dir)

    info(f"merge: loading {base_dir} ({dtype}) and adapter {adapter_dir}")
    # No quantization_config here, ever: the merge target is full precision (see module doc).
    with Activity("merge: loading and merging"):
        model = hfmodel.load_causal_lm(base_dir, trust_remote_code, dtype=getattr(torch, dtype))
        try:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise LorapipeError(f"{adapter_dir}: adapter does not fit the base model {base_dir}: {exc}") from None
        merged = model.merge_and_unload()
    tokenizer = hfmodel.load_tokenizer(base_dir, trust_remote_code)

    generation = GenerationConfig.from_pretrained(base_dir) if (base_dir / "generation_config.json").is_file() else GenerationConfig()
    stops = hfmodel.stop_token_ids(tokenizer)
    if stops:
        generation.eos_token_id = stops if len(stops) > 1 else stops[0]
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    merged.generation_config = generation

    with atomic_path(out_dir, is_dir=True) as tmp:
        with Activity("merge: saving safetensors"):
            merged.save_pretrained(tmp, safe_serialization=True)
        # Tokenizer files are copied byte for byte, not re-saved: transformers 5 re-saves a tokenizer
        # under the class the *model type* maps to (a qwen2 folder gets Qwen2Tokenizer, which swaps
        # in Qwen's pre-tokenizer regex, so the converter no longer recognises the tokenizer) and
        # drops tokenizer.model. The merged model must tokenize exactly as the base did.
        for name in hfmodel.TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, tmp / name)
        if trust_remote_code:  # the merged model is the same architecture: it needs the same code
            for code in base_dir.glob("*.py"):
                shutil.copyfile(code, tmp / code.name)
        n_added = hfmodel.restore_added_tokens_decoder(tmp)
        size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    return {
        "dtype": dtype,
        "params": sum(p.numel() for p in merged.parameters()),
        "size_bytes": size,
        "stop_ids": stops,
        "added_tokens": n_added,
    }


def run(params) -> dict:
    return merge(paths.BASE_DIR, paths.ADAPTER_DIR, paths.MERGED_DIR, params.merge.dtype,
                 trust_remote_code=params.model.trust_remote_code)
