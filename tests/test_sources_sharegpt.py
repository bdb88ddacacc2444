"""sharegpt adapter: messages pass through untouched; unreadable lines are quarantined with their line."""

from __future__ import annotations

import pytest

from lorapipe.core.errors import LorapipeError
from lorapipe.sources import sharegpt

SOURCE = {"name": "mine", "type": "sharegpt"}  # the data.sources entry ctx_for() completes


def test_rows_pass_through_and_conversations_are_converted(monkeypatch, ctx_for, fixtures):
    monkeypatch.chdir(fixtures)
    ctx = ctx_for(path="sharegpt/mixed.jsonl")
    out = list(sharegpt.read(ctx))
    assert out[0] == {
        "messages": [
            {"role": "user", "content": "I feel lonely tonight."},
            {"role": "assistant", "content": "I am sorry you feel lonely. Would you like to talk about your evening?"},
        ],
        "source": "mine",
        "origin": "sharegpt/mixed.jsonl:1",
    }
    # LLaMA-Factory style from/value with a system column
    assert out[1]["messages"] == [
        {"role": "system", "content": "你是一个温暖的倾听者。"},
        {"role": "user", "content": "我很紧张。"},
        {"role": "assistant", "content": "紧张是很正常的，深呼吸几次试试看。"},
    ]
    # structure is not judged here: two user turns pass through for `clean` to reject
    assert [m["role"] for m in out[2]["messages"]] == ["user", "user"]
    assert ctx.stats["converted_conversations"] == 1


def test_bad_lines_are_quarantined_never_dropped(tmp_path, ctx_for):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + b'{"messages": [{"role": "user", "content": "bom"}, {"role": "assistant", "content": "ok"}]}\r\n'
        b"\r\n"  # empty line: holds no row
        b'{"messages": [{"role": "user", "content": "trunc\n'
        b'["an", "array"]\n'
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'
        b'{"text": "no messages here"}\n'
        b'{"messages": [{"role": "user", "content": "' + b"x" * 1_000_000 + b'"}, {"role": "assistant", "content": "big"}]}\n'
    )
    out = list(sharegpt.read(ctx_for(path=str(path))))
    by_line = {r["origin"].rsplit(":", 1)[1]: r for r in out}
    assert sorted(by_line, key=int) == ["1", "3", "4", "5", "6", "7"]
    assert by_line["1"]["messages"][0]["content"] == "bom"  # BOM and CRLF tolerated
    assert by_line["3"]["error"].startswith("invalid JSON")
    assert "list, not an object" in by_line["4"]["error"] and by_line["4"]["raw"] == '["an", "array"]'
    assert by_line["5"]["error"].startswith("invalid UTF-8")
    assert "messages" not in by_line["6"] and "error" not in by_line["6"]  # clean rejects: missing messages
    assert len(by_line["7"]["messages"][0]["content"]) == 1_000_000  # big content passes through whole
    assert all(len(r.get("raw", "")) <= 2000 for r in out)


def test_quarantine_raw_is_truncated(tmp_path, ctx_for):
    path = tmp_path / "long.jsonl"
    path.write_text('{"messages": "' + "y" * 5000 + "\n", encoding="utf-8")
    (rec,) = sharegpt.read(ctx_for(path=str(path)))
    assert rec["error"].startswith("invalid JSON") and len(rec["raw"]) == 2000


def test_missing_file_names_file_and_params_key(tmp_path, ctx_for):
    with pytest.raises(LorapipeError, match=r"data\.sources\[0\] \(mine\)\.path: file not found: .*nope\.jsonl"):
        list(sharegpt.read(ctx_for(path=str(tmp_path / "nope.jsonl"))))
