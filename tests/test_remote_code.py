"""No stage or command runs a model's own code unless `model.trust_remote_code: true`.

The model folder here is a real tiny Llama whose config.json names its own modeling file in
`auto_map` (as a hub checkpoint can); that file writes a marker when Python imports it. With the
flag off the marker must never appear, whichever stage or command reads the folder; with the flag
on, transformers imports the file (so the marker is a real witness, not a test that cannot fail).
"""

from __future__ import annotations

import json
import shutil

import pytest

from lorapipe import params as params_mod
from lorapipe.core import hfmodel, paths
from lorapipe.core.errors import LorapipeError

EVIL = """
import os, pathlib
pathlib.Path(os.environ["LORAPIPE_TEST_MARKER"]).write_text("the model's own code ran")
from transformers import LlamaForCausalLM


class EvilForCausalLM(LlamaForCausalLM):
    pass
"""
REFUSED = r"carries its own code \(modeling_evil.py; config.json auto_map \(AutoModelForCausalLM\)\).*model.trust_remote_code: true"


@pytest.fixture
def evil(tmp_path, tiny_model, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("LORAPIPE_TEST_MARKER", str(marker))
    folder = tmp_path / "evil"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(EVIL)
    return folder, marker


def test_the_marker_is_a_real_witness(evil):
    folder, marker = evil
    hfmodel.load_causal_lm(folder, trust_remote_code=True)
    assert marker.is_file()


def test_base_leaves_the_code_behind_without_the_flag(evil, tmp_path, monkeypatch):
    from lorapipe.stages import base

    folder, marker = evil
    monkeypatch.chdir(tmp_path)
    base.run(params_mod.parse({"model": {"source": str(folder), "preset": None, "trust_remote_code": False}}))
    out = tmp_path / paths.BASE_DIR
    assert not list(out.glob("*.py"))
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    hfmodel.load_causal_lm(out)  # a plain folder now: transformers' own Llama class
    assert not marker.exists()


def test_every_stage_and_command_refuses_the_code_without_the_flag(evil, tiny_adapter, tmp_path, monkeypatch):
    from lorapipe.chat import HFBackend
    from lorapipe.core import parity
    from lorapipe.params import ParityParams
    from lorapipe.stages import convert, evaluate, merge, train

    folder, marker = evil
    _, adapter = tiny_adapter("llama")
    monkeypatch.chdir(tmp_path)
    for split in (paths.TRAIN_JSONL, paths.EVAL_JSONL):
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"}]}) + "\n")
    conversation = [[{"role": "user", "content": "hi"}]]
    attempts = {
        "train": lambda: train.run(params_mod.parse({"train": {"max_steps": 1}}), base_dir=folder),
        "merge": lambda: merge.merge(folder, adapter, tmp_path / "merged"),
        "convert": lambda: convert.convert(folder, tmp_path / "model.gguf", "f16"),
        "quantize (parity gate)": lambda: parity.check_f16(folder, tmp_path / "model.gguf", conversation, ParityParams()),
        "evaluate": lambda: evaluate.load_hf(folder, trust_remote_code=False),
        "chat --backend hf": lambda: HFBackend(folder, trust_remote_code=False),
        "tokenizer": lambda: hfmodel.load_tokenizer(folder),
    }
    for what, attempt in attempts.items():
        with pytest.raises(LorapipeError, match=REFUSED):
            attempt()
        assert not marker.exists(), f"{what} ran the model's own code"
    assert not (tmp_path / "merged").exists() and not (tmp_path / "model.gguf").exists()
