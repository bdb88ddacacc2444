"""Quantization must not silently erase the fine-tune.

The case from real checkpoints (docs/toolchain.md#requantize): a base model taken from a quantized GGUF has
dequantized weights sitting exactly on that file's grid; a LoRA update smaller than half a step is
rounded away when the merged model is quantized to the same type again, and the "fine-tuned" file
predicts like the base. Shrunk here to a tiny Llama (hidden 256, so real Q4_K blocks apply) with an
untied output head wide enough that its predictions are not flat, as a trained model's: the base comes from
its own Q4_K_M file through stage base, a small random LoRA update is merged, and stage evaluate's
gate must fail on Q4_K_M naming the cause, and pass Q8_0, which keeps the update.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from conftest import build_lora_adapter, build_tiny_model, write_jsonl
from lorapipe import params as params_mod
from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from test_evaluate import eval_rows

EVAL = {"threads": 1, "ctx": 64, "max_chunks": 4, "max_new_tokens": 4, "speed_prompt_tokens": 8, "speed_gen_tokens": 4,
        "prompts": ["I feel lonely."], "max_ppl_delta_pct": 100.0}


@pytest.fixture(scope="module")
def finetuned_from_a_q4_file(tmp_path_factory, smollm2_tokenizer_dir):
    """A repository-shaped folder: models/base from a Q4_K_M GGUF, a merged small LoRA update, its F16 GGUF."""
    import torch
    from safetensors.torch import load_file, save_file

    from lorapipe.stages import base, convert, merge, quantize

    root = tmp_path_factory.mktemp("finetune-kept")
    original = build_tiny_model("llama", smollm2_tokenizer_dir, root / "original", hidden_size=256)
    weights = load_file(original / "model.safetensors")
    # an untied head with logits of std ~2.4: a tied one would make every token predict itself
    head = torch.randn(weights["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(3)) * 0.15
    save_file({**weights, "lm_head.weight": head}, original / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((original / "config.json").read_text())
    (original / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    convert.convert(original, root / "original-f16.gguf", "f16")
    quantize.quantize_file(root / "original-f16.gguf", root / "downloaded-q4_k_m.gguf", "Q4_K_M")

    with contextlib.chdir(root):
        base.run(params_mod.parse({"model": {"source": str(root / "downloaded-q4_k_m.gguf"), "preset": "smollm2-135m-instruct"}}))
        # ~0.001 per weight: under half a Q4_K step (~0.004 here), as a short real fine-tune's update
        adapter = build_lora_adapter(paths.BASE_DIR, root / "adapter", rank=4, std=0.005)
        merge.merge(paths.BASE_DIR, adapter, paths.MERGED_DIR)
        convert.convert(paths.MERGED_DIR, paths.gguf_path("f16"), "f16")
        write_jsonl(paths.EVAL_JSONL, eval_rows(24))
    return root


def evaluate_with(root, quant: str):
    from lorapipe.stages import evaluate, quantize

    with contextlib.chdir(root):
        quantize.quantize_file(paths.gguf_path("f16"), paths.QUANT_GGUF, quant.upper())
        return evaluate.evaluate(params_mod.EvaluateParams(**EVAL), eval_jsonl=paths.EVAL_JSONL, base_dir=paths.BASE_DIR,
                                 merged_dir=paths.MERGED_DIR, ref_gguf=paths.gguf_path("f16"),
                                 quant_gguf=paths.QUANT_GGUF).metrics


def test_requantizing_to_the_base_files_type_is_caught_and_explained(finetuned_from_a_q4_file):
    """Stage evaluate as `dvc repro` runs it: the gate fails naming the cause, and the stage writes none
    of its outputs (a failed gate must not leave metrics that look like a finished run)."""
    from lorapipe.stages import evaluate, quantize

    root = finetuned_from_a_q4_file
    outputs = [root / evaluate.METRICS, root / evaluate.PLOT, root / evaluate.SAMPLES]
    for path in outputs:
        path.unlink(missing_ok=True)
    with contextlib.chdir(root):
        quantize.quantize_file(paths.gguf_path("f16"), paths.QUANT_GGUF, "Q4_K_M")
        p = params_mod.parse({"model": {"preset": "smollm2-135m-instruct"}, "evaluate": EVAL, "export": {"outtype": "f16"}})
        with pytest.raises(LorapipeError) as err:
            evaluate.run(p)
    message = str(err.value)
    assert "model-quant.gguf (Q4_K_M): the quantized model lost the fine-tune: it kept" in message
    assert "came from a quantized GGUF" in message and "q6_k or q8_0 to export.quant_candidates" in message
    assert [path for path in outputs if path.exists()] == []


def test_auto_skips_the_type_that_lost_the_fine_tune(finetuned_from_a_q4_file):
    """Stage quantize with export.quant: auto and its default candidates on the same files: Q4_K_M is
    tried, fails the finetune_kept gate, and a finer type that keeps the fine-tune is kept instead."""
    from lorapipe.stages import quantize

    with contextlib.chdir(finetuned_from_a_q4_file):
        p = params_mod.parse({"model": {"preset": "smollm2-135m-instruct"}, "evaluate": EVAL,
                              "export": {"outtype": "f16", "imatrix": False, "threads": 1,
                                         # a random model: its argmax flips are not what this test is about
                                         "parity": {"min_argmax_agreement_quant": 0.0, "max_new_tokens": 4,
                                                    "max_abs_logit_diff": 1.0, "min_argmax_agreement": 0.0}}})
        assert p.export.quant == "auto"
        summary = quantize.run(p)
        metrics = json.loads(quantize.METRICS.read_text())
        plot = json.loads(quantize.PLOT.read_text())
    rows = metrics["candidates"]
    assert rows[0]["type"] == "Q4_K_M" and not rows[0]["passed"] and rows[0]["finetune_kept"] < 0.5
    assert any("lost the fine-tune" in f for f in rows[0]["failures"])
    assert metrics["quant"] == summary["quant"] == rows[-1]["type"] != "Q4_K_M" and rows[-1]["passed"]
    assert rows[-1]["finetune_kept"] >= 0.5 and rows[-1]["size_mb"] > rows[0]["size_mb"]
    assert [(r["type"], r["finetune_kept"]) for r in plot] == [(r["type"], r["finetune_kept"]) for r in rows]


def test_a_finer_type_keeps_the_fine_tune(finetuned_from_a_q4_file):
    metrics = evaluate_with(finetuned_from_a_q4_file, "q8_0")
    assert metrics["finetune_kept"] > 0.9, json.dumps(metrics, indent=1)
    assert metrics["kld_assistant_quant_vs_merged"] < metrics["kld_assistant_hf_base_vs_merged"]
