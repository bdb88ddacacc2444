"""Bad raw input through the real `clean` stage: each case is rejected with its reason and its file:line,
or (BOM, CRLF, blank lines) read correctly; nothing is silently lost; strict mode names file:line.

One module-scoped run of the stage over files that hold every case keeps this quick; each case is then
its own test. (A missing source file and an unknown source type are ingest's: tests/test_ingest.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorapipe.core.errors import LorapipeError
from lorapipe.params import parse
from lorapipe.stages import clean

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 2048


def jl(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def turns(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs], "source": "mixed"}


GOOD = turns(("user", "I had a rough day."), ("assistant", "I'm sorry to hear that. What happened?"))
ONE_MB = "I keep thinking about everything that went wrong this year. " * 17_500  # ~1.05 MB

# line number -> (bytes of the line, expected reason or None when the row must be kept)
MIXED: dict[int, tuple[bytes, str | None]] = {
    1: (b'{"messages": [{"role": "user", "content": "trunc', "invalid_json"),
    2: (b'[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]', "not_an_object"),
    3: (b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}], "source": "mixed"}', "invalid_utf8"),
    # line 4 is empty, line 5 only whitespace: not rows
    6: (jl({"source": "mixed", "origin": "x.jsonl:6"}), "missing_messages"),
    7: (jl(turns(("user", "hi"), ("bot", "hello there"))), "unknown_role"),
    8: (jl(turns(("user", "hi"), ("user", "anyone?"), ("assistant", "yes, I'm here"))), "not_alternating"),
    9: (jl(turns(("user", "hi"), ("assistant", "hello there"), ("user", "bye"))), "last_not_assistant"),
    10: (jl(turns(("user", ""), ("assistant", "hello there"))), "empty_content"),
    11: (jl(turns(("user", "hi"), ("assistant", " \n\t "))), "empty_content"),
    12: (jl(turns(("user", ONE_MB), ("assistant", "That is a lot to carry. I'm here."))), "too_long"),
    13: (jl({"source": "mixed", "origin": "sources/a.csv:7", "error": "unterminated quote", "raw": "7,\"oops"}), "quarantined"),
    14: (jl(GOOD), None),
    15: (jl(turns(("assistant", "hello"), ("user", "hi"), ("assistant", "how are you?"))), "first_not_user"),
    16: (jl(turns(("user", "hi"), ("system", "be nice"), ("assistant", "hello there"))), "system_not_first"),
    17: (jl({"messages": "hi"}), "messages_not_a_list"),
    18: (jl({"messages": []}), "empty_messages"),
    19: (jl(turns(("user", 42), ("assistant", "a number"))), "content_not_string"),
    20: (jl({"messages": [{"role": "user"}, {"role": "assistant", "content": "x y"}]}), "bad_message"),
    21: (b'{"messages": [{"role": "user", "content": "\\ud800 lone"}, {"role": "assistant", "content": "ok then"}]}', "invalid_unicode"),
}


def mixed_bytes() -> bytes:
    lines = [MIXED[i][0] if i in MIXED else (b"" if i == 4 else b"   \t") for i in range(1, max(MIXED) + 1)]
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory, smollm2_tokenizer_dir):
    """Run the stage once over all cases; return (project dir, rejects by 'at', kept rows, metrics)."""
    project = tmp_path_factory.mktemp("bad-input")
    (project / "models").mkdir()
    (project / "models" / "base").symlink_to(smollm2_tokenizer_dir, target_is_directory=True)
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(REPO / "data" / "rules.yaml", project / "data" / "rules.yaml")
    (raw / "mixed.jsonl").write_bytes(mixed_bytes())
    (raw / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jl(turns(("user", "BOM first"), ("assistant", "Read fine."))) + b"\n")
    (raw / "crlf.jsonl").write_bytes(b"".join(jl(turns(("user", f"crlf {i}"), ("assistant", f"windows line {i}"))) + b"\r\n" for i in range(3)))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        clean.run(parse({"data": {"clean": {"max_tokens": MAX_TOKENS}}}))
    rejects = {r["at"]: r for r in map(json.loads, (project / "data/clean/rejects.jsonl").read_text(encoding="utf-8").splitlines())}
    kept = [json.loads(line) for side in ("train", "eval") for line in (project / f"data/clean/{side}.jsonl").read_text(encoding="utf-8").splitlines()]
    metrics = json.loads((project / "metrics/data.json").read_text())
    return project, rejects, kept, metrics


@pytest.mark.parametrize("lineno", [i for i in MIXED if MIXED[i][1]], ids=lambda i: MIXED[i][1] + f"@{i}")
def test_each_bad_row_is_rejected_with_its_reason_and_file_line(cleaned, lineno):
    _, rejects, _, metrics = cleaned
    rec = rejects[f"data/raw/mixed.jsonl:{lineno}"]
    assert rec["reason"] == MIXED[lineno][1]
    assert rec["detail"] and rec["source"] == "mixed"
    assert ("row" in rec) != ("raw" in rec)  # the row as parsed, or the raw text when unreadable
    assert metrics["dropped"][MIXED[lineno][1]] >= 1


def test_unreadable_lines_keep_their_text(cleaned):
    _, rejects, _, _ = cleaned
    assert rejects["data/raw/mixed.jsonl:1"]["raw"] == MIXED[1][0].decode()
    assert "caf\ufffd \ufffd" in rejects["data/raw/mixed.jsonl:3"]["raw"]  # invalid bytes shown as U+FFFD
    assert rejects["data/raw/mixed.jsonl:3"]["detail"] == "invalid UTF-8 at byte %d" % MIXED[3][0].index(b"\xe9")
    assert rejects["data/raw/mixed.jsonl:2"]["row"][0]["role"] == "user"  # the array, as parsed


def test_quarantine_record_from_ingest_is_counted_with_its_origin_and_text(cleaned):
    _, rejects, _, _ = cleaned
    rec = rejects["data/raw/mixed.jsonl:13"]
    assert (rec["reason"], rec["origin"], rec["detail"], rec["raw"]) == ("quarantined", "sources/a.csv:7", "unterminated quote", '7,"oops')


def test_one_megabyte_content_is_too_long_not_a_crash(cleaned):
    _, rejects, _, _ = cleaned
    rec = rejects["data/raw/mixed.jsonl:12"]
    # Decided by the word-count floor: ~175,000 words cannot fit, no need to tokenize a megabyte.
    assert rec["detail"].startswith("at least ") and rec["detail"].endswith(f"> max_tokens {MAX_TOKENS}")
    assert int(rec["detail"].split()[2]) > 100_000
    assert len(rec["row"]["messages"][0]["content"]) == len(ONE_MB)


def test_bom_crlf_and_blank_lines_are_read_correctly(cleaned):
    _, rejects, kept, metrics = cleaned
    by_origin = {r["origin"]: r for r in kept}
    assert by_origin["data/raw/bom.jsonl:1"]["messages"][0]["content"] == "BOM first"
    assert [by_origin[f"data/raw/crlf.jsonl:{i}"]["messages"][1]["content"] for i in (1, 2, 3)] == [f"windows line {i}" for i in range(3)]
    assert metrics["sources"]["bom"]["kept"] == 1 and metrics["sources"]["crlf"]["kept"] == 3
    # blank / whitespace-only lines hold no row: not read, not rejected, counted; later line numbers stay true
    assert not any(at.endswith((":4", ":5")) and "mixed" in at for at in rejects)
    assert metrics["sources"]["mixed"]["blank_lines"] == 2 and metrics["blank_lines"] == 2
    assert "data/raw/mixed.jsonl:14" in by_origin


def test_nothing_is_silently_lost(cleaned):
    project, rejects, kept, metrics = cleaned
    places = {r["origin"] for r in kept} | set(rejects)
    expected = {f"data/raw/mixed.jsonl:{i}" for i in MIXED} | {"data/raw/bom.jsonl:1"} | {f"data/raw/crlf.jsonl:{i}" for i in (1, 2, 3)}
    assert places == expected and len(kept) + len(rejects) == len(expected)
    assert metrics["read"] == len(expected) == metrics["kept"] + metrics["rejected"]
    assert metrics["kept"] == metrics["train"] + metrics["eval"] == len(kept)
    assert sum(metrics["dropped"].values()) == metrics["rejected"] == len(rejects)
    # every line of the raw files is read or counted blank
    raw_lines = {p.stem: len(p.read_bytes().splitlines()) for p in (project / "data" / "raw").glob("*.jsonl")}
    assert metrics["read"] + metrics["blank_lines"] == sum(raw_lines.values())
    for name, c in metrics["sources"].items():
        assert c["read"] == c["kept"] + c["rejected"] == c["train"] + c["eval"] + c["rejected"]
        assert c["read"] + c["blank_lines"] == raw_lines[name]
    assert not list(project.rglob("*.partial"))


def test_strict_mode_names_the_first_bad_line(cleaned, tmp_path, monkeypatch):
    project, *_ = cleaned
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(project / "models" / "base", target_is_directory=True)
    (tmp_path / "data" / "raw").mkdir(parents=True)
    shutil.copy(REPO / "data" / "rules.yaml", tmp_path / "data" / "rules.yaml")
    monkeypatch.chdir(tmp_path)
    strict = parse({"data": {"clean": {"strict": True}}})
    cases = [(b"\xef\xbb\xbf" + jl(GOOD) + b"\r\n\r\n" + MIXED[3][0] + b"\r\n", "3: invalid_utf8: invalid UTF-8 at byte"),
             (jl(GOOD) + b"\n" + MIXED[1][0] + b"\n", "2: invalid_json"),
             (jl(GOOD) + b"\n\n" + MIXED[13][0] + b"\n", "3: quarantined: unterminated quote"),
             (MIXED[9][0] + b"\n", "1: last_not_assistant")]
    for content, where in cases:
        (tmp_path / "data" / "raw" / "x.jsonl").write_bytes(content)
        with pytest.raises(LorapipeError, match="^data/raw/x.jsonl:" + where):
            clean.run(strict)
        assert not (tmp_path / "data" / "clean" / "train.jsonl").exists()
