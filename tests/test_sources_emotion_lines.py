"""emotion_lines adapter: the EmotionLines release JSON (dialogues of {speaker, utterance, ...})."""

from __future__ import annotations

import json

import pytest

from lorapipe.core.errors import LorapipeError
from lorapipe.sources import emotion_lines as el

SOURCE = {"name": "el", "type": "emotion_lines"}  # the data.sources entry ctx_for() completes


def test_release_json(monkeypatch, ctx_for, fixtures):
    monkeypatch.chdir(fixtures)
    out = list(el.read(ctx_for(path="emotion_lines/friends_train.json")))
    assert [r["origin"] for r in out] == ["emotion_lines/friends_train.json:#0", "emotion_lines/friends_train.json:#1"]
    # Monica's two consecutive lines are one turn; turns alternate from the first speaker
    assert out[0]["messages"] == [
        {"role": "user", "content": "Okay, everybody relax. This is not even a date."},
        {"role": "assistant", "content": "Sure it is!"},
        {"role": "user", "content": "It's just two people going out to dinner. Two friends, one table, no romance."},
        {"role": "assistant", "content": "Sounds like a date to me."},
    ]
    assert [m["role"] for m in out[1]["messages"]] == ["user", "assistant"]


def test_malformed_dialogue_quarantined_bad_file_an_error(tmp_path, ctx_for):
    path = tmp_path / "emotionpush_dev.json"
    path.write_text(json.dumps([[{"speaker": "a", "utterance": "hi"}, {"speaker": "b"}], "nope", [{"speaker": "a", "utterance": "x"}, {"speaker": "b", "utterance": "y"}]]), encoding="utf-8")
    out = list(el.read(ctx_for(path=str(path), max_conversations=2)))
    assert len(out) == 2
    assert out[0]["error"] == "utterance 1 lacks a text 'speaker' and 'utterance'"
    assert out[1]["error"] == "dialogue is str, not a list of utterances" and out[1]["raw"] == "nope"
    path.write_text('[[{"speaker": "a",', encoding="utf-8")
    with pytest.raises(LorapipeError, match=r"emotionpush_dev\.json:1: invalid JSON"):
        list(el.read(ctx_for(path=str(path))))


def test_hub_rows_find_the_dialogue_column(ctx_for):
    ctx = ctx_for(hub_id="someone/emotion_lines")
    rows = [{"id": 3, "dialogue": [{"speaker": "A", "utterance": "Hi", "emotion": "neutral"}, {"speaker": "B", "utterance": "Hey", "emotion": "joy"}]}]
    (row,) = el.hub_rows(ctx, rows)
    assert row["messages"][1] == {"role": "assistant", "content": "Hey"}
    with pytest.raises(LorapipeError, match=r"no list of \{speaker, utterance\} \(columns: \['text'\]\)"):
        list(el.hub_rows(ctx, [{"text": "x"}]))


def test_hub_offline_is_a_clear_error(monkeypatch, ctx_for):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorapipeError, match=r"unreachable"):
        list(el.read(ctx_for(hub_id="someone/emotion_lines")))
