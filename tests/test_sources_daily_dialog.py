"""daily_dialog adapter: __eou__ text with its parallel act/emotion files."""

from __future__ import annotations

import shutil

import pytest

from lorapipe.core.errors import LorapipeError
from lorapipe.sources import daily_dialog as dd


@pytest.mark.parametrize("path", ["daily_dialog", "daily_dialog/dialogues_text.txt"])
def test_release_folder_or_file(monkeypatch, path, ctx_for, fixtures):
    monkeypatch.chdir(fixtures)
    ctx = ctx_for(path=path)
    out = list(dd.read(ctx))
    assert [r["origin"] for r in out] == [f"daily_dialog/dialogues_text.txt:{i}" for i in (1, 2, 3)]
    assert out[0]["messages"] == [
        {"role": "user", "content": "Hello , how are you today ?"},
        {"role": "assistant", "content": "I am fine , thank you . And you ?"},
        {"role": "user", "content": "Not so good . I did badly in my exam ."},
        {"role": "assistant", "content": "I am sorry to hear that . Do you want to talk about it ?"},
    ]
    assert [m["role"] for m in out[2]["messages"]] == ["user", "assistant"]  # trailing user turn trimmed
    assert ctx.stats["trimmed_turns"] == 1 and ctx.stats["label_files_checked"] == 2

SOURCE = {"name": "dd", "type": "daily_dialog"}  # the data.sources entry ctx_for() completes


def test_split_files_of_the_split_archives(tmp_path, ctx_for, fixtures):
    folder = tmp_path / "ijcnlp_dailydialog" / "validation"
    folder.mkdir(parents=True)
    for kind, name in (("text", "dialogues_validation.txt"), ("act", "dialogues_act_validation.txt"), ("emotion", "dialogues_emotion_validation.txt")):
        shutil.copy(fixtures / "daily_dialog" / f"dialogues_{kind}.txt", folder / name)
    out = list(dd.read(ctx_for(path=str(tmp_path / "ijcnlp_dailydialog"), split="validation")))
    assert len(out) == 3 and out[0]["origin"].endswith("dialogues_validation.txt:1")


def test_label_count_mismatch_names_file_and_line(tmp_path, ctx_for, fixtures):
    shutil.copytree(fixtures / "daily_dialog", tmp_path / "dd")
    (tmp_path / "dd" / "dialogues_emotion.txt").write_text("0 0 5 0 \n0 0 0 \n5 3 0 \n", encoding="utf-8")
    with pytest.raises(LorapipeError, match=r"dialogues_emotion\.txt:2: 3 labels but .*dialogues_text\.txt:2 has 2 utterances"):
        list(dd.read(ctx_for(path=str(tmp_path / "dd"))))
    (tmp_path / "dd" / "dialogues_emotion.txt").write_text("0 0 5 0 \n0 0 \n", encoding="utf-8")
    with pytest.raises(LorapipeError, match=r"dialogues_emotion\.txt:3: file ends early"):
        list(dd.read(ctx_for(path=str(tmp_path / "dd"))))


def test_invalid_utf8_line_is_quarantined(tmp_path, ctx_for):
    (tmp_path / "dialogues_text.txt").write_bytes(b"Hi . __eou__ Hello . __eou__\ncaf\xe9 ? __eou__ Yes . __eou__\n")
    out = list(dd.read(ctx_for(path=str(tmp_path / "dialogues_text.txt"))))
    assert "messages" in out[0] and out[1]["error"].startswith("invalid UTF-8") and out[1]["origin"].endswith(":2")


def test_hub_rows_and_their_label_check(ctx_for):
    ctx = ctx_for(hub_id="li2017dailydialog/daily_dialog")
    rows = [{"dialog": [" Hi . ", " Hello ! "], "act": [1, 2], "emotion": [0, 4]}]
    (row,) = dd.hub_rows(ctx, rows)
    assert row["messages"] == [{"role": "user", "content": "Hi ."}, {"role": "assistant", "content": "Hello !"}]
    with pytest.raises(LorapipeError, match=r"#0: 1 act labels but 2 utterances"):
        list(dd.hub_rows(ctx, [{"dialog": ["a", "b"], "act": [1], "emotion": [0, 0]}]))


def test_hub_offline_is_a_clear_error(monkeypatch, ctx_for):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorapipeError, match=r"hub is unreachable .*local file instead"):
        list(dd.read(ctx_for(hub_id="li2017dailydialog/daily_dialog")))
