"""empathetic_dialogues adapter: the release CSV (and hub rows of the same columns) -> conversations."""

from __future__ import annotations

import pytest

from lorapipe.core.errors import LorapipeError
from lorapipe.params import ParamsError
from lorapipe.sources import empathetic_dialogues as ed

SOURCE = {"name": "ed", "type": "empathetic_dialogues"}  # the data.sources entry ctx_for() completes


def test_release_csv(monkeypatch, ctx_for, fixtures):
    monkeypatch.chdir(fixtures)
    ctx = ctx_for(path="empathetic_dialogues/train.csv")
    out = list(ed.read(ctx))
    assert [r["origin"] for r in out] == [
        "empathetic_dialogues/train.csv:2",
        "empathetic_dialogues/train.csv:6",
        "empathetic_dialogues/train.csv:9",
    ]
    # ordered by utterance_idx (the file has 1, 3, 2, 4); _comma_ unescaped; first speaker is the user
    assert out[0]["messages"] == [
        {"role": "user", "content": "I moved here last month and I still eat dinner alone every night."},
        {"role": "assistant", "content": "That sounds hard. Have you found anything to do in the evenings?"},
        {"role": "user", "content": "Not yet, but I saw a flyer for a running club."},
        {"role": "assistant", "content": "A running club is a great way to meet people. I hope you give it a try!"},
    ]
    # a conversation ending on the speaker's turn is trimmed to the listener's last reply, and counted
    assert [m["role"] for m in out[1]["messages"]] == ["user", "assistant"]
    assert out[1]["messages"][1]["content"] == "Wow, that is a big moment. How did she feel?"
    assert ctx.stats["trimmed_turns"] == 1
    # the 9th field (candidate replies) on some lines is not part of the utterance
    assert out[2]["messages"][1]["content"] == "That would scare me too. Could it have been an animal?"


def test_max_conversations_takes_the_first_in_release_order(monkeypatch, ctx_for, fixtures):
    monkeypatch.chdir(fixtures)
    out = list(ed.read(ctx_for(path="empathetic_dialogues/train.csv", max_conversations=2)))
    assert len(out) == 2 and out[1]["origin"].endswith(":6")


def test_bad_lines_quarantined_and_bad_header_is_an_error(tmp_path, ctx_for):
    path = tmp_path / "valid.csv"
    path.write_bytes(
        b"conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags\n"
        b"hit:5_conv:9,1,sad,p,1,I lost my job.,,\n"
        b"hit:5_conv:9,2,sad,p,2,I am so sorry.\n"
        b"hit:5_conv:9,x,sad,p,2,bad index,,\n"
        b"hit:5_conv:9,2,sad,p,2,caf\xe9,,\n"
        b"hit:5_conv:9,2,sad,p,2,I am so sorry to hear that.,,\n"
    )
    out = list(ed.read(ctx_for(path=str(path))))
    errors = {r["origin"].rsplit(":", 1)[1]: r["error"] for r in out if "error" in r}
    assert errors == {"3": "6 fields, expected 8", "4": "utterance_idx and speaker_idx must be integers", "5": "invalid UTF-8 at byte 26"}
    (row,) = [r for r in out if "messages" in r]
    assert [m["content"] for m in row["messages"]] == ["I lost my job.", "I am so sorry to hear that."]
    path.write_text("a,b,c\n", encoding="utf-8")
    with pytest.raises(LorapipeError, match=r"valid\.csv:1: not an EmpatheticDialogues CSV header"):
        list(ed.read(ctx_for(path=str(path))))


def test_hub_rows_use_the_release_columns(ctx_for):
    rows = [  # what datasets' empathetic_dialogues rows look like: the CSV's columns, text still escaped
        {"conv_id": "hit:1_conv:2", "utterance_idx": 2, "context": "proud", "prompt": "p", "speaker_idx": 9, "utterance": "Great_comma_ well done!", "selfeval": "", "tags": ""},
        {"conv_id": "hit:1_conv:2", "utterance_idx": 1, "context": "proud", "prompt": "p", "speaker_idx": 33, "utterance": "I passed!", "selfeval": "", "tags": ""},
    ]
    ctx = ctx_for(hub_id="facebook/empathetic_dialogues")
    (row,) = ed.conversations(ctx, ed.hub_utterances(ctx, rows))
    assert row["messages"] == [{"role": "user", "content": "I passed!"}, {"role": "assistant", "content": "Great, well done!"}]
    assert row["origin"] == "hub:facebook/empathetic_dialogues/train:#0"


def test_hub_offline_is_a_clear_error(monkeypatch, ctx_for):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorapipeError, match=r"hub_id: the Hugging Face hub is unreachable .*set 'data\.sources\[0\] \(ed\)\.path'"):
        list(ed.read(ctx_for(hub_id="facebook/empathetic_dialogues")))


def test_path_or_hub_id_exactly_one(ctx_for):
    with pytest.raises(ParamsError, match="set exactly one of 'path'"):
        ctx_for()
    with pytest.raises(ParamsError, match="set exactly one of 'path'"):
        ctx_for(path="a.csv", hub_id="b")


def test_hub_without_network_is_a_clear_error(monkeypatch, ctx_for):
    # `.invalid` never resolves (RFC 2606): the same failure as a machine with no network.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    with pytest.raises(LorapipeError, match=r"hub is unreachable \(cannot resolve hub\.example\.invalid"):
        list(ed.read(ctx_for(hub_id="facebook/empathetic_dialogues")))
