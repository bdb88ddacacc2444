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

from conftest import REPO_ROOT, git
from lorapipe import cli
from lorapipe.core import templates
from lorapipe.params import ChatParams
from lorapipe.stages.package import default_system, flatten, modelfile, template_family

RUN = REPO_ROOT / "tests" / "fixtures" / "run"  # a real run's dvc.lock, metrics and params (its README)


def read_run() -> tuple[dict, dict]:
    """(dvc.lock, {file name: metrics}) of the fixture run, parsed here, apart from the stage's readers."""
    metrics = {p.name: json.loads(p.read_text()) for p in sorted((RUN / "metrics").glob("*.json"))}
    return yaml.safe_load((RUN / "dvc.lock").read_text()), metrics


@pytest.fixture(scope="module")
def packaged_source(tiny_gguf, tmp_path_factory):
    """A checkout with what package reads (a real Q4_K_M from llama-quantize; the dvc.lock, metrics and
    params.yaml of a real `dvc repro`), committed to git, then `lorapipe package` run in it.
    Tests that change it work on their own copy (the `packaged` fixture)."""
    _, quantized = tiny_gguf("scripted", quant="Q4_K_M")
    root = tmp_path_factory.mktemp("package-repo")
    (root / "models" / "gguf").mkdir(parents=True)
    shutil.copy(quantized, root / "models/gguf/model-quant.gguf")
    shutil.copytree(RUN / "metrics", root / "metrics")
    for name in ("params.yaml", "dvc.lock"):
        shutil.copy(RUN / name, root / name)
    git("init", "-q", cwd=root)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "pipeline", cwd=root)
    with contextlib.chdir(root):
        assert cli.main(["package"]) == 0
    return root


@pytest.fixture
def packaged(packaged_source, tmp_path):
    """A copy of the packaged checkout (its .git included) for this test alone."""
    root = tmp_path / "package-repo"
    shutil.copytree(packaged_source, root, symlinks=True)
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
    """Every figure the card shows is checked against the real dvc.lock and metrics it was built from."""
    lock, metrics = read_run()
    card = (packaged / "models/README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card
    stages = lock["stages"]
    declared = stages["ingest"]["params"]["params.yaml"]["data.sources"]
    counts = metrics["data.json"]["sources"]
    assert {s["name"] for s in declared} == set(counts)
    for source in declared:
        c = counts[source["name"]]
        assert f"| {source['name']} | {source['type']} | {c['read']} | {c['kept']} | {c['rejected']} |" in card
    recorded = stages["train"]["params"]["params.yaml"]
    for section in ("lora", "train"):  # as dvc.lock recorded them
        for key, value in recorded[section].items():
            shown = "`null`" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
            assert f"| {section}.{key} | {shown} |" in card, (section, key)
    for name, obj in metrics.items():  # every metric, flattened (quantize's candidates as their own table)
        assert f"### metrics/{name}" in card
        for key, _ in flatten({k: v for k, v in obj.items() if k != "candidates"}):
            assert f"| {key} |" in card, key
    quant = metrics["quantize.json"]
    assert "quantized to **Q4_K_M**" in card and "| export.quant | auto |" in card
    assert f"## Quantization\n\n{quant['choice']}\n" in card
    for c in quant["candidates"]:
        row = (f"| {c['type']} | {c['size_mb']:.1f} | {c['bits_per_weight']:.2f} | {c['argmax_agreement']:.3f} | "
               f"{c['ppl_delta_pct']:+.2f} | {c['finetune_kept']:.3f} | {'yes' if c['passed'] else 'no'} |")
        assert row in card, row
    ev = metrics["eval.json"]  # evaluate's answers: a row per variant
    assert f"Greedy answers to {ev['answers_rows']} eval prompts" in card
    for variant, label in (("hf_base", "base (HF)"), ("hf_merged", "merged (HF)"), ("quant", "quantized (GGUF)")):
        row = (f"| {label} | {ev[f'answers_bleu4_{variant}']:.2f} | {ev[f'answers_rouge1_{variant}']:.2f} | "
               f"{ev[f'answers_rouge2_{variant}']:.2f} | {ev[f'answers_rougel_{variant}']:.2f} | "
               f"{ev[f'answers_distinct2_{variant}']:.3f} | {ev[f'answers_len_{variant}']:.1f} | ")
        assert row in card, row
    head = git("rev-parse", "HEAD", cwd=packaged).strip()
    assert f"git commit: `{head}`" in card and "uncommitted" not in card
    outs = [(stage, out) for stage, entry in stages.items() if stage != "package" for out in entry.get("outs") or []]
    assert outs
    for stage, out in outs:
        assert f"| {stage} | {out['path']} | {out['md5']} | {out['size']} |" in card, out["path"]
    for usage in ("lorapipe chat", "lorapipe serve", "/v1/chat/completions", "ollama create", "ollama run"):
        assert usage in card


def test_card_notes_uncommitted_changes(packaged):
    (packaged / "dvc.lock").write_text((packaged / "dvc.lock").read_text() + "\n")  # rewritten by every repro
    eval_json = packaged / "metrics" / "eval.json"
    eval_json.write_text(json.dumps({**json.loads(eval_json.read_text()), "ppl_quant": 13.3}))
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
    shutil.copy(RUN / "params.yaml", tmp_path / "params.yaml")
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


@pytest.mark.skipif(shutil.which("go") is None, reason="no `go` on PATH: needs a Go toolchain to run Ollama's template "
                    "engine (text/template); `make setup-browser` (run by `make test`) installs Debian's golang-go as root")
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
