"""Stage `package`: Ollama Modelfile + model card from a real quantized GGUF, metrics, dvc.lock and git."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO_ROOT
from lorapipe import cli
from lorapipe.core import templates
from lorapipe.params import ChatParams
from lorapipe.stages.package import default_system, flatten, modelfile, template_family

GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
METRICS = {
    "data.json": {"read": 12, "kept": 10, "rejected": 2, "train": 9, "eval": 1, "dropped": {"duplicate": 2},
                  "sources": {"support": {"read": 8, "kept": 7, "rejected": 1},
                              "chatterbot": {"read": 4, "kept": 3, "rejected": 1}}},
    "train.json": {"train_loss": 2.5, "eval_loss": 2.4, "eval_loss_base": 2.9, "tokens_per_s": 812.5},
    "quantize.json": {"quant": "Q4_K_M", "choice": "auto: Q4_K_M, the first of export.quant_candidates (Q4_K_M, Q8_0), passes every gate",
                      "size_ratio": 0.31, "tensor_types": {"Q4_K": 10, "Q6_K": 2},
                      "candidates": [{"type": "Q4_K_M", "size_mb": 0.8, "bits_per_weight": 5.1, "argmax_agreement": 0.91,
                                      "ppl_delta_pct": 1.5, "kld": 0.01, "kld_assistant_vs_merged": 0.02,
                                      "finetune_kept": 0.874, "passed": True, "failures": []}]},
    "eval.json": {"ppl_f16": 13.2, "ppl_quant": 13.6, "ppl_delta_pct": 3.0},
}


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def packaged(tiny_gguf, tmp_path_factory):
    """A checkout with what package reads (a real Q4_K_M from llama-quantize, metrics, dvc.lock),
    committed to git, then `lorapipe package` run in it."""
    _, quantized = tiny_gguf("scripted", quant="Q4_K_M")
    root = tmp_path_factory.mktemp("package-repo")
    (root / "models" / "gguf").mkdir(parents=True)
    shutil.copy(quantized, root / "models/gguf/model-quant.gguf")
    (root / "metrics").mkdir()
    for name, obj in METRICS.items():
        (root / "metrics" / name).write_text(json.dumps(obj))
    shutil.copy(REPO_ROOT / "params.yaml", root / "params.yaml")
    lock = {"schema": "2.0", "stages": {
        "base": {"cmd": "lorapipe base", "params": {"params.yaml": {"model": {"source": "embedded", "preset": "smollm2-135m-instruct"}}},
                 "outs": [{"path": "models/base", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir", "size": 1000}]},
        "ingest": {"cmd": "lorapipe ingest", "params": {"params.yaml": {"data.sources": [
            {"name": "support", "type": "sharegpt", "path": "data/sources/support.jsonl"},
            {"name": "chatterbot", "type": "chatterbot"}]}}, "outs": []},
        "train": {"cmd": "lorapipe train", "params": {"params.yaml": {"lora": {"rank": 4, "alpha": 8, "dropout": 0.05, "target": "all"},
                                                                      "train": {"lr": 0.0003, "max_steps": 4}}},
                  "outs": [{"path": "models/adapter", "md5": "fedcba9876543210fedcba9876543210.dir", "size": 200}]},
        "quantize": {"cmd": "lorapipe quantize", "outs": [
            {"path": "models/gguf/model-quant.gguf", "md5": "aaaabbbbccccddddeeeeffff00001111", "size": 123}]},
    }}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "pipeline", cwd=root)
    with contextlib.chdir(root):
        assert cli.main(["package"]) == 0
    return root


def test_modelfile_for_ollama(packaged):
    text = (packaged / "models/gguf/Modelfile").read_text()
    assert "\nFROM ./model-quant.gguf\n" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert "<|im_start|>{{ .Role }}" not in template  # roles are spelt out per branch
    for marker in ("<|im_start|>system", "<|im_start|>user", "<|im_start|>assistant", "<|im_end|>", ".System", ".Messages"):
        assert marker in template
    # SmolLM2's template inserts a default system prompt: Ollama gets it as SYSTEM
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    chat = ChatParams()
    for line in (f"temperature {chat.temperature:g}", f"top_p {chat.top_p:g}", f"repeat_penalty {chat.repetition_penalty:g}",
                 f"num_predict {chat.max_new_tokens}", "num_ctx 4096"):
        assert f"PARAMETER {line}\n" in text


def test_model_card_has_provenance_data_params_metrics_and_usage(packaged):
    card = (packaged / "models/README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| support | sharegpt | 8 | 7 | 1 |" in card and "| chatterbot | chatterbot | 4 | 3 | 1 |" in card
    assert "| lora.rank | 4 |" in card and "| train.lr | 0.0003 |" in card  # as dvc.lock recorded them
    for name, obj in METRICS.items():  # every metric, flattened (quantize's candidates as their own table)
        assert f"### metrics/{name}" in card
        for key, _ in flatten({k: v for k, v in obj.items() if k != "candidates"}):
            assert f"| {key} |" in card, key
    assert "quantized to **Q4_K_M**" in card and "| export.quant | auto |" in card
    assert "## Quantization\n\nauto: Q4_K_M, the first of export.quant_candidates" in card
    assert "| Q4_K_M | 0.8 | 5.10 | 0.910 | +1.50 | 0.874 | yes |" in card
    head = git("rev-parse", "HEAD", cwd=packaged).strip()
    assert f"git commit: `{head}`" in card and "uncommitted" not in card
    assert "fedcba9876543210fedcba9876543210.dir" in card and "aaaabbbbccccddddeeeeffff00001111" in card
    for usage in ("lorapipe chat", "lorapipe serve", "/v1/chat/completions", "ollama create", "ollama run"):
        assert usage in card


def test_card_notes_uncommitted_changes(packaged):
    (packaged / "dvc.lock").write_text((packaged / "dvc.lock").read_text() + "\n")  # rewritten by every repro
    (packaged / "metrics" / "eval.json").write_text(json.dumps({**METRICS["eval.json"], "ppl_f16": 13.3}))
    (packaged / "params.yaml").write_text((packaged / "params.yaml").read_text() + "\n# edited\n")
    with contextlib.chdir(packaged):
        assert cli.main(["package"]) == 0
    card = (packaged / "models/README.md").read_text()
    assert "(with uncommitted changes: `params.yaml`)" in card  # the pipeline's own outputs are not counted


def test_gemma_and_qwen_templates_translate():
    chat = ChatParams()
    gemma = modelfile("model-q4_k_m.gguf", templates.GEMMA, chat, 2048, "x")
    assert template_family(templates.GEMMA) == "gemma"
    assert "<start_of_turn>model" in gemma and 'PARAMETER stop "<end_of_turn>"' in gemma
    assert "\nSYSTEM" not in gemma  # Gemma has no default system prompt; a system text joins the first user turn
    assert '{{ $prefix = printf "%s\\n\\n" .System }}' in gemma
    assert default_system(templates.QWEN, "chatml") == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    custom = modelfile("m.gguf", templates.QWEN, ChatParams(system="Be gentle."), 2048, "x")
    assert 'SYSTEM """Be gentle."""' in custom  # chat.system wins over the template's default


def test_untranslatable_template_or_missing_gguf_is_a_clear_error(tmp_path, monkeypatch, capsys):
    llama3 = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"
    with pytest.raises(Exception, match="neither ChatML"):
        template_family(llama3)
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    assert cli.main(["package"]) == 2
    assert "models/gguf/model-quant.gguf: quantized GGUF not found" in capsys.readouterr().err
    assert not (tmp_path / "models" / "README.md").exists()


CONVERSATIONS = [
    [{"role": "user", "content": "I feel lonely."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I feel lonely."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "Sad."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "最近压力很大。"}],
]


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain to run Ollama's template engine (text/template)")
@pytest.mark.parametrize("name", ["chatml", "qwen", "gemma"])
def test_go_template_renders_exactly_like_the_jinja_template(name, tmp_path):
    """The Modelfile TEMPLATE + SYSTEM, run through Go's text/template as Ollama feeds it
    (tests/fixtures/ollama/render.go), gives byte for byte the prompt the Jinja template gives
    (BOS aside: llama.cpp adds it for Gemma)."""
    from lorapipe.stages.package import render

    jinja = templates.TEMPLATES[name]
    text = modelfile("m.gguf", jinja, ChatParams(), 2048, "x")
    go_template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S)
    renderer = tmp_path / "render"
    subprocess.run(["go", "build", "-o", str(renderer), str(REPO_ROOT / "tests/fixtures/ollama/render.go")],
                   check=True, capture_output=True, env=dict(os.environ, GOCACHE=str(tmp_path / "gocache")))
    for conv in CONVERSATIONS:
        # Ollama puts the Modelfile SYSTEM in front when the request has no system message
        sent = conv if conv[0]["role"] == "system" or not system else [{"role": "system", "content": system.group(1)}, *conv]
        got = subprocess.run([str(renderer)], input=json.dumps({"template": go_template, "messages": sent}),
                             capture_output=True, text=True, check=True).stdout
        assert got == render(jinja, conv), conv
