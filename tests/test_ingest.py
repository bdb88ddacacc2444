"""Stage ingest: params.data.sources -> data/raw/<name>.jsonl, atomically, nothing else in data/raw."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from lorapipe import cli
from lorapipe.core.errors import LorapipeError
from lorapipe.params import ParamsError, load, parse
from lorapipe.stages import ingest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "sources"
ROW_KEYS = {"messages", "source", "origin"}
QUARANTINE_KEYS = {"source", "origin", "error", "raw"}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    shutil.copytree(REPO / "data" / "sources", tmp_path / "data" / "sources")
    shutil.copytree(FIXTURES, tmp_path / "fixtures")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def params_with(*sources: dict):
    return parse({"data": {"sources": list(sources)}})


def test_writes_one_file_per_source_and_removes_stale_ones(workdir):
    (workdir / "data" / "raw").mkdir(parents=True)
    (workdir / "data" / "raw" / "old_source.jsonl").write_text("{}\n", encoding="utf-8")
    bad = workdir / "bad.jsonl"
    bad.write_bytes(b'{"messages": []}\n[1]\n{"messages": [{"role": "user", "content": "x\n\xff\n')
    summary = ingest.run(params_with(
        {"name": "support", "type": "sharegpt", "path": "data/sources/support.jsonl"},
        {"name": "ed", "type": "empathetic_dialogues", "path": "fixtures/empathetic_dialogues/train.csv"},
        {"name": "bad", "type": "sharegpt", "path": "bad.jsonl"},
    ))
    assert sorted(p.name for p in (workdir / "data" / "raw").iterdir()) == ["bad.jsonl", "ed.jsonl", "support.jsonl"]
    assert not list((workdir / "data").glob(".*partial"))
    assert summary["rows.support"] == 60 and summary["rows.ed"] == 3 and summary["rows.bad"] == 1
    assert summary["quarantined"] == summary["quarantined.bad"] == 3
    assert summary["rows"] == 64 and summary["sources"] == 3 and summary["trimmed_turns"] == 1
    for name in ("support", "ed", "bad"):
        for rec in records(workdir / "data" / "raw" / f"{name}.jsonl"):
            assert set(rec) in (ROW_KEYS, QUARANTINE_KEYS) and rec["source"] == name
    assert [r["origin"] for r in records(workdir / "data" / "raw" / "bad.jsonl")] == [f"bad.jsonl:{i}" for i in (1, 2, 3, 4)]


def test_failed_run_leaves_previous_output_untouched(workdir):
    ingest.run(params_with({"name": "support", "type": "sharegpt", "path": "data/sources/support.jsonl"}))
    before = (workdir / "data" / "raw" / "support.jsonl").read_bytes()
    with pytest.raises(LorapipeError, match=r"data\.sources\[1\] \(gone\)\.path: file not found: missing\.jsonl"):
        ingest.run(params_with(
            {"name": "other", "type": "sharegpt", "path": "data/sources/support.jsonl"},
            {"name": "gone", "type": "sharegpt", "path": "missing.jsonl"},
        ))
    assert [p.name for p in (workdir / "data" / "raw").iterdir()] == ["support.jsonl"]
    assert (workdir / "data" / "raw" / "support.jsonl").read_bytes() == before
    assert not list((workdir / "data").glob(".*partial"))


def test_unknown_source_type_lists_valid_types():
    with pytest.raises(ParamsError, match=r"unknown source type 'csv'; valid types: sharegpt, llamafactory, empathetic_dialogues, daily_dialog, emotion_lines, chatterbot, chitchat"):
        params_with({"name": "x", "type": "csv", "path": "a.csv"})
    with pytest.raises(ParamsError, match=r"source names must be unique, repeated: a"):
        params_with({"name": "a", "type": "chitchat"}, {"name": "a", "type": "chitchat"})
    with pytest.raises(ParamsError, match=r"sources\.0\.name"):
        params_with({"name": "../escape", "type": "chitchat"})


def test_default_params_ingest_real_offline_data_through_the_cli(workdir, capsys):
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    assert cli.main(["ingest"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[ingest] sources=3 ")
    counts = dict(re.findall(r"(rows\.\w+)=(\d+)", line))
    assert int(counts["rows.support"]) == 60 and int(counts["rows.chitchat"]) == 300 and int(counts["rows.chatterbot"]) > 300
    names = {s.name for s in load("params.yaml").data.sources}
    assert {p.stem for p in (workdir / "data" / "raw").iterdir()} == names == {"support", "chatterbot", "chitchat"}


def test_cli_reports_a_missing_source_file_without_traceback(workdir, capsys):
    (workdir / "params.yaml").write_text(yaml.safe_dump({"data": {"sources": [{"name": "mine", "type": "sharegpt", "path": "nope.jsonl"}]}}), encoding="utf-8")
    assert cli.main(["ingest"]) == 2
    assert "error: data.sources[0] (mine).path: file not found: nope.jsonl" in capsys.readouterr().err


def test_shipped_support_set_is_well_formed():
    rows = records(REPO / "data" / "sources" / "support.jsonl")
    assert len(rows) == 60
    chinese = [r for r in rows if re.search(r"[\u4e00-\u9fff]", r["messages"][0]["content"])]
    assert len(chinese) == 30
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles in (["user", "assistant"] * n for n in (1, 2, 3))
        assert all(m["content"].strip() == m["content"] and m["content"] for m in r["messages"])
    assert "written for the lorapipe project" in (REPO / "data" / "sources" / "README.md").read_text(encoding="utf-8")


def test_lone_surrogate_content_is_written_back_as_its_escape(workdir):
    (workdir / "s.jsonl").write_text('{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "ok"}]}\n', encoding="utf-8")
    ingest.run(params_with({"name": "s", "type": "sharegpt", "path": "s.jsonl"}))
    (row,) = records(workdir / "data" / "raw" / "s.jsonl")
    assert row["messages"][0]["content"] == "a\ud800b"  # unchanged for `clean` to reject (invalid_unicode)
