"""export.outtype auto: bf16 for the families whose activations overflow float16 (Gemma-3, upstream
transformers issue 36822), f16 for the rest. Shown on a tiny Gemma-3 whose first layer's input norm
lifts its activations past float16's 65504: ggml casts a matmul's activations to its weights' type,
so the F16 file computes inf/NaN where HF (float32) does not; the bf16 file matches HF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import build_tiny_model
from lorapipe.core import gguf_meta, hfmodel, parity
from lorapipe.core.errors import LorapipeError
from lorapipe.params import ParityParams
from lorapipe.stages import convert
from test_export import EVAL_ROWS

PARITY = ParityParams(n_prompts=2, max_new_tokens=4)


@pytest.fixture(scope="module")
def hot_gemma3(tmp_path_factory, smollm2_tokenizer_dir):
    import torch
    from safetensors.torch import load_file, save_file

    folder = build_tiny_model("gemma3", smollm2_tokenizer_dir, tmp_path_factory.mktemp("hot-gemma3"))
    weights = load_file(folder / "model.safetensors")
    # Gemma's RMSNorm scales by (1 + weight): the q/k/v projections of layer 0 see values ~1e5
    weights["model.layers.0.input_layernorm.weight"] = torch.full_like(weights["model.layers.0.input_layernorm.weight"], 1e5)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_auto_is_bf16_for_gemma_and_f16_for_the_rest(hot_gemma3, tiny_model):
    assert hfmodel.resolve_outtype("auto", hot_gemma3) == "bf16"
    assert hfmodel.resolve_outtype("auto", tiny_model("qwen2")) == "f16"
    assert hfmodel.resolve_outtype("q8_0", hot_gemma3) == "q8_0"
    with pytest.raises(LorapipeError, match="export.outtype: 'fp16' is not one of auto, f16, bf16, q8_0, f32"):
        hfmodel.resolve_outtype("fp16", hot_gemma3)


def test_f16_overflows_where_auto_bf16_matches_hf(hot_gemma3, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hot_gemma3, dtype=torch.float32)
    hidden = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    assert all(torch.isfinite(h).all() for h in hidden)  # HF float32 is fine

    conversations = parity.eval_conversations(EVAL_ROWS, PARITY.n_prompts)
    f16 = tmp_path / "model-f16.gguf"
    convert.convert(hot_gemma3, f16, "f16")
    report, _ = parity.check_f16(hot_gemma3, f16, conversations, PARITY)
    assert not np.isfinite(report.figures["f16_max_abs_logit_diff"])
    assert any("overflow float16" in f and "export.outtype: auto or bf16" in f for f in report.failures), report.failures

    auto = tmp_path / "model-auto.gguf"
    result = convert.convert(hot_gemma3, auto, "auto")
    assert result["outtype"] == "bf16" and "BF16" in gguf_meta.tensor_types(auto)
    report, _ = parity.check_f16(hot_gemma3, auto, conversations, PARITY)
    print("\nbf16 figures:", json.dumps({k: report.figures[k] for k in ("f16_max_abs_logit_diff", "f16_argmax_agreement")}))
    assert report.failures == [], report.failures
