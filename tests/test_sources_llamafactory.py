"""llamafactory adapter: dataset_info.json entries converted as LLaMA-Factory converts them."""

from __future__ import annotations

import json

import pytest

from conftest import source_context
from lorapipe.core.errors import LorapipeError
from lorapipe.sources import llamafactory


def read(*datasets: str, info: str = "llamafactory/dataset_info.json") -> list[dict]:
    return list(llamafactory.read(source_context("lf", "llamafactory", dataset_info=info, datasets=list(datasets))))


@pytest.fixture(autouse=True)
def _in_fixtures(monkeypatch, fixtures):
    monkeypatch.chdir(fixtures)


def test_sharegpt_default_tags_system_column_and_system_turn():
    out = read("support_sharegpt")
    assert out[0]["origin"] == "llamafactory/data/support_sharegpt.json:#0"
    assert out[0]["messages"] == [
        {"role": "system", "content": "You are a warm and supportive listener."},
        {"role": "user", "content": "I feel nervous about my first day at a new school."},
        {"role": "assistant", "content": "Feeling nervous before a first day is very normal. What worries you most?"},
        {"role": "user", "content": "Not knowing anyone."},
        {"role": "assistant", "content": "That's understandable. Saying hello to one person and asking their name is a great start."},
    ]
    assert [m["role"] for m in out[1]["messages"]] == ["system", "user", "assistant"]
    # tool turns keep their tags as roles: `clean` rejects them with "unknown role"
    assert [m["role"] for m in out[2]["messages"]] == ["user", "function_call", "observation", "assistant"]
    assert out[3]["error"] == "record is list, not an object" and out[3]["origin"].endswith(":#3")


def test_sharegpt_custom_tags_and_bad_jsonl_line():
    out = read("support_openai_tags")
    assert out[0]["messages"][0] == {"role": "system", "content": "Be kind."}
    assert out[1]["messages"][1] == {"role": "assistant", "content": "Any time. Take care of yourself."}
    assert out[2]["origin"] == "llamafactory/data/support_openai.jsonl:3" and out[2]["error"].startswith("invalid JSON")


def test_alpaca_history_system_and_prompt_query_join():
    out = read("advice_alpaca")
    assert out[0]["messages"] == [
        {"role": "user", "content": "How can I calm down before an exam?"},
        {"role": "assistant", "content": "Try slow breathing: in for four counts, out for six, a few times."},
    ]
    assert out[1]["messages"] == [
        {"role": "system", "content": "You are a caring assistant."},
        {"role": "user", "content": "I can't sleep well lately."},
        {"role": "assistant", "content": "I'm sorry to hear that. What usually keeps you awake?"},
        {"role": "user", "content": "Give me one tip for sleeping better.\nI usually look at my phone in bed."},
        {"role": "assistant", "content": "Put the phone away an hour before bed and keep it out of reach."},
    ]
    assert "history item is not a [prompt, response] pair" in out[2]["error"]


def test_seed_style_entry_file_format_aliases_and_openai_rows():
    # The seed registers {"file": ..., "format": "sharegpt"} over rows of role/content messages.
    out = read("train_data_multi_50pct")
    assert [r["origin"] for r in out] == [
        "llamafactory/data/train_data_multi_50pct.jsonl:1",
        "llamafactory/data/train_data_multi_50pct.jsonl:2",
    ]
    assert out[0]["messages"][0] == {"role": "user", "content": "最近总是失眠。"}


def test_several_entries_in_order():
    out = read("train_data_multi_50pct", "advice_alpaca")
    assert len(out) == 5 and out[0]["origin"].endswith("train_data_multi_50pct.jsonl:1")


def test_folder_entry_reads_every_json_file(tmp_path):
    (tmp_path / "parts").mkdir()
    for i in range(2):
        rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"}]
        (tmp_path / "parts" / f"p{i}.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"parts": {"file_name": "parts"}}), encoding="utf-8")
    out = read("parts", info=str(tmp_path / "dataset_info.json"))
    assert [r["messages"][1]["content"] for r in out] == ["a0", "a1"]


def test_errors_name_file_entry_and_key(tmp_path):
    with pytest.raises(LorapipeError, match=r"datasets: 'nope' is not in .*entries there: advice_alpaca"):
        read("nope")
    with pytest.raises(LorapipeError, match=r"entry 'remote_only': has 'hf_hub_url' but no 'file_name'"):
        read("remote_only")
    with pytest.raises(LorapipeError, match=r"\.dataset_info: file not found"):
        read("x", info=str(tmp_path / "missing.json"))
    bad = tmp_path / "dataset_info.json"
    bad.write_text('{"a": {"file_name": "x.json",}', encoding="utf-8")
    with pytest.raises(LorapipeError, match=r"dataset_info\.json:1: invalid JSON"):
        read("a", info=str(bad))
    bad.write_text(json.dumps({"a": {"file_name": "a.json", "formatting": "openai"}}), encoding="utf-8")
    with pytest.raises(LorapipeError, match=r"formatting 'openai' is not supported; valid: alpaca, sharegpt"):
        read("a", info=str(bad))
    bad.write_text(json.dumps({"a": {"file_name": "gone.json"}}), encoding="utf-8")
    with pytest.raises(LorapipeError, match=r"file_name not found: .*gone\.json"):
        read("a", info=str(bad))
