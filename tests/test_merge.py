"""Stage `merge`: real peft adapters on tiny random-weight models, merged with the stage's code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorapipe.core.errors import LorapipeError
from lorapipe.stages.merge import merge


@pytest.fixture(scope="module")
def merged_llama(tiny_adapter, tmp_path_factory):
    base, adapter = tiny_adapter("llama")
    out = tmp_path_factory.mktemp("merged") / "merged"
    result = merge(base, adapter, out, "float32")
    return base, adapter, out, result


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_merged_logits_equal_base_plus_adapter(merged_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, out, _ = merged_llama
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok.apply_chat_template([{"role": "user", "content": "I feel lonely since I moved."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    plain = _logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids)
    with_adapter = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval(), ids)
    merged = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)

    assert (with_adapter - plain).abs().max() > 1e-2, "the adapter must change the model, or the test proves nothing"
    assert (merged - with_adapter).abs().max() < 1e-4


def test_merged_folder_chats_as_is(merged_llama):
    from transformers import AutoTokenizer, GenerationConfig

    base, _, out, result = merged_llama
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    assert (out / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()

    tok = AutoTokenizer.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = GenerationConfig.from_pretrained(out)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert im_end in eos and result["stop_ids"] == eos

    # the converter reads special-token types from added_tokens_decoder (transformers 5 drops it)
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder[str(im_end)]["content"] == "<|im_end|>" and decoder[str(im_end)]["special"] is True
    # no partial folder left beside the output
    assert not list(out.parent.glob(".merged.*"))


def test_merge_in_bfloat16(tiny_adapter, tmp_path):
    from safetensors import safe_open

    base, adapter = tiny_adapter("llama")
    merge(base, adapter, tmp_path / "merged", "bfloat16")
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}


def test_pickle_checkpoints_are_refused(tiny_adapter, tmp_path):
    base, adapter = tiny_adapter("llama")
    bad_adapter = tmp_path / "adapter"
    shutil.copytree(adapter, bad_adapter)
    (bad_adapter / "adapter_model.safetensors").rename(bad_adapter / "adapter_model.bin")
    with pytest.raises(LorapipeError, match=r"adapter_model\.bin: pickle adapter refused"):
        merge(base, bad_adapter, tmp_path / "out")

    bad_base = tmp_path / "base"
    shutil.copytree(base, bad_base)
    (bad_base / "model.safetensors").rename(bad_base / "pytorch_model.bin")
    with pytest.raises(LorapipeError, match=r"pytorch_model\.bin: pickle checkpoint refused"):
        merge(bad_base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_inputs_are_clear_errors(tiny_adapter, tmp_path):
    base, adapter = tiny_adapter("llama")
    with pytest.raises(LorapipeError, match=r"adapter_config\.json: missing"):
        merge(base, tmp_path, tmp_path / "out")
    no_config = tmp_path / "base"
    shutil.copytree(base, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(LorapipeError, match=r"config\.json: missing"):
        merge(no_config, adapter, tmp_path / "out")
    with pytest.raises(LorapipeError, match="merge.dtype"):
        merge(base, adapter, tmp_path / "out", "int4")
