"""Bad raw input through the real `clean` stage: each case is rejected with its reason and its file:line,
or (BOM, CRLF, blank lines) read correctly; nothing is silently lost; strict mode names file:line.
The same cases as source files through ingest + clean: every line of the inputs is in one count.

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
from lorapipe.stages import clean, ingest

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


def new_project(tmp_path_factory, tokenizer_dir: Path, name: str) -> Path:
    """A folder with models/base (the tokenizer clean counts tokens with) and data/rules.yaml."""
    project = tmp_path_factory.mktemp(name)
    (project / "models").mkdir()
    (project / "models" / "base").symlink_to(tokenizer_dir, target_is_directory=True)
    (project / "data").mkdir()
    shutil.copy(REPO / "data" / "rules.yaml", project / "data" / "rules.yaml")
    return project


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory, smollm2_tokenizer_dir):
    """Run the stage once over all cases; return (project dir, rejects by 'at', kept rows, metrics)."""
    project = new_project(tmp_path_factory, smollm2_tokenizer_dir, "bad-input")
    raw = project / "data" / "raw"
    raw.mkdir()
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


def eighteen_lines_fifth_empty() -> bytes:
    rows = [jl(turns(("user", f"question {i} about my day"), ("assistant", f"answer {i}, tell me more"))) for i in range(17)]
    return b"\n".join(rows[:4] + [b""] + rows[4:]) + b"\n"


# source file -> its bytes; each has blank lines somewhere (inside, first, last), each is read by a line-based adapter
SOURCES = {
    "sources/mixed.jsonl": mixed_bytes(),
    "sources/eighteen.jsonl": eighteen_lines_fifth_empty(),
    "sources/edges.jsonl": b"\n \r\n" + jl(GOOD) + b"\r\n\r\n" + MIXED[1][0] + b"\n\t\n\n",
    "sources/lf/chats.jsonl": b"\n".join([jl(GOOD), b"", jl({"messages": "x"}), b"  ", jl(GOOD)]) + b"\n\n",
}
SOURCE_PARAMS = [
    {"name": "mixed", "type": "sharegpt", "path": "sources/mixed.jsonl"},
    {"name": "eighteen", "type": "sharegpt", "path": "sources/eighteen.jsonl"},
    {"name": "edges", "type": "sharegpt", "path": "sources/edges.jsonl"},
    {"name": "lf", "type": "llamafactory", "dataset_info": "sources/lf/dataset_info.json", "datasets": ["chats"]},
]
SOURCE_FILES = {"mixed": ["sources/mixed.jsonl"], "eighteen": ["sources/eighteen.jsonl"],
                "edges": ["sources/edges.jsonl"], "lf": ["sources/lf/chats.jsonl"]}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, smollm2_tokenizer_dir):
    """Ingest then clean over the SOURCES; return (project dir, ingest's summary, clean's metrics)."""
    project = new_project(tmp_path_factory, smollm2_tokenizer_dir, "ingest-clean")
    for name, data in SOURCES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_bytes(data)
    (project / "sources/lf/dataset_info.json").write_text(json.dumps({"chats": {"file_name": "chats.jsonl", "formatting": "sharegpt"}}))
    params = parse({"data": {"sources": SOURCE_PARAMS, "clean": {"max_tokens": MAX_TOKENS}}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        summary = ingest.run(params)
        clean.run(params)
    return project, summary, json.loads((project / "metrics/data.json").read_text())


def test_a_blank_line_of_a_source_is_counted_by_ingest(ingested):
    _, summary, metrics = ingested
    assert summary["blank_lines.eighteen"] == 1 and summary["rows.eighteen"] == 17
    assert metrics["sources"]["eighteen"]["read"] == 17 and metrics["sources"]["eighteen"]["blank_lines"] == 0
    assert summary["blank_lines.mixed"] == 2 and summary["blank_lines.edges"] == 5 and summary["blank_lines.lf"] == 3
    assert summary["blank_lines"] == 11


def test_ingest_and_clean_count_every_line_of_the_inputs(ingested):
    project, summary, metrics = ingested
    lines = {name: sum(len((project / f).read_bytes().splitlines()) for f in files) for name, files in SOURCE_FILES.items()}
    for name, c in metrics["sources"].items():
        ingest_counts = summary[f"rows.{name}"] + summary.get(f"quarantined.{name}", 0) + summary.get(f"blank_lines.{name}", 0)
        assert ingest_counts == lines[name]
        assert summary.get(f"blank_lines.{name}", 0) + c["read"] + c["blank_lines"] == lines[name]
        assert c["read"] == c["kept"] + c["rejected"]
    assert summary["blank_lines"] + metrics["read"] + metrics["blank_lines"] == sum(lines.values())
    assert metrics["kept"] + metrics["rejected"] == metrics["read"] and sum(metrics["dropped"].values()) == metrics["rejected"]


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
